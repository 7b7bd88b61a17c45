/* SPDX-License-Identifier: MIT */
/* Check tests for semaphores and locks (DeferredSemaphore, DeferredLock). */
#include <check.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "deferred.h"
#include "testutil.h"

/* ------------------------------------------------------------ fixture */

/* An allocator that counts live blocks, so that every test can check that
 * it freed everything, and that fails on demand (testutil.h); setup()
 * resets it. */
static tu_failing_alloc g_fa;
static df_allocator g_alloc;

/* Lets `n` more allocations succeed, then fails them (-1: never fails). */
static void fail_after(long n)
{
    tu_fa_fail_after(&g_fa, n);
}

static int g_unhandled;

static void count_unhandled(df_failure *f, void *arg)
{
    (void)f;
    (void)arg;
    g_unhandled++;
}

static df_loop *L;

/* State the helpers below record; setup() resets it. */
static int g_counter;
static int g_log[64];
static int g_nlog;
static int g_fn_calls;
static int g_destroyed;
static int g_cancelled;
static void *g_result;

static void setup(void)
{
    df_loop_options opts = DF_LOOP_OPTIONS_INIT;

    tu_fa_init(&g_fa, false);
    g_alloc = tu_fa_allocator(&g_fa);
    g_unhandled = 0;
    g_counter = 0;
    g_nlog = 0;
    g_fn_calls = 0;
    g_destroyed = 0;
    g_cancelled = 0;
    g_result = NULL;
    opts.allocator = &g_alloc;
    opts.unhandled = count_unhandled;
    TU_OK(df_loop_new(&opts, &L));
}

static void teardown(void)
{
    fail_after(-1);
    TU_OK(df_loop_free(L));
    L = NULL;
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_int_eq(atomic_load(&g_fa.live), 0);
}

/* ------------------------------------------------------------ helpers */

/* Records what reaches a callback/errback pair. */
typedef struct rec {
    int calls;
    int oks;
    int errs;
    int code;        /* code of the last failure */
    void *value;     /* last success value       */
} rec;

