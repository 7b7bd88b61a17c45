/* SPDX-License-Identifier: MIT */
/* The Deferred: a once-fired result with a callback chain, run iteratively. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loop-internal.h" /* slabs and counters, inline */

/*
 * State machine
 * -------------
 *   unfired --callback/errback/cancel--> fired
 *   fired: the chain runs until it is empty or the deferred is paused
 *   (paused > 0: by df_deferred_pause, or by waiting on an inner deferred,
 *   in which case `link` holds a reference to that inner deferred, called
 *   chained_to below).
 *
 * Chains never grow the C stack.  run_callbacks() keeps an explicit stack
 * of the deferreds it is working on, linked through `link` too (the two
 * uses never overlap: see struct df_deferred); when an
 * inner deferred's chain reaches the continuation entry of the outer one
 * that waits for it, the outer is pushed instead of being run by a nested
 * call.  A deferred is on at most one such stack (the IN_RUN flag), and a
 * call that would start a second run of a deferred already being run just
 * returns: the running loop picks up whatever was added.
 *
 * Special entries: an entry whose cb is continue_mark hands the result to
 * the waiting outer deferred in `arg` (which does not hold a reference: the
 * outer holds one on us through chained_to, so it outlives the entry unless
 * it is released first, and then it removes the entry).  An entry whose cb
 * is chain_mark fires the deferred in `arg` (holding a reference), as
 * Twisted's chainDeferred does.
 *
 * Twisted runs a chained deferred's callbacks in a nested call of its own
 * (chainDeferred is addCallbacks(other.callback, other.errback)), and two
 * things follow that the stack must reproduce:
 *   - a deferred found paused stops only the run it belongs to: popping
 *     stops at the deferred a chain entry pushed (F_CHAIN_BASE), and the
 *     chaining deferred below it goes on (issue 15 item 6);
 *   - while `other` runs, the chaining deferred still holds the result it
 *     fired other with, and a callback that waits for the chaining
 *     deferred takes it.  The value moved to other, so the chaining
 *     deferred keeps a copy without destructor (a failure: a reference),
 *     flagged F_CHAIN_HELD, and drops it when it resumes with
 *     df_ok(NULL, NULL), the return of Twisted's other.callback().
 */

enum {
    F_CALLED = 1u << 0,        /* fired                                    */
    F_IN_RUN = 1u << 1,        /* on a run_callbacks stack                  */
    F_SUPPRESS = 1u << 2,      /* cancelled: swallow the producer's fire    */
    F_CANCEL_WAITS = 1u << 3,  /* canceller fires it later (pool jobs)      */
    F_CANCELLING = 1u << 4,    /* its canceller is running                  */
    F_TIMEOUT = 1u << 5,       /* a timeout was set (loop.c)                */
    F_CHAIN_BASE = 1u << 7,    /* on the stack, pushed by a chain entry     */
    F_CHAIN_HELD = 1u << 8,    /* firing a chained deferred; holds a copy   */
    F_IN_CALLBACK = 1u << 9,   /* one of its callbacks is running           */
    F_SCAN_MARK = 1u << 10,    /* df__deferred_reserve_members' scratch   */
    F_HEAP = 1u << 11,         /* the entries are in a heap array           */
    /* Bits 12-13: the block's class, its slab (DF__SLAB_*). */
    F_POOL_JOB_IO = 1u << 14,  /* its pool job owns the result fields      */
    F_MARKS = 1u << 15,        /* a special entry was appended once (sticky) */
};
#define CLASS_SHIFT 12
#define F_CLASS (3u << CLASS_SHIFT)
_Static_assert(DF__SLABS <= 4,
               "the class takes two bits");

typedef df__entry entry; /* deferred-internal.h: list.c appends inline */

/* Callback pairs a deferred holds without an allocation of its own: two
 * for a plain deferred, one for a block with room for a job (its one
 * common pair is the application's, or a list's member callback), so that
 * the job starts right after that one entry. */
#define INLINE_ENTRIES 2
#define INLINE_ENTRIES_JOB 1

/* Where the entries live once they outgrow the inline room (F_HEAP): the
 * heap array's address is kept in that room, which is free then. */
typedef struct heap_entries {
    entry *v;
} heap_entries;
_Static_assert(sizeof(heap_entries) <= INLINE_ENTRIES_JOB * sizeof(entry),
               "the heap handle must fit in a job block's inline room");

/*
 * 64 bytes before the inline entries.  Three pairs of fields share bytes
 * because their lifetimes never overlap:
 *   - the canceller and its argument are needed only until the deferred
 *     fires (df_deferred_cancel() calls the canceller only when F_CALLED
 *     is clear), the result only from then on: firing overwrites the one
 *     with the other;
 *   - `link` is the run_callbacks() stack link while F_IN_RUN is set, and
 *     the inner deferred waited on (an owned reference, "chained_to")
 *     otherwise.  A deferred that waits is never pushed (a chained
 *     deferred is paused, and a run finds it paused before pushing it; the
 *     continuation entry clears the wait before it pushes the outer), and
 *     one that starts waiting while on the stack is popped before `link`
 *     takes the inner deferred (pop_to_wait);
 *   - the inline entries and the heap array's address (F_HEAP);
 *   - in a pool job's block, until its producer fires it (F_POOL_JOB_IO),
 *     all 32 bytes from the canceller to `link` are the job's df__job_io:
 *     its work and argument, then the result its worker writes.  The
 *     canceller is known from the class (df__pool_job_cancel), `failure`
 *     and `link` are read only once fired (chained() checks F_CALLED), so
 *     nothing on the loop thread reads those bytes while the worker may
 *     write them, and nobody else may fire the deferred meanwhile (that
 *     would write them): DF_EBUSY.  The producer's fire reads the result
 *     out first, then clears `link` (df__deferred_resolve_drop).
 */
