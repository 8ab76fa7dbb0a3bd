"""faultfs's power cuts (tests/faultfs.py, "Power cuts"): volatile mode and power_cut.

Every call on the mount runs on a daemon thread with a timeout (``call``), so
that a broken mount fails a test instead of hanging the run.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultfs import FaultFS, fault_fs

pytestmark = pytest.mark.timeout(60)

NEW = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FaultFS]:
    with fault_fs(tmp_path) as mounted:
        mounted.volatile()
        yield mounted


def call(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """``fn()`` on a daemon thread; its result, or its exception raised here."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout} s"
    if "error" in out:
        raise out["error"]
    return out.get("result")


def write(path: Path, data: bytes, *, sync: bool = False, flags: int = NEW) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every name under ``root``: a file's content, None for a directory."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


def cut(fs: FaultFS) -> dict[str, bytes | None]:
    """power_cut, then the tree as the new mount shows it (and the backing directory alike)."""
    fs.power_cut()
    seen = call(lambda: tree(fs.mnt))
    assert seen == tree(fs.backing)
    return seen


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def test_unsynced_data_is_lost(fs: FaultFS) -> None:
    m = fs.mnt

    def work() -> None:
        write(m / "listed", b"never synced")  # its name is made durable below, its data not
        sync_dir(m)
        write(m / "unlisted", b"never synced")  # neither

    call(work)
    assert cut(fs) == {"listed": b""}


def test_writes_after_the_last_fsync_are_lost(fs: FaultFS) -> None:
    m = fs.mnt

    def work() -> None:
        fd = os.open(m / "f", NEW, 0o640)
        os.write(fd, b"first")
        os.fsync(fd)
        os.pwrite(fd, b"FIRST and more", 0)
        os.close(fd)
        sync_dir(m)
        write(m / "g", b"0123456789", sync=True)
        os.truncate(m / "g", 3)  # a truncate is data too
        sync_dir(m)

    call(work)
    assert cut(fs) == {"f": b"first", "g": b"0123456789"}
    assert os.stat(fs.backing / "f").st_mode & 0o777 == 0o640


def test_rename_without_dir_fsync_is_undone(fs: FaultFS) -> None:
    m = fs.mnt
    call(lambda: os.mkdir(m / "leaf"))
    call(lambda: sync_dir(m))

    def work() -> None:
        write(m / "leaf" / "blk.tmp", b"block", sync=True)
        sync_dir(m / "leaf")  # the temp name is durable ...
        os.rename(m / "leaf" / "blk.tmp", m / "leaf" / "blk")  # ... its rename not

    call(work)
    assert cut(fs) == {"leaf": None, "leaf/blk.tmp": b"block"}


def test_rename_without_dir_fsync_never_synced_temp_name(fs: FaultFS) -> None:
    """The temp name itself was never durable: neither name survives."""
    m = fs.mnt

    def work() -> None:
        write(m / "blk.tmp", b"block", sync=True)
        os.rename(m / "blk.tmp", m / "blk")

    call(work)
    assert cut(fs) == {}


def test_fsync_rename_fsync_dir_survives(fs: FaultFS) -> None:
    m = fs.mnt
    call(lambda: os.mkdir(m / "leaf"))
    call(lambda: sync_dir(m))
    fsyncs, fsyncdirs = fs.calls("fsync"), fs.calls("fsyncdir")

    def work() -> None:
        write(m / "leaf" / "blk.tmp", b"block", sync=True)
        os.rename(m / "leaf" / "blk.tmp", m / "leaf" / "blk")
        sync_dir(m / "leaf")

    call(work)
    assert (fs.calls("fsync"), fs.calls("fsyncdir")) == (fsyncs + 1, fsyncdirs + 1)
    assert cut(fs) == {"leaf": None, "leaf/blk": b"block"}
    assert fs.calls("fsync") == fs.calls("fsyncdir") == 0  # a fresh daemon


