"""Engines: something that runs batches of operation words and reports completions.

Two engines share one interface:

* :class:`Ring` owns one io_uring, a registered eventfd and a sparse table of
  direct descriptors; the kernel runs the operations.
* :class:`ThreadRing` runs the same words in a pool of threads with plain
  syscalls (the chain runner is C, so the GIL is released for a whole chain),
  for where io_uring is refused: seccomp (EPERM), ``kernel.io_uring_disabled``,
  ENOSYS on old kernels or gVisor, or a needed opcode or feature missing.

:func:`open_engine` picks one (``KVURING_BACKEND=auto|uring|threads``).
Engines know nothing of what the operations mean; ``kvuring._driver`` does.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvuring import _binding as b

log = logging.getLogger("kvuring")

Backend = Literal["auto", "uring", "threads"]
BACKENDS: tuple[str, ...] = ("auto", "uring", "threads")

#: user_data with this bit set belongs to kvuring itself (cancel requests);
#: the driver ignores those completions.
INTERNAL_TAG = 1 << 63

#: registered-buffer slots an engine offers (READ_FIXED/WRITE_FIXED buf_index)
BUFFER_SLOTS = 1024

# Opcodes kvuring's chains need; missing any of them means the thread engine.
REQUIRED_OPCODES: dict[str, int] = {
    "openat": b.OP_OPENAT,
    "openat2": b.OP_OPENAT2,
    "close": b.OP_CLOSE,
    "read": b.OP_READ,
    "write": b.OP_WRITE,
    "renameat": b.OP_RENAMEAT,
    "unlinkat": b.OP_UNLINKAT,
    "mkdirat": b.OP_MKDIRAT,
    "statx": b.OP_STATX,
    "fsync": b.OP_FSYNC,
    "async_cancel": b.OP_ASYNC_CANCEL,
}
OPTIONAL_OPCODES: dict[str, int] = {
    "read_fixed": b.OP_READ_FIXED,
    "write_fixed": b.OP_WRITE_FIXED,
    "readv": b.OP_READV,
    "writev": b.OP_WRITEV,
    "link_timeout": b.OP_LINK_TIMEOUT,
    # IORING_OP_FIXED_FD_INSTALL (6.8): a store closes its temp file through
    # a plain fd, so the filesystem's flush runs and reports errors
    "fd_install": b.lib.KVU_OP_FD_INSTALL,
}


class EngineUnavailable(OSError):
    """io_uring cannot be used here (refused, missing, or lacking a needed feature)."""


@dataclass
class EngineStats:
    """Counters an engine keeps; read them through ``stats()``."""

    sqes_submitted: int = 0
    enter_calls: int = 0
    cqes_reaped: int = 0
    extra: dict[str, int] = field(default_factory=dict)


Completions = tuple[Sequence[int], Sequence[int]]


class Engine:
    """The interface both engines implement."""

    name: str = "?"
    #: how many direct-descriptor slots (and so how many chains) can be in flight
    slots: int
    #: the first of the ``slots`` direct-descriptor slots the block core uses
    core_slot_base: int
    #: kernel features and opcodes found at run time
    features: dict[str, bool]

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.closed = False
        self._stats = EngineStats()
        #: the engine as C sees it (struct kvu_engine): what the block core submits to and reaps from
        self.c_engine: Any = b.ffi.new("struct kvu_engine *")
        self._reap_ud: Any = None
        self._reap_res: Any = None
        self._reap_max = 0

    def _reap_buffers(self, n: int) -> None:
        self._reap_ud = b.ffi.new("uint64_t[]", n)
        self._reap_res = b.ffi.new("int32_t[]", n)
        self._reap_max = n

    # -- ownership ---------------------------------------------------------
    def check_owner(self) -> None:
        """A ring belongs to the process that made it; a forked child must make its own."""
        if self.closed:
            raise RuntimeError(f"{self.name} engine is closed")
        if os.getpid() != self.owner_pid:
            raise RuntimeError(
                f"this {self.name} engine belongs to process {self.owner_pid}; "
                f"after fork() the child must open its own"
            )

    # -- the interface -------------------------------------------------------
    def fileno(self) -> int:
        """An eventfd that turns readable when completions may be waiting."""
        raise NotImplementedError

    def submit(self, words: array[int]) -> int:
        """Hand whole chains of ``words`` to the kernel (or the threads); returns the op count taken.

        Fewer than all only when the kernel is backed up (its CQ full); the
        caller submits the rest after reaping.  OSError when it took none.
        """
        self.check_owner()
        n = len(words) // b.OP_WORDS
        if not n:
            return 0
        res = b.lib.kvu_engine_submit(self.c_engine, b.ffi.from_buffer("uint64_t[]", words), n)
        if res < 0:
            raise b.os_error(res)
        return int(res)

    def reap(self) -> Completions:
        """Every completion available now, as (user_data list, result list)."""
        self.check_owner()
        uds: list[int] = []
        res: list[int] = []
        while True:
            n = b.lib.kvu_engine_reap(self.c_engine, self._reap_ud, self._reap_res, self._reap_max)
            if not n:
                break
            uds += b.ffi.unpack(self._reap_ud, n)
            res += b.ffi.unpack(self._reap_res, n)
            if n < self._reap_max:
                break
        return uds, res

    def wait_completion(self) -> None:
        """Block until at least one completion is there to reap (work must be in flight)."""
        raise NotImplementedError

    def wait(self, timeout: float | None) -> None:
        """Block until completions may be available (or the timeout passes)."""
        select.select([self.fileno()], [], [], timeout)

    def drain(self, dispatch: Callable[[Completions], None]) -> None:
        """Block until completions arrive and hand them to dispatch.

        Only call it with operations in flight.  ThreadRing returns once every
        chain has run; Ring returns after any completion, so callers loop
        until their own count of work in flight reaches zero (Driver.drain).
        """
        raise NotImplementedError

    def set_buffer(self, index: int, addr: int, length: int) -> None:
        """Register memory for READ_FIXED/WRITE_FIXED in slot ``index`` (see Ring.set_buffer)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """Let go of the engine with work still in the kernel (a hung filesystem): never waits."""
        self.close()

    def widen_workers(self, wanted: int) -> None:
        """Allow up to ``wanted`` blocking workers (io_uring's io-wq; the thread engine's are fixed)."""

    def stats(self) -> dict[str, Any]:
        s = self._stats
        e = self.c_engine
        return {
            "engine": self.name,
            "sqes_submitted": s.sqes_submitted + e.sqes_submitted,
            "enter_calls": s.enter_calls + e.enter_calls,
            "cqes_reaped": s.cqes_reaped + e.cqes_reaped,
            **s.extra,
        }


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


