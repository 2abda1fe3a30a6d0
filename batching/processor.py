"""A generic asyncio micro-batcher: many awaiting callers, one handler call per batch."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from batching.errors import BatchFailed, BatchingError, DeadlineExceeded, QueueFull, Stopped

In = TypeVar("In")
Out = TypeVar("Out")

BatchHandler = Callable[[list[In]], Awaitable[Sequence[Out | BatchFailed]]]
BatchPreparer = Callable[[list[In]], Awaitable[None]]

logger = logging.getLogger(__name__)

# Under TIMEOUT, a batch that a waiting entry's deadline calls for starts this much before
# its expected run would have to: time for the event loop to hand it over and the answers
# back.
DEADLINE_MARGIN_S = 0.02

# When fewer than a full batch's worth of a lane's entries have time for a full batch, the
# batch is chosen among at most this many of its first entries (and of each lower lane's):
# with a million queued, a scan of all would hold the event loop for a third of a second
# per batch. No queue of the default size comes near it.
TAKE_SCAN_LIMIT = 4096


class BatchPolicy(enum.StrEnum):
    """How a batch is formed once the handler has capacity.

    ADAPTIVE dispatches whatever is waiting as soon as a batch slot is free, so a lone
    request never waits out a timer; while a batch runs, arrivals accumulate into the
    next one. TIMEOUT waits until the batch is full or its oldest item has waited
    ``max_wait_s`` (the classic size-or-timeout batcher, kept for comparison), but not past
    the moment a waiting item's deadline calls for its batch to start.
    """

    ADAPTIVE = "adaptive"
    TIMEOUT = "timeout"


class Priority(enum.IntEnum):
    """Which lane an item waits in. A batch takes every waiting INTERACTIVE item first, then
    BULK, then BACKGROUND, so work of a lower lane never delays a higher lane's by more than
    the batch already running. Whether lower lanes' items also fill the spare slots of a
    batch that holds a higher lane's is ``BatchConfig.fill_from_lower_lanes``; a lower lane
    kept waiting ``BatchConfig.lower_lane_max_wait_s`` fills them regardless."""

    INTERACTIVE = 0
    BULK = 1
    BACKGROUND = 2


_PRIORITIES = frozenset(Priority)


class Outcome(enum.StrEnum):
    """How one submitted item ended."""

    OK = "ok"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """The batcher's knobs, validated on creation.

    ``max_concurrent_batches`` above 1 lets batches overlap, for a handler that can run
    several at once (a service with one model thread keeps it at 1).

    ``max_batch_size``, ``max_queue`` and ``max_concurrent_batches`` are ints of at least 1
    (not bools, not floats: a float size would give batches of its ceiling, and NaN
    compares false with every size). ``max_wait_s`` is a finite number of seconds, at least
    0: an infinite wait would hold a lone item that has no deadline until ``stop``; a long
    finite one says so explicitly. ``lower_lane_max_wait_s`` is a number of seconds, at
    least 0; ``math.inf`` makes the lanes' order strict, letting higher lanes' traffic starve
    lower lanes for good.
    """

    max_batch_size: int = 32
    max_wait_s: float = 0.005
    max_queue: int = 256  # in each lane
    policy: BatchPolicy = BatchPolicy.ADAPTIVE
    max_concurrent_batches: int = 1
    # Where a fuller batch costs about what a small one does (GPUs), filling is free
    # throughput; where cost grows with size (CPUs), it slows the higher lane's batch.
    fill_from_lower_lanes: bool = True
    # Without filling, higher lanes' items that always wait (two interactive callers
    # sending back to back suffice) would keep lower lanes from the model for good. A lower
    # lane that has had no item in a batch for this long, while one of its items waited,
    # fills the spare slots of the next batch: slowed by higher lanes, never starved.
    lower_lane_max_wait_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_concurrent_batches"):
            _check_count(name, getattr(self, name))
        _check_seconds("max_wait_s", self.max_wait_s, finite=True)
        _check_seconds("lower_lane_max_wait_s", self.lower_lane_max_wait_s, finite=False)
        # Accept plain strings from configuration.
        object.__setattr__(self, "policy", BatchPolicy(self.policy))


def _check_count(name: str, value: object) -> None:
    # bool is a subclass of int: True would pass for 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_seconds(name: str, value: object, *, finite: bool) -> None:
    # bool is a subclass of int: True would pass for 1.
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(
            f"{name} must be a number of seconds, got {value!r} ({type(value).__name__})"
        )
    # NaN compares false with everything: ``< 0`` alone lets it through.
    if not (value >= 0 and (math.isfinite(value) or not finite)):
        raise ValueError(f"{name} must be {'finite and ' if finite else ''}>= 0, got {value}")


class BatchObserver(Protocol):
    """Receives the processor's events, for metrics. Calls must be cheap and not raise."""

    def queue_depth_changed(self, depth: int) -> None:
        """``depth`` items now wait for a batch, in every lane."""

    def batch_started(self, size: int, queue_waits_s: Sequence[tuple[Priority, float]]) -> None:
        """A batch formed, of ``size`` items: each one's lane, and how long it waited there."""

    def handler_finished(self, size: int, run_s: float, ok: bool) -> None:
        """One call of the handler ended: a batch, or a part of a failed one run again."""

    def item_finished(self, outcome: Outcome) -> None:
        """An item left the processor, ending as ``outcome`` says."""


class NullObserver:
    """An observer that ignores every event."""

    def queue_depth_changed(self, depth: int) -> None:
        pass

    def batch_started(self, size: int, queue_waits_s: Sequence[tuple[Priority, float]]) -> None:
        pass

    def handler_finished(self, size: int, run_s: float, ok: bool) -> None:
        pass

    def item_finished(self, outcome: Outcome) -> None:
        pass


