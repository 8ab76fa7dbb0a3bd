"""BlockStore: batched, atomic, verified KV-block stores and loads.

Each block is one file ``<root>/<namespace>/<hex[0:3]>/<hex[3:5]>/<hex>``
plus a suffix.  Every block operation is one :class:`~kvuring._driver.Unit`
(the per-block state machine, written once here) driven by the asyncio
adapter; the same units run on the io_uring engine and the thread engine.

Chains (``S`` = CQE_SKIP_SUCCESS, ``L`` = link, ``H`` = hard link, ``A`` = async)::

    store  [mkdirat leaf H·S]                          (first use of a leaf by this process)
           openat2 <final>.<token>.<seq>.tmp O_CREAT|O_EXCL, no symlinks L·S·A
           → writev payload + trailer L·S → close L·S → renameat RENAME_NOREPLACE
    load   openat2 <final>, no symlinks L·S → readv payload + trailer H·S → close
    stat   statx
    delete openat2 leaf O_PATH L·S → unlinkat H → close

With ``fixed_buffers=True`` and registered memory, the readv/writev becomes
two fixed transfers (payload, trailer page).  Payload checksums of blocks of
256 KiB or more are computed on worker threads (see ``_run_summed`` and
``_verify_loads``); while loads are in flight the gate in
:mod:`kvuring._gate` holds back store chains.

A soft-linked step that fails ends its chain, so a rename never follows a
failed or short write; a follow-up chain then closes and unlinks the temp
file.  The temp file sits beside its final name, so publishing is a rename
within one directory.  Each open store registers in ``<namespace>/.tmp/``
(see :mod:`kvuring._writers`), so the next open can remove a dead writer's
temp files without touching a live one's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import errno
import logging
import mmap
import os
import stat
from array import array
from collections.abc import Sequence
from typing import Any

from kvuring import _binding as b
from kvuring import _blocks as core_api
from kvuring._blocks import BlockCore, CoreBatch
from kvuring._driver import Unit
from kvuring._format import (
    MAX_KEY_BYTES,
    PAYLOAD_MISMATCH,
    RAW_SUFFIX,
    TRAILER_SIZE,
    VERIFIED_SUFFIX,
    block_relpath,
    check_namespace,
    checksum,
    key_bytes,
    pack_trailer,
    read_trailer,
)
from kvuring._fs import MEMORY_FILESYSTEMS, filesystem_of
from kvuring._gate import STORES_DURING_LOADS, StoreGate
from kvuring._regions import AlignedBuffer, FixedBuffers, aligned_buffer
from kvuring._types import Buffer
from kvuring._writers import (
    WriterRegistration,
    open_registry,
    remove_dead_writers,
    tmp_suffix,
)
from kvuring.aio import AsyncRing
from kvuring.engine import resolve_backend

__all__ = ["BlockStore", "Status", "aligned_buffer"]

log = logging.getLogger("kvuring")
_from_buffer = b.ffi.from_buffer
_cast = b.ffi.cast

PAGE = mmap.PAGESIZE
MAX_BLOCK_SIZE = 1 << 30
# Every in-flight chain may post up to 8 CQEs and the kernel caps the CQ at
# 64 Ki entries.
MAX_QUEUE_DEPTH = 8192
MAX_RETRIES = 8
#: blocks at least this big, in calls of more than one block, are checksummed
#: on worker threads (xxhash releases the GIL) instead of the loop's thread
HASH_OFFLOAD_MIN = 256 * 1024
RETRY_ERRNOS = frozenset((errno.EAGAIN, errno.EINTR))

_S = b.SQE_CQE_SKIP_SUCCESS
_L = b.SQE_IO_LINK
_H = b.SQE_IO_HARDLINK
_F = b.SQE_FIXED_FILE
# IOSQE_ASYNC: straight to an io-wq worker.  Creates always block, so the
# non-blocking attempt is wasted; for a load's open it moves the path walk
# off the loop's thread onto another core (loads/s up 10-60% here at 64 KiB).
_A = b.SQE_ASYNC


class Status(enum.Enum):
    """The outcome for one block."""

    STORED = "stored"  #: put wrote the block
    EXISTS = "exists"  #: put found the block already there and left it alone
    HIT = "hit"  #: get loaded the block and it checked out
    MISS = "miss"  #: get found no block
    CORRUPT = "corrupt"  #: get found a damaged block; it was removed
    FAILED = "failed"  #: an OS error (ENOSPC, EACCES, EIO, ...); see the log and stats()


def _dio_alignment(path: str) -> tuple[int, int]:
    """(memory, file offset) alignment for O_DIRECT: statx DIOALIGN (6.1+), else a page."""
    sx = b.ffi.new("struct statx *")
    res = b.lib.kvu_statx(b.AT_FDCWD, os.fsencode(path), 0, b.STATX_DIOALIGN, sx)
    if res == 0 and sx.stx_mask & b.STATX_DIOALIGN and sx.stx_dio_offset_align:
        return max(1, sx.stx_dio_mem_align), sx.stx_dio_offset_align
    return PAGE, PAGE


IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_RT = 1
_CAP_SYS_ADMIN = 21
_CAP_SYS_NICE = 23


def _load_priority() -> int:
    """The ioprio for loads' reads: the realtime class where this process may use it, else 0.

    A request waiting on its prefix should not queue behind background
    stores; mq-deadline and bfq serve realtime-class requests first (with
    aging, so stores are not starved).  The kernel refuses the class with
    EPERM without CAP_SYS_NICE or CAP_SYS_ADMIN, so without them loads keep
    the default priority.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            caps = next(line for line in status if line.startswith(b"CapEff:"))
    except (OSError, StopIteration):
        return 0
    eff = int(caps.split()[1], 16)
    if not eff & (1 << _CAP_SYS_NICE | 1 << _CAP_SYS_ADMIN):
        return 0
    return IOPRIO_CLASS_RT << IOPRIO_CLASS_SHIFT | 4


# ----------------------------------------------------------------------------
# one batch: results in order, one future for all
# ----------------------------------------------------------------------------


class _Batch:
    __slots__ = ("errors", "fut", "pending", "results", "strings", "unverified")

    def __init__(self, n: int, fut: asyncio.Future[None]) -> None:
        self.results: list[Any] = [None] * n
        self.errors: list[OSError | None] = [None] * n
        self.pending = n
        self.fut = fut
        self.strings: Any = None
        # Loads read and trailer-checked whose payload checksum is still to
        # compare: (index, recorded checksum, payload view, key, path).
        self.unverified: list[tuple[int, int, memoryview, bytes, bytes]] = []

    def c_strings(self, items: list[bytes]) -> list[int]:
        """NUL-terminated copies of ``items`` in one allocation the batch keeps; their addresses."""
        blob = b"\0".join(items) + b"\0"
        self.strings = b.c_path(blob)  # one copy, freed with the batch
        base = b.address_of(self.strings)
        addrs = []
        for item in items:
            addrs.append(base)
            base += len(item) + 1
        return addrs

    def done(self, index: int, result: Any, error: OSError | None = None) -> None:
        self.results[index] = result
        self.errors[index] = error
        self.pending -= 1
        if not self.pending and not self.fut.done():
            self.fut.set_result(None)


# ----------------------------------------------------------------------------
# per-block units
# ----------------------------------------------------------------------------


class _BlockUnit(Unit):
    __slots__ = ("batch", "gated", "index", "kb", "path", "res", "retries", "store")

    def __init__(
        self, store: BlockStore, batch: _Batch, index: int, kb: bytes, path: bytes
    ) -> None:
        super().__init__()
        self.store = store
        self.batch = batch
        self.index = index
        self.kb = kb
        self.path = path
        self.retries = 0
        self.gated = False  # counted by the store gate (see kvuring/_gate.py)
        # One result per step of the current chain; None until a CQE arrives,
        # and with CQE_SKIP_SUCCESS a step that succeeded never posts one.
        self.res: list[int | None] = []

    def on_cqe(self, step: int, res: int) -> None:
        self.res[step] = res

    def fail(self, res: int, path: bytes | None = None) -> OSError:
        err = b.os_error(res, os.fsdecode(self.store.ns_path / (path or self.path)))
        self.store._count_failure(err)
        return err

    def retry(self, res: int) -> bool:
        """Whether to run the chain again after a transient ``res`` (EAGAIN, EINTR)."""
        if -res not in RETRY_ERRNOS or self.cancelled or self.retries >= MAX_RETRIES:
            return False
        self.retries += 1
        return True

    def aborted(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, OSError) else OSError(errno.ECANCELED, str(exc))
        self.batch.done(self.index, Status.FAILED, err)


