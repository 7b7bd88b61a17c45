/* SPDX-License-Identifier: MIT */
/* DeferredSemaphore and DeferredLock: one FIFO line of waiters of every
 * kind, tokens handed out iteratively, and handed on by pool workers. */
#include <string.h>

#include "sem-internal.h"

/* Helgrind sees no order in C11 atomics, so the hand-over of a waiter
 * through the lock-free end of the line is told to it (nothing without
 * valgrind's headers). */
#include "annotate.h"

/*
 * The line
 * ========
 * A semaphore has `tokens` free tokens and ONE FIFO line of waiters of
 * every kind: plain acquires, df_sem_run, and pool jobs (df_sem_run_in_pool
 * and the map's items, sem-internal.h).  Invariant: while anyone waits, no
 * token is free (tokens > 0 implies the line is empty), because a token
 * given back with a waiter in line goes to that waiter.  A token goes to
 * the head of the line, always, so the order is exact across kinds.
 *
 * Hand-off.  A pool job that holds a token and finishes looks at the line
 * from its worker (job_next): if the head is a job for the same pool, the
 * token passes to it and the worker runs it at once, with no round trip
 * through the loop thread.  Otherwise (a loop-side head, a job of another
 * pool, nobody) the token comes back on the loop thread when the finished
 * job's completion is dispatched (give_back).  Meanwhile the line is not
 * empty or no token is free, so nobody gets ahead of its head.
 *
 * The line's end.  The loop thread appends without the lock: it pushes
 * the waiter on `incoming`, a lock-free stack of runs (one waiter, or a
 * run of held jobs, below) that only it pushes on.  Whoever reads the line
 * under s->mu and finds the line proper empty, or looks for one waiter,
 * first moves `incoming` to the line's end, newest run last, so the line
 * is always the line proper followed by `incoming`, oldest first.
 * Once the tokens are all taken, an eager burst of N df_sem_run_in_pool
 * calls therefore takes no lock.
 *
 * Held jobs.  A job of df__sem_job_run (the map's) may be held back on
 * the loop thread while 128 or more waiters are in the line: held jobs
 * are in line (in order, counted as waiting) but out of the workers'
 * sight, and reach `incoming` as one run of up to 64 (one compare-and-
 * swap, and a worker links the run in by its two ends).  Every loop-side
 * reader of the line, and every other waiter joining it, releases them
 * first, so the order stays exact; the map releases them at the end of
 * each turn of the loop (sem-internal.h).
 *
 * Locks.  s->mu protects the line proper and the state of each waiter on
 * it, since workers pop pool jobs from it.  The number waiting is
 * `appended` (loop thread) less `left`, which counts under the lock the
 * waiters that left the line (an atomic, so that df_sem_waiting reads it
 * without the lock).  s->mu is a leaf: taken
 * with no other library lock held, and released before a job is queued on
 * a pool (pool.c states the one rule for every lock).  Everything else
 * (tokens, acquired, the ready list, the dispatcher flags, the pool
 * registrations) belongs to the loop thread: workers never change
 * `tokens`, since a hand-off keeps the token held.
 *
 * Waiters and their states (every transition on the loop thread, except
 * WAITING -> STARTED of a job, which a worker may make under s->mu):
 *
 *   acquire:  WAITING --token--> READY --dispatcher--> fired, freed
 *             WAITING --cancel--> freed (its deferred fails)
 *   run:      WAITING --token--> READY --dispatcher--> CALLING (fn runs)
 *               --fn returned a pending deferred--> RUNNING
 *               --result known--> token back, *out fires, freed
 *             WAITING --cancel--> freed, *out fails with DF_ECANCELLED
 *   job:      WAITING --token (give_back, or a worker's hand-off)-->
 *               STARTED (on its pool) --done--> token back unless handed
 *               on, finish()
 *             WAITING --cancel--> finish(DF_ECANCELLED)
 *             WAITING --its pool stops--> FAILED --> finish(DF_ESHUTDOWN)
 *
 * No recursion.  Twisted's release() fires the next waiter's deferred,
 * whose callbacks may release again, which fires the next one, and so on:
 * the stack grows with the number of waiters.  Here every path that runs
 * user code on behalf of the semaphore does so between sem_enter() and
 * sem_leave().  The outermost of those frames is the dispatcher: it starts
 * the waiters of `ready` one after another.  A release made while a
 * dispatcher is active only moves the head of the line to `ready` (or
 * frees the token) and returns.  A df_sem_run() made while a dispatcher is
 * active is likewise queued on `ready` instead of calling its function at
 * once.  The stack depth is therefore bounded whatever the number of
 * waiters or of chained runs.  A plain acquire that finds a free token
 * fires its new deferred at once even inside a dispatch: that deferred has
 * no callbacks yet, so firing it runs no user code.
 *
 * Over-release.  Tokens held by df_sem_run and pool jobs come back only
 * through the library; df_sem_release gives back only tokens taken by
 * df_sem_acquire (`acquired` counts them), so tokens never exceed the
 * limit and a run's give-back never finds its token already returned.
 *
 * Deferred deletion.  User code run by the dispatcher may free the
 * semaphore (typically in the callback of the last run).  df_sem_free()
 * then only marks it; the dispatcher frees it when it unwinds.  No code
 * touches the semaphore after running user code except the dispatcher.
 *
 * Pools.  A pool job that has to wait registers the semaphore as a client
 * of its pool (one `reg` per pool, kept until the pool stops or the
 * semaphore goes): when the pool stops taking work, the semaphore fails
 * that pool's jobs in its line with DF_ESHUTDOWN at once.
 */

