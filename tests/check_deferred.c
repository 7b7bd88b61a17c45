/* SPDX-License-Identifier: MIT */
/* Check tests for df_deferred, ported behaviour by behaviour from Twisted. */
#include <check.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

/*
 * Most tests port one test of Twisted 22.4's twisted/test/test_defer.py
 * and name it in a comment.  Where libdeferred departs from Twisted on
 * purpose (C has no garbage collector, no exceptions, and a small stack),
 * the comment says "Departure" and why.
 *
 * Every test runs against a fresh loop `L` whose allocator counts live
 * blocks and can be told to fail, and whose unhandled-failure hook counts
 * reports.  The teardown checks that every block and every value made by
 * the test was freed exactly once.
 */

/* ------------------------------------------------------------ allocator */

/* The counting allocator of testutil.h. */
typedef tu_counting_alloc counting_alloc;
#define ca_malloc tu_ca_malloc
#define ca_realloc tu_ca_realloc
#define ca_free tu_ca_free

static counting_alloc g_ca;
static const df_allocator g_allocator = {ca_malloc, ca_realloc, ca_free,
                                         &g_ca};

/* ------------------------------------------------------ fixture, hooks */

static df_loop *L;

/* Unhandled-failure reports made through the hook. */
static int g_unhandled;
static int g_unhandled_code;
static char g_unhandled_msg[128];

static void count_unhandled(df_failure *f, void *arg)
{
    int *count = arg;
    (*count)++;
    g_unhandled_code = df_failure_code(f);
    snprintf(g_unhandled_msg, sizeof g_unhandled_msg, "%s",
             df_failure_message(f));
}

/* Values: heap ints whose destructor counts its calls. */
static int g_box_live;
static int g_box_frees;

static int *box(int v)
{
    int *p = malloc(sizeof *p);
    ck_assert_ptr_nonnull(p);
    *p = v;
    g_box_live++;
    return p;
}

static void box_free(void *p)
{
    g_box_live--;
    g_box_frees++;
    free(p);
}

static int box_val(const void *p)
{
    return p != NULL ? *(const int *)p : -1;
}

/* Failure payloads whose destructor counts its calls. */
static int g_payload_frees;

static void payload_free(void *p)
{
    (void)p;
    g_payload_frees++;
}

/* An ordered record of what ran, to check order and nesting. */
#define LOG_MAX 64
static int g_log[LOG_MAX];
static size_t g_nlog;

static void log_push(int v)
{
    if (g_nlog < LOG_MAX)
        g_log[g_nlog] = v;
    g_nlog++;
}

static void assert_log(const int *want, size_t n, int line)
{
    ck_assert_msg(g_nlog == n, "line %d: log has %zu entries, want %zu",
                  line, g_nlog, n);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(g_log[i] == want[i], "line %d: log[%zu] is %d, want %d",
                      line, i, g_log[i], want[i]);
}

#define ASSERT_LOG(...)                                                        \
    do {                                                                       \
        const int want_[] = {__VA_ARGS__};                                     \
        assert_log(want_, sizeof want_ / sizeof want_[0], __LINE__);           \
    } while (0)
#define ASSERT_LOG_EMPTY() assert_log(NULL, 0, __LINE__)

/* Runs fn() in a forked child and asserts that it returned 0 there.  For
 * calls that may crash the process, so that a crash is reported as this
 * test's failure even with CK_FORK=no. */
static void expect_in_child(int (*fn)(void), const char *what)
{
    int status;
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ne(pid, -1);
    if (pid == 0)
        _exit(fn());
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(!WIFSIGNALED(status), "%s: killed by signal %d", what,
                  WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "%s: wrong result or crash (child exit status %d)", what,
                  WEXITSTATUS(status));
}

static void setup(void)
{
    atomic_store(&g_ca.live, 0);
    atomic_store(&g_ca.fail, 0);
    g_unhandled = 0;
    g_unhandled_code = 0;
    g_unhandled_msg[0] = '\0';
    g_box_live = 0;
    g_box_frees = 0;
    g_payload_frees = 0;
    g_nlog = 0;

    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    o.allocator = &g_allocator;
    o.unhandled = count_unhandled;
    o.unhandled_arg = &g_unhandled;
    L = NULL;
    TU_OK(df_loop_new(&o, &L));
}

static void teardown(void)
{
    atomic_store(&g_ca.fail, 0);
    ck_assert_uint_eq(df_loop_unhandled_count(L), (uint64_t)g_unhandled);
    TU_OK(df_loop_free(L));
    L = NULL;
    ck_assert_msg(atomic_load(&g_ca.live) == 0, "%ld blocks leaked",
                  (long)atomic_load(&g_ca.live));
    ck_assert_msg(g_box_live == 0, "%d values never destroyed", g_box_live);
}

/* ---------------------------------------------------------- callbacks */

/* Records what reached a callback/errback pair. */
typedef struct probe {
    int tag;          /* pushed on the log when called (0: not logged) */
    int cb_calls;
    int eb_calls;
    void *value;      /* value seen by the callback */
    int ival;         /* the int it held (values are boxes), or -1 */
    int code;         /* failure code seen by the errback */
    char msg[64];     /* and its message */
} probe;

static df_result probe_cb(df_result r, void *arg)
{
    probe *p = arg;
    p->cb_calls++;
    p->value = r.value;
    p->ival = box_val(r.value);
    if (p->tag != 0)
        log_push(p->tag);
    return r;
}

static df_result probe_eb(df_result r, void *arg)
{
    probe *p = arg;
    p->eb_calls++;
    p->code = df_failure_code(r.failure);
    snprintf(p->msg, sizeof p->msg, "%s", df_failure_message(r.failure));
    if (p->tag != 0)
        log_push(-p->tag);
    return r;
}

/* Same, but handles the failure: the chain goes on with df_ok(NULL). */
static df_result probe_eb_handle(df_result r, void *arg)
{
    r = probe_eb(r, arg);
    df_result_clear(&r);
    return r;
}

/* Adds a pass-through probe pair. */
static void add_probe(df_deferred *d, probe *p)
{
    TU_OK(df_deferred_add_callbacks(d, probe_cb, probe_eb, p));
}

/* Adds a probe pair whose errback handles the failure. */
static void add_probe_handle(df_deferred *d, probe *p)
{
    TU_OK(df_deferred_add_callbacks(d, probe_cb, probe_eb_handle, p));
}

/* Pushes arg (an int) on the log and passes the result on. */
static df_result cb_log(df_result r, void *arg)
{
    log_push((int)(intptr_t)arg);
    return r;
}

/* Fails with code arg, dropping its input. */
static df_result cb_fail(df_result r, void *arg)
{
    df_result_clear(&r);
    return df_errf(L, (int)(intptr_t)arg, "callback failed");
}

/* Recovers with a new value box(arg), dropping its input. */
static df_result cb_value(df_result r, void *arg)
{
    df_result_clear(&r);
    return df_ok(box((int)(intptr_t)arg), box_free);
}

/* Waits for arg, a reference the entry owns and hands over. */
static df_result cb_wait(df_result r, void *arg)
{
    df_result_clear(&r);
    return df_wait(arg);
}

/* Waits for arg, which it borrows. */
static df_result cb_wait_ref(df_result r, void *arg)
{
    df_result_clear(&r);
    return df_wait(df_deferred_ref(arg));
}

/* A failure with code `code`, message `msg` and a counted payload. */
static df_failure *failure(int code, const char *msg)
{
    return df_failure_new_payload(L, code, &g_payload_frees, payload_free,
                                  "%s", msg);
}

/* A canceller that counts its calls in *(int *)arg. */
static void count_canceller(df_deferred *d, void *arg)
{
    (void)d;
    (*(int *)arg)++;
}

/* Programmable pair: logs +tag on the callback side and -tag on the
 * errback side, then passes, fails, or recovers. */
enum { STEP_PASS, STEP_FAIL, STEP_RECOVER };
typedef struct step {
    int tag;
    int action;
} step;

static df_result step_fn(df_result r, void *arg)
{
    const step *s = arg;
    log_push(r.failure != NULL ? -s->tag : s->tag);
    switch (s->action) {
    case STEP_FAIL:
        df_result_clear(&r);
        return df_errf(L, -1000 - s->tag, "step %d failed", s->tag);
    case STEP_RECOVER:
        df_result_clear(&r);
        return df_ok(NULL, NULL);
    default:
        return r;
    }
}

/* ============================================================= chain */

/* Twisted: DeferredTests.testCallbackWithoutArgs */
START_TEST(test_deferred_callback_without_args)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe(d, &p);
    int *v = box(7);
    TU_OK(df_deferred_callback(d, v, box_free));
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(p.eb_calls, 0);
    ck_assert_ptr_eq(p.value, v);
    ck_assert_int_eq(g_box_live, 1); /* the chain still owns it */
    df_deferred_unref(d);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

static void *g_seen_arg;
static df_result cb_store_arg(df_result r, void *arg)
{
    g_seen_arg = arg;
    return r;
}

/* Twisted: DeferredTests.testCallbackWithArgs (the user pointer). */
START_TEST(test_deferred_callback_with_args)
{
    df_deferred *d;
    int world = 0;
    g_seen_arg = NULL;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_store_arg, &world));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_ptr_eq(g_seen_arg, &world);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredTests.testTwoCallbacks */
START_TEST(test_deferred_two_callbacks)
{
    df_deferred *d;
    probe p1 = {.tag = 1}, p2 = {.tag = 2};
    TU_OK(df_deferred_new(L, &d));
    add_probe(d, &p1);
    add_probe(d, &p2);
    int *v = box(1);
    TU_OK(df_deferred_callback(d, v, box_free));
    ck_assert_ptr_eq(p1.value, v);
    ck_assert_ptr_eq(p2.value, v);
    ck_assert_int_eq(p1.eb_calls + p2.eb_calls, 0);
    ASSERT_LOG(1, 2);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredTests.test_addCallbacksNoneErrback */
START_TEST(test_deferred_null_errback_passes_through)
{
    df_deferred *d;
    probe p1 = {0}, p2 = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callbacks(d, probe_cb, NULL, &p1));
    TU_OK(df_deferred_errback(d, failure(-1234, "oopsie")));
    TU_OK(df_deferred_add_errback(d, probe_eb_handle, &p2));
    ck_assert_int_eq(p1.cb_calls, 0);
    ck_assert_int_eq(p2.eb_calls, 1);
    ck_assert_int_eq(p2.code, -1234);
    ck_assert_str_eq(p2.msg, "oopsie");
    ck_assert_int_eq(g_payload_frees, 1); /* handled and dropped */
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_addCallbacksNoneCallbackArgs (mirror: a
 * NULL callback passes a success through to the next pair). */
START_TEST(test_deferred_null_callback_passes_through)
{
    df_deferred *d;
    probe p1 = {0}, p2 = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callbacks(d, NULL, probe_eb, &p1));
    int *v = box(3);
    TU_OK(df_deferred_callback(d, v, box_free));
    add_probe(d, &p2);
    ck_assert_int_eq(p1.eb_calls, 0);
    ck_assert_int_eq(p2.cb_calls, 1);
    ck_assert_ptr_eq(p2.value, v);
    df_deferred_unref(d);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Twisted: DeferredTests.testCallbackErrors (a callback that fails
 * switches the chain to the errback side; it owns and drops its input). */
START_TEST(test_deferred_callback_failure_switches_side)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_fail, (void *)(intptr_t)-77));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_callback(d, box(1), box_free));
    ck_assert_int_eq(g_box_frees, 1); /* cb_fail dropped its input */
    ck_assert_int_eq(p.cb_calls, 0);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -77);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: no dedicated test; Deferred._runCallbacks: an errback that
 * returns a value puts the chain back on the callback side. */
START_TEST(test_deferred_errback_recovers)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_errback(d, cb_value, (void *)(intptr_t)42));
    add_probe(d, &p);
    TU_OK(df_deferred_errback(d, failure(-5, "bad")));
    ck_assert_int_eq(g_payload_frees, 1); /* the errback dropped it */
    ck_assert_int_eq(p.eb_calls, 0);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(box_val(p.value), 42);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Twisted: no dedicated test; the addCallbacks contract used throughout
 * DeferredTests: exactly one function of each pair runs, on the side the
 * chain is on when the pair is reached. */
START_TEST(test_deferred_exactly_one_of_pair)
{
    static const step s[] = {{1, STEP_PASS},
                             {2, STEP_FAIL},
                             {3, STEP_PASS},
                             {4, STEP_RECOVER},
                             {5, STEP_PASS}};
    df_deferred *d;
    probe p = {0};

    TU_OK(df_deferred_new(L, &d));
    for (size_t i = 0; i < 5; i++)
        TU_OK(df_deferred_add_callbacks(d, step_fn, step_fn,
                                        (void *)&s[i]));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ASSERT_LOG(1, 2, -3, -4, 5);
    df_deferred_unref(d);

    g_nlog = 0;
    TU_OK(df_deferred_new(L, &d));
    for (size_t i = 0; i < 5; i++)
        TU_OK(df_deferred_add_callbacks(d, step_fn, step_fn,
                                        (void *)&s[i]));
    add_probe(d, &p);
    TU_OK(df_deferred_errback(d, failure(-9, "start on the error side")));
    ASSERT_LOG(-1, -2, -3, -4, 5);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(g_payload_frees, 1);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: no dedicated test; df_deferred_resolve fires on the side its
 * result says. */
START_TEST(test_deferred_resolve_sides)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    int *v = box(4);
    TU_OK(df_deferred_resolve(d, df_ok(v, box_free)));
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(d);

    memset(&p, 0, sizeof p);
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_resolve(d, df_err(failure(-8, "resolved"))));
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -8);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_int_eq(g_payload_frees, 1);
}
END_TEST

/* ============================================================= fired */

/* Twisted: DeferredTests.testImmediateSuccess */
START_TEST(test_deferred_immediate_success)
{
    df_deferred *d;
    probe p = {0};
    int *v = box(5);
    TU_OK(df_succeed(L, v, box_free, &d));
    ck_assert(df_deferred_called(d));
    add_probe(d, &p);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(d);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Twisted: DeferredTests.testImmediateFailure */
START_TEST(test_deferred_immediate_failure)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_fail(L, failure(-6, "fail"), &d));
    ck_assert(df_deferred_called(d));
    add_probe_handle(d, &p);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -6);
    ck_assert_str_eq(p.msg, "fail");
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_int_eq(g_payload_frees, 1);
}
END_TEST

/* Twisted: no dedicated test (used by most DeferredTests): callbacks added
 * to a fired deferred run before add returns. */