# Status -> (counter, byte counter or None) in stats().
_COUNTERS: dict[Status, tuple[str, str | None]] = {
    Status.STORED: ("stored", "bytes_written"),
    Status.EXISTS: ("exists", None),
    Status.HIT: ("hits", "bytes_read"),
    Status.MISS: ("misses", None),
}


class _TransferUnit(_BlockUnit):
    """A unit that moves a caller's buffer (or its aligned bounce copy)."""

    __slots__ = ("bounce", "pinned", "view", "wants")
    wants: tuple[int, ...]
    bounce: mmap.mmap | None
    pinned: Any
    view: memoryview | None

    def _pin(self, view: memoryview, *, writable: bool) -> int:
        """Hold ``view`` until completion; the address the kernel should use.

        That is the buffer's own, or an aligned bounce buffer's when O_DIRECT
        needs an alignment the buffer lacks (a store copies into it now, a
        load copies out of it on a HIT).
        """
        store = self.store
        self.view = view
        self.pinned = pinned = _from_buffer(view, require_writable=writable)
        addr = int(_cast("uintptr_t", pinned))  # b.address_of, inlined on the hot path
        self.bounce = None
        if store.direct_io and addr % store.mem_align:
            self.bounce = store._bounce_get()
            if not writable:
                self.bounce[:] = view
            addr = store._bounce_addr(self.bounce)
        return addr

    def _fixed_slot(self, addr: int) -> int:
        """The registered-buffer slot holding this block's memory, or -1 (plain transfer)."""
        st = self.store
        fixed = st._fixed
        if fixed is None or not st._fixed_ready:
            return -1
        slot = fixed.slot_for(addr, st.block_size)
        if slot >= 0:
            st._stats["fixed_transfers"] += 1
        return slot

    def _transfers(
        self, slot: int, step: int, addr: int, flags: int, prio: int, *, read: bool
    ) -> None:
        """Append the chain's payload (and trailer) transfers as steps ``step``...; sets ``wants``.

        One readv/writev of payload + trailer page, or with registered
        memory two fixed transfers (a fixed transfer takes one contiguous
        range), or the bare payload for ``verify=False``.
        """
        st = self.store
        bs = st.block_size
        ud = self._ud
        words = self._words
        fixed = -1 if st._fixed is None else self._fixed_slot(addr)
        if fixed >= 0:
            op = b.OP_READ_FIXED if read else b.OP_WRITE_FIXED
            words.extend((op, flags, slot, addr, bs, 0, ud | step, 0, fixed, prio))
            if st.verify:
                trailer = st._trailer_addr(slot)
                words.extend((op, flags, slot, trailer, TRAILER_SIZE, bs, ud | (step + 1), 0,
                              st._trailer_slot, prio))  # fmt: skip
                self.wants = (bs, TRAILER_SIZE)
            else:
                self.wants = (bs,)
        elif st.verify:
            op = b.OP_READV if read else b.OP_WRITEV
            words.extend((op, flags, slot, st._set_iov(slot, addr), 2, 0, ud | step, 0, 0, prio))
            self.wants = st._file_want
        else:
            op = b.OP_READ if read else b.OP_WRITE
            words.extend((op, flags, slot, addr, bs, 0, ud | step, 0, 0, prio))
            self.wants = (bs,)

    def _check_transfers(self, results: list[int | None], what: str) -> tuple[int, str] | None:
        """The first failed transfer of a chain: (its negative errno, "") or (0, why it was short)."""
        for res in results:
            if res is not None and res < 0:
                return res, ""
        for res, want in zip(results, self.wants):
            if _short(res, want):
                return 0, f"short {what} ({res} of {want} bytes)"
        return None

    def _finish(self, status: Any, err: OSError | None = None) -> None:
        # status: a Status, or _UNVERIFIED for get_many to settle
        st = self.store
        if self.bounce is not None:
            st._bounce_put(self.bounce)
            self.bounce = None
        if self.gated:
            self.gated = False
            st._gate_done(self)
        # The kernel is done with the memory: give the export back now (an
        # mmap can then be closed right after the await; see aio._release).
        b.ffi.release(self.pinned)
        self.pinned = self.view = None
        counter = _COUNTERS.get(status)
        if counter is not None:
            st._stats[counter[0]] += 1
            if counter[1] is not None:
                st._stats[counter[1]] += st.block_size
        self.batch.done(self.index, status, err)


#: a load's batch result while its payload checksum waits for get_many
_UNVERIFIED = object()

#: Status by the core's code (kvuring/_csrc/kvu.h); UNVERIFIED never reaches a caller
_STATUS_OF: tuple[Any, ...] = (
    None, Status.STORED, Status.EXISTS, Status.HIT, Status.MISS, Status.CORRUPT, Status.FAILED,
    None, True, False,
)  # fmt: skip
#: counters the block core keeps, added into stats()
_CORE_COUNTERS = ("stored", "exists", "hits", "misses", "corrupt", "failures", "deleted",
                  "bytes_written", "bytes_read", "bounced")  # fmt: skip


def _checksums(views: list[memoryview]) -> list[int]:
    return [checksum(v) for v in views]


def _short(res: int | None, want: int) -> bool:
    """A transfer that completed without error but moved fewer bytes than asked."""
    return res is not None and 0 <= res != want


