"""Behaviour of ``BatchProcessor``: how batches form, how callers get outputs, how it stops."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import gc
import logging
import math
import random
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
import uvloop

from batching import (
    BatchConfig,
    BatchFailed,
    BatchPolicy,
    BatchProcessor,
    DeadlineExceeded,
    NullObserver,
    Outcome,
    Priority,
    QueueFull,
    Stopped,
    timeout_at_deadline,
)
from batching import processor as processor_module
from batching.processor import _Pending, _RunningBatch, _RunTimes
from tests.batching.fakes import (
    GUARD_S,
    FakeHandler,
    RecordingObserver,
    TimedHandler,
    bounded,
    loop_turns,
    results,
    running,
    spawn,
    wait_until,
)

ADAPTIVE = BatchPolicy.ADAPTIVE
TIMEOUT = BatchPolicy.TIMEOUT


def fail_on_negative(items: list[int]) -> list[int]:
    """A fake model that fails any batch holding a negative item."""
    if any(item < 0 for item in items):
        raise RuntimeError("the fake model rejects negative items")
    return [item * 2 for item in items]


def drop_one_on_negative(items: list[int]) -> list[int]:
    """A fake model that returns one output too few for any batch holding a negative item."""
    outputs = [item * 2 for item in items]
    return outputs[:-1] if any(item < 0 for item in items) else outputs


def fail_negatives_alone(items: list[int]) -> list[int | BatchFailed]:
    """A fake model that knows which items it cannot serve, and says so in their place."""
    return [BatchFailed("a negative item") if item < 0 else item * 2 for item in items]


# --- How batches form -----------------------------------------------------------------------


async def test_timeout_policy_dispatches_a_full_batch_at_once() -> None:
    """A full batch goes to the handler at once, without waiting out ``max_wait_s``."""
    handler = FakeHandler()
    config = BatchConfig(max_batch_size=4, max_wait_s=10.0, policy=TIMEOUT)
    async with running(handler, config) as processor:
        began = time.monotonic()
        outputs = await results(spawn(processor, 1, 2, 3, 4))
        elapsed_s = time.monotonic() - began

    assert outputs == [2, 4, 6, 8]
    assert handler.batches == [[1, 2, 3, 4]]
    assert elapsed_s < 1.0  # max_wait_s is 10 s


async def test_timeout_policy_dispatches_at_once_a_batch_as_full_as_the_queue_allows() -> None:
    """With ``max_queue`` below ``max_batch_size`` the batch can grow no further: waiting
    out ``max_wait_s`` would only refuse arrivals while the handler idles."""
    handler = FakeHandler()
    config = BatchConfig(max_batch_size=4, max_queue=2, max_wait_s=10.0, policy=TIMEOUT)
    async with running(handler, config) as processor:
        began = time.monotonic()
        outputs = await results(spawn(processor, 1, 2))
        elapsed_s = time.monotonic() - began

    assert outputs == [2, 4]
    assert handler.batches == [[1, 2]]
    assert elapsed_s < 1.0  # max_wait_s is 10 s


async def test_timeout_policy_flushes_a_lone_item_after_max_wait() -> None:
    """Under TIMEOUT a lone item waits about ``max_wait_s``, then goes out alone."""
    max_wait_s = 0.3
    handler = FakeHandler()
    config = BatchConfig(max_batch_size=8, max_wait_s=max_wait_s, policy=TIMEOUT)
    async with running(handler, config) as processor:
        began = time.monotonic()
        output = await bounded(processor.submit(7))
        elapsed_s = time.monotonic() - began

    assert output == 14
    assert handler.batches == [[7]]
    assert 0.8 * max_wait_s <= elapsed_s < max_wait_s + 1.0


async def test_timeout_policy_never_waits_past_a_waiting_items_deadline() -> None:
    """The timer gives way to a deadline: an item that would expire while the batch fills
    goes out in time, with whatever waits beside it, instead of getting its 504."""
    handler = FakeHandler()
    config = BatchConfig(max_batch_size=8, max_wait_s=10.0, policy=TIMEOUT)
    async with running(handler, config) as processor:
        # Told a run takes 0.2 s, it starts the batch 0.2 s before the deadline: room for
        # a late event loop, which the bare margin would not leave.
        processor.record_run_time(2, 0.2)
        began = time.monotonic()
        patient = asyncio.create_task(processor.submit(1))
        output = await bounded(processor.submit(7, deadline=began + 1.0))
        elapsed_s = time.monotonic() - began
        assert await bounded(patient) == 2

    assert output == 14
    assert [sorted(batch) for batch in handler.batches] == [[1, 7]]
    assert 0.5 < elapsed_s < 1.0


@pytest.mark.parametrize(
    "told_s",
    [0.4, 0.15, None],
    ids=["run time told", "told less than the first run takes", "nothing run yet"],
)
async def test_a_run_time_told_before_any_batch_ran_starts_the_first_in_time(
    told_s: float | None,
) -> None:
    """Before its first batch the batcher knows no run time and takes it for none: under
    TIMEOUT it would wait until just before a deadline and answer after it. Told the run
    time (from a warm-up), it starts the batch early enough, even when the first batch runs
    longer than the warm-up did, as on a server just started."""

    async def slow(items: list[int]) -> list[int]:
        await asyncio.sleep(0.2)
        return [item * 2 for item in items]

    config = BatchConfig(max_batch_size=8, max_wait_s=10.0, policy=TIMEOUT)
    processor = BatchProcessor(slow, config)
    if told_s is not None:
        processor.record_run_time(1, told_s)
    processor.start()
    try:
        submitted = processor.submit(7, deadline=time.monotonic() + 0.8)
        if told_s is not None:
            assert await bounded(submitted) == 14
        else:
            with pytest.raises(DeadlineExceeded):
                await bounded(submitted)
    finally:
        await processor.stop(1.0)


async def test_adaptive_policy_serves_a_lone_item_without_waiting() -> None:
    """Under ADAPTIVE a lone item is dispatched at once, however large ``max_wait_s`` is."""
    handler = FakeHandler()
    config = BatchConfig(max_batch_size=8, max_wait_s=5.0, policy=ADAPTIVE)
    async with running(handler, config) as processor:
        began = time.monotonic()
        output = await bounded(processor.submit(7))
        elapsed_s = time.monotonic() - began

    assert output == 14
    assert handler.batches == [[7]]
    assert elapsed_s < 1.0  # max_wait_s is 5 s


async def test_adaptive_policy_accumulates_arrivals_into_the_next_batch() -> None:
    """Items that arrive while a batch runs all go into the next batch together."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=8)) as processor:
        first = spawn(processor, 0)
        assert await handler.next_started() == [0]
        rest = spawn(processor, 1, 2, 3, 4, 5)
        await wait_until(lambda: processor.queue_depth == 5)

        handler.release_all()
        assert await results(first + rest) == [0, 2, 4, 6, 8, 10]

    assert handler.batches == [[0], [1, 2, 3, 4, 5]]


async def test_adaptive_policy_splits_a_long_queue_into_full_batches() -> None:
    """A queue longer than ``max_batch_size`` is served in FIFO batches no larger than it."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        rest = spawn(processor, *range(1, 11))
        await wait_until(lambda: processor.queue_depth == 10)

        handler.release_all()
        await results(first + rest)

    assert handler.sizes == [1, 4, 4, 2]
    assert handler.seen == list(range(11))


async def test_each_caller_gets_its_own_output_in_order() -> None:
    """Outputs map back to their own callers, in the order the handler returned them."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=8)) as processor:
        first = spawn(processor, 100)
        await handler.next_started()
        items = random.Random(7).sample(range(1000), 20)
        rest = spawn(processor, *items)
        await wait_until(lambda: processor.queue_depth == len(items))

        handler.release_all()
        outputs = await results(rest)
        assert await results(first) == [200]

    assert outputs == [item * 2 for item in items]
    assert handler.sizes == [1, 8, 8, 4]


async def test_two_concurrent_batches_run_at_once() -> None:
    """With ``max_concurrent_batches=2`` a second batch starts while the first still runs."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=1, max_concurrent_batches=2)
    async with running(handler, config) as processor:
        tasks = spawn(processor, 1, 2, 3)
        assert await handler.next_started() == [1]
        assert await handler.next_started() == [2]
        # Both slots are taken, so the third item waits in the queue.
        await wait_until(lambda: processor.queue_depth == 1)
        assert processor.in_flight == 2
        assert handler.finished == 0

        handler.release_all()
        assert await results(tasks) == [2, 4, 6]

    assert handler.batches == [[1], [2], [3]]


async def test_in_flight_and_batch_age_follow_the_running_batch() -> None:
    """``in_flight`` and ``oldest_batch_age_s`` describe the running batch and reset after it."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig()) as processor:
        assert processor.oldest_batch_age_s() == 0.0
        task = spawn(processor, 1)
        await handler.next_started()
        assert processor.in_flight == 1
        assert processor.queue_depth == 0
        assert processor.oldest_batch_age_s() > 0.0

        handler.release_all()
        await results(task)
        assert processor.in_flight == 0
        assert processor.oldest_batch_age_s() == 0.0


async def test_a_failed_batch_run_again_in_halves_is_aged_from_each_call() -> None:
    """Each part of a failed batch is a handler call of its own, which may take as long as
    the batch: aged from the first, splitting a full batch (about three times its run time
    on a CPU) would pass for a stuck handler."""

    def fail_on_negative_once_held(items: list[int]) -> list[int]:
        if any(item < 0 for item in items):
            raise ValueError("negative")
        return [item * 2 for item in items]

    handler = FakeHandler(held=True, outputs=fail_on_negative_once_held)
    async with running(handler, BatchConfig()) as processor:
        tasks = spawn(processor, 1, -1)
        assert await handler.next_started() == [1, -1]
        await asyncio.sleep(0.5)
        handler.release_next()  # fails: its halves run one call each
        assert await handler.next_started() == [1]
        assert processor.oldest_batch_age_s() < 0.25  # the batch's age is over 0.5 s
        handler.release_all()
        outcomes = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert outcomes[0] == 2
    assert isinstance(outcomes[1], BatchFailed)


async def three_queued_behind_a_running_batch(
    processor: BatchProcessor[int, int], handler: FakeHandler
) -> tuple[list[asyncio.Task[int]], list[asyncio.Task[int]]]:
    """Item 0 parked in the handler, items 1, 2 and 3 waiting in the queue behind it."""
    first = spawn(processor, 0)
    await handler.next_started()
    queued = spawn(processor, 1, 2, 3)
    await wait_until(lambda: processor.queue_depth == 3)
    return first, queued


# --- Priority lanes --------------------------------------------------------------------------

BACKGROUND = Priority.BACKGROUND
BULK = Priority.BULK


async def test_interactive_items_go_first_and_background_fills_spare_slots() -> None:
    """A batch takes every waiting interactive item, then background items in FIFO order."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        background = spawn(processor, 100, 101, 102, 103, 104, priority=BACKGROUND)
        interactive = spawn(processor, 1, 2)
        await wait_until(lambda: processor.queue_depth == 7)
        assert processor.waiting(Priority.INTERACTIVE) == 2
        assert processor.waiting(BACKGROUND) == 5

        handler.release_all()
        await results(first + background + interactive)

    assert handler.batches == [[0], [1, 2, 100, 101], [102, 103, 104]]


async def test_without_filling_interactive_batches_take_no_background_items() -> None:
    """With ``fill_from_lower_lanes=False`` a batch holding interactive items holds only them;
    background items go in batches of their own when no interactive item waits."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=4, fill_from_lower_lanes=False)
    async with running(handler, config) as processor:
        first = spawn(processor, 100, priority=BACKGROUND)
        await handler.next_started()
        background = spawn(processor, 101, 102, 103, 104, 105, priority=BACKGROUND)
        interactive = spawn(processor, 1, 2)
        await wait_until(lambda: processor.queue_depth == 7)

        handler.release_all()
        await results(first + background + interactive)

    assert handler.batches == [[100], [1, 2], [101, 102, 103, 104], [105]]


