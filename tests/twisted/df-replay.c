/* SPDX-License-Identifier: MIT */
/* Runs an operation sequence of the differential test on libdeferred and
 * prints the trace tw_run.py prints for Twisted (see gen.py). */
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <deferred.h>

#define MAXD 4096
#define MAXS 64

/* A value is a small int carried in the pointer; NULL is Python's None.
 * A list result is turned into the int 1000 + K by the first callback on
 * list K (as tw_run.py does), so nothing else ever sees one. */
#define INT_LIMIT 65536

/* One callback pair (or a run's function): what each side does. */
typedef struct cbarg {
    char cb[16];
    char eb[16];
    int id;
} cbarg;

static df_loop *loop;
static df_deferred *D[MAXD];
static int user_paused[MAXD];
static df_sem *S[MAXS];
static int held[MAXS];
static int quiet;
static cbarg *args[2 * MAXD];
static size_t nargs;

static void die(const char *what, int rc)
{
    fprintf(stderr, "df-replay: %s: %s\n", what, df_err_name(rc));
    exit(2);
}

static void emit(const char *fmt, ...) DF_PRINTF(1, 2);
static void emit(const char *fmt, ...)
{
    va_list ap;
    if (quiet)
        return;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}

static void fmt_fail(char *buf, size_t n, const df_failure *f)
{
    int code = df_failure_code(f);
    if (code > 0 && code < 100) {
        snprintf(buf, n, "U%d", code);
    } else if (code == DF_EFIRST_ERROR) {
        char inner[64];
        fmt_fail(inner, sizeof inner, df_failure_cause(f));
        snprintf(buf, n, "EFIRST_ERROR(%ld:%s)", df_failure_index(f), inner);
    } else {
        snprintf(buf, n, "%s", df_err_name(code) + 3); /* drop "DF_" */
    }
}

static void fmt_list(char *buf, size_t n, const df_list_result *lr);

/* A value: an int, None, or (only ever on a list deferred whose first
 * callback has not run yet) its list result. */
static void fmt_val(char *buf, size_t n, const void *v)
{
    if (v == NULL)
        snprintf(buf, n, "None");
    else if ((uintptr_t)v < INT_LIMIT)
        snprintf(buf, n, "%d", (int)(intptr_t)v);
    else
        fmt_list(buf, n, v);
}

/* A list result as tw_run.py prints a DeferredList result. */
static void fmt_list(char *buf, size_t n, const df_list_result *lr)
{
    char tmp[96];
    size_t len = 0;
    long idx = df_list_result_index(lr);
    if (idx >= 0) {
        fmt_val(tmp, sizeof tmp, df_list_result_value(lr, (size_t)idx));
        snprintf(buf, n, "(%s,%ld)", tmp, idx);
        return;
    }
    len += (size_t)snprintf(buf, n, "[");
    for (size_t i = 0; i < df_list_result_count(lr) && len < n; i++) {
        if (!df_list_result_fired(lr, i)) {
            snprintf(tmp, sizeof tmp, "?");
        } else if (df_list_result_ok(lr, i)) {
            char v[64];
            fmt_val(v, sizeof v, df_list_result_value(lr, i));
            snprintf(tmp, sizeof tmp, "T:%s", v);
        } else {
            char f[64];
            fmt_fail(f, sizeof f, df_list_result_failure(lr, i));
            snprintf(tmp, sizeof tmp, "F:%s", f);
        }
        len += (size_t)snprintf(buf + len, n - len, "%s%s", i > 0 ? "," : "",
                                tmp);
    }
    if (len < n)
        snprintf(buf + len, n - len, "]");
}

static void fmt_res(char *buf, size_t n, const df_result *r)
{
    char tmp[96];
    if (r->failure != NULL) {
        fmt_fail(tmp, sizeof tmp, r->failure);
        snprintf(buf, n, "err %s", tmp);
    } else {
        fmt_val(tmp, sizeof tmp, r->value);
        snprintf(buf, n, "ok %s", tmp);
    }
}

static df_result behave(const char *spec, df_result r)
{
    if (strcmp(spec, "p") == 0)
        return r;
    df_result_clear(&r);
    int n = atoi(spec + 2);
    switch (spec[0]) {
    case 'r':
        return df_ok((void *)(intptr_t)n, NULL);
    case 'x':
        return df_errf(loop, n, NULL);
    default:
        return df_wait(df_deferred_ref(D[n]));
    }
}

