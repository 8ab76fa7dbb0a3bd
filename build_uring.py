"""cffi build script for ``kvuring._uring`` (out-of-line API mode).

Importing this module only builds an ``FFI`` description; nothing is compiled
until setuptools (through ``cffi_modules``) or ``python build_uring.py`` asks.

liburing and libxxhash are located with pkg-config.  Set
``KVURING_LIBURING_CFLAGS`` and ``KVURING_LIBURING_LIBS`` (or
``KVURING_XXHASH_LIBS``) to override (for a library built from source), or
``KVURING_PKG_CONFIG`` to name another pkg-config binary.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from cffi import FFI

# --- C declarations visible to Python --------------------------------------
# Structs end in "...;" so the compiler supplies the real layout; constants
# are "..." so their values come from the headers actually installed.

CDEF_LIBURING = """
struct io_uring_sqe { uint8_t opcode; uint8_t flags; uint16_t ioprio; uint64_t user_data; ...; };
struct io_uring_cqe { uint64_t user_data; int32_t res; uint32_t flags; ...; };
struct io_uring_sq { unsigned ring_entries; ...; };
struct io_uring_cq { unsigned ring_entries; ...; };
struct io_uring { struct io_uring_sq sq; struct io_uring_cq cq; unsigned flags; int ring_fd; unsigned features; ...; };
struct io_uring_params { uint32_t sq_entries; uint32_t cq_entries; uint32_t flags;
                         uint32_t sq_thread_cpu; uint32_t sq_thread_idle; uint32_t features; ...; };
struct io_uring_probe;
struct iovec { void *iov_base; size_t iov_len; };
struct __kernel_timespec { int64_t tv_sec; long long tv_nsec; };
struct statx_timestamp { int64_t tv_sec; uint32_t tv_nsec; ...; };
struct statx { uint32_t stx_mask; uint32_t stx_blksize; uint64_t stx_attributes;
               uint32_t stx_nlink; uint32_t stx_uid; uint32_t stx_gid; uint16_t stx_mode;
               uint64_t stx_ino; uint64_t stx_size; uint64_t stx_blocks;
               struct statx_timestamp stx_mtime;
               uint32_t stx_dio_mem_align; uint32_t stx_dio_offset_align; ...; };

int io_uring_queue_init_params(unsigned entries, struct io_uring *ring, struct io_uring_params *p);
void io_uring_queue_exit(struct io_uring *ring);
struct io_uring_probe *io_uring_get_probe_ring(struct io_uring *ring);
void io_uring_free_probe(struct io_uring_probe *probe);
int io_uring_opcode_supported(const struct io_uring_probe *p, int op);
struct io_uring_sqe *io_uring_get_sqe(struct io_uring *ring);
int io_uring_submit(struct io_uring *ring);
int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
int io_uring_get_events(struct io_uring *ring);
int io_uring_peek_cqe(struct io_uring *ring, struct io_uring_cqe **cqe_ptr);
int io_uring_wait_cqe(struct io_uring *ring, struct io_uring_cqe **cqe_ptr);
void io_uring_cqe_seen(struct io_uring *ring, struct io_uring_cqe *cqe);
void io_uring_cq_advance(struct io_uring *ring, unsigned nr);
unsigned io_uring_sq_ready(const struct io_uring *ring);
unsigned io_uring_sq_space_left(const struct io_uring *ring);
unsigned io_uring_cq_ready(const struct io_uring *ring);
int io_uring_register_eventfd(struct io_uring *ring, int fd);
int io_uring_unregister_eventfd(struct io_uring *ring);
int io_uring_register_files_sparse(struct io_uring *ring, unsigned nr);
int io_uring_unregister_files(struct io_uring *ring);
int io_uring_register_iowq_max_workers(struct io_uring *ring, unsigned int *values);
int io_uring_register_buffers_sparse(struct io_uring *ring, unsigned nr);
int io_uring_unregister_buffers(struct io_uring *ring);

void io_uring_prep_nop(struct io_uring_sqe *sqe);
void io_uring_prep_openat(struct io_uring_sqe *sqe, int dfd, const char *path, int flags, unsigned mode);
void io_uring_prep_openat_direct(struct io_uring_sqe *sqe, int dfd, const char *path, int flags,
                                 unsigned mode, unsigned file_index);
