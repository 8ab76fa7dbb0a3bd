"""The block core: the C per-block state machine (kvuring/_csrc/blocks.c) as Python sees it.

Python touches a batch twice: :meth:`BlockCore.add` hands over its arrays
(keys back to back, buffer addresses), and a callback runs when the core
reports every block of it done, with one status per block in an array.
Everything between -- paths, trailers, checksums, each block's chains,
retries, cleanups -- runs in C, on the io_uring engine and the thread
engine alike.  The core shares the engine with the driver's Python units:
:class:`~kvuring._driver.Driver` pumps both.
"""

from __future__ import annotations

import errno
import os
import time
from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

from kvuring import _binding as b
from kvuring.engine import Engine

ffi = b.ffi
lib = b.lib

LOAD: int = lib.KVU_LOAD
STORE: int = lib.KVU_STORE
STAT: int = lib.KVU_STAT
DELETE: int = lib.KVU_DELETE

LAYOUT_OF: dict[str, int] = {"kvuring": lib.KVU_LAYOUT_KVURING, "vllm": lib.KVU_LAYOUT_VLLM}

STORED: int = lib.KVU_STORED
EXISTS: int = lib.KVU_EXISTS
HIT: int = lib.KVU_HIT
MISS: int = lib.KVU_MISS
CORRUPT: int = lib.KVU_CORRUPT
FAILED: int = lib.KVU_FAILED
UNVERIFIED: int = lib.KVU_UNVERIFIED
PRESENT: int = lib.KVU_PRESENT
ABSENT: int = lib.KVU_ABSENT

#: why a block is CORRUPT, by the code in its error slot
CORRUPT_REASONS: dict[int, str] = {
    lib.KVU_BAD_MAGIC: "bad magic",
    lib.KVU_BAD_TRAILER_SUM: "trailer checksum mismatch",
    lib.KVU_BAD_PADDING: "trailer padding is not zero",
    lib.KVU_BAD_VERSION: "unsupported format",
    lib.KVU_BAD_LENGTH: "payload length does not match",
    lib.KVU_BAD_KEY: "key mismatch",
    lib.KVU_BAD_PAYLOAD_SUM: "payload checksum mismatch",
    lib.KVU_SHORT_READ: "short read",
}

#: the counters of struct kvu_core_stats
STAT_FIELDS = (
    "stored", "exists", "hits", "misses", "corrupt", "failures", "deleted", "bytes_written",
    "bytes_read", "bounced", "held", "retries", "stray", "noreplace_fallbacks", "ioprio_dropped",
    "fixed_transfers", "timeouts", "cleanup_failed", "close_errors", "syncs",
)  # fmt: skip

#: What a store closed with I/O still hung inside the kernel leaves behind:
#: its core (the kernel may still write its statx buffers and trailer
#: pages) and the batches of its lent blocks (their buffers stay pinned).
#: Never freed: freed memory the kernel writes into later would corrupt
#: whatever took its place.
_ABANDONED: list[object] = []