static df_result rec_both(df_result r, void *arg)
{
    rec *c = arg;
    c->calls++;
    if (r.failure != NULL) {
        c->errs++;
        c->code = df_failure_code(r.failure);
    } else {
        c->oks++;
        c->value = r.value;
    }
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

/* Twisted's _incr: counts the successes that reach it. */
static df_result incr(df_result r, void *arg)
{
    (void)arg;
    g_counter++;
    return r;
}

/* Appends its id to g_log: checks the order in which things happen. */
static df_result log_cb(df_result r, void *arg)
{
    ck_assert_int_lt(g_nlog, 64);
    g_log[g_nlog++] = (int)(intptr_t)arg;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

static df_result release_cb(df_result r, void *arg)
{
    TU_OK(df_sem_release(arg));
    return r;
}

static df_result lock_release_cb(df_result r, void *arg)
{
    TU_OK(df_lock_release(arg));
    return r;
}

/* A run function returning a new reference to the deferred in `arg`. */
static df_result return_deferred(void *arg)
{
    return df_wait(df_deferred_ref(arg));
}

/* A run function returning its argument as a success value. */
static df_result return_value(void *arg)
{
    g_fn_calls++;
    return df_ok(arg, NULL);
}

/* A run function that fails with code 1234. */
static df_result return_failure(void *arg)
{
    (void)arg;
    g_fn_calls++;
    return df_errf(L, 1234, "some specific exception");
}

/* Values whose destructor counts how often it ran. */
static void destroy_counted(void *value)
{
    (void)value;
    g_destroyed++;
}

static bool fired_ok(df_deferred *d)
{
    df_failure *f = NULL;
    return df_deferred_peek(d, NULL, &f) == 0 && f == NULL;
}

static int failure_code(df_deferred *d)
{
    df_failure *f = NULL;
    if (df_deferred_peek(d, NULL, &f) != 0 || f == NULL)
        return 0;
    return df_failure_code(f);
}

/* ------------------------------------------------------------ create */

/* Twisted: OtherPrimitivesTests.test_semaphoreInvalidTokens */
START_TEST(test_sem_invalid_tokens)
{
    df_sem *s = (df_sem *)&s;

    TU_ERR(df_sem_new(L, 0, &s), DF_EINVAL);
    ck_assert_ptr_eq(s, (df_sem *)&s); /* nothing created */
    TU_ERR(df_sem_new(NULL, 1, &s), DF_EINVAL);
    TU_ERR(df_sem_new(L, 1, NULL), DF_EINVAL);
}
END_TEST

START_TEST(test_sem_new_counts)
{
    df_sem *s;

    TU_OK(df_sem_new(L, 3, &s));
    ck_assert_uint_eq(df_sem_limit(s), 3);
    ck_assert_uint_eq(df_sem_tokens(s), 3);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    TU_OK(df_sem_free(s));
}
END_TEST

START_TEST(test_sem_null_args)
{
    df_sem *s;
    df_deferred *d;

    TU_OK(df_sem_new(L, 1, &s));
    TU_ERR(df_sem_acquire(NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_acquire(s, NULL), DF_EINVAL);
    TU_ERR(df_sem_release(NULL), DF_EINVAL);
    TU_ERR(df_sem_run(NULL, return_value, NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_run(s, NULL, NULL, &d), DF_EINVAL);
    TU_ERR(df_sem_run(s, return_value, NULL, NULL), DF_EINVAL);
    TU_ERR(df_sem_free(NULL), DF_EINVAL);
    ck_assert_uint_eq(df_sem_tokens(NULL), 0);
    ck_assert_uint_eq(df_sem_limit(NULL), 0);
    ck_assert_uint_eq(df_sem_waiting(NULL), 0);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    ck_assert_int_eq(g_fn_calls, 0);
    TU_OK(df_sem_free(s));
}
END_TEST

typedef struct other_thread {
    df_loop *loop;
    df_sem *sem;
    int rc_new, rc_acquire, rc_release, rc_run, rc_free;
} other_thread;

static void *other_thread_body(void *arg)
{
    other_thread *t = arg;
    df_sem *s2 = NULL;
    df_deferred *d = NULL;

    t->rc_new = df_sem_new(t->loop, 1, &s2);
    t->rc_acquire = df_sem_acquire(t->sem, &d);
    t->rc_release = df_sem_release(t->sem);
    t->rc_run = df_sem_run(t->sem, return_value, NULL, &d);
    t->rc_free = df_sem_free(t->sem);
    return NULL;
}

START_TEST(test_sem_wrong_thread)
{
    other_thread t = {.loop = L};
    df_deferred *held;
    pthread_t th;

    TU_OK(df_sem_new(L, 2, &t.sem));
    TU_OK(df_sem_acquire(t.sem, &held));
    ck_assert_int_eq(pthread_create(&th, NULL, other_thread_body, &t), 0);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    TU_ERR(t.rc_new, DF_EWRONG_THREAD);
    TU_ERR(t.rc_acquire, DF_EWRONG_THREAD);
    TU_ERR(t.rc_release, DF_EWRONG_THREAD);
    TU_ERR(t.rc_run, DF_EWRONG_THREAD);
    TU_ERR(t.rc_free, DF_EWRONG_THREAD);
    /* Nothing changed. */
    ck_assert_uint_eq(df_sem_tokens(t.sem), 1);
    ck_assert_uint_eq(df_sem_waiting(t.sem), 0);
    ck_assert_int_eq(g_fn_calls, 0);
    TU_OK(df_sem_release(t.sem));
    TU_OK(df_sem_free(t.sem));
    df_deferred_unref(held);
}
END_TEST

/* ------------------------------------------------------------ acquire */

static df_result store_result(df_result r, void *arg)
{
    (void)arg;
    g_result = r.value;
    return r;
}

static int g_helper_calls;
static void *g_helper_arg;

static df_result semaphore_helper(void *arg)
{
    g_helper_calls++;
    g_helper_arg = ((void **)arg)[0];
    return df_wait(df_deferred_ref(((void **)arg)[1]));
}

static df_result append_success(df_result r, void *arg)
{
    int *success = arg;
    ck_assert(r.failure == NULL);
    success[0]++;
    return r;
}

static df_result append_failure(df_result r, void *arg)
{
    int *success = arg;
    ck_assert(r.failure != NULL);
    ck_assert_int_eq(df_failure_code(r.failure), DF_ECANCELLED);
    success[1]++;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

/* Twisted: OtherPrimitivesTests.test_semaphore */
START_TEST(test_sem_semaphore)
{
    enum { N = 13 };
    df_sem *s;
    df_deferred *control, *result, *d, *held[N + 1];
    int unique;
    void *helper_args[2];
    rec results = {0};

    TU_OK(df_sem_new(L, N, &s));
    TU_OK(df_deferred_new(L, &control));
    helper_args[0] = &unique;
    helper_args[1] = control;
    TU_OK(df_sem_run(s, semaphore_helper, helper_args, &result));
    TU_OK(df_deferred_add_callback(result, store_result, NULL));
    TU_OK(df_deferred_add_callback(result, incr, NULL));
    TU_OK(df_deferred_add_both(result, rec_both, &results));
    ck_assert_int_eq(results.calls, 0);
    ck_assert_ptr_eq(g_helper_arg, &unique);
    TU_OK(df_deferred_callback(control, NULL, NULL));
    ck_assert_int_eq(results.oks, 1);
    ck_assert_ptr_null(results.value);
    ck_assert_int_eq(g_counter, 1);
    df_deferred_unref(control);
    df_deferred_unref(result);

    g_counter = 0;
    for (int i = 1; i <= N; i++) {
        TU_OK(df_sem_acquire(s, &held[i - 1]));
        TU_OK(df_deferred_add_callback(held[i - 1], incr, NULL));
        ck_assert_int_eq(g_counter, i);
    }

    /* success[0]: callback ran (Twisted "fail"); [1]: errback ran. */
    int success[2] = {0, 0};
    TU_OK(df_sem_acquire(s, &d));
    TU_OK(df_deferred_add_callbacks(d, append_success, append_failure,
                                    success));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(success[0], 0);
    ck_assert_int_eq(success[1], 1);
    df_deferred_unref(d);

    TU_OK(df_sem_acquire(s, &held[N]));
    TU_OK(df_deferred_add_callback(held[N], incr, NULL));
    ck_assert_int_eq(g_counter, N);

    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_counter, N + 1);

    for (int i = 1; i <= N; i++) {
        TU_OK(df_sem_release(s));
        ck_assert_int_eq(g_counter, N + 1);
    }
    ck_assert_uint_eq(df_sem_tokens(s), N);
    TU_OK(df_sem_free(s));
    for (int i = 0; i <= N; i++)
        df_deferred_unref(held[i]);
}
END_TEST

START_TEST(test_sem_acquire_fires_at_once)
{
    df_sem *s;
    df_deferred *d;
    void *value = &value;

    TU_OK(df_sem_new(L, 2, &s));
    TU_OK(df_sem_acquire(s, &d));
    ck_assert(df_deferred_called(d));
    TU_OK(df_deferred_peek(d, &value, NULL));
    ck_assert_ptr_null(value);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_sem_fifo_order)
{
    df_sem *s;
    df_deferred *held, *d[5];

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    for (int i = 0; i < 5; i++) {
        TU_OK(df_sem_acquire(s, &d[i]));
        TU_OK(df_deferred_add_both(d[i], log_cb, (void *)(intptr_t)i));
    }
    ck_assert_uint_eq(df_sem_waiting(s), 5);
    for (int i = 0; i < 5; i++) {
        TU_OK(df_sem_release(s));
        /* The token went straight to the next waiter: none is free. */
        ck_assert_uint_eq(df_sem_tokens(s), 0);
        ck_assert_int_eq(g_nlog, i + 1);
        ck_assert_int_eq(g_log[i], i);
    }
    TU_OK(df_sem_release(s));
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    for (int i = 0; i < 5; i++)
        df_deferred_unref(d[i]);
}
END_TEST

/* An acquire made while tokens are being handed out queues behind the
 * waiters already in line, even though the callback that makes it has
 * just released a token. */
typedef struct fifo_dispatch {
    df_sem *s;
    df_deferred *late;
} fifo_dispatch;

static df_result release_then_acquire(df_result r, void *arg)
{
    fifo_dispatch *f = arg;
    g_log[g_nlog++] = 0;
    TU_OK(df_sem_release(f->s));
    TU_OK(df_sem_acquire(f->s, &f->late));
    TU_OK(df_deferred_add_both(f->late, log_cb, (void *)(intptr_t)9));
    return r;
}

START_TEST(test_sem_fifo_during_dispatch)
{
    fifo_dispatch f = {0};
    df_deferred *held, *d[3];

    TU_OK(df_sem_new(L, 1, &f.s));
    TU_OK(df_sem_acquire(f.s, &held));
    TU_OK(df_sem_acquire(f.s, &d[0]));
    TU_OK(df_deferred_add_callback(d[0], release_then_acquire, &f));
    for (int i = 1; i < 3; i++) {
        TU_OK(df_sem_acquire(f.s, &d[i]));
        TU_OK(df_deferred_add_both(d[i], log_cb, (void *)(intptr_t)i));
    }
    /* Hands the token to d[0], whose callback releases it (to d[1]) and
     * queues a new acquire behind d[2]. */
    TU_OK(df_sem_release(f.s));
    ck_assert_int_eq(g_nlog, 2);
    ck_assert_int_eq(g_log[0], 0);
    ck_assert_int_eq(g_log[1], 1);
    ck_assert(!df_deferred_called(f.late));
    ck_assert_uint_eq(df_sem_waiting(f.s), 2);
    TU_OK(df_sem_release(f.s));
    ck_assert_int_eq(g_log[2], 2);
    ck_assert(!df_deferred_called(f.late));
    TU_OK(df_sem_release(f.s));
    ck_assert_int_eq(g_nlog, 4);
    ck_assert_int_eq(g_log[3], 9);
    TU_OK(df_sem_release(f.s));
    TU_OK(df_sem_free(f.s));
    df_deferred_unref(held);
    df_deferred_unref(f.late);
    for (int i = 0; i < 3; i++)
        df_deferred_unref(d[i]);
}
END_TEST

START_TEST(test_sem_over_release)
{
    df_sem *s;
    df_deferred *d;

    TU_OK(df_sem_new(L, 2, &s));
    TU_ERR(df_sem_release(s), DF_EOVERRELEASE);
    ck_assert_uint_eq(df_sem_tokens(s), 2);
    TU_OK(df_sem_acquire(s, &d));
    TU_OK(df_sem_release(s));
    TU_ERR(df_sem_release(s), DF_EOVERRELEASE);
    ck_assert_uint_eq(df_sem_tokens(s), 2);
    TU_OK(df_sem_free(s));
    df_deferred_unref(d);
}
END_TEST

/* A pseudo-random walk of acquires, releases and cancels: the count of
 * free tokens never exceeds the limit, and a free token never coexists
 * with a waiter. */
START_TEST(test_sem_tokens_never_exceed_limit)
{
    enum { LIMIT = 3, STEPS = 2000, MAXQ = 64 };
    df_sem *s;
    df_deferred *q[MAXQ];
    size_t nq = 0;
    unsigned released = 0, seed = 12345;
    rec r = {0};

    TU_OK(df_sem_new(L, LIMIT, &s));
    for (int step = 0; step < STEPS; step++) {
        seed = seed * 1103515245u + 12345u;
        unsigned op = (seed >> 16) % 3;
        if (op == 0 && nq < MAXQ) {
            TU_OK(df_sem_acquire(s, &q[nq]));
            TU_OK(df_deferred_add_both(q[nq], rec_both, &r));
            nq++;
        } else if (op == 1) {
            int rc = df_sem_release(s);
            if ((unsigned)r.oks == released) {
                TU_ERR(rc, DF_EOVERRELEASE);
            } else {
                TU_OK(rc);
                released++;
            }
        } else if (nq > 0) {
            size_t i = (seed >> 8) % nq;
            TU_OK(df_deferred_cancel(q[i]));
            df_deferred_unref(q[i]);
            q[i] = q[--nq];
        }
        /* Acquired so far minus released is in use. */
        unsigned in_use = (unsigned)r.oks - released;
        ck_assert_uint_le(df_sem_tokens(s), LIMIT);
        ck_assert_uint_eq(df_sem_tokens(s) + in_use, LIMIT);
        if (df_sem_tokens(s) > 0)
            ck_assert_uint_eq(df_sem_waiting(s), 0);
    }
    for (size_t i = 0; i < nq; i++) {
        df_deferred_cancel(q[i]);
        df_deferred_unref(q[i]);
    }
    while (df_sem_tokens(s) < LIMIT)
        TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
}
END_TEST

/* Twisted: DeferredTests... test_asyncWithSemaphore (the acquire/release
 * pairs of `async with`, written out). */
START_TEST(test_sem_async_with)
{
    df_sem *s;
    df_deferred *outer, *inner, *d1, *d2;

    TU_OK(df_sem_new(L, 3, &s));
    TU_OK(df_sem_acquire(s, &outer));
    ck_assert_uint_eq(df_sem_tokens(s), 2);
    TU_OK(df_sem_acquire(s, &inner));
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_acquire(s, &d1));
    TU_OK(df_sem_acquire(s, &d2));
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    ck_assert(df_deferred_called(d1));
    ck_assert(!df_deferred_called(d2));
    TU_OK(df_sem_release(s)); /* leaves the inner `async with` */
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    ck_assert(df_deferred_called(d2));
    TU_OK(df_deferred_add_callback(d1, release_cb, s));
    TU_OK(df_deferred_add_callback(d2, release_cb, s));
    ck_assert_uint_eq(df_sem_tokens(s), 2);
    TU_OK(df_sem_release(s)); /* leaves the outer one */
    ck_assert_uint_eq(df_sem_tokens(s), 3);
    TU_OK(df_sem_free(s));
    df_deferred_unref(outer);
    df_deferred_unref(inner);
    df_deferred_unref(d1);
    df_deferred_unref(d2);
}
END_TEST

/* The application may drop its reference to a waiting acquire; its
 * callbacks still run when the token comes. */
START_TEST(test_sem_unref_waiting_acquire)
{
    df_sem *s;
    df_deferred *held, *d;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_acquire(s, &d));
    TU_OK(df_deferred_add_callback(d, incr, NULL));
    TU_OK(df_deferred_add_callback(d, release_cb, s));
    df_deferred_unref(d);
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_counter, 1);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
}
END_TEST

START_TEST(test_sem_free_busy)
{
    df_sem *s;
    df_deferred *held, *d;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_ERR(df_sem_free(s), DF_EBUSY);
    TU_OK(df_sem_acquire(s, &d));
    TU_OK(df_deferred_add_callback(d, release_cb, s));
    TU_ERR(df_sem_free(s), DF_EBUSY);
    TU_OK(df_sem_release(s)); /* to d, which gives it back */
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    df_deferred_unref(d);
}
END_TEST

/* ------------------------------------------------------------ cancel */

/* Twisted: OtherPrimitivesTests.test_cancelSemaphoreAfterAcquired */
START_TEST(test_sem_cancel_after_acquired)
{
    df_sem *s;
    df_deferred *d;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &d));
    TU_OK(df_deferred_add_both(d, rec_both, &r));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(r.errs, 0);
    ck_assert_int_eq(r.oks, 1);
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
    df_deferred_unref(d);
}
END_TEST

