"""Start the service as a subprocess and observe it: readiness, metrics, CPU and memory."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from service.settings import PROJECT_ROOT, Settings
from service.siblings import Siblings, run_directory

# What the benchmark's own settings decide, so none comes from the caller's environment
# unseen: the service's settings (read whatever their case), gunicorn's extra arguments,
# the thread counts, and where the metrics of another server are kept.
_SERVER_ENVIRONMENT = {name.upper() for name in Settings.model_fields} | {
    "GUNICORN_CMD_ARGS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PROMETHEUS_MULTIPROC_DIR",
}


class ServerNotStarted(RuntimeError):
    """A server started for a benchmark exited, or was not ready in time."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(url: str) -> dict[str, float]:
    """The samples of ``/metrics`` by name, labels included, except those with a blank in
    a label's value, which the pattern does not read."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()  # a 401 or 404 page would read as no batches at all
    text = response.text
    samples: dict[str, float] = {}
    for match in re.finditer(r"^([a-zA-Z_:][^ ]*) (\S+)$", text, re.MULTILINE):
        samples[match.group(1)] = float(match.group(2))
    return samples


@dataclass
class Server:
    """A gunicorn process tree started for a benchmark (or an external URL, unobserved)."""

    url: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    data_dir: Path | None = None  # its own task store, removed as it stops
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request

    def workers(self) -> list[psutil.Process]:
        if self.process is None:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by the master and every worker it started, those it has
        replaced too; None for a server given by URL."""
        if self.process is None:
            return None
        # The master's children times hold those of the workers it has reaped.
        master = psutil.Process(self.process.pid).cpu_times()
        total = master.user + master.system + master.children_user + master.children_system
        for worker in self.workers():
            try:
                times = worker.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass  # reaped since it was listed: counted with the master's children, or lost
        return total

    def workers_not_ready(self) -> int:
        """How many of its workers have not yet loaded the model and begun to serve: the
        master's children without a ready mark in its run's directory; 0 by URL."""
        if self.process is None:
            return 0
        siblings = Siblings(run_directory(self.process.pid))
        try:
            workers = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return 0  # the master is gone: start() reports it
        return sum(not siblings.was_ready(worker.pid) for worker in workers)

    def worker_rss_bytes(self) -> int:
        """The largest resident set among the workers."""
        sizes = [w.memory_info().rss for w in self.workers()]
        return max(sizes) if sizes else 0

    def reset_peak_rss(self) -> None:
        """Start a new peak-RSS window for every worker (Linux: ``/proc/PID/clear_refs``)."""
        for worker in self.workers():
            with contextlib.suppress(OSError):
                Path(f"/proc/{worker.pid}/clear_refs").write_text("5")

    def peak_worker_rss_bytes(self) -> int | None:
        """The largest worker's peak RSS since ``reset_peak_rss`` (the kernel's VmHWM), or
        its current RSS where the kernel keeps no peak; None for a server given by URL."""
        if self.process is None:
            return None
        peaks = []
        for worker in self.workers():
            try:
                status = Path(f"/proc/{worker.pid}/status").read_text()
            except OSError:
                status = ""
            if match := re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE):
                peaks.append(int(match.group(1)) * 1024)
            else:
                with contextlib.suppress(psutil.NoSuchProcess):
                    peaks.append(worker.memory_info().rss)
        return max(peaks, default=0)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        except BaseException:
            # Interrupted as it waits (a second Ctrl-C): the server goes at once.
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            raise
        finally:
            if self.data_dir is not None:
                shutil.rmtree(self.data_dir, ignore_errors=True)


def server_environment(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without what would configure the server, and
    ``settings``: the server runs with those, every other setting at its default, but
    ``DEVICE``, the CPU unless given: left at auto, a GPU present would serve what a CPU
    benchmark measures (``bench.gpu`` names its device)."""
    inherited = {k: v for k, v in os.environ.items() if k.upper() not in _SERVER_ENVIRONMENT}
    return inherited | {"DEVICE": "cpu"} | settings


def start(
    settings: dict[str, str], log_dir: Path, timeout_s: float = 180, app: str = "main:app"
) -> Server:
    """Start ``gunicorn app`` with these settings, every other at its default, and wait
    until every worker is ready."""
    port = free_port()
    # A task store of its own: the default, ./data, may be a server's that a user runs.
    data_dir = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    # The temporary directory as this process resolved it (a relative TMPDIR would resolve
    # elsewhere from the server's working directory): the workers' ready marks are there.
    env = server_environment(
        {"DATA_DIR": str(data_dir), "TMPDIR": tempfile.gettempdir()} | settings
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    # gunicorn run by this interpreter: where packages are installed with --target (on a
    # machine whose torch is its own), there is no gunicorn script beside it.
    command = [sys.executable, "-m", "gunicorn", app, "-c", "gunicorn_config.py"]
    command += ["--bind", f"127.0.0.1:{port}"]
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    server = Server(f"http://127.0.0.1:{port}", process, log_path, data_dir)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise ServerNotStarted(
                    f"the server exited with status {process.returncode} as it started; "
                    f"the end of its log, {log_path}:\n{tail}"
                )
            try:
                # Every worker, not the first: a keep-alive connection stays with the worker
                # that accepted it, so clients that connect while others still load the
                # model would all be served by the first for the whole step.
                ready = httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200
                # The master checked again: a worker it left behind may still answer.
                if ready and not server.workers_not_ready() and process.poll() is None:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        waiting = server.workers_not_ready()
        raise ServerNotStarted(
            f"the server was not ready after {timeout_s:g} s ({waiting} worker(s) without "
            f"their ready mark in {run_directory(process.pid)}); its log: {log_path}"
        )
    except BaseException:  # a signal or Ctrl-C too: never leave it running
        server.stop()
        raise