class CoreBatch:
    """One batch in the core: the C struct and every array it points at, kept until done."""

    __slots__ = ("addrs", "c", "error", "holds", "keys", "n", "offsets", "on_done", "pins",
                 "psum_out", "psums", "root_in", "root_out", "status")  # fmt: skip

    def __init__(
        self,
        kind: int,
        keys: list[bytes],
        pins: Sequence[Any] | None,
        *,
        addrs: Any = None,
        ready: int | None = None,
        defer_verify: bool = False,
        quiet: bool = False,
        root_in: bytes | None = None,
    ) -> None:
        n = len(keys)
        c = ffi.new("struct kvu_batch *")
        self.c = c
        self.n = n
        self.on_done: Callable[[CoreBatch], None] | None = None
        self.keys = b"".join(keys)
        self.offsets = array("I", accumulate(map(len, keys), initial=0))
        self.status = array("i", bytes(4 * n))
        self.error = array("i", bytes(4 * n))
        self.pins = pins
        # Who still uses the buffers: the core until it reports the batch
        # done, plus any hash thread reading them (see hold()).
        self.holds = 1
        c.kind = kind
        c.n = n
        c.ready = n if ready is None else ready
        c.keys = ffi.from_buffer("uint8_t[]", self.keys)
        c.key_off = ffi.from_buffer("uint32_t[]", self.offsets)
        c.status = ffi.from_buffer("int32_t[]", self.status)
        c.error = ffi.from_buffer("int32_t[]", self.error)
        # The buffers' addresses: given (rows of one region), or converted
        # from the pins in one C loop.
        if addrs is not None:
            self.addrs = addrs
        else:
            self.addrs = ffi.new("char *[]", pins) if pins else None
        c.addrs = ffi.cast("uint64_t *", self.addrs) if self.addrs is not None else ffi.NULL
        self.psums: Any = None
        self.psum_out: Any = None
        if defer_verify:
            self.psum_out = ffi.new("uint64_t[]", n)
            c.psum_out = self.psum_out
            c.defer_verify = 1
        c.quiet = int(quiet)
        self.root_out: Any = None
        # Each block to one root only (by index), none other tried: an eviction
        # removes the copy on the root whose budget it is for.
        self.root_in = root_in
        if root_in is not None:
            if len(root_in) != n:
                raise ValueError(f"root_in: {len(root_in)} roots for {n} keys")
            c.root_in = ffi.from_buffer("uint8_t[]", root_in)

    def give_root_out(self) -> Any:
        """An array the core fills with the root each block ended on (read it once done)."""
        if self.root_out is None:
            self.root_out = ffi.new("uint8_t[]", max(1, self.n))
            self.c.root_out = self.root_out
        return self.root_out

    def give_psums(self) -> Any:
        """An array for the payload checksums of a store batch (filled before ``ready`` rises)."""
        self.psums = ffi.new("uint64_t[]", self.n)
        self.c.psums = self.psums
        return self.psums

    def hold(self) -> None:
        """One more user of the buffers; each hold ends with :meth:`unhold`."""
        self.holds += 1

    def unhold(self) -> None:
        """A user is done; after the last one the buffers' exports are given back.

        Released rather than left to the garbage collector: the caller can
        close an mmap right after the await, and a pin caught in a reference
        cycle crashes CPython < 3.12.7's GC (gh-77894).
        """
        self.holds -= 1
        if self.holds == 0 and self.pins:
            for pin in self.pins:
                ffi.release(pin)
            self.pins = None


