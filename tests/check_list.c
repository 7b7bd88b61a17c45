/* SPDX-License-Identifier: MIT */
/* Tests for deferred lists and gather, ported from Twisted's test_defer.py. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* An application error code, standing in for Twisted's GenericError. */
#define GENERIC_ERROR 1001

/* --------------------------------------------------------------- fixture */

/* Each test gets a fresh loop whose unhandled-failure hook counts. */
static df_loop *loop;
static int nunhandled;     /* calls of the unhandled hook */
static int unhandled_code; /* code of the last failure reported */
static int nfreed;         /* calls of val_free */

/* A counting allocator whose budget a test can limit (-1: no limit). */
static long alloc_budget = -1;

static void *budget_malloc(size_t size, void *ctx)
{
    (void)ctx;
    if (alloc_budget == 0)
        return NULL;
    if (alloc_budget > 0)
        alloc_budget--;
    return malloc(size);
}

static void *budget_realloc(void *ptr, size_t size, void *ctx)
{
    (void)ctx;
    if (alloc_budget == 0)
        return NULL;
    if (alloc_budget > 0)
        alloc_budget--;
    return realloc(ptr, size);
}

static void budget_free(void *ptr, void *ctx)
{
    (void)ctx;
    free(ptr);
}

static const df_allocator budget_allocator = {budget_malloc, budget_realloc,
                                              budget_free, NULL};

static void on_unhandled(df_failure *f, void *arg)
{
    (void)arg;
    nunhandled++;
    unhandled_code = df_failure_code(f);
}

static void setup(void)
{
    df_loop_options opts = DF_LOOP_OPTIONS_INIT;

    opts.allocator = &budget_allocator;
    alloc_budget = -1;
    TU_OK(df_loop_new(&opts, &loop));
    TU_OK(df_loop_set_unhandled(loop, on_unhandled, NULL));
    nunhandled = 0;
    unhandled_code = 0;
    nfreed = 0;
}

static void teardown(void)
{
    alloc_budget = -1;
    tu_loop_free(loop);
    loop = NULL;
}

/* --------------------------------------------------------------- helpers */

/* A heap value whose destructor counts, so that tests can check that each
 * destructor runs exactly once (and valgrind that nothing leaks). */
static int *val(int n)
{
    int *p = malloc(sizeof *p);

    ck_assert_ptr_nonnull(p);
    *p = n;
    return p;
}

static void val_free(void *p)
{
    nfreed++;
    free(p);
}

static df_deferred *new_deferred(void)
{
    df_deferred *d = NULL;

    TU_OK(df_deferred_new(loop, &d));
    return d;
}

static df_deferred *succeeded(int n)
{
    df_deferred *d = NULL;

    TU_OK(df_succeed(loop, val(n), val_free, &d));
    return d;
}

static df_failure *generic_error(const char *msg)
{
    return df_failure_new(loop, GENERIC_ERROR, "%s", msg);
}

static df_deferred *failed(const char *msg)
{
    df_deferred *d = NULL;

    TU_OK(df_fail(loop, generic_error(msg), &d));
    return d;
}

static void fire(df_deferred *d, int n)
{
    TU_OK(df_deferred_callback(d, val(n), val_free));
}

static void fire_error(df_deferred *d, const char *msg)
{
    TU_OK(df_deferred_errback(d, generic_error(msg)));
}

/* Takes over whatever reaches it: Twisted's `result.append` callbacks. */
struct capture {
    int calls;
    df_result r;
};

static df_result capture_cb(df_result r, void *arg)
{
    struct capture *c = arg;

    c->calls++;
    df_result_clear(&c->r);
    c->r = r;
    return df_ok(NULL, NULL);
}

static void capture_on(df_deferred *d, struct capture *c)
{
    memset(c, 0, sizeof *c);
    TU_OK(df_deferred_add_both(d, capture_cb, c));
}

/* The list result a capture holds; asserts it succeeded. */
static const df_list_result *captured_result(const struct capture *c)
{
    ck_assert_int_eq(c->calls, 1);
    ck_assert_ptr_null(c->r.failure);
    ck_assert_ptr_nonnull(c->r.value);
    return c->r.value;
}

/* The failure a capture holds; asserts it has `code`. */
static df_failure *captured_failure(const struct capture *c, int code)
{
    ck_assert_int_eq(c->calls, 1);
    ck_assert_ptr_nonnull(c->r.failure);
    ck_assert_int_eq(df_failure_code(c->r.failure), code);
    return c->r.failure;
}

/* Twisted's `lambda e: None` errback; counts its calls in *arg if given. */
static df_result swallow(df_result r, void *arg)
{
    if (arg != NULL)
        (*(int *)arg)++;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

/* Twisted's failureResultOf(d, code): the failure d holds now, handled. */
static df_failure *failure_result_of(df_deferred *d, int code)
{
    df_failure *f = NULL;

    TU_OK(df_deferred_peek(d, NULL, &f));
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(df_failure_code(f), code);
    f = df_failure_ref(f);
    TU_OK(df_deferred_add_errback(d, swallow, NULL));
    /* The caller gets a reference of its own and releases it. */
    return f;
}

static void expect_failure(df_deferred *d, int code)
{
    df_failure_unref(failure_result_of(d, code));
}

/* Twisted's successResultOf(list): the list result, borrowed. */
static const df_list_result *success_result_of(df_deferred *d)
{
    void *v = NULL;
    df_failure *f = NULL;

    TU_OK(df_deferred_peek(d, &v, &f));
    ck_assert_ptr_null(f);
    ck_assert_ptr_nonnull(v);
    return v;
}

/* df_list_result_get(r, i) must agree with the one-field accessors, with
 * and without its out pointers; the entry_* helpers below check it on
 * every entry they look at. */
static void check_get(const df_list_result *r, size_t i)
{
    void *v = &v;            /* not NULL: get must overwrite them */
    df_failure *f = (df_failure *)&f;
    bool ok = df_list_result_get(r, i, &v, &f);

    ck_assert(ok == df_list_result_ok(r, i));
    ck_assert_ptr_eq(v, df_list_result_value(r, i));
    ck_assert_ptr_eq(f, df_list_result_failure(r, i));
    ck_assert(df_list_result_get(r, i, NULL, NULL) == ok);
    v = &v;
    ck_assert(df_list_result_get(r, i, &v, NULL) == ok);
    ck_assert_ptr_eq(v, df_list_result_value(r, i));
    f = (df_failure *)&f;
    ck_assert(df_list_result_get(r, i, NULL, &f) == ok);
    ck_assert_ptr_eq(f, df_list_result_failure(r, i));
}

static int entry_int(const df_list_result *r, size_t i)
{
    check_get(r, i);
    ck_assert(df_list_result_fired(r, i));
    ck_assert(df_list_result_ok(r, i));
    ck_assert_ptr_nonnull(df_list_result_value(r, i));
    return *(int *)df_list_result_value(r, i);
}

static df_failure *entry_failure(const df_list_result *r, size_t i, int code)
{
    check_get(r, i);
    ck_assert(df_list_result_fired(r, i));
    ck_assert(!df_list_result_ok(r, i));
    ck_assert_ptr_null(df_list_result_value(r, i));
    ck_assert_ptr_nonnull(df_list_result_failure(r, i));
    ck_assert_int_eq(df_failure_code(df_list_result_failure(r, i)), code);
    return df_list_result_failure(r, i);
}

static void entry_unfired(const df_list_result *r, size_t i)
{
    check_get(r, i);
    ck_assert(!df_list_result_fired(r, i));
    ck_assert(!df_list_result_ok(r, i));
    ck_assert_ptr_null(df_list_result_value(r, i));
    ck_assert_ptr_null(df_list_result_failure(r, i));
}

static void unref_all(df_deferred **d, size_t n)
{
    for (size_t i = 0; i < n; i++)
        df_deferred_unref(d[i]);
}

/* Twisted's fakeCallbackCanceller: fires the deferred while cancelling. */
static char callback_result[] = "Callback Result";

static void fake_callback_canceller(df_deferred *d, void *arg)
{
    (void)arg;
    TU_OK(df_deferred_callback(d, callback_result, NULL));
}

static df_deferred *callback_on_cancel(void)
{
    df_deferred *d = NULL;

    TU_OK(df_deferred_new_cancellable(loop, fake_callback_canceller, NULL, &d));
    return d;
}

/* A canceller that only counts how often it ran. */
static void counting_canceller(df_deferred *d, void *arg)
{
    (void)d;
    (*(int *)arg)++;
}

/* ------------------------------------------------------------- basics */

/* Twisted: DeferredTests.testDeferredList */
START_TEST(test_list_results_in_order)
{
    df_deferred *d[3] = {new_deferred(), new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;
    int caught = 0;

    TU_OK(df_list_new(loop, d, 3, 0, &dl));
    capture_on(dl, &c);
    fire(d[0], 1);
    ck_assert_int_eq(c.calls, 0);
    /* The errback added after the list sees the failure the list saw. */
    TU_OK(df_deferred_add_errback(d[1], swallow, &caught));
    fire_error(d[1], "2");
    ck_assert_int_eq(caught, 1);
    ck_assert_int_eq(c.calls, 0);
    fire(d[2], 3);

    const df_list_result *r = captured_result(&c);
    ck_assert_uint_eq(df_list_result_count(r), 3);
    ck_assert_int_eq(df_list_result_index(r), -1);
    ck_assert_int_eq(entry_int(r, 0), 1);
    df_failure *f = entry_failure(r, 1, GENERIC_ERROR);
    ck_assert_str_eq(df_failure_message(f), "2");
    ck_assert_int_eq(entry_int(r, 2), 3);

    df_deferred_unref(dl);
    unref_all(d, 3);
    ck_assert_int_eq(nfreed, 0); /* the values moved into the result */
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.testEmptyDeferredList (first half) and
 * DeferredListEmptyTests.testDeferredListEmpty */
START_TEST(test_list_empty)
{
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, NULL, 0, 0, &dl));
    ck_assert(df_deferred_called(dl));
    capture_on(dl, &c);
    const df_list_result *r = captured_result(&c);
    ck_assert_uint_eq(df_list_result_count(r), 0);
    ck_assert_int_eq(df_list_result_index(r), -1);
    df_deferred_unref(dl);
    df_result_clear(&c.r);
}
END_TEST

/* Twisted: DeferredTests.testEmptyDeferredList (second half).  A departure:
 * Twisted never fires an empty list with fireOnOneCallback; the header
 * says an empty list fires at once whatever the flags. */
START_TEST(test_list_empty_fire_on_one_callback)
{
    unsigned flags[] = {
        DF_LIST_FIRE_ON_ONE_CALLBACK, DF_LIST_FIRE_ON_ONE_ERRBACK,
        DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_FIRE_ON_ONE_ERRBACK |
            DF_LIST_CONSUME_ERRORS | DF_LIST_CANCEL_REMAINING};

    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        df_deferred *dl = NULL;
        struct capture c;

        TU_OK(df_list_new(loop, NULL, 0, flags[i], &dl));
        capture_on(dl, &c);
        const df_list_result *r = captured_result(&c);
        ck_assert_uint_eq(df_list_result_count(r), 0);
        ck_assert_int_eq(df_list_result_index(r), -1);
        df_deferred_unref(dl);
        df_result_clear(&c.r);
    }
}
END_TEST

