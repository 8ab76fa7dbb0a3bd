"""kvuring under test: one store per session, driven in batches from concurrent coroutines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvuring import BlockStore, Status
from kvuring.bench.config import KV_THREADS, KV_UVLOOP, BenchConfig
from kvuring.bench.measure import Sample, Stopwatch
from kvuring.bench.workload import Region, warmup_keys

T = TypeVar("T")
_BatchOp = Callable[[Sequence[bytes], Sequence[memoryview]], Awaitable[list[Status]]]


@dataclass
class KvSession:
    """What one store-then-load session of one kvuring implementation measured."""

    store: Sample
    load: Sample
    # Seconds per put_many/get_many call, the granularity the caller sees.
    batch_seconds: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class KvLatency:
    seconds: list[float]
    errors: int
    bg_blocks: int
    stats: dict[str, Any] = field(default_factory=dict)


def backend_of(impl: str) -> str:
    return "threads" if impl == KV_THREADS else "uring"


class StepTimeout(TimeoutError):
    """A kvuring session did not finish in time (a hang, most likely)."""


# Loops whose work hung and could not be cancelled.  Held so that garbage
# collection does not destroy their pending tasks mid-run (noisy, and the
# kernel may still own their buffers); the process exits with them.
_abandoned: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = []


def _new_loop(impl: str) -> asyncio.AbstractEventLoop:
    if impl == KV_UVLOOP:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    # As asyncio.run does: tasks a session left behind end before the loop does.
    leftovers = asyncio.all_tasks(loop)
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))


def run_on_loop(impl: str, make: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T:
    """Run a coroutine on a new event loop of the kind ``impl`` names, then close it.

    After ``timeout`` seconds the coroutine is cancelled; if it does not end
    even then, its loop is abandoned so the benchmark can go on without it.
    """
    loop = _new_loop(impl)
    task = loop.create_task(make())
    for grace in (timeout, 5.0):
        loop.run_until_complete(asyncio.wait({task}, timeout=grace))
        if task.done():
            break
        task.cancel()
    if not task.done():
        _abandoned.append((loop, task))
        raise StepTimeout(f"{impl} did not finish within {timeout:.0f} s and ignored cancel")
    try:
        if task.cancelled():
            raise StepTimeout(f"{impl} did not finish within {timeout:.0f} s")
        return task.result()
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


async def _drive(
    op: _BatchOp,
    ok: Status,
    keys: Sequence[bytes],
    region: Region,
    batch: int,
    concurrency: int,
) -> tuple[int, list[float]]:
    """Move ``keys`` in batches, ``concurrency`` batches in flight; returns (errors, per-batch s).

    Each coroutine owns its own ``batch`` slots of the region, so no two
    requests in flight ever share a buffer (a load verifies what it read).
    """
    starts = iter(range(0, len(keys), batch))
    errors = 0
    seconds: list[float] = []

    async def worker(index: int) -> None:
        nonlocal errors
        slots = region.views[index * batch : (index + 1) * batch]
        # The shared iterator hands each batch to exactly one coroutine.
        for start in starts:
            chunk = keys[start : start + batch]
            t0 = time.perf_counter()
            statuses = await op(chunk, slots[: len(chunk)])
            seconds.append(time.perf_counter() - t0)
            errors += sum(s != ok for s in statuses)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return errors, seconds


async def _timed(
    op: _BatchOp, ok: Status, keys: Sequence[bytes], region: Region, batch: int, concurrency: int
) -> tuple[Sample, list[float]]:
    with Stopwatch() as sw:
        errors, seconds = await _drive(op, ok, keys, region, batch, concurrency)
    return sw.sample(len(keys) * region.block_size, len(keys), errors), seconds


def _store(impl: str, root: str, block_size: int, cfg: BenchConfig) -> BlockStore:
    """kvuring's store as the benchmark configures it."""
    return BlockStore(
        root,
        block_size,
        backend=backend_of(impl),
        verify=cfg.verify,
        queue_depth=cfg.queue_depth,
        fixed_buffers=cfg.fixed_buffers,
        io_timeout=cfg.io_timeout,
        durable=cfg.durable,
        capacity_bytes=cfg.capacity,
    )


async def _session(
    impl: str,
    root: str,
    keys: Sequence[bytes],
    region: Region,
    batch: int,
    concurrency: int,
    cfg: BenchConfig,
) -> KvSession:
    async with _store(impl, root, region.block_size, cfg) as store:
        # Untimed: whatever the store sets up on first use (directories,
        # buffer registration) belongs to a long-lived store, not to this pass.
        warm = warmup_keys(keys, min(batch, 8))
        await store.put_many(warm, region.views[: len(warm)])
        await store.get_many(warm, region.views[: len(warm)])
        shape = (keys, region, batch, concurrency)
        stored, put_s = await _timed(store.put_many, Status.STORED, *shape)
        if cfg.capacity is not None:
            # With a budget a load bumps its block's mtime (its recency), except
            # for blocks stored in the same second: let that second pass, so the
            # loads pay for the bumps as loads of older blocks do.
            await asyncio.sleep(1.1)
        loaded, get_s = await _timed(store.get_many, Status.HIT, *shape)
        stats = store.stats()
    return KvSession(stored, loaded, {"store": put_s, "load": get_s}, stats)


def kv_session(
    impl: str, root: str, keys: Sequence[bytes], region: Region, cfg: BenchConfig
) -> KvSession:
    """Store ``keys`` into a fresh store at ``root``, then load them back; both timed."""
    batch = cfg.batch
    # More coroutines than the region has batches of slots would share buffers.
    concurrency = max(1, min(cfg.concurrency, len(region.views) // batch))
    return run_on_loop(
        impl,
        lambda: _session(impl, root, keys, region, batch, concurrency, cfg),
        cfg.step_timeout,
    )


async def _latency(
    impl: str,
    root: str,
    prefix: Sequence[bytes],
    region: Region,
    bg_keys: Iterator[list[bytes]],
    cfg: BenchConfig,
) -> KvLatency:
    bg_batch, requests = cfg.bg_batch, cfg.latency_requests
    prefix_bufs = region.views[: len(prefix)]
    bg_bufs = region.views[len(prefix) : len(prefix) + bg_batch]
    async with _store(impl, root, region.block_size, cfg) as store:
        await store.put_many(prefix, prefix_bufs)
        stop = asyncio.Event()
        bg_blocks = 0

        async def background() -> None:
            nonlocal bg_blocks
            while not stop.is_set():
                await store.put_many(next(bg_keys), bg_bufs)
                bg_blocks += bg_batch

        task = asyncio.ensure_future(background())
        await asyncio.sleep(0)  # let the stream's first put_many reach the store
        seconds: list[float] = []
        errors = 0
        try:
            for _ in range(requests):
                t0 = time.perf_counter()
                hits = await store.get_prefix(prefix, prefix_bufs)
                seconds.append(time.perf_counter() - t0)
                errors += hits != len(prefix)
        finally:
            stop.set()
            await task
        stats = store.stats()
    return KvLatency(seconds, errors, bg_blocks, stats)


def kv_latency(
    impl: str,
    root: str,
    prefix: Sequence[bytes],
    region: Region,
    bg_keys: Iterator[list[bytes]],
    cfg: BenchConfig,
) -> KvLatency:
    """p50/p99 material: per-request get_prefix time while put_many streams in the background."""
    return run_on_loop(
        impl,
        lambda: _latency(impl, root, prefix, region, bg_keys, cfg),
        cfg.step_timeout,
    )
