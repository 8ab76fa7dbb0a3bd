"""capacity_bytes: a disk budget with least-recently-used eviction (docs/capacity.md).

What is checked: the namespace's block files stay within the budget under
repeated puts (plus one batch in flight); least recently used blocks go
first, loads and EXISTS count as use and presence checks do not; a put's
own keys are never its victims; recency survives a restart (it is the
file's mtime); a namespace over budget at open is trimmed in the
background while the loop keeps ticking; deletes, MISS and CORRUPT keep
the accounting exact; two processes share one budget (rescans); a SIGKILL
during eviction leaves only whole blocks and the next open accounts them;
a block evicted while another store loads it is HIT (intact) or MISS,
never CORRUPT; PollingStore; argument checks; layout='vllm'.

Run as a script, this file is the child process of the two-process tests
(``python tests/test_store_capacity.py ROLE ARGS_JSON``):

``budget``   opens a store with a budget, prints READY, then per ``put`` line
             on stdin waits for two fresh rescans (so it has seen what the
             other process wrote), puts one batch and prints JSON
``evictor``  puts batches forever under a small budget (every put evicts);
             prints GO after a few
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from store_helpers import (
    PYTHON,
    block_file,
    filled_rows,
    flip,
    kbytes,
    opened,
    payload,
    pooled_root,
    reap,
    rows,
    stray_files,
)

from kvuring import BlockStore, PollingStore, Status

BS = 4096
FS = BS + 4096  # file bytes of a verified block: payload + trailer
ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])
HERE = Path(__file__).resolve().parent


@pytest.fixture
def root() -> Iterator[Path]:
    yield from pooled_root()


def keys_of(tag: int, n: int, start: int = 0) -> list[bytes]:
    return [bytes([tag]) + i.to_bytes(4, "big") for i in range(start, start + n)]


def on_disk(root: Path, ns: str = "default") -> dict[bytes, int]:
    """Block files of the namespace (``.kvb``/``.bin`` two levels down), by key: their sizes.

    A quicker walk than store_helpers.block_files (the tests call it often).
    """
    out = {}
    for upper in os.scandir(root / ns):
        if upper.name == ".tmp" or not upper.is_dir(follow_symlinks=False):
            continue
        for leaf in os.scandir(upper.path):
            for f in os.scandir(leaf.path):
                if f.name.endswith((".kvb", ".bin")):
                    try:
                        size = f.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # evicted in the background while we looked
                    out[bytes.fromhex(f.name[:-4])] = size
    return out


def disk_bytes(root: Path, ns: str = "default") -> int:
    return sum(on_disk(root, ns).values())


async def until(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def scanned(store: BlockStore, n: int = 1) -> None:
    await until(lambda: store.stats()["capacity_scans"] >= n, what="the capacity scan")


async def settled(store: BlockStore, root: Path) -> None:
    """Evictions in flight are done: the store's count matches the disk."""

    def done() -> bool:
        s = store.stats()
        return s["evicting"] == 0 and s["used_bytes"] == disk_bytes(root)

    await until(done, what="used == disk")


async def put_each(store: BlockStore, keys: Sequence[bytes]) -> None:
    """One put per key, in order (so their recency is in that order)."""
    for key in keys:
        assert await store.put(key, payload(key, BS)) in (Status.STORED, Status.EXISTS)


# ----------------------------------------------------------------------------
# arguments and stats
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BlockStore, PollingStore])
def test_capacity_bytes_argument(cls: type[Any], tmp_path: Path) -> None:
    for bad in (True, False, 1.5, 4096.0, "4096", b"1"):
        with pytest.raises(TypeError, match="capacity_bytes"):
            cls(tmp_path, BS, capacity_bytes=bad)
    for bad in (0, -1, -(1 << 40)):
        with pytest.raises(ValueError, match="capacity_bytes"):
            cls(tmp_path, BS, capacity_bytes=bad)
    s = cls(tmp_path, BS, capacity_bytes=1 << 30).stats()
    assert (s["capacity_bytes"], s["used_bytes"], s["evicted"]) == (1 << 30, None, 0)
    s = cls(tmp_path, BS).stats()
    assert (s["capacity_bytes"], s["used_bytes"], s["evicted"]) == (None, None, 0)