struct df_deferred {
    df__chunk *chunk;         /* its slab chunk (the slab wrote it): LOOP() */
    uint32_t refs;
    uint32_t flags;
    uint32_t paused;
    uint32_t head;            /* next entry to run */
    uint32_t count;           /* entries in use    */
    uint32_t cap;             /* entries allocated */
    union {
        struct {
            union {
                struct {      /* until F_CALLED */
                    df_canceller_fn canceller;
                    void *canceller_arg;
                };
                struct {      /* from F_CALLED on: the result */
                    void *value;
                    df_free_fn value_free;
                };
            };
            df_failure *failure; /* the result's failure (NULL until fired) */
            df_deferred *link;   /* see above: use chained() to read it */
        };
        df__job_io job_io;    /* F_POOL_JOB_IO: the pool job's (see above) */
    };
    union {
        entry inline_entries[INLINE_ENTRIES]; /* last: a job block keeps
                                                 INLINE_ENTRIES_JOB */
        heap_entries heap;                    /* F_HEAP */
    };
};

/* A deferred's loop: its chunk's (the chunk outlives every block it hands
 * out). */
#define LOOP(d) df__chunk_loop((d)->chunk)

/* Where a block made with room for a job starts that room: right after
 * its INLINE_ENTRIES_JOB inline entries. */
#define EXT_OFFSET                                                             \
    (offsetof(df_deferred, inline_entries) + INLINE_ENTRIES_JOB * sizeof(entry))
_Static_assert(EXT_OFFSET == DF__JOB_OFFSET, "fix DF__JOB_OFFSET");
_Static_assert(offsetof(df_deferred, chunk) == 0 &&
                   offsetof(df_deferred, chunk) ==
                       offsetof(df__deferred_head, chunk) &&
                   offsetof(df_deferred, refs) ==
                       offsetof(df__deferred_head, refs) &&
                   offsetof(df_deferred, flags) ==
                       offsetof(df__deferred_head, flags) &&
                   offsetof(df_deferred, paused) ==
                       offsetof(df__deferred_head, paused) &&
                   offsetof(df_deferred, head) ==
                       offsetof(df__deferred_head, head) &&
                   offsetof(df_deferred, count) ==
                       offsetof(df__deferred_head, count) &&
                   offsetof(df_deferred, cap) ==
                       offsetof(df__deferred_head, cap) &&
                   offsetof(df_deferred, inline_entries) ==
                       DF__DEFERRED_ENTRIES_OFFSET &&
                   F_HEAP == DF__DEFERRED_HEAP &&
                   F_CALLED == DF__DEFERRED_CALLED &&
                   F_CANCEL_WAITS == DF__DEFERRED_CANCEL_WAITS,
               "df__deferred_head must match struct df_deferred");
_Static_assert(EXT_OFFSET % 8 == 0, "a job needs 8-byte alignment");
_Static_assert(offsetof(df_deferred, job_io) == offsetof(df_deferred, value) &&
                   offsetof(df_deferred, job_io) ==
                       offsetof(df_deferred, canceller) &&
                   offsetof(df_deferred, link) + sizeof(df_deferred *) ==
                       offsetof(df_deferred, job_io) + sizeof(df__job_io) &&
                   EXT_OFFSET - offsetof(df_deferred, job_io) ==
                       DF__JOB_IO_BACK,
               "a pool job's io must be the deferred's canceller and result "
               "fields, DF__JOB_IO_BACK bytes before the job");
_Static_assert(offsetof(df_deferred, inline_entries) <= 64,
               "a deferred's header is 64 bytes at most (issue 11)");

/* The inner deferred d waits on, or NULL.  An unfired deferred waits on
 * nothing, and its `link` is not read (a pool job's worker may be writing
 * it: see above). */
static inline df_deferred *chained(const df_deferred *d)
{
    return (d->flags & (F_IN_RUN | F_CALLED)) == F_CALLED ? d->link : NULL;
}

static inline entry *entries(df_deferred *d)
{
    return (d->flags & F_HEAP) ? d->heap.v : d->inline_entries;
}

static inline uint32_t entries_cap(const df_deferred *d)
{
    return d->cap;
}

static df_result continue_mark(df_result r, void *arg)
{
    DF__UNUSED(arg);
    return r;
}

static df_result chain_mark(df_result r, void *arg)
{
    DF__UNUSED(arg);
    return r;
}

/* The release (below) is df__deferred_release itself, so that the inline
 * unref of deferred-internal.h reaches it with no jump in between. */
#define deferred_release df__deferred_release

/* df_deferred_unref for a caller on the loop thread that has checked it
 * already: the checks cost more than the decrement. */
static inline void unref_checked(df_deferred *d)
{
    DF__HOT_ASSERT(d->refs > 0);
    if (--d->refs == 0)
        deferred_release(d);
}

/* ----------------------------------------------------------- small pieces */

static inline df_result take_result(df_deferred *d)
{
    df_result r = {d->value, d->value_free, d->failure, NULL};
    d->value = NULL;
    d->value_free = NULL;
    d->failure = NULL;
    return r;
}

static inline void put_result(df_deferred *d, df_result r)
{
    assert(r.wait == NULL);
    d->value = r.value;
    d->value_free = r.free;
    d->failure = r.failure;
}

/* Moves the entries to a heap array of `cap` entries (cap >= count). */
static int entries_grow(df_deferred *d, uint32_t cap)
{
    entry *e;
    if (d->flags & F_HEAP) {
        e = df__realloc(LOOP(d), d->heap.v, cap * sizeof(entry));
    } else {
        e = df__malloc(LOOP(d), cap * sizeof(entry));
        if (e != NULL)
            memcpy(e, d->inline_entries, d->count * sizeof(entry));
    }
    if (e == NULL)
        return DF_ENOMEM;
    d->heap.v = e; /* over the inline entries, copied above */
    d->cap = cap;
    d->flags |= F_HEAP;
    return 0;
}

/* Makes room for one more entry in a full store. */
static DF__NOINLINE int entries_make_room(df_deferred *d)
{
    if (d->head > 0) {
        /* Reuse the slots already run before growing. */
        entry *v = entries(d);
        memmove(v, v + d->head, (d->count - d->head) * sizeof(entry));
        d->count -= d->head;
        d->head = 0;
        return 0;
    }
    uint32_t cap = entries_cap(d);
    if (cap > UINT32_MAX / 2)
        return DF_ENOMEM;
    return entries_grow(d, cap * 2);
}

