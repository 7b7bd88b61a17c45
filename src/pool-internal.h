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

/* The head of every pool job, and of every waiter of a semaphore's line
 * (sem-internal.h calls it df__waiter): a job waits in a semaphore's line
 * with the same link that later queues it on its pool and posts it to
 * the inbox, never on two of those at once.  `owner`, `kind` and `state`
 * belong to whoever embeds the job (the pool never reads them); the job's
 * own flags fill the rest of the head's last word.  32 bytes. */
typedef struct df__job_head {
    union {
        df__ilink link;       /* a semaphore's line, or the pool's queue  */
        df__inbox_node node;  /* the inbox entry once posted              */
    };
    void *owner;              /* NULL, or the owner: it starts with a
                               * pointer to its df__job_ops (sem.c: the
                               * semaphore)                               */
    unsigned char kind;       /* the owner's                              */
    unsigned char state;      /* the owner's                              */
    bool queued;              /* job: on the pool's queue (pool->mu)      */
    bool handed;              /* job: written by the worker before posting */
    df_work w;                /* job: what df_work_cancelled() reads      */
} df__job_head;

/* What a job's owner supplies, through the pointer its owner starts with
 * (a job without an owner is the pool's own: df_pool_submit's).  The pool
 * never calls into its owners by name: it calls these, so that the semaphore (which owns tokens and the
 * waiting line) depends on the pool and never the other way round. */
typedef struct df__job_ops {
    /* Worker thread, right after work() returned, no lock held.  May
     * return another job of the same pool, which then holds the finished
     * job's semaphore token: the worker runs it next, with no round trip
     * through the loop (the token hand-off).  NULL: none.  May be NULL. */
    df__job *(*next)(df__job *j);
    /* Loop thread: the job is over and the pool has forgotten it.
     * status 0: work ran, its io holds its result (steal it) and
     * j->h.handed says whether its token went on to the next job.
     * DF_ECANCELLED: taken off the queue without running (a cancel, or
     * df_pool_shutdown(CANCEL)); its io holds no result.  May run user
     * code and free the pool. */
    void (*done)(df__job *j, int status);
    /* Loop thread: the application cancels the deferred whose block holds
     * j (df__pool_job_cancel).  May run user code. */
    void (*cancel)(df__job *j);
    /* The inbox function a worker posts j with, so that its completion
     * goes straight to its owner: it starts with df__job_posted(n, status)
     * and then does what done(j, 0) does.  NULL: the pool's own, which
     * calls done().  A pool's jobs are told from other inbox entries by
     * this function (df__loop_run_matching, in a drain and a shutdown):
     * every owner with jobs on one pool must use the same non-NULL one
     * (there is one, the semaphore's). */
    df__inbox_fn posted;
} df__job_ops;

/* A job's life, as the pool sees it:
 *
 *   made --df__pool_start--> queued --a worker pops it--> running
 *   made --a finishing job's next() returns it--> running (same worker)
 *   running --work() returns, posted--> done(j, 0) on the loop thread
 *                                       (or the owner's posted(), which
 *                                       does the same)
 *   queued --df__job_unqueue--> the owner completes it itself
 *   queued --df_pool_shutdown(CANCEL)--> done(j, DF_ECANCELLED)
 *
 * Only `queued` is recorded (pool->mu): every other state is "not on the
 * queue", and what matters then is only whether the worker has posted.
 *
 * What a job carries is its io (deferred-internal.h): what a job waiting
 * for a token or queued needs (the work function and its argument) in the
 * same bytes as what only a job that has run needs (its result): the
 * worker reads work and arg before it calls work, and writes the result
 * after.  The io is not in the job but DF__JOB_IO_BACK bytes before it:
 * in a pool job's block (df_pool_submit, df_sem_run_in_pool) it is the
 * deferred's own result fields, free until the job's completion fires
 * the deferred, which makes the block 32 bytes smaller; a map's slot
 * puts its io there too.  The owner's hooks are found through the owner.
 * 40 bytes. */

struct df__job {
    df__job_head h;
    df_pool *pool;
};
_Static_assert(sizeof(df__job) == DF__POOL_JOB_SIZE, "fix DF__POOL_JOB_SIZE");

/* The io of j (see above).  The thread that owns j. */
static inline df__job_io *df__job_io_of(df__job *j)
{
    return (df__job_io *)(void *)((char *)j - DF__JOB_IO_BACK);
}

