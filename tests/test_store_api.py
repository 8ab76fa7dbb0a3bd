"""BlockStore API: round trips, statuses, file layout, buffers, direct I/O and bad input.

Every async test runs on both engines (uring, threads; conftest.py), so the
thread engine has to give the same answers as io_uring; behaviour tests also
run on both loops (asyncio, uvloop), input checks and slow set-ups on asyncio
only.  Most tests share a tmpfs root whose namespace is emptied between tests
(store_helpers.pooled_root): a fresh namespace makes 4096 directories.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_helpers import (
    TRAILER,
    block_file,
    block_files,
    filled_rows,
    kbytes,
    locks,
    odirect_works,
    opened,
    payload,
    pooled_root,
    reset_namespace,
    rows,
    stray_files,
)

import kvuring
from kvuring import BlockStore, Status, aligned_buffer

BS = 4096
# Input checks and slow set-ups run on one loop (both engines); the loop
# does not change them.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


# ----------------------------------------------------------------------------
# round trips and statuses
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_put_get_single(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        data = payload(b"k1", BS)
        assert await store.put(b"k1", data) is Status.STORED
        assert await store.put(b"k1", payload(b"other", BS)) is Status.EXISTS
        out = bytearray(BS)
        assert await store.get(b"k1", out) is Status.HIT
        assert out == data  # EXISTS left the first block alone
        assert await store.get(b"nope", out) is Status.MISS
        s = store.stats()
        assert (s["puts"], s["stored"], s["exists"]) == (2, 1, 1)
        assert (s["gets"], s["hits"], s["misses"]) == (2, 1, 1)
        assert (s["corrupt"], s["failures"]) == (0, 0)
        assert s["bytes_written"] == BS and s["bytes_read"] == BS
        assert s["verify"] is True and s["block_size"] == BS and s["namespace"] == "default"


@pytest.mark.asyncio
async def test_put_many_get_many_in_order(root: Path, backend: str) -> None:
    keys = [i.to_bytes(4, "big") for i in range(300)]  # more than queue_depth=64
    async with opened(root, BS, backend, queue_depth=64) as store:
        _r, bufs = filled_rows(keys[::2], BS)
        assert await store.put_many(keys[::2], bufs) == [Status.STORED] * 150
        _r2, bufs2 = filled_rows(keys, BS)
        statuses = await store.put_many(keys, bufs2)
        assert statuses == [Status.EXISTS, Status.STORED] * 150
        _r3, out = rows(len(keys), BS)
        assert await store.get_many(keys, out) == [Status.HIT] * 300
        for key, row in zip(keys, out):
            assert bytes(row) == payload(key, BS), key
        missing = [b"x" + k for k in keys[:10]]
        got = await store.get_many([*missing[:5], keys[0], *missing[5:]], out[:11])
        assert got == [Status.MISS] * 5 + [Status.HIT] + [Status.MISS] * 5
        assert bytes(out[5]) == payload(keys[0], BS)


@pytest.mark.asyncio
async def test_empty_batches(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        assert await store.put_many([], []) == []
        assert await store.get_many([], []) == []
        assert await store.get_prefix([], []) == 0
        assert await store.contains_many([]) == []
        assert await store.delete_many([]) == []


@pytest.mark.asyncio
async def test_same_key_twice_in_one_batch(root: Path, backend: str) -> None:
    keys = [b"dup", b"dup", b"dup", b"solo"]
    async with opened(root, BS, backend) as store:
        _r, bufs = filled_rows(keys, BS)
        statuses = await store.put_many(keys, bufs)
        assert sorted(s.value for s in statuses[:3]) == ["exists", "exists", "stored"]
        assert statuses[3] is Status.STORED
        out = bytearray(BS)
        assert await store.get(b"dup", out) is Status.HIT and out == payload(b"dup", BS)
        assert stray_files(root) == []  # the losers' temp files are gone


@pytest.mark.asyncio
async def test_file_layout_and_format(root: Path, backend: str) -> None:
    key = bytes.fromhex("abcdef0123")
    async with opened(root, BS, backend) as store:
        data = payload(key, BS)
        await store.put(key, data)
        path = root / "default" / "abc" / "de" / "abcdef0123.kvb"
        assert block_files(root) == [path]
        raw = path.read_bytes()
        assert len(raw) == BS + TRAILER
        assert raw[:BS] == data
        trailer = raw[BS:]
        assert trailer[:4] == b"KVUB"
        assert key in trailer
        assert stray_files(root) == []


@ONE_LOOP
async def test_int_keys_are_their_minimal_big_endian_bytes(root: Path, backend: str) -> None:
    pairs = [(0, b"\x00"), (1, b"\x01"), (255, b"\xff"), (256, b"\x01\x00"),
             (0xABCDEF, b"\xab\xcd\xef"), (2**512 - 1, b"\xff" * 64)]  # fmt: skip
    async with opened(root, BS, backend) as store:
        for ikey, bkey in pairs:
            assert await store.put(ikey, payload(bkey, BS)) is Status.STORED, ikey
            assert await store.put(bkey, payload(bkey, BS)) is Status.EXISTS, ikey
            out = bytearray(BS)
            assert await store.get(bkey, out) is Status.HIT and out == payload(bkey, BS)
            assert block_file(root, bkey).is_file()
        assert await store.contains_many([p[1] for p in pairs]) == [True] * len(pairs)
        assert len(block_files(root)) == len(pairs)
        assert (root / "default" / "abc" / "de" / "abcdef.kvb").is_file()


@ONE_LOOP
async def test_short_and_long_keys(root: Path, backend: str) -> None:
    keys = [b"\x01", b"\x01\x02", b"\x00" * 64, bytes(range(64)), b"\xab\xc0"]
    async with opened(root, BS, backend) as store:
        _r, bufs = filled_rows(keys, BS)
        assert await store.put_many(keys, bufs) == [Status.STORED] * len(keys)
        _r2, out = rows(len(keys), BS)
        assert await store.get_many(keys, out) == [Status.HIT] * len(keys)
        assert [bytes(o) for o in out] == [payload(k, BS) for k in keys]
        # b"\x01" and b"\x01\x00"-style neighbours never share a file
        assert len(block_files(root)) == len(keys)


@ONE_LOOP
async def test_namespaces_are_separate(root: Path, backend: str) -> None:
    async with (
        opened(root, BS, backend, namespace="a") as sa,
        opened(root, BS, backend, namespace="b.c-D_9") as sb,
    ):
        assert await sa.put(7, payload(7, BS)) is Status.STORED
        assert await sb.put(7, payload(7, BS, salt=1)) is Status.STORED
        out = bytearray(BS)
        assert await sa.get(7, out) is Status.HIT and out == payload(7, BS)
        assert await sb.get(7, out) is Status.HIT and out == payload(7, BS, salt=1)
        assert await sb.delete_many([7]) == [True]
        assert await sa.contains_many([7]) == [True]
    assert block_files(root, "a") == [block_file(root, 7, ns="a")]
    assert block_files(root, "b.c-D_9") == []


@pytest.mark.asyncio
async def test_reopen_sees_blocks(root: Path, backend: str) -> None:
    keys = list(range(1000, 1020))
    async with opened(root, BS, backend) as store:
        _r, bufs = filled_rows(keys, BS)
        await store.put_many(keys, bufs)
    store2 = BlockStore(root, BS, backend=backend)
    await store2.open()
    try:
        _r2, out = rows(len(keys), BS)
        assert await store2.get_many(keys, out) == [Status.HIT] * len(keys)
        assert all(bytes(o) == payload(k, BS) for k, o in zip(keys, out))
    finally:
        await store2.close()
    await store2.close()  # idempotent
    assert locks(root) == []


@pytest.mark.asyncio
async def test_verify_false_writes_raw_payload_files(root: Path, backend: str) -> None:
    keys = [b"raw-a", b"raw-b", 12345]
    async with opened(root, BS, backend, verify=False) as store:
        assert store.stats()["verify"] is False
        _r, bufs = filled_rows(keys, BS)
        assert await store.put_many(keys, bufs) == [Status.STORED] * 3
        for key in keys:
            path = block_file(root, key, verify=False)
            assert path.read_bytes() == payload(key, BS), key  # byte-identical, no trailer
        assert len(block_files(root)) == 3
        # a raw file written by someone else (vLLM's FS tier) loads as is
        foreign = block_file(root, b"foreign", verify=False)
        foreign.parent.mkdir(parents=True, exist_ok=True)
        foreign.write_bytes(payload(b"foreign", BS))
        out = bytearray(BS)
        assert await store.get(b"foreign", out) is Status.HIT and out == payload(b"foreign", BS)
        assert await store.contains_many([b"foreign", b"absent"]) == [True, False]
    # a verified store of the same namespace is refused (its manifest says raw); the files stay
    with pytest.raises(ValueError, match="verify=False"):
        await BlockStore(root, BS, backend=backend, verify=True).open()
    assert len(block_files(root)) == 4


# ----------------------------------------------------------------------------
# get_prefix, contains_many, delete_many
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_prefix(root: Path, backend: str) -> None:
    keys = list(range(10))
    async with opened(root, BS, backend) as store:
        present = [k for k in keys if k != 5]
        _r, bufs = filled_rows(present, BS)
        await store.put_many(present, bufs)
        _r2, out = rows(10, BS)
        assert await store.get_prefix(keys, out) == 5
        assert [bytes(o) for o in out[:5]] == [payload(k, BS) for k in range(5)]
        assert await store.get_prefix([99, *keys], rows(11, BS)[1]) == 0
        assert await store.get_prefix(keys[:5], out[:5]) == 5
        assert await store.get_prefix(keys[6:], out[:4]) == 4
        await store.put(5, payload(5, BS))
        assert await store.get_prefix(keys, out) == 10
        assert [bytes(o) for o in out] == [payload(k, BS) for k in keys]
        s = store.stats()
        assert s["hits"] == 9 + 9 + 5 + 4 + 10  # every block of each call is loaded


@pytest.mark.asyncio
async def test_get_prefix_stops_at_corrupt_block(root: Path, backend: str) -> None:
    keys = list(range(100, 106))
    async with opened(root, BS, backend) as store:
        _r, bufs = filled_rows(keys, BS)
        await store.put_many(keys, bufs)
        os.truncate(block_file(root, 102), BS)
        _r2, out = rows(6, BS)
        assert await store.get_prefix(keys, out) == 2
        assert store.stats()["corrupt"] == 1
        assert await store.get_prefix(keys, out) == 2  # now a miss


@pytest.mark.asyncio
async def test_contains_and_delete(root: Path, backend: str) -> None:
    keys = [b"c0", b"c1", b"c2", b"c3"]
    async with opened(root, BS, backend) as store:
        _r, bufs = filled_rows(keys[:3], BS)
        await store.put_many(keys[:3], bufs)
        assert await store.contains_many(keys) == [True, True, True, False]
        assert await store.contains_many([b"c1"]) == [True]
        assert await store.delete_many([b"c1", b"c3", b"zz-never-made"]) == [True, False, False]
        assert not block_file(root, b"c1").exists()
        assert await store.contains_many(keys) == [True, False, True, False]
        assert await store.get(b"c1", bytearray(BS)) is Status.MISS
        assert await store.delete_many([b"c1"]) == [False]
        # a block can be stored again after a delete
        assert await store.put(b"c1", payload(b"c1", BS, salt=9)) is Status.STORED
        out = bytearray(BS)
        assert await store.get(b"c1", out) is Status.HIT and out == payload(b"c1", BS, salt=9)
        s = store.stats()
        assert s["deleted"] == 1 and s["failures"] == 0
        assert s["contains"] == 4 + 1 + 4 and s["deletes"] == 3 + 1


@pytest.mark.asyncio
async def test_contains_is_false_for_wrong_size_or_non_file(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        await store.put_many([b"t0", b"t1"], [payload(b"t0", BS), payload(b"t1", BS)])
        os.truncate(block_file(root, b"t0"), BS + 10)
        d = block_file(root, b"dir")
        d.mkdir(parents=True)
        assert await store.contains_many([b"t0", b"t1", b"dir"]) == [False, True, False]


# ----------------------------------------------------------------------------
# buffers
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_buffer_types(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        region = aligned_buffer(4 * BS)
        mv = memoryview(region)
        srcs: list[object] = [
            payload(b"bytes", BS),  # bytes
            bytearray(payload(b"bytearray", BS)),
            np.frombuffer(payload(b"np-u8", BS), dtype=np.uint8).copy(),
            np.frombuffer(payload(b"np-f32", BS), dtype=np.float32).reshape(8, -1).copy(),
            array.array("B", payload(b"array", BS)),
            mv[BS : 2 * BS],
        ]
        mv[BS : 2 * BS] = payload(b"mv", BS)
        keys = [b"bytes", b"bytearray", b"np-u8", b"np-f32", b"array", b"mv"]
        assert await store.put_many(keys, srcs) == [Status.STORED] * len(keys)
        # and loads into every writable kind
        dsts: list[object] = [
            bytearray(BS),
            np.zeros(BS, dtype=np.uint8),
            np.zeros((8, BS // 32), dtype=np.float32),
            array.array("B", bytes(BS)),
            mv[2 * BS : 3 * BS],
            memoryview(bytearray(BS)),
        ]
        assert await store.get_many(keys, dsts) == [Status.HIT] * len(keys)
        for key, dst in zip(keys, dsts):
            assert memoryview(dst).tobytes() == payload(key, BS), key  # type: ignore[arg-type]


@ONE_LOOP
async def test_buffer_checks(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        with pytest.raises(ValueError) as ei:
            await store.put(b"k", bytes(BS - 1))
        assert str(BS - 1) in str(ei.value) and str(BS) in str(ei.value)
        with pytest.raises(ValueError) as ei:
            await store.get(b"k", bytearray(BS + 1))
        assert str(BS + 1) in str(ei.value) and str(BS) in str(ei.value)
        with pytest.raises(ValueError):
            await store.put_many([b"a", b"b"], [bytes(BS), bytes(BS + 4096)])
        with pytest.raises(TypeError):
            await store.get(b"k", bytes(BS))  # read-only
        with pytest.raises(TypeError):
            await store.get(b"k", memoryview(bytearray(BS)).toreadonly())
        with pytest.raises(TypeError):
            await store.get_many([b"k"], [payload(b"k", BS)])
        with pytest.raises(TypeError):
            await store.put(b"k", "x" * BS)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await store.put(b"k", [0] * BS)  # type: ignore[arg-type]
        with pytest.raises(ValueError):  # not C-contiguous
            await store.put(b"k", np.zeros((BS, 2), dtype=np.uint8)[:, 0])
        with pytest.raises(ValueError):
            await store.put_many([b"a", b"b"], [bytes(BS)])
        with pytest.raises(ValueError):
            await store.get_many([b"a"], [bytearray(BS), bytearray(BS)])
        with pytest.raises(ValueError):
            await store.get_prefix([b"a"], [])
        # nothing was stored by any of the rejected calls
        assert block_files(root) == []
        assert store.stats()["puts"] == 0 and store.stats()["gets"] == 0


# ----------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------

BAD_KEY_TYPES = ["str-key", 1.5, None, True, bytearray(b"ba"), memoryview(b"mv"), (1,)]
BAD_KEY_VALUES = [b"", b"x" * 65, -1, 2**512]


@ONE_LOOP
async def test_bad_keys(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        buf = bytearray(BS)
        for key in BAD_KEY_TYPES:
            for call in (store.put(key, buf), store.get(key, buf)):  # type: ignore[arg-type]
                with pytest.raises(TypeError):
                    await call
            with pytest.raises(TypeError):
                await store.contains_many([key])  # type: ignore[list-item]
            with pytest.raises(TypeError):
                await store.delete_many([b"ok", key])  # type: ignore[list-item]
        for key in BAD_KEY_VALUES:
            for call in (store.put(key, buf), store.get(key, buf)):  # type: ignore[arg-type]
                with pytest.raises(ValueError):
                    await call
            with pytest.raises(ValueError):
                await store.put_many([b"good", key], [buf, buf])  # type: ignore[list-item]
            with pytest.raises(ValueError):
                await store.contains_many([key])  # type: ignore[list-item]
        # a single key where a sequence of keys is expected
        for single in (b"abc", "abc"):
            with pytest.raises(TypeError):
                await store.put_many(single, [buf] * 3)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await store.contains_many(single)  # type: ignore[arg-type]
        # a rejected batch stored nothing, not even its good keys
        assert block_files(root) == []
        assert await store.contains_many([b"good", b"ok"]) == [False, False]


# ----------------------------------------------------------------------------
# life cycle and constructor arguments
# ----------------------------------------------------------------------------


async def _every_call(store: BlockStore) -> list[object]:
    buf = bytearray(BS)
    return [
        store.put(b"k", buf),
        store.get(b"k", buf),
        store.put_many([b"k"], [buf]),
        store.get_many([b"k"], [buf]),
        store.get_prefix([b"k"], [buf]),
        store.contains_many([b"k"]),
        store.delete_many([b"k"]),
    ]


@ONE_LOOP
async def test_use_before_open_and_after_close(root: Path, backend: str) -> None:
    store = BlockStore(root, BS, backend=backend)
    assert store.stats()["engine"] is None
    for call in await _every_call(store):
        with pytest.raises(RuntimeError, match="not open"):
            await call  # type: ignore[misc]
    async with store:
        assert await store.put(b"k", bytes(BS)) is Status.STORED
    for call in await _every_call(store):
        with pytest.raises(RuntimeError, match="closed"):
            await call  # type: ignore[misc]
    with pytest.raises(RuntimeError):
        await store.open()
    with pytest.raises(RuntimeError):
        async with store:
            pass
    await store.close()
    s = store.stats()
    assert s["engine"] is None and s["stored"] == 1


@ONE_LOOP
async def test_open_twice_and_explicit_open_close(root: Path, backend: str) -> None:
    store = BlockStore(str(root / "sub" / "dir"), BS, backend=backend)
    assert await store.open() is store
    assert await store.open() is store
    try:
        assert (root / "sub" / "dir" / "default").is_dir()
        assert await store.put(1, bytes(BS)) is Status.STORED
    finally:
        await store.close()
    await store.close()


BAD_ARGS: list[tuple[dict[str, object], type | tuple[type, ...]]] = [
    ({"block_size": 0}, ValueError),
    ({"block_size": -4096}, ValueError),
    ({"block_size": (1 << 30) + 1}, ValueError),
    ({"block_size": 4096.0}, TypeError),
    ({"block_size": "4096"}, TypeError),
    ({"block_size": True}, TypeError),
    ({"block_size": None}, TypeError),
    ({"queue_depth": 0}, ValueError),
    ({"queue_depth": -1}, ValueError),
    ({"queue_depth": 65537}, ValueError),
    ({"queue_depth": 2.0}, ValueError),
    ({"queue_depth": "64"}, ValueError),
    ({"queue_depth": True}, (TypeError, ValueError)),
    ({"direct": "yes"}, ValueError),
    ({"direct": None}, ValueError),
    ({"direct": "true"}, ValueError),
    ({"direct": 1}, ValueError),
    ({"direct": 0}, ValueError),
    ({"backend": "io_uring"}, ValueError),
    ({"backend": "thread"}, ValueError),
    ({"backend": ""}, ValueError),
    ({"namespace": ""}, ValueError),
    ({"namespace": "."}, ValueError),
    ({"namespace": ".."}, ValueError),
    ({"namespace": "a/b"}, ValueError),
    ({"namespace": "../escape"}, ValueError),
    ({"namespace": "/abs"}, ValueError),
    ({"namespace": "sp ace"}, ValueError),
    ({"namespace": "nul\0"}, ValueError),
    ({"namespace": "ünï"}, ValueError),
    ({"namespace": "new\nline"}, ValueError),
    ({"namespace": "x" * 201}, ValueError),
    ({"namespace": b"bytes"}, TypeError),
    ({"namespace": 5}, TypeError),
]


BAD_IDS = [",".join(f"{k}={v!r}"[:30] for k, v in a.items()) for a, _ in BAD_ARGS]


@pytest.mark.parametrize(("kwargs", "exc"), BAD_ARGS, ids=BAD_IDS)
def test_bad_constructor_arguments(
    tmp_path: Path, kwargs: dict[str, object], exc: type | tuple[type, ...]
) -> None:
    args: dict[str, object] = {"block_size": BS, **kwargs}
    block_size = args.pop("block_size")
    with pytest.raises(exc):
        BlockStore(tmp_path, block_size, **args)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []  # nothing was created


@ONE_LOOP
async def test_root_that_is_a_file(tmp_path: Path, backend: str) -> None:
    (tmp_path / "file").write_bytes(b"x")
    store = BlockStore(tmp_path / "file", BS, backend=backend)
    with pytest.raises(OSError):
        await store.open()
    assert (tmp_path / "file").read_bytes() == b"x"
    store2 = BlockStore(tmp_path / "file" / "below", BS, backend=backend)
    with pytest.raises(OSError):
        await store2.open()


@pytest.mark.parametrize("namespace", ["a", "A.b-c_9", "...", ".tmp", "-", "x" * 200])
def test_good_namespaces(tmp_path: Path, namespace: str) -> None:
    assert BlockStore(tmp_path, BS, namespace=namespace).namespace == namespace


def test_aligned_buffer() -> None:
    buf = aligned_buffer(3 * 4096)
    assert len(buf) == 3 * 4096 and bytes(buf) == bytes(3 * 4096)
    with pytest.raises(ValueError):
        aligned_buffer(0)
    with pytest.raises(ValueError):
        aligned_buffer(-1)
    with pytest.raises(TypeError):
        aligned_buffer(4096.0)  # type: ignore[arg-type]
    assert kvuring.Status.HIT is Status.HIT
    assert {s.name for s in Status} == {"STORED", "EXISTS", "HIT", "MISS", "CORRUPT", "FAILED"}


# ----------------------------------------------------------------------------
# direct I/O
# ----------------------------------------------------------------------------


@ONE_LOOP
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
async def test_direct_auto_uses_o_direct_where_it_works(
    tmp_path: Path, root: Path, backend: str, where: str
) -> None:
    base = tmp_path if where == "disk" else root
    expect = odirect_works(base)
    async with opened(base, BS, backend) as store:
        s = store.stats()
        assert s["direct_io"] is expect
        if expect:
            assert s["direct_io_alignment"] in (512, 1024, 2048, 4096)
        _region, aligned = filled_rows([b"a0", b"a1"], BS)
        assert await store.put_many([b"a0", b"a1"], aligned) == [Status.STORED] * 2
        _r, out = rows(2, BS)
        assert await store.get_many([b"a0", b"a1"], out) == [Status.HIT] * 2
        assert [bytes(o) for o in out] == [payload(b"a0", BS), payload(b"a1", BS)]
        assert store.stats()["bounced"] == 0  # aligned rows are never copied


@pytest.mark.asyncio
async def test_unaligned_buffers_are_bounced(root: Path, backend: str) -> None:
    if not odirect_works(root):
        pytest.skip("no O_DIRECT here")
    async with opened(root, BS, backend, direct=True) as store:
        assert store.stats()["direct_io"] is True
        region = aligned_buffer(2 * BS + 64)
        mv = memoryview(region)
        odd = [mv[1 : BS + 1], mv[BS + 7 : 2 * BS + 7]]  # certainly misaligned
        odd[0][:] = payload(b"u0", BS)
        odd[1][:] = payload(b"u1", BS)
        assert await store.put_many([b"u0", b"u1"], odd) == [Status.STORED] * 2
        assert store.stats()["bounced"] == 2
        odd[0][:] = bytes(BS)
        odd[1][:] = bytes(BS)
        assert await store.get_many([b"u1", b"u0"], odd) == [Status.HIT] * 2
        assert store.stats()["bounced"] == 4
        assert bytes(odd[0]) == payload(b"u1", BS) and bytes(odd[1]) == payload(b"u0", BS)
        # bytes and bytearray work whatever their alignment
        assert await store.put(b"u2", payload(b"u2", BS)) is Status.STORED
        out = bytearray(BS)
        assert await store.get(b"u2", out) is Status.HIT and out == payload(b"u2", BS)
        assert block_file(root, b"u0").read_bytes()[:BS] == payload(b"u0", BS)


@pytest.mark.asyncio
async def test_direct_false_never_uses_o_direct(root: Path, backend: str) -> None:
    async with opened(root, BS, backend, direct=False) as store:
        s = store.stats()
        assert s["direct_io"] is False and s["direct_io_alignment"] is None
        region = aligned_buffer(BS + 1)
        odd = memoryview(region)[1:]
        odd[:] = payload(b"d", BS)
        assert await store.put(b"d", odd) is Status.STORED
        out = bytearray(BS)
        assert await store.get(b"d", out) is Status.HIT and out == payload(b"d", BS)
        assert store.stats()["bounced"] == 0


@ONE_LOOP
@pytest.mark.parametrize("block_size", [1000, 4096 + 100, 100])
async def test_direct_true_rejects_unalignable_block_size(
    root: Path, backend: str, block_size: int
) -> None:
    store = BlockStore(root, block_size, backend=backend, direct=True)
    with pytest.raises(OSError) as ei:
        await store.open()
    assert ei.value.errno == errno.EINVAL
    assert "block_size" in str(ei.value) and str(block_size) in str(ei.value)
    assert locks(root) == []  # the failed open cleaned up after itself
    # the same size works with direct="auto" (buffered)
    async with opened(root, block_size, backend) as auto:
        assert auto.stats()["direct_io"] is False
        assert await auto.put(b"z", payload(b"z", block_size)) is Status.STORED
        out = bytearray(block_size)
        assert await auto.get(b"z", out) is Status.HIT and out == payload(b"z", block_size)
        raw = block_file(root, b"z").read_bytes()
        assert len(raw) == block_size + TRAILER and raw[:block_size] == payload(b"z", block_size)


@ONE_LOOP
async def test_batch_bigger_than_the_ring(root: Path, backend: str) -> None:
    """More chains in flight than the submission queue holds (submitted in parts)."""
    bs = 512
    keys = list(range(3000))
    async with opened(root, bs, backend, queue_depth=2048) as store:
        _region, bufs = filled_rows(keys, bs)
        assert await store.put_many(keys, bufs) == [Status.STORED] * len(keys)
        _r, out = rows(len(keys), bs)
        assert await store.get_many(keys, out) == [Status.HIT] * len(keys)
        assert all(bytes(o) == payload(k, bs) for k, o in zip(keys, out))
        assert await store.contains_many(keys) == [True] * len(keys)
        assert await store.delete_many(keys) == [True] * len(keys)


@ONE_LOOP
async def test_big_blocks(root: Path, backend: str) -> None:
    bs = 2 << 20
    keys = [b"big0", b"big1", b"big2"]
    async with opened(root, bs, backend) as store:
        _region, bufs = filled_rows(keys, bs)
        assert await store.put_many(keys, bufs) == [Status.STORED] * 3
        _r, out = rows(3, bs)
        assert await store.get_many(keys, out) == [Status.HIT] * 3
        assert all(bytes(o) == payload(k, bs) for k, o in zip(keys, out))


# ----------------------------------------------------------------------------
# property: random keys and payloads round-trip
# ----------------------------------------------------------------------------

keys_st = st.lists(
    st.one_of(st.binary(min_size=1, max_size=64), st.integers(0, 2**512 - 1)),
    min_size=1,
    max_size=24,
    unique_by=kbytes,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    keys=keys_st,
    seed=st.integers(0, 2**32),
    verify=st.booleans(),
    loop=st.sampled_from(["asyncio", "uvloop"]),
)
def test_roundtrip_property(
    root: Path,
    backend: str,
    keys: list[bytes | int],
    seed: int,
    verify: bool,
    loop: str,
) -> None:
    import uvloop

    bs = 1024
    datas = [payload(k, bs, salt=seed & 0xFFFF) for k in keys]

    async def body() -> None:
        async with opened(root, bs, backend, verify=verify) as store:
            assert await store.put_many(keys, datas) == [Status.STORED] * len(keys)
            _r, out = rows(len(keys), bs)
            assert await store.get_many(keys, out) == [Status.HIT] * len(keys)
            assert [bytes(o) for o in out] == datas
            assert await store.contains_many(keys) == [True] * len(keys)
            ints = [k for k in keys if isinstance(k, int)]
            _r2, out2 = rows(len(ints), bs)
            as_bytes = [kbytes(k) for k in ints]
            assert await store.get_many(as_bytes, out2) == [Status.HIT] * len(ints)
            assert await store.delete_many(keys) == [True] * len(keys)
        assert block_files(root) == []

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    reset_namespace(root / "default")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(body())


# ----------------------------------------------------------------------------
# input checks: flags are bools, a lone key is not a sequence of keys
# ----------------------------------------------------------------------------

FLAGS = ["verify", "prioritize_loads", "fixed_buffers"]
NOT_BOOLS: list[object] = ["False", "True", "", 0, 1, None, 1.0]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
@pytest.mark.parametrize("front_end", [BlockStore, kvuring.PollingStore], ids=lambda c: c.__name__)
def test_flags_must_be_bools(tmp_path: Path, front_end: type, flag: str, value: object) -> None:
    """verify="False" used to mean verify=True (bool("False")); now it names the bad value."""
    with pytest.raises(TypeError, match=f"{flag} must be True or False, not {value!r}"):
        front_end(tmp_path, BS, **{flag: value})
    assert not (tmp_path / "default").exists()


LONE_KEYS: list[object] = [b"abcd", bytearray(b"abcd"), memoryview(b"abcd"), "abcd", 7, True]


@ONE_LOOP
@pytest.mark.parametrize("key", LONE_KEYS, ids=lambda k: type(k).__name__)
async def test_a_lone_key_is_a_type_error(root: Path, backend: str, key: object) -> None:
    """put_many(b"abcd", [buf]) is a TypeError, not "4 keys but 1 buffers" (nor 4 int keys)."""
    region, bufs = rows(1, BS)
    calls = {
        "put_many": lambda s: s.put_many(key, bufs),
        "get_many": lambda s: s.get_many(key, bufs),
        "get_prefix": lambda s: s.get_prefix(key, bufs),
        "contains_many": lambda s: s.contains_many(key),
        "delete_many": lambda s: s.delete_many(key),
        "put_rows": lambda s: s.put_rows(key, region, [0]),
        "get_rows": lambda s: s.get_rows(key, region, [0]),
    }
    async with opened(root, BS, backend) as store:
        for name, call in calls.items():
            with pytest.raises(TypeError, match="single key") as info:
                await call(store)
            assert type(key).__name__ in str(info.value), name
        assert store.stats()["puts"] == store.stats()["contains"] == 0
    with kvuring.PollingStore(root, BS, backend=backend) as poller:
        for submit in (
            lambda: poller.submit_put(key, bufs),  # type: ignore[arg-type]
            lambda: poller.submit_get(key, bufs),  # type: ignore[arg-type]
            lambda: poller.submit_contains(key),  # type: ignore[arg-type]
            lambda: poller.submit_delete(key),  # type: ignore[arg-type]
        ):
            with pytest.raises(TypeError, match="single key"):
                submit()
        assert poller.pending == 0
