/* SPDX-License-Identifier: MIT */
/* The loop: library instance, allocator, completion inbox, timers, dispatch. */
#include <limits.h>
#include <stddef.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "deferred-internal.h"

/*
 * Threads and locks
 * =================
 * Everything in struct df_loop belongs to the loop thread except the inbox
 * (inbox_head/inbox_tail/call_free, protected by inbox_lock), the atomics
 * `wake_pending` and `calls`, and `wake_fd`, which any thread may write
 * to.  inbox_lock is a leaf: nothing else is locked while it is
 * held, and no user code ever runs under it.  (A pool's mutex is never held
 * while posting, so the pool and the loop have no lock order between them.)
 *
 * The inbox is a FIFO list of intrusive nodes.  The loop drains it in
 * batches: it swaps the whole list into `batch` under the lock, then runs
 * the entries without the lock.  `batch` lives in the loop so that a nested
 * drain (a pool shutdown from inside a callback) sees the same entries and
 * nothing is run twice or lost.
 *
 * Wake-ups coalesce.  A producer writes to the eventfd only when it flips
 * `wake_pending` from false to true.  The loop flips it back only when it
 * is about to block in poll(2) or to hand control back to an external
 * poller (settle()), so while the loop is busy, posts cost no system call
 * at all, and N posts between two sleeps cost one write(2).
 *
 * settle() does three things in this order: drain the eventfd (a
 * non-blocking read), clear the flag, look at the inbox.  An entry appended
 * before the look is seen by it.  An entry appended after the look comes
 * with an exchange of the flag that follows our clear; either it finds the
 * flag clear and writes, or another producer set the flag after our clear
 * and writes.  Both writes come after the drain, so poll(2) returns.  A
 * producer that set the flag before our clear and writes late only costs
 * a spurious wake-up.  So when settle() finds the inbox empty, the loop
 * may block; when it does not, it must not, and a loop giving control away
 * makes the fd readable itself (force_wake()).
 *
 * A producer that sets the flag and is then slow to write delays every
 * other producer's wake-up until it writes (they see the flag set); it
 * cannot lose one.  A producer cancelled between the two would, so the
 * write runs with cancellation disabled.
 *
 * Two kinds of entries do not wake the loop and need no write: lazily
 * posted gate completions (df__loop_post_lazy), whose jobs stay counted
 * as lazy until dispatched, so that the loop polls at least every
 * DF__LAZY_MS meanwhile; and entries a nested df__loop_run_matching()
 * left in the batch, which make timeout_ms() return 0 and settle()
 * report work.
 *
 * The order matters.  Clearing the flag before the drain (as an earlier
 * version did) loses wake-ups: a producer appends entry A and is slow to
 * wake; the loop takes and runs A anyway, clears the flag; the producer
 * now sets the flag and writes; the drain consumes that write and the look
 * finds nothing; the flag stays set with no write owed, so every later
 * producer skips its write and the loop sleeps with entries queued
 * (tests/check_loop, test_loop_wake_after_late_producer).
 */

/* A cross-thread call, queued on the inbox.  Nodes are recycled through
 * loop->call_free so that a steady stream of calls allocates nothing. */
typedef struct call_node {
    df__inbox_node node;
    df_call_fn fn;
    void *arg;
} call_node;

struct df_timer {
    uint64_t deadline; /* df_loop_now() time at which it is due */
    uint64_t seq;      /* creation order, breaks deadline ties */
    size_t index;      /* position in loop->heap; SIZE_MAX: none */
    df_call_fn fn;
    void *arg;
    df_loop *loop;
    df_timer *next_free;
};

#define TIMER_FREE_MAX 256

struct df_loop {
    /* These two come first, in df__loop_id's order (inline checks). */
    pthread_t thread;  /* the loop thread */
    unsigned fork_gen; /* df__fork_gen when the loop was made */
    df_allocator alloc;
    df_unhandled_fn unhandled;
    void *unhandled_arg;
    uint64_t unhandled_count;