/* append_entry's common case: an unfired deferred with inline room
 * (nothing has run, so head is 0).  False: the caller takes the general
 * path. */
static inline bool append_inline(df_deferred *d, uint32_t flags,
                                 df_callback_fn cb, df_callback_fn eb,
                                 void *arg)
{
    if ((flags & (F_CALLED | F_HEAP)) || d->count >= d->cap)
        return false;
    entry *e = &d->inline_entries[d->count++];
    e->cb = cb;
    e->eb = eb;
    e->arg = arg;
    return true;
}

static inline int append_entry(df_deferred *d, df_callback_fn cb,
                               df_callback_fn eb, void *arg)
{
    if (d->head == d->count) {
        d->head = 0;
        d->count = 0;
    }
    if (d->count == entries_cap(d)) {
        int rc = entries_make_room(d);
        if (rc != 0)
            return rc;
    }
    entry *e = &entries(d)[d->count];
    e->cb = cb;
    e->eb = eb;
    e->arg = arg;
    d->count++;
    return 0;
}

/* ------------------------------------------------------- the chain runner */

static void push(df_deferred **top, df_deferred *d)
{
    assert(!(d->flags & F_IN_RUN) && d->link == NULL); /* it does not wait */
    d->refs++;
    d->flags |= F_IN_RUN;
    d->link = *top;
    *top = d;
}

static void pop(df_deferred **top)
{
    df_deferred *d = *top;
    *top = d->link;
    d->link = NULL;
    d->flags &= ~(F_IN_RUN | F_CHAIN_BASE);
    unref_checked(d);
}

/* pop() for the top deferred, which has just started to wait for `inner`:
 * `link` becomes its chained_to once it is off the stack (and before the
 * stack's reference goes, whose release must see the wait). */
static void pop_to_wait(df_deferred **top, df_deferred *inner)
{
    df_deferred *d = *top;
    *top = d->link;
    d->link = inner;
    d->flags &= ~(F_IN_RUN | F_CHAIN_BASE);
    unref_checked(d);
}

/* Takes the result of `inner` for `cur` if it is there, else makes `cur`
 * wait for it (the caller then records inner in cur->link).  Consumes the
 * reference to inner.  Returns true when cur must stop (it now waits). */
static bool wait_for(df_deferred *cur, df_deferred *inner)
{
    if (inner == cur || LOOP(inner) != LOOP(cur)) {
        df_deferred_unref(inner);
        put_result(cur, df_errf(LOOP(cur), DF_EINVAL,
                                inner == cur ? "callback returned its own "
                                               "deferred"
                                             : "callback returned a deferred "
                                               "of another loop"));
        return false;
    }
    if ((inner->flags & F_CALLED) && inner->paused == 0 &&
        !(inner->flags & F_IN_CALLBACK)) {
        /* Already fired: take its result now (Twisted leaves None behind),
         * also from a deferred on a run_callbacks stack: it holds its
         * result, or NULL after a continuation, or the copy it keeps while
         * firing a chained one.  Only while one of its callbacks runs is
         * its result with that callback, so we wait for it (Twisted takes
         * the value the callback was given: README's departures). */
        put_result(cur, take_result(inner));
        df_deferred_unref(inner);
        return false;
    }
    inner->flags |= F_MARKS; /* before: append_entry may run inner */
    int rc = append_entry(inner, continue_mark, continue_mark, cur);
    if (rc != 0) {
        df_deferred_unref(inner);
        put_result(cur, df_errf(LOOP(cur), rc, "cannot wait for a deferred"));
        return false;
    }
    cur->paused++;
    return true;
}

/* Runs one ordinary callback pair's `fn` on `r`, d's result taken out of
 * it, with `mark` set in d's flags while it runs, and takes what it
 * returns: d's new result, or a deferred to wait for.  Returns that inner
 * deferred if d now waits for it (not recorded in d->link yet: the caller
 * does it), else NULL. */
static inline df_deferred *call_entry(df_deferred *d, df_callback_fn fn,
                                      df_result r, void *arg, uint32_t mark)
{
    d->flags |= mark;
    df_result out = fn(r, arg);
    d->flags &= ~mark;
    if (out.wait == NULL) {
        put_result(d, out);
        return NULL;
    }
    df_deferred *inner = out.wait;
    if (out.failure != NULL || out.free != NULL) {
        /* Only df_wait() may set wait: drop the rest. */
        out.wait = NULL;
        df_result_clear(&out);
    }
    return wait_for(d, inner) ? inner : NULL;
}

/* Runs self's chain.  resume: self's first callback has just run in
 * run_single(), and this goes on from there exactly as the loop below
 * would have after that callback (whose pause takes effect only at the
 * next turn of the outer loop, not before the next entry). */
