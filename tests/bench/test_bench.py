"""The benchmark's load generator measures what the server does, not its own timing, and
its ideal-server simulation queues as queueing theory says."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import torch
from aiohttp import web
from PIL import Image
from tqdm import tqdm

from bench import __main__ as bench_main
from bench import gpu, large_images, limits, load, overload, report, task_cleanup
from bench import server as bench_server
from bench.__main__ import _saturating_clients, images_in, jpegs_in, run_sweep, targets
from bench.load import StepResult, closed_loop, spaced
from bench.queueing import forward_ms, ideal_latencies_ms
from bench.server import Server
from classification import preprocess
from classification.model import cpu_computes_bfloat16
from service.settings import PROJECT_ROOT
from service.siblings import Siblings, run_directory
from service.tasks import TaskStore
from tests.support import IMAGES_DIR

Handler = Callable[[web.Request], Awaitable[web.Response]]

SERVICE_S = 0.25
CLIENTS = 4


@pytest.fixture
async def slow_server() -> AsyncIterator[Server]:
    """Answers every /cls after SERVICE_S, however many arrive at once."""

    async def classify(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(SERVICE_S)
        return web.json_response({"prediction": []})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="batch_size_count 0\nbatch_size_sum 0\n")

    async with fake_service(classify, metrics) as url:
        yield RssSeries(url)


@contextlib.asynccontextmanager
async def fake_service(classify: Handler, metrics: Handler, prefix: str = "") -> AsyncIterator[str]:
    """A loopback HTTP server answering /cls and /metrics, under ``prefix``, with these
    handlers; its URL."""
    app = web.Application()
    app.router.add_post(f"{prefix}/cls", classify)
    app.router.add_get(f"{prefix}/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class RssSeries(Server):
    """A server whose workers' peak RSS is 7 MiB after a reset, and 0 before one."""

    resets: int = 0

    def reset_peak_rss(self) -> None:
        self.resets += 1

    def peak_worker_rss_bytes(self) -> int:
        return 7 * 2**20 if self.resets else 0


async def test_closed_loop_counts_the_answers_inside_its_window(slow_server: Server) -> None:
    """CLIENTS callers with SERVICE_S per answer complete CLIENTS / SERVICE_S per second.

    Dividing the requests sent in the window by the time until the last one returned would
    stretch the window to that answer: 14 per second, not 16. The step also reports the
    workers' peak RSS, measured from its start.
    """
    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    # Answers arrive every SERVICE_S; the window's edges fall half-way between two of them.
    result = await closed_loop(slow_server, [payload], CLIENTS, duration_s=1.0, warmup_s=0.375)

    assert result.statuses == {"200": 4 * CLIENTS}
    assert result.throughput_per_s == pytest.approx(CLIENTS / SERVICE_S, rel=0.05)
    assert SERVICE_S * 1000 <= result.latency_ms["p50"] < SERVICE_S * 1000 + 60
    assert result.peak_worker_rss_bytes == 7 * 2**20


async def test_a_large_heap_does_not_stop_the_load_generator_in_a_step() -> None:
    """The benchmark holds torch (the in-process limits): some 400,000 objects, which a
    full pass of the garbage collector takes 0.2 s to go over; in a step, it would stop the
    load generator's loop and time every answer that came meanwhile that much late. Here the
    server, in the same process, makes a full pass at each request, as one may come at any
    time."""
    heap = [[index] for index in range(1_000_000)]  # as long-lived as torch's
    passes_s: list[float] = []

    async def classify(request: web.Request) -> web.Response:
        await request.read()
        began = time.perf_counter()
        gc.collect()
        passes_s.append(time.perf_counter() - began)
        return web.json_response({"prediction": []})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="batch_size_count 0\nbatch_size_sum 0\n")

    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    try:
        async with fake_service(classify, metrics) as url:
            result = await closed_loop(RssSeries(url), [payload], 1, duration_s=0.5, warmup_s=0.0)
    finally:
        gc.unfreeze()
    del heap
    assert result.statuses["200"] >= 5
    assert max(passes_s) < 0.05, f"a full pass took {max(passes_s) * 1000:.0f} ms"


async def test_callers_spread_over_processes_are_counted_as_one_step(slow_server: Server) -> None:
    """The same step as above with its callers in two processes: every answer of each is
    counted, in the same window, with the load generator's CPU of both."""
    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    with load.loadgen_pool(2) as pool:
        result = await load.closed_loop_in_processes(
            slow_server, [payload], CLIENTS, duration_s=1.0, warmup_s=0.375, pool=pool
        )

    assert (result.name, result.offered) == (f"closed-{CLIENTS}", CLIENTS)
    assert result.statuses == {"200": 4 * CLIENTS}
    assert result.throughput_per_s == pytest.approx(CLIENTS / SERVICE_S, rel=0.05)
    assert SERVICE_S * 1000 <= result.latency_ms["p50"] < SERVICE_S * 1000 + 60
    assert result.peak_worker_rss_bytes == 7 * 2**20
    assert 0 < result.loadgen_cpu_cores < 2


async def test_spaced_requests_go_one_at_a_time_after_a_gap(slow_server: Server) -> None:
    """Each request waits for the previous answer, then for the gap, the first one too:
    three of them take at least three answers and three gaps, and each latency is one
    answer's, not counting its gap."""
    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    gap_s = SERVICE_S
    result = await spaced(slow_server, [payload], gap_s=gap_s, requests=3)

    assert (result.name, result.kind, result.offered) == ("spaced-0.25s", "spaced", gap_s)
    assert result.statuses == {"200": 3}
    # Without the gap before the first request, they would take 1.25 s.
    assert 3 * (gap_s + SERVICE_S) <= result.duration_s < 3 * (gap_s + SERVICE_S) + 1.0
    assert SERVICE_S * 1000 <= result.latency_ms["p50"] < SERVICE_S * 1000 + gap_s * 1000


async def test_a_step_of_only_errors_has_no_latency_and_no_server_figures_by_url() -> None:
    """Latencies are timed on 200s only: a step without one has none (not 0.0 ms, which
    would look like the fastest server). A server given by URL runs out of sight: no CPU
    or memory figure, rather than NaN (not JSON) or 0 MiB."""

    async def classify(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"detail": "busy"}, status=503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="batch_size_count 0\nbatch_size_sum 0\n")

    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    async with fake_service(classify, metrics) as url:
        result = await closed_loop(Server(url), [payload], 2, duration_s=0.3, warmup_s=0.05)
    assert set(result.statuses) == {"503"}
    assert result.latency_ms == dict.fromkeys(("p50", "p90", "p99", "max"))
    assert (result.server_cpu_cores, result.peak_worker_rss_bytes) == (None, None)
    json.dumps(asdict(result), allow_nan=False)
    [row] = report.step_rows([asdict(result)])[2:]
    assert row.count("| n/a ") == 6
    assert "nan" not in row
    # Status 0 is the load generator's for a request that got no answer at all.
    [row] = report.step_rows([asdict(result) | {"statuses": {"0": 2, "503": 1}}])[2:]
    assert "{'no answer': 2, '503': 1}" in row


async def test_a_server_behind_a_proxys_path_prefix_is_driven_under_it() -> None:
    """--url http://proxy/api: the requests go to /api/cls, as the checks before them."""

    async def classify(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"prediction": []})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="batch_size_count 0\nbatch_size_sum 0\n")

    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    async with fake_service(classify, metrics, prefix="/api") as url:
        result = await closed_loop(
            Server(f"{url}/api"), [payload], 2, duration_s=0.3, warmup_s=0.05
        )
    assert set(result.statuses) == {"200"}


