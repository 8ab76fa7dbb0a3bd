/*
 * stores.c: a store's chains and what their completions mean.
 *
 *   first   [registry line] [leaf check -> mkdir leaf] create temp -> write
 *           [-> fdatasync (durable)] [-> install as a plain fd] -> close slot
 *   publish close the installed fd (its flush) -> rename RENAME_NOREPLACE
 *   [dirsync (durable): open, fsync, close of the leaf and of the
 *           directories the store made]
 *
 * plus the follow-ups: making missing directories, the plain-rename
 * fallback, cleanups of the temp file, and the cleanup of a lent store.
 */
#define _GNU_SOURCE
#include "blocks.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>

/*
 * A store's first chain: [its leaf's line in the writer registry] [the
 * leaf check] create the temp file -> write -> [install the descriptor as
 * a plain fd] -> close the slot.  Publishing is a chain of its own
 * (store_publish), written once this one came back in time: closing the
 * installed fd runs the filesystem's flush (errors fail the block), and a
 * block past its deadline is never renamed into place.
 */
void kvu_store_begin(struct kvu_core *c, struct block *b)
{
    unsigned slot = slot_of(c, b);
    int ns = ns_of(c, b);
    kvu_new_chain(c, b, ST_MAIN);
    b->st_reg = b->st_check = b->st_install = NO_STEP;
    if (c->cfg.roots[b->root].reg_fd >= 0 && !leaf_known(noted_map(c, b), b->leaf_index)) {
        /* Recorded before the first temp file goes there, so the next open
         * can clean up after a dead writer (offset -1: the file's end). */
        b->st_reg = b->nsteps;
        kvu_push(c, b, IORING_OP_WRITE, L_ | S_, c->cfg.roots[b->root].reg_fd, ptr(b->line), b->line_len,
                 UINT64_MAX, 0, 0, 0, b->line_len);
    }
    if (!leaf_known(ready_map(c, b), b->leaf_index)) {
        /* A leaf not known to exist: check its upper directory is a real one
         * beneath the namespace, then make the leaf (EEXIST is fine, the
         * hard link runs on).  The create refuses symlinks on the whole path. */
        if (b->new_dirs < 1)
            b->new_dirs = 1;
        b->st_check = b->nsteps;
        kvu_push(c, b, IORING_OP_OPENAT2, L_ | S_, ns, ptr(b->upper), 0, 0, 0, ptr(&c->how_dir), slot + 1,
             R_NEGATIVE);
        kvu_push(c, b, IORING_OP_MKDIRAT, H_ | S_, ns, ptr(b->leaf), 0, 0, 0, 0755, 0, R_CANCELLED);
    }
    if (sealed_by_worker(c, b->batch)) {
        /* The thread engine checksums and packs the trailer on the worker
         * that writes the block. */
        kvu_push(c, b, KVU_OP_SEAL, L_ | S_, 0, b->addr, c->cfg.block_size, 0, ptr(trailer_of(c, b)), ptr(b->key),
             b->klen, R_NEGATIVE);
    } else if (c->cfg.verify) {
        kvu_pack_trailer(trailer_of(c, b), b->key, b->klen, c->cfg.block_size, b->psum);
    }
    b->st_create = b->nsteps;
    kvu_push(c, b, IORING_OP_OPENAT2, L_ | S_ | A_, ns, ptr(b->tmp), 0, 0, 0, ptr(&c->how_create[b->root]), slot + 1,
         R_NEGATIVE);
    kvu_push_transfer(c, b, 0, L_ | S_ | F_, 0);
    b->st_sync = NO_STEP;
    if (c->cfg.durable) {
        /* No CQE_SKIP_SUCCESS: a failed fsync does not fail its request
         * (nor break the link), so with it the error would be hidden. */
        b->st_sync = b->nsteps;
        kvu_push(c, b, IORING_OP_FSYNC, L_ | F_, slot, 0, 0, 0, IORING_FSYNC_DATASYNC, 0, 0, R_CANCELLED);
    }
    if (c->cfg.fd_install) {
        /* Hard link: the slot is closed whatever the install did. */
        b->st_install = b->nsteps;
        kvu_push(c, b, KVU_OP_FD_INSTALL, H_ | F_, slot, 0, 0, 0, 0, 0, 0, R_NEGATIVE);
    }
    b->st_close = b->nsteps;
    kvu_push(c, b, IORING_OP_CLOSE, 0, 0, 0, 0, 0, 0, 0, slot + 1, R_NEGATIVE);
}

