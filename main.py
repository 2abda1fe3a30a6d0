"""The HTTP service: routes, lifespan and error mapping. The one place that joins transport,
batching and the model.

Run it with ``gunicorn main:app -c gunicorn_config.py`` (production) or ``make dev``
(development: uvicorn with the service's HTTP protocol, as the README shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import io
import logging
import math
import multiprocessing
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, BinaryIO, TypeVar

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from batching import (
    BatchFailed,
    BatchProcessor,
    DeadlineExceeded,
    Outcome,
    Priority,
    QueueFull,
    Stopped,
)
from classification import (
    Classifier,
    DeviceFailed,
    ImageTooLarge,
    InvalidImage,
    ModelLoadError,
    OutOfMemory,
    Prediction,
    load_classifier,
    preprocess,
    resolve_device,
)
from service import logs, memory, metrics, webhooks
from service.middleware import (
    NO_BOUNDARY,
    REQUEST_ID_HEADER,
    REQUEST_ID_STATE,
    RETRY_AFTER_S,
    ApiKeyMiddleware,
    BodyLimitsMiddleware,
    JsonCorsMiddleware,
    RequestContextMiddleware,
    ShedWhileFullMiddleware,
    UploadsInFlight,
    matching_route,
    serves,
)
from service.protocol import (
    EXIT_BOOT_ERROR,
    EXIT_RESTART,
    LIVENESS_STATE,
    SHUTDOWN_HOOK,
    SIBLINGS_STATE,
    UPLOAD_END_STATE,
    pause_unless_stopped,
    raise_open_file_limit,
    restart_pause_s,
)
from service.schemas import (
    ANY_OTHER_ERROR,
    BATCH_HEADERS,
    METRICS_RESPONSES,
    READY_PROBE_HEADERS,
    TASK_ACCEPTED_HEADERS,
    BatchEntry,
    BatchResponse,
    ClassifyResponse,
    PredictionOut,
    ProbeOut,
    TaskAccepted,
    TaskOut,
    describe_uploads_as_files,
    document_the_api_key,
    documentation_paths,
    error_responses,
    task_response,
)
from service.settings import Settings, load_settings, misspelt_settings, settings_to_warn_of
from service.siblings import Siblings
from service.task_fields import (
    IDEMPOTENCY_KEY_SCHEMA,
    InvalidTaskField,
    TaskNotFound,
    idempotency_key_in,
    parse_metadata,
    valid_task_id,
)
from service.task_runner import TASK_STOP_GRACE_S, RunnerConfig, RunnerStopped, TaskRunner
from service.tasks import (
    DATABASE_NAME,
    ClaimedTask,
    IdempotencyKeyReused,
    TaskNotCancellable,
    TaskQueueFull,
    TaskRecord,
    TaskStore,
    TaskStoreBusy,
    TaskStoreFailed,
    TaskStoreUnavailable,
)
from service.webhooks import (
    CallbackLookupFailed,
    InvalidCallbackUrl,
    WebhookConfig,
    WebhookSender,
    check_callback_url,
    host_to_look_up,
)

logger = logging.getLogger("service")
# How many times a full batch's warm-up time STALL_TIMEOUT_S should allow at least: batches
# run slower under load, with decodes beside them.
STALL_MARGIN = 3
T = TypeVar("T")

# The model's routes: a model served in classification's place renames them here.
CLASSIFY_ROUTE = "/cls"
CLASSIFY_BATCH_ROUTE = "/cls/batch"
TASKS_ROUTE = "/tasks"
# Multipart framing (boundaries, part headers) on top of the file bytes themselves.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_OTHER_BODY_BYTES = 64 * 1024
SHUTTING_DOWN = "the server is shutting down; retry"
DEFAULT_TOP_K = 5
# Probes and scrapers reach these without the API key.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# How long a batch of tasks waits for their attempts to be on disk before the model runs
# them: a few milliseconds normally (one fsync); bounded, for a store locked by another
# process, since /cls requests queue behind the batch.
ATTEMPT_RECORD_WAIT_S = 0.25
# A small image, decoded on threads apart from large ones (and by an idle model's own
# thread), has at most this many pixels (800x625): at most about 20 ms for a PNG, 6 for a
# JPEG (28 for one of the most scans accepted), on a 2-core VM, about as long as a batch
# of one. A larger image would hold the model from the requests arriving meanwhile.
SMALL_IMAGE_MAX_PIXELS = 500_000
# ... and at most this many bytes: reading a file's structure (PNG chunks, TIFF strip
# tables) costs time per byte whatever pixels it declares, up to seconds for a few MB.
SMALL_UPLOAD_MAX_BYTES = 128 * 1024
# How often a worker tries again to open a task store that failed for now (a full disk).
TASK_STORE_RETRY_S = 5.0
# Callback host names looked up at once; while as many are under way, a callback URL is
# taken on its form alone. A lookup that hangs holds its thread until the system's resolver
# gives up, whatever the request's time limit.
CALLBACK_LOOKUP_THREADS = 16
# How long a pool's threads, started together at start-up, wait for one another.
THREAD_START_WAIT_S = 30.0
# A worker whose model has run out of memory on lone images this many times in a row, for
# at least this long, with no batch run since, is replaced: its memory will not come back
# by itself (a leak, a fragmented heap), and until then it would answer only 503s.
OUT_OF_MEMORY_LONE_FAILURES = 3
OUT_OF_MEMORY_PERSISTS_S = 5.0
# How long a task that found no memory waits before it goes back to the queue: time for
# the memory to come back, or for this worker to be replaced should it not.
OUT_OF_MEMORY_RETRY_PAUSE_S = 5.0


class UploadTooLarge(Exception):
    """One uploaded file is larger than ``MAX_UPLOAD_BYTES``."""


class ClientDisconnected(Exception):
    """The client went away while its request waited; nobody will read the answer."""


class NotReady(Exception):
    """The model is not loaded yet, or the worker has shut down."""


class ThreadsUnavailable(Exception):
    """The worker could not start the threads it serves with."""


@dataclass(frozen=True, slots=True)
class ModelFailure:
    """Why the model can run nothing more in this worker, until it is restarted."""

    status: str  # /healthz's status
    summary: str  # what a refused request is told
    reason: str  # the detail, for /readyz and the log


@dataclass(frozen=True, slots=True)
class ClassifyJob:
    """One preprocessed image waiting for a batch."""

    pixels: np.ndarray
    top_k: int
    task_id: str | None = None  # for a stored task, not a /cls request
    # Its request's (or task run's) id, for lines about it written in the batch's own task.
    request_id: str = field(default_factory=logs.request_id_var.get)


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    """One image's predictions, and the size of the batch that computed them."""

    predictions: list[Prediction]
    batch_size: int


