/* SPDX-License-Identifier: MIT */
/* Check tests for the deferred queue (Twisted DeferredQueue). */
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
static int g_gotten[64];
static int g_ngotten;
static int g_destroyed[64];

static void setup(void)
{
    df_loop_options opts = DF_LOOP_OPTIONS_INIT;

    tu_fa_init(&g_fa, false);
    g_alloc = tu_fa_allocator(&g_fa);
    g_unhandled = 0;
    g_ngotten = 0;
    memset(g_destroyed, 0, sizeof g_destroyed);
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

/* Small integers travel as pointers: I(3) is the value 3. */
#define I(n) ((void *)(intptr_t)(n))

/* Twisted's gotten.append: records each value a get delivers. */
static df_result append_gotten(df_result r, void *arg)
{
    (void)arg;
    ck_assert_ptr_null(r.failure);
    ck_assert_int_lt(g_ngotten, 64);
    g_gotten[g_ngotten++] = (int)(intptr_t)r.value;
    return r;
}

/* Records what reaches a callback/errback pair, and handles it. */
typedef struct rec {
    int calls;
    int oks;
    int errs;
    int code;
    void *value;
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

/* Counts destructions per value: g_destroyed[i] for &g_destroyed[i]. */
static void destroy_counted(void *value)
{
    (*(int *)value)++;
}

static void assert_gotten(int n, const int *want)
{
    ck_assert_int_eq(g_ngotten, n);
    for (int i = 0; i < n; i++)
        ck_assert_int_eq(g_gotten[i], want[i]);
}

/* ------------------------------------------------------------ basic */

/* Twisted: OtherPrimitivesTests.test_queue */
START_TEST(test_queue_queue)
{
    enum { N = 2, M = 2 };
    df_queue *q;
    df_deferred *d, *gets[N + M];

    TU_OK(df_queue_new(L, N, M, &q));
    for (int i = 0; i < M; i++) {
        TU_OK(df_queue_get(q, &gets[i]));
        TU_OK(df_deferred_add_callback(gets[i], append_gotten, NULL));
    }
    TU_ERR(df_queue_get(q, &d), DF_EQUEUE_UNDERFLOW);

    for (int i = 0; i < M; i++) {
        TU_OK(df_queue_put(q, I(i), NULL));
        ck_assert_int_eq(g_ngotten, i + 1);
        ck_assert_int_eq(g_gotten[i], i);
    }
    for (int i = 0; i < N; i++) {
        TU_OK(df_queue_put(q, I(N + i), NULL));
        ck_assert_int_eq(g_ngotten, M);
    }
    TU_ERR(df_queue_put(q, NULL, NULL), DF_EQUEUE_OVERFLOW);

    g_ngotten = 0;
    for (int i = 0; i < N; i++) {
        TU_OK(df_queue_get(q, &gets[M + i]));
        TU_OK(df_deferred_add_callback(gets[M + i], append_gotten, NULL));
        ck_assert_int_eq(g_ngotten, i + 1);
        ck_assert_int_eq(g_gotten[i], N + i);
    }
    df_queue_free(q);
    for (int i = 0; i < N + M; i++)
        df_deferred_unref(gets[i]);

    /* No limits. */
    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    g_ngotten = 0;
    for (int i = 0; i < N; i++) {
        TU_OK(df_queue_get(q, &gets[i]));
        TU_OK(df_deferred_add_callback(gets[i], append_gotten, NULL));
    }
    for (int i = 0; i < N; i++)
        TU_OK(df_queue_put(q, I(i), NULL));
    assert_gotten(N, (const int[]){0, 1});
    df_queue_free(q);
    for (int i = 0; i < N; i++)
        df_deferred_unref(gets[i]);

    TU_OK(df_queue_new(L, 0, SIZE_MAX, &q));
    TU_ERR(df_queue_put(q, NULL, NULL), DF_EQUEUE_OVERFLOW);
    df_queue_free(q);

    TU_OK(df_queue_new(L, SIZE_MAX, 0, &q));
    TU_ERR(df_queue_get(q, &d), DF_EQUEUE_UNDERFLOW);
    df_queue_free(q);
}
END_TEST

START_TEST(test_queue_null_args)
{
    df_queue *q = NULL;
    df_deferred *d;

    TU_ERR(df_queue_new(NULL, 1, 1, &q), DF_EINVAL);
    TU_ERR(df_queue_new(L, 1, 1, NULL), DF_EINVAL);
    ck_assert_ptr_null(q);
    TU_ERR(df_queue_put(NULL, NULL, NULL), DF_EINVAL);
    TU_ERR(df_queue_get(NULL, &d), DF_EINVAL);
    TU_OK(df_queue_new(L, 1, 1, &q));
    TU_ERR(df_queue_get(q, NULL), DF_EINVAL);
    ck_assert_uint_eq(df_queue_size(NULL), 0);
    ck_assert_uint_eq(df_queue_waiting(NULL), 0);
    ck_assert_uint_eq(df_queue_waiting(q), 0);
    df_queue_free(NULL);
    df_queue_free(q);
}
END_TEST

typedef struct other_thread {
    df_loop *loop;
    df_queue *q;
    int rc_new, rc_put, rc_get;
} other_thread;

static void *other_thread_body(void *arg)
{
    other_thread *t = arg;
    df_queue *q2 = NULL;
    df_deferred *d = NULL;

    t->rc_new = df_queue_new(t->loop, 1, 1, &q2);
    t->rc_put = df_queue_put(t->q, &g_destroyed[0], destroy_counted);
    t->rc_get = df_queue_get(t->q, &d);
    df_queue_free(t->q); /* refused: prints one line and does nothing */
    return NULL;
}

START_TEST(test_queue_wrong_thread)
{
    other_thread t = {.loop = L};
    df_deferred *d;
    pthread_t th;

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &t.q));
    TU_OK(df_queue_put(t.q, I(7), NULL));
    ck_assert_int_eq(pthread_create(&th, NULL, other_thread_body, &t), 0);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    TU_ERR(t.rc_new, DF_EWRONG_THREAD);
    TU_ERR(t.rc_put, DF_EWRONG_THREAD);
    TU_ERR(t.rc_get, DF_EWRONG_THREAD);
    ck_assert_int_eq(g_destroyed[0], 0); /* the caller kept its value */
    /* Nothing changed, and the queue is still there. */
    ck_assert_uint_eq(df_queue_size(t.q), 1);
    TU_OK(df_queue_get(t.q, &d));
    TU_OK(df_deferred_add_callback(d, append_gotten, NULL));
    assert_gotten(1, (const int[]){7});
    df_queue_free(t.q);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_queue_values_fifo)
{
    df_queue *q;
    df_deferred *d;
    int want[40];

    /* Interleaved puts and gets make the ring wrap and grow. */
    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    int next_put = 0, next_get = 0;
    for (int round = 0; round < 8; round++) {
        for (int i = 0; i < 5; i++)
            TU_OK(df_queue_put(q, I(next_put++), NULL));
        for (int i = 0; i < 3 && next_get < 40; i++) {
            TU_OK(df_queue_get(q, &d));
            TU_OK(df_deferred_add_callback(d, append_gotten, NULL));
            df_deferred_unref(d);
            want[next_get] = next_get;
            next_get++;
        }
        ck_assert_uint_eq(df_queue_size(q), (size_t)(next_put - next_get));
    }
    while (next_get < next_put) {
        TU_OK(df_queue_get(q, &d));
        TU_OK(df_deferred_add_callback(d, append_gotten, NULL));
        df_deferred_unref(d);
        want[next_get] = next_get;
        next_get++;
    }
    assert_gotten(40, want);
    ck_assert_uint_eq(df_queue_size(q), 0);
    df_queue_free(q);
}
END_TEST

