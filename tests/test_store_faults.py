"""BlockStore under real faults: a full filesystem, permission errors, EIO, planted symlinks.

Faults are real, not mocked: a small tmpfs mounted for the test (ENOSPC),
``chattr +i`` (EPERM), a child process that dropped root (EACCES), a loop
device shrunk under a mounted ext4 (EIO), and symlinks planted inside the
store.  Each needs root; without it (or without the tool) the test skips.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_helpers import (
    block_file,
    block_files,
    child,
    filled_rows,
    immutable,
    need_tool,
    new_root,
    opened,
    payload,
    pooled_root,
    reap,
    rows,
    stray_files,
    tmpfs,
    tree,
)

from kvuring import BlockStore, Status

BS = 16 * 1024
ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])

if os.geteuid() != 0:
    pytest.skip("fault tests need root (mount, chattr, setuid)", allow_module_level=True)


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside the store that nothing may touch."""
    yield from new_root()


def snapshot(path: Path) -> dict[str, bytes | str]:
    """Names, link targets and file contents beneath ``path``: to prove nothing changed."""
    out: dict[str, bytes | str] = {}
    for name in tree(path):
        p = path / name
        if p.is_symlink():
            out[name] = "-> " + os.readlink(p)
        elif p.is_file():
            out[name] = p.read_bytes()
        else:
            out[name] = "dir"
    return out


# ----------------------------------------------------------------------------
# ENOSPC: a full filesystem
# ----------------------------------------------------------------------------


@ONE_LOOP
@pytest.mark.parametrize("verify", [True, False])
async def test_full_filesystem(tmp_path: Path, backend: str, verify: bool) -> None:
    bs = 64 * 1024
    keys = [b"fill-%03d" % i for i in range(48)]  # ~3 MiB into 1 MiB
    with tmpfs(tmp_path / "small", "1m") as mnt:
        async with opened(mnt, bs, backend, verify=verify) as store:
            _r, bufs = filled_rows(keys, bs)
            statuses = await store.put_many(keys, bufs)
            assert len(statuses) == len(keys)
            assert set(statuses) <= {Status.STORED, Status.FAILED}
            stored = [k for k, s in zip(keys, statuses) if s is Status.STORED]
            failed = [k for k, s in zip(keys, statuses) if s is Status.FAILED]
            assert stored and failed, statuses
            s = store.stats()
            assert s["failures"] == len(failed) and s["stored"] == len(stored)
            # no temp file stays behind for a failed block
            assert stray_files(mnt) == []
            # single puts raise the OSError, with errno and path, once full
            # (the failed blocks' temp files are gone, so a few may fit again)
            extra = [b"extra-%02d" % i for i in range(20)]
            with pytest.raises(OSError) as ei:
                for key in extra:
                    assert await store.put(key, payload(key, bs)) is Status.STORED
                    stored.append(key)
            assert ei.value.errno == errno.ENOSPC, ei.value
            assert key.hex() in str(ei.value.filename)
            failed.append(key)
            keys = keys + extra[: extra.index(key) + 1]
            assert stray_files(mnt) == []
            # every STORED block loads intact; every FAILED one is absent
            _r2, out = rows(len(keys), bs)
            got = await store.get_many(keys, out)
            for key, status, row in zip(keys, got, out):
                if key in stored:
                    assert status is Status.HIT, key
                    assert bytes(row) == payload(key, bs), key
                else:
                    assert status is Status.MISS, key
            # room made again: the store carries on
            assert await store.delete_many(stored[:3]) == [True] * 3
            assert await store.put(failed[0], payload(failed[0], bs)) is Status.STORED
            assert await store.get(failed[0], out[0]) is Status.HIT
            assert bytes(out[0]) == payload(failed[0], bs)


