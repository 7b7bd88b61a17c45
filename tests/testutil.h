/* SPDX-License-Identifier: MIT */
/* Small helpers shared by the Check programs in tests/ (header only). */
#ifndef DF_TESTUTIL_H
#define DF_TESTUTIL_H

#include <check.h>
#include <stdatomic.h>
#include <stdlib.h>

#include <deferred.h>

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
