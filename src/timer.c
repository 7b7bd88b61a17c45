/* SPDX-License-Identifier: MIT */
/* Timers (a min-heap on the loop's clock) and deferred timeouts. */
#include <limits.h>
#include <time.h>

#include "loop-internal.h"

#define TIMER_FREE_MAX 256

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
    if (t->weak) {
        assert(loop->weak_timers > 0);
        loop->weak_timers--;
        t->weak = false;
    }
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
    t->weak = false;
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

/* A stale handle (fired, cancelled, or on the free list) is refused. */
static bool timer_armed(const df_loop *loop, const df_timer *t)
{
    return t->index < loop->heap_len && loop->heap[t->index] == t;
}

int df_timer_unref(df_timer *t)
{
    if (t == NULL)
        return DF_EINVAL;
    df_loop *loop = t->loop;
    DF__CHECK_THREAD(loop);
    if (!timer_armed(loop, t))
        return DF_EINVAL;
    if (!t->weak) {
        t->weak = true;
        loop->weak_timers++;
    }
    return 0;
}

int df_timer_ref(df_timer *t)
{
    if (t == NULL)
        return DF_EINVAL;
    df_loop *loop = t->loop;
    DF__CHECK_THREAD(loop);
    if (!timer_armed(loop, t))
        return DF_EINVAL;
    if (t->weak) {
        t->weak = false;
        loop->weak_timers--;
    }
    return 0;
}

/* Runs the timers due now.  Timers made by these callbacks wait for the
 * next pass even if due at once (seq_limit), so a timer re-arming itself
 * with delay 0 cannot starve the inbox.  With `check`, returns after the
 * callback that made should_return() true, setting *halt. */
unsigned df__timers_run(df_loop *loop, bool check, df_deferred *until,
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
        if (check && df__loop_should_return(loop, until)) {
            *halt = true;
            break;
        }
    }
    return ran;
}

int df__timers_timeout_ms(const df_loop *loop)
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

void df__timers_fini(df_loop *loop)
{
    for (size_t i = 0; i < loop->heap_len; i++)
        df__free(loop, loop->heap[i]);
    loop->heap_len = 0;
    while (loop->timer_free != NULL) {
        df_timer *t = loop->timer_free;
        loop->timer_free = t->next_free;
        df__free(loop, t);
    }
    df__free(loop, loop->heap);
    loop->heap = NULL;
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
