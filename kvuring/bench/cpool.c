/*
 * cpool: the C thread-pool baseline of `kvuring bench`.
 *
 * A pool of POSIX threads doing, per block, the system calls that vLLM
 * 0.33's filesystem tier does in its C extension (one file per block,
 * written to a temporary name and renamed into place):
 *
 *   store: access(final, F_OK)             skip the block if it exists
 *          stat(parent)                    mkdir of each missing level
 *          open(tmp, O_CREAT|O_EXCL|O_WRONLY|O_TRUNC|O_DIRECT, 0644)
 *          write(fd, block, size)          one call; short = failure
 *          close(fd)
 *          rename(tmp, final)              unlink(tmp) on any failure
 *   load:  open(final, O_RDONLY|O_DIRECT)
 *          read(fd, block, size)           one call; short = failure
 *          close(fd)                       unlink(final) after a short read
 *
 * O_DIRECT is probed once per run with a one-page write in the directory
 * (as the tier does) and left out where the filesystem refuses it.  The
 * temporary name is the final one plus a random suffix per thread.
 *
 * The benchmark (kvuring/bench/cpool.py) compiles this file on first use
 * and runs it once per timed phase; keys come on stdin, 16 bytes each, and
 * files go where the bench's other implementations put theirs:
 * DIR/<hex[0:3]>/<hex[3:5]>/<hex>.bin.  Blocks are queued on a shared
 * queue that every thread takes from (queued loads before queued stores,
 * as the tier's load-priority threads do); block i moves from or into
 * buffer slot i % SLOTS of one page-aligned region, written before any
 * timing.
 *
 * Usage:
 *   cpool store   DIR BLOCK_SIZE THREADS SLOTS NWARM NKEYS
 *   cpool load    DIR BLOCK_SIZE THREADS SLOTS NWARM NKEYS
 *   cpool latency DIR BLOCK_SIZE THREADS SLOTS 0 NPREFIX REQUESTS BG_BATCH
 *
 * store: stores and loads the NWARM warm-up keys untimed, then stores the
 * NKEYS keys, timed.  load: loads the warm-up keys untimed, then loads the
 * NKEYS keys, timed.  Each prints one line:
 *   phase=store blocks=N errors=E seconds=S cpu_s=C o_direct=1 threads=T
 * seconds is the wall time from queueing the first block to the last
 * block's completion; cpu_s is getrusage(RUSAGE_SELF) user+system over the
 * same span (every thread of the process).
 *
 * latency: stores the NPREFIX keys, then loads them REQUESTS times back to
 * back while a feeder thread keeps BG_BATCH stores of fresh keys queued on
 * the same pool; prints the seconds of each request:
 *   phase=latency requests=R errors=E bg_blocks=B o_direct=1 seconds=s1,s2,...
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KEY_BYTES 16
#define PATH_BYTES 4096
#define PAGE 4096

enum op { OP_STORE, OP_LOAD };

/* One batch of blocks the caller waits for as a whole. */
struct job {
    atomic_size_t remaining;
    atomic_size_t errors;
    pthread_mutex_t lock;
    pthread_cond_t done_cv;
    int done;
};

struct item {
    enum op op;
    const char *path;
    char *buf;
    struct job *job;
};

/* A fixed-capacity ring of items. */
struct queue {
    struct item *items;
    size_t cap;
    size_t head;
    size_t count;
};

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t work_cv;
    struct queue loads;
    struct queue stores;
    int stop;
    pthread_t *threads;
    size_t nthreads;
    size_t block_size;
    int o_direct;
};

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        die("getrusage");
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static uint64_t random_u64(void)
{
    uint64_t value;
    if (getrandom(&value, sizeof value, 0) != (ssize_t)sizeof value)
        value = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    return value;
}

/* ---- per-block I/O: the tier's system calls ---------------------------- */

/* The temporary file's suffix, one per thread (random, as the tier's). */
static _Thread_local char tmp_suffix[32];

static int make_dirs(char *dir)
{
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        int rc = mkdir(dir, 0755);
        *p = '/';
        if (rc != 0 && errno != EEXIST)
            return errno;
    }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return errno;
    return 0;
}

