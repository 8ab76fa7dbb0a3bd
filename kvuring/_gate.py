"""Loads first: hold back store chains while loads are in flight.

A request waiting for its prefix blocks is latency; a block being offloaded
is not.  Once store chains are in the device's queue, a load can only wait
behind them (2 MiB writes take milliseconds each), so with
``prioritize_loads=True`` the store starts at most ``limit`` store chains
while any load is in flight and releases the rest as loads finish.  Stores
are never starved: ``limit`` chains keep going, and all of them run once
the loads are done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from kvuring._driver import Unit

#: store chains allowed in flight while loads are in flight
STORES_DURING_LOADS = 2


class StoreGate:
    """Admits store units to the ring: all of them, or ``limit`` while loads run."""

    def __init__(self, start: Callable[[Sequence[Unit]], None], limit: int) -> None:
        self._start = start
        self.limit = limit
        self.waiting: deque[Unit] = deque()
        self.stores = 0  # store units started and not finished
        self.loads = 0  # load units started and not finished
        self.held = 0  # store units that ever had to wait (for stats)
        self.closed = False

    def add(self, units: Sequence[Unit]) -> None:
        if self.loads or self.waiting:
            self.held += len(units)
            self.waiting.extend(units)
            self._pump()
        else:
            self.stores += len(units)
            self._start(units)

    def _pump(self) -> None:
        if self.closed:
            return
        room = self.limit - self.stores if self.loads else len(self.waiting)
        batch = []
        while room > 0 and self.waiting:
            unit = self.waiting.popleft()
            if unit.cancelled:
                continue
            batch.append(unit)
            room -= 1
        if batch:
            self.stores += len(batch)
            self._start(batch)

    def store_done(self) -> None:
        self.stores -= 1
        if self.waiting:
            self._pump()

    def loads_started(self, n: int) -> None:
        self.loads += n

    def load_done(self) -> None:
        self.loads -= 1
        if not self.loads and self.waiting:
            self._pump()

    def drop_waiting(self) -> list[Unit]:
        """Close: the units that never started (the caller aborts them)."""
        self.closed = True
        units, self.waiting = list(self.waiting), deque()
        return [u for u in units if not u.cancelled]
