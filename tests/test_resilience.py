"""The real gunicorn server on its worst day: overload, a killed worker, SIGTERM under load,
clients that go away. Each test prints the figures docs/reliability.md reports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
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
from prometheus_client.mmap_dict import MmapedDict

from tests.server import (
    PROJECT_ROOT,
    ServerProcess,
    free_port,
    gunicorn_command,
    running_server,
    server_env,
)
from tests.support import metric_value

pytestmark = pytest.mark.slow

CONNECTION_ERROR = "connection error"
IDLE_SAMPLES = 10  # lone requests whose median is "the idle latency"


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


def lone_latency_s(url: str, photo: bytes, count: int) -> float:
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


@dataclass
class OverloadRun:
    """What one overload run measured, from the clients' side and the server's."""

    latencies_s: dict[str, list[float]]
    missing_retry_after: int
    counted_by_server: int
    probe_s: list[float]
    rss_before: int
    rss_samples: list[int]
    idle_before_s: float
    idle_after_s: float
    recovered_s: float
    queue_depth_after: float

    @property
    def counts(self) -> dict[str, int]:
        return {outcome: len(values) for outcome, values in self.latencies_s.items()}

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    def summary(self, name: str) -> str:
        counts = self.counts
        answered = counts.get("200", 0) + counts.get("503", 0) + counts.get("504", 0)
        accepted_s = self.latencies_s.get("200", []) + self.latencies_s.get("504", [])
        refused_s = self.latencies_s.get("503")
        refusals = "no 503"
        if refused_s:
            refusals = f"503 p50 {statistics.median(refused_s) * 1000:.0f} ms"
        return (
            f"\n{name}: sent {self.sent}, {counts}, lost {self.sent - answered}; server counted "
            f"{self.counted_by_server}; {refusals}; accepted p50 "
            f"{statistics.median(accepted_s):.2f} s, max "
            f"{max(accepted_s):.2f} s; probes max {max(self.probe_s) * 1000:.0f} ms; worker RSS "
            f"{self.rss_before / 2**20:.0f} -> peak {max(self.rss_samples) / 2**20:.0f} MiB; lone "
            f"request {self.idle_before_s * 1000:.0f} ms before, {self.idle_after_s * 1000:.0f} "
            f"ms after (answered {self.recovered_s:.2f} s after the load stopped)"
        )


def cls_requests_counted(metrics: str) -> int:
    """``POST /cls`` requests the server has answered, over every status."""
    total = 0.0
    for match in re.finditer(r"^http_requests_total\{([^}]*)\} (\S+)$", metrics, re.MULTILINE):
        if 'route="/cls"' in match.group(1) and 'method="POST"' in match.group(1):
            total += float(match.group(2))
    return int(total)


def overload(server: ServerProcess, photo_path: Path, clients: int, seconds: float) -> OverloadRun:
    """``clients`` callers for ``seconds`` from a separate process, while this one polls the
    probes and the workers' RSS every half second."""
    photo = photo_path.read_bytes()
    idle_before_s = lone_latency_s(server.url, photo, count=IDLE_SAMPLES)
    master = psutil.Process(server.process.pid)
    rss_before = max(p.memory_info().rss for p in master.children())
    rss_samples = [rss_before]
    probe_s: list[float] = []
    counted_before = cls_requests_counted(httpx.get(f"{server.url}/metrics", timeout=10).text)
    # The clients run in their own process, so the probes below measure the server. Their
    # report goes to a file: a pipe's buffer would fill and block them before they exit.
    report_path = server.log_path.with_name("load.json")
    with report_path.open("wb") as report:
        command = [sys.executable, "-m", "tests.loadgen", server.url, str(clients)]
        load = subprocess.Popen(
            [*command, str(seconds), str(photo_path)],
            cwd=PROJECT_ROOT,
            stdout=report,
        )
    give_up_at = time.monotonic() + seconds + 90
    with httpx.Client(base_url=server.url, timeout=10) as probe:
        while load.poll() is None:
            if time.monotonic() > give_up_at:
                load.kill()
                raise AssertionError(f"the load generator did not finish in {seconds} + 90 s")
            for path in ("/healthz", "/metrics"):
                started = time.perf_counter()
                assert probe.get(path).status_code == 200, f"{path} failed under load"
                probe_s.append(time.perf_counter() - started)
            rss_samples.append(max(p.memory_info().rss for p in master.children()))
            time.sleep(0.5)
    assert load.returncode == 0, f"the load generator failed with {load.returncode}"
    load_stopped = time.monotonic()
    # How soon a lone request is answered once the load stops, then its usual latency.
    lone_latency_s(server.url, photo, count=1)
    recovered_s = time.monotonic() - load_stopped
    idle_after_s = lone_latency_s(server.url, photo, count=IDLE_SAMPLES)
    lone_after = 1 + IDLE_SAMPLES
    result = json.loads(report_path.read_text())
    sent = sum(len(values) for values in result["latencies_s"].values())
    # The middleware counts a request as its response ends, a moment after the client reads it.
    deadline = time.monotonic() + 5
    while True:
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        counted = cls_requests_counted(metrics) - counted_before - lone_after
        if counted >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return OverloadRun(
        latencies_s=result["latencies_s"],
        missing_retry_after=result["missing_retry_after"],
        counted_by_server=counted,
        probe_s=probe_s,
        rss_before=rss_before,
        rss_samples=rss_samples,
        idle_before_s=idle_before_s,
        idle_after_s=idle_after_s,
        recovered_s=recovered_s,
        queue_depth_after=metric_value(metrics, "batch_queue_depth"),
    )