/* The parent directory of `path`: a stat when it is there, mkdirs if not. */
static int ensure_parent(const char *path)
{
    char dir[PATH_BYTES];
    const char *slash = strrchr(path, '/');
    if (slash == NULL || slash == path)
        return 0;
    size_t len = (size_t)(slash - path);
    if (len >= sizeof dir)
        return ENAMETOOLONG;
    memcpy(dir, path, len);
    dir[len] = '\0';
    struct stat st;
    if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode))
        return 0;
    return make_dirs(dir);
}

static int store_block(const struct pool *pool, const char *path, const char *buf)
{
    if (access(path, F_OK) == 0)
        return 0; /* already stored */
    int err = ensure_parent(path);
    if (err != 0)
        return err;
    char tmp[PATH_BYTES];
    int n = snprintf(tmp, sizeof tmp, "%s%s", path, tmp_suffix);
    if (n < 0 || (size_t)n >= sizeof tmp)
        return ENAMETOOLONG;
    int flags = O_CREAT | O_EXCL | O_WRONLY | O_TRUNC | (pool->o_direct ? O_DIRECT : 0);
    int fd = open(tmp, flags, 0644);
    if (fd < 0)
        return errno;
    ssize_t written = write(fd, buf, pool->block_size);
    if (written < 0 || (size_t)written != pool->block_size) {
        err = written < 0 ? errno : EIO;
        close(fd);
        unlink(tmp);
        return err;
    }
    if (close(fd) != 0) {
        err = errno;
        unlink(tmp);
        return err;
    }
    if (rename(tmp, path) != 0) {
        err = errno;
        unlink(tmp);
        return err;
    }
    return 0;
}

static int load_block(const struct pool *pool, const char *path, char *buf)
{
    int fd = open(path, O_RDONLY | (pool->o_direct ? O_DIRECT : 0));
    if (fd < 0)
        return errno;
    ssize_t got = read(fd, buf, pool->block_size);
    int err = got < 0 ? errno : 0;
    close(fd);
    if (got >= 0 && (size_t)got != pool->block_size) {
        unlink(path); /* a short file is a damaged one: the tier removes it */
        err = EIO;
    }
    return err;
}

/* Whether O_DIRECT works in `dir`: one aligned page written with it. */
static int probe_o_direct(const char *dir, const char *page)
{
    char path[PATH_BYTES];
    int n = snprintf(path, sizeof path, "%s/.o_direct_probe_%ld", dir, (long)getpid());
    if (n < 0 || (size_t)n >= sizeof path)
        return 0;
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC | O_DIRECT, 0644);
    if (fd < 0)
        return 0;
    int ok = write(fd, page, PAGE) == PAGE;
    close(fd);
    unlink(path);
    return ok;
}

/* ---- the pool ---------------------------------------------------------- */

static void queue_init(struct queue *q, size_t cap)
{
    q->items = calloc(cap, sizeof *q->items);
    if (q->items == NULL)
        die("calloc");
    q->cap = cap;
    q->head = 0;
    q->count = 0;
}

static struct item queue_pop(struct queue *q)
{
    struct item it = q->items[q->head];
    q->head = (q->head + 1) % q->cap;
    q->count--;
    return it;
}

static void job_init(struct job *job, size_t blocks)
{
    atomic_init(&job->remaining, blocks);
    atomic_init(&job->errors, 0);
    if (pthread_mutex_init(&job->lock, NULL) != 0 || pthread_cond_init(&job->done_cv, NULL) != 0)
        die("pthread_mutex_init");
    job->done = blocks == 0;
}

static void job_finish_block(struct job *job, int err)
{
    if (err != 0)
        atomic_fetch_add(&job->errors, 1);
    if (atomic_fetch_sub(&job->remaining, 1) == 1) {
        pthread_mutex_lock(&job->lock);
        job->done = 1;
        pthread_cond_signal(&job->done_cv);
        pthread_mutex_unlock(&job->lock);
    }
}

static size_t job_wait(struct job *job)
{
    pthread_mutex_lock(&job->lock);
    while (!job->done)
        pthread_cond_wait(&job->done_cv, &job->lock);
    pthread_mutex_unlock(&job->lock);
    size_t errors = atomic_load(&job->errors);
    pthread_cond_destroy(&job->done_cv);
    pthread_mutex_destroy(&job->lock);
    return errors;
}

