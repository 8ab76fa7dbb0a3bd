/*
 * The per-block state machine: every store, load, presence check and
 * delete of a BlockStore, from a batch's arrays to each block's status,
 * with Python called once per batch rather than once per block.
 *
 * A batch (struct kvu_batch, owned by Python) is queued with kvu_core_add.
 * kvu_core_flush starts queued blocks into free slots and submits their
 * chains; kvu_core_pump reaps every completion, advances each block (a
 * follow-up chain, a retry, a cleanup) and submits what that produced.
 * Completions that are not the core's go back to the caller (the Python
 * driver's own units share the engine).  A block holds one slot, which is
 * also its direct descriptor (cfg.slot_base + index) and its trailer page,
 * from its first chain to its status.
 *
 * Chains (S = CQE_SKIP_SUCCESS, L = link, H = hard link, A = async, F = fixed file):
 *
 *   store  [openat2 <upper> O_PATH L.S -> mkdirat <leaf> H.S]   (leaf not known to exist)
 *          openat2 <tmp> O_CREAT|O_EXCL L.S.A -> write(v) payload + trailer L.S.F
 *          -> close L.S -> renameat <tmp> <final> RENAME_NOREPLACE
 *   load   openat2 <final> L.S.A -> read(v) payload + trailer H.S.F -> close
 *   stat   statx
 *   delete openat2 <leaf> O_PATH L.S -> unlinkat H -> close
 *
 * A soft-linked step that fails ends its chain, so a rename never follows
 * a failed or short write; a cleanup chain then closes the slot and
 * unlinks the temp file.  With CQE_SKIP_SUCCESS a chain that went well
 * posts one completion (its last step).
 */
#define _GNU_SOURCE
#include "kvu.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NONE INT32_MIN /* no completion seen for this step */
#define MAX_RETRIES 8  /* EAGAIN / EINTR, per block */
#define REFILL_EVERY 16 /* completions dispatched between submits, within one pump */

#define S_ IOSQE_CQE_SKIP_SUCCESS
#define L_ IOSQE_IO_LINK
#define H_ IOSQE_IO_HARDLINK
#define A_ IOSQE_ASYNC
#define F_ IOSQE_FIXED_FILE

/* What makes a result fail its request (the kernel's REQ_F_FAIL), which is
 * what breaks a soft link; a rule >= 0 is a transfer of exactly that many
 * bytes.  Mirrors kvu_fails in chain.c. */
#define R_NEGATIVE (-1)
#define R_CANCELLED (-2) /* statx, mkdirat, unlinkat, renameat: an error is only a result */

enum stage { ST_MAIN, ST_MKDIR, ST_RENAME, ST_CLEANUP, ST_UNLINK };

struct block {
    struct kvu_batch *batch;
    unsigned index;
    uint32_t gen;
    uint8_t active, stage, nsteps, loud, retries;
    uint8_t first;               /* store: steps before the create (leaf check, seal) */
    uint8_t dircheck;            /* store: the chain starts with the leaf check */
    uint8_t made_dirs, exists, retry_after_cleanup, sent_noreplace;
    uint8_t ntransfer;           /* transfer steps in the chain: 1, or 2 with registered buffers */
    uint8_t hashed;              /* load: the engine computed `computed` (KVU_OP_CHECKSUM) */
    uint8_t flags[KVU_MAX_CHAIN];
    int32_t rule[KVU_MAX_CHAIN];
    int32_t res[KVU_MAX_CHAIN];
    int32_t error;
    uint64_t addr;               /* what the kernel reads or writes: the buffer or its bounce copy */
    uint64_t user;               /* the caller's buffer */
    void *bounce;
    uint64_t psum;
    uint64_t computed;           /* load: the payload's xxh3, from a KVU_OP_CHECKSUM step */
    uint64_t want[2];            /* bytes each transfer moves */
    unsigned leaf_index;
    unsigned klen;
    uint8_t key[KVU_MAX_KEY];
    char leaf[8];
    char upper[4];
    char path[KVU_PATH_MAX];
    char tmp[KVU_TMP_MAX];
    struct iovec iov[2];
    struct statx sx;
};

struct queue {
    struct kvu_batch *head, *tail;
};

struct kvu_core {
    struct kvu_core_config cfg;
    struct kvu_engine *eng;
    struct open_how how_read, how_dir, how_create;
    struct block *blocks;
    unsigned *free_slots;
    unsigned nfree;
    uint8_t *leaf_ready;          /* bitmap over the 2^20 leaves: known to exist */
    uint8_t *leaf_noted;          /* bitmap: in the writer registry */
    struct queue fast;            /* loads, stats, deletes */
    struct queue stores;
    unsigned loads;               /* load blocks added and not finished (the gate) */
    unsigned stores_running;      /* store blocks in flight */
    unsigned unstarted;           /* queued blocks */
    unsigned active;
    uint32_t gen;
    uint64_t tmp_seq;
    uint64_t file_size;
    uint64_t *words;
    unsigned nops, ops_cap;
    uint64_t *done;
    unsigned ndone, done_cap;
    uint64_t *rud;
    int32_t *rres;
    unsigned rcap;
    uint64_t *spans;              /* registered buffers: (start, end, index) triples, sorted */
    unsigned nspans;
    struct kvu_core_stats st;
};

#define LEAVES (1u << 20)

static int bit_get(const uint8_t *map, unsigned i) { return map[i >> 3] >> (i & 7) & 1; }
static void bit_set(uint8_t *map, unsigned i) { map[i >> 3] |= (uint8_t)(1u << (i & 7)); }

