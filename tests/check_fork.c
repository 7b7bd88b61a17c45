/* SPDX-License-Identifier: MIT */
/* Check tests for the fork(2) policy: inherited objects refuse, nothing
 * hangs, the child's own objects work and the parent loses nothing. */
#include <check.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "deferred.h"
#include "testutil.h"

/* ThreadSanitizer does not support starting threads in the child of a
 * multi-threaded process (its die_after_fork): the child's own pool is
 * left out there. */
#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif
#ifndef UNDER_TSAN
#define UNDER_TSAN 0
#endif

/* ------------------------------------------------------------ the child */

/* The child reports to the parent through a pipe, one line per broken
 * expectation, and never returns into Check (which, with CK_FORK=no,
 * would run the rest of the parent's suite in the child). */
static int child_fd = -1;
static int child_failures;

static void child_say(int line, const char *fmt, ...)
{
    char buf[256];
    int n = snprintf(buf, sizeof buf, "child, line %d: ", line);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    (void)!write(child_fd, buf, (size_t)n);
    child_failures++;
}

#define CHILD_EXPECT_RC(expr, want)                                            \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        if (rc_ != (want))                                                     \
            child_say(__LINE__, "%s returned %s, not %s", #expr,               \
                      df_err_name(rc_), df_err_name(want));                    \
    } while (0)

#define CHILD_EXPECT(cond)                                                     \
    do {                                                                       \
        if (!(cond))                                                           \
            child_say(__LINE__, "expected %s", #cond);                         \
    } while (0)

/* Runs fn(arg) in a child process and asserts that it broke no
 * expectation, exited 0 and took less than 60 s. */
static void run_in_child(void (*fn)(void *arg), void *arg)
{
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(fds[0]);
        child_fd = fds[1];
        fn(arg);
        _exit(child_failures == 0 ? 0 : 1);
    }
    close(fds[1]);

    /* Read the child's report until it closes the pipe (it exits). */
    char report[4096];
    size_t len = 0;
    bool hung = false;
    for (;;) {
        struct pollfd pfd = {fds[0], POLLIN, 0};
        int rc = poll(&pfd, 1, 60000);
        if (rc == 0) {
            hung = true;
            kill(pid, SIGKILL);
            break;
        }
        if (rc < 0 && errno == EINTR)
            continue;
        ssize_t n = read(fds[0], report + len, sizeof report - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len == sizeof report - 1)
            break;
    }
    report[len] = '\0';
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    ck_assert_msg(!hung, "the child hung for 60 s");
    ck_assert_msg(len == 0, "%s", report);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "the child did not exit 0 (status 0x%x)", status);
}

/* ------------------------------------------------ work held in the parent */

/* Pool work that waits at the world's gate until the test lets it go, so
 * that jobs are running (and queued behind them) when the process forks. */
static atomic_uint held_done; /* work functions returned */

static df_result held_work(df_work *w, void *arg)
{
    (void)w;
    tu_gate_pass(arg);
    atomic_fetch_add(&held_done, 1);
    return df_ok((void *)(uintptr_t)7, NULL);
}

static df_result quick_work(df_work *w, void *arg)
{
    (void)w;
    return df_ok((void *)((uintptr_t)arg * 2), NULL);
}

/* quick_work as a map's work (the item is its argument). */
static df_result map_quick_work(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    return quick_work(w, item);
}

static void timer_fired(void *arg, int status)
{
    (void)arg;
    (void)status;
    ck_abort_msg("the hour-long timer fired");
}

/* Everything the parent has when it forks. */
typedef struct world {
    tu_counting_alloc ca;
    df_allocator alloc;
    df_loop *loop;
    df_pool *pool;
    df_sem *sem;
    df_queue *queue;
    df_lock *lock;
    df_timer *timer;        /* an hour away: pending when forking */
    df_deferred *unfired;   /* made by the test, not fired yet */
    df_deferred *jobs[4];   /* 2 running, 2 queued when forking */
    tu_gate g;
} world;

