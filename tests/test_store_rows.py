"""BlockStore.put_rows / get_rows: blocks that are rows of one staging region."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import block_file, filled_rows, opened, payload, pooled_root, rows

from kvuring import Status

BS = 8192


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


@pytest.mark.asyncio
async def test_rows_round_trip(root: Path, backend: str) -> None:
    keys = [bytes([9, i, 1]) for i in range(10)]
    async with opened(root, BS, backend) as store:
        region, _r = filled_rows(keys, BS)
        assert await store.put_rows(keys, region, range(10)) == [Status.STORED] * 10
        assert all(block_file(root, k).read_bytes()[:BS] == payload(k, BS) for k in keys)
        assert await store.put_rows(keys[:1], region, [0]) == [Status.EXISTS]
        out, _o = rows(16, BS)
        got = await store.get_rows([keys[9], b"nope", keys[0]], out, [15, 3, 2])
        assert got == [Status.HIT, Status.MISS, Status.HIT]
        view = memoryview(out)
        assert view[15 * BS : 16 * BS] == payload(keys[9], BS)
        assert view[2 * BS : 3 * BS] == payload(keys[0], BS)
        # Rows farther apart than a block: every other block-sized slot.
        wide, _w = rows(20, BS)
        assert await store.get_rows(keys[:3], wide, [0, 4, 9], row_bytes=2 * BS) == [Status.HIT] * 3
        assert memoryview(wide)[8 * BS : 9 * BS] == payload(keys[1], BS)
        with pytest.raises(IndexError):
            await store.get_rows(keys[:1], wide, [10], row_bytes=2 * BS)
        with pytest.raises(TypeError, match="sequence of ints"):
            await store.get_rows(keys[:1], out, 3)  # type: ignore[arg-type]