class Service:
    """Everything one worker holds while serving: the model, the batcher and their threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        server_started: bool = False,
        uploads: UploadsInFlight | None = None,
    ) -> None:
        self.settings = settings
        self._uploads = uploads or UploadsInFlight()
        # Another worker of this server has started before: the task store exists, or did.
        self.server_started = server_started
        self.classifier: Classifier | None = None
        self.processor: BatchProcessor[ClassifyJob, ClassifyResult] | None = None
        self.ready = False  # the model is loaded and warm, and ``stop`` has not run
        self.draining = False  # the server's shutdown has begun: ready for no new work
        self.model_failure: ModelFailure | None = None
        # Lone images the model has run out of memory on since it last ran a batch, and
        # when the first of them did.
        self._lone_memory_failures = 0
        self._memory_failing_since = 0.0
        self._decodes_in_progress = 0
        self._threads_working = 0  # decodes running or waiting for a thread
        self._submissions_in_progress = 0
        self._last_batch_end = time.monotonic()
        self._tasks_in_model: set[str] = set()  # tasks whose attempt this run has counted
        self._trimmer: asyncio.Task[None] | None = None
        self._memory_reporter: asyncio.Task[None] | None = None
        self._observer = metrics.PrometheusObserver()
        self.tasks: TaskRunner | None = None
        # While the task store cannot be opened: what retries it, the runner it starts,
        # and why it failed.
        self._store_reopener: asyncio.Task[None] | None = None
        self._waiting_runner: TaskRunner | None = None
        self._task_store_problem = ""
        self._shutdown_began: float | None = None
        self._drain_end: asyncio.TimerHandle | None = None
        self._ending_drain: asyncio.Task[None] | None = None
        self._decode_pool = ThreadPoolExecutor(
            settings.effective_decode_threads, thread_name_prefix="decode"
        )
        self._large_decode_pool = ThreadPoolExecutor(
            settings.effective_decode_threads, thread_name_prefix="decode-large"
        )
        # Small files of /cls/batch requests decode on threads of their own, so a burst of
        # them never queues ahead of a /cls request's decode. (Large images share their
        # threads: as many decode at once as memory is sized for.)
        self._bulk_decode_pool = ThreadPoolExecutor(
            settings.effective_decode_threads, thread_name_prefix="decode-bulk"
        )
        self._task_decode_pool = ThreadPoolExecutor(1, thread_name_prefix="task-decode")
        # One thread: batches reach the model one at a time, in order.
        self._inference_pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._lookup_pool = ThreadPoolExecutor(
            CALLBACK_LOOKUP_THREADS, thread_name_prefix="callback-lookup"
        )
        self._pools_shut_down = False  # by ``stop``: a pool's refusal is then no fault
        self._lookups: dict[str, asyncio.Future[None]] = {}  # by host name, while under way

    async def _start_decode_threads(self) -> None:
        """Start every decode thread now. Started on first use, at a limit of memory or of
        threads (``ulimit -v``, ``-u``), a thread that cannot be started would refuse its
        pool's requests (every ``/cls/batch``, every task) for good, while the worker served
        ``/cls`` and looked healthy; a pool's threads, once started, stay.

        Raises:
            ThreadsUnavailable: A thread could not be started.
        """
        decode_threads = self.settings.effective_decode_threads
        for pool, count in (
            (self._decode_pool, decode_threads),
            (self._large_decode_pool, decode_threads),
            (self._bulk_decode_pool, decode_threads),
            (self._task_decode_pool, 1),
        ):
            # Each call holds its thread until all have one: none is reused for the next.
            everyone_started = threading.Barrier(count)
            started = []
            try:
                for _ in range(count):
                    started.append(pool.submit(everyone_started.wait, THREAD_START_WAIT_S))
            except (RuntimeError, MemoryError) as exc:
                everyone_started.abort()
                raise ThreadsUnavailable(
                    f"the worker's decode threads could not be started "
                    f"({exc or type(exc).__name__}); raise the limit on threads or memory "
                    "(ulimit -u, -v, a container's pids.max)"
                ) from None
            await asyncio.gather(*map(asyncio.wrap_future, started))

    async def start(self) -> None:
        """Load and warm up the model off the event loop, then start batching."""
        settings = self.settings
        # The gauge reads 0 from its creation until set: no live worker is that small.
        with contextlib.suppress(OSError):
            metrics.record_resident_memory(memory.resident_bytes())
        # Under uvicorn (gunicorn's master did it before the fork): before the model loads,
        # and before finding the device starts CUDA's threads.
        memory.keep_freed_memory()
        device = resolve_device(settings.device)
        torch.set_num_threads(settings.torch_threads_on(device.type))
        loop = asyncio.get_running_loop()
        if not self.server_started and not (settings.data_dir / DATABASE_NAME).exists():
            # A first start: a DATA_DIR that cannot hold the store is said before the model
            # loads, not after.
            await loop.run_in_executor(None, lambda: TaskStore(settings.data_dir).close())
        classifier = await loop.run_in_executor(
            self._inference_pool,
            lambda: load_classifier(
                weights=settings.weights,
                labels_file=settings.labels_file,
                device=str(device),
                dtype=settings.dtype,
                channels_last=settings.channels_last,
                seed=settings.seed,
            ),
        )
        warm_up_sizes = sorted({1, settings.max_batch_size})
        # The last line before a warm-up that outlasts WORKER_TIMEOUT_S says what was slow.
        logger.info("warming up with batches of %s", " and ".join(map(str, warm_up_sizes)))
        run_times = await loop.run_in_executor(
            self._inference_pool, classifier.warm_up, warm_up_sizes
        )
        logger.info(
            "warm: %s",
            ", ".join(f"a batch of {n} takes {s * 1000:.0f} ms" for n, s in run_times.items()),
        )
        if settings.request_timeout_ms / 1000 < run_times[1]:
            # Valid, but every request would be a 504: a value meant in seconds, say.
            logger.warning(
                "REQUEST_TIMEOUT_MS=%g is shorter than a batch of one takes (%.0f ms): "
                "requests will time out before the model answers them",
                settings.request_timeout_ms,
                run_times[1] * 1000,
            )
        full_batch_s = run_times[settings.max_batch_size]
        if settings.stall_timeout_s < STALL_MARGIN * full_batch_s:
            # Valid, but a batch slowed by load would pass for a stuck model: /healthz would
            # answer 503, and an orchestrator restart a worker that serves.
            logger.warning(
                "STALL_TIMEOUT_S=%g is less than %d times what a full batch takes (%.0f ms): "
                "under load /healthz may answer 503 while the worker serves",
                settings.stall_timeout_s,
                STALL_MARGIN,
                full_batch_s * 1000,
            )
        await self._start_decode_threads()
        self.classifier = classifier
        metrics.record_model(
            "resnet18",
            str(classifier.device),
            classifier.dtype_name,
            classifier.weights_description,
        )
        self.processor = BatchProcessor(
            self._run_batch,
            settings.batch_config(classifier.device.type),
            self._observer,
            prepare=self._count_task_attempts,
            on_failure=self._batching_failed,
        )
        # Without them, the first batches of each size would be expected to take no time:
        # a deadline would be judged met, or a timer waited out, until too late.
        for size, run_s in run_times.items():
            self.processor.record_run_time(size, run_s)
        self.processor.start()
        runner = self._build_task_runner()
        try:
            await runner.start()
        except TaskStoreUnavailable as exc:
            # A store that exists but fails (a full or read-only disk, a damaged file) must
            # not stop this worker, nor, by its exit, the whole server, whose other workers
            # may serve: /cls goes on, and tasks come back once the store opens again. A
            # store that was never made (a first start, a wrong DATA_DIR) stops start-up.
            if not self.server_started and not (settings.data_dir / DATABASE_NAME).exists():
                await runner.stop(grace_s=0)
                raise
            if exc.for_now:
                logger.error("tasks are unavailable until the store opens again: %s", exc)
            else:
                logger.critical(
                    "tasks are unavailable until this is mended (it will not pass by itself): %s",
                    exc,
                )
            self._task_store_problem = str(exc)
            self._waiting_runner = runner
            self._store_reopener = asyncio.create_task(
                self._open_tasks_later(runner), name="reopening the task store"
            )
            self._store_reopener.add_done_callback(_log_failure)
        else:
            self.tasks = runner
        self._memory_reporter = asyncio.create_task(
            memory.report_resident(metrics.record_resident_memory), name="reporting memory"
        )
        self._memory_reporter.add_done_callback(_log_failure)
        trim = memory.malloc_trim()
        if trim is not None:
            await asyncio.to_thread(trim)  # what the warm-up's batches freed
            self._trimmer = asyncio.create_task(
                memory.IdleTrimmer(self._idle_for_trimming, trim).run(),
                name="returning freed memory when idle",
            )
            self._trimmer.add_done_callback(_log_failure)
        if self.failure() is None:
            self.ready = True
        else:
            self._take_no_more_work()  # the batcher died while the task store opened

    def _build_task_runner(self) -> TaskRunner:
        settings = self.settings
        secret = settings.webhook_secret
        sender = WebhookSender(
            WebhookConfig(
                secret=None if secret is None else secret.get_secret_value(),
                max_attempts=settings.webhook_max_attempts,
                timeout_s=settings.webhook_timeout_s,
                backoff_initial_s=settings.webhook_backoff_s,
                backoff_max_s=settings.webhook_backoff_max_s,
                allow_private=settings.webhook_allow_private,
                ca_file=settings.webhook_ca_file,
            )
        )
        config = RunnerConfig(
            data_dir=settings.data_dir,
            # One batch waiting in the background lane while another runs keeps the model
            # busy without hoarding tasks other workers could run; never more than the
            # lane holds (MAX_QUEUE), or the excess would bounce off it.
            capacity=min(2 * settings.max_batch_size, settings.max_queue),
            max_queued=settings.task_max_queued,
            max_attempts=settings.task_max_attempts,
            lease_s=settings.task_lease_s,
            poll_interval_s=settings.task_poll_interval_s,
            cleanup_interval_s=settings.task_cleanup_interval_s,
            ttl_s=settings.task_ttl.total_seconds(),
            # A second store beside the one the other workers hold would split the tasks.
            create_store=not self.server_started,
        )
        return TaskRunner(
            config,
            execute=self.run_task,
            describe_error=lambda error: _task_error(error, settings),
            requeue_on=(Stopped, QueueFull, NotReady),
            # Out of memory (the model's, or the decode's): retried once the worker may
            # have it, or once another worker may have taken the task, should this one be
            # replaced for it.
            retry_later_on=(MemoryError,),
            retry_pause_s=OUT_OF_MEMORY_RETRY_PAUSE_S,
            sender=sender,
            observer=metrics.PrometheusTaskObserver(),
            may_claim=lambda: self.liveness_problem() is None,
        )

    def begin_shutdown(self) -> None:
        """The server has begun to shut down; it waits for open requests before ``stop``.
        From now on /readyz answers 503, no task is claimed, and the drain's time runs.

        Requests still reach the app meanwhile: the server accepted their connections
        before it stopped listening, and the batcher serves them until ``stop``. Refusing
        them would fail requests a proxy has already sent here and will not retry.
        """
        if self._shutdown_began is not None:
            return
        self._shutdown_began = time.monotonic()
        self.draining = True
        if self._store_reopener is not None:
            self._store_reopener.cancel()
        if self.tasks is not None:
            self.tasks.stop_claiming()
            self.tasks.expect_stop(
                grace_ends_at=self._shutdown_began
                + self.settings.drain_timeout_s
                + TASK_STOP_GRACE_S
            )
        if self.processor is not None:
            # The batcher ends the drain on time itself: what it still holds gets the 503 of
            # a stopped batcher, counted as stopped, before the server cancels the requests
            # still open (the worker's timeout_graceful_shutdown, later), which would
            # count them as clients gone.
            self._drain_end = asyncio.get_running_loop().call_later(
                self.settings.drain_timeout_s, self._end_drain
            )

    def _end_drain(self) -> None:
        assert self.processor is not None
        self.ready = False  # what arrives now is refused whole, as after ``stop``
        self._ending_drain = asyncio.ensure_future(self.processor.stop(0))

    async def stop(self) -> None:
        """Stop taking requests, finish the queued ones (bounded), release the threads.

        Tasks still queued in the batcher finish with it; whatever is left goes back to the
        task store for another worker or the next start.
        """
        self.ready = False
        self.draining = True
        for background in (self._trimmer, self._memory_reporter):
            if background is not None:
                background.cancel()
        if self._store_reopener is not None:
            # Once only: cancelled by ``begin_shutdown`` already, it may be closing the
            # stores it opened, which a second cancel would cut short.
            if not self._store_reopener.cancelling():
                self._store_reopener.cancel()
            # Cancelled, or failed (logged as it ended): nothing of it to wait for.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._store_reopener
        if self._waiting_runner is not None:
            await self._waiting_runner.stop(grace_s=0)  # its threads and HTTP client
            self._waiting_runner = None
        tasks = self.tasks
        if tasks is not None:
            tasks.stop_claiming()
        drain_s = self.settings.drain_timeout_s
        if self._shutdown_began is not None:
            # What the server spent waiting for open requests counts against the drain.
            drain_s = max(0.0, drain_s - (time.monotonic() - self._shutdown_began))
        if self._drain_end is not None:
            self._drain_end.cancel()  # what is left of the drain is bounded just below
        if self._ending_drain is not None:
            await self._ending_drain
        try:
            if self.processor is not None:
                await self.processor.stop(drain_s)
        finally:
            # Only now: the tasks that the drain runs count their attempts too.
            self.tasks = None  # stopping twice is harmless
            try:
                if tasks is not None:
                    await tasks.stop(grace_s=TASK_STOP_GRACE_S)
            finally:
                self._pools_shut_down = True
                for pool in (
                    self._decode_pool,
                    self._large_decode_pool,
                    self._bulk_decode_pool,
                    self._task_decode_pool,
                    self._inference_pool,
                    self._lookup_pool,
                ):
                    pool.shutdown(wait=False, cancel_futures=True)

    async def classify(
        self,
        upload: UploadFile,
        top_k: int,
        deadline: float,
        priority: Priority = Priority.INTERACTIVE,
    ) -> list[Prediction]:
        """Validate, decode and classify one upload, raising a domain error on failure."""
        self.refuse_unless_classifying()
        assert self.processor is not None
        processor = self.processor
        # Refuse at once when the queue is full rather than spend a decode on the request.
        if (full := self._queue_full()) is not None:
            # Counted like the batcher's own refusals, so the metric sees every one.
            self._observer.item_finished(Outcome.REJECTED)
            raise QueueFull(full)
        self._check_size(upload)
        model_idle = self._idle_for() > 0
        self._decodes_in_progress += 1
        try:
            # A decompression-heavy image must not outlive its deadline either; its thread
            # finishes the decode, but nobody waits for it.
            async with asyncio.timeout(deadline - time.monotonic()):
                pixels = await self._decode(upload, model_idle, priority)
        except TimeoutError:
            self._observer.item_finished(Outcome.EXPIRED)
            raise DeadlineExceeded("the deadline passed while the image decoded") from None
        except asyncio.CancelledError:
            # The client left, or the drain's time is up (the batcher has stopped, and the
            # server cancels what is still open): counted as the queue counts it.
            stopped = not processor.accepting
            self._observer.item_finished(Outcome.STOPPED if stopped else Outcome.CANCELLED)
            raise
        finally:
            self._decodes_in_progress -= 1
        try:
            result = await processor.submit(
                ClassifyJob(pixels, top_k), deadline=deadline, priority=priority
            )
        except Stopped:
            if self.failure() is not None:
                raise self._not_ready() from None  # the failure's 503, not the shutdown's
            raise
        except DeadlineExceeded as exc:
            if exc.batch_size is not None:  # it passed while the model ran the request
                logs.record_batch_size(exc.batch_size)
            raise
        logs.record_batch_size(result.batch_size)
        return result.predictions

    async def _decode(self, upload: UploadFile, model_idle: bool, priority: Priority) -> np.ndarray:
        # The upload is read on the thread that decodes it: until then its bytes stay in
        # the request's spooled file (on disk past 1 MiB), so the requests waiting for a
        # decode thread do not each hold a copy in memory.
        max_pixels = self.settings.max_image_pixels
        limit_bytes = self.settings.max_upload_bytes
        reduced_jpeg = self.settings.reduced_jpeg_decode
        small = upload.size is not None and upload.size <= SMALL_UPLOAD_MAX_BYTES
        if model_idle:
            # Have the model's threads running by the time this image is decoded, and decode
            # a small image on the model's own thread, which then finds the pixels in its
            # core's cache and needs no hand-off from another thread.
            assert self.classifier is not None
            self._inference_pool.submit(self.classifier.wake_threads)
        if small:
            # Small images have threads apart from large ones, which take up to a second
            # each: a small image never waits behind them.
            if priority is not Priority.INTERACTIVE:
                pool = self._bulk_decode_pool  # a /cls request's never waits behind these
            elif model_idle:
                pool = self._inference_pool
            else:
                pool = self._decode_pool
            pixels = await self._in_thread(
                pool, _preprocess_if_small, upload.file, max_pixels, reduced_jpeg
            )
            if pixels is not None:
                return pixels
        _, pixels = await self._in_thread(
            self._large_decode_pool,
            _read_and_preprocess,
            upload.file,
            limit_bytes,
            max_pixels,
            reduced_jpeg,
        )
        return pixels

    async def _in_thread(
        self, pool: ThreadPoolExecutor, work: Callable[..., T], *args: object
    ) -> T:
        """``work(*args)`` on ``pool``, in the caller's context, so what it logs (Pillow's
        warnings) carries the request's id.

        The work is in progress until its thread is done with it, even once nobody waits
        for it: the memory trimmer must not run beside it, and the model is not idle
        meanwhile.
        """
        loop = asyncio.get_running_loop()
        future = self._submit(pool, work, *args)
        self._threads_working += 1
        future.add_done_callback(partial(_call_soon, loop, self._thread_done))
        try:
            return await asyncio.wrap_future(future, loop=loop)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the caller is cancelled (a timeout, the client gone)
            # ``stop`` dropped the work while it waited for a thread.
            raise self._not_ready() from None

    def _submit(self, pool: ThreadPoolExecutor, work: Callable[..., T], *args: object) -> Future[T]:
        """``work(*args)`` submitted to ``pool``, to run in the caller's context.

        Raises:
            NotReady: ``stop`` has shut the pool down, or the pool had to start a thread
                and could not: the worker is at its limit of threads (ulimit -u, a
                container's pids.max) or of memory, which may pass.
        """
        context = contextvars.copy_context()
        refused = threading.Event()

        def run() -> T:
            if refused.is_set():
                # A pool queues the work before it starts a thread: the next thread it
                # starts would otherwise decode for nobody, ahead of the next request.
                raise RuntimeError("its submission was refused")
            return context.run(work, *args)

        try:
            return pool.submit(run)
        except (RuntimeError, MemoryError) as exc:
            refused.set()
            if self._pools_shut_down:
                raise self._not_ready() from None
            logger.error(
                "a thread could not be started (at a limit of the worker's threads, such as "
                "ulimit -u or a container's pids.max, or of its memory): %s",
                exc,
            )
            raise NotReady("the server could not start a thread for now; retry") from None

    def _thread_done(self) -> None:
        self._threads_working -= 1

    async def submit_task(
        self,
        upload: UploadFile,
        tasks: TaskRunner,
        *,
        top_k: int,
        metadata: dict[str, object] | None,
        callback_url: str | None,
        idempotency_key: str | None,
    ) -> tuple[TaskRecord, bool]:
        """Store the upload as a task once its image decodes as one the model accepts; as
        ``TaskRunner.submit``, the task and whether it is new.

        Refuses before decoding when ``MAX_QUEUE`` submissions are already being decoded or
        stored in this worker, or when the task queue is full: each one holds
        its upload (spooled, on disk past 1 MiB) while it waits for the tasks' decode
        thread, and its bytes in memory from its decode until it is stored. The
        ``callback_url``'s host is looked up after those checks, since a lookup may take
        up to ``WEBHOOK_TIMEOUT_S``, and not for a resend (see ``TaskRunner.check_room``).
        """
        self.refuse_unless_ready()
        if self._submissions_in_progress >= self.settings.max_queue:
            raise QueueFull(self._submissions_full())
        self._check_size(upload)
        self._submissions_in_progress += 1
        try:
            resent = await tasks.check_room(idempotency_key)
            # A resend is answered with its stored task, whose URL was looked up as it was
            # stored: a host that no longer resolves must not turn the replay into an error.
            # Its form is checked still: should the task expire meanwhile, the resend is
            # stored as a new one.
            if callback_url is not None:
                await self.check_callback_url(callback_url, look_up=not resent)
            # On the tasks' own decode thread: a burst of submissions must not queue ahead
            # of /cls decodes.
            data, _ = await self._in_thread(
                self._task_decode_pool,
                _read_and_preprocess,
                upload.file,
                self.settings.max_upload_bytes,
                self.settings.max_image_pixels,
                self.settings.reduced_jpeg_decode,
            )
            return await tasks.submit(
                data,
                top_k=top_k,
                metadata=metadata,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
            )
        finally:
            self._submissions_in_progress -= 1

    def _submissions_full(self) -> str:
        return (
            f"{self._submissions_in_progress} task submissions are being decoded or stored; "
            f"MAX_QUEUE allows {self.settings.max_queue}"
        )

    async def run_task(self, task: ClaimedTask) -> object:
        """Classify a stored task's image in the batcher's background lane: alone, if its
        worker died while the model ran it, so that a task that takes its worker down
        charges no attempt to the tasks beside it."""
        if self.processor is None:
            raise self._not_ready()
        try:
            pixels = await self._in_thread(
                self._task_decode_pool,
                _preprocess,
                task.image,
                self.settings.max_image_pixels,
                self.settings.reduced_jpeg_decode,
            )
        except MemoryError:
            # Retried later, as when the model has no memory for it; charged an attempt,
            # so that an image this worker can never decode fails in the end.
            if self.tasks is not None:
                await self.tasks.count_attempts([task.id], wait_s=ATTEMPT_RECORD_WAIT_S)
            raise
        try:
            result = await self.processor.submit(
                ClassifyJob(pixels, task.top_k, task.id),
                priority=Priority.BACKGROUND,
                alone=task.interrupted,
            )
        finally:
            self._tasks_in_model.discard(task.id)
        return [p.model_dump() for p in _prediction_out(result.predictions)]

    async def check_callback_url(self, url: str, *, look_up: bool = True) -> None:
        """Refuse a callback URL the webhooks could not or may not reach; without
        ``look_up``, one whose form alone says so.

        Raises:
            InvalidCallbackUrl: The URL is malformed or, unless allowed, private.
            CallbackLookupFailed: DNS did not answer, or not within ``WEBHOOK_TIMEOUT_S``.
        """
        allow_private = self.settings.webhook_allow_private
        # Its form, and an address written in it, here: nothing to look up, no thread.
        check_callback_url(url, allow_private=allow_private, look_up=False)
        if not look_up or (host := host_to_look_up(url)) is None:
            return
        limit_s = self.settings.webhook_timeout_s
        lookup = self._lookups.get(host)
        if lookup is None:
            if len(self._lookups) >= CALLBACK_LOOKUP_THREADS:
                # Every lookup thread is held (by names whose DNS never answers, say): the
                # URL is taken on its form, as a resent submission's is, not kept waiting or
                # refused. Each delivery checks the addresses it connects to.
                return
            # On threads of their own: a resolver that hangs must not take the default
            # executor's threads from everything else that uses them. One lookup of a host
            # at a time, which every submission naming it meanwhile awaits: a name whose DNS
            # never answers, sent again and again, holds one thread, not all of them. Not
            # work in progress, as _in_thread's is: a hung one must not hold off the memory
            # trimmer.
            work = self._submit(
                self._lookup_pool,
                partial(check_callback_url, url, allow_private=allow_private),
            )
            lookup = asyncio.wrap_future(work)
            self._lookups[host] = lookup
            lookup.add_done_callback(partial(self._lookup_done, host))
        try:
            async with asyncio.timeout(limit_s):
                await asyncio.shield(lookup)
        except TimeoutError:
            raise CallbackLookupFailed(
                f"callback_url host could not be looked up within {limit_s:g} s "
                "(WEBHOOK_TIMEOUT_S); retry shortly"
            ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the caller is cancelled (the client gone)
            raise self._not_ready() from None  # ``stop`` dropped the lookup

    def _lookup_done(self, host: str, lookup: asyncio.Future[None]) -> None:
        del self._lookups[host]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: its waiters may all have given up on it

    def task_runner(self) -> TaskRunner:
        """The task runner, once its store is open; the 503 that says why until then."""
        if self.tasks is None:
            if self._store_reopener is not None:
                raise TaskStoreFailed(
                    f"tasks are unavailable until the task store opens: {self._task_store_problem}"
                )
            raise self._not_ready()  # before start or after stop
        return self.tasks

    async def _open_tasks_later(self, runner: TaskRunner) -> None:
        while True:
            await asyncio.sleep(TASK_STORE_RETRY_S)
            try:
                await runner.start()
            except TaskStoreUnavailable as exc:
                self._task_store_problem = str(exc)
                continue
            break
        self.tasks = runner
        self._waiting_runner = None
        self._store_reopener = None
        logger.info("the task store opened again; tasks are served")

    def _queue_full(self) -> str | None:
        """Why an image would be refused for a full queue now; None while there is room.
        /cls and /cls/batch share MAX_QUEUE, whichever lane they wait in."""
        processor = self.processor
        assert processor is not None
        admitted = (
            processor.waiting(Priority.INTERACTIVE)
            + processor.waiting(Priority.BULK)
            + self._decodes_in_progress
        )
        if admitted >= processor.config.max_queue:
            return f"the queue is full; MAX_QUEUE allows {processor.config.max_queue}"
        return None

    def refusal_before_upload(self, path: str) -> str | None:
        """Why an upload to ``path`` would be refused for a full queue now, before its body
        is read; None to read it. A /cls refused so counts as the batcher's refusals do; a
        /cls/batch, whose files are not known yet, counts only as the HTTP 503 it is."""
        if not self.ready or self.processor is None:
            return None  # the route answers that, with its own reason
        if path in (CLASSIFY_ROUTE, CLASSIFY_BATCH_ROUTE):
            full = self._queue_full()
            if full is not None and path == CLASSIFY_ROUTE:
                self._observer.item_finished(Outcome.REJECTED)
            return full
        if path == TASKS_ROUTE and self._submissions_in_progress >= self.settings.max_queue:
            return self._submissions_full()
        return None

    def liveness_problem(self) -> str | None:
        """Why this worker cannot serve until it is restarted ("device failed", "out of
        memory", "batching stopped", or "stalled": a batch has run longer than
        ``STALL_TIMEOUT_S``); None while it can."""
        processor = self.processor
        if processor is None:
            return None
        if self.model_failure is not None:
            return self.model_failure.status
        if processor.failure is not None:
            return "batching stopped"
        if processor.oldest_batch_age_s() > self.settings.stall_timeout_s:
            return "stalled"
        return None

    def refuse_unless_ready(self) -> None:
        """Raise ``NotReady`` (503) saying why, unless the model is warm and the worker
        serves."""
        if not self.ready:
            raise self._not_ready()

    def refuse_unless_classifying(self) -> None:
        """As ``refuse_unless_ready``, and while a batch is stuck: under gunicorn /readyz
        cannot steer requests away from this one worker, and they would only wait behind
        it for their deadline. (A task submission is stored, not batched, and is taken.)"""
        if not self.ready or self.liveness_problem() == "stalled":
            raise self._not_ready()

    def failure(self) -> str | None:
        """What failed so that this worker can classify nothing more until it is restarted;
        None while nothing has."""
        if self.model_failure is not None:
            return self.model_failure.summary
        if self.processor is not None and self.processor.failure is not None:
            return "the batch processor stopped"
        return None

    def _not_ready(self) -> NotReady:
        if self.draining:
            return NotReady(SHUTTING_DOWN)
        if (failure := self.failure()) is not None:
            return NotReady(f"{failure}; retry (this worker is to be restarted)")
        if self.liveness_problem() == "stalled":
            return NotReady(
                "a batch has run longer than STALL_TIMEOUT_S "
                f"({self.settings.stall_timeout_s:g} s); retry (this worker is to be restarted "
                "unless it finishes)"
            )
        return NotReady("the model is not ready")

    def _check_size(self, upload: UploadFile) -> None:
        """Refuse an upload over MAX_UPLOAD_BYTES before it waits for a decode thread."""
        if upload.size is not None and upload.size > self.settings.max_upload_bytes:
            raise _too_large(upload.size, self.settings.max_upload_bytes)

    def top_k(self, requested: int | None) -> int:
        """How many classes to return: as requested, at most the model's class count;
        DEFAULT_TOP_K (or every class of a model with fewer) when not asked."""
        if self.classifier is None:
            raise self._not_ready()
        classes = self.classifier.num_classes
        if requested is None:
            return min(DEFAULT_TOP_K, classes)
        if requested > classes:
            msg = f"must be at most {classes}, the model's class count; got {requested}"
            raise RequestValidationError([{"loc": ("query", "top_k"), "msg": msg}])
        return requested

    async def _count_task_attempts(self, jobs: list[ClassifyJob]) -> None:
        """Record that the tasks among ``jobs`` enter the model, before they do, so that
        one that kills its worker there is charged for it."""
        if self.model_failure is not None:
            return  # the batch will not run (``_run_batch``): its tasks have no attempt
        # Once per run of a task: a failed batch's halves come back here.
        task_ids = [
            job.task_id
            for job in jobs
            if job.task_id is not None and job.task_id not in self._tasks_in_model
        ]
        if task_ids and self.tasks is not None:
            self._tasks_in_model.update(task_ids)
            try:  # a store failure is logged there, whoever still waits for it
                await self.tasks.count_attempts(task_ids, wait_s=ATTEMPT_RECORD_WAIT_S)
            except Exception:
                logger.exception("counting the attempts of tasks %s failed", task_ids)

    async def _run_batch(self, jobs: list[ClassifyJob]) -> list[ClassifyResult | BatchFailed]:
        assert self.classifier is not None
        if self.model_failure is not None:
            raise Stopped(self.model_failure.reason)  # the batcher is stopping; nothing runs
        try:
            predictions = await asyncio.get_running_loop().run_in_executor(
                self._inference_pool,
                self.classifier.classify,
                [job.pixels for job in jobs],
                [job.top_k for job in jobs],
            )
        except DeviceFailed as exc:
            # torch's CUDA errors go on with lines of debugging hints.
            # The first line, or the error's name: another model package's may be empty.
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._model_failed(ModelFailure("device failed", "the model's device failed", reason))
            # Fails the batch whole, unsplit: no request in it is at fault.
            raise Stopped(str(exc)) from exc
        except OutOfMemory as exc:
            metrics.MODEL_OUT_OF_MEMORY.inc()
            if len(jobs) == 1:
                self._ran_out_of_memory_alone(exc)
            raise  # a larger batch is split (its halves may fit); a lone image's caller retries
        finally:
            self._last_batch_end = time.monotonic()
        self._lone_memory_failures = 0
        # JSON has no number for NaN or infinity, and such a score ranks nothing: those
        # images fail alone, and the others of the batch are answered.
        results: list[ClassifyResult | BatchFailed] = [
            ClassifyResult(each, len(jobs))
            if all(math.isfinite(p.score) for p in each)
            else BatchFailed("inference failed")
            for each in predictions
        ]
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BatchFailed):
                with logs.request_id_bound(job.request_id):
                    logger.error(
                        "the model scored the image with NaN or infinity (in a batch of %d); "
                        "it fails",
                        len(jobs),
                    )
        return results

    def _ran_out_of_memory_alone(self, error: OutOfMemory) -> None:
        """Count a lone image the model had no memory for; replace the worker once that
        has gone on, with no batch run between, for too many images and long enough."""
        now = time.monotonic()
        if self._lone_memory_failures == 0:
            self._memory_failing_since = now
        self._lone_memory_failures += 1
        failing_for_s = now - self._memory_failing_since
        if (
            self._lone_memory_failures >= OUT_OF_MEMORY_LONE_FAILURES
            and failing_for_s >= OUT_OF_MEMORY_PERSISTS_S
        ):
            reason = (
                f"{error} (the model has run out of memory on {self._lone_memory_failures} "
                f"images in a row, each alone, for {failing_for_s:.1f} s)"
            )
            self._model_failed(
                ModelFailure("out of memory", "the model runs out of memory", reason)
            )

    def _model_failed(self, failure: ModelFailure) -> None:
        """Take no more work: every batch would fail. Requests queued or arriving get a 503
        to retry elsewhere, tasks go back to the store, and liveness fails, so the worker is
        replaced."""
        if self.model_failure is not None:
            return
        self.model_failure = failure
        logger.critical("%s; this worker takes no more work until it is restarted", failure.reason)
        self._take_no_more_work()
        if self._ending_drain is None:
            self._end_drain()

    def _batching_failed(self, error: BaseException) -> None:
        """The batcher has stopped for good (it logged why, and refused what it held)."""
        self._take_no_more_work()

    def _take_no_more_work(self) -> None:
        """Nothing can be classified until the worker is restarted: refuse requests before
        their upload is decoded, and claim no more tasks."""
        self.ready = False
        for runner in (self.tasks, self._waiting_runner):
            if runner is not None:
                runner.stop_claiming()

    def _idle_for(self) -> float:
        """Seconds since the model last ran, or 0 while images decode (those of requests
        that stopped waiting included) or requests wait or run in the batcher."""
        processor = self.processor
        if (
            processor is None
            or self._decodes_in_progress
            or self._threads_working
            or processor.queue_depth
            or processor.in_flight
        ):
            return 0.0
        return time.monotonic() - self._last_batch_end

    def _idle_for_trimming(self) -> float:
        """As ``_idle_for``, and 0 while requests' bodies arrive or are held: a trim beside
        them would take the heap's size with them for its resting size, and never return
        what they free once they end."""
        return 0.0 if self._uploads.held_bytes else self._idle_for()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s stopped", task.get_name(), exc_info=task.exception())


def _preprocess(data: bytes, max_pixels: int, reduced_jpeg: bool) -> np.ndarray:
    return preprocess(data, max_pixels=max_pixels, reduced_jpeg=reduced_jpeg)


def _read_and_preprocess(
    file: BinaryIO, limit_bytes: int, max_pixels: int, reduced_jpeg: bool
) -> tuple[bytes, np.ndarray]:
    """An upload's bytes, read from its spooled file, and its model input."""
    # Its size first: read(limit + 1) would set aside the whole limit in memory up front.
    size = file.seek(0, io.SEEK_END)
    if size > limit_bytes:
        raise _too_large(size, limit_bytes)
    file.seek(0)
    data = file.read(size)
    return data, _preprocess(data, max_pixels, reduced_jpeg)


def _preprocess_if_small(file: BinaryIO, max_pixels: int, reduced_jpeg: bool) -> np.ndarray | None:
    """The model input of a small upload, or None when the upload is over
    SMALL_UPLOAD_MAX_BYTES or the image has more than SMALL_IMAGE_MAX_PIXELS."""
    file.seek(0)
    data = file.read(SMALL_UPLOAD_MAX_BYTES + 1)
    if len(data) > SMALL_UPLOAD_MAX_BYTES:
        return None
    if max_pixels <= SMALL_IMAGE_MAX_PIXELS:
        return _preprocess(data, max_pixels, reduced_jpeg)
    try:
        return _preprocess(data, SMALL_IMAGE_MAX_PIXELS, reduced_jpeg)
    except ImageTooLarge as exc:
        # Another model package's ImageTooLarge may not say how many pixels it needs: then
        # the decode threads for large images decode it, and refuse it if it is too large.
        # (classification's says infinity where no pixel limit would let the image pass.)
        if getattr(exc, "pixels_needed", 0) > max_pixels:
            # Refused whatever thread decodes it: refused now, from its header, with the
            # message for MAX_IMAGE_PIXELS, not after large images' decodes at its deadline.
            return _preprocess(data, max_pixels, reduced_jpeg)
        return None


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None], _: object) -> None:
    # From a pool's thread; the loop may have closed meanwhile, at shutdown.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def _too_large(size: int, limit_bytes: int) -> UploadTooLarge:
    return UploadTooLarge(f"upload is {size} bytes; MAX_UPLOAD_BYTES allows {limit_bytes}")


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def _one_file_named_file(request: Request) -> None:
    """Refuse a form with several ``file`` entries (an image and a plain field, say): FastAPI
    binds the last one, so by their order it would serve the image, refuse the field, or
    take an empty entry for no file at all. Refuse a second image under another name, and
    name a file sent under another name (``image``, ``upload``) where ``file`` is missing.
    An empty file part under another name (a browser form's file input left empty) is no
    image, and is ignored. Runs before the form's fields are validated."""
    form = await request.form()  # parsed already, with the route's limits, and kept
    if request.url.path == TASKS_ROUTE and any(
        name in ("metadata", "callback_url") and isinstance(part, StarletteUploadFile)
        for name, part in form.multi_items()
    ):  # even empty: the advice to send them as plain fields is the answer
        raise StarletteHTTPException(400, _takes_one_file(request.url.path))
    entries = form.getlist("file")
    images_elsewhere = _images_not_named_file(form)
    images_named_file = sum(
        isinstance(entry, StarletteUploadFile) and bool(entry.size) for entry in entries
    )
    if images_named_file > 1 or (images_named_file and images_elsewhere):
        raise StarletteHTTPException(400, _takes_one_file(request.url.path))
    if len(entries) > 1:
        several = (
            f"to {CLASSIFY_BATCH_ROUTE}" if request.url.path == CLASSIFY_ROUTE else "as a task each"
        )
        message = (
            f"was sent {len(entries)} times; send one image, as one file part (several {several})"
        )
        raise RequestValidationError([{"loc": ("body", "file"), "msg": message}])
    if images_elsewhere:  # and no image named "file"
        message = "a file under another name than 'file'; send the image as a part named 'file'"
        name = logs.shortened(images_elsewhere[0], 64)
        raise RequestValidationError([{"loc": ("body", name), "msg": message}])