START_TEST(test_queue_bounded_ring_wraps)
{
    df_queue *q;
    df_deferred *d;

    TU_OK(df_queue_new(L, 4, SIZE_MAX, &q));
    for (int i = 0; i < 4; i++)
        TU_OK(df_queue_put(q, I(i), NULL));
    TU_ERR(df_queue_put(q, I(99), NULL), DF_EQUEUE_OVERFLOW);
    for (int i = 0; i < 2; i++) {
        TU_OK(df_queue_get(q, &d));
        TU_OK(df_deferred_add_callback(d, append_gotten, NULL));
        df_deferred_unref(d);
    }
    TU_OK(df_queue_put(q, I(4), NULL));
    TU_OK(df_queue_put(q, I(5), NULL));
    TU_ERR(df_queue_put(q, I(99), NULL), DF_EQUEUE_OVERFLOW);
    for (int i = 0; i < 4; i++) {
        TU_OK(df_queue_get(q, &d));
        TU_OK(df_deferred_add_callback(d, append_gotten, NULL));
        df_deferred_unref(d);
    }
    assert_gotten(6, (const int[]){0, 1, 2, 3, 4, 5});
    df_queue_free(q);
}
END_TEST

START_TEST(test_queue_getters_fifo)
{
    df_queue *q;
    df_deferred *d[5];

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    for (int i = 0; i < 5; i++) {
        TU_OK(df_queue_get(q, &d[i]));
        TU_OK(df_deferred_add_callback(d[i], append_gotten, NULL));
    }
    ck_assert_uint_eq(df_queue_waiting(q), 5);
    for (int i = 0; i < 5; i++) {
        TU_OK(df_queue_put(q, I(10 + i), NULL));
        ck_assert(df_deferred_called(d[i]));
        if (i + 1 < 5)
            ck_assert(!df_deferred_called(d[i + 1]));
    }
    assert_gotten(5, (const int[]){10, 11, 12, 13, 14});
    ck_assert_uint_eq(df_queue_waiting(q), 0);
    ck_assert_uint_eq(df_queue_size(q), 0);
    df_queue_free(q);
    for (int i = 0; i < 5; i++)
        df_deferred_unref(d[i]);
}
END_TEST

