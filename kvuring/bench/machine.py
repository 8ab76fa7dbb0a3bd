"""What the figures were measured on: CPU count, kernel, filesystem, versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Any

import kvuring
from kvuring._fs import filesystem_of
from kvuring.bench.fio import fio_version


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