def assert_overload_handled(
    run: OverloadRun, request_timeout_s: float, *, mostly_refused: bool = True
) -> None:
    """What 10x capacity must leave true; ``mostly_refused`` where the queue is too short
    to hold the clients."""
    counts = run.counts
    # Every request got an answer, and only the documented ones: nothing lost.
    assert set(counts) <= {"200", "503", "504"}, counts
    assert run.counted_by_server == run.sent, "the server must have answered every request sent"
    assert counts["200"] > 0
    if mostly_refused:
        assert counts["503"] > counts["200"], "10x capacity must be mostly refused"
    assert run.missing_retry_after == 0
    # Refusals are immediate, not queued: far below the request deadline.
    if "503" in counts:
        assert statistics.median(run.latencies_s["503"]) < request_timeout_s / 5
    # Accepted requests finish (200) or give up (504) by their deadline, plus transfer and
    # scheduling slack.
    accepted_s = run.latencies_s["200"] + run.latencies_s.get("504", [])
    assert max(accepted_s) < request_timeout_s + 2.0
    assert max(run.probe_s) < 2.0
    # Queue and upload limits bound memory: a queued crop is 147 KiB, 256 of them 37 MiB.
    assert max(run.rss_samples) - run.rss_before < 300 * 2**20
    # Back to normal without a restart.
    assert run.idle_after_s < 3 * run.idle_before_s + 0.05
    assert run.recovered_s < 2.0
    assert run.queue_depth_after == 0


def test_ten_times_capacity_is_refused_fast_and_the_server_recovers(
    tmp_path: Path, photos: list[Path]
) -> None:
    """256 clients against one worker: 503s at once, no lost request, probes stay prompt."""
    env = server_env(tmp_path, MAX_QUEUE="32", REQUEST_TIMEOUT_MS="5000")
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        run = overload(server, photos[0], clients=256, seconds=12)
        assert server.process.poll() is None, "the server must survive the load"
    print(run.summary("overload"))
    assert_overload_handled(run, request_timeout_s=5.0)


def test_ten_times_capacity_at_the_default_settings_is_answered_in_time(
    tmp_path: Path, photos: list[Path]
) -> None:
    """256 clients against the defaults (MAX_QUEUE 256 per lane, REQUEST_TIMEOUT_MS 10000,
    the worker's threads as it sizes them): the queue holds every client, so each waits its
    turn and is answered within its deadline, or given its 504 at it; nothing is lost, the
    probes stay prompt, memory bounded, and the server is back to normal at once."""
    env = server_env(tmp_path)
    del env["TORCH_THREADS"]
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        run = overload(server, photos[0], clients=256, seconds=12)
        assert server.process.poll() is None, "the server must survive the load"
    print(run.summary("overload at the default settings"))
    assert_overload_handled(run, request_timeout_s=10.0, mostly_refused=False)


