"""The ``kvuring`` command: one subcommand per job (bench, info; scrub and gc to come)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvuring.bench import run_from_args

    return run_from_args(args)


def _cmd_info(args: argparse.Namespace) -> int:
    import kvuring

    print(f"kvuring {kvuring.__version__}")
    info = kvuring.backend_info()
    for key, value in info.items():
        if isinstance(value, dict):
            # Feature flags: list what is there, and what is missing.
            value = ", ".join(f"{k}{'' if v else ' (no)'}" for k, v in value.items())
        print(f"{key}: {value}")
    return 0


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvuring.bench.config import add_arguments

    parser = sub.add_parser(
        "bench",
        help="benchmark kvuring against thread pools (Python, C) and fio",
        description="Benchmark kvuring against the Python thread-pool seed, a C thread "
        "pool doing vLLM's per-block system calls, and fio. Needs the bench extra for "
        "its progress bar and chart: pip install 'kvuring[bench]'.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=_cmd_bench)


def _add_info(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("info", help="print the version and the I/O engine in use")
    parser.set_defaults(handler=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvuring", description="kvuring: an asyncio-native KV-cache block store on io_uring."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_bench, _add_info):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ImportError as exc:
        # An optional package a subcommand reached for without checking first:
        # name the extra that brings it rather than print a traceback.
        from kvuring.bench.extras import PURPOSE, MissingExtra

        top = (exc.name or "").partition(".")[0]
        if top not in PURPOSE:
            raise
        print(f"kvuring {args.command}: {MissingExtra(top)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
