"""The service, whose workers fail to start with an error nobody foresaw (a bug) once the
file that ``START_BUG_MARK`` names exists: workers started before it serve."""

from __future__ import annotations

import asyncio
import os

import main

_start = main.Service.start


async def _start_unless_marked(self: main.Service) -> None:
    if await asyncio.to_thread(os.path.exists, os.environ["START_BUG_MARK"]):
        raise RuntimeError("a bug in the start-up")
    await _start(self)


main.Service.start = _start_unless_marked  # type: ignore[method-assign]
app = main.app
