"""layout="vllm": raw block files named as vLLM's FileMapper names them.

The key is a block hash followed by a 4-byte big-endian group index; the
file is ``<h[0:3]>/<h[3:5]>_g<group>/<hash hex>.bin`` under the namespace,
byte for byte the payload.  Checked here without vLLM (its own tier is
checked against this in tests/test_vllm_interop.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import filled_rows, payload, pooled_root, rows, stray_files

from kvuring import PollingStore, Status

BS = 8192


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


def _key(hash_bytes: bytes, group: int) -> bytes:
    return hash_bytes + group.to_bytes(4, "big")


def _file(root: Path, hash_bytes: bytes, group: int) -> Path:
    h = hash_bytes.hex()
    return root / "default" / h[:3] / f"{h[3:5]}_g{group}" / f"{h}.bin"


def test_vllm_file_names_and_bytes(root: Path, backend: str) -> None:
    hashes = [os.urandom(32) for _ in range(6)]
    keys = [_key(h, g) for h, g in zip(hashes, (0, 0, 1, 2, 9, 4_000_000_000))]
    with PollingStore(root, BS, backend=backend, verify=False, layout="vllm") as store:
        _r, bufs = filled_rows(keys, BS)
        store.submit_put(keys, bufs)
        (done,) = store.drain()
        assert done.results == [Status.STORED] * 6
        for h, g, key in zip(hashes, (0, 0, 1, 2, 9, 4_000_000_000), keys):
            assert _file(root, h, g).read_bytes() == payload(key, BS), (h.hex(), g)
        # Same hash, another group: another file.
        other = _key(hashes[0], 1)
        assert store.submit_contains([keys[0], other]) and store.drain()[0].results == [True, False]
        # A file vLLM's tier wrote is found and loaded.
        theirs = os.urandom(32)
        _file(root, theirs, 3).parent.mkdir(parents=True, exist_ok=True)
        _file(root, theirs, 3).write_bytes(payload(b"theirs", BS))
        _o, got = rows(2, BS)
        store.submit_get([_key(theirs, 3), keys[4]], got)
        (done,) = store.drain()
        assert done.results == [Status.HIT, Status.HIT]
        assert bytes(got[0]) == payload(b"theirs", BS) and bytes(got[1]) == payload(keys[4], BS)
        store.submit_delete([keys[1]])
        assert store.drain()[0].results == [True]
        assert not _file(root, hashes[1], 0).exists()
        with pytest.raises(ValueError, match="at least 5 bytes"):
            store.submit_contains([b"abcd"])
        assert store.stats()["failures"] == 0
    assert stray_files(root) == []


def test_vllm_layout_needs_raw_files(root: Path) -> None:
    with pytest.raises(ValueError, match="verify=False"):
        PollingStore(root, BS, layout="vllm")
    with pytest.raises(ValueError, match="layout must be one of"):
        PollingStore(root, BS, verify=False, layout="flat")


@pytest.mark.asyncio
async def test_vllm_layout_from_asyncio(root: Path, backend: str) -> None:
    from store_helpers import opened

    h = os.urandom(20)
    key = _key(h, 7)
    async with opened(root, BS, backend, verify=False, layout="vllm") as store:
        assert await store.put(key, payload(key, BS)) is Status.STORED
        assert _file(root, h, 7).read_bytes() == payload(key, BS)
        out = bytearray(BS)
        assert await store.get(key, out) is Status.HIT and out == payload(key, BS)
