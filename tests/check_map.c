/* SPDX-License-Identifier: MIT */
/* Check tests for the bounded streaming map (df_map_*). */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <time.h>

#include "deferred.h"
#include "testutil.h"

#define ENDLESS UINT64_MAX
#define MAX_HELD 1024
#define MAX_ORDER 4096

/* ------------------------------------------------------------ scaling */

/* Under valgrind or with DF_TEST_QUICK set, the long streams shrink;
 * DF_TEST_LONG=1 makes the constant-memory test stream 10^7 items. */
static bool quick(void)
{
    const char *q = getenv("DF_TEST_QUICK");
    return RUNNING_ON_VALGRIND || (q != NULL && *q != '\0' && *q != '0');
}

static bool long_run(void)
{
    const char *l = getenv("DF_TEST_LONG");
    return l != NULL && *l != '\0' && *l != '0';
}

/* ------------------------------------------------- counting allocator */

/* Counts allocation calls and the bytes outstanding (with their peak),
 * keeping each block's size in a header in front of it. */
typedef struct counter {
    atomic_ulong allocs; /* malloc and realloc calls */
    atomic_long bytes;   /* outstanding now */
    atomic_long peak;    /* most outstanding at once */
} counter;

#define HDR sizeof(max_align_t)

static void count_bytes(counter *c, long delta)
{
    long now = atomic_fetch_add(&c->bytes, delta) + delta;
    long peak = atomic_load(&c->peak);
    while (now > peak && !atomic_compare_exchange_weak(&c->peak, &peak, now))
        ;
}

static void *cnt_malloc(size_t n, void *ctx)
{
    char *p = malloc(n + HDR);
    if (p == NULL)
        return NULL;
    memcpy(p, &n, sizeof n);
    atomic_fetch_add(&((counter *)ctx)->allocs, 1);
    count_bytes(ctx, (long)n);
    return p + HDR;
}

static void *cnt_realloc(void *ptr, size_t n, void *ctx)
{
    if (ptr == NULL)
        return cnt_malloc(n, ctx);
    size_t old;
    char *p = (char *)ptr - HDR;
    memcpy(&old, p, sizeof old);
    p = realloc(p, n + HDR);
    if (p == NULL)
        return NULL;
    memcpy(p, &n, sizeof n);
    atomic_fetch_add(&((counter *)ctx)->allocs, 1);
    count_bytes(ctx, (long)n - (long)old);
    return p + HDR;
}

static void cnt_free(void *ptr, void *ctx)
{
    if (ptr == NULL)
        return;
    size_t n;
    char *p = (char *)ptr - HDR;
    memcpy(&n, p, sizeof n);
    count_bytes(ctx, -(long)n);
    free(p);
}

/* ------------------------------------------------------ the test rig */

/*
 * One rig per test: the input (a counter, possibly endless, that can fail
 * or cancel the map at a given position), what each item does, and what
 * the map delivered.  Callbacks on the loop thread check the map's bounds
 * every time they run.  Items are heap objects whose destructor counts
 * them, so "every item freed exactly once" is checked too.
 */
typedef struct rig rig;

typedef struct titem {
    uint64_t v;
    rig *r;
} titem;

struct rig {
    df_loop *loop;
    df_map *map;
    df_deferred *done;
    df_map_options o;

    /* Input. */
    uint64_t n; /* items, or ENDLESS */
    uint64_t next_v;
    uint64_t fail_next_at; /* next() fails here (ENDLESS: never) */
    int fail_next_code;
    uint64_t cancel_in_next; /* next() cancels the map here, then
                                returns the item anyway */

    /* Items. */
    uint64_t fail_mod; /* item v fails when v % fail_mod == fail_rem */
    uint64_t fail_rem;
    uint64_t hold_mod; /* call: v % hold_mod == 0 returns a held
                          deferred (0: none held) */
    bool heap_values;  /* results carry a heap value + destructor */

    /* Held deferreds of the call variant, fired by the test. */
    df_deferred *held[MAX_HELD];
    uint64_t held_v[MAX_HELD];
    size_t nheld;

    /* Pool work: concurrency and gating (see work_fn). */
    atomic_int active;
    atomic_int max_active;
    unsigned spin;       /* busy iterations per work */
    uint64_t gate_block; /* > 1: item v % B == 0 waits for the rest
                            of its block to finish */
    atomic_int *block_done;
    size_t nblocks;
    atomic_bool blocker_started; /* item `block_item` has started */
    atomic_bool blocker_go;      /* ... and may return */
    uint64_t block_item;         /* ENDLESS: none */
    pthread_mutex_t mu;
    pthread_cond_t cv;

    /* What was delivered. */
    uint64_t delivered;
    uint64_t failures;
    uint64_t cancels;
    int last_fail_code;
    int other_code;          /* a failure code expected besides these */
    uint64_t pulled_at_fail; /* pulled when the first -EIO arrived */
    uint64_t order[MAX_ORDER];
    uint64_t norder;
    uint64_t expect_next; /* ordered: the index due next */
    uint64_t items_freed;
    uint64_t values_freed;
    uint64_t cancel_after; /* on_result cancels at this many (0: no) */
    uint64_t free_pool_after; /* on_result frees o.pool at this many */
    bool pool_freed;
    df_map_stats at_cancel;

    /* Bounds seen. */
    uint64_t max_running;
    uint64_t max_buffered;
    uint64_t max_outstanding;
};

static void rig_init(rig *r, df_loop *loop)
{
    memset(r, 0, sizeof *r);
    r->loop = loop;
    r->n = 10;
    r->fail_next_at = ENDLESS;
    r->cancel_in_next = ENDLESS;
    r->block_item = ENDLESS;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
}

static void rig_destroy(rig *r)
{
    for (size_t i = 0; i < r->nheld; i++)
        df_deferred_unref(r->held[i]);
    r->nheld = 0;
    free(r->block_done);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
}

static void item_free(void *p)
{
    titem *it = p;
    it->r->items_freed++;
    free(it);
}

static void value_free(void *p)
{
    uint64_t *v = p;
    /* values_freed lives in the rig the value names. */
    rig *r = (rig *)(uintptr_t)v[1];
    r->values_freed++;
    free(v);
}

static uint64_t item_v(void *item)
{
    return ((titem *)item)->v;
}

/* The most items a map with a pool pulls ahead of its tokens. */
static uint64_t ahead_cap(const df_map_options *o)
{
    if (o->pool == NULL || (o->flags & DF_MAP_NO_READAHEAD))
        return 0;
    if (o->readahead_max != 0)
        return o->readahead_max;
    return o->limit > 8192 ? o->limit : 8192;
}

/* Checks the map's bounds from inside one of its callbacks.  With a pool,
 * up to the read-ahead's cap more items than run may be pulled ahead (they
 * wait for a token, so that a worker hands its token straight on). */
static void check_bounds(rig *r)
{
    df_map_stats st;
    TU_OK(df_map_get_stats(r->map, &st));
    uint64_t ahead = ahead_cap(&r->o);
    uint64_t inflight = r->o.limit + ahead;
    ck_assert_uint_le(st.running, inflight);
    ck_assert_uint_eq(st.pulled - st.done, st.running + st.buffered);
    if (r->o.flags & DF_MAP_ORDERED) {
        size_t window = r->o.window ? r->o.window : r->o.limit;
        ck_assert_uint_le(st.buffered, window);
        ck_assert_uint_le(st.pulled - st.done, window + 1);
    } else {
        ck_assert_uint_le(st.pulled - st.done, inflight);
    }
    if (st.running > r->max_running)
        r->max_running = st.running;
    if (st.buffered > r->max_buffered)
        r->max_buffered = st.buffered;
    if (st.pulled - st.done > r->max_outstanding)
        r->max_outstanding = st.pulled - st.done;
}

static int next_fn(void *arg, void **item, df_free_fn *free_fn)
{
    rig *r = arg;
    if (r->map != NULL)
        check_bounds(r);
    if (r->next_v == r->fail_next_at)
        return r->fail_next_code;
    if (r->next_v == r->n)
        return 0;
    uint64_t v = r->next_v++;
    if (v == r->cancel_in_next)
        TU_OK(df_map_cancel(r->map));
    titem *it = malloc(sizeof *it);
    ck_assert_ptr_nonnull(it);
    it->v = v;
    it->r = r;
    *item = it;
    *free_fn = item_free;
    return 1;
}

static bool item_fails(const rig *r, uint64_t v)
{
    return r->fail_mod != 0 && v % r->fail_mod == r->fail_rem;
}

/* The value an item's success carries. */
static df_result item_value(rig *r, uint64_t v)
{
    if (!r->heap_values)
        return df_ok((void *)(uintptr_t)(v * 2 + 1), NULL);
    uint64_t *p = malloc(2 * sizeof *p);
    ck_assert_ptr_nonnull(p);
    p[0] = v * 2 + 1;
    p[1] = (uint64_t)(uintptr_t)r;
    return df_ok(p, value_free);
}

static uint64_t value_of(const rig *r, void *value)
{
    return r->heap_values ? ((uint64_t *)value)[0] : (uint64_t)(uintptr_t)value;
}

static df_result call_fn(void *item, void *arg)
{
    rig *r = arg;
    uint64_t v = item_v(item);
    check_bounds(r);
    if (r->hold_mod != 0 && v % r->hold_mod == 0) {
        df_deferred *d;
        ck_assert_uint_lt(r->nheld, MAX_HELD);
        TU_OK(df_deferred_new(r->loop, &d));
        r->held[r->nheld] = df_deferred_ref(d);
        r->held_v[r->nheld++] = v;
        return df_wait(d);
    }
    if (item_fails(r, v))
        return df_errf(r->loop, -EIO, "item %" PRIu64 " failed", v);
    return item_value(r, v);
}

