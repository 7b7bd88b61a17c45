/* SPDX-License-Identifier: MIT */
/* The fixed thread pool: FIFO work queue, submit, cancel, shutdown. */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "deferred-internal.h"

/*
 * Threads and locks
 * =================
 * pool->mu protects the work queue (head/tail and each queued job's
 * prev/next/state), `idle` and `stopping`.  Lock order: pool->mu is never
 * held while taking another lock; in particular a worker posts a completion
 * to the loop's inbox (inbox_lock, a leaf) only after releasing pool->mu, and
 * never runs the work function or any user code under it.
 *
 * Everything else (the job free list, `inflight`, `state`, the thread array)
 * is touched only on the loop thread.
 *
 * A job's life: submit takes a node from the free list, makes the deferred
 * and queues the node (QUEUED).  A worker unlinks it (RUNNING), calls work()
 * with no lock held, stores the result in the node and posts the node itself
 * to the loop's inbox.  The loop runs job_complete(), which puts the node
 * back on the free list *before* firing the deferred, so that callbacks may
 * submit, shut down or free the pool.  A queued job cancelled on the loop
 * thread is unlinked and failed at once; a running one gets its `cancelled`
 * flag set and fails with DF_ECANCELLED when its completion is dispatched.
 */

enum job_state {
    JOB_QUEUED,  /* on the work queue */
    JOB_RUNNING, /* taken by a worker; completion not yet dispatched */
    JOB_TAKEN,   /* removed from the queue by shutdown(CANCEL) */
    JOB_GATED    /* in a semaphore's gate, waiting for a token */
};

struct df_work {
    atomic_bool cancelled; /* set by the canceller, read by the worker */
    df_loop *loop;
};

typedef struct job {
    df__inbox_node node;     /* the inbox entry once work() has returned */
    struct job *prev, *next; /* work queue (pool->mu), or the free list */
    df_pool *pool;
    df_work_fn work;
    void *arg;
    df_deferred *d;   /* the job's own reference */
    df_result result; /* written by the worker before posting */
    int state;        /* enum job_state, protected by pool->mu, or by
                         gate->mu while JOB_GATED */
    bool handed;      /* the worker passed the token to the next job */
    bool embedded;    /* lives in its deferred's block (gated jobs) */
    bool gated;       /* on a gate's line (gate->mu) */
    bool done;        /* completion being dispatched (loop thread) */
    df__gate *gate;   /* holds, or waits for, a token of gate->sem */
    uint64_t ticket;  /* JOB_GATED: FIFO order in the semaphore */
    df_work w;
} job;

/*
 * The semaphore gate: df_sem_run_in_pool's fast path
 * ==================================================
 * A semaphore used with a pool gets a gate: a FIFO of jobs waiting for one
 * of its tokens, under the gate's own mutex so that pool threads can read
 * it.  A job that has a token runs as usual; when its work returns, the
 * worker looks at the gate and, if the first job there comes before every
 * loop-side waiter of the semaphore (tickets), takes it and runs it at
 * once: the token passes from job to job with no round trip through the
 * loop thread, and the number of jobs holding tokens never changes.  The
 * finished job's completion still goes to the loop, in order, and fires
 * its deferred there; a completion whose token was not handed on gives the
 * token back to the semaphore (which may pass it to the gate's first job,
 * df__gate_take) before the deferred fires.  Completions of handed-on
 * jobs are posted without a wake-up: the loop picks them up within
 * DF__LAZY_MS, in batches, instead of waking once per job.
 *
 * A gate serves one pool at a time (the first it is used with); a
 * semaphore used with another pool meanwhile takes the general path.
 * gate->mu is a leaf lock: never held while taking pool->mu or the inbox
 * lock.
 */
struct df__gate {
    df_sem *sem;             /* immutable */
    df_pool *pool;           /* loop thread; NULL once the pool is gone */
    df__gate *pool_next;     /* the pool's gates (loop thread) */
    pthread_mutex_t mu;      /* protects head, tail, loop_ticket, and the
                                state of the jobs on the line */
    job *head, *tail;        /* waiting jobs, FIFO (linked by next/prev) */
    uint64_t loop_ticket;    /* first loop-side waiter; UINT64_MAX: none */
    atomic_size_t waiting;   /* jobs on the line */
};

enum pool_state { POOL_OPEN, POOL_SHUTTING, POOL_DOWN };

