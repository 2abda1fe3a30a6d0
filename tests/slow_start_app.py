"""The service, whose start takes ``SLOW_START_S`` seconds more: a model that downloads or
warms up for long."""

from __future__ import annotations

import asyncio
import os

import main

_start = main.Service.start


async def _start_slowly(self: main.Service) -> None:
    await asyncio.sleep(float(os.environ["SLOW_START_S"]))
    await _start(self)


main.Service.start = _start_slowly  # type: ignore[method-assign]
app = main.app
