"""Benchmark settings: the dataclass the runner reads and the argparse options that fill it.

This module imports nothing heavy, so ``kvuring --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

KV_ASYNCIO = "kvuring-asyncio"
KV_UVLOOP = "kvuring-uvloop"
KV_THREADS = "kvuring-threads"
SEED = "seed-pool"
CPOOL = "cpool"
FIO = "fio"
KV_IMPLS: tuple[str, ...] = (KV_ASYNCIO, KV_UVLOOP, KV_THREADS)
ALL_IMPLS: tuple[str, ...] = (*KV_IMPLS, SEED, CPOOL, FIO)
# fio has no key/value layer, so it has no prefix-load figure.
LATENCY_IMPLS: tuple[str, ...] = (*KV_IMPLS, SEED, CPOOL)

OPS: tuple[str, ...] = ("store", "load")


@dataclass(frozen=True)
class BenchConfig:
    parent_dir: str
    out_dir: str
    block_sizes: tuple[int, ...]
    bytes_per_size: int
    rounds: int
    batch: int
    concurrency: int
    pool_threads: int
    cpool_threads: int
    queue_depth: int
    fio_iodepth: int
    impls: tuple[str, ...]
    latency: bool
    latency_block_size: int
    latency_prefix: int
    latency_requests: int
    bg_batch: int
    step_timeout: float
    keep: bool
    smoke: bool
    verify: bool
    fixed_buffers: bool
    progress: bool
    io_timeout: float | None = 30.0
    close_check: bool = True
    durable: bool = False
    capacity: int | None = None

    def blocks_for(self, block_size: int) -> int:
        """Blocks per round and block size: at least ``bytes_per_size`` bytes, rounded up."""
        return max(1, -(-self.bytes_per_size // block_size))

    def as_json(self) -> dict[str, Any]:
        return {
            "parent_dir": self.parent_dir,
            "block_sizes": list(self.block_sizes),
            "bytes_per_size": self.bytes_per_size,
            "rounds": self.rounds,
            "batch": self.batch,
            "concurrency": self.concurrency,
            "pool_threads": self.pool_threads,
            "cpool_threads": self.cpool_threads,
            "queue_depth": self.queue_depth,
            "fio_iodepth": self.fio_iodepth,
            "impls": list(self.impls),
            "latency": self.latency,
            "latency_block_size": self.latency_block_size,
            "latency_prefix": self.latency_prefix,
            "latency_requests": self.latency_requests,
            "bg_batch": self.bg_batch,
            "step_timeout": self.step_timeout,
            "verify": self.verify,
            "fixed_buffers": self.fixed_buffers,
            "io_timeout": self.io_timeout,
            "close_check": self.close_check,
            "durable": self.durable,
            "capacity": self.capacity,
            "smoke": self.smoke,
        }


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB}


def parse_size(text: str) -> int:
    """'64K', '64KiB', '2M', '65536' -> bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64K, 256K, 2M)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0 or value % 4096:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 4 KiB: {text!r}")
    return value


def _size_list(text: str) -> tuple[int, ...]:
    return tuple(parse_size(part) for part in text.split(",") if part.strip())