async def test_the_open_loop_measures_its_window_after_a_warm_up() -> None:
    """Arrivals during the warm-up are served but not counted; those of the window are
    counted and timed from their scheduled time, however late they went out."""
    service_s = 0.05
    answered = 0

    async def classify(request: web.Request) -> web.Response:
        nonlocal answered
        await request.read()
        await asyncio.sleep(service_s)
        answered += 1
        return web.json_response({"prediction": []})

    async def metrics(request: web.Request) -> web.Response:
        # As the service counts them: one batch of one per answer.
        return web.Response(text=f"batch_size_count {answered}\nbatch_size_sum {answered}\n")

    rate, warmup_s, duration_s = 40.0, 0.5, 1.5
    arrivals, scheduled = random.Random(7), 0.0
    in_window = 0
    while (scheduled := scheduled + arrivals.expovariate(rate)) <= warmup_s + duration_s:
        in_window += scheduled >= warmup_s
    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    async with fake_service(classify, metrics) as url:
        result = await load.open_loop(
            Server(url), [payload], rate, duration_s, warmup_s, seed=7, label="test"
        )
    assert result.statuses == {"200": in_window}
    assert answered > in_window  # the warm-up's were sent too
    assert result.extra["sent_per_s"] == pytest.approx(in_window / duration_s)
    assert result.extra["latest_send_ms"] < 250  # a fifth of the rate's mean gap at most
    assert result.mean_batch_size == 1.0
    assert service_s * 1000 <= result.latency_ms["p50"] < service_s * 1000 + 100
    assert result.latency_ms["p50"] <= result.latency_ms["p90"] <= result.latency_ms["p99"]


def test_the_server_cpu_counts_the_workers_it_has_replaced(tmp_path: Path) -> None:
    """A worker that exited (and was replaced) used CPU during the step: its time stays
    in the total, which would otherwise drop, or turn negative, across the step."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    master_code = (
        f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {burn!r}])\n"
        "print('reaped', flush=True)\ntime.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", master_code], stdout=subprocess.PIPE) as master:
        try:
            assert master.stdout is not None
            assert master.stdout.readline() == b"reaped\n"
            cpu_s = Server("http://unused", process=master).cpu_seconds()
        finally:
            master.kill()
    assert cpu_s is not None
    assert cpu_s >= 0.5


def test_a_started_server_takes_no_setting_from_the_callers_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An API_KEY (of any case) would answer every request 401, a TORCH_THREADS or
    gunicorn argument would change what is measured, unseen in the report: the server
    gets the benchmark's settings, every other at its default."""
    for name, value in {
        "API_KEY": "s3cret",
        "torch_threads": "1",
        "GUNICORN_CMD_ARGS": "--workers 3",
        "OMP_NUM_THREADS": "1",
        "BENCH_UNRELATED": "kept",
    }.items():
        monkeypatch.setenv(name, value)
    environment = bench_server.server_environment({"WEIGHTS": "random", "WORKERS": "2"})
    assert environment["BENCH_UNRELATED"] == "kept"
    assert environment["PATH"] == os.environ["PATH"]
    assert (environment["WEIGHTS"], environment["WORKERS"]) == ("random", "2")
    for dropped in ("API_KEY", "torch_threads", "GUNICORN_CMD_ARGS", "OMP_NUM_THREADS"):
        assert dropped not in environment
    # The CPU, unless a benchmark names its device: at auto, a GPU present would serve.
    monkeypatch.setenv("DEVICE", "cuda")
    assert environment["DEVICE"] == "cpu"
    assert bench_server.server_environment({})["DEVICE"] == "cpu"
    assert bench_server.server_environment({"DEVICE": "cuda:1"})["DEVICE"] == "cuda:1"


def test_a_started_server_has_a_task_store_of_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The default DATA_DIR, ./data, may hold the tasks of a server that a user runs: the
    benchmark's servers keep theirs apart, and remove them as they stop."""
    started: list[dict[str, str]] = []

    class Started:
        def __init__(self, command: list[str], **kwargs: Any) -> None:
            started.append(kwargs["env"])
            self.returncode: int | None = None

        def poll(self) -> int | None:
            return self.returncode

        def send_signal(self, signum: int) -> None:
            self.returncode = -signum

        def wait(self, timeout: float | None = None) -> int | None:
            return self.returncode

    monkeypatch.setattr(bench_server.subprocess, "Popen", Started)
    monkeypatch.setattr(bench_server.httpx, "get", lambda *a, **k: httpx.Response(200))
    monkeypatch.setattr(Server, "workers_not_ready", lambda self: 0)
    monkeypatch.setenv("DATA_DIR", str(PROJECT_ROOT / "data"))

    with bench_server.start({"WEIGHTS": "random"}, tmp_path), bench_server.start({}, tmp_path):
        data_dirs = [Path(env["DATA_DIR"]) for env in started]
        assert all(data_dir.is_dir() for data_dir in data_dirs)
        assert len(set(data_dirs)) == 2
        assert PROJECT_ROOT / "data" not in data_dirs
    assert not any(data_dir.exists() for data_dir in data_dirs)


@dataclass
class _Process:
    """A process as psutil shows it: a pid and the children listed for it."""

    pid: int
    listed: list[_Process] = field(default_factory=list)

    def children(self) -> list[_Process]:
        return self.listed


