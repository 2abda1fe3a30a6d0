"""The service, with every worker but the first held back before it loads its model: a
server some of whose workers are ready well after the first, as under load or on a GPU."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import main

HELD_BACK_S = 3.0
_start = main.Service.start


def _first_worker() -> bool:
    """Whether this worker imported the app first (each imports it after the fork)."""
    try:
        Path(os.environ["FIRST_WORKER_MARK"]).touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


_FIRST = _first_worker()


async def _start_late_unless_first(self: main.Service) -> None:
    if not _FIRST:
        await asyncio.sleep(HELD_BACK_S)
    await _start(self)


main.Service.start = _start_late_unless_first  # type: ignore[method-assign]
app = main.app
