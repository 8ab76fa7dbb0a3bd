"""One batch call from arguments to statuses, written once for every front end.

:class:`BatchRunner` checks a call's arguments, hands the batch to the C
block core in one call, checksums big blocks on worker threads (C, without
the GIL), removes blocks found CORRUPT there, logs what failed and calls
``done(job)`` on the owner's thread.  It knows no event loop: a front end
gives it two callbacks --

* ``kick()``: submit soon, on the owner's thread (asyncio: this loop
  iteration's flush; polling: at once);
* ``post(fn)``: run ``fn`` on the owner's thread, callable from any thread
  (asyncio: ``call_soon_threadsafe``; polling: the next ``poll()``).
"""

from __future__ import annotations

import concurrent.futures
import errno
import functools
import logging
import os
from array import array
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvuring import _binding as b
from kvuring import _blocks as core_api
from kvuring._blocks import BlockCore, CoreBatch
from kvuring._driver import Driver
from kvuring._format import (
    MAX_KEY_BYTES,
    RAW_SUFFIX,
    VERIFIED_SUFFIX,
    VLLM_GROUP_BYTES,
    block_relpath,
    key_bytes,
    vllm_relpath,
)
from kvuring._gate import STORES_DURING_LOADS
from kvuring._namespace import Namespace
from kvuring._regions import AlignedBuffer, FixedBuffers
from kvuring._writers import tmp_suffix
from kvuring.engine import Engine
from kvuring.status import STATUS_OF, Status

if TYPE_CHECKING:
    from kvuring._capacity import Capacity

log = logging.getLogger("kvuring")
_from_buffer = b.ffi.from_buffer

#: blocks at least this big, in calls of more than one block, are checksummed
#: on worker threads (C, without the GIL) instead of the owner's thread
HASH_OFFLOAD_MIN = 256 * 1024

#: counters the block core keeps, added into stats()
CORE_COUNTERS = ("stored", "exists", "hits", "misses", "corrupt", "failures", "deleted",
                 "bytes_written", "bytes_read", "bounced", "fixed_transfers")  # fmt: skip

Post = Callable[[Callable[[], None]], None]


class Job:
    """One call in flight: its batch, its keys, and what to call when it is over."""

    __slots__ = ("batch", "cancelled", "done", "kbs", "kind", "over", "waiting")

    def __init__(self, kind: int, kbs: list[bytes], batch: CoreBatch, done: Callable[[Job], None]):
        self.kind = kind
        self.kbs = kbs
        self.batch = batch
        self.done = done
        self.waiting = 0  # hash-thread results still to come
        self.cancelled = False
        self.over = False

    def statuses(self) -> list[Any]:
        """Status per block (stores, loads) or bool per block (presence checks, deletes)."""
        if self.kind in (core_api.STAT, core_api.DELETE):
            return [status == core_api.PRESENT for status in self.batch.status]
        return list(map(STATUS_OF.__getitem__, self.batch.status))

    def failed(self, index: int) -> bool:
        return self.batch.status[index] == core_api.FAILED


