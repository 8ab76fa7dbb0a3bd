"""``python -m kvuring.bench``: kvuring against the thread-pool seed and fio.

Only argument handling is imported here; the benchmark's modules load when
it runs, so the ``kvuring`` command stays quick for other subcommands.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from kvuring.bench.config import BenchConfig, add_arguments, config_from_args

__all__ = ["BenchConfig", "add_arguments", "main", "run_benchmark", "run_from_args"]


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


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed options, write the reports, print the markdown; the exit status."""
    from kvuring.bench.report import markdown, write_reports
    from kvuring.bench.runner import BenchError

    cfg = config_from_args(args)
    try:
        result = run_benchmark(cfg)
    except BenchError as exc:
        print(f"kvuring bench: {exc}", file=sys.stderr)
        return 2
    paths = write_reports(result, cfg.out_dir)
    print(markdown(result))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvuring.bench",
        description="Benchmark kvuring against a thread-pool block store and fio.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
