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
O_NOFOLLOW, so a symlink planted at ``.tmp`` or in a leaf never sends a
create, scan or unlink outside the namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import time

log = logging.getLogger("kvuring")

REGISTRY_DIR = ".tmp"
# A lock file still under its staging name is left alone this long: its
# writer may be between creating and locking it.
STAGING_GRACE_S = 60.0
# kvuring's leaves, and those of vLLM's layout (layout="vllm": "abc/de_g<group>")
_LEAF_RE = re.compile(rb"[0-9a-f]{3}/[0-9a-f]{2}(_g[0-9]{1,10})?")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def tmp_suffix(token: str) -> bytes:
    return f".{token}.".encode()


def open_registry(ns_fd: int) -> int:
    """The registry directory's fd, made if missing; OSError (ELOOP, ENOTDIR) if it is not a real one."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(REGISTRY_DIR, 0o700, dir_fd=ns_fd)
    return os.open(REGISTRY_DIR, _DIR_FLAGS, dir_fd=ns_fd)


class WriterRegistration:
    """This process's entry in a namespace's writer registry (``dir_fd``: the registry)."""

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self.token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.pid = os.getpid()
        # Made under another name and renamed once locked, so a cleaner never
        # sees an unlocked lock file of a live writer.
        staging = f"{self.token}.locking"
        self.lock_name = f"{self.token}.lock"
        self.fd = os.open(
            staging,
            os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
            dir_fd=dir_fd,
        )
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, self.lock_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self.leaves: set[bytes] = set()

    def note_leaf(self, leaf: bytes) -> None:
        """Record that temp files may appear in ``leaf``; call before creating any there."""
        if leaf not in self.leaves:
            os.write(self.fd, leaf + b"\n")
            self.leaves.add(leaf)

    def close(self, *, keep: bool = False) -> None:
        """Unregister (every temp file is gone by now); idempotent.

        ``keep``: leave the lock file (its lock goes with the fd), so the next
        open treats this writer as dead and removes the temp files it lists
        (a cleanup unlink failed, or I/O was abandoned at close).
        """
        if self.fd < 0:
            return
        if os.getpid() == self.pid and not keep:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_name, dir_fd=self.dir_fd)
        # Linux releases the descriptor even when close reports an error (a
        # dead FUSE connection's flush): nothing to retry.
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


def remove_dead_writers(ns_fd: int, reg_fd: int) -> int:
    """Remove the temp files of every registered writer that is gone; returns how many writers."""
    removed = 0
    with os.scandir(reg_fd) as entries:
        names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
    for name in names:
        if not (name.endswith(".lock") or name.endswith(".locking")):
            continue
        token = name.rsplit(".", 1)[0]
        if name.endswith(".locking") and _age(reg_fd, name) < STAGING_GRACE_S:
            continue  # a writer between creating and locking it
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=reg_fd)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            leaves = _read_all(fd).split(b"\n")
            files = sum(_remove_temp_files(ns_fd, leaf, token) for leaf in leaves if leaf)
            os.unlink(name, dir_fd=reg_fd)
            removed += 1
            log.info("kvuring: removed %d temp file(s) of dead writer %s", files, token)
        finally:
            os.close(fd)
    return removed


def _age(dir_fd: int, name: str) -> float:
    try:
        return time.time() - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _remove_temp_files(ns_fd: int, leaf: bytes, token: str) -> int:
    if not _LEAF_RE.fullmatch(leaf):
        return 0
    # Walk down without following symlinks: a planted link must not make
    # the cleaner delete anything outside the namespace.
    fds: list[int] = []
    try:
        parent = ns_fd
        for part in leaf.split(b"/"):
            parent = os.open(part, _DIR_FLAGS, dir_fd=parent)
            fds.append(parent)
        marker = tmp_suffix(token)
        count = 0
        for name in os.listdir(parent):
            raw = os.fsencode(name)
            if marker in raw and raw.endswith(b".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=parent)
                    count += 1
        return count
    except OSError:
        return 0
    finally:
        for fd in fds:
            os.close(fd)
