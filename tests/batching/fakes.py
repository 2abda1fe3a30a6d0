"""Fakes shared by the batching tests: a gated handler, a recording observer, small waits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from batching import (
    BatchConfig,
    BatchFailed,
    BatchObserver,
    BatchProcessor,
    Outcome,
    Priority,
)

T = TypeVar("T")

# Upper bound on any single await in these tests, so a bug fails a test instead of hanging it.
GUARD_S = 5.0


def doubled(items: list[int]) -> list[int]:
    """The default fake model: every output is its own input times two."""
    return [item * 2 for item in items]


class FakeHandler:
    """A batch handler that records every batch and, while ``held``, parks each one.

    Each call gets its own gate, so a test releases batches one at a time and decides the
    order of events itself instead of sleeping.
    """

    def __init__(
        self,
        *,
        held: bool = False,
        outputs: Callable[[list[int]], Sequence[int | BatchFailed]] = doubled,
    ) -> None:
        self.held = held
        self.outputs = outputs
        self.batches: list[list[int]] = []
        self.finished = 0
        self.cancelled = 0
        self._gates: list[asyncio.Event] = []
        self._started: asyncio.Queue[list[int]] = asyncio.Queue()

    @property
    def sizes(self) -> list[int]:
        """The size of every batch the handler has received, in order."""
        return [len(batch) for batch in self.batches]

    @property
    def seen(self) -> list[int]:
        """Every item the handler has received, in order."""
        return [item for batch in self.batches for item in batch]

    async def __call__(self, items: list[int]) -> Sequence[int | BatchFailed]:
        self.batches.append(list(items))
        gate = asyncio.Event()
        if not self.held:
            gate.set()
        self._gates.append(gate)
        self._started.put_nowait(list(items))
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return self.outputs(items)

    async def next_started(self) -> list[int]:
        """Wait until the handler is entered with a batch it has not reported yet."""
        async with asyncio.timeout(GUARD_S):
            return await self._started.get()

    def release_next(self) -> None:
        """Let the oldest parked batch finish."""
        gate = next(gate for gate in self._gates if not gate.is_set())
        gate.set()

    def release_all(self) -> None:
        """Stop parking batches and let every parked one finish."""
        self.held = False
        for gate in self._gates:
            gate.set()


class TimedHandler(FakeHandler):
    """A FakeHandler whose every batch sleeps ``run_s``, plus ``per_item_s`` per item,
    as a model's forward pass takes time. Batches are recorded once they finish."""

    def __init__(self, run_s: float, per_item_s: float = 0.0) -> None:
        super().__init__()
        self.run_s = run_s
        self.per_item_s = per_item_s

    async def __call__(self, items: list[int]) -> Sequence[int]:
        await asyncio.sleep(self.run_s + self.per_item_s * len(items))
        return await super().__call__(items)


@dataclass
class RecordingObserver:
    """An observer that keeps every event it receives."""

    depths: list[int] = field(default_factory=list)
    started: list[tuple[int, list[tuple[Priority, float]]]] = field(default_factory=list)
    finished: list[tuple[int, float, bool]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def queue_depth_changed(self, depth: int) -> None:
        self.depths.append(depth)

    def batch_started(self, size: int, queue_waits_s: Sequence[tuple[Priority, float]]) -> None:
        self.started.append((size, list(queue_waits_s)))

    def handler_finished(self, size: int, run_s: float, ok: bool) -> None:
        self.finished.append((size, run_s, ok))

    def item_finished(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


@contextlib.asynccontextmanager
async def running(
    handler: FakeHandler,
    config: BatchConfig,
    observer: BatchObserver | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> AsyncIterator[BatchProcessor[int, int]]:
    """A started processor around ``handler``, stopped (and its handler released) on exit."""
    processor: BatchProcessor[int, int] = BatchProcessor(
        handler, config, observer, on_failure=on_failure
    )
    processor.start()
    try:
        yield processor
    finally:
        handler.release_all()
        await processor.stop(drain_timeout_s=GUARD_S)


async def bounded(awaitable: Awaitable[T], limit_s: float = GUARD_S) -> T:
    """Await ``awaitable``, failing with TimeoutError after ``limit_s`` instead of hanging."""
    async with asyncio.timeout(limit_s):
        return await awaitable


async def wait_until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition`` holds (a state the test waits for)."""
    async with asyncio.timeout(GUARD_S):
        # The processor offers no event for its queue depth; yielding once per loop turn
        # reaches the state in the fewest turns and never depends on wall-clock time.
        while not condition():
            await asyncio.sleep(0)


async def loop_turns(count: int) -> None:
    """Let the event loop run ``count`` turns, so every task that is ready gets to its next wait."""
    for _ in range(count):
        await asyncio.sleep(0)


def spawn(
    processor: BatchProcessor[int, int],
    *items: int,
    priority: Priority = Priority.INTERACTIVE,
) -> list[asyncio.Task[int]]:
    """Start one caller task per item."""
    return [asyncio.create_task(processor.submit(item, priority=priority)) for item in items]


async def results(tasks: Sequence[asyncio.Task[int]]) -> list[int]:
    """The outputs of ``tasks``, bounded in time."""
    async with asyncio.timeout(GUARD_S):
        return list(await asyncio.gather(*tasks))