/* Twisted: DeferredTests.testDeferredListWithAlreadyFiredDeferreds */
START_TEST(test_list_already_fired)
{
    df_deferred *d[2] = {failed("Bang"), succeeded(2)};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    capture_on(dl, &c);
    const df_list_result *r = captured_result(&c);
    entry_failure(r, 0, GENERIC_ERROR);
    ck_assert_int_eq(entry_int(r, 1), 2);

    TU_OK(df_deferred_add_errback(d[0], swallow, NULL));
    df_deferred_unref(dl);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.testDeferredList (order).  Members firing out of
 * order still give their results in input order. */
START_TEST(test_list_out_of_order)
{
    df_deferred *d[4] = {new_deferred(), new_deferred(), new_deferred(),
                         succeeded(0)};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 4, 0, &dl));
    capture_on(dl, &c);
    fire(d[2], 2);
    fire(d[0], 10);
    ck_assert_int_eq(c.calls, 0);
    fire(d[1], 1);
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(entry_int(r, 0), 10);
    ck_assert_int_eq(entry_int(r, 1), 1);
    ck_assert_int_eq(entry_int(r, 2), 2);
    ck_assert_int_eq(entry_int(r, 3), 0);
    df_deferred_unref(dl);
    unref_all(d, 4);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 4);
}
END_TEST

/* Twisted: DeferredTests.test_continueCallbackNotFirst.  A callback that
 * returns a gather makes its chain wait for it. */
static df_deferred *gather_member;

static df_result return_gather(df_result r, void *arg)
{
    df_deferred *g = NULL;

    (void)arg;
    df_result_clear(&r);
    TU_OK(df_gather(loop, &gather_member, 1, 0, &g));
    return df_wait(g);
}

START_TEST(test_list_gather_from_callback)
{
    df_deferred *outer = succeeded(0);
    struct capture c;

    gather_member = new_deferred();
    TU_OK(df_deferred_add_callback(outer, return_gather, NULL));
    capture_on(outer, &c);
    ck_assert_int_eq(c.calls, 0);
    fire(gather_member, 7);
    const df_list_result *r = captured_result(&c);
    ck_assert_uint_eq(df_list_result_count(r), 1);
    ck_assert_int_eq(entry_int(r, 0), 7);
    df_deferred_unref(outer);
    df_deferred_unref(gather_member);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* ---------------------------------------------------------- fire on one */

/* Twisted: DeferredTests.testDeferredListFireOnOneError */
START_TEST(test_list_fire_on_one_errback)
{
    df_deferred *d[3] = {new_deferred(), new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 3, DF_LIST_FIRE_ON_ONE_ERRBACK, &dl));
    capture_on(dl, &c);
    TU_OK(df_deferred_add_errback(d[1], swallow, NULL));

    fire(d[0], 1);
    ck_assert_int_eq(c.calls, 0);
    fire_error(d[1], "from def2");
    df_failure *f = captured_failure(&c, DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_index(f), 1);
    ck_assert_ptr_nonnull(df_failure_cause(f));
    ck_assert_int_eq(df_failure_code(df_failure_cause(f)), GENERIC_ERROR);
    ck_assert_str_eq(df_failure_message(df_failure_cause(f)), "from def2");
    /* The list failed: the value it had taken from d[0] is destroyed. */
    ck_assert_int_eq(nfreed, 1);

    /* A member firing after the list keeps its value and destructor. */
    fire(d[2], 3);
    ck_assert_int_eq(nfreed, 1);
    void *v = NULL;
    TU_OK(df_deferred_peek(d[2], &v, NULL));
    ck_assert_int_eq(*(int *)v, 3);

    df_deferred_unref(dl);
    unref_all(d, 3);
    ck_assert_int_eq(nfreed, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: FirstErrorTests.test_str and test_repr.  The FirstError failure
 * names the index and the cause. */
START_TEST(test_list_first_error_message)
{
    df_deferred *d[6];
    df_deferred *dl = NULL;

    for (size_t i = 0; i < 6; i++)
        d[i] = new_deferred();
    TU_OK(df_list_new(
        loop, d, 6, DF_LIST_FIRE_ON_ONE_ERRBACK | DF_LIST_CONSUME_ERRORS, &dl));
    fire_error(d[5], "some text");
    df_failure *f = failure_result_of(dl, DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_index(f), 5);
    ck_assert_ptr_nonnull(strstr(df_failure_message(f), "5"));
    ck_assert_ptr_nonnull(strstr(df_failure_message(f), "some text"));
    /* The cause is shared by reference, not copied. */
    df_failure *cause = NULL;
    ck_assert_int_eq(df_deferred_peek(d[5], NULL, &cause), 0);
    ck_assert_ptr_null(cause); /* consumed on the member's chain */
    ck_assert_str_eq(df_failure_message(df_failure_cause(f)), "some text");
    df_failure_unref(f);
    df_deferred_unref(dl);
    unref_all(d, 6);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted:
 * DeferredTests.testDeferredListFireOnOneErrorWithAlreadyFiredDeferreds */
START_TEST(test_list_fire_on_one_errback_already_fired)
{
    df_deferred *d[2] = {failed("Bang"), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_ERRBACK, &dl));
    capture_on(dl, &c);
    df_failure *f = captured_failure(&c, DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_index(f), 0);

    TU_OK(df_deferred_add_errback(d[0], swallow, NULL));
    df_deferred_unref(dl);
    /* d[1] never fires: dropping the last reference cancels it, and that
     * cancellation is the library's own, so nothing is reported. */
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredList docstring, fireOnOneCallback (fires with the
 * result and the index of the member that fired). */
START_TEST(test_list_fire_on_one_callback)
{
    df_deferred *d[3] = {new_deferred(), new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 3, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl));
    capture_on(dl, &c);
    TU_OK(df_deferred_add_errback(d[0], swallow, NULL));
    fire_error(d[0], "first");
    ck_assert_int_eq(c.calls, 0);
    fire(d[1], 1);

    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(df_list_result_index(r), 1);
    entry_failure(r, 0, GENERIC_ERROR);
    ck_assert_int_eq(entry_int(r, 1), 1);
    entry_unfired(r, 2);

    /* The late member is not recorded and keeps its value. */
    fire(d[2], 2);
    entry_unfired(r, 2);
    ck_assert_int_eq(nfreed, 0);
    void *v = NULL;
    TU_OK(df_deferred_peek(d[2], &v, NULL));
    ck_assert_int_eq(*(int *)v, 2);

    df_deferred_unref(dl);
    unref_all(d, 3);
    ck_assert_int_eq(nfreed, 1); /* d[2]'s, by d[2] */
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 2); /* d[1]'s, by the result */
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredList._cbDeferred.  With fireOnOneCallback and every
 * member failing, the list fires once all have, with the whole list. */
START_TEST(test_list_fire_on_one_callback_all_fail)
{
    df_deferred *d[2] = {new_deferred(), failed("a")};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2,
                      DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_CONSUME_ERRORS,
                      &dl));
    capture_on(dl, &c);
    ck_assert_int_eq(c.calls, 0);
    fire_error(d[0], "b");
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(df_list_result_index(r), -1);
    ck_assert_str_eq(df_failure_message(entry_failure(r, 0, GENERIC_ERROR)),
                     "b");
    ck_assert_str_eq(df_failure_message(entry_failure(r, 1, GENERIC_ERROR)),
                     "a");
    df_deferred_unref(dl);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredList._cbDeferred.  With fireOnOneErrback and every
 * member succeeding, the list fires with the whole list. */
START_TEST(test_list_fire_on_one_errback_all_succeed)
{
    df_deferred *d[2] = {new_deferred(), succeeded(1)};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_ERRBACK, &dl));
    capture_on(dl, &c);
    fire(d[0], 0);
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(df_list_result_index(r), -1);
    ck_assert_int_eq(entry_int(r, 0), 0);
    ck_assert_int_eq(entry_int(r, 1), 1);
    df_deferred_unref(dl);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 2);
}
END_TEST

/* Twisted: DeferredList._cbDeferred.  With both flags, whichever comes
 * first decides. */
START_TEST(test_list_fire_on_either)
{
    const unsigned both =
        DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_FIRE_ON_ONE_ERRBACK;
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    /* A success first. */
    TU_OK(df_list_new(loop, d, 2, both, &dl));
    capture_on(dl, &c);
    fire(d[1], 1);
    ck_assert_int_eq(df_list_result_index(captured_result(&c)), 1);
    fire_error(d[0], "late");
    TU_OK(df_deferred_add_errback(d[0], swallow, NULL));
    df_deferred_unref(dl);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);

    /* A failure first. */
    d[0] = new_deferred();
    d[1] = new_deferred();
    TU_OK(df_list_new(loop, d, 2, both, &dl));
    capture_on(dl, &c);
    fire_error(d[0], "early");
    ck_assert_int_eq(df_failure_index(captured_failure(&c, DF_EFIRST_ERROR)),
                     0);
    fire(d[1], 2);
    TU_OK(df_deferred_add_errback(d[0], swallow, NULL));
    df_deferred_unref(dl);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* ------------------------------------------------------ consume errors */

