/*
 * roots.c: a store over several roots.  Each key ranks the roots
 * (rendezvous hashing); a block goes to the first usable one and, when it
 * ends there in a way that says "try elsewhere" (a failing or full root
 * for a store, a miss for a load or check, any result for a delete), on to
 * the next (kvu_move_on, called by kvu_finish).  A root that fails is
 * skipped for a while and then probed by one block.
 */
#define _GNU_SOURCE
#include "blocks.h"

#include <errno.h>
#include <xxhash.h>

/* Errors (positive errnos) that say the root itself is failing -- its
 * device, its mount, its server -- not this block: the root is skipped for
 * a while. */
int kvu_root_failure(int32_t err)
{
    switch (err) {
    case EIO: case ETIMEDOUT: case ENOTCONN: case ECONNABORTED: case ENODEV: case ENXIO:
    case EROFS: case EHOSTDOWN: case EHOSTUNREACH: case ESHUTDOWN: case ENOMEDIUM:
        return 1;
    default:
        return 0;
    }
}

#define ROOT_RETRY_NS 2000000000LL /* a failing root is tried again after 2 s */

void kvu_root_failed(struct kvu_core *c, unsigned root, int32_t err)
{
    struct kvu_root_stats *r = &c->roots[root];
    r->down = 1;
    r->last_error = err;
    r->retry_at = kvu_now_ns() + ROOT_RETRY_NS;
    r->failures++;
}

/*
 * A failing root is tried again after ROOT_RETRY_NS by one block at a
 * time (the probe), and only once none of its blocks is still in flight or
 * lent: a root whose requests hang keeps no more of the engine's workers
 * than it had when it was found out.
 */
static int root_usable(const struct kvu_core *c, unsigned root, int64_t *now)
{
    const struct kvu_root_stats *r = &c->roots[root];
    if (!r->down)
        return 1;
    if (r->inflight || r->lent)
        return 0;
    if (!*now)
        *now = kvu_now_ns();
    return *now >= r->retry_at;
}

/* Put the block on the root at rank position `pos` (keeping the per-root counts). */
void kvu_set_root(struct kvu_core *c, struct block *b, unsigned pos)
{
    if (b->on_root)
        c->roots[b->root].inflight--;
    b->pos = (uint8_t)pos;
    b->root = b->rank[pos];
    c->roots[b->root].inflight++;
    b->on_root = 1;
}

/* The block leaves its root (it ended, or was lent). */
void kvu_leave_root(struct kvu_core *c, struct block *b, int lent)
{
    struct kvu_root_stats *r = &c->roots[b->root];
    if (!b->on_root)
        return;
    r->inflight--;
    if (lent)
        r->lent++;
    else if (c->cfg.nroots > 1)
        r->last_done = kvu_now_ns();
    b->on_root = 0;
}

/* The first usable root at rank position `from` or after: b->root; 1, or 0 if none. */
int kvu_pick_root(struct kvu_core *c, struct block *b, unsigned from)
{
    int64_t now = 0;
    unsigned i;
    for (i = from; i < b->nrank; i++) {
        if (root_usable(c, b->rank[i], &now)) {
            kvu_set_root(c, b, i);
            return 1;
        }
    }
    return 0;
}

/* Rank the roots for a key: highest xxh3(key, seed = root id) first. */
unsigned kvu_rank_roots(const struct kvu_core_config *cfg, const uint8_t *key, unsigned klen,
                        uint8_t *rank)
{
    uint64_t score[KVU_MAX_ROOTS];
    unsigned i, j, n = cfg->nroots;
    for (i = 0; i < n; i++) {
        uint64_t s = n > 1 ? XXH3_64bits_withSeed(key, klen, cfg->roots[i].id) : 0;
        for (j = i; j > 0 && score[j - 1] < s; j--) {
            score[j] = score[j - 1];
            rank[j] = rank[j - 1];
        }
        score[j] = s;
        rank[j] = (uint8_t)i;
    }
    return n;
}

/*
 * Whether a block that ended on one root goes on to its next root instead:
 * a store whose root is failing or full, a load or presence check that did
 * not find it there (it may have been stored before a root was added, or
 * while its first root was failing), a delete (a key may be on several).
 */
int kvu_move_on(struct kvu_core *c, struct block *b, int *status, int32_t *error)
{
    int kind = b->batch->kind;
    int failing = *status == KVU_FAILED && kvu_root_failure(*error);
    unsigned from = b->pos + 1u;
    if (failing)
        kvu_root_failed(c, b->root, *error);
    if (b->batch->cancelled || from >= b->nrank)
        goto last;
    if (kind == KVU_STORE && !(failing || (*status == KVU_FAILED &&
                                           (*error == ENOSPC || *error == EDQUOT))))
        return 0;
    if (kind == KVU_LOAD && *status != KVU_MISS && !failing)
        return 0;
    if (kind == KVU_STAT && *status != KVU_ABSENT && !failing)
        return 0;
    if (kind == KVU_DELETE && *status == KVU_FAILED && !failing)
        goto last;
    if (!kvu_pick_root(c, b, from))
        goto last;
    if (failing) {
        /* counted against the root, not the block */
        c->st.failures--;
        if (*error < KVU_ERRNOS)
            c->st.errors[*error]--;
        b->tried_failed = 1;
        b->root_error = *error;
    }
    if (kind == KVU_DELETE && *status == KVU_PRESENT)
        b->exists = 1; /* removed from one root: PRESENT whatever the others say */
    c->roots[b->rank[from - 1]].moved_on++;
    b->made_dirs = b->retry_after_cleanup = 0;
    if (kind != KVU_DELETE)
        b->exists = 0;
    if (kind == KVU_STORE && kvu_name_tmp(c, b) < 0)
        goto last; /* (as long as on the first root: cannot happen) */
    kvu_begin(c, b);
    return 1;
last:
    if (kind == KVU_DELETE && b->exists && *status != KVU_PRESENT) {
        *status = KVU_PRESENT;
        *error = 0;
    } else if ((kind == KVU_LOAD && *status == KVU_MISS) && b->tried_failed) {
        /* a root that may hold it failed: not a plain miss */
        *status = KVU_FAILED;
        *error = kvu_fail(c, -b->root_error);
    }
    return 0;
}

const struct kvu_root_stats *kvu_core_root(const struct kvu_core *c, unsigned root)
{
    return root < c->cfg.nroots ? &c->roots[root] : NULL;
}