static void run_callbacks_from(df_deferred *self, bool resume)
{
    if (self->flags & F_IN_RUN)
        return; /* the run already under way will see the new entries */
    if (self->paused && !resume)
        return; /* nothing can run until it is unpaused (or stops waiting) */
    df_deferred *top = NULL;
    push(&top, self);

    while (top != NULL) {
        df_deferred *cur = top;
        if (cur->flags & F_CHAIN_HELD) {
            /* Back from firing a chained deferred: drop the copy. */
            df_result held = take_result(cur);
            df_result_clear(&held);
            cur->flags &= ~F_CHAIN_HELD;
        }
        bool skip_pause = resume;
        resume = false;
        if (cur->paused && !skip_pause) {
            /* Nothing more can happen until it is unpaused; the deferreds
             * below it wait for it, so they stop too (as in Twisted), down
             * to the one a chain entry pushed: the chaining deferred below
             * that goes on, as Twisted's other.callback() returns to it. */
            while (top != NULL) {
                bool base = (top->flags & F_CHAIN_BASE) != 0;
                pop(&top);
                if (base)
                    break;
            }
            continue;
        }
        bool finished = true;
        while (cur->head < cur->count) {
            entry e = entries(cur)[cur->head++];
            df_callback_fn fn = cur->failure != NULL ? e.eb : e.cb;

            if (e.cb == continue_mark) {
                df_deferred *outer = e.arg;
                put_result(outer, take_result(cur));
                outer->paused--;
                outer->link = NULL; /* it waits no more */
                df_deferred_unref(cur); /* outer's reference; ours remains */
                push(&top, outer);
                finished = false;
                break;
            }
            if (e.cb == chain_mark) {
                df_deferred *other = e.arg;
                if ((other->flags & (F_CALLED | F_POOL_JOB_IO)) ==
                    F_POOL_JOB_IO) {
                    /* A pool job's, in flight: only its producer fires
                     * it (see df_deferred_chain). */
                    df_result old = take_result(cur);
                    df_result_clear(&old);
                    put_result(cur, df_errf(LOOP(cur), DF_EBUSY,
                                            "chained deferred belongs to a "
                                            "pool job in flight"));
                    df_deferred_unref(other);
                    continue;
                }
                if (other->flags & F_CALLED) {
                    df_result old = take_result(cur);
                    df_result_clear(&old);
                    if (other->flags & F_SUPPRESS) {
                        /* Cancelled without a canceller: swallowed. */
                        other->flags &= ~F_SUPPRESS;
                    } else {
                        put_result(cur, df_errf(LOOP(cur), DF_EALREADY_CALLED,
                                                "chained deferred already "
                                                "fired"));
                    }
                    df_deferred_unref(other);
                    continue;
                }
                df_result r = take_result(cur);
                put_result(other, r); /* over its canceller: it fires */
                other->flags |= F_CALLED;
                if (other->paused || (other->flags & F_IN_RUN)) {
                    df_deferred_unref(other);
                    continue;
                }
                /* Keep what other was fired with while it runs (see the
                 * top of the file). */
                put_result(cur, df_ok(r.value, NULL));
                if (r.failure != NULL)
                    cur->failure = df_failure_ref(r.failure);
                cur->flags |= F_CHAIN_HELD;
                push(&top, other);
                other->flags |= F_CHAIN_BASE;
                df_deferred_unref(other); /* the entry's reference */
                finished = false;
                break;
            }
            if (fn == NULL)
                continue; /* pass through */

            df_deferred *inner =
                call_entry(cur, fn, take_result(cur), e.arg, F_IN_CALLBACK);
            if (inner != NULL) {
                pop_to_wait(&top, inner);
                finished = false;
                break;
            }
        }
        if (finished)
            pop(&top);
    }
}

static void run_callbacks(df_deferred *self)
{
    run_callbacks_from(self, false);
}

/*
 * The common chain, one ordinary pair (an application's callbacks, or a
 * list's member callback), run without the explicit stack: the same steps
 * as the first turn of run_callbacks() for a deferred alone on its stack,
 * with F_IN_RUN set while the callback runs so that anything it adds, and
 * any run it asks for, waits for us as it would for run_callbacks().  `r`
 * is the result d has just fired with (F_CALLED is set), not stored in d
 * yet: it goes straight to the callback, and d holds what take_result()
 * would have left meanwhile.  The caller holds a reference.  Returns
 * SINGLE_DONE, SINGLE_NOT (nothing ran, r is stored: the chain is not that
 * simple) or SINGLE_MORE (the callback added entries:
 * run_callbacks_from(d, true) goes on with them).
 */
enum { SINGLE_DONE, SINGLE_NOT, SINGLE_MORE };

static inline int run_single(df_deferred *d, df_result r)
{
    if ((d->flags & F_IN_RUN) || d->paused || d->count - d->head != 1) {
        put_result(d, r);
        return SINGLE_NOT;
    }
    entry e = entries(d)[d->head];
    if (e.cb == continue_mark || e.cb == chain_mark) {
        put_result(d, r);
        return SINGLE_NOT;
    }
    d->head++;
    df_callback_fn fn = r.failure != NULL ? e.eb : e.cb;
    if (fn == NULL) {
        put_result(d, r); /* pass through */
    } else {
        put_result(d, df_ok(NULL, NULL)); /* over the canceller */
        df_deferred *inner =
            call_entry(d, fn, r, e.arg, F_IN_RUN | F_IN_CALLBACK);
        if (inner != NULL) {
            d->link = inner;
            return SINGLE_DONE; /* it waits: the rest runs later */
        }
    }
    return d->head < d->count ? SINGLE_MORE : SINGLE_DONE;
}

/* -------------------------------------------------------------- lifecycle */

size_t df__deferred_block_size(int which)
{
    switch (which) {
    case DF__SLAB_DEFERRED_JOB:
        return EXT_OFFSET + DF__JOB_SIZE;
    case DF__SLAB_DEFERRED_POOL_JOB:
        return EXT_OFFSET + DF__POOL_JOB_SIZE;
    default:
        return sizeof(df_deferred);
    }
}

/* Gives a deferred's block back to its loop's slab. */
static inline void block_put(df_deferred *d)
{
    df_loop *loop = LOOP(d);
    DF__HOT_ASSERT(loop->deferreds > 0);
    loop->deferreds--;
    df__slab_put_inline(
        loop, &loop->slabs[(d->flags & F_CLASS) >> CLASS_SHIFT], d);
}

/* A block of class `which` (DF__SLAB_*) from the loop's slab, its head
 * written for an unfired deferred with `refs` references and `flags`
 * (besides the class) and no entries, or NULL.  The members after the
 * head are the caller's to write.  Loop thread: the caller has checked. */
static inline df_deferred *block_get_head(df_loop *loop, unsigned which,
                                          uint32_t refs, uint32_t flags)
{
    df_deferred *d = df__slab_get_inline(loop, &loop->slabs[which]);
    if (d == NULL)
        return NULL;
    loop->deferreds++;
    /* Every member of the head written once, constants the compiler
     * merges into two wide stores (a call to memset costs more). */
    DF__HOT_ASSERT(df__chunk_loop(d->chunk) == loop);
    d->refs = refs;
    d->flags = (which << CLASS_SHIFT) | flags;
    d->paused = 0;
    d->head = 0;
    d->count = 0;
    d->cap = which != DF__SLAB_DEFERRED ? INLINE_ENTRIES_JOB : INLINE_ENTRIES;
    return d;
}