class BlockCore:
    """The C block core over one engine; the driver pumps it (see Driver.attach_core)."""

    def __init__(
        self,
        engine: Engine,
        *,
        ns_fd: int,
        reg_fd: int,
        block_size: int,
        verify: bool,
        direct: bool,
        mem_align: int,
        slots: int,
        open_flags: int,
        read_flags: int,
        load_ioprio: int,
        store_limit: int,
        trailers: int,
        trailer_index: int,
        suffix: bytes,
        marker: bytes,
        layout: int = 0,
        timeout: float | None = None,
        fd_install: bool = False,
        durable: bool = False,
        keep_alive: object = None,
        root_id: int = 0,
        extra_roots: Sequence[tuple[int, int, bool, int, int, bytes]] | None = None,
    ) -> None:
        if len(marker) >= 64 or len(suffix) >= 8:
            raise ValueError("temp-file marker or suffix too long")
        cfg = ffi.new("struct kvu_core_config *")
        roots = extra_roots or []
        if 1 + len(roots) > lib.KVU_MAX_ROOTS:
            raise ValueError(f"at most {lib.KVU_MAX_ROOTS} roots")
        for i, (fd, reg, dio, align, rid, mark) in enumerate(
            [(ns_fd, reg_fd, direct, mem_align, root_id, marker), *roots]
        ):
            if len(mark) >= 64:
                raise ValueError("temp-file marker too long")
            root = cfg.roots[i]
            root.ns_fd = fd
            root.reg_fd = reg
            root.direct = int(dio)
            root.mem_align = max(1, align)
            root.id = rid
            root.marker = mark
        cfg.nroots = 1 + len(roots)
        self._nroots = 1 + len(roots)
        #: the configuration, kept for kvu_rank_roots (first_roots)
        self._cfg = cfg
        self._rank = ffi.new("uint8_t[]", lib.KVU_MAX_ROOTS)
        cfg.block_size = block_size
        cfg.verify = int(verify)
        cfg.slots = slots
        cfg.slot_base = engine.core_slot_base
        cfg.skip_success = b.SQE_CQE_SKIP_SUCCESS
        cfg.open_flags = open_flags
        cfg.read_flags = read_flags
        cfg.load_ioprio = load_ioprio
        cfg.store_limit = store_limit
        cfg.trailers = trailers
        cfg.trailer_index = trailer_index
        cfg.noreplace = 1
        cfg.suffix = suffix
        cfg.layout = layout
        cfg.timeout_ns = int(timeout * 1e9) if timeout else 0
        cfg.fd_install = int(fd_install)
        cfg.durable = int(durable)
        self.timeout = timeout
        self.fd_install = fd_install
        self.durable = durable
        #: what the core's memory points into (the trailer pages): kept with it
        self._keep_alive = keep_alive
        self.engine = engine
        self._c = lib.kvu_core_new(cfg, engine.c_engine)
        if self._c == ffi.NULL:
            raise MemoryError("kvuring: could not allocate the block core")
        self._stats = lib.kvu_core_stats(self._c)
        self._batches: dict[int, CoreBatch] = {}
        # Done batches with blocks still in the kernel (past their deadline):
        # their buffers stay pinned until the core reports them released.
        self._lent: dict[int, CoreBatch] = {}
        self._next_id = 0
        self._ids = ffi.new("uint64_t[]", 256)
        self._nother = ffi.new("unsigned *")
        self._ud = engine._reap_ud
        self._res = engine._reap_res
        self._max = engine._reap_max
        self.closed = False

    # -- batches -----------------------------------------------------------------
    def add(self, batch: CoreBatch, on_done: Callable[[CoreBatch], None]) -> None:
        """Queue ``batch``; ``on_done(batch)`` runs once every block has a status."""
        if self.closed:
            raise RuntimeError("kvuring block core is closed")
        self._next_id += 1
        batch.c.id = self._next_id
        batch.on_done = on_done
        self._batches[self._next_id] = batch
        lib.kvu_core_add(self._c, batch.c)

    def set_ready(self, batch: CoreBatch, ready: int) -> None:
        """Blocks [0, ready) of a store batch have their checksums and may start."""
        batch.c.ready = ready

    def cancel(self, batch: CoreBatch) -> None:
        """Drop the batch's blocks that have not started; those in flight finish."""
        if not self.closed and batch.c.id in self._batches:
            lib.kvu_core_cancel(self._c, batch.c)

    def set_spans(self, spans: array[int]) -> None:
        """The registered buffers, as (start, end, index) triples sorted by start."""
        if self.closed:
            return
        n = len(spans) // 3
        res = lib.kvu_core_set_spans(
            self._c, ffi.from_buffer("uint64_t[]", spans) if n else ffi.NULL, n
        )
        if res < 0:
            raise b.os_error(res)

    def drop_queued_stores(self) -> int:
        """Closing: store blocks held back for loads end FAILED without running."""
        return int(lib.kvu_core_drop_queued_stores(self._c))

    # -- driving -----------------------------------------------------------------
    def flush(self) -> None:
        """Start what fits and submit every prepared chain; report batches already done."""
        lib.kvu_core_flush(self._c)
        # A batch can end without a completion: empty, cancelled, or every
        # block failed before its chain was sent.
        self._finish_done()

    def pump(self) -> tuple[list[int], list[int]]:
        """Reap the engine: the core's completions advance its blocks; the rest come back."""
        uds: list[int] = []
        res: list[int] = []
        while True:
            ndone = lib.kvu_core_pump(self._c, self._ud, self._res, self._max, self._nother)
            n = self._nother[0]
            if n:
                uds += ffi.unpack(self._ud, n)
                res += ffi.unpack(self._res, n)
            if ndone:
                self._finish_done()
            if n < self._max:
                return uds, res

    def _finish_done(self) -> None:
        while True:
            n = lib.kvu_core_done(self._c, self._ids, 256)
            if not n:
                break
            for bid in ffi.unpack(self._ids, n):
                batch = self._batches.pop(bid)
                if batch.c.lent:
                    self._lent[bid] = batch
                else:
                    batch.unhold()
                if batch.on_done is not None:
                    batch.on_done(batch)
        if self._lent:
            while n := lib.kvu_core_released(self._c, self._ids, 256):
                for bid in ffi.unpack(self._ids, n):
                    lent = self._lent.pop(bid, None)
                    if lent is not None:
                        lent.unhold()

    def next_deadline(self) -> float | None:
        """Seconds until the earliest deadline of a block in flight, or None (no deadline)."""
        if self.closed or not self.timeout:
            return None
        when = int(lib.kvu_core_next_deadline(self._c))
        if when < 0:
            return None
        return max(0.0, (when - time.monotonic_ns()) / 1e9)

    def root_stats(self, root: int) -> dict[str, Any]:
        """What the core knows of root ``root``: health, last error, counts."""
        if self.closed:
            return dict(self._final_roots[root]) if root < len(self._final_roots) else {}
        st = lib.kvu_core_root(self._c, root)
        if st == ffi.NULL:
            return {}
        now = time.monotonic_ns()
        return {
            "healthy": not st.down,
            "retry_in": max(0.0, (st.retry_at - now) / 1e9) if st.down else 0.0,
            "last_error": errno.errorcode.get(st.last_error) if st.last_error else None,
            "failures": int(st.failures),
            "stored": int(st.stored),
            "hits": int(st.hits),
            "moved_on": int(st.moved_on),
            "in_flight": int(st.inflight),
            "lent": int(st.lent),
        }

    def first_roots(self, kbs: Sequence[bytes]) -> list[int]:
        """The root each key's store goes to now: its first root by rank that is not failing.

        (The core's choice, but for a failing root's probe: a root marked
        failing counts as skipped here.  Every root failing: the first.)
        """
        if self._nroots == 1 or self.closed:
            return [0] * len(kbs)
        cfg, rank, rank_roots = self._cfg, self._rank, lib.kvu_rank_roots
        down = {i for i in range(self._nroots) if lib.kvu_core_root(self._c, i).down}
        out = []
        for kb in kbs:
            rank_roots(cfg, kb, len(kb), rank)
            first = rank[0]
            if down and first in down:
                first = next((r for r in rank[0 : self._nroots] if r not in down), first)
            out.append(first)
        return out

    def lent(self) -> int:
        """Blocks that ended for their callers while the kernel still has their chains."""
        if self.closed:
            return sum(batch.c.lent for batch in self._lent.values())
        return int(lib.kvu_core_lent(self._c))

    def abort(self, err: int = errno.ECANCELED) -> int:
        """Closing: every queued and in-flight block ends FAILED (``err``) now; returns how many are lent."""
        if self.closed:
            return 0
        lent = int(lib.kvu_core_abort(self._c, err))
        self._finish_done()
        return lent

    def errors(self) -> dict[str, int]:
        """FAILED blocks by errno name (``{"EIO": 2, "ETIMEDOUT": 1}``)."""
        if self.closed:
            return dict(self._final_errors)
        counts = self._stats.errors
        return {
            errno.errorcode.get(code, str(code)): int(counts[code])
            for code in range(1, lib.KVU_ERRNOS)
            if counts[code]
        }

    def busy(self) -> bool:
        """Blocks queued, in flight, or finished and not yet reported."""
        return bool(lib.kvu_core_busy(self._c))

    def in_flight(self) -> bool:
        """Blocks whose chains the engine has (so a completion will come)."""
        return bool(lib.kvu_core_active(self._c))

    @property
    def noreplace(self) -> bool:
        """Whether renames still ask for RENAME_NOREPLACE (False once the filesystem refused it)."""
        if self.closed:
            return self._final["noreplace"] != 0
        return bool(lib.kvu_core_noreplace(self._c))

    @property
    def load_ioprio(self) -> int:
        if self.closed:
            return self._final["load_ioprio"]
        return int(lib.kvu_core_load_ioprio(self._c))

    def stats(self) -> dict[str, int]:
        """The core's counters (kept after close)."""
        if self.closed:
            return dict(self._final)
        st = self._stats
        return {name: int(getattr(st, name)) for name in STAT_FIELDS}

    def close(self) -> None:
        """Free the core once nothing is in flight (the driver drains first).

        With blocks still lent (I/O hung in the kernel) the core's memory,
        and the lent batches with their pinned buffers, are left allocated
        for good (``_ABANDONED``): the kernel may still write into them.
        """
        if self.closed:
            return
        final = self.stats()
        final["noreplace"] = int(self.noreplace)
        final["load_ioprio"] = self.load_ioprio
        self._final_errors = self.errors()
        self._final_roots = [self.root_stats(i) for i in range(self._nroots)]
        self._final = final
        lent = int(lib.kvu_core_lent(self._c))
        self.closed = True
        if lent:
            final["lent_at_close"] = lent
            _ABANDONED.append((self._c, self._keep_alive, list(self._lent.values())))
        elif os.getpid() == self.engine.owner_pid:
            lib.kvu_core_free(self._c)
        self._c = ffi.NULL
        self._stats = ffi.NULL


def row_addrs(base: int, stride: int, nrows: int, rows: Any, n: int) -> tuple[Any, int]:
    """Addresses of ``rows`` (int64 buffer) of a region: (uint64_t[n], first bad index or -1)."""
    out = ffi.new("uint64_t[]", max(1, n))
    bad = lib.kvu_row_addrs(base, stride, nrows, ffi.from_buffer("int64_t[]", rows), n, out)
    return out, int(bad)


def checksums(addrs: Any, n: int, first: int, step: int, length: int, out: Any) -> None:
    """xxh3 of blocks first, first + step, ... into ``out`` (C, without the GIL)."""
    lib.kvu_checksum_many(addrs, n, first, step, length, out)


def verify(batch: CoreBatch, first: int, step: int, length: int) -> int:
    """Settle UNVERIFIED loads first, first + step, ...: HIT or CORRUPT; the CORRUPT count."""
    c = batch.c
    return int(
        lib.kvu_verify_many(c.addrs, batch.n, first, step, length, c.psum_out, c.status, c.error)
    )
