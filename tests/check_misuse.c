/* SPDX-License-Identifier: MIT */
/* Check tests for misuse and bad input: every bad call gets its code. */
#include <check.h>
#include <limits.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "deferred.h"
#include "testutil.h"

/*
 * One test per misuse.  Each makes the bad call, checks the code the
 * header documents, then does the valid operation on the same object to
 * show that nothing was corrupted.  Every loop uses a counting allocator
 * and the teardown checks that no block is left once the loop is freed.
 */

/* ------------------------------------------------------------ fixture */

static tu_counting_alloc g_ca;
static const df_allocator g_alloc = {tu_ca_malloc, tu_ca_realloc, tu_ca_free,
                                     &g_ca};
static df_loop *L;
static int g_unhandled;      /* failures reported through the hook */
static int g_unhandled_code; /* code of the last one */
static int g_frees;          /* values destroyed by count_free */

static void count_unhandled(df_failure *f, void *arg)
{
    (void)arg;
    g_unhandled++;
    g_unhandled_code = df_failure_code(f);
}

static void count_free(void *v)
{
    (void)v;
    g_frees++;
}

/* A loop of the calling thread with the counting allocator. */
static df_loop *new_loop(void)
{
    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    df_loop *loop = NULL;

    o.allocator = &g_alloc;
    o.unhandled = count_unhandled;
    TU_OK(df_loop_new(&o, &loop));
    return loop;
}

static void setup(void)
{
    atomic_store(&g_ca.live, 0);
    atomic_store(&g_ca.calls, 0);
    atomic_store(&g_ca.fail, 0);
    g_unhandled = 0;
    g_unhandled_code = 0;
    g_frees = 0;
    L = new_loop();
}

static void teardown(void)
{
    if (L != NULL)
        TU_OK(df_loop_free(L));
    L = NULL;
    ck_assert_int_eq(atomic_load(&g_ca.live), 0);
}

/* Runs fn(arg) on a new thread and returns what it returned.  The join
 * orders everything the thread did before what the caller does next. */
typedef struct foreign {
    int (*fn)(void *arg);
    void *arg;
    int rc;
} foreign;

static void *foreign_main(void *p)
{
    foreign *f = p;
    f->rc = f->fn(f->arg);
    return NULL;
}

static int on_other_thread(int (*fn)(void *), void *arg)
{
    foreign f = {fn, arg, 0};
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, foreign_main, &f), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    return f.rc;
}

/* Records what reaches it and ends the chain with df_ok(NULL, NULL). */
typedef struct rec {
    int ok;
    int err;
    int code;
    void *value;
} rec;

static df_result rec_cb(df_result r, void *arg)
{
    rec *x = arg;
    if (r.failure != NULL) {
        x->err++;
        x->code = df_failure_code(r.failure);
    } else {
        x->ok++;
        x->value = r.value;
    }
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

static void watch(df_deferred *d, rec *x)
{
    TU_OK(df_deferred_add_callbacks(d, rec_cb, rec_cb, x));
}

static df_deferred *new_d(void)
{
    df_deferred *d = NULL;
    TU_OK(df_deferred_new(L, &d));
    return d;
}

static int g_value = 42; /* a value to pass around */
#define VAL ((void *)&g_value)

/* ------------------------------------------------------------- loop */

static void nop_call(void *arg, int status)
{
    int *n = arg;
    (void)status;
    if (n != NULL)
        (*n)++;
}

START_TEST(test_misuse_loop_new_null_out)
{
    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    TU_ERR(df_loop_new(NULL, NULL), DF_EINVAL);
    TU_ERR(df_loop_new(&o, NULL), DF_EINVAL);
    df_loop *l2 = new_loop();
    TU_OK(df_loop_free(l2));
}
END_TEST

START_TEST(test_misuse_loop_new_partial_allocator)
{
    df_allocator a = g_alloc;
    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    df_loop *l2 = NULL;
    a.free = NULL;
    o.allocator = &a;
    TU_ERR(df_loop_new(&o, &l2), DF_EINVAL);
    ck_assert_ptr_null(l2);
    a = g_alloc;
    a.malloc = NULL;
    TU_ERR(df_loop_new(&o, &l2), DF_EINVAL);
    a = g_alloc;
    TU_OK(df_loop_new(&o, &l2));
    TU_OK(df_loop_free(l2));
}
END_TEST

START_TEST(test_misuse_loop_free_null)
{
    TU_ERR(df_loop_free(NULL), DF_EINVAL);
}
END_TEST

static int foreign_loop_free(void *arg)
{
    return df_loop_free(arg);
}

START_TEST(test_misuse_loop_free_wrong_thread)
{
    int n = 0;
    TU_ERR(on_other_thread(foreign_loop_free, L), DF_EWRONG_THREAD);
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, NULL));
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(n, 1);
}
END_TEST

START_TEST(test_misuse_loop_free_with_pool)
{
    df_pool *p;
    TU_OK(df_pool_new(L, NULL, &p));
    TU_ERR(df_loop_free(L), DF_EBUSY);
    df_pool_free(p);
}
END_TEST

/* A work function that blocks until the test posts `arg`. */
static df_result work_wait(df_work *w, void *arg)
{
    (void)w;
    while (sem_wait(arg) != 0)
        ;
    return df_ok(NULL, NULL);
}

START_TEST(test_misuse_loop_free_with_work_in_flight)
{
    df_pool *p;
    df_deferred *d;
    sem_t go;
    rec x = {0};
    ck_assert_int_eq(sem_init(&go, 0, 0), 0);
    TU_OK(df_pool_new(L, NULL, &p));
    TU_OK(df_pool_submit(p, work_wait, &go, &d));
    watch(d, &x);
    TU_ERR(df_loop_free(L), DF_EBUSY);
    ck_assert_uint_eq(df_loop_pending(L), 1);
    sem_post(&go);
    TU_OK(df_loop_run_until(L, d));
    ck_assert_int_eq(x.ok, 1);
    df_deferred_unref(d);
    df_pool_free(p);
    sem_destroy(&go);
}
END_TEST

START_TEST(test_misuse_loop_free_with_timer)
{
    df_timer *t;
    TU_OK(df_loop_call_later(L, 1000000000u, nop_call, NULL, &t));
    TU_ERR(df_loop_free(L), DF_EBUSY);
    TU_OK(df_timer_cancel(t));
}
END_TEST

/* Without the check, a loop freed under live objects leaves them pointing
 * at freed memory: give up on the test before touching them. */
#define EXPECT_LOOP_BUSY()                                                     \
    do {                                                                       \
        int rc_ = df_loop_free(L);                                             \
        if (rc_ == 0) {                                                        \
            L = NULL;                                                          \
            atomic_store(&g_ca.live, 0);                                       \
            ck_abort_msg("df_loop_free freed a loop with live objects");       \
        }                                                                      \
        TU_ERR(rc_, DF_EBUSY);                                                 \
    } while (0)

START_TEST(test_misuse_loop_free_with_live_deferred)
{
    df_deferred *d = new_d();
    rec x = {0};
    EXPECT_LOOP_BUSY();
    watch(d, &x);
    TU_OK(df_deferred_callback(d, VAL, NULL));
    ck_assert_int_eq(x.ok, 1);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_loop_free_with_live_sem)
{
    df_sem *s;
    df_deferred *d;
    TU_OK(df_sem_new(L, 1, &s));
    EXPECT_LOOP_BUSY();
    TU_OK(df_sem_acquire(s, &d));
    ck_assert(df_deferred_called(d));
    df_deferred_unref(d);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_misuse_loop_free_with_live_queue)
{
    df_queue *q;
    TU_OK(df_queue_new(L, 4, 4, &q));
    EXPECT_LOOP_BUSY();
    TU_OK(df_queue_put(q, VAL, count_free));
    ck_assert_uint_eq(df_queue_size(q), 1);
    df_queue_free(q);
    ck_assert_int_eq(g_frees, 1);
}
END_TEST

static int g_status;

static void record_status(void *arg, int status)
{
    (void)arg;
    g_status = status;
}

static int foreign_call(void *arg)
{
    return df_loop_call_from_thread(arg, record_status, NULL);
}

/* Not an error: a cross-thread call still queued runs with DF_ECANCELLED
 * when the loop is freed. */
START_TEST(test_misuse_loop_free_with_pending_call)
{
    g_status = 1;
    TU_OK(on_other_thread(foreign_call, L));
    ck_assert_uint_eq(df_loop_pending(L), 1);
    TU_OK(df_loop_free(L));
    L = NULL;
    ck_assert_int_eq(g_status, DF_ECANCELLED);
}
END_TEST

static int g_rc;

static void free_loop_call(void *arg, int status)
{
    (void)status;
    g_rc = df_loop_free(arg);
}

START_TEST(test_misuse_loop_free_from_callback)
{
    int n = 0;
    g_rc = 0;
    TU_OK(df_loop_call_later(L, 0, free_loop_call, L, NULL));
    TU_OK(df_loop_run(L));
    TU_ERR(g_rc, DF_ESTATE);
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, NULL));
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(n, 1);
}
END_TEST

START_TEST(test_misuse_loop_run_null)
{
    TU_ERR(df_loop_run(NULL), DF_EINVAL);
    TU_OK(df_loop_run(L));
}
END_TEST

static int foreign_run(void *arg)
{
    return df_loop_run(arg);
}

START_TEST(test_misuse_loop_run_wrong_thread)
{
    int n = 0;
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, NULL));
    TU_ERR(on_other_thread(foreign_run, L), DF_EWRONG_THREAD);
    ck_assert_int_eq(n, 0);
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(n, 1);
}
END_TEST

static void run_nested_call(void *arg, int status)
{
    (void)status;
    g_rc = df_loop_run(arg);
}

START_TEST(test_misuse_loop_run_reentrant)
{
    g_rc = 0;
    TU_OK(df_loop_call_later(L, 0, run_nested_call, L, NULL));
    TU_OK(df_loop_run(L));
    TU_ERR(g_rc, DF_ESTATE);
}
END_TEST

static void run_until_nested_call(void *arg, int status)
{
    df_deferred *d = arg;
    (void)status;
    g_rc = df_loop_run_until(df_deferred_loop(d), d);
}

START_TEST(test_misuse_loop_run_until_reentrant)
{
    df_deferred *d = new_d();
    g_rc = 0;
    TU_OK(df_loop_call_later(L, 0, run_until_nested_call, d, NULL));
    TU_ERR(df_loop_run_until(L, d), DF_ENOT_CALLED);
    TU_ERR(g_rc, DF_ESTATE);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    TU_OK(df_loop_run_until(L, d));
    df_deferred_unref(d);
}
END_TEST

static void dispatch_nested_call(void *arg, int status)
{
    (void)status;
    g_rc = df_loop_dispatch(arg, 0, NULL);
}

START_TEST(test_misuse_loop_dispatch_reentrant)
{
    unsigned ran = 0;
    g_rc = 0;
    TU_OK(df_loop_call_later(L, 0, dispatch_nested_call, L, NULL));
    TU_OK(df_loop_dispatch(L, 0, &ran));
    ck_assert_uint_eq(ran, 1);
    TU_ERR(g_rc, DF_ESTATE);
}
END_TEST

START_TEST(test_misuse_loop_run_until_null)
{
    df_deferred *d = new_d();
    TU_ERR(df_loop_run_until(NULL, d), DF_EINVAL);
    TU_ERR(df_loop_run_until(L, NULL), DF_EINVAL);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    TU_OK(df_loop_run_until(L, d));
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_loop_run_until_other_loop)
{
    df_loop *l2 = new_loop();
    df_deferred *d;
    TU_OK(df_deferred_new(l2, &d));
    TU_ERR(df_loop_run_until(L, d), DF_EINVAL);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    TU_OK(df_loop_run_until(l2, d));
    df_deferred_unref(d);
    TU_OK(df_loop_free(l2));
}
END_TEST

typedef struct until_arg {
    df_loop *loop;
    df_deferred *d;
} until_arg;

static int foreign_run_until(void *arg)
{
    until_arg *u = arg;
    return df_loop_run_until(u->loop, u->d);
}

START_TEST(test_misuse_loop_run_until_wrong_thread)
{
    until_arg u = {L, new_d()};
    TU_ERR(on_other_thread(foreign_run_until, &u), DF_EWRONG_THREAD);
    TU_OK(df_deferred_callback(u.d, NULL, NULL));
    TU_OK(df_loop_run_until(L, u.d));
    df_deferred_unref(u.d);
}
END_TEST

static int foreign_stop(void *arg)
{
    return df_loop_stop(arg);
}

START_TEST(test_misuse_loop_stop_null)
{
    int n = 0;
    TU_ERR(df_loop_stop(NULL), DF_EINVAL);
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, NULL));
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(n, 1);
}
END_TEST

START_TEST(test_misuse_loop_stop_wrong_thread)
{
    int n = 0;
    TU_ERR(on_other_thread(foreign_stop, L), DF_EWRONG_THREAD);
    /* No stop was recorded: the run goes until nothing is pending. */
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, NULL));
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, NULL));
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(n, 2);
}
END_TEST

static int foreign_dispatch(void *arg)
{
    return df_loop_dispatch(arg, 0, NULL);
}

START_TEST(test_misuse_loop_dispatch_null)
{
    unsigned ran = 7;
    TU_ERR(df_loop_dispatch(NULL, 0, &ran), DF_EINVAL);
    ck_assert_uint_eq(ran, 7);
    TU_OK(df_loop_dispatch(L, 0, NULL));
}
END_TEST

START_TEST(test_misuse_loop_dispatch_wrong_thread)
{
    int n = 0;
    unsigned ran = 0;
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, NULL));
    TU_ERR(on_other_thread(foreign_dispatch, L), DF_EWRONG_THREAD);
    ck_assert_int_eq(n, 0);
    TU_OK(df_loop_dispatch(L, 0, &ran));
    ck_assert_int_eq(n, 1);
    ck_assert_uint_eq(ran, 1);
}
END_TEST