    /* Cross-thread part.  inbox_lock protects inbox_head, inbox_tail and
     * call_free; it is a leaf lock (see above). */
    pthread_mutex_t inbox_lock;
    df__inbox_node *inbox_head;
    df__inbox_node **inbox_tail;
    df__inbox_node *call_free; /* recycled call_node entries */
    atomic_bool wake_pending;  /* a write to wake_fd is owed or done */
    atomic_size_t calls;       /* cross-thread calls not yet run */
    int wake_fd;               /* eventfd; written by any thread */

    /* Loop thread only from here on. */
    df__inbox_node *batch_head; /* taken from the inbox, not yet run */
    df__inbox_node **batch_tail;
    df__inbox_node *spent_calls; /* run; returned to call_free later */
    size_t jobs;                 /* pool jobs whose completion is due */
    size_t pools;                /* pools made from this loop */
    size_t objects;              /* live deferreds, sems, locks, queues */
    size_t lazy;                 /* jobs that may post without waking */
    bool dispatching;            /* inside run/dispatch/run_matching */
    bool stop;                   /* df_loop_stop() was called */

    /* Timers: a binary min-heap keyed (deadline, seq). */
    df_timer **heap;
    size_t heap_len, heap_cap;
    uint64_t timer_seq;
    df_timer *timer_free;
    size_t timer_free_len;

    df__cache caches[DF__CACHES]; /* spare blocks (deferred.c) */
};

/* ------------------------------------------------------------ allocation */

static void *default_malloc(size_t size, void *ctx)
{
    DF__UNUSED(ctx);
    return malloc(size);
}

static void *default_realloc(void *ptr, size_t size, void *ctx)
{
    DF__UNUSED(ctx);
    return realloc(ptr, size);
}

static void default_free(void *ptr, void *ctx)
{
    DF__UNUSED(ctx);
    free(ptr);
}

static const df_allocator default_allocator = {default_malloc, default_realloc,
                                               default_free, NULL};

df__cache *df__loop_cache(df_loop *loop, int which)
{
    return &loop->caches[which];
}

const df_allocator *df__allocator(df_loop *loop)
{
    return loop != NULL ? &loop->alloc : &default_allocator;
}

void *df__malloc(df_loop *loop, size_t size)
{
    const df_allocator *a = df__allocator(loop);
    return a->malloc(size, a->ctx);
}

void *df__calloc(df_loop *loop, size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    void *p = df__malloc(loop, n * size);
    if (p != NULL)
        memset(p, 0, n * size);
    return p;
}

void *df__realloc(df_loop *loop, void *ptr, size_t size)
{
    const df_allocator *a = df__allocator(loop);
    return a->realloc(ptr, size, a->ctx);
}

void df__free(df_loop *loop, void *ptr)
{
    const df_allocator *a = df__allocator(loop);
    if (ptr != NULL)
        a->free(ptr, a->ctx);
}

/* ------------------------------------------------- thread check, unhandled */


_Static_assert(offsetof(struct df_loop, fork_gen) ==
                   offsetof(df__loop_id, fork_gen),
               "struct df_loop must start like df__loop_id");

atomic_uint df__fork_gen;

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static int fork_hook_rc; /* pthread_atfork's result; written once */

/* Runs in the child of fork(2), which has one thread: every loop made so
 * far now belongs to an older generation. */
static void fork_child(void)
{
    atomic_fetch_add_explicit(&df__fork_gen, 1, memory_order_relaxed);
}

static void fork_register(void)
{
    fork_hook_rc = pthread_atfork(NULL, NULL, fork_child);
}

void df__wrong_thread(const char *func)
{
    fprintf(stderr,
            "libdeferred: %s called from a thread that does not own "
            "the object; call ignored\n",
            func);
}

