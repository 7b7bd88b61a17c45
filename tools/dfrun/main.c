/* SPDX-License-Identifier: MIT */
/* dfrun: runs one command per input through a df_map on a df_pool. */
#include "dfrun.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <deferred.h>

/*
 * Threads.  The main thread is the loop thread: it reads the inputs (the
 * map's `next`), prints each finished job's output and joblog line (the
 * map's `on_result`) and draws the progress line (a loop timer).  Each
 * pool thread runs one job at a time to completion: spawn, capture,
 * timeout, kill, waitpid on its own child only (job.c).  A signal thread
 * takes SIGINT, SIGTERM and SIGHUP with sigwait (every thread blocks them)
 * and turns them into stop and kill requests through two pipes that the
 * other threads poll; nothing else happens in a signal context.
 *
 * Memory: the map pulls an input only while fewer than -j jobs are in
 * flight (and, with -k, while the window has room), and each job's output
 * is freed once printed, so an endless input runs in bounded memory.
 */

const char *dfr_progname = "dfrun";

struct app {
    struct dfr_options opt;
    struct dfr_shared sh;
    struct dfr_reader *reader;
    struct dfr_seqset succeeded;  /* --resume: seqs to skip            */
    FILE *joblog;
    df_loop *loop;
    df_map *map;
    uint64_t seq;                 /* inputs read so far                */
    uint64_t skipped;             /* of which skipped by --resume      */
    uint64_t delivered, failed, not_run;
    uint64_t ticks;               /* empty items in flight (next_input) */
    bool slots;                   /* dfr_slots_init done               */
    bool input_ended;
    bool read_error;
    bool output_error;
    bool progress;                /* draw the progress line            */
    bool progress_tty;            /* redraw in place                   */
    bool progress_shown;          /* a line is on the terminal now     */
    uint64_t t0;
    df_timer *timer;
    pthread_t sig_tid;
    sigset_t sig_set;             /* what the signal thread waits for  */
    atomic_bool sig_quit;
};

void dfr_request_stop(struct dfr_shared *sh, bool kill)
{
    if (!atomic_exchange(&sh->stop, true))
        (void)!write(sh->stop_pipe[1], "s", 1);
    if (kill && !atomic_exchange(&sh->kill, true))
        (void)!write(sh->kill_pipe[1], "k", 1);
}

/* ------------------------------------------------------------ signals */

static void say(const char *msg)
{
    (void)!write(2, msg, strlen(msg));
}

/* First SIGINT: stop launching, let running jobs finish.  A second SIGINT,
 * or SIGTERM or SIGHUP: terminate the running jobs too.  SIGUSR2 with
 * sig_quit set is the main thread asking this thread to end. */
static void *signal_thread(void *arg)
{
    struct app *a = arg;
    sigset_t set = a->sig_set;
    unsigned ints = 0;
    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig == SIGUSR2) {
            if (atomic_load(&a->sig_quit))
                return NULL;
            continue;
        }
        int none = 0;
        atomic_compare_exchange_strong(&a->sh.signo, &none, sig);
        if (sig == SIGINT && ++ints == 1) {
            say("\ndfrun: interrupted: no new jobs; waiting for the running "
                "ones (Ctrl-C again to terminate them)\n");
            dfr_request_stop(&a->sh, false);
        } else {
            if (!atomic_load(&a->sh.kill))
                say("\ndfrun: terminating the running jobs\n");
            dfr_request_stop(&a->sh, true);
        }
    }
}

/* ----------------------------------------------------------- progress */

static void fmt_secs(char *buf, size_t n, double s)
{
    if (!(s >= 0) || s > 1e8)
        snprintf(buf, n, "?");
    else if (s < 60)
        snprintf(buf, n, "%.0fs", s);
    else if (s < 3600)
        snprintf(buf, n, "%ldm%02lds", (long)s / 60, (long)s % 60);
    else
        snprintf(buf, n, "%ldh%02ldm", (long)s / 3600, (long)s % 3600 / 60);
}

static void progress_clear(struct app *a)
{
    if (a->progress_shown && a->progress_tty)
        say("\r\033[K");
    a->progress_shown = false;
}