static unsigned slot_of(const struct kvu_core *c, const struct block *b)
{
    return c->cfg.slot_base + (unsigned)(b - c->blocks);
}

static uint8_t *trailer_of(const struct kvu_core *c, const struct block *b)
{
    return (uint8_t *)(uintptr_t)c->cfg.trailers + (size_t)(b - c->blocks) * KVU_TRAILER_SIZE;
}

/* ------------------------------------------------------------------------ */
/* life cycle                                                               */
/* ------------------------------------------------------------------------ */

struct kvu_core *kvu_core_new(const struct kvu_core_config *cfg, struct kvu_engine *engine)
{
    struct kvu_core *c = calloc(1, sizeof *c);
    unsigned i;
    uint64_t resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    if (!c)
        return NULL;
    c->cfg = *cfg;
    c->eng = engine;
    c->file_size = cfg->block_size + (cfg->verify ? KVU_TRAILER_SIZE : 0);
    /* No O_CLOEXEC on direct-descriptor opens: the kernel rejects it. */
    c->how_read.flags = O_RDONLY | (cfg->direct ? O_DIRECT : 0);
    c->how_read.resolve = resolve;
    c->how_dir.flags = O_PATH | O_DIRECTORY;
    c->how_dir.resolve = resolve;
    c->how_create.flags = O_CREAT | O_EXCL | O_WRONLY | (cfg->direct ? O_DIRECT : 0);
    c->how_create.mode = 0644;
    c->how_create.resolve = resolve;
    c->blocks = calloc(cfg->slots, sizeof *c->blocks);
    c->free_slots = malloc(cfg->slots * sizeof *c->free_slots);
    c->leaf_ready = calloc(LEAVES / 8, 1);
    c->leaf_noted = calloc(LEAVES / 8, 1);
    c->rcap = 1024;
    c->rud = malloc(c->rcap * sizeof *c->rud);
    c->rres = malloc(c->rcap * sizeof *c->rres);
    if (!c->blocks || !c->free_slots || (cfg->verify && !cfg->trailers) || !c->leaf_ready ||
        !c->leaf_noted || !c->rud || !c->rres) {
        kvu_core_free(c);
        return NULL;
    }
    for (i = 0; i < cfg->slots; i++)
        c->free_slots[i] = cfg->slots - 1 - i;
    c->nfree = cfg->slots;
    return c;
}

void kvu_core_free(struct kvu_core *c)
{
    unsigned i;
    if (!c)
        return;
    if (c->blocks)
        for (i = 0; i < c->cfg.slots; i++)
            free(c->blocks[i].bounce);
    free(c->blocks);
    free(c->free_slots);
    free(c->spans);
    free(c->leaf_ready);
    free(c->leaf_noted);
    free(c->words);
    free(c->done);
    free(c->rud);
    free(c->rres);
    free(c);
}

/* ------------------------------------------------------------------------ */
/* writing chains                                                           */
/* ------------------------------------------------------------------------ */

