"""The block store on a FUSE filesystem that hangs or fails operations on command.

tests/faultfs.py is the filesystem: a passthrough over a backing directory
whose open, create, read, write, flush, rename, unlink, ... can be made to
block or to fail with a chosen errno.  What the store promises under each
fault is in docs/errors.md; these tests hold it to that on both engines.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultfs import FaultFS, fault_fs
from store_helpers import block_file, block_files, filled_rows, payload, rows, stray_files, until

from kvuring import BlockStore, Status

BS = 16 * 1024
SLACK = 3.0  # a deadline may be late on a busy 2-vCPU machine; FUSE adds its own delays

if os.geteuid() != 0:
    pytest.skip("FUSE fault tests need root (mount)", allow_module_level=True)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FaultFS]:
    with fault_fs(tmp_path) as mounted:
        yield mounted


def keys_of(n: int, tag: bytes) -> list[bytes]:
    return [tag + b"-%03d" % i for i in range(n)]


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_flush_error_fails_the_store(fs: FaultFS, backend: str) -> None:
    """Write-back errors reported at close (NFS, FUSE) fail the block; nothing is published."""
    async with BlockStore(fs.mnt, BS, backend=backend) as store:
        if not store.stats()["close_errors_checked"]:
            pytest.skip("this kernel has no IORING_OP_FIXED_FD_INSTALL (6.8): no close check")
        keys = keys_of(4, b"flush")
        _r, bufs = filled_rows(keys, BS)
        fs.fail("flush", errno.EIO, match="*.tmp")
        assert await store.put_many(keys, bufs) == [Status.FAILED] * 4
        s = store.stats()
        assert s["errors"] == {"EIO": 4} and s["close_errors"] >= 4
        assert block_files(fs.backing) == [] and stray_files(fs.backing) == []
        fs.clear()
        assert await store.put_many(keys, bufs) == [Status.STORED] * 4
        _o, out = rows(4, BS)
        assert await store.get_many(keys, out) == [Status.HIT] * 4


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("verify", [True, False])
async def test_a_store_past_its_deadline_is_never_published(
    fs: FaultFS, backend: str, verify: bool
) -> None:
    """A write that hangs past the deadline: FAILED (ETIMEDOUT) on time; when the write
    finally goes through, the temp file is removed, never renamed into place (not even
    with the bytes the caller wrote into the buffer after the call returned)."""
    async with BlockStore(fs.mnt, BS, backend=backend, io_timeout=0.5, verify=verify) as store:
        keys = keys_of(3, b"late")
        _r, bufs = filled_rows(keys, BS)
        fs.hang("write", match="*.tmp")
        t0 = time.monotonic()
        assert await store.put_many(keys, bufs) == [Status.FAILED] * 3
        assert time.monotonic() - t0 < 0.5 + SLACK
        assert store.stats()["errors"] == {"ETIMEDOUT": 3}
        for buf in bufs:
            buf[:] = b"\xee" * BS  # the caller reuses its buffers
        fs.release()
        assert await until(lambda: store.stats()["lent_buffers"] == 0)
        assert block_files(fs.backing) == []
        assert await until(lambda: stray_files(fs.backing) == [])
        _o, out = rows(3, BS)
        assert await store.get_many(keys, out) == [Status.MISS] * 3


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("op", ["open", "read", "create", "flush", "rename", "mkdir", "unlink"])
async def test_every_hung_operation_ends_on_time(fs: FaultFS, backend: str, op: str) -> None:
    store = await BlockStore(fs.mnt, BS, backend=backend, io_timeout=0.5).open()
    try:
        _r, bufs = filled_rows([b"seed"], BS)
        assert await store.put_many([b"seed"], bufs) == [Status.STORED]
        fs.hang(op, match="default/*")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.get_running_loop().create_task(tick())
        t0 = time.monotonic()
        if op in ("open", "read"):
            got = await store.get_many([b"seed"], [bytearray(BS)])
        elif op == "unlink":
            got = await store.delete_many([b"seed"])
        else:
            _r2, more = filled_rows([b"fresh-key"], BS)
            got = await store.put_many([b"fresh-key"], more)
        took = time.monotonic() - t0
        ticker.cancel()
        assert took < 0.5 + SLACK, took
        assert ticks > 10
        if fs.hung():
            assert got in ([Status.FAILED], [False])
            assert "ETIMEDOUT" in store.stats()["errors"]
        fs.release()
        assert await until(lambda: store.stats()["lent_buffers"] == 0)
        # a store that hung in its final rename may still appear: then it is intact
        out = bytearray(BS)
        if op not in ("unlink",):
            status = await store.get(b"fresh-key", out)
            assert status in (Status.HIT, Status.MISS)
            if status is Status.HIT:
                assert out == payload(b"fresh-key", BS)
    finally:
        fs.clear()
        await store.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_rename_noreplace_refused_for_whole_and_concurrent_batches(
    fs: FaultFS, backend: str
) -> None:
    """GlusterFS/NFS-style EINVAL for RENAME_NOREPLACE: every block of every batch in flight
    falls back to a plain rename (still atomic), not only the first one seen."""
    fs.reject_noreplace()
    async with BlockStore(fs.mnt, BS, backend=backend) as store:
        a, b = keys_of(32, b"batch-a"), keys_of(32, b"batch-b")
        _ra, bufs_a = filled_rows(a, BS)
        _rb, bufs_b = filled_rows(b, BS)
        got_a, got_b = await asyncio.gather(store.put_many(a, bufs_a), store.put_many(b, bufs_b))
        assert got_a == [Status.STORED] * 32 and got_b == [Status.STORED] * 32
        s = store.stats()
        assert s["rename_noreplace"] is False and s["failures"] == 0
        _o, out = rows(64, BS)
        assert await store.get_many(a + b, out) == [Status.HIT] * 64
        for key, row in zip(a + b, out):
            assert row == payload(key, BS)
        assert len(block_files(fs.backing)) == 64 and stray_files(fs.backing) == []


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("op", ["open", "read"])
async def test_estale_on_a_load_is_retried(fs: FaultFS, backend: str, op: str) -> None:
    """NFS and FUSE give ESTALE to a load racing a rename of the same block: retried."""
    async with BlockStore(fs.mnt, BS, backend=backend) as store:
        assert await store.put(b"stale", payload(b"stale", BS)) is Status.STORED
        fs.fail(op, errno.ESTALE, match="*.kvb", times=2)
        out = bytearray(BS)
        assert await store.get(b"stale", out) is Status.HIT
        assert out == payload(b"stale", BS)
        # (the kernel's own path walk retries an ESTALE open once, with LOOKUP_REVAL)
        assert store.stats()["retries"] >= 1


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_full_registry_write_is_a_failed_block(fs: FaultFS, backend: str) -> None:
    """The writer registry is appended when a store first uses a directory: an ENOSPC
    there is that block's FAILED, never an exception out of put_many."""
    async with BlockStore(fs.mnt, BS, backend=backend) as store:
        fs.fail("write", errno.ENOSPC, match="default/.tmp/*")
        keys = keys_of(3, b"reg")
        _r, bufs = filled_rows(keys, BS)
        assert await store.put_many(keys, bufs) == [Status.FAILED] * 3
        assert store.stats()["errors"] == {"ENOSPC": 3}
        assert stray_files(fs.backing) == []
        fs.clear()
        assert await store.put_many(keys, bufs) == [Status.STORED] * 3


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_failed_cleanup_is_removed_by_the_next_open(fs: FaultFS, backend: str) -> None:
    store = await BlockStore(fs.mnt, BS, backend=backend).open()
    try:
        fs.fail("write", errno.EIO, match="*.tmp")
        fs.fail("unlink", errno.EIO, match="*.tmp")
        assert await store.put_many([b"orphan"], [payload(b"orphan", BS)]) == [Status.FAILED]
        assert store.stats()["cleanup_failed"] == 1
        assert len(stray_files(fs.backing)) == 1  # the temp file the unlink could not remove
    finally:
        fs.clear()
        await store.close()
    async with BlockStore(fs.mnt, BS, backend=backend) as again:
        assert again.stats()["dead_writers_cleaned"] == 1
    assert stray_files(fs.backing) == []


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_close_is_bounded_with_a_hung_fuse_read(fs: FaultFS, backend: str) -> None:
    store = await BlockStore(fs.mnt, BS, backend=backend, io_timeout=None).open()
    assert await store.put(b"k", payload(b"k", BS)) is Status.STORED
    fs.hang("read", match="*.kvb")
    task = asyncio.get_running_loop().create_task(store.get_many([b"k"], [bytearray(BS)]))
    assert await asyncio.get_running_loop().run_in_executor(None, fs.wait_hung, "read")
    t0 = time.monotonic()
    await store.close(timeout=1.0)
    assert time.monotonic() - t0 < 1.0 + SLACK
    assert await task == [Status.FAILED]
    fs.release()