static void progress_draw(struct app *a, bool final)
{
    double secs = (double)(dfr_now_ns() - a->t0) / 1e9;
    double rate = secs > 0 ? (double)a->delivered / secs : 0;
    char eta[32] = "?";
    if (a->input_ended && rate > 0)
        fmt_secs(eta, sizeof eta,
                 (double)(a->seq - a->skipped - a->delivered) / rate);
    /* Jobs running now; the map's own count also holds the items pulled
     * ahead that wait for a worker, and the ticks. */
    uint64_t running = atomic_load(&a->sh.running);
    char line[256];
    snprintf(line, sizeof line,
             "%s%s: %" PRIu64 " done, %" PRIu64 " failed, %" PRIu64
             " running, %.1f/s, ETA %s%s%s",
             a->progress_tty ? "\r" : "", dfr_progname, a->delivered,
             a->failed, running, rate, final ? "0s" : eta,
             a->progress_tty ? "\033[K" : "",
             a->progress_tty && !final ? "" : "\n");
    say(line);
    a->progress_shown = !final;
}

static void progress_tick(void *arg, int status)
{
    struct app *a = arg;
    a->timer = NULL;
    if (status != 0)
        return;
    progress_draw(a, false);
    df_loop_call_later(a->loop, 250000000u, progress_tick, a, &a->timer);
}

/* ------------------------------------------------------------ the map */

static int next_input(void *arg, void **item, df_free_fn *item_free)
{
    struct app *a = arg;
    for (;;) {
        char *line = NULL;
        int rc = dfr_reader_next(a->reader, &line);
        if (rc == 2) {
            /* Standard input has nothing yet but jobs have finished: a
             * map pulls until an input comes or the input ends, so hand
             * it an empty item that lets the loop print them (the public
             * API has no "nothing yet, call me again" answer for next).
             * One per wake-up or back-off step (input.c), so this never
             * spins. */
            struct dfr_job *t = calloc(1, sizeof *t);
            if (t == NULL)
                continue;
            t->tick = true;
            a->ticks++;
            t->sh = &a->sh;
            t->spill_fd = -1;
            *item = t;
            *item_free = dfr_job_free;
            return 1;
        }
        if (rc <= 0) {
            if (rc < 0) {
                fprintf(stderr, "%s: reading standard input: %s\n",
                        dfr_progname, strerror(-rc));
                a->read_error = true;
            }
            a->input_ended = true;
            return 0;
        }
        uint64_t seq = ++a->seq;
        if (a->opt.resume && dfr_seqset_has(&a->succeeded, seq)) {
            a->skipped++;
            free(line);
            continue;
        }
        struct dfr_job *j = calloc(1, sizeof *j);
        if (j == NULL) {
            free(line);
            fprintf(stderr, "%s: out of memory\n", dfr_progname);
            a->read_error = true;
            a->input_ended = true;
            return 0;
        }
        j->seq = seq;
        j->input = line;
        j->sh = &a->sh;
        j->spill_fd = -1;
        *item = j;
        *item_free = dfr_job_free;
        return 1;
    }
}

static df_result run_job(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    struct dfr_job *j = item;
    (void)w;
    struct dfr_shared *sh = j->sh;
    if (j->tick)
        return df_ok(NULL, NULL);
    /* After a stop request nothing new starts; the items that were
     * queued for a worker (see run()) come back not run. */
    if (!atomic_load(&sh->stop)) {
        atomic_fetch_add(&sh->running, 1);
        dfr_job_run(j);
        atomic_fetch_sub(&sh->running, 1);
    }
    /* Wake the input reader if it waits in poll: this job's output should
     * not wait for the next input.  The reader raises reader_waiting,
     * then reads `finished`; a worker adds to `finished`, then reads
     * reader_waiting (both sequentially consistent): either the reader
     * sees this job or the worker sees the reader, and writes.  A full
     * pipe is readable already. */
    atomic_fetch_add(&sh->finished, 1);
    if (atomic_load(&sh->reader_waiting))
        (void)!write(sh->done_pipe[1], "d", 1);
    return df_ok(NULL, NULL);
}

static void job_done(uint64_t index, void *item, df_result r, void *arg)
{
    struct app *a = arg;
    struct dfr_job *j = item;
    (void)index;

    if (j->tick) {
        a->ticks--;
        df_result_clear(&r);
        return;
    }
    a->delivered++;
    a->sh.delivered++;
    if (!j->ran) {
        /* Not started: after a kill request, or refused by the pool. */
        a->not_run++;
        if (r.failure != NULL && df_failure_code(r.failure) != DF_ECANCELLED)
            fprintf(stderr, "%s: job %" PRIu64 " not run: %s\n",
                    dfr_progname, j->seq, df_failure_message(r.failure));
        df_result_clear(&r);
        return;
    }
    df_result_clear(&r);
    if (!dfr_job_ok(j))
        a->failed++;
    progress_clear(a);
    if (!a->output_error) {
        int rc = dfr_job_write_output(j);
        if (rc != 0) {
            fprintf(stderr, "%s: writing output: %s\n", dfr_progname,
                    strerror(-rc));
            a->output_error = true;
            dfr_request_stop(&a->sh, true);
        }
    }
    if (a->joblog != NULL && dfr_joblog_write(a->joblog, j) != 0 &&
        !a->output_error) {
        fprintf(stderr, "%s: writing joblog %s: %s\n", dfr_progname,
                a->opt.joblog, strerror(errno));
        a->output_error = true;
        dfr_request_stop(&a->sh, true);
    }
}