START_TEST(test_queue_overflow_caller_keeps_value)
{
    df_queue *q;

    TU_OK(df_queue_new(L, 1, SIZE_MAX, &q));
    TU_OK(df_queue_put(q, &g_destroyed[0], destroy_counted));
    TU_ERR(df_queue_put(q, &g_destroyed[1], destroy_counted),
           DF_EQUEUE_OVERFLOW);
    ck_assert_int_eq(g_destroyed[1], 0);
    ck_assert_uint_eq(df_queue_size(q), 1);
    df_queue_free(q);
    ck_assert_int_eq(g_destroyed[0], 1);
    ck_assert_int_eq(g_destroyed[1], 0);
}
END_TEST

START_TEST(test_queue_underflow)
{
    df_queue *q;
    df_deferred *a, *b;
    rec r = {0};

    TU_OK(df_queue_new(L, SIZE_MAX, 1, &q));
    TU_OK(df_queue_get(q, &a));
    TU_ERR(df_queue_get(q, &b), DF_EQUEUE_UNDERFLOW);
    ck_assert_uint_eq(df_queue_waiting(q), 1);
    /* A stored value is no pending get: the backlog does not apply. */
    TU_OK(df_queue_put(q, I(1), NULL));
    TU_OK(df_queue_put(q, I(2), NULL));
    TU_OK(df_queue_get(q, &b));
    TU_OK(df_deferred_add_both(b, rec_both, &r));
    ck_assert_ptr_eq(r.value, I(2));
    df_queue_free(q);
    df_deferred_unref(a);
    df_deferred_unref(b);
}
END_TEST

/* A full queue (here of size 0) still hands a value to a waiting get, as
 * Twisted's put() looks for a waiter first. */
START_TEST(test_queue_size_zero_hands_to_getter)
{
    df_queue *q;
    df_deferred *d;

    TU_OK(df_queue_new(L, 0, SIZE_MAX, &q));
    TU_OK(df_queue_get(q, &d));
    TU_OK(df_deferred_add_callback(d, append_gotten, NULL));
    TU_OK(df_queue_put(q, I(5), NULL));
    assert_gotten(1, (const int[]){5});
    TU_ERR(df_queue_put(q, I(6), NULL), DF_EQUEUE_OVERFLOW);
    df_queue_free(q);
    df_deferred_unref(d);
}
END_TEST

/* ------------------------------------------------------------ cancel */

/* Twisted: OtherPrimitivesTests.test_cancelQueueAfterSynchronousGet */
START_TEST(test_queue_cancel_after_synchronous_get)
{
    df_queue *q;
    df_deferred *d;
    rec r = {0};

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    TU_OK(df_queue_get(q, &d));
    TU_OK(df_deferred_add_errback(d, rec_both, &r));
    TU_OK(df_queue_put(q, NULL, NULL));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(r.errs, 0);
    df_queue_free(q);
    df_deferred_unref(d);
}
END_TEST

