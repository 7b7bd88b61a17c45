/* SPDX-License-Identifier: MIT */
/* Check tests for failures, error codes and df_result_clear. */
#include <check.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deferred.h"
#include "deferred-internal.h"
#include "testutil.h"

/* ------------------------------------------------------------ helpers */

/* The counting allocator of testutil.h. */
typedef tu_counting_alloc counting_alloc;
#define ca_malloc tu_ca_malloc
#define ca_realloc tu_ca_realloc
#define ca_free tu_ca_free

static counting_alloc g_ca;
static df_allocator g_allocator = {ca_malloc, ca_realloc, ca_free, &g_ca};
static df_loop *L;

/* Payloads: a counter per payload so "exactly once" is checked per value. */
typedef struct payload {
    atomic_int frees;
    atomic_int *total; /* optional shared counter */
} payload;

static atomic_int g_payload_frees;

static void payload_free(void *p)
{
    payload *pl = p;
    atomic_fetch_add(&pl->frees, 1);
    atomic_fetch_add(&g_payload_frees, 1);
    if (pl->total != NULL)
        atomic_fetch_add(pl->total, 1);
}

/* A heap value whose destructor counts its calls. */
static int g_box_frees;

static void box_free(void *p)
{
    g_box_frees++;
    free(p);
}

static int *box(int v)
{
    int *p = malloc(sizeof *p);
    ck_assert_ptr_nonnull(p);
    *p = v;
    return p;
}

static void setup(void)
{
    atomic_store(&g_ca.live, 0);
    atomic_store(&g_ca.calls, 0);
    atomic_store(&g_ca.fail, 0);
    atomic_store(&g_payload_frees, 0);
    g_box_frees = 0;
    df_loop_options opts = DF_LOOP_OPTIONS_INIT;
    opts.allocator = &g_allocator;
    ck_assert_int_eq(df_loop_new(&opts, &L), 0);
}

static void teardown(void)
{
    atomic_store(&g_ca.fail, 0);
    ck_assert_int_eq(df_loop_free(L), 0);
    L = NULL;
    /* Every block the library took from the loop's allocator came back. */
    ck_assert_int_eq(atomic_load(&g_ca.live), 0);
}

/* A message nobody can mistake for a table description. */
static char *make_text(size_t len)
{
    char *s = malloc(len + 1);
    ck_assert_ptr_nonnull(s);
    for (size_t i = 0; i < len; i++)
        s[i] = (char)('a' + i % 26);
    s[len] = '\0';
    return s;
}

/* -------------------------------------------------------- constructors */

START_TEST(test_failure_new_code_message)
{
    long before = atomic_load(&g_ca.live);
    df_failure *f = df_failure_new(L, DF_EFAILED, "disk %d is %s", 3, "gone");
    ck_assert_ptr_nonnull(f);
    ck_assert_ptr_ne(f, df__failure_nomem());
    ck_assert_int_eq(df_failure_code(f), DF_EFAILED);
    ck_assert_str_eq(df_failure_message(f), "disk 3 is gone");
    ck_assert_ptr_null(df_failure_payload(f));
    ck_assert_int_eq(df_failure_index(f), -1);
    ck_assert_ptr_null(df_failure_cause(f));
    /* The failure's memory came from the loop's allocator. */
    ck_assert_int_gt(atomic_load(&g_ca.live), before);
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&g_ca.live), before);
}
END_TEST

START_TEST(test_failure_new_without_loop)
{
    /* loop == NULL: the C library's malloc, nothing from the counter. */
    long before = atomic_load(&g_ca.calls);
    df_failure *f = df_failure_new(NULL, DF_EBUSY, "no loop");
    ck_assert_int_eq(df_failure_code(f), DF_EBUSY);
    ck_assert_str_eq(df_failure_message(f), "no loop");
    ck_assert_int_eq(atomic_load(&g_ca.calls), before);
    df_failure_unref(f);
}
END_TEST