# --------------------------------------------------------------------------
# io_uring
# --------------------------------------------------------------------------

# Tried in order until the kernel accepts one; each later set drops what an
# older kernel rejects with EINVAL.
#
# DEFER_TASKRUN is deliberately absent: since about 6.13 one GETEVENTS enter
# runs at most 20 deferred completions and parks the rest, and the parked
# ones raise no new eventfd signal, so a loop that waits on the eventfd can
# stall with work finished in the kernel (seen here with 255 linked chains;
# also liburing#1474).  COOP_TASKRUN still wakes a thread sleeping in
# epoll_wait, which then runs the task work and signals the eventfd.
_SETUP_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("SUBMIT_ALL", "COOP_TASKRUN", "SINGLE_ISSUER"),
    ("SUBMIT_ALL", "COOP_TASKRUN"),
    ("SUBMIT_ALL",),
    (),
)


class Ring(Engine):
    """One io_uring with a registered eventfd and a sparse direct-descriptor table.

    ``entries`` is the SQ size; the CQ is sized so that ``slots`` chains of
    up to 8 operations can never overflow it.  Create and use a ring on one
    thread (with SINGLE_ISSUER the kernel enforces it).
    """

    name = "uring"

    def __init__(
        self,
        slots: int = 256,
        *,
        entries: int | None = None,
        max_workers: int | None = None,
        single_issuer: bool = True,
    ) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        # Without SINGLE_ISSUER any thread may submit (one at a time): for
        # callers whose calls come from different threads (vLLM's tiers).
        self._flag_sets = (
            _SETUP_FLAG_SETS
            if single_issuer
            else tuple(tuple(f for f in fs if f != "SINGLE_ISSUER") for fs in _SETUP_FLAG_SETS)
        )
        # Direct descriptors [0, slots) are the driver's tickets, [slots, 2 * slots)
        # the block core's (kvuring/_csrc/blocks.c).
        self.core_slot_base = slots
        # Sized for one side's ``slots`` chains: in a store nearly all work is
        # the core's, and the ring's memory counts against RLIMIT_MEMLOCK.
        # The kernel keeps CQEs beyond the CQ on its overflow list (NODROP).
        table = 2 * slots
        sq_entries = entries or _pow2(max(64, min(4096, slots * 8)))
        self._ring = b.ffi.new("struct io_uring *")
        self.setup_flags = self._setup(sq_entries, max(sq_entries * 2, _pow2(slots * 8)))
        self._open = True
        try:
            self.features = self._probe()
            missing = [k for k in (*REQUIRED_OPCODES, "linked_file") if not self.features[k]]
            if missing:
                raise EngineUnavailable(errno.EOPNOTSUPP, f"io_uring lacks {', '.join(missing)}")
            self._efd = _eventfd()
            _check(b.lib.io_uring_register_eventfd(self._ring, self._efd), "register_eventfd")
            _check(b.lib.io_uring_register_files_sparse(self._ring, table), "register_files_sparse")
            self.max_workers = self._limit_workers(max_workers)
            self.max_bounded_workers = min(sq_entries, 4 * (os.cpu_count() or 1))
        except BaseException:
            b.lib.io_uring_queue_exit(self._ring)
            self._open = False
            raise
        self.defer_taskrun = bool(self.setup_flags & b.lib.IORING_SETUP_DEFER_TASKRUN)
        e = self.c_engine
        e.ring = self._ring
        e.efd = self._efd
        e.defer_taskrun = int(self.defer_taskrun)
        self._reap_buffers(self._ring.cq.ring_entries)
        self._buffer_table = False

    def _setup(self, sq_entries: int, cq_entries: int) -> int:
        last = 0
        for names in self._flag_sets:
            params = b.ffi.new("struct io_uring_params *")
            params.flags = b.lib.IORING_SETUP_CQSIZE
            for n in names:
                params.flags |= getattr(b.lib, f"IORING_SETUP_{n}")
            params.cq_entries = cq_entries
            res = b.lib.io_uring_queue_init_params(sq_entries, self._ring, params)
            if res == 0:
                self.params_features = int(params.features)
                return int(params.flags)
            last = res
            if res != -errno.EINVAL:
                break
        raise EngineUnavailable(-last, f"io_uring_setup failed: {os.strerror(-last)}")

    def widen_workers(self, wanted: int) -> None:
        """Raise io-wq's cap on blocking workers to ``wanted`` (never lowers it).

        For a store over several roots: one root's hung requests each hold
        a worker, and with the default cap they would leave none for the
        other roots' creates and renames.
        """
        if wanted > self.max_workers:
            self.max_workers = self._limit_workers(wanted)
        # Opens and creates (no file yet) are io-wq's *bounded* work, whose
        # cap is min(SQ entries, 4 per CPU): raise that one too.
        if wanted > self.max_bounded_workers:
            values = b.ffi.new("unsigned int[2]", [wanted, 0])
            if b.lib.io_uring_register_iowq_max_workers(self._ring, values) == 0:
                self.max_bounded_workers = wanted

    def _limit_workers(self, wanted: int | None) -> int:
        """Cap io-wq's unbounded workers (I/O on pipes, sockets, other non-regular files).

        Left alone, io-wq starts a worker per blocked unbounded request.
        Opens, creates, renames, unlinks and regular-file I/O are *bounded*
        work, which the kernel already caps at min(SQ entries, 4 per CPU)
        (see widen_workers for raising that).
        """
        env = os.environ.get("KVURING_IOWQ_WORKERS")
        limit = wanted or (int(env) if env else 4 * (os.cpu_count() or 1))
        values = b.ffi.new("unsigned int[2]", [0, limit])
        if b.lib.io_uring_register_iowq_max_workers(self._ring, values) < 0:
            return 0  # an old kernel: unlimited, as before
        return limit

    def _probe(self) -> dict[str, bool]:
        feats = {
            "cqe_skip_success": bool(self.params_features & b.lib.IORING_FEAT_CQE_SKIP),
            "linked_file": bool(self.params_features & b.lib.IORING_FEAT_LINKED_FILE),
            "nodrop": bool(self.params_features & b.lib.IORING_FEAT_NODROP),
            "single_issuer": bool(self.setup_flags & b.lib.IORING_SETUP_SINGLE_ISSUER),
            "defer_taskrun": bool(self.setup_flags & b.lib.IORING_SETUP_DEFER_TASKRUN),
            "coop_taskrun": bool(self.setup_flags & b.lib.IORING_SETUP_COOP_TASKRUN),
            "direct_descriptors": True,
        }
        probe = b.lib.io_uring_get_probe_ring(self._ring)
        if probe == b.ffi.NULL:
            raise EngineUnavailable(errno.ENOSYS, "io_uring opcode probe unavailable")
        try:
            for name, op in (*REQUIRED_OPCODES.items(), *OPTIONAL_OPCODES.items()):
                feats[name] = bool(b.lib.io_uring_opcode_supported(probe, op))
        finally:
            b.lib.io_uring_free_probe(probe)
        return feats

    # -- submit / reap ---------------------------------------------------------
    def fileno(self) -> int:
        return self._efd

    def pending(self) -> bool:
        """True when CQEs wait in the CQ (for example ones completed inline at submit)."""
        return bool(b.lib.io_uring_cq_ready(self._ring))

    def wait_completion(self) -> None:
        """Block until a CQE is there.

        An IOSQE_IO_DRAIN marker cannot tell when the ring is empty: once a
        ring has seen one IOSQE_CQE_SKIP_SUCCESS, the kernel fails every
        IO_DRAIN SQE at once with -EOPNOTSUPP; so wait for one completion.
        """
        self.check_owner()
        if not b.lib.io_uring_cq_ready(self._ring):
            b.lib.io_uring_submit_and_wait(self._ring, 1)
            self._stats.enter_calls += 1

    def drain(self, dispatch: Callable[[Completions], None]) -> None:
        """Block until at least one completion arrives; hand over all that are there."""
        self.check_owner()
        while True:
            uds, res = self.reap()
            if uds:
                dispatch((uds, res))
                return
            self.wait_completion()

    # -- registered buffers ----------------------------------------------------
    def set_buffer(self, index: int, addr: int, length: int) -> None:
        """Point registered-buffer slot ``index`` at ``length`` bytes at ``addr`` (0, 0: empty it).

        The kernel pins the pages until the slot is emptied or the ring
        closes; operations already in flight keep the old pages.  Raises
        OSError: ENOMEM when RLIMIT_MEMLOCK is too low, EFAULT for memory it
        cannot pin (file-backed on some filesystems), EOPNOTSUPP on kernels
        without sparse buffer tables (before 5.19).
        """
        self.check_owner()
        if not 0 <= index < BUFFER_SLOTS:
            raise ValueError(f"buffer slot must be in [0, {BUFFER_SLOTS}), got {index}")
        if not self._buffer_table:
            _check(b.lib.io_uring_register_buffers_sparse(self._ring, BUFFER_SLOTS),
                   "register_buffers_sparse")  # fmt: skip
            self._buffer_table = True
        _check(
            b.lib.kvu_register_buffer(self._ring, index, addr, length), "register_buffers_update"
        )

    def close(self) -> None:
        """Release the ring; idempotent.  Drain in-flight work first (the driver does)."""
        if self.closed:
            return
        self.closed = True
        if os.getpid() == self.owner_pid:
            b.lib.io_uring_unregister_eventfd(self._ring)
        # In a forked child this only unmaps and closes the child's copies;
        # the parent's ring lives on untouched.
        b.lib.io_uring_queue_exit(self._ring)
        os.close(self._efd)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        # From the flags the kernel accepted: SUBMIT_ALL has no features entry,
        # so deriving the list from self.features silently dropped it.
        out["setup_flags"] = [
            n for n in _SETUP_FLAG_SETS[0] if self.setup_flags & getattr(b.lib, f"IORING_SETUP_{n}")
        ]
        return out


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def _check(res: int, what: str) -> None:
    if res < 0:
        raise OSError(-res, f"io_uring {what}: {os.strerror(-res)}")


