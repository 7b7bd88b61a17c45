/* SPDX-License-Identifier: MIT */
/* The MPI pool's tests: one scenario per run, every rank, under mpirun. */
#include <deferred-mpi.h>

#include "mpi/mpi-internal.h"

#include <dirent.h>
#include <inttypes.h>
#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

/*
 * usage: mpi-test SCENARIO   (every rank runs the same; tests/mpi.test
 * starts each scenario with mpirun -np 3 --oversubscribe)
 *
 *   main     map vs thread pool, limits, exactly once, failures, cancels,
 *            bad inputs, drain shutdown, idle CPU (workers: 2 threads,
 *            the pool mode)
 *   main1    the same with workers of 1 thread (the inline mode: items
 *            run on the worker's main thread)
 *   cshut    shutdown with DF_POOL_CANCEL while items run and wait,
 *            within 10 s (the items would run 20 s)
 *   cshut1   the same, inline workers
 *   cshut1p  the same, workers of 1 thread with DF_MPI_NO_INLINE
 *   badflags (5 ranks) rank 1 asks for DF_MPI_INLINE with 2 threads,
 *            rank 2 for an unknown flag, rank 3 for DF_MPI_INLINE |
 *            DF_MPI_NO_INLINE: DF_EINVAL; rank 4 for DF_MPI_INLINE with
 *            1 thread, valid: DF_ESTATE, as the master
 *   table    rank 2 registers one name more: DF_MPI_ETABLE everywhere
 *   table1   the same, inline workers (the sentry started, then stopped)
 *   noname   DF_MPI_NO_TABLE_CHECK and a name only rank 0 knows
 *   thread   MPI initialised with MPI_THREAD_FUNNELED: DF_MPI_ETHREAD_LEVEL
 *   early    the master finalizes without a pool: workers get DF_ESTATE
 *   early1   the same, inline workers
 *   fin      a work function calls df_mpi_finalize(): DF_EBUSY, and the
 *            run goes on (pool workers)
 *   fin1     the same, inline workers (the function on the MPI thread)
 *
 * Scenarios main and main1 also check that the library's threads (the
 * master's progress thread, the inline worker's sentry) block every
 * asynchronous signal (Linux: /proc/self/task).
 *
 * Check is not used: its forking mode and MPI do not mix, and one MPI
 * process runs one scenario.  Each failed check prints a line; every rank
 * ends with "mpi-test: rank R: PASS" or "... FAIL" and the exit status.
 * Plain C with a counter of failures: no test here can pass without its
 * checks having run, since each scenario also checks how many ran.
 */

static int failures;
static int rank_ = -1;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            failures++;                                                        \
            fprintf(stderr, "mpi-test: rank %d: %s:%d: check failed: %s: ",   \
                    rank_, __FILE__, __LINE__, #cond);                         \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, "\n");                                             \
        }                                                                      \
    } while (0)

#define OK(expr)                                                               \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        CHECK(rc_ == 0, "%s returned %d (%s)", #expr, rc_,                     \
              df_mpi_err_name(rc_));                                           \
    } while (0)

/* ------------------------------------------------------- work functions */