def _images_not_named_file(form: FormData) -> list[str]:
    """The names of the form's non-empty file parts not named ``file`` (an empty one is a
    browser form's file input left empty, no image)."""
    return [
        name
        for name, part in form.multi_items()
        if name != "file" and isinstance(part, StarletteUploadFile) and part.size
    ]


def _takes_one_file(path: str) -> str:
    """What /cls and /tasks say to a form of several images."""
    if path == TASKS_ROUTE:
        return (
            f"{TASKS_ROUTE} takes one file, the `file` part (submit a task for each image); "
            "send `metadata` and `callback_url` as plain fields, not files "
            "(curl -F 'metadata=<m.json', not -F metadata=@m.json)"
        )
    return f"{path} takes one file; send several to {CLASSIFY_BATCH_ROUTE}"


def _top_k(request: Request, requested: int | None) -> int:
    """The route's ``top_k``, as ``Service.top_k``, and sent at most once: FastAPI takes the
    last of repeated values, which would answer another question than the one asked."""
    if (sent := len(request.query_params.getlist("top_k"))) > 1:
        raise RequestValidationError(
            [{"loc": ("query", "top_k"), "msg": f"was sent {sent} times; send it at most once"}]
        )
    written = request.query_params.get("top_k")
    if written is not None and not (written.isascii() and written.isdigit()):
        # Python's int() reads "+3", " 3" and "1_0" too: a typo then answers another count.
        message = f"must be a whole number in digits only; got {written[:20]!r}"
        raise RequestValidationError([{"loc": ("query", "top_k"), "msg": message}])
    for name in request.query_params:
        # TOP_K, top-k, and top_k[] as clients that send arrays spell it.
        if name != "top_k" and "".join(filter(str.isalnum, name.lower())) == "topk":
            # Ignored, it would answer with the default number of classes without a word.
            message = "is not a parameter of this route; did you mean top_k?"
            raise RequestValidationError(
                [{"loc": ("query", logs.shortened(name, 64)), "msg": message}]
            )
    return _service(request).top_k(requested)


