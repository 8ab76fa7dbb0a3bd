"""The benchmark's schedule: interleaved rounds of every implementation, fresh directories each.

Order is round -> block size -> implementation (A B C A B C ...), so slow drift
of the machine (host neighbours, disk state) lands on every implementation
alike; the report takes medians over rounds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvuring.bench import cpool as cpool_mod
from kvuring.bench import fio as fio_mod
from kvuring.bench.config import (
    CPOOL,
    FIO,
    KV_UVLOOP,
    LATENCY_IMPLS,
    SEED,
    BenchConfig,
    format_size,
)
from kvuring.bench.extras import MissingExtra, missing
from kvuring.bench.kv import StepTimeout, kv_latency, kv_session
from kvuring.bench.measure import Sample
from kvuring.bench.seed import SeedPool
from kvuring.bench.workload import Region, key_batches, make_keys, warmup_keys

Key = tuple[str, int, str]  # (implementation, block size, op)


class BenchError(RuntimeError):
    """The benchmark cannot run as configured (no space, bad directory)."""


@dataclass
class Collected:
    """Everything measured so far; the report is computed from this alone."""

    samples: dict[Key, list[Sample]] = field(default_factory=dict)
    batch_seconds: dict[Key, list[float]] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)
    latency_errors: dict[str, int] = field(default_factory=dict)
    latency_bg_blocks: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    store_stats: dict[str, Any] = field(default_factory=dict)
    fio_startup_cpu: dict[int, float] = field(default_factory=dict)
    cpool_startup_cpu: dict[int, dict[str, float]] = field(default_factory=dict)
    cpool_stats: dict[str, Any] = field(default_factory=dict)

    def add(self, impl: str, block_size: int, op: str, sample: Sample) -> None:
        self.samples.setdefault((impl, block_size, op), []).append(sample)


@dataclass(frozen=True)
class Step:
    impl: str
    label: str
    run: Callable[[], None]


def _label(block_size: int) -> str:
    return format_size(block_size).replace(" ", "").replace("iB", "")


def estimated_bytes(cfg: BenchConfig, impls: tuple[str, ...]) -> int:
    """Disk bytes the run leaves behind before its final clean-up (rough, errs high)."""
    stores = sum(1 for i in impls if i != FIO)
    per_round = sum(cfg.blocks_for(bs) * bs for bs in cfg.block_sizes)
    total = cfg.rounds * stores * per_round
    if FIO in impls:
        total += per_round
    if cfg.latency:
        prefix = cfg.latency_prefix * cfg.latency_block_size
        # The background stream writes about as much as the requests read.
        lat_impls = sum(1 for i in impls if i in LATENCY_IMPLS)
        total += cfg.rounds * lat_impls * prefix * (cfg.latency_requests + 1)
    return int(total * 1.05)


class Runner:
    def __init__(self, cfg: BenchConfig, root: str) -> None:
        self.cfg = cfg
        self.root = root
        self.data = Collected()
        self._cpool_exe = ""
        self.impls = self._available_impls()
        self._regions: dict[int, Region] = {}
        self._fio_files: dict[int, str] = {}

    def _available_impls(self) -> tuple[str, ...]:
        impls = []
        for impl in self.cfg.impls:
            reason = self._build_cpool() if impl == CPOOL else _missing_dependency(impl)
            if reason:
                self.data.unavailable[impl] = reason
            else:
                impls.append(impl)
        return tuple(impls)

    def _build_cpool(self) -> str | None:
        # Compiled here, before any step, so no timing ever includes it.
        try:
            self._cpool_exe = cpool_mod.build()
        except cpool_mod.CPoolError as exc:
            return str(exc)
        return None

    # --- schedule ---------------------------------------------------------

    def steps(self) -> list[Step]:
        cfg = self.cfg
        steps: list[Step] = []
        if FIO in self.impls:
            steps += [
                Step(FIO, f"prepare fio {_label(bs)}", self._fio_prepare(bs))
                for bs in cfg.block_sizes
            ]
        if CPOOL in self.impls:
            steps += [
                Step(CPOOL, f"prepare cpool {_label(bs)}", self._cpool_prepare(bs))
                for bs in cfg.block_sizes
            ]
        for rnd in range(cfg.rounds):
            for bs in cfg.block_sizes:
                steps += [
                    Step(impl, f"r{rnd + 1} {_label(bs)} {impl}", self._throughput(rnd, bs, impl))
                    for impl in self.impls
                ]
            if cfg.latency:
                steps += [
                    Step(impl, f"r{rnd + 1} latency {impl}", self._latency(rnd, impl))
                    for impl in self.impls
                    if impl in LATENCY_IMPLS
                ]
        return steps

    def run(self) -> Collected:
        steps = self.steps()
        progress = _progress_bar(len(steps), self.cfg.progress)
        try:
            for step in steps:
                progress.set_description(step.label)
                if step.impl not in self.data.unavailable:
                    self._attempt(step, progress)
                progress.update(1)
        finally:
            progress.close()
            for region in self._regions.values():
                region.close()
        return self.data

    def _attempt(self, step: Step, progress: Any) -> None:
        try:
            step.run()
        except Exception as exc:
            # One broken implementation should not cost the others' figures.
            self.data.unavailable[step.impl] = f"{type(exc).__name__}: {exc}"
            progress.write(f"{step.impl} dropped at '{step.label}': {exc!r}", file=sys.stderr)
            if not isinstance(exc, (StepTimeout, subprocess.TimeoutExpired)):
                traceback.print_exc(file=sys.stderr)

    # --- shared setup -----------------------------------------------------

    def region(self, block_size: int) -> Region:
        """The block-size's buffer region, made (and touched) once for the whole run."""
        if block_size not in self._regions:
            self._regions[block_size] = Region(block_size, self._slots(block_size))
        return self._regions[block_size]

    def _slots(self, block_size: int) -> int:
        # Enough slots for every batch in flight (kvuring) or every pool thread,
        # never more than one pass needs.
        cfg = self.cfg
        need = 0
        if block_size in cfg.block_sizes:
            in_flight = max(cfg.batch * cfg.concurrency, cfg.pool_threads)
            need = min(cfg.blocks_for(block_size), in_flight)
        if cfg.latency and block_size == cfg.latency_block_size:
            need = max(need, cfg.latency_prefix + cfg.bg_batch)
        return max(need, 1)

    def _dir(self, rnd: int, name: str) -> str:
        # Always a new directory beside the old ones: nothing is deleted
        # before the very end (ext4 here burns CPU creating files right after
        # mass deletes).
        path = os.path.join(self.root, f"r{rnd + 1}", name)
        os.makedirs(path)
        return path

    # --- steps ------------------------------------------------------------

    def _fio_prepare(self, bs: int) -> Callable[[], None]:
        def run() -> None:
            path = os.path.join(self.root, f"fio-{_label(bs)}.dat")
            size = self.cfg.blocks_for(bs) * bs
            self.data.fio_startup_cpu[bs] = fio_mod.prepare_file(
                path, size, bs, self.cfg.fio_iodepth, self.cfg.step_timeout
            )
            self._fio_files[bs] = path

        return run

    def _cpool(self, bs: int) -> cpool_mod.CPool:
        return cpool_mod.CPool(
            self._cpool_exe, bs, self.cfg.cpool_threads, self._slots(bs), self.cfg.step_timeout
        )

    def _cpool_prepare(self, bs: int) -> Callable[[], None]:
        # The program's start-up CPU (taken off each pass's), as fio's.
        def run() -> None:
            root = os.path.join(self.root, f"cpool-startup-{_label(bs)}")
            os.makedirs(root)
            warm = make_keys(f"warmup/cpool-startup/{bs}", min(self.cfg.batch, 8))
            self.data.cpool_startup_cpu[bs] = self._cpool(bs).startup_cpu(root, warm)

        return run

    def _throughput(self, rnd: int, bs: int, impl: str) -> Callable[[], None]:
        def run() -> None:
            if impl == FIO:
                self._run_fio(bs)
            elif impl == SEED:
                self._run_seed(rnd, bs)
            elif impl == CPOOL:
                self._run_cpool(rnd, bs)
            else:
                self._run_kv(rnd, bs, impl)

        return run

    def _run_fio(self, bs: int) -> None:
        size = self.cfg.blocks_for(bs) * bs
        path = self._fio_files[bs]
        startup = self.data.fio_startup_cpu.get(bs, 0.0)
        for op, rw in (("store", "write"), ("load", "read")):
            sample = fio_mod.run_fio(
                path, rw, size, bs, self.cfg.fio_iodepth, startup, timeout=self.cfg.step_timeout
            )
            self.data.add(FIO, bs, op, sample)

    def _run_seed(self, rnd: int, bs: int) -> None:
        region = self.region(bs)
        keys = make_keys(f"{rnd}/{SEED}/{bs}", self.cfg.blocks_for(bs))
        bufs = [region.slot(i) for i in range(len(keys))]
        with SeedPool(self._dir(rnd, f"{SEED}-{_label(bs)}"), self.cfg.pool_threads) as pool:
            warm = warmup_keys(keys, min(self.cfg.batch, 8))
            pool.store_all(warm, bufs[: len(warm)])
            pool.load_all(warm, bufs[: len(warm)])
            for op in ("store", "load"):
                self.data.add(SEED, bs, op, pool.timed_phase(op, keys, bufs, bs))

    def _run_cpool(self, rnd: int, bs: int) -> None:
        keys = make_keys(f"{rnd}/{CPOOL}/{bs}", self.cfg.blocks_for(bs))
        warm = warmup_keys(keys, min(self.cfg.batch, 8))
        root = self._dir(rnd, f"{CPOOL}-{_label(bs)}")
        pool = self._cpool(bs)
        startup = self.data.cpool_startup_cpu.get(bs, {})
        for op in ("store", "load"):
            sample, stats = pool.phase(op, root, warm, keys, startup.get(op, 0.0))
            self.data.add(CPOOL, bs, op, sample)
            self.data.cpool_stats.setdefault(f"{_label(bs)}/{op}", []).append(stats)

    def _run_kv(self, rnd: int, bs: int, impl: str) -> None:
        cfg = self.cfg
        keys = make_keys(f"{rnd}/{impl}/{bs}", cfg.blocks_for(bs))
        session = kv_session(
            impl, self._dir(rnd, f"{impl}-{_label(bs)}"), keys, self.region(bs), cfg
        )
        self.data.add(impl, bs, "store", session.store)
        self.data.add(impl, bs, "load", session.load)
        for op, seconds in session.batch_seconds.items():
            self.data.batch_seconds.setdefault((impl, bs, op), []).extend(seconds)
        self.data.store_stats[f"{impl}/{_label(bs)}"] = session.stats

    def _latency(self, rnd: int, impl: str) -> Callable[[], None]:
        def run() -> None:
            cfg = self.cfg
            region = self.region(cfg.latency_block_size)
            root = self._dir(rnd, f"latency-{impl}")
            prefix = make_keys(f"lat/{rnd}/{impl}/prefix", cfg.latency_prefix)
            bg_keys = key_batches(f"lat/{rnd}/{impl}/bg", cfg.bg_batch)
            if impl == SEED:
                seconds, errors, bg_blocks = self._seed_latency(root, prefix, region, bg_keys)
            elif impl == CPOOL:
                bs = cfg.latency_block_size
                seconds, errors, bg_blocks = self._cpool(bs).latency(
                    root, prefix, cfg.latency_requests, cfg.bg_batch
                )
            else:
                result = kv_latency(impl, root, prefix, region, bg_keys, cfg)
                seconds, errors, bg_blocks = result.seconds, result.errors, result.bg_blocks
                self.data.store_stats[f"{impl}/latency"] = result.stats
            self.data.latency.setdefault(impl, []).extend(seconds)
            self.data.latency_errors[impl] = self.data.latency_errors.get(impl, 0) + errors
            self.data.latency_bg_blocks[impl] = self.data.latency_bg_blocks.get(impl, 0) + bg_blocks

        return run

    def _seed_latency(
        self, root: str, prefix: list[bytes], region: Region, bg_keys: Iterator[list[bytes]]
    ) -> tuple[list[float], int, int]:
        cfg = self.cfg
        prefix_bufs = region.views[: len(prefix)]
        bg_bufs = region.views[len(prefix) : len(prefix) + cfg.bg_batch]
        counted = _Counting(bg_keys, cfg.bg_batch)
        with SeedPool(root, cfg.pool_threads) as pool:
            pool.store_all(prefix, prefix_bufs)
            seconds, errors = pool.prefix_latency(
                prefix, prefix_bufs, counted, bg_bufs, cfg.latency_requests
            )
        return seconds, errors, counted.blocks