/* The item kernel: xorshift64 steps from a scrambled seed (as bench/). */
static uint64_t kernel(uint64_t i, unsigned iters)
{
    uint64_t x = i * UINT64_C(0x9E3779B97F4A7C15) + 1;
    if (x == 0)
        x = 1;
    for (unsigned k = 0; k < iters; k++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

#define FAIL_EVERY 97
#define FAIL_CODE (-5005)

/* One item's outcome, whoever computed it: the code, the message and the
 * value.  Item i % FAIL_EVERY == 5 fails on purpose. */
static int item_outcome(int64_t i, int64_t iters, uint64_t *value,
                        char *msg, size_t cap)
{
    if (i % FAIL_EVERY == 5) {
        snprintf(msg, cap, "item %" PRId64 " refused on purpose", i);
        return FAIL_CODE;
    }
    *value = kernel((uint64_t)i, (unsigned)iters);
    return 0;
}

static atomic_int running_here; /* items inside fn_xorshift on this rank */
static atomic_int max_running_here;
/* Where the work functions ran: on the thread that called
 * df_mpi_worker_run (inline mode) or on others (pool mode). */
static pthread_t worker_main;
static atomic_int ran_on_main, ran_elsewhere;

static void note_thread(void)
{
    if (pthread_equal(pthread_self(), worker_main))
        atomic_fetch_add(&ran_on_main, 1);
    else
        atomic_fetch_add(&ran_elsewhere, 1);
}

/* "xorshift": input two int64 (i, iters), output one int64. */
static int fn_xorshift(df_mpi_task *t, const void *in, size_t len, void *arg)
{
    (void)arg;
    note_thread();
    int n = atomic_fetch_add(&running_here, 1) + 1;
    int m = atomic_load(&max_running_here);
    while (n > m && !atomic_compare_exchange_weak(&max_running_here, &m, n))
        ;
    int64_t v[2];
    int rc;
    if (df_mpi_decode_i64(in, len, v, 2) != 2) {
        rc = df_mpi_task_fail(t, DF_EINVAL, "xorshift wants 2 int64");
    } else {
        uint64_t value = 0;
        char msg[128];
        rc = item_outcome(v[0], v[1], &value, msg, sizeof msg);
        if (rc != 0) {
            df_mpi_task_fail(t, rc, "%s", msg);
        } else {
            int64_t out = (int64_t)value;
            void *o = df_mpi_task_output(t, 8);
            if (o == NULL)
                rc = DF_ENOMEM;
            else
                df_mpi_encode_i64(&out, 1, o);
        }
    }
    atomic_fetch_sub(&running_here, 1);
    return rc;
}

/* "echo": output = input. */
static int fn_echo(df_mpi_task *t, const void *in, size_t len, void *arg)
{
    (void)arg;
    note_thread();
    return df_mpi_task_reply(t, in, len);
}

/* "big": output of the int64 length given. */
static int fn_big(df_mpi_task *t, const void *in, size_t len, void *arg)
{
    (void)arg;
    int64_t n;
    if (df_mpi_decode_i64(in, len, &n, 1) != 1)
        return DF_EINVAL;
    void *o = df_mpi_task_output(t, (size_t)n);
    if (o == NULL)
        return DF_MPI_ETOOBIG; /* the library fails it so anyway */
    memset(o, 7, (size_t)n);
    return 0;
}

/* "slow": runs until cancelled (at most 20 s), then fails with
 * DF_ECANCELLED, or returns "late". */
static int fn_slow(df_mpi_task *t, const void *in, size_t len, void *arg)
{
    (void)in, (void)len, (void)arg;
    note_thread();
    for (int k = 0; k < 20000; k++) {
        if (df_mpi_task_cancelled(t))
            return df_mpi_task_fail(t, DF_ECANCELLED, "slow saw its cancel");
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return df_mpi_task_reply(t, "late", 4);
}

static int fn_sigmask(df_mpi_task *t, const void *in, size_t len, void *arg);

static void register_common(df_mpi *ctx)
{
    OK(df_mpi_register(ctx, "xorshift", fn_xorshift, NULL));
    OK(df_mpi_register(ctx, "echo", fn_echo, NULL));
    OK(df_mpi_register(ctx, "big", fn_big, NULL));
    OK(df_mpi_register(ctx, "slow", fn_slow, NULL));
    OK(df_mpi_register(ctx, "sigmask", fn_sigmask, NULL));
}

/* The blocked-signal mask (SigBlk in /proc) of the threads of this
 * process named `name`, in *mask when exactly one is found; returns how
 * many were found, -1 without /proc. */
static int thread_sigblk(const char *name, uint64_t *mask)
{
    DIR *dir = opendir("/proc/self/task");
    if (dir == NULL)
        return -1;
    int found = 0;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char path[300], line[256];
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", de->d_name);
        FILE *f = fopen(path, "r");
        if (f == NULL)
            continue;
        bool same = fgets(line, sizeof line, f) != NULL &&
                    strncmp(line, name, strlen(name)) == 0 &&
                    line[strlen(name)] == '\n';
        fclose(f);
        if (!same)
            continue;
        snprintf(path, sizeof path, "/proc/self/task/%s/status", de->d_name);
        f = fopen(path, "r");
        if (f == NULL)
            continue;
        while (fgets(line, sizeof line, f) != NULL) {
            unsigned long long m;
            if (sscanf(line, "SigBlk: %llx", &m) == 1) {
                *mask = m;
                found++;
            }
        }
        fclose(f);
    }
    closedir(dir);
    return found;
}

/* True if `mask` blocks the usual asynchronous signals. */
static bool blocks_async(uint64_t mask)
{
    static const int sigs[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1,
                               SIGUSR2, SIGCHLD, SIGALRM, SIGPIPE};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        if (!(mask & (UINT64_C(1) << (sigs[i] - 1))))
            return false;
    return true;
}

/* "sigmask": the SigBlk mask of this rank's sentry thread as one int64,
 * or -(threads found) when there is not exactly one (pool mode: none). */
static int fn_sigmask(df_mpi_task *t, const void *in, size_t len, void *arg)
{
    (void)in, (void)len, (void)arg;
    note_thread();
    uint64_t mask = 0;
    int n = thread_sigblk("df-mpi-sentry", &mask);
    int64_t v = n == 1 ? (int64_t)(mask & INT64_MAX)
                 : n < 0 ? -1000 : -(int64_t)(n + 1);
    return df_mpi_task_reply(t, &v, sizeof v);
}

/* "fin": calls df_mpi_finalize() from the work function (not allowed
 * while the worker runs: DF_EBUSY) and returns its code as one int64. */
static df_mpi *ctx_;

static int fn_fin(df_mpi_task *t, const void *in, size_t len, void *arg)
{
    (void)in, (void)len, (void)arg;
    note_thread();
    int64_t v = df_mpi_finalize(ctx_);
    return df_mpi_task_reply(t, &v, sizeof v);
}

/* ------------------------------------------------------------- helpers */

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static double wall_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A recorded outcome of a deferred. */
typedef struct outcome {
    int fired;     /* times the callback pair ran */
    int code;      /* 0 or the failure's code */
    char msg[160];
    df_mpi_buf *buf; /* the value, owned here */
    int order;     /* global firing order */
} outcome;

static int fire_seq;

static df_result record(df_result r, void *arg)
{
    outcome *o = arg;
    o->fired++;
    o->order = ++fire_seq;
    if (r.failure != NULL) {
        o->code = df_failure_code(r.failure);
        snprintf(o->msg, sizeof o->msg, "%s", df_failure_message(r.failure));
        df_result_clear(&r);
    } else {
        o->code = 0;
        o->buf = r.value;
        r.free = NULL; /* moved to the outcome */
        r = df_ok(NULL, NULL);
    }
    return r;
}

static void watch(df_deferred *d, outcome *o)
{
    OK(df_deferred_add_both(d, record, o));
    df_deferred_unref(d);
}

static void run_until(df_loop *loop, df_deferred *d)
{
    int rc = df_loop_run_until(loop, d);
    CHECK(rc == 0, "df_loop_run_until: %s", df_mpi_err_name(rc));
}

/* A timer that fires a deferred (to wait on the loop). */
static void fire_later(void *arg, int status)
{
    (void)status;
    df_deferred_callback(arg, NULL, NULL);
}

static void sleep_loop(df_loop *loop, uint64_t ns)
{
    df_deferred *d;
    OK(df_deferred_new(loop, &d));
    OK(df_loop_call_later(loop, ns, fire_later, d, NULL));
    run_until(loop, d);
    df_deferred_unref(d);
}

/* ----------------------------------------------------------- the map */

#define MAP_N 3000
#define MAP_ITERS 3000
#define MAP_LIMIT 6

typedef struct mapstate {
    uint64_t next_i;
    uint64_t n;
    int delivered[MAP_N];
    int code[MAP_N];
    uint64_t value[MAP_N];
    char msg[MAP_N][64];
    uint64_t in_flight, max_in_flight; /* pulled, not delivered */
    df_mpi_pool *pool;
    uint64_t max_pool_outstanding;
} mapstate;

static int map_next_mpi(void *arg, void **item, df_free_fn *item_free)
{
    mapstate *s = arg;
    if (s->next_i == s->n)
        return 0;
    int64_t v[2] = {(int64_t)s->next_i++, MAP_ITERS};
    df_mpi_buf *b = df_mpi_buf_from_i64(v, 2);
    if (b == NULL)
        return DF_ENOMEM;
    *item = b;
    *item_free = df_mpi_buf_free;
    if (++s->in_flight > s->max_in_flight)
        s->max_in_flight = s->in_flight;
    if (s->pool != NULL) {
        df_mpi_pool_stats st;
        df_mpi_pool_get_stats(s->pool, &st);
        if (st.outstanding > s->max_pool_outstanding)
            s->max_pool_outstanding = st.outstanding;
    }
    return 1;
}

static void map_result_mpi(uint64_t index, void *item, df_result r,
                           void *arg)
{
    mapstate *s = arg;
    (void)item;
    s->in_flight--;
    if (index >= s->n) {
        CHECK(0, "index %" PRIu64 " out of range", index);
        df_result_clear(&r);
        return;
    }
    s->delivered[index]++;
    if (r.failure != NULL) {
        s->code[index] = df_failure_code(r.failure);
        snprintf(s->msg[index], sizeof s->msg[index], "%s",
                 df_failure_message(r.failure));
    } else {
        df_mpi_buf *b = r.value;
        int64_t v = 0;
        CHECK(df_mpi_decode_i64(b->data, b->len, &v, 1) == 1,
              "reply of %zu bytes", b->len);
        s->code[index] = 0;
        s->value[index] = (uint64_t)v;
    }
    df_result_clear(&r);
}

/* The thread pool's side of the comparison: the same outcome function. */
static int map_next_local(void *arg, void **item, df_free_fn *item_free)
{
    mapstate *s = arg;
    (void)item_free;
    if (s->next_i == s->n)
        return 0;
    *item = (void *)(uintptr_t)s->next_i++;
    return 1;
}

static df_result local_work(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    uint64_t value = 0;
    char msg[128];
    int rc = item_outcome((int64_t)(uintptr_t)item, MAP_ITERS, &value, msg,
                          sizeof msg);
    if (rc != 0)
        return df_errf(df_work_loop(w), rc, "%s", msg);
    return df_ok((void *)(uintptr_t)value, NULL);
}

static void map_result_local(uint64_t index, void *item, df_result r,
                             void *arg)
{
    mapstate *s = arg;
    (void)item;
    s->delivered[index]++;
    if (r.failure != NULL) {
        s->code[index] = df_failure_code(r.failure);
        snprintf(s->msg[index], sizeof s->msg[index], "%s",
                 df_failure_message(r.failure));
    } else {
        s->code[index] = 0;
        s->value[index] = (uint64_t)(uintptr_t)r.value;
    }
    df_result_clear(&r);
}

static df_result drop_stats(df_result r, void *arg)
{
    (void)arg;
    return r;
}

static void test_map(df_loop *loop, df_mpi_pool *pool)
{
    static mapstate mpi, local;
    memset(&mpi, 0, sizeof mpi);
    memset(&local, 0, sizeof local);
    mpi.n = local.n = MAP_N;
    mpi.pool = pool;

    df_map_options o = {0};
    o.limit = MAP_LIMIT;
    o.next = map_next_mpi;
    o.next_arg = &mpi;
    o.on_result = map_result_mpi;
    o.arg = &mpi;
    df_map *m;
    df_deferred *done;
    OK(df_mpi_map_start(pool, "xorshift", &o, &m, &done));
    OK(df_deferred_add_both(done, drop_stats, NULL));
    run_until(loop, done);
    df_deferred_unref(done);
    OK(df_map_free(m));

    df_pool *tp;
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    OK(df_pool_new(loop, &po, &tp));
    df_map_options lo = {0};
    lo.limit = MAP_LIMIT;
    lo.next = map_next_local;
    lo.next_arg = &local;
    lo.pool = tp;
    lo.work = local_work;
    lo.on_result = map_result_local;
    lo.arg = &local;
    OK(df_map_start(loop, &lo, &m, &done));
    run_until(loop, done);
    df_deferred_unref(done);
    OK(df_map_free(m));
    OK(df_pool_shutdown(tp, DF_POOL_DRAIN));
    df_pool_free(tp);

    int same = 0, failed = 0;
    for (int i = 0; i < MAP_N; i++) {
        CHECK(mpi.delivered[i] == 1, "mpi item %d delivered %d times", i,
              mpi.delivered[i]);
        CHECK(local.delivered[i] == 1, "local item %d delivered %d times", i,
              local.delivered[i]);
        CHECK(mpi.code[i] == local.code[i], "item %d: code %d vs %d", i,
              mpi.code[i], local.code[i]);
        if (mpi.code[i] == 0 && local.code[i] == 0) {
            CHECK(mpi.value[i] == local.value[i], "item %d: value differs",
                  i);
            same += mpi.value[i] == local.value[i];
        } else {
            CHECK(strcmp(mpi.msg[i], local.msg[i]) == 0,
                  "item %d: message '%s' vs '%s'", i, mpi.msg[i],
                  local.msg[i]);
            failed++;
        }
    }
    CHECK(failed == (MAP_N - 5 + FAIL_EVERY - 1) / FAIL_EVERY,
          "%d failures", failed);
    CHECK(same + failed == MAP_N, "%d same + %d failed", same, failed);
    df_mpi_pool_stats st;
    OK(df_mpi_pool_get_stats(pool, &st));
    CHECK(mpi.max_in_flight <= MAP_LIMIT && mpi.max_in_flight >= 2,
          "map in flight %" PRIu64, mpi.max_in_flight);
    CHECK(st.max_outstanding <= MAP_LIMIT, "pool outstanding max %" PRIu64,
          st.max_outstanding);
    CHECK(st.max_sent <= MAP_LIMIT && st.max_sent <= st.credit,
          "sent max %" PRIu64 " credit %u", st.max_sent, st.credit);
    CHECK(st.outstanding == 0 && st.sent == 0 && st.queued == 0,
          "left over: %" PRIu64 " %" PRIu64 " %" PRIu64, st.outstanding,
          st.sent, st.queued);
    printf("mpi-test: map: %d items, %d same as the thread pool, %d failed "
           "alike; max in flight %" PRIu64 " (limit %d), max sent %" PRIu64
           " (credit %u)\n",
           MAP_N, same, failed, st.max_outstanding, MAP_LIMIT, st.max_sent,
           st.credit);
}

/* ----------------------------------------------------------- sem run */

static void test_sem(df_loop *loop, df_mpi_pool *pool)
{
    enum { N = 200, LIMIT = 3 };
    static outcome out[N];
    memset(out, 0, sizeof out);
    df_mpi_pool_stats before, after;
    OK(df_mpi_pool_get_stats(pool, &before));
    df_sem *s;
    OK(df_sem_new(loop, LIMIT, &s));
    for (int i = 0; i < N; i++) {
        int64_t v[2] = {1000 + i, 100};
        unsigned char in[16];
        df_mpi_encode_i64(v, 2, in);
        df_deferred *d;
        OK(df_mpi_sem_run(s, pool, "xorshift", in, sizeof in, &d));
        watch(d, &out[i]);
    }
    df_loop_run(loop);
    OK(df_mpi_pool_get_stats(pool, &after));
    for (int i = 0; i < N; i++) {
        CHECK(out[i].fired == 1, "sem item %d fired %d", i, out[i].fired);
        int64_t got = 0;
        uint64_t want = 0;
        char msg[128];
        int code = item_outcome(1000 + i, 100, &want, msg, sizeof msg);
        CHECK(out[i].code == code, "sem item %d code %d", i, out[i].code);
        if (code == 0 && out[i].buf != NULL) {
            df_mpi_decode_i64(out[i].buf->data, out[i].buf->len, &got, 1);
            CHECK((uint64_t)got == want, "sem item %d value", i);
        }
        df_mpi_buf_free(out[i].buf);
    }
    CHECK(after.submitted - before.submitted == N, "submitted %" PRIu64,
          after.submitted - before.submitted);
    /* This runs first on a fresh pool, so the pool's maximum is this
     * test's: never above the semaphore's limit, and reached. */
    CHECK(before.max_outstanding == 0, "not the first test");
    CHECK(after.max_outstanding == LIMIT, "at most %" PRIu64 " in flight, "
          "limit %d", after.max_outstanding, LIMIT);
    OK(df_sem_free(s));
    printf("mpi-test: sem_run: %d items through a semaphore of %d\n", N,
           LIMIT);
}

/* ------------------------------------------------------------- cancel */

static void cancel_later(void *arg, int status)
{
    (void)status;
    df_deferred_cancel(arg);
    df_deferred_unref(arg);
}

static void test_cancel(df_loop *loop, df_mpi_pool *pool)
{
    df_mpi_pool_stats st;
    OK(df_mpi_pool_get_stats(pool, &st));
    unsigned credit = st.credit;

    /* Fill every credit with "slow", then one more waits on the master. */
    enum { MAXS = 64 };
    static outcome slow[MAXS], queued, after;
    memset(slow, 0, sizeof slow);
    memset(&queued, 0, sizeof queued);
    memset(&after, 0, sizeof after);
    CHECK(credit >= 1 && credit < MAXS, "credit %u", credit);
    df_deferred *sd[MAXS];
    for (unsigned k = 0; k < credit; k++) {
        OK(df_mpi_submit(pool, "slow", NULL, 0, &sd[k]));
        df_deferred_ref(sd[k]);
        watch(sd[k], &slow[k]);
    }
    df_deferred *qd;
    OK(df_mpi_submit(pool, "slow", NULL, 0, &qd));
    OK(df_mpi_pool_get_stats(pool, &st));
    CHECK(st.queued == 1 && st.sent == credit, "queued %" PRIu64
          " sent %" PRIu64, st.queued, st.sent);
    /* Cancelling the queued one fails it at once. */
    df_deferred_ref(qd);
    watch(qd, &queued);
    df_deferred_cancel(qd);
    CHECK(queued.fired == 1 && queued.code == DF_ECANCELLED,
          "queued cancel: fired %d code %d", queued.fired, queued.code);
    df_deferred_unref(qd);

    /* Let them start, then cancel the running ones: each fires only once
     * its worker has answered. */
    sleep_loop(loop, 50000000);
    double t0 = wall_seconds();
    for (unsigned k = 0; k < credit; k++) {
        CHECK(slow[k].fired == 0, "slow %u fired early", k);
        df_deferred_cancel(sd[k]);
        CHECK(slow[k].fired == 0, "slow %u fired before its worker replied",
              k);
        CHECK(df_deferred_called(sd[k]) && df_deferred_paused(sd[k]),
              "slow %u not paused", k);
        df_deferred_unref(sd[k]);
    }
    df_loop_run(loop);
    double dt = wall_seconds() - t0;
    for (unsigned k = 0; k < credit; k++)
        CHECK(slow[k].fired == 1 && slow[k].code == DF_ECANCELLED,
              "slow %u: fired %d code %d", k, slow[k].fired, slow[k].code);
    /* The running ones see the cancel within DF_MPI__LONG_SLEEP_US (2 ms)
     * plus "slow"'s 1 ms between checks, in both modes; a loaded machine
     * adds its own delays, but nothing near the 20 s "slow" runs. */
    CHECK(dt < 1.0, "cancelling %u items took %.3f s", credit, dt);

    /* With a semaphore of one: the token comes back only after the
     * cancelled item's worker has answered, so "echo" runs after it. */
    df_sem *s;
    OK(df_sem_new(loop, 1, &s));
    static outcome first;
    memset(&first, 0, sizeof first);
    df_deferred *d1, *d2;
    OK(df_mpi_sem_run(s, pool, "slow", NULL, 0, &d1));
    OK(df_mpi_sem_run(s, pool, "echo", "hi", 2, &d2));
    df_deferred_ref(d1);
    OK(df_loop_call_later(loop, 50000000, cancel_later, d1, NULL));
    watch(d1, &first);
    watch(d2, &after);
    df_loop_run(loop);
    CHECK(first.fired == 1 && first.code == DF_ECANCELLED, "first %d %d",
          first.fired, first.code);
    CHECK(after.fired == 1 && after.code == 0 && after.buf != NULL &&
              after.buf->len == 2 && memcmp(after.buf->data, "hi", 2) == 0,
          "echo after cancel: fired %d code %d", after.fired, after.code);
    CHECK(first.order < after.order, "echo ran before the cancelled item");
    df_mpi_buf_free(after.buf);
    OK(df_sem_free(s));
    printf("mpi-test: cancel: queued fails at once, %u on workers fail "
           "after their worker replied (%.1f ms), semaphore token held "
           "until then\n", credit, dt * 1e3);
}

/* A worker that holds more items than threads sleeps up to
 * DF_MPI__LONG_SLEEP_US (2 ms) between looks at MPI, since only a cancel
 * can be urgent then: a cancel of an item queued on the worker must still
 * come back at once, not when a running item ends ("slow" runs 20 s). */
static void test_cancel_queued(df_loop *loop, df_mpi_pool *pool)
{
    df_mpi_pool_stats st;
    OK(df_mpi_pool_get_stats(pool, &st));
    unsigned credit = st.credit;
    enum { MAXS = 64 };
    static outcome slow[MAXS];
    memset(slow, 0, sizeof slow);
    CHECK(credit >= 2 && credit <= MAXS, "credit %u", credit);
    if (credit < 2 || credit > MAXS)
        return;
    df_deferred *sd[MAXS];
    for (unsigned k = 0; k < credit; k++) {
        OK(df_mpi_submit(pool, "slow", NULL, 0, &sd[k]));
        df_deferred_ref(sd[k]);
        watch(sd[k], &slow[k]);
    }
    /* Each worker has more credit than threads: the last item sent to a
     * rank is the last it received, queued behind running ones (in the
     * inline mode, behind the one its main thread runs, so only the
     * sentry can answer the cancel).  The last one submitted is such an
     * item on its rank.  Let every worker settle into its long sleep
     * first. */
    sleep_loop(loop, 100000000);
    unsigned last = credit - 1;
    double t0 = wall_seconds();
    df_deferred_cancel(sd[last]);
    while (slow[last].fired == 0 && wall_seconds() - t0 < 10.0)
        sleep_loop(loop, 1000000);
    double dt = wall_seconds() - t0;
    CHECK(slow[last].fired == 1 && slow[last].code == DF_ECANCELLED,
          "queued slow: fired %d code %d", slow[last].fired,
          slow[last].code);
    /* 2 ms is the documented bound; a loaded machine adds its own delays,
     * but nothing near the 20 s of a running item. */
    CHECK(dt < 1.0, "the cancel of a queued item took %.3f s", dt);
    for (unsigned k = 0; k < last; k++)
        CHECK(slow[k].fired == 0, "slow %u fired with no cancel", k);
    for (unsigned k = 0; k < credit; k++) {
        if (k != last)
            df_deferred_cancel(sd[k]);
        df_deferred_unref(sd[k]);
    }
    df_loop_run(loop);
    for (unsigned k = 0; k < credit; k++)
        CHECK(slow[k].fired == 1 && slow[k].code == DF_ECANCELLED,
              "slow %u: fired %d code %d", k, slow[k].fired, slow[k].code);
    printf("mpi-test: cancel of an item queued on a sleeping worker came "
           "back after %.1f ms\n", dt * 1e3);
}

/* --------------------------------------------------------- bad inputs */

static void test_bad(df_loop *loop, df_mpi_pool *pool, size_t max_bytes)
{
    static outcome big_in, big_out, noname, trunc, ok_after;
    memset(&big_in, 0, sizeof big_in);
    memset(&big_out, 0, sizeof big_out);
    memset(&noname, 0, sizeof noname);
    memset(&trunc, 0, sizeof trunc);
    memset(&ok_after, 0, sizeof ok_after);
    df_deferred *d;

    df_mpi_buf *b = df_mpi_buf_new(NULL, max_bytes + 1);
    CHECK(b != NULL, "buf");
    OK(df_mpi_submit(pool, "echo", b->data, b->len, &d));
    watch(d, &big_in);
    df_mpi_buf_free(b);

    int64_t n = (int64_t)max_bytes + 10;
    unsigned char in[8];
    df_mpi_encode_i64(&n, 1, in);
    OK(df_mpi_submit(pool, "big", in, 8, &d));
    watch(d, &big_out);

    OK(df_mpi_submit(pool, "nosuchname", NULL, 0, &d));
    watch(d, &noname);

    df_mpi__pool_truncate_next(pool, 3);
    OK(df_mpi_submit(pool, "echo", "abcdef", 6, &d));
    watch(d, &trunc);

    OK(df_mpi_submit(pool, "echo", "ok", 2, &d));
    watch(d, &ok_after);
    df_loop_run(loop);

    CHECK(big_in.fired == 1 && big_in.code == DF_MPI_ETOOBIG &&
              strstr(big_in.msg, "exceeds max_bytes") != NULL,
          "big input: %d %s '%s'", big_in.fired,
          df_mpi_err_name(big_in.code), big_in.msg);
    CHECK(big_out.fired == 1 && big_out.code == DF_MPI_ETOOBIG &&
              strstr(big_out.msg, "output of") != NULL,
          "big output: %d %s '%s'", big_out.fired,
          df_mpi_err_name(big_out.code), big_out.msg);
    CHECK(noname.fired == 1 && noname.code == DF_MPI_ENONAME &&
              strstr(noname.msg, "nosuchname") != NULL,
          "no name: %d %s '%s'", noname.fired, df_mpi_err_name(noname.code),
          noname.msg);
    CHECK(trunc.fired == 1 && trunc.code == DF_MPI_EPROTO &&
              strstr(trunc.msg, "truncated") != NULL,
          "truncated: %d %s '%s'", trunc.fired, df_mpi_err_name(trunc.code),
          trunc.msg);
    CHECK(ok_after.fired == 1 && ok_after.code == 0, "ok after bad: %d %d",
          ok_after.fired, ok_after.code);
    df_mpi_buf_free(ok_after.buf);
    printf("mpi-test: bad inputs: %s / %s / %s / %s\n",
           df_mpi_err_name(big_in.code), df_mpi_err_name(big_out.code),
           df_mpi_err_name(noname.code), df_mpi_err_name(trunc.code));
}

/* ------------------------------------------------------- idle, shutdown */

static void *submit_elsewhere(void *arg)
{
    df_mpi_pool *pool = arg;
    df_deferred *d = NULL;
    df_mpi_pool_stats st;
    static int rc[3];
    rc[0] = df_mpi_submit(pool, "echo", "x", 1, &d);
    rc[1] = df_mpi_pool_get_stats(pool, &st);
    rc[2] = df_mpi_pool_free(pool);
    return rc;
}

/* Another thread is refused, and nothing changes. */
static void test_wrong_thread(df_mpi_pool *pool)
{
    df_mpi_pool_stats before, after;
    OK(df_mpi_pool_get_stats(pool, &before));
    pthread_t t;
    void *res;
    OK(pthread_create(&t, NULL, submit_elsewhere, pool));
    OK(pthread_join(t, &res));
    int *rc = res;
    for (int k = 0; k < 3; k++)
        CHECK(rc[k] == DF_EWRONG_THREAD, "call %d from another thread: %s",
              k, df_mpi_err_name(rc[k]));
    OK(df_mpi_pool_get_stats(pool, &after));
    CHECK(after.submitted == before.submitted, "submitted changed");
}

static void test_idle(df_loop *loop)
{
    double c0 = cpu_seconds(), w0 = wall_seconds();
    sleep_loop(loop, 500000000);
    double c = cpu_seconds() - c0, w = wall_seconds() - w0;
    printf("mpi-test: idle master: %.1f%% of a core over %.2f s\n",
           100 * c / w, w);
    CHECK(c / w < 0.2, "the idle master used %.0f%% of a core", 100 * c / w);
}

static void test_drain(df_loop *loop, df_mpi_pool *pool)
{
    enum { N = 40 };
    static outcome out[N];
    memset(out, 0, sizeof out);
    for (int i = 0; i < N; i++) {
        int64_t v[2] = {i, 20000};
        unsigned char in[16];
        df_mpi_encode_i64(v, 2, in);
        df_deferred *d;
        OK(df_mpi_submit(pool, "xorshift", in, sizeof in, &d));
        watch(d, &out[i]);
    }
    df_deferred *done;
    OK(df_mpi_pool_shutdown(pool, DF_POOL_DRAIN, &done));
    df_deferred *d;
    int rc = df_mpi_submit(pool, "echo", NULL, 0, &d);
    CHECK(rc == DF_ESHUTDOWN, "submit after shutdown: %d", rc);
    CHECK(df_mpi_pool_free(pool) == DF_EBUSY, "free before done");
    run_until(loop, done);
    df_deferred_unref(done);
    int ok = 0;
    for (int i = 0; i < N; i++) {
        CHECK(out[i].fired == 1, "drain item %d fired %d", i, out[i].fired);
        ok += out[i].code == 0 || out[i].code == FAIL_CODE;
        df_mpi_buf_free(out[i].buf);
    }
    CHECK(ok == N, "drain: %d of %d", ok, N);
    printf("mpi-test: drain: %d items finished before the pool stopped\n", N);
}

/* ------------------------------------------------------------ scenarios */

/* The workers' options in this scenario. */
static unsigned worker_threads = 2, worker_flags;

/* The library's threads block the asynchronous signals: the master's
 * progress thread here, the inline workers' sentries (asked with
 * "sigmask"; pool workers have none). */
static void test_sigmask(df_loop *loop, df_mpi_pool *pool)
{
    uint64_t mask = 0;
    int n = thread_sigblk("df-mpi-progress", &mask);
    if (n < 0) {
        printf("mpi-test: no /proc/self/task: signal masks not checked\n");
        return;
    }
    CHECK(n == 1 && blocks_async(mask),
          "%d progress threads, mask %016" PRIx64, n, mask);
    bool inl = worker_threads == 1 && !(worker_flags & DF_MPI_NO_INLINE);
    enum { N = 4 };
    outcome out[N];
    memset(out, 0, sizeof out);
    for (int i = 0; i < N; i++) {
        df_deferred *d;
        OK(df_mpi_submit(pool, "sigmask", NULL, 0, &d));
        watch(d, &out[i]);
    }
    df_loop_run(loop);
    for (int i = 0; i < N; i++) {
        int64_t v = 0;
        CHECK(out[i].fired == 1 && out[i].code == 0 && out[i].buf != NULL &&
                  out[i].buf->len == sizeof v,
              "sigmask item %d: fired %d code %d", i, out[i].fired,
              out[i].code);
        if (out[i].buf == NULL || out[i].buf->len != sizeof v)
            continue;
        memcpy(&v, out[i].buf->data, sizeof v);
        df_mpi_buf_free(out[i].buf);
        if (v == -1000)
            continue; /* no /proc there */
        if (inl && v < 0)
            CHECK(0, "%" PRId64 " sentries on an inline worker", -v - 1);
        else if (inl)
            CHECK(blocks_async((uint64_t)v), "sentry mask %016" PRIx64,
                  (uint64_t)v);
        else
            CHECK(v == -1, "%" PRId64 " sentries in the pool mode", -v - 1);
    }
    printf("mpi-test: signal masks: progress thread %016" PRIx64 "%s\n",
           mask, inl ? ", sentries checked" : "");
}
static bool expect_work = true; /* items run on every worker */

static int worker(df_mpi *ctx, int expect)
{
    df_mpi_worker_options wo = DF_MPI_WORKER_OPTIONS_INIT;
    wo.threads = worker_threads;
    wo.flags = worker_flags;
    worker_main = pthread_self();
    double c0 = cpu_seconds();
    int rc = df_mpi_worker_run(ctx, &wo);
    printf("mpi-test: worker rank %d returned %s (cpu %.2f s)\n", rank_,
           df_mpi_err_name(rc), cpu_seconds() - c0);
    CHECK(rc == expect, "worker_run returned %s, expected %s",
          df_mpi_err_name(rc), df_mpi_err_name(expect));
    if (expect == 0) {
        CHECK(atomic_load(&max_running_here) <= (int)worker_threads,
              "%d items at once on a rank of %u threads",
              atomic_load(&max_running_here), worker_threads);
        /* Inline: every item on this thread; else none. */
        bool inl = worker_threads == 1 && !(worker_flags & DF_MPI_NO_INLINE);
        int on = atomic_load(&ran_on_main), off = atomic_load(&ran_elsewhere);
        CHECK(on + off > 0 || !expect_work, "no item ran on rank %d",
              rank_);
        CHECK(inl ? off == 0 : on == 0,
              "%s mode: %d items on the main thread, %d elsewhere",
              inl ? "inline" : "pool", on, off);
        printf("mpi-test: worker rank %d: %s mode, %d items\n", rank_,
               inl ? "inline" : "pool", on + off);
    }
    return rc;
}

static void scenario_main(df_mpi *ctx)
{
    register_common(ctx);
    if (!df_mpi_is_master(ctx)) {
        worker(ctx, 0);
        return;
    }
    df_loop *loop;
    OK(df_loop_new(NULL, &loop));
    df_mpi_pool *pool;
    df_mpi_pool_options po = DF_MPI_POOL_OPTIONS_INIT;
    po.max_bytes = 1 << 20;
    OK(df_mpi_pool_new(ctx, loop, &po, &pool));
    CHECK(df_mpi_finalize(ctx) == DF_EBUSY, "finalize with a pool");
    test_sem(loop, pool); /* first: it checks the pool's max_outstanding */
    test_sigmask(loop, pool);
    test_idle(loop);
    test_map(loop, pool);
    test_cancel(loop, pool);
    test_cancel_queued(loop, pool);
    test_bad(loop, pool, po.max_bytes);
    test_wrong_thread(pool);
    test_drain(loop, pool);
    OK(df_mpi_pool_free(pool));
    OK(df_loop_free(loop));
}

static void scenario_cshut(df_mpi *ctx)
{
    register_common(ctx);
    /* The cancel may reach a loaded worker before it started any item. */
    expect_work = false;
    if (!df_mpi_is_master(ctx)) {
        worker(ctx, 0);
        return;
    }
    df_loop *loop;
    OK(df_loop_new(NULL, &loop));
    df_mpi_pool *pool;
    OK(df_mpi_pool_new(ctx, loop, NULL, &pool));
    enum { N = 16 };
    static outcome out[N];
    for (int i = 0; i < N; i++) {
        df_deferred *d;
        OK(df_mpi_submit(pool, "slow", NULL, 0, &d));
        watch(d, &out[i]);
    }
    sleep_loop(loop, 50000000);
    df_mpi_pool_stats st;
    OK(df_mpi_pool_get_stats(pool, &st));
    CHECK(st.sent == st.credit && st.queued == N - st.credit,
          "sent %" PRIu64 " queued %" PRIu64, st.sent, st.queued);
    df_deferred *done;
    double w0 = wall_seconds();
    OK(df_mpi_pool_shutdown(pool, DF_POOL_CANCEL, &done));
    int now = 0;
    for (int i = 0; i < N; i++)
        now += out[i].fired;
    CHECK(now == (int)(N - st.credit), "%d fired at once, %" PRIu64
          " were queued", now, st.queued);
    CHECK(df_mpi_pool_shutdown(pool, DF_POOL_CANCEL, &done) == DF_ESTATE,
          "second shutdown");
    run_until(loop, done);
    df_deferred_unref(done);
    /* The running items see their cancel within milliseconds; one that
     * never did would end only after its 20 s. */
    double w = wall_seconds() - w0;
    CHECK(w < 10, "the cancelling shutdown took %.1f s", w);
    printf("mpi-test: cancel shutdown took %.3f s\n", w);
    for (int i = 0; i < N; i++)
        CHECK(out[i].fired == 1 && out[i].code == DF_ECANCELLED,
              "item %d: fired %d code %d", i, out[i].fired, out[i].code);
    OK(df_mpi_pool_free(pool));
    OK(df_loop_free(loop));
    printf("mpi-test: cancel shutdown: %d items cancelled once each\n", N);
}

/* The master's side of a start-up that must fail: df_mpi_pool_new
 * returns `want` and makes no pool. */
static void master_pool_new_fails(df_mpi *ctx, int want)
{
    df_loop *loop;
    OK(df_loop_new(NULL, &loop));
    df_mpi_pool *pool = NULL;
    int rc = df_mpi_pool_new(ctx, loop, NULL, &pool);
    CHECK(rc == want && pool == NULL, "pool_new: %s", df_mpi_err_name(rc));
    printf("mpi-test: master: pool_new returned %s\n", df_mpi_err_name(rc));
    OK(df_loop_free(loop));
}

static void scenario_table(df_mpi *ctx)
{
    register_common(ctx);
    if (df_mpi_rank(ctx) == 2)
        OK(df_mpi_register(ctx, "extra", fn_echo, NULL));
    if (!df_mpi_is_master(ctx)) {
        worker(ctx, DF_MPI_ETABLE);
        return;
    }
    master_pool_new_fails(ctx, DF_MPI_ETABLE);
}

static int fn_master_only(df_mpi_task *t, const void *in, size_t len,
                          void *arg)
{
    (void)t, (void)in, (void)len, (void)arg;
    return 0;
}

static void scenario_noname(df_mpi *ctx)
{
    register_common(ctx);
    expect_work = false; /* one "echo": one of the two workers runs it */
    if (!df_mpi_is_master(ctx)) {
        worker(ctx, 0);
        return;
    }
    OK(df_mpi_register(ctx, "masteronly", fn_master_only, NULL));
    df_loop *loop;
    OK(df_loop_new(NULL, &loop));
    df_mpi_pool *pool;
    df_mpi_pool_options po = DF_MPI_POOL_OPTIONS_INIT;
    po.flags = DF_MPI_NO_TABLE_CHECK;
    OK(df_mpi_pool_new(ctx, loop, &po, &pool));
    static outcome o, e;
    df_deferred *d;
    OK(df_mpi_submit(pool, "masteronly", NULL, 0, &d));
    watch(d, &o);
    OK(df_mpi_submit(pool, "echo", "x", 1, &d));
    watch(d, &e);
    df_loop_run(loop);
    CHECK(o.fired == 1 && o.code == DF_MPI_ENONAME &&
              strstr(o.msg, "not registered on rank") != NULL,
          "%d %s '%s'", o.fired, df_mpi_err_name(o.code), o.msg);
    CHECK(e.fired == 1 && e.code == 0, "echo %d %d", e.fired, e.code);
    df_mpi_buf_free(e.buf);
    printf("mpi-test: master: unknown name: %s: %s\n",
           df_mpi_err_name(o.code), o.msg);
    OK(df_mpi_pool_shutdown(pool, DF_POOL_DRAIN, &d));
    run_until(loop, d);
    df_deferred_unref(d);
    OK(df_mpi_pool_free(pool));
    OK(df_loop_free(loop));
}

/* Bad worker options (one per rank; run with 5 ranks): rank 1 asks for
 * DF_MPI_INLINE with 2 threads, rank 2 for an unknown flag, rank 3 for
 * DF_MPI_INLINE | DF_MPI_NO_INLINE: each refuses with DF_EINVAL.  Rank 4
 * asks for DF_MPI_INLINE with 1 thread, which is valid, and, like any
 * further rank and the master, learns at start-up that the pool cannot
 * start (DF_ESTATE), so nobody hangs. */
static void scenario_badflags(df_mpi *ctx)
{
    register_common(ctx);
    if (!df_mpi_is_master(ctx)) {
        switch (df_mpi_rank(ctx)) {
        case 1:
            worker_flags = DF_MPI_INLINE;
            worker(ctx, DF_EINVAL);
            break;
        case 2:
            worker_flags = 1u << 7;
            worker(ctx, DF_EINVAL);
            break;
        case 3:
            worker_threads = 1;
            worker_flags = DF_MPI_INLINE | DF_MPI_NO_INLINE;
            worker(ctx, DF_EINVAL);
            break;
        case 4:
            worker_threads = 1;
            worker_flags = DF_MPI_INLINE;
            worker(ctx, DF_ESTATE);
            break;
        default:
            worker(ctx, DF_ESTATE);
            break;
        }
        return;
    }
    master_pool_new_fails(ctx, DF_ESTATE);
}

static void scenario_early(df_mpi *ctx)
{
    register_common(ctx);
    if (!df_mpi_is_master(ctx))
        worker(ctx, DF_ESTATE);
    /* The master goes straight to df_mpi_finalize (in main). */
}

/* A work function calls df_mpi_finalize(): refused with DF_EBUSY while
 * the worker runs (in the inline mode the function runs on the MPI thread,
 * which the header names for df_mpi_finalize), and the run goes on: later
 * items are answered and the rank's own df_mpi_finalize() after
 * df_mpi_worker_run() succeeds (in main). */
static void scenario_fin(df_mpi *ctx)
{
    register_common(ctx);
    OK(df_mpi_register(ctx, "fin", fn_fin, NULL));
    if (!df_mpi_is_master(ctx)) {
        worker(ctx, 0);
        return;
    }
    df_loop *loop;
    OK(df_loop_new(NULL, &loop));
    df_mpi_pool *pool;
    OK(df_mpi_pool_new(ctx, loop, NULL, &pool));
    enum { NF = 6, NE = 20 };
    static outcome f[NF], e[NE];
    df_deferred *d;
    for (int i = 0; i < NF; i++) {
        OK(df_mpi_submit(pool, "fin", NULL, 0, &d));
        watch(d, &f[i]);
    }
    for (int i = 0; i < NE; i++) {
        OK(df_mpi_submit(pool, "echo", "abc", 3, &d));
        watch(d, &e[i]);
    }
    OK(df_mpi_pool_shutdown(pool, DF_POOL_DRAIN, &d));
    run_until(loop, d);
    df_deferred_unref(d);
    for (int i = 0; i < NF; i++) {
        int64_t v = 0;
        CHECK(f[i].fired == 1 && f[i].code == 0 && f[i].buf != NULL &&
                  f[i].buf->len == sizeof v,
              "fin %d: fired %d code %d", i, f[i].fired, f[i].code);
        if (f[i].buf != NULL && f[i].buf->len == sizeof v) {
            memcpy(&v, f[i].buf->data, sizeof v);
            CHECK(v == DF_EBUSY, "fin %d: df_mpi_finalize returned %s", i,
                  df_mpi_err_name((int)v));
        }
        df_mpi_buf_free(f[i].buf);
    }
    for (int i = 0; i < NE; i++) {
        CHECK(e[i].fired == 1 && e[i].code == 0 && e[i].buf != NULL &&
                  e[i].buf->len == 3 && memcmp(e[i].buf->data, "abc", 3) == 0,
              "echo %d after fin: fired %d code %d", i, e[i].fired,
              e[i].code);
        df_mpi_buf_free(e[i].buf);
    }
    OK(df_mpi_pool_free(pool));
    OK(df_loop_free(loop));
    printf("mpi-test: master: %d work functions got DF_EBUSY from "
           "df_mpi_finalize, %d items after them answered\n", NF, NE);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2) {
        fprintf(stderr, "usage: mpi-test main|main1|cshut|cshut1|cshut1p|"
                        "badflags|table|table1|noname|thread|early|early1|"
                        "fin|fin1\n");
        return 2;
    }
    const char *sc = argv[1];
    /* Nothing blocked on the application's thread, whatever the launcher
     * left: a library thread that inherited this mask would then fail
     * test_sigmask. */
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, NULL);
    if (strcmp(sc, "thread") == 0) {
        int provided;
        MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
        MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
        df_mpi *ctx = NULL;
        int rc = df_mpi_init(&argc, &argv, &ctx);
        if (provided < MPI_THREAD_SERIALIZED)
            CHECK(rc == DF_MPI_ETHREAD_LEVEL && ctx == NULL, "init: %s",
                  df_mpi_err_name(rc));
        else
            CHECK(0, "MPI gave level %d for FUNNELED", provided);
        printf("mpi-test: rank %d: df_mpi_init returned %s\n", rank_,
               df_mpi_err_name(rc));
        MPI_Finalize();
    } else {
        df_mpi *ctx;
        int rc = df_mpi_init(&argc, &argv, &ctx);
        if (rc != 0) {
            fprintf(stderr, "mpi-test: df_mpi_init: %s\n",
                    df_mpi_err_name(rc));
            return 1;
        }
        rank_ = df_mpi_rank(ctx);
        ctx_ = ctx;
        /* NAME1: workers of one thread (inline); NAME1p: the same with
         * DF_MPI_NO_INLINE (pool). */
        char base[32];
        snprintf(base, sizeof base, "%s", sc);
        size_t n = strlen(base);
        if (n > 2 && strcmp(base + n - 2, "1p") == 0) {
            worker_threads = 1;
            worker_flags = DF_MPI_NO_INLINE;
            base[n - 2] = '\0';
        } else if (n > 1 && base[n - 1] == '1') {
            worker_threads = 1;
            base[n - 1] = '\0';
        }
        if (strcmp(base, "main") == 0)
            scenario_main(ctx);
        else if (strcmp(base, "cshut") == 0)
            scenario_cshut(ctx);
        else if (strcmp(sc, "badflags") == 0)
            scenario_badflags(ctx);
        else if (strcmp(base, "table") == 0)
            scenario_table(ctx);
        else if (strcmp(sc, "noname") == 0)
            scenario_noname(ctx);
        else if (strcmp(base, "early") == 0)
            scenario_early(ctx);
        else if (strcmp(base, "fin") == 0)
            scenario_fin(ctx);
        else
            CHECK(0, "unknown scenario %s", sc);
        OK(df_mpi_finalize(ctx));
    }
    printf("mpi-test: rank %d: %s %s\n", rank_, sc,
           failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
