"""The service, with a model that never returns from a forward pass once it has started:
what gunicorn serves in the test of a worker whose model is stuck."""

from __future__ import annotations

import threading

import main

_start = main.Service.start


async def _start_then_stick(self: main.Service) -> None:
    await _start(self)  # loads and warms up the real model
    assert self.classifier is not None
    never = threading.Event()
    self.classifier.classify = lambda pixels, top_k: never.wait()  # type: ignore[method-assign,assignment,return-value]


main.Service.start = _start_then_stick  # type: ignore[method-assign]
app = main.app
