/* SPDX-License-Identifier: MIT */
/* Internal declarations shared by the library's components (df__ prefix). */
#ifndef DEFERRED_INTERNAL_H
#define DEFERRED_INTERNAL_H

#include <assert.h>
#include <pthread.h>
#include <stdatomic.h>

#include "deferred.h"
#include "hot-assert.h"

#define DF__UNUSED(x) ((void)(x))
/* For a slow path kept out of line, so that the fast path that calls it
 * saves no registers. */
#if defined(__GNUC__) || defined(__clang__)
#define DF__NOINLINE __attribute__((noinline))
#else
#define DF__NOINLINE
#endif
#define DF__CONTAINER_OF(ptr, type, member)                                   \
    ((type *)((char *)(ptr)-offsetof(type, member)))

/* ------------------------------------------------------------- allocation */
/* All allocations made for a loop go through its allocator (loop.c).  With
 * loop == NULL they use the C library. */
void *df__malloc(df_loop *loop, size_t size);
void *df__calloc(df_loop *loop, size_t n, size_t size);
void *df__realloc(df_loop *loop, void *ptr, size_t size);
void df__free(df_loop *loop, void *ptr);
/* The loop's allocator (a copy of the user's, or the default one). */
const df_allocator *df__allocator(df_loop *loop);

/* ----------------------------------------------------------- thread check */
/* Every entry point checks that it runs on the loop's thread and that the
 * loop was not inherited across fork(2) (the policy is in deferred.h,
 * "fork").  Both checks are one comparison on the hot path, with no call
 * into libc: a thread that makes a loop gets a token, unique in the
 * process and never 0, in a thread-local variable (initial-exec TLS, so
 * reading it is one load), and the loop records it.  The fork handler gives
 * the child's only thread a new token, so no thread of the child holds the
 * token of a loop made before the fork.  Only when the tokens differ does
 * the slow path tell DF_EFORKED from DF_EWRONG_THREAD. */
#if defined(__GNUC__) || defined(__clang__)
#define DF__TLS_IE __attribute__((tls_model("initial-exec")))
#else
#define DF__TLS_IE
#endif
extern _Thread_local uintptr_t df__thread_token DF__TLS_IE;

/* The process's fork generation: 0 at start, bumped in the child of every
 * fork by a handler that df_loop_new registers once with pthread_atfork.
 * With the token counter, the library's only process-wide state.  A loop
 * records the generation it was made in, right after its token; a loop
 * from an older generation was inherited from the parent, and everything
 * made from it is unusable in the child. */
extern atomic_uint df__fork_gen;
typedef struct df__loop_id { /* the first members of struct df_loop */
    uintptr_t token;
    unsigned fork_gen;
} df__loop_id;

/* True on the loop's own thread, in the process that made the loop. */
static inline bool df__on_loop_thread(const df_loop *loop)
{
    return ((const df__loop_id *)(const void *)loop)->token ==
           df__thread_token;
}
/* Prints one line naming the misused function; used by void entry points
 * that cannot return DF_EWRONG_THREAD. */
void df__wrong_thread(const char *func);

static inline bool df__loop_forked(const df_loop *loop)
{
    return ((const df__loop_id *)(const void *)loop)->fork_gen !=
           atomic_load_explicit(&df__fork_gen, memory_order_relaxed);
}

/* Guards the entry points that return an int code. */
#define DF__CHECK_THREAD(loop)                                                \
    do {                                                                       \
        if (!df__on_loop_thread(loop))                                         \
            return df__loop_forked(loop) ? DF_EFORKED : DF_EWRONG_THREAD;     \
    } while (0)

/* Guards void entry points: false (and one line on stderr) on a wrong
 * thread; false, silently, for an object inherited across fork(2), whose
 * release in the child is documented to do nothing. */
static inline bool df__loop_usable(const df_loop *loop, const char *func)
{
    if (df__on_loop_thread(loop))
        return true;
    if (!df__loop_forked(loop))
        df__wrong_thread(func);
    return false;
}

/* ----------------------------------------------------------- block cache */
/* A per-loop free list of blocks of one size, so that steady traffic
 * allocates nothing.  Loop thread only.  A cached block's first bytes hold
 * the link. */