/* Twisted: DeferredTests.testDeferredListDontConsumeErrors */
START_TEST(test_list_dont_consume_errors)
{
    df_deferred *d1 = new_deferred();
    df_deferred *dl = NULL;
    struct capture trap, c;

    TU_OK(df_list_new(loop, &d1, 1, 0, &dl));
    capture_on(d1, &trap);
    capture_on(dl, &c);
    fire_error(d1, "Bang");

    df_failure *f = captured_failure(&trap, GENERIC_ERROR);
    ck_assert_str_eq(df_failure_message(f), "Bang");
    const df_list_result *r = captured_result(&c);
    /* One failure, shared by the list and the member's chain. */
    ck_assert_ptr_eq(entry_failure(r, 0, GENERIC_ERROR), f);
    df_deferred_unref(dl);
    df_deferred_unref(d1);
    df_result_clear(&trap.r);
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.testDeferredListConsumeErrors */
START_TEST(test_list_consume_errors)
{
    df_deferred *d1 = new_deferred();
    df_deferred *dl = NULL;
    struct capture trap, c;

    TU_OK(df_list_new(loop, &d1, 1, DF_LIST_CONSUME_ERRORS, &dl));
    capture_on(d1, &trap);
    capture_on(dl, &c);
    fire_error(d1, "Bang");

    /* The member's chain goes on with a NULL success. */
    ck_assert_int_eq(trap.calls, 1);
    ck_assert(df_result_ok(&trap.r));
    ck_assert_ptr_null(trap.r.value);
    const df_list_result *r = captured_result(&c);
    ck_assert_str_eq(df_failure_message(entry_failure(r, 0, GENERIC_ERROR)),
                     "Bang");
    df_deferred_unref(dl);
    df_deferred_unref(d1);
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.testDeferredListDontConsumeErrors (the trap is
 * what keeps Twisted's log quiet).  Without CONSUME_ERRORS a member failure
 * nobody handles is still reported when the member is released. */
START_TEST(test_list_unhandled_without_consume)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    capture_on(dl, &c);
    fire_error(d[0], "one");
    fire_error(d[1], "two");
    captured_result(&c);
    df_deferred_unref(dl);
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 2);
    ck_assert_int_eq(unhandled_code, GENERIC_ERROR);
}
END_TEST

/* Twisted: DeferredTests.testDeferredListConsumeErrors (no 'Unhandled
 * error in Deferred').  With CONSUME_ERRORS nothing is reported. */
START_TEST(test_list_consume_errors_no_unhandled)
{
    df_deferred *d[3] = {new_deferred(), failed("early"), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 3, DF_LIST_CONSUME_ERRORS, &dl));
    capture_on(dl, &c);
    fire_error(d[0], "one");
    fire_error(d[2], "three");
    const df_list_result *r = captured_result(&c);
    for (size_t i = 0; i < 3; i++)
        entry_failure(r, i, GENERIC_ERROR);
    unref_all(d, 3);
    df_deferred_unref(dl);
    /* The failures live on in the result until it is freed. */
    ck_assert_str_eq(df_failure_message(df_list_result_failure(r, 1)), "early");
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredList._cbDeferred (consumeErrors applies after the list
 * has fired too).  A late failure is consumed as well. */
START_TEST(test_list_consume_errors_late)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c, trap;

    TU_OK(df_list_new(loop, d, 2,
                      DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_CONSUME_ERRORS,
                      &dl));
    capture_on(dl, &c);
    fire(d[0], 0);
    entry_unfired(captured_result(&c), 1);
    fire_error(d[1], "late");
    capture_on(d[1], &trap);
    ck_assert(df_result_ok(&trap.r));
    entry_unfired(captured_result(&c), 1);
    df_deferred_unref(dl);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* --------------------------------------------------------------- gather */

/* Twisted: DeferredTests.test_gatherResults */
START_TEST(test_list_gather)
{
    df_deferred *d[2] = {succeeded(1), succeeded(2)};
    df_deferred *g = NULL;
    struct capture c;

    TU_OK(df_gather(loop, d, 2, 0, &g));
    capture_on(g, &c);
    const df_list_result *r = captured_result(&c);
    ck_assert_uint_eq(df_list_result_count(r), 2);
    ck_assert_int_eq(entry_int(r, 0), 1);
    ck_assert_int_eq(entry_int(r, 1), 2);
    df_deferred_unref(g);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 2);

    /* A failing list. */
    d[0] = succeeded(1);
    d[1] = failed("value error");
    TU_OK(df_gather(loop, d, 2, 0, &g));
    capture_on(g, &c);
    df_failure *f = captured_failure(&c, DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_index(f), 1);
    ck_assert_int_eq(df_failure_code(df_failure_cause(f)), GENERIC_ERROR);
    /* Get rid of the member's error. */
    TU_OK(df_deferred_add_errback(d[1], swallow, NULL));
    df_deferred_unref(g);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 3);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_gatherResultsWithConsumeErrors */
START_TEST(test_list_gather_consume_errors)
{
    df_deferred *d[2] = {succeeded(1), failed("oh noes")};
    df_deferred *g = NULL;
    struct capture c;
    int unconsumed = 0;

    TU_OK(df_gather(loop, d, 2, DF_LIST_CONSUME_ERRORS, &g));
    TU_OK(df_deferred_add_errback(d[1], swallow, &unconsumed));
    capture_on(g, &c);
    ck_assert_int_eq(unconsumed, 0);
    df_failure *f = captured_failure(&c, DF_EFIRST_ERROR);
    ck_assert_str_eq(df_failure_message(df_failure_cause(f)), "oh noes");
    df_deferred_unref(g);
    unref_all(d, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: gatherResults([]) fires with an empty list. */
START_TEST(test_list_gather_empty)
{
    df_deferred *g = NULL;

    TU_OK(df_gather(loop, NULL, 0, 0, &g));
    ck_assert_uint_eq(df_list_result_count(success_result_of(g)), 0);
    df_deferred_unref(g);
}
END_TEST

/* Twisted: gatherResults takes only consumeErrors; ours also takes
 * CANCEL_REMAINING, and refuses the other flags. */
START_TEST(test_list_gather_flags)
{
    df_deferred *d = new_deferred();
    df_deferred *g = NULL;

    TU_ERR(df_gather(loop, &d, 1, DF_LIST_FIRE_ON_ONE_CALLBACK, &g), DF_EINVAL);
    TU_ERR(df_gather(loop, &d, 1, DF_LIST_FIRE_ON_ONE_ERRBACK, &g), DF_EINVAL);
    TU_ERR(df_gather(loop, &d, 1, 1u << 9, &g), DF_EINVAL);
    ck_assert_ptr_null(g);
    TU_OK(df_gather(loop, &d, 1,
                    DF_LIST_CONSUME_ERRORS | DF_LIST_CANCEL_REMAINING, &g));
    fire(d, 4);
    ck_assert_int_eq(entry_int(success_result_of(g), 0), 4);
    df_deferred_unref(g);
    df_deferred_unref(d);
    ck_assert_int_eq(nfreed, 1);
}
END_TEST

/* Twisted: gatherResults is DeferredList(fireOnOneErrback=True).  Every
 * value is destroyed exactly once whether it moved into the result before
 * the failure or arrived after it. */
START_TEST(test_list_gather_values_freed_once)
{
    df_deferred *d[4] = {succeeded(0), new_deferred(), new_deferred(),
                         new_deferred()};
    df_deferred *g = NULL;

    TU_OK(df_gather(loop, d, 4, DF_LIST_CONSUME_ERRORS, &g));
    fire(d[1], 1);
    ck_assert_int_eq(nfreed, 0);
    fire_error(d[2], "bad");
    expect_failure(g, DF_EFIRST_ERROR);
    ck_assert_int_eq(nfreed, 2); /* d[0] and d[1], owned by the result */
    fire(d[3], 3);
    ck_assert_int_eq(nfreed, 2); /* d[3] keeps its own */
    df_deferred_unref(g);
    unref_all(d, 4);
    ck_assert_int_eq(nfreed, 3);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* --------------------------------------------------------------- cancel */

/* Twisted: DeferredTests.test_cancelDeferredList */
START_TEST(test_list_cancel)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    TU_OK(df_deferred_cancel(dl));
    expect_failure(d[0], DF_ECANCELLED);
    expect_failure(d[1], DF_ECANCELLED);
    /* Both members failed, so the list fired with both failures. */
    const df_list_result *r = success_result_of(dl);
    entry_failure(r, 0, DF_ECANCELLED);
    entry_failure(r, 1, DF_ECANCELLED);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelDeferredListCallback */
START_TEST(test_list_cancel_callback)
{
    df_deferred *d[2] = {callback_on_cancel(), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    TU_OK(df_deferred_cancel(dl));
    expect_failure(d[1], DF_ECANCELLED);
    const df_list_result *r = success_result_of(dl);
    ck_assert(df_list_result_ok(r, 0));
    ck_assert_str_eq(df_list_result_value(r, 0), "Callback Result");
    entry_failure(r, 1, DF_ECANCELLED);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelDeferredListWithFireOnOneCallback */
START_TEST(test_list_cancel_fire_on_one_callback)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl));
    TU_OK(df_deferred_cancel(dl));
    expect_failure(d[0], DF_ECANCELLED);
    expect_failure(d[1], DF_ECANCELLED);
    /* No success: the list fired with both failures at the end. */
    const df_list_result *r = success_result_of(dl);
    ck_assert_int_eq(df_list_result_index(r), -1);
    entry_failure(r, 0, DF_ECANCELLED);
    entry_failure(r, 1, DF_ECANCELLED);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted:
 * DeferredTests.test_cancelDeferredListWithFireOnOneCallbackAndDeferredCallback
 */
START_TEST(test_list_cancel_fire_on_one_callback_member_callback)
{
    df_deferred *d[2] = {callback_on_cancel(), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl));
    TU_OK(df_deferred_cancel(dl));
    expect_failure(d[1], DF_ECANCELLED);
    const df_list_result *r = success_result_of(dl);
    ck_assert_int_eq(df_list_result_index(r), 0);
    ck_assert_str_eq(df_list_result_value(r, 0), "Callback Result");
    /* The list fired before d[1] was cancelled: not recorded. */
    entry_unfired(r, 1);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelDeferredListWithFireOnOneErrback */
START_TEST(test_list_cancel_fire_on_one_errback)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_ERRBACK, &dl));
    TU_OK(df_deferred_cancel(dl));
    expect_failure(d[0], DF_ECANCELLED);
    expect_failure(d[1], DF_ECANCELLED);
    df_failure *f = failure_result_of(dl, DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_index(f), 0);
    ck_assert_int_eq(df_failure_code(df_failure_cause(f)), DF_ECANCELLED);
    df_failure_unref(f);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted:
 * DeferredTests.test_cancelDeferredListWithFireOnOneErrbackAllDeferredsCallback
 */
START_TEST(test_list_cancel_fire_on_one_errback_all_callback)
{
    df_deferred *d[2] = {callback_on_cancel(), callback_on_cancel()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_ERRBACK, &dl));
    TU_OK(df_deferred_cancel(dl));
    const df_list_result *r = success_result_of(dl);
    ck_assert_str_eq(df_list_result_value(r, 0), "Callback Result");
    ck_assert_str_eq(df_list_result_value(r, 1), "Callback Result");
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelDeferredListWithOriginalDeferreds.  The
 * list borrows the array: changing it afterwards changes nothing. */
START_TEST(test_list_cancel_original_members)
{
    df_deferred *d[3] = {new_deferred(), new_deferred(), new_deferred()};
    df_deferred *arg[2] = {d[0], d[1]};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, arg, 2, 0, &dl));
    arg[1] = d[2];
    TU_OK(df_deferred_cancel(dl));
    expect_failure(d[0], DF_ECANCELLED);
    expect_failure(d[1], DF_ECANCELLED);
    ck_assert(!df_deferred_called(d[2]));
    df_deferred_unref(dl);
    unref_all(d, 3);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelDeferredListWithException.  C has no
 * exceptions; the nearest misbehaviour is a canceller that fails its
 * deferred with an error of its own: the other members are still
 * cancelled. */