def test_rename_over_a_file_reverts_the_target(fs: FaultFS) -> None:
    m = fs.mnt

    def work() -> None:
        write(m / "blk", b"old", sync=True)
        sync_dir(m)
        write(m / "blk.tmp", b"new", sync=True)
        os.rename(m / "blk.tmp", m / "blk")

    call(work)
    assert cut(fs) == {"blk": b"old"}


def test_unlink_without_dir_fsync_comes_back(fs: FaultFS) -> None:
    m = fs.mnt

    def work() -> None:
        write(m / "made", b"made and synced", sync=True)
        sync_dir(m)
        os.unlink(m / "made")
        os.unlink(m / "before")  # from before volatile mode: durable as it was
        os.rmdir(m / "empty")

    (fs.backing / "before").write_bytes(b"there before")
    (fs.backing / "empty").mkdir()
    fs.volatile()  # (again: the tree as it is now is the durable one)
    call(work)
    assert cut(fs) == {"made": b"made and synced", "before": b"there before", "empty": None}

    call(lambda: os.unlink(m / "made"))
    call(lambda: sync_dir(m))
    assert cut(fs) == {"before": b"there before", "empty": None}


def test_new_directory_without_parent_fsync_is_gone_with_its_contents(fs: FaultFS) -> None:
    m = fs.mnt

    def work() -> None:
        os.mkdir(m / "upper")
        os.mkdir(m / "upper" / "leaf")
        write(m / "upper" / "leaf" / "blk", b"block", sync=True)
        sync_dir(m / "upper" / "leaf")  # the file and its leaf are durable ...
        sync_dir(m / "upper")  # ... and the leaf in upper, but upper is not in the root

    call(work)
    assert cut(fs) == {}

    def again() -> None:
        work()
        sync_dir(m)

    call(again)
    assert cut(fs) == {"upper": None, "upper/leaf": None, "upper/leaf/blk": b"block"}

    def another_leaf() -> None:  # durable all the way up but for the parent's entry
        os.mkdir(m / "upper" / "leaf2")
        write(m / "upper" / "leaf2" / "blk", b"block 2", sync=True)
        sync_dir(m / "upper" / "leaf2")

    call(another_leaf)
    assert cut(fs) == {"upper": None, "upper/leaf": None, "upper/leaf/blk": b"block"}


def test_a_renamed_directory_reverts_with_its_entries(fs: FaultFS) -> None:
    m = fs.mnt

    def work() -> None:
        os.mkdir(m / "d")
        write(m / "d" / "f", b"x", sync=True)
        sync_dir(m / "d")
        sync_dir(m)
        os.rename(m / "d", m / "e")
        write(m / "e" / "g", b"y", sync=True)
        sync_dir(m / "e")  # d's entries (now e's) gain g; the rename itself is not durable

    call(work)
    assert cut(fs) == {"d": None, "d/f": b"x", "d/g": b"y"}


def test_links_symlinks_and_modes(fs: FaultFS) -> None:
    m = fs.mnt

    def work() -> None:
        write(m / "a", b"shared", sync=True)
        os.link(m / "a", m / "b")
        os.symlink("a", m / "ln")
        os.mkdir(m / "ro", 0o555)
        sync_dir(m)

    call(work)
    assert cut(fs) == {"a": b"shared", "b": b"shared", "ln": b"shared", "ro": None}
    b = fs.backing
    assert os.stat(b / "a").st_ino == os.stat(b / "b").st_ino
    assert os.readlink(b / "ln") == "a"
    assert os.stat(b / "ro").st_mode & 0o777 == 0o555


def test_fdatasync_and_o_direct_count_as_fsync(fs: FaultFS) -> None:
    block = 4096
    buf = mmap.mmap(-1, block)
    buf[:] = b"d" * block

    def work() -> None:
        fd = os.open(fs.mnt / "direct", NEW | os.O_DIRECT, 0o600)
        os.pwritev(fd, [buf], 0)
        before = fs.calls("fsync")
        os.fdatasync(fd)
        assert fs.calls("fsync") == before + 1
        os.pwritev(fd, [buf], block)  # lost
        os.close(fd)
        sync_dir(fs.mnt)

    call(work)
    assert cut(fs) == {"direct": b"d" * block}


