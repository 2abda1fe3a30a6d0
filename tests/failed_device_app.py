"""The service, with a device that fails at every forward pass once it has started: what
gunicorn serves in the test of a worker whose GPU failed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import main
from classification import DeviceFailed, Prediction

_start = main.Service.start


def _failed(pixels: Sequence[np.ndarray], top_k: Sequence[int]) -> list[list[Prediction]]:
    raise DeviceFailed("cuda:0 failed: CUDA error: an illegal memory access was encountered")


async def _start_then_fail(self: main.Service) -> None:
    await _start(self)  # loads and warms up the real model
    assert self.classifier is not None
    self.classifier.classify = _failed  # type: ignore[method-assign]


main.Service.start = _start_then_fail  # type: ignore[method-assign]
app = main.app