/* Pool work.  Gating makes completions come out of input order without
 * sleeping: with gate_block = B, the first item of each block of B waits
 * until the other B - 1 have finished. */
static df_result work_fn(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    rig *r = ((titem *)item)->r;
    uint64_t v = ((titem *)item)->v;
    int now = atomic_fetch_add(&r->active, 1) + 1;
    int max = atomic_load(&r->max_active);
    while (now > max &&
           !atomic_compare_exchange_weak(&r->max_active, &max, now))
        ;
    for (volatile unsigned i = 0; i < r->spin; i++)
        ;
    if (v == r->block_item) {
        pthread_mutex_lock(&r->mu);
        atomic_store(&r->blocker_started, true);
        pthread_cond_broadcast(&r->cv);
        while (!atomic_load(&r->blocker_go))
            pthread_cond_wait(&r->cv, &r->mu);
        pthread_mutex_unlock(&r->mu);
    }
    if (r->gate_block > 1) {
        size_t b = v / r->gate_block;
        pthread_mutex_lock(&r->mu);
        if (v % r->gate_block == 0) {
            uint64_t want = r->gate_block - 1;
            if (r->n != ENDLESS && b * r->gate_block + want >= r->n)
                want = r->n - b * r->gate_block - 1;
            while ((uint64_t)atomic_load(&r->block_done[b]) < want)
                pthread_cond_wait(&r->cv, &r->mu);
        } else {
            atomic_fetch_add(&r->block_done[b], 1);
            pthread_cond_broadcast(&r->cv);
        }
        pthread_mutex_unlock(&r->mu);
    }
    atomic_fetch_sub(&r->active, 1);
    if (item_fails(r, v))
        return df_errf(df_work_loop(w), -EIO, "item %" PRIu64 " failed", v);
    return df_ok((void *)(uintptr_t)(v * 2 + 1), NULL);
}

static void on_result(uint64_t index, void *item, df_result res, void *arg)
{
    rig *r = arg;
    uint64_t v = item_v(item);
    check_bounds(r);
    ck_assert_uint_eq(index, v);
    if (r->o.flags & DF_MAP_ORDERED) {
        ck_assert_uint_eq(index, r->expect_next);
        r->expect_next++;
    }
    if (r->norder < MAX_ORDER)
        r->order[r->norder++] = index;
    r->delivered++;
    if (res.failure != NULL) {
        r->failures++;
        r->last_fail_code = df_failure_code(res.failure);
        if (r->last_fail_code == DF_ECANCELLED) {
            r->cancels++;
        } else if (r->last_fail_code != -EIO) {
            ck_assert_int_eq(r->last_fail_code, r->other_code);
        } else {
            df_map_stats st;
            TU_OK(df_map_get_stats(r->map, &st));
            if (r->pulled_at_fail == 0)
                r->pulled_at_fail = st.pulled;
            ck_assert(item_fails(r, v));
            char want[64];
            snprintf(want, sizeof want, "item %" PRIu64 " failed", v);
            ck_assert_str_eq(df_failure_message(res.failure), want);
        }
    } else {
        ck_assert_ptr_null(res.wait);
        ck_assert(!item_fails(r, v));
        ck_assert_uint_eq(value_of(r, res.value), v * 2 + 1);
    }
    df_result_clear(&res);
    if (r->free_pool_after != 0 && r->delivered == r->free_pool_after) {
        df_pool_free(r->o.pool);
        r->pool_freed = true;
    }
    if (r->cancel_after != 0 && r->delivered == r->cancel_after) {
        TU_OK(df_map_get_stats(r->map, &r->at_cancel));
        TU_OK(df_map_cancel(r->map));
        TU_OK(df_map_cancel(r->map)); /* idempotent */
    }
}

/* Options for the call variant, or the pool variant when p != NULL. */
static void rig_options(rig *r, df_pool *p, unsigned limit, unsigned flags)
{
    df_map_options o = {0};
    o.limit = limit;
    o.flags = flags;
    o.next = next_fn;
    o.next_arg = r;
    o.pool = p;
    if (p != NULL)
        o.work = work_fn;
    else
        o.call = call_fn;
    o.on_result = on_result;
    o.arg = r;
    r->o = o;
}

static void rig_gate(rig *r, uint64_t block)
{
    ck_assert(r->n != ENDLESS);
    r->gate_block = block;
    r->nblocks = (size_t)(r->n / block + 1);
    r->block_done = calloc(r->nblocks, sizeof *r->block_done);
    ck_assert_ptr_nonnull(r->block_done);
}

static void rig_start(rig *r)
{
    TU_OK(df_map_start(r->loop, &r->o, &r->map, &r->done));
}

/* Fires the most recently held deferred (LIFO, so completions run against
 * input order); fails it when `fail`. */
static uint64_t fire_last(rig *r, bool fail)
{
    ck_assert_uint_gt(r->nheld, 0);
    df_deferred *d = r->held[--r->nheld];
    uint64_t v = r->held_v[r->nheld];
    if (fail) {
        df_failure *f =
            df_failure_new(r->loop, -EIO, "item %" PRIu64 " failed", v);
        TU_OK(df_deferred_errback(d, f));
    } else {
        df_result res = item_value(r, v);
        TU_OK(df_deferred_callback(d, res.value, res.free));
    }
    df_deferred_unref(d);
    return v;
}

/* The done deferred's summary, or NULL if it failed (code in *code). */
static const df_map_stats *done_stats(rig *r, int *code)
{
    void *value = NULL;
    df_failure *f = NULL;
    TU_OK(df_deferred_peek(r->done, &value, &f));
    *code = f != NULL ? df_failure_code(f) : 0;
    return f != NULL ? NULL : value;
}

/* Handles a failure so that releasing done does not report it. */
static df_result consume(df_result res, void *arg)
{
    (void)arg;
    df_result_clear(&res);
    return res;
}

static void rig_finish(rig *r)
{
    df_map_stats st;
    TU_OK(df_map_get_stats(r->map, &st));
    ck_assert_uint_eq(st.running, 0);
    ck_assert_uint_eq(st.buffered, 0);
    ck_assert_uint_eq(st.pulled, st.done);
    ck_assert_uint_eq(st.done, r->delivered);
    ck_assert_uint_eq(st.failed, r->failures);
    ck_assert_uint_eq(st.cancelled, r->cancels);
    ck_assert_uint_eq(r->items_freed, st.pulled);
    TU_OK(df_map_free(r->map));
    TU_OK(df_deferred_add_errback(r->done, consume, NULL));
    df_deferred_unref(r->done);
    ck_assert_uint_eq(df_loop_unhandled_count(r->loop), 0);
    r->map = NULL;
    r->done = NULL;
    rig_destroy(r);
}

static df_pool *new_pool(df_loop *loop, unsigned threads)
{
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    df_pool *p = NULL;
    po.threads = threads;
    TU_OK(df_pool_new(loop, &po, &p));
    return p;
}

/* ------------------------------------------------------------ options */

START_TEST(test_map_invalid_options)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 1);
    rig r;
    df_map *m = NULL;
    df_deferred *d = NULL;
    df_map_options o;

    rig_init(&r, loop);
    rig_options(&r, NULL, 2, 0);
    TU_ERR(df_map_start(NULL, &r.o, &m, &d), DF_EINVAL);
    TU_ERR(df_map_start(loop, NULL, &m, &d), DF_EINVAL);
    TU_ERR(df_map_start(loop, &r.o, NULL, &d), DF_EINVAL);
    TU_ERR(df_map_start(loop, &r.o, &m, NULL), DF_EINVAL);
    o = r.o, o.limit = 0;
    TU_ERR(df_map_start(loop, &o, &m, &d), DF_EINVAL);
    o = r.o, o.next = NULL;
    TU_ERR(df_map_start(loop, &o, &m, &d), DF_EINVAL);
    o = r.o, o.call = NULL; /* nothing to run */
    TU_ERR(df_map_start(loop, &o, &m, &d), DF_EINVAL);
    o = r.o, o.work = work_fn; /* work without pool */
    TU_ERR(df_map_start(loop, &o, &m, &d), DF_EINVAL);
    o = r.o, o.pool = p; /* pool without work */
    TU_ERR(df_map_start(loop, &o, &m, &d), DF_EINVAL);
    o = r.o, o.pool = p, o.work = work_fn; /* both pool and call */
    TU_ERR(df_map_start(loop, &o, &m, &d), DF_EINVAL);
    o = r.o, o.flags = 1u << 7; /* unknown flag */
    TU_ERR(df_map_start(loop, &o, &m, &d), DF_EINVAL);
    o = r.o, o.flags = DF_MAP_ORDERED, o.window = SIZE_MAX;
    TU_ERR(df_map_start(loop, &o, &m, &d), DF_EINVAL);
    ck_assert_ptr_null(m);
    ck_assert_ptr_null(d);
    ck_assert_uint_eq(r.next_v, 0); /* next was never called */

    TU_ERR(df_map_cancel(NULL), DF_EINVAL);
    TU_ERR(df_map_free(NULL), DF_EINVAL);
    df_map_stats st;
    TU_ERR(df_map_get_stats(NULL, &st), DF_EINVAL);

    rig_destroy(&r);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

