/* SPDX-License-Identifier: MIT */
/* Small helpers shared by the Check programs in tests/ (header only). */
#ifndef DF_TESTUTIL_H
#define DF_TESTUTIL_H

#include <check.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

#include <deferred.h>

/* RUNNING_ON_VALGRIND: non-zero under valgrind, where stress sizes shrink
 * (0 when valgrind's headers are missing). */
#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif
#endif
#ifndef RUNNING_ON_VALGRIND
#define RUNNING_ON_VALGRIND 0
#endif

/* Asserts that a libdeferred call returned 0; names the code if not. */
#define TU_OK(expr)                                                            \
    do {                                                                       \
        int tu_rc_ = (expr);                                                   \
        ck_assert_msg(tu_rc_ == 0, "%s returned %d (%s)", #expr, tu_rc_,       \
                      df_err_name(tu_rc_));                                    \
    } while (0)

/* Asserts that a libdeferred call returned `code` (e.g. DF_EINVAL). */
#define TU_ERR(expr, code)                                                     \
    do {                                                                       \
        int tu_rc_ = (expr);                                                   \
        int tu_want_ = (code);                                                 \
        ck_assert_msg(tu_rc_ == tu_want_, "%s returned %d (%s), not %d (%s)",  \
                      #expr, tu_rc_, df_err_name(tu_rc_), tu_want_,            \
                      df_err_name(tu_want_));                                  \
    } while (0)

/* A thread-safe allocator for df_loop_options.allocator that counts live
 * blocks and allocation calls, and fails every allocation while `fail` is
 * non-zero.  Pass a tu_counting_alloc as the allocator's ctx. */
typedef struct tu_counting_alloc {
    atomic_long live;  /* blocks handed out and not yet freed */
    atomic_long calls; /* malloc and realloc(NULL, n) calls */
    atomic_int fail;   /* non-zero: every allocation returns NULL */
} tu_counting_alloc;

static inline void *tu_ca_malloc(size_t size, void *ctx)
{
    tu_counting_alloc *ca = ctx;
    atomic_fetch_add(&ca->calls, 1);
    if (atomic_load(&ca->fail))
        return NULL;
    void *p = malloc(size);
    if (p != NULL)
        atomic_fetch_add(&ca->live, 1);
    return p;
}

static inline void *tu_ca_realloc(void *ptr, size_t size, void *ctx)
{
    tu_counting_alloc *ca = ctx;
    if (ptr == NULL)
        return tu_ca_malloc(size, ctx);
    if (atomic_load(&ca->fail))
        return NULL;
    return realloc(ptr, size);
}

static inline void tu_ca_free(void *ptr, void *ctx)
{
    tu_counting_alloc *ca = ctx;
    if (ptr != NULL)
        atomic_fetch_sub(&ca->live, 1);
    free(ptr);
}

/* df_loop_new with `ca` counting the loop's allocations (the loop copies
 * the allocator; `ca` must outlive the loop). */
static inline int tu_ca_loop_new(tu_counting_alloc *ca, df_loop **out)
{
    df_allocator a = {tu_ca_malloc, tu_ca_realloc, tu_ca_free, ca};
    df_loop_options opts = DF_LOOP_OPTIONS_INIT;
    opts.allocator = &a;
    return df_loop_new(&opts, out);
}

/*
 * A thread-safe allocator for failure-injection sweeps: "fail the n-th
 * allocation".  Numbered allocations (malloc, and realloc of any pointer)
 * count 1, 2, 3, ...; the one numbered `fail_at` returns NULL, and with
 * `sticky` every numbered one after it too.  `failed` counts refusals, so
 * a run that ends with failed == 0 never reached allocation fail_at.
 * `live` counts blocks handed out and not yet freed, whoever freed them.
 *
 * With `owner_only`, only allocations made on the thread that called
 * tu_fa_init() are numbered (and may fail): pool threads allocate while
 * the loop thread does, so their allocations have no stable number.
 * Allocations from other threads are counted in `others` and succeed,
 * unless `fail_others` is set, which refuses all of them.
 *
 * Pass the tu_failing_alloc as the ctx of tu_fa_allocator()'s result.
 */
typedef struct tu_failing_alloc {
    atomic_long live;        /* blocks handed out and not yet freed */
    atomic_long count;       /* numbered allocations since tu_fa_arm() */
    atomic_long others;      /* unnumbered ones (other threads) */
    atomic_long fail_at;     /* number of the one to refuse; 0: none */
    atomic_long failed;      /* allocations refused since tu_fa_arm() */
    atomic_bool sticky;      /* refuse every numbered one after fail_at */
    atomic_bool fail_others; /* refuse every unnumbered one */
    bool owner_only;         /* number only the owner thread's */
    pthread_t owner;         /* set by tu_fa_init, read-only afterwards */
} tu_failing_alloc;

/* Resets everything, `live` included; call before any thread uses it. */
static inline void tu_fa_init(tu_failing_alloc *fa, bool owner_only)
{
    atomic_store(&fa->live, 0);
    atomic_store(&fa->count, 0);
    atomic_store(&fa->others, 0);
    atomic_store(&fa->fail_at, 0);
    atomic_store(&fa->failed, 0);
    atomic_store(&fa->sticky, false);
    atomic_store(&fa->fail_others, false);
    fa->owner_only = owner_only;
    fa->owner = pthread_self();
}

/* Restarts the numbering and refuses allocation `n` (0: none), and every
 * one after it when `sticky`.  Does not touch `live`. */
