"""KvuringTier beside vLLM's own FileSystemTierManager, on one root_dir.

verify=False: the same directory, config.json, file names and raw bytes
as vLLM's tier (the store's layout="vllm"), so an existing vLLM cache is
reused either way.

verify=True: kvuring's checksummed files; a damaged chunk is a failed load
and then a MISS, never a success.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import (
    FileSystemTierManager,
    LookupResult,
    Primary,
    ReqContext,
    drain,
    job,
    key,
    kvuring_tier,
    lookup_and_wait,
    spec,
    tier_files,
)

from kvuring.vllm import KvuringTier

HIT, MISS = LookupResult.HIT, LookupResult.MISS


def vllm_tier(root: Path, primary: Primary, the_spec: Any = None) -> Any:
    return FileSystemTierManager(
        offloading_spec=the_spec or spec(), primary_kv_view=primary.view, tier_type="fs",
        root_dir=str(root), n_read_threads=2, n_write_threads=2,
    )  # fmt: skip


@pytest.fixture
def pair(tmp_path: Path, backend: str) -> Iterator[tuple[KvuringTier, Any]]:
    """A KvuringTier (verify=False) and vLLM's tier on one root, each with its own primary memory."""
    ours = kvuring_tier(tmp_path, backend, verify=False)
    q = Primary(16)
    theirs = vllm_tier(tmp_path, q)
    theirs.primary = q
    yield ours, theirs
    ours.shutdown()
    theirs.shutdown()


def _rows(t: Any) -> Primary:
    p: Primary = t.primary
    return p


def test_same_directory_and_config_as_vllms_tier(
    pair: tuple[KvuringTier, Any], tmp_path: Path
) -> None:
    ours, theirs = pair
    data_dir = Path(theirs.file_mapper.get_file_name(key(1))).parents[2]
    assert tmp_path / ours.namespace == data_dir
    config = Path(theirs.file_mapper.get_config_file_path())
    assert config.is_file()
    assert ours.file_mapper.get_config_file_path() == str(config)
    # kvuring wrote it first here (its tier was made first); vLLM's reads the same
    assert config.read_text() == _config_text(theirs)


def _config_text(fs: Any) -> str:
    import json

    return json.dumps(fs.file_mapper.get_run_config(), indent=2, sort_keys=True)


def test_raw_files_hold_the_same_bytes_as_vllms(tmp_path: Path, backend: str) -> None:
    p = Primary(4)
    p.fill(21)
    ours = kvuring_tier(tmp_path / "kvuring", backend, verify=False, primary=p)
    theirs = vllm_tier(tmp_path / "vllm", p)
    try:
        ours.submit_store(job(1, [key(1)], [2]))
        theirs.submit_store(job(1, [key(1)], [2]))
        assert [r.success for r in drain(ours)] == [True]
        assert [r.success for r in drain(theirs)] == [True]
        [mine] = tier_files(tmp_path / "kvuring")
        [vllms] = tier_files(tmp_path / "vllm")
        assert mine.read_bytes() == vllms.read_bytes() == p.row(2)
        assert mine.suffix == vllms.suffix == ".bin"
    finally:
        ours.shutdown()
        theirs.shutdown()


def test_file_names_are_vllms(tmp_path: Path, backend: str) -> None:
    p = Primary(4)
    p.fill(22)
    ours = kvuring_tier(tmp_path / "kvuring", backend, verify=False, primary=p)
    theirs = vllm_tier(tmp_path / "vllm", p)
    try:
        keys = [key(1), key(2, group=3)]
        ours.submit_store(job(1, keys, [0, 1]))
        theirs.submit_store(job(1, keys, [0, 1]))
        drain(ours)
        drain(theirs)
        mine = sorted(
            str(f.relative_to(tmp_path / "kvuring")) for f in tier_files(tmp_path / "kvuring")
        )
        vllms = sorted(str(f.relative_to(tmp_path / "vllm")) for f in tier_files(tmp_path / "vllm"))
        assert mine == vllms
    finally:
        ours.shutdown()
        theirs.shutdown()


