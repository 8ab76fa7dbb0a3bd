"""The baseline: the block store as vLLM first shipped it.

A ``ThreadPoolExecutor`` of 16 threads runs one synchronous Python function
per block.  Kept deliberately as it was (makedirs per store, exists check,
temp file + rename, O_DIRECT), because this is what kvuring must beat.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from kvuring.bench.measure import Sample, Stopwatch

_STORE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT
_LOAD_FLAGS = os.O_RDONLY | os.O_DIRECT

_local = threading.local()

_BlockFn = Callable[[str, bytes, memoryview], bool]


def block_path(root: str, key: bytes) -> str:
    name = key.hex()
    return os.path.join(root, name[0:3], name[3:5], name + ".bin")


def _thread_suffix() -> str:
    # Random per thread, so two threads storing the same key never share a temp file.
    suffix: str | None = getattr(_local, "suffix", None)
    if suffix is None:
        suffix = _local.suffix = secrets.token_hex(8)
    return suffix


def store_block(root: str, key: bytes, buf: memoryview) -> bool:
    """Write one block; True if stored or already there, False on failure."""
    path = block_path(root, key)
    if os.path.exists(path):
        return True
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{_thread_suffix()}.tmp"
    try:
        fd = os.open(tmp, _STORE_FLAGS, 0o644)
        try:
            written = os.pwrite(fd, buf, 0)
        finally:
            os.close(fd)
        if written != len(buf):
            raise OSError(f"short write: {written} of {len(buf)} bytes")
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True


def load_block(root: str, key: bytes, buf: memoryview) -> bool:
    """Read one block into ``buf``; False if missing, short or failed."""
    try:
        fd = os.open(block_path(root, key), _LOAD_FLAGS)
    except OSError:
        return False
    try:
        return os.preadv(fd, [buf], 0) == len(buf)
    except OSError:
        return False
    finally:
        os.close(fd)


class SeedPool:
    """The 16-thread pool and the batch shapes the benchmark drives it with."""

    def __init__(self, root: str, threads: int) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="seed")
        self._threads = threads
        # Start every worker now: the pool spawns threads lazily on submit.
        list(self._pool.map(time.sleep, [0.002] * threads))

    def __enter__(self) -> SeedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)

    def _submit_all(
        self, fn: _BlockFn, keys: Sequence[bytes], bufs: Sequence[memoryview]
    ) -> list[Future[bool]]:
        submit = self._pool.submit
        root = self.root
        return [submit(fn, root, k, b) for k, b in zip(keys, bufs, strict=True)]

    def store_all(self, keys: Sequence[bytes], bufs: Sequence[memoryview]) -> int:
        """Store every block, one task each; returns the failure count."""
        return sum(not f.result() for f in self._submit_all(store_block, keys, bufs))

    def load_all(self, keys: Sequence[bytes], bufs: Sequence[memoryview]) -> int:
        return sum(not f.result() for f in self._submit_all(load_block, keys, bufs))

    def timed_phase(
        self, op: str, keys: Sequence[bytes], bufs: Sequence[memoryview], block_size: int
    ) -> Sample:
        run = self.store_all if op == "store" else self.load_all
        with Stopwatch() as sw:
            errors = run(keys, bufs)
        return sw.sample(len(keys) * block_size, len(keys), errors)

    def prefix_latency(
        self,
        prefix: Sequence[bytes],
        prefix_bufs: Sequence[memoryview],
        bg_keys: Iterator[list[bytes]],
        bg_bufs: Sequence[memoryview],
        requests: int,
    ) -> tuple[list[float], int]:
        """Per-request time to load ``prefix`` while the same pool runs a store stream."""
        stop = threading.Event()
        started = threading.Event()

        def background() -> None:
            try:
                while not stop.is_set():
                    futures = self._submit_all(store_block, next(bg_keys), bg_bufs)
                    started.set()
                    for f in futures:
                        f.result()
            finally:
                started.set()

        feeder = threading.Thread(target=background, name="seed-bg", daemon=True)
        feeder.start()
        started.wait()
        latencies: list[float] = []
        errors = 0
        try:
            for _ in range(requests):
                t0 = time.perf_counter()
                errors += self.load_all(prefix, prefix_bufs)
                latencies.append(time.perf_counter() - t0)
        finally:
            stop.set()
            feeder.join()
        return latencies, errors