/* Twisted: OtherPrimitivesTests.test_cancelSemaphoreBeforeAcquired */
START_TEST(test_sem_cancel_before_acquired)
{
    df_sem *s;
    df_deferred *held, *d;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_acquire(s, &d));
    ck_assert_uint_eq(df_sem_waiting(s), 1);
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(failure_code(d), DF_ECANCELLED);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    ck_assert_uint_eq(df_sem_tokens(s), 0); /* token count unchanged */
    /* The cancelled waiter is out of the line: the release frees the
     * token instead of handing it to it. */
    TU_OK(df_sem_release(s));
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    /* d's failure was never handled: consume it before releasing d. */
    TU_OK(df_deferred_add_errback(d, rec_both, &(rec){0}));
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_sem_cancel_waiter_keeps_order)
{
    df_sem *s;
    df_deferred *held, *d[3];

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    for (int i = 0; i < 3; i++) {
        TU_OK(df_sem_acquire(s, &d[i]));
        TU_OK(df_deferred_add_both(d[i], log_cb, (void *)(intptr_t)i));
    }
    TU_OK(df_deferred_cancel(d[1]));
    ck_assert_int_eq(g_nlog, 1); /* d[1]'s errback */
    ck_assert_int_eq(g_log[0], 1);
    ck_assert_uint_eq(df_sem_waiting(s), 2);
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_log[1], 0);
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_log[2], 2);
    ck_assert_int_eq(g_nlog, 3);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    for (int i = 0; i < 3; i++)
        df_deferred_unref(d[i]);
}
END_TEST

/* A waiter whose token was handed over by a release made inside a
 * callback has acquired it, as after Twisted's release(): cancelling it
 * then is too late, and it fires with success. */
typedef struct late_cancel {
    df_sem *s;
    df_deferred *next;
} late_cancel;

static df_result release_then_cancel(df_result r, void *arg)
{
    late_cancel *lc = arg;
    TU_OK(df_sem_release(lc->s));
    TU_OK(df_deferred_cancel(lc->next));
    ck_assert(fired_ok(lc->next));
    return r;
}

START_TEST(test_sem_cancel_after_handed_over)
{
    late_cancel lc;
    df_deferred *held, *first;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &lc.s));
    TU_OK(df_sem_acquire(lc.s, &held));
    TU_OK(df_sem_acquire(lc.s, &first));
    TU_OK(df_deferred_add_callback(first, release_then_cancel, &lc));
    TU_OK(df_sem_acquire(lc.s, &lc.next));
    TU_OK(df_deferred_add_both(lc.next, rec_both, &r));
    TU_OK(df_sem_release(lc.s));
    ck_assert_int_eq(r.oks, 1);
    ck_assert_int_eq(r.errs, 0);
    ck_assert_uint_eq(df_sem_tokens(lc.s), 0); /* lc.next holds it */
    TU_OK(df_sem_release(lc.s));
    TU_OK(df_sem_free(lc.s));
    df_deferred_unref(held);
    df_deferred_unref(first);
    df_deferred_unref(lc.next);
}
END_TEST

/* A waiting acquire given a deadline leaves the line when it expires and
 * fails with DF_ETIMEDOUT; the token count is unchanged. */
START_TEST(test_sem_acquire_timeout)
{
    df_sem *s;
    df_deferred *held, *d;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_acquire(s, &d));
    TU_OK(df_deferred_set_timeout(d, 1000000)); /* 1 ms */
    TU_OK(df_deferred_add_both(d, rec_both, &r));
    TU_OK(df_loop_run_until(L, d));
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, DF_ETIMEDOUT);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_OK(df_sem_release(s));
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    df_deferred_unref(d);
}
END_TEST

/* ------------------------------------------------------------ run */

START_TEST(test_sem_run_sync_value)
{
    df_sem *s;
    df_deferred *out;
    int x;
    void *value = NULL;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_run(s, return_value, &x, &out));
    ck_assert_int_eq(g_fn_calls, 1);
    TU_OK(df_deferred_peek(out, &value, NULL));
    ck_assert_ptr_eq(value, &x);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(out);
}
END_TEST

static df_result return_counted(void *arg)
{
    (void)arg;
    return df_ok(&g_destroyed, destroy_counted);
}