START_TEST(test_deferred_add_after_fire_runs_at_once)
{
    df_deferred *d;
    probe p1 = {.tag = 1}, p2 = {.tag = 2};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_callback(d, box(1), box_free));
    add_probe(d, &p1);
    ASSERT_LOG(1);
    add_probe(d, &p2);
    ASSERT_LOG(1, 2);
    df_deferred_unref(d);
}
END_TEST

static df_result cb_add_log3(df_result r, void *arg)
{
    log_push(1);
    TU_OK(df_deferred_add_callback(arg, cb_log, (void *)(intptr_t)3));
    return r;
}

/* Twisted: DeferredTests.test_reentrantRunCallbacks */
START_TEST(test_deferred_reentrant_run_callbacks)
{
    df_deferred *d;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_add_log3, d));
    TU_OK(df_deferred_add_callback(d, cb_log, (void *)(intptr_t)2));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ASSERT_LOG(1, 2, 3);
    df_deferred_unref(d);
}
END_TEST

static size_t g_log_len_after_add;
static df_result cb_add_log2(df_result r, void *arg)
{
    log_push(1);
    TU_OK(df_deferred_add_callback(arg, cb_log, (void *)(intptr_t)2));
    g_log_len_after_add = g_nlog; /* must still be 1: not nested */
    return r;
}

/* Twisted: DeferredTests.test_nonReentrantCallbacks */
START_TEST(test_deferred_non_reentrant_callbacks)
{
    df_deferred *d;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_add_log2, d));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_uint_eq(g_log_len_after_add, 1);
    ASSERT_LOG(1, 2);

    /* Same from a deferred fired before the callback was added. */
    g_nlog = 0;
    g_log_len_after_add = 0;
    TU_OK(df_deferred_add_callback(d, cb_add_log2, d));
    ck_assert_uint_eq(g_log_len_after_add, 1);
    ASSERT_LOG(1, 2);
    df_deferred_unref(d);
}
END_TEST

static df_result cb_add_fail(df_result r, void *arg)
{
    TU_OK(df_deferred_add_callback(arg, cb_fail, (void *)(intptr_t)-31));
    return r;
}

/* Twisted: DeferredTests.test_reentrantRunCallbacksWithFailure */
START_TEST(test_deferred_reentrant_run_callbacks_with_failure)
{
    df_deferred *d;
    df_failure *f = NULL;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_add_fail, d));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    TU_OK(df_deferred_peek(d, NULL, &f));
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(df_failure_code(f), -31);
    add_probe_handle(d, &p);
    ck_assert_int_eq(p.eb_calls, 1);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* ======================================================= AlreadyCalled */

/* Twisted: AlreadyCalledTests.testAlreadyCalled_CC (departure: the
 * refused value stays the caller's, and the result does not change). */
START_TEST(test_deferred_already_called_cc)
{
    df_deferred *d;
    probe p = {0};
    void *v = NULL;
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    int *v1 = box(1), *v2 = box(2);
    TU_OK(df_deferred_callback(d, v1, box_free));
    TU_ERR(df_deferred_callback(d, v2, box_free), DF_EALREADY_CALLED);
    ck_assert_int_eq(g_box_frees, 0); /* v2 not taken, v1 still held */
    TU_OK(df_deferred_peek(d, &v, NULL));
    ck_assert_ptr_eq(v, v1);
    ck_assert_int_eq(p.cb_calls, 1);
    box_free(v2);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: AlreadyCalledTests.testAlreadyCalled_CE */
START_TEST(test_deferred_already_called_ce)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_callback(d, box(1), box_free));
    df_failure *f = failure(-2, "twice");
    TU_ERR(df_deferred_errback(d, f), DF_EALREADY_CALLED);
    ck_assert_int_eq(g_payload_frees, 0); /* f is still ours */
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(p.eb_calls, 0);
    df_failure_unref(f);
    ck_assert_int_eq(g_payload_frees, 1);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: AlreadyCalledTests.testAlreadyCalled_EE */
START_TEST(test_deferred_already_called_ee)
{
    df_deferred *d;
    df_failure *cur = NULL;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_errback(d, failure(-1, "first")));
    df_failure *f = failure(-2, "second");
    TU_ERR(df_deferred_errback(d, f), DF_EALREADY_CALLED);
    ck_assert_int_eq(g_payload_frees, 0);
    TU_OK(df_deferred_peek(d, NULL, &cur));
    ck_assert_int_eq(df_failure_code(cur), -1);
    df_failure_unref(f);
    add_probe_handle(d, &p);
    ck_assert_int_eq(p.code, -1);
    df_deferred_unref(d);
    ck_assert_int_eq(g_payload_frees, 2);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: AlreadyCalledTests.testAlreadyCalled_EC */
START_TEST(test_deferred_already_called_ec)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_errback(d, failure(-1, "first")));
    int *v = box(2);
    TU_ERR(df_deferred_callback(d, v, box_free), DF_EALREADY_CALLED);
    TU_ERR(df_deferred_resolve(d, df_ok(v, box_free)), DF_EALREADY_CALLED);
    ck_assert_int_eq(g_box_frees, 0);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.cb_calls, 0);
    box_free(v);
    df_deferred_unref(d);
}
END_TEST

/* ========================================================= implicit */

/* Twisted: DeferredTests.test_synchronousImplicitChain (the inner's result
 * moves to the outer; the inner goes on with df_ok(NULL, NULL)). */
START_TEST(test_deferred_synchronous_implicit_chain)
{
    df_deferred *first, *second;
    probe p1 = {0}, p2 = {0};
    int *v = box(11);
    TU_OK(df_succeed(L, v, box_free, &first));
    TU_OK(df_deferred_new(L, &second));
    TU_OK(df_deferred_add_callback(second, cb_wait_ref, first));
    TU_OK(df_deferred_callback(second, NULL, NULL));
    add_probe(first, &p1);
    ck_assert_int_eq(p1.cb_calls, 1);
    ck_assert_ptr_null(p1.value);
    add_probe(second, &p2);
    ck_assert_int_eq(p2.cb_calls, 1);
    ck_assert_ptr_eq(p2.value, v);
    df_deferred_unref(first);
    ck_assert_int_eq(g_box_frees, 0); /* moved to second */
    df_deferred_unref(second);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Twisted: DeferredTests.test_asynchronousImplicitChain */
START_TEST(test_deferred_asynchronous_implicit_chain)
{
    df_deferred *first, *second;
    probe p1 = {0}, p2 = {0};
    TU_OK(df_deferred_new(L, &first));
    TU_OK(df_deferred_new(L, &second));
    TU_OK(df_deferred_add_callback(second, cb_wait_ref, first));
    TU_OK(df_deferred_callback(second, NULL, NULL));
    add_probe(first, &p1);
    add_probe(second, &p2);
    ck_assert_int_eq(p1.cb_calls + p2.cb_calls, 0);
    ck_assert(df_deferred_paused(second));
    TU_ERR(df_deferred_peek(second, NULL, NULL), DF_ENOT_CALLED);

    int *v = box(12);
    TU_OK(df_deferred_callback(first, v, box_free));
    ck_assert_int_eq(p1.cb_calls, 1);
    ck_assert_ptr_null(p1.value);
    ck_assert_int_eq(p2.cb_calls, 1);
    ck_assert_ptr_eq(p2.value, v);
    ck_assert(!df_deferred_paused(second));
    df_deferred_unref(second);
    ck_assert_int_eq(g_box_frees, 1);
    df_deferred_unref(first);
}
END_TEST

/* Twisted: DeferredTests.test_synchronousImplicitErrorChain (and nothing
 * is reported as unhandled for the inner one). */
START_TEST(test_deferred_synchronous_implicit_error_chain)
{
    df_deferred *first, *second;
    df_failure *f = NULL;
    probe p1 = {0}, p2 = {0};
    TU_OK(df_fail(L, failure(-21, "first's failure"), &first));
    TU_OK(df_deferred_new(L, &second));
    TU_OK(df_deferred_add_callback(second, cb_wait_ref, first));
    TU_OK(df_deferred_callback(second, NULL, NULL));
    add_probe(first, &p1);
    ck_assert_int_eq(p1.cb_calls, 1);
    ck_assert_ptr_null(p1.value);
    TU_OK(df_deferred_peek(second, NULL, &f));
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(df_failure_code(f), -21);
    add_probe_handle(second, &p2);
    ck_assert_int_eq(p2.eb_calls, 1);
    df_deferred_unref(first);
    df_deferred_unref(second);
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_int_eq(g_payload_frees, 1);
}
END_TEST

/* Twisted: DeferredTests.test_asynchronousImplicitErrorChain */
START_TEST(test_deferred_asynchronous_implicit_error_chain)
{
    df_deferred *first, *second;
    probe p1 = {0}, p2 = {0}, p3 = {0};
    TU_OK(df_deferred_new(L, &first));
    TU_OK(df_deferred_new(L, &second));
    TU_OK(df_deferred_add_callback(second, cb_wait_ref, first));
    TU_OK(df_deferred_callback(second, NULL, NULL));
    TU_OK(df_deferred_add_errback(second, probe_eb_handle, &p2));
    add_probe(first, &p1);
    add_probe(second, &p3);
    ck_assert_int_eq(p1.cb_calls + p2.eb_calls + p3.cb_calls, 0);

    TU_OK(df_deferred_errback(first, failure(-22, "first's failure")));
    ck_assert_int_eq(p2.eb_calls, 1);
    ck_assert_int_eq(p2.code, -22);
    ck_assert_int_eq(p1.cb_calls, 1);
    ck_assert_ptr_null(p1.value);
    ck_assert_int_eq(p3.cb_calls, 1);
    df_deferred_unref(first);
    df_deferred_unref(second);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_doubleAsynchronousImplicitChaining */
START_TEST(test_deferred_double_asynchronous_implicit_chaining)
{
    df_deferred *first, *second, *third;
    probe p = {0};
    TU_OK(df_deferred_new(L, &first));
    TU_OK(df_deferred_new(L, &second));
    TU_OK(df_deferred_new(L, &third));
    TU_OK(df_deferred_add_callback(second, cb_wait_ref, first));
    TU_OK(df_deferred_add_callback(third, cb_wait_ref, second));
    add_probe(third, &p);
    TU_OK(df_deferred_callback(second, NULL, NULL));
    TU_OK(df_deferred_callback(third, NULL, NULL));
    ck_assert_int_eq(p.cb_calls, 0);
    int *v = box(13);
    TU_OK(df_deferred_callback(first, v, box_free));
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(first);
    df_deferred_unref(second);
    df_deferred_unref(third);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/*
 * The nested tests record, as ints: 1000 + v when the outer's callback
 * starts, 2000 + v in the middle deferred's first callback, 3000 + v in its
 * second one, 4000 + v at the end of the outer chain, and 5000 + v in a
 * callback that was on the inner deferred before anything waited on it.
 */
typedef struct nest {
    df_deferred *inner;   /* borrowed */
    bool transform;       /* add a transforming callback to inner */
    bool fire_middle;     /* middle is new and fired in place */
    probe failures;       /* errbacks that must never run */
} nest;

static df_result nest_transform(df_result r, void *arg)
{
    (void)arg;
    int v = box_val(r.value);
    df_result_clear(&r);
    return df_ok(box(v * 10), box_free);
}

static df_result nest_first(df_result r, void *arg)
{
    nest *n = arg;
    log_push(2000 + (r.value != NULL ? box_val(r.value) : 0));
    df_result_clear(&r);
    if (n->transform)
        TU_OK(df_deferred_add_callback(n->inner, nest_transform, NULL));
    return df_wait(df_deferred_ref(n->inner));
}

static df_result nest_second(df_result r, void *arg)
{
    (void)arg;
    int v = box_val(r.value);
    log_push(3000 + v);
    df_result_clear(&r);
    return df_ok(box(v * 2), box_free);
}

static df_result nest_second_none(df_result r, void *arg)
{
    (void)arg;
    log_push(3000 + box_val(r.value));
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

static df_result nest_final(df_result r, void *arg)
{
    (void)arg;
    log_push(4000 + (r.value != NULL ? box_val(r.value) : 0));
    return r;
}

static df_result nest_inner_log(df_result r, void *arg)
{
    (void)arg;
    log_push(5000 + box_val(r.value));
    return r;
}

/* The outer's callback: logs, builds the middle deferred and waits on it. */
static df_result nest_cb(df_result r, void *arg)
{
    nest *n = arg;
    df_deferred *middle;
    log_push(1000 + box_val(r.value));
    df_result_clear(&r);
    if (n->fire_middle) {
        TU_OK(df_deferred_new(L, &middle));
        TU_OK(df_deferred_add_callback(middle, nest_first, n));
        TU_OK(df_deferred_add_callback(middle, nest_second_none, n));
        TU_OK(df_deferred_add_errback(middle, probe_eb, &n->failures));
        TU_OK(df_deferred_callback(middle, NULL, NULL));
    } else {
        TU_OK(df_succeed(L, box(2), box_free, &middle));
        TU_OK(df_deferred_add_callback(middle, nest_first, n));
        TU_OK(df_deferred_add_callback(middle, nest_second, n));
        TU_OK(df_deferred_add_errback(middle, probe_eb, &n->failures));
    }
    return df_wait(middle);
}

/* Twisted: DeferredTests.test_nestedAsynchronousChainedDeferreds */
START_TEST(test_deferred_nested_asynchronous_chained_deferreds)
{
    df_deferred *outer, *inner;
    nest n = {0};
    TU_OK(df_deferred_new(L, &inner));
    n.inner = inner;
    TU_OK(df_succeed(L, box(1), box_free, &outer));
    TU_OK(df_deferred_add_callback(outer, nest_cb, &n));
    TU_OK(df_deferred_add_callback(outer, nest_final, NULL));
    ASSERT_LOG(1001, 2002);

    TU_OK(df_deferred_callback(inner, box(5), box_free));
    TU_OK(df_deferred_add_errback(inner, probe_eb, &n.failures));
    TU_OK(df_deferred_add_errback(outer, probe_eb, &n.failures));
    ck_assert_int_eq(n.failures.eb_calls, 0);
    ASSERT_LOG(1001, 2002, 3005, 4010);
    df_deferred_unref(inner);
    df_deferred_unref(outer);
    ck_assert_int_eq(g_box_frees, 4);
}
END_TEST

/* Twisted: DeferredTests.test_nestedAsynchronousChainedDeferredsWith-
 * ExtraCallbacks (the inner deferred gets a transforming callback before
 * it is returned; here x -> 10 x stands for Twisted's x -> [x]). */
START_TEST(test_deferred_nested_asynchronous_chained_deferreds_extra)
{
    df_deferred *outer, *inner;
    nest n = {.transform = true};
    TU_OK(df_deferred_new(L, &inner));
    n.inner = inner;
    TU_OK(df_succeed(L, box(1), box_free, &outer));
    TU_OK(df_deferred_add_callback(outer, nest_cb, &n));
    TU_OK(df_deferred_add_callback(outer, nest_final, NULL));
    ASSERT_LOG(1001, 2002);

    TU_OK(df_deferred_callback(inner, box(5), box_free));
    TU_OK(df_deferred_add_errback(outer, probe_eb, &n.failures));
    TU_OK(df_deferred_add_errback(inner, probe_eb, &n.failures));
    ck_assert_int_eq(n.failures.eb_calls, 0);
    ASSERT_LOG(1001, 2002, 3050, 4100);
    df_deferred_unref(inner);
    df_deferred_unref(outer);
    ck_assert_int_eq(g_box_frees, 5);
}
END_TEST

/* Twisted: DeferredTests.test_innerCallbacksPreserved */
START_TEST(test_deferred_inner_callbacks_preserved)
{
    df_deferred *outer, *inner;
    nest n = {0};
    TU_OK(df_deferred_new(L, &inner));
    n.inner = inner;
    TU_OK(df_succeed(L, box(1), box_free, &outer));
    TU_OK(df_deferred_add_callback(outer, nest_cb, &n));
    TU_OK(df_deferred_callback(inner, box(5), box_free));
    TU_OK(df_deferred_add_callback(outer, nest_final, NULL));
    TU_OK(df_deferred_add_errback(inner, probe_eb, &n.failures));
    TU_OK(df_deferred_add_errback(outer, probe_eb, &n.failures));
    ck_assert_int_eq(n.failures.eb_calls, 0);
    ASSERT_LOG(1001, 2002, 3005, 4010);
    df_deferred_unref(inner);
    df_deferred_unref(outer);
}
END_TEST

/* Twisted: DeferredTests.test_continueCallbackNotFirst (Twisted waits on
 * gatherResults([a]); here on `a` itself, which already has a callback,
 * so that the continuation is not its first entry). */
START_TEST(test_deferred_continue_callback_not_first)
{
    df_deferred *outer, *a;
    nest n = {.fire_middle = true};
    TU_OK(df_deferred_new(L, &a));
    TU_OK(df_deferred_add_callback(a, nest_inner_log, NULL));
    n.inner = a;
    TU_OK(df_succeed(L, box(1), box_free, &outer));
    TU_OK(df_deferred_add_callback(outer, nest_cb, &n));
    TU_OK(df_deferred_add_errback(outer, probe_eb, &n.failures));
    ASSERT_LOG(1001, 2000);
    TU_OK(df_deferred_callback(a, box(7), box_free));
    ck_assert_int_eq(n.failures.eb_calls, 0);
    ASSERT_LOG(1001, 2000, 5007, 3007);
    df_deferred_unref(a);
    df_deferred_unref(outer);
}
END_TEST

/* Twisted: DeferredTests.test_callbackOrderPreserved */
START_TEST(test_deferred_callback_order_preserved)
{
    df_deferred *outer, *a;
    nest n = {.fire_middle = true};
    TU_OK(df_deferred_new(L, &a));
    TU_OK(df_deferred_add_callback(a, nest_inner_log, NULL));
    n.inner = a;
    TU_OK(df_deferred_new(L, &outer));
    TU_OK(df_deferred_add_callback(outer, nest_cb, &n));
    TU_OK(df_deferred_add_callback(outer, nest_final, NULL));
    TU_OK(df_deferred_add_errback(outer, probe_eb, &n.failures));
    TU_OK(df_deferred_callback(outer, box(1), box_free));
    ASSERT_LOG(1001, 2000);
    TU_OK(df_deferred_callback(a, box(7), box_free));
    ck_assert_int_eq(n.failures.eb_calls, 0);
    ASSERT_LOG(1001, 2000, 5007, 3007, 4000);
    df_deferred_unref(a);
    df_deferred_unref(outer);
}
END_TEST

/* Twisted: DeferredTests.test_resultOfDeferredResultOfDeferredOf-
 * FiredDeferredCalled */
START_TEST(test_deferred_result_of_result_of_fired)
{
    df_deferred *first, *second, *third;
    probe p = {0};
    TU_OK(df_deferred_new(L, &first));
    TU_OK(df_deferred_new(L, &second));
    TU_OK(df_deferred_new(L, &third));
    TU_OK(df_deferred_add_callback(first, cb_wait_ref, second));
    TU_OK(df_deferred_add_callback(second, cb_wait_ref, third));
    TU_OK(df_deferred_callback(second, NULL, NULL));
    TU_OK(df_deferred_callback(first, NULL, NULL));
    TU_OK(df_deferred_callback(third, NULL, NULL));
    add_probe(second, &p);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_null(p.value);
    ck_assert(!df_deferred_paused(first));
    df_deferred_unref(first);
    df_deferred_unref(second);
    df_deferred_unref(third);
}
END_TEST

/* Twisted: DeferredTests.test_chainedPausedDeferredWithResult */
START_TEST(test_deferred_chained_paused_with_result)
{
    df_deferred *paused, *chained;
    probe p = {0};
    int *v = box(14);
    TU_OK(df_deferred_new(L, &paused));
    TU_OK(df_deferred_callback(paused, v, box_free));
    TU_OK(df_deferred_pause(paused));
    TU_OK(df_deferred_new(L, &chained));
    TU_OK(df_deferred_add_callback(chained, cb_wait_ref, paused));
    TU_OK(df_deferred_callback(chained, NULL, NULL));
    add_probe(chained, &p);
    ck_assert_int_eq(p.cb_calls, 0);
    TU_OK(df_deferred_unpause(paused));
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(paused);
    df_deferred_unref(chained);
}
END_TEST

/* Twisted: DeferredTests.test_pausedDeferredChained */
START_TEST(test_deferred_paused_deferred_chained)
{
    df_deferred *first, *second;
    probe p = {0};
    TU_OK(df_deferred_new(L, &first));
    TU_OK(df_deferred_new(L, &second));
    TU_OK(df_deferred_add_callback(first, cb_wait_ref, second));
    TU_OK(df_deferred_callback(first, NULL, NULL));
    TU_OK(df_deferred_pause(first));
    TU_OK(df_deferred_callback(second, NULL, NULL));
    add_probe(second, &p);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_null(p.value);
    TU_OK(df_deferred_unpause(first));
    df_deferred_unref(first);
    df_deferred_unref(second);
}
END_TEST

/* Twisted: DeferredTests.testReturnDeferred */
START_TEST(test_deferred_return_deferred)
{
    df_deferred *d1, *d2;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d1));
    TU_OK(df_deferred_new(L, &d2));
    TU_OK(df_deferred_pause(d2));
    TU_OK(df_deferred_add_callback(d1, cb_wait_ref, d2));
    add_probe(d1, &p);
    TU_OK(df_deferred_callback(d1, box(1), box_free));
    ck_assert_int_eq(p.cb_calls, 0);
    int *v = box(2);
    TU_OK(df_deferred_callback(d2, v, box_free));
    ck_assert_int_eq(p.cb_calls, 0);
    TU_OK(df_deferred_unpause(d2));
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(d1);
    df_deferred_unref(d2);
    ck_assert_int_eq(g_box_frees, 2);
}
END_TEST

/* Twisted: no dedicated test; an errback may return a deferred too (the
 * recovery then comes from that deferred). */
START_TEST(test_deferred_errback_waits)
{
    df_deferred *d, *inner;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_deferred_add_errback(d, cb_wait_ref, inner));
    add_probe(d, &p);
    TU_OK(df_deferred_errback(d, failure(-3, "to recover")));
    ck_assert_int_eq(g_payload_frees, 1);
    ck_assert_int_eq(p.cb_calls + p.eb_calls, 0);
    int *v = box(15);
    TU_OK(df_deferred_callback(inner, v, box_free));
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(inner);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_circularChainException.  Departure: Twisted
 * warns (or raises the warning); here the chain fails with DF_EINVAL. */
START_TEST(test_deferred_circular_chain)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_wait_ref, d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_callback(d, box(1), box_free));
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_EINVAL);
    ck_assert_int_eq(g_box_frees, 1);
    df_deferred_unref(d);
}
END_TEST