typedef struct df__cache {
    void *head;
    size_t len;
} df__cache;
#define DF__CACHE_MAX 1024

/* The loop's caches of blocks: deferreds, and deferreds with room for a
 * pool job (deferred.c). */
enum { DF__CACHE_DEFERRED, DF__CACHE_DEFERRED_JOB, DF__CACHES };
df__cache *df__loop_cache(df_loop *loop, int which);

static inline void *df__cache_get(df__cache *c)
{
    void *p = c->head;
    if (p != NULL) {
        c->head = *(void **)p;
        c->len--;
    }
    return p;
}

/* Keeps p if there is room; returns false if the caller must free it. */
static inline bool df__cache_put(df__cache *c, void *p)
{
    if (c->len >= DF__CACHE_MAX)
        return false;
    *(void **)p = c->head;
    c->head = p;
    c->len++;
    return true;
}

/* ------------------------------------------------------------------ slabs */
/* Per-loop slabs of fixed-size blocks (alloc.c): a burst of N live blocks
 * costs about log2(N/64) + N*size/2MiB allocations and steady traffic
 * none.  Loop thread only.  The first word of a block handed out holds its
 * chunk, which the slab wrote and which its user must leave alone; the
 * chunk's first member is its loop, so a block finds its loop through it
 * (df__chunk_loop). */
typedef struct df__chunk df__chunk;
static inline df_loop *df__chunk_loop(const df__chunk *c)
{
    return *(df_loop *const *)(const void *)c; /* alloc.c checks the layout */
}
/* Where a slab of the default allocator gets its biggest chunks: map()
 * returns `bytes` (DF__SLAB_CHUNK_MAX) bytes aligned to that size or NULL,
 * unmap() gives them back.  Tests replace them (df__slab.pages). */
typedef struct df__pages {
    void *(*map)(size_t bytes);
    void (*unmap)(void *p, size_t bytes);
} df__pages;
extern const df__pages df__default_pages; /* mmap, THP advice, munmap */
typedef struct df__slab {
    df__chunk *partial;      /* chunks with a free block */
    size_t size;             /* block size */
    size_t chunks;           /* chunks allocated */
    size_t empty;            /* chunks with no block handed out (0 or 1) */
    const df__pages *pages;  /* big chunks, default allocator only */
} df__slab;
/* The loop's slabs: deferreds, deferreds with room for a semaphore's
 * waiter (DF__JOB_SIZE), and deferreds with room for a pool job
 * (DF__POOL_JOB_SIZE); loop.c sets up all three, with the block sizes
 * df__deferred_block_size gives. */
enum {
    DF__SLAB_DEFERRED,
    DF__SLAB_DEFERRED_JOB,
    DF__SLAB_DEFERRED_POOL_JOB,
    DF__SLABS
};
df__slab *df__loop_slab(df_loop *loop, int which);
void df__slab_init(df__slab *s, size_t size);
/* A block of s->size bytes (8-byte aligned) whose first word is its
 * chunk, or NULL. */
void *df__slab_get(df_loop *loop, df__slab *s);
void df__slab_put(df_loop *loop, df__slab *s, void *p);
/* `size` bytes from the loop's allocator, freed by its free (df__free, or
 * a copy of the allocator): for the default allocator and big sizes, the
 * start is 2 MiB aligned and the kernel is asked for transparent huge
 * pages, so that a large array costs few page faults.  Or NULL. */
void *df__malloc_bulk(df_loop *loop, size_t size);
/* The size of the blocks of slab `which` (DF__SLAB_*; deferred.c). */
size_t df__deferred_block_size(int which);

/* ------------------------------------------------------ unhandled failure */
/* Reports `f` (borrowed) through the loop's hook; counts it. */
void df__report_unhandled(df_loop *loop, df_failure *f);

/* --------------------------------------------------------------- deferred */
/* The first members of struct df_deferred (deferred.c checks the layout),
 * so that the library's hot paths take and drop references inline. */
