/* SPDX-License-Identifier: MIT */
/* Allocation-failure sweep: every allocation of each scenario fails once. */
#include <check.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deferred.h"
#include "testutil.h"

/*
 * How the sweep works
 * ===================
 * A scenario is a function that makes a loop with the failing allocator
 * (tests/testutil.h), exercises part of the library and frees everything.
 * sweep() runs it with allocation n refused, for n = 1, 2, 3, ..., until a
 * run never reaches allocation n: then every allocation the scenario makes
 * has been refused once.  It does so twice: with only allocation n refused
 * ("one-shot"), and with every allocation from n on refused until the
 * scenario sees DF_ENOMEM from a call ("sticky"), which drives the error
 * paths that follow an error path.
 *
 * What each run asserts:
 *   - every call returns 0, its documented result (DF_EQUEUE_OVERFLOW,
 *     DF_ESHUTDOWN, ...) or DF_ENOMEM, and DF_ENOMEM only if an allocation
 *     was refused during that very call (SW_CALL);
 *   - after DF_ENOMEM, with failures turned off, the same call on the same
 *     objects succeeds (SW_CALL retries it);
 *   - every callback pair runs exactly once, with the expected outcome or,
 *     once an allocation has been refused, a DF_ENOMEM failure (EXPECT);
 *   - no failure reaches the unhandled hook (the scenarios handle all of
 *     theirs), every test value's destructor runs exactly once, and after
 *     teardown no block of the loop's allocator is live.
 *
 * Determinism.  Only allocations on the test (loop) thread are numbered.
 * The library allocates nothing on pool threads itself; the work functions
 * here that do (df_errf in work_fail) allocate unnumbered blocks, which
 * never fail (test_alloc_worker_threads fails them on purpose) but are
 * counted in `live` all the same.  Loop-thread allocations then depend only
 * on the order of events on the loop thread, which the scenarios fix: one
 * worker per pool (completions arrive in submission order), and a job
 * blocked at a gate (tu_gate B) wherever the state of a job
 * (queued or running) when the loop acts on it would otherwise be timing.
 * What stays timing-dependent is only how completions are batched, which
 * changes no allocation.  sweep() checks this: a clean run must make the
 * same number of allocations in both modes.  Were some scenario not
 * deterministic, the sweep would still terminate (n grows past any run's
 * count) but might skip an allocation point.
 */

#define HOUR_NS (3600ull * 1000000000ull)

/* -------------------------------------------------------------- harness */

typedef struct sweep_state {
    tu_failing_alloc fa;
    df_allocator alloc;
    df_loop *loop;
    long n; /* allocation being refused in this run */
    bool sticky;
    long unhandled; /* reports through the loop's hook */
    int unhandled_code;
    long values_made;  /* value_new() */
    long values_freed; /* value_free() */
} sweep_state;

static sweep_state S;
#define L (S.loop)

static long g_points;   /* failure points tried, all scenarios */
static int g_scenarios; /* scenarios swept */

static bool injected(void)
{
    return atomic_load(&S.fa.failed) > 0;
}

/* Runs `expr`, which must return `want` or DF_ENOMEM; DF_ENOMEM only if an
 * allocation was refused during the call.  Then failures are turned off
 * and the call, made again on the same objects, must return `want`. */