# ----------------------------------------------------------------------------
# EPERM / EACCES
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_immutable_leaf_directory(root: Path, backend: str) -> None:
    a, b, c = bytes.fromhex("abcde1"), bytes.fromhex("abcde2"), bytes.fromhex("123456")
    async with opened(root, BS, backend) as store:
        assert await store.put(a, payload(a, BS)) is Status.STORED
        leaf = block_file(root, a).parent
        with immutable(leaf):
            _r, bufs = filled_rows([b, c], BS)
            assert await store.put_many([b, c], bufs) == [Status.FAILED, Status.STORED]
            assert store.stats()["failures"] == 1
            with pytest.raises(OSError) as ei:
                await store.put(b, payload(b, BS))
            assert ei.value.errno in (errno.EPERM, errno.EACCES), ei.value
            assert b.hex() in str(ei.value.filename)
            # loads still work; a delete fails for that block only
            _r2, out = rows(2, BS)
            assert await store.get_many([a, c], out) == [Status.HIT, Status.HIT]
            assert bytes(out[0]) == payload(a, BS) and bytes(out[1]) == payload(c, BS)
            assert await store.delete_many([a, c]) == [False, True]
            assert store.stats()["failures"] == 3
            assert sorted(p.name for p in leaf.iterdir()) == [f"{a.hex()}.kvb"]
        assert await store.put(b, payload(b, BS)) is Status.STORED
        assert await store.delete_many([a]) == [True]