/* Job nodes kept for reuse; beyond this, completed nodes are freed. */
#define JOB_FREE_MAX 4096

struct df_pool {
    df_loop *loop; /* immutable */

    /* mu protects head, tail, idle, signaled, stopping and queued jobs'
     * links and state.  Never held while taking any other lock. */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* workers wait here for work or stop */
    job *head, *tail;
    unsigned idle;     /* workers waiting on cv */
    unsigned signaled; /* signals sent that no worker has woken for yet */
    bool stopping;     /* workers exit once the queue is empty */

    /* Loop thread only. */
    pthread_t *threads;
    unsigned nthreads;
    job *free_jobs;
    size_t free_len;
    df__gate *gates;   /* gates serving this pool */
    size_t inflight;   /* submitted, completion not dispatched */
    int state;         /* enum pool_state */
    bool free_pending; /* df_pool_free() waits for shutdown */
};

/* ------------------------------------------------------------------- jobs */

static void job_complete(df_loop *loop, df__inbox_node *n, int status);

static void job_init(df_pool *p, job *j)
{
    j->node.next = NULL;
    j->node.run = job_complete;
    j->prev = j->next = NULL;
    j->pool = p;
    j->d = NULL;
    j->result = df_ok(NULL, NULL);
    j->state = JOB_QUEUED;
    j->handed = false;
    j->embedded = false;
    j->gated = false;
    j->done = false;
    j->gate = NULL;
    j->ticket = 0;
    atomic_store_explicit(&j->w.cancelled, false, memory_order_relaxed);
    j->w.loop = p->loop;
}

static job *job_get(df_pool *p)
{
    job *j = p->free_jobs;
    if (j != NULL) {
        p->free_jobs = j->next;
        p->free_len--;
    } else {
        j = df__malloc(p->loop, sizeof *j);
        if (j == NULL)
            return NULL;
        atomic_init(&j->w.cancelled, false);
    }
    job_init(p, j);
    return j;
}

_Static_assert(sizeof(job) <= DF__JOB_SIZE, "raise DF__JOB_SIZE");

/* Gives a finished job's node back and forgets it; loop thread. */
static void job_put(df_pool *p, job *j)
{
    if (j->embedded)
        return; /* goes with its deferred's block */
    if (p->free_len < JOB_FREE_MAX) {
        j->next = p->free_jobs;
        p->free_jobs = j;
        p->free_len++;
    } else {
        df__free(p->loop, j);
    }
}

/* The loop counts a job as pending (df_loop_run goes on) from when it
 * holds a token (plain jobs: from submit) until its completion has been
 * dispatched; a gated job still waiting for a token is not pending, as a
 * df_sem_acquire waiter is not.  Gated jobs are also "lazy" while counted
 * (their completion may come without a wake-up). */
static void job_count(df_pool *p, bool gated, long delta)
{
    df__loop_pending_add(p->loop, delta);
    if (gated)
        df__loop_lazy_add(p->loop, delta);
}

/* Accounts for a job whose completion has been dispatched or that will
 * never run, and recycles its node.  `held`: it held a token (or is a
 * plain job), so it was counted pending.  Returns its deferred reference. */
static df_deferred *job_retire(df_pool *p, job *j, bool held)
{
    df_deferred *d = j->d;
    if (held)
        job_count(p, j->gate != NULL, -1);
    job_put(p, j);
    assert(p->inflight > 0);
    p->inflight--;
    return d;
}

/* Fails d with `code` and drops the job's reference to it. */
static void fail_job(df_loop *loop, df_deferred *d, int code)
{
    df_failure *f = df_failure_new(loop, code,
                                   code == DF_ECANCELLED
                                       ? "pool job cancelled"
                                       : "pool shut down before the job "
                                         "got a semaphore token");
    if (df_deferred_errback(d, f) != 0)
        df_failure_unref(f);
    df_deferred_unref(d);
}

static void fail_cancelled(df_loop *loop, df_deferred *d)
{
    fail_job(loop, d, DF_ECANCELLED);
}

static void queue_unlink(df_pool *p, job *j)
{
    if (j->prev != NULL)
        j->prev->next = j->next;
    else
        p->head = j->next;
    if (j->next != NULL)
        j->next->prev = j->prev;
    else
        p->tail = j->prev;
    j->prev = j->next = NULL;
}