def test_an_inode_number_reused_is_a_new_file(fs: FaultFS) -> None:
    """Backing inode numbers come back once freed; the model tells the files apart."""
    m = fs.mnt

    def work() -> None:
        write(m / "old", b"old data", sync=True)
        sync_dir(m)
        os.unlink(m / "old")
        for i in range(20):  # (ext4 gives the freed number to one of them, tmpfs not)
            write(m / f"new{i}", b"new data %d" % i, sync=True)

    call(work)
    assert cut(fs) == {"old": b"old data"}


# ---------------------------------------------------------------------------
# The mount around the cut
# ---------------------------------------------------------------------------


def test_open_descriptors_die_and_the_new_mount_works(fs: FaultFS) -> None:
    m = fs.mnt
    call(lambda: write(m / "h", b"kept", sync=True))
    call(lambda: sync_dir(m))
    fd = call(lambda: os.open(m / "f", os.O_CREAT | os.O_RDWR, 0o644))
    dirfd = call(lambda: os.open(m, os.O_RDONLY | os.O_DIRECTORY))
    call(lambda: os.write(fd, b"lost"))
    fs.fail("open", errno.EIO)
    fs.power_cut()
    for what in (lambda: os.pwrite(fd, b"x", 0), lambda: os.fsync(dirfd)):
        with pytest.raises(OSError) as info:
            call(what)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    for dead in (fd, dirfd):
        try:
            os.close(dead)
        except OSError as exc:  # (the flush may fail: the connection is gone)
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert call(lambda: (m / "h").read_bytes()) == b"kept"  # the rules went with the daemon
    assert fs.calls("open") == 1
    call(lambda: write(m / "g", b"kept too", sync=True))
    call(lambda: sync_dir(m))
    call(lambda: write(m / "lost", b"lost"))
    assert cut(fs) == {"h": b"kept", "g": b"kept too"}  # volatile again after a cut


def test_power_cut_with_requests_hung(fs: FaultFS) -> None:
    m = fs.mnt
    fd = call(lambda: os.open(m / "f", os.O_CREAT | os.O_RDWR, 0o644))
    fs.hang("fsync")
    errors: list[BaseException] = []

    def syncing() -> None:
        try:
            os.write(fd, b"data")
            os.fsync(fd)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=syncing, daemon=True)
    thread.start()
    assert fs.wait_hung("fsync")
    assert cut(fs) == {}
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1 and errors[0].errno in (errno.ECONNABORTED, errno.ENOTCONN, errno.EIO)
    try:
        os.close(fd)
    except OSError as exc:
        assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def test_fsyncdir_fails_and_hangs_on_command(fs: FaultFS) -> None:
    m = fs.mnt
    call(lambda: write(m / "f", b"x", sync=True))
    fs.fail("fsyncdir", errno.EIO, times=1)
    with pytest.raises(OSError) as info:
        call(lambda: sync_dir(m))
    assert info.value.errno == errno.EIO
    assert fs.calls("fsyncdir") == 1
    fs.hang("fsyncdir")
    errors: list[BaseException] = []

    def syncing() -> None:
        try:
            sync_dir(m)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=syncing, daemon=True)
    thread.start()
    assert fs.wait_hung("fsyncdir")
    assert thread.is_alive()
    fs.release()
    thread.join(10)
    assert not thread.is_alive() and not errors
    assert cut(fs) == {"f": b"x"}


def test_volatile_off(tmp_path: Path) -> None:
    with fault_fs(tmp_path) as fs:
        with pytest.raises(ValueError, match="volatile"):
            fs.power_cut()
        fs.volatile()
        call(lambda: write(fs.mnt / "f", b"x"))
        fs.volatile(False)  # the tree as it is stays; fsyncs reach the backing files
        call(lambda: write(fs.mnt / "g", b"y", sync=True))
        call(lambda: sync_dir(fs.mnt))
        assert fs.calls("fsync") == fs.calls("fsyncdir") == 1
        with pytest.raises(ValueError, match="volatile"):
            fs.power_cut()
        assert tree(fs.backing) == {"f": b"x", "g": b"y"}