START_TEST(test_failure_application_code)
{
    /* Any non-zero int is a valid code, also one outside the table. */
    df_failure *f = df_failure_new(L, 42, "app error %s", "x");
    ck_assert_int_eq(df_failure_code(f), 42);
    ck_assert_str_eq(df_failure_message(f), "app error x");
    df_failure_unref(f);
    f = df_failure_new(L, INT_MIN, "min");
    ck_assert_int_eq(df_failure_code(f), INT_MIN);
    df_failure_unref(f);
}
END_TEST

START_TEST(test_failure_fmt_null_uses_strerror)
{
    static const int codes[] = {DF_ECANCELLED, DF_ETIMEDOUT, DF_EALREADY_CALLED,
                                DF_EFAILED, DF_ENOMEM, -4199};
    const char *nofmt = NULL;
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        df_failure *f = df_failure_new(L, codes[i], nofmt);
        ck_assert_int_eq(df_failure_code(f), codes[i]);
        ck_assert_str_eq(df_failure_message(f), df_strerror(codes[i]));
        df_failure_unref(f);
    }
    int marker = 0;
    df_failure *f = df_failure_new_payload(L, DF_EQUEUE_OVERFLOW, &marker,
                                           NULL, nofmt);
    ck_assert_str_eq(df_failure_message(f), "queue is full");
    ck_assert_ptr_eq(df_failure_payload(f), &marker);
    df_failure_unref(f);
}
END_TEST

START_TEST(test_failure_percent_literal)
{
    df_failure *f = df_failure_new(L, DF_EFAILED, "100%% done, %s", "%d");
    ck_assert_str_eq(df_failure_message(f), "100% done, %d");
    df_failure_unref(f);
}
END_TEST

START_TEST(test_failure_empty_message)
{
    df_failure *f = df_failure_new(L, DF_EFAILED, "%s", "");
    ck_assert_str_eq(df_failure_message(f), "");
    df_failure_unref(f);
}
END_TEST

/* Messages around and far beyond any small internal buffer come back
 * exactly as formatted. */
START_TEST(test_failure_long_message)
{
    static const size_t lens[] = {250, 253, 254, 255, 256, 257, 300, 511,
                                  512, 4000, 100000};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        char *s = make_text(lens[i]);
        /* The formatted text is "<s>|<len>", one to six chars longer. */
        char *want = malloc(lens[i] + 32);
        ck_assert_ptr_nonnull(want);
        snprintf(want, lens[i] + 32, "%s|%zu", s, lens[i]);
        df_failure *f = df_failure_new(L, DF_EFAILED, "%s|%zu", s, lens[i]);
        ck_assert_int_eq(df_failure_code(f), DF_EFAILED);
        ck_assert_uint_eq(strlen(df_failure_message(f)), strlen(want));
        ck_assert_str_eq(df_failure_message(f), want);
        df_failure_unref(f);
        /* Same through the payload constructor and df_errf. */
        payload pl = {0};
        f = df_failure_new_payload(L, DF_EBUSY, &pl, payload_free, "%s|%zu",
                                   s, lens[i]);
        ck_assert_str_eq(df_failure_message(f), want);
        ck_assert_ptr_eq(df_failure_payload(f), &pl);
        df_failure_unref(f);
        ck_assert_int_eq(atomic_load(&pl.frees), 1);
        df_result r = df_errf(L, DF_EAGAIN, "%s|%zu", s, lens[i]);
        ck_assert_str_eq(df_failure_message(r.failure), want);
        df_result_clear(&r);
        free(want);
        free(s);
    }
}
END_TEST

/* ------------------------------------------------------------- payload */

START_TEST(test_failure_payload_destructor_once)
{
    payload pl = {0};
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &pl, payload_free,
                                           "with payload");
    ck_assert_ptr_eq(df_failure_payload(f), &pl);
    ck_assert_ptr_eq(df_failure_ref(f), f);
    ck_assert_ptr_eq(df_failure_ref(f), f);
    df_failure_unref(f);
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&pl.frees), 0);
    /* The payload lives exactly as long as the failure. */
    ck_assert_ptr_eq(df_failure_payload(f), &pl);
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
    ck_assert_int_eq(atomic_load(&g_payload_frees), 1);
}
END_TEST

