/* SPDX-License-Identifier: MIT */
/* glib-driver: drives a df_loop inside a GLib main context, squaring 1..100
 * on a thread pool and printing the sum.
 *
 * The adapter is a GSource (df_source_new below, about 60 lines, meant to
 * be copied): it polls df_loop_fd() for readability, turns
 * df_loop_timeout_ms() into the source's timeout in prepare(), and calls
 * df_loop_dispatch() in dispatch().  GLib asks prepare() again before every
 * poll, so the timeout always reflects timers made by any callback.  Once
 * the source is attached, g_main_loop_run() (or a GTK main loop) runs every
 * deferred callback on the thread that runs the context, which must be the
 * df_loop's loop thread.  Everything else (the semaphore, the pool, the
 * gather) is used exactly as under df_loop_run(). */
#include <deferred.h>

#include <getopt.h>
#include <glib.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "example-util.h"

#define JOBS 100
#define LIMIT 4   /* jobs on the pool at once */
#define THREADS 2 /* pool threads */
#define DEADLINE_NS (30ull * 1000000000u) /* for the whole batch */

/* The program's name in messages (see example_name). */
static const char *prog = "glib-driver";

/* ------------------------------------------------------ the GLib adapter */

/* Completions and cross-thread calls per dispatch, so that other sources
 * of the context keep their say; what is left keeps the fd readable. */
#define DF_SOURCE_BUDGET 16

typedef struct df_source {
    GSource base;   /* first: GLib allocates and frees the whole struct */
    df_loop *loop;  /* borrowed; must outlive the source */
    GPollFD pfd;    /* on df_loop_fd() */
    int error;      /* the first df_ error code seen, or 0 */
} df_source;

static gboolean df_source_prepare(GSource *base, gint *timeout)
{
    df_source *s = (df_source *)base;
    int ms = df_loop_timeout_ms(s->loop);
    if (ms < -1) { /* an error code: dispatch at once to report it */
        s->error = ms;
        *timeout = 0;
        return TRUE;
    }
    *timeout = ms; /* -1: no df_loop timer, wait for the fd */
    return ms == 0;
}

static gboolean df_source_check(GSource *base)
{
    df_source *s = (df_source *)base;
    if (s->pfd.revents & (G_IO_IN | G_IO_ERR | G_IO_HUP))
        return TRUE;
    return df_loop_timeout_ms(s->loop) == 0; /* a timer is due */
}

/* The callback, if one is set with g_source_set_callback, is called with
 * its data after every dispatch; returning FALSE removes the source. */
static gboolean df_source_dispatch(GSource *base, GSourceFunc callback,
                                   gpointer data)
{
    df_source *s = (df_source *)base;
    if (s->error == 0) {
        int rc = df_loop_dispatch(s->loop, DF_SOURCE_BUDGET, NULL);
        if (rc != 0)
            s->error = rc;
    }
    if (s->error != 0) {
        fprintf(stderr, "%s: driving the df_loop: %s\n", prog,
                df_strerror(s->error));
        return G_SOURCE_REMOVE;
    }
    return callback != NULL ? callback(data) : G_SOURCE_CONTINUE;
}

static GSourceFuncs df_source_funcs = {
    df_source_prepare, df_source_check, df_source_dispatch, NULL, NULL, NULL,
};

/* A new GSource driving `loop`; attach it with g_source_attach() to the
 * context the loop thread runs, and drop it with g_source_destroy() and
 * g_source_unref() before df_loop_free(). */
static GSource *df_source_new(df_loop *loop)
{
    GSource *base = g_source_new(&df_source_funcs, sizeof(df_source));
    df_source *s = (df_source *)base;
    s->loop = loop;
    s->error = 0;
    s->pfd.fd = df_loop_fd(loop);
    s->pfd.events = G_IO_IN | G_IO_ERR | G_IO_HUP;
    s->pfd.revents = 0;
    g_source_add_poll(base, &s->pfd);
    g_source_set_name(base, "df_loop");
    return base;
}

/* ------------------------------------------------------------- the work */

/* Pool thread: the square, carried in the pointer itself. */
static df_result square(df_work *w, void *arg)
{
    (void)w;
    uintptr_t i = (uintptr_t)arg;
    return df_ok((void *)(i * i), NULL);
}