static void default_unhandled(df_failure *f, void *arg)
{
    DF__UNUSED(arg);
    fprintf(stderr, "libdeferred: unhandled failure: %s: %s\n",
            df_err_name(df_failure_code(f)), df_failure_message(f));
}

void df__report_unhandled(df_loop *loop, df_failure *f)
{
    loop->unhandled_count++;
    loop->unhandled(f, loop->unhandled_arg);
}

void df__loop_pending_add(df_loop *loop, long delta)
{
    assert(delta >= 0 || loop->jobs >= (size_t)-delta);
    loop->jobs = (size_t)((long)loop->jobs + delta);
}

void df__loop_pools_add(df_loop *loop, int delta)
{
    assert(delta >= 0 || loop->pools >= (size_t)-delta);
    loop->pools = (size_t)((long)loop->pools + delta);
}

void df__loop_objects_add(df_loop *loop, int delta)
{
    assert(delta >= 0 || loop->objects >= (size_t)-delta);
    loop->objects = (size_t)((long)loop->objects + delta);
}

/* ------------------------------------------------------------------ inbox */

/* Makes wake_fd readable unless a write is already owed.  Any thread. */
static void wake(df_loop *loop)
{
    if (atomic_exchange_explicit(&loop->wake_pending, true,
                                 memory_order_seq_cst))
        return;
    /* write(2) is a cancellation point.  A caller cancelled in it would
     * leave the flag set with no write made, and every later producer
     * would skip its own: the write must happen once the flag is ours. */
    int cancel_state;
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel_state);
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(loop->wake_fd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
    /* EAGAIN means the counter is near overflow: the fd is readable. */
    pthread_setcancelstate(cancel_state, NULL);
}

void df__loop_wake(df_loop *loop)
{
    wake(loop);
}

void df__loop_post_lazy(df_loop *loop, df__inbox_node *n)
{
    n->next = NULL;
    pthread_mutex_lock(&loop->inbox_lock);
    *loop->inbox_tail = n;
    loop->inbox_tail = &n->next;
    pthread_mutex_unlock(&loop->inbox_lock);
}

void df__loop_post(df_loop *loop, df__inbox_node *n)
{
    df__loop_post_lazy(loop, n);
    wake(loop);
}

void df__loop_lazy_add(df_loop *loop, long delta)
{
    assert(delta >= 0 || loop->lazy >= (size_t)-delta);
    loop->lazy = (size_t)((long)loop->lazy + delta);
}

/* Moves everything posted so far to the end of loop->batch, and hands the
 * call nodes run since last time back to the producers' free list in the
 * same critical section.  Loop thread. */
static void inbox_collect(df_loop *loop)
{
    df__inbox_node *spent = loop->spent_calls;
    df__inbox_node *spent_last = NULL;
    for (df__inbox_node *n = spent; n != NULL; n = n->next)
        spent_last = n;
    loop->spent_calls = NULL;

    pthread_mutex_lock(&loop->inbox_lock);
    if (spent_last != NULL) {
        spent_last->next = loop->call_free;
        loop->call_free = spent;
    }
    if (loop->inbox_head != NULL) {
        *loop->batch_tail = loop->inbox_head;
        loop->batch_tail = loop->inbox_tail;
        loop->inbox_head = NULL;
        loop->inbox_tail = &loop->inbox_head;
    }
    pthread_mutex_unlock(&loop->inbox_lock);
}

/* Re-arms producers' wake-ups and drains the eventfd (see the top of the
 * file).  Returns true when nothing is queued, so that the loop may block.
 * Loop thread. */
static bool settle(df_loop *loop)
{
    uint64_t count;
    ssize_t n;
    do /* EAGAIN: nothing was written */
        n = read(loop->wake_fd, &count, sizeof count);
    while (n < 0 && errno == EINTR);
    atomic_store_explicit(&loop->wake_pending, false, memory_order_seq_cst);
    if (loop->batch_head != NULL)
        return false;
    pthread_mutex_lock(&loop->inbox_lock);
    bool empty = loop->inbox_head == NULL;
    pthread_mutex_unlock(&loop->inbox_lock);
    return empty;
}