static df_result consume_failure(df_result r, void *arg)
{
    int *failures = arg;
    ck_assert_ptr_nonnull(r.failure);
    ck_assert_int_eq(df_failure_code(r.failure), DF_ECANCELLED);
    (*failures)++;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

static df_result assert_is_null(df_result r, void *arg)
{
    (void)arg;
    ck_assert_ptr_null(r.failure);
    ck_assert_ptr_null(r.value);
    return r;
}

/* If the cancelled get were still in the queue, this put would fire it a
 * second time. */
static df_result put_then_get(df_result r, void *arg)
{
    df_queue *q = arg;
    df_deferred *d;

    TU_OK(df_queue_put(q, NULL, NULL));
    TU_OK(df_queue_get(q, &d));
    TU_OK(df_deferred_add_callback(d, assert_is_null, NULL));
    df_result_clear(&r);
    return df_wait(d);
}

static df_result append_done(df_result r, void *arg)
{
    (*(int *)arg)++;
    return r;
}

/* Twisted: OtherPrimitivesTests.test_cancelQueueAfterGet */
START_TEST(test_queue_cancel_after_get)
{
    df_queue *q;
    df_deferred *d;
    int failures = 0, done = 0;

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    TU_OK(df_queue_get(q, &d));
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_add_errback(d, consume_failure, &failures));
    ck_assert_int_eq(failures, 1);
    ck_assert_uint_eq(df_queue_waiting(q), 0);

    TU_OK(df_deferred_add_callback(d, put_then_get, q));
    TU_OK(df_deferred_add_callback(d, append_done, &done));
    ck_assert_int_eq(done, 1);
    ck_assert_uint_eq(df_queue_size(q), 0);
    df_queue_free(q);
    df_deferred_unref(d);
}
END_TEST

START_TEST(test_queue_cancel_keeps_order)
{
    df_queue *q;
    df_deferred *d[3];
    int failures = 0;

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    for (int i = 0; i < 3; i++) {
        TU_OK(df_queue_get(q, &d[i]));
        TU_OK(df_deferred_add_callbacks(d[i], append_gotten, consume_failure,
                                        &failures));
    }
    TU_OK(df_deferred_cancel(d[1]));
    ck_assert_int_eq(failures, 1);
    ck_assert_uint_eq(df_queue_waiting(q), 2);
    TU_OK(df_queue_put(q, I(1), NULL));
    TU_OK(df_queue_put(q, I(2), NULL));
    assert_gotten(2, (const int[]){1, 2});
    ck_assert(df_deferred_called(d[0]) && df_deferred_called(d[2]));
    ck_assert_uint_eq(df_queue_size(q), 0);
    df_queue_free(q);
    for (int i = 0; i < 3; i++)
        df_deferred_unref(d[i]);
}
END_TEST

/* A get that a put has already paired with a value, while a callback of
 * the queue was running, has its value: a cancel then is too late, as
 * after Twisted's put(), and the get fires with the value. */
typedef struct late_cancel {
    df_queue *q;
    df_deferred *next;
} late_cancel;

static df_result put_then_cancel(df_result r, void *arg)
{
    late_cancel *lc = arg;
    TU_OK(df_queue_put(lc->q, I(2), NULL));
    ck_assert(!df_deferred_called(lc->next)); /* fired after we return */
    TU_OK(df_deferred_cancel(lc->next));
    ck_assert(df_deferred_called(lc->next));
    return r;
}

START_TEST(test_queue_cancel_after_handed_over)
{
    late_cancel lc;
    df_deferred *first;

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &lc.q));
    TU_OK(df_queue_get(lc.q, &first));
    TU_OK(df_deferred_add_callback(first, append_gotten, NULL));
    TU_OK(df_deferred_add_callback(first, put_then_cancel, &lc));
    TU_OK(df_queue_get(lc.q, &lc.next));
    TU_OK(df_deferred_add_callback(lc.next, append_gotten, NULL));
    TU_OK(df_queue_put(lc.q, I(1), NULL));
    assert_gotten(2, (const int[]){1, 2});
    ck_assert_uint_eq(df_queue_size(lc.q), 0);
    df_queue_free(lc.q);
    df_deferred_unref(first);
    df_deferred_unref(lc.next);
}
END_TEST

/* A pending get given a deadline leaves the line when it expires and
 * fails with DF_ETIMEDOUT; a later put is stored, not given to it. */
