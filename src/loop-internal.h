/* SPDX-License-Identifier: MIT */
/* The loop's own struct, shared by the files that implement the loop. */
#ifndef DEFERRED_LOOP_INTERNAL_H
#define DEFERRED_LOOP_INTERNAL_H

#include "deferred-internal.h"
#include "hot-assert.h"

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

/* What the loop is doing, for producers deciding whether to wake it
 * (loop->sleep; the protocol is described at the top of inbox.c). */
enum {
    DF__AWAKE,       /* it looks at the inbox before it sleeps again */
    DF__SLEEP_TIMED, /* it may block, for DF__WAKE_DEFER_NS at most */
    DF__SLEEP_INF    /* it may block with no bound, or a poller drives it */
};
/* The longest a timed sleep lasts, which bounds how long a completion
 * posted by df__loop_post_batched may wait unannounced: 1 ms.  Each
 * wake-up of the loop takes a core from a worker for a few microseconds
 * (two context switches on a machine with as many workers as cores):
 * two workers on two cores running 20 us items went from 1.66x one
 * thread's speed at 200 us to 1.85x at 1 ms in an A/B of four rounds, and
 * reached 1.78-1.80x in the longer runs (bench/RESULTS.md, "after
 * integ4"). */
#define DF__WAKE_DEFER_NS 1000000L
/* A worker wakes a loop in a timed sleep once this many of its posts are
 * unannounced, so that fast items do not pile up for a whole timeout. */
#define DF__WAKE_BATCH 256

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
    bool weak; /* df_timer_unref: does not keep df_loop_run running */
};

/* Work the loop thread owes to the workers and finishes at the end of a
 * turn (a run of inbox entries or timers), before the loop may block or
 * return to its caller: a map's pulled items, held back so as to reach
 * the workers as one chain (map.c).  Runs no user code. */
typedef struct df__turn_hook df__turn_hook;
struct df__turn_hook {
    df__turn_hook *next; /* loop->turn_hooks */
    void (*fn)(df__turn_hook *h);
    bool armed;          /* on loop->turn_hooks */
};

struct df_loop {
    /* These come first, in df__loop_id's order (inline checks). */
    uintptr_t token;   /* the loop thread's df__thread_token */
    unsigned fork_gen; /* df__fork_gen when the loop was made */
    pthread_t thread;  /* the loop thread */
    df_allocator alloc;
    df_unhandled_fn unhandled;
    void *unhandled_arg;
    uint64_t unhandled_count;

    /* Cross-thread part (inbox.c says who may touch what). */
    _Atomic(df__inbox_node *) inbox; /* pushed entries, newest first */
    atomic_int sleep;          /* DF__AWAKE, DF__SLEEP_TIMED, DF__SLEEP_INF */
    atomic_size_t calls;       /* cross-thread calls not yet run */
    pthread_mutex_t call_lock; /* protects call_free */
    df__inbox_node *call_free; /* recycled df__call_node entries */
    int wake_fd;               /* eventfd, or a pipe's read end */
    int wake_wfd;              /* written by any thread (== wake_fd) */

    /* Loop thread only from here on. */
    df__inbox_node *batch_head; /* taken from the inbox, not yet run */
    df__inbox_node **batch_tail; /* the last entry's link; meaningful
                                  * only while batch_head != NULL */
    df__inbox_node *spent_calls; /* run; returned to call_free later */
    size_t jobs;                 /* pool jobs whose completion is due */
    size_t pools;                /* pools made from this loop */
    size_t objects;              /* live sems, locks, queues */
    size_t deferreds;            /* live deferreds (deferred.c) */
    size_t maps;                 /* live maps (map.c) */
    uint64_t wakeups;            /* loop_run's returns from poll(2) */
    bool dispatching;            /* inside run/dispatch/run_matching */
    df__turn_hook *turn_hooks;   /* due at the end of the turn       */
    df__turn_hook **turn_tail;   /* the last one's next, or &turn_hooks */
    bool stop;                   /* df_loop_stop() was called */

