/* SPDX-License-Identifier: MIT */
/* stream: hashes the lines of a possibly endless stdin on a thread pool and
 * prints the results in input order, in constant memory.
 *
 *     yes | head -n 10000000 | stream -j 4 >/dev/null
 *
 * Each output line is "<hash>  <line>", the hash being 64-bit FNV-1a
 * iterated over the line (-r rounds), a stand-in for CPU-bound work.  At
 * most -j lines are hashed at once and at most -j finished lines wait for
 * an earlier one, so memory stays flat however long the input is.
 *
 * The map's iterator reads stdin with getline() on the loop thread, which
 * blocks the loop while no line is available: results already computed are
 * written only once the next line arrives or the input ends.  That is
 * harmless for a pipe being drained, the case this program is for; an
 * interactive program would watch stdin with the loop's poll instead. */
#include <deferred.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "example-util.h"

/* The program's name in messages (see example_name). */
static const char *prog = "stream";

/* One input line; the map owns it and frees it after its result. */
typedef struct line {
    unsigned rounds; /* work functions get only the item: carried here */
    size_t len;
    char text[];
} line;

/* One output line, the value of a successful item. */
typedef struct out {
    size_t len;
    char text[];
} out;

typedef struct app {
    df_loop *loop;
    df_map *map;
    unsigned rounds;
    char *buf; /* getline's buffer, reused for every line */
    size_t cap;
    bool progress;       /* stderr is a terminal */
    bool shown;          /* a progress line is on the screen */
    uint64_t last_shown; /* df_loop_now() of the last progress line */
    uint64_t started;
    int write_error; /* errno of the first failed write, or 0 */
    uint64_t failed;
} app;

#define PROGRESS_NS 100000000u /* at most ten progress lines a second */

/* ------------------------------------------------------------ the work */

/* Pool thread: FNV-1a over the line, `rounds` times, then the output. */
static df_result hash_line(df_work *w, void *item, void *work_arg)
{
    (void)work_arg;
    const line *l = item;
    uint64_t h = 14695981039346656037u;
    for (unsigned r = 0; r < l->rounds; r++) {
        h ^= r;
        for (size_t i = 0; i < l->len; i++) {
            h ^= (unsigned char)l->text[i];
            h *= 1099511628211u;
        }
        h *= 1099511628211u;
    }
    out *o = malloc(sizeof *o + 16 + 2 + l->len + 1);
    if (o == NULL)
        return df_errf(df_work_loop(w), DF_ENOMEM, "no memory for a result");
    int n = snprintf(o->text, 19, "%016" PRIx64 "  ", h);
    memcpy(o->text + n, l->text, l->len);
    o->text[n + l->len] = '\n';
    o->len = (size_t)n + l->len + 1;
    return df_ok(o, free);
}

/* ------------------------------------------------------ the loop thread */

static void show_progress(app *a, bool last)
{
    uint64_t now = df_loop_now(a->loop);
    if (!a->progress || (!last && now - a->last_shown < PROGRESS_NS))
        return;
    df_map_stats st;
    if (df_map_get_stats(a->map, &st) != 0)
        return;
    a->last_shown = now;
    a->shown = true;
    fprintf(stderr,
            "\r%s: %" PRIu64 " read, %" PRIu64 " written, %" PRIu64
            " hashing, %" PRIu64 " waiting\033[K",
            prog, st.pulled, st.done - st.failed, st.running, st.buffered);
}

/* The map's iterator: the next line of stdin, without its newline. */
static int next_line(void *arg, void **item, df_free_fn *item_free)
{
    app *a = arg;
    errno = 0;
    ssize_t n = getline(&a->buf, &a->cap, stdin);
    if (n < 0)
        return ferror(stdin) ? (errno != 0 ? -errno : DF_EFAILED) : 0;
    if (n > 0 && a->buf[n - 1] == '\n')
        n--;
    line *l = malloc(sizeof *l + (size_t)n);
    if (l == NULL)
        return DF_ENOMEM;
    l->rounds = a->rounds;
    l->len = (size_t)n;
    memcpy(l->text, a->buf, (size_t)n);
    *item = l;
    *item_free = free;
    return 1;
}

/* Results arrive here in input order. */
static void write_result(uint64_t index, void *item, df_result r, void *arg)
{
    app *a = arg;
    (void)item;
    if (r.failure != NULL) {
        if (a->write_error != 0) {
            /* Cancelled because output failed: already reported. */
            df_result_clear(&r);
            return;
        }
        fprintf(stderr, "%s%s: line %" PRIu64 ": %s\n", a->shown ? "\n" : "",
                prog, index + 1, df_failure_message(r.failure));
        a->shown = false;
        a->failed++;
    } else if (a->write_error == 0) {
        const out *o = r.value;
        if (fwrite(o->text, 1, o->len, stdout) != o->len) {
            /* Output is gone (or the disk is full): stop reading. */
            a->write_error = errno != 0 ? errno : EIO;
            df_map_cancel(a->map);
        }
    }
    df_result_clear(&r);
    show_progress(a, false);
}