@pytest.mark.asyncio
async def test_no_budget_no_accounting(root: Path, backend: str) -> None:
    async with opened(root, BS, backend) as store:
        await put_each(store, keys_of(1, 3))
        s = store.stats()
        assert (s["capacity_bytes"], s["used_bytes"], s["evicted"]) == (None, None, 0)


# ----------------------------------------------------------------------------
# the budget and the order
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_budget_kept_under_repeated_puts(root: Path, backend: str) -> None:
    cap, batch = 20 * FS, 8
    async with opened(root, BS, backend, capacity_bytes=cap) as store:
        await scanned(store)
        written: list[bytes] = []
        for n in range(25):
            keys = keys_of(2, batch, n * batch)
            _r, bufs = filled_rows(keys, BS)
            assert await store.put_many(keys, bufs) == [Status.STORED] * batch
            written += keys
            s = store.stats()
            assert s["used_bytes"] <= cap, s
            assert disk_bytes(root) <= cap + batch * FS  # the batch in flight may overshoot
            present = on_disk(root)
            assert all(k in present for k in keys), "a put evicted one of its own blocks"
        await settled(store, root)
        s = store.stats()
        present = on_disk(root)
        assert s["used_bytes"] == sum(present.values()) <= cap
        assert s["used_blocks"] == len(present)
        assert s["evicted"] == len(written) - len(present)
        assert set(present) == set(written[-len(present) :]), "not the oldest were evicted"
        # hysteresis: evictions come in groups, not one delete batch per put
        assert s["evictions"] < 25


@pytest.mark.asyncio
async def test_least_recently_used_go_first(root: Path, backend: str) -> None:
    cap = 10 * FS  # evictions go down to 95%: 9.5 blocks
    k = keys_of(3, 20)
    async with opened(root, BS, backend, capacity_bytes=cap) as store:
        await put_each(store, k[:10])
        assert store.stats()["evicted"] == 0
        assert await store.get(k[0], bytearray(BS)) is Status.HIT  # k0 is now the youngest
        await put_each(store, k[10:11])  # 11 blocks > 10: 9.5 - 1 incoming leaves 8
        await settled(store, root)
        present = on_disk(root)
        assert k[0] in present and k[10] in present
        assert k[1] not in present and k[2] not in present
        assert set(present) == {*k[3:10], k[0], k[10]}
        assert store.stats()["evicted"] == 2
        # presence checks are not use; EXISTS is
        assert await store.contains_many([k[3]]) == [True]
        assert await store.put(k[4], payload(k[4], BS)) is Status.EXISTS
        await put_each(store, k[11:13])
        await settled(store, root)
        present = on_disk(root)
        assert k[3] not in present and k[5] not in present
        assert k[4] in present and k[0] in present
        assert store.stats()["evicted"] == 4


@pytest.mark.asyncio
async def test_a_put_never_evicts_its_own_keys(root: Path, backend: str) -> None:
    k = keys_of(4, 12)
    async with opened(root, BS, backend, capacity_bytes=4 * FS) as store:
        await put_each(store, k[:4])
        # k0 is the oldest block, and in the batch: k1, k2 go instead
        _r, bufs = filled_rows([k[0], k[4]], BS)
        assert await store.put_many([k[0], k[4]], bufs) == [Status.EXISTS, Status.STORED]
        await settled(store, root)
        assert set(on_disk(root)) == {k[0], k[3], k[4]}
        # a batch bigger than the budget: everything else goes, the batch stays whole
        _r, bufs = filled_rows(k[5:12], BS)
        assert await store.put_many(k[5:12], bufs) == [Status.STORED] * 7
        await settled(store, root)
        assert set(on_disk(root)) == set(k[5:12])
        assert store.stats()["used_bytes"] == 7 * FS  # over by the batch's own size