/* Departure (no Twisted equivalent: one reactor): waiting on a deferred of
 * another loop fails the chain with DF_EINVAL. */
START_TEST(test_deferred_wait_other_loop)
{
    df_loop *l2;
    df_deferred *d, *other;
    probe p = {0};
    TU_OK(df_loop_new(NULL, &l2));
    TU_OK(df_deferred_new(l2, &other));
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_wait_ref, other));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_EINVAL);
    ck_assert(!df_deferred_called(other));
    df_deferred_unref(d);
    df_deferred_unref(other);
    TU_OK(df_loop_free(l2));
}
END_TEST

/* ==================================================== chainDeferred */

/* Twisted: DeferredTests.test_chainDeferredRecordsExplicitChain and
 * test_explicitChainClearedWhenResolved: the other deferred gets the
 * result, the first goes on with df_ok(NULL, NULL). */
START_TEST(test_deferred_chain_deferred)
{
    df_deferred *a, *b;
    probe pa = {0}, pb = {0};
    TU_OK(df_deferred_new(L, &a));
    TU_OK(df_deferred_new(L, &b));
    TU_OK(df_deferred_chain(b, a));
    add_probe(a, &pa);
    add_probe(b, &pb);
    ck_assert(!df_deferred_called(a));
    int *v = box(16);
    TU_OK(df_deferred_callback(b, v, box_free));
    ck_assert(df_deferred_called(a));
    ck_assert_int_eq(pa.cb_calls, 1);
    ck_assert_ptr_eq(pa.value, v);
    ck_assert_int_eq(pb.cb_calls, 1);
    ck_assert_ptr_null(pb.value);
    df_deferred_unref(b);
    ck_assert_int_eq(g_box_frees, 0); /* a owns it now */
    df_deferred_unref(a);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Twisted: no dedicated test; chainDeferred passes failures as well, and
 * only the other deferred can report them. */
START_TEST(test_deferred_chain_deferred_failure)
{
    df_deferred *a, *b;
    probe pa = {0}, pb = {0};
    TU_OK(df_deferred_new(L, &a));
    TU_OK(df_deferred_new(L, &b));
    TU_OK(df_deferred_chain(b, a));
    add_probe(b, &pb);
    TU_OK(df_deferred_errback(b, failure(-41, "to a")));
    ck_assert_int_eq(pb.cb_calls, 1);
    ck_assert_ptr_null(pb.value);
    add_probe_handle(a, &pa);
    ck_assert_int_eq(pa.eb_calls, 1);
    ck_assert_int_eq(pa.code, -41);
    df_deferred_unref(b);
    df_deferred_unref(a);
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_int_eq(g_payload_frees, 1);
}
END_TEST

/* Twisted: no dedicated test; chainDeferred on a fired deferred forwards
 * at once. */
START_TEST(test_deferred_chain_deferred_after_fire)
{
    df_deferred *a, *b;
    probe pa = {0};
    int *v = box(17);
    TU_OK(df_succeed(L, v, box_free, &b));
    TU_OK(df_deferred_new(L, &a));
    add_probe(a, &pa);
    TU_OK(df_deferred_chain(b, a));
    ck_assert_int_eq(pa.cb_calls, 1);
    ck_assert_ptr_eq(pa.value, v);
    df_deferred_unref(a);
    df_deferred_unref(b);
}
END_TEST

/* Twisted behaviour of chainDeferred (no dedicated test): when the other
 * deferred has already fired, its callback raises AlreadyCalledError, so
 * the first deferred fails with it.  Here: DF_EALREADY_CALLED, and the
 * value that could not be forwarded is destroyed once. */
START_TEST(test_deferred_chain_deferred_to_fired)
{
    df_deferred *a, *b;
    probe pb = {0};
    TU_OK(df_succeed(L, box(1), box_free, &a));
    TU_OK(df_deferred_new(L, &b));
    TU_OK(df_deferred_chain(b, a));
    add_probe_handle(b, &pb);
    TU_OK(df_deferred_callback(b, box(2), box_free));
    ck_assert_int_eq(pb.eb_calls, 1);
    ck_assert_int_eq(pb.code, DF_EALREADY_CALLED);
    ck_assert_int_eq(g_box_frees, 1);
    df_deferred_unref(a);
    df_deferred_unref(b);
    ck_assert_int_eq(g_box_frees, 2);
}
END_TEST

/* Twisted behaviour of chainDeferred into a deferred cancelled without a
 * canceller (checked with Twisted 22.4): the forwarded result is swallowed
 * by suppressAlreadyCalled and the first deferred goes on with None. */
START_TEST(test_deferred_chain_deferred_to_cancelled)
{
    df_deferred *a, *b;
    probe pa = {0}, pb = {0};
    TU_OK(df_deferred_new(L, &a));
    TU_OK(df_deferred_new(L, &b));
    add_probe_handle(a, &pa);
    TU_OK(df_deferred_chain(b, a));
    TU_OK(df_deferred_cancel(a));
    ck_assert_int_eq(pa.eb_calls, 1);
    ck_assert_int_eq(pa.code, DF_ECANCELLED);
    add_probe_handle(b, &pb);
    TU_OK(df_deferred_callback(b, box(3), box_free));
    int frees = g_box_frees;
    df_deferred_unref(a);
    df_deferred_unref(b);
    /* Checked after the releases, so that a failure leaks nothing. */
    ck_assert_int_eq(frees, 1);
    ck_assert_msg(pb.eb_calls == 0, "b failed with %s", df_err_name(pb.code));
    ck_assert_int_eq(pb.cb_calls, 1);
    ck_assert_ptr_null(pb.value);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Departure (Twisted does not check): chaining a deferred to itself is
 * refused with DF_EINVAL and changes nothing. */
START_TEST(test_deferred_chain_deferred_self)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_ERR(df_deferred_chain(d, d), DF_EINVAL);
    add_probe(d, &p);
    TU_OK(df_deferred_callback(d, box(1), box_free));
    ck_assert_int_eq(p.cb_calls, 1);
    df_deferred_unref(d);
}
END_TEST

/* ============================================================ pause */

/* Twisted: DeferredTests.testPausedFailure */
START_TEST(test_deferred_paused_failure)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_fail(L, failure(-4, "fail"), &d));
    TU_OK(df_deferred_pause(d));
    ck_assert(df_deferred_paused(d));
    add_probe_handle(d, &p);
    ck_assert_int_eq(p.eb_calls, 0);
    TU_OK(df_deferred_unpause(d));
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -4);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.testUnpauseBeforeCallback */
START_TEST(test_deferred_unpause_before_callback)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_pause(d));
    add_probe(d, &p);
    TU_OK(df_deferred_unpause(d));
    ck_assert_int_eq(p.cb_calls, 0);
    ck_assert(!df_deferred_paused(d));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(p.cb_calls, 1);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: no dedicated test (Deferred.pause counts): two pauses need two
 * unpauses; the chain runs only after the last one. */