@pytest.mark.asyncio
async def test_immutable_block_file_cannot_be_deleted(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        await store.put_many([b"imm", b"free"], [payload(b"imm", BS), payload(b"free", BS)])
        with immutable(block_file(root, b"imm")):
            assert await store.delete_many([b"imm", b"free", b"absent"]) == [False, True, False]
            assert store.stats()["failures"] == 1
            assert block_file(root, b"imm").is_file()


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def _run_nobody(
    args: dict[str, Any], *, skip_if_refused: bool = True, **popen: Any
) -> tuple[dict[str, Any], str]:
    """Run store_helpers' ``nobody`` role; its JSON result and its stderr."""
    proc = child("nobody", args, **popen)
    out, err = reap(proc, timeout=60)
    if skip_if_refused and ("io_uring unavailable" in err or "EngineUnavailable" in err):
        pytest.skip(f"io_uring refused for an unprivileged user: {err[-300:]}")
    assert proc.returncode == 0, err
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return res, err


@ONE_LOOP
async def test_unprivileged_writer_gets_eacces(tmp_path: Path, backend: str) -> None:
    """A store used by uid 65534: a root-owned leaf refuses its writes, a 0700 one its reads."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    gen = new_root(base)
    root = next(gen)
    try:
        root.chmod(0o755)
        writable_key, blocked_key, secret_key = (
            b"\x01\x02\x03\x04",
            bytes.fromhex("abcde1"),
            bytes.fromhex("fedcb1"),
        )
        async with opened(root, BS, backend) as store:  # root makes the fan-out and two blocks
            await store.put_many(
                [blocked_key, secret_key], [payload(blocked_key, BS), payload(secret_key, BS)]
            )
        ns = root / "default"
        _chown_tree(ns, 65534)
        blocked_leaf, secret_leaf = (
            block_file(root, blocked_key).parent,
            block_file(root, secret_key).parent,
        )
        for leaf, mode in ((blocked_leaf, 0o755), (secret_leaf, 0o700)):
            _chown_tree(leaf, 0)
            leaf.chmod(mode)
        new_in_blocked = bytes.fromhex("abcde2")
        args = {
            "root": str(root), "bs": BS, "backend": backend,
            "put_keys": [new_in_blocked.hex(), writable_key.hex()],
            "put_one": bytes.fromhex("abcde3").hex(),
            "get_keys": [secret_key.hex(), blocked_key.hex(), writable_key.hex()],
        }  # fmt: skip
        res, _err = _run_nobody(args)
        assert res["uid"] == 65534
        assert res["put_many"] == ["failed", "stored"]
        assert res["put_one"][:2] == ["OSError", errno.EACCES], res["put_one"]
        assert bytes.fromhex("abcde3").hex() in res["put_one"][2]
        assert res["get_many"] == ["failed", "hit", "hit"]
        assert res["get_ok"] == [False, True, True]
        assert res["get_one"][:2] == ["OSError", errno.EACCES], res["get_one"]
        assert res["stats"]["failures"] == 4
        # nothing of the refused blocks reached the disk
        assert not block_file(root, new_in_blocked).exists()
        assert stray_files(root) == []
    finally:
        gen.close()


@ONE_LOOP
async def test_fixed_buffers_refused_by_memlock(backend: str) -> None:
    """An unprivileged process with RLIMIT_MEMLOCK 0: registration fails, transfers still work."""
    if backend != "uring":
        pytest.skip("only io_uring pins registered buffers")
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    gen = new_root(base)
    root = next(gen)
    try:
        root.chmod(0o755)
        async with opened(root, BS, backend):  # root makes the fan-out
            pass
        _chown_tree(root / "default", 65534)
        keys = [bytes([0x51, i, 3]) for i in range(4)]
        args = {
            "root": str(root), "bs": BS, "backend": backend, "fixed_buffers": True,
            "memlock": 256 * 1024, "put_keys": [k.hex() for k in keys[:3]], "put_one": keys[3].hex(),
            "get_keys": [k.hex() for k in keys],
        }  # fmt: skip
        res, err = _run_nobody(args)
        assert res["uid"] == 65534
        assert res["put_many"] == ["stored"] * 3 and res["put_one"] == "stored"
        assert res["get_many"] == ["hit"] * 4 and res["get_ok"] == [True] * 4
        stats = res["stats"]
        assert stats["registration_refused"] >= 1
        assert stats["fixed_buffers_active"] is False
        assert stats["registered_regions"] == 0 and stats["fixed_transfers"] == 0
        assert "RLIMIT_MEMLOCK" in err  # the one warning says what to raise
        # With no locked memory at all the ring itself is refused (ENOMEM):
        # the default engine choice falls back to the thread engine.
        again = {**args, "backend": "auto", "memlock": 0, "put_keys": [], "put_one": keys[0].hex()}
        env = {k: v for k, v in os.environ.items() if k != "KVURING_BACKEND"}
        res, err = _run_nobody(again, skip_if_refused=False, env=env)
        assert res["stats"]["engine"] == "threads", err
        assert res["put_one"] == "exists" and res["get_ok"] == [True] * 4
    finally:
        gen.close()


# ----------------------------------------------------------------------------
# EIO: a loop device shrunk under a mounted ext4
# ----------------------------------------------------------------------------


@ONE_LOOP
async def test_io_errors_from_the_device(tmp_path: Path, backend: str) -> None:
    for tool in ("losetup", "mkfs.ext4", "mount"):
        need_tool(tool)
    bs = 64 * 1024
    with tmpfs(tmp_path / "back", "80m") as back:
        image = back / "disk.img"
        image.touch()
        os.truncate(image, 64 << 20)
        mk = subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(image)],
                            capture_output=True, text=True)  # fmt: skip
        if mk.returncode:
            pytest.skip(f"mkfs.ext4 failed: {mk.stderr}")
        lo = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
        if lo.returncode:
            pytest.skip(f"no loop device: {lo.stderr}")
        loop = lo.stdout.strip()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        try:
            m = subprocess.run(["mount", "-o", "errors=continue", loop, str(mnt)],
                               capture_output=True, text=True)  # fmt: skip
            if m.returncode:
                pytest.skip(f"cannot mount ext4 on {loop}: {m.stderr}")
            try:
                keys = [b"dev-%03d" % i for i in range(200)]
                store = BlockStore(mnt, bs, backend=backend, direct=True)
                await store.open()
                try:
                    _r, bufs = filled_rows(keys, bs)
                    assert await store.put_many(keys[:150], bufs[:150]) == [Status.STORED] * 150
                    # the device loses everything past 6 MiB: reads and writes there fail
                    os.truncate(image, 6 << 20)
                    subprocess.run(["losetup", "-c", loop], check=True)
                    statuses = await store.put_many(keys[150:], bufs[150:])
                    assert len(statuses) == 50
                    assert set(statuses) <= {Status.STORED, Status.FAILED}
                    assert Status.FAILED in statuses
                    nfailed = statuses.count(Status.FAILED)
                    assert store.stats()["failures"] == nfailed
                    _r2, out = rows(len(keys), bs)
                    got = await store.get_many(keys, out)
                    assert len(got) == len(keys)
                    assert Status.FAILED in got
                    for key, status, row in zip(keys, got, out):
                        if status is Status.HIT:
                            assert bytes(row) == payload(key, bs), key
                    assert store.stats()["failures"] == nfailed + got.count(Status.FAILED)
                    # single calls raise the OSError; at least one of them is EIO
                    codes = set()
                    for key in keys[:150]:
                        try:
                            await store.get(key, out[0])
                        except OSError as exc:
                            codes.add(exc.errno)
                            assert key.hex() in str(exc.filename)
                    assert errno.EIO in codes, codes
                finally:
                    await store.close()
            finally:
                subprocess.run(["umount", str(mnt)], capture_output=True)
        finally:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


# ----------------------------------------------------------------------------
# symlinks and other things planted inside the store
# ----------------------------------------------------------------------------


async def _valid_block_file(root: Path, backend: str, key: bytes) -> bytes:
    """The bytes of a valid block file for ``key`` (made in a scratch namespace)."""
    async with opened(root, BS, backend, namespace="scratch") as store:
        await store.put(key, payload(key, BS))
    data = block_file(root, key, ns="scratch").read_bytes()
    shutil.rmtree(root / "scratch")
    return data


def _plant(link: Path, target: Path) -> None:
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


@ONE_LOOP
@pytest.mark.parametrize("level", ["fan-out dir", "leaf dir", "block file"])
async def test_symlink_planted_before_open(
    root: Path, outside: Path, backend: str, level: str
) -> None:
    """No write lands outside the store; no load returns outside data."""
    k1, k2, other = bytes.fromhex("abcdef01"), bytes.fromhex("abcdef02"), bytes.fromhex("777777")
    valid = await _valid_block_file(root, backend, k1)
    # outside holds what a redirected path would reach: a valid block for k1
    (outside / "de").mkdir()
    (outside / "de" / f"{k1.hex()}.kvb").write_bytes(valid)
    (outside / f"{k1.hex()}.kvb").write_bytes(valid)
    async with opened(root, BS, backend):
        pass  # make the namespace (fan-out) first, like a store in use
    ns = root / "default"
    if level == "fan-out dir":
        _plant(ns / "abc", outside)
    elif level == "leaf dir":
        _plant(ns / "abc" / "de", outside)
    else:
        _plant(ns / "abc" / "de" / f"{k1.hex()}.kvb", outside / f"{k1.hex()}.kvb")
    before = snapshot(outside)
    async with opened(root, BS, backend) as store:
        out = bytearray(BS)
        got = await store.get_many([k1], [out])
        assert got[0] is not Status.HIT, "loaded a block from outside the store"
        assert out != payload(k1, BS)
        # a put through the planted link: a new key in a redirected dir, or
        # the very name the link occupies
        target = k1 if level == "block file" else k2
        _r, bufs = filled_rows([target, other], BS)
        statuses = await store.put_many([target, other], bufs)
        allowed = {Status.EXISTS, Status.FAILED} if level == "block file" else {Status.FAILED}
        assert statuses[0] in allowed, statuses
        assert statuses[1] is Status.STORED
        await store.delete_many([k1])
        assert await store.contains_many([other]) == [True]
    assert snapshot(outside) == before, "something outside the store changed"


@ONE_LOOP
async def test_symlink_planted_while_open(root: Path, outside: Path, backend: str) -> None:
    """A fan-out dir swapped for a symlink after open: still no write outside."""
    k = bytes.fromhex("abcdef01")
    async with opened(root, BS, backend) as store:
        await store.put(b"\x12\x34\x56", payload(b"x", BS))
        _plant(root / "default" / "abc", outside)
        assert await store.put_many([k], [payload(k, BS)]) == [Status.FAILED]
    assert tree(outside) == [], "the store made something outside itself"


@ONE_LOOP
async def test_symlinked_registry_dir(root: Path, outside: Path, backend: str) -> None:
    """<ns>/.tmp as a symlink: open must neither write nor delete anything outside."""
    (outside / "victim.lock").write_bytes(b"abc/de\n")
    (outside / "victim").mkdir()
    (outside / "victim" / "data").write_bytes(b"precious")
    (outside / "notes.txt").write_bytes(b"keep me")
    ns = root / "reg"
    ns.mkdir()
    (ns / ".tmp").symlink_to(outside)
    before = snapshot(outside)
    store = BlockStore(root, BS, backend=backend, namespace="reg")
    try:
        await store.open()
    except OSError:
        pass  # refusing to open is fine
    else:
        try:
            assert await store.put(b"k", payload(b"k", BS)) is Status.STORED
        finally:
            await store.close()
    assert snapshot(outside) == before, "the store wrote or deleted outside itself"


@ONE_LOOP
async def test_symlinked_namespace_is_refused(root: Path, outside: Path, backend: str) -> None:
    (root / "linked").symlink_to(outside)
    store = BlockStore(root, BS, backend=backend, namespace="linked")
    with pytest.raises(OSError) as ei:
        await store.open()
    assert ei.value.errno in (errno.ELOOP, errno.ENOTDIR), ei.value
    assert tree(outside) == []
    await store.close()


@pytest.mark.asyncio
async def test_file_in_place_of_a_directory(root: Path, backend: str) -> None:
    k, other = bytes.fromhex("abcdef01"), bytes.fromhex("777777")
    async with opened(root, BS, backend):
        pass
    ns = root / "default"
    (ns / "abc").write_bytes(b"not a directory")  # where the store would make a directory
    async with opened(root, BS, backend, clean=False) as store:
        _r, bufs = filled_rows([k, other], BS)
        assert await store.put_many([k, other], bufs) == [Status.FAILED, Status.STORED]
        got = await store.get_many([k, other], bufs)
        assert got[0] in (Status.MISS, Status.FAILED) and got[1] is Status.HIT
        assert await store.contains_many([k]) == [False]
    assert (ns / "abc").read_bytes() == b"not a directory"
    assert stray_files(root) == [ns / "abc"]


@pytest.mark.asyncio
async def test_directory_in_place_of_a_block(root: Path, backend: str) -> None:
    """A directory where a block file should be: FAILED for that block, with errno and path."""
    k, other = b"dir-here", b"fine"
    async with opened(root, BS, backend) as store:
        block_file(root, k).mkdir(parents=True)
        await store.put(other, payload(other, BS))
        _r, out = rows(2, BS)
        got = await store.get_many([k, other], out)
        assert got[0] in (Status.FAILED, Status.CORRUPT, Status.MISS)
        assert got[1] is Status.HIT and bytes(out[1]) == payload(other, BS)
        assert block_file(root, k).is_dir()
        if got[0] is Status.FAILED:
            with pytest.raises(OSError) as ei:
                await store.get(k, out[0])
            assert ei.value.errno in (errno.EISDIR, errno.EINVAL), ei.value
            assert k.hex() in str(ei.value.filename)
        assert stat.S_ISDIR(block_file(root, k).stat().st_mode)
        assert len(block_files(root)) == 1
