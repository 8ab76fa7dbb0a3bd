"""A namespace's open and close never block the caller's loop, and give up at their deadline.

Every filesystem step of ``open()`` (directories, descriptors, the writer
registry, dead-writer clean-up, the direct-I/O probe, the manifest) and of
the namespace's close runs on its admin engine (kvuring/_nsops.py).  Here
each step hangs in turn in a FUSE filesystem (tests/faultfs.py): ``open()``
raises TimeoutError (ETIMEDOUT) after ``io_timeout`` while the event loop
keeps ticking; once the filesystem lets go, the failed open's leftovers are
released and a new open works.  Closing with a hung unlink or flush returns
False at its deadline and True when called again after the hang.  Also here:
``keep_registry`` hands this writer's temp files to the next open, and a
store opens and works on a 16 MiB ext4 (no fan-out made at open).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultfs import FaultFS, fault_fs
from store_helpers import MANIFEST, Ticker, block_file, locks, new_root, payload, small_ext4

from kvuring import BlockStore, PollingStore, Status
from kvuring._namespace import Namespace

pytestmark = pytest.mark.timeout(90)

BS = 16 * 1024
T = 0.5  # io_timeout of the stores under test
SLACK = 2.0  # how late a deadline may be on a busy 2-vCPU machine
NS = "ns"
#: paths as faultfs matches them (relative to the mount root)
NSP = f"kv/{NS}"
REG = f"{NSP}/.tmp"


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FaultFS]:
    with fault_fs(tmp_path) as mounted:
        yield mounted


def backing_ns(fs: FaultFS) -> Path:
    return fs.backing / "kv" / NS


def plant_dead_writer(fs: FaultFS) -> Path:
    """A dead writer's lock file (unlocked) listing a leaf that holds one of its temp files."""
    ns = backing_ns(fs)
    (ns / ".tmp").mkdir(parents=True, exist_ok=True)
    (ns / ".tmp" / "dead-1.lock").write_bytes(b"abc/de\n")
    leaf = ns / "abc" / "de"
    leaf.mkdir(parents=True)
    tmp = leaf / "abcde1.kvb.dead-1.7.tmp"
    tmp.write_bytes(b"partial")
    return tmp


async def first_open(fs: FaultFS, backend: str) -> None:
    """Open and close once (the namespace then has its registry and manifest)."""
    store = await BlockStore(fs.mnt / "kv", BS, namespace=NS, backend=backend).open()
    await store.close()


def leftovers(fs: FaultFS) -> list[str]:
    """What an open or close that was cut short could leave in the registry."""
    reg = backing_ns(fs) / ".tmp"
    return sorted(os.listdir(reg)) if reg.is_dir() else []


# (op, path pattern, what to prepare): a step of open() that hangs
OPEN_STEPS = [
    ("mkdir", "kv", None),  # the root
    ("mkdir", NSP, None),
    ("opendir", NSP, None),  # the namespace's descriptor
    ("mkdir", REG, None),
    ("opendir", REG, None),
    ("open", f"{NSP}/{MANIFEST}", "manifest"),
    ("read", f"{NSP}/{MANIFEST}", "manifest"),
    ("readdir", REG, None),  # listing the registry
    ("open", f"{REG}/dead-1.lock", "dead"),
    ("lock", f"{REG}/dead-1.lock", "dead"),
    ("read", f"{REG}/dead-1.lock", "dead"),
    ("readdir", f"{NSP}/abc/de", "dead"),  # the dead writer's leaf
    ("unlink", f"{NSP}/abc/de/*.tmp", "dead"),
    ("unlink", f"{REG}/dead-1.lock", "dead"),
    ("create", f"{REG}/*.locking", None),  # registering this writer
    ("lock", f"{REG}/*.locking", None),
    ("rename", f"{REG}/*.lock", None),
    ("create", f"{REG}/*.probe", None),  # the direct-I/O probe
    ("write", f"{REG}/*.probe", None),
    ("read", f"{REG}/*.probe", None),
    ("flush", f"{REG}/*.probe", None),
    ("unlink", f"{REG}/*.probe", None),
    ("create", f"{REG}/*.manifest", None),  # publishing the manifest
    ("write", f"{REG}/*.manifest", None),
    ("fsync", f"{REG}/*.manifest", None),
    ("rename", f"{NSP}/{MANIFEST}", None),
]


