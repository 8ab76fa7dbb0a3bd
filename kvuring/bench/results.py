"""Turn collected samples into the results document (what results.json holds)."""

from __future__ import annotations

import math
from typing import Any

from kvuring.bench.config import CPOOL, FIO, OPS, SEED, BenchConfig
from kvuring.bench.measure import GB, latency_summary, summarize
from kvuring.bench.runner import Collected
from kvuring.bench.targets import evaluate

SCHEMA = 1
_RATIO_FIELDS = ("gb_per_s", "blocks_per_s", "cpu_s_per_gb")


def _ratios(mine: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, float] | None:
    if ref is None:
        return None
    return {f: mine[f] / ref[f] for f in _RATIO_FIELDS if ref[f]}


def _figures(cfg: BenchConfig, data: Collected) -> list[dict[str, Any]]:
    rows = []
    for bs in cfg.block_sizes:
        for op in OPS:
            summaries = {
                impl: summarize(data.samples[(impl, bs, op)])
                for impl in cfg.impls
                if (impl, bs, op) in data.samples
            }
            for impl, summary in summaries.items():
                row: dict[str, Any] = {"impl": impl, "block_size": bs, "op": op, **summary}
                if impl != SEED:
                    row["vs_pool"] = _ratios(summary, summaries.get(SEED))
                if impl != CPOOL:
                    row["vs_cpool"] = _ratios(summary, summaries.get(CPOOL))
                if impl != FIO:
                    row["vs_fio"] = _ratios(summary, summaries.get(FIO))
                batch = data.batch_seconds.get((impl, bs, op))
                if batch:
                    row["batch_latency"] = latency_summary(batch)
                rows.append(row)
    return rows


def _latency(cfg: BenchConfig, data: Collected) -> dict[str, Any]:
    per_impl = {}
    for impl, seconds in data.latency.items():
        bg_blocks = data.latency_bg_blocks.get(impl, 0)
        per_impl[impl] = {
            **latency_summary(seconds),
            "errors": data.latency_errors.get(impl, 0),
            "background_blocks": bg_blocks,
            "background_gb": bg_blocks * cfg.latency_block_size / GB,
        }
    return {
        "block_size": cfg.latency_block_size,
        "prefix_blocks": cfg.latency_prefix,
        "requests_per_round": cfg.latency_requests,
        "background_batch": cfg.bg_batch,
        "impls": per_impl,
    }


def _lookup(figures: list[dict[str, Any]], latency: dict[str, Any]) -> tuple[Any, Any]:
    index = {(r["impl"], r["block_size"], r["op"]): r for r in figures}

    def fig(impl: str, bs: int, op: str, field: str) -> float | None:
        row = index.get((impl, bs, op))
        return None if row is None else _finite(row[field])

    def lat(impl: str, field: str) -> float | None:
        row = latency["impls"].get(impl)
        return None if row is None else _finite(row[field])

    return fig, lat


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def build_result(
    cfg: BenchConfig,
    data: Collected,
    machine: dict[str, Any],
    data_dir: str,
    kept: bool,
) -> dict[str, Any]:
    figures = _figures(cfg, data)
    latency = _latency(cfg, data)
    fig, lat = _lookup(figures, latency)
    measured = sorted({r["impl"] for r in figures} | set(latency["impls"]), key=cfg.impls.index)
    return {
        "schema": SCHEMA,
        "machine": machine,
        "config": cfg.as_json(),
        "impls": measured,
        "unavailable": data.unavailable,
        "results": figures,
        "latency": latency,
        "targets": evaluate(fig, lat, machine["filesystem"]["type"], measured),
        "fio_startup_cpu_s": {str(k): v for k, v in data.fio_startup_cpu.items()},
        "cpool_startup_cpu_s": {str(k): v for k, v in data.cpool_startup_cpu.items()},
        "cpool_stats": data.cpool_stats,
        "store_stats": data.store_stats,
        "data_dir": data_dir,
        "data_kept": kept,
    }