class _PutUnit(_TransferUnit):
    __slots__ = (
        "dir_paths", "error", "exists", "first", "leaf", "leaf_addr", "made_dirs", "path_addr",
        "payload_addr", "psum", "retry_after_cleanup", "stage", "tmp_addr",
    )  # fmt: skip

    def __init__(
        self,
        store: BlockStore,
        batch: _Batch,
        index: int,
        kb: bytes,
        path: bytes,
        leaf: bytes,
        path_addr: int,
        tmp_addr: int,
        leaf_addr: int,
        view: memoryview,
        defer_sum: bool,
    ) -> None:
        super().__init__(store, batch, index, kb, path)
        self.leaf = leaf
        self.leaf_addr = leaf_addr
        self.path_addr = path_addr
        self.tmp_addr = tmp_addr
        self.payload_addr = self._pin(view, writable=False)
        # Big blocks in a batch: put_many fills psum in from worker threads.
        self.psum = checksum(view) if store.verify and not defer_sum else 0
        self.dir_paths: tuple[Any, ...] = ()
        self.made_dirs = False
        self.stage = "store"
        self.error: OSError | None = None
        self.exists = False
        self.retry_after_cleanup = False
        self.first = 0

    def begin(self, slot: int) -> None:
        # The hot path: the whole chain in one extend.  The temp file sits
        # beside its final name: a rename within one directory skips the
        # filesystem-wide lock that cross-directory renames take.  openat2
        # refuses symlinks anywhere on the path.
        st = self.store
        self.stage = "store"
        ud = self._ud
        bs = st.block_size
        ns = st.ns_fd
        tmp = self.tmp_addr
        rename_flags = b.RENAME_NOREPLACE if st.noreplace else 0
        flags: list[int] = []
        words = self._words
        if self.leaf not in st._leaves_ready:
            # A leaf this process has not used yet: check its upper directory
            # is a real one beneath the namespace (no symlinks), then make the
            # leaf (EEXIST is fine, the hard link runs on).  The create below
            # refuses symlinks on the whole path again.
            self.dir_paths = (b.c_path(self.leaf[:3]),)
            flags += (_L | _S, _H | _S)
            words.extend((
                b.OP_OPENAT2, _L | _S, ns, b.address_of(self.dir_paths[0]), 0, 0, ud, 0, st._how_dir_addr, slot + 1,
                b.OP_MKDIRAT, _H | _S, ns, self.leaf_addr, 0, 0, ud | 1, 0, 0o755, 0,
            ))  # fmt: skip
        n = len(flags)
        self.first = n
        addr = self.payload_addr
        words.extend((b.OP_OPENAT2, _L | _S | _A, ns, tmp, 0, 0, ud | n, 0, st._how_create_addr, slot + 1))  # fmt: skip
        if st.verify:
            pack_trailer(st._trailer(slot), self.kb, bs, self.psum)
        self._transfers(slot, n + 1, addr, _L | _S | _F, 0, read=False)
        m = n + 1 + len(self.wants)
        words.extend((
            b.OP_CLOSE, _L | _S, 0, 0, 0, 0, ud | m, 0, 0, slot + 1,
            b.OP_RENAMEAT, 0, ns, tmp, 0, 0, ud | (m + 1), rename_flags, ns, self.path_addr,
        ))  # fmt: skip
        flags += (_L | _S | _A, *([_L | _S | _F] * len(self.wants)), _L | _S, 0)
        self._flags = flags
        self.res = [None] * len(flags)

    def _make_dirs(self, slot: int) -> None:
        # First block in this leaf directory: make both levels (EEXIST is
        # fine: hard links run on), checking the upper one is a real
        # directory before making anything inside it.
        st = self.store
        self.stage = "mkdir"
        self.made_dirs = True
        self.dir_paths = (b.c_path(self.leaf[:3]), b.c_path(self.leaf))
        c1, c2 = (b.address_of(c) for c in self.dir_paths)
        self.op(b.OP_MKDIRAT, _H | _S, st.ns_fd, c1, 0, 0, 0, 0o755)
        self.op(b.OP_OPENAT2, _L | _S, st.ns_fd, c1, 0, 0, 0, st._how_dir_addr, slot + 1)
        self.op(b.OP_MKDIRAT, 0, st.ns_fd, c2, 0, 0, 0, 0o755)
        self.res = [None] * self.steps()

    def _rename(self) -> None:
        st = self.store
        self.op(b.OP_RENAMEAT, 0, st.ns_fd, self.tmp_addr, 0, 0,
                b.RENAME_NOREPLACE if st.noreplace else 0, st.ns_fd, self.path_addr)  # fmt: skip
        self.res = [None] * self.steps()

    def end_chain(self, slot: int) -> None:
        stage = self.stage
        if stage == "cleanup":
            if self.retry_after_cleanup:
                self.retry_after_cleanup = False
                self.begin(slot)
            elif self.exists:
                self._finish(Status.EXISTS)
            else:
                self._finish(Status.FAILED, self.error)
            return
        if stage == "rename":
            self._after_rename(self.res[0])
            return
        if stage == "mkdir":
            check, leaf = self.res[1], self.res[2]
            if check is not None and check < 0:
                self._finish(Status.FAILED, self.fail(check, self.leaf[:3]))
            elif leaf is not None and leaf < 0 and leaf != -errno.EEXIST:
                self._finish(Status.FAILED, self.fail(leaf, self.leaf))
            else:
                self.begin(slot)
            return
        st = self.store
        if self.first:
            # The upper-directory check failed: missing (make it, checked) or
            # not a real directory (never write through it).
            check = self.res[0]
            if check is not None and check < 0:
                if check == -errno.ENOENT and not self.made_dirs:
                    self._make_dirs(slot)
                else:
                    self._finish(Status.FAILED, self.fail(check, self.leaf[:3]))
                return
        res = self.res[self.first :]  # a leaf mkdir's EEXIST (or error) needs no action
        open_res = res[0]
        if open_res is not None and open_res < 0:
            if open_res == -errno.ENOENT and not self.made_dirs:
                self._make_dirs(slot)
            elif self.retry(open_res):
                self.begin(slot)
            else:
                self._finish(Status.FAILED, self.fail(open_res))
            return
        st._leaves_ready.add(self.leaf)
        bad = self._check_transfers(res[1:-2], "write")
        if bad is not None:
            code, why = bad
            if code:
                self._cleanup_or_retry(slot, code, close=True)
                return
            err = OSError(errno.ENOSPC, why, os.fsdecode(st.ns_path / self.path))
            st._count_failure(err)
            self._cleanup(slot, err, retry=False, close=True)
            return
        close_res = res[-2]
        if close_res is not None and close_res < 0:
            self._cleanup_or_retry(slot, close_res, close=True)
            return
        rename_res = res[-1]
        self._after_rename(-errno.ECANCELED if rename_res is None else rename_res)

    def _after_rename(self, res: int | None) -> None:
        st = self.store
        slot = self.ticket
        if res == 0:
            self._finish(Status.STORED)
        elif res == -errno.EEXIST:
            self.exists = True
            self._cleanup(slot, None, retry=False, close=False)
        elif res == -errno.EINVAL and st.noreplace:
            # NFS, CephFS, Lustre and 9p reject RENAME_NOREPLACE; a plain
            # rename is still atomic and only ever puts the same key's block
            # in place.
            log.warning("kvuring: %s rejects RENAME_NOREPLACE; using plain rename",
                        os.fsdecode(st.ns_path.raw))  # fmt: skip
            st.noreplace = False
            self.stage = "rename"
            self._rename()
        else:
            assert res is not None
            self._cleanup_or_retry(slot, res, close=False)

    def _cleanup_or_retry(self, slot: int, res: int, *, close: bool) -> None:
        # Count and log the error only when no retry follows.
        retry = self.retry(res)
        self._cleanup(slot, None if retry else self.fail(res), retry=retry, close=close)

    def _cleanup(self, slot: int, err: OSError | None, *, retry: bool, close: bool) -> None:
        # The rename never ran or failed: close the slot if a write failed
        # (harmless when already closed) and remove the temp file.
        self.stage = "cleanup"
        self.error = err
        self.retry_after_cleanup = retry
        if close:
            self.op(b.OP_CLOSE, _H | _S, 0, 0, 0, 0, 0, 0, slot + 1)
        self.op(b.OP_UNLINKAT, 0, self.store.ns_fd, self.tmp_addr, 0, 0, 0)
        self.res = [None] * self.steps()


class _GetUnit(_TransferUnit):
    __slots__ = ("defer_sum", "path_addr", "read_addr", "stage")

    def __init__(
        self,
        store: BlockStore,
        batch: _Batch,
        index: int,
        kb: bytes,
        path: bytes,
        path_addr: int,
        view: memoryview,
        defer_sum: bool,
    ) -> None:
        super().__init__(store, batch, index, kb, path)
        self.path_addr = path_addr
        self.defer_sum = defer_sum
        self.read_addr = self._pin(view, writable=True)
        self.stage = "load"

    def begin(self, slot: int) -> None:
        # The hot path: the whole chain in one extend.  Hard links after the
        # open: the close runs whatever the reads did, so the slot is always
        # freed; the reads' own results say what happened.
        st = self.store
        ud = self._ud
        addr = self.read_addr
        rf = _H | _S | _F | st._read_flags
        prio = st._load_ioprio
        words = self._words
        if st._fixed is None and st.verify:
            # The common case in one extend: open, readv payload + trailer, close.
            words.extend((
                b.OP_OPENAT2, _L | _S | _A, st.ns_fd, self.path_addr, 0, 0, ud, 0, st._how_read_addr, slot + 1,
                b.OP_READV, rf, slot, st._set_iov(slot, addr), 2, 0, ud | 1, 0, 0, prio,
                b.OP_CLOSE, 0, 0, 0, 0, 0, ud | 2, 0, 0, slot + 1,
            ))  # fmt: skip
            self.wants = st._file_want
            self._flags = [_L | _S | _A, rf, 0]
            self.res = [None, None, None]
            return
        words.extend((b.OP_OPENAT2, _L | _S | _A, st.ns_fd, self.path_addr, 0, 0, ud, 0, st._how_read_addr, slot + 1))  # fmt: skip
        self._transfers(slot, 1, addr, rf, prio, read=True)
        n = 1 + len(self.wants)
        words.extend((b.OP_CLOSE, 0, 0, 0, 0, 0, ud | n, 0, 0, slot + 1))
        self._flags = [_L | _S | _A, *([rf] * len(self.wants)), 0]
        self.res = [None] * (n + 1)

    def end_chain(self, slot: int) -> None:
        if self.stage == "unlink":
            self._finish(Status.CORRUPT)
            return
        st = self.store
        res = self.res
        open_res = res[0]
        why: str | None = None
        if open_res is None and res[1] is None and (len(res) == 3 or res[2] is None):
            # Open and reads succeeded (CQE_SKIP_SUCCESS posted nothing).
            self._verify(slot)
            return
        if open_res is not None and open_res < 0:
            if open_res == -errno.ENOENT:
                self._finish(Status.MISS)
            elif self.retry(open_res):
                self.begin(slot)
            else:
                self._finish(Status.FAILED, self.fail(open_res))
            return
        bad = self._check_transfers(res[1:-1], "read")
        if bad is not None:
            code, why = bad
            if code == -errno.EPERM and st._load_ioprio:
                # The kernel refused the realtime I/O class after all: drop it.
                log.warning("kvuring: realtime I/O priority refused; loads use the default")
                st._load_ioprio = 0
                self.begin(slot)
                return
            if code:
                if self.retry(code):
                    self.begin(slot)
                else:
                    self._finish(Status.FAILED, self.fail(code))
                return
        self._verify(slot, why)

    def _verify(self, slot: int, why: str | None = None) -> None:
        """The reads are done: check the block (unless ``why`` says it is bad already), HIT or CORRUPT."""
        st = self.store
        payload = memoryview(self.bounce)[: st.block_size] if self.bounce is not None else self.view
        assert payload is not None
        if why is None and st.verify:
            why, psum = read_trailer(st._trailer(slot), self.kb, len(payload))
            if why is None:
                if self.defer_sum and self.bounce is None:
                    # get_many compares the payload's checksum on worker
                    # threads once the batch's reads are done.
                    self.batch.unverified.append((self.index, psum, payload, self.kb, self.path))
                    self._finish(_UNVERIFIED)
                    return
                if checksum(payload) != psum:
                    why = PAYLOAD_MISMATCH
        if why is None:
            if self.bounce is not None:
                assert self.view is not None
                self.view[:] = payload
            self._finish(Status.HIT)
            return
        log.warning("kvuring: corrupt block %s (%s); removing it",
                    os.fsdecode(st.ns_path / self.path), why)  # fmt: skip
        st._stats["corrupt"] += 1
        self.stage = "unlink"
        self.op(b.OP_UNLINKAT, 0, st.ns_fd, self.path_addr, 0, 0, 0)
        self.res = [None]


