/* SPDX-License-Identifier: MIT */
/* uv-driver: drives a df_loop from a libuv event loop instead of
 * df_loop_run(), squaring 1..100 on a thread pool and printing the sum.
 *
 * The df_loop is made to be embedded: df_loop_fd() becomes readable when
 * completions are waiting, df_loop_timeout_ms() says how long the df_loop
 * may be left alone (its next timer), and df_loop_dispatch() runs what is
 * ready without blocking.  So libuv watches the fd with a uv_poll_t, a
 * uv_timer_t stands for the timeout, and after every dispatch the uv timer
 * is re-armed with the new timeout.  The timeout is honoured whatever it
 * is: it is what df_loop_run() itself would pass to poll(2).  A program
 * that also calls into the library from other uv callbacks re-arms the
 * timer after those calls too.  Everything else (the semaphore, the pool,
 * the gather) is used exactly as under df_loop_run(). */
#include <deferred.h>

#include <fcntl.h>
#include <getopt.h>
#include <stdbool.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

#include "example-util.h"

#define JOBS 100
#define LIMIT 4   /* jobs on the pool at once */
#define THREADS 2 /* pool threads */
#define BUDGET 16 /* completions per dispatch, so that libuv keeps its say */
#define DEADLINE_NS (30ull * 1000000000u) /* for the whole batch */

/* The program's name in messages (see example_name). */
static const char *prog = "uv-driver";

typedef struct app {
    df_loop *loop;
    uv_poll_t poll;   /* on df_loop_fd() */
    uv_timer_t timer; /* for the df_loop's timers */
    bool done;        /* the gather fired: the uv handles are closing */
    int status;       /* the exit status */
    unsigned polls;   /* wakeups by the fd */
    unsigned timers;  /* wakeups by the timer */
} app;

/* ------------------------------------------------------------- the work */

/* Pool thread: squares the job's number.  The result is heap-allocated to
 * show the ownership: it moves into the gather's result, whose destructor
 * frees it. */
static df_result square(df_work *w, void *arg)
{
    uint64_t i = (uint64_t)(uintptr_t)arg;
    uint64_t *v = malloc(sizeof *v);
    if (v == NULL)
        return df_errf(df_work_loop(w), DF_ENOMEM, "job %" PRIu64, i);
    *v = i * i;
    return df_ok(v, free);
}

/* ------------------------------------------------- the libuv integration */

static void on_closed(uv_handle_t *h)
{
    (void)h; /* the handles live in `app`: nothing to free */
}

/* Stops watching the df_loop: once both handles are closed uv_run()
 * returns, having nothing left to do. */
static void stop_watching(app *a)
{
    if (a->done)
        return;
    a->done = true;
    uv_poll_stop(&a->poll);
    uv_timer_stop(&a->timer);
    uv_close((uv_handle_t *)&a->poll, on_closed);
    uv_close((uv_handle_t *)&a->timer, on_closed);
}

static void on_timer(uv_timer_t *t);

/* Runs what the df_loop has ready, then points the uv timer at the
 * df_loop's next timer.  Callbacks (the gather's among them) run inside
 * df_loop_dispatch(), on this, the loop thread. */
static void dispatch(app *a)
{
    int rc = df_loop_dispatch(a->loop, BUDGET, NULL);
    if (rc != 0) {
        fprintf(stderr, "%s: df_loop_dispatch: %s\n", prog, df_strerror(rc));
        a->status = EXIT_FAILURE;
        stop_watching(a);
    }
    if (a->done)
        return;
    /* Whatever is left over the budget keeps the fd readable, and libuv
     * polls level-triggered, so it comes back here on its next turn. */
    int ms = df_loop_timeout_ms(a->loop);
    if (ms < 0)
        uv_timer_stop(&a->timer);
    else
        uv_timer_start(&a->timer, on_timer, (uint64_t)ms, 0);
}

static void on_readable(uv_poll_t *p, int status, int events)
{
    app *a = p->data;
    (void)events;
    if (status < 0) {
        fprintf(stderr, "%s: polling the df_loop: %s\n", prog,
                uv_strerror(status));
        a->status = EXIT_FAILURE;
        stop_watching(a);
        return;
    }
    a->polls++;
    dispatch(a);
}

static void on_timer(uv_timer_t *t)
{
    app *a = t->data;
    a->timers++;
    dispatch(a);
}

/* ------------------------------------------------------ the loop thread */

/* The gather fired with every square, in input order. */
static df_result print_sum(df_result r, void *arg)
{
    app *a = arg;
    const df_list_result *lr = r.value;
    uint64_t sum = 0;
    for (size_t i = 0; i < df_list_result_count(lr); i++)
        sum += *(const uint64_t *)df_list_result_value(lr, i);
    printf("sum=%" PRIu64 "\n", sum);
    stop_watching(a);
    return r; /* the chain keeps the result; releasing it frees it */
}

