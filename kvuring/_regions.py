"""Registered buffers: which caller memory READ_FIXED / WRITE_FIXED may use.

A registered region's pages are pinned once, at registration, instead of on
every transfer, and the kernel builds each transfer's scatter list from the
pinned pages directly.  On this project's disk that doubled O_DIRECT read
throughput at 64 KiB to 2 MiB and cut the kernel's CPU per GB several-fold
(fio ``fixedbufs=1`` against ``fixedbufs=0``; docs/benchmarks.md).

A store holds a buffer export of every region it registered, so the memory
cannot be unmapped or resized under the kernel; lookups go by address, which
is therefore always the registered memory.  :func:`aligned_buffer` regions
are registered automatically the first time a store sees one of their rows;
closing such a region first takes it out of every store that registered it.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import mmap
import weakref
from array import array
from collections.abc import Callable
from typing import Any

from kvuring import _binding as b
from kvuring.engine import BUFFER_SLOTS, Engine

log = logging.getLogger("kvuring")

#: the kernel's limit for one registered buffer; bigger regions take several slots
MAX_SPAN = 1 << 30


class AlignedBuffer(mmap.mmap):
    """Page-aligned anonymous memory (an :class:`mmap.mmap`) that stores register for fixed I/O."""

    _holders: weakref.WeakSet[FixedBuffers]

    def close(self) -> None:
        for holder in list(getattr(self, "_holders", ())):
            holder.remove(self)
        super().close()

    def __exit__(self, *exc: object) -> None:
        # mmap's own __exit__ calls its C close directly, past the override.
        self.close()


def aligned_buffer(nbytes: int) -> AlignedBuffer:
    """A writable, page-aligned, zero-filled buffer of ``nbytes`` (anonymous mmap).

    Slice it with ``memoryview`` into block-sized rows; rows whose offset is a
    multiple of the block size stay aligned for O_DIRECT.  A store registers
    the region with its ring the first time it sees a row of it, so its
    transfers skip pinning pages (see docs/direct-io.md).
    """
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise TypeError(f"nbytes must be int, not {type(nbytes).__name__}")
    if nbytes <= 0:
        raise ValueError(f"nbytes must be > 0, got {nbytes}")
    buf = AlignedBuffer(-1, nbytes)
    buf._holders = weakref.WeakSet()
    return buf


class FixedBuffers:
    """One engine's registered regions: the buffer slot for an address range."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._starts: list[int] = []
        self._spans: list[tuple[int, int, int]] = []  # (start, end, slot), sorted
        self._regions: dict[int, tuple[Any, Any, list[int]]] = {}  # id -> (obj, pin, slots)
        self._free = list(range(BUFFER_SLOTS - 1, -1, -1))
        self._refused: weakref.WeakSet[Any] = weakref.WeakSet()
        self._logged = False
        self.refusals = 0
        #: called after the registered spans changed (the block core copies them)
        self.on_change: Callable[[], None] | None = None

    def span_words(self) -> array[int]:
        """Every registered span as (start, end, slot) words, sorted by start."""
        words = array("Q")
        for span in self._spans:
            words.extend(span)
        return words

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def active(self) -> bool:
        return bool(self._spans)

    def slot_for(self, addr: int, length: int) -> int:
        """The slot whose memory holds ``[addr, addr + length)``, or -1."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            _start, end, slot = self._spans[i]
            if addr + length <= end:
                return slot
        return -1

    def known(self, obj: object) -> bool:
        return id(obj) in self._regions or obj in self._refused

    def add(self, obj: object) -> bool:
        """Register ``obj``'s memory (writable, buffer protocol); False when the kernel refused."""
        if id(obj) in self._regions:
            return True
        pin = b.pin_buffer(obj, writable=True)
        base, size = b.address_of(pin), len(pin)
        need = -(-size // MAX_SPAN)
        if size == 0 or need > len(self._free):
            b.ffi.release(pin)
            return self._refuse(obj, errno.ENOSPC, "no free buffer slots" if size else "empty")
        slots: list[int] = []
        try:
            for off in range(0, size, MAX_SPAN):
                slot = self._free.pop()
                slots.append(slot)
                self.engine.set_buffer(slot, base + off, min(MAX_SPAN, size - off))
        except OSError as exc:
            self._clear_slots(slots)
            b.ffi.release(pin)
            return self._refuse(obj, exc.errno or errno.EIO, exc.strerror or str(exc))
        self._regions[id(obj)] = (obj, pin, slots)
        for n, slot in enumerate(slots):
            start = base + n * MAX_SPAN
            i = bisect.bisect_right(self._starts, start)
            self._starts.insert(i, start)
            self._spans.insert(i, (start, min(start + MAX_SPAN, base + size), slot))
        holders = getattr(obj, "_holders", None)
        if holders is not None:
            holders.add(self)
        self._changed()
        return True

    def _refuse(self, obj: object, code: int, why: str) -> bool:
        self.refusals += 1
        # Objects without weak references are simply tried again next time.
        with contextlib.suppress(TypeError):
            self._refused.add(obj)
        if not self._logged:
            self._logged = True
            hint = " (raise RLIMIT_MEMLOCK, ulimit -l)" if code == errno.ENOMEM else ""
            log.warning(
                "kvuring: cannot register a buffer for fixed I/O: %s%s; its transfers pin "
                "pages per operation instead",
                why,
                hint,
            )
        return False

    def remove(self, obj: object) -> bool:
        """Unregister ``obj``; False if it was not registered.  In-flight transfers finish first."""
        entry = self._regions.pop(id(obj), None)
        if entry is None:
            return False
        _obj, pin, slots = entry
        keep = [(s, e, n) for s, e, n in self._spans if n not in slots]
        self._spans = keep
        self._starts = [s for s, _e, _n in keep]
        self._changed()
        self._clear_slots(slots)
        b.ffi.release(pin)
        holders = getattr(obj, "_holders", None)
        if holders is not None:
            holders.discard(self)
        return True

    def _clear_slots(self, slots: list[int]) -> None:
        for slot in slots:
            if self.engine.closed:
                self._free.append(slot)
                continue
            try:
                self.engine.set_buffer(slot, 0, 0)
            except (OSError, RuntimeError):
                # Not emptied (wrong thread or process): the slot keeps its
                # old pages until the ring closes, so it is never reused.
                continue
            self._free.append(slot)

    def clear(self) -> None:
        """Unregister everything (the store is closing)."""
        for obj, _pin, _slots in list(self._regions.values()):
            self.remove(obj)

    def stats(self) -> dict[str, int]:
        return {
            "registered_regions": len(self._regions),
            "registered_bytes": sum(len(pin) for _o, pin, _s in self._regions.values()),
            "registration_refused": self.refusals,
        }
