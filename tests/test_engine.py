"""The engines below the asyncio adapter: choosing one, probing, and chain semantics.

The store builds linked chains whose correctness rests on io_uring's link
rules (a short read or write breaks a soft link, a hard link runs on,
CQE_SKIP_SUCCESS hides successes and the completions a failure cancels).
The thread engine reimplements those rules in C (``kvu_run_chain``); the
scenario tests here drive both engines through the same :class:`Driver`
with raw operation words and require identical completion sequences, equal
to the sequence written down from the kernel's rules.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import uring_unavailable

from kvuring import _binding as b
from kvuring._driver import Driver, Unit
from kvuring._ops import new_words
from kvuring.aio import AsyncRing
from kvuring.engine import (
    REQUIRED_OPCODES,
    Engine,
    EngineUnavailable,
    Ring,
    ThreadRing,
    open_engine,
    resolve_backend,
)

needs_uring = pytest.mark.skipif(
    uring_unavailable() is not None, reason=f"io_uring unavailable: {uring_unavailable()}"
)

FIX = b.SQE_FIXED_FILE
LINK = b.SQE_IO_LINK
HARD = b.SQE_IO_HARDLINK
SKIP = b.SQE_CQE_SKIP_SUCCESS

# --------------------------------------------------------------------------
# choosing an engine
# --------------------------------------------------------------------------


def test_resolve_backend_argument_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVURING_BACKEND", raising=False)
    assert resolve_backend(None) == "auto"
    monkeypatch.setenv("KVURING_BACKEND", "threads")
    assert resolve_backend(None) == "threads"
    # An explicit argument wins over the environment.
    assert resolve_backend("uring") == "uring"


def test_env_var_picks_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVURING_BACKEND", "threads")
    engine = open_engine()
    try:
        assert isinstance(engine, ThreadRing)
        assert engine.name == "threads"
        assert engine.stats()["engine"] == "threads"
    finally:
        engine.close()
    if uring_unavailable() is None:
        monkeypatch.setenv("KVURING_BACKEND", "uring")
        engine = open_engine()
        try:
            assert isinstance(engine, Ring)
            assert engine.stats()["engine"] == "uring"
        finally:
            engine.close()


@pytest.mark.parametrize("bad", ["io_uring", "URING", "", "thread"])
def test_invalid_backend_is_rejected(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.delenv("KVURING_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        open_engine(bad)
    monkeypatch.setenv("KVURING_BACKEND", bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        open_engine()


@needs_uring
def test_auto_prefers_io_uring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVURING_BACKEND", raising=False)
    engine = open_engine()
    try:
        assert isinstance(engine, Ring)
    finally:
        engine.close()


@needs_uring
def test_probed_features() -> None:
    ring = Ring(slots=8)
    try:
        for name in REQUIRED_OPCODES:
            assert ring.features[name], name
        assert ring.features["linked_file"]
        assert ring.features["cqe_skip_success"]
        assert ring.features["direct_descriptors"]
        # The ring's fd really is an io_uring instance.
        assert os.readlink(f"/proc/self/fd/{ring._ring.ring_fd}") == "anon_inode:[io_uring]"
        # Every setup flag the kernel accepted is reported.
        assert "SUBMIT_ALL" in ring.stats()["setup_flags"]
    finally:
        ring.close()
    threads = ThreadRing(slots=8, threads=2)
    try:
        for name in REQUIRED_OPCODES:
            assert threads.features[name], name
        # Linked timeouts have no thread equivalent.
        assert not threads.features["link_timeout"]
    finally:
        threads.close()


@pytest.mark.parametrize("cls", [Ring, ThreadRing])
def test_slots_must_be_positive(cls: type[Engine]) -> None:
    with pytest.raises(ValueError, match="slots must be >= 1"):
        cls(0)  # type: ignore[call-arg]


def test_close_is_idempotent() -> None:
    engines: list[Engine] = [ThreadRing(4, threads=1)]
    if uring_unavailable() is None:
        engines.append(Ring(4))
    for engine in engines:
        engine.close()
        engine.close()
        assert engine.closed
        with pytest.raises(RuntimeError, match="closed"):
            engine.submit(new_words())


# --------------------------------------------------------------------------
# io_uring refused for real
# --------------------------------------------------------------------------

SYSCTL = Path("/proc/sys/kernel/io_uring_disabled")


@pytest.fixture
def io_uring_disabled() -> Iterator[None]:
    """Set kernel.io_uring_disabled=2 (nobody may create a ring) for the test's duration."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change kernel.io_uring_disabled")
    if not SYSCTL.exists():
        pytest.skip("kernel has no kernel.io_uring_disabled (before 6.6)")
    old = SYSCTL.read_text().strip()
    try:
        SYSCTL.write_text("2\n")
    except OSError as exc:
        pytest.skip(f"cannot write {SYSCTL}: {exc}")
    try:
        yield
    finally:
        # The sysctl is global: restore it whatever happened.
        SYSCTL.write_text(old + "\n")
    assert SYSCTL.read_text().strip() == old


