"""Opening a namespace, and what a store finds out about it: direct I/O, read mode, I/O priority.

Each probe is a small look at the filesystem or the process, run once by
:meth:`Namespace.open`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Any

from kvuring import _binding as b
from kvuring._format import TRAILER_SIZE
from kvuring._fs import MEMORY_FILESYSTEMS, filesystem_of
from kvuring._regions import AlignedBuffer, aligned_buffer
from kvuring._writers import WriterRegistration, open_registry, remove_dead_writers

log = logging.getLogger("kvuring")

PAGE = mmap.PAGESIZE

IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_RT = 1
_CAP_SYS_ADMIN = 21
_CAP_SYS_NICE = 23


def dio_alignment(path: str) -> tuple[int, int]:
    """(memory, file offset) alignment for O_DIRECT: statx DIOALIGN (6.1+), else a page."""
    sx = b.ffi.new("struct statx *")
    res = b.lib.kvu_statx(b.AT_FDCWD, os.fsencode(path), 0, b.STATX_DIOALIGN, sx)
    if res == 0 and sx.stx_mask & b.STATX_DIOALIGN and sx.stx_dio_offset_align:
        return max(1, sx.stx_dio_mem_align), sx.stx_dio_offset_align
    return PAGE, PAGE


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


def probe_direct(
    ns: str, reg_fd: int, token: str, block_size: int, *, verify: bool, requested: bool | str
) -> DirectIO:
    """Try O_DIRECT on a scratch file in the registry; raise if ``requested`` is True and it fails."""
    if requested is False:
        return DirectIO(False)
    mem_align, offset_align = dio_alignment(ns)
    probe = f"{token}.probe"
    page = aligned_buffer(max(PAGE, offset_align))
    why = ""
    try:
        fd = os.open(
            probe,
            os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
            dir_fd=reg_fd,
        )
        try:
            os.pwrite(fd, page, 0)
            os.preadv(fd, [page], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        why = f"O_DIRECT is not supported here ({exc.strerror})"
    finally:
        # Some filesystems create the file and only then refuse O_DIRECT.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe, dir_fd=reg_fd)
        page.close()
    if not why and (block_size % offset_align or (verify and TRAILER_SIZE % offset_align)):
        why = (
            f"block_size {block_size} is not a multiple of the {offset_align}-byte "
            f"direct I/O alignment"
        )
    if why:
        if requested is True:
            raise OSError(errno.EINVAL, why, ns)
        log.info("kvuring: buffered I/O on %s: %s", ns, why)
        return DirectIO(False)
    return DirectIO(True, mem_align, offset_align)


def spread_reads(ns: str, direct_io: bool) -> tuple[str, bool]:
    """(filesystem type, whether reads should be marked IOSQE_ASYNC).

    Reads served from memory (tmpfs, or the page cache when buffered)
    complete on one core: inline in the submit, or one at a time on a single
    io-wq worker.  IOSQE_ASYNC hands them to io-wq's workers, which copy in
    parallel (5x faster at 64 KiB on 16 cores).
    """
    fstype = filesystem_of(ns)["type"]
    return fstype, fstype in MEMORY_FILESYSTEMS or not direct_io


#: the upper fan-out directories: the first 3 hex digits of a key
FANOUT = tuple(f"{i:03x}" for i in range(4096))


class Namespace:
    """An opened namespace: its directory descriptors, this writer's registration, what was probed.

    Opening makes the directories, removes dead writers' temp files,
    registers this writer and probes direct I/O.  The 4096 upper fan-out
    directories are made once per namespace (with them in place a store
    into a new leaf costs two operations in its chain: check the upper
    directory, make the leaf); the block core makes any that vanish.  Both
    front ends (the asyncio
    :class:`~kvuring.store.BlockStore` and :class:`~kvuring.poll.PollingStore`)
    open one.
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
        self.trailers: AlignedBuffer | None = None
        self.trailers_pin: Any = None

    def open(self) -> Namespace:
        os.makedirs(self.root, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.path, 0o755)
        # O_NOFOLLOW: a symlink in place of the namespace would send every
        # write somewhere else.
        self.ns_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self.reg_fd = open_registry(self.ns_fd)
            self.dead_writers_cleaned = remove_dead_writers(self.ns_fd, self.reg_fd)
            self.writer = WriterRegistration(self.reg_fd)
            self.direct = probe_direct(self.path, self.reg_fd, self.writer.token, self.block_size,
                                       verify=self.verify, requested=self.direct_requested)  # fmt: skip
            self.filesystem, self.spread_reads = spread_reads(self.path, self.direct.enabled)
            self.load_ioprio = load_priority() if self.prioritize_loads else 0
            if self.verify:
                # One trailer page per slot of the block core.
                self.trailers = aligned_buffer(self.queue_depth * TRAILER_SIZE)
                self.trailers_pin = b.pin_buffer(self.trailers, writable=True)
        except BaseException:
            self.close()
            raise
        return self

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

    #: in the registry: the upper fan-out directories exist
    FANOUT_MARKER = "fanout-ready"

    def fanout_needed(self) -> bool:
        """Whether the 4096 upper fan-out directories still have to be made (first open)."""
        try:
            os.stat(self.FANOUT_MARKER, dir_fd=self.reg_fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        return False

    def fanout_done(self) -> None:
        flags = os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(self.FANOUT_MARKER, flags, 0o600, dir_fd=self.reg_fd))

    def make_fanout(self) -> None:
        """Make the upper fan-out directories with plain syscalls (the polling front end)."""
        if not self.fanout_needed():
            return
        for name in FANOUT:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=self.ns_fd)
        self.fanout_done()

    @property
    def trailers_addr(self) -> int:
        return b.address_of(self.trailers_pin) if self.trailers_pin is not None else 0

    def close(self, *, keep_registry: bool = False) -> None:
        """Unregister this writer and close the descriptors; idempotent.

        ``keep_registry``: leave this writer's registry entry for the next
        open to clean up after (see WriterRegistration.close).
        """
        if self.writer is not None:
            self.writer.close(keep=keep_registry)
            self.writer = None
        for name in ("reg_fd", "ns_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):  # released even on error
                    os.close(fd)
                setattr(self, name, -1)
        if self.trailers_pin is not None:
            b.ffi.release(self.trailers_pin)
            self.trailers_pin = None