class _GuardedObserver:
    """Forwards events to an observer; a failing observer is logged, never fatal.

    Metrics must not be able to stop the batching loop or strand a batch's callers.
    """

    def __init__(self, inner: BatchObserver) -> None:
        self._inner = inner
        self._failed = False

    def queue_depth_changed(self, depth: int) -> None:
        self._call(self._inner.queue_depth_changed, depth)

    def batch_started(self, size: int, queue_waits_s: Sequence[tuple[Priority, float]]) -> None:
        self._call(self._inner.batch_started, size, queue_waits_s)

    def handler_finished(self, size: int, run_s: float, ok: bool) -> None:
        self._call(self._inner.handler_finished, size, run_s, ok)

    def item_finished(self, outcome: Outcome) -> None:
        self._call(self._inner.item_finished, outcome)

    def _call(self, method: Callable[..., None], *args: object) -> None:
        try:
            method(*args)
        except (KeyboardInterrupt, SystemExit):
            # The process is asked to end (Ctrl-C's signal lands wherever the loop is).
            raise
        except BaseException:
            # Any other, CancelledError included, is the observer's own: a plain call
            # cannot be cancelled, and passed on it would strand the batch's callers.
            if not self._failed:  # once: a broken observer fails on every event
                self._failed = True
                logger.exception("batch observer failed; its later failures are not logged")


@dataclass(slots=True, eq=False, repr=False)  # an item's repr may be huge (an image)
class _Pending(Generic[In, Out]):
    """One submitted item: its payload, its caller's future and when it arrived."""

    item: In
    future: asyncio.Future[Out]
    enqueued_at: float
    deadline: float | None
    priority: Priority
    alone: bool  # runs in a batch of its own
    seq: int  # arrival order: a lane holds its entries in it
    queued: bool = True
    timer: asyncio.TimerHandle | None = None  # at the deadline
    batch_size: int | None = None  # of the handler call it is in, or was last in
    # The caller's context variables (a request id, say): what is logged about this item
    # alone is logged in them, so the line leads back to the caller.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


@dataclass(slots=True, eq=False)
class _RunningBatch(Generic[In, Out]):
    entries: list[_Pending[In, Out]]
    started_at: float
    task: asyncio.Task[None] | None = field(default=None)
    # When its handler call under way began: a failed batch is run again in parts, each a
    # call that may take as long as a batch.
    call_started_at: float = field(default=0.0)


def _resolve(future: asyncio.Future[Out], result: Out) -> None:
    # The caller may have gone away (cancelled, timed out) while the batch ran.
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Out], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _expire_at_deadline(entry: _Pending[In, Out]) -> None:
    """Fail the entry once its deadline has passed. uvloop's timers run in whole
    milliseconds and fire up to one early: one that fired before the deadline is set again."""
    assert entry.deadline is not None
    left_s = entry.deadline - time.monotonic()
    if left_s > 0:
        entry.timer = asyncio.get_running_loop().call_later(left_s, _expire_at_deadline, entry)
    else:
        entry.timer = None
        _fail(entry.future, _deadline_passed(entry))


def _deadline_passed(entry: _Pending[In, Out]) -> DeadlineExceeded:
    """The error of an entry whose deadline passed, with the size of the batch it was in,
    if any."""
    return DeadlineExceeded("the item's deadline passed before its output", entry.batch_size)


@contextlib.asynccontextmanager
async def timeout_at_deadline(deadline: float) -> AsyncIterator[None]:
    """As ``asyncio.timeout``, expiring at ``deadline`` (a ``time.monotonic()`` time) and
    never before it: uvloop's timers run in whole milliseconds and fire up to one early,
    so one that fires early is set again, as an entry's own deadline is."""
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None
    async with asyncio.timeout(None) as timeout:

        def expire_if_due() -> None:
            nonlocal timer
            left_s = deadline - time.monotonic()
            if left_s > 0:
                timer = loop.call_later(left_s, expire_if_due)
            else:
                timeout.reschedule(loop.time())  # expires now

        expire_if_due()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()


def _ends_after(entry: _Pending[In, Out], moment: float) -> bool:
    """Whether the entry's caller still waits at ``moment``."""
    return entry.deadline is None or entry.deadline >= moment


def _runs_alone(entries: list[_Pending[In, Out]]) -> bool:
    """Whether ``entries`` are an item's run alone."""
    return len(entries) == 1 and entries[0].alone


def _turn_takers(entries: list[_Pending[In, Out]]) -> list[_Pending[In, Out]]:
    """The entries whose lanes have a turn in their batch: none in an item's run alone,
    which its lane's other items must not wait a turn for each time."""
    return [] if _runs_alone(entries) else entries


def _described(error: BaseException, most: int = 300) -> str:
    """``repr(error)``, cut to ``most`` characters: a handler's error may quote a whole
    input, and a failed batch is logged again at each split."""
    try:
        text = repr(error)
    except Exception:  # a handler's own error class may fail even at that
        text = f"<{type(error).__name__} that cannot be shown>"
    return text if len(text) <= most else text[:most] + "..."


def _log_unexpected_end(batch_task: asyncio.Task[None]) -> None:
    # Only GeneratorExit from a handler, or KeyboardInterrupt or SystemExit from an
    # observer, gets this far; its callers have their answer.
    if not batch_task.cancelled() and batch_task.exception() is not None:
        logger.error("a batch ended with %r", batch_task.exception())


