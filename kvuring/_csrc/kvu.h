/*
 * kvu.h: the contract between kvuring's C core and its cffi binding.
 *
 * Everything Python calls is declared here and, in the same form, in the
 * cdef in build_uring.py.  The .c files beside this header each hold one
 * idea: ops.c (operation words -> SQEs, CQEs -> arrays, for either engine),
 * chain.c (the same words run with plain syscalls), pool.c (the thread
 * engine's POSIX threads), format.c (paths, trailer, checksums), and
 * blocks.c with chains.c, stores.c, deadlines.c and roots.c (the per-block
 * state machine every front end drives; blocks.h is their private contract).
 */
#ifndef KVU_H
#define KVU_H

#include <stdint.h>
#include <linux/stat.h>
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
 * arg1..arg3 are per opcode (see kvu_prep_one in ops.c).
 */
#define KVU_CORE_TAG (1ULL << 62)  /* user_data of the block core's operations */
#define KVU_QUIET_TAG (1ULL << 61) /* with KVU_CORE_TAG: a completion nobody waits for (a cancel) */

/*
 * cdef: begin.  From here to "cdef: end" this header is also the cffi cdef
 * (build_uring.py reads it), so Python's view of every struct, constant and
 * function is the compiler's: only integer #defines, enums, structs and
 * prototypes in between.
 */
#define KVU_OP_WORDS 10

/*
 * Steps only the thread engine runs (kvu_run_chain), so that a block's
 * checksum is computed by the worker that moved its bytes, in parallel,
 * rather than by the thread that reaps: the payload's xxh3 after a load's
 * read, and the trailer (payload xxh3 included) before a store's write.
 * Opcodes past io_uring's own; kvu_prep_ops refuses them.
 */
#define KVU_OP_CHECKSUM 240
#define KVU_OP_SEAL 241
/*
 * Two more for a namespace's open and close (kvuring/_nsops.py), which
 * io_uring has no opcode for: flock(fd, arg1) and getdents64(fd, addr, len).
 */
#define KVU_OP_FLOCK 242
#define KVU_OP_GETDENTS 243

/* IORING_OP_FIXED_FD_INSTALL (Linux 6.8; liburing 2.3's header lacks it):
 * a direct descriptor's file put into the process's fd table, so that
 * closing it runs the filesystem's flush, where NFS and FUSE report
 * write-back errors (closing a direct descriptor never flushes). */
#define KVU_OP_FD_INSTALL 54

#define KVU_ERRNOS 136       /* errnos counted one by one in kvu_core_stats.errors */

#define KVU_MAX_CHAIN 16     /* steps a chain may have (user_data has 4 step bits) */
#define KVU_TRAILER_SIZE 4096
#define KVU_MAX_KEY 64
#define KVU_PATH_MAX 160     /* "abc/de/" + 128 hex digits + suffix + NUL */
#define KVU_TMP_MAX 256      /* path + marker (< 64) + "c<seq>.tmp" */

/* A block's outcome (the status array of a batch). */
enum {
    KVU_PENDING = 0,
    KVU_STORED = 1,
    KVU_EXISTS = 2,
    KVU_HIT = 3,
    KVU_MISS = 4,
    KVU_CORRUPT = 5,
    KVU_FAILED = 6,
    KVU_UNVERIFIED = 7, /* a load whose payload checksum the caller compares */
    KVU_PRESENT = 8,    /* stat: a regular file of the right size; delete: removed */
    KVU_ABSENT = 9,
};

/* Why a block is CORRUPT (the error array of a batch, for CORRUPT blocks). */
enum {
    KVU_OK = 0,
    KVU_BAD_MAGIC = 1,
    KVU_BAD_TRAILER_SUM = 2,
    KVU_BAD_PADDING = 3,
    KVU_BAD_VERSION = 4,
    KVU_BAD_LENGTH = 5,
    KVU_BAD_KEY = 6,
    KVU_BAD_PAYLOAD_SUM = 7,
    KVU_SHORT_READ = 8,
};

/* Where a block's file goes, relative to the namespace (kvu_block_path). */
enum {
    KVU_LAYOUT_KVURING = 0, /* <k[0:3]>/<k[3:5]>/<k><suffix>, k = the key in hex */
    KVU_LAYOUT_VLLM = 1,    /* <h[0:3]>/<h[3:5]>_g<group>/<h>.bin: vLLM's FileMapper, the key
                               being hash + 4-byte big-endian group index */
};
#define KVU_LEAF_MAX 20     /* "abc/de_g4294967295" + NUL */