/* ----------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [-j K] [-t THREADS] [-w WINDOW] [-r ROUNDS] [-v]\n"
            "Hashes each line of stdin on a thread pool and writes\n"
            "\"<hash>  <line>\" to stdout in input order, in constant "
            "memory.\n"
            "  -j K        at most K lines hashed at once (default 4)\n"
            "  -t THREADS  pool threads (default: online CPUs)\n"
            "  -w WINDOW   most finished lines held back (default K)\n"
            "  -r ROUNDS   hash rounds per line (default 256)\n"
            "  -v          print a summary on stderr even if it is not a "
            "terminal\n"
            "  -h, --help  this help\n",
            prog);
}

static bool parse_uint(const char *s, unsigned long max, unsigned long *val)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || *s == '-' || v > max)
        return false;
    *val = v;
    return true;
}

static int fail(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, df_strerror(rc));
    return EXIT_FAILURE;
}

static df_result consume(df_result r, void *arg)
{
    (void)arg;
    df_result_clear(&r);
    return r;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    unsigned long jobs = 4, threads = 0, window = 0, rounds = 256;
    bool verbose = false;
    int c;

    prog = argv[0] = example_name(argv[0], "stream");
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    threads = ncpu > 0 ? (unsigned long)ncpu : 1;
    while ((c = getopt_long(argc, argv, "j:t:w:r:vh", longopts, NULL)) != -1) {
        bool ok = true;
        switch (c) {
        case 'j':
            ok = parse_uint(optarg, 65536, &jobs) && jobs > 0;
            break;
        case 't':
            ok = parse_uint(optarg, 1024, &threads) && threads > 0;
            break;
        case 'w':
            ok = parse_uint(optarg, 1u << 20, &window);
            break;
        case 'r':
            ok = parse_uint(optarg, 1u << 30, &rounds);
            break;
        case 'v':
            verbose = true;
            break;
        case 'h':
            usage(stdout);
            return example_close_stdout(prog, EXIT_SUCCESS);
        default:
            usage(stderr); /* getopt_long has named the problem */
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "%s: bad value for -%c: %s\n", prog, c, optarg);
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
        usage(stderr);
        return 2;
    }

    app a = {0};
    df_pool *pool;
    df_deferred *done;
    int rc;

    a.rounds = (unsigned)rounds;
    a.progress = isatty(STDERR_FILENO);
    if ((rc = df_loop_new(NULL, &a.loop)) != 0)
        return fail("df_loop_new", rc);
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = (unsigned)threads;
    if ((rc = df_pool_new(a.loop, &po, &pool)) != 0)
        return fail("df_pool_new", rc);

    df_map_options mo = {0};
    mo.limit = (unsigned)jobs;
    mo.flags = DF_MAP_ORDERED;
    mo.window = window;
    mo.next = next_line;
    mo.next_arg = &a;
    mo.pool = pool;
    mo.work = hash_line;
    mo.on_result = write_result;
    mo.arg = &a;
    a.started = df_loop_now(a.loop);
    if ((rc = df_map_start(a.loop, &mo, &a.map, &done)) != 0)
        return fail("df_map_start", rc);
    rc = df_loop_run_until(a.loop, done);
    if (rc != 0)
        return fail("df_loop_run_until", rc);

    int status = EXIT_SUCCESS;
    df_failure *f = NULL;
    df_map_stats st;
    df_deferred_peek(done, NULL, &f);
    df_map_get_stats(a.map, &st);
    show_progress(&a, true);
    if (a.shown)
        fputc('\n', stderr);
    errno = 0;
    if (fflush(stdout) != 0 && a.write_error == 0)
        a.write_error = errno != 0 ? errno : EIO;
    if (a.write_error != 0) {
        fprintf(stderr, "%s: writing output: %s\n", prog,
                strerror(a.write_error));
        status = EXIT_FAILURE;
    } else if (f != NULL) {
        fprintf(stderr, "%s: %s\n", prog, df_failure_message(f));
        status = EXIT_FAILURE;
    }
    if (a.failed > 0)
        status = EXIT_FAILURE;
    if (a.progress || verbose) {
        double secs = (double)(df_loop_now(a.loop) - a.started) / 1e9;
        fprintf(stderr,
                "%s: %" PRIu64 " lines, %" PRIu64 " failed, %.2f s, "
                "%.0f lines/s\n",
                prog, st.done, st.failed, secs, secs > 0 ? st.done / secs : 0.0);
    }

    df_map_free(a.map);
    df_deferred_add_errback(done, consume, NULL); /* reported above */
    df_deferred_unref(done);
    df_pool_free(pool);
    rc = df_loop_free(a.loop); /* DF_EBUSY if anything were left */
    if (rc != 0) {
        fprintf(stderr, "%s: df_loop_free: %s\n", prog, df_strerror(rc));
        status = EXIT_FAILURE;
    }
    free(a.buf);
    /* A write error was reported above: closing cannot add one. */
    return a.write_error != 0 ? status : example_close_stdout(prog, status);
}
