/*
 * chains.c: what a block needs before its first chain (kvu_prepare), what
 * each kind of block submits (its first chain and its follow-ups) and what
 * its completions mean -- loads, presence checks and deletes here, stores
 * (the longest state machine) in stores.c.  blocks.c calls kvu_begin when
 * a block takes a slot and kvu_end_chain when one of its chains is over;
 * these write the next chain with kvu_push or end the block with kvu_finish.
 */
#define _GNU_SOURCE
#include "blocks.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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
void kvu_push_transfer(struct kvu_core *c, struct block *b, int reading, unsigned flags, unsigned prio)
{
    uint64_t bs = c->cfg.block_size;
    unsigned slot = slot_of(c, b);
    int fixed = -1;
    if (c->nspans && !b->bounce && (!c->cfg.verify || c->cfg.trailer_index >= 0))
        fixed = fixed_index(c, b->addr, bs);
    b->fixed = 0;
    if (fixed >= 0) {
        int op = reading ? IORING_OP_READ_FIXED : IORING_OP_WRITE_FIXED;
        b->fixed = 1; /* counted when the block ends well (a chain may run twice) */
        b->want[0] = bs;
        b->ntransfer = 1;
        kvu_push(c, b, op, flags, slot, b->addr, bs, 0, 0, (uint64_t)fixed, prio, (int32_t)bs);
        if (c->cfg.verify) {
            b->want[1] = KVU_TRAILER_SIZE;
            b->ntransfer = 2;
            kvu_push(c, b, op, flags, slot, ptr(trailer_of(c, b)), KVU_TRAILER_SIZE, bs, 0,
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
        kvu_push(c, b, reading ? IORING_OP_READV : IORING_OP_WRITEV, flags, slot, ptr(b->iov), 2, 0, 0, 0,
             prio, (int32_t)b->want[0]);
    } else {
        b->want[0] = bs;
        kvu_push(c, b, reading ? IORING_OP_READ : IORING_OP_WRITE, flags, slot, b->addr, bs, 0, 0, 0, prio,
             (int32_t)bs);
    }
}

/* The first failed transfer: its negative result, 1 if one was short, or 0. */
int32_t kvu_transfer_failure(const struct block *b, const int32_t *res)
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

static void load_begin(struct kvu_core *c, struct block *b)
{
    unsigned slot = slot_of(c, b);
    kvu_new_chain(c, b, ST_MAIN);
    kvu_push(c, b, IORING_OP_OPENAT2, L_ | S_ | c->cfg.open_flags, ns_of(c, b), ptr(b->path), 0, 0, 0, ptr(&c->how_read[b->root]),
         slot + 1, R_NEGATIVE);
    /* Hard link: the close runs whatever the read did, so the slot is freed. */
    kvu_push_transfer(c, b, 1, H_ | S_ | F_ | c->cfg.read_flags, c->cfg.load_ioprio);
    /* The thread engine checksums on the worker that read the block. */
    b->hashed = c->cfg.verify && c->eng->pool != NULL && !b->batch->defer_verify;
    if (b->hashed)
        kvu_push(c, b, KVU_OP_CHECKSUM, H_ | S_, 0, b->addr, c->cfg.block_size, 0, ptr(&b->computed), 0, 0,
             R_NEGATIVE);
    kvu_push(c, b, IORING_OP_CLOSE, 0, 0, 0, 0, 0, 0, 0, slot + 1, R_NEGATIVE);
}


static void stat_begin(struct kvu_core *c, struct block *b)
{
    kvu_new_chain(c, b, ST_MAIN);
    kvu_push(c, b, IORING_OP_STATX, 0, ns_of(c, b), ptr(b->path), 0, 0, AT_SYMLINK_NOFOLLOW,
         STATX_BASIC_STATS, ptr(&b->sx), R_CANCELLED);
}

static void delete_begin(struct kvu_core *c, struct block *b)
{
    unsigned slot = slot_of(c, b);
    kvu_new_chain(c, b, ST_MAIN);
    /* Check the directories are real ones beneath the namespace before
     * unlinking through them: a planted symlink must not redirect it.  No
     * CQE_SKIP_SUCCESS on the unlink: a failed unlinkat is not marked
     * failed, so a skipped CQE would hide ENOENT. */
    kvu_push(c, b, IORING_OP_OPENAT2, L_ | S_, ns_of(c, b), ptr(b->leaf), 0, 0, 0, ptr(&c->how_dir), slot + 1,
         R_NEGATIVE);
    kvu_push(c, b, IORING_OP_UNLINKAT, H_, ns_of(c, b), ptr(b->path), 0, 0, 0, 0, 0, R_CANCELLED);
    kvu_push(c, b, IORING_OP_CLOSE, 0, 0, 0, 0, 0, 0, 0, slot + 1, R_NEGATIVE);
}

/* The leaf's bit in the bitmaps: its first 5 hex digits (and, in vLLM's
 * layout, its group), or NO_LEAF_INDEX for a leaf they do not track. */
static unsigned leaf_index_of(const struct kvu_core *c, const uint8_t *key, unsigned klen)
{
    unsigned i, v = 0, hlen = klen;
    uint32_t group = 0;
    if (c->cfg.layout == KVU_LAYOUT_VLLM) {
        hlen = klen - 4;
        group = (uint32_t)key[hlen] << 24 | (uint32_t)key[hlen + 1] << 16 |
                (uint32_t)key[hlen + 2] << 8 | key[hlen + 3];
        if (group >= VLLM_GROUPS)
            return NO_LEAF_INDEX;
    }
    for (i = 0; i < 5; i++) {
        unsigned nib = i / 2 < hlen ? (i % 2 ? key[i / 2] & 15 : key[i / 2] >> 4) : 0;
        v = v << 4 | nib;
    }
    return group * LEAVES + v;
}

/* The store's temp-file name on its root: the writer token of that root's
 * registry, so a dead writer's cleanup there finds it.  0 or -ENAMETOOLONG. */
int kvu_name_tmp(struct kvu_core *c, struct block *b)
{
    int r = snprintf(b->tmp, sizeof b->tmp, "%s%sc%llu.tmp", b->path, c->cfg.roots[b->root].marker,
                     (unsigned long long)++c->tmp_seq);
    return r < 0 || (size_t)r >= sizeof b->tmp ? -ENAMETOOLONG : 0;
}

/*
 * What a block needs before its first chain: its path and leaf (by the
 * namespace's layout), its place in the leaf bitmaps, an aligned copy of an
 * unaligned buffer, and for a store its registry line, temp-file name and
 * payload checksum.  0, or -1 when the block already ended FAILED.
 */
int kvu_prepare(struct kvu_core *c, struct block *b)
{
    struct kvu_batch *batch = b->batch;
    unsigned i = b->index;
    uint64_t bs = c->cfg.block_size;
    b->tried_failed = 0;
    b->root_error = 0;
    b->on_root = 0;
    if (batch->root_in) {
        /* pinned to one root (an eviction removes one root's copy): no other is tried */
        b->nrank = 1;
        b->pos = 0;
        b->rank[0] = batch->root_in[i];
        if (b->rank[0] >= c->cfg.nroots) {
            b->user = b->addr = 0;
            b->bounce = NULL;
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, -EINVAL));
            return -1;
        }
        kvu_set_root(c, b, 0);
    } else {
        b->nrank = (uint8_t)kvu_rank_roots(&c->cfg, b->key, b->klen, b->rank);
        if (b->nrank < 2 || !kvu_pick_root(c, b, 0))
            kvu_set_root(c, b, 0); /* one root, or every root failing: the first-ranked one */
    }
    if (c->cfg.layout == KVU_LAYOUT_VLLM) {
        if (kvu_block_path_vllm(b->key, b->klen, b->leaf, b->path) < 0) {
            b->user = b->addr = 0;
            b->bounce = NULL;
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, -EINVAL));
            return -1;
        }
    } else {
        kvu_block_path(b->key, b->klen, c->cfg.suffix, b->leaf, b->path);
    }
    b->leaf_index = leaf_index_of(c, b->key, b->klen);
    memcpy(b->upper, b->leaf, 3);
    b->upper[3] = 0;
    b->user = b->addr = batch->addrs ? batch->addrs[i] : 0;
    b->bounce = NULL;
    if ((batch->kind == KVU_LOAD || batch->kind == KVU_STORE) && c->max_align &&
        b->addr % c->max_align) {
        /* O_DIRECT needs aligned memory: go through an aligned copy. */
        size_t align = c->max_align < 4096 ? 4096 : c->max_align;
        b->bounce = aligned_alloc(align, (bs + align - 1) / align * align);
        if (!b->bounce) {
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, -ENOMEM));
            return -1;
        }
        if (batch->kind == KVU_STORE)
            memcpy(b->bounce, (const void *)(uintptr_t)b->user, bs);
        b->addr = ptr(b->bounce);
        c->st.bounced++;
        batch->bounced++;
    }
    if (batch->kind == KVU_STORE) {
        size_t n = strlen(b->leaf);
        int r;
        memcpy(b->line, b->leaf, n);
        b->line[n] = '\n';
        b->line_len = (uint8_t)(n + 1);
        r = kvu_name_tmp(c, b);
        if (r < 0) {
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, -ENAMETOOLONG));
            return -1;
        }
        b->psum = !c->cfg.verify || sealed_by_worker(c, batch) ? 0
                  : batch->psums ? batch->psums[i]
                                 : kvu_checksum((const void *)(uintptr_t)b->addr, bs);
    }
    return 0;
}

