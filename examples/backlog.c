/* SPDX-License-Identifier: MIT */
/* backlog: the seed's motivating scenario at scale, a backlog of simulated
 * sends run through a semaphore of K tokens on a pool of T threads, with
 * every outcome gathered by one deferred list.
 *
 *     backlog -n 20000 -k 8 -t 4 -w 200 -f 0.05
 *
 * Each send is a CPU loop of about --work-us microseconds (the loop is
 * calibrated at start) after which a deterministic pseudo-random share of
 * the sends fail on purpose.  The work functions count how many of them
 * run at once: the program checks that this never exceeds K, and that the
 * list recorded exactly the successes and failures that were expected. */
#include <deferred.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "example-util.h"

/* The program's name in messages (see example_name). */
static const char *prog = "backlog";

/* The code a failed send carries; any nonzero int would do. */
#define SEND_FAILED DF_EFAILED

#define PROGRESS_NS 200000000u /* a progress line every 200 ms */

#define MAX_ITEMS 10000000ul
#define MAX_LIMIT 1000000ul
#define MAX_THREADS 1024ul
#define MAX_WORK_US 10000000ul
#define MAX_ITERS (1ull << 40)

/* What every work function reads (the settings) and writes (the atomic
 * counters).  It outlives the pool, so workers never see it freed. */
typedef struct shared {
    uint64_t iters;       /* CPU loop iterations per send */
    uint64_t seed;        /* decides which sends fail */
    double fail_rate;     /* share of sends that fail, 0..1 */
    atomic_uint running;  /* work functions running now */
    atomic_uint peak;     /* most work functions ever running at once */
    atomic_size_t sent;   /* sends that returned success */
    atomic_size_t failed; /* sends that returned failure */
} shared;

/* One send: the work function's argument. */
typedef struct job {
    shared *sh;
    size_t index;
} job;

typedef struct app {
    df_loop *loop;
    shared *sh;
    size_t items;
    uint64_t started; /* df_loop_now() when the first send was queued */
    df_timer *timer;  /* the pending progress timer, or NULL */
    bool shown;       /* a progress line is on the screen */
    df_sem *sem;
    unsigned held_peak; /* most sends ever holding a token at once */
} app;

/* Loop thread: notes how many sends hold a semaphore token now (queued in
 * the pool or running); sampled after each submit and each completion. */
static void sample_held(app *a)
{
    unsigned held = df_sem_limit(a->sem) - df_sem_tokens(a->sem);
    if (held > a->held_peak)
        a->held_peak = held;
}

static df_result on_done_sample(df_result r, void *arg)
{
    sample_held(arg);
    return r;
}

/* ------------------------------------------------------------- the work */

