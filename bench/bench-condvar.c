/* SPDX-License-Identifier: MIT */
/* Peer: a plain mutex+condvar pool, completions back over an eventfd. */
#include "bench-common.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/*
 * What a C programmer writes by hand: THREADS workers pop jobs from a FIFO
 * guarded by one mutex and a condition variable; each finished job goes on
 * a mutex-protected completion list, and the worker that makes that list
 * non-empty writes the eventfd.  The main thread blocks reading the
 * eventfd, takes the whole list, records each result and submits one new
 * item per completion, so LIMIT stay in flight.  Jobs are LIMIT
 * preallocated nodes recycled by the main thread: no allocation per item.
 */

struct job {
    struct job *next;
    uint64_t index;
    uint64_t value;
};

struct pool {
    /* Work queue: head, tail, idle, stop are protected by qlock. */
    pthread_mutex_t qlock;
    pthread_cond_t qcond;
    struct job *head, *tail;
    unsigned idle; /* workers waiting on qcond */
    bool stop;

    /* Completion list (LIFO; the main thread restores order), protected
     * by dlock.  Lock order: qlock and dlock are never held together. */
    pthread_mutex_t dlock;
    struct job *done;
    int efd;

    unsigned work_iters;
    struct bench_inflight inflight;
    pthread_t *threads;
    unsigned nthreads;
};

static void *worker(void *arg)
{
    struct pool *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->qlock);
        while (p->head == NULL && !p->stop) {
            p->idle++;
            pthread_cond_wait(&p->qcond, &p->qlock);
            p->idle--;
        }
        if (p->head == NULL) { /* stop, and the queue is drained */
            pthread_mutex_unlock(&p->qlock);
            return NULL;
        }
        struct job *j = p->head;
        p->head = j->next;
        if (p->head == NULL)
            p->tail = NULL;
        pthread_mutex_unlock(&p->qlock);

        bench_inflight_enter(&p->inflight);
        j->value = bench_work(j->index, p->work_iters);
        bench_inflight_leave(&p->inflight);

        pthread_mutex_lock(&p->dlock);
        bool was_empty = p->done == NULL;
        j->next = p->done;
        p->done = j;
        pthread_mutex_unlock(&p->dlock);
        /* Only the empty -> non-empty transition needs a wakeup: the main
         * thread takes the whole list each time it wakes. */
        if (was_empty) {
            uint64_t one = 1;
            while (write(p->efd, &one, sizeof one) < 0 && errno == EINTR)
                ;
        }
    }
}

static void pool_submit(struct pool *p, struct job *j)
{
    j->next = NULL;
    pthread_mutex_lock(&p->qlock);
    if (p->tail != NULL)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    bool wake = p->idle > 0;
    pthread_mutex_unlock(&p->qlock);
    /* Signalled after unlocking, so the woken worker does not block at
     * once on the lock we hold (helgrind calls this "dubious"; POSIX
     * allows it, and a worker counted in idle is inside pthread_cond_wait
     * or about to re-check the queue under the lock, so no wakeup is
     * lost). */
    if (wake)
        pthread_cond_signal(&p->qcond);
}

/* Blocks until at least one completion is ready; returns them oldest
 * first. */
static struct job *pool_take_done(struct pool *p)
{
    for (;;) {
        uint64_t count;
        ssize_t got = read(p->efd, &count, sizeof count);
        if (got < 0 && errno != EINTR && errno != EAGAIN) {
            perror("bench-condvar: read(eventfd)");
            exit(3);
        }
        pthread_mutex_lock(&p->dlock);
        struct job *list = p->done;
        p->done = NULL;
        pthread_mutex_unlock(&p->dlock);
        if (list == NULL)
            continue; /* a wakeup for a list an earlier take emptied */
        struct job *fifo = NULL;
        while (list != NULL) {
            struct job *next = list->next;
            list->next = fifo;
            fifo = list;
            list = next;
        }
        return fifo;
    }
}

int main(int argc, char **argv)
{
    struct bench_args a;
    struct bench_results r;
    struct pool p;

    bench_parse_args(argc, argv, "condvar", &a);
    bench_results_init(&r, a.n);

    memset(&p, 0, sizeof p);
    pthread_mutex_init(&p.qlock, NULL);
    pthread_cond_init(&p.qcond, NULL);
    pthread_mutex_init(&p.dlock, NULL);
    p.work_iters = a.work_iters;
    bench_inflight_init(&p.inflight);
    p.efd = eventfd(0, EFD_CLOEXEC);
    p.nthreads = a.threads;
    p.threads = calloc(a.threads, sizeof *p.threads);
    uint64_t nslots = a.limit < a.n ? a.limit : a.n;
    struct job *slots = calloc(nslots, sizeof *slots);
    if (p.efd < 0 || p.threads == NULL || slots == NULL) {
        perror("bench-condvar: setup");
        return 3;
    }
    for (unsigned t = 0; t < a.threads; t++) {
        int e = pthread_create(&p.threads[t], NULL, worker, &p);
        if (e != 0) {
            fprintf(stderr, "bench-condvar: pthread_create: %s\n",
                    strerror(e));
            return 3;
        }
    }

    uint64_t t0 = bench_now_ns();
    uint64_t next = 0, outstanding = 0;
    for (; next < nslots; next++) {
        slots[next].index = next;
        pool_submit(&p, &slots[next]);
    }
    outstanding = nslots;
    while (outstanding > 0) {
        struct job *j = pool_take_done(&p);
        while (j != NULL) {
            struct job *following = j->next;
            bench_record(&r, j->index, j->value);
            outstanding--;
            if (next < a.n) {
                j->index = next++;
                pool_submit(&p, j);
                outstanding++;
            }
            j = following;
        }
    }
    uint64_t t1 = bench_now_ns();

    pthread_mutex_lock(&p.qlock);
    p.stop = true;
    pthread_cond_broadcast(&p.qcond);
    pthread_mutex_unlock(&p.qlock);
    for (unsigned t = 0; t < a.threads; t++)
        pthread_join(p.threads[t], NULL);

    bool ok = bench_check(&r, &a, &p.inflight, 0);
    int status = bench_report("condvar", &a, t1 - t0, ok, false);

    close(p.efd);
    free(slots);
    free(p.threads);
    pthread_mutex_destroy(&p.qlock);
    pthread_cond_destroy(&p.qcond);
    pthread_mutex_destroy(&p.dlock);
    bench_results_free(&r);
    return status;
}