struct open_how { uint64_t flags; uint64_t mode; uint64_t resolve; };
void io_uring_prep_openat2_direct(struct io_uring_sqe *sqe, int dfd, const char *path, struct open_how *how,
                                  unsigned file_index);
void io_uring_prep_openat2(struct io_uring_sqe *sqe, int dfd, const char *path, struct open_how *how);
void io_uring_prep_read(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes, uint64_t offset);
void io_uring_prep_write(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes, uint64_t offset);
void io_uring_prep_read_fixed(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes,
                              uint64_t offset, int buf_index);
void io_uring_prep_write_fixed(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                               uint64_t offset, int buf_index);
void io_uring_prep_readv(struct io_uring_sqe *sqe, int fd, const struct iovec *iovecs, unsigned nr_vecs,
                         uint64_t offset);
void io_uring_prep_writev(struct io_uring_sqe *sqe, int fd, const struct iovec *iovecs, unsigned nr_vecs,
                          uint64_t offset);
void io_uring_prep_close(struct io_uring_sqe *sqe, int fd);
void io_uring_prep_close_direct(struct io_uring_sqe *sqe, unsigned file_index);
void io_uring_prep_renameat(struct io_uring_sqe *sqe, int olddfd, const char *oldpath, int newdfd,
                            const char *newpath, unsigned int flags);
void io_uring_prep_unlinkat(struct io_uring_sqe *sqe, int dfd, const char *path, int flags);
void io_uring_prep_mkdirat(struct io_uring_sqe *sqe, int dfd, const char *path, unsigned mode);
void io_uring_prep_statx(struct io_uring_sqe *sqe, int dfd, const char *path, int flags, unsigned mask,
                         struct statx *statxbuf);
void io_uring_prep_fsync(struct io_uring_sqe *sqe, int fd, unsigned fsync_flags);
void io_uring_prep_cancel64(struct io_uring_sqe *sqe, uint64_t user_data, int flags);
void io_uring_prep_link_timeout(struct io_uring_sqe *sqe, struct __kernel_timespec *ts, unsigned flags);

#define IORING_SETUP_IOPOLL ...
#define IORING_SETUP_SQPOLL ...
#define IORING_SETUP_CQSIZE ...
#define IORING_SETUP_CLAMP ...
#define IORING_SETUP_SUBMIT_ALL ...
#define IORING_SETUP_COOP_TASKRUN ...
#define IORING_SETUP_SINGLE_ISSUER ...
#define IORING_SETUP_DEFER_TASKRUN ...

#define IORING_FEAT_NODROP ...
#define IORING_FEAT_FAST_POLL ...
#define IORING_FEAT_CQE_SKIP ...
#define IORING_FEAT_LINKED_FILE ...

#define IOSQE_FIXED_FILE ...
#define IOSQE_IO_DRAIN ...
#define IOSQE_IO_LINK ...
#define IOSQE_IO_HARDLINK ...
#define IOSQE_ASYNC ...
#define IOSQE_CQE_SKIP_SUCCESS ...

#define IORING_ASYNC_CANCEL_ALL ...

#define IORING_OP_NOP ...
#define IORING_OP_READV ...
#define IORING_OP_WRITEV ...
#define IORING_OP_FSYNC ...
#define IORING_OP_READ_FIXED ...
#define IORING_OP_WRITE_FIXED ...
#define IORING_OP_ASYNC_CANCEL ...
#define IORING_OP_LINK_TIMEOUT ...
#define IORING_OP_OPENAT ...
#define IORING_OP_OPENAT2 ...
#define IORING_OP_CLOSE ...
#define IORING_OP_STATX ...
#define IORING_OP_READ ...
#define IORING_OP_WRITE ...
#define IORING_OP_RENAMEAT ...
#define IORING_OP_UNLINKAT ...
#define IORING_OP_MKDIRAT ...
#define IORING_OP_LAST ...