def _deadline(request: Request, service: Service) -> float:
    """REQUEST_TIMEOUT_MS from the end of the upload: from when its last byte arrived,
    where the HTTP protocol says (not in a test's in-process transport), not from when the
    handler got to it, which a busy event loop delays."""
    ended_at = request.scope.get("state", {}).get(UPLOAD_END_STATE, time.monotonic())
    return float(ended_at) + service.settings.request_timeout_ms / 1000


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first.

    The body has been read by now, so the next ASGI message is the disconnect (or nothing,
    until the response is sent). Cancelling drops the request from the queue before its
    batch forms, so no model time is spent on an answer nobody will read.
    """
    task = asyncio.ensure_future(work)

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected(
                "the client disconnected before the answer was ready"
            ) from None
        raise
    finally:
        watcher.cancel()


def _prediction_out(predictions: list[Prediction]) -> list[PredictionOut]:
    return [PredictionOut(index=p.index, label=p.label, score=p.score) for p in predictions]


ImageFile = Annotated[UploadFile, File(description="The image: JPEG, PNG, GIF, WebP, BMP or TIFF")]
TopK = Annotated[
    int | None,
    Query(
        ge=1,
        description=f"How many classes to return, at most the model's class count "
        f"(default {DEFAULT_TOP_K})",
    ),
]


# The form fields of POST /tasks.
TASK_FORM_FIELDS = ("file", "callback_url", "metadata")


def _refuse_what_the_form_would_ignore(form: FormData) -> None:
    """``top_k`` sent as a form field would be ignored, and the caller get the default
    number of classes without a word; a file part's Content-Transfer-Encoding (base64, say)
    is not undone (RFC 7578 drops it), and its image would be read as corrupt."""
    if "top_k" in form:
        message = "sent in the form, where it is not read; send it in the URL (?top_k=3)"
        raise RequestValidationError([{"loc": ("body", "top_k"), "msg": message}])
    for name, part in form.multi_items():
        if not isinstance(part, StarletteUploadFile) or not part.size:  # empty: ignored
            continue
        encoding = part.headers.get("content-transfer-encoding", "binary").strip().lower()
        if encoding not in ("binary", "8bit", "7bit"):
            raise StarletteHTTPException(
                400,
                f"the part '{logs.shortened(name, 64)}' is sent with Content-Transfer-Encoding "
                f"{logs.shortened(encoding, 32)}, which is not decoded: send the file's bytes as "
                "they are, with no such header (RFC 7578)",
            )


async def classify(
    request: Request,
    file: ImageFile,
    top_k: TopK = None,
) -> ClassifyResponse:
    """Classify one image; the top ``top_k`` ImageNet classes, best first."""
    service = _service(request)
    top_k = _top_k(request, top_k)
    _refuse_what_the_form_would_ignore(await request.form())
    predictions = await _unless_disconnected(
        request, service.classify(file, top_k, _deadline(request, service))
    )
    return ClassifyResponse(prediction=_prediction_out(predictions))


async def classify_batch(
    request: Request,
    response: Response,
    # Optional for FastAPI, which drops the parts with an empty name and body (a browser's
    # file input with no file chosen) and would call a form of only those a form without
    # files; each part gets its entry, at its own index, from the form itself.
    file: Annotated[
        list[UploadFile] | None, File(description="One or more images, as repeated parts")
    ] = None,
    top_k: TopK = None,
) -> BatchResponse:
    """Classify several images; one entry per file, in order, each with its own status."""
    service = _service(request)
    top_k = _top_k(request, top_k)
    deadline = _deadline(request, service)
    form = await request.form()  # parsed already, for ``file``
    _refuse_what_the_form_would_ignore(form)
    # Any would be left out of the answer, and the caller miss an image it sent.
    if stray := _images_not_named_file(form):
        message = "a file under another name than 'file'; send each image as a part named 'file'"
        raise RequestValidationError(
            [{"loc": ("body", logs.shortened(stray[0], 64)), "msg": message}]
        )
    uploads = [part for part in form.getlist("file") if isinstance(part, StarletteUploadFile)]
    if not uploads:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body", "file"), "msg": "Field required", "input": None}]
        )
    # Refused whole, as /cls is: a 200 of refused entries would look like success.
    service.refuse_unless_classifying()
    outcomes = await _unless_disconnected(
        request,
        asyncio.gather(
            # Behind single images: one client's 32 files must not hold up everyone's /cls.
            *(service.classify(upload, top_k, deadline, Priority.BULK) for upload in uploads),
            return_exceptions=True,
        ),
    )
    # Nothing of it was taken in (the queue was full, the batcher stopped as the drain's
    # time ran out, or the device or the batcher failed, which NotReady says), or nothing
    # found memory: refused whole, as /cls is, so a client or proxy that reads only the
    # status retries it.
    if all(isinstance(outcome, Stopped | NotReady) for outcome in outcomes):
        raise next((o for o in outcomes if isinstance(o, NotReady)), NotReady(SHUTTING_DOWN))
    if all(isinstance(o, QueueFull | Stopped | NotReady | MemoryError) for o in outcomes):
        # A full queue says when to retry, a worker that failed where to (elsewhere).
        for kind in (QueueFull, NotReady, MemoryError):
            refusal = next((o for o in outcomes if isinstance(o, kind)), None)
            if refusal is not None:
                raise refusal
    results = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            status, detail = _status_and_detail(outcome, service.settings)
            results.append(BatchEntry(index=index, status=status, detail=detail))
        else:
            results.append(BatchEntry(index=index, status=200, prediction=_prediction_out(outcome)))
    if any(entry.status == 503 for entry in results):
        # The answer is 200 as a whole; a client retrying its refused entries needs the wait.
        response.headers["Retry-After"] = RETRY_AFTER_S
    return BatchResponse(results=results)


async def submit_task(
    request: Request,
    file: ImageFile,
    callback_url: Annotated[
        str | None,
        Form(description="http(s) URL to POST the result to when the task finishes"),
    ] = None,
    metadata: Annotated[
        str | None,
        Form(description="A JSON object, returned with the result and in the webhook"),
    ] = None,
    top_k: TopK = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="1 to 255 visible ASCII characters, unique per request (a UUID): "
            "resending a request with the same key returns the task it created instead of "
            "creating another",
            json_schema_extra=IDEMPOTENCY_KEY_SCHEMA,
        ),
    ] = None,
) -> JSONResponse:
    """Queue an image for classification; answers at once with the task's id.

    The image is validated first: a bad one gets its 4xx now, not a failed task later.
    """
    service = _service(request)
    settings = service.settings
    top_k = _top_k(request, top_k)
    tasks = service.task_runner()
    service.refuse_unless_ready()
    # The form is parsed already (and kept by the request); FastAPI takes the last of
    # repeated fields, which would drop the others silently.
    form = await request.form()
    _refuse_what_the_form_would_ignore(form)
    # A misspelt callback_url or metadata would be dropped unseen: no webhook would come.
    # An empty file part (a form's file input left empty) holds nothing to drop.
    if unknown := [
        name
        for name, value in form.multi_items()
        if name not in TASK_FORM_FIELDS
        and not (isinstance(value, StarletteUploadFile) and not value.size)
    ]:
        raise InvalidTaskField(
            f"unknown form field {logs.shortened(unknown[0], 64)!r}; "
            f"a task takes {', '.join(TASK_FORM_FIELDS)}"
        )
    for name in ("callback_url", "metadata"):
        if (sent := len(form.getlist(name))) > 1:
            raise InvalidTaskField(f"{name} was sent {sent} times; send it at most once")
    parsed_metadata = parse_metadata(metadata, settings.task_metadata_max_bytes)
    if callback_url is not None:
        callback_url = callback_url.strip() or None
    # Not the parameter, which documents the header: FastAPI takes one of several sent.
    idempotency_key = idempotency_key_in(request.headers.getlist("idempotency-key"))
    record, created = await service.submit_task(
        file,
        tasks,
        top_k=top_k,
        metadata=parsed_metadata,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
    )
    status_url = str(request.url_for("task_status", task_id=record.id))
    accepted = TaskAccepted(task_id=record.id, status=record.status, status_url=status_url)
    headers = {"Location": status_url}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers=headers)


async def task_status(request: Request, task_id: str) -> JSONResponse:
    """A task's state, and its prediction or error once it has finished."""
    task_id = valid_task_id(task_id)
    record = await _service(request).task_runner().get(task_id)
    if record is None:
        raise TaskNotFound(f"no task {task_id}")
    return task_response(record)