void kvu_begin(struct kvu_core *c, struct block *b)
{
    switch (b->batch->kind) {
    case KVU_LOAD:
        load_begin(c, b);
        break;
    case KVU_STORE:
        kvu_store_begin(c, b);
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
                kvu_finish(c, b, KVU_UNVERIFIED, 0);
                return;
            } else if (kvu_checksum((const void *)(uintptr_t)b->addr, bs) != psum) {
                why = KVU_BAD_PAYLOAD_SUM;
            }
        }
    }
    if (!why) {
        if (b->bounce)
            memcpy((void *)(uintptr_t)b->user, b->bounce, bs);
        kvu_finish(c, b, KVU_HIT, 0);
        return;
    }
    /* A damaged block: remove it, so the next load is a MISS, not a retry. */
    c->st.corrupt++;
    b->error = why;
    kvu_new_chain(c, b, ST_UNLINK);
    kvu_push(c, b, IORING_OP_UNLINKAT, 0, ns_of(c, b), ptr(b->path), 0, 0, 0, 0, 0, R_CANCELLED);
}

static void load_end(struct kvu_core *c, struct block *b)
{
    int32_t open = b->res[0], bad;
    unsigned i;
    int quiet = open == NONE;
    if (b->stage == ST_UNLINK) {
        kvu_finish(c, b, KVU_CORRUPT, b->error);
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
            kvu_finish(c, b, KVU_MISS, 0);
        else if (kvu_retry(c, b, open))
            load_begin(c, b);
        else
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, open));
        return;
    }
    bad = kvu_transfer_failure(b, b->res + 1);
    if (bad < 0) {
        if (bad == -EPERM && c->cfg.load_ioprio) {
            /* The kernel refused the realtime I/O class after all: drop it. */
            c->cfg.load_ioprio = 0;
            c->st.ioprio_dropped++;
            load_begin(c, b);
        } else if (kvu_retry(c, b, bad)) {
            load_begin(c, b);
        } else {
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, bad));
        }
        return;
    }
    load_check(c, b, bad ? KVU_SHORT_READ : 0);
}