def test_workers_without_their_ready_mark_are_not_ready(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker (a child of the master) is ready once it has marked so in the directory of
    the master's run."""
    master = _Process(100, [_Process(101), _Process(102)])
    monkeypatch.setattr(bench_server.psutil, "Process", lambda pid: master)
    monkeypatch.setattr(bench_server, "run_directory", lambda pid: tmp_path / f"run-{pid}")
    (tmp_path / "run-100").mkdir()
    server = Server("http://127.0.0.1:1", process=master)  # type: ignore[arg-type]

    assert server.workers_not_ready() == 2
    (tmp_path / "run-100" / "ready-101").touch()
    assert server.workers_not_ready() == 1
    (tmp_path / "run-100" / "ready-102").touch()
    assert server.workers_not_ready() == 0
    assert Server("http://127.0.0.1:1").workers_not_ready() == 0  # by URL: none to wait for


@pytest.mark.slow
def test_a_started_server_returns_once_each_of_its_workers_is_ready(tmp_path: Path) -> None:
    """Against a real server of two workers, the second ready 3 s after the first: by the
    time ``start`` returns, each has its ready mark, and each has logged its warm-up."""
    settings = {"WEIGHTS": "random", "WORKERS": "2", "FIRST_WORKER_MARK": str(tmp_path / "first")}
    app = "tests.late_workers_app:app"
    with bench_server.start(settings, tmp_path, app=app) as server:
        assert server.process is not None
        workers = psutil.Process(server.process.pid).children()
        siblings = Siblings(run_directory(server.process.pid))
        assert len(workers) == 2
        assert all(siblings.was_ready(worker.pid) for worker in workers)
        assert server.log_path is not None
        assert server.log_path.read_text().count("warm: a batch of 1 takes") == 2


def test_a_started_server_is_ready_once_every_worker_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first worker's /readyz is not enough: clients that connect while the others load
    would stay with that one for a whole step."""
    not_ready = iter([2, 1, 0])

    class Started:
        pid = os.getpid()
        returncode = None

        def __init__(self, command: list[str], **kwargs: Any) -> None:
            pass

        def poll(self) -> None:
            return None

    monkeypatch.setattr(bench_server.subprocess, "Popen", Started)
    monkeypatch.setattr(bench_server.httpx, "get", lambda *a, **k: httpx.Response(200))
    monkeypatch.setattr(Server, "workers_not_ready", lambda self: next(not_ready))
    monkeypatch.setattr(bench_server.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    monkeypatch.setattr(Server, "stop", lambda self: None)

    bench_server.start({}, tmp_path)

    assert next(not_ready, "all asked") == "all asked"


def _closed_step(clients: int, throughput: float, mean_batch: float) -> StepResult:
    return StepResult(
        name=f"closed-{clients}",
        kind="closed",
        offered=clients,
        duration_s=1.0,
        sent=1,
        ok=1,
        statuses={"200": 1},
        throughput_per_s=throughput,
        latency_ms={},
        mean_batch_size=mean_batch,
        server_cpu_cores=0.0,
        loadgen_cpu_cores=0.0,
    )


def _lone_steps(spaced_statuses: dict[str, int]) -> list[dict[str, object]]:
    lone = asdict(_closed_step(1, 40.0, 1.0)) | {
        "name": "closed-1-after",
        "latency_ms": {"p50": 25.8, "p90": 28.0, "p99": 30.0, "max": 31.0},
    }
    ok = spaced_statuses.get("200", 0)
    latency = (
        {"p50": 42.6, "p90": 50.0, "p99": 55.0, "max": 56.0}
        if ok
        else dict.fromkeys(("p50", "p90", "p99", "max"))
    )
    return [
        lone,
        lone
        | {
            "name": "spaced-0.5s",
            "kind": "spaced",
            "offered": 0.5,
            "ok": ok,
            "statuses": spaced_statuses,
            "latency_ms": latency,
        },
    ]


def test_the_low_traffic_report_sets_the_spaced_step_beside_its_neighbours() -> None:
    """The lone step just before it, and the in-process pipeline just after it."""
    in_process = {"pipeline_ms": 22.0, "spaced_pipeline_ms": 35.4}
    results = {"steps": _lone_steps({"200": 40}), "low_traffic": in_process}

    lines = report._low_traffic_lines(results)

    assert "- served p50: 42.6 ms (back to back, the step before: 25.8 ms)" in lines
    assert (
        "- in-process pipeline after the same gap: 35.4 ms (back to back, just before: 22.0 ms)"
        in lines
    )
    assert "| spaced-0.5s | 500 ms apart |" in "\n".join(report.step_rows(results["steps"]))


def test_a_spaced_step_without_answers_is_reported_as_such() -> None:
    """Not as a latency of 0 ms; and results without the in-process figures get no section."""
    results = {
        "steps": _lone_steps({"503": 40}),
        "low_traffic": {"pipeline_ms": 22.0, "spaced_pipeline_ms": 35.4},
    }

    lines = report._low_traffic_lines(results)

    assert "- served p50: no answer ({'503': 40}) (back to back, the step before: 25.8 ms)" in lines
    assert report._low_traffic_lines({"steps": results["steps"]}) == []


def test_saturation_is_measured_with_full_batches() -> None:
    """The paired saturated step uses the fewest clients that filled every batch, even when
    half-full batches happened to run faster during the sweep."""
    sweep = [
        _closed_step(1, 40.0, 1.0),
        _closed_step(16, 64.0, 8.0),
        _closed_step(32, 63.0, 16.0),
        _closed_step(64, 62.0, 16.0),
    ]
    assert _saturating_clients(sweep, max_batch_size=16) == (32, None)
    assert _saturating_clients(sweep[:2], max_batch_size=16)[0] == 16


def test_a_sweep_that_never_filled_its_batches_says_so() -> None:
    """Against a server whose MAX_BATCH_SIZE is not --max-batch-size, target 1 would compare
    with a limit at the wrong batch: the benchmark warns rather than keeping quiet (and the
    report carries the warning, as its terminal does)."""
    filled = [_closed_step(16, 64.0, 8.0), _closed_step(32, 63.0, 16.0)]
    assert _saturating_clients(filled, max_batch_size=16)[1] is None

    half_full = [_closed_step(16, 64.0, 8.0), _closed_step(32, 63.0, 8.0)]
    clients, warning = _saturating_clients(half_full, max_batch_size=16, by_url=True)
    assert clients == 32
    assert warning is not None
    assert "no step kept batches of 16 full (the largest mean batch was 8.0)" in warning
    assert "give the server's MAX_BATCH_SIZE as --max-batch-size" in warning
    # A server started here has the benchmark's --max-batch-size: nothing to give.
    clients, warning = _saturating_clients(half_full, max_batch_size=16)
    assert clients == 32
    assert warning is not None
    assert "no step kept batches of 16 full" in warning
    assert "the sweep's 32 clients did not fill them" in warning
    assert "--url" not in warning
    assert "--max-batch-size" not in warning

    # A server given by --url that runs larger batches than --max-batch-size says.
    larger = [_closed_step(16, 64.0, 8.0), _closed_step(32, 63.0, 15.9)]
    clients, warning = _saturating_clients(larger, max_batch_size=8, by_url=True)
    assert clients == 16
    assert warning == (
        "the server ran batches of 15.9 on average, more than --max-batch-size 8; target 1 "
        "compares with the forward-only limit at 8: give the server's MAX_BATCH_SIZE as "
        "--max-batch-size"
    )


def test_peak_rss_is_the_workers_high_water_mark_since_the_reset() -> None:
    """A worker that touched 64 MiB and let it go shows that peak until the window is reset."""
    script = "import sys, time; b = b'x' * 64 * 2**20; del b; print(flush=True); time.sleep(30)"
    parent = subprocess.Popen(
        ["sh", "-c", f'{sys.executable} -c "{script}"; true'], stdout=subprocess.PIPE
    )
    server = Server("http://unused", parent)
    try:
        assert parent.stdout is not None
        parent.stdout.readline()  # the worker has freed its 64 MiB
        assert server.peak_worker_rss_bytes() > 64 * 2**20
        server.reset_peak_rss()
        assert server.peak_worker_rss_bytes() < 48 * 2**20
    finally:
        for worker in server.workers():
            worker.kill()
        parent.wait(10)
        parent.stdout.close()


def _paired_results(
    forward: dict[str, float], saturated: float, lone_p50: float, pipeline_ms: list[float]
) -> dict[str, Any]:
    """What targets 1 and 2 are computed from, with ``forward`` on both sides of its pair."""
    return {
        "machine": {"busy_before_run": 0.0, "busy_after_run": 0.0},
        "steps": [],
        "memory": {},
        "paired": {
            "forward": [forward, forward],
            "saturated": {"throughput_per_s": saturated, "statuses": {"200": 200}},
            "lone_request": {"latency_ms": {"p50": lone_p50}, "statuses": {"200": 40}},
            "single_image_pipeline_ms": pipeline_ms,
        },
    }


def test_target_1_divides_by_the_fastest_form_of_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server runs the network with its BatchNorm folded, faster than torchvision's:
    divided by the unfolded network's limit alone, what folding gains would pass for a
    serving path that costs nothing."""
    speeds = {"plain": 60.0, "channels_last": 70.0, "served": 80.0}
    monkeypatch.setattr(
        limits.Limits, "forward_images_per_s", lambda self, kind, *args: speeds[kind]
    )
    measured = limits.Limits.__new__(limits.Limits)  # no network built: its speeds are given
    forward = measured.forward_limit(16, 1.0)
    assert forward["forward_limit_images_per_s"] == 80.0
    assert forward["forward_eager_limit_images_per_s"] == 70.0
    results = _paired_results(forward, 68.0, 22.0, [20.0, 20.0])
    throughput, _ = targets(results, max_batch_size=16, workers=1)
    assert throughput["value"] == pytest.approx(68 / 80)
    assert not throughput["met"]
    assert "0.97 of the unfolded network's best, 70.0 images/s" in throughput["note"]


def test_after_the_saturated_step_the_served_network_is_measured_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Target 1 divides by the served network's limit, measured last before the saturated
    step and first after it: equally far from the step on either side."""
    order: list[str] = []

    def measure(self: limits.Limits, kind: str, *args: object) -> float:
        order.append(kind)
        return {"plain": 60.0, "channels_last": 70.0, "served": 80.0}[kind]

    monkeypatch.setattr(limits.Limits, "forward_images_per_s", measure)
    measured = limits.Limits.__new__(limits.Limits)
    before = measured.forward_limit(16, 1.0)
    after = measured.forward_limit(16, 1.0, served_first=True)
    assert order == ["plain", "channels_last", "served", "served", "channels_last", "plain"]
    assert before == after


@pytest.mark.skipif(not cpu_computes_bfloat16(), reason="needs a CPU with AMX")
def test_the_limits_of_a_bfloat16_server_are_measured_in_bfloat16() -> None:
    """Its network, the pipeline's classifier and the bare process's, as the server runs it."""
    measured = limits.Limits(sorted(IMAGES_DIR.glob("*.jpg"))[:1], threads=1, dtype="bfloat16")
    assert measured.classifier.dtype == torch.bfloat16
    for kind, network in measured.networks.items():
        assert measured.forward_images_per_s(kind, 1, seconds=0.01) > 0
        assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    assert measured.pipeline_ms(seconds=0.01) > 0
    rss = bench_main.bare_rss_bytes(max_batch_size=2, threads=1, dtype="bfloat16")
    assert rss > 0


def test_a_lone_request_faster_than_the_model_alone_is_no_measurement() -> None:
    """A machine that slowed down for the pipeline's measurements and not the server's
    would make target 2 pass on a ratio no server can reach."""
    results = _paired_results({"forward_limit_images_per_s": 70.0}, 64.0, 311.0, [612.0, 614.0])
    _, lone = targets(results, max_batch_size=16, workers=1)
    assert lone["value"] == pytest.approx(311 / 613)
    assert not lone["met"]
    assert "implausible" in lone["note"]


def test_a_server_faster_than_its_model_alone_is_no_measurement() -> None:
    """A machine that slowed down for the forward-only limits and not the server's steps
    would make target 1 pass on a ratio no server can reach."""
    results = _paired_results({"forward_limit_images_per_s": 40.0}, 64.0, 22.0, [20.0, 20.0])
    throughput, _ = targets(results, max_batch_size=16, workers=1)
    assert throughput["value"] == pytest.approx(64 / 40)
    assert not throughput["met"]
    assert "implausible" in throughput["note"]
    # A server given by --url may run on a faster machine than the limits were measured on.
    remote = targets(results, max_batch_size=16, workers=None)[0]
    assert remote["met"]
    assert "implausible" not in remote["note"]


def test_the_recorded_command_hides_the_api_key() -> None:
    """The report is kept, committed even: a key given on the command line stays out of it."""
    argv = ["--url", "http://h:5001", "--api-key", "s3cret", "--full", "--api-key=other"]
    shown = bench_main.recorded_command("bench", argv)
    assert shown == "python -m bench --url http://h:5001 --api-key '***' --full '--api-key=***'"
    assert "s3cret" not in shown
    # Nor a password in the URL, a proxy's basic authentication.
    argv = ["--url", "http://me:s3cret@h:5001/api", "--url=https://me:p%40ss@h", "http://me:p@ss@h"]
    shown = bench_main.recorded_command("bench", argv)
    assert shown == (
        "python -m bench --url 'http://me:***@h:5001/api' '--url=https://me:***@h' "
        "'http://me:***@h'"
    )


def test_a_run_on_a_busy_machine_says_its_figures_are_unreliable() -> None:
    """Other processes slow both sides of every pair alike for the whole run, which no
    pair's drift shows: the load measured around the run does."""
    assert bench_main.other_load_warning({"busy_before_run": 0.01, "busy_after_run": 0.0}) is None
    warning = bench_main.other_load_warning({"busy_before_run": 0.02, "busy_after_run": 0.55})
    assert warning is not None
    assert warning.startswith("other processes kept the machine 55% busy")


def test_the_results_name_the_commit_measured() -> None:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
    ).stdout.strip()
    commit = bench_main.commit()
    assert commit is not None
    assert commit.removesuffix("+changes") == head