def test_block_file_names_match_the_backing_dir(fs: FaultFS) -> None:
    """The helpers see through the mount: a block stored on it is in the backing dir."""

    async def run() -> None:
        async with BlockStore(fs.mnt, BS, backend="threads") as store:
            assert await store.put(b"seen", payload(b"seen", BS)) is Status.STORED

    asyncio.run(run())
    assert block_file(fs.backing, b"seen").is_file()


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_durable_stores_sync_and_a_failed_fsync_publishes_nothing(
    fs: FaultFS, backend: str
) -> None:
    async with BlockStore(fs.mnt, BS, backend=backend, durable=True) as store:
        assert store.stats()["durable"] is True
        keys = keys_of(4, b"durable")
        _r, bufs = filled_rows(keys, BS)
        before = fs.calls("fsync")
        assert await store.put_many(keys, bufs) == [Status.STORED] * 4
        assert fs.calls("fsync") - before >= 4  # the data of each (directories: fsyncdir)
        fs.fail("fsync", errno.EIO, match="*.tmp")
        more = keys_of(3, b"unsynced")
        _r2, bufs2 = filled_rows(more, BS)
        assert await store.put_many(more, bufs2) == [Status.FAILED] * 3
        assert store.stats()["errors"] == {"EIO": 3}
        assert len(block_files(fs.backing)) == 4 and stray_files(fs.backing) == []


