"""One store over several roots: rendezvous placement, adding a root, a root that fails.

Each root holds the single-root layout (``<root>/<namespace>/...``); a key's
block lives on the root that ranks first for it, or on the next one while
that root fails (docs/disks.md).  Failing roots are real: a FUSE filesystem
(tests/faultfs.py) told to fail or hang its operations.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultfs import FaultFS, fault_fs
from store_helpers import block_file, filled_rows, payload, rows, three_roots, until

from kvuring import BlockStore, PollingStore, Status

roots = three_roots

BS = 16 * 1024


def keys_of(n: int, tag: bytes = b"key") -> list[bytes]:
    return [tag + b"-%04d" % i for i in range(n)]


def where(key: bytes, roots: list[Path], ns: str = "default") -> list[int]:
    """The roots that hold ``key``'s block file."""
    return [i for i, root in enumerate(roots) if block_file(root, key, ns=ns).is_file()]


@pytest.mark.asyncio
async def test_keys_spread_over_the_roots_and_load_back(roots: list[Path], backend: str) -> None:
    keys = keys_of(300)
    _r, bufs = filled_rows(keys, BS)
    async with BlockStore(roots, BS, backend=backend) as store:
        assert store.roots == [os.path.abspath(r) for r in roots]
        assert await store.put_many(keys, bufs) == [Status.STORED] * len(keys)
        per_root = [r["stored"] for r in store.stats()["roots"]]
        assert sum(per_root) == len(keys) and min(per_root) > len(keys) / 6, per_root
        for key in keys:
            assert len(where(key, roots)) == 1  # each block on exactly one root
        _o, out = rows(len(keys), BS)
        assert await store.get_many(keys, out) == [Status.HIT] * len(keys)
        assert all(row == payload(key, BS) for key, row in zip(keys, out))
        assert await store.contains_many(keys[:3]) == [True] * 3
        assert await store.delete_many(keys[:3]) == [True] * 3
        assert all(where(key, roots) == [] for key in keys[:3])
        assert all(r["healthy"] for r in store.stats()["roots"])


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_adding_a_root_moves_about_a_third_and_only_to_it(
    roots: list[Path], backend: str
) -> None:
    keys = keys_of(600)
    _r, bufs = filled_rows(keys, BS)
    two, three = roots[:2], roots
    async with BlockStore(two, BS, backend=backend, namespace="before") as store:
        assert set(await store.put_many(keys, bufs)) == {Status.STORED}
    async with BlockStore(three, BS, backend=backend, namespace="after") as store:
        assert set(await store.put_many(keys, bufs)) == {Status.STORED}
    moved = 0
    for key in keys:
        (old,) = where(key, three, ns="before")
        (new,) = where(key, three, ns="after")
        assert new in (old, 2), key  # a key moves only to the new root
        moved += new != old
    assert 0.2 < moved / len(keys) < 0.47, moved

    # blocks stored before the root was added still load, and can be deleted
    async with BlockStore(three, BS, backend=backend, namespace="before") as store:
        _o, out = rows(len(keys), BS)
        assert await store.get_many(keys, out) == [Status.HIT] * len(keys)
        assert sum(r["moved_on"] for r in store.stats()["roots"]) >= moved
        assert await store.delete_many(keys) == [True] * len(keys)
        assert await store.contains_many(keys[:10]) == [False] * 10


def test_polling_store_over_roots(roots: list[Path], backend: str) -> None:
    keys = keys_of(64)
    _r, bufs = filled_rows(keys, BS)
    with PollingStore(roots, BS, backend=backend) as store:
        store.submit_put(keys, bufs)
        (done,) = store.drain()
        assert done.results == [Status.STORED] * len(keys)
        _o, out = rows(len(keys), BS)
        store.submit_get(keys, out)
        (done,) = store.drain()
        assert done.results == [Status.HIT] * len(keys)
        assert len(store.stats()["roots"]) == 3


def test_roots_are_checked(roots: list[Path]) -> None:
    with pytest.raises(ValueError, match="at least one"):
        BlockStore([], BS)
    with pytest.raises(ValueError, match="distinct"):
        BlockStore([roots[0], str(roots[0])], BS)
    with pytest.raises(TypeError, match="path"):
        BlockStore([roots[0], 3], BS)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="2 budgets for 3 roots"):
        BlockStore(roots, BS, capacity_bytes=[1 << 20, 1 << 20])
    with pytest.raises(ValueError, match="at most 16"):
        BlockStore([f"{roots[0]}/{i}" for i in range(17)], BS)


