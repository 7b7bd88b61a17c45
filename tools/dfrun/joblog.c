/* SPDX-License-Identifier: MIT */
/* dfrun: the joblog, written one line per finished job and read by --resume. */
#include "dfrun.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The header, tab-separated like GNU parallel's joblog (without its Host,
 * Send and Receive columns). */
static const char header[] =
    "Seq\tStarttime\tJobRuntime\tExitval\tSignal\tCommand\n";

static int seqset_add(struct dfr_seqset *s, uint64_t v)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        uint64_t *nv = realloc(s->v, cap * sizeof *nv);
        if (nv == NULL)
            return -ENOMEM;
        s->v = nv;
        s->cap = cap;
    }
    s->v[s->n++] = v;
    s->sorted = false;
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

bool dfr_seqset_has(struct dfr_seqset *s, uint64_t seq)
{
    if (s->n == 0)
        return false;
    if (!s->sorted) {
        qsort(s->v, s->n, sizeof *s->v, cmp_u64);
        s->sorted = true;
    }
    return bsearch(&seq, s->v, s->n, sizeof *s->v, cmp_u64) != NULL;
}

void dfr_seqset_free(struct dfr_seqset *s)
{
    free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}

/* Field `k` (0-based) of a tab-separated line, as [*b, *b + *n). */
static bool field(const char *line, int k, const char **b, size_t *n)
{
    const char *p = line;
    for (int i = 0; i < k; i++) {
        p = strchr(p, '\t');
        if (p == NULL)
            return false;
        p++;
    }
    const char *e = strchr(p, '\t');
    *b = p;
    *n = e ? (size_t)(e - p) : strlen(p);
    return true;
}

static bool field_is(const char *line, int k, const char *want)
{
    const char *b;
    size_t n;
    return field(line, k, &b, &n) && n == strlen(want) &&
           memcmp(b, want, n) == 0;
}

int dfr_joblog_read(const char *path, struct dfr_seqset *set)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        if (errno == ENOENT)
            return 0;
        fprintf(stderr, "%s: cannot read joblog %s: %s\n", dfr_progname,
                path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    unsigned long lineno = 0;
    int rc = 0;
    errno = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (len > 0 && line[len - 1] == '\n')
            line[--len] = '\0';
        if (lineno == 1 && strncmp(line, "Seq\t", 4) == 0)
            continue;
        if (len == 0)
            continue;
        char *end;
        errno = 0;
        uint64_t seq = strtoull(line, &end, 10);
        const char *b;
        size_t n;
        if (errno != 0 || end == line || *end != '\t' || seq == 0 ||
            !field(line, 5, &b, &n)) {
            fprintf(stderr, "%s: %s:%lu: not a joblog line\n", dfr_progname,
                    path, lineno);
            rc = -1;
            break;
        }
        if (field_is(line, 3, "0") && field_is(line, 4, "0") &&
            seqset_add(set, seq) != 0) {
            fprintf(stderr, "%s: out of memory reading %s\n", dfr_progname,
                    path);
            rc = -1;
            break;
        }
    }
    if (rc == 0 && ferror(f)) {
        fprintf(stderr, "%s: cannot read joblog %s: %s\n", dfr_progname,
                path, strerror(errno ? errno : EIO));
        rc = -1;
    }
    free(line);
    fclose(f);
    return rc;
}

FILE *dfr_joblog_open(const char *path, bool append)
{
    FILE *f = fopen(path, append ? "a" : "w");
    if (f == NULL) {
        fprintf(stderr, "%s: cannot write joblog %s: %s\n", dfr_progname,
                path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (!append || (fstat(fileno(f), &st) == 0 && st.st_size == 0)) {
        if (fputs(header, f) == EOF || fflush(f) != 0) {
            fprintf(stderr, "%s: cannot write joblog %s: %s\n", dfr_progname,
                    path, strerror(errno));
            fclose(f);
            return NULL;
        }
    }
    return f;
}

int dfr_joblog_write(FILE *f, const struct dfr_job *j)
{
    /* A command holding a newline or tab would break the line format:
     * write those as spaces (the log is for people and for --resume,
     * which only reads the numbers). */
    fprintf(f, "%" PRIu64 "\t%.3f\t%.3f\t%d\t%d\t", j->seq, j->start,
            j->duration, j->exitval, j->sig);
    for (const char *p = j->cmd ? j->cmd : ""; *p; p++)
        putc(*p == '\n' || *p == '\t' ? ' ' : *p, f);
    putc('\n', f);
    return fflush(f) == 0 ? 0 : -1;
}
