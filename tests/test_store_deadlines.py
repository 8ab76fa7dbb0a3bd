"""Deadlines and a bounded close, with I/O that really hangs in the kernel.

A load whose block file is a FIFO blocks in open(2) until a writer comes:
a real hang (an io-wq worker or a pool thread stuck in the kernel), with
no FUSE needed.  Opening the FIFO for writing and closing it again lets the
stuck open finish (its read sees end-of-file).  Hangs inside a FUSE
filesystem (create, write, flush, rename) are in test_store_fuse.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import Ticker, block_file, filled_rows, new_root, payload, rows

from kvuring import BlockStore, PollingStore, Status

BS = 16 * 1024
SLACK = 2.0  # seconds a deadline may be late on a busy 2-vCPU machine


@pytest.fixture
def root() -> Iterator[Path]:
    yield from new_root(Path("/var/tmp") if Path("/var/tmp").is_dir() else None)


def plant_fifo(root: Path, key: bytes) -> Path:
    """A FIFO where the block of ``key`` would be: loading it hangs in open()."""
    path = block_file(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def unblock(fifo: Path) -> None:
    """Let a reader stuck opening ``fifo`` go on (it then reads end-of-file)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # nobody is waiting any more
    os.close(fd)


@pytest.mark.asyncio
async def test_load_past_its_deadline_fails_etimedout(root: Path, backend: str) -> None:
    fifo = plant_fifo(root, b"hung")
    store = await BlockStore(root, BS, backend=backend, io_timeout=0.5).open()
    try:
        assert await store.put(b"fine", payload(b"fine", BS)) is Status.STORED
        _r, bufs = rows(2, BS)
        with Ticker() as ticker:
            t0 = time.monotonic()
            got = await store.get_many([b"fine", b"hung"], bufs)
            took = time.monotonic() - t0
        assert got == [Status.HIT, Status.FAILED]
        assert 0.4 < took < 0.5 + SLACK, took
        assert ticker.ticks > 10  # the loop ran meanwhile
        assert bytes(bufs[0]) == payload(b"fine", BS)
        s = store.stats()
        assert s["timeouts"] == 1 and s["errors"] == {"ETIMEDOUT": 1}
        assert s["io_timeout"] == 0.5
        # a single get raises the OSError, errno and path
        with pytest.raises(OSError) as ei:
            await store.get(b"hung", bytearray(BS))
        assert ei.value.errno == errno.ETIMEDOUT and b"hung".hex() in str(ei.value)
    finally:
        unblock(fifo)
        await store.close()


@pytest.mark.asyncio
async def test_lent_buffer_is_held_until_the_kernel_lets_go(root: Path, backend: str) -> None:
    """After ETIMEDOUT the kernel may still write the buffer: the store keeps it pinned
    (a bytearray cannot be resized) and counts it in lent_buffers until the I/O ends."""
    fifo = plant_fifo(root, b"hung")
    async with BlockStore(root, BS, backend=backend, io_timeout=0.3, direct=False) as store:
        buf = bytearray(BS)
        assert await store.get_many([b"hung"], [buf]) == [Status.FAILED]
        assert store.stats()["lent_buffers"] == 1
        with pytest.raises(BufferError):
            buf.extend(b"x")  # still exported to the kernel's read
        unblock(fifo)
        for _ in range(300):
            await asyncio.sleep(0.01)
            if not store.stats()["lent_buffers"]:
                break
        assert store.stats()["lent_buffers"] == 0
        buf.extend(b"x")  # the caller's again
        # the slot came back: the store works on
        assert await store.put(b"after", payload(b"after", BS)) is Status.STORED


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_queued_blocks_fail_at_once_when_every_slot_is_lent(root: Path, backend: str) -> None:
    fifos = [plant_fifo(root, b"hung-%d" % i) for i in range(2)]
    async with BlockStore(root, BS, backend=backend, io_timeout=0.3, queue_depth=2) as store:
        keys = [b"hung-0", b"hung-1"] + [b"queued-%d" % i for i in range(10)]
        _r, bufs = rows(len(keys), BS)
        t0 = time.monotonic()
        got = await store.get_many(keys, bufs)
        assert time.monotonic() - t0 < 0.3 + SLACK
        assert got == [Status.FAILED] * len(keys)
        assert store.stats()["errors"] == {"ETIMEDOUT": len(keys)}
        for fifo in fifos:
            unblock(fifo)
        for _ in range(300):
            if not store.stats()["lent_buffers"]:
                break
            await asyncio.sleep(0.01)
        assert await store.get_many(keys[2:4], bufs[:2]) == [Status.MISS] * 2