def test_a_ratio_whose_pair_drifted_is_flagged() -> None:
    """Targets 1 and 2 divide by the mean of two in-process measurements taken either side
    of the served one; when those two differ by more than 5 %, the ratio says so."""
    forward = {"forward_limit_images_per_s": 70.0, "forward_served_images_per_s": 77.0}
    results = _paired_results(forward, 64.0, 24.2, [23.8, 21.7])
    results["paired"]["forward"][1] = {**forward, "forward_limit_images_per_s": 71.0}
    throughput, lone = targets(results, max_batch_size=16, workers=1)
    assert throughput["pair_drift"] == pytest.approx(1 / 70.5)
    assert "unreliable" not in throughput["note"]
    assert lone["pair_drift"] == pytest.approx(2.1 / 22.75)
    assert lone["note"].endswith("A drifted 9.2% across the pair; unreliable, run again")


def test_the_ideal_server_without_batching_queues_as_queueing_theory_says() -> None:
    """With batches of one and a constant forward time, the simulation is an M/D/1 queue:
    its mean wait is rho * D / (2 * (1 - rho)) (Pollaczek-Khinchine)."""
    service_ms, rate_per_s = 10.0, 70.0
    rho = rate_per_s * service_ms / 1000
    latencies = ideal_latencies_ms(
        rate_per_s, {1: service_ms}, decode_ms=0.0, max_batch_size=1, requests=200_000
    )
    mean_wait_ms = statistics.mean(latencies) - service_ms
    assert mean_wait_ms == pytest.approx(rho * service_ms / (2 * (1 - rho)), rel=0.05)


def test_the_ideal_server_batches_what_waits_and_adds_the_decode() -> None:
    # Rare arrivals: each alone, decode then a batch of one.
    alone = ideal_latencies_ms(1.0, {1: 10.0, 16: 100.0}, 3.0, 16, requests=1000)
    assert statistics.median(alone) == pytest.approx(13.0)
    # Arrivals far faster than batches of one can serve: full batches keep up.
    busy = ideal_latencies_ms(150.0, {1: 10.0, 16: 100.0}, 3.0, 16, requests=20_000)
    assert max(busy) < 400  # a batch-of-one server (at most 100/s) would fall behind for good


def test_forward_times_between_and_beyond_measured_batch_sizes() -> None:
    measured = {1: 16.0, 2: 30.0, 16: 200.0}
    assert forward_ms(measured, 2) == 30.0
    assert forward_ms(measured, 9) == pytest.approx(30.0 + 7 * 170 / 14)
    assert forward_ms(measured, 32) == pytest.approx(200.0 + 16 * 170 / 14)
    assert forward_ms({4: 40.0}, 2) == 20.0


def _results_for_targets(offered_at_75: float) -> dict[str, Any]:
    """A run's figures, as ``targets`` reads them: target 4's step between two idle ones."""
    answered = {"statuses": {"200": 40}}
    idle = {"latency_ms": {"p50": 20.0}, **answered}
    return {
        "machine": {"busy_before_run": 0.0, "busy_after_run": 0.0},
        "steps": [
            {"name": "closed-1", "latency_ms": {"p50": 99.0}},  # not beside the open step
            {"name": "closed-1-before-open", **idle},
            {
                "name": "open-75%",
                "offered": offered_at_75,
                "latency_ms": {"p99": 200.0},
                **answered,
            },
            {"name": "closed-1-after", "latency_ms": {"p50": 30.0}, **answered},
        ],
        "memory": {},
        "paired": {
            "forward": [{"forward_limit_images_per_s": 70.0, "forward_served_images_per_s": 77.0}]
            * 2,
            "saturated": {"throughput_per_s": 64.0, **answered},
            "lone_request": {"latency_ms": {"p50": 24.0}, **answered},
            "single_image_pipeline_ms": [22.0, 22.0],
        },
        "limits": {
            "preprocess_ms_per_image": 3.0,
            "forward_served_ms_batch_1": 16.0,
            "forward_served_ms_batch_16": 200.0,
        },
    }


