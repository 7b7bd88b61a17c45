/* SPDX-License-Identifier: MIT */
/* DeferredQueue: bounded FIFO of values and of getters, run iteratively. */
#include <string.h>

#include "deferred-internal.h"
#include "ilist.h"

/*
 * Design
 * ------
 * Stored values live in a ring buffer that grows by doubling (never beyond
 * `size`), so a put that stores allocates only when the ring is full.
 * Pending gets are intrusive nodes on `waiting`.  Invariant: values are
 * stored only while nobody waits (count > 0 implies `waiting` is empty),
 * because a put hands its value to the first waiting get instead.
 *
 * No recursion.  A put that finds a waiting get pairs the value with it
 * and moves the node to `ready`; the outermost queue frame on the stack
 * (the dispatcher, see queue_enter/queue_leave) fires the ready gets one
 * after another.  A put made from the callback of a get, while a dispatch
 * is under way, only queues its node and returns, so a chain of getters
 * whose callbacks put again runs in constant stack instead of nesting one
 * frame per value as Twisted's put() does.
 *
 * Freeing.  df_queue_free() may be called from a get's callback; it then
 * fails the waiting gets and destroys the stored values at once, refuses
 * further puts and gets (DF_ESTATE) and leaves the memory to the
 * dispatcher, which frees it as it unwinds.
 */

typedef struct slot {
    void *value;
    df_free_fn free;
} slot;

struct df_queue {
    df_loop *loop;
    size_t size;           /* most values held (SIZE_MAX: no limit)     */
    size_t backlog;        /* most pending gets (SIZE_MAX: no limit)    */
    slot *ring;            /* stored values, `count` from `head`        */
    size_t cap;
    size_t head;
    size_t count;
    df__ilink waiting;     /* pending gets, FIFO                        */
    size_t nwaiting;
    df__ilink ready;       /* gets handed a value, not yet fired, FIFO  */
    bool dispatching;      /* a queue_enter() frame is on the stack     */
    bool closing;          /* df_queue_free() was called                */
};

enum getter_state { ST_WAITING, ST_READY };

typedef struct getter {
    df__ilink link;
    df_queue *q;
    df_deferred *d;        /* the get's deferred; our own reference     */
    void *value;           /* READY: the value handed over              */
    df_free_fn free;
    unsigned char state;
} getter;

#define GETTER_OF(l) DF__CONTAINER_OF(l, getter, link)

static void destroy_value(void *value, df_free_fn free_fn)
{
    if (free_fn != NULL)
        free_fn(value);
}

/* ------------------------------------------------------------ ring buffer */

/* Makes room for one more stored value.  On failure nothing changes. */
static int ring_reserve(df_queue *q)
{
    if (q->count < q->cap)
        return 0;
    size_t cap = q->cap != 0 ? q->cap : 8;
    if (q->cap != 0) {
        if (q->cap > SIZE_MAX / 2 / sizeof(slot))
            return DF_ENOMEM;
        cap = q->cap * 2;
    }
    if (cap > q->size)
        cap = q->size; /* > count here, since put checked count < size */
    slot *ring = df__malloc(q->loop, cap * sizeof(slot));
    if (ring == NULL)
        return DF_ENOMEM;
    /* Unwrap the old ring so that the values start at index 0. */
    for (size_t i = 0; i < q->count; i++)
        ring[i] = q->ring[(q->head + i) % q->cap];
    df__free(q->loop, q->ring);
    q->ring = ring;
    q->cap = cap;
    q->head = 0;
    return 0;
}

static void ring_push(df_queue *q, void *value, df_free_fn free_fn)
{
    assert(q->count < q->cap);
    slot *sl = &q->ring[(q->head + q->count) % q->cap];
    sl->value = value;
    sl->free = free_fn;
    q->count++;
}

static slot ring_shift(df_queue *q)
{
    assert(q->count > 0);
    slot sl = q->ring[q->head];
    q->head = (q->head + 1) % q->cap;
    q->count--;
    return sl;
}

/* ------------------------------------------------------------ dispatcher */

static bool queue_enter(df_queue *q)
{
    bool outer = !q->dispatching;
    q->dispatching = true;
    return outer;
}

static void queue_destroy(df_queue *q)
{
    assert(df__ilist_empty(&q->waiting) && df__ilist_empty(&q->ready));
    while (q->count > 0) {
        slot sl = ring_shift(q);
        destroy_value(sl.value, sl.free);
    }
    df__free(q->loop, q->ring);
    df__loop_objects_add(q->loop, -1);
    df__free(q->loop, q);
}

static int queue_deliver(df_queue *q, void *value, df_free_fn free_fn);

/* Fires a get that has been handed a value. */
static void getter_fire(df_queue *q, getter *g)
{
    df_deferred *d = g->d;
    void *value = g->value;
    df_free_fn free_fn = g->free;

    df__free(q->loop, g);
    if (df_deferred_callback(d, value, free_fn) != 0) {
        /* Only misuse (the application firing a get's deferred itself)
         * gets here: the value goes to the next in line, or is stored. */
        if (q->closing || queue_deliver(q, value, free_fn) != 0)
            destroy_value(value, free_fn);
    }
    df_deferred_unref(d);
}

/* The outermost frame fires every get that has been handed a value, in
 * order, then frees the queue if df_queue_free() was called meanwhile.
 * Inner frames return at once without touching `q`. */