START_TEST(test_misuse_loop_fd_null)
{
    TU_ERR(df_loop_fd(NULL), DF_EINVAL);
    ck_assert_int_ge(df_loop_fd(L), 0);
}
END_TEST

static int foreign_timeout(void *arg)
{
    return df_loop_timeout_ms(arg);
}

START_TEST(test_misuse_loop_timeout_null)
{
    TU_ERR(df_loop_timeout_ms(NULL), DF_EINVAL);
    ck_assert_int_eq(df_loop_timeout_ms(L), -1);
}
END_TEST

START_TEST(test_misuse_loop_timeout_wrong_thread)
{
    TU_ERR(on_other_thread(foreign_timeout, L), DF_EWRONG_THREAD);
    ck_assert_int_eq(df_loop_timeout_ms(L), -1);
}
END_TEST

static int foreign_pending(void *arg)
{
    return (int)df_loop_pending(arg);
}

START_TEST(test_misuse_loop_pending_null)
{
    ck_assert_uint_eq(df_loop_pending(NULL), 0);
    ck_assert_uint_eq(df_loop_pending(L), 0);
}
END_TEST

START_TEST(test_misuse_loop_pending_wrong_thread)
{
    df_timer *t;
    TU_OK(df_loop_call_later(L, 1000000000u, nop_call, NULL, &t));
    ck_assert_int_eq(on_other_thread(foreign_pending, L), 0);
    ck_assert_uint_eq(df_loop_pending(L), 1);
    TU_OK(df_timer_cancel(t));
}
END_TEST

static int foreign_set_unhandled(void *arg)
{
    return df_loop_set_unhandled(arg, NULL, NULL);
}

START_TEST(test_misuse_loop_set_unhandled_null)
{
    df_deferred *d;
    TU_ERR(df_loop_set_unhandled(NULL, count_unhandled, NULL), DF_EINVAL);
    TU_OK(df_loop_set_unhandled(L, count_unhandled, NULL));
    TU_OK(df_fail(L, df_failure_new(L, DF_EFAILED, "expected"), &d));
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 1);
}
END_TEST

START_TEST(test_misuse_loop_set_unhandled_wrong_thread)
{
    df_deferred *d;
    TU_ERR(on_other_thread(foreign_set_unhandled, L), DF_EWRONG_THREAD);
    /* The hook was not reset to the default. */
    TU_OK(df_fail(L, df_failure_new(L, DF_EFAILED, "expected"), &d));
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 1);
    ck_assert_uint_eq(df_loop_unhandled_count(L), 1);
}
END_TEST

START_TEST(test_misuse_loop_unhandled_count_null)
{
    ck_assert_uint_eq(df_loop_unhandled_count(NULL), 0);
    ck_assert_uint_eq(df_loop_unhandled_count(L), 0);
}
END_TEST

START_TEST(test_misuse_loop_call_from_thread_null)
{
    int n = 0;
    TU_ERR(df_loop_call_from_thread(NULL, nop_call, &n), DF_EINVAL);
    TU_ERR(df_loop_call_from_thread(L, NULL, &n), DF_EINVAL);
    ck_assert_uint_eq(df_loop_pending(L), 0);
    TU_OK(df_loop_call_from_thread(L, nop_call, &n));
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(n, 1);
}
END_TEST

/* ----------------------------------------------------------- timers */

START_TEST(test_misuse_timers_call_later_null_loop)
{
    df_timer *t = NULL;
    TU_ERR(df_loop_call_later(NULL, 0, nop_call, NULL, &t), DF_EINVAL);
    ck_assert_ptr_null(t);
}
END_TEST

START_TEST(test_misuse_timers_call_later_null_fn)
{
    df_timer *t = NULL;
    int n = 0;
    TU_ERR(df_loop_call_later(L, 0, NULL, NULL, &t), DF_EINVAL);
    ck_assert_ptr_null(t);
    ck_assert_uint_eq(df_loop_pending(L), 0);
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, &t));
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(n, 1);
}
END_TEST

static int foreign_call_later(void *arg)
{
    return df_loop_call_later(arg, 0, nop_call, NULL, NULL);
}

START_TEST(test_misuse_timers_call_later_wrong_thread)
{
    TU_ERR(on_other_thread(foreign_call_later, L), DF_EWRONG_THREAD);
    ck_assert_uint_eq(df_loop_pending(L), 0);
}
END_TEST

START_TEST(test_misuse_timers_call_later_huge_delay)
{
    df_timer *t;
    int n = 0;
    /* The deadline saturates instead of wrapping into the past. */
    TU_OK(df_loop_call_later(L, UINT64_MAX, nop_call, &n, &t));
    ck_assert_int_gt(df_loop_timeout_ms(L), 1000);
    TU_OK(df_loop_dispatch(L, 0, NULL));
    ck_assert_int_eq(n, 0);
    TU_OK(df_timer_cancel(t));
    ck_assert_uint_eq(df_loop_pending(L), 0);
}
END_TEST

START_TEST(test_misuse_timers_cancel_null)
{
    TU_ERR(df_timer_cancel(NULL), DF_EINVAL);
}
END_TEST

static int foreign_timer_cancel(void *arg)
{
    return df_timer_cancel(arg);
}

START_TEST(test_misuse_timers_cancel_wrong_thread)
{
    df_timer *t;
    int n = 0;
    TU_OK(df_loop_call_later(L, 0, nop_call, &n, &t));
    TU_ERR(on_other_thread(foreign_timer_cancel, t), DF_EWRONG_THREAD);
    ck_assert_uint_eq(df_loop_pending(L), 1);
    TU_OK(df_timer_cancel(t));
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(n, 0);
}
END_TEST

START_TEST(test_misuse_timers_set_timeout_null)
{
    TU_ERR(df_deferred_set_timeout(NULL, 1000), DF_EINVAL);
}
END_TEST

START_TEST(test_misuse_timers_set_timeout_twice)
{
    df_deferred *d = new_d();
    rec x = {0};
    TU_OK(df_deferred_set_timeout(d, 0));
    TU_ERR(df_deferred_set_timeout(d, 1000), DF_EBUSY);
    watch(d, &x);
    TU_OK(df_loop_run_until(L, d));
    ck_assert_int_eq(x.err, 1);
    ck_assert_int_eq(x.code, DF_ETIMEDOUT);
    df_deferred_unref(d);
}
END_TEST

static int foreign_set_timeout(void *arg)
{
    return df_deferred_set_timeout(arg, 0);
}

START_TEST(test_misuse_timers_set_timeout_wrong_thread)
{
    df_deferred *d = new_d();
    TU_ERR(on_other_thread(foreign_set_timeout, d), DF_EWRONG_THREAD);
    ck_assert_uint_eq(df_loop_pending(L), 0);
    /* No timeout was marked either: one can still be set. */
    TU_OK(df_deferred_set_timeout(d, 1000000000u));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_uint_eq(df_loop_pending(L), 0);
    df_deferred_unref(d);
}
END_TEST

/* ---------------------------------------------------------- deferred */

START_TEST(test_misuse_deferred_new_null)
{
    df_deferred *d = NULL;
    TU_ERR(df_deferred_new(NULL, &d), DF_EINVAL);
    TU_ERR(df_deferred_new(L, NULL), DF_EINVAL);
    TU_ERR(df_deferred_new_cancellable(NULL, NULL, NULL, &d), DF_EINVAL);
    TU_ERR(df_deferred_new_cancellable(L, NULL, NULL, NULL), DF_EINVAL);
    ck_assert_ptr_null(d);
    d = new_d();
    df_deferred_unref(d);
}
END_TEST

static int foreign_deferred_new(void *arg)
{
    df_deferred *d = NULL;
    int rc = df_deferred_new(arg, &d);
    return d == NULL ? rc : -1;
}

START_TEST(test_misuse_deferred_new_wrong_thread)
{
    TU_ERR(on_other_thread(foreign_deferred_new, L), DF_EWRONG_THREAD);
}
END_TEST

/* A NULL canceller is allowed: the deferred is then not cancellable
 * beyond the default (it fails with DF_ECANCELLED). */
START_TEST(test_misuse_deferred_new_cancellable_null_fn)
{
    df_deferred *d;
    rec x = {0};
    TU_OK(df_deferred_new_cancellable(L, NULL, NULL, &d));
    watch(d, &x);
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(x.code, DF_ECANCELLED);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_succeed_null)
{
    df_deferred *d = NULL;
    TU_ERR(df_succeed(NULL, VAL, count_free, &d), DF_EINVAL);
    TU_ERR(df_succeed(L, VAL, count_free, NULL), DF_EINVAL);
    ck_assert_int_eq(g_frees, 0); /* the caller keeps the value */
    TU_OK(df_succeed(L, VAL, count_free, &d));
    df_deferred_unref(d);
    ck_assert_int_eq(g_frees, 1);
}
END_TEST

START_TEST(test_misuse_deferred_fail_null)
{
    df_deferred *d = NULL;
    df_failure *f = df_failure_new(L, DF_EFAILED, "expected");
    TU_ERR(df_fail(L, NULL, &d), DF_EINVAL);
    TU_ERR(df_fail(NULL, f, &d), DF_EINVAL);
    TU_ERR(df_fail(L, f, NULL), DF_EINVAL);
    ck_assert_ptr_null(d);
    /* The caller still owns f. */
    TU_OK(df_fail(L, f, &d));
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 1);
}
END_TEST

static int g_run_calls;

static df_result run_count(void *arg)
{
    (void)arg;
    g_run_calls++;
    return df_ok(VAL, NULL);
}

START_TEST(test_misuse_deferred_maybe_null)
{
    df_deferred *d = NULL;
    g_run_calls = 0;
    TU_ERR(df_maybe(NULL, run_count, NULL, &d), DF_EINVAL);
    TU_ERR(df_maybe(L, NULL, NULL, &d), DF_EINVAL);
    TU_ERR(df_maybe(L, run_count, NULL, NULL), DF_EINVAL);
    ck_assert_int_eq(g_run_calls, 0);
    TU_OK(df_maybe(L, run_count, NULL, &d));
    ck_assert_int_eq(g_run_calls, 1);
    df_deferred_unref(d);
}
END_TEST

static int foreign_maybe(void *arg)
{
    df_deferred *d = NULL;
    return df_maybe(arg, run_count, NULL, &d);
}

START_TEST(test_misuse_deferred_maybe_wrong_thread)
{
    g_run_calls = 0;
    TU_ERR(on_other_thread(foreign_maybe, L), DF_EWRONG_THREAD);
    ck_assert_int_eq(g_run_calls, 0);
}
END_TEST

START_TEST(test_misuse_deferred_callback_null)
{
    TU_ERR(df_deferred_callback(NULL, VAL, count_free), DF_EINVAL);
    ck_assert_int_eq(g_frees, 0);
    TU_ERR(df_deferred_resolve(NULL, df_ok(VAL, count_free)), DF_EINVAL);
    ck_assert_int_eq(g_frees, 0);
}
END_TEST

START_TEST(test_misuse_deferred_errback_null_failure)
{
    df_deferred *d = new_d();
    rec x = {0};
    TU_ERR(df_deferred_errback(d, NULL), DF_EINVAL);
    TU_ERR(df_deferred_errback(NULL, NULL), DF_EINVAL);
    ck_assert(!df_deferred_called(d));
    watch(d, &x);
    TU_OK(df_deferred_errback(d, df_failure_new(L, DF_EFAILED, NULL)));
    ck_assert_int_eq(x.code, DF_EFAILED);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_double_callback)
{
    df_deferred *d = new_d();
    int second = 7;
    void *v = NULL;
    TU_OK(df_deferred_callback(d, VAL, count_free));
    TU_ERR(df_deferred_callback(d, &second, count_free), DF_EALREADY_CALLED);
    ck_assert_int_eq(g_frees, 0); /* the caller keeps the second value */
    TU_OK(df_deferred_peek(d, &v, NULL));
    ck_assert_ptr_eq(v, VAL);
    df_deferred_unref(d);
    ck_assert_int_eq(g_frees, 1);
}
END_TEST