@pytest.mark.asyncio
async def test_close_is_bounded_and_cancels_what_is_in_flight(root: Path, backend: str) -> None:
    fifo = plant_fifo(root, b"hung")
    store = await BlockStore(root, BS, backend=backend, io_timeout=None).open()
    try:
        task = asyncio.get_running_loop().create_task(store.get_many([b"hung"], [bytearray(BS)]))
        await asyncio.sleep(0.2)
        assert not task.done()  # no deadline: it waits
        t0 = time.monotonic()
        await store.close(timeout=0.5)
        assert time.monotonic() - t0 < 0.5 + SLACK
        assert await task == [Status.FAILED]
        assert store.stats()["errors"] == {"ECANCELED": 1}
        await store.close()  # again: nothing left to do
    finally:
        unblock(fifo)
    # a close that let I/O go leaves its registry entry for the next open to clean
    # up after (an abandoned store may leave a temp file); the lock is free
    async with BlockStore(root, BS, backend=backend) as again:
        assert again.stats()["dead_writers_cleaned"] in (0, 1)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_close_cut_short_can_be_called_again(root: Path, backend: str) -> None:
    fifo = plant_fifo(root, b"hung")
    store = await BlockStore(root, BS, backend=backend, io_timeout=None).open()
    try:
        task = asyncio.get_running_loop().create_task(store.get_many([b"hung"], [bytearray(BS)]))
        await asyncio.sleep(0.1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.close(timeout=None), 0.3)
        assert store.closed
        with pytest.raises(RuntimeError, match="closed"):
            await store.get(b"x", bytearray(BS))
        assert store.stats()["engine"] == backend  # not released yet
        await store.close(timeout=0.5)  # finishes releasing
        assert store.stats()["engine"] is None
        assert await task == [Status.FAILED]
    finally:
        unblock(fifo)


def test_polling_store_deadlines_and_bounded_close(root: Path, backend: str) -> None:
    fifo = plant_fifo(root, b"hung")
    try:
        with PollingStore(root, BS, backend=backend, io_timeout=0.4) as store:
            keys = [b"hung", b"other"]
            _r, bufs = filled_rows(keys, BS)
            assert store.submit_put([b"other"], bufs[1:]) > 0
            store.drain()
            t0 = time.monotonic()
            store.submit_get(keys, bufs)
            done = store.drain()
            assert time.monotonic() - t0 < 0.4 + SLACK
            assert done[0].results == [Status.FAILED, Status.HIT]
            assert done[0].errors[0].errno == errno.ETIMEDOUT
            # no deadline on this one: close bounds it
            store.io_timeout = None
        with PollingStore(root, BS, backend=backend, io_timeout=None) as store:
            store.submit_get([b"hung"], [bytearray(BS)])
            assert store.wait(0.2) == []
            t0 = time.monotonic()
            store.close(timeout=0.5)
            assert time.monotonic() - t0 < 0.5 + SLACK
            store.close()
    finally:
        unblock(fifo)


@pytest.mark.parametrize("api", ["asyncio", "polling"])
def test_a_process_with_hung_io_still_exits(root: Path, backend: str, api: str) -> None:
    """close(timeout) lets the engine go while the kernel still has the hung open; the
    process then exits normally (no thread left that it would wait for)."""
    fifo = plant_fifo(root, b"hung")
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from kvuring import BlockStore, PollingStore
        root, backend = {str(root)!r}, {backend!r}
        if {api!r} == "polling":
            store = PollingStore(root, {BS}, backend=backend, io_timeout=None).open()
            store.submit_get([b"hung"], [bytearray({BS})])
            store.wait(0.2)
            store.close(timeout=0.3)
        else:
            async def main():
                store = await BlockStore(root, {BS}, backend=backend, io_timeout=None).open()
                task = asyncio.get_running_loop().create_task(
                    store.get_many([b"hung"], [bytearray({BS})]))
                await asyncio.sleep(0.2)
                await store.close(timeout=0.3)
                print(await task)
            asyncio.run(main())
        print("closed", flush=True)
        """
    )
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "closed" in proc.stdout
        assert time.monotonic() - t0 < 15
    finally:
        unblock(fifo)


def test_io_timeout_is_checked(root: Path) -> None:
    for bad in (True, "1", [1]):
        with pytest.raises(TypeError, match="io_timeout"):
            BlockStore(root, BS, io_timeout=bad)  # type: ignore[arg-type]
    for bad_value in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="io_timeout"):
            PollingStore(root, BS, io_timeout=bad_value)
    assert BlockStore(root, BS, io_timeout=2).io_timeout == 2.0
    assert BlockStore(root, BS, io_timeout=None).io_timeout is None