class _StatUnit(_BlockUnit):
    __slots__ = ("cpath",)

    def __init__(
        self, store: BlockStore, batch: _Batch, index: int, kb: bytes, path: bytes
    ) -> None:
        super().__init__(store, batch, index, kb, path)
        self.cpath = b.c_path(path)

    def begin(self, slot: int) -> None:
        st = self.store
        self.op(b.OP_STATX, 0, st.ns_fd, b.address_of(self.cpath), 0, 0,
                b.AT_SYMLINK_NOFOLLOW, b.STATX_BASIC_STATS, st._statx_addr(slot))  # fmt: skip
        self.res = [None]

    def end_chain(self, slot: int) -> None:
        st = self.store
        res = self.res[0]
        assert res is not None
        if res < 0 and self.retry(res):
            self.begin(slot)
            return
        if res == 0:
            sx = st._statx[slot]
            present = stat.S_ISREG(sx.stx_mode) and sx.stx_size == st.file_size
            self.batch.done(self.index, present)
        elif res in (-errno.ENOENT, -errno.ENOTDIR):
            self.batch.done(self.index, False)
        else:
            self.batch.done(self.index, False, self.fail(res))


class _DeleteUnit(_BlockUnit):
    __slots__ = ("cdir", "counted", "cpath")

    def __init__(
        self,
        store: BlockStore,
        batch: _Batch,
        index: int,
        kb: bytes,
        path: bytes,
        leaf: bytes,
        *,
        counted: bool = True,
    ) -> None:
        super().__init__(store, batch, index, kb, path)
        self.cpath = b.c_path(path)
        self.cdir = b.c_path(leaf)
        self.counted = counted  # False: removing a corrupt block, not a delete_many

    def begin(self, slot: int) -> None:
        st = self.store
        # Check the directories are real ones beneath the namespace before
        # unlinking through them: a planted symlink must not redirect it.
        self.op(b.OP_OPENAT2, _L | _S, st.ns_fd, b.address_of(self.cdir), 0, 0, 0,
                st._how_dir_addr, slot + 1)  # fmt: skip
        # No CQE_SKIP_SUCCESS on the unlink: the kernel does not mark a failed
        # unlinkat as failed, so a skipped CQE would hide ENOENT.
        self.op(b.OP_UNLINKAT, _H, st.ns_fd, b.address_of(self.cpath), 0, 0, 0)
        self.op(b.OP_CLOSE, 0, 0, 0, 0, 0, 0, 0, slot + 1)
        self.res = [None] * self.steps()

    def end_chain(self, slot: int) -> None:
        dir_res, unlink_res = self.res[0] or 0, self.res[1]
        if dir_res < 0:
            if dir_res in (-errno.ENOENT, -errno.ENOTDIR):
                self.batch.done(self.index, False)
            else:
                self.batch.done(self.index, False, self.fail(dir_res))
            return
        if unlink_res == 0:
            if self.counted:
                self.store._stats["deleted"] += 1
            self.batch.done(self.index, True)
        elif unlink_res is None or unlink_res == -errno.ENOENT:
            self.batch.done(self.index, False)
        else:
            self.batch.done(self.index, False, self.fail(unlink_res))


# ----------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------


