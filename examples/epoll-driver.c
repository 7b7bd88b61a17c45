/* SPDX-License-Identifier: MIT */
/* epoll-driver: drives a df_loop from an epoll(7) loop of one's own instead
 * of df_loop_run(), counting the primes below N in ranges on a thread pool.
 *
 *     epoll-driver -n 100000      prints "primes=9592"
 *
 * The df_loop is made to be embedded: df_loop_fd() becomes readable when
 * completions or cross-thread calls are waiting, df_loop_timeout_ms() says
 * how long the df_loop may be left alone (its next timer, or a short bound
 * while df_sem_run_in_pool jobs are in flight), and df_loop_dispatch() runs
 * what is ready without blocking.  So the fd goes into an epoll set next to
 * whatever else the program watches (here: nothing), epoll_wait() sleeps
 * with that timeout, and every wake-up dispatches.  The fd is watched
 * level-triggered: work left over the dispatch budget keeps it readable. */
#include <deferred.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "example-util.h"

#define RANGE 1000     /* numbers per job */
#define LIMIT 4        /* jobs on the pool at once */
#define THREADS 2      /* pool threads */
#define BUDGET 16      /* completions per dispatch */
#define MAX_N 100000000ul
#define DEADLINE_NS (60ull * 1000000000u) /* for the whole count */

/* The program's name in messages (see example_name). */
static const char *prog = "epoll-driver";

/* One job: count the primes in [lo, hi). */
typedef struct range {
    uint64_t lo, hi;
} range;

/* ------------------------------------------------------------- the work */

static bool is_prime(uint64_t n)
{
    if (n < 2)
        return false;
    for (uint64_t d = 2; d * d <= n; d++)
        if (n % d == 0)
            return false;
    return true;
}

/* Pool thread: the count, carried in the pointer itself (no destructor). */
static df_result count_primes(df_work *w, void *arg)
{
    const range *r = arg;
    uintptr_t count = 0;
    for (uint64_t n = r->lo; n < r->hi; n++) {
        if (df_work_cancelled(w))
            return df_errf(df_work_loop(w), DF_ECANCELLED, "cancelled");
        count += is_prime(n);
    }
    return df_ok((void *)count, NULL);
}

/* ------------------------------------------------------ the loop thread */

typedef struct app {
    bool done;    /* the gather fired */
    int status;   /* exit status */
    uint64_t primes;
} app;

static df_result on_counts(df_result r, void *arg)
{
    app *a = arg;
    const df_list_result *lr = r.value;
    for (size_t i = 0; i < df_list_result_count(lr); i++)
        a->primes += (uintptr_t)df_list_result_value(lr, i);
    a->done = true;
    return r; /* the chain frees the result */
}

static df_result on_failure(df_result r, void *arg)
{
    app *a = arg;
    df_failure *f = r.failure;
    fprintf(stderr, "%s: %s\n", prog,
            df_failure_message(df_failure_cause(f) ? df_failure_cause(f) : f));
    a->status = EXIT_FAILURE;
    a->done = true;
    df_result_clear(&r); /* handled here */
    return r;
}

/* The driver: epoll_wait on the df_loop's fd with its timeout, dispatch,
 * until the gather has fired.  Returns 0 or a negative error code. */
static int drive(df_loop *loop, const app *a, unsigned *wakeups)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        return -errno;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = loop};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, df_loop_fd(loop), &ev) != 0) {
        int rc = -errno;
        close(ep);
        return rc;
    }
    int rc = 0;
    while (!a->done) {
        int ms = df_loop_timeout_ms(loop);
        if (ms < -1) { /* an error code, not a timeout */
            rc = ms;
            break;
        }
        struct epoll_event got[4];
        int n = epoll_wait(ep, got, 4, ms);
        if (n < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
        (*wakeups)++;
        /* Whether the fd or the timeout woke us, dispatch what is ready. */
        if ((rc = df_loop_dispatch(loop, BUDGET, NULL)) != 0)
            break;
    }
    close(ep);
    return rc;
}