static void failing_canceller(df_deferred *d, void *arg)
{
    (void)arg;
    fire_error(d, "test");
}

START_TEST(test_list_cancel_member_canceller_fails)
{
    df_deferred *d[2] = {NULL, new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_deferred_new_cancellable(loop, failing_canceller, NULL, &d[0]));
    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    TU_OK(df_deferred_cancel(dl));
    expect_failure(d[0], GENERIC_ERROR);
    expect_failure(d[1], DF_ECANCELLED);
    const df_list_result *r = success_result_of(dl);
    entry_failure(r, 0, GENERIC_ERROR);
    entry_failure(r, 1, DF_ECANCELLED);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelFiredOnOneCallbackDeferredList */
START_TEST(test_list_cancel_fired_on_one_callback)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl));
    fire(d[0], 0);
    TU_OK(df_deferred_cancel(dl));
    ck_assert(!df_deferred_called(d[1]));
    ck_assert_int_eq(df_list_result_index(success_result_of(dl)), 0);
    fire(d[1], 1);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nfreed, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelFiredOnOneErrbackDeferredList */
START_TEST(test_list_cancel_fired_on_one_errback)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_ERRBACK, &dl));
    fire_error(d[0], "test");
    TU_OK(df_deferred_cancel(dl));
    ck_assert(!df_deferred_called(d[1]));
    expect_failure(d[0], GENERIC_ERROR);
    expect_failure(dl, DF_EFIRST_ERROR);
    fire(d[1], 1);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelGatherResults */
START_TEST(test_list_gather_cancel)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *g = NULL;

    TU_OK(df_gather(loop, d, 2, 0, &g));
    TU_OK(df_deferred_cancel(g));
    expect_failure(d[0], DF_ECANCELLED);
    expect_failure(d[1], DF_ECANCELLED);
    df_failure *f = failure_result_of(g, DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_code(df_failure_cause(f)), DF_ECANCELLED);
    df_failure_unref(f);
    df_deferred_unref(g);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredTests.test_cancelGatherResultsWithAllDeferredsCallback */
START_TEST(test_list_gather_cancel_all_callback)
{
    df_deferred *d[2] = {callback_on_cancel(), callback_on_cancel()};
    df_deferred *g = NULL;

    TU_OK(df_gather(loop, d, 2, 0, &g));
    TU_OK(df_deferred_cancel(g));
    const df_list_result *r = success_result_of(g);
    ck_assert_str_eq(df_list_result_value(r, 0), "Callback Result");
    ck_assert_str_eq(df_list_result_value(r, 1), "Callback Result");
    df_deferred_unref(g);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Twisted: DeferredList.cancel forwards to fired members too, so a member
 * that fired but waits on an inner deferred has that inner cancelled. */
static df_deferred *inner_deferred;

static df_result wait_inner(df_result r, void *arg)
{
    (void)arg;
    df_result_clear(&r);
    return df_wait(df_deferred_ref(inner_deferred));
}

START_TEST(test_list_cancel_waiting_member)
{
    df_deferred *d[2] = {succeeded(0), new_deferred()};
    df_deferred *dl = NULL;

    inner_deferred = new_deferred();
    TU_OK(df_deferred_add_callback(d[0], wait_inner, NULL));
    TU_OK(df_list_new(loop, d, 2, DF_LIST_CONSUME_ERRORS, &dl));
    TU_OK(df_deferred_cancel(dl));
    ck_assert(df_deferred_called(inner_deferred));
    const df_list_result *r = success_result_of(dl);
    entry_failure(r, 0, DF_ECANCELLED);
    entry_failure(r, 1, DF_ECANCELLED);
    df_deferred_unref(dl);
    unref_all(d, 2);
    df_deferred_unref(inner_deferred);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Beyond Twisted: CANCEL_REMAINING cancels the members that had not fired
 * once a first success fired the list, after the list's callbacks ran. */
static df_result check_unfired_cb(df_result r, void *arg)
{
    df_deferred *other = arg;

    ck_assert(!df_deferred_called(other));
    return r;
}

START_TEST(test_list_cancel_remaining_on_callback)
{
    int cancelled[3] = {0, 0, 0};
    df_deferred *d[3];
    df_deferred *dl = NULL;
    struct capture c;

    for (size_t i = 0; i < 3; i++)
        TU_OK(df_deferred_new_cancellable(loop, counting_canceller,
                                          &cancelled[i], &d[i]));
    TU_OK(df_list_new(loop, d, 3,
                      DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_CANCEL_REMAINING,
                      &dl));
    TU_OK(df_deferred_add_callback(dl, check_unfired_cb, d[2]));
    capture_on(dl, &c);
    fire(d[1], 1);
    ck_assert_int_eq(cancelled[0], 1);
    ck_assert_int_eq(cancelled[1], 0);
    ck_assert_int_eq(cancelled[2], 1);
    expect_failure(d[0], DF_ECANCELLED);
    expect_failure(d[2], DF_ECANCELLED);
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(df_list_result_index(r), 1);
    entry_unfired(r, 0);
    entry_unfired(r, 2);
    df_deferred_unref(dl);
    unref_all(d, 3);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Beyond Twisted: CANCEL_REMAINING with a first error (gather). */
START_TEST(test_list_cancel_remaining_on_errback)
{
    int cancelled = 0;
    df_deferred *d[3] = {new_deferred(), new_deferred(), NULL};
    df_deferred *g = NULL;

    TU_OK(df_deferred_new_cancellable(loop, counting_canceller, &cancelled,
                                      &d[2]));
    TU_OK(df_gather(loop, d, 3, DF_LIST_CANCEL_REMAINING, &g));
    fire(d[0], 0);
    fire_error(d[1], "boom");
    ck_assert_int_eq(cancelled, 1);
    df_failure *f = failure_result_of(g, DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_index(f), 1);
    df_failure_unref(f);
    expect_failure(d[1], GENERIC_ERROR);
    expect_failure(d[2], DF_ECANCELLED);
    df_deferred_unref(g);
    unref_all(d, 3);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Beyond Twisted: a member already fired when the list is built makes it
 * fire at once, and the others are cancelled before df_list_new returns. */
START_TEST(test_list_cancel_remaining_at_construction)
{
    df_deferred *d[3] = {new_deferred(), succeeded(1), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 3,
                      DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_CANCEL_REMAINING |
                          DF_LIST_CONSUME_ERRORS,
                      &dl));
    ck_assert(df_deferred_called(d[0]));
    ck_assert(df_deferred_called(d[2]));
    const df_list_result *r = success_result_of(dl);
    ck_assert_int_eq(df_list_result_index(r), 1);
    entry_unfired(r, 0);
    entry_unfired(r, 2);
    df_deferred_unref(dl);
    unref_all(d, 3);
    ck_assert_int_eq(nfreed, 1);
    /* CONSUME_ERRORS: the cancellations are not reported either. */
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Beyond Twisted: without the flag an early-firing list leaves the other
 * members alone; with it a list that fires normally cancels nothing. */
START_TEST(test_list_cancel_remaining_only_when_early)
{
    int cancelled[2] = {0, 0};
    df_deferred *d[2];
    df_deferred *dl = NULL;

    for (size_t i = 0; i < 2; i++)
        TU_OK(df_deferred_new_cancellable(loop, counting_canceller,
                                          &cancelled[i], &d[i]));
    TU_OK(df_list_new(loop, d, 2, DF_LIST_CANCEL_REMAINING, &dl));
    fire(d[0], 0);
    fire(d[1], 1);
    ck_assert_int_eq(cancelled[0] + cancelled[1], 0);
    ck_assert_int_eq(entry_int(success_result_of(dl), 1), 1);
    df_deferred_unref(dl);
    unref_all(d, 2);

    for (size_t i = 0; i < 2; i++)
        TU_OK(df_deferred_new_cancellable(loop, counting_canceller,
                                          &cancelled[i], &d[i]));
    TU_OK(df_list_new(loop, d, 2, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl));
    fire(d[0], 2);
    ck_assert_int_eq(cancelled[1], 0);
    ck_assert(!df_deferred_called(d[1]));
    fire(d[1], 3);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nfreed, 4);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* ------------------------------------------------------------ lifetimes */

/* Ownership: a member's value moves into the result; the member's chain
 * goes on with the same pointer and no destructor. */
START_TEST(test_list_value_moves)
{
    df_deferred *d = new_deferred();
    df_deferred *dl = NULL;
    struct capture c;
    int *v = val(5);

    TU_OK(df_list_new(loop, &d, 1, 0, &dl));
    capture_on(dl, &c);
    TU_OK(df_deferred_callback(d, v, val_free));
    void *seen = NULL;
    TU_OK(df_deferred_peek(d, &seen, NULL));
    ck_assert_ptr_eq(seen, v);
    ck_assert_ptr_eq(df_list_result_value(captured_result(&c), 0), v);
    df_deferred_unref(d);
    df_deferred_unref(dl);
    ck_assert_int_eq(nfreed, 0);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);
}
END_TEST

/* Members released by the caller right after building the list: the list
 * keeps them alive until they fire. */
START_TEST(test_list_members_released_early)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *producer[2];
    df_deferred *dl = NULL;
    struct capture c;

    producer[0] = df_deferred_ref(d[0]);
    producer[1] = df_deferred_ref(d[1]);
    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    capture_on(dl, &c);
    unref_all(d, 2);
    fire(producer[0], 0);
    df_deferred_unref(producer[0]);
    fire_error(producer[1], "x");
    TU_OK(df_deferred_add_errback(producer[1], swallow, NULL));
    df_deferred_unref(producer[1]);
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(entry_int(r, 0), 0);
    entry_failure(r, 1, GENERIC_ERROR);
    df_deferred_unref(dl);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Everything abandoned unfired: releasing the list deferred fails it with
 * DF_ECANCELLED (as for any deferred), the list lets go of the members,
 * which are then cancelled by their own release.  Nothing leaks. */
START_TEST(test_list_all_abandoned)
{
    df_deferred *d[2] = {new_deferred(), succeeded(1)};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    capture_on(dl, &c);
    unref_all(d, 2);
    ck_assert_int_eq(nfreed, 0); /* d[1]'s value is in the list */
    df_deferred_unref(dl);
    captured_failure(&c, DF_ECANCELLED);
    ck_assert_int_eq(nfreed, 1); /* destroyed with the undelivered result */
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* The list deferred released before its members fire: its chain runs with
 * DF_ECANCELLED, and later member values stay with their members. */
START_TEST(test_list_released_before_members_fire)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_CANCEL_REMAINING, &dl));
    capture_on(dl, &c);
    df_deferred_unref(dl);
    captured_failure(&c, DF_ECANCELLED);
    /* Release is not cancel: the members were not cancelled. */
    ck_assert(!df_deferred_called(d[0]));
    ck_assert(!df_deferred_called(d[1]));
    fire(d[0], 0);
    fire(d[1], 1);
    ck_assert_int_eq(nfreed, 0);
    unref_all(d, 2);
    ck_assert_int_eq(nfreed, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* The result taken out of the chain outlives the list deferred and its
 * members. */
START_TEST(test_list_result_outlives_list)
{
    df_deferred *d[2] = {succeeded(1), failed("f")};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_CONSUME_ERRORS, &dl));
    capture_on(dl, &c);
    df_deferred_unref(dl);
    unref_all(d, 2);
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(entry_int(r, 0), 1);
    ck_assert_str_eq(df_failure_message(entry_failure(r, 1, GENERIC_ERROR)),
                     "f");
    ck_assert_int_eq(nfreed, 0);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);
}
END_TEST