static void queue_leave(df_queue *q, bool outer)
{
    if (!outer)
        return;
    df__ilink *l;
    while ((l = df__ilist_pop(&q->ready)) != NULL)
        getter_fire(q, GETTER_OF(l));
    q->dispatching = false;
    if (q->closing)
        queue_destroy(q);
}

/* Hands the value to the first waiting get (fired by the dispatcher), or
 * stores it.  Steals the value on success.  Runs no user code. */
static int queue_deliver(df_queue *q, void *value, df_free_fn free_fn)
{
    df__ilink *l = df__ilist_pop(&q->waiting);
    if (l != NULL) {
        getter *g = GETTER_OF(l);
        q->nwaiting--;
        g->value = value;
        g->free = free_fn;
        g->state = ST_READY;
        df__ilist_append(&q->ready, l);
        return 0;
    }
    if (q->count >= q->size)
        return DF_EQUEUE_OVERFLOW;
    int rc = ring_reserve(q);
    if (rc != 0)
        return rc;
    ring_push(q, value, free_fn);
    return 0;
}

/* ------------------------------------------------------------ cancelling */

/* The canceller of a pending get.  df_deferred_cancel() holds a reference
 * to d while this runs. */
static void getter_cancel(df_deferred *d, void *arg)
{
    getter *g = arg;
    df_queue *q = g->q;

    assert(g->d == d);
    df__ilist_remove(&g->link);
    if (g->state == ST_WAITING) {
        /* Leave the line; df_deferred_cancel fails d once we return. */
        q->nwaiting--;
        df__free(q->loop, g);
        df_deferred_unref(d);
        return;
    }
    /* READY: a put has already handed this get its value, exactly as if
     * Twisted's put() had fired it then, so the cancel comes too late:
     * deliver the value now (Twisted: test_cancelQueueAfterSynchronousGet).*/
    bool outer = queue_enter(q);
    getter_fire(q, g);
    queue_leave(q, outer);
}

/* ------------------------------------------------------------ public API */

int df_queue_new(df_loop *loop, size_t size, size_t backlog, df_queue **out)
{
    /* No room for a value nor for a get: nothing could ever pass. */
    if (loop == NULL || out == NULL || (size == 0 && backlog == 0))
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    df_queue *q = df__malloc(loop, sizeof *q);
    if (q == NULL)
        return DF_ENOMEM;
    df__loop_objects_add(loop, 1);
    memset(q, 0, sizeof *q);
    q->loop = loop;
    q->size = size;
    q->backlog = backlog;
    df__ilist_init(&q->waiting);
    df__ilist_init(&q->ready);
    *out = q;
    return 0;
}

void df_queue_free(df_queue *q)
{
    if (q == NULL)
        return;
    if (!df__loop_usable(q->loop, __func__))
        return;
    if (q->closing)
        return; /* already being freed by a dispatch that is unwinding */
    q->closing = true;

    bool outer = queue_enter(q);
    /* Fail the waiting gets.  Their callbacks may call into the queue:
     * `closing` makes puts and gets refuse with DF_ESTATE. */
    df__ilink *l;
    while ((l = df__ilist_pop(&q->waiting)) != NULL) {
        getter *g = GETTER_OF(l);
        df_deferred *d = g->d;
        q->nwaiting--;
        df__free(q->loop, g);
        df_deferred_errback(d, df_failure_new(q->loop, DF_ECANCELLED,
                                              "the queue was freed"));
        df_deferred_unref(d);
    }
    while (q->count > 0) {
        slot sl = ring_shift(q);
        destroy_value(sl.value, sl.free);
    }
    /* Gets already handed a value (only while a dispatch is under way)
     * still receive it: the dispatcher fires them, then frees the queue. */
    queue_leave(q, outer);
}

int df_queue_put(df_queue *q, void *value, df_free_fn free_fn)
{
    if (q == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(q->loop);
    if (q->closing)
        return DF_ESTATE;
    bool outer = queue_enter(q);
    int rc = queue_deliver(q, value, free_fn);
    queue_leave(q, outer);
    return rc;
}

int df_queue_get(df_queue *q, df_deferred **out)
{
    if (q == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(q->loop);
    if (q->closing)
        return DF_ESTATE;

    df_deferred *d;
    int rc;
    if (q->count > 0) {
        /* A stored value means nobody waits (see the invariant above). */
        slot *head = &q->ring[q->head];
        rc = df_succeed(q->loop, head->value, head->free, &d);
        if (rc != 0)
            return rc; /* the value stays stored */
        ring_shift(q);
        *out = d;
        return 0;
    }
    if (q->nwaiting >= q->backlog)
        return DF_EQUEUE_UNDERFLOW;

    getter *g = df__malloc(q->loop, sizeof *g);
    if (g == NULL)
        return DF_ENOMEM;
    rc = df_deferred_new_cancellable(q->loop, getter_cancel, g, &d);
    if (rc != 0) {
        df__free(q->loop, g);
        return rc;
    }
    memset(g, 0, sizeof *g);
    g->q = q;
    /* Our own reference, so that the node never points at a freed deferred
     * if the application drops its reference while the get waits. */
    g->d = df_deferred_ref(d);
    g->state = ST_WAITING;
    df__ilist_append(&q->waiting, &g->link);
    q->nwaiting++;
    *out = d;
    return 0;
}

size_t df_queue_size(const df_queue *q)
{
    return q != NULL ? q->count : 0;
}

size_t df_queue_waiting(const df_queue *q)
{
    return q != NULL ? q->nwaiting : 0;
}
