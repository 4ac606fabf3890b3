"""Freed heap memory handed back to the system once a burst of traffic is over.

glibc's malloc keeps what a burst freed. A tunnel moves data in 256 KiB buffers; once such
buffers have been freed, glibc raises its mmap threshold above them, so later ones come from
the heap, and the heap's free space stays in the process. After a few rounds of downloads a
client sat 13 MB above its idle size (59.1 MB against 46), the server 4 MB (52.8 against
48.7), and each round added a little until a plateau: measured with ``bench/run.py``'s leak
check. ``malloc_trim(0)`` gives it back: 59.1 → 46.2 and 52.8 → 48.7 MB.

Trimming at every free is no answer: a fixed mmap threshold (``M_MMAP_THRESHOLD``) kept both
processes near their idle size but doubled the CPU per MB of a download (a fresh mapping and
its page faults for every buffer). So ``trim_after_bursts`` checks now and then and trims
once a burst is over: the resident size grew by ``TRIM_GROWTH`` since the last trim, and the
process used under ``QUIET_CPU`` of a core over the last ``TRIM_CHECK`` seconds. A trim costs
a few milliseconds. Start-up counts as a burst: importing and reading the configuration leave
about 1 MB of freed heap behind (an idle server 45.7 MB after the trim, 46.7 before), so the
first quiet check trims whatever the size.

``TrimPolicy`` decides, without a clock or the process: the task feeds it readings. Where the
C library has no ``malloc_trim`` (not glibc) the task returns at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("petit.memory")

TRIM_CHECK = 10.0  # seconds between checks
TRIM_GROWTH = 4 * 1024 * 1024  # bytes of resident growth since the last trim worth a trim
QUIET_CPU = 0.02  # share of one core under which the last check's interval counts as quiet


@dataclass
class TrimPolicy:
    """Whether to trim now, from readings of the resident size (bytes) and the CPU time used
    (seconds) taken every ``interval`` seconds."""

    interval: float
    resident_after_trim: int  # the resident size after the last trim (or at start)
    cpu_before: float  # CPU seconds used up to the previous reading

    def reading(self, resident: int, cpu: float) -> bool:
        """Record one reading; True when a trim is due now."""
        quiet = cpu - self.cpu_before < QUIET_CPU * self.interval
        self.cpu_before = cpu
        return quiet and resident - self.resident_after_trim >= TRIM_GROWTH

    def trimmed(self, resident: int) -> None:
        """Record the resident size right after a trim."""
        self.resident_after_trim = resident


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (or no /proc to read
    the resident size from)."""
    name = ctypes.util.find_library("c")
    if name is None or not os.path.exists("/proc/self/statm"):
        return None
    function = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


def resident_bytes() -> int:
    """This process's resident set size (Linux's /proc)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def trim_after_bursts(interval: float = TRIM_CHECK) -> None:
    """Run forever, trimming the heap after each burst (see the module doc)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return
    policy = TrimPolicy(interval, 0, time.process_time())  # 0: start-up was a burst
    while True:
        await trio.sleep(interval)
        if policy.reading(resident_bytes(), time.process_time()):
            before = resident_bytes()
            malloc_trim(0)
            after = resident_bytes()
            policy.trimmed(after)
            log.debug("heap trimmed after a burst: %.1f MB -> %.1f MB", before / 1e6, after / 1e6)
