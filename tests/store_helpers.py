"""Helpers shared by the BlockStore tests (tests/test_store_*.py), and child-process roles.

The helpers compute what the spec says independently of kvuring's own code
(file names, payloads), so a test compares the store against the spec and
not against itself.

Run as a script, this file is the child process the crash and concurrency
tests start (``python tests/store_helpers.py ROLE ARGS_JSON``):

``writer``   puts blocks in batches and prints ``STORED <hex> ...`` per batch
``hold``     opens a store, stores one block, leaves a partial temp file
             beside it (named as the store names its own), prints
             ``OPEN <token> <temp path>`` and waits until stdin closes
``racer``    waits for ``go`` on stdin, then puts the given keys; prints JSON
``nobody``   imports everything, drops root (uid/gid 65534), then puts and
             loads; prints JSON with statuses and errnos
``opener``   prints ``READY``, opens a store when a line comes on stdin, puts
             one block; prints JSON: ``opened`` (the put's status) or
             ``refused`` (the open's ValueError)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvuring import BlockStore, Status, aligned_buffer

TRAILER = 4096
HERE = Path(__file__).resolve().parent
PYTHON = sys.executable

# ----------------------------------------------------------------------------
# the spec, written out independently
# ----------------------------------------------------------------------------


def kbytes(key: bytes | int) -> bytes:
    """A key's canonical bytes: bytes as is, an int as its minimal big-endian bytes."""
    if isinstance(key, int):
        n = max(1, (key.bit_length() + 7) // 8)
        return key.to_bytes(n, "big")
    return key


def block_file(root: Path, key: bytes | int, *, ns: str = "default", verify: bool = True) -> Path:
    """``<root>/<ns>/<hex[0:3]>/<hex[3:5]>/<hex>.kvb|.bin`` (hex padded with 0 to 5 digits)."""
    h = kbytes(key).hex()
    fan = h.ljust(5, "0")
    return root / ns / fan[:3] / fan[3:5] / f"{h}{'.kvb' if verify else '.bin'}"


def payload(key: bytes | int, size: int, salt: int = 0) -> bytes:
    """Deterministic pseudo-random bytes for ``key`` (different per key and salt)."""
    return random.Random(kbytes(key) + salt.to_bytes(4, "big")).randbytes(size)


def rows(n: int, size: int) -> tuple[Any, list[memoryview]]:
    """One aligned region and ``n`` block-sized memoryview rows of it."""
    region = aligned_buffer(max(1, n) * size)
    view = memoryview(region)
    return region, [view[i * size : (i + 1) * size] for i in range(n)]


def filled_rows(
    keys: Sequence[bytes | int], size: int, salt: int = 0
) -> tuple[Any, list[memoryview]]:
    region, out = rows(len(keys), size)
    for row, key in zip(out, keys):
        row[:] = payload(key, size, salt)
    return region, out


#: the namespace's manifest (kvuring/_manifest.py), beside the fan-out
MANIFEST = ".kvuring-manifest.json"


def _ns_files(root: Path, ns: str) -> list[Path]:
    """Every file beneath the namespace except the writer registry (``.tmp``) and the manifest."""
    base = root / ns
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == base:
            dirnames[:] = [d for d in dirnames if d != ".tmp"]
            filenames = [f for f in filenames if f != MANIFEST]
        out += [Path(dirpath) / f for f in filenames]
    return sorted(out)


def block_files(root: Path, ns: str = "default") -> list[Path]:
    """Every file beneath the namespace (outside ``.tmp``): blocks and anything else."""
    return _ns_files(root, ns)


def stray_files(root: Path, ns: str = "default") -> list[Path]:
    """Files beneath the namespace that are not published blocks (temp files, leftovers)."""
    return [p for p in _ns_files(root, ns) if p.suffix not in (".kvb", ".bin")]


def locks(root: Path, ns: str = "default") -> list[str]:
    """Writer registrations (lock files) in ``<ns>/.tmp``."""
    tmp = root / ns / ".tmp"
    if not tmp.is_dir():
        return []
    return sorted(n for n in os.listdir(tmp) if n.endswith((".lock", ".locking")))


def tree(path: Path) -> list[str]:
    """Everything beneath ``path`` (relative names, symlinks not followed), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel = Path(dirpath).relative_to(path)
        out += [str(rel / n) for n in dirnames + filenames]
    return sorted(out)


def odirect_works(directory: Path) -> bool:
    """Whether O_DIRECT open + aligned write works in ``directory`` (our own probe)."""
    probe = directory / f".probe-{uuid.uuid4().hex}"
    buf = aligned_buffer(4096)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


# ----------------------------------------------------------------------------
# mounts and attributes (root only)
# ----------------------------------------------------------------------------


def need_tool(tool: str) -> str:
    """The path of ``tool`` on PATH; skip the test where it is missing."""
    found = shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} not found on PATH (install it to run this test)")
    return found


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a fresh tmpfs of ``size`` at ``path``; skip the test where mounting fails."""
    need_tool("mount")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if r.returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)