def test_refused_io_uring_falls_back(
    io_uring_disabled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVURING_BACKEND", raising=False)
    with pytest.raises(EngineUnavailable) as info:
        open_engine("uring")
    assert info.value.errno == errno.EPERM
    assert isinstance(info.value, OSError)
    with pytest.raises(EngineUnavailable) as info:
        Ring(8)
    assert info.value.errno == errno.EPERM

    engine = open_engine("auto")
    try:
        assert isinstance(engine, ThreadRing)
        assert engine.name == "threads"
    finally:
        engine.close()


@pytest.mark.asyncio
async def test_refused_io_uring_async_ring(
    io_uring_disabled: None, backend: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KVURING_BACKEND", raising=False)
    async with AsyncRing(backend="auto") as ring:
        assert ring.backend == "threads"
        path = tmp_path / "f"
        fd = await ring.openat(path, os.O_WRONLY | os.O_CREAT)
        assert await ring.write(fd, b"fallback") == 8
        await ring.close_fd(fd)
    assert path.read_bytes() == b"fallback"
    named = AsyncRing(backend=backend)
    if backend == "uring":
        with pytest.raises(EngineUnavailable) as info:
            await named.open()
        assert info.value.errno == errno.EPERM
    else:
        async with named:
            assert await named.nop() == 0


# --------------------------------------------------------------------------
# batches larger than the submission queue
# --------------------------------------------------------------------------


def _engines(slots: int) -> list[Engine]:
    engines: list[Engine] = [ThreadRing(slots, threads=2)]
    if uring_unavailable() is None:
        engines.append(Ring(slots, entries=8))
    return engines


@pytest.mark.parametrize("engine_name", ["uring", "threads"])
def test_batch_larger_than_sq_is_submitted_whole(engine_name: str) -> None:
    if engine_name == "uring" and uring_unavailable() is not None:
        pytest.skip("io_uring unavailable")
    engine: Engine = Ring(4, entries=8) if engine_name == "uring" else ThreadRing(4, threads=2)
    try:
        words = new_words()
        expected = []
        ud = 1
        # Three linked chains of five and ten single operations: 25 > 8 SQ entries.
        for _ in range(3):
            for i in range(5):
                words.extend((b.OP_NOP, LINK if i < 4 else 0, 0, 0, 0, 0, ud, 0, 0, 0))
                expected.append(ud)
                ud += 1
        for _ in range(10):
            words.extend((b.OP_NOP, 0, 0, 0, 0, 0, ud, 0, 0, 0))
            expected.append(ud)
            ud += 1
        assert engine.submit(words) == 25
        seen: list[int] = []
        deadline = time.monotonic() + 10
        while len(seen) < 25 and time.monotonic() < deadline:
            engine.wait(0.05)
            uds, res = engine.reap()
            assert all(r == 0 for r in res)
            seen += uds
        assert sorted(seen) == expected
        assert engine.stats()["sqes_submitted"] == 25
    finally:
        engine.close()


# --------------------------------------------------------------------------
# chain semantics: both engines must agree with each other and with the kernel rules
# --------------------------------------------------------------------------

Op = tuple[int, ...]
ChainBuilder = Callable[[int], list[Op]]
END = -1  # step value recorded when the driver declares a chain over


class ScriptedUnit(Unit):
    """Submits raw chains one after another; records (chain, step, res) per completion."""

    def __init__(self, chains: list[ChainBuilder]) -> None:
        super().__init__()
        self.chains = chains
        self.index = 0
        self.events: list[tuple[int, int, int]] = []
        self.done = False

    def _write(self, slot: int) -> None:
        for op in self.chains[self.index](slot):
            self.op(*op)

    def begin(self, slot: int) -> None:
        self._write(slot)

    def on_cqe(self, step: int, res: int) -> None:
        self.events.append((self.index, step, res))

    def end_chain(self, slot: int) -> None:
        self.events.append((self.index, END, 0))
        self.index += 1
        if self.index < len(self.chains):
            self._write(slot)
        else:
            self.done = True


class Scratch:
    """Paths and buffers for raw words, kept alive for as long as the scenario runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.keep: list[Any] = []
        self.data = os.urandom(4096 + 100)
        (root / "data").write_bytes(self.data)

    def path(self, name: str) -> int:
        cpath = b.c_path(os.fsencode(self.root / name))
        self.keep.append(cpath)
        return b.address_of(cpath)

    def buffer(self, size: int, fill: bytes = b"") -> tuple[int, bytearray]:
        buf = bytearray(fill or bytes(size))
        pinned = b.pin_buffer(buf, writable=True)
        self.keep += [pinned, buf]
        return b.address_of(pinned), buf

    # -- operations (opcode, flags, fd, addr, len, offset, arg1, arg2, arg3) --------
    def open_direct(self, name: str, slot: int, flags: int, oflags: int = os.O_RDONLY) -> Op:
        return (b.OP_OPENAT, flags, b.AT_FDCWD, self.path(name), 0, 0, oflags, 0o644, slot + 1)

    def read(self, slot: int, flags: int, length: int, offset: int) -> Op:
        addr, _ = self.buffer(length)
        return (b.OP_READ, flags | FIX, slot, addr, length, offset)

    def write(self, slot: int, flags: int, payload: bytes) -> Op:
        addr, _ = self.buffer(len(payload), payload)
        return (b.OP_WRITE, flags | FIX, slot, addr, len(payload), 0)

    def close_direct(self, slot: int, flags: int) -> Op:
        return (b.OP_CLOSE, flags, 0, 0, 0, 0, 0, 0, slot + 1)

    def rename(self, old: str, new: str, flags: int) -> Op:
        return (b.OP_RENAMEAT, flags, b.AT_FDCWD, self.path(old), 0, 0, 0,
                b.AT_FDCWD & 0xFFFFFFFFFFFFFFFF, self.path(new))  # fmt: skip

    def mkdir(self, name: str, flags: int) -> Op:
        return (b.OP_MKDIRAT, flags, b.AT_FDCWD, self.path(name), 0, 0, 0, 0o755)

    def statx(self, name: str, flags: int) -> Op:
        buf = b.ffi.new("struct statx *")
        self.keep.append(buf)
        return (b.OP_STATX, flags, b.AT_FDCWD, self.path(name), 0, 0, 0,
                b.STATX_BASIC_STATS, b.address_of(buf))  # fmt: skip

    def rmdir(self, name: str, flags: int) -> Op:
        return (b.OP_UNLINKAT, flags, b.AT_FDCWD, self.path(name), 0, 0, b.AT_REMOVEDIR)

    def fsync_pipe(self, flags: int) -> Op:
        read_end, write_end = os.pipe()
        self.pipe = (read_end, write_end)
        return (b.OP_FSYNC, flags, read_end)

    def close(self) -> None:
        for fd in getattr(self, "pipe", ()):
            os.close(fd)

    @staticmethod
    def nop(flags: int) -> Op:
        return (b.OP_NOP, flags)


ENOENT, ECANCELED, EBADF = -errno.ENOENT, -errno.ECANCELED, -errno.EBADF

# Each scenario: chains (built from a Scratch and the unit's slot), the expected
# events, and a check of the files afterwards.
Scenario = tuple[
    Callable[[Scratch], list[ChainBuilder]],
    list[tuple[int, int, int]],
    Callable[[Path], bool] | None,
]

SCENARIOS: dict[str, Scenario] = {
    # A short read in the middle of a soft-linked chain with SKIP everywhere:
    # only the short read posts; the links it cancels (the close too) post
    # nothing, so the slot stays occupied until a later close.
    "short-middle-read-skip": (
        lambda s: [
            lambda slot: [
                s.open_direct("data", slot, LINK | SKIP),
                s.read(slot, LINK | SKIP, 4096, 0),
                s.read(slot, LINK | SKIP, 4096, 4096),
                s.read(slot, LINK | SKIP, 4096, 0),
                s.close_direct(slot, 0),
            ],
            lambda slot: [s.close_direct(slot, 0)],
        ],
        [(0, 2, 100), (0, END, 0), (1, 0, 0), (1, END, 0)],
        None,
    ),
    # A soft-link failure without SKIP: every cancelled link posts -ECANCELED.
    "soft-link-failure": (
        lambda s: [
            lambda slot: [
                s.open_direct("missing", slot, LINK),
                s.read(slot, LINK, 4096, 0),
                s.close_direct(slot, 0),
            ],
            lambda slot: [s.close_direct(slot, 0)],
        ],
        [(0, 0, ENOENT), (0, 1, ECANCELED), (0, 2, ECANCELED), (0, END, 0),
         (1, 0, EBADF), (1, END, 0)],
        None,
    ),
    # A failing head that carries SKIP silences the whole rest of the chain.
    "skip-failure-at-head": (
        lambda s: [
            lambda slot: [
                s.open_direct("missing", slot, LINK | SKIP),
                s.read(slot, LINK | SKIP, 4096, 0),
                s.close_direct(slot, 0),
            ],
        ],
        [(0, 0, ENOENT), (0, END, 0)],
        None,
    ),
    # A short read on a hard link: it posts, and the chain runs on (the close
    # frees the slot, so a later close finds it empty).
    "hardlink-continues": (
        lambda s: [
            lambda slot: [
                s.open_direct("data", slot, LINK | SKIP),
                s.read(slot, HARD | SKIP, 4096, 4096),
                s.close_direct(slot, HARD | SKIP),
                s.nop(0),
            ],
            lambda slot: [s.close_direct(slot, 0)],
        ],
        [(0, 1, 100), (0, 3, 0), (0, END, 0), (1, 0, EBADF), (1, END, 0)],
        None,
    ),
    # A failed hard link runs on: the operations after it succeed and post.
    "hardlink-after-failure": (
        lambda s: [lambda slot: [s.open_direct("missing", slot, HARD), s.nop(LINK), s.nop(0)]],
        [(0, 0, ENOENT), (0, 1, 0), (0, 2, 0), (0, END, 0)],
        None,
    ),
    # Links cancelled by a soft failure stay cancelled, even past a hard link.
    "cancelled-past-hardlink": (
        lambda s: [lambda slot: [s.open_direct("missing", slot, LINK), s.nop(HARD), s.nop(0)]],
        [(0, 0, ENOENT), (0, 1, ECANCELED), (0, 2, ECANCELED), (0, END, 0)],
        None,
    ),
    # A failure without SKIP makes the links it cancels post even if they carry SKIP.
    "loud-failure-cancels-skipped-links": (
        lambda s: [
            lambda slot: [
                s.open_direct("data", slot, LINK | SKIP),
                s.read(slot, LINK, 4096, 4096),
                s.read(slot, LINK | SKIP, 4096, 0),
                s.close_direct(slot, SKIP),
            ],
            lambda slot: [s.close_direct(slot, 0)],
        ],
        [(0, 1, 100), (0, 2, ECANCELED), (0, 3, ECANCELED), (0, END, 0),
         (1, 0, 0), (1, END, 0)],
        None,
    ),
    # The store's write chain, all successful: only the final rename posts.
    "store-chain-success": (
        lambda s: [
            lambda slot: [
                s.open_direct("tmp", slot, LINK | SKIP, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                s.write(slot, LINK | SKIP, b"x" * 8192),
                s.close_direct(slot, LINK | SKIP),
                s.rename("tmp", "final", 0),
            ],
        ],
        [(0, 3, 0), (0, END, 0)],
        lambda root: (root / "final").read_bytes() == b"x" * 8192
        and not (root / "tmp").exists(),
    ),
    # A failed write must keep the rename from running.
    "failed-write-blocks-rename": (
        lambda s: [
            lambda slot: [
                s.open_direct("data", slot, LINK | SKIP, os.O_RDONLY),
                s.write(slot, LINK | SKIP, b"y" * 4096),
                s.close_direct(slot, LINK | SKIP),
                s.rename("data", "final", 0),
            ],
            lambda slot: [s.close_direct(slot, 0)],
        ],
        [(0, 1, EBADF), (0, END, 0), (1, 0, 0), (1, END, 0)],
        lambda root: (root / "data").exists() and not (root / "final").exists(),
    ),
    # Opening into an occupied slot replaces the file there.
    "open-replaces-slot": (
        lambda s: [
            lambda slot: [s.open_direct("data", slot, 0)],
            lambda slot: [s.open_direct("data", slot, 0)],
            lambda slot: [s.close_direct(slot, 0)],
            lambda slot: [s.close_direct(slot, 0)],
            lambda slot: [s.read(slot, 0, 4096, 0)],
        ],
        [(0, 0, 0), (0, END, 0), (1, 0, 0), (1, END, 0), (2, 0, 0), (2, END, 0),
         (3, 0, EBADF), (3, END, 0), (4, 0, EBADF), (4, END, 0)],
        None,
    ),
    # Path operations in one silent chain.  Since Linux 6.0 a failed statx,
    # mkdirat, unlinkat or renameat does not fail its request: the chain runs
    # on, and with SKIP the error is not even posted (the second mkdirat).
    "path-ops": (
        lambda s: [
            lambda slot: [s.mkdir("d", LINK | SKIP), s.statx("d", LINK | SKIP), s.rmdir("d", 0)],
            lambda slot: [s.statx("d", LINK), s.nop(0)],
            lambda slot: [s.mkdir("d/e/f", LINK | SKIP), s.rename("nope", "d", LINK), s.nop(0)],
        ],
        [(0, 2, 0), (0, END, 0), (1, 0, ENOENT), (1, 1, 0), (1, END, 0),
         (2, 1, ENOENT), (2, 2, 0), (2, END, 0)],
        lambda root: not (root / "d").exists(),
    ),
    # fsync's error is only a result too, unless its file is bad.
    "fsync-errors": (
        lambda s: [
            lambda slot: [s.fsync_pipe(LINK), s.nop(0)],
            lambda slot: [(b.OP_FSYNC, LINK | FIX, slot), s.nop(0)],
            lambda slot: [(b.OP_FSYNC, LINK | SKIP | FIX, slot), s.nop(0)],
        ],
        [(0, 0, -errno.EINVAL), (0, 1, 0), (0, END, 0),
         (1, 0, EBADF), (1, 1, ECANCELED), (1, END, 0),
         (2, 0, EBADF), (2, END, 0)],
        None,
    ),
}  # fmt: skip


def run_scenario(engine: Engine, root: Path, name: str) -> list[tuple[int, int, int]]:
    build, _, check = SCENARIOS[name]
    scratch = Scratch(root)
    unit = ScriptedUnit(build(scratch))
    driver = Driver(engine)
    try:
        driver.start(unit)
        driver.flush()
        deadline = time.monotonic() + 5
        while not unit.done and time.monotonic() < deadline:
            engine.wait(0.05)
            driver.process()
            driver.flush()
        # Nothing may arrive after the driver declared the unit finished.
        time.sleep(0.05)
        driver.process()
    finally:
        if driver.in_flight:
            # Draining would wait forever for the completion that never came.
            engine.close()
        else:
            driver.close()
        scratch.close()
    assert unit.done, f"{engine.name}: stuck after {unit.events}"
    assert driver.stray_cqes == 0, f"{engine.name}: stray completions after {unit.events}"
    if check is not None:
        assert check(root), f"{engine.name}: files not as expected"
    return unit.events


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_chain_semantics_match(tmp_path: Path, name: str) -> None:
    expected = SCENARIOS[name][1]
    (tmp_path / "threads").mkdir()
    threads = run_scenario(ThreadRing(4, threads=2), tmp_path / "threads", name)
    if uring_unavailable() is None:
        (tmp_path / "uring").mkdir()
        uring = run_scenario(Ring(4), tmp_path / "uring", name)
        assert threads == uring, "the engines disagree"
        assert uring == expected
    assert threads == expected
