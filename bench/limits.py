"""In-process limits: what the model and the preprocessing cost without any serving around them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from classification import build_network, load_classifier, preprocess
from classification.model import Classifier
from service.settings import PROJECT_ROOT

LABELS_FILE = PROJECT_ROOT / "imagenet_classes.txt"
MAX_PIXELS = 40_000_000


def _timed_runs(work: Callable[[], object], min_seconds: float, min_runs: int = 3) -> list[float]:
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < min_runs or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        work()
        durations.append(time.perf_counter() - begin)
    return durations


def forward_throughput(batch_size: int, channels_last: bool, seconds: float) -> float:
    """Images per second of the bare network at ``batch_size`` (no preprocessing, no serving)."""
    network, _ = build_network("random", 1000)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(memory_format=memory_format)
    batch = torch.randn(batch_size, 3, 224, 224).to(memory_format=memory_format)
    with torch.inference_mode():
        for _ in range(2):
            network(batch)
        durations = _timed_runs(lambda: network(batch), seconds)
    return batch_size / statistics.median(durations)


def preprocess_cost_s(images: list[bytes], seconds: float) -> float:
    """Median seconds to decode and preprocess one upload, over the given images."""
    per_image: list[float] = []
    for data in images:
        durations = _timed_runs(
            lambda data=data: preprocess(data, max_pixels=MAX_PIXELS),  # type: ignore[misc]
            seconds / len(images),
        )
        per_image.append(statistics.median(durations))
    return statistics.mean(per_image)


def single_image_pipeline_s(classifier: Classifier, images: list[bytes], seconds: float) -> float:
    """Median seconds for decode + preprocess + a batch-of-one forward, the idle floor."""
    index = 0

    def one() -> None:
        nonlocal index
        data = images[index % len(images)]
        index += 1
        classifier.classify([preprocess(data, max_pixels=MAX_PIXELS)], [5])

    one()
    return statistics.median(_timed_runs(one, seconds, min_runs=len(images) * 3))


def measure(
    images: list[Path], max_batch_size: int, threads: int, seconds: float
) -> dict[str, float]:
    """All in-process limits, with ``threads`` intra-op threads (as one server worker has)."""
    torch.set_num_threads(threads)
    payloads = [path.read_bytes() for path in images]
    classifier = load_classifier(weights="random", labels_file=LABELS_FILE, device="cpu")
    classifier.warm_up([1, max_batch_size])
    plain = forward_throughput(max_batch_size, channels_last=False, seconds=seconds)
    channels_last = forward_throughput(max_batch_size, channels_last=True, seconds=seconds)
    return {
        "forward_plain_images_per_s": plain,
        "forward_channels_last_images_per_s": channels_last,
        "forward_limit_images_per_s": max(plain, channels_last),
        "forward_batch1_images_per_s": forward_throughput(1, True, seconds / 2),
        "preprocess_ms_per_image": preprocess_cost_s(payloads, seconds) * 1000,
        "single_image_pipeline_ms": single_image_pipeline_s(classifier, payloads, seconds) * 1000,
    }