START_TEST(test_failure_payload_null_destructor)
{
    int on_stack = 7;
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &on_stack, NULL,
                                           "borrowed %d", on_stack);
    ck_assert_ptr_eq(df_failure_payload(f), &on_stack);
    ck_assert_str_eq(df_failure_message(f), "borrowed 7");
    df_failure_unref(f);
    ck_assert_int_eq(on_stack, 7);
}
END_TEST

START_TEST(test_failure_payload_heap_value)
{
    /* A real heap payload, freed by its destructor (valgrind checks it). */
    int *v = box(11);
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, v, box_free, NULL);
    ck_assert_int_eq(*(int *)df_failure_payload(f), 11);
    df_failure_unref(f);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

START_TEST(test_failure_unref_null)
{
    df_failure_unref(NULL);
}
END_TEST

/* --------------------------------------------------------- allocation */

START_TEST(test_failure_enomem_static)
{
    atomic_store(&g_ca.fail, 1);
    long calls = atomic_load(&g_ca.calls);
    df_failure *f = df_failure_new(L, DF_EFAILED, "will not fit %d", 1);
    /* The allocator was asked (so the failure went through it) ... */
    ck_assert_int_gt(atomic_load(&g_ca.calls), calls);
    /* ... and the shared static DF_ENOMEM failure came back. */
    ck_assert_ptr_nonnull(f);
    ck_assert_ptr_eq(f, df__failure_nomem());
    ck_assert_int_eq(df_failure_code(f), DF_ENOMEM);
    ck_assert_ptr_nonnull(df_failure_message(f));
    ck_assert_int_gt((int)strlen(df_failure_message(f)), 0);
    ck_assert_ptr_null(df_failure_payload(f));
    ck_assert_int_eq(df_failure_index(f), -1);
    ck_assert_ptr_null(df_failure_cause(f));

    /* Shared: a second allocation failure gives the same object, also with
     * a message far beyond any internal buffer and with fmt == NULL. */
    char *s = make_text(1000);
    ck_assert_ptr_eq(df_failure_new(L, DF_EBUSY, "%s", s), f);
    ck_assert_ptr_eq(df_failure_new(L, DF_EBUSY, NULL), f);
    free(s);

    /* ref/unref are no-ops on it: unref more often than ref'd. */
    ck_assert_ptr_eq(df_failure_ref(f), f);
    for (int i = 0; i < 10; i++)
        df_failure_unref(f);
    ck_assert_int_eq(df_failure_code(f), DF_ENOMEM);
    ck_assert_int_eq(atomic_load(&g_ca.live), 1); /* only the loop */
}
END_TEST

START_TEST(test_failure_enomem_runs_payload_destructor)
{
    atomic_store(&g_ca.fail, 1);
    payload pl = {0};
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &pl, payload_free,
                                           "payload %s", "lost");
    ck_assert_ptr_eq(f, df__failure_nomem());
    /* Released at once with its destructor, exactly once ... */
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
    /* ... and not exposed through the static failure. */
    ck_assert_ptr_null(df_failure_payload(f));
    df_failure_unref(f);
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);

    /* A heap payload is really freed (valgrind/ASan check the leak). */
    int *v = box(5);
    f = df_failure_new_payload(L, DF_EFAILED, v, box_free, NULL);
    ck_assert_ptr_eq(f, df__failure_nomem());
    ck_assert_int_eq(g_box_frees, 1);

    /* NULL destructor: nothing to run, still the static failure. */
    int on_stack = 0;
    f = df_failure_new_payload(L, DF_EFAILED, &on_stack, NULL, "x");
    ck_assert_ptr_eq(f, df__failure_nomem());
}
END_TEST

START_TEST(test_failure_enomem_errf)
{
    atomic_store(&g_ca.fail, 1);
    df_result r = df_errf(L, DF_ETIMEDOUT, "late by %d ms", 10);
    ck_assert_ptr_eq(r.failure, df__failure_nomem());
    ck_assert_int_eq(df_failure_code(r.failure), DF_ENOMEM);
    ck_assert(!df_result_ok(&r));
    df_result_clear(&r);
    ck_assert_ptr_null(r.failure);
}
END_TEST

