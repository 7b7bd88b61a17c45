/* SPDX-License-Identifier: MIT */
/* The fixed thread pool: a FIFO work queue, workers, submit, shutdown. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "loop-internal.h" /* the loop's job count, inline */
#include "pool-internal.h"

/*
 * Threads and locks
 * =================
 * Lock order: none, because no library lock is ever held while another is
 * taken.  pool->mu, each semaphore's mutex (sem.c) and the loop's inbox
 * lock are all leaves: a worker calls its job's next() hook (which takes a
 * semaphore's mutex) and posts to the inbox with pool->mu released, and
 * sem.c releases its mutex before it queues a job here.  No lock is held
 * while work() or any user code runs.
 *
 * pool->mu protects the queue (and each job's `queued`), idle, signaled,
 * busy, stopping and drain_waiting.  `cancelling` is atomic: workers read
 * it without the lock.  Everything else (the thread array, the clients,
 * inflight, state) belongs to the loop thread.
 *
 * A job (pool-internal.h draws its states) belongs to its owner, which
 * embeds it: df_pool_submit's jobs live in their deferred's block, a
 * semaphore's in theirs, a map's in its slots.  The pool allocates nothing
 * per job.  A worker pops a job, runs work() with no lock held, asks the
 * job's next() hook for a successor (the token hand-off), posts the job to
 * the loop's inbox and runs the successor, if any, itself.  The loop runs
 * the job's inbox function: its owner's `posted` (pool-internal.h), which
 * goes straight to the owner's completion, or job_posted(), which calls
 * its owner's done(); both start with the pool's accounting
 * (df__job_posted).
 */

struct df_pool {
    df_loop *loop;   /* immutable */
    int state;       /* enum df__pool_state (df__pool_head)          */
    size_t inflight; /* started, completion not dispatched           */
    size_t *jobs;    /* &loop->jobs (df__pool_head)                  */

    pthread_mutex_t mu;
    pthread_cond_t cv;      /* workers wait here for work or stop       */
    pthread_cond_t idle_cv; /* a drain waits here for the workers       */
    df__ilink queue;        /* queued jobs, FIFO                        */
    unsigned idle;          /* workers waiting on cv                    */
    unsigned signaled;      /* signals no worker has woken for yet      */
    unsigned busy;          /* workers running a job                    */
    bool stopping;          /* workers exit once the queue is empty     */
    bool drain_waiting;     /* a drain waits on idle_cv                 */
    atomic_bool cancelling; /* no more hand-offs (CANCEL)               */
    df__inbox_fn direct;    /* the owners' df__job_ops.posted, once a
                             * worker has run a job that has one       */

    /* Loop thread only. */
    pthread_t *threads;
    unsigned nthreads;
    df__ilink clients;      /* df__pool_client, told at shutdown        */
    bool free_pending;      /* df_pool_free() waits for the shutdown    */
};

/* ------------------------------------------------------------------- jobs */

static void job_posted(df_loop *loop, df__inbox_node *n, int status);
static const df__job_ops plain_ops;

/* The hooks of j's owner (pool-internal.h). */
static inline const df__job_ops *job_ops(const df__job *j)
{
    return j->h.owner != NULL ? *(const df__job_ops *const *)j->h.owner
                              : &plain_ops;
}

_Static_assert(offsetof(struct df_pool, loop) ==
                       offsetof(df__pool_head, loop) &&
                   offsetof(struct df_pool, state) ==
                       offsetof(df__pool_head, state) &&
                   offsetof(struct df_pool, inflight) ==
                       offsetof(df__pool_head, inflight) &&
                   offsetof(struct df_pool, jobs) ==
                       offsetof(df__pool_head, jobs),
               "df__pool_head must match struct df_pool");

/* A job counts in flight (the pool's `inflight`, and the loop's pending
 * count, which keeps df_loop_run going) from its start until its done()
 * is called. */
static inline void count(df_pool *p, long delta)
{
    p->inflight = (size_t)((long)p->inflight + delta);
    df__loop_jobs_add(p->loop, delta);
}