/* ----------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [-n N]\n"
            "Counts the primes below N on a pool of %d threads, %d ranges "
            "of %d at once,\n"
            "driving the df_loop from epoll_wait(2), and prints "
            "\"primes=COUNT\".\n"
            "  -n N        the bound (default 100000, at most %lu)\n"
            "  -h, --help  this help\n",
            prog, THREADS, LIMIT, RANGE, MAX_N);
}

static int fail(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, df_strerror(rc));
    return EXIT_FAILURE;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    unsigned long n = 100000;
    int c;

    prog = argv[0] = example_name(argv[0], "epoll-driver");
    while ((c = getopt_long(argc, argv, "n:h", longopts, NULL)) != -1) {
        char *end;
        switch (c) {
        case 'n':
            errno = 0;
            n = strtoul(optarg, &end, 10);
            if (errno != 0 || end == optarg || *end != '\0' ||
                optarg[0] == '-' || n > MAX_N) {
                fprintf(stderr, "%s: bad value for -n: %s\n", prog, optarg);
                usage(stderr);
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return example_close_stdout(prog, EXIT_SUCCESS);
        default:
            usage(stderr); /* getopt_long has named the problem */
            return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
        usage(stderr);
        return 2;
    }

    size_t jobs = (n + RANGE - 1) / RANGE;
    range *ranges = calloc(jobs ? jobs : 1, sizeof *ranges);
    df_deferred **runs = calloc(jobs ? jobs : 1, sizeof *runs);
    if (ranges == NULL || runs == NULL) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return EXIT_FAILURE;
    }

    app a = {false, EXIT_SUCCESS, 0};
    df_loop *loop;
    df_pool *pool;
    df_sem *sem;
    df_deferred *all;
    int rc;
    if ((rc = df_loop_new(NULL, &loop)) != 0)
        return fail("df_loop_new", rc);
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = THREADS;
    if ((rc = df_pool_new(loop, &po, &pool)) != 0)
        return fail("df_pool_new", rc);
    if ((rc = df_sem_new(loop, LIMIT, &sem)) != 0)
        return fail("df_sem_new", rc);
    for (size_t i = 0; i < jobs; i++) {
        ranges[i].lo = (uint64_t)i * RANGE;
        ranges[i].hi = ranges[i].lo + RANGE < n ? ranges[i].lo + RANGE : n;
        rc = df_sem_run_in_pool(sem, pool, count_primes, &ranges[i], &runs[i]);
        if (rc != 0)
            return fail("df_sem_run_in_pool", rc);
    }
    /* TAKE_REFS: the gather takes over our reference to each run. */
    if ((rc = df_gather(loop, runs, jobs,
                        DF_LIST_CONSUME_ERRORS | DF_LIST_TAKE_REFS, &all)) != 0)
        return fail("df_gather", rc);
    /* A df_loop timer, so that the epoll timeout has something to do. */
    if ((rc = df_deferred_set_timeout(all, DEADLINE_NS)) != 0)
        return fail("df_deferred_set_timeout", rc);
    if ((rc = df_deferred_add_callbacks(all, on_counts, on_failure, &a)) != 0)
        return fail("df_deferred_add_callbacks", rc);

    unsigned wakeups = 0;
    if ((rc = drive(loop, &a, &wakeups)) != 0) {
        fail("driving the loop", rc);
        a.status = EXIT_FAILURE;
        /* Cancel and let df_loop_run settle what is left. */
        df_deferred_cancel(all);
        df_loop_run(loop);
    }
    if (a.status == EXIT_SUCCESS)
        printf("primes=%" PRIu64 "\n", a.primes);
    fprintf(stderr, "%s: %zu jobs, %u epoll wake-ups\n", prog, jobs, wakeups);

    df_deferred_unref(all);
    df_pool_free(pool);
    if ((rc = df_sem_free(sem)) != 0)
        a.status = fail("df_sem_free", rc);
    if ((rc = df_loop_free(loop)) != 0)
        a.status = fail("df_loop_free", rc);
    free(ranges);
    free(runs);
    return example_close_stdout(prog, a.status);
}
