"""Loads first: with prioritize_loads=True stores wait while loads are in flight.

``stats()["stores_held_for_loads"]`` counts store blocks that had to wait;
a store with no load in flight must never wait, so a leak in the gate's
accounting (a load that never counts as finished) shows up as a lone store
being held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import block_file, filled_rows, opened, payload, pooled_root, rows

from kvuring import Status
from kvuring._gate import STORES_DURING_LOADS

BS = 4096


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


def _keys(n: int, tag: int) -> list[bytes]:
    return [bytes([tag, i >> 8, i & 255, 0x33]) for i in range(n)]


async def _lone_put_is_not_held(store: object, tag: int) -> None:
    keys = _keys(4, tag)
    _region, bufs = filled_rows(keys, BS)
    before = store.stats()["stores_held_for_loads"]  # type: ignore[attr-defined]
    assert await store.put_many(keys, bufs) == [Status.STORED] * 4  # type: ignore[attr-defined]
    assert store.stats()["stores_held_for_loads"] == before  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_stores_wait_for_loads(root: Path, backend: str) -> None:
    old, new = _keys(64, 1), _keys(16, 2)
    async with opened(root, BS, backend) as store:
        _r1, old_bufs = filled_rows(old, BS)
        assert await store.put_many(old, old_bufs) == [Status.STORED] * len(old)
        assert store.stats()["stores_held_for_loads"] == 0
        _r2, new_bufs = filled_rows(new, BS)
        _r3, got = rows(len(old), BS)
        # gather runs the load first: its chains are in flight when the store comes.
        loaded, stored = await asyncio.gather(
            store.get_many(old, got), store.put_many(new, new_bufs)
        )
        assert loaded == [Status.HIT] * len(old)
        assert [bytes(g) for g in got] == [payload(k, BS) for k in old]
        assert stored == [Status.STORED] * len(new)
        assert store.stats()["stores_held_for_loads"] == len(new)
        assert all(block_file(root, k).read_bytes()[:BS] == payload(k, BS) for k in new)
        await _lone_put_is_not_held(store, 3)


@pytest.mark.asyncio
async def test_held_stores_keep_moving(root: Path, backend: str) -> None:
    """Loads back to back never starve stores: STORES_DURING_LOADS keep going."""
    old, new = _keys(32, 4), _keys(24, 5)
    async with opened(root, BS, backend, queue_depth=8) as store:
        _r1, old_bufs = filled_rows(old, BS)
        await store.put_many(old, old_bufs)
        _r2, new_bufs = filled_rows(new, BS)
        done = asyncio.Event()

        async def loads() -> int:
            rounds = 0
            _r3, got = rows(len(old), BS)
            while not done.is_set():
                assert await store.get_many(old, got) == [Status.HIT] * len(old)
                rounds += 1
            return rounds

        async def stores() -> list[Status]:
            await asyncio.sleep(0)
            try:
                return await store.put_many(new, new_bufs)
            finally:
                done.set()

        rounds, stored = await asyncio.gather(loads(), stores())
        assert stored == [Status.STORED] * len(new)
        assert rounds >= 1
        assert STORES_DURING_LOADS >= 1
        await _lone_put_is_not_held(store, 6)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_cancelled_queued_loads_release_the_gate(root: Path, backend: str) -> None:
    keys = _keys(64, 7)
    async with opened(root, BS, backend, queue_depth=4) as store:
        _r1, bufs = filled_rows(keys, BS)
        await store.put_many(keys, bufs)
        _r2, got = rows(len(keys), BS)
        task = asyncio.ensure_future(store.get_many(keys, got))
        await asyncio.sleep(0)  # started: 4 chains in flight, 60 queued
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)  # the 4 in flight finish on their own
        await _lone_put_is_not_held(store, 8)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_without_priority_nothing_is_held(root: Path, backend: str) -> None:
    old, new = _keys(32, 9), _keys(8, 10)
    async with opened(root, BS, backend, prioritize_loads=False) as store:
        _r1, old_bufs = filled_rows(old, BS)
        await store.put_many(old, old_bufs)
        _r2, new_bufs = filled_rows(new, BS)
        _r3, got = rows(len(old), BS)
        await asyncio.gather(store.get_many(old, got), store.put_many(new, new_bufs))
        assert store.stats()["stores_held_for_loads"] == 0


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_close_fails_held_stores_cleanly(root: Path, backend: str) -> None:
    old, new = _keys(64, 11), _keys(16, 12)
    store_cm = opened(root, BS, backend, clean=False)
    store = await store_cm.__aenter__()
    try:
        _r1, old_bufs = filled_rows(old, BS)
        await store.put_many(old, old_bufs)
        _r2, new_bufs = filled_rows(new, BS)
        _r3, got = rows(len(old), BS)
        loaded, stored, _ = await asyncio.gather(
            store.get_many(old, got), store.put_many(new, new_bufs), store.close()
        )
    finally:
        await store_cm.__aexit__(None, None, None)
    assert loaded == [Status.HIT] * len(old)
    assert set(stored) <= {Status.STORED, Status.FAILED}
    assert Status.FAILED in stored  # held ones never ran
    for key, status in zip(new, stored):
        assert block_file(root, key).exists() == (status is Status.STORED)
