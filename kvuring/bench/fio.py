"""fio as the device's limit: io_uring, O_DIRECT, iodepth 32, one preallocated file."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from typing import Any

from kvuring.bench.measure import Sample, Stopwatch


class FioError(RuntimeError):
    pass


def fio_path() -> str | None:
    return shutil.which("fio")


def fio_version() -> str | None:
    exe = fio_path()
    if exe is None:
        return None
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None


def _command(exe: str, path: str, rw: str, size: int, block_size: int, iodepth: int) -> list[str]:
    return [
        exe,
        "--name=kvuring-bench",
        f"--filename={path}",
        "--ioengine=io_uring",
        "--direct=1",
        f"--rw={rw}",
        f"--bs={block_size}",
        f"--iodepth={iodepth}",
        f"--size={size}",
        "--numjobs=1",
        "--output-format=json",
    ]


def _parse(stdout: str) -> dict[str, Any]:
    # fio may print notices before the JSON document.
    start = stdout.find("{")
    if start < 0:
        raise FioError(f"no JSON in fio output: {stdout[-500:]!r}")
    doc: dict[str, Any] = json.loads(stdout[start:])
    return doc


def run_fio(
    path: str,
    rw: str,
    size: int,
    block_size: int,
    iodepth: int,
    startup_cpu: float = 0.0,
    timeout: float | None = None,
) -> Sample:
    """One fio job; CPU is the whole fio process (RUSAGE_CHILDREN), io-wq included.

    ``startup_cpu`` (see ``measure_startup_cpu``) is taken off, so that a small
    run is not charged for fio parsing options and setting itself up.
    """
    exe = fio_path()
    if exe is None:
        raise FioError("fio is not on PATH")
    cmd = _command(exe, path, rw, size, block_size, iodepth)
    with Stopwatch(resource.RUSAGE_CHILDREN) as sw:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise FioError(f"fio failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    job = _parse(proc.stdout)["jobs"][0]
    part = job["write" if rw == "write" else "read"]
    # fio's own runtime leaves out its start-up and file checks; its CPU cannot.
    seconds = max(float(part["runtime"]) / 1e3, 1e-3)
    errors = int(job.get("error", 0))
    cpu = max(sw.cpu_seconds - startup_cpu, 0.0)
    return Sample(seconds, cpu, int(part["io_bytes"]), int(part["total_ios"]), errors)


def measure_startup_cpu(path: str, block_size: int, iodepth: int) -> float:
    """fio's fixed cost: CPU seconds of a run that reads a single block (median of 3).

    Mostly option parsing and process setup (~0.2 s here); taking it off
    keeps small runs from charging it to the bytes moved.  One block of I/O
    stays in it, so fio is never credited with less than its real cost.
    """
    runs = sorted(
        run_fio(path, "read", block_size, block_size, iodepth).cpu_seconds for _ in range(3)
    )
    return runs[1]


def prepare_file(
    path: str, size: int, block_size: int, iodepth: int, timeout: float | None = None
) -> float:
    """Preallocate, then write the file once untimed.

    Reads of never-written (unwritten-extent) blocks return zeros without
    touching the device, and the first write into them converts extents;
    neither should be in the timed runs.  Returns fio's start-up CPU seconds.
    """
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    run_fio(path, "write", size, block_size, iodepth, timeout=timeout)
    return measure_startup_cpu(path, block_size, iodepth)