typedef struct df__deferred_head {
    const df__chunk *chunk; /* its slab chunk, which knows the loop */
    uint32_t refs;
    uint32_t flags; /* DF__DEFERRED_CALLED: fired */
    uint32_t paused;
    uint32_t head;  /* next callback pair to run */
    uint32_t count; /* callback pairs in use */
    uint32_t cap;   /* callback pairs allocated */
} df__deferred_head;
#define DF__DEFERRED_CALLED 1u
#define DF__DEFERRED_HEAP (1u << 11) /* the pairs are in a heap array */
/* A callback pair as a deferred stores it, and where a deferred's inline
 * pairs start (deferred.c checks both). */
typedef struct df__entry {
    df_callback_fn cb;
    df_callback_fn eb;
    void *arg;
} df__entry;
#define DF__DEFERRED_ENTRIES_OFFSET 64
/* df_deferred_called(d) for library code (d is not NULL), without the
 * call through the PLT that an exported function costs. */
static inline bool df__deferred_called(const df_deferred *d)
{
    return (((const df__deferred_head *)(const void *)d)->flags &
            DF__DEFERRED_CALLED) != 0;
}
/* The last reference is gone (deferred.c). */
void df__deferred_release(df_deferred *d);
/* df_deferred_ref and df_deferred_unref without the thread check, for
 * library code that runs on d's loop thread already (it has checked, or
 * runs inside a callback of that loop); d is not NULL. */
static inline df_loop *df__deferred_loop(const df_deferred *d)
{
    return df__chunk_loop(((const df__deferred_head *)(const void *)d)->chunk);
}
static inline df_deferred *df__deferred_ref(df_deferred *d)
{
    ((df__deferred_head *)(void *)d)->refs++;
    return d;
}
static inline void df__deferred_unref(df_deferred *d)
{
    df__deferred_head *h = (df__deferred_head *)(void *)d;
    DF__HOT_ASSERT(h->refs > 0);
    if (--h->refs == 0)
        df__deferred_release(d);
}
/* Pool jobs: df_deferred_cancel() on a deferred with this flag set calls the
 * canceller but does not fail the deferred itself; the producer fires it
 * (with DF_ECANCELLED) when the work has really stopped.  Inline (one
 * store): deferred.c checks that the flag is its F_CANCEL_WAITS. */
#define DF__DEFERRED_CANCEL_WAITS (1u << 3)
static inline void df__deferred_set_cancel_waits(df_deferred *d)
{
    ((df__deferred_head *)(void *)d)->flags |= DF__DEFERRED_CANCEL_WAITS;
}
/* df_deferred_resolve for library code on d's loop thread (r.wait is
 * NULL): the same, without the argument and thread checks. */
int df__deferred_resolve(df_deferred *d, df_result r);
/* A producer's last word on d (loop thread, r.wait NULL): resolves d with
 * r as df__deferred_resolve does (r is freed if d has fired already, as
 * when it was cancelled), then drops the caller's reference, in one call.
 * The caller's reference keeps d alive while its callbacks run. */
void df__deferred_resolve_drop(df_deferred *d, df_result r);
/* df__deferred_resolve_drop for a pool job's producer whose job ran and
 * left a result that is not df_wait() in its io (df__job_io_of): fires d
 * with that result as it lies there, and drops the caller's reference. */
void df__deferred_resolve_io_drop(df_deferred *d);
/* df_deferred_add_both for library code on d's loop thread (fn is not
 * NULL): the same, without the argument and thread checks. */
int df__deferred_add_both(df_deferred *d, df_callback_fn fn, void *arg);
/* df__deferred_add_both for a deferred d that has not fired, so that
 * nothing runs: appends the pair (fn, fn, arg) and returns 0 or
 * DF_ENOMEM.  Its common case, inline: df__deferred_append_inline appends
 * the pair and returns true when d has not fired and has inline room, and
 * otherwise does nothing and returns false.  df__deferred_append_undo(d)
 * removes the pair appended last, as long as d has not fired since:
 * df_list_new attaches to members none of which has fired this way, and
 * takes its callbacks back in reverse order when memory runs out. */
int df__deferred_append_unfired_slow(df_deferred *d, df_callback_fn fn,
                                     void *arg);
