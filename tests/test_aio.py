"""The asyncio adapter (AsyncRing) on both loops and both engines.

Every test here runs four times: {asyncio, uvloop} x {uring, threads} (see
conftest.py).  Covered: each awaitable operation and its errors, cancellation
while operations are in flight, closing with work in flight, fork, bounded
in-flight work with 10,000+ operations, batching (io_uring really used),
EAGAIN retries, and the backend choice.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import mmap
import os
import stat
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from kvuring import _binding as b
from kvuring._driver import Unit
from kvuring.aio import MAX_RETRIES, AsyncRing

pytestmark = pytest.mark.asyncio

BIG = 1 << 20  # an fd number no test has open


class Buf(bytearray):
    """A bytearray that supports weak references, to watch when a buffer is released."""


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


def settled(ring: AsyncRing) -> bool:
    stats = ring.stats()
    return bool(stats["in_flight"] == 0 and stats["waiting"] == 0)


def assert_accounted(ring: AsyncRing) -> None:
    """Every SQE got exactly one CQE and each reached its unit (no SKIP flags in AsyncRing)."""
    stats = ring.stats()
    assert stats["in_flight"] == 0, stats
    assert stats["stray_cqes"] == 0, stats
    assert stats["sqes_submitted"] == stats["cqes_reaped"], stats


# --------------------------------------------------------------------------
# the backend choice
# --------------------------------------------------------------------------


async def test_backend_is_visible(ring: AsyncRing, backend: str) -> None:
    assert ring.backend == backend
    assert ring.engine.name == backend
    assert ring.stats()["engine"] == backend


async def test_env_var_chooses_backend(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The backend fixture exported KVURING_BACKEND; no argument means "use it".
    async with AsyncRing() as ring:
        assert ring.backend == backend
    monkeypatch.setenv("KVURING_BACKEND", "io_uring")
    with pytest.raises(ValueError, match="backend must be one of"):
        await AsyncRing().open()
    with pytest.raises(ValueError, match="backend must be one of"):
        await AsyncRing(backend="fast").open()
    with pytest.raises(ValueError, match="queue_depth"):
        AsyncRing(queue_depth=0)


async def test_loop_under_test(loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop) == (loop_name == "uvloop")


# --------------------------------------------------------------------------
# each operation
# --------------------------------------------------------------------------


async def test_nop(ring: AsyncRing) -> None:
    assert await ring.nop() == 0
    assert_accounted(ring)


async def test_file_operations(ring: AsyncRing, tmp_path: Path) -> None:
    folder = tmp_path / "dir"
    await ring.mkdirat(folder, 0o750)
    assert stat.S_ISDIR((await ring.statx(folder)).mode)

    path = folder / "file"
    payload = os.urandom(3 * 4096 + 17)
    fd = await ring.openat(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert not os.get_inheritable(fd)  # openat adds O_CLOEXEC
        assert await ring.write(fd, payload) == len(payload)
        assert await ring.write(fd, memoryview(b"--tail")[2:], len(payload)) == 4
        await ring.fsync(fd)
        await ring.fsync(fd, datasync=True)
    finally:
        await ring.close_fd(fd)
    with pytest.raises(OSError) as info:
        os.fstat(fd)  # close_fd really closed it
    assert info.value.errno == errno.EBADF

    st, os_st = await ring.statx(path), os.stat(path)
    assert st.size == os_st.st_size == len(payload) + 4
    assert (st.ino, st.mode, st.nlink) == (os_st.st_ino, os_st.st_mode, 1)
    assert stat.S_IMODE(st.mode) == 0o600
    assert abs(st.mtime - os_st.st_mtime) < 1e-3

    fd = await ring.openat(str(path))
    try:
        buf = bytearray(len(payload) + 100)
        n = await ring.read(fd, buf)
        assert bytes(buf[:n]) == payload + b"tail"
        window = memoryview(buf)[10:20]
        assert await ring.read(fd, window, 5) == 10
        assert bytes(window) == payload[5:15]
        assert await ring.read(fd, bytearray(10), 10**9) == 0  # past the end
    finally:
        await ring.close_fd(fd)

    renamed = folder / "renamed"
    await ring.renameat(os.fsencode(path), renamed)
    assert not path.exists()
    assert renamed.read_bytes() == payload + b"tail"
    await ring.renameat(renamed, folder / "again", noreplace=True)
    await ring.unlinkat(folder / "again")
    await ring.unlinkat(folder, rmdir=True)
    assert not folder.exists()
    assert_accounted(ring)


async def test_dir_fd_operations(ring: AsyncRing, tmp_path: Path) -> None:
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        await ring.mkdirat("sub", dir_fd=dfd)
        fd = await ring.openat("sub/f", os.O_WRONLY | os.O_CREAT, dir_fd=dfd)
        assert await ring.write(fd, b"abc") == 3
        await ring.close_fd(fd)
        assert (await ring.statx("sub/f", dir_fd=dfd)).size == 3
        await ring.renameat("sub/f", "g", src_dir_fd=dfd, dst_dir_fd=dfd)
        assert (tmp_path / "g").read_bytes() == b"abc"
        await ring.unlinkat("g", dir_fd=dfd)
        await ring.unlinkat("sub", rmdir=True, dir_fd=dfd)
        assert list(tmp_path.iterdir()) == []
    finally:
        os.close(dfd)


async def test_statx_symlinks(ring: AsyncRing, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"x" * 10)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert stat.S_ISLNK((await ring.statx(link, follow_symlinks=False)).mode)
    followed = await ring.statx(link)
    assert stat.S_ISREG(followed.mode)
    assert followed.size == 10


async def test_direct_io(ring: AsyncRing, tmp_path: Path) -> None:
    path = tmp_path / "direct"
    data = os.urandom(BIG)
    path.write_bytes(data)
    try:
        fd = await ring.openat(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            pytest.skip(f"{tmp_path} does not support O_DIRECT")
        raise
    try:
        st = await ring.statx(path)
        if st.dio_mem_align:
            assert st.dio_mem_align <= mmap.PAGESIZE
        region = mmap.mmap(-1, BIG)  # page aligned, as O_DIRECT needs
        assert await ring.read(fd, region, 0) == BIG
        assert region[:] == data
        # A misaligned buffer is refused by the kernel: EINVAL, not a crash.
        with pytest.raises(OSError) as info:
            await ring.read(fd, memoryview(region)[1:4097], 0)
        assert info.value.errno == errno.EINVAL
    finally:
        await ring.close_fd(fd)


async def test_errors_carry_errno_and_path(ring: AsyncRing, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    existing = tmp_path / "existing"
    existing.write_bytes(b"x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "child").write_bytes(b"")
    new = tmp_path / "new"

    Case = tuple[Callable[[], Coroutine[Any, Any, object]], type[OSError], int, object, object]
    cases: list[Case] = [
        (lambda: ring.openat(missing), FileNotFoundError, errno.ENOENT, missing, None),
        (lambda: ring.openat(str(missing)), FileNotFoundError, errno.ENOENT, str(missing), None),
        (lambda: ring.openat(bytes(missing)), FileNotFoundError, errno.ENOENT, bytes(missing),
         None),
        (lambda: ring.openat(full, os.O_WRONLY), IsADirectoryError, errno.EISDIR, full, None),
        (lambda: ring.openat(existing, os.O_WRONLY | os.O_CREAT | os.O_EXCL), FileExistsError,
         errno.EEXIST, existing, None),
        (lambda: ring.openat(existing / "x"), NotADirectoryError, errno.ENOTDIR,
         existing / "x", None),
        (lambda: ring.mkdirat(existing), FileExistsError, errno.EEXIST, existing, None),
        (lambda: ring.mkdirat(missing / "a"), FileNotFoundError, errno.ENOENT, missing / "a",
         None),
        (lambda: ring.unlinkat(missing), FileNotFoundError, errno.ENOENT, missing, None),
        (lambda: ring.unlinkat(full), IsADirectoryError, errno.EISDIR, full, None),
        (lambda: ring.unlinkat(full, rmdir=True), OSError, errno.ENOTEMPTY, full, None),
        (lambda: ring.unlinkat(existing, rmdir=True), NotADirectoryError, errno.ENOTDIR,
         existing, None),
        (lambda: ring.statx(missing), FileNotFoundError, errno.ENOENT, missing, None),
        (lambda: ring.renameat(missing, new), FileNotFoundError, errno.ENOENT, missing, new),
        (lambda: ring.renameat(full / "child", existing, noreplace=True), FileExistsError,
         errno.EEXIST, full / "child", existing),
        (lambda: ring.read(BIG, bytearray(8)), OSError, errno.EBADF, None, None),
        (lambda: ring.write(BIG, b"x"), OSError, errno.EBADF, None, None),
        (lambda: ring.fsync(BIG), OSError, errno.EBADF, None, None),
        (lambda: ring.close_fd(BIG), OSError, errno.EBADF, None, None),
    ]  # fmt: skip
    for make, exc_type, err, filename, filename2 in cases:
        with pytest.raises(exc_type) as info:
            await make()
        exc = info.value
        assert type(exc) is exc_type, (exc, exc_type)
        assert (exc.errno, exc.strerror) == (err, os.strerror(err)), exc
        assert exc.filename == filename, exc
        assert exc.filename2 == filename2, exc

    read_only = os.open(existing, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            await ring.write(read_only, b"nope")
        assert info.value.errno == errno.EBADF
    finally:
        os.close(read_only)
    # Bad arguments fail before anything is submitted.
    with pytest.raises(ValueError, match="NUL"):
        await ring.openat(str(tmp_path) + "/a\0b")
    with pytest.raises(BufferError):
        await ring.read(0, b"read-only buffer")
    assert existing.read_bytes() == b"x"
    assert_accounted(ring)


async def test_buffer_exports_end_with_the_operation(ring: AsyncRing, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"z" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        region = mmap.mmap(-1, 8192)
        assert await ring.read(fd, region) == 8192
        assert await ring.write(fd, region, 8192) == 8192
        region.close()  # nothing of kvuring still exports the mmap
        region = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as info:
            await ring.read(BIG, region)
        # The traceback still holds the frames that pinned the buffer; the
        # pin was released when the operation completed all the same.
        assert info.value.__traceback__ is not None
        region.close()
    finally:
        os.close(fd)


GC_CYCLE_SCRIPT = """
import asyncio, gc, mmap, sys
import uvloop
from kvuring.aio import AsyncRing

