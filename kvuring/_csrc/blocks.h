/*
 * blocks.h: the block core's private contract between blocks.c (batches,
 * slots, completions), chains.c and stores.c (what each kind of block
 * submits and what its completions mean), deadlines.c (deadlines, lent
 * blocks) and roots.c (several roots).  Python never sees these; kvu.h is the
 * public side.
 */
#ifndef KVU_BLOCKS_H
#define KVU_BLOCKS_H

#include "kvu.h"

#include <stdint.h>
#include <sys/uio.h>
#include <linux/openat2.h>

#define NONE INT32_MIN /* no completion seen for this step */
#define MAX_RETRIES 8  /* EAGAIN, EINTR, ECANCELED, ESTALE: runs of a chain, per block */
#define NO_STEP 0xFF   /* a step a chain does not have */
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

/*
 * ST_MAIN: a block's first chain (for a store: up to closing the temp file),
 * ST_PUBLISH: a store's close of its installed descriptor and rename,
 * ST_LENT: the cleanup of a block that already ended for its caller,
 * ST_DIRSYNC: a durable store's fsync of the directories its rename (and
 * any directory it made) changed.
 */
enum stage { ST_MAIN, ST_MKDIR, ST_RENAME, ST_CLEANUP, ST_UNLINK, ST_PUBLISH, ST_LENT, ST_DIRSYNC };

struct block {
    struct kvu_batch *batch;
    unsigned index;
    uint32_t gen;
    uint8_t active, stage, nsteps, loud, retries;
    /* a store's first chain: where its steps are (NO_STEP: absent) */
    uint8_t st_reg, st_check, st_create, st_sync, st_install, st_close;
    uint8_t new_dirs;            /* durable store: directories it may have made (0, 1 leaf, 2 both) */
    uint8_t made_dirs, exists, retry_after_cleanup, sent_noreplace;
    uint8_t lent;                /* ended for its caller; the kernel still has its chain */
    uint8_t root;                /* the root this block's chains go to */
    uint8_t nrank, pos;          /* its roots in rank order, and which one it is at */
    uint8_t rank[KVU_MAX_ROOTS];
    uint8_t tried_failed;        /* a load or check found a root failing on the way */
    uint8_t on_root;             /* counted in roots[root].inflight */
    int32_t root_error;
    uint8_t line_len;
    uint8_t ntransfer;           /* transfer steps in the chain: 1, or 2 with registered buffers */
    uint8_t hashed;              /* load: the engine computed `computed` (KVU_OP_CHECKSUM) */
    uint8_t fixed;               /* its last transfer used registered buffers */
    uint8_t flags[KVU_MAX_CHAIN];
    int32_t rule[KVU_MAX_CHAIN];
    int32_t res[KVU_MAX_CHAIN];
    int32_t error;
    int32_t fd;                  /* store: the temp file's installed descriptor, or -1 */
    int64_t deadline;            /* CLOCK_MONOTONIC ns (cfg.timeout_ns) */
    unsigned dl_prev, dl_next;   /* the deadline list, in start order (slot + 1; 0: none) */
    uint64_t addr;               /* what the kernel reads or writes: the buffer or its bounce copy */
    uint64_t user;               /* the caller's buffer */
    void *bounce;
    uint64_t psum;
    uint64_t computed;           /* load: the payload's xxh3, from a KVU_OP_CHECKSUM step */
    uint64_t want[2];            /* bytes each transfer moves */
    unsigned leaf_index;
    unsigned klen;
    uint8_t key[KVU_MAX_KEY];
    char leaf[KVU_LEAF_MAX];
    char line[KVU_LEAF_MAX + 1]; /* "<leaf>\n" for the writer registry */
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
    struct open_how how_read[KVU_MAX_ROOTS], how_create[KVU_MAX_ROOTS], how_dir, how_sync;
    struct kvu_root_stats roots[KVU_MAX_ROOTS];
    unsigned max_align;           /* the largest O_DIRECT memory alignment of the roots */
    struct block *blocks;
    unsigned *free_slots;
    unsigned nfree;
    uint8_t *leaf_ready;          /* bitmaps over the leaves (leaf_index), one per root: known to exist */
    uint8_t *leaf_noted;          /* ... in the root's writer registry */
    size_t leaf_bytes;            /* one root's bitmap */
    struct queue fast;            /* loads, stats, deletes */
    struct queue stores;
    unsigned loads;               /* load blocks added and not finished (the gate) */
    unsigned stores_running;      /* store blocks in flight */
    unsigned unstarted;           /* queued blocks */
    unsigned active;              /* blocks in flight for their callers */
    unsigned lent;                /* blocks ended for their callers, chains still in the kernel */
    unsigned dl_head, dl_tail;    /* the deadline list: oldest first (slot + 1; 0: empty) */
    uint32_t gen;
    uint64_t tmp_seq;
    uint64_t file_size;
    uint64_t *words;
    unsigned nops, ops_cap;
    uint64_t *done;
    unsigned ndone, done_cap;
    uint64_t *released;           /* batches done whose last lent block came back */
    unsigned nreleased, released_cap;
    uint64_t *rud;
    int32_t *rres;
    unsigned rcap;
    uint64_t *spans;              /* registered buffers: (start, end, index) triples, sorted */
    unsigned nspans;
    struct kvu_core_stats st;
};