/* The value fn returns reaches *out's chain and is destroyed once. */
START_TEST(test_sem_run_value_destroyed_once)
{
    df_sem *s;
    df_deferred *held, *out;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_run(s, return_counted, NULL, &out));
    TU_OK(df_sem_release(s));
    ck_assert(fired_ok(out));
    ck_assert_int_eq(g_destroyed, 0);
    df_deferred_unref(out);
    ck_assert_int_eq(g_destroyed, 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
}
END_TEST

/* fn failing releases the token and fails *out with its own failure. */
START_TEST(test_sem_run_failure_releases)
{
    df_sem *s;
    df_deferred *out;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_run(s, return_failure, NULL, &out));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, 1234);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(out);
}
END_TEST

START_TEST(test_sem_run_deferred_result)
{
    df_sem *s;
    df_deferred *control, *out;
    rec r = {0};
    int x;

    TU_OK(df_sem_new(L, 2, &s));
    TU_OK(df_deferred_new(L, &control));
    TU_OK(df_sem_run(s, return_deferred, control, &out));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    ck_assert_int_eq(r.calls, 0);
    TU_OK(df_deferred_callback(control, &x, NULL));
    ck_assert_int_eq(r.oks, 1);
    ck_assert_ptr_eq(r.value, &x);
    ck_assert_uint_eq(df_sem_tokens(s), 2);
    TU_OK(df_sem_free(s));
    df_deferred_unref(control);
    df_deferred_unref(out);
}
END_TEST

START_TEST(test_sem_run_deferred_failure_releases)
{
    df_sem *s;
    df_deferred *control, *out;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_deferred_new(L, &control));
    TU_OK(df_sem_run(s, return_deferred, control, &out));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_OK(df_deferred_errback(control, df_failure_new(L, 77, "boom")));
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, 77);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(control);
    df_deferred_unref(out);
}
END_TEST

static df_result return_fired(void *arg)
{
    df_deferred *d;
    TU_OK(df_succeed(L, arg, NULL, &d));
    return df_wait(d);
}

START_TEST(test_sem_run_already_fired_deferred)
{
    df_sem *s;
    df_deferred *out;
    void *value = NULL;
    int x;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_run(s, return_fired, &x, &out));
    TU_OK(df_deferred_peek(out, &value, NULL));
    ck_assert_ptr_eq(value, &x);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(out);
}
END_TEST

/* run() releases before its callbacks see the result: inside them the
 * token is already back (or already handed to the next in line). */
typedef struct seen {
    df_sem *s;
    unsigned tokens;
    size_t waiting;
    int calls;
} seen;

static df_result record_tokens(df_result r, void *arg)
{
    seen *sn = arg;
    sn->tokens = df_sem_tokens(sn->s);
    sn->waiting = df_sem_waiting(sn->s);
    sn->calls++;
    return r;
}

START_TEST(test_sem_run_releases_before_callbacks)
{
    df_sem *s;
    df_deferred *control, *out, *out2, *out3;
    seen a = {0}, b = {0}, c = {0};

    TU_OK(df_sem_new(L, 1, &s));
    a.s = b.s = c.s = s;

    /* Synchronous result, nobody waiting: the token is free again. */
    TU_OK(df_sem_run(s, return_failure, NULL, &out));
    TU_OK(df_deferred_add_both(out, record_tokens, &a));
    ck_assert_int_eq(a.calls, 1);
    ck_assert_uint_eq(a.tokens, 1);
    TU_OK(df_deferred_add_errback(out, rec_both, &(rec){0}));
    df_deferred_unref(out);

    /* Deferred result with a run waiting: the token went to it. */
    g_fn_calls = 0;
    TU_OK(df_deferred_new(L, &control));
    TU_OK(df_sem_run(s, return_deferred, control, &out));
    TU_OK(df_deferred_add_both(out, record_tokens, &b));
    TU_OK(df_sem_run(s, return_value, NULL, &out2));
    TU_OK(df_deferred_add_both(out2, record_tokens, &c));
    ck_assert_uint_eq(df_sem_waiting(s), 1);
    TU_OK(df_deferred_callback(control, NULL, NULL));
    ck_assert_int_eq(b.calls, 1);
    ck_assert_uint_eq(b.tokens, 0);
    ck_assert_uint_eq(b.waiting, 0);
    ck_assert_int_eq(c.calls, 1);
    ck_assert_uint_eq(c.tokens, 1);
    ck_assert_int_eq(g_fn_calls, 1);

    /* Deferred result, nobody waiting. */
    c.calls = 0;
    df_deferred_unref(control);
    TU_OK(df_deferred_new(L, &control));
    TU_OK(df_sem_run(s, return_deferred, control, &out3));
    TU_OK(df_deferred_add_both(out3, record_tokens, &c));
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_OK(df_deferred_callback(control, NULL, NULL));
    ck_assert_int_eq(c.calls, 1);
    ck_assert_uint_eq(c.tokens, 1);

    TU_OK(df_sem_free(s));
    df_deferred_unref(control);
    df_deferred_unref(out);
    df_deferred_unref(out2);
    df_deferred_unref(out3);
}
END_TEST

START_TEST(test_sem_run_fifo)
{
    df_sem *s;
    df_deferred *held, *out[4];

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    for (int i = 0; i < 4; i++) {
        TU_OK(df_sem_run(s, return_value, (void *)(intptr_t)i, &out[i]));
        TU_OK(df_deferred_add_both(out[i], log_cb, (void *)(intptr_t)i));
    }
    ck_assert_int_eq(g_fn_calls, 0);
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_fn_calls, 4);
    ck_assert_int_eq(g_nlog, 4);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(g_log[i], i);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    for (int i = 0; i < 4; i++)
        df_deferred_unref(out[i]);
}
END_TEST

START_TEST(test_sem_run_cancel_waiting)
{
    df_sem *s;
    df_deferred *held, *out;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_run(s, return_value, NULL, &out));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    ck_assert_uint_eq(df_sem_waiting(s), 1);
    TU_OK(df_deferred_cancel(out));
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, DF_ECANCELLED);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_fn_calls, 0); /* fn never runs */
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    df_deferred_unref(out);
}
END_TEST

static void count_cancel(df_deferred *d, void *arg)
{
    (void)d;
    (void)arg;
    g_cancelled++;
}

/* While fn's deferred is pending, cancelling *out cancels it; the token is
 * back before *out's errback runs. */
START_TEST(test_sem_run_cancel_running)
{
    df_sem *s;
    df_deferred *inner, *out;
    seen sn = {0};
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    sn.s = s;
    TU_OK(df_deferred_new_cancellable(L, count_cancel, NULL, &inner));
    TU_OK(df_sem_run(s, return_deferred, inner, &out));
    TU_OK(df_deferred_add_both(out, record_tokens, &sn));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    TU_OK(df_deferred_cancel(out));
    ck_assert_int_eq(g_cancelled, 1);
    ck_assert(df_deferred_called(inner));
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, DF_ECANCELLED);
    ck_assert_uint_eq(sn.tokens, 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(inner);
    df_deferred_unref(out);
}
END_TEST

static void recover_on_cancel(df_deferred *d, void *arg)
{
    TU_OK(df_deferred_callback(d, arg, NULL));
}

/* *out carries whatever fn's deferred gives after the cancel, as Twisted's
 * run() does (its result waits on that deferred). */
START_TEST(test_sem_run_cancel_running_recovers)
{
    df_sem *s;
    df_deferred *inner, *out;
    rec r = {0};
    int x;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_deferred_new_cancellable(L, recover_on_cancel, &x, &inner));
    TU_OK(df_sem_run(s, return_deferred, inner, &out));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    TU_OK(df_deferred_cancel(out));
    ck_assert_int_eq(r.oks, 1);
    ck_assert_ptr_eq(r.value, &x);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(inner);
    df_deferred_unref(out);
}
END_TEST

/* A producer whose result comes later than the cancel (here held back by
 * a pause): *out waits for it, and the token is not released before it
 * is known (never free the token early). */
