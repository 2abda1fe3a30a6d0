"""Overload with a tight deadline: how much of the model's work reaches callers in time.

    python -m bench.overload                          # 16 and 48 clients, 300 ms deadline
    python -m bench.overload --clients 8 32 --timeout-ms 500
    python -m bench.overload --url http://host:5001   # a running server, its own deadline

Each client sends the next photo as soon as its last answer arrives, with no back-off,
so the offered load grows with the client count. Past capacity, requests wait longer than
their deadline and some must get 504; what matters then is that the model spends its
time on requests whose callers still get the answer. Reported per step: answers per
second, statuses, the requests the model ran (from ``/metrics``) and the share of them
answered, and how late the 504s came as the client saw them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import report
from bench.__main__ import (
    add_images_argument,
    check_url,
    exit_interrupted,
    exit_on_signal,
    images_in,
    positive,
    recorded_command,
    without_password,
)
from bench.load import Payload, encode_payloads, open_session, post_image
from bench.server import Server, ServerNotStarted, scrape, start
from service.settings import PROJECT_ROOT


async def lateness_under_load(
    server: Server, payloads: list[Payload], clients: int, duration_s: float, timeout_ms: float
) -> dict[str, Any]:
    """``clients`` callers sending back to back for ``duration_s``; counts and lateness."""
    statuses: Counter[int] = Counter()
    late_ms: list[float] = []
    before = await asyncio.to_thread(scrape, server.url)
    async with open_session(server, clients) as session:
        stop_at = time.perf_counter() + duration_s

        async def caller(index: int) -> None:
            sent = index
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                status = await post_image(session, payloads[sent % len(payloads)])
                statuses[status] += 1
                if status == 504:
                    late_ms.append((time.perf_counter() - started) * 1000 - timeout_ms)
                sent += clients

        began = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(clients)))
        elapsed_s = time.perf_counter() - began
    await asyncio.sleep(0.5)  # the last batch's metrics
    after = await asyncio.to_thread(scrape, server.url)
    ran = after.get("batch_size_sum", 0) - before.get("batch_size_sum", 0)
    late = np.array(late_ms) if late_ms else np.array([0.0])
    return {
        "clients": clients,
        "seconds": round(elapsed_s, 2),
        "answered_per_s": round(statuses[200] / elapsed_s, 1),
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "model_ran": int(ran),
        "answered_share_of_model_work": round(statuses[200] / ran, 3) if ran else 0.0,
        "late_504_ms": {
            "p99": round(float(np.percentile(late, 99)), 1),
            "max": round(float(late.max()), 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # an abbreviated --api-key would escape its masking
        prog="python -m bench.overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=positive, nargs="+", default=[16, 48])
    parser.add_argument("--seconds", type=float, default=10.0, help="per step")
    parser.add_argument("--timeout-ms", type=float, default=300.0, help="REQUEST_TIMEOUT_MS")
    parser.add_argument("--max-batch-size", type=positive, default=16)
    add_images_argument(parser)
    parser.add_argument("--url", help="a running server, started with --timeout-ms as its deadline")
    parser.add_argument("--api-key", help="with --url, the server's API_KEY (sent as X-API-Key)")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    if args.api_key is not None and not args.url:
        parser.error("--api-key is for a server given by --url; the one it starts has no key")
    try:
        images = images_in(args.images)
    except ValueError as exc:
        parser.error(str(exc))
    payloads = encode_payloads(images)
    settings = {
        "WEIGHTS": "random",
        "WORKERS": "1",
        "MAX_BATCH_SIZE": str(args.max_batch_size),
        "REQUEST_TIMEOUT_MS": f"{args.timeout_ms:g}",
    }
    # Stopped by a signal (its terminal closed too), the server it started is stopped too.
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    try:
        with contextlib.ExitStack() as stack:
            if args.url:
                headers = {} if args.api_key is None else {"X-API-Key": args.api_key}
                server = Server(args.url.rstrip("/"), headers=headers)
                check_url(parser, server.url, headers, images[0])
            else:
                server = stack.enter_context(
                    start(settings, PROJECT_ROOT / "docs" / "benchmarks" / "logs")
                )
            steps = [
                asyncio.run(
                    lateness_under_load(server, payloads, clients, args.seconds, args.timeout_ms)
                )
                for clients in args.clients
            ]
    except KeyboardInterrupt as interruption:
        stopped = "" if args.url else "; the server it started is stopped"
        exit_interrupted(interruption, f"interrupted{stopped}; no results written")
    except (httpx.HTTPError, ServerNotStarted) as exc:
        sys.exit(f"{exc}\nno results written")

    print("| clients | answered/s | statuses | model ran | answered of it | 504 late p99/max ms |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for step in steps:
        statuses = ", ".join(f"{code}: {count}" for code, count in step["statuses"].items())
        print(
            f"| {step['clients']} | {step['answered_per_s']} | {statuses} | {step['model_ran']} "
            f"| {step['answered_share_of_model_work']:.0%} "
            f"| {step['late_504_ms']['p99']} / {step['late_504_ms']['max']} |"
        )
    if args.out:
        report.write_json(
            args.out,
            {
                "command": recorded_command("bench.overload", sys.argv[1:]),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "server_settings": ({"url": without_password(args.url)} if args.url else settings),
                "steps": steps,
            },
        )


if __name__ == "__main__":
    main()
