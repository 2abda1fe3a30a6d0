"""Small requests beside large ones: what large uploads cost everyone else.

    python -m bench.large_images                          # DECODE_THREADS 2 and 1, 3 rounds
    python -m bench.large_images --decode-threads 4 2 --rounds 2 --seconds 20

Four clients send the shared photos, each pausing up to 0.3 s between requests, while two
more send 6000x4000 images (a JPEG and a PNG made from the first photo) back to back; then
the four alone, as the baseline. Decoding a large image takes a core from the model while
it runs. Each ``DECODE_THREADS`` value gets a server of its own, in alternation round by
round, since this machine's speed drifts. Reported per round and setting: the small
requests' p50 and p90 with and without the large ones, and the large images answered.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.__main__ import add_images_argument, jpegs_in
from bench.load import Payload, encode_payloads, open_session, post_image
from bench.server import Server, start
from service.settings import PROJECT_ROOT

SMALL_CLIENTS = 4
LARGE_CLIENTS = 2
LARGE_SIZE = (6000, 4000)


def large_payloads(photo: Path) -> list[Payload]:
    """The photo scaled up to ``LARGE_SIZE``, as a JPEG and as a PNG."""
    image = Image.open(photo).convert("RGB").resize(LARGE_SIZE, Image.Resampling.BILINEAR)
    payloads = []
    for name, image_format in (("large.jpg", "JPEG"), ("large.png", "PNG")):
        encoded = io.BytesIO()
        image.save(encoded, image_format)
        request = httpx.Request(
            "POST", "http://bench/cls", files={"file": (name, encoded.getvalue())}
        )
        payloads.append((request.read(), {"content-type": request.headers["content-type"]}))
    return payloads


async def step(
    server: Server, small: list[Payload], large: list[Payload], duration_s: float
) -> dict[str, Any]:
    """Small clients (and large ones, if ``large``) for ``duration_s``."""
    small_ms: list[float] = []
    answered = {"small": 0, "large": 0}
    async with open_session(server, SMALL_CLIENTS + LARGE_CLIENTS) as session:
        stop_at = time.perf_counter() + duration_s

        async def small_client(index: int) -> None:
            sent = index
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                if await post_image(session, small[sent % len(small)]) == 200:
                    small_ms.append((time.perf_counter() - started) * 1000)
                    answered["small"] += 1
                sent += 1
                await asyncio.sleep(random.uniform(0, 0.3))

        async def large_client(index: int) -> None:
            sent = index
            while time.perf_counter() < stop_at:
                if await post_image(session, large[sent % len(large)]) == 200:
                    answered["large"] += 1
                sent += 1

        await asyncio.gather(
            *(small_client(i) for i in range(SMALL_CLIENTS)),
            *(large_client(i) for i in range(LARGE_CLIENTS if large else 0)),
        )
    latencies = np.array(small_ms) if small_ms else np.array([float("nan")])
    return {
        "small_p50_ms": round(float(np.percentile(latencies, 50))),
        "small_p90_ms": round(float(np.percentile(latencies, 90))),
        **{f"{kind}_answered": count for kind, count in answered.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.large_images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--decode-threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="per step")
    add_images_argument(parser)
    args = parser.parse_args()

    try:
        photos = jpegs_in(args.images)
    except ValueError as exc:
        parser.error(str(exc))
    small, large = encode_payloads(photos), large_payloads(photos[0])
    print(
        "| round | DECODE_THREADS | small p50 / p90 ms, beside large | large answered "
        "| small p50 / p90 ms, alone |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    for round_number in range(1, args.rounds + 1):
        for decode_threads in args.decode_threads:
            settings = {
                "WEIGHTS": "random",
                "DECODE_THREADS": str(decode_threads),
                "ACCESS_LOG": "false",
            }
            with start(settings, PROJECT_ROOT / "docs" / "benchmarks" / "logs") as server:
                mixed = asyncio.run(step(server, small, large, args.seconds))
                alone = asyncio.run(step(server, small, [], args.seconds))
            print(
                f"| {round_number} | {decode_threads} "
                f"| {mixed['small_p50_ms']} / {mixed['small_p90_ms']} "
                f"| {mixed['large_answered']} "
                f"| {alone['small_p50_ms']} / {alone['small_p90_ms']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
