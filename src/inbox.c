/* SPDX-License-Identifier: MIT */
/* The completion inbox, the wake fd and cross-thread calls of a loop. */
#include <errno.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "loop-internal.h"

/*
 * Threads and locks
 * =================
 * This file owns the loop's only lock.  Everything in struct df_loop
 * (loop-internal.h) belongs to the loop thread except the inbox
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
 * poller (df__inbox_settle()), so while the loop is busy, posts cost no system call
 * at all, and N posts between two sleeps cost one write(2).
 *
 * df__inbox_settle() does three things in this order: drain the eventfd (a
 * non-blocking read), clear the flag, look at the inbox.  An entry appended
 * before the look is seen by it.  An entry appended after the look comes
 * with an exchange of the flag that follows our clear; either it finds the
 * flag clear and writes, or another producer set the flag after our clear
 * and writes.  Both writes come after the drain, so poll(2) returns.  A
 * producer that set the flag before our clear and writes late only costs
 * a spurious wake-up.  So when df__inbox_settle() finds the inbox empty, the loop
 * may block; when it does not, it must not, and a loop giving control away
 * makes the fd readable itself (df__inbox_force_wake()).
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
 * left in the batch, which make timeout_ms() return 0 and df__inbox_settle()
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
void df__inbox_collect(df_loop *loop)
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
bool df__inbox_settle(df_loop *loop)
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
void df__inbox_force_wake(df_loop *loop)
{
    /* Producers need not write while the fd is readable anyway. */
    atomic_store_explicit(&loop->wake_pending, true, memory_order_seq_cst);
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(loop->wake_fd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
}

df__inbox_node *df__batch_pop(df_loop *loop)
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
    df__inbox_collect(loop);

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
    df__call_node *c = DF__CONTAINER_OF(n, df__call_node, node);
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
        df__call_node *c = df__malloc(loop, sizeof *c);
        if (c == NULL)
            return DF_ENOMEM;
        n = &c->node;
    }
    df__call_node *c = DF__CONTAINER_OF(n, df__call_node, node);
    c->node.run = call_run;
    c->fn = fn;
    c->arg = arg;
    /* Counted before it is visible, so that df_loop_run() cannot see an
     * empty inbox and nothing pending while this call is on its way. */
    atomic_fetch_add_explicit(&loop->calls, 1, memory_order_relaxed);
    df__loop_post(loop, n);
    return 0;
}


/* ------------------------------------------------------------- life cycle */

int df__inbox_init(df_loop *loop)
{
    loop->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (loop->wake_fd < 0)
        return -errno;
    int rc = pthread_mutex_init(&loop->inbox_lock, NULL);
    if (rc != 0) {
        close(loop->wake_fd);
        return -rc;
    }
    loop->inbox_tail = &loop->inbox_head;
    loop->batch_tail = &loop->batch_head;
    atomic_init(&loop->wake_pending, false);
    atomic_init(&loop->calls, 0);
    return 0;
}

static void free_call_list(df_loop *loop, df__inbox_node *n)
{
    while (n != NULL) {
        df__inbox_node *next = n->next;
        df__free(loop, DF__CONTAINER_OF(n, df__call_node, node));
        n = next;
    }
}

void df__inbox_fini(df_loop *loop)
{
    /* Run the cross-thread calls still queued, with DF_ECANCELLED, until
     * none is left (they may queue more). */
    for (;;) {
        df__inbox_collect(loop);
        df__inbox_node *n = df__batch_pop(loop);
        if (n == NULL)
            break;
        do
            n->run(loop, n, DF_ECANCELLED);
        while ((n = df__batch_pop(loop)) != NULL);
    }
    free_call_list(loop, loop->spent_calls);
    free_call_list(loop, loop->call_free);
    loop->spent_calls = loop->call_free = NULL;
    close(loop->wake_fd);
    pthread_mutex_destroy(&loop->inbox_lock);
}