/* Runs on another thread: every entry point refuses it. */
static void *foreign_thread(void *arg)
{
    rig *r = arg;
    df_map_stats st;
    df_map *m = NULL;
    df_deferred *d = NULL;
    intptr_t bad = 0;

    bad += df_map_get_stats(r->map, &st) != DF_EWRONG_THREAD;
    bad += df_map_cancel(r->map) != DF_EWRONG_THREAD;
    bad += df_map_free(r->map) != DF_EWRONG_THREAD;
    bad += df_map_start(r->loop, &r->o, &m, &d) != DF_EWRONG_THREAD;
    return (void *)bad;
}

START_TEST(test_map_wrong_thread)
{
    df_loop *loop = tu_loop();
    rig r;
    pthread_t t;
    void *bad;

    rig_init(&r, loop);
    r.hold_mod = 1;
    rig_options(&r, NULL, 2, 0);
    rig_start(&r);
    ck_assert_int_eq(pthread_create(&t, NULL, foreign_thread, &r), 0);
    ck_assert_int_eq(pthread_join(t, &bad), 0);
    ck_assert_ptr_null(bad);
    while (r.nheld > 0)
        fire_last(&r, false);
    ck_assert(df_deferred_called(r.done));
    rig_finish(&r);
    tu_loop_free(loop);
}
END_TEST

/* ---------------------------------------------------------- zero items */

START_TEST(test_map_empty_input)
{
    for (int variant = 0; variant < 4; variant++) {
        df_loop *loop = tu_loop();
        df_pool *p = variant & 1 ? new_pool(loop, 2) : NULL;
        rig r;
        int code;

        rig_init(&r, loop);
        r.n = 0;
        rig_options(&r, p, 3, variant & 2 ? DF_MAP_ORDERED : 0);
        rig_start(&r);
        /* Nothing to wait for: done has fired inside df_map_start. */
        ck_assert(df_deferred_called(r.done));
        const df_map_stats *st = done_stats(&r, &code);
        ck_assert_int_eq(code, 0);
        ck_assert_ptr_nonnull(st);
        ck_assert_uint_eq(st->pulled, 0);
        ck_assert_uint_eq(st->done, 0);
        ck_assert_uint_eq(st->running, 0);
        ck_assert_uint_eq(r.delivered, 0);
        TU_OK(df_loop_run(loop));
        rig_finish(&r);
        df_pool_free(p);
        tu_loop_free(loop);
    }
}
END_TEST

/* ------------------------------------------------------------ ordering */

START_TEST(test_map_ordered_pool)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 4);
    rig r;
    int code;

    rig_init(&r, loop);
    r.n = 2000;
    rig_gate(&r, 4); /* each block of 4 finishes last-first */
    rig_options(&r, p, 4, DF_MAP_ORDERED);
    rig_start(&r);
    TU_OK(df_loop_run_until(loop, r.done));
    const df_map_stats *st = done_stats(&r, &code);
    ck_assert_int_eq(code, 0);
    ck_assert_uint_eq(st->pulled, 2000);
    ck_assert_uint_eq(st->done, 2000);
    ck_assert_uint_eq(r.delivered, 2000);
    ck_assert_uint_eq(r.expect_next, 2000);
    /* The gates forced out-of-order completions: some were held back. */
    ck_assert_uint_gt(r.max_buffered, 0);
    rig_finish(&r);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

START_TEST(test_map_unordered_pool)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 4);
    rig r;
    int code;
    static bool seen[2000];

    memset(seen, 0, sizeof seen);
    rig_init(&r, loop);
    r.n = 2000;
    rig_gate(&r, 4);
    rig_options(&r, p, 4, 0);
    rig_start(&r);
    TU_OK(df_loop_run_until(loop, r.done));
    ck_assert_ptr_nonnull(done_stats(&r, &code));
    ck_assert_uint_eq(r.delivered, 2000);
    /* Every index once; the first of each block after the others. */
    bool out_of_order = false;
    for (size_t i = 0; i < MAX_ORDER && i < r.norder; i++) {
        ck_assert(!seen[r.order[i]]);
        seen[r.order[i]] = true;
        if (i > 0 && r.order[i] < r.order[i - 1])
            out_of_order = true;
    }
    ck_assert(out_of_order);
    rig_finish(&r);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

/* Call variant: every item is held, and the test fires them newest
 * first.  Unordered delivery follows completion; ordered follows input. */
START_TEST(test_map_order_call)
{
    for (int ordered = 0; ordered < 2; ordered++) {
        df_loop *loop = tu_loop();
        rig r;
        uint64_t fired[64];
        size_t nfired = 0;
        int code;

        rig_init(&r, loop);
        r.n = 40;
        r.hold_mod = 1;
        rig_options(&r, NULL, 5, ordered ? DF_MAP_ORDERED : 0);
        rig_start(&r);
        while (r.nheld > 0)
            fired[nfired++] = fire_last(&r, false);
        ck_assert_uint_eq(nfired, 40);
        ck_assert(df_deferred_called(r.done));
        ck_assert_ptr_nonnull(done_stats(&r, &code));
        ck_assert_uint_eq(r.norder, 40);
        for (size_t i = 0; i < 40; i++)
            ck_assert_uint_eq(r.order[i], ordered ? i : fired[i]);
        if (!ordered)
            ck_assert_uint_eq(r.order[0], 4); /* the newest of 0..4 */
        rig_finish(&r);
        tu_loop_free(loop);
    }
}
END_TEST

/* ------------------------------------------------------------- bounds */

START_TEST(test_map_limit_call)
{
    for (int ordered = 0; ordered < 2; ordered++) {
        df_loop *loop = tu_loop();
        rig r;
        df_map_stats st;

        rig_init(&r, loop);
        r.n = 100;
        r.hold_mod = 1;
        rig_options(&r, NULL, 5, ordered ? DF_MAP_ORDERED : 0);
        rig_start(&r);
        /* Exactly `limit` items pulled, all running, nothing more asked. */
        TU_OK(df_map_get_stats(r.map, &st));
        ck_assert_uint_eq(st.pulled, 5);
        ck_assert_uint_eq(st.running, 5);
        ck_assert_uint_eq(r.next_v, 5);
        while (r.nheld > 0)
            fire_last(&r, false);
        ck_assert_uint_eq(r.max_running, 5);
        ck_assert(df_deferred_called(r.done));
        rig_finish(&r);
        tu_loop_free(loop);
    }
}
END_TEST

START_TEST(test_map_limit_pool)
{
    for (int ordered = 0; ordered < 2; ordered++) {
        df_loop *loop = tu_loop();
        df_pool *p = new_pool(loop, 7); /* more threads than the limit */
        rig r;
        int code;

        rig_init(&r, loop);
        r.n = quick() ? 300 : 3000;
        r.spin = 2000;
        rig_options(&r, p, 3, ordered ? DF_MAP_ORDERED : 0);
        rig_start(&r);
        TU_OK(df_loop_run_until(loop, r.done));
        ck_assert_ptr_nonnull(done_stats(&r, &code));
        ck_assert_int_le(atomic_load(&r.max_active), 3);
        ck_assert_int_ge(atomic_load(&r.max_active), 1);
        ck_assert_uint_le(r.max_running, 3 + ahead_cap(&r.o));
        rig_finish(&r);
        df_pool_free(p);
        tu_loop_free(loop);
    }
}
END_TEST

/* Ordered, limit 8, window 3: only item 0 of every 10 is held.  Items 1-3
 * finish and wait; pulling stops with 4 pulled although 7 could run. */
START_TEST(test_map_window_call)
{
    df_loop *loop = tu_loop();
    rig r;
    df_map_stats st;
    int code;

    rig_init(&r, loop);
    r.n = 100;
    r.hold_mod = 10;
    rig_options(&r, NULL, 8, DF_MAP_ORDERED);
    r.o.window = 3;
    rig_start(&r);
    TU_OK(df_map_get_stats(r.map, &st));
    ck_assert_uint_eq(st.pulled, 4);
    ck_assert_uint_eq(st.running, 1);
    ck_assert_uint_eq(st.buffered, 3);
    ck_assert_uint_eq(st.done, 0);
    ck_assert_uint_eq(r.delivered, 0);
    for (int round = 1; r.nheld > 0; round++) {
        fire_last(&r, false);
        TU_OK(df_map_get_stats(r.map, &st));
        if (round < 10) {
            /* Up to the next held item, then the window fills again. */
            ck_assert_uint_eq(st.done, 10u * round);
            ck_assert_uint_eq(st.buffered, 3);
        }
    }
    ck_assert_uint_eq(r.max_buffered, 3);
    ck_assert_uint_eq(r.max_outstanding, 4);
    ck_assert_ptr_nonnull(done_stats(&r, &code));
    rig_finish(&r);
    tu_loop_free(loop);
}
END_TEST

START_TEST(test_map_window_pool)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 4);
    rig r;
    int code;

    rig_init(&r, loop);
    r.n = 1500;
    rig_gate(&r, 3); /* blocks of 3 fit a window of 2 (+1 running) */
    rig_options(&r, p, 6, DF_MAP_ORDERED);
    r.o.window = 2;
    rig_start(&r);
    TU_OK(df_loop_run_until(loop, r.done));
    ck_assert_ptr_nonnull(done_stats(&r, &code));
    ck_assert_uint_le(r.max_buffered, 2);
    ck_assert_uint_le(r.max_outstanding, 3);
    ck_assert_uint_eq(r.expect_next, 1500);
    rig_finish(&r);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