/* Loop thread: the completion of a job, run from the inbox. */
static void job_complete(df_loop *loop, df__inbox_node *n, int status)
{
    DF__UNUSED(status);
    assert(status == 0); /* loops refuse to die while pools exist */
    job *j = DF__CONTAINER_OF(n, job, node);
    df_result r = j->result;
    df__gate *g = j->gate;
    df_pool *p = j->pool;
    bool handed = j->handed;
    bool cancelled =
        atomic_load_explicit(&j->w.cancelled, memory_order_relaxed);
    j->done = true; /* a cancel from here on only sets the flag */
    if (handed)
        job_count(p, true, 1); /* the job it handed its token to */
    df_deferred *d = job_retire(p, j, true);
    /* The token comes back before the deferred fires, so that its
     * callbacks see it released (as df_sem_run promises).  That runs user
     * code, which may cancel d: a gated job lives in d's block (which our
     * reference keeps), so its flag is read again afterwards. */
    if (g != NULL && !handed) {
        df__sem_return(g->sem);
        cancelled =
            atomic_load_explicit(&j->w.cancelled, memory_order_relaxed);
    }
    /* From here on the job and perhaps the pool may be gone. */
    if (r.wait != NULL) {
        df_result_clear(&r);
        r = df_errf(loop, DF_EINVAL, "work function returned df_wait()");
    }
    if (cancelled) {
        df_result_clear(&r);
        fail_cancelled(loop, d);
        return;
    }
    if (df_deferred_resolve(d, r) != 0)
        df_result_clear(&r);
    df_deferred_unref(d);
}

static bool job_of_pool(const df__inbox_node *n, void *arg)
{
    return n->run == job_complete &&
           DF__CONTAINER_OF(n, const job, node)->pool == arg;
}

/* ------------------------------------------------------------------ gates */

/* Appends j to the pool's work queue and wakes one idle worker.  Takes
 * pool->mu. */
