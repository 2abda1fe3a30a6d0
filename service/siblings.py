"""What a gunicorn worker knows of the other workers of its server.

The master makes a directory for the run (``gunicorn_config.py``, named by ``SIBLINGS_DIR``
in the workers' environment). A worker that has started marks it twice: ``started``, kept
for the whole run, and ``ready-<pid>``, which the master removes as that worker exits. A
worker that could not start marks ``failed-<pid>``, until one starts. The master marks
``stopping`` as it stops the server (not as a reload or TTOU stops a worker).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# The environment variable that names the run's directory.
SIBLINGS_DIR = "SERVICE_SIBLINGS_DIR"
_STARTED = "started"
_READY_PREFIX = "ready-"
_FAILED_PREFIX = "failed-"
_STOPPING = "stopping"
# A run's directory, in the temporary directory: this, then its master's pid.
RUN_DIRECTORY_PREFIX = "service-siblings-"


def run_directory(master_pid: int) -> Path:
    """The directory of the run whose gunicorn master is ``master_pid``."""
    return Path(tempfile.gettempdir()) / f"{RUN_DIRECTORY_PREFIX}{master_pid}"


class Siblings:
    """The marks of one run's workers in its directory (see the module's docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def from_environment(cls) -> Siblings | None:
        """The run's siblings, or None outside gunicorn (``make dev``, tests)."""
        directory = os.environ.get(SIBLINGS_DIR, "").strip()
        return cls(Path(directory)) if directory else None

    def mark_ready(self) -> None:
        """This worker has started and serves."""
        # Without the marks (the directory cleared away), a worker that cannot start later
        # stops the server, as at the first start: no reason to stop this one.
        with contextlib.suppress(OSError):
            (self.directory / _STARTED).touch()
            (self.directory / f"{_READY_PREFIX}{os.getpid()}").touch()
            for failed in self.directory.glob(f"{_FAILED_PREFIX}*"):
                failed.unlink(missing_ok=True)

    def failed_to_start(self) -> int:
        """Mark that this worker could not start; how many workers of this run have failed
        so since one last started."""
        with contextlib.suppress(OSError):
            (self.directory / f"{_FAILED_PREFIX}{os.getpid()}").touch()
        return max(1, len(list(self.directory.glob(f"{_FAILED_PREFIX}*"))))

    def mark_stopping(self) -> None:
        """Called by the master as it stops the server: no worker will serve again."""
        with contextlib.suppress(OSError):
            (self.directory / _STOPPING).touch()

    def server_stopping(self) -> bool:
        """Whether the master is stopping the server."""
        return (self.directory / _STOPPING).exists()

    def server_started(self) -> bool:
        """Whether a worker of this run has started before: its task store exists, or did."""
        return (self.directory / _STARTED).exists()

    def others_serving(self) -> bool:
        """Whether another worker of this run serves now."""
        for marker in self.directory.glob(f"{_READY_PREFIX}*"):
            pid = int(marker.name.removeprefix(_READY_PREFIX))
            if pid != os.getpid() and process_alive(pid):
                return True
        return False

    def was_ready(self, pid: int) -> bool:
        """Whether worker ``pid`` (not yet forgotten) had started and served."""
        return (self.directory / f"{_READY_PREFIX}{pid}").exists()

    def forget(self, pid: int) -> None:
        """Called by the master as worker ``pid`` exits."""
        (self.directory / f"{_READY_PREFIX}{pid}").unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