/* A new, unfired deferred of class `which` with one reference and the
 * canceller fn (arg), or NULL.  Loop thread: the caller has checked. */
static inline df_deferred *block_get(df_loop *loop, unsigned which,
                                     df_canceller_fn fn, void *arg)
{
    df_deferred *d = block_get_head(loop, which, 1, 0);
    if (d == NULL)
        return NULL;
    d->canceller = fn;
    d->canceller_arg = arg;
    d->failure = NULL;
    d->link = NULL;
    return d;
}

static int deferred_alloc(df_loop *loop, df_canceller_fn fn, void *arg,
                          df_deferred **out)
{
    if (loop == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    df_deferred *d = block_get(loop, DF__SLAB_DEFERRED, fn, arg);
    if (d == NULL)
        return DF_ENOMEM;
    *out = d;
    return 0;
}

df_deferred *df__deferred_new_job(df_loop *loop, df_canceller_fn fn,
                                  uint32_t flags)
{
    DF__HOT_ASSERT(df__on_loop_thread(loop));
    DF__HOT_ASSERT((flags & ~(uint32_t)F_CANCEL_WAITS) == 0);
    df_deferred *d = block_get(loop, DF__SLAB_DEFERRED_JOB, fn, NULL);
    if (d != NULL) {
        d->flags |= flags;
        d->canceller_arg = (char *)d + EXT_OFFSET;
    }
    return d;
}

/* df__deferred_new_pool_job's block, inline in both of its paths. */
static inline df_deferred *pool_job_get(df_loop *loop, df_work_fn work,
                                        void *arg)
{
    /* Its canceller is known from its class, and the canceller's and the
     * result's bytes are its job's io from the start: work and arg in
     * them, the rest written by the worker (nothing reads `failure` or
     * `link` before the producer's fire, which clears `link`). */
    df_deferred *d = block_get_head(loop, DF__SLAB_DEFERRED_POOL_JOB, 2,
                                    F_CANCEL_WAITS | F_POOL_JOB_IO);
    if (d != NULL) {
        d->job_io.in.work = work;
        d->job_io.in.arg = arg;
    }
    return d;
}

/* When the slab has no chunk with a free block (it calls the allocator). */
static DF__NOINLINE df_deferred *pool_job_get_slow(df_loop *loop,
                                                   df_work_fn work, void *arg)
{
    return pool_job_get(loop, work, arg);
}

df_deferred *df__deferred_new_pool_job(df_loop *loop, df_work_fn work,
                                       void *arg)
{
    DF__HOT_ASSERT(df__on_loop_thread(loop));
    /* The slab's call to its allocator out of line: the common case is
     * then a leaf, which saves no registers (the test is the one the
     * slab's inline get makes first, so the compiler drops its call). */
    if (loop->slabs[DF__SLAB_DEFERRED_POOL_JOB].partial == NULL)
        return pool_job_get_slow(loop, work, arg);
    return pool_job_get(loop, work, arg);
}

int df_deferred_new(df_loop *loop, df_deferred **out)
{
    return deferred_alloc(loop, NULL, NULL, out);
}

int df_deferred_new_cancellable(df_loop *loop, df_canceller_fn fn, void *arg,
                                df_deferred **out)
{
    return deferred_alloc(loop, fn, arg, out);
}

/* Frees a deferred nobody has seen yet (no entries, unfired). */
static void deferred_discard(df_deferred *d)
{
    assert(d->count == 0 && !(d->flags & F_CALLED));
    block_put(d);
}

df_deferred *df_deferred_ref(df_deferred *d)
{
    if (d == NULL)
        return NULL;
    if (!df__loop_usable(LOOP(d), __func__))
        return d;
    d->refs++;
    return d;
}

void df_deferred_unref(df_deferred *d)
{
    if (d == NULL)
        return;
    if (!df__loop_usable(LOOP(d), __func__))
        return;
    unref_checked(d); /* the release is out of line: this path is short */
}

/* Removes outer's continuation entry from inner (outer is going away). */
static void unlink_continuation(df_deferred *inner, df_deferred *outer)
{
    entry *v = entries(inner);
    for (uint32_t i = inner->head; i < inner->count; i++) {
        if (v[i].cb == continue_mark && v[i].arg == outer) {
            v[i].cb = NULL;
            v[i].eb = NULL;
            v[i].arg = NULL;
            return;
        }
    }
    assert(!"continuation entry not found");
}

/*
 * The last reference is gone, so nobody can fire, unpause or feed this
 * deferred any more.  Whatever is left of its chain runs now, so that each
 * pair runs exactly once: an unfired deferred, or one waiting on an inner
 * deferred, is failed with DF_ECANCELLED first.  That failure is ours, not
 * the application's, so it is not reported if nothing handles it; any other
 * failure left at the end of the chain is.
 *
 * Releasing a deferred drops its reference to the one it waited on, which
 * may release that one, and so on down a chain of any length: iterate,
 * never recurse.
 */
static DF__NOINLINE void deferred_release_slow(df_deferred *d);

DF__NOINLINE void deferred_release(df_deferred *d)
{
    /* The common end: fired, chain run, nothing owned, nothing waited on.
     * The loop in deferred_release_slow() would only give the block back
     * (a function of its own, so that this path does not pay for its
     * registers). */
    uintptr_t owned = (uintptr_t)d->link | (uintptr_t)d->failure |
                      (uintptr_t)d->value_free; /* three words, one test */
    if (owned == 0 && (d->flags & (F_CALLED | F_HEAP)) == F_CALLED &&
        d->head == d->count)
        block_put(d);
    else
        deferred_release_slow(d);
}

static DF__NOINLINE void deferred_release_slow(df_deferred *d)
{
    while (d != NULL) {
        /* Nothing runs it (refs is 0), so link is chained_to. */
        assert(d->refs == 0 && !(d->flags & F_IN_RUN));
        df_deferred *next = d->link;
        if (next != NULL) {
            unlink_continuation(next, d);
            d->link = NULL;
        }
        if (next != NULL || !(d->flags & F_CALLED)) {
            /* Over the canceller if unfired; a waiting deferred's result
             * went to the callback that made it wait. */
            put_result(d, df_err(df__failure_released(LOOP(d))));
            d->flags |= F_CALLED;
        }
        while (d->head < d->count) {
            d->paused = 0;
            d->refs = 1;
            run_callbacks(d);
            if (--d->refs != 0) {
                /* A callback took a new reference: it owns d now. */
                df_deferred_unref(next);
                return;
            }
            if (chained(d) == NULL)
                break;
            /* A callback made it wait again, but nobody is left to take
             * that result: give up the wait and go on as above. */
            df_deferred *again = d->link;
            unlink_continuation(again, d);
            d->link = NULL;
            df_deferred_unref(again);
            d->failure = df__failure_released(LOOP(d));
        }
        if (d->failure != NULL && !df__failure_is_released(d->failure))
            df__report_unhandled(LOOP(d), d->failure);

        /* Unrun chain entries (left by a pause): drop their references. */
        entry *v = entries(d);
        for (uint32_t i = d->head; i < d->count; i++) {
            if (v[i].cb == chain_mark)
                df_deferred_unref(v[i].arg);
        }
        if (d->failure != NULL || d->value_free != NULL) {
            df_result r = take_result(d);
            df_result_clear(&r);
        }
        if (d->flags & F_HEAP)
            df__free(LOOP(d), d->heap.v);
        block_put(d);

        d = NULL;
        if (next != NULL && --next->refs == 0)
            d = next;
    }
}

df_loop *df_deferred_loop(const df_deferred *d)
{
    return d != NULL ? LOOP(d) : NULL;
}

/* ----------------------------------------------------------------- firing */

int df_deferred_resolve(df_deferred *d, df_result r)
{
    if (d == NULL || r.wait != NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(LOOP(d));
    return df__deferred_resolve(d, r);
}

int df__deferred_resolve(df_deferred *d, df_result r)
{
    assert(r.wait == NULL && df__on_loop_thread(LOOP(d)));
    if (d->flags & (F_CALLED | F_POOL_JOB_IO)) {
        if (!(d->flags & F_CALLED))
            return DF_EBUSY; /* a pool job's: its producer fires it */
        if (d->flags & F_SUPPRESS) {
            /* Cancelled earlier: the producer's late result is dropped, as
             * in Twisted.  We own it now (success returned), so free it. */
            d->flags &= ~F_SUPPRESS;
            df_result_clear(&r);
            return 0;
        }
        return DF_EALREADY_CALLED;
    }
    d->flags |= F_CALLED;
    d->refs++; /* callbacks may drop the caller's reference */
    int single = run_single(d, r);
    if (single != SINGLE_DONE)
        run_callbacks_from(d, single == SINGLE_MORE);
    unref_checked(d);
    return 0;
}

void df__deferred_resolve_drop(df_deferred *d, df_result r)
{
    DF__HOT_ASSERT(r.wait == NULL && df__on_loop_thread(LOOP(d)) && d->refs > 0);
    if (d->flags & F_CALLED) {
        assert(!(d->flags & F_POOL_JOB_IO));
        /* Cancelled earlier (F_SUPPRESS: the late result is dropped, as
         * in df__deferred_resolve) or fired already: r is ours to free. */
        d->flags &= ~(uint32_t)F_SUPPRESS;
        df_result_clear(&r);
    } else {
        /* df__deferred_resolve without its extra reference: the caller's
         * stays held until the callbacks have run.  A pool job's producer
         * has read the job's io (r): the result fields are the
         * deferred's again, and `link` (the io's last word) waits for
         * nothing. */
        d->flags = (d->flags & ~(uint32_t)F_POOL_JOB_IO) | F_CALLED;
        d->link = NULL;
        int single = run_single(d, r);
        if (single != SINGLE_DONE)
            run_callbacks_from(d, single == SINGLE_MORE);
    }
    unref_checked(d);
}

/* The rest of df__deferred_resolve_io_drop's callback when it returned
 * df_wait(): as call_entry does.  True if d now waits (d->link is set).
 * Out of line, so that the common path saves no more registers. */
static DF__NOINLINE bool io_drop_wait(df_deferred *d, df_result out)
{
    df_deferred *inner = out.wait;
    if (out.failure != NULL || out.free != NULL) {
        /* Only df_wait() may set wait: drop the rest. */
        out.wait = NULL;
        df_result_clear(&out);
    }
    if (!wait_for(d, inner))
        return false;
    d->link = inner;
    return true;
}

void df__deferred_resolve_io_drop(df_deferred *d)
{
    DF__HOT_ASSERT(df__on_loop_thread(LOOP(d)) && d->refs > 0 &&
                   (d->flags & (F_POOL_JOB_IO | F_CALLED)) == F_POOL_JOB_IO &&
                   d->link == NULL && !(d->flags & F_IN_RUN) &&
                   d->head == 0);
    /* df__deferred_resolve_drop with the result where the job's worker
     * wrote it, its wait (`link`) NULL: it goes to the callback from
     * there, with no copy through the caller.  d has just fired, so it is
     * on no run stack and none of its entries has run (head is 0). */
    /* F_POOL_JOB_IO off, F_CALLED on, in one operation (the first is set
     * and the second clear, as asserted above). */
    uint32_t flags = d->flags ^ (F_POOL_JOB_IO | F_CALLED);
    /* run_single()'s common case: one ordinary pair, inline (F_MARKS: no
     * special entry was ever appended), and d not paused.  Three tests. */
    if ((flags & (F_HEAP | F_MARKS)) == 0 && d->paused == 0 &&
        d->count == 1) {
        entry e = d->inline_entries[0];
        df_result r = d->job_io.result; /* its wait, `link`, is NULL */
        df_callback_fn fn = r.failure != NULL ? e.eb : e.cb;
        d->head = 1;
        if (fn == NULL) { /* pass through: the result stays */
            d->flags = flags;
        } else {
            /* df_ok(NULL, NULL) over the result while the callback runs,
             * with F_IN_RUN set as run_single() sets it. */
            d->job_io.result = (df_result){NULL, NULL, NULL, NULL};
            d->flags = flags | F_IN_RUN | F_IN_CALLBACK;
            df_result out = fn(r, e.arg);
            d->flags &= ~(uint32_t)(F_IN_RUN | F_IN_CALLBACK);
            if (out.wait == NULL) {
                d->job_io.result = out; /* `link` stays NULL */
            } else if (io_drop_wait(d, out)) {
                unref_checked(d); /* it waits: the rest runs later */
                return;
            }
        }
        if (d->head < d->count) /* the callback added entries */
            run_callbacks_from(d, true);
    } else {
        d->flags = flags;
        run_callbacks_from(d, false);
    }
    unref_checked(d);
}

int df_deferred_callback(df_deferred *d, void *value, df_free_fn free_fn)
{
    return df_deferred_resolve(d, df_ok(value, free_fn));
}

int df_deferred_errback(df_deferred *d, df_failure *f)
{
    if (f == NULL)
        return DF_EINVAL;
    return df_deferred_resolve(d, df_err(f));
}

int df_succeed(df_loop *loop, void *value, df_free_fn free_fn,
               df_deferred **out)
{
    int rc = deferred_alloc(loop, NULL, NULL, out);
    if (rc == 0) {
        put_result(*out, df_ok(value, free_fn));
        (*out)->flags |= F_CALLED;
    }
    return rc;
}

int df_fail(df_loop *loop, df_failure *f, df_deferred **out)
{
    if (f == NULL)
        return DF_EINVAL;
    int rc = deferred_alloc(loop, NULL, NULL, out);
    if (rc == 0) {
        put_result(*out, df_err(f));
        (*out)->flags |= F_CALLED;
    }
    return rc;
}

int df_maybe(df_loop *loop, df_run_fn fn, void *arg, df_deferred **out)
{
    if (fn == NULL || out == NULL)
        return DF_EINVAL;
    df_deferred *d;
    int rc = deferred_alloc(loop, NULL, NULL, &d); /* before fn: fn runs only on 0 */
    if (rc != 0)
        return rc;
    df_result r = fn(arg);
    if (r.wait != NULL) {
        deferred_discard(d);
        if (r.failure != NULL || r.free != NULL) {
            df_deferred *w = r.wait;
            r.wait = NULL;
            df_result_clear(&r);
            r.wait = w;
        }
        *out = r.wait;
        return 0;
    }
    put_result(d, r);
    d->flags |= F_CALLED;
    *out = d;
    return 0;
}

/* -------------------------------------------------------------- callbacks */

/* Appends a pair where append_inline() could not, and runs it if d has
 * fired.  Out of line, so that the common path saves no registers. */
static DF__NOINLINE int add_slow(df_deferred *d, df_callback_fn cb,
                                 df_callback_fn eb, void *arg)
{
    int rc = append_entry(d, cb, eb, arg);
    if (rc == 0 && (d->flags & F_CALLED))
        run_callbacks(d);
    return rc;
}

int df_deferred_add_callbacks(df_deferred *d, df_callback_fn cb,
                              df_callback_fn eb, void *arg)
{
    if (d == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(LOOP(d));
    if (cb == NULL && eb == NULL)
        return 0; /* a pass-through pair changes nothing */
    if (append_inline(d, d->flags, cb, eb, arg))
        return 0; /* unfired: nothing runs now */
    return add_slow(d, cb, eb, arg);
}

int df__deferred_add_both(df_deferred *d, df_callback_fn fn, void *arg)
{
    uint32_t flags = d->flags & ~(uint32_t)F_SCAN_MARK;
    d->flags = flags; /* see df__deferred_reserve_members */
    if (append_inline(d, flags, fn, fn, arg))
        return 0; /* unfired: nothing runs now */
    return add_slow(d, fn, fn, arg);
}

int df__deferred_append_unfired_slow(df_deferred *d, df_callback_fn fn,
                                     void *arg)
{
    assert(!(d->flags & F_CALLED));
    return append_entry(d, fn, fn, arg); /* runs nothing: unfired */
}

int df_deferred_add_callback(df_deferred *d, df_callback_fn cb, void *arg)
{
    if (cb == NULL)
        return DF_EINVAL;
    return df_deferred_add_callbacks(d, cb, NULL, arg);
}

int df_deferred_add_errback(df_deferred *d, df_callback_fn eb, void *arg)
{
    if (eb == NULL)
        return DF_EINVAL;
    return df_deferred_add_callbacks(d, NULL, eb, arg);
}

int df_deferred_add_both(df_deferred *d, df_callback_fn fn, void *arg)
{
    if (fn == NULL)
        return DF_EINVAL;
    return df_deferred_add_callbacks(d, fn, fn, arg);
}

int df_deferred_chain(df_deferred *d, df_deferred *other)
{
    if (d == NULL || other == NULL || d == other)
        return DF_EINVAL;
    DF__CHECK_THREAD(LOOP(d));
    if (LOOP(other) != LOOP(d))
        return DF_EINVAL;
    d->flags |= F_MARKS; /* before: append_entry may run d */
    int rc = append_entry(d, chain_mark, chain_mark, other);
    if (rc != 0)
        return rc;
    other->refs++;
    if (d->flags & F_CALLED)
        run_callbacks(d);
    return 0;
}

/* ------------------------------------------------------- pause and cancel */

int df_deferred_pause(df_deferred *d)
{
    if (d == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(LOOP(d));
    d->paused++;
    return 0;
}

int df_deferred_unpause(df_deferred *d)
{
    if (d == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(LOOP(d));
    /* Pauses made by waiting on an inner deferred cannot be undone here. */
    if (d->paused <= (chained(d) != NULL ? 1u : 0u))
        return DF_ESTATE;
    d->paused--;
    if (d->paused == 0 && (d->flags & F_CALLED))
        run_callbacks(d);
    return 0;
}

int df_deferred_cancel(df_deferred *d)
{
    if (d == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(LOOP(d));
    /* A fired deferred that waits forwards the cancel to what it waits on;
     * follow the chain with a loop, however long it is. */
    while ((d->flags & F_CALLED) && chained(d) != NULL)
        d = d->link;
    if (d->flags & (F_CALLED | F_CANCELLING))
        return 0; /* a canceller cancelling its own deferred: no recursion */

    /* Unfired, so the canceller is there (firing replaces it), unless
     * the block is a pool job's, whose canceller is known. */
    d->refs++;
    df_canceller_fn canceller;
    if (d->flags & F_POOL_JOB_IO) {
        assert(d->flags & F_CANCEL_WAITS);
        canceller = NULL; /* never read: CANCEL_WAITS */
        d->flags |= F_CANCELLING;
        df__pool_job_cancel((char *)d + EXT_OFFSET);
        d->flags &= ~F_CANCELLING;
    } else if ((canceller = d->canceller) != NULL) {
        d->flags |= F_CANCELLING;
        canceller(d, d->canceller_arg);
        d->flags &= ~F_CANCELLING;
    }
    if (!(d->flags & F_CALLED) && !(d->flags & F_CANCEL_WAITS)) {
        df_failure *f = df_failure_new(LOOP(d), DF_ECANCELLED, NULL);
        df_deferred_resolve(d, df_err(f));
        /* Without a canceller the producer does not know: swallow its
         * later fire (with one, the producer was told, as in Twisted). */
        if (canceller == NULL)
            d->flags |= F_SUPPRESS;
    }
    df_deferred_unref(d);
    return 0;
}

/* Makes room for `extra` more callback pairs on d, so that adding that
 * many allocates nothing. */
static int reserve_slow(df_deferred *d, size_t extra)
{
    size_t live = d->count - d->head;
    uint32_t have = entries_cap(d);
    if (extra > UINT32_MAX - live)
        return DF_ENOMEM;
    uint32_t cap = (uint32_t)(live + extra);
    if (have <= UINT32_MAX / 2 && cap < have * 2)
        cap = have * 2;
    if (cap < d->count)
        cap = d->count; /* the entries already run are copied too */
    return entries_grow(d, cap);
}

static inline int reserve(df_deferred *d, size_t extra)
{
    size_t live = d->count - d->head;
    uint32_t have = entries_cap(d);
    /* append_entry() moves the live entries to the front before it grows,
     * so room for live + extra entries is enough. */
    if (extra <= have && live <= have - extra)
        return 0;
    return reserve_slow(d, extra);
}

static int cmp_ptr(const void *a, const void *b)
{
    uintptr_t x = (uintptr_t)*(df_deferred *const *)a;
    uintptr_t y = (uintptr_t)*(df_deferred *const *)b;
    return x < y ? -1 : x > y;
}

/*
 * The common case, every member once and with room for one more entry, in
 * one pass: a scratch mark finds repeats, and the marks stay until
 * df__deferred_add_both() (or df__deferred_unmark()) clears them,
 * one by one.  A mark left on a member that a callback run meanwhile puts
 * in another list only makes that list take the slow path below, which
 * counts repeats exactly and clears every mark it finds.
 */
int df__deferred_reserve_members(df_loop *loop, df_deferred *const *members,
                                 size_t n)
{
    bool repeats = false, short_of_room = false;
    for (size_t i = 0; i < n; i++) {
        df_deferred *m = members[i];
        repeats |= (m->flags & F_SCAN_MARK) != 0;
        short_of_room |= m->count - m->head >= m->cap;
        m->flags |= F_SCAN_MARK;
    }
    if (!repeats && !short_of_room)
        return 0; /* the marks stay */
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        members[i]->flags &= ~(uint32_t)F_SCAN_MARK;
        if (!repeats && rc == 0)
            rc = reserve(members[i], 1);
    }
    if (!repeats)
        return rc;
    df_deferred **sorted = df__malloc(loop, n * sizeof *sorted);
    if (sorted == NULL)
        return DF_ENOMEM;
    memcpy(sorted, members, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, cmp_ptr);
    for (size_t i = 0, j; i < n && rc == 0; i = j) {
        for (j = i + 1; j < n && sorted[j] == sorted[i]; j++)
            ;
        rc = reserve(sorted[i], j - i);
    }
    df__free(loop, sorted);
    return rc;
}

void df__deferred_unmark(df_deferred *d)
{
    d->flags &= ~(uint32_t)F_SCAN_MARK;
}

bool df__deferred_mark_timeout(df_deferred *d)
{
    if (d->flags & F_TIMEOUT)
        return false;
    d->flags |= F_TIMEOUT;
    return true;
}

void df__deferred_unmark_timeout(df_deferred *d)
{
    d->flags &= ~F_TIMEOUT;
}

/* --------------------------------------------------------------- queries */

bool df_deferred_called(const df_deferred *d)
{
    return d != NULL && (d->flags & F_CALLED) != 0;
}

bool df_deferred_paused(const df_deferred *d)
{
    return d != NULL && d->paused > 0;
}

int df_deferred_peek(const df_deferred *d, void **value, df_failure **failure)
{
    if (d == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(LOOP(d));
    if (!(d->flags & F_CALLED) || chained(d) != NULL)
        return DF_ENOT_CALLED;
    if (value != NULL)
        *value = d->failure == NULL ? d->value : NULL;
    if (failure != NULL)
        *failure = d->failure;
    return 0;
}

void df_result_clear(df_result *r)
{
    if (r == NULL)
        return;
    if (r->wait != NULL)
        df_deferred_unref(r->wait);
    if (r->failure != NULL)
        df_failure_unref(r->failure);
    if (r->free != NULL)
        r->free(r->value);
    r->value = NULL;
    r->free = NULL;
    r->failure = NULL;
    r->wait = NULL;
}
