"""Runs persisted tasks through the model and delivers their webhooks, in every worker.

Each worker claims queued tasks from the shared store, a few at a time, and hands them to
``execute`` (the model, through the batcher's background lane). Leases, renewed while the
worker lives, let another worker (or the next start) take over what a dead one held.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from service import logs, tasks
from service.tasks import (
    DELETE_STEP_TASKS,
    ClaimedTask,
    Deferral,
    TaskRecord,
    TaskStatus,
    TaskStore,
    TaskStoreBusy,
    TaskStoreFailed,
    check_disk_room,
    check_room,
)
from service.webhooks import CUT_OFF_ERROR, Attempt, WebhookSender

T = TypeVar("T")

# Waits between tries of a write that must not be lost, while the store is busy or failing.
STORE_RETRY_FIRST_S = 0.1
STORE_RETRY_MAX_S = 5.0
# How often a stopping worker looks again for a delivery falling due within its grace.
STOP_POLL_S = 0.05
# How long a request waits for its write's answer once the write lock's wait is over.
WRITE_ANSWER_MARGIN_S = 1.0
# At a stop, while another process holds the store's write lock: how long after the grace
# the writes then running (a result, a delivery's record) may wait for it, and then how
# long the hand-back may. With the grace, they fit in gunicorn's graceful_timeout, so the
# worker hands back what it holds, or logs that it could not, before it is killed.
WRITES_AFTER_GRACE_S = 1.5
HAND_BACK_LOCK_WAIT_S = 2.5
# After the batcher drained, how long running tasks get to store their results.
TASK_STOP_GRACE_S = 5.0
# The longest a worker's stop takes after its drain: gunicorn's graceful_timeout covers it.
STOP_AFTER_DRAIN_MAX_S = TASK_STOP_GRACE_S + WRITES_AFTER_GRACE_S + HAND_BACK_LOCK_WAIT_S
# The clean-up's pause between its writes: longer than SQLite's busy handler sleeps between
# tries for the lock (100 ms at most), so each process waiting for it gets in.
CLEAN_UP_PAUSE_S = 0.15

logger = logging.getLogger(__name__)

# Runs one claimed task through the model -> its JSON-ready prediction.
Execute = Callable[[ClaimedTask], Awaitable[object]]


class TaskObserver(Protocol):
    """Receives the runner's events, for metrics. Calls must be cheap and not raise."""

    def task_finished(self, succeeded: bool, latency_s: float) -> None:
        """A task succeeded or failed, ``latency_s`` after it was submitted."""

    def task_queue_depth_changed(self, depth: int) -> None:
        """``depth`` tasks of the store wait to be claimed."""

    def webhook_attempted(self, duration_s: float) -> None:
        """A delivery attempt ended, delivered or not, after ``duration_s``."""

    def webhook_finished(self, delivered: bool) -> None:
        """A delivery ended for good: delivered, or failed after its last attempt."""


class RunnerStopped(Exception):
    """``stop`` has run: the store is closed, or closing, to requests."""


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """The runner's knobs; see the ``TASK_*`` settings."""

    data_dir: Path
    capacity: int
    max_queued: int
    max_attempts: int
    lease_s: float
    poll_interval_s: float
    cleanup_interval_s: float
    ttl_s: float
    webhook_capacity: int = 64
    # False: the store must exist already (see TaskStore).
    create_store: bool = True


def _request_hash(
    image: bytes, top_k: int, metadata: dict[str, object] | None, callback_url: str | None
) -> str:
    """What makes two submissions the same request, for Idempotency-Key replays."""
    digest = hashlib.sha256(image)
    digest.update(json.dumps([top_k, metadata, callback_url], sort_keys=True).encode())
    return digest.hexdigest()


def _describe(error: BaseException) -> str:
    """An error in a log line: its message, or its type where it has none (MemoryError)."""
    return str(error) or type(error).__name__


def _log_count_failure(task_ids: list[str], counted: asyncio.Future[None]) -> None:
    error = None if counted.cancelled() else counted.exception()
    if isinstance(error, TaskStoreBusy | TaskStoreFailed):  # a full or failing disk, a lock
        logger.error("counting the attempts of tasks %s failed: %s", task_ids, error)
    elif error is not None:
        logger.error("counting the attempts of tasks %s failed", task_ids, exc_info=error)


def _log_abandoned_write(what: str, writing: asyncio.Future[object]) -> None:
    """The end of a write whose caller was cut off (a stop's grace ran out)."""
    error = None if writing.cancelled() else writing.exception()
    if error is not None:
        logger.error("storing %s failed as the worker stopped: %s", what, error)