START_TEST(test_queue_get_timeout)
{
    df_queue *q;
    df_deferred *d;
    rec r = {0};

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    TU_OK(df_queue_get(q, &d));
    TU_OK(df_deferred_set_timeout(d, 1000000)); /* 1 ms */
    TU_OK(df_deferred_add_both(d, rec_both, &r));
    TU_OK(df_loop_run_until(L, d));
    ck_assert_int_eq(r.errs, 1);
    ck_assert_int_eq(r.code, DF_ETIMEDOUT);
    ck_assert_uint_eq(df_queue_waiting(q), 0);
    TU_OK(df_queue_put(q, &g_destroyed[0], destroy_counted));
    ck_assert_uint_eq(df_queue_size(q), 1);
    df_queue_free(q);
    ck_assert_int_eq(g_destroyed[0], 1);
    df_deferred_unref(d);
}
END_TEST

/* The application may drop a pending get: the value it then receives is
 * destroyed once, with the deferred. */
START_TEST(test_queue_unref_pending_get)
{
    df_queue *q;
    df_deferred *d;

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    TU_OK(df_queue_get(q, &d));
    df_deferred_unref(d);
    ck_assert_uint_eq(df_queue_waiting(q), 1);
    TU_OK(df_queue_put(q, &g_destroyed[0], destroy_counted));
    ck_assert_int_eq(g_destroyed[0], 1);
    ck_assert_uint_eq(df_queue_waiting(q), 0);
    ck_assert_uint_eq(df_queue_size(q), 0);
    df_queue_free(q);
    ck_assert_int_eq(g_destroyed[0], 1);
}
END_TEST

/* ------------------------------------------------------------ free */

START_TEST(test_queue_free_fails_pending_gets)
{
    df_queue *q;
    df_deferred *d[3];
    rec r = {0};

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    for (int i = 0; i < 3; i++) {
        TU_OK(df_queue_get(q, &d[i]));
        TU_OK(df_deferred_add_both(d[i], rec_both, &r));
    }
    df_queue_free(q);
    ck_assert_int_eq(r.errs, 3);
    ck_assert_int_eq(r.code, DF_ECANCELLED);
    for (int i = 0; i < 3; i++)
        df_deferred_unref(d[i]);
}
END_TEST

/* Each value is destroyed exactly once: by the queue if it is still held
 * when the queue goes, else with the deferred that delivered it. */
START_TEST(test_queue_destructors_once)
{
    df_queue *q;
    df_deferred *d[2];

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    for (int i = 0; i < 5; i++)
        TU_OK(df_queue_put(q, &g_destroyed[i], destroy_counted));
    for (int i = 0; i < 2; i++)
        TU_OK(df_queue_get(q, &d[i]));
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(g_destroyed[i], 0);
    df_queue_free(q);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(g_destroyed[i], i < 2 ? 0 : 1);
    for (int i = 0; i < 2; i++)
        df_deferred_unref(d[i]);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(g_destroyed[i], 1);
}
END_TEST

/* A get's callback may free the queue.  A get already paired with a value
 * still receives it; the others fail; puts and gets made while the queue
 * is going away are refused. */
typedef struct freeing {
    df_queue *q;
    int refused;
} freeing;

static df_result put_then_free(df_result r, void *arg)
{
    freeing *f = arg;
    TU_OK(df_queue_put(f->q, I(2), NULL));
    df_queue_free(f->q);
    return r;
}

static df_result try_queue_in_errback(df_result r, void *arg)
{
    freeing *f = arg;
    df_deferred *d;

    ck_assert_ptr_nonnull(r.failure);
    ck_assert_int_eq(df_failure_code(r.failure), DF_ECANCELLED);
    TU_ERR(df_queue_put(f->q, &g_destroyed[0], destroy_counted), DF_ESTATE);
    TU_ERR(df_queue_get(f->q, &d), DF_ESTATE);
    f->refused++;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

START_TEST(test_queue_free_in_get_callback)
{
    freeing f = {0};
    df_deferred *d[3];

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &f.q));
    TU_OK(df_queue_get(f.q, &d[0]));
    TU_OK(df_deferred_add_callback(d[0], append_gotten, NULL));
    TU_OK(df_deferred_add_callback(d[0], put_then_free, &f));
    TU_OK(df_queue_get(f.q, &d[1]));
    TU_OK(df_deferred_add_callback(d[1], append_gotten, NULL));
    TU_OK(df_queue_get(f.q, &d[2]));
    TU_OK(df_deferred_add_errback(d[2], try_queue_in_errback, &f));
    TU_OK(df_queue_put(f.q, I(1), NULL)); /* the queue is gone after this */
    assert_gotten(2, (const int[]){1, 2});
    ck_assert_int_eq(f.refused, 1);
    ck_assert_int_eq(g_destroyed[0], 0);
    for (int i = 0; i < 3; i++)
        df_deferred_unref(d[i]);
}
END_TEST