async def cancel_task(request: Request, task_id: str) -> JSONResponse:
    """Cancel a task that has not started; 409 once it is running or finished."""
    task_id = valid_task_id(task_id)
    record = await _service(request).task_runner().cancel(task_id)
    if record is None:
        raise TaskNotFound(f"no task {task_id}")
    return task_response(record)


async def healthz(request: Request) -> JSONResponse:
    """Liveness: the process serves HTTP, batches, its device has not failed, and the model is
    not stuck on a batch."""
    problem = _service(request).liveness_problem()
    if problem is not None:
        detail = f"the worker cannot serve: {problem}"
        return JSONResponse({"status": problem, "detail": detail}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Readiness: the model is loaded and warm, is not stalled, and the server is not
    draining."""
    service = _service(request)
    stalled = service.liveness_problem() == "stalled"
    if service.ready and not service.draining and not stalled:
        return JSONResponse({"status": "ready"})
    if service.draining:
        detail = "the server is shutting down"
    elif service.model_failure is not None:
        detail = f"{service.model_failure.summary}: {service.model_failure.reason}"
    elif (failure := service.failure()) is not None:
        detail = failure
    elif stalled:
        # New requests could only wait behind the stuck batch into their 504s.
        detail = (
            f"a batch has run for more than STALL_TIMEOUT_S={service.settings.stall_timeout_s:g} s"
        )
    else:
        detail = "the model is loading"
    return JSONResponse(
        {"status": "not ready", "detail": detail},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER_S},
    )


async def prometheus_metrics() -> Response:
    """Prometheus exposition, merged across gunicorn workers."""
    # Off the event loop: merging reads every worker's files, dead workers' counters
    # included, which after many restarts takes a good part of a second.
    body, content_type = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=content_type)


# Domain errors and the status codes they map to; the single place where that is decided.
_ERROR_STATUS: dict[type[Exception], int] = {
    InvalidImage: 400,
    ImageTooLarge: 400,
    TaskNotFound: 404,
    TaskNotCancellable: 409,
    UploadTooLarge: 413,
    InvalidTaskField: 422,
    InvalidCallbackUrl: 422,
    IdempotencyKeyReused: 422,
    QueueFull: 503,
    TaskQueueFull: 503,
    TaskStoreBusy: 503,
    TaskStoreFailed: 503,
    CallbackLookupFailed: 503,
    NotReady: 503,
    Stopped: 503,
    RunnerStopped: 503,
    # At the worker's memory limit (a container's, ulimit -v): it may pass.
    MemoryError: 503,
    DeadlineExceeded: 504,
    BatchFailed: 500,
    # nginx's convention for "client closed request"; only metrics and logs see it.
    ClientDisconnected: 499,
}
_PUBLIC_DETAIL: dict[type[Exception], str] = {
    Stopped: SHUTTING_DOWN,
    RunnerStopped: SHUTTING_DOWN,
    BatchFailed: "inference failed; the error is logged on the server",
    MemoryError: "the server had no memory for the request for now; retry",
}


def _status_and_detail(error: BaseException, settings: Settings) -> tuple[int, str]:
    if isinstance(error, OutOfMemory):
        logger.error("no memory for a request: %s", error)  # names the device
    elif isinstance(error, MemoryError):
        logger.error(
            "no memory for a request (the worker is at its memory limit): %s",
            str(error) or "MemoryError",
        )
    for error_type, status in _ERROR_STATUS.items():
        if isinstance(error, error_type):
            if error_type is DeadlineExceeded:
                timeout_ms = f"{settings.request_timeout_ms:.15g} ms"
                return (
                    status,
                    f"the request was not served within REQUEST_TIMEOUT_MS ({timeout_ms})",
                )
            return status, _PUBLIC_DETAIL.get(error_type, str(error))
    logger.error("unexpected error", exc_info=error)
    return 500, "internal server error"


def _task_error(error: BaseException, settings: Settings) -> str:
    """A failed task's stored error: as a request's, but for a shortage of memory, which
    fails a task only on its last attempt (its runner logs it), to submit again later."""
    if isinstance(error, MemoryError):
        return "the server had no memory for the task's image; submit it again later"
    return _status_and_detail(error, settings)[1]


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    status, detail = _status_and_detail(exc, _service(request).settings)
    if isinstance(exc, TaskStoreFailed):
        # The logs name the file where the operator put it; a client is not told where.
        store_path = _service(request).settings.data_dir / DATABASE_NAME
        detail = detail.replace(str(store_path), f"DATA_DIR's {DATABASE_NAME}")
    retry_after = str(exc.retry_after_s) if isinstance(exc, TaskQueueFull) else RETRY_AFTER_S
    headers = {"Retry-After": retry_after} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


# Starlette's refusal of a form with more file parts than a route's ``max_files``.
_TOO_MANY_FILES = re.compile(r"Too many files\. Maximum number of files is (\d+)\.")
_TOO_MANY_FIELDS = re.compile(r"Too many fields\. Maximum number of fields is (\d+)\.")
# The multipart parser's words for a body it cannot read, and what they mean to a caller.
_MULTIPART_ERRORS = {
    "Missing boundary in multipart.": NO_BOUNDARY,
    "Invalid multipart data.": (
        "the body is not well-formed multipart/form-data: a part does not begin with the "
        "boundary its Content-Type names (nor may text come before the first one, a MIME "
        "preamble, which is not read), or a part's header lines are malformed (at most 8 "
        "of them, each of at most 4,224 bytes)"
    ),
}


def _no_thread(error: BaseException | None) -> bool:
    """Whether ``error`` is Python's for a thread the system would not start (at a limit
    of threads or memory), not another RuntimeError: a bug's keeps its 400 and traceback."""
    return isinstance(error, RuntimeError) and str(error) == "can't start new thread"