/* The fields fall in three groups, each on cache lines of its own, so
 * that the workers' traffic on the line (its mutex, `incoming`) does not
 * evict what the loop thread reads for every job it submits or finishes:
 * with one group, the map's loop thread missed on `job_ops`, `finish` and
 * `tokens` once per item. */
#define SEM_LINE 64
struct df_sem {
    /* Set when made, read by every thread. */
    const df__job_ops *job_ops; /* first: its jobs' owner (pool-internal.h) */
    df_loop *loop;
    df__sem_job_fn finish;    /* how its pool jobs end                    */
    unsigned limit;
    bool internal;            /* df__sem_new: not counted on the loop     */
    char pad0[SEM_LINE];
    /* Loop thread only. */
    unsigned tokens;          /* free now                                 */
    unsigned acquired;        /* held through df_sem_acquire              */
    size_t appended;          /* waiters ever put on the line             */
    df__ilink *held;          /* jobs not yet on `incoming`: the oldest,  */
    df__ilink *held_last;     /* ... the newest (linked both ways)        */
    unsigned nheld;           /* how many                                 */
    df__ilink ready;          /* handed a token (or failed), not started  */
    df__ilink regs;           /* struct reg: pools with jobs in the line  */
    bool dispatching;         /* a sem_enter() frame is on the stack      */
    bool free_pending;        /* freed during a dispatch                  */
    size_t failing;           /* jobs on a reg's `failed` list            */
    char pad1[SEM_LINE];
    /* Shared with the workers (see above). */
    pthread_mutex_t mu;       /* the line (see above)                     */
    df__ilink line;           /* every waiter without a token, FIFO       */
    _Atomic(df__ilink *) incoming; /* the line's newest end (see above)   */
    atomic_size_t left;       /* waiters that left the line (under mu)    */
    char pad2[SEM_LINE];
};

struct df_lock {
    struct df_sem sem;
};

enum waiter_kind { W_ACQUIRE, W_RUN, W_JOB };
enum waiter_state {
    ST_WAITING, ST_READY, ST_CALLING, ST_RUNNING, ST_STARTED, ST_FAILED,
    ST_DONE
};

/* An acquire and a run (a run is an acquire that calls fn). */
typedef struct sem_node {
    df__waiter w;
    df_deferred *d;        /* acquire: its deferred; run: *out.  Ref.   */
} sem_node;

typedef struct sem_run {
    sem_node node;
    df_run_fn fn;
    void *arg;
    df_deferred *inner;    /* fn's pending deferred (RUNNING).  Ref.    */
    bool cancel_requested; /* *out was cancelled while fn was running   */
} sem_run;

_Static_assert(sizeof(sem_run) <= DF__JOB_SIZE, "raise DF__JOB_SIZE");

/* The registration of a semaphore with a pool. */
typedef struct reg {
    df__pool_client client;
    df__ilink link;        /* s->regs */
    df_sem *sem;
    df__ilink failed;      /* taken off the line by reg_stopped         */
} reg;

#define WAITER_OF(l) DF__ILIST_ENTRY(l, df__waiter, link)
#define NODE_OF(wp) DF__CONTAINER_OF(wp, sem_node, w)
#define RUN_OF(wp) DF__CONTAINER_OF(wp, sem_run, node.w)
#define JOB_OF(wp) DF__CONTAINER_OF(wp, df__sem_job, job.h)
#define SEM_OF(wp) ((df_sem *)(wp)->owner)

static void run_start(sem_run *run);
static void acquire_start(df_sem *s, sem_node *n);
static void job_fail(df_sem *s, df__sem_job *sj, int code);
static void rip_finish(df__sem_job *sj, df_result r);

/* ------------------------------------------------------------ dispatcher */

/* Returns true when the caller is the outermost frame (the dispatcher). */
static bool sem_enter(df_sem *s)
{
    bool outer = !s->dispatching;
    s->dispatching = true;
    return outer;
}

static void reg_free(reg *r)
{
    df__pool_client_remove(&r->client);
    df__ilist_remove(&r->link);
    df__free(r->sem->loop, r);
}

static void sem_destroy(df_sem *s)
{
    assert(df__ilist_empty(&s->line) && df__ilist_empty(&s->ready) &&
           atomic_load_explicit(&s->incoming, memory_order_relaxed) == NULL &&
           s->held == NULL);
    df__ilink *l;
    while ((l = df__ilist_first(&s->regs)) != NULL)
        reg_free(DF__ILIST_ENTRY(l, reg, link));
    pthread_mutex_destroy(&s->mu);
    if (!s->internal)
        df__loop_objects_add(s->loop, -1);
    df__free(s->loop, s);
}

/* The outermost frame starts every waiter that has been handed a token,
 * in order, then frees the semaphore if that was asked for meanwhile.
 * Inner frames return at once: they must not touch `s` after running user
 * code, since only the dispatcher knows that it is still alive. */
static void sem_leave(df_sem *s, bool outer)
{
    if (!outer)
        return;
    df__ilink *l;
    while ((l = df__ilist_pop(&s->ready)) != NULL) {
        df__waiter *w = WAITER_OF(l);
        if (w->kind == W_ACQUIRE)
            acquire_start(s, NODE_OF(w));
        else if (w->kind == W_RUN)
            run_start(RUN_OF(w));
        else
            job_fail(s, JOB_OF(w), DF_ESHUTDOWN);
    }
    s->dispatching = false;
    if (s->free_pending)
        sem_destroy(s);
}

