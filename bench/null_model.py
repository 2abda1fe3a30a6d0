"""The service with a model that answers at once: the limit of the serving path itself.

``gunicorn bench.null_model:app -c gunicorn_config.py`` serves as ``main:app`` does (the
model is loaded and warmed up; every request is received, decoded, queued and batched), but
each batch is answered with a constant score for every class instead of running the
network. What then limits the throughput is the rest of a request's path: HTTP, multipart,
decoding, the event loop and the hand-offs between threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import main
from classification import Classifier, Prediction
from service import core

_load_classifier = core.load_classifier


def _load_with_an_instant_model(**options: object) -> Classifier:
    """The model as configured, loaded as usual, whose batches are then answered at once:
    before the warm-up, so the batcher learns the instant answer's run times, not the
    network's."""
    classifier = _load_classifier(**options)  # type: ignore[arg-type]
    labels = classifier.labels
    score = 1.0 / len(labels)

    def classify(pixels: Sequence[np.ndarray], top_k: Sequence[int]) -> list[list[Prediction]]:
        return [[Prediction(index, labels[index], score) for index in range(k)] for k in top_k]

    classifier.classify = classify  # type: ignore[method-assign]
    return classifier


core.load_classifier = _load_with_an_instant_model  # type: ignore[attr-defined]
app = main.app