START_TEST(test_failure_allocation_recovers)
{
    /* Failing on demand is not sticky: the next allocation works. */
    atomic_store(&g_ca.fail, 1);
    df_failure *f = df_failure_new(L, DF_EFAILED, "a");
    ck_assert_ptr_eq(f, df__failure_nomem());
    atomic_store(&g_ca.fail, 0);
    f = df_failure_new(L, DF_EFAILED, "b");
    ck_assert_ptr_ne(f, df__failure_nomem());
    ck_assert_str_eq(df_failure_message(f), "b");
    df_failure_unref(f);
}
END_TEST

/* Relies on failures copying the allocator (src/failure.c says "a failure
 * may outlive its loop"); the header does not promise this in so many
 * words, see the report. */
START_TEST(test_failure_outlives_loop)
{
    payload pl = {0};
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &pl, payload_free,
                                           "survivor");
    ck_assert_int_eq(df_loop_free(L), 0);
    L = NULL;
    ck_assert_str_eq(df_failure_message(f), "survivor");
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
    ck_assert_int_eq(atomic_load(&g_ca.live), 0);
    /* Give teardown a loop to free. */
    df_loop_options opts = DF_LOOP_OPTIONS_INIT;
    opts.allocator = &g_allocator;
    ck_assert_int_eq(df_loop_new(&opts, &L), 0);
}
END_TEST

/* ------------------------------------------------------------ threads */

enum { N_THREADS = 8, N_ITER = 100000 };

typedef struct thread_ctx {
    pthread_barrier_t *barrier;
    df_failure *f;
    int drop_at_end; /* drop one reference owned by this thread at the end */
    int code;
} thread_ctx;

static void *ref_unref_thread(void *arg)
{
    thread_ctx *t = arg;
    pthread_barrier_wait(t->barrier);
    for (int i = 0; i < N_ITER; i++) {
        df_failure *g = df_failure_ref(t->f);
        if (df_failure_code(g) != t->code)
            return (void *)1;
        if (i % 3 == 0) {
            df_failure_ref(g);
            df_failure_unref(g);
        }
        df_failure_unref(g);
    }
    if (t->drop_at_end)
        df_failure_unref(t->f);
    return NULL;
}

static void run_threads(df_failure *f, int drop_at_end)
{
    pthread_barrier_t barrier;
    pthread_t th[N_THREADS];
    thread_ctx ctx[N_THREADS];
    ck_assert_int_eq(pthread_barrier_init(&barrier, NULL, N_THREADS), 0);
    for (int i = 0; i < N_THREADS; i++) {
        ctx[i] = (thread_ctx){&barrier, f, drop_at_end, DF_EFAILED};
        ck_assert_int_eq(pthread_create(&th[i], NULL, ref_unref_thread,
                                        &ctx[i]), 0);
    }
    for (int i = 0; i < N_THREADS; i++) {
        void *ret;
        ck_assert_int_eq(pthread_join(th[i], &ret), 0);
        ck_assert_ptr_null(ret);
    }
    pthread_barrier_destroy(&barrier);
}

START_TEST(test_failure_ref_unref_threads)
{
    payload pl = {0};
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &pl, payload_free,
                                           "shared");
    run_threads(f, 0);
    /* Balanced refs on every thread: the caller's reference remains. */
    ck_assert_int_eq(atomic_load(&pl.frees), 0);
    ck_assert_str_eq(df_failure_message(f), "shared");
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
}
END_TEST

START_TEST(test_failure_last_unref_on_other_thread)
{
    /* Each thread owns one reference and drops it after hammering; the
     * creator's reference goes first, so some worker frees the failure. */
    payload pl = {0};
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &pl, payload_free,
                                           "handed out");
    for (int i = 0; i < N_THREADS; i++)
        df_failure_ref(f);
    df_failure_unref(f);
    run_threads(f, 1);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
}
END_TEST

typedef struct make_ctx {
    pthread_barrier_t *barrier;
    df_failure *made[64];
    int id;
} make_ctx;

static void *make_thread(void *arg)
{
    make_ctx *m = arg;
    pthread_barrier_wait(m->barrier);
    for (int i = 0; i < 64; i++)
        m->made[i] = df_failure_new(L, DF_EFAILED, "thread %d item %d", m->id,
                                    i);
    return NULL;
}

