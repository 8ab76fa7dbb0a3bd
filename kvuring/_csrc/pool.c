/*
 * The thread engine: a pool of POSIX threads that run linked chains of
 * operation words with plain syscalls (chain.c), for where io_uring is
 * refused.  Completions queue here and wake the caller through an eventfd,
 * exactly as a ring's do, so everything above cannot tell the engines apart.
 *
 * No Python runs on these threads: a chain goes from the submit call to a
 * worker and back as completions without the GIL.
 */
#define _GNU_SOURCE
#include "kvu.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct kvu_chain {
    struct kvu_chain *next;
    unsigned n;
    uint64_t words[];
};

struct kvu_pool {
    pthread_mutex_t mu;
    pthread_cond_t work;     /* a chain was queued, or stop */
    pthread_cond_t progress; /* completions arrived, or the pool went idle */
    int efd;
    int stop;
    unsigned nthreads;
    pthread_t *threads;
    int *files;
    unsigned nfiles;
    struct kvu_chain *head, *tail;
    unsigned running; /* chains queued or being run */
    unsigned idle;    /* workers waiting for a chain */
    uint64_t *cq_ud;
    int32_t *cq_res;
    unsigned cq_len, cq_cap;
};

static void signal_efd(int efd)
{
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(efd, &one, sizeof one);
    while (r < 0 && errno == EINTR);
}

/* Append completions; the caller holds mu.  Returns -ENOMEM if they cannot be kept. */
static int post_locked(struct kvu_pool *p, const uint64_t *ud, const int32_t *res, unsigned n)
{
    if (p->cq_len + n > p->cq_cap) {
        unsigned cap = p->cq_cap ? p->cq_cap : 256;
        uint64_t *nud;
        int32_t *nres;
        while (cap < p->cq_len + n)
            cap *= 2;
        nud = realloc(p->cq_ud, cap * sizeof *nud);
        if (!nud)
            return -ENOMEM;
        p->cq_ud = nud;
        nres = realloc(p->cq_res, cap * sizeof *nres);
        if (!nres)
            return -ENOMEM;
        p->cq_res = nres;
        p->cq_cap = cap;
    }
    memcpy(p->cq_ud + p->cq_len, ud, n * sizeof *ud);
    memcpy(p->cq_res + p->cq_len, res, n * sizeof *res);
    p->cq_len += n;
    return 0;
}

static void *worker(void *arg)
{
    struct kvu_pool *p = arg;
    uint64_t ud_local[KVU_MAX_CHAIN];
    int32_t res_local[KVU_MAX_CHAIN];

    pthread_mutex_lock(&p->mu);
    for (;;) {
        struct kvu_chain *c;
        unsigned posted;
        int wake;
        while (!p->head && !p->stop) {
            p->idle++;
            pthread_cond_wait(&p->work, &p->mu);
            p->idle--;
        }
        if (!p->head)
            break; /* stopping, and nothing left to run */
        c = p->head;
        p->head = c->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->mu);

        {
            uint64_t *ud = ud_local;
            int32_t *res = res_local;
            if (c->n > KVU_MAX_CHAIN) {
                ud = malloc(c->n * sizeof *ud);
                res = malloc(c->n * sizeof *res);
                if (!ud || !res)
                    abort(); /* the owner would wait forever for these */
            }
            posted = kvu_run_chain(c->words, c->n, p->files, p->nfiles, ud, res);
            pthread_mutex_lock(&p->mu);
            /* Only the first completion after a reap wakes the owner: the
             * reap takes everything queued, under this lock. */
            wake = !p->cq_len && posted;
            if (post_locked(p, ud, res, posted) < 0)
                abort();
            if (ud != ud_local) {
                free(ud);
                free(res);
            }
        }
        p->running--;
        if (!p->running)
            wake = 1; /* a drain waits for this */
        pthread_cond_broadcast(&p->progress);
        pthread_mutex_unlock(&p->mu);
        free(c);
        if (wake)
            signal_efd(p->efd);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

struct kvu_pool *kvu_pool_new(unsigned nthreads, unsigned nfiles, int efd)
{
    struct kvu_pool *p = calloc(1, sizeof *p);
    unsigned i;
    if (!p)
        return NULL;
    p->efd = efd;
    p->nfiles = nfiles;
    p->files = malloc(nfiles * sizeof *p->files);
    p->threads = calloc(nthreads, sizeof *p->threads);
    if (!p->files || !p->threads) {
        free(p->files);
        free(p->threads);
        free(p);
        return NULL;
    }
    for (i = 0; i < nfiles; i++)
        p->files[i] = -1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->progress, NULL);
    for (i = 0; i < nthreads; i++) {
        if (pthread_create(&p->threads[i], NULL, worker, p) != 0)
            break;
    }
    p->nthreads = i;
    if (!p->nthreads) {
        kvu_pool_free(p);
        return NULL;
    }
    return p;
}