class BlockStore:
    """A directory of KV-cache blocks, one file per block, keyed by block hash.

    Open it with ``async with BlockStore(root, block_size) as store`` (or
    ``await store.open()`` / ``await store.close()``) inside a running event
    loop, asyncio or uvloop.  See docs/ for keys, the on-disk format, direct
    I/O, and errors and statuses.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        block_size: int,
        *,
        namespace: str = "default",
        backend: str = "auto",
        direct: bool | str = "auto",
        verify: bool = True,
        queue_depth: int = 256,
        prioritize_loads: bool = True,
        fixed_buffers: bool = False,
    ) -> None:
        if not isinstance(block_size, int) or isinstance(block_size, bool):
            raise TypeError(f"block_size must be int, not {type(block_size).__name__}")
        if not 0 < block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be between 1 and {MAX_BLOCK_SIZE}, got {block_size}")
        if not (isinstance(direct, bool) or direct == "auto"):
            raise ValueError(f"direct must be 'auto', True or False; got {direct!r}")
        if (
            not isinstance(queue_depth, int)
            or isinstance(queue_depth, bool)
            or not 1 <= queue_depth <= MAX_QUEUE_DEPTH
        ):
            raise ValueError(
                f"queue_depth must be between 1 and {MAX_QUEUE_DEPTH}, got {queue_depth!r}"
            )
        self.root = os.path.abspath(os.fspath(root))
        self.block_size = block_size
        self.namespace = check_namespace(namespace)
        # KVURING_BACKEND steers the default "auto"; an explicit engine wins.
        self.backend_requested = resolve_backend(None if backend == "auto" else backend)
        self.direct_requested = direct
        self.verify = bool(verify)
        self.prioritize_loads = bool(prioritize_loads)
        self.fixed_buffers = bool(fixed_buffers)
        self.queue_depth = queue_depth
        self.suffix = VERIFIED_SUFFIX if self.verify else RAW_SUFFIX
        self.file_size = block_size + (TRAILER_SIZE if self.verify else 0)
        self._file_want = (self.file_size,)
        self.ns_path = _BytesPath(os.fsencode(os.path.join(self.root, self.namespace)))
        self.direct_io = False
        self.mem_align = 1
        self.offset_align = 1
        self.noreplace = True
        self.filesystem = "unknown"
        self.spread_reads = False
        self._read_flags = 0
        self._load_ioprio = 0
        self.ns_fd = -1
        self._reg_fd = -1
        self._writer: WriterRegistration | None = None
        self._tmp_marker = b""
        self._ring: AsyncRing | None = None
        self._core: BlockCore | None = None
        self._tmp_seq = 0
        self._leaves_ready: set[bytes] = set()
        self._bounce_pool: list[mmap.mmap] = []
        self._fixed: FixedBuffers | None = None
        self._gate: StoreGate | None = None
        self._hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._hash_threads = max(2, min(8, os.cpu_count() or 2))
        self._fixed_ready = False
        self._trailer_slot = -1
        self._bounce_logged = False
        self._noreplace_logged = False
        self._failure_logged: set[int] = set()
        self._stats: dict[str, int] = dict.fromkeys(
            ("puts", "gets", "contains", "deletes", "stored", "exists", "hits", "misses",
             "corrupt", "failures", "deleted", "bytes_written", "bytes_read", "bounced",
             "dead_writers_cleaned", "fixed_transfers", "offloaded_checksums"),
            0,
        )  # fmt: skip
        self.closed = False

    # -- life cycle ----------------------------------------------------------------
    async def open(self) -> BlockStore:
        """Create the directories, probe direct I/O, clean up dead writers' temp files, start the ring."""
        if self.closed:
            raise RuntimeError("BlockStore is closed")
        if self._ring is not None:
            return self
        ns = os.path.join(self.root, self.namespace)
        os.makedirs(self.root, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(ns, 0o755)
        # O_NOFOLLOW: a symlink in place of the namespace would send every
        # write somewhere else.
        self.ns_fd = os.open(ns, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self._reg_fd = open_registry(self.ns_fd)
            self._stats["dead_writers_cleaned"] += remove_dead_writers(self.ns_fd, self._reg_fd)
            self._writer = WriterRegistration(self._reg_fd)
            self._tmp_marker = tmp_suffix(self._writer.token) + b"%d.tmp"
            self._probe_direct()
            self._choose_read_mode(ns)
            self._load_ioprio = _load_priority() if self.prioritize_loads else 0
            self._setup_memory()
            self._ring = await AsyncRing(
                backend=self.backend_requested, queue_depth=self.queue_depth
            ).open()
            self._setup_fixed()
            if self.prioritize_loads:
                self._gate = StoreGate(self._gate_start, STORES_DURING_LOADS)
            if not self.fixed_buffers:
                self._core = self._make_core()
            await self._prepare_fanout()
        except BaseException:
            if self._ring is not None:
                self._ring.close_now()
                self._ring = None
            self._close_fds()
            raise
        return self

    async def __aenter__(self) -> BlockStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Finish every in-flight operation, release the ring and remove this process's temp dir."""
        if self.closed:
            return
        self.closed = True
        if self._gate is not None:
            for unit in self._gate.drop_waiting():
                unit.aborted(RuntimeError("kvuring closed before the operation ran"))
        if self._core is not None and not self._core.closed:
            self._core.drop_queued_stores()
            self._core.flush()  # reports the batches that ended
        if self._ring is not None:
            await self._ring.close()
        if self._fixed is not None:
            self._fixed.clear()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
            self._hash_pool = None
        self._close_fds()

    def _close_fds(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for name in ("_reg_fd", "ns_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    async def _prepare_fanout(self) -> None:
        """Make the 4096 upper fan-out directories once per namespace.

        With them in place a store into a new leaf costs two operations in
        its chain (check the upper directory, make the leaf).  They are made
        through the ring, so a slow filesystem does not stall the loop.
        """
        assert self._ring is not None
        marker = "fanout-ready"
        try:
            os.stat(marker, dir_fd=self._reg_fd, follow_symlinks=False)
            return
        except FileNotFoundError:
            pass
        ring = self._ring

        async def mkdir(name: str) -> None:
            with contextlib.suppress(FileExistsError):
                await ring.mkdirat(name, 0o755, dir_fd=self.ns_fd)

        await asyncio.gather(*(mkdir(f"{i:03x}") for i in range(4096)))
        os.close(os.open(marker, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self._reg_fd))  # fmt: skip

    def _probe_direct(self) -> None:
        if self.direct_requested is False:
            return
        ns = os.path.join(self.root, self.namespace)
        mem_align, offset_align = _dio_alignment(ns)
        assert self._writer is not None
        probe = f"{self._writer.token}.probe"
        page = aligned_buffer(max(PAGE, offset_align))
        why = ""
        try:
            fd = os.open(
                probe,
                os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
                dir_fd=self._reg_fd,
            )
            try:
                os.pwrite(fd, page, 0)
                os.preadv(fd, [page], 0)
            finally:
                os.close(fd)
        except OSError as exc:
            why = f"O_DIRECT is not supported here ({exc.strerror})"
        finally:
            # Some filesystems create the file and only then refuse O_DIRECT.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe, dir_fd=self._reg_fd)
        if not why and (
            self.block_size % offset_align or (self.verify and TRAILER_SIZE % offset_align)
        ):
            why = (
                f"block_size {self.block_size} is not a multiple of the {offset_align}-byte "
                f"direct I/O alignment"
            )
        if why:
            if self.direct_requested is True:
                raise OSError(errno.EINVAL, why, ns)
            log.info("kvuring: buffered I/O on %s: %s", self.root, why)
            return
        self.direct_io = True
        self.mem_align = mem_align
        self.offset_align = offset_align

    def _choose_read_mode(self, ns: str) -> None:
        # Reads served from memory (tmpfs, or the page cache when buffered)
        # complete on one core: inline in the submit, or one at a time on a
        # single io-wq worker.  IOSQE_ASYNC hands them to io-wq's workers,
        # which copy in parallel (5x faster at 64 KiB on 16 cores).
        self.filesystem = filesystem_of(ns)["type"]
        self.spread_reads = self.filesystem in MEMORY_FILESYSTEMS or not self.direct_io
        self._read_flags = _A if self.spread_reads else 0

    def _setup_memory(self) -> None:
        slots = self.queue_depth
        self._trailers = aligned_buffer(slots * TRAILER_SIZE) if self.verify else None
        self._trailers_view = memoryview(self._trailers) if self._trailers is not None else None
        self._trailers_base = (
            b.address_of(b.pin_buffer(self._trailers, writable=True)) if self._trailers else 0
        )
        # Per slot: struct iovec[2] = {payload, block_size}, {trailer page, TRAILER_SIZE},
        # as four 64-bit words (the layout of struct iovec on 64-bit Linux).
        self._iov = array("Q", [0, self.block_size, 0, TRAILER_SIZE] * slots)
        for slot in range(slots):
            self._iov[4 * slot + 2] = self._trailer_addr(slot) if self.verify else 0
        self._iov_pin = b.pin_buffer(self._iov, writable=True)
        self._iov_base = b.address_of(self._iov_pin)
        self._statx = b.ffi.new("struct statx[]", slots)
        self._statx_base = b.address_of(self._statx)
        how = b.ffi.new("struct open_how[3]")
        resolve = b.RESOLVE_BENEATH | b.RESOLVE_NO_SYMLINKS | b.RESOLVE_NO_MAGICLINKS
        # No O_CLOEXEC on direct-descriptor opens: the kernel rejects it (EINVAL)
        # since a direct descriptor is never in the fd table to begin with.
        how[0].flags = os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0)
        how[0].resolve = resolve
        how[1].flags = os.O_PATH | os.O_DIRECTORY
        how[1].resolve = resolve
        how[2].flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | (os.O_DIRECT if self.direct_io else 0)
        how[2].mode = 0o644
        how[2].resolve = resolve
        self._how = how
        size = b.ffi.sizeof("struct open_how")
        self._how_read_addr = b.address_of(how)
        self._how_dir_addr = self._how_read_addr + size
        self._how_create_addr = self._how_read_addr + 2 * size

    def _setup_fixed(self) -> None:
        # The trailer pages are registered first: a fixed transfer of a
        # verified block needs both its payload and its trailer registered.
        assert self._ring is not None
        if not self.fixed_buffers:
            return
        self._fixed = FixedBuffers(self._ring.engine)
        if self._trailers is None:
            self._fixed_ready = True
        elif self._fixed.add(self._trailers):
            self._trailer_slot = self._fixed.slot_for(self._trailer_addr(0), len(self._trailers))
            self._fixed_ready = True

    # -- registered buffers ----------------------------------------------------------
    def register(self, buffer: Buffer) -> bool:
        """Register ``buffer`` (writable, page-aligned memory) for fixed-buffer transfers.

        Needs ``fixed_buffers=True``.  Blocks whose memory lies inside a registered buffer move with
        READ_FIXED/WRITE_FIXED: no page pinning per transfer.  The store
        holds the buffer (it cannot be closed or resized) until
        :meth:`unregister` or :meth:`close`.  :func:`aligned_buffer` regions
        are registered automatically.  Returns False, and logs why once, when
        the kernel refuses (RLIMIT_MEMLOCK too low, memory it cannot pin);
        transfers then work as before.
        """
        self._ring_for_call()
        if self._fixed is None:
            raise RuntimeError("register() needs a store opened with fixed_buffers=True")
        try:
            view = memoryview(buffer)
        except TypeError:
            raise TypeError(
                f"buffer must support the buffer protocol, not {type(buffer).__name__}"
            ) from None
        if view.readonly:
            raise TypeError(
                "register needs a writable buffer (the kernel pins it for reading into)"
            )
        if not view.c_contiguous:
            raise ValueError("buffer must be C-contiguous")
        return self._fixed.add(buffer)

    def unregister(self, buffer: Buffer) -> bool:
        """Stop using ``buffer`` for fixed transfers and let it go; False if it was not registered."""
        if self._fixed is None:
            return False
        return self._fixed.remove(buffer)

    # -- helpers for units -----------------------------------------------------------
    def _trailer(self, slot: int) -> memoryview:
        assert self._trailers_view is not None
        return self._trailers_view[slot * TRAILER_SIZE : (slot + 1) * TRAILER_SIZE]

    def _trailer_addr(self, slot: int) -> int:
        return self._trailers_base + slot * TRAILER_SIZE

    def _set_iov(self, slot: int, payload_addr: int) -> int:
        """Point the slot's two-entry iovec (payload, trailer page) at ``payload_addr``."""
        self._iov[4 * slot] = payload_addr
        return self._iov_base + 32 * slot

    def _statx_addr(self, slot: int) -> int:
        return self._statx_base + slot * b.STATX_SIZE

    def _tmp_name(self, path: bytes) -> bytes:
        self._tmp_seq += 1
        return path + self._tmp_marker % self._tmp_seq

    def _bounce_get(self) -> mmap.mmap:
        self._stats["bounced"] += 1
        if not self._bounce_logged:
            self._bounce_logged = True
            log.warning(
                "kvuring: buffer not aligned to %d bytes for O_DIRECT; copying through an aligned "
                "buffer (use kvuring.aligned_buffer to avoid the copy)", self.mem_align,
            )  # fmt: skip
        return self._bounce_pool.pop() if self._bounce_pool else aligned_buffer(self.block_size)

    @staticmethod
    def _bounce_addr(buf: mmap.mmap) -> int:
        # The mmap is never resized or closed while in use, so its address
        # stays valid after the temporary pin is gone.
        return b.address_of(b.pin_buffer(buf, writable=True))

    def _bounce_put(self, buf: mmap.mmap) -> None:
        if len(self._bounce_pool) < 32:
            self._bounce_pool.append(buf)

    def _count_failure(self, err: OSError) -> None:
        self._stats["failures"] += 1
        self._log_failure(err)

    def _log_failure(self, err: OSError) -> None:
        code = err.errno or 0
        if code not in self._failure_logged:
            self._failure_logged.add(code)
            log.error("kvuring: block I/O failed: %s (further %s errors are only counted)",
                      err, errno.errorcode.get(code, code))  # fmt: skip

    # -- validation ------------------------------------------------------------------
    def _ring_for_call(self) -> AsyncRing:
        if self._ring is None:
            raise RuntimeError("BlockStore is not open; use 'async with' or await open()")
        if self.closed:
            raise RuntimeError("BlockStore is closed")
        return self._ring

    def _views(self, bufs: Sequence[object], *, writable: bool) -> list[memoryview]:
        """Flat byte views of the buffers, after checking size, contiguity and writability."""
        views = []
        size = self.block_size
        last: object = None
        # aligned_buffer regions are registered on first sight (fixed buffers only).
        fixed = self._fixed if self._fixed_ready else None
        for buf in bufs:
            try:
                view = memoryview(buf)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError(
                    f"buffer must support the buffer protocol, not {type(buf).__name__}"
                ) from None
            if view.nbytes != size:
                raise ValueError(f"buffer is {view.nbytes} bytes, block_size is {size}")
            if writable and view.readonly:
                raise TypeError(
                    "get needs a writable buffer (bytearray, mmap, memoryview of one, ...)"
                )
            if not view.c_contiguous:
                raise ValueError("buffer must be C-contiguous")
            views.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
            if fixed is not None and view.obj is not last and isinstance(view.obj, AlignedBuffer):
                last = view.obj
                if not fixed.known(last):
                    fixed.add(last)
        return views

    def _paths(self, keys: Sequence[object]) -> list[tuple[bytes, bytes, bytes]]:
        if isinstance(keys, (bytes, str, int)):
            raise TypeError("keys must be a sequence of keys, not a single key")
        suffix = self.suffix.encode()
        out = []
        for key in keys:
            kb = key_bytes(key)
            out.append((kb, *block_relpath(kb, suffix)))
        return out

    def _pair(self, keys: Sequence[object], bufs: Sequence[object]) -> None:
        if len(keys) != len(bufs):
            raise ValueError(f"{len(keys)} keys but {len(bufs)} buffers")

    async def _run(self, units: list[_BlockUnit], batch: _Batch) -> None:
        if not units:
            return
        self._start(units)
        try:
            await batch.fut
        except asyncio.CancelledError:
            self._abandon(units)
            raise

    def _start(self, units: Sequence[_BlockUnit]) -> None:
        """Hand units to the ring: stores through the gate, loads counted by it."""
        ring = self._ring_for_call()
        gate = self._gate
        if gate is not None and isinstance(units[0], _PutUnit):
            gate.add(units)
        elif gate is not None and isinstance(units[0], _GetUnit):
            for unit in units:
                unit.gated = True
            gate.loads_started(len(units))
            ring.start_many(units)
        else:
            ring.start_many(units)

    def _abandon(self, units: Sequence[_BlockUnit]) -> None:
        # The caller was cancelled.  Units already in flight finish on their
        # own (their blocks end up absent or intact); those still queued are
        # dropped.
        for unit in units:
            unit.cancelled = True
            if unit.gated and unit.ticket < 0:  # queued: will never run
                unit.gated = False
                self._gate_done(unit)

    def _gate_start(self, units: Sequence[Unit]) -> None:
        for unit in units:
            if isinstance(unit, _BlockUnit):
                unit.gated = True
        self._ring_for_call().start_many(units)

    def _gate_done(self, unit: _BlockUnit) -> None:
        gate = self._gate
        if gate is None:
            return
        if type(unit) is _GetUnit:
            gate.load_done()
        else:
            gate.store_done()

    def _new_batch(self, n: int) -> _Batch:
        return _Batch(n, asyncio.get_running_loop().create_future())

    # -- the block core: one C call per batch ----------------------------------------
    def _make_core(self) -> BlockCore:
        assert self._ring is not None and self._writer is not None
        engine = self._ring.engine
        core = BlockCore(
            engine,
            ns_fd=self.ns_fd,
            reg_fd=self._writer.fd,
            block_size=self.block_size,
            verify=self.verify,
            direct=self.direct_io,
            mem_align=self.mem_align,
            slots=self.queue_depth,
            read_flags=self._read_flags,
            load_ioprio=self._load_ioprio,
            store_limit=STORES_DURING_LOADS if self.prioritize_loads else 0,
            suffix=self.suffix.encode(),
            marker=self._tmp_marker.split(b"%d")[0],
        )
        self._ring.driver.attach_core(core)
        return core

    def _key_list(self, keys: Sequence[object]) -> list[bytes]:
        if isinstance(keys, (bytes, str, int)):
            raise TypeError("keys must be a sequence of keys, not a single key")
        return [
            k if type(k) is bytes and 0 < len(k) <= MAX_KEY_BYTES else key_bytes(k) for k in keys
        ]

    def _pins(self, bufs: Sequence[object], n: int, *, writable: bool) -> list[Any]:
        """Pin every buffer (one cffi call each); the precise error of _views when one is unfit."""
        if len(bufs) != n:
            raise ValueError(f"{n} keys but {len(bufs)} buffers")
        size = self.block_size
        try:
            pins = [_from_buffer(buf, require_writable=writable) for buf in bufs]
        except (TypeError, BufferError, ValueError) as exc:
            self._views(bufs, writable=writable)
            raise TypeError(f"buffers must be writable, contiguous buffers: {exc}") from exc
        if pins and (min(map(len, pins)) != size or max(map(len, pins)) != size):
            for pin in pins:
                b.ffi.release(pin)
            self._views(bufs, writable=writable)
            raise ValueError(f"every buffer must be {size} bytes")
        return pins

    async def _core_run(self, core: BlockCore, batch: CoreBatch, hashing: Any = None) -> None:
        """Queue ``batch``, submit it with this loop iteration, wait for every status."""
        ring = self._ring_for_call()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(_batch: CoreBatch) -> None:
            if not fut.done():
                fut.set_result(None)

        core.add(batch, done)
        ring.schedule_flush()
        try:
            if hashing is not None:
                await hashing
            await fut
        except BaseException:
            # The caller gave up: blocks not started are dropped, those in
            # flight finish on their own (absent or intact) and keep their
            # buffers until then.
            core.cancel(batch)
            if not ring.closed:
                ring.schedule_flush()
            raise

    async def _core_put(
        self, keys: Sequence[object], bufs: Sequence[object]
    ) -> tuple[list[Status], CoreBatch, list[bytes]]:
        core = self._core
        assert core is not None
        self._ring_for_call()
        kbs = self._key_list(keys)
        pins = self._pins(bufs, len(kbs), writable=False)
        self._stats["puts"] += len(kbs)
        offload = self._offload_hashing(len(kbs))
        batch = CoreBatch(core_api.STORE, kbs, pins, ready=0 if offload else None)
        hashing = self._sum_stores(core, batch) if offload else None
        await self._core_run(core, batch, hashing)
        if not self._noreplace_logged and not core.noreplace:
            self._noreplace_logged = True
            log.warning("kvuring: %s rejects RENAME_NOREPLACE; using plain rename",
                        os.fsdecode(self.ns_path.raw))  # fmt: skip
        return self._core_statuses(batch, kbs), batch, kbs

    async def _sum_stores(self, core: BlockCore, batch: CoreBatch) -> None:
        """put_many of big blocks: checksums on the hash threads (C, without the GIL),
        and each group of blocks starts as soon as its sums are in."""
        psums = batch.give_psums()
        n = batch.n
        self._stats["offloaded_checksums"] += n
        size = -(-n // (2 * self._hash_threads))  # about two groups per thread
        groups = [(i, min(i + size, n)) for i in range(0, n, size)]
        addrs = batch.c.addrs
        sums = [
            self._on_hash_threads(
                batch, core_api.checksums, addrs, hi, lo, 1, self.block_size, psums
            )
            for lo, hi in groups
        ]
        ring = self._ring_for_call()
        for (_lo, hi), future in zip(groups, sums):
            await future
            core.set_ready(batch, hi)
            ring.schedule_flush()

    async def _core_get(
        self, keys: Sequence[object], bufs: Sequence[object]
    ) -> tuple[list[Status], CoreBatch, list[bytes]]:
        core = self._core
        assert core is not None
        self._ring_for_call()
        kbs = self._key_list(keys)
        pins = self._pins(bufs, len(kbs), writable=True)
        self._stats["gets"] += len(kbs)
        defer = self._offload_hashing(len(kbs))
        batch = CoreBatch(core_api.LOAD, kbs, pins, defer_verify=defer)
        batch.hold()  # the payload checks below read the buffers after the core is done
        try:
            await self._core_run(core, batch)
            if batch.c.unverified:
                await self._verify_core_loads(batch, kbs)
        finally:
            batch.unhold()
        return self._core_statuses(batch, kbs), batch, kbs

    def _on_hash_threads(self, batch: CoreBatch, fn: Any, *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` (C, without the GIL) on a hash thread, holding the batch's buffers.

        The hold ends when the thread is done, also if the awaiting task was
        cancelled meanwhile: a running thread cannot be stopped.
        """
        loop = asyncio.get_running_loop()
        batch.hold()
        work = self._hash_pool_get().submit(fn, *args)
        work.add_done_callback(lambda _w: loop.call_soon_threadsafe(batch.unhold))
        return asyncio.wrap_future(work)

    async def _verify_core_loads(self, batch: CoreBatch, kbs: list[bytes]) -> None:
        """Compare the deferred payload checksums on the hash threads; HIT or CORRUPT (and removed)."""
        todo = int(batch.c.unverified)
        self._stats["offloaded_checksums"] += todo
        k = min(batch.n, self._hash_threads)
        checks = [self._on_hash_threads(batch, core_api.verify, batch, i, k, self.block_size)
                  for i in range(k)]  # fmt: skip
        bad = sum(await asyncio.gather(*checks))
        self._stats["hits"] += todo - bad
        self._stats["bytes_read"] += (todo - bad) * self.block_size
        if bad:
            self._stats["corrupt"] += bad
            corrupt = [kb for kb, st in zip(kbs, batch.status) if st == core_api.CORRUPT]
            removal = CoreBatch(core_api.DELETE, corrupt, None)
            removal.c.defer_verify = 1  # for a delete: a CORRUPT block's removal, not counted
            assert self._core is not None
            await self._core_run(self._core, removal)
            batch.c.corrupt += bad

    def _core_statuses(self, batch: CoreBatch, kbs: list[bytes]) -> list[Status]:
        if batch.c.failed or batch.c.corrupt:
            self._core_report(batch, kbs)
        if batch.c.bounced and not self._bounce_logged:
            self._bounce_logged = True
            log.warning(
                "kvuring: buffer not aligned to %d bytes for O_DIRECT; copying through an aligned "
                "buffer (use kvuring.aligned_buffer to avoid the copy)", self.mem_align,
            )  # fmt: skip
        return list(map(_STATUS_OF.__getitem__, batch.status))

    def _block_path(self, kb: bytes) -> str:
        return os.fsdecode(self.ns_path / block_relpath(kb, self.suffix.encode())[1])

    def _core_report(self, batch: CoreBatch, kbs: list[bytes]) -> None:
        """Log what went wrong in a batch (the core counted it): each new errno once, each corrupt block."""
        for kb, status, code in zip(kbs, batch.status, batch.error):
            if status == core_api.FAILED and code not in self._failure_logged:
                self._log_failure(self._core_error(kb, code))
            elif status == core_api.CORRUPT:
                log.warning("kvuring: corrupt block %s (%s); removing it", self._block_path(kb),
                            core_api.CORRUPT_REASONS.get(code, code))  # fmt: skip

    def _core_error(self, kb: bytes, code: int) -> OSError:
        return OSError(code, os.strerror(code), self._block_path(kb))

    def _core_one(self, statuses: list[Status], batch: CoreBatch, kbs: list[bytes]) -> Status:
        if batch.status[0] == core_api.FAILED:
            raise self._core_error(kbs[0], batch.error[0])
        return statuses[0]

    async def _core_presence(self, kind: int, keys: Sequence[object], counter: str) -> list[bool]:
        core = self._core
        assert core is not None
        kbs = self._key_list(keys)
        self._stats[counter] += len(kbs)
        batch = CoreBatch(kind, kbs, None)
        await self._core_run(core, batch)
        if batch.c.failed:
            self._core_report(batch, kbs)
        return [status == core_api.PRESENT for status in batch.status]

    # -- the API --------------------------------------------------------------------
    def _put_units(self, keys: Sequence[object], bufs: Sequence[object]) -> list[_BlockUnit]:
        self._ring_for_call()
        self._pair(keys, bufs)
        paths = self._paths(keys)
        views = self._views(bufs, writable=False)
        writer = self._writer
        assert writer is not None
        for _kb, leaf, _path in paths:
            writer.note_leaf(leaf)
        batch = self._new_batch(len(paths))
        seq = self._tmp_seq
        self._tmp_seq += len(paths)
        marker = self._tmp_marker
        names: list[bytes] = []
        for i, (_kb, leaf, path) in enumerate(paths):
            names += (path, path + marker % (seq + i), leaf)
        addrs = batch.c_strings(names)
        self._stats["puts"] += len(paths)
        defer = self._offload_hashing(len(paths))
        return [
            _PutUnit(
                self,
                batch,
                i,
                kb,
                path,
                leaf,
                addrs[3 * i],
                addrs[3 * i + 1],
                addrs[3 * i + 2],
                view,
                defer,
            )
            for i, ((kb, leaf, path), view) in enumerate(zip(paths, views))
        ]

    def _get_units(self, keys: Sequence[object], bufs: Sequence[object]) -> list[_BlockUnit]:
        self._ring_for_call()
        self._pair(keys, bufs)
        paths = self._paths(keys)
        views = self._views(bufs, writable=True)
        batch = self._new_batch(len(paths))
        addrs = batch.c_strings([path for _kb, _leaf, path in paths])
        self._stats["gets"] += len(paths)
        defer = self._offload_hashing(len(paths))
        return [
            _GetUnit(self, batch, i, kb, path, addrs[i], view, defer)
            for i, ((kb, _leaf, path), view) in enumerate(zip(paths, views))
        ]

    async def put_many(self, keys: Sequence[bytes | int], bufs: Sequence[Buffer]) -> list[Status]:
        """Store blocks; STORED, EXISTS or FAILED per block, in order.

        Each buffer must hold block_size bytes and must not change until this returns.
        """
        if self._core is not None:
            return (await self._core_put(keys, bufs))[0]
        units = self._put_units(keys, bufs)
        if units and self._offload_hashing(len(units)):
            return await self._run_summed(units)
        return await self._run_many(units)

    async def get_many(self, keys: Sequence[bytes | int], bufs: Sequence[Buffer]) -> list[Status]:
        """Load blocks into ``bufs``; HIT, MISS, CORRUPT or FAILED per block, in order."""
        if self._core is not None:
            return (await self._core_get(keys, bufs))[0]
        units = self._get_units(keys, bufs)
        results = await self._run_many(units)
        if units and units[0].batch.unverified:
            await self._verify_loads(units[0].batch)
        return results

    # -- checksums on worker threads --------------------------------------------------
    def _offload_hashing(self, n: int) -> bool:
        return self.verify and n > 1 and self.block_size >= HASH_OFFLOAD_MIN

    def _hash_pool_get(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._hash_pool is None:
            self._hash_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._hash_threads, thread_name_prefix="kvuring-hash"
            )
        return self._hash_pool

    async def _sums(self, views: list[memoryview]) -> list[int]:
        """xxh3 of each view, spread over the hash threads (xxhash releases the GIL)."""
        pool = self._hash_pool_get()
        loop = asyncio.get_running_loop()
        self._stats["offloaded_checksums"] += len(views)
        k = min(len(views), self._hash_threads)
        parts = await asyncio.gather(
            *(loop.run_in_executor(pool, _checksums, views[i::k]) for i in range(k))
        )
        out = [0] * len(views)
        for i, part in enumerate(parts):
            out[i::k] = part
        return out

    async def _run_summed(self, units: list[_BlockUnit]) -> list[Any]:
        """put_many of big blocks: checksum on the hash threads, and start each
        group of blocks as soon as its sums are in, so hashing overlaps the writes."""
        puts = [u for u in units if isinstance(u, _PutUnit)]
        batch = puts[0].batch
        # A bounced block is written from its bounce copy: checksum that.
        views: list[memoryview] = []
        for u in puts:
            view = memoryview(u.bounce)[: self.block_size] if u.bounce is not None else u.view
            assert view is not None  # pinned until the unit finishes
            views.append(view)
        pool = self._hash_pool_get()
        loop = asyncio.get_running_loop()
        self._stats["offloaded_checksums"] += len(views)
        size = -(-len(puts) // (2 * self._hash_threads))  # about two groups per thread
        groups = [(i, min(i + size, len(puts))) for i in range(0, len(puts), size)]
        futures = [loop.run_in_executor(pool, _checksums, views[a:b]) for a, b in groups]
        started = 0
        try:
            for (a, b), future in zip(groups, futures):
                for unit, psum in zip(puts[a:b], await future):
                    unit.psum = psum
                self._start(puts[a:b])
                started = b
            await batch.fut
        except BaseException:
            for unit in puts[started:]:  # never started: give their buffers back
                unit._finish(Status.FAILED)
            self._abandon(puts[:started])
            raise
        return batch.results

    async def _verify_loads(self, batch: _Batch) -> None:
        """Compare the deferred payload checksums; HIT or CORRUPT (and removed)."""
        todo, batch.unverified = batch.unverified, []
        sums = await self._sums([view for _i, _want, view, _kb, _path in todo])
        bad: list[tuple[bytes, bytes]] = []
        for (index, want, _view, kb, path), got in zip(todo, sums):
            if got == want:
                batch.results[index] = Status.HIT
                self._stats["hits"] += 1
                self._stats["bytes_read"] += self.block_size
                continue
            batch.results[index] = Status.CORRUPT
            self._stats["corrupt"] += 1
            log.warning("kvuring: corrupt block %s (%s); removing it",
                        os.fsdecode(self.ns_path / path), PAYLOAD_MISMATCH)  # fmt: skip
            bad.append((kb, path))
        if bad:
            removal = self._new_batch(len(bad))
            await self._run_many([
                _DeleteUnit(self, removal, i, kb, path, path.rsplit(b"/", 1)[0], counted=False)
                for i, (kb, path) in enumerate(bad)
            ])  # fmt: skip

    async def put(self, key: bytes | int, buf: Buffer) -> Status:
        """Store one block: STORED or EXISTS; raises OSError (with errno and path) on failure."""
        if self._core is not None:
            return self._core_one(*await self._core_put([key], [buf]))
        return await self._run_one(self._put_units([key], [buf]))

    async def get(self, key: bytes | int, buf: Buffer) -> Status:
        """Load one block: HIT, MISS or CORRUPT; raises OSError (with errno and path) on failure."""
        if self._core is not None:
            return self._core_one(*await self._core_get([key], [buf]))
        return await self._run_one(self._get_units([key], [buf]))

    async def _run_many(self, units: list[_BlockUnit]) -> list[Any]:
        if not units:
            return []
        await self._run(units, units[0].batch)
        return units[0].batch.results

    async def _run_one(self, units: list[_BlockUnit]) -> Status:
        batch = units[0].batch
        await self._run(units, batch)
        if batch.errors[0] is not None:
            raise batch.errors[0]
        status: Status = batch.results[0]
        return status

    async def get_prefix(self, keys: Sequence[bytes | int], bufs: Sequence[Buffer]) -> int:
        """Load the longest run of present blocks from the first; return its length.

        All blocks are requested at once (one round trip); buffers past the
        returned length hold unspecified bytes.
        """
        results = await self.get_many(keys, bufs)
        n = 0
        for status in results:
            if status is not Status.HIT:
                break
            n += 1
        return n

    async def contains_many(self, keys: Sequence[bytes | int]) -> list[bool]:
        """Whether each block is present (a regular file of the right size), in order."""
        self._ring_for_call()
        if self._core is not None:
            return await self._core_presence(core_api.STAT, keys, "contains")
        paths = self._paths(keys)
        batch = self._new_batch(len(paths))
        units: list[_BlockUnit] = [
            _StatUnit(self, batch, i, kb, path) for i, (kb, _leaf, path) in enumerate(paths)
        ]
        self._stats["contains"] += len(units)
        return await self._run_many(units)

    async def delete_many(self, keys: Sequence[bytes | int]) -> list[bool]:
        """Remove blocks; True where a block was removed, in order."""
        self._ring_for_call()
        if self._core is not None:
            return await self._core_presence(core_api.DELETE, keys, "deletes")
        paths = self._paths(keys)
        batch = self._new_batch(len(paths))
        units: list[_BlockUnit] = [
            _DeleteUnit(self, batch, i, kb, path, leaf) for i, (kb, leaf, path) in enumerate(paths)
        ]
        self._stats["deletes"] += len(units)
        return await self._run_many(units)

    def stats(self) -> dict[str, Any]:
        """Counters and configuration: ops, bytes, hits, misses, corrupt, failures, bounced, engine, direct I/O."""
        out: dict[str, Any] = dict(self._stats)
        core = self._core
        held = 0
        if core is not None:
            cs = core.stats()
            for name in _CORE_COUNTERS:
                out[name] += cs[name]
            held = cs["held"]
        out.update(
            engine=self._ring.backend if self._ring is not None and not self._ring.closed else None,
            direct_io=self.direct_io,
            direct_io_alignment=self.mem_align if self.direct_io else None,
            verify=self.verify,
            block_size=self.block_size,
            namespace=self.namespace,
            rename_noreplace=self.noreplace and (core is None or core.noreplace),
            filesystem=self.filesystem,
            load_io_priority="realtime"
            if (core.load_ioprio if core is not None else self._load_ioprio)
            else "default",
            spread_reads=self.spread_reads,
            fixed_buffers_active=self._fixed_ready,
            stores_held_for_loads=(self._gate.held if self._gate is not None else 0) + held,
            native=core is not None,
        )
        if self._fixed is not None:
            out.update(self._fixed.stats())
        if self._ring is not None and self._ring._driver is not None:
            out["ring"] = self._ring.stats()
        return out


class _BytesPath:
    """A byte-string directory path that joins with ``/`` (for error messages)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __truediv__(self, rel: bytes) -> bytes:
        return self.raw + b"/" + rel

    def __fspath__(self) -> bytes:
        return self.raw
