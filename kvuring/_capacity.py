"""A disk budget: ``capacity_bytes`` with least-recently-used eviction (docs/capacity.md).

What is kept, and where:

* **Recency is the block file's mtime.**  A store sets it (the temp file is
  written, then renamed); a load (HIT) or a store that finds the block
  already there (EXISTS) bumps it with ``utimensat(NULL)`` -- at most once per
  key per second, batched, on this store's worker thread (a daemon thread;
  never the owner's thread).  So recency survives restarts, and every
  process and node that shares the filesystem sees the same order.
  Presence checks do not count as use.
* **Usage is an in-memory index per store object**: an ``OrderedDict``
  ``key -> file bytes`` in LRU order (oldest first), built at open by a
  background scan of the namespace (``os.scandir`` + ``stat`` on the worker
  thread; temp files, the registry and names this store would not make are
  left out), then kept up to date by this store's own calls: STORED and
  EXISTS and HIT insert or move a key to the young end, MISS, CORRUPT and
  deletes drop it.  Other processes' stores and loads become visible
  through rescans: every ``KVURING_CAPACITY_RESCAN`` seconds (15), at most
  a tenth of the time (a rescan waits at least ten times as long as the
  last one took), and sooner when this store has to evict.  A rescan
  replaces the index with the namespace as found, sorted by mtime, then
  replays what this store did while it ran (a journal), so nothing of its
  own is lost.
* **Eviction runs as a put starts.**  A put batch reserves the bytes of its
  keys not already indexed; when indexed + reserved bytes would pass the
  budget, the least recently used blocks -- never one of the batch's own
  keys -- are taken out of the index until they are at 95% of it
  (hysteresis: one eviction per 5% of the budget written, not one per put)
  and removed with one DELETE batch through the block core, queued ahead of
  the put and running beside it.  A namespace found over budget by a scan
  (at open, or later) is trimmed the same way, in the background.
* **Several roots: all of the above per root** (:class:`RootBudget`): each
  root has its budget, index, reservations and evictions.  The core reports
  the root each block ended on (the batch's ``root_out``), a put reserves on
  the root the core will pick (``BlockCore.first_roots``), and an eviction's
  DELETE batch pins each victim to its root (``root_in``), so a copy of the
  key on another root stays.  One worker thread scans every root.

All index changes happen on the owner's thread (the event loop's, or the
polling caller's); the worker thread only scans, sorts and touches files,
and hands its results back through ``post``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from kvuring import _blocks as core_api
from kvuring._blocks import CoreBatch
from kvuring._budget import (
    _CORRUPT_ONLY,
    _DIR_FLAGS,
    _GONE_HERE,
    RootBudget,
    _by_root,
    rescan_seconds,
    scan_namespace,
)
from kvuring._format import (
    RAW_SUFFIX,
    TRAILER_SIZE,
    VERIFIED_SUFFIX,
    block_relpath,
    vllm_relpath,
)

if TYPE_CHECKING:
    from kvuring._namespace import Namespace
    from kvuring._runner import BatchRunner, Job

log = logging.getLogger("kvuring")

#: a key's mtime is bumped at most once per this many seconds
TOUCH_INTERVAL = 1.0
#: the worker applies queued touches at least this often (seconds)
TOUCH_DELAY = 0.5
#: keys waiting for their mtime bump; past this, bumps are dropped (counted)
MAX_PENDING_TOUCHES = 1 << 17
#: a rescan asked for by an eviction comes at most this often (seconds)
RESCAN_MIN_GAP = 1.0
#: rescans wait at least this many times as long as the last one took
RESCAN_DUTY = 10.0
#: close() waits this long for the worker to apply the last touches
CLOSE_WAIT = 2.0


class Capacity:
    """The budget of one store object: each root's index and evictions, one worker thread."""

    def __init__(
        self,
        runner: BatchRunner,
        budgets: Sequence[int],
        *,
        namespaces: Sequence[Namespace] | None = None,
        closed: Callable[[], bool],
    ) -> None:
        ns = runner.ns
        spaces = list(namespaces) if namespaces is not None else [ns]
        if len(budgets) != len(spaces):
            raise ValueError(f"{len(budgets)} budgets for {len(spaces)} roots")
        self.runner = runner
        self.file_size = ns.block_size + (TRAILER_SIZE if ns.verify else 0)
        self.layout = ns.layout
        self.suffix = VERIFIED_SUFFIX if ns.verify else RAW_SUFFIX
        self._closed_owner = closed
        self._incoming: dict[int, list[int]] = {}  # id(job) -> its reserved bytes, per root
        self.evictions = 0  # delete batches sent
        self.scans = 0
        self.scan_seconds = 0.0
        self.scan_failures = 0
        self._scan_done_at = time.monotonic()
        self._scanning = False  # one scan (of every root) at a time
        self._second = 0  # the current second of the mtime bumps (each root keeps its keys)
        self._queued = 0  # keys handed to the worker (the owner counts)
        self._applied = 0  # keys the worker is done with (the worker counts)
        self.touches = 0  # mtimes bumped
        self.touch_errors = 0
        self.touch_dropped = 0
        self.interval = rescan_seconds()
        # The worker: its own descriptor of each root's namespace, a FIFO of
        # touches (root, keys) and scan requests (None: scan every root now,
        # after the touches queued before it).
        self._queue: collections.deque[tuple[RootBudget, list[bytes]] | None] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._garbage: list[object] = []  # old indexes, freed on the worker
        self.roots: list[RootBudget] = []
        try:
            for i, (space, budget) in enumerate(zip(spaces, budgets)):
                fd = os.open(".", _DIR_FLAGS, dir_fd=space.ns_fd)
                self.roots.append(RootBudget(i, budget, fd))
        except BaseException:
            for root in self.roots:
                os.close(root.fd)
            raise
        self.capacity = sum(budgets)
        self._several = len(self.roots) > 1
        self._thread = threading.Thread(target=self._work, name="kvuring-capacity", daemon=True)
        self._request_scan()
        self._thread.start()

    # -- the owner's side: calls ----------------------------------------------------
    def starting(self, job: Job) -> None:
        """A batch is about to be queued: a put reserves its new keys' bytes and evicts if needed."""
        kind = job.kind
        kbs = job.kbs
        several = self._several
        if several and kbs and kind in (core_api.STORE, core_api.LOAD):
            job.batch.give_root_out()  # the root each block ends on, for finished()
        if kind != core_api.STORE:
            return
        roots = self.roots
        if not several:
            index = roots[0].index
            move = index.move_to_end
            new = 0
            for kb in kbs:
                if kb in index:
                    move(kb)  # EXISTS is use: young, and never this put's victim
                else:
                    new += 1
            counts = [new]
        else:
            # Each block is bound for the root the core picks (its first by rank
            # that is not failing); one that ends elsewhere (its root failed or
            # was full) is accounted where it ended by finished().
            counts = [0] * len(roots)
            indexes = [root.index for root in roots]
            for kb, r in zip(kbs, self.runner.core.first_roots(kbs)):
                index = indexes[r]
                if kb in index:
                    index.move_to_end(kb)
                else:
                    counts[r] += 1
        if any(counts):
            size = self.file_size
            incoming = [n * size for n in counts]
            self._incoming[id(job)] = incoming
            for root, add in zip(roots, incoming):
                root.reserved += add
        over = [root for root in roots if root.over()]
        if over:
            self._evict(kbs, over)

    def finished(self, job: Job) -> None:
        """A batch is over: what it found goes into the index and the recency queue."""
        kind = job.kind
        kbs = job.kbs
        roots = self.roots
        if kind == core_api.DELETE:
            for root in roots:  # a delete visits every root
                root.gone(kbs)
            return
        if kind == core_api.STORE:
            incoming = self._incoming.pop(id(job), None)
            if incoming is not None:
                for root, add in zip(roots, incoming):
                    root.reserved -= add
        elif kind != core_api.LOAD:
            return
        status = job.batch.status
        where = job.batch.root_out
        if not self._several or where is None:
            self._finished_on(roots[0], kind, kbs, status, _GONE_HERE)
            return
        # A load's MISS went through every root: gone from each.  A CORRUPT
        # block is gone from the root it ended on (it was removed there).
        if kind == core_api.LOAD and status.count(core_api.MISS):
            missed = [kb for kb, st in zip(kbs, status) if st == core_api.MISS]
            for root in roots:
                root.gone(missed)
        for r, (some, their) in _by_root(kbs, status, where).items():
            self._finished_on(roots[r], kind, some, their, _CORRUPT_ONLY)

    def _finished_on(
        self,
        root: RootBudget,
        kind: int,
        kbs: Sequence[bytes],
        status: Sequence[int],
        gone: tuple[int, ...],
    ) -> None:
        """finished() for the blocks of a batch that ended on ``root``."""
        size = self.file_size
        if kind == core_api.STORE:
            stored = status.count(core_api.STORED)
            if stored == len(kbs):
                root.use(kbs, size)
                self._fresh(root, kbs)
                return
            ok = (core_api.STORED, core_api.EXISTS)
            root.use([kb for kb, st in zip(kbs, status) if st in ok], size)
            if stored:
                self._fresh(root, [kb for kb, st in zip(kbs, status) if st == core_api.STORED])
            if status.count(core_api.EXISTS):
                self._bump(root, [kb for kb, st in zip(kbs, status) if st == core_api.EXISTS])
        else:
            hits = status.count(core_api.HIT)
            if hits == len(kbs):
                found: Sequence[bytes] = kbs
            else:
                found = [kb for kb, st in zip(kbs, status) if st == core_api.HIT]
                root.gone([kb for kb, st in zip(kbs, status) if st in gone])
            if found:
                root.use(found, size)
                self._bump(root, found)

    def _second_now(self, root: RootBudget) -> set[bytes]:
        now = int(time.time() / TOUCH_INTERVAL)
        if now != self._second:
            self._second = now
            for one in self.roots:
                one.touched = set()
        return root.touched

    def _fresh(self, root: RootBudget, kbs: Sequence[bytes]) -> None:
        """Stored just now: their mtime is this second's already."""
        self._second_now(root).update(kbs)

    def _bump(self, root: RootBudget, kbs: Sequence[bytes]) -> None:
        """Persist the use as the files' mtime (on the worker), once per key per second."""
        touched = self._second_now(root)
        todo = [kb for kb in kbs if kb not in touched]
        if not todo:
            return
        touched.update(todo)
        if self._queued - self._applied + len(todo) > MAX_PENDING_TOUCHES:
            self.touch_dropped += len(todo)
            return
        self._queued += len(todo)
        idle = not self._queue
        self._queue.append((root, todo))
        if idle:
            self._wake.set()  # the worker applies them now, beside the loads

    # -- eviction --------------------------------------------------------------------
    def _evict(self, protect: Iterable[bytes], over: Sequence[RootBudget]) -> None:
        """On each root of ``over``: take the oldest blocks (not ``protect``) out until
        indexed + reserved <= 95% of its budget; delete them, each on its root only."""
        guard = set(protect)
        picked: list[tuple[RootBudget, list[bytes]]] = []
        for root in over:
            need = root.used + root.reserved - root.low
            victims: list[bytes] = []
            freed = 0
            if need > 0:
                for kb, size in root.index.items():
                    if kb in guard:
                        continue
                    victims.append(kb)
                    freed += size
                    if freed >= need:
                        break
            if victims:
                picked.append((root, victims))
        self._request_scan(because_full=True)
        if not picked:
            return
        keys: list[bytes] = []
        pins = bytearray()
        for root, victims in picked:
            root.gone(victims)
            root.evicting.update(victims)
            keys += victims
            pins += bytes([root.number]) * len(victims)
        self.evictions += 1
        # With several roots each victim is pinned to its root: the copy on
        # the root that is over budget goes, a copy elsewhere stays.
        batch = CoreBatch(core_api.DELETE, keys, None, quiet=True,
                          root_in=bytes(pins) if self._several else None)  # fmt: skip

        def deleted(done: CoreBatch) -> None:
            status = done.status
            at = 0
            for root, victims in picked:
                n = len(victims)
                root.evicted += status[at : at + n].count(core_api.PRESENT)
                root.evicting.difference_update(victims)
                at += n

        runner = self.runner
        runner.core.add(batch, deleted)
        runner._kick()

    def _trim(self) -> None:
        """After a scan: evict while over budget (a root found too full)."""
        over = [root for root in self.roots if root.over()]
        if over and not self._owner_closed():
            self._evict((), over)

    def _owner_closed(self) -> bool:
        return self._stop or self._closed_owner() or self.runner.core.closed

    # -- scans: the owner asks, the worker scans every root, the owner installs --------
    def _request_scan(self, *, because_full: bool = False) -> None:
        if self._scanning or self._owner_closed():
            return  # one at a time
        if because_full:
            gap = max(min(RESCAN_MIN_GAP, self.interval), RESCAN_DUTY * self.scan_seconds)
            if time.monotonic() < self._scan_done_at + gap:
                return
        self._scanning = True
        for root in self.roots:
            root.journal = []
        self._queue.append(None)
        self._wake.set()

    def _install(
        self, results: list[tuple[collections.OrderedDict[bytes, int] | None, int]]
    ) -> None:
        """The worker's scan results (one per root), with each root's journal replayed onto it."""
        self._scanning = False
        self._scan_done_at = time.monotonic()
        if self._stop:
            for root in self.roots:
                root.journal = None
            return
        installed = False
        for root, (found, used) in zip(self.roots, results):
            old = root.install(found, used, self.file_size)
            if old is not None:
                installed = True
                self._garbage.append(old)  # a big dict is freed on the worker, not here
        if installed:
            self.scans += 1
        self._trim()

    def _post(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the store is gone
            self.runner._post(fn)

    # -- the worker thread ---------------------------------------------------------------
    def _work(self) -> None:
        next_scan = float("inf")  # the first scan is queued already
        try:
            while True:
                timeout = min(TOUCH_DELAY, max(0.0, next_scan - time.monotonic()))
                self._wake.wait(timeout)
                self._wake.clear()
                self._garbage.clear()
                while self._queue:
                    item = self._queue.popleft()
                    if item is None:
                        if not self._stop:
                            self._scan()
                            next_scan = time.monotonic() + max(
                                self.interval, RESCAN_DUTY * self.scan_seconds
                            )
                    else:
                        self._touch(*item)
                if self._stop:
                    return
                if time.monotonic() >= next_scan:
                    next_scan = float("inf")  # until the scan the owner queues is done
                    self._post(self._request_scan)
        finally:
            for root in self.roots:
                os.close(root.fd)

    def _touch(self, root: RootBudget, kbs: list[bytes]) -> None:
        fd = root.fd
        vllm = self.layout == "vllm"
        suffix = self.suffix.encode()
        done = 0
        for kb in kbs:
            rel = vllm_relpath(kb)[1] if vllm else block_relpath(kb, suffix)[1]
            try:
                os.utime(rel, dir_fd=fd, follow_symlinks=False)
                done += 1
            except FileNotFoundError:
                pass  # evicted or deleted meanwhile
            except OSError:
                self.touch_errors += 1
        self.touches += done
        self._applied += len(kbs)

    def _scan(self) -> None:
        t0 = time.monotonic()
        results: list[tuple[collections.OrderedDict[bytes, int] | None, int]] = []
        for root in self.roots:
            try:
                entries = scan_namespace(
                    root.fd, layout=self.layout, suffix=self.suffix, file_size=self.file_size,
                    stop=lambda: self._stop,
                )  # fmt: skip
            except OSError as exc:
                log.warning("kvuring: capacity scan of root %d's namespace failed: %s",
                            root.number, exc)  # fmt: skip
                self.scan_failures += 1
                entries = None
            found: collections.OrderedDict[bytes, int] | None = None
            used = 0
            if entries is not None:
                found = collections.OrderedDict((kb, size) for _, kb, size in entries)
                used = sum(map(itemgetter(2), entries))
                del entries
            results.append((found, used))
        self.scan_seconds = time.monotonic() - t0
        self._post(lambda: self._install(results))

    # -- results ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        roots = self.roots
        return {
            "capacity_bytes": self.capacity,
            "used_bytes": sum(root.used for root in roots),
            "used_blocks": sum(len(root.index) for root in roots),
            "evicted": sum(root.evicted for root in roots),
            "evictions": self.evictions,
            "evicting": sum(len(root.evicting) for root in roots),
            "capacity_scans": self.scans,
            "capacity_scan_seconds": round(self.scan_seconds, 6),
            "recency_updates": self.touches,
            "recency_errors": self.touch_errors,
            "recency_dropped": self.touch_dropped,
        }

    def root_stats(self, number: int) -> dict[str, Any]:
        """stats()["roots"][number]'s budget keys."""
        root = self.roots[number]
        return {"capacity_bytes": root.capacity, "used_bytes": root.used,
                "used_blocks": len(root.index), "evicted": root.evicted}  # fmt: skip

    def close(self) -> None:
        """Stop the worker: it applies the touches still queued (up to CLOSE_WAIT s), then exits."""
        if self._stop:
            return
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(CLOSE_WAIT)
