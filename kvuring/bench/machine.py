"""What the figures were measured on: CPU count, kernel, filesystem, versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Any

import kvuring
from kvuring.bench.fio import fio_version


def _unescape_mount(path: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def filesystem_of(path: str) -> dict[str, str]:
    """The /proc/mounts entry whose mount point is the longest prefix of ``path``."""
    real = os.path.realpath(path)
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(bench_dir: str) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_bytes": _memory_bytes(),
        "kernel": platform.release(),
        "filesystem": filesystem_of(bench_dir),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "kvuring_version": kvuring.__version__,
        "kvuring_engine": kvuring.backend_info(),
        "uvloop_version": _dist_version("uvloop"),
        "fio_version": fio_version(),
    }
