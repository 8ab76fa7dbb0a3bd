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
 * What each kind of block submits, and what its completions mean, is in
 * chains.c (loads, checks, deletes) and stores.c; deadlines and lent blocks
 * in deadlines.c; several roots in roots.c.
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
 *
 * Deadlines (cfg.timeout_ns): a block that has not ended that long after
 * it started ends FAILED (ETIMEDOUT) for its caller at once, but is *lent*:
 * it keeps its slot -- its descriptor, its trailer page, the buffer the
 * kernel may still read or write -- until its chain comes back, and then
 * ends quietly (a store removes its temp file).  Its batch counts it in
 * `lent` and is reported again (kvu_core_released) once none is left, so
 * the caller knows when its buffers are its own again.  A store is
 * published by a chain of its own, written only after the write came back
 * in time: a lent store never publishes bytes read after its deadline.
 */
#define _GNU_SOURCE
#include "blocks.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* life cycle                                                               */
/* ------------------------------------------------------------------------ */

static size_t leaf_bitmap_bytes(const struct kvu_core_config *cfg)
{
    return (size_t)LEAVES / 8 * (cfg->layout == KVU_LAYOUT_VLLM ? VLLM_GROUPS : 1);
}

struct kvu_core *kvu_core_new(const struct kvu_core_config *cfg, struct kvu_engine *engine)
{
    struct kvu_core *c = calloc(1, sizeof *c);
    unsigned i;
    uint64_t resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    if (!c)
        return NULL;
    if (!cfg->nroots || cfg->nroots > KVU_MAX_ROOTS) {
        free(c);
        return NULL;
    }
    c->cfg = *cfg;
    c->eng = engine;
    c->file_size = cfg->block_size + (cfg->verify ? KVU_TRAILER_SIZE : 0);
    /* No O_CLOEXEC on direct-descriptor opens: the kernel rejects it. */
    for (i = 0; i < cfg->nroots; i++) {
        const struct kvu_root_config *r = &cfg->roots[i];
        c->how_read[i].flags = O_RDONLY | (r->direct ? O_DIRECT : 0);
        c->how_read[i].resolve = resolve;
        c->how_create[i].flags = O_CREAT | O_EXCL | O_WRONLY | (r->direct ? O_DIRECT : 0);
        c->how_create[i].mode = 0644;
        c->how_create[i].resolve = resolve;
        if (r->direct && r->mem_align > c->max_align)
            c->max_align = r->mem_align;
    }
    for (i = 0; i < cfg->nroots; i++)
        c->roots[i].last_done = kvu_now_ns();
    c->how_dir.flags = O_PATH | O_DIRECTORY;
    c->how_dir.resolve = resolve;
    /* A directory to fsync: an O_PATH descriptor cannot be synced. */
    c->how_sync.flags = O_RDONLY | O_DIRECTORY;
    c->how_sync.resolve = resolve;
    c->blocks = calloc(cfg->slots, sizeof *c->blocks);
    c->free_slots = malloc(cfg->slots * sizeof *c->free_slots);
    c->leaf_bytes = leaf_bitmap_bytes(cfg);
    c->leaf_ready = calloc(c->leaf_bytes, cfg->nroots);
    c->leaf_noted = calloc(c->leaf_bytes, cfg->nroots);
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
    free(c->released);
    free(c->rud);
    free(c->rres);
    free(c);
}

/* ------------------------------------------------------------------------ */
/* writing chains                                                           */
/* ------------------------------------------------------------------------ */