START_TEST(test_misuse_deferred_double_errback)
{
    df_deferred *d = new_d();
    df_failure *f2 = df_failure_new(L, DF_EAGAIN, NULL);
    df_failure *got = NULL;
    TU_OK(df_deferred_errback(d, df_failure_new(L, DF_EFAILED, NULL)));
    TU_ERR(df_deferred_errback(d, f2), DF_EALREADY_CALLED);
    TU_ERR(df_deferred_callback(d, VAL, count_free), DF_EALREADY_CALLED);
    ck_assert_int_eq(g_frees, 0);
    TU_OK(df_deferred_peek(d, NULL, &got));
    ck_assert_int_eq(df_failure_code(got), DF_EFAILED);
    df_failure_unref(f2); /* still ours */
    TU_OK(df_deferred_add_errback(d, rec_cb, &(rec){0}));
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

typedef struct self_fire {
    df_deferred *d;
    int rc;
} self_fire;

static df_result fire_again_cb(df_result r, void *arg)
{
    self_fire *sf = arg;
    sf->rc = df_deferred_callback(sf->d, VAL, count_free);
    return r;
}

START_TEST(test_misuse_deferred_fire_from_own_callback)
{
    self_fire sf = {new_d(), 0};
    rec x = {0};
    TU_OK(df_deferred_add_callback(sf.d, fire_again_cb, &sf));
    watch(sf.d, &x);
    TU_OK(df_deferred_callback(sf.d, NULL, NULL));
    TU_ERR(sf.rc, DF_EALREADY_CALLED);
    ck_assert_int_eq(g_frees, 0);
    ck_assert_int_eq(x.ok, 1);
    ck_assert_ptr_null(x.value);
    df_deferred_unref(sf.d);
}
END_TEST

START_TEST(test_misuse_deferred_resolve_wait)
{
    df_deferred *d = new_d();
    df_deferred *inner = new_d();
    rec x = {0};
    TU_ERR(df_deferred_resolve(d, df_wait(inner)), DF_EINVAL);
    ck_assert(!df_deferred_called(d));
    watch(d, &x);
    TU_OK(df_deferred_resolve(d, df_ok(VAL, NULL)));
    ck_assert_ptr_eq(x.value, VAL);
    df_deferred_unref(inner); /* still ours */
    df_deferred_unref(d);
}
END_TEST

typedef struct dval {
    df_deferred *d;
    void *value;
    df_failure *f;
} dval;

static int foreign_fire(void *arg)
{
    dval *a = arg;
    int rc = df_deferred_callback(a->d, a->value, count_free);
    if (rc != DF_EWRONG_THREAD)
        return rc;
    return df_deferred_errback(a->d, a->f);
}

START_TEST(test_misuse_deferred_fire_wrong_thread)
{
    dval a = {new_d(), VAL, df_failure_new(L, DF_EFAILED, NULL)};
    rec x = {0};
    TU_ERR(on_other_thread(foreign_fire, &a), DF_EWRONG_THREAD);
    ck_assert(!df_deferred_called(a.d));
    ck_assert_int_eq(g_frees, 0);
    watch(a.d, &x);
    TU_OK(df_deferred_errback(a.d, a.f));
    ck_assert_int_eq(x.code, DF_EFAILED);
    df_deferred_unref(a.d);
}
END_TEST

START_TEST(test_misuse_deferred_add_callbacks_null)
{
    df_deferred *d = new_d();
    rec x = {0};
    TU_ERR(df_deferred_add_callbacks(NULL, rec_cb, rec_cb, &x), DF_EINVAL);
    TU_ERR(df_deferred_add_callback(NULL, rec_cb, &x), DF_EINVAL);
    TU_ERR(df_deferred_add_callback(d, NULL, &x), DF_EINVAL);
    TU_ERR(df_deferred_add_errback(d, NULL, &x), DF_EINVAL);
    TU_ERR(df_deferred_add_both(d, NULL, &x), DF_EINVAL);
    /* Both NULL is a pass-through pair: accepted, changes nothing. */
    TU_OK(df_deferred_add_callbacks(d, NULL, NULL, &x));
    TU_OK(df_deferred_add_both(d, rec_cb, &x));
    TU_OK(df_deferred_callback(d, VAL, NULL));
    ck_assert_int_eq(x.ok, 1);
    ck_assert_int_eq(x.err, 0);
    df_deferred_unref(d);
}
END_TEST

static int foreign_add(void *arg)
{
    return df_deferred_add_both(arg, rec_cb, NULL);
}

START_TEST(test_misuse_deferred_add_callbacks_wrong_thread)
{
    df_deferred *d = new_d();
    rec x = {0};
    TU_ERR(on_other_thread(foreign_add, d), DF_EWRONG_THREAD);
    watch(d, &x);
    TU_OK(df_deferred_callback(d, VAL, NULL));
    ck_assert_int_eq(x.ok, 1);
    df_deferred_unref(d);
}
END_TEST

/* Adding to the chain being run: the new pair runs after the callback in
 * progress returns, never nested inside it. */
typedef struct adder {
    df_deferred *d;
    bool inside;
    int order[2];
    int n;
    int rc;
    bool nested;
} adder;

static df_result second_cb(df_result r, void *arg)
{
    adder *a = arg;
    a->nested = a->inside;
    a->order[a->n++] = 2;
    return r;
}

static df_result first_cb(df_result r, void *arg)
{
    adder *a = arg;
    a->inside = true;
    a->rc = df_deferred_add_callback(a->d, second_cb, a);
    a->order[a->n++] = 1;
    a->inside = false;
    return r;
}

START_TEST(test_misuse_deferred_add_while_running)
{
    adder a = {new_d(), false, {0, 0}, 0, 0, false};
    TU_OK(df_deferred_add_callback(a.d, first_cb, &a));
    TU_OK(df_deferred_callback(a.d, NULL, NULL));
    TU_OK(a.rc);
    ck_assert_int_eq(a.n, 2);
    ck_assert_int_eq(a.order[0], 1);
    ck_assert_int_eq(a.order[1], 2);
    ck_assert(!a.nested);
    df_deferred_unref(a.d);
}
END_TEST

START_TEST(test_misuse_deferred_chain_self)
{
    df_deferred *d = new_d();
    rec x = {0};
    TU_ERR(df_deferred_chain(d, d), DF_EINVAL);
    watch(d, &x);
    TU_OK(df_deferred_callback(d, VAL, NULL));
    ck_assert_ptr_eq(x.value, VAL);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_chain_null)
{
    df_deferred *d = new_d();
    TU_ERR(df_deferred_chain(d, NULL), DF_EINVAL);
    TU_ERR(df_deferred_chain(NULL, d), DF_EINVAL);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_chain_other_loop)
{
    df_loop *l2 = new_loop();
    df_deferred *d = new_d(), *other;
    rec x = {0};
    TU_OK(df_deferred_new(l2, &other));
    TU_ERR(df_deferred_chain(d, other), DF_EINVAL);
    TU_ERR(df_deferred_chain(other, d), DF_EINVAL);
    watch(other, &x);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(x.ok, 0); /* nothing was chained */
    TU_OK(df_deferred_callback(other, NULL, NULL));
    ck_assert_int_eq(x.ok, 1);
    df_deferred_unref(other);
    df_deferred_unref(d);
    TU_OK(df_loop_free(l2));
}
END_TEST

/* Chaining to a deferred that has fired already: as in Twisted, the chain
 * goes on with DF_EALREADY_CALLED and the target keeps its result. */
START_TEST(test_misuse_deferred_chain_fired_target)
{
    df_deferred *d = new_d(), *other = new_d();
    rec x = {0};
    void *v = NULL;
    TU_OK(df_deferred_callback(other, VAL, NULL));
    TU_OK(df_deferred_chain(d, other));
    watch(d, &x);
    TU_OK(df_deferred_callback(d, &g_frees, count_free));
    ck_assert_int_eq(g_frees, 1); /* d's value was destroyed, once */
    ck_assert_int_eq(x.code, DF_EALREADY_CALLED);
    TU_OK(df_deferred_peek(other, &v, NULL));
    ck_assert_ptr_eq(v, VAL);
    df_deferred_unref(other);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_pause_null)
{
    TU_ERR(df_deferred_pause(NULL), DF_EINVAL);
    TU_ERR(df_deferred_unpause(NULL), DF_EINVAL);
    ck_assert(!df_deferred_paused(NULL));
    ck_assert(!df_deferred_called(NULL));
    ck_assert_ptr_null(df_deferred_loop(NULL));
}
END_TEST

START_TEST(test_misuse_deferred_unpause_not_paused)
{
    df_deferred *d = new_d();
    rec x = {0};
    TU_ERR(df_deferred_unpause(d), DF_ESTATE);
    ck_assert(!df_deferred_paused(d));
    TU_OK(df_deferred_pause(d));
    TU_OK(df_deferred_unpause(d));
    TU_ERR(df_deferred_unpause(d), DF_ESTATE);
    watch(d, &x);
    TU_OK(df_deferred_callback(d, VAL, NULL));
    ck_assert_int_eq(x.ok, 1); /* the pause count did not go negative */
    df_deferred_unref(d);
}
END_TEST

static df_result wait_for_arg(df_result r, void *arg)
{
    df_result_clear(&r);
    return df_wait(df_deferred_ref(arg));
}

/* A pause made by waiting on an inner deferred is not the user's to undo. */
START_TEST(test_misuse_deferred_unpause_waiting)
{
    df_deferred *d = new_d(), *inner = new_d();
    rec x = {0};
    TU_OK(df_deferred_add_callback(d, wait_for_arg, inner));
    watch(d, &x);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert(df_deferred_paused(d));
    TU_ERR(df_deferred_unpause(d), DF_ESTATE);
    ck_assert_int_eq(x.ok, 0);
    TU_ERR(df_deferred_peek(d, NULL, NULL), DF_ENOT_CALLED);
    TU_OK(df_deferred_callback(inner, VAL, NULL));
    ck_assert_int_eq(x.ok, 1);
    ck_assert_ptr_eq(x.value, VAL);
    df_deferred_unref(inner);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_cancel_null)
{
    TU_ERR(df_deferred_cancel(NULL), DF_EINVAL);
}
END_TEST

START_TEST(test_misuse_deferred_cancel_fired)
{
    df_deferred *d = new_d();
    void *v = NULL;
    TU_OK(df_deferred_callback(d, VAL, NULL));
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_peek(d, &v, NULL));
    ck_assert_ptr_eq(v, VAL);
    df_deferred_unref(d);
}
END_TEST

typedef struct recancel {
    int calls;
    int rc;
} recancel;

/* A canceller that cancels its own deferred again.  Stops after two
 * calls so that the test fails instead of overflowing the stack. */
static void recancel_fn(df_deferred *d, void *arg)
{
    recancel *c = arg;
    if (++c->calls > 1)
        return;
    c->rc = df_deferred_cancel(d);
}

START_TEST(test_misuse_deferred_cancel_reentrant)
{
    df_deferred *d;
    recancel c = {0, -1};
    rec x = {0};
    TU_OK(df_deferred_new_cancellable(L, recancel_fn, &c, &d));
    watch(d, &x);
    TU_OK(df_deferred_cancel(d));
    TU_OK(c.rc);
    ck_assert_int_eq(c.calls, 1);
    ck_assert_int_eq(x.err, 1);
    ck_assert_int_eq(x.code, DF_ECANCELLED);
    df_deferred_unref(d);
}
END_TEST

static int foreign_cancel(void *arg)
{
    return df_deferred_cancel(arg);
}

START_TEST(test_misuse_deferred_cancel_wrong_thread)
{
    df_deferred *d = new_d();
    rec x = {0};
    TU_ERR(on_other_thread(foreign_cancel, d), DF_EWRONG_THREAD);
    ck_assert(!df_deferred_called(d));
    watch(d, &x);
    TU_OK(df_deferred_callback(d, VAL, NULL));
    ck_assert_int_eq(x.ok, 1);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_peek_unfired)
{
    df_deferred *d = new_d();
    void *v = VAL;
    df_failure *f = NULL;
    TU_ERR(df_deferred_peek(NULL, &v, &f), DF_EINVAL);
    TU_ERR(df_deferred_peek(d, &v, &f), DF_ENOT_CALLED);
    ck_assert_ptr_eq(v, VAL); /* untouched */
    TU_OK(df_deferred_callback(d, NULL, NULL));
    TU_OK(df_deferred_peek(d, NULL, NULL));
    TU_OK(df_deferred_peek(d, &v, &f));
    ck_assert_ptr_null(v);
    ck_assert_ptr_null(f);
    df_deferred_unref(d);
}
END_TEST

static int foreign_peek(void *arg)
{
    return df_deferred_peek(arg, NULL, NULL);
}

START_TEST(test_misuse_deferred_peek_wrong_thread)
{
    df_deferred *d;
    TU_OK(df_succeed(L, VAL, NULL, &d));
    TU_ERR(on_other_thread(foreign_peek, d), DF_EWRONG_THREAD);
    TU_OK(df_deferred_peek(d, NULL, NULL));
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_ref_null)
{
    df_result r = df_ok(VAL, count_free);
    ck_assert_ptr_null(df_deferred_ref(NULL));
    df_deferred_unref(NULL);
    df_result_clear(NULL);
    df_result_clear(&r);
    ck_assert_int_eq(g_frees, 1);
    ck_assert_ptr_null(r.value);
}
END_TEST

static int foreign_unref(void *arg)
{
    /* Ignored (with one line on stderr): the reference stays. */
    df_deferred_unref(arg);
    return df_deferred_ref(arg) == arg ? 0 : -1;
}

START_TEST(test_misuse_deferred_unref_wrong_thread)
{
    df_deferred *d;
    void *v = NULL;
    TU_OK(df_succeed(L, VAL, count_free, &d));
    TU_OK(on_other_thread(foreign_unref, d));
    ck_assert_int_eq(g_frees, 0);
    TU_OK(df_deferred_peek(d, &v, NULL));
    ck_assert_ptr_eq(v, VAL);
    df_deferred_unref(d); /* the only reference: frees it */
    ck_assert_int_eq(g_frees, 1);
}
END_TEST

static df_result return_self(df_result r, void *arg)
{
    df_deferred **self = arg;
    df_result_clear(&r);
    return df_wait(df_deferred_ref(*self));
}

START_TEST(test_misuse_deferred_callback_returns_self)
{
    df_deferred *d = new_d();
    rec x = {0};
    TU_OK(df_deferred_add_callback(d, return_self, &d));
    watch(d, &x);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(x.err, 1);
    ck_assert_int_eq(x.code, DF_EINVAL);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_deferred_callback_returns_other_loop)
{
    df_loop *l2 = new_loop();
    df_deferred *d = new_d(), *other;
    rec x = {0};
    TU_OK(df_deferred_new(l2, &other));
    TU_OK(df_deferred_add_callback(d, wait_for_arg, other));
    watch(d, &x);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(x.code, DF_EINVAL);
    ck_assert(!df_deferred_paused(d));
    df_deferred_unref(other);
    df_deferred_unref(d);
    TU_OK(df_loop_free(l2));
}
END_TEST

/* ----------------------------------------------------------- failure */