static void *worker(void *arg)
{
    struct pool *pool = arg;
    snprintf(tmp_suffix, sizeof tmp_suffix, "_%llu.tmp",
             (unsigned long long)(random_u64() & INT64_MAX));
    for (;;) {
        pthread_mutex_lock(&pool->lock);
        while (!pool->stop && pool->loads.count == 0 && pool->stores.count == 0)
            pthread_cond_wait(&pool->work_cv, &pool->lock);
        if (pool->stop) {
            pthread_mutex_unlock(&pool->lock);
            return NULL;
        }
        struct item it = pool->loads.count ? queue_pop(&pool->loads) : queue_pop(&pool->stores);
        pthread_mutex_unlock(&pool->lock);
        int err = it.op == OP_LOAD ? load_block(pool, it.path, it.buf)
                                   : store_block(pool, it.path, it.buf);
        job_finish_block(it.job, err);
    }
}

static void pool_start(struct pool *pool, size_t nthreads, size_t queue_cap)
{
    if (pthread_mutex_init(&pool->lock, NULL) != 0 || pthread_cond_init(&pool->work_cv, NULL) != 0)
        die("pthread_mutex_init");
    queue_init(&pool->loads, queue_cap);
    queue_init(&pool->stores, queue_cap);
    pool->stop = 0;
    pool->nthreads = nthreads;
    pool->threads = calloc(nthreads, sizeof *pool->threads);
    if (pool->threads == NULL)
        die("calloc");
    for (size_t i = 0; i < nthreads; i++) {
        int rc = pthread_create(&pool->threads[i], NULL, worker, pool);
        if (rc != 0) {
            errno = rc;
            die("pthread_create");
        }
    }
}

static void pool_stop(struct pool *pool)
{
    pthread_mutex_lock(&pool->lock);
    pool->stop = 1;
    pthread_cond_broadcast(&pool->work_cv);
    pthread_mutex_unlock(&pool->lock);
    for (size_t i = 0; i < pool->nthreads; i++)
        pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    free(pool->loads.items);
    free(pool->stores.items);
}

/* Queue one block per path (block i in buffer slot slot0 + i % slots). */
static void pool_submit(struct pool *pool, struct job *job, enum op op, char *const *paths,
                        size_t n, char *region, size_t slot0, size_t slots)
{
    struct queue *q = op == OP_LOAD ? &pool->loads : &pool->stores;
    pthread_mutex_lock(&pool->lock);
    if (q->count + n > q->cap) {
        fprintf(stderr, "cpool: queue overflow\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++) {
        struct item *slot = &q->items[(q->head + q->count) % q->cap];
        slot->op = op;
        slot->path = paths[i];
        slot->buf = region + (slot0 + i % slots) * pool->block_size;
        slot->job = job;
        q->count++;
    }
    pthread_cond_broadcast(&pool->work_cv);
    pthread_mutex_unlock(&pool->lock);
}

/* Move every block of `paths` once; returns the failures. */
static size_t run_job(struct pool *pool, enum op op, char *const *paths, size_t n, char *region,
                      size_t slot0, size_t slots)
{
    struct job job;
    job_init(&job, n);
    pool_submit(pool, &job, op, paths, n, region, slot0, slots);
    return job_wait(&job);
}

/* ---- keys and paths ---------------------------------------------------- */

static char *key_path(const char *dir, const unsigned char *key)
{
    static const char digits[] = "0123456789abcdef";
    char hex[KEY_BYTES * 2 + 1];
    for (size_t i = 0; i < KEY_BYTES; i++) {
        hex[2 * i] = digits[key[i] >> 4];
        hex[2 * i + 1] = digits[key[i] & 15];
    }
    hex[KEY_BYTES * 2] = '\0';
    char *path = malloc(PATH_BYTES);
    if (path == NULL)
        die("malloc");
    int n = snprintf(path, PATH_BYTES, "%s/%.3s/%.2s/%s.bin", dir, hex, hex + 3, hex);
    if (n < 0 || n >= PATH_BYTES) {
        fprintf(stderr, "cpool: path too long\n");
        exit(1);
    }
    return path;
}

static char **read_key_paths(const char *dir, size_t count)
{
    char **paths = calloc(count ? count : 1, sizeof *paths);
    if (paths == NULL)
        die("calloc");
    for (size_t i = 0; i < count; i++) {
        unsigned char key[KEY_BYTES];
        if (fread(key, 1, KEY_BYTES, stdin) != KEY_BYTES) {
            fprintf(stderr, "cpool: expected %zu keys of %d bytes on stdin\n", count, KEY_BYTES);
            exit(1);
        }
        paths[i] = key_path(dir, key);
    }
    return paths;
}

static void free_paths(char **paths, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(paths[i]);
    free(paths);
}

/* splitmix64: keys for the latency test's background stream. */
static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* ---- the modes --------------------------------------------------------- */

struct config {
    const char *mode;
    const char *dir;
    size_t block_size;
    size_t threads;
    size_t slots;
    size_t nwarm;
    size_t nkeys;
    size_t requests;
    size_t bg_batch;
};

static size_t parse_size(const char *text, const char *name)
{
    char *end = NULL;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || text[0] == '-') {
        fprintf(stderr, "cpool: %s must be a non-negative integer, not '%s'\n", name, text);
        exit(2);
    }
    return (size_t)value;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: cpool store|load DIR BLOCK_SIZE THREADS SLOTS NWARM NKEYS\n"
            "       cpool latency DIR BLOCK_SIZE THREADS SLOTS 0 NPREFIX REQUESTS BG_BATCH\n"
            "(keys on stdin, 16 bytes each: the NWARM warm-up keys, then the others)\n");
    exit(2);
}