int kvu_grow(void **p, unsigned *cap, unsigned need, size_t size)
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
void kvu_push(struct kvu_core *c, struct block *b, int op, unsigned flags, int64_t fd, uint64_t addr,
                 uint64_t len, uint64_t off, uint64_t a1, uint64_t a2, uint64_t a3, int32_t rule)
{
    unsigned step = b->nsteps++;
    uint64_t *w;
    if (kvu_grow((void **)&c->words, &c->ops_cap, c->nops + 1, KVU_OP_WORDS * sizeof(uint64_t)) < 0)
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
void kvu_new_chain(struct kvu_core *c, struct block *b, enum stage stage)
{
    b->stage = (uint8_t)stage;
    b->nsteps = 0;
    b->loud = 0;
    b->gen = ++c->gen;
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

/* ------------------------------------------------------------------------ */
/* finishing                                                                */
/* ------------------------------------------------------------------------ */

void kvu_batch_done(struct kvu_core *c, struct kvu_batch *batch)
{
    if (kvu_grow((void **)&c->done, &c->done_cap, c->ndone + 1, sizeof *c->done) < 0)
        abort(); /* the batch's owner would wait forever */
    c->done[c->ndone++] = batch->id;
}

void kvu_finish(struct kvu_core *c, struct block *b, int status, int32_t error)
{
    struct kvu_batch *batch = b->batch;
    uint64_t bs = c->cfg.block_size;
    if (c->cfg.nroots > 1 && kvu_move_on(c, b, &status, &error))
        return;
    kvu_leave_root(c, b, 0);
    if (b->fixed && (status == KVU_STORED || status == KVU_HIT || status == KVU_CORRUPT ||
                     status == KVU_UNVERIFIED))
        c->st.fixed_transfers++;
    if (status == KVU_STORED || status == KVU_HIT) {
        struct kvu_root_stats *r = &c->roots[b->root];
        r->down = 0;
        if (status == KVU_STORED)
            r->stored++;
        else
            r->hits++;
    }
    batch->status[b->index] = status;
    batch->error[b->index] = error;
    if (batch->root_out)
        batch->root_out[b->index] = b->root;
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
    if (batch->kind == KVU_LOAD)
        c->loads--;
    else if (batch->kind == KVU_STORE)
        c->stores_running--;
    kvu_deadline_remove(c, b);
    c->active--;
    if (!--batch->pending)
        kvu_batch_done(c, batch);
    kvu_release(c, b);
}

/* The block gives its slot back (its status is already the caller's). */
void kvu_release(struct kvu_core *c, struct block *b)
{
    if (b->bounce) {
        free(b->bounce);
        b->bounce = NULL;
    }
    b->active = 0;
    b->batch = NULL;
    c->free_slots[c->nfree++] = (unsigned)(b - c->blocks);
}

int32_t kvu_fail(struct kvu_core *c, int32_t res)
{
    c->st.failures++;
    if (-res > 0 && -res < KVU_ERRNOS)
        c->st.errors[-res]++;
    return -res;
}

/*
 * Whether to run the block's chain again after a transient result: EAGAIN,
 * EINTR, ECANCELED, which io_uring gives every request of a thread that
 * exits while they are in flight (the polling front end may be called from
 * threads that come and go; the retry is submitted by a live thread), or
 * ESTALE, which NFS and FUSE give a load whose file a concurrent store
 * just replaced (the new name resolves on the next try).
 */
int kvu_retry(struct kvu_core *c, struct block *b, int32_t res)
{
    if ((res != -EAGAIN && res != -EINTR && res != -ECANCELED && res != -ESTALE) ||
        b->batch->cancelled || b->retries >= MAX_RETRIES)
        return 0;
    b->retries++;
    c->st.retries++;
    return 1;
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
    if (!over)
        return;
    if (b->lent)
        kvu_end_lent_chain(c, b);
    else
        kvu_end_chain(c, b);
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

static void start_block(struct kvu_core *c, struct kvu_batch *batch, int64_t now)
{
    unsigned i = batch->next++;
    struct block *b = &c->blocks[c->free_slots[--c->nfree]];
    uint32_t k0 = batch->key_off[i], k1 = batch->key_off[i + 1];
    c->unstarted--;
    c->active++;
    b->batch = batch;
    b->index = i;
    b->gen = ++c->gen;
    b->active = 1;
    b->retries = b->made_dirs = b->exists = b->retry_after_cleanup = b->lent = b->new_dirs = 0;
    b->fixed = 0;
    b->fd = -1;
    b->klen = k1 - k0;
    memcpy(b->key, batch->keys + k0, b->klen);
    if (batch->kind == KVU_STORE)
        c->stores_running++;
    if (c->cfg.timeout_ns)
        kvu_deadline_add(c, b, now);
    if (kvu_prepare(c, b) == 0)
        kvu_begin(c, b);
}

static void fill(struct kvu_core *c)
{
    int64_t now = c->cfg.timeout_ns && c->nfree && c->unstarted ? kvu_now_ns() : 0;
    while (c->nfree) {
        struct kvu_batch *batch = c->fast.head;
        if (batch) {
            start_block(c, batch, now);
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
        start_block(c, batch, now);
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
        kvu_batch_done(c, b);
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

/* Blocks of the batch not started yet end FAILED with `err`. */
void kvu_drop_unstarted(struct kvu_core *c, struct kvu_batch *b, int32_t err)
{
    unsigned i, dropped = b->n - b->next;
    if (b->queued)
        dequeue(b->kind == KVU_STORE ? &c->stores : &c->fast, b);
    for (i = b->next; i < b->n; i++) {
        b->status[i] = KVU_FAILED;
        b->error[i] = err;
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
        kvu_batch_done(c, b);
}

/* The caller gave up on the batch: blocks not started end FAILED
 * (ECANCELED); blocks in flight finish, without retries. */
void kvu_core_cancel(struct kvu_core *c, struct kvu_batch *b)
{
    if (b->cancelled || !b->pending)
        return;
    b->cancelled = 1;
    kvu_drop_unstarted(c, b, ECANCELED);
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
                if (!(u & KVU_QUIET_TAG))
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
    if (c->cfg.timeout_ns && (c->dl_head || c->unstarted))
        kvu_expire(c, kvu_now_ns());
    kvu_core_flush(c);
    return c->ndone;
}

/* Move up to max ids from the front of list[0, *len) into ids. */
static unsigned take_ids(uint64_t *list, unsigned *len, uint64_t *ids, unsigned max)
{
    unsigned n = *len < max ? *len : max;
    if (!n)
        return 0;
    memcpy(ids, list, n * sizeof *ids);
    memmove(list, list + n, (*len - n) * sizeof *ids);
    *len -= n;
    return n;
}

unsigned kvu_core_done(struct kvu_core *c, uint64_t *ids, unsigned max)
{
    return take_ids(c->done, &c->ndone, ids, max);
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


/* Batches whose lent blocks have all come back since the last call. */
unsigned kvu_core_released(struct kvu_core *c, uint64_t *ids, unsigned max)
{
    return take_ids(c->released, &c->nreleased, ids, max);
}