/* ------------------------------------------------------------- errors */

START_TEST(test_map_errors_keep_going)
{
    for (int variant = 0; variant < 4; variant++) {
        df_loop *loop = tu_loop();
        df_pool *p = variant & 1 ? new_pool(loop, 3) : NULL;
        rig r;
        int code;

        rig_init(&r, loop);
        r.n = 700;
        r.fail_mod = 7;
        r.fail_rem = 3;
        rig_options(&r, p, 4, variant & 2 ? DF_MAP_ORDERED : 0);
        rig_start(&r);
        TU_OK(df_loop_run_until(loop, r.done));
        const df_map_stats *st = done_stats(&r, &code);
        ck_assert_int_eq(code, 0);
        ck_assert_ptr_nonnull(st);
        ck_assert_uint_eq(st->pulled, 700);
        ck_assert_uint_eq(st->done, 700);
        ck_assert_uint_eq(st->failed, 100);
        ck_assert_uint_eq(st->cancelled, 0);
        ck_assert_uint_eq(r.failures, 100);
        rig_finish(&r);
        df_pool_free(p);
        tu_loop_free(loop);
    }
}
END_TEST

/* Call variant, every item held: item 2 fails, which cancels 0, 1 and 3
 * and stops pulling; done fails with item 2's failure itself. */
START_TEST(test_map_errors_stop_call)
{
    for (int ordered = 0; ordered < 2; ordered++) {
        df_loop *loop = tu_loop();
        rig r;
        df_failure *f = NULL;

        rig_init(&r, loop);
        r.n = ENDLESS;
        r.hold_mod = 1;
        r.fail_mod = 1000;
        r.fail_rem = 2;
        rig_options(&r, NULL, 4,
                    DF_MAP_STOP_ON_ERROR | (ordered ? DF_MAP_ORDERED : 0));
        rig_start(&r);
        ck_assert_uint_eq(r.nheld, 4);
        /* held[2] is item 2: fail it from the middle of the stack. */
        df_deferred *d = r.held[2];
        ck_assert_uint_eq(r.held_v[2], 2);
        TU_OK(df_deferred_errback(d,
                                  df_failure_new(loop, -EIO, "item 2 failed")));
        df_deferred_unref(d);
        r.held[2] = r.held[3];
        r.held_v[2] = r.held_v[3];
        r.nheld--;
        ck_assert(df_deferred_called(r.done));
        TU_OK(df_deferred_peek(r.done, NULL, &f));
        ck_assert_ptr_nonnull(f);
        ck_assert_int_eq(df_failure_code(f), -EIO);
        ck_assert_str_eq(df_failure_message(f), "item 2 failed");
        ck_assert_uint_eq(r.delivered, 4);
        ck_assert_uint_eq(r.failures, 4);
        ck_assert_uint_eq(r.cancels, 3);
        ck_assert_uint_eq(r.next_v, 4); /* no pull after the failure */
        /* Firing the cancelled ones now changes nothing. */
        while (r.nheld > 0)
            fire_last(&r, false);
        ck_assert_uint_eq(r.delivered, 4);
        rig_finish(&r);
        tu_loop_free(loop);
    }
}
END_TEST

START_TEST(test_map_errors_stop_pool)
{
    for (int ordered = 0; ordered < 2; ordered++) {
        df_loop *loop = tu_loop();
        df_pool *p = new_pool(loop, 2);
        rig r;
        int code;

        rig_init(&r, loop);
        r.n = ENDLESS;
        r.fail_mod = 1000000;
        r.fail_rem = 50;
        rig_options(&r, p, 4,
                    DF_MAP_STOP_ON_ERROR | (ordered ? DF_MAP_ORDERED : 0));
        rig_start(&r);
        TU_OK(df_loop_run_until(loop, r.done));
        ck_assert_ptr_null(done_stats(&r, &code));
        ck_assert_int_eq(code, -EIO);
        /* Nothing was pulled once item 50 had failed; in ordered mode at
         * most window + 1 items are pulled past the last delivered. */
        ck_assert_uint_ge(r.next_v, 51);
        ck_assert_uint_eq(r.next_v, r.pulled_at_fail);
        if (ordered)
            ck_assert_uint_le(r.next_v, 50 + 4 + 1);
        ck_assert_uint_eq(r.failures, 1 + r.cancels);
        rig_finish(&r);
        df_pool_free(p);
        tu_loop_free(loop);
    }
}
END_TEST

/* The pool refuses work: the item fails and the map stops, whatever its
 * policy, rather than turning an endless input into endless failures. */
START_TEST(test_map_submit_refused)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 1);
    rig r;
    int code;

    TU_OK(df_pool_shutdown(p, DF_POOL_DRAIN));
    rig_init(&r, loop);
    r.n = ENDLESS;
    r.other_code = DF_ESHUTDOWN;
    rig_options(&r, p, 4, 0);
    rig_start(&r);
    ck_assert(df_deferred_called(r.done));
    ck_assert_ptr_null(done_stats(&r, &code));
    ck_assert_int_eq(code, DF_ESHUTDOWN);
    ck_assert_uint_eq(r.delivered, 1);
    ck_assert_int_eq(r.last_fail_code, DF_ESHUTDOWN);
    rig_finish(&r);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

/* Issue 15, item 3.  Freeing a running map's pool from the map's own
 * on_result ends the map as freeing it from a timer does: it stops
 * pulling, every pulled item is delivered once (failed with DF_ESHUTDOWN
 * or DF_ECANCELLED if it had not run), done fails with DF_ESHUTDOWN, and
 * nothing touches the freed pool.  Before the fix the map pulled on after
 * on_result returned and submitted to the freed pool (use-after-free). */
static void free_pool_timer(void *arg, int status)
{
    rig *r = arg;
    (void)status;
    df_pool_free(r->o.pool);
    r->pool_freed = true;
}

START_TEST(test_map_pool_freed_mid_stream)
{
    for (int variant = 0; variant < 2; variant++) {
        df_loop *loop = tu_loop();
        df_pool *p = new_pool(loop, 2);
        rig r;
        int code;

        rig_init(&r, loop);
        r.n = ENDLESS;
        r.spin = 200;
        r.other_code = DF_ESHUTDOWN;
        rig_options(&r, p, 2, 0);
        if (variant == 0)
            r.free_pool_after = 5;
        else
            TU_OK(df_loop_call_later(loop, 2000000, free_pool_timer, &r,
                                     NULL));
        rig_start(&r);
        TU_OK(df_loop_run_until(loop, r.done));
        ck_assert(r.pool_freed);
        ck_assert_ptr_null(done_stats(&r, &code));
        ck_assert_int_eq(code, DF_ESHUTDOWN);
        rig_finish(&r);
        tu_loop_free(loop);
    }
}
END_TEST

/* ------------------------------------------------------------- iterator */

START_TEST(test_map_iterator_fails)
{
    for (int variant = 0; variant < 4; variant++) {
        df_loop *loop = tu_loop();
        df_pool *p = variant & 1 ? new_pool(loop, 2) : NULL;
        rig r;
        int code;

        rig_init(&r, loop);
        r.n = ENDLESS;
        r.fail_next_at = 10;
        r.fail_next_code = -EIO;
        rig_options(&r, p, 4, variant & 2 ? DF_MAP_ORDERED : 0);
        rig_start(&r);
        TU_OK(df_loop_run_until(loop, r.done));
        ck_assert_ptr_null(done_stats(&r, &code));
        ck_assert_int_eq(code, -EIO);
        /* The items in flight were not cancelled: all ten succeeded. */
        ck_assert_uint_eq(r.delivered, 10);
        ck_assert_uint_eq(r.failures, 0);
        rig_finish(&r);
        df_pool_free(p);
        tu_loop_free(loop);
    }
}
END_TEST

START_TEST(test_map_iterator_fails_at_once)
{
    df_loop *loop = tu_loop();
    rig r;
    int code;

    rig_init(&r, loop);
    r.fail_next_at = 0;
    r.fail_next_code = -4242; /* any negative application code */
    rig_options(&r, NULL, 4, 0);
    rig_start(&r);
    ck_assert(df_deferred_called(r.done));
    ck_assert_ptr_null(done_stats(&r, &code));
    ck_assert_int_eq(code, -4242);
    rig_finish(&r);
    tu_loop_free(loop);
}
END_TEST

/* Under STOP_ON_ERROR, an item failing after the iterator did still
 * cancels the rest, and done keeps failing with the iterator's code. */
START_TEST(test_map_iterator_fails_then_item)
{
    df_loop *loop = tu_loop();
    rig r;
    int code;

    rig_init(&r, loop);
    r.n = ENDLESS;
    r.hold_mod = 1;
    r.fail_next_at = 4;
    r.fail_next_code = -4242;
    r.fail_mod = 1000;
    r.fail_rem = 1;
    rig_options(&r, NULL, 4, DF_MAP_STOP_ON_ERROR);
    rig_start(&r);
    ck_assert_uint_eq(r.nheld, 4);
    fire_last(&r, false); /* item 3: the next pull fails */
    ck_assert(!df_deferred_called(r.done));
    ck_assert_uint_eq(r.held_v[1], 1);
    TU_OK(df_deferred_errback(r.held[1],
                              df_failure_new(loop, -EIO, "item 1 failed")));
    ck_assert(df_deferred_called(r.done));
    ck_assert_ptr_null(done_stats(&r, &code));
    ck_assert_int_eq(code, -4242);
    ck_assert_uint_eq(r.delivered, 4);
    ck_assert_uint_eq(r.cancels, 2); /* items 0 and 2 */
    rig_finish(&r);
    tu_loop_free(loop);
}
END_TEST