/* ------------------------------------------------------ the loop thread */

typedef struct app {
    GMainLoop *main;
    int status;
} app;

static df_result print_sum(df_result r, void *arg)
{
    app *a = arg;
    const df_list_result *lr = r.value;
    uint64_t sum = 0;
    for (size_t i = 0; i < df_list_result_count(lr); i++)
        sum += (uintptr_t)df_list_result_value(lr, i);
    printf("sum=%" PRIu64 "\n", sum);
    g_main_loop_quit(a->main);
    return r; /* the chain frees the result */
}

static df_result print_failure(df_result r, void *arg)
{
    app *a = arg;
    df_failure *f = r.failure;
    fprintf(stderr, "%s: %s\n", prog,
            df_failure_message(df_failure_cause(f) ? df_failure_cause(f) : f));
    a->status = EXIT_FAILURE;
    g_main_loop_quit(a->main);
    df_result_clear(&r); /* handled here */
    return r;
}

/* The source was removed on an error: stop the main loop too. */
static void on_source_gone(gpointer data)
{
    app *a = data;
    if (g_main_loop_is_running(a->main)) {
        a->status = EXIT_FAILURE;
        g_main_loop_quit(a->main);
    }
}

static gboolean keep_source(gpointer data)
{
    (void)data;
    return G_SOURCE_CONTINUE;
}

/* ----------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [-h]\n"
            "Drives a df_loop from a GLib main loop through a GSource: "
            "squares 1..%d on a\n"
            "pool of %d threads, at most %d at once, and prints "
            "\"sum=338350\".\n"
            "  -h, --help  this help\n",
            prog, JOBS, THREADS, LIMIT);
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
    int c;

    prog = argv[0] = example_name(argv[0], "glib-driver");
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

    app a = {NULL, EXIT_SUCCESS};
    df_loop *loop;
    df_pool *pool;
    df_sem *sem;
    df_deferred *runs[JOBS], *all;
    int rc;

    if ((rc = df_loop_new(NULL, &loop)) != 0)
        return fail("df_loop_new", rc);
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = THREADS;
    if ((rc = df_pool_new(loop, &po, &pool)) != 0)
        return fail("df_pool_new", rc);
    if ((rc = df_sem_new(loop, LIMIT, &sem)) != 0)
        return fail("df_sem_new", rc);
    for (uintptr_t i = 0; i < JOBS; i++) {
        rc = df_sem_run_in_pool(sem, pool, square, (void *)(i + 1), &runs[i]);
        if (rc != 0)
            return fail("df_sem_run_in_pool", rc);
    }
    /* TAKE_REFS: the gather takes over our reference to each run. */
    if ((rc = df_gather(loop, runs, JOBS,
                        DF_LIST_CONSUME_ERRORS | DF_LIST_TAKE_REFS, &all)) != 0)
        return fail("df_gather", rc);
    /* A df_loop timer, so that the source's timeout has something to do. */
    if ((rc = df_deferred_set_timeout(all, DEADLINE_NS)) != 0)
        return fail("df_deferred_set_timeout", rc);
    if ((rc = df_deferred_add_callbacks(all, print_sum, print_failure, &a)) !=
        0)
        return fail("df_deferred_add_callbacks", rc);

    /* The default context, run by this thread: the df_loop's loop thread. */
    a.main = g_main_loop_new(NULL, FALSE);
    GSource *src = df_source_new(loop);
    g_source_set_callback(src, keep_source, &a, on_source_gone);
    g_source_attach(src, NULL);
    g_main_loop_run(a.main);
    g_source_destroy(src);
    g_source_unref(src);
    g_main_loop_unref(a.main);

    /* The pool goes first: freeing it settles any job still out, which
     * hands every token back to the semaphore. */
    df_deferred_unref(all);
    df_pool_free(pool);
    if ((rc = df_sem_free(sem)) != 0)
        a.status = fail("df_sem_free", rc);
    if ((rc = df_loop_free(loop)) != 0)
        a.status = fail("df_loop_free", rc);
    return example_close_stdout(prog, a.status);
}
