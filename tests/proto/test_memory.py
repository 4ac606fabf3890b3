"""petit.memory: when a burst is over, the heap it freed goes back to the system."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import trio
import trio.testing

from petit.memory import (
    QUIET_CPU,
    TRIM_GROWTH,
    TrimPolicy,
    _malloc_trim,
    resident_bytes,
    trim_after_bursts,
)

MB = 1024 * 1024


def test_a_trim_waits_for_growth_and_for_a_quiet_interval() -> None:
    policy = TrimPolicy(interval=10.0, resident_after_trim=40 * MB, cpu_before=1.0)
    busy = 10.0 * QUIET_CPU * 2  # CPU seconds of a busy interval
    assert not policy.reading(40 * MB + TRIM_GROWTH, cpu=1.0 + busy)  # grown, but busy
    assert policy.reading(40 * MB + TRIM_GROWTH, cpu=1.0 + busy)  # grown, and now quiet
    policy.trimmed(41 * MB)
    assert not policy.reading(41 * MB + TRIM_GROWTH - 1, cpu=1.0 + busy)  # quiet, not grown
    assert policy.reading(41 * MB + TRIM_GROWTH, cpu=1.0 + busy)


def test_trimming_gives_freed_heap_back() -> None:
    """Buffers of a tunnel's size, freed from the heap, stay resident until a trim: whether
    glibc put them there (its threshold raised over them) or ``keep_heap_between_buffers``
    did (another test in this process may have called it)."""
    malloc_trim = _malloc_trim()
    assert malloc_trim is not None, "glibc's malloc_trim (this is a glibc system)"
    malloc_trim(0)
    buffers = [bytearray(256 * 1024) for _ in range(4)]
    del buffers  # freed mmapped chunks: glibc raises its threshold above their size
    held = [bytearray(256 * 1024) for _ in range(160)]  # 40 MiB, now from the heap
    for buffer in held:
        buffer[::4096] = b"x" * len(buffer[::4096])  # touch every page
    # Keep one live buffer at the top of the heap, so nothing is returned without a trim.
    top = bytearray(1024)
    del held
    before = resident_bytes()
    malloc_trim(0)
    after = resident_bytes()
    assert before - after >= 20 * MB, (before, after)
    assert top is not None


# A transfer's chunks in a fresh interpreter: four 256 KiB buffers held at once (the read, its
# frame, the masked copy, the ciphertext), written through, then freed together; 100 MiB in
# all. Prints the page faults taken after the first chunk.
CHUNKS = """
import resource, sys
from petit.memory import keep_heap_between_buffers
if sys.argv[1] == "kept":
    assert keep_heap_between_buffers()
def chunk():
    held = [b"x" * (256 * 1024) for _ in range(4)]
    del held
chunk()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    chunk()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_for_100_mib(mode: str) -> int:
    argv = [sys.executable, "-c", CHUNKS, mode]
    return int(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout)


def test_a_transfers_buffers_reuse_the_heap_instead_of_faulting_it_in_again() -> None:
    """With glibc's own thresholds the heap's top goes back to the system each time the chunk's
    buffers are freed together, and every page of the next chunk faults; kept, none do."""
    untuned = _faults_for_100_mib("default")
    if untuned < 100 * 256 // 10:
        pytest.skip(f"this C library does not return the heap at each chunk ({untuned} faults)")
    kept = _faults_for_100_mib("kept")
    assert kept < 100, f"{kept} page faults for 100 MiB through kept buffers ({untuned} without)"


async def test_start_up_counts_as_a_burst_and_is_trimmed_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """What importing and reading the configuration freed goes back at the first quiet
    check; later quiet checks without growth leave the heap alone."""
    caplog.set_level(logging.DEBUG, logger="petit.memory")
    with trio.move_on_after(3.5 * 10.0):  # three checks, ten (virtual) seconds apart
        await trim_after_bursts(10.0)
    trims = [r for r in caplog.records if r.getMessage().startswith("heap trimmed")]
    assert len(trims) == 1, [r.getMessage() for r in caplog.records]