#define AT_FDCWD ...
#define AT_SYMLINK_NOFOLLOW ...
#define AT_REMOVEDIR ...
#define IORING_FSYNC_DATASYNC ...
#define RESOLVE_BENEATH ...
#define RESOLVE_NO_SYMLINKS ...
#define RESOLVE_NO_MAGICLINKS ...
#define RENAME_NOREPLACE ...
#define STATX_BASIC_STATS ...
#define STATX_DIOALIGN ...
"""


# What Python calls of kvuring's own C: the part of kvuring/_csrc/kvu.h
# between its "cdef: begin" and "cdef: end" markers, read as it is, so the
# cdef cannot drift from the header the C is compiled against.
def _kvu_cdef(csrc: str) -> str:
    with open(os.path.join(csrc, "kvu.h"), encoding="utf-8") as header:
        text = header.read()
    begin, end = text.index("cdef: begin"), text.index("/* cdef: end */")
    return text[text.index("*/", begin) + 2 : end]


# The C sources, relative to this file (setuptools wants relative paths).
CSRC = "kvuring/_csrc"
C_SOURCES = [
    "ops.c",
    "chain.c",
    "pool.c",
    "format.c",
    "blocks.c",
    "chains.c",
    "stores.c",
    "deadlines.c",
    "roots.c",
]
C_HEADERS = ["kvu.h", "blocks.h"]

# Always -Wall -Wextra; KVURING_STRICT_BUILD=1 (the test run sets it) makes
# every warning an error, so a type mismatch with the installed headers
# cannot hide behind a quiet pip.  KVURING_SANITIZE=1 builds with
# AddressSanitizer and UndefinedBehaviorSanitizer (see tests/sanitize.sh).
WARNINGS = ["-Wall", "-Wextra"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


# pkg-config name -> (Debian/Ubuntu package, environment variables that override it)
_PACKAGES = {
    "liburing": ("liburing-dev", "KVURING_LIBURING_CFLAGS and KVURING_LIBURING_LIBS"),
    "libxxhash": ("libxxhash-dev", "KVURING_XXHASH_LIBS"),
}


def _pkg_config(package: str, *args: str) -> list[str]:
    tool = os.environ.get("KVURING_PKG_CONFIG", "pkg-config")
    try:
        out = subprocess.run([tool, *args, package], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        deb, env = _PACKAGES[package]
        raise RuntimeError(
            f"{package} not found by pkg-config; install it (Debian/Ubuntu: "
            f"apt-get install {deb} pkg-config) or set {env}"
        ) from exc
    return shlex.split(out.stdout)


def _flags(env: str, *pkg_args: str, package: str = "liburing") -> list[str]:
    if env in os.environ:
        return shlex.split(os.environ[env])
    return _pkg_config(package, *pkg_args)


def make_ffi(csrc: str = CSRC) -> FFI:
    """Describe the extension; compiling is left to the caller.

    setuptools gets this function itself (``cffi_modules`` accepts a
    callable), so importing the module runs no pkg-config.  ``csrc`` is
    where the C sources are: relative for setuptools, absolute for
    ``FFI.compile(tmpdir=...)``, which builds from inside ``tmpdir``.
    """
    ffi = FFI()
    ffi.cdef(CDEF_LIBURING)
    ffi.cdef(_kvu_cdef(os.path.join(os.path.dirname(os.path.abspath(__file__)), csrc)))
    cflags = _flags("KVURING_LIBURING_CFLAGS", "--cflags")
    libs = _flags("KVURING_LIBURING_LIBS", "--libs")
    libs += _flags("KVURING_XXHASH_LIBS", "--libs", package="libxxhash")
    compile_args = [*cflags, "-O2", *WARNINGS]
    link_args = list(libs)
    if os.environ.get("KVURING_STRICT_BUILD") == "1":
        compile_args.append("-Werror")
    if os.environ.get("KVURING_SANITIZE") == "1":
        compile_args += [*SANITIZE, "-O1", "-g"]
        link_args += SANITIZE
    ffi.set_source(
        "kvuring._uring",
        '#include "kvu.h"\n',
        sources=[f"{csrc}/{name}" for name in C_SOURCES],
        include_dirs=[csrc],
        # Rebuild when any C file changes, not only the generated wrapper.
        depends=[f"{csrc}/{name}" for name in (*C_SOURCES, *C_HEADERS)],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        libraries=["pthread"],
    )
    return ffi


if __name__ == "__main__":
    make_ffi().compile(verbose=True)
