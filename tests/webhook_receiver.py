"""A real webhook receiver on loopback (aiohttp) whose answers a test scripts."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from aiohttp import web

# A script step: answer nothing until the test ends, so the sender times out.
STALL = "stall"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() as the request arrived


@dataclass
class Receiver:
    """An aiohttp server whose answers a test scripts; it records every request."""

    script: list[int | str] = field(default_factory=list)
    then: int = 200  # the answer once the script runs out
    headers: dict[str, str] = field(default_factory=dict)  # on every answer
    received: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Received(dict(request.headers), body, time.time()))
        self.arrived.set()
        step = self.script.pop(0) if self.script else self.then
        if step == STALL:
            await self.release.wait()
            return web.Response(status=200)
        assert isinstance(step, int)
        location = {"Location": "http://127.0.0.1:9/elsewhere"} if 300 <= step < 400 else {}
        return web.Response(status=step, headers={**location, **self.headers})


@asynccontextmanager
async def receiving(tls: ssl.SSLContext | None = None) -> AsyncIterator[Receiver]:
    """A receiver serving ``POST /hook`` on the running event loop; over HTTPS with ``tls``."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    receiver.port = runner.addresses[0][1]
    scheme = "http" if tls is None else "https"
    receiver.url = f"{scheme}://127.0.0.1:{receiver.port}/hook"
    try:
        yield receiver
    finally:
        receiver.release.set()
        await runner.cleanup()


@contextmanager
def receiving_in_thread() -> Iterator[Receiver]:
    """A receiver on its own thread and event loop, for tests that are not async.

    Its script and ``then`` may be changed from the test's thread: each request reads them
    once, under the GIL.
    """
    started = threading.Event()
    stopping: asyncio.Future[None] | None = None
    loop = asyncio.new_event_loop()
    holder: list[Receiver] = []

    async def serve() -> None:
        nonlocal stopping
        async with receiving() as receiver:
            holder.append(receiver)
            stopping = loop.create_future()
            started.set()
            await stopping

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the webhook receiver did not start")
    try:
        yield holder[0]
    finally:
        assert stopping is not None
        loop.call_soon_threadsafe(stopping.set_result, None)
        thread.join(10)
        loop.close()
