"""petit.deadlines: a connection's timeout fires at the time its current phase was given,
never before, never for a phase that was cleared or moved later, and the watchdog's heap
stays bounded however its deadlines move. Trio's autojump clock keeps time exact."""

from __future__ import annotations

import math

import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from petit.deadlines import Watchdog

WAITED = 1000.0  # virtual seconds a deadline's task waits after its last move


async def expiry(
    watchdog: Watchdog, moves: list[tuple[int, float | None]]
) -> tuple[float, str | None]:
    """Apply ``moves`` (after each delay: start for that many seconds, or clear) to one
    deadline, then wait; (when its wait ended, the phase that expired)."""
    with watchdog.deadline() as deadline:
        for index, (delay, seconds) in enumerate(moves):
            await trio.sleep(delay)
            if seconds is None:
                deadline.clear()
            else:
                deadline.start(seconds, f"phase {index}")
        await trio.sleep(WAITED)
    return trio.current_time(), deadline.expired


def expected(moves: list[tuple[int, float | None]]) -> tuple[float, str | None]:
    """What ``expiry`` must find, worked out by hand from the same moves."""
    now, when, phase = 0.0, math.inf, None
    for index, (delay, seconds) in enumerate(moves):
        if when <= now + delay:
            return when, phase
        now += delay
        when, phase = (math.inf, None) if seconds is None else (now + seconds, f"phase {index}")
    if when <= now + WAITED:
        return when, phase
    return now + WAITED, None


# Delays are whole seconds and timeouts end in .5, so no move ever lands on an expiry.
MOVES = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20),
        st.none() | st.integers(min_value=0, max_value=30).map(lambda whole: whole + 0.5),
    ),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(MOVES, min_size=1, max_size=6))
def test_each_deadline_expires_when_its_current_phase_runs_out(
    schedules: list[list[tuple[int, float | None]]],
) -> None:
    """Several deadlines moved later, earlier and cleared at once, on one watchdog."""
    results: dict[int, tuple[float, str | None]] = {}
    watchdog = Watchdog()

    async def one(index: int, moves: list[tuple[int, float | None]]) -> None:
        results[index] = await expiry(watchdog, moves)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index, moves in enumerate(schedules):
                nursery.start_soon(one, index, moves)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert results == {index: expected(moves) for index, moves in enumerate(schedules)}


async def test_a_deadline_moved_earlier_wakes_the_watchdog_sooner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The watchdog sleeps until the earliest wake-up; an earlier one cuts that sleep short."""
    watchdog = Watchdog()
    async with trio.open_nursery() as nursery:
        far = watchdog.deadline()

        async def hold_far() -> None:
            with far:
                far.start(100, "far")
                await trio.sleep_forever()

        nursery.start_soon(hold_far)
        await trio.sleep(1)
        assert await expiry(watchdog, [(0, 5.5)]) == (6.5, "phase 0")
        assert far.expired is None
        nursery.cancel_scope.cancel()


async def test_the_heap_stays_bounded_whatever_connections_do(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Deadlines armed and abandoned by the thousand while the watchdog wakes, one moved
    earlier again and again (a caller trickling heads) and one moved later past every wake-up
    leave the heap near the number of live ones, and empty once all are gone."""
    watchdog = Watchdog()
    with watchdog.deadline() as busy:
        for step in range(5000):  # connections that each start a long wait, then close
            with watchdog.deadline() as deadline:
                deadline.start(75, "idle")
            busy.start(10, "response")  # later each time: re-armed at each wake-up
            if step % 50 == 0:
                await trio.sleep(1)  # the watchdog runs: pops, re-arms, prunes
            assert len(watchdog._heap) <= 2 * watchdog._live + 64
        with watchdog.deadline() as trickled:
            for step in range(5000):
                trickled.start(10_000 - step, "head")  # earlier each time: a new wake-up
                assert len(watchdog._heap) <= 2 * watchdog._live + 64
    assert busy.expired is None
    await trio.sleep(20_000)  # every wake-up left comes due
    assert (watchdog._heap, watchdog._live) == ([], 0)
