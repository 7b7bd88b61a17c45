/* SPDX-License-Identifier: MIT */
/* libdeferred-mpi: the bench harness's items streamed through an MPI pool. */
#include "bench-common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <time.h>

#include <deferred-mpi.h>

/*
 *     mpirun -np R+1 bench-mpi N LIMIT THREADS WORK_ITERS
 *
 * Rank 0 is the master and computes nothing: it streams item indices
 * through df_mpi_map_start() (at most LIMIT in flight over the cluster)
 * and records each result as it completes; ranks 1..R run the items,
 * THREADS threads each (credit: the default, 2 x THREADS + 2, or
 * BENCH_MPI_CREDIT from the environment; with THREADS 1 the inline mode,
 * the default, unless BENCH_MPI_INLINE=0 asks for the pool mode).  Item i is
 * bench_work(i, WORK_ITERS), as for every other implementation in bench/,
 * so the line printed (impl=mpi-rR) is comparable with bench-deferred-map
 * run with the same arguments.  Input: the index as one little-endian
 * int64; output: the value, the same.  The timed phase runs from the
 * first pull to the last result; the pool's start-up exchange and the
 * shutdown are outside it.  The check: every item once with the right
 * value, and the pool's own count of items in flight never above LIMIT.
 * A second line, "mpi-master cpu_ns_per_item=X", gives the master's CPU
 * time (all its threads) per item.
 *
 * With BENCH_MPI_CPU=1 in the environment each worker rank also prints
 *
 *     mpi-worker rank=R items=K main_cpu_ns_per_item=X pool_cpu_ns_per_item=Y
 *         main_switches_per_item=Z
 *
 * the CPU time of its main thread (receiving, replying, sleeping and
 * waking) and of its pool thread(s) per item it ran, from its first item
 * to its last (so the start-up exchange and MPI_Finalize stay out), read
 * with pthread_getcpuclockid() in the work function: four more system
 * calls per item (two clock_gettime() of thread CPU clocks and two
 * getrusage()), so leave it off for timings of short items; and the main
 * thread's context switches (voluntary and not) per item, from its first
 * item to the end of df_mpi_worker_run(); other_cpu_ns_per_item, the CPU
 * of every thread of the rank but the one(s) computing (in the inline
 * mode, where the main thread computes: the sentry and Open MPI's own
 * threads; in the pool mode: the main thread and those), and
 * proc_switches_per_item, the context switches of the whole rank, both
 * from the first item to the last.  The master then adds a line
 * "mpi-master switches_per_item=S" (all its threads, timed phase).
 */

static unsigned iters; /* the same on every rank: from argv */

/* BENCH_MPI_CPU=1: per-item CPU of a worker rank's threads (see above).
 * Written by the pool thread(s) under cpu_mu, read after they are gone. */
static bool cpu_on;
static pthread_t main_thread;
static pthread_mutex_t cpu_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t cpu_items, main0, main1, pool_cpu, proc0, proc1;
static long proc_sw0, proc_sw1;
static long switches(void);
static uint64_t cpu_ns(void);
static pid_t main_tid;
static long main_sw0;

/* Context switches of thread `tid` of this process, from /proc. */
static long thread_switches(pid_t tid)
{
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/self/task/%d/status", (int)tid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    long n = 0, v;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "voluntary_ctxt_switches: %ld", &v) == 1 ||
            sscanf(line, "nonvoluntary_ctxt_switches: %ld", &v) == 1)
            n += v;
    fclose(f);
    return n;
}

