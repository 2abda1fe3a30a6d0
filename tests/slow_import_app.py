"""The service, whose import takes ``SLOW_IMPORT_S`` seconds more: a worker stopped then has
neither its server nor the server's signal handlers yet."""

from __future__ import annotations

import os
import time

time.sleep(float(os.environ["SLOW_IMPORT_S"]))

from main import app  # noqa: E402

__all__ = ["app"]