async def test_a_lower_lane_kept_waiting_fills_the_next_batchs_spare_slots() -> None:
    """Interactive items that always wait would keep background items from the model for
    good without filling; once the background lane has waited ``lower_lane_max_wait_s``
    without a turn, its items ride in the spare slots of the next batch, behind the
    interactive ones, and the lane then waits its turn again."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=4, fill_from_lower_lanes=False, lower_lane_max_wait_s=0.5)
    async with running(handler, config) as processor:
        first = spawn(processor, 1)
        await handler.next_started()
        background = spawn(processor, *range(100, 106), priority=BACKGROUND)
        interactive = spawn(processor, 2)
        await wait_until(lambda: processor.queue_depth == 7)
        done = first
        # Each batch finishes with the next interactive item already waiting.
        for item in range(3, 6):
            handler.release_next()
            await results(done)
            assert await handler.next_started() == [item - 1]
            done, interactive = interactive, spawn(processor, item)
            await wait_until(lambda: processor.waiting(Priority.INTERACTIVE) == 1)
        await asyncio.sleep(0.55)
        handler.release_next()
        assert await handler.next_started() == [5, 100, 101, 102]
        done, interactive = interactive, spawn(processor, 6)
        await wait_until(lambda: processor.waiting(Priority.INTERACTIVE) == 1)
        handler.release_next()
        # The lane had its turn: the next batch is the interactive item's alone.
        assert await handler.next_started() == [6]
        handler.release_all()
        await results(done + interactive + background)

    assert handler.batches[-2:] == [[6], [103, 104, 105]]


async def test_a_lower_lanes_own_long_batch_is_no_wait_for_a_turn() -> None:
    """A background batch that runs longer than ``lower_lane_max_wait_s`` is the lane's
    turn, not a wait for one: the interactive item that waited behind it rides alone next,
    not in a full batch (two full batches' wait where it should be one)."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=4, fill_from_lower_lanes=False, lower_lane_max_wait_s=0.2)
    async with running(handler, config) as processor:
        background = spawn(processor, *range(100, 108), priority=BACKGROUND)
        assert await handler.next_started() == [100, 101, 102, 103]
        interactive = spawn(processor, 1)
        await wait_until(lambda: processor.waiting(Priority.INTERACTIVE) == 1)
        await asyncio.sleep(0.3)
        handler.release_next()
        assert await handler.next_started() == [1]
        handler.release_all()
        await results(background + interactive)

    assert handler.batches[-1] == [104, 105, 106, 107]


async def test_an_item_to_run_alone_has_a_batch_of_its_own_in_its_place_in_line() -> None:
    """The batch before it ends where it stands; the items behind it wait for the next."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=8)) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        before = spawn(processor, 1, 2)
        lone = asyncio.create_task(processor.submit(3, alone=True))
        after = spawn(processor, 4, 5)
        await wait_until(lambda: processor.queue_depth == 5)

        handler.release_all()
        assert await results([*first, *before, lone, *after]) == [0, 2, 4, 6, 8, 10]

    assert handler.batches == [[0], [1, 2], [3], [4, 5]]


async def test_an_item_to_run_alone_has_the_handler_to_itself_with_slots_to_spare() -> None:
    """With room for batches to overlap, an item to run alone waits for those running to
    end, and the items behind it wait for it: if it takes the process down, it goes alone."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=2, max_concurrent_batches=3)
    async with running(handler, config) as processor:
        first = spawn(processor, 1, 2)
        assert await handler.next_started() == [1, 2]
        lone = asyncio.create_task(processor.submit(100, alone=True))
        after = spawn(processor, 3, 4)
        await wait_until(lambda: processor.in_flight == 3 and processor.queue_depth == 2)
        assert handler.batches == [[1, 2]]

        handler.release_next()
        assert await handler.next_started() == [100]
        await asyncio.sleep(0.05)  # slots are free, yet nothing starts beside it
        assert handler.batches == [[1, 2], [100]]

        handler.release_all()
        assert await results([*first, lone, *after]) == [2, 4, 200, 6, 8]

    assert handler.batches == [[1, 2], [100], [3, 4]]


@pytest.mark.parametrize("gone", ["cancelled", "expired"])
async def test_an_item_to_run_alone_whose_caller_left_while_it_waited_is_not_run(
    gone: str,
) -> None:
    """Taken to run alone, it waits for the batches running beside it; a caller that left
    meanwhile (cancelled, or its deadline passed) leaves nothing to run it for."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=2, max_concurrent_batches=3)
    async with running(handler, config) as processor:
        first = spawn(processor, 1, 2)
        assert await handler.next_started() == [1, 2]
        deadline = time.monotonic() + 0.2 if gone == "expired" else None
        lone = asyncio.create_task(processor.submit(100, alone=True, deadline=deadline))
        await wait_until(lambda: processor.in_flight == 3)  # taken, waiting for [1, 2]
        if gone == "cancelled":
            lone.cancel()
        with pytest.raises(asyncio.CancelledError if gone == "cancelled" else DeadlineExceeded):
            await bounded(lone)

        handler.release_all()
        assert await results(first) == [2, 4]
        await wait_until(lambda: processor.in_flight == 0)
        assert await bounded(processor.submit(3)) == 6

    assert handler.batches == [[1, 2], [3]]


async def test_an_item_to_run_alone_in_a_lower_lane_fills_no_spare_slot() -> None:
    """Filling puts lower lanes' items beside higher lanes'; one to run alone waits until it
    leads, and the items behind it in its lane then follow in a batch of their own."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=8)) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        lone = asyncio.create_task(processor.submit(100, priority=BACKGROUND, alone=True))
        background = spawn(processor, 101, 102, priority=BACKGROUND)
        interactive = spawn(processor, 1, 2)
        await wait_until(lambda: processor.queue_depth == 5)

        handler.release_all()
        await results([*first, lone, *background, *interactive])

    assert handler.batches == [[0], [1, 2], [100], [101, 102]]


async def test_an_item_to_run_alone_holds_up_its_lane_for_one_batch_only() -> None:
    """Behind a stream of interactive items that always wait, a batch that reaches the
    item to run alone ends before it; it runs next, and its lane then fills spare slots
    again as before."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=8)) as processor:
        done = spawn(processor, 1)
        await handler.next_started()
        lone = asyncio.create_task(processor.submit(100, priority=BACKGROUND, alone=True))
        background = spawn(processor, 101, 102, priority=BACKGROUND)
        interactive = spawn(processor, 2)
        await wait_until(lambda: processor.queue_depth == 4)
        handler.release_next()
        assert await handler.next_started() == [2]
        later = spawn(processor, 3)  # arrives while the batch that ended before 100 runs
        await wait_until(lambda: processor.waiting(Priority.INTERACTIVE) == 1)
        handler.release_next()
        assert await handler.next_started() == [100]
        handler.release_next()
        assert await handler.next_started() == [3, 101, 102]
        handler.release_all()
        await results([*done, lone, *background, *interactive, *later])

    assert handler.batches == [[1], [2], [100], [3, 101, 102]]


async def test_items_run_alone_are_no_turn_of_their_lane() -> None:
    """Without filling, a lower lane rides along once it has waited its turn; the items to
    run alone at its head then go one after another, each ending the batch before it, and
    the lane's turn is not spent until its other items ride."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=8, fill_from_lower_lanes=False, lower_lane_max_wait_s=0.3)
    async with running(handler, config) as processor:
        first = spawn(processor, 1)
        await handler.next_started()
        lone = [
            asyncio.create_task(processor.submit(item, priority=BACKGROUND, alone=True))
            for item in (100, 101)
        ]
        background = spawn(processor, 102, priority=BACKGROUND)
        interactive = spawn(processor, 2)
        await wait_until(lambda: processor.queue_depth == 4)
        await asyncio.sleep(0.35)
        started = []
        for item in (3, None, 4, None, None):
            handler.release_next()
            started.append(await handler.next_started())
            if item is not None:
                interactive += spawn(processor, item)
                await wait_until(lambda: processor.waiting(Priority.INTERACTIVE) == 1)
        handler.release_all()
        await results([*first, *lone, *background, *interactive])

    assert started == [[2], [100], [3], [101], [4, 102]]


@pytest.mark.parametrize("fill", [True, False])
async def test_an_item_to_run_alone_never_goes_ahead_of_its_own_lane(fill: bool) -> None:
    """Even when its lane's turn is due at once, the items before it in line go first."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=8, fill_from_lower_lanes=fill, lower_lane_max_wait_s=0)
    async with running(handler, config) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        before = spawn(processor, 1, 2, priority=BACKGROUND)
        lone = asyncio.create_task(processor.submit(3, priority=BACKGROUND, alone=True))
        after = spawn(processor, 4, priority=BACKGROUND)
        await wait_until(lambda: processor.queue_depth == 4)

        handler.release_all()
        await results([*first, *before, lone, *after])

    assert handler.batches == [[0], [1, 2], [3], [4]]


async def test_an_item_to_run_alone_is_judged_in_time_by_a_batch_of_one() -> None:
    """A tight deadline that a full batch would miss is met by the batch of one it runs in."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        processor.record_run_time(1, 0.05)
        processor.record_run_time(4, 0.4)
        tight = asyncio.create_task(
            processor.submit(1, deadline=time.monotonic() + 0.3, alone=True)
        )
        rest = spawn(processor, *range(2, 10))
        await wait_until(lambda: processor.queue_depth == 9)

        handler.release_all()
        assert await results([*first, tight, *rest]) == [i * 2 for i in range(10)]

    assert handler.batches[:2] == [[0], [1]]


async def test_the_timeout_policy_does_not_wait_to_fill_an_item_to_run_alone() -> None:
    handler = FakeHandler()
    config = BatchConfig(max_batch_size=8, max_wait_s=10.0, policy=TIMEOUT)
    async with running(handler, config) as processor:
        began = time.monotonic()
        assert await bounded(processor.submit(7, alone=True)) == 14
        elapsed_s = time.monotonic() - began

    assert handler.batches == [[7]]
    assert elapsed_s < 1.0  # max_wait_s is 10 s


async def test_items_put_back_keep_their_places_in_line() -> None:
    """Under overload, batches leave out the items too late for them; an item to run alone
    leaves out those behind it. Each lane still serves its items in arrival order."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=4)
    async with running(handler, config) as processor:
        processor.record_run_time(1, 0.05)
        processor.record_run_time(4, 0.2)
        first = spawn(processor, 0)
        await handler.next_started()
        now = time.monotonic()
        # 1 has time for a batch of 1 only: the first batch is 2, 3, 5 (4 runs alone).
        tight = asyncio.create_task(processor.submit(1, deadline=now + 0.15))
        rest = spawn(processor, 2, 3)
        lone = asyncio.create_task(processor.submit(4, alone=True))
        last = spawn(processor, 5, 6)
        await wait_until(lambda: processor.queue_depth == 6)

        handler.release_all()
        await asyncio.gather(tight, *first, *rest, lone, *last, return_exceptions=True)

    served = [item for batch in handler.batches[1:] for item in batch]
    assert [batch for batch in handler.batches if 4 in batch] == [[4]]
    assert [item for item in served if item != 1] == [2, 3, 4, 5, 6]


async def test_strict_lane_order_starves_lower_lanes() -> None:
    """``lower_lane_max_wait_s=math.inf`` keeps the strict order: background items wait for
    as long as interactive ones do."""
    handler = FakeHandler(held=True)
    config = BatchConfig(
        max_batch_size=4, fill_from_lower_lanes=False, lower_lane_max_wait_s=math.inf
    )
    async with running(handler, config) as processor:
        first = spawn(processor, 1)
        await handler.next_started()
        background = spawn(processor, 100, priority=BACKGROUND)
        interactive = spawn(processor, 2)
        await wait_until(lambda: processor.queue_depth == 2)
        await asyncio.sleep(0.2)
        handler.release_next()
        assert await handler.next_started() == [2]
        handler.release_all()
        await results(first + interactive + background)

    assert handler.batches == [[1], [2], [100]]


async def test_the_three_lanes_go_in_order_filling_or_not() -> None:
    """Bulk items wait behind interactive ones and ahead of background ones; without
    filling, each batch holds one lane's items only."""
    for fill, expected in (
        (True, [[200], [1, 2, 10, 11], [12, 13, 100, 101], [102]]),
        (False, [[200], [1, 2], [10, 11, 12, 13], [100, 101, 102]]),
    ):
        handler = FakeHandler(held=True)
        config = BatchConfig(max_batch_size=4, fill_from_lower_lanes=fill)
        async with running(handler, config) as processor:
            first = spawn(processor, 200, priority=BACKGROUND)
            await handler.next_started()
            background = spawn(processor, 100, 101, 102, priority=BACKGROUND)
            bulk = spawn(processor, 10, 11, 12, 13, priority=Priority.BULK)
            interactive = spawn(processor, 1, 2)
            await wait_until(lambda: processor.queue_depth == 9)
            assert processor.waiting(Priority.BULK) == 4

            handler.release_all()
            await results(first + background + bulk + interactive)

        assert handler.batches == expected, fill


async def test_interactive_work_waits_at_most_the_running_batch_behind_background_work() -> None:
    """However much background work is queued, an interactive item rides the very next batch."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4, max_queue=64)) as processor:
        background = spawn(processor, *range(100, 140), priority=BACKGROUND)
        assert await handler.next_started() == [100, 101, 102, 103]
        await wait_until(lambda: processor.waiting(BACKGROUND) == 36)

        interactive = spawn(processor, 7)
        await wait_until(lambda: processor.waiting(Priority.INTERACTIVE) == 1)
        handler.release_next()
        assert await handler.next_started() == [7, 104, 105, 106]
        handler.release_next()
        assert await results(interactive) == [14]

        handler.release_all()
        await results(background)


async def test_timeout_policy_counts_background_items_towards_a_full_batch() -> None:
    """Under TIMEOUT, interactive and background items together fill a batch at once."""
    handler = FakeHandler()
    config = BatchConfig(max_batch_size=4, max_wait_s=10.0, policy=TIMEOUT)
    async with running(handler, config) as processor:
        tasks = spawn(processor, 100, 101, priority=BACKGROUND) + spawn(processor, 1, 2)
        began = time.monotonic()
        await results(tasks)
        elapsed_s = time.monotonic() - began

    assert handler.batches == [[1, 2, 100, 101]]
    assert elapsed_s < 1.0  # max_wait_s is 10 s


async def test_each_lane_has_its_own_queue_limit() -> None:
    """A full background lane does not refuse interactive work, nor the other way round."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=1, max_queue=2)
    async with running(handler, config) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        background = spawn(processor, 100, 101, priority=BACKGROUND)
        await wait_until(lambda: processor.waiting(BACKGROUND) == 2)
        with pytest.raises(QueueFull):
            await bounded(processor.submit(102, priority=BACKGROUND), limit_s=1.0)

        interactive = spawn(processor, 1, 2)
        await wait_until(lambda: processor.waiting(Priority.INTERACTIVE) == 2)
        with pytest.raises(QueueFull):
            await bounded(processor.submit(3), limit_s=1.0)

        handler.release_all()
        await results(first + background + interactive)

    assert handler.seen == [0, 1, 2, 100, 101]


async def test_a_cancelled_background_item_is_skipped() -> None:
    """Cancelling a queued background caller removes it from its lane before it runs."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        background = spawn(processor, 100, 101, priority=BACKGROUND)
        await wait_until(lambda: processor.waiting(BACKGROUND) == 2)
        background[0].cancel()
        await wait_until(lambda: processor.waiting(BACKGROUND) == 1)

        handler.release_all()
        assert await results(first + background[1:]) == [0, 202]

    assert 100 not in handler.seen


# --- Deadlines and cancellation -------------------------------------------------------------


async def test_deadline_fires_while_a_batch_runs() -> None:
    """A queued item's deadline fires on time even while a long batch holds the handler."""
    deadline_in_s = 0.2
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig()) as processor:
        first = spawn(processor, 1)
        await handler.next_started()

        began = time.monotonic()
        with pytest.raises(DeadlineExceeded) as expired:
            await bounded(processor.submit(2, deadline=began + deadline_in_s))
        elapsed_s = time.monotonic() - began

        assert 0.8 * deadline_in_s <= elapsed_s < deadline_in_s + 1.0
        assert expired.value.batch_size is None  # it never reached the handler
        assert not first[0].done()  # the batch is still held: the deadline did not wait for it
        assert processor.queue_depth == 0

        handler.release_all()
        assert await results(first) == [2]
        assert await results(spawn(processor, 3)) == [6]

    assert handler.batches == [[1], [3]]  # the expired item never reached the handler