/* Code 0 means success; a failure made with it gets DF_EFAILED. */
START_TEST(test_misuse_failure_new_code_zero)
{
    df_failure *f = df_failure_new(L, 0, NULL);
    df_result r = df_errf(L, 0, "no code %d", 0);
    ck_assert_int_eq(df_failure_code(f), DF_EFAILED);
    ck_assert_str_eq(df_failure_message(f), df_strerror(DF_EFAILED));
    ck_assert_int_eq(df_failure_code(r.failure), DF_EFAILED);
    ck_assert_str_eq(df_failure_message(r.failure), "no code 0");
    df_failure_unref(f);
    df_result_clear(&r);
}
END_TEST

START_TEST(test_misuse_failure_new_null_fmt)
{
    df_failure *f = df_failure_new(L, DF_ETIMEDOUT, NULL);
    ck_assert_str_eq(df_failure_message(f), df_strerror(DF_ETIMEDOUT));
    df_failure_unref(f);
    /* No loop: the C library's allocator. */
    f = df_failure_new(NULL, -12345, NULL);
    ck_assert_int_eq(df_failure_code(f), -12345);
    ck_assert_ptr_nonnull(df_failure_message(f));
    df_failure_unref(f);
}
END_TEST

START_TEST(test_misuse_failure_accessors_null)
{
    ck_assert_int_eq(df_failure_code(NULL), 0);
    ck_assert_str_eq(df_failure_message(NULL), "");
    ck_assert_ptr_null(df_failure_payload(NULL));
    ck_assert_int_eq(df_failure_index(NULL), -1);
    ck_assert_ptr_null(df_failure_cause(NULL));
}
END_TEST

START_TEST(test_misuse_failure_ref_null)
{
    df_failure *f = df_failure_new(L, DF_EFAILED, "x");
    ck_assert_ptr_null(df_failure_ref(NULL));
    df_failure_unref(NULL);
    ck_assert_ptr_eq(df_failure_ref(f), f);
    df_failure_unref(f);
    df_failure_unref(f);
}
END_TEST

START_TEST(test_misuse_failure_payload_null_free)
{
    df_failure *f =
        df_failure_new_payload(L, DF_EFAILED, VAL, NULL, "%s", "payload");
    ck_assert_ptr_eq(df_failure_payload(f), VAL);
    df_failure_unref(f);
}
END_TEST

/* Out of memory: the shared failure, whose ref/unref do nothing, and the
 * payload destroyed at once, exactly once. */
START_TEST(test_misuse_failure_nomem_shared)
{
    atomic_store(&g_ca.fail, 1);
    df_failure *f =
        df_failure_new_payload(L, DF_EFAILED, VAL, count_free, "lost");
    atomic_store(&g_ca.fail, 0);
    ck_assert_int_eq(g_frees, 1);
    ck_assert_int_eq(df_failure_code(f), DF_ENOMEM);
    ck_assert_ptr_null(df_failure_payload(f));
    ck_assert_ptr_eq(df_failure_ref(f), f);
    df_failure_unref(f);
    df_failure_unref(f);
    df_failure_unref(f);
    ck_assert_int_eq(df_failure_code(f), DF_ENOMEM);
    ck_assert_int_eq(g_frees, 1);
}
END_TEST

START_TEST(test_misuse_failure_strerror_bad_code)
{
    ck_assert_str_eq(df_strerror(INT_MIN), "error -2147483648");
    ck_assert_str_eq(df_strerror(INT_MAX), "error 2147483647");
    ck_assert_str_eq(df_strerror(0), "success");
    ck_assert_str_eq(df_err_name(INT_MIN), "DF_UNKNOWN(-2147483648)");
    ck_assert_str_eq(df_err_name(1), "EPERM");
    ck_assert_str_eq(df_err_name(DF_EOVERRELEASE), "DF_EOVERRELEASE");
}
END_TEST

typedef struct fail_arg {
    df_loop *loop;
    df_failure *f;
} fail_arg;

static int foreign_failure(void *arg)
{
    fail_arg *a = arg;
    a->f = df_failure_new(a->loop, DF_EAGAIN, "made on another thread");
    return 0;
}

/* Not misuse: failures are made and released on any thread. */
START_TEST(test_misuse_failure_other_thread)
{
    fail_arg a = {L, NULL};
    TU_OK(on_other_thread(foreign_failure, &a));
    ck_assert_int_eq(df_failure_code(a.f), DF_EAGAIN);
    df_failure_unref(a.f);
}
END_TEST

/* -------------------------------------------------------------- list */

START_TEST(test_misuse_list_new_null)
{
    df_deferred *m = new_d(), *l = NULL;
    rec x = {0};
    TU_ERR(df_list_new(NULL, &m, 1, 0, &l), DF_EINVAL);
    TU_ERR(df_list_new(L, &m, 1, 0, NULL), DF_EINVAL);
    TU_ERR(df_list_new(L, NULL, 1, 0, &l), DF_EINVAL);
    ck_assert_ptr_null(l);
    /* m was not touched: not paused, no callback attached. */
    ck_assert(!df_deferred_paused(m));
    watch(m, &x);
    TU_OK(df_deferred_callback(m, VAL, count_free));
    ck_assert_ptr_eq(x.value, VAL);
    df_deferred_unref(m);
    ck_assert_int_eq(g_frees, 1);
}
END_TEST

START_TEST(test_misuse_list_new_null_member)
{
    df_deferred *m[2] = {new_d(), NULL}, *l = NULL;
    TU_ERR(df_list_new(L, m, 2, 0, &l), DF_EINVAL);
    ck_assert_ptr_null(l);
    ck_assert(!df_deferred_paused(m[0]));
    TU_OK(df_list_new(L, m, 1, 0, &l));
    TU_OK(df_deferred_callback(m[0], VAL, NULL));
    ck_assert(df_deferred_called(l));
    df_deferred_unref(l);
    df_deferred_unref(m[0]);
}
END_TEST

START_TEST(test_misuse_list_new_other_loop_member)
{
    df_loop *l2 = new_loop();
    df_deferred *m[2] = {new_d(), NULL}, *l = NULL;
    TU_OK(df_deferred_new(l2, &m[1]));
    TU_ERR(df_list_new(L, m, 2, 0, &l), DF_EINVAL);
    TU_ERR(df_gather(L, m, 2, 0, &l), DF_EINVAL);
    ck_assert(!df_deferred_paused(m[0]));
    ck_assert(!df_deferred_paused(m[1]));
    df_deferred_unref(m[1]);
    TU_OK(df_loop_free(l2));
    TU_OK(df_list_new(L, m, 1, 0, &l));
    TU_OK(df_deferred_callback(m[0], NULL, NULL));
    ck_assert(df_deferred_called(l));
    df_deferred_unref(l);
    df_deferred_unref(m[0]);
}
END_TEST

START_TEST(test_misuse_list_new_bad_flags)
{
    df_deferred *m = new_d(), *l = NULL;
    TU_ERR(df_list_new(L, &m, 1, 1u << 5, &l), DF_EINVAL);
    TU_ERR(df_list_new(L, &m, 1, ~0u, &l), DF_EINVAL);
    ck_assert_ptr_null(l);
    TU_OK(df_list_new(L, &m, 1, DF_LIST_CONSUME_ERRORS, &l));
    TU_OK(df_deferred_errback(m, df_failure_new(L, DF_EFAILED, NULL)));
    ck_assert(df_deferred_called(l));
    df_deferred_unref(l);
    df_deferred_unref(m);
    ck_assert_int_eq(g_unhandled, 0); /* consumed */
}
END_TEST

START_TEST(test_misuse_list_gather_bad_flags)
{
    df_deferred *m = new_d(), *l = NULL;
    TU_ERR(df_gather(L, &m, 1, DF_LIST_FIRE_ON_ONE_CALLBACK, &l), DF_EINVAL);
    TU_ERR(df_gather(NULL, &m, 1, 0, &l), DF_EINVAL);
    TU_ERR(df_gather(L, &m, 1, 0, NULL), DF_EINVAL);
    ck_assert_ptr_null(l);
    TU_OK(df_gather(L, &m, 1, 0, &l));
    TU_OK(df_deferred_callback(m, VAL, NULL));
    ck_assert(df_deferred_called(l));
    df_deferred_unref(l);
    df_deferred_unref(m);
}
END_TEST

/* A count no array can have is refused before the array is read. */
START_TEST(test_misuse_list_new_oversized_count)
{
    df_deferred *m = new_d(), *l = NULL;
    TU_ERR(df_list_new(L, &m, SIZE_MAX, 0, &l), DF_EINVAL);
    TU_ERR(df_gather(L, &m, SIZE_MAX / 2, 0, &l), DF_EINVAL);
    ck_assert_ptr_null(l);
    ck_assert(!df_deferred_paused(m));
    TU_OK(df_deferred_callback(m, NULL, NULL));
    df_deferred_unref(m);
}
END_TEST

/* Not an error: an empty list fires at once, members may be NULL. */
START_TEST(test_misuse_list_new_zero_count)
{
    df_deferred *l = NULL;
    void *v = NULL;
    TU_OK(df_list_new(L, NULL, 0, DF_LIST_FIRE_ON_ONE_CALLBACK, &l));
    TU_OK(df_deferred_peek(l, &v, NULL));
    ck_assert_uint_eq(df_list_result_count(v), 0);
    ck_assert_int_eq(df_list_result_index(v), -1);
    df_deferred_unref(l);
}
END_TEST

typedef struct list_args {
    df_loop *loop;
    df_deferred *m;
} list_args;

static int foreign_list(void *arg)
{
    list_args *a = arg;
    df_deferred *l = NULL;
    int rc = df_list_new(a->loop, &a->m, 1, 0, &l);
    if (rc != DF_EWRONG_THREAD || l != NULL)
        return rc;
    return df_gather(a->loop, &a->m, 1, 0, &l);
}

START_TEST(test_misuse_list_new_wrong_thread)
{
    list_args a = {L, new_d()};
    df_deferred *l;
    TU_ERR(on_other_thread(foreign_list, &a), DF_EWRONG_THREAD);
    ck_assert(!df_deferred_paused(a.m));
    TU_OK(df_list_new(L, &a.m, 1, 0, &l));
    TU_OK(df_deferred_callback(a.m, NULL, NULL));
    ck_assert(df_deferred_called(l));
    df_deferred_unref(l);
    df_deferred_unref(a.m);
}
END_TEST

/* The same member twice: both slots record it, its value is destroyed
 * once. */
START_TEST(test_misuse_list_duplicate_member)
{
    df_deferred *m[2], *l;
    void *v = NULL;
    m[0] = m[1] = new_d();
    TU_OK(df_list_new(L, m, 2, 0, &l));
    TU_OK(df_deferred_callback(m[0], VAL, count_free));
    TU_OK(df_deferred_peek(l, &v, NULL));
    ck_assert(df_list_result_ok(v, 0));
    ck_assert(df_list_result_ok(v, 1));
    ck_assert_ptr_eq(df_list_result_value(v, 0), VAL);
    ck_assert_ptr_eq(df_list_result_value(v, 1), VAL);
    df_deferred_unref(l);
    df_deferred_unref(m[0]);
    ck_assert_int_eq(g_frees, 1);
}
END_TEST

START_TEST(test_misuse_list_result_null)
{
    ck_assert_uint_eq(df_list_result_count(NULL), 0);
    ck_assert(!df_list_result_ok(NULL, 0));
    ck_assert(!df_list_result_fired(NULL, 0));
    ck_assert_ptr_null(df_list_result_value(NULL, 0));
    ck_assert_ptr_null(df_list_result_failure(NULL, 0));
    ck_assert_int_eq(df_list_result_index(NULL), -1);
    df_list_result_free(NULL);
}
END_TEST

START_TEST(test_misuse_list_result_out_of_range)
{
    df_deferred *m = new_d(), *l;
    void *v = NULL;
    TU_OK(df_list_new(L, &m, 1, 0, &l));
    TU_OK(df_deferred_errback(m, df_failure_new(L, DF_EFAILED, NULL)));
    TU_OK(df_deferred_peek(l, &v, NULL));
    ck_assert(!df_list_result_ok(v, 1));
    ck_assert(!df_list_result_fired(v, SIZE_MAX));
    ck_assert_ptr_null(df_list_result_value(v, 1));
    ck_assert_ptr_null(df_list_result_failure(v, 1));
    ck_assert_int_eq(df_failure_code(df_list_result_failure(v, 0)),
                     DF_EFAILED);
    ck_assert_ptr_null(df_list_result_value(v, 0));
    TU_OK(df_deferred_add_errback(m, rec_cb, &(rec){0}));
    df_deferred_unref(l);
    df_deferred_unref(m);
}
END_TEST

/* --------------------------------------------------------------- sem */

START_TEST(test_misuse_sem_new_zero_tokens)
{
    df_sem *s = NULL;
    TU_ERR(df_sem_new(L, 0, &s), DF_EINVAL);
    ck_assert_ptr_null(s);
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_misuse_sem_new_null)
{
    df_sem *s = NULL;
    TU_ERR(df_sem_new(NULL, 1, &s), DF_EINVAL);
    TU_ERR(df_sem_new(L, 1, NULL), DF_EINVAL);
    ck_assert_ptr_null(s);
}
END_TEST

static int foreign_sem_new(void *arg)
{
    df_sem *s = NULL;
    int rc = df_sem_new(arg, 1, &s);
    return s == NULL ? rc : -1;
}

START_TEST(test_misuse_sem_new_wrong_thread)
{
    TU_ERR(on_other_thread(foreign_sem_new, L), DF_EWRONG_THREAD);
}
END_TEST