static void pool_enqueue(df_pool *p, job *j)
{
    pthread_mutex_lock(&p->mu);
    j->state = JOB_QUEUED;
    j->next = NULL;
    j->prev = p->tail;
    if (p->tail != NULL)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    /* One job wakes at most one worker, and only if no worker already
     * signalled is still on its way: a burst of N submits costs at most
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

/* Pops the gate's first job if its ticket is below `before`; the job then
 * holds the token.  Any thread. */
static job *gate_pop(df__gate *g, bool check_loop, uint64_t before)
{
    pthread_mutex_lock(&g->mu);
    job *j = g->head;
    if (j != NULL && j->ticket < (check_loop ? g->loop_ticket : before)) {
        g->head = j->next;
        if (g->head != NULL)
            g->head->prev = NULL;
        else
            g->tail = NULL;
        j->prev = j->next = NULL;
        j->gated = false;
        j->state = JOB_RUNNING;
        atomic_fetch_sub_explicit(&g->waiting, 1, memory_order_relaxed);
    } else {
        j = NULL;
    }
    pthread_mutex_unlock(&g->mu);
    return j;
}

/* Takes j off the gate's line if it is still there.  Loop thread. */
static bool gate_unlink(df__gate *g, job *j)
{
    pthread_mutex_lock(&g->mu);
    bool on_line = j->gated;
    if (on_line) {
        if (j->prev != NULL)
            j->prev->next = j->next;
        else
            g->head = j->next;
        if (j->next != NULL)
            j->next->prev = j->prev;
        else
            g->tail = j->prev;
        j->prev = j->next = NULL;
        j->gated = false;
        j->state = JOB_TAKEN;
        atomic_fetch_sub_explicit(&g->waiting, 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&g->mu);
    return on_line;
}

bool df__gate_take(df__gate *g, uint64_t before)
{
    df_pool *p = g->pool;
    if (p == NULL || p->state != POOL_OPEN)
        return false; /* a pool shutting down starts nothing new */
    job *j = gate_pop(g, false, before);
    if (j == NULL)
        return false;
    job_count(p, true, 1); /* it holds a token now */
    pool_enqueue(p, j);
    return true;
}

void df__gate_set_loop_ticket(df__gate *g, uint64_t ticket)
{
    pthread_mutex_lock(&g->mu);
    g->loop_ticket = ticket;
    pthread_mutex_unlock(&g->mu);
}

size_t df__gate_waiting(const df__gate *g)
{
    return atomic_load_explicit(&g->waiting, memory_order_relaxed);
}

static void gate_detach(df__gate *g)
{
    df_pool *p = g->pool;
    if (p == NULL)
        return;
    for (df__gate **pp = &p->gates; *pp != NULL; pp = &(*pp)->pool_next) {
        if (*pp == g) {
            *pp = g->pool_next;
            break;
        }
    }
    g->pool = NULL;
    g->pool_next = NULL;
}

void df__gate_free(df__gate *g)
{
    assert(g->head == NULL);
    gate_detach(g);
    pthread_mutex_destroy(&g->mu);
    df__free(df__sem_loop(g->sem), g);
}

/* Takes every job still waiting in the pool's gates off its line, as one
 * list.  Loop thread. */
static job *gates_take(df_pool *p)
{
    job *taken = NULL, **tail = &taken;
    for (df__gate *g = p->gates; g != NULL; g = g->pool_next) {
        pthread_mutex_lock(&g->mu);
        for (job *j = g->head; j != NULL; j = j->next) {
            j->gated = false;
            j->state = JOB_TAKEN;
        }
        *tail = g->head;
        if (g->tail != NULL)
            tail = &g->tail->next;
        g->head = g->tail = NULL;
        atomic_store_explicit(&g->waiting, 0, memory_order_relaxed);
        pthread_mutex_unlock(&g->mu);
    }
    return taken;
}

/* Fails jobs taken from gates (they hold no token) with DF_ESHUTDOWN.
 * Takes them all off their lines before running any callback: a callback
 * may free a semaphore, and its gate with it. */
static void gates_fail(df_pool *p, job *taken)
{
    while (taken != NULL) {
        job *j = taken;
        taken = j->next;
        fail_job(p->loop, job_retire(p, j, false), DF_ESHUTDOWN);
    }
}

/* The gate of s for pool p: made on first use; NULL when s's gate serves
 * another pool (the caller then takes the general path) or on ENOMEM. */
static df__gate *gate_for(df_sem *s, df_pool *p, int *rc)
{
    df__gate *g = df__sem_gate(s);
    *rc = 0;
    if (g != NULL) {
        if (g->pool == NULL && df__gate_waiting(g) == 0) {
            g->pool = p; /* its pool is gone: serve this one */
            g->pool_next = p->gates;
            p->gates = g;
        }
        return g->pool == p ? g : NULL;
    }
    g = df__calloc(p->loop, 1, sizeof *g);
    if (g == NULL) {
        *rc = DF_ENOMEM;
        return NULL;
    }
    int err = pthread_mutex_init(&g->mu, NULL);
    if (err != 0) {
        df__free(p->loop, g);
        *rc = -err;
        return NULL;
    }
    g->sem = s;
    g->pool = p;
    g->loop_ticket = UINT64_MAX;
    atomic_init(&g->waiting, 0);
    g->pool_next = p->gates;
    p->gates = g;
    df__sem_set_gate(s, g);
    return g;
}

/* df_deferred_cancel() on a job's deferred; loop thread. */
static void job_cancel(df_deferred *d, void *arg)
{
    DF__UNUSED(d);
    job *j = arg;
    if (j->done) {
        /* Its completion is being dispatched (job_complete gives the token
         * back, which may run user code that cancels): only say so; the
         * pool may be gone by now. */
        atomic_store_explicit(&j->w.cancelled, true, memory_order_seq_cst);
        return;
    }
    df_pool *p = j->pool;
    df__gate *g = j->gate;
    if (g != NULL && gate_unlink(g, j)) {
        /* Still waiting for a token: it leaves the line holding none. */
        fail_cancelled(p->loop, job_retire(p, j, false));
        return;
    }
    pthread_mutex_lock(&p->mu);
    bool queued = j->state == JOB_QUEUED;
    if (queued) {
        queue_unlink(p, j);
        /* Not QUEUED any more: a cancel re-entering from the user code
         * below must not unlink it again. */
        j->state = JOB_TAKEN;
    } else { /* seq_cst: a locked xchg on x86, which helgrind understands */
        atomic_store_explicit(&j->w.cancelled, true, memory_order_seq_cst);
    }
    pthread_mutex_unlock(&p->mu);
    if (queued) {
        df_deferred *dd = job_retire(p, j, true);
        /* It held a token and never ran: give it back.  That may run user
         * code (a waiter starts) before dd fails; a cancel of dd from there
         * finds it TAKEN and only sets the flag. */
        if (g != NULL)
            df__sem_return(g->sem);
        fail_cancelled(p->loop, dd);
    }
}

/* ---------------------------------------------------------------- workers */

static void *worker_main(void *arg)
{
    df_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->head == NULL && !p->stopping) {
            p->idle++;
            pthread_cond_wait(&p->cv, &p->mu);
            p->idle--;
            if (p->signaled > 0)
                p->signaled--;
        }
        job *j = p->head;
        if (j == NULL)
            break; /* stopping and nothing left */
        queue_unlink(p, j);
        j->state = JOB_RUNNING;
        pthread_mutex_unlock(&p->mu);

        while (j != NULL) {
            j->result = j->work(&j->w, j->arg);
            /* A job holding a semaphore token hands it straight to the
             * next job waiting for one, if that one comes first. */
            job *next = NULL;
            if (j->gate != NULL) {
                next = gate_pop(j->gate, true, 0);
                j->handed = next != NULL;
            }
            /* The node now belongs to the loop: do not touch it after
             * this.  While we go on with the next job the loop collects
             * completions in batches (see the gate, above). */
            if (next != NULL)
                df__loop_post_lazy(p->loop, &j->node);
            else
                df__loop_post(p->loop, &j->node);
            j = next;
        }

        pthread_mutex_lock(&p->mu);
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
    return w != NULL ? w->loop : NULL;
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
    while (p->gates != NULL)
        gate_detach(p->gates);
    while (p->free_jobs != NULL) {
        job *j = p->free_jobs;
        p->free_jobs = j->next;
        df__free(loop, j);
    }
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
    if (o.threads < 1)
        return DF_EINVAL;

    df_pool *p = df__calloc(loop, 1, sizeof *p);
    if (p == NULL)
        return DF_ENOMEM;
    p->loop = loop;
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
    p->state = POOL_OPEN;
    df__loop_pools_add(loop, 1);
    *out = p;
    return 0;

fail_attr:
    pthread_attr_destroy(&attr);
fail_cond:
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

df_loop *df__pool_loop(const df_pool *p)
{
    return p->loop;
}

/* Makes a job and its deferred (*out gets the caller's reference) and
 * counts it in flight; the caller queues it.  Loop thread. */
static int job_make(df_pool *p, df_work_fn work, void *arg, df__gate *g,
                    df_deferred **out, job **jp)
{
    df_deferred *d;
    job *j;
    int rc;
    if (g != NULL) {
        /* Gated jobs may wait long in large numbers (a whole backlog
         * submitted at once): one block for the job and its deferred. */
        void *mem;
        rc = df__deferred_new_job(p->loop, job_cancel, &d, &mem);
        if (rc != 0)
            return rc;
        j = mem;
        atomic_init(&j->w.cancelled, false);
        job_init(p, j);
        j->embedded = true;
    } else {
        j = job_get(p);
        if (j == NULL)
            return DF_ENOMEM;
        rc = df_deferred_new_cancellable(p->loop, job_cancel, j, &d);
        if (rc != 0) {
            job_put(p, j);
            return rc;
        }
    }
    df__deferred_set_cancel_waits(d);
    j->work = work;
    j->arg = arg;
    j->d = d;
    j->gate = g;
    *out = df_deferred_ref(d);
    p->inflight++;
    if (g == NULL)
        job_count(p, false, 1); /* gated jobs count once they hold a token */
    *jp = j;
    return 0;
}

int df_pool_submit(df_pool *p, df_work_fn work, void *arg, df_deferred **out)
{
    if (p == NULL || work == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(p->loop);
    if (p->state != POOL_OPEN)
        return DF_ESHUTDOWN;
    job *j;
    int rc = job_make(p, work, arg, NULL, out, &j);
    if (rc == 0)
        pool_enqueue(p, j);
    return rc;
}

static void pool_shutdown(df_pool *p, int mode)
{
    p->state = POOL_SHUTTING;

    /* CANCEL takes the queue and the jobs waiting in semaphore gates (they
     * hold no token) before any callback runs, so that nothing queued can
     * start meanwhile (gate->mu nests inside pool->mu: both are leaves
     * otherwise).  DRAIN lets the workers run the queue and the gated jobs
     * that finishing jobs hand their tokens to; gated jobs still waiting at
     * the end (behind loop-side waiters, which cannot run until this call
     * returns) fail with DF_ESHUTDOWN. */
    job *taken = NULL, *gated = NULL;
    pthread_mutex_lock(&p->mu);
    if (mode == DF_POOL_CANCEL) {
        taken = p->head;
        for (job *j = taken; j != NULL; j = j->next)
            j->state = JOB_TAKEN;
        p->head = p->tail = NULL;
        gated = gates_take(p);
    }
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);

    /* Fail the queued jobs first: their callbacks run now.  A callback
     * that cancels one still on this list only sets its flag. */
    while (taken != NULL) {
        job *j = taken;
        taken = j->next;
        df__gate *g = j->gate;
        df_deferred *d = job_retire(p, j, true);
        if (g != NULL) /* it held a token and never ran */
            df__sem_return(g->sem);
        fail_cancelled(p->loop, d);
    }
    gates_fail(p, gated);

    stop_and_join(p, p->nthreads);
    /* Every job has been posted by now; dispatch this pool's share. */
    df__loop_run_matching(p->loop, job_of_pool, p);
    gates_fail(p, gates_take(p));
    assert(p->inflight == 0);
    p->state = POOL_DOWN;
}

int df_pool_shutdown(df_pool *p, int mode)
{
    if (p == NULL || (mode != DF_POOL_DRAIN && mode != DF_POOL_CANCEL))
        return DF_EINVAL;
    DF__CHECK_THREAD(p->loop);
    /* Already down, or a callback run by the shutdown in progress. */
    if (p->state != POOL_OPEN)
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
    if (p->state == POOL_SHUTTING)
        return; /* the shutdown in progress frees it when done */
    if (p->state == POOL_OPEN)
        pool_shutdown(p, DF_POOL_CANCEL);
    df__loop_pools_add(p->loop, -1);
    pool_destroy(p);
}

/* ---------------------------------------------------- semaphore in a pool */

/*
 * df_sem_run_in_pool: acquire a token, submit, and release only once the
 * pool's deferred has fired, which happens after the worker has returned
 * even when the job was cancelled while running.  So the number of jobs
 * running never exceeds the number of tokens.  *out has cancel_waits set:
 * it is always fired here, after the token is back.
 */
enum { RIP_WAITING, RIP_SUBMITTED, RIP_DONE };

typedef struct run_in_pool {
    df_loop *loop;
    df_sem *sem;
    df_pool *pool;
    df_work_fn work;
    void *arg;
    df_deferred *out; /* our reference; *out is the caller's */
    df_deferred *acq; /* our reference to the acquire */
    df_deferred *job; /* our reference to the job, once submitted */
    int phase;
    bool cancelled; /* *out was cancelled before the job was made */
} run_in_pool;

/* Fires *out with r (stolen) and frees the state.  `release`: give the
 * token back first, so that *out's callbacks already see it free. */
static void rip_finish(run_in_pool *st, df_result r, bool release)
{
    df_loop *loop = st->loop;
    st->phase = RIP_DONE;
    if (release) {
        int rc = df_sem_release(st->sem);
        if (rc != 0 && df_result_ok(&r)) {
            df_result_clear(&r);
            r = df_errf(loop, rc, "df_sem_run_in_pool: release: %s",
                        df_strerror(rc));
        }
    }
    df_deferred *out = st->out;
    df_deferred_unref(st->acq);
    df_deferred_unref(st->job);
    df__free(loop, st);
    if (df_deferred_resolve(out, r) != 0)
        df_result_clear(&r);
    df_deferred_unref(out);
}

static df_result rip_job_done(df_result r, void *arg)
{
    rip_finish(arg, r, true);
    return df_ok(NULL, NULL);
}

static df_result rip_acquired(df_result r, void *arg)
{
    run_in_pool *st = arg;
    df_result_clear(&r);
    if (st->cancelled) {
        /* Cancelled after the token was handed over but before we saw it
         * (the semaphore then fires the acquire anyway). */
        rip_finish(st, df_errf(st->loop, DF_ECANCELLED, NULL), true);
        return df_ok(NULL, NULL);
    }
    int rc = df_pool_submit(st->pool, st->work, st->arg, &st->job);
    if (rc != 0) {
        st->job = NULL;
        rip_finish(
            st,
            df_errf(st->loop, rc, "df_sem_run_in_pool: %s", df_strerror(rc)),
            true);
        return df_ok(NULL, NULL);
    }
    st->phase = RIP_SUBMITTED;
    rc = df_deferred_add_both(st->job, rip_job_done, st);
    if (rc != 0) {
        /* We cannot learn when the worker returns, so the token cannot be
         * given back safely: keep it (a leak, never an over-use). */
        df_deferred_cancel(st->job);
        rip_finish(
            st,
            df_errf(st->loop, rc, "df_sem_run_in_pool: %s", df_strerror(rc)),
            false);
    }
    return df_ok(NULL, NULL);
}

static df_result rip_acquire_failed(df_result r, void *arg)
{
    /* No token was granted (the acquire was cancelled while waiting). */
    rip_finish(arg, r, false);
    return df_ok(NULL, NULL);
}

static void rip_cancel(df_deferred *d, void *arg)
{
    DF__UNUSED(d);
    run_in_pool *st = arg;
    /* Either call may finish and free st before it returns. */
    if (st->phase == RIP_WAITING) {
        st->cancelled = true;
        df_deferred_cancel(st->acq);
    } else if (st->phase == RIP_SUBMITTED) {
        df_deferred_cancel(st->job);
    }
}

/* The fast path: one job, one deferred, no acquire (see the gate). */
static int run_gated(df_sem *s, df_pool *p, df__gate *g, df_work_fn work,
                     void *arg, df_deferred **out)
{
    job *j;
    int rc = job_make(p, work, arg, g, out, &j);
    if (rc != 0)
        return rc;
    if (df__sem_try_take(s)) {
        job_count(p, true, 1);
        pool_enqueue(p, j);
        return 0;
    }
    j->ticket = df__sem_next_ticket(s);
    pthread_mutex_lock(&g->mu);
    j->state = JOB_GATED;
    j->gated = true;
    j->next = NULL;
    j->prev = g->tail;
    if (g->tail != NULL)
        g->tail->next = j;
    else
        g->head = j;
    g->tail = j;
    atomic_fetch_add_explicit(&g->waiting, 1, memory_order_relaxed);
    pthread_mutex_unlock(&g->mu);
    return 0;
}

int df_sem_run_in_pool(df_sem *s, df_pool *p, df_work_fn work, void *arg,
                       df_deferred **out)
{
    if (s == NULL || p == NULL || work == NULL || out == NULL)
        return DF_EINVAL;
    df_loop *loop = p->loop;
    DF__CHECK_THREAD(loop);
    if (df__sem_loop(s) != loop)
        return DF_EINVAL;
    if (p->state != POOL_OPEN)
        return DF_ESHUTDOWN;
    if (!df__sem_usable(s))
        return DF_ESTATE;
    int rc;
    df__gate *g = gate_for(s, p, &rc);
    if (g != NULL)
        return run_gated(s, p, g, work, arg, out);
    if (rc != 0)
        return rc;
    /* The semaphore's gate serves another pool: the general path. */
    run_in_pool *st = df__malloc(loop, sizeof *st);
    if (st == NULL)
        return DF_ENOMEM;
    *st = (run_in_pool){loop, s,    p,    work,        arg,
                        NULL, NULL, NULL, RIP_WAITING, false};
    rc = df_deferred_new_cancellable(loop, rip_cancel, st, &st->out);
    if (rc != 0)
        goto fail_st;
    df__deferred_set_cancel_waits(st->out);
    rc = df_sem_acquire(s, &st->acq);
    if (rc != 0)
        goto fail_out;
    /* The caller's reference first: rip_acquired may run (and submit) at
     * once, and in odd cases finish before this returns. */
    *out = df_deferred_ref(st->out);
    rc = df_deferred_add_callbacks(st->acq, rip_acquired, rip_acquire_failed,
                                   st);
    if (rc != 0) {
        df_deferred_unref(*out);
        *out = NULL;
        /* Give back a token granted at once; else leave the line. */
        df_failure *f = NULL;
        if (df_deferred_peek(st->acq, NULL, &f) == 0) {
            if (f == NULL)
                df_sem_release(s);
        } else {
            df_deferred_cancel(st->acq);
        }
        df_deferred_unref(st->acq);
        goto fail_out;
    }
    return 0;

fail_out:
    /* Unfired and never seen: releasing it reports nothing. */
    df_deferred_unref(st->out);
fail_st:
    df__free(loop, st);
    return rc;
}