async def test_a_deadline_that_passes_in_the_handler_names_the_batch_it_was_in() -> None:
    """So the access log tells a request that expired in the model from one that expired
    in the queue."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig()) as processor:
        deadline = time.monotonic() + 0.2
        callers = [
            asyncio.create_task(processor.submit(item, deadline=deadline)) for item in (1, 2, 3)
        ]
        await handler.next_started()
        assert handler.batches == [[1, 2, 3]]

        for caller in callers:
            with pytest.raises(DeadlineExceeded) as expired:
                await bounded(caller)
            assert expired.value.batch_size == 3


def test_run_times_fill_in_unseen_sizes_on_the_low_side() -> None:
    """Sizes not seen yet are interpolated between seen ones, scaled down below them and
    extended along the last slope above them; nothing seen estimates no time at all."""
    times = _RunTimes()
    assert times.estimate_s(4) == 0.0
    for _ in range(30):
        times.record(2, 0.2)
        times.record(6, 0.6)

    assert times.estimate_s(2) == pytest.approx(0.2)
    assert times.estimate_s(4) == pytest.approx(0.4)
    assert times.estimate_s(1) == pytest.approx(0.1)
    assert times.estimate_s(10) == pytest.approx(1.0)


def test_a_cautious_estimate_assumes_runs_vary_until_they_show_it() -> None:
    """One run timed (at a warm-up, say) says nothing of how much runs vary: a cautious
    estimate plans for twice its time, and the margin shrinks as steady runs come in."""
    times = _RunTimes()
    times.record(4, 0.1)
    assert times.estimate_s(4) == pytest.approx(0.1)
    assert times.cautious_estimate_s(4) == pytest.approx(0.2)
    for _ in range(10):
        times.record(4, 0.1)
    assert 0.1 < times.cautious_estimate_s(4) < 0.12
    for _ in range(30):
        times.record(4, 0.1)
    assert times.cautious_estimate_s(4) == pytest.approx(0.1, rel=1e-3)


async def test_under_adaptive_a_new_server_takes_what_its_warm_up_says_fits() -> None:
    """The cautious estimate is for TIMEOUT's wait only: right after start, an ADAPTIVE
    batch still takes every entry that the warm-up's run times say it can answer in time."""

    async def steady(items: list[int]) -> list[int]:
        await asyncio.sleep(0.2)
        return [item * 2 for item in items]

    processor = BatchProcessor(steady, BatchConfig(max_batch_size=8, policy=ADAPTIVE))
    processor.record_run_time(1, 0.2)
    processor.record_run_time(8, 0.2)
    processor.start()
    try:
        deadline = time.monotonic() + 0.35
        outputs = await bounded(
            asyncio.gather(
                processor.submit(1, deadline=deadline), processor.submit(2, deadline=deadline)
            )
        )
    finally:
        await processor.stop(1.0)
    assert outputs == [2, 4]


def test_run_times_that_vary_are_planned_for_their_long_side() -> None:
    """A size whose run time varies is estimated above its mean, so members chosen by a
    close margin are not lost to a batch that runs long."""
    times = _RunTimes()
    for _ in range(30):
        times.record(3, 0.1)
        times.record(3, 0.3)

    assert times.estimate_s(3) > 0.3


def test_one_outlier_moves_an_estimate_a_little_and_not_for_long() -> None:
    """A run ten times too long (a pause) raises the estimate by well under ten times, and
    runs at other sizes bring its margin back down."""
    times = _RunTimes()
    for _ in range(20):
        times.record(1, 0.1)
        times.record(8, 0.8)
    times.record(8, 8.0)
    assert times.estimate_s(8) < 1.6

    for _ in range(20):
        times.record(1, 0.1)
    assert times.estimate_s(8) < 1.1 * (0.8 * 1.2)  # the mean still remembers the outlier


def test_a_slow_first_run_of_a_size_does_not_make_every_larger_size_seem_as_slow() -> None:
    """A first batch of 3 that meets a pause (0.6 s where the warm-up's sizes 1 and 16
    predict 10 ms) would be the floor of every larger size's estimate: batches cut to 2
    under a 150 ms deadline until size 3 is forgotten. It counts as at most twice what
    the sizes around it predict, as a later run counts against its mean."""
    times = _RunTimes()
    times.record(1, 0.010, warm_up=True)
    times.record(16, 0.013, warm_up=True)
    times.record(3, 0.6)
    assert times.estimate_s(3) == pytest.approx(2 * 0.0104)
    assert times.estimate_s(16) == pytest.approx(2 * 0.0104)
    for _ in range(30):
        times.record(3, 0.6)  # a size that is that slow, run after run, is learnt
    assert times.estimate_s(3) > 0.5


def test_a_first_run_beyond_the_sizes_known_is_taken_as_it_is() -> None:
    """Above the largest size known, or below the smallest, an extrapolation is too rough
    to bound a run by (a batch of 16 takes nine times one of 1 on a CPU, and about as long
    on a GPU): the first run's time is taken as it is."""
    on_a_cpu = _RunTimes()
    on_a_cpu.record(1, 0.023)
    on_a_cpu.record(16, 0.211)
    assert on_a_cpu.estimate_s(16) == pytest.approx(0.211)
    on_a_gpu = _RunTimes()
    on_a_gpu.record(64, 0.0017)
    on_a_gpu.record(1, 0.001)  # scaled down from 64, 1 would take 0.03 ms
    assert on_a_gpu.estimate_s(1) == pytest.approx(0.001)


def test_a_size_not_run_for_long_is_forgotten() -> None:
    """An estimate too high for its size ever to be chosen again would never be corrected;
    once that size has not run for a while it is extrapolated from the sizes that did."""
    times = _RunTimes()
    times.record(16, 5.0)
    for _ in range(10):
        times.record(1, 0.1)
        times.record(2, 0.2)
    assert times.estimate_s(16) == pytest.approx(5.0)

    for _ in range(30):
        times.record(1, 0.1)
        times.record(2, 0.2)
    assert times.estimate_s(16) == pytest.approx(1.6)


def test_a_warm_up_time_stands_in_for_its_size_until_it_runs_again() -> None:
    """A warm-up's time is not forgotten: when its size has not run lately, it is estimated
    from that time, not extrapolated from the sizes that did run; when it runs again, its
    runs take over. No size is expected to run faster than a smaller one."""
    times = _RunTimes()
    times.record(1, 0.04, warm_up=True)
    times.record(16, 0.34, warm_up=True)
    for _ in range(100):
        times.record(1, 0.04)
    assert times.estimate_s(16) == pytest.approx(0.34)
    assert times.estimate_s(4) == pytest.approx(0.10)

    for _ in range(30):
        times.record(16, 0.2)
    assert times.estimate_s(16) == pytest.approx(0.2, rel=0.01)

    for _ in range(100):
        times.record(1, 0.5)  # the machine got busier than at the warm-up
    assert times.estimate_s(16) >= times.estimate_s(1)


def test_a_slow_warm_up_of_a_small_size_sets_no_floor_for_larger_ones() -> None:
    """A warm-up on a busy machine can time a batch of 1 slower than full batches run
    since. Once size 1 has not run lately, its warm-up time would be the floor of every
    larger size's estimate (batches planned ten times too slow, cut to single items under
    deadlines): the runs of a larger size contradict it, and it is left out."""
    times = _RunTimes()
    times.record(1, 0.6, warm_up=True)
    times.record(16, 0.06, warm_up=True)
    for _ in range(_RunTimes.FORGET_AFTER_RUNS + 6):
        times.record(16, 0.06)
    assert times.estimate_s(16) == pytest.approx(0.06)
    assert times.estimate_s(1) <= 0.06


def after_lone_batches(processor: BatchProcessor[int, int], unit_s: float) -> None:
    """A warm-up that timed sizes 1 and 16 (``unit_s`` per item), then more lone batches
    than a size is remembered for, as light traffic runs: size 16 has not run lately."""
    processor.record_run_time(1, unit_s)
    processor.record_run_time(16, 16 * unit_s)
    for _ in range(_RunTimes.FORGET_AFTER_RUNS + 6):
        processor._run_times.record(1, unit_s)  # as each lone batch's run is recorded


async def test_after_lone_batches_adaptive_still_takes_only_what_its_warm_up_says_fits() -> None:
    """Long after the warm-up, with only lone batches run since, a burst of 16 whose
    deadline leaves time for 8 goes out as two batches of 8. Estimated from size 1 alone,
    16 would seem to take as long as 1: all would run at once and answer after the
    deadline."""
    handler = FakeHandler()
    processor = BatchProcessor(handler, BatchConfig(max_batch_size=16, policy=ADAPTIVE))
    after_lone_batches(processor, unit_s=1.0)
    assert processor._run_times.estimate_s(16) == pytest.approx(16.0)
    processor.start()
    try:
        deadline = time.monotonic() + 8.5  # time for a batch of 8, not 9
        outputs = await bounded(
            asyncio.gather(*(processor.submit(i, deadline=deadline) for i in range(16)))
        )
    finally:
        await processor.stop(1.0)

    assert outputs == [i * 2 for i in range(16)]
    assert handler.sizes == [8, 8]


async def test_after_lone_batches_timeout_still_starts_a_burst_in_time() -> None:
    """Under TIMEOUT, a burst of 4 long after the warm-up starts early enough for a batch of
    4 (interpolated between the warm-up's 1 and 16), not for a batch of 1."""
    unit_s = 0.2
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=16, max_wait_s=10.0, policy=TIMEOUT)
    processor = BatchProcessor(handler, config)
    after_lone_batches(processor, unit_s)
    assert processor._run_times.estimate_s(4) == pytest.approx(4 * unit_s)
    processor.start()
    try:
        # Over a second before the batch of 4 must start: the burst arrives in time on a
        # busy machine too.
        deadline = time.monotonic() + 2.0
        burst = [asyncio.create_task(processor.submit(i, deadline=deadline)) for i in range(4)]
        assert await handler.next_started() == [0, 1, 2, 3]
        left_s = deadline - time.monotonic()
        handler.release_all()
        assert await results(burst) == [0, 2, 4, 6]
    finally:
        await processor.stop(1.0)

    # Planned for 4 items it starts about 0.82 s before the deadline; for 1, 0.22 s.
    assert left_s > 0.5


