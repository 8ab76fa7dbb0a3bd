"""Registered (fixed) buffers: ``fixed_buffers=True``, ``register()``, aligned_buffer regions.

Blocks whose memory lies in a registered region move with READ_FIXED /
WRITE_FIXED; ``stats()["fixed_transfers"]`` counts them, so these tests
fail if the fixed path silently stops being taken, and they check the bytes
on disk and in memory, so they fail if it moves the wrong ones.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import (
    TRAILER,
    block_file,
    filled_rows,
    odirect_works,
    opened,
    payload,
    pooled_root,
    rows,
)

from kvuring import Status, aligned_buffer
from kvuring._regions import MAX_SPAN, FixedBuffers
from kvuring.engine import ThreadRing

BS = 4096
ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


def _keys(n: int, tag: int) -> list[bytes]:
    return [bytes([tag, i >> 8, i & 255, 7]) for i in range(n)]


def _make_dirs(root: Path, keys: list[bytes], verify: bool = True) -> None:
    """The blocks' directories, as a store in use has them.

    The first store into a directory that does not exist yet runs its chain
    again after making it, and the core counts the fixed transfers of both
    chains; these tests count one chain per block.
    """
    for key in keys:
        block_file(root, key, verify=verify).parent.mkdir(parents=True, exist_ok=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("verify", [True, False])
async def test_aligned_buffer_rows_move_fixed(root: Path, backend: str, verify: bool) -> None:
    keys = _keys(24, 1)
    _make_dirs(root, keys, verify)
    async with opened(root, BS, backend, fixed_buffers=True, verify=verify) as store:
        _region, bufs = filled_rows(keys, BS)
        assert await store.put_many(keys, bufs) == [Status.STORED] * len(keys)
        stats = store.stats()
        assert stats["fixed_buffers_active"] is True
        # The trailer pages (verify) and the caller's region, registered on first sight.
        assert stats["registered_regions"] == (2 if verify else 1)
        assert stats["fixed_transfers"] == len(keys)
        _out, got = rows(len(keys), BS)
        assert await store.get_many(keys, got) == [Status.HIT] * len(keys)
        assert [bytes(g) for g in got] == [payload(k, BS) for k in keys]
        assert store.stats()["fixed_transfers"] == 2 * len(keys)
    for key in keys:
        data = block_file(root, key, verify=verify).read_bytes()
        assert len(data) == BS + (TRAILER if verify else 0)
        assert data[:BS] == payload(key, BS)


@ONE_LOOP
async def test_explicit_register_and_unregister(root: Path, backend: str) -> None:
    keys = _keys(8, 2)
    region = mmap.mmap(-1, len(keys) * BS)
    view = memoryview(region)
    bufs = [view[i * BS : (i + 1) * BS] for i in range(len(keys))]
    for key, buf in zip(keys, bufs):
        buf[:] = payload(key, BS)
    _make_dirs(root, keys)
    async with opened(root, BS, backend, fixed_buffers=True) as store:
        assert store.register(region) is True
        assert store.register(region) is True  # already registered: nothing new
        assert store.stats()["registered_regions"] == 2
        assert await store.put_many(keys[:4], bufs[:4]) == [Status.STORED] * 4
        assert store.stats()["fixed_transfers"] == 4
        assert store.unregister(region) is True
        assert store.unregister(region) is False
        assert store.stats()["registered_regions"] == 1
        # No longer registered: the same memory moves with plain transfers.
        assert await store.put_many(keys[4:], bufs[4:]) == [Status.STORED] * 4
        assert store.stats()["fixed_transfers"] == 4
        _out, got = rows(len(keys), BS)
        assert await store.get_many(keys, got) == [Status.HIT] * len(keys)
        assert [bytes(g) for g in got] == [payload(k, BS) for k in keys]
    del view, bufs, buf
    region.close()  # the store let go of it at close


@ONE_LOOP
async def test_register_rejects_bad_buffers(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        with pytest.raises(RuntimeError, match="fixed_buffers=True"):
            store.register(aligned_buffer(BS))
        assert store.unregister(aligned_buffer(BS)) is False
    async with opened(root, BS, backend, fixed_buffers=True) as store:
        with pytest.raises(TypeError, match="writable"):
            store.register(bytes(BS))
        with pytest.raises(TypeError, match="buffer protocol"):
            store.register(object())  # type: ignore[arg-type]


@ONE_LOOP
async def test_closing_a_registered_region(root: Path, backend: str) -> None:
    """Closing an aligned_buffer first takes it out of the store; the store keeps working."""
    keys = _keys(6, 3)
    _make_dirs(root, keys)
    async with opened(root, BS, backend, fixed_buffers=True) as store:
        region, bufs = filled_rows(keys[:3], BS)
        assert await store.put_many(keys[:3], bufs) == [Status.STORED] * 3
        assert store.stats()["registered_regions"] == 2
        del bufs
        region.close()  # an mmap with exports raises BufferError; this one is let go first
        assert store.stats()["registered_regions"] == 1
        with aligned_buffer(3 * BS) as other:
            view = memoryview(other)
            rows_ = [view[i * BS : (i + 1) * BS] for i in range(3)]
            for key, row in zip(keys[3:], rows_):
                row[:] = payload(key, BS)
            assert await store.put_many(keys[3:], rows_) == [Status.STORED] * 3
            assert store.stats()["registered_regions"] == 2
            del view, rows_, row
        assert store.stats()["registered_regions"] == 1
        assert store.stats()["fixed_transfers"] == 6
        _out, got = rows(len(keys), BS)
        assert await store.get_many(keys, got) == [Status.HIT] * len(keys)
        assert [bytes(g) for g in got] == [payload(k, BS) for k in keys]


@ONE_LOOP
async def test_fixed_direct_io_detects_damage(tmp_path: Path, backend: str) -> None:
    """On a disk with O_DIRECT: fixed transfers round trip, and damage is still caught."""
    if not odirect_works(tmp_path):
        pytest.skip("no O_DIRECT under the test directory")
    bs = 16 * 4096
    keys = _keys(6, 4)
    _make_dirs(tmp_path, keys)
    async with opened(tmp_path, bs, backend, fixed_buffers=True) as store:
        assert store.stats()["direct_io"] is True
        _region, bufs = filled_rows(keys, bs)
        assert await store.put_many(keys, bufs) == [Status.STORED] * len(keys)
        flipped, truncated = block_file(tmp_path, keys[0]), block_file(tmp_path, keys[1])
        with open(flipped, "r+b") as f:
            f.seek(bs // 2)
            byte = f.read(1)
            f.seek(bs // 2)
            f.write(bytes([byte[0] ^ 0x40]))
        os.truncate(truncated, bs)  # the trailer read comes back empty
        _out, got = rows(len(keys), bs)
        statuses = await store.get_many(keys, got)
        assert statuses == [Status.CORRUPT, Status.CORRUPT] + [Status.HIT] * 4
        assert [bytes(g) for g in got[2:]] == [payload(k, bs) for k in keys[2:]]
        assert store.stats()["fixed_transfers"] == 2 * len(keys)
        assert not flipped.exists() and not truncated.exists()


def test_regions_over_the_kernel_span_take_several_slots() -> None:
    """A region bigger than 1 GiB is registered in 1 GiB spans; a block across spans is not fixed."""
    engine = ThreadRing(slots=4, threads=1)
    try:
        fixed = FixedBuffers(engine)
        big = mmap.mmap(-1, MAX_SPAN + 2 * BS)  # untouched: no memory is used
        assert fixed.add(big)
        base = memoryview(big)
        import kvuring._binding as b

        pin = b.pin_buffer(base, writable=True)
        addr = b.address_of(pin)
        first, second = fixed.slot_for(addr, BS), fixed.slot_for(addr + MAX_SPAN, 2 * BS)
        assert first >= 0 and second >= 0 and first != second
        assert fixed.slot_for(addr + MAX_SPAN - BS, 2 * BS) == -1
        assert fixed.slot_for(addr + MAX_SPAN + BS, 2 * BS) == -1  # runs past the end
        assert fixed.slot_for(addr - BS, BS) == -1
        assert fixed.stats()["registered_bytes"] == MAX_SPAN + 2 * BS
        b.ffi.release(pin)
        del base
        assert fixed.remove(big)
        assert fixed.slot_for(addr, BS) == -1
        big.close()
    finally:
        engine.close()
