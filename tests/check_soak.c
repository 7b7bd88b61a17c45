/* SPDX-License-Identifier: MIT */
/* Check soak test: a long backlog through a bounded pool, with failures
 * and cancellations, where every item fires exactly once. */
#include <check.h>
#include <inttypes.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "deferred.h"
#include "testutil.h"

/*
 * The backlog is endless in spirit: items are made on demand, never more
 * than WINDOW at a time, and each one is either gated by a semaphore of
 * TOKENS (df_sem_run_in_pool) or submitted straight to the pool (one in
 * five).  Per item, decided by a hash of its index: its work fails (3%),
 * returns a value that owns memory (10%, so that destructors are counted),
 * or returns a plain value; the driver cancels random items in flight.
 *
 * Checked: each item's callback runs exactly once (a bitmap), with the
 * outcome its kind and the cancellations predict; at most TOKENS gated
 * items and THREADS items run at once; every value's destructor runs
 * once; the loop's live blocks stay under a bound set by the window, not
 * by the number of items; at the end nothing is left allocated.
 *
 * Sizes: DF_SOAK_ITEMS=N, or DF_TEST_LONG=1 for 10^7; 2*10^5 by default
 * and 2*10^4 under valgrind or DF_TEST_QUICK.
 */
#define WINDOW 256
#define TOKENS 3
#define THREADS 4

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

enum kind { K_OK, K_OWNED, K_FAIL };

static enum kind kind_of(uint64_t i)
{
    unsigned r = (unsigned)(mix(i) % 100);
    return r < 3 ? K_FAIL : r < 13 ? K_OWNED : K_OK;
}

static bool gated(uint64_t i)
{
    return (mix(i ^ UINT64_C(0x5bd1e995)) % 5) != 0;
}

/* Counters shared with the workers. */
static atomic_int running_gated, running_all;
static atomic_int peak_gated, peak_all;
static atomic_long owned_made, owned_freed;

static void raise_peak(atomic_int *peak, int v)
{
    int p = atomic_load(peak);
    while (v > p && !atomic_compare_exchange_weak(peak, &p, v))
        ;
}

static void owned_free(void *p)
{
    atomic_fetch_add(&owned_freed, 1);
    free(p);
}

typedef struct soak soak;
typedef struct slot {
    soak *s;
    uint64_t item;
    df_deferred *d;
    bool busy;
    bool cancelled; /* the driver cancelled it before it fired */
} slot;

struct soak {
    df_loop *loop;
    df_pool *pool;
    df_sem *sem;
    uint64_t n, submitted, done;
    uint64_t ok, failed, cancelled;
    unsigned char *fired; /* one bit per item */
    slot slots[WINDOW];
    unsigned free_slots[WINDOW];
    unsigned nfree;
    uint64_t rng;
};

static df_result soak_work(df_work *w, void *arg)
{
    (void)w;
    uint64_t i = (uint64_t)(uintptr_t)arg;
    bool g = gated(i);
    if (g)
        raise_peak(&peak_gated, atomic_fetch_add(&running_gated, 1) + 1);
    raise_peak(&peak_all, atomic_fetch_add(&running_all, 1) + 1);

    uint64_t h = i; /* a little CPU work */
    for (int k = 0; k < 64; k++)
        h = mix(h + (uint64_t)k);

    df_result r;
    switch (kind_of(i)) {
    case K_FAIL:
        r = df_errf(df_work_loop(w), DF_EFAILED, "item %" PRIu64, i);
        break;
    case K_OWNED: {
        uint64_t *v = malloc(sizeof *v);
        if (v == NULL) {
            r = df_errf(df_work_loop(w), DF_ENOMEM, "item %" PRIu64, i);
            break;
        }
        *v = h;
        atomic_fetch_add(&owned_made, 1);
        r = df_ok(v, owned_free);
        break;
    }
    default:
        r = df_ok((void *)(uintptr_t)h, NULL);
        break;
    }
    atomic_fetch_sub(&running_all, 1);
    if (g)
        atomic_fetch_sub(&running_gated, 1);
    return r;
}

static uint64_t expected_value(uint64_t i)
{
    uint64_t h = i;
    for (int k = 0; k < 64; k++)
        h = mix(h + (uint64_t)k);
    return h;
}

