"""Keeping freed memory for reuse while the worker works, and giving it back to the
operating system once the worker is idle.

glibc keeps memory that threads freed in its arenas for reuse, so after a burst of large
batches a worker's resident set stays 100-200 MiB above its size at rest for good. One
``malloc_trim(0)`` returns it, in a few milliseconds. It is called only once the worker has
been idle for a while and only if it grew since the last call, because the next request
then pays a few milliseconds of page faults to take the memory back.

While the worker works, glibc's own thresholds would give much of it back on every
``free`` instead (``keep_freed_memory``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IDLE_S = 1.0
MIN_GROWTH_BYTES = 16 * 2**20
_STATM = Path("/proc/self/statm")

# mallopt's parameters (malloc.h) and the names under which glibc reads them itself.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_GLIBC_SETTINGS = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)
_GLIBC_TUNABLES = (
    "glibc.malloc.arena_max",
    "glibc.malloc.mmap_max",
    "glibc.malloc.mmap_threshold",
    "glibc.malloc.trim_threshold",
    "glibc.malloc.top_pad",
)


def _libc_function(name: str) -> Any:
    """The C library's function ``name``, or None where it has none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl, macOS)."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


def keep_freed_memory() -> bool:
    """Have glibc keep what ``free`` releases for the next allocation, in one arena, rather
    than give it back to the operating system at once; ``IdleTrimmer`` gives it back when
    the worker is idle.

    By default glibc serves a large block with a mapping of its own and unmaps it when
    freed, and gives each thread an arena of 64 MiB heaps that it unmaps once they empty:
    the model's thread had the kernel map and zero most of every forward pass's memory
    anew (about 7,500 page faults for a batch of one, a quarter of its latency on two
    cores; 1,100 a request in batches of 16, a sixth of the throughput). With no mappings
    of their own, no trimming on ``free`` and the main arena for every thread (whose free
    memory ``malloc_trim`` gives back whole; a thread's heaps keep their free top), a
    forward reuses the memory of the last. Call it before threads start: one that has
    allocated keeps its arena.

    Returns whether it did: not where the C library lacks ``mallopt`` or ``malloc_trim``
    (without the trimmer, nothing would give the memory back), nor where the operator set
    one of these glibc settings (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``,
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or their
    ``GLIBC_TUNABLES``): then glibc's settings stand, all of them.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(name) for name in _GLIBC_SETTINGS) or any(
        name in tunables for name in _GLIBC_TUNABLES
    ):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None or malloc_trim() is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(
        mallopt(parameter, value)
        for parameter, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_MAX, 0),
            # The largest threshold mallopt takes (an int): trimming is left to malloc_trim.
            (_M_TRIM_THRESHOLD, 2**31 - 1),
        )
    )


def resident_bytes() -> int:
    """This process's resident set size now (Linux)."""
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def report_resident(record: Callable[[int], None], interval_s: float = 5.0) -> None:
    """Pass this process's resident size to ``record`` every ``interval_s``, until
    cancelled; a round that cannot read it is skipped."""
    while True:
        with contextlib.suppress(OSError):
            record(resident_bytes())
        await asyncio.sleep(interval_s)


class IdleTrimmer:
    """Trims the heap once the worker has been idle ``idle_s`` after growing by at least
    ``min_growth_bytes`` since the last trim (or since it started).

    Args:
        idle_for: Seconds since the worker last did any work; 0 while it works.
        trim: What returns the freed memory (``malloc_trim()``).
    """

    def __init__(
        self,
        idle_for: Callable[[], float],
        trim: Callable[[], object],
        resident: Callable[[], int] = resident_bytes,
        idle_s: float = IDLE_S,
        min_growth_bytes: int = MIN_GROWTH_BYTES,
    ) -> None:
        self._idle_for = idle_for
        self._trim = trim
        self._resident = resident
        self._idle_s = idle_s
        self._min_growth_bytes = min_growth_bytes
        self._failing = False

    async def run(self) -> None:
        """Watch until cancelled.

        A round that cannot read the resident size (a worker out of file descriptors
        cannot open ``/proc``) is skipped, with one warning until a round succeeds again.
        """
        baseline = self._read_resident()
        while True:
            await asyncio.sleep(self._idle_s / 2)
            resident = self._read_resident()
            if resident is None:
                continue
            if baseline is None:
                baseline = resident
            if self._idle_for() < self._idle_s:
                continue
            # Growth counts from the smallest size seen since the last trim.
            baseline = min(baseline, resident)
            if resident - baseline < self._min_growth_bytes:
                continue
            await asyncio.to_thread(self._trim)
            baseline = self._read_resident()
            logger.debug("returned freed memory from %d MiB", resident // 2**20)

    def _read_resident(self) -> int | None:
        try:
            resident = self._resident()
        except OSError as exc:
            if not self._failing:
                logger.warning("memory trimming skipped until the resident size reads: %s", exc)
            self._failing = True
            return None
        self._failing = False
        return resident
