"""The real gunicorn server on its worst day: overload, a killed worker, SIGTERM under load,
clients that go away. Each test prints the figures docs/reliability.md reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.server import (
    PROJECT_ROOT,
    ServerProcess,
    free_port,
    gunicorn_command,
    running_server,
    server_env,
)
from tests.test_server import metric_value

pytestmark = pytest.mark.slow

CONNECTION_ERROR = "connection error"


@dataclass
class Tally:
    """What the clients saw: one outcome per request sent, and how long each took."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    missing_retry_after: int = 0

    def record(self, outcome: str, latency_s: float) -> None:
        self.outcomes[outcome] += 1
        self.latencies_s.setdefault(outcome, []).append(latency_s)

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())


async def post_photo(client: httpx.AsyncClient, photo: bytes, tally: Tally) -> str:
    started = time.perf_counter()
    try:
        response = await client.post("/cls", files={"file": ("photo.jpg", photo, "image/jpeg")})
        outcome = str(response.status_code)
        if response.status_code == 503 and "retry-after" not in response.headers:
            tally.missing_retry_after += 1
    except httpx.TransportError:
        outcome = CONNECTION_ERROR
    tally.record(outcome, time.perf_counter() - started)
    return outcome


async def clients_until(
    url: str, photo: bytes, clients: int, stop: asyncio.Event, tally: Tally
) -> None:
    """``clients`` callers, each sending its next request as soon as its last one returns,
    or after the ``Retry-After`` of a 503, as a well-behaved client does."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def caller() -> None:
            while not stop.is_set():
                if await post_photo(client, photo, tally) == "503":
                    await asyncio.sleep(1.0)

        await asyncio.gather(*(caller() for _ in range(clients)))


def lone_latency_s(url: str, photo: bytes, count: int = 10) -> float:
    with httpx.Client(base_url=url, timeout=30) as client:
        durations = []
        for _ in range(count):
            started = time.perf_counter()
            response = client.post("/cls", files={"file": ("photo.jpg", photo, "image/jpeg")})
            assert response.status_code == 200
            durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def worker_pids(server: ServerProcess) -> set[int]:
    return {child.pid for child in psutil.Process(server.process.pid).children()}


def test_ten_times_capacity_is_refused_fast_and_the_server_recovers(
    tmp_path: Path, photos: list[Path]
) -> None:
    """256 clients against one worker: 503s at once, no lost request, probes stay prompt."""
    photo = photos[0].read_bytes()
    env = server_env(tmp_path, MAX_QUEUE="32", REQUEST_TIMEOUT_MS="5000")
    load_s = 12
    probe_s: list[float] = []
    peak_rss = 0

    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        idle_before_s = lone_latency_s(server.url, photo)
        master = psutil.Process(server.process.pid)
        rss_before = max(p.memory_info().rss for p in master.children())
        # The clients run in their own process, so the probes below measure the server.
        load = subprocess.Popen(
            [sys.executable, "-m", "tests.loadgen", server.url, "256", str(load_s), photos[0]],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
        )
        with httpx.Client(base_url=server.url, timeout=10) as probe:
            while load.poll() is None:
                for path in ("/healthz", "/metrics"):
                    started = time.perf_counter()
                    assert probe.get(path).status_code == 200
                    probe_s.append(time.perf_counter() - started)
                peak_rss = max(peak_rss, *(p.memory_info().rss for p in master.children()))
                time.sleep(0.5)
        stdout, _ = load.communicate()
        idle_after_s = lone_latency_s(server.url, photo)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert server.process.poll() is None

    result = json.loads(stdout)
    latencies_s: dict[str, list[float]] = result["latencies_s"]
    counts = {outcome: len(values) for outcome, values in latencies_s.items()}
    print(
        f"\noverload: sent {sum(counts.values())}, {counts}, lost 0; 503 p50 "
        f"{statistics.median(latencies_s['503']) * 1000:.0f} ms; 200 max "
        f"{max(latencies_s['200']):.2f} s; probes max {max(probe_s) * 1000:.0f} ms; "
        f"worker RSS {rss_before / 2**20:.0f} -> peak {peak_rss / 2**20:.0f} MiB; lone "
        f"request {idle_before_s * 1000:.0f} ms before, {idle_after_s * 1000:.0f} ms after"
    )
    # Every request got an answer, and only the documented ones.
    assert set(counts) <= {"200", "503", "504"}, counts
    assert counts["200"] > 0
    assert counts["503"] > counts["200"], "10x capacity must be mostly refused"
    assert result["missing_retry_after"] == 0
    # Refusals are immediate, not queued: far below the request deadline.
    assert statistics.median(latencies_s["503"]) < 1.0
    # Accepted requests finish by their deadline (plus transfer and scheduling slack).
    assert max(latencies_s["200"]) < 5.0 + 2.0
    assert max(probe_s) < 2.0
    # Queue and upload limits bound memory: 32 queued crops are a few MiB.
    assert peak_rss - rss_before < 300 * 2**20
    # Back to normal without a restart.
    assert idle_after_s < 3 * idle_before_s + 0.05
    assert metric_value(metrics, "batch_queue_depth") == 0


def test_a_killed_worker_is_replaced_and_the_other_keeps_serving(
    tmp_path: Path, photos: list[Path]
) -> None:
    """SIGKILL one of two workers under load: only its own connections fail."""
    photo = photos[0].read_bytes()
    metrics_dir = tmp_path / "metrics"
    env = server_env(tmp_path, WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    clients = 8
    before, during = Tally(), Tally()

    async def load_around_kill(server: ServerProcess, victim: int) -> None:
        stop = asyncio.Event()
        first = asyncio.create_task(clients_until(server.url, photo, clients, stop, before))
        await asyncio.sleep(2)
        stop.set()
        await first
        stop = asyncio.Event()
        second = asyncio.create_task(clients_until(server.url, photo, clients, stop, during))
        await asyncio.sleep(1)
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(4)
        stop.set()
        await second

    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        original = worker_pids(server)
        assert len(original) == 2
        victim = min(original)
        asyncio.run(load_around_kill(server, victim))

        replaced_at = time.monotonic()
        deadline = replaced_at + 90
        while time.monotonic() < deadline:
            current = worker_pids(server)
            if len(current) == 2 and victim not in current:
                break
            time.sleep(0.2)
        current = worker_pids(server)
        assert victim not in current, current
        assert len(current) == 2, current
        # A new worker takes connections only once its model is loaded and warm.
        after = Tally()

        async def forty_requests() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                for _ in range(5):
                    await asyncio.gather(*(post_photo(client, photo, after) for _ in range(8)))

        asyncio.run(forty_requests())
        recovered_s = time.monotonic() - replaced_at
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        live_files = sorted(p.name for p in metrics_dir.glob("*live*"))

    print(
        f"\nkilled worker: before {dict(before.outcomes)}, around the kill "
        f"{dict(during.outcomes)}, after {dict(after.outcomes)}; 40 requests answered "
        f"{recovered_s:.1f} s after the replacement appeared; live metric files {live_files}"
    )
    assert set(before.outcomes) == {"200"}
    # Only requests on the killed worker's connections may fail, at most one per client.
    assert set(during.outcomes) <= {"200", CONNECTION_ERROR}
    assert during.outcomes[CONNECTION_ERROR] <= clients
    assert during.outcomes["200"] > during.outcomes[CONNECTION_ERROR]
    assert set(after.outcomes) == {"200"}
    # The dead worker's live gauges are gone; counters of both lives still add up.
    assert not any(str(victim) in name for name in live_files)
    served = metric_value(metrics, 'http_requests_total{method="POST",route="/cls",status="200"}')
    assert served >= before.outcomes["200"] + after.outcomes["200"]
    assert metric_value(metrics, "batch_queue_depth") == 0


def test_sigterm_under_load_answers_every_accepted_request(
    tmp_path: Path, photos: list[Path]
) -> None:
    """SIGTERM with a full queue: every accepted request gets 200, nothing new is taken,
    and gunicorn exits 0 within its graceful timeout."""
    photo = photos[0].read_bytes()
    drain_timeout_s = 20
    env = server_env(tmp_path, MAX_BATCH_SIZE="4", DRAIN_TIMEOUT_S=str(drain_timeout_s))
    in_flight = 24
    accepted = Tally()

    async def terminate_with_requests_queued(server: ServerProcess) -> tuple[float, int, str]:
        limits = httpx.Limits(max_connections=in_flight + 4)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            requests = [
                asyncio.create_task(post_photo(client, photo, accepted)) for _ in range(in_flight)
            ]
            # Let every request reach the server's queue before the signal.
            await asyncio.sleep(0.5)
            queued = metric_value((await client.get("/metrics")).text, "batch_queue_depth")
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            try:
                late = await client.post("/cls", files={"file": ("photo.jpg", photo, "image/jpeg")})
                late_outcome = str(late.status_code)
            except httpx.TransportError:
                late_outcome = CONNECTION_ERROR
            await asyncio.gather(*requests)
            return signalled, int(queued), late_outcome

    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        signalled, queued, late_outcome = asyncio.run(terminate_with_requests_queued(server))
        exit_code = server.process.wait(drain_timeout_s + 10 + 5)
        exited_s = time.monotonic() - signalled
        log = server.log()

    print(
        f"\nSIGTERM: {in_flight} in flight ({queued} queued at the signal): "
        f"{dict(accepted.outcomes)}; a request after the signal: {late_outcome}; "
        f"exit {exit_code} after {exited_s:.1f} s"
    )
    assert queued > 0, "the signal must find requests waiting in the queue"
    assert accepted.outcomes == Counter({"200": in_flight})
    assert late_outcome in ("503", CONNECTION_ERROR)
    assert exit_code == 0
    assert exited_s < drain_timeout_s + 10
    assert "Traceback" not in log


def test_clients_that_hang_up_while_queued_cost_no_model_time(
    tmp_path: Path, photos: list[Path]
) -> None:
    """Over real sockets: half the clients close their connection while queued; those
    requests leave the queue without reaching the model, and the others are served."""
    photo = photos[0].read_bytes()
    env = server_env(tmp_path, MAX_BATCH_SIZE="1")
    abandoned = 12
    total = 2 * abandoned

    async def send_and_abandon(url: str) -> list[str]:
        tally = Tally()
        async with (
            httpx.AsyncClient(base_url=url, timeout=60) as keep,
            httpx.AsyncClient(base_url=url, timeout=60) as leave,
        ):
            kept = [
                asyncio.create_task(post_photo(keep, photo, tally))
                for _ in range(total - abandoned)
            ]
            left = [asyncio.create_task(post_photo(leave, photo, tally)) for _ in range(abandoned)]
            await asyncio.sleep(0.3)
            for task in left:
                task.cancel()  # httpx closes a connection whose request was cancelled
            await asyncio.gather(*left, return_exceptions=True)
            return list(await asyncio.gather(*kept))

    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        before = httpx.get(f"{server.url}/metrics").text
        kept = asyncio.run(send_and_abandon(server.url))
        time.sleep(0.5)
        after = httpx.get(f"{server.url}/metrics").text

    def delta(sample: str) -> float:
        return metric_value(after, sample) - metric_value(before, sample)

    cancelled = delta('batch_requests_total{outcome="cancelled"}')
    served = delta('batch_requests_total{outcome="ok"}')
    print(f"\nhang-ups: {abandoned} of {total} abandoned; {cancelled:.0f} left the queue unrun")
    assert kept == ["200"] * (total - abandoned)
    assert cancelled > 0, "no abandoned request was dropped from the queue"
    assert served + cancelled <= total
    assert served < total, "every abandoned request was still run through the model"
    assert metric_value(after, "batch_queue_depth") == 0