static df_result soak_done(df_result r, void *arg)
{
    slot *sl = arg;
    soak *s = sl->s;
    uint64_t i = sl->item;
    ck_assert_msg(!(s->fired[i / 8] & (1u << (i % 8))),
                  "item %" PRIu64 " fired twice", i);
    s->fired[i / 8] |= (unsigned char)(1u << (i % 8));

    if (r.failure != NULL) {
        int code = df_failure_code(r.failure);
        if (sl->cancelled) {
            ck_assert_msg(code == DF_ECANCELLED,
                          "cancelled item %" PRIu64 " failed with %s", i,
                          df_err_name(code));
            s->cancelled++;
        } else {
            ck_assert_msg(code == DF_EFAILED && kind_of(i) == K_FAIL,
                          "item %" PRIu64 " failed with %s", i,
                          df_err_name(code));
            s->failed++;
        }
    } else {
        ck_assert_msg(!sl->cancelled, "cancelled item %" PRIu64 " succeeded",
                      i);
        ck_assert(kind_of(i) != K_FAIL);
        uint64_t v = kind_of(i) == K_OWNED ? *(uint64_t *)r.value
                                           : (uint64_t)(uintptr_t)r.value;
        ck_assert_msg(v == expected_value(i), "item %" PRIu64 " wrong value",
                      i);
        s->ok++;
    }
    df_result_clear(&r);

    /* The slot goes back; dropping our reference from inside the chain
     * is allowed (the library holds its own while running it). */
    df_deferred_unref(sl->d);
    sl->d = NULL;
    sl->busy = false;
    s->free_slots[s->nfree++] = (unsigned)(sl - s->slots);
    s->done++;
    return df_ok(NULL, NULL);
}

static uint64_t next_rand(soak *s)
{
    s->rng = s->rng * UINT64_C(6364136223846793005) + 1442695040888963407u;
    return s->rng >> 33;
}

/* Submits items until the window is full or the backlog is done. */
static void refill(soak *s)
{
    while (s->nfree > 0 && s->submitted < s->n) {
        unsigned k = s->free_slots[--s->nfree];
        slot *sl = &s->slots[k];
        uint64_t i = s->submitted++;
        *sl = (slot){s, i, NULL, true, false};
        void *arg = (void *)(uintptr_t)i;
        if (gated(i))
            TU_OK(df_sem_run_in_pool(s->sem, s->pool, soak_work, arg, &sl->d));
        else
            TU_OK(df_pool_submit(s->pool, soak_work, arg, &sl->d));
        /* soak_done may run (and drop the slot's reference) inside the
         * add only if the deferred fired already, which it cannot have. */
        TU_OK(df_deferred_add_both(sl->d, soak_done, sl));
    }
}

/* Cancels a few random items in flight: about 1 in 50 submissions. */
static void cancel_some(soak *s)
{
    unsigned tries = (unsigned)(WINDOW - s->nfree) / 50 + 1;
    for (unsigned t = 0; t < tries; t++) {
        if (next_rand(s) % 3 != 0)
            continue;
        slot *sl = &s->slots[next_rand(s) % WINDOW];
        if (!sl->busy || sl->cancelled)
            continue;
        sl->cancelled = true;
        /* May run soak_done (and free the slot) before it returns. */
        TU_OK(df_deferred_cancel(sl->d));
    }
}

/* No completion for this long while items are in flight: one was lost. */
#define STALL_MS 60000

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Fails, naming some of the items in flight that never fired. */
static void stalled(soak *s)
{
    char buf[256];
    int len = 0;
    unsigned busy = 0;
    for (unsigned k = 0; k < WINDOW; k++) {
        if (!s->slots[k].busy)
            continue;
        if (busy++ < 8 && len < (int)sizeof buf - 32)
            len += snprintf(buf + len, sizeof buf - (size_t)len,
                            " %" PRIu64 "%s", s->slots[k].item,
                            s->slots[k].cancelled ? "(cancelled)" : "");
    }
    buf[len] = '\0';
    ck_abort_msg("no completion for %d s with %u items in flight:%s",
                 STALL_MS / 1000, busy, buf);
}

static uint64_t soak_items(void)
{
    const char *e = getenv("DF_SOAK_ITEMS");
    if (e != NULL && *e != '\0')
        return strtoull(e, NULL, 10);
    if (getenv("DF_TEST_LONG") != NULL)
        return 10000000;
    if (RUNNING_ON_VALGRIND || getenv("DF_TEST_QUICK") != NULL)
        return 20000;
    return 200000;
}

