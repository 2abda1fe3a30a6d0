"""Giving a burst's freed memory back to the operating system once the worker is idle.

glibc keeps memory that threads freed in its arenas for reuse, so after a burst of large
batches a worker's resident set stays 100-200 MiB above its size at rest for good. One
``malloc_trim(0)`` returns it, in a few milliseconds. It is called only once the worker has
been idle for a while and only if it grew since the last call, because the next request
then pays a few milliseconds of page faults to take the memory back.
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

logger = logging.getLogger(__name__)

IDLE_S = 1.0
MIN_GROWTH_BYTES = 16 * 2**20
_STATM = Path("/proc/self/statm")


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


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
