"""What a store finds out about its namespace when it opens: direct I/O, read mode, I/O priority.

Each is a small probe of the filesystem or the process, run once by
:meth:`kvuring.store.BlockStore.open`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from dataclasses import dataclass

from kvuring import _binding as b
from kvuring._format import TRAILER_SIZE
from kvuring._fs import MEMORY_FILESYSTEMS, filesystem_of
from kvuring._regions import aligned_buffer

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
