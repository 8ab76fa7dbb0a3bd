"""Who is writing to a namespace, and what a dead writer left behind.

A temp file sits beside its block's final name (``<leaf>/<hex><suffix>.<token>.<seq>.tmp``)
so the publishing rename stays within one directory.  To find a dead
writer's leftovers without walking the whole store, each open store
registers in ``<namespace>/.tmp/<token>.lock``: it holds an flock on that
file for its whole life and appends every leaf directory to it *before* the
first temp file goes there.  The next open takes each lock it can (its owner
is gone), removes the temp files named in it and then the lock file; a live
writer's lock cannot be taken, so its files are left alone.

Everything here works relative to directory descriptors opened with
O_NOFOLLOW (leaves with openat2, no symlink anywhere on the path), so a
symlink planted at ``.tmp`` or in a leaf never sends a create, scan or
unlink outside the namespace.  Every step is an operation of the
namespace's admin engine (:mod:`kvuring._nsops`): these are programs, run
by the front end's driver, never plain syscalls on its thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import time

from kvuring import _binding as b
from kvuring import _nsops as ops
from kvuring._nsops import Op, Program, os_error

log = logging.getLogger("kvuring")

REGISTRY_DIR = ".tmp"
# A lock file still under its staging name is left alone this long: its
# writer may be between creating and locking it.  The same grace applies to
# a writer's scratch files (direct-I/O probe, manifest draft) that no lock
# file accounts for.
STAGING_GRACE_S = 60.0
# kvuring's leaves, and those of vLLM's layout (layout="vllm": "abc/de_g<group>")
_LEAF_RE = re.compile(rb"[0-9a-f]{3}/[0-9a-f]{2}(_g[0-9]{1,10})?")
#: a writer's scratch files in the registry, beside its lock file
SCRATCH_SUFFIXES = (".probe", ".manifest")


def tmp_suffix(token: str) -> bytes:
    return f".{token}.".encode()


def open_registry(ns_fd: int, where: str) -> Program[int]:
    """The registry directory's fd, made if missing; OSError (ELOOP, ENOTDIR) if it is not a real one."""
    path = os.path.join(where, REGISTRY_DIR)
    res = yield ops.mkdirat(ns_fd, REGISTRY_DIR, 0o700, path)
    if res < 0 and res != -errno.EEXIST:
        raise os_error(res, path)
    fd = yield ops.openat(ns_fd, REGISTRY_DIR, ops.DIR_FLAGS, path)
    if fd < 0:
        raise os_error(fd, path)
    return int(fd)


class WriterRegistration:
    """This process's entry in a namespace's writer registry (``dir_fd``: the registry at ``where``).

    :meth:`register` is the program that makes it; its descriptor (``fd``,
    the flock-ed lock file the block core appends leaves to) belongs to the
    admin engine that opened it, which closes it at release.
    """

    def __init__(self, dir_fd: int, where: str) -> None:
        self.dir_fd = dir_fd
        self.where = where
        self.pid = os.getpid()
        self.token = f"{self.pid}-{secrets.token_hex(6)}"
        # Made under another name and renamed once locked, so a cleaner never
        # sees an unlocked lock file of a live writer.
        self.staging = f"{self.token}.locking"
        self.lock_name = f"{self.token}.lock"
        self.fd = -1
        #: the lock file has its final name
        self.registered = False

    def register(self) -> Program[None]:
        path = os.path.join(self.where, self.staging)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
        fd = yield ops.openat(self.dir_fd, self.staging, flags, path, 0o600)
        if fd < 0:
            raise os_error(fd, path)
        self.fd = fd
        res = yield ops.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path)
        if res < 0:
            raise os_error(res, path)
        res = yield ops.renameat(self.dir_fd, self.staging, self.dir_fd, self.lock_name, 0, path)
        if res < 0:
            raise os_error(res, path)
        self.registered = True

    def release_ops(self, *, keep_registry: bool, scratch: bool) -> list[Op]:
        """The unlinks that unregister (before the lock file's fd is closed).

        ``keep_registry`` leaves the lock file (so the next open cleans up
        the leaves it lists); ``scratch`` also removes this writer's scratch
        files (an open cut short may have left them).
        """
        out: list[Op] = []
        names = [] if keep_registry else [self.lock_name]
        if not self.registered and not keep_registry:
            names.append(self.staging)
        if scratch:
            names += [self.token + suffix for suffix in SCRATCH_SUFFIXES]
        for name in names:
            out.append(ops.unlinkat(self.dir_fd, name, os.path.join(self.where, name)))
        return out