def start_core(
    ns: Namespace, engine: Engine, driver: Driver, *, fixed_buffers: bool, prioritize_loads: bool,
    io_timeout: float | None = None, durable: bool = False,
    root_ids: Sequence[int] = (0,), more: Sequence[Namespace] = (),
) -> tuple[BlockCore, FixedBuffers | None, bool]:  # fmt: skip
    """The block core for ``ns`` on ``engine``, attached to ``driver``; registered buffers if asked.

    Returns the core, the registered-buffer table (``fixed_buffers``) and
    whether fixed transfers are on (False when even the trailer pages
    could not be registered: RLIMIT_MEMLOCK).
    """
    assert ns.writer is not None
    fixed: FixedBuffers | None = None
    trailer_index = -1
    ready = False
    if fixed_buffers:
        # The trailer pages are registered first: a fixed transfer of a
        # verified block needs both its payload and its trailer registered.
        fixed = FixedBuffers(engine)
        ready = ns.trailers is None
        if ns.trailers is not None and fixed.add(ns.trailers):
            trailer_index = fixed.slot_for(ns.trailers_addr, len(ns.trailers))
            ready = True
    core = BlockCore(
        engine,
        ns_fd=ns.ns_fd,
        reg_fd=ns.writer.fd,
        block_size=ns.block_size,
        verify=ns.verify,
        direct=ns.direct.enabled,
        mem_align=ns.direct.mem_align,
        slots=ns.queue_depth,
        open_flags=b.SQE_ASYNC,
        read_flags=b.SQE_ASYNC if ns.spread_reads or any(m.spread_reads for m in more) else 0,
        load_ioprio=ns.load_ioprio,
        store_limit=STORES_DURING_LOADS if prioritize_loads else 0,
        trailers=ns.trailers_addr,
        trailer_index=trailer_index,
        suffix=(VERIFIED_SUFFIX if ns.verify else RAW_SUFFIX).encode(),
        marker=tmp_suffix(ns.writer.token),
        layout=core_api.LAYOUT_OF[ns.layout],
        timeout=io_timeout,
        # The ring closes a store's temp file through an installed plain fd,
        # so that the filesystem's flush runs; the thread engine's slots are
        # plain fds already, and closing one reports its flush.
        # KVURING_CLOSE_CHECK=0 turns the ring's check off (for measuring).
        fd_install=engine.name == "uring"
        and bool(engine.features.get("fd_install"))
        and os.environ.get("KVURING_CLOSE_CHECK", "1") != "0",
        durable=durable,
        keep_alive=ns.trailers,
        root_id=root_ids[0],
        extra_roots=[_root_config(m, rid) for m, rid in zip(more, root_ids[1:])],
    )
    driver.attach_core(core)
    if fixed is not None and ready:
        spans = fixed
        fixed.on_change = lambda: core.set_spans(spans.span_words())
        fixed.on_change()
    return core, fixed, ready


def _root_config(ns: Namespace, rid: int) -> tuple[int, int, bool, int, int, bytes]:
    """One more root for the core: its namespace fd, registry fd, direct I/O, alignment, id,
    and its writer's temp-file marker (each root's registry has its own token)."""
    assert ns.writer is not None
    return (ns.ns_fd, ns.writer.fd, ns.direct.enabled, ns.direct.mem_align, rid,
            tmp_suffix(ns.writer.token))  # fmt: skip


def _row_index(rows: object) -> Any:
    """Row numbers as a contiguous buffer of int64 (a numpy int64 array as it is)."""
    try:
        view = memoryview(rows)  # type: ignore[arg-type]
    except TypeError:
        view = None
    if (
        view is not None
        and view.ndim == 1
        and view.itemsize == 8
        and view.format.lstrip("@=<") in ("q", "l")
        and view.c_contiguous
    ):
        return view
    try:
        return array("q", rows)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"rows must be a sequence of ints, not {type(rows).__name__}") from None