async def main() -> None:
    async with AsyncRing(backend=sys.argv[1]) as ring:
        region = mmap.mmap(-1, 8192)
        for _ in range(3):
            try:
                await ring.read(1 << 20, memoryview(region)[1:100])
            except OSError as exc:
                holder: list[object] = [exc]
                holder.append(holder)  # a cycle through the exception's traceback
    gc.collect()

loop = uvloop.new_event_loop() if sys.argv[2] == "uvloop" else asyncio.new_event_loop()
loop.run_until_complete(main())
loop.close()
gc.collect()
print("survived")
"""


async def test_pinned_memoryview_in_a_gc_cycle(backend: str, loop_name: str) -> None:
    # A cffi pin of a memoryview inside a garbage cycle crashed the GC of
    # CPython < 3.12.7 (gh-77894); run it in a child so a crash is a failure.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GC_CYCLE_SCRIPT, backend, loop_name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode(errors="replace")
    assert out.strip().endswith(b"survived")


async def test_use_before_open_and_after_close(backend: str) -> None:
    ring = AsyncRing(backend=backend)
    with pytest.raises(RuntimeError, match="not open"):
        ring.stats()
    await ring.open()
    assert await ring.nop() == 0
    await ring.close()
    await ring.close()  # idempotent
    assert ring.closed
    with pytest.raises(RuntimeError, match="closed"):
        await ring.nop()
    with pytest.raises(RuntimeError, match="closed"):
        await ring.open()


# --------------------------------------------------------------------------
# many operations, bounded in-flight work, batching
# --------------------------------------------------------------------------


async def test_twelve_thousand_concurrent_operations(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "small"
    data = os.urandom(4096 * 64)
    path.write_bytes(data)
    depth = 256
    count = 12_000
    async with AsyncRing(backend=backend, queue_depth=depth) as ring:
        fd = await ring.openat(path)
        peak = 0
        dispatch = ring.driver.dispatch

        def watching_dispatch(completions: Any) -> None:
            nonlocal peak
            peak = max(peak, ring.driver.in_flight)
            dispatch(completions)

        ring.driver.dispatch = watching_dispatch  # type: ignore[method-assign]

        async def small_read(i: int) -> bool:
            buf = bytearray(512)
            offset = (i % 64) * 4096 + (i % 7) * 512
            n = await ring.read(fd, buf, offset)
            return n == 512 and buf == data[offset : offset + 512]

        started = ring.stats()["units_started"]
        tasks = [
            asyncio.ensure_future(ring.nop() if i % 2 else small_read(i)) for i in range(count)
        ]
        await asyncio.sleep(0)
        # Most operations wait their turn behind the queue depth.
        assert ring.stats()["waiting"] > count // 2
        assert ring.stats()["in_flight"] == depth
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert results == [0 if i % 2 else True for i in range(count)]
        assert 0 < peak <= depth
        assert ring.stats()["units_started"] - started == count
        await ring.close_fd(fd)
        assert_accounted(ring)


async def test_io_uring_is_really_used(backend: str) -> None:
    ops = 12_000
    async with AsyncRing(backend=backend, queue_depth=256) as ring:
        before = ring.stats()
        assert await asyncio.gather(*(ring.nop() for _ in range(ops))) == [0] * ops
        after = ring.stats()
        submitted = after["sqes_submitted"] - before["sqes_submitted"]
        enters = after["enter_calls"] - before["enter_calls"]
        assert submitted == ops
        if backend == "threads":
            assert isinstance(ring.engine, type(ring.engine)) and ring.backend == "threads"
            assert enters == 0
            return
        # A real io_uring instance did the work, in batches.
        ring_fd = ring.engine._ring.ring_fd  # type: ignore[attr-defined]
        assert os.readlink(f"/proc/self/fd/{ring_fd}") == "anon_inode:[io_uring]"
        fdinfo = Path(f"/proc/self/fdinfo/{ring_fd}").read_text()
        cq_tail = int(fdinfo.split("CqTail:")[1].split()[0])
        assert cq_tail >= ops
        assert enters < ops / 4, after


async def test_queue_depth_one(backend: str) -> None:
    async with AsyncRing(backend=backend, queue_depth=1) as ring:
        assert await asyncio.gather(*(ring.nop() for _ in range(200))) == [0] * 200
        assert_accounted(ring)


# --------------------------------------------------------------------------
# cancellation
# --------------------------------------------------------------------------


async def test_cancel_blocked_read_keeps_buffer_until_completion(
    ring: AsyncRing, backend: str
) -> None:
    read_end, write_end = os.pipe()
    try:
        buf = Buf(64)
        released = weakref.ref(buf)
        task = asyncio.ensure_future(ring.read(read_end, buf))
        del buf
        await wait_until(lambda: ring.stats()["sqes_submitted"] >= 1)
        await asyncio.sleep(0.02)  # let it block in the kernel or the worker
        assert not task.done()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            pytest.fail("the read was not cancelled")
        del task  # its exception's traceback holds the frames that held the buffer
        gc.collect()
        if backend == "uring":
            # The kernel cancels the read; its CQE finishes the unit, which
            # only then lets the buffer go.  The data written later is still
            # in the pipe: the read really was cancelled.
            await wait_until(lambda: ring.stats()["in_flight"] == 0)
            gc.collect()
            assert released() is None
            os.write(write_end, b"late")
            assert os.read(read_end, 4) == b"late"
        else:
            # A worker thread sits in read(2) on that buffer: the unit must keep it.
            await asyncio.sleep(0.05)
            assert ring.stats()["in_flight"] == 1
            assert released() is not None
            os.write(write_end, b"late")
            await wait_until(lambda: ring.stats()["in_flight"] == 0)
            gc.collect()
            assert released() is None
        assert_accounted(ring)
        assert await ring.nop() == 0
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_cancel_many_reads(backend: str, tmp_path: Path) -> None:
    block = 64 * 1024
    blocks = 128
    path = tmp_path / "big"
    data = os.urandom(block * blocks)
    path.write_bytes(data)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)  # reads that really take device time
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    count = 600
    try:
        async with AsyncRing(backend=backend, queue_depth=32) as ring:

            async def reader(i: int) -> bytes:
                buf = mmap.mmap(-1, block)  # aligned for O_DIRECT
                n = await ring.read(fd, buf, (i % blocks) * block)
                assert n == block
                return buf[:]

            tasks = [asyncio.ensure_future(reader(i)) for i in range(count)]
            for _ in range(3):
                await asyncio.sleep(0)
            assert ring.stats()["in_flight"] <= 32
            for i, task in enumerate(tasks):
                if i % 3:
                    task.cancel()
            await asyncio.sleep(0)  # the tasks see their CancelledError
            # Units still in flight keep their buffers after the cancel.
            for unit in ring.driver._units:
                if unit is not None:
                    assert unit.refs, "a cancelled unit dropped its buffer early"  # type: ignore[attr-defined]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled = 0
            for i, result in enumerate(results):
                if isinstance(result, asyncio.CancelledError):
                    assert i % 3, "a task nobody cancelled was cancelled"
                    cancelled += 1
                    continue
                assert not isinstance(result, BaseException), result
                offset = (i % blocks) * block
                assert result == data[offset : offset + block], f"read {i} corrupted"
            assert cancelled > count // 3
            await wait_until(lambda: settled(ring))
            assert_accounted(ring)
            # Queued units that were cancelled never started.
            assert ring.stats()["units_started"] < count
            # The ring is healthy afterwards.
            again = await asyncio.gather(*(reader(i) for i in range(64)))
            assert all(again[i] == data[i * block : (i + 1) * block] for i in range(64))
    finally:
        os.close(fd)


async def test_cancel_queued_operation_never_runs(backend: str, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    target = tmp_path / "never"
    try:
        async with AsyncRing(backend=backend, queue_depth=1) as ring:
            blocked = asyncio.ensure_future(ring.read(read_end, bytearray(8)))
            queued = asyncio.ensure_future(ring.mkdirat(target))
            await wait_until(lambda: ring.stats()["waiting"] == 1)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            os.write(write_end, b"go")
            assert await blocked == 2
            await wait_until(lambda: settled(ring))
            assert ring.stats()["units_started"] == 1
            assert not target.exists()
            assert_accounted(ring)
    finally:
        os.close(read_end)
        os.close(write_end)


# --------------------------------------------------------------------------
# EAGAIN retries
#
# A read from an empty O_NONBLOCK pipe gives EAGAIN on the thread engine.
# io_uring (6.18) does not: it polls the pipe and completes the read when
# data arrives, so there is no EAGAIN to retry on that engine.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["threads"], indirect=True)
async def test_eagain_is_retried_then_reported(ring: AsyncRing) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        before = ring.stats()["sqes_submitted"]
        with pytest.raises(BlockingIOError) as info:
            await ring.read(read_end, bytearray(8))
        assert info.value.errno == errno.EAGAIN
        # The first attempt and MAX_RETRIES more, then the error.
        assert ring.stats()["sqes_submitted"] - before == 1 + MAX_RETRIES
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("backend", ["threads"], indirect=True)
async def test_eagain_retry_succeeds(ring: AsyncRing, monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    driver = ring.driver
    original = driver.dispatch
    seen: list[int] = []

    def dispatch(completions: Any) -> None:
        _, results = completions
        seen.extend(results)
        original(completions)
        if -errno.EAGAIN in results:
            # The data arrives between the failed attempt and its retry.
            os.write(write_end, b"retry")

    monkeypatch.setattr(driver, "dispatch", dispatch)
    try:
        before = ring.stats()["sqes_submitted"]
        buf = bytearray(8)
        assert await ring.read(read_end, buf) == 5
        assert bytes(buf[:5]) == b"retry"
        assert seen == [-errno.EAGAIN, 5]
        assert ring.stats()["sqes_submitted"] - before == 2
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("backend", ["uring"], indirect=True)
async def test_nonblocking_pipe_read_waits_on_io_uring(ring: AsyncRing) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        buf = bytearray(8)
        task = asyncio.ensure_future(ring.read(read_end, buf))
        await asyncio.sleep(0.05)
        assert not task.done()
        assert ring.stats()["sqes_submitted"] == 1  # one attempt, no retries
        os.write(write_end, b"data")
        assert await asyncio.wait_for(task, 5) == 4
        assert bytes(buf[:4]) == b"data"
    finally:
        os.close(read_end)
        os.close(write_end)


# --------------------------------------------------------------------------
# closing with work in flight
# --------------------------------------------------------------------------


async def test_close_drains_in_flight(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "data"
    data = os.urandom(100 * 4096)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    read_end, write_end = os.pipe()
    try:
        ring = AsyncRing(backend=backend, queue_depth=8)
        await ring.open()
        buffers = [bytearray(4096) for _ in range(100)]
        reads = [
            asyncio.ensure_future(ring.read(fd, buf, i * 4096)) for i, buf in enumerate(buffers)
        ]
        pipe_buf = bytearray(16)
        pipe_read = asyncio.ensure_future(ring.read(read_end, pipe_buf))
        await asyncio.sleep(0)  # every task has started its operation
        assert ring.stats()["waiting"] > 0
        asyncio.get_running_loop().call_later(0.1, os.write, write_end, b"wake")
        await asyncio.wait_for(ring.close(), 10)
        assert ring.closed
        # Every operation finished and delivered its result.
        assert all(task.done() for task in [*reads, pipe_read])
        assert [task.result() for task in reads] == [4096] * 100
        assert b"".join(buffers) == data
        assert pipe_read.result() == 4
        assert bytes(pipe_buf[:4]) == b"wake"
        assert_accounted(ring)
        with pytest.raises(RuntimeError, match="closed"):
            await ring.nop()
    finally:
        os.close(fd)
        os.close(read_end)
        os.close(write_end)


class SkipChain(Unit):
    """A two-nop chain whose first nop carries CQE_SKIP_SUCCESS."""

    def __init__(self, fut: asyncio.Future[int]) -> None:
        super().__init__()
        self.fut = fut

    def begin(self, slot: int) -> None:
        self.op(b.OP_NOP, b.SQE_IO_LINK | b.SQE_CQE_SKIP_SUCCESS)
        self.op(b.OP_NOP, 0)

    def on_cqe(self, step: int, res: int) -> None:
        self.fut.set_result(step)


async def test_close_now_waits_without_spinning(backend: str, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        ring = AsyncRing(backend=backend, queue_depth=1)
        await ring.open()
        # A chain with CQE_SKIP_SUCCESS first: after it the kernel refuses
        # IOSQE_IO_DRAIN on this ring, so draining must not depend on it.
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        ring.start(SkipChain(fut))
        assert await fut == 1

        pipe_buf = bytearray(8)
        pipe_read = asyncio.ensure_future(ring.read(read_end, pipe_buf))
        queued = [asyncio.ensure_future(ring.nop()) for _ in range(3)]
        await wait_until(lambda: ring.stats()["waiting"] == 3)
        await asyncio.sleep(0.02)
        timer = threading.Timer(0.2, os.write, (write_end, b"late"))
        timer.start()
        enters = ring.stats()["enter_calls"]
        cpu = time.process_time()
        wall = time.monotonic()
        ring.close_now()  # blocks until the pipe read completes
        wall = time.monotonic() - wall
        cpu = time.process_time() - cpu
        timer.join()
        assert wall >= 0.1
        assert ring.stats()["enter_calls"] - enters < 50, "close_now spun on the ring"
        assert cpu < 0.5 * wall + 0.05, "close_now burned CPU while waiting"
        assert await pipe_read == 4
        assert bytes(pipe_buf[:4]) == b"late"
        # Operations that never started are aborted, not run.
        for task in queued:
            with pytest.raises(RuntimeError, match="closed before"):
                await task
        assert ring.stats()["in_flight"] == 0
    finally:
        os.close(read_end)
        os.close(write_end)


# --------------------------------------------------------------------------
# fork
# --------------------------------------------------------------------------


async def _child_main(parent_ring: AsyncRing, backend: str, folder: Path) -> int:
    """Runs in the forked child on a fresh loop; returns the exit code."""
    # The parent's ring is the parent's: every way in says so.
    try:
        await parent_ring.nop()
    except RuntimeError as exc:
        if "after fork" not in str(exc):
            return 2
    else:
        return 3
    try:
        parent_ring.engine.reap()
    except RuntimeError:
        pass
    else:
        return 4
    # Its own ring works.
    async with AsyncRing(backend=backend) as own:
        if own.backend != backend:
            return 5
        fd = await own.openat(folder / "from-child", os.O_WRONLY | os.O_CREAT)
        await own.write(fd, b"child wrote this")
        await own.close_fd(fd)
        fd = await own.openat(folder / "from-child")
        buf = bytearray(64)
        n = await own.read(fd, buf)
        await own.close_fd(fd)
        if bytes(buf[:n]) != b"child wrote this":
            return 6
    # Closing the inherited ring only drops the child's copies.
    await parent_ring.close()
    return 0


async def test_fork_child_needs_its_own_ring(
    ring: AsyncRing, backend: str, loop_name: str, tmp_path: Path
) -> None:
    assert await ring.nop() == 0
    read_end, write_end = os.pipe()
    try:
        # An operation in flight across the fork and the child's exit.
        pipe_buf = bytearray(8)
        pending = asyncio.ensure_future(ring.read(read_end, pipe_buf))
        await wait_until(lambda: ring.stats()["sqes_submitted"] >= 2)
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process with threads.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
                child_loop = factory()
                code = child_loop.run_until_complete(_child_main(ring, backend, tmp_path))
            except BaseException:
                traceback.print_exc()
                code = 99
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "child hung"
            await asyncio.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (tmp_path / "from-child").read_bytes() == b"child wrote this"
        # The parent's ring and its in-flight read survived the child.
        assert not pending.done()
        os.write(write_end, b"parent")
        assert await asyncio.wait_for(pending, 5) == 6
        assert bytes(pipe_buf[:6]) == b"parent"
        fd = await ring.openat(tmp_path / "from-child")
        buf = bytearray(64)
        assert await ring.read(fd, buf) == 16
        await ring.close_fd(fd)
        assert await asyncio.gather(*(ring.nop() for _ in range(100))) == [0] * 100
        assert_accounted(ring)
    finally:
        os.close(read_end)
        os.close(write_end)
