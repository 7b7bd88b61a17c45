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
 * while standard input is a silent terminal or pipe.  Main thread only. */
struct dfr_reader {
    const struct dfr_options *opt;
    struct dfr_shared *sh;
    int next_arg;           /* index into opt->args                     */
    bool stdin_done;
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
    r->pos = r->end = 0;
    *out = r;
    return 0;
}

void dfr_reader_free(struct dfr_reader *r)
{
    free(r);
}

/* Refills buf; 1 with data, 0 at end of file or on a stop, -errno. */
static int refill(struct dfr_reader *r)
{
    for (;;) {
        struct pollfd p[2] = {{0, POLLIN, 0},
                              {r->sh->stop_pipe[0], POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (p[1].revents != 0)
            return 0;
        ssize_t n = read(0, r->buf, sizeof r->buf);
        if (n > 0) {
            r->pos = 0;
            r->end = (size_t)n;
            return 1;
        }
        if (n == 0)
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
    char *acc = NULL;       /* a line that spans reads */
    size_t acc_len = 0;
    for (;;) {
        if (r->pos == r->end) {
            int rc = refill(r);
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
