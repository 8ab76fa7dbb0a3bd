/*
 * The thread engine's chain runner: one linked chain of operation words run
 * with plain syscalls on the calling thread, keeping io_uring's rules.
 */
#define _GNU_SOURCE
#include "kvu.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

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
            /* A plain close flushes: its error (NFS, FUSE write-back) is the result. */
            r = close(files[slot]);
            files[slot] = -1;
            return r < 0 ? -errno : 0;
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
    case KVU_OP_FD_INSTALL:
        /* A slot is a plain fd here: the installed one is a duplicate. */
        r = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
        return r < 0 ? -errno : r;
    case IORING_OP_ASYNC_CANCEL:
        return -ENOENT;
    case IORING_OP_LINK_TIMEOUT:
        return -ECANCELED;
    case KVU_OP_CHECKSUM:
        /* addr, len: the payload; arg1: where its xxh3 goes */
        *(uint64_t *)(uintptr_t)w[7] = kvu_checksum(addr, len);
        return 0;
    case KVU_OP_SEAL:
        /* addr, len: the payload; arg1: the trailer page; arg2, arg3: the key */
        kvu_pack_trailer((uint8_t *)(uintptr_t)w[7], (const uint8_t *)(uintptr_t)w[8], (unsigned)w[9],
                         len, kvu_checksum(addr, len));
        return 0;
    case KVU_OP_FLOCK:
        /* fd: the file; arg1: flock's operation (LOCK_EX | LOCK_NB, ...) */
        return flock((int)fd, (int)w[7]) < 0 ? -errno : 0;
    case KVU_OP_GETDENTS:
        /* fd: a directory; addr, len: room for linux_dirent64 records; returns the bytes filled */
        r = syscall(SYS_getdents64, (int)fd, addr, len);
        return r < 0 ? -errno : r;
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
