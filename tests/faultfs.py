"""A FUSE filesystem for the tests that hangs or fails chosen operations on command.

``fault_fs(base)`` mounts a passthrough of ``base/"backing"`` at ``base/"mnt"``
and yields a :class:`FaultFS` that controls it::

    with fault_fs(tmp_path) as fs:
        fs.fail("rename", errno.EIO, match="*.kvb")  # renames onto or from *.kvb: EIO
        fs.fail("write", errno.ENOSPC, times=1)       # the next write: ENOSPC
        fs.hang("create")                             # every create blocks ...
        assert fs.wait_hung("create")                 # ... (one is blocked now) ...
        fs.release()                                  # ... until this; then it runs

        fs.volatile()      # from now on only what is fsynced is durable ...
        fs.power_cut()     # ... and the backing directory keeps only that; a new mount

The filesystem (``python tests/faultfs.py BACKING MOUNTPOINT CONTROL``) is a
child process on mfusepy (ctypes bindings of libfuse 3's high-level API), run
multithreaded, so that a hung request holds one worker thread and the others
go on.  It is controlled over a Unix socket in the abstract namespace named
CONTROL (no path: socket paths are limited to 108 bytes, pytest's are long),
one JSON object a line, served by its own thread: commands work while
requests are blocked.

Operations that rules can name (``OPS``), each matched on its path relative to
the mount root (``fnmatch``; ``""`` is the root itself; a rename, link or
symlink matches on either of its two paths):

    getattr  (also every name lookup: entry and attribute caching are off, so
              a name seen before is checked again with one; when that fails
              the kernel drops the name and looks it up anew, a second getattr)
    access readlink mkdir rmdir unlink rename link symlink chmod chown truncate
    utimens statfs opendir readdir releasedir
    open create read write flush fsync release
    fsyncdir (fsync(2) of a directory descriptor, io_uring's IORING_OP_FSYNC too)
    lock     (flock(2) only; POSIX fcntl locks stay in the kernel, which
              keeps them correctly for one machine)

Semantics kept from the backing filesystem: its errors come back as the same
errno; creates are made with the caller's flags (O_EXCL included); renames
get the caller's flags (RENAME_NOREPLACE, RENAME_EXCHANGE) through
renameat2(2).  An unlink removes the file at once (``hard_remove``: no
``.fuse_hidden*`` files appear); an open descriptor of it still reads and
writes, but fstat(2) on it fails with ESTALE (libfuse's high-level API has no
path for it, and the kernel sends no file handle with that getattr).

Every open is served with FUSE's ``direct_io`` (FOPEN_DIRECT_IO): no page
cache on the mount, so each read(2) and write(2) reaches the daemon as one
request (1 MiB at most: larger transfers are split) and "the next read
fails" means the next read call; what a test changes in the backing
directory shows at once.  The cost: no shared mmap of files on the mount.
O_DIRECT opens succeed (the kernel would take them without direct_io too),
so the store's direct-I/O path runs here; FUSE does not enforce O_DIRECT's
alignment (an unaligned transfer works).  The backing file is opened without
O_DIRECT: the daemon's buffers are not aligned, and tmpfs refuses it.

A hung request can hold a lock in the kernel, as on any filesystem: a
create, mkdir, rename or unlink holds its directory's inode lock, so looking
up a name not yet seen in that directory (or listing it) waits in the kernel,
and so does a second create there (it never reaches the daemon: ``hung``
counts one).  libfuse 3.14 does not ask for parallel directory operations
either, so there a hung lookup (getattr) or readdir blocks the other lookups
in its directory too.  Names looked up before stay usable.

Power cuts.  ``FaultFS.volatile()`` switches the mount to volatile mode: the
daemon keeps a model of what would survive a power failure, and
``FaultFS.power_cut()`` then makes the backing directory just that.  The model
is strict, like a careful reading of POSIX (ext4 without auto_da_alloc, and
none of the journal's luck of committing more than was asked for):

- The tree as it is when volatile mode goes on is durable, whole.
- A file's data (content and size) is durable as of its last fsync(2) or
  fdatasync(2) (FUSE sends both as its fsync, io_uring's too); what was
  written or truncated since is lost.  A file made since volatile mode went
  on and never fsynced comes back empty.  An fsync makes no name durable.
- A directory's entries (names -> files, directories, symlinks; what create,
  mkdir, symlink, link, rename, unlink, rmdir change) are durable as of its
  last fsync(2) on a descriptor of it (fsyncdir); the cut brings back that
  list, each name with its object's durable content.  So a rename not
  followed by an fsync of its directory is undone: the old name comes back
  if it was durable (a temp name never fsynced into its directory does not),
  and the target is what it was (its old file, or absent).  An unlink or
  rmdir not made durable comes back.  A new directory starts empty.
- A directory is only there if its own name is durable in its parent, and so
  on up to the root: a new leaf (mkdir) whose parent was not fsynced after it
  vanishes with all it holds, fsynced files and fsynced leaf included.  A
  store that makes leaves must fsync each new one's parent.
- Each directory of a cross-directory rename is its own: made durable in one
  only, the object shows under both names (a file as two hard links; a
  directory in the first place found) or under neither.
- Hard links and symlinks are kept; modes are those at creation or at the
  last fsync; times are not kept; FIFOs, sockets and devices are dropped.
  sync(2) and syncfs(2) make nothing durable (libfuse's high-level API has
  no operation for them).  The model follows what is done through the mount: do
  not change the backing directory by hand in volatile mode.

``power_cut()`` works with a store open or closed, requests hung or not: it
freezes the model (from then on every request fails with EIO and nothing
more becomes durable; an fsync either made it before or fails), aborts the
connection as teardown does (requests in flight fail with ECONNABORTED,
later ones ENOTCONN, so every descriptor opened before, directories' too, is
dead: a store opened before the cut can only be closed), kills the daemon,
rewrites the backing directory to the model, and mounts a fresh daemon at the
same ``fs.mnt``.  That one starts in volatile mode on the new tree, with no
rules and counters at zero.  ``volatile(False)`` ends the tracking (the tree
stays as it is); fsync and fsyncdir reach the backing files again.  Files are
copied whole at each fsync: the model is for small test trees.

Teardown (``FaultFS.close``, run by ``fault_fs`` on exit) never waits on the
mount: it drops the rules, aborts the FUSE connection through fusectl (every
request in flight fails with ECONNABORTED, later ones ENOTCONN), detaches the mount
(lazy unmount) and kills the daemon.  The daemon also detaches its mount and
exits when its parent dies, so a killed pytest leaves neither behind.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPS = frozenset(
    [
        "getattr",
        "access",
        "readlink",
        "mkdir",
        "rmdir",
        "unlink",
        "rename",
        "link",
        "symlink",
        "chmod",
        "chown",
        "truncate",
        "utimens",
        "statfs",
        "opendir",
        "readdir",
        "releasedir",
        "open",
        "create",
        "read",
        "write",
        "flush",
        "fsync",
        "fsyncdir",
        "release",
        "lock",
    ]
)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MNT_DETACH = 2
UNUSABLE = 77  # the daemon's exit status when FUSE cannot be used here: the tests skip
FUSECTL = Path("/sys/fs/fuse/connections")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(res: int, what: str) -> None:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _detach(mnt: str) -> None:
    """Lazy unmount: the mount goes at once, even with requests stuck on it."""
    if os.geteuid() == 0 and _libc.umount2(os.fsencode(mnt), MNT_DETACH) == 0:
        return
    for cmd in (["fusermount3", "-u", "-z", mnt], ["umount", "-l", mnt]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(cmd, capture_output=True, timeout=5).returncode == 0:
                return


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------


@dataclass
class _Rule:
    op: str
    match: str
    err: int | None  # None: hang
    times: int | None  # fail rules: how many more requests fail (None: all)


class _Faults:
    """The rules and counters, shared by the FUSE threads and the control thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rules: list[_Rule] = []
        self.noreplace_rejected = False
        self.generation = 0  # release() bumps it: hung requests wait for a change
        self.calls: Counter[str] = Counter()
        self.hung: Counter[str] = Counter()
        self.ready = False  # set by FUSE's init: the mount is live
        self.durable: _Durable | None = None

    def command(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        if cmd in ("volatile", "power_cut"):  # (not under cond: the model has its own lock)
            assert self.durable is not None
            if cmd == "volatile":
                self.durable.switch(bool(req["on"]))
                return None
            return self.durable.cut_now()
        return self._command(req)

    def gate(self, op: str, *paths: str | None) -> None:
        """Count the request, then apply the newest rule for it: fail it, hang it, or nothing."""
        names = [p.lstrip("/") for p in paths if p is not None]
        with self.cond:
            self.calls[op] += 1
            if self.durable is not None and self.durable.cut:
                raise OSError(errno.EIO, "faultfs: after the power cut")
            rule = next(
                (
                    r
                    for r in reversed(self.rules)
                    if r.op == op and any(fnmatch.fnmatchcase(n, r.match) for n in names)
                ),
                None,
            )
            if rule is None:
                return
            if rule.err is not None:
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times == 0:
                        self.rules.remove(rule)
                raise OSError(rule.err, os.strerror(rule.err))
            generation = self.generation
            self.hung[op] += 1
            try:
                while self.generation == generation:
                    self.cond.wait()
            finally:
                self.hung[op] -= 1

    def _command(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        with self.cond:
            if cmd in ("hang", "fail"):
                op = req["op"]
                if op not in OPS:
                    raise ValueError(f"unknown op {op!r}; known: {' '.join(sorted(OPS))}")
                times = req.get("times")
                if times is not None and times < 1:
                    raise ValueError(f"times must be at least 1, not {times}")
                err = req["err"] if cmd == "fail" else None
                self.rules.append(_Rule(op, req.get("match", "*"), err, times))
            elif cmd == "reject_noreplace":
                self.noreplace_rejected = bool(req["on"])
            elif cmd in ("release", "clear"):
                self.rules = [r for r in self.rules if cmd == "release" and r.err is not None]
                if cmd == "clear":
                    self.noreplace_rejected = False
                self.generation += 1
                self.cond.notify_all()
            elif cmd == "calls":
                return self.calls[req["op"]]
            elif cmd == "hung":
                op = req.get("op")
                return sum(self.hung.values()) if op is None else self.hung[op]
            elif cmd == "ready":
                return self.ready
            else:
                raise ValueError(f"unknown command {cmd!r}")
        return None


class _Durable:
    """Volatile mode's model: what a power cut would leave (module docstring, "Power cuts").

    Objects (files, directories, symlinks) have ids of their own: backing inode
    numbers are reused once freed, and a durable entry may name an inode long
    gone.  ``ids`` maps the live backing inodes to them; ``objects`` holds each
    id's durable state: ``{"kind": "f", "mode", "data"}``, ``{"kind": "d",
    "mode", "entries": {name: id}}`` or ``{"kind": "l", "target"}``.  A file's
    data is copied at each fsync, a directory's entries listed at each fsyncdir;
    an object made since volatile mode went on starts empty.  ``lock`` is taken
    by every namespace operation of the mount (``tracking``), so a listing sees
    each rename whole.
    """

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.lock = threading.Lock()
        self.on = False
        self.cut = False  # power_cut has run: every request fails, nothing more is durable
        self.next_id = 0
        self.root = -1
        self.ids: dict[int, int] = {}
        self.objects: dict[int, dict[str, Any]] = {}

    @contextlib.contextmanager
    def tracking(self) -> Iterator[bool]:
        """Hold the lock while volatile mode is on; yield whether it is."""
        with self.lock:
            if self.on:
                yield True
                return
        yield False

    def switch(self, on: bool) -> None:
        with self.lock:
            self.ids, self.objects = {}, {}
            self.on = on
            if on:  # the tree as it is now counts as durable
                self.root = self._snapshot(self.backing)

    def _snapshot(self, path: str) -> int:
        st = os.lstat(path)
        known = self.ids.get(st.st_ino)
        if known is not None:  # a second hard link
            return known
        oid = self._new(st)
        obj = self.objects[oid]
        if obj["kind"] == "d":
            for name in sorted(os.listdir(path)):
                child = self._snapshot(os.path.join(path, name))
                if child >= 0:
                    obj["entries"][name] = child
        elif obj["kind"] == "f":
            with open(path, "rb") as f:
                obj["data"] = f.read()
        elif obj["kind"] == "l":
            obj["target"] = os.readlink(path)
        return oid

    def _new(self, st: os.stat_result, target: str = "") -> int:
        """A fresh, empty object for the backing inode ``st`` (-1: a kind not kept)."""
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            obj: dict[str, Any] = {"kind": "f", "mode": mode, "data": b""}
        elif stat.S_ISDIR(st.st_mode):
            obj = {"kind": "d", "mode": mode, "entries": {}}
        elif stat.S_ISLNK(st.st_mode):
            obj = {"kind": "l", "target": target}
        else:  # FIFOs, sockets, devices: not kept
            return -1
        oid = self.next_id
        self.next_id += 1
        self.ids[st.st_ino] = oid
        self.objects[oid] = obj
        return oid

    def _id(self, st: os.stat_result, target: str = "") -> int:
        oid = self.ids.get(st.st_ino)
        # An inode not made through the mount (or a kind not kept): new and empty.
        return self._new(st, target) if oid is None else oid

    def created(self, real: str, before: int | None) -> None:
        """``real`` was just made (tracking() held); ``before``: the inode it had before, if any."""
        st = os.lstat(real)
        if st.st_ino != before:  # (a create that opened an existing file makes nothing)
            self._new(st, os.readlink(real) if stat.S_ISLNK(st.st_mode) else "")

    def _check_cut(self) -> None:
        if self.cut:
            raise OSError(errno.EIO, "faultfs: after the power cut")

    def file_synced(self, fd: int) -> None:
        """fsync(2) of the backing file ``fd``: its data now is durable (tracking() held)."""
        self._check_cut()
        st = os.fstat(fd)
        oid = self._id(st)
        if oid < 0:
            return
        # The descriptor may be write-only: read through a new one.
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            self.objects[oid].update(mode=stat.S_IMODE(st.st_mode), data=f.read())

    def dir_synced(self, fd: int) -> None:
        """fsync(2) of the backing directory ``fd``: its entries now are durable (tracking() held)."""
        self._check_cut()
        oid = self._id(os.fstat(fd))
        dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            entries = {}
            for name in sorted(os.listdir(dfd)):
                st = os.lstat(name, dir_fd=dfd)
                target = os.readlink(name, dir_fd=dfd) if stat.S_ISLNK(st.st_mode) else ""
                child = self._id(st, target)
                if child >= 0:
                    entries[name] = child
        finally:
            os.close(dfd)
        self.objects[oid]["entries"] = entries

    def cut_now(self) -> dict[str, Any]:
        """The power cut: freeze the model and return it, as JSON (data in base64)."""
        with self.lock:
            if not self.on:
                raise ValueError("power_cut needs volatile mode (FaultFS.volatile())")
            self.cut = True
            objects = {}
            for oid, obj in self.objects.items():
                out = dict(obj)
                if "data" in out:
                    out["data"] = base64.b64encode(out["data"]).decode()
                objects[str(oid)] = out
            return {"root": self.root, "objects": objects}


def _serve_control(faults: _Faults, name: str) -> None:
    """Answer commands on the abstract socket ``name``: a thread per connection."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)
    server.listen(8)

    def handle(conn: socket.socket) -> None:
        # The abstract namespace has no file permissions: only our own user may steer us.
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], sys.byteorder) not in (0, os.geteuid()):
            conn.close()
            return
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    reply = {"ok": True, "value": faults.command(json.loads(line))}
                except Exception as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _exit_with_parent(parent: int, mnt: str) -> None:
    """A killed pytest must not leave the daemon (and a dead mount) behind."""
    while os.getppid() == parent:
        time.sleep(0.2)
    _detach(mnt)
    os._exit(1)  # closing /dev/fuse aborts the connection: stuck callers get an error


class _Passthrough:
    """mfusepy operations: the backing directory's, each behind ``_Faults.gate``.

    With ``raw_fi`` the file calls get libfuse's ``fuse_file_info``; its ``fh``
    is the backing file's descriptor.
    """

    use_ns = True  # times in nanoseconds (mfusepy warns otherwise)

    def __init__(self, backing: str, faults: _Faults, durable: _Durable) -> None:
        self.backing = backing
        self.faults = faults
        self.durable = durable
        self.paths: dict[int, str] = {}  # fd -> path at open: for requests that come without one

    def _real(self, path: str) -> str:
        return self.backing + path

    def _gate_fh(self, op: str, path: str | None, fh: int) -> None:
        self.faults.gate(op, path if path is not None else self.paths.get(fh))

    def init_with_config(self, conn: Any, config: Any) -> None:
        # No caching of names or attributes: the backing directory may change
        # under the mount (tests look there), and every lookup meets the rules.
        config.entry_timeout = 0.0
        config.negative_timeout = 0.0
        config.attr_timeout = 0.0
        config.hard_remove = 1  # unlink for real, no .fuse_hidden* files
        # No path for read, write, flush, fsync, release, lock, readdir: libfuse
        # then holds no lock on the name while they run, and a rename or unlink
        # of the file does not wait for them (as on a real filesystem).
        config.nullpath_ok = 1
        config.use_ino = 1  # the backing inode numbers
        with self.faults.cond:
            self.faults.ready = True

    def getattr(self, path: str | None, fi: Any = None) -> dict[str, int]:
        if fi is not None:
            self._gate_fh("getattr", path, fi.fh)
            st = os.fstat(fi.fh)
        else:
            assert path is not None
            self.faults.gate("getattr", path)
            st = os.lstat(self._real(path))
        keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev")
        attrs = {k: getattr(st, k) for k in keys}
        attrs.update(st_blocks=st.st_blocks, st_blksize=st.st_blksize)
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def access(self, path: str, amode: int) -> None:
        self.faults.gate("access", path)
        if not os.access(self._real(path), amode):
            raise OSError(errno.EACCES, "access")

    def readlink(self, path: str) -> str:
        self.faults.gate("readlink", path)
        return os.readlink(self._real(path))

    def mkdir(self, path: str, mode: int) -> None:
        self.faults.gate("mkdir", path)
        with self.durable.tracking() as on:
            os.mkdir(self._real(path), mode)
            if on:
                self.durable.created(self._real(path), None)

    def rmdir(self, path: str) -> None:
        self.faults.gate("rmdir", path)
        with self.durable.tracking():
            os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        self.faults.gate("unlink", path)
        with self.durable.tracking():
            os.unlink(self._real(path))

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self.faults.gate("rename", old, new)
        if flags & RENAME_NOREPLACE and self.faults.noreplace_rejected:
            raise OSError(errno.EINVAL, "RENAME_NOREPLACE rejected (reject_noreplace)")
        at_fdcwd = -100
        with self.durable.tracking():
            res = _libc.renameat2(
                at_fdcwd,
                os.fsencode(self._real(old)),
                at_fdcwd,
                os.fsencode(self._real(new)),
                flags,
            )
            _check(res, "renameat2")
        for fd, path in list(self.paths.items()):  # open files keep matching by name
            if path == old:
                self.paths[fd] = new

    def link(self, target: str, source: str) -> None:  # mfusepy: (new name, existing file)
        self.faults.gate("link", target, source)
        with self.durable.tracking():
            os.link(self._real(source), self._real(target))

    def symlink(self, target: str, source: str) -> None:  # (link's name, what it points to)
        self.faults.gate("symlink", target, source)
        with self.durable.tracking() as on:
            os.symlink(source, self._real(target))
            if on:
                self.durable.created(self._real(target), None)

    def chmod(self, path: str, mode: int) -> None:
        self.faults.gate("chmod", path)
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.faults.gate("chown", path)
        os.lchown(self._real(path), uid, gid)

    def truncate(self, path: str | None, length: int, fi: Any = None) -> None:
        if fi is not None:
            self._gate_fh("truncate", path, fi.fh)
            os.ftruncate(fi.fh, length)
        else:
            assert path is not None
            self.faults.gate("truncate", path)
            os.truncate(self._real(path), length)

    def utimens(self, path: str | None, times: Any, fi: Any) -> None:
        """utimensat(2) with the kernel's two timespecs as they are (UTIME_NOW, UTIME_OMIT)."""
        if fi is not None:
            self._gate_fh("utimens", path, fi.fh)
            _check(_libc.futimens(fi.fh, times), "futimens")
        else:
            assert path is not None
            self.faults.gate("utimens", path)
            at_fdcwd, at_symlink_nofollow = -100, 0x100
            res = _libc.utimensat(
                at_fdcwd, os.fsencode(self._real(path)), times, at_symlink_nofollow
            )
            _check(res, "utimensat")

    def statfs(self, path: str) -> dict[str, int]:
        self.faults.gate("statfs", path)
        sv = os.statvfs(self._real(path))
        keys = [
            "bsize",
            "frsize",
            "blocks",
            "bfree",
            "bavail",
            "files",
            "ffree",
            "favail",
            "namemax",
        ]
        return {f"f_{k}": getattr(sv, f"f_{k}") for k in keys}

    def opendir(self, path: str) -> int:
        self.faults.gate("opendir", path)
        fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.paths[fd] = path
        return fd

    def readdir(self, path: str | None, fh: int) -> list[Any]:
        self._gate_fh("readdir", path, fh)
        entries: list[Any] = [".", ".."]
        with os.scandir(fh) as it:
            for e in it:
                kind = (
                    stat.S_IFLNK
                    if e.is_symlink()
                    else stat.S_IFDIR
                    if e.is_dir(follow_symlinks=False)
                    else stat.S_IFREG
                )
                entries.append((e.name, {"st_mode": kind, "st_ino": e.inode()}, 0))
        return entries

    def releasedir(self, path: str | None, fh: int) -> None:
        try:
            self._gate_fh("releasedir", path, fh)
        finally:
            self.paths.pop(fh, None)
            os.close(fh)

    def _opened(self, fi: Any, path: str, fd: int) -> None:
        fi.fh = fd
        fi.direct_io = 1  # one request per read/write call, no cache (module docstring)
        self.paths[fd] = path

    def open(self, path: str, fi: Any) -> None:
        self.faults.gate("open", path)
        flags = (fi.flags & ~os.O_DIRECT) | os.O_CLOEXEC
        self._opened(fi, path, os.open(self._real(path), flags))

    def create(self, path: str, mode: int, fi: Any) -> None:
        self.faults.gate("create", path)
        flags = (fi.flags & ~os.O_DIRECT) | os.O_CREAT | os.O_CLOEXEC
        real = self._real(path)
        with self.durable.tracking() as on:
            before = None
            if on:
                with contextlib.suppress(OSError):
                    before = os.lstat(real).st_ino
            fd = os.open(real, flags, mode)
            if on:
                self.durable.created(real, before)
        self._opened(fi, path, fd)

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        self._gate_fh("read", path, fi.fh)
        return os.pread(fi.fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        self._gate_fh("write", path, fi.fh)
        return os.pwrite(fi.fh, data, offset)

    def flush(self, path: str | None, fi: Any) -> None:
        self._gate_fh("flush", path, fi.fh)

    def fsync(self, path: str | None, datasync: int, fi: Any) -> None:
        self._gate_fh("fsync", path, fi.fh)
        with self.durable.tracking() as on:
            if on:  # (fdatasync too: the model keeps data and size alike)
                self.durable.file_synced(fi.fh)
                return
        (os.fdatasync if datasync else os.fsync)(fi.fh)

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> None:
        """fsync(2) of a directory descriptor (mfusepy passes the opendir handle, not fi)."""
        self._gate_fh("fsyncdir", path, fh)
        with self.durable.tracking() as on:
            if on:
                self.durable.dir_synced(fh)
                return
        os.fsync(fh)

    def flock(self, path: str | None, fi: Any, op: int) -> None:
        # The backing descriptor is this open file's alone, so flock's
        # per-open-file semantics carry over (a blocking lock holds a thread).
        self._gate_fh("lock", path, fi.fh)
        fcntl.flock(fi.fh, op)

    def release(self, path: str | None, fi: Any) -> None:
        try:
            self._gate_fh("release", path, fi.fh)
        finally:
            self.paths.pop(fi.fh, None)
            os.close(fi.fh)


def _daemon(backing: str, mnt: str, control: str) -> int:
    os.umask(0)  # the kernel sends modes with the caller's umask applied
    # mfusepy takes libfuse 2 when both are installed; libfuse 2 has no rename flags.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except (ImportError, OSError, AttributeError) as exc:
        print(f"faultfs: mfusepy/libfuse3 cannot be loaded: {exc}", file=sys.stderr)
        return UNUSABLE
    if mfusepy.fuse_version_major != 3:
        print(
            f"faultfs: mfusepy loaded libfuse {mfusepy.fuse_version_major}, not 3", file=sys.stderr
        )
        return UNUSABLE

    class FUSE3(mfusepy.FUSE):
        """mfusepy drops the callbacks' arguments that the passthrough needs."""

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(os.fsdecode(old), os.fsdecode(new), flags)

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            name = None if path is None else os.fsdecode(path)
            fi = fip.contents if fip else None
            return self.operations.utimens(name, buf, fi)

        def flock(self, path: bytes | None, fip: Any, op: int) -> int:  # (path None)
            name = None if path is None else os.fsdecode(path)
            return self.operations.flock(name, fip.contents, op)

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            name = None if path is None else os.fsdecode(path)
            return self.operations.truncate(name, length, fip.contents if fip else None)

    faults = _Faults()
    faults.durable = durable = _Durable(os.path.abspath(backing))
    parent = int(os.environ.get("FAULTFS_PARENT", os.getppid()))
    threading.Thread(target=_exit_with_parent, args=(parent, mnt), daemon=True).start()
    threading.Thread(target=_serve_control, args=(faults, control), daemon=True).start()
    ops = _Passthrough(os.path.abspath(backing), faults, durable)
    try:
        FUSE3(
            ops,
            mnt,
            raw_fi=True,
            foreground=True,
            fsname="faultfs",
            # Root mounts for every user; the kernel checks permissions from the modes.
            allow_other=os.geteuid() == 0,
            default_permissions=True,
            # libfuse 3.12+ caps worker threads at 10; hung requests each hold one.
            max_threads=256,
            max_idle_threads=16,  # (libfuse 3.14 warns about its own default otherwise)
        )
    except RuntimeError as exc:
        if not faults.ready:
            print(f"faultfs: mount refused ({exc})", file=sys.stderr)
            return UNUSABLE
        raise
    return 0


# ---------------------------------------------------------------------------
# The test side
# ---------------------------------------------------------------------------


def unusable_reason() -> str | None:
    """Why FUSE cannot be used here, or None (what can be told before mounting)."""
    if not sys.platform.startswith("linux"):
        return f"FUSE tests need Linux, not {sys.platform}"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed (pip install 'kvuring[test]')"
    if ctypes.util.find_library("fuse3") is None:
        return "no libfuse3 (apt-get install fuse3)"
    if os.geteuid() != 0 and not any(
        os.access(os.path.join(d, "fusermount3"), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
    ):
        return "not root and no fusermount3 on PATH"
    return None


def _mount_dev(mnt: Path) -> int | None:
    """The kernel's dev_t of the FUSE mount at ``mnt`` (its fusectl name), from mountinfo.

    Read from /proc, not stat(2): a stat of the mount could hang on it.
    """
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])  # \040: blank
        if point == str(mnt) and right.startswith("fuse"):
            major, minor = map(int, fields[2].split(":"))
            return (major << 20) | minor  # the kernel's internal dev_t
    return None


def _abort(dev: int) -> None:
    """Abort the FUSE connection: all its requests, hung ones too, fail with ENOTCONN."""
    conn = FUSECTL / str(dev)
    if not conn.exists() and os.geteuid() == 0 and FUSECTL.is_dir():
        subprocess.run(
            ["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True, timeout=5
        )
    with contextlib.suppress(OSError):
        (conn / "abort").write_text("1")


class FaultFS:
    """A mounted fault filesystem (see the module docstring); made by :func:`fault_fs`."""

    def __init__(self, base: Path) -> None:
        self.mnt = base / "mnt"
        self.backing = base / "backing"
        self.log = base / "faultfs.log"  # the daemon's stderr
        self._control = f"kvuring-faultfs-{os.getpid()}-{uuid.uuid4().hex}"
        self._sock: socket.socket | None = None
        self._io: Any = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._volatile = False

    # -- commands ----------------------------------------------------------

    def hang(self, op: str, match: str = "*") -> None:
        """Requests of ``op`` whose path matches block until :meth:`release` (or clear)."""
        self._call("hang", op=op, match=match)

    def fail(self, op: str, err: int, match: str = "*", times: int | None = None) -> None:
        """Requests of ``op`` whose path matches fail with ``err`` (the next ``times`` of them)."""
        self._call("fail", op=op, err=err, match=match, times=times)

    def reject_noreplace(self, on: bool = True) -> None:
        """Renames with RENAME_NOREPLACE fail with EINVAL, as on NFS and GlusterFS."""
        self._call("reject_noreplace", on=on)

    def release(self) -> None:
        """Hung requests go on (and run normally); the hang rules go."""
        self._call("release")

    def clear(self) -> None:
        """All rules go (reject_noreplace too); hung requests go on."""
        self._call("clear")

    def volatile(self, on: bool = True) -> None:
        """Track what is durable from now on (the tree as it is counts as durable); see "Power cuts".

        Off: nothing is tracked, fsync and fsyncdir reach the backing files again.
        """
        self._call("volatile", on=on)
        self._volatile = on

    def power_cut(self) -> None:
        """Cut the power: the backing directory becomes what was durable; a fresh mount follows.

        Needs volatile mode.  Every request of the old mount fails (in flight:
        ECONNABORTED, later ENOTCONN: descriptors opened before stay dead);
        rules and counters start anew; the new mount is volatile again, its
        tree (all of it durable) the starting point.
        """
        image = self._call("power_cut")  # (from now on every request fails with EIO)
        self._stop()
        _rebuild(self.backing, image)
        self._control = f"kvuring-faultfs-{os.getpid()}-{uuid.uuid4().hex}"
        self.mount()
        self.volatile(True)

    def calls(self, op: str) -> int:
        """Requests of ``op`` seen so far (failed and hung ones included)."""
        n: int = self._call("calls", op=op)
        return n

    def hung(self, op: str | None = None) -> int:
        """Requests (of ``op``, or of all) blocked right now."""
        n: int = self._call("hung", op=op)
        return n

    def wait_hung(self, op: str, n: int = 1, timeout: float = 10.0) -> bool:
        """Whether at least ``n`` requests of ``op`` are blocked within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.hung(op) < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _call(self, cmd: str, **args: Any) -> Any:
        with self._lock:
            if self._io is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(5)
                try:
                    sock.connect("\0" + self._control)
                except OSError:
                    sock.close()
                    raise
                self._sock, self._io = sock, sock.makefile("rwb")
            self._io.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            self._io.flush()
            line = self._io.readline()
        if not line:
            raise ConnectionError(f"faultfs daemon gone; its log:\n{self._log_tail()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise ValueError(reply["error"])
        return reply["value"]

    # -- mount and teardown ------------------------------------------------

    def _log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def mount(self, timeout: float = 15.0) -> None:
        """Start the daemon, return once the mount is live; skip the test where FUSE is refused."""
        import pytest

        self.mnt.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FAULTFS_PARENT": str(os.getpid())}
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.mnt), self._control],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while True:
            rc = self._proc.poll()
            if rc == UNUSABLE:
                pytest.skip(f"FUSE cannot be used here: {self._log_tail(3)}")
            if rc is not None:
                raise RuntimeError(f"faultfs exited with {rc} before mounting:\n{self._log_tail()}")
            with contextlib.suppress(OSError):  # (the control socket is not there yet)
                if self._call("ready") and _mount_dev(self.mnt) is not None:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"faultfs not mounted after {timeout} s:\n{self._log_tail()}")
            time.sleep(0.02)

    def _drop_control(self) -> None:
        with self._lock:
            if self._io is not None:
                with contextlib.suppress(OSError):
                    self._io.close()
                    assert self._sock is not None
                    self._sock.close()
            self._io = self._sock = None

    def close(self) -> None:
        """Unmount and stop, whatever is stuck: rules off, abort, lazy unmount, kill."""
        if self._io is not None:
            with contextlib.suppress(OSError, ValueError):
                self.clear()
        self._stop()

    def _stop(self) -> None:
        self._drop_control()
        dev = _mount_dev(self.mnt)
        if dev is not None:
            _abort(dev)
            _detach(str(self.mnt))
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)  # hung threads cannot be joined
            self._proc.wait(timeout=10)
            self._proc = None


def _rebuild(backing: Path, image: dict[str, Any]) -> None:
    """Make ``backing`` the durable tree of ``image`` (from ``_Durable.cut_now``)."""
    for name in os.listdir(backing):
        path = backing / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    objects: dict[str, dict[str, Any]] = image["objects"]
    files: dict[int, Path] = {}  # id -> its first name: hard links
    dirs = {image["root"]}
    modes: list[tuple[Path, int]] = []  # directories' modes, set last (children first)

    def fill(path: Path, oid: int) -> None:
        for name, child in objects[str(oid)]["entries"].items():
            obj, where = objects[str(child)], path / name
            if obj["kind"] == "d":
                if child in dirs:  # (a directory durable in two places: the first one)
                    continue
                dirs.add(child)
                where.mkdir(mode=0o700)
                fill(where, child)
                modes.append((where, obj["mode"]))
            elif obj["kind"] == "l":
                os.symlink(obj["target"], where)
            elif child in files:
                os.link(files[child], where)
            else:
                files[child] = where
                where.write_bytes(base64.b64decode(obj["data"]))
                os.chmod(where, obj["mode"])

    fill(backing, image["root"])
    for path, mode in modes:
        os.chmod(path, mode)


@contextlib.contextmanager
def fault_fs(base: Path) -> Iterator[FaultFS]:
    """Mount a fault filesystem at ``base/"mnt"`` over ``base/"backing"``; skip where FUSE is refused."""
    import pytest

    if (reason := unusable_reason()) is not None:
        pytest.skip(f"FUSE cannot be used here: {reason}")
    fs = FaultFS(base)
    try:
        fs.mount()
        yield fs
    finally:
        fs.close()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} BACKING MOUNTPOINT CONTROL")
    sys.exit(_daemon(*sys.argv[1:]))
