"""What kvuring costs the caller's thread: CPU per block on the event loop's thread.

A serving engine calls kvuring from its scheduler's thread; whatever runs
there (Python, and C called from it) is time the scheduler does not get.
This stores and then repeatedly loads ``--blocks`` blocks in batches of
``--batch`` (all batches in flight at once, as a prefix load does) and reports
``time.thread_time()`` of the loop's thread per block, for each engine, with
and without checksums, next to blocks/s.

``--rows`` uses ``put_rows``/``get_rows`` (rows of one region by index)
instead of a list of buffers.  With the thread engine every syscall, copy and checksum
runs on the engine's workers, so its rows are an upper bound on the Python
(and cffi) time per block: the rest of the loop thread's time is the block
core's C and the eventfd/epoll wake-ups.

    python benchmarks/caller_thread.py --dir /dev/shm
    python benchmarks/caller_thread.py --dir /mnt/nvme --block 2M
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time

from kvuring import BlockStore, Status, aligned_buffer


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


async def _measure(
    root: str, args: argparse.Namespace, backend: str, verify: bool
) -> dict[str, float]:
    bs, n, batch = args.block, args.blocks, args.batch
    region = aligned_buffer(n * bs)
    view = memoryview(region)
    view[:] = os.urandom(1 << 20) * (n * bs >> 20) if n * bs >= 1 << 20 else os.urandom(n * bs)
    rows = [view[i * bs : (i + 1) * bs] for i in range(n)]
    keys = [os.urandom(16) for _ in range(n)]
    out: dict[str, list[float]] = {"store_us": [], "load_us": [], "stores_s": [], "loads_s": []}
    async with BlockStore(root, bs, backend=backend, verify=verify) as store:
        for _ in range(args.rounds):
            for kind in ("store", "load"):
                t0, c0 = time.perf_counter(), time.thread_time()
                if args.rows:
                    # One staging region, rows by index: no buffer export per block.
                    by_rows = store.put_rows if kind == "store" else store.get_rows
                    calls = [by_rows(keys[i : i + batch], view, range(i, min(i + batch, n)))
                             for i in range(0, n, batch)]  # fmt: skip
                else:
                    call = store.put_many if kind == "store" else store.get_many
                    calls = [
                        call(keys[i : i + batch], rows[i : i + batch]) for i in range(0, n, batch)
                    ]
                results = await asyncio.gather(*calls)
                wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                want = Status.HIT if kind == "load" else Status.STORED
                assert all(s in (want, Status.EXISTS) for r in results for s in r)
                out[f"{kind}_us"].append(cpu / n * 1e6)
                out[f"{kind}s_s"].append(n / wall)
            await store.delete_many(keys)
        engine = store.stats()["engine"]
    del rows, view
    region.close()
    return {"engine": engine, **{k: statistics.median(v) for k, v in out.items()}}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="where the blocks go (a fresh subdirectory)")
    parser.add_argument("--block", type=_size, default=64 << 10, help="block size (64K)")
    parser.add_argument("--blocks", type=int, default=4096, help="blocks per pass (4096)")
    parser.add_argument("--batch", type=int, default=64, help="blocks per call (64)")
    parser.add_argument("--rounds", type=int, default=5, help="passes; medians reported (5)")
    parser.add_argument("--rows", action="store_true",
                        help="put_rows/get_rows of one region instead of a list of buffers")  # fmt: skip
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="kvuring-caller-", dir=args.dir)
    try:
        how = "put_rows/get_rows" if args.rows else "put_many/get_many"
        print(f"{args.blocks} blocks of {args.block} bytes, {how} of {args.batch}, {root}")
        print(
            "| engine | verify | store: loop-thread us/block | stores/s | load: loop-thread us/block | loads/s |"
        )
        print("|---|---|--:|--:|--:|--:|")
        for backend in ("uring", "threads"):
            for verify in (True, False):
                r = asyncio.run(_measure(root, args, backend, verify))
                print(f"| {r['engine']} | {verify} | {r['store_us']:.1f} | {r['stores_s']:,.0f} "
                      f"| {r['load_us']:.1f} | {r['loads_s']:,.0f} |")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