#define SW_CALL_RC(expr, want)                                                 \
    do {                                                                       \
        long sw_f0_ = atomic_load(&S.fa.failed);                               \
        int sw_rc_ = (expr);                                                   \
        int sw_want_ = (want);                                                 \
        if (sw_rc_ == DF_ENOMEM && sw_want_ != DF_ENOMEM) {                    \
            ck_assert_msg(atomic_load(&S.fa.failed) > sw_f0_,                  \
                          "%s: DF_ENOMEM without a refused allocation "        \
                          "(n=%ld%s)",                                         \
                          #expr, S.n, S.sticky ? " sticky" : "");              \
            tu_fa_disarm(&S.fa);                                               \
            sw_rc_ = (expr);                                                   \
        }                                                                      \
        ck_assert_msg(sw_rc_ == sw_want_, "%s returned %s, want %s (n=%ld%s)", \
                      #expr, df_err_name(sw_rc_), df_err_name(sw_want_), S.n,  \
                      S.sticky ? " sticky" : "");                              \
    } while (0)
#define SW_CALL(expr) SW_CALL_RC(expr, 0)

/* A test value: a long on the C heap whose destructor is counted. */
static void *value_new(long v)
{
    long *p = malloc(sizeof *p);
    ck_assert_ptr_nonnull(p);
    *p = v;
    S.values_made++;
    return p;
}

static void value_free(void *p)
{
    S.values_freed++;
    free(p);
}

static void on_unhandled(df_failure *f, void *arg)
{
    (void)arg;
    S.unhandled++;
    S.unhandled_code = df_failure_code(f);
}

static void sw_loop_new(void)
{
    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    o.allocator = &S.alloc;
    o.unhandled = on_unhandled;
    S.loop = NULL;
    SW_CALL(df_loop_new(&o, &S.loop));
}

static void sw_loop_free(void)
{
    ck_assert_msg(S.unhandled == 0,
                  "%ld unhandled failure(s), last %s "
                  "(n=%ld%s)",
                  S.unhandled, df_err_name(S.unhandled_code), S.n,
                  S.sticky ? " sticky" : "");
    TU_OK(df_loop_free(S.loop));
    S.loop = NULL;
}

/* Runs `scenario` with allocation n refused for n = 1, 2, ... in both
 * modes (see the top of the file); returns the failure points tried. */
static long sweep(const char *name, void (*scenario)(void))
{
    long points = 0, clean[2] = {0, 0};

    for (int sticky = 0; sticky <= 1; sticky++) {
        for (long n = 1;; n++) {
            tu_fa_init(&S.fa, true);
            S.alloc = tu_fa_allocator(&S.fa);
            S.loop = NULL;
            S.n = n;
            S.sticky = sticky;
            S.unhandled = 0;
            S.values_made = S.values_freed = 0;
            tu_fa_arm(&S.fa, n, sticky);

            scenario();

            bool reached = injected();
            long count = atomic_load(&S.fa.count);
            tu_fa_disarm(&S.fa);
            ck_assert_msg(atomic_load(&S.fa.live) == 0,
                          "%s: %ld block(s) leaked (n=%ld%s)", name,
                          (long)atomic_load(&S.fa.live), n,
                          sticky ? " sticky" : "");
            ck_assert_msg(S.values_made == S.values_freed,
                          "%s: %ld values made, %ld destroyed (n=%ld%s)", name,
                          S.values_made, S.values_freed, n,
                          sticky ? " sticky" : "");
            if (!reached) {
                clean[sticky] = count;
                break;
            }
            points++;
            ck_assert_msg(n < 100000, "%s: the sweep does not end", name);
        }
    }
    ck_assert_msg(clean[0] == clean[1],
                  "%s: clean runs made %ld and %ld allocations: the "
                  "scenario is not deterministic",
                  name, clean[0], clean[1]);
    ck_assert_msg(clean[0] > 0, "%s allocates nothing", name);
    printf("alloc: %s: %ld failure points (%ld allocations per clean run, "
           "one-shot and sticky)\n",
           name, points, clean[0]);
    fflush(stdout);
    g_points += points;
    g_scenarios++;
    return points;
}

/* --------------------------------------------------- recording callbacks */

/* What one callback pair saw. */
typedef struct rec {
    int calls;
    int code;    /* 0: success, else the failure's code */
    void *value; /* the success value */
    long num;    /* rec_end_num: *(long *)value */
} rec;

static void rec_note(rec *x, const df_result *r)
{
    x->calls++;
    x->code = r->failure != NULL ? df_failure_code(r->failure) : 0;
    x->value = r->failure != NULL ? NULL : r->value;
}

/* Records and passes the result on. */
static df_result rec_pass(df_result r, void *arg)
{
    rec_note(arg, &r);
    return r;
}

/* Records and ends the chain (the result is handled and released). */
static df_result rec_end(df_result r, void *arg)
{
    rec_note(arg, &r);
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

/* As rec_end, reading the value as a test value first. */
static df_result rec_end_num(df_result r, void *arg)
{
    rec *x = arg;
    rec_note(x, &r);
    x->num = x->code == 0 && r.value != NULL ? *(long *)r.value : -1;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

static df_result pass(df_result r, void *arg)
{
    (void)arg;
    return r;
}

/* The pair ran once, and failed with `want` (0: succeeded), or with
 * DF_ENOMEM after an allocation was refused. */
#define EXPECT(x, want) expect_code(&(x), (want), #x, __LINE__)
static void expect_code(const rec *x, int want, const char *name, int line)
{
    ck_assert_msg(x->calls == 1, "line %d: %s ran %d times (n=%ld%s)", line,
                  name, x->calls, S.n, S.sticky ? " sticky" : "");
    if (x->code != want)
        ck_assert_msg(x->code == DF_ENOMEM && injected(),
                      "line %d: %s got %s, want %s (n=%ld%s)", line, name,
                      df_err_name(x->code), df_err_name(want), S.n,
                      S.sticky ? " sticky" : "");
}

/* The pair ran once with success value `v`, or failed with DF_ENOMEM. */
#define EXPECT_VALUE(x, v)                                                     \
    do {                                                                       \
        EXPECT(x, 0);                                                          \
        if ((x).code == 0)                                                     \
            ck_assert_ptr_eq((x).value, (void *)(v));                          \
    } while (0)

/* Likewise with a test value numbered `v` (rec_end_num). */
#define EXPECT_NUM(x, v)                                                       \
    do {                                                                       \
        EXPECT(x, 0);                                                          \
        if ((x).code == 0)                                                     \
            ck_assert_int_eq((x).num, (v));                                    \
    } while (0)

/* Adds rec callback `fn` to d. */
#define WATCH(d, fn, x) SW_CALL(df_deferred_add_callbacks((d), fn, fn, &(x)))

/* -------------------------------------------------- pool work functions */

/* A job that blocks until the test opens it, so that the test knows what
 * is running and what is queued. */
static tu_gate B = TU_GATE_INIT;

static df_result work_block(df_work *w, void *arg)
{
    (void)w;
    tu_gate_pass(&B);
    return df_ok(arg, NULL);
}

static df_result work_value(df_work *w, void *arg)
{
    (void)w;
    return df_ok(arg, NULL);
}

/* Allocates on the pool thread (unnumbered, see the top of the file). */
static df_result work_fail(df_work *w, void *arg)
{
    return df_errf(df_work_loop(w), DF_EAGAIN, "job %ld failed",
                   (long)(intptr_t)arg);
}

/* Records like rec_end and opens the blocker: on a queued job that a
 * shutdown cancels, it lets the blocked job finish from inside the
 * shutdown, after the queue was taken (so nothing else can start). */
static df_result rec_end_open(df_result r, void *arg)
{
    tu_gate_open(&B);
    return rec_end(r, arg);
}

#define V(n) ((void *)(intptr_t)(n))

/* ============================================================ scenarios */

/* ------------------------------------------------------------------ loop */

static void on_call(void *arg, int status)
{
    int *calls = arg;
    ck_assert_int_eq(status, 0);
    (*calls)++;
}

static void on_call_cancelled(void *arg, int status)
{
    int *calls = arg;
    ck_assert_int_eq(status, DF_ECANCELLED);
    (*calls)++;
}

static void scenario_loop(void)
{
    int soon = 0, late = 0, cross = 0, dropped = 0;
    df_timer *t = NULL;

    sw_loop_new();
    SW_CALL(df_loop_call_later(L, 0, on_call, &soon, NULL));
    SW_CALL(df_loop_call_later(L, HOUR_NS, on_call, &late, &t));
    SW_CALL(df_loop_call_from_thread(L, on_call, &cross));
    TU_OK(df_timer_cancel(t));
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(soon, 1);
    ck_assert_int_eq(late, 0);
    ck_assert_int_eq(cross, 1);
    /* The node of the call above is recycled: a second one allocates
     * nothing, a third does. */
    SW_CALL(df_loop_call_from_thread(L, on_call_cancelled, &dropped));
    SW_CALL(df_loop_call_from_thread(L, on_call_cancelled, &dropped));
    sw_loop_free(); /* runs both with DF_ECANCELLED */
    ck_assert_int_eq(dropped, 2);
}

START_TEST(test_alloc_loop)
{
    sweep("loop", scenario_loop);
}
END_TEST

/* -------------------------------------------------------------- deferred */

static df_result cb_wait_for(df_result r, void *arg)
{
    df_result_clear(&r);
    return df_wait(df_deferred_ref(arg));
}

static void on_cancel_count(df_deferred *d, void *arg)
{
    (void)d;
    (*(int *)arg)++;
}

static df_result maybe_fn(void *arg)
{
    (*(int *)arg)++;
    return df_ok(value_new(5), value_free);
}

static void scenario_deferred(void)
{
    df_deferred *d, *inner, *other, *e, *f, *g, *m, *s1, *s2;
    rec ri1 = {0}, ri2 = {0}, ra = {0}, rb = {0}, rc = {0}, ro = {0};
    rec rlate = {0}, rcancel = {0}, rrel = {0}, rm = {0}, rs1 = {0};
    rec rs2 = {0}, rw1 = {0}, rw2 = {0}, rinner3 = {0};
    df_deferred *w1, *w2, *inner2, *inner3;
    int cancels = 0, maybe_calls = 0;

    sw_loop_new();
    SW_CALL(df_deferred_new(L, &d));
    SW_CALL(df_deferred_new(L, &inner));
    SW_CALL(df_deferred_new(L, &other));
    /* Two pairs fill inner's inline entries, so that the continuation the
     * wait below adds needs an allocation. */
    SW_CALL(df_deferred_add_callbacks(inner, rec_pass, rec_pass, &ri1));
    SW_CALL(df_deferred_add_callbacks(inner, rec_pass, rec_pass, &ri2));
    SW_CALL(df_deferred_add_callback(d, cb_wait_for, inner));
    WATCH(d, rec_pass, ra);
    WATCH(d, rec_pass, rb); /* grows the entries */
    SW_CALL(df_deferred_chain(d, other));
    SW_CALL(df_deferred_add_callbacks(d, rec_end, rec_end, &rc)); /* again */
    WATCH(other, rec_end_num, ro);

    TU_OK(df_deferred_pause(d));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    ck_assert_int_eq(ra.calls, 0);
    TU_OK(df_deferred_unpause(d)); /* waits for inner */
    TU_OK(df_deferred_callback(inner, value_new(42), value_free));
    EXPECT(ri1, 0);
    EXPECT(ri2, 0);
    EXPECT(ra, 0);
    EXPECT(rb, 0);
    EXPECT_NUM(ro, 42);
    EXPECT_VALUE(rc, NULL); /* chaining leaves d with success, NULL */
    /* Still usable: a pair added now runs at once. */
    WATCH(d, rec_end, rlate);
    EXPECT_VALUE(rlate, NULL);
    TU_ERR(df_deferred_callback(d, NULL, NULL), DF_EALREADY_CALLED);

    /* Cancel: the canceller runs, then the deferred fails. */
    SW_CALL(df_deferred_new_cancellable(L, on_cancel_count, &cancels, &e));
    WATCH(e, rec_end, rcancel);
    TU_OK(df_deferred_cancel(e));
    ck_assert_int_eq(cancels, 1);
    EXPECT(rcancel, DF_ECANCELLED);

    /* Release unfired: the chain runs with DF_ECANCELLED, and a deferred
     * without callbacks reports nothing. */
    SW_CALL(df_deferred_new(L, &f));
    WATCH(f, rec_end, rrel);
    df_deferred_unref(f);
    EXPECT(rrel, DF_ECANCELLED);
    SW_CALL(df_deferred_new(L, &g));
    df_deferred_unref(g);

    /* maybe, succeed, fail: on DF_ENOMEM fn is not called and the caller
     * keeps what it passed. */
    SW_CALL(df_maybe(L, maybe_fn, &maybe_calls, &m));
    ck_assert_int_eq(maybe_calls, 1);
    WATCH(m, rec_end_num, rm);
    EXPECT_NUM(rm, 5);
    void *v = value_new(6);
    SW_CALL(df_succeed(L, v, value_free, &s1));
    WATCH(s1, rec_end_num, rs1);
    EXPECT_NUM(rs1, 6);
    df_failure *fl = df_failure_new(L, DF_EAGAIN, "try again");
    SW_CALL(df_fail(L, fl, &s2));
    WATCH(s2, rec_end, rs2);
    EXPECT(rs2, DF_EAGAIN);

    /* Released while it waits on an inner deferred (which is released in
     * turn), and cancelled while it waits (the cancel goes to the inner
     * one).  The inner deferreds' entries are full, as above. */
    SW_CALL(df_deferred_new(L, &w1));
    SW_CALL(df_deferred_new(L, &inner2));
    SW_CALL(df_deferred_add_both(inner2, pass, NULL));
    SW_CALL(df_deferred_add_both(inner2, pass, NULL));
    SW_CALL(df_deferred_add_callback(w1, cb_wait_for, inner2));
    WATCH(w1, rec_end, rw1);
    TU_OK(df_deferred_callback(w1, NULL, NULL));
    df_deferred_unref(inner2); /* w1 holds it, if the wait was made */
    df_deferred_unref(w1);
    EXPECT(rw1, DF_ECANCELLED);
    SW_CALL(df_deferred_new(L, &w2));
    SW_CALL(df_deferred_new(L, &inner3));
    SW_CALL(df_deferred_add_both(inner3, pass, NULL));
    WATCH(inner3, rec_pass, rinner3);
    SW_CALL(df_deferred_add_callback(w2, cb_wait_for, inner3));
    WATCH(w2, rec_end, rw2);
    TU_OK(df_deferred_callback(w2, NULL, NULL));
    TU_OK(df_deferred_cancel(w2));
    EXPECT(rw2, DF_ECANCELLED);
    /* inner3 was cancelled through w2, unless the wait could not be made
     * (w2 then failed with DF_ENOMEM at once and the cancel did nothing). */
    if (rinner3.calls == 0)
        TU_OK(df_deferred_callback(inner3, NULL, NULL));
    ck_assert_int_eq(rinner3.calls, 1);
    df_deferred_unref(inner3);
    df_deferred_unref(w2);

    df_deferred_unref(d);
    df_deferred_unref(inner);
    df_deferred_unref(other);
    df_deferred_unref(e);
    df_deferred_unref(m);
    df_deferred_unref(s1);
    df_deferred_unref(s2);
    sw_loop_free();
}

START_TEST(test_alloc_deferred)
{
    sweep("deferred", scenario_deferred);
}
END_TEST

/* --------------------------------------------------------------- failure */

static void count_payload_free(void *p)
{
    (*(int *)p)++;
}

/* f has `code` and `message`, or is the shared DF_ENOMEM failure. */
static void check_failure(df_failure *f, int code, const char *message)
{
    ck_assert_ptr_nonnull(f);
    if (df_failure_code(f) == DF_ENOMEM && code != DF_ENOMEM) {
        ck_assert(injected());
        ck_assert_str_eq(df_failure_message(f), "out of memory");
        ck_assert_ptr_null(df_failure_payload(f));
        return;
    }
    ck_assert_int_eq(df_failure_code(f), code);
    ck_assert_str_eq(df_failure_message(f), message);
}

static void scenario_failure(void)
{
    char big[300], want[320];
    int payload_freed = 0;

    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    snprintf(want, sizeof want, "<%s>", big);

    sw_loop_new();
    df_failure *f1 = df_failure_new(L, DF_EAGAIN, "retry %d", 3);
    check_failure(f1, DF_EAGAIN, "retry 3");
    df_failure *f2 = df_failure_new(L, 77, NULL);
    check_failure(f2, 77, df_strerror(77));
    df_failure *f3 = df_failure_new(L, DF_EINVAL, "<%s>", big); /* > 256 */
    check_failure(f3, DF_EINVAL, want);
    df_failure *f4 =
        df_failure_new_payload(L, 5, &payload_freed, count_payload_free, "p");
    check_failure(f4, 5, "p");
    if (df_failure_code(f4) == 5)
        ck_assert_ptr_eq(df_failure_payload(f4), &payload_freed);
    df_result r = df_errf(L, DF_ESTATE, "bad %s", "state");
    check_failure(r.failure, DF_ESTATE, "bad state");

    /* References work the same on the shared failure. */
    df_failure_unref(df_failure_ref(f1));
    df_failure_unref(f1);
    df_failure_unref(f2);
    df_failure_unref(f3);
    df_failure_unref(f4);
    ck_assert_int_eq(payload_freed, 1);
    df_result_clear(&r);
    sw_loop_free();
}

START_TEST(test_alloc_failure)
{
    sweep("failure", scenario_failure);
}
END_TEST

/* ------------------------------------------------------------------ list */

/* What a list deferred fired with. */
typedef struct list_rec {
    int calls;
    int code;
    size_t count;
    long index; /* success: df_list_result_index; EFIRST_ERROR: member */
    bool ok[4];
    long num[4];  /* ok members: their test value */
    int fcode[4]; /* failed members: the code */
} list_rec;

static df_result list_inspect(df_result r, void *arg)
{
    list_rec *x = arg;
    x->calls++;
    x->code = r.failure != NULL ? df_failure_code(r.failure) : 0;
    if (r.failure != NULL) {
        x->index = df_failure_index(r.failure);
    } else {
        const df_list_result *lr = r.value;
        x->count = df_list_result_count(lr);
        x->index = df_list_result_index(lr);
        for (size_t i = 0; i < x->count && i < 4; i++) {
            x->ok[i] = df_list_result_ok(lr, i);
            x->num[i] = x->ok[i] && df_list_result_value(lr, i) != NULL
                            ? *(long *)df_list_result_value(lr, i)
                            : -1;
            df_failure *f = df_list_result_failure(lr, i);
            x->fcode[i] = f != NULL ? df_failure_code(f) : 0;
        }
    }
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

/* The list fired once: with success, or with DF_ENOMEM after a refusal. */
static bool list_ok(const list_rec *x, int line)
{
    ck_assert_msg(x->calls == 1, "line %d: list ran %d times (n=%ld%s)", line,
                  x->calls, S.n, S.sticky ? " sticky" : "");
    if (x->code == 0)
        return true;
    ck_assert_msg(x->code == DF_ENOMEM && injected(),
                  "line %d: list failed with %s (n=%ld%s)", line,
                  df_err_name(x->code), S.n, S.sticky ? " sticky" : "");
    return false;
}

/* A member whose two inline entries are taken, so that the list's own
 * pair needs an allocation. */
static df_deferred *member_new(void)
{
    df_deferred *d;
    SW_CALL(df_deferred_new(L, &d));
    SW_CALL(df_deferred_add_both(d, pass, NULL));
    SW_CALL(df_deferred_add_both(d, pass, NULL));
    return d;
}

static void code_or_nomem(int got, int want, int line)
{
    if (got != want)
        ck_assert_msg(got == DF_ENOMEM && injected(),
                      "line %d: got %s, want %s (n=%ld%s)", line,
                      df_err_name(got), df_err_name(want), S.n,
                      S.sticky ? " sticky" : "");
}

static void scenario_list(void)
{
    df_deferred *a[4], *b[3], *c[3], *e[2], *f[2], *la, *lb, *lc, *ld, *le;
    df_deferred *lf;
    rec ra[4] = {{0}}, rb[3] = {{0}}, rc[3] = {{0}}, re[2] = {{0}};
    rec rf[2] = {{0}};
    list_rec xa = {0}, xb = {0}, xc = {0}, xd = {0}, xe = {0}, xf = {0};

    sw_loop_new();

    /* A plain list: members succeed and fail. */
    for (int i = 0; i < 4; i++)
        a[i] = member_new();
    SW_CALL(df_list_new(L, a, 4, 0, &la));
    WATCH(la, list_inspect, xa);
    for (int i = 0; i < 4; i++)
        WATCH(a[i], rec_end, ra[i]);
    TU_OK(df_deferred_callback(a[0], value_new(10), value_free));
    TU_OK(df_deferred_errback(a[1], df_failure_new(L, DF_EAGAIN, NULL)));
    TU_OK(df_deferred_callback(a[3], value_new(13), value_free));
    ck_assert_int_eq(xa.calls, 0);
    TU_OK(df_deferred_callback(a[2], value_new(12), value_free));
    if (list_ok(&xa, __LINE__)) {
        ck_assert_uint_eq(xa.count, 4);
        ck_assert(xa.ok[0] && !xa.ok[1] && xa.ok[2] && xa.ok[3]);
        ck_assert_int_eq(xa.num[0], 10);
        ck_assert_int_eq(xa.num[2], 12);
        ck_assert_int_eq(xa.num[3], 13);
        code_or_nomem(xa.fcode[1], DF_EAGAIN, __LINE__);
    }
    EXPECT(ra[0], 0);
    EXPECT(ra[1], DF_EAGAIN);
    EXPECT(ra[2], 0);
    EXPECT(ra[3], 0);

    /* gather, failing on the first error, cancelling the rest. */
    for (int i = 0; i < 3; i++)
        b[i] = member_new();
    SW_CALL(df_gather(L, b, 3, DF_LIST_CANCEL_REMAINING, &lb));
    WATCH(lb, list_inspect, xb);
    for (int i = 0; i < 3; i++)
        WATCH(b[i], rec_end, rb[i]);
    TU_OK(df_deferred_callback(b[0], value_new(20), value_free));
    TU_OK(df_deferred_errback(b[1], df_failure_new(L, DF_EAGAIN, NULL)));
    ck_assert_int_eq(xb.calls, 1);
    code_or_nomem(xb.code, DF_EFIRST_ERROR, __LINE__);
    if (xb.code == DF_EFIRST_ERROR)
        ck_assert_int_eq(xb.index, 1);
    EXPECT(rb[0], 0);
    EXPECT(rb[1], DF_EAGAIN);
    EXPECT(rb[2], DF_ECANCELLED);

    /* First success wins; errors are consumed; a member left unfired is
     * released by its owner afterwards. */
    for (int i = 0; i < 3; i++)
        c[i] = member_new();
    SW_CALL(df_list_new(
        L, c, 3, DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_CONSUME_ERRORS, &lc));
    WATCH(lc, list_inspect, xc);
    for (int i = 0; i < 3; i++)
        WATCH(c[i], rec_end, rc[i]);
    TU_OK(df_deferred_errback(c[0], df_failure_new(L, DF_EAGAIN, NULL)));
    TU_OK(df_deferred_callback(c[1], value_new(31), value_free));
    if (list_ok(&xc, __LINE__)) {
        ck_assert_int_eq(xc.index, 1);
        ck_assert_int_eq(xc.num[1], 31);
    }
    EXPECT_VALUE(rc[0], NULL); /* consumed */
    EXPECT(rc[1], 0);
    df_deferred_unref(c[2]);
    c[2] = NULL;
    EXPECT_VALUE(rc[2], NULL); /* its late DF_ECANCELLED is consumed too */

    /* The empty list fires at once. */
    SW_CALL(df_list_new(L, NULL, 0, 0, &ld));
    WATCH(ld, list_inspect, xd);
    if (list_ok(&xd, __LINE__))
        ck_assert_uint_eq(xd.count, 0);

    /* Cancelling the list cancels its members. */
    for (int i = 0; i < 2; i++)
        e[i] = member_new();
    SW_CALL(df_list_new(L, e, 2, 0, &le));
    WATCH(le, list_inspect, xe);
    for (int i = 0; i < 2; i++)
        WATCH(e[i], rec_end, re[i]);
    TU_OK(df_deferred_cancel(le));
    if (list_ok(&xe, __LINE__)) {
        code_or_nomem(xe.fcode[0], DF_ECANCELLED, __LINE__);
        code_or_nomem(xe.fcode[1], DF_ECANCELLED, __LINE__);
    }
    EXPECT(re[0], DF_ECANCELLED);
    EXPECT(re[1], DF_ECANCELLED);

    /* A member that has fired but is paused, with its entries pending. */
    for (int i = 0; i < 2; i++)
        f[i] = member_new();
    TU_OK(df_deferred_pause(f[0]));
    TU_OK(df_deferred_callback(f[0], value_new(50), value_free));
    SW_CALL(df_list_new(L, f, 2, 0, &lf));
    WATCH(lf, list_inspect, xf);
    for (int i = 0; i < 2; i++)
        WATCH(f[i], rec_end, rf[i]);
    TU_OK(df_deferred_unpause(f[0]));
    TU_OK(df_deferred_callback(f[1], value_new(51), value_free));
    if (list_ok(&xf, __LINE__)) {
        ck_assert_int_eq(xf.num[0], 50);
        ck_assert_int_eq(xf.num[1], 51);
    }
    EXPECT(rf[0], 0);
    EXPECT(rf[1], 0);

    for (int i = 0; i < 4; i++)
        df_deferred_unref(a[i]);
    for (int i = 0; i < 3; i++) {
        df_deferred_unref(b[i]);
        df_deferred_unref(c[i]);
    }
    for (int i = 0; i < 2; i++) {
        df_deferred_unref(e[i]);
        df_deferred_unref(f[i]);
    }
    df_deferred_unref(lf);
    df_deferred_unref(la);
    df_deferred_unref(lb);
    df_deferred_unref(lc);
    df_deferred_unref(ld);
    df_deferred_unref(le);
    sw_loop_free();
}

START_TEST(test_alloc_list)
{
    sweep("list", scenario_list);
}
END_TEST

/* ------------------------------------------------ semaphore, lock, queue */

static df_result run_wait_fn(void *arg)
{
    return df_wait(df_deferred_ref(arg));
}

static df_result run_ok_fn(void *arg)
{
    (*(int *)arg)++;
    return df_ok(V(7), NULL);
}

static void scenario_sync(void)
{
    df_sem *s;
    df_lock *lk;
    df_queue *q, *q2;
    df_deferred *a1, *a2, *a3, *a4, *r1, *r2, *inner, *la, *lr;
    df_deferred *g1, *g2, *g3, *g4, *g5, *g6;
    rec ra1 = {0}, ra2 = {0}, ra3 = {0}, ra4 = {0}, rr1 = {0}, rr2 = {0};
    rec rla = {0}, rlr = {0}, rg1 = {0}, rg2 = {0}, rg4 = {0}, rg5 = {0};
    rec rg6 = {0};
    int ran = 0;

    sw_loop_new();

    /* Semaphore: acquires and runs waiting in line, a cancelled waiter, a
     * run whose function returns a deferred with full inline entries (the
     * semaphore's pair then needs an allocation). */
    SW_CALL(df_sem_new(L, 1, &s));
    SW_CALL(df_deferred_new(L, &inner));
    SW_CALL(df_deferred_add_both(inner, pass, NULL));
    SW_CALL(df_deferred_add_both(inner, pass, NULL));
    SW_CALL(df_sem_acquire(s, &a1)); /* fires at once */
    SW_CALL(df_sem_acquire(s, &a2));
    SW_CALL(df_sem_acquire(s, &a3));
    SW_CALL(df_sem_run(s, run_wait_fn, inner, &r1));
    SW_CALL(df_sem_run(s, run_ok_fn, &ran, &r2));
    ck_assert_uint_eq(df_sem_waiting(s), 4);
    WATCH(a1, rec_end, ra1);
    WATCH(a2, rec_end, ra2);
    WATCH(a3, rec_end, ra3);
    WATCH(r1, rec_end, rr1);
    WATCH(r2, rec_end, rr2);
    EXPECT(ra1, 0);
    TU_OK(df_deferred_cancel(a3));
    EXPECT(ra3, DF_ECANCELLED);
    TU_OK(df_sem_release(s)); /* a2 */
    EXPECT(ra2, 0);
    TU_OK(df_sem_release(s)); /* r1 waits for inner, or fails */
    TU_OK(df_deferred_callback(inner, NULL, NULL)); /* then r2 runs */
    EXPECT(rr1, 0);
    EXPECT_VALUE(rr2, V(7));
    ck_assert_int_eq(ran, 1);
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    ck_assert_uint_eq(df_sem_waiting(s), 0);
    SW_CALL(df_sem_acquire(s, &a4));
    WATCH(a4, rec_end, ra4);
    EXPECT(ra4, 0);
    TU_OK(df_sem_release(s));
    TU_OK(df_sem_free(s));

    /* Lock. */
    SW_CALL(df_lock_new(L, &lk));
    SW_CALL(df_lock_acquire(lk, &la));
    SW_CALL(df_lock_run(lk, run_ok_fn, &ran, &lr));
    WATCH(la, rec_end, rla);
    WATCH(lr, rec_end, rlr);
    TU_OK(df_lock_release(lk));
    EXPECT(rla, 0);
    EXPECT_VALUE(rlr, V(7));
    ck_assert_int_eq(ran, 2);
    ck_assert(!df_lock_locked(lk));
    TU_OK(df_lock_free(lk));

    /* Queue: waiting gets, a cancelled get, stored values (the ring grows),
     * overflow and underflow, gets that find a value, free with a get
     * waiting and with values stored. */
    SW_CALL(df_queue_new(L, 2, 2, &q));
    SW_CALL(df_queue_get(q, &g1));
    SW_CALL(df_queue_get(q, &g2));
    SW_CALL_RC(df_queue_get(q, &g3), DF_EQUEUE_UNDERFLOW);
    WATCH(g1, rec_end_num, rg1);
    WATCH(g2, rec_end, rg2);
    TU_OK(df_deferred_cancel(g2));
    EXPECT(rg2, DF_ECANCELLED);
    void *v1 = value_new(1), *v2 = value_new(2), *v3 = value_new(3);
    void *v4 = value_new(4);
    SW_CALL(df_queue_put(q, v1, value_free));
    EXPECT_NUM(rg1, 1);
    SW_CALL(df_queue_put(q, v2, value_free)); /* stored */
    SW_CALL(df_queue_put(q, v3, value_free));
    SW_CALL_RC(df_queue_put(q, v4, value_free), DF_EQUEUE_OVERFLOW);
    value_free(v4); /* still ours */
    SW_CALL(df_queue_get(q, &g4));
    SW_CALL(df_queue_get(q, &g5));
    WATCH(g4, rec_end_num, rg4);
    WATCH(g5, rec_end_num, rg5);
    EXPECT_NUM(rg4, 2);
    EXPECT_NUM(rg5, 3);
    SW_CALL(df_queue_get(q, &g6));
    WATCH(g6, rec_end, rg6);
    df_queue_free(q);
    EXPECT(rg6, DF_ECANCELLED);
    SW_CALL(df_queue_new(L, SIZE_MAX, SIZE_MAX, &q2));
    void *v5 = value_new(5); /* not in the call: SW_CALL may repeat it */
    SW_CALL(df_queue_put(q2, v5, value_free));
    df_queue_free(q2); /* destroys the value */

    df_deferred_unref(inner);
    df_deferred *all[] = {a1, a2, a3, a4, r1, r2, la, lr, g1, g2, g4, g5, g6};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        df_deferred_unref(all[i]);
    sw_loop_free();
}

START_TEST(test_alloc_sync)
{
    sweep("sync", scenario_sync);
}
END_TEST

/* ---------------------------------------------------------------- timers */

static void scenario_timer(void)
{
    df_timer *t[20];
    df_deferred *d1, *d2, *d3;
    rec r1 = {0}, r2a = {0}, r2b = {0}, r2 = {0}, r3 = {0};
    int ticks = 0;

    sw_loop_new();
    /* 20 timers: the heap grows past its first 16 slots. */
    for (int i = 0; i < 20; i++)
        SW_CALL(
            df_loop_call_later(L, i % 2 ? HOUR_NS : 0, on_call, &ticks, &t[i]));
    for (int i = 1; i < 20; i += 2)
        TU_OK(df_timer_cancel(t[i]));

    /* Fires before its deadline: the timer goes away. */
    SW_CALL(df_deferred_new(L, &d1));
    SW_CALL(df_deferred_set_timeout(d1, HOUR_NS));
    WATCH(d1, rec_end, r1);
    TU_OK(df_deferred_callback(d1, NULL, NULL));
    EXPECT(r1, 0);

    /* Times out; its inline entries are taken, so the timeout's own pair
     * needs an allocation. */
    SW_CALL(df_deferred_new(L, &d2));
    WATCH(d2, rec_pass, r2a);
    WATCH(d2, rec_pass, r2b);
    SW_CALL(df_deferred_set_timeout(d2, 0));
    WATCH(d2, rec_end, r2);

    /* Cancelled by hand before its deadline: DF_ECANCELLED. */
    SW_CALL(df_deferred_new(L, &d3));
    SW_CALL(df_deferred_set_timeout(d3, HOUR_NS));
    WATCH(d3, rec_end, r3);
    TU_OK(df_deferred_cancel(d3));
    EXPECT(r3, DF_ECANCELLED);
    /* One per life (the state is allocated before that is checked, so
     * this may first say DF_ENOMEM). */
    SW_CALL_RC(df_deferred_set_timeout(d3, 0), DF_EBUSY);

    TU_OK(df_loop_run(L));
    ck_assert_int_eq(ticks, 10);
    EXPECT(r2a, DF_ECANCELLED);
    EXPECT(r2b, DF_ECANCELLED);
    EXPECT(r2, DF_ETIMEDOUT);
    ck_assert_uint_eq(df_loop_pending(L), 0);

    df_deferred_unref(d1);
    df_deferred_unref(d2);
    df_deferred_unref(d3);
    sw_loop_free();
}

START_TEST(test_alloc_timer)
{
    sweep("timer", scenario_timer);
}
END_TEST

/* ------------------------------------------------------------------ pool */

static const df_pool_options one_thread = {1, 0};

static void scenario_pool(void)
{
    df_pool *p, *p2;
    df_sem *s;
    df_deferred *j[5], *sj[3], *g;
    rec rj[5] = {{0}}, rsj[3] = {{0}}, rg = {0};

    sw_loop_new();
    SW_CALL(df_pool_new(L, &one_thread, &p));
    tu_gate_reset(&B);
    SW_CALL(df_pool_submit(p, work_block, V(1), &j[0]));
    WATCH(j[0], rec_end, rj[0]);
    tu_gate_wait_entered(&B, 1); /* j[0] runs; what follows is queued */
    SW_CALL(df_pool_submit(p, work_value, V(2), &j[1]));
    SW_CALL(df_pool_submit(p, work_fail, V(3), &j[2]));
    SW_CALL(df_pool_submit(p, work_value, V(4), &j[3]));
    for (int i = 1; i < 4; i++)
        WATCH(j[i], rec_end, rj[i]);
    TU_OK(df_deferred_cancel(j[3])); /* queued: fails at once */
    EXPECT(rj[3], DF_ECANCELLED);

    /* Several jobs through a semaphore: one holds the token, two wait. */
    SW_CALL(df_sem_new(L, 1, &s));
    for (int i = 0; i < 3; i++) {
        SW_CALL(df_sem_run_in_pool(s, p, work_value, V(10 + i), &sj[i]));
        WATCH(sj[i], rec_end, rsj[i]);
    }
    tu_gate_open(&B);
    TU_OK(df_loop_run(L));
    EXPECT_VALUE(rj[0], V(1));
    EXPECT_VALUE(rj[1], V(2));
    EXPECT(rj[2], DF_EAGAIN); /* the worker's own failure */
    for (int i = 0; i < 3; i++)
        EXPECT_VALUE(rsj[i], V(10 + i));
    ck_assert_uint_eq(df_sem_tokens(s), 1);

    /* The semaphore's gate serves p: with p2 it takes the general path
     * (acquire, then submit from the acquire's callback, where a refusal
     * fails *out). */
    SW_CALL(df_pool_new(L, &one_thread, &p2));
    SW_CALL(df_sem_run_in_pool(s, p2, work_value, V(20), &g));
    WATCH(g, rec_end, rg);
    TU_OK(df_loop_run(L));
    EXPECT_VALUE(rg, V(20));
    ck_assert_uint_eq(df_sem_tokens(s), 1);

    /* Both pools still work. */
    SW_CALL(df_pool_submit(p, work_value, V(5), &j[4]));
    WATCH(j[4], rec_end, rj[4]);
    TU_OK(df_loop_run(L));
    EXPECT_VALUE(rj[4], V(5));

    df_pool_free(p2);
    df_pool_free(p);
    TU_OK(df_sem_free(s));
    for (int i = 0; i < 5; i++)
        df_deferred_unref(j[i]);
    for (int i = 0; i < 3; i++)
        df_deferred_unref(sj[i]);
    df_deferred_unref(g);
    sw_loop_free();
}

START_TEST(test_alloc_pool)
{
    sweep("pool", scenario_pool);
}
END_TEST

/* ------------------------------------------------------------------- map */

typedef struct iter {
    long next, end;
} iter;

static int iter_next(void *arg, void **item, df_free_fn *item_free)
{
    iter *it = arg;
    if (it->next == it->end)
        return 0;
    *item = value_new(it->next++);
    *item_free = value_free;
    return 1;
}

#define MAP_N 5

typedef struct map_rec {
    int delivered[MAP_N];
    int code[MAP_N];
    uint64_t order[MAP_N]; /* indices in delivery order */
    int count;
} map_rec;

static void map_result(uint64_t index, void *item, df_result r, void *arg)
{
    map_rec *x = arg;
    ck_assert_uint_lt(index, MAP_N);
    ck_assert_int_eq(*(long *)item, (long)index);
    x->delivered[index]++;
    x->code[index] = r.failure != NULL ? df_failure_code(r.failure) : 0;
    x->order[x->count++] = index;
    df_result_clear(&r);
}

/* Item 0 blocks while the blocker is closed (the cancel map). */
static df_result map_work(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    (void)w;
    if (*(long *)item == 0)
        tu_gate_pass(&B);
    return df_ok(item, NULL);
}

/* The deferreds that map_call returned unfired, with a reference. */
static df_deferred *g_stash[MAP_N];
static int g_nstash;

/* Even items finish at once; odd ones return a deferred whose inline
 * entries are taken (the map's pair then needs an allocation), fired later
 * from g_stash.  A refusal here fails the item. */
static df_result map_call(void *item, void *arg)
{
    (void)arg;
    long v = *(long *)item;
    if (v % 2 == 0)
        return df_ok(V(v), NULL);
    df_deferred *d;
    int rc = df_deferred_new(L, &d);
    if (rc != 0)
        return df_err(df_failure_new(L, rc, NULL));
    if ((rc = df_deferred_add_both(d, pass, NULL)) != 0 ||
        (rc = df_deferred_add_both(d, pass, NULL)) != 0) {
        df_deferred_unref(d);
        return df_err(df_failure_new(L, rc, NULL));
    }
    ck_assert_int_lt(g_nstash, MAP_N);
    g_stash[g_nstash++] = df_deferred_ref(d);
    return df_wait(d);
}

/* Checks a finished map: every pulled item delivered once, in order if
 * `ordered`; returns the done deferred's outcome (EXPECT-checked). */
static void check_map(df_map *m, const map_rec *x, const rec *done, int want,
                      bool ordered, int item_want)
{
    df_map_stats st;
    TU_OK(df_map_get_stats(m, &st));
    expect_code(done, want, "done", __LINE__);
    ck_assert_uint_eq(st.running, 0);
    ck_assert_uint_eq(st.buffered, 0);
    ck_assert_uint_eq(st.done, st.pulled);
    ck_assert_int_eq(x->count, (int)st.pulled);
    for (uint64_t i = 0; i < MAP_N; i++) {
        ck_assert_int_eq(x->delivered[i], i < st.pulled ? 1 : 0);
        if (i < st.pulled)
            code_or_nomem(x->code[i], item_want, __LINE__);
        if (ordered && (int)i < x->count)
            ck_assert_uint_eq(x->order[i], i);
    }
    if (done->code == want && want == 0)
        ck_assert_uint_eq(st.pulled, MAP_N);
}

static void scenario_map(void)
{
    df_pool *p;
    df_map *m;
    df_deferred *done, *j;
    rec rdone, rj = {0};

    sw_loop_new();
    SW_CALL(df_pool_new(L, &one_thread, &p));

    /* Unordered then ordered, on the pool.  A refused submit fails its
     * item and stops the map: done fails with DF_ENOMEM. */
    for (int ordered = 0; ordered <= 1; ordered++) {
        iter it = {0, MAP_N};
        map_rec x;
        memset(&x, 0, sizeof x);
        df_map_options o = {0};
        o.limit = 2;
        o.flags = ordered ? DF_MAP_ORDERED : 0;
        o.window = ordered ? 2 : 0;
        o.next = iter_next;
        o.next_arg = &it;
        o.pool = p;
        o.work = map_work;
        o.on_result = map_result;
        o.arg = &x;
        memset(&rdone, 0, sizeof rdone);
        tu_gate_reset(&B);
        tu_gate_open(&B); /* item 0 does not block here */
        SW_CALL(df_map_start(L, &o, &m, &done));
        WATCH(done, rec_end, rdone);
        TU_OK(df_loop_run(L));
        check_map(m, &x, &rdone, 0, ordered, 0);
        TU_OK(df_map_free(m));
        df_deferred_unref(done);
    }

    /* On the loop thread, items returning values and deferreds. */
    {
        iter it = {0, MAP_N};
        map_rec x;
        memset(&x, 0, sizeof x);
        df_map_options o = {0};
        o.limit = 3;
        o.next = iter_next;
        o.next_arg = &it;
        o.call = map_call;
        o.on_result = map_result;
        o.arg = &x;
        memset(&rdone, 0, sizeof rdone);
        g_nstash = 0;
        SW_CALL(df_map_start(L, &o, &m, &done));
        WATCH(done, rec_end, rdone);
        /* Firing one may pull more items, which may stash more. */
        while (g_nstash > 0) {
            df_deferred *d = g_stash[--g_nstash];
            TU_OK(df_deferred_callback(d, NULL, NULL));
            df_deferred_unref(d);
        }
        check_map(m, &x, &rdone, 0, false, 0);
        TU_OK(df_map_free(m));
        df_deferred_unref(done);
    }

    /* Cancelled while item 0 runs and item 1 is queued. */
    {
        iter it = {0, MAP_N};
        map_rec x;
        memset(&x, 0, sizeof x);
        df_map_options o = {0};
        df_map_stats st;
        o.limit = 2;
        o.next = iter_next;
        o.next_arg = &it;
        o.pool = p;
        o.work = map_work;
        o.on_result = map_result;
        o.arg = &x;
        memset(&rdone, 0, sizeof rdone);
        tu_gate_reset(&B);
        SW_CALL(df_map_start(L, &o, &m, &done));
        WATCH(done, rec_end, rdone);
        TU_OK(df_map_get_stats(m, &st));
        /* Unless submitting item 0 was refused (the map then stopped at
         * once), item 0 is on the pool and will block. */
        if (st.running > 0)
            tu_gate_wait_entered(&B, 1);
        TU_OK(df_map_cancel(m));
        tu_gate_open(&B);
        TU_OK(df_loop_run(L));
        check_map(m, &x, &rdone, DF_ECANCELLED, false, DF_ECANCELLED);
        TU_OK(df_map_free(m));
        df_deferred_unref(done);
    }

    /* The pool still works. */
    SW_CALL(df_pool_submit(p, work_value, V(9), &j));
    WATCH(j, rec_end, rj);
    TU_OK(df_loop_run(L));
    EXPECT_VALUE(rj, V(9));
    df_deferred_unref(j);
    df_pool_free(p);
    sw_loop_free();
}

START_TEST(test_alloc_map)
{
    sweep("map", scenario_map);
}
END_TEST

/* -------------------------------------------------------------- shutdown */

static void scenario_shutdown(void)
{
    df_pool *p, *p2, *p3;
    df_sem *s, *s2;
    df_deferred *j[3], *r[3], *a, *k[3], *q[2], *m[2], *x;
    rec rj[3] = {{0}}, rr[3] = {{0}}, ra = {0}, rk[3] = {{0}};
    rec rq[2] = {{0}}, rm[2] = {{0}};

    sw_loop_new();

    /* DRAIN: queued jobs run; of the jobs waiting for the token, the one
     * ahead of a loop-side waiter gets it from a finishing job, the one
     * behind fails with DF_ESHUTDOWN. */
    SW_CALL(df_pool_new(L, &one_thread, &p));
    SW_CALL(df_sem_new(L, 1, &s));
    tu_gate_reset(&B);
    SW_CALL(df_pool_submit(p, work_block, V(1), &j[0]));
    tu_gate_wait_entered(&B, 1);
    SW_CALL(df_pool_submit(p, work_value, V(2), &j[1]));
    SW_CALL(df_pool_submit(p, work_value, V(3), &j[2]));
    SW_CALL(df_sem_run_in_pool(s, p, work_value, V(11), &r[0]));
    SW_CALL(df_sem_run_in_pool(s, p, work_value, V(12), &r[1]));
    SW_CALL(df_sem_acquire(s, &a));
    SW_CALL(df_sem_run_in_pool(s, p, work_value, V(13), &r[2]));
    for (int i = 0; i < 3; i++) {
        WATCH(j[i], rec_end, rj[i]);
        WATCH(r[i], rec_end, rr[i]);
    }
    WATCH(a, rec_end, ra);
    tu_gate_open(&B);
    TU_OK(df_pool_shutdown(p, DF_POOL_DRAIN));
    for (int i = 0; i < 3; i++)
        EXPECT_VALUE(rj[i], V(i + 1));
    EXPECT_VALUE(rr[0], V(11));
    EXPECT_VALUE(rr[1], V(12));
    EXPECT(rr[2], DF_ESHUTDOWN);
    EXPECT(ra, 0);
    TU_OK(df_sem_release(s));
    ck_assert_uint_eq(df_sem_tokens(s), 1);
    SW_CALL_RC(df_pool_submit(p, work_value, NULL, &x), DF_ESHUTDOWN);
    SW_CALL_RC(df_sem_run_in_pool(s, p, work_value, NULL, &x), DF_ESHUTDOWN);
    TU_OK(df_pool_shutdown(p, DF_POOL_CANCEL)); /* idempotent */
    df_pool_free(p);

    /* CANCEL: queued jobs fail with DF_ECANCELLED (the first one's
     * callback lets the running job finish), gated ones with
     * DF_ESHUTDOWN, and the token comes back. */
    SW_CALL(df_pool_new(L, &one_thread, &p2));
    SW_CALL(df_sem_new(L, 1, &s2));
    tu_gate_reset(&B);
    SW_CALL(df_pool_submit(p2, work_block, V(1), &k[0]));
    tu_gate_wait_entered(&B, 1);
    SW_CALL(df_pool_submit(p2, work_value, V(2), &k[1]));
    SW_CALL(df_pool_submit(p2, work_value, V(3), &k[2]));
    SW_CALL(df_sem_run_in_pool(s2, p2, work_value, V(21), &q[0]));
    SW_CALL(df_sem_run_in_pool(s2, p2, work_value, V(22), &q[1]));
    WATCH(k[0], rec_end, rk[0]);
    WATCH(k[1], rec_end_open, rk[1]);
    WATCH(k[2], rec_end, rk[2]);
    WATCH(q[0], rec_end, rq[0]);
    WATCH(q[1], rec_end, rq[1]);
    TU_OK(df_pool_shutdown(p2, DF_POOL_CANCEL));
    EXPECT_VALUE(rk[0], V(1));
    EXPECT(rk[1], DF_ECANCELLED);
    EXPECT(rk[2], DF_ECANCELLED);
    EXPECT(rq[0], DF_ECANCELLED);
    EXPECT(rq[1], DF_ESHUTDOWN);
    ck_assert_uint_eq(df_sem_tokens(s2), 1);
    df_pool_free(p2);

    /* Freeing an open pool cancels what is queued. */
    SW_CALL(df_pool_new(L, &one_thread, &p3));
    tu_gate_reset(&B);
    SW_CALL(df_pool_submit(p3, work_block, V(1), &m[0]));
    tu_gate_wait_entered(&B, 1);
    SW_CALL(df_pool_submit(p3, work_value, V(2), &m[1]));
    WATCH(m[0], rec_end, rm[0]);
    WATCH(m[1], rec_end_open, rm[1]);
    df_pool_free(p3);
    EXPECT_VALUE(rm[0], V(1));
    EXPECT(rm[1], DF_ECANCELLED);

    TU_OK(df_sem_free(s));
    TU_OK(df_sem_free(s2));
    df_deferred *all[] = {j[0], j[1], j[2], r[0], r[1], r[2], a,
                          k[0], k[1], k[2], q[0], q[1], m[0], m[1]};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        df_deferred_unref(all[i]);
    sw_loop_free();
}

START_TEST(test_alloc_shutdown)
{
    sweep("shutdown", scenario_shutdown);
}
END_TEST

/* ======================================================= focused tests */

static void focused_setup(void)
{
    tu_fa_init(&S.fa, true);
    S.alloc = tu_fa_allocator(&S.fa);
    S.n = 0;
    S.sticky = false;
    S.unhandled = 0;
    S.values_made = S.values_freed = 0;
    sw_loop_new();
}

static void focused_teardown(void)
{
    tu_fa_disarm(&S.fa);
    sw_loop_free();
    ck_assert_int_eq(atomic_load(&S.fa.live), 0);
    ck_assert_int_eq(S.values_made, S.values_freed);
}

/* Allocations made on pool threads: a work function's failure that cannot
 * be allocated arrives as DF_ENOMEM; a cross-thread call that cannot be
 * queued returns DF_ENOMEM to its thread and runs nothing. */
typedef struct cross {
    df_loop *loop;
    int rc_refused, rc_ok;
    int calls;
} cross;

static void cross_call(void *arg, int status)
{
    ck_assert_int_eq(status, 0);
    ((cross *)arg)->calls++;
}

static df_result work_cross(df_work *w, void *arg)
{
    cross *c = arg;
    atomic_store(&S.fa.fail_others, true);
    c->rc_refused = df_loop_call_from_thread(df_work_loop(w), cross_call, c);
    atomic_store(&S.fa.fail_others, false);
    c->rc_ok = df_loop_call_from_thread(df_work_loop(w), cross_call, c);
    return df_ok(NULL, NULL);
}

START_TEST(test_alloc_worker_threads)
{
    df_pool *p;
    df_deferred *d, *d2;
    rec r = {0}, r2 = {0};
    cross c = {0};

    focused_setup();
    TU_OK(df_pool_new(L, &one_thread, &p));
    atomic_store(&S.fa.fail_others, true);
    TU_OK(df_pool_submit(p, work_fail, V(1), &d));
    WATCH(d, rec_end, r);
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(r.calls, 1);
    ck_assert_int_eq(r.code, DF_ENOMEM);
    ck_assert_int_gt(atomic_load(&S.fa.failed), 0);
    atomic_store(&S.fa.fail_others, false);

    TU_OK(df_pool_submit(p, work_cross, &c, &d2));
    WATCH(d2, rec_end, r2);
    TU_OK(df_loop_run(L));
    EXPECT(r2, 0);
    ck_assert_int_eq(c.rc_refused, DF_ENOMEM);
    ck_assert_int_eq(c.rc_ok, 0);
    ck_assert_int_eq(c.calls, 1);
    df_pool_free(p);
    df_deferred_unref(d);
    df_deferred_unref(d2);
    focused_teardown();
}
END_TEST

/* Regression: releasing an unfired deferred with no memory left reported
 * a DF_ENOMEM failure as unhandled, and its chain saw DF_ENOMEM; the
 * release failure is DF_ECANCELLED and never reported, memory or not. */
START_TEST(test_alloc_release_unfired)
{
    df_deferred *quiet, *watched;
    rec r = {0};

    focused_setup();
    TU_OK(df_deferred_new(L, &quiet));
    TU_OK(df_deferred_new(L, &watched));
    WATCH(watched, rec_end, r);
    tu_fa_arm(&S.fa, 1, true); /* nothing can be allocated */
    df_deferred_unref(quiet);
    df_deferred_unref(watched);
    ck_assert_int_gt(atomic_load(&S.fa.failed), 0);
    ck_assert_int_eq(S.unhandled, 0);
    ck_assert_int_eq(r.calls, 1);
    ck_assert_int_eq(r.code, DF_ECANCELLED);
    focused_teardown();
}
END_TEST

/* Regression: when df_deferred_set_timeout could not add its callbacks,
 * the deferred stayed marked as having a timeout, and every later attempt
 * said DF_EBUSY. */
START_TEST(test_alloc_timeout_retry)
{
    df_deferred *d;
    df_timer *t;
    rec ra = {0}, rb = {0}, r = {0};
    int ticks = 0;

    focused_setup();
    /* Make the heap and a spare timer now, so that set_timeout allocates
     * only its state (1) and, the two inline entries being taken, its
     * callbacks' entries (2). */
    TU_OK(df_loop_call_later(L, HOUR_NS, on_call, &ticks, &t));
    TU_OK(df_timer_cancel(t));
    TU_OK(df_deferred_new(L, &d));
    WATCH(d, rec_pass, ra);
    WATCH(d, rec_pass, rb);
    tu_fa_arm(&S.fa, 2, false);
    TU_ERR(df_deferred_set_timeout(d, 0), DF_ENOMEM);
    ck_assert_int_eq(atomic_load(&S.fa.failed), 1);
    ck_assert_uint_eq(df_loop_pending(L), 0); /* its timer went away */
    tu_fa_disarm(&S.fa);
    TU_OK(df_deferred_set_timeout(d, 0));
    WATCH(d, rec_end, r);
    TU_OK(df_loop_run(L));
    ck_assert_int_eq(r.calls, 1);
    ck_assert_int_eq(r.code, DF_ETIMEDOUT);
    df_deferred_unref(d);
    focused_teardown();
}
END_TEST

/* ------------------------------------------------------------------ main */

static Suite *alloc_suite(void)
{
    Suite *s = suite_create("alloc");
    TCase *tc = tcase_create("sweep");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_alloc_loop);
    tcase_add_test(tc, test_alloc_deferred);
    tcase_add_test(tc, test_alloc_failure);
    tcase_add_test(tc, test_alloc_list);
    tcase_add_test(tc, test_alloc_sync);
    tcase_add_test(tc, test_alloc_timer);
    tcase_add_test(tc, test_alloc_pool);
    tcase_add_test(tc, test_alloc_map);
    tcase_add_test(tc, test_alloc_shutdown);
    suite_add_tcase(s, tc);

    tc = tcase_create("focused");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_alloc_worker_threads);
    tcase_add_test(tc, test_alloc_release_unfired);
    tcase_add_test(tc, test_alloc_timeout_retry);
    suite_add_tcase(s, tc);
    return s;
}

/* TU_MAIN, plus the total of failure points tried.  In fork mode each
 * test counts in its own process: only the per-scenario lines are right. */
int main(void)
{
    SRunner *sr = srunner_create(alloc_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    if (srunner_fork_status(sr) == CK_NOFORK)
        printf("alloc: %ld failure points tried in %d scenarios\n", g_points,
               g_scenarios);
    else
        printf("alloc: per-scenario counts above (no total in fork "
               "mode)\n");
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
