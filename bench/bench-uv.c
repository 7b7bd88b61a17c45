/* SPDX-License-Identifier: MIT */
/* Peer: libuv uv_queue_work, LIMIT kept in flight by the after-work callback. */
#include "bench-common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

/*
 * libuv's pool is process-global and sized once, from UV_THREADPOOL_SIZE,
 * when the first request is queued; so the variable is set before that and
 * a warm-up request starts the threads outside the timed phase (the other
 * implementations also create their threads before timing).  LIMIT
 * uv_work_t requests are preallocated; each after-work callback (on the
 * loop thread) records its item and reuses its request for the next one.
 */

struct slot {
    uv_work_t req;
    uint64_t index;
    uint64_t value;
};

struct bench {
    struct bench_args args;
    struct bench_results results;
    struct bench_inflight inflight;
    uint64_t next;
    int failed; /* first uv error, 0 if none */
};

static void work_cb(uv_work_t *req)
{
    struct slot *s = (struct slot *)req;
    struct bench *b = req->data;
    bench_inflight_enter(&b->inflight);
    s->value = bench_work(s->index, b->args.work_iters);
    bench_inflight_leave(&b->inflight);
}

static void after_work_cb(uv_work_t *req, int status);

static void submit(uv_loop_t *loop, struct bench *b, struct slot *s)
{
    s->index = b->next++;
    int e = uv_queue_work(loop, &s->req, work_cb, after_work_cb);
    if (e != 0 && b->failed == 0) {
        fprintf(stderr, "bench-uv: uv_queue_work: %s\n", uv_strerror(e));
        b->failed = e;
    }
}

static void after_work_cb(uv_work_t *req, int status)
{
    struct slot *s = (struct slot *)req;
    struct bench *b = req->data;
    if (status != 0) {
        if (b->failed == 0)
            b->failed = status;
        return;
    }
    bench_record(&b->results, s->index, s->value);
    if (b->next < b->args.n && b->failed == 0)
        submit(req->loop, b, s);
}

static void warm_work(uv_work_t *req)
{
    (void)req;
}

static void warm_after(uv_work_t *req, int status)
{
    (void)req;
    (void)status;
}

int main(int argc, char **argv)
{
    struct bench b;
    memset(&b, 0, sizeof b);
    bench_parse_args(argc, argv, "uv", &b.args);
    bench_results_init(&b.results, b.args.n);
    bench_inflight_init(&b.inflight);

    char nthreads[16];
    snprintf(nthreads, sizeof nthreads, "%u", b.args.threads);
    if (setenv("UV_THREADPOOL_SIZE", nthreads, 1) != 0) {
        perror("bench-uv: setenv");
        return 3;
    }

    uv_loop_t loop;
    int e = uv_loop_init(&loop);
    if (e != 0) {
        fprintf(stderr, "bench-uv: uv_loop_init: %s\n", uv_strerror(e));
        return 3;
    }
    uv_work_t warm;
    e = uv_queue_work(&loop, &warm, warm_work, warm_after);
    if (e != 0) {
        fprintf(stderr, "bench-uv: uv_queue_work: %s\n", uv_strerror(e));
        return 3;
    }
    uv_run(&loop, UV_RUN_DEFAULT);

    uint64_t nslots = b.args.limit < b.args.n ? b.args.limit : b.args.n;
    struct slot *slots = calloc(nslots, sizeof *slots);
    if (slots == NULL) {
        perror("bench-uv: calloc");
        return 3;
    }
    for (uint64_t k = 0; k < nslots; k++)
        slots[k].req.data = &b;

    uint64_t t0 = bench_now_ns();
    for (uint64_t k = 0; k < nslots && b.failed == 0; k++)
        submit(&loop, &b, &slots[k]);
    uv_run(&loop, UV_RUN_DEFAULT);
    uint64_t t1 = bench_now_ns();

    bool ok = bench_check(&b.results, &b.args, &b.inflight, 0);
    int status = bench_report("libuv", &b.args, t1 - t0, ok, b.failed != 0);

    uv_loop_close(&loop);
    free(slots);
    bench_results_free(&b.results);
    return status;
}
