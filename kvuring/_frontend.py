"""What both front ends share: their arguments, the namespace, the core and runner, registered buffers.

:class:`~kvuring.store.BlockStore` (asyncio) and
:class:`~kvuring.poll.PollingStore` (no event loop) differ only in how they
wait; everything else about a store is here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

from kvuring._blocks import BlockCore
from kvuring._budget import capacity_root_stats, capacity_stats, check_capacity
from kvuring._capacity import Capacity
from kvuring._driver import Driver
from kvuring._format import check_layout, check_namespace
from kvuring._namespace import Namespace
from kvuring._regions import FixedBuffers
from kvuring._runner import BatchRunner, Post, start_core
from kvuring._types import Buffer
from kvuring.engine import Engine, resolve_backend

MAX_BLOCK_SIZE = 1 << 30
# Every in-flight chain may post up to 8 CQEs and the kernel caps the CQ at
# 64 Ki entries.
MAX_QUEUE_DEPTH = 8192
#: seconds a namespace's release gets at close even when the engine's used up the timeout
CLOSE_GRACE = 0.5
#: roots a store may spread its blocks over (KVU_MAX_ROOTS)
MAX_ROOTS = 16


def check_io_timeout(io_timeout: object) -> float | None:
    """``io_timeout``: None (no deadline) or a positive, finite number of seconds."""
    if io_timeout is None:
        return None
    if isinstance(io_timeout, bool) or not isinstance(io_timeout, (int, float)):
        raise TypeError(f"io_timeout must be a number of seconds or None, not {io_timeout!r}")
    if not 0 < io_timeout < float("inf"):
        raise ValueError(f"io_timeout must be positive and finite, got {io_timeout!r}")
    return float(io_timeout)


def check_options(
    block_size: object, direct: object, queue_depth: object, **flags: object
) -> None:  # fmt: skip
    """The checks of the arguments both front ends take; ``flags``: the options that must be bools."""
    for name, value in flags.items():
        # bool("False") is True: a string or a number must not pass as a flag.
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, not {value!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be int, not {type(block_size).__name__}")
    if not 0 < block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be between 1 and {MAX_BLOCK_SIZE}, got {block_size}")
    if not (isinstance(direct, bool) or direct == "auto"):
        raise ValueError(f"direct must be 'auto', True or False; got {direct!r}")
    if (
        not isinstance(queue_depth, int)
        or isinstance(queue_depth, bool)
        or not 1 <= queue_depth <= MAX_QUEUE_DEPTH
    ):
        raise ValueError(
            f"queue_depth must be between 1 and {MAX_QUEUE_DEPTH}, got {queue_depth!r}"
        )


def store_stats(
    ns: Namespace,
    runner: BatchRunner | None,
    fixed: FixedBuffers | None,
    fixed_ready: bool,
    engine: str | None,
) -> dict[str, Any]:
    """stats() of either front end: counters, then configuration."""
    out: dict[str, Any] = dict.fromkeys(
        ("puts", "gets", "contains", "deletes", "stored", "exists", "hits", "misses",
         "corrupt", "failures", "deleted", "bytes_written", "bytes_read", "bounced",
         "fixed_transfers", "offloaded_checksums", "stores_held_for_loads", "retries",
         "timeouts", "cleanup_failed", "close_errors", "lent_buffers", "syncs"),
        0,
    )  # fmt: skip
    out["errors"] = {}
    core: BlockCore | None = None
    if runner is not None:
        out.update(runner.stats())
        core = runner.core
    out.update(
        dead_writers_cleaned=ns.dead_writers_cleaned,
        engine=engine,
        direct_io=ns.direct.enabled,
        direct_io_alignment=ns.direct.mem_align if ns.direct.enabled else None,
        verify=ns.verify,
        block_size=ns.block_size,
        namespace=ns.namespace,
        rename_noreplace=core.noreplace if core is not None else True,
        filesystem=ns.filesystem,
        load_io_priority="realtime"
        if (core.load_ioprio if core is not None else ns.load_ioprio)
        else "default",
        spread_reads=ns.spread_reads,
        fixed_buffers_active=fixed_ready,
        io_timeout=core.timeout if core is not None else None,
        close_errors_checked=(core.fd_install or core.engine.name == "threads")
        if core is not None
        else None,
        durable=core.durable if core is not None else None,
    )
    if fixed is not None:
        out.update(fixed.stats())
    return out


def check_roots(root: object) -> list[str]:
    """One root or a non-empty sequence of distinct ones, as absolute paths."""
    if isinstance(root, (str, os.PathLike)):
        given: list[object] = [root]
    elif isinstance(root, (list, tuple)):
        given = list(root)
    else:
        raise TypeError(f"root must be a path or a list of paths, not {type(root).__name__}")
    if not given:
        raise ValueError("root: at least one directory is needed")
    if len(given) > MAX_ROOTS:
        raise ValueError(f"at most {MAX_ROOTS} roots, got {len(given)}")
    paths = []
    for one in given:
        if not isinstance(one, (str, os.PathLike)):
            raise TypeError(f"each root must be a path, not {type(one).__name__}")
        paths.append(os.path.abspath(os.fspath(one)))
    if len(set(paths)) != len(paths):
        raise ValueError(f"roots must be distinct, got {paths}")
    return paths


def root_id(path: str) -> int:
    """The root's rendezvous seed: from its absolute path, so it is the same in every process."""
    return int(xxhash.xxh3_64_intdigest(os.fsencode(path)))