async def test_a_batch_leaves_out_an_item_without_time_for_it() -> None:
    """An item whose deadline falls before the end its batch would have stays out of it,
    and expires on time while the batch runs without it."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        blocker = spawn(processor, 1)
        await handler.next_started()
        expect_run_times(processor, {1: 2.0, 4: 8.0})
        # ``late`` has at most 0.5 s left, and any batch is expected to take 2 s or more.
        late = asyncio.create_task(processor.submit(2, deadline=time.monotonic() + 0.5))
        fresh = spawn(processor, 3)
        await wait_until(lambda: processor.queue_depth == 2)
        handler.release_next()

        assert await handler.next_started() == [3]
        with pytest.raises(DeadlineExceeded):
            await bounded(late)
        handler.release_all()
        assert await results(blocker + fresh) == [2, 6]

    assert handler.batches == [[1], [3]]


async def urgent_behind(
    processor: BatchProcessor[int, int],
    handler: FakeHandler,
    monkeypatch: pytest.MonkeyPatch,
    *,
    patient: Sequence[int],
    patient_deadline_s: float | None,
    urgent_deadline_s: float,
) -> tuple[list[asyncio.Task[int]], asyncio.Task[int]]:
    """Queue ``patient`` items, then 2 with a shorter deadline, behind a running batch
    of [1]; with the run times expected below, 2 has time for a batch of 3 at most."""
    blocker = spawn(processor, 1)
    await handler.next_started()
    expect_run_times(processor, {1: 1.0, 4: 4.0})
    # Kept as set: the fake's own runs, which take no time, would change them.
    monkeypatch.setattr(processor._run_times, "record", lambda *args, **kwargs: None)
    now = time.monotonic()
    deadline = None if patient_deadline_s is None else now + patient_deadline_s
    waiting = [asyncio.create_task(processor.submit(item, deadline=deadline)) for item in patient]
    urgent = asyncio.create_task(processor.submit(2, deadline=now + urgent_deadline_s))
    await wait_until(lambda: processor.queue_depth == len(patient) + 1)
    return [*blocker, *waiting], urgent


@pytest.mark.parametrize("patient", [(10, 11, 12), (10, 11, 12, 13)], ids=["3", "4"])
async def test_an_item_with_a_short_deadline_goes_first_where_the_others_have_time(
    patient: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item left out of the largest batch in time (3 items beside it fit its deadline,
    not 4), or queued behind a full batch, would expire waiting behind that batch: a
    smaller batch led by it runs first, as the items without a deadline can wait, and
    everyone is answered."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        others, urgent = await urgent_behind(
            processor,
            handler,
            monkeypatch,
            patient=patient,
            patient_deadline_s=None,
            urgent_deadline_s=3.5,
        )
        handler.release_all()
        handler.held = False

        assert await results([*others, urgent]) == [2, *(2 * item for item in patient), 4]

    assert handler.batches[:2] == [[1], [2, 10, 11]]
    assert sorted(handler.seen) == sorted([1, 2, *patient])


async def test_an_item_with_a_short_deadline_does_not_go_first_at_others_expense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run first, the item with the short deadline would push the full batch's items past
    theirs: the full batch runs first."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        others, urgent = await urgent_behind(
            processor,
            handler,
            monkeypatch,
            patient=(10, 11, 12, 13),
            patient_deadline_s=4.5,
            urgent_deadline_s=3.5,
        )
        handler.release_next()

        assert await handler.next_started() == [10, 11, 12, 13]
        handler.release_all()
        handler.held = False
        await results([*others, urgent])


async def test_under_a_deeper_queue_an_item_with_a_short_deadline_waits_its_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With more waiting than a full batch and one place more, full batches go in arrival
    order: the time a smaller one ahead costs would be paid by the items behind it, and by
    those yet to come."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        others, urgent = await urgent_behind(
            processor,
            handler,
            monkeypatch,
            patient=tuple(range(10, 15)),
            patient_deadline_s=None,
            urgent_deadline_s=3.5,
        )
        handler.release_next()

        assert await handler.next_started() == [10, 11, 12, 13]
        handler.release_all()
        handler.held = False
        assert await results([*others, urgent]) == [2, *(2 * item for item in range(10, 15)), 4]


async def test_a_batch_run_first_for_a_short_deadline_keeps_to_the_lanes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beside the item with the short deadline go the higher lane's items, not a lower
    lane's that filled the batch it replaces: no BULK item runs ahead of INTERACTIVE ones."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=4, fill_from_lower_lanes=True)
    async with running(handler, config) as processor:
        blocker = spawn(processor, 1)
        await handler.next_started()
        expect_run_times(processor, {1: 1.0, 4: 4.0})
        monkeypatch.setattr(processor._run_times, "record", lambda *args, **kwargs: None)
        now = time.monotonic()
        bulk = asyncio.create_task(processor.submit(20, deadline=now + 5.5, priority=BULK))
        patient = spawn(processor, 10, 11, 12)
        urgent = asyncio.create_task(processor.submit(2, deadline=now + 2.5))
        await wait_until(lambda: processor.queue_depth == 5)
        handler.release_all()
        handler.held = False

        assert await results([*blocker, *patient, urgent, bulk]) == [2, 20, 22, 24, 4, 40]

    assert handler.batches[1] == [2, 10]


async def test_a_batch_run_first_for_a_short_deadline_waits_for_lower_lanes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a lower lane's item waiting, the chosen batch runs as it is: a batch run first
    would delay that item's batch too, which nothing weighs (it could expire, two lost for
    one saved)."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=4, fill_from_lower_lanes=False, lower_lane_max_wait_s=60)
    async with running(handler, config) as processor:
        others, urgent = await urgent_behind(
            processor,
            handler,
            monkeypatch,
            patient=(10, 11, 12),
            patient_deadline_s=None,
            urgent_deadline_s=3.5,
        )
        bulk = asyncio.create_task(
            processor.submit(20, deadline=time.monotonic() + 10, priority=BULK)
        )
        await wait_until(lambda: processor.queue_depth == 5)
        handler.release_next()

        assert await handler.next_started() == [10, 11, 12]
        handler.release_all()
        handler.held = False
        assert await results([*others, urgent, bulk]) == [2, 20, 22, 24, 4, 40]


async def test_a_stream_of_short_deadlines_leaves_the_batches_full() -> None:
    """Two callers with a short deadline among 12 without, all in one batch's room: a batch
    run first for one of them costs a batch's fixed time, once each time the model has been
    idle. Run first each time one would expire, the batches would average about 4 items,
    and the model answer three quarters as many a second."""
    handler = TimedHandler(run_s=0.01, per_item_s=0.005)
    async with running(handler, BatchConfig(max_batch_size=16)) as processor:
        for size in (1, 16):
            processor.record_run_time(size, 0.01 + 0.005 * size)
        stop_at = time.monotonic() + 2.0

        async def client(deadline_s: float | None) -> None:
            while time.monotonic() < stop_at:
                deadline = None if deadline_s is None else time.monotonic() + deadline_s
                with contextlib.suppress(DeadlineExceeded):
                    await processor.submit(0, deadline=deadline)

        await bounded(
            asyncio.gather(*(client(None) for _ in range(12)), *(client(0.06) for _ in range(2)))
        )

    sizes = [len(batch) for batch in handler.batches]
    assert sum(sizes) / len(sizes) >= 9, sizes


async def test_when_no_item_is_expected_in_time_they_still_run_latest_deadline_first() -> None:
    """An estimate is no reason to leave the model idle: with no item expected in time, the
    one with the latest deadline runs alone, then the next; here the model is faster than
    expected, and both are answered."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        blocker = spawn(processor, 1)
        await handler.next_started()
        expect_run_times(processor, {1: 10.0})
        now = time.monotonic()
        sooner = asyncio.create_task(processor.submit(2, deadline=now + 3.0))
        later = asyncio.create_task(processor.submit(3, deadline=now + 4.0))
        await wait_until(lambda: processor.queue_depth == 2)
        handler.release_all()

        assert await results([*blocker, sooner, later]) == [2, 4, 6]

    assert handler.batches == [[1], [3], [2]]


async def test_background_items_never_take_an_interactive_items_place() -> None:
    """With background filling, an interactive item with time for a small batch is served,
    in a batch no larger than it has time for; background items do not fill the batch in
    its place."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=4, fill_from_lower_lanes=True)
    async with running(handler, config) as processor:
        blocker = spawn(processor, 1)
        await handler.next_started()
        expect_run_times(processor, {1: 0.01, 2: 50.0, 4: 100.0})
        background = spawn(processor, 10, 11, 12, priority=BACKGROUND)
        interactive = asyncio.create_task(processor.submit(2, deadline=time.monotonic() + 5.0))
        await wait_until(lambda: processor.queue_depth == 4)
        handler.release_all()

        assert await results([*blocker, interactive, *background]) == [2, 4, 20, 22, 24]

    assert handler.batches[1] == [2]


async def test_overload_with_deadlines_keeps_the_model_on_answers_callers_get() -> None:
    """Closed-loop callers, far more than the handler can serve within their deadline: the
    handler's capacity still goes to callers that get their answer in time. Serving the
    queue in arrival order would run only items about to expire, and answer almost none."""
    run_s, per_item_s, max_batch = 0.01, 0.01, 8
    capacity_per_s = max_batch / (run_s + per_item_s * max_batch)  # about 89
    duration_s, deadline_s = 2.0, 0.3
    handler = TimedHandler(run_s=run_s, per_item_s=per_item_s)
    answered = expired = 0

    async def client(stop_at: float) -> None:
        nonlocal answered, expired
        while time.monotonic() < stop_at:
            try:
                await processor.submit(0, deadline=time.monotonic() + deadline_s)
                answered += 1
            except DeadlineExceeded:
                expired += 1

    async with running(handler, BatchConfig(max_batch_size=max_batch)) as processor:
        stop_at = time.monotonic() + duration_s
        await bounded(asyncio.gather(*(client(stop_at) for _ in range(48))))

    run = len(handler.seen)
    assert expired > 0  # the load was an overload
    assert answered >= 0.5 * capacity_per_s * duration_s, (answered, expired, run)
    assert answered >= 0.8 * run, (answered, expired, run)


async def test_a_batch_from_a_huge_queue_is_chosen_from_its_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With far more entries queued than a batch takes, none with time for a full batch
    but all with time for a smaller one, forming the batch looks at a bounded head of the
    lane, not at every entry on the event loop, and still takes the largest batch in time."""
    queued = 4 * processor_module.TAKE_SCAN_LIMIT
    processor = BatchProcessor(FakeHandler(), BatchConfig(max_batch_size=32, max_queue=queued))
    # 3 s plus about 0.1 s per item: each entry below has time for 16 or so, not 32.
    processor.record_run_time(1, 3.0)
    processor.record_run_time(32, 6.0)
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    for item in range(queued):
        processor._lanes[Priority.INTERACTIVE].append(
            _Pending(
                item=item,
                future=loop.create_future(),
                enqueued_at=now,
                deadline=now + 4.5 + 0.4 * (item % 100) / 100,
                priority=Priority.INTERACTIVE,
                alone=False,
                seq=item,
            )
        )
    looked_at = 0
    ends_after = processor_module._ends_after

    def counting(entry: _Pending[int, int], moment: float) -> bool:
        nonlocal looked_at
        looked_at += 1
        return ends_after(entry, moment)

    monkeypatch.setattr(processor_module, "_ends_after", counting)

    batch = processor._take(32)

    assert 10 <= len(batch) < 32
    assert looked_at < 2 * processor_module.TAKE_SCAN_LIMIT
    assert processor.queue_depth == queued - len(batch)


async def test_a_past_deadline_raises_at_once() -> None:
    """An item whose deadline has already passed is refused without being queued."""
    handler = FakeHandler()
    observer = RecordingObserver()
    async with running(handler, BatchConfig(), observer) as processor:
        with pytest.raises(DeadlineExceeded, match="before the item was queued"):
            await bounded(processor.submit(1, deadline=time.monotonic() - 1.0), limit_s=1.0)
        assert processor.queue_depth == 0
        assert observer.depths == [], "never in the queue"
    assert handler.batches == []