/* Makes the fd readable whatever the flag says.  Loop thread. */
static void force_wake(df_loop *loop)
{
    /* Producers need not write while the fd is readable anyway. */
    atomic_store_explicit(&loop->wake_pending, true, memory_order_seq_cst);
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(loop->wake_fd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
}

static df__inbox_node *batch_pop(df_loop *loop)
{
    df__inbox_node *n = loop->batch_head;
    if (n != NULL) {
        loop->batch_head = n->next;
        if (loop->batch_head == NULL)
            loop->batch_tail = &loop->batch_head;
        n->next = NULL;
    }
    return n;
}

size_t df__loop_run_matching(df_loop *loop,
                             bool (*match)(const df__inbox_node *n, void *arg),
                             void *arg)
{
    assert(df__on_loop_thread(loop));
    inbox_collect(loop);

    /* Take the matching entries out first, keeping the others in order,
     * so that callbacks run below may drain the batch themselves. */
    df__inbox_node *mine = NULL, **mine_tail = &mine;
    df__inbox_node **link = &loop->batch_head;
    loop->batch_tail = &loop->batch_head;
    while (*link != NULL) {
        df__inbox_node *n = *link;
        if (match(n, arg)) {
            *link = n->next;
            n->next = NULL;
            *mine_tail = n;
            mine_tail = &n->next;
        } else {
            link = &n->next;
            loop->batch_tail = link;
        }
    }

    bool was_dispatching = loop->dispatching;
    loop->dispatching = true;
    size_t ran = 0;
    while (mine != NULL) {
        df__inbox_node *n = mine;
        mine = n->next;
        n->next = NULL;
        n->run(loop, n, 0);
        ran++;
    }
    loop->dispatching = was_dispatching;
    return ran;
}

static void call_run(df_loop *loop, df__inbox_node *n, int status)
{
    call_node *c = DF__CONTAINER_OF(n, call_node, node);
    df_call_fn fn = c->fn;
    void *arg = c->arg;
    n->next = loop->spent_calls;
    loop->spent_calls = n;
    atomic_fetch_sub_explicit(&loop->calls, 1, memory_order_relaxed);
    fn(arg, status);
}

int df_loop_call_from_thread(df_loop *loop, df_call_fn fn, void *arg)
{
    if (loop == NULL || fn == NULL)
        return DF_EINVAL;
    if (df__loop_forked(loop))
        return DF_EFORKED; /* its lock may be held by a thread now gone */
    pthread_mutex_lock(&loop->inbox_lock);
    df__inbox_node *n = loop->call_free;
    if (n != NULL)
        loop->call_free = n->next;
    pthread_mutex_unlock(&loop->inbox_lock);
    if (n == NULL) {
        call_node *c = df__malloc(loop, sizeof *c);
        if (c == NULL)
            return DF_ENOMEM;
        n = &c->node;
    }
    call_node *c = DF__CONTAINER_OF(n, call_node, node);
    c->node.run = call_run;
    c->fn = fn;
    c->arg = arg;
    /* Counted before it is visible, so that df_loop_run() cannot see an
     * empty inbox and nothing pending while this call is on its way. */
    atomic_fetch_add_explicit(&loop->calls, 1, memory_order_relaxed);
    df__loop_post(loop, n);
    return 0;
}

/* ----------------------------------------------------------------- timers */

uint64_t df_loop_now(const df_loop *loop)
{
    DF__UNUSED(loop);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static bool timer_before(const df_timer *a, const df_timer *b)
{
    return a->deadline < b->deadline ||
           (a->deadline == b->deadline && a->seq < b->seq);
}

static void heap_set(df_loop *loop, size_t i, df_timer *t)
{
    loop->heap[i] = t;
    t->index = i;
}

static void heap_up(df_loop *loop, size_t i)
{
    df_timer *t = loop->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!timer_before(t, loop->heap[parent]))
            break;
        heap_set(loop, i, loop->heap[parent]);
        i = parent;
    }
    heap_set(loop, i, t);
}

