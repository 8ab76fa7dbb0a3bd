"""The fault filesystem itself (tests/faultfs.py): passthrough, every command, teardown.

Calls that may block run on a daemon thread (``Call``) and are waited on with a
timeout, so that a broken rule fails a test instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultfs import OPS, RENAME_EXCHANGE, RENAME_NOREPLACE, FaultFS, fault_fs, unusable_reason

pytestmark = pytest.mark.timeout(60)

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FaultFS]:
    with fault_fs(tmp_path) as mounted:
        yield mounted


class Call:
    """``fn()`` on a daemon thread: a call that hangs never hangs the test."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def done(self, timeout: float = 0.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def get(self, timeout: float = 10.0) -> Any:
        assert self.done(timeout), f"still blocked after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


def call(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    return Call(fn).get(timeout)


def renameat2(old: Path, new: Path, flags: int) -> None:
    res = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def statx_size(path: Path) -> int:
    """stx_size from statx(2) (Python 3.11 has no os.statx)."""
    buf = ctypes.create_string_buffer(256)
    statx_size_mask = 0x200
    if _libc.statx(AT_FDCWD, os.fsencode(path), 0, statx_size_mask, buf) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int.from_bytes(buf.raw[40:48], sys.byteorder)  # struct statx: stx_size at 40


def mounted(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines()
    )


def put(path: Path, data: bytes = b"payload") -> None:
    path.write_bytes(data)


# ---------------------------------------------------------------------------
# Passthrough
# ---------------------------------------------------------------------------


def test_passthrough_round_trip(fs: FaultFS) -> None:
    m, b = fs.mnt, fs.backing

    def work() -> None:
        fd = os.open(m / "a.tmp", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o640)
        assert os.pwrite(fd, b"hello world", 0) == 11
        os.close(fd)
        assert (b / "a.tmp").read_bytes() == b"hello world"
        assert os.stat(b / "a.tmp").st_mode & 0o777 == 0o640  # the mode as asked, no umask
        with pytest.raises(FileExistsError):
            os.open(m / "a.tmp", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        fd = os.open(m / "a.tmp", os.O_RDONLY)
        assert os.pread(fd, 5, 6) == b"world"
        os.close(fd)

        os.mkdir(m / "d")
        renameat2(m / "a.tmp", m / "d" / "a", RENAME_NOREPLACE)
        put(b / "d" / "other")
        with pytest.raises(FileExistsError):
            renameat2(m / "d" / "other", m / "d" / "a", RENAME_NOREPLACE)
        renameat2(m / "d" / "other", m / "d" / "a", RENAME_EXCHANGE)
        assert (b / "d" / "a").read_bytes() == b"payload"
        assert (b / "d" / "other").read_bytes() == b"hello world"
        os.rename(m / "d" / "other", m / "d" / "a")  # plain rename replaces
        assert (b / "d" / "a").read_bytes() == b"hello world"

        with os.scandir(m / "d") as it:
            assert [(e.name, e.is_file()) for e in it] == [("a", True)]
        with os.scandir(m) as it:
            assert [(e.name, e.is_dir()) for e in it] == [("d", True)]
        st, real = os.stat(m / "d" / "a"), os.stat(b / "d" / "a")
        assert (st.st_size, st.st_ino, st.st_mtime_ns) == (11, real.st_ino, real.st_mtime_ns)
        assert statx_size(m / "d" / "a") == 11
        assert os.statvfs(m).f_blocks == os.statvfs(b).f_blocks

        # Attributes, links.
        os.utime(m / "d" / "a", ns=(1_000_000_007, 2_000_000_009))
        assert os.stat(b / "d" / "a").st_mtime_ns == 2_000_000_009
        os.utime(m / "d" / "a")  # (UTIME_NOW)
        assert os.stat(b / "d" / "a").st_mtime_ns > 2_000_000_009
        os.chmod(m / "d" / "a", 0o600)
        assert os.stat(b / "d" / "a").st_mode & 0o777 == 0o600
        os.truncate(m / "d" / "a", 5)
        with open(m / "d" / "a", "r+b") as f:
            f.truncate(4)
        assert (b / "d" / "a").read_bytes() == b"hell"
        os.symlink("a", m / "d" / "ln")
        assert os.readlink(m / "d" / "ln") == "a" == os.readlink(b / "d" / "ln")
        with pytest.raises(OSError) as info:
            os.open(m / "d" / "ln", os.O_RDONLY | os.O_NOFOLLOW)
        assert info.value.errno == errno.ELOOP
        os.link(m / "d" / "a", m / "d" / "hard")
        assert os.stat(m / "d" / "a").st_nlink == 2
        for name in ("ln", "hard"):
            os.unlink(m / "d" / name)

        # Changes made in the backing directory show at once (no caching).
        put(b / "d" / "a", b"changed")
        assert (m / "d" / "a").read_bytes() == b"changed"

        # An unlinked file stays usable through its descriptor, and leaves no trace.
        fd = os.open(m / "d" / "a", os.O_RDWR)
        os.unlink(m / "d" / "a")
        assert os.pwrite(fd, b"still", 0) == 5
        assert os.pread(fd, 7, 0) == b"stilled"
        os.close(fd)
        assert os.listdir(m / "d") == [] == os.listdir(b / "d")
        os.rmdir(m / "d")
        assert os.listdir(b) == []

    call(work)
    assert fs.calls("create") == 1
    assert fs.calls("rename") == 3  # (the VFS refuses NOREPLACE onto a known name itself)
    assert fs.calls("unlink") == 3


def test_backing_errors_come_back_unchanged(fs: FaultFS) -> None:
    m = fs.mnt
    os.mkdir(fs.backing / "d")
    put(fs.backing / "d" / "f")

    def work() -> None:
        for fn, err in [
            (lambda: os.open(m / "missing", os.O_RDONLY), errno.ENOENT),
            (lambda: os.rmdir(m / "d"), errno.ENOTEMPTY),
            (lambda: os.unlink(m / "d"), errno.EISDIR),
            (lambda: os.mkdir(m / "d"), errno.EEXIST),
            (lambda: os.open(m / "d" / "f" / "x", os.O_CREAT | os.O_WRONLY), errno.ENOTDIR),
            (lambda: os.rename(m / "d" / "f", m / "d" / "f" / "x"), errno.ENOTDIR),
            (lambda: os.open(m / "d", os.O_WRONLY), errno.EISDIR),
        ]:
            with pytest.raises(OSError) as info:
                fn()
            assert info.value.errno == err, (fn, info.value)

    call(work)


def test_o_direct_reaches_the_daemon_once_per_call(fs: FaultFS) -> None:
    block = 64 * 1024
    buf = mmap.mmap(-1, block)
    buf[:] = os.urandom(block)

    def work() -> None:
        fd = os.open(fs.mnt / "d", os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_DIRECT, 0o600)
        writes = fs.calls("write")
        assert os.pwritev(fd, [buf], 0) == block
        assert fs.calls("write") == writes + 1
        back = mmap.mmap(-1, block)
        reads = fs.calls("read")
        assert os.preadv(fd, [back], 0) == block
        assert fs.calls("read") == reads + 1
        assert back[:] == buf[:]
        os.close(fd)

    call(work)
    assert (fs.backing / "d").read_bytes() == buf[:]


def test_flock(fs: FaultFS) -> None:
    put(fs.backing / "lock")

    def work() -> None:
        a = os.open(fs.mnt / "lock", os.O_RDWR)
        b = os.open(fs.mnt / "lock", os.O_RDWR)
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(b)  # closing drops the lock ...
        # ... once FUSE's release of b reaches the daemon, which the kernel
        # sends in the background after close returns
        for _ in range(200):
            try:
                fcntl.flock(a, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.01)
        else:
            fcntl.flock(a, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.close(a)

    call(work)
    assert fs.calls("lock") >= 4


# ---------------------------------------------------------------------------
# fail
# ---------------------------------------------------------------------------


def actions(fs: FaultFS) -> dict[str, Callable[[int], Any]]:
    """op -> an action that makes one request of op, on a fresh name for attempt i.

    Each op's rule matches "t*", so the setup around the action is left alone.
    """
    m, b = fs.mnt, fs.backing
    for i in range(3):
        for name in (f"t{i}", f"src{i}"):
            put(b / name)
    put(b / "tfd")
    os.mkdir(b / "other")
    put(b / "other" / "f", b"x")
    assert (m / "other" / "f").read_bytes() == b"x"  # looked up now: usable while t* hang
    fd = os.open(m / "tfd", os.O_RDWR)  # (names the actions use are not looked up before)

    def open_close(i: int) -> None:
        os.close(os.open(m / f"t{i}", os.O_RDONLY))  # open, flush (close), release

    return {
        "open": open_close,
        "create": lambda i: os.close(os.open(m / f"tnew{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
        "read": lambda i: os.pread(fd, 4, 0),
        "write": lambda i: os.pwrite(fd, b"data", 0),
        "fsync": lambda i: os.fsync(fd),
        "flush": open_close,
        "rename": lambda i: os.rename(m / f"src{i}", m / f"tdst{i}"),
        "unlink": lambda i: os.unlink(m / f"t{i}"),
        "mkdir": lambda i: os.mkdir(m / f"tdir{i}"),
        "getattr": lambda i: os.stat(m / f"t{i}"),
        "lock": lambda i: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
    }


FAILS = [
    ("open", errno.EACCES),
    ("create", errno.ENOSPC),
    ("read", errno.EIO),
    ("write", errno.EDQUOT),
    ("flush", errno.EIO),
    ("fsync", errno.EIO),
    ("rename", errno.EXDEV),
    ("unlink", errno.EROFS),
    ("mkdir", errno.ENOSPC),
    ("getattr", errno.EIO),
    ("lock", errno.ENOLCK),
]


@pytest.mark.parametrize("times", [None, 1])
@pytest.mark.parametrize(("op", "err"), FAILS, ids=[op for op, _ in FAILS])
def test_fail(fs: FaultFS, op: str, err: int, times: int | None) -> None:
    act = actions(fs)[op]
    fs.fail(op, err, match="t*", times=times)
    before = fs.calls(op)
    with pytest.raises(OSError) as info:
        call(lambda: act(0))
    assert info.value.errno == err
    assert fs.calls(op) > before
    if times is None:
        with pytest.raises(OSError) as info:
            call(lambda: act(1))
        assert info.value.errno == err
        fs.clear()
    call(lambda: act(2))  # passes: the one failure is spent, or the rules are cleared


def test_fail_matches_paths_only(fs: FaultFS) -> None:
    put(fs.backing / "keep.bin")
    os.mkdir(fs.backing / "sub")
    fs.fail("open", errno.EIO, match="sub/*.kvb")
    fs.fail("rename", errno.EPERM, match="sub/final")  # the target matches too

    def work() -> None:
        os.close(os.open(fs.mnt / "keep.bin", os.O_RDONLY))
        put(fs.backing / "sub" / "x.kvb")
        with pytest.raises(OSError) as info:
            os.open(fs.mnt / "sub" / "x.kvb", os.O_RDONLY)
        assert info.value.errno == errno.EIO
        with pytest.raises(PermissionError):
            os.rename(fs.mnt / "keep.bin", fs.mnt / "sub" / "final")
        os.rename(fs.mnt / "keep.bin", fs.mnt / "sub" / "other")

    call(work)


def test_bad_commands_raise(fs: FaultFS) -> None:
    with pytest.raises(ValueError, match="unknown op"):
        fs.hang("chdir")
    with pytest.raises(ValueError, match="times"):
        fs.fail("open", errno.EIO, times=0)
    assert {"open", "create", "read", "write", "flush", "rename", "unlink", "lock"} <= OPS


# ---------------------------------------------------------------------------
# hang, release
# ---------------------------------------------------------------------------

HANGS = [op for op, _ in FAILS]


@pytest.mark.parametrize("op", HANGS)
def test_hang_until_release(fs: FaultFS, op: str) -> None:
    act = actions(fs)[op]
    fs.hang(op, match="t*")
    pending = Call(lambda: act(0))
    assert fs.wait_hung(op), fs.hung()
    assert fs.hung(op) == 1 and fs.hung() == 1
    assert not pending.done(0.2)
    # The rest of the filesystem goes on meanwhile (in another directory: a hung
    # request may hold its directory's lock in the kernel; see faultfs).
    assert call(lambda: (os.listdir(fs.mnt / "other"), (fs.mnt / "other" / "f").read_bytes()))
    fs.release()
    pending.get()  # finishes normally
    assert fs.hung() == 0
    call(lambda: act(1))  # the hang rule is gone


def test_hang_results_after_release(fs: FaultFS) -> None:
    put(fs.backing / "tfile", b"0123456789")
    fs.hang("read", match="tfile")
    fs.hang("rename", match="tfile")
    fd = os.open(fs.mnt / "tfile", os.O_RDONLY)
    reading = Call(lambda: os.pread(fd, 4, 3))
    renaming = Call(lambda: os.rename(fs.mnt / "tfile", fs.mnt / "done"))
    assert fs.wait_hung("read") and fs.wait_hung("rename")
    assert fs.hung() == 2
    assert (fs.backing / "tfile").exists()
    fs.release()
    assert reading.get() == b"3456"
    renaming.get()
    assert (fs.backing / "done").read_bytes() == b"0123456789"
    os.close(fd)


def test_many_hung_requests_leave_the_rest_served(fs: FaultFS) -> None:
    # More than libfuse's default of 10 worker threads.  (Opens: creates in one
    # directory would queue on its lock in the kernel, one reaching the daemon.)
    n = 24
    for i in range(n):
        put(fs.backing / f"hung-{i}", str(i).encode())
    fs.hang("open", match="hung-*")
    pending = [Call(lambda i=i: (fs.mnt / f"hung-{i}").read_bytes()) for i in range(n)]
    assert fs.wait_hung("open", n), fs.hung("open")
    call(lambda: put(fs.mnt / "free", b"x"))
    assert (fs.backing / "free").read_bytes() == b"x"
    fs.clear()
    assert [p.get() for p in pending] == [str(i).encode() for i in range(n)]


def test_clear_releases_and_removes_fail_rules(fs: FaultFS) -> None:
    put(fs.backing / "f")
    fs.fail("open", errno.EIO)
    fs.hang("unlink")
    pending = Call(lambda: os.unlink(fs.mnt / "f"))
    assert fs.wait_hung("unlink")
    fs.release()  # the hang goes, the fail rule stays
    pending.get()
    put(fs.backing / "g")
    with pytest.raises(OSError):
        call(lambda: os.open(fs.mnt / "g", os.O_RDONLY))
    fs.clear()
    os.close(call(lambda: os.open(fs.mnt / "new", os.O_CREAT | os.O_WRONLY)))


# ---------------------------------------------------------------------------
# reject_noreplace
# ---------------------------------------------------------------------------


def test_reject_noreplace(fs: FaultFS) -> None:
    m, b = fs.mnt, fs.backing
    for name in ("a", "b"):
        put(b / name)
    fs.reject_noreplace()

    def refused() -> None:
        with pytest.raises(OSError) as info:
            renameat2(m / "a", m / "new", RENAME_NOREPLACE)
        assert info.value.errno == errno.EINVAL
        assert (b / "a").exists() and not (b / "new").exists()
        renameat2(m / "a", m / "b", 0)  # a plain rename works (and replaces)
        assert not (b / "a").exists()

    call(refused)
    fs.reject_noreplace(False)

    def accepted() -> None:
        put(b / "a")
        with pytest.raises(FileExistsError):
            renameat2(m / "a", m / "b", RENAME_NOREPLACE)
        renameat2(m / "a", m / "new", RENAME_NOREPLACE)

    call(accepted)
    fs.reject_noreplace()
    fs.clear()  # clear turns it off too
    call(lambda: renameat2(m / "new", m / "new2", RENAME_NOREPLACE))


# ---------------------------------------------------------------------------
# Teardown
# ---------------------------------------------------------------------------


def test_teardown_with_requests_stuck(tmp_path: Path) -> None:
    with fault_fs(tmp_path) as fs:
        mnt, pid = fs.mnt, fs._proc.pid if fs._proc else 0
        put(fs.backing / "f", b"data")
        # One request stuck for good: a flock that waits on a lock the backing
        # file holds (no rule lets it go) ...
        holder = os.open(fs.backing / "f", os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_EX)
        fd = os.open(mnt / "f", os.O_RDONLY)
        locking = Call(lambda: fcntl.flock(fd, fcntl.LOCK_EX))
        # ... and one hung by a rule.
        fs.hang("read")
        reading = Call(lambda: os.pread(fd, 4, 0))
        assert fs.wait_hung("read")
        time.sleep(0.2)
        assert not locking.done() and not reading.done()
        start = time.monotonic()
    took = time.monotonic() - start
    assert took < 15, took
    assert not mounted(mnt)
    assert not os.path.exists(f"/proc/{pid}")
    for stuck in (locking, reading):
        assert stuck.done(5)  # they end, one way or the other
    with pytest.raises(OSError) as info:
        locking.get()
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    os.close(holder)
    with contextlib.suppress(OSError):  # (the connection is gone: the flush may fail)
        os.close(fd)


def test_daemon_leaves_with_its_parent(tmp_path: Path) -> None:
    """A killed pytest leaves no daemon and no mount behind."""
    if (reason := unusable_reason()) is not None:
        pytest.skip(f"FUSE cannot be used here: {reason}")
    here = Path(__file__).parent
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(here)!r})
        from faultfs import FaultFS
        fs = FaultFS(Path({str(tmp_path)!r}))
        fs.mount()
        fs.hang("open")
        print(fs._proc.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, (tmp_path / "faultfs.log").read_text()
        daemon = int(line)
        put(tmp_path / "backing" / "x")
        stuck = Call(lambda: os.open(tmp_path / "mnt" / "x", os.O_RDONLY))
        time.sleep(0.3)
        assert mounted(tmp_path / "mnt") and not stuck.done()
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        mounted(tmp_path / "mnt") or os.path.exists(f"/proc/{daemon}")
    ):
        time.sleep(0.05)
    assert not mounted(tmp_path / "mnt")
    assert (
        not os.path.exists(f"/proc/{daemon}")
        or "Z" in Path(f"/proc/{daemon}/stat").read_text().split()[2]
    )
    with pytest.raises(OSError):
        stuck.get(5)