/* --------------------------------------------------------------- cancel */

START_TEST(test_map_cancel_mid_stream)
{
    for (int variant = 0; variant < 4; variant++) {
        df_loop *loop = tu_loop();
        df_pool *p = variant & 1 ? new_pool(loop, 1) : NULL;
        rig r;
        int code;

        rig_init(&r, loop);
        r.n = ENDLESS;
        r.hold_mod = 3; /* call variant: some items pending */
        r.cancel_after = 100;
        rig_options(&r, p, 8, variant & 2 ? DF_MAP_ORDERED : 0);
        rig_start(&r);
        if (p != NULL) {
            TU_OK(df_loop_run_until(loop, r.done));
        } else {
            /* Fire held items until on_result cancels the map, which
             * cancels the rest of them. */
            while (!df_deferred_called(r.done))
                fire_last(&r, false);
        }
        ck_assert_ptr_null(done_stats(&r, &code));
        ck_assert_int_eq(code, DF_ECANCELLED);
        /* Nothing pulled after the cancel; everything in flight then was
         * cancelled (or, ordered, had finished and was waiting). */
        ck_assert_uint_eq(r.next_v, r.at_cancel.pulled);
        ck_assert_uint_eq(r.delivered, r.at_cancel.pulled);
        ck_assert_uint_eq(r.cancels, r.at_cancel.running);
        /* Unordered, finished items are delivered at once, so the other
         * items in flight were all running; ordered, they may all have
         * finished and be waiting for their turn. */
        if (!(variant & 2))
            ck_assert_uint_ge(r.cancels, 1);
        rig_finish(&r);
        df_pool_free(p);
        tu_loop_free(loop);
    }
}
END_TEST

/* A map with a long line: the items pulled in a turn of the loop are
 * held back from the workers and reach the line at the turn's end
 * (sem.c, "Held jobs").  Cancelling from on_result, in the middle of such
 * a turn, must take the held items too: each is delivered once, as
 * cancelled, and nothing runs after the cancel. */
START_TEST(test_map_cancel_with_held_items)
{
    for (int variant = 0; variant < 2; variant++) {
        df_loop *loop = tu_loop();
        df_pool *p = new_pool(loop, 1);
        rig r;
        int code;

        rig_init(&r, loop);
        r.n = ENDLESS;
        r.cancel_after = 3000;
        /* 200 tokens and as many read ahead: the line holds up to 200
         * waiting items, more than the 128 above which items are held. */
        rig_options(&r, p, 200, variant ? DF_MAP_ORDERED : 0);
        r.o.window = 1000;
        rig_start(&r);
        TU_OK(df_loop_run_until(loop, r.done));
        ck_assert_ptr_null(done_stats(&r, &code));
        ck_assert_int_eq(code, DF_ECANCELLED);
        ck_assert_uint_eq(r.next_v, r.at_cancel.pulled);
        ck_assert_uint_eq(r.delivered, r.at_cancel.pulled);
        ck_assert_uint_eq(r.cancels, r.at_cancel.running);
        rig_finish(&r);
        df_pool_free(p);
        tu_loop_free(loop);
    }
}
END_TEST

/* Cancelling done itself: queued items fail at once, the running one is
 * waited for, and done fires only when it has returned. */
START_TEST(test_map_cancel_done_waits)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 1);
    rig r;
    df_map_stats st;
    int code;

    rig_init(&r, loop);
    r.n = ENDLESS;
    r.block_item = 0;
    rig_options(&r, p, 4, 0);
    rig_start(&r);
    pthread_mutex_lock(&r.mu);
    while (!atomic_load(&r.blocker_started))
        pthread_cond_wait(&r.cv, &r.mu);
    pthread_mutex_unlock(&r.mu);

    TU_ERR(df_map_free(r.map), DF_EBUSY);
    TU_OK(df_deferred_cancel(r.done));
    ck_assert(!df_deferred_called(r.done));
    /* 4 items hold tokens (1 runs, 3 are queued) and 64 more were pulled
     * ahead; all but the running one fail at once. */
    TU_OK(df_map_get_stats(r.map, &st));
    ck_assert_uint_eq(st.pulled, 68);
    ck_assert_uint_eq(st.running, 1);
    ck_assert_uint_eq(st.done, 67);
    ck_assert_uint_eq(st.cancelled, 67);
    TU_ERR(df_map_free(r.map), DF_EBUSY);

    pthread_mutex_lock(&r.mu);
    atomic_store(&r.blocker_go, true);
    pthread_cond_broadcast(&r.cv);
    pthread_mutex_unlock(&r.mu);
    TU_OK(df_loop_run_until(loop, r.done));
    ck_assert_ptr_null(done_stats(&r, &code));
    ck_assert_int_eq(code, DF_ECANCELLED);
    ck_assert_uint_eq(r.cancels, 68);
    ck_assert_uint_eq(r.delivered, 68);
    TU_OK(df_map_cancel(r.map)); /* after the end: a no-op */
    rig_finish(&r);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

/* A timeout on done cancels the map when it expires; done then fails with
 * DF_ETIMEDOUT once the items in flight have been cancelled. */
START_TEST(test_map_timeout_done)
{
    df_loop *loop = tu_loop();
    rig r;
    int code;

    rig_init(&r, loop);
    r.n = ENDLESS;
    r.hold_mod = 1; /* never fired by the test */
    rig_options(&r, NULL, 3, DF_MAP_ORDERED);
    rig_start(&r);
    TU_OK(df_deferred_set_timeout(r.done, 1000000));
    TU_OK(df_loop_run_until(loop, r.done));
    ck_assert_ptr_null(done_stats(&r, &code));
    ck_assert_int_eq(code, DF_ETIMEDOUT);
    ck_assert_uint_eq(r.delivered, 3);
    ck_assert_uint_eq(r.cancels, 3);
    rig_finish(&r);
    tu_loop_free(loop);
}
END_TEST

/* next() cancels the map and still returns an item: it is delivered,
 * cancelled, like every pulled item. */
START_TEST(test_map_cancel_from_next)
{
    df_loop *loop = tu_loop();
    rig r;
    int code;

    rig_init(&r, loop);
    r.n = ENDLESS;
    r.cancel_in_next = 5;
    rig_options(&r, NULL, 3, DF_MAP_ORDERED);
    rig_start(&r);
    ck_assert(df_deferred_called(r.done));
    ck_assert_ptr_null(done_stats(&r, &code));
    ck_assert_int_eq(code, DF_ECANCELLED);
    ck_assert_uint_eq(r.delivered, 6);
    ck_assert_uint_eq(r.cancels, 1);
    ck_assert_uint_eq(r.order[5], 5);
    rig_finish(&r);
    tu_loop_free(loop);
}
END_TEST

/* ------------------------------------------------------ done and free */

START_TEST(test_map_stats_and_done_value)
{
    counter c = {0};
    df_allocator a = {cnt_malloc, cnt_realloc, cnt_free, &c};
    df_loop_options lo = DF_LOOP_OPTIONS_INIT;
    df_loop *loop;
    rig r;
    df_map_stats st;
    int code;

    lo.allocator = &a;
    TU_OK(df_loop_new(&lo, &loop));
    rig_init(&r, loop);
    r.n = 30;
    r.hold_mod = 2;
    r.fail_mod = 10;
    r.fail_rem = 5;
    r.heap_values = true;
    rig_options(&r, NULL, 4, DF_MAP_ORDERED);
    rig_start(&r);
    TU_OK(df_map_get_stats(r.map, &st));
    /* 0, 2, 4 held; 1 and 3 done but waiting for 0; window full. */
    ck_assert_uint_eq(st.pulled, 5);
    ck_assert_uint_eq(st.running, 3);
    ck_assert_uint_eq(st.buffered, 2);
    ck_assert_uint_eq(st.done, 0);
    ck_assert_uint_eq(st.failed, 0);
    while (r.nheld > 0)
        fire_last(&r, false);
    const df_map_stats *sum = done_stats(&r, &code);
    ck_assert_int_eq(code, 0);
    ck_assert_ptr_nonnull(sum);
    ck_assert_uint_eq(sum->pulled, 30);
    ck_assert_uint_eq(sum->done, 30);
    ck_assert_uint_eq(sum->running, 0);
    ck_assert_uint_eq(sum->buffered, 0);
    ck_assert_uint_eq(sum->failed, 3); /* 5, 15, 25 */
    ck_assert_uint_eq(sum->cancelled, 0);
    TU_OK(df_map_get_stats(r.map, &st));
    ck_assert_mem_eq(&st, sum, sizeof st);
    ck_assert_uint_eq(r.values_freed, 27);
    rig_finish(&r);
    tu_loop_free(loop);
    /* The summary and everything else went back through the allocator. */
    ck_assert_int_eq(atomic_load(&c.bytes), 0);
}
END_TEST

/* A callback on done frees the map: when done fires inside the map's own
 * processing, and when the callback is added after done fired. */
static df_result free_map_cb(df_result res, void *arg)
{
    rig *r = arg;
    TU_OK(df_map_free(r->map));
    r->map = NULL;
    return res;
}

