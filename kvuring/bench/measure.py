"""Wall time and process CPU around a piece of work, and the statistics over samples."""

from __future__ import annotations

import gc
import math
import resource
import time
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

GB = 1e9  # figures are per decimal GB, as disks and fio report them


@dataclass(frozen=True)
class Sample:
    """One timed phase: one implementation moving ``blocks`` blocks once."""

    seconds: float
    cpu_seconds: float
    nbytes: int
    blocks: int
    errors: int

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / GB / self.seconds

    @property
    def blocks_per_s(self) -> float:
        return self.blocks / self.seconds

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_seconds / (self.nbytes / GB)

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "gb_per_s": self.gb_per_s,
            "blocks_per_s": self.blocks_per_s,
            "cpu_s_per_gb": self.cpu_s_per_gb,
        }


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Wall and CPU seconds of the enclosed block.

    RUSAGE_SELF covers every thread of this process, kernel io-wq workers
    included; RUSAGE_CHILDREN covers waited-for subprocesses (fio).
    """

    def __init__(self, who: int = resource.RUSAGE_SELF) -> None:
        self._who = who
        self._t0 = 0.0
        self._c0 = 0.0
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        # Collect now so one implementation does not pay for another's garbage.
        gc.collect()
        self._c0 = _cpu(self._who)
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = max(time.perf_counter() - self._t0, 1e-9)
        self.cpu_seconds = _cpu(self._who) - self._c0

    def sample(self, nbytes: int, blocks: int, errors: int) -> Sample:
        return Sample(self.seconds, self.cpu_seconds, nbytes, blocks, errors)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(seconds: list[float]) -> dict[str, float | int]:
    """p50/p99/max in milliseconds."""
    return {
        "count": len(seconds),
        "p50_ms": percentile(seconds, 50) * 1e3,
        "p99_ms": percentile(seconds, 99) * 1e3,
        "max_ms": max(seconds) * 1e3 if seconds else math.nan,
    }


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Medians over rounds; each figure is the median of its own per-round values."""
    return {
        "gb_per_s": median([s.gb_per_s for s in samples]),
        "blocks_per_s": median([s.blocks_per_s for s in samples]),
        "cpu_s_per_gb": median([s.cpu_s_per_gb for s in samples]),
        "seconds": median([s.seconds for s in samples]),
        "errors": sum(s.errors for s in samples),
        "rounds": [s.as_json() for s in samples],
    }