@contextlib.contextmanager
def small_ext4(path: Path, size: str = "16M") -> Iterator[Path]:
    """A fresh ext4 of ``size`` (default ``mkfs.ext4``, loop-mounted) at ``path``; skip where impossible.

    The image file sits beside ``path``.  The filesystem is always
    unmounted and its loop device detached afterwards.
    """
    mkfs, mount, umount = need_tool("mkfs.ext4"), need_tool("mount"), need_tool("umount")
    if os.geteuid() != 0:
        pytest.skip("mounting an ext4 image needs root")
    path.mkdir(parents=True, exist_ok=True)
    image = path.with_name(path.name + ".img")
    subprocess.run(["truncate", "-s", size, str(image)], check=True, capture_output=True)
    try:
        r = subprocess.run([mkfs, "-q", "-F", str(image)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
        r = subprocess.run([mount, "-o", "loop", str(image), str(path)], capture_output=True,
                           text=True)  # fmt: skip
        if r.returncode:
            pytest.skip(f"cannot loop-mount an ext4 image here: {r.stderr.strip()}")
        try:
            yield path
        finally:
            # umount of a loop mount made with -o loop also detaches the device
            # (autoclear); -d detaches it explicitly where that is not so.
            r = subprocess.run([umount, "-d", str(path)], capture_output=True, text=True)
            if r.returncode:
                subprocess.run([umount, "-l", "-d", str(path)], capture_output=True, text=True)
    finally:
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """``chattr +i`` on ``path`` (skip where chattr is missing or unsupported), ``-i`` afterwards."""
    need_tool("chattr")
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"chattr +i not supported here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, text=True)


# ----------------------------------------------------------------------------
# child processes
# ----------------------------------------------------------------------------


def child(role: str, args: dict[str, Any], **popen: Any) -> subprocess.Popen[str]:
    """Start ``store_helpers.py ROLE ARGS`` with pipes for stdin and stdout."""
    return subprocess.Popen(
        [PYTHON, str(HERE / "store_helpers.py"), role, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def reap(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    """Wait for ``proc`` (killing it on timeout) and close its pipes."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out, err


def _store(a: dict[str, Any]) -> BlockStore:
    return BlockStore(
        a["root"],
        a["bs"],
        namespace=a.get("ns", "default"),
        backend=a.get("backend", "auto"),
        direct=a.get("direct", "auto"),
        verify=a.get("verify", True),
        fixed_buffers=a.get("fixed_buffers", False),
        durable=a.get("durable", False),
    )


def _run(coro: Any, loop: str) -> Any:
    import uvloop

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def _writer(a: dict[str, Any]) -> None:
    bs, batch = a["bs"], a["batch"]
    async with _store(a) as store:
        _region, bufs = rows(batch, bs)
        for n in range(a["batches"]):
            keys = [(a["start"] + n * batch + i).to_bytes(8, "big") for i in range(batch)]
            for key, buf in zip(keys, bufs):
                buf[:] = payload(key, bs)
            statuses = await store.put_many(keys, bufs)
            done = [k.hex() for k, s in zip(keys, statuses) if s is Status.STORED]
            print("STORED " + " ".join(done), flush=True)
        print("DONE", flush=True)


def own_token(root: Path, ns: str) -> str:
    """This process's writer token, from its lock file's name (``<pid>-<random>.lock``)."""
    mine = [n for n in locks(root, ns) if n.startswith(f"{os.getpid()}-")]
    assert len(mine) == 1, mine
    return mine[0].rsplit(".", 1)[0]


def fake_temp_file(root: Path, ns: str, key: bytes, token: str, verify: bool = True) -> Path:
    """A partly written temp block the way a writer names it: beside its final name."""
    final = block_file(root, key, ns=ns, verify=verify)
    tmp = final.with_name(f"{final.name}.{token}.999999.tmp")
    tmp.write_bytes(b"partial" * 100)
    return tmp


async def _hold(a: dict[str, Any]) -> None:
    root, ns = Path(a["root"]), a.get("ns", "default")
    async with _store(a) as store:
        # Store one block (registers its leaf dir), then leave a partial
        # temp file beside it, as a put cut short would.
        key = bytes.fromhex(a["key"])
        await store.put(key, payload(key, a["bs"]))
        token = own_token(root, ns)
        tmp = fake_temp_file(root, ns, key, token)
        print(f"OPEN {token} {tmp}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _racer(a: dict[str, Any]) -> None:
    bs = a["bs"]
    keys = [bytes.fromhex(k) for k in a["keys"]]
    async with _store(a) as store:
        _region, bufs = filled_rows(keys, bs)
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        statuses = await store.put_many(keys, bufs)
        print(json.dumps({"statuses": [s.value for s in statuses], "stats": _plain(store)}))


def _plain(store: BlockStore) -> dict[str, Any]:
    return {k: v for k, v in store.stats().items() if isinstance(v, (int, str, bool))}


async def _opener(a: dict[str, Any]) -> None:
    # Open as soon as "go" comes (first opens racing to publish the manifest).
    store = _store(a)
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    try:
        await store.open()
    except ValueError as exc:
        print(json.dumps({"refused": str(exc)}), flush=True)
        return
    try:
        key = f"opener-{a['bs']}".encode()
        status = await store.put(key, payload(key, a["bs"]))
    finally:
        await store.close()
    print(json.dumps({"opened": status.value}), flush=True)


async def _nobody(a: dict[str, Any]) -> None:
    bs = a["bs"]
    out: dict[str, Any] = {"uid": os.getuid()}
    async with _store(a) as store:
        put_keys = [bytes.fromhex(k) for k in a["put_keys"]]
        _region, bufs = filled_rows(put_keys, bs)
        out["put_many"] = [s.value for s in await store.put_many(put_keys, bufs)]
        try:
            key = bytes.fromhex(a["put_one"])
            out["put_one"] = (await store.put(key, payload(key, bs))).value
        except OSError as exc:
            out["put_one"] = ["OSError", exc.errno, exc.filename]
        get_keys = [bytes.fromhex(k) for k in a["get_keys"]]
        _region2, gbufs = rows(len(get_keys), bs)
        got = await store.get_many(get_keys, gbufs)
        out["get_many"] = [s.value for s in got]
        out["get_ok"] = [
            s is Status.HIT and bytes(b) == payload(k, bs) for k, s, b in zip(get_keys, got, gbufs)
        ]
        try:
            out["get_one"] = (await store.get(get_keys[0], bytearray(bs))).value
        except OSError as exc:
            out["get_one"] = ["OSError", exc.errno, exc.filename]
        out["stats"] = _plain(store)
    print(json.dumps(out), flush=True)


def main(argv: list[str]) -> int:
    role, a = argv[1], json.loads(argv[2])
    if role == "nobody":
        # Everything is imported already (as root); from here on no privileges.
        import uvloop  # noqa: F401

        if "memlock" in a:
            import resource

            resource.setrlimit(resource.RLIMIT_MEMLOCK, (a["memlock"], a["memlock"]))
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        assert os.getuid() == 65534
        with contextlib.suppress(PermissionError):
            os.chdir("/")
    fn = {"writer": _writer, "hold": _hold, "racer": _racer, "nobody": _nobody,
          "opener": _opener}[role]  # fmt: skip
    _run(fn(a), a.get("loop", "asyncio"))
    return 0


# ----------------------------------------------------------------------------
# opening a store in a test
# ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def opened(root: Path, block_size: int, backend: str, **kw: Any) -> Any:
    """An open store on ``backend``; on a clean exit, checks it closed with nothing left over.

    ``clean=False`` skips the check for temp files (for tests where another
    live writer owns some).
    """
    clean = kw.pop("clean", True)
    ns = kw.get("namespace", "default")
    before = set(locks(Path(root), ns))
    store = BlockStore(root, block_size, backend=backend, **kw)
    await store.open()
    try:
        assert store.stats()["engine"] == backend
        yield store
    finally:
        await store.close()
    ring = store.stats()["ring"]
    assert ring["in_flight"] == 0, ring
    assert ring["waiting"] == 0, ring
    assert ring["stray_cqes"] == 0, ring
    mine = {n for n in locks(Path(root), ns) if n.startswith(f"{os.getpid()}-")}
    assert mine <= before, "close() left its lock file behind"
    if clean:
        assert stray_files(Path(root), ns) == [], "temp files left behind"


def new_root(base: Path | None = None) -> Iterator[Path]:
    """A fresh, empty directory for one test: on tmpfs (/dev/shm) unless ``base`` is given."""
    root = _make_root(base)
    try:
        yield root
    finally:
        _remove(root)


@pytest.fixture
def three_roots() -> Iterator[list[Path]]:
    """Three fresh roots for a store over several (import it as a test module's fixture)."""
    made = [new_root() for _ in range(3)]
    try:
        yield [next(gen) for gen in made]
    finally:
        for gen in made:
            for _ in gen:
                pass


def _make_root(base: Path | None = None) -> Path:
    if base is None:
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="kvuring-test-", dir=base))


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        # an immutable file or directory left by a failed test blocks the removal
        # (without chattr no test made anything immutable)
        if shutil.which("chattr") is not None:
            subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


_POOL: list[Path] = []


def reset_namespace(nsdir: Path) -> None:
    """Remove a namespace (its blocks, registry and manifest) so the next test starts afresh."""
    if nsdir.is_symlink() or nsdir.exists():
        _unlink_any(nsdir)


def _unlink_any(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _remove(path)
    else:
        try:
            path.unlink()
        except PermissionError:
            if shutil.which("chattr") is None:
                raise
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
            path.unlink()


def pooled_root() -> Iterator[Path]:
    """An empty directory on tmpfs.

    Every other entry in it is removed after the test; the directory goes
    back to a pool for the next test.
    """
    root = _POOL.pop() if _POOL else _make_root()
    try:
        yield root
    finally:
        try:
            for entry in os.scandir(root):
                if entry.name == "default":
                    reset_namespace(Path(entry.path))
                else:
                    _unlink_any(Path(entry.path))
            _POOL.append(root)
        except OSError:
            _remove(root)


@atexit.register
def _drain_pool() -> None:
    while _POOL:
        _remove(_POOL.pop())


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    try:
        sys.exit(main(sys.argv))
    except OSError as exc:
        print(json.dumps({"error": [exc.errno, errno.errorcode.get(exc.errno or 0), str(exc)]}))
        sys.exit(3)


# ----------------------------------------------------------------------------
# waiting in async tests
# ----------------------------------------------------------------------------


class Ticker:
    """Counts event-loop turns (10 ms sleeps) while a test awaits something that hangs."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``check()`` turns true within ``timeout`` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return False
