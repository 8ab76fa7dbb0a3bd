"""``python -m kvuring.bench``: kvuring against the thread-pool seed, the C pool and fio.

Only argument handling is imported here; the benchmark's modules load when
it runs, so the ``kvuring`` command stays quick for other subcommands.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any

from kvuring.bench.config import BenchConfig, add_arguments, config_from_args

__all__ = [
    "BenchConfig",
    "add_arguments",
    "check_extras",
    "main",
    "run_benchmark",
    "run_from_args",
]


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run every step of the benchmark and return the results document."""
    from kvuring.bench.machine import machine_info
    from kvuring.bench.results import build_result
    from kvuring.bench.runner import Runner, check_space, make_root

    root = make_root(cfg.parent_dir)
    try:
        runner = Runner(cfg, root)
        need = check_space(cfg, root, runner.impls)
        if cfg.progress:
            print(
                f"kvuring bench: up to {need / 1e9:.1f} GB of data in {root}, "
                f"{'kept' if cfg.keep else 'deleted'} at the end",
                file=sys.stderr,
            )
        data = runner.run()
        return build_result(cfg, data, machine_info(root), root, cfg.keep)
    finally:
        if not cfg.keep:
            if cfg.progress:
                print(f"removing {root} ...", file=sys.stderr)
            shutil.rmtree(root, ignore_errors=True)


def check_extras(cfg: BenchConfig, impls_named: bool) -> str | None:
    """Before any work: why the run cannot go on (exit 2), or None; notes go to stderr.

    tqdm is needed only for the progress bar, uvloop only for kvuring-uvloop
    (skipped unless named in --impls), matplotlib only for the chart.
    """
    from kvuring.bench.config import KV_UVLOOP
    from kvuring.bench.extras import MissingExtra, missing

    if cfg.progress and missing("tqdm"):
        return str(MissingExtra("tqdm", "or run with --no-progress"))
    if KV_UVLOOP in cfg.impls and (why := missing("uvloop")):
        if impls_named:
            return str(MissingExtra("uvloop", f"or leave {KV_UVLOOP} out of --impls"))
        print(f"kvuring bench: {KV_UVLOOP} is skipped: {why}", file=sys.stderr)
    if why := missing("matplotlib"):
        print(f"kvuring bench: no chart (results.png): {why}", file=sys.stderr)
    return None


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed options, write the reports, print the markdown; the exit status."""
    from kvuring.bench.extras import MissingExtra
    from kvuring.bench.report import markdown, write_reports
    from kvuring.bench.runner import BenchError

    cfg = config_from_args(args)
    if not cfg.close_check:
        os.environ["KVURING_CLOSE_CHECK"] = "0"  # read when each store opens
    problem = check_extras(cfg, impls_named=args.impls is not None)
    if problem:
        print(f"kvuring bench: {problem}", file=sys.stderr)
        return 2
    try:
        result = run_benchmark(cfg)
    except (BenchError, MissingExtra) as exc:
        print(f"kvuring bench: {exc}", file=sys.stderr)
        return 2
    paths, skipped = write_reports(result, cfg.out_dir)
    print(markdown(result))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    for kind, reason in skipped.items():
        print(f"{kind}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvuring.bench",
        description="Benchmark kvuring against thread-pool block stores (Python, C) and fio.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