/* Leaves the bitmaps tell apart: the 2^20 of kvuring's layout; in vLLM's,
 * those of groups 0 to 7 (a leaf of a higher group is never taken as
 * known: one more check in its store chain, one more registry line). */
#define LEAVES (1u << 20)
#define VLLM_GROUPS 8
#define NO_LEAF_INDEX UINT32_MAX

static inline int bit_get(const uint8_t *map, unsigned i) { return map[i >> 3] >> (i & 7) & 1; }
static inline void bit_set(uint8_t *map, unsigned i) { map[i >> 3] |= (uint8_t)(1u << (i & 7)); }

static inline unsigned slot_of(const struct kvu_core *c, const struct block *b)
{
    return c->cfg.slot_base + (unsigned)(b - c->blocks);
}

static inline uint8_t *trailer_of(const struct kvu_core *c, const struct block *b)
{
    return (uint8_t *)(uintptr_t)c->cfg.trailers + (size_t)(b - c->blocks) * KVU_TRAILER_SIZE;
}

static inline int leaf_known(const uint8_t *map, unsigned index)
{
    return index != NO_LEAF_INDEX && bit_get(map, index);
}

static inline void leaf_mark(uint8_t *map, unsigned index)
{
    if (index != NO_LEAF_INDEX)
        bit_set(map, index);
}

static inline uint64_t ptr(const void *p) { return (uint64_t)(uintptr_t)p; }

static inline int ns_of(const struct kvu_core *c, const struct block *b)
{
    return c->cfg.roots[b->root].ns_fd;
}

static inline uint8_t *ready_map(const struct kvu_core *c, const struct block *b)
{
    return c->leaf_ready + c->leaf_bytes * b->root;
}

static inline uint8_t *noted_map(const struct kvu_core *c, const struct block *b)
{
    return c->leaf_noted + c->leaf_bytes * b->root;
}

/* Whether a store's trailer is packed by the thread engine's worker (KVU_OP_SEAL). */
static inline int sealed_by_worker(const struct kvu_core *c, const struct kvu_batch *batch)
{
    return c->cfg.verify && c->eng->pool != NULL && !batch->psums;
}

#define KVU_HIDDEN __attribute__((visibility("hidden")))

/* blocks.c */
KVU_HIDDEN int kvu_grow(void **p, unsigned *cap, unsigned need, size_t size);
KVU_HIDDEN void kvu_batch_done(struct kvu_core *c, struct kvu_batch *batch);
KVU_HIDDEN void kvu_drop_unstarted(struct kvu_core *c, struct kvu_batch *b, int32_t err);
KVU_HIDDEN void kvu_push(struct kvu_core *c, struct block *b, int op, unsigned flags, int64_t fd,
                         uint64_t addr, uint64_t len, uint64_t off, uint64_t a1, uint64_t a2, uint64_t a3,
                         int32_t rule);
KVU_HIDDEN void kvu_new_chain(struct kvu_core *c, struct block *b, enum stage stage);
KVU_HIDDEN void kvu_finish(struct kvu_core *c, struct block *b, int status, int32_t error);
KVU_HIDDEN int32_t kvu_fail(struct kvu_core *c, int32_t res);
KVU_HIDDEN int kvu_retry(struct kvu_core *c, struct block *b, int32_t res);
KVU_HIDDEN void kvu_release(struct kvu_core *c, struct block *b);

/* deadlines.c */
KVU_HIDDEN int64_t kvu_now_ns(void);
KVU_HIDDEN void kvu_deadline_add(struct kvu_core *c, struct block *b, int64_t now);
KVU_HIDDEN void kvu_deadline_remove(struct kvu_core *c, struct block *b);
KVU_HIDDEN void kvu_lend(struct kvu_core *c, struct block *b, int32_t err);
KVU_HIDDEN void kvu_end_lent(struct kvu_core *c, struct block *b);
KVU_HIDDEN void kvu_expire(struct kvu_core *c, int64_t now);

/* roots.c */
KVU_HIDDEN int kvu_root_failure(int32_t err);
KVU_HIDDEN void kvu_root_failed(struct kvu_core *c, unsigned root, int32_t err);
KVU_HIDDEN int kvu_pick_root(struct kvu_core *c, struct block *b, unsigned from);
KVU_HIDDEN void kvu_set_root(struct kvu_core *c, struct block *b, unsigned pos);
KVU_HIDDEN void kvu_leave_root(struct kvu_core *c, struct block *b, int lent);
KVU_HIDDEN int kvu_move_on(struct kvu_core *c, struct block *b, int *status, int32_t *error);

/* chains.c */
KVU_HIDDEN int kvu_prepare(struct kvu_core *c, struct block *b);
KVU_HIDDEN void kvu_begin(struct kvu_core *c, struct block *b);
KVU_HIDDEN void kvu_end_chain(struct kvu_core *c, struct block *b);
KVU_HIDDEN void kvu_end_lent_chain(struct kvu_core *c, struct block *b);
KVU_HIDDEN int kvu_name_tmp(struct kvu_core *c, struct block *b);
KVU_HIDDEN void kvu_push_transfer(struct kvu_core *c, struct block *b, int reading, unsigned flags,
                                  unsigned prio);
KVU_HIDDEN int32_t kvu_transfer_failure(const struct block *b, const int32_t *res);

/* stores.c */
KVU_HIDDEN void kvu_store_begin(struct kvu_core *c, struct block *b);
KVU_HIDDEN void kvu_store_end(struct kvu_core *c, struct block *b);

#endif