@pytest.fixture
def fuse_root(tmp_path: Path) -> Iterator[FaultFS]:
    with fault_fs(tmp_path) as fs:
        yield fs


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("fault", ["fail", "hang"])
async def test_a_failing_root_is_skipped_and_used_again(
    fuse_root: FaultFS, roots: list[Path], backend: str, fault: str
) -> None:
    """A root whose filesystem fails (EIO) or hangs: its keys' stores go to the next root,
    its loads are MISS or FAILED (never an exception), and within seconds of recovering
    it takes blocks again."""
    fs = fuse_root
    both = [fs.mnt, roots[0]]
    async with BlockStore(both, BS, backend=backend, io_timeout=0.5) as store:
        keys = keys_of(40, b"before")
        _r, bufs = filled_rows(keys, BS)
        assert set(await store.put_many(keys, bufs)) == {Status.STORED}
        on_fuse = [k for k in keys if where(k, [fs.backing, roots[0]]) == [0]]
        assert on_fuse, "no key ranked the FUSE root first"
        if fault == "fail":
            fs.fail("create", errno.EIO, match="default/*")
            fs.fail("open", errno.EIO, match="default/*")
        else:
            fs.hang("create", match="default/*")
            fs.hang("open", match="default/*")
        more = keys_of(40, b"during")
        _r2, bufs2 = filled_rows(more, BS)
        got = await store.put_many(more, bufs2)
        # stores move on to the healthy root (a hung one first costs its deadline)
        assert got.count(Status.STORED) >= len(more) - (len(more) if fault == "hang" else 0)
        roots_stats = store.stats()["roots"]
        assert roots_stats[0]["healthy"] is False
        if fault == "fail":
            assert roots_stats[1]["healthy"] is True
        assert roots_stats[0]["last_error"] in ("EIO", "ETIMEDOUT")
        later = keys_of(20, b"while-down")
        _r3, bufs3 = filled_rows(later, BS)
        got3 = await store.put_many(later, bufs3)
        # the hung root's requests hold workers, not the other root's (io-wq's
        # bounded cap is raised with several roots; the thread engine has 16 per root)
        assert got3 == [Status.STORED] * len(later)
        assert all(where(k, [fs.backing, roots[0]]) == [1] for k in later)
        # loads of keys on the failing root: MISS or FAILED, never an exception
        _o, out = rows(len(on_fuse), BS)
        loads = await store.get_many(on_fuse, out)
        assert set(loads) <= {Status.MISS, Status.FAILED, Status.HIT}
        fs.clear()
        # the hung requests come back, then the root's 2 s pause passes
        assert await until(
            lambda: all(r["lent"] == 0 and r["retry_in"] == 0.0 for r in store.stats()["roots"])
        )
        fresh = keys_of(40, b"after")
        _r4, bufs4 = filled_rows(fresh, BS)

        async def stores_reach_it() -> bool:
            assert set(await store.put_many(fresh, bufs4)) <= {Status.STORED, Status.EXISTS}
            return any(where(k, [fs.backing, roots[0]]) == [0] for k in fresh)

        for _ in range(20):
            if await stores_reach_it():
                break
            await asyncio.sleep(0.2)
            fresh = [k + b"'" for k in fresh]
        else:
            pytest.fail("the recovered root never took a block again")
        assert store.stats()["roots"][0]["healthy"] is True
        _o2, out2 = rows(len(on_fuse), BS)
        assert await store.get_many(on_fuse, out2) == [Status.HIT] * len(on_fuse)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_workers_grow_with_the_roots(roots: list[Path], backend: str) -> None:
    """Enough blocking workers that one root's hung requests leave the others some: the
    thread engine has 16 per root; io_uring's io-wq caps (bounded: opens, creates) rise
    to queue_depth."""
    async with BlockStore(roots, BS, backend=backend, queue_depth=64) as store:
        engine = store._ring.engine if store._ring is not None else None
        assert engine is not None
        if backend == "threads":
            assert store.stats()["ring"]["threads"] == 48
        else:
            assert engine.max_bounded_workers >= 64 and engine.max_workers >= 64


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_temp_files_carry_their_roots_writer_token(
    fuse_root: FaultFS, roots: list[Path], backend: str
) -> None:
    """Each root has its own writer registry (and token): a temp file on a root is named
    with that root's token, so a dead writer's cleanup there finds it."""
    fs = fuse_root
    async with BlockStore([roots[0], fs.mnt], BS, backend=backend, io_timeout=1.0) as store:
        fs.hang("write", match="*.tmp")
        keys = keys_of(40, b"token")
        _r, bufs = filled_rows(keys, BS)
        task = asyncio.get_running_loop().create_task(store.put_many(keys, bufs))
        assert await asyncio.get_running_loop().run_in_executor(None, fs.wait_hung, "write")
        (lock,) = [p.name for p in (fs.backing / "default" / ".tmp").glob("*.lock")]
        token = lock[: -len(".lock")]
        temps = [p.name for p in (fs.backing / "default").rglob("*.tmp") if p.is_file()]
        assert temps and all(f".{token}." in name for name in temps), (token, temps)
        fs.release()
        await task


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_a_killed_writer_leaves_no_temp_file_on_any_root(
    roots: list[Path], backend: str
) -> None:
    """Each root's registry names that root's temp files (its own writer token), so the
    next open cleans up after a writer killed mid-batch on every root."""
    import signal

    from store_helpers import child, reap, stray_files

    args = {"root": [str(r) for r in roots], "bs": BS, "backend": backend, "batch": 64,
            "batches": 400, "start": 0}  # fmt: skip
    proc = child("writer", args)
    try:
        for _ in range(3):
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.startswith("STORED"), line
    finally:
        proc.send_signal(signal.SIGKILL)
        reap(proc)
    async with BlockStore(roots, BS, backend=backend) as store:
        assert store.stats()["dead_writers_cleaned"] >= 1
        for root in roots:
            assert stray_files(root) == [], root