START_TEST(test_failure_made_on_threads_released_on_main)
{
    pthread_barrier_t barrier;
    pthread_t th[N_THREADS];
    static make_ctx ctx[N_THREADS];
    ck_assert_int_eq(pthread_barrier_init(&barrier, NULL, N_THREADS), 0);
    for (int i = 0; i < N_THREADS; i++) {
        ctx[i].barrier = &barrier;
        ctx[i].id = i;
        ck_assert_int_eq(pthread_create(&th[i], NULL, make_thread, &ctx[i]),
                         0);
    }
    for (int i = 0; i < N_THREADS; i++)
        ck_assert_int_eq(pthread_join(th[i], NULL), 0);
    pthread_barrier_destroy(&barrier);
    char want[64];
    for (int i = 0; i < N_THREADS; i++) {
        for (int j = 0; j < 64; j++) {
            snprintf(want, sizeof want, "thread %d item %d", i, j);
            ck_assert_str_eq(df_failure_message(ctx[i].made[j]), want);
            df_failure_unref(ctx[i].made[j]);
        }
    }
}
END_TEST

/* -------------------------------------------------------- error table */

START_TEST(test_failure_error_table)
{
    static const struct {
        int code;
        const char *name;
        const char *text;
    } table[] = {
#define ROW(name, value, text) {value, "DF_" #name, text},
        DF_ERRNO_MAP(ROW)
#undef ROW
    };
    size_t n = sizeof table / sizeof table[0];
    ck_assert_uint_ge(n, 16);
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_lt(table[i].code, 0);
        ck_assert_str_eq(df_strerror(table[i].code), table[i].text);
        ck_assert_str_eq(df_err_name(table[i].code), table[i].name);
        for (size_t j = i + 1; j < n; j++)
            ck_assert_int_ne(table[i].code, table[j].code);
        /* A failure made from the code reads back the same text. */
        df_failure *f = df_failure_new(L, table[i].code, NULL);
        ck_assert_str_eq(df_failure_message(f), table[i].text);
        df_failure_unref(f);
    }
    /* The enum carries the table values. */
#define ENUM_CHECK(name, value, text) ck_assert_int_eq(DF_##name, value);
    DF_ERRNO_MAP(ENUM_CHECK)
#undef ENUM_CHECK
    /* The library's own codes live in -4100..-4199. */
    static const int own[] = {DF_EALREADY_CALLED, DF_EFIRST_ERROR,
                              DF_EOVERRELEASE,    DF_EQUEUE_OVERFLOW,
                              DF_EQUEUE_UNDERFLOW, DF_EWRONG_THREAD,
                              DF_ENOT_CALLED,      DF_ESTATE,
                              DF_EFAILED};
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++) {
        ck_assert_int_le(own[i], -4100);
        ck_assert_int_ge(own[i], -4199);
    }
    ck_assert_int_eq(DF_ECANCELLED, -ECANCELED);
    ck_assert_int_eq(DF_ETIMEDOUT, -ETIMEDOUT);
    ck_assert_int_eq(DF_ENOMEM, -ENOMEM);
}
END_TEST

START_TEST(test_failure_error_unknown)
{
    /* Codes outside the table and unknown to the C library print with
     * their number. */
    static const int unknown[] = {-4100, -4111, -4150, -4199, -99999,
                                  INT_MIN, 1042, INT_MAX};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        char text[64], name[64];
        snprintf(text, sizeof text, "error %d", unknown[i]);
        snprintf(name, sizeof name, "DF_UNKNOWN(%d)", unknown[i]);
        ck_assert_str_eq(df_strerror(unknown[i]), text);
        ck_assert_str_eq(df_err_name(unknown[i]), name);
    }
    /* errno values outside the table have their C library names. */
    ck_assert_str_eq(df_err_name(ENOENT), "ENOENT");
    ck_assert_str_eq(df_err_name(-ENOENT), "ENOENT");
}
END_TEST