class BatchRunner:
    """Stores, loads, presence checks and deletes as jobs on one block core."""

    def __init__(
        self,
        ns: Namespace,
        core: BlockCore,
        fixed: FixedBuffers | None,
        *,
        kick: Callable[[], None],
        post: Post,
        hash_threads: int | None = None,
    ) -> None:
        self.ns = ns
        self.core = core
        self.fixed = fixed
        self.block_size = ns.block_size
        self.verify = ns.verify
        self.suffix = (VERIFIED_SUFFIX if ns.verify else RAW_SUFFIX).encode()
        self._kick = kick
        self._post = post
        self._hash_threads = hash_threads or max(2, min(8, os.cpu_count() or 2))
        self._hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._bounce_logged = False
        self._noreplace_logged = False
        self._failure_logged: set[int] = set()
        #: the disk budget (capacity_bytes), set by the front end after construction
        self.capacity: Capacity | None = None
        self.counts: dict[str, int] = dict.fromkeys(
            ("puts", "gets", "contains", "deletes", "hits", "bytes_read", "corrupt",
             "offloaded_checksums"),
            0,
        )  # fmt: skip

    # -- arguments -------------------------------------------------------------------
    def key_list(self, keys: Sequence[object]) -> list[bytes]:
        if isinstance(keys, (bytes, bytearray, memoryview, str, int)):
            # (iterating bytes-like keys would give one int key per byte)
            raise TypeError(
                f"keys must be a sequence of keys, not a single key ({type(keys).__name__})"
            )
        kbs = [
            k if type(k) is bytes and 0 < len(k) <= MAX_KEY_BYTES else key_bytes(k) for k in keys
        ]
        if self.ns.layout == "vllm" and kbs and min(map(len, kbs)) <= VLLM_GROUP_BYTES:
            raise ValueError(
                "layout='vllm' keys are a block hash followed by a 4-byte group index: "
                f"at least {VLLM_GROUP_BYTES + 1} bytes, got {min(map(len, kbs))}"
            )
        return kbs

    def _check_views(self, bufs: Sequence[object], *, writable: bool) -> None:
        """Raise the precise error for the first unfit buffer (the slow path of _pins)."""
        size = self.block_size
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

    def _pins(self, bufs: Sequence[object], n: int, *, writable: bool) -> list[Any]:
        """Pin every buffer (one cffi call each); the precise error when one is unfit."""
        if isinstance(bufs, (bytes, bytearray, memoryview)):
            raise TypeError("bufs must be a sequence of buffers, not a single buffer")
        if len(bufs) != n:
            raise ValueError(f"{n} keys but {len(bufs)} buffers")
        size = self.block_size
        try:
            pins = [_from_buffer(buf, require_writable=writable) for buf in bufs]
        except (TypeError, BufferError, ValueError) as exc:
            self._check_views(bufs, writable=writable)
            raise TypeError(f"buffers must be writable, contiguous buffers: {exc}") from exc
        if pins and (min(map(len, pins)) != size or max(map(len, pins)) != size):
            for pin in pins:
                b.ffi.release(pin)
            self._check_views(bufs, writable=writable)
            raise ValueError(f"every buffer must be {size} bytes")
        if self.fixed is not None:
            self._register_regions(bufs)
        return pins

    def _register_regions(self, bufs: Sequence[object]) -> None:
        # aligned_buffer regions are registered on first sight (fixed buffers only).
        fixed = self.fixed
        assert fixed is not None
        last: object = None
        for buf in bufs:
            obj = buf.obj if isinstance(buf, memoryview) else buf
            if obj is not last and isinstance(obj, AlignedBuffer):
                last = obj
                if not fixed.known(obj):
                    fixed.add(obj)

    # -- jobs ------------------------------------------------------------------------
    def put(
        self, keys: Sequence[object], bufs: Sequence[object], done: Callable[[Job], None]
    ) -> Job:
        kbs = self.key_list(keys)
        pins = self._pins(bufs, len(kbs), writable=False)
        self.counts["puts"] += len(kbs)
        offload = self._offload_hashing(len(kbs))
        job = Job(
            core_api.STORE,
            kbs,
            CoreBatch(core_api.STORE, kbs, pins, ready=0 if offload else None),
            done,
        )
        self._start(job)
        if offload:
            self._sum_stores(job)
        return job

    def get(
        self, keys: Sequence[object], bufs: Sequence[object], done: Callable[[Job], None]
    ) -> Job:
        kbs = self.key_list(keys)
        pins = self._pins(bufs, len(kbs), writable=True)
        self.counts["gets"] += len(kbs)
        batch = CoreBatch(core_api.LOAD, kbs, pins, defer_verify=self._offload_hashing(len(kbs)))
        job = Job(core_api.LOAD, kbs, batch, done)
        self._start(job)
        return job

    def put_rows(
        self, keys: Sequence[object], region: object, rows: object, done: Callable[[Job], None],
        *, row_bytes: int | None = None,
    ) -> Job:  # fmt: skip
        """put() of blocks that are rows of one region: ``rows[i]`` holds ``keys[i]``."""
        kbs = self.key_list(keys)
        pin, addrs = self._rows(region, rows, len(kbs), row_bytes, writable=False)
        self.counts["puts"] += len(kbs)
        offload = self._offload_hashing(len(kbs))
        batch = CoreBatch(core_api.STORE, kbs, [pin], addrs=addrs, ready=0 if offload else None)
        job = Job(core_api.STORE, kbs, batch, done)
        self._start(job)
        if offload:
            self._sum_stores(job)
        return job

    def get_rows(
        self, keys: Sequence[object], region: object, rows: object, done: Callable[[Job], None],
        *, row_bytes: int | None = None,
    ) -> Job:  # fmt: skip
        """get() into rows of one region: ``keys[i]`` is loaded into row ``rows[i]``."""
        kbs = self.key_list(keys)
        pin, addrs = self._rows(region, rows, len(kbs), row_bytes, writable=True)
        self.counts["gets"] += len(kbs)
        defer = self._offload_hashing(len(kbs))
        batch = CoreBatch(core_api.LOAD, kbs, [pin], addrs=addrs, defer_verify=defer)
        job = Job(core_api.LOAD, kbs, batch, done)
        self._start(job)
        return job

    def _rows(
        self, region: object, rows: object, n: int, row_bytes: int | None, *, writable: bool
    ) -> tuple[Any, Any]:
        """Pin ``region`` once and compute each row's address in C; the pin and the addresses."""
        try:
            view = memoryview(region)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"region must support the buffer protocol, not {type(region).__name__}"
            ) from None
        if writable and view.readonly:
            raise TypeError("get_rows needs a writable region")
        if not view.c_contiguous:
            raise ValueError("region must be C-contiguous")
        size = self.block_size
        if row_bytes is None:
            row_bytes = view.strides[0] if view.ndim > 1 and view.strides else size
        if not isinstance(row_bytes, int) or row_bytes < size:
            raise ValueError(f"row_bytes must be an int >= block_size ({size}), got {row_bytes!r}")
        index = _row_index(rows)
        if len(index) != n:
            raise ValueError(f"{n} keys but {len(index)} rows")
        nbytes = view.nbytes
        nrows = (nbytes - size) // row_bytes + 1 if nbytes >= size else 0
        pin = _from_buffer(view, require_writable=writable)
        addrs, bad = core_api.row_addrs(
            int(b.ffi.cast("uintptr_t", pin)), row_bytes, nrows, index, n
        )
        if bad >= 0:
            b.ffi.release(pin)
            raise IndexError(f"row {index[bad]} is outside the region's {nrows} rows")
        if self.fixed is not None:
            self._register_regions([view])
        return pin, addrs

    def presence(self, kind: int, keys: Sequence[object], done: Callable[[Job], None]) -> Job:
        """A presence check (STAT) or a delete (DELETE) of every key."""
        kbs = self.key_list(keys)
        self.counts["contains" if kind == core_api.STAT else "deletes"] += len(kbs)
        job = Job(kind, kbs, CoreBatch(kind, kbs, None), done)
        self._start(job)
        return job

    def _start(self, job: Job) -> None:
        if self.capacity is not None:
            self.capacity.starting(job)  # a put's evictions go into the core ahead of it
        self.core.add(job.batch, lambda _batch: self._core_done(job))
        self._kick()

    def cancel(self, job: Job) -> None:
        """The caller gave up: blocks not started are dropped, those in flight finish
        on their own (absent or intact) and keep their buffers until then."""
        if job.over:
            return
        job.cancelled = True
        self.core.cancel(job.batch)
        self._kick()

    def _core_done(self, job: Job) -> None:
        batch = job.batch
        if batch.c.unverified and not job.cancelled:
            self._verify_loads(job)
        else:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        job.over = True
        self._report(job)
        if self.capacity is not None:
            self.capacity.finished(job)
        job.done(job)

    # -- checksums on worker threads --------------------------------------------------
    def _big_batch(self, n: int) -> bool:
        """Checksums of this batch are worth moving off the owner's thread."""
        return self.verify and n > 1 and self.block_size >= HASH_OFFLOAD_MIN

    def _offload_hashing(self, n: int) -> bool:
        """Whether the hash threads checksum this batch.

        On the thread engine the worker that moves each block checksums it
        (the core's KVU_OP_CHECKSUM / KVU_OP_SEAL steps), in parallel and
        without the phase barrier of hashing after the reads: nothing to
        hand to the hash threads, but the checksums are off the owner's
        thread all the same (counted in ``offloaded_checksums``).  On
        io_uring, small batches are checksummed by the thread that reaps.
        """
        if not self._big_batch(n):
            return False
        if self.core.engine.name == "threads":
            self.counts["offloaded_checksums"] += n
            return False
        return True

    def _on_hash_thread(
        self, job: Job, fn: Any, args: tuple[Any, ...], then: Callable[[Any], None]
    ) -> None:
        """``fn(*args)`` (C, without the GIL) on a hash thread, then ``then(result)`` on the owner's.

        The batch's buffers stay held until the thread is done, also if the
        job was cancelled meanwhile: a running thread cannot be stopped.
        """
        if self._hash_pool is None:
            self._hash_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._hash_threads, thread_name_prefix="kvuring-hash"
            )
        batch = job.batch
        batch.hold()
        job.waiting += 1

        def back(work: concurrent.futures.Future[Any]) -> None:
            def run() -> None:
                job.waiting -= 1
                batch.unhold()
                then(work.result())

            self._post(run)

        self._hash_pool.submit(fn, *args).add_done_callback(back)

    def _sum_stores(self, job: Job) -> None:
        """Big blocks: checksum on the hash threads; each group starts once its sums are in,
        so hashing overlaps the writes."""
        batch = job.batch
        psums = batch.give_psums()
        n = batch.n
        self.counts["offloaded_checksums"] += n
        size = -(-n // (2 * self._hash_threads))  # about two groups per thread
        addrs = batch.c.addrs
        done_upto = [0] * -(-n // size)
        ready = [0]

        def group_done(g: int, hi: int, _result: None) -> None:
            done_upto[g] = hi
            # Groups finish out of order; blocks start in order.
            while ready[0] < len(done_upto) and done_upto[ready[0]]:
                ready[0] += 1
            if not job.cancelled and ready[0]:
                self.core.set_ready(batch, done_upto[ready[0] - 1])
                self._kick()

        for g, lo in enumerate(range(0, n, size)):
            hi = min(lo + size, n)
            args = (addrs, hi, lo, 1, self.block_size, psums)
            self._on_hash_thread(
                job, core_api.checksums, args, functools.partial(group_done, g, hi)
            )

    def _verify_loads(self, job: Job) -> None:
        """Compare the deferred payload checksums on the hash threads; HIT or CORRUPT (and removed)."""
        batch = job.batch
        todo = int(batch.c.unverified)
        self.counts["offloaded_checksums"] += todo
        k = min(batch.n, self._hash_threads)
        bad = [0]

        def checked(found: int) -> None:
            bad[0] += found
            if job.waiting:
                return
            self.counts["hits"] += todo - bad[0]
            self.counts["bytes_read"] += (todo - bad[0]) * self.block_size
            if not bad[0]:
                self._finish(job)
                return
            self.counts["corrupt"] += bad[0]
            batch.c.corrupt += bad[0]
            corrupt = [kb for kb, st in zip(job.kbs, batch.status) if st == core_api.CORRUPT]
            removal = CoreBatch(core_api.DELETE, corrupt, None, quiet=True)

            def removed(_removal: CoreBatch) -> None:
                self._finish(job)

            self.core.add(removal, removed)
            self._kick()

        for i in range(k):
            self._on_hash_thread(job, core_api.verify, (batch, i, k, self.block_size), checked)

    # -- results -----------------------------------------------------------------------
    def _report(self, job: Job) -> None:
        """Log what went wrong (the core counted it): each new errno once, each corrupt block."""
        c = job.batch.c
        if c.failed or c.corrupt:
            for kb, status, code in zip(job.kbs, job.batch.status, job.batch.error):
                if status == core_api.FAILED and code not in self._failure_logged:
                    self._failure_logged.add(code)
                    log.error("kvuring: block I/O failed: %s (further %s errors are only counted)",
                              self.error(kb, code), errno.errorcode.get(code, code))  # fmt: skip
                elif status == core_api.CORRUPT:
                    log.warning("kvuring: corrupt block %s (%s); removing it", self.block_path(kb),
                                core_api.CORRUPT_REASONS.get(code, code))  # fmt: skip
        if c.bounced and not self._bounce_logged:
            self._bounce_logged = True
            log.warning(
                "kvuring: buffer not aligned to %d bytes for O_DIRECT; copying through an aligned "
                "buffer (use kvuring.aligned_buffer to avoid the copy)", self.ns.direct.mem_align,
            )  # fmt: skip
        if job.kind == core_api.STORE and not self._noreplace_logged and not self.core.noreplace:
            self._noreplace_logged = True
            log.warning("kvuring: %s rejects RENAME_NOREPLACE; using plain rename", self.ns.path)

    def block_path(self, kb: bytes) -> str:
        rel = vllm_relpath(kb) if self.ns.layout == "vllm" else block_relpath(kb, self.suffix)
        return os.path.join(self.ns.path, os.fsdecode(rel[1]))

    def error(self, kb: bytes, code: int) -> OSError:
        return OSError(code, os.strerror(code), self.block_path(kb))

    def one(self, job: Job) -> Status:
        """The single block's status; its OSError if it FAILED."""
        if job.failed(0):
            raise self.error(job.kbs[0], job.batch.error[0])
        status: Status = STATUS_OF[job.batch.status[0]]
        return status

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counts)
        cs = self.core.stats()
        for name in CORE_COUNTERS:
            out[name] = out.get(name, 0) + cs[name]
        out["stores_held_for_loads"] = cs["held"]
        for name in ("retries", "timeouts", "cleanup_failed", "close_errors", "syncs"):
            out[name] = cs[name]
        out["errors"] = self.core.errors()
        out["lent_buffers"] = self.core.lent()
        return out

    def close(self) -> None:
        if self.capacity is not None:
            self.capacity.close()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
            self._hash_pool = None