/* Close the installed fd (its flush may report an error), then rename. */
static void store_publish(struct kvu_core *c, struct block *b)
{
    int ns = ns_of(c, b);
    kvu_new_chain(c, b, ST_PUBLISH);
    if (b->fd >= 0) {
        kvu_push(c, b, IORING_OP_CLOSE, L_ | S_, b->fd, 0, 0, 0, 0, 0, 0, R_NEGATIVE);
        b->fd = -1; /* closed by this chain, whatever comes of it */
    }
    b->sent_noreplace = (uint8_t)c->cfg.noreplace;
    kvu_push(c, b, IORING_OP_RENAMEAT, 0, ns, ptr(b->tmp), 0, 0, c->cfg.noreplace ? RENAME_NOREPLACE : 0,
         (uint64_t)(int64_t)ns, ptr(b->path), R_CANCELLED);
}

static void store_cleanup(struct kvu_core *c, struct block *b, int32_t error, int again, int close)
{
    /* The rename never ran or failed: close the slot if a write failed
     * (harmless when already closed), and an installed fd, and remove the
     * temp file. */
    kvu_new_chain(c, b, ST_CLEANUP);
    b->error = error;
    b->retry_after_cleanup = (uint8_t)again;
    if (close)
        kvu_push(c, b, IORING_OP_CLOSE, H_ | S_, 0, 0, 0, 0, 0, 0, slot_of(c, b) + 1, R_NEGATIVE);
    if (b->fd >= 0) {
        kvu_push(c, b, IORING_OP_CLOSE, H_ | S_, b->fd, 0, 0, 0, 0, 0, 0, R_NEGATIVE);
        b->fd = -1;
    }
    kvu_push(c, b, IORING_OP_UNLINKAT, 0, ns_of(c, b), ptr(b->tmp), 0, 0, 0, 0, 0, R_CANCELLED);
}

/* The last step's result: a cleanup's unlink.  A temp file that could not
 * be removed is counted; the writer then leaves its registry entry behind
 * at close, so the next open removes the file. */
static void note_cleanup(struct kvu_core *c, const struct block *b)
{
    int32_t unlink = b->res[b->nsteps - 1];
    if (unlink < 0 && unlink != -ENOENT && unlink != NONE)
        c->st.cleanup_failed++;
}

static void store_cleanup_or_retry(struct kvu_core *c, struct block *b, int32_t res, int close)
{
    int again = kvu_retry(c, b, res);
    store_cleanup(c, b, again ? 0 : kvu_fail(c, res), again, close);
}

static void store_make_dirs(struct kvu_core *c, struct block *b)
{
    /* First block in this leaf: make both levels (EEXIST is fine: hard
     * links run on), checking the upper one is a real directory before
     * making anything inside it. */
    int ns = ns_of(c, b);
    kvu_new_chain(c, b, ST_MKDIR);
    b->made_dirs = 1;
    b->new_dirs = 2;
    kvu_push(c, b, IORING_OP_MKDIRAT, H_ | S_, ns, ptr(b->upper), 0, 0, 0, 0755, 0, R_CANCELLED);
    kvu_push(c, b, IORING_OP_OPENAT2, L_ | S_, ns, ptr(b->upper), 0, 0, 0, ptr(&c->how_dir), slot_of(c, b) + 1,
         R_NEGATIVE);
    kvu_push(c, b, IORING_OP_MKDIRAT, 0, ns, ptr(b->leaf), 0, 0, 0, 0755, 0, R_CANCELLED);
}