static df_result drop_result(df_result r, void *arg)
{
    (void)arg;
    df_result_clear(&r);
    return r;
}

/* -------------------------------------------------------------- main */

static int setup(struct app *a, int argc, char **argv)
{
    const struct dfr_options *o = &a->opt;
    struct dfr_shared *sh = &a->sh;

    /* Join the command words with spaces, as a shell line (GNU parallel
     * does the same: `dfrun 'gzip -9' ::: a b` works). */
    if (o->ncmd > 0) {
        struct dfr_str s = {NULL, 0, 0};
        for (int i = 0; i < o->ncmd; i++)
            if ((i > 0 && dfr_str_add(&s, " ", 1) != 0) ||
                dfr_str_add(&s, o->cmd[i], strlen(o->cmd[i])) != 0) {
                free(s.p);
                return -ENOMEM;
            }
        sh->templ = s.p;
        sh->templ_has_repl = dfr_has_repl(s.p);
    }
    (void)argc;
    (void)argv;

    if (o->resume && dfr_joblog_read(o->joblog, &a->succeeded) != 0)
        return -1;
    if (o->joblog != NULL) {
        a->joblog = dfr_joblog_open(o->joblog, o->resume);
        if (a->joblog == NULL)
            return -1;
    }
    sh->devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (sh->devnull < 0 || pipe2(sh->stop_pipe, O_CLOEXEC) != 0 ||
        pipe2(sh->kill_pipe, O_CLOEXEC) != 0 ||
        pipe2(sh->done_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
        fprintf(stderr, "%s: %s\n", dfr_progname, strerror(errno));
        return -1;
    }
    int rc = dfr_slots_init(sh);
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", dfr_progname, strerror(-rc));
        return -1;
    }
    a->slots = true;
    if (dfr_reader_new(o, sh, &a->reader) != 0)
        return -ENOMEM;
    a->progress_tty = isatty(2);
    a->progress = o->progress == 1 || (o->progress == -1 && a->progress_tty);
    return 0;
}

static int lib_fail(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", dfr_progname, what, df_strerror(rc));
    return -1;
}

/* Runs the whole batch on the loop; 0 or -1 after a message. */
static int run(struct app *a)
{
    const struct dfr_options *o = &a->opt;
    df_pool *pool = NULL;
    df_deferred *done = NULL;
    int rc;

    if ((rc = df_loop_new(NULL, &a->loop)) != 0)
        return lib_fail("df_loop_new", rc);
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = o->jobs;
    if ((rc = df_pool_new(a->loop, &po, &pool)) != 0) {
        df_loop_free(a->loop);
        return lib_fail("df_pool_new", rc);
    }
    df_map_options mo = {0};
    /* The pool has -j threads, and each job holds its thread until the
     * child is reaped, so at most -j jobs run at once.  The map keeps up
     * to -j more items queued in the pool, so that a worker whose job
     * ends starts the next one at once, on its own thread, instead of
     * waiting for the loop thread to deliver, pull and submit (that
     * round trip was most of the gap between two jobs at -j 1).  No
     * read-ahead beyond that (DF_MAP_NO_READAHEAD): next_input may block
     * on standard input, and a stop (--halt, Ctrl-C) must leave few
     * inputs read but not run (run_job skips those; they count as not
     * run, as after a kill). */
    mo.limit = o->jobs > UINT_MAX / 2 ? UINT_MAX : o->jobs * 2;
    mo.flags = DF_MAP_NO_READAHEAD | (o->keep_order ? DF_MAP_ORDERED : 0);
    mo.window = o->keep_order ? o->window : 0;
    mo.next = next_input;
    mo.next_arg = a;
    mo.pool = pool;
    mo.work = run_job;
    mo.on_result = job_done;
    mo.arg = a;
    dfr_reader_set_wake(a->reader, a->sh.done_pipe[0],
                        a->progress ? 250 : -1);
    a->t0 = dfr_now_ns();
    if (a->progress)
        df_loop_call_later(a->loop, 250000000u, progress_tick, a, &a->timer);
    rc = df_map_start(a->loop, &mo, &a->map, &done);
    if (rc == 0)
        rc = df_loop_run_until(a->loop, done);
    if (a->timer != NULL)
        df_timer_cancel(a->timer);
    a->timer = NULL;
    if (a->progress) {
        progress_clear(a);
        progress_draw(a, true);
    }
    if (rc != 0)
        lib_fail("running the jobs", rc);
    if (a->map != NULL) {
        df_failure *f = NULL;
        if (df_deferred_peek(done, NULL, &f) == 0 && f != NULL) {
            fprintf(stderr, "%s: %s\n", dfr_progname, df_failure_message(f));
            rc = -1;
        }
        df_deferred_add_both(done, drop_result, NULL);
        if (df_map_free(a->map) != 0)
            rc = -1;
        df_deferred_unref(done);
        a->map = NULL;
    }
    df_pool_free(pool);
    int frc = df_loop_free(a->loop);
    if (frc != 0)
        lib_fail("df_loop_free", frc);
    return rc == 0 && frc == 0 ? 0 : -1;
}

