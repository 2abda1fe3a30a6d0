"""Start the service as a subprocess and observe it: readiness, metrics, CPU and memory."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from service.settings import PROJECT_ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(url: str) -> dict[str, float]:
    """The unlabelled samples and a few labelled ones of ``/metrics``, by name."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
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
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request
    _cpu_marks: dict[int, float] = field(default_factory=dict)

    def workers(self) -> list[psutil.Process]:
        if self.process is None:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """CPU time used so far by the master and all workers."""
        if self.process is None:
            return float("nan")
        total = 0.0
        for proc in [psutil.Process(self.process.pid), *self.workers()]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def worker_rss_bytes(self) -> int:
        """The largest resident set among the workers."""
        sizes = [w.memory_info().rss for w in self.workers()]
        return max(sizes) if sizes else 0

    def reset_peak_rss(self) -> None:
        """Start a new peak-RSS window for every worker (Linux: ``/proc/PID/clear_refs``)."""
        for worker in self.workers():
            with contextlib.suppress(OSError):
                Path(f"/proc/{worker.pid}/clear_refs").write_text("5")

    def peak_worker_rss_bytes(self) -> int:
        """The largest worker's peak RSS since ``reset_peak_rss`` (the kernel's VmHWM), or
        its current RSS where the kernel keeps no peak."""
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
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(settings: dict[str, str], log_dir: Path, timeout_s: float = 180) -> Server:
    """Start ``gunicorn main:app`` with these environment settings and wait until ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(settings)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    command = [str(BIN / "gunicorn"), "main:app", "-c", "gunicorn_config.py"]
    command += ["--bind", f"127.0.0.1:{port}"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout_s} s")
    except BaseException:  # a signal or Ctrl-C too: never leave it running
        server.stop()
        raise