/* The early result freed, and the list deferred released, before the other
 * members fire: they still fire safely (valgrind / ASan watch this). */
START_TEST(test_list_result_freed_before_late_members)
{
    df_deferred *d[3] = {new_deferred(), new_deferred(), new_deferred()};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, d, 3,
                      DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_CONSUME_ERRORS,
                      &dl));
    fire(d[0], 0);
    df_deferred_unref(dl); /* frees the result: nothing else has it */
    ck_assert_int_eq(nfreed, 1);
    fire(d[1], 1);
    fire_error(d[2], "late");
    unref_all(d, 3);
    ck_assert_int_eq(nfreed, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* The same deferred twice: both entries see the value, which the result
 * destroys once. */
START_TEST(test_list_duplicate_member)
{
    df_deferred *d = new_deferred();
    df_deferred *m[2] = {d, d};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, m, 2, 0, &dl));
    fire(d, 9);
    const df_list_result *r = success_result_of(dl);
    ck_assert_ptr_eq(df_list_result_value(r, 0), df_list_result_value(r, 1));
    ck_assert_int_eq(entry_int(r, 1), 9);
    df_deferred_unref(d);
    df_deferred_unref(dl);
    ck_assert_int_eq(nfreed, 1);
}
END_TEST

/* One deferred in two lists: the first list takes the value, the second
 * borrows it; it is destroyed once, by the first list's result. */
START_TEST(test_list_member_in_two_lists)
{
    df_deferred *d = new_deferred();
    df_deferred *l1 = NULL, *l2 = NULL;

    TU_OK(df_list_new(loop, &d, 1, 0, &l1));
    TU_OK(df_list_new(loop, &d, 1, 0, &l2));
    fire(d, 3);
    ck_assert_int_eq(entry_int(success_result_of(l2), 0), 3);
    df_deferred_unref(l2);
    ck_assert_int_eq(nfreed, 0);
    df_deferred_unref(l1);
    ck_assert_int_eq(nfreed, 1);
    df_deferred_unref(d);
    ck_assert_int_eq(nfreed, 1);
}
END_TEST

/* A list of lists: the inner result moves into the outer one. */
START_TEST(test_list_nested)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *inner[2] = {NULL, NULL};
    df_deferred *outer = NULL;

    TU_OK(df_list_new(loop, &d[0], 1, 0, &inner[0]));
    TU_OK(df_gather(loop, &d[1], 1, 0, &inner[1]));
    TU_OK(df_list_new(loop, inner, 2, 0, &outer));
    fire(d[1], 1);
    fire(d[0], 0);
    const df_list_result *r = success_result_of(outer);
    const df_list_result *r0 = df_list_result_value(r, 0);
    const df_list_result *r1 = df_list_result_value(r, 1);
    ck_assert_int_eq(entry_int(r0, 0), 0);
    ck_assert_int_eq(entry_int(r1, 0), 1);
    unref_all(d, 2);
    unref_all(inner, 2);
    ck_assert_int_eq(nfreed, 0);
    df_deferred_unref(outer);
    ck_assert_int_eq(nfreed, 2);
}
END_TEST

/* The list deferred paused by its user and released before its members
 * fire: like any unfired deferred, its chain runs with DF_ECANCELLED, and
 * the list lets go of its members.  (Needs the core to run the chain of a
 * paused deferred on release; see the report.) */
START_TEST(test_list_paused_list_released)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    capture_on(dl, &c);
    TU_OK(df_deferred_pause(dl));
    df_deferred_unref(dl);
    captured_failure(&c, DF_ECANCELLED);
    fire(d[0], 0);
    fire(d[1], 1);
    unref_all(d, 2);
    ck_assert_int_eq(nfreed, 2);
    df_result_clear(&c.r);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* The list fires while its user has it paused, and is released without
 * being unpaused: nothing may leak.  (Same core dependency.) */
START_TEST(test_list_paused_list_fired_then_released)
{
    df_deferred *d = new_deferred();
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, &d, 1, 0, &dl));
    TU_OK(df_deferred_pause(dl));
    fire(d, 0);
    ck_assert(df_deferred_called(dl));
    df_deferred_unref(dl);
    ck_assert_int_eq(nfreed, 1);
    df_deferred_unref(d);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* --------------------------------------------------------------- arguments */

/* Not in Twisted (the header's argument checks): bad arguments return
 * DF_EINVAL and create nothing. */
START_TEST(test_list_invalid_args)
{
    df_deferred *d = new_deferred();
    df_deferred *bad[2] = {d, NULL};
    df_deferred *dl = NULL;
    struct capture c;

    TU_ERR(df_list_new(NULL, &d, 1, 0, &dl), DF_EINVAL);
    TU_ERR(df_list_new(loop, &d, 1, 0, NULL), DF_EINVAL);
    TU_ERR(df_list_new(loop, NULL, 1, 0, &dl), DF_EINVAL);
    TU_ERR(df_list_new(loop, bad, 2, 0, &dl), DF_EINVAL);
    TU_ERR(df_list_new(loop, &d, 1, 1u << 5, &dl), DF_EINVAL);
    TU_ERR(df_list_new(loop, bad, 2, DF_LIST_TAKE_REFS, &dl), DF_EINVAL);
    TU_ERR(df_gather(loop, &d, 1, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl),
           DF_EINVAL);
    TU_ERR(df_gather(NULL, &d, 1, 0, &dl), DF_EINVAL);
    TU_ERR(df_gather(loop, &d, 1, 0, NULL), DF_EINVAL);
    TU_ERR(df_gather(loop, bad, 2, 0, &dl), DF_EINVAL);
    ck_assert_ptr_null(dl);

    /* Nothing was attached to d: its value reaches our callback with its
     * destructor. */
    capture_on(d, &c);
    fire(d, 1);
    ck_assert_int_eq(c.calls, 1);
    ck_assert(c.r.free == val_free);
    df_deferred_unref(d);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 1);

    /* The accessors tolerate NULL and indexes out of range. */
    ck_assert_uint_eq(df_list_result_count(NULL), 0);
    ck_assert_int_eq(df_list_result_index(NULL), -1);
    ck_assert(!df_list_result_ok(NULL, 0));
    ck_assert(!df_list_result_fired(NULL, 0));
    ck_assert_ptr_null(df_list_result_value(NULL, 0));
    ck_assert_ptr_null(df_list_result_failure(NULL, 0));
    entry_unfired(NULL, 0);
    df_list_result_free(NULL);
    TU_OK(df_list_new(loop, NULL, 0, 0, &dl));
    entry_unfired(success_result_of(dl), 0);
    df_deferred_unref(dl);
}
END_TEST

/* Not in Twisted: every member must belong to the list's loop. */
START_TEST(test_list_wrong_loop)
{
    df_loop *other = tu_loop();
    df_deferred *d[2] = {new_deferred(), NULL};
    df_deferred *dl = NULL;

    TU_OK(df_deferred_new(other, &d[1]));
    TU_ERR(df_list_new(loop, d, 2, 0, &dl), DF_EINVAL);
    TU_ERR(df_gather(other, d, 2, 0, &dl), DF_EINVAL);
    ck_assert_ptr_null(dl);
    unref_all(d, 2);
    tu_loop_free(other);
}
END_TEST

/* Not in Twisted: a call from a thread other than the loop's is refused
 * with DF_EWRONG_THREAD. */
struct thread_call {
    df_deferred *member;
    int list_rc;
    int gather_rc;
};

static void *call_from_thread(void *arg)
{
    struct thread_call *t = arg;
    df_deferred *dl = NULL;

    t->list_rc = df_list_new(loop, &t->member, 1, 0, &dl);
    t->gather_rc = df_gather(loop, &t->member, 1, 0, &dl);
    return dl; /* must stay NULL */
}

START_TEST(test_list_wrong_thread)
{
    struct thread_call t = {new_deferred(), 0, 0};
    pthread_t thread;
    void *dl = &t;

    ck_assert_int_eq(pthread_create(&thread, NULL, call_from_thread, &t), 0);
    ck_assert_int_eq(pthread_join(thread, &dl), 0);
    ck_assert_int_eq(t.list_rc, DF_EWRONG_THREAD);
    ck_assert_int_eq(t.gather_rc, DF_EWRONG_THREAD);
    ck_assert_ptr_null(dl);
    df_deferred_unref(t.member);
}
END_TEST

/* Every allocation df_list_new makes may fail: it then returns DF_ENOMEM,
 * leaks nothing and leaves the members as they were (no callback runs, no
 * value loses its destructor). */
static df_result count_value(df_result r, void *arg)
{
    struct capture *c = arg;

    c->calls++;
    ck_assert_ptr_null(r.failure);
    ck_assert(r.free == val_free);
    return r;
}

