"""The driver: units of work, their tickets, and completion dispatch.

A :class:`Unit` is one piece of work in flight: one linked chain of
operations, or several chains one after another (a store that fails halfway
follows up with a cleanup chain).  While in flight it holds a *ticket*, which
is also its direct-descriptor slot, so at most ``engine.slots`` units run at
once and the CQ can never overflow; units beyond that wait in FIFO order.

The driver is written once and knows no event loop: the asyncio adapter, a
polling front end or a blocking caller all drive it the same way::

    driver.start(unit)      # prepares SQEs, or queues the unit
    driver.flush()          # one submit for everything prepared
    driver.process()        # reap, dispatch, start waiting units

user_data layout: ``generation << 24 | ticket << 4 | step``.  The generation
changes each time a ticket is reused, so a completion can never reach the
wrong unit.
"""

from __future__ import annotations

import errno
import os
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvuring import _binding as b
from kvuring._blocks import _ABANDONED
from kvuring._ops import new_words

if TYPE_CHECKING:
    from kvuring._blocks import BlockCore
from kvuring.engine import INTERNAL_TAG, Completions, Engine

STEP_BITS = 4
TICKET_BITS = 20
MAX_STEPS = 1 << STEP_BITS
TICKET_MASK = (1 << TICKET_BITS) - 1
_STEP_MASK = MAX_STEPS - 1
_UD_MASK = ~_STEP_MASK
CANCEL_TAG = INTERNAL_TAG | 2

_SKIP = b.SQE_CQE_SKIP_SUCCESS
_LINK = b.SQE_IO_LINK
_HARD = b.SQE_IO_HARDLINK

# What makes a result fail its request (the kernel's REQ_F_FAIL), which is
# what breaks a soft link; recorded per step by Unit.op, mirrored by
# kvu_fails in build_uring.py.  A rule >= 0 is a read or write that must
# move exactly that many bytes.
_FAILS_IF_NEGATIVE = -1
_FAILS_IF_CANCELLED = -2  # statx, mkdirat, unlinkat, renameat: an error is only a result
_FAILS_IF_BAD_FD = -3  # fsync: likewise, except a bad fd (or a cancel)
_RW_OPS = frozenset((b.OP_READ, b.OP_WRITE, b.OP_READ_FIXED, b.OP_WRITE_FIXED))
_RULES = {
    b.OP_STATX: _FAILS_IF_CANCELLED,
    b.OP_MKDIRAT: _FAILS_IF_CANCELLED,
    b.OP_UNLINKAT: _FAILS_IF_CANCELLED,
    b.OP_RENAMEAT: _FAILS_IF_CANCELLED,
    b.OP_FSYNC: _FAILS_IF_BAD_FD,
}


def _fails(res: int, rule: int) -> bool:
    if rule >= 0:
        return res != rule
    if rule == _FAILS_IF_NEGATIVE:
        return res < 0
    return res == -errno.ECANCELED or (rule == _FAILS_IF_BAD_FD and res == -errno.EBADF)


class Unit:
    """One piece of in-flight work; subclasses say what to submit and what results mean.

    A subclass implements :meth:`begin` (write the first chain with
    :meth:`op`), :meth:`on_cqe` (note one completion) and :meth:`end_chain`
    (called once per chain after its last completion; write another chain
    with :meth:`op` to continue, or write nothing to finish).  :meth:`aborted`
    is called for a unit that never started because the driver closed.
    """

    __slots__ = ("_flags", "_loud", "_rules", "_ud", "_words", "cancelled", "ticket")

    def __init__(self) -> None:
        self.ticket = -1
        self.cancelled = False
        self._ud = 0
        self._flags: list[int] = []
        self._rules: list[int] = []
        self._loud = False
        self._words: array[int] = _EMPTY

    # -- for subclasses --------------------------------------------------------
    def op(
        self,
        opcode: int,
        flags: int,
        fd: int = 0,
        addr: int = 0,
        length: int = 0,
        offset: int = 0,
        arg1: int = 0,
        arg2: int = 0,
        arg3: int = 0,
    ) -> None:
        """Append one operation to this unit's current chain; returns nothing, costs one extend."""
        step = len(self._flags)
        self._flags.append(flags)
        self._rules.append(length if opcode in _RW_OPS else _RULES.get(opcode, _FAILS_IF_NEGATIVE))
        self._words.extend(
            (
                opcode,
                flags,
                fd & 0xFFFFFFFFFFFFFFFF,
                addr,
                length,
                offset,
                self._ud | step,
                arg1,
                arg2,
                arg3,
            )
        )

    def steps(self) -> int:
        """How many operations the current chain has so far."""
        return len(self._flags)

    def begin(self, slot: int) -> None:
        raise NotImplementedError

    def on_cqe(self, step: int, res: int) -> None:
        raise NotImplementedError

    def end_chain(self, slot: int) -> None:
        """The current chain is over; write another with :meth:`op`, or nothing to finish."""

    def aborted(self, exc: BaseException) -> None:
        """The unit never ran (the driver closed first)."""