START_TEST(test_deferred_pause_counts)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_pause(d));
    TU_OK(df_deferred_pause(d));
    add_probe(d, &p);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    TU_OK(df_deferred_unpause(d));
    ck_assert(df_deferred_paused(d));
    ck_assert_int_eq(p.cb_calls, 0);
    TU_OK(df_deferred_unpause(d));
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert(!df_deferred_paused(d));
    df_deferred_unref(d);
}
END_TEST

/* Departure: Twisted lets paused go negative; here unpause without a
 * matching pause is DF_ESTATE and changes nothing. */
START_TEST(test_deferred_unpause_not_paused)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_ERR(df_deferred_unpause(d), DF_ESTATE);
    TU_OK(df_deferred_pause(d));
    TU_OK(df_deferred_unpause(d));
    TU_ERR(df_deferred_unpause(d), DF_ESTATE);
    add_probe(d, &p);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(p.cb_calls, 1);
    TU_ERR(df_deferred_unpause(d), DF_ESTATE);
    df_deferred_unref(d);
}
END_TEST

/* Departure: in Twisted, unpause() on a deferred waiting for an inner one
 * undoes the wait's pause and corrupts the chain; here only pauses made
 * by df_deferred_pause can be undone (DF_ESTATE otherwise). */
START_TEST(test_deferred_unpause_waiting)
{
    df_deferred *outer, *inner;
    probe p = {0};
    TU_OK(df_deferred_new(L, &outer));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_deferred_add_callback(outer, cb_wait_ref, inner));
    add_probe(outer, &p);
    TU_OK(df_deferred_callback(outer, NULL, NULL));
    ck_assert(df_deferred_paused(outer));
    TU_ERR(df_deferred_unpause(outer), DF_ESTATE);
    TU_OK(df_deferred_pause(outer));
    TU_OK(df_deferred_unpause(outer));
    TU_ERR(df_deferred_unpause(outer), DF_ESTATE);
    ck_assert_int_eq(p.cb_calls, 0);
    TU_OK(df_deferred_callback(inner, NULL, NULL));
    ck_assert_int_eq(p.cb_calls, 1);
    df_deferred_unref(outer);
    df_deferred_unref(inner);
}
END_TEST

static df_result cb_pause_self(df_result r, void *arg)
{
    TU_OK(df_deferred_pause(arg));
    log_push(1);
    return r;
}

/* Twisted: no dedicated test; behaviour checked with Twisted 22.4: a
 * callback that pauses its own deferred does not stop the run in progress
 * (_runCallbacks looks at `paused` only between deferreds), but callbacks
 * added afterwards wait for the unpause. */
START_TEST(test_deferred_pause_inside_callback)
{
    df_deferred *d;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_pause_self, d));
    TU_OK(df_deferred_add_callback(d, cb_log, (void *)(intptr_t)2));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ASSERT_LOG(1, 2);
    ck_assert(df_deferred_paused(d));
    TU_OK(df_deferred_add_callback(d, cb_log, (void *)(intptr_t)3));
    ASSERT_LOG(1, 2);
    TU_OK(df_deferred_unpause(d));
    ASSERT_LOG(1, 2, 3);
    df_deferred_unref(d);
}
END_TEST

/* =========================================================== cancel */

/* Twisted: DeferredCancellerTests.test_noCanceller */
START_TEST(test_deferred_cancel_no_canceller)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    ck_assert(df_deferred_called(d));
    ck_assert_int_eq(p.cb_calls, 0);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_raisesAfterCancelAndCallback (one
 * late callback is swallowed; the library then owns and destroys its
 * value; the next one is refused and the caller keeps its value). */
START_TEST(test_deferred_cancel_then_callback)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_callback(d, box(1), box_free));
    ck_assert_int_eq(g_box_frees, 1);
    int *v = box(2);
    TU_ERR(df_deferred_callback(d, v, box_free), DF_EALREADY_CALLED);
    df_failure *f = failure(-1, "late");
    TU_ERR(df_deferred_errback(d, f), DF_EALREADY_CALLED);
    ck_assert_int_eq(g_box_frees, 1);
    ck_assert_int_eq(g_payload_frees, 0);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.cb_calls, 0);
    box_free(v);
    df_failure_unref(f);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_raisesAfterCancelAndErrback */
START_TEST(test_deferred_cancel_then_errback)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_errback(d, failure(-1, "swallowed")));
    ck_assert_int_eq(g_payload_frees, 1);
    int *v = box(2);
    TU_ERR(df_deferred_callback(d, v, box_free), DF_EALREADY_CALLED);
    df_failure *f = failure(-1, "late");
    TU_ERR(df_deferred_errback(d, f), DF_EALREADY_CALLED);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    box_free(v);
    df_failure_unref(f);
    df_deferred_unref(d);
    ck_assert_int_eq(g_payload_frees, 2);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_noCancellerMultipleCancelsAfter-
 * CancelAndCallback */
START_TEST(test_deferred_cancel_multiple_after_callback)
{
    df_deferred *d;
    df_failure *f1 = NULL, *f2 = NULL;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe(d, &p);
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_peek(d, NULL, &f1));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_peek(d, NULL, &f2));
    ck_assert_ptr_eq(f1, f2);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.cb_calls, 0);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 1); /* nothing handled the cancel */
    ck_assert_int_eq(g_unhandled_code, DF_ECANCELLED);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_noCancellerMultipleCancelsAfter-
 * CancelAndErrback */
START_TEST(test_deferred_cancel_multiple_after_errback)
{
    df_deferred *d;
    df_failure *f1 = NULL, *f2 = NULL;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe(d, &p);
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_peek(d, NULL, &f1));
    TU_OK(df_deferred_errback(d, failure(-3, "generic")));
    TU_OK(df_deferred_peek(d, NULL, &f2));
    ck_assert_ptr_eq(f1, f2);
    ck_assert_int_eq(df_failure_code(f2), DF_ECANCELLED);
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_peek(d, NULL, &f2));
    ck_assert_ptr_eq(f1, f2);
    ck_assert_int_eq(p.eb_calls, 1);
    TU_OK(df_deferred_add_errback(d, probe_eb_handle, &p));
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_noCancellerMultipleCancel */
START_TEST(test_deferred_cancel_multiple)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_cancellerMultipleCancel */
START_TEST(test_deferred_canceller_multiple_cancel)
{
    df_deferred *d;
    int calls = 0;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &calls, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(calls, 1);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_simpleCanceller (with a canceller,
 * Twisted does not swallow a later fire: it raises AlreadyCalledError; the
 * header says DF_EALREADY_CALLED "if it has fired already"). */
START_TEST(test_deferred_simple_canceller)
{
    df_deferred *d;
    int calls = 0;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &calls, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(calls, 1);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    int *v = box(1);
    int rc = df_deferred_callback(d, v, box_free);
    if (rc != 0)
        box_free(v); /* refused: still ours */
    df_failure *f = failure(-1, "late");
    int rc2 = df_deferred_errback(d, f);
    if (rc2 != 0)
        df_failure_unref(f);
    df_deferred_unref(d);
    TU_ERR(rc, DF_EALREADY_CALLED);
    TU_ERR(rc2, DF_EALREADY_CALLED);
}
END_TEST

static df_deferred *g_canceller_saw;
static void *g_canceller_arg;
static void saving_canceller(df_deferred *d, void *arg)
{
    g_canceller_saw = d;
    g_canceller_arg = arg;
}

/* Twisted: DeferredCancellerTests.test_cancellerArg */
START_TEST(test_deferred_canceller_arg)
{
    df_deferred *d;
    int token;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, saving_canceller, &token, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    ck_assert_ptr_eq(g_canceller_saw, d);
    ck_assert_ptr_eq(g_canceller_arg, &token);
    df_deferred_unref(d);
}
END_TEST

/* A canceller that counts and errbacks its deferred with -99. */
static void errback_canceller(df_deferred *d, void *arg)
{
    (*(int *)arg)++;
    TU_OK(df_deferred_errback(d, df_failure_new(L, -99, "generic")));
}

/* A canceller that counts and callbacks its deferred with box(99). */
static void callback_canceller(df_deferred *d, void *arg)
{
    (*(int *)arg)++;
    TU_OK(df_deferred_callback(d, box(99), box_free));
}

/* Twisted: DeferredCancellerTests.test_cancelAfterCallback */
START_TEST(test_deferred_cancel_after_callback)
{
    df_deferred *d;
    int calls = 0;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, errback_canceller, &calls, &d));
    add_probe_handle(d, &p);
    int *v = box(1);
    TU_OK(df_deferred_callback(d, v, box_free));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(calls, 0);
    ck_assert_int_eq(p.eb_calls, 0);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_cancelAfterErrback */
START_TEST(test_deferred_cancel_after_errback)
{
    df_deferred *d;
    int calls = 0;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, errback_canceller, &calls, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_errback(d, failure(-3, "generic")));
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(calls, 0);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -3);
    ck_assert_int_eq(p.cb_calls, 0);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_cancellerThatErrbacks */
START_TEST(test_deferred_canceller_that_errbacks)
{
    df_deferred *d;
    int calls = 0;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, errback_canceller, &calls, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(calls, 1);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -99);
    /* The canceller fired it: nothing is swallowed afterwards. */
    int *v = box(1);
    TU_ERR(df_deferred_callback(d, v, box_free), DF_EALREADY_CALLED);
    box_free(v);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_cancellerThatCallbacks */
START_TEST(test_deferred_canceller_that_callbacks)
{
    df_deferred *d;
    int calls = 0;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, callback_canceller, &calls, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(calls, 1);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(box_val(p.value), 99);
    ck_assert_int_eq(p.eb_calls, 0);
    int *v = box(1);
    TU_ERR(df_deferred_callback(d, v, box_free), DF_EALREADY_CALLED);
    box_free(v);
    df_deferred_unref(d);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_cancelNestedDeferred */
START_TEST(test_deferred_cancel_nested)
{
    df_deferred *a, *b;
    int inner_calls = 0, outer_calls = 0;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &inner_calls, &b));
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &outer_calls, &a));
    TU_OK(df_deferred_callback(a, NULL, NULL));
    TU_OK(df_deferred_add_callback(a, cb_wait_ref, b));
    TU_OK(df_deferred_cancel(a));
    add_probe_handle(a, &p);
    ck_assert_int_eq(inner_calls, 1);
    ck_assert_int_eq(outer_calls, 0);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    df_deferred_unref(a);
    df_deferred_unref(b);
}
END_TEST

/* Twisted: no dedicated test (cancel() follows the chain through every
 * waiting deferred): cancelling the outermost of three cancels the
 * innermost, and the failure comes back up through both. */
START_TEST(test_deferred_cancel_nested_twice)
{
    df_deferred *a, *b, *c;
    int calls[3] = {0};
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &calls[0], &a));
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &calls[1], &b));
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &calls[2], &c));
    TU_OK(df_deferred_add_callback(a, cb_wait_ref, b));
    TU_OK(df_deferred_add_callback(b, cb_wait_ref, c));
    add_probe_handle(a, &p);
    TU_OK(df_deferred_callback(b, NULL, NULL));
    TU_OK(df_deferred_callback(a, NULL, NULL));
    TU_OK(df_deferred_cancel(a));
    ck_assert_int_eq(calls[0], 0);
    ck_assert_int_eq(calls[1], 0);
    ck_assert_int_eq(calls[2], 1);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    df_deferred_unref(a);
    df_deferred_unref(b);
    df_deferred_unref(c);
}
END_TEST

/* ========================================================== release */

/* Departure (C has no GC): releasing the last reference to an unfired
 * deferred fails it with DF_ECANCELLED so that each pair runs exactly
 * once; the canceller is not called and that failure is not reported. */
START_TEST(test_deferred_release_unfired)
{
    df_deferred *d;
    int calls = 0;
    probe p1 = {.tag = 1}, p2 = {.tag = 2};
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &calls, &d));
    add_probe(d, &p1);
    add_probe(d, &p2);
    df_deferred_unref(d);
    ck_assert_int_eq(calls, 0);
    ck_assert_int_eq(p1.eb_calls, 1);
    ck_assert_int_eq(p1.code, DF_ECANCELLED);
    ck_assert_int_eq(p2.eb_calls, 1);
    ck_assert_int_eq(p1.cb_calls + p2.cb_calls, 0);
    ASSERT_LOG(-1, -2);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Departure: the same when an errback recovers; its value is destroyed
 * once with the deferred. */
START_TEST(test_deferred_release_unfired_recovered)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_errback(d, cb_value, (void *)(intptr_t)5));
    add_probe(d, &p);
    df_deferred_unref(d);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(p.ival, 5);
    ck_assert_int_eq(g_box_frees, 1);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Departure: a reference taken with df_deferred_ref keeps the deferred
 * unfired; only the last unref fails it. */
START_TEST(test_deferred_release_needs_last_ref)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    ck_assert_ptr_eq(df_deferred_ref(d), d);
    add_probe_handle(d, &p);
    df_deferred_unref(d);
    ck_assert(!df_deferred_called(d));
    ck_assert_int_eq(p.eb_calls, 0);
    df_deferred_unref(d);
    ck_assert_int_eq(p.eb_calls, 1);
}
END_TEST

static df_result cb_unref(df_result r, void *arg)
{
    df_deferred_unref(arg);
    log_push(1);
    return r;
}

/* Departure: a callback may drop the last reference to its own deferred;
 * the chain finishes and the deferred is freed afterwards. */
START_TEST(test_deferred_unref_inside_callback)
{
    df_deferred *d;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_unref, d));
    TU_OK(df_deferred_add_callback(d, cb_log, (void *)(intptr_t)2));
    TU_OK(df_deferred_callback(d, box(1), box_free));
    ASSERT_LOG(1, 2);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Departure: when every reference to an outer deferred waiting on an
 * inner one goes (Twisted would simply garbage-collect both), the outer's
 * remaining pairs must still run exactly once (header: each callback is
 * called exactly once; DF_ECANCELLED is the natural result, as nothing can
 * fire the inner any more). */
START_TEST(test_deferred_release_waiting_outer)
{
    df_deferred *outer, *inner;
    probe p = {0};
    TU_OK(df_deferred_new(L, &outer));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_deferred_add_callback(outer, cb_wait_ref, inner));
    add_probe_handle(outer, &p);
    TU_OK(df_deferred_callback(outer, NULL, NULL));
    df_deferred_unref(inner); /* outer holds it */
    df_deferred_unref(outer);
    ck_assert_int_eq(p.cb_calls + p.eb_calls, 1);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* ======================================================== unhandled */

