"""Checksums of big blocks on worker threads (put_many / get_many of blocks >= 256 KiB).

The stored checksum is compared with an independent xxh3-64 of the payload
(``xxhash`` directly, at the offset docs/format.md gives), so a wrong sum
from the worker threads fails here; damaged payloads must still come back
CORRUPT and be removed, and nothing else may change.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from store_helpers import block_file, filled_rows, opened, payload, pooled_root, rows

from kvuring import Status
from kvuring.store import HASH_OFFLOAD_MIN

BS = HASH_OFFLOAD_MIN
PSUM_AT = 92  # payload checksum's offset in the trailer (docs/format.md)


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


def _keys(n: int, tag: int) -> list[bytes]:
    return [bytes([tag, i, 0x5A, 9]) for i in range(n)]


@pytest.mark.asyncio
async def test_big_blocks_are_summed_off_the_loop(root: Path, backend: str) -> None:
    keys = _keys(10, 1)
    async with opened(root, BS, backend) as store:
        _region, bufs = filled_rows(keys, BS)
        assert await store.put_many(keys, bufs) == [Status.STORED] * len(keys)
        assert store.stats()["offloaded_checksums"] == len(keys)
        for key in keys:
            data = block_file(root, key).read_bytes()
            (psum,) = struct.unpack_from("<Q", data, BS + PSUM_AT)
            assert psum == xxhash.xxh3_64_intdigest(payload(key, BS))
        _out, got = rows(len(keys), BS)
        assert await store.get_many(keys, got) == [Status.HIT] * len(keys)
        assert [bytes(g) for g in got] == [payload(k, BS) for k in keys]
        stats = store.stats()
        assert stats["offloaded_checksums"] == 2 * len(keys)
        assert stats["hits"] == len(keys) and stats["corrupt"] == 0
        assert stats["bytes_read"] == len(keys) * BS
        # One block alone is summed inline (no thread hand-off for one).
        assert await store.get(keys[0], got[0]) is Status.HIT
        assert store.stats()["offloaded_checksums"] == 2 * len(keys)


@pytest.mark.asyncio
async def test_damaged_big_blocks_are_caught(root: Path, backend: str) -> None:
    keys = _keys(8, 2)
    async with opened(root, BS, backend) as store:
        _region, bufs = filled_rows(keys, BS)
        assert await store.put_many(keys, bufs) == [Status.STORED] * len(keys)
        damaged = {1: BS - 1, 4: 0, 6: BS // 2}
        for i, offset in damaged.items():
            with open(block_file(root, keys[i]), "r+b") as f:
                f.seek(offset)
                byte = f.read(1)
                f.seek(offset)
                f.write(bytes([byte[0] ^ 1]))
        _out, got = rows(len(keys), BS)
        statuses = await store.get_many(keys, got)
        assert statuses == [
            Status.CORRUPT if i in damaged else Status.HIT for i in range(len(keys))
        ]
        for i, key in enumerate(keys):
            assert block_file(root, key).exists() == (i not in damaged)
            if i not in damaged:
                assert bytes(got[i]) == payload(key, BS)
        stats = store.stats()
        assert stats["corrupt"] == len(damaged) and stats["deleted"] == 0
        assert stats["hits"] == len(keys) - len(damaged)
        # Removed, so now they are misses.
        again = await store.get_many([keys[i] for i in damaged], got[: len(damaged)])
        assert again == [Status.MISS] * len(damaged)


@pytest.mark.asyncio
async def test_unaligned_big_blocks_mixed_in(root: Path, backend: str) -> None:
    """Bytes (stores) and bytearrays (loads) beside aligned rows: all summed right."""
    keys = _keys(6, 3)
    async with opened(root, BS, backend) as store:
        _region, aligned = filled_rows(keys[:3], BS)
        plain = [payload(k, BS) for k in keys[3:]]
        assert await store.put_many(keys, [*aligned, *plain]) == [Status.STORED] * len(keys)
        targets = [bytearray(BS) for _ in keys[:3]]
        _out, rows_ = rows(3, BS)
        statuses = await store.get_many(keys, [*targets, *rows_])
        assert statuses == [Status.HIT] * len(keys)
        assert [bytes(t) for t in [*targets, *rows_]] == [payload(k, BS) for k in keys]


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_cancelled_while_summing(root: Path, backend: str) -> None:
    """Cancelled while its sums are computed: nothing half-written, buffers given back."""
    keys = _keys(32, 4)
    region, bufs = filled_rows(keys, BS)
    async with opened(root, BS, backend) as store:
        task = asyncio.ensure_future(store.put_many(keys, bufs))
        await asyncio.sleep(0)  # hashing has started, no write yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Whatever was stored is whole; the rest stores now.
        statuses = await store.put_many(keys, bufs)
        assert set(statuses) <= {Status.STORED, Status.EXISTS}
        _out, got = rows(len(keys), BS)
        assert await store.get_many(keys, got) == [Status.HIT] * len(keys)
        assert [bytes(g) for g in got] == [payload(k, BS) for k in keys]
    del bufs
    region.close()  # every pin on it was released
