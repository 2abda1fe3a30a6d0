"""What batching costs a caller in latency, with generous, relative timing bounds."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from batching import BatchConfig, BatchPolicy, BatchProcessor
from tests.batching.fakes import bounded, results, spawn

HANDLER_S = 0.05
# asyncio may wake a timer up to its clock resolution early; allow a millisecond for it.
TIMER_SLACK_S = 0.001

Handler = Callable[[list[int]], Awaitable[list[int]]]


def timed_handler(run_s: float, sizes: list[int]) -> Handler:
    """A fake model that takes ``run_s`` per batch, whatever its size, and records the sizes."""

    async def handler(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(run_s)
        return [item * 2 for item in items]

    return handler


async def lone_latency_s(processor: BatchProcessor[int, int], item: int) -> float:
    """Seconds one request takes when it is the only one in flight."""
    began = time.monotonic()
    assert await bounded(processor.submit(item)) == item * 2
    return time.monotonic() - began


async def test_a_lone_adaptive_request_costs_about_the_handler_run_time() -> None:
    """Under ADAPTIVE a lone request pays the handler's run time and no batching timer."""
    sizes: list[int] = []
    config = BatchConfig(max_wait_s=1.0, policy=BatchPolicy.ADAPTIVE)
    processor = BatchProcessor(timed_handler(HANDLER_S, sizes), config)
    processor.start()
    try:
        latencies_s = [await lone_latency_s(processor, item) for item in range(3)]
    finally:
        await processor.stop(drain_timeout_s=1.0)

    assert sizes == [1, 1, 1]
    assert min(latencies_s) >= HANDLER_S - TIMER_SLACK_S
    assert statistics.median(latencies_s) < HANDLER_S * 3 + 0.05


async def test_a_burst_is_served_in_few_batches() -> None:
    """A burst of concurrent requests shares handler calls, far faster than one call each."""
    count = 64
    sizes: list[int] = []
    config = BatchConfig(max_batch_size=16, max_queue=count)
    processor = BatchProcessor(timed_handler(HANDLER_S, sizes), config)
    processor.start()
    try:
        began = time.monotonic()
        outputs = await results(spawn(processor, *range(count)))
        elapsed_s = time.monotonic() - began
    finally:
        await processor.stop(drain_timeout_s=1.0)

    assert outputs == [item * 2 for item in range(count)]
    assert sum(sizes) == count
    assert max(sizes) > 1
    assert len(sizes) <= count // 4
    sequential_s = count * HANDLER_S
    assert elapsed_s < sequential_s / 4


async def test_a_lone_timeout_request_waits_out_max_wait() -> None:
    """Under TIMEOUT a lone request also waits about ``max_wait_s``, unlike under ADAPTIVE."""
    max_wait_s = 0.25
    latency_s: dict[BatchPolicy, float] = {}
    for policy in (BatchPolicy.ADAPTIVE, BatchPolicy.TIMEOUT):
        config = BatchConfig(max_batch_size=16, max_wait_s=max_wait_s, policy=policy)
        processor = BatchProcessor(timed_handler(HANDLER_S, []), config)
        processor.start()
        try:
            latency_s[policy] = await lone_latency_s(processor, 1)
        finally:
            await processor.stop(drain_timeout_s=1.0)

    timeout_s = latency_s[BatchPolicy.TIMEOUT]
    assert 0.8 * max_wait_s + HANDLER_S - TIMER_SLACK_S <= timeout_s
    assert timeout_s < max_wait_s + HANDLER_S + 1.0
    assert timeout_s - latency_s[BatchPolicy.ADAPTIVE] >= 0.5 * max_wait_s
