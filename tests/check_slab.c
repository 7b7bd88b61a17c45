/* SPDX-License-Identifier: MIT */
/* The loop's slabs and big arrays (src/alloc.c): chunk growth, huge pages, fallbacks. */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "deferred.h"
#include "loop-internal.h"
#include "testutil.h"

/* Blocks in a burst: tens of megabytes in the job slab, so that the slab
 * goes well past its growing chunks into 2 MiB ones (fewer under
 * valgrind, still past them). */
static size_t burst_blocks(const df__slab *s)
{
    size_t bytes = RUNNING_ON_VALGRIND ? (size_t)12 << 20 : (size_t)40 << 20;
    return bytes / s->size;
}

/* Pages hooks that count, around the real ones or failing. */
static long maps_live;  /* mapped and not yet unmapped */
static long maps_calls; /* map() calls, failed ones included */
static bool maps_fail;

static void *count_map(size_t bytes)
{
    maps_calls++;
    if (maps_fail)
        return NULL;
    void *p = df__default_pages.map(bytes);
    if (p != NULL)
        maps_live++;
    return p;
}

static void count_unmap(void *p, size_t bytes)
{
    ck_assert_int_gt(maps_live, 0);
    maps_live--;
    df__default_pages.unmap(p, bytes);
}

static const df__pages counting_pages = {count_map, count_unmap};

static void hook_pages(df_loop *loop, bool fail)
{
    maps_live = maps_calls = 0;
    maps_fail = fail;
    for (int i = 0; i < DF__SLABS; i++)
        df__loop_slab(loop, i)->pages = &counting_pages;
}

/* An assertion for hot loops: Check's own write a record per call in fork
 * mode, millions here. */