static void world_up(world *w)
{
    memset(w, 0, sizeof *w);
    w->alloc = (df_allocator){tu_ca_malloc, tu_ca_realloc, tu_ca_free, &w->ca};
    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    o.allocator = &w->alloc;
    TU_OK(df_loop_new(&o, &w->loop));
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = 2;
    TU_OK(df_pool_new(w->loop, &po, &w->pool));
    TU_OK(df_sem_new(w->loop, 3, &w->sem));
    TU_OK(df_queue_new(w->loop, SIZE_MAX, SIZE_MAX, &w->queue));
    TU_OK(df_lock_new(w->loop, &w->lock));
    TU_OK(df_loop_call_later(w->loop, UINT64_C(3600000000000), timer_fired,
                             NULL, &w->timer));
    TU_OK(df_deferred_new(w->loop, &w->unfired));
    tu_gate_init(&w->g);
    atomic_store(&held_done, 0);
    for (int i = 0; i < 4; i++)
        TU_OK(df_pool_submit(w->pool, held_work, &w->g, &w->jobs[i]));
    tu_gate_wait_entered(&w->g, 2); /* both workers busy, 2 queued */
}

/* After the fork: the parent's work completes, its objects still work,
 * and everything is freed. */
static void world_down(world *w)
{
    tu_gate_open(&w->g);
    for (int i = 0; i < 4; i++) {
        TU_OK(df_loop_run_until(w->loop, w->jobs[i]));
        void *v = NULL;
        df_failure *f = NULL;
        TU_OK(df_deferred_peek(w->jobs[i], &v, &f));
        ck_assert_ptr_null(f);
        ck_assert_ptr_eq(v, (void *)(uintptr_t)7);
        df_deferred_unref(w->jobs[i]);
    }
    ck_assert_uint_eq(atomic_load(&held_done), 4);

    /* The objects the child refused still work in the parent. */
    TU_OK(df_deferred_callback(w->unfired, NULL, NULL));
    df_deferred_unref(w->unfired);
    df_deferred *d = NULL;
    TU_OK(df_sem_run_in_pool(w->sem, w->pool, quick_work, (void *)21, &d));
    TU_OK(df_loop_run_until(w->loop, d));
    void *v = NULL;
    TU_OK(df_deferred_peek(d, &v, NULL));
    ck_assert_ptr_eq(v, (void *)42);
    df_deferred_unref(d);

    TU_OK(df_timer_cancel(w->timer));
    TU_OK(df_lock_free(w->lock));
    df_queue_free(w->queue);
    TU_OK(df_sem_free(w->sem));
    TU_OK(df_pool_shutdown(w->pool, DF_POOL_DRAIN));
    df_pool_free(w->pool);
    TU_OK(df_loop_run(w->loop));
    TU_OK(df_loop_free(w->loop));
    ck_assert_int_eq(atomic_load(&w->ca.live), 0);
    tu_gate_destroy(&w->g);
}

/* ---------------------------------------------------------------- tests */

static void never_called(void *arg, int status)
{
    (void)status;
    *(bool *)arg = true;
}

static df_result child_run(void *arg)
{
    (void)arg;
    return df_ok(NULL, NULL);
}

static df_result child_cb(df_result r, void *arg)
{
    (void)arg;
    return r;
}

static int child_next(void *arg, void **item, df_free_fn *item_free)
{
    (void)arg;
    *item = NULL;
    *item_free = NULL;
    return 0;
}

