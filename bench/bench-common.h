/* SPDX-License-Identifier: MIT */
/* Shared benchmark harness: arguments, work function, timing, result check. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Every benchmark program takes the same command line
 *
 *     prog N LIMIT THREADS WORK_ITERS
 *
 * runs N items with at most LIMIT of them in flight on THREADS worker
 * threads, and prints exactly one line (bench_report):
 *
 *     impl=NAME n=N limit=L threads=T work_iters=W wall_s=S items_per_s=R
 *     ns_per_item=X maxrss_kb=K check=ok|BAD
 *
 * The exit status is 0 when check=ok, 1 when check=BAD, 2 on a usage error
 * and 3 when the implementation itself failed (an API call returned an
 * error); in that last case the line is still printed, with check=BAD.
 */

struct bench_args {
    uint64_t n;          /* items, >= 1                                */
    unsigned limit;      /* most items in flight at once, >= 1         */
    unsigned threads;    /* worker threads, >= 1                       */
    unsigned work_iters; /* xorshift64 steps per item; 0: value is i   */
};

/* Parses argv into *a.  On any error prints the usage (naming `impl`) and
 * the reason to stderr and exits with status 2.  Limits: N <= 10^10,
 * LIMIT <= 10^6, THREADS <= 1024, WORK_ITERS <= 10^9. */
void bench_parse_args(int argc, char **argv, const char *impl,
                      struct bench_args *a);

/*
 * Item i's work: `iters` steps of Marsaglia's xorshift64 (13, 7, 17)
 * starting from seed = i * 0x9E3779B97F4A7C15 + 1 (Weyl/golden-ratio
 * scramble, so neighbouring items start far apart).  xorshift64 has a
 * fixed point at 0; the seed is 0 only for the single i with
 * i * 0x9E3779B97F4A7C15 == 2^64 - 1, and that i is mapped to seed 1.
 * iters == 0 returns i itself (the "no work" cases).  The loop is a
 * dependent chain the compiler cannot shorten, so the cost is linear in
 * iters.
 */
static inline uint64_t bench_work(uint64_t i, unsigned iters)
{
    if (iters == 0)
        return i;
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

/* Monotonic clock in nanoseconds. */
uint64_t bench_now_ns(void);
/* Peak resident set size of the process in KiB (getrusage ru_maxrss). */
long bench_maxrss_kb(void);

/*
 * Result bookkeeping shared by every implementation: one slot per item plus
 * a "seen" byte, so that a missing or duplicated delivery is caught as well
 * as a wrong value.  bench_record() runs on the thread that receives
 * completions (the loop / main thread), never concurrently with itself.
 */
struct bench_results {
    uint64_t n;
    uint64_t *value;    /* value[i]: what item i delivered        */
    uint8_t *seen;      /* seen[i]: deliveries of item i (max 2)  */
    uint64_t delivered; /* number of bench_record() calls         */
    uint64_t bad;       /* out-of-range indices, duplicates       */
};

/* Allocates and zeroes (touching every page, so that page faults stay out
 * of the timed phase) the arrays for n items; exits with status 3 when out
 * of memory. */
void bench_results_init(struct bench_results *r, uint64_t n);
void bench_results_free(struct bench_results *r);

static inline void bench_record(struct bench_results *r, uint64_t i,
                                uint64_t value)
{
    r->delivered++;
    if (i >= r->n || r->seen[i] != 0) {
        r->bad++;
        if (i < r->n)
            r->seen[i] = 2;
        return;
    }
    r->seen[i] = 1;
    r->value[i] = value;
}

/*
 * In-flight accounting, done inside the work function by every
 * implementation: bench_inflight_enter() at its start, _leave() at its end.
 * The maximum observed must never exceed LIMIT.  Relaxed atomics are
 * enough: each counter is a single location, so its modification order is
 * total, and the counters are only read after the workers are joined or
 * their completions received.
 *
 * It also counts the items whose work ran on the loop (main) thread: a
 * pool that ran work inline there would look unbeatable on the no-work
 * cases while measuring something else, so bench_check() refuses it for
 * every implementation but the sequential one.
 */
struct bench_inflight {
    atomic_uint cur;
    atomic_uint max;
    atomic_ulong on_loop; /* items whose work ran on the loop thread */
    pthread_t loop;       /* the thread that called bench_inflight_init */
};

/* Zeroes the counters; the calling thread becomes the loop thread. */
void bench_inflight_init(struct bench_inflight *f);

static inline void bench_inflight_enter(struct bench_inflight *f)
{
    if (pthread_equal(pthread_self(), f->loop))
        atomic_fetch_add_explicit(&f->on_loop, 1, memory_order_relaxed);
    unsigned cur =
        atomic_fetch_add_explicit(&f->cur, 1, memory_order_relaxed) + 1;
    unsigned max = atomic_load_explicit(&f->max, memory_order_relaxed);
    while (cur > max &&
           !atomic_compare_exchange_weak_explicit(
               &f->max, &max, cur, memory_order_relaxed,
               memory_order_relaxed))
        ;
}

static inline void bench_inflight_leave(struct bench_inflight *f)
{
    atomic_fetch_sub_explicit(&f->cur, 1, memory_order_relaxed);
}

/* bench_check() flags. */
enum {
    BENCH_WORK_ON_LOOP = 1u << 0 /* the work may run on the loop thread */
};

/*
 * Checks the run: every item delivered exactly once with the value of a
 * sequential recomputation (bench_work(i, iters)); the maximum in flight
 * within [1, limit]; no work on the loop thread unless the flags allow it.
 * Prints one diagnostic line per kind of problem to stderr.  Returns true
 * when everything holds.
 */
bool bench_check(const struct bench_results *r, const struct bench_args *a,
                 const struct bench_inflight *f, unsigned flags);

/* Prints the one output line to stdout (see above) and returns the exit
 * status to use: 0 if ok, else 1 (or 3 when `failed`, meaning an API call
 * of the implementation returned an error; that also forces check=BAD). */
int bench_report(const char *impl, const struct bench_args *a,
                 uint64_t elapsed_ns, bool ok, bool failed);

#endif /* BENCH_COMMON_H */
