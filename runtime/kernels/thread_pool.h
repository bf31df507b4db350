/* A pool of worker threads kept between kernel calls, for kernels called hundreds of times a second (a decode
 * step calls the quantized linear kernel 4 times a layer). Starting threads per call cost 10-250 us a call on the
 * 2-core VM of docs/performance.md, more than a small projection takes.
 *
 * The caller runs part 0 of each job itself; workers run parts 1..threads-1. After a job a worker spins
 * (SPIN_ROUNDS pauses, ~0.1-0.5 ms) for the next one before it sleeps on a condition variable: the calls of one
 * decode step come a few microseconds apart, and a sleeping worker would cost a wake-up each time. Between
 * steps, and while ONNX Runtime runs a prefill, the workers sleep. Included by the kernels that use it
 * (runtime/kernels/build.py hashes it with each source). */
#ifndef PULSE_EDGE_THREAD_POOL_H
#define PULSE_EDGE_THREAD_POOL_H

#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define SPIN_ROUNDS 20000

typedef void (*pool_task)(void *context, int part, int parts);

typedef struct {
    int threads;  /* parts of a job, the caller's included */
    pid_t owner;  /* a forked child has the memory but not the threads (below) */
    pthread_t *ids;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_ulong generation;  /* bumped once per job */
    atomic_int pending;       /* workers still running the current job */
    atomic_int stop;
    pool_task task;
    void *context;
} pool;

typedef struct { pool *p; int part; } pool_worker;

static inline void *pool_loop(void *arg) {
    pool_worker self = *(pool_worker *)arg;
    free(arg);
    pool *p = self.p;
    unsigned long seen = 0;
    for (;;) {
        unsigned long now = atomic_load(&p->generation);
        for (int i = 0; now == seen && i < SPIN_ROUNDS; i++) {
            _mm_pause();
            now = atomic_load(&p->generation);
        }
        if (now == seen) {
            pthread_mutex_lock(&p->lock);
            while ((now = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->lock);
            pthread_mutex_unlock(&p->lock);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = now;
        p->task(p->context, self.part, p->threads);
        atomic_fetch_sub(&p->pending, 1);
    }
}

/* A pool for jobs in `threads` parts (threads - 1 workers); NULL where memory or a thread was refused. */
static inline pool *pool_create(int threads) {
    pool *p = calloc(1, sizeof(pool));
    if (!p) return NULL;
    p->threads = threads < 1 ? 1 : threads;
    p->owner = getpid();
    p->ids = calloc((size_t)p->threads, sizeof(pthread_t));
    if (!p->ids || pthread_mutex_init(&p->lock, NULL) || pthread_cond_init(&p->wake, NULL)) {
        free(p->ids); free(p);
        return NULL;
    }
    for (int t = 1; t < p->threads; t++) {
        pool_worker *w = malloc(sizeof(pool_worker));
        int failed = w == NULL;
        if (w) {
            *w = (pool_worker){p, t};
            failed = pthread_create(&p->ids[t], NULL, pool_loop, w) != 0;
        }
        if (failed) {
            free(w);
            p->threads = t;  /* the workers started so far are stopped and joined below */
            atomic_store(&p->stop, 1);
            pthread_mutex_lock(&p->lock); pthread_cond_broadcast(&p->wake); pthread_mutex_unlock(&p->lock);
            for (int j = 1; j < t; j++) pthread_join(p->ids[j], NULL);
            free(p->ids); free(p);
            return NULL;
        }
    }
    return p;
}

/* Runs task(context, part, parts) for every part, part 0 on the calling thread; returns when all are done. In a
 * process forked after the pool was made (no workers there) the caller runs every part. */
static inline void pool_run(pool *p, pool_task task, void *context) {
    if (p->threads == 1 || getpid() != p->owner) {
        for (int part = 0; part < p->threads; part++) task(context, part, p->threads);
        return;
    }
    p->task = task;
    p->context = context;
    atomic_store(&p->pending, p->threads - 1);
    pthread_mutex_lock(&p->lock);
    atomic_fetch_add(&p->generation, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    task(context, 0, p->threads);
    while (atomic_load(&p->pending) > 0) _mm_pause();
}

static inline void pool_destroy(pool *p) {
    if (!p || getpid() != p->owner) return;  /* a forked child: no threads of its own to stop; its memory goes with it */
    atomic_store(&p->stop, 1);
    pthread_mutex_lock(&p->lock);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int t = 1; t < p->threads; t++) pthread_join(p->ids[t], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    free(p->ids);
    free(p);
}

#endif