START_TEST(test_soak_backlog)
{
    tu_counting_alloc ca = {0};
    df_allocator a = {tu_ca_malloc, tu_ca_realloc, tu_ca_free, &ca};
    df_loop_options o = DF_LOOP_OPTIONS_INIT;
    o.allocator = &a;

    soak *s = calloc(1, sizeof *s);
    ck_assert_ptr_nonnull(s);
    s->n = soak_items();
    s->rng = 42;
    s->fired = calloc((size_t)(s->n / 8 + 1), 1);
    ck_assert_ptr_nonnull(s->fired);
    for (unsigned k = 0; k < WINDOW; k++)
        s->free_slots[s->nfree++] = WINDOW - 1 - k;

    TU_OK(df_loop_new(&o, &s->loop));
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = THREADS;
    TU_OK(df_pool_new(s->loop, &po, &s->pool));
    TU_OK(df_sem_new(s->loop, TOKENS, &s->sem));

    /* Memory is flat if the loop's live blocks never exceed what the
     * window can hold, on top of what the setup made.  An item in flight
     * holds at most a deferred block, a job node and a failure, and the
     * caches keep no more blocks of a kind than were once in use at the
     * same time, so each kind stays within WINDOW blocks, in use or
     * cached.  A block leaked per 10^4 items breaks this at 10^7 items; a
     * leak of any size shows in the count after teardown. */
    long base = atomic_load(&ca.live);
    long bound = base + 3 * WINDOW, peak = base;
    int fd = df_loop_fd(s->loop);
    uint64_t last_done = 0, last_progress = now_ms();
    while (s->done < s->n) {
        refill(s);
        cancel_some(s);
        unsigned ran = 0;
        TU_OK(df_loop_dispatch(s->loop, 0, &ran));
        long live = atomic_load(&ca.live);
        if (live > peak)
            peak = live;
        ck_assert_uint_le(df_sem_tokens(s->sem), TOKENS);
        if (s->done != last_done) {
            last_done = s->done;
            last_progress = now_ms();
        } else if (now_ms() - last_progress > STALL_MS) {
            stalled(s); /* fails */
        }
        if (ran == 0 && s->done < s->n) {
            /* Never sleep long: a lost completion must fail, not hang. */
            int ms = df_loop_timeout_ms(s->loop);
            struct pollfd pfd = {fd, POLLIN, 0};
            (void)poll(&pfd, 1, ms < 0 || ms > 1000 ? 1000 : ms);
        }
    }

    ck_assert_uint_eq(s->ok + s->failed + s->cancelled, s->n);
    for (uint64_t i = 0; i < s->n; i++)
        ck_assert_msg(s->fired[i / 8] & (1u << (i % 8)),
                      "item %" PRIu64 " never fired", i);
    ck_assert_int_le(atomic_load(&peak_gated), TOKENS);
    ck_assert_msg(peak <= bound,
                  "live blocks grew: peak %ld, bound %ld (setup %ld)", peak,
                  bound, base);

    TU_OK(df_sem_free(s->sem));
    TU_OK(df_pool_shutdown(s->pool, DF_POOL_DRAIN));
    df_pool_free(s->pool);
    TU_OK(df_loop_run(s->loop));
    TU_OK(df_loop_free(s->loop));
    ck_assert_int_eq(atomic_load(&ca.live), 0);
    ck_assert_int_eq(atomic_load(&owned_made), atomic_load(&owned_freed));

    printf("soak: %" PRIu64 " items: %" PRIu64 " ok, %" PRIu64
           " failed, %" PRIu64 " cancelled; peak running %d gated (limit "
           "%d), %d in all (%d threads); live blocks: %ld after setup, "
           "peak %ld, bound %ld\n",
           s->n, s->ok, s->failed, s->cancelled, atomic_load(&peak_gated),
           TOKENS, atomic_load(&peak_all), THREADS, base, peak, bound);
    if (s->n >= 10000) { /* the mix really had both */
        ck_assert_uint_gt(s->cancelled, 0);
        ck_assert_uint_gt(s->failed, 0);
    }
    free(s->fired);
    free(s);
}
END_TEST

static Suite *soak_suite(void)
{
    Suite *s = suite_create("soak");
    TCase *tc = tcase_create("backlog");
    tcase_set_timeout(tc, 1800);
    tcase_add_test(tc, test_soak_backlog);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(soak_suite)
