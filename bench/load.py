"""Load generation over loopback: closed loop (fixed clients) and open loop (Poisson arrivals)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import io
import mimetypes
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil

from bench.server import Server, scrape

Payload = tuple[bytes, dict[str, str]]

# Each step's latency figures: the name of each, and its percentile.
LATENCY_QUANTILES = {"p50": 50, "p90": 90, "p99": 99, "max": 100}


def encode_payloads(images: list[Path]) -> list[Payload]:
    """Multipart bodies built once, so the load generator spends no CPU encoding them."""
    payloads = []
    for path in images:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        request = httpx.Request(
            "POST", "http://bench/cls", files={"file": (path.name, path.read_bytes(), kind)}
        )
        payloads.append((request.read(), {"content-type": request.headers["content-type"]}))
    return payloads


@dataclass
class StepResult:
    """What one load step measured."""

    name: str
    kind: str
    offered: float
    duration_s: float
    sent: int
    ok: int
    statuses: dict[str, int]
    throughput_per_s: float
    # None where no request of the step was answered with 200: there is nothing to time.
    latency_ms: dict[str, float | None]
    mean_batch_size: float
    # None for a server given by URL, which runs out of sight.
    server_cpu_cores: float | None
    loadgen_cpu_cores: float
    # The largest worker's peak resident memory during the step.
    peak_worker_rss_bytes: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


class _Recorder:
    """Latencies of the requests sent inside the window; throughput from those that ended in it.

    Counting completions inside the window, not the requests sent in it, keeps the tail
    out of the throughput: requests sent at the window's end finish up to one latency
    later, which with a latency of a second would stretch a four-second window by a
    quarter.
    """

    def __init__(self, measure_from: float, measure_until: float) -> None:
        self.measure_from = measure_from
        self.measure_until = measure_until
        self.latencies_s: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.completed = 0

    def record(self, started: float, ended: float, status: int) -> None:
        if status == 200 and self.measure_from <= ended <= self.measure_until:
            self.completed += 1
        if not self.measure_from <= started < self.measure_until:
            return
        self.statuses[str(status)] += 1
        if status == 200:
            self.latencies_s.append(ended - started)

    @property
    def window_s(self) -> float:
        return self.measure_until - self.measure_from


def open_session(server: Server, connections: int) -> aiohttp.ClientSession:
    # aiohttp parses HTTP in C: a third of httpx's CPU per request, so the load generator
    # takes as little as possible of the cores the server is measured on.
    return aiohttp.ClientSession(
        # With its trailing slash, a base URL may hold a path (a server behind a proxy's
        # prefix), which the relative paths of the requests then keep.
        f"{server.url}/",
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=120),
        headers=server.headers,
    )


async def post_image(session: aiohttp.ClientSession, payload: Payload) -> int:
    body, headers = payload
    # aiohttp writes a body over 1 MiB given as bytes in one piece, holding up the loop.
    data = io.BytesIO(body) if len(body) > 1024 * 1024 else body
    try:
        async with session.post("cls", data=data, headers=headers) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


class _Snapshot:
    """Server metrics and the CPU time of both sides, at one moment."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.metrics: dict[str, float] = {}
        self.server_cpu: float | None = None
        self.loadgen_cpu = 0.0
        self.wall = 0.0

    def take(self) -> None:
        self.metrics = scrape(self.server.url)
        self.server_cpu = self.server.cpu_seconds()
        times = psutil.Process().cpu_times()
        self.loadgen_cpu = times.user + times.system
        self.wall = time.perf_counter()


def _result(
    name: str,
    kind: str,
    offered: float,
    recorder: _Recorder,
    before: _Snapshot,
    after: _Snapshot,
    peak_worker_rss_bytes: int | None,
) -> StepResult:
    wall_s = after.wall - before.wall
    batches = after.metrics.get("batch_size_count", 0) - before.metrics.get("batch_size_count", 0)
    batched = after.metrics.get("batch_size_sum", 0) - before.metrics.get("batch_size_sum", 0)
    latencies = np.array(recorder.latencies_s) * 1000
    ok = recorder.statuses.get("200", 0)
    server_cpu = (
        None
        if after.server_cpu is None or before.server_cpu is None
        else (after.server_cpu - before.server_cpu) / wall_s
    )
    return StepResult(
        name=name,
        kind=kind,
        offered=offered,
        duration_s=recorder.window_s,
        sent=sum(recorder.statuses.values()),
        ok=ok,
        statuses=dict(recorder.statuses),
        throughput_per_s=recorder.completed / recorder.window_s,
        latency_ms={
            name: float(np.percentile(latencies, quantile)) if latencies.size else None
            for name, quantile in LATENCY_QUANTILES.items()
        },
        mean_batch_size=batched / batches if batches else 0.0,
        server_cpu_cores=server_cpu,
        loadgen_cpu_cores=(after.loadgen_cpu - before.loadgen_cpu) / wall_s,
        peak_worker_rss_bytes=peak_worker_rss_bytes,
    )


