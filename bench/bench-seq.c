/* SPDX-License-Identifier: MIT */
/* The sequential floor: every item computed and recorded on the main thread. */
#include "bench-common.h"

/*
 * No threads, no queue: the cost of the work itself plus the result
 * bookkeeping every other implementation also pays.  LIMIT and THREADS are
 * accepted (and printed) so that the command line is the same as the
 * peers'; one item is ever in flight.
 */
int main(int argc, char **argv)
{
    struct bench_args a;
    struct bench_results r;
    struct bench_inflight inflight;

    bench_parse_args(argc, argv, "seq", &a);
    bench_results_init(&r, a.n);
    bench_inflight_init(&inflight);

    uint64_t t0 = bench_now_ns();
    for (uint64_t i = 0; i < a.n; i++) {
        bench_inflight_enter(&inflight);
        uint64_t v = bench_work(i, a.work_iters);
        bench_inflight_leave(&inflight);
        bench_record(&r, i, v);
    }
    uint64_t t1 = bench_now_ns();

    bool ok = bench_check(&r, &a, &inflight, BENCH_WORK_ON_LOOP);
    int status = bench_report("seq", &a, t1 - t0, ok, false);
    bench_results_free(&r);
    return status;
}