START_TEST(test_sem_run_cancel_waits_for_producer)
{
    df_sem *s;
    df_deferred *inner, *out;
    seen sn = {0};

    TU_OK(df_sem_new(L, 1, &s));
    sn.s = s;
    TU_OK(df_deferred_new_cancellable(L, count_cancel, NULL, &inner));
    TU_OK(df_deferred_pause(inner)); /* its result is held back */
    TU_OK(df_sem_run(s, return_deferred, inner, &out));
    TU_OK(df_deferred_add_both(out, record_tokens, &sn));
    TU_OK(df_deferred_cancel(out));
    ck_assert_int_eq(g_cancelled, 1);
    ck_assert_int_eq(sn.calls, 0);
    ck_assert(!df_deferred_called(out));
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_OK(df_deferred_unpause(inner));
    ck_assert_int_eq(sn.calls, 1);
    ck_assert_uint_eq(sn.tokens, 1);
    ck_assert_int_eq(failure_code(out), DF_ECANCELLED);
    TU_OK(df_deferred_add_errback(out, rec_both, &(rec){0}));
    TU_OK(df_sem_free(s));
    df_deferred_unref(inner);
    df_deferred_unref(out);
}
END_TEST

/* fn cancels *out while it runs: the cancel goes to the deferred that fn
 * returns. */
typedef struct self_cancel {
    df_deferred *out;
    df_deferred *inner;
} self_cancel;

static df_result cancel_own_out(void *arg)
{
    self_cancel *sc = arg;
    TU_OK(df_deferred_cancel(sc->out));
    ck_assert(!df_deferred_called(sc->out));
    return df_wait(df_deferred_ref(sc->inner));
}

START_TEST(test_sem_run_cancel_inside_fn)
{
    df_sem *s;
    df_deferred *held;
    self_cancel sc;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_deferred_new_cancellable(L, count_cancel, NULL, &sc.inner));
    TU_OK(df_sem_run(s, cancel_own_out, &sc, &sc.out));
    TU_OK(df_deferred_add_both(sc.out, rec_both, &r));
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_cancelled, 1);
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, DF_ECANCELLED);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    df_deferred_unref(sc.inner);
    df_deferred_unref(sc.out);
}
END_TEST

/* A run whose token was handed over by a release made inside a callback
 * has acquired it, as after Twisted's release(): cancelling it then starts
 * fn and forwards the cancel to fn's deferred, as Twisted's run() does. */
typedef struct late_run {
    df_sem *s;
    df_deferred *out;
} late_run;

static df_result release_then_cancel_run(df_result r, void *arg)
{
    late_run *lr = arg;
    TU_OK(df_sem_release(lr->s));
    ck_assert_int_eq(g_cancelled, 0);
    TU_OK(df_deferred_cancel(lr->out));
    ck_assert_int_eq(g_cancelled, 1);
    ck_assert_int_eq(failure_code(lr->out), DF_ECANCELLED);
    return r;
}

START_TEST(test_sem_run_cancel_after_handed_over)
{
    late_run lr;
    df_deferred *held, *first, *inner;

    TU_OK(df_sem_new(L, 1, &lr.s));
    TU_OK(df_deferred_new_cancellable(L, count_cancel, NULL, &inner));
    TU_OK(df_sem_acquire(lr.s, &held));
    TU_OK(df_sem_acquire(lr.s, &first));
    TU_OK(df_deferred_add_callback(first, release_then_cancel_run, &lr));
    TU_OK(df_sem_run(lr.s, return_deferred, inner, &lr.out));
    TU_OK(df_sem_release(lr.s));
    ck_assert_int_eq(g_cancelled, 1);
    ck_assert_uint_eq(df_sem_tokens(lr.s), 1);
    TU_OK(df_deferred_add_errback(lr.out, rec_both, &(rec){0}));
    TU_OK(df_sem_free(lr.s));
    df_deferred_unref(held);
    df_deferred_unref(first);
    df_deferred_unref(inner);
    df_deferred_unref(lr.out);
}
END_TEST

START_TEST(test_sem_run_cancel_after_done)
{
    df_sem *s;
    df_deferred *out;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_run(s, return_value, NULL, &out));
    TU_OK(df_deferred_cancel(out));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    ck_assert_int_eq(r.oks, 1);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(out);
}
END_TEST

/* A waiting run given a deadline leaves the line when it expires: *out
 * fails with DF_ETIMEDOUT and fn never runs. */
START_TEST(test_sem_run_timeout_waiting)
{
    df_sem *s;
    df_deferred *held, *out;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_run(s, return_value, NULL, &out));
    TU_OK(df_deferred_set_timeout(out, 1000000)); /* 1 ms */
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    TU_OK(df_loop_run_until(L, out));
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, DF_ETIMEDOUT);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_fn_calls, 0);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    df_deferred_unref(out);
}
END_TEST

/* The application may drop *out before the run starts: it still runs. */
START_TEST(test_sem_run_unref_out_early)
{
    df_sem *s;
    df_deferred *held, *out;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_run(s, return_counted, NULL, &out));
    df_deferred_unref(out);
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_destroyed, 1);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
}
END_TEST

/* A callback of the last run may free the semaphore. */
static df_result free_sem_cb(df_result r, void *arg)
{
    TU_OK(df_sem_free(arg));
    g_counter++;
    return r;
}

START_TEST(test_sem_free_in_run_callback)
{
    df_sem *s;
    df_deferred *held, *out;

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &held));
    TU_OK(df_sem_run(s, return_value, NULL, &out));
    TU_OK(df_deferred_add_callback(out, free_sem_cb, s));
    df_deferred_unref(out);
    TU_OK(df_sem_release(s)); /* frees s on its way out */
    ck_assert_int_eq(g_counter, 1);
    df_deferred_unref(held);
}
END_TEST

/* ------------------------------------------------------------ lock */

static df_result lock_helper_fn(void *arg)
{
    void **args = arg;
    g_result = args[0];
    return df_wait(df_deferred_ref(args[1]));
}

static df_result store_result_and_clear(df_result r, void *arg)
{
    (void)arg;
    g_result = r.failure != NULL ? (void *)r.failure : r.value;
    if (r.failure != NULL)
        g_counter += 1000 * (df_failure_code(r.failure) == DF_ECANCELLED);
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

/* Twisted: OtherPrimitivesTests.test_lock */
START_TEST(test_lock_lock)
{
    df_lock *l;
    df_deferred *a, *b, *control, *result, *c, *d;
    int first, second;
    void *args[2];

    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_acquire(l, &a));
    TU_OK(df_deferred_add_callback(a, incr, NULL));
    ck_assert(df_lock_locked(l));
    ck_assert_int_eq(g_counter, 1);

    TU_OK(df_lock_acquire(l, &b));
    TU_OK(df_deferred_add_callback(b, incr, NULL));
    ck_assert(df_lock_locked(l));
    ck_assert_int_eq(g_counter, 1);

    TU_OK(df_lock_release(l));
    ck_assert(df_lock_locked(l));
    ck_assert_int_eq(g_counter, 2);

    TU_OK(df_lock_release(l));
    ck_assert(!df_lock_locked(l));
    ck_assert_int_eq(g_counter, 2);

    /* Twisted: lock.run() without a function raises TypeError. */
    TU_ERR(df_lock_run(l, NULL, NULL, &result), DF_EINVAL);

    TU_OK(df_deferred_new(L, &control));
    args[0] = &first;
    args[1] = control;
    TU_OK(df_lock_run(l, lock_helper_fn, args, &result));
    ck_assert(df_lock_locked(l));
    ck_assert_ptr_eq(g_result, &first);

    TU_OK(df_deferred_add_callback(result, store_result, NULL));

    TU_OK(df_lock_acquire(l, &c));
    TU_OK(df_deferred_add_callback(c, incr, NULL));
    ck_assert(df_lock_locked(l));
    ck_assert_int_eq(g_counter, 2);

    TU_OK(df_deferred_callback(control, &second, NULL));
    ck_assert_ptr_eq(g_result, &second);
    ck_assert(df_lock_locked(l));
    ck_assert_int_eq(g_counter, 3);

    TU_OK(df_lock_acquire(l, &d));
    TU_OK(df_deferred_add_both(d, store_result_and_clear, NULL));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(g_counter, 1003); /* a CANCELLED failure arrived */

    TU_OK(df_lock_release(l));
    ck_assert(!df_lock_locked(l));
    TU_OK(df_lock_free(l));
    df_deferred_unref(a);
    df_deferred_unref(b);
    df_deferred_unref(c);
    df_deferred_unref(d);
    df_deferred_unref(control);
    df_deferred_unref(result);
}
END_TEST

