"""Timeouts for many connections at the cost of a float store per wait.

# Why

A trio cancel scope per wait costs about 6 µs to enter and leave, and puts its deadline on
trio's heap. The HTTP ingress waited in two per request (for the next request, for the
response head); taking them off the path cut the server's CPU per request by a fifth
(``bench/ab.py``, HTTP at 16 and 64 connections). A connection's timeouts mostly move
later, one request after another, and almost never fire: this module makes moving them
later free, and pays only when one moves earlier or fires.

# Theory of operation

- A ``Deadline`` belongs to one connection and holds one trio cancel scope, entered once for
  the connection's whole life (``with deadline:``).
- The connection names, per phase of its work, when the phase must be over:
  ``deadline.start(seconds, phase)``, and ``deadline.clear()`` when it is over. Both store a
  float and a name; nothing is registered when the time moves later.
- The ``Watchdog`` keeps a heap of wake-ups, at most one live per deadline (``_wake``), and
  a system task that sleeps until the earliest. Woken, it expires each deadline whose time
  came (its scope is cancelled and ``expired`` names the phase) and pushes a new wake-up for
  each one that moved later meanwhile. A deadline moved earlier than its wake-up pushes one
  at once, and moves the watchdog's sleep if it is now the earliest.
- Expiry cancels the connection's scope, so a timeout ends the connection: what it answers
  (a 408, a 504) it answers after the scope, from ``expired``, then closes.
- An expiry and the event a phase waited for can land in one scheduling batch: the task
  wakes with its event, and the cancel is only pending. So a phase ends with ``finish()``,
  and a task that acts on an event within a phase (a 1xx before the final response head)
  calls ``deliver()`` first: either delivers a pending expiry before anything is done.
- Bounded: a wake-up superseded or left by a closed connection stays in the heap until
  either its time comes or stale entries outnumber the live ones twice over, when the heap
  is rebuilt from the live ones. A peer cannot grow it faster than its requests.
- One watchdog serves a whole trio run, as trio's own deadlines do: ``new_deadline()`` finds
  the run's (a ``RunVar``), and its task, a system task, starts with the first deadline armed,
  so any code that builds connections gets one without a nursery to pass around.
"""

from __future__ import annotations

import heapq
import itertools
import math
from types import TracebackType

import trio

_MIN_PRUNE = 64  # stale heap entries tolerated before any rebuild


class Deadline:
    """One connection's timeout: ``start(seconds, phase)`` per phase, ``clear()`` after it."""

    __slots__ = ("_scope", "_wake", "_watchdog", "expired", "phase", "when")

    def __init__(self, watchdog: Watchdog) -> None:
        self._watchdog = watchdog
        self._scope = trio.CancelScope()
        self._wake = math.inf  # the time of this deadline's live heap entry
        self.when = math.inf  # the current phase must be over by then
        self.phase: str | None = None
        self.expired: str | None = None  # the phase whose time ran out, once it did

    def start(self, seconds: float, phase: str) -> None:
        """The phase ``phase`` begins and may last ``seconds``."""
        self.when = when = trio.current_time() + seconds
        self.phase = phase
        if when < self._wake:
            self._watchdog.arm(self, when)

    def clear(self) -> None:
        """No phase runs against the clock until the next ``start``."""
        self.when = math.inf
        self.phase = None

    async def deliver(self) -> None:
        """Deliver an expiry now (trio.Cancelled, caught by the deadline's scope) if there
        was one. The watchdog can expire a phase in the very scheduling batch in which its
        wait was answered; the task then runs on with the answer, and the cancel would only
        land at its next checkpoint, in the middle of whatever it does next. Call this after
        a timed wait, before acting on what it brought. (Until the task yields again, no
        expiry can come: the watchdog is a task too.)"""
        if self.expired is not None:
            await trio.lowlevel.checkpoint()

    async def finish(self) -> None:
        """The phase's wait is over: ``clear``, then ``deliver``."""
        self.clear()
        await self.deliver()

    def __enter__(self) -> Deadline:
        self._scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self.clear()
        self._watchdog.forget(self)
        return self._scope.__exit__(exc_type, exc, traceback)

    def _expire(self) -> None:
        self.expired = self.phase
        self._scope.cancel()


class Watchdog:
    """Expires the ``Deadline``s it hands out (``deadline()``) when their time comes, in the
    trio run that first armed one."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties in the heap never compare deadlines
        self._live = 0  # deadlines with a wake-up in the heap
        self._sleep: trio.CancelScope | None = None  # the task's sleep, while it sleeps
        self._started = False  # its task (it serves the trio run that started it)

    def deadline(self) -> Deadline:
        return Deadline(self)

    def arm(self, deadline: Deadline, when: float) -> None:
        """Wake up for ``deadline`` at ``when`` (earlier than its wake-up so far)."""
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._run, name="petit deadlines")
        if deadline._wake == math.inf:
            self._live += 1
        deadline._wake = when
        heapq.heappush(self._heap, (when, next(self._order), deadline))
        self._prune_if_stale()
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when

    def forget(self, deadline: Deadline) -> None:
        """``deadline``'s connection ended: its wake-up, if any, is stale now."""
        if deadline._wake != math.inf:
            deadline._wake = math.inf
            self._live -= 1
            self._prune_if_stale()

    def _prune_if_stale(self) -> None:
        """Rebuild the heap from its live entries once stale ones outnumber them twice over
        (amortised: each rebuild follows at least ``_MIN_PRUNE`` new stale entries)."""
        if len(self._heap) > 2 * self._live + _MIN_PRUNE:
            self._heap = [entry for entry in self._heap if entry[2]._wake == entry[0]]
            heapq.heapify(self._heap)

    async def _run(self) -> None:
        while True:
            earliest = self._heap[0][0] if self._heap else math.inf
            with trio.CancelScope(deadline=earliest) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                when, _, deadline = heapq.heappop(self._heap)
                if deadline._wake != when:
                    continue  # superseded by an earlier wake-up, or its connection ended
                deadline._wake = math.inf
                self._live -= 1
                if deadline.when <= now:
                    deadline._expire()
                elif deadline.when != math.inf:
                    self.arm(deadline, deadline.when)


_WATCHDOG: trio.lowlevel.RunVar[Watchdog] = trio.lowlevel.RunVar("petit_deadlines")


def new_deadline() -> Deadline:
    """A deadline timed by this trio run's watchdog."""
    try:
        watchdog = _WATCHDOG.get()
    except LookupError:
        watchdog = Watchdog()
        _WATCHDOG.set(watchdog)
    return watchdog.deadline()
