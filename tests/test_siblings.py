"""service/siblings.py: what a worker knows of the other workers of its server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