/* What a batch does with each block. */
enum { KVU_LOAD = 1, KVU_STORE = 2, KVU_STAT = 3, KVU_DELETE = 4 };

/* One engine as C sees it: a ring, or the thread pool (pool.c). */
struct kvu_pool;
struct kvu_engine {
    struct io_uring *ring;
    struct kvu_pool *pool;
    int efd;
    int defer_taskrun;
    uint64_t sqes_submitted, enter_calls, cqes_reaped;
};

/*
 * One batch, filled in by Python, which keeps it and every array it points
 * at alive until the core reports it done.  Blocks [0, ready) may start;
 * a store batch whose checksums come from worker threads raises `ready` as
 * they arrive.
 */
struct kvu_batch {
    uint64_t id;
    int kind;
    unsigned n, ready;
    const uint8_t *keys;      /* the keys, back to back */
    const uint32_t *key_off;  /* n + 1 offsets into keys */
    const uint64_t *addrs;    /* the block buffers */
    const uint64_t *psums;    /* stores: payload checksums, or NULL to compute them */
    uint64_t *psum_out;       /* loads: the trailer's checksum, for KVU_UNVERIFIED blocks */
    uint8_t *root_out;        /* or NULL: the root each block ended on (several roots) */
    const uint8_t *root_in;   /* or NULL: each block goes to this root only (evictions) */
    int32_t *status;          /* out: KVU_* per block */
    int32_t *error;           /* out: errno (FAILED) or why (CORRUPT) */
    unsigned defer_verify;    /* loads: leave the payload check to the caller */
    unsigned quiet;           /* deletes: removing CORRUPT blocks, not counted as deletes */
    /* counted by the core */
    unsigned next, pending, failed, corrupt, unverified, bounced;
    unsigned lent;            /* blocks that ended (deadline, abort) while the kernel still
                                 has their chain: their buffers are not the caller's yet */
    int cancelled, queued;
    struct kvu_batch *qnext;
};

/* Counters of one core; Python adds them into BlockStore.stats(). */
struct kvu_core_stats {
    uint64_t stored, exists, hits, misses, corrupt, failures, deleted;
    uint64_t bytes_written, bytes_read, bounced, held, retries, stray;
    uint64_t noreplace_fallbacks, ioprio_dropped, fixed_transfers;
    uint64_t timeouts, cleanup_failed, close_errors, syncs;
    uint64_t errors[KVU_ERRNOS]; /* FAILED blocks by errno */
};

/*
 * One root of a store: a namespace directory on one filesystem.  A key
 * lives on the root that ranks first for it (rendezvous hashing: the
 * highest xxh3 of the key seeded with each root's id), or, when that one
 * fails, on the next.
 */
#define KVU_MAX_ROOTS 16
struct kvu_root_config {
    int ns_fd;
    int reg_fd;                 /* the writer registry's lock file (leaves are appended), or -1 */
    int direct;
    unsigned mem_align;
    uint64_t id;                /* the rendezvous seed: stable for the root (from its path) */
    char marker[64];            /* ".<writer token>." of this root's registry: in temp names */
};

/* What the core knows of a root (kvu_core_root). */
struct kvu_root_stats {
    int down;                   /* failing: skipped until retry_at */
    int32_t last_error;
    int64_t retry_at;           /* CLOCK_MONOTONIC ns */
    uint64_t failures, stored, hits, moved_on;
    unsigned inflight, lent;    /* blocks on it now: in flight, and lent (past their deadline) */
    int64_t last_done;          /* when a block on it last ended (CLOCK_MONOTONIC ns) */
};

struct kvu_core_config {
    struct kvu_root_config roots[KVU_MAX_ROOTS];
    unsigned nroots;
    uint64_t block_size;
    int verify;
    unsigned slots;             /* blocks in flight at most */
    unsigned slot_base;         /* the first direct-descriptor slot the core may use */
    unsigned skip_success;      /* IOSQE_CQE_SKIP_SUCCESS, or 0 where unsupported */
    unsigned open_flags;        /* extra SQE flags for a load's open (IOSQE_ASYNC) */
    unsigned read_flags;        /* extra SQE flags for a load's read (IOSQE_ASYNC) */
    unsigned load_ioprio;
    unsigned store_limit;       /* store chains in flight while loads run; 0: no gate */
    uint64_t trailers;          /* slots trailer pages (verify), page-aligned, owned by the caller */
    int trailer_index;          /* the registered buffer holding them, or -1 */
    int noreplace;
    int layout;                 /* KVU_LAYOUT_* */
    uint64_t timeout_ns;        /* a block's deadline after it starts; 0: none */
    int fd_install;             /* stores close through KVU_OP_FD_INSTALL (flush errors seen) */
    int durable;                /* stores: fsync the data before the rename, the directory after */
    char suffix[8];             /* ".kvb" or ".bin" */
};