static void print_phase(const char *phase, size_t blocks, size_t errors, double seconds,
                        double cpu, const struct pool *pool)
{
    printf("phase=%s blocks=%zu errors=%zu seconds=%.9f cpu_s=%.6f o_direct=%d threads=%zu\n",
           phase, blocks, errors, seconds, cpu, pool->o_direct, pool->nthreads);
}

static void run_throughput(const struct config *cfg, struct pool *pool, char *region)
{
    enum op op = strcmp(cfg->mode, "store") == 0 ? OP_STORE : OP_LOAD;
    char **warm = read_key_paths(cfg->dir, cfg->nwarm);
    char **keys = read_key_paths(cfg->dir, cfg->nkeys);
    /* Untimed: the first files of a fresh directory tree, as the others do. */
    if (op == OP_STORE)
        run_job(pool, OP_STORE, warm, cfg->nwarm, region, 0, cfg->slots);
    run_job(pool, OP_LOAD, warm, cfg->nwarm, region, 0, cfg->slots);

    double c0 = cpu_seconds();
    double t0 = now_seconds();
    size_t errors = run_job(pool, op, keys, cfg->nkeys, region, 0, cfg->slots);
    double seconds = now_seconds() - t0;
    double cpu = cpu_seconds() - c0;
    print_phase(cfg->mode, cfg->nkeys, errors, seconds, cpu, pool);
    free_paths(warm, cfg->nwarm);
    free_paths(keys, cfg->nkeys);
}

struct feeder {
    const struct config *cfg;
    struct pool *pool;
    char *region;
    atomic_int stop;
    atomic_int started;
    size_t blocks;
};

/* The background stream: bg_batch stores of fresh keys, one batch after another. */
static void *feed(void *arg)
{
    struct feeder *f = arg;
    const struct config *cfg = f->cfg;
    char **paths = calloc(cfg->bg_batch, sizeof *paths);
    if (paths == NULL)
        die("calloc");
    uint64_t seed = random_u64();
    uint64_t counter = 0;
    while (!atomic_load(&f->stop)) {
        for (size_t i = 0; i < cfg->bg_batch; i++) {
            uint64_t words[2] = {mix64(seed + 2 * counter), mix64(seed + 2 * counter + 1)};
            counter++;
            free(paths[i]);
            paths[i] = key_path(cfg->dir, (const unsigned char *)words);
        }
        struct job job;
        job_init(&job, cfg->bg_batch);
        pool_submit(f->pool, &job, OP_STORE, paths, cfg->bg_batch, f->region, cfg->nkeys,
                    cfg->bg_batch);
        atomic_store(&f->started, 1);
        job_wait(&job);
        f->blocks += cfg->bg_batch;
    }
    free_paths(paths, cfg->bg_batch);
    return NULL;
}