static inline void tu_fa_arm(tu_failing_alloc *fa, long n, bool sticky)
{
    atomic_store(&fa->count, 0);
    atomic_store(&fa->others, 0);
    atomic_store(&fa->failed, 0);
    atomic_store(&fa->sticky, sticky);
    atomic_store(&fa->fail_at, n);
}

/* Stops refusing; the counters keep their values. */
static inline void tu_fa_disarm(tu_failing_alloc *fa)
{
    atomic_store(&fa->fail_at, 0);
    atomic_store(&fa->sticky, false);
    atomic_store(&fa->fail_others, false);
}

/* Lets `n` more numbered allocations succeed and refuses every one after
 * them (n >= 0), or stops refusing (n < 0).  The same as tu_fa_arm(fa,
 * n + 1, true) and tu_fa_disarm(fa). */
static inline void tu_fa_fail_after(tu_failing_alloc *fa, long n)
{
    if (n < 0)
        tu_fa_disarm(fa);
    else
        tu_fa_arm(fa, n + 1, true);
}

/* Numbers one allocation (if it is numbered) and says whether to refuse
 * it. */
static inline bool tu_fa_refuse(tu_failing_alloc *fa)
{
    if (fa->owner_only && !pthread_equal(fa->owner, pthread_self())) {
        atomic_fetch_add(&fa->others, 1);
        return atomic_load(&fa->fail_others);
    }
    long n = atomic_fetch_add(&fa->count, 1) + 1;
    long at = atomic_load(&fa->fail_at);
    return at > 0 && (n == at || (n > at && atomic_load(&fa->sticky)));
}

static inline void *tu_fa_malloc(size_t size, void *ctx)
{
    tu_failing_alloc *fa = ctx;
    if (tu_fa_refuse(fa)) {
        atomic_fetch_add(&fa->failed, 1);
        return NULL;
    }
    void *p = malloc(size);
    if (p != NULL)
        atomic_fetch_add(&fa->live, 1);
    return p;
}

static inline void *tu_fa_realloc(void *ptr, size_t size, void *ctx)
{
    tu_failing_alloc *fa = ctx;
    if (ptr == NULL)
        return tu_fa_malloc(size, ctx);
    if (tu_fa_refuse(fa)) {
        atomic_fetch_add(&fa->failed, 1);
        return NULL;
    }
    return realloc(ptr, size);
}

static inline void tu_fa_free(void *ptr, void *ctx)
{
    tu_failing_alloc *fa = ctx;
    if (ptr != NULL)
        atomic_fetch_sub(&fa->live, 1);
    free(ptr);
}

/* The df_allocator for `fa`. */
static inline df_allocator tu_fa_allocator(tu_failing_alloc *fa)
{
    df_allocator a = {tu_fa_malloc, tu_fa_realloc, tu_fa_free, fa};
    return a;
}

/* A gate between threads, with no sleeping and no spinning: pool work
 * passes it (and is counted as entered) once the test opens it; the test
 * can wait until n workers have entered.  Static gates: TU_GATE_INIT. */
typedef struct tu_gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool open;
    unsigned entered; /* tu_gate_pass() calls so far */
} tu_gate;
#define TU_GATE_INIT                                                           \
    {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, 0}

static inline void tu_gate_init(tu_gate *g)
{
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->open = false;
    g->entered = 0;
}

static inline void tu_gate_destroy(tu_gate *g)
{
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
}

/* Closes the gate again and forgets who entered. */
static inline void tu_gate_reset(tu_gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->open = false;
    g->entered = 0;
    pthread_mutex_unlock(&g->mu);
}

static inline void tu_gate_open(tu_gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->open = true;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* Waits until the gate is open. */
static inline void tu_gate_wait(tu_gate *g)
{
    pthread_mutex_lock(&g->mu);
    while (!g->open)
        pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

/* Counts the caller as entered, then waits until the gate is open. */
static inline void tu_gate_pass(tu_gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->entered++;
    pthread_cond_broadcast(&g->cv);
    while (!g->open)
        pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

/* Waits until n callers have entered. */
static inline void tu_gate_wait_entered(tu_gate *g, unsigned n)
{
    pthread_mutex_lock(&g->mu);
    while (g->entered < n)
        pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

/* A new loop with default options, owned by the calling thread. */
static inline df_loop *tu_loop(void)
{
    df_loop *loop = NULL;

    TU_OK(df_loop_new(NULL, &loop));
    ck_assert_ptr_nonnull(loop);
    return loop;
}

/* Frees a loop made by tu_loop(), asserting that nothing kept it busy. */
static inline void tu_loop_free(df_loop *loop)
{
    TU_OK(df_loop_free(loop));
}

/*
 * Defines main() for a Check program: runs the Suite that make_suite()
 * returns and exits 0 only if every test passed.  The output mode comes
 * from CK_VERBOSITY (default "normal", whose summary line .ci/run counts);
 * the harness sets CK_FORK=no unless CK_FORK is already set.  Usage:
 *
 *     static Suite *loop_suite(void) { ... }
 *     TU_MAIN(loop_suite)
 */
#define TU_MAIN(make_suite)                                                    \
    int main(void)                                                             \
    {                                                                          \
        SRunner *tu_sr_ = srunner_create(make_suite());                        \
        int tu_failed_;                                                        \
                                                                               \
        srunner_run_all(tu_sr_, CK_ENV);                                       \
        tu_failed_ = srunner_ntests_failed(tu_sr_);                            \
        srunner_free(tu_sr_);                                                  \
        return tu_failed_ == 0 ? EXIT_SUCCESS : EXIT_FAILURE;                  \
    }

#endif /* DF_TESTUTIL_H */