static inline bool df__deferred_append_inline(df_deferred *d,
                                              df_callback_fn fn, void *arg)
{
    df__deferred_head *h = (df__deferred_head *)(void *)d;
    if ((h->flags & (DF__DEFERRED_CALLED | DF__DEFERRED_HEAP)) != 0 ||
        h->count >= h->cap)
        return false;
    df__entry *e = (df__entry *)(void *)((char *)d +
                                         DF__DEFERRED_ENTRIES_OFFSET) +
                   h->count++;
    e->cb = fn;
    e->eb = fn;
    e->arg = arg;
    return true;
}
static inline void df__deferred_append_undo(df_deferred *d)
{
    df__deferred_head *h = (df__deferred_head *)(void *)d;
    DF__HOT_ASSERT(!(h->flags & DF__DEFERRED_CALLED) && h->count > h->head);
    h->count--;
}
/* Makes room on each of members[0..n) (of `loop`, not NULL, repeats
 * allowed) for one more callback pair per position it holds, so that
 * adding them allocates nothing (df_list_new attaches without a way
 * back).  Returns 0 or DF_ENOMEM.  On 0 it may leave a scratch mark on
 * the members, which df__deferred_add_both clears: the caller adds to
 * each member in turn, and calls df__deferred_unmark on those it does
 * not reach. */
int df__deferred_reserve_members(df_loop *loop, df_deferred *const *members,
                                 size_t n);
void df__deferred_unmark(df_deferred *d);
/* Marks that d has a timeout (df_deferred_set_timeout, loop.c); returns
 * false if it already had one.  unmark undoes a mark whose timeout could
 * not be set up after all. */
bool df__deferred_mark_timeout(df_deferred *d);
void df__deferred_unmark_timeout(df_deferred *d);
/* A cancellable deferred and a job in one block (the caller has checked
 * that it runs on loop's thread), or NULL (out of memory).  Its job,
 * df__deferred_job(d), is DF__JOB_SIZE bytes, 8-byte aligned, that live
 * as long as the deferred and are also the canceller's argument (sem.c
 * checks the size).  flags is 0 or DF__DEFERRED_CANCEL_WAITS (set as
 * df__deferred_set_cancel_waits does).  The job starts DF__JOB_OFFSET
 * bytes into the block (deferred.c checks it), so the job finds its
 * deferred without keeping a pointer.
 *
 * df__deferred_new_pool_job makes a pool job's block, cancel-waits, the
 * same way but with two references (the job's and the caller's) and
 * 32 bytes smaller: its job is DF__POOL_JOB_SIZE bytes, and what
 * the job carries (its work function and argument, then its result: a
 * df__job_io) lives in the deferred's own canceller and result fields,
 * which are free until the deferred fires (pool-internal.h, df__job_io_of()):
 * it is made with work and arg in them (df__job_init writes them too).
 * Until its producer fires it (df__deferred_resolve_drop), those bytes
 * belong to the job, and to the worker that runs it: the deferred reads
 * none of them, its canceller is df__pool_job_cancel(job), and firing it
 * from anywhere else is refused with DF_EBUSY.  Its producer must fire it
 * before dropping the job's reference, so the caller must not fail once
 * it has the block: released unfired, it would read the io as `link`. */
#define DF__JOB_SIZE 72
#define DF__POOL_JOB_SIZE 40
#define DF__JOB_OFFSET 88
df_deferred *df__deferred_new_job(df_loop *loop, df_canceller_fn fn,
                                  uint32_t flags);
df_deferred *df__deferred_new_pool_job(df_loop *loop, df_work_fn work,
                                       void *arg);
static inline void *df__deferred_job(df_deferred *d)
{
    return (char *)d + DF__JOB_OFFSET;
}
static inline df_deferred *df__job_deferred(void *job)
{
    return (df_deferred *)(void *)((char *)job - DF__JOB_OFFSET);
}
/* What a pool job carries, in 32 bytes: its work function and argument
 * until a worker takes it, then the result the worker writes before it
 * posts the job.  It lies DF__JOB_IO_BACK bytes before the job, in a
 * pool job's block the deferred's result fields (deferred.c checks it);
 * a job embedded elsewhere (a map's slot) is laid out the same way. */