/* Header: "a positive errno value is described by strerror semantics". */
START_TEST(test_failure_error_positive_errno)
{
    /* errno values outside the table, of either sign, get the C library's
     * text and name; only the table's codes have DF_ names. */
    static const int pos[] = {ENOENT, EPIPE, EINVAL, EACCES};
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++) {
        char want[256];
        snprintf(want, sizeof want, "%s", strerror(pos[i]));
        ck_assert_str_eq(df_strerror(pos[i]), want);
        if (pos[i] != EINVAL) {
            ck_assert_str_eq(df_strerror(-pos[i]), want);
            ck_assert_str_eq(df_err_name(-pos[i]), strerrorname_np(pos[i]));
        }
    }
}
END_TEST

/* ------------------------------------------------------------- result */

START_TEST(test_failure_errf)
{
    long before = atomic_load(&g_ca.live);
    df_result r = df_errf(L, DF_EBUSY, "busy %d/%d", 3, 4);
    ck_assert_ptr_nonnull(r.failure);
    ck_assert_ptr_null(r.value);
    ck_assert_ptr_null((void *)r.free);
    ck_assert_ptr_null(r.wait);
    ck_assert(!df_result_ok(&r));
    ck_assert_int_eq(df_failure_code(r.failure), DF_EBUSY);
    ck_assert_str_eq(df_failure_message(r.failure), "busy 3/4");
    ck_assert_int_eq(df_failure_index(r.failure), -1);
    ck_assert_int_gt(atomic_load(&g_ca.live), before);
    df_result_clear(&r);
    ck_assert_ptr_null(r.failure);
    ck_assert(df_result_ok(&r));
    ck_assert_int_eq(atomic_load(&g_ca.live), before);

    const char *nofmt = NULL;
    r = df_errf(L, DF_ECANCELLED, nofmt);
    ck_assert_str_eq(df_failure_message(r.failure), "operation cancelled");
    df_result_clear(&r);
}
END_TEST

START_TEST(test_failure_err_steals)
{
    payload pl = {0};
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &pl, payload_free,
                                           "stolen");
    df_result r = df_err(f);
    ck_assert_ptr_eq(r.failure, f);
    ck_assert(!df_result_ok(&r));
    df_result_clear(&r);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
}
END_TEST

START_TEST(test_failure_result_clear_value)
{
    df_result r = df_ok(box(3), box_free);
    ck_assert(df_result_ok(&r));
    df_result_clear(&r);
    ck_assert_int_eq(g_box_frees, 1);
    ck_assert_ptr_null(r.value);
    ck_assert_ptr_null((void *)r.free);
    ck_assert_ptr_null(r.failure);
    ck_assert_ptr_null(r.wait);
    ck_assert(df_result_ok(&r));
    /* Already reset: a second clear runs nothing. */
    df_result_clear(&r);
    ck_assert_int_eq(g_box_frees, 1);

    /* No destructor: the value is only forgotten. */
    int on_stack = 9;
    r = df_ok(&on_stack, NULL);
    df_result_clear(&r);
    ck_assert_ptr_null(r.value);
    ck_assert_int_eq(on_stack, 9);

    /* An empty result is fine too. */
    r = df_ok(NULL, NULL);
    df_result_clear(&r);
    ck_assert(df_result_ok(&r));
}
END_TEST

START_TEST(test_failure_result_clear_failure_shared)
{
    payload pl = {0};
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &pl, payload_free,
                                           "shared by result");
    df_result r = df_err(df_failure_ref(f));
    df_result_clear(&r);
    /* Only the result's reference went; ours keeps it alive. */
    ck_assert_int_eq(atomic_load(&pl.frees), 0);
    ck_assert_str_eq(df_failure_message(f), "shared by result");
    ck_assert(df_result_ok(&r));
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
}
END_TEST

static void *clear_thread(void *arg)
{
    df_result_clear(arg);
    return NULL;
}

START_TEST(test_failure_result_clear_any_thread)
{
    /* Without a deferred inside, df_result_clear works on any thread. */
    payload pl = {0};
    df_result r = df_err(df_failure_new_payload(L, DF_EFAILED, &pl,
                                                payload_free, "t"));
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, clear_thread, &r), 0);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
    ck_assert(df_result_ok(&r));

    r = df_ok(box(1), box_free);
    ck_assert_int_eq(pthread_create(&th, NULL, clear_thread, &r), 0);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    ck_assert_int_eq(g_box_frees, 1);
}
END_TEST

