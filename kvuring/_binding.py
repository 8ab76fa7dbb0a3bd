"""The only module that touches the compiled extension directly.

``Any`` stays confined here: everything above sees typed helpers.
"""

from __future__ import annotations

import os
from typing import Any

from kvuring._uring import ffi as _ffi
from kvuring._uring import lib as _lib

ffi: Any = _ffi
lib: Any = _lib

OP_WORDS: int = lib.KVU_OP_WORDS

# Opcodes and SQE flags as plain ints, so hot paths avoid attribute lookups on lib.
OP_NOP: int = lib.IORING_OP_NOP
OP_OPENAT: int = lib.IORING_OP_OPENAT
OP_OPENAT2: int = lib.IORING_OP_OPENAT2
OP_CLOSE: int = lib.IORING_OP_CLOSE
OP_READ: int = lib.IORING_OP_READ
OP_WRITE: int = lib.IORING_OP_WRITE
OP_READ_FIXED: int = lib.IORING_OP_READ_FIXED
OP_WRITE_FIXED: int = lib.IORING_OP_WRITE_FIXED
OP_READV: int = lib.IORING_OP_READV
OP_WRITEV: int = lib.IORING_OP_WRITEV
OP_RENAMEAT: int = lib.IORING_OP_RENAMEAT
OP_UNLINKAT: int = lib.IORING_OP_UNLINKAT
OP_MKDIRAT: int = lib.IORING_OP_MKDIRAT
OP_STATX: int = lib.IORING_OP_STATX
OP_FSYNC: int = lib.IORING_OP_FSYNC
OP_ASYNC_CANCEL: int = lib.IORING_OP_ASYNC_CANCEL
OP_LINK_TIMEOUT: int = lib.IORING_OP_LINK_TIMEOUT

SQE_FIXED_FILE: int = lib.IOSQE_FIXED_FILE
SQE_IO_DRAIN: int = lib.IOSQE_IO_DRAIN
SQE_IO_LINK: int = lib.IOSQE_IO_LINK
SQE_IO_HARDLINK: int = lib.IOSQE_IO_HARDLINK
SQE_ASYNC: int = lib.IOSQE_ASYNC
SQE_CQE_SKIP_SUCCESS: int = lib.IOSQE_CQE_SKIP_SUCCESS

AT_FDCWD: int = lib.AT_FDCWD
AT_SYMLINK_NOFOLLOW: int = lib.AT_SYMLINK_NOFOLLOW
AT_REMOVEDIR: int = lib.AT_REMOVEDIR
RENAME_NOREPLACE: int = lib.RENAME_NOREPLACE
RESOLVE_BENEATH: int = lib.RESOLVE_BENEATH
RESOLVE_NO_SYMLINKS: int = lib.RESOLVE_NO_SYMLINKS
RESOLVE_NO_MAGICLINKS: int = lib.RESOLVE_NO_MAGICLINKS
STATX_BASIC_STATS: int = lib.STATX_BASIC_STATS
STATX_DIOALIGN: int = lib.STATX_DIOALIGN
FSYNC_DATASYNC: int = lib.IORING_FSYNC_DATASYNC

# The statx fields kvuring reads; the struct itself is 256 bytes.
STATX_SIZE: int = ffi.sizeof("struct statx")


def address_of(cdata: Any) -> int:
    """The address of a cffi object as an int, for an operation word."""
    return int(ffi.cast("uintptr_t", cdata))


def pin_buffer(buf: Any, *, writable: bool) -> Any:
    """Take a reference to ``buf``'s memory that keeps it alive while the kernel uses it."""
    return ffi.from_buffer(buf, require_writable=writable)


def c_path(path: bytes) -> Any:
    """A NUL-terminated copy of ``path`` that lives as long as the returned object."""
    return ffi.new("char[]", path)


def os_error(res: int, path: object = None, path2: object = None) -> OSError:
    """The OSError for a negative io_uring result, with the path(s) it concerns."""
    err = -res
    return OSError(err, os.strerror(err), path, None, path2)