/* Queue every chain of `ops`; a lone ASYNC_CANCEL is answered at once (a
 * running chain cannot be stopped).  Returns the op count, or -ENOMEM. */
int kvu_pool_submit(struct kvu_pool *p, const uint64_t *ops, unsigned n)
{
    unsigned i = 0, queued = 0, wake;
    struct kvu_chain *head = NULL, **tail = &head, *last = NULL;
    int answered = 0, err = 0;
    while (i < n) {
        unsigned len = kvu_chain_len(ops + (size_t)i * KVU_OP_WORDS, n - i);
        const uint64_t *w = ops + (size_t)i * KVU_OP_WORDS;
        if (len == 1 && w[0] == IORING_OP_ASYNC_CANCEL) {
            int32_t r = -EALREADY;
            pthread_mutex_lock(&p->mu);
            post_locked(p, &w[6], &r, 1);
            pthread_cond_broadcast(&p->progress);
            pthread_mutex_unlock(&p->mu);
            answered = 1;
        } else {
            struct kvu_chain *c = malloc(sizeof *c + (size_t)len * KVU_OP_WORDS * sizeof(uint64_t));
            if (!c) {
                err = -ENOMEM;
                break;
            }
            c->next = NULL;
            c->n = len;
            memcpy(c->words, w, (size_t)len * KVU_OP_WORDS * sizeof(uint64_t));
            *tail = c;
            tail = &c->next;
            last = c;
            queued++;
        }
        i += len;
    }
    /* One lock and only as many wake-ups as there are idle workers and chains. */
    pthread_mutex_lock(&p->mu);
    if (head) {
        if (p->tail)
            p->tail->next = head;
        else
            p->head = head;
        p->tail = last;
        p->running += queued;
    }
    wake = queued < p->idle ? queued : p->idle;
    while (wake--)
        pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->mu);
    if (answered)
        signal_efd(p->efd);
    if (err && !queued)
        return err;
    return (int)i;
}

unsigned kvu_pool_reap(struct kvu_pool *p, uint64_t *ud, int32_t *res, unsigned max)
{
    unsigned n;
    pthread_mutex_lock(&p->mu);
    n = p->cq_len < max ? p->cq_len : max;
    if (!n) {
        pthread_mutex_unlock(&p->mu);
        return 0;
    }
    memcpy(ud, p->cq_ud, n * sizeof *ud);
    memcpy(res, p->cq_res, n * sizeof *res);
    memmove(p->cq_ud, p->cq_ud + n, (p->cq_len - n) * sizeof *ud);
    memmove(p->cq_res, p->cq_res + n, (p->cq_len - n) * sizeof *res);
    p->cq_len -= n;
    pthread_mutex_unlock(&p->mu);
    return n;
}

/* Block until a completion waits or nothing runs; returns the chains still running. */
unsigned kvu_pool_wait(struct kvu_pool *p, int until_idle)
{
    unsigned running;
    pthread_mutex_lock(&p->mu);
    while (p->running && (until_idle || !p->cq_len))
        pthread_cond_wait(&p->progress, &p->mu);
    running = p->running;
    pthread_mutex_unlock(&p->mu);
    return running;
}

/* Tell the workers to stop once the queue is empty. */
static void stop_workers(struct kvu_pool *p)
{
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
}

/* Finish what is queued, stop the threads, close the slots' files. */
void kvu_pool_free(struct kvu_pool *p)
{
    unsigned i;
    if (!p)
        return;
    stop_workers(p);
    for (i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    for (i = 0; i < p->nfiles; i++)
        if (p->files[i] >= 0)
            close(p->files[i]);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->progress);
    free(p->threads);
    free(p->files);
    free(p->cq_ud);
    free(p->cq_res);
    free(p);
}

/*
 * Let the pool go without waiting for it: for a close whose I/O hangs in a
 * filesystem.  The workers stop after the chain each one is in; the pool,
 * its eventfd and the slots' files stay allocated and open for them (a
 * worker that comes back still signals and posts), so nothing is freed.
 */
void kvu_pool_abandon(struct kvu_pool *p)
{
    unsigned i;
    if (!p)
        return;
    stop_workers(p);
    for (i = 0; i < p->nthreads; i++)
        pthread_detach(p->threads[i]);
}
