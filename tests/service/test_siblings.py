"""service/siblings.py: what a worker knows of the other workers of its server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.protocol import EXIT_RESTART, restart_pause_s
from service.settings import PROJECT_ROOT
from service.siblings import Siblings


def test_a_worker_sees_the_others_that_serve_and_whether_any_started(tmp_path: Path) -> None:
    siblings = Siblings(tmp_path)
    assert not siblings.server_started()
    assert not siblings.others_serving()
    siblings.mark_ready()
    assert siblings.server_started()
    assert not siblings.others_serving()  # only this process
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        (tmp_path / f"ready-{other.pid}").touch()
        assert siblings.others_serving()
        other.kill()
        other.wait()
    assert not siblings.others_serving()  # exited, its marker not yet forgotten
    siblings.forget(os.getpid())
    assert siblings.server_started()  # for the whole run


def test_failures_to_start_count_until_a_worker_starts(tmp_path: Path) -> None:
    siblings = Siblings(tmp_path)
    assert siblings.failed_to_start() == 1
    assert siblings.failed_to_start() == 1  # the same worker, once
    (tmp_path / "failed-1").touch()  # a worker before it
    assert siblings.failed_to_start() == 2
    siblings.mark_ready()
    assert siblings.failed_to_start() == 1


def test_a_failing_worker_pauses_longer_each_time_within_its_timeout() -> None:
    assert [restart_pause_s(failures, 120) for failures in (1, 2, 3, 6, 100)] == [
        1,
        2,
        4,
        30,
        30,
    ]
    assert restart_pause_s(10, worker_timeout_s=20) == 5  # no heartbeat while it pauses


def test_a_pause_not_stopped_ends_in_the_exit_status_to_start_again() -> None:
    paused = subprocess.run(
        [
            sys.executable,
            "-c",
            "from service.protocol import pause_then_restart\npause_then_restart(0.1)",
        ],
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert paused.returncode == EXIT_RESTART


def test_a_pause_ends_when_the_master_stops_the_worker() -> None:
    """With exit status 0: nothing to start again, and gunicorn logs any other status as
    an error ("Worker exited with code 1") in a clean stop or reload."""
    pausing = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from service.protocol import pause_then_restart\n"
            "print('pausing', flush=True)\npause_then_restart(60)",
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
    )
    with pausing:
        assert pausing.stdout is not None
        assert pausing.stdout.readline() == b"pausing\n"
        time.sleep(0.2)  # into the wait
        started = time.monotonic()
        pausing.send_signal(signal.SIGTERM)
        assert pausing.wait(10) == 0
    assert time.monotonic() - started < 5
