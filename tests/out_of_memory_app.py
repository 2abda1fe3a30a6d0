"""The service, with a model that finds no memory for any batch once it has started (torch's
CPU allocator at the process's limit): what gunicorn serves in the test of a worker whose
model stays out of memory."""

from __future__ import annotations

import torch

import main
from service import core

_start = core.Service.start
core.OUT_OF_MEMORY_PERSISTS_S = 0.0  # replaced at the third failure in a row


class _NoMemory(torch.nn.Module):
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 3211264 bytes. Error code 12 (Cannot allocate memory)"
        )


async def _start_then_run_out_of_memory(self: core.Service) -> None:
    await _start(self)  # loads and warms up the real model
    assert self.classifier is not None
    self.classifier._network = _NoMemory()


core.Service.start = _start_then_run_out_of_memory  # type: ignore[method-assign]
app = main.app
