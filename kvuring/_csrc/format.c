/*
 * The on-disk format in C: block paths from keys, the trailer page, and
 * payload checksums.  kvuring/_format.py is the reference and documents the
 * layout; tests check that both write and accept the same bytes.
 *
 * The checksum is xxh3-64 (seed 0) from the system's libxxhash, the same
 * function Python's xxhash computes.
 */
#define _GNU_SOURCE
#include "kvu.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <xxhash.h>
#if defined(__x86_64__) || defined(__i386__)
/* libxxhash picks the widest vector unit at run time (SSE2, AVX2,
 * AVX-512): 3x faster here than the baseline build for 64 KiB. */
#define XXH_DISPATCH_DISABLE_REPLACE
#include <xxh_x86dispatch.h>
#define payload_hash XXH3_64bits_dispatch
#else
#define payload_hash XXH3_64bits
#endif

/* Trailer field offsets: "<4sHHIQH6x64sQ" then the head's own checksum. */
#define T_MAGIC 0
#define T_VERSION 4
#define T_SIZE 6
#define T_ALGO 8
#define T_PLEN 12
#define T_KLEN 20
#define T_KEY 28
#define T_PSUM 92
#define T_HEAD 100
#define T_USED 108

#define KVU_VERSION 1
#define KVU_ALGO_XXH3_64 1

uint64_t kvu_checksum(const void *p, size_t n)
{
    return payload_hash(p, n);
}

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, sizeof v); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, sizeof v); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, sizeof v); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, sizeof v); return v; }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, sizeof v); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, sizeof v); return v; }

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the trailer is little-endian; kvuring's C format code assumes a little-endian host"
#endif

void kvu_pack_trailer(uint8_t *page, const uint8_t *key, unsigned klen, uint64_t plen, uint64_t psum)
{
    memset(page, 0, KVU_TRAILER_SIZE);
    memcpy(page + T_MAGIC, "KVUB", 4);
    put16(page + T_VERSION, KVU_VERSION);
    put16(page + T_SIZE, KVU_TRAILER_SIZE);
    put32(page + T_ALGO, KVU_ALGO_XXH3_64);
    put64(page + T_PLEN, plen);
    put16(page + T_KLEN, (uint16_t)klen);
    memcpy(page + T_KEY, key, klen);
    put64(page + T_PSUM, psum);
    put64(page + T_HEAD, XXH3_64bits(page, T_HEAD));
}

