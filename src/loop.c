/* SPDX-License-Identifier: MIT */
/* The loop: life cycle, thread and fork checks, counters, run modes. */
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "loop-internal.h"

_Static_assert(offsetof(struct df_loop, token) == 0 &&
                   offsetof(struct df_loop, fork_gen) ==
                   offsetof(df__loop_id, fork_gen),
               "struct df_loop must start like df__loop_id");

atomic_uint df__fork_gen;

_Thread_local uintptr_t df__thread_token DF__TLS_IE;
static atomic_uintptr_t token_last; /* the last token handed out */

static uintptr_t new_token(void)
{
    return atomic_fetch_add_explicit(&token_last, 1, memory_order_relaxed) +
           1;
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static int fork_hook_rc; /* pthread_atfork's result; written once */

/* Runs in the child of fork(2), which has one thread: every loop made so
 * far now belongs to an older generation. */
static void fork_child(void)
{
    atomic_fetch_add_explicit(&df__fork_gen, 1, memory_order_relaxed);
    /* The forking thread is the child's only thread: a new token, so that
     * it does not pass for the owner of the parent's loops. */
    if (df__thread_token != 0)
        df__thread_token = new_token();
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
    df__loop_jobs_add(loop, delta);
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

void df__loop_maps_add(df_loop *loop, int delta)
{
    assert(delta >= 0 || loop->maps >= (size_t)-delta);
    loop->maps = (size_t)((long)loop->maps + delta);
}

static void get_stats(const df_loop *loop, df_loop_stats *st)
{
    *st = (df_loop_stats){
        .deferreds = loop->deferreds,
        .sync_objects = loop->objects,
        .pools = loop->pools,
        .maps = loop->maps,
        .timers = loop->heap_len,
        .weak_timers = loop->weak_timers,
        .jobs = loop->jobs,
        .calls = atomic_load_explicit(&loop->calls, memory_order_relaxed),
        .wakeups = loop->wakeups,
    };
}

int df_loop_get_stats(const df_loop *loop, df_loop_stats *out)
{
    if (loop == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    get_stats(loop, out);
    return 0;
}

#ifdef DF_DEBUG
/* Names on stderr what keeps df_loop_free from freeing the loop, kind by
 * kind, leaving out the kinds of which nothing is alive. */
static void report_busy(const df_loop *loop)
{
    df_loop_stats st;
    get_stats(loop, &st);
    const struct {
        size_t n;
        const char *what;
    } kinds[] = {
        {st.deferreds, "deferred(s)"},
        {st.sync_objects, "semaphore(s)/lock(s)/queue(s)"},
        {st.pools, "pool(s)"},
        {st.maps, "map(s)"},
        {st.timers, "timer(s)"},
        {st.jobs, "job(s) in flight"},
    };
    char line[256];
    size_t len = 0;
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        if (kinds[i].n == 0 || len >= sizeof line)
            continue;
        int k = snprintf(line + len, sizeof line - len, "%s%zu %s",
                         len > 0 ? ", " : "", kinds[i].n, kinds[i].what);
        if (k > 0)
            len += (size_t)k;
    }
    fprintf(stderr, "libdeferred: df_loop_free: still alive: %s\n",
            len > 0 ? line : "nothing");
}
#endif

/* ------------------------------------------------------------- dispatching */

/* What keeps df_loop_run running: weak timers do not. */
static size_t pending(const df_loop *loop)
{
    return loop->jobs + (loop->heap_len - loop->weak_timers) +
           atomic_load_explicit(&loop->calls, memory_order_relaxed);
}

static int timeout_ms(const df_loop *loop)
{
    if (loop->batch_head != NULL)
        return 0;
    return df__timers_timeout_ms(loop);
}

void df__loop_at_turn_end(df_loop *loop, df__turn_hook *h)
{
    if (!loop->dispatching) {
        h->fn(h);
        return;
    }
    if (h->armed)
        return;
    h->armed = true;
    h->next = NULL;
    if (loop->turn_hooks == NULL)
        loop->turn_tail = &loop->turn_hooks;
    *loop->turn_tail = h;
    loop->turn_tail = &h->next;
}

/* Rare (a map freed with its hook due): a walk is fine. */
void df__loop_turn_cancel(df_loop *loop, df__turn_hook *h)
{
    if (!h->armed)
        return;
    df__turn_hook **link = &loop->turn_hooks;
    while (*link != h)
        link = &(*link)->next;
    *link = h->next;
    if (loop->turn_tail == &h->next)
        loop->turn_tail = link;
    h->armed = false;
}

void df__loop_turn_end(df_loop *loop)
{
    df__turn_hook *h;
    while ((h = loop->turn_hooks) != NULL) {
        loop->turn_hooks = h->next;
        h->armed = false;
        h->fn(h);
    }
}

/* Takes control: posts stop writing to the fd, which is emptied. */
static void start_pass(df_loop *loop)
{
    loop->dispatching = true;
    df__inbox_disarm(loop, true);
}

/* Gives control back: producers' wake-ups are re-armed, and if anything is
 * queued (taken but not run, or posted meanwhile) the fd is left readable
 * for whoever drives the loop next (df_loop_run or an external poller). */
static void finish_pass(df_loop *loop)
{
    df__loop_turn_end(loop);
    if (!df__inbox_arm(loop, false))
        df__inbox_force_wake(loop);
    loop->dispatching = false;
}

/* Blocks until the wake fd is readable or `timeout_ms` (-1: none) has
 * passed, or, with `timed`, DF__WAKE_DEFER_NS at most.  Returns poll's
 * answer; *readable: the fd is readable. */
static int wait_fd(df_loop *loop, int timeout_ms, bool timed, bool *readable)
{
    struct pollfd pfd = {loop->wake_fd, POLLIN, 0};
    int ready;
    if (timed && (timeout_ms < 0 ||
                  (long)timeout_ms * 1000000L > DF__WAKE_DEFER_NS)) {
        struct timespec ts = {0, DF__WAKE_DEFER_NS};
        ready = ppoll(&pfd, 1, &ts, NULL);
    } else {
        ready = poll(&pfd, 1, timeout_ms);
    }
    *readable = ready > 0 && (pfd.revents & POLLIN);
    return ready;
}

static int loop_run(df_loop *loop, df_deferred *until)
{
    if (loop->dispatching)
        return DF_ESTATE;
    start_pass(loop);
    int rc;
    /* Inbox entries run since the last sleep: while completions stream in
     * the loop sleeps with a timeout, so that workers need not wake it for
     * each (inbox.c, "Wake-ups"). */
    size_t drained = 0;
    /* df__loop_should_return() after each entry, with `until` read as one
     * word: its flags, or a word that stays 0 when there is none. */
    static const uint32_t no_until = 0;
    const uint32_t *until_flags =
        until != NULL
            ? &((const df__deferred_head *)(const void *)until)->flags
            : &no_until;
    for (;;) {
        if (loop->stop) {
            loop->stop = false;
            rc = until != NULL ? DF_ECANCELLED : 0;
            break;
        }
        if (until != NULL && df__deferred_called(until)) {
            rc = 0;
            break;
        }
        bool halt = false;
        unsigned ran = df__timers_run(loop, true, until, &halt);
        if (halt)
            continue;
        df__inbox_collect(loop);
        df__inbox_node *n;
        size_t k = 0; /* entries run in this turn */
        while ((n = df__batch_pop(loop)) != NULL) {
            n->run(loop, n, 0);
            k++;
            if (loop->stop || (*until_flags & DF__DEFERRED_CALLED)) {
                halt = true;
                break;
            }
        }
        drained += k;
        df__loop_turn_end(loop);
        if (halt || ran > 0 || k > 0)
            continue;
        if (pending(loop) == 0) {
            rc = until != NULL ? DF_ENOT_CALLED : 0;
            break;
        }
        /* About to sleep: see the proof at the top of inbox.c.  A timed
         * sleep that finds nothing leaves drained at 0, so the next sleep
         * has no bound: an idle loop does not poll. */
        bool timed = drained > 0 && loop->jobs > 0;
        if (!df__inbox_arm(loop, timed)) {
            df__inbox_disarm(loop, false); /* posted meanwhile */
            continue;
        }
        bool readable;
        wait_fd(loop, timeout_ms(loop), timed, &readable); /* EINTR: go round */
        df__inbox_disarm(loop, readable);
        loop->wakeups++;
        drained = 0;
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
    start_pass(loop);
    unsigned count = df__timers_run(loop, false, NULL, NULL);
    df__inbox_collect(loop);
    unsigned done = 0;
    df__inbox_node *n;
    while ((budget == 0 || done < budget) && (n = df__batch_pop(loop)) != NULL) {
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

/* ------------------------------------------------------------- life cycle */

int df_loop_new(const df_loop_options *opts, df_loop **out)
{
    if (out == NULL)
        return DF_EINVAL;
    pthread_once(&fork_once, fork_register);
    if (fork_hook_rc != 0)
        return -fork_hook_rc;
    const df_allocator *a = &df__default_allocator;
    if (opts != NULL && opts->allocator != NULL) {
        a = opts->allocator;
        if (a->malloc == NULL || a->realloc == NULL || a->free == NULL)
            return DF_EINVAL;
    }
    df_loop *loop = a->malloc(sizeof *loop, a->ctx);
    if (loop == NULL)
        return DF_ENOMEM;
    memset(loop, 0, sizeof *loop);
    int rc = df__inbox_init(loop);
    if (rc != 0) {
        a->free(loop, a->ctx);
        return rc;
    }
    loop->alloc = *a;
    for (int i = 0; i < DF__SLABS; i++)
        df__slab_init(&loop->slabs[i], df__deferred_block_size(i));
    if (df__thread_token == 0)
        df__thread_token = new_token();
    loop->token = df__thread_token;
    loop->thread = pthread_self();
    loop->fork_gen = atomic_load_explicit(&df__fork_gen, memory_order_relaxed);
    loop->unhandled = default_unhandled;
    if (opts != NULL && opts->unhandled != NULL) {
        loop->unhandled = opts->unhandled;
        loop->unhandled_arg = opts->unhandled_arg;
    }
    *out = loop;
    return 0;
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
        loop->objects != 0 || loop->deferreds != 0 || loop->maps != 0) {
#ifdef DF_DEBUG
        report_busy(loop);
#endif
        return DF_EBUSY;
    }

    loop->dispatching = true;
    df__inbox_fini(loop);
    /* A callback run by df__inbox_fini may have made a timer; it can no
     * longer run. */
    df__timers_fini(loop);
    df__alloc_fini(loop);
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