def _has_route(app: FastAPI, path: str) -> bool:
    return matching_route(app, {"type": "http", "path": path, "method": "GET"}) is not None


def _routes_taking_ids(app: FastAPI, prefix: str) -> list[str]:
    """The routes whose path is ``prefix`` followed by a parameter, as /task-status/{task_id}."""
    paths = (route.path for route in app.routes if isinstance(route, APIRoute))
    return list(
        dict.fromkeys(  # a path served for GET and HEAD is two routes
            path
            for path in paths
            if path.startswith(prefix)
            and path[len(prefix) :].startswith("{")
            and "/" not in path[len(prefix) :]
        )
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    cause = exc.__cause__
    # FastAPI calls any failure to parse the body the client's; these are the server's.
    if exc.status_code == 400 and isinstance(cause, OSError):
        # A large part could not be spooled to the temporary directory.
        logger.error(
            "an upload could not be stored in the temporary directory %s: %s",
            tempfile.gettempdir(),
            cause,
        )
        reason = cause.strerror or type(cause).__name__
        return JSONResponse(
            {"detail": f"the server could not store the upload for now ({reason}); retry"},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_S},
        )
    if exc.status_code == 400 and (isinstance(cause, MemoryError) or _no_thread(cause)):
        # Out of memory, or of threads: a large part is spooled to disk on a worker thread.
        logger.error("an upload could not be read: %s: %s", type(cause).__name__, cause)
        return JSONResponse(
            {"detail": "the server could not read the upload for now; retry"},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_S},
        )
    if exc.status_code == 404 and detail == "Not Found":
        path = request.url.path
        shown = logs.shortened(path, 200)
        detail = f"no route {shown}"
        if len(path) <= 200 and path.endswith("/"):
            if _has_route(request.app, path.rstrip("/")):
                detail += f"; the route is {path.rstrip('/')}, without the trailing slash"
            elif taking := _routes_taking_ids(request.app, path):  # the id left out
                detail += f"; the route is {' or '.join(taking)}"
    if exc.status_code == 400 and str(detail) in _MULTIPART_ERRORS:
        detail = _MULTIPART_ERRORS[str(detail)]
    if exc.status_code == 400 and (match := _TOO_MANY_FILES.fullmatch(str(detail))):
        # Starlette's message names neither the setting nor the route for several files.
        if request.url.path == CLASSIFY_BATCH_ROUTE:
            detail = (
                f"more than {match[1]} files; {CLASSIFY_BATCH_ROUTE} takes at most MAX_BATCH_FILES "
                f"({match[1]}) per request"
            )
        else:
            # Empty file parts count toward the limit: the form may hold a single image.
            one_file = _takes_one_file(request.url.path)
            detail = f"more than {match[1]} file parts, empty ones included; {one_file}"
    if exc.status_code == 400 and (match := _TOO_MANY_FIELDS.fullmatch(str(detail))):
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            # An image sent as the raw body, which curl labels as a URL-encoded form: its
            # bytes read as many fields.
            detail = f"file: Field required; {_send_as_multipart(content_type)}"
            return JSONResponse({"detail": detail}, status_code=422)
        takes = "file"
        if request.url.path == TASKS_ROUTE:
            takes = f"{', '.join(TASK_FORM_FIELDS[:-1])} and {TASK_FORM_FIELDS[-1]}"
        detail = (
            f"more than {match[1]} plain form fields; {request.url.path} takes {takes} "
            "(top_k is a query parameter)"
        )
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette's Allow names the methods of the first route of the path only; HEAD
        # has routes of its own.
        allowed = ", ".join(sorted(_allowed_methods(request)))
        headers = {**(headers or {}), "Allow": allowed}
        path = request.url.path
        shown = logs.shortened(path, 200)
        detail = f"{request.method} is not allowed on {shown}; it takes {allowed}"
        if shown == path and path.startswith("/tasks/") and request.method in ("GET", "HEAD"):
            detail += f"; a task's status is at /task-status/{path.removeprefix('/tasks/')}"
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> set[str]:
    """The methods of every route whose path matches the request's."""
    return {
        method
        for route in request.app.router.routes
        if route.matches(request.scope)[0] != Match.NONE
        for method in getattr(route, "methods", None) or ()
    }


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {_public_validation_message(error)}")
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data") and any(
        tuple(error.get("loc", ())) == ("body", "file") for error in exc.errors()
    ):
        # An image sent as the raw body, or as JSON: say how to send it instead.
        problems.append(_send_as_multipart(content_type))
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