/* Twisted: OtherPrimitivesTests.test_cancelLockAfterAcquired */
START_TEST(test_lock_cancel_after_acquired)
{
    df_lock *l;
    df_deferred *d;
    rec r = {0};

    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_acquire(l, &d));
    TU_OK(df_deferred_add_errback(d, rec_both, &r));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(r.errs, 0);
    ck_assert(df_lock_locked(l));
    TU_OK(df_lock_release(l));
    TU_OK(df_lock_free(l));
    df_deferred_unref(d);
}
END_TEST

/* Twisted: OtherPrimitivesTests.test_cancelLockBeforeAcquired */
START_TEST(test_lock_cancel_before_acquired)
{
    df_lock *l;
    df_deferred *held, *d;
    rec r = {0};

    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_acquire(l, &held));
    TU_OK(df_lock_acquire(l, &d));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(failure_code(d), DF_ECANCELLED);
    TU_OK(df_deferred_add_errback(d, rec_both, &r));
    ck_assert_int_eq(r.errs, 1);
    TU_OK(df_lock_release(l));
    ck_assert(!df_lock_locked(l));
    TU_OK(df_lock_free(l));
    df_deferred_unref(held);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredTests.test_asyncWithLock (`async with`, written out) */
START_TEST(test_lock_async_with)
{
    df_lock *l;
    df_deferred *entered, *d;

    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_acquire(l, &entered));
    ck_assert(df_lock_locked(l));
    TU_OK(df_lock_acquire(l, &d));
    TU_OK(df_deferred_add_callback(d, lock_release_cb, l));
    ck_assert(df_lock_locked(l));
    ck_assert(!df_deferred_called(d));
    TU_OK(df_lock_release(l)); /* leaves the `async with` */
    ck_assert(df_deferred_called(d));
    ck_assert(!df_lock_locked(l));
    TU_OK(df_lock_free(l));
    df_deferred_unref(entered);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredTests.test_asyncWithLockException, as run(): fn's
 * failure reaches the caller intact and the lock is released. */
START_TEST(test_lock_run_failure_releases)
{
    df_lock *l;
    df_deferred *out;
    df_failure *f = NULL;

    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_run(l, return_failure, NULL, &out));
    TU_OK(df_deferred_peek(out, NULL, &f));
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(df_failure_code(f), 1234);
    ck_assert_str_eq(df_failure_message(f), "some specific exception");
    ck_assert(!df_lock_locked(l));
    TU_OK(df_deferred_add_errback(out, rec_both, &(rec){0}));
    TU_OK(df_lock_free(l));
    df_deferred_unref(out);
}
END_TEST

START_TEST(test_lock_over_release)
{
    df_lock *l;
    df_deferred *d;

    TU_OK(df_lock_new(L, &l));
    TU_ERR(df_lock_release(l), DF_EOVERRELEASE);
    ck_assert(!df_lock_locked(l));
    TU_OK(df_lock_acquire(l, &d));
    TU_OK(df_lock_release(l));
    TU_ERR(df_lock_release(l), DF_EOVERRELEASE);
    TU_ERR(df_lock_free(NULL), DF_EINVAL);
    TU_OK(df_lock_free(l));
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_lock_null_args)
{
    df_lock *l;
    df_deferred *d;

    TU_ERR(df_lock_new(NULL, &l), DF_EINVAL);
    TU_ERR(df_lock_new(L, NULL), DF_EINVAL);
    TU_ERR(df_lock_acquire(NULL, &d), DF_EINVAL);
    TU_ERR(df_lock_release(NULL), DF_EINVAL);
    TU_ERR(df_lock_run(NULL, return_value, NULL, &d), DF_EINVAL);
    ck_assert(!df_lock_locked(NULL));
}
END_TEST

START_TEST(test_lock_free_busy)
{
    df_lock *l;
    df_deferred *d;

    TU_OK(df_lock_new(L, &l));
    TU_OK(df_lock_acquire(l, &d));
    TU_ERR(df_lock_free(l), DF_EBUSY);
    TU_OK(df_lock_release(l));
    TU_OK(df_lock_free(l));
    df_deferred_unref(d);
}
END_TEST

/* ------------------------------------------------------------ stack */

/*
 * The no-recursion tests run their body on a thread with a 256 KiB stack,
 * where a release that recursed once per waiter would overflow long before
 * 10^6.  The body makes its own loop (a loop belongs to its thread) and
 * records problems instead of asserting, since Check's assertions belong to
 * the test's own thread; the test asserts on the record after the join.
 */
enum { MILLION = 1000000 };

typedef struct big {
    df_sem *s;
    long fn_calls;
    long cb_calls;
    long started;
    long out_of_order;
    int errors;   /* calls that failed unexpectedly */
    bool done;
} big;

#define BIG_OK(b, expr)                                                       \
    do {                                                                       \
        if ((expr) != 0)                                                       \
            (b)->errors++;                                                     \
    } while (0)

static void run_on_small_stack(void *(*body)(void *), big *b)
{
    pthread_attr_t attr;
    pthread_t th;

    ck_assert_int_eq(pthread_attr_init(&attr), 0);
    ck_assert_int_eq(pthread_attr_setstacksize(&attr, 256 * 1024), 0);
    ck_assert_int_eq(pthread_create(&th, &attr, body, b), 0);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    pthread_attr_destroy(&attr);
    ck_assert_int_eq(b->errors, 0);
    ck_assert(b->done);
}

static df_result big_fn(void *arg)
{
    big *b = arg;
    b->fn_calls++;
    return df_ok((void *)(intptr_t)b->fn_calls, NULL);
}