/* Twisted: LogTests.test_errorLog.  Departure: reported when the last
 * reference goes, not at garbage collection, and exactly once. */
START_TEST(test_deferred_unhandled_reported_once)
{
    df_deferred *d;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_fail, (void *)(intptr_t)-51));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(g_unhandled, 0); /* not before release */
    df_deferred_ref(d);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 1);
    ck_assert_int_eq(g_unhandled_code, -51);
    ck_assert_str_eq(g_unhandled_msg, "callback failed");
    ck_assert_uint_eq(df_loop_unhandled_count(L), 1);
}
END_TEST

/* Twisted: no dedicated test (LogTests assume it): a failure an errback
 * handles is never reported. */
START_TEST(test_deferred_unhandled_not_when_handled)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_errback(d, failure(-52, "handled")));
    add_probe_handle(d, &p);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_uint_eq(df_loop_unhandled_count(L), 0);
}
END_TEST

/* Twisted: no dedicated test: an errback that passes the failure on does
 * not handle it. */
START_TEST(test_deferred_unhandled_passed_on)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe(d, &p);
    TU_OK(df_deferred_errback(d, failure(-53, "passed on")));
    ck_assert_int_eq(p.eb_calls, 1);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 1);
    ck_assert_int_eq(g_unhandled_code, -53);
    ck_assert_int_eq(g_payload_frees, 1);
}
END_TEST

static df_result cb_wait_failed(df_result r, void *arg)
{
    df_deferred *d;
    (void)arg;
    df_result_clear(&r);
    TU_OK(df_fail(L, failure(-54, "zoop"), &d));
    return df_wait(d);
}

/* Twisted: LogTests.test_chainedErrorCleanup (the inner deferred's
 * failure, taken by the outer through df_wait and handled there, is not
 * reported for either). */
START_TEST(test_deferred_unhandled_chained_error_cleanup)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_wait_failed, NULL));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    add_probe_handle(d, &p);
    ck_assert_int_eq(p.cb_calls, 0);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -54);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_int_eq(g_payload_frees, 1);
}
END_TEST

/* Twisted: no dedicated test: a failure passed to the outer deferred
 * through df_wait and not handled there is reported exactly once, by the
 * outer. */
START_TEST(test_deferred_unhandled_once_through_wait)
{
    df_deferred *outer, *inner;
    TU_OK(df_deferred_new(L, &outer));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_deferred_add_callback(outer, cb_wait_ref, inner));
    TU_OK(df_deferred_callback(outer, NULL, NULL));
    TU_OK(df_deferred_errback(inner, failure(-55, "only once")));
    df_deferred_unref(inner);
    ck_assert_int_eq(g_unhandled, 0);
    df_deferred_unref(outer);
    ck_assert_int_eq(g_unhandled, 1);
    ck_assert_int_eq(g_unhandled_code, -55);
}
END_TEST

/* Twisted: LogTests.test_errorClearedByChaining */
START_TEST(test_deferred_unhandled_cleared_by_chaining)
{
    df_deferred *bad, *good;
    TU_OK(df_fail(L, failure(-56, "oh no"), &bad));
    TU_OK(df_deferred_new(L, &good));
    TU_OK(df_deferred_add_errback(bad, cb_wait_ref, good));
    ck_assert_int_eq(g_payload_frees, 1);
    df_deferred_unref(good);
    df_deferred_unref(bad);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: no dedicated test: a cancelled deferred nobody handles reports
 * its CancelledError like any failure. */
START_TEST(test_deferred_unhandled_cancelled)
{
    df_deferred *d;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_cancel(d));
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 1);
    ck_assert_int_eq(g_unhandled_code, DF_ECANCELLED);
}
END_TEST

/* Twisted: no dedicated test: chainDeferred hands the failure over, so
 * only the other deferred may report it. */
START_TEST(test_deferred_unhandled_chain_deferred)
{
    df_deferred *a, *b;
    TU_OK(df_deferred_new(L, &a));
    TU_OK(df_deferred_new(L, &b));
    TU_OK(df_deferred_chain(b, a));
    TU_OK(df_deferred_errback(b, failure(-57, "to a")));
    df_deferred_unref(b);
    ck_assert_int_eq(g_unhandled, 0);
    df_deferred_unref(a);
    ck_assert_int_eq(g_unhandled, 1);
    ck_assert_int_eq(g_unhandled_code, -57);
}
END_TEST

static int g_other_hook;
static void other_hook(df_failure *f, void *arg)
{
    (void)f;
    ck_assert_ptr_eq(arg, &g_other_hook);
    g_other_hook++;
}

/* Departure: the hook can be replaced with df_loop_set_unhandled; NULL
 * restores the default (one line on stderr).  The count covers all. */
START_TEST(test_deferred_unhandled_set_hook)
{
    df_deferred *d;
    g_other_hook = 0;
    TU_OK(df_loop_set_unhandled(L, other_hook, &g_other_hook));
    TU_OK(df_fail(L, failure(-58, "to the other hook"), &d));
    df_deferred_unref(d);
    ck_assert_int_eq(g_other_hook, 1);
    ck_assert_uint_eq(df_loop_unhandled_count(L), 1);

    TU_OK(df_loop_set_unhandled(L, NULL, NULL));
    TU_OK(df_fail(L, failure(DF_EFAILED, "expected: printed by the "
                                          "default hook"),
                  &d));
    df_deferred_unref(d);
    ck_assert_int_eq(g_other_hook, 1);
    ck_assert_uint_eq(df_loop_unhandled_count(L), 2);

    TU_OK(df_loop_set_unhandled(L, count_unhandled, &g_unhandled));
    g_unhandled = 2; /* for the teardown's comparison */
    TU_ERR(df_loop_set_unhandled(NULL, NULL, NULL), DF_EINVAL);
}
END_TEST

/* =========================================================== values */

/* Departure (C ownership): a value at the end of the chain is destroyed
 * once, when the deferred is released, and not before. */
START_TEST(test_deferred_value_freed_on_release)
{
    df_deferred *d;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_log, (void *)(intptr_t)1));
    TU_OK(df_deferred_callback(d, box(1), box_free));
    ck_assert_int_eq(g_box_frees, 0);
    df_deferred_unref(d);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Departure (C ownership): a callback owns its input; replacing the
 * result means clearing it.  Each value is destroyed exactly once. */
START_TEST(test_deferred_value_replaced)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_value, (void *)(intptr_t)2));
    TU_OK(df_deferred_add_callback(d, cb_value, (void *)(intptr_t)3));
    add_probe(d, &p);
    TU_OK(df_deferred_callback(d, box(1), box_free));
    ck_assert_int_eq(box_val(p.value), 3);
    ck_assert_int_eq(g_box_frees, 2);
    df_deferred_unref(d);
    ck_assert_int_eq(g_box_frees, 3);
}
END_TEST

/* Departure (C ownership): a value moved to the outer deferred through
 * df_wait is destroyed once, by the outer. */
START_TEST(test_deferred_value_through_wait)
{
    df_deferred *outer, *inner;
    TU_OK(df_deferred_new(L, &outer));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_deferred_add_callback(outer, cb_wait_ref, inner));
    TU_OK(df_deferred_callback(outer, box(0), box_free));
    ck_assert_int_eq(g_box_frees, 1); /* cb_wait_ref dropped it */
    TU_OK(df_deferred_callback(inner, box(1), box_free));
    df_deferred_unref(inner);
    ck_assert_int_eq(g_box_frees, 1);
    df_deferred_unref(outer);
    ck_assert_int_eq(g_box_frees, 2);
}
END_TEST

/* Departure (C ownership): failure payloads are released once, when the
 * last holder of the failure lets it go. */
START_TEST(test_deferred_value_failure_payload)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    add_probe(d, &p);
    add_probe(d, &p);
    TU_OK(df_deferred_errback(d, failure(-60, "payload")));
    ck_assert_int_eq(g_payload_frees, 0);
    TU_OK(df_deferred_add_errback(d, probe_eb_handle, &p));
    ck_assert_int_eq(g_payload_frees, 1);
    ck_assert_int_eq(p.eb_calls, 3);
    df_deferred_unref(d);
    ck_assert_int_eq(g_payload_frees, 1);
}
END_TEST

/* Departure: a callback that makes the deferred wait again while it is
 * being released (here an errback waiting on an unfired deferred) must not
 * strand the pairs after it: each still runs exactly once. */
START_TEST(test_deferred_release_wait_during_release)
{
    df_deferred *d, *inner;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_deferred_add_errback(d, cb_wait_ref, inner));
    add_probe_handle(d, &p);
    df_deferred_unref(d);
    TU_OK(df_deferred_callback(inner, NULL, NULL));
    df_deferred_unref(inner);
    ck_assert_int_eq(p.cb_calls + p.eb_calls, 1);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

static df_deferred *g_kept;
static df_result eb_keep(df_result r, void *arg)
{
    g_kept = df_deferred_ref(arg);
    return r;
}

/* Departure: a callback run by the release may take a new reference; the
 * DF_ECANCELLED failure made by the release is still the library's own and
 * is not reported when that reference goes. */
START_TEST(test_deferred_release_resurrected)
{
    df_deferred *d;
    probe p = {0};
    g_kept = NULL;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_errback(d, eb_keep, d));
    add_probe(d, &p);
    df_deferred_unref(d);
    ck_assert_ptr_eq(g_kept, d);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    df_deferred_unref(g_kept);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_pausedDeferredChained, variant with the
 * inner's callback added before it fires.  Twisted leaves that callback
 * pending (its run stops at the paused outer) until something runs the
 * inner's chain again; whatever the timing, it must run exactly once. */
START_TEST(test_deferred_paused_outer_inner_callbacks)
{
    df_deferred *first, *second;
    probe p = {0};
    TU_OK(df_deferred_new(L, &first));
    TU_OK(df_deferred_new(L, &second));
    TU_OK(df_deferred_add_callback(first, cb_wait_ref, second));
    TU_OK(df_deferred_callback(first, NULL, NULL));
    TU_OK(df_deferred_pause(first));
    add_probe(second, &p);
    TU_OK(df_deferred_callback(second, NULL, NULL));
    TU_OK(df_deferred_unpause(first));
    df_deferred_unref(first);
    df_deferred_unref(second);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(p.eb_calls, 0);
}
END_TEST

/* ============================================== succeed, fail, maybe */

static df_result run_value(void *arg)
{
    return df_ok(box(*(int *)arg + 5), box_free);
}

static df_result run_failure(void *arg)
{
    (void)arg;
    return df_err(failure(-61, "sync failure"));
}

static df_result run_wait(void *arg)
{
    return df_wait(df_deferred_ref(arg));
}

static int g_run_calls;
static df_result run_count(void *arg)
{
    (void)arg;
    g_run_calls++;
    return df_ok(NULL, NULL);
}

/* Twisted: DeferredTests.test_maybeDeferredSync and
 * test_maybeDeferredSyncWithArgs */
START_TEST(test_deferred_maybe_sync)
{
    df_deferred *d;
    int ten = 10;
    probe p = {0};
    TU_OK(df_maybe(L, run_value, &ten, &d));
    ck_assert(df_deferred_called(d));
    add_probe_handle(d, &p);
    ck_assert_int_eq(p.eb_calls, 0);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(p.ival, 15);
    df_deferred_unref(d);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Twisted: DeferredTests.test_maybeDeferredSyncException and
 * test_maybeDeferredSyncFailure (no exceptions in C: fn returns one). */
START_TEST(test_deferred_maybe_sync_failure)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_maybe(L, run_failure, NULL, &d));
    add_probe_handle(d, &p);
    ck_assert_int_eq(p.cb_calls, 0);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -61);
    ck_assert_str_eq(p.msg, "sync failure");
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_maybeDeferredAsync (the deferred fn returns
 * is passed through as it is) */
START_TEST(test_deferred_maybe_async)
{
    df_deferred *d1, *d2;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d1));
    TU_OK(df_maybe(L, run_wait, d1, &d2));
    ck_assert_ptr_eq(d2, d1);
    int *v = box(1);
    TU_OK(df_deferred_callback(d1, v, box_free));
    add_probe(d2, &p);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(d2); /* the reference df_maybe gave */
    df_deferred_unref(d1);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* Twisted: DeferredTests.test_maybeDeferredAsyncError */
START_TEST(test_deferred_maybe_async_error)
{
    df_deferred *d1, *d2;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d1));
    TU_OK(df_maybe(L, run_wait, d1, &d2));
    TU_OK(df_deferred_errback(d1, failure(-62, "async")));
    add_probe_handle(d2, &p);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -62);
    df_deferred_unref(d2);
    df_deferred_unref(d1);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Twisted: no dedicated test: fn is called exactly once on success, never
 * when df_maybe fails. */
START_TEST(test_deferred_maybe_calls_once)
{
    df_deferred *d = NULL;
    g_run_calls = 0;
    TU_OK(df_maybe(L, run_count, NULL, &d));
    ck_assert_int_eq(g_run_calls, 1);
    df_deferred_unref(d);
    TU_ERR(df_maybe(NULL, run_count, NULL, &d), DF_EINVAL);
    TU_ERR(df_maybe(L, NULL, NULL, &d), DF_EINVAL);
    ck_assert_int_eq(g_run_calls, 1);
}
END_TEST

/* df_maybe(L, fn, arg, NULL): in a child process, because it may crash. */
static int maybe_null_out(void)
{
    g_run_calls = 0;
    int rc = df_maybe(L, run_count, NULL, NULL);
    return rc == DF_EINVAL && g_run_calls == 0 ? 0 : 1;
}

/* Departure (C API armour): a NULL out pointer is DF_EINVAL, and fn is
 * then not called. */
START_TEST(test_deferred_maybe_null_out)
{
    expect_in_child(maybe_null_out, "df_maybe(L, fn, arg, NULL)");
}
END_TEST

/* =================================================== arguments, peek */

/* Departure (C API armour): NULL arguments give DF_EINVAL and change
 * nothing; values and failures offered stay the caller's. */
