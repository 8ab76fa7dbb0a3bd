"""BlockStore integrity: damaged files are CORRUPT (and removed), readers never see partial blocks.

Damage is done to real files on disk between a put and a get; each case
names the byte or the change, so a failure says which check is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from store_helpers import (
    TRAILER,
    block_file,
    block_files,
    filled_rows,
    flip,
    opened,
    payload,
    pooled_root,
    rows,
    stray_files,
)

from kvuring import BlockStore, Status

BS = 8192
ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


# Trailer layout (docs/format.md): magic 0..3, version 4..5, trailer size 6..7,
# algorithm 8..11, payload length 12..19, key length 20..21, reserved 22..27,
# key 28..91, payload checksum 92..99, trailer checksum 100..107.
def _flip_at(offset: int) -> Callable[[Path, Path], None]:
    return lambda path, _root: flip(path, offset)


def _truncate_to(size: int) -> Callable[[Path, Path], None]:
    return lambda path, _root: os.truncate(path, size)


def _zero_fill(path: Path, _root: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _garbage(path: Path, _root: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _payload_of_other_key(path: Path, _root: Path) -> None:
    # a well-formed file whose payload was swapped for another same-sized one
    raw = bytearray(path.read_bytes())
    raw[:BS] = payload(b"someone else", BS)
    path.write_bytes(bytes(raw))


DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "payload first byte": _flip_at(0),
    "payload middle byte": _flip_at(BS // 2),
    "payload last byte": _flip_at(BS - 1),
    "payload replaced": _payload_of_other_key,
    "trailer magic": _flip_at(BS + 0),
    "trailer version": _flip_at(BS + 4),
    "trailer size field": _flip_at(BS + 6),
    "trailer algorithm": _flip_at(BS + 8),
    "trailer payload length": _flip_at(BS + 12),
    "trailer key length": _flip_at(BS + 20),
    "trailer reserved": _flip_at(BS + 24),
    "trailer key first byte": _flip_at(BS + 28),
    "trailer key last byte": _flip_at(BS + 28 + 63),
    "trailer payload checksum": _flip_at(BS + 92),
    "trailer checksum": _flip_at(BS + 100),
    "truncated to payload": _truncate_to(BS),
    "truncated mid payload": _truncate_to(BS // 2),
    "truncated mid trailer": _truncate_to(BS + 100),
    "truncated by one byte": _truncate_to(BS + TRAILER - 1),
    "truncated to nothing": _truncate_to(0),
    "zero filled": _zero_fill,
    "random bytes": _garbage,
}


@pytest.mark.asyncio
async def test_damaged_blocks_are_corrupt_removed_and_counted(root: Path, backend: str) -> None:
    names = list(DAMAGE)
    keys = [f"damaged-{i}".encode() for i in range(len(names))]
    intact = [f"intact-{i}".encode() for i in range(8)]
    everything = keys + intact
    async with opened(root, BS, backend) as store:
        _r, bufs = filled_rows(everything, BS)
        assert await store.put_many(everything, bufs) == [Status.STORED] * len(everything)
        for key, name in zip(keys, names):
            DAMAGE[name](block_file(root, key), root)
        _r2, out = rows(len(everything), BS)
        got = await store.get_many(everything, out)
        wrong = {n: s for n, s in zip(names, got) if s is not Status.CORRUPT}
        assert wrong == {}, f"damage not detected: {wrong}"
        assert got[len(keys) :] == [Status.HIT] * len(intact)
        for key, row in zip(intact, out[len(keys) :]):
            assert bytes(row) == payload(key, BS)
        s = store.stats()
        assert s["corrupt"] == len(keys)
        assert s["hits"] == len(intact)
        assert s["failures"] == 0
        left = [n for n, k in zip(names, keys) if block_file(root, k).exists()]
        assert left == [], f"corrupt files not removed: {left}"
        # the next load is a plain miss, and the key can be stored again
        assert await store.get_many(keys, out[: len(keys)]) == [Status.MISS] * len(keys)
        assert store.stats()["corrupt"] == len(keys)
        _r3, fresh = filled_rows(keys, BS)
        assert await store.put_many(keys, fresh) == [Status.STORED] * len(keys)
        assert await store.get_many(keys, out[: len(keys)]) == [Status.HIT] * len(keys)
        assert all(bytes(o) == payload(k, BS) for k, o in zip(keys, out))


@pytest.mark.asyncio
async def test_single_get_of_damaged_block(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        await store.put(b"one", payload(b"one", BS))
        flip(block_file(root, b"one"), 17)
        out = bytearray(BS)
        assert await store.get(b"one", out) is Status.CORRUPT  # a status, not an exception
        assert not block_file(root, b"one").exists()
        assert await store.get(b"one", out) is Status.MISS
        assert await store.contains_many([b"one"]) == [False]


@pytest.mark.asyncio
async def test_block_copied_to_another_keys_path_is_corrupt(root: Path, backend: str) -> None:
    # b"\x01\x02" and b"\x01\x02\x00" share a leaf directory (hex 0102 / 010200);
    # a file of one copied under the other's name differs only in the key length.
    a, b, c = b"\x01\x02", b"\x01\x02\x00", b"unrelated key"
    async with opened(root, BS, backend) as store:
        await store.put(a, payload(a, BS))
        for other in (b, c):
            dst = block_file(root, other)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(block_file(root, a), dst)
        out = bytearray(BS)
        assert await store.get_many([b, c, a], [out, bytearray(BS), bytearray(BS)]) == [
            Status.CORRUPT,
            Status.CORRUPT,
            Status.HIT,
        ]
        assert not block_file(root, b).exists() and not block_file(root, c).exists()
        assert block_file(root, a).exists()
        assert store.stats()["corrupt"] == 2


@pytest.mark.asyncio
async def test_block_of_another_block_size_is_not_a_hit(root: Path, backend: str) -> None:
    """A namespace refuses another block size (its manifest); a block copied across is CORRUPT."""
    async with opened(root, 2 * BS, backend, namespace="big") as big:
        await big.put(b"sized", payload(b"sized", 2 * BS))
    with pytest.raises(ValueError, match=f"holds block_size {2 * BS}"):
        await BlockStore(root, BS, backend=backend, namespace="big").open()
    async with opened(root, BS, backend) as small:
        copied = block_file(root, b"sized")
        copied.parent.mkdir(parents=True, exist_ok=True)
        copied.write_bytes(block_file(root, b"sized", ns="big").read_bytes())
        out = bytearray(BS)
        assert await small.get(b"sized", out) in (Status.CORRUPT, Status.MISS)
    assert block_file(root, b"sized", ns="big").is_file()


@pytest.mark.asyncio
async def test_raw_blocks_short_file_is_corrupt(root: Path, backend: str) -> None:
    keys = [b"r-short", b"r-empty", b"r-ok"]
    async with opened(root, BS, backend, verify=False) as store:
        _r, bufs = filled_rows(keys, BS)
        await store.put_many(keys, bufs)
        os.truncate(block_file(root, b"r-short", verify=False), BS - 1)
        os.truncate(block_file(root, b"r-empty", verify=False), 0)
        _r2, out = rows(3, BS)
        assert await store.get_many(keys, out) == [Status.CORRUPT, Status.CORRUPT, Status.HIT]
        assert bytes(out[2]) == payload(b"r-ok", BS)
        assert not block_file(root, b"r-short", verify=False).exists()
        assert not block_file(root, b"r-empty", verify=False).exists()
        assert await store.get_many(keys[:2], out[:2]) == [Status.MISS, Status.MISS]
        assert store.stats()["corrupt"] == 2


# ----------------------------------------------------------------------------
# atomic publish
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_readers_never_see_partial_blocks(root: Path, backend: str) -> None:
    """Loads racing with stores of the same keys see HIT (exact bytes) or MISS, never CORRUPT."""
    bs = 64 * 1024
    keys = [i.to_bytes(3, "big") for i in range(160)]
    async with (
        opened(root, bs, backend, queue_depth=32) as writer,
        opened(root, bs, backend, queue_depth=32) as reader,
    ):
        _r, bufs = filled_rows(keys, bs)
        _r2, out = rows(len(keys), bs)
        expect = [payload(k, bs) for k in keys]

        async def write() -> list[Status]:
            statuses: list[Status] = []
            for i in range(0, len(keys), 16):
                statuses += await writer.put_many(keys[i : i + 16], bufs[i : i + 16])
            return statuses

        task = asyncio.ensure_future(write())
        rounds = hits = 0
        while not task.done() or rounds < 2:
            got = await reader.get_many(keys, out)
            rounds += 1
            for i, status in enumerate(got):
                assert status in (Status.HIT, Status.MISS), (i, status)
                if status is Status.HIT:
                    hits += 1
                    assert bytes(out[i]) == expect[i], i
        assert await task == [Status.STORED] * len(keys)
        assert reader.stats()["corrupt"] == 0 and writer.stats()["corrupt"] == 0
        assert await reader.get_many(keys, out) == [Status.HIT] * len(keys)
        assert hits > 0
    sizes = {p.stat().st_size for p in block_files(root)}
    assert sizes == {bs + TRAILER}
    assert stray_files(root) == []


@pytest.mark.asyncio
async def test_two_stores_racing_on_the_same_keys(root: Path, backend: str) -> None:
    """Both finish with STORED or EXISTS only; each key is STORED exactly once; all intact."""
    keys = [b"race-%d" % i for i in range(300)]
    async with (
        opened(root, BS, backend, queue_depth=64) as s1,
        opened(root, BS, backend, queue_depth=64) as s2,
    ):
        _r1, b1 = filled_rows(keys, BS)
        _r2, b2 = filled_rows(keys[::-1], BS)
        r1, r2 = await asyncio.gather(s1.put_many(keys, b1), s2.put_many(keys[::-1], b2))
        r2 = r2[::-1]
        for i, (x, y) in enumerate(zip(r1, r2)):
            assert {x, y} == {Status.STORED, Status.EXISTS}, (i, x, y)
        assert s1.stats()["stored"] + s2.stats()["stored"] == len(keys)
        assert s1.stats()["failures"] + s2.stats()["failures"] == 0
        _r3, out = rows(len(keys), BS)
        assert await s1.get_many(keys, out) == [Status.HIT] * len(keys)
        assert all(bytes(o) == payload(k, BS) for k, o in zip(keys, out))
    assert stray_files(root) == []


@pytest.mark.asyncio
async def test_exists_never_overwrites(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        await store.put(b"first", payload(b"first", BS))
        before = block_file(root, b"first").read_bytes()
        ino = block_file(root, b"first").stat().st_ino
        _r, bufs = filled_rows([b"first"] * 3, BS, salt=7)
        assert await store.put_many([b"first"] * 3, bufs) == [Status.EXISTS] * 3
        assert block_file(root, b"first").read_bytes() == before
        assert block_file(root, b"first").stat().st_ino == ino
        assert stray_files(root) == []


@ONE_LOOP
async def test_verified_and_raw_stores_do_not_share_a_namespace(root: Path, backend: str) -> None:
    """Verified and raw stores of one namespace: the manifest admits one of them; the other is refused."""
    async with opened(root, BS, backend, verify=True) as v:
        await v.put(b"both", payload(b"both", BS))
        with pytest.raises(ValueError, match="verify=True"):
            await BlockStore(root, BS, backend=backend, verify=False).open()
        out = bytearray(BS)
        assert await v.get(b"both", out) is Status.HIT and out == payload(b"both", BS)
    async with opened(root, BS, backend, verify=False, namespace="raw") as r:
        await r.put(b"both", payload(b"both", BS, salt=1))
        out = bytearray(BS)
        assert await r.get(b"both", out) is Status.HIT and out == payload(b"both", BS, salt=1)
