/*
 * deadlines.c: each block's deadline (cfg.timeout_ns) and what ends a block
 * for its caller while the kernel still has its chain -- a deadline that
 * passed, or a close that cannot wait (kvu_core_abort).  Such a block is
 * *lent*: it keeps its slot (descriptor, trailer page, the buffer the
 * kernel may still touch) until its chain comes back (kvu_end_lent), and its
 * batch is reported again, released, once none of its blocks is left.
 */
#define _GNU_SOURCE
#include "blocks.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int64_t kvu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The deadline list holds every block in flight for its caller, oldest
 * first: all share one timeout, so start order is deadline order. */
void kvu_deadline_add(struct kvu_core *c, struct block *b, int64_t now)
{
    unsigned self = (unsigned)(b - c->blocks) + 1;
    b->deadline = now + (int64_t)c->cfg.timeout_ns;
    b->dl_next = 0;
    b->dl_prev = c->dl_tail;
    if (c->dl_tail)
        c->blocks[c->dl_tail - 1].dl_next = self;
    else
        c->dl_head = self;
    c->dl_tail = self;
}

void kvu_deadline_remove(struct kvu_core *c, struct block *b)
{
    unsigned self = (unsigned)(b - c->blocks) + 1;
    if (!b->dl_prev && c->dl_head != self)
        return; /* not on the list */
    if (b->dl_prev)
        c->blocks[b->dl_prev - 1].dl_next = b->dl_next;
    else
        c->dl_head = b->dl_next;
    if (b->dl_next)
        c->blocks[b->dl_next - 1].dl_prev = b->dl_prev;
    else
        c->dl_tail = b->dl_prev;
    b->dl_prev = b->dl_next = 0;
}

/* Ask the kernel to cancel every step of the block's chain (best effort: a
 * request blocked inside a filesystem may not stop).  The cancels' own
 * completions carry KVU_QUIET_TAG and are dropped. */
static void cancel_chain(struct kvu_core *c, struct block *b)
{
    unsigned step;
    if (!c->eng->ring)
        return; /* a thread engine's running chain cannot be stopped */
    for (step = 0; step < b->nsteps; step++) {
        uint64_t *w;
        if (kvu_grow((void **)&c->words, &c->ops_cap, c->nops + 1, KVU_OP_WORDS * sizeof(uint64_t)) < 0)
            return;
        w = c->words + (size_t)c->nops++ * KVU_OP_WORDS;
        memset(w, 0, KVU_OP_WORDS * sizeof *w);
        w[0] = IORING_OP_ASYNC_CANCEL;
        w[3] = KVU_CORE_TAG | (uint64_t)b->gen << 24 | (uint64_t)(b - c->blocks) << 4 | step;
        w[6] = KVU_CORE_TAG | KVU_QUIET_TAG;
    }
}

/*
 * End a block in flight for its caller now, FAILED with `err`, while the
 * kernel may still have its chain: it stays in its slot, lent, until that
 * chain comes back (kvu_end_lent).
 */
void kvu_lend(struct kvu_core *c, struct block *b, int32_t err)
{
    struct kvu_batch *batch = b->batch;
    kvu_deadline_remove(c, b);
    cancel_chain(c, b);
    batch->status[b->index] = KVU_FAILED;
    batch->error[b->index] = kvu_fail(c, -err);
    batch->failed++;
    batch->lent++;
    if (batch->kind == KVU_LOAD)
        c->loads--;
    else if (batch->kind == KVU_STORE)
        c->stores_running--;
    b->lent = 1;
    kvu_leave_root(c, b, 1);
    c->active--;
    c->lent++;
    if (!--batch->pending)
        kvu_batch_done(c, batch);
}

/* A lent block's chain is over for good: give the slot back, and tell the
 * caller once its batch has no block left in the kernel. */
void kvu_end_lent(struct kvu_core *c, struct block *b)
{
    struct kvu_batch *batch = b->batch;
    b->lent = 0;
    c->roots[b->root].lent--;
    c->lent--;
    if (!--batch->lent && !batch->pending) {
        if (kvu_grow((void **)&c->released, &c->released_cap, c->nreleased + 1, sizeof *c->released) < 0)
            abort(); /* its owner would hold the buffers forever */
        c->released[c->nreleased++] = batch->id;
    }
    kvu_release(c, b);
}

/* Deadlines that passed; and, when every slot is held by a lent block
 * (the filesystem hangs), queued blocks end at once rather than wait for
 * a slot that may never come back. */
void kvu_expire(struct kvu_core *c, int64_t now)
{
    while (c->dl_head) {
        struct block *b = &c->blocks[c->dl_head - 1];
        if (b->deadline > now)
            break;
        c->st.timeouts++;
        /* The root is failing if nothing on it ended for a whole timeout; a
         * block late because the engine's workers are busy elsewhere (with
         * another root's hung requests) does not count against it. */
        if (c->cfg.nroots > 1 &&
            now - c->roots[b->root].last_done >= (int64_t)c->cfg.timeout_ns)
            kvu_root_failed(c, b->root, ETIMEDOUT);
        kvu_lend(c, b, ETIMEDOUT);
    }
    if (c->unstarted && !c->nfree && c->lent == c->cfg.slots) {
        struct kvu_batch *q;
        while ((q = c->fast.head) || (q = c->stores.head)) {
            unsigned dropped = q->n - q->next;
            c->st.timeouts += dropped;
            c->st.failures += dropped;
            c->st.errors[ETIMEDOUT] += dropped;
            kvu_drop_unstarted(c, q, ETIMEDOUT);
        }
    }
}

unsigned kvu_core_lent(const struct kvu_core *c)
{
    return c->lent;
}

/* The earliest deadline of a block in flight (CLOCK_MONOTONIC ns), or -1:
 * the front end wakes the core then, even if no completion comes. */
int64_t kvu_core_next_deadline(const struct kvu_core *c)
{
    if (c->dl_head)
        return c->blocks[c->dl_head - 1].deadline;
    if (c->cfg.timeout_ns && c->unstarted && c->lent == c->cfg.slots)
        return 0; /* queued behind lent blocks only: now */
    return -1;
}

/*
 * Closing with I/O that may never come back: every queued block ends
 * FAILED with `err`, every block in flight too, lent until its chain
 * returns.  Returns how many blocks are lent.
 */
unsigned kvu_core_abort(struct kvu_core *c, int32_t err)
{
    unsigned i;
    struct kvu_batch *q;
    while ((q = c->fast.head) || (q = c->stores.head))
        kvu_drop_unstarted(c, q, err);
    for (i = 0; i < c->cfg.slots; i++) {
        struct block *b = &c->blocks[i];
        if (b->active && !b->lent)
            kvu_lend(c, b, err);
    }
    return c->lent;
}
