"""cffi build script for ``kvuring._uring`` (out-of-line API mode).

Importing this module only builds an ``FFI`` description; nothing is compiled
until setuptools (through ``cffi_modules``) or ``python build_uring.py`` asks.

liburing is located with pkg-config.  Set ``KVURING_LIBURING_CFLAGS`` and
``KVURING_LIBURING_LIBS`` to override (for a liburing built from source), or
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
int io_uring_register_buffers_update_tag(struct io_uring *ring, unsigned off, const struct iovec *iovecs,
                                         const uint64_t *tags, unsigned nr);
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

# The batch helpers: Python hands over whole arrays, C loops over them.
CDEF_KVURING = """
#define KVU_OP_WORDS ...
int kvu_prep_ops(struct io_uring *ring, const uint64_t *ops, unsigned n);
unsigned kvu_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res, unsigned max);
int kvu_statx(int dfd, const char *path, int flags, unsigned mask, struct statx *buf);
unsigned kvu_run_chain(const uint64_t *ops, unsigned n, int *files, unsigned nfiles,
                       uint64_t *user_data, int32_t *res);
"""

C_SOURCE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <linux/stat.h>
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/openat2.h>
#include <liburing.h>

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0)
#endif
#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif

/*
 * One operation is KVU_OP_WORDS 64-bit words, so Python can append a whole
 * operation to an array.array('Q') in one call:
 *   0 opcode  1 sqe flags  2 fd (or direct slot, or dirfd)  3 addr
 *   4 len     5 offset     6 user_data  7 arg1  8 arg2  9 arg3
 * arg1..arg3 are per opcode (see kvuring/_ops.py, which writes them).
 */
#define KVU_OP_WORDS 10

static int kvu_prep_one(struct io_uring_sqe *sqe, const uint64_t *w)
{
    int fd = (int)(int64_t)w[2];
    void *addr = (void *)(uintptr_t)w[3];
    unsigned len = (unsigned)w[4];
    uint64_t off = w[5];

    switch ((int)w[0]) {
    case IORING_OP_NOP:
        io_uring_prep_nop(sqe);
        break;
    case IORING_OP_OPENAT:
        /* arg1 open flags, arg2 mode, arg3 direct slot + 1 (0: plain fd) */
        if (w[9])
            io_uring_prep_openat_direct(sqe, fd, addr, (int)w[7], (unsigned)w[8], (unsigned)(w[9] - 1));
        else
            io_uring_prep_openat(sqe, fd, addr, (int)w[7], (unsigned)w[8]);
        break;
    case IORING_OP_OPENAT2:
        /* arg2 struct open_how *, arg3 direct slot + 1 (0: plain fd) */
        if (w[9])
            io_uring_prep_openat2_direct(sqe, fd, addr, (struct open_how *)(uintptr_t)w[8],
                                         (unsigned)(w[9] - 1));
        else
            io_uring_prep_openat2(sqe, fd, addr, (struct open_how *)(uintptr_t)w[8]);
        break;
    case IORING_OP_CLOSE:
        /* arg3 direct slot + 1 (0: plain fd) */
        if (w[9])
            io_uring_prep_close_direct(sqe, (unsigned)(w[9] - 1));
        else
            io_uring_prep_close(sqe, fd);
        break;
    case IORING_OP_READ:
        io_uring_prep_read(sqe, fd, addr, len, off);
        break;
    case IORING_OP_WRITE:
        io_uring_prep_write(sqe, fd, addr, len, off);
        break;
    case IORING_OP_READ_FIXED:
        /* arg2 registered buffer index */
        io_uring_prep_read_fixed(sqe, fd, addr, len, off, (int)w[8]);
        break;
    case IORING_OP_WRITE_FIXED:
        io_uring_prep_write_fixed(sqe, fd, addr, len, off, (int)w[8]);
        break;
    case IORING_OP_READV:
        io_uring_prep_readv(sqe, fd, addr, len, off);
        break;
    case IORING_OP_WRITEV:
        io_uring_prep_writev(sqe, fd, addr, len, off);
        break;
    case IORING_OP_RENAMEAT:
        /* arg1 rename flags, arg2 new dirfd, arg3 new path */
        io_uring_prep_renameat(sqe, fd, addr, (int)(int64_t)w[8], (const char *)(uintptr_t)w[9],
                               (unsigned)w[7]);
        break;
    case IORING_OP_UNLINKAT:
        io_uring_prep_unlinkat(sqe, fd, addr, (int)w[7]);
        break;
    case IORING_OP_MKDIRAT:
        io_uring_prep_mkdirat(sqe, fd, addr, (unsigned)w[8]);
        break;
    case IORING_OP_STATX:
        /* arg1 AT_* flags, arg2 mask, arg3 struct statx * */
        io_uring_prep_statx(sqe, fd, addr, (int)w[7], (unsigned)w[8], (struct statx *)(uintptr_t)w[9]);
        break;
    case IORING_OP_FSYNC:
        io_uring_prep_fsync(sqe, fd, (unsigned)w[7]);
        break;
    case IORING_OP_ASYNC_CANCEL:
        /* addr is the user_data to cancel, arg1 cancel flags */
        io_uring_prep_cancel64(sqe, w[3], (int)w[7]);
        break;
    case IORING_OP_LINK_TIMEOUT:
        io_uring_prep_link_timeout(sqe, addr, (unsigned)w[7]);
        break;
    default:
        return -1;
    }
    sqe->flags = (uint8_t)w[1];
    sqe->user_data = w[6];
    switch ((int)w[0]) {
    case IORING_OP_READ: case IORING_OP_WRITE: case IORING_OP_READ_FIXED:
    case IORING_OP_WRITE_FIXED: case IORING_OP_READV: case IORING_OP_WRITEV:
        /* arg3 of a transfer: its I/O priority (ioprio(7) value; 0 = the task's) */
        sqe->ioprio = (uint16_t)w[9];
        break;
    }
    return 0;
}

/*
 * Prepare n operations.  All or nothing: if the SQ has fewer than n free
 * entries, or one opcode is unknown, nothing is written (-EBUSY, -EINVAL),
 * so a linked chain is never split across two submits.
 */
int kvu_prep_ops(struct io_uring *ring, const uint64_t *ops, unsigned n)
{
    unsigned i;
    if (io_uring_sq_space_left(ring) < n)
        return -EBUSY;
    for (i = 0; i < n; i++) {
        switch ((int)ops[i * KVU_OP_WORDS]) {
        case IORING_OP_NOP: case IORING_OP_OPENAT: case IORING_OP_OPENAT2: case IORING_OP_CLOSE:
        case IORING_OP_READ: case IORING_OP_WRITE: case IORING_OP_READ_FIXED:
        case IORING_OP_WRITE_FIXED: case IORING_OP_READV: case IORING_OP_WRITEV:
        case IORING_OP_RENAMEAT: case IORING_OP_UNLINKAT: case IORING_OP_MKDIRAT:
        case IORING_OP_STATX: case IORING_OP_FSYNC: case IORING_OP_ASYNC_CANCEL:
        case IORING_OP_LINK_TIMEOUT:
            break;
        default:
            return -EINVAL;
        }
    }
    for (i = 0; i < n; i++)
        kvu_prep_one(io_uring_get_sqe(ring), ops + (size_t)i * KVU_OP_WORDS);
    return (int)n;
}

/* Copy every available CQE into the two arrays and advance the CQ once. */
unsigned kvu_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res, unsigned max)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (n == max)
            break;
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
    }
    if (n)
        io_uring_cq_advance(ring, n);
    return n;
}

/*
 * The thread engine: run one linked chain with plain syscalls on the calling
 * thread (cffi releases the GIL around this call), keeping io_uring's rules so
 * the code above it cannot tell the engines apart:
 *  - a failed or short read/write breaks a soft link: later links get
 *    -ECANCELED; a hard link runs on;
 *  - but, as in current kernels (seen on 6.18; 5.x differed), a negative
 *    result from statx, mkdirat, unlinkat, renameat or fsync is only a
 *    result, not a failure: it breaks no link and CQE_SKIP_SUCCESS
 *    still hides it (fsync fails only when its fd is bad) -- see kvu_fails;
 *  - IOSQE_CQE_SKIP_SUCCESS hides successful completions; when a request
 *    that carries it fails, the links it cancels post nothing either;
 *  - direct descriptors live in files[] (-1 = empty); opening into a used
 *    slot closes the old file.
 * Returns the number of completions written to user_data[]/res[].
 */
static int64_t kvu_fd(const uint64_t *w, int *files, unsigned nfiles)
{
    int64_t fd = (int64_t)w[2];
    if (!(w[1] & IOSQE_FIXED_FILE))
        return fd;
    if (fd < 0 || (uint64_t)fd >= nfiles || files[fd] < 0)
        return -EBADF;
    return files[fd];
}

static int64_t kvu_install(int newfd, uint64_t slot_plus_one, int *files, unsigned nfiles)
{
    unsigned slot;
    if (newfd < 0)
        return -errno;
    if (!slot_plus_one)
        return newfd;
    slot = (unsigned)(slot_plus_one - 1);
    if (slot >= nfiles) {
        close(newfd);
        return -EINVAL;
    }
    if (files[slot] >= 0)
        close(files[slot]);
    files[slot] = newfd;
    return 0;
}

/*
 * A read or write as io_uring does it: the offset of a stream (pipe,
 * socket, tty) is ignored, and offset -1 means the file position; plain
 * pread/pwrite would refuse both (ESPIPE, EINVAL).
 */
static int64_t kvu_rw(int reading, int fd, const struct iovec *iov, int cnt, uint64_t offset)
{
    off_t pos = (off_t)offset;
    ssize_t r;
    for (;;) {
        if (pos == -1)
            r = reading ? readv(fd, iov, cnt) : writev(fd, iov, cnt);
        else
            r = reading ? preadv(fd, iov, cnt, pos) : pwritev(fd, iov, cnt, pos);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if (errno == ESPIPE && pos != -1) {
            pos = -1;
            continue;
        }
        return -errno;
    }
}

static int64_t kvu_exec_one(const uint64_t *w, int *files, unsigned nfiles, int64_t *want)
{
    int64_t fd = kvu_fd(w, files, nfiles);
    void *addr = (void *)(uintptr_t)w[3];
    unsigned len = (unsigned)w[4];
    int64_t r;
    unsigned i;

    *want = -1;
    if (fd == -EBADF && (w[1] & IOSQE_FIXED_FILE))
        return -EBADF;
    switch ((int)w[0]) {
    case IORING_OP_NOP:
        return 0;
    case IORING_OP_OPENAT:
        /* io_uring refuses O_CLOEXEC for direct slots (EINVAL); so do we, and
         * then add it, since our "slots" are real fds a fork would inherit. */
        if (w[9] && (w[7] & O_CLOEXEC))
            return -EINVAL;
        return kvu_install(openat((int)fd, addr, (int)w[7] | (w[9] ? O_CLOEXEC : 0), (mode_t)w[8]),
                           w[9], files, nfiles);
    case IORING_OP_OPENAT2: {
        struct open_how how = *(struct open_how *)(uintptr_t)w[8];
        if (w[9] && (how.flags & O_CLOEXEC))
            return -EINVAL;
        if (w[9])
            how.flags |= O_CLOEXEC;
        return kvu_install((int)syscall(SYS_openat2, (int)fd, addr, &how, sizeof(how)), w[9], files, nfiles);
    }
    case IORING_OP_CLOSE:
        if (w[9]) {
            unsigned slot = (unsigned)(w[9] - 1);
            if (slot >= nfiles || files[slot] < 0)
                return -EBADF;
            close(files[slot]);
            files[slot] = -1;
            return 0;
        }
        return close((int)fd) < 0 ? -errno : 0;
    case IORING_OP_READ:
    case IORING_OP_READ_FIXED:
    case IORING_OP_WRITE:
    case IORING_OP_WRITE_FIXED: {
        struct iovec one = { addr, len };
        *want = len;
        return kvu_rw((int)w[0] == IORING_OP_READ || (int)w[0] == IORING_OP_READ_FIXED,
                      (int)fd, &one, 1, w[5]);
    }
    case IORING_OP_READV:
    case IORING_OP_WRITEV: {
        const struct iovec *iov = addr;
        *want = 0;
        for (i = 0; i < len; i++)
            *want += (int64_t)iov[i].iov_len;
        return kvu_rw((int)w[0] == IORING_OP_READV, (int)fd, iov, (int)len, w[5]);
    }
    case IORING_OP_RENAMEAT:
        r = syscall(SYS_renameat2, (int)fd, addr, (int)(int64_t)w[8], (const char *)(uintptr_t)w[9],
                    (unsigned)w[7]);
        return r < 0 ? -errno : 0;
    case IORING_OP_UNLINKAT:
        return unlinkat((int)fd, addr, (int)w[7]) < 0 ? -errno : 0;
    case IORING_OP_MKDIRAT:
        return mkdirat((int)fd, addr, (mode_t)w[8]) < 0 ? -errno : 0;
    case IORING_OP_STATX:
        r = syscall(SYS_statx, (int)fd, addr, (int)w[7], (unsigned)w[8], (void *)(uintptr_t)w[9]);
        return r < 0 ? -errno : 0;
    case IORING_OP_FSYNC:
        r = (w[7] & IORING_FSYNC_DATASYNC) ? fdatasync((int)fd) : fsync((int)fd);
        return r < 0 ? -errno : 0;
    case IORING_OP_ASYNC_CANCEL:
        return -ENOENT;
    case IORING_OP_LINK_TIMEOUT:
        return -ECANCELED;
    default:
        return -EINVAL;
    }
}

/*
 * Whether a result fails the request the way the kernel marks it
 * (REQ_F_FAIL): only a failed request breaks a soft link and has its
 * CQE_SKIP_SUCCESS overridden.  Measured on 6.18: the path operations and
 * fsync set their result without failing the request (5.x kernels did fail
 * it); a bad fd fails any request at file lookup.
 */
static int kvu_fails(int op, int64_t r, int64_t want)
{
    switch (op) {
    case IORING_OP_STATX:
    case IORING_OP_MKDIRAT:
    case IORING_OP_UNLINKAT:
    case IORING_OP_RENAMEAT:
        return 0;
    case IORING_OP_FSYNC:
        return r == -EBADF;
    default:
        return r < 0 || (want >= 0 && r != want);
    }
}

/* statx(2) for Python 3.11, which has no os.statx: -errno on failure. */
int kvu_statx(int dfd, const char *path, int flags, unsigned mask, struct statx *buf)
{
    return syscall(SYS_statx, dfd, path, flags, mask, buf) < 0 ? -errno : 0;
}

unsigned kvu_run_chain(const uint64_t *ops, unsigned n, int *files, unsigned nfiles,
                       uint64_t *user_data, int32_t *res)
{
    unsigned i, posted = 0;
    int broken = 0, silent = 0;
    for (i = 0; i < n; i++) {
        const uint64_t *w = ops + (size_t)i * KVU_OP_WORDS;
        unsigned flags = (unsigned)w[1];
        int64_t want, r;
        int failed, post;
        if (broken) {
            r = -ECANCELED;
            failed = 1;
            post = !silent;
        } else {
            r = kvu_exec_one(w, files, nfiles, &want);
            failed = kvu_fails((int)w[0], r, want);
            post = failed || !(flags & IOSQE_CQE_SKIP_SUCCESS);
            if (failed && (flags & IOSQE_IO_LINK) && !(flags & IOSQE_IO_HARDLINK)) {
                broken = 1;
                silent = (flags & IOSQE_CQE_SKIP_SUCCESS) != 0;
            }
        }
        if (post) {
            user_data[posted] = w[6];
            res[posted] = (int32_t)r;
            posted++;
        }
    }
    return posted;
}
"""