START_TEST(test_list_out_of_memory)
{
    long budget;
    bool done = false;

    for (budget = 0; !done; budget++) {
        /* d[0] has succeeded and d[1] failed; d[2] has two callbacks
         * already, so that adding a third must grow its chain; d[3] is
         * fresh. */
        df_deferred *d[4] = {succeeded(0), failed("kept"), new_deferred(),
                             new_deferred()};
        struct capture seen = {0, {0}};
        df_deferred *dl = NULL;
        df_failure *f = NULL;
        void *v = NULL;
        int rc;

        ck_assert_int_lt(budget, 100);
        TU_OK(df_deferred_add_callback(d[2], count_value, &seen));
        TU_OK(df_deferred_add_callback(d[2], count_value, &seen));
        nfreed = 0;
        alloc_budget = budget;
        rc = df_list_new(loop, d, 4, DF_LIST_CONSUME_ERRORS, &dl);
        alloc_budget = -1;
        if (rc == 0) {
            done = true;
            fire(d[2], 2);
            fire(d[3], 3);
            ck_assert_int_eq(seen.calls, 2);
            const df_list_result *r = success_result_of(dl);
            entry_failure(r, 1, GENERIC_ERROR);
            ck_assert_int_eq(entry_int(r, 3), 3);
            /* CONSUME_ERRORS applied to d[1]. */
            TU_OK(df_deferred_peek(d[1], NULL, &f));
            ck_assert_ptr_null(f);
            df_deferred_unref(dl);
            unref_all(d, 4);
            ck_assert_int_eq(nfreed, 3);
            continue;
        }
        ck_assert_int_eq(rc, DF_ENOMEM);
        ck_assert_ptr_null(dl);
        /* d[0]'s value still has its destructor: releasing d[0] runs it. */
        TU_OK(df_deferred_peek(d[0], &v, NULL));
        ck_assert_int_eq(*(int *)v, 0);
        df_deferred_unref(d[0]);
        ck_assert_int_eq(nfreed, 1);
        /* d[1]'s failure was not consumed. */
        expect_failure(d[1], GENERIC_ERROR);
        /* d[2]'s callbacks see its value with the destructor. */
        fire(d[2], 2);
        ck_assert_int_eq(seen.calls, 2);
        fire(d[3], 3);
        unref_all(&d[1], 3);
        ck_assert_int_eq(nfreed, 3);
    }
    /* The block, the list deferred and the chain growth each failed at
     * some budget before success. */
    ck_assert_int_ge(budget, 3);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* The same when no member has fired, where df_list_new attaches as it goes
 * and takes its callbacks back on failure: every member keeps exactly the
 * chain it had (a callback added afterwards still sees the value with its
 * destructor, so no list callback was left before it), and nothing leaks.
 * d[1] holds two callbacks, so attaching to it must grow its chain, and it
 * is listed twice. */
START_TEST(test_list_out_of_memory_unfired)
{
    long budget;
    bool done = false;

    for (budget = 0; !done; budget++) {
        df_deferred *d[4] = {new_deferred(), new_deferred(), new_deferred(),
                             NULL};
        struct capture seen = {0, {0}};
        df_deferred *dl = NULL;
        int rc;

        d[3] = d[1];
        ck_assert_int_lt(budget, 100);
        TU_OK(df_deferred_add_callback(d[1], count_value, &seen));
        TU_OK(df_deferred_add_callback(d[1], count_value, &seen));
        nfreed = 0;
        alloc_budget = budget;
        rc = df_list_new(loop, d, 4, 0, &dl);
        alloc_budget = -1;
        if (rc == 0) {
            done = true;
            fire(d[0], 0);
            fire(d[1], 1);
            fire(d[2], 2);
            ck_assert_int_eq(seen.calls, 2);
            const df_list_result *r = success_result_of(dl);
            ck_assert_int_eq(entry_int(r, 0), 0);
            ck_assert_int_eq(entry_int(r, 2), 2);
            df_deferred_unref(dl);
            unref_all(d, 3);
            ck_assert_int_eq(nfreed, 3);
            continue;
        }
        ck_assert_int_eq(rc, DF_ENOMEM);
        ck_assert_ptr_null(dl);
        for (int i = 0; i < 3; i++)
            TU_OK(df_deferred_add_callback(d[i], count_value, &seen));
        fire(d[0], 0);
        fire(d[1], 1);
        fire(d[2], 2);
        ck_assert_int_eq(seen.calls, 5);
        unref_all(d, 3);
        ck_assert_int_eq(nfreed, 3);
    }
    /* The block, the chain growth and the list deferred each failed at
     * some budget before success. */
    ck_assert_int_ge(budget, 3);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* The FirstError failure is made when the first error happens; if memory
 * runs out then, the list fails with the shared DF_ENOMEM failure. */
START_TEST(test_list_first_error_out_of_memory)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *g = NULL;
    df_failure *f = df_failure_new(NULL, GENERIC_ERROR, "no memory later");

    TU_OK(df_gather(loop, d, 2, DF_LIST_CONSUME_ERRORS, &g));
    alloc_budget = 0;
    TU_OK(df_deferred_errback(d[0], f));
    alloc_budget = -1;
    expect_failure(g, DF_ENOMEM);
    fire(d[1], 1);
    df_deferred_unref(g);
    unref_all(d, 2);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* ------------------------------------------------------------------ suite */

static TCase *tcase(const char *name)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, setup, teardown);
    return tc;
}

/* --------------------------------------------------- Twisted fidelity */

/* Issue 15 item 8: a member listed twice, with a fire-on-one flag: Twisted
 * attaches the callbacks in input order, so the first position of the
 * member that fires first is reported, here index 0, not 1 or 2. */
START_TEST(test_list_duplicate_member_first_position)
{
    df_deferred *a = succeeded(1), *b = succeeded(2);
    df_deferred *m[3] = {a, b, a};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, m, 3, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl));
    const df_list_result *r = success_result_of(dl);
    ck_assert_int_eq(df_list_result_index(r), 0);
    ck_assert_int_eq(entry_int(r, 0), 1);
    df_deferred_unref(dl);
    df_deferred_unref(a);
    df_deferred_unref(b);
    ck_assert_int_eq(nfreed, 2);
}
END_TEST

/* The same with fire-on-one-errback: the first failed position wins. */
START_TEST(test_list_duplicate_member_first_error_position)
{
    df_deferred *a = failed("a"), *b = failed("b");
    df_deferred *m[3] = {a, b, a};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, m, 3,
                      DF_LIST_FIRE_ON_ONE_ERRBACK | DF_LIST_CONSUME_ERRORS,
                      &dl));
    df_failure *f = failure_result_of(dl, DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_index(f), 0);
    ck_assert_str_eq(df_failure_message(df_failure_cause(f)), "a");
    df_failure_unref(f);
    df_deferred_unref(dl);
    df_deferred_unref(a);
    df_deferred_unref(b);
}
END_TEST

/* Issue 15 item 9: cancelling a list cancels its members and nothing
 * more (Twisted DeferredList.cancel); the list fires when their results
 * make it fire.  A member paused by its owner keeps it unfired. */
