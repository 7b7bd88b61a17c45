/* SPDX-License-Identifier: MIT */
/* DeferredSemaphore and DeferredLock: FIFO tokens, handed out iteratively. */
#include <string.h>

#include "deferred-internal.h"

/*
 * Design
 * ------
 * A semaphore has `tokens` free tokens and two intrusive FIFO lists of
 * nodes: `waiting` (no token yet) and `ready` (a token has been handed over
 * but the node has not been started: its deferred not fired, or its run
 * function not called).  Invariant: while anyone waits, no token is free
 * (tokens > 0 implies `waiting` is empty), because a release with a waiter
 * hands the token to it instead of freeing it.
 *
 * No recursion.  Twisted's release() fires the next waiter's deferred,
 * whose callbacks may release again, which fires the next one, and so on:
 * the stack grows with the number of waiters.  Here, every path that runs
 * user code on behalf of the semaphore does so between sem_enter() and
 * sem_leave().  The outermost of those frames is the dispatcher: it starts
 * the nodes of `ready` one after another.  A release made while a
 * dispatcher is active only moves the first waiter to `ready` (or frees
 * the token) and returns; the dispatcher starts that waiter once the
 * current user code has returned.  A df_sem_run() made while a dispatcher
 * is active is likewise queued on `ready` instead of calling its function
 * at once, so that a run whose callbacks start the next run does not nest
 * either.  The stack depth is therefore bounded whatever the number of
 * waiters or of chained runs.
 *
 * A plain acquire that finds a free token fires its new deferred at once
 * even inside a dispatch: that deferred has no callbacks yet, so firing it
 * runs no user code.
 *
 * The pool's fast path (df_sem_run_in_pool, pool.c) keeps a second line:
 * jobs waiting for a token in the semaphore's gate, which pool threads read
 * under the gate's own lock so that a worker that finishes a job can hand
 * its token straight to the next job without a round trip through the loop.
 * Both lines are one FIFO: every waiter gets a ticket from `next_ticket`,
 * and a token goes to whichever head has the older ticket.  The gate is
 * told the ticket of the first loop-side waiter whenever it changes.
 *
 * Deferred deletion.  User code run by the dispatcher may free the
 * semaphore (typically in the callback of the last run).  df_sem_free()
 * then only marks it; the dispatcher frees it when it unwinds.  No code
 * touches the semaphore after running user code except the dispatcher.
 */

/* An intrusive circular doubly-linked list with a sentinel head. */
typedef struct link {
    struct link *prev;
    struct link *next;
} link;

static void list_init(link *head)
{
    head->prev = head;
    head->next = head;
}

static bool list_empty(const link *head)
{
    return head->next == head;
}

static void list_append(link *head, link *l)
{
    l->prev = head->prev;
    l->next = head;
    head->prev->next = l;
    head->prev = l;
}

static void list_remove(link *l)
{
    l->prev->next = l->next;
    l->next->prev = l->prev;
    l->prev = l->next = NULL;
}

static link *list_pop(link *head)
{
    if (list_empty(head))
        return NULL;
    link *l = head->next;
    list_remove(l);
    return l;
}

/* The ticket of the first loop-side waiter, or UINT64_MAX. */
#define FIRST_TICKET(s)                                                        \
    (list_empty(&(s)->waiting)                                                 \
         ? UINT64_MAX                                                          \
         : DF__CONTAINER_OF((s)->waiting.next, sem_node, link)->ticket)

struct df_sem {
    df_loop *loop;
    unsigned limit;
    unsigned tokens;       /* free now                                  */
    size_t nwaiting;       /* nodes on `waiting`                        */
    link waiting;          /* no token yet, FIFO                        */
    link ready;            /* token handed over, not started yet, FIFO  */
    bool dispatching;      /* a sem_enter() frame is on the stack       */
    bool free_pending;     /* df_sem_free() called during a dispatch    */
    uint64_t next_ticket;  /* FIFO order across `waiting` and the gate  */
    df__gate *gate;        /* pool fast path, or NULL (pool.c)          */
};

