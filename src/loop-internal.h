/* SPDX-License-Identifier: MIT */
/* The loop's own struct, shared by the files that implement the loop. */
#ifndef DEFERRED_LOOP_INTERNAL_H
#define DEFERRED_LOOP_INTERNAL_H

#include "deferred-internal.h"

/*
 * The loop is four files, one concept each:
 *   alloc.c  the allocator and the per-loop block caches and slabs;
 *   inbox.c  the completion inbox, the wake fd and cross-thread calls (it
 *            owns the loop's only lock and states the lock order);
 *   timer.c  timers and deferred timeouts;
 *   loop.c   the life cycle, the counters and the run modes.
 * Everything in struct df_loop belongs to the loop thread except the fields
 * inbox.c marks as cross-thread.
 */

/* A cross-thread call, queued on the inbox.  Nodes are recycled through
 * loop->call_free so that a steady stream of calls allocates nothing. */
typedef struct df__call_node {
    df__inbox_node node;
    df_call_fn fn;
    void *arg;
} df__call_node;

struct df_timer {
    uint64_t deadline; /* df_loop_now() time at which it is due */
    uint64_t seq;      /* creation order, breaks deadline ties */
    size_t index;      /* position in loop->heap; SIZE_MAX: none */
    df_call_fn fn;
    void *arg;
    df_loop *loop;
    df_timer *next_free;
};

struct df_loop {
    /* These come first, in df__loop_id's order (inline checks). */
    const void *self;  /* the loop thread's df__thread_marker address */
    unsigned fork_gen; /* df__fork_gen when the loop was made */
    pthread_t thread;  /* the loop thread */
    df_allocator alloc;
    df_unhandled_fn unhandled;
    void *unhandled_arg;
    uint64_t unhandled_count;

    /* Cross-thread part (inbox.c says who may touch what). */
    _Atomic(df__inbox_node *) inbox; /* pushed entries, newest first */
    atomic_bool sleeping;      /* the next post must write to the fd */
    atomic_size_t calls;       /* cross-thread calls not yet run */
    pthread_mutex_t call_lock; /* protects call_free */
    df__inbox_node *call_free; /* recycled df__call_node entries */
    int wake_fd;               /* eventfd, or a pipe's read end */
    int wake_wfd;              /* written by any thread (== wake_fd) */

    /* Loop thread only from here on. */
    df__inbox_node *batch_head; /* taken from the inbox, not yet run */
    df__inbox_node **batch_tail;
    df__inbox_node *spent_calls; /* run; returned to call_free later */
    size_t jobs;                 /* pool jobs whose completion is due */
    size_t pools;                /* pools made from this loop */
    size_t objects;              /* live deferreds, sems, locks, queues */
    size_t lazy;                 /* jobs that may post without waking */
    bool dispatching;            /* inside run/dispatch/run_matching */
    bool stop;                   /* df_loop_stop() was called */

    /* Timers (timer.c): a binary min-heap keyed (deadline, seq). */
    df_timer **heap;
    size_t heap_len, heap_cap;
    uint64_t timer_seq;
    df_timer *timer_free;
    size_t timer_free_len;

    df__cache caches[DF__CACHES]; /* spare blocks */
    df__slab slabs[DF__SLABS];    /* deferreds' blocks (deferred.c) */
};

/* alloc.c */
extern const df_allocator df__default_allocator;
/* Frees every cached block (df_loop_free). */
void df__alloc_fini(df_loop *loop);

/* inbox.c, all loop thread. */
/* Creates the wake fd and the inbox lock; returns 0 or a negative code. */
int df__inbox_init(df_loop *loop);
/* Runs the cross-thread calls still queued with DF_ECANCELLED, frees the
 * call nodes, closes the fd (df_loop_free). */
void df__inbox_fini(df_loop *loop);
/* Moves everything posted so far to the end of loop->batch. */
void df__inbox_collect(df_loop *loop);
/* Takes the first entry of loop->batch, or NULL. */
df__inbox_node *df__batch_pop(df_loop *loop);
/* Announces that the loop may block: from now on a post writes to the
 * wake fd.  Returns true when nothing is queued, so that the loop may
 * block; false: it must not (and should disarm). */
bool df__inbox_arm(df_loop *loop);
/* The loop is awake: posts stop writing.  With `drain`, empties the fd. */
void df__inbox_disarm(df_loop *loop, bool drain);
/* Makes the wake fd readable (the loop gives control away with work
 * queued). */
void df__inbox_force_wake(df_loop *loop);

/* timer.c, all loop thread. */
/* Runs the timers due now (see timer.c); with `check`, stops after the
 * callback that made the loop's run condition true, setting *halt. */
unsigned df__timers_run(df_loop *loop, bool check, df_deferred *until,
                        bool *halt);
/* Milliseconds until the first timer is due; -1: no timer. */
int df__timers_timeout_ms(const df_loop *loop);
/* Frees every timer, armed or spare (df_loop_free). */
void df__timers_fini(df_loop *loop);

/* loop.c */
/* Why a dispatch pass gives control back early. */
static inline bool df__loop_should_return(const df_loop *loop,
                                          df_deferred *until)
{
    return loop->stop || (until != NULL && df_deferred_called(until));
}

#endif /* DEFERRED_LOOP_INTERNAL_H */