class _RunTimes:
    """How long the handler takes per batch size, learnt from the batches it ran.

    A moving average per size, planned with a margin for the variation seen lately (the
    mean relative deviation, shared by all sizes, twice over, as TCP pads its
    retransmission timer). A size not seen lately is interpolated between the nearest sizes
    seen, or extrapolated from them on the low side; nothing seen estimates zero, so until
    the handler has run no entry is judged too late for it. The times of a warm-up are
    never forgotten: a size not run lately is estimated from its warm-up time, if any, and
    no size is expected to run faster than a smaller one.
    """

    SMOOTHING = 0.2  # weight of the newest run: follows drift within a few batches
    DEVIATIONS = 2.0
    # A size not run for this many batches is forgotten rather than trusted: otherwise an
    # estimate too high to ever be chosen again would never be corrected.
    FORGET_AFTER_RUNS = 64
    # A run counts as at most this many times its size's mean, so one outlier (a pause, a
    # page-in) raises the mean by at most a fifth.
    MAX_STEP = 2.0
    # For a cautious estimate, the deviation assumed before runs show how much they vary:
    # twice the mean, as TCP plans before its second sample. Its weight fades as the
    # measured deviation's builds up.
    INITIAL_DEVIATION = 0.5

    def __init__(self) -> None:
        self._mean_s: dict[int, float] = {}
        self._last_run: dict[int, int] = {}
        self._runs = 0
        self._deviation = 0.0
        self._deviation_samples = 0
        # After a stream of lone batches only size 1 is still known, and a burst would be
        # expected to run as fast as one item: too late to start it, or too many taken.
        # The warm-up timed the model warm (the faster of two runs), so a size not run
        # lately falls back to it rather than to an extrapolation from smaller sizes.
        self._warm_up_s: dict[int, float] = {}
        self._known_s: dict[int, float] | None = None  # estimates' base; None: stale

    def record(self, size: int, run_s: float, *, warm_up: bool = False) -> None:
        self._runs += 1
        self._last_run[size] = self._runs
        mean_s = self._mean_s.get(size)
        if mean_s is None:
            # A size's first run (or first since it was forgotten) counts as at most
            # MAX_STEP times what the sizes around it predict, as a later run counts
            # against its mean: estimates grow with size, so one outlier would make every
            # larger size seem as slow, and no larger batch would run until it was
            # forgotten. Beyond the sizes known, extrapolations are too rough to bound it.
            expected_s = None if warm_up else self._interpolated_s(size)
            self._mean_s[size] = min(run_s, self.MAX_STEP * expected_s) if expected_s else run_s
        else:
            error = min(abs(run_s - mean_s) / mean_s, self.MAX_STEP - 1) if mean_s > 0 else 0.0
            self._deviation += self.SMOOTHING * (error - self._deviation)
            self._deviation_samples += 1
            run_s = min(run_s, self.MAX_STEP * mean_s) if mean_s > 0 else run_s
            self._mean_s[size] = mean_s + self.SMOOTHING * (run_s - mean_s)
        if warm_up:
            self._warm_up_s[size] = self._mean_s[size]
        for stale in [
            n for n, last in self._last_run.items() if self._runs - last > self.FORGET_AFTER_RUNS
        ]:
            del self._mean_s[stale], self._last_run[stale]
        self._known_s = None

    def estimate_s(self, size: int) -> float:
        return self._mean_estimate_s(size) * (1 + self.DEVIATIONS * self._deviation)

    def cautious_estimate_s(self, size: int) -> float:
        """``estimate_s``, with the deviation assumed at first where runs have not shown it
        yet: for a wait whose overrun fails every waiting entry, where starting early
        costs only a smaller batch. The first batches after a warm-up often run longer."""
        assumed = self.INITIAL_DEVIATION * (1 - self.SMOOTHING) ** self._deviation_samples
        return self._mean_estimate_s(size) * (1 + self.DEVIATIONS * (self._deviation + assumed))

    def _known(self) -> dict[int, float]:
        """The mean run time of each size run lately or timed at the warm-up, made to grow
        with size: a warm-up time below a smaller size's recent runs (the machine got
        busier) would otherwise expect the larger batch to be the faster. A warm-up time
        above a larger size's recent runs (the machine was busy at start-up) is left out:
        it would be the floor of every larger size's estimate."""
        if self._known_s is None:
            known = dict(self._mean_s)
            for size, warm_up_s in self._warm_up_s.items():
                if size not in known and all(
                    warm_up_s <= mean_s for seen, mean_s in self._mean_s.items() if seen > size
                ):
                    known[size] = warm_up_s
            slowest_s = 0.0
            for size in sorted(known):
                slowest_s = known[size] = max(slowest_s, known[size])
            self._known_s = known
        return self._known_s

    def _interpolated_s(self, size: int) -> float | None:
        """The mean estimate of ``size`` where known sizes lie on both sides of it (or it is
        known itself); None where it would be extrapolated."""
        times = self._known()
        if size in times or (min(times, default=size) < size < max(times, default=size)):
            return self._mean_estimate_s(size)
        return None

    def _mean_estimate_s(self, size: int) -> float:
        times = self._known()
        if size in times:
            return times[size]
        below = sorted(seen for seen in times if seen < size)
        above = min((seen for seen in times if seen > size), default=None)
        # Off the sizes seen, err low: an entry run in vain costs less than one left out.
        if above is None:
            if len(below) < 2:
                return times[below[-1]] if below else 0.0
            low, high = below[-2], below[-1]
            per_item_s = max(0.0, (times[high] - times[low]) / (high - low))
            return times[high] + per_item_s * (size - high)
        if not below:
            return times[above] * size / above
        low = below[-1]
        return times[low] + (size - low) / (above - low) * (times[above] - times[low])


