"""Who is writing to a namespace, and what a dead writer left behind.

A temp file sits beside its block's final name (``<leaf>/<hex><suffix>.<token>.<seq>.tmp``)
so the publishing rename stays within one directory.  To find a dead
writer's leftovers without walking the whole store, each open store
registers in ``<namespace>/.tmp/<token>.lock``: it holds an flock on that
file for its whole life and appends every leaf directory to it *before* the
first temp file goes there.  The next open takes each lock it can (its owner
is gone), removes the temp files named in it and then the lock file; a live
writer's lock cannot be taken, so its files are left alone.
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
_LEAF_RE = re.compile(rb"[0-9a-f]{3}/[0-9a-f]{2}")


def tmp_suffix(token: str) -> bytes:
    return f".{token}.".encode()


class WriterRegistration:
    """This process's entry in a namespace's writer registry."""

    def __init__(self, ns_path: str) -> None:
        self.ns_path = ns_path
        self.dir = os.path.join(ns_path, REGISTRY_DIR)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.dir, 0o700)
        self.token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.pid = os.getpid()
        # Made under another name and renamed once locked, so a cleaner never
        # sees an unlocked lock file of a live writer.
        staging = os.path.join(self.dir, f"{self.token}.locking")
        self.fd = os.open(
            staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.lock_path = os.path.join(self.dir, f"{self.token}.lock")
        os.rename(staging, self.lock_path)
        self.leaves: set[bytes] = set()

    def note_leaf(self, leaf: bytes) -> None:
        """Record that temp files may appear in ``leaf``; call before creating any there."""
        if leaf not in self.leaves:
            os.write(self.fd, leaf + b"\n")
            self.leaves.add(leaf)

    def close(self) -> None:
        """Unregister (every temp file is gone by now); idempotent."""
        if self.fd < 0:
            return
        if os.getpid() == self.pid:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
        os.close(self.fd)
        self.fd = -1


def remove_dead_writers(ns_path: str) -> int:
    """Remove the temp files of every registered writer that is gone; returns how many writers."""
    reg_dir = os.path.join(ns_path, REGISTRY_DIR)
    try:
        entries = list(os.scandir(reg_dir))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        name = entry.name
        if not (name.endswith(".lock") or name.endswith(".locking")):
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        token = name.rsplit(".", 1)[0]
        if name.endswith(".locking") and _age(entry) < STAGING_GRACE_S:
            continue  # a writer between creating and locking it
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            leaves = _read_all(fd).split(b"\n")
            files = sum(_remove_temp_files(ns_path, leaf, token) for leaf in leaves if leaf)
            os.unlink(entry.path)
            removed += 1
            log.info("kvuring: removed %d temp file(s) of dead writer %s", files, token)
        finally:
            os.close(fd)
    return removed


def _age(entry: os.DirEntry[str]) -> float:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _remove_temp_files(ns_path: str, leaf: bytes, token: str) -> int:
    if not _LEAF_RE.fullmatch(leaf):
        return 0
    # Walk down without following symlinks: a planted link must not make
    # the cleaner delete anything outside the namespace.
    try:
        ns_fd = os.open(ns_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    fds = [ns_fd]
    try:
        for part in leaf.split(b"/"):
            fds.append(
                os.open(
                    part,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=fds[-1],
                )
            )
        marker = tmp_suffix(token)
        count = 0
        for name in os.listdir(fds[-1]):
            raw = os.fsencode(name)
            if marker in raw and raw.endswith(b".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fds[-1])
                    count += 1
        return count
    except OSError:
        return 0
    finally:
        for fd in fds:
            os.close(fd)
