"""BlockStore: batched, atomic, verified KV-block stores and loads.

Each block is one file ``<root>/<namespace>/<hex[0:3]>/<hex[3:5]>/<hex>``
plus a suffix.  The per-block state machine -- paths, trailers, checksums,
each block's linked chains, retries and cleanups -- is the C block core
(kvuring/_csrc/blocks.c, driven through :mod:`kvuring._blocks`); this
module validates a call's arguments, hands the whole batch to the core in
one call and turns the statuses it writes into :class:`Status` values.  The
same core runs on the io_uring engine and the thread engine.

Chains (``S`` = CQE_SKIP_SUCCESS, ``L`` = link, ``H`` = hard link, ``A`` = async)::

    store  [openat2 upper O_PATH L·S → mkdirat leaf H·S]      (leaf not known to exist)
           openat2 <final>.<token>.c<seq>.tmp O_CREAT|O_EXCL, no symlinks L·S·A
           → writev payload + trailer L·S → close L·S → renameat RENAME_NOREPLACE
    load   openat2 <final>, no symlinks L·S·A → readv payload + trailer H·S → close
    stat   statx
    delete openat2 leaf O_PATH L·S → unlinkat H → close

With ``fixed_buffers=True`` and registered memory, the readv/writev becomes
two fixed transfers (payload, trailer page).  Payload checksums of blocks of
256 KiB or more, in calls of more than one block, are computed on worker
threads in C without the GIL (see ``_sum_stores`` and ``_verify_loads``);
while loads are in flight the core holds back store chains (loads first,
:mod:`kvuring._gate`).

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
import os
from collections.abc import Awaitable, Sequence
from typing import Any

from kvuring import _binding as b
from kvuring import _blocks as core_api
from kvuring._blocks import BlockCore, CoreBatch
from kvuring._format import (
    MAX_KEY_BYTES,
    RAW_SUFFIX,
    TRAILER_SIZE,
    VERIFIED_SUFFIX,
    block_relpath,
    check_namespace,
    key_bytes,
)
from kvuring._gate import STORES_DURING_LOADS
from kvuring._namespace import load_priority, probe_direct, spread_reads
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

MAX_BLOCK_SIZE = 1 << 30
# Every in-flight chain may post up to 8 CQEs and the kernel caps the CQ at
# 64 Ki entries.
MAX_QUEUE_DEPTH = 8192
#: blocks at least this big, in calls of more than one block, are checksummed
#: on worker threads (C, without the GIL) instead of the loop's thread
HASH_OFFLOAD_MIN = 256 * 1024


class Status(enum.Enum):
    """The outcome for one block."""

    STORED = "stored"  #: put wrote the block
    EXISTS = "exists"  #: put found the block already there and left it alone
    HIT = "hit"  #: get loaded the block and it checked out
    MISS = "miss"  #: get found no block
    CORRUPT = "corrupt"  #: get found a damaged block; it was removed
    FAILED = "failed"  #: an OS error (ENOSPC, EACCES, EIO, ...); see the log and stats()


#: Status by the core's code (kvuring/_csrc/kvu.h); UNVERIFIED never reaches a caller,
#: PRESENT and ABSENT are a presence check's or a delete's True and False
_STATUS_OF: tuple[Any, ...] = (
    None, Status.STORED, Status.EXISTS, Status.HIT, Status.MISS, Status.CORRUPT, Status.FAILED,
    None, True, False,
)  # fmt: skip
#: counters the block core keeps, added into stats()
_CORE_COUNTERS = ("stored", "exists", "hits", "misses", "corrupt", "failures", "deleted",
                  "bytes_written", "bytes_read", "bounced", "fixed_transfers")  # fmt: skip


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
        self.ns_path = _BytesPath(os.fsencode(os.path.join(self.root, self.namespace)))
        self.direct_io = False
        self.mem_align = 1
        self.offset_align = 1
        self.filesystem = "unknown"
        self.spread_reads = False
        self._load_ioprio = 0
        self.ns_fd = -1
        self._reg_fd = -1
        self._writer: WriterRegistration | None = None
        self._ring: AsyncRing | None = None
        self._core: BlockCore | None = None
        self._trailers: AlignedBuffer | None = None
        self._trailers_pin: Any = None
        self._fixed: FixedBuffers | None = None
        self._fixed_ready = False
        self._trailer_slot = -1
        self._hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._hash_threads = max(2, min(8, os.cpu_count() or 2))
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
            dio = probe_direct(ns, self._reg_fd, self._writer.token, self.block_size,
                               verify=self.verify, requested=self.direct_requested)  # fmt: skip
            self.direct_io, self.mem_align, self.offset_align = (
                dio.enabled,
                dio.mem_align,
                dio.offset_align,
            )
            self.filesystem, self.spread_reads = spread_reads(ns, self.direct_io)
            self._load_ioprio = load_priority() if self.prioritize_loads else 0
            if self.verify:
                self._trailers = aligned_buffer(self.queue_depth * TRAILER_SIZE)
                self._trailers_pin = b.pin_buffer(self._trailers, writable=True)
            self._ring = await AsyncRing(
                backend=self.backend_requested, queue_depth=self.queue_depth
            ).open()
            self._setup_fixed()
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
        """Finish every in-flight operation, release the ring and remove this process's temp dir.

        Stores still held back for loads end FAILED without running.
        """
        if self.closed:
            return
        self.closed = True
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
        if self._trailers_pin is not None:
            b.ffi.release(self._trailers_pin)
            self._trailers_pin = None

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
            self._trailer_slot = self._fixed.slot_for(
                b.address_of(self._trailers_pin), len(self._trailers)
            )
            self._fixed_ready = True

    def _make_core(self) -> BlockCore:
        assert self._ring is not None and self._writer is not None
        core = BlockCore(
            self._ring.engine,
            ns_fd=self.ns_fd,
            reg_fd=self._writer.fd,
            block_size=self.block_size,
            verify=self.verify,
            direct=self.direct_io,
            mem_align=self.mem_align,
            slots=self.queue_depth,
            read_flags=b.SQE_ASYNC if self.spread_reads else 0,
            load_ioprio=self._load_ioprio,
            store_limit=STORES_DURING_LOADS if self.prioritize_loads else 0,
            trailers=b.address_of(self._trailers_pin) if self._trailers_pin is not None else 0,
            trailer_index=self._trailer_slot,
            suffix=self.suffix.encode(),
            marker=tmp_suffix(self._writer.token),
        )
        self._ring.driver.attach_core(core)
        fixed = self._fixed
        if fixed is not None and self._fixed_ready:
            fixed.on_change = lambda: core.set_spans(fixed.span_words())
            fixed.on_change()
        return core

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

    # -- validation ------------------------------------------------------------------
    def _ring_for_call(self) -> AsyncRing:
        if self._ring is None:
            raise RuntimeError("BlockStore is not open; use 'async with' or await open()")
        if self.closed:
            raise RuntimeError("BlockStore is closed")
        return self._ring

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

    def _key_list(self, keys: Sequence[object]) -> list[bytes]:
        if isinstance(keys, (bytes, str, int)):
            raise TypeError("keys must be a sequence of keys, not a single key")
        return [
            k if type(k) is bytes and 0 < len(k) <= MAX_KEY_BYTES else key_bytes(k) for k in keys
        ]

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
        if self._fixed_ready:
            self._register_regions(bufs)
        return pins

    def _register_regions(self, bufs: Sequence[object]) -> None:
        # aligned_buffer regions are registered on first sight (fixed buffers only).
        fixed = self._fixed
        assert fixed is not None
        last: object = None
        for buf in bufs:
            obj = buf.obj if isinstance(buf, memoryview) else buf
            if obj is not last and isinstance(obj, AlignedBuffer):
                last = obj
                if not fixed.known(obj):
                    fixed.add(obj)

    # -- running batches -------------------------------------------------------------
    async def _run(self, batch: CoreBatch, before: Awaitable[None] | None = None) -> None:
        """Queue ``batch``, submit it with this loop iteration, wait for every status.

        ``before`` runs while the batch waits in the core (a store batch's
        checksums, which release its blocks group by group).
        """
        ring = self._ring_for_call()
        core = self._core
        assert core is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(_batch: CoreBatch) -> None:
            if not fut.done():
                fut.set_result(None)

        core.add(batch, done)
        ring.schedule_flush()
        try:
            if before is not None:
                await before
            await fut
        except BaseException:
            # The caller gave up: blocks not started are dropped, those in
            # flight finish on their own (absent or intact) and keep their
            # buffers until then.
            core.cancel(batch)
            if not ring.closed:
                ring.schedule_flush()
            raise

    async def _put(
        self, keys: Sequence[object], bufs: Sequence[object]
    ) -> tuple[CoreBatch, list[bytes]]:
        self._ring_for_call()
        kbs = self._key_list(keys)
        pins = self._pins(bufs, len(kbs), writable=False)
        self._stats["puts"] += len(kbs)
        offload = self._offload_hashing(len(kbs))
        batch = CoreBatch(core_api.STORE, kbs, pins, ready=0 if offload else None)
        await self._run(batch, self._sum_stores(batch) if offload else None)
        core = self._core
        if not self._noreplace_logged and core is not None and not core.noreplace:
            self._noreplace_logged = True
            log.warning("kvuring: %s rejects RENAME_NOREPLACE; using plain rename",
                        os.fsdecode(self.ns_path.raw))  # fmt: skip
        self._report(batch, kbs)
        return batch, kbs

    async def _get(
        self, keys: Sequence[object], bufs: Sequence[object]
    ) -> tuple[CoreBatch, list[bytes]]:
        self._ring_for_call()
        kbs = self._key_list(keys)
        pins = self._pins(bufs, len(kbs), writable=True)
        self._stats["gets"] += len(kbs)
        batch = CoreBatch(core_api.LOAD, kbs, pins, defer_verify=self._offload_hashing(len(kbs)))
        batch.hold()  # the payload checks below read the buffers after the core is done
        try:
            await self._run(batch)
            if batch.c.unverified:
                await self._verify_loads(batch, kbs)
        finally:
            batch.unhold()
        self._report(batch, kbs)
        return batch, kbs

    # -- checksums on worker threads --------------------------------------------------
    def _offload_hashing(self, n: int) -> bool:
        return self.verify and n > 1 and self.block_size >= HASH_OFFLOAD_MIN

    def _hash_pool_get(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._hash_pool is None:
            self._hash_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._hash_threads, thread_name_prefix="kvuring-hash"
            )
        return self._hash_pool

    def _on_hash_thread(self, batch: CoreBatch, fn: Any, *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` (C, without the GIL) on a hash thread, holding the batch's buffers.

        The hold ends when the thread is done, also if the awaiting task was
        cancelled meanwhile: a running thread cannot be stopped.
        """
        loop = asyncio.get_running_loop()
        batch.hold()
        work = self._hash_pool_get().submit(fn, *args)
        work.add_done_callback(lambda _w: loop.call_soon_threadsafe(batch.unhold))
        return asyncio.wrap_future(work)

    async def _sum_stores(self, batch: CoreBatch) -> None:
        """put_many of big blocks: checksum on the hash threads, and start each
        group of blocks as soon as its sums are in, so hashing overlaps the writes."""
        core = self._core
        assert core is not None
        psums = batch.give_psums()
        n = batch.n
        self._stats["offloaded_checksums"] += n
        size = -(-n // (2 * self._hash_threads))  # about two groups per thread
        groups = [(i, min(i + size, n)) for i in range(0, n, size)]
        addrs = batch.c.addrs
        sums = [
            self._on_hash_thread(
                batch, core_api.checksums, addrs, hi, lo, 1, self.block_size, psums
            )
            for lo, hi in groups
        ]
        ring = self._ring_for_call()
        for (_lo, hi), future in zip(groups, sums):
            await future
            core.set_ready(batch, hi)
            ring.schedule_flush()

    async def _verify_loads(self, batch: CoreBatch, kbs: list[bytes]) -> None:
        """Compare the deferred payload checksums on the hash threads; HIT or CORRUPT (and removed)."""
        todo = int(batch.c.unverified)
        self._stats["offloaded_checksums"] += todo
        k = min(batch.n, self._hash_threads)
        checks = [self._on_hash_thread(batch, core_api.verify, batch, i, k, self.block_size)
                  for i in range(k)]  # fmt: skip
        bad = sum(await asyncio.gather(*checks))
        self._stats["hits"] += todo - bad
        self._stats["bytes_read"] += (todo - bad) * self.block_size
        if bad:
            self._stats["corrupt"] += bad
            batch.c.corrupt += bad
            corrupt = [kb for kb, st in zip(kbs, batch.status) if st == core_api.CORRUPT]
            await self._run(CoreBatch(core_api.DELETE, corrupt, None, quiet=True))

    # -- results -----------------------------------------------------------------------
    def _report(self, batch: CoreBatch, kbs: list[bytes]) -> None:
        """Log what went wrong in a batch (the core counted it): each new errno once, each corrupt block."""
        c = batch.c
        if c.failed or c.corrupt:
            for kb, status, code in zip(kbs, batch.status, batch.error):
                if status == core_api.FAILED and code not in self._failure_logged:
                    self._failure_logged.add(code)
                    log.error("kvuring: block I/O failed: %s (further %s errors are only counted)",
                              self._error(kb, code), errno_name(code))  # fmt: skip
                elif status == core_api.CORRUPT:
                    log.warning("kvuring: corrupt block %s (%s); removing it", self._block_path(kb),
                                core_api.CORRUPT_REASONS.get(code, code))  # fmt: skip
        if c.bounced and not self._bounce_logged:
            self._bounce_logged = True
            log.warning(
                "kvuring: buffer not aligned to %d bytes for O_DIRECT; copying through an aligned "
                "buffer (use kvuring.aligned_buffer to avoid the copy)", self.mem_align,
            )  # fmt: skip

    def _block_path(self, kb: bytes) -> str:
        return os.fsdecode(self.ns_path / block_relpath(kb, self.suffix.encode())[1])

    def _error(self, kb: bytes, code: int) -> OSError:
        return OSError(code, os.strerror(code), self._block_path(kb))

    def _one(self, batch: CoreBatch, kbs: list[bytes]) -> Status:
        if batch.status[0] == core_api.FAILED:
            raise self._error(kbs[0], batch.error[0])
        status: Status = _STATUS_OF[batch.status[0]]
        return status

    # -- the API --------------------------------------------------------------------
    async def put_many(self, keys: Sequence[bytes | int], bufs: Sequence[Buffer]) -> list[Status]:
        """Store blocks; STORED, EXISTS or FAILED per block, in order.

        Each buffer must hold block_size bytes and must not change until this returns.
        """
        batch, _kbs = await self._put(keys, bufs)
        return list(map(_STATUS_OF.__getitem__, batch.status))

    async def get_many(self, keys: Sequence[bytes | int], bufs: Sequence[Buffer]) -> list[Status]:
        """Load blocks into ``bufs``; HIT, MISS, CORRUPT or FAILED per block, in order."""
        batch, _kbs = await self._get(keys, bufs)
        return list(map(_STATUS_OF.__getitem__, batch.status))

    async def put(self, key: bytes | int, buf: Buffer) -> Status:
        """Store one block: STORED or EXISTS; raises OSError (with errno and path) on failure."""
        return self._one(*await self._put([key], [buf]))

    async def get(self, key: bytes | int, buf: Buffer) -> Status:
        """Load one block: HIT, MISS or CORRUPT; raises OSError (with errno and path) on failure."""
        return self._one(*await self._get([key], [buf]))

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
        return await self._presence(core_api.STAT, keys, "contains")

    async def delete_many(self, keys: Sequence[bytes | int]) -> list[bool]:
        """Remove blocks; True where a block was removed, in order."""
        return await self._presence(core_api.DELETE, keys, "deletes")

    async def _presence(self, kind: int, keys: Sequence[object], counter: str) -> list[bool]:
        self._ring_for_call()
        kbs = self._key_list(keys)
        self._stats[counter] += len(kbs)
        batch = CoreBatch(kind, kbs, None)
        await self._run(batch)
        self._report(batch, kbs)
        return [status == core_api.PRESENT for status in batch.status]

    def stats(self) -> dict[str, Any]:
        """Counters and configuration: ops, bytes, hits, misses, corrupt, failures, bounced, engine, direct I/O."""
        out: dict[str, Any] = dict(self._stats)
        core = self._core
        cs = core.stats() if core is not None else {}
        for name in _CORE_COUNTERS:
            out[name] += cs.get(name, 0)
        ring = self._ring
        out.update(
            engine=ring.backend if ring is not None and not ring.closed else None,
            direct_io=self.direct_io,
            direct_io_alignment=self.mem_align if self.direct_io else None,
            verify=self.verify,
            block_size=self.block_size,
            namespace=self.namespace,
            rename_noreplace=core.noreplace if core is not None else True,
            filesystem=self.filesystem,
            load_io_priority="realtime"
            if (core.load_ioprio if core is not None else self._load_ioprio)
            else "default",
            spread_reads=self.spread_reads,
            fixed_buffers_active=self._fixed_ready,
            stores_held_for_loads=cs.get("held", 0),
            retries=cs.get("retries", 0),
        )
        if self._fixed is not None:
            out.update(self._fixed.stats())
        if ring is not None and ring._driver is not None:
            out["ring"] = ring.stats()
        return out


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


class _BytesPath:
    """A byte-string directory path that joins with ``/`` (for error messages)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __truediv__(self, rel: bytes) -> bytes:
        return self.raw + b"/" + rel

    def __fspath__(self) -> bytes:
        return self.raw