void df__pool_start(df_pool *p, df__job *j)
{
    DF__HOT_ASSERT(df__pool_accepts(p) && j->pool == p);
    count(p, 1);
    pthread_mutex_lock(&p->mu);
    j->h.queued = true;
    df__ilist_append(&p->queue, &j->h.link);
    /* One job wakes at most one worker, and only if no worker already
     * signalled is still on its way: a burst of N starts costs at most
     * min(N, idle) wake-ups, never a broadcast.  (A spurious wake-up only
     * makes `signaled` low, which costs an extra signal, never a lost
     * job: a worker always looks at the queue before it waits.)  Signalled
     * under the lock, which costs little and keeps race detectors quiet. */
    if (p->idle > p->signaled) {
        p->signaled++;
        pthread_cond_signal(&p->cv);
    }
    pthread_mutex_unlock(&p->mu);
}

bool df__job_unqueue(df__job *j)
{
    df_pool *p = j->pool;
    pthread_mutex_lock(&p->mu);
    bool queued = j->h.queued;
    if (queued) {
        df__ilist_remove(&j->h.link);
        j->h.queued = false;
    } else { /* seq_cst: a locked xchg on x86, which helgrind understands */
        atomic_store_explicit(&j->h.w.cancelled, true, memory_order_seq_cst);
    }
    pthread_mutex_unlock(&p->mu);
    if (queued)
        count(p, -1);
    return queued;
}

/* Loop thread: the completion of a job whose owner has no inbox
 * function of its own (df__job_ops.posted), run from the inbox. */
static void job_posted(df_loop *loop, df__inbox_node *n, int status)
{
    DF__UNUSED(loop);
    df__job *j = df__job_posted(n, status);
    job_ops(j)->done(j, 0); /* may free the pool */
}

/* Whether inbox entry n is a job of pool `arg`.  A job's entry runs
 * job_posted or its owner's `posted`, which the pool learnt (`direct`)
 * when a worker took the first job of such an owner, before any of them
 * was posted; no other entry runs either.  Read after the workers are
 * idle or joined (drain, pool_shutdown), which orders it after their
 * writes. */
static bool job_of_pool(const df__inbox_node *n, void *arg)
{
    const df_pool *p = arg;
    return (n->run == job_posted ||
            (p->direct != NULL && n->run == p->direct)) &&
           DF__CONTAINER_OF(n, const df__job, h.node)->pool == p;
}

/* ---------------------------------------------------------------- clients */

void df__pool_client_add(df_pool *p, df__pool_client *c)
{
    DF__HOT_ASSERT(df__pool_accepts(p));
    c->pool = p;
    df__ilist_append(&p->clients, &c->link);
}

void df__pool_client_remove(df__pool_client *c)
{
    if (df__ilink_linked(&c->link))
        df__ilist_remove(&c->link);
    c->pool = NULL;
}

/* Tells every client that p takes no more work (step one: no user code
 * runs); they move to `told`, for flush_clients. */
static void stop_clients(df_pool *p, df__ilink *told)
{
    df__ilink *l;
    while ((l = df__ilist_pop(&p->clients)) != NULL) {
        df__pool_client *c = DF__ILIST_ENTRY(l, df__pool_client, link);
        c->pool = NULL;
        c->stopped(c, p);
        df__ilist_append(told, &c->link);
    }
}

/* Step two: each client fails what it took.  Each leaves the list before
 * it is told, so that what it runs may remove the others. */
static void flush_clients(df__ilink *told)
{
    df__ilink *l;
    while ((l = df__ilist_pop(told)) != NULL) {
        df__pool_client *c = DF__ILIST_ENTRY(l, df__pool_client, link);
        if (c->flush != NULL)
            c->flush(c);
    }
}

/* ---------------------------------------------------------------- workers */