class BatchProcessor(Generic[In, Out]):
    """Groups concurrent ``submit`` calls into batches for one async handler.

    The handler receives a list of items and must return one output per item, in order.
    A ``BatchFailed`` in place of an output fails that item alone, with it, and runs
    nothing again: for a handler that knows which items it could not serve.
    When it raises, or returns an output list of the wrong length, the batch's halves are
    handed to it again apart, down to single items, so only the items it fails on alone
    fail (with ``BatchFailed``); it must therefore be safe to call again on the same items.
    (An item whose deadline leaves no time for a half's expected run is left out of it.)
    A ``MemoryError`` on a single item is no fault of the item: its caller gets that error
    itself, to retry later (smaller batches, tried first, may have fitted).
    (``GeneratorExit``, how a coroutine is closed, fails the whole batch and is passed on.)
    A handler that raises ``Stopped`` can run nothing more: its batch fails whole with that
    error, unsplit, as no item is at fault.
    Callers that are cancelled or whose deadline passes are dropped before their batch
    forms, and a late result for them is discarded. A batch leaves out the callers whose
    deadline falls before its expected end (from the handler's recent run times at that
    size); they wait on until their deadline, and run only when none is expected in time.

    ``prepare``, when given, is awaited with the items of each handler call just before
    it, outside the time the handler is measured by (for deadlines and the observer): for
    bookkeeping that must be done before the items run, such as recording that they did.
    An error it raises fails the call as the handler's would.

    ``on_failure``, when given, is called once if the batching task itself fails (a bug),
    after the callers it held got ``Stopped``: nothing will run again, so the owner can
    stop taking work and have the process replaced.
    """

    def __init__(
        self,
        handler: BatchHandler[In, Out],
        config: BatchConfig,
        observer: BatchObserver | None = None,
        prepare: BatchPreparer[In] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._handler = handler
        self._prepare = prepare
        self._on_failure = on_failure
        self._config = config
        self._observer = _GuardedObserver(observer or NullObserver())
        # One FIFO lane per priority, indexed by ``Priority``.
        self._lanes: tuple[deque[_Pending[In, Out]], ...] = tuple(deque() for _ in Priority)
        # When each lane's latest turn began or, once its batch ended, ended.
        self._last_turn_at = [-math.inf for _ in Priority]
        # Entries whose callers left while they waited stay in their lane, marked (not
        # ``queued``), until they reach its head or make up half of it: removing each from
        # the middle of a long lane would scan it, and a storm of cancellations cost the
        # square of its length in the event loop.
        self._gone = [0 for _ in Priority]
        self._arrivals = itertools.count()
        # An item to run alone that a batch ended before: the next batch is its own.
        self._alone_next: _Pending[In, Out] | None = None
        # Whether a batch may be run early for a short deadline (``_urgent_first``): once
        # each time the model has been idle.
        self._urgent_first_allowed = True
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._running: set[_RunningBatch[In, Out]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._accepting = False
        self._run_times = _RunTimes()

    @property
    def config(self) -> BatchConfig:
        """The configuration this processor was built with."""
        return self._config

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch, in every lane (a cancelled or expired one until its
        caller has left the queue)."""
        return sum(len(lane) for lane in self._lanes) - sum(self._gone)

    def waiting(self, priority: Priority) -> int:
        """Items waiting for a batch in one priority lane."""
        return len(self._lanes[priority]) - self._gone[priority]

    @property
    def in_flight(self) -> int:
        """Items inside batches that the handler is running now."""
        return sum(len(batch.entries) for batch in self._running)

    @property
    def accepting(self) -> bool:
        """True between ``start`` and ``stop``."""
        return self._accepting

    def oldest_batch_age_s(self) -> float:
        """Seconds the longest-running handler call has been running; 0 when idle. A batch
        run again in halves after a failure counts from each call's start, not its first."""
        if not self._running:
            return 0.0
        return time.monotonic() - min(
            max(batch.started_at, batch.call_started_at) for batch in self._running
        )

    def record_run_time(self, size: int, run_s: float) -> None:
        """Tell the batcher how long the handler takes for a batch of ``size`` (timed at a
        warm-up, say), so that deadlines are judged against it from the first batch on,
        as against the run times it learns from then on. Unlike those, it is not forgotten
        when the size has not run for a while: it stands in for the size until it runs."""
        self._run_times.record(size, run_s, warm_up=True)

    def start(self) -> None:
        """Start the background batching task on the running event loop."""
        if self._loop_task is not None:
            raise RuntimeError(
                "BatchProcessor.start() called twice (a stopped processor does not start "
                "again: make a new one)"
            )
        self._accepting = True
        self._loop_task = asyncio.create_task(self._run_forever(), name="batch-processor")
        self._loop_task.add_done_callback(self._loop_ended)

    @property
    def failure(self) -> BaseException | None:
        """What ended the batching task other than ``stop``; None while it runs."""
        return self._failure

    def _loop_ended(self, loop_task: asyncio.Task[None]) -> None:
        if loop_task.cancelled() or (failure := loop_task.exception()) is None:
            return
        # A bug: nothing would ever run again. Callers get their answer now, not at their
        # deadline, and ``failure`` tells a health check to have the process restarted.
        self._failure = failure
        logger.critical("the batch processor stopped", exc_info=failure)
        self._accepting = False
        self._fail_queued(Stopped("the batch processor stopped"))
        if self._on_failure is not None:
            try:
                self._on_failure(failure)
            except Exception:
                logger.exception("the batch processor's on_failure callback failed")

    def _fail_queued(self, error: BatchingError) -> None:
        for priority, lane in zip(Priority, self._lanes, strict=True):
            while lane:
                entry = lane.popleft()
                entry.queued = False
                _fail(entry.future, error)
            self._gone[priority] = 0
        self._observer.queue_depth_changed(0)

    async def submit(
        self,
        item: In,
        *,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
        alone: bool = False,
    ) -> Out:
        """Queue ``item`` and wait for its output.

        Args:
            item: The payload handed to the handler inside a batch.
            deadline: Absolute ``time.monotonic()`` time after which the caller gives up;
                None or ``math.inf`` for none.
            priority: The lane to wait in; each lane holds at most ``max_queue`` items.
            alone: Run the item in a batch of its own: for one suspected of taking the
                process down with it (it was in the handler when the process died), so
                that should it do so again, nothing else is lost with it. A batch that
                reaches it in line ends before it, and it runs next, by itself: with
                ``max_concurrent_batches`` above 1, once the batches running have ended,
                and none starts until it has.

        Raises:
            ValueError: The deadline is NaN, or the priority is not a ``Priority``.
            QueueFull: ``max_queue`` items are already waiting in the item's lane.
            Stopped: The processor is not accepting work.
            DeadlineExceeded: The deadline passed before the output was ready.
            BatchFailed: The handler failed on this item's batch.
        """
        # NaN compares false with every time: it would pass for a future deadline, and its
        # timer would break the order of the event loop's timer heap, delaying other tasks'.
        if deadline is not None and math.isnan(deadline):
            raise ValueError(
                f"deadline must be a time.monotonic() time, math.inf or None; got {deadline!r}"
            )
        # An int that is no lane would index the wrong one (-1) or none; True and 1.0 pass
        # for 1 in a set.
        if type(priority) not in (int, Priority) or priority not in _PRIORITIES:
            raise ValueError(f"priority must be a Priority, got {priority!r}")
        priority = Priority(priority)
        if not self._accepting:
            self._observer.item_finished(Outcome.STOPPED)
            raise Stopped("the batch processor is not accepting work")
        lane = self._lanes[priority]
        if (waiting := self.waiting(priority)) >= self._config.max_queue:
            self._observer.item_finished(Outcome.REJECTED)
            raise QueueFull(
                f"{waiting} items are already waiting; max_queue allows {self._config.max_queue}"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._observer.item_finished(Outcome.EXPIRED)
            raise DeadlineExceeded("the deadline passed before the item was queued")

        entry: _Pending[In, Out] = _Pending(
            item=item,
            future=asyncio.get_running_loop().create_future(),
            enqueued_at=now,
            deadline=deadline,
            priority=priority,
            alone=alone,
            seq=next(self._arrivals),
        )
        lane.append(entry)
        self._arrived.set()
        self._observer.queue_depth_changed(self.queue_depth)

        if deadline is not None and math.isfinite(deadline):
            # A timer of its own, so it fires on time even while a long batch holds the
            # handler; awaited directly, the future is cancelled with its caller, at once.
            _expire_at_deadline(entry)
        outcome = Outcome.FAILED
        try:
            result = await entry.future
            outcome = Outcome.OK
            return result
        except DeadlineExceeded:
            outcome = Outcome.EXPIRED
            raise
        except asyncio.CancelledError:
            # Once stopping, the server's own cancellation of what is still open may come
            # before the stop fails the entry (an event loop late by a tenth of a second).
            outcome = Outcome.CANCELLED if self._accepting else Outcome.STOPPED
            raise
        except Stopped:
            outcome = Outcome.STOPPED
            raise
        finally:
            if entry.timer is not None:
                entry.timer.cancel()
            if not entry.future.done():
                entry.future.cancel()
            self._discard(entry)
            self._observer.item_finished(outcome)

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting, finish queued and running work, then fail what remains.

        Args:
            drain_timeout_s: Upper bound on the time spent finishing outstanding work.
        """
        self._accepting = False
        # Wake a collector waiting on a timer so the timeout policy dispatches at once.
        self._arrived.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout_s):
                await self._wait_until_drained()

        if self._loop_task is not None and not self._loop_task.done():  # done: see failure
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        stopped = Stopped("the batch processor stopped")
        self._fail_queued(stopped)
        for batch in list(self._running):
            for entry in batch.entries:
                _fail(entry.future, stopped)
            if batch.task is not None:
                batch.task.cancel()
        tasks = [batch.task for batch in self._running if batch.task is not None]
        if tasks:
            # A handler stuck in a thread cannot be interrupted; do not wait on it forever.
            await asyncio.wait(tasks, timeout=1.0)

    async def _wait_until_drained(self) -> None:
        while self.queue_depth or self._running:
            tasks = [batch.task for batch in self._running if batch.task is not None]
            if tasks:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            else:
                # Items are queued and a slot is free: the collector is about to take them.
                await asyncio.sleep(0.001)

    def _discard(self, entry: _Pending[In, Out]) -> None:
        if not entry.queued:
            return  # already taken into a batch
        entry.queued = False
        # Its payload (an image) is held until the entry leaves the lane; nothing reads it.
        del entry.item, entry.context
        self._gone[entry.priority] += 1
        self._drop_gone(entry.priority)
        self._observer.queue_depth_changed(self.queue_depth)

    def _drop_gone(self, priority: Priority) -> None:
        """Take out of the lane the gone entries at its head, or all once they are half of
        it: every lane's head is then a waiting entry, and gone ones cost at most one pass
        each over the lane."""
        lane = self._lanes[priority]
        if 2 * self._gone[priority] > len(lane):
            waiting = [entry for entry in lane if entry.queued]
            lane.clear()
            lane.extend(waiting)
            self._gone[priority] = 0
        while lane and not lane[0].queued:
            lane.popleft()
            self._gone[priority] -= 1

    async def _run_forever(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                await self._alone_ended()
                entries = await self._collect_batch()
            except BaseException:
                self._slots.release()
                raise
            batch: _RunningBatch[In, Out] = _RunningBatch(entries, time.monotonic())
            self._running.add(batch)
            batch.task = asyncio.create_task(self._run_batch(batch))
            batch.task.add_done_callback(_log_unexpected_end)
            # Not kept while the next batch is awaited: its items (images) are freed once
            # answered, not when another batch comes.
            del batch, entries

    async def _alone_ended(self) -> None:
        """Wait while an item runs alone: with slots for more batches, none starts beside it."""
        while alone := [b.task for b in self._running if b.task and _runs_alone(b.entries)]:
            await asyncio.wait(alone)

    async def _others_ended(self, batch: _RunningBatch[In, Out]) -> None:
        """Wait for every batch running beside ``batch`` to end."""
        while others := [b.task for b in self._running if b.task and b is not batch]:
            await asyncio.wait(others)

    async def _collect_batch(self) -> list[_Pending[In, Out]]:
        while True:
            while not self.queue_depth:
                # An idle model has time to spare for a batch run early (``_urgent_first``).
                self._urgent_first_allowed = True
                self._arrived.clear()
                await self._arrived.wait()
            # A lane holds at most max_queue: past that, waiting for a fuller batch would only
            # refuse arrivals while the model idles.
            fills_at = min(self._config.max_batch_size, self._config.max_queue)
            if (
                self._config.policy is BatchPolicy.TIMEOUT
                and self._accepting
                and self.queue_depth < fills_at
                and not self._alone_leads()
            ):
                now = time.monotonic()
                oldest_s = min(lane[0].enqueued_at for lane in self._lanes if lane)
                # The timer gives way to the first deadline among the waiting entries.
                remaining_s = min(
                    self._config.max_wait_s - (now - oldest_s), self._latest_start() - now
                )
                if remaining_s > 0:
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining_s):
                            await self._arrived.wait()
                    continue
            entries = self._take(self._config.max_batch_size)
            if entries:
                return entries

    def _latest_start(self) -> float:
        """When a batch of what waits must start for its expected run to end before the
        first of the waiting entries' deadlines."""
        # Only the entries the next batch would take: a scan of all would cost each batch
        # the whole queue, and a deeper entry's deadline call for a batch it is not in.
        upcoming = itertools.islice(
            (e for lane in self._lanes for e in lane if e.queued and not e.future.done()),
            self._config.max_batch_size,
        )
        deadlines = [entry.deadline for entry in upcoming if entry.deadline is not None]
        if not deadlines:
            return math.inf
        size = min(self.queue_depth, self._config.max_batch_size)
        return min(deadlines) - self._run_times.cautious_estimate_s(size) - DEADLINE_MARGIN_S

    def _take(self, limit: int) -> list[_Pending[In, Out]]:
        now = time.monotonic()
        if (lone := self._take_alone_next(now)) is not None:
            entries = [lone]
        else:
            entries = self._isolate(self._take_first(limit, now))
            if not self._all_in_time(entries, now):
                self._alone_next = None  # that batch is not run: nothing ended before it
                self._put_back(entries)
                entries = self._isolate(self._take_in_time(limit, now))
            entries = self._urgent_first(entries, limit, now)
        for entry in _turn_takers(entries):
            self._last_turn_at[entry.priority] = now
        for priority in Priority:
            self._drop_gone(priority)
        self._observer.queue_depth_changed(self.queue_depth)
        return entries

    def _isolate(self, entries: list[_Pending[In, Out]]) -> list[_Pending[In, Out]]:
        """The batch ``entries`` make once an entry to run alone is kept apart: by itself if
        it comes first; else the batch ends before it, and it goes next. What is left out
        goes back."""
        first_alone = next((i for i, entry in enumerate(entries) if entry.alone), None)
        if first_alone is None or len(entries) == 1:
            return entries
        if first_alone == 0:
            self._put_back(entries[1:])
            return entries[:1]
        self._alone_next = entries[first_alone]
        self._put_back(entries[first_alone:])
        return entries[:first_alone]

    def _take_alone_next(self, now: float) -> _Pending[In, Out] | None:
        """The entry a batch ended before, out of its lane, if its caller still waits."""
        entry, self._alone_next = self._alone_next, None
        if entry is None or not entry.queued or not self._still_wanted_at(entry, now):
            return None  # one that expired was failed, and its caller takes it out
        entry.queued = False
        self._lanes[entry.priority].remove(entry)
        return entry

    def _alone_leads(self) -> bool:
        """Whether the next batch is an item's to run alone: no timer can fill it."""
        if self._alone_next is not None and self._alone_next.queued:
            return True
        head = next((lane[0] for lane in self._lanes if lane), None)
        return head is not None and head.alone

    def _put_back(self, entries: list[_Pending[In, Out]]) -> None:
        """Return entries taken out of their lanes to where they were. They come from near
        the heads, so only the entries ahead of them are moved."""
        for priority, lane in zip(Priority, self._lanes, strict=True):
            returning = [entry for entry in entries if entry.priority == priority]
            if not returning:
                continue
            last = max(entry.seq for entry in returning)
            ahead = []
            while lane and lane[0].seq < last:
                ahead.append(lane.popleft())
            for entry in returning:
                entry.queued = True
            lane.extendleft(sorted(ahead + returning, key=lambda e: e.seq, reverse=True))

    def _may_fill(self, priority: Priority, now: float) -> bool:
        """Whether the lane's entries may fill the spare slots of a higher lane's batch."""
        if self._config.fill_from_lower_lanes:
            return True
        lane = self._lanes[priority]
        if not lane or any(
            e.priority == priority for b in self._running for e in _turn_takers(b.entries)
        ):
            return False  # nothing waits, or the lane's turn is under way
        waiting_since = max(self._last_turn_at[priority], lane[0].enqueued_at)
        return now - waiting_since >= self._config.lower_lane_max_wait_s

    def _take_first(self, limit: int, now: float) -> list[_Pending[In, Out]]:
        """Up to ``limit`` entries in priority, then arrival, order."""
        entries: list[_Pending[In, Out]] = []
        for priority, lane in zip(Priority, self._lanes, strict=True):
            if entries and not self._may_fill(priority, now):
                continue
            while lane and len(entries) < limit:
                entry = lane.popleft()
                if not entry.queued:
                    self._gone[priority] -= 1
                    continue
                entry.queued = False
                if self._still_wanted_at(entry, now):
                    entries.append(entry)
        return entries

    def _still_wanted_at(self, entry: _Pending[In, Out], now: float) -> bool:
        """False for an entry whose caller is gone or whose deadline has passed (failed)."""
        if entry.future.done():
            return False
        if entry.deadline is not None and entry.deadline <= now:
            _fail(entry.future, _deadline_passed(entry))
            return False
        return True

    def _all_in_time(self, entries: list[_Pending[In, Out]], now: float) -> bool:
        expected_end = now + self._run_times.estimate_s(len(entries))
        return all(_ends_after(entry, expected_end) for entry in entries)

    def _take_in_time(self, limit: int, now: float) -> list[_Pending[In, Out]]:
        """The largest batch whose members all have time left for its expected run.

        Under overload the oldest entries have too little: running them would spend the
        model on answers nobody waits for, and make the entries behind them expire too.
        They stay queued, to their own deadline's timer. The first lane with entries
        decides the size, first come first served among those with time enough, so no
        entry of it is left out for a lower lane's; entries of lower lanes then fill the
        places that keep everyone in time (those that may fill, see ``_may_fill``).
        """
        priorities = [p for p in Priority if any(self._live(self._lanes[p], now))]
        if not priorities:
            return []
        enough_s = now + self._run_times.estimate_s(limit)
        scan_limit = max(TAKE_SCAN_LIMIT, limit)
        # The first ``limit`` entries with time for a full batch, or failing that every
        # entry scanned: the scan passes only the entries too late for a full batch, at the
        # head of the lane, and at most ``scan_limit`` of them.
        scanned: list[_Pending[In, Out]] = []
        candidates: list[_Pending[In, Out]] = []
        for entry in itertools.islice(self._live(self._lanes[priorities[0]], now), scan_limit):
            scanned.append(entry)
            if _ends_after(entry, enough_s):
                candidates.append(entry)
                if len(candidates) == limit:
                    break
        else:
            candidates = scanned
        chosen = self._largest_in_time(candidates, limit, now)
        if not chosen:
            # Not one is expected in time: the one with the most time left has the best
            # chance, and an estimate is no reason to leave the model idle.
            chosen = [max(candidates, key=lambda e: math.inf if e.deadline is None else e.deadline)]
        fillers = [self._lanes[p] for p in priorities[1:] if self._may_fill(p, now)]
        self._fill(chosen, fillers, limit, now, scan_limit)
        for entry in chosen:
            entry.queued = False
            self._lanes[entry.priority].remove(entry)
        return chosen

    def _urgent_first(
        self, chosen: list[_Pending[In, Out]], limit: int, now: float
    ) -> list[_Pending[In, Out]]:
        """``chosen``, or a smaller batch ahead of it for a waiting entry that would expire
        behind it: earliest deadline first, when that keeps in time every entry that
        ``chosen`` first would.

        A request with a short time limit of its own, among requests with time to spare,
        is left out of the largest batch in time and would expire waiting behind it,
        where a smaller batch led by it first serves everyone. Only while what waits in
        the lane fits in ``chosen`` and one place more, and nothing waits in a lower lane
        or to run alone: with more waiting, full batches serve the most requests, and the
        time a smaller one ahead costs would be paid by those behind and those yet to
        come. Once each time the model has been idle: each costs a batch's fixed time,
        which then comes out of time the model had to spare, where a stream of short
        deadlines would otherwise keep every batch small. And with one batch at a time
        (with more, a free slot takes the entry left out).
        """
        if (
            not chosen
            or not self._urgent_first_allowed
            or self._config.max_concurrent_batches > 1
            or self._alone_next is not None
            or any(e.alone for e in chosen)
        ):
            return chosen
        lane = self._lanes[chosen[0].priority]
        room = limit + 1 - len(chosen)
        waiting = list(itertools.islice(self._live(lane, now), room + 1))
        if (
            not waiting
            or len(waiting) > room
            or any(e.alone for e in waiting)
            # Their batches would start later too, and nothing here weighs them.
            or any(any(self._live(self._lanes[p], now)) for p in Priority if p > chosen[0].priority)
        ):
            return chosen
        estimate_s = self._run_times.estimate_s
        behind_chosen = now + estimate_s(len(chosen)) + estimate_s(1)
        deadlines = {
            e: e.deadline
            for e in waiting
            if e.deadline is not None and now + estimate_s(1) <= e.deadline < behind_chosen
        }
        if not deadlines:
            return chosen
        urgent = min(deadlines, key=deadlines.__getitem__)
        # The largest batch led by it that ends in time (a smaller one only makes the rest
        # larger): beside it, the chosen entries of the highest lanes, earliest deadline first.
        size = max(
            n
            for n in range(1, min(limit, len(chosen) + 1) + 1)
            if now + estimate_s(n) <= deadlines[urgent]
        )
        by_urgency = sorted(
            chosen, key=lambda e: (e.priority, math.inf if e.deadline is None else e.deadline)
        )
        lead = [urgent, *by_urgency[: size - 1]]
        # What waits fits in ``chosen`` and one place more: the rest, in one batch next.
        others = [e for e in waiting if e is not urgent]
        in_time_first = self._in_time_in_turn([chosen, others], now)
        in_time = self._in_time_in_turn([lead, [*by_urgency[size - 1 :], *others]], now)
        if urgent not in in_time or not in_time_first <= in_time:
            return chosen
        self._put_back(by_urgency[size - 1 :])
        urgent.queued = False
        lane.remove(urgent)
        self._urgent_first_allowed = False
        return lead

    def _in_time_in_turn(
        self, batches: list[list[_Pending[In, Out]]], now: float
    ) -> set[_Pending[In, Out]]:
        """The entries expected to end in time when ``batches`` (the empty ones left out)
        run one after another."""
        in_time: set[_Pending[In, Out]] = set()
        end = now
        for batch in filter(None, batches):
            end += self._run_times.estimate_s(len(batch))
            in_time.update(e for e in batch if _ends_after(e, end))
        return in_time

    def _fill(
        self,
        chosen: list[_Pending[In, Out]],
        lanes: list[deque[_Pending[In, Out]]],
        limit: int,
        now: float,
        scan_limit: int,
    ) -> None:
        """Add lower lanes' entries to ``chosen`` while everyone stays in time, from the
        first ``scan_limit`` of each lane."""
        fillers = itertools.chain.from_iterable(
            itertools.islice(self._live(lane, now), scan_limit) for lane in lanes
        )
        while len(chosen) < limit:
            expected_end = now + self._run_times.estimate_s(len(chosen) + 1)
            if not all(_ends_after(entry, expected_end) for entry in chosen):
                return
            filler = next((e for e in fillers if _ends_after(e, expected_end)), None)
            if filler is None:
                return
            chosen.append(filler)

    def _live(self, lane: deque[_Pending[In, Out]], now: float) -> Iterator[_Pending[In, Out]]:
        """The lane's entries still wanted, in order. One whose deadline has passed is failed
        here; its caller's task then takes it out of the lane."""
        return (entry for entry in lane if self._still_wanted_at(entry, now))

    def _largest_in_time(
        self, candidates: list[_Pending[In, Out]], limit: int, now: float
    ) -> list[_Pending[In, Out]]:
        # A batch of n fits when the entry with the n-th most time left has time for it.
        time_left_s = sorted(
            (math.inf if e.deadline is None else e.deadline - now for e in candidates),
            reverse=True,
        )
        for size in range(min(limit, len(candidates)), 0, -1):
            run_s = self._run_times.estimate_s(size)
            if time_left_s[size - 1] >= run_s:
                in_time = (e for e in candidates if _ends_after(e, now + run_s))
                return list(itertools.islice(in_time, size))
        return []

    async def _run_batch(self, batch: _RunningBatch[In, Out]) -> None:
        entries = batch.entries
        try:
            if _runs_alone(entries) and self._config.max_concurrent_batches > 1:
                # Should it take the process down again, no other batch goes with it.
                await self._others_ended(batch)
                batch.started_at = time.monotonic()
                # Its caller may have left, or its deadline passed, while it waited: one
                # suspected of taking the process down is not run for nobody.
                if not self._still_wanted(entries):
                    return
            # Inside the try: even an observer's KeyboardInterrupt answers the callers and
            # frees the slot.
            self._observer.batch_started(
                len(entries), [(e.priority, batch.started_at - e.enqueued_at) for e in entries]
            )
            await self._run_isolating_failures(batch, entries)
        except asyncio.CancelledError:
            for entry in entries:
                _fail(entry.future, Stopped("the batch processor stopped"))
            raise
        except BaseException:  # GeneratorExit: this coroutine is being closed
            for entry in entries:
                _fail(entry.future, BatchFailed("inference failed"))
            raise
        finally:
            self._running.discard(batch)
            self._slots.release()
            # A lane's turn lasts until its batch ends: one longer than
            # ``lower_lane_max_wait_s`` is no wait for a turn.
            ended = time.monotonic()
            for entry in _turn_takers(entries):
                self._last_turn_at[entry.priority] = ended

    async def _run_isolating_failures(
        self, batch: _RunningBatch[In, Out], entries: list[_Pending[In, Out]]
    ) -> None:
        """Run ``entries`` (of ``batch``) in one handler call. If it fails, run each half
        again on its own, down to single items, so that an item the handler cannot take
        fails alone rather than with everything batched beside it."""
        batch.call_started_at = time.monotonic()
        error = await self._call_handler(entries)
        if error is None:
            return
        if isinstance(error, Stopped):
            for entry in entries:
                _fail(entry.future, error)
            return
        if len(entries) == 1:
            if isinstance(error, MemoryError):
                # The machine's, not the item's: its caller may retry (and logs it).
                _fail(entries[0].future, error)
                return
            entries[0].context.run(logger.error, "batch of 1 failed", exc_info=error)
            _fail(entries[0].future, BatchFailed("inference failed", batch_size=1))
            return
        logger.warning(
            "batch of %d failed (%s); running its halves apart %s",
            len(entries),
            _described(error),
            "(they may fit)" if isinstance(error, MemoryError) else "to find the item at fault",
        )
        wanted = self._still_wanted(entries)
        half = (len(wanted) + 1) // 2
        for part in (wanted[:half], wanted[half:]):
            # Callers may have left while the first half ran. Those without time left for
            # the half's run are left out, as from a new batch: their own timers answer them.
            still_wanted = self._still_wanted(part)
            in_time = self._largest_in_time(still_wanted, len(still_wanted), time.monotonic())
            if in_time:
                await self._run_isolating_failures(batch, in_time)

    async def _call_handler(self, entries: list[_Pending[In, Out]]) -> BaseException | None:
        """Hand ``entries`` to the handler and resolve their futures; the handler's error."""
        items = [entry.item for entry in entries]
        for entry in entries:
            entry.batch_size = len(entries)
        started_at: float | None = None
        run_s = 0.0
        ok = False
        try:
            if self._prepare is not None:
                await self._prepare(items)
            started_at = time.monotonic()
            outputs = await self._handler(items)
            if len(outputs) != len(entries):
                raise RuntimeError(
                    f"batch handler returned {len(outputs)} outputs for {len(entries)} inputs"
                )
            ok = True
        except asyncio.CancelledError as error:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # The handler itself raised CancelledError (e.g. its executor future was
            # cancelled): a failed batch, not a shutdown.
            return error
        except GeneratorExit:
            raise
        except BaseException as error:
            # Even SystemExit or KeyboardInterrupt from a model's thread would otherwise
            # stop the event loop, and with it every request of this worker.
            return error
        finally:
            if started_at is not None:
                run_s = time.monotonic() - started_at
                self._observer.handler_finished(len(entries), run_s, ok)
        self._run_times.record(len(entries), run_s)
        for entry, output in zip(entries, outputs, strict=True):
            if isinstance(output, BatchFailed):
                if output.batch_size is None:
                    output.batch_size = len(entries)
                _fail(entry.future, output)
            else:
                _resolve(entry.future, output)
        return None

    def _still_wanted(self, entries: list[_Pending[In, Out]]) -> list[_Pending[In, Out]]:
        """The entries whose callers still wait; those whose deadline passed are failed."""
        now = time.monotonic()
        return [entry for entry in entries if self._still_wanted_at(entry, now)]