/* Both sides of a pair: the chain runs the errback on a failure. */
static df_result callback(df_result r, void *arg)
{
    cbarg *a = arg;
    bool eb = r.failure != NULL;
    char buf[1024];
    fmt_res(buf, sizeof buf, &r);
    emit("cb %d %s %s", a->id, eb ? "eb" : "cb", buf);
    return behave(eb ? a->eb : a->cb, r);
}

static cbarg *new_arg(const char *cb, const char *eb, int id)
{
    cbarg *a = calloc(1, sizeof *a);
    if (a == NULL || nargs == sizeof args / sizeof args[0])
        die("calloc", DF_ENOMEM);
    snprintf(a->cb, sizeof a->cb, "%s", cb);
    snprintf(a->eb, sizeof a->eb, "%s", eb);
    a->id = id;
    args[nargs++] = a;
    return a;
}

static df_result list_conv(df_result r, void *arg)
{
    long k = (long)(intptr_t)arg;
    if (r.failure != NULL || (uintptr_t)r.value < INT_LIMIT)
        return r; /* a failure, or fired by hand with a plain value */
    char buf[1024];
    fmt_list(buf, sizeof buf, r.value);
    emit("list %ld fired %s", k, buf);
    df_result_clear(&r);
    return df_ok((void *)(intptr_t)(1000 + k), NULL);
}

static df_result acq_seen(df_result r, void *arg)
{
    held[(intptr_t)arg]++;
    return r;
}

static df_result run_fn(void *arg)
{
    cbarg *a = arg;
    emit("fn %d ran", a->id);
    return behave(a->cb, df_ok(NULL, NULL));
}

static void need(int k)
{
    if (k < 0 || k >= MAXD || D[k] == NULL) {
        fprintf(stderr, "df-replay: no deferred %d\n", k);
        exit(2);
    }
}

static void step(char *line)
{
    char op[16];
    int a = 0, b = 0, n = 0;
    char s1[16], s2[16];
    int rc;

    if (sscanf(line, "%15s", op) != 1)
        return;
    if (strcmp(op, "new") == 0) {
        sscanf(line, "%*s %d", &a);
        if ((rc = df_deferred_new(loop, &D[a])) != 0)
            die("new", rc);
    } else if (strcmp(op, "fire") == 0 || strcmp(op, "fail") == 0) {
        sscanf(line, "%*s %d %d", &a, &b);
        need(a);
        if (op[1] == 'i') {
            rc = df_deferred_callback(D[a], (void *)(intptr_t)b, NULL);
        } else {
            df_failure *f = df_failure_new(loop, b, NULL);
            rc = df_deferred_errback(D[a], f);
            if (rc != 0)
                df_failure_unref(f);
        }
        emit("%s %d -> %s", op, a, rc == 0 ? "0" : df_err_name(rc) + 3);
    } else if (strcmp(op, "add") == 0) {
        sscanf(line, "%*s %d %15s %15s %d", &a, s1, s2, &n);
        need(a);
        rc = df_deferred_add_callbacks(D[a], strcmp(s1, "-") ? callback : NULL,
                                       strcmp(s2, "-") ? callback : NULL,
                                       new_arg(s1, s2, n));
        if (rc != 0)
            die("add", rc);
    } else if (strcmp(op, "chain") == 0) {
        sscanf(line, "%*s %d %d", &a, &b);
        need(a);
        need(b);
        if ((rc = df_deferred_chain(D[a], D[b])) != 0)
            die("chain", rc);
    } else if (strcmp(op, "pause") == 0) {
        sscanf(line, "%*s %d", &a);
        need(a);
        if ((rc = df_deferred_pause(D[a])) != 0)
            die("pause", rc);
        user_paused[a]++;
    } else if (strcmp(op, "unpause") == 0) {
        sscanf(line, "%*s %d", &a);
        need(a);
        if ((rc = df_deferred_unpause(D[a])) != 0)
            die("unpause", rc);
        user_paused[a]--;
    } else if (strcmp(op, "cancel") == 0) {
        sscanf(line, "%*s %d", &a);
        need(a);
        if ((rc = df_deferred_cancel(D[a])) != 0)
            die("cancel", rc);
    } else if (strcmp(op, "peek") == 0) {
        sscanf(line, "%*s %d", &a);
        need(a);
        df_result r = df_ok(NULL, NULL);
        if (df_deferred_peek(D[a], &r.value, &r.failure) != 0) {
            emit("peek %d none", a);
        } else {
            char buf[1024];
            fmt_res(buf, sizeof buf, &r);
            emit("peek %d %s", a, buf);
        }
    } else if (strcmp(op, "list") == 0) {
        int flags, off;
        df_deferred *m[64];
        char *p = line;
        sscanf(p, "%*s %d %d %d%n", &a, &flags, &n, &off);
        p += off;
        if (n > 64)
            die("list too long", DF_EINVAL);
        for (int i = 0; i < n; i++) {
            int j;
            sscanf(p, "%d%n", &j, &off);
            p += off;
            need(j);
            m[i] = D[j];
        }
        if ((rc = df_list_new(loop, m, (size_t)n, (unsigned)flags, &D[a])) != 0)
            die("list", rc);
        if ((rc = df_deferred_add_callback(D[a], list_conv,
                                           (void *)(intptr_t)a)) != 0)
            die("list callback", rc);
    } else if (strcmp(op, "sem") == 0) {
        sscanf(line, "%*s %d %d", &a, &b);
        if (a < 0 || a >= MAXS || (rc = df_sem_new(loop, (unsigned)b, &S[a])))
            die("sem", DF_EINVAL);
    } else if (strcmp(op, "acq") == 0) {
        sscanf(line, "%*s %d %d", &a, &b);
        if ((rc = df_sem_acquire(S[a], &D[b])) != 0)
            die("acq", rc);
        if ((rc = df_deferred_add_callback(D[b], acq_seen,
                                           (void *)(intptr_t)a)) != 0)
            die("acq callback", rc);
    } else if (strcmp(op, "rel") == 0) {
        sscanf(line, "%*s %d", &a);
        if (held[a] == 0) {
            emit("rel %d skipped", a);
        } else {
            held[a]--;
            rc = df_sem_release(S[a]);
            emit("rel %d -> %s", a, rc == 0 ? "0" : df_err_name(rc) + 3);
        }
    } else if (strcmp(op, "run") == 0) {
        sscanf(line, "%*s %d %d %15s %d", &a, &b, s1, &n);
        if ((rc = df_sem_run(S[a], run_fn, new_arg(s1, "-", n), &D[b])) != 0)
            die("run", rc);
    } else {
        fprintf(stderr, "df-replay: unknown op: %s\n", line);
        exit(2);
    }
}