struct kvu_core;

/* ops.c */
int kvu_prep_ops(struct io_uring *ring, const uint64_t *ops, unsigned n);
unsigned kvu_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res, unsigned max);
int kvu_register_buffer(struct io_uring *ring, unsigned index, uint64_t addr, uint64_t len);
unsigned kvu_chain_len(const uint64_t *ops, unsigned n);
int kvu_engine_submit(struct kvu_engine *e, const uint64_t *ops, unsigned n);
unsigned kvu_engine_reap(struct kvu_engine *e, uint64_t *ud, int32_t *res, unsigned max);

/* chain.c */
int kvu_statx(int dfd, const char *path, int flags, unsigned mask, struct statx *buf);
unsigned kvu_run_chain(const uint64_t *ops, unsigned n, int *files, unsigned nfiles,
                       uint64_t *user_data, int32_t *res);

/* pool.c */
struct kvu_pool *kvu_pool_new(unsigned nthreads, unsigned nfiles, int efd);
int kvu_pool_submit(struct kvu_pool *p, const uint64_t *ops, unsigned n);
unsigned kvu_pool_reap(struct kvu_pool *p, uint64_t *ud, int32_t *res, unsigned max);
unsigned kvu_pool_wait(struct kvu_pool *p, int until_idle);
void kvu_pool_free(struct kvu_pool *p);
void kvu_pool_abandon(struct kvu_pool *p);

/* format.c */
uint64_t kvu_checksum(const void *p, size_t n);
void kvu_pack_trailer(uint8_t *page, const uint8_t *key, unsigned klen, uint64_t plen, uint64_t psum);
int kvu_check_trailer(const uint8_t *page, const uint8_t *key, unsigned klen, uint64_t plen,
                      uint64_t *psum);
unsigned kvu_block_path(const uint8_t *key, unsigned klen, const char *suffix, char *leaf, char *path);
int kvu_block_path_vllm(const uint8_t *key, unsigned klen, char *leaf, char *path);
void kvu_checksum_many(const uint64_t *addrs, unsigned n, unsigned first, unsigned step, uint64_t len,
                       uint64_t *out);
unsigned kvu_verify_many(const uint64_t *addrs, unsigned n, unsigned first, unsigned step, uint64_t len,
                         const uint64_t *want, int32_t *status, int32_t *error);

/* blocks.c */
struct kvu_core *kvu_core_new(const struct kvu_core_config *cfg, struct kvu_engine *engine);
void kvu_core_free(struct kvu_core *c);
void kvu_core_add(struct kvu_core *c, struct kvu_batch *b);
void kvu_core_cancel(struct kvu_core *c, struct kvu_batch *b);
int kvu_core_set_spans(struct kvu_core *c, const uint64_t *spans, unsigned n);
int64_t kvu_row_addrs(uint64_t base, uint64_t stride, uint64_t nrows, const int64_t *rows, unsigned n,
                      uint64_t *out);
unsigned kvu_core_drop_queued_stores(struct kvu_core *c);
int kvu_core_flush(struct kvu_core *c);
unsigned kvu_core_pump(struct kvu_core *c, uint64_t *ud, int32_t *res, unsigned max, unsigned *nother);
unsigned kvu_core_done(struct kvu_core *c, uint64_t *ids, unsigned max);
unsigned kvu_core_busy(const struct kvu_core *c);
unsigned kvu_core_active(const struct kvu_core *c);
unsigned kvu_core_lent(const struct kvu_core *c);
int64_t kvu_core_next_deadline(const struct kvu_core *c);
unsigned kvu_core_abort(struct kvu_core *c, int32_t err);
unsigned kvu_core_released(struct kvu_core *c, uint64_t *ids, unsigned max);
const struct kvu_root_stats *kvu_core_root(const struct kvu_core *c, unsigned root);
unsigned kvu_rank_roots(const struct kvu_core_config *cfg, const uint8_t *key, unsigned klen,
                        uint8_t *rank);
const struct kvu_core_stats *kvu_core_stats(const struct kvu_core *c);
int kvu_core_noreplace(const struct kvu_core *c);
unsigned kvu_core_load_ioprio(const struct kvu_core *c);

/* cdef: end */

#endif