def _send_as_multipart(content_type: str) -> str:
    shown = logs.shortened(content_type, 100)
    return (
        "send the image as a multipart/form-data part named 'file' "
        f"(curl -F file=@image.jpg), not as a body of type {shown or '(none)'}"
    )


def _public_validation_message(error: Mapping[str, object]) -> str:
    message = str(error.get("msg", "invalid"))
    # FastAPI's UploadFile check names the Python type it got ("<class 'str'>") when a
    # plain form field stands where a file should be.
    if "Expected UploadFile" in message:
        return (
            "expected a file part, with filename= in its Content-Disposition (filename* alone "
            "is not read, RFC 7578), received a plain form field"
        )
    return message


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # For errors of the request middleware itself, which answers every other one; Starlette
    # runs this outside it, so the request id is bound again.
    request_id = getattr(request.state, REQUEST_ID_STATE, None)
    with logs.request_id_bound(request_id or "-"):
        logger.error(
            "unhandled error on %s %s",
            request.method,
            logs.shown_path(request.url.path),
            exc_info=exc,
        )
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return JSONResponse({"detail": "internal server error"}, status_code=500, headers=headers)


def uvicorn_workers() -> int:
    """How many workers ``uvicorn --workers`` (or ``UVICORN_WORKERS``, or
    ``WEB_CONCURRENCY``) started beside this one, as its command line says (a spawned
    process gets its parent's): 1 in a process of its own, or under ``--reload`` (or
    ``UVICORN_RELOAD``), which runs one."""
    reload = os.environ.get("UVICORN_RELOAD", "").strip().lower() in ("1", "true", "yes", "on")
    if multiprocessing.parent_process() is None or reload or "--reload" in sys.argv:
        return 1
    given = os.environ.get("UVICORN_WORKERS") or os.environ.get("WEB_CONCURRENCY", "")
    for index, argument in enumerate(sys.argv):
        if argument == "--workers":
            given = sys.argv[index + 1] if index + 1 < len(sys.argv) else ""
        elif argument.startswith("--workers="):
            given = argument.removeprefix("--workers=")
    return max(1, int(given)) if given.strip().isdigit() else 1


