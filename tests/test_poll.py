"""PollingStore: the block store without an event loop, on both engines.

It shares the block core and the batch runner with BlockStore, so these
tests check what is its own: submitting without waiting, poll() that never
blocks, wait() with a timeout, drain(), one Finished per batch, calls from
different threads, close with work in flight, and the files and statuses
being the same as BlockStore's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import block_file, filled_rows, flip, payload, pooled_root, rows, stray_files

from kvuring import Finished, PollingStore, Status
from kvuring.store import HASH_OFFLOAD_MIN

BS = 16384


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


def _keys(n: int, tag: int) -> list[bytes]:
    return [bytes([tag, i >> 8, i & 255, 0x77]) for i in range(n)]


def _by_id(done: list[Finished]) -> dict[int, Finished]:
    out = {f.id: f for f in done}
    assert len(out) == len(done), "a batch finished twice"
    return out


def test_round_trip_and_one_result_per_batch(root: Path, backend: str) -> None:
    keys = _keys(40, 1)
    with PollingStore(root, BS, backend=backend) as store:
        assert store.stats()["engine"] == backend
        _r, bufs = filled_rows(keys, BS)
        ids = [store.submit_put(keys[i : i + 8], bufs[i : i + 8], tag=i) for i in range(0, 40, 8)]
        assert store.pending == 5
        done = _by_id(store.drain())
        assert sorted(done) == sorted(ids) and store.pending == 0
        for i, bid in zip(range(0, 40, 8), ids):
            assert done[bid].kind == "put" and done[bid].tag == i
            assert done[bid].keys == keys[i : i + 8]
            assert done[bid].results == [Status.STORED] * 8 and done[bid].errors == {}
        assert all(block_file(root, k).read_bytes()[:BS] == payload(k, BS) for k in keys)

        _o, got = rows(41, BS)
        get = store.submit_get([*keys, b"absent"], got)
        has = store.submit_contains([keys[0], b"absent"])
        again = store.submit_put(keys[:2], bufs[:2])
        done = _by_id(store.drain())
        assert done[get].results == [Status.HIT] * 40 + [Status.MISS]
        assert [bytes(g) for g in got[:40]] == [payload(k, BS) for k in keys]
        assert done[has].kind == "contains" and done[has].results == [True, False]
        assert done[again].results == [Status.EXISTS, Status.EXISTS]

        gone = store.submit_delete([keys[0], b"absent"])
        assert _by_id(store.drain())[gone].results == [True, False]
        stats = store.stats()
        assert stats["stored"] == 40 and stats["hits"] == 40 and stats["deleted"] == 1
        assert stats["pending_batches"] == 0
    assert stray_files(root) == []


def test_poll_never_blocks_and_wait_times_out(root: Path, backend: str) -> None:
    with PollingStore(root, BS, backend=backend) as store:
        assert store.poll() == []
        t0 = time.monotonic()
        assert store.wait(timeout=0.05) == []  # nothing submitted: returns at once
        assert time.monotonic() - t0 < 1.0
        keys = _keys(64, 2)
        _r, bufs = filled_rows(keys, BS)
        bid = store.submit_put(keys, bufs)
        seen: list[Finished] = []
        polls = 0
        while not seen:
            seen = store.poll()
            polls += 1
            assert polls < 1_000_000
        assert [f.id for f in seen] == [bid] and seen[0].results == [Status.STORED] * 64
        assert store.poll() == []  # reported once
        _o, got = rows(64, BS)
        gid = store.submit_get(keys, got)
        finished = store.wait(timeout=30)
        assert [f.id for f in finished] == [gid]


def test_failed_and_corrupt_blocks(root: Path, backend: str) -> None:
    keys = _keys(4, 3)
    with PollingStore(root, BS, backend=backend) as store:
        _r, bufs = filled_rows(keys, BS)
        store.submit_put(keys, bufs)
        store.drain()
        flip(block_file(root, keys[1]), 100)  # a payload byte
        os.truncate(block_file(root, keys[2]), BS)  # the trailer gone
        _o, got = rows(4, BS)
        store.submit_get(keys, got)
        (done,) = store.drain()
        assert done.results == [Status.HIT, Status.CORRUPT, Status.CORRUPT, Status.HIT]
        assert not block_file(root, keys[1]).exists() and not block_file(root, keys[2]).exists()
        assert store.stats()["corrupt"] == 2

        # A leaf that is a file, not a directory: the store fails, with its errno and path.
        odd = bytes([0xEE, 0xEE, 0x01])
        leaf = root / "default" / "eee" / "e0"
        leaf.parent.mkdir(exist_ok=True)
        leaf.write_bytes(b"not a directory")
        try:
            store.submit_put([odd], bufs[:1])
            (done,) = store.drain()
            assert done.results == [Status.FAILED]
            assert done.errors[0].errno is not None and "eee" in str(done.errors[0].filename)
        finally:
            leaf.unlink()


def test_bad_arguments_raise_at_submit(root: Path, backend: str) -> None:
    with PollingStore(root, BS, backend=backend) as store:
        _r, bufs = filled_rows(_keys(2, 4), BS)
        with pytest.raises(ValueError, match="2 keys but 1 buffers"):
            store.submit_put(_keys(2, 4), bufs[:1])
        with pytest.raises(ValueError, match="buffer is 10 bytes"):
            store.submit_put([b"k"], [bytearray(10)])
        with pytest.raises(TypeError, match="writable"):
            store.submit_get([b"k"], [bytes(BS)])
        with pytest.raises(TypeError, match="single key"):
            store.submit_contains(b"abc")
        assert store.pending == 0 and store.poll() == []
    with pytest.raises(RuntimeError, match="closed"):
        store.submit_contains([b"k"])
    with pytest.raises(RuntimeError, match="not open"):
        PollingStore(root, BS).poll()
    with pytest.raises(ValueError, match="queue_depth"):
        PollingStore(root, BS, queue_depth=0)


def test_calls_from_different_threads(root: Path, backend: str) -> None:
    """One call at a time, but not always from the same thread (as vLLM's tiers are called)."""
    keys = _keys(32, 5)
    with PollingStore(root, BS, backend=backend) as store:
        _r, bufs = filled_rows(keys, BS)
        results: list[Finished] = []

        def submit() -> None:
            store.submit_put(keys, bufs)

        def finish() -> None:
            results.extend(store.drain())

        for fn in (submit, finish):
            t = threading.Thread(target=fn)
            t.start()
            t.join()
        assert len(results) == 1 and results[0].results == [Status.STORED] * 32
        _o, got = rows(32, BS)
        store.submit_get(keys, got)  # from this thread, finished from another
        t = threading.Thread(target=finish)
        t.start()
        t.join()
        assert results[1].results == [Status.HIT] * 32


def test_big_blocks_checksummed_on_hash_threads(root: Path, backend: str) -> None:
    bs = HASH_OFFLOAD_MIN
    keys = _keys(6, 6)
    with PollingStore(root, bs, backend=backend) as store:
        _r, bufs = filled_rows(keys, bs)
        store.submit_put(keys, bufs)
        (done,) = store.drain()
        assert done.results == [Status.STORED] * 6
        flip(block_file(root, keys[0]), 5)
        _o, got = rows(6, bs)
        store.submit_get(keys, got)
        (done,) = store.wait(timeout=60) or store.drain()
        assert done.results == [Status.CORRUPT] + [Status.HIT] * 5
        assert [bytes(g) for g in got[1:]] == [payload(k, bs) for k in keys[1:]]
        assert store.stats()["offloaded_checksums"] == 12
        assert not block_file(root, keys[0]).exists()


def test_close_finishes_work_in_flight(root: Path, backend: str) -> None:
    keys = _keys(200, 7)
    store = PollingStore(root, BS, backend=backend, queue_depth=8).open()
    _r, bufs = filled_rows(keys, BS)
    store.submit_put(keys, bufs)
    store.close()
    store.close()  # idempotent
    assert store.closed
    assert stray_files(root) == []
    with PollingStore(root, BS, backend=backend) as again:
        _o, got = rows(200, BS)
        again.submit_get(keys, got)
        (done,) = again.drain()
        # Each block is whole or absent: never torn.
        for key, status, row in zip(keys, done.results, got):
            assert status in (Status.HIT, Status.MISS)
            if status is Status.HIT:
                assert bytes(row) == payload(key, BS)


def test_rows_of_one_region(root: Path, backend: str) -> None:
    """put_rows/get_rows: one pin for the region, row addresses from C."""
    import numpy as np

    keys = _keys(12, 8)
    with PollingStore(root, BS, backend=backend) as store:
        region, _rows = filled_rows(keys, BS)
        grid = np.frombuffer(region, dtype=np.int8).reshape(len(keys), BS)
        order = np.arange(len(keys), dtype=np.int64)[::-1].copy()  # key i is row 11 - i
        store.submit_put_rows(keys[::-1], memoryview(grid), order)
        (done,) = store.drain()
        assert done.results == [Status.STORED] * 12
        for i, key in enumerate(keys):
            assert block_file(root, key).read_bytes()[:BS] == payload(key, BS), i
        out = np.zeros((20, BS), dtype=np.int8)
        store.submit_get_rows([keys[3], keys[5], b"absent"], memoryview(out), [7, 0, 19])
        (done,) = store.drain()
        assert done.results == [Status.HIT, Status.HIT, Status.MISS]
        assert out[7].tobytes() == payload(keys[3], BS) and out[0].tobytes() == payload(keys[5], BS)
        assert not out[1:7].any()
        with pytest.raises(IndexError, match="row 20"):
            store.submit_get_rows([keys[0]], memoryview(out), [20])
        with pytest.raises(ValueError, match="1 keys but 2 rows"):
            store.submit_get_rows([keys[0]], memoryview(out), [1, 2])
        with pytest.raises(TypeError, match="writable"):
            store.submit_get_rows([keys[0]], bytes(BS), [0])
        with pytest.raises(ValueError, match="row_bytes"):
            store.submit_put_rows([keys[0]], memoryview(out), [0], row_bytes=BS - 1)
        assert store.pending == 0


def test_auto_picks_threads_on_a_memory_filesystem(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """backend="auto": the thread engine on tmpfs, io_uring (where it works) elsewhere."""
    from conftest import uring_unavailable

    monkeypatch.delenv("KVURING_BACKEND", raising=False)
    for where in (root, tmp_path):
        with PollingStore(where, BS) as store:
            stats = store.stats()
        if stats["filesystem"] in ("tmpfs", "ramfs", "hugetlbfs"):
            assert stats["engine"] == "threads", stats
        elif uring_unavailable() is None:
            assert stats["engine"] == "uring", stats
