"""results.json, results.md (embeddable in the README) and results.png."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from kvuring.bench.config import KV_IMPLS, OPS, format_size

_OP_TITLES = {"store": "Store (put_many)", "load": "Load (get_many)"}


def _clean(value: Any) -> Any:
    """NaN/inf become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(_clean(result), out, indent=2, default=str)
        out.write("\n")


# --- markdown ---------------------------------------------------------------


def _num(value: Any, digits: int = 2) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ratio(ratios: dict[str, float] | None, field: str) -> str:
    if not ratios or field not in ratios:
        return "—"
    return f"{ratios[field]:.2f}x"


def _engine_name(info: Any) -> str:
    # backend_info() is a dict with the engine's name and its feature flags.
    return str(info.get("engine", info)) if isinstance(info, dict) else str(info)


def _machine_line(result: dict[str, Any]) -> str:
    m = result["machine"]
    fs = m["filesystem"]
    return (
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
        f"{fs['type']} at {fs['mount_point'] or '?'}, Python {m['python']}, "
        f"kvuring {m['kvuring_version']} (engine: {_engine_name(m['kvuring_engine'])}), "
        f"{m['fio_version'] or 'no fio'}, {m['date']}."
    )


def _method_line(result: dict[str, Any]) -> str:
    c = result["config"]
    amount = format_size(c["bytes_per_size"]) if c["bytes_per_size"] % 1024 == 0 else "?"
    return (
        f"Medians of {c['rounds']} interleaved round(s), {amount} per block size, "
        f"implementation and round. kvuring: verify={c.get('verify', True)}, fixed_buffers={c.get('fixed_buffers', False)}, batches of {c['batch']} blocks, "
        f"{c['concurrency']} batches in flight. Seed: {c['pool_threads']}-thread pool, one "
        f"task per block. C pool: {c.get('cpool_threads', 16)} C threads, vLLM's FS tier's "
        f"system calls per block, one process per pass. "
        f"fio: io_uring, direct=1, iodepth={c['fio_iodepth']}, one "
        f"preallocated file. Every round stores new keys into fresh directories and loads "
        f"them back (O_DIRECT, so no page cache); an untimed warm-up precedes each pass. "
        f"GB = 10⁹ bytes. CPU = user+sys of the whole process (kernel io-wq workers "
        f"included); fio's and the C pool's from RUSAGE_CHILDREN, less their start-up."
    )