START_TEST(test_map_free_from_done)
{
    for (int late = 0; late < 2; late++) {
        df_loop *loop = tu_loop();
        rig r;

        rig_init(&r, loop);
        r.n = 20;
        r.hold_mod = late ? 0 : 1;
        rig_options(&r, NULL, 4, 0);
        rig_start(&r);
        ck_assert(df_deferred_called(r.done) == (bool)late);
        TU_OK(df_deferred_add_callback(r.done, free_map_cb, &r));
        while (r.nheld > 0)
            fire_last(&r, false);
        ck_assert_ptr_null(r.map);
        ck_assert_uint_eq(r.delivered, 20);
        ck_assert_uint_eq(r.items_freed, 20);
        df_deferred_unref(r.done);
        rig_destroy(&r);
        tu_loop_free(loop);
    }
}
END_TEST

/* The same with a pool, inside the loop's dispatch: when done fires, the
 * map has asked for its turn-end hook (map.c, release_held), so freeing it
 * from done's callback must take the hook back, or the turn's end would
 * read the freed map (memcheck and ASan report it). */
START_TEST(test_map_free_from_done_pool)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 2);
    rig r;

    rig_init(&r, loop);
    r.n = 2000;
    rig_options(&r, p, 4, 0);
    rig_start(&r);
    TU_OK(df_deferred_add_callback(r.done, free_map_cb, &r));
    TU_OK(df_loop_run_until(loop, r.done));
    ck_assert_ptr_null(r.map);
    ck_assert_uint_eq(r.delivered, 2000);
    df_deferred_unref(r.done);
    rig_destroy(&r);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

START_TEST(test_map_no_on_result)
{
    df_loop *loop = tu_loop();
    rig r;
    int code;

    rig_init(&r, loop);
    r.n = 50;
    r.heap_values = true;
    r.fail_mod = 10;
    rig_options(&r, NULL, 4, DF_MAP_ORDERED);
    r.o.on_result = NULL;
    rig_start(&r);
    const df_map_stats *st = done_stats(&r, &code);
    ck_assert_ptr_nonnull(st);
    ck_assert_uint_eq(st->done, 50);
    ck_assert_uint_eq(st->failed, 5);
    /* Dropped results: values destroyed, failures not reported. */
    ck_assert_uint_eq(r.values_freed, 45);
    ck_assert_uint_eq(r.items_freed, 50);
    ck_assert_uint_eq(df_loop_unhandled_count(loop), 0);
    r.delivered = 50;
    r.failures = 5;
    rig_finish(&r);
    tu_loop_free(loop);
}
END_TEST

/* ------------------------------------------------------------ streams */

/*
 * A plain stream for the long tests: integer items 1..n, results equal to
 * their items, checked in on_result.  It runs on the loop thread of
 * whatever thread made the loop, so it never uses ck_assert: problems are
 * recorded in `rc` and checked by the test afterwards.
 */
typedef struct stream {
    df_loop *loop;
    uint64_t n;
    uint64_t next_v;
    bool wait_fired; /* call: df_wait() on an already fired deferred */
    int rc;          /* 0, or what went wrong first */
    uint64_t delivered;
} stream;

static int stream_next(void *arg, void **item, df_free_fn *free_fn)
{
    stream *s = arg;
    (void)free_fn;
    if (s->next_v == s->n)
        return 0;
    *item = (void *)(uintptr_t)++s->next_v;
    return 1;
}

static df_result stream_call(void *item, void *arg)
{
    stream *s = arg;
    if (s->wait_fired) {
        df_deferred *d;
        int rc = df_succeed(s->loop, item, NULL, &d);
        if (rc != 0)
            return df_errf(s->loop, rc, NULL);
        return df_wait(d);
    }
    return df_ok(item, NULL);
}

static df_result stream_work(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    (void)w;
    return df_ok(item, NULL);
}

static void stream_result(uint64_t index, void *item, df_result res, void *arg)
{
    stream *s = arg;
    if (s->rc == 0 && (res.failure != NULL || res.value != item))
        s->rc = 1;
    if (s->rc == 0 && (uint64_t)(uintptr_t)item != index + 1)
        s->rc = 2;
    s->delivered++;
    df_result_clear(&res);
}

/* Streams s->n items through a map on `loop`; 0 or a code. */
static int stream_run(stream *s, df_pool *p, unsigned limit, unsigned flags)
{
    df_map_options o = {0};
    df_map *m;
    df_deferred *done;
    int rc;

    o.limit = limit;
    o.flags = flags;
    o.next = stream_next;
    o.next_arg = s;
    o.pool = p;
    o.work = p != NULL ? stream_work : NULL;
    o.call = p != NULL ? NULL : stream_call;
    o.on_result = stream_result;
    o.arg = s;
    if ((rc = df_map_start(s->loop, &o, &m, &done)) != 0)
        return rc;
    rc = df_loop_run_until(s->loop, done);
    if (rc == 0) {
        void *value = NULL;
        df_failure *f = NULL;
        rc = df_deferred_peek(done, &value, &f);
        if (rc == 0 && f != NULL)
            rc = df_failure_code(f);
        if (rc == 0 && ((df_map_stats *)value)->done != s->n)
            rc = 3;
    }
    int frc = df_map_free(m);
    df_deferred_add_errback(done, consume, NULL);
    df_deferred_unref(done);
    if (rc == 0 && s->rc != 0)
        rc = 100 + s->rc;
    if (rc == 0 && s->delivered != s->n)
        rc = 4;
    return rc != 0 ? rc : frc;
}

/* 10^6 items that finish at once, in a thread with a 256 KiB stack: the
 * map must pull, run and deliver them in a loop, never by recursion. */
typedef struct stack_case {
    uint64_t n;
    unsigned flags;
    bool wait_fired;
    int rc;
} stack_case;

static void *stack_thread(void *arg)
{
    stack_case *c = arg;
    stream s = {0};
    int rc = df_loop_new(NULL, &s.loop);
    if (rc != 0) {
        c->rc = rc;
        return NULL;
    }
    s.n = c->n;
    s.wait_fired = c->wait_fired;
    c->rc = stream_run(&s, NULL, 4, c->flags);
    rc = df_loop_free(s.loop);
    if (c->rc == 0)
        c->rc = rc;
    return NULL;
}

START_TEST(test_map_sync_small_stack)
{
    for (int variant = 0; variant < 4; variant++) {
        stack_case c = {0};
        pthread_attr_t attr;
        pthread_t t;

        c.n = quick() ? 100000 : 1000000;
        c.flags = variant & 1 ? DF_MAP_ORDERED : 0;
        c.wait_fired = (variant & 2) != 0;
        ck_assert_int_eq(pthread_attr_init(&attr), 0);
        ck_assert_int_eq(pthread_attr_setstacksize(&attr, 256 * 1024), 0);
        ck_assert_int_eq(pthread_create(&t, &attr, stack_thread, &c), 0);
        ck_assert_int_eq(pthread_join(t, NULL), 0);
        pthread_attr_destroy(&attr);
        ck_assert_msg(c.rc == 0, "variant %d: %d (%s)", variant, c.rc,
                      df_err_name(c.rc));
    }
}
END_TEST

/* ---------------------------------------------------- constant memory */

typedef struct mem_use {
    unsigned long allocs; /* allocation calls, loop creation to free */
    long peak;            /* most bytes outstanding at once */
} mem_use;

static mem_use measure(uint64_t n, bool use_pool, bool wait_fired)
{
    counter c = {0};
    df_allocator a = {cnt_malloc, cnt_realloc, cnt_free, &c};
    df_loop_options lo = DF_LOOP_OPTIONS_INIT;
    stream s = {0};
    df_pool *p = NULL;
    mem_use u;

    lo.allocator = &a;
    TU_OK(df_loop_new(&lo, &s.loop));
    if (use_pool)
        p = new_pool(s.loop, 2);
    s.n = n;
    s.wait_fired = wait_fired;
    TU_OK(stream_run(&s, p, 4, DF_MAP_ORDERED));
    df_pool_free(p);
    tu_loop_free(s.loop);
    ck_assert_int_eq(atomic_load(&c.bytes), 0);
    u.allocs = atomic_load(&c.allocs);
    u.peak = atomic_load(&c.peak);
    return u;
}

/* Streams N and 10 N items; the allocation count and the peak of bytes
 * outstanding must not grow with N. */
static void check_constant_memory(bool use_pool, bool wait_fired)
{
    uint64_t small = 100000, large = 1000000;
    if (quick())
        small = 1000, large = 10000;
    else if (long_run())
        large = 10000000;
    mem_use a = measure(small, use_pool, wait_fired);
    mem_use b = measure(large, use_pool, wait_fired);
    fprintf(stderr,
            "map memory (%s): N=%" PRIu64 ": %lu allocations, peak %ld "
            "bytes; N=%" PRIu64 ": %lu allocations, peak %ld bytes\n",
            use_pool     ? "pool"
            : wait_fired ? "call+wait"
                         : "call",
            small, a.allocs, a.peak, large, b.allocs, b.peak);
    ck_assert_msg(b.allocs <= a.allocs + 64,
                  "allocations grow with N: %lu for %" PRIu64
                  ", %lu for %" PRIu64,
                  a.allocs, small, b.allocs, large);
    ck_assert_msg(b.peak <= a.peak + 256 * 1024,
                  "peak bytes grow with N: %ld vs %ld", a.peak, b.peak);
    ck_assert_msg(b.peak <= 4L * 1024 * 1024, "peak %ld bytes", b.peak);
}

START_TEST(test_map_constant_memory_pool)
{
    check_constant_memory(true, false);
}
END_TEST

START_TEST(test_map_constant_memory_call)
{
    check_constant_memory(false, false);
}
END_TEST

