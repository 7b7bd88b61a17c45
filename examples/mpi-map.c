/* SPDX-License-Identifier: MIT */
/* mpi-map: a CPU-bound map over many items, run on MPI ranks, progress on
 * rank 0.
 *
 *     mpirun -np 4 ./examples/mpi-map -n 20000
 *     srun -n 64 ./examples/mpi-map -n 1000000 -t 8     (under Slurm)
 *
 * Every rank runs this same program.  Rank 0 (the master) streams item
 * numbers 0..n-1 through df_mpi_map_start() with at most -j items in
 * flight over the whole cluster; the other ranks run them, -t threads
 * each.  Item i is `-i` steps of xorshift64 from a seed made of i (about
 * 1 ms for the default 400000 steps on a 2020s core), its result one
 * 8-byte value.  The master prints a progress line on stderr every half
 * second and a summary at the end, with a checksum of all results that
 * does not depend on the number of ranks or threads (-c recomputes it
 * sequentially on the master to compare). */
#include <deferred-mpi.h>

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t kernel(uint64_t i, uint64_t iters)
{
    uint64_t x = i * UINT64_C(0x9E3779B97F4A7C15) + 1;
    if (x == 0)
        x = 1;
    for (uint64_t k = 0; k < iters; k++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

/* The work function, on a worker rank (on its main thread with the
 * default -t 1, the inline mode; on a pool thread with more): input
 * (i, iters) as two little-endian int64, output the 8-byte result. */
static int step(df_mpi_task *t, const void *in, size_t len, void *arg)
{
    (void)arg;
    int64_t v[2];
    if (df_mpi_decode_i64(in, len, v, 2) != 2)
        return df_mpi_task_fail(t, DF_EINVAL, "step: want 2 int64, got %zu "
                                              "bytes", len);
    int64_t r = (int64_t)kernel((uint64_t)v[0], (uint64_t)v[1]);
    void *out = df_mpi_task_output(t, 8);
    if (out == NULL)
        return DF_ENOMEM;
    df_mpi_encode_i64(&r, 1, out);
    return 0;
}

typedef struct app {
    df_loop *loop;
    df_mpi_pool *pool;
    df_map *map;
    uint64_t n, iters, next, done, failed;
    uint64_t checksum;
    uint64_t started, last_shown;
    bool show;
} app;

static int next_item(void *arg, void **item, df_free_fn *item_free)
{
    app *a = arg;
    if (a->next == a->n)
        return 0;
    int64_t v[2] = {(int64_t)a->next++, (int64_t)a->iters};
    df_mpi_buf *b = df_mpi_buf_from_i64(v, 2);
    if (b == NULL)
        return DF_ENOMEM;
    *item = b;
    *item_free = df_mpi_buf_free;
    return 1;
}

static void progress(app *a, bool last)
{
    uint64_t now = df_loop_now(a->loop);
    if (!last && now - a->last_shown < 500000000u)
        return;
    a->last_shown = now;
    double s = (double)(now - a->started) / 1e9;
    df_mpi_pool_stats st;
    df_mpi_pool_get_stats(a->pool, &st);
    fprintf(stderr, "%s%" PRIu64 "/%" PRIu64 " done, %" PRIu64
                    " failed, %.0f items/s, in flight %" PRIu64 "%s",
            a->show ? "\r" : "", a->done, a->n, a->failed,
            s > 0 ? (double)a->done / s : 0.0, st.outstanding,
            a->show && !last ? "   " : "\n");
}

static void on_result(uint64_t index, void *item, df_result r, void *arg)
{
    app *a = arg;
    (void)item;
    a->done++;
    if (r.failure != NULL) {
        a->failed++;
        fprintf(stderr, "item %" PRIu64 ": %s: %s\n", index,
                df_mpi_err_name(df_failure_code(r.failure)),
                df_failure_message(r.failure));
    } else {
        df_mpi_buf *b = r.value;
        int64_t v;
        if (df_mpi_decode_i64(b->data, b->len, &v, 1) == 1)
            a->checksum ^= (uint64_t)v;
        else
            a->failed++;
    }
    df_result_clear(&r);
    progress(a, false);
}

static int master(df_mpi *ctx, uint64_t n, uint64_t iters, unsigned limit,
                  bool verify)
{
    app a = {.n = n, .iters = iters, .show = isatty(2)};
    int rc = df_loop_new(NULL, &a.loop);
    if (rc != 0)
        return 1;
    rc = df_mpi_pool_new(ctx, a.loop, NULL, &a.pool);
    if (rc != 0) {
        fprintf(stderr, "mpi-map: df_mpi_pool_new: %s\n",
                df_mpi_strerror(rc));
        df_loop_free(a.loop);
        return 1;
    }
    df_mpi_pool_stats st;
    df_mpi_pool_get_stats(a.pool, &st);
    if (limit == 0)
        limit = st.credit; /* every worker thread busy, some queued */
    df_map_options o = {0};
    o.limit = limit;
    o.next = next_item;
    o.next_arg = &a;
    o.on_result = on_result;
    o.arg = &a;
    df_deferred *done, *stopped;
    a.started = a.last_shown = df_loop_now(a.loop);
    rc = df_mpi_map_start(a.pool, "step", &o, &a.map, &done);
    if (rc == 0) {
        df_loop_run_until(a.loop, done);
        df_deferred_unref(done);
        df_map_free(a.map);
    } else {
        fprintf(stderr, "mpi-map: df_mpi_map_start: %s\n",
                df_mpi_strerror(rc));
    }
    double s = (double)(df_loop_now(a.loop) - a.started) / 1e9;
    progress(&a, true);
    df_mpi_pool_get_stats(a.pool, &st);
    /* Release the workers: they return from df_mpi_worker_run. */
    if (df_mpi_pool_shutdown(a.pool, DF_POOL_DRAIN, &stopped) == 0) {
        df_loop_run_until(a.loop, stopped);
        df_deferred_unref(stopped);
    }
    df_mpi_pool_free(a.pool);
    df_loop_free(a.loop);
    printf("items=%" PRIu64 " failed=%" PRIu64 " elapsed=%.2fs rate=%.0f "
           "items/s checksum=%016" PRIx64 " peak_in_flight=%" PRIu64
           " limit=%u workers=%u credit=%u\n",
           a.done, a.failed, s, s > 0 ? (double)a.done / s : 0.0, a.checksum,
           st.max_outstanding, limit, st.workers, st.credit);
    int bad = rc != 0 || a.failed > 0 || a.done != n;
    if (verify) {
        uint64_t c = 0;
        for (uint64_t i = 0; i < n; i++)
            c ^= kernel(i, iters);
        printf("sequential checksum=%016" PRIx64 " %s\n", c,
               c == a.checksum ? "(same)" : "(DIFFERENT)");
        bad |= c != a.checksum;
    }
    return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
    df_mpi *ctx;
    int rc = df_mpi_init(&argc, &argv, &ctx);
    if (rc != 0) {
        fprintf(stderr, "mpi-map: df_mpi_init: %s\n", df_mpi_strerror(rc));
        return 1;
    }
    uint64_t n = 10000, iters = 400000;
    unsigned limit = 0, threads = 1;
    bool verify = false;
    int c, usage = 0;
    while ((c = getopt(argc, argv, "n:i:j:t:ch")) != -1) {
        switch (c) {
        case 'n': n = strtoull(optarg, NULL, 10); break;
        case 'i': iters = strtoull(optarg, NULL, 10); break;
        case 'j': limit = (unsigned)strtoul(optarg, NULL, 10); break;
        case 't': threads = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'c': verify = true; break;
        default: usage = 1; break;
        }
    }
    if (usage || threads == 0) {
        if (df_mpi_is_master(ctx))
            fprintf(stderr,
                    "usage: mpirun -np N mpi-map [-n items] [-i steps per "
                    "item] [-j limit] [-t threads per worker] [-c]\n");
        /* Every rank sees the same arguments, so every rank stops here. */
        df_mpi_finalize(ctx);
        return 2;
    }
    /* Every rank registers the same names before the pool starts. */
    df_mpi_register(ctx, "step", step, NULL);
    int status;
    if (df_mpi_is_master(ctx)) {
        status = master(ctx, n, iters, limit, verify);
    } else {
        df_mpi_worker_options wo = DF_MPI_WORKER_OPTIONS_INIT;
        wo.threads = threads;
        rc = df_mpi_worker_run(ctx, &wo);
        status = rc != 0;
    }
    df_mpi_finalize(ctx);
    return status;
}