/* ------------------------------------------------------------------------ */
/* presence checks and deletes                                              */
/* ------------------------------------------------------------------------ */

static void stat_end(struct kvu_core *c, struct block *b)
{
    int32_t res = b->res[0];
    if (res < 0 && kvu_retry(c, b, res)) {
        stat_begin(c, b);
    } else if (res == 0) {
        int present = S_ISREG(b->sx.stx_mode) && b->sx.stx_size == c->file_size;
        kvu_finish(c, b, present ? KVU_PRESENT : KVU_ABSENT, 0);
    } else if (res == -ENOENT || res == -ENOTDIR) {
        kvu_finish(c, b, KVU_ABSENT, 0);
    } else {
        kvu_finish(c, b, KVU_FAILED, kvu_fail(c, res));
    }
}

static void delete_end(struct kvu_core *c, struct block *b)
{
    int32_t dir = b->res[0] == NONE ? 0 : b->res[0], unlink = b->res[1];
    if (dir < 0) {
        if (dir == -ENOENT || dir == -ENOTDIR)
            kvu_finish(c, b, KVU_ABSENT, 0);
        else
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, dir));
    } else if (unlink == 0) {
        if (!b->batch->quiet)
            c->st.deleted++;
        kvu_finish(c, b, KVU_PRESENT, 0);
    } else if (unlink == NONE || unlink == -ENOENT) {
        kvu_finish(c, b, KVU_ABSENT, 0);
    } else {
        kvu_finish(c, b, KVU_FAILED, kvu_fail(c, unlink));
    }
}

void kvu_end_chain(struct kvu_core *c, struct block *b)
{
    switch (b->batch->kind) {
    case KVU_LOAD:
        load_end(c, b);
        break;
    case KVU_STORE:
        kvu_store_end(c, b);
        break;
    case KVU_STAT:
        stat_end(c, b);
        break;
    default:
        delete_end(c, b);
        break;
    }
}

