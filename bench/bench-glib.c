/* SPDX-License-Identifier: MIT */
/* Peer: GLib's GThreadPool, with completions delivered to the main context. */
#include "bench-common.h"

#include <glib.h>
#include <stdio.h>
#include <string.h>

/*
 * GThreadPool (max_threads = THREADS, exclusive, so the threads exist
 * before timing starts).  Each finished item is handed back with
 * g_main_context_invoke(), GLib's documented way to run a function in
 * another thread's context: from a thread that does not own the context it
 * attaches a one-shot idle source and wakes the context.  The context is a
 * private one, made thread-default on the main thread and acquired by it
 * before anything is pushed: with the global default context a worker
 * could acquire it itself while the main thread is not inside
 * g_main_loop_run() and run the completion on the worker.  The completion
 * (main thread) records the value and pushes the next item, so LIMIT stay
 * in flight.  LIMIT slots are preallocated and recycled; GLib itself
 * allocates a GSource per completion.
 *
 * Built with -DBENCH_GLIB_ASYNC_QUEUE (impl=glib-aq) it uses the other
 * common GLib idiom instead: workers push finished slots on a GAsyncQueue
 * and wake the context (only when the queue was empty); one custom GSource
 * on the main context drains the whole queue per dispatch.  No allocation
 * per item, and one wakeup per batch instead of one per item.
 */

#ifdef BENCH_GLIB_ASYNC_QUEUE
#define IMPL "glib-aq"
#else
#define IMPL "glib"
#endif

struct bench;

struct slot {
    struct bench *b;
    struct slot *next; /* glib-aq: local list while draining */
    uint64_t index;
    uint64_t value;
};

struct bench {
    struct bench_args args;
    struct bench_results results;
    struct bench_inflight inflight;
    GMainContext *ctx;
    GMainLoop *loop;
    GThreadPool *pool;
    GAsyncQueue *done; /* glib-aq only */
    uint64_t next;
    uint64_t outstanding;
    bool failed;
};

static gboolean completion(gpointer data);

static void pool_func(gpointer data, gpointer user_data)
{
    struct slot *s = data;
    struct bench *b = user_data;
    bench_inflight_enter(&b->inflight);
    s->value = bench_work(s->index, b->args.work_iters);
    bench_inflight_leave(&b->inflight);
#ifdef BENCH_GLIB_ASYNC_QUEUE
    g_async_queue_lock(b->done);
    bool was_empty = g_async_queue_length_unlocked(b->done) <= 0;
    g_async_queue_push_unlocked(b->done, s);
    g_async_queue_unlock(b->done);
    /* The source drains everything per dispatch, so only the empty ->
     * non-empty transition needs to wake the context. */
    if (was_empty)
        g_main_context_wakeup(b->ctx);
#else
    g_main_context_invoke(b->ctx, completion, s);
#endif
}

static void submit(struct bench *b, struct slot *s)
{
    GError *err = NULL;
    s->index = b->next++;
    if (!g_thread_pool_push(b->pool, s, &err)) {
        fprintf(stderr, "bench-glib: g_thread_pool_push: %s\n",
                err != NULL ? err->message : "failed");
        g_clear_error(&err);
        b->failed = true;
        return;
    }
    b->outstanding++;
}

/* Main thread, from the idle source g_main_context_invoke() attached. */
static gboolean completion(gpointer data)
{
    struct slot *s = data;
    struct bench *b = s->b;
    bench_record(&b->results, s->index, s->value);
    b->outstanding--;
    if (b->next < b->args.n && !b->failed)
        submit(b, s);
    if (b->outstanding == 0)
        g_main_loop_quit(b->loop);
    return G_SOURCE_REMOVE;
}

#ifdef BENCH_GLIB_ASYNC_QUEUE
struct done_source {
    GSource source;
    struct bench *b;
};

static gboolean done_prepare(GSource *source, gint *timeout)
{
    struct done_source *ds = (struct done_source *)source;
    *timeout = -1;
    return g_async_queue_length(ds->b->done) > 0;
}

static gboolean done_check(GSource *source)
{
    struct done_source *ds = (struct done_source *)source;
    return g_async_queue_length(ds->b->done) > 0;
}

static gboolean done_dispatch(GSource *source, GSourceFunc cb, gpointer data)
{
    struct done_source *ds = (struct done_source *)source;
    (void)cb;
    (void)data;
    struct slot *head = NULL, **tail = &head;
    g_async_queue_lock(ds->b->done);
    struct slot *s;
    while ((s = g_async_queue_try_pop_unlocked(ds->b->done)) != NULL) {
        s->next = NULL;
        *tail = s;
        tail = &s->next;
    }
    g_async_queue_unlock(ds->b->done);
    while (head != NULL) {
        s = head;
        head = s->next;
        completion(s);
    }
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs done_funcs = {done_prepare, done_check, done_dispatch,
                                  NULL, NULL, NULL};
#endif

int main(int argc, char **argv)
{
    struct bench b;
    memset(&b, 0, sizeof b);
    bench_parse_args(argc, argv, IMPL, &b.args);
    bench_results_init(&b.results, b.args.n);
    bench_inflight_init(&b.inflight);

    b.ctx = g_main_context_new();
    g_main_context_push_thread_default(b.ctx);
    if (!g_main_context_acquire(b.ctx)) {
        fprintf(stderr, "bench-glib: cannot acquire the main context\n");
        return 3;
    }
    b.loop = g_main_loop_new(b.ctx, FALSE);
#ifdef BENCH_GLIB_ASYNC_QUEUE
    b.done = g_async_queue_new();
    GSource *src = g_source_new(&done_funcs, sizeof(struct done_source));
    ((struct done_source *)src)->b = &b;
    g_source_attach(src, b.ctx);
#endif

    GError *err = NULL;
    b.pool = g_thread_pool_new(pool_func, &b, (gint)b.args.threads, TRUE,
                               &err);
    if (b.pool == NULL) {
        fprintf(stderr, "bench-glib: g_thread_pool_new: %s\n",
                err != NULL ? err->message : "failed");
        return 3;
    }

    uint64_t nslots = b.args.limit < b.args.n ? b.args.limit : b.args.n;
    struct slot *slots = g_new0(struct slot, nslots);
    for (uint64_t k = 0; k < nslots; k++)
        slots[k].b = &b;

    uint64_t t0 = bench_now_ns();
    for (uint64_t k = 0; k < nslots && !b.failed; k++)
        submit(&b, &slots[k]);
    if (b.outstanding > 0)
        g_main_loop_run(b.loop);
    uint64_t t1 = bench_now_ns();

    /* Waits for the workers to exit. */
    g_thread_pool_free(b.pool, FALSE, TRUE);

    bool ok = bench_check(&b.results, &b.args, &b.inflight, 0);
    int status = bench_report(IMPL, &b.args, t1 - t0, ok, b.failed);

    g_free(slots);
#ifdef BENCH_GLIB_ASYNC_QUEUE
    g_source_destroy(src);
    g_source_unref(src);
    g_async_queue_unref(b.done);
#endif
    g_main_loop_unref(b.loop);
    g_main_context_release(b.ctx);
    g_main_context_pop_thread_default(b.ctx);
    g_main_context_unref(b.ctx);
    bench_results_free(&b.results);
    return status;
}