/* One directory's fsync in a ST_DIRSYNC chain: open it into the slot, sync, close. */
static void push_dir_sync(struct kvu_core *c, struct block *b, const char *dir, int last)
{
    unsigned slot = slot_of(c, b);
    kvu_push(c, b, IORING_OP_OPENAT2, L_ | S_, ns_of(c, b), ptr(dir), 0, 0, 0, ptr(&c->how_sync), slot + 1,
         R_NEGATIVE);
    kvu_push(c, b, IORING_OP_FSYNC, H_ | F_, slot, 0, 0, 0, 0, 0, 0, R_CANCELLED);
    kvu_push(c, b, IORING_OP_CLOSE, last ? 0 : H_ | S_, 0, 0, 0, 0, 0, 0, slot + 1, R_NEGATIVE);
    c->st.syncs++;
}

/*
 * A durable store's rename is done: sync the leaf, which holds the new
 * name, and the directories above it that this store may have made (a
 * directory's entry is durable once its parent is synced).
 */
static void store_sync_dirs(struct kvu_core *c, struct block *b)
{
    kvu_new_chain(c, b, ST_DIRSYNC);
    push_dir_sync(c, b, b->leaf, !b->new_dirs);
    if (b->new_dirs)
        push_dir_sync(c, b, b->upper, b->new_dirs < 2);
    if (b->new_dirs >= 2)
        push_dir_sync(c, b, ".", 1);
}

static void store_synced(struct kvu_core *c, struct block *b)
{
    unsigned i;
    for (i = 0; i < b->nsteps; i++) {
        int32_t r = b->res[i];
        if (r != NONE && r < 0) {
            /* A directory could not be opened or synced: the block is in
             * place, but may not survive a power cut, which is what the
             * caller asked for. */
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, r));
            return;
        }
    }
    kvu_finish(c, b, KVU_STORED, 0);
}

static void store_after_rename(struct kvu_core *c, struct block *b, int32_t res)
{
    if (res == 0 && c->cfg.durable) {
        store_sync_dirs(c, b);
    } else if (res == 0) {
        kvu_finish(c, b, KVU_STORED, 0);
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
        kvu_new_chain(c, b, ST_RENAME);
        b->sent_noreplace = 0;
        kvu_push(c, b, IORING_OP_RENAMEAT, 0, ns_of(c, b), ptr(b->tmp), 0, 0, 0,
             (uint64_t)(int64_t)ns_of(c, b), ptr(b->path), R_CANCELLED);
    } else {
        store_cleanup_or_retry(c, b, res, 0);
    }
}

static int32_t step_res(const struct block *b, uint8_t step)
{
    return step == NO_STEP ? NONE : b->res[step];
}

/* The first chain came back: what failed, or publish. */
static void store_main_end(struct kvu_core *c, struct block *b)
{
    int32_t reg = step_res(b, b->st_reg), check = step_res(b, b->st_check);
    int32_t create = b->res[b->st_create], install, closed, bad;
    if (reg != NONE) {
        /* Posted, so it failed (a full disk, say): nothing was created. */
        reg = reg < 0 ? reg : -ENOSPC;
        if (kvu_retry(c, b, reg))
            kvu_store_begin(c, b);
        else
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, reg));
        return;
    }
    if (check != NONE && check < 0) {
        /* The upper-directory check failed: missing (make it, checked) or
         * not a real directory (never write through it). */
        if (check == -ENOENT && !b->made_dirs)
            store_make_dirs(c, b);
        else if (kvu_retry(c, b, check))
            kvu_store_begin(c, b);
        else
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, check));
        return;
    }
    if (create != NONE && create < 0) {
        if (create == -ENOENT && !b->made_dirs)
            store_make_dirs(c, b);
        else if (kvu_retry(c, b, create))
            kvu_store_begin(c, b);
        else
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, create));
        return;
    }
    leaf_mark(ready_map(c, b), b->leaf_index);
    if (b->st_reg != NO_STEP)
        leaf_mark(noted_map(c, b), b->leaf_index);
    bad = kvu_transfer_failure(b, b->res + b->st_create + 1);
    if (bad < 0) {
        store_cleanup_or_retry(c, b, bad, 1);
        return;
    }
    if (bad) {
        /* A short write: the filesystem ran out of room part way. */
        store_cleanup(c, b, kvu_fail(c, -ENOSPC), 0, 1);
        return;
    }
    install = step_res(b, b->st_install);
    if (install >= 0 && b->st_install != NO_STEP)
        b->fd = install;
    closed = b->res[b->st_close];
    if (b->st_sync != NO_STEP && b->res[b->st_sync] < 0 && b->res[b->st_sync] != NONE) {
        /* The data did not reach stable storage: never publish it. */
        store_cleanup_or_retry(c, b, b->res[b->st_sync], 0);
        return;
    }
    if (install < 0 && install != NONE) {
        store_cleanup_or_retry(c, b, install, 0);
        return;
    }
    if (closed < 0 && closed != NONE) {
        /* The thread engine's slot is a plain fd: its close flushed. */
        c->st.close_errors++;
        store_cleanup_or_retry(c, b, closed, 0);
        return;
    }
    store_publish(c, b);
}

