"""A worker gives a burst's freed memory back once it is idle, and only then; what lives as
long as the worker stays out of the garbage collector's full passes."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service import memory
from tests.images import encode, gradient
from tests.server import free_port, gunicorn_command, running_server, server_env
from tests.support import make_settings, run_python, running_app

MiB = 2**20


class FakeWorker:
    """A worker whose idleness and resident size the test sets."""

    def __init__(self) -> None:
        self.idle_for = 0.0
        self.resident = 800 * MiB
        self.trims: list[int] = []
        self.out_of_files = False

    def trim(self) -> None:
        self.trims.append(self.resident)
        self.resident = 800 * MiB

    def read_resident(self) -> int:
        if self.out_of_files:
            raise OSError(24, "Too many open files", "/proc/self/statm")
        return self.resident


async def _watch(worker: FakeWorker, seconds: float) -> None:
    trimmer = memory.IdleTrimmer(
        lambda: worker.idle_for,
        worker.trim,
        worker.read_resident,
        idle_s=0.02,
        min_growth_bytes=64 * MiB,
    )
    task = asyncio.create_task(trimmer.run())
    await asyncio.sleep(seconds)
    task.cancel()


async def test_trims_once_after_a_burst_when_idle() -> None:
    worker = FakeWorker()
    watching = asyncio.create_task(_watch(worker, 0.5))
    await asyncio.sleep(0.05)
    worker.resident = 1000 * MiB  # a burst, still running
    await asyncio.sleep(0.1)
    assert worker.trims == []
    worker.idle_for = 1.0
    await watching
    assert worker.trims == [1000 * MiB]  # once: nothing grew after it


async def test_small_growth_is_left_alone() -> None:
    """Trimming costs the next request page faults; a few MiB are not worth it."""
    worker = FakeWorker()
    worker.idle_for = 1.0
    worker.resident = 850 * MiB
    await _watch(worker, 0.2)
    assert worker.trims == []


async def test_trimming_survives_a_spell_without_file_descriptors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker out of file descriptors cannot read /proc; once it can again, it trims."""
    worker = FakeWorker()
    watching = asyncio.create_task(_watch(worker, 0.6))
    await asyncio.sleep(0.05)
    worker.out_of_files = True
    await asyncio.sleep(0.15)
    worker.resident = 1000 * MiB
    worker.idle_for = 1.0
    await asyncio.sleep(0.1)
    assert worker.trims == []
    worker.out_of_files = False
    await watching
    assert worker.trims == [1000 * MiB]
    warnings = [r for r in caplog.records if "Too many open files" in r.getMessage()]
    assert len(warnings) == 1, "one warning for the whole spell, not one per round"


async def test_what_exists_at_start_up_is_left_out_of_full_collections() -> None:
    # A full pass over everything alive after start-up holds the GIL for about 0.2 s.
    async with running_app(make_settings()) as served:
        frozen = gc.get_freeze_count()
        image = encode(gradient(), "PNG")
        response = await served.client.post("/cls", files={"file": ("a.png", image)})
        assert response.status_code == 200
        # The app and the model are among the frozen, in no generation a pass would scan.
        tracked = {id(obj) for obj in gc.get_objects()}
        for long_lived in (served.app, served.service, served.service.classifier):
            assert id(long_lived) not in tracked
        assert len(tracked) < frozen / 4
    # Once the app has stopped, its objects can be collected again.
    assert gc.get_freeze_count() == 0


def test_malloc_trim_returns_memory_freed_by_another_thread() -> None:
    """Memory a thread freed, with live chunks between the holes, stays resident until
    ``malloc_trim``; this is the glibc behaviour the trimmer relies on."""
    if memory.malloc_trim() is None:
        pytest.skip("the C library has no malloc_trim")
    script = """
import threading
from service import memory
kept = []
def churn():
    chunks = [b"x" * 100_000 for _ in range(3000)]
    kept.extend(chunks[::10])
t = threading.Thread(target=churn); t.start(); t.join()
before = memory.resident_bytes()
memory.malloc_trim()()
print(before, memory.resident_bytes())
"""
    trimmed = run_python(script)
    assert trimmed.returncode == 0, trimmed.stderr
    before, after = map(int, trimmed.stdout.split())
    assert before - after > 150 * MiB


_REUSE_SCRIPT = """
import resource, sys, threading
import numpy as np
from service import memory
kept = memory.keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
def forward_like():
    # A thread's blocks of a forward pass's sizes, allocated and freed again and again.
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [np.ones(size, np.uint8) for size in (3_300_000, 800_000, 40_000_000)]
        del blocks
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=forward_like); thread.start(); thread.join()
print(kept, max(faults[1:]))
"""


# glibc's allocator settings, which the runner's environment may hold (containers often set
# MALLOC_ARENA_MAX): the tests set their own.
_GLIBC_ALLOCATOR_SETTINGS = (*memory._GLIBC_SETTINGS, "GLIBC_TUNABLES")


def _without_allocator_settings(environment: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environment.items() if k not in _GLIBC_ALLOCATOR_SETTINGS}


def _reuse(mode: str, **environment: str) -> tuple[bool, int]:
    """In a new process: whether ``keep_freed_memory`` applied, and the most page faults
    of a repeat of a thread's allocations."""
    reused = run_python(
        _REUSE_SCRIPT, mode, env={**_without_allocator_settings(dict(os.environ)), **environment}
    )
    assert reused.returncode == 0, reused.stderr
    kept, faults = reused.stdout.split()
    return kept == "True", int(faults)