def test_the_ideal_figure_divides_the_arrivals_among_the_workers() -> None:
    """Target 4 divides by the idle p50s just before and after its step. Each worker's
    model, measured in process, sees its share of the offered rate; for a server given by
    URL nothing here describes its model, so no figure is given."""
    results = _results_for_targets(offered_at_75=60.0)
    one = targets(results, max_batch_size=16, workers=1)[2]
    two = targets(results, max_batch_size=16, workers=2)[2]
    assert one["value"] == two["value"] == 200.0 / 25.0
    assert one["pair_drift"] == pytest.approx(10 / 25)
    assert "unreliable" in one["note"]
    assert 0 < two["ideal_server_value"] < one["ideal_server_value"]
    by_url = {t["name"][:2]: t for t in targets(results, max_batch_size=16, workers=None)}
    assert "ideal_server_value" not in by_url["4."]


def test_with_url_the_targets_it_cannot_measure_say_so() -> None:
    """Target 3 needs a server with batching off, target 5 the workers' memory: neither is
    had for a server given by URL. Their rows say so, rather than missing from the report."""
    results = _results_for_targets(offered_at_75=60.0)
    found = targets(results, max_batch_size=16, workers=None)
    assert [t["name"][:2] for t in found] == ["1.", "2.", "3.", "4.", "5."]
    for target in (found[2], found[4]):
        assert target["met"] is None
        assert target["value"] is None
        assert target["note"].startswith("not measured: with --url")
        assert "| not measured |" in "\n".join(report.target_rows([target]))
    started_here = [t["name"][:2] for t in targets(results, max_batch_size=16, workers=1)]
    assert started_here == ["1.", "2.", "4."]  # no baseline or memory in these figures


def test_no_ideal_figure_for_a_rate_the_ideal_server_cannot_serve() -> None:
    """Batches of 16 in 200 ms serve 80 images/s: at 90 a second, the simulated queue
    grows for as long as the simulation runs, and its p99 with it. So it does where a
    smaller batch does more images a second: once 16 wait, the server runs 16."""
    target = targets(_results_for_targets(offered_at_75=90.0), max_batch_size=16, workers=1)[2]
    assert target["ideal_server_value"] is None
    assert "at most 80.0 images/s a worker, under the 90.0 offered" in target["note"]
    results = _results_for_targets(offered_at_75=85.0)
    results["limits"]["forward_served_ms_batch_8"] = 80.0  # 100 images/s
    target = targets(results, max_batch_size=16, workers=1)[2]
    assert target["ideal_server_value"] is None
    assert "at most 80.0 images/s a worker, under the 85.0 offered" in target["note"]


def test_the_forward_limit_of_several_workers_is_each_ones_times_their_number() -> None:
    """Each worker is measured in process with its share of the cores: the served
    throughput of two is compared with twice what one does."""
    one, two = (
        targets(_results_for_targets(60.0), max_batch_size=16, workers=n)[0] for n in (1, 2)
    )
    assert one["value"] == pytest.approx(64.0 / 70.0)
    assert two["value"] == pytest.approx(64.0 / 140.0)
    assert "64.0 / 140.0 images/s (2 workers, each its share of the cores)" in two["note"]


def test_workers_beyond_the_cores_do_not_multiply_the_forward_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each gets one thread, but they share the cores: four workers on two cores run two
    forward passes at a time, not four."""
    monkeypatch.setattr(bench_main, "available_cores", lambda: 2)
    four = targets(_results_for_targets(60.0), max_batch_size=16, workers=4)[0]
    assert four["value"] == pytest.approx(64.0 / 140.0)


def test_a_target_whose_step_had_no_answer_has_no_value_and_is_not_met() -> None:
    """A lone step answered only with errors has no latency: target 2 has no value rather
    than 0.0 (which would meet it), and the reports say so."""
    results = _results_for_targets(60.0)
    results["paired"]["lone_request"]["latency_ms"]["p50"] = None
    results["steps"][2]["latency_ms"]["p99"] = None
    results["paired"]["saturated_after_baseline"] = {"throughput_per_s": 0.0, "statuses": {}}
    results["baseline"] = [{"throughput_per_s": 40.0, "statuses": {"200": 160}}]
    found = targets(results, max_batch_size=16, workers=1)
    lone, batching, open_loop = found[1], found[2], found[3]
    assert (lone["value"], lone["met"]) == (None, False)
    assert lone["note"].startswith("no answer / 22.0 ms")
    assert (open_loop["value"], open_loop["met"]) == (None, False)
    assert batching["value"] == pytest.approx(32.0 / 40.0)
    json.dumps(found, allow_nan=False)


def test_batching_pays_is_a_ratio_between_two_measurements_of_the_batching_server() -> None:
    """Target 3: the batching server's saturated throughput before and after the
    batching-off one, and how far it moved between the two."""
    results = _results_for_targets(60.0)
    results["paired"]["saturated_after_baseline"] = {"throughput_per_s": 56.0, "statuses": {}}
    results["baseline"] = [{"throughput_per_s": 40.0, "statuses": {"200": 160}}]
    batching = targets(results, max_batch_size=16, workers=1)[2]
    assert batching["value"] == pytest.approx(60.0 / 40.0)
    assert batching["pair_drift"] == pytest.approx(8.0 / 60.0)
    assert batching["note"].endswith("A drifted 13.3% across the pair; unreliable, run again")


async def test_overload_step_counts_the_models_work_and_how_late_504s_come() -> None:
    """Every other request is answered; the rest get 504 50 ms past a 100 ms deadline. The
    model ran one request per answer plus one per 504: half of its work was answered."""
    answered = ran = 0

    async def classify(request: web.Request) -> web.Response:
        nonlocal answered, ran
        await request.read()
        ran += 1
        if ran % 2:
            answered += 1
            return web.json_response({"prediction": []})
        await asyncio.sleep(0.15)
        return web.json_response({"detail": "deadline"}, status=504)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=f"batch_size_count {ran}\nbatch_size_sum {ran}\n")

    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    async with fake_service(classify, metrics) as url:
        step = await overload.lateness_under_load(
            Server(url), [payload], 1, duration_s=1.0, timeout_ms=100
        )

    assert step["statuses"]["200"] == answered
    assert step["statuses"]["504"] in (answered - 1, answered)
    assert step["model_ran"] == ran
    assert step["answered_share_of_model_work"] == pytest.approx(0.5, abs=0.1)
    assert 40 <= step["late_504_ms"]["p99"] <= 150


# The GPU benchmark's steps, run on the CPU here (and on CUDA where there is one).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _shared_jpegs() -> list[bytes]:
    jpegs = [path.read_bytes() for path in sorted(IMAGES_DIR.glob("*.jpg"))]
    assert jpegs, f"no test photos in {IMAGES_DIR}; set TEST_IMAGES_DIR"
    return jpegs


@pytest.mark.parametrize(
    ("device", "max_levels", "mean_levels"),
    # nvJPEG upsamples chroma without libjpeg-turbo's smoothing: levels apart at colour
    # edges (up to 20 for the shared photos on an H200), as torchvision's own test of it
    # allows (a mean below 2).
    [("cpu", 2, 0.5), pytest.param("cuda", 24, 1.0, marks=cuda)],
)
def test_decoding_on_the_device_makes_the_services_crops(
    device: str, max_levels: int, mean_levels: float
) -> None:
    """The GPU decode limit times the same work as the service's preprocessing: its crops
    are those of ``preprocess`` for every shared photo, to a few levels at most."""
    jpegs = _shared_jpegs()
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]

    crops = gpu.decode_on_device(encoded, torch.device(device)).cpu().numpy()

    for data, crop in zip(jpegs, crops, strict=True):
        ours = preprocess(data, max_pixels=gpu.MAX_PIXELS)
        assert crop.shape == ours.shape == (224, 224, 3)
        difference = np.abs(crop.astype(int) - ours.astype(int))
        assert difference.max() <= max_levels
        assert difference.mean() < mean_levels


def test_the_gpu_decode_leaves_out_an_image_it_cannot_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A batched decode fails whole on one bad JPEG: it is left out, and said so."""
    good = _shared_jpegs()[:2]
    broken = good[0][:2] + b"\x00" * 64  # a JPEG's signature, then nothing readable

    assert gpu.decodable_on_device([good[0], broken, good[1]], torch.device("cpu")) == good
    assert "left out of the GPU decode" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "dtype"),
    [("cpu", torch.float32), pytest.param("cuda", torch.float16, marks=cuda)],
)
def test_the_gpu_benchmarks_limits_are_measured(device: str, dtype: torch.dtype) -> None:
    jpegs = _shared_jpegs()

    forward = gpu.forward_images_per_s(torch.device(device), dtype, [1, 2], seconds=0.05)
    decode = gpu.gpu_decode_images_per_s(jpegs, torch.device(device), 2, seconds=0.05)

    assert list(forward) == [1, 2]
    assert all(rate > 0 for rate in forward.values())
    assert decode > 0


