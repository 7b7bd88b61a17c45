/* SPDX-License-Identifier: MIT */
/* dfrun: the input reader, the ::: arguments then standard input. */
#include "dfrun.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Reads fd 0 in blocks and cuts it at the separator.  Before each read it
 * polls the stop pipe too, so that a Ctrl-C ends the input at once even
 * while standard input is a silent terminal or pipe, and the wake pipe, so
 * that finished jobs are printed while the input is slow.  Main thread
 * only. */
struct dfr_reader {
    const struct dfr_options *opt;
    struct dfr_shared *sh;
    int next_arg;           /* index into opt->args                     */
    bool stdin_done;
    int wake_fd;            /* see dfr_reader_set_wake, or -1           */
    int tick_ms;
    int backoff_ms;         /* see refill                               */
    uint64_t seen_finished; /* sh->finished when last returned 2        */
    char *partial;          /* the start of a line cut by a return of 2 */
    size_t partial_len;
    char buf[65536];
    size_t pos, end;        /* unread bytes are buf[pos..end)           */
};

int dfr_reader_new(const struct dfr_options *o, struct dfr_shared *sh,
                   struct dfr_reader **out)
{
    struct dfr_reader *r = malloc(sizeof *r);
    if (r == NULL)
        return -ENOMEM;
    r->opt = o;
    r->sh = sh;
    r->next_arg = 0;
    r->stdin_done = !o->read_stdin;
    r->wake_fd = -1;
    r->tick_ms = -1;
    r->backoff_ms = 1;
    r->seen_finished = 0;
    r->partial = NULL;
    r->partial_len = 0;
    r->pos = r->end = 0;
    *out = r;
    return 0;
}

void dfr_reader_set_wake(struct dfr_reader *r, int fd, int tick_ms)
{
    r->wake_fd = fd;
    r->tick_ms = tick_ms;
}

void dfr_reader_free(struct dfr_reader *r)
{
    if (r != NULL)
        free(r->partial);
    free(r);
}

/* Refills buf; 1 with data, 0 at end of file or on a stop, 2 when the
 * loop has work waiting and standard input has nothing yet, -errno. */
static int refill(struct dfr_reader *r)
{
    for (;;) {
        struct pollfd p[3] = {{0, POLLIN, 0},
                              {r->sh->stop_pipe[0], POLLIN, 0},
                              {r->wake_fd, POLLIN, 0}};
        /* A worker writes the wake pipe just before its work function
         * returns, so the job's completion may reach the loop only after
         * the tick made for it has been delivered.  While jobs have
         * finished that the loop has not delivered, look again after 1,
         * 2, 4... ms (at most a second: under -k they may be waiting for
         * an earlier job), each time with a tick. */
        int tmo = r->tick_ms;
        /* Workers write the wake pipe only while reader_waiting is set
         * (main.c, run_job); a job that finished before it was set is
         * seen here instead, as a change of `finished`: then only look
         * whether standard input is readable (it comes first). */
        if (r->wake_fd >= 0) {
            atomic_store(&r->sh->reader_waiting, true);
            uint64_t f = atomic_load(&r->sh->finished);
            if (f != r->seen_finished) {
                r->seen_finished = f;
                tmo = 0;
            }
        }
        if (tmo == 0) {
            /* Looked at above. */
        } else if (r->wake_fd >= 0 &&
            atomic_load(&r->sh->finished) > r->sh->delivered) {
            if (tmo < 0 || r->backoff_ms < tmo)
                tmo = r->backoff_ms;
            r->backoff_ms = r->backoff_ms >= 512 ? 1000 : r->backoff_ms * 2;
        } else {
            r->backoff_ms = 1;
        }
        int n = poll(p, 3, tmo);
        if (r->wake_fd >= 0)
            atomic_store(&r->sh->reader_waiting, false);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[1].revents != 0)
            return 0;
        if (p[0].revents == 0 && r->wake_fd >= 0) {
            /* A job finished (or the tick interval passed): empty the
             * wake pipe and let the loop run. */
            char sink[256];
            while (read(r->wake_fd, sink, sizeof sink) > 0)
                ;
            r->seen_finished = atomic_load(&r->sh->finished);
            return 2;
        }
        ssize_t got = read(0, r->buf, sizeof r->buf);
        if (got > 0) {
            r->pos = 0;
            r->end = (size_t)got;
            return 1;
        }
        if (got == 0)
            return 0;
        if (errno != EINTR && errno != EAGAIN)
            return -errno;
    }
}

int dfr_reader_next(struct dfr_reader *r, char **line)
{
    if (atomic_load(&r->sh->stop))
        return 0;
    if (r->next_arg < r->opt->nargs) {
        *line = strdup(r->opt->args[r->next_arg++]);
        return *line ? 1 : -ENOMEM;
    }
    if (r->stdin_done)
        return 0;

    char sep = r->opt->null_sep ? '\0' : '\n';
    char *acc = r->partial; /* a line that spans reads */
    size_t acc_len = r->partial_len;
    r->partial = NULL;
    r->partial_len = 0;
    for (;;) {
        if (r->pos == r->end) {
            int rc = refill(r);
            if (rc == 2) {
                /* Keep the partial line for the next call. */
                if (acc != NULL) {
                    r->partial = acc;
                    r->partial_len = acc_len;
                }
                return 2;
            }
            if (rc <= 0) {
                r->stdin_done = true;
                /* A last line without its separator is still an input,
                 * unless the input stopped because of a stop request. */
                if (rc == 0 && acc != NULL && !atomic_load(&r->sh->stop)) {
                    *line = acc;
                    return 1;
                }
                free(acc);
                return rc;
            }
        }
        char *start = r->buf + r->pos;
        char *hit = memchr(start, sep, r->end - r->pos);
        size_t n = hit ? (size_t)(hit - start) : r->end - r->pos;
        char *grown = realloc(acc, acc_len + n + 1);
        if (grown == NULL) {
            free(acc);
            return -ENOMEM;
        }
        acc = grown;
        memcpy(acc + acc_len, start, n);
        acc_len += n;
        acc[acc_len] = '\0';
        r->pos += n + (hit ? 1 : 0);
        if (hit) {
            *line = acc;
            return 1;
        }
    }
}