def _log_delivery_taken_over(task_id: str) -> None:
    # Its lease ran out (this worker stalled) and another worker claimed it: that one's
    # attempts are counted and stored, not this one's.
    logger.warning(
        "task %s's webhook was taken over by another worker; this attempt's outcome dropped",
        task_id,
    )


# A loop that fails the same way at every turn (each second, say, with DATA_DIR deleted)
# logs it once, then once this often, with how many times it failed since.
REPEATED_FAILURE_LOG_S = 60.0


class _LoopFailures:
    """Logs the background loops' failures: a store failing for now (locked, full,
    damaged) in one line, since a loop meets it again at each turn; anything else with its
    traceback. The same failure of a loop again within ``REPEATED_FAILURE_LOG_S`` is
    counted, not logged."""

    def __init__(self) -> None:
        # Per loop message: the failure last logged, when, and how many times it came since.
        self._logged: dict[str, tuple[str, float, int]] = {}

    def log(self, error: Exception, message: str, *, key: str | None = None) -> None:
        """``key`` names the failing work when ``message`` varies (which task's result)."""
        key = message if key is None else key
        described = f"{type(error).__name__}: {error}"
        now = time.monotonic()
        last = self._logged.get(key)
        if last is not None and last[0] == described and now - last[1] < REPEATED_FAILURE_LOG_S:
            self._logged[key] = (described, last[1], last[2] + 1)
            return
        self._logged[key] = (described, now, 0)
        repeats = ""
        if last is not None and last[2]:
            repeats = (
                f" ({last[2]} more times since the last such line)"
                if last[0] == described
                else f" (after {last[2]} more of the failure logged before)"
            )
        if isinstance(error, TaskStoreBusy | TaskStoreFailed):
            logger.error("%s: %s%s", message, error, repeats)
        else:
            logger.error("%s%s", message, repeats, exc_info=error)