def _steady_heap() -> None:
    """Collect the garbage there is, and take what is left out of the collector's full
    passes, as a step starts. In a process that holds torch (the in-process limits), a full
    pass stops the load generator's loop for about 0.2 s, and every answer that came
    meanwhile would be timed that much late."""
    gc.collect()
    gc.freeze()


async def closed_loop(
    server: Server, payloads: list[Payload], clients: int, duration_s: float, warmup_s: float
) -> StepResult:
    """``clients`` callers, each sending its next request as soon as the last one returns."""
    async with open_session(server, clients) as client:
        _steady_heap()
        await asyncio.to_thread(server.reset_peak_rss)
        start = time.perf_counter()
        recorder = _Recorder(start + warmup_s, start + warmup_s + duration_s)
        before, after = _Snapshot(server), _Snapshot(server)

        async def take_snapshots() -> None:
            # Server metrics and CPU over the same window as the throughput.
            await asyncio.sleep(warmup_s)
            await asyncio.to_thread(before.take)
            await asyncio.sleep(max(0.0, recorder.measure_until - time.perf_counter()))
            await asyncio.to_thread(after.take)

        async def caller(index: int) -> None:
            sent = index
            while (started := time.perf_counter()) < recorder.measure_until:
                status = await post_image(client, payloads[sent % len(payloads)])
                recorder.record(started, time.perf_counter(), status)
                sent += clients

        await asyncio.gather(take_snapshots(), *(caller(i) for i in range(clients)))
    peak_bytes = await asyncio.to_thread(server.peak_worker_rss_bytes)
    return _result(f"closed-{clients}", "closed", clients, recorder, before, after, peak_bytes)


def _process_cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _callers_in_this_process(
    url: str,
    headers: dict[str, str],
    payloads: list[Payload],
    clients: int,
    first: int,
    times: tuple[float, float, float],
) -> tuple[_Recorder, float]:
    """One process's share of ``closed_loop_in_processes``: ``clients`` callers from
    ``start`` to ``measure_until`` (``times``, on the monotonic clock every process reads).
    Returns what they recorded, and the CPU seconds this process used in the window."""
    start, measure_from, measure_until = times
    recorder = _Recorder(measure_from, measure_until)
    cpu_at: list[float] = []
    _steady_heap()

    async def callers() -> None:
        async with open_session(Server(url, headers=headers), clients) as client:

            async def caller(index: int) -> None:
                sent = first + index
                while (started := time.monotonic()) < measure_until:
                    status = await post_image(client, payloads[sent % len(payloads)])
                    recorder.record(started, time.monotonic(), status)
                    sent += clients

            async def read_cpu_at_the_windows_edges() -> None:
                for edge in (measure_from, measure_until):
                    await asyncio.sleep(max(0.0, edge - time.monotonic()))
                    cpu_at.append(_process_cpu_s())

            await asyncio.sleep(max(0.0, start - time.monotonic()))
            await asyncio.gather(
                read_cpu_at_the_windows_edges(), *(caller(i) for i in range(clients))
            )

    asyncio.run(callers())
    return recorder, cpu_at[1] - cpu_at[0]


@dataclass
class LoadgenPool:
    """Processes for ``closed_loop_in_processes``: an executor and how many it runs."""

    executor: concurrent.futures.ProcessPoolExecutor
    processes: int


@contextlib.contextmanager
def loadgen_pool(processes: int) -> Iterator[LoadgenPool]:
    """``processes`` load-generator processes, started before any step is timed."""
    # Spawned, not forked: the caller may hold a CUDA context, which a fork cannot share.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as executor:
        # A task for each, long enough for every process to start, of this module, so that
        # each imports it (aiohttp and the rest) now: a second or more on a busy machine,
        # which in a step's first task would start its callers late.
        list(executor.map(_started, [1.0] * processes))
        yield LoadgenPool(executor, processes)


def _started(wait_s: float) -> None:
    time.sleep(wait_s)