START_TEST(test_misuse_sem_overrelease)
{
    df_sem *s;
    df_deferred *d;
    TU_OK(df_sem_new(L, 2, &s));
    TU_ERR(df_sem_release(s), DF_EOVERRELEASE);
    ck_assert_uint_eq(df_sem_tokens(s), 2);
    TU_OK(df_sem_acquire(s, &d));
    df_deferred_unref(d);
    TU_OK(df_sem_release(s));
    TU_ERR(df_sem_release(s), DF_EOVERRELEASE);
    ck_assert_uint_eq(df_sem_tokens(s), 2);
    ck_assert_uint_eq(df_sem_limit(s), 2);
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_misuse_sem_free_held)
{
    df_sem *s;
    df_deferred *d;
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &d));
    df_deferred_unref(d);
    TU_ERR(df_sem_free(s), DF_EBUSY);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_misuse_sem_free_waiting)
{
    df_sem *s;
    df_deferred *d1, *d2;
    rec x = {0};
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &d1));
    TU_OK(df_sem_acquire(s, &d2));
    watch(d2, &x);
    TU_OK(df_sem_release(s)); /* to d2 */
    ck_assert_int_eq(x.ok, 1);
    df_deferred_unref(d1);
    df_deferred_unref(d2);
    TU_OK(df_sem_acquire(s, &d1)); /* waits behind the holder */
    TU_ERR(df_sem_free(s), DF_EBUSY);
    ck_assert_uint_eq(df_sem_waiting(s), 1);
    TU_OK(df_deferred_cancel(d1)); /* leaves the line */
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    TU_ERR(df_sem_free(s), DF_EBUSY); /* still held */
    df_deferred_unref(d1);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_misuse_sem_free_null)
{
    TU_ERR(df_sem_free(NULL), DF_EINVAL);
    ck_assert_uint_eq(df_sem_tokens(NULL), 0);
    ck_assert_uint_eq(df_sem_limit(NULL), 0);
    ck_assert_uint_eq(df_sem_waiting(NULL), 0);
}
END_TEST

typedef struct sem_cb {
    df_sem *s;
    int rc_free2;
    int rc_acquire;
    int rc_release;
    int rc_run;
} sem_cb;

static df_result free_sem_inside(df_result r, void *arg)
{
    sem_cb *c = arg;
    df_deferred *d = NULL;
    TU_OK(df_sem_free(c->s));
    c->rc_free2 = df_sem_free(c->s);
    c->rc_acquire = df_sem_acquire(c->s, &d);
    c->rc_release = df_sem_release(c->s);
    c->rc_run = df_sem_run(c->s, run_count, NULL, &d);
    return r;
}

static df_result run_value(void *arg)
{
    (void)arg;
    return df_ok(NULL, NULL);
}

/* df_sem_free from a callback the semaphore runs: the semaphore is freed
 * once the dispatch unwinds, and until then every call is refused with
 * DF_ESTATE (a second free too). */
START_TEST(test_misuse_sem_use_after_free_in_callback)
{
    sem_cb c = {NULL, 0, 0, 0, 0};
    df_deferred *held, *d;
    g_run_calls = 0;
    TU_OK(df_sem_new(L, 1, &c.s));
    TU_OK(df_sem_acquire(c.s, &held));
    TU_OK(df_sem_run(c.s, run_value, NULL, &d)); /* waits */
    /* The run has released its token by the time its callbacks run, and
     * they run inside the dispatch that df_sem_release starts. */
    TU_OK(df_deferred_add_callback(d, free_sem_inside, &c));
    TU_OK(df_sem_release(c.s));
    ck_assert(df_deferred_called(d));
    TU_ERR(c.rc_free2, DF_ESTATE);
    TU_ERR(c.rc_acquire, DF_ESTATE);
    TU_ERR(c.rc_release, DF_ESTATE);
    TU_ERR(c.rc_run, DF_ESTATE);
    ck_assert_int_eq(g_run_calls, 0);
    df_deferred_unref(held);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_misuse_sem_acquire_null)
{
    df_sem *s;
    df_deferred *d = NULL;
    TU_OK(df_sem_new(L, 1, &s));
    TU_ERR(df_sem_acquire(NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_acquire(s, NULL), DF_EINVAL);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_acquire(s, &d));
    df_deferred_unref(d);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_misuse_sem_run_null)
{
    df_sem *s;
    df_deferred *d = NULL;
    g_run_calls = 0;
    TU_OK(df_sem_new(L, 1, &s));
    TU_ERR(df_sem_run(NULL, run_count, NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_run(s, NULL, NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_run(s, run_count, NULL, NULL), DF_EINVAL);
    ck_assert_int_eq(g_run_calls, 0);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_run(s, run_count, NULL, &d));
    ck_assert_int_eq(g_run_calls, 1);
    df_deferred_unref(d);
    TU_OK(df_sem_free(s));
}
END_TEST

static int foreign_sem_calls(void *arg)
{
    df_deferred *d = NULL;
    int bad = 0;
    bad += df_sem_acquire(arg, &d) != DF_EWRONG_THREAD;
    bad += df_sem_release(arg) != DF_EWRONG_THREAD;
    bad += df_sem_run(arg, run_count, NULL, &d) != DF_EWRONG_THREAD;
    bad += df_sem_free(arg) != DF_EWRONG_THREAD;
    bad += d != NULL;
    return bad;
}

START_TEST(test_misuse_sem_wrong_thread)
{
    df_sem *s;
    df_deferred *d;
    g_run_calls = 0;
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &d)); /* held: a foreign release would free */
    df_deferred_unref(d);
    ck_assert_int_eq(on_other_thread(foreign_sem_calls, s), 0);
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    ck_assert_int_eq(g_run_calls, 0);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
}
END_TEST

/* The application fires a waiting acquire's deferred itself: the token
 * handed to it later goes to the next in line instead of being lost. */
START_TEST(test_misuse_sem_acquire_fired_by_hand)
{
    df_sem *s;
    df_deferred *held, *bad, *next;
    rec x = {0};
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_acquire(s, &bad));
    TU_OK(df_sem_acquire(s, &next));
    watch(next, &x);
    TU_OK(df_deferred_callback(bad, NULL, NULL));
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(x.ok, 1);
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    TU_OK(df_sem_release(s));
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_ERR(df_sem_release(s), DF_EOVERRELEASE);
    df_deferred_unref(held);
    df_deferred_unref(bad);
    df_deferred_unref(next);
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_misuse_sem_run_in_pool_null)
{
    df_sem *s;
    df_pool *p;
    df_deferred *d = NULL;
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_pool_new(L, NULL, &p));
    TU_ERR(df_sem_run_in_pool(NULL, p, work_wait, NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_run_in_pool(s, NULL, work_wait, NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_run_in_pool(s, p, NULL, NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_run_in_pool(s, p, work_wait, NULL, NULL), DF_EINVAL);
    ck_assert_ptr_null(d);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    ck_assert_uint_eq(df_loop_pending(L), 0);
    df_pool_free(p);
    TU_OK(df_sem_free(s));
}
END_TEST

static df_result work_value(df_work *w, void *arg)
{
    (void)w;
    return df_ok(arg, NULL);
}

/* work_value as a map's work (the item is its argument). */
static df_result map_work_value(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    return work_value(w, item);
}

START_TEST(test_misuse_sem_run_in_pool_other_loop)
{
    df_loop *l2 = new_loop();
    df_sem *s;
    df_pool *p;
    df_deferred *d = NULL;
    TU_OK(df_sem_new(l2, 1, &s));
    TU_OK(df_pool_new(L, NULL, &p));
    TU_ERR(df_sem_run_in_pool(s, p, work_value, NULL, &d), DF_EINVAL);
    ck_assert_ptr_null(d);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    TU_OK(df_loop_free(l2));
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_run_in_pool(s, p, work_value, VAL, &d));
    TU_OK(df_loop_run_until(L, d));
    df_deferred_unref(d);
    df_pool_free(p);
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_misuse_sem_run_in_pool_after_shutdown)
{
    df_sem *s;
    df_pool *p;
    df_deferred *d = NULL;
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_pool_new(L, NULL, &p));
    TU_OK(df_pool_shutdown(p, DF_POOL_DRAIN));
    TU_ERR(df_sem_run_in_pool(s, p, work_value, NULL, &d), DF_ESHUTDOWN);
    ck_assert_ptr_null(d);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    df_pool_free(p);
    TU_OK(df_sem_free(s));
}
END_TEST

/* -------------------------------------------------------------- lock */

START_TEST(test_misuse_lock_new_null)
{
    df_lock *l = NULL;
    TU_ERR(df_lock_new(NULL, &l), DF_EINVAL);
    TU_ERR(df_lock_new(L, NULL), DF_EINVAL);
    ck_assert_ptr_null(l);
    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_free(l));
}
END_TEST

static int foreign_lock_new(void *arg)
{
    df_lock *l = NULL;
    int rc = df_lock_new(arg, &l);
    return l == NULL ? rc : -1;
}

START_TEST(test_misuse_lock_new_wrong_thread)
{
    TU_ERR(on_other_thread(foreign_lock_new, L), DF_EWRONG_THREAD);
}
END_TEST

START_TEST(test_misuse_lock_release_unlocked)
{
    df_lock *l;
    df_deferred *d;
    TU_OK(df_lock_new(L, &l));
    TU_ERR(df_lock_release(l), DF_EOVERRELEASE);
    ck_assert(!df_lock_locked(l));
    TU_OK(df_lock_acquire(l, &d));
    ck_assert(df_deferred_called(d));
    ck_assert(df_lock_locked(l));
    df_deferred_unref(d);
    TU_OK(df_lock_release(l));
    TU_OK(df_lock_free(l));
}
END_TEST

START_TEST(test_misuse_lock_free_locked)
{
    df_lock *l;
    df_deferred *d;
    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_acquire(l, &d));
    df_deferred_unref(d);
    TU_ERR(df_lock_free(l), DF_EBUSY);
    ck_assert(df_lock_locked(l));
    TU_OK(df_lock_release(l));
    TU_OK(df_lock_free(l));
}
END_TEST

START_TEST(test_misuse_lock_null)
{
    df_deferred *d = NULL;
    g_run_calls = 0;
    TU_ERR(df_lock_free(NULL), DF_EINVAL);
    TU_ERR(df_lock_acquire(NULL, &d), DF_EINVAL);
    TU_ERR(df_lock_release(NULL), DF_EINVAL);
    TU_ERR(df_lock_run(NULL, run_count, NULL, &d), DF_EINVAL);
    ck_assert(!df_lock_locked(NULL));
    ck_assert_ptr_null(d);
    ck_assert_int_eq(g_run_calls, 0);
}
END_TEST

START_TEST(test_misuse_lock_run_null_fn)
{
    df_lock *l;
    df_deferred *d = NULL;
    g_run_calls = 0;
    TU_OK(df_lock_new(L, &l));
    TU_ERR(df_lock_run(l, NULL, NULL, &d), DF_EINVAL);
    TU_ERR(df_lock_run(l, run_count, NULL, NULL), DF_EINVAL);
    TU_ERR(df_lock_acquire(l, NULL), DF_EINVAL);
    ck_assert(!df_lock_locked(l));
    TU_OK(df_lock_run(l, run_count, NULL, &d));
    ck_assert_int_eq(g_run_calls, 1);
    ck_assert(!df_lock_locked(l));
    df_deferred_unref(d);
    TU_OK(df_lock_free(l));
}
END_TEST

static int foreign_lock_calls(void *arg)
{
    df_deferred *d = NULL;
    int bad = 0;
    bad += df_lock_acquire(arg, &d) != DF_EWRONG_THREAD;
    bad += df_lock_release(arg) != DF_EWRONG_THREAD;
    bad += df_lock_run(arg, run_count, NULL, &d) != DF_EWRONG_THREAD;
    bad += df_lock_free(arg) != DF_EWRONG_THREAD;
    bad += d != NULL;
    return bad;
}

START_TEST(test_misuse_lock_wrong_thread)
{
    df_lock *l;
    df_deferred *d;
    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_acquire(l, &d));
    df_deferred_unref(d);
    ck_assert_int_eq(on_other_thread(foreign_lock_calls, l), 0);
    ck_assert(df_lock_locked(l));
    TU_OK(df_lock_release(l));
    TU_OK(df_lock_free(l));
}
END_TEST

/* ------------------------------------------------------------- queue */

START_TEST(test_misuse_queue_new_null)
{
    df_queue *q = NULL;
    TU_ERR(df_queue_new(NULL, 1, 1, &q), DF_EINVAL);
    TU_ERR(df_queue_new(L, 1, 1, NULL), DF_EINVAL);
    ck_assert_ptr_null(q);
    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    df_queue_free(q);
}
END_TEST

static int foreign_queue_new(void *arg)
{
    df_queue *q = NULL;
    int rc = df_queue_new(arg, 1, 1, &q);
    return q == NULL ? rc : -1;
}

START_TEST(test_misuse_queue_new_wrong_thread)
{
    TU_ERR(on_other_thread(foreign_queue_new, L), DF_EWRONG_THREAD);
}
END_TEST

/* A queue that can neither store a value nor hold a get can never pass
 * anything on: refused. */
START_TEST(test_misuse_queue_new_zero_size_and_backlog)
{
    df_queue *q = NULL;
    int rc = df_queue_new(L, 0, 0, &q);
    if (rc == 0)
        df_queue_free(q);
    TU_ERR(rc, DF_EINVAL);
}
END_TEST

/* Size 0 alone is valid: a rendezvous queue. */
START_TEST(test_misuse_queue_zero_size)
{
    df_queue *q;
    df_deferred *d;
    rec x = {0};
    TU_OK(df_queue_new(L, 0, 1, &q));
    TU_ERR(df_queue_put(q, VAL, count_free), DF_EQUEUE_OVERFLOW);
    ck_assert_int_eq(g_frees, 0);
    TU_OK(df_queue_get(q, &d));
    watch(d, &x);
    TU_OK(df_queue_put(q, VAL, NULL));
    ck_assert_ptr_eq(x.value, VAL);
    df_deferred_unref(d);
    df_queue_free(q);
}
END_TEST

