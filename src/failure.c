/* SPDX-License-Identifier: MIT */
/* Failures: immutable, atomically reference-counted error values. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deferred-internal.h"

struct df_failure {
    atomic_long refs;      /* < 0 marks the static out-of-memory failure */
    int code;
    bool released;         /* made by the release of an unfired deferred */
    long index;            /* DF_EFIRST_ERROR: the member; else -1 */
    df_failure *cause;     /* DF_EFIRST_ERROR: the member's failure */
    void *payload;
    df_free_fn payload_free;
    df_allocator alloc;    /* copied: a failure may outlive its loop */
    char message[];
};

static df_failure nomem_failure = {
    .refs = -1,
    .code = DF_ENOMEM,
    .index = -1,
};

/* What df__failure_released() gives when it cannot allocate: releasing an
 * unfired deferred must still fail it with DF_ECANCELLED that is never
 * reported as unhandled, memory or not. */
static df_failure released_failure = {
    .refs = -1,
    .code = DF_ECANCELLED,
    .released = true,
    .index = -1,
};
#define RELEASED_MESSAGE "deferred released before its result came"

/* The shared static failures: ref and unref do nothing on them. */
static bool is_static(const df_failure *f)
{
    return f == &nomem_failure || f == &released_failure;
}

df_failure *df__failure_nomem(void)
{
    return &nomem_failure;
}

const char *df_failure_message(const df_failure *f)
{
    if (f == NULL)
        return "";
    if (f == &nomem_failure)
        return "out of memory";
    if (f == &released_failure)
        return RELEASED_MESSAGE;
    return f->message;
}

static df_failure *failure_vnew(df_loop *loop, int code, void *payload,
                                df_free_fn payload_free, const char *fmt,
                                va_list ap)
{
    const df_allocator *a = df__allocator(loop);
    char small[256];
    /* 0 means success: a failure must never look like one. */
    if (code == 0)
        code = DF_EFAILED;
    const char *text = small;
    int len;

    if (fmt == NULL) {
        text = df_strerror(code);
        len = (int)strlen(text);
    } else {
        va_list ap2;
        va_copy(ap2, ap);
        len = vsnprintf(small, sizeof small, fmt, ap2);
        va_end(ap2);
        if (len < 0) {
            text = df_strerror(code);
            len = (int)strlen(text);
        }
    }

    df_failure *f = a->malloc(sizeof *f + (size_t)len + 1, a->ctx);
    if (f == NULL) {
        if (payload_free != NULL)
            payload_free(payload);
        return &nomem_failure;
    }
    atomic_init(&f->refs, 1);
    f->code = code;
    f->released = false;
    f->index = -1;
    f->cause = NULL;
    f->payload = payload;
    f->payload_free = payload_free;
    f->alloc = *a;
    if (fmt != NULL && text == small && (size_t)len >= sizeof small)
        vsnprintf(f->message, (size_t)len + 1, fmt, ap);
    else
        memcpy(f->message, text, (size_t)len + 1);
    return f;
}

df_failure *df_failure_new(df_loop *loop, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    df_failure *f = failure_vnew(loop, code, NULL, NULL, fmt, ap);
    va_end(ap);
    return f;
}

df_failure *df_failure_new_payload(df_loop *loop, int code, void *payload,
                                   df_free_fn payload_free, const char *fmt,
                                   ...)
{
    va_list ap;
    va_start(ap, fmt);
    df_failure *f = failure_vnew(loop, code, payload, payload_free, fmt, ap);
    va_end(ap);
    return f;
}

df_failure *df__failure_first_error(df_loop *loop, size_t index,
                                    df_failure *cause)
{
    df_failure *f = df_failure_new(loop, DF_EFIRST_ERROR,
                                   "member %zu failed: %s: %s", index,
                                   df_err_name(df_failure_code(cause)),
                                   df_failure_message(cause));
    if (f == &nomem_failure)
        return f;
    f->index = (long)index;
    f->cause = df_failure_ref(cause);
    return f;
}

df_failure *df__failure_released(df_loop *loop)
{
    df_failure *f = df_failure_new(loop, DF_ECANCELLED, RELEASED_MESSAGE);
    if (f == &nomem_failure)
        return &released_failure;
    f->released = true;
    return f;
}

bool df__failure_is_released(const df_failure *f)
{
    return f != NULL && f != &nomem_failure && f->released;
}

df_result df_errf(df_loop *loop, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    df_failure *f = failure_vnew(loop, code, NULL, NULL, fmt, ap);
    va_end(ap);
    return df_err(f);
}

df_failure *df_failure_ref(df_failure *f)
{
    if (f != NULL && !is_static(f))
        atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
    return f;
}

void df_failure_unref(df_failure *f)
{
    while (f != NULL && !is_static(f)) {
        if (atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1)
            return;
        df_failure *cause = f->cause;
        if (f->payload_free != NULL)
            f->payload_free(f->payload);
        f->alloc.free(f, f->alloc.ctx);
        f = cause; /* iterate rather than recurse down a chain of causes */
    }
}

/* The accessors accept NULL (no failure), so that the result of, say,
 * df_list_result_failure() can be read without a check. */
int df_failure_code(const df_failure *f)
{
    return f != NULL ? f->code : 0;
}

void *df_failure_payload(const df_failure *f)
{
    return f != NULL ? f->payload : NULL;
}

long df_failure_index(const df_failure *f)
{
    return f != NULL ? f->index : -1;
}

df_failure *df_failure_cause(const df_failure *f)
{
    return f != NULL ? f->cause : NULL;
}