/* Loop thread.  Prepares j to run work(w, arg) on p for `owner` (NULL,
 * or an object that starts with a `const df__job_ops *`). */
static inline void df__job_init(df__job *j, df_pool *p, void *owner,
                                df_work_fn work, void *arg)
{
    df__ilink_init(&j->h.link); /* node.run is set when it is posted */
    j->h.queued = false;
    j->h.handed = false;
    atomic_init(&j->h.w.cancelled, false);
    j->pool = p;
    j->h.owner = owner;
    df__job_io *io = df__job_io_of(j);
    io->in.work = work;
    io->in.arg = arg;
}
/* Loop thread.  Queues j; the pool must accept work (df__pool_accepts).
 * Runs no user code. */
void df__pool_start(df_pool *p, df__job *j);
/* Loop thread.  Takes j off its pool's queue if it is still queued
 * (true: the caller completes it; done() is not called), else sets the
 * flag df_work_cancelled() reads (false). */
bool df__job_unqueue(df__job *j);
/* Loop thread, in done(): the job's final result, taken from it: work's
 * result, or DF_ECANCELLED if status says so or the job was cancelled
 * while it ran, or DF_EINVAL if work returned df_wait().  Once only.
 * `loop` is the job's, read by the caller before it ran any user code:
 * that code may have freed the job's pool. */
df_result df__job_result_slow(df__job *j, int status, df_loop *loop);
/* Loop thread, in done(): true in the common case, where the job's final
 * result is what work returned, as it lies in its io: work ran, was not
 * cancelled, returned no df_wait(). */
static inline bool df__job_result_ready(df__job *j, int status)
{
    return status == 0 && df__job_io_of(j)->result.wait == NULL &&
           !atomic_load_explicit(&j->h.w.cancelled, memory_order_relaxed);
}
static inline df_result df__job_result(df__job *j, int status,
                                       df_loop *loop)
{
    if (df__job_result_ready(j, status))
        return df__job_io_of(j)->result;
    return df__job_result_slow(j, status, loop);
}
/* The first members of struct df_pool (pool.c checks the layout), so that
 * the hot paths read the pool's state inline.  Loop thread. */
enum df__pool_state {
    DF__POOL_OPEN,
    DF__POOL_DRAINING, /* shutdown(DRAIN): takes the jobs handed tokens   */
    DF__POOL_CLOSING,  /* shutdown(CANCEL), or the end of a drain         */
    DF__POOL_DOWN
};
typedef struct df__pool_head {
    df_loop *loop;    /* immutable */
    int state;        /* enum df__pool_state; loop thread */
    size_t inflight;  /* started, completion not dispatched; loop thread */
    size_t *jobs;     /* the loop's count of jobs in flight (immutable
                       * pointer; loop thread) */
} df__pool_head;

/* The loop p was made from.  Any thread. */
static inline df_loop *df__pool_loop(const df_pool *p)
{
    return ((const df__pool_head *)(const void *)p)->loop;
}
/* Loop thread.  True while p is open to new work from the application. */
static inline bool df__pool_open(const df_pool *p)
{
    return ((const df__pool_head *)(const void *)p)->state == DF__POOL_OPEN;
}
/* Loop thread.  True while p takes jobs: open, or draining (a drain runs
 * the jobs that finishing jobs hand their tokens to). */
static inline bool df__pool_accepts(const df_pool *p)
{
    return ((const df__pool_head *)(const void *)p)->state <=
           DF__POOL_DRAINING;
}

/* Loop thread: the first step of a job's inbox function (its owner's
 * df__job_ops.posted, or the pool's own): the job is out of the pool's
 * hands.  A job whose worker handed its token on to the next job
 * (`handed`) leaves the count as it is: that next job counts from now,
 * and its own completion comes after this one. */
static inline df__job *df__job_posted(df__inbox_node *n, int status)
{
    DF__UNUSED(status);
    DF__HOT_ASSERT(status == 0); /* loops refuse to die while pools exist */
    df__job *j = DF__CONTAINER_OF(n, df__job, h.node);
    if (!j->h.handed) {
        df__pool_head *h = (df__pool_head *)(void *)j->pool;
        DF__HOT_ASSERT(h->inflight > 0 && *h->jobs > 0);
        h->inflight--;
        --*h->jobs;
    }
    return j;
}

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