START_TEST(test_misuse_queue_put_overflow)
{
    df_queue *q;
    df_deferred *d;
    void *v = NULL;
    int other = 0;
    TU_OK(df_queue_new(L, 1, 1, &q));
    TU_OK(df_queue_put(q, VAL, count_free));
    TU_ERR(df_queue_put(q, &other, count_free), DF_EQUEUE_OVERFLOW);
    ck_assert_int_eq(g_frees, 0); /* the caller keeps the value */
    ck_assert_uint_eq(df_queue_size(q), 1);
    TU_OK(df_queue_get(q, &d));
    TU_OK(df_deferred_peek(d, &v, NULL));
    ck_assert_ptr_eq(v, VAL);
    df_deferred_unref(d);
    ck_assert_int_eq(g_frees, 1);
    df_queue_free(q);
}
END_TEST

START_TEST(test_misuse_queue_get_underflow)
{
    df_queue *q;
    df_deferred *d1, *d2 = NULL;
    rec x = {0};
    TU_OK(df_queue_new(L, 1, 1, &q));
    TU_OK(df_queue_get(q, &d1));
    TU_ERR(df_queue_get(q, &d2), DF_EQUEUE_UNDERFLOW);
    ck_assert_ptr_null(d2);
    ck_assert_uint_eq(df_queue_waiting(q), 1);
    watch(d1, &x);
    TU_OK(df_queue_put(q, VAL, NULL));
    ck_assert_ptr_eq(x.value, VAL);
    df_deferred_unref(d1);
    df_queue_free(q);
}
END_TEST

START_TEST(test_misuse_queue_null)
{
    df_deferred *d = NULL;
    df_queue *q;
    TU_OK(df_queue_new(L, 1, 1, &q));
    TU_ERR(df_queue_put(NULL, VAL, count_free), DF_EINVAL);
    TU_ERR(df_queue_get(NULL, &d), DF_EINVAL);
    TU_ERR(df_queue_get(q, NULL), DF_EINVAL);
    ck_assert_uint_eq(df_queue_size(NULL), 0);
    ck_assert_uint_eq(df_queue_waiting(NULL), 0);
    df_queue_free(NULL);
    ck_assert_int_eq(g_frees, 0);
    ck_assert_uint_eq(df_queue_waiting(q), 0);
    df_queue_free(q);
}
END_TEST

static int foreign_queue_calls(void *arg)
{
    df_deferred *d = NULL;
    int bad = 0;
    bad += df_queue_put(arg, VAL, count_free) != DF_EWRONG_THREAD;
    bad += df_queue_get(arg, &d) != DF_EWRONG_THREAD;
    df_queue_free(arg); /* ignored */
    bad += d != NULL;
    return bad;
}

START_TEST(test_misuse_queue_wrong_thread)
{
    df_queue *q;
    df_deferred *d;
    void *v = NULL;
    TU_OK(df_queue_new(L, 2, 2, &q));
    TU_OK(df_queue_put(q, &g_run_calls, NULL));
    ck_assert_int_eq(on_other_thread(foreign_queue_calls, q), 0);
    ck_assert_int_eq(g_frees, 0);
    ck_assert_uint_eq(df_queue_size(q), 1);
    TU_OK(df_queue_get(q, &d));
    TU_OK(df_deferred_peek(d, &v, NULL));
    ck_assert_ptr_eq(v, &g_run_calls);
    df_deferred_unref(d);
    df_queue_free(q);
}
END_TEST

typedef struct queue_cb {
    df_queue *q;
    int rc_put;
    int rc_get;
} queue_cb;

static df_result free_queue_inside(df_result r, void *arg)
{
    queue_cb *c = arg;
    df_deferred *d = NULL;
    df_queue_free(c->q);
    df_queue_free(c->q); /* a second free while unwinding: ignored */
    c->rc_put = df_queue_put(c->q, VAL, count_free);
    c->rc_get = df_queue_get(c->q, &d);
    return r;
}

START_TEST(test_misuse_queue_use_after_free_in_callback)
{
    queue_cb c = {NULL, 0, 0};
    df_deferred *d;
    rec x = {0};
    TU_OK(df_queue_new(L, 2, 2, &c.q));
    TU_OK(df_queue_get(c.q, &d));
    TU_OK(df_deferred_add_callback(d, free_queue_inside, &c));
    watch(d, &x);
    TU_OK(df_queue_put(c.q, VAL, count_free));
    TU_ERR(c.rc_put, DF_ESTATE);
    TU_ERR(c.rc_get, DF_ESTATE);
    ck_assert_ptr_eq(x.value, VAL); /* the get still got its value */
    ck_assert_int_eq(g_frees, 1);   /* and its chain destroyed it */
    df_deferred_unref(d);
}
END_TEST

/* The application fires a pending get's deferred itself: the value a put
 * hands to that get goes to the next get instead of being lost. */
START_TEST(test_misuse_queue_get_fired_by_hand)
{
    df_queue *q;
    df_deferred *bad, *next;
    rec x = {0};
    TU_OK(df_queue_new(L, 2, 2, &q));
    TU_OK(df_queue_get(q, &bad));
    TU_OK(df_queue_get(q, &next));
    watch(next, &x);
    TU_OK(df_deferred_callback(bad, NULL, NULL));
    TU_OK(df_queue_put(q, VAL, count_free));
    ck_assert_ptr_eq(x.value, VAL);
    ck_assert_int_eq(g_frees, 1); /* destroyed once, by next's chain */
    ck_assert_uint_eq(df_queue_waiting(q), 0);
    TU_OK(df_queue_put(q, &g_run_calls, NULL));
    ck_assert_uint_eq(df_queue_size(q), 1);
    df_deferred_unref(bad);
    df_deferred_unref(next);
    df_queue_free(q);
}
END_TEST

/* -------------------------------------------------------------- pool */

START_TEST(test_misuse_pool_new_null)
{
    df_pool *p = NULL;
    TU_ERR(df_pool_new(NULL, NULL, &p), DF_EINVAL);
    TU_ERR(df_pool_new(L, NULL, NULL), DF_EINVAL);
    ck_assert_ptr_null(p);
    ck_assert_uint_eq(df_pool_threads(NULL), 0);
}
END_TEST

START_TEST(test_misuse_pool_new_zero_threads)
{
    /* threads = 0 is no misuse: it asks for one thread per online CPU. */
    df_pool_options o = DF_POOL_OPTIONS_INIT;
    df_pool *p = NULL;
    o.threads = 0;
    TU_OK(df_pool_new(L, &o, &p));
    ck_assert_uint_ge(df_pool_threads(p), 1);
    df_pool_free(p);
    p = NULL;
    o.threads = 1;
    TU_OK(df_pool_new(L, &o, &p));
    ck_assert_uint_eq(df_pool_threads(p), 1);
    df_pool_free(p);
}
END_TEST

START_TEST(test_misuse_pool_new_tiny_stack)
{
    df_pool_options o = DF_POOL_OPTIONS_INIT;
    df_pool *p = NULL;
    o.stack_size = 1;
    TU_ERR(df_pool_new(L, &o, &p), DF_EINVAL);
    ck_assert_ptr_null(p);
    TU_OK(df_loop_free(L));
    L = new_loop();
}
END_TEST

static int foreign_pool_new(void *arg)
{
    df_pool *p = NULL;
    int rc = df_pool_new(arg, NULL, &p);
    return p == NULL ? rc : -1;
}

START_TEST(test_misuse_pool_new_wrong_thread)
{
    TU_ERR(on_other_thread(foreign_pool_new, L), DF_EWRONG_THREAD);
}
END_TEST

START_TEST(test_misuse_pool_submit_null)
{
    df_pool *p;
    df_deferred *d = NULL;
    TU_OK(df_pool_new(L, NULL, &p));
    TU_ERR(df_pool_submit(NULL, work_value, NULL, &d), DF_EINVAL);
    TU_ERR(df_pool_submit(p, NULL, NULL, &d), DF_EINVAL);
    TU_ERR(df_pool_submit(p, work_value, NULL, NULL), DF_EINVAL);
    ck_assert_ptr_null(d);
    ck_assert_uint_eq(df_loop_pending(L), 0);
    TU_OK(df_pool_submit(p, work_value, VAL, &d));
    TU_OK(df_loop_run_until(L, d));
    df_deferred_unref(d);
    df_pool_free(p);
}
END_TEST

START_TEST(test_misuse_pool_submit_after_shutdown)
{
    df_pool *p;
    df_deferred *d = NULL;
    TU_OK(df_pool_new(L, NULL, &p));
    TU_OK(df_pool_shutdown(p, DF_POOL_CANCEL));
    TU_ERR(df_pool_submit(p, work_value, NULL, &d), DF_ESHUTDOWN);
    ck_assert_ptr_null(d);
    ck_assert_uint_eq(df_loop_pending(L), 0);
    ck_assert_uint_ge(df_pool_threads(p), 1);
    df_pool_free(p);
}
END_TEST

/* What a work function tries on loop-thread objects from its pool thread. */
typedef struct from_worker {
    df_pool *p;
    df_deferred *d; /* a loop deferred */
    int rc_submit;
    int rc_shutdown;
    int rc_fire;
    int rc_cancel;
} from_worker;

static df_result work_misbehave(df_work *w, void *arg)
{
    from_worker *fw = arg;
    df_deferred *d = NULL;
    (void)w;
    fw->rc_submit = df_pool_submit(fw->p, work_value, NULL, &d);
    fw->rc_shutdown = df_pool_shutdown(fw->p, DF_POOL_DRAIN);
    fw->rc_fire = df_deferred_callback(fw->d, VAL, count_free);
    fw->rc_cancel = df_deferred_cancel(fw->d);
    df_pool_free(fw->p); /* ignored */
    return df_ok(d, NULL);
}

START_TEST(test_misuse_pool_calls_from_worker)
{
    from_worker fw = {NULL, new_d(), 0, 0, 0, 0};
    df_deferred *d;
    rec x = {0};
    TU_OK(df_pool_new(L, NULL, &fw.p));
    TU_OK(df_pool_submit(fw.p, work_misbehave, &fw, &d));
    watch(d, &x);
    TU_OK(df_loop_run_until(L, d));
    TU_ERR(fw.rc_submit, DF_EWRONG_THREAD);
    TU_ERR(fw.rc_shutdown, DF_EWRONG_THREAD);
    TU_ERR(fw.rc_fire, DF_EWRONG_THREAD);
    TU_ERR(fw.rc_cancel, DF_EWRONG_THREAD);
    ck_assert_ptr_null(x.value); /* no deferred was made there */
    ck_assert(!df_deferred_called(fw.d));
    ck_assert_int_eq(g_frees, 0);
    df_deferred_unref(d);
    /* The pool was neither shut down nor freed. */
    TU_OK(df_pool_submit(fw.p, work_value, VAL, &d));
    TU_OK(df_loop_run_until(L, d));
    df_deferred_unref(d);
    df_pool_free(fw.p);
    TU_OK(df_deferred_callback(fw.d, NULL, NULL));
    df_deferred_unref(fw.d);
}
END_TEST

typedef struct in_shutdown {
    df_pool *p;
    sem_t go;
    int code;
    int rc_submit;
    int rc_shutdown;
} in_shutdown;

/* The errback of a queued job that df_pool_shutdown(CANCEL) fails: it
 * runs inside the shutdown, before the workers are joined. */