def test_freed_memory_is_reused() -> None:
    """By default glibc unmaps large blocks when freed, and the kernel maps and zeroes them
    again on the next use (about 1,000 page faults a repeat here); kept, a repeat reuses
    them. (That a worker at rest still gives them back is the next tests' business.)"""
    if memory.malloc_trim() is None:
        pytest.skip("the C library has no malloc_trim")
    _, default_faults = _reuse("default")
    kept, faults = _reuse("keep")
    assert default_faults > 500  # what the setting is for: this glibc unmaps them
    assert kept
    assert faults < 50


@pytest.mark.parametrize(
    "environment",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_MMAP_MAX_": "65536"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TOP_PAD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
)
def test_glibc_settings_of_the_operator_stand(environment: dict[str, str]) -> None:
    if memory.malloc_trim() is None:
        pytest.skip("the C library has no malloc_trim")
    kept, faults = _reuse("keep", **environment)
    assert not kept
    assert faults > 500


@pytest.mark.slow
def test_forward_passes_reuse_the_memory_of_the_last(tmp_path: Path, photos: list[Path]) -> None:
    """A worker's forward passes reuse the memory of the last: mapped and zeroed anew each
    time, it would cost about 7,500 page faults a request here for lone requests, a quarter
    of their latency, and 1,100 a request in batches of 16, a sixth of the throughput."""
    uploads = [(photo.name, photo.read_bytes()) for photo in photos]
    # Whether glibc's own thresholds do it depends on how the heap was laid out before: with
    # DEVICE's default here, they do; with DEVICE=cpu, they happen not to.
    env = _without_allocator_settings(
        server_env(tmp_path, TORCH_THREADS="2", DEVICE="auto", MAX_BATCH_SIZE="16")
    )
    faults_per_request = {}
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        (worker,) = psutil.Process(server.process.pid).children()
        for concurrency, requests in ((1, 20), (32, 96)):
            asyncio.run(_classify(server.url, uploads, requests, concurrency))  # sizes the heaps
            before = _minor_faults(worker.pid)
            asyncio.run(_classify(server.url, uploads, requests, concurrency))
            faults_per_request[concurrency] = (_minor_faults(worker.pid) - before) / requests
    assert faults_per_request[1] < 500, faults_per_request
    assert faults_per_request[32] < 500, faults_per_request


async def _classify(
    url: str, uploads: list[tuple[str, bytes]], requests: int, concurrency: int
) -> None:
    """``requests`` uploads to /cls, ``concurrency`` at a time, every one answered 200."""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def classify(upload: tuple[str, bytes]) -> int:
            async with slots:
                return (await client.post("/cls", files={"file": upload})).status_code

        statuses = await asyncio.gather(
            *(classify(uploads[i % len(uploads)]) for i in range(requests))
        )
    assert set(statuses) == {200}


def _minor_faults(pid: int) -> int:
    """A process's minor page faults so far, all threads together (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[7])


@pytest.mark.slow
def test_the_worker_shrinks_back_after_a_burst(tmp_path: Path, photos: list[Path]) -> None:
    """Bursts at several concurrencies (so batches of many sizes) grow the worker by about
    200 MiB here, which stays resident, for reuse, until the worker has been idle for a
    second."""

    uploads = [(photo.name, photo.read_bytes()) for photo in photos]
    env = _without_allocator_settings(server_env(tmp_path, TORCH_THREADS="2"))
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        (worker,) = psutil.Process(server.process.pid).children()
        at_start = worker.memory_info().rss
        for concurrency in (64, 3, 16, 6, 32, 10):
            asyncio.run(_classify(server.url, uploads, 64, concurrency))
        after_bursts = worker.memory_info().rss
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and worker.memory_info().rss > at_start + 16 * MiB:
            time.sleep(0.1)
        at_rest = worker.memory_info().rss
    assert after_bursts - at_start > memory.MIN_GROWTH_BYTES, "the bursts must grow the worker"
    assert at_rest < at_start + memory.MIN_GROWTH_BYTES


@pytest.mark.slow
def test_the_worker_shrinks_back_after_many_uploads_held_at_once(tmp_path: Path) -> None:
    """Uploads held unfinished for a while (slow clients) hold their bodies in memory, up to
    1 MiB each; the worker does not count as idle meanwhile, else a trim then would take
    that size for its resting one, and the memory freed when they end would stay."""
    count, size = 400, 1_000_000
    boundary = b"b0undary"
    head = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    )
    length = len(head) + size + len(boundary) + 8
    request = (
        b"POST /cls HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary="
        + boundary
        + b"\r\nContent-Length: %d\r\n\r\n" % length
    )
    body = os.urandom(size - 10)  # all but the end: each request waits for the rest
    env = _without_allocator_settings(server_env(tmp_path))
    port = free_port()
    with running_server(tmp_path, gunicorn_command(port), env) as server:
        (worker,) = psutil.Process(server.process.pid).children()
        at_start = worker.memory_info().rss
        connections = []
        try:
            for _ in range(count):
                connection = socket.create_connection(("127.0.0.1", port))
                connection.sendall(request + head + body)
                connections.append(connection)
            time.sleep(3)  # for trims while they are held, were the worker taken for idle
            held = worker.memory_info().rss
        finally:
            for connection in connections:
                connection.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and worker.memory_info().rss > at_start + 64 * MiB:
            time.sleep(0.1)
        at_rest = worker.memory_info().rss
    print(f"\nresident: {at_start // MiB} MiB at start, {held // MiB} held, {at_rest // MiB} after")
    assert held - at_start > count * size // 2, "the uploads must grow the worker"
    assert at_rest < at_start + 64 * MiB