static void *worker_main(void *arg)
{
    df_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (df__ilist_empty(&p->queue) && !p->stopping) {
            p->idle++;
            pthread_cond_wait(&p->cv, &p->mu);
            p->idle--;
            if (p->signaled > 0)
                p->signaled--;
        }
        df__ilink *l = df__ilist_pop(&p->queue);
        if (l == NULL)
            break; /* stopping and nothing left */
        df__job *j = DF__ILIST_ENTRY(l, df__job, h.link);
        j->h.queued = false;
        /* The jobs a worker runs next (next(), below) have the same
         * owner as this one, hence the same inbox function. */
        df__inbox_fn posted = job_ops(j)->posted;
        if (posted != NULL) {
            assert(p->direct == NULL || p->direct == posted);
            p->direct = posted;
        } else {
            posted = job_posted;
        }
        p->busy++;
        pthread_mutex_unlock(&p->mu);

        /* Completions of jobs whose token this worker runs next may
         * wait for the loop's timed sleep to end (inbox.c, "Wake-ups");
         * the last of a run always wakes the loop. */
        unsigned unwoken = 0;
        while (j != NULL) {
            /* work and arg share their bytes with the result. */
            df__job_io *io = df__job_io_of(j);
            df_work_fn work = io->in.work;
            io->result = work(&j->h.w, io->in.arg);
            df__job *next = NULL;
            const df__job_ops *ops = job_ops(j);
            if (ops->next != NULL &&
                !atomic_load_explicit(&p->cancelling, memory_order_acquire))
                next = ops->next(j);
            j->h.handed = next != NULL;
            DF__HOT_ASSERT(posted == (ops->posted != NULL ? ops->posted
                                                          : job_posted));
            /* The job now belongs to the loop: not touched after this. */
            j->h.node.run = posted;
            if (next != NULL)
                df__loop_post_batched(p->loop, &j->h.node, &unwoken);
            else
                df__loop_post(p->loop, &j->h.node);
            j = next;
        }

        pthread_mutex_lock(&p->mu);
        p->busy--;
        if (p->drain_waiting && p->busy == 0 && df__ilist_empty(&p->queue))
            pthread_cond_signal(&p->idle_cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

bool df_work_cancelled(const df_work *w)
{
    return w != NULL &&
           atomic_load_explicit(&w->cancelled, memory_order_relaxed);
}

df_loop *df_work_loop(const df_work *w)
{
    return w != NULL ? DF__CONTAINER_OF(w, df__job, h.w)->pool->loop : NULL;
}

/* --------------------------------------------------------------- the pool */

/* Tells the workers to leave once the queue is empty and joins `n` of
 * them.  Loop thread. */
static void stop_and_join(df_pool *p, unsigned n)
{
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < n; i++)
        pthread_join(p->threads[i], NULL);
}

static void pool_destroy(df_pool *p)
{
    df_loop *loop = p->loop;
    assert(df__ilist_empty(&p->clients));
    pthread_cond_destroy(&p->idle_cv);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    df__free(loop, p->threads);
    df__free(loop, p);
}

int df_pool_new(df_loop *loop, const df_pool_options *opts, df_pool **out)
{
    if (loop == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    df_pool_options o = DF_POOL_OPTIONS_INIT;
    if (opts != NULL)
        o = *opts;
    if (o.threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o.threads = n < 1 ? 1 : (unsigned)n;
    }

    df_pool *p = df__calloc(loop, 1, sizeof *p);
    if (p == NULL)
        return DF_ENOMEM;
    p->loop = loop;
    p->jobs = &loop->jobs;
    p->threads = df__calloc(loop, o.threads, sizeof *p->threads);
    if (p->threads == NULL) {
        df__free(loop, p);
        return DF_ENOMEM;
    }
    pthread_attr_t attr;
    int rc = pthread_mutex_init(&p->mu, NULL);
    if (rc != 0)
        goto fail_threads;
    if ((rc = pthread_cond_init(&p->cv, NULL)) != 0)
        goto fail_mutex;
    if ((rc = pthread_cond_init(&p->idle_cv, NULL)) != 0) {
        pthread_cond_destroy(&p->cv);
        goto fail_mutex;
    }
    df__ilist_init(&p->queue);
    df__ilist_init(&p->clients);
    atomic_init(&p->cancelling, false);
    if ((rc = pthread_attr_init(&attr)) != 0)
        goto fail_cond;
    if (o.stack_size != 0 &&
        (rc = pthread_attr_setstacksize(&attr, o.stack_size)) != 0)
        goto fail_attr;

    /* Workers inherit a full signal mask: asynchronous signals belong to
     * the application's threads, not to ours. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    unsigned made;
    for (made = 0; made < o.threads; made++) {
        rc = pthread_create(&p->threads[made], &attr, worker_main, p);
        if (rc != 0)
            break;
        /* Linux limits names to 15 bytes: df-worker-0 .. df-worker-99999. */
        char name[32];
        snprintf(name, sizeof name, "df-worker-%u", made);
        name[15] = '\0';
        pthread_setname_np(p->threads[made], name);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        stop_and_join(p, made);
        goto fail_cond;
    }
    p->nthreads = o.threads;
    p->state = DF__POOL_OPEN;
    df__loop_pools_add(loop, 1);
    *out = p;
    return 0;

fail_attr:
    pthread_attr_destroy(&attr);
fail_cond:
    pthread_cond_destroy(&p->idle_cv);
    pthread_cond_destroy(&p->cv);
fail_mutex:
    pthread_mutex_destroy(&p->mu);
fail_threads:
    df__free(loop, p->threads);
    df__free(loop, p);
    return -rc;
}


unsigned df_pool_threads(const df_pool *p)
{
    return p != NULL ? p->nthreads : 0;
}


/* ----------------------------------------------------------- plain submit */

/* A df_pool_submit job lives in its deferred's block (no allocation of
 * its own), a pool job's block: its io is the deferred's result fields
 * and its canceller is plain_cancel, through plain_ops
 * (deferred-internal.h, df__deferred_new_pool_job). */
typedef struct plain_job {
    df__job job; /* its deferred holds a reference for the job (the
                  * deferred is df__job_deferred(job)) */
} plain_job;

_Static_assert(sizeof(plain_job) <= DF__POOL_JOB_SIZE,
               "raise DF__POOL_JOB_SIZE");

/* The producer's fire: drops the job's reference. */
static void fail_cancelled(df_loop *loop, df_deferred *d)
{
    df_failure *f = df_failure_new(loop, DF_ECANCELLED, "pool job cancelled");
    df__deferred_resolve_drop(d, df_err(f));
}

df_result df__job_result_slow(df__job *j, int status, df_loop *loop)
{
    if (status != 0) /* never ran: the result's bytes hold work and arg */
        return df_err(df_failure_new(loop, status, "pool job cancelled"));
    df_result r = df__job_io_of(j)->result;
    if (atomic_load_explicit(&j->h.w.cancelled, memory_order_relaxed)) {
        df_result_clear(&r);
        return df_err(df_failure_new(loop, DF_ECANCELLED,
                                     "pool job cancelled"));
    }
    if (r.wait != NULL) {
        df_result_clear(&r);
        r = df_errf(loop, DF_EINVAL, "work function returned df_wait()");
    }
    return r;
}

static void plain_done(df__job *j, int status)
{
    plain_job *pj = DF__CONTAINER_OF(j, plain_job, job);
    if (df__job_result_ready(j, status)) {
        /* The common case: the result goes from where the worker wrote
         * it to the callbacks. */
        df__deferred_resolve_io_drop(df__job_deferred(pj));
        return;
    }
    df_result r = df__job_result(j, status, j->pool->loop);
    /* Fires the deferred and drops the job's reference: may free the
     * block, and the job with it. */
    df__deferred_resolve_drop(df__job_deferred(pj), r);
}

/* df_deferred_cancel() on a plain job's deferred; loop thread.  A queued
 * job leaves the queue and fails now; a running one fails with
 * DF_ECANCELLED when its completion is dispatched. */
static void plain_cancel(df__job *j)
{
    plain_job *pj = DF__CONTAINER_OF(j, plain_job, job);
    if (df__job_unqueue(&pj->job))
        fail_cancelled(pj->job.pool->loop, df__job_deferred(pj));
}

static const df__job_ops plain_ops = {NULL, plain_done, plain_cancel, NULL};

void df__pool_job_cancel(void *job)
{
    df__job *j = job;
    job_ops(j)->cancel(j);
}

int df_pool_submit(df_pool *p, df_work_fn work, void *arg, df_deferred **out)
{
    if (p == NULL || work == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(p->loop);
    if (p->state != DF__POOL_OPEN)
        return DF_ESHUTDOWN;
    /* Two references: the job's and *out's. */
    df_deferred *d = df__deferred_new_pool_job(p->loop, work, arg);
    if (d == NULL)
        return DF_ENOMEM;
    plain_job *pj = df__deferred_job(d);
    df__job_init(&pj->job, p, NULL, work, arg);
    assert(df__job_deferred(pj) == d);
    *out = d;
    df__pool_start(p, &pj->job);
    return 0;
}

/* ---------------------------------------------------------------- shutdown */

/* DRAIN: runs the queue, and every job that gets a token meanwhile, to
 * the end.  Each round waits for the workers to go idle, then dispatches
 * this pool's completions; those give tokens back, which may start more
 * jobs of this pool (it still takes them while draining), so it goes on
 * until a round dispatches nothing. */
static void drain(df_pool *p)
{
    for (;;) {
        pthread_mutex_lock(&p->mu);
        p->drain_waiting = true;
        while (p->busy > 0 || !df__ilist_empty(&p->queue))
            pthread_cond_wait(&p->idle_cv, &p->mu);
        p->drain_waiting = false;
        pthread_mutex_unlock(&p->mu);
        if (df__loop_run_matching(p->loop, job_of_pool, p) == 0)
            break;
    }
}

static void pool_shutdown(df_pool *p, int mode)
{
    if (mode == DF_POOL_DRAIN) {
        p->state = DF__POOL_DRAINING;
        drain(p);
    }
    /* From here on nothing new starts: the queue is taken (CANCEL) or
     * empty (DRAIN) before any callback runs, and workers hand no more
     * tokens on. */
    p->state = DF__POOL_CLOSING;
    /* seq_cst: a locked xchg on x86, which helgrind orders against the
     * workers' loads (a release store is a plain one to it). */
    atomic_store_explicit(&p->cancelling, true, memory_order_seq_cst);
    df__ilink taken, told;
    df__ilist_init(&taken);
    df__ilist_init(&told);
    stop_clients(p, &told);
    pthread_mutex_lock(&p->mu);
    for (df__ilink *l = df__ilist_first(&p->queue); l != NULL;
         l = df__ilist_next(&p->queue, l))
        DF__ILIST_ENTRY(l, df__job, h.link)->h.queued = false;
    df__ilist_splice(&taken, &p->queue);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);

    /* The queued jobs fail first (their callbacks run now), then the
     * clients fail the jobs they kept for this pool (DF_ESHUTDOWN). */
    df__ilink *l;
    while ((l = df__ilist_pop(&taken)) != NULL) {
        df__job *j = DF__ILIST_ENTRY(l, df__job, h.link);
        count(p, -1);
        job_ops(j)->done(j, DF_ECANCELLED);
    }
    flush_clients(&told);

    stop_and_join(p, p->nthreads);
    /* Every job has been posted by now; dispatch this pool's share. */
    df__loop_run_matching(p->loop, job_of_pool, p);
    assert(p->inflight == 0 && df__ilist_empty(&p->clients));
    p->state = DF__POOL_DOWN;
}

int df_pool_shutdown(df_pool *p, int mode)
{
    if (p == NULL || (mode != DF_POOL_DRAIN && mode != DF_POOL_CANCEL))
        return DF_EINVAL;
    DF__CHECK_THREAD(p->loop);
    /* Already down, or a callback run by the shutdown in progress. */
    if (p->state != DF__POOL_OPEN)
        return 0;
    pool_shutdown(p, mode);
    if (p->free_pending) {
        /* A callback freed the pool while it was shutting down. */
        df__loop_pools_add(p->loop, -1);
        pool_destroy(p);
    }
    return 0;
}

void df_pool_free(df_pool *p)
{
    if (p == NULL)
        return;
    if (!df__loop_usable(p->loop, __func__))
        return;
    p->free_pending = true;
    if (p->state != DF__POOL_OPEN && p->state != DF__POOL_DOWN)
        return; /* the shutdown in progress frees it when done */
    if (p->state == DF__POOL_OPEN)
        pool_shutdown(p, DF_POOL_CANCEL);
    df__loop_pools_add(p->loop, -1);
    pool_destroy(p);
}