def _pkg_config(*args: str) -> list[str]:
    tool = os.environ.get("KVURING_PKG_CONFIG", "pkg-config")
    try:
        out = subprocess.run([tool, *args, "liburing"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(
            "liburing not found by pkg-config; install it (Debian/Ubuntu: "
            "apt-get install liburing-dev pkg-config) or set KVURING_LIBURING_CFLAGS "
            "and KVURING_LIBURING_LIBS"
        ) from exc
    return shlex.split(out.stdout)


def _flags(env: str, *pkg_args: str) -> list[str]:
    if env in os.environ:
        return shlex.split(os.environ[env])
    return _pkg_config(*pkg_args)


def make_ffi() -> FFI:
    """Describe the extension; compiling is left to the caller.

    setuptools gets this function itself (``cffi_modules`` accepts a
    callable), so importing the module runs no pkg-config.
    """
    ffi = FFI()
    ffi.cdef(CDEF_LIBURING)
    ffi.cdef(CDEF_KVURING)
    cflags = _flags("KVURING_LIBURING_CFLAGS", "--cflags")
    libs = _flags("KVURING_LIBURING_LIBS", "--libs")
    ffi.set_source(
        "kvuring._uring",
        C_SOURCE,
        extra_compile_args=[*cflags, "-O2"],
        extra_link_args=libs,
    )
    return ffi


if __name__ == "__main__":
    make_ffi().compile(verbose=True)
