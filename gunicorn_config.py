"""gunicorn settings for production: ``gunicorn main:app -c gunicorn_config.py``.

Everything comes from the same environment variables as the app (see README). The
settings are validated here, in the master, so a bad value stops start-up once, clearly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from service.settings import load_settings

settings = load_settings()

# Workers write metric samples here and /metrics merges them. It must be set before any
# worker imports prometheus_client, which is why it is set at config-load time.
# gunicorn may read this file more than once, so the default is derived, not random.
_DEFAULT_METRICS_DIR = Path(tempfile.gettempdir()) / f"prometheus-multiproc-{os.getpid()}"
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_DEFAULT_METRICS_DIR))
PROMETHEUS_DIR = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])

bind = os.environ.get("BIND", f"0.0.0.0:{settings.port}")
workers = settings.workers
worker_class = "uvicorn_worker.UvicornWorker"
# Each worker loads its own model after the fork; a torch runtime forked from a parent
# that already used it is unsafe (OpenMP pools, CUDA contexts).
preload_app = False
# The worker's heartbeat starts only after the model is loaded and warmed up.
timeout = 120
# SIGTERM: stop accepting, let accepted requests finish (DRAIN_TIMEOUT_S), then exit.
graceful_timeout = int(settings.drain_timeout_s) + 10
keepalive = 5
# The control socket (gunicornc) is not used; without it, several servers can share a host.
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = settings.log_level


def on_starting(server: Any) -> None:
    """Start from an empty metrics directory so samples of an earlier run do not leak in."""
    if PROMETHEUS_DIR.exists():
        shutil.rmtree(PROMETHEUS_DIR)
    PROMETHEUS_DIR.mkdir(parents=True)


def child_exit(server: Any, worker: Any) -> None:
    """Drop the live gauges of a worker that exited, crashed or was killed."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the metrics directory if it is the default one, made for this run."""
    if PROMETHEUS_DIR == _DEFAULT_METRICS_DIR:
        shutil.rmtree(PROMETHEUS_DIR, ignore_errors=True)
