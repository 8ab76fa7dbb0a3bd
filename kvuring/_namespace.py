"""Opening and closing a namespace, and what a store finds out about it: direct I/O, read mode, I/O priority.

Every filesystem operation of an open or a close -- the directories, their
descriptors, the writer registry, the dead-writer clean-up, the direct-I/O
probe, statx, the manifest -- runs on the namespace's admin engine
(:mod:`kvuring._nsops`), written once as a program that the asyncio front
end awaits (:meth:`Namespace.open_async`) and the polling one waits for
(:meth:`Namespace.open_sync`).  Only /proc is read directly.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Any

from kvuring import _binding as b
from kvuring import _manifest as manifest
from kvuring import _nsops as ops
from kvuring._format import TRAILER_SIZE
from kvuring._fs import MEMORY_FILESYSTEMS, filesystem_of_fd
from kvuring._nsops import AdminEngine, Program, os_error
from kvuring._regions import AlignedBuffer, aligned_buffer
from kvuring._writers import REGISTRY_DIR, WriterRegistration, open_registry, remove_dead_writers

log = logging.getLogger("kvuring")

PAGE = mmap.PAGESIZE

IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_RT = 1
_CAP_SYS_ADMIN = 21
_CAP_SYS_NICE = 23

#: close() of a namespace whose front end gives no deadline
DEFAULT_CLOSE_TIMEOUT = 5.0


def load_priority() -> int:
    """The ioprio for loads' reads: the realtime class where this process may use it, else 0.

    A request waiting on its prefix should not queue behind background
    stores; mq-deadline and bfq serve realtime-class requests first (with
    aging, so stores are not starved).  The kernel refuses the class with
    EPERM without CAP_SYS_NICE or CAP_SYS_ADMIN, so without them loads keep
    the default priority.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            caps = next(line for line in status if line.startswith(b"CapEff:"))
    except (OSError, StopIteration):
        return 0
    eff = int(caps.split()[1], 16)
    if not eff & (1 << _CAP_SYS_NICE | 1 << _CAP_SYS_ADMIN):
        return 0
    return IOPRIO_CLASS_RT << IOPRIO_CLASS_SHIFT | 4


@dataclass(frozen=True)
class DirectIO:
    """Whether O_DIRECT is used, and the alignments it needs."""

    enabled: bool
    mem_align: int = 1
    offset_align: int = 1


def dio_alignment(dfd: int, where: str) -> Program[tuple[int, int]]:
    """(memory, file offset) alignment for O_DIRECT: statx DIOALIGN (6.1+), else a page."""
    op, sx = ops.statx(dfd, ".", 0, b.STATX_DIOALIGN, where)
    res = yield op
    if res == 0 and sx.stx_mask & b.STATX_DIOALIGN and sx.stx_dio_offset_align:
        return max(1, sx.stx_dio_mem_align), sx.stx_dio_offset_align
    return PAGE, PAGE


def probe_direct(
    ns_fd: int, reg_fd: int, where: str, token: str, block_size: int, *, verify: bool,
    requested: bool | str,
) -> Program[DirectIO]:  # fmt: skip
    """Try O_DIRECT on a scratch file in the registry; raise if ``requested`` is True and it fails."""
    if requested is False:
        return DirectIO(False)
    mem_align, offset_align = yield from dio_alignment(ns_fd, where)
    name = f"{token}.probe"
    path = os.path.join(where, REGISTRY_DIR, name)
    size = max(PAGE, offset_align)
    # Kept by the ops that use it (never closed here: a late transfer may still touch it).
    page = aligned_buffer(size)
    pin = b.pin_buffer(page, writable=True)
    why = ""
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_DIRECT | os.O_NOFOLLOW
    fd = yield ops.openat(reg_fd, name, flags, path, 0o600)
    if fd < 0:
        why = f"O_DIRECT is not supported here ({os.strerror(-fd)})"
    else:
        res = yield ops.write_buffer(fd, pin, size, 0, path)
        if res >= 0:
            res = yield ops.read(fd, pin, size, 0, path)
        if res < 0:
            why = f"O_DIRECT is not supported here ({os.strerror(-res)})"
        yield ops.close(fd, path)
    # Some filesystems create the file and only then refuse O_DIRECT.
    yield ops.unlinkat(reg_fd, name, path)
    if not why and (block_size % offset_align or (verify and TRAILER_SIZE % offset_align)):
        why = (
            f"block_size {block_size} is not a multiple of the {offset_align}-byte "
            f"direct I/O alignment"
        )
    if why:
        if requested is True:
            raise OSError(errno.EINVAL, why, where)
        log.info("kvuring: buffered I/O on %s: %s", where, why)
        return DirectIO(False)
    return DirectIO(True, mem_align, offset_align)


