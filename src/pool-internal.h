/* SPDX-License-Identifier: MIT */
/* The pool's job and the hooks through which the job's owner (a plain
 * submit, a semaphore's waiting line, a map) hears from the pool. */
#ifndef DF_POOL_INTERNAL_H
#define DF_POOL_INTERNAL_H

#include "deferred-internal.h"
#include "ilist.h"

struct df_work {
    atomic_bool cancelled; /* set on the loop thread, read by the worker */
};

typedef struct df__job df__job;

/* What a job's owner supplies.  The pool never calls into its owners by
 * name: it calls these, so that the semaphore (which owns tokens and the
 * waiting line) depends on the pool and never the other way round. */
typedef struct df__job_ops {
    /* Worker thread, right after work() returned, no lock held.  May
     * return another job of the same pool, which then holds the finished
     * job's semaphore token: the worker runs it next, with no round trip
     * through the loop (the token hand-off).  NULL: none.  May be NULL. */
    df__job *(*next)(df__job *j);
    /* Loop thread: the job is over and the pool has forgotten it.
     * status 0: work ran, j->result holds its result (steal it) and
     * j->handed says whether its token went on to the next job.
     * DF_ECANCELLED: taken off the queue without running (a cancel, or
     * df_pool_shutdown(CANCEL)).  May run user code and free the pool. */
    void (*done)(df__job *j, int status);
} df__job_ops;

/* A job's life, as the pool sees it:
 *
 *   made --df__pool_start--> queued --a worker pops it--> running
 *   made --a finishing job's next() returns it--> running (same worker)
 *   running --work() returns, posted--> done(j, 0) on the loop thread
 *   queued --df__job_unqueue--> the owner completes it itself
 *   queued --df_pool_shutdown(CANCEL)--> done(j, DF_ECANCELLED)
 *
 * Only `queued` is recorded (pool->mu): every other state is "not on the
 * queue", and what matters then is only whether the worker has posted. */

struct df__job {
    /* A queued job is on the pool's queue; a posted one in the inbox; never
     * both at once, so the two links share their bytes. */
    union {
        df__ilink link;           /* the pool's queue (pool->mu)          */
        df__inbox_node node;      /* the inbox entry once posted          */
    };
    df_pool *pool;
    const df__job_ops *ops;
    df_work_fn work;
    void *arg;
    df_result result;         /* written by the worker before posting     */
    df_work w;
    bool queued;              /* on the pool's queue (pool->mu)           */
    bool handed;              /* written by the worker before posting     */
};

/* Loop thread.  Prepares j to run work(w, arg) on p. */
void df__job_init(df__job *j, df_pool *p, const df__job_ops *ops,
                  df_work_fn work, void *arg);
/* Loop thread.  Queues j; the pool must accept work (df__pool_accepts).
 * Runs no user code. */
void df__pool_start(df_pool *p, df__job *j);
/* Loop thread.  Takes j off its pool's queue if it is still queued
 * (true: the caller completes it; done() is not called), else sets the
 * flag df_work_cancelled() reads (false). */
bool df__job_unqueue(df__job *j);
/* Loop thread, in done(): the job's final result, taken from it: work's
 * result, or DF_ECANCELLED if status says so or the job was cancelled
 * while it ran, or DF_EINVAL if work returned df_wait(). */
df_result df__job_result_slow(df__job *j, int status);
static inline df_result df__job_result(df__job *j, int status)
{
    /* The common case inline: work ran, was not cancelled, returned no
     * df_wait(). */
    if (status == 0 && j->result.wait == NULL &&
        !atomic_load_explicit(&j->w.cancelled, memory_order_relaxed)) {
        df_result r = j->result;
        j->result = df_ok(NULL, NULL);
        return r;
    }
    return df__job_result_slow(j, status);
}
/* Loop thread.  True while p is open to new work from the application. */
bool df__pool_open(const df_pool *p);
/* Loop thread.  True while p takes jobs: open, or draining (a drain runs
 * the jobs that finishing jobs hand their tokens to). */
bool df__pool_accepts(const df_pool *p);

/* A client of a pool keeps jobs for it outside its queue (a semaphore's
 * waiting line, a map's pulled items).  The pool tells its clients, once,
 * when it stops taking work (at the start of df_pool_shutdown(CANCEL), at
 * the end of a drain, when freed), in two steps: `stopped` takes the
 * client's jobs for that pool out of reach and runs no user code; after
 * the pool's queued jobs have failed, `flush` (may be NULL) fails them,
 * and may run user code.  The client is off the pool's list (c->pool is
 * NULL) from `stopped` on; it must stay alive until `flush` returns. */
typedef struct df__pool_client df__pool_client;
struct df__pool_client {
    df__ilink link;           /* the pool's clients (loop thread)         */
    df_pool *pool;            /* NULL once told or removed                */
    void (*stopped)(df__pool_client *c, df_pool *p);
    void (*flush)(df__pool_client *c);
};
/* Loop thread.  The pool must accept work. */
void df__pool_client_add(df_pool *p, df__pool_client *c);
/* Loop thread.  Does nothing if c is on no list. */
void df__pool_client_remove(df__pool_client *c);

#endif /* DF_POOL_INTERNAL_H */