START_TEST(test_deferred_null_arguments)
{
    df_deferred *d, *out = NULL;
    df_failure *f = failure(-1, "kept");
    int *v = box(1);
    TU_OK(df_deferred_new(L, &d));

    TU_ERR(df_deferred_new(NULL, &out), DF_EINVAL);
    TU_ERR(df_deferred_new(L, NULL), DF_EINVAL);
    TU_ERR(df_deferred_new_cancellable(NULL, count_canceller, NULL, &out),
           DF_EINVAL);
    TU_ERR(df_deferred_new_cancellable(L, count_canceller, NULL, NULL),
           DF_EINVAL);
    TU_ERR(df_succeed(NULL, v, box_free, &out), DF_EINVAL);
    TU_ERR(df_succeed(L, v, box_free, NULL), DF_EINVAL);
    TU_ERR(df_fail(NULL, f, &out), DF_EINVAL);
    TU_ERR(df_fail(L, f, NULL), DF_EINVAL);
    TU_ERR(df_fail(L, NULL, &out), DF_EINVAL);
    TU_ERR(df_deferred_callback(NULL, v, box_free), DF_EINVAL);
    TU_ERR(df_deferred_errback(NULL, f), DF_EINVAL);
    TU_ERR(df_deferred_errback(d, NULL), DF_EINVAL);
    TU_ERR(df_deferred_resolve(NULL, df_ok(v, box_free)), DF_EINVAL);
    TU_ERR(df_deferred_add_callbacks(NULL, probe_cb, probe_eb, NULL),
           DF_EINVAL);
    TU_ERR(df_deferred_add_callback(NULL, probe_cb, NULL), DF_EINVAL);
    TU_ERR(df_deferred_add_callback(d, NULL, NULL), DF_EINVAL);
    TU_ERR(df_deferred_add_errback(NULL, probe_eb, NULL), DF_EINVAL);
    TU_ERR(df_deferred_add_errback(d, NULL, NULL), DF_EINVAL);
    TU_ERR(df_deferred_add_both(NULL, probe_cb, NULL), DF_EINVAL);
    TU_ERR(df_deferred_add_both(d, NULL, NULL), DF_EINVAL);
    TU_ERR(df_deferred_chain(NULL, d), DF_EINVAL);
    TU_ERR(df_deferred_chain(d, NULL), DF_EINVAL);
    TU_ERR(df_deferred_pause(NULL), DF_EINVAL);
    TU_ERR(df_deferred_unpause(NULL), DF_EINVAL);
    TU_ERR(df_deferred_cancel(NULL), DF_EINVAL);
    TU_ERR(df_deferred_peek(NULL, NULL, NULL), DF_EINVAL);
    TU_ERR(df_deferred_set_timeout(NULL, 1000), DF_EINVAL);
    ck_assert_ptr_null(df_deferred_ref(NULL));
    df_deferred_unref(NULL);
    ck_assert(!df_deferred_called(NULL));
    ck_assert(!df_deferred_paused(NULL));
    ck_assert_ptr_null(df_deferred_loop(NULL));
    ck_assert_ptr_eq(df_deferred_loop(d), L);

    /* Nothing was taken or changed. */
    ck_assert_int_eq(g_box_frees, 0);
    ck_assert_int_eq(g_payload_frees, 0);
    ck_assert(!df_deferred_called(d));
    ck_assert(!df_deferred_paused(d));
    box_free(v);
    df_failure_unref(f);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Departure: df_wait is for callbacks only; resolving with it is DF_EINVAL
 * and the caller keeps its reference. */
START_TEST(test_deferred_resolve_wait_einval)
{
    df_deferred *d, *w;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_new(L, &w));
    add_probe_handle(d, &p);
    TU_ERR(df_deferred_resolve(d, df_wait(w)), DF_EINVAL);
    ck_assert(!df_deferred_called(d));
    ck_assert(!df_deferred_called(w));
    ck_assert_int_eq(p.cb_calls + p.eb_calls, 0);
    df_deferred_unref(w);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(p.cb_calls, 1);
    df_deferred_unref(d);
}
END_TEST

/* Departure (Twisted reads d.result): df_deferred_peek. */
START_TEST(test_deferred_peek)
{
    df_deferred *d, *e, *inner;
    void *v = NULL;
    df_failure *f = NULL;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_ERR(df_deferred_peek(d, &v, &f), DF_ENOT_CALLED);
    ck_assert(!df_deferred_called(d));
    int *b = box(1);
    TU_OK(df_deferred_callback(d, b, box_free));
    ck_assert(df_deferred_called(d));
    TU_OK(df_deferred_peek(d, &v, &f));
    ck_assert_ptr_eq(v, b);
    ck_assert_ptr_null(f);
    TU_OK(df_deferred_peek(d, NULL, NULL));
    TU_OK(df_deferred_pause(d));
    TU_OK(df_deferred_peek(d, &v, NULL)); /* paused: still readable */
    ck_assert_ptr_eq(v, b);
    TU_OK(df_deferred_unpause(d));

    TU_OK(df_fail(L, failure(-63, "peeked"), &e));
    TU_OK(df_deferred_peek(e, &v, &f));
    ck_assert_ptr_null(v);
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(df_failure_code(f), -63);
    TU_OK(df_deferred_add_errback(e, probe_eb_handle, &p));
    TU_OK(df_deferred_peek(e, &v, &f));
    ck_assert_ptr_null(f); /* handled: df_ok(NULL, NULL) */
    ck_assert_ptr_null(v);
    df_deferred_unref(e);

    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_deferred_new(L, &e));
    TU_OK(df_deferred_add_callback(e, cb_wait_ref, inner));
    TU_OK(df_deferred_callback(e, NULL, NULL));
    TU_ERR(df_deferred_peek(e, &v, &f), DF_ENOT_CALLED);
    ck_assert(df_deferred_called(e));
    TU_OK(df_deferred_callback(inner, NULL, NULL));
    TU_OK(df_deferred_peek(e, &v, &f));
    ck_assert_ptr_null(v);
    ck_assert_ptr_null(f);
    df_deferred_unref(e);
    df_deferred_unref(inner);
    df_deferred_unref(d);
}
END_TEST

/* ====================================================== wrong thread */

/* What a foreign thread tries on the loop's objects. */
typedef struct foreign {
    df_deferred *d;
    df_deferred *other;
    int *value;
    df_failure *f;
    probe p;
    int cancels;
    int rc[16];
} foreign;

static void *foreign_main(void *arg)
{
    foreign *w = arg;
    df_deferred *x = NULL;
    w->rc[0] = df_deferred_callback(w->d, w->value, box_free);
    w->rc[1] = df_deferred_errback(w->d, w->f);
    w->rc[2] = df_deferred_resolve(w->d, df_ok(w->value, box_free));
    w->rc[3] = df_deferred_add_callbacks(w->d, probe_cb, probe_eb, &w->p);
    w->rc[4] = df_deferred_add_both(w->d, probe_cb, &w->p);
    w->rc[5] = df_deferred_chain(w->d, w->other);
    w->rc[6] = df_deferred_pause(w->d);
    w->rc[7] = df_deferred_unpause(w->d);
    w->rc[8] = df_deferred_cancel(w->d);
    w->rc[9] = df_deferred_peek(w->d, NULL, NULL);
    w->rc[10] = df_deferred_new(L, &x);
    w->rc[11] = df_deferred_new_cancellable(L, count_canceller, NULL, &x);
    w->rc[12] = df_succeed(L, w->value, box_free, &x);
    w->rc[13] = df_fail(L, w->f, &x);
    w->rc[14] = df_maybe(L, run_count, NULL, &x);
    w->rc[15] = df_deferred_set_timeout(w->d, 1000);
    /* Void entry points print one line and do nothing. */
    df_deferred_ref(w->d);
    df_deferred_unref(w->d);
    return NULL;
}

/* Departure (Twisted is single-threaded by convention): calls from a
 * thread other than the loop thread return DF_EWRONG_THREAD and change
 * nothing. */
START_TEST(test_deferred_wrong_thread)
{
    foreign w = {0};
    pthread_t t;
    probe p = {0};
    g_run_calls = 0;
    TU_OK(df_deferred_new_cancellable(L, count_canceller, &w.cancels, &w.d));
    TU_OK(df_deferred_new(L, &w.other));
    w.value = box(1);
    w.f = failure(-1, "foreign");
    ck_assert_int_eq(pthread_create(&t, NULL, foreign_main, &w), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    for (int i = 0; i < 16; i++)
        ck_assert_msg(w.rc[i] == DF_EWRONG_THREAD, "call %d returned %d (%s)",
                      i, w.rc[i], df_err_name(w.rc[i]));

    ck_assert(!df_deferred_called(w.d));
    ck_assert(!df_deferred_paused(w.d));
    ck_assert(!df_deferred_called(w.other));
    ck_assert_int_eq(w.cancels, 0);
    ck_assert_int_eq(g_run_calls, 0);
    ck_assert_int_eq(g_box_frees, 0);
    ck_assert_int_eq(g_payload_frees, 0);

    /* The deferred still works normally on its own thread, without what
     * the foreign thread tried to add. */
    add_probe(w.d, &p);
    TU_OK(df_deferred_callback(w.d, w.value, box_free));
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_int_eq(w.p.cb_calls + w.p.eb_calls, 0);
    ck_assert(!df_deferred_called(w.other));
    df_failure_unref(w.f);
    df_deferred_unref(w.d);
    df_deferred_unref(w.other);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* =================================================== out of memory */

/* Departure (C): creation fails cleanly with DF_ENOMEM; values offered
 * stay the caller's and fn is never called. */
START_TEST(test_deferred_new_enomem)
{
    df_deferred *d = NULL;
    df_failure *f = failure(-1, "kept");
    int *v = box(1);
    int calls = 0;
    g_run_calls = 0;
    atomic_store(&g_ca.fail, 1);
    TU_ERR(df_deferred_new(L, &d), DF_ENOMEM);
    TU_ERR(df_deferred_new_cancellable(L, count_canceller, &calls, &d),
           DF_ENOMEM);
    TU_ERR(df_succeed(L, v, box_free, &d), DF_ENOMEM);
    TU_ERR(df_fail(L, f, &d), DF_ENOMEM);
    TU_ERR(df_maybe(L, run_count, NULL, &d), DF_ENOMEM);
    atomic_store(&g_ca.fail, 0);
    ck_assert_int_eq(g_run_calls, 0);
    ck_assert_int_eq(calls, 0);
    ck_assert_int_eq(g_box_frees, 0);
    ck_assert_int_eq(g_payload_frees, 0);
    box_free(v);
    df_failure_unref(f);
    TU_OK(df_deferred_new(L, &d));
    df_deferred_unref(d);
}
END_TEST

/* Adds probes to d until an addition fails; returns how many succeeded
 * (at most n - 1: the allocator is failing). */
static size_t add_until_enomem(df_deferred *d, probe *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        int rc = df_deferred_add_callbacks(d, probe_cb, probe_eb_handle,
                                           &p[i]);
        if (rc != 0) {
            TU_ERR(rc, DF_ENOMEM);
            break;
        }
    }
    ck_assert_msg(i < n, "no addition needed memory");
    return i;
}

/* Departure (C): when the chain cannot grow, add_callbacks returns
 * DF_ENOMEM and that pair is never called; the others run normally. */
START_TEST(test_deferred_add_callbacks_enomem)
{
    df_deferred *d;
    probe p[64] = {{0}};
    TU_OK(df_deferred_new(L, &d));
    atomic_store(&g_ca.fail, 1);
    size_t n = add_until_enomem(d, p, 64);
    atomic_store(&g_ca.fail, 0);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    for (size_t i = 0; i < n; i++)
        ck_assert_int_eq(p[i].cb_calls, 1);
    ck_assert_int_eq(p[n].cb_calls + p[n].eb_calls, 0);
    df_deferred_unref(d);
    ck_assert_int_eq(p[n].cb_calls + p[n].eb_calls, 0);

    /* Same on a fired deferred kept paused, so that entries pile up. */
    memset(p, 0, sizeof p);
    TU_OK(df_succeed(L, NULL, NULL, &d));
    TU_OK(df_deferred_pause(d));
    atomic_store(&g_ca.fail, 1);
    n = add_until_enomem(d, p, 64);
    atomic_store(&g_ca.fail, 0);
    TU_OK(df_deferred_unpause(d));
    for (size_t i = 0; i < n; i++)
        ck_assert_int_eq(p[i].cb_calls, 1);
    ck_assert_int_eq(p[n].cb_calls + p[n].eb_calls, 0);
    df_deferred_unref(d);
    ck_assert_int_eq(p[n].cb_calls + p[n].eb_calls, 0);
}
END_TEST

/* Departure (C): df_deferred_chain fails with DF_ENOMEM without taking a
 * reference to the other deferred. */
START_TEST(test_deferred_chain_enomem)
{
    df_deferred *d, *other;
    probe p[64] = {{0}}, po = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_new(L, &other));
    add_probe_handle(other, &po);
    atomic_store(&g_ca.fail, 1);
    (void)add_until_enomem(d, p, 64);
    TU_ERR(df_deferred_chain(d, other), DF_ENOMEM);
    atomic_store(&g_ca.fail, 0);
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert(!df_deferred_called(other));
    df_deferred_unref(other); /* the last reference: fails it */
    ck_assert_int_eq(po.eb_calls, 1);
    ck_assert_int_eq(po.code, DF_ECANCELLED);
    df_deferred_unref(d);
}
END_TEST

/* Departure (C): when the inner deferred cannot record the outer's
 * continuation, the outer goes on with a DF_ENOMEM failure and the inner
 * reference is dropped. */
START_TEST(test_deferred_wait_enomem)
{
    df_deferred *outer, *inner;
    probe p[64] = {{0}}, po = {0};
    TU_OK(df_deferred_new(L, &outer));
    TU_OK(df_deferred_new(L, &inner));
    TU_OK(df_deferred_add_callback(outer, cb_wait_ref, inner));
    add_probe_handle(outer, &po);
    atomic_store(&g_ca.fail, 1);
    size_t n = add_until_enomem(inner, p, 64);
    TU_OK(df_deferred_callback(outer, NULL, NULL));
    atomic_store(&g_ca.fail, 0);
    ck_assert_int_eq(po.eb_calls, 1);
    ck_assert_int_eq(po.code, DF_ENOMEM);
    ck_assert(!df_deferred_paused(outer));
    TU_OK(df_deferred_callback(inner, NULL, NULL));
    for (size_t i = 0; i < n; i++)
        ck_assert_int_eq(p[i].cb_calls, 1);
    df_deferred_unref(outer);
    df_deferred_unref(inner);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* ============================================================ stack */

/*
 * Long chains.  `top` waits on d1, which waits on d2, ..., which waits on
 * `last`; every middle deferred is held only by the one waiting on it.
 * All of this runs in a thread whose stack is 256 KiB, with its own loop
 * created inside that thread (the loop thread is its creator), so that
 * recursion per link would overflow long before 10^6 links.  Nothing in
 * the thread may call ck_assert: it records, the test thread checks.
 */
enum {
    DEEP_FIRE,          /* fire last: the value reaches top's callback */
    DEEP_RELEASE_TOP,   /* drop top first, then last (all still waiting) */
    DEEP_RELEASE_LAST,  /* drop last first, then top */
    DEEP_CANCEL,        /* cancel top: last's canceller runs */
    DEEP_CHAIN_FIRE,    /* df_deferred_chain links: fire the first */
    DEEP_CHAIN_RELEASE  /* df_deferred_chain links: drop them unfired */
};

typedef struct deep {
    size_t n;              /* links */
    int mode;
    bool top_probe;        /* add the recording pair to top */
    counting_alloc ca;
    df_allocator alloc;
    int rc;                /* first failing call */
    int line;              /* and where */
    int cb_calls, eb_calls;
    int code;
    void *seen;
    int cancels;
    uint64_t unhandled;
    uintptr_t frame;       /* frame address seen by the recording callback */
} deep;

#define DEEP_TRY(dp, expr)                                                     \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        if (rc_ != 0 && (dp)->rc == 0) {                                       \
            (dp)->rc = rc_;                                                    \
            (dp)->line = __LINE__;                                             \
        }                                                                      \
    } while (0)

