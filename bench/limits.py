"""In-process limits: what the model and the preprocessing cost without any serving around them."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from classification import (
    DTYPES,
    build_network,
    fold_batchnorm,
    load_classifier,
    preprocess,
)
from service import memory
from service.settings import PROJECT_ROOT, Settings

LABELS_FILE = PROJECT_ROOT / "imagenet_classes.txt"
MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default  # the served limit
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FORWARD_MS_PREFIX = "forward_served_ms_batch_"


def timed_runs(work: Callable[[], object], min_seconds: float, min_runs: int = 3) -> list[float]:
    """Seconds of each call of ``work``, called for at least ``min_seconds`` and
    ``min_runs`` times."""
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < min_runs or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        work()
        durations.append(time.perf_counter() - begin)
    return durations


class Limits:
    """The model and preprocessing on this machine, with one server worker's thread count,
    the model in one ``DTYPE``."""

    def __init__(self, images: list[Path], threads: int, dtype: str = "float32") -> None:
        torch.set_num_threads(threads)
        # The allocator as a worker has it: its forward passes reuse their memory too.
        memory.keep_freed_memory()
        self.payloads = [path.read_bytes() for path in images]
        self.dtype = DTYPES[dtype]
        self.classifier = load_classifier(
            weights="random", labels_file=LABELS_FILE, device="cpu", dtype=dtype
        )
        self.classifier.warm_up([1])
        eager, _ = build_network("random", 1000)
        served, _ = build_network("random", 1000)
        self.networks: dict[str, nn.Module] = {
            "plain": eager,
            "channels_last": eager,
            # What the server runs: BatchNorm folded into the convolutions, channels_last.
            "served": fold_batchnorm(served),
        }

    def forward_images_per_s(self, kind: str, batch_size: int, seconds: float) -> float:
        """Images per second of the bare network (no preprocessing, no serving)."""
        memory_format = torch.contiguous_format if kind == "plain" else torch.channels_last
        network = self.networks[kind].to(dtype=self.dtype, memory_format=memory_format)
        batch = torch.randn(batch_size, 3, 224, 224).to(
            dtype=self.dtype, memory_format=memory_format
        )
        with torch.inference_mode():
            for _ in range(2):
                network(batch)
            durations = timed_runs(lambda: network(batch), seconds)
        return batch_size / statistics.median(durations)

    def forward_limit(
        self, batch_size: int, seconds: float, *, served_first: bool = False
    ) -> dict[str, float]:
        """The forward-only throughputs at ``batch_size``. The limit is the best of them:
        the network as torchvision builds it, plain or channels_last, or as the server runs
        it, its BatchNorm folded, which is faster. Divided by the eager network's alone,
        target 1 would count what folding gains as if serving cost nothing.

        Measured after a served step, ``served_first`` puts the served network next to it,
        as it is last before one: the two measurements of an A-B-A pair lie equally far
        from B, and a steady drift cancels."""
        kinds = ["plain", "channels_last", "served"]
        speeds = {
            kind: self.forward_images_per_s(kind, batch_size, seconds)
            for kind in (reversed(kinds) if served_first else kinds)
        }
        plain, channels_last, served = (speeds[kind] for kind in kinds)
        return {
            "forward_plain_images_per_s": plain,
            "forward_channels_last_images_per_s": channels_last,
            "forward_served_images_per_s": served,
            "forward_eager_limit_images_per_s": max(plain, channels_last),
            "forward_limit_images_per_s": max(plain, channels_last, served),
        }

    def preprocess_ms(self, seconds: float) -> float:
        """Mean over the images of the median time to decode, resize and crop one upload."""
        per_image: list[float] = []
        for data in self.payloads:
            durations = timed_runs(
                lambda data=data: preprocess(data, max_pixels=MAX_PIXELS),  # type: ignore[misc]
                seconds / len(self.payloads),
            )
            per_image.append(statistics.median(durations))
        return statistics.mean(per_image) * 1000

    def _classify_upload(self, index: int) -> None:
        data = self.payloads[index % len(self.payloads)]
        crop: np.ndarray = preprocess(data, max_pixels=MAX_PIXELS)
        self.classifier.classify([crop], [5])

    def pipeline_ms(self, seconds: float) -> float:
        """Median time of decode, preprocess and a batch-of-one forward: the idle floor."""
        indices = itertools.count()
        self._classify_upload(next(indices))
        durations = timed_runs(
            lambda: self._classify_upload(next(indices)), seconds, min_runs=len(self.payloads) * 3
        )
        return statistics.median(durations) * 1000

    def spaced_pipeline_ms(self, gap_s: float, runs: int) -> float:
        """The same pipeline, each image ``gap_s`` after the last answer: what the model
        itself takes for a request that finds it idle, its OpenMP threads asleep and its
        caches cold (the server wakes the threads while the image decodes; this does not)."""
        durations: list[float] = []
        for index in range(runs):
            time.sleep(gap_s)
            begin = time.perf_counter()
            self._classify_upload(index)
            durations.append(time.perf_counter() - begin)
        return statistics.median(durations) * 1000

    def measure(self, max_batch_size: int, seconds: float) -> dict[str, float]:
        """Every in-process limit, once."""
        batch_sizes = [size for size in BATCH_SIZES if size < max_batch_size] + [max_batch_size]
        return {
            **self.forward_limit(max_batch_size, seconds),
            "forward_batch1_served_images_per_s": self.forward_images_per_s(
                "served", 1, seconds / 2
            ),
            # What an ideal server's batches would cost (target 4, bench/queueing.py).
            **{
                f"{FORWARD_MS_PREFIX}{size}": size
                * 1000
                / self.forward_images_per_s("served", size, seconds / 4)
                for size in batch_sizes
            },
            "preprocess_ms_per_image": self.preprocess_ms(seconds),
            "single_image_pipeline_ms": self.pipeline_ms(seconds),
        }
