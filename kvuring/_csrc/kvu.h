/*
 * kvu.h: the contract between kvuring's C core and its cffi binding.
 *
 * Everything Python calls is declared here and, in the same form, in the
 * cdef in build_uring.py.  The .c files beside this header each hold one
 * idea: ops.c (operation words -> SQEs, CQEs -> arrays), chain.c (the same
 * words run with plain syscalls, for the thread engine).
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
#define KVU_OP_WORDS 10

/* ops.c */
int kvu_prep_ops(struct io_uring *ring, const uint64_t *ops, unsigned n);
unsigned kvu_reap(struct io_uring *ring, uint64_t *user_data, int32_t *res, unsigned max);
int kvu_register_buffer(struct io_uring *ring, unsigned index, uint64_t addr, uint64_t len);

/* chain.c */
int kvu_statx(int dfd, const char *path, int flags, unsigned mask, struct statx *buf);
unsigned kvu_run_chain(const uint64_t *ops, unsigned n, int *files, unsigned nfiles,
                       uint64_t *user_data, int32_t *res);

#endif