@pytest.mark.asyncio
async def test_deletes_misses_and_corrupt_blocks_update_the_count(root: Path, backend: str) -> None:
    k = keys_of(5, 6)
    async with opened(root, BS, backend, capacity_bytes=100 * FS) as store:
        await scanned(store)
        await put_each(store, k[:4])
        assert store.stats()["used_bytes"] == 4 * FS
        assert await store.delete_many([k[0], k[5]]) == [True, False]
        assert store.stats()["used_bytes"] == 3 * FS
        flip(block_file(root, k[1]), 100)
        assert await store.get(k[1], bytearray(BS)) is Status.CORRUPT
        assert store.stats()["used_bytes"] == 2 * FS
        block_file(root, k[2]).unlink()  # someone else removed it
        assert await store.get(k[2], bytearray(BS)) is Status.MISS
        assert store.stats()["used_bytes"] == 1 * FS
        async with opened(root, BS, backend) as other:  # another store adds one
            assert await other.put(k[4], payload(k[4], BS)) is Status.STORED
        assert await store.get(k[4], bytearray(BS)) is Status.HIT
        assert store.stats()["used_bytes"] == 2 * FS
        assert store.stats()["used_bytes"] == disk_bytes(root)
        assert store.stats()["evicted"] == 0


# ----------------------------------------------------------------------------
# recency on disk
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_recency_survives_a_restart(root: Path, backend: str) -> None:
    k = keys_of(6, 14)
    async with opened(root, BS, backend, capacity_bytes=10 * FS) as store:
        await put_each(store, k[:10])
        await asyncio.sleep(1.1)  # recency has a resolution of a second
        assert await store.get(k[0], bytearray(BS)) is Status.HIT
        assert await store.put(k[5], payload(k[5], BS)) is Status.EXISTS
        assert await store.contains_many([k[1]]) == [True]  # not use
    mtime = {key: block_file(root, key).stat().st_mtime_ns for key in k[:10]}
    others = [mtime[key] for key in k[1:10] if key != k[5]]
    assert min(mtime[k[0]], mtime[k[5]]) > max(others), "the load and EXISTS were not persisted"
    async with opened(root, BS, backend, capacity_bytes=10 * FS) as store:
        await scanned(store)
        assert store.stats()["used_bytes"] == 10 * FS
        await put_each(store, k[10:13])  # evicts 4 of the 8 old ones
        await settled(store, root)
        present = on_disk(root)
        assert k[0] in present and k[5] in present, "a recently used block went first"
        assert len([key for key in k[1:10] if key not in present]) == 4


@pytest.mark.asyncio
@ONE_LOOP
async def test_over_budget_at_open_is_trimmed_in_the_background(root: Path, backend: str) -> None:
    n = 2000
    k = keys_of(7, n)
    async with opened(root, BS, backend) as store:
        for i in range(0, n, 250):
            _r, bufs = filled_rows(k[i : i + 250], BS)
            assert await store.put_many(k[i : i + 250], bufs) == [Status.STORED] * 250
    base = time.time_ns() - 10**13
    for i, key in enumerate(k):  # key i was last used at base + i seconds
        t = base + i * 10**9
        os.utime(block_file(root, key), ns=(t, t))
    cap = 500 * FS
    keep = int(cap * 0.95) // FS
    gaps: list[float] = []
    stop = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    async with opened(root, BS, backend, capacity_bytes=cap) as store:
        opened_in = time.perf_counter() - t0
        await until(lambda: len(on_disk(root)) == keep, what="the trim")
        await settled(store, root)
        stop = True
        await tick
        s = store.stats()
        assert s["evicted"] == n - keep and s["used_bytes"] == keep * FS
        assert set(on_disk(root)) == set(k[n - keep :]), "the trim did not take the oldest"
    assert opened_in < 2.0
    assert max(gaps) < 0.25, f"the loop stalled for {max(gaps):.3f} s"


