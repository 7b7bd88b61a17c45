/* SPDX-License-Identifier: MIT */
/* The completion inbox, the wake fd and cross-thread calls of a loop. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#ifdef DF_HAVE_EVENTFD
#include <sys/eventfd.h>
#endif

#include "loop-internal.h"

/* Helgrind sees no order in C11 atomics, so the hand-over of an entry
 * through the lock-free inbox is told to it (a few instructions outside
 * valgrind; nothing without valgrind's headers). */
#include "annotate.h"

/*
 * Threads and locks
 * =================
 * This file owns the loop's only lock, `call_lock`; it is a leaf: nothing
 * else is locked while it is held, and no user code runs under it.  It
 * protects `call_free`, the spare cross-thread call nodes, and nothing
 * else.  The inbox itself takes no lock, and a pool's mutex is never held
 * while posting, so the pool and the loop have no lock order between them.
 * Everything in struct df_loop (loop-internal.h) belongs to the loop
 * thread except `inbox`, `call_free`, the atomics `sleep` and `calls`,
 * and the wake fd, which any thread may write to.
 *
 * The inbox
 * ---------
 * Producers push intrusive nodes onto `inbox`, a lock-free stack (one
 * compare-and-swap; a node is pushed by one producer and taken only by
 * the loop, all at once, so there is no ABA problem).  The loop takes the
 * whole stack with one exchange, reverses it into push order and appends
 * it to `batch`, which it then runs without any lock.  Push order is the
 * order of the successful swaps, so entries keep their posting order, per
 * producer and overall.  `batch` lives in the loop so that a nested drain
 * (a pool shutdown from inside a callback) sees the same entries and
 * nothing is run twice or lost.
 *
 * Wake-ups
 * --------
 * `sleep` says what the loop is doing: DF__AWAKE while it is known to be
 * awake, DF__SLEEP_INF while it may block with no bound (or has handed
 * control to an external poller), DF__SLEEP_TIMED while it may block for
 * at most DF__WAKE_DEFER_NS (or until an earlier timer).  A producer pushes,
 * then reads `sleep`:
 *   - DF__AWAKE: nothing more to do, no system call;
 *   - DF__SLEEP_INF: if it is the one that flips `sleep` to DF__AWAKE, it
 *     writes to the wake fd (df__loop_post, df__loop_wake);
 *   - DF__SLEEP_TIMED: the same, except that df__loop_post_batched (a pool
 *     worker posting a job whose token it hands on to the job it runs
 *     next) may leave its entry unannounced: the timed sleep ends by
 *     itself.  It wakes the loop anyway once DF__WAKE_BATCH of its entries
 *     are unannounced, and a worker that goes idle posts with
 *     df__loop_post, which always wakes a sleeping loop.
 * So while the loop is awake a post costs one atomic load and no system
 * call, one sleep costs at most one write however many entries arrive
 * meanwhile, and a stream of completions faster than the loop sleeps costs
 * the workers one write per DF__WAKE_BATCH completions at most, instead of
 * one per completion (the loop wakes by its timeout instead).
 *
 * The loop chooses (loop.c, loop_run): DF__SLEEP_TIMED only when the turn
 * since its last sleep ran inbox entries and pool jobs are still due, that
 * is, while completions are streaming in; otherwise DF__SLEEP_INF.  A timed
 * sleep that finds nothing when it ends therefore makes the next sleep
 * unbounded: a long or blocked job costs an idle loop at most one timed
 * wake-up, never a periodic poll (tests/check_pool,
 * test_pool_long_job_few_wakeups).
 *
 * Why no entry waits longer than DF__WAKE_DEFER_NS unannounced.  A worker
 * whose next job blocks until the loop has seen the previous results
 * (tests/check_map's gated tests; an earlier version that deferred
 * wake-ups with no bound in time deadlocked there) must not wait for a
 * wake-up that only its own next post would send.  An entry is left
 * unannounced only when its producer read DF__SLEEP_TIMED after its push.
 * Then the loop's look (below) either sees the entry, or blocks for at most
 * DF__WAKE_DEFER_NS and collects the inbox when it wakes, before it can
 * block again.
 *
 * The loop stores its choice (arm) and then looks at the inbox; it blocks
 * only if the inbox and the batch are empty.  After it wakes it stores
 * DF__AWAKE (disarm) and drains the fd if poll(2) said it was readable.
 *
 * Why no wake-up is lost.  The push and the load on the producer's side,
 * the store and the look on the loop's side, are sequentially consistent,
 * so they fall in one total order.  If the push comes before the look, the
 * look sees the entry and the loop does not block.  Otherwise the arm came
 * before the push, hence before the producer's load, which then reads the
 * armed state (DF__SLEEP_INF or DF__SLEEP_TIMED, the last store before it
 * in that order), unless `sleep` was flipped back in between: by another
 * producer, which writes (that write comes after the arm, and the loop
 * does not drain between the arm and the poll, so the poll returns), or
 * by the loop, which only does so after its poll returned, and collects
 * the inbox after that, so it sees the entry before it can block again.
 * A producer that reads DF__SLEEP_INF flips and writes; one that reads
 * DF__SLEEP_TIMED and defers relies on the timeout, which the loop always
 * sets when it arms DF__SLEEP_TIMED.  A write that lands after the loop
 * woke for another reason leaves the fd readable: the next poll returns at
 * once and drains it; that costs one spurious turn, never a lost entry,
 * and never a fd that stays readable (each disarm that follows a readable
 * poll drains).

 * A producer that won the flip and is slow to write delays the wake-up
 * until it writes; it cannot lose it.  A producer cancelled between the
 * two would, so the write runs with cancellation disabled (the flip and
 * the write are not cancellation points; write(2) is).
 *
 * An external poller (df_loop_fd, df_loop_dispatch) is handled the same
 * way: a dispatch disarms and drains at its start; at its end the loop
 * arms DF__SLEEP_INF (the poller's timeout is not ours to bound), and if anything is queued (a budget left entries, or one was
 * pushed meanwhile) it makes the fd readable itself (force wake), so that
 * the poller calls again.
 *
 * An earlier version cleared its flag before draining the fd and lost
 * wake-ups (tests/check_loop, test_loop_wake_after_late_producer splits a
 * post into its push and its wake-up to widen that window).
 */

