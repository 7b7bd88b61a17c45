/* SPDX-License-Identifier: MIT */
/* libdeferred: semaphore run-in-pool per item, then a DeferredList or a map. */
#include "bench-common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <deferred.h>

/*
 * The path a user would write: one loop, a pool of THREADS, a semaphore of
 * LIMIT tokens, df_sem_run_in_pool() for each of the N items, then
 *
 *   default (impl=libdeferred): a DeferredList over all N deferreds, which
 *     takes over their references (DF_LIST_TAKE_REFS); its callback (the
 *     last callback of the run) reads the N values out of the list result
 *     (df_list_result_get); the loop runs until the list has fired.
 *
 *   -DBENCH_DF_PER_ITEM (impl=libdeferred-cb): a callback on each item's
 *     deferred stores its value, and the deferred is released at once, so
 *     memory held per finished item is only what the library keeps; the
 *     loop runs until nothing is pending.
 *
 *   -DBENCH_DF_MAP (impl=libdeferred-map): no semaphore and no deferred
 *     per item: df_map_start() pulls item indices from an iterator while
 *     fewer than LIMIT are in flight, runs each on the pool and hands each
 *     result to a callback as it completes; the loop runs until the map's
 *     done deferred fires.  Memory is O(LIMIT), not O(N).  The environment
 *     variable BENCH_MAP_READAHEAD, if set, is the map's readahead_max
 *     (for a sweep of the cap; unset: the library's default).
 *
 * The value travels as the deferred's success value: a uint64_t cast to a
 * pointer with no destructor, so pointers must be 64 bits wide.  The item
 * index travels as the work argument the same way.
 */

_Static_assert(sizeof(void *) >= sizeof(uint64_t),
               "bench-deferred passes 64-bit values as pointers");

#if defined(BENCH_DF_PER_ITEM) && defined(BENCH_DF_MAP)
#error "choose one of BENCH_DF_PER_ITEM and BENCH_DF_MAP"
#elif defined(BENCH_DF_PER_ITEM)
#define IMPL "libdeferred-cb"
#elif defined(BENCH_DF_MAP)
#define IMPL "libdeferred-map"
#else
#define IMPL "libdeferred"
#endif

struct bench {
    struct bench_args args;
    struct bench_results results;
    struct bench_inflight inflight;
    uint64_t failures; /* items that failed, or a list that failed */
    uint64_t pulled;   /* map: inputs handed out so far */
};

/* The work function only gets the item index as its argument, so the
 * shared state is reached through this pointer, set once before the pool
 * starts and read-only afterwards. */
static struct bench *the_bench;

static df_result work(df_work *w, void *arg)
{
    (void)w;
    struct bench *b = the_bench;
    uint64_t i = (uint64_t)(uintptr_t)arg;
    bench_inflight_enter(&b->inflight);
    uint64_t v = bench_work(i, b->args.work_iters);
    bench_inflight_leave(&b->inflight);
    return df_ok((void *)(uintptr_t)v, NULL);
}

#ifdef BENCH_DF_MAP
/* work as a map's work (the item is its argument). */
static df_result map_work(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    return work(w, item);
}
#endif

static void report_failure(df_failure *f, const char *what)
{
    fprintf(stderr, "bench-deferred: %s: %s: %s\n", what,
            df_err_name(df_failure_code(f)), df_failure_message(f));
}

#ifdef BENCH_DF_PER_ITEM

static df_result store(df_result r, void *arg)
{
    bench_record(&the_bench->results, (uint64_t)(uintptr_t)arg,
                 (uint64_t)(uintptr_t)r.value);
    return df_ok(NULL, NULL); /* the value has no destructor */
}

