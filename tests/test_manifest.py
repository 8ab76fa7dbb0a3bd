"""The namespace manifest: one block size, format and layout per namespace, agreed by every opener.

The first open writes ``<namespace>/.kvuring-manifest.json``; an open that
asks for other values is refused with a ValueError naming both, and nothing
in the namespace changes (no block is read, so none is found CORRUPT and
removed).  First opens racing in several processes agree on one manifest,
also where the filesystem refuses RENAME_NOREPLACE (faultfs).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultfs import fault_fs
from store_helpers import MANIFEST, child, locks, new_root, payload, reap

from kvuring import BlockStore, PollingStore, Status

pytestmark = pytest.mark.timeout(120)

BS = 16 * 1024


@pytest.fixture
def root() -> Iterator[Path]:
    yield from new_root()


def manifest_of(root: Path, ns: str = "default") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / ns / MANIFEST).read_bytes())
    return data


def snapshot(root: Path, ns: str = "default") -> dict[str, str]:
    """Every file of the namespace outside the registry, with a hash of its bytes."""
    out = {}
    base = root / ns
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d != ".tmp"]
        for name in filenames:
            path = Path(dirpath, name)
            out[str(path.relative_to(base))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.asyncio
async def test_first_open_writes_the_manifest(root: Path, backend: str) -> None:
    async with BlockStore(root, BS, backend=backend):
        pass
    assert manifest_of(root) == {
        "kvuring": "namespace manifest",
        "format_version": 1,
        "block_size": BS,
        "verify": True,
        "layout": "kvuring",
    }
    assert sorted(os.listdir(root / "default" / ".tmp")) == []  # no draft left


# (what the namespace was made with, what the second store asks for, words the error names)
MISMATCHES = [
    ({}, {"block_size": 2 * BS}, ["block_size 16384", "block_size 32768"]),
    ({}, {"verify": False}, ["verify=True", "verify=False"]),
    ({"verify": False}, {"verify": False, "layout": "vllm"}, ["layout 'kvuring'", "layout 'vllm'"]),
    ({"verify": False, "layout": "vllm"}, {"verify": False}, ["layout 'vllm'", "layout 'kvuring'"]),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("made, asked, named", MISMATCHES, ids=["block_size", "verify",
                                                               "layout", "layout-back"])  # fmt: skip
async def test_mismatch_is_refused_and_no_block_is_touched(
    root: Path, backend: str, made: dict[str, Any], asked: dict[str, Any], named: list[str]
) -> None:
    keys = [bytes(range(i, i + 8)) for i in range(0, 40, 8)]  # 8-byte keys: vLLM's hash + group
    first = {"block_size": BS, **made}
    bs = first.pop("block_size")
    async with BlockStore(root, bs, backend=backend, **first) as store:
        for key in keys:
            assert await store.put(key, payload(key, bs)) is Status.STORED
    before = snapshot(root)
    assert len(before) == len(keys) + 1  # the blocks and the manifest
    again = {"block_size": BS, **asked}
    abs_ = again.pop("block_size")
    with pytest.raises(ValueError) as info:
        await BlockStore(root, abs_, backend=backend, **again).open()
    message = str(info.value)
    assert "namespace 'default' at " + str(root / "default") in message
    assert message.index(named[0]) < message.index("this store asked") < message.index(named[1])
    with pytest.raises(ValueError):  # the polling front end refuses it too
        PollingStore(root, abs_, backend=backend, **again).open()
    assert snapshot(root) == before, "a refused open changed the namespace"
    assert locks(root) == []
    # The namespace's own values still load every block.
    async with BlockStore(root, bs, backend=backend, **first) as store:
        out = bytearray(bs)
        for key in keys:
            assert await store.get(key, out) is Status.HIT and out == payload(key, bs)
    assert manifest_of(root)["layout"] == made.get("layout", "kvuring")


@pytest.mark.asyncio
async def test_newer_format_version_is_refused(root: Path, backend: str) -> None:
    async with BlockStore(root, BS, backend=backend) as store:
        await store.put(b"kept", payload(b"kept", BS))
    written = manifest_of(root)
    (root / "default" / MANIFEST).write_text(json.dumps({**written, "format_version": 99}))
    before = snapshot(root)
    with pytest.raises(ValueError, match="format version 99"):
        await BlockStore(root, BS, backend=backend).open()
    assert snapshot(root) == before


@pytest.mark.asyncio
async def test_a_namespace_without_a_manifest_gets_one(root: Path, backend: str) -> None:
    """A namespace made before manifests existed: its next open records the store's values."""
    keys = [b"old-1", b"old-2"]
    async with BlockStore(root, BS, backend=backend) as store:
        for key in keys:
            await store.put(key, payload(key, BS))
    (root / "default" / MANIFEST).unlink()
    async with BlockStore(root, BS, backend=backend) as store:
        out = bytearray(BS)
        for key in keys:
            assert await store.get(key, out) is Status.HIT and out == payload(key, BS)
    assert manifest_of(root)["block_size"] == BS
    with pytest.raises(ValueError, match="holds block_size 16384"):
        await BlockStore(root, 2 * BS, backend=backend).open()


def test_damaged_manifest_is_refused_not_replaced(root: Path) -> None:
    """An empty manifest (one being written in place, or a crash): waited for, then refused."""
    with PollingStore(root, BS):
        pass
    (root / "default" / MANIFEST).write_bytes(b"")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="unreadable"):
        PollingStore(root, BS).open()
    assert time.monotonic() - t0 < 10
    assert (root / "default" / MANIFEST).read_bytes() == b""


def _race(root: Path, sizes: list[int], backend: str) -> list[dict[str, Any]]:
    """First opens of one namespace in len(sizes) processes at once; each one's outcome."""
    procs = [child("opener", {"root": str(root), "bs": bs, "backend": backend}) for bs in sizes]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "READY"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = reap(proc, timeout=60)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                reap(proc)


@pytest.mark.parametrize("noreplace", [True, False], ids=["noreplace", "no-noreplace"])
def test_concurrent_first_opens_agree(tmp_path: Path, noreplace: bool) -> None:
    """Six first opens at once, two block sizes: one manifest wins, and exactly its opens succeed.

    ``no-noreplace``: on faultfs refusing RENAME_NOREPLACE (EINVAL, as NFS
    does), where the manifest is created in place with O_EXCL instead.
    """
    sizes = [BS, 2 * BS] * 3
    with fault_fs(tmp_path) as fs:
        fs.reject_noreplace(not noreplace)
        for round_ in range(3):
            root = fs.mnt / f"race{round_}"
            results = _race(root, sizes, "threads")
            won = manifest_of(fs.backing / f"race{round_}")["block_size"]
            assert won in (BS, 2 * BS)
            for bs, result in zip(sizes, results):
                if bs == won:
                    assert result.get("opened") in ("stored", "exists"), result
                else:
                    assert "refused" in result, result
                    assert f"holds block_size {won}" in result["refused"]
            assert locks(fs.backing / f"race{round_}") == []
            drafts = os.listdir(fs.backing / f"race{round_}" / "default" / ".tmp")
            assert drafts == [], drafts
