"""The service, with a model that takes at least 50 ms over every batch once it has started:
what gunicorn serves where a test needs the queue to last, however fast the machine."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

import main
from classification import Prediction

EXTRA_S = 0.05

_start = main.Service.start


async def _start_then_slow_down(self: main.Service) -> None:
    await _start(self)  # loads and warms up the real model
    assert self.classifier is not None
    classify = self.classifier.classify

    def slow_classify(pixels: Sequence[np.ndarray], top_k: Sequence[int]) -> list[list[Prediction]]:
        time.sleep(EXTRA_S)
        return classify(pixels, top_k)

    self.classifier.classify = slow_classify  # type: ignore[method-assign]


main.Service.start = _start_then_slow_down  # type: ignore[method-assign]
app = main.app