static df_result big_check_order(df_result r, void *arg)
{
    big *b = arg;
    b->cb_calls++;
    if (r.failure != NULL || (intptr_t)r.value != b->cb_calls)
        b->out_of_order++;
    /* The token is already back when the last run's callbacks run. */
    if (b->cb_calls == MILLION && df_sem_tokens(b->s) != 1)
        b->out_of_order++;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

static void *million_queued_runs(void *arg)
{
    big *b = arg;
    df_loop *loop;
    df_deferred *held, *out;

    if (df_loop_new(NULL, &loop) != 0) {
        b->errors++;
        return NULL;
    }
    BIG_OK(b, df_sem_new(loop, 1, &b->s));
    BIG_OK(b, df_sem_acquire(b->s, &held));
    for (long i = 0; i < MILLION; i++) {
        BIG_OK(b, df_sem_run(b->s, big_fn, b, &out));
        BIG_OK(b, df_deferred_add_both(out, big_check_order, b));
        df_deferred_unref(out);
    }
    if (df_sem_waiting(b->s) != MILLION || b->fn_calls != 0)
        b->errors++;
    BIG_OK(b, df_sem_release(b->s)); /* all 10^6 run from here */
    if (b->fn_calls != MILLION || b->cb_calls != MILLION ||
        b->out_of_order != 0 || df_sem_tokens(b->s) != 1 ||
        df_sem_waiting(b->s) != 0)
        b->errors++;
    BIG_OK(b, df_sem_free(b->s));
    df_deferred_unref(held);
    BIG_OK(b, df_loop_free(loop));
    b->done = true;
    return NULL;
}

START_TEST(test_sem_million_queued_runs_small_stack)
{
    big b = {0};
    run_on_small_stack(million_queued_runs, &b);
}
END_TEST

/* Each run's callback starts the next run: a chain of 10^6 runs, each
 * started from inside the previous one's callbacks.  The first run is
 * queued behind a held token so that its callbacks are in place before it
 * fires.  (A callback added to a deferred that has already fired runs at
 * once in the frame of whoever adds it: that nesting belongs to the
 * caller, and no semaphore can undo it.) */
static df_result big_chain(df_result r, void *arg)
{
    big *b = arg;
    df_deferred *out;

    b->cb_calls++;
    df_result_clear(&r);
    if (b->started < MILLION) {
        b->started++;
        BIG_OK(b, df_sem_run(b->s, big_fn, b, &out));
        /* Started from a callback of the semaphore: fn waits until this
         * callback has returned, so *out has not fired yet. */
        if (df_deferred_called(out))
            b->errors++;
        BIG_OK(b, df_deferred_add_both(out, big_chain, b));
        df_deferred_unref(out);
    }
    return df_ok(NULL, NULL);
}

static void *million_chained_runs(void *arg)
{
    big *b = arg;
    df_loop *loop;
    df_deferred *held, *out;

    if (df_loop_new(NULL, &loop) != 0) {
        b->errors++;
        return NULL;
    }
    BIG_OK(b, df_sem_new(loop, 1, &b->s));
    BIG_OK(b, df_sem_acquire(b->s, &held));
    b->started = 1;
    BIG_OK(b, df_sem_run(b->s, big_fn, b, &out));
    BIG_OK(b, df_deferred_add_both(out, big_chain, b));
    df_deferred_unref(out);
    BIG_OK(b, df_sem_release(b->s)); /* the whole chain runs from here */
    if (b->fn_calls != MILLION || b->cb_calls != MILLION ||
        df_sem_tokens(b->s) != 1)
        b->errors++;
    BIG_OK(b, df_sem_free(b->s));
    df_deferred_unref(held);
    BIG_OK(b, df_loop_free(loop));
    b->done = true;
    return NULL;
}

START_TEST(test_sem_million_chained_runs_small_stack)
{
    big b = {0};
    run_on_small_stack(million_chained_runs, &b);
}
END_TEST

/* Plain acquires whose callbacks release: one release runs them all. */
static df_result big_release(df_result r, void *arg)
{
    big *b = arg;
    b->cb_calls++;
    BIG_OK(b, df_sem_release(b->s));
    return r;
}

static void *million_acquires(void *arg)
{
    big *b = arg;
    df_loop *loop;
    df_deferred *held, *d;

    if (df_loop_new(NULL, &loop) != 0) {
        b->errors++;
        return NULL;
    }
    BIG_OK(b, df_sem_new(loop, 1, &b->s));
    BIG_OK(b, df_sem_acquire(b->s, &held));
    for (long i = 0; i < MILLION; i++) {
        BIG_OK(b, df_sem_acquire(b->s, &d));
        BIG_OK(b, df_deferred_add_callback(d, big_release, b));
        df_deferred_unref(d);
    }
    BIG_OK(b, df_sem_release(b->s));
    if (b->cb_calls != MILLION || df_sem_tokens(b->s) != 1)
        b->errors++;
    BIG_OK(b, df_sem_free(b->s));
    df_deferred_unref(held);
    BIG_OK(b, df_loop_free(loop));
    b->done = true;
    return NULL;
}

START_TEST(test_sem_million_acquire_release_small_stack)
{
    big b = {0};
    run_on_small_stack(million_acquires, &b);
}
END_TEST

/* ------------------------------------------------------------ allocation */

START_TEST(test_sem_enomem_new)
{
    df_sem *s = NULL;
    df_lock *l = NULL;

    fail_after(0);
    TU_ERR(df_sem_new(L, 1, &s), DF_ENOMEM);
    TU_ERR(df_lock_new(L, &l), DF_ENOMEM);
    fail_after(-1);
    ck_assert_ptr_null(s);
    ck_assert_ptr_null(l);
}
END_TEST

/* Every allocation an acquire makes may fail: each failure returns
 * DF_ENOMEM, leaks nothing, and leaves the semaphore as it was. */
START_TEST(test_sem_enomem_acquire)
{
    df_sem *s;
    df_deferred *held = NULL, *d = NULL;
    long live, n;
    int rc;

    TU_OK(df_sem_new(L, 1, &s));
    live = atomic_load(&g_fa.live);
    for (n = 0;; n++) {
        fail_after(n);
        rc = df_sem_acquire(s, &held);
        fail_after(-1);
        if (rc == 0)
            break;
        TU_ERR(rc, DF_ENOMEM);
        ck_assert_uint_eq(df_sem_tokens(s), 1);
        ck_assert_int_eq(atomic_load(&g_fa.live), live);
    }
    ck_assert_uint_eq(df_sem_tokens(s), 0);

    live = atomic_load(&g_fa.live);
    for (n = 0;; n++) {
        fail_after(n);
        rc = df_sem_acquire(s, &d);
        fail_after(-1);
        if (rc == 0)
            break;
        TU_ERR(rc, DF_ENOMEM);
        ck_assert_uint_eq(df_sem_waiting(s), 0);
        ck_assert_int_eq(atomic_load(&g_fa.live), live);
    }
    ck_assert_int_ge(n, 1); /* the deferred, whose block holds the waiter */
    ck_assert_uint_eq(df_sem_waiting(s), 1);
    TU_OK(df_sem_release(s));
    ck_assert(fired_ok(d));
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_sem_enomem_run)
{
    df_sem *s;
    df_deferred *held, *out = NULL;
    long live, n;
    int rc;

    TU_OK(df_sem_new(L, 1, &s));
    /* With a free token: fn is never called when the call fails. */
    live = atomic_load(&g_fa.live);
    for (n = 0;; n++) {
        fail_after(n);
        rc = df_sem_run(s, return_value, NULL, &out);
        fail_after(-1);
        if (rc == 0)
            break;
        TU_ERR(rc, DF_ENOMEM);
        ck_assert_int_eq(g_fn_calls, 0);
        ck_assert_uint_eq(df_sem_tokens(s), 1);
        ck_assert_int_eq(atomic_load(&g_fa.live), live);
    }
    ck_assert_int_eq(g_fn_calls, 1);
    df_deferred_unref(out);

    /* Waiting for the token. */
    TU_OK(df_sem_acquire(s, &held));
    live = atomic_load(&g_fa.live);
    for (n = 0;; n++) {
        fail_after(n);
        rc = df_sem_run(s, return_value, NULL, &out);
        fail_after(-1);
        if (rc == 0)
            break;
        TU_ERR(rc, DF_ENOMEM);
        ck_assert_uint_eq(df_sem_waiting(s), 0);
        ck_assert_int_eq(atomic_load(&g_fa.live), live);
    }
    ck_assert_uint_eq(df_sem_waiting(s), 1);
    TU_OK(df_sem_release(s));
    ck_assert_int_eq(g_fn_calls, 2);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    df_deferred_unref(held);
    df_deferred_unref(out);
}
END_TEST

static df_result pass(df_result r, void *arg)
{
    (void)arg;
    return r;
}

/* fn returns a deferred, and waiting for it needs memory that is not
 * there: *out fails with DF_ENOMEM and the token comes back. */
static df_result return_deferred_then_fail(void *arg)
{
    fail_after(0);
    return df_wait(df_deferred_ref(arg));
}

START_TEST(test_sem_run_enomem_waiting_for_fn)
{
    df_sem *s;
    df_deferred *inner, *out;
    rec r = {0};

    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_deferred_new(L, &inner));
    /* Fill the deferred's inline callback slots, so that one more needs
     * an allocation. */
    TU_OK(df_deferred_add_callback(inner, pass, NULL));
    TU_OK(df_deferred_add_callback(inner, pass, NULL));
    TU_OK(df_sem_run(s, return_deferred_then_fail, inner, &out));
    fail_after(-1);
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, DF_ENOMEM);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_sem_free(s));
    TU_OK(df_deferred_callback(inner, NULL, NULL));
    df_deferred_unref(inner);
    df_deferred_unref(out);
}
END_TEST

