"""BlockStore under crashes, cancellation and concurrent writers.

Child processes run ``tests/store_helpers.py`` roles (see its docstring); a
writer killed with SIGKILL must leave no partial block visible, and the next
open must remove its temp files while leaving a live writer's alone.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import (
    TRAILER,
    block_file,
    block_files,
    child,
    filled_rows,
    locks,
    new_root,
    opened,
    payload,
    pooled_root,
    reap,
    rows,
    stray_files,
)

from kvuring import Status

BS = 8192
ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


@pytest.fixture
def disk_root(tmp_path: Path) -> Iterator[Path]:
    yield from new_root(tmp_path)


def _readline(proc: object, what: str) -> str:
    line: str = proc.stdout.readline()  # type: ignore[attr-defined]
    if not line:
        _out, err = reap(proc)  # type: ignore[arg-type]
        raise AssertionError(f"child exited before {what}: {err}")
    return line.strip()


# ----------------------------------------------------------------------------
# dead and live writers' temp files
# ----------------------------------------------------------------------------


@ONE_LOOP
async def test_live_writers_temp_files_are_left_alone_dead_ones_removed(
    root: Path, backend: str
) -> None:
    key = bytes.fromhex("abcdef01")
    proc = child("hold", {"root": str(root), "bs": BS, "backend": backend, "key": key.hex()})
    try:
        tag, token, tmp_name = _readline(proc, "OPEN").split(" ", 2)
        assert tag == "OPEN"
        tmp = Path(tmp_name)
        assert tmp.is_file() and f"{token}.lock" in locks(root)
        # a second store opened while that writer lives leaves its files alone
        async with opened(root, BS, backend, clean=False) as store:
            assert store.stats()["dead_writers_cleaned"] == 0
            assert tmp.is_file(), "a live writer's temp file was removed"
            assert f"{token}.lock" in locks(root)
            out = bytearray(BS)
            assert await store.get(key, out) is Status.HIT and out == payload(key, BS)
            assert await store.put(b"parent", payload(b"parent", BS)) is Status.STORED
        assert tmp.is_file() and f"{token}.lock" in locks(root)
    finally:
        proc.send_signal(signal.SIGKILL)
        reap(proc)
    # the writer is dead now: the next open removes what it left
    async with opened(root, BS, backend) as store:
        assert store.stats()["dead_writers_cleaned"] == 1
        assert not tmp.exists(), "a dead writer's temp file survived the next open"
        assert f"{token}.lock" not in locks(root)
        assert stray_files(root) == []
        _r, out2 = rows(2, BS)
        assert await store.get_many([key, b"parent"], out2) == [Status.HIT, Status.HIT]
        assert bytes(out2[0]) == payload(key, BS) and bytes(out2[1]) == payload(b"parent", BS)
    async with opened(root, BS, backend) as store:
        assert store.stats()["dead_writers_cleaned"] == 0  # nothing left to clean


@ONE_LOOP
@pytest.mark.parametrize("durable", [False, True])
async def test_sigkill_during_put_many_leaves_no_partial_block(
    disk_root: Path, backend: str, durable: bool
) -> None:
    """Kill a writer mid-batch: reported blocks load intact, others are intact or absent
    (also with durable=True: the syncs between write, rename and directory change nothing)."""
    root = disk_root
    bs, batch = 16 * 1024, 64
    rng = random.Random()
    kill_after = rng.randint(3, 6)
    args = {"root": str(root), "bs": bs, "backend": backend, "batch": batch,
            "batches": 400, "start": 0, "durable": durable}  # fmt: skip
    reported: set[bytes] = set()
    batches_seen = 0
    async with opened(root, bs, backend, direct=False, clean=False) as reader:
        proc = child("writer", args)
        try:
            _r, out = rows(batch, bs)
            while batches_seen < kill_after:
                line = _readline(proc, f"batch {batches_seen}")
                assert line.startswith("STORED"), line
                done = [bytes.fromhex(h) for h in line.split()[1:]]
                assert len(done) == batch, line  # a fresh store: every block is STORED
                reported.update(done)
                batches_seen += 1
                # load the batch being written right now, racing with the writer
                nxt = [(batches_seen * batch + i).to_bytes(8, "big") for i in range(batch)]
                for i, status in enumerate(await reader.get_many(nxt, out)):
                    assert status in (Status.HIT, Status.MISS), (nxt[i], status)
                    if status is Status.HIT:
                        assert bytes(out[i]) == payload(nxt[i], bs), nxt[i]
            time.sleep(rng.uniform(0, 0.02))
        finally:
            proc.send_signal(signal.SIGKILL)
            rest, _err = reap(proc)
        assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
        for line in rest.splitlines():
            if line.startswith("STORED"):
                reported.update(bytes.fromhex(h) for h in line.split()[1:])
        assert reader.stats()["corrupt"] == 0

    highest = max(int.from_bytes(k, "big") for k in reported)
    keys = [i.to_bytes(8, "big") for i in range(highest + 4 * batch)]
    async with opened(root, bs, backend) as store:
        # the open removed the dead writer's temp files
        assert store.stats()["dead_writers_cleaned"] == 1
        assert stray_files(root) == [], "temp files of the killed writer survived the next open"
        assert len(locks(root)) == 1  # only this store's own registration
        sizes = {p.stat().st_size for p in block_files(root)}
        assert sizes <= {bs + TRAILER}, f"a partial block is visible: sizes {sizes}"
        _r, out = rows(len(keys), bs)
        got = await store.get_many(keys, out)
        assert store.stats()["corrupt"] == 0
        for key, status, row in zip(keys, got, out):
            if key in reported:
                assert status is Status.HIT, (key.hex(), status)
            else:
                assert status in (Status.HIT, Status.MISS), (key.hex(), status)
            if status is Status.HIT:
                assert bytes(row) == payload(key, bs), key.hex()
        # and the store works on: the rest of the keys go in
        assert set(await store.put_many(keys, out)) <= {Status.STORED, Status.EXISTS}


@ONE_LOOP
async def test_two_processes_store_the_same_keys(root: Path, backend: str) -> None:
    keys = [b"proc-race-%d" % i for i in range(400)]
    args = {"root": str(root), "bs": BS, "backend": backend, "keys": [k.hex() for k in keys]}
    procs = [child("racer", args), child("racer", {**args, "keys": args["keys"][::-1]})]
    try:
        for p in procs:
            assert _readline(p, "READY") == "READY"
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = []
        for p in procs:
            results.append(json.loads(_readline(p, "results")))
    finally:
        for p in procs:
            reap(p)
    assert [p.returncode for p in procs] == [0, 0]
    first = results[0]["statuses"]
    second = results[1]["statuses"][::-1]
    for key, a, b in zip(keys, first, second):
        assert {a, b} == {"stored", "exists"}, (key, a, b)
    assert results[0]["stats"]["stored"] + results[1]["stats"]["stored"] == len(keys)
    assert results[0]["stats"]["failures"] == results[1]["stats"]["failures"] == 0
    async with opened(root, BS, backend) as store:
        _r, out = rows(len(keys), BS)
        assert await store.get_many(keys, out) == [Status.HIT] * len(keys)
        assert all(bytes(o) == payload(k, BS) for k, o in zip(keys, out))
        assert store.stats()["dead_writers_cleaned"] == 0  # both closed cleanly
    assert locks(root) == []


# ----------------------------------------------------------------------------
# cancellation and closing with work in flight
# ----------------------------------------------------------------------------


async def _check_absent_or_intact(store: object, root: Path, keys: list[bytes], bs: int) -> int:
    _r, out = rows(len(keys), bs)
    got = await store.get_many(keys, out)  # type: ignore[attr-defined]
    hits = 0
    for key, status, row in zip(keys, got, out):
        assert status in (Status.HIT, Status.MISS), (key, status)
        if status is Status.HIT:
            hits += 1
            assert bytes(row) == payload(key, bs), key
    return hits


@pytest.mark.asyncio
async def test_cancelled_put_many_leaves_blocks_absent_or_intact(root: Path, backend: str) -> None:
    n = 400
    async with opened(root, BS, backend, queue_depth=32) as store:
        outcomes = []
        for r, delay in enumerate((0.0, 0.0005, 0.002, 0.005)):
            keys = [b"cancel-%d-%d" % (r, i) for i in range(n)]
            _reg, bufs = filled_rows(keys, BS)
            task = asyncio.ensure_future(store.put_many(keys, bufs))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                await task
                outcomes.append("finished")
            except asyncio.CancelledError:
                outcomes.append("cancelled")
            await _check_absent_or_intact(store, root, keys, BS)
            # the store still works: finish the job
            statuses = await store.put_many(keys, bufs)
            assert set(statuses) <= {Status.STORED, Status.EXISTS}
            assert await _check_absent_or_intact(store, root, keys, BS) == n
        assert "cancelled" in outcomes
        assert store.stats()["corrupt"] == 0 and store.stats()["failures"] == 0


@pytest.mark.asyncio
async def test_cancelled_get_many_leaves_store_working(root: Path, backend: str) -> None:
    keys = [b"g-%d" % i for i in range(300)]
    async with opened(root, BS, backend, queue_depth=16) as store:
        _reg, bufs = filled_rows(keys, BS)
        await store.put_many(keys, bufs)
        for delay in (0.0, 0.001):
            _r, out = rows(len(keys), BS)
            task = asyncio.ensure_future(store.get_many(keys, out))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                # 300 small loads can finish within the millisecond.
                assert await task == [Status.HIT] * len(keys), delay
            except asyncio.CancelledError:
                assert delay or task.cancelled()
        assert await _check_absent_or_intact(store, root, keys, BS) == len(keys)
        assert store.stats()["corrupt"] == 0


@pytest.mark.asyncio
async def test_close_with_put_many_in_flight(root: Path, backend: str) -> None:
    keys = [b"closing-%d" % i for i in range(300)]
    async with opened(root, BS, backend, queue_depth=16) as store:
        _reg, bufs = filled_rows(keys, BS)
        task = asyncio.ensure_future(store.put_many(keys, bufs))
        await asyncio.sleep(0.001)
        await store.close()
        statuses = await task
        assert set(statuses) <= {Status.STORED, Status.FAILED}
    async with opened(root, BS, backend) as again:
        _r, out = rows(len(keys), BS)
        got = await again.get_many(keys, out)
        for key, before, now, row in zip(keys, statuses, got, out):
            if before is Status.STORED:
                assert now is Status.HIT, key
            assert now in (Status.HIT, Status.MISS), key
            if now is Status.HIT:
                assert bytes(row) == payload(key, BS), key


@ONE_LOOP
async def test_store_reopens_after_its_files_vanish(root: Path, backend: str) -> None:
    """Directories are made when a store needs them: new ones, and used ones removed behind its back."""
    async with opened(root, BS, backend) as store:
        assert not (root / "default" / "fed").exists()  # open makes no fan-out
        assert await store.put(bytes.fromhex("abcd01"), payload(b"x", BS)) is Status.STORED
        shutil.rmtree(root / "default" / "abc")  # a leaf this store has used
        for key in (bytes.fromhex("abcd02"), bytes.fromhex("fedc01")):
            assert await store.put(key, payload(key, BS)) is Status.STORED, key
            out = bytearray(BS)
            assert await store.get(key, out) is Status.HIT and out == payload(key, BS)
        assert block_file(root, bytes.fromhex("fedc01")).is_file()