/* Pushes a run of waiters, first..last (oldest..newest, linked both ways
 * between them), on `incoming`, with no lock.  On the stack, a run's
 * first->prev points at its last, whose next points at the first of the
 * next older run, so that a worker taking the stack touches two waiters
 * per run, not every waiter (line_take_incoming).  Loop thread (the only
 * pusher, so a waiter taken off the stack is never seen again: no ABA). */
static inline void line_push(df_sem *s, df__ilink *first, df__ilink *last)
{
    first->prev = last;
    df__ilink *top = atomic_load_explicit(&s->incoming, memory_order_relaxed);
    do {
        last->next = top;
        ANNOTATE_HAPPENS_BEFORE(&s->incoming);
    } while (!atomic_compare_exchange_weak_explicit(
        &s->incoming, &top, first, memory_order_release,
        memory_order_relaxed));
}

/* Puts the held jobs (line_hold) at the end of the line.  Loop thread;
 * every loop-side reader of the line calls it first. */
static inline void line_release_held(df_sem *s)
{
    if (s->held == NULL)
        return;
    line_push(s, s->held, s->held_last);
    s->held = NULL;
    s->nheld = 0;
}

/* Puts a waiter at the end of the line, with no lock: on `incoming`
 * (after the held jobs, which are older).  Loop thread. */
static inline void line_append(df_sem *s, df__waiter *w)
{
    w->state = ST_WAITING;
    s->appended++;
    line_release_held(s);
    line_push(s, &w->link, &w->link);
}

/* The longest run of jobs df__sem_job_run holds back before it puts them
 * on the line as one run (sem-internal.h), and the fewest waiters the
 * workers must see in the line for a run to start: so that holding back
 * never leaves a worker without a job to take unless it finishes
 * SEM_HOLD_FLOOR - SEM_HOLD_MAX jobs within one turn of the loop.  A line
 * that short (a map whose read-ahead is small, because its items are
 * slow) gets its jobs one by one, at once. */
#define SEM_HOLD_MAX 64
#define SEM_HOLD_FLOOR 128

/* Like line_append, but the job may join the held ones, which go on the
 * line as one run when SEM_HOLD_MAX of them are held, when anything reads
 * or joins the line from the loop thread, or at df__sem_release_held.
 * Until then no worker can see it, but it is in line: it has its place in
 * the order and counts as waiting.  The loop thread links the run while
 * its waiters are in its cache.  Loop thread. */
static inline void line_hold(df_sem *s, df__waiter *w)
{
    if (s->held == NULL) {
        /* A look at the workers' side of the line, once per run. */
        size_t seen = s->appended -
                      atomic_load_explicit(&s->left, memory_order_relaxed);
        if (seen < SEM_HOLD_FLOOR) {
            line_append(s, w);
            return;
        }
    }
    w->state = ST_WAITING;
    s->appended++;
    if (s->held == NULL) {
        s->held = &w->link;
    } else {
        s->held_last->next = &w->link;
        w->link.prev = s->held_last;
    }
    s->held_last = &w->link;
    if (++s->nheld >= SEM_HOLD_MAX)
        line_release_held(s);
}

/* Under s->mu: moves `incoming` to the end of the line, oldest first.
 * The stack holds runs, newest first (line_push); each run popped from
 * it goes right after the line's old tail, ahead of the newer ones placed
 * before it: one pass over the runs, touching the two ends of each. */
static void line_take_incoming(df_sem *s)
{
    if (atomic_load_explicit(&s->incoming, memory_order_relaxed) == NULL)
        return;
    df__ilink *first =
        atomic_exchange_explicit(&s->incoming, NULL, memory_order_acquire);
    ANNOTATE_HAPPENS_AFTER(&s->incoming);
    df__ilink *tail = s->line.prev; /* the line's old tail, or its head */
    df__ilink *after = &s->line;    /* what follows the next run placed */
    while (first != NULL) {
        df__ilink *last = first->prev;
        df__ilink *older = last->next;
        first->prev = tail;
        last->next = after;
        after->prev = last;
        after = first;
        first = older;
    }
    tail->next = after;
}

/* Under s->mu: the head of the line, or NULL. */
static df__ilink *line_first_locked(df_sem *s)
{
    df__ilink *l = df__ilist_first(&s->line);
    if (l == NULL) {
        line_take_incoming(s);
        l = df__ilist_first(&s->line);
    }
    return l;
}

/* Under s->mu: takes w off the line. */
static void line_remove_locked(df_sem *s, df__waiter *w)
{
    df__ilist_remove(&w->link);
    /* A locked add, which helgrind understands (a plain store would be
     * reported against df_sem_waiting's lock-free read). */
    atomic_fetch_add_explicit(&s->left, 1, memory_order_relaxed);
}

/* Takes w off the line if it is still waiting (a worker may have started
 * it).  Loop thread. */
static bool line_leave(df_sem *s, df__waiter *w)
{
    line_release_held(s);
    pthread_mutex_lock(&s->mu);
    line_take_incoming(s);
    bool waiting = w->state == ST_WAITING;
    if (waiting)
        line_remove_locked(s, w);
    pthread_mutex_unlock(&s->mu);
    return waiting;
}

/* Gives a held token back: straight to the head of the line if there is
 * one (a pool job is queued on its pool; a loop-side waiter moves to
 * `ready` and the dispatcher starts it), else to the free tokens.  A job
 * whose pool takes no more work moves to `ready` as FAILED and the token
 * goes to the next in line.  Runs no user code.  Loop thread. */