@pytest.mark.parametrize(
    ("device", "served", "measured"),
    [
        ("cpu", "float32", ["float32"]),
        ("cuda", "float16", ["float16", "bfloat16"]),
        ("cuda", "float32", ["float16", "bfloat16", "float32"]),
    ],
)
def test_the_forward_limit_is_measured_in_both_16_bit_dtypes_on_a_gpu(
    device: str, served: str, measured: list[str]
) -> None:
    assert gpu.forward_dtypes(torch.device(device), served) == measured


def test_the_cpu_decode_limit_is_measured_in_each_process() -> None:
    """Processes spawned as many as asked, each decoding the photos; their rates summed.
    (How well they scale depends on the cores free at the time, so it is not asserted.)"""
    jpegs = _shared_jpegs()

    rate = gpu.cpu_decode_images_per_s(jpegs, 2, seconds=0.3)

    assert rate > 0


def test_the_images_are_found_in_subfolders_in_every_format_the_service_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = Image.open(next(IMAGES_DIR.glob("*.jpg"))).convert("RGB")
    (tmp_path / "sub").mkdir()
    photo.save(tmp_path / "sub" / "a.webp")
    photo.save(tmp_path / "b.bmp")
    (tmp_path / "notes.txt").write_text("not an image, and not named as one")
    assert images_in(tmp_path) == [tmp_path / "b.bmp", tmp_path / "sub" / "a.webp"]
    # Through a link to a folder elsewhere, and a link loop, which is read once.
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    photo.save(elsewhere / "d.png")
    (tmp_path / "linked").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(tmp_path)
    assert images_in(tmp_path) == [
        tmp_path / "b.bmp",
        tmp_path / "linked" / "d.png",
        tmp_path / "sub" / "a.webp",
    ]
    (tmp_path / "linked").unlink()
    (tmp_path / "c.jpg").write_bytes(b"text named as a JPEG")
    with pytest.raises(ValueError, match=r"c\.jpg: the upload is not a JPEG, PNG"):
        images_in(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        images_in(tmp_path / "missing")
    (tmp_path / "c.jpg").unlink()
    # Valid, but every request would be refused 413, found only once the sweep began.
    Image.effect_noise((2000, 1400), 64).convert("RGB").save(tmp_path / "huge.png")
    monkeypatch.setattr(bench_main, "DEFAULT_MAX_UPLOAD_BYTES", 1_000_000)
    with pytest.raises(ValueError, match=r"huge\.png: \d+ bytes, over the service's MAX_UPLOAD"):
        images_in(tmp_path)


def test_the_jpeg_benchmarks_take_the_jpegs_among_the_images(tmp_path: Path) -> None:
    """The GPU and large-image benchmarks decode JPEG only: they read the folder as the
    others do, subfolders included, and keep its JPEGs."""
    photo = Image.open(next(IMAGES_DIR.glob("*.jpg"))).convert("RGB")
    photo.save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no JPEG images in"):
        jpegs_in(tmp_path)
    (tmp_path / "sub").mkdir()
    photo.save(tmp_path / "sub" / "b.JPEG")
    photo.save(tmp_path / "c.jfif", "JPEG")
    assert jpegs_in(tmp_path) == [tmp_path / "c.jfif", tmp_path / "sub" / "b.JPEG"]
    with pytest.raises(ValueError, match="is not a folder"):
        jpegs_in(tmp_path / "missing")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--workers", "0"], "must be at least 1, not 0"),
        (["--max-batch-size", "-1"], "must be at least 1, not -1"),
        (["--images", "/nonexistent"], "--images /nonexistent is not a folder"),
        (
            ["--url", "http://127.0.0.1:9", "--images", str(IMAGES_DIR)],
            "--url http://127.0.0.1:9 cannot be reached",
        ),
        (["--out", str(PROJECT_ROOT / "README.md")], "README.md is a file, not a folder"),
        (["--out", "/proc/bench-results"], "--out /proc/bench-results cannot hold the results"),
        (
            ["--workers", "65", "--images", str(IMAGES_DIR)],
            "--workers 65: input should be less than or equal to 64, as the service allows",
        ),
        (
            ["--max-batch-size", "2000", "--images", str(IMAGES_DIR)],
            "--max-batch-size 2000: input should be less than or equal to 1024",
        ),
        (["--dtype", "Float16"], "--dtype: float16 runs on a GPU only (python -m bench.gpu)"),
        (["--dtype", "bf16"], "--dtype: must be float32 or bfloat16, not 'bf16'"),
    ],
)
def test_a_bad_argument_is_one_line_before_any_measurement(
    arguments: list[str], message: str
) -> None:
    # Settings the caller's environment holds, invalid or not, are no business of the
    # benchmark's: the servers it starts do not take them.
    unrelated = {"MAX_QUEUE": "abc", "WEBHOOK_BACKOFF_S": "5", "WEBHOOK_BACKOFF_MAX_S": "1"}
    finished = subprocess.run(
        [sys.executable, "-m", "bench", *arguments],
        cwd=PROJECT_ROOT,
        env=os.environ | unrelated,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2
    assert message in finished.stderr
    assert "Traceback" not in finished.stderr


class _KeyedServer(BaseHTTPRequestHandler):
    """Ready, serving in the dtype its server's ``dtype`` names (float32 by default; None:
    its /metrics is 404, as through the proxy in deploy/nginx), and answers /cls 401
    without the key "right"."""

    def do_GET(self) -> None:
        dtype = getattr(self.server, "dtype", "float32")
        if self.path != "/metrics" or dtype is None:
            self._answer(200 if self.path != "/metrics" else 404)
            return
        body = f'model_info{{device="cpu",dtype="{dtype}",model="resnet18"}} 1.0\n'.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(200 if self.headers.get("X-API-Key") == "right" else 401)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("key", "served", "message"),
    [
        ([], "float32", "answers 401: give its API_KEY with --api-key"),
        (["--api-key", "wrong"], "float32", "answers 401: --api-key is not its API_KEY"),
        # The in-process limits would be measured in another dtype than it serves in.
        (
            ["--api-key", "right"],
            "float16",
            "serves in float16 (model_info on its /metrics), not --dtype float32: give its "
            "DTYPE as --dtype",
        ),
        (
            ["--api-key", "right"],
            None,
            "answers 404 for /metrics, where the benchmark reads the batch sizes: give one "
            "server's own address, not a proxy's",
        ),
    ],
)
def test_a_url_that_refuses_the_benchmarks_requests_is_one_line_before_any_measurement(
    key: list[str], served: str | None, message: str
) -> None:
    keyed = ThreadingHTTPServer(("127.0.0.1", 0), _KeyedServer)
    keyed.dtype = served  # type: ignore[attr-defined]
    threading.Thread(target=keyed.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{keyed.server_address[1]}"
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "bench", "--url", url, "--images", str(IMAGES_DIR), *key],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        keyed.shutdown()
        keyed.server_close()
    assert finished.returncode == 2
    assert f"--url {url} {message}" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_server_that_cannot_start_says_why_from_its_log(tmp_path: Path) -> None:
    data_dirs_before = set(Path(tempfile.gettempdir()).glob("bench-tasks-*"))

    with pytest.raises(bench_server.ServerNotStarted) as refused:
        bench_server.start({"WORKERS": "0"}, tmp_path / "logs", timeout_s=30)

    assert str(refused.value).startswith("the server exited with status 3 as it started; ")
    assert "WORKERS='0': Input should be greater than or equal to 1" in str(refused.value)
    assert set(Path(tempfile.gettempdir()).glob("bench-tasks-*")) == data_dirs_before