typedef union df__job_io {
    struct {
        df_work_fn work;
        void *arg;
    } in;
    df_result result;
} df__job_io;
#define DF__JOB_IO_BACK 56
/* The canceller of a pool job's block: calls the job's owner's cancel
 * hook (pool.c).  Loop thread. */
void df__pool_job_cancel(void *job);

/* ---------------------------------------------------------------- failure */
/* The shared static out-of-memory failure. */
df_failure *df__failure_nomem(void);
/* The DF_ECANCELLED failure with which the release of an unfired (or
 * waiting) deferred fails it; it is never reported as unhandled. */
df_failure *df__failure_released(df_loop *loop);
bool df__failure_is_released(const df_failure *f);
/* A DF_EFIRST_ERROR failure for member `index` failing with `cause`
 * (borrowed; a reference is taken). */
df_failure *df__failure_first_error(df_loop *loop, size_t index,
                                    df_failure *cause);

/* ------------------------------------------------------------------- loop */
/* Keeps df_loop_run() running while > 0 (pool jobs in flight). */
void df__loop_pending_add(df_loop *loop, long delta);

/* -------------------------------------------------------------- loop/pool */
/* Declarations shared by loop.c and pool.c (owned by the loop/pool code). */

/* An entry of the loop's completion inbox, embedded in what it carries (a
 * pool job, a cross-thread call), so that posting allocates nothing.
 * `run` is called once, on the loop thread, with status 0 (or DF_ECANCELLED
 * when the loop is freed before it could run). */
typedef struct df__inbox_node df__inbox_node;
typedef void (*df__inbox_fn)(df_loop *loop, df__inbox_node *n, int status);
struct df__inbox_node {
    df__inbox_node *next;
    df__inbox_fn run;
};
/* Appends `n` to the inbox (in posting order) and wakes the loop if it
 * may be sleeping; a post to an awake loop makes no system call.  Any
 * thread; lock-free (inbox.c). */
void df__loop_post(df_loop *loop, df__inbox_node *n);
/* The same, for a stream of posts from one thread (a pool worker running
 * jobs handed on to it): while the loop is in a timed sleep, the wake-up
 * may be left to the sleep's timeout, which comes within
 * DF__WAKE_DEFER_NS (1 ms), or to a later post: every 256th unannounced
 * post wakes it.  `*unwoken` is the caller's count of such posts, 0 at
 * the start of the stream.  A stream ends with a df__loop_post, so that
 * its last entry is not delayed.  Any thread; lock-free (inbox.c). */
void df__loop_post_batched(df_loop *loop, df__inbox_node *n,
                           unsigned *unwoken);
/* Runs, in inbox order, every entry already posted for which match(n, arg)
 * is true; leaves the others queued in their order.  Returns how many ran.
 * Loop thread; re-entrant (may be called from inside a callback). */
size_t df__loop_run_matching(df_loop *loop,
                             bool (*match)(const df__inbox_node *n, void *arg),
                             void *arg);
/* Counts the pools made from `loop`; df_loop_free() refuses while > 0.
 * Loop thread. */
void df__loop_pools_add(df_loop *loop, int delta);
/* Counts the semaphores, locks and queues alive on `loop` (deferreds
 * count themselves); df_loop_free() refuses while > 0.  Loop thread. */
void df__loop_objects_add(df_loop *loop, int delta);
/* Counts the maps alive on `loop` (df_loop_get_stats; df_loop_free()
 * refuses while > 0).  Loop thread. */
void df__loop_maps_add(df_loop *loop, int delta);
/* The loop a pool was made from: df__pool_loop (pool-internal.h). */

/* ------------------------------------------------- semaphore gate (pool) */
/* The semaphore's one waiting line and its pool jobs: sem-internal.h and
 * pool-internal.h. */

/* The two halves of df__loop_post: append `n`, then make the wake fd
 * readable if the loop may be sleeping.  Any thread.  (Exposed so that
 * tests can split a post in two and widen the window between them.) */
void df__loop_append(df_loop *loop, df__inbox_node *n);
void df__loop_wake(df_loop *loop);

#endif /* DEFERRED_INTERNAL_H */