static void child_refuses(void *arg)
{
    world *w = arg;
    df_deferred *d = NULL;
    bool called = false;
    df_timer *t = NULL;

    CHILD_EXPECT_RC(df_pool_submit(w->pool, quick_work, NULL, &d),
                    DF_EFORKED);
    CHILD_EXPECT(d == NULL);
    CHILD_EXPECT_RC(df_sem_run_in_pool(w->sem, w->pool, quick_work, NULL, &d),
                    DF_EFORKED);
    CHILD_EXPECT_RC(df_pool_shutdown(w->pool, DF_POOL_CANCEL), DF_EFORKED);
    CHILD_EXPECT_RC(df_loop_run(w->loop), DF_EFORKED);
    CHILD_EXPECT_RC(df_loop_run_until(w->loop, w->jobs[0]), DF_EFORKED);
    CHILD_EXPECT_RC(df_loop_dispatch(w->loop, 0, NULL), DF_EFORKED);
    CHILD_EXPECT_RC(df_loop_call_from_thread(w->loop, never_called, &called),
                    DF_EFORKED);
    CHILD_EXPECT_RC(df_loop_call_later(w->loop, 0, never_called, &called, &t),
                    DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_new(w->loop, &d), DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_callback(w->unfired, NULL, NULL), DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_cancel(w->jobs[3]), DF_EFORKED);
    CHILD_EXPECT_RC(df_sem_acquire(w->sem, &d), DF_EFORKED);
    CHILD_EXPECT_RC(df_queue_put(w->queue, NULL, NULL), DF_EFORKED);
    CHILD_EXPECT_RC(df_sem_free(w->sem), DF_EFORKED);
    CHILD_EXPECT_RC(df_loop_free(w->loop), DF_EFORKED);

    /* Every other kind of entry point, on every kind of object. */
    CHILD_EXPECT_RC(df_loop_set_unhandled(w->loop, NULL, NULL), DF_EFORKED);
    CHILD_EXPECT_RC(df_loop_stop(w->loop), DF_EFORKED);
    CHILD_EXPECT_RC(df_loop_timeout_ms(w->loop), DF_EFORKED);
    CHILD_EXPECT(df_loop_pending(w->loop) == 0);
    CHILD_EXPECT_RC(df_timer_cancel(w->timer), DF_EFORKED);
    CHILD_EXPECT_RC(df_succeed(w->loop, NULL, NULL, &d), DF_EFORKED);
    /* Failures are values, usable in the child (see deferred.h); the
     * calls that refuse leave this one with us. */
    df_failure *f = df_failure_new(w->loop, DF_EFAILED, NULL);
    CHILD_EXPECT_RC(df_fail(w->loop, f, &d), DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_errback(w->unfired, f), DF_EFORKED);
    df_failure_unref(f);
    CHILD_EXPECT_RC(df_maybe(w->loop, child_run, NULL, &d), DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_new_cancellable(w->loop, NULL, NULL, &d),
                    DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_add_callbacks(w->unfired, child_cb, child_cb,
                                              NULL),
                    DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_chain(w->unfired, w->jobs[2]), DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_pause(w->unfired), DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_unpause(w->unfired), DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_peek(w->jobs[0], NULL, NULL), DF_EFORKED);
    CHILD_EXPECT_RC(df_deferred_set_timeout(w->unfired, 1), DF_EFORKED);
    df_deferred *members[1] = {w->unfired};
    CHILD_EXPECT_RC(df_list_new(w->loop, members, 1, 0, &d), DF_EFORKED);
    CHILD_EXPECT_RC(df_gather(w->loop, members, 1, 0, &d), DF_EFORKED);
    CHILD_EXPECT_RC(df_sem_new(w->loop, 1, NULL), DF_EINVAL);
    df_sem *sem2 = NULL;
    CHILD_EXPECT_RC(df_sem_new(w->loop, 1, &sem2), DF_EFORKED);
    CHILD_EXPECT_RC(df_sem_release(w->sem), DF_EFORKED);
    CHILD_EXPECT_RC(df_sem_run(w->sem, child_run, NULL, &d), DF_EFORKED);
    df_lock *lock2 = NULL;
    CHILD_EXPECT_RC(df_lock_new(w->loop, &lock2), DF_EFORKED);
    CHILD_EXPECT_RC(df_lock_acquire(w->lock, &d), DF_EFORKED);
    CHILD_EXPECT_RC(df_lock_release(w->lock), DF_EFORKED);
    CHILD_EXPECT_RC(df_lock_run(w->lock, child_run, NULL, &d), DF_EFORKED);
    CHILD_EXPECT_RC(df_lock_free(w->lock), DF_EFORKED);
    df_queue *queue2 = NULL;
    CHILD_EXPECT_RC(df_queue_new(w->loop, 1, 1, &queue2), DF_EFORKED);
    CHILD_EXPECT_RC(df_queue_get(w->queue, &d), DF_EFORKED);
    df_pool *pool2 = NULL;
    CHILD_EXPECT_RC(df_pool_new(w->loop, NULL, &pool2), DF_EFORKED);
    df_map_options mo = {0};
    mo.limit = 1;
    mo.next = child_next;
    mo.pool = w->pool;
    mo.work = map_quick_work;
    df_map *map = NULL;
    CHILD_EXPECT_RC(df_map_start(w->loop, &mo, &map, &d), DF_EFORKED);
    CHILD_EXPECT(d == NULL && sem2 == NULL && lock2 == NULL &&
                 queue2 == NULL && pool2 == NULL && map == NULL);
    CHILD_EXPECT(!called);
    CHILD_EXPECT(!df_deferred_called(w->unfired));

    /* Releases do nothing and, above all, do not wait for the parent's
     * workers (which do not exist here). */
    df_deferred_unref(w->unfired);
    df_queue_free(w->queue);
    df_pool_free(w->pool);
    CHILD_EXPECT(!called);
}