@pytest.mark.slow
def test_the_null_model_serves_every_request_without_the_network(tmp_path: Path) -> None:
    """``bench.null_model`` answers through the whole serving path (a bad image still gets
    its 400) with a constant score for every class: no forward pass ran."""
    photo = sorted(IMAGES_DIR.glob("*.jpg"))[0]
    with bench_server.start({"WEIGHTS": "random"}, tmp_path, app="bench.null_model:app") as server:
        answer = httpx.post(
            f"{server.url}/cls", params={"top_k": 3}, files={"file": photo.read_bytes()}
        )
        refused = httpx.post(f"{server.url}/cls", files={"file": b"not an image"})
        metrics = bench_server.scrape(server.url)

    assert answer.status_code == 200, answer.text
    assert [p["index"] for p in answer.json()["prediction"]] == [0, 1, 2]
    assert {p["score"] for p in answer.json()["prediction"]} == {0.001}
    assert refused.status_code == 400
    assert metrics["batch_size_count"] == 1  # the one image was batched as always


@pytest.mark.slow
def test_the_servers_it_started_stop_with_the_benchmark(tmp_path: Path) -> None:
    """Stopped by SIGTERM, or by Ctrl-C while a server still starts, the benchmark stops the
    servers it started: none is left listening."""
    script = f"""
import contextlib, os, signal, subprocess, sys
from pathlib import Path
from bench import server as bench_server
from bench.__main__ import exit_on_signal
signal.signal(signal.SIGTERM, exit_on_signal)
log_dir = Path({str(tmp_path)!r})
started = []
class Recorded(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        started.append(self.pid)
bench_server.subprocess.Popen = Recorded
settings = {{"WEIGHTS": "random", "DEVICE": "cpu"}}
try:
    if sys.argv[1] == "interrupted while starting":
        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt
        bench_server.httpx.get = interrupt
        with contextlib.suppress(KeyboardInterrupt):
            bench_server.start(settings, log_dir)
    else:
        with contextlib.ExitStack() as servers:
            servers.enter_context(bench_server.start(settings, log_dir))
            os.kill(os.getpid(), signal.SIGTERM)
finally:
    print(*started)
"""
    for case in ("terminated", "interrupted while starting"):
        finished = subprocess.run(
            [sys.executable, "-c", script, case],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        [pid] = [int(word) for word in finished.stdout.split()]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, (
            case,
            finished.stderr[-2000:],
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "signum"),
    [
        (["bench", "--out", "{out}"], signal.SIGHUP),
        (["bench.overload", "--clients", "1", "--seconds", "120"], signal.SIGTERM),
    ],
)
def test_a_benchmark_whose_terminal_closed_stops_its_servers(
    tmp_path: Path, command: list[str], signum: int
) -> None:
    """SIGHUP, as a closed terminal sends, ends the benchmark as SIGTERM does: the
    gunicorn it started goes with it, and it says so."""
    arguments = [argument.format(out=tmp_path) for argument in command]
    with (tmp_path / "output").open("wb") as output:
        bench = subprocess.Popen(
            [sys.executable, "-m", *arguments, "--images", str(IMAGES_DIR)],
            cwd=PROJECT_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        servers: list[psutil.Process] = []
        while not servers and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            with contextlib.suppress(psutil.NoSuchProcess):
                servers = [
                    child
                    for child in psutil.Process(bench.pid).children(recursive=True)
                    if "gunicorn" in " ".join(child.cmdline())
                ]
        assert servers, (tmp_path / "output").read_text()[-2000:]
        bench.send_signal(signum)
        assert bench.wait(90) == 128 + signum
        assert "interrupted; the server" in (tmp_path / "output").read_text()
    finally:
        bench.kill()
        bench.wait()
        _, alive = psutil.wait_procs(servers, timeout=10)
        for server in alive:
            server.kill()  # so a failure leaves nothing behind
    assert not alive


async def test_the_api_key_reaches_every_request_and_a_sweep_of_no_answers_stops() -> None:
    """``--api-key`` reaches every request; a sweep in which no request succeeded stops with
    the statuses it got, instead of an open loop at a rate of zero."""

    async def classify(request: web.Request) -> web.Response:
        await request.read()
        if request.headers.get("X-API-Key") != "s3cret":
            return web.json_response({"detail": "missing API key"}, status=401)
        return web.json_response({"prediction": []})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="batch_size_count 0\nbatch_size_sum 0\n")

    payload = (b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"})
    mode = {"clients": [1], "step_s": 0.3, "warmup_s": 0.05, "open_fractions": [0.5]}
    async with fake_service(classify, metrics) as url:
        keyed = await closed_loop(
            Server(url, headers={"X-API-Key": "s3cret"}), [payload], 1, 0.3, 0.05
        )
        assert set(keyed.statuses) == {"200"}
        with tqdm(disable=True) as progress, pytest.raises(SystemExit, match="'401'"):
            await asyncio.to_thread(run_sweep, Server(url), [payload], mode, progress)


async def test_the_large_images_step_tells_small_answers_from_large_ones(
    photos: list[Path],
) -> None:
    """Large uploads are 6000x4000 images that decode; the step counts each kind's answers
    and times only the small ones."""
    small = load.encode_payloads(photos)
    large = large_images.large_payloads(photos[0])
    sizes: list[tuple[int, int]] = []

    async def classify(request: web.Request) -> web.Response:
        upload = (await request.post())["file"]
        assert isinstance(upload, web.FileField)
        size = Image.open(upload.file).size
        sizes.append(size)
        await asyncio.sleep(0.05 if size == large_images.LARGE_SIZE else 0.01)
        return web.json_response({"prediction": []})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="")

    async with fake_service(classify, metrics) as url:
        mixed = await large_images.step(Server(url), small, large, 1.0)
        alone = await large_images.step(Server(url), small, [], 0.5)

    assert mixed["large_answered"] > 0
    assert alone["large_answered"] == 0
    assert sizes.count(large_images.LARGE_SIZE) == mixed["large_answered"]
    assert mixed["small_answered"] + alone["small_answered"] == len(sizes) - mixed["large_answered"]
    assert 10 <= mixed["small_p50_ms"] < 1000


