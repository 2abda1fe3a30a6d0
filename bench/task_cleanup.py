"""Many tasks expiring at once: how long the clean-up keeps other writers waiting.

    python -m bench.task_cleanup                  # 300,000 expired tasks
    python -m bench.task_cleanup --tasks 1000000

A task store is filled with finished tasks a month old, then the service starts on it
(gunicorn, one worker, random weights) and its clean-up deletes them. Meanwhile another
connection, as another worker's would, takes the write lock every 50 ms (busy timeout 10 s,
the service's) until the tasks are gone. Reported: its longest and 99th-percentile waits
for the lock, the writes that gave up, and how long the deletion took.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.__main__ import exit_interrupted, exit_on_signal
from bench.server import start
from service.settings import PROJECT_ROOT
from service.tasks import BUSY_TIMEOUT_MS, DATABASE_NAME, TaskStore

WRITE_EVERY_S = 0.05
MONTH_S = 30 * 86_400


def fill(data_dir: Path, count: int) -> None:
    """``count`` succeeded tasks that finished a month ago, as the service stores them."""
    TaskStore(data_dir).close()
    finished_at = time.time() - MONTH_S
    prediction = json.dumps([{"index": i, "label": "tabby", "score": 0.1} for i in range(5)])
    with sqlite3.connect(data_dir / DATABASE_NAME) as db:
        db.executemany(
            "INSERT INTO tasks (id, status, top_k, metadata, prediction, created_at, started_at, "
            "finished_at, idempotency_key) VALUES (?, 'succeeded', 5, ?, ?, ?, ?, ?, ?)",
            (
                (str(uuid.uuid4()), '{"order": 17}', prediction, finished_at, finished_at,
                 finished_at + i * 1e-6, str(uuid.uuid4()))
                for i in range(count)
            ),
        )  # fmt: skip


def time_writes(path: Path, stop: threading.Event, waits_s: list[float], failed: list[str]) -> None:
    """Take the write lock every ``WRITE_EVERY_S`` until ``stop``; each wait for it."""
    with sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000) as db:
        while not stop.wait(WRITE_EVERY_S):
            started = time.perf_counter()
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("COMMIT")
                waits_s.append(time.perf_counter() - started)
            except sqlite3.OperationalError as exc:
                failed.append(str(exc))


def measure(tasks: int, timeout_s: float) -> tuple[float, list[float], list[str]]:
    """Start a server beside ``tasks`` expired tasks, time another connection's writes
    until they are gone: the seconds it took, the writes' waits, and the writes that failed."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-cleanup-"))
    try:
        fill(data_dir, tasks)
        stop, waits_s, failed = threading.Event(), [], []
        writer = threading.Thread(
            target=time_writes, args=(data_dir / DATABASE_NAME, stop, waits_s, failed)
        )
        started = time.monotonic()
        writer.start()
        settings = {"WEIGHTS": "random", "DATA_DIR": str(data_dir), "ACCESS_LOG": "false"}
        try:
            with start(settings, PROJECT_ROOT / "docs" / "benchmarks" / "logs"):
                with sqlite3.connect(data_dir / DATABASE_NAME) as db:
                    while db.execute("SELECT count(*) FROM tasks").fetchone()[0]:
                        if time.monotonic() - started > timeout_s:
                            raise SystemExit(f"tasks left after {timeout_s:g} s")
                        time.sleep(0.2)
                took_s = time.monotonic() - started
        finally:
            stop.set()
            writer.join()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return took_s, waits_s, failed


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.task_cleanup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tasks", type=int, default=300_000, help="expired tasks to delete")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait at most")
    args = parser.parse_args()

    # Stopped by a signal (its terminal closed too), the server it started is stopped too.
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    try:
        took_s, waits_s, failed = measure(args.tasks, args.timeout)
    except KeyboardInterrupt as interruption:
        exit_interrupted(interruption, "interrupted; the server it started is stopped")
    waits_s.sort()
    print(
        f"{args.tasks} expired tasks deleted within {took_s:.1f} s of the server's start; "
        f"another connection's {len(waits_s) + len(failed)} writes waited for the lock "
        f"{waits_s[len(waits_s) // 2] * 1000:.1f} ms at the median, "
        f"{waits_s[int(len(waits_s) * 0.99)] * 1000:.0f} ms at p99, "
        f"{waits_s[-1] * 1000:.0f} ms at most; {len(failed)} gave up after "
        f"{BUSY_TIMEOUT_MS / 1000:g} s"
    )


if __name__ == "__main__":
    main()
