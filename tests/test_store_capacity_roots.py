"""capacity_bytes over several roots: a budget per root (docs/capacity.md, docs/disks.md).

What is checked: one int is each root's budget, a list gives one per root
(its length and elements are checked); repeated puts keep every root's
block files within its budget (plus the batch in flight), the oldest
blocks of each root go first and only from the root that is over; an
eviction removes the copy on the root it is for and leaves a copy on
another root; stats() has the totals and each root's ``used_bytes`` and
``capacity_bytes``; a store reopened over the roots accounts what each
holds, and trims each to its (smaller) budget; PollingStore.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import xxhash
from store_helpers import block_file, filled_rows, payload, three_roots
from test_store_capacity import disk_bytes, on_disk

from kvuring import BlockStore, PollingStore, Status

roots = three_roots

BS = 4096
FS = BS + 4096  # file bytes of a verified block: payload + trailer


def keys_of(tag: int, n: int, start: int = 0) -> list[bytes]:
    return [bytes([tag]) + i.to_bytes(4, "big") for i in range(start, start + n)]


def first_root(key: bytes, roots: Sequence[Path]) -> int:
    """The root a key's block goes to (rendezvous: the highest xxh3 seeded with the root's id)."""
    ids = [xxhash.xxh3_64_intdigest(os.fsencode(os.path.abspath(r))) for r in roots]
    scores = [xxhash.xxh3_64_intdigest(key, seed=i) for i in ids]
    return scores.index(max(scores))


def keys_on(tag: int, root: int, n: int, roots: Sequence[Path]) -> list[bytes]:
    """``n`` keys whose first root is ``root``."""
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        key = keys_of(tag, 1, i)[0]
        if first_root(key, roots) == root:
            out.append(key)
        i += 1
    return out


@contextlib.asynccontextmanager
async def opened(roots: Sequence[Path], backend: str, **kw: Any) -> AsyncIterator[BlockStore]:
    store = BlockStore(list(roots), BS, backend=backend, **kw)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
    ring = store.stats()["ring"]
    assert ring["in_flight"] == 0 and ring["waiting"] == 0 and ring["stray_cqes"] == 0, ring


async def until(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def per_root(store: BlockStore | PollingStore, key: str) -> list[Any]:
    return [r[key] for r in store.stats()["roots"]]


async def settled(store: BlockStore, roots: Sequence[Path]) -> None:
    """Evictions in flight are done: each root's count matches its disk."""

    def done() -> bool:
        return store.stats()["evicting"] == 0 and per_root(store, "used_bytes") == [
            disk_bytes(r) for r in roots
        ]

    await until(done, what="used == disk on every root")


# ----------------------------------------------------------------------------
# arguments and stats
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BlockStore, PollingStore])
def test_capacity_bytes_per_root_argument(cls: type[Any], roots: list[Path]) -> None:
    for bad in ([1 << 20], [1 << 20] * 2, [1 << 20] * 4, (), []):
        with pytest.raises(ValueError, match=f"{len(bad)} budgets for 3 roots"):
            cls(roots, BS, capacity_bytes=bad)
    for bad_one in (True, 1.5, "4096", None, b"1", [1]):
        with pytest.raises(TypeError, match="capacity_bytes"):
            cls(roots, BS, capacity_bytes=[1 << 20, bad_one, 1 << 20])
    for bad_one in (0, -1):
        with pytest.raises(ValueError, match="capacity_bytes must be positive"):
            cls(roots, BS, capacity_bytes=[1 << 20, 1 << 20, bad_one])
    with pytest.raises(TypeError, match="capacity_bytes"):
        cls(roots, BS, capacity_bytes={1 << 20})
    # one int: each root's budget
    s = cls(roots, BS, capacity_bytes=1 << 30).stats()
    assert (s["capacity_bytes"], s["used_bytes"], s["evicted"]) == (3 << 30, None, 0)
    assert [r["capacity_bytes"] for r in s["roots"]] == [1 << 30] * 3
    assert [r["used_bytes"] for r in s["roots"]] == [None] * 3
    # a list or a tuple: one per root
    s = cls(roots, BS, capacity_bytes=(1 << 20, 2 << 20, 3 << 20)).stats()
    assert s["capacity_bytes"] == 6 << 20
    assert [r["capacity_bytes"] for r in s["roots"]] == [1 << 20, 2 << 20, 3 << 20]
    # a list for one root
    s = cls(roots[0], BS, capacity_bytes=[1 << 20]).stats()
    assert s["capacity_bytes"] == 1 << 20 and s["roots"][0]["capacity_bytes"] == 1 << 20
    s = cls(roots, BS).stats()
    assert s["capacity_bytes"] is None
    assert [r["capacity_bytes"] for r in s["roots"]] == [None] * 3