static void heap_down(df_loop *loop, size_t i)
{
    df_timer *t = loop->heap[i];
    size_t len = loop->heap_len;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= len)
            break;
        if (child + 1 < len &&
            timer_before(loop->heap[child + 1], loop->heap[child]))
            child++;
        if (!timer_before(loop->heap[child], t))
            break;
        heap_set(loop, i, loop->heap[child]);
        i = child;
    }
    heap_set(loop, i, t);
}

static void heap_remove(df_loop *loop, df_timer *t)
{
    size_t i = t->index;
    assert(i < loop->heap_len && loop->heap[i] == t);
    df_timer *last = loop->heap[--loop->heap_len];
    t->index = SIZE_MAX;
    if (last != t) {
        heap_set(loop, i, last);
        if (i > 0 && timer_before(last, loop->heap[(i - 1) / 2]))
            heap_up(loop, i);
        else
            heap_down(loop, i);
    }
}

static void timer_release(df_loop *loop, df_timer *t)
{
    t->index = SIZE_MAX;
    t->fn = NULL;
    if (loop->timer_free_len < TIMER_FREE_MAX) {
        t->next_free = loop->timer_free;
        loop->timer_free = t;
        loop->timer_free_len++;
    } else {
        df__free(loop, t);
    }
}

int df_loop_call_later(df_loop *loop, uint64_t delay_ns, df_call_fn fn,
                       void *arg, df_timer **out)
{
    if (loop == NULL || fn == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    if (loop->heap_len == loop->heap_cap) {
        size_t cap = loop->heap_cap ? 2 * loop->heap_cap : 16;
        df_timer **heap = df__realloc(loop, loop->heap, cap * sizeof *heap);
        if (heap == NULL)
            return DF_ENOMEM;
        loop->heap = heap;
        loop->heap_cap = cap;
    }
    df_timer *t = loop->timer_free;
    if (t != NULL) {
        loop->timer_free = t->next_free;
        loop->timer_free_len--;
    } else if ((t = df__malloc(loop, sizeof *t)) == NULL) {
        return DF_ENOMEM;
    }
    uint64_t now = df_loop_now(loop);
    t->deadline = delay_ns > UINT64_MAX - now ? UINT64_MAX : now + delay_ns;
    t->seq = loop->timer_seq++;
    t->fn = fn;
    t->arg = arg;
    t->loop = loop;
    t->next_free = NULL;
    loop->heap[loop->heap_len++] = t;
    heap_up(loop, loop->heap_len - 1);
    if (out != NULL)
        *out = t;
    return 0;
}

int df_timer_cancel(df_timer *t)
{
    if (t == NULL)
        return DF_EINVAL;
    df_loop *loop = t->loop;
    DF__CHECK_THREAD(loop);
    /* Cheap armour against a stale handle still on the free list. */
    if (t->index >= loop->heap_len || loop->heap[t->index] != t)
        return DF_EINVAL;
    heap_remove(loop, t);
    timer_release(loop, t);
    return 0;
}

/* ------------------------------------------------------------- dispatching */

/* Why a dispatch pass gives control back early. */
static bool should_return(const df_loop *loop, df_deferred *until)
{
    return loop->stop || (until != NULL && df_deferred_called(until));
}

/* Runs the timers due now.  Timers made by these callbacks wait for the
 * next pass even if due at once (seq_limit), so a timer re-arming itself
 * with delay 0 cannot starve the inbox.  With `check`, returns after the
 * callback that made should_return() true, setting *halt. */
static unsigned run_timers(df_loop *loop, bool check, df_deferred *until,
                           bool *halt)
{
    unsigned ran = 0;
    if (loop->heap_len == 0)
        return 0;
    uint64_t now = df_loop_now(loop);
    uint64_t seq_limit = loop->timer_seq;
    while (loop->heap_len > 0) {
        df_timer *t = loop->heap[0];
        if (t->deadline > now || t->seq >= seq_limit)
            break;
        heap_remove(loop, t);
        df_call_fn fn = t->fn;
        void *arg = t->arg;
        timer_release(loop, t);
        fn(arg, 0);
        ran++;
        if (check && should_return(loop, until)) {
            *halt = true;
            break;
        }
    }
    return ran;
}

static size_t pending(const df_loop *loop)
{
    return loop->jobs + loop->heap_len +
           atomic_load_explicit(&loop->calls, memory_order_relaxed);
}

static int timer_timeout_ms(const df_loop *loop)
{
    if (loop->heap_len == 0)
        return -1;
    uint64_t now = df_loop_now(loop);
    uint64_t deadline = loop->heap[0]->deadline;
    if (deadline <= now)
        return 0;
    /* Round up: waking before the deadline would only spin. */
    uint64_t ms = (deadline - now + 999999u) / 1000000u;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

static int timeout_ms(const df_loop *loop)
{
    if (loop->batch_head != NULL)
        return 0;
    int ms = timer_timeout_ms(loop);
    /* Jobs that post their completions without a wake-up are in flight:
     * look at the inbox at least every DF__LAZY_MS. */
    if (loop->lazy > 0 && (ms < 0 || ms > DF__LAZY_MS))
        ms = DF__LAZY_MS;
    return ms;
}

/* Gives control back: producers' wake-ups are re-armed, and if anything is
 * queued (taken but not run, or posted meanwhile) the fd is left readable
 * for whoever drives the loop next (df_loop_run or an external poller). */
static void finish_pass(df_loop *loop)
{
    if (!settle(loop))
        force_wake(loop);
    loop->dispatching = false;
}

static int loop_run(df_loop *loop, df_deferred *until)
{
    if (loop->dispatching)
        return DF_ESTATE;
    loop->dispatching = true;
    int rc;
    for (;;) {
        if (loop->stop) {
            loop->stop = false;
            rc = until != NULL ? DF_ECANCELLED : 0;
            break;
        }
        if (until != NULL && df_deferred_called(until)) {
            rc = 0;
            break;
        }
        bool halt = false;
        unsigned ran = run_timers(loop, true, until, &halt);
        if (halt)
            continue;
        inbox_collect(loop);
        df__inbox_node *n;
        while ((n = batch_pop(loop)) != NULL) {
            n->run(loop, n, 0);
            ran++;
            if (should_return(loop, until)) {
                halt = true;
                break;
            }
        }
        if (halt || ran > 0)
            continue;
        if (pending(loop) == 0) {
            rc = until != NULL ? DF_ENOT_CALLED : 0;
            break;
        }
        if (!settle(loop))
            continue; /* posted meanwhile */
        struct pollfd pfd = {loop->wake_fd, POLLIN, 0};
        (void)poll(&pfd, 1, timeout_ms(loop)); /* EINTR: just go round */
    }
    finish_pass(loop);
    return rc;
}

int df_loop_run(df_loop *loop)
{
    if (loop == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    return loop_run(loop, NULL);
}

int df_loop_run_until(df_loop *loop, df_deferred *d)
{
    if (loop == NULL || d == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    if (df_deferred_loop(d) != loop)
        return DF_EINVAL; /* it could only fire on its own loop's thread */
    return loop_run(loop, d);
}

int df_loop_stop(df_loop *loop)
{
    if (loop == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    loop->stop = true;
    return 0;
}

int df_loop_dispatch(df_loop *loop, unsigned budget, unsigned *ran)
{
    if (loop == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    if (loop->dispatching)
        return DF_ESTATE;
    loop->dispatching = true;
    unsigned count = run_timers(loop, false, NULL, NULL);
    inbox_collect(loop);
    unsigned done = 0;
    df__inbox_node *n;
    while ((budget == 0 || done < budget) && (n = batch_pop(loop)) != NULL) {
        n->run(loop, n, 0);
        done++;
    }
    finish_pass(loop);
    if (ran != NULL)
        *ran = count + done;
    return 0;
}

int df_loop_fd(const df_loop *loop)
{
    if (loop == NULL)
        return DF_EINVAL;
    return loop->wake_fd;
}

int df_loop_timeout_ms(const df_loop *loop)
{
    if (loop == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    return timeout_ms(loop);
}

size_t df_loop_pending(const df_loop *loop)
{
    if (loop == NULL)
        return 0;
    if (!df__loop_usable(loop, __func__))
        return 0;
    return pending(loop);
}

/* ---------------------------------------------------------------- timeout */

/*
 * df_deferred_set_timeout, Twisted's addTimeout, built on the public API: a
 * timer that marks the state "timed out" and cancels d, and a pass-through
 * pair added to d that cancels the timer if it is still pending and turns a
 * DF_ECANCELLED failure into DF_ETIMEDOUT when the timer did fire.
 *
 * The state holds a reference to d until that pair has run, as Twisted's
 * delayed call keeps its deferred alive: a deferred dropped unfired times
 * out at its deadline, and a fired one waiting on an inner deferred cannot
 * be released while the timer still points at it.
 */
typedef struct timeout_state {
    df_loop *loop;
    df_deferred *d;  /* our reference */
    df_timer *timer; /* NULL once expired or cancelled */
    uint64_t timeout_ns;
    bool timed_out;
} timeout_state;

static void timeout_expired(void *arg, int status)
{
    DF__UNUSED(status);
    timeout_state *ts = arg;
    ts->timer = NULL;
    ts->timed_out = true;
    /* May run timeout_done, which frees ts: do not touch it afterwards. */
    df_deferred_cancel(ts->d);
}

static df_result timeout_done(df_result r, void *arg)
{
    timeout_state *ts = arg;
    df_loop *loop = ts->loop;
    if (ts->timer != NULL)
        df_timer_cancel(ts->timer);
    if (ts->timed_out && r.failure != NULL &&
        df_failure_code(r.failure) == DF_ECANCELLED) {
        df_result_clear(&r);
        r = df_errf(loop, DF_ETIMEDOUT, "deferred timed out after %.3f s",
                    (double)ts->timeout_ns / 1e9);
    }
    /* The chain being run holds its own reference to d. */
    df_deferred_unref(ts->d);
    df__free(loop, ts);
    return r;
}

int df_deferred_set_timeout(df_deferred *d, uint64_t timeout_ns)
{
    if (d == NULL)
        return DF_EINVAL;
    df_loop *loop = df_deferred_loop(d);
    DF__CHECK_THREAD(loop);
    timeout_state *ts = df__malloc(loop, sizeof *ts);
    if (ts == NULL)
        return DF_ENOMEM;
    *ts = (timeout_state){loop, d, NULL, timeout_ns, false};
    int rc =
        df_loop_call_later(loop, timeout_ns, timeout_expired, ts, &ts->timer);
    if (rc != 0)
        goto fail_free;
    if (!df__deferred_mark_timeout(d)) {
        rc = DF_EBUSY;
        goto fail_timer;
    }
    df_deferred_ref(d);
    /* On a deferred that has fired, this runs timeout_done at once, which
     * cancels the timer again (Twisted does the same). */
    rc = df_deferred_add_both(d, timeout_done, ts);
    if (rc != 0) {
        /* Out of memory: d has no timeout, so it may be given one later. */
        df__deferred_unmark_timeout(d);
        df_deferred_unref(d);
        goto fail_timer;
    }
    return 0;

fail_timer:
    df_timer_cancel(ts->timer);
fail_free:
    df__free(loop, ts);
    return rc;
}

/* ------------------------------------------------------------- life cycle */

int df_loop_new(const df_loop_options *opts, df_loop **out)
{
    if (out == NULL)
        return DF_EINVAL;
    pthread_once(&fork_once, fork_register);
    if (fork_hook_rc != 0)
        return -fork_hook_rc;
    const df_allocator *a = &default_allocator;
    if (opts != NULL && opts->allocator != NULL) {
        a = opts->allocator;
        if (a->malloc == NULL || a->realloc == NULL || a->free == NULL)
            return DF_EINVAL;
    }
    df_loop *loop = a->malloc(sizeof *loop, a->ctx);
    if (loop == NULL)
        return DF_ENOMEM;
    memset(loop, 0, sizeof *loop);
    loop->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (loop->wake_fd < 0) {
        int rc = -errno;
        a->free(loop, a->ctx);
        return rc;
    }
    int rc = pthread_mutex_init(&loop->inbox_lock, NULL);
    if (rc != 0) {
        close(loop->wake_fd);
        a->free(loop, a->ctx);
        return -rc;
    }
    loop->alloc = *a;
    loop->thread = pthread_self();
    loop->fork_gen = atomic_load_explicit(&df__fork_gen, memory_order_relaxed);
    loop->unhandled = default_unhandled;
    if (opts != NULL && opts->unhandled != NULL) {
        loop->unhandled = opts->unhandled;
        loop->unhandled_arg = opts->unhandled_arg;
    }
    loop->inbox_tail = &loop->inbox_head;
    loop->batch_tail = &loop->batch_head;
    atomic_init(&loop->wake_pending, false);
    atomic_init(&loop->calls, 0);
    *out = loop;
    return 0;
}

static void free_call_list(df_loop *loop, df__inbox_node *n)
{
    while (n != NULL) {
        df__inbox_node *next = n->next;
        df__free(loop, DF__CONTAINER_OF(n, call_node, node));
        n = next;
    }
}

int df_loop_free(df_loop *loop)
{
    if (loop == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    if (loop->dispatching)
        return DF_ESTATE;
    /* Live objects point at the loop (its allocator, caches, thread):
     * refuse, as uv_loop_close() does with open handles. */
    if (loop->pools != 0 || loop->jobs != 0 || loop->heap_len != 0 ||
        loop->objects != 0)
        return DF_EBUSY;

    /* Run the cross-thread calls still queued, with DF_ECANCELLED, until
     * none is left (they may queue more). */
    loop->dispatching = true;
    for (;;) {
        inbox_collect(loop);
        df__inbox_node *n = batch_pop(loop);
        if (n == NULL)
            break;
        do
            n->run(loop, n, DF_ECANCELLED);
        while ((n = batch_pop(loop)) != NULL);
    }
    /* A callback above may have made a timer; it can no longer run. */
    for (size_t i = 0; i < loop->heap_len; i++)
        df__free(loop, loop->heap[i]);
    while (loop->timer_free != NULL) {
        df_timer *t = loop->timer_free;
        loop->timer_free = t->next_free;
        df__free(loop, t);
    }
    free_call_list(loop, loop->spent_calls);
    free_call_list(loop, loop->call_free);
    for (int i = 0; i < DF__CACHES; i++) {
        void *block;
        while ((block = df__cache_get(&loop->caches[i])) != NULL)
            df__free(loop, block);
    }
    df__free(loop, loop->heap);
    close(loop->wake_fd);
    pthread_mutex_destroy(&loop->inbox_lock);
    df_allocator a = loop->alloc;
    a.free(loop, a.ctx);
    return 0;
}

int df_loop_set_unhandled(df_loop *loop, df_unhandled_fn fn, void *arg)
{
    if (loop == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    loop->unhandled = fn != NULL ? fn : default_unhandled;
    loop->unhandled_arg = fn != NULL ? arg : NULL;
    return 0;
}

uint64_t df_loop_unhandled_count(const df_loop *loop)
{
    return loop != NULL ? loop->unhandled_count : 0;
}