#define QUICK(cond)                                                            \
    do {                                                                       \
        if (!(cond))                                                           \
            ck_abort_msg("%s:%d: %s", __FILE__, __LINE__, #cond);              \
    } while (0)

static const df__chunk *chunk_of(const void *block)
{
    return *(df__chunk *const *)block;
}

/* The chunks a slab may hold for `blocks` live blocks: the growing ones
 * (their sizes double from the first chunk's up to 2 MiB) and one per
 * 2 MiB beyond them. */
static size_t chunks_bound(const df__slab *s, size_t blocks)
{
    size_t first = DF__SLAB_BLOCKS * s->size + sizeof(df__chunk) + 16;
    size_t growing = 0;
    for (size_t b = first; b < DF__SLAB_CHUNK_MAX; b *= 2)
        growing++;
    size_t per_max = (DF__SLAB_CHUNK_MAX - sizeof(df__chunk) - 16) / s->size;
    return growing + blocks / per_max + 1;
}

/* Runs a burst on slab `which`: takes `n` blocks, writes all of each,
 * gives every other one back, takes those again, then gives all back in
 * reverse order, checking the chunk count on the way.  Returns how many
 * blocks came from mapped chunks. */
static size_t burst(df_loop *loop, int which, size_t n)
{
    df__slab *s = df__loop_slab(loop, which);
    void **b = malloc(n * sizeof *b);
    ck_assert_ptr_nonnull(b);
    size_t mapped = 0;
    for (size_t i = 0; i < n; i++) {
        b[i] = df__slab_get(loop, s);
        QUICK(b[i] != NULL);
        QUICK(df__chunk_loop(chunk_of(b[i])) == loop);
        QUICK((uintptr_t)b[i] % 8 == 0);
        /* Every byte past the chunk word is the block user's. */
        memset((char *)b[i] + sizeof(void *), 0xa5, s->size - sizeof(void *));
        if (chunk_of(b[i])->mapped) {
            mapped++;
            QUICK((uintptr_t)chunk_of(b[i]) % DF__SLAB_CHUNK_MAX == 0);
        }
    }
    ck_assert_uint_le(s->chunks, chunks_bound(s, n));
    for (size_t i = 0; i < n; i += 2)
        df__slab_put(loop, s, b[i]);
    for (size_t i = 0; i < n; i += 2) {
        b[i] = df__slab_get(loop, s);
        QUICK(b[i] != NULL);
    }
    ck_assert_uint_le(s->chunks, chunks_bound(s, n));
    for (size_t i = n; i-- > 0;)
        df__slab_put(loop, s, b[i]);
    /* Shrunk back: one empty chunk kept at most. */
    ck_assert_uint_le(s->chunks, 1);
    ck_assert_uint_eq(s->empty, s->chunks);
    free(b);
    return mapped;
}

/* With the default allocator, a slab that grows past 2 MiB takes its big
 * chunks from the pages hooks (2 MiB aligned), shrinks back to at most
 * one chunk, grows again, and df_loop_free unmaps everything. */
START_TEST(test_slab_grows_into_mapped_chunks)
{
    df_loop *loop = tu_loop();
    hook_pages(loop, false);
    for (int which = 0; which < DF__SLABS; which++) {
        df__slab *s = df__loop_slab(loop, which);
        for (int round = 0; round < 2; round++) {
            size_t n = burst_blocks(s);
            size_t mapped = burst(loop, which, n);
            ck_assert_uint_gt(mapped, n / 2);
            ck_assert_int_le(maps_live, DF__SLABS);
        }
    }
    ck_assert_int_gt(maps_calls, 0);
    tu_loop_free(loop);
    ck_assert_int_eq(maps_live, 0);
}
END_TEST

/* When mapping fails, big chunks come from malloc instead: the same
 * bursts work and nothing leaks (the sanitizer and valgrind builds check
 * the malloc'd chunks, the counter the mapped ones). */
START_TEST(test_slab_map_fails)
{
    df_loop *loop = tu_loop();
    hook_pages(loop, true);
    for (int which = 0; which < DF__SLABS; which++) {
        df__slab *s = df__loop_slab(loop, which);
        ck_assert_uint_eq(burst(loop, which, burst_blocks(s)), 0);
    }
    ck_assert_int_gt(maps_calls, 0);
    ck_assert_int_eq(maps_live, 0);
    tu_loop_free(loop);
}
END_TEST

/* A user's allocator gets every chunk, big ones too; the pages hooks are
 * never asked, and every chunk is freed through the allocator. */
START_TEST(test_slab_user_allocator_untouched)
{
    tu_counting_alloc ca = {0};
    df_loop *loop = NULL;
    TU_OK(tu_ca_loop_new(&ca, &loop));
    hook_pages(loop, false);
    long before = atomic_load(&ca.calls);
    df__slab *s = df__loop_slab(loop, DF__SLAB_DEFERRED_JOB);
    size_t n = burst_blocks(s);
    ck_assert_uint_eq(burst(loop, DF__SLAB_DEFERRED_JOB, n), 0);
    ck_assert_int_eq(maps_calls, 0);
    /* Geometric chunks: far fewer calls than n / DF__SLAB_BLOCKS. */
    long calls = atomic_load(&ca.calls) - before;
    ck_assert_int_le(calls, 2 * (long)chunks_bound(s, n));
    ck_assert_int_lt(calls, (long)(n / DF__SLAB_BLOCKS / 4));
    TU_OK(df_loop_free(loop));
    ck_assert_int_eq(atomic_load(&ca.live), 0);
}
END_TEST

/* An allocator that refuses blocks bigger than `limit`. */
static size_t small_limit;
static long small_live;

static void *small_malloc(size_t size, void *ctx)
{
    (void)ctx;
    if (size > small_limit)
        return NULL;
    void *p = malloc(size);
    if (p != NULL)
        small_live++;
    return p;
}

static void *small_realloc(void *ptr, size_t size, void *ctx)
{
    if (ptr == NULL)
        return small_malloc(size, ctx);
    return size > small_limit ? NULL : realloc(ptr, size);
}

static void small_free(void *ptr, void *ctx)
{
    (void)ctx;
    if (ptr != NULL)
        small_live--;
    free(ptr);
}

/* A chunk refused at its growing size is retried at the first chunk's
 * size: growth never fails where the old fixed-size chunks succeeded. */
START_TEST(test_slab_retries_small_chunk)
{
    df_allocator a = {small_malloc, small_realloc, small_free, NULL};
    df_loop_options opts = DF_LOOP_OPTIONS_INIT;
    opts.allocator = &a;
    small_limit = 64 * 1024;
    small_live = 0;
    df_loop *loop = NULL;
    TU_OK(df_loop_new(&opts, &loop));
    df__slab *s = df__loop_slab(loop, DF__SLAB_DEFERRED_JOB);
    ck_assert_uint_le(DF__SLAB_BLOCKS * s->size + 256, small_limit);
    size_t n = 100 * DF__SLAB_BLOCKS;
    void **b = malloc(n * sizeof *b);
    ck_assert_ptr_nonnull(b);
    for (size_t i = 0; i < n; i++) {
        b[i] = df__slab_get(loop, s);
        QUICK(b[i] != NULL);
        QUICK(chunk_of(b[i])->bytes <= small_limit);
    }
    for (size_t i = 0; i < n; i++)
        df__slab_put(loop, s, b[i]);
    free(b);
    /* And deferreds work on such a loop. */
    df_deferred *d;
    TU_OK(df_deferred_new(loop, &d));
    TU_OK(df_deferred_callback(d, NULL, NULL));
    df_deferred_unref(d);
    TU_OK(df_loop_free(loop));
    ck_assert_int_eq(small_live, 0);
}
END_TEST

/* Whether the kernel marked the mapping holding `p` for huge pages (the
 * "hg" flag of /proc/self/smaps); -1 if that cannot be told (no THP in
 * this kernel, THP disabled for this process, no smaps). */
static int advised_huge(const void *p)
{
    if (access("/sys/kernel/mm/transparent_hugepage/enabled", R_OK) != 0 ||
        prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) > 0)
        return -1;
    FILE *f = fopen("/proc/self/smaps", "r");
    if (f == NULL)
        return -1;
    char line[512];
    bool in = false;
    int found = -1;
    while (fgets(line, sizeof line, f) != NULL) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) { /* a mapping */
            in = (uintptr_t)p >= lo && (uintptr_t)p < hi;
        } else if (in && strncmp(line, "VmFlags:", 8) == 0) {
            found = strstr(line, " hg") != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

/* A mapped chunk and a big array of the default allocator are advised
 * for huge pages; the array is 2 MiB aligned and df__free takes it. */
START_TEST(test_slab_huge_advice)
{
    df_loop *loop = tu_loop();
    df__slab *s = df__loop_slab(loop, DF__SLAB_DEFERRED);
    size_t n = 4 * DF__SLAB_CHUNK_MAX / s->size;
    void **b = malloc(n * sizeof *b);
    ck_assert_ptr_nonnull(b);
    const df__chunk *big = NULL;
    for (size_t i = 0; i < n; i++) {
        b[i] = df__slab_get(loop, s);
        QUICK(b[i] != NULL);
        if (chunk_of(b[i])->mapped)
            big = chunk_of(b[i]);
    }
#ifdef DF__ASAN
    /* No mapped chunk under ASan (alloc.c, MAP_UNDER_ASAN): LeakSanitizer
     * would not see the pointers they hold. */
    ck_assert_ptr_null(big);
    int hg;
#else
    ck_assert_ptr_nonnull(big);
    int hg = advised_huge(big);
    if (hg >= 0)
        ck_assert_int_eq(hg, 1);
#endif
    for (size_t i = 0; i < n; i++)
        df__slab_put(loop, s, b[i]);
    free(b);

    size_t size = 3 * DF__SLAB_CHUNK_MAX + 4096;
    char *p = df__malloc_bulk(loop, size);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq((uintptr_t)p % DF__SLAB_CHUNK_MAX, 0);
    memset(p, 1, size);
    hg = advised_huge(p);
    if (hg >= 0 && !RUNNING_ON_VALGRIND)
        ck_assert_int_eq(hg, 1);
    df__free(loop, p);
    /* Small sizes are plain blocks. */
    p = df__malloc_bulk(loop, 100);
    ck_assert_ptr_nonnull(p);
    df__free(loop, p);
    tu_loop_free(loop);
}
END_TEST

/* With a user's allocator, a big array is one call to its malloc. */
START_TEST(test_slab_bulk_user_allocator)
{
    tu_counting_alloc ca = {0};
    df_loop *loop = NULL;
    TU_OK(tu_ca_loop_new(&ca, &loop));
    long before = atomic_load(&ca.calls);
    void *p = df__malloc_bulk(loop, 3 * DF__SLAB_CHUNK_MAX);
    ck_assert_ptr_nonnull(p);
    ck_assert_int_eq(atomic_load(&ca.calls) - before, 1);
    df__free(loop, p);
    atomic_store(&ca.fail, 1);
    ck_assert_ptr_null(df__malloc_bulk(loop, 3 * DF__SLAB_CHUNK_MAX));
    atomic_store(&ca.fail, 0);
    TU_OK(df_loop_free(loop));
    ck_assert_int_eq(atomic_load(&ca.live), 0);
}
END_TEST

static Suite *slab_suite(void)
{
    Suite *s = suite_create("slab");
    TCase *tc = tcase_create("chunks");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_slab_grows_into_mapped_chunks);
    tcase_add_test(tc, test_slab_map_fails);
    tcase_add_test(tc, test_slab_user_allocator_untouched);
    tcase_add_test(tc, test_slab_retries_small_chunk);
    tcase_add_test(tc, test_slab_huge_advice);
    tcase_add_test(tc, test_slab_bulk_user_allocator);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(slab_suite)