static df_result store_failure(df_result r, void *arg)
{
    (void)arg;
    if (the_bench->failures++ == 0)
        report_failure(r.failure, "item failed");
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

#elif defined(BENCH_DF_MAP)

/* The map's input: the item indices 0 .. N-1. */
static int next_index(void *arg, void **item, df_free_fn *item_free)
{
    struct bench *b = arg;
    if (b->pulled == b->args.n)
        return 0;
    *item = (void *)(uintptr_t)b->pulled++;
    *item_free = NULL;
    return 1;
}

/* Marks the map's failure as handled (it was reported already). */
static df_result collect_map_failure(df_result r, void *arg)
{
    (void)arg;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

static void on_result(uint64_t index, void *item, df_result r, void *arg)
{
    struct bench *b = arg;
    (void)item;
    if (df_result_ok(&r)) {
        bench_record(&b->results, index, (uint64_t)(uintptr_t)r.value);
    } else if (b->failures++ == 0 && r.failure != NULL) {
        report_failure(r.failure, "item failed");
    }
    df_result_clear(&r);
}

#else

/* The list's callback: the last callback of the run. */
static df_result collect(df_result r, void *arg)
{
    struct bench *b = arg;
    const df_list_result *lr = r.value;
    size_t n = df_list_result_count(lr);
    for (size_t i = 0; i < n; i++) {
        void *v;
        df_failure *f;
        if (df_list_result_get(lr, i, &v, &f)) {
            bench_record(&b->results, i, (uint64_t)(uintptr_t)v);
        } else if (b->failures++ == 0 && f != NULL) {
            report_failure(f, "item failed");
        }
    }
    return r; /* the list deferred keeps (and later frees) the result */
}

static df_result collect_failure(df_result r, void *arg)
{
    struct bench *b = arg;
    b->failures++;
    report_failure(r.failure, "list failed");
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

#endif

static bool api_ok(int rc, const char *what)
{
    if (rc == 0)
        return true;
    fprintf(stderr, "bench-deferred: %s: %s (%s)\n", what, df_strerror(rc),
            df_err_name(rc));
    return false;
}

int main(int argc, char **argv)
{
    struct bench b;
    memset(&b, 0, sizeof b);
    bench_parse_args(argc, argv, IMPL, &b.args);
    bench_results_init(&b.results, b.args.n);
    bench_inflight_init(&b.inflight);
    the_bench = &b;

    df_loop *loop = NULL;
    df_pool *pool = NULL;
    df_sem *sem = NULL;
    df_pool_options popts = DF_POOL_OPTIONS_INIT;
    popts.threads = b.args.threads;
    if (!api_ok(df_loop_new(NULL, &loop), "df_loop_new") ||
        !api_ok(df_pool_new(loop, &popts, &pool), "df_pool_new"))
        return 3;
#ifndef BENCH_DF_MAP
    if (!api_ok(df_sem_new(loop, b.args.limit, &sem), "df_sem_new"))
        return 3;
#endif

    bool failed = false;
    uint64_t t0, t1;
#if defined(BENCH_DF_MAP)
    df_map_options mopts;
    memset(&mopts, 0, sizeof mopts);
    mopts.limit = b.args.limit;
    mopts.next = next_index;
    mopts.next_arg = &b;
    mopts.pool = pool;
    mopts.work = map_work;
    mopts.on_result = on_result;
    mopts.arg = &b;
    const char *ahead = getenv("BENCH_MAP_READAHEAD");
    if (ahead != NULL)
        mopts.readahead_max = (size_t)strtoull(ahead, NULL, 10);
    df_map *map = NULL;
    df_deferred *done = NULL;

    t0 = bench_now_ns();
    if (api_ok(df_map_start(loop, &mopts, &map, &done), "df_map_start")) {
        int rc = df_loop_run_until(loop, done);
        if (!api_ok(rc, "df_loop_run_until"))
            failed = true;
    } else {
        failed = true;
    }
    t1 = bench_now_ns();

    if (done != NULL) {
        df_failure *f = NULL;
        if (df_deferred_peek(done, NULL, &f) != 0 || f != NULL) {
            if (f != NULL)
                report_failure(f, "map failed");
            failed = true;
            if (f != NULL)
                df_deferred_add_errback(done, collect_map_failure, NULL);
        }
        df_deferred_unref(done);
    }
    if (map != NULL && !api_ok(df_map_free(map), "df_map_free"))
        failed = true;
#elif defined(BENCH_DF_PER_ITEM)
    t0 = bench_now_ns();
    for (uint64_t i = 0; i < b.args.n; i++) {
        df_deferred *d;
        if (!api_ok(df_sem_run_in_pool(sem, pool, work, (void *)(uintptr_t)i,
                                       &d),
                    "df_sem_run_in_pool")) {
            failed = true;
            break;
        }
        if (!api_ok(df_deferred_add_callbacks(d, store, store_failure,
                                              (void *)(uintptr_t)i),
                    "df_deferred_add_callbacks"))
            failed = true;
        df_deferred_unref(d);
        if (failed)
            break;
    }
    if (!api_ok(df_loop_run(loop), "df_loop_run"))
        failed = true;
    t1 = bench_now_ns();
#else
    if (b.args.n > SIZE_MAX / sizeof(df_deferred *))
        return 3;
    df_deferred **members = malloc((size_t)b.args.n * sizeof *members);
    if (members == NULL) {
        perror("bench-deferred: malloc");
        return 3;
    }
    df_deferred *list = NULL;
    uint64_t made = 0;

    t0 = bench_now_ns();
    for (; made < b.args.n; made++) {
        if (!api_ok(df_sem_run_in_pool(sem, pool, work,
                                       (void *)(uintptr_t)made,
                                       &members[made]),
                    "df_sem_run_in_pool")) {
            failed = true;
            break;
        }
    }
    /* The list takes over our reference to every member. */
    if (!failed && api_ok(df_list_new(loop, members, (size_t)made,
                                      DF_LIST_TAKE_REFS, &list),
                          "df_list_new")) {
        made = 0;
        if (!api_ok(df_deferred_add_callbacks(list, collect, collect_failure,
                                              &b),
                    "df_deferred_add_callbacks") ||
            !api_ok(df_loop_run_until(loop, list), "df_loop_run_until"))
            failed = true;
    } else {
        failed = true;
    }
    t1 = bench_now_ns();

    /* On a failed setup, let what was started finish before tearing
     * down. */
    for (uint64_t i = 0; i < made; i++)
        df_deferred_unref(members[i]);
    if (failed)
        df_loop_run(loop);
    if (list != NULL)
        df_deferred_unref(list);
    free(members);
#endif

    if (b.failures != 0)
        failed = true;
    /* Teardown is outside the timed phase. */
    df_pool_free(pool);
    if ((sem != NULL && !api_ok(df_sem_free(sem), "df_sem_free")) ||
        !api_ok(df_loop_free(loop), "df_loop_free"))
        failed = true;

    bool ok = bench_check(&b.results, &b.args, &b.inflight, 0);
    int status = bench_report(IMPL, &b.args, t1 - t0, ok, failed);
    bench_results_free(&b.results);
    return status;
}