static uint64_t thread_cpu_ns(pthread_t t)
{
    clockid_t c;
    struct timespec ts;
    if (pthread_getcpuclockid(t, &c) != 0 || clock_gettime(c, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Pool thread: after each item, the main thread's CPU so far and this
 * item's share of the pool thread's (from its first item on). */
static void cpu_sample(void)
{
    static _Thread_local uint64_t last;
    uint64_t me = thread_cpu_ns(pthread_self());
    uint64_t m = thread_cpu_ns(main_thread);
    pthread_mutex_lock(&cpu_mu);
    uint64_t pc = cpu_ns();
    long psw = switches();
    if (cpu_items++ == 0) {
        main0 = m;
        main_sw0 = thread_switches(main_tid);
        proc0 = pc;
        proc_sw0 = psw;
    }
    main1 = m;
    proc1 = pc;
    proc_sw1 = psw;
    if (last != 0)
        pool_cpu += me - last;
    last = me;
    pthread_mutex_unlock(&cpu_mu);
}

static int bench_fn(df_mpi_task *t, const void *in, size_t len, void *arg)
{
    (void)arg;
    int64_t i;
    if (df_mpi_decode_i64(in, len, &i, 1) != 1)
        return DF_EINVAL;
    int64_t v = (int64_t)bench_work((uint64_t)i, iters);
    void *out = df_mpi_task_output(t, 8);
    if (out == NULL)
        return DF_ENOMEM;
    df_mpi_encode_i64(&v, 1, out);
    if (cpu_on)
        cpu_sample();
    return 0;
}

typedef struct bench {
    struct bench_args args;
    struct bench_results results;
    uint64_t next;
    uint64_t failures;
} bench;

static int next_item(void *arg, void **item, df_free_fn *item_free)
{
    bench *b = arg;
    if (b->next == b->args.n)
        return 0;
    int64_t i = (int64_t)b->next++;
    df_mpi_buf *buf = df_mpi_buf_from_i64(&i, 1);
    if (buf == NULL)
        return DF_ENOMEM;
    *item = buf;
    *item_free = df_mpi_buf_free;
    return 1;
}

static void on_result(uint64_t index, void *item, df_result r, void *arg)
{
    bench *b = arg;
    (void)item;
    int64_t v = 0;
    if (r.failure != NULL) {
        if (b->failures++ == 0)
            fprintf(stderr, "bench-mpi: item %llu: %s\n",
                    (unsigned long long)index,
                    df_failure_message(r.failure));
    } else {
        df_mpi_buf *buf = r.value;
        if (df_mpi_decode_i64(buf->data, buf->len, &v, 1) != 1)
            b->failures++;
        bench_record(&b->results, index, (uint64_t)v);
    }
    df_result_clear(&r);
}

/* Context switches of this process (every thread), voluntary or not. */
static long switches(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_nvcsw + ru.ru_nivcsw;
}

/* CPU time of this process (every thread), in ns. */
static uint64_t cpu_ns(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000u +
           (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000u;
}

static int master(df_mpi *ctx, bench *b)
{
    df_loop *loop;
    df_mpi_pool *pool;
    if (df_loop_new(NULL, &loop) != 0)
        return 3;
    int rc = df_mpi_pool_new(ctx, loop, NULL, &pool);
    if (rc != 0) {
        fprintf(stderr, "bench-mpi: df_mpi_pool_new: %s\n",
                df_mpi_strerror(rc));
        df_loop_free(loop);
        return 3;
    }
    bench_results_init(&b->results, b->args.n);
    df_map_options o = {0};
    o.limit = b->args.limit;
    o.next = next_item;
    o.next_arg = b;
    o.on_result = on_result;
    o.arg = b;
    df_map *map = NULL;
    df_deferred *done = NULL;
    long s0 = switches();
    uint64_t t0 = bench_now_ns(), c0 = cpu_ns();
    rc = df_mpi_map_start(pool, "bench", &o, &map, &done);
    if (rc == 0)
        rc = df_loop_run_until(loop, done);
    uint64_t elapsed = bench_now_ns() - t0, cpu = cpu_ns() - c0;
    long sw = switches() - s0;
    if (done != NULL)
        df_deferred_unref(done);
    if (map != NULL)
        df_map_free(map);
    df_mpi_pool_stats st;
    df_mpi_pool_get_stats(pool, &st);
    df_deferred *stopped;
    if (df_mpi_pool_shutdown(pool, DF_POOL_DRAIN, &stopped) == 0) {
        df_loop_run_until(loop, stopped);
        df_deferred_unref(stopped);
    }
    df_mpi_pool_free(pool);
    df_loop_free(loop);

    /* bench_check's in-flight bound, from the pool's own count. */
    struct bench_inflight f;
    bench_inflight_init(&f);
    atomic_store(&f.max, (unsigned)st.max_outstanding);
    bool ok = bench_check(&b->results, &b->args, &f, 0);
    char impl[32];
    snprintf(impl, sizeof impl, "mpi-r%u", st.workers);
    int status = bench_report(impl, &b->args, elapsed,
                              ok && b->failures == 0, rc != 0);
    /* The master's own cost: CPU time of all its threads (loop, progress,
     * Open MPI's) per item: a second line, after the harness's. */
    printf("mpi-master cpu_ns_per_item=%.0f\n",
           (double)cpu / (double)b->args.n);
    if (cpu_on)
        printf("mpi-master switches_per_item=%.1f\n",
               (double)sw / (double)b->args.n);
    fflush(stdout);
    bench_results_free(&b->results);
    return status;
}

int main(int argc, char **argv)
{
    df_mpi *ctx;
    int rc = df_mpi_init(&argc, &argv, &ctx);
    if (rc != 0) {
        fprintf(stderr, "bench-mpi: df_mpi_init: %s\n", df_mpi_strerror(rc));
        return 3;
    }
    bench b;
    memset(&b, 0, sizeof b);
    /* Every rank parses the same argv; a usage error exits on all. */
    bench_parse_args(argc, argv, "bench-mpi", &b.args);
    iters = b.args.work_iters;
    df_mpi_register(ctx, "bench", bench_fn, NULL);
    int status;
    cpu_on = getenv("BENCH_MPI_CPU") != NULL &&
             strcmp(getenv("BENCH_MPI_CPU"), "1") == 0;
    if (df_mpi_is_master(ctx)) {
        status = master(ctx, &b);
    } else {
        df_mpi_worker_options wo = DF_MPI_WORKER_OPTIONS_INIT;
        wo.threads = b.args.threads;
        const char *credit = getenv("BENCH_MPI_CREDIT");
        if (credit != NULL)
            wo.credit = (unsigned)strtoul(credit, NULL, 10);
        const char *inl = getenv("BENCH_MPI_INLINE");
        if (inl != NULL && strcmp(inl, "0") == 0)
            wo.flags = DF_MPI_NO_INLINE;
        main_thread = pthread_self();
        main_tid = (pid_t)syscall(SYS_gettid);
        status = df_mpi_worker_run(ctx, &wo) == 0 ? 0 : 3;
        if (cpu_on && cpu_items > 1) {
            /* Intervals between the first and the last item's end. */
            long sw = thread_switches(main_tid) - main_sw0;
            double k = (double)(cpu_items - 1);
            printf("mpi-worker rank=%d items=%llu main_cpu_ns_per_item=%.0f "
                   "pool_cpu_ns_per_item=%.0f main_switches_per_item=%.1f "
                   "other_cpu_ns_per_item=%.0f proc_switches_per_item=%.1f"
                   "\n",
                   df_mpi_rank(ctx), (unsigned long long)cpu_items,
                   (double)(main1 - main0) / k, (double)pool_cpu / k,
                   (double)sw / k,
                   ((double)(proc1 - proc0) - (double)pool_cpu) / k,
                   (double)(proc_sw1 - proc_sw0) / k);
            fflush(stdout);
        }
    }
    df_mpi_finalize(ctx);
    return status;
}