static void give_back(df_sem *s)
{
    line_release_held(s);
    pthread_mutex_lock(&s->mu);
    for (;;) {
        df__ilink *l = line_first_locked(s);
        if (l == NULL) {
            pthread_mutex_unlock(&s->mu);
            assert(s->tokens < s->limit);
            s->tokens++;
            return;
        }
        df__waiter *w = WAITER_OF(l);
        line_remove_locked(s, w);
        if (w->kind != W_JOB) {
            pthread_mutex_unlock(&s->mu);
            if (w->kind == W_ACQUIRE)
                s->acquired++;
            w->state = ST_READY;
            df__ilist_append(&s->ready, &w->link);
            return;
        }
        df__sem_job *sj = JOB_OF(w);
        if (!df__pool_accepts(sj->job.pool)) {
            w->state = ST_FAILED;
            df__ilist_append(&s->ready, &w->link);
            continue;
        }
        w->state = ST_STARTED;
        pthread_mutex_unlock(&s->mu);
        df__pool_start(sj->job.pool, &sj->job);
        return;
    }
}

static void acquire_start(df_sem *s, sem_node *n)
{
    df_deferred *d = n->d; /* n lives in d's block: not touched after */
    /* Only misuse (the application firing an acquire deferred itself) can
     * make this fail; the token then goes to the next in line. */
    if (df_deferred_callback(d, NULL, NULL) != 0) {
        s->acquired--;
        give_back(s);
    }
    df_deferred_unref(d);
}

/* ---------------------------------------------------------------- run */

/* fn's result is known: give the token back, then hand the result to
 * *out, so that *out's callbacks already see the token back.  Consumes r. */
static void run_finish(sem_run *run, df_result r)
{
    df_sem *s = SEM_OF(&run->node.w);
    df_deferred *out = run->node.d;
    df_deferred *inner = run->inner;
    bool outer = sem_enter(s);

    give_back(s);
    /* run lives in out's block: not touched after this. */
    if (df_deferred_resolve(out, r) != 0)
        df_result_clear(&r); /* *out was fired by someone else: misuse */
    df_deferred_unref(out);
    df_deferred_unref(inner);
    sem_leave(s, outer);
}

/* The callback and errback on fn's deferred. */
static df_result run_inner_done(df_result r, void *arg)
{
    run_finish(arg, r);
    return df_ok(NULL, NULL);
}

/* Calls fn for a run that holds a token.  Always called inside a
 * dispatch. */
static void run_start(sem_run *run)
{
    df_sem *s = SEM_OF(&run->node.w);

    run->node.w.state = ST_CALLING;
    df_result r = run->fn(run->arg);
    if (r.wait == NULL) {
        run_finish(run, r);
        return;
    }

    df_deferred *inner = r.wait;
    bool cancel = run->cancel_requested;
    run->inner = inner;
    run->node.w.state = ST_RUNNING;
    /* If *out was cancelled while fn ran, the cancel goes to fn's deferred
     * now; our reference keeps it alive after run_finish drops run's. */
    if (cancel)
        df_deferred_ref(inner);
    int rc = df_deferred_add_both(inner, run_inner_done, run);
    if (rc != 0) {
        /* We cannot learn when fn's deferred fires: report that on *out.
         * run_finish drops the reference df_wait() gave us. */
        run_finish(run, df_errf(s->loop, rc,
                                "df_sem_run: cannot wait for the function's "
                                "deferred: %s", df_strerror(rc)));
    } else if (cancel) {
        df_deferred_cancel(inner);
    }
    if (cancel)
        df_deferred_unref(inner);
    /* `run` may be gone now: run_inner_done may have run already. */
}

/* ------------------------------------------------------------ cancelling */

/* The canceller of a waiting acquire's deferred and of df_sem_run's *out.
 * df_deferred_cancel() holds a reference to d while this runs. */
static void sem_cancel(df_deferred *d, void *arg)
{
    sem_node *n = arg;
    df_sem *s = SEM_OF(&n->w);
    bool outer;

    assert(n->d == d);
    switch (n->w.state) {
    case ST_WAITING:
        /* Still in line: leave the line.  No token changes hands. */
        line_leave(s, &n->w);
        if (n->w.kind == W_RUN) {
            /* *out waits for its producer on cancel (see df_sem_run), so
             * fail it here; fn never runs. */
            outer = sem_enter(s);
            df_deferred_errback(d, df_failure_new(s->loop, DF_ECANCELLED,
                                                  NULL));
            df_deferred_unref(d);
            sem_leave(s, outer);
        } else {
            /* df_deferred_cancel fails d once we return. */
            df_deferred_unref(d);
        }
        break;
    case ST_READY:
        /* The token was handed over when it was released, exactly as if
         * Twisted's release() had fired the waiter then: the acquisition
         * has happened and the cancel comes too late.  Start the waiter
         * now, so that an acquire fires with success and a run's cancel
         * goes to fn's deferred, as in Twisted. */
        df__ilist_remove(&n->w.link);
        outer = sem_enter(s);
        if (n->w.kind == W_ACQUIRE) {
            acquire_start(s, n);
        } else {
            RUN_OF(&n->w)->cancel_requested = true;
            run_start(RUN_OF(&n->w));
        }
        sem_leave(s, outer);
        break;
    case ST_CALLING:
        /* fn is running: cancel what it returns, once it has returned. */
        RUN_OF(&n->w)->cancel_requested = true;
        break;
    case ST_RUNNING: {
        /* Forward to fn's deferred; *out fires with whatever that gives,
         * after the token is back.  Hold a reference: run_finish may drop
         * the node's reference to it while the cancel is under way. */
        df_deferred *inner = df_deferred_ref(RUN_OF(&n->w)->inner);
        df_deferred_cancel(inner);
        df_deferred_unref(inner);
        break;
    }
    default:
        assert(!"bad semaphore waiter state");
    }
}

