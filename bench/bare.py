"""A bare process that just holds the model: the baseline for a worker's resident memory.

Prints its resident set size in bytes after loading and warming up the model, the same
steps a server worker takes before it reports ready, with the allocator set as a worker
sets it and returning freed memory as a worker at rest does (``service.memory``).
"""

from __future__ import annotations

import sys

import psutil
import torch

from classification import load_classifier
from service import memory
from service.settings import PROJECT_ROOT


def main() -> None:
    max_batch_size, threads, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(threads)
    memory.keep_freed_memory()
    classifier = load_classifier(
        weights="random",
        labels_file=PROJECT_ROOT / "imagenet_classes.txt",
        device="cpu",
        dtype=dtype,
    )
    classifier.warm_up(sorted({1, max_batch_size}))
    trim = memory.malloc_trim()
    if trim is not None:
        trim()
    print(psutil.Process().memory_info().rss)


if __name__ == "__main__":
    main()