static int all_zero(const uint8_t *p, size_t n)
{
    /* The padding is 3988 bytes: compare in words, the tail bytewise. */
    size_t i = 0;
    uint64_t acc = 0;
    for (; i + 8 <= n; i += 8)
        acc |= get64(p + i);
    for (; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

int kvu_check_trailer(const uint8_t *page, const uint8_t *key, unsigned klen, uint64_t plen,
                      uint64_t *psum)
{
    if (memcmp(page + T_MAGIC, "KVUB", 4) != 0)
        return KVU_BAD_MAGIC;
    if (get64(page + T_HEAD) != XXH3_64bits(page, T_HEAD))
        return KVU_BAD_TRAILER_SUM;
    if (!all_zero(page + T_USED, KVU_TRAILER_SIZE - T_USED))
        return KVU_BAD_PADDING;
    if (get16(page + T_VERSION) != KVU_VERSION || get16(page + T_SIZE) != KVU_TRAILER_SIZE ||
        get32(page + T_ALGO) != KVU_ALGO_XXH3_64)
        return KVU_BAD_VERSION;
    if (get64(page + T_PLEN) != plen)
        return KVU_BAD_LENGTH;
    if (get16(page + T_KLEN) != klen || memcmp(page + T_KEY, key, klen) != 0)
        return KVU_BAD_KEY;
    *psum = get64(page + T_PSUM);
    return KVU_OK;
}

static const char HEX[] = "0123456789abcdef";

/*
 * "<hex[0:3]>/<hex[3:5]>" into leaf (8 bytes) and "<leaf>/<hex><suffix>"
 * into path (KVU_PATH_MAX); keys shorter than 3 bytes pad the fan-out with
 * '0'.  Returns the path's length.
 */
unsigned kvu_block_path(const uint8_t *key, unsigned klen, const char *suffix, char *leaf, char *path)
{
    char fan[5];
    unsigned i, n;
    for (i = 0; i < 5; i++) {
        unsigned nib = i / 2 < klen ? (i % 2 ? key[i / 2] & 15 : key[i / 2] >> 4) : 0;
        fan[i] = i / 2 < klen ? HEX[nib] : '0';
    }
    memcpy(leaf, fan, 3);
    leaf[3] = '/';
    memcpy(leaf + 4, fan + 3, 2);
    leaf[6] = 0;
    memcpy(path, leaf, 6);
    path[6] = '/';
    n = 7;
    for (i = 0; i < klen; i++) {
        path[n++] = HEX[key[i] >> 4];
        path[n++] = HEX[key[i] & 15];
    }
    for (i = 0; suffix[i]; i++)
        path[n++] = suffix[i];
    path[n] = 0;
    return n;
}

/*
 * vLLM's FileMapper layout: the key is a block hash followed by its group
 * index (4 bytes, big-endian); the leaf is "<h[0:3]>/<h[3:5]>_g<group>"
 * (leaf: KVU_LEAF_MAX bytes) and the file "<leaf>/<h>.bin", h being the
 * hash alone in hex.  Returns the path's length, or -EINVAL for a key too
 * short to hold a hash and a group.
 */
int kvu_block_path_vllm(const uint8_t *key, unsigned klen, char *leaf, char *path)
{
    unsigned hlen, i, n;
    uint32_t group;
    if (klen < 5 || klen > KVU_MAX_KEY)
        return -EINVAL;
    hlen = klen - 4;
    group = (uint32_t)key[hlen] << 24 | (uint32_t)key[hlen + 1] << 16 | (uint32_t)key[hlen + 2] << 8 |
            key[hlen + 3];
    /* The hash's first 5 hex digits, padded with '0' for a 1- or 2-byte hash. */
    for (i = 0; i < 5; i++) {
        unsigned nib = i / 2 < hlen ? (i % 2 ? key[i / 2] & 15 : key[i / 2] >> 4) : 0;
        path[i] = HEX[nib];
    }
    memcpy(leaf, path, 3);
    leaf[3] = '/';
    memcpy(leaf + 4, path + 3, 2);
    n = 6 + (unsigned)snprintf(leaf + 6, KVU_LEAF_MAX - 6, "_g%u", (unsigned)group);
    memcpy(path, leaf, n);
    path[n++] = '/';
    for (i = 0; i < hlen; i++) {
        path[n++] = HEX[key[i] >> 4];
        path[n++] = HEX[key[i] & 15];
    }
    memcpy(path + n, ".bin", 5);
    return (int)(n + 4);
}

/*
 * Checksums of many blocks in one call, for Python's hash threads (cffi
 * releases the GIL for the call, so several run in parallel): blocks
 * first, first + step, ... below n.
 */
void kvu_checksum_many(const uint64_t *addrs, unsigned n, unsigned first, unsigned step, uint64_t len,
                       uint64_t *out)
{
    unsigned i;
    for (i = first; i < n; i += step)
        out[i] = payload_hash((const void *)(uintptr_t)addrs[i], (size_t)len);
}

/*
 * The payload check that a load of a big block left for later: for every
 * block whose status is KVU_UNVERIFIED (first, first + step, ...), HIT if
 * its checksum matches the trailer's, else CORRUPT.  Returns the number of
 * CORRUPT blocks found.
 */
unsigned kvu_verify_many(const uint64_t *addrs, unsigned n, unsigned first, unsigned step, uint64_t len,
                         const uint64_t *want, int32_t *status, int32_t *error)
{
    unsigned i, bad = 0;
    for (i = first; i < n; i += step) {
        if (status[i] != KVU_UNVERIFIED)
            continue;
        if (payload_hash((const void *)(uintptr_t)addrs[i], (size_t)len) == want[i]) {
            status[i] = KVU_HIT;
        } else {
            status[i] = KVU_CORRUPT;
            error[i] = KVU_BAD_PAYLOAD_SUM;
            bad++;
        }
    }
    return bad;
}
