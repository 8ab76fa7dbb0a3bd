/*
 * The ring side of the operation words: turning them into SQEs, and
 * reaping CQEs into flat arrays, one C call per batch.
 */
#define _GNU_SOURCE
#include "kvu.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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
    case KVU_OP_FD_INSTALL:
        /* fd: the direct slot (with IOSQE_FIXED_FILE); install flags 0: O_CLOEXEC */
        io_uring_prep_rw(KVU_OP_FD_INSTALL, sqe, fd, NULL, 0, 0);
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
        case IORING_OP_LINK_TIMEOUT: case KVU_OP_FD_INSTALL:
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

/* Point registered-buffer slot `index` at [addr, addr + len) (0, 0 empties it). */
int kvu_register_buffer(struct io_uring *ring, unsigned index, uint64_t addr, uint64_t len)
{
    struct iovec iov = { (void *)(uintptr_t)addr, (size_t)len };
    int res = io_uring_register_buffers_update_tag(ring, index, &iov, NULL, 1);
    return res < 0 ? res : 0;
}

/* How many operations the chain starting at `ops` has (at most n). */
unsigned kvu_chain_len(const uint64_t *ops, unsigned n)
{
    unsigned i;
    for (i = 0; i < n; i++)
        if (!(ops[(size_t)i * KVU_OP_WORDS + 1] & (IOSQE_IO_LINK | IOSQE_IO_HARDLINK)))
            return i + 1;
    return n; /* a chain still open at the end: the kernel ends it there too */
}

/* io_uring_submit, retried on EINTR; counts the enter calls. */
static int enter(struct kvu_engine *e)
{
    int r;
    do {
        r = io_uring_submit(e->ring);
        e->enter_calls++;
    } while (r == -EINTR);
    return r;
}

/*
 * Prepare and submit whole chains.  When the SQ is full, what is prepared
 * goes to the kernel first; if the kernel cannot take more (the CQ is backed
 * up: EBUSY, EAGAIN) the rest is left for the caller to submit after
 * reaping.  Returns the number of operations taken, or -errno when the
 * kernel refused the first of them.
 */
static int ring_submit(struct kvu_engine *e, const uint64_t *ops, unsigned n)
{
    unsigned i = 0;
    int r;
    while (i < n) {
        const uint64_t *w = ops + (size_t)i * KVU_OP_WORDS;
        unsigned len = kvu_chain_len(w, n - i);
        if (io_uring_sq_space_left(e->ring) < len) {
            r = enter(e);
            if (r < 0 && r != -EAGAIN && r != -EBUSY && !i)
                return r;
            if (io_uring_sq_space_left(e->ring) < len)
                break;
        }
        r = kvu_prep_ops(e->ring, w, len);
        if (r < 0)
            return i ? (int)i : r;
        i += len;
    }
    if (io_uring_sq_ready(e->ring)) {
        r = enter(e);
        if (r < 0 && r != -EAGAIN && r != -EBUSY && !i)
            return r;
    }
    e->sqes_submitted += i;
    return (int)i;
}

int kvu_engine_submit(struct kvu_engine *e, const uint64_t *ops, unsigned n)
{
    if (!n)
        return 0;
    if (e->ring)
        return ring_submit(e, ops, n);
    e->sqes_submitted += n;
    return kvu_pool_submit(e->pool, ops, n);
}

/* Every completion there is now (up to max); clears the eventfd first. */
unsigned kvu_engine_reap(struct kvu_engine *e, uint64_t *ud, int32_t *res, unsigned max)
{
    uint64_t v;
    unsigned n = 0, got;
    while (read(e->efd, &v, sizeof v) < 0 && errno == EINTR)
        ;
    if (!e->ring) {
        n = kvu_pool_reap(e->pool, ud, res, max);
    } else {
        if (e->defer_taskrun) {
            io_uring_get_events(e->ring);
            e->enter_calls++;
        }
        while (n < max && (got = kvu_reap(e->ring, ud + n, res + n, max - n)))
            n += got;
    }
    e->cqes_reaped += n;
    return n;
}