static int g_deep_marker;

static df_result deep_cb(df_result r, void *arg)
{
    deep *dp = arg;
    dp->cb_calls++;
    dp->seen = r.value;
    dp->frame = (uintptr_t)__builtin_frame_address(0);
    return r;
}

static df_result deep_eb(df_result r, void *arg)
{
    deep *dp = arg;
    dp->eb_calls++;
    dp->code = df_failure_code(r.failure);
    dp->frame = (uintptr_t)__builtin_frame_address(0);
    df_result_clear(&r);
    return r;
}

static void deep_canceller(df_deferred *d, void *arg)
{
    (void)d;
    ((deep *)arg)->cancels++;
}

/* Builds top -> ... -> last with n links; returns both, owned.  Each
 * deferred gets its waiting callback before the one above it fires (and
 * so queues its continuation after that callback), as in Twisted's test. */
static void deep_build(df_loop *loop, deep *dp, df_deferred **top_out,
                       df_deferred **last_out)
{
    df_deferred *top, *cur, *nd, *prev = NULL;
    *top_out = *last_out = NULL;
    DEEP_TRY(dp, df_deferred_new(loop, &top));
    if (dp->rc != 0)
        return;
    cur = top;
    for (size_t i = 0; i < dp->n && dp->rc == 0; i++) {
        if (i + 1 == dp->n)
            DEEP_TRY(dp, df_deferred_new_cancellable(loop, deep_canceller, dp,
                                                     &nd));
        else
            DEEP_TRY(dp, df_deferred_new(loop, &nd));
        if (dp->rc != 0)
            break;
        DEEP_TRY(dp, df_deferred_add_callback(cur, cb_wait,
                                              df_deferred_ref(nd)));
        if (cur == top && dp->top_probe)
            DEEP_TRY(dp, df_deferred_add_callbacks(top, deep_cb, deep_eb,
                                                   dp));
        if (prev != NULL) {
            /* prev waits on cur now; cur is held by prev from here on. */
            DEEP_TRY(dp, df_deferred_callback(prev, NULL, NULL));
            if (prev != top)
                df_deferred_unref(prev);
        }
        prev = cur;
        cur = nd;
    }
    if (prev != NULL) {
        DEEP_TRY(dp, df_deferred_callback(prev, NULL, NULL));
        if (prev != top)
            df_deferred_unref(prev);
    }
    *top_out = top;
    *last_out = cur;
}

/* d0 -chain-> d1 -chain-> ... -> dn, each held by the previous link. */
static void deep_build_chain(df_loop *loop, deep *dp, df_deferred **first_out,
                             df_deferred **last_out)
{
    df_deferred *first, *cur, *nd;
    *first_out = *last_out = NULL;
    DEEP_TRY(dp, df_deferred_new(loop, &first));
    if (dp->rc != 0)
        return;
    cur = first;
    for (size_t i = 0; i < dp->n && dp->rc == 0; i++) {
        DEEP_TRY(dp, df_deferred_new(loop, &nd));
        if (dp->rc != 0)
            break;
        DEEP_TRY(dp, df_deferred_chain(cur, nd));
        if (cur != first)
            df_deferred_unref(cur);
        cur = nd;
    }
    DEEP_TRY(dp, df_deferred_add_callbacks(cur, deep_cb, deep_eb, dp));
    *first_out = first;
    *last_out = cur;
}

static void deep_unhandled(df_failure *f, void *arg)
{
    (void)f;
    (void)arg;
}

static void deep_run(df_loop *loop, deep *dp)
{
    df_deferred *top, *last;
    switch (dp->mode) {
    case DEEP_FIRE:
        deep_build(loop, dp, &top, &last);
        DEEP_TRY(dp, df_deferred_callback(last, &g_deep_marker, NULL));
        df_deferred_unref(last);
        df_deferred_unref(top);
        break;
    case DEEP_RELEASE_TOP:
        deep_build(loop, dp, &top, &last);
        df_deferred_unref(top);
        df_deferred_unref(last);
        break;
    case DEEP_RELEASE_LAST:
        deep_build(loop, dp, &top, &last);
        df_deferred_unref(last);
        df_deferred_unref(top);
        break;
    case DEEP_CANCEL:
        deep_build(loop, dp, &top, &last);
        DEEP_TRY(dp, df_deferred_cancel(top));
        df_deferred_unref(last);
        df_deferred_unref(top);
        break;
    case DEEP_CHAIN_FIRE:
        deep_build_chain(loop, dp, &top, &last);
        DEEP_TRY(dp, df_deferred_callback(top, &g_deep_marker, NULL));
        df_deferred_unref(top);
        df_deferred_unref(last);
        break;
    case DEEP_CHAIN_RELEASE:
        deep_build_chain(loop, dp, &top, &last);
        df_deferred_unref(top);
        df_deferred_unref(last);
        break;
    }
}

static void *deep_main(void *arg)
{
    deep *dp = arg;
    df_loop *loop;
    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    dp->alloc = (df_allocator){ca_malloc, ca_realloc, ca_free, &dp->ca};
    o.allocator = &dp->alloc;
    o.unhandled = deep_unhandled;
    DEEP_TRY(dp, df_loop_new(&o, &loop));
    if (dp->rc != 0)
        return NULL;
    deep_run(loop, dp);
    dp->unhandled = df_loop_unhandled_count(loop);
    DEEP_TRY(dp, df_loop_free(loop));
    return NULL;
}

#define DEEP_N 1000000
#define SMALL_STACK (256 * 1024)

/* Runs one deep scenario on a 256 KiB stack and checks it freed all. */
static void deep_on_small_stack(deep *dp)
{
    pthread_attr_t a;
    pthread_t t;
    dp->top_probe = true;
    ck_assert_int_eq(pthread_attr_init(&a), 0);
    ck_assert_int_eq(pthread_attr_setstacksize(&a, SMALL_STACK), 0);
    ck_assert_int_eq(pthread_create(&t, &a, deep_main, dp), 0);
    ck_assert_int_eq(pthread_attr_destroy(&a), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    ck_assert_msg(dp->rc == 0, "line %d: %s", dp->line, df_err_name(dp->rc));
    ck_assert_msg(atomic_load(&dp->ca.live) == 0, "%ld blocks leaked",
                  (long)atomic_load(&dp->ca.live));
}

/* Twisted: DeferredTests.test_boundedStackDepth (the recording callback
 * runs at the same stack depth however many deferreds are chained). */
START_TEST(test_deferred_bounded_stack_depth)
{
    uintptr_t frames[3];
    static const size_t links[3] = {1, 2, 1000};
    for (int i = 0; i < 3; i++) {
        deep dp = {.n = links[i], .mode = DEEP_FIRE, .top_probe = true};
        df_deferred *top, *last;
        deep_build(L, &dp, &top, &last);
        ck_assert_msg(dp.rc == 0, "line %d: %s", dp.line,
                      df_err_name(dp.rc));
        ck_assert_int_eq(dp.cb_calls, 0);
        TU_OK(df_deferred_callback(last, &g_deep_marker, NULL));
        ck_assert_int_eq(dp.cb_calls, 1);
        ck_assert_ptr_eq(dp.seen, &g_deep_marker);
        frames[i] = dp.frame;
        df_deferred_unref(last);
        df_deferred_unref(top);
    }
    ck_assert_msg(frames[0] == frames[1] && frames[1] == frames[2],
                  "callback frames at %#lx, %#lx, %#lx",
                  (unsigned long)frames[0], (unsigned long)frames[1],
                  (unsigned long)frames[2]);
}
END_TEST

/* Departure (Twisted relies on its own bounded recursion): 10^6 nested
 * implicit chains fire on a 256 KiB stack. */
START_TEST(test_deferred_deep_implicit_chain)
{
    deep dp = {.n = DEEP_N, .mode = DEEP_FIRE};
    deep_on_small_stack(&dp);
    ck_assert_int_eq(dp.cb_calls, 1);
    ck_assert_int_eq(dp.eb_calls, 0);
    ck_assert_ptr_eq(dp.seen, &g_deep_marker);
    ck_assert_uint_eq(dp.unhandled, 0);
}
END_TEST

/* Departure (C: no GC): a 10^6-deep chain, all still waiting, released by
 * dropping every user reference, in either order, in constant stack;
 * top's pair runs once with DF_ECANCELLED and nothing is reported. */
START_TEST(test_deferred_deep_release)
{
    deep dp = {.n = DEEP_N, .mode = DEEP_RELEASE_TOP};
    deep_on_small_stack(&dp);
    ck_assert_int_eq(dp.cb_calls + dp.eb_calls, 1);
    ck_assert_int_eq(dp.code, DF_ECANCELLED);
    ck_assert_uint_eq(dp.unhandled, 0);

    deep dp2 = {.n = DEEP_N, .mode = DEEP_RELEASE_LAST};
    deep_on_small_stack(&dp2);
    ck_assert_int_eq(dp2.cb_calls + dp2.eb_calls, 1);
    ck_assert_int_eq(dp2.code, DF_ECANCELLED);
    ck_assert_uint_eq(dp2.unhandled, 0);
}
END_TEST

/* Twisted: DeferredCancellerTests.test_cancelNestedDeferred, 10^6 deep
 * (departure: constant stack): cancelling the top cancels the innermost
 * deferred, and the failure comes back up. */
START_TEST(test_deferred_deep_cancel)
{
    deep dp = {.n = DEEP_N, .mode = DEEP_CANCEL};
    deep_on_small_stack(&dp);
    ck_assert_int_eq(dp.cancels, 1);
    ck_assert_int_eq(dp.eb_calls, 1);
    ck_assert_int_eq(dp.code, DF_ECANCELLED);
    ck_assert_int_eq(dp.cb_calls, 0);
    ck_assert_uint_eq(dp.unhandled, 0);
}
END_TEST

/* Departure: 10^6 chainDeferred links forward a result, and release an
 * unfired one, in constant stack. */
START_TEST(test_deferred_deep_chain_deferred)
{
    deep dp = {.n = DEEP_N, .mode = DEEP_CHAIN_FIRE};
    deep_on_small_stack(&dp);
    ck_assert_int_eq(dp.cb_calls, 1);
    ck_assert_ptr_eq(dp.seen, &g_deep_marker);

    deep dp2 = {.n = DEEP_N, .mode = DEEP_CHAIN_RELEASE};
    deep_on_small_stack(&dp2);
    ck_assert_int_eq(dp2.eb_calls, 1);
    ck_assert_int_eq(dp2.code, DF_ECANCELLED);
}
END_TEST

/* ===================================================== more edges */

/* Twisted: no dedicated test (addBoth, used by AlreadyCalledTests.
 * testSwitchDebugging): the same function on both sides. */
START_TEST(test_deferred_add_both)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_both(d, probe_cb, &p));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(p.cb_calls, 1);
    df_deferred_unref(d);

    memset(&p, 0, sizeof p);
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_both(d, probe_eb_handle, &p));
    TU_OK(df_deferred_errback(d, failure(-64, "both")));
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -64);
    df_deferred_unref(d);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

static int g_refire_rc;
static df_result cb_refire(df_result r, void *arg)
{
    int *v = box(2);
    g_refire_rc = df_deferred_callback(arg, v, box_free);
    if (g_refire_rc != 0)
        box_free(v);
    return r;
}

/* Twisted: no dedicated test: a callback firing its own deferred again
 * gets AlreadyCalled; the value stays with that callback. */
START_TEST(test_deferred_already_called_inside_callback)
{
    df_deferred *d;
    probe p = {0};
    g_refire_rc = 0;
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_add_callback(d, cb_refire, d));
    add_probe(d, &p);
    int *v = box(1);
    TU_OK(df_deferred_callback(d, v, box_free));
    TU_ERR(g_refire_rc, DF_EALREADY_CALLED);
    ck_assert_int_eq(p.cb_calls, 1);
    ck_assert_ptr_eq(p.value, v);
    df_deferred_unref(d);
    ck_assert_int_eq(g_box_frees, 2);
}
END_TEST

static void unref_canceller(df_deferred *d, void *arg)
{
    (*(int *)arg)++;
    df_deferred_unref(d);
}

/* Departure (C: explicit references): a canceller may drop the caller's
 * last reference; cancel still fails the deferred, its pairs run once,
 * and it is freed when cancel is done. */
START_TEST(test_deferred_canceller_drops_last_ref)
{
    df_deferred *d;
    int calls = 0;
    probe p = {0};
    TU_OK(df_deferred_new_cancellable(L, unref_canceller, &calls, &d));
    add_probe_handle(d, &p);
    TU_OK(df_deferred_cancel(d));
    ck_assert_int_eq(calls, 1);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, DF_ECANCELLED);
    ck_assert_int_eq(g_unhandled, 0);
}
END_TEST

/* Departure (C: no GC): releasing a fired deferred that is paused runs
 * its pending pairs with its real result; a failure they handle is not
 * reported. */
START_TEST(test_deferred_release_paused)
{
    df_deferred *d;
    probe p = {0};
    TU_OK(df_fail(L, failure(-65, "paused"), &d));
    TU_OK(df_deferred_pause(d));
    add_probe_handle(d, &p);
    ck_assert_int_eq(p.eb_calls, 0);
    df_deferred_unref(d);
    ck_assert_int_eq(p.eb_calls, 1);
    ck_assert_int_eq(p.code, -65);
    ck_assert_int_eq(g_unhandled, 0);
    ck_assert_int_eq(g_payload_frees, 1);
}
END_TEST

/* ============================================================ suite */

static TCase *tcase(Suite *s, const char *name)
{
    TCase *tc = tcase_create(name);
    tcase_add_checked_fixture(tc, setup, teardown);
    suite_add_tcase(s, tc);
    return tc;
}

/* ======================================================= Twisted fidelity */

/* Issue 15 item 6: a chain(a, b) whose b fires a paused waiter c must not
 * stop a's own chain: Twisted's b.callback() returns to a's loop and a's
 * next callback runs at once. */