_EMPTY: array[int] = new_words()


class Driver:
    """Tickets, submission batching and completion dispatch over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.skip_success = _SKIP if engine.features.get("cqe_skip_success") else 0
        self._units: list[Unit | None] = [None] * engine.slots
        self._free: list[int] = list(range(engine.slots - 1, -1, -1))
        self._waiting: deque[Unit] = deque()
        self._words = new_words()
        self._generation = 0
        self.in_flight = 0
        self.stray_cqes = 0
        self.units_started = 0
        self.closed = False
        #: called when the last in-flight unit finishes (for close())
        self.on_idle: Callable[[], None] | None = None
        #: the C block core sharing this engine (kvuring._blocks), if any
        self.core: BlockCore | None = None

    def attach_core(self, core: BlockCore) -> None:
        """Drive ``core`` with this driver: its completions are reaped and dispatched in C."""
        self.core = core

    def busy(self) -> bool:
        """Work in flight, queued, or prepared and not yet submitted (units or core blocks)."""
        core = self.core
        return bool(
            self.in_flight or self._waiting or self._words or (core is not None and core.busy())
        )

    # -- starting ----------------------------------------------------------------
    def start(self, unit: Unit) -> None:
        """Prepare ``unit``'s first chain now if a ticket is free, else queue it."""
        if self.closed:
            raise RuntimeError("kvuring driver is closed")
        if self._free and not self._waiting:
            self._launch(unit, self._free.pop())
        else:
            self._waiting.append(unit)

    def _launch(self, unit: Unit, ticket: int) -> None:
        self._generation = (self._generation + 1) & 0xFFFFFFFF
        unit.ticket = ticket
        unit._ud = (self._generation << 24) | (ticket << STEP_BITS)
        unit._flags = []
        unit._rules = []
        unit._loud = False
        unit._words = self._words
        self._units[ticket] = unit
        self.in_flight += 1
        self.units_started += 1
        unit.begin(ticket)
        if not unit._flags:
            # Nothing to submit after all (for example an empty request).
            self._finish(unit)

    def _start_waiting(self) -> None:
        while self._free and self._waiting:
            unit = self._waiting.popleft()
            if not unit.cancelled:
                self._launch(unit, self._free.pop())

    def cancel(self, unit: Unit) -> None:
        """Ask the kernel to cancel a unit's operations; a queued unit is just dropped.

        The unit still receives every completion it is owed and keeps its
        buffers until then.
        """
        unit.cancelled = True
        if unit.ticket < 0 or self._units[unit.ticket] is not unit:
            return
        for step in range(len(unit._flags)):
            self._words.extend(
                (b.OP_ASYNC_CANCEL, 0, 0, unit._ud | step, 0, 0, CANCEL_TAG, 0, 0, 0)
            )

    # -- submitting ----------------------------------------------------------------
    def has_pending(self) -> bool:
        return bool(self._words)

    def flush(self) -> None:
        """One submit for every operation prepared since the last flush (units and core)."""
        if self._words:
            # Engines consume the words before returning, so the one array
            # every unit writes into is simply emptied (but for what a
            # backed-up kernel could not take yet: the next flush sends it).
            try:
                taken = self.engine.submit(self._words)
            except OSError as exc:
                # The kernel took none of it: every operation fails with the
                # submit's error, so no unit waits for a completion never coming.
                uds = list(self._words[6 :: b.OP_WORDS])
                del self._words[:]
                self.dispatch((uds, [-(exc.errno or 5)] * len(uds)))
            else:
                del self._words[: taken * b.OP_WORDS]
        if self.core is not None:
            self.core.flush()

    # -- completing ----------------------------------------------------------------
    def process(self) -> int:
        """Reap and dispatch every available completion; start waiting units.

        With a block core attached the reaping is the core's (one C call
        advances its blocks and hands back the units' completions).
        Returns the units' CQEs seen.
        """
        core = self.core
        uds, res = self.engine.reap() if core is None else core.pump()
        if uds:
            self.dispatch((uds, res))
        if core is not None and self.on_idle is not None and not self.busy():
            self.on_idle()
        return len(uds)

    def dispatch(self, completions: Completions) -> None:
        uds, results = completions
        units = self._units
        n_units = len(units)
        for ud, res in zip(uds, results):
            if ud & INTERNAL_TAG:
                continue
            ticket = (ud >> STEP_BITS) & TICKET_MASK
            unit = units[ticket] if ticket < n_units else None
            if unit is None or unit._ud != ud & _UD_MASK:
                self.stray_cqes += 1
                continue
            step = ud & _STEP_MASK
            unit.on_cqe(step, res)
            chain = unit._flags
            # A chain is over after its last step, or after a failed step
            # that carried CQE_SKIP_SUCCESS on a soft link: the kernel cancels
            # the rest of the chain without posting their CQEs.  A SKIP step
            # that posts has failed -- unless an earlier failure without SKIP
            # already cancelled it, and then every later step posts
            # -ECANCELED too, so the chain only ends at its last step.
            # (Ending it at the first such CQE handed the rest of the old
            # chain's CQEs to the unit's next chain.)
            if step == len(chain) - 1:
                over = True
            else:
                flags = chain[step]
                over = False
                if flags & _LINK and not flags & _HARD:
                    if flags & _SKIP:
                        over = not unit._loud
                    elif _fails(res, unit._rules[step]):
                        unit._loud = True
            if over:
                unit._flags = []
                unit._rules = []
                unit._loud = False
                unit.end_chain(ticket)
                if not unit._flags:
                    self._finish(unit)
        self._start_waiting()

    def _finish(self, unit: Unit) -> None:
        ticket = unit.ticket
        self._units[ticket] = None
        self._free.append(ticket)
        self.in_flight -= 1
        if self.on_idle is not None and not self.busy():
            self.on_idle()

    # -- waiting -----------------------------------------------------------------
    def wait_time(self, deadline: float | None) -> float | None:
        """How long a wait may block: until ``deadline`` (time.monotonic()) or the core's next
        block deadline, whichever is first; None: no limit."""
        core = self.core
        limit = core.next_deadline() if core is not None else None
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            limit = left if limit is None else min(limit, left)
        return limit

    def wait(self, deadline: float | None = None) -> None:
        """Block until a completion may be there, a block's deadline passes, or ``deadline``."""
        limit = self.wait_time(deadline)
        if limit is None:
            self.engine.wait_completion()
        elif limit > 0:
            self.engine.wait(limit)

    # -- closing -----------------------------------------------------------------
    def drain(self, deadline: float | None = None) -> bool:
        """Block until every started unit and core block has finished (queued ones run too).

        False when ``deadline`` (time.monotonic()) passed first.
        """
        while True:
            self.flush()
            if not self.busy():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self.in_flight or self.core is None or self.core.in_flight():
                self.wait(deadline)
            self.process()

    def abort(self, grace: float = 0.2) -> None:
        """End every core block now (FAILED, ECANCELED); wait up to ``grace`` s for their chains."""
        core = self.core
        if core is None or core.closed:
            return
        core.abort()
        until = time.monotonic() + grace
        while core.lent() and time.monotonic() < until:
            self.flush()
            self.engine.wait(max(0.0, until - time.monotonic()))
            self.process()

    def close(self, exc: BaseException | None = None, *, deadline: float | None = None) -> bool:
        """Drain what is in flight, abort what never started, close the engine; idempotent.

        With ``deadline``, what is still in flight then is aborted (its
        blocks end FAILED, ECANCELED) and, if the kernel still has chains
        (a hung filesystem), the engine is let go without waiting for
        them; their memory stays allocated for good.  Returns whether
        everything came back.
        """
        if self.closed:
            return True
        clean = True
        if self.engine.owner_pid == os.getpid():
            waiting, self._waiting = list(self._waiting), deque()
            for unit in waiting:
                if not unit.cancelled:
                    unit.aborted(exc or RuntimeError("kvuring closed before the operation ran"))
            if not self.drain(deadline):
                self.abort()
                clean = not self.in_flight
        self.closed = True
        core = self.core
        if core is not None:
            clean = clean and not core.lent()
            core.close()
        if clean:
            self.engine.close()
        else:
            _ABANDONED.append(self._units)  # the kernel may still use their buffers
            self.engine.abandon()
        return clean

    def stats(self) -> dict[str, int]:
        return {
            "in_flight": self.in_flight,
            "waiting": len(self._waiting),
            "units_started": self.units_started,
            "stray_cqes": self.stray_cqes,
        }