/* The simulated send's CPU work: `iters` rounds of xorshift64. */
static uint64_t spin(uint64_t x, uint64_t iters)
{
    for (uint64_t i = 0; i < iters; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

/* SplitMix64 of (seed, index): a well-mixed 64-bit value per item. */
static uint64_t mix(uint64_t seed, uint64_t index)
{
    uint64_t z = seed + (index + 1) * 0x9e3779b97f4a7c15u;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

/* Whether send `index` fails on purpose.  The main thread asks the same
 * question up front to know how many failures to expect. */
static bool send_fails(const shared *sh, size_t index)
{
    /* The top 53 bits as a double in [0, 1). */
    double u = (double)(mix(sh->seed, index) >> 11) / 9007199254740992.0;
    return u < sh->fail_rate;
}

/* Pool thread: one simulated send.  Its success value is the spin's
 * result, a "receipt" with no destructor, so the loop cannot be optimised
 * away and nothing needs freeing. */
static df_result send_item(df_work *w, void *arg)
{
    const job *j = arg;
    shared *sh = j->sh;

    /* Count this send as running and raise the peak if it is a new one. */
    unsigned now = atomic_fetch_add(&sh->running, 1) + 1;
    unsigned peak = atomic_load(&sh->peak);
    while (now > peak && !atomic_compare_exchange_weak(&sh->peak, &peak, now))
        ;

    uint64_t receipt = spin(mix(sh->seed, j->index) | 1, sh->iters);
    df_result r;
    if (send_fails(sh, j->index)) {
        atomic_fetch_add(&sh->failed, 1);
        r = df_errf(df_work_loop(w), SEND_FAILED, "send %zu failed", j->index);
    } else {
        atomic_fetch_add(&sh->sent, 1);
        r = df_ok((void *)(uintptr_t)receipt, NULL);
    }
    atomic_fetch_sub(&sh->running, 1);
    return r;
}

/* Nanoseconds for `iters` rounds of spin() on this thread. */
static uint64_t time_spin(uint64_t iters)
{
    struct timespec a, b;
    static volatile uint64_t sink; /* keeps the loop; written only here */
    clock_gettime(CLOCK_MONOTONIC, &a);
    sink = spin(0x2545f4914f6cdd1du, iters);
    clock_gettime(CLOCK_MONOTONIC, &b);
    (void)sink;
    return (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u + (uint64_t)b.tv_nsec -
           (uint64_t)a.tv_nsec;
}

/* Iterations of spin() per microsecond, measured for about 20 ms: the
 * best of a few runs, so that a preempted run does not count. */
static double calibrate(void)
{
    uint64_t iters = 1u << 16, ns;
    while ((ns = time_spin(iters)) < 5000000u && iters < MAX_ITERS)
        iters *= 2;
    for (int i = 0; i < 3; i++) {
        uint64_t t = time_spin(iters);
        if (t < ns)
            ns = t;
    }
    return ns > 0 ? (double)iters * 1000.0 / (double)ns : 1000.0;
}

/* ------------------------------------------------------ the loop thread */

static void show_progress(app *a)
{
    shared *sh = a->sh;
    size_t sent = atomic_load(&sh->sent), failed = atomic_load(&sh->failed);
    double secs = (double)(df_loop_now(a->loop) - a->started) / 1e9;
    fprintf(stderr,
            "\r%s: %zu/%zu done, %zu failed, %u in flight, %u running, "
            "%.0f items/s\033[K",
            prog, sent + failed, a->items, failed,
            df_sem_limit(a->sem) - df_sem_tokens(a->sem),
            atomic_load(&sh->running), secs > 0 ? (double)(sent + failed) / secs : 0.0);
    a->shown = true;
}

/* The progress timer: prints a line and re-arms itself.  Its handle is
 * stale once it runs, so it is forgotten first. */
static void on_progress(void *arg, int status)
{
    app *a = arg;
    a->timer = NULL;
    if (status != 0)
        return;
    show_progress(a);
    if (df_loop_call_later(a->loop, PROGRESS_NS, on_progress, a, &a->timer) !=
        0)
        a->timer = NULL; /* no more progress lines; nothing else breaks */
}

/* An errback that drops the failure: for runs abandoned on a setup error,
 * whose failures are expected and of no interest. */
static df_result consume(df_result r, void *arg)
{
    (void)arg;
    df_result_clear(&r);
    return r;
}

/* Setup failed after `n` runs were queued: cancel them, let the loop
 * settle every one (running sends finish first) and release them. */
static void abandon(df_loop *loop, df_deferred **runs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        df_deferred_add_errback(runs[i], consume, NULL);
        df_deferred_cancel(runs[i]);
    }
    df_loop_run(loop);
    for (size_t i = 0; i < n; i++)
        df_deferred_unref(runs[i]);
}

/* ----------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [OPTION]...\n"
            "Runs a backlog of simulated sends (CPU work) through a "
            "semaphore of K tokens\n"
            "on a pool of T threads, gathers every outcome with a deferred "
            "list and prints\n"
            "a summary: sent, failed, elapsed, items/s, the peak number "
            "of sends in\n"
            "flight (holding a token: queued or running), which must "
            "never exceed K, and\n"
            "the peak number running (at most the smaller of K and T).\n"
            "\n"
            "  -n, --items N       number of sends (default 20000)\n"
            "  -k, --limit K       semaphore tokens: most sends at once "
            "(default 8)\n"
            "  -t, --threads T     pool threads (default: online CPUs)\n"
            "  -w, --work-us US    CPU time per send in microseconds, "
            "roughly (default 200)\n"
            "  -i, --iters N       CPU loop iterations per send instead of "
            "calibrating -w\n"
            "  -f, --fail-rate R   share of sends failing on purpose, 0 to 1 "
            "(default 0.05)\n"
            "  -s, --seed S        decides which sends fail (default 1)\n"
            "  -q, --quiet         no progress or notes on stderr\n"
            "  -h, --help          this help\n"
            "\n"
            "A progress line goes to stderr when it is a terminal.  Exit "
            "status: 0 on success\n"
            "(failed sends are expected), 1 if the limit was exceeded or the "
            "counts do not\n"
            "add up, 2 on a usage error.\n",
            prog);
}

static bool parse_u64(const char *s, unsigned long long max,
                      unsigned long long *val)
{
    char *end;
    errno = 0;
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s == '-' || *s == '+')
        return false;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v > max)
        return false;
    *val = v;
    return true;
}

static bool parse_rate(const char *s, double *val)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !isfinite(v) || v < 0 ||
        v > 1)
        return false;
    *val = v;
    return true;
}

static int fail(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, df_strerror(rc));
    return EXIT_FAILURE;
}

/* Checks the list result against what the work functions counted and what
 * the seed predicts; prints each discrepancy and returns their number. */
static int check_result(const df_list_result *lr, const shared *sh,
                        size_t items, size_t expect_failed, size_t *okp,
                        size_t *failedp)
{
    size_t ok = 0, failed = 0;
    int bad = 0;

    if (df_list_result_count(lr) != items) {
        fprintf(stderr, "%s: list has %zu results for %zu items\n", prog,
                df_list_result_count(lr), items);
        bad++;
    }
    for (size_t i = 0; i < df_list_result_count(lr); i++) {
        if (df_list_result_ok(lr, i)) {
            ok++;
            continue;
        }
        failed++;
        df_failure *f = df_list_result_failure(lr, i);
        if (!df_list_result_fired(lr, i) || f == NULL) {
            fprintf(stderr, "%s: item %zu has no outcome\n", prog, i);
            bad++;
        } else if (df_failure_code(f) != SEND_FAILED || !send_fails(sh, i)) {
            /* Only the failures made on purpose are expected. */
            fprintf(stderr, "%s: item %zu: unexpected failure: %s (%s)\n", prog,
                    i, df_failure_message(f), df_err_name(df_failure_code(f)));
            bad++;
        }
    }
    if (ok + failed != items || failed != expect_failed ||
        ok != atomic_load(&sh->sent) || failed != atomic_load(&sh->failed)) {
        fprintf(stderr,
                "%s: counts do not add up: list %zu ok + %zu failed, "
                "workers %zu ok + %zu failed, %zu items, %zu failures "
                "expected\n", prog,
                ok, failed, atomic_load(&sh->sent), atomic_load(&sh->failed),
                items, expect_failed);
        bad++;
    }
    *okp = ok;
    *failedp = failed;
    return bad;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"items", required_argument, NULL, 'n'},
        {"limit", required_argument, NULL, 'k'},
        {"threads", required_argument, NULL, 't'},
        {"work-us", required_argument, NULL, 'w'},
        {"iters", required_argument, NULL, 'i'},
        {"fail-rate", required_argument, NULL, 'f'},
        {"seed", required_argument, NULL, 's'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    unsigned long long items = 20000, limit = 8, threads, work_us = 200;
    unsigned long long iters = 0, seed = 1;
    double fail_rate = 0.05;
    bool quiet = false, have_iters = false;
    int c;

    prog = argv[0] = example_name(argv[0], "backlog");
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    threads = ncpu > 0 ? (unsigned long long)ncpu : 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    while ((c = getopt_long(argc, argv, "n:k:t:w:i:f:s:qh", longopts, NULL)) !=
           -1) {
        bool ok = true;
        const char *want = NULL;
        switch (c) {
        case 'n':
            ok = parse_u64(optarg, MAX_ITEMS, &items);
            want = "an integer from 0 to 10000000";
            break;
        case 'k':
            ok = parse_u64(optarg, MAX_LIMIT, &limit) && limit > 0;
            want = "an integer from 1 to 1000000";
            break;
        case 't':
            ok = parse_u64(optarg, MAX_THREADS, &threads) && threads > 0;
            want = "an integer from 1 to 1024";
            break;
        case 'w':
            ok = parse_u64(optarg, MAX_WORK_US, &work_us);
            want = "an integer from 0 to 10000000";
            break;
        case 'i':
            ok = parse_u64(optarg, MAX_ITERS, &iters);
            have_iters = true;
            want = "an integer from 0 to 2^40";
            break;
        case 'f':
            ok = parse_rate(optarg, &fail_rate);
            want = "a number from 0 to 1";
            break;
        case 's':
            ok = parse_u64(optarg, UINT64_MAX, &seed);
            want = "an unsigned 64-bit integer";
            break;
        case 'q':
            quiet = true;
            break;
        case 'h':
            usage(stdout);
            return example_close_stdout(prog, EXIT_SUCCESS);
        default:
            usage(stderr); /* getopt_long has named the problem */
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "%s: invalid value '%s' for -%c: want %s\n", prog,
                    optarg, c, want);
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
        usage(stderr);
        return 2;
    }

    shared sh = {0};
    sh.seed = seed;
    sh.fail_rate = fail_rate;
    if (have_iters) {
        sh.iters = iters;
    } else if (work_us > 0) {
        double per_us = calibrate();
        sh.iters = (uint64_t)(per_us * (double)work_us + 0.5);
        if (sh.iters == 0)
            sh.iters = 1;
    }
    atomic_init(&sh.running, 0);
    atomic_init(&sh.peak, 0);
    atomic_init(&sh.sent, 0);
    atomic_init(&sh.failed, 0);

    size_t n = (size_t)items, expect_failed = 0;
    for (size_t i = 0; i < n; i++)
        expect_failed += send_fails(&sh, i);

    app a = {0};
    a.sh = &sh;
    a.items = n;
    job *jobs = calloc(n > 0 ? n : 1, sizeof *jobs);
    df_deferred **runs = calloc(n > 0 ? n : 1, sizeof *runs);
    if (jobs == NULL || runs == NULL) {
        fprintf(stderr, "%s: out of memory for %zu items\n", prog, n);
        free(jobs);
        free(runs);
        return EXIT_FAILURE;
    }

    df_pool *pool;
    df_sem *sem;
    df_deferred *list;
    int rc;

    if ((rc = df_loop_new(NULL, &a.loop)) != 0)
        return fail("df_loop_new", rc);
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = (unsigned)threads;
    if ((rc = df_pool_new(a.loop, &po, &pool)) != 0)
        return fail("df_pool_new", rc);
    if ((rc = df_sem_new(a.loop, (unsigned)limit, &sem)) != 0)
        return fail("df_sem_new", rc);
    a.sem = sem;
    if (!quiet)
        fprintf(stderr,
                "%s: %zu sends of %" PRIu64 " iterations (~%llu us), "
                "limit %llu, %llu threads, %zu failing on purpose\n",
                prog, n, sh.iters, have_iters ? 0ull : work_us, limit, threads,
                expect_failed);

    /* Queue every send.  The first K are submitted to the pool at once;
     * the rest wait for a token in FIFO order. */
    a.started = df_loop_now(a.loop);
    for (size_t i = 0; i < n; i++) {
        jobs[i] = (job){&sh, i};
        rc = df_sem_run_in_pool(sem, pool, send_item, &jobs[i], &runs[i]);
        if (rc != 0) {
            abandon(a.loop, runs, i);
            return fail("df_sem_run_in_pool", rc);
        }
        sample_held(&a);
        if ((rc = df_deferred_add_both(runs[i], on_done_sample, &a)) != 0) {
            abandon(a.loop, runs, i + 1);
            return fail("df_deferred_add_both", rc);
        }
    }
    /* CONSUME_ERRORS: a failed send is recorded in the list's result and
     * its own chain goes on with success, so nothing is left to be
     * reported as unhandled when the runs are released.  TAKE_REFS: the
     * list takes over our reference to each run (on failure we keep
     * them). */
    rc = df_list_new(a.loop, runs, n,
                     DF_LIST_CONSUME_ERRORS | DF_LIST_TAKE_REFS, &list);
    if (rc != 0) {
        abandon(a.loop, runs, n);
        return fail("df_list_new", rc);
    }
    free(runs);

    if (!quiet && isatty(STDERR_FILENO)) {
        rc = df_loop_call_later(a.loop, PROGRESS_NS, on_progress, &a, &a.timer);
        if (rc != 0)
            a.timer = NULL; /* run without progress lines */
    }
    rc = df_loop_run_until(a.loop, list);
    uint64_t elapsed_ns = df_loop_now(a.loop) - a.started;
    if (a.timer != NULL)
        df_timer_cancel(a.timer);
    if (a.shown) {
        show_progress(&a);
        fputc('\n', stderr);
    }
    if (rc != 0)
        return fail("df_loop_run_until", rc);

    int status = EXIT_SUCCESS;
    void *value = NULL;
    df_failure *f = NULL;
    size_t ok = 0, failed = 0;
    if ((rc = df_deferred_peek(list, &value, &f)) != 0)
        return fail("df_deferred_peek", rc);
    if (f != NULL) {
        fprintf(stderr, "%s: the list failed: %s\n", prog,
                df_failure_message(f));
        df_deferred_add_errback(list, consume, NULL); /* reported here */
        status = EXIT_FAILURE;
    } else if (check_result(value, &sh, n, expect_failed, &ok, &failed) != 0) {
        status = EXIT_FAILURE;
    }
    if (!quiet && failed > 0 && f == NULL) {
        /* Show one failure, to show what the list recorded. */
        const df_list_result *lr = value;
        for (size_t i = 0; i < n; i++) {
            if (!df_list_result_ok(lr, i)) {
                fprintf(stderr, "%s: e.g. item %zu: %s\n", prog, i,
                        df_failure_message(df_list_result_failure(lr, i)));
                break;
            }
        }
    }

    unsigned peak = atomic_load(&sh.peak);
    double secs = (double)elapsed_ns / 1e9;
    /* In flight: holding a token (queued in the pool or running); running:
     * inside the work function, so also bounded by the threads. */
    printf("sent=%zu failed=%zu elapsed=%.2fs rate=%.0f items/s "
           "peak_in_flight=%u peak_running=%u limit=%llu threads=%llu\n",
           ok, failed, secs, secs > 0 ? (double)n / secs : 0.0, a.held_peak,
           peak, limit, threads);
    if (peak > limit || a.held_peak > limit) {
        fprintf(stderr, "%s: %u sends held tokens and %u ran at once, "
                        "above the limit %llu\n", prog,
                a.held_peak, peak, limit);
        status = EXIT_FAILURE;
    }

    /* Releasing the list frees its result (the receipts have no
     * destructor).  The pool goes before the semaphore: every token is
     * back once the list has fired. */
    df_deferred_unref(list);
    df_pool_free(pool);
    if ((rc = df_sem_free(sem)) != 0) {
        fail("df_sem_free", rc);
        status = EXIT_FAILURE;
    }
    if (df_loop_unhandled_count(a.loop) != 0) {
        fprintf(stderr, "%s: %" PRIu64 " unhandled failures\n", prog,
                df_loop_unhandled_count(a.loop));
        status = EXIT_FAILURE;
    }
    if ((rc = df_loop_free(a.loop)) != 0) {
        fail("df_loop_free", rc);
        status = EXIT_FAILURE;
    }
    free(jobs);
    return example_close_stdout(prog, status);
}