/* ------------------------------------------------------------ stack */

/*
 * 10^6 pending gets whose callbacks each put the next value: Twisted's
 * put() would nest one frame per get.  The body runs on a thread with a
 * 256 KiB stack, makes its own loop (a loop belongs to its thread), and
 * records problems instead of asserting; the test asserts after the join.
 */
enum { MILLION = 1000000 };

typedef struct big {
    df_queue *q;
    long delivered;
    long out_of_order;
    long next;
    int errors;
    bool done;
} big;

static df_result big_get_then_put(df_result r, void *arg)
{
    big *b = arg;
    if (r.failure != NULL || (intptr_t)r.value != b->delivered)
        b->out_of_order++;
    b->delivered++;
    df_result_clear(&r);
    if (b->next < MILLION && df_queue_put(b->q, I(b->next++), NULL) != 0)
        b->errors++;
    return df_ok(NULL, NULL);
}

static void *million_getters(void *arg)
{
    big *b = arg;
    df_loop *loop;
    df_deferred *d;

    if (df_loop_new(NULL, &loop) != 0) {
        b->errors++;
        return NULL;
    }
    if (df_queue_new(loop, 0, SIZE_MAX, &b->q) != 0) {
        b->errors++;
        return NULL;
    }
    for (long i = 0; i < MILLION; i++) {
        if (df_queue_get(b->q, &d) != 0 ||
            df_deferred_add_both(d, big_get_then_put, b) != 0)
            b->errors++;
        df_deferred_unref(d);
    }
    b->next = 1;
    if (df_queue_put(b->q, I(0), NULL) != 0) /* all 10^6 from here */
        b->errors++;
    if (b->delivered != MILLION || b->out_of_order != 0 ||
        df_queue_waiting(b->q) != 0 || df_queue_size(b->q) != 0)
        b->errors++;
    df_queue_free(b->q);
    if (df_loop_free(loop) != 0)
        b->errors++;
    b->done = true;
    return NULL;
}

START_TEST(test_queue_million_getters_small_stack)
{
    big b = {0};
    pthread_attr_t attr;
    pthread_t th;

    ck_assert_int_eq(pthread_attr_init(&attr), 0);
    ck_assert_int_eq(pthread_attr_setstacksize(&attr, 256 * 1024), 0);
    ck_assert_int_eq(pthread_create(&th, &attr, million_getters, &b), 0);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    pthread_attr_destroy(&attr);
    ck_assert_int_eq(b.errors, 0);
    ck_assert(b.done);
}
END_TEST

/* ------------------------------------------------------------ allocation */

START_TEST(test_queue_enomem_new)
{
    df_queue *q = NULL;

    fail_after(0);
    TU_ERR(df_queue_new(L, 1, 1, &q), DF_ENOMEM);
    fail_after(-1);
    ck_assert_ptr_null(q);
}
END_TEST

START_TEST(test_queue_enomem_put)
{
    df_queue *q;
    df_deferred *d;

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    fail_after(0);
    TU_ERR(df_queue_put(q, &g_destroyed[0], destroy_counted), DF_ENOMEM);
    fail_after(-1);
    ck_assert_int_eq(g_destroyed[0], 0); /* the caller keeps it */
    ck_assert_uint_eq(df_queue_size(q), 0);

    /* Growth of a full ring fails without losing what it holds. */
    for (int i = 0; i < 8; i++)
        TU_OK(df_queue_put(q, &g_destroyed[1 + i], destroy_counted));
    fail_after(0);
    TU_ERR(df_queue_put(q, &g_destroyed[9], destroy_counted), DF_ENOMEM);
    fail_after(-1);
    ck_assert_uint_eq(df_queue_size(q), 8);
    TU_OK(df_queue_put(q, &g_destroyed[9], destroy_counted));
    TU_OK(df_queue_get(q, &d));
    void *value = NULL;
    TU_OK(df_deferred_peek(d, &value, NULL));
    ck_assert_ptr_eq(value, &g_destroyed[1]);
    df_deferred_unref(d);
    df_queue_free(q);
    for (int i = 1; i <= 9; i++)
        ck_assert_int_eq(g_destroyed[i], 1);
    ck_assert_int_eq(g_destroyed[0], 0);
}
END_TEST

