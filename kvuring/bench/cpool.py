"""The C thread pool: vLLM's filesystem tier's per-block system calls, on POSIX threads, no Python.

``cpool.c`` (shipped beside this module) is compiled on first use with the
system C compiler into a cache directory and run as a subprocess once per
timed phase.  Its wall time is the program's own (the I/O phase, from the
first block queued to the last one done); its CPU is the whole process's
(``RUSAGE_CHILDREN``), less its start-up — loading, the buffer region, the
threads, the warm-up — measured the same way with no timed blocks, as for
fio.  The program's own ``RUSAGE_SELF`` over the phase is kept beside it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import resource
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvuring.bench.measure import Sample, Stopwatch, median

SOURCE = "cpool.c"
CFLAGS: tuple[str, ...] = ("-O2", "-Wall", "-Wextra", "-Werror", "-pthread")


class CPoolError(RuntimeError):
    """The C pool cannot be built or did not run cleanly."""


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` if set, else ``cc`` from PATH; None if there is none."""
    env = os.environ.get("CC", "").strip()
    words = shlex.split(env) if env else ["cc"]
    exe = shutil.which(words[0])
    return None if exe is None else [exe, *words[1:]]


def source_bytes() -> bytes:
    return importlib.resources.files("kvuring.bench").joinpath(SOURCE).read_bytes()


def cache_dir() -> str:
    """``$XDG_CACHE_HOME/kvuring`` (default ``~/.cache/kvuring``), or a temp dir if not writable."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "kvuring")
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK | os.X_OK):
            return path
    except OSError:
        pass
    path = os.path.join(tempfile.gettempdir(), f"kvuring-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def build(timeout: float = 120.0) -> str:
    """The compiled program's path; compiles it unless this source and compiler already did."""
    cc = compiler()
    if cc is None:
        raise CPoolError("no C compiler: cc is not on PATH (install gcc or clang, or set CC)")
    try:
        source = source_bytes()
    except OSError as exc:
        raise CPoolError(f"{SOURCE} is missing from the installed package: {exc}") from exc
    digest = hashlib.sha256(source + "\0".join([*cc, *CFLAGS]).encode()).hexdigest()[:16]
    directory = cache_dir()
    exe = os.path.join(directory, f"cpool-{digest}")
    if os.access(exe, os.X_OK):
        return exe
    with tempfile.TemporaryDirectory(prefix="cpool-build-", dir=directory) as work:
        src = os.path.join(work, SOURCE)
        with open(src, "wb") as out:
            out.write(source)
        tmp_exe = os.path.join(work, "cpool")
        cmd = [*cc, *CFLAGS, "-o", tmp_exe, src]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CPoolError(f"compiling {SOURCE} failed: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-1500:]
            raise CPoolError(f"compiling {SOURCE} failed ({shlex.join(cmd)}):\n{tail}")
        # Atomic: a concurrent build replaces it with an identical program.
        os.replace(tmp_exe, exe)
    return exe


def _parse(stdout: str) -> dict[str, str]:
    for line in stdout.splitlines():
        if line.startswith("phase="):
            return dict(field.split("=", 1) for field in line.split())
    raise CPoolError(f"no result line in the C pool's output: {stdout[-500:]!r}")


def _run(
    cmd: list[str], keys: Sequence[bytes], timeout: float | None
) -> tuple[dict[str, str], float]:
    """Run the program with ``keys`` on stdin; its result line and the process's CPU seconds."""
    with Stopwatch(resource.RUSAGE_CHILDREN) as sw:
        proc = subprocess.run(
            cmd, input=b"".join(keys), capture_output=True, timeout=timeout, check=False
        )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-500:]
        raise CPoolError(f"the C pool failed ({proc.returncode}): {err}")
    return _parse(proc.stdout.decode(errors="replace")), sw.cpu_seconds


@dataclass(frozen=True)
class CPool:
    """One compiled program and the settings every run of a block size shares."""

    exe: str
    block_size: int
    threads: int
    slots: int
    timeout: float | None = None

    def _cmd(self, mode: str, root: str, nwarm: int, nkeys: int) -> list[str]:
        args = (self.block_size, self.threads, self.slots, nwarm, nkeys)
        return [self.exe, mode, root, *map(str, args)]

    def phase(
        self, op: str, root: str, warm: Sequence[bytes], keys: Sequence[bytes], startup_cpu: float
    ) -> tuple[Sample, dict[str, Any]]:
        """One timed store or load of ``keys`` (after ``warm``, untimed) in ``root``."""
        cmd = self._cmd(op, root, len(warm), len(keys))
        fields, cpu = _run(cmd, [*warm, *keys], self.timeout)
        seconds = max(float(fields["seconds"]), 1e-9)
        sample = Sample(
            seconds,
            max(cpu - startup_cpu, 0.0),
            len(keys) * self.block_size,
            int(fields["blocks"]),
            int(fields["errors"]),
        )
        stats = {
            "process_cpu_s": cpu,
            "startup_cpu_s": startup_cpu,
            "phase_self_cpu_s": float(fields["cpu_s"]),
            "o_direct": fields.get("o_direct") == "1",
            "threads": int(fields["threads"]),
        }
        return sample, stats

    def startup_cpu(self, root: str, warm: Sequence[bytes], repeats: int = 3) -> dict[str, float]:
        """Per op, the CPU of a run that moves no timed blocks (median of ``repeats``)."""
        runs: dict[str, list[float]] = {"store": [], "load": []}
        for i in range(repeats):
            # Fresh files each time: the store run's warm-up must really store.
            where = os.path.join(root, f"s{i}")
            os.makedirs(where)
            for op in ("store", "load"):
                runs[op].append(_run(self._cmd(op, where, len(warm), 0), warm, self.timeout)[1])
        return {op: median(values) for op, values in runs.items()}

    def latency(
        self, root: str, prefix: Sequence[bytes], requests: int, bg_batch: int
    ) -> tuple[list[float], int, int]:
        """Seconds per prefix load under a background store stream; errors; background blocks."""
        cmd = [
            self.exe,
            "latency",
            root,
            *map(str, (self.block_size, self.threads, self.slots, 0, len(prefix))),
            str(requests),
            str(bg_batch),
        ]
        fields, _cpu = _run(cmd, prefix, self.timeout)
        text = fields.get("seconds", "")
        seconds = [float(s) for s in text.split(",") if s]
        return seconds, int(fields["errors"]), int(fields["bg_blocks"])