# ----------------------------------------------------------------------------
# each root within its budget, LRU per root
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("budget", ["one", "list"])
async def test_every_root_kept_within_its_budget(
    roots: list[Path], backend: str, budget: str
) -> None:
    caps = [12 * FS] * 3 if budget == "one" else [12 * FS, 20 * FS, 8 * FS]
    batch = 8
    arg: int | list[int] = caps[0] if budget == "one" else caps
    async with opened(roots, backend, capacity_bytes=arg) as store:
        await until(lambda: store.stats()["capacity_scans"] >= 1, what="the scan")
        assert per_root(store, "capacity_bytes") == caps
        written: list[bytes] = []
        for n in range(25):
            keys = keys_of(2, batch, n * batch)
            _r, bufs = filled_rows(keys, BS)
            assert await store.put_many(keys, bufs) == [Status.STORED] * batch
            written += keys
            used = per_root(store, "used_bytes")
            assert all(u <= cap for u, cap in zip(used, caps)), (used, caps)
            for r, cap in zip(roots, caps):
                assert disk_bytes(r) <= cap + batch * FS  # the batch in flight may overshoot
            for key in keys:
                assert block_file(roots[first_root(key, roots)], key).is_file(), (
                    "a put evicted one of its own blocks"
                )
        await settled(store, roots)
        s = store.stats()
        present = [on_disk(r) for r in roots]
        assert s["used_bytes"] == sum(sum(p.values()) for p in present)
        assert s["capacity_bytes"] == sum(caps)
        assert s["used_blocks"] == sum(map(len, present))
        assert s["evicted"] == len(written) - sum(map(len, present))
        for i, (p, cap) in enumerate(zip(present, caps)):
            assert sum(p.values()) <= cap
            mine = [key for key in written if first_root(key, roots) == i]
            # each root keeps its own most recent blocks, and only its own
            assert set(p) == set(mine[len(mine) - len(p) :]), f"root {i}: not the oldest went"
            assert s["roots"][i]["evicted"] == len(mine) - len(p)
            assert s["roots"][i]["used_bytes"] == sum(p.values())
            assert s["roots"][i]["stored"] == len(mine)


@pytest.mark.asyncio
async def test_least_recently_used_per_root(roots: list[Path], backend: str) -> None:
    two = roots[:2]
    a = keys_on(3, 0, 13, two)
    b = keys_on(4, 1, 10, two)
    async with opened(two, backend, capacity_bytes=10 * FS) as store:
        for key in [*a[:10], *b]:  # both roots full: 10 blocks each
            assert await store.put(key, payload(key, BS)) is Status.STORED
        assert store.stats()["evicted"] == 0
        assert await store.get(a[0], bytearray(BS)) is Status.HIT  # a0 is now the youngest
        # root 0 passes its budget: its two oldest but a0 go; root 1 keeps everything
        assert await store.put(a[10], payload(a[10], BS)) is Status.STORED
        await settled(store, two)
        assert set(on_disk(two[0])) == {a[0], *a[3:11]}
        assert set(on_disk(two[1])) == set(b)
        assert per_root(store, "evicted") == [2, 0]
        # EXISTS is use on the root it is on
        assert await store.put(a[3], payload(a[3], BS)) is Status.EXISTS
        assert await store.put(a[11], payload(a[11], BS)) is Status.STORED  # 10: no eviction
        assert per_root(store, "evicted") == [2, 0]
        assert await store.put(a[12], payload(a[12], BS)) is Status.STORED
        await settled(store, two)
        assert set(on_disk(two[0])) == {*a[6:13], a[0], a[3]}
        assert set(on_disk(two[1])) == set(b)
        assert per_root(store, "evicted") == [4, 0]
        assert per_root(store, "used_bytes") == [9 * FS, 10 * FS]


@pytest.mark.asyncio
async def test_eviction_removes_only_the_copy_on_the_full_root(
    roots: list[Path], backend: str
) -> None:
    two = roots[:2]
    key = keys_on(5, 0, 1, two)[0]
    # a copy on root 1 (as if stored while root 0 was failing), before the store opens
    async with BlockStore(two[1], BS, backend=backend) as single:
        assert await single.put(key, payload(key, BS)) is Status.STORED
    async with opened(two, backend, capacity_bytes=4 * FS) as store:
        await until(lambda: store.stats()["capacity_scans"] >= 1, what="the scan")
        assert per_root(store, "used_bytes") == [0, FS]
        assert await store.put(key, payload(key, BS)) is Status.STORED  # root 0's copy
        assert per_root(store, "used_bytes") == [FS, FS]
        others = keys_on(6, 0, 4, two)
        for other in others:  # the fifth block on root 0: key and others[0] go from it
            assert await store.put(other, payload(other, BS)) is Status.STORED
        await settled(store, two)
        assert set(on_disk(two[0])) == set(others[1:])
        assert block_file(two[1], key).is_file(), "the eviction removed the other root's copy"
        assert per_root(store, "evicted") == [2, 0]
        assert per_root(store, "used_bytes") == [3 * FS, FS]
        out = bytearray(BS)
        assert await store.get(key, out) is Status.HIT  # from root 1
        assert out == payload(key, BS)
        # a delete still removes every copy
        assert await store.delete_many([key]) == [True]
        assert per_root(store, "used_bytes") == [3 * FS, 0]
        assert not block_file(two[1], key).exists()