static df_result during_shutdown(df_result r, void *arg)
{
    in_shutdown *is = arg;
    df_deferred *d = NULL;
    is->code = df_failure_code(r.failure);
    is->rc_submit = df_pool_submit(is->p, work_value, NULL, &d);
    is->rc_shutdown = df_pool_shutdown(is->p, DF_POOL_DRAIN);
    sem_post(&is->go); /* lets the running job finish */
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

START_TEST(test_misuse_pool_submit_during_shutdown)
{
    df_pool_options o = {1, 0};
    in_shutdown is;
    df_deferred *running, *queued;
    rec x = {0};
    memset(&is, 0, sizeof is);
    ck_assert_int_eq(sem_init(&is.go, 0, 0), 0);
    TU_OK(df_pool_new(L, &o, &is.p));
    TU_OK(df_pool_submit(is.p, work_wait, &is.go, &running));
    TU_OK(df_pool_submit(is.p, work_value, NULL, &queued));
    watch(running, &x);
    TU_OK(df_deferred_add_errback(queued, during_shutdown, &is));
    /* The single worker may not have taken `running` yet: the errback
     * lets it go either way. */
    TU_OK(df_pool_shutdown(is.p, DF_POOL_CANCEL));
    TU_ERR(is.rc_submit, DF_ESHUTDOWN);
    TU_OK(is.rc_shutdown); /* idempotent */
    ck_assert(df_deferred_called(running));
    ck_assert(df_deferred_called(queued));
    df_deferred_unref(running);
    df_deferred_unref(queued);
    df_pool_free(is.p);
    sem_destroy(&is.go);
}
END_TEST

START_TEST(test_misuse_pool_shutdown_bad_mode)
{
    df_pool *p;
    df_deferred *d;
    TU_OK(df_pool_new(L, NULL, &p));
    TU_ERR(df_pool_shutdown(p, 2), DF_EINVAL);
    TU_ERR(df_pool_shutdown(p, -1), DF_EINVAL);
    TU_ERR(df_pool_shutdown(NULL, DF_POOL_DRAIN), DF_EINVAL);
    /* Still open. */
    TU_OK(df_pool_submit(p, work_value, VAL, &d));
    TU_OK(df_loop_run_until(L, d));
    df_deferred_unref(d);
    df_pool_free(p);
}
END_TEST

START_TEST(test_misuse_pool_shutdown_twice)
{
    df_pool *p;
    TU_OK(df_pool_new(L, NULL, &p));
    TU_OK(df_pool_shutdown(p, DF_POOL_DRAIN));
    TU_OK(df_pool_shutdown(p, DF_POOL_CANCEL));
    TU_OK(df_pool_shutdown(p, DF_POOL_DRAIN));
    df_pool_free(p);
}
END_TEST

START_TEST(test_misuse_pool_free_null)
{
    df_pool_free(NULL);
    ck_assert(!df_work_cancelled(NULL));
    ck_assert_ptr_null(df_work_loop(NULL));
}
END_TEST

static int foreign_pool_free(void *arg)
{
    df_pool_free(arg); /* ignored */
    return 0;
}

START_TEST(test_misuse_pool_free_wrong_thread)
{
    df_pool *p;
    df_deferred *d;
    TU_OK(df_pool_new(L, NULL, &p));
    TU_OK(on_other_thread(foreign_pool_free, p));
    TU_OK(df_pool_submit(p, work_value, VAL, &d));
    TU_OK(df_loop_run_until(L, d));
    df_deferred_unref(d);
    df_pool_free(p);
}
END_TEST

static df_result work_return_wait(df_work *w, void *arg)
{
    (void)w;
    return df_wait(arg); /* misuse: work must not return df_wait */
}

START_TEST(test_misuse_pool_work_returns_wait)
{
    df_pool *p;
    df_deferred *d, *inner = new_d();
    rec x = {0};
    TU_OK(df_pool_new(L, NULL, &p));
    TU_OK(df_pool_submit(p, work_return_wait, df_deferred_ref(inner), &d));
    watch(d, &x);
    TU_OK(df_loop_run_until(L, d));
    ck_assert_int_eq(x.code, DF_EINVAL);
    df_deferred_unref(d);
    df_pool_free(p);
    /* The reference the work returned was dropped: ours is the last. */
    TU_OK(df_deferred_callback(inner, NULL, NULL));
    df_deferred_unref(inner);
}
END_TEST

typedef struct free_queued {
    sem_t go;
    int code;
} free_queued;

static df_result queued_cancelled(df_result r, void *arg)
{
    free_queued *fq = arg;
    fq->code = df_failure_code(r.failure);
    sem_post(&fq->go);
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

/* Freeing a pool with work queued cancels that work; the running job
 * finishes first (the pool waits for it). */
START_TEST(test_misuse_pool_free_with_queued_work)
{
    df_pool_options o = {1, 0};
    df_pool *p;
    free_queued fq = {.code = 0};
    df_deferred *running, *queued;
    rec x = {0};
    ck_assert_int_eq(sem_init(&fq.go, 0, 0), 0);
    TU_OK(df_pool_new(L, &o, &p));
    TU_OK(df_pool_submit(p, work_wait, &fq.go, &running));
    TU_OK(df_pool_submit(p, work_value, NULL, &queued));
    watch(running, &x);
    TU_OK(df_deferred_add_errback(queued, queued_cancelled, &fq));
    df_pool_free(p);
    ck_assert_int_eq(fq.code, DF_ECANCELLED);
    ck_assert(df_deferred_called(running));
    ck_assert_int_eq(x.ok + x.err, 1);
    ck_assert_uint_eq(df_loop_pending(L), 0);
    df_deferred_unref(running);
    df_deferred_unref(queued);
    sem_destroy(&fq.go);
}
END_TEST

/* --------------------------------------------------------------- map */

typedef struct counter {
    int next;
    int max;
    int fail_at; /* returns DF_EAGAIN there; -1: never */
} counter;

static int count_next(void *arg, void **item, df_free_fn *item_free)
{
    counter *c = arg;
    (void)item_free;
    if (c->next == c->fail_at)
        return DF_EAGAIN;
    if (c->next >= c->max)
        return 0;
    *item = (void *)(intptr_t)(++c->next);
    return 1;
}

static df_result map_call(void *item, void *arg)
{
    (void)arg;
    return df_ok(item, NULL);
}

typedef struct map_res {
    int n;
    int failed;
    int code;
} map_res;

static void map_on_result(uint64_t index, void *item, df_result r, void *arg)
{
    map_res *mr = arg;
    (void)index;
    (void)item;
    mr->n++;
    if (r.failure != NULL) {
        mr->failed++;
        mr->code = df_failure_code(r.failure);
    }
    df_result_clear(&r);
}

static df_map_options map_opts(counter *c, map_res *mr)
{
    df_map_options o;
    memset(&o, 0, sizeof o);
    o.limit = 2;
    o.next = count_next;
    o.next_arg = c;
    o.call = map_call;
    o.on_result = map_on_result;
    o.arg = mr;
    return o;
}

/* Runs a map that must finish at once and frees it; checks the count. */
static void map_ok(df_map_options *o, int want)
{
    df_map *m;
    df_deferred *done;
    map_res *mr = o->arg;
    int before = mr->n;
    TU_OK(df_map_start(L, o, &m, &done));
    TU_OK(df_loop_run_until(L, done));
    ck_assert_int_eq(mr->n - before, want);
    TU_OK(df_deferred_peek(done, NULL, NULL));
    df_deferred_unref(done);
    TU_OK(df_map_free(m));
}

START_TEST(test_misuse_map_start_null)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map *m = NULL;
    df_deferred *done = NULL;
    TU_ERR(df_map_start(NULL, &o, &m, &done), DF_EINVAL);
    TU_ERR(df_map_start(L, NULL, &m, &done), DF_EINVAL);
    TU_ERR(df_map_start(L, &o, NULL, &done), DF_EINVAL);
    TU_ERR(df_map_start(L, &o, &m, NULL), DF_EINVAL);
    ck_assert_ptr_null(m);
    ck_assert_ptr_null(done);
    ck_assert_int_eq(c.next, 0); /* next was never called */
    map_ok(&o, 3);
}
END_TEST

START_TEST(test_misuse_map_start_zero_limit)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map *m = NULL;
    df_deferred *done = NULL;
    o.limit = 0;
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL);
    ck_assert_int_eq(c.next, 0);
    o.limit = 1;
    map_ok(&o, 3);
}
END_TEST

START_TEST(test_misuse_map_start_null_next)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map *m = NULL;
    df_deferred *done = NULL;
    o.next = NULL;
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL);
    ck_assert_ptr_null(m);
}
END_TEST

START_TEST(test_misuse_map_start_bad_flags)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map *m = NULL;
    df_deferred *done = NULL;
    o.flags = 1u << 3; /* the first bit no DF_MAP_* flag uses */
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL);
    ck_assert_int_eq(c.next, 0);
    o.flags = DF_MAP_ORDERED | DF_MAP_STOP_ON_ERROR;
    map_ok(&o, 3);
}
END_TEST

/* Exactly one of (pool and work) or call. */
START_TEST(test_misuse_map_start_work_and_call)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map *m = NULL;
    df_deferred *done = NULL;
    df_pool *p;
    TU_OK(df_pool_new(L, NULL, &p));
    o.pool = p;
    o.work = map_work_value;
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL); /* and call */
    o.call = NULL;
    o.work = NULL;
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL); /* pool, no work */
    o.pool = NULL;
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL); /* nothing */
    o.work = map_work_value;
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL); /* work, no pool */
    ck_assert_int_eq(c.next, 0);
    o.pool = p;
    map_ok(&o, 3);
    df_pool_free(p);
}
END_TEST

START_TEST(test_misuse_map_start_window_max)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map *m = NULL;
    df_deferred *done = NULL;
    o.flags = DF_MAP_ORDERED;
    o.window = SIZE_MAX;
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL);
    ck_assert_int_eq(c.next, 0);
    o.window = 1;
    map_ok(&o, 3);
}
END_TEST

typedef struct map_args {
    df_loop *loop;
    df_map_options *o;
    df_map *m;
} map_args;

static int foreign_map_start(void *arg)
{
    map_args *a = arg;
    df_map *m = NULL;
    df_deferred *done = NULL;
    int rc = df_map_start(a->loop, a->o, &m, &done);
    return m == NULL && done == NULL ? rc : -1;
}

START_TEST(test_misuse_map_start_wrong_thread)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    map_args a = {L, &o, NULL};
    TU_ERR(on_other_thread(foreign_map_start, &a), DF_EWRONG_THREAD);
    ck_assert_int_eq(c.next, 0);
    map_ok(&o, 3);
}
END_TEST

START_TEST(test_misuse_map_start_pool_other_loop)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_loop *l2 = new_loop();
    df_pool *p;
    df_map *m = NULL;
    df_deferred *done = NULL;
    TU_OK(df_pool_new(l2, NULL, &p));
    o.call = NULL;
    o.pool = p;
    o.work = map_work_value;
    TU_ERR(df_map_start(L, &o, &m, &done), DF_EINVAL);
    ck_assert_int_eq(c.next, 0);
    df_pool_free(p);
    TU_OK(df_loop_free(l2));
}
END_TEST

/* A pool shut down under a map: the item it refuses fails, and the map
 * stops with that code instead of failing an endless input item by item. */