struct df_lock {
    struct df_sem sem;
};

enum node_kind { NODE_ACQUIRE, NODE_RUN };

/*
 * Node states.  An acquire node lives only while WAITING or READY; it is
 * freed when its deferred is fired or cancelled.  A run node goes
 * WAITING -> READY -> CALLING (fn is running) -> RUNNING (fn's deferred is
 * pending) -> freed, or is freed when cancelled while WAITING.
 */
enum node_state { ST_WAITING, ST_READY, ST_CALLING, ST_RUNNING };

typedef struct sem_node {
    link link;             /* on `waiting` or `ready` (WAITING, READY)  */
    df_sem *sem;
    df_deferred *d;        /* acquire: its deferred; run: *out.  Ref.   */
    uint64_t ticket;       /* order against the gate's jobs             */
    unsigned char kind;
    unsigned char state;
} sem_node;

typedef struct sem_run {
    sem_node node;
    df_run_fn fn;
    void *arg;
    df_deferred *inner;    /* fn's pending deferred (RUNNING).  Ref.    */
    bool cancel_requested; /* *out was cancelled while fn was running   */
} sem_run;

#define NODE_OF(l) DF__CONTAINER_OF(l, sem_node, link)
#define RUN_OF(n) DF__CONTAINER_OF(n, sem_run, node)

static void run_start(sem_run *run);

/* ------------------------------------------------------------ dispatcher */

/* Returns true when the caller is the outermost frame (the dispatcher). */
static bool sem_enter(df_sem *s)
{
    bool outer = !s->dispatching;
    s->dispatching = true;
    return outer;
}

static void sem_destroy(df_sem *s)
{
    assert(list_empty(&s->waiting) && list_empty(&s->ready));
    if (s->gate != NULL)
        df__gate_free(s->gate);
    df__loop_objects_add(s->loop, -1);
    df__free(s->loop, s);
}

/* Fires an acquire node that has been handed a token. */
static void acquire_start(df_sem *s, sem_node *n);

/* The outermost frame starts every node that has been handed a token, in
 * order, then frees the semaphore if that was asked for meanwhile.  Inner
 * frames return at once: they must not touch `s` after running user code,
 * since only the dispatcher knows that it is still alive. */
static void sem_leave(df_sem *s, bool outer)
{
    if (!outer)
        return;
    link *l;
    while ((l = list_pop(&s->ready)) != NULL) {
        sem_node *n = NODE_OF(l);
        if (n->kind == NODE_ACQUIRE)
            acquire_start(s, n);
        else
            run_start(RUN_OF(n));
    }
    s->dispatching = false;
    if (s->free_pending)
        sem_destroy(s);
}

/* Tells the gate, if any, which loop-side waiter comes first now. */
static void gate_sync(df_sem *s)
{
    if (s->gate != NULL)
        df__gate_set_loop_ticket(s->gate, FIRST_TICKET(s));
}

/* Puts a node at the end of the waiting line. */
static void wait_append(df_sem *s, sem_node *n)
{
    bool first = list_empty(&s->waiting);
    n->ticket = s->next_ticket++;
    n->state = ST_WAITING;
    list_append(&s->waiting, &n->link);
    s->nwaiting++;
    if (first)
        gate_sync(s);
}

/* Takes a node out of the waiting line (cancel). */
static void wait_remove(df_sem *s, sem_node *n)
{
    bool first = s->waiting.next == &n->link;
    list_remove(&n->link);
    s->nwaiting--;
    if (first)
        gate_sync(s);
}

/* Gives a held token back: straight to the first waiter if there is one
 * (a gated pool job is submitted; a loop-side node moves to `ready` and the
 * dispatcher starts it), else to the pool of free tokens.  Runs no user
 * code. */
static void sem_give_back(df_sem *s)
{
    if (s->gate != NULL && df__gate_take(s->gate, FIRST_TICKET(s)))
        return;
    link *l = list_pop(&s->waiting);
    if (l == NULL) {
        assert(s->tokens < s->limit);
        s->tokens++;
        return;
    }
    s->nwaiting--;
    gate_sync(s);
    NODE_OF(l)->state = ST_READY;
    list_append(&s->ready, l);
}