/* ---------------------------------------------------------------- wake fd */

/* Moves a descriptor the library made above 2, so that a program that
 * closed stdin (or stdout) does not find our fd where it expects its
 * own.  Returns the fd to use, or -1 with errno set. */
static int above_stdio(int fd)
{
    if (fd < 0 || fd > 2)
        return fd;
    int moved = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    int err = errno;
    close(fd);
    errno = err;
    return moved;
}

static int fd_open(df_loop *loop)
{
#ifdef DF_HAVE_EVENTFD
    int fd = above_stdio(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (fd < 0)
        return -errno;
    loop->wake_fd = loop->wake_wfd = fd;
    return 0;
#else
    int fds[2];
    if (pipe(fds) != 0)
        return -errno;
    for (int i = 0; i < 2; i++) {
        int fd = above_stdio(fds[i]);
        if (fd < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) != 0 ||
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) {
            int rc = -errno;
            if (fd >= 0)
                close(fd);
            if (i == 0)
                close(fds[1]);
            else
                close(fds[0]);
            return rc;
        }
        fds[i] = fd;
    }
    loop->wake_fd = fds[0];
    loop->wake_wfd = fds[1];
    return 0;
#endif
}

static void fd_close(df_loop *loop)
{
    if (loop->wake_wfd != loop->wake_fd)
        close(loop->wake_wfd);
    close(loop->wake_fd);
}

/* Makes the fd readable.  EAGAIN means it is readable already. */
static void fd_write(df_loop *loop)
{
#ifdef DF_HAVE_EVENTFD
    uint64_t one = 1;
#else
    char one = 1;
#endif
    ssize_t n;
    do
        n = write(loop->wake_wfd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
}

/* Empties the fd.  Loop thread. */
static void fd_drain(df_loop *loop)
{
#ifdef DF_HAVE_EVENTFD
    uint64_t buf[1];
#else
    char buf[64];
#endif
    ssize_t n;
    do /* EAGAIN: nothing was written */
        n = read(loop->wake_fd, buf, sizeof buf);
    while ((n < 0 && errno == EINTR) || n == (ssize_t)sizeof buf);
}

/* --------------------------------------------------------------- posting */

/* Flips `sleep` to DF__AWAKE and writes to the fd if it was not awake
 * already and this thread is the one that flipped it. */
static void wake_if_asleep(df_loop *loop)
{
    if (atomic_exchange_explicit(&loop->sleep, DF__AWAKE,
                                 memory_order_seq_cst) == DF__AWAKE)
        return; /* awake, or another producer flipped it and writes */
    int cancel_state;
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel_state);
    fd_write(loop);
    pthread_setcancelstate(cancel_state, NULL);
}

void df__loop_wake(df_loop *loop)
{
    if (atomic_load_explicit(&loop->sleep, memory_order_seq_cst) !=
        DF__AWAKE)
        wake_if_asleep(loop);
}

