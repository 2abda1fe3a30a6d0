"""What one worker holds and does behind the HTTP routes: the model, the batcher, the
decode threads, the task store and runner, and how they start, fail and stop. main.py
puts routes in front of it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO, Protocol, TypeVar

import numpy as np
import torch

from batching import (
    BatchFailed,
    BatchProcessor,
    DeadlineExceeded,
    Outcome,
    Priority,
    QueueFull,
    Stopped,
    timeout_at_deadline,
)
from classification import (
    Classifier,
    DeviceFailed,
    ImageTooLarge,
    OutOfMemory,
    Prediction,
    load_classifier,
    preprocess,
    resolve_device,
)
from service import logs, memory, metrics
from service.errors import (
    EmptyUpload,
    NotReady,
    ThreadsUnavailable,
    UploadTooLarge,
    task_error,
)
from service.middleware import (
    UploadsInFlight,
)
from service.protocol import SHUTTING_DOWN
from service.schemas import predictions_out
from service.settings import Settings
from service.task_runner import TASK_STOP_GRACE_S, RunnerConfig, TaskRunner
from service.tasks import (
    DATABASE_NAME,
    ClaimedTask,
    TaskRecord,
    TaskStore,
    TaskStoreFailed,
    TaskStoreUnavailable,
)
from service.webhooks import (
    CallbackLookupFailed,
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


class Upload(Protocol):
    """What the service reads of an uploaded file: Starlette's ``UploadFile`` (FastAPI's
    too), whose body is spooled to a temporary file."""

    @property
    def size(self) -> int | None: ...

    @property
    def file(self) -> BinaryIO: ...


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
            _contained,
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
            self._inference_pool, _contained, classifier.warm_up, warm_up_sizes
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
                memory.IdleTrimmer(self._idle_for_trimming_s, trim).run(),
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
            describe_error=lambda error: task_error(error, settings),
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
        upload: Upload,
        top_k: int,
        deadline: float,
        priority: Priority = Priority.INTERACTIVE,
    ) -> list[Prediction]:
        """Validate, decode and classify one upload, raising a domain error on failure."""
        self.refuse_unless_classifying()
        assert self.processor is not None
        processor = self.processor
        # An upload that could never be served is told so, not to retry later.
        self._check_size(upload)
        # Refuse at once when the queue is full rather than spend a decode on the request.
        if (full := self._queue_full()) is not None:
            # Counted like the batcher's own refusals, so the metric sees every one.
            self._observer.item_finished(Outcome.REJECTED)
            raise QueueFull(full)
        model_idle = self._idle_for_s() > 0
        self._decodes_in_progress += 1
        try:
            # A decompression-heavy image must not outlive its deadline either; its thread
            # finishes the decode, but nobody waits for it.
            async with timeout_at_deadline(deadline):
                pixels = await self._decode(upload, model_idle, priority)
        except TimeoutError:
            if time.monotonic() < deadline:
                raise  # the decode's own error (the timer never fires early), not the deadline
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
        except (DeadlineExceeded, BatchFailed) as exc:
            if exc.batch_size is not None:  # the model ran the request
                logs.record_batch_size(exc.batch_size)
            raise
        logs.record_batch_size(result.batch_size)
        return result.predictions

    async def _decode(self, upload: Upload, model_idle: bool, priority: Priority) -> np.ndarray:
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
            return context.run(_contained, work, *args)

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
        upload: Upload,
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
        self._check_size(upload)
        if self._submissions_in_progress >= self.settings.max_queue:
            raise QueueFull(self._submissions_full())
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
        return [p.model_dump() for p in predictions_out(result.predictions)]

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

    def queue_refusal(self, *, counted: bool) -> str | None:
        """Why an image upload would be refused for a full queue now, before its body is
        read; None to read it (and while not ready: its route answers that, with its own
        reason). ``counted``: the refusal counts as the batcher's refusals do (a /cls); a
        /cls/batch, whose files are not known yet, counts only as the HTTP 503 it is."""
        if not self.ready or self.processor is None:
            return None
        full = self._queue_full()
        if full is not None and counted:
            self._observer.item_finished(Outcome.REJECTED)
        return full

    def submission_refusal(self) -> str | None:
        """Why a task submission would be refused now, before its body is read; None to
        read it."""
        if self.ready and self._submissions_in_progress >= self.settings.max_queue:
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

    def _check_size(self, upload: Upload) -> None:
        """Refuse an empty upload, or one over MAX_UPLOAD_BYTES, before it waits for a
        decode thread, a deadline or room in the queue."""
        if upload.size == 0:
            raise EmptyUpload("the uploaded file is empty")
        if upload.size is not None and upload.size > self.settings.max_upload_bytes:
            raise _too_large(upload.size, self.settings.max_upload_bytes)

    def num_classes(self) -> int:
        """How many classes the model tells apart."""
        if self.classifier is None:
            raise self._not_ready()
        return self.classifier.num_classes

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
                _contained,
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
        if len(predictions) != len(jobs):  # another model package's bug: the batch is split
            raise RuntimeError(f"the model answered {len(predictions)} of {len(jobs)} images")
        return [_result(job, each, len(jobs)) for job, each in zip(jobs, predictions, strict=True)]

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

    def _idle_for_s(self) -> float:
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

    def _idle_for_trimming_s(self) -> float:
        """As ``_idle_for_s``, and 0 while requests' bodies arrive or are held: a trim beside
        them would take the heap's size with them for its resting size, and never return
        what they free once they end."""
        return 0.0 if self._uploads.held_bytes else self._idle_for_s()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s stopped", task.get_name(), exc_info=task.exception())


def _result(
    job: ClassifyJob, predictions: Iterable[Prediction], batch_size: int
) -> ClassifyResult | BatchFailed:
    """One image's answer, or its failure where the model's answer cannot be sent: not a
    list of predictions of the right types, a label that is not Unicode text (a lone
    surrogate), a score of NaN or infinity (JSON has no number for it, and it ranks
    nothing). The images batched with it are answered, without running again."""
    try:
        answer = list(predictions)  # a generator would be empty when the answer is sent
        served = predictions_out(answer)
        for each in served:
            each.label.encode()
    except Exception as exc:  # whatever another model package returned
        problem = f"an answer that cannot be sent ({logs.shortened(repr(exc), 300)})"
    else:
        if all(math.isfinite(each.score) for each in served):
            return ClassifyResult(answer, batch_size)
        problem = "NaN or infinity"
    with logs.request_id_bound(job.request_id):
        logger.error(
            "the model scored the image with %s (in a batch of %d); it fails", problem, batch_size
        )
    return BatchFailed("inference failed")


def _contained(work: Callable[..., T], *args: object) -> T:
    """``work(*args)``, for a pool's thread, with what asyncio treats as control flow
    raised as a RuntimeError, as a coroutine turns a StopIteration into one. From a model
    package's code, a StopIteration (a ``next()`` of an empty iterator) never reaches the
    coroutine awaiting it (a future cannot hold one, and waits for ever); a cancellation
    reads as the caller's; GeneratorExit as the batcher's task closing; and SystemExit or
    KeyboardInterrupt would stop the event loop, and with it every request of the worker."""
    try:
        return work(*args)
    except _CONTROL_FLOW as exc:
        raise RuntimeError(f"{work!r} raised {exc!r}") from exc


_CONTROL_FLOW = (
    StopIteration,
    GeneratorExit,
    SystemExit,
    KeyboardInterrupt,
    asyncio.CancelledError,
    concurrent.futures.CancelledError,
)


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