static df_result pass(df_result r, void *arg)
{
    (void)arg;
    return r;
}

/* After the sequence: quietly let everything finish and free it all, so
 * that leak checkers see a clean exit.  Unpause what the sequence paused,
 * fire what never fired, give back tokens, drop every reference. */
static int finish(void)
{
    quiet = 1;
    for (int k = 0; k < MAXD; k++)
        while (D[k] != NULL && user_paused[k] > 0) {
            user_paused[k]--;
            df_deferred_unpause(D[k]);
        }
    for (int k = 0; k < MAXD; k++)
        if (D[k] != NULL && !df_deferred_called(D[k]))
            df_deferred_callback(D[k], NULL, NULL);
    /* A deferred found paused stops the ones below it on the stack (as in
     * Twisted) and they stay stopped until something runs them again;
     * adding a callback does, which ends waits and chains that would
     * otherwise hold references in a cycle. */
    for (int round = 0; round < 3; round++)
        for (int k = 0; k < MAXD; k++)
            if (D[k] != NULL)
                df_deferred_add_callbacks(D[k], pass, pass, NULL);
    for (int s = 0; s < MAXS; s++)
        while (S[s] != NULL && held[s] > 0) {
            held[s]--;
            df_sem_release(S[s]);
        }
    for (int k = 0; k < MAXD; k++)
        df_deferred_unref(D[k]);
    df_loop_run(loop);
    int bad = 0;
    for (int s = 0; s < MAXS; s++)
        if (S[s] != NULL && df_sem_free(S[s]) != 0) {
            fprintf(stderr, "df-replay: semaphore %d still busy\n", s);
            bad = 1;
        }
    int rc = df_loop_free(loop);
    if (rc != 0) {
        fprintf(stderr, "df-replay: df_loop_free: %s\n", df_err_name(rc));
        bad = 1;
    }
    for (size_t i = 0; i < nargs; i++)
        free(args[i]);
    return bad ? 3 : 0;
}

/* Unhandled failures are not part of the trace (Twisted logs them at
 * garbage collection). */
static void unhandled(df_failure *f, void *arg)
{
    (void)f;
    (void)arg;
}

int main(void)
{
    char line[1024];
    df_loop_options opts = DF_LOOP_OPTIONS_INIT;
    opts.unhandled = unhandled;
    int rc = df_loop_new(&opts, &loop);
    if (rc != 0)
        die("df_loop_new", rc);
    for (int i = 0; fgets(line, sizeof line, stdin) != NULL; i++) {
        line[strcspn(line, "\n")] = '\0';
        emit("@%d", i);
        step(line);
        df_loop_run(loop);
    }
    fflush(stdout);
    return finish();
}