START_TEST(test_misuse_map_pool_shut_down)
{
    counter c = {0, 1000000, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_pool *p;
    df_map *m;
    df_deferred *done;
    rec x = {0};
    TU_OK(df_pool_new(L, NULL, &p));
    TU_OK(df_pool_shutdown(p, DF_POOL_DRAIN));
    o.call = NULL;
    o.pool = p;
    o.work = map_work_value;
    TU_OK(df_map_start(L, &o, &m, &done));
    watch(done, &x);
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(x.err, 1);
    ck_assert_int_eq(x.code, DF_ESHUTDOWN);
    ck_assert_int_eq(c.next, 1);
    ck_assert_int_eq(mr.n, 1);
    ck_assert_int_eq(mr.code, DF_ESHUTDOWN);
    df_deferred_unref(done);
    TU_OK(df_map_free(m));
    df_pool_free(p);
}
END_TEST

static df_result map_call_wait(void *item, void *arg)
{
    (void)item;
    return df_wait(df_deferred_ref(arg));
}

START_TEST(test_misuse_map_free_before_done)
{
    counter c = {0, 1, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_deferred *gate = new_d(), *done;
    df_map *m;
    o.call = map_call_wait;
    o.arg = gate;
    o.on_result = NULL;
    TU_OK(df_map_start(L, &o, &m, &done));
    TU_ERR(df_map_free(m), DF_EBUSY);
    ck_assert(!df_deferred_called(done));
    TU_OK(df_deferred_callback(gate, NULL, NULL));
    ck_assert(df_deferred_called(done));
    TU_OK(df_map_free(m));
    df_deferred_unref(done);
    df_deferred_unref(gate);
}
END_TEST

START_TEST(test_misuse_map_calls_after_done)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map_stats st;
    df_map *m;
    df_deferred *done;
    void *v = NULL;
    TU_OK(df_map_start(L, &o, &m, &done));
    ck_assert(df_deferred_called(done));
    TU_OK(df_map_cancel(m)); /* no-op: too late */
    TU_OK(df_map_cancel(m));
    TU_OK(df_map_get_stats(m, &st));
    ck_assert_uint_eq(st.pulled, 3);
    ck_assert_uint_eq(st.done, 3);
    ck_assert_uint_eq(st.cancelled, 0);
    TU_OK(df_deferred_peek(done, &v, NULL)); /* still a success */
    ck_assert_uint_eq(((df_map_stats *)v)->done, 3);
    ck_assert_int_eq(c.next, 3);
    TU_OK(df_map_free(m));
    df_deferred_unref(done);
}
END_TEST

START_TEST(test_misuse_map_null)
{
    counter c = {0, 3, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map_stats st;
    df_map *m;
    df_deferred *done;
    TU_ERR(df_map_cancel(NULL), DF_EINVAL);
    TU_ERR(df_map_get_stats(NULL, &st), DF_EINVAL);
    TU_ERR(df_map_free(NULL), DF_EINVAL);
    TU_OK(df_map_start(L, &o, &m, &done));
    TU_ERR(df_map_get_stats(m, NULL), DF_EINVAL);
    TU_OK(df_map_get_stats(m, &st));
    TU_OK(df_map_free(m));
    df_deferred_unref(done);
}
END_TEST

static int foreign_map_calls(void *arg)
{
    map_args *a = arg;
    df_map_stats st;
    int bad = 0;
    bad += df_map_cancel(a->m) != DF_EWRONG_THREAD;
    bad += df_map_get_stats(a->m, &st) != DF_EWRONG_THREAD;
    bad += df_map_free(a->m) != DF_EWRONG_THREAD;
    return bad;
}

START_TEST(test_misuse_map_wrong_thread)
{
    counter c = {0, 2, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_deferred *gate = new_d(), *done;
    map_args a = {L, &o, NULL};
    rec x = {0};
    o.call = map_call_wait;
    o.arg = gate;
    o.on_result = NULL;
    TU_OK(df_map_start(L, &o, &a.m, &done));
    ck_assert_int_eq(on_other_thread(foreign_map_calls, &a), 0);
    /* Not cancelled, not freed: it finishes normally. */
    watch(done, &x);
    TU_OK(df_deferred_callback(gate, NULL, NULL));
    ck_assert_int_eq(x.ok, 1);
    TU_OK(df_map_free(a.m));
    df_deferred_unref(done);
    df_deferred_unref(gate);
}
END_TEST

START_TEST(test_misuse_map_next_fails)
{
    counter c = {0, 10, 2};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_map *m;
    df_deferred *done;
    rec x = {0};
    TU_OK(df_map_start(L, &o, &m, &done));
    watch(done, &x);
    ck_assert_int_eq(x.code, DF_EAGAIN);
    ck_assert_int_eq(mr.n, 2); /* the items pulled before still came */
    ck_assert_int_eq(mr.failed, 0);
    TU_OK(df_map_free(m));
    df_deferred_unref(done);
}
END_TEST

static df_result map_call_other_loop(void *item, void *arg)
{
    df_deferred *d = NULL;
    (void)item;
    TU_OK(df_deferred_new(arg, &d));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    return df_wait(d);
}

START_TEST(test_misuse_map_call_returns_other_loop)
{
    counter c = {0, 2, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_loop *l2 = new_loop();
    df_map_stats st;
    df_map *m;
    df_deferred *done;
    rec x = {0};
    o.call = map_call_other_loop;
    o.next_arg = &c;
    o.arg = l2;
    o.on_result = NULL;
    TU_OK(df_map_start(L, &o, &m, &done));
    watch(done, &x);
    ck_assert_int_eq(x.ok, 1); /* failed items do not stop this map */
    TU_OK(df_map_get_stats(m, &st));
    ck_assert_uint_eq(st.done, 2);
    ck_assert_uint_eq(st.failed, 2);
    TU_OK(df_map_free(m));
    df_deferred_unref(done);
    TU_OK(df_loop_free(l2));
}
END_TEST

START_TEST(test_misuse_map_cancel_twice)
{
    counter c = {0, 5, -1};
    map_res mr = {0, 0, 0};
    df_map_options o = map_opts(&c, &mr);
    df_deferred *gate = new_d(), *done;
    df_map *m;
    rec x = {0};
    o.call = map_call_wait;
    o.arg = gate;
    o.on_result = NULL;
    TU_OK(df_map_start(L, &o, &m, &done));
    watch(done, &x);
    TU_OK(df_map_cancel(m));
    TU_OK(df_map_cancel(m));
    TU_OK(df_deferred_cancel(done));
    ck_assert_int_eq(x.err, 1);
    ck_assert_int_eq(x.code, DF_ECANCELLED);
    ck_assert_int_eq(c.next, 2); /* nothing pulled after the cancel */
    TU_OK(df_map_free(m));
    df_deferred_unref(done);
    df_deferred_unref(gate);
}
END_TEST

/* ------------------------------------------------------------- suite */

static TCase *new_tcase(Suite *s, const char *name)
{
    TCase *tc = tcase_create(name);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    return tc;
}

static Suite *misuse_suite(void)
{
    Suite *s = suite_create("misuse");
    TCase *tc;

    tc = new_tcase(s, "loop");
    tcase_add_test(tc, test_misuse_loop_new_null_out);
    tcase_add_test(tc, test_misuse_loop_new_partial_allocator);
    tcase_add_test(tc, test_misuse_loop_free_null);
    tcase_add_test(tc, test_misuse_loop_free_wrong_thread);
    tcase_add_test(tc, test_misuse_loop_free_with_pool);
    tcase_add_test(tc, test_misuse_loop_free_with_work_in_flight);
    tcase_add_test(tc, test_misuse_loop_free_with_timer);
    tcase_add_test(tc, test_misuse_loop_free_with_live_deferred);
    tcase_add_test(tc, test_misuse_loop_free_with_live_sem);
    tcase_add_test(tc, test_misuse_loop_free_with_live_queue);
    tcase_add_test(tc, test_misuse_loop_free_with_pending_call);
    tcase_add_test(tc, test_misuse_loop_free_from_callback);
    tcase_add_test(tc, test_misuse_loop_run_null);
    tcase_add_test(tc, test_misuse_loop_run_wrong_thread);
    tcase_add_test(tc, test_misuse_loop_run_reentrant);
    tcase_add_test(tc, test_misuse_loop_run_until_reentrant);
    tcase_add_test(tc, test_misuse_loop_dispatch_reentrant);
    tcase_add_test(tc, test_misuse_loop_run_until_null);
    tcase_add_test(tc, test_misuse_loop_run_until_other_loop);
    tcase_add_test(tc, test_misuse_loop_run_until_wrong_thread);
    tcase_add_test(tc, test_misuse_loop_stop_null);
    tcase_add_test(tc, test_misuse_loop_stop_wrong_thread);
    tcase_add_test(tc, test_misuse_loop_dispatch_null);
    tcase_add_test(tc, test_misuse_loop_dispatch_wrong_thread);
    tcase_add_test(tc, test_misuse_loop_fd_null);
    tcase_add_test(tc, test_misuse_loop_timeout_null);
    tcase_add_test(tc, test_misuse_loop_timeout_wrong_thread);
    tcase_add_test(tc, test_misuse_loop_pending_null);
    tcase_add_test(tc, test_misuse_loop_pending_wrong_thread);
    tcase_add_test(tc, test_misuse_loop_set_unhandled_null);
    tcase_add_test(tc, test_misuse_loop_set_unhandled_wrong_thread);
    tcase_add_test(tc, test_misuse_loop_unhandled_count_null);
    tcase_add_test(tc, test_misuse_loop_call_from_thread_null);

    tc = new_tcase(s, "deferred");
    tcase_add_test(tc, test_misuse_deferred_new_null);
    tcase_add_test(tc, test_misuse_deferred_new_wrong_thread);
    tcase_add_test(tc, test_misuse_deferred_new_cancellable_null_fn);
    tcase_add_test(tc, test_misuse_deferred_succeed_null);
    tcase_add_test(tc, test_misuse_deferred_fail_null);
    tcase_add_test(tc, test_misuse_deferred_maybe_null);
    tcase_add_test(tc, test_misuse_deferred_maybe_wrong_thread);
    tcase_add_test(tc, test_misuse_deferred_callback_null);
    tcase_add_test(tc, test_misuse_deferred_errback_null_failure);
    tcase_add_test(tc, test_misuse_deferred_double_callback);
    tcase_add_test(tc, test_misuse_deferred_double_errback);
    tcase_add_test(tc, test_misuse_deferred_fire_from_own_callback);
    tcase_add_test(tc, test_misuse_deferred_resolve_wait);
    tcase_add_test(tc, test_misuse_deferred_fire_wrong_thread);
    tcase_add_test(tc, test_misuse_deferred_add_callbacks_null);
    tcase_add_test(tc, test_misuse_deferred_add_callbacks_wrong_thread);
    tcase_add_test(tc, test_misuse_deferred_add_while_running);
    tcase_add_test(tc, test_misuse_deferred_chain_self);
    tcase_add_test(tc, test_misuse_deferred_chain_null);
    tcase_add_test(tc, test_misuse_deferred_chain_other_loop);
    tcase_add_test(tc, test_misuse_deferred_chain_fired_target);
    tcase_add_test(tc, test_misuse_deferred_pause_null);
    tcase_add_test(tc, test_misuse_deferred_unpause_not_paused);
    tcase_add_test(tc, test_misuse_deferred_unpause_waiting);
    tcase_add_test(tc, test_misuse_deferred_cancel_null);
    tcase_add_test(tc, test_misuse_deferred_cancel_fired);
    tcase_add_test(tc, test_misuse_deferred_cancel_reentrant);
    tcase_add_test(tc, test_misuse_deferred_cancel_wrong_thread);
    tcase_add_test(tc, test_misuse_deferred_peek_unfired);
    tcase_add_test(tc, test_misuse_deferred_peek_wrong_thread);
    tcase_add_test(tc, test_misuse_deferred_ref_null);
    tcase_add_test(tc, test_misuse_deferred_unref_wrong_thread);
    tcase_add_test(tc, test_misuse_deferred_callback_returns_self);
    tcase_add_test(tc, test_misuse_deferred_callback_returns_other_loop);

    tc = new_tcase(s, "failure");
    tcase_add_test(tc, test_misuse_failure_new_code_zero);
    tcase_add_test(tc, test_misuse_failure_new_null_fmt);
    tcase_add_test(tc, test_misuse_failure_accessors_null);
    tcase_add_test(tc, test_misuse_failure_ref_null);
    tcase_add_test(tc, test_misuse_failure_payload_null_free);
    tcase_add_test(tc, test_misuse_failure_nomem_shared);
    tcase_add_test(tc, test_misuse_failure_other_thread);
    tcase_add_test(tc, test_misuse_failure_strerror_bad_code);

    tc = new_tcase(s, "list");
    tcase_add_test(tc, test_misuse_list_new_null);
    tcase_add_test(tc, test_misuse_list_new_null_member);
    tcase_add_test(tc, test_misuse_list_new_other_loop_member);
    tcase_add_test(tc, test_misuse_list_new_bad_flags);
    tcase_add_test(tc, test_misuse_list_gather_bad_flags);
    tcase_add_test(tc, test_misuse_list_new_oversized_count);
    tcase_add_test(tc, test_misuse_list_new_zero_count);
    tcase_add_test(tc, test_misuse_list_new_wrong_thread);
    tcase_add_test(tc, test_misuse_list_duplicate_member);
    tcase_add_test(tc, test_misuse_list_result_null);
    tcase_add_test(tc, test_misuse_list_result_out_of_range);

    tc = new_tcase(s, "sem");
    tcase_add_test(tc, test_misuse_sem_new_zero_tokens);
    tcase_add_test(tc, test_misuse_sem_new_null);
    tcase_add_test(tc, test_misuse_sem_new_wrong_thread);
    tcase_add_test(tc, test_misuse_sem_overrelease);
    tcase_add_test(tc, test_misuse_sem_free_held);
    tcase_add_test(tc, test_misuse_sem_free_waiting);
    tcase_add_test(tc, test_misuse_sem_free_null);
    tcase_add_test(tc, test_misuse_sem_use_after_free_in_callback);
    tcase_add_test(tc, test_misuse_sem_acquire_null);
    tcase_add_test(tc, test_misuse_sem_run_null);
    tcase_add_test(tc, test_misuse_sem_wrong_thread);
    tcase_add_test(tc, test_misuse_sem_acquire_fired_by_hand);
    tcase_add_test(tc, test_misuse_sem_run_in_pool_null);
    tcase_add_test(tc, test_misuse_sem_run_in_pool_other_loop);
    tcase_add_test(tc, test_misuse_sem_run_in_pool_after_shutdown);

    tc = new_tcase(s, "lock");
    tcase_add_test(tc, test_misuse_lock_new_null);
    tcase_add_test(tc, test_misuse_lock_new_wrong_thread);
    tcase_add_test(tc, test_misuse_lock_release_unlocked);
    tcase_add_test(tc, test_misuse_lock_free_locked);
    tcase_add_test(tc, test_misuse_lock_null);
    tcase_add_test(tc, test_misuse_lock_run_null_fn);
    tcase_add_test(tc, test_misuse_lock_wrong_thread);

    tc = new_tcase(s, "queue");
    tcase_add_test(tc, test_misuse_queue_new_null);
    tcase_add_test(tc, test_misuse_queue_new_wrong_thread);
    tcase_add_test(tc, test_misuse_queue_new_zero_size_and_backlog);
    tcase_add_test(tc, test_misuse_queue_zero_size);
    tcase_add_test(tc, test_misuse_queue_put_overflow);
    tcase_add_test(tc, test_misuse_queue_get_underflow);
    tcase_add_test(tc, test_misuse_queue_null);
    tcase_add_test(tc, test_misuse_queue_wrong_thread);
    tcase_add_test(tc, test_misuse_queue_use_after_free_in_callback);
    tcase_add_test(tc, test_misuse_queue_get_fired_by_hand);

    tc = new_tcase(s, "pool");
    tcase_add_test(tc, test_misuse_pool_new_null);
    tcase_add_test(tc, test_misuse_pool_new_zero_threads);
    tcase_add_test(tc, test_misuse_pool_new_tiny_stack);
    tcase_add_test(tc, test_misuse_pool_new_wrong_thread);
    tcase_add_test(tc, test_misuse_pool_submit_null);
    tcase_add_test(tc, test_misuse_pool_submit_after_shutdown);
    tcase_add_test(tc, test_misuse_pool_calls_from_worker);
    tcase_add_test(tc, test_misuse_pool_submit_during_shutdown);
    tcase_add_test(tc, test_misuse_pool_shutdown_bad_mode);
    tcase_add_test(tc, test_misuse_pool_shutdown_twice);
    tcase_add_test(tc, test_misuse_pool_free_null);
    tcase_add_test(tc, test_misuse_pool_free_wrong_thread);
    tcase_add_test(tc, test_misuse_pool_work_returns_wait);
    tcase_add_test(tc, test_misuse_pool_free_with_queued_work);

    tc = new_tcase(s, "map");
    tcase_add_test(tc, test_misuse_map_start_null);
    tcase_add_test(tc, test_misuse_map_start_zero_limit);
    tcase_add_test(tc, test_misuse_map_start_null_next);
    tcase_add_test(tc, test_misuse_map_start_bad_flags);
    tcase_add_test(tc, test_misuse_map_start_work_and_call);
    tcase_add_test(tc, test_misuse_map_start_window_max);
    tcase_add_test(tc, test_misuse_map_start_wrong_thread);
    tcase_add_test(tc, test_misuse_map_start_pool_other_loop);
    tcase_add_test(tc, test_misuse_map_pool_shut_down);
    tcase_add_test(tc, test_misuse_map_free_before_done);
    tcase_add_test(tc, test_misuse_map_calls_after_done);
    tcase_add_test(tc, test_misuse_map_null);
    tcase_add_test(tc, test_misuse_map_wrong_thread);
    tcase_add_test(tc, test_misuse_map_next_fails);
    tcase_add_test(tc, test_misuse_map_call_returns_other_loop);
    tcase_add_test(tc, test_misuse_map_cancel_twice);

    tc = new_tcase(s, "timers");
    tcase_add_test(tc, test_misuse_timers_call_later_null_loop);
    tcase_add_test(tc, test_misuse_timers_call_later_null_fn);
    tcase_add_test(tc, test_misuse_timers_call_later_wrong_thread);
    tcase_add_test(tc, test_misuse_timers_call_later_huge_delay);
    tcase_add_test(tc, test_misuse_timers_cancel_null);
    tcase_add_test(tc, test_misuse_timers_cancel_wrong_thread);
    tcase_add_test(tc, test_misuse_timers_set_timeout_null);
    tcase_add_test(tc, test_misuse_timers_set_timeout_twice);
    tcase_add_test(tc, test_misuse_timers_set_timeout_wrong_thread);

    return s;
}

TU_MAIN(misuse_suite)