/* Each item waits on a deferred of its own (already fired): the library's
 * deferreds must be recycled too. */
START_TEST(test_map_constant_memory_call_wait)
{
    check_constant_memory(false, true);
}
END_TEST

/* ---------------------------------------------------------------- suite */


/* ------------------------------------------------- work_arg and df_map_run */

/* The work's own argument reaches every pool thread, unchanged. */
typedef struct sum_ctx {
    atomic_uint_fast64_t sum;
    atomic_uint calls;
} sum_ctx;

static df_result sum_work(df_work *w, void *item, void *work_arg)
{
    (void)w;
    sum_ctx *c = work_arg;
    atomic_fetch_add(&c->sum, (uint64_t)(uintptr_t)item);
    atomic_fetch_add(&c->calls, 1);
    return df_ok(item, NULL);
}

static df_result fail_seven(df_work *w, void *item, void *work_arg)
{
    (void)w;
    (void)work_arg;
    if ((uintptr_t)item == 7)
        return df_err(df_failure_new(NULL, 1042, "item seven"));
    return df_ok(item, NULL);
}

START_TEST(test_map_run_work_arg)
{
    df_loop *loop = tu_loop();
    df_pool *p;
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = 2;
    TU_OK(df_pool_new(loop, &po, &p));
    stream st = {0};
    st.loop = loop;
    st.n = 1000;
    sum_ctx c;
    atomic_init(&c.sum, 0);
    atomic_init(&c.calls, 0);
    df_map_options o = {0};
    o.limit = 3;
    o.next = stream_next;
    o.next_arg = &st;
    o.pool = p;
    o.work = sum_work;
    o.work_arg = &c;
    o.on_result = stream_result;
    o.arg = &st;
    df_map_stats stats;
    memset(&stats, 0xff, sizeof stats);
    TU_OK(df_map_run(loop, &o, &stats));
    ck_assert_uint_eq(atomic_load(&c.calls), 1000);
    ck_assert_uint_eq(atomic_load(&c.sum), 1000 * 1001 / 2);
    ck_assert_int_eq(st.rc, 0);
    ck_assert_uint_eq(st.delivered, 1000);
    ck_assert_uint_eq(stats.pulled, 1000);
    ck_assert_uint_eq(stats.done, 1000);
    ck_assert_uint_eq(stats.failed, 0);
    ck_assert_uint_eq(stats.running, 0);
    df_pool_free(p);
    /* Everything the map made is gone: the loop can be freed. */
    TU_OK(df_loop_free(loop));
}
END_TEST

START_TEST(test_map_run_failure_code)
{
    df_loop *loop = tu_loop();
    df_pool *p;
    TU_OK(df_pool_new(loop, NULL, &p));
    stream st = {0};
    st.n = 50;
    df_map_options o = {0};
    o.limit = 2;
    o.flags = DF_MAP_STOP_ON_ERROR | DF_MAP_ORDERED;
    o.next = stream_next;
    o.next_arg = &st;
    o.pool = p;
    o.work = fail_seven;
    df_map_stats stats;
    TU_ERR(df_map_run(loop, &o, &stats), 1042);
    ck_assert_uint_ge(stats.failed, 1);
    ck_assert_uint_eq(stats.done, stats.pulled);
    /* Bad options: nothing starts, the code comes back. */
    o.limit = 0;
    TU_ERR(df_map_run(loop, &o, NULL), DF_EINVAL);
    TU_ERR(df_map_run(NULL, &o, NULL), DF_EINVAL);
    df_pool_free(p);
    TU_OK(df_loop_free(loop));
}
END_TEST

/* A df_loop_stop() from on_result cancels the map; df_map_run still
 * returns only once every pulled item has been delivered. */
typedef struct stopper {
    df_loop *loop;
    uint64_t delivered;
    int inner_rc;
} stopper;

static void stop_result(uint64_t index, void *item, df_result res, void *arg)
{
    stopper *s = arg;
    (void)item;
    s->delivered++;
    df_result_clear(&res);
    if (index == 10)
        df_loop_stop(s->loop);
    /* Not from the loop's own callbacks. */
    df_map_options o = {0};
    s->inner_rc = df_map_run(s->loop, &o, NULL);
}

START_TEST(test_map_run_stopped)
{
    df_loop *loop = tu_loop();
    df_pool *p;
    TU_OK(df_pool_new(loop, NULL, &p));
    stream st = {0};
    st.n = UINT64_MAX; /* endless */
    stopper sp = {loop, 0, 0};
    df_map_options o = {0};
    o.limit = 4;
    o.next = stream_next;
    o.next_arg = &st;
    o.pool = p;
    o.work = stream_work;
    o.on_result = stop_result;
    o.arg = &sp;
    df_map_stats stats;
    TU_ERR(df_map_run(loop, &o, &stats), DF_ECANCELLED);
    ck_assert_int_eq(sp.inner_rc, DF_ESTATE);
    ck_assert_uint_eq(stats.done, stats.pulled);
    ck_assert_uint_eq(sp.delivered, stats.done);
    ck_assert_uint_ge(stats.done, 11);
    df_pool_free(p);
    TU_OK(df_loop_free(loop));
}
END_TEST


/* DF_MAP_NO_READAHEAD: with a pool, an input is pulled only while one of
 * the limit's tokens is free; without it the map pulls ahead.  The probe
 * records the most items pulled but not yet delivered. */
typedef struct ahead_probe {
    uint64_t n, pulled, delivered, max_ahead;
} ahead_probe;

static int ahead_next(void *arg, void **item, df_free_fn *free_fn)
{
    ahead_probe *a = arg;
    (void)free_fn;
    if (a->pulled == a->n)
        return 0;
    a->pulled++;
    if (a->pulled - a->delivered > a->max_ahead)
        a->max_ahead = a->pulled - a->delivered;
    *item = (void *)(uintptr_t)a->pulled;
    return 1;
}

static void ahead_result(uint64_t index, void *item, df_result r, void *arg)
{
    ahead_probe *a = arg;
    (void)index;
    (void)item;
    a->delivered++;
    df_result_clear(&r);
}

static uint64_t ahead_run(df_loop *loop, df_pool *p, unsigned flags)
{
    ahead_probe a = {500, 0, 0, 0};
    df_map_options o = {0};
    o.limit = 2;
    o.flags = flags;
    o.next = ahead_next;
    o.next_arg = &a;
    o.pool = p;
    o.work = stream_work;
    o.on_result = ahead_result;
    o.arg = &a;
    TU_OK(df_map_run(loop, &o, NULL));
    ck_assert_uint_eq(a.delivered, 500);
    return a.max_ahead;
}

START_TEST(test_map_no_readahead)
{
    df_loop *loop = tu_loop();
    df_pool *p;
    TU_OK(df_pool_new(loop, NULL, &p));
    /* Unordered: pulled but undelivered never exceeds the limit. */
    ck_assert_uint_le(ahead_run(loop, p, DF_MAP_NO_READAHEAD), 2);
    /* Ordered: finished results wait for their turn without a token, so
     * the window (here the limit) comes on top; still no read-ahead. */
    ck_assert_uint_le(ahead_run(loop, p, DF_MAP_NO_READAHEAD |
                                             DF_MAP_ORDERED), 2 + 2);
    /* Without the flag the map pulls max(limit, 64) ahead at once. */
    ck_assert_uint_gt(ahead_run(loop, p, 0), 2 + 2);
    df_pool_free(p);
    TU_OK(df_loop_free(loop));
}
END_TEST

/* The adaptive read-ahead, on one thread with limit 1 (so one item runs
 * and the rest of what is pulled waits in the line).  The loop thread and
 * the worker each force one side: in GROW mode the loop, in on_result,
 * now and then waits until the worker has started every pulled item, so
 * the line runs dry while the input goes on; in CALM mode the worker, in
 * work, waits until the item after its own has been pulled, so it always
 * finds one waiting and the line never runs dry. */
enum { GROW, CALM };

typedef struct grow_probe {
    int mode;
    uint64_t n, delivered, max_out;
    atomic_uint_fast64_t pulled;  /* written on the loop thread */
    atomic_uint_fast64_t started; /* written by the worker */
    atomic_bool ended;            /* next() has returned 0 */
    atomic_bool stalled;          /* a wait ran out: the test fails */
    df_map *map;
} grow_probe;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int grow_next(void *arg, void **item, df_free_fn *free_fn)
{
    grow_probe *g = arg;
    (void)free_fn;
    uint64_t pulled = atomic_load(&g->pulled);
    if (pulled == g->n) {
        atomic_store(&g->ended, true);
        return 0;
    }
    if (g->map != NULL) {
        df_map_stats st;
        TU_OK(df_map_get_stats(g->map, &st));
        ck_assert_uint_eq(st.pulled, pulled);
        if (st.pulled + 1 - st.done > g->max_out)
            g->max_out = st.pulled + 1 - st.done;
    }
    *item = (void *)(uintptr_t)pulled; /* its index */
    atomic_store(&g->pulled, pulled + 1);
    return 1;
}

static df_result grow_work(df_work *w, void *item, void *work_arg)
{
    grow_probe *g = work_arg;
    uint64_t x = (uint64_t)(uintptr_t)item;
    (void)w;
    atomic_fetch_add(&g->started, 1);
    if (g->mode == CALM) {
        /* Item x + 1 is in the line once next() has been asked for
         * x + 2 (or for the end): the pump puts an item in the line
         * before it pulls again.  The loop pulls within about 1 ms:
         * 10 s means it is stuck. */
        uint64_t end = now_ns() + 10000000000u;
        while (x + 3 <= g->n ? atomic_load(&g->pulled) < x + 3
                             : !atomic_load(&g->ended)) {
            if (now_ns() > end) {
                atomic_store(&g->stalled, true);
                break;
            }
            sched_yield();
        }
    }
    return df_ok(NULL, NULL);
}