class TaskRunner:
    """The task subsystem of one worker process: submit, read, cancel, run, deliver.

    Args:
        config: Where the store lives and how the runner paces itself.
        execute: Runs one claimed task through the model, calling ``count_attempts`` as
            the task enters it.
        describe_error: The public text of an error ``execute`` raised.
        requeue_on: Errors that mean "not now" (the server is stopping, the lane is full):
            the task goes back to the queue instead of failing.
        retry_later_on: Errors of an attempt that may pass later (the model had no memory):
            the task goes back to the queue after ``retry_pause_s`` (at once if this worker
            stops claiming), or fails on its last attempt.
        sender: Delivers webhooks; closed by ``stop``.
        observer: Receives events for metrics.
    """

    def __init__(
        self,
        config: RunnerConfig,
        *,
        execute: Execute,
        describe_error: Callable[[BaseException], str],
        requeue_on: tuple[type[BaseException], ...],
        sender: WebhookSender,
        observer: TaskObserver,
        may_claim: Callable[[], bool] = lambda: True,
        retry_later_on: tuple[type[BaseException], ...] = (),
        retry_pause_s: float = 5.0,
    ) -> None:
        self._config = config
        # Whether the model may take more tasks now: not while it is stuck on a batch.
        self._may_claim = may_claim
        self._execute = execute
        self._describe_error = describe_error
        self._requeue_on = requeue_on
        self._retry_later_on = retry_later_on
        self._retry_pause_s = retry_pause_s
        self._stopped_claiming = asyncio.Event()  # ends the pauses before a retry
        self._sender = sender
        self._observer = observer
        # Unique per process start: a restarted worker never mistakes old leases for its own.
        self.owner = uuid.uuid4().hex[:12]
        # SQLite calls block (fsync, another process's write lock): keep them off the loop,
        # on one thread, which owns the connection.
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="task-store")
        self._store: TaskStore | None = None
        # Status reads on a connection and thread of their own: in WAL mode a read never
        # waits for a write, so polls are answered while writes wait for a lock.
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="task-store-reads")
        self._reader: TaskStore | None = None
        # Submissions and cancels on a connection and thread of their own too: while
        # another process holds the write lock, the claim loop's and results' writes each
        # wait out the busy timeout, and a request queued behind them would wait for all.
        self._request_thread = ThreadPoolExecutor(1, thread_name_prefix="task-store-requests")
        self._request_writer: TaskStore | None = None
        # Lease renewals too: queued behind claims, results and the clean-up's freeing of
        # pages (seconds, after large images), a renewal could come after its lease ran out,
        # and another worker would run the task again beside this one.
        self._lease_thread = ThreadPoolExecutor(1, thread_name_prefix="task-store-leases")
        self._lease_writer: TaskStore | None = None
        self._wake = asyncio.Event()
        self._loop_failures = _LoopFailures()
        # When a store call of this worker last failed (see ``_may_take_over``).
        self._store_failed_at = -math.inf
        self._runs: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        # The task id each run or delivery works on: the leases to keep alive.
        self._holding: dict[asyncio.Task[None], str] = {}
        self._claim_loop_task: asyncio.Task[None] | None = None
        self._housekeeping: list[asyncio.Task[None]] = []
        self._stopped = False
        self._claiming = True  # until the worker begins to stop
        # While the claim loop takes deliveries: claimed, not yet in ``_deliveries``.
        self._claiming_deliveries = False
        self._claim_deliveries_until = math.inf  # (event loop time) set by ``stop``
        # Attempts cut off at the end of the stop's grace, stored as the worker hands back.
        self._cut_off: list[Deferral] = []

    async def start(self) -> None:
        """Open the store and start claiming tasks and deliveries.

        Raises:
            TaskStoreUnavailable: The store cannot be opened; nothing is left open, and
                ``start`` may be called again.
        """
        loop = asyncio.get_running_loop()
        opened: list[tuple[ThreadPoolExecutor, TaskStore]] = []
        try:
            for thread in self._threads():
                store = await loop.run_in_executor(
                    thread,
                    partial(TaskStore, self._config.data_dir, create=self._config.create_store),
                )
                opened.append((thread, store))
        except BaseException:
            for thread, store in opened:
                await loop.run_in_executor(thread, store.close)
            raise
        self._store, self._reader, self._request_writer, self._lease_writer = (
            store for _, store in opened
        )
        self._claim_loop_task = asyncio.create_task(self._claim_forever(), name="task-claims")
        self._housekeeping = [
            asyncio.create_task(self._renew_leases_forever(), name="task-leases"),
            asyncio.create_task(self._clean_up_forever(), name="task-clean-up"),
        ]

    # --- What the routes call -----------------------------------------------------------------

    async def submit(
        self,
        image: bytes,
        *,
        top_k: int,
        metadata: dict[str, object] | None,
        callback_url: str | None,
        idempotency_key: str | None = None,
    ) -> tuple[TaskRecord, bool]:
        """Store a validated image as a queued task; the task, and whether it is new (False:
        the ``idempotency_key`` names a task submitted before, which is returned instead).

        Raises:
            TaskQueueFull: ``TASK_MAX_QUEUED`` tasks are already waiting, or the disk is
                nearly full.
            IdempotencyKeyReused: The key was used for a different request.
            RunnerStopped: ``stop`` has run (so for ``check_room``, ``get`` and ``cancel``).
        """
        task_id = str(uuid.uuid4())
        request_hash = None
        if idempotency_key is not None:
            request_hash = await asyncio.to_thread(
                _request_hash, image, top_k, metadata, callback_url
            )
        record = await self._request_write(
            self.request_writer.create,
            task_id,
            image,
            top_k=top_k,
            metadata=metadata,
            callback_url=callback_url,
            max_queued=self._config.max_queued,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            expired_before=self._expired_before(),
        )
        self._wake.set()  # claim it here and now rather than at the next poll
        return record, record.id == task_id

    async def check_room(self, idempotency_key: str | None = None) -> bool:
        """Raise ``TaskQueueFull`` now if a submission would be refused for it: before its
        image is decoded. The store checks again as it stores the task. A resent request,
        whose ``idempotency_key`` names a stored task, is never refused for it: it stores
        nothing, and is answered with that task.

        Returns:
            Whether ``idempotency_key`` names a stored task: the request is a resend.

        Raises:
            TaskQueueFull: ``TASK_MAX_QUEUED`` tasks are already waiting, or the disk holding
                the store is nearly full (see ``check_disk_room``).
        """
        self._refuse_once_stopped()
        loop = asyncio.get_running_loop()
        if idempotency_key is not None and await loop.run_in_executor(
            self._read_thread,
            partial(self.reader.holds_key, idempotency_key, expired_before=self._expired_before()),
        ):
            return True
        self._refuse_once_stopped()  # ``stop`` may have closed the store meanwhile
        queued = await loop.run_in_executor(self._read_thread, self.reader.count_queued)
        check_room(queued, self._config.max_queued)
        # Off the event loop, as every read of DATA_DIR: a hung mount must not hold it.
        await loop.run_in_executor(self._read_thread, check_disk_room, self.reader.path.parent)
        return False

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task, or None if it does not exist (or has expired)."""
        self._refuse_once_stopped()
        return await asyncio.get_running_loop().run_in_executor(
            self._read_thread,
            partial(self.reader.get, task_id, expired_before=self._expired_before()),
        )

    async def cancel(self, task_id: str) -> TaskRecord | None:
        """Cancel a queued task.

        Raises:
            TaskNotCancellable: It is running or finished.
        """
        record = await self._request_write(
            self.request_writer.cancel,
            task_id,
            expired_before=self._expired_before(),
        )
        self._wake.set()  # the queue depth changed
        return record

    async def count_attempts(self, task_ids: list[str], *, wait_s: float) -> None:
        """Charge an attempt to these tasks, which are entering the model: if the worker
        dies while it runs them, they, and not the tasks only waiting, were running.

        Waits at most ``wait_s`` for the write: a database locked by another process must
        not hold up the batch, nor the interactive requests waiting behind it, for long.
        The write then lands late (a crash meanwhile would not be charged); the store's
        later writes for these tasks run after it, on the same thread.
        """
        written = asyncio.get_running_loop().run_in_executor(
            self._db_thread, partial(self.store.count_attempts, self.owner, task_ids)
        )
        # Logs a failure whether or not anyone still waits for it (timeout, shutdown).
        written.add_done_callback(partial(_log_count_failure, task_ids))
        try:
            async with asyncio.timeout(wait_s):  # not wait_for: 3.11's can swallow a cancel
                await asyncio.shield(written)
        except TimeoutError:
            logger.warning(
                "the task store has not recorded the attempts of tasks %s after %s s; "
                "the model runs them meanwhile",
                task_ids,
                wait_s,
            )
        except Exception:  # logged by _log_count_failure
            pass

    def _refuse_once_stopped(self) -> None:
        # Requests already waiting for a store thread run before its connection closes;
        # later ones would find it closed, or the thread gone.
        if self._stopped:
            raise RunnerStopped("the task runner stopped")

    def _expired_before(self) -> float:
        """Tasks that finished before this time have expired, deleted yet or not."""
        return time.time() - self._config.ttl_s

    def _threads(self) -> tuple[ThreadPoolExecutor, ...]:
        """Each store connection's thread, in the order ``start`` opens them."""
        return (self._db_thread, self._read_thread, self._request_thread, self._lease_thread)

    @property
    def store(self) -> TaskStore:
        """The store's connection for claims, results and deliveries, used on its own
        thread."""
        if self._store is None:
            raise RuntimeError("TaskRunner.start() has not been called")
        return self._store

    @property
    def request_writer(self) -> TaskStore:
        """The store's connection for submissions and cancels, used on its own thread."""
        if self._request_writer is None:
            raise RuntimeError("TaskRunner.start() has not been called")
        return self._request_writer

    @property
    def lease_writer(self) -> TaskStore:
        """The store's connection for lease renewals, used on its own thread."""
        if self._lease_writer is None:
            raise RuntimeError("TaskRunner.start() has not been called")
        return self._lease_writer

    @property
    def reader(self) -> TaskStore:
        """The store's connection for reads, used on its own thread."""
        if self._reader is None:
            raise RuntimeError("TaskRunner.start() has not been called")
        return self._reader

    # --- Lifecycle ----------------------------------------------------------------------------

    def stop_claiming(self) -> None:
        """Take no more tasks; what this worker holds keeps running, and webhooks are still
        delivered, those of the tasks it finishes included, until ``stop``. Tasks waiting
        to be retried go back to the queue at once, for other workers."""
        self._claiming = False
        self._stopped_claiming.set()

    def expect_stop(self, grace_ends_at: float) -> None:
        """The worker is stopping, its stop's grace to end by ``grace_ends_at``
        (``time.monotonic()``): from now on the store's writes wait for another process's
        write lock until ``WRITES_AFTER_GRACE_S`` after that at the latest, so that they,
        and the hand-back after them, end before the worker is killed. Requests' writes
        too: ``stop`` waits for their thread."""
        due_by = grace_ends_at + WRITES_AFTER_GRACE_S
        for store in (self._store, self._request_writer, self._lease_writer):
            if store is not None:
                store.writes_due_by = min(due_by, store.writes_due_by or due_by)

    async def stop(self, grace_s: float) -> None:
        """Let running tasks record their results and webhooks finish (bounded), then hand
        back the rest.

        Within ``grace_s`` the worker goes on delivering: the webhooks in flight, those of
        the tasks that finish meanwhile, and retries that fall due. Tasks still running and
        deliveries still pending then go back to the store for another worker or the next
        start; nothing this worker holds is left leased to it. Requests made from now on
        raise ``RunnerStopped``.
        """
        self._stopped = True
        self.stop_claiming()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        self.expect_stop(grace_ends_at=time.monotonic() + grace_s)
        # An attempt begun late in the grace would only be cut off: deliveries are claimed
        # in its first half.
        self._claim_deliveries_until = loop.time() + grace_s / 2
        while (remaining_s := deadline - loop.time()) > 0:
            claim_s = self._claim_deliveries_until - loop.time()
            if in_flight := self._runs | self._deliveries:
                await asyncio.wait(
                    in_flight, timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED
                )
            elif self._claiming_deliveries or (
                claim_s > 0 and await self._delivery_due_within(claim_s)
            ):
                await asyncio.sleep(min(STOP_POLL_S, remaining_s))  # for the claim loop to take it
            else:
                break
        leftovers = [*self._runs, *self._deliveries, *self._housekeeping]
        if self._claim_loop_task is not None:
            leftovers.append(self._claim_loop_task)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        # Each step runs whatever the one before it raised: a store that cannot be written
        # at shutdown must not leave connections and threads open.
        try:
            if self._store is not None:
                try:
                    released = await self._db(
                        self._store.release,
                        self.owner,
                        cut_off=self._cut_off,
                        lock_deadline=time.monotonic() + HAND_BACK_LOCK_WAIT_S,
                    )
                except Exception as exc:
                    # A store failing for now (locked, full) is said in one line, as
                    # everywhere; anything else with its traceback.
                    logger.error(
                        "could not hand back this worker's tasks at shutdown%s; others take "
                        "them when their leases run out (TASK_LEASE_S)",
                        f" ({exc})" if isinstance(exc, TaskStoreBusy | TaskStoreFailed) else "",
                        exc_info=None if isinstance(exc, TaskStoreBusy | TaskStoreFailed) else exc,
                    )
                else:
                    if released:
                        logger.info("handed back %d tasks and deliveries at shutdown", released)
                finally:
                    await self._db(self._store.close)
        finally:
            # Last in, first out; each callback runs whatever the ones before it raised.
            async with contextlib.AsyncExitStack() as closing:
                for thread in self._threads():
                    # Joined off the loop: a write still waiting for another process's
                    # lock holds its thread for up to the busy timeout.
                    closing.push_async_callback(loop.run_in_executor, None, thread.shutdown)
                closing.push_async_callback(self._sender.aclose)
                for store, thread in (
                    (self._request_writer, self._request_thread),
                    (self._reader, self._read_thread),
                    (self._lease_writer, self._lease_thread),
                ):
                    if store is not None:
                        closing.push_async_callback(loop.run_in_executor, thread, store.close)

    # --- Background loops ---------------------------------------------------------------------

    async def _claim_forever(self) -> None:
        config = self._config
        while True:
            self._wake.clear()
            try:
                if self._claiming and self._may_claim():
                    claimed = await self._db(
                        self.store.claim,
                        self.owner,
                        config.capacity - len(self._runs),
                        lease_s=config.lease_s,
                        max_attempts=config.max_attempts,
                        take_over=self._may_take_over(),
                    )
                    self._log_taken_over(claimed)
                    for task in claimed:
                        self._spawn(self._runs, self._run(task), task.id)
                pending = []
                if asyncio.get_running_loop().time() < self._claim_deliveries_until:
                    self._claiming_deliveries = True
                    try:
                        pending = await self._db(
                            self.store.claim_webhooks,
                            self.owner,
                            config.webhook_capacity - len(self._deliveries),
                            lease_s=config.lease_s,
                            now=time.time(),
                            take_over=self._may_take_over(),
                        )
                    finally:
                        self._claiming_deliveries = False
                    if asyncio.get_running_loop().time() >= self._claim_deliveries_until:
                        # The claim waited past the point where a new attempt may begin:
                        # what it took is handed back with the rest.
                        pending = []
                for record in pending:
                    self._spawn(self._deliveries, self._deliver(record), record.id)
                self._observer.task_queue_depth_changed(await self._db(self.store.count_queued))
                # Woken when the next delivery falls due too, if that is before the poll.
                next_due = await self._db(self.store.next_delivery_due, now=time.time())
            except Exception as exc:
                # A locked or full disk must not end task processing for good; retry.
                self._loop_failures.log(
                    exc, f"claiming tasks failed; retrying in {config.poll_interval_s} s"
                )
                next_due = None
            wait_s = config.poll_interval_s
            # With every delivery slot taken, the end of a delivery wakes the loop instead.
            if next_due is not None and len(self._deliveries) < config.webhook_capacity:
                wait_s = min(wait_s, max(0.0, next_due - time.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()

    @staticmethod
    def _log_taken_over(claimed: list[ClaimedTask]) -> None:
        """Say which tasks this worker took from one whose lease ran out, and which of them
        had entered the model on an earlier attempt: the model runs those again."""
        taken = [task for task in claimed if task.taken_over]
        if not taken:
            return
        rerun = [task.id for task in taken if task.interrupted]
        logger.warning(
            "took over %d task(s) from a worker whose lease ran out (TASK_LEASE_S): %s; "
            "run again after entering the model before: %s",
            len(taken),
            logs.listed([task.id for task in taken]),
            logs.listed(rerun) or "none",
        )

    async def _renew_leases_forever(self) -> None:
        config = self._config
        while True:
            await asyncio.sleep(config.lease_s / 3)
            try:
                await self._db(
                    self.lease_writer.renew_leases,
                    self.owner,
                    list(self._holding.values()),
                    lease_s=config.lease_s,
                    now=time.time(),
                    on=self._lease_thread,
                )
                abandoned = await self._db(
                    self.lease_writer.fail_abandoned,
                    config.max_attempts,
                    now=time.time(),
                    take_over=self._may_take_over(),
                    on=self._lease_thread,
                )
                for record in abandoned:
                    logger.error("task %s failed: %s", record.id, record.error)
                    self._record_finished(record)
                if abandoned:
                    self._wake.set()  # their webhooks are now pending
            except Exception as exc:
                self._loop_failures.log(exc, "renewing task leases failed")

    async def _clean_up_forever(self) -> None:
        config = self._config
        while True:
            try:
                await self._clean_up()
            except Exception as exc:
                self._loop_failures.log(exc, "deleting expired tasks failed")
            await asyncio.sleep(config.cleanup_interval_s)

    async def _clean_up(self) -> None:
        """Delete expired tasks, then give their pages back to the file system, a short
        write at a time (``CLEAN_UP_PAUSE_S`` apart), so that other processes' writes get
        the lock between them, and this worker's claims and results its thread."""
        deleted = 0
        try:
            while True:
                step = await self._db(
                    self.store.delete_expired, self._expired_before(), most=DELETE_STEP_TASKS
                )
                deleted += step
                if step < DELETE_STEP_TASKS:
                    break
                await asyncio.sleep(CLEAN_UP_PAUSE_S)
        finally:  # each step is committed: counted even where a later one fails
            if deleted:
                logger.info("deleted %d tasks older than TASK_TTL", deleted)
        # A pause for other writers between steps, not a poll:
        while await self._db(self.store.return_free_pages):  # noqa: ASYNC110
            await asyncio.sleep(CLEAN_UP_PAUSE_S)

    # --- One task, one delivery ---------------------------------------------------------------

    async def _run(self, task: ClaimedTask) -> None:
        try:
            # What the run logs (the model's traceback too) names the task.
            with logs.request_id_bound(f"task:{task.id}"):
                await self._run_once(task)
        except Exception:
            # Its lease is no longer renewed: it runs out, and the task is run again (up
            # to TASK_MAX_ATTEMPTS), after a pause that a persistent fault cannot spin.
            logger.exception("running task %s failed unexpectedly; it will be retried", task.id)

    async def _run_once(self, task: ClaimedTask) -> None:
        prediction: object = None
        error: str | None = None
        try:
            prediction = await self._execute(task)
            # A result the store cannot keep as JSON (a NumPy number, a NaN from another
            # model) fails its task now, rather than failing each of its retries.
            json.dumps(prediction, allow_nan=False)
        except self._requeue_on:
            await self._until_stored(
                f"the requeue of task {task.id}", self.store.requeue, task.id, self.owner
            )
            return
        except self._retry_later_on as exc:
            attempt, allowed = task.attempts + 1, self._config.max_attempts
            if attempt < allowed:
                logger.warning(
                    "task %s: %s; it goes back to the queue in %g s (attempt %d of %d)",
                    *(task.id, _describe(exc), self._retry_pause_s, attempt, allowed),
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._retry_pause_s):
                        await self._stopped_claiming.wait()
                await self._until_stored(
                    f"the requeue of task {task.id}",
                    self.store.requeue,
                    task.id,
                    self.owner,
                    attempts=attempt,
                )
                return
            logger.warning("task %s: %s", task.id, _describe(exc))
            description = self._describe_error(exc)
            prediction, error = None, f"{description} (attempt {attempt} of {allowed})"
        except Exception as exc:
            prediction, error = None, self._describe_error(exc)
        record = await self._until_stored(
            f"the result of task {task.id}",
            self.store.finish,
            task.id,
            self.owner,
            prediction=prediction,
            error=error,
            now=time.time(),
        )
        if record is None:
            logger.warning("task %s was taken over by another worker; result dropped", task.id)
            return
        if error is not None:
            logger.warning("task %s failed: %s", task.id, error)
        self._record_finished(record)
        # The claim loop, which this run's end wakes, claims its delivery.

    def _record_finished(self, record: TaskRecord) -> None:
        assert record.finished_at is not None
        self._observer.task_finished(
            record.status is TaskStatus.SUCCEEDED, record.finished_at - record.created_at
        )

    async def _deliver(self, record: TaskRecord) -> None:
        try:
            await self._deliver_once(record)
        except Exception:
            # Its lease is no longer renewed: it runs out and the delivery is resumed.
            logger.exception("webhook for task %s failed unexpectedly; it will resume", record.id)

    async def _deliver_once(self, record: TaskRecord) -> None:
        """One attempt; after a failure that may pass, the delivery waits in the store, not
        in a slot of this worker, and is claimed again when its next attempt is due."""
        assert record.callback_url is not None
        payload: dict[str, object] = {"task_id": record.id, "status": str(record.status)}
        if record.status is TaskStatus.SUCCEEDED:
            payload["prediction"] = record.prediction
        else:
            payload["error"] = record.error
        payload["metadata"] = record.metadata

        started = time.perf_counter()
        try:
            attempt = await self._sender.attempt(
                record.callback_url,
                payload,
                attempts_done=record.webhook_attempts,
                last_cut_off=record.webhook_last_error == CUT_OFF_ERROR,
            )
        except asyncio.CancelledError:
            # Cut off as the stop's grace ran out, perhaps after the receiver had it; stored
            # as the worker hands back what it holds, in the same write.
            cut_off = self._sender.cut_off(attempts_done=record.webhook_attempts)
            assert cut_off.error is not None
            assert cut_off.retry_in_s is not None
            retry_at = time.time() + cut_off.retry_in_s
            self._cut_off.append(Deferral(record.id, cut_off.attempts, cut_off.error, retry_at))
            logger.info(
                "webhook for task %s: attempt cut off by the shutdown; next in %.1f s",
                record.id,
                cut_off.retry_in_s,
            )
            raise
        if attempt.attempts > record.webhook_attempts:
            self._observer.webhook_attempted(time.perf_counter() - started)
        await self._store_outcome(record.id, attempt)

    async def _store_outcome(self, task_id: str, attempt: Attempt) -> None:
        """The delivery's end, or its next attempt."""
        if attempt.retry_in_s is not None:
            assert attempt.error is not None  # only a failed attempt is tried again
            held = await self._until_stored(
                f"attempt {attempt.attempts} of task {task_id}'s webhook",
                self.store.defer_webhook,
                task_id,
                self.owner,
                attempts=attempt.attempts,
                error=attempt.error,
                retry_at=time.time() + attempt.retry_in_s,
            )
            if not held:
                _log_delivery_taken_over(task_id)
                return
            logger.info(
                "webhook for task %s: attempt %d failed (%s); next in %.1f s",
                task_id,
                attempt.attempts,
                attempt.error,
                attempt.retry_in_s,
            )
            return
        held = await self._until_stored(
            f"the end of task {task_id}'s webhook",
            self.store.finish_webhook,
            task_id,
            self.owner,
            delivered=attempt.delivered,
            attempts=attempt.attempts,
            error=attempt.error,
        )
        if not held:
            _log_delivery_taken_over(task_id)
            return
        self._observer.webhook_finished(attempt.delivered)
        if not attempt.delivered:
            logger.warning(
                "webhook for task %s given up after %d attempt%s: %s",
                task_id,
                attempt.attempts,
                "" if attempt.attempts == 1 else "s",
                attempt.error,
            )

    # --- Plumbing -----------------------------------------------------------------------------

    def _spawn(
        self, group: set[asyncio.Task[None]], work: Coroutine[None, None, None], task_id: str
    ) -> None:
        task = asyncio.create_task(work)
        group.add(task)
        self._holding[task] = task_id
        task.add_done_callback(partial(self._finished, group))

    def _finished(self, group: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        group.discard(task)
        self._holding.pop(task, None)
        self._wake.set()  # capacity is free again
        if not task.cancelled() and task.exception() is not None:
            logger.error("task work failed unexpectedly", exc_info=task.exception())

    async def _until_stored(
        self, what: str, function: Callable[..., T], *args: object, **kwargs: object
    ) -> T:
        """A write whose loss would redo work (a task's result, a delivery's end), retried
        while the store is locked by another process or failing. The task stays held
        meanwhile, so its lease is renewed as soon as the store can be written."""

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            assert isinstance(error, Exception)
            # With the disk full, every result fails so: counted, not a line each.
            self._loop_failures.log(
                error,
                f"storing {what} failed; it is retried until the store takes it",
                key="storing",
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((TaskStoreBusy, TaskStoreFailed)),
            wait=wait_exponential(multiplier=STORE_RETRY_FIRST_S, max=STORE_RETRY_MAX_S),
            before_sleep=log_retry,
        ):
            with attempt:
                # Shielded: cut off at the end of a stop's grace, the write still runs, on
                # the store's thread before the hand-back, so the outcome is not lost.
                writing = asyncio.ensure_future(self._db(function, *args, **kwargs))
                try:
                    written = await asyncio.shield(writing)
                except asyncio.CancelledError:
                    writing.add_done_callback(partial(_log_abandoned_write, what))
                    raise
        return written

    async def _delivery_due_within(self, seconds: float) -> bool:
        """Whether a pending delivery nobody holds is due now or within ``seconds``."""
        try:
            return await self._db(self.store.has_delivery_due_by, time.time() + seconds)
        except Exception:
            logger.warning("could not look for deliveries due before the exit", exc_info=True)
            return False

    async def _request_write(
        self, function: Callable[..., T], *args: object, **kwargs: object
    ) -> T:
        """A request's write: the write lock is waited for at most the busy timeout from
        now, however long the writes queued before it wait, and the answer for at most
        ``WRITE_ANSWER_MARGIN_S`` more (a stalled disk holds a write past any lock wait).

        Raises:
            TaskStoreFailed: The write did not finish in that time (it may yet).
        """
        self._refuse_once_stopped()  # here: ``stop`` may have begun while the caller waited
        wait_s = tasks.BUSY_TIMEOUT_MS / 1000
        deadline = time.monotonic() + wait_s
        if (due_by := self.request_writer.writes_due_by) is not None:
            deadline = min(deadline, due_by)  # the worker is stopping
        writing = asyncio.get_running_loop().run_in_executor(
            self._request_thread, partial(function, *args, lock_deadline=deadline, **kwargs)
        )
        try:
            async with asyncio.timeout(wait_s + WRITE_ANSWER_MARGIN_S):
                return await writing
        except TimeoutError:
            raise TaskStoreFailed(
                f"the task store did not answer within {wait_s + WRITE_ANSWER_MARGIN_S:g} s "
                "(the disk that holds DATA_DIR may be stalled), and may complete yet: a "
                "submission resent with the same Idempotency-Key returns its task if stored"
            ) from None

    async def _db(
        self,
        function: Callable[..., T],
        *args: object,
        on: ThreadPoolExecutor | None = None,
        **kwargs: object,
    ) -> T:
        """``function`` on the thread of its connection: ``on``, or the main one's."""
        loop = asyncio.get_running_loop()
        thread = self._db_thread if on is None else on
        try:
            return await loop.run_in_executor(thread, partial(function, *args, **kwargs))
        except (TaskStoreFailed, TaskStoreBusy):
            self._store_failed_at = time.monotonic()
            raise

    def _may_take_over(self) -> bool:
        """Whether work whose lease ran out may be taken from its holder: not until a
        lease's length after this worker's own store last failed, or waited out the busy
        timeout for the write lock. A full or failing disk fails every worker's writes, and
        a write lock held too long holds up every worker's, the holder's renewals too: once
        that passes, the holder renews and stores what it holds, where a take-over would
        run the work again."""
        return time.monotonic() - self._store_failed_at >= self._config.lease_s