def test_the_clean_up_benchmarks_tasks_are_expired_finished_tasks(tmp_path: Path) -> None:
    """As the service stores them: a week's TTL deletes them, in the clean-up's steps."""
    task_cleanup.fill(tmp_path, 25)
    store = TaskStore(tmp_path)
    try:
        week_ago = time.time() - 7 * 86_400
        assert [store.delete_expired(week_ago, most=10) for _ in range(4)] == [10, 10, 5, 0]
    finally:
        store.close()


def test_overload_refuses_options_it_cannot_honour_in_one_line() -> None:
    """No client count of zero (an empty row), no key for a server that has none, and a
    folder without images named as such rather than a traceback."""
    for arguments, says in (
        (["--clients", "0"], "must be at least 1, not 0"),
        (["--clients", "x"], "must be a whole number, not 'x'"),
        (["--api-key", "k"], "--api-key is for a server given by --url"),
        (["--api", "k"], "unrecognized arguments: --api k"),  # no abbreviation to unmask
        (["--images", "/nonexistent"], "--images /nonexistent is not a folder"),
    ):
        finished = subprocess.run(
            [sys.executable, "-m", "bench.overload", *arguments],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert finished.returncode == 2, finished.stderr
        assert says in finished.stderr
        assert "Traceback" not in finished.stderr


def test_a_target_within_its_bound_whose_pair_drifted_is_not_met() -> None:
    """A lone request's ratio within 1.10 while the pipeline it divides by moved 13 % across
    its pair says too little: the reports call it unreliable, not met."""
    results = _results_for_targets(60.0)
    results["paired"]["single_image_pipeline_ms"] = [20.5, 23.5]  # 13.6 % apart
    results["paired"]["lone_request"]["latency_ms"]["p50"] = 22.0
    lone = targets(results, max_batch_size=16, workers=1)[1]
    assert lone["value"] == pytest.approx(1.0)
    assert (lone["within_bound"], lone["unreliable"], lone["met"]) == (True, True, False)
    (row,) = report.target_rows([lone])
    assert "| unreliable |" in row
    results["paired"]["single_image_pipeline_ms"] = [22.0, 22.0]
    steady = targets(results, max_batch_size=16, workers=1)[1]
    assert (steady["unreliable"], steady["met"]) == (False, True)
    assert "| yes |" in report.target_rows([steady])[0]


def test_batching_steps_one_batch_apart_have_not_drifted() -> None:
    """A saturated step's throughput counts whole batches in its window: 64.0 and 60.0
    images/s in 4 s windows are one batch of 16 apart, the finest the two can differ."""
    results = _results_for_targets(60.0)
    results["baseline"] = [{"throughput_per_s": 40.0, "statuses": {"200": 160}}]
    for apart, drifted in ((4.0, False), (8.0, True)):
        results["paired"]["saturated"] = {
            "throughput_per_s": 60.0 + apart,
            "duration_s": 4.0,
            "statuses": {},
        }
        results["paired"]["saturated_after_baseline"] = {
            "throughput_per_s": 60.0,
            "duration_s": 4.0,
            "statuses": {},
        }
        batching = targets(results, max_batch_size=16, workers=1)[2]
        assert batching["name"].startswith("3.")
        assert batching["unreliable"] is drifted
        assert "beyond one batch per window" in batching["note"]
    assert batching["pair_drift"] == pytest.approx(4.0 / 64.0)


def test_a_target_whose_steps_had_errors_says_so_and_is_not_met() -> None:
    """A throughput counts 200s, and latencies time them: 504s or requests that got no
    answer would leave the figures better than the service is (18 of 25 requests of a
    saturated step of 36-megapixel images can be answered 504, unseen in target 1)."""
    results = _results_for_targets(60.0)
    results["paired"]["saturated"]["statuses"] = {"200": 7, "504": 18}
    results["steps"][2]["statuses"] = {"200": 30, "0": 2}
    results["paired"]["lone_request"]["latency_ms"]["p50"] = 22.0  # within its bound
    results["paired"]["lone_request"]["statuses"] = {"200": 39, "503": 1}
    saturated, lone, open_loop = targets(results, max_batch_size=16, workers=1)[:3]
    assert saturated["note"].endswith("; 18 requests of its steps not answered 200 (18 504)")
    assert open_loop["note"].endswith("; 2 requests of its steps not answered 200 (2 unanswered)")
    assert lone["failed_requests"] == {"503": 1}
    assert (lone["within_bound"], lone["met"]) == (True, False)
    results["paired"]["lone_request"]["statuses"] = {"200": 40}
    assert targets(results, max_batch_size=16, workers=1)[1]["met"] is True


def test_a_run_on_a_busy_machine_meets_no_target() -> None:
    """Other processes' load slows A and B of every pair alike, which no pair's drift
    shows: a run found busy is unreliable, however its ratios came out."""
    results = _results_for_targets(60.0)
    results["paired"]["lone_request"]["latency_ms"]["p50"] = 22.0
    assert targets(results, max_batch_size=16, workers=1)[1]["met"] is True
    results["machine"]["busy_after_run"] = 0.52
    lone = targets(results, max_batch_size=16, workers=1)[1]
    assert (lone["within_bound"], lone["unreliable"], lone["met"]) == (True, True, False)
    assert "| unreliable |" in report.target_rows([lone])[0]


@pytest.mark.parametrize("stopped", [False, True], ids=["written", "stopped as it writes"])
def test_results_are_written_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped: bool
) -> None:
    """A run stopped while it writes says "no results written": the previous run's files
    stay as they were, not a new JSON beside the old report and plots."""
    for suffix in (".json", ".md", "-latency.png"):
        (tmp_path / f"cpu-quick{suffix}").write_text("the previous run")

    def plots(prefix: Path, results: dict[str, Any]) -> list[Path]:
        plot = prefix.with_name(prefix.name + "-latency.png")
        plot.write_text("new")
        return [plot]

    def markdown(path: Path, results: dict[str, Any], plots: list[Path]) -> None:
        if stopped:
            raise KeyboardInterrupt
        path.write_text("new")

    monkeypatch.setattr(report, "write_plots", plots)
    monkeypatch.setattr(report, "write_markdown", markdown)
    with contextlib.suppress(KeyboardInterrupt):
        bench_main.write_results(tmp_path / "cpu-quick", {"figure": 1})
    contents = {path.name: path.read_text() for path in tmp_path.iterdir()}
    names = ("cpu-quick.json", "cpu-quick.md", "cpu-quick-latency.png")
    assert set(contents) == set(names)  # nothing left aside
    if stopped:
        assert all(contents[name] == "the previous run" for name in names)
    else:
        assert json.loads(contents["cpu-quick.json"]) == {"figure": 1}
        assert contents["cpu-quick.md"] == contents["cpu-quick-latency.png"] == "new"


def test_a_second_interrupt_as_a_server_stops_kills_it_and_removes_its_data(
    tmp_path: Path,
) -> None:
    """Ctrl-C twice: the wait for the server's drain is cut short, the server is killed
    rather than left running, and its task store removed all the same."""
    ignoring_sigterm = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", ignoring_sigterm], stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    waits = 0
    wait = process.wait

    def interrupted_once(timeout: float | None = None) -> int:
        nonlocal waits
        waits += 1
        if waits == 1:
            raise KeyboardInterrupt
        return wait(timeout)

    process.wait = interrupted_once  # type: ignore[method-assign]
    server = bench_server.Server("http://127.0.0.1:1", process, tmp_path / "log", data_dir)
    try:
        with pytest.raises(KeyboardInterrupt):
            server.stop()
        assert process.returncode == -signal.SIGKILL
        assert not data_dir.exists()
    finally:
        process.kill()
        wait()
        process.stdout.close()