class StoreFrontEnd:
    """The state and the calls both front ends have; they add how to wait."""

    #: the front end's name in error messages
    kind = "store"

    def __init__(
        self,
        root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        block_size: int,
        *,
        namespace: str = "default",
        backend: str = "auto",
        direct: bool | str = "auto",
        verify: bool = True,
        queue_depth: int = 256,
        prioritize_loads: bool = True,
        fixed_buffers: bool = False,
        layout: str = "kvuring",
        io_timeout: float | None = 30.0,
        durable: bool = False,
        capacity_bytes: int | Sequence[int] | None = None,
    ) -> None:
        check_options(block_size, direct, queue_depth, verify=verify,
                      prioritize_loads=prioritize_loads, fixed_buffers=fixed_buffers)  # fmt: skip
        self.io_timeout = check_io_timeout(io_timeout)
        if not isinstance(durable, bool):
            raise TypeError(f"durable must be True or False, not {durable!r}")
        self.durable = durable
        self.layout = check_layout(layout, bool(verify))
        #: every root; a key lives on one of them (rendezvous hashing), see docs/disks.md
        self.roots = check_roots(root)
        self.root = self.roots[0]
        #: each root's disk budget (docs/capacity.md), or None
        self.capacity_budgets = check_capacity(capacity_bytes, len(self.roots))
        #: the budgets' total, or None
        self.capacity_bytes = (
            sum(self.capacity_budgets) if self.capacity_budgets is not None else None
        )
        self.block_size = block_size
        self.namespace = check_namespace(namespace)
        # KVURING_BACKEND steers the default "auto"; an explicit engine wins.
        self.backend_requested = resolve_backend(None if backend == "auto" else backend)
        self.direct_requested = direct
        self.verify = bool(verify)
        self.prioritize_loads = bool(prioritize_loads)
        self.fixed_buffers = bool(fixed_buffers)
        self.queue_depth = queue_depth
        self._ns = Namespace(self.root, self.namespace, block_size, verify=self.verify,
                             direct=direct, prioritize_loads=self.prioritize_loads,
                             queue_depth=queue_depth, layout=self.layout)  # fmt: skip
        # The other roots' namespaces: their own directories, registry and
        # probe; the core's slots, trailer pages and engine are shared.
        self._more_ns = [
            Namespace(path, self.namespace, block_size, verify=self.verify, direct=direct,
                      prioritize_loads=self.prioritize_loads, queue_depth=0, layout=self.layout)
            for path in self.roots[1:]
        ]  # fmt: skip
        self._runner: BatchRunner | None = None
        self._runner_closed = False
        self._keep_registry = False
        self._fixed: FixedBuffers | None = None
        self._fixed_ready = False
        self.closed = False
        self._init_front_end()

    def _init_front_end(self) -> None:
        """The front end's own state (how it waits), set at construction."""

    @property
    def direct_io(self) -> bool:
        """Whether blocks move with O_DIRECT (known once open)."""
        return self._ns.direct.enabled

    @property
    def _engine_threads(self) -> int:
        """The thread engine's workers: 16, and as many more per extra root (each a hung
        root's requests may hold), up to one per slot."""
        return max(16, min(16 * len(self.roots), self.queue_depth))

    def _engine_name(self) -> str:
        """The engine to open for this namespace (``auto`` is threads on a memory filesystem)."""
        return self._ns.engine_for(self.backend_requested)

    def _start(
        self, engine: Engine, driver: Driver, *, kick: Callable[[], None], post: Post
    ) -> None:
        """The block core on ``engine`` and the batch runner over it."""
        if len(self.roots) > 1:
            engine.widen_workers(self.queue_depth)
        core, self._fixed, self._fixed_ready = start_core(
            self._ns, engine, driver,
            fixed_buffers=self.fixed_buffers, prioritize_loads=self.prioritize_loads,
            io_timeout=self.io_timeout, durable=self.durable,
            root_ids=[root_id(path) for path in self.roots], more=self._more_ns,
        )  # fmt: skip
        self._runner = BatchRunner(self._ns, core, self._fixed if self._fixed_ready else None,
                                   kick=kick, post=post)  # fmt: skip
        if self.capacity_budgets is not None:
            self._runner.capacity = Capacity(self._runner, self.capacity_budgets,
                                             namespaces=self._namespaces,
                                             closed=lambda: self.closed)  # fmt: skip

    def _stop(self) -> bool:
        """After the engine is drained and closed: registrations, hash threads.

        Returns ``keep_registry`` for the namespaces' close: temp files this
        writer could not remove, or left to I/O it abandoned, are cleaned up
        by the next open as a dead writer's.
        """
        if self._fixed is not None:
            self._fixed.clear()
            self._fixed = None
        keep = self._keep_registry
        if self._runner is not None and not self._runner_closed:
            final = self._runner.core.stats()
            keep = bool(final["cleanup_failed"] or final.get("lent_at_close"))
            self._keep_registry = keep
            self._runner.close()
            self._runner_closed = True
        return keep

    @property
    def _namespaces(self) -> list[Namespace]:
        return [self._ns, *self._more_ns]

    async def _open_more_async(self, timeout: float | None) -> None:
        """Open the other roots' namespaces (the first is open), on their admin engines."""
        try:
            for ns in self._more_ns:
                await ns.open_async(timeout)
        except BaseException:
            for ns in self._more_ns:
                await ns.close_async(timeout)
            raise

    def _open_more_sync(self, timeout: float | None) -> None:
        try:
            for ns in self._more_ns:
                ns.open_sync(timeout)
        except BaseException:
            for ns in self._more_ns:
                ns.close_sync(timeout)
            raise

    def _roots_stats(self) -> list[dict[str, Any]]:
        """stats()["roots"]: each root's path, health, counts and budget."""
        runner = self._runner
        capacity = runner.capacity if runner is not None else None
        out = []
        for i, (path, ns) in enumerate(zip(self.roots, [self._ns, *self._more_ns])):
            entry: dict[str, Any] = {"path": path, "filesystem": ns.filesystem,
                                     "direct_io": ns.direct.enabled}  # fmt: skip
            if runner is not None:
                entry.update(runner.core.root_stats(i))
            entry.update(capacity_root_stats(capacity, self.capacity_budgets, i))
            out.append(entry)
        return out

    def _runner_for_call(self) -> BatchRunner:
        if self._runner is None:
            raise RuntimeError(f"{type(self).__name__} is not open; use {self._how_to_open}")
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        return self._runner

    _how_to_open = "open()"

    # -- registered buffers ----------------------------------------------------------
    def register(self, buffer: Buffer) -> bool:
        """Register ``buffer`` (writable, page-aligned memory) for fixed-buffer transfers.

        Needs ``fixed_buffers=True``.  Blocks whose memory lies inside a registered buffer move with
        READ_FIXED/WRITE_FIXED: no page pinning per transfer.  The store
        holds the buffer (it cannot be closed or resized) until
        :meth:`unregister` or close.  :func:`~kvuring.aligned_buffer` regions
        are registered automatically.  Returns False, and logs why once, when
        the kernel refuses (RLIMIT_MEMLOCK too low, memory it cannot pin);
        transfers then work as before.
        """
        self._runner_for_call()
        if not self.fixed_buffers:
            raise RuntimeError("register() needs a store opened with fixed_buffers=True")
        assert self._fixed is not None
        return register_buffer(self._fixed, buffer)

    def unregister(self, buffer: Buffer) -> bool:
        """Stop using ``buffer`` for fixed transfers and let it go; False if it was not registered."""
        if self._fixed is None:
            return False
        return self._fixed.remove(buffer)

    def _stats(self, engine: str | None) -> dict[str, Any]:
        out = store_stats(self._ns, self._runner, self._fixed, self._fixed_ready, engine)
        out["roots"] = self._roots_stats()
        runner = self._runner
        out.update(capacity_stats(runner.capacity if runner else None, self.capacity_budgets))
        return out


def register_buffer(fixed: FixedBuffers, buffer: Buffer) -> bool:
    """Check ``buffer`` and register it (both front ends' register())."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError(
            f"buffer must support the buffer protocol, not {type(buffer).__name__}"
        ) from None
    if view.readonly:
        raise TypeError("register needs a writable buffer (the kernel pins it for reading into)")
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return fixed.add(buffer)
