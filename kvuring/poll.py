"""PollingStore: kvuring's block store without an event loop.

For engines whose scheduler is a plain loop (vLLM's offloading tiers, a C++
host through a binding, a test harness): submit a batch without waiting,
poll for finished batches without blocking, drain, close.  It runs the same
block core and batch runner as :class:`~kvuring.store.BlockStore`, so every
status, file and error means the same; only the waiting differs.  On the
io_uring engine it starts no thread of its own (the thread engine has its
workers, and batches of big blocks are checksummed on a few hash threads).

    with PollingStore("/mnt/nvme/kv", 2 << 20) as store:
        put = store.submit_put(keys, rows)
        ...
        for done in store.poll():           # never blocks
            print(done.id, done.results)
        store.drain()                       # blocks until nothing is in flight

Calls may come from different threads, one at a time (the ring is set up
without IORING_SETUP_SINGLE_ISSUER); they must not overlap.
"""

from __future__ import annotations

import collections
import os
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvuring import _blocks as core_api
from kvuring._driver import Driver
from kvuring._frontend import CLOSE_GRACE, StoreFrontEnd
from kvuring._runner import Job
from kvuring._types import Buffer
from kvuring.engine import open_engine

__all__ = ["Finished", "PollingStore"]

_KINDS = {core_api.STORE: "put", core_api.LOAD: "get", core_api.STAT: "contains",
          core_api.DELETE: "delete"}  # fmt: skip


@dataclass(frozen=True)
class Finished:
    """A batch that is over: what :meth:`PollingStore.poll` returns for each.

    ``results`` are :class:`~kvuring.Status` values for puts and gets, bools
    for presence checks and deletes, one per key in submission order.
    ``errors`` maps the index of each FAILED block to its OSError (errno and
    path); the buffers of a finished batch are the caller's again.
    """

    id: int
    kind: str
    keys: list[bytes]
    results: list[Any]
    errors: dict[int, OSError]
    tag: object = None