static void grow_result(uint64_t index, void *item, df_result r, void *arg)
{
    grow_probe *g = arg;
    (void)item;
    g->delivered++;
    df_result_clear(&r);
    if (g->mode != GROW || index % 512 != 0)
        return;
    /* The line can also be stuck behind a token that is on its way back
     * to the loop (the line ran dry already then): give up after 20 ms. */
    uint64_t end = now_ns() + 20000000u;
    while (atomic_load(&g->started) < atomic_load(&g->pulled) &&
           now_ns() < end)
        sched_yield();
}

static uint64_t grow_run(int mode, unsigned flags, size_t cap)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 1);
    grow_probe g = {.mode = mode, .n = 20000};
    atomic_init(&g.pulled, 0);
    atomic_init(&g.started, 0);
    atomic_init(&g.ended, false);
    atomic_init(&g.stalled, false);
    df_map_options o = {0};
    o.limit = 1;
    o.flags = flags;
    o.window = 16384; /* ordered: no bound below the read-ahead's */
    o.readahead_max = cap;
    o.next = grow_next;
    o.next_arg = &g;
    o.pool = p;
    o.work = grow_work;
    o.work_arg = &g;
    o.on_result = grow_result;
    o.arg = &g;
    df_deferred *done;
    TU_OK(df_map_start(loop, &o, &g.map, &done));
    TU_OK(df_loop_run_until(loop, done));
    df_failure *f = NULL;
    TU_OK(df_deferred_peek(done, NULL, &f));
    ck_assert_ptr_null(f);
    df_deferred_unref(done);
    TU_OK(df_map_free(g.map));
    ck_assert_uint_eq(g.delivered, g.n);
    ck_assert(!atomic_load(&g.stalled));
    df_pool_free(p);
    tu_loop_free(loop);
    return g.max_out;
}

/* A cap too big to reach, in ordered mode (whose slots the window
 * bounds, not the cap): the read-ahead doubles for as long as the line
 * runs dry and must saturate, not wrap to 0 past 2^63 (which stopped the
 * read-ahead and the hand-off for the rest of the run). */
typedef struct wrap_probe {
    uint64_t n, pulled, delivered, late_max;
    df_map *map;
} wrap_probe;

static int wrap_next(void *arg, void **item, df_free_fn *free_fn)
{
    wrap_probe *g = arg;
    (void)free_fn;
    if (g->pulled == g->n)
        return 0;
    *item = (void *)(uintptr_t)g->pulled++;
    return 1;
}

static df_result wrap_work(df_work *w, void *item, void *work_arg)
{
    (void)w;
    (void)work_arg;
    return df_ok(item, NULL);
}

static void wrap_result(uint64_t index, void *item, df_result r, void *arg)
{
    wrap_probe *g = arg;
    (void)index;
    (void)item;
    df_result_clear(&r);
    if (++g->delivered > g->n - 10000) {
        df_map_stats st;
        TU_OK(df_map_get_stats(g->map, &st));
        if (st.pulled - st.done > g->late_max)
            g->late_max = st.pulled - st.done;
    }
}

START_TEST(test_map_readahead_huge_cap)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 2);
    wrap_probe g = {.n = 40000};
    df_map_options o = {0};
    o.limit = 1;
    o.flags = DF_MAP_ORDERED;
    o.window = 8;
    o.readahead_max = SIZE_MAX;
    o.next = wrap_next;
    o.next_arg = &g;
    o.pool = p;
    o.work = wrap_work;
    o.on_result = wrap_result;
    o.arg = &g;
    df_deferred *done;
    TU_OK(df_map_start(loop, &o, &g.map, &done));
    TU_OK(df_loop_run_until(loop, done));
    df_deferred_unref(done);
    TU_OK(df_map_free(g.map));
    ck_assert_uint_eq(g.delivered, g.n);
    /* Up to the window is pulled ahead to the end (1 if it wrapped). */
    ck_assert_uint_ge(g.late_max, 2);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

/* Unordered, the slots for limit + cap items are allocated at the start:
 * a cap that cannot be allocated (here limit + cap would wrap around) is
 * DF_ENOMEM, and nothing is started. */
START_TEST(test_map_readahead_cap_too_big)
{
    df_loop *loop = tu_loop();
    df_pool *p = new_pool(loop, 1);
    wrap_probe g = {.n = 10};
    df_map_options o = {0};
    o.limit = 4;
    o.readahead_max = SIZE_MAX;
    o.next = wrap_next;
    o.next_arg = &g;
    o.pool = p;
    o.work = wrap_work;
    df_map *m = NULL;
    df_deferred *done = NULL;
    ck_assert_int_eq(df_map_start(loop, &o, &m, &done), DF_ENOMEM);
    ck_assert_ptr_null(m);
    ck_assert_ptr_null(done);
    ck_assert_uint_eq(g.pulled, 0);
    df_pool_free(p);
    tu_loop_free(loop);
}
END_TEST

START_TEST(test_map_readahead_adapts)
{
    for (int ordered = 0; ordered < 2; ordered++) {
        unsigned flags = ordered ? DF_MAP_ORDERED : 0;
        /* A line that runs dry doubles the read-ahead from 64 up to its
         * cap, 8192, and no further: once there, the pump fills it. */
        ck_assert_uint_eq(grow_run(GROW, flags, 0), 1 + 8192);
        /* The application's cap, reached from 256 by one step short of a
         * doubling. */
        ck_assert_uint_eq(grow_run(GROW, flags, 300), 1 + 300);
        /* Below the floor, the read-ahead starts at the cap. */
        ck_assert_uint_eq(grow_run(CALM, flags, 10), 1 + 10);
        /* A line that never runs dry keeps it at 64 (a user whose items
         * are slow does not hold 8192 of them). */
        ck_assert_uint_eq(grow_run(CALM, flags, 0), 1 + 64);
    }
}
END_TEST

static Suite *map_suite(void)
{
    Suite *s = suite_create("map");
    TCase *tc;

    tc = tcase_create("options");
    tcase_add_test(tc, test_map_invalid_options);
    tcase_add_test(tc, test_map_wrong_thread);
    suite_add_tcase(s, tc);

    tc = tcase_create("empty");
    tcase_add_test(tc, test_map_empty_input);
    suite_add_tcase(s, tc);

    tc = tcase_create("order");
    tcase_add_test(tc, test_map_ordered_pool);
    tcase_add_test(tc, test_map_unordered_pool);
    tcase_add_test(tc, test_map_order_call);
    suite_add_tcase(s, tc);

    tc = tcase_create("bounds");
    tcase_add_test(tc, test_map_limit_call);
    tcase_add_test(tc, test_map_limit_pool);
    tcase_add_test(tc, test_map_window_call);
    tcase_add_test(tc, test_map_window_pool);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, test_map_errors_keep_going);
    tcase_add_test(tc, test_map_errors_stop_call);
    tcase_add_test(tc, test_map_errors_stop_pool);
    tcase_add_test(tc, test_map_submit_refused);
    tcase_add_test(tc, test_map_pool_freed_mid_stream);
    suite_add_tcase(s, tc);

    tc = tcase_create("iterator");
    tcase_add_test(tc, test_map_iterator_fails);
    tcase_add_test(tc, test_map_iterator_fails_at_once);
    tcase_add_test(tc, test_map_iterator_fails_then_item);
    suite_add_tcase(s, tc);

    tc = tcase_create("cancel");
    tcase_add_test(tc, test_map_cancel_mid_stream);
    tcase_add_test(tc, test_map_cancel_with_held_items);
    tcase_add_test(tc, test_map_cancel_done_waits);
    tcase_add_test(tc, test_map_cancel_from_next);
    tcase_add_test(tc, test_map_timeout_done);
    suite_add_tcase(s, tc);

    tc = tcase_create("lifecycle");
    tcase_add_test(tc, test_map_stats_and_done_value);
    tcase_add_test(tc, test_map_free_from_done);
    tcase_add_test(tc, test_map_free_from_done_pool);
    tcase_add_test(tc, test_map_no_on_result);
    suite_add_tcase(s, tc);

    tc = tcase_create("run");
    tcase_add_test(tc, test_map_run_work_arg);
    tcase_add_test(tc, test_map_run_failure_code);
    tcase_add_test(tc, test_map_run_stopped);
    tcase_add_test(tc, test_map_no_readahead);
    suite_add_tcase(s, tc);

    tc = tcase_create("readahead");
    tcase_add_test(tc, test_map_readahead_adapts);
    tcase_add_test(tc, test_map_readahead_huge_cap);
    tcase_add_test(tc, test_map_readahead_cap_too_big);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(s, tc);

    tc = tcase_create("stack");
    tcase_add_test(tc, test_map_sync_small_stack);
    tcase_set_timeout(tc, 600);
    suite_add_tcase(s, tc);

    tc = tcase_create("memory");
    tcase_add_test(tc, test_map_constant_memory_call);
    tcase_add_test(tc, test_map_constant_memory_call_wait);
    tcase_add_test(tc, test_map_constant_memory_pool);
    tcase_set_timeout(tc, 900);
    suite_add_tcase(s, tc);

    return s;
}

TU_MAIN(map_suite)