void df__loop_append(df_loop *loop, df__inbox_node *n)
{
    df__inbox_node *head =
        atomic_load_explicit(&loop->inbox, memory_order_relaxed);
    do {
        n->next = head;
        ANNOTATE_HAPPENS_BEFORE(&loop->inbox);
    } while (!atomic_compare_exchange_weak_explicit(
        &loop->inbox, &head, n, memory_order_seq_cst, memory_order_relaxed));
}

void df__loop_post(df_loop *loop, df__inbox_node *n)
{
    df__loop_append(loop, n);
    df__loop_wake(loop);
}

void df__loop_post_batched(df_loop *loop, df__inbox_node *n,
                           unsigned *unwoken)
{
    df__loop_append(loop, n);
    int s = atomic_load_explicit(&loop->sleep, memory_order_seq_cst);
    if (s == DF__AWAKE) {
        *unwoken = 0; /* the loop looks at the inbox before it sleeps */
        return;
    }
    if (s == DF__SLEEP_TIMED && ++*unwoken < DF__WAKE_BATCH)
        return; /* the timed sleep ends by itself (see the top) */
    *unwoken = 0;
    wake_if_asleep(loop);
}

/* ------------------------------------------------------------- loop side */

void df__inbox_collect(df_loop *loop)
{
    df__inbox_node *spent = loop->spent_calls;
    if (spent != NULL) {
        df__inbox_node *last = spent;
        while (last->next != NULL)
            last = last->next;
        loop->spent_calls = NULL;
        pthread_mutex_lock(&loop->call_lock);
        last->next = loop->call_free;
        loop->call_free = spent;
        pthread_mutex_unlock(&loop->call_lock);
    }
    if (atomic_load_explicit(&loop->inbox, memory_order_relaxed) == NULL)
        return;
    df__inbox_node *n =
        atomic_exchange_explicit(&loop->inbox, NULL, memory_order_acquire);
    ANNOTATE_HAPPENS_AFTER(&loop->inbox);
    /* Reverse the stack into push order.  Most entries are pool jobs,
     * written by a worker a moment ago: each is a cache miss, one after
     * the other, so the job's io, DF__JOB_IO_BACK bytes before its node
     * and on another cache line (pool-internal.h, df__job_io_of), is asked
     * for at the same time.  The address is computed as an integer, and a
     * prefetch never faults, whatever the entry is. */
    df__inbox_node *first = NULL, *last = n;
    while (n != NULL) {
        __builtin_prefetch((const void *)((uintptr_t)n - DF__JOB_IO_BACK),
                           1);
        df__inbox_node *next = n->next;
        n->next = first;
        first = n;
        n = next;
    }
    if (loop->batch_head == NULL)
        loop->batch_head = first; /* batch_tail may be stale */
    else
        *loop->batch_tail = first;
    loop->batch_tail = &last->next;
}

bool df__inbox_arm(df_loop *loop, bool timed)
{
    atomic_store_explicit(&loop->sleep,
                          timed ? DF__SLEEP_TIMED : DF__SLEEP_INF,
                          memory_order_seq_cst);
    return loop->batch_head == NULL &&
           atomic_load_explicit(&loop->inbox, memory_order_seq_cst) == NULL;
}

void df__inbox_disarm(df_loop *loop, bool drain)
{
    atomic_store_explicit(&loop->sleep, DF__AWAKE, memory_order_seq_cst);
    if (drain)
        fd_drain(loop);
}

void df__inbox_force_wake(df_loop *loop)
{
    if (atomic_exchange_explicit(&loop->sleep, DF__AWAKE,
                                 memory_order_seq_cst) != DF__AWAKE)
        fd_write(loop);
    /* Else a producer flipped it and writes. */
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
    df__loop_turn_end(loop);
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
    pthread_mutex_lock(&loop->call_lock);
    df__inbox_node *n = loop->call_free;
    if (n != NULL)
        loop->call_free = n->next;
    pthread_mutex_unlock(&loop->call_lock);
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
    int rc = fd_open(loop);
    if (rc != 0)
        return rc;
    rc = pthread_mutex_init(&loop->call_lock, NULL);
    if (rc != 0) {
        fd_close(loop);
        return -rc;
    }
    atomic_init(&loop->inbox, NULL);
    loop->batch_tail = &loop->batch_head;
    /* Nobody drives the loop yet: the first post must write. */
    atomic_init(&loop->sleep, DF__SLEEP_INF);
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
    fd_close(loop);
    pthread_mutex_destroy(&loop->call_lock);
}