/* The gather failed (a job failed, or the deadline passed). */
static df_result print_failure(df_result r, void *arg)
{
    app *a = arg;
    df_failure *f = r.failure;
    if (df_failure_cause(f) != NULL)
        fprintf(stderr, "%s: job %ld failed: %s\n", prog, df_failure_index(f),
                df_failure_message(df_failure_cause(f)));
    else
        fprintf(stderr, "%s: %s\n", prog, df_failure_message(f));
    a->status = EXIT_FAILURE;
    stop_watching(a);
    df_result_clear(&r); /* handled here */
    return r;
}

static int fail(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, df_strerror(rc));
    return EXIT_FAILURE;
}

static int uv_fail(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, uv_strerror(rc));
    return EXIT_FAILURE;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [-h]\n"
            "Drives a df_loop from a libuv loop: squares 1..100 on a pool "
            "of 2 threads,\n"
            "at most 4 at once, and prints \"sum=338350\".\n"
            "  -h, --help  this help\n",
            prog);
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    app a = {0};
    uv_loop_t uv;
    df_pool *pool;
    df_sem *sem;
    df_deferred *runs[JOBS], *all;
    int rc, c;

    prog = argv[0] = example_name(argv[0], "uv-driver");
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        if (c == 'h') {
            usage(stdout);
            return example_close_stdout(prog, EXIT_SUCCESS);
        }
        usage(stderr); /* getopt_long has named the problem */
        return 2;
    }
    if (optind != argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
        usage(stderr);
        return 2;
    }

    a.status = EXIT_SUCCESS;
    /* With stdout closed, libuv's first descriptor would become fd 1 and
     * it aborts on an assertion when it closes it; the writes to stdout
     * would also go to libuv's descriptor.  Fill 0-2 with /dev/null, and
     * remember whether stdout was closed, which is an output error. */
    bool stdout_closed = fcntl(1, F_GETFD) == -1;
    if (example_keep_stdio() != 0) {
        fprintf(stderr, "%s: cannot open /dev/null\n", prog);
        return EXIT_FAILURE;
    }
    if (stdout_closed) {
        fprintf(stderr, "%s: writing output: standard output is closed\n",
                prog);
        return EXIT_FAILURE;
    }
    if ((rc = uv_loop_init(&uv)) != 0)
        return uv_fail("uv_loop_init", rc);
    if ((rc = df_loop_new(NULL, &a.loop)) != 0)
        return fail("df_loop_new", rc);
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = THREADS;
    if ((rc = df_pool_new(a.loop, &po, &pool)) != 0)
        return fail("df_pool_new", rc);
    if ((rc = df_sem_new(a.loop, LIMIT, &sem)) != 0)
        return fail("df_sem_new", rc);

    /* The first LIMIT jobs go to the pool now; the rest wait for tokens,
     * which come back as completions are dispatched from libuv. */
    for (uintptr_t i = 0; i < JOBS; i++) {
        rc = df_sem_run_in_pool(sem, pool, square, (void *)(i + 1), &runs[i]);
        if (rc != 0)
            return fail("df_sem_run_in_pool", rc);
    }
    /* CONSUME_ERRORS: should jobs fail, the gather's failure reports the
     * first one, and the jobs' own chains leave nothing unhandled. */
    /* TAKE_REFS: the gather takes over our reference to each run. */
    if ((rc = df_gather(a.loop, runs, JOBS,
                        DF_LIST_CONSUME_ERRORS | DF_LIST_TAKE_REFS, &all)) != 0)
        return fail("df_gather", rc);
    /* A df_loop timer, so that the uv timer has something to wait for. */
    if ((rc = df_deferred_set_timeout(all, DEADLINE_NS)) != 0)
        return fail("df_deferred_set_timeout", rc);
    if ((rc = df_deferred_add_callbacks(all, print_sum, print_failure, &a)) !=
        0)
        return fail("df_deferred_add_callbacks", rc);

    if ((rc = uv_poll_init(&uv, &a.poll, df_loop_fd(a.loop))) != 0)
        return uv_fail("uv_poll_init", rc);
    if ((rc = uv_timer_init(&uv, &a.timer)) != 0)
        return uv_fail("uv_timer_init", rc);
    a.poll.data = &a;
    a.timer.data = &a;
    if ((rc = uv_poll_start(&a.poll, UV_READABLE, on_readable)) != 0)
        return uv_fail("uv_poll_start", rc);
    /* Nothing has been dispatched yet: arm the timer for the deadline. */
    dispatch(&a);

    if ((rc = uv_run(&uv, UV_RUN_DEFAULT)) < 0)
        return uv_fail("uv_run", rc);
    fprintf(stderr, "%s: %d jobs, %u fd wakeups, %u timer wakeups\n", prog,
            JOBS, a.polls, a.timers);

    /* Done with the gather (it fired, so its deadline timer is gone).  The
     * pool goes first: freeing it settles any job still out, which hands
     * every token back to the semaphore. */
    df_deferred_unref(all);
    df_pool_free(pool);
    if ((rc = df_sem_free(sem)) != 0)
        a.status = fail("df_sem_free", rc);
    if ((rc = df_loop_free(a.loop)) != 0)
        a.status = fail("df_loop_free", rc);
    if ((rc = uv_loop_close(&uv)) != 0)
        a.status = uv_fail("uv_loop_close", rc);
    return example_close_stdout(prog, a.status);
}
