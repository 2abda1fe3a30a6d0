"""Start the real server (gunicorn or uvicorn) as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.settings import PROJECT_ROOT
from tests.support import SEED

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The environment of a test server: random weights on the CPU, its task store and
    temporary files in ``tmp_path`` (gunicorn makes its metrics folder there, which a master
    killed by a test leaves behind)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    temporary = tmp_path / "tmp"
    temporary.mkdir(exist_ok=True)
    env.update(
        WEIGHTS="random",
        DEVICE="cpu",
        SEED=str(SEED),
        TORCH_THREADS="1",
        PYTHONUNBUFFERED="1",
        DATA_DIR=str(tmp_path / "data"),
        TMPDIR=str(temporary),
    )
    env.update(overrides)
    return env


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def gunicorn_command(port: int, app: str = "main:app") -> list[str]:
    return [
        str(BIN / "gunicorn"),
        app,
        "-c",
        "gunicorn_config.py",
        "--bind",
        f"127.0.0.1:{port}",
    ]


def uvicorn_command(port: int) -> list[str]:
    """The development server, as ``make dev`` starts it (without reloading)."""
    return [
        str(BIN / "uvicorn"),
        "main:app",
        "--http",
        "service.protocol:JsonErrorsHttpProtocol",
        "--ws",
        "none",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextmanager
def running_server(
    tmp_path: Path, command: list[str], env: dict[str, str]
) -> Iterator[ServerProcess]:
    """Start ``command``, wait until /readyz answers 200, stop it with SIGTERM afterwards."""
    port = int(command[-1].rsplit(":", 1)[-1]) if "--bind" in command else int(env["PORT"])
    log_path = tmp_path / "server.log"
    process = start_logged(command, env, log_path)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_ready(server)
        yield server
    finally:
        stop(process)


def start_logged(
    command: list[str], env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``command`` from the project's root, its output and errors written to
    ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def wait_until_ready(server: ServerProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {START_TIMEOUT_S} s:\n{server.log()}")


def wait_until(done: Callable[[], bool], log: Callable[[], str], timeout_s: float = 90) -> None:
    """Until ``done()``; past ``timeout_s``, fail with what ``log()`` then says."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, log()
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 40) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
