"""A load generator for the server tests, run in its own process so that its work does not
slow the test's own probes: ``python -m tests.loadgen URL CLIENTS SECONDS IMAGE``.

Each client posts the image, and again as soon as the answer arrives, or after the
``Retry-After`` of a 503 as a well-behaved client does. Prints one JSON object: per
outcome, the count and latencies, and how many 503s lacked ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import httpx

CONNECTION_ERROR = "connection error"


async def run(url: str, clients: int, seconds: float, image: bytes) -> dict[str, object]:
    latencies_s: dict[str, list[float]] = {}
    missing_retry_after = 0
    # Encoded once, sent many times.
    encoded = httpx.Request("POST", url, files={"file": ("photo.jpg", image, "image/jpeg")})
    payload, content_type = encoded.read(), encoded.headers["content-type"]

    async def caller(session: aiohttp.ClientSession, stop_at: float) -> None:
        nonlocal missing_retry_after
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            retry_after = 0.0
            try:
                async with session.post(
                    "/cls", data=payload, headers={"Content-Type": content_type}
                ) as response:
                    await response.read()
                    outcome = str(response.status)
                    if response.status == 503:
                        header = response.headers.get("Retry-After")
                        missing_retry_after += header is None
                        retry_after = float(header or 1)
            except (aiohttp.ClientError, TimeoutError):
                outcome = CONNECTION_ERROR
            latencies_s.setdefault(outcome, []).append(time.perf_counter() - started)
            await asyncio.sleep(retry_after)

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(caller(session, stop_at) for _ in range(clients)))
    return {"latencies_s": latencies_s, "missing_retry_after": missing_retry_after}


def main() -> None:
    url, clients, seconds, image = sys.argv[1:5]
    result = asyncio.run(run(url, int(clients), float(seconds), Path(image).read_bytes()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