async def closed_loop_in_processes(
    server: Server,
    payloads: list[Payload],
    clients: int,
    duration_s: float,
    warmup_s: float,
    pool: LoadgenPool,
) -> StepResult:
    """``closed_loop``'s callers spread over the processes of ``pool``: one process's event
    loop answers a few thousand requests per second at most, which a server on a GPU can
    exceed. The load generator's CPU is that of those processes and of this one, over the
    measured window."""
    loop = asyncio.get_running_loop()
    start = time.monotonic() + 0.2  # every process's callers begin together
    times = (start, start + warmup_s, start + warmup_s + duration_s)
    processes = pool.processes
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    firsts = [sum(shares[:i]) for i in range(processes)]
    runs = [
        loop.run_in_executor(
            pool.executor,
            _callers_in_this_process,
            server.url,
            server.headers,
            payloads,
            share,
            first,
            times,
        )
        for share, first in zip(shares, firsts, strict=True)
        if share
    ]
    before, after = _Snapshot(server), _Snapshot(server)
    await asyncio.to_thread(server.reset_peak_rss)
    await asyncio.sleep(max(0.0, times[1] - time.monotonic()))
    await asyncio.to_thread(before.take)
    await asyncio.sleep(max(0.0, times[2] - time.monotonic()))
    await asyncio.to_thread(after.take)
    shares_done = await asyncio.gather(*runs)
    peak_bytes = await asyncio.to_thread(server.peak_worker_rss_bytes)

    merged = _Recorder(times[1], times[2])
    for recorder, _ in shares_done:
        merged.completed += recorder.completed
        merged.statuses.update(recorder.statuses)
        merged.latencies_s.extend(recorder.latencies_s)
    # This process's own CPU over the window (the snapshots' scrapes), as in closed_loop.
    result = _result(f"closed-{clients}", "closed", clients, merged, before, after, peak_bytes)
    result.loadgen_cpu_cores += sum(cpu for _, cpu in shares_done) / merged.window_s
    return result


async def spaced(
    server: Server, payloads: list[Payload], gap_s: float, requests: int
) -> StepResult:
    """One request at a time, each sent ``gap_s`` after the previous answer: what a request
    meets at low traffic, after the model has sat idle (its threads asleep)."""
    async with open_session(server, 1) as client:
        before = _Snapshot(server)
        await asyncio.to_thread(before.take)
        await asyncio.to_thread(server.reset_peak_rss)
        _steady_heap()
        # The window is the whole step, closed after the last answer: every request counts.
        recorder = _Recorder(time.perf_counter(), float("inf"))
        for sent in range(requests):
            await asyncio.sleep(gap_s)
            started = time.perf_counter()
            status = await post_image(client, payloads[sent % len(payloads)])
            recorder.record(started, time.perf_counter(), status)
        recorder.measure_until = time.perf_counter()
    peak_bytes = await asyncio.to_thread(server.peak_worker_rss_bytes)
    after = _Snapshot(server)
    await asyncio.to_thread(after.take)
    return _result(f"spaced-{gap_s:g}s", "spaced", gap_s, recorder, before, after, peak_bytes)


async def open_loop(
    server: Server,
    payloads: list[Payload],
    rate_per_s: float,
    duration_s: float,
    warmup_s: float,
    seed: int,
    label: str,
) -> StepResult:
    """Poisson arrivals at ``rate_per_s``; latency counts from each request's scheduled time.

    The arrivals of the first ``warmup_s`` fill the server's queue to its steady state and
    are not measured. A request sent late (the load generator's own loop fell behind) still
    counts from its scheduled time; the step reports how late the latest one went out.
    """
    rng = random.Random(seed)
    async with open_session(server, 512) as client:
        await asyncio.to_thread(server.reset_peak_rss)  # as the step starts, as in the others
        _steady_heap()
        start = time.perf_counter()
        recorder = _Recorder(start + warmup_s, start + warmup_s + duration_s)
        before, after = _Snapshot(server), _Snapshot(server)
        pending: set[asyncio.Task[None]] = set()
        latest_send_s = 0.0

        async def one(scheduled: float, payload: Payload) -> None:
            nonlocal latest_send_s
            if scheduled >= recorder.measure_from:
                # As the request starts on its way, not as the loop woke to schedule it.
                latest_send_s = max(latest_send_s, time.perf_counter() - scheduled)
            status = await post_image(client, payload)
            recorder.record(scheduled, time.perf_counter(), status)

        async def take_snapshot() -> None:
            # In a thread beside the arrivals, which it must not hold up; at the window's
            # edges, as in the closed loop, so that the CPU and batch figures cover the
            # window the throughput does, not the tail of answers after it.
            await asyncio.sleep(warmup_s)
            await asyncio.to_thread(before.take)
            await asyncio.sleep(max(0.0, recorder.measure_until - time.perf_counter()))
            await asyncio.to_thread(after.take)

        snapshot = asyncio.create_task(take_snapshot())
        scheduled = start
        sent = sent_in_window = 0
        while True:
            scheduled += rng.expovariate(rate_per_s)
            if scheduled > recorder.measure_until:
                break
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            if scheduled >= recorder.measure_from:
                sent_in_window += 1
            task = asyncio.create_task(one(scheduled, payloads[sent % len(payloads)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await snapshot
        if pending:
            await asyncio.wait(pending)
    peak_bytes = await asyncio.to_thread(server.peak_worker_rss_bytes)
    result = _result(f"open-{label}", "open", rate_per_s, recorder, before, after, peak_bytes)
    result.extra["sent_per_s"] = sent_in_window / duration_s
    result.extra["latest_send_ms"] = latest_send_s * 1000
    return result