# ----------------------------------------------------------------------------
# reopening
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_reopened_store_accounts_every_root(roots: list[Path], backend: str) -> None:
    keys = keys_of(7, 90)
    _r, bufs = filled_rows(keys, BS)
    async with opened(roots, backend, capacity_bytes=100 * FS) as store:
        assert await store.put_many(keys, bufs) == [Status.STORED] * len(keys)
    on = [first_root(key, roots) for key in keys]
    counts = [on.count(i) for i in range(3)]
    assert min(counts) > 10, counts
    async with opened(roots, backend, capacity_bytes=100 * FS) as store:
        await until(lambda: store.stats()["capacity_scans"] >= 1, what="the scan")
        assert per_root(store, "used_bytes") == [n * FS for n in counts]
        assert store.stats()["used_bytes"] == len(keys) * FS
        assert store.stats()["evicted"] == 0
    # smaller budgets: each root is trimmed to its own, oldest first
    base = time.time_ns() - 10**13
    for i, key in enumerate(keys):  # key i was last used at base + i seconds
        t = base + i * 10**9
        os.utime(block_file(roots[on[i]], key), ns=(t, t))
    caps = [8 * FS, 10 * FS, 1 << 30]
    async with opened(roots, backend, capacity_bytes=caps) as store:
        await until(lambda: store.stats()["evicted"] > 0, what="the trim")
        await settled(store, roots)
        for i, cap in enumerate(caps):
            mine = [key for key, r in zip(keys, on) if r == i]
            keep = len(mine) if len(mine) * FS <= cap else int(cap * 0.95) // FS
            assert set(on_disk(roots[i])) == set(mine[len(mine) - keep :]), f"root {i}"
        assert per_root(store, "evicted") == [
            counts[0] - int(8 * FS * 0.95) // FS,
            counts[1] - int(10 * FS * 0.95) // FS,
            0,
        ]


# ----------------------------------------------------------------------------
# PollingStore
# ----------------------------------------------------------------------------


def test_polling_store_budget_per_root(roots: list[Path], backend: str) -> None:
    caps = [6 * FS, 4 * FS, 5 * FS]
    keys = keys_of(8, 60)
    with PollingStore(roots, BS, backend=backend, capacity_bytes=caps) as store:
        for i in range(0, len(keys), 5):
            _r, bufs = filled_rows(keys[i : i + 5], BS)
            store.submit_put(keys[i : i + 5], bufs)
            assert store.drain()[0].results == [Status.STORED] * 5
            for r, cap in zip(roots, caps):
                assert disk_bytes(r) <= cap + 5 * FS
        deadline = time.monotonic() + 10
        while per_root(store, "used_bytes") != [disk_bytes(r) for r in roots]:
            assert time.monotonic() < deadline, "the evictions did not finish"
            store.poll()
            time.sleep(0.005)
        for used, cap in zip(per_root(store, "used_bytes"), caps):
            assert used <= cap
        s = store.stats()
        assert s["evicted"] == len(keys) - sum(len(on_disk(r)) for r in roots)


@pytest.mark.asyncio
async def test_core_batch_pinned_to_one_root(roots: list[Path], backend: str) -> None:
    """The C core's ``root_in``: each block goes to that root only (no moving on)."""
    from kvuring import _blocks as core_api

    two = roots[:2]
    key = keys_on(9, 0, 1, two)[0]
    async with opened(two, backend) as store:
        assert await store.put(key, payload(key, BS)) is Status.STORED
        runner = store._runner
        assert runner is not None

        async def run(kind: int, pins: bytes) -> list[tuple[int, int]]:
            done: asyncio.Future[core_api.CoreBatch] = asyncio.get_running_loop().create_future()
            batch = core_api.CoreBatch(kind, [key] * len(pins), None, quiet=True, root_in=pins)
            runner.core.add(batch, done.set_result)
            runner._kick()
            await done
            return list(zip(batch.status, batch.error))

        present, absent = core_api.PRESENT, core_api.ABSENT
        assert await run(core_api.STAT, bytes([0, 1])) == [(present, 0), (absent, 0)]
        assert await run(core_api.STAT, bytes([2])) == [(core_api.FAILED, errno.EINVAL)]
        with pytest.raises(ValueError, match="root_in"):
            core_api.CoreBatch(core_api.STAT, [key], None, root_in=b"")
        assert await run(core_api.DELETE, bytes([1])) == [(absent, 0)]  # not on root 1
        assert block_file(two[0], key).is_file()
        assert await run(core_api.DELETE, bytes([0])) == [(present, 0)]
        assert not block_file(two[0], key).exists()
