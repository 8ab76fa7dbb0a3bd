"""The issues' performance targets, evaluated on medians for each kvuring implementation.

Against the Python pool and fio (the first targets), and against the C pool
(issue 9: the thread pool of vLLM's filesystem tier, in C).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvuring.bench.config import CPOOL, FIO, KIB, KV_IMPLS, MIB, SEED

# Filesystems whose data lives in memory: the "tmpfs" rows apply to them.
MEMORY_FS = frozenset({"tmpfs", "ramfs"})

Figure = Callable[[str, int, str, str], float | None]  # (impl, block size, op, field)
Latency = Callable[[str, str], float | None]  # (impl, field)
Ratio = Callable[[Figure, Latency, str], float | None]  # kvuring impl -> ratio to reference


@dataclass(frozen=True)
class Check:
    group: str
    text: str
    on_memory_fs: bool | None  # True: tmpfs only, False: disk only, None: everywhere
    bound: float
    at_most: bool  # met when ratio <= bound (CPU, latency) rather than >= bound
    ratio: Ratio


def _versus(ref: str, bs: int, op: str, field: str) -> Ratio:
    def ratio(fig: Figure, _lat: Latency, impl: str) -> float | None:
        mine, theirs = fig(impl, bs, op, field), fig(ref, bs, op, field)
        if mine is None or not theirs:
            return None
        return mine / theirs

    return ratio


def _p99_vs_p50(ref: str) -> Ratio:
    def ratio(_fig: Figure, lat: Latency, impl: str) -> float | None:
        mine, theirs = lat(impl, "p99_ms"), lat(ref, "p50_ms")
        if mine is None or not theirs:
            return None
        return mine / theirs

    return ratio


_p99_vs_pool_p50 = _p99_vs_p50(SEED)


def _cpool_checks() -> list[Check]:
    """Issue 9's targets: kvuring against the C pool (64 KiB tmpfs, 64 KiB disk, 2 MiB)."""
    small, big = 64 * KIB, 2 * MIB
    aim = " (aim here; the 16-core machine's target)"
    # (block size, on tmpfs?, group, [(op, figure, bound, at most?, check text)])
    table: list[tuple[int, bool | None, str, list[tuple[str, str, float, bool, str]]]] = [
        (
            small,
            True,
            "64 KiB, tmpfs, C pool",
            [
                ("store", "blocks_per_s", 1.0, False, "stores/s ≥ 1.0 x"),
                ("load", "blocks_per_s", 0.8, False, "loads/s ≥ 0.8 x"),
                ("load", "blocks_per_s", 1.0, False, "loads/s ≥ 1.0 x"),
                ("store", "cpu_s_per_gb", 1.2, True, "store CPU s/GB ≤ 1.2 x"),
                ("load", "cpu_s_per_gb", 1.2, True, "load CPU s/GB ≤ 1.2 x"),
            ],
        ),
        (
            small,
            False,
            "64 KiB, disk, C pool",
            [
                ("store", "blocks_per_s", 1.3, False, "stores/s ≥ 1.3 x"),
                ("load", "blocks_per_s", 1.1, False, "loads/s ≥ 1.1 x"),
                ("store", "cpu_s_per_gb", 1.0, True, "store CPU s/GB ≤ 1.0 x"),
                ("load", "cpu_s_per_gb", 1.0, True, "load CPU s/GB ≤ 1.0 x"),
            ],
        ),
        (
            big,
            None,
            "2 MiB, C pool",
            [
                ("store", "gb_per_s", 1.0, False, "stores GB/s ≥ 1.0 x"),
                ("load", "gb_per_s", 1.0, False, "loads GB/s ≥ 1.0 x"),
                ("store", "cpu_s_per_gb", 1.2, True, "store CPU s/GB ≤ 1.2 x"),
                ("load", "cpu_s_per_gb", 1.2, True, "load CPU s/GB ≤ 1.2 x"),
            ],
        ),
    ]
    checks = []
    for bs, mem, group, rows in table:
        for n, (op, figure, bound, at_most, text) in enumerate(rows):
            # The second loads/s row of tmpfs is the aim, and the 16-core target.
            extra = aim if mem and n == 2 else ""
            checks.append(
                Check(
                    group,
                    f"{text} the C pool's{extra}",
                    mem,
                    bound,
                    at_most,
                    _versus(CPOOL, bs, op, figure),
                )
            )
    checks.append(
        Check(
            "prefix load under background stores, C pool",
            "p99 ≤ the C pool's p50",
            None,
            1.0,
            True,
            _p99_vs_p50(CPOOL),
        )
    )
    return checks