def spread_reads(fstype: str, direct_io: bool) -> bool:
    """Whether reads should be marked IOSQE_ASYNC.

    Reads served from memory (tmpfs, or the page cache when buffered)
    complete on one core: inline in the submit, or one at a time on a single
    io-wq worker.  IOSQE_ASYNC hands them to io-wq's workers, which copy in
    parallel (5x faster at 64 KiB on 16 cores).
    """
    return fstype in MEMORY_FILESYSTEMS or not direct_io


class Namespace:
    """An opened namespace: its directory descriptors, this writer's registration, what was probed.

    Opening makes the directories (root, namespace, registry), checks or
    writes the namespace's manifest, removes dead writers' temp files,
    registers this writer and probes direct I/O, each step an operation of
    the namespace's admin engine with a deadline.  Leaf directories are
    made by the block core when a store first needs them.  Both front ends
    (the asyncio :class:`~kvuring.store.BlockStore` and
    :class:`~kvuring.poll.PollingStore`) open one.

    Calls must not overlap.  After an open that failed or timed out, and
    after a close that gave up at its deadline, calling close (or open)
    again continues from where it stopped.
    """

    def __init__(
        self,
        root: str,
        namespace: str,
        block_size: int,
        *,
        verify: bool,
        direct: bool | str,
        prioritize_loads: bool,
        queue_depth: int,
        layout: str = "kvuring",
    ) -> None:
        self.root = root
        self.layout = layout
        self.namespace = namespace
        self.path = os.path.join(root, namespace)
        self.block_size = block_size
        self.verify = verify
        self.direct_requested = direct
        self.prioritize_loads = prioritize_loads
        self.queue_depth = queue_depth
        self.ns_fd = -1
        self.reg_fd = -1
        self.writer: WriterRegistration | None = None
        self.direct = DirectIO(False)
        self.filesystem = "unknown"
        self.spread_reads = False
        self.load_ioprio = 0
        self.dead_writers_cleaned = 0
        self.manifest = manifest.Manifest(block_size, verify, layout)
        self.trailers: AlignedBuffer | None = None
        self.trailers_pin: Any = None
        self._admin: AdminEngine | None = None
        self._opened = False
        self._pid = os.getpid()

    # -- opening -------------------------------------------------------------------
    async def open_async(self, timeout: float | None = 30.0) -> Namespace:
        """Open on the running loop, which keeps running meanwhile; TimeoutError (ETIMEDOUT) if a step hangs.

        On any failure what was opened is released before this raises (or,
        after a timeout, left releasing: :meth:`close_async` finishes it).
        """
        admin = self._admin_for_open()
        try:
            if admin.busy() and not await ops.wait_async(admin, _idle(admin), _at(timeout)):
                raise self._still_busy(timeout)
            admin.releasing = False
            await ops.run_async(admin, self._open_program(), timeout)
        except BaseException as exc:
            self._abort(admin)
            if _wait_after(exc):
                await ops.wait_async(admin, _idle(admin), _at(timeout))
                self._finish_if_idle()
            raise
        self._after_open()
        return self

    def open_sync(self, timeout: float | None = 30.0) -> Namespace:
        """Open, blocking this thread (at most ``timeout`` seconds per step); as :meth:`open_async`."""
        admin = self._admin_for_open()
        try:
            if admin.busy() and not ops.wait_sync(admin, _idle(admin), _at(timeout)):
                raise self._still_busy(timeout)
            admin.releasing = False
            ops.run_sync(admin, self._open_program(), timeout)
        except BaseException as exc:
            self._abort(admin)
            if _wait_after(exc):
                ops.wait_sync(admin, _idle(admin), _at(timeout))
                self._finish_if_idle()
            raise
        self._after_open()
        return self

    def _admin_for_open(self) -> AdminEngine:
        if self._opened:
            raise RuntimeError(f"namespace {self.path} is open already")
        if os.getpid() != self._pid:
            raise RuntimeError(
                "this namespace belongs to another process; after fork() open a new one"
            )
        if self._admin is None:
            self._admin = AdminEngine()
        return self._admin

    def _still_busy(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            errno.ETIMEDOUT,
            f"operations of an earlier open or close are still hung after {timeout:g} s",
            self.path,
        )

    def _open_program(self) -> Program[None]:
        path = self.path
        yield from ops.makedirs(self.root)
        res = yield ops.mkdirat(b.AT_FDCWD, path, 0o755, path)
        if res < 0 and res != -errno.EEXIST:
            raise os_error(res, path)
        # O_NOFOLLOW: a symlink in place of the namespace would send every
        # write somewhere else.
        fd = yield ops.openat(b.AT_FDCWD, path, ops.DIR_FLAGS, path)
        if fd < 0:
            raise os_error(fd, path)
        self.ns_fd = fd
        self.reg_fd = yield from open_registry(fd, path)
        # A namespace of other blocks is refused before anything in it changes.
        found = yield from manifest.read(fd, path)
        if found is not None:
            manifest.check(found, self.manifest, self.namespace, path)
        self.dead_writers_cleaned = yield from remove_dead_writers(fd, self.reg_fd, path)
        self.writer = WriterRegistration(self.reg_fd, os.path.join(path, REGISTRY_DIR))
        yield from self.writer.register()
        self.direct = yield from probe_direct(fd, self.reg_fd, path, self.writer.token,
                                              self.block_size, verify=self.verify,
                                              requested=self.direct_requested)  # fmt: skip
        if found is None:
            found = yield from manifest.publish(fd, self.reg_fd, self.writer.token,
                                                self.manifest, path)  # fmt: skip
            manifest.check(found, self.manifest, self.namespace, path)

    def _after_open(self) -> None:
        # /proc only: nothing here touches the namespace's filesystem.
        self.filesystem = filesystem_of_fd(self.ns_fd)["type"]
        self.spread_reads = spread_reads(self.filesystem, self.direct.enabled)
        self.load_ioprio = load_priority() if self.prioritize_loads else 0
        if self.verify and self.queue_depth and self.trailers_pin is None:
            # One trailer page per slot of the block core (kept for the
            # namespace's life: a chain of an abandoned block engine may
            # still touch its page).
            if self.trailers is None:
                self.trailers = aligned_buffer(self.queue_depth * TRAILER_SIZE)
            self.trailers_pin = b.pin_buffer(self.trailers, writable=True)
        self._opened = True

    def _abort(self, admin: AdminEngine) -> None:
        """Start releasing what a failed open holds (the registry entry, scratch files, descriptors)."""
        if not admin.releasing:
            self._release(admin, keep_registry=False, scratch=True)

    def engine_for(self, requested: str) -> str:
        """The engine to open: ``requested``, except that ``auto`` on a memory filesystem is threads.

        Reads and writes there are memory copies.  The thread engine's
        workers run each block's open, copy, checksum and close back to
        back on one core, in parallel; io_uring hands the copies to io-wq
        workers one step at a time and leaves the checksums to the thread
        that reaps.  Measured on tmpfs (docs/benchmarks.md), the threads
        moved 64 KiB blocks at 1.2-1.3x the ring's rate with less CPU.
        """
        if requested == "auto" and self.filesystem in MEMORY_FILESYSTEMS:
            return "threads"
        return requested

    @property
    def trailers_addr(self) -> int:
        return b.address_of(self.trailers_pin) if self.trailers_pin is not None else 0

    # -- closing -------------------------------------------------------------------
    async def close_async(self, timeout: float | None, keep_registry: bool = False) -> bool:
        """Unregister this writer, close the descriptors and the admin engine, awaiting on the loop.

        True once everything is released; False when ``timeout`` seconds
        passed first (a hung filesystem): call it again to go on.
        ``keep_registry`` leaves this writer's lock file (its flock released)
        for the next open to clean up the leaves it lists, as a dead
        writer's; it counts on the first call only.  Call it after the
        block engine is closed: the block core writes to ``writer.fd``.
        """
        admin = self._begin_close(keep_registry)
        if admin is None:
            return True
        if not await ops.wait_async(admin, _idle(admin), _at(timeout)):
            return False
        return self._finish_if_idle()

    def close_sync(self, timeout: float | None, keep_registry: bool = False) -> bool:
        """As :meth:`close_async`, blocking this thread for at most ``timeout`` seconds."""
        admin = self._begin_close(keep_registry)
        if admin is None:
            return True
        if not ops.wait_sync(admin, _idle(admin), _at(timeout)):
            return False
        return self._finish_if_idle()

    def open(self, timeout: float | None = 30.0) -> Namespace:
        """:meth:`open_sync` (blocks the caller while the steps run; an event loop uses open_async)."""
        return self.open_sync(timeout)

    def close(self, *, keep_registry: bool = False) -> None:
        """:meth:`close_sync` with a deadline of DEFAULT_CLOSE_TIMEOUT seconds (blocks the caller)."""
        self.close_sync(DEFAULT_CLOSE_TIMEOUT, keep_registry)

    def _begin_close(self, keep_registry: bool) -> AdminEngine | None:
        """Start the release (once); the admin engine to wait for, or None when nothing is held."""
        self._opened = False
        admin = self._admin
        if admin is None:
            self._drop_memory()
            return None
        if os.getpid() != self._pid:
            # A forked child: the engine's threads are the parent's, and so
            # are the registry entry and the files.  Drop the copies.
            for fd in admin.fds:
                os.close(fd)
            admin.fds.clear()
            self._admin = None
            self._forget()
            return None
        if not admin.releasing:
            self._release(admin, keep_registry=keep_registry, scratch=False)
        return admin

    def _release(self, admin: AdminEngine, *, keep_registry: bool, scratch: bool) -> None:
        first = []
        if self.writer is not None and self.reg_fd >= 0:
            first = self.writer.release_ops(keep_registry=keep_registry, scratch=scratch)
        admin.release(first)
        # The descriptors now belong to the release chain.
        self._forget()

    def _forget(self) -> None:
        self.ns_fd = self.reg_fd = -1
        if self.writer is not None:
            self.writer.fd = -1
        self._drop_memory()

    def _finish_if_idle(self) -> bool:
        admin = self._admin
        if admin is None:
            return True
        admin.reap()
        if not admin.close():
            return False
        self._admin = None
        return True

    def _drop_memory(self) -> None:
        if self.trailers_pin is not None:
            b.ffi.release(self.trailers_pin)
            self.trailers_pin = None


def _idle(admin: AdminEngine) -> Any:
    return lambda: not admin.busy()


def _at(timeout: float | None) -> float | None:
    return ops._deadline(timeout)


def _wait_after(exc: BaseException) -> bool:
    """Whether a failed open waits for its release: not after a timeout or a cancel."""
    return isinstance(exc, Exception) and not isinstance(exc, TimeoutError)