    /* Timers (timer.c): a binary min-heap keyed (deadline, seq). */
    df_timer **heap;
    size_t heap_len, heap_cap;
    size_t weak_timers; /* armed timers made weak by df_timer_unref */
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

/* The slabs' fast paths, inline for the files on the hot path (the design
 * is described in alloc.c). */
#define DF__SLAB_BLOCKS 64                  /* blocks of a slab's first chunk */
#define DF__SLAB_CHUNK_MAX ((size_t)2 << 20) /* bytes: one huge page */

#if defined(__SANITIZE_ADDRESS__)
#define DF__ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DF__ASAN 1
#endif
#endif
#ifdef DF__ASAN
/* A free block is poisoned, so AddressSanitizer still catches a use of a
 * released deferred although its memory stays allocated. */
#include <sanitizer/asan_interface.h>
#define DF__POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define DF__UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define DF__POISON(p, n) ((void)0)
#define DF__UNPOISON(p, n) ((void)0)
#endif

struct df__chunk {
    df_loop *loop;          /* first: df__chunk_loop */
    df__chunk *prev, *next; /* on slab->partial */
    char *free;             /* free blocks (their first words link them) */
    char *bump;             /* first block never handed out */
    char *end;
    size_t bytes;           /* the chunk's allocation, header included */
    uint32_t used;          /* blocks handed out */
    bool listed;            /* on slab->partial */
    bool mapped;            /* from slab->pages, not from the allocator */
};

void *df__slab_get_slow(df_loop *loop, df__slab *s);
/* Frees an empty chunk. */
void df__chunk_free(df_loop *loop, df__slab *s, df__chunk *c);

static inline void df__chunk_list(df__slab *s, df__chunk *c)
{
    c->prev = NULL;
    c->next = s->partial;
    if (s->partial != NULL)
        s->partial->prev = c;
    s->partial = c;
    c->listed = true;
}

static inline void df__chunk_unlist(df__slab *s, df__chunk *c)
{
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        s->partial = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    c->listed = false;
}

static inline void *df__slab_get_inline(df_loop *loop, df__slab *s)
{
    df__chunk *c = s->partial;
    if (c == NULL)
        return df__slab_get_slow(loop, s);
    char *b = c->free;
    if (b != NULL) {
        DF__UNPOISON(b, s->size);
        c->free = *(char **)b;
    } else {
        b = c->bump;
        DF__UNPOISON(b, s->size);
        c->bump += s->size;
    }
    if (c->used++ == 0)
        s->empty--;
    if (c->free == NULL && c->bump == c->end)
        df__chunk_unlist(s, c);
    *(df__chunk **)(void *)b = c;
    return b;
}

static inline void df__slab_put_inline(df_loop *loop, df__slab *s, void *p)
{
    char *b = p;
    df__chunk *c = *(df__chunk **)(void *)b;
    DF__HOT_ASSERT(c->used > 0);
    if (--c->used == 0) {
        if (s->empty > 0) {
            /* Another chunk is empty already: give this one back. */
            df__chunk_free(loop, s, c);
            return;
        }
        s->empty++;
    }
    *(char **)(void *)b = c->free;
    c->free = b;
    DF__POISON(b + sizeof(char *), s->size - sizeof(char *));
    if (!c->listed)
        df__chunk_list(s, c);
}

/* loop.c, loop thread.  Has h->fn called at the end of the current turn
 * (at once if the loop is not running: no turn will end); h must stay
 * valid until then or until df__loop_turn_cancel.  Once per turn however
 * often it is asked. */
void df__loop_at_turn_end(df_loop *loop, df__turn_hook *h);
/* Forgets h if it is due. */
void df__loop_turn_cancel(df_loop *loop, df__turn_hook *h);
/* Calls the hooks due, in the order they were asked for. */
void df__loop_turn_end(df_loop *loop);

/* inbox.c, all loop thread. */
/* Creates the wake fd and the call lock; returns 0 or a negative code. */
int df__inbox_init(df_loop *loop);
/* Runs the cross-thread calls still queued with DF_ECANCELLED, frees the
 * call nodes, closes the fd (df_loop_free). */
void df__inbox_fini(df_loop *loop);
/* Moves everything posted so far to the end of loop->batch. */
void df__inbox_collect(df_loop *loop);
/* Takes the first entry of loop->batch, or NULL.  Taking the last one
 * leaves batch_tail stale, which the next append checks for (once per
 * batch instead of once per entry). */
static inline df__inbox_node *df__batch_pop(df_loop *loop)
{
    df__inbox_node *n = loop->batch_head;
    if (n != NULL) {
        loop->batch_head = n->next;
        n->next = NULL;
    }
    return n;
}
/* Announces that the loop may block: from now on a post writes to the
 * wake fd, except that with `timed` (the loop then blocks for at most
 * DF__WAKE_DEFER_NS) df__loop_post_batched may leave its entry for the
 * timeout to find.  Returns true when nothing is queued, so that the loop
 * may block; false: it must not (and should disarm). */
bool df__inbox_arm(df_loop *loop, bool timed);
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
/* df__loop_pending_add, inline for the pool's completion path. */
static inline void df__loop_jobs_add(df_loop *loop, long delta)
{
    DF__HOT_ASSERT(delta >= 0 || loop->jobs >= (size_t)-delta);
    loop->jobs = (size_t)((long)loop->jobs + delta);
}
/* Why a dispatch pass gives control back early. */
static inline bool df__loop_should_return(const df_loop *loop,
                                          df_deferred *until)
{
    return loop->stop || (until != NULL && df__deferred_called(until));
}

#endif /* DEFERRED_LOOP_INTERNAL_H */