/* ------------------------------------------------- first error (internal) */

/* df__failure_first_error is internal (lists build it); tested here because
 * its reference handling is failure-level code. */
START_TEST(test_failure_first_error_cause)
{
    payload pl = {0};
    df_failure *cause = df_failure_new_payload(L, DF_ETIMEDOUT, &pl,
                                               payload_free, "member late");
    df_failure *f = df__failure_first_error(L, 3, cause);
    ck_assert_int_eq(df_failure_code(f), DF_EFIRST_ERROR);
    ck_assert_int_eq(df_failure_index(f), 3);
    ck_assert_ptr_eq(df_failure_cause(f), cause);
    ck_assert_ptr_nonnull(strstr(df_failure_message(f), "member late"));
    /* The first-error failure holds its own reference to the cause. */
    df_failure_unref(cause);
    ck_assert_int_eq(atomic_load(&pl.frees), 0);
    ck_assert_str_eq(df_failure_message(df_failure_cause(f)), "member late");
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
}
END_TEST

START_TEST(test_failure_first_error_deep_causes)
{
    /* A long chain of causes is released without recursion.  Each level's
     * message embeds its cause's, so the depth is kept moderate. */
    payload pl = {0};
    df_failure *f = df_failure_new_payload(L, DF_EFAILED, &pl, payload_free,
                                           "root");
    for (int i = 0; i < 3000; i++) {
        df_failure *g = df__failure_first_error(L, (size_t)i, f);
        df_failure_unref(f);
        f = g;
    }
    ck_assert_int_eq(df_failure_index(f), 2999);
    df_failure_unref(f);
    ck_assert_int_eq(atomic_load(&pl.frees), 1);
}
END_TEST

/* --------------------------------------------------------------- suite */

static Suite *failure_suite(void)
{
    Suite *s = suite_create("failure");
    TCase *tc;

    tc = tcase_create("constructors");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_failure_new_code_message);
    tcase_add_test(tc, test_failure_new_without_loop);
    tcase_add_test(tc, test_failure_application_code);
    tcase_add_test(tc, test_failure_fmt_null_uses_strerror);
    tcase_add_test(tc, test_failure_percent_literal);
    tcase_add_test(tc, test_failure_empty_message);
    tcase_add_test(tc, test_failure_long_message);
    suite_add_tcase(s, tc);

    tc = tcase_create("payload");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_failure_payload_destructor_once);
    tcase_add_test(tc, test_failure_payload_null_destructor);
    tcase_add_test(tc, test_failure_payload_heap_value);
    tcase_add_test(tc, test_failure_unref_null);
    suite_add_tcase(s, tc);

    tc = tcase_create("allocation");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_failure_enomem_static);
    tcase_add_test(tc, test_failure_enomem_runs_payload_destructor);
    tcase_add_test(tc, test_failure_enomem_errf);
    tcase_add_test(tc, test_failure_allocation_recovers);
    tcase_add_test(tc, test_failure_outlives_loop);
    suite_add_tcase(s, tc);

    tc = tcase_create("threads");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_failure_ref_unref_threads);
    tcase_add_test(tc, test_failure_last_unref_on_other_thread);
    tcase_add_test(tc, test_failure_made_on_threads_released_on_main);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_failure_error_table);
    tcase_add_test(tc, test_failure_error_unknown);
    tcase_add_test(tc, test_failure_error_positive_errno);
    suite_add_tcase(s, tc);

    tc = tcase_create("result");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_failure_errf);
    tcase_add_test(tc, test_failure_err_steals);
    tcase_add_test(tc, test_failure_result_clear_value);
    tcase_add_test(tc, test_failure_result_clear_failure_shared);
    tcase_add_test(tc, test_failure_result_clear_any_thread);
    suite_add_tcase(s, tc);

    tc = tcase_create("first_error");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_failure_first_error_cause);
    tcase_add_test(tc, test_failure_first_error_deep_causes);
    suite_add_tcase(s, tc);

    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(failure_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