def test_durable_must_be_a_bool(tmp_path: Path) -> None:
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="durable"):
            BlockStore(tmp_path, BS, durable=bad)  # type: ignore[arg-type]


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("durable", [True, False])
async def test_a_power_cut_keeps_every_durable_store(
    fs: FaultFS, backend: str, durable: bool
) -> None:
    """faultfs's volatile mode drops what was not synced (file data, directory entries)
    at power_cut(): every block a durable store reported STORED loads intact afterwards;
    without durable=True the cut loses stored blocks (so the test has teeth)."""
    async with BlockStore(fs.mnt, BS, backend=backend):
        pass  # the namespace and its registry exist before the power is at risk
    fs.volatile()
    keys = keys_of(24, b"power")
    store = await BlockStore(fs.mnt, BS, backend=backend, durable=durable).open()
    _r, bufs = filled_rows(keys, BS)
    assert await store.put_many(keys, bufs) == [Status.STORED] * 24
    fs.power_cut()  # the store is dead from here on
    await store.close(timeout=1.0)
    async with BlockStore(fs.mnt, BS, backend=backend) as after:
        _o, out = rows(24, BS)
        got = await after.get_many(keys, out)
        if durable:
            assert got == [Status.HIT] * 24
            for key, row in zip(keys, out):
                assert row == payload(key, BS)
        else:
            assert Status.HIT not in got or got.count(Status.HIT) < 24
            assert set(got) <= {Status.MISS, Status.CORRUPT, Status.HIT}