void kvu_store_end(struct kvu_core *c, struct block *b)
{
    switch (b->stage) {
    case ST_CLEANUP:
        note_cleanup(c, b);
        if (b->retry_after_cleanup) {
            b->retry_after_cleanup = 0;
            kvu_store_begin(c, b);
        } else if (b->exists) {
            kvu_finish(c, b, KVU_EXISTS, 0);
        } else {
            kvu_finish(c, b, KVU_FAILED, b->error);
        }
        return;
    case ST_PUBLISH:
        if (b->nsteps == 2 && b->res[0] != NONE) {
            /* The close failed (flush: a write-back error); the rename did
             * not run. */
            c->st.close_errors++;
            store_cleanup_or_retry(c, b, b->res[0], 0);
            return;
        }
        __attribute__((fallthrough)); /* to the rename's result */
    case ST_RENAME: {
        int32_t res = b->res[b->nsteps - 1];
        store_after_rename(c, b, res == NONE ? -ECANCELED : res);
        return;
    }
    case ST_DIRSYNC:
        store_synced(c, b);
        return;
    case ST_MKDIR: {
        int32_t check = b->res[1], leaf = b->res[2];
        if (check != NONE && check < 0 && kvu_retry(c, b, check))
            kvu_store_begin(c, b);
        else if (check != NONE && check < 0)
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, check));
        else if (leaf != NONE && leaf < 0 && leaf != -EEXIST)
            kvu_finish(c, b, KVU_FAILED, kvu_fail(c, leaf));
        else
            kvu_store_begin(c, b);
        return;
    }
    default:
        store_main_end(c, b);
        return;
    }
}

/*
 * A lent block's chain came back (its caller was told FAILED long ago).  A
 * store may have left a temp file, an installed fd or its slot open: one
 * cleanup chain, whatever stage it was at (if its rename went through, the
 * block stays: its bytes were written before the deadline).  Then the slot
 * is free.
 */
void kvu_end_lent_chain(struct kvu_core *c, struct block *b)
{
    if (b->batch->kind == KVU_STORE && b->stage != ST_LENT) {
        kvu_new_chain(c, b, ST_LENT);
        kvu_push(c, b, IORING_OP_CLOSE, H_ | S_, 0, 0, 0, 0, 0, 0, slot_of(c, b) + 1, R_NEGATIVE);
        if (b->fd >= 0) {
            kvu_push(c, b, IORING_OP_CLOSE, H_ | S_, b->fd, 0, 0, 0, 0, 0, 0, R_NEGATIVE);
            b->fd = -1;
        }
        kvu_push(c, b, IORING_OP_UNLINKAT, 0, ns_of(c, b), ptr(b->tmp), 0, 0, 0, 0, 0, R_CANCELLED);
        return;
    }
    if (b->stage == ST_LENT)
        note_cleanup(c, b);
    kvu_end_lent(c, b);
}
