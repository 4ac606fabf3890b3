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

During a burst the opposite holds: the heap must keep what each buffer freed for the next
one. glibc's dynamic thresholds do not: once its mmap threshold has risen to 256 KiB, its
trim threshold is twice that, so when the few buffers a chunk of a transfer holds at once
(the read, its frame, the masked copy, the ciphertext) are freed together, the heap's top
is returned to the system, and the next chunk maps it again and faults on every page. A
client that had served a few seconds of small requests (wrk, 64 connections) before four
parallel downloads took 61-277 page faults per MiB moved and 15-20% more CPU per MiB.
``keep_heap_between_buffers`` fixes both thresholds at start (``mallopt``): allocations
under ``HEAP_ALLOCATION_LIMIT`` come from the heap, and up to ``HEAP_KEPT_FREE`` bytes free
at its top stay there; the same downloads then fault 1-2 times per MiB. The trim after a
burst returns them as before.

``TrimPolicy`` decides, without a clock or the process: the task feeds it readings. Where the
C library has no ``malloc_trim`` or ``mallopt`` (not glibc) the task returns at once; where
glibc refuses the thresholds, it says so and trims after bursts all the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import trio

log = logging.getLogger("petit.memory")

TRIM_CHECK = 10.0  # seconds between checks
TRIM_GROWTH = 4 * 1024 * 1024  # bytes of resident growth since the last trim worth a trim
QUIET_CPU = 0.02  # share of one core under which the last check's interval counts as quiet
HEAP_ALLOCATION_LIMIT = 4 * 1024 * 1024  # bytes; larger allocations get their own mapping
HEAP_KEPT_FREE = 8 * 1024 * 1024  # bytes free at the heap's top kept for the next buffers
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


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


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, if it has glibc's ``malloc_trim`` and ``mallopt`` and there is a /proc
    to read the resident size from; None otherwise. Looked up once: ``find_library`` runs
    ``ldconfig``."""
    name = ctypes.util.find_library("c")
    if name is None or not os.path.exists("/proc/self/statm"):
        return None
    libc = ctypes.CDLL(name)
    if not all(hasattr(libc, function) for function in ("malloc_trim", "mallopt")):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (see ``_glibc``)."""
    libc = _glibc()
    return None if libc is None else cast(Callable[[int], int], libc.malloc_trim)


def keep_heap_between_buffers() -> bool:
    """Fix glibc's mmap and trim thresholds so a transfer's buffers reuse the heap instead of
    mapping and faulting it in again (see the module doc); whether glibc took both."""
    libc = _glibc()
    return libc is not None and all(
        libc.mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, HEAP_ALLOCATION_LIMIT),
            (_M_TRIM_THRESHOLD, HEAP_KEPT_FREE),
        )
    )


def resident_bytes() -> int:
    """This process's resident set size (Linux's /proc)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def trim_after_bursts(interval: float = TRIM_CHECK) -> None:
    """Keep the heap between a burst's buffers, then run forever, trimming it after each
    burst (see the module doc)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return
    if not keep_heap_between_buffers():
        log.info("glibc refused fixed heap thresholds: its own stay (more page faults per MiB)")
    policy = TrimPolicy(interval, 0, time.process_time())  # 0: start-up was a burst
    while True:
        await trio.sleep(interval)
        if policy.reading(resident_bytes(), time.process_time()):
            before = resident_bytes()
            malloc_trim(0)
            after = resident_bytes()
            policy.trimmed(after)
            log.debug("heap trimmed after a burst: %.1f MB -> %.1f MB", before / 1e6, after / 1e6)
