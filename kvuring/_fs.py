"""Which filesystem a path is on, from /proc/mounts."""

from __future__ import annotations

import os

#: Filesystems whose reads are memory copies: io_uring runs them one at a
#: time on a single io-wq worker unless they are marked IOSQE_ASYNC.
MEMORY_FILESYSTEMS = frozenset(("tmpfs", "ramfs", "hugetlbfs"))


def _unescape_mount(path: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def filesystem_of(path: str) -> dict[str, str]:
    """The /proc/mounts entry whose mount point is the longest prefix of ``path``."""
    return _mount_of(os.path.realpath(path))


def filesystem_of_fd(fd: int) -> dict[str, str]:
    """As :func:`filesystem_of` for an open descriptor, from /proc alone.

    ``realpath`` would look up every component on the filesystem itself,
    which blocks on a hung mount; /proc/self/fd names the path without.
    """
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = ""
    return _mount_of(real)


def _mount_of(real: str) -> dict[str, str]:
    best = {"type": "unknown", "mount_point": "", "device": ""}
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        device, mount_point, fstype = fields[0], _unescape_mount(fields[1]), fields[2]
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        # Later entries with the same mount point shadow earlier ones.
        if inside and len(mount_point) >= len(best["mount_point"]):
            best = {"type": fstype, "mount_point": mount_point, "device": device}
    return best