static void acquire_start(df_sem *s, sem_node *n)
{
    df_deferred *d = n->d;
    df__free(s->loop, n);
    /* Only misuse (the application firing an acquire deferred itself) can
     * make this fail; the token then goes to the next in line. */
    if (df_deferred_callback(d, NULL, NULL) != 0)
        sem_give_back(s);
    df_deferred_unref(d);
}

/* ---------------------------------------------------------------- run */

/* fn's result is known: release the token, then hand the result to *out,
 * so that *out's callbacks already see the token back.  Consumes r. */
static void run_finish(sem_run *run, df_result r)
{
    df_sem *s = run->node.sem;
    df_deferred *out = run->node.d;
    df_deferred *inner = run->inner;
    bool outer = sem_enter(s);

    sem_give_back(s);
    df__free(s->loop, run);
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

/* Calls fn for a run node that holds a token.  Always called inside a
 * dispatch. */
static void run_start(sem_run *run)
{
    df_sem *s = run->node.sem;

    run->node.state = ST_CALLING;
    df_result r = run->fn(run->arg);
    if (r.wait == NULL) {
        run_finish(run, r);
        return;
    }

    df_deferred *inner = r.wait;
    bool cancel = run->cancel_requested;
    run->inner = inner;
    run->node.state = ST_RUNNING;
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
    df_sem *s = n->sem;
    bool outer;

    assert(n->d == d);
    switch (n->state) {
    case ST_WAITING:
        /* Still in line: leave the line.  No token changes hands. */
        wait_remove(s, n);
        if (n->kind == NODE_RUN) {
            df__free(s->loop, RUN_OF(n));
            /* *out waits for its producer on cancel (see df_sem_run), so
             * fail it here; fn never runs. */
            outer = sem_enter(s);
            df_deferred_errback(d, df_failure_new(s->loop, DF_ECANCELLED,
                                                  NULL));
            df_deferred_unref(d);
            sem_leave(s, outer);
        } else {
            /* df_deferred_cancel fails d once we return. */
            df__free(s->loop, n);
            df_deferred_unref(d);
        }
        break;
    case ST_READY:
        /* The token was handed over when it was released, exactly as if
         * Twisted's release() had fired the waiter then: the acquisition
         * has happened and the cancel comes too late.  Start the node now,
         * so that an acquire fires with success and a run's cancel goes to
         * fn's deferred, as in Twisted. */
        list_remove(&n->link);
        outer = sem_enter(s);
        if (n->kind == NODE_ACQUIRE) {
            acquire_start(s, n);
        } else {
            RUN_OF(n)->cancel_requested = true;
            run_start(RUN_OF(n));
        }
        sem_leave(s, outer);
        break;
    case ST_CALLING:
        /* fn is running: cancel what it returns, once it has returned. */
        RUN_OF(n)->cancel_requested = true;
        break;
    case ST_RUNNING: {
        /* Forward to fn's deferred; *out fires with whatever that gives,
         * after the token is back.  Hold a reference: run_finish may drop
         * the node's reference to it while the cancel is under way. */
        df_deferred *inner = df_deferred_ref(RUN_OF(n)->inner);
        df_deferred_cancel(inner);
        df_deferred_unref(inner);
        break;
    }
    default:
        assert(!"bad semaphore node state");
    }
}

/* ------------------------------------------------------------ public API */

static void sem_init(df_sem *s, df_loop *loop, unsigned tokens)
{
    memset(s, 0, sizeof *s);
    s->loop = loop;
    s->limit = tokens;
    s->tokens = tokens;
    list_init(&s->waiting);
    list_init(&s->ready);
    df__loop_objects_add(loop, 1);
}

int df_sem_new(df_loop *loop, unsigned tokens, df_sem **out)
{
    if (loop == NULL || out == NULL || tokens < 1)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    df_sem *s = df__malloc(loop, sizeof *s);
    if (s == NULL)
        return DF_ENOMEM;
    sem_init(s, loop, tokens);
    *out = s;
    return 0;
}

int df_sem_free(df_sem *s)
{
    if (s == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(s->loop);
    if (s->free_pending)
        return DF_ESTATE; /* freed twice while a dispatch unwinds */
    if (s->tokens != s->limit || s->nwaiting != 0 || !list_empty(&s->ready))
        return DF_EBUSY;
    if (s->gate != NULL && df__gate_waiting(s->gate) != 0)
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
        *out = d;
        return 0;
    }

    sem_node *n = df__malloc(s->loop, sizeof *n);
    if (n == NULL)
        return DF_ENOMEM;
    rc = df_deferred_new_cancellable(s->loop, sem_cancel, n, &d);
    if (rc != 0) {
        df__free(s->loop, n);
        return rc;
    }
    memset(n, 0, sizeof *n);
    n->sem = s;
    /* Our own reference: the application may drop its reference while the
     * node waits, and the node must not point at a freed deferred. */
    n->d = df_deferred_ref(d);
    n->kind = NODE_ACQUIRE;
    wait_append(s, n);
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
    if (s->tokens >= s->limit)
        return DF_EOVERRELEASE;
    bool outer = sem_enter(s);
    sem_give_back(s);
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

    sem_run *run = df__malloc(s->loop, sizeof *run);
    if (run == NULL)
        return DF_ENOMEM;
    df_deferred *d;
    int rc = df_deferred_new_cancellable(s->loop, sem_cancel, &run->node, &d);
    if (rc != 0) {
        df__free(s->loop, run);
        return rc;
    }
    /* Cancelling *out never fails it behind our back: while waiting, the
     * canceller fails it; once fn's deferred is pending, *out fires with
     * what that deferred gives after the cancel, and only after the token
     * is back, so that a cancelled run never frees its token early. */
    df__deferred_set_cancel_waits(d);
    memset(run, 0, sizeof *run);
    run->node.sem = s;
    run->node.d = df_deferred_ref(d);
    run->node.kind = NODE_RUN;
    run->fn = fn;
    run->arg = arg;
    *out = d;

    if (s->tokens == 0) {
        wait_append(s, &run->node);
        return 0;
    }
    /* A free token: take it, and call fn now, unless a dispatch is under
     * way (we are inside a callback of this semaphore), in which case the
     * dispatcher calls it as soon as that callback returns. */
    s->tokens--;
    run->node.state = ST_READY;
    list_append(&s->ready, &run->node.link);
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
    if (s == NULL)
        return 0;
    return s->nwaiting + (s->gate != NULL ? df__gate_waiting(s->gate) : 0);
}

/* ------------------------------------------------- the pool's fast path */

df__gate *df__sem_gate(const df_sem *s)
{
    return s->gate;
}

void df__sem_set_gate(df_sem *s, df__gate *g)
{
    assert(s->gate == NULL);
    s->gate = g;
    gate_sync(s);
}

df_loop *df__sem_loop(const df_sem *s)
{
    return s->loop;
}

bool df__sem_usable(const df_sem *s)
{
    return !s->free_pending;
}

uint64_t df__sem_next_ticket(df_sem *s)
{
    return s->next_ticket++;
}

bool df__sem_try_take(df_sem *s)
{
    /* A free token means nobody waits, in either line. */
    if (s->tokens == 0)
        return false;
    s->tokens--;
    return true;
}

void df__sem_return(df_sem *s)
{
    bool outer = sem_enter(s);
    sem_give_back(s);
    sem_leave(s, outer);
}

/* ------------------------------------------------------------------ lock */

/* A lock is a semaphore of one token; it shares every code path above. */

int df_lock_new(df_loop *loop, df_lock **out)
{
    if (loop == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    df_lock *l = df__malloc(loop, sizeof *l);
    if (l == NULL)
        return DF_ENOMEM;
    sem_init(&l->sem, loop, 1);
    *out = l;
    return 0;
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
