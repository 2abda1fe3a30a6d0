"""A worker gives a burst's freed memory back once it is idle, and only then; what lives as
long as the worker stays out of the garbage collector's full passes."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service import memory
from tests.images import encode, gradient
from tests.server import PROJECT_ROOT, free_port, gunicorn_command, running_server, server_env
from tests.support import make_settings, running_app

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
    output = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout
    before, after = map(int, output.split())
    assert before - after > 150 * MiB


@pytest.mark.slow
def test_the_worker_shrinks_back_after_a_burst(tmp_path: Path, photos: list[Path]) -> None:
    """Bursts at several concurrencies (so batches of many sizes) grew the worker by 30-75
    MiB here, which stays resident until the worker has been idle for a second."""

    uploads = [(photo.name, photo.read_bytes()) for photo in photos]

    async def burst(url: str, concurrency: int) -> None:
        slots = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

            async def classify(upload: tuple[str, bytes]) -> int:
                async with slots:
                    response = await client.post("/cls", files={"file": upload})
                    return response.status_code

            statuses = await asyncio.gather(
                *(classify(uploads[i % len(uploads)]) for i in range(64))
            )
        assert set(statuses) == {200}

    env = server_env(tmp_path, TORCH_THREADS="2")
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        (worker,) = psutil.Process(server.process.pid).children()
        at_start = worker.memory_info().rss
        for concurrency in (64, 3, 16, 6, 32, 10):
            asyncio.run(burst(server.url, concurrency))
        after_bursts = worker.memory_info().rss
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and worker.memory_info().rss > at_start + 16 * MiB:
            time.sleep(0.1)
        at_rest = worker.memory_info().rss
    assert after_bursts - at_start > memory.MIN_GROWTH_BYTES, "the bursts must grow the worker"
    assert at_rest < at_start + memory.MIN_GROWTH_BYTES
