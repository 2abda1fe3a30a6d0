"""What an ideal batching server would achieve with this machine's forward-pass times.

Target 4 compares the open-loop p99 with the idle p50. Part of that ratio is the server's
doing and part is queueing, which no server avoids: this simulates a server with no
overhead at all, to tell the two apart. Each request is decoded the moment it arrives, on
a core of its own, and the model, whenever it is free, takes every decoded request (up to
the maximum batch) into one forward pass that takes as long as in-process measurements
say a batch of that size takes.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping


def forward_ms(measured: Mapping[int, float], batch_size: int) -> float:
    """The forward time of ``batch_size``, interpolated linearly between measured sizes
    (and extrapolated from the two nearest at either end)."""
    sizes = sorted(measured)
    if len(sizes) == 1:
        return measured[sizes[0]] * batch_size / sizes[0]
    index = min(max(bisect.bisect_left(sizes, batch_size), 1), len(sizes) - 1)
    low, high = sizes[index - 1], sizes[index]
    slope = (measured[high] - measured[low]) / (high - low)
    return measured[low] + slope * (batch_size - low)


def ideal_latencies_ms(
    rate_per_s: float,
    forward_ms_by_batch: Mapping[int, float],
    decode_ms: float,
    max_batch_size: int,
    requests: int = 100_000,
    seed: int = 1,
) -> list[float]:
    """Latencies, in arrival order, of ``requests`` Poisson arrivals at ``rate_per_s``."""
    rng = random.Random(seed)
    arrived = 0.0
    arrivals = []
    for _ in range(requests):
        arrived += rng.expovariate(rate_per_s) * 1000
        arrivals.append(arrived)
    latencies: list[float] = []
    model_free_at = 0.0
    first = 0
    while first < requests:
        start = max(model_free_at, arrivals[first] + decode_ms)
        last = first + 1
        while (
            last < requests
            and last - first < max_batch_size
            and arrivals[last] + decode_ms <= start
        ):
            last += 1
        model_free_at = start + forward_ms(forward_ms_by_batch, last - first)
        latencies += [model_free_at - arrivals[i] for i in range(first, last)]
        first = last
    return latencies


def capacity_per_s(forward_ms_by_batch: Mapping[int, float], max_batch_size: int) -> float:
    """The most images a second such a server serves for good: once its queue holds a
    full batch, it runs batches of ``max_batch_size`` back to back, whether or not a
    smaller size would do more images a second."""
    return max_batch_size * 1000 / forward_ms(forward_ms_by_batch, max_batch_size)