# --------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------


class ThreadRing(Engine):
    """The same operations run by a pool of threads, for where io_uring is refused.

    Each linked chain goes to one worker, which runs it in C (no GIL) with
    io_uring's link and CQE-skip rules; completions come back through an
    eventfd exactly as a ring's do.  The workers are POSIX threads of the C
    core (kvuring/_csrc/pool.c), so no Python runs per chain.
    """

    name = "threads"

    def __init__(self, slots: int = 256, *, threads: int = 16) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.slots = slots
        self.core_slot_base = slots
        self.threads = threads
        self.features = {k: True for k in (*REQUIRED_OPCODES, *OPTIONAL_OPCODES)}
        self.features.update(cqe_skip_success=True, linked_file=True, direct_descriptors=True)
        self.features["link_timeout"] = False
        self._efd = _eventfd()
        self._pool = b.lib.kvu_pool_new(threads, 2 * slots, self._efd)
        if self._pool == b.ffi.NULL:
            os.close(self._efd)
            raise OSError(errno.EAGAIN, "kvuring: could not start the thread engine's threads")
        e = self.c_engine
        e.pool = self._pool
        e.efd = self._efd
        self._reap_buffers(max(1024, 8 * slots))

    def fileno(self) -> int:
        return self._efd

    def wait_completion(self) -> None:
        self.check_owner()
        b.lib.kvu_pool_wait(self._pool, 0)

    def drain(self, dispatch: Callable[[Completions], None]) -> None:
        """Block until every chain has run; hand over their completions."""
        self.check_owner()
        b.lib.kvu_pool_wait(self._pool, 1)
        dispatch(self.reap())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if os.getpid() == self.owner_pid:
            # Runs what is queued, joins the threads, closes the slots' files.
            b.lib.kvu_pool_free(self._pool)
        # In a forked child the threads do not exist: leave the copy alone.
        self._pool = b.ffi.NULL
        os.close(self._efd)

    def abandon(self) -> None:
        """Stop the workers without joining them: one may be stuck in a hung filesystem.

        The pool and its eventfd stay allocated and open for good (a worker
        that comes back still posts and signals); the process can exit.
        """
        if self.closed:
            return
        self.closed = True
        if os.getpid() == self.owner_pid:
            b.lib.kvu_pool_abandon(self._pool)
        self._pool = b.ffi.NULL

    def set_buffer(self, index: int, addr: int, length: int) -> None:
        # Workers pass a fixed transfer's address straight to pread/pwrite.
        self.check_owner()
        if not 0 <= index < BUFFER_SLOTS:
            raise ValueError(f"buffer slot must be in [0, {BUFFER_SLOTS}), got {index}")

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["threads"] = self.threads
        return out