def _impl_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in ALL_IMPLS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown implementation(s) {unknown}; choose from {', '.join(ALL_IMPLS)}"
        )
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def _timeout(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    return _positive_float(text)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def format_size(nbytes: int) -> str:
    """65536 -> '64 KiB', 2097152 -> '2 MiB'."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit} {name}"
    return f"{nbytes} B"


# Values an option takes when it is not given; --smoke swaps in the second column
# so a CI run finishes in seconds while any explicit flag still wins.
_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "sizes": ((64 * KIB, 256 * KIB, 2 * MIB), (64 * KIB,)),
    "gib": (1.0, 8 / 1024),
    "rounds": (3, 1),
    "batch": (64, 16),
    "concurrency": (8, 4),
    "latency_block": (2 * MIB, 64 * KIB),
    "latency_requests": (50, 8),
    "step_timeout": (1200.0, 30.0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by ``kvuring bench`` and ``python -m kvuring.bench``."""
    add = parser.add_argument
    add(
        "--dir",
        default=None,
        help="directory to benchmark in; a fresh subdirectory is made inside it "
        "(default: the current directory's disk)",
    )
    add("--out", default="bench-results", help="where results.json/.md/.png go (%(default)s)")
    add(
        "--sizes",
        type=_size_list,
        default=None,
        help="comma-separated block sizes (default 64K,256K,2M; smoke: 64K)",
    )
    add(
        "--gib",
        type=_positive_float,
        default=None,
        help="GiB moved per block size, implementation and round (default 1; smoke: 1/128)",
    )
    add(
        "--rounds",
        type=_positive_int,
        default=None,
        help="interleaved rounds (default 3; smoke: 1)",
    )
    add(
        "--batch",
        type=_positive_int,
        default=None,
        help="blocks per put_many/get_many (default 64; smoke: 16)",
    )
    add(
        "--concurrency",
        type=_positive_int,
        default=None,
        help="batches in flight from concurrent coroutines (default 8; smoke: 4)",
    )
    add("--threads", type=_positive_int, default=16, help="seed thread-pool size (%(default)s)")
    add(
        "--cpool-threads",
        type=_positive_int,
        default=16,
        help="threads of the C pool (cpool) (%(default)s)",
    )
    add(
        "--queue-depth",
        type=_positive_int,
        default=256,
        help="kvuring BlockStore queue_depth (%(default)s)",
    )
    add("--fio-iodepth", type=_positive_int, default=32, help="fio iodepth (%(default)s)")
    add(
        "--impls",
        type=_impl_list,
        default=None,
        help=f"comma-separated subset of {','.join(ALL_IMPLS)} (default: all)",
    )
    add("--no-latency", action="store_true", help="skip the prefix-load-under-stores test")
    add(
        "--no-verify",
        action="store_true",
        help="kvuring with verify=False (raw .bin files, no checksum), to separate its cost",
    )
    add(
        "--fixed-buffers",
        action="store_true",
        help="kvuring with fixed_buffers=True (registered buffers, READ/WRITE_FIXED)",
    )
    add(
        "--io-timeout",
        type=_timeout,
        default=30.0,
        help="kvuring's io_timeout in seconds, or 'none' for no deadlines (%(default)s)",
    )
    add(
        "--durable",
        action="store_true",
        help="kvuring with durable=True (fsync of the data before the rename, of the "
        "directory after)",
    )
    add(
        "--capacity",
        type=parse_size,
        default=None,
        metavar="BYTES",
        help="kvuring with capacity_bytes=BYTES (a disk budget with LRU eviction; "
        "smaller than what a run writes makes every store evict)",
    )
    add(
        "--no-close-check",
        action="store_true",
        help="stores close their temp file as a direct descriptor (no flush, so no close "
        "errors seen), to measure what the close check costs",
    )
    add(
        "--latency-block",
        type=parse_size,
        default=None,
        help="block size of the latency test (default 2M; smoke: 64K)",
    )
    add(
        "--latency-prefix",
        type=_positive_int,
        default=16,
        help="blocks per get_prefix request (%(default)s)",
    )
    add(
        "--latency-requests",
        type=_positive_int,
        default=None,
        help="prefix requests per implementation and round (default 50; smoke: 8)",
    )
    add(
        "--bg-batch",
        type=_positive_int,
        default=16,
        help="blocks per background put_many in the latency test (%(default)s)",
    )
    add(
        "--step-timeout",
        type=_positive_float,
        default=None,
        help="seconds one kvuring session or fio run may take before it is dropped as hung "
        "(default 1200; smoke: 30)",
    )
    add("--keep", action="store_true", help="keep the benchmark's data directories")
    add("--no-progress", action="store_true", help="no progress bar")
    add(
        "--smoke",
        action="store_true",
        help="a few seconds in total: tiny amounts, 1 round, 64 KiB (for CI)",
    )


def _pick(args: argparse.Namespace, dest: str, key: str | None = None) -> Any:
    value = getattr(args, dest)
    if value is not None:
        return value
    normal, smoke = _DEFAULTS[key or dest]
    return smoke if args.smoke else normal


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    gib: float = _pick(args, "gib")
    return BenchConfig(
        parent_dir=os.path.abspath(args.dir or os.getcwd()),
        out_dir=os.path.abspath(args.out),
        block_sizes=tuple(_pick(args, "sizes")),
        bytes_per_size=max(4096, int(gib * GIB)),
        rounds=_pick(args, "rounds"),
        batch=_pick(args, "batch"),
        concurrency=_pick(args, "concurrency"),
        pool_threads=args.threads,
        cpool_threads=args.cpool_threads,
        queue_depth=args.queue_depth,
        fio_iodepth=args.fio_iodepth,
        impls=tuple(args.impls or ALL_IMPLS),
        latency=not args.no_latency,
        latency_block_size=_pick(args, "latency_block"),
        latency_prefix=args.latency_prefix,
        latency_requests=_pick(args, "latency_requests"),
        bg_batch=args.bg_batch,
        step_timeout=_pick(args, "step_timeout"),
        keep=args.keep,
        smoke=args.smoke,
        verify=not args.no_verify,
        fixed_buffers=args.fixed_buffers,
        io_timeout=args.io_timeout,
        close_check=not args.no_close_check,
        durable=args.durable,
        capacity=args.capacity,
        progress=not args.no_progress,
    )
