/* SPDX-License-Identifier: MIT */
/* Shared benchmark harness: arguments, timing, result check, output line. */
#include "bench-common.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static void usage(const char *impl, const char *why)
{
    fprintf(stderr,
            "usage: bench-%s N LIMIT THREADS WORK_ITERS\n"
            "  N           items to run (1 .. 10^10)\n"
            "  LIMIT       most items in flight at once (1 .. 10^6)\n"
            "  THREADS     worker threads (1 .. 1024)\n"
            "  WORK_ITERS  xorshift64 steps per item, 0 for no work "
            "(0 .. 10^9)\n"
            "error: %s\n",
            impl, why);
    exit(2);
}

/* Parses a decimal unsigned integer in [lo, hi]; false on anything else
 * (sign, trailing characters, overflow, empty string). */
static bool parse_u64(const char *s, uint64_t lo, uint64_t hi, uint64_t *out)
{
    if (s == NULL || *s < '0' || *s > '9')
        return false;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

void bench_parse_args(int argc, char **argv, const char *impl,
                      struct bench_args *a)
{
    uint64_t v;
    if (argc != 5)
        usage(impl, "expected exactly 4 arguments");
    if (!parse_u64(argv[1], 1, UINT64_C(10000000000), &v))
        usage(impl, "N must be an integer in 1 .. 10^10");
    a->n = v;
    if (!parse_u64(argv[2], 1, 1000000, &v))
        usage(impl, "LIMIT must be an integer in 1 .. 10^6");
    a->limit = (unsigned)v;
    if (!parse_u64(argv[3], 1, 1024, &v))
        usage(impl, "THREADS must be an integer in 1 .. 1024");
    a->threads = (unsigned)v;
    if (!parse_u64(argv[4], 0, 1000000000, &v))
        usage(impl, "WORK_ITERS must be an integer in 0 .. 10^9");
    a->work_iters = (unsigned)v;
    /* The result line is the program's only output: with stdout closed,
     * fail at once, before a library (libuv) can take descriptor 1 for
     * itself and trip over it.  Closed 0 and 2 get /dev/null for the same
     * reason. */
    if (fcntl(1, F_GETFD) == -1) {
        fprintf(stderr, "bench-%s: standard output is closed\n", impl);
        exit(4);
    }
    for (int fd = 0; fd <= 2; fd += 2)
        if (fcntl(fd, F_GETFD) == -1 &&
            open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY) != fd)
            exit(4);
}

uint64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

long bench_maxrss_kb(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return -1;
    return ru.ru_maxrss; /* KiB on Linux */
}

void bench_results_init(struct bench_results *r, uint64_t n)
{
    memset(r, 0, sizeof *r);
    if (n > SIZE_MAX / sizeof *r->value) {
        fprintf(stderr, "bench: N too large for this machine\n");
        exit(3);
    }
    r->n = n;
    r->value = malloc((size_t)n * sizeof *r->value);
    r->seen = malloc((size_t)n);
    if (r->value == NULL || r->seen == NULL) {
        fprintf(stderr, "bench: out of memory for %" PRIu64 " results\n", n);
        exit(3);
    }
    /* memset, not calloc: calloc may hand back untouched zero pages, whose
     * first-touch faults would then land in the timed phase. */
    memset(r->value, 0, (size_t)n * sizeof *r->value);
    memset(r->seen, 0, (size_t)n);
}

void bench_results_free(struct bench_results *r)
{
    free(r->value);
    free(r->seen);
    memset(r, 0, sizeof *r);
}

void bench_inflight_init(struct bench_inflight *f)
{
    atomic_init(&f->cur, 0);
    atomic_init(&f->max, 0);
    atomic_init(&f->on_loop, 0);
    f->loop = pthread_self();
}

bool bench_check(const struct bench_results *r, const struct bench_args *a,
                 const struct bench_inflight *f, unsigned flags)
{
    unsigned max_inflight = atomic_load(&f->max);
    unsigned long on_loop = atomic_load(&f->on_loop);
    bool ok = true;
    uint64_t missing = 0, dup = 0, wrong = 0, first_wrong = UINT64_MAX;
    for (uint64_t i = 0; i < r->n; i++) {
        if (r->seen[i] == 0) {
            missing++;
            continue;
        }
        if (r->seen[i] != 1)
            dup++;
        if (r->value[i] != bench_work(i, a->work_iters)) {
            if (wrong++ == 0)
                first_wrong = i;
        }
    }
    if (missing != 0 || dup != 0 || r->bad != 0 || r->delivered != r->n) {
        fprintf(stderr,
                "bench: check: %" PRIu64 " delivered for n=%" PRIu64
                ", %" PRIu64 " missing, %" PRIu64 " duplicated, %" PRIu64
                " deliveries rejected (repeat or index out of range)\n",
                r->delivered, r->n, missing, dup, r->bad);
        ok = false;
    }
    if (wrong != 0) {
        fprintf(stderr,
                "bench: check: %" PRIu64 " wrong values (first: item %" PRIu64
                ")\n",
                wrong, first_wrong);
        ok = false;
    }
    if (max_inflight < 1 || max_inflight > a->limit) {
        fprintf(stderr,
                "bench: check: max in flight %u outside [1, limit=%u]\n",
                max_inflight, a->limit);
        ok = false;
    }
    if (on_loop != 0 && !(flags & BENCH_WORK_ON_LOOP)) {
        fprintf(stderr,
                "bench: check: the work of %lu items ran on the loop "
                "thread\n",
                on_loop);
        ok = false;
    }
    return ok;
}

int bench_report(const char *impl, const struct bench_args *a,
                 uint64_t elapsed_ns, bool ok, bool failed)
{
    double s = (double)elapsed_ns / 1e9;
    double rate = s > 0 ? (double)a->n / s : 0.0;
    double ns = (double)elapsed_ns / (double)a->n;
    if (failed)
        ok = false;
    printf("impl=%s n=%" PRIu64 " limit=%u threads=%u work_iters=%u "
           "wall_s=%.6f items_per_s=%.0f ns_per_item=%.1f maxrss_kb=%ld "
           "check=%s\n",
           impl, a->n, a->limit, a->threads, a->work_iters, s, rate, ns,
           bench_maxrss_kb(), ok ? "ok" : "BAD");
    /* A result line that could not be written is a failed run (a closed
     * stdout, a full disk), not a silent success. */
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "bench: writing the result line: %s\n",
                strerror(errno));
        return 4;
    }
    return failed ? 3 : ok ? 0 : 1;
}