/* Frees what setup() made (any part of it); -1 if closing the joblog
 * failed. */
static int cleanup(struct app *a)
{
    int rc = 0;
    dfr_reader_free(a->reader);
    a->reader = NULL;
    dfr_seqset_free(&a->succeeded);
    if (a->joblog != NULL && fclose(a->joblog) != 0)
        rc = -1;
    a->joblog = NULL;
    free(a->sh.templ);
    a->sh.templ = NULL;
    /* After run(): the pool threads, which own the slots, are gone. */
    if (a->slots)
        dfr_slots_fini(&a->sh);
    a->slots = false;
    return rc;
}

int main(int argc, char **argv)
{
    static struct app app;
    struct app *a = &app;

    /* Children get fds 0, 1 and 2 from us: make sure they are open, so
     * that no pipe or file of ours lands on them. */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
            return DFR_EXIT_ERROR;

    int prc = dfr_parse_options(argc, argv, &a->opt);
    if (prc != 0)
        return prc > 0 ? 0 : DFR_EXIT_ERROR;
    a->sh.opt = &a->opt;

    /* A closed stdout is an error on write, not a silent death that would
     * leave children behind; SIGCHLD keeps its default (not SIG_IGN, which
     * would reap children before their worker's waitpid). */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
    /* A signal ignored when dfrun starts stays ignored (nohup, or a
     * background job of a shell without job control, which ignores
     * SIGINT): only the others are taken by the signal thread. */
    sigemptyset(&a->sig_set);
    int take[] = {SIGINT, SIGTERM, SIGHUP};
    for (size_t i = 0; i < sizeof take / sizeof take[0]; i++) {
        struct sigaction sa;
        if (sigaction(take[i], NULL, &sa) == 0 && sa.sa_handler != SIG_IGN)
            sigaddset(&a->sig_set, take[i]);
    }
    sigaddset(&a->sig_set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &a->sig_set, NULL);

    int status = 0;
    int rc = setup(a, argc, argv);
    if (rc == -ENOMEM)
        fprintf(stderr, "%s: out of memory\n", dfr_progname);
    if (rc == 0 && pthread_create(&a->sig_tid, NULL, signal_thread, a) != 0) {
        fprintf(stderr, "%s: cannot start the signal thread\n", dfr_progname);
        rc = -1;
    }
    if (rc != 0) {
        cleanup(a);
        return DFR_EXIT_ERROR;
    }

    rc = run(a);

    atomic_store(&a->sig_quit, true);
    pthread_kill(a->sig_tid, SIGUSR2);
    pthread_join(a->sig_tid, NULL);
    if (cleanup(a) != 0 && rc == 0) {
        fprintf(stderr, "%s: writing joblog %s: %s\n", dfr_progname,
                a->opt.joblog, strerror(errno));
        rc = -1;
    }

    int sig = atomic_load(&a->sh.signo);
    if (rc != 0 || a->read_error || a->output_error) {
        status = DFR_EXIT_ERROR;
    } else if (sig != 0) {
        /* Die of the same signal, as a shell expects of an interrupted
         * command (status 128 + signal number). */
        signal(sig, SIG_DFL);
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, sig);
        raise(sig);
        pthread_sigmask(SIG_UNBLOCK, &one, NULL);
        status = 128 + sig;
    } else {
        if (atomic_load(&a->sh.stop) && a->failed > 0)
            fprintf(stderr, "%s: --halt: stopped after %" PRIu64
                    " failed job%s\n", dfr_progname, a->failed,
                    a->failed == 1 ? "" : "s");
        status = a->failed > DFR_EXIT_MAX_FAILED ? DFR_EXIT_MAX_FAILED
                                                 : (int)a->failed;
    }
    return status;
}