START_TEST(test_list_cancel_waits_for_paused_member)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_CONSUME_ERRORS, &dl));
    capture_on(dl, &c);
    TU_OK(df_deferred_pause(d[0]));
    TU_OK(df_deferred_cancel(dl));
    ck_assert(df_deferred_called(d[0]));
    ck_assert(df_deferred_called(d[1]));
    ck_assert(!df_deferred_called(dl));
    ck_assert_int_eq(c.calls, 0);
    TU_OK(df_deferred_unpause(d[0]));
    const df_list_result *r = captured_result(&c);
    entry_failure(r, 0, DF_ECANCELLED);
    entry_failure(r, 1, DF_ECANCELLED);
    df_result_clear(&c.r);
    df_deferred_unref(dl);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Releasing a cancelled list that a paused member keeps unfired ends it
 * with DF_ECANCELLED (the core's rule for any deferred released unfired),
 * not reported; the member, unpaused later, goes on with its own result. */
START_TEST(test_list_cancel_then_released_unfired)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *dl = NULL;
    int swallowed = 0, member_swallowed = 0;

    TU_OK(df_list_new(loop, d, 2, 0, &dl));
    TU_OK(df_deferred_add_errback(dl, swallow, &swallowed));
    TU_OK(df_deferred_pause(d[0]));
    TU_OK(df_deferred_cancel(dl));
    ck_assert_int_eq(swallowed, 0);
    df_deferred_unref(dl);
    ck_assert_int_eq(swallowed, 1);
    TU_OK(df_deferred_add_errback(d[0], swallow, &member_swallowed));
    TU_OK(df_deferred_add_errback(d[1], swallow, &member_swallowed));
    ck_assert_int_eq(member_swallowed, 1);
    TU_OK(df_deferred_unpause(d[0]));
    ck_assert_int_eq(member_swallowed, 2);
    unref_all(d, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Attaching runs at once, in input order (Twisted): a member listed
 * twice whose failure the first position consumes is a success at its
 * second position, after the member listed between them has fired the
 * list.  (Seed 21365 of the differential test found the general case.) */
START_TEST(test_list_repeat_attached_in_turn)
{
    df_deferred *a = failed("a"), *b = succeeded(2);
    df_deferred *m[3] = {a, b, a};
    df_deferred *dl = NULL;

    TU_OK(df_list_new(loop, m, 3,
                      DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_CONSUME_ERRORS,
                      &dl));
    const df_list_result *r = success_result_of(dl);
    ck_assert_int_eq(df_list_result_index(r), 1);
    ck_assert_int_eq(entry_int(r, 1), 2);
    df_deferred_unref(dl);
    df_deferred_unref(a);
    df_deferred_unref(b);
    ck_assert_int_eq(nfreed, 1);
}
END_TEST

/* A member's stalled chain, run when the list attaches to it, fires a
 * member listed later: that member's own callbacks run at once, before
 * the list fires, as in Twisted (they used to wait for its position). */
static char order_log[8];
static size_t order_n;

static df_result log_char(df_result r, void *arg)
{
    order_log[order_n++] = *(const char *)arg;
    return r;
}

static df_result fire_other(df_result r, void *arg)
{
    TU_OK(df_deferred_callback(arg, NULL, NULL));
    return r;
}

static df_result wait_for_arg(df_result r, void *arg)
{
    df_result_clear(&r);
    return df_wait(df_deferred_ref(arg));
}

START_TEST(test_list_attach_runs_stalled_chain_at_once)
{
    df_deferred *d0 = new_deferred(), *d1 = new_deferred(), *w = NULL;
    df_deferred *m[2] = {d0, d1};
    df_deferred *l2 = NULL, *dl = NULL;

    order_n = 0;
    TU_OK(df_succeed(loop, NULL, NULL, &w));
    TU_OK(df_deferred_add_callback(w, wait_for_arg, d0));
    TU_OK(df_deferred_pause(w));
    TU_OK(df_deferred_add_callback(d0, fire_other, d1));
    TU_OK(df_deferred_add_callback(d1, log_char, "1"));
    TU_OK(df_list_new(loop, &d0, 1, 0, &l2));
    TU_OK(df_deferred_add_callback(l2, log_char, "A"));
    fire(d0, 3); /* d0 hands 3 to w, finds w paused and stops there */
    ck_assert_uint_eq(order_n, 0);
    /* Attaching to d0 runs its stalled chain: d1 fires, and its logger
     * runs at once, then l2 fires (Twisted: "1A"). */
    TU_OK(df_list_new(loop, m, 2, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl));
    ck_assert_uint_eq(order_n, 2);
    ck_assert_int_eq(order_log[0], '1');
    ck_assert_int_eq(order_log[1], 'A');
    ck_assert_int_eq(df_list_result_index(success_result_of(dl)), 0);
    TU_OK(df_deferred_unpause(w));
    df_deferred_unref(dl);
    df_deferred_unref(l2);
    df_deferred_unref(d0);
    df_deferred_unref(d1);
    df_deferred_unref(w);
    ck_assert_int_eq(nfreed, 1);
}
END_TEST

/* Attaching allocates nothing, thanks to the room made first; only a
 * callback run during construction that uses a later member's room, with
 * memory then running out, can make an attachment fail: the list then
 * fails with DF_ENOMEM and the member not reached keeps its own chain. */
static df_result fill_and_starve(df_result r, void *arg)
{
    df_deferred *d1 = arg;
    TU_OK(df_deferred_add_callback(d1, log_char, "x"));
    TU_OK(df_deferred_add_callback(d1, log_char, "y"));
    alloc_budget = 0;
    return r;
}

START_TEST(test_list_attach_out_of_memory_fails_list)
{
    df_deferred *d0 = new_deferred(), *d1 = new_deferred(), *w = NULL;
    df_deferred *m[2] = {d0, d1};
    df_deferred *dl = NULL;

    order_n = 0;
    TU_OK(df_succeed(loop, NULL, NULL, &w));
    TU_OK(df_deferred_add_callback(w, wait_for_arg, d0));
    TU_OK(df_deferred_pause(w));
    TU_OK(df_deferred_add_callback(d0, fill_and_starve, d1));
    fire(d0, 3);
    TU_OK(df_list_new(loop, m, 2, 0, &dl));
    alloc_budget = -1;
    df_failure *f = failure_result_of(dl, DF_ENOMEM);
    df_failure_unref(f);
    fire(d1, 4); /* its own callbacks run, no list callback */
    ck_assert_uint_eq(order_n, 2);
    TU_OK(df_deferred_unpause(w));
    df_deferred_unref(dl);
    df_deferred_unref(d0);
    df_deferred_unref(d1);
    df_deferred_unref(w);
    ck_assert_int_eq(nfreed, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* df_list_new marks its members while it attaches to them, and a list
 * made meanwhile (by a callback that attaching runs) over members not
 * reached yet finds the marks: it must still count each of its members
 * once, attach to each, and leave nothing behind that upsets a third
 * list over the same members. */
static df_deferred *nested_m[2];
static df_deferred *nested_dl;

static df_result make_nested_list(df_result r, void *arg)
{
    (void)arg;
    TU_OK(df_list_new(loop, nested_m, 2, 0, &nested_dl));
    return r;
}

START_TEST(test_list_made_while_attaching_over_later_members)
{
    df_deferred *d0 = new_deferred(), *d1 = new_deferred();
    df_deferred *d2 = new_deferred(), *w = NULL;
    df_deferred *m[3] = {d0, d1, d2};
    df_deferred *dl = NULL, *l3 = NULL;

    nested_m[0] = d2;
    nested_m[1] = d1;
    nested_dl = NULL;
    TU_OK(df_succeed(loop, NULL, NULL, &w));
    TU_OK(df_deferred_add_callback(w, wait_for_arg, d0));
    TU_OK(df_deferred_pause(w));
    TU_OK(df_deferred_add_callback(d0, make_nested_list, NULL));
    fire(d0, 3); /* stalls at w: make_nested_list has not run */
    ck_assert_ptr_null(nested_dl);
    TU_OK(df_list_new(loop, m, 3, 0, &dl));
    ck_assert_ptr_nonnull(nested_dl);
    TU_OK(df_list_new(loop, &m[1], 2, 0, &l3));
    fire(d1, 1);
    fire(d2, 2);
    const df_list_result *rn = success_result_of(nested_dl);
    const df_list_result *r = success_result_of(dl);
    const df_list_result *r3 = success_result_of(l3);
    ck_assert_uint_eq(df_list_result_count(rn), 2);
    ck_assert_int_eq(entry_int(rn, 0), 2);
    ck_assert_int_eq(entry_int(rn, 1), 1);
    ck_assert_uint_eq(df_list_result_count(r), 3);
    ck_assert(df_list_result_ok(r, 0));
    ck_assert_int_eq(entry_int(r, 1), 1);
    ck_assert_int_eq(entry_int(r, 2), 2);
    ck_assert_int_eq(entry_int(r3, 0), 1);
    ck_assert_int_eq(entry_int(r3, 1), 2);
    TU_OK(df_deferred_unpause(w));
    df_deferred_unref(l3);
    df_deferred_unref(dl);
    df_deferred_unref(nested_dl);
    df_deferred_unref(d0);
    df_deferred_unref(d1);
    df_deferred_unref(d2);
    df_deferred_unref(w);
    ck_assert_int_eq(nfreed, 3);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* -------------------------------------------------------------- take_refs */

/* Replaces the result with a value whose destructor counts, so that the
 * member's release is seen (nfreed) when the chain ends with it. */
static df_result give_val(df_result r, void *arg)
{
    (void)arg;
    df_result_clear(&r);
    return df_ok(val(7), val_free);
}

/* Not in Twisted (a C convenience): with DF_LIST_TAKE_REFS the list owns
 * the caller's reference, so a member it holds alone is released when the
 * list has fired, and the caller unrefs nothing. */
START_TEST(test_list_take_refs_unfired)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *producer[2];
    df_deferred *dl = NULL;
    struct capture c;

    /* Each member's producer keeps a reference of its own; the array's
     * go to the list. */
    producer[0] = df_deferred_ref(d[0]);
    producer[1] = df_deferred_ref(d[1]);
    TU_OK(df_list_new(loop, d, 2, DF_LIST_TAKE_REFS, &dl));
    TU_OK(df_deferred_add_callback(producer[0], give_val, NULL));
    TU_OK(df_deferred_add_callback(producer[1], give_val, NULL));
    capture_on(dl, &c);
    fire(producer[1], 2);
    df_deferred_unref(producer[1]); /* the list's reference remains */
    ck_assert_int_eq(c.calls, 0);
    ck_assert_int_eq(nfreed, 0);
    fire(producer[0], 1);
    /* The list fired and dropped its references: d[1], which it held
     * alone, went with its last value (give_val's). */
    ck_assert_int_eq(nfreed, 1);
    df_deferred_unref(producer[0]);
    ck_assert_int_eq(nfreed, 2);
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(entry_int(r, 0), 1);
    ck_assert_int_eq(entry_int(r, 1), 2);
    df_deferred_unref(dl);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 4);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* df_gather passes DF_LIST_TAKE_REFS on: the gather owns the caller's
 * references and releases a member it holds alone once it has fired. */
START_TEST(test_list_gather_take_refs)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *producer[2] = {df_deferred_ref(d[0]), df_deferred_ref(d[1])};
    df_deferred *g = NULL;
    struct capture c;

    TU_OK(df_gather(loop, d, 2, DF_LIST_TAKE_REFS, &g));
    TU_OK(df_deferred_add_callback(producer[1], give_val, NULL));
    capture_on(g, &c);
    fire(producer[1], 2);
    df_deferred_unref(producer[1]); /* the gather's reference remains */
    ck_assert_int_eq(nfreed, 0);
    fire(producer[0], 1);
    /* The gather fired and dropped its references: d[1] went with its
     * last value (give_val's). */
    ck_assert_int_eq(nfreed, 1);
    df_deferred_unref(producer[0]);
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(entry_int(r, 0), 1);
    ck_assert_int_eq(entry_int(r, 1), 2);
    df_deferred_unref(g);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 3);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Members that have fired already: the list fires inside df_list_new and
 * releases them before it returns.  A member listed twice comes with two
 * references. */
START_TEST(test_list_take_refs_fired)
{
    df_deferred *a = succeeded(1);
    df_deferred *d[3] = {a, succeeded(2), df_deferred_ref(a)};
    df_deferred *dl = NULL;
    struct capture c;

    TU_OK(df_deferred_add_callback(d[1], give_val, NULL)); /* before */
    TU_OK(df_list_new(loop, d, 3, DF_LIST_TAKE_REFS, &dl));
    /* d[1]'s own value went to give_val, which made the list's. */
    ck_assert_int_eq(nfreed, 1);
    capture_on(dl, &c);
    const df_list_result *r = captured_result(&c);
    ck_assert_int_eq(entry_int(r, 0), 1);
    ck_assert_int_eq(entry_int(r, 1), 7);
    /* Position 2 saw a's chain go on with the value, borrowed. */
    ck_assert_ptr_eq(df_list_result_value(r, 2), df_list_result_value(r, 0));
    df_deferred_unref(dl);
    df_result_clear(&c.r);
    ck_assert_int_eq(nfreed, 3);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* On failure nothing is taken: the caller still owns every member, which
 * it can fire and release (each exactly once: valgrind and ASan would see
 * a member dropped by the failed call). */
START_TEST(test_list_take_refs_failure_keeps_refs)
{
    df_deferred *d[3] = {new_deferred(), NULL, succeeded(3)};
    df_deferred *dl = NULL;
    long budget;
    bool done = false;

    TU_ERR(df_list_new(loop, d, 3, DF_LIST_TAKE_REFS, &dl), DF_EINVAL);
    d[1] = d[0];
    d[0] = d[2];
    d[2] = d[1];
    d[1] = NULL; /* a fired member first, then the bad one */
    TU_ERR(df_gather(loop, d, 3, DF_LIST_TAKE_REFS, &dl), DF_EINVAL);
    ck_assert_ptr_null(dl);
    fire(d[2], 1);
    df_deferred_unref(d[0]);
    df_deferred_unref(d[2]);
    ck_assert_int_eq(nfreed, 2);

    /* Out of memory at each step, with and without a member that has
     * fired. */
    for (int with_fired = 0; with_fired < 2; with_fired++) {
        done = false;
        for (budget = 0; !done; budget++) {
            df_deferred *m[3] = {new_deferred(), NULL, new_deferred()};
            m[1] = with_fired ? succeeded(2) : new_deferred();
            /* The producers' references, besides the array's. */
            df_deferred *p[3] = {df_deferred_ref(m[0]), df_deferred_ref(m[1]),
                                 df_deferred_ref(m[2])};
            dl = NULL;
            ck_assert_int_lt(budget, 100);
            nfreed = 0;
            alloc_budget = budget;
            int rc = df_list_new(loop, m, 3, DF_LIST_TAKE_REFS, &dl);
            alloc_budget = -1;
            if (rc != 0) {
                ck_assert_int_eq(rc, DF_ENOMEM);
                ck_assert_ptr_null(dl);
                unref_all(m, 3); /* still ours */
            }
            fire(p[0], 1);
            if (!with_fired)
                fire(p[1], 2);
            fire(p[2], 3);
            if (rc == 0) {
                done = true;
                const df_list_result *r = success_result_of(dl);
                ck_assert_int_eq(entry_int(r, 0), 1);
                ck_assert_int_eq(entry_int(r, 1), 2);
                ck_assert_int_eq(entry_int(r, 2), 3);
                df_deferred_unref(dl);
            }
            unref_all(p, 3);
            ck_assert_int_eq(nfreed, 3);
        }
        ck_assert_int_ge(budget, 2);
    }
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* Makes the chain wait for the deferred in arg. */
static df_result wait_on(df_result r, void *arg)
{
    df_result_clear(&r);
    return df_wait(df_deferred_ref(arg));
}

/* Cancelling a TAKE_REFS list still reaches every member, a fired one
 * waiting on an inner deferred included, when the list holds them alone
 * (until it fires, as without the flag). */
START_TEST(test_list_take_refs_cancel)
{
    df_deferred *d[2] = {new_deferred(), new_deferred()};
    df_deferred *p[2] = {df_deferred_ref(d[0]), df_deferred_ref(d[1])};
    df_deferred *w = new_deferred();
    df_deferred *dl = NULL;
    int cancelled = 0;

    TU_OK(df_list_new(loop, d, 2, DF_LIST_TAKE_REFS, &dl));
    TU_OK(df_deferred_add_callback(p[0], wait_on, w));
    TU_OK(df_deferred_add_errback(p[0], swallow, &cancelled));
    TU_OK(df_deferred_add_errback(p[1], swallow, &cancelled));
    fire(p[0], 1); /* recorded; then d[0] waits for w */
    unref_all(p, 2);
    ck_assert(!df_deferred_called(dl));
    TU_OK(df_deferred_cancel(dl));
    ck_assert(df_deferred_called(w)); /* reached through d[0] */
    ck_assert_int_eq(cancelled, 2);
    const df_list_result *r = success_result_of(dl);
    ck_assert_int_eq(entry_int(r, 0), 1);
    entry_failure(r, 1, DF_ECANCELLED);
    df_deferred_unref(dl);
    df_deferred_unref(w);
    ck_assert_int_eq(nfreed, 1);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

/* --------------------------------------------------------- result_get */

/* Not in Twisted: df_list_result_get reads a slot in one call, for a
 * success, a failure, a member that had not fired and an index out of
 * range (check_get compares it with the one-field accessors). */
START_TEST(test_list_result_get)
{
    df_deferred *d[3] = {succeeded(1), failed("boom"), new_deferred()};
    df_deferred *dl = NULL;
    void *v = NULL;
    df_failure *f = NULL;

    /* Fires on the first success: d[2] has not fired. */
    TU_OK(df_list_new(loop, d, 3, DF_LIST_FIRE_ON_ONE_CALLBACK, &dl));
    const df_list_result *r = success_result_of(dl);
    ck_assert(df_list_result_get(r, 0, &v, &f));
    ck_assert_int_eq(*(int *)v, 1);
    ck_assert_ptr_null(f);
    entry_unfired(r, 1); /* the list fired before d[1]'s callback ran */
    entry_unfired(r, 2);
    entry_unfired(r, 3);
    entry_unfired(r, (size_t)-1);
    df_deferred_unref(dl);

    /* A list that records the failure (and consumes it). */
    TU_OK(df_list_new(loop, d, 2, DF_LIST_CONSUME_ERRORS, &dl));
    r = success_result_of(dl);
    v = &v;
    ck_assert(!df_list_result_get(r, 1, &v, &f));
    ck_assert_ptr_null(v);
    ck_assert_ptr_nonnull(f);
    ck_assert_str_eq(df_failure_message(f), "boom");
    entry_failure(r, 1, GENERIC_ERROR);
    df_deferred_unref(dl);

    fire(d[2], 3);
    unref_all(d, 3);
    ck_assert_int_eq(nfreed, 2);
    ck_assert_int_eq(nunhandled, 0);
}
END_TEST

static void add_take_refs_tests(Suite *s)
{
    TCase *tc = tcase("take_refs");
    tcase_add_test(tc, test_list_take_refs_unfired);
    tcase_add_test(tc, test_list_take_refs_fired);
    tcase_add_test(tc, test_list_gather_take_refs);
    tcase_add_test(tc, test_list_take_refs_failure_keeps_refs);
    tcase_add_test(tc, test_list_take_refs_cancel);
    tcase_add_test(tc, test_list_result_get);
    suite_add_tcase(s, tc);
}

static void add_fidelity_tests(Suite *s)
{
    TCase *tc = tcase("twisted_fidelity");
    tcase_add_test(tc, test_list_duplicate_member_first_position);
    tcase_add_test(tc, test_list_duplicate_member_first_error_position);
    tcase_add_test(tc, test_list_cancel_waits_for_paused_member);
    tcase_add_test(tc, test_list_cancel_then_released_unfired);
    tcase_add_test(tc, test_list_repeat_attached_in_turn);
    tcase_add_test(tc, test_list_attach_runs_stalled_chain_at_once);
    tcase_add_test(tc, test_list_attach_out_of_memory_fails_list);
    tcase_add_test(tc, test_list_made_while_attaching_over_later_members);
    suite_add_tcase(s, tc);
}

static Suite *list_suite(void)
{
    Suite *s = suite_create("list");
    TCase *tc;

    tc = tcase("basic");
    tcase_add_test(tc, test_list_results_in_order);
    tcase_add_test(tc, test_list_empty);
    tcase_add_test(tc, test_list_empty_fire_on_one_callback);
    tcase_add_test(tc, test_list_already_fired);
    tcase_add_test(tc, test_list_out_of_order);
    tcase_add_test(tc, test_list_gather_from_callback);
    suite_add_tcase(s, tc);

    tc = tcase("fire_on_one");
    tcase_add_test(tc, test_list_fire_on_one_errback);
    tcase_add_test(tc, test_list_first_error_message);
    tcase_add_test(tc, test_list_fire_on_one_errback_already_fired);
    tcase_add_test(tc, test_list_fire_on_one_callback);
    tcase_add_test(tc, test_list_fire_on_one_callback_all_fail);
    tcase_add_test(tc, test_list_fire_on_one_errback_all_succeed);
    tcase_add_test(tc, test_list_fire_on_either);
    suite_add_tcase(s, tc);

    tc = tcase("consume_errors");
    tcase_add_test(tc, test_list_dont_consume_errors);
    tcase_add_test(tc, test_list_consume_errors);
    tcase_add_test(tc, test_list_unhandled_without_consume);
    tcase_add_test(tc, test_list_consume_errors_no_unhandled);
    tcase_add_test(tc, test_list_consume_errors_late);
    suite_add_tcase(s, tc);

    tc = tcase("gather");
    tcase_add_test(tc, test_list_gather);
    tcase_add_test(tc, test_list_gather_consume_errors);
    tcase_add_test(tc, test_list_gather_empty);
    tcase_add_test(tc, test_list_gather_flags);
    tcase_add_test(tc, test_list_gather_values_freed_once);
    suite_add_tcase(s, tc);

    tc = tcase("cancel");
    tcase_add_test(tc, test_list_cancel);
    tcase_add_test(tc, test_list_cancel_callback);
    tcase_add_test(tc, test_list_cancel_fire_on_one_callback);
    tcase_add_test(tc, test_list_cancel_fire_on_one_callback_member_callback);
    tcase_add_test(tc, test_list_cancel_fire_on_one_errback);
    tcase_add_test(tc, test_list_cancel_fire_on_one_errback_all_callback);
    tcase_add_test(tc, test_list_cancel_original_members);
    tcase_add_test(tc, test_list_cancel_member_canceller_fails);
    tcase_add_test(tc, test_list_cancel_fired_on_one_callback);
    tcase_add_test(tc, test_list_cancel_fired_on_one_errback);
    tcase_add_test(tc, test_list_gather_cancel);
    tcase_add_test(tc, test_list_gather_cancel_all_callback);
    tcase_add_test(tc, test_list_cancel_waiting_member);
    suite_add_tcase(s, tc);

    tc = tcase("cancel_remaining");
    tcase_add_test(tc, test_list_cancel_remaining_on_callback);
    tcase_add_test(tc, test_list_cancel_remaining_on_errback);
    tcase_add_test(tc, test_list_cancel_remaining_at_construction);
    tcase_add_test(tc, test_list_cancel_remaining_only_when_early);
    suite_add_tcase(s, tc);

    tc = tcase("lifetime");
    tcase_add_test(tc, test_list_value_moves);
    tcase_add_test(tc, test_list_members_released_early);
    tcase_add_test(tc, test_list_all_abandoned);
    tcase_add_test(tc, test_list_released_before_members_fire);
    tcase_add_test(tc, test_list_result_outlives_list);
    tcase_add_test(tc, test_list_result_freed_before_late_members);
    tcase_add_test(tc, test_list_duplicate_member);
    tcase_add_test(tc, test_list_member_in_two_lists);
    tcase_add_test(tc, test_list_nested);
    suite_add_tcase(s, tc);

    tc = tcase("arguments");
    tcase_add_test(tc, test_list_invalid_args);
    tcase_add_test(tc, test_list_wrong_loop);
    tcase_add_test(tc, test_list_wrong_thread);
    tcase_add_test(tc, test_list_out_of_memory);
    tcase_add_test(tc, test_list_out_of_memory_unfired);
    tcase_add_test(tc, test_list_first_error_out_of_memory);
    suite_add_tcase(s, tc);

    /* Last, as they depend on a fix in the core (see the report). */
    tc = tcase("paused_list_released");
    tcase_add_test(tc, test_list_paused_list_released);
    tcase_add_test(tc, test_list_paused_list_fired_then_released);
    suite_add_tcase(s, tc);

    add_fidelity_tests(s);
    add_take_refs_tests(s);
    return s;
}

TU_MAIN(list_suite)