START_TEST(test_deferred_chain_to_paused_waiter_runs_on)
{
    df_deferred *a, *b, *c;
    TU_OK(df_deferred_new(L, &a));
    TU_OK(df_deferred_new(L, &b));
    TU_OK(df_deferred_new(L, &c));
    TU_OK(df_deferred_chain(a, b));
    TU_OK(df_deferred_add_callback(a, cb_log, (void *)(intptr_t)1));
    TU_OK(df_deferred_callback(c, NULL, NULL));
    TU_OK(df_deferred_add_callback(c, cb_wait_ref, b));
    TU_OK(df_deferred_add_callback(c, cb_log, (void *)(intptr_t)3));
    TU_OK(df_deferred_pause(c));
    TU_OK(df_deferred_callback(a, NULL, NULL));
    ASSERT_LOG(1);
    TU_OK(df_deferred_unpause(c));
    ASSERT_LOG(1, 3);
    df_deferred_unref(a);
    df_deferred_unref(b);
    df_deferred_unref(c);
}
END_TEST

/* The same with two chains stacked: a -> b -> c, d waits on c and is
 * paused; a's and b's later callbacks still run, in Twisted's order. */
START_TEST(test_deferred_chain_chain_to_paused_waiter)
{
    df_deferred *a, *b, *c, *d;
    TU_OK(df_deferred_new(L, &a));
    TU_OK(df_deferred_new(L, &b));
    TU_OK(df_deferred_new(L, &c));
    TU_OK(df_deferred_new(L, &d));
    TU_OK(df_deferred_chain(a, b));
    TU_OK(df_deferred_add_callback(a, cb_log, (void *)(intptr_t)1));
    TU_OK(df_deferred_chain(b, c));
    TU_OK(df_deferred_add_callback(b, cb_log, (void *)(intptr_t)2));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    TU_OK(df_deferred_add_callback(d, cb_wait_ref, c));
    TU_OK(df_deferred_add_callback(d, cb_log, (void *)(intptr_t)4));
    TU_OK(df_deferred_pause(d));
    TU_OK(df_deferred_callback(a, NULL, NULL));
    ASSERT_LOG(2, 1);
    TU_OK(df_deferred_unpause(d));
    ASSERT_LOG(2, 1, 4);
    df_deferred_unref(a);
    df_deferred_unref(b);
    df_deferred_unref(c);
    df_deferred_unref(d);
}
END_TEST

/* Issue 15 item 7: a has fired with a value; chain(a, b) fires b, whose
 * callback returns df_wait(a).  Twisted hands b the value a holds at that
 * moment (the one it is firing b with); b gets the same pointer, without
 * a destructor, and a goes on with NULL. */
static int g_item7_value = 7;

START_TEST(test_deferred_chain_back_wait_gets_value)
{
    df_deferred *a, *b;
    probe pa = {0}, pb = {0};
    TU_OK(df_succeed(L, &g_item7_value, NULL, &a));
    TU_OK(df_deferred_new(L, &b));
    TU_OK(df_deferred_add_callback(b, cb_wait_ref, a));
    TU_OK(df_deferred_add_callbacks(b, probe_cb, probe_eb, &pb));
    TU_OK(df_deferred_chain(a, b));
    TU_OK(df_deferred_add_callbacks(a, probe_cb, probe_eb, &pa));
    ck_assert_int_eq(pb.cb_calls, 1);
    ck_assert_ptr_eq(pb.value, &g_item7_value);
    ck_assert_int_eq(pa.cb_calls, 1);
    ck_assert_ptr_null(pa.value);
    df_deferred_unref(a);
    df_deferred_unref(b);
}
END_TEST

/* The same with a failure: b gets a's failure (shared by reference), a
 * goes on with NULL, as in Twisted. */
START_TEST(test_deferred_chain_back_wait_gets_failure)
{
    df_deferred *a, *b;
    probe pa = {0}, pb = {0};
    TU_OK(df_fail(L, df_failure_new(L, 42, NULL), &a));
    TU_OK(df_deferred_new(L, &b));
    TU_OK(df_deferred_add_errback(b, cb_wait_ref, a));
    TU_OK(df_deferred_add_callbacks(b, probe_cb, probe_eb_handle, &pb));
    TU_OK(df_deferred_chain(a, b));
    TU_OK(df_deferred_add_callbacks(a, probe_cb, probe_eb, &pa));
    ck_assert_int_eq(pb.eb_calls, 1);
    ck_assert_int_eq(pb.code, 42);
    ck_assert_int_eq(pa.cb_calls, 1);
    ck_assert_ptr_null(pa.value);
    df_deferred_unref(a);
    df_deferred_unref(b);
}
END_TEST

/* Found by the differential test (seed 870): a deferred that has just
 * handed its result to a waiter through a continuation holds None; a
 * callback of a second waiter that returns df_wait() on it again takes
 * that None at once (Twisted), instead of waiting for the rest of its
 * chain. */
static df_result cb_log_value(df_result r, void *arg)
{
    log_push((int)(intptr_t)arg * 100 + (r.value == NULL ? 0 : 1));
    return r;
}

START_TEST(test_deferred_wait_again_on_handing_over)
{
    df_deferred *d0, *d1, *d3;
    static int one = 1, three = 3, five = 5;
    TU_OK(df_deferred_new(L, &d0));
    TU_OK(df_succeed(L, &one, NULL, &d1));
    TU_OK(df_deferred_add_callback(d1, cb_wait_ref, d0));
    TU_OK(df_succeed(L, &three, NULL, &d3));
    TU_OK(df_deferred_add_callback(d3, cb_wait_ref, d0));
    TU_OK(df_deferred_add_callback(d3, cb_wait_ref, d0));
    TU_OK(df_deferred_add_callback(d3, cb_log_value, (void *)(intptr_t)3));
    TU_OK(df_deferred_add_callback(d0, cb_log_value, (void *)(intptr_t)2));
    TU_OK(df_deferred_callback(d0, &five, NULL));
    TU_OK(df_deferred_add_callback(d1, cb_log_value, (void *)(intptr_t)1));
    ASSERT_LOG(300, 200, 101);
    df_deferred_unref(d0);
    df_deferred_unref(d1);
    df_deferred_unref(d3);
}
END_TEST

static void add_fidelity_tests(Suite *s)
{
    TCase *tc = tcase(s, "twisted_fidelity");
    tcase_add_test(tc, test_deferred_chain_to_paused_waiter_runs_on);
    tcase_add_test(tc, test_deferred_chain_chain_to_paused_waiter);
    tcase_add_test(tc, test_deferred_chain_back_wait_gets_value);
    tcase_add_test(tc, test_deferred_chain_back_wait_gets_failure);
    tcase_add_test(tc, test_deferred_wait_again_on_handing_over);
}

static Suite *deferred_suite(void)
{
    Suite *s = suite_create("deferred");
    TCase *tc;

    tc = tcase(s, "chain");
    tcase_add_test(tc, test_deferred_callback_without_args);
    tcase_add_test(tc, test_deferred_callback_with_args);
    tcase_add_test(tc, test_deferred_two_callbacks);
    tcase_add_test(tc, test_deferred_null_errback_passes_through);
    tcase_add_test(tc, test_deferred_null_callback_passes_through);
    tcase_add_test(tc, test_deferred_callback_failure_switches_side);
    tcase_add_test(tc, test_deferred_errback_recovers);
    tcase_add_test(tc, test_deferred_exactly_one_of_pair);
    tcase_add_test(tc, test_deferred_resolve_sides);
    tcase_add_test(tc, test_deferred_add_both);

    tc = tcase(s, "fired");
    tcase_add_test(tc, test_deferred_immediate_success);
    tcase_add_test(tc, test_deferred_immediate_failure);
    tcase_add_test(tc, test_deferred_add_after_fire_runs_at_once);
    tcase_add_test(tc, test_deferred_reentrant_run_callbacks);
    tcase_add_test(tc, test_deferred_non_reentrant_callbacks);
    tcase_add_test(tc, test_deferred_reentrant_run_callbacks_with_failure);

    tc = tcase(s, "already_called");
    tcase_add_test(tc, test_deferred_already_called_cc);
    tcase_add_test(tc, test_deferred_already_called_ce);
    tcase_add_test(tc, test_deferred_already_called_ee);
    tcase_add_test(tc, test_deferred_already_called_ec);
    tcase_add_test(tc, test_deferred_already_called_inside_callback);

    tc = tcase(s, "implicit");
    tcase_add_test(tc, test_deferred_synchronous_implicit_chain);
    tcase_add_test(tc, test_deferred_asynchronous_implicit_chain);
    tcase_add_test(tc, test_deferred_synchronous_implicit_error_chain);
    tcase_add_test(tc, test_deferred_asynchronous_implicit_error_chain);
    tcase_add_test(tc, test_deferred_double_asynchronous_implicit_chaining);
    tcase_add_test(tc, test_deferred_nested_asynchronous_chained_deferreds);
    tcase_add_test(tc,
                   test_deferred_nested_asynchronous_chained_deferreds_extra);
    tcase_add_test(tc, test_deferred_inner_callbacks_preserved);
    tcase_add_test(tc, test_deferred_continue_callback_not_first);
    tcase_add_test(tc, test_deferred_callback_order_preserved);
    tcase_add_test(tc, test_deferred_result_of_result_of_fired);
    tcase_add_test(tc, test_deferred_chained_paused_with_result);
    tcase_add_test(tc, test_deferred_paused_deferred_chained);
    tcase_add_test(tc, test_deferred_return_deferred);
    tcase_add_test(tc, test_deferred_errback_waits);
    tcase_add_test(tc, test_deferred_circular_chain);
    tcase_add_test(tc, test_deferred_wait_other_loop);

    tc = tcase(s, "chain_deferred");
    tcase_add_test(tc, test_deferred_chain_deferred);
    tcase_add_test(tc, test_deferred_chain_deferred_failure);
    tcase_add_test(tc, test_deferred_chain_deferred_after_fire);
    tcase_add_test(tc, test_deferred_chain_deferred_to_fired);
    tcase_add_test(tc, test_deferred_chain_deferred_to_cancelled);
    tcase_add_test(tc, test_deferred_chain_deferred_self);

    tc = tcase(s, "pause");
    tcase_add_test(tc, test_deferred_paused_failure);
    tcase_add_test(tc, test_deferred_unpause_before_callback);
    tcase_add_test(tc, test_deferred_pause_counts);
    tcase_add_test(tc, test_deferred_unpause_not_paused);
    tcase_add_test(tc, test_deferred_unpause_waiting);
    tcase_add_test(tc, test_deferred_pause_inside_callback);

    tc = tcase(s, "cancel");
    tcase_add_test(tc, test_deferred_cancel_no_canceller);
    tcase_add_test(tc, test_deferred_cancel_then_callback);
    tcase_add_test(tc, test_deferred_cancel_then_errback);
    tcase_add_test(tc, test_deferred_cancel_multiple_after_callback);
    tcase_add_test(tc, test_deferred_cancel_multiple_after_errback);
    tcase_add_test(tc, test_deferred_cancel_multiple);
    tcase_add_test(tc, test_deferred_canceller_multiple_cancel);
    tcase_add_test(tc, test_deferred_simple_canceller);
    tcase_add_test(tc, test_deferred_canceller_arg);
    tcase_add_test(tc, test_deferred_cancel_after_callback);
    tcase_add_test(tc, test_deferred_cancel_after_errback);
    tcase_add_test(tc, test_deferred_canceller_that_errbacks);
    tcase_add_test(tc, test_deferred_canceller_that_callbacks);
    tcase_add_test(tc, test_deferred_cancel_nested);
    tcase_add_test(tc, test_deferred_cancel_nested_twice);
    tcase_add_test(tc, test_deferred_canceller_drops_last_ref);

    tc = tcase(s, "release");
    tcase_add_test(tc, test_deferred_release_unfired);
    tcase_add_test(tc, test_deferred_release_unfired_recovered);
    tcase_add_test(tc, test_deferred_release_needs_last_ref);
    tcase_add_test(tc, test_deferred_unref_inside_callback);
    tcase_add_test(tc, test_deferred_release_waiting_outer);
    tcase_add_test(tc, test_deferred_release_wait_during_release);
    tcase_add_test(tc, test_deferred_release_resurrected);
    tcase_add_test(tc, test_deferred_paused_outer_inner_callbacks);
    tcase_add_test(tc, test_deferred_release_paused);

    tc = tcase(s, "unhandled");
    tcase_add_test(tc, test_deferred_unhandled_reported_once);
    tcase_add_test(tc, test_deferred_unhandled_not_when_handled);
    tcase_add_test(tc, test_deferred_unhandled_passed_on);
    tcase_add_test(tc, test_deferred_unhandled_chained_error_cleanup);
    tcase_add_test(tc, test_deferred_unhandled_once_through_wait);
    tcase_add_test(tc, test_deferred_unhandled_cleared_by_chaining);
    tcase_add_test(tc, test_deferred_unhandled_cancelled);
    tcase_add_test(tc, test_deferred_unhandled_chain_deferred);
    tcase_add_test(tc, test_deferred_unhandled_set_hook);

    tc = tcase(s, "values");
    tcase_add_test(tc, test_deferred_value_freed_on_release);
    tcase_add_test(tc, test_deferred_value_replaced);
    tcase_add_test(tc, test_deferred_value_through_wait);
    tcase_add_test(tc, test_deferred_value_failure_payload);

    tc = tcase(s, "maybe");
    tcase_add_test(tc, test_deferred_maybe_sync);
    tcase_add_test(tc, test_deferred_maybe_sync_failure);
    tcase_add_test(tc, test_deferred_maybe_async);
    tcase_add_test(tc, test_deferred_maybe_async_error);
    tcase_add_test(tc, test_deferred_maybe_calls_once);
    tcase_add_test(tc, test_deferred_maybe_null_out);

    tc = tcase(s, "arguments");
    tcase_add_test(tc, test_deferred_null_arguments);
    tcase_add_test(tc, test_deferred_resolve_wait_einval);
    tcase_add_test(tc, test_deferred_peek);
    tcase_add_test(tc, test_deferred_wrong_thread);

    tc = tcase(s, "enomem");
    tcase_add_test(tc, test_deferred_new_enomem);
    tcase_add_test(tc, test_deferred_add_callbacks_enomem);
    tcase_add_test(tc, test_deferred_chain_enomem);
    tcase_add_test(tc, test_deferred_wait_enomem);

    tc = tcase(s, "stack");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_deferred_bounded_stack_depth);
    tcase_add_test(tc, test_deferred_deep_implicit_chain);
    tcase_add_test(tc, test_deferred_deep_release);
    tcase_add_test(tc, test_deferred_deep_cancel);
    tcase_add_test(tc, test_deferred_deep_chain_deferred);

    add_fidelity_tests(s);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(deferred_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