def _step_id(step: tuple[str, str, str | None]) -> str:
    op, match, _prep = step
    return f"{op}:{match.removeprefix(NSP + '/').removeprefix(NSP)}"


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", ["threads"], indirect=True)  # no block engine runs yet
@pytest.mark.parametrize("step", OPEN_STEPS, ids=_step_id)
async def test_open_with_a_hung_step_times_out_and_the_loop_runs(
    fs: FaultFS, backend: str, step: tuple[str, str, str | None]
) -> None:
    op, match, prep = step
    tmp = None
    if prep == "manifest":
        await first_open(fs, backend)
    elif prep == "dead":
        tmp = plant_dead_writer(fs)
    fs.hang(op, match)
    store = BlockStore(fs.mnt / "kv", BS, namespace=NS, backend=backend, io_timeout=T)
    with Ticker() as ticker:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            await store.open()
        took = time.monotonic() - t0
    assert fs.hung(op) >= 1, f"the {op} of {match} never ran"
    assert info.value.errno == errno.ETIMEDOUT
    assert str(fs.mnt / "kv") in str(info.value.filename)
    assert T * 0.9 <= took <= T + SLACK, took
    assert ticker.ticks >= T / 0.01 * 0.5, "the event loop was blocked"

    # The filesystem lets go: the failed open's leftovers are released ...
    fs.release()
    assert await store._ns.close_async(10.0) is True
    assert await store._ns.close_async(10.0) is True  # idempotent
    assert [n for n in leftovers(fs) if n != "dead-1.lock"] == []
    # ... and a new open works, and cleans up after the dead writer.
    async with BlockStore(fs.mnt / "kv", BS, namespace=NS, backend=backend) as again:
        assert await again.put(b"k1", payload(b"k1", BS)) is Status.STORED
        out = bytearray(BS)
        assert await again.get(b"k1", out) is Status.HIT and out == payload(b"k1", BS)
        if tmp is not None:
            # (unless the hung step was the very last of that clean-up, which ran on release)
            last = (op, match) == ("unlink", f"{REG}/dead-1.lock")
            assert again.stats()["dead_writers_cleaned"] == (0 if last else 1)
    if tmp is not None:
        assert not tmp.exists()
    assert leftovers(fs) == []
    assert json.loads((backing_ns(fs) / MANIFEST).read_text())["block_size"] == BS


@pytest.mark.asyncio
async def test_the_same_store_opens_once_the_hang_is_over(fs: FaultFS, backend: str) -> None:
    """A timed-out open() may be called again: it waits for the hung step, then opens."""
    fs.hang("create", f"{REG}/*.locking")
    store = BlockStore(fs.mnt / "kv", BS, namespace=NS, backend=backend, io_timeout=T)
    with pytest.raises(TimeoutError):
        await store.open()
    fs.release()
    await store.open()
    try:
        assert store.stats()["engine"] == backend
        assert await store.put(b"k2", payload(b"k2", BS)) is Status.STORED
    finally:
        await store.close()
    assert leftovers(fs) == []


@pytest.mark.asyncio
async def test_cancelled_open_leaves_nothing(fs: FaultFS, backend: str) -> None:
    """open() cancelled while a step hangs (wait_for): its leftovers are released after the hang."""
    fs.hang("write", f"{REG}/*.probe")
    store = BlockStore(fs.mnt / "kv", BS, namespace=NS, backend=backend, io_timeout=30.0)
    with Ticker() as ticker, pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(store.open(), T)
    assert ticker.ticks >= T / 0.01 * 0.5
    fs.release()
    assert await store._ns.close_async(10.0) is True
    assert leftovers(fs) == []


@pytest.mark.parametrize("backend", ["threads", "uring"], indirect=True)
@pytest.mark.parametrize("step", [("mkdir", NSP), ("create", f"{REG}/*.locking"),
                                  ("readdir", REG), ("rename", f"{NSP}/{MANIFEST}")],
                         ids=lambda s: s[0])  # fmt: skip
def test_polling_store_open_times_out(fs: FaultFS, backend: str, step: tuple[str, str]) -> None:
    op, match = step
    fs.hang(op, match)
    store = PollingStore(fs.mnt / "kv", BS, namespace=NS, backend=backend, io_timeout=T)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        store.open()
    took = time.monotonic() - t0
    assert info.value.errno == errno.ETIMEDOUT and fs.hung(op) >= 1
    assert T * 0.9 <= took <= T + SLACK, took
    fs.release()
    assert store._ns.close_sync(10.0) is True
    with PollingStore(fs.mnt / "kv", BS, namespace=NS, backend=backend) as again:
        _put = again.submit_put([b"k3"], [payload(b"k3", BS)])
        (done,) = again.drain()
        assert done.results == [Status.STORED]
    assert leftovers(fs) == []


# ----------------------------------------------------------------------------
# close
# ----------------------------------------------------------------------------


def namespace(root: Path) -> Namespace:
    return Namespace(str(root), NS, BS, verify=True, direct="auto", prioritize_loads=False,
                     queue_depth=4)  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", ["threads"], indirect=True)  # the admin engine is threads