/* -------------------------------------------------------------- pool jobs */

/* Worker thread: j has returned and holds a token of its semaphore.  If
 * the head of the line is a job for the same pool, the token passes to it
 * and the worker runs it next. */
static df__job *job_next(df__job *j)
{
    df_sem *s = j->h.owner;
    df__job *next = NULL;
    pthread_mutex_lock(&s->mu);
    df__ilink *l = line_first_locked(s);
    if (l != NULL) {
        df__waiter *w = WAITER_OF(l);
        if (w->kind == W_JOB && JOB_OF(w)->job.pool == j->pool) {
            line_remove_locked(s, w);
            w->state = ST_STARTED;
            next = &JOB_OF(w)->job;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return next;
}

/* Loop thread: the pool is done with the job.  The token goes back first
 * (unless the worker handed it on), which may start loop-side waiters
 * whose callbacks cancel this job: the result is read afterwards, so that
 * such a cancel still counts.  The owner's finish comes last, outside the
 * dispatch: it may free what embeds the job. */
static void job_give_back(df_sem *s)
{
    bool outer = sem_enter(s);
    give_back(s);
    sem_leave(s, outer);
}

/* df_sem_run_in_pool's finish: its job lives in its deferred's block
 * (struct rip, below), at the start of the job's room. */
static inline void rip_resolve(df__sem_job *sj, df_result r)
{
    /* Fires the deferred and drops the job's reference: may free the
     * block. */
    df__deferred_resolve_drop(df__job_deferred(sj), r);
}

/* The jobs' done (pool-internal.h), every case: the token goes back here
 * unless the worker handed it on, then the owner's finish gets the
 * result.  The jobs of a semaphore made by df_sem_new or df_lock_new
 * (df_sem_run_in_pool's) come here from rip_job_done, the map's from
 * finish_job_done (out of line, so that those save no registers). */
static DF__NOINLINE void job_done(df__job *j, int status)
{
    j->h.state = ST_DONE;
    df__sem_job *sj = DF__CONTAINER_OF(j, df__sem_job, job);
    df_sem *s = j->h.owner;
    /* Giving the token back may run user code that frees s, or the job's
     * pool: what is needed after it is read before. */
    df__sem_job_fn finish = s->finish;
    df_loop *loop = s->loop;
    if (!j->h.handed)
        job_give_back(s);
    if (finish == rip_finish) {
        /* The common finish, called directly. */
        if (df__job_result_ready(j, status))
            df__deferred_resolve_io_drop(df__job_deferred(sj));
        else
            rip_resolve(sj, df__job_result(j, status, loop));
        return;
    }
    finish(sj, df__job_result(j, status, loop));
}

/* The done of df_sem_run_in_pool's jobs (their semaphore's finish is
 * rip_finish: sem_make picks these ops).  The common case: the job handed
 * its token on and its result is work's, which goes from where the worker
 * wrote it to the callbacks.  No state to record first: nothing can
 * cancel the job once its deferred has fired (df_deferred_cancel does not
 * call the canceller of a fired deferred), and until then no user code
 * runs. */
static void rip_job_done(df__job *j, int status)
{
    if (j->h.handed && df__job_result_ready(j, status)) {
        df__deferred_resolve_io_drop(df__job_deferred(j));
        return;
    }
    job_done(j, status);
}

/* The done of the jobs of a semaphore with a finish of its own
 * (df__sem_new: the map's).  The common case, as in rip_job_done: the
 * token went on and the result is work's, which goes to finish from where
 * the worker wrote it, with no registers to save. */
static void finish_job_done(df__job *j, int status)
{
    if (j->h.handed && df__job_result_ready(j, status)) {
        j->h.state = ST_DONE;
        df_sem *s = j->h.owner;
        s->finish(DF__CONTAINER_OF(j, df__sem_job, job),
                  df__job_io_of(j)->result);
        return;
    }
    job_done(j, status);
}

/* df_deferred_cancel() on df_sem_run_in_pool's deferred (its job lives in
 * the deferred's block); a map cancels its jobs directly. */
static void job_cancel(df__job *j)
{
    df__sem_job_cancel(DF__CONTAINER_OF(j, df__sem_job, job));
}

static void job_posted(df_loop *loop, df__inbox_node *n, int status);

/* The ops of the map's semaphores, and of df_sem_run_in_pool's.  Both
 * have the same inbox function: a pool learns one (pool.c, `direct`). */
static const df__job_ops sem_job_ops = {job_next, finish_job_done,
                                        job_cancel, job_posted};
static const df__job_ops rip_job_ops = {job_next, rip_job_done, job_cancel,
                                        job_posted};

/* Its jobs' inbox function (df__job_ops.posted): the pool's accounting,
 * then the ops' done, called directly, with no call through the pool in
 * between. */
static void job_posted(df_loop *loop, df__inbox_node *n, int status)
{
    DF__UNUSED(loop);
    df__job *j = df__job_posted(n, status);
    if (((const df_sem *)j->h.owner)->job_ops == &rip_job_ops)
        rip_job_done(j, 0);
    else
        finish_job_done(j, 0);
}

#define SHUTDOWN_MSG "pool shut down before the job got a semaphore token"

static void job_fail(df_sem *s, df__sem_job *sj, int code)
{
    s->finish(sj, df_err(df_failure_new(
                      s->loop, code,
                      code == DF_ECANCELLED ? "pool job cancelled"
                                            : SHUTDOWN_MSG)));
}

/* A pool of s stops taking work: its jobs leave the line at once (no
 * user code runs here), and reg_flush fails them. */
static void reg_stopped(df__pool_client *c, df_pool *p)
{
    reg *r = DF__CONTAINER_OF(c, reg, client);
    df_sem *s = r->sem;
    line_release_held(s);
    pthread_mutex_lock(&s->mu);
    line_take_incoming(s);
    df__ilink *l = df__ilist_first(&s->line);
    while (l != NULL) {
        df__ilink *next = df__ilist_next(&s->line, l);
        df__waiter *w = WAITER_OF(l);
        if (w->kind == W_JOB && JOB_OF(w)->job.pool == p) {
            line_remove_locked(s, w);
            w->state = ST_FAILED;
            df__ilist_append(&r->failed, &w->link);
            s->failing++;
        }
        l = next;
    }
    pthread_mutex_unlock(&s->mu);
}

/* Fails the jobs reg_stopped took, with DF_ESHUTDOWN.  The registration
 * goes first; s may be freed by the first failure's callbacks once the
 * last job is off its books, so s is not touched after that. */
static void reg_flush(df__pool_client *c)
{
    reg *r = DF__CONTAINER_OF(c, reg, client);
    df_sem *s = r->sem;
    df_loop *loop = s->loop;
    df__sem_job_fn finish = s->finish;
    df__ilink failed;
    df__ilist_init(&failed);
    df__ilist_splice(&failed, &r->failed);
    reg_free(r);
    df__ilink *l;
    for (l = df__ilist_first(&failed); l != NULL;
         l = df__ilist_next(&failed, l))
        s->failing--;
    while ((l = df__ilist_pop(&failed)) != NULL)
        finish(JOB_OF(WAITER_OF(l)),
               df_err(df_failure_new(loop, DF_ESHUTDOWN, SHUTDOWN_MSG)));
}

/* The registration of s with p, made on first need; NULL: out of memory. */
static reg *reg_for(df_sem *s, df_pool *p)
{
    for (df__ilink *l = df__ilist_first(&s->regs); l != NULL;
         l = df__ilist_next(&s->regs, l)) {
        reg *r = DF__ILIST_ENTRY(l, reg, link);
        if (r->client.pool == p)
            return r;
    }
    reg *r = df__malloc(s->loop, sizeof *r);
    if (r == NULL)
        return NULL;
    df__ilink_init(&r->client.link);
    r->client.stopped = reg_stopped;
    r->client.flush = reg_flush;
    r->sem = s;
    df__ilist_init(&r->failed);
    df__pool_client_add(p, &r->client);
    df__ilist_append(&s->regs, &r->link);
    return r;
}

/* df__job_init for a job of s on p, but for its io (the caller's) and
 * its link, which line_append or df__pool_start writes. */
static inline void sem_job_init(df__job *j, df_sem *s, df_pool *p)
{
    j->h.owner = s;
    j->h.kind = W_JOB;
    j->h.state = ST_WAITING;
    j->h.queued = false;
    j->h.handed = false;
    atomic_init(&j->h.w.cancelled, false);
    j->pool = p;
}

/* True when a new job of s for p simply joins the end of the line: no
 * token is free, and p is the pool of s's first registration (the usual
 * case: one pool), so the job needs no registration made.  Loop thread. */
static inline bool line_joins(const df_sem *s, const df_pool *p)
{
    const df__ilink *first = s->regs.next; /* &s->regs when empty */
    return s->tokens == 0 && first != &s->regs &&
           DF__ILIST_ENTRY(first, reg, link)->client.pool == p;
}

/* df__sem_job_run's cases but the common one: a free token, or a first
 * registration to make. */
static DF__NOINLINE int sem_job_run_slow(df_sem *s, df_pool *p,
                                         df__sem_job *sj)
{
    if (s->tokens > 0) {
        /* A free token means nobody waits. */
        s->tokens--;
        sj->job.h.state = ST_STARTED;
        df__pool_start(p, &sj->job);
        return 0;
    }
    if (reg_for(s, p) == NULL)
        return DF_ENOMEM;
    line_append(s, &sj->job.h);
    return 0;
}

int df__sem_job_run(df_sem *s, df_pool *p, df__sem_job *sj,
                    df_work_fn work, void *arg)
{
    DF__HOT_ASSERT(df__pool_accepts(p));
    sem_job_init(&sj->job, s, p);
    df__job_io *io = df__job_io_of(&sj->job);
    io->in.work = work;
    io->in.arg = arg;
    if (!line_joins(s, p))
        return sem_job_run_slow(s, p, sj);
    line_hold(s, &sj->job.h);
    return 0;
}

void df__sem_release_held(df_sem *s)
{
    line_release_held(s);
}

void df__sem_job_cancel(df__sem_job *sj)
{
    df_sem *s = sj->job.h.owner;
    if (line_leave(s, &sj->job.h)) {
        /* Still in line: it leaves holding no token. */
        job_fail(s, sj, DF_ECANCELLED);
        return;
    }
    if (sj->job.h.state == ST_DONE) {
        /* Its token is going back (job_done): the result is read next. */
        atomic_store_explicit(&sj->job.h.w.cancelled, true,
                              memory_order_relaxed);
        return;
    }
    if (sj->job.h.state != ST_STARTED)
        return; /* FAILED: it fails with DF_ESHUTDOWN anyway */
    if (df__job_unqueue(&sj->job)) {
        /* Queued, never ran: its token goes back first.  What that runs
         * may cancel the job again (DONE: only the flag, the pool being
         * perhaps gone by then). */
        sj->job.h.state = ST_DONE;
        df_loop *loop = s->loop;
        df__sem_job_fn finish = s->finish;
        bool outer = sem_enter(s);
        give_back(s);
        sem_leave(s, outer); /* may free s */
        finish(sj, df_err(df_failure_new(loop, DF_ECANCELLED,
                                         "pool job cancelled")));
    }
    /* Else running: it finishes with DF_ECANCELLED (df__job_result). */
}

/* ------------------------------------------------------------ public API */

static int sem_make(df_loop *loop, unsigned tokens, size_t size, bool internal,
                    df__sem_job_fn finish, df_sem **out)
{
    df_sem *s = df__malloc(loop, size);
    if (s == NULL)
        return DF_ENOMEM;
    memset(s, 0, size);
    int rc = pthread_mutex_init(&s->mu, NULL);
    if (rc != 0) {
        df__free(loop, s);
        return -rc;
    }
    s->job_ops = finish == rip_finish ? &rip_job_ops : &sem_job_ops;
    s->loop = loop;
    s->limit = tokens;
    s->tokens = tokens;
    s->internal = internal;
    s->finish = finish;
    atomic_init(&s->left, 0);
    atomic_init(&s->incoming, NULL);
    df__ilist_init(&s->line);
    df__ilist_init(&s->ready);
    df__ilist_init(&s->regs);
    if (!internal)
        df__loop_objects_add(loop, 1);
    *out = s;
    return 0;
}

int df_sem_new(df_loop *loop, unsigned tokens, df_sem **out)
{
    if (loop == NULL || out == NULL || tokens < 1)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    return sem_make(loop, tokens, sizeof(df_sem), false, rip_finish, out);
}

int df__sem_new(df_loop *loop, unsigned tokens, df__sem_job_fn finish,
                df_sem **out)
{
    return sem_make(loop, tokens, sizeof(df_sem), true, finish, out);
}

static size_t sem_waiting(const df_sem *s)
{
    return s->appended - atomic_load_explicit(&s->left, memory_order_relaxed);
}

void df__sem_drop(df_sem *s)
{
    assert(s->tokens == s->limit && sem_waiting(s) == 0);
    if (s->dispatching)
        s->free_pending = true;
    else
        sem_destroy(s);
}

int df_sem_free(df_sem *s)
{
    if (s == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(s->loop);
    if (s->free_pending)
        return DF_ESTATE; /* freed twice while a dispatch unwinds */
    if (s->tokens != s->limit || sem_waiting(s) != 0 ||
        !df__ilist_empty(&s->ready) || s->failing != 0)
        return DF_EBUSY;
    if (s->dispatching)
        s->free_pending = true; /* the dispatcher frees it on its way out */
    else
        sem_destroy(s);
    return 0;
}

int df_sem_acquire(df_sem *s, df_deferred **out)
{
    if (s == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(s->loop);
    if (s->free_pending)
        return DF_ESTATE;

    df_deferred *d;
    int rc;
    if (s->tokens > 0) {
        /* A free token means nobody waits (see the invariant above). */
        rc = df_deferred_new(s->loop, &d);
        if (rc != 0)
            return rc;
        rc = df_deferred_callback(d, NULL, NULL); /* runs no user code */
        if (rc != 0) {
            df_deferred_unref(d);
            return rc;
        }
        s->tokens--;
        s->acquired++;
        *out = d;
        return 0;
    }

    /* The waiter lives in its deferred's block (no allocation of its
     * own); the block is also the canceller's argument. */
    d = df__deferred_new_job(s->loop, sem_cancel, 0);
    if (d == NULL)
        return DF_ENOMEM;
    sem_node *n = df__deferred_job(d);
    memset(n, 0, sizeof *n);
    n->w.owner = s;
    /* Our own reference: the application may drop its reference while the
     * waiter waits, and it must not point at a freed deferred. */
    n->d = df__deferred_ref(d);
    n->w.kind = W_ACQUIRE;
    line_append(s, &n->w);
    *out = d;
    return 0;
}

int df_sem_release(df_sem *s)
{
    if (s == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(s->loop);
    if (s->free_pending)
        return DF_ESTATE;
    /* Only a token taken by df_sem_acquire may be released by hand: the
     * tokens of runs and pool jobs come back when those finish. */
    if (s->acquired == 0)
        return DF_EOVERRELEASE;
    s->acquired--;
    bool outer = sem_enter(s);
    give_back(s);
    sem_leave(s, outer);
    return 0;
}

int df_sem_run(df_sem *s, df_run_fn fn, void *arg, df_deferred **out)
{
    if (s == NULL || fn == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(s->loop);
    if (s->free_pending)
        return DF_ESTATE;

    /* The run lives in *out's block, which is also the canceller's
     * argument (its first member is the node). */
    /* Cancelling *out never fails it behind our back (cancel-waits): while
     * waiting, the canceller fails it; once fn's deferred is pending, *out
     * fires with what that deferred gives after the cancel, and only after
     * the token is back, so that a cancelled run never frees its token
     * early. */
    df_deferred *d =
        df__deferred_new_job(s->loop, sem_cancel, DF__DEFERRED_CANCEL_WAITS);
    if (d == NULL)
        return DF_ENOMEM;
    sem_run *run = df__deferred_job(d);
    memset(run, 0, sizeof *run);
    run->node.w.owner = s;
    run->node.d = df__deferred_ref(d);
    run->node.w.kind = W_RUN;
    run->fn = fn;
    run->arg = arg;
    *out = d;

    if (s->tokens == 0) {
        line_append(s, &run->node.w);
        return 0;
    }
    /* A free token: take it, and call fn now, unless a dispatch is under
     * way (we are inside a callback of this semaphore), in which case the
     * dispatcher calls it as soon as that callback returns. */
    s->tokens--;
    run->node.w.state = ST_READY;
    df__ilist_append(&s->ready, &run->node.w.link);
    sem_leave(s, sem_enter(s));
    return 0;
}

unsigned df_sem_tokens(const df_sem *s)
{
    return s != NULL ? s->tokens : 0;
}

unsigned df_sem_limit(const df_sem *s)
{
    return s != NULL ? s->limit : 0;
}

size_t df_sem_waiting(const df_sem *s)
{
    return s != NULL ? sem_waiting(s) : 0;
}

/* ---------------------------------------------------- run in a pool */

/* df_sem_run_in_pool's job lives in its deferred's block. */
typedef struct rip {
    df__sem_job sj; /* its deferred, df__job_deferred(rip), holds a
                     * reference for the job */
} rip;

_Static_assert(sizeof(rip) <= DF__POOL_JOB_SIZE, "raise DF__POOL_JOB_SIZE");

static void rip_finish(df__sem_job *sj, df_result r)
{
    _Static_assert(offsetof(rip, sj) == 0, "rip_resolve needs sj first");
    rip_resolve(sj, r);
}

/* df_sem_run_in_pool, every case: the checks one by one, with their
 * codes, and a job that takes a free token.  Out of line, so that the
 * common case below saves few registers. */
static DF__NOINLINE int rip_run_slow(df_sem *s, df_pool *p, df_work_fn work,
                                     void *arg, df_deferred **out)
{
    if (s == NULL || p == NULL || work == NULL || out == NULL)
        return DF_EINVAL;
    df_loop *loop = df__pool_loop(p);
    DF__CHECK_THREAD(loop);
    if (s->loop != loop)
        return DF_EINVAL;
    if (!df__pool_open(p))
        return DF_ESHUTDOWN;
    if (s->free_pending)
        return DF_ESTATE;
    /* A job that waits needs the registration with p: made first, since
     * nothing may fail once the deferred exists (it cannot be released
     * unfired, deferred-internal.h). */
    if (s->tokens == 0 && reg_for(s, p) == NULL)
        return DF_ENOMEM;
    /* Cancelling *out never fails it behind our back (cancel-waits): the
     * job fires it once the token is back (see df__sem_job_cancel).  Its
     * canceller is the job's owner's (job_cancel), and the job's io lives
     * in the deferred's result fields (deferred-internal.h).  Two
     * references: the job's and *out's. */
    df_deferred *d = df__deferred_new_pool_job(loop, work, arg);
    if (d == NULL)
        return DF_ENOMEM;
    rip *st = df__deferred_job(d);
    assert(df__job_deferred(st) == d);
    sem_job_init(&st->sj.job, s, p); /* the block holds its io */
    if (s->tokens > 0) {
        /* A free token means nobody waits. */
        s->tokens--;
        st->sj.job.h.state = ST_STARTED;
        df__pool_start(p, &st->sj.job);
    } else {
        line_append(s, &st->sj.job.h);
    }
    *out = d;
    return 0;
}

/* The common case of an eager burst takes few registers and few tests:
 * the tokens are all taken (so s is not being freed: df_sem_free wants
 * them all back, and nothing takes one after that), and p is the pool of
 * s's first registration (so it was checked to be of s's loop, and is
 * alive: a pool that stops takes its registrations back) and open.  The
 * job then joins the line, which runs no user code and takes no lock.
 * Anything else (an argument to refuse, a free token, another pool, a
 * wrong thread) goes the long way, rip_run_slow. */
int df_sem_run_in_pool(df_sem *s, df_pool *p, df_work_fn work, void *arg,
                       df_deferred **out)
{
    if (s == NULL || p == NULL || work == NULL || out == NULL)
        return rip_run_slow(s, p, work, arg, out);
    df_loop *loop = s->loop;
    if (!df__on_loop_thread(loop) || !line_joins(s, p) || !df__pool_open(p))
        return rip_run_slow(s, p, work, arg, out);
    DF__HOT_ASSERT(!s->free_pending && df__pool_loop(p) == loop);
    df_deferred *d = df__deferred_new_pool_job(loop, work, arg);
    if (d == NULL)
        return DF_ENOMEM;
    rip *st = df__deferred_job(d);
    sem_job_init(&st->sj.job, s, p); /* the block holds its io */
    line_append(s, &st->sj.job.h);
    *out = d;
    return 0;
}

/* ------------------------------------------------------------------ lock */

/* A lock is a semaphore of one token; it shares every code path above. */

int df_lock_new(df_loop *loop, df_lock **out)
{
    if (loop == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    df_sem *s;
    int rc = sem_make(loop, 1, sizeof(df_lock), false, rip_finish, &s);
    if (rc == 0)
        *out = DF__CONTAINER_OF(s, df_lock, sem);
    return rc;
}

int df_lock_free(df_lock *l)
{
    return l != NULL ? df_sem_free(&l->sem) : DF_EINVAL;
}

int df_lock_acquire(df_lock *l, df_deferred **out)
{
    return l != NULL ? df_sem_acquire(&l->sem, out) : DF_EINVAL;
}

int df_lock_release(df_lock *l)
{
    return l != NULL ? df_sem_release(&l->sem) : DF_EINVAL;
}

int df_lock_run(df_lock *l, df_run_fn fn, void *arg, df_deferred **out)
{
    return l != NULL ? df_sem_run(&l->sem, fn, arg, out) : DF_EINVAL;
}

bool df_lock_locked(const df_lock *l)
{
    return l != NULL && l->sem.tokens == 0;
}