def _figure_table(result: dict[str, Any], op: str) -> list[str]:
    lines = [
        "| Block | Implementation | GB/s | blocks/s | CPU s/GB | GB/s x pool | "
        "CPU x pool | GB/s x C pool | CPU x C pool | GB/s x fio | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in result["results"]:
        if row["op"] != op:
            continue
        lines.append(
            f"| {format_size(row['block_size'])} | {row['impl']} | {_num(row['gb_per_s'])} | "
            f"{_num(row['blocks_per_s'], 0)} | {_num(row['cpu_s_per_gb'])} | "
            f"{_ratio(row.get('vs_pool'), 'gb_per_s')} | "
            f"{_ratio(row.get('vs_pool'), 'cpu_s_per_gb')} | "
            f"{_ratio(row.get('vs_cpool'), 'gb_per_s')} | "
            f"{_ratio(row.get('vs_cpool'), 'cpu_s_per_gb')} | "
            f"{_ratio(row.get('vs_fio'), 'gb_per_s')} | {row['errors']} |"
        )
    return lines


def _batch_table(result: dict[str, Any]) -> list[str]:
    if not any(row.get("batch_latency") for row in result["results"]):
        return ["(no kvuring implementation was measured)"]
    c = result["config"]
    lines = [
        f"Time per put_many/get_many call of {c['batch']} blocks, {c['concurrency']} calls "
        f"in flight (the throughput runs above).",
        "",
        "| Block | Implementation | Op | p50 ms | p99 ms | max ms | calls |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for row in result["results"]:
        lat = row.get("batch_latency")
        if lat:
            lines.append(
                f"| {format_size(row['block_size'])} | {row['impl']} | {row['op']} | "
                f"{_num(lat['p50_ms'])} | {_num(lat['p99_ms'])} | {_num(lat['max_ms'])} | "
                f"{lat['count']} |"
            )
    return lines


def _latency_table(result: dict[str, Any]) -> list[str]:
    lat = result["latency"]
    if not lat["impls"]:
        return ["(not run)"]
    lines = [
        f"get_prefix of {lat['prefix_blocks']} x {format_size(lat['block_size'])} per "
        f"request, back to back, while put_many batches of {lat['background_batch']} blocks "
        f"stream in the background (the pools: the same threads run both; the C pool "
        f"takes queued loads before queued stores).",
        "",
        "| Implementation | p50 ms | p99 ms | max ms | requests | background GB | errors |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for impl, row in lat["impls"].items():
        lines.append(
            f"| {impl} | {_num(row['p50_ms'])} | {_num(row['p99_ms'])} | "
            f"{_num(row['max_ms'])} | {row['count']} | {_num(row['background_gb'])} | "
            f"{row['errors']} |"
        )
    return lines


def _verdict(entry: dict[str, Any], applies: bool) -> str:
    if entry["ratio"] is None:
        return "not measured"
    shown = f"{entry['ratio']:.2f}x"
    if not applies:
        return f"n/a ({shown})"
    return f"{'met' if entry['met'] else 'not met'} ({shown})"


def _targets_table(result: dict[str, Any]) -> list[str]:
    impls = [i for i in result["impls"] if i in KV_IMPLS]
    if not impls:
        return ["(no kvuring implementation was measured)"]
    lines = [
        "| Target | Check | Applies here | " + " | ".join(impls) + " |",
        "|---|---|---|" + "---|" * len(impls),
    ]
    for row in result["targets"]:
        cells = [_verdict(row["results"][i], row["applies"]) for i in impls]
        lines.append(
            f"| {row['group']} | {row['check']} | {'yes' if row['applies'] else 'no'} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _footer(result: dict[str, Any]) -> list[str]:
    lines = []
    for impl, reason in result["unavailable"].items():
        lines.append(f"- {impl} not measured: {reason}")
    if result["data_kept"]:
        lines.append(f"- Data directories kept in `{result['data_dir']}`.")
    else:
        lines.append("- Data directories were deleted after the last round.")
    return lines


def markdown(result: dict[str, Any]) -> str:
    fs_type = result["machine"]["filesystem"]["type"]
    parts: list[str] = [
        "## kvuring benchmark",
        "",
        _machine_line(result),
        "",
        _method_line(result),
    ]
    for op in OPS:
        parts += ["", f"### {_OP_TITLES[op]}", "", *_figure_table(result, op)]
    parts += ["", "### kvuring per call", "", *_batch_table(result)]
    parts += ["", "### Prefix load under background stores", "", *_latency_table(result)]
    parts += [
        "",
        f"### Targets (directory on {fs_type}; ratios are kvuring ÷ reference)",
        "",
        *_targets_table(result),
        "",
        *_footer(result),
    ]
    return "\n".join(parts) + "\n"


# --- chart ------------------------------------------------------------------


def _series(
    result: dict[str, Any], op: str, impl: str, sizes: list[int], field: str
) -> list[float]:
    index = {(r["impl"], r["block_size"]): r for r in result["results"] if r["op"] == op}
    return [float(index[(impl, bs)][field]) if (impl, bs) in index else math.nan for bs in sizes]


def write_chart(result: dict[str, Any], path: str) -> None:
    # The object API with Agg: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = list(result["config"]["block_sizes"])
    impls = list(result["impls"])
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(impls), 1)
    colors = [f"C{i}" for i in range(len(impls))]
    for ax, op in zip(axes, OPS, strict=True):
        cpu_ax = ax.twinx()
        for n, impl in enumerate(impls):
            xs = [i - 0.4 + width * (n + 0.5) for i in range(len(sizes))]
            ax.bar(
                xs,
                _series(result, op, impl, sizes, "gb_per_s"),
                width,
                color=colors[n],
                label=impl if op == OPS[0] else None,
            )
            # Black-edged so a circle stays visible on top of its own bar.
            cpu = [
                v if v > 0 else math.nan for v in _series(result, op, impl, sizes, "cpu_s_per_gb")
            ]
            cpu_ax.plot(
                xs,
                cpu,
                "o",
                markerfacecolor=colors[n],
                markeredgecolor="black",
                markeredgewidth=1.5,
                markersize=9,
            )
        ax.set_xticks(range(len(sizes)), [format_size(bs) for bs in sizes])
        ax.set_title(_OP_TITLES[op])
        ax.set_xlabel("block size")
        ax.set_ylabel("GB/s (bars)")
        # CPU per GB spans orders of magnitude between 64 KiB and 2 MiB.
        cpu_ax.set_yscale("log")
        cpu_ax.set_ylabel("CPU seconds per GB (circles, log scale)")
    fig.legend(loc="outside lower center", ncols=max(len(impls), 1))
    fs = result["machine"]["filesystem"]["type"]
    fig.suptitle(
        f"kvuring benchmark ({fs}, {result['machine']['nproc']} CPUs, "
        f"medians of {result['config']['rounds']} rounds)"
    )
    fig.savefig(path, dpi=110)


def write_reports(result: dict[str, Any], out_dir: str) -> tuple[dict[str, str], dict[str, str]]:
    """Write all three files: the paths written by kind, and why any kind was not written.

    The chart needs matplotlib (the ``bench`` extra); without it the other two
    are still written and the reason is returned under ``png``.
    """
    from kvuring.bench.extras import BENCH_EXTRA

    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "md": os.path.join(out_dir, "results.md"),
        "png": os.path.join(out_dir, "results.png"),
    }
    skipped: dict[str, str] = {}
    write_json(result, paths["json"])
    with open(paths["md"], "w", encoding="utf-8") as out:
        out.write(markdown(result))
    try:
        write_chart(result, paths["png"])
    except ImportError as exc:
        del paths["png"]
        skipped["png"] = f"not written: matplotlib cannot be imported ({exc}); {BENCH_EXTRA}"
    return paths, skipped