# ----------------------------------------------------------------------------
# other stores and other processes
# ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_evicted_while_another_store_loads_is_hit_or_miss(root: Path, backend: str) -> None:
    old = keys_of(8, 32)
    async with (
        opened(root, BS, backend) as loader,
        opened(root, BS, backend, capacity_bytes=32 * FS, clean=False) as evictor,
    ):
        _r, bufs = filled_rows(old, BS)
        assert await evictor.put_many(old, bufs) == [Status.STORED] * 32
        _o, out = rows(32, BS)
        seen: dict[Status, int] = {}
        stop = False

        async def load() -> None:
            while not stop:
                got = await loader.get_many(old, out)
                for key, status, buf in zip(old, got, out):
                    seen[status] = seen.get(status, 0) + 1
                    if status is Status.HIT:
                        assert bytes(buf) == payload(key, BS), "an evicted block loaded torn"

        task = asyncio.ensure_future(load())
        for n in range(16):
            new = keys_of(9, 4, 4 * n)
            _w, wbufs = filled_rows(new, BS)
            assert await evictor.put_many(new, wbufs) == [Status.STORED] * 4
            await asyncio.sleep(0)
        stop = True
        await task
        assert set(seen) <= {Status.HIT, Status.MISS}, seen
        assert loader.stats()["corrupt"] == 0
        assert evictor.stats()["evicted"] >= 32
        assert not any(key in on_disk(root) for key in old)