@pytest.mark.parametrize("op", ["unlink", "flush"])
async def test_close_gives_up_at_its_deadline_and_finishes_later(
    fs: FaultFS, backend: str, op: str
) -> None:
    """A hung unlink (or flush) of the lock file: close_async returns False in time, then True."""
    ns = await namespace(fs.mnt / "kv").open_async(T)
    assert ns.writer is not None
    assert locks(fs.backing / "kv", NS) == [f"{ns.writer.token}.lock"]
    fs.hang(op, f"{REG}/*.lock")
    with Ticker() as ticker:
        t0 = time.monotonic()
        assert await ns.close_async(T) is False
        took = time.monotonic() - t0
    assert T * 0.9 <= took <= T + SLACK, took
    assert ticker.ticks >= T / 0.01 * 0.5, "the event loop was blocked"
    assert fs.wait_hung(op)
    assert await ns.close_async(T) is False  # still hung: gives up again, in time
    fs.release()
    assert await ns.close_async(10.0) is True
    assert await ns.close_async(10.0) is True
    assert locks(fs.backing / "kv", NS) == []
    assert ns.ns_fd == ns.reg_fd == -1


@pytest.mark.parametrize("op", ["unlink", "flush"])
def test_close_sync_gives_up_at_its_deadline(fs: FaultFS, op: str) -> None:
    ns = namespace(fs.mnt / "kv").open_sync(T)
    fs.hang(op, f"{REG}/*.lock")
    t0 = time.monotonic()
    assert ns.close_sync(T) is False
    assert time.monotonic() - t0 <= T + SLACK
    fs.release()
    assert ns.close_sync(10.0) is True
    assert locks(fs.backing / "kv", NS) == []


# ----------------------------------------------------------------------------
# without FUSE
# ----------------------------------------------------------------------------


@pytest.fixture
def root() -> Iterator[Path]:
    yield from new_root()


@pytest.mark.asyncio
async def test_keep_registry_hands_temp_files_to_the_next_open(root: Path, backend: str) -> None:
    """close(keep_registry=True): the lock file stays (unlocked); the next open cleans up after it."""
    ns = await namespace(root).open_async(5.0)
    assert ns.writer is not None
    token = ns.writer.token
    os.write(ns.writer.fd, b"abc/de\n")  # what the block core writes before its first temp file
    leftover = block_file(root, bytes.fromhex("abcde1"), ns=NS)
    leftover = leftover.with_name(f"{leftover.name}.{token}.c1.tmp")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"a failed cleanup")
    assert await ns.close_async(5.0, keep_registry=True) is True
    assert locks(root, NS) == [f"{token}.lock"] and leftover.exists()
    async with BlockStore(root, BS, namespace=NS, backend=backend) as store:
        assert store.stats()["dead_writers_cleaned"] == 1
    assert not leftover.exists() and locks(root, NS) == []


def test_namespace_close_before_open_and_twice(root: Path) -> None:
    ns = namespace(root)
    assert ns.close_sync(1.0) is True
    ns.open_sync(5.0)
    assert ns.close_sync(5.0) is True and ns.close_sync(5.0) is True
    assert locks(root, NS) == []


def test_open_failure_releases_everything(root: Path) -> None:
    """An open that fails for a reason other than a hang (here: a file where .tmp goes) leaves nothing."""
    (root / NS).mkdir()
    (root / NS / ".tmp").write_bytes(b"not a directory")
    ns = namespace(root)
    with pytest.raises(NotADirectoryError):
        ns.open_sync(5.0)
    assert ns._admin is None, "the admin engine was not closed"
    assert sorted(os.listdir(root / NS)) == [".tmp"]


# ----------------------------------------------------------------------------
# directories on demand
# ----------------------------------------------------------------------------


def _free_inodes(path: Path) -> int:
    return os.statvfs(path).f_ffree


@pytest.mark.asyncio
async def test_store_works_on_a_small_ext4(tmp_path: Path, backend: str) -> None:
    """16 MiB of default mkfs.ext4 (4096 inodes): open makes a handful; blocks take what they need."""
    with small_ext4(tmp_path / "small") as mnt:
        free0 = _free_inodes(mnt)
        async with BlockStore(mnt, BS, backend=backend) as store:
            opened_cost = free0 - _free_inodes(mnt)
            assert opened_cost <= 8, opened_cost  # namespace, registry, lock file, manifest
            keys = [bytes([i, i, 0x10]) for i in range(64)]  # 64 upper directories
            for key in keys:
                assert await store.put(key, payload(key, BS)) is Status.STORED
            used = free0 - _free_inodes(mnt) - opened_cost
            # a block file, its leaf and its upper directory each
            assert 64 <= used <= 3 * 64 + 4, used
            out = bytearray(BS)
            for key in keys:
                assert await store.get(key, out) is Status.HIT and out == payload(key, BS)
        assert len([d for d in os.listdir(mnt / "default") if len(d) == 3]) == 64