def _large_block_checks() -> list[Check]:
    checks = []
    for bs, name in ((256 * KIB, "256 KiB"), (2 * MIB, "2 MiB")):
        group = f"{name}, disk"
        checks += [
            Check(
                group,
                "loads GB/s ≥ 0.9 x fio's",
                False,
                0.9,
                False,
                _versus(FIO, bs, "load", "gb_per_s"),
            ),
            Check(
                group,
                "stores GB/s ≥ 1.0 x the pool's",
                False,
                1.0,
                False,
                _versus(SEED, bs, "store", "gb_per_s"),
            ),
            Check(
                group,
                "store CPU s/GB ≤ 0.5 x the pool's",
                False,
                0.5,
                True,
                _versus(SEED, bs, "store", "cpu_s_per_gb"),
            ),
            Check(
                group,
                "load CPU s/GB ≤ 0.5 x the pool's",
                False,
                0.5,
                True,
                _versus(SEED, bs, "load", "cpu_s_per_gb"),
            ),
        ]
    return checks


def all_checks() -> list[Check]:
    small = 64 * KIB
    return [
        Check(
            "64 KiB, disk",
            "store CPU s/GB ≤ 0.4 x the pool's",
            False,
            0.4,
            True,
            _versus(SEED, small, "store", "cpu_s_per_gb"),
        ),
        Check(
            "64 KiB, disk",
            "load CPU s/GB ≤ 0.4 x the pool's",
            False,
            0.4,
            True,
            _versus(SEED, small, "load", "cpu_s_per_gb"),
        ),
        Check(
            "64 KiB, disk",
            "stores/s ≥ 1.5 x the pool's",
            False,
            1.5,
            False,
            _versus(SEED, small, "store", "blocks_per_s"),
        ),
        Check(
            "64 KiB, disk",
            "loads/s ≥ 0.9 x fio's",
            False,
            0.9,
            False,
            _versus(FIO, small, "load", "blocks_per_s"),
        ),
        Check(
            "64 KiB, tmpfs",
            "stores/s ≥ 2.5 x the pool's",
            True,
            2.5,
            False,
            _versus(SEED, small, "store", "blocks_per_s"),
        ),
        Check(
            "64 KiB, tmpfs",
            "loads/s ≥ 2.5 x the pool's",
            True,
            2.5,
            False,
            _versus(SEED, small, "load", "blocks_per_s"),
        ),
        *_large_block_checks(),
        Check(
            "prefix load under background stores",
            "p99 ≤ the pool's p50",
            None,
            1.0,
            True,
            _p99_vs_pool_p50,
        ),
        *_cpool_checks(),
    ]


def evaluate(fig: Figure, lat: Latency, fstype: str, impls: list[str]) -> list[dict[str, Any]]:
    """One row per check: whether it applies here and, per kvuring impl, ratio and verdict."""
    on_memory = fstype in MEMORY_FS
    rows = []
    for check in all_checks():
        applies = check.on_memory_fs is None or check.on_memory_fs == on_memory
        results: dict[str, dict[str, Any]] = {}
        for impl in (i for i in impls if i in KV_IMPLS):
            ratio = check.ratio(fig, lat, impl)
            met = (
                None
                if ratio is None
                else (ratio <= check.bound if check.at_most else ratio >= check.bound)
            )
            results[impl] = {"ratio": ratio, "met": met}
        rows.append(
            {
                "group": check.group,
                "check": check.text,
                "applies": applies,
                "bound": check.bound,
                "kind": "at most" if check.at_most else "at least",
                "results": results,
            }
        )
    return rows
