"""BlockStore: batched, atomic, verified KV-block stores and loads, on an asyncio loop.

Each block is one file ``<root>/<namespace>/<hex[0:3]>/<hex[3:5]>/<hex>``
plus a suffix.  The per-block state machine -- paths, trailers, checksums,
each block's linked chains, retries and cleanups -- is the C block core
(kvuring/_csrc/blocks.c); :mod:`kvuring._runner` takes a call from its
arguments to its statuses, for this front end and for the polling one
(:mod:`kvuring.poll`) alike.  This module only binds them to an event loop:
one future per call, resolved when the core reports the batch done.  The
same core runs on the io_uring engine and the thread engine.

Chains (``S`` = CQE_SKIP_SUCCESS, ``L`` = link, ``H`` = hard link, ``A`` = async)::

    store  [openat2 upper O_PATH L·S → mkdirat leaf H·S]      (leaf not known to exist)
           openat2 <final>.<token>.c<seq>.tmp O_CREAT|O_EXCL, no symlinks L·S·A
           → writev payload + trailer L·S → close L·S → renameat RENAME_NOREPLACE
    load   openat2 <final>, no symlinks L·S·A → readv payload + trailer H·S → close
    stat   statx
    delete openat2 leaf O_PATH L·S → unlinkat H → close

With ``fixed_buffers=True`` and registered memory, the readv/writev becomes
two fixed transfers (payload, trailer page).  A soft-linked step that fails
ends its chain, so a rename never follows a failed or short write; a
follow-up chain then closes and unlinks the temp file.  The temp file sits
beside its final name, so publishing is a rename within one directory.
Each open store registers in ``<namespace>/.tmp/`` (see
:mod:`kvuring._writers`), so the next open can remove a dead writer's temp
files without touching a live one's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvuring import _blocks as core_api
from kvuring._frontend import CLOSE_GRACE, StoreFrontEnd
from kvuring._regions import aligned_buffer
from kvuring._runner import HASH_OFFLOAD_MIN, Job
from kvuring._types import Buffer
from kvuring.aio import AsyncRing
from kvuring.status import Status

__all__ = ["HASH_OFFLOAD_MIN", "BlockStore", "Status", "aligned_buffer"]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _grace(deadline: float | None) -> float | None:
    left = _left(deadline)
    return None if left is None else max(left, CLOSE_GRACE)


class BlockStore(StoreFrontEnd):
    """A directory of KV-cache blocks, one file per block, keyed by block hash.

    Open it with ``async with BlockStore(root, block_size) as store`` (or
    ``await store.open()`` / ``await store.close()``) inside a running event
    loop, asyncio or uvloop.  See docs/ for keys, the on-disk format, direct
    I/O, and errors and statuses.
    """

    _how_to_open = "'async with' or await open()"

    def _init_front_end(self) -> None:
        self._ring: AsyncRing | None = None
        self._released = False

    # -- life cycle ----------------------------------------------------------------
    async def open(self) -> BlockStore:
        """Create the directories, probe direct I/O, clean up dead writers' temp files, start the ring."""
        if self.closed:
            raise RuntimeError("BlockStore is closed")
        if self._ring is not None:
            return self
        timeout = self.io_timeout
        # Every filesystem step runs on the namespace's own engine: the loop runs on.
        ns = await self._ns.open_async(timeout)
        try:
            await self._open_more_async(timeout)
            self._ring = await AsyncRing(
                backend=self._engine_name(), queue_depth=self.queue_depth,
                threads=self._engine_threads,
            ).open()  # fmt: skip
            loop = asyncio.get_running_loop()

            def post(fn: Callable[[], None]) -> None:
                loop.call_soon_threadsafe(fn)

            self._start(self._ring.engine, self._ring.driver, kick=self._ring.schedule_flush,
                        post=post)  # fmt: skip
        except BaseException:
            if self._ring is not None:
                self._ring.close_now()
                self._ring = None
            await ns.close_async(timeout)
            raise
        return self

    async def __aenter__(self) -> BlockStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float | None = 5.0) -> None:
        """Finish what is in flight, release the ring, unregister; returns within about ``timeout`` s.

        Stores still held back for loads end FAILED without running.  What
        is still in flight after ``timeout`` seconds ends FAILED
        (ECANCELED); if the kernel still has its I/O (a hung filesystem),
        the ring is let go without waiting and the buffers of those blocks
        stay pinned for the life of the process (the kernel may still write
        them).  A close that was itself cancelled (``asyncio.wait_for``) or
        ran out of time can be called again to finish releasing everything.
        ``None`` waits as long as it takes.
        """
        self.closed = True
        if self._released:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        runner = self._runner
        if runner is not None and not runner.core.closed:
            runner.core.drop_queued_stores()
            runner.core.flush()  # reports the batches that ended
        if self._ring is not None:
            await self._ring.close(_left(deadline))
        keep = self._stop()
        released = True
        for ns in self._namespaces:
            # a namespace whose filesystem hangs: the next close() goes on
            released = await ns.close_async(_grace(deadline), keep) and released
        self._released = released

    # -- running a job -----------------------------------------------------------------
    async def _run(self, start: Callable[[Callable[[Job], None]], Job]) -> Job:
        """Start a job with a done-callback that resolves a future; wait for it."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(_job: Job) -> None:
            if not fut.done():
                fut.set_result(None)

        job = start(done)
        try:
            await fut
        except BaseException:
            if self._runner is not None and not self._released:
                self._runner.cancel(job)
            raise
        return job

    # -- the API --------------------------------------------------------------------
    async def put_many(self, keys: Sequence[bytes | int], bufs: Sequence[Buffer]) -> list[Status]:
        """Store blocks; STORED, EXISTS or FAILED per block, in order.

        Each buffer must hold block_size bytes and must not change until this returns.
        """
        runner = self._runner_for_call()
        return (await self._run(lambda done: runner.put(keys, bufs, done))).statuses()

    async def get_many(self, keys: Sequence[bytes | int], bufs: Sequence[Buffer]) -> list[Status]:
        """Load blocks into ``bufs``; HIT, MISS, CORRUPT or FAILED per block, in order."""
        runner = self._runner_for_call()
        return (await self._run(lambda done: runner.get(keys, bufs, done))).statuses()

    async def put_rows(
        self, keys: Sequence[bytes | int], region: Buffer, rows: Sequence[int] | Buffer, *,
        row_bytes: int | None = None,
    ) -> list[Status]:  # fmt: skip
        """put_many of blocks that are rows of one region: block ``keys[i]`` is row ``rows[i]``.

        The region is pinned once and each row's address computed in C, so
        a batch costs almost no Python per block.  Rows are ``row_bytes``
        apart (default: a 2-D region's ``strides[0]``, else ``block_size``);
        ``rows`` may be a list or an int64 array (numpy).
        """
        runner = self._runner_for_call()
        job = await self._run(
            lambda done: runner.put_rows(keys, region, rows, done, row_bytes=row_bytes)
        )
        return job.statuses()

    async def get_rows(
        self, keys: Sequence[bytes | int], region: Buffer, rows: Sequence[int] | Buffer, *,
        row_bytes: int | None = None,
    ) -> list[Status]:  # fmt: skip
        """get_many into rows of one region (as :meth:`put_rows`)."""
        runner = self._runner_for_call()
        job = await self._run(
            lambda done: runner.get_rows(keys, region, rows, done, row_bytes=row_bytes)
        )
        return job.statuses()

    async def put(self, key: bytes | int, buf: Buffer) -> Status:
        """Store one block: STORED or EXISTS; raises OSError (with errno and path) on failure."""
        runner = self._runner_for_call()
        return runner.one(await self._run(lambda done: runner.put([key], [buf], done)))

    async def get(self, key: bytes | int, buf: Buffer) -> Status:
        """Load one block: HIT, MISS or CORRUPT; raises OSError (with errno and path) on failure."""
        runner = self._runner_for_call()
        return runner.one(await self._run(lambda done: runner.get([key], [buf], done)))

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
        runner = self._runner_for_call()
        job = await self._run(lambda done: runner.presence(core_api.STAT, keys, done))
        return job.statuses()

    async def delete_many(self, keys: Sequence[bytes | int]) -> list[bool]:
        """Remove blocks; True where a block was removed, in order."""
        runner = self._runner_for_call()
        job = await self._run(lambda done: runner.presence(core_api.DELETE, keys, done))
        return job.statuses()

    def stats(self) -> dict[str, Any]:
        """Counters and configuration: ops, bytes, hits, misses, corrupt, failures, bounced, engine, direct I/O."""
        ring = self._ring
        live = ring is not None and ring._driver is not None and not ring._driver.closed
        out = self._stats(ring.backend if live and ring is not None else None)
        if ring is not None and ring._driver is not None:
            out["ring"] = ring.stats()
        return out
