"""Micro-benchmark: batched 64 KiB O_DIRECT reads through AsyncRing.

Compares the io_uring engine with the thread engine, each driven from
asyncio and from uvloop.  A preallocated file (random data, written once per
run) is read at random block-aligned offsets by ``--inflight`` reader tasks,
so that many reads are always in flight; every reader reads into its own
slice of one anonymous mmap (page aligned, as O_DIRECT needs).

The implementations are interleaved over ``--rounds`` rounds and the table
shows medians: ops/s, wall-clock microseconds per read, process CPU
microseconds per read (all threads, io-wq workers included), and
io_uring_enter calls per read.

    python benchmarks/micro_read.py                 # file in the current directory
    python benchmarks/micro_read.py --dir /mnt/nvme --seconds 5

The default run takes about 40 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from kvuring.aio import AsyncRing

IMPLEMENTATIONS: dict[str, tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = {
    "uring+asyncio": ("uring", asyncio.new_event_loop),
    "uring+uvloop": ("uring", uvloop.new_event_loop),
    "threads+asyncio": ("threads", asyncio.new_event_loop),
    "threads+uvloop": ("threads", uvloop.new_event_loop),
}


@dataclass
class Sample:
    ops: int
    seconds: float
    cpu_seconds: float
    enter_calls: int

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def us_per_op(self) -> float:
        return self.seconds / self.ops * 1e6

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu_seconds / self.ops * 1e6

    @property
    def enters_per_op(self) -> float:
        return self.enter_calls / self.ops


def cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def prepare_file(path: Path, size: int) -> None:
    """Write ``size`` bytes of random data once, in 4 MiB pieces, and flush them to disk."""
    chunk = 4 << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // chunk):
            os.write(fd, os.urandom(chunk))
        os.fsync(fd)
    finally:
        os.close(fd)


def open_for_reads(path: Path) -> tuple[int, bool]:
    """The file opened with O_DIRECT if the filesystem allows it; (fd, direct)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        return os.open(path, os.O_RDONLY), False


async def measure(
    backend: str,
    fd: int,
    region: mmap.mmap,
    *,
    block: int,
    blocks: int,
    inflight: int,
    seconds: float,
    warmup: float,
    seed: int,
) -> Sample:
    rng = random.Random(seed)
    views = [memoryview(region)[i * block : (i + 1) * block] for i in range(inflight)]
    count = 0
    running = True
    async with AsyncRing(backend=backend, queue_depth=max(64, inflight)) as ring:

        async def reader(view: memoryview) -> None:
            nonlocal count
            while running:
                n = await ring.read(fd, view, rng.randrange(blocks) * block)
                if n != block:
                    raise RuntimeError(f"short read: {n} of {block} bytes")
                count += 1

        tasks = [asyncio.ensure_future(reader(view)) for view in views]
        await asyncio.sleep(warmup)
        stats0, count0, cpu0, wall0 = ring.stats(), count, cpu_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        stats1, count1, cpu1, wall1 = ring.stats(), count, cpu_time(), time.perf_counter()
        running = False
        await asyncio.gather(*tasks)
    for view in views:
        view.release()
    return Sample(
        ops=count1 - count0,
        seconds=wall1 - wall0,
        cpu_seconds=cpu1 - cpu0,
        enter_calls=stats1["enter_calls"] - stats0["enter_calls"],
    )


def run_one(name: str, fd: int, region: mmap.mmap, args: argparse.Namespace, seed: int) -> Sample:
    backend, loop_factory = IMPLEMENTATIONS[name]
    loop = loop_factory()
    try:
        return loop.run_until_complete(
            measure(
                backend,
                fd,
                region,
                block=args.block_kib * 1024,
                blocks=args.size_mib * 1024 // args.block_kib,
                inflight=args.inflight,
                seconds=args.seconds,
                warmup=args.warmup,
                seed=seed,
            )
        )
    finally:
        loop.close()


def median_sample(samples: list[Sample]) -> dict[str, float]:
    return {
        "ops/s": statistics.median(s.ops_per_s for s in samples),
        "us/op": statistics.median(s.us_per_op for s in samples),
        "cpu us/op": statistics.median(s.cpu_us_per_op for s in samples),
        "enters/op": statistics.median(s.enters_per_op for s in samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the test file goes")
    parser.add_argument("--size-mib", type=int, default=256, help="test file size (MiB)")
    parser.add_argument("--block-kib", type=int, default=64, help="read size (KiB)")
    parser.add_argument("--inflight", type=int, default=64, help="concurrent readers")
    parser.add_argument("--seconds", type=float, default=2.5, help="measured time per round")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured time per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--impl", action="append", choices=list(IMPLEMENTATIONS), help="repeatable; default: all"
    )
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the test file")
    args = parser.parse_args(argv)
    names = args.impl or list(IMPLEMENTATIONS)

    path = args.dir / ".kvuring-micro-read.dat"
    size = args.size_mib << 20
    if not (args.keep and path.exists() and path.stat().st_size == size):
        print(f"writing {args.size_mib} MiB of random data to {path} ...", flush=True)
        prepare_file(path, size)
    fd, direct = open_for_reads(path)
    region = mmap.mmap(-1, args.inflight * args.block_kib * 1024)
    region[:] = bytes(len(region))  # fault the pages in before timing
    print(
        f"python {platform.python_version()}, kernel {platform.release()}, "
        f"{os.cpu_count()} CPUs; {args.block_kib} KiB reads, "
        f"{'O_DIRECT' if direct else 'buffered (no O_DIRECT here)'}, "
        f"{args.inflight} in flight, {args.rounds} rounds x {args.seconds:g} s",
        flush=True,
    )
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    try:
        for round_no in range(args.rounds):
            # Interleaved, and in a different order each round, so drift in
            # the machine's state does not favour one implementation.
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                sample = run_one(name, fd, region, args, seed=round_no)
                samples[name].append(sample)
                print(
                    f"  round {round_no + 1} {name:16s} {sample.ops_per_s:9.0f} ops/s",
                    flush=True,
                )
    finally:
        os.close(fd)
        region.close()
        if not args.keep:
            path.unlink()

    print()
    header = f"{'implementation':16s} {'ops/s':>9s} {'MB/s':>7s} {'us/op':>7s} "
    header += f"{'latency us':>10s} {'cpu us/op':>9s} {'enters/op':>9s}"
    print(header)
    print("-" * len(header))
    for name in names:
        m = median_sample(samples[name])
        mbps = m["ops/s"] * args.block_kib * 1024 / 1e6
        latency = args.inflight / m["ops/s"] * 1e6  # Little's law
        print(
            f"{name:16s} {m['ops/s']:9.0f} {mbps:7.0f} {m['us/op']:7.1f} {latency:10.0f} "
            f"{m['cpu us/op']:9.1f} {m['enters/op']:9.3f}"
        )
    print(
        "(medians of the rounds; us/op = wall time / reads, latency = in flight / throughput, "
        "cpu = whole process)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