static void run_latency(const struct config *cfg, struct pool *pool, char *region)
{
    char **prefix = read_key_paths(cfg->dir, cfg->nkeys);
    size_t errors = run_job(pool, OP_STORE, prefix, cfg->nkeys, region, 0, cfg->nkeys);
    double *seconds = calloc(cfg->requests ? cfg->requests : 1, sizeof *seconds);
    if (seconds == NULL)
        die("calloc");

    struct feeder f = {.cfg = cfg, .pool = pool, .region = region, .blocks = 0};
    atomic_init(&f.stop, 0);
    atomic_init(&f.started, 0);
    pthread_t feeder;
    int rc = pthread_create(&feeder, NULL, feed, &f);
    if (rc != 0) {
        errno = rc;
        die("pthread_create");
    }
    while (!atomic_load(&f.started))
        sched_yield();
    for (size_t r = 0; r < cfg->requests; r++) {
        double t0 = now_seconds();
        errors += run_job(pool, OP_LOAD, prefix, cfg->nkeys, region, 0, cfg->nkeys);
        seconds[r] = now_seconds() - t0;
    }
    atomic_store(&f.stop, 1);
    pthread_join(feeder, NULL);

    printf("phase=latency requests=%zu errors=%zu bg_blocks=%zu o_direct=%d seconds=",
           cfg->requests, errors, f.blocks, pool->o_direct);
    for (size_t r = 0; r < cfg->requests; r++)
        printf("%s%.9f", r ? "," : "", seconds[r]);
    printf("\n");
    free(seconds);
    free_paths(prefix, cfg->nkeys);
}

int main(int argc, char **argv)
{
    if (argc < 8)
        usage();
    struct config cfg = {
        .mode = argv[1],
        .dir = argv[2],
        .block_size = parse_size(argv[3], "BLOCK_SIZE"),
        .threads = parse_size(argv[4], "THREADS"),
        .slots = parse_size(argv[5], "SLOTS"),
        .nwarm = parse_size(argv[6], "NWARM"),
        .nkeys = parse_size(argv[7], "NKEYS"),
    };
    int latency = strcmp(cfg.mode, "latency") == 0;
    if (latency) {
        if (argc != 10)
            usage();
        cfg.requests = parse_size(argv[8], "REQUESTS");
        cfg.bg_batch = parse_size(argv[9], "BG_BATCH");
        if (cfg.nkeys == 0 || cfg.bg_batch == 0 || cfg.slots < cfg.nkeys + cfg.bg_batch) {
            fprintf(stderr, "cpool: latency needs NPREFIX, BG_BATCH > 0 and "
                            "SLOTS >= NPREFIX + BG_BATCH\n");
            return 2;
        }
    } else if (argc != 8 || (strcmp(cfg.mode, "store") != 0 && strcmp(cfg.mode, "load") != 0)) {
        usage();
    }
    if (cfg.block_size == 0 || cfg.block_size % PAGE != 0 || cfg.threads == 0 || cfg.slots == 0) {
        fprintf(stderr, "cpool: BLOCK_SIZE must be a multiple of %d, THREADS and SLOTS > 0\n",
                PAGE);
        return 2;
    }

    /* Every buffer written before any timing: pages fault in on first touch. */
    char *region = NULL;
    int rc = posix_memalign((void **)&region, PAGE, cfg.slots * cfg.block_size);
    if (rc != 0) {
        errno = rc;
        die("posix_memalign");
    }
    uint64_t state = random_u64() | 1;
    for (size_t i = 0; i < cfg.block_size; i += sizeof state) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        memcpy(region + i, &state, sizeof state);
    }
    for (size_t s = 1; s < cfg.slots; s++)
        memcpy(region + s * cfg.block_size, region, cfg.block_size);

    struct pool pool = {.block_size = cfg.block_size, .o_direct = probe_o_direct(cfg.dir, region)};
    size_t most = cfg.nwarm > cfg.nkeys ? cfg.nwarm : cfg.nkeys;
    pool_start(&pool, cfg.threads, most + cfg.bg_batch + 1);
    if (latency)
        run_latency(&cfg, &pool, region);
    else
        run_throughput(&cfg, &pool, region);
    pool_stop(&pool);
    free(region);
    return fflush(stdout) == 0 ? 0 : 1;
}