/* ---------------------------------------------- issue 15: decided cases */

/* Issue 15, item 1.  A release made while only a df_sem_run holds the
 * token must not give that token away behind the run's back: it is an
 * over-release (DF_EOVERRELEASE), and when fn's deferred fires the run
 * gives its token back normally.  Before the fix the release returned 0
 * and the run's give-back aborted on an assert (tokens < limit). */
START_TEST(test_sem_release_while_run_holds)
{
    df_sem *s;
    df_deferred *inner, *out, *a;
    rec r = {0};
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_sem_run(s, return_deferred, inner, &out));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_ERR(df_sem_release(s), DF_EOVERRELEASE);
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    /* A waiter still waits for the run's token. */
    TU_OK(df_sem_acquire(s, &a));
    ck_assert(!df_deferred_called(a));
    TU_OK(df_deferred_callback(inner, NULL, NULL));
    ck_assert_int_eq(r.oks, 1);
    ck_assert(df_deferred_called(a)); /* the run's token went to it */
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_OK(df_sem_release(s)); /* a's, taken by acquire */
    TU_ERR(df_sem_release(s), DF_EOVERRELEASE);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    df_deferred_unref(a);
    df_deferred_unref(out);
    df_deferred_unref(inner);
    TU_OK(df_sem_free(s));
}
END_TEST

/* The same with a mix: one token taken by acquire and one by a run; one
 * release is allowed (the acquire's), the second is refused, and the
 * count never goes above the limit. */
START_TEST(test_sem_release_counts_only_acquired)
{
    df_sem *s;
    df_deferred *inner, *out, *a;
    TU_OK(df_sem_new(L, 2, &s));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_sem_acquire(s, &a));
    TU_OK(df_sem_run(s, return_deferred, inner, &out));
    ck_assert_uint_eq(df_sem_tokens(s), 0);
    TU_OK(df_sem_release(s));
    TU_ERR(df_sem_release(s), DF_EOVERRELEASE);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    TU_OK(df_deferred_callback(inner, NULL, NULL));
    ck_assert_uint_eq(df_sem_tokens(s), 2);
    df_deferred_unref(a);
    df_deferred_unref(out);
    df_deferred_unref(inner);
    TU_OK(df_sem_free(s));
}
END_TEST

/* Issue 15, item 10, decided as a departure from Twisted (README): the
 * deferred df_sem_run returns carries fn's result, not the acquisition,
 * so pausing it holds back the delivery of that result, not the call of
 * fn.  fn runs as soon as the token is handed over; the token comes back
 * when fn's result is known; the paused deferred's callbacks get the
 * result once it is unpaused. */
START_TEST(test_sem_run_paused_waiter_runs_fn)
{
    df_sem *s;
    df_deferred *a, *out;
    rec r = {0};
    TU_OK(df_sem_new(L, 1, &s));
    TU_OK(df_sem_acquire(s, &a));
    TU_OK(df_sem_run(s, return_value, (void *)&r, &out));
    TU_OK(df_deferred_add_both(out, rec_both, &r));
    TU_OK(df_deferred_pause(out));
    TU_OK(df_sem_release(s)); /* the token goes to the paused run */
    ck_assert_int_eq(g_fn_calls, 1);       /* fn ran at once         */
    ck_assert_uint_eq(df_sem_tokens(s), 1); /* and gave its token back */
    ck_assert_int_eq(r.calls, 0);          /* delivery is held back  */
    TU_OK(df_deferred_unpause(out));
    ck_assert_int_eq(r.oks, 1);
    ck_assert_ptr_eq(r.value, &r);
    df_deferred_unref(a);
    df_deferred_unref(out);
    TU_OK(df_sem_free(s));
}
END_TEST

/* ------------------------------------------------------------ suite */

static Suite *sem_suite(void)
{
    Suite *s = suite_create("sem");
    TCase *tc;

    tc = tcase_create("create");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_sem_invalid_tokens);
    tcase_add_test(tc, test_sem_new_counts);
    tcase_add_test(tc, test_sem_null_args);
    tcase_add_test(tc, test_sem_wrong_thread);
    tcase_add_test(tc, test_sem_free_busy);
    suite_add_tcase(s, tc);

    tc = tcase_create("acquire");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_sem_semaphore);
    tcase_add_test(tc, test_sem_acquire_fires_at_once);
    tcase_add_test(tc, test_sem_fifo_order);
    tcase_add_test(tc, test_sem_fifo_during_dispatch);
    tcase_add_test(tc, test_sem_over_release);
    tcase_add_test(tc, test_sem_tokens_never_exceed_limit);
    tcase_add_test(tc, test_sem_async_with);
    tcase_add_test(tc, test_sem_unref_waiting_acquire);
    suite_add_tcase(s, tc);

    tc = tcase_create("cancel");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_sem_cancel_after_acquired);
    tcase_add_test(tc, test_sem_cancel_before_acquired);
    tcase_add_test(tc, test_sem_cancel_waiter_keeps_order);
    tcase_add_test(tc, test_sem_cancel_after_handed_over);
    tcase_add_test(tc, test_sem_acquire_timeout);
    suite_add_tcase(s, tc);

    tc = tcase_create("run");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_sem_run_sync_value);
    tcase_add_test(tc, test_sem_run_value_destroyed_once);
    tcase_add_test(tc, test_sem_run_failure_releases);
    tcase_add_test(tc, test_sem_run_deferred_result);
    tcase_add_test(tc, test_sem_run_deferred_failure_releases);
    tcase_add_test(tc, test_sem_run_already_fired_deferred);
    tcase_add_test(tc, test_sem_run_releases_before_callbacks);
    tcase_add_test(tc, test_sem_run_fifo);
    tcase_add_test(tc, test_sem_run_cancel_waiting);
    tcase_add_test(tc, test_sem_run_cancel_running);
    tcase_add_test(tc, test_sem_run_cancel_running_recovers);
    tcase_add_test(tc, test_sem_run_cancel_waits_for_producer);
    tcase_add_test(tc, test_sem_run_cancel_inside_fn);
    tcase_add_test(tc, test_sem_run_cancel_after_handed_over);
    tcase_add_test(tc, test_sem_run_cancel_after_done);
    tcase_add_test(tc, test_sem_run_timeout_waiting);
    tcase_add_test(tc, test_sem_run_unref_out_early);
    tcase_add_test(tc, test_sem_free_in_run_callback);
    tcase_add_test(tc, test_sem_release_while_run_holds);
    tcase_add_test(tc, test_sem_release_counts_only_acquired);
    tcase_add_test(tc, test_sem_run_paused_waiter_runs_fn);
    suite_add_tcase(s, tc);

    tc = tcase_create("lock");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_lock_lock);
    tcase_add_test(tc, test_lock_cancel_after_acquired);
    tcase_add_test(tc, test_lock_cancel_before_acquired);
    tcase_add_test(tc, test_lock_async_with);
    tcase_add_test(tc, test_lock_run_failure_releases);
    tcase_add_test(tc, test_lock_over_release);
    tcase_add_test(tc, test_lock_null_args);
    tcase_add_test(tc, test_lock_free_busy);
    suite_add_tcase(s, tc);

    tc = tcase_create("stack");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_sem_million_queued_runs_small_stack);
    tcase_add_test(tc, test_sem_million_chained_runs_small_stack);
    tcase_add_test(tc, test_sem_million_acquire_release_small_stack);
    suite_add_tcase(s, tc);

    tc = tcase_create("allocation");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_sem_enomem_new);
    tcase_add_test(tc, test_sem_enomem_acquire);
    tcase_add_test(tc, test_sem_enomem_run);
    tcase_add_test(tc, test_sem_run_enomem_waiting_for_fn);
    suite_add_tcase(s, tc);

    return s;
}

TU_MAIN(sem_suite)
