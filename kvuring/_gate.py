"""Loads first: how many store chains run while loads are in flight.

A request waiting for its prefix blocks is latency; a block being offloaded
is not.  Once store chains are in the device's queue, a load can only wait
behind them (2 MiB writes take milliseconds each), so with
``prioritize_loads=True`` the block core (kvuring/_csrc/blocks.c, ``fill``)
starts at most ``STORES_DURING_LOADS`` store chains while any load is queued
or in flight and releases the rest as loads finish.  Stores are never
starved: that many chains keep going, and all of them run once the loads
are done.  ``stats()["stores_held_for_loads"]`` counts store blocks that
had to wait.
"""

from __future__ import annotations

#: store chains allowed in flight while loads are in flight
STORES_DURING_LOADS = 2