async def test_an_item_whose_deadline_passed_while_the_loop_was_held_is_not_run() -> None:
    """Its own timer and the collector are woken in the same turn once the loop is free:
    the collector checks the deadline again rather than hand the model a late item."""
    handler = FakeHandler()
    async with running(handler, BatchConfig()) as processor:
        await loop_turns(3)  # the collector waits for an arrival
        late = asyncio.create_task(processor.submit(1, deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0)  # queued, and the collector woken
        time.sleep(0.1)  # noqa: ASYNC251 (the event loop held past the deadline on purpose)
        with pytest.raises(DeadlineExceeded):
            await bounded(late)
    assert handler.batches == []


async def test_an_answered_item_is_not_held_by_the_processor() -> None:
    """Its deadline's timer is cancelled, and the collector keeps no batch it handed on:
    each would hold an image's crop for as long as the deadline or the next batch."""

    class Crop:
        pass

    async def answer(items: list[Crop]) -> list[int]:
        return [1 for _ in items]

    processor: BatchProcessor[Crop, int] = BatchProcessor(answer, BatchConfig())
    processor.start()
    try:
        crop = Crop()
        held = weakref.ref(crop)
        assert await bounded(processor.submit(crop, deadline=time.monotonic() + 60)) == 1
        del crop
        await loop_turns(3)  # the batch's task ends
        gc.collect()
        assert held() is None
    finally:
        await processor.stop(1)


async def test_a_deadline_that_is_not_a_number_is_refused() -> None:
    """A NaN deadline would never count as passed, and its timer would upset the order of
    the event loop's other timers: it is refused at once, without being queued. An infinite
    deadline means none."""
    handler = FakeHandler()
    async with running(handler, BatchConfig()) as processor:
        with pytest.raises(ValueError, match=r"deadline must be .*; got nan"):
            await bounded(processor.submit(1, deadline=math.nan), limit_s=1.0)
        assert processor.queue_depth == 0
        assert await bounded(processor.submit(2, deadline=math.inf)) == 4

    assert handler.batches == [[2]]


async def test_a_priority_that_is_no_lane_is_refused() -> None:
    """-1 would index the last lane and 5 none: both, and a lane's name, are refused at
    once, without being queued; an int that is a lane's value is that lane."""
    handler = FakeHandler()
    async with running(handler, BatchConfig()) as processor:
        for priority in (-1, 5, "bulk", None, 1.0, True):
            with pytest.raises(ValueError, match=r"priority must be a Priority, got "):
                await bounded(processor.submit(1, priority=priority), limit_s=1.0)  # type: ignore[arg-type]
        assert processor.queue_depth == 0
        assert await bounded(processor.submit(2, priority=2)) == 4  # type: ignore[arg-type]

    assert handler.batches == [[2]]


async def test_a_stopped_processor_does_not_start_again() -> None:
    """``start`` after ``stop`` says to make a new processor."""
    processor: BatchProcessor[int, int] = BatchProcessor(FakeHandler(), BatchConfig())
    processor.start()
    await bounded(processor.stop(drain_timeout_s=1.0))
    with pytest.raises(RuntimeError, match=r"a stopped processor does not start again"):
        processor.start()


async def test_a_cancelled_queued_caller_is_skipped() -> None:
    """A caller cancelled while queued never reaches the handler; the others are served."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig()) as processor:
        first, (a, b, c) = await three_queued_behind_a_running_batch(processor, handler)

        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(b)
        assert processor.queue_depth == 2

        handler.release_all()
        assert await results([*first, a, c]) == [0, 2, 6]
        assert processor.queue_depth == 0

    assert handler.batches == [[0], [1, 3]]


async def test_a_caller_cancelled_as_its_batch_forms_is_skipped() -> None:
    """A caller cancelled in the same loop turn that frees the handler is left out of the batch.

    The cancel runs after the running batch finishes but before the cancelled caller's own
    task has had a turn to withdraw its item, so only the processor can leave it out.
    """
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig()) as processor:
        first, (a, b, c) = await three_queued_behind_a_running_batch(processor, handler)

        handler.release_next()
        # Runs on the next loop turn, right after the released batch completes.
        asyncio.get_running_loop().call_soon(b.cancel)
        assert await handler.next_started() == [1, 3]

        handler.release_all()
        assert await results([*first, a, c]) == [0, 2, 6]
        with pytest.raises(asyncio.CancelledError):
            await bounded(b)

    assert handler.batches == [[0], [1, 3]]


async def test_cancelling_a_caller_inside_a_running_batch_spares_the_others() -> None:
    """Cancelling one caller of a running batch leaves the batch intact for its other callers."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig()) as processor:
        first, (a, b, c) = await three_queued_behind_a_running_batch(processor, handler)
        handler.release_next()
        assert await handler.next_started() == [1, 2, 3]

        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(b)
        assert processor.in_flight == 3  # the batch keeps running with all its items

        handler.release_all()
        assert await results([*first, a, c]) == [0, 2, 6]
        assert processor.in_flight == 0


def expect_run_times(processor: BatchProcessor[int, int], run_s: dict[int, float]) -> None:
    """Have the processor expect these run times per batch size, whatever the fake takes."""
    run_times = _RunTimes()
    for size, seconds in run_s.items():
        run_times.record(size, seconds)
    processor._run_times = run_times


# --- Failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("outputs", [fail_on_negative, drop_one_on_negative])
async def test_an_item_the_handler_fails_on_fails_alone(
    outputs: Callable[[list[int]], Sequence[int]], caplog: pytest.LogCaptureFixture
) -> None:
    """A handler error, or a wrong number of outputs, sends the batch's halves back to the
    handler apart, down to single items: only the item at fault fails, with BatchFailed."""
    handler = FakeHandler(held=True, outputs=outputs)
    async with running(handler, BatchConfig()) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        batch = spawn(processor, 1, -1, 2, 3)
        await wait_until(lambda: processor.queue_depth == 4)
        handler.release_next()
        assert await handler.next_started() == [1, -1, 2, 3]
        after = spawn(processor, 4, 5)
        await wait_until(lambda: processor.queue_depth == 2)

        with caplog.at_level(logging.WARNING, logger="batching.processor"):
            handler.release_all()
            outcomes = await bounded(asyncio.gather(*batch, return_exceptions=True))
        assert [outcomes[0], *outcomes[2:]] == [2, 4, 6]
        assert isinstance(outcomes[1], BatchFailed)
        assert outcomes[1].batch_size == 1, "it failed alone, its halves run apart"
        assert "batch of 4 failed" in caplog.text
        assert "batch of 1 failed" in caplog.text

        assert await results(first + after) == [0, 8, 10]
        # The loop is still alive after the failure.
        assert await results(spawn(processor, 6)) == [12]

    assert handler.batches == [[0], [1, -1, 2, 3], [1, -1], [1], [-1], [2, 3], [4, 5], [6]]


async def test_a_batch_out_of_memory_runs_in_halves_and_a_lone_item_gets_the_memory_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Running out of memory is no item's fault: the halves of a batch that did not fit
    run (and may fit); an item that does not fit even alone gets the ``MemoryError`` itself,
    for its caller to answer "retry", not ``BatchFailed``, and no ERROR line is written
    here for it."""
    no_room = MemoryError("no room for the batch")

    def fits_two(items: list[int]) -> list[int]:
        if len(items) > 2 or 99 in items:
            raise no_room
        return [item * 2 for item in items]

    handler = FakeHandler(held=True, outputs=fits_two)
    async with running(handler, BatchConfig()) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        batch = spawn(processor, 1, 2, 3, 99)
        await wait_until(lambda: processor.queue_depth == 4)
        with caplog.at_level(logging.WARNING, logger="batching.processor"):
            handler.release_all()
            outcomes = await bounded(asyncio.gather(*batch, return_exceptions=True))
        assert outcomes[:3] == [2, 4, 6]
        assert outcomes[3] is no_room
        assert await results(first) == [0]
        assert await results(spawn(processor, 4)) == [8]

    assert handler.batches == [[0], [1, 2, 3, 99], [1, 2], [3, 99], [3], [99], [4]]
    assert (
        "batch of 4 failed (MemoryError('no room for the batch')); running its halves apart "
        "(they may fit)"
    ) in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_the_queue_depth_stays_exact_when_a_batch_skips_a_caller_that_left() -> None:
    """A batch taken past a caller that left counts it as gone: the depth would otherwise
    stay one short, in the metric and against max_queue."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=2, max_queue=5)) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        queued = spawn(processor, 1, 2, 3, 4, 5)
        await wait_until(lambda: processor.queue_depth == 5)
        queued[1].cancel()
        await asyncio.gather(queued[1], return_exceptions=True)
        handler.release_next()
        assert await handler.next_started() == [1, 3]
        assert processor.queue_depth == 2
        more = spawn(processor, 6, 7, 8)
        await wait_until(lambda: processor.queue_depth == 5)
        with pytest.raises(QueueFull):
            await bounded(processor.submit(9))
        handler.release_all()
        assert await results([*first, *queued[:1], *queued[2:], *more]) == [
            0, 2, 6, 8, 10, 12, 14, 16
        ]  # fmt: skip


async def test_callers_that_left_behind_a_waiting_one_do_not_stay_in_its_lane() -> None:
    """Removed from the head only, 200 callers gone behind one still waiting would be
    walked past at every batch, and held, until it is taken."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4, max_queue=1000)) as processor:
        first = spawn(processor, -1)
        await handler.next_started()
        kept = spawn(processor, 0)
        leaving = spawn(processor, *range(1, 201))
        await wait_until(lambda: processor.queue_depth == 201)
        for caller in leaving:
            caller.cancel()
        await asyncio.gather(*leaving, return_exceptions=True)
        assert processor.queue_depth == 1
        assert len(processor._lanes[Priority.INTERACTIVE]) <= 3
        handler.release_all()
        assert await results(first + kept) == [-2, 0]


async def test_a_failed_batch_s_halves_leave_out_callers_without_time_for_their_run() -> None:
    """As a new batch does: run again with too little time left, a caller only gets its
    504 from inside a forward pass spent on nobody. It gets it from its own timer."""
    handler = TimedHandler(run_s=0.3)
    handler.outputs = fail_on_negative
    async with running(handler, BatchConfig()) as processor:
        for _ in range(20):  # runs of 0.3 s whatever the size, as learnt from batches
            processor._run_times.record(1, 0.3)
            processor._run_times.record(2, 0.3)
        run_s = processor._run_times.estimate_s(2)
        # Time for the batch of two, not for a half after it: the batch fails at 0.3 s.
        deadline = time.monotonic() + run_s + 0.1
        tight = asyncio.create_task(processor.submit(2, deadline=deadline))
        faulty = asyncio.create_task(processor.submit(-1))
        with pytest.raises(DeadlineExceeded):
            await bounded(tight)
        assert time.monotonic() >= deadline
        with pytest.raises(BatchFailed):
            await bounded(faulty)
    assert handler.batches == [[2, -1], [-1]]


async def test_an_item_the_handler_marks_failed_fails_alone_and_nothing_runs_again() -> None:
    handler = FakeHandler(held=True, outputs=fail_negatives_alone)
    async with running(handler, BatchConfig()) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        batch = spawn(processor, 1, -1, 2)
        await wait_until(lambda: processor.queue_depth == 3)
        handler.release_all()
        outcomes = await bounded(asyncio.gather(*batch, return_exceptions=True))
        assert [outcomes[0], outcomes[2]] == [2, 4]
        assert isinstance(outcomes[1], BatchFailed)
        assert str(outcomes[1]) == "a negative item"
        assert outcomes[1].batch_size == 3, "the size of the batch it failed in"
        assert await results(first) == [0]

    assert handler.batches == [[0], [1, -1, 2]]


async def test_a_batching_task_that_dies_fails_its_callers_at_once_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug that ends the batching task would leave every caller waiting for its deadline
    and the process looking alive: they get Stopped now, and ``failure`` and ``on_failure``
    say why."""
    handler = FakeHandler(held=True)
    told: list[tuple[BaseException, int]] = []

    def on_failure(error: BaseException) -> None:
        told.append((error, processor.queue_depth))

    async with running(handler, BatchConfig(), on_failure=on_failure) as processor:
        first = spawn(processor, 1)
        await handler.next_started()
        waiting = spawn(processor, 2)
        await wait_until(lambda: processor.queue_depth == 1)
        assert processor.failure is None

        async def broken() -> list[int]:
            raise RuntimeError("bug in collecting a batch")

        processor._collect_batch = broken  # type: ignore[assignment,method-assign]
        with caplog.at_level(logging.CRITICAL, logger="batching.processor"):
            handler.release_all()
            outcomes = await bounded(asyncio.gather(*waiting, return_exceptions=True))
        assert isinstance(outcomes[0], Stopped)
        assert await results(first) == [2]
        assert isinstance(processor.failure, RuntimeError)
        assert told == [(processor.failure, 0)], "told once, with its callers answered"
        assert "the batch processor stopped" in caplog.text
        with pytest.raises(Stopped):
            await bounded(processor.submit(3))


CALLER = contextvars.ContextVar("caller", default="none")


class CallerSeen(logging.Handler):
    """Records, for each line logged, the CALLER variable seen as it was logged."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), CALLER.get()))


async def test_the_failure_of_one_item_is_logged_in_its_callers_context() -> None:
    """So that a log filter reading a context variable (a request id) ties the traceback
    to the caller it belongs to, though the batch runs in the processor's own task."""

    async def submit_as(processor: BatchProcessor[int, int], caller: str, item: int) -> int:
        CALLER.set(caller)
        return await processor.submit(item)

    handler = FakeHandler(held=True, outputs=fail_on_negative)
    seen = CallerSeen()
    batching_logger = logging.getLogger("batching.processor")
    batching_logger.addHandler(seen)
    try:
        async with running(handler, BatchConfig()) as processor:
            first = asyncio.create_task(submit_as(processor, "first", 0))
            await handler.next_started()
            calls = [
                asyncio.create_task(submit_as(processor, name, item))
                for name, item in (("good", 1), ("bad", -1))
            ]
            await wait_until(lambda: processor.queue_depth == 2)
            handler.release_all()
            outcomes = await bounded(asyncio.gather(*calls, return_exceptions=True))
            assert await bounded(first) == 0
    finally:
        batching_logger.removeHandler(seen)
    assert outcomes[0] == 2
    assert isinstance(outcomes[1], BatchFailed)
    assert ("batch of 1 failed", "bad") in seen.lines


async def test_a_handler_that_always_fails_fails_every_caller_and_keeps_the_loop() -> None:
    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("the fake model is broken")

    handler = FakeHandler(held=True, outputs=broken)
    observer = RecordingObserver()
    async with running(handler, BatchConfig(), observer) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        batch = spawn(processor, 1, 2, 3)
        await wait_until(lambda: processor.queue_depth == 3)
        handler.release_all()
        outcomes = await bounded(asyncio.gather(*first, *batch, return_exceptions=True))
        assert all(isinstance(outcome, BatchFailed) for outcome in outcomes), outcomes
        assert processor.accepting
        assert processor.in_flight == 0

    assert handler.batches == [[0], [1, 2, 3], [1, 2], [1], [2], [3]]
    # Metrics see every forward pass, those that narrowed the failure down included, as the
    # access lines of their requests do; the queue waits once per request.
    assert [(size, ok) for size, _, ok in observer.finished] == [
        (1, False),
        (3, False),
        (2, False),
        (1, False),
        (1, False),
        (1, False),
    ]
    assert [len(waits) for _, waits in observer.started] == [1, 3]
    assert Counter(observer.outcomes) == {Outcome.FAILED: 4}


async def test_a_handler_that_stopped_fails_its_batch_whole_with_that_error() -> None:
    """``Stopped`` from the handler says it can run nothing more: no item is at fault, so
    the batch is not split and run again."""
    stopped = Stopped("the device failed")

    def out_of_service(items: list[int]) -> list[int]:
        raise stopped

    handler = FakeHandler(held=True, outputs=out_of_service)
    observer = RecordingObserver()
    async with running(handler, BatchConfig(), observer) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        batch = spawn(processor, 1, 2, 3)
        await wait_until(lambda: processor.queue_depth == 3)
        handler.release_all()
        outcomes = await bounded(asyncio.gather(*first, *batch, return_exceptions=True))

    assert outcomes == [stopped] * 4
    assert handler.batches == [[0], [1, 2, 3]]
    assert Counter(observer.outcomes) == {Outcome.STOPPED: 4}


async def test_a_failed_batch_is_not_run_again_for_callers_that_left() -> None:
    """Callers cancelled, or past their deadline, while their batch failed are not retried."""
    handler = FakeHandler(held=True, outputs=fail_on_negative)
    async with running(handler, BatchConfig()) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        leaving = spawn(processor, 1)
        expiring = asyncio.create_task(processor.submit(2, deadline=time.monotonic() + 0.2))
        staying = spawn(processor, -3, 4)
        await wait_until(lambda: processor.queue_depth == 4)
        handler.release_next()
        assert await handler.next_started() == [1, 2, -3, 4]
        leaving[0].cancel()
        with pytest.raises(DeadlineExceeded):
            await bounded(expiring)
        handler.release_all()
        outcomes = await bounded(asyncio.gather(*staying, return_exceptions=True))
        assert isinstance(outcomes[0], BatchFailed)
        assert outcomes[1] == 8
        assert await results(first) == [0]

    assert handler.batches == [[0], [1, 2, -3, 4], [-3], [4]]


async def test_a_half_whose_callers_all_left_is_not_run() -> None:
    handler = FakeHandler(held=True, outputs=fail_on_negative)
    async with running(handler, BatchConfig()) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        staying = spawn(processor, 1, -2)
        expiring = asyncio.create_task(processor.submit(3, deadline=time.monotonic() + 0.2))
        await wait_until(lambda: processor.queue_depth == 3)
        handler.release_next()
        assert await handler.next_started() == [1, -2, 3]
        handler.release_next()
        assert await handler.next_started() == [1, -2]  # held while 3's deadline passes
        with pytest.raises(DeadlineExceeded):
            await bounded(expiring)
        handler.release_all()
        outcomes = await bounded(asyncio.gather(*staying, return_exceptions=True))
        assert outcomes[0] == 2
        assert isinstance(outcomes[1], BatchFailed)
        assert await results(first) == [0]

    assert handler.batches == [[0], [1, -2, 3], [1, -2], [1], [-2]]


def raising_on_negative(error: type[BaseException]) -> Callable[[list[int]], list[int]]:
    """A fake model that raises ``error`` for any batch holding a negative item."""

    def outputs(items: list[int]) -> list[int]:
        if any(item < 0 for item in items):
            raise error
        return [item * 2 for item in items]

    return outputs


async def answers_around_a_failing_batch(outputs: Callable[[list[int]], list[int]]) -> list[object]:
    """0 in a held batch, -1 and 2 queued behind it, everything released: what each caller
    got, then what 3, submitted after them, gets."""
    handler = FakeHandler(held=True, outputs=outputs)
    async with running(handler, BatchConfig()) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        batch = spawn(processor, -1, 2)
        await wait_until(lambda: processor.queue_depth == 2)
        handler.release_all()
        answers = await bounded(asyncio.gather(*first, *batch, return_exceptions=True))
        answers.append(await bounded(processor.submit(3)))
        assert processor.in_flight == 0
    return answers


async def test_a_handler_raising_generator_exit_still_answers_its_callers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GeneratorExit is how a coroutine is closed, so it is not swallowed; the batch's
    callers get their error all the same, it is logged, and batching goes on."""
    answers = await answers_around_a_failing_batch(raising_on_negative(GeneratorExit))
    assert answers[0] == 0
    assert all(isinstance(answer, BatchFailed) for answer in answers[1:3]), answers
    assert answers[3] == 6
    assert "a batch ended with GeneratorExit()" in caplog.text


class ModelThreadExit(BaseException):
    """Stands in for an error no ``except Exception`` catches."""


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, ModelThreadExit])
async def test_a_handler_raising_a_base_exception_fails_its_item_and_the_loop_goes_on(
    error: type[BaseException],
) -> None:
    """Not even SystemExit or KeyboardInterrupt from a model's thread stops the event loop,
    which would end every request of the worker; the callers are answered."""
    answers = await answers_around_a_failing_batch(raising_on_negative(error))
    assert answers[0] == 0
    assert isinstance(answers[1], BatchFailed)
    assert answers[2:] == [4, 6]


class Unshowable(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("a repr that fails")


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (ValueError("x" * 1_000_000), "ValueError('" + "x" * 288 + "..."),
        (Unshowable(), "<Unshowable that cannot be shown>"),
    ],
    ids=["a message of a megabyte", "a repr that fails"],
)
async def test_a_failed_batch_is_logged_short_at_each_split(
    caplog: pytest.LogCaptureFixture, error: Exception, shown: str
) -> None:
    """A handler's error may quote a whole input: each split logs it cut short, where
    logged whole it would repeat the input at every split."""

    def outputs(items: list[int]) -> list[int]:
        if any(item < 0 for item in items):
            raise error
        return [item * 2 for item in items]

    answers = await answers_around_a_failing_batch(outputs)
    assert answers[2:] == [4, 6]
    [split] = [r.getMessage() for r in caplog.records if "running its halves" in r.getMessage()]
    assert split == (
        f"batch of 2 failed ({shown}); running its halves apart to find the item at fault"
    )


async def test_a_full_queue_rejects_at_once() -> None:
    """With ``max_queue`` items waiting, one more submit raises QueueFull without waiting."""
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=1, max_queue=3)
    async with running(handler, config) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        queued = spawn(processor, 1, 2, 3)
        await wait_until(lambda: processor.queue_depth == 3)

        began = time.monotonic()
        with pytest.raises(QueueFull, match="max_queue allows 3"):
            await bounded(processor.submit(4), limit_s=1.0)
        assert time.monotonic() - began < 0.5
        assert processor.queue_depth == 3

        handler.release_all()
        assert await results(first + queued) == [0, 2, 4, 6]
        # Once the queue has drained, new work is accepted again.
        assert await results(spawn(processor, 5)) == [10]

    assert 4 not in handler.seen


# --- Lifecycle -------------------------------------------------------------------------------


async def test_submit_before_start_raises_stopped() -> None:
    """A processor that was never started refuses work."""
    handler = FakeHandler()
    processor: BatchProcessor[int, int] = BatchProcessor(handler, BatchConfig())
    assert not processor.accepting
    with pytest.raises(Stopped):
        await bounded(processor.submit(1))
    assert handler.batches == []


async def test_submit_after_stop_raises_stopped() -> None:
    """A stopped processor refuses work."""
    handler = FakeHandler()
    processor: BatchProcessor[int, int] = BatchProcessor(handler, BatchConfig())
    processor.start()
    assert processor.accepting
    assert await results(spawn(processor, 1)) == [2]
    await bounded(processor.stop(drain_timeout_s=1.0))

    assert not processor.accepting
    with pytest.raises(Stopped):
        await bounded(processor.submit(2))
    assert handler.batches == [[1]]


async def test_start_twice_is_an_error() -> None:
    """Starting a running processor again is a programming error, not a silent no-op."""
    async with running(FakeHandler(), BatchConfig()) as processor:
        with pytest.raises(RuntimeError, match="twice"):
            processor.start()


async def test_stop_drains_queued_and_in_flight_work() -> None:
    """``stop`` refuses new work but finishes what is queued and running when it can."""
    handler = FakeHandler(held=True)
    processor: BatchProcessor[int, int] = BatchProcessor(handler, BatchConfig(max_batch_size=2))
    processor.start()
    first = spawn(processor, 0)
    await handler.next_started()
    queued = spawn(processor, 1, 2, 3)
    await wait_until(lambda: processor.queue_depth == 3)

    began = time.monotonic()
    stopping = asyncio.create_task(processor.stop(drain_timeout_s=GUARD_S))
    await wait_until(lambda: not processor.accepting)
    with pytest.raises(Stopped):
        await bounded(processor.submit(4))

    handler.release_all()
    assert await results(first + queued) == [0, 2, 4, 6]
    await bounded(stopping)
    assert time.monotonic() - began < GUARD_S - 1.0  # it did not wait out the drain timeout
    assert handler.batches == [[0], [1, 2], [3]]
    assert processor.queue_depth == 0
    assert processor.in_flight == 0


async def test_stop_fails_outstanding_callers_when_the_handler_never_finishes() -> None:
    """After ``drain_timeout_s`` every queued and in-flight caller gets Stopped; none hangs."""
    drain_timeout_s = 0.3
    handler = FakeHandler(held=True)  # never released
    processor: BatchProcessor[int, int] = BatchProcessor(handler, BatchConfig())
    processor.start()
    in_flight = spawn(processor, 0)
    await handler.next_started()
    queued = spawn(processor, 1, 2)
    await wait_until(lambda: processor.queue_depth == 2)

    began = time.monotonic()
    await bounded(processor.stop(drain_timeout_s=drain_timeout_s))
    elapsed_s = time.monotonic() - began

    assert 0.8 * drain_timeout_s <= elapsed_s < drain_timeout_s + 1.5
    outcomes = await bounded(asyncio.gather(*in_flight, *queued, return_exceptions=True))
    assert all(isinstance(outcome, Stopped) for outcome in outcomes), outcomes
    assert handler.cancelled == 1  # the stuck batch was cancelled, not left running
    assert processor.queue_depth == 0
    assert processor.in_flight == 0


async def test_callers_cancelled_while_the_processor_stops_count_as_stopped() -> None:
    """The server's own cancellation of its open requests can come before the stop fails
    them: cancelled once the processor stopped accepting, they were stopped, not callers
    that left."""
    handler = FakeHandler(held=True)
    observer = RecordingObserver()
    processor: BatchProcessor[int, int] = BatchProcessor(handler, BatchConfig(), observer)
    processor.start()
    running = spawn(processor, 0)
    await handler.next_started()
    queued = spawn(processor, 1)
    await wait_until(lambda: processor.queue_depth == 1)
    leaving = spawn(processor, 2)
    await wait_until(lambda: processor.queue_depth == 2)
    leaving[0].cancel()  # a caller that leaves while the processor serves
    await asyncio.gather(*leaving, return_exceptions=True)

    stopping = asyncio.create_task(processor.stop(drain_timeout_s=10))
    await wait_until(lambda: not processor.accepting)
    for caller in (*running, *queued):
        caller.cancel()  # as the server cuts its open requests off
    await asyncio.gather(*running, *queued, return_exceptions=True)
    handler.release_all()
    await bounded(stopping)
    assert Counter(observer.outcomes) == {Outcome.CANCELLED: 1, Outcome.STOPPED: 2}


async def test_stop_does_not_wait_on_a_handler_that_ignores_cancellation() -> None:
    """A handler that cannot be interrupted (stuck in a thread) does not hold ``stop`` or its
    callers hostage: they get Stopped, and ``stop`` returns after a bounded extra wait.
    """
    drain_timeout_s = 0.2
    release = asyncio.Event()
    returned = asyncio.Event()

    async def stubborn(items: list[int]) -> list[int]:
        while not release.is_set():
            # Swallowing cancellation is what a handler blocked in a worker thread amounts to.
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        returned.set()
        return [item * 2 for item in items]

    processor: BatchProcessor[int, int] = BatchProcessor(stubborn, BatchConfig())
    processor.start()
    in_flight = spawn(processor, 0)
    await wait_until(lambda: processor.in_flight == 1)
    queued = spawn(processor, 1)
    await wait_until(lambda: processor.queue_depth == 1)

    try:
        began = time.monotonic()
        await bounded(processor.stop(drain_timeout_s=drain_timeout_s))
        assert time.monotonic() - began < drain_timeout_s + 2.5

        callers = in_flight + queued
        assert all(task.done() for task in callers)  # none waits for the handler to give up
        for task in callers:
            with pytest.raises(Stopped):
                task.result()
    finally:
        release.set()  # let the stuck handler end, so no task outlives the test
        await bounded(returned.wait())
        await bounded(asyncio.gather(*in_flight, *queued, return_exceptions=True))
    await wait_until(lambda: processor.in_flight == 0)


async def test_timeout_policy_dispatches_queued_items_at_stop() -> None:
    """Under TIMEOUT, ``stop`` sends a partial batch at once instead of waiting out the timer."""
    handler = FakeHandler()
    config = BatchConfig(max_batch_size=8, max_wait_s=10.0, policy=TIMEOUT)
    processor: BatchProcessor[int, int] = BatchProcessor(handler, config)
    processor.start()
    tasks = spawn(processor, 1, 2)
    await wait_until(lambda: processor.queue_depth == 2)
    await loop_turns(3)  # the collector is now waiting on its max_wait timer

    began = time.monotonic()
    await bounded(processor.stop(drain_timeout_s=GUARD_S))
    assert time.monotonic() - began < 1.0  # max_wait_s is 10 s

    assert await results(tasks) == [2, 4]
    assert handler.batches == [[1, 2]]


# --- Observer ---------------------------------------------------------------------------------


async def test_observer_sees_queue_depth_and_batches() -> None:
    """The observer gets every depth change, each batch's size, each item's lane and queue
    wait, and its result."""
    observer = RecordingObserver()
    handler = FakeHandler(held=True, outputs=fail_on_negative)
    async with running(handler, BatchConfig(), observer) as processor:
        first = spawn(processor, 0)
        await handler.next_started()
        queued = spawn(processor, 1) + spawn(processor, 2, priority=Priority.BACKGROUND)
        await wait_until(lambda: processor.queue_depth == 2)
        # Let the queued items wait a measurable time before they are taken.
        await asyncio.sleep(0.05)
        handler.release_all()
        assert await results(first + queued) == [0, 2, 4]
        with pytest.raises(BatchFailed):
            await bounded(processor.submit(-1))

    assert [size for size, _ in observer.started] == [1, 2, 1]
    for size, waits_s in observer.started:
        assert len(waits_s) == size
        assert all(wait_s >= 0.0 for _, wait_s in waits_s)
    lanes = [lane for _, waits_s in observer.started for lane, _ in waits_s]
    assert lanes == [
        Priority.INTERACTIVE,
        Priority.INTERACTIVE,
        Priority.BACKGROUND,
        Priority.INTERACTIVE,
    ]
    assert min(wait_s for _, wait_s in observer.started[1][1]) >= 0.04
    assert [(size, ok) for size, _, ok in observer.finished] == [(1, True), (2, True), (1, False)]
    assert all(run_s >= 0.0 for _, run_s, _ in observer.finished)
    assert 2 in observer.depths
    assert observer.depths[-1] == 0
    assert all(depth >= 0 for depth in observer.depths)


async def test_observer_counts_each_outcome() -> None:
    """Each submitted item is reported exactly once, with the outcome it actually had."""
    observer = RecordingObserver()
    handler = FakeHandler(held=True, outputs=fail_on_negative)
    processor: BatchProcessor[int, int] = BatchProcessor(
        handler, BatchConfig(max_queue=3), observer
    )
    processor.start()
    first = spawn(processor, 0)
    await handler.next_started()

    with pytest.raises(DeadlineExceeded):  # expires in the queue
        await bounded(processor.submit(1, deadline=time.monotonic() + 0.05))
    with pytest.raises(DeadlineExceeded):  # already expired
        await bounded(processor.submit(1, deadline=time.monotonic() - 1.0))

    spared, cancelled, doomed = spawn(processor, 2, 3, -1)
    await wait_until(lambda: processor.queue_depth == 3)
    with pytest.raises(QueueFull):
        await bounded(processor.submit(4))
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(cancelled)

    handler.release_next()
    assert await results(first) == [0]
    for expected in ([2, -1], [2], [-1]):  # the failed batch, then its halves apart
        assert await handler.next_started() == expected
        handler.release_next()
    assert await results([spared]) == [4]
    with pytest.raises(BatchFailed):
        await bounded(doomed)

    stranded = spawn(processor, 5)
    await handler.next_started()
    await bounded(processor.stop(drain_timeout_s=0.05))
    with pytest.raises(Stopped):
        await results(stranded)
    with pytest.raises(Stopped):
        await bounded(processor.submit(6))

    assert Counter(observer.outcomes) == {
        Outcome.OK: 2,
        Outcome.EXPIRED: 2,
        Outcome.REJECTED: 1,
        Outcome.CANCELLED: 1,
        Outcome.FAILED: 1,
        Outcome.STOPPED: 2,
    }
    # One event per call of the handler: a failed batch's halves run again count too, so
    # the metrics see every forward pass.
    assert [(size, ok) for size, _, ok in observer.finished] == [
        (1, True),
        (2, False),
        (1, True),
        (1, False),
        (1, False),
    ]
    assert [size for size, _ in observer.started] == [1, 2, 1]


async def test_prepare_runs_before_each_handler_call_outside_its_measured_time() -> None:
    """``prepare`` sees the items of every handler call, a failed batch's halves included,
    before the handler does; the time it takes is neither reported as the handler's nor
    learnt as a batch's run time, so slow bookkeeping cannot make the model look slow."""
    prepare_s = 0.3
    calls: list[tuple[str, list[int]]] = []

    async def prepare(items: list[int]) -> None:
        calls.append(("prepare", list(items)))
        await asyncio.sleep(prepare_s)

    async def handler(items: list[int]) -> list[int]:
        calls.append(("handler", list(items)))
        return fail_on_negative(items)

    observer = RecordingObserver()
    processor: BatchProcessor[int, int] = BatchProcessor(
        handler, BatchConfig(), observer, prepare=prepare
    )
    processor.start()
    try:
        callers = [asyncio.create_task(processor.submit(item)) for item in (1, -1)]
        outcomes = await bounded(asyncio.gather(*callers, return_exceptions=True))
    finally:
        await bounded(processor.stop(drain_timeout_s=1))

    assert outcomes[0] == 2
    assert isinstance(outcomes[1], BatchFailed)
    assert calls == [
        ("prepare", [1, -1]),
        ("handler", [1, -1]),
        ("prepare", [1]),
        ("handler", [1]),
        ("prepare", [-1]),
        ("handler", [-1]),
    ]
    assert [(size, ok) for size, _, ok in observer.finished] == [
        (2, False),
        (1, True),
        (1, False),
    ]
    assert all(run_s < prepare_s / 2 for _, run_s, _ in observer.finished)
    assert processor._run_times.estimate_s(1) < prepare_s / 2


async def test_an_error_in_prepare_fails_the_call_as_the_handlers_would() -> None:
    """Items whose ``prepare`` fails are not handed to the handler; they fail alone, as
    with a handler error, and the others in their batch are answered."""

    async def prepare(items: list[int]) -> None:
        if any(item < 0 for item in items):
            raise RuntimeError("bookkeeping failed")

    handler = FakeHandler()
    processor: BatchProcessor[int, int] = BatchProcessor(handler, BatchConfig(), prepare=prepare)
    processor.start()
    try:
        callers = [asyncio.create_task(processor.submit(item)) for item in (1, -1, 3)]
        outcomes = await bounded(asyncio.gather(*callers, return_exceptions=True))
    finally:
        await bounded(processor.stop(drain_timeout_s=1))

    assert outcomes[0] == 2
    assert outcomes[2] == 6
    assert isinstance(outcomes[1], BatchFailed)
    assert -1 not in handler.seen


class ExplodingObserver(RecordingObserver):
    """An observer whose every event raises, as a buggy metrics backend would."""

    def queue_depth_changed(self, depth: int) -> None:
        raise RuntimeError("metrics backend down")

    def batch_started(self, size: int, queue_waits_s: Sequence[tuple[Priority, float]]) -> None:
        raise RuntimeError("metrics backend down")

    def handler_finished(self, size: int, run_s: float, ok: bool) -> None:
        raise RuntimeError("metrics backend down")

    def item_finished(self, outcome: Outcome) -> None:
        raise RuntimeError("metrics backend down")


async def test_a_failing_observer_never_breaks_batching(caplog: pytest.LogCaptureFixture) -> None:
    """Every observer call raising changes nothing for callers; the failure is logged once."""
    handler = FakeHandler()
    with caplog.at_level(logging.ERROR, logger="batching.processor"):
        async with running(handler, BatchConfig(max_batch_size=4), ExplodingObserver()) as p:
            assert await results(spawn(p, 1, 2, 3)) == [2, 4, 6]
            assert await bounded(p.submit(4)) == 8
            assert p.queue_depth == 0
            assert p.in_flight == 0
    assert sum("observer failed" in r.getMessage() for r in caplog.records) == 1


class Interrupted(BaseException):
    """A BaseException that is not an Exception, of an observer's own."""


class RaisingObserver(NullObserver):
    """An observer that raises ``error`` from ``batch_started``, or from every event."""

    def __init__(self, error: type[BaseException], *, every_event: bool) -> None:
        self.error = error
        self.every_event = every_event

    def queue_depth_changed(self, depth: int) -> None:
        if self.every_event:
            raise self.error

    def batch_started(self, size: int, queue_waits_s: Sequence[tuple[Priority, float]]) -> None:
        raise self.error

    def handler_finished(self, size: int, run_s: float, ok: bool) -> None:
        if self.every_event:
            raise self.error

    def item_finished(self, outcome: Outcome) -> None:
        if self.every_event:
            raise self.error


@pytest.mark.parametrize("every_event", [False, True], ids=["batch_started", "every event"])
@pytest.mark.parametrize("error", [Interrupted, asyncio.CancelledError])
async def test_an_observer_raising_a_base_exception_never_strands_a_batch(
    error: type[BaseException], every_event: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An observer's BaseException that is not an Exception (CancelledError from a plain call
    is the observer's own too) is logged like any failure of it: the batch still runs, its
    callers get their outputs and its slot is free for the next."""
    handler = FakeHandler()
    observer = RaisingObserver(error, every_event=every_event)
    with caplog.at_level(logging.ERROR, logger="batching.processor"):
        async with running(handler, BatchConfig(max_batch_size=4), observer) as processor:
            assert await bounded(processor.submit(1)) == 2
            assert await bounded(processor.submit(2)) == 4
            await wait_until(lambda: processor.in_flight == 0)
            assert processor.queue_depth == 0
            assert processor.failure is None
    assert sum("observer failed" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
async def test_an_observer_interrupt_is_passed_on_once_the_batch_is_answered(
    error: type[BaseException],
) -> None:
    """KeyboardInterrupt or SystemExit in an observer asks the process to end: it is passed
    on, not logged away, but only after the batch's callers have an answer and its slot is
    free."""
    processor = BatchProcessor(
        FakeHandler(), BatchConfig(), RaisingObserver(error, every_event=False)
    )
    entry: _Pending[int, int] = _Pending(
        item=1,
        future=asyncio.get_running_loop().create_future(),
        enqueued_at=time.monotonic(),
        deadline=None,
        priority=Priority.INTERACTIVE,
        alone=False,
        seq=0,
    )
    await processor._slots.acquire()
    batch = _RunningBatch([entry], time.monotonic())
    processor._running.add(batch)

    with pytest.raises(error):
        await bounded(processor._run_batch(batch))

    assert isinstance(entry.future.exception(), BatchFailed)
    assert processor.in_flight == 0
    assert not processor._slots.locked()


async def test_a_handler_raising_cancelled_error_fails_only_its_batch() -> None:
    """CancelledError from inside the handler (not a shutdown) is a failed batch: 500, not 503."""

    def cancelled_on_negative(items: list[int]) -> list[int]:
        if any(item < 0 for item in items):
            raise asyncio.CancelledError
        return [item * 2 for item in items]

    handler = FakeHandler(outputs=cancelled_on_negative)
    async with running(handler, BatchConfig()) as processor:
        with pytest.raises(BatchFailed):
            await bounded(processor.submit(-1))
        assert await bounded(processor.submit(3)) == 6
        assert processor.accepting


# --- Configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"max_batch_size": 0},
        {"max_wait_s": -0.001},
        {"max_queue": 0},
        {"max_concurrent_batches": 0},
        {"policy": "sometimes"},
        # NaN passes any ``< 1`` check; a float size gives batches of its ceiling.
        {"max_batch_size": math.nan},
        {"max_batch_size": math.inf},
        {"max_batch_size": 2.5},
        {"max_batch_size": 4.0},
        {"max_batch_size": True},
        {"max_queue": math.nan},
        {"max_queue": math.inf},
        {"max_queue": 10.5},
        {"max_concurrent_batches": math.nan},
        {"max_concurrent_batches": 1.5},
        {"max_concurrent_batches": True},
        {"max_wait_s": math.nan},
        {"max_wait_s": math.inf},
        {"max_wait_s": -math.inf},
        {"max_wait_s": True},
        {"max_wait_s": "0.005"},
    ],
    ids=lambda bad: ",".join(f"{key}={value}" for key, value in bad.items()),
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    """Out-of-range knobs and unknown policies fail when the config is built."""
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        BatchConfig(**bad)  # type: ignore[arg-type]


def test_config_accepts_the_policy_as_a_string() -> None:
    """A policy read from configuration as plain text becomes the enum member."""
    config = BatchConfig(policy="timeout")  # type: ignore[arg-type]
    assert config.policy is BatchPolicy.TIMEOUT
    assert BatchConfig().policy is BatchPolicy.ADAPTIVE
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_queue = 1  # type: ignore[misc]


def test_config_names_the_bad_value() -> None:
    """A validation error says which knob is wrong, what it wants and what it got."""
    with pytest.raises(ValueError, match=r"max_batch_size must be >= 1, got 0"):
        BatchConfig(max_batch_size=0)
    with pytest.raises(ValueError, match=r"max_batch_size must be an int, got 2\.5 \(float\)"):
        BatchConfig(max_batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_queue must be an int, got True \(bool\)"):
        BatchConfig(max_queue=True)
    with pytest.raises(ValueError, match=r"max_wait_s must be finite and >= 0, got nan"):
        BatchConfig(max_wait_s=math.nan)
    with pytest.raises(ValueError, match=r"max_wait_s must be finite and >= 0, got inf"):
        BatchConfig(max_wait_s=math.inf)
    with pytest.raises(ValueError, match=r"lower_lane_max_wait_s must be >= 0, got -1"):
        BatchConfig(lower_lane_max_wait_s=-1)
    with pytest.raises(ValueError, match=r"lower_lane_max_wait_s must be >= 0, got nan"):
        BatchConfig(lower_lane_max_wait_s=math.nan)
    with pytest.raises(ValueError, match=r"lower_lane_max_wait_s must be a number of seconds"):
        BatchConfig(lower_lane_max_wait_s=False)
    assert BatchConfig(lower_lane_max_wait_s=math.inf).lower_lane_max_wait_s == math.inf


def test_config_accepts_whole_seconds_and_no_wait() -> None:
    """An int is a number of seconds too, and 0 is a valid wait."""
    assert BatchConfig(max_wait_s=2).max_wait_s == 2
    assert BatchConfig(max_wait_s=0.0).max_wait_s == 0.0


async def test_a_caller_that_left_the_queue_no_longer_holds_its_item() -> None:
    """Its entry leaves the lane lazily (here it waits between two others); its payload,
    an image, does not wait with it."""
    handler = FakeHandler(held=True)
    async with running(handler, BatchConfig(max_batch_size=4)) as processor:
        first = spawn(processor, -1)
        await handler.next_started()
        waiting, leaving, behind = spawn(processor, 1, 7, 2)
        await wait_until(lambda: processor.queue_depth == 3)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        lane = processor._lanes[Priority.INTERACTIVE]
        gone = [entry for entry in lane if not entry.queued]
        assert len(gone) == 1
        assert not hasattr(gone[0], "item")
        assert processor.queue_depth == 2
        handler.release_all()
        assert await results([*first, waiting, behind]) == [-2, 2, 4]


async def test_callers_leaving_a_long_queue_in_any_order_cost_little() -> None:
    """Callers that leave are marked and dropped as they reach the head of their lane, or
    all at once when they are half the lane: any order costs about the same. Were each
    removed from the middle of its lane (a scan of it), 20,000 callers leaving newest first
    would hold the event loop for 8 s, thirty times as long as oldest first."""
    count = 20_000
    handler = FakeHandler(held=True)
    config = BatchConfig(max_batch_size=4, max_queue=count + 2)
    async with running(handler, config) as processor:
        first = spawn(processor, -1)
        await handler.next_started()
        kept = spawn(processor, 0, 1)

        async def leave(
            order: Callable[[list[asyncio.Task[int]]], list[asyncio.Task[int]]],
        ) -> float:
            callers = spawn(processor, *range(10, 10 + count))
            await wait_until(lambda: processor.queue_depth == count + 2)
            began = time.monotonic()
            for caller in order(callers):
                caller.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
            assert processor.queue_depth == processor.waiting(Priority.INTERACTIVE) == 2
            return time.monotonic() - began

        oldest_first_s = await leave(list)
        newest_first_s = await leave(lambda callers: callers[::-1])
        random_order_s = await leave(lambda callers: random.Random(7).sample(callers, count))

        handler.release_all()
        assert await results([*first, *kept]) == [-2, 0, 2]
    assert handler.batches == [[-1], [0, 1]]
    # Generous, for a shared machine's pauses: a scan of the lane would cost thirty times more.
    assert max(newest_first_s, random_order_s) < 5 * oldest_first_s + 0.5, (
        oldest_first_s,
        newest_first_s,
        random_order_s,
    )


def test_a_deadline_never_fires_early_under_uvloop() -> None:
    """uvloop, which the server runs on, keeps timers in whole milliseconds: left to it, a
    deadline would fire up to 1.4 ms early (a 504 sent before REQUEST_TIMEOUT_MS). It never
    fires before its time."""

    async def scenario() -> list[float]:
        handler = FakeHandler(held=True)
        early_s: list[float] = []
        async with running(handler, BatchConfig()) as processor:
            first = spawn(processor, 0)
            await handler.next_started()
            rng = random.Random(3)

            async def expire(item: int) -> None:
                deadline = time.monotonic() + rng.uniform(0.002, 0.012)
                with pytest.raises(DeadlineExceeded):
                    await processor.submit(item, deadline=deadline)
                early_s.append(deadline - time.monotonic())

            await asyncio.gather(*(expire(item) for item in range(1, 201)))
            handler.release_all()
            await results(first)
        return early_s

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        early_s = runner.run(scenario())
    assert len(early_s) == 200
    assert max(early_s) <= 0, f"expired {max(early_s) * 1000:.2f} ms before its deadline"


def test_a_timeout_at_a_deadline_never_expires_before_it_under_uvloop() -> None:
    """What the batcher's callers wait for outside it (an image's decode) expires at its
    deadline, as the batcher's own entries do, never before it: uvloop's ``asyncio.timeout``
    would fire up to 0.6 ms early."""

    async def scenario() -> list[float]:
        rng = random.Random(5)
        early_s: list[float] = []

        async def expire() -> None:
            deadline = time.monotonic() + rng.uniform(0.002, 0.012)
            with pytest.raises(TimeoutError):
                async with timeout_at_deadline(deadline):
                    await asyncio.sleep(1)
            early_s.append(deadline - time.monotonic())

        await asyncio.gather(*(expire() for _ in range(200)))
        return early_s

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        early_s = runner.run(scenario())
    assert len(early_s) == 200
    assert max(early_s) <= 0, f"expired {max(early_s) * 1000:.2f} ms before its deadline"


async def test_a_timeout_at_a_deadline_lets_what_ends_in_time_end_and_a_past_one_expire() -> None:
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, error: loop_errors.append(error))
    async with timeout_at_deadline(time.monotonic() + 0.005):
        await asyncio.sleep(0)
    await asyncio.sleep(0.02)  # a timer left behind would fire now, on a finished timeout
    assert loop_errors == []
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with timeout_at_deadline(started - 1):
            await asyncio.sleep(1)
    assert time.monotonic() - started < 0.5


# --- Randomised stress -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "concurrency", "lanes"),
    [(ADAPTIVE, 1, False), (ADAPTIVE, 3, False), (TIMEOUT, 1, False), (ADAPTIVE, 1, True)],
)
async def test_random_submits_and_cancellations_keep_every_caller_consistent(
    policy: BatchPolicy, concurrency: int, lanes: bool
) -> None:
    """Thousands of callers, a fifth of them cancelled at random moments: every survivor gets
    its own output, no item reaches the handler twice, and nothing is left queued or running.
    With ``lanes``, callers wait in random lanes, lower lanes fill only once kept waiting,
    and a fifth have deadlines, some too tight to meet: each of those gets its output or
    DeadlineExceeded.
    """
    count = 3000
    spawn_rng = random.Random(1234)
    handler_rng = random.Random(5678)
    seen: list[int] = []
    batches: list[list[int]] = []
    calls = {"entered": 0, "finished": 0}

    async def handler(items: list[int]) -> Sequence[int]:
        calls["entered"] += 1
        seen.extend(items)
        batches.append(items)
        if handler_rng.random() < 0.5:
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(handler_rng.uniform(0.0, 0.002))
        calls["finished"] += 1
        return [item * 2 for item in items]

    config = BatchConfig(
        max_batch_size=16,
        max_wait_s=0.002,
        max_queue=count,
        policy=policy,
        max_concurrent_batches=concurrency,
        fill_from_lower_lanes=not lanes,
        lower_lane_max_wait_s=0.001,
    )
    processor: BatchProcessor[int, int] = BatchProcessor(handler, config)
    processor.start()
    loop = asyncio.get_running_loop()

    tasks: list[asyncio.Task[int]] = []
    with_deadline: set[int] = set()
    alone: set[int] = set()
    lane_of: dict[int, Priority] = {}
    for item in range(count):
        priority, deadline = Priority.INTERACTIVE, None
        if lanes:
            priority = spawn_rng.choice(list(Priority))
            if spawn_rng.random() < 0.2:
                deadline = time.monotonic() + spawn_rng.uniform(0.0005, 0.02)
                with_deadline.add(item)
        if spawn_rng.random() < 0.05:
            alone.add(item)
        lane_of[item] = priority
        task = asyncio.create_task(
            processor.submit(item, deadline=deadline, priority=priority, alone=item in alone)
        )
        tasks.append(task)
        if spawn_rng.random() < 0.2:
            # Cancel before it starts, while queued, mid-batch, or after it is done.
            loop.call_later(spawn_rng.choice([0.0, spawn_rng.uniform(0.0, 0.005)]), task.cancel)
        pause = spawn_rng.random()
        if pause < 0.5:
            await asyncio.sleep(0)
        elif pause < 0.55:
            await asyncio.sleep(spawn_rng.uniform(0.0, 0.001))

    async with asyncio.timeout(20.0):
        await asyncio.gather(*tasks, return_exceptions=True)
        # Let any cancel still on a timer fire, so no callback outlives the test.
        await asyncio.sleep(0.01)
    assert processor.queue_depth == 0

    cancelled = {item for item, task in enumerate(tasks) if task.cancelled()}
    assert len(cancelled) > count // 20  # the test really exercised cancellation
    expired = set()
    for item, task in enumerate(tasks):
        if item in cancelled:
            continue
        if item in with_deadline and isinstance(task.exception(), DeadlineExceeded):
            expired.add(item)
        else:
            assert task.result() == item * 2
    assert len(expired) < len(with_deadline) or not lanes
    assert len(seen) == len(set(seen)), "an item reached the handler twice"
    assert set(range(count)) - cancelled - expired <= set(seen)
    assert all(len(batch) == 1 for batch in batches if alone.intersection(batch))
    assert alone - cancelled - expired <= set(seen)
    # Each lane serves in arrival order; only a deadline lets an item be left for later.
    for priority in Priority:
        served = [i for i in seen if lane_of[i] == priority and i not in with_deadline]
        assert served == sorted(served), f"{priority.name} out of order"

    await bounded(processor.stop(drain_timeout_s=GUARD_S))
    assert calls["entered"] == calls["finished"]  # every batch ran to completion
    assert processor.queue_depth == 0
    assert processor.in_flight == 0
