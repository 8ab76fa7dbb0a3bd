"""A namespace's manifest: the block size, format and layout its blocks were written with.

``<namespace>/.kvuring-manifest.json`` (a name no block, vLLM file or
kvuring directory can have) is written by the first open of a namespace and
read by every later one.  A store that asks for other values is refused
with a ``ValueError`` naming both, before it registers or cleans up
anything, so no block is ever read as ``CORRUPT`` (and removed) because a
second process got the block size wrong.  A namespace made before manifests
existed gets one at its next open, with that store's values.

Publishing is atomic: the manifest is written and fsynced under a scratch
name in the registry (``.tmp/<token>.manifest``) and renamed into place
with ``RENAME_NOREPLACE``, so of two first opens one wins and the other
reads the winner's.  Where the filesystem refuses the flag (``EINVAL``:
NFS, some FUSE), the manifest is created in place with ``O_EXCL`` (one
creator still wins) and written; a reader that finds it empty or partial
waits for the writer to finish.  Every step is an admin-engine operation
(:mod:`kvuring._nsops`).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from typing import Any

from kvuring import _binding as b
from kvuring import _nsops as ops
from kvuring._nsops import Program, Sleep, os_error

NAME = ".kvuring-manifest.json"
#: the version of kvuring's on-disk layout and block format a manifest describes
FORMAT_VERSION = 1
#: a manifest bigger than this is not one
_MAX_BYTES = 1 << 16
#: how long a reader waits for a manifest being written in place (no RENAME_NOREPLACE)
_PARTIAL_WAIT_S = 2.0
_PARTIAL_POLL_S = 0.05
_NO_NOREPLACE = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV))


@dataclass(frozen=True)
class Manifest:
    block_size: int
    verify: bool
    layout: str
    format_version: int = FORMAT_VERSION

    def describe(self) -> str:
        text = f"block_size {self.block_size}, verify={self.verify}, layout {self.layout!r}"
        if self.format_version != FORMAT_VERSION:
            text += f", format version {self.format_version}"
        return text

    def encode(self) -> bytes:
        return (
            json.dumps(
                {
                    "kvuring": "namespace manifest",
                    "format_version": self.format_version,
                    "block_size": self.block_size,
                    "verify": self.verify,
                    "layout": self.layout,
                },
                indent=1,
            )
            + "\n"
        ).encode()


def parse(data: bytes) -> Manifest:
    """The manifest in ``data``; ValueError (with why) if it is not a whole one."""
    try:
        raw: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not JSON" if data else "empty") from exc
    if not isinstance(raw, dict) or raw.get("kvuring") != "namespace manifest":
        raise ValueError("not a kvuring namespace manifest")
    bs, verify, layout, version = (raw.get(k) for k in
                                   ("block_size", "verify", "layout", "format_version"))  # fmt: skip
    if not (
        isinstance(bs, int)
        and not isinstance(bs, bool)
        and isinstance(verify, bool)
        and isinstance(layout, str)
        and isinstance(version, int)
        and not isinstance(version, bool)
    ):
        raise ValueError("a field is missing or of the wrong type")
    return Manifest(bs, verify, layout, version)


def check(found: Manifest, wanted: Manifest, namespace: str, where: str) -> None:
    """ValueError unless the namespace's manifest is the store's."""
    if found != wanted:
        raise ValueError(
            f"namespace {namespace!r} at {where} holds {found.describe()}; this store asked "
            f"for {wanted.describe()}. Open it with the namespace's values, or use another "
            f"namespace (nothing in this one was changed)"
        )


def read(ns_fd: int, where: str) -> Program[Manifest | None]:
    """The namespace's manifest, or None where it has none.

    One being written in place (no RENAME_NOREPLACE) is waited for; a
    manifest still unreadable after that raises ValueError.
    """
    path = os.path.join(where, NAME)
    why = ""
    for _ in range(int(_PARTIAL_WAIT_S / _PARTIAL_POLL_S) + 1):
        fd = yield ops.openat(ns_fd, NAME, os.O_RDONLY | os.O_NOFOLLOW, path)
        if fd == -errno.ENOENT:
            return None
        if fd < 0:
            raise os_error(fd, path)
        data = yield from ops.read_all(fd, path, _MAX_BYTES + 1)
        yield ops.close(fd, path)
        try:
            return parse(data if len(data) <= _MAX_BYTES else b"{")
        except ValueError as exc:
            why = str(exc)
        if why not in ("empty", "not JSON"):
            break  # not a partial one: waiting would not help
        yield Sleep(_PARTIAL_POLL_S)
    raise ValueError(
        f"the namespace manifest {path} is unreadable ({why}); if no kvuring process is "
        f"creating it, remove it and the next open writes it again"
    )


def publish(
    ns_fd: int, reg_fd: int, token: str, wanted: Manifest, where: str
) -> Program[Manifest]:  # fmt: skip
    """Write ``wanted`` as the namespace's manifest, unless another open was first.

    Returns the manifest now in place: ``wanted``, or the one that won.
    """
    path = os.path.join(where, NAME)
    scratch = f"{token}.manifest"
    spath = os.path.join(where, ".tmp", scratch)
    data = wanted.encode()
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
    fd = yield ops.openat(reg_fd, scratch, flags, spath, 0o644)
    if fd < 0:
        raise os_error(fd, spath)
    yield from _write_out(fd, data, spath)
    res = yield ops.renameat(reg_fd, scratch, ns_fd, NAME, b.RENAME_NOREPLACE, path)
    if res == 0:
        return wanted
    yield ops.unlinkat(reg_fd, scratch, spath)
    if res == -errno.EEXIST:
        return (yield from _winner(ns_fd, where))
    if -res not in _NO_NOREPLACE:
        raise os_error(res, path)
    # No RENAME_NOREPLACE here: O_EXCL still lets exactly one creator win.
    fd = yield ops.openat(ns_fd, NAME, flags, path, 0o644)
    if fd == -errno.EEXIST:
        return (yield from _winner(ns_fd, where))
    if fd < 0:
        raise os_error(fd, path)
    yield from _write_out(fd, data, path)
    return wanted


def _winner(ns_fd: int, where: str) -> Program[Manifest]:
    found = yield from read(ns_fd, where)
    if found is None:
        raise OSError(errno.ENOENT, "the namespace manifest vanished while it was being made",
                      os.path.join(where, NAME))  # fmt: skip
    return found


def _write_out(fd: int, data: bytes, path: str) -> Program[None]:
    """Write ``data`` at offset 0, fsync and close ``fd``."""
    n = yield ops.write(fd, data, 0, path)
    if n >= 0 and n != len(data):
        n = -errno.ENOSPC
    if n < 0:
        yield ops.close(fd, path)
        raise os_error(n, path)
    res = yield ops.fsync(fd, path)
    res2 = yield ops.close(fd, path)
    for r in (res, res2):
        if r < 0:
            raise os_error(r, path)