static int grow(void **p, unsigned *cap, unsigned need, size_t size)
{
    unsigned n = *cap ? *cap : 64;
    void *q;
    if (need <= *cap)
        return 0;
    while (n < need)
        n *= 2;
    q = realloc(*p, n * size);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

/* Append one step to the block's current chain. */
static void push(struct kvu_core *c, struct block *b, int op, unsigned flags, int64_t fd, uint64_t addr,
                 uint64_t len, uint64_t off, uint64_t a1, uint64_t a2, uint64_t a3, int32_t rule)
{
    unsigned step = b->nsteps++;
    uint64_t *w;
    if (grow((void **)&c->words, &c->ops_cap, c->nops + 1, KVU_OP_WORDS * sizeof(uint64_t)) < 0)
        abort(); /* a chain half written cannot be taken back */
    w = c->words + (size_t)c->nops++ * KVU_OP_WORDS;
    w[0] = (uint64_t)op;
    w[1] = flags;
    w[2] = (uint64_t)fd;
    w[3] = addr;
    w[4] = len;
    w[5] = off;
    w[6] = KVU_CORE_TAG | (uint64_t)b->gen << 24 | (uint64_t)(b - c->blocks) << 4 | step;
    w[7] = a1;
    w[8] = a2;
    w[9] = a3;
    b->flags[step] = (uint8_t)flags;
    b->rule[step] = rule;
    b->res[step] = NONE;
}

/* Start the block's next chain.  A new generation each time: a late CQE of
 * an earlier chain (one the kernel cancelled piecemeal, say) is a stray,
 * never a result of this one. */
static void new_chain(struct kvu_core *c, struct block *b, enum stage stage)
{
    b->stage = (uint8_t)stage;
    b->nsteps = 0;
    b->loud = 0;
    b->gen = ++c->gen;
}

static uint64_t ptr(const void *p) { return (uint64_t)(uintptr_t)p; }

/* The registered buffer holding [addr, addr + len), or -1. */
static int fixed_index(const struct kvu_core *c, uint64_t addr, uint64_t len)
{
    unsigned lo = 0, hi = c->nspans;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (c->spans[3 * mid] <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (!lo || addr + len > c->spans[3 * (lo - 1) + 1])
        return -1;
    return (int)c->spans[3 * (lo - 1) + 2];
}

/*
 * The payload (and trailer) transfers of a load or store: one readv/writev
 * of payload + trailer page, or with registered memory two fixed transfers
 * (a fixed transfer takes one contiguous range), or the bare payload for
 * verify=False.
 */
static void push_transfer(struct kvu_core *c, struct block *b, int reading, unsigned flags, unsigned prio)
{
    uint64_t bs = c->cfg.block_size;
    unsigned slot = slot_of(c, b);
    int fixed = -1;
    if (c->nspans && !b->bounce && (!c->cfg.verify || c->cfg.trailer_index >= 0))
        fixed = fixed_index(c, b->addr, bs);
    if (fixed >= 0) {
        int op = reading ? IORING_OP_READ_FIXED : IORING_OP_WRITE_FIXED;
        c->st.fixed_transfers++;
        b->want[0] = bs;
        b->ntransfer = 1;
        push(c, b, op, flags, slot, b->addr, bs, 0, 0, (uint64_t)fixed, prio, (int32_t)bs);
        if (c->cfg.verify) {
            b->want[1] = KVU_TRAILER_SIZE;
            b->ntransfer = 2;
            push(c, b, op, flags, slot, ptr(trailer_of(c, b)), KVU_TRAILER_SIZE, bs, 0,
                 (uint64_t)c->cfg.trailer_index, prio, KVU_TRAILER_SIZE);
        }
        return;
    }
    b->ntransfer = 1;
    if (c->cfg.verify) {
        b->iov[0].iov_base = (void *)(uintptr_t)b->addr;
        b->iov[0].iov_len = bs;
        b->iov[1].iov_base = trailer_of(c, b);
        b->iov[1].iov_len = KVU_TRAILER_SIZE;
        b->want[0] = bs + KVU_TRAILER_SIZE;
        push(c, b, reading ? IORING_OP_READV : IORING_OP_WRITEV, flags, slot, ptr(b->iov), 2, 0, 0, 0,
             prio, (int32_t)b->want[0]);
    } else {
        b->want[0] = bs;
        push(c, b, reading ? IORING_OP_READ : IORING_OP_WRITE, flags, slot, b->addr, bs, 0, 0, 0, prio,
             (int32_t)bs);
    }
}

/* The first failed transfer: its negative result, 1 if one was short, or 0. */
static int32_t transfer_failure(const struct block *b, const int32_t *res)
{
    unsigned i;
    for (i = 0; i < b->ntransfer; i++)
        if (res[i] != NONE && res[i] < 0)
            return res[i];
    for (i = 0; i < b->ntransfer; i++)
        if (res[i] != NONE && (uint64_t)res[i] != b->want[i])
            return 1;
    return 0;
}

/*
 * The addresses of rows `rows[0..n)` of a region of `nrows` rows of `stride`
 * bytes at `base` (the caller's staging buffer, one block per row), into
 * out[]: one C loop instead of a buffer export per block.  Returns the
 * index of the first row out of range, or -1.
 */
int64_t kvu_row_addrs(uint64_t base, uint64_t stride, uint64_t nrows, const int64_t *rows, unsigned n,
                      uint64_t *out)
{
    unsigned i;
    for (i = 0; i < n; i++) {
        if (rows[i] < 0 || (uint64_t)rows[i] >= nrows)
            return i;
        out[i] = base + (uint64_t)rows[i] * stride;
    }
    return -1;
}

/* Replace the core's registered-buffer table (copied). */
int kvu_core_set_spans(struct kvu_core *c, const uint64_t *spans, unsigned n)
{
    uint64_t *copy = NULL;
    if (n) {
        copy = malloc((size_t)n * 3 * sizeof *copy);
        if (!copy)
            return -ENOMEM;
        memcpy(copy, spans, (size_t)n * 3 * sizeof *copy);
    }
    free(c->spans);
    c->spans = copy;
    c->nspans = n;
    return 0;
}

static void load_begin(struct kvu_core *c, struct block *b)
{
    unsigned slot = slot_of(c, b);
    new_chain(c, b, ST_MAIN);
    push(c, b, IORING_OP_OPENAT2, L_ | S_ | c->cfg.open_flags, c->cfg.ns_fd, ptr(b->path), 0, 0, 0, ptr(&c->how_read),
         slot + 1, R_NEGATIVE);
    /* Hard link: the close runs whatever the read did, so the slot is freed. */
    push_transfer(c, b, 1, H_ | S_ | F_ | c->cfg.read_flags, c->cfg.load_ioprio);
    /* The thread engine checksums on the worker that read the block. */
    b->hashed = c->cfg.verify && c->eng->pool != NULL && !b->batch->defer_verify;
    if (b->hashed)
        push(c, b, KVU_OP_CHECKSUM, H_ | S_, 0, b->addr, c->cfg.block_size, 0, ptr(&b->computed), 0, 0,
             R_NEGATIVE);
    push(c, b, IORING_OP_CLOSE, 0, 0, 0, 0, 0, 0, 0, slot + 1, R_NEGATIVE);
}

/* Whether a store's trailer is packed by the thread engine's worker (KVU_OP_SEAL). */
static int sealed_by_worker(const struct kvu_core *c, const struct kvu_batch *batch)
{
    return c->cfg.verify && c->eng->pool != NULL && !batch->psums;
}

static void store_begin(struct kvu_core *c, struct block *b)
{
    unsigned slot = slot_of(c, b);
    int ns = c->cfg.ns_fd;
    new_chain(c, b, ST_MAIN);
    b->first = 0;
    b->dircheck = 0;
    if (!bit_get(c->leaf_ready, b->leaf_index)) {
        /* A leaf not known to exist: check its upper directory is a real one
         * beneath the namespace, then make the leaf (EEXIST is fine, the
         * hard link runs on).  The create refuses symlinks on the whole path. */
        push(c, b, IORING_OP_OPENAT2, L_ | S_, ns, ptr(b->upper), 0, 0, 0, ptr(&c->how_dir), slot + 1,
             R_NEGATIVE);
        push(c, b, IORING_OP_MKDIRAT, H_ | S_, ns, ptr(b->leaf), 0, 0, 0, 0755, 0, R_CANCELLED);
        b->first = 2;
        b->dircheck = 1;
    }
    if (sealed_by_worker(c, b->batch)) {
        /* The thread engine checksums and packs the trailer on the worker
         * that writes the block. */
        push(c, b, KVU_OP_SEAL, L_ | S_, 0, b->addr, c->cfg.block_size, 0, ptr(trailer_of(c, b)), ptr(b->key),
             b->klen, R_NEGATIVE);
        b->first++;
    } else if (c->cfg.verify) {
        kvu_pack_trailer(trailer_of(c, b), b->key, b->klen, c->cfg.block_size, b->psum);
    }
    push(c, b, IORING_OP_OPENAT2, L_ | S_ | A_, ns, ptr(b->tmp), 0, 0, 0, ptr(&c->how_create), slot + 1,
         R_NEGATIVE);
    push_transfer(c, b, 0, L_ | S_ | F_, 0);
    push(c, b, IORING_OP_CLOSE, L_ | S_, 0, 0, 0, 0, 0, 0, slot + 1, R_NEGATIVE);
    b->sent_noreplace = (uint8_t)c->cfg.noreplace;
    push(c, b, IORING_OP_RENAMEAT, 0, ns, ptr(b->tmp), 0, 0, c->cfg.noreplace ? RENAME_NOREPLACE : 0,
         (uint64_t)(int64_t)ns, ptr(b->path), R_CANCELLED);
}

static void stat_begin(struct kvu_core *c, struct block *b)
{
    new_chain(c, b, ST_MAIN);
    push(c, b, IORING_OP_STATX, 0, c->cfg.ns_fd, ptr(b->path), 0, 0, AT_SYMLINK_NOFOLLOW,
         STATX_BASIC_STATS, ptr(&b->sx), R_CANCELLED);
}

static void delete_begin(struct kvu_core *c, struct block *b)
{
    unsigned slot = slot_of(c, b);
    new_chain(c, b, ST_MAIN);
    /* Check the directories are real ones beneath the namespace before
     * unlinking through them: a planted symlink must not redirect it.  No
     * CQE_SKIP_SUCCESS on the unlink: a failed unlinkat is not marked
     * failed, so a skipped CQE would hide ENOENT. */
    push(c, b, IORING_OP_OPENAT2, L_ | S_, c->cfg.ns_fd, ptr(b->leaf), 0, 0, 0, ptr(&c->how_dir), slot + 1,
         R_NEGATIVE);
    push(c, b, IORING_OP_UNLINKAT, H_, c->cfg.ns_fd, ptr(b->path), 0, 0, 0, 0, 0, R_CANCELLED);
    push(c, b, IORING_OP_CLOSE, 0, 0, 0, 0, 0, 0, 0, slot + 1, R_NEGATIVE);
}

static void begin(struct kvu_core *c, struct block *b)
{
    switch (b->batch->kind) {
    case KVU_LOAD:
        load_begin(c, b);
        break;
    case KVU_STORE:
        store_begin(c, b);
        break;
    case KVU_STAT:
        stat_begin(c, b);
        break;
    default:
        delete_begin(c, b);
        break;
    }
}

/* ------------------------------------------------------------------------ */
/* finishing                                                                */
/* ------------------------------------------------------------------------ */

static void batch_done(struct kvu_core *c, struct kvu_batch *batch)
{
    if (grow((void **)&c->done, &c->done_cap, c->ndone + 1, sizeof *c->done) < 0)
        abort(); /* the batch's owner would wait forever */
    c->done[c->ndone++] = batch->id;
}

static void finish(struct kvu_core *c, struct block *b, int status, int32_t error)
{
    struct kvu_batch *batch = b->batch;
    uint64_t bs = c->cfg.block_size;
    batch->status[b->index] = status;
    batch->error[b->index] = error;
    switch (status) {
    case KVU_STORED:
        c->st.stored++;
        c->st.bytes_written += bs;
        break;
    case KVU_EXISTS:
        c->st.exists++;
        break;
    case KVU_HIT:
        c->st.hits++;
        c->st.bytes_read += bs;
        break;
    case KVU_MISS:
        c->st.misses++;
        break;
    case KVU_CORRUPT:
        batch->corrupt++;
        break;
    case KVU_FAILED:
        batch->failed++;
        break;
    case KVU_UNVERIFIED:
        batch->unverified++;
        break;
    default:
        break;
    }
    if (b->bounce) {
        free(b->bounce);
        b->bounce = NULL;
    }
    if (batch->kind == KVU_LOAD)
        c->loads--;
    else if (batch->kind == KVU_STORE)
        c->stores_running--;
    b->active = 0;
    b->batch = NULL;
    c->free_slots[c->nfree++] = (unsigned)(b - c->blocks);
    c->active--;
    if (!--batch->pending)
        batch_done(c, batch);
}

static int32_t fail(struct kvu_core *c, int32_t res)
{
    c->st.failures++;
    return -res;
}

/*
 * Whether to run the block's chain again after a transient result: EAGAIN,
 * EINTR, or ECANCELED, which io_uring gives every request of a thread that
 * exits while they are in flight (the polling front end may be called from
 * threads that come and go); the retry is submitted by a live thread.
 */
static int retry(struct kvu_core *c, struct block *b, int32_t res)
{
    if ((res != -EAGAIN && res != -EINTR && res != -ECANCELED) || b->batch->cancelled ||
        b->retries >= MAX_RETRIES)
        return 0;
    b->retries++;
    c->st.retries++;
    return 1;
}

/* ------------------------------------------------------------------------ */
/* loads                                                                    */
/* ------------------------------------------------------------------------ */

static void load_check(struct kvu_core *c, struct block *b, int why)
{
    uint64_t bs = c->cfg.block_size;
    if (!why && c->cfg.verify) {
        uint64_t psum = 0;
        why = kvu_check_trailer(trailer_of(c, b), b->key, b->klen, bs, &psum);
        if (!why) {
            if (b->hashed) {
                if (b->computed != psum)
                    why = KVU_BAD_PAYLOAD_SUM;
            } else if (b->batch->defer_verify && !b->bounce) {
                /* The caller compares the payload checksums of the batch on
                 * worker threads once its reads are done. */
                b->batch->psum_out[b->index] = psum;
                finish(c, b, KVU_UNVERIFIED, 0);
                return;
            } else if (kvu_checksum((const void *)(uintptr_t)b->addr, bs) != psum) {
                why = KVU_BAD_PAYLOAD_SUM;
            }
        }
    }
    if (!why) {
        if (b->bounce)
            memcpy((void *)(uintptr_t)b->user, b->bounce, bs);
        finish(c, b, KVU_HIT, 0);
        return;
    }
    /* A damaged block: remove it, so the next load is a MISS, not a retry. */
    c->st.corrupt++;
    b->error = why;
    new_chain(c, b, ST_UNLINK);
    push(c, b, IORING_OP_UNLINKAT, 0, c->cfg.ns_fd, ptr(b->path), 0, 0, 0, 0, 0, R_CANCELLED);
}

static void load_end(struct kvu_core *c, struct block *b)
{
    int32_t open = b->res[0], bad;
    unsigned i;
    int quiet = open == NONE;
    if (b->stage == ST_UNLINK) {
        finish(c, b, KVU_CORRUPT, b->error);
        return;
    }
    for (i = 0; i < b->ntransfer; i++)
        quiet &= b->res[1 + i] == NONE;
    if (quiet) {
        load_check(c, b, 0); /* open and reads went well: only the close posted */
        return;
    }
    if (open != NONE && open < 0) {
        if (open == -ENOENT)
            finish(c, b, KVU_MISS, 0);
        else if (retry(c, b, open))
            load_begin(c, b);
        else
            finish(c, b, KVU_FAILED, fail(c, open));
        return;
    }
    bad = transfer_failure(b, b->res + 1);
    if (bad < 0) {
        if (bad == -EPERM && c->cfg.load_ioprio) {
            /* The kernel refused the realtime I/O class after all: drop it. */
            c->cfg.load_ioprio = 0;
            c->st.ioprio_dropped++;
            load_begin(c, b);
        } else if (retry(c, b, bad)) {
            load_begin(c, b);
        } else {
            finish(c, b, KVU_FAILED, fail(c, bad));
        }
        return;
    }
    load_check(c, b, bad ? KVU_SHORT_READ : 0);
}

/* ------------------------------------------------------------------------ */
/* stores                                                                   */
/* ------------------------------------------------------------------------ */

static void store_cleanup(struct kvu_core *c, struct block *b, int32_t error, int again, int close)
{
    /* The rename never ran or failed: close the slot if a write failed
     * (harmless when already closed) and remove the temp file. */
    new_chain(c, b, ST_CLEANUP);
    b->error = error;
    b->retry_after_cleanup = (uint8_t)again;
    if (close)
        push(c, b, IORING_OP_CLOSE, H_ | S_, 0, 0, 0, 0, 0, 0, slot_of(c, b) + 1, R_NEGATIVE);
    push(c, b, IORING_OP_UNLINKAT, 0, c->cfg.ns_fd, ptr(b->tmp), 0, 0, 0, 0, 0, R_CANCELLED);
}

static void store_cleanup_or_retry(struct kvu_core *c, struct block *b, int32_t res, int close)
{
    int again = retry(c, b, res);
    store_cleanup(c, b, again ? 0 : fail(c, res), again, close);
}

static void store_make_dirs(struct kvu_core *c, struct block *b)
{
    /* First block in this leaf: make both levels (EEXIST is fine: hard
     * links run on), checking the upper one is a real directory before
     * making anything inside it. */
    int ns = c->cfg.ns_fd;
    new_chain(c, b, ST_MKDIR);
    b->made_dirs = 1;
    push(c, b, IORING_OP_MKDIRAT, H_ | S_, ns, ptr(b->upper), 0, 0, 0, 0755, 0, R_CANCELLED);
    push(c, b, IORING_OP_OPENAT2, L_ | S_, ns, ptr(b->upper), 0, 0, 0, ptr(&c->how_dir), slot_of(c, b) + 1,
         R_NEGATIVE);
    push(c, b, IORING_OP_MKDIRAT, 0, ns, ptr(b->leaf), 0, 0, 0, 0755, 0, R_CANCELLED);
}

static void store_after_rename(struct kvu_core *c, struct block *b, int32_t res)
{
    if (res == 0) {
        finish(c, b, KVU_STORED, 0);
    } else if (res == -EEXIST) {
        b->exists = 1;
        store_cleanup(c, b, 0, 0, 0);
    } else if (res == -EINVAL && b->sent_noreplace) {
        /* NFS, CephFS, Lustre, 9p and some FUSE filesystems reject
         * RENAME_NOREPLACE; a plain rename is still atomic and only ever
         * puts the same key's block in place.  Every block of a batch sent
         * with the flag comes here, not only the first. */
        if (c->cfg.noreplace) {
            c->cfg.noreplace = 0;
            c->st.noreplace_fallbacks++;
        }
        new_chain(c, b, ST_RENAME);
        b->sent_noreplace = 0;
        push(c, b, IORING_OP_RENAMEAT, 0, c->cfg.ns_fd, ptr(b->tmp), 0, 0, 0,
             (uint64_t)(int64_t)c->cfg.ns_fd, ptr(b->path), R_CANCELLED);
    } else {
        store_cleanup_or_retry(c, b, res, 0);
    }
}

static void store_end(struct kvu_core *c, struct block *b)
{
    const int32_t *res;
    int32_t bad;
    switch (b->stage) {
    case ST_CLEANUP:
        if (b->retry_after_cleanup) {
            b->retry_after_cleanup = 0;
            store_begin(c, b);
        } else if (b->exists) {
            finish(c, b, KVU_EXISTS, 0);
        } else {
            finish(c, b, KVU_FAILED, b->error);
        }
        return;
    case ST_RENAME:
        store_after_rename(c, b, b->res[0] == NONE ? -ECANCELED : b->res[0]);
        return;
    case ST_MKDIR: {
        int32_t check = b->res[1], leaf = b->res[2];
        if (check != NONE && check < 0)
            finish(c, b, KVU_FAILED, fail(c, check));
        else if (leaf != NONE && leaf < 0 && leaf != -EEXIST)
            finish(c, b, KVU_FAILED, fail(c, leaf));
        else
            store_begin(c, b);
        return;
    }
    default:
        break;
    }
    if (b->dircheck) {
        /* The upper-directory check failed: missing (make it, checked) or
         * not a real directory (never write through it). */
        int32_t check = b->res[0];
        if (check != NONE && check < 0) {
            if (check == -ENOENT && !b->made_dirs)
                store_make_dirs(c, b);
            else
                finish(c, b, KVU_FAILED, fail(c, check));
            return;
        }
    }
    res = b->res + b->first; /* a leaf mkdir's EEXIST (or error) needs no action */
    if (res[0] != NONE && res[0] < 0) {
        if (res[0] == -ENOENT && !b->made_dirs)
            store_make_dirs(c, b);
        else if (retry(c, b, res[0]))
            store_begin(c, b);
        else
            finish(c, b, KVU_FAILED, fail(c, res[0]));
        return;
    }
    bit_set(c->leaf_ready, b->leaf_index);
    bad = transfer_failure(b, res + 1);
    if (bad < 0) {
        store_cleanup_or_retry(c, b, bad, 1);
        return;
    }
    if (bad) {
        /* A short write: the filesystem ran out of room part way. */
        store_cleanup(c, b, fail(c, -ENOSPC), 0, 1);
        return;
    }
    res += 1 + b->ntransfer;
    if (res[0] != NONE && res[0] < 0) {
        store_cleanup_or_retry(c, b, res[0], 1);
        return;
    }
    store_after_rename(c, b, res[1] == NONE ? -ECANCELED : res[1]);
}

/* ------------------------------------------------------------------------ */
/* presence checks and deletes                                              */
/* ------------------------------------------------------------------------ */

static void stat_end(struct kvu_core *c, struct block *b)
{
    int32_t res = b->res[0];
    if (res < 0 && retry(c, b, res)) {
        stat_begin(c, b);
    } else if (res == 0) {
        int present = S_ISREG(b->sx.stx_mode) && b->sx.stx_size == c->file_size;
        finish(c, b, present ? KVU_PRESENT : KVU_ABSENT, 0);
    } else if (res == -ENOENT || res == -ENOTDIR) {
        finish(c, b, KVU_ABSENT, 0);
    } else {
        finish(c, b, KVU_FAILED, fail(c, res));
    }
}

static void delete_end(struct kvu_core *c, struct block *b)
{
    int32_t dir = b->res[0] == NONE ? 0 : b->res[0], unlink = b->res[1];
    if (dir < 0) {
        if (dir == -ENOENT || dir == -ENOTDIR)
            finish(c, b, KVU_ABSENT, 0);
        else
            finish(c, b, KVU_FAILED, fail(c, dir));
    } else if (unlink == 0) {
        if (!b->batch->quiet)
            c->st.deleted++;
        finish(c, b, KVU_PRESENT, 0);
    } else if (unlink == NONE || unlink == -ENOENT) {
        finish(c, b, KVU_ABSENT, 0);
    } else {
        finish(c, b, KVU_FAILED, fail(c, unlink));
    }
}

static void end_chain(struct kvu_core *c, struct block *b)
{
    switch (b->batch->kind) {
    case KVU_LOAD:
        load_end(c, b);
        break;
    case KVU_STORE:
        store_end(c, b);
        break;
    case KVU_STAT:
        stat_end(c, b);
        break;
    default:
        delete_end(c, b);
        break;
    }
}

/* ------------------------------------------------------------------------ */
/* completions                                                              */
/* ------------------------------------------------------------------------ */

static int fails(int32_t res, int32_t rule)
{
    if (rule >= 0)
        return res != rule;
    if (rule == R_NEGATIVE)
        return res < 0;
    return res == -ECANCELED;
}

static void dispatch(struct kvu_core *c, uint64_t ud, int32_t res)
{
    unsigned index = (unsigned)(ud >> 4) & 0xFFFFF, step = (unsigned)ud & 15;
    uint32_t gen = (uint32_t)(ud >> 24);
    struct block *b;
    int over;
    if (index >= c->cfg.slots || !c->blocks[index].active || c->blocks[index].gen != gen ||
        step >= c->blocks[index].nsteps) {
        c->st.stray++;
        return;
    }
    b = &c->blocks[index];
    b->res[step] = res;
    /* A chain is over after its last step, or after a failed step that
     * carried CQE_SKIP_SUCCESS on a soft link: the kernel cancels the rest
     * without posting their CQEs.  After a failure without SKIP every later
     * step posts -ECANCELED, so the chain ends at its last step. */
    if (step == (unsigned)b->nsteps - 1) {
        over = 1;
    } else {
        unsigned f = b->flags[step];
        over = 0;
        if ((f & L_) && !(f & H_)) {
            if (f & S_)
                over = !b->loud;
            else if (fails(res, b->rule[step]))
                b->loud = 1;
        }
    }
    if (over)
        end_chain(c, b);
}

/* ------------------------------------------------------------------------ */
/* queues and starting                                                      */
/* ------------------------------------------------------------------------ */

static void enqueue(struct queue *q, struct kvu_batch *b)
{
    b->qnext = NULL;
    b->queued = 1;
    if (q->tail)
        q->tail->qnext = b;
    else
        q->head = b;
    q->tail = b;
}

static void dequeue(struct queue *q, struct kvu_batch *b)
{
    struct kvu_batch **p = &q->head, *prev = NULL;
    while (*p && *p != b) {
        prev = *p;
        p = &(*p)->qnext;
    }
    if (!*p)
        return;
    *p = b->qnext;
    if (q->tail == b)
        q->tail = prev;
    b->queued = 0;
    b->qnext = NULL;
}

static unsigned leaf_index_of(const uint8_t *key, unsigned klen)
{
    unsigned i, v = 0;
    for (i = 0; i < 5; i++) {
        unsigned nib = i / 2 < klen ? (i % 2 ? key[i / 2] & 15 : key[i / 2] >> 4) : 0;
        v = v << 4 | nib;
    }
    return v;
}

/* Append "<leaf>\n" to this writer's registry before the first temp file
 * goes there, so the next open can clean up after a dead writer. */
static int note_leaf(struct kvu_core *c, struct block *b)
{
    char line[8];
    ssize_t r;
    if (c->cfg.reg_fd < 0 || bit_get(c->leaf_noted, b->leaf_index))
        return 0;
    memcpy(line, b->leaf, 6);
    line[6] = '\n';
    do
        r = write(c->cfg.reg_fd, line, 7);
    while (r < 0 && errno == EINTR);
    if (r != 7)
        return r < 0 ? -errno : -EIO;
    bit_set(c->leaf_noted, b->leaf_index);
    return 0;
}

static void start_block(struct kvu_core *c, struct kvu_batch *batch)
{
    unsigned i = batch->next++;
    struct block *b = &c->blocks[c->free_slots[--c->nfree]];
    uint32_t k0 = batch->key_off[i], k1 = batch->key_off[i + 1];
    uint64_t bs = c->cfg.block_size;
    c->unstarted--;
    c->active++;
    b->batch = batch;
    b->index = i;
    b->gen = ++c->gen;
    b->active = 1;
    b->retries = b->made_dirs = b->exists = b->retry_after_cleanup = 0;
    b->klen = k1 - k0;
    memcpy(b->key, batch->keys + k0, b->klen);
    b->leaf_index = leaf_index_of(b->key, b->klen);
    kvu_block_path(b->key, b->klen, c->cfg.suffix, b->leaf, b->path);
    memcpy(b->upper, b->leaf, 3);
    b->upper[3] = 0;
    b->user = b->addr = batch->addrs ? batch->addrs[i] : 0;
    b->bounce = NULL;
    if (batch->kind == KVU_STORE)
        c->stores_running++;
    if ((batch->kind == KVU_LOAD || batch->kind == KVU_STORE) && c->cfg.direct &&
        b->addr % c->cfg.mem_align) {
        /* O_DIRECT needs aligned memory: go through an aligned copy. */
        size_t align = c->cfg.mem_align < 4096 ? 4096 : c->cfg.mem_align;
        b->bounce = aligned_alloc(align, (bs + align - 1) / align * align);
        if (!b->bounce) {
            finish(c, b, KVU_FAILED, fail(c, -ENOMEM));
            return;
        }
        if (batch->kind == KVU_STORE)
            memcpy(b->bounce, (const void *)(uintptr_t)b->user, bs);
        b->addr = ptr(b->bounce);
        c->st.bounced++;
        batch->bounced++;
    }
    if (batch->kind == KVU_STORE) {
        int r = note_leaf(c, b);
        if (r < 0) {
            finish(c, b, KVU_FAILED, fail(c, r));
            return;
        }
        r = snprintf(b->tmp, sizeof b->tmp, "%s%sc%llu.tmp", b->path, c->cfg.marker,
                     (unsigned long long)++c->tmp_seq);
        if (r < 0 || (size_t)r >= sizeof b->tmp) {
            finish(c, b, KVU_FAILED, fail(c, -ENAMETOOLONG));
            return;
        }
        b->psum = !c->cfg.verify || sealed_by_worker(c, batch) ? 0
                  : batch->psums ? batch->psums[i]
                                 : kvu_checksum((const void *)(uintptr_t)b->addr, bs);
    }
    begin(c, b);
}

static void fill(struct kvu_core *c)
{
    while (c->nfree) {
        struct kvu_batch *batch = c->fast.head;
        if (batch) {
            start_block(c, batch);
            if (batch->next == batch->n)
                dequeue(&c->fast, batch);
            continue;
        }
        batch = c->stores.head;
        if (!batch || batch->next >= batch->ready)
            break;
        /* Loads first: while loads are in flight only a few store chains run. */
        if (c->cfg.store_limit && c->loads && c->stores_running >= c->cfg.store_limit)
            break;
        start_block(c, batch);
        if (batch->next == batch->n)
            dequeue(&c->stores, batch);
    }
}

void kvu_core_add(struct kvu_core *c, struct kvu_batch *b)
{
    b->next = b->failed = b->corrupt = b->unverified = b->bounced = 0;
    b->cancelled = b->queued = 0;
    b->pending = b->n;
    if (b->ready > b->n)
        b->ready = b->n;
    if (!b->n) {
        batch_done(c, b);
        return;
    }
    c->unstarted += b->n;
    if (b->kind == KVU_STORE) {
        if (c->cfg.store_limit && (c->loads || c->stores.head))
            c->st.held += b->n;
        enqueue(&c->stores, b);
    } else {
        if (b->kind == KVU_LOAD)
            c->loads += b->n;
        enqueue(&c->fast, b);
    }
}

/* The caller gave up on the batch: blocks not started end FAILED
 * (ECANCELED); blocks in flight finish, without retries. */
void kvu_core_cancel(struct kvu_core *c, struct kvu_batch *b)
{
    unsigned i, dropped = b->n - b->next;
    if (b->cancelled || !b->pending)
        return;
    b->cancelled = 1;
    if (b->queued)
        dequeue(b->kind == KVU_STORE ? &c->stores : &c->fast, b);
    for (i = b->next; i < b->n; i++) {
        b->status[i] = KVU_FAILED;
        b->error[i] = ECANCELED;
    }
    b->next = b->n;
    c->unstarted -= dropped;
    if (b->kind == KVU_LOAD)
        c->loads -= dropped;
    if (!dropped)
        return;
    b->failed += dropped;
    b->pending -= dropped;
    if (!b->pending)
        batch_done(c, b);
}

/* Closing: store blocks still held back end FAILED (ECANCELED) without
 * running; loads and blocks in flight finish.  Returns how many were dropped. */
unsigned kvu_core_drop_queued_stores(struct kvu_core *c)
{
    unsigned dropped = 0;
    while (c->stores.head) {
        struct kvu_batch *b = c->stores.head;
        dropped += b->n - b->next;
        kvu_core_cancel(c, b);
    }
    return dropped;
}

/* Feed completions of operations the kernel never took (a failed submit). */
static void refuse(struct kvu_core *c, const uint64_t *ops, unsigned n, int32_t res)
{
    unsigned i;
    uint64_t *copy = malloc((size_t)n * sizeof *copy);
    if (!copy)
        abort();
    for (i = 0; i < n; i++)
        copy[i] = ops[(size_t)i * KVU_OP_WORDS + 6];
    for (i = 0; i < n; i++)
        dispatch(c, copy[i], res);
    free(copy);
}

/* Start what fits, submit every prepared operation; 0, or -errno from the engine. */
int kvu_core_flush(struct kvu_core *c)
{
    int err = 0;
    unsigned rounds = 0;
    fill(c);
    while (c->nops && rounds++ < 64) {
        int r = kvu_engine_submit(c->eng, c->words, c->nops);
        if (r < 0) {
            /* The kernel took none of it: each operation fails with the
             * submit's error, which may prepare more (cleanups). */
            unsigned n = c->nops;
            uint64_t *old = c->words;
            c->words = NULL;
            c->nops = c->ops_cap = 0;
            refuse(c, old, n, r);
            free(old);
            err = r;
            continue;
        }
        if ((unsigned)r < c->nops) {
            /* The kernel is backed up: keep the rest for the next flush. */
            memmove(c->words, c->words + (size_t)r * KVU_OP_WORDS,
                    (size_t)(c->nops - r) * KVU_OP_WORDS * sizeof(uint64_t));
            c->nops -= (unsigned)r;
            break;
        }
        c->nops = 0;
    }
    return err;
}

unsigned kvu_core_pump(struct kvu_core *c, uint64_t *ud, int32_t *res, unsigned max, unsigned *nother)
{
    unsigned other = 0, n, i;
    while (other < max) {
        unsigned room = max - other < c->rcap ? max - other : c->rcap;
        n = kvu_engine_reap(c->eng, c->rud, c->rres, room);
        if (!n)
            break;
        for (i = 0; i < n; i++) {
            uint64_t u = c->rud[i];
            if ((u & KVU_CORE_TAG) && !(u >> 63)) {
                dispatch(c, u, c->rres[i]);
            } else {
                ud[other] = u;
                res[other] = c->rres[i];
                other++;
            }
            /* Refill as slots free up rather than after the whole burst:
             * verifying a burst of loads takes long enough to leave the
             * device (or the workers) idle meanwhile. */
            if ((i + 1) % REFILL_EVERY == 0)
                kvu_core_flush(c);
        }
    }
    *nother = other;
    kvu_core_flush(c);
    return c->ndone;
}

unsigned kvu_core_done(struct kvu_core *c, uint64_t *ids, unsigned max)
{
    unsigned n = c->ndone < max ? c->ndone : max;
    if (!n)
        return 0;
    memcpy(ids, c->done, n * sizeof *ids);
    memmove(c->done, c->done + n, (c->ndone - n) * sizeof *ids);
    c->ndone -= n;
    return n;
}

unsigned kvu_core_busy(const struct kvu_core *c)
{
    return c->active + c->unstarted + c->ndone + c->nops;
}

unsigned kvu_core_active(const struct kvu_core *c)
{
    return c->active;
}

const struct kvu_core_stats *kvu_core_stats(const struct kvu_core *c)
{
    return &c->st;
}

int kvu_core_noreplace(const struct kvu_core *c)
{
    return c->cfg.noreplace;
}

unsigned kvu_core_load_ioprio(const struct kvu_core *c)
{
    return c->cfg.load_ioprio;
}