/* In the child, every call on an inherited object returns DF_EFORKED (or
 * does nothing, for void calls) without hanging. */
START_TEST(test_fork_child_refuses_inherited)
{
    world w;
    world_up(&w);
    run_in_child(child_refuses, &w);
    world_down(&w);
}
END_TEST

static void child_own_loop(void *arg)
{
    (void)arg;
    tu_counting_alloc ca = {0};
    df_allocator a = {tu_ca_malloc, tu_ca_realloc, tu_ca_free, &ca};
    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    o.allocator = &a;
    df_loop *loop = NULL;
    CHILD_EXPECT_RC(df_loop_new(&o, &loop), 0);
    if (loop == NULL)
        return;

    df_deferred *d = NULL;
    CHILD_EXPECT_RC(df_succeed(loop, (void *)5, NULL, &d), 0);
    CHILD_EXPECT(d != NULL && df_deferred_called(d));
    df_deferred_unref(d);

    if (!UNDER_TSAN) {
        df_pool *pool = NULL;
        df_sem *sem = NULL;
        CHILD_EXPECT_RC(df_pool_new(loop, NULL, &pool), 0);
        CHILD_EXPECT_RC(df_sem_new(loop, 2, &sem), 0);
        df_deferred *ds[16];
        for (uintptr_t i = 0; i < 16; i++)
            CHILD_EXPECT_RC(df_sem_run_in_pool(sem, pool, quick_work,
                                               (void *)i, &ds[i]),
                            0);
        CHILD_EXPECT_RC(df_loop_run(loop), 0);
        for (uintptr_t i = 0; i < 16; i++) {
            void *v = NULL;
            CHILD_EXPECT_RC(df_deferred_peek(ds[i], &v, NULL), 0);
            CHILD_EXPECT(v == (void *)(i * 2));
            df_deferred_unref(ds[i]);
        }
        CHILD_EXPECT_RC(df_sem_free(sem), 0);
        CHILD_EXPECT_RC(df_pool_shutdown(pool, DF_POOL_DRAIN), 0);
        df_pool_free(pool);
        CHILD_EXPECT_RC(df_loop_run(loop), 0);
    }
    CHILD_EXPECT_RC(df_loop_free(loop), 0);
    CHILD_EXPECT(atomic_load(&ca.live) == 0);
}

/* The child may make its own loop (and pool) next to the inherited ones,
 * and they work normally. */
START_TEST(test_fork_child_new_loop_works)
{
    world w;
    world_up(&w);
    run_in_child(child_own_loop, NULL);
    world_down(&w);
}
END_TEST

static void child_does_nothing(void *arg)
{
    (void)arg;
}

/* A fork while jobs run and wait does not disturb the parent: every job
 * completes exactly once there, with its own value. */
START_TEST(test_fork_parent_loses_nothing)
{
    world w;
    world_up(&w);
    run_in_child(child_does_nothing, NULL);
    world_down(&w);
}
END_TEST

/* A loop made after a fork, in the parent, works too: the generation is
 * the child's business only. */
START_TEST(test_fork_parent_new_loop_after_fork)
{
    run_in_child(child_does_nothing, NULL);
    world w;
    world_up(&w);
    world_down(&w);
}
END_TEST

static Suite *fork_suite(void)
{
    Suite *s = suite_create("fork");
    TCase *tc = tcase_create("policy");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_fork_child_refuses_inherited);
    tcase_add_test(tc, test_fork_child_new_loop_works);
    tcase_add_test(tc, test_fork_parent_loses_nothing);
    tcase_add_test(tc, test_fork_parent_new_loop_after_fork);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(fork_suite)