@pytest.mark.soak
def test_sustained_overload_does_not_grow_memory(tmp_path: Path, photos: list[Path]) -> None:
    """``SOAK_S`` seconds (default 300) of 10x capacity: the overload test's guarantees hold
    throughout, and the worker's RSS levels off instead of growing with the requests served."""
    seconds = float(os.environ.get("SOAK_S", "300"))
    env = server_env(tmp_path, MAX_QUEUE="32", REQUEST_TIMEOUT_MS="5000")
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        run = overload(server, photos[0], clients=256, seconds=seconds)
        assert server.process.poll() is None, "the server must survive the load"
    quarter = max(1, len(run.rss_samples) // 4)
    early_peak = max(run.rss_samples[:quarter])
    late_peak = max(run.rss_samples[-quarter:])
    print(
        run.summary(f"soak {seconds:.0f} s")
        + f"; RSS peak in the first quarter {early_peak / 2**20:.0f} MiB, in the last "
        f"{late_peak / 2**20:.0f} MiB"
    )
    assert_overload_handled(run, request_timeout_s=5.0)
    assert late_peak - early_peak < 50 * 2**20, "worker memory grows under sustained load"


def connections_to(pid: int, port: int) -> int:
    """Client connections that worker ``pid`` holds open on the server's port."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
    )


def counted_a_request(counter_file: Path) -> bool:
    """Whether one worker's multiprocess counter file holds an ``http_requests_total`` sample."""
    if not counter_file.exists():
        return False
    samples = MmapedDict.read_all_values_from_file(str(counter_file))
    return any('"http_requests_total"' in key for key, *_ in samples)


def test_workers_stop_when_the_master_is_killed(tmp_path: Path) -> None:
    """SIGKILL the master alone: its worker exits too, so the port is free for a restart."""
    port = free_port()
    with running_server(tmp_path, gunicorn_command(port), server_env(tmp_path)) as server:
        (worker,) = [psutil.Process(pid) for pid in worker_pids(server)]
        os.kill(server.process.pid, signal.SIGKILL)
        worker.wait(timeout=60)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_a_killed_worker_is_replaced_and_the_other_keeps_serving(
    tmp_path: Path, photos: list[Path]
) -> None:
    """SIGKILL one of two workers under load: only its own connections fail, gunicorn starts
    a replacement that serves, and /metrics drops the dead worker's live gauges."""
    photo = photos[0].read_bytes()
    metrics_dir = tmp_path / "metrics"
    env = server_env(tmp_path, WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    port = free_port()
    clients = 8
    before, during, after = Tally(), Tally(), Tally()
    killed: dict[str, float] = {}

    async def load_around_kill(server: ServerProcess, workers: set[int]) -> int:
        """The worker killed: the one holding the most client connections (the kernel may
        give all of them to one, and a worker that served nothing leaves no counters)."""
        stop = asyncio.Event()
        first = asyncio.create_task(clients_until(server.url, photo, clients, stop, before))
        await asyncio.sleep(2)
        stop.set()
        await first
        stop = asyncio.Event()
        second = asyncio.create_task(clients_until(server.url, photo, clients, stop, during))
        await asyncio.sleep(1)
        # The clients keep their connections, so these are the requests the kill can cut.
        held = {pid: connections_to(pid, port) for pid in workers}
        victim = max(sorted(workers), key=lambda pid: held[pid])
        killed["connections"] = held[victim]
        killed["elsewhere"] = sum(held.values()) - held[victim]
        os.kill(victim, signal.SIGKILL)
        killed["at"] = time.monotonic()
        await asyncio.sleep(4)
        stop.set()
        await second
        return victim

    async def until_the_replacement_serves(url: str, replacement: int) -> None:
        # Fresh connections spread over both workers until the replacement's own metrics
        # file has counted an HTTP request.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            async with asyncio.timeout(60):
                while not counted_a_request(metrics_dir / f"counter_{replacement}.db"):
                    await asyncio.gather(*(post_photo(client, photo, after) for _ in range(8)))

    def wait_for_replacement(server: ServerProcess, original: set[int]) -> int:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            current = worker_pids(server)
            new = current - original
            # The model_info gauge is set just before the worker turns ready.
            ready = [pid for pid in new if (metrics_dir / f"gauge_livemax_{pid}.db").exists()]
            if len(current) == 2 and ready:
                return ready[0]
            time.sleep(0.1)
        raise AssertionError(f"no ready replacement worker:\n{server.log()}")

    with running_server(tmp_path, gunicorn_command(port), env) as server:
        original = worker_pids(server)
        assert len(original) == 2
        victim = asyncio.run(load_around_kill(server, original))
        replacement = wait_for_replacement(server, original)
        ready_s = time.monotonic() - killed["at"]
        asyncio.run(until_the_replacement_serves(server.url, replacement))
        serving_s = time.monotonic() - killed["at"]
        assert worker_pids(server) == original - {victim} | {replacement}
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        metric_files = {p.name for p in metrics_dir.iterdir()}
        live_files = sorted(name for name in metric_files if "live" in name)

    print(
        f"\nkilled worker ({killed['connections']:.0f} client connections on it, "
        f"{killed['elsewhere']:.0f} on the other): before "
        f"{dict(before.outcomes)}, around the kill {dict(during.outcomes)}, after "
        f"{dict(after.outcomes)}; replacement ready {ready_s:.1f} s and serving "
        f"{serving_s:.1f} s after the kill; live metric files {live_files}; workers "
        f"{sorted(original)} -> {sorted(original - {victim} | {replacement})}"
    )
    assert set(before.outcomes) == {"200"}
    # Only requests on the killed worker's connections may fail, at most one per connection.
    assert set(during.outcomes) <= {"200", CONNECTION_ERROR}
    assert during.outcomes[CONNECTION_ERROR] <= killed["connections"]
    assert during.outcomes["200"] > during.outcomes[CONNECTION_ERROR]
    assert set(after.outcomes) == {"200"}
    # The dead worker's live gauges are gone, the replacement's are there; counters of all
    # three processes still add up.
    assert not any(str(victim) in name for name in live_files)
    assert f"gauge_livesum_{replacement}.db" in live_files
    served = metric_value(metrics, 'http_requests_total{method="POST",route="/cls",status="200"}')
    answered = before.outcomes["200"] + during.outcomes["200"] + after.outcomes["200"]
    # A kill can land between a response and its count, at most once per cut connection.
    assert abs(served - answered) <= killed["connections"]
    assert f"counter_{victim}.db" in metric_files
    assert metric_value(metrics, "batch_queue_depth") == 0
    assert metrics.count("model_info{") == 1


def test_sigterm_under_load_answers_every_accepted_request(
    tmp_path: Path, photos: list[Path]
) -> None:
    """SIGTERM with a full queue: every accepted request gets 200, nothing new is taken,
    and gunicorn exits 0 within its graceful timeout."""
    photo = photos[0].read_bytes()
    drain_timeout_s = 20
    graceful_timeout_s = drain_timeout_s + 10  # as gunicorn_config.py derives it
    env = server_env(tmp_path, MAX_BATCH_SIZE="4", DRAIN_TIMEOUT_S=str(drain_timeout_s))
    port = free_port()
    in_flight = 24
    accepted = Tally()

    async def after_the_signal(path: str) -> str:
        # A fresh connection, as a new client or the orchestrator's probe opens.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as fresh:
            try:
                if path == "/readyz":
                    return str((await fresh.get(path)).status_code)
                files = {"file": ("photo.jpg", photo, "image/jpeg")}
                return str((await fresh.post(path, files=files)).status_code)
            except httpx.TransportError:
                return CONNECTION_ERROR

    async def terminate_with_requests_queued(
        server: ServerProcess, worker: int
    ) -> tuple[float, int, str, str]:
        limits = httpx.Limits(max_connections=in_flight + 4)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            requests = [
                asyncio.create_task(post_photo(client, photo, accepted)) for _ in range(in_flight)
            ]
            # Every request's connection accepted by the worker and some already queued, so
            # all of them were accepted before the signal.
            async with asyncio.timeout(30):
                while connections_to(worker, port) < in_flight:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)
                queued = 0.0
                while queued == 0:
                    queued = metric_value((await client.get("/metrics")).text, "batch_queue_depth")
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            ready_outcome = await after_the_signal("/readyz")
            late_outcome = await after_the_signal("/cls")
            await asyncio.gather(*requests)
            return signalled, int(queued), ready_outcome, late_outcome

    with running_server(tmp_path, gunicorn_command(port), env) as server:
        (worker,) = worker_pids(server)
        signalled, queued, ready_outcome, late_outcome = asyncio.run(
            terminate_with_requests_queued(server, worker)
        )
        exit_code = server.process.wait(graceful_timeout_s + 5)
        exited_s = time.monotonic() - signalled
        log = server.log()

    print(
        f"\nSIGTERM: {in_flight} in flight ({queued} queued at the signal): "
        f"{dict(accepted.outcomes)}; after the signal /readyz: {ready_outcome}, a new "
        f"request: {late_outcome}; exit {exit_code} after {exited_s:.1f} s "
        f"(graceful timeout {graceful_timeout_s} s)"
    )
    assert queued > 0, "the signal must find requests waiting in the queue"
    # Zero dropped: every request accepted before the signal is answered, and answered 200.
    assert accepted.outcomes == Counter({"200": in_flight})
    # Nothing new is taken: not ready, or not even listening.
    assert ready_outcome in ("503", CONNECTION_ERROR)
    assert late_outcome in ("503", CONNECTION_ERROR)
    assert exit_code == 0
    assert exited_s < graceful_timeout_s
    assert "Traceback" not in log


def test_clients_that_hang_up_while_queued_cost_no_model_time(
    tmp_path: Path, photos: list[Path]
) -> None:
    """Over real sockets: clients that close their connection while queued leave the queue
    without reaching the model, and the clients that stay are all served."""
    photo = photos[0].read_bytes()
    # One image per forward, each at least 50 ms: the kept requests ahead keep the model
    # busy for 1.6 s at least, however fast the machine decodes the abandoned ones.
    env = server_env(tmp_path, MAX_BATCH_SIZE="1")
    command = gunicorn_command(free_port(), "tests.slow_model_app:app")
    kept_count, abandoned = 32, 12
    ok = 'batch_requests_total{outcome="ok"}'
    figures: dict[str, float] = {}

    async def send_and_abandon(url: str, ok_before: float) -> list[str]:
        tally = Tally()
        limits = httpx.Limits(max_connections=kept_count)

        async def queued_or_served(probe: httpx.AsyncClient) -> float:
            text = (await probe.get("/metrics")).text
            figures["queued"] = metric_value(text, "batch_queue_depth")
            return figures["queued"] + metric_value(text, ok) - ok_before

        async with (
            httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as keep,
            httpx.AsyncClient(base_url=url, timeout=60) as leave,
            httpx.AsyncClient(base_url=url, timeout=10) as probe,
        ):
            kept = [asyncio.create_task(post_photo(keep, photo, tally)) for _ in range(kept_count)]
            # At most one request is neither queued nor served: the one in the model. The
            # queue is FIFO, so the abandoned requests sent now wait behind all kept ones.
            async with asyncio.timeout(30):
                while await queued_or_served(probe) < kept_count - 1:
                    await asyncio.sleep(0.02)
            left = [asyncio.create_task(post_photo(leave, photo, tally)) for _ in range(abandoned)]
            async with asyncio.timeout(30):
                while await queued_or_served(probe) < kept_count + abandoned - 1:
                    await asyncio.sleep(0.02)
            for task in left:
                task.cancel()  # httpx closes a connection whose request was cancelled
            await asyncio.gather(*left, return_exceptions=True)
            return list(await asyncio.gather(*kept))

    with running_server(tmp_path, command, env) as server:
        before = httpx.get(f"{server.url}/metrics").text
        kept = asyncio.run(send_and_abandon(server.url, metric_value(before, ok)))
        # The kept requests are answered; the queue is empty once their counts land.
        deadline = time.monotonic() + 5
        while True:
            after = httpx.get(f"{server.url}/metrics").text
            if metric_value(after, "batch_queue_depth") == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)

    def delta(sample: str) -> float:
        return metric_value(after, sample) - metric_value(before, sample)

    cancelled = delta('batch_requests_total{outcome="cancelled"}')
    model_runs = delta("batch_size_sum")
    print(
        f"\nhang-ups: {kept_count} kept and {abandoned} abandoned with {figures['queued']:.0f} "
        f"queued: kept {Counter(kept)}; {cancelled:.0f} abandoned left the queue; the model "
        f"ran {model_runs:.0f} requests"
    )
    assert kept == ["200"] * kept_count
    # None of the abandoned requests reached the model ...
    assert model_runs == kept_count
    # ... because the batcher dropped them from its queue (one may have been cut while still
    # decoding, if the model was between two batches as the last one was counted).
    assert abandoned - 1 <= cancelled <= abandoned
    assert delta(ok) == kept_count
    assert metric_value(after, "batch_queue_depth") == 0
