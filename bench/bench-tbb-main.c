/* SPDX-License-Identifier: MIT */
/* Peer: oneTBB parallel_pipeline, the harness side (C): arguments, checks, output. */
#include "bench-common.h"
#include "bench-tbb.h"

/*
 * See bench-tbb.cc for the pipeline.  This file holds what must be C: the
 * harness, and the two stage bodies that use its inline helpers.  The
 * stages reach the run's state through this pointer, set before the arena
 * starts and read-only afterwards.
 */

struct bench {
    struct bench_args args;
    struct bench_results results;
    struct bench_inflight inflight;
};

static struct bench *the_bench;

uint64_t bench_tbb_item(uint64_t i)
{
    struct bench *b = the_bench;
    bench_inflight_enter(&b->inflight);
    uint64_t v = bench_work(i, b->args.work_iters);
    bench_inflight_leave(&b->inflight);
    return v;
}

void bench_tbb_record(uint64_t i, uint64_t value)
{
    bench_record(&the_bench->results, i, value);
}

int main(int argc, char **argv)
{
    static struct bench b;
    bench_parse_args(argc, argv, "tbb", &b.args);
    bench_results_init(&b.results, b.args.n);
    /* The main thread only waits for the pipeline, as a loop thread
     * would: no item's work may run on it. */
    bench_inflight_init(&b.inflight);
    the_bench = &b;

    struct bench_tbb *t = bench_tbb_new(b.args.threads);
    if (t == NULL)
        return 3;

    uint64_t t0 = bench_now_ns();
    int rc = bench_tbb_run(t, b.args.n, b.args.limit);
    uint64_t t1 = bench_now_ns();

    /* Teardown is outside the timed phase. */
    bench_tbb_free(t);
    bool ok = bench_check(&b.results, &b.args, &b.inflight, 0);
    int status = bench_report("tbb", &b.args, t1 - t0, ok, rc != 0);
    bench_results_free(&b.results);
    return status;
}