START_TEST(test_queue_enomem_get)
{
    df_queue *q;
    df_deferred *d = NULL;
    long live, n;
    int rc;

    TU_OK(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q));
    /* A pending get: the node and the deferred may fail. */
    live = atomic_load(&g_fa.live);
    for (n = 0;; n++) {
        fail_after(n);
        rc = df_queue_get(q, &d);
        fail_after(-1);
        if (rc == 0)
            break;
        TU_ERR(rc, DF_ENOMEM);
        ck_assert_uint_eq(df_queue_waiting(q), 0);
        ck_assert_int_eq(atomic_load(&g_fa.live), live);
    }
    ck_assert_int_ge(n, 2);
    TU_OK(df_queue_put(q, I(1), NULL));
    ck_assert(df_deferred_called(d));
    df_deferred_unref(d);

    /* A get served from a stored value: the value stays stored.  The
     * loop carves deferreds from slabs; hold deferreds until the slab is
     * full (a new one fails), so that the next deferred needs a real
     * allocation. */
    enum { HOLD_MAX = 1024 };
    static df_deferred *hold[HOLD_MAX];
    size_t held = 0;
    for (;;) {
        ck_assert_uint_lt(held, HOLD_MAX);
        fail_after(0);
        rc = df_deferred_new(L, &hold[held]);
        fail_after(-1);
        if (rc != 0)
            break;
        held++;
    }
    TU_ERR(rc, DF_ENOMEM);
    TU_OK(df_queue_put(q, &g_destroyed[0], destroy_counted));
    fail_after(0);
    TU_ERR(df_queue_get(q, &d), DF_ENOMEM);
    fail_after(-1);
    ck_assert_uint_eq(df_queue_size(q), 1);
    ck_assert_int_eq(g_destroyed[0], 0);
    while (held > 0)
        df_deferred_unref(hold[--held]);
    df_queue_free(q);
    ck_assert_int_eq(g_destroyed[0], 1);
}
END_TEST

/* ------------------------------------------------------------ suite */

static Suite *queue_suite(void)
{
    Suite *s = suite_create("queue");
    TCase *tc;

    tc = tcase_create("basic");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_queue_queue);
    tcase_add_test(tc, test_queue_null_args);
    tcase_add_test(tc, test_queue_wrong_thread);
    tcase_add_test(tc, test_queue_values_fifo);
    tcase_add_test(tc, test_queue_bounded_ring_wraps);
    tcase_add_test(tc, test_queue_getters_fifo);
    tcase_add_test(tc, test_queue_overflow_caller_keeps_value);
    tcase_add_test(tc, test_queue_underflow);
    tcase_add_test(tc, test_queue_size_zero_hands_to_getter);
    suite_add_tcase(s, tc);

    tc = tcase_create("cancel");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_queue_cancel_after_synchronous_get);
    tcase_add_test(tc, test_queue_cancel_after_get);
    tcase_add_test(tc, test_queue_cancel_keeps_order);
    tcase_add_test(tc, test_queue_cancel_after_handed_over);
    tcase_add_test(tc, test_queue_unref_pending_get);
    tcase_add_test(tc, test_queue_get_timeout);
    suite_add_tcase(s, tc);

    tc = tcase_create("free");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_queue_free_fails_pending_gets);
    tcase_add_test(tc, test_queue_destructors_once);
    tcase_add_test(tc, test_queue_free_in_get_callback);
    suite_add_tcase(s, tc);

    tc = tcase_create("stack");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_queue_million_getters_small_stack);
    suite_add_tcase(s, tc);

    tc = tcase_create("allocation");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_queue_enomem_new);
    tcase_add_test(tc, test_queue_enomem_put);
    tcase_add_test(tc, test_queue_enomem_get);
    suite_add_tcase(s, tc);

    return s;
}

TU_MAIN(queue_suite)
