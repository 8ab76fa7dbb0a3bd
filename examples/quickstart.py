"""Store a batch of KV blocks, load them back, check them, and report throughput.

    python examples/quickstart.py                      # io_uring when available, asyncio loop
    python examples/quickstart.py --loop uvloop --backend threads --blocks 512

The store lives in a temporary directory on the disk of the current
directory (or of ``--dir``), so the numbers describe that disk; it is removed
on exit.  Exits 1 if any block fails to store or load, or loads wrong bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Coroutine
from typing import Any

from kvuring import BlockStore, Status, aligned_buffer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend",
        choices=("auto", "uring", "threads"),
        default=None,
        help="I/O engine (default: $KVURING_BACKEND, else auto)",
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--block-size", type=int, default=256 << 10, help="bytes per block (default 256 KiB)"
    )
    parser.add_argument("--blocks", type=int, default=256, help="blocks per batch (default 256)")
    parser.add_argument(
        "--dir", default=".", help="make the temporary store under this directory (default .)"
    )
    args = parser.parse_args(argv)
    if args.block_size <= 0 or args.blocks <= 0:
        parser.error("--block-size and --blocks must be positive")
    return args


def block_keys(count: int) -> list[bytes]:
    """Hash-like keys, as a serving engine's block hashes would be (32 bytes each)."""
    return [hashlib.sha256(b"quickstart block %d" % i).digest() for i in range(count)]


def rows(region: memoryview, block_size: int) -> list[memoryview]:
    """Block-sized rows of one aligned region; each row starts on a block boundary."""
    return [region[i : i + block_size] for i in range(0, len(region), block_size)]


def rate(nbytes: int, blocks: int, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    return f"{nbytes / seconds / 1e9:6.2f} GB/s  {blocks / seconds:9.0f} blocks/s  ({seconds * 1e3:.1f} ms)"


async def quickstart(args: argparse.Namespace) -> int:
    size, count = args.block_size, args.blocks
    keys = block_keys(count)

    # One page-aligned region per direction, sliced into rows: the layout a
    # serving engine's pinned KV staging buffer has, and safe for O_DIRECT.
    source = aligned_buffer(size * count)
    target = aligned_buffer(size * count)
    source[:] = os.urandom(size * count)
    src_rows = rows(memoryview(source), size)
    dst_rows = rows(memoryview(target), size)

    failed = False
    with tempfile.TemporaryDirectory(prefix="kvuring-quickstart-", dir=args.dir) as root:
        async with BlockStore(root, size, backend=args.backend) as store:
            start = time.perf_counter()
            stored = await store.put_many(keys, src_rows)
            put_s = time.perf_counter() - start

            start = time.perf_counter()
            loaded = await store.get_many(keys, dst_rows)
            get_s = time.perf_counter() - start

            # Storing the same blocks again finds them and leaves them alone.
            again = await store.put_many(keys[:8], src_rows[:8])
            stats = store.stats()

        print(f"temporary store: {os.path.abspath(root)}")
        print(f"{count} blocks of {size} bytes, engine {stats['engine']}, loop {args.loop}")
        print(f"put_many  {rate(size * count, count, put_s)}")
        print(f"get_many  {rate(size * count, count, get_s)}")

        not_stored = sum(s is not Status.STORED for s in stored)
        not_hit = sum(s is not Status.HIT for s in loaded)
        wrong = sum(a != b for a, b in zip(src_rows, dst_rows))
        if not_stored or not_hit or wrong:
            failed = True
            print(
                f"FAILED: {not_stored} not stored, {not_hit} not loaded, "
                f"{wrong} loaded with wrong bytes",
                file=sys.stderr,
            )
        else:
            print(f"all {count} blocks loaded intact")
        if any(s is not Status.EXISTS for s in again):
            failed = True
            print(f"FAILED: storing again gave {[s.value for s in again]}", file=sys.stderr)
        print("stats:", json.dumps(stats, indent=2))

    for view in (*src_rows, *dst_rows):
        view.release()
    source.close()
    target.close()
    return 1 if failed else 0


def run(main: Coroutine[Any, Any, int], loop_name: str) -> int:
    """Run ``main`` to completion on a fresh asyncio or uvloop event loop."""
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(run(quickstart(arguments), arguments.loop))