# --------------------------------------------------------------------------
# choosing
# --------------------------------------------------------------------------

_chosen_logged = False


def resolve_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else ``KVURING_BACKEND``, else ``auto``."""
    chosen = backend if backend is not None else os.environ.get("KVURING_BACKEND", "auto")
    if chosen not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {chosen!r}")
    return chosen


def open_engine(
    backend: str | None = None, *, slots: int = 256, threads: int = 16, single_issuer: bool = True
) -> Engine:
    """Open an engine: io_uring when it works, else the thread pool (``auto``).

    ``backend="uring"`` raises :class:`EngineUnavailable` instead of falling back.
    ``single_issuer=False`` lets any thread submit (one at a time).  The
    choice is logged once per process.
    """
    global _chosen_logged
    chosen = resolve_backend(backend)
    engine: Engine
    reason = ""
    if chosen == "threads":
        engine = ThreadRing(slots, threads=threads)
        reason = "asked for"
    else:
        try:
            engine = Ring(slots, single_issuer=single_issuer)
        except OSError as exc:
            if chosen == "uring":
                if isinstance(exc, EngineUnavailable):
                    raise
                raise EngineUnavailable(exc.errno, f"io_uring unavailable: {exc}") from exc
            engine = ThreadRing(slots, threads=threads)
            reason = f"io_uring unavailable ({exc.strerror or exc})"
    if not _chosen_logged:
        _chosen_logged = True
        if engine.name == "uring":
            log.info(
                "kvuring engine: io_uring (%s)",
                ", ".join(
                    k
                    for k in ("defer_taskrun", "single_issuer", "cqe_skip_success")
                    if engine.features[k]
                ),
            )
        elif reason == "asked for":
            log.info("kvuring engine: threads (asked for)")
        else:
            log.warning("kvuring engine: threads (%s)", reason)
    return engine