def _child(role: str, args: dict[str, Any], backend: str, rescan: float) -> subprocess.Popen[str]:
    env = {**os.environ, "KVURING_BACKEND": backend, "KVURING_CAPACITY_RESCAN": str(rescan)}
    return subprocess.Popen(
        [PYTHON, str(HERE / "test_store_capacity.py"), role, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _out, err = reap(proc, 5)
        raise AssertionError(f"child exited: {err}")
    return line.strip()


@pytest.mark.parametrize("backend", ["uring", "threads"], indirect=True)
def test_two_processes_share_one_budget(root: Path, backend: str) -> None:
    cap, batch, rounds = 32 * FS, 8, 6
    procs = [
        _child(
            "budget",
            {"root": str(root), "bs": BS, "cap": cap, "tag": tag, "batch": batch},
            backend,
            0.05,
        )
        for tag in (0xA0, 0xB0)
    ]
    try:
        for proc in procs:
            assert _line(proc) == "READY"
        for _ in range(rounds):
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("put\n")
                proc.stdin.flush()
                reply = json.loads(_line(proc))
                assert reply["statuses"] == ["stored"] * batch
                # the process saw the other's blocks (a rescan) before its put
                assert reply["used_bytes"] <= cap
                assert disk_bytes(root) <= cap + batch * FS, "the shared budget was overrun"
        evicted = 0
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("end\n")
            proc.stdin.flush()
            out, err = reap(proc)
            assert proc.returncode == 0, err
            evicted += json.loads(out)["final_evicted"]
        present = on_disk(root)
        assert sum(present.values()) <= cap
        # every block written is on disk or was evicted by exactly one of the two
        assert evicted == 2 * rounds * batch - len(present)
        # the survivors are the youngest of both: LRU over the whole namespace
        assert {key[0] for key in present} == {0xA0, 0xB0}
        assert stray_files(root) == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                reap(proc, 5)


@pytest.mark.parametrize("backend", ["uring", "threads"], indirect=True)
@ONE_LOOP
async def test_sigkill_during_eviction_leaves_whole_blocks(root: Path, backend: str) -> None:
    cap = 16 * FS
    proc = _child("evictor", {"root": str(root), "bs": BS, "cap": cap, "batch": 8}, backend, 0.05)
    try:
        assert await asyncio.get_running_loop().run_in_executor(None, _line, proc) == "GO"
        await asyncio.sleep(0.15)
        proc.send_signal(signal.SIGKILL)
        _out, err = reap(proc)
        assert proc.returncode == -signal.SIGKILL, err
    finally:
        if proc.poll() is None:
            proc.kill()
            reap(proc, 5)
    async with opened(root, BS, backend, capacity_bytes=cap) as store:
        assert stray_files(root) == [], "the killed writer's temp files survived the open"
        assert store.stats()["dead_writers_cleaned"] >= 1
        await scanned(store)
        await settled(store, root)
        present = on_disk(root)
        assert present and set(present.values()) == {FS}, "a torn block file"
        assert store.stats()["used_bytes"] == len(present) * FS <= cap
        keys = sorted(present)
        _o, out = rows(len(keys), BS)
        assert await store.get_many(keys, out) == [Status.HIT] * len(keys)
        assert all(bytes(b) == payload(key, BS) for key, b in zip(keys, out))
        assert store.stats()["corrupt"] == 0


# ----------------------------------------------------------------------------
# PollingStore, layout='vllm'
# ----------------------------------------------------------------------------


def test_polling_store_budget(root: Path, backend: str) -> None:
    cap = 10 * FS
    k = keys_of(0x11, 40)
    with PollingStore(root, BS, backend=backend, capacity_bytes=cap) as store:
        for key in k[:10]:
            store.submit_put([key], [payload(key, BS)])
            store.drain()
        store.submit_get([k[0]], [bytearray(BS)])
        assert store.drain()[0].results == [Status.HIT]
        for i in range(10, 40, 5):
            _r, bufs = filled_rows(k[i : i + 5], BS)
            store.submit_put(k[i : i + 5], bufs)
            assert store.drain()[0].results == [Status.STORED] * 5
            assert disk_bytes(root) <= cap + 5 * FS
        store.drain()
        s = store.stats()
        present = on_disk(root)
        assert s["used_bytes"] == sum(present.values()) <= cap
        assert s["evicted"] == 40 - len(present)
        assert set(present) <= set(k[30:]) | {k[0]}
    # over budget at open: trimmed as the caller polls
    with PollingStore(root, BS, backend=backend, capacity_bytes=4 * FS) as store:
        deadline = time.monotonic() + 10
        while disk_bytes(root) > 4 * FS:
            assert time.monotonic() < deadline, "not trimmed"
            store.poll()
            time.sleep(0.005)
        store.drain()
        assert store.stats()["used_bytes"] == disk_bytes(root)


@pytest.mark.asyncio
@ONE_LOOP
async def test_vllm_layout_is_scanned_and_trimmed(root: Path, backend: str) -> None:
    k = [i.to_bytes(8, "big") + (i % 3).to_bytes(4, "big") for i in range(30)]
    kw: dict[str, Any] = {"verify": False, "layout": "vllm"}
    async with opened(root, BS, backend, **kw) as store:
        for key in k:
            assert await store.put(key, payload(key, BS)) is Status.STORED
            await asyncio.sleep(0.002)  # distinct mtimes, oldest first
    async with opened(root, BS, backend, capacity_bytes=10 * BS, **kw) as store:
        await scanned(store)
        await until(lambda: store.stats()["used_bytes"] <= 10 * BS, what="the trim")
        s = store.stats()
        assert s["evicted"] == 21 and s["used_blocks"] == 9
        _o, out = rows(30, BS)
        got = await store.get_many(k, out)
        assert got == [Status.MISS] * 21 + [Status.HIT] * 9


# ----------------------------------------------------------------------------
# child processes
# ----------------------------------------------------------------------------


async def _budget(a: dict[str, Any]) -> None:
    bs, batch, tag = a["bs"], a["batch"], a["tag"]
    loop = asyncio.get_running_loop()
    async with BlockStore(a["root"], bs, capacity_bytes=a["cap"]) as store:
        print("READY", flush=True)
        n = 0
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "put":
            scans = store.stats()["capacity_scans"]
            while store.stats()["capacity_scans"] < scans + 2:
                await asyncio.sleep(0.005)
            keys = keys_of(tag, batch, n * batch)
            n += 1
            _r, bufs = filled_rows(keys, bs)
            statuses = await store.put_many(keys, bufs)
            s = store.stats()
            print(json.dumps({"statuses": [x.value for x in statuses],
                              "used_bytes": s["used_bytes"], "evicted": s["evicted"]}),
                  flush=True)  # fmt: skip
    print(json.dumps({"final_evicted": store.stats()["evicted"]}), flush=True)


async def _evictor(a: dict[str, Any]) -> None:
    bs, batch = a["bs"], a["batch"]
    async with BlockStore(a["root"], bs, capacity_bytes=a["cap"]) as store:
        n = 0
        while True:
            keys = [kbytes(0xE0 << 32 | (n * batch + i)) for i in range(batch)]
            _r, bufs = filled_rows(keys, bs)
            await store.put_many(keys, bufs)
            n += 1
            if n == 4:
                print("GO", flush=True)


def main(argv: list[str]) -> int:
    role, a = argv[1], json.loads(argv[2])
    fn = {"budget": _budget, "evictor": _evictor}[role]
    asyncio.run(fn(a))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main(sys.argv))