class PollingStore(StoreFrontEnd):
    """A directory of KV-cache blocks, driven by polling: ``submit_*``, :meth:`poll`, :meth:`drain`.

    Arguments as for :class:`~kvuring.store.BlockStore`.  Open it with
    ``with PollingStore(root, block_size) as store`` or :meth:`open`.
    """

    _how_to_open = "'with' or open()"

    def _init_front_end(self) -> None:
        self._driver: Driver | None = None
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._finished: list[Finished] = []
        self._tags: dict[int, object] = {}
        self._open_jobs = 0
        self._released = False

    # -- life cycle ----------------------------------------------------------------
    def open(self) -> PollingStore:
        """Create the directories, probe direct I/O, clean up dead writers' temp files, start the engine."""
        if self.closed:
            raise RuntimeError("PollingStore is closed")
        if self._driver is not None:
            return self
        timeout = self.io_timeout
        ns = self._ns.open_sync(timeout)
        try:
            self._open_more_sync(timeout)
            engine = open_engine(self._engine_name(), slots=self.queue_depth, single_issuer=False,
                                 threads=self._engine_threads)  # fmt: skip
            self._driver = driver = Driver(engine)
            self._start(engine, driver, kick=driver.flush, post=self._post)
        except BaseException:
            if self._driver is not None:
                self._driver.close()
                self._driver = None
            ns.close_sync(timeout)
            raise
        return self

    def __enter__(self) -> PollingStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float | None = 5.0) -> None:
        """Finish what is in flight, then release everything, within about ``timeout`` s.

        As :meth:`kvuring.BlockStore.close`: stores still held back for
        loads end FAILED without running, what is in flight after
        ``timeout`` ends FAILED (ECANCELED) and a hung engine is let go.
        Finished batches not yet polled are dropped.  Idempotent; a close
        that ran out of time may be called again to finish releasing.
        """
        self.closed = True
        if self._released:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        runner, driver = self._runner, self._driver
        if runner is not None and driver is not None and not driver.closed:
            runner.core.drop_queued_stores()
            self._drain(deadline)
            driver.close(deadline=deadline)
        keep = self._stop()
        released = True
        for ns in self._namespaces:
            left = None if deadline is None else max(CLOSE_GRACE, deadline - time.monotonic())
            released = ns.close_sync(left, keep) and released
        self._released = released

    # -- submitting ------------------------------------------------------------------
    def submit_put(
        self, keys: Sequence[bytes | int], bufs: Sequence[Buffer], *, tag: object = None
    ) -> int:
        """Start storing blocks; returns the batch's id.  Buffers must not change until it finishes."""
        runner = self._runner_for_call()
        return self._started(runner.put(keys, bufs, self._done), tag)

    def submit_get(
        self, keys: Sequence[bytes | int], bufs: Sequence[Buffer], *, tag: object = None
    ) -> int:
        """Start loading blocks into ``bufs``; returns the batch's id."""
        runner = self._runner_for_call()
        return self._started(runner.get(keys, bufs, self._done), tag)

    def submit_put_rows(
        self, keys: Sequence[bytes | int], region: Buffer, rows: Sequence[int] | Buffer, *,
        row_bytes: int | None = None, tag: object = None,
    ) -> int:  # fmt: skip
        """submit_put of blocks that are rows of one region (block ``keys[i]`` is row ``rows[i]``).

        ``region`` is pinned once for the batch and each row's address is
        computed in C, so a batch costs almost no Python per block.  A row is
        ``row_bytes`` apart from the next (default: a 2-D region's
        ``strides[0]``, else ``block_size``); ``rows`` may be a list or an
        int64 array (numpy).
        """
        runner = self._runner_for_call()
        return self._started(
            runner.put_rows(keys, region, rows, self._done, row_bytes=row_bytes), tag
        )

    def submit_get_rows(
        self, keys: Sequence[bytes | int], region: Buffer, rows: Sequence[int] | Buffer, *,
        row_bytes: int | None = None, tag: object = None,
    ) -> int:  # fmt: skip
        """submit_get into rows of one region (as :meth:`submit_put_rows`)."""
        runner = self._runner_for_call()
        return self._started(
            runner.get_rows(keys, region, rows, self._done, row_bytes=row_bytes), tag
        )

    def submit_contains(self, keys: Sequence[bytes | int], *, tag: object = None) -> int:
        """Start checking which blocks are present; returns the batch's id."""
        runner = self._runner_for_call()
        return self._started(runner.presence(core_api.STAT, keys, self._done), tag)

    def submit_delete(self, keys: Sequence[bytes | int], *, tag: object = None) -> int:
        """Start removing blocks; returns the batch's id."""
        runner = self._runner_for_call()
        return self._started(runner.presence(core_api.DELETE, keys, self._done), tag)

    def _started(self, job: Job, tag: object) -> int:
        self._open_jobs += 1
        bid = int(job.batch.c.id)
        if tag is not None:
            self._tags[bid] = tag
        return bid

    def _done(self, job: Job) -> None:
        runner = self._runner
        assert runner is not None
        self._open_jobs -= 1
        bid = int(job.batch.c.id)
        errors = {i: runner.error(job.kbs[i], job.batch.error[i])
                  for i in range(job.batch.n) if job.failed(i)} if job.batch.c.failed else {}  # fmt: skip
        self._finished.append(Finished(bid, _KINDS[job.kind], job.kbs, job.statuses(), errors,
                                       self._tags.pop(bid, None)))  # fmt: skip

    def _post(self, fn: Callable[[], None]) -> None:
        # From a hash thread: run fn at the next poll, and wake a waiter.
        self._posted.append(fn)
        driver = self._driver
        if driver is not None and not driver.engine.closed:
            os.eventfd_write(driver.engine.fileno(), 1)

    # -- completing ------------------------------------------------------------------
    def poll(self) -> list[Finished]:
        """The batches that finished since the last call; never blocks."""
        self._runner_for_call()
        self._step()
        out, self._finished = self._finished, []
        return out

    def wait(self, timeout: float | None = None) -> list[Finished]:
        """Block until at least one batch finishes (or ``timeout`` seconds pass); as :meth:`poll`."""
        self._runner_for_call()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._step()
            if self._finished or not self._open_jobs:
                out, self._finished = self._finished, []
                return out
            driver = self._driver
            assert driver is not None
            left = driver.wait_time(deadline)
            if deadline is not None and time.monotonic() >= deadline:
                return []
            select.select([self.fileno()], [], [], left)

    def drain(self) -> list[Finished]:
        """Block until every submitted batch has finished; all that finished since the last poll.

        With ``io_timeout`` set this returns within about that long even if
        the filesystem hangs: blocks past their deadline end FAILED (ETIMEDOUT).
        """
        self._runner_for_call()
        self._drain()
        out, self._finished = self._finished, []
        return out

    def _drain(self, deadline: float | None = None) -> bool:
        driver = self._driver
        assert driver is not None
        while self._open_jobs or driver.busy() or self._posted:
            self._step()
            if not self._open_jobs and not driver.busy():
                break
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if driver.in_flight or (driver.core is not None and driver.core.in_flight()):
                driver.wait(deadline)
            elif not self._posted:
                select.select([self.fileno()], [], [], 0.05)  # hash threads at work
        return True

    def _step(self) -> None:
        driver = self._driver
        assert driver is not None
        while self._posted:
            self._posted.popleft()()
        driver.process()
        driver.flush()

    @property
    def pending(self) -> int:
        """Batches submitted and not yet finished."""
        return self._open_jobs

    def fileno(self) -> int:
        """A descriptor that turns readable when :meth:`poll` may have something (for select/epoll)."""
        driver = self._driver
        if driver is None:
            raise RuntimeError("PollingStore is not open")
        return driver.engine.fileno()

    def stats(self) -> dict[str, Any]:
        """As :meth:`kvuring.BlockStore.stats`."""
        driver = self._driver
        engine = driver.engine.name if driver is not None and not driver.closed else None
        out = self._stats(engine)
        if driver is not None and not driver.closed:
            out["ring"] = {**driver.engine.stats(), **driver.stats()}
        out["pending_batches"] = self._open_jobs
        return out