class _Counting:
    """Key-batch iterator that counts the blocks handed out (background stream volume)."""

    def __init__(self, inner: Iterator[list[bytes]], batch: int) -> None:
        self._inner = inner
        self._batch = batch
        self.blocks = 0

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> list[bytes]:
        self.blocks += self._batch
        return next(self._inner)


class _NoProgress:
    """What the runner calls on a progress bar, for --no-progress: tqdm is not needed."""

    def set_description(self, text: str) -> None:
        pass

    def update(self, steps: int) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, text: str, file: Any = None) -> None:
        print(text, file=file or sys.stderr)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise MissingExtra("tqdm", "or run with --no-progress") from exc
    return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)


def _missing_dependency(impl: str) -> str | None:
    if impl == FIO and fio_mod.fio_path() is None:
        return "fio is not on PATH"
    if impl == KV_UVLOOP:
        return missing("uvloop")
    return None


def make_root(parent: str) -> str:
    if not os.path.isdir(parent):
        raise BenchError(f"not a directory: {parent}")
    return tempfile.mkdtemp(prefix="kvuring-bench-", dir=parent)


def check_space(cfg: BenchConfig, root: str, impls: tuple[str, ...]) -> int:
    """Refuse to start a run that would fill the filesystem; returns the bytes it needs."""
    need = estimated_bytes(cfg, impls)
    free = shutil.disk_usage(root).free
    if need > free:
        raise BenchError(
            f"the run needs about {need / 1e9:.1f} GB in {root} but {free / 1e9:.1f} GB are "
            f"free (nothing is deleted until the end); lower --gib, --rounds or "
            f"--latency-requests"
        )
    return need
