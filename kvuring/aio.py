"""The asyncio adapter: io_uring operations as awaitables, on any asyncio loop.

* Completions wake the loop through the engine's eventfd and
  ``loop.add_reader``; the CQ is drained every time it fires.
* Everything prepared during one loop iteration goes to the kernel in one
  submit (a flush scheduled with ``call_soon``).
* A buffer, path and future stay referenced by their unit until the last
  completion arrives, also when the awaiting task was cancelled; cancelling
  sends an io_uring cancel and the operation still finishes cleanly.
* At most ``queue_depth`` units are in flight; later ones wait their turn.
* Errors are ``OSError`` with errno, strerror and path; ``-EAGAIN`` and
  ``-EINTR`` completions are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvuring import _binding as b
from kvuring._driver import Driver, Unit
from kvuring._types import Buffer
from kvuring.engine import Engine, open_engine

RETRY_ERRNOS = frozenset((errno.EAGAIN, errno.EINTR))
MAX_RETRIES = 16

PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def fs_path(path: PathArg) -> bytes:
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError("path contains a NUL byte")
    return raw


@dataclass(frozen=True)
class StatxResult:
    """The statx fields kvuring reports."""

    mode: int
    size: int
    ino: int
    nlink: int
    mtime: float
    dio_mem_align: int
    dio_offset_align: int


class _Single(Unit):
    """One operation awaited by one future; everything it points at is kept in ``refs``."""

    __slots__ = ("fields", "fut", "path", "path2", "pins", "refs", "res", "retries")

    def __init__(
        self,
        fut: asyncio.Future[int],
        fields: tuple[int, ...],
        refs: tuple[object, ...],
        path: object = None,
        path2: object = None,
        pins: tuple[Any, ...] = (),
    ) -> None:
        super().__init__()
        self.fut = fut
        self.fields = fields
        self.refs = refs
        self.pins = pins
        self.path = path
        self.path2 = path2
        self.res = 0
        self.retries = 0

    def begin(self, slot: int) -> None:
        self.op(*self.fields)

    def on_cqe(self, step: int, res: int) -> None:
        self.res = res

    def end_chain(self, slot: int) -> None:
        res = self.res
        if res < 0 and -res in RETRY_ERRNOS and not self.cancelled and self.retries < MAX_RETRIES:
            self.retries += 1
            self.op(*self.fields)
            return
        self._release()
        if self.fut.done():
            return
        if res < 0:
            self.fut.set_exception(b.os_error(res, self.path, self.path2))
        else:
            self.fut.set_result(res)

    def _release(self) -> None:
        # The kernel is done with the memory: give the buffer exports back now
        # instead of when the pins are collected.  A pin of a memoryview that
        # ends up in a reference cycle (an exception's traceback holds the
        # frames that hold it) crashes CPython < 3.12.7's GC (gh-77894:
        # memoryview tp_clear with a live export); a released pin cannot.
        # It also lets the caller close an mmap right after the await.
        for pin in self.pins:
            b.ffi.release(pin)
        self.pins = ()
        self.refs = ()

    def aborted(self, exc: BaseException) -> None:
        self._release()
        if not self.fut.done():
            self.fut.set_exception(exc)


class AsyncRing:
    """Awaitable file operations on one engine, bound to one event loop.

    Create it inside a running loop (``async with AsyncRing() as ring``); the
    engine (io_uring or threads) is chosen by ``backend`` or ``KVURING_BACKEND``.
    """

    def __init__(
        self,
        *,
        backend: str | None = None,
        queue_depth: int = 256,
        engine: Engine | None = None,
        threads: int = 16,
    ) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        self._backend = backend
        self._queue_depth = queue_depth
        self._engine = engine
        self._threads = threads
        self._driver: Driver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._idle: asyncio.Event | None = None
        # One timer for the block core's earliest deadline, so a block whose
        # completion never comes still ends on time.
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- life cycle --------------------------------------------------------------
    async def open(self) -> AsyncRing:
        # Checked first: a closed ring still has its driver, and reopening
        # it must fail rather than hand back a ring that refuses all work.
        if self.closed:
            raise RuntimeError("AsyncRing is closed")
        if self._driver is not None:
            return self
        self._loop = asyncio.get_running_loop()
        engine = self._engine or open_engine(
            self._backend, slots=self._queue_depth, threads=self._threads
        )
        self._driver = Driver(engine)
        self._loop.add_reader(engine.fileno(), self._on_ready)
        return self

    async def __aenter__(self) -> AsyncRing:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float | None = None) -> bool:
        """Wait for every in-flight operation, then release the engine; idempotent.

        With ``timeout`` (seconds), what is still in flight then is aborted
        (the block core's blocks end FAILED) and the engine is let go even
        if the kernel still has work (a hung filesystem).  Returns whether
        everything came back.
        """
        driver = self._driver
        if driver is None or driver.closed:
            self.closed = True
            return True
        self.closed = True
        if driver.engine.owner_pid != os.getpid():
            driver.close()
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        # A close cut short (its task cancelled) leaves the driver open: the
        # next close() carries on from here.
        while driver.busy():
            self._idle = asyncio.Event()
            driver.on_idle = self._idle.set
            self._flush()
            if not driver.busy():
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), left)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self._loop is not None
        self._loop.remove_reader(driver.engine.fileno())
        return driver.close(deadline=None if deadline is None else time.monotonic())

    def close_now(self) -> None:
        """Close without awaiting: blocks until in-flight operations finish."""
        if self._driver is None or self._driver.closed:
            self.closed = True
            return
        self.closed = True
        if self._loop is not None and self._driver.engine.owner_pid == os.getpid():
            self._loop.remove_reader(self._driver.engine.fileno())
        self._driver.close()

    @property
    def driver(self) -> Driver:
        if self._driver is None:
            raise RuntimeError("AsyncRing is not open; use 'async with' or await open()")
        return self._driver

    @property
    def engine(self) -> Engine:
        return self.driver.engine

    @property
    def backend(self) -> str:
        """The engine in use: ``"uring"`` or ``"threads"``."""
        return self.engine.name

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), **self.driver.stats()}

    # -- the loop side -----------------------------------------------------------
    def start(self, unit: Unit) -> None:
        """Start a unit; its SQEs go out with this loop iteration's submit."""
        if self.closed:
            raise RuntimeError("AsyncRing is closed")
        self.driver.engine.check_owner()
        self.driver.start(unit)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def start_many(self, units: Sequence[Unit]) -> None:
        """Start several units; one ownership check and one scheduled flush for all."""
        if self.closed:
            raise RuntimeError("AsyncRing is closed")
        driver = self.driver
        driver.engine.check_owner()
        start = driver.start
        for unit in units:
            start(unit)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def schedule_flush(self) -> None:
        """Submit with this loop iteration's flush (for work the block core queued)."""
        if self.closed:
            raise RuntimeError("AsyncRing is closed")
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def cancel(self, unit: Unit) -> None:
        self.driver.cancel(unit)
        if not self._flush_scheduled and self._loop is not None and not self.driver.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        driver = self._driver
        if driver is None or driver.closed:
            return
        driver.flush()
        if self._timer is None and driver.core is not None and driver.core.timeout:
            self._arm_timer(driver)

    def _on_ready(self) -> None:
        driver = self._driver
        if driver is None or driver.closed:
            return
        driver.process()
        # Units that a completion freed a ticket for, or follow-up chains:
        # submit them now rather than one more loop turn later.
        driver.flush()
        if self._timer is None and driver.core is not None and driver.core.timeout:
            self._arm_timer(driver)

    def _arm_timer(self, driver: Driver) -> None:
        """A wake-up at the core's earliest deadline (one timer; deadlines only move later)."""
        assert driver.core is not None and self._loop is not None
        delay = driver.core.next_deadline()
        if delay is not None:
            self._timer = self._loop.call_later(delay + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._on_ready()

    # -- awaitable operations ------------------------------------------------------
    async def _run(
        self,
        fields: tuple[int, ...],
        refs: tuple[object, ...] = (),
        path: object = None,
        path2: object = None,
        pins: tuple[Any, ...] = (),
    ) -> int:
        assert self._loop is not None or self._driver is None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        unit = _Single(fut, fields, refs, path, path2, pins)
        self.start(unit)
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(unit)
            raise

    async def nop(self) -> int:
        return await self._run((b.OP_NOP, 0))

    async def openat(
        self,
        path: PathArg,
        flags: int = os.O_RDONLY,
        mode: int = 0o644,
        *,
        dir_fd: int | None = None,
    ) -> int:
        """Open ``path``; returns a plain file descriptor (close it with :meth:`close_fd`)."""
        cpath = b.c_path(fs_path(path))
        dfd = b.AT_FDCWD if dir_fd is None else dir_fd
        fields = (b.OP_OPENAT, 0, dfd, b.address_of(cpath), 0, 0, flags | os.O_CLOEXEC, mode, 0)
        return await self._run(fields, (cpath,), path)

    async def close_fd(self, fd: int) -> None:
        await self._run((b.OP_CLOSE, 0, fd))

    async def read(self, fd: int, buf: Buffer, offset: int = 0) -> int:
        """Read into ``buf`` (writable, any buffer) at ``offset``; returns bytes read."""
        pinned = b.pin_buffer(buf, writable=True)
        fields = (b.OP_READ, 0, fd, b.address_of(pinned), len(pinned), offset)
        return await self._run(fields, (pinned, buf), pins=(pinned,))

    async def write(self, fd: int, buf: Buffer, offset: int = 0) -> int:
        """Write ``buf`` at ``offset``; returns bytes written."""
        pinned = b.pin_buffer(buf, writable=False)
        fields = (b.OP_WRITE, 0, fd, b.address_of(pinned), len(pinned), offset)
        return await self._run(fields, (pinned, buf), pins=(pinned,))

    async def fsync(self, fd: int, *, datasync: bool = False) -> None:
        await self._run((b.OP_FSYNC, 0, fd, 0, 0, 0, b.FSYNC_DATASYNC if datasync else 0))

    async def renameat(
        self,
        old: PathArg,
        new: PathArg,
        *,
        noreplace: bool = False,
        src_dir_fd: int | None = None,
        dst_dir_fd: int | None = None,
    ) -> None:
        """Rename ``old`` to ``new``; ``noreplace`` fails with FileExistsError if ``new`` exists."""
        cold, cnew = b.c_path(fs_path(old)), b.c_path(fs_path(new))
        fields = (
            b.OP_RENAMEAT, 0,
            b.AT_FDCWD if src_dir_fd is None else src_dir_fd,
            b.address_of(cold), 0, 0,
            b.RENAME_NOREPLACE if noreplace else 0,
            (b.AT_FDCWD if dst_dir_fd is None else dst_dir_fd) & 0xFFFFFFFFFFFFFFFF,
            b.address_of(cnew),
        )  # fmt: skip
        await self._run(fields, (cold, cnew), old, new)

    async def unlinkat(
        self, path: PathArg, *, rmdir: bool = False, dir_fd: int | None = None
    ) -> None:
        cpath = b.c_path(fs_path(path))
        dfd = b.AT_FDCWD if dir_fd is None else dir_fd
        fields = (b.OP_UNLINKAT, 0, dfd, b.address_of(cpath), 0, 0, b.AT_REMOVEDIR if rmdir else 0)
        await self._run(fields, (cpath,), path)

    async def mkdirat(self, path: PathArg, mode: int = 0o755, *, dir_fd: int | None = None) -> None:
        cpath = b.c_path(fs_path(path))
        dfd = b.AT_FDCWD if dir_fd is None else dir_fd
        await self._run((b.OP_MKDIRAT, 0, dfd, b.address_of(cpath), 0, 0, 0, mode), (cpath,), path)

    async def statx(
        self, path: PathArg, *, follow_symlinks: bool = True, dir_fd: int | None = None
    ) -> StatxResult:
        cpath = b.c_path(fs_path(path))
        buf = b.ffi.new("struct statx *")
        dfd = b.AT_FDCWD if dir_fd is None else dir_fd
        fields = (
            b.OP_STATX, 0, dfd, b.address_of(cpath), 0, 0,
            0 if follow_symlinks else b.AT_SYMLINK_NOFOLLOW,
            b.STATX_BASIC_STATS | b.STATX_DIOALIGN,
            b.address_of(buf),
        )  # fmt: skip
        await self._run(fields, (cpath, buf), path)
        dio = bool(buf.stx_mask & b.STATX_DIOALIGN)
        return StatxResult(
            mode=buf.stx_mode,
            size=buf.stx_size,
            ino=buf.stx_ino,
            nlink=buf.stx_nlink,
            mtime=buf.stx_mtime.tv_sec + buf.stx_mtime.tv_nsec / 1e9,
            dio_mem_align=buf.stx_dio_mem_align if dio else 0,
            dio_offset_align=buf.stx_dio_offset_align if dio else 0,
        )