def test_vllm_loads_what_kvuring_stored(pair: tuple[KvuringTier, Any]) -> None:
    ours, theirs = pair
    p, q = _rows(ours), _rows(theirs)
    p.fill(23)
    keys = [key(i) for i in range(4)] + [key(9, group=1)]
    ours.submit_store(job(1, keys, [0, 1, 2, 3, 4]))
    assert [r.success for r in drain(ours)] == [True]
    for k in keys:
        assert os.path.isfile(theirs.file_mapper.get_file_name(k))
    assert _fs_lookup(theirs, keys) == [HIT] * 5
    theirs.submit_load(job(2, keys, [10, 11, 12, 13, 14], load=True))
    assert [r.success for r in drain(theirs)] == [True]
    assert [q.row(i) for i in range(10, 15)] == [p.row(i) for i in range(5)]


def test_kvuring_loads_what_vllm_stored(pair: tuple[KvuringTier, Any]) -> None:
    ours, theirs = pair
    p, q = _rows(ours), _rows(theirs)
    q.fill(24)
    keys = [key(i) for i in range(4)] + [key(9, group=1)]
    theirs.submit_store(job(1, keys, [0, 1, 2, 3, 4]))
    assert [r.success for r in drain(theirs)] == [True]
    assert lookup_and_wait(ours, keys) == [HIT] * 5
    ours.submit_load(job(2, keys, [10, 11, 12, 13, 14], load=True))
    assert [r.success for r in drain(ours)] == [True]
    assert [p.row(i) for i in range(10, 15)] == [q.row(i) for i in range(5)]
    # and storing them again writes nothing: the files are vLLM's, untouched
    before = {
        f: f.stat().st_mtime_ns for f in tier_files(Path(theirs.file_mapper.base_path + "_r0"))
    }
    ours.submit_store(job(3, keys, [0, 1, 2, 3, 4]))
    assert [r.success for r in drain(ours)] == [True]
    after = {
        f: f.stat().st_mtime_ns for f in tier_files(Path(theirs.file_mapper.base_path + "_r0"))
    }
    assert after == before


def _fs_lookup(fs: Any, keys: list[bytes]) -> list[Any]:
    return lookup_and_wait(fs, keys, ReqContext("vllm"))


def test_verify_true_does_not_take_vllms_raw_files(tmp_path: Path, backend: str) -> None:
    q = Primary(4)
    q.fill(25)
    theirs = vllm_tier(tmp_path, q)
    ours = kvuring_tier(tmp_path, backend, verify=True)
    try:
        theirs.submit_store(job(1, [key(1)], [0]))
        assert [r.success for r in drain(theirs)] == [True]
        assert lookup_and_wait(ours, [key(1)]) == [MISS]
    finally:
        ours.shutdown()
        theirs.shutdown()


def test_a_damaged_chunk_never_loads_as_success(tmp_path: Path, backend: str) -> None:
    """verify=True: every kind of damage is a failed key, then a MISS, and the file is gone."""
    t = kvuring_tier(tmp_path, backend, verify=True)
    try:
        p = _rows(t)
        p.fill(26)
        size = 16384
        keys = [key(i) for i in range(8)]
        t.submit_store(job(1, keys, list(range(8))))
        assert [r.success for r in drain(t)] == [True]
        files = {k: f for k in keys for f in tier_files(tmp_path) if f.name.startswith(k.hex())}
        assert len(files) == 8
        damage = {
            keys[1]: lambda f: _flip(f, 0),  # first payload byte
            keys[2]: lambda f: _flip(f, size // 2),  # a middle one
            keys[3]: lambda f: _flip(f, size - 1),  # the last
            keys[4]: lambda f: _flip(f, size + 40),  # the trailer (its key)
            keys[5]: lambda f: os.truncate(f, size),  # the trailer cut off: vLLM's raw size
            keys[6]: lambda f: os.truncate(f, 100),  # short
            keys[7]: lambda f: f.write_bytes(files[keys[0]].read_bytes()),  # another chunk's file
        }
        for k, hurt in damage.items():
            hurt(files[k])
        ctx = ReqContext("damaged")
        assert lookup_and_wait(t, keys, ctx)[:2] == [HIT, HIT]
        p.rows[8:] = 0
        t.submit_load(job(2, keys, list(range(8, 16)), load=True, ctx=ctx))
        [r] = drain(t)
        assert (r.job_id, r.success) == (2, False)
        assert r.successful_keys is not None and set(r.successful_keys) == {keys[0]}
        assert p.row(8) == p.row(0)
        assert [t.lookup(k, ctx) for k in keys] == [HIT] + [MISS] * 7
        t.on_request_finished(ctx)
        assert lookup_and_wait(t, keys, ReqContext("fresh")) == [HIT] + [MISS] * 7
        for k in damage:
            assert not files[k].exists()
    finally:
        t.shutdown()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))