def remove_dead_writers(ns_fd: int, reg_fd: int, where: str) -> Program[int]:
    """Remove the temp files of every registered writer that is gone; returns how many writers.

    ``where`` is the namespace's path (for messages).
    """
    registry = os.path.join(where, REGISTRY_DIR)
    fd = yield ops.openat(reg_fd, ".", ops.DIR_FLAGS, registry)
    if fd < 0:
        raise os_error(fd, registry)
    entries = yield from ops.read_dir(fd, registry)
    yield ops.close(fd, registry)
    names = [os.fsdecode(n) for n, t in entries if t in (ops.DT_REG, ops.DT_UNKNOWN)]
    tokens = {n.rsplit(".", 1)[0] for n in names if n.endswith((".lock", ".locking"))}
    removed = 0
    for name in names:
        if name.endswith(SCRATCH_SUFFIXES) and name.rsplit(".", 1)[0] not in tokens:
            # A scratch file no lock file accounts for: an open cut short.
            if (yield from _age(reg_fd, name, registry)) >= STAGING_GRACE_S:
                yield ops.unlinkat(reg_fd, name, os.path.join(registry, name))
            continue
        if not name.endswith((".lock", ".locking")):
            continue
        token = name.rsplit(".", 1)[0]
        if (
            name.endswith(".locking")
            and (yield from _age(reg_fd, name, registry)) < STAGING_GRACE_S
        ):
            continue  # a writer between creating and locking it
        if (yield from _clean_writer(ns_fd, reg_fd, name, token, registry)):
            removed += 1
    return removed


def _clean_writer(ns_fd: int, reg_fd: int, name: str, token: str, registry: str) -> Program[bool]:
    path = os.path.join(registry, name)
    fd = yield ops.openat(reg_fd, name, os.O_RDONLY | os.O_NOFOLLOW, path)
    if fd < 0:
        return False
    res = yield ops.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path)
    if res < 0:
        yield ops.close(fd, path)
        return False  # its writer is alive (EWOULDBLOCK), or no lock to be had
    leaves = yield from ops.read_all(fd, path)
    files = 0
    for leaf in dict.fromkeys(leaves.split(b"\n")):
        if leaf:
            files += yield from _remove_temp_files(ns_fd, leaf, token, registry)
    # The writer's scratch files, then the lock file itself.
    yield tuple(ops.unlinkat(reg_fd, token + s, os.path.join(registry, token + s))
                for s in SCRATCH_SUFFIXES)  # fmt: skip
    res = yield ops.unlinkat(reg_fd, name, path)
    yield ops.close(fd, path)
    if res < 0 and res != -errno.ENOENT:  # ENOENT: another cleaner was first
        raise os_error(res, path)
    log.info("kvuring: removed %d temp file(s) of dead writer %s", files, token)
    return True


def _age(dir_fd: int, name: str, where: str) -> Program[float]:
    op, sx = ops.statx(dir_fd, name, b.AT_SYMLINK_NOFOLLOW, b.STATX_BASIC_STATS,
                       os.path.join(where, name))  # fmt: skip
    res = yield op
    if res < 0:
        return 0.0
    mtime: float = sx.stx_mtime.tv_sec + sx.stx_mtime.tv_nsec / 1e9
    return time.time() - mtime


def _remove_temp_files(ns_fd: int, leaf: bytes, token: str, registry: str) -> Program[int]:
    if not _LEAF_RE.fullmatch(leaf):
        return 0
    # openat2 with no symlink anywhere on the path: a planted link must not
    # make the cleaner delete anything outside the namespace.
    where = os.path.join(os.path.dirname(registry), leaf.decode())
    fd = yield ops.openat_inside(ns_fd, leaf, os.O_RDONLY | os.O_DIRECTORY, where)
    if fd < 0:
        return 0
    try:
        entries = yield from ops.read_dir(fd, where)
    except OSError:
        entries = []
    marker = tmp_suffix(token)
    victims = [n for n, _t in entries if marker in n and n.endswith(b".tmp")]
    results = (yield tuple(ops.unlinkat(fd, n, where) for n in victims)) if victims else ()
    yield ops.close(fd, where)
    return sum(1 for res in results if res == 0)