def create_app(settings: Settings) -> FastAPI:
    """Build the application for the given settings; the model loads in its lifespan."""
    uploads = UploadsInFlight()  # counted by the body limits, read by the memory trimmer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        siblings: Siblings | None = getattr(app.state, SIBLINGS_STATE, None)
        own = settings
        if siblings is None:  # not under gunicorn, whose master says it once for all workers
            for line in misspelt_settings():
                logger.warning("%s", line)
            if (warning := raise_open_file_limit()) is not None:
                logger.warning("%s", warning)
            # WORKERS is gunicorn's: a process of uvicorn's shares the cores with the workers
            # its command line started, if any.
            own = settings.model_copy(update={"workers": uvicorn_workers()})
            for line in settings_to_warn_of(own):
                logger.warning("%s", line)
            if own.workers > 1:
                logger.warning(
                    "uvicorn runs %d workers here, which know nothing of each other: /metrics "
                    "counts one worker's requests; serve several workers with gunicorn "
                    "(make run, WORKERS=%d)",
                    own.workers,
                    own.workers,
                )
        started_before = siblings is not None and siblings.server_started()
        service = Service(own, server_started=started_before, uploads=uploads)
        app.state.service = service
        setattr(app.state, LIVENESS_STATE, service.liveness_problem)
        try:
            await service.start()
        except Exception as exc:
            # One line that says what to change, not a traceback (but for a failure nobody
            # foresaw, a bug: its traceback is what mends it). Exit code 3 tells gunicorn
            # to stop rather than restart the worker in a loop, unless other workers serve.
            foreseen = isinstance(exc, (ModelLoadError, TaskStoreUnavailable, ThreadsUnavailable))
            if not foreseen and siblings is None:
                raise  # uvicorn, or a test, shows it with its traceback as it stops
            reason = exc if foreseen else f"an unexpected error ({logs.shortened(repr(exc), 300)})"
            others_serve = siblings is not None and siblings.others_serving()
            pause_s = 0.0
            if siblings is not None and others_serve:
                pause_s = restart_pause_s(siblings.failed_to_start(), settings.worker_timeout_s)
                logger.critical(
                    "cannot start: %s; gunicorn starts this worker again in %g s, and the "
                    "other workers serve meanwhile",
                    reason,
                    pause_s,
                    exc_info=not foreseen,
                )
            else:
                logger.critical("cannot start: %s", reason, exc_info=not foreseen)
            logs.stop_writer()  # os._exit skips atexit: write the line out first
            sys.stderr.flush()
            if pause_s:
                pause_unless_stopped(pause_s)
            os._exit(EXIT_RESTART if others_serve else EXIT_BOOT_ERROR)
        if siblings is not None:
            siblings.mark_ready()
        # What exists now (libraries, app, model) lives as long as the worker. Frozen, it
        # drops out of the collector's full passes, each of which would otherwise hold the
        # GIL, and so every request, for about 0.2 s.
        gc.collect()
        gc.freeze()
        try:
            yield {SHUTDOWN_HOOK: service.begin_shutdown}
        finally:
            gc.unfreeze()
            try:
                await service.stop()
            finally:
                # uvicorn ends a worker stopped by a signal with that signal once the server
                # is down, so no atexit hook writes out what is still queued.
                logs.stop_writer()

    upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    body_limits = {
        CLASSIFY_ROUTE: upload_limit,
        CLASSIFY_BATCH_ROUTE: upload_limit * settings.max_batch_files,
        TASKS_ROUTE: upload_limit + settings.task_metadata_max_bytes + webhooks.MAX_URL_CHARS,
    }
    # Starlette caps a plain form field at 1 MiB by default, answering 400 with a message
    # that names no setting. The body limits bound a field already, so a field too long, or
    # of the wrong kind, gets the answer that names what is wrong with it.
    max_part_bytes = max(body_limits[CLASSIFY_ROUTE], body_limits[TASKS_ROUTE])
    # /cls and /tasks: empty file parts beside the image are let through, and ignored; a
    # second image is refused by their dependency.
    one_image_form = {"max_files": 8, "max_fields": 8, "max_part_size": max_part_bytes}
    app = FastAPI(
        title="ResNet18 classification service",
        summary="Micro-batched ImageNet classification over HTTP",
        version="0.1.0",
        lifespan=lifespan,
        # A path with a trailing slash is a JSON 404, not a redirect with an empty body.
        redirect_slashes=False,
    )
    app.add_api_route(
        CLASSIFY_ROUTE,
        classify,
        methods=["POST"],
        response_model=ClassifyResponse,
        responses=error_responses(400, 413, 422, 504),
        dependencies=[Depends(_one_file_named_file)],
        form_limits=one_image_form,
        tags=["classification"],
    )
    app.add_api_route(
        CLASSIFY_BATCH_ROUTE,
        classify_batch,
        methods=["POST"],
        response_model=BatchResponse,
        response_model_exclude_none=True,
        responses={
            200: {"headers": BATCH_HEADERS},
            **error_responses(400, 413, 422),
        },
        # ``file`` is optional to FastAPI only so that a form of empty file inputs reaches
        # the handler; documented as required (OpenAPI 3.1 applies this beside the $ref).
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": {"required": ["file"]}}},
            }
        },
        form_limits={
            "max_files": settings.max_batch_files,
            "max_fields": 8,
            "max_part_size": max_part_bytes,
        },
        tags=["classification"],
    )
    app.add_api_route(
        TASKS_ROUTE,
        submit_task,
        methods=["POST"],
        status_code=202,
        response_model=TaskAccepted,
        responses={202: {"headers": TASK_ACCEPTED_HEADERS}, **error_responses(400, 413, 422)},
        dependencies=[Depends(_one_file_named_file)],
        form_limits=one_image_form,
        tags=["tasks"],
    )
    app.add_api_route(
        "/task-status/{task_id}",
        task_status,
        methods=["GET"],
        response_model=TaskOut,
        responses=error_responses(404),
        name="task_status",
        tags=["tasks"],
    )
    app.add_api_route(
        "/task-status/{task_id}",
        task_status,
        methods=["HEAD"],
        name="task_status_head",
        include_in_schema=False,
    )
    app.add_api_route(
        "/tasks/{task_id}",
        cancel_task,
        methods=["DELETE"],
        response_model=TaskOut,
        responses=error_responses(404, 409),
        tags=["tasks"],
    )
    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):
        app.add_api_route(
            path,
            probe,
            methods=["GET"],
            response_model=ProbeOut,
            responses={
                503: {
                    "model": ProbeOut,
                    "description": "Not live, or not ready",
                    # A not-ready worker says when to try again; a failed liveness probe
                    # is for the orchestrator to act on.
                    **({"headers": READY_PROBE_HEADERS} if path == "/readyz" else {}),
                },
                "default": ANY_OTHER_ERROR,
            },
            tags=["operations"],
        )
        # Some load balancers probe with HEAD; one documented operation is enough.
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)
    app.add_api_route(
        "/metrics",
        prometheus_metrics,
        methods=["GET"],
        response_class=PlainTextResponse,
        responses=METRICS_RESPONSES,
        tags=["operations"],
    )
    app.add_api_route("/metrics", prometheus_metrics, methods=["HEAD"], include_in_schema=False)

    for error_type in _ERROR_STATUS:
        app.add_exception_handler(error_type, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(
        ShedWhileFullMiddleware,
        refusal=lambda path: (
            app.state.service.refusal_before_upload(path) if hasattr(app.state, "service") else None
        ),
    )
    app.add_middleware(
        BodyLimitsMiddleware,
        limit_bytes_by_path=body_limits,
        default_limit_bytes=MAX_OTHER_BODY_BYTES,
        describe=lambda limit: (
            f"request body is over {limit} bytes; "
            + (
                "this route takes no upload"
                if limit == MAX_OTHER_BODY_BYTES
                else f"MAX_UPLOAD_BYTES allows {settings.max_upload_bytes} per file"
            )
        ),
        # A file part's limit; a task's metadata, should TASK_METADATA_MAX_BYTES be set
        # larger, may take more.
        part_limit_bytes=max(
            upload_limit, settings.task_metadata_max_bytes + MULTIPART_OVERHEAD_BYTES
        ),
        describe_part=lambda limit: (
            f"a part of the request body is over {limit} bytes; "
            + f"MAX_UPLOAD_BYTES allows {settings.max_upload_bytes} per file"
            + (
                ""
                if limit == upload_limit
                else f", TASK_METADATA_MAX_BYTES {settings.task_metadata_max_bytes} for a task's "
                "metadata"
            )
        ),
        idle_timeout_s=settings.body_idle_timeout_s,
        min_bytes_per_s=settings.body_min_bytes_per_s,
        routed=partial(serves, app),
        in_flight_limit_bytes=settings.max_uploads_in_flight_bytes,
        in_flight=uploads,
    )
    describe_uploads_as_files(app)
    if settings.api_key is not None:
        document_the_api_key(app, OPEN_PATHS)
        app.add_middleware(
            ApiKeyMiddleware,
            api_key=settings.api_key.get_secret_value(),
            # The API's documentation too: a browser opening it sends no key, and its
            # "Authorize" button is how a reader then tries the routes that need one.
            open_paths=OPEN_PATHS | documentation_paths(app),
            short_body_bytes=MAX_OTHER_BODY_BYTES,
        )
    if settings.cors_origin_list:
        # Outside the key check: browsers send preflight requests without credentials.
        app.add_middleware(
            JsonCorsMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Idempotency-Key"],
            expose_headers=["X-Request-ID", "Retry-After", "Location", "Idempotent-Replayed"],
        )
    # Added last, so outermost: 401s and 413s get request ids and metrics too.
    app.add_middleware(RequestContextMiddleware)
    return app


settings = load_settings()
logs.configure_logging(settings.log_level, settings.log_format, settings.access_log)
app = create_app(settings)
