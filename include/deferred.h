/* SPDX-License-Identifier: MIT */
/* libdeferred: Twisted's Deferred model for C, on a POSIX thread pool. */
#ifndef DEFERRED_H
#define DEFERRED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>

#include <deferred/version.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(DF_BUILDING) && defined(__GNUC__)
#define DF_EXPORT __attribute__((visibility("default")))
#else
#define DF_EXPORT
#endif

#if defined(__GNUC__)
#define DF_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define DF_PRINTF(a, b)
#endif

/*
 * Overview
 * ========
 * A df_loop is the library instance: it owns the allocator, the hook for
 * unhandled failures, the timers and the completion inbox, and it defines
 * the *loop thread* (the thread that created it).  Deferreds, lists,
 * semaphores, locks, queues and pools are created from a loop and may be
 * touched only on its loop thread; a call from another thread returns
 * DF_EWRONG_THREAD and changes nothing (void functions print one line to
 * stderr and do nothing; read-only accessors such as df_sem_tokens or
 * df_deferred_called do not check, and reading them from another thread is
 * a data race).  The thread-safe exceptions are named as such:
 * df_loop_call_from_thread(), df_loop_now(), the df_failure functions and
 * the df_work functions used by work running on a pool thread.
 *
 * Errors: every fallible call returns 0 or a negative code from the table
 * below.  If a call that takes a callback fails, that callback is never
 * called; otherwise it is called exactly once (for deferred callbacks:
 * exactly one of the callback/errback pair, once the deferred fires).
 *
 * Out of memory: a call that cannot allocate returns DF_ENOMEM, changes
 * nothing observable and may simply be made again.  An allocation that
 * fails after the call has returned fails, once, the deferred that would
 * carry the outcome, with DF_ENOMEM: a chain whose callback returned
 * df_wait() (that chain), df_sem_run() and df_sem_run_in_pool() (*out), a
 * map item whose submit is refused (the item, then done).  A failure the
 * library makes itself (cancellation, timeout, DF_EFIRST_ERROR, a work
 * function's df_errf) may then be the shared DF_ENOMEM one instead; the
 * DF_ECANCELLED of a deferred released unfired stays DF_ECANCELLED and is
 * never reported as unhandled.
 *
 * Values are `void *` with an optional destructor (df_free_fn).  Whoever
 * owns a value owns the duty to run its destructor; the library runs each
 * destructor it was given exactly once.  "Steals" below means the callee
 * takes ownership on success; on failure the caller still owns it.
 *
 * fork(2): only the thread that calls fork() exists in the child, so a
 * child cannot use what it inherited.  Every loop, and everything made
 * from one, that exists when the process forks is unusable in the child:
 * calls on it that return a code return DF_EFORKED and change nothing
 * (arguments are checked first: a NULL still gives DF_EINVAL), void
 * calls on it (df_deferred_unref, df_pool_free, df_queue_free...) do
 * nothing, and its memory and wake fd are never reclaimed in the child
 * (the fd is close-on-exec).  Nothing hangs: no call waits for the
 * parent's threads or takes a lock they may hold.  Nothing is lost: work
 * submitted before the fork runs and completes in the parent, which fork
 * does not disturb; the child's copies of its deferreds never fire.  The
 * child may make new loops and pools, which work normally (the library
 * notices forks with pthread_atfork).
 *   Not refused: read-only accessors (df_sem_tokens, df_deferred_called,
 * df_loop_fd...), which read the child's copy; and failures and list
 * results, which are values: df_failure_* and df_list_result_free work in
 * the child, run destructors there and use the loop's allocator, which
 * must then work in the child (a custom allocator whose lock a pool
 * thread held at the fork would hang them).  Forks the library cannot
 * see (vfork, clone(2), _Fork, and fork() called from a work function,
 * which leaves that worker's copy running) give a child that must only
 * exec or _exit.
 */

/*
 * Misuse
 * ======
 * Bad arguments the library can see are refused with a code and change
 * nothing: NULL handles, NULL out pointers and NULL required functions
 * give DF_EINVAL (NULL is ignored by the void release functions and gives
 * 0, false, NULL or -1 from the accessors), a call from the wrong thread
 * gives DF_EWRONG_THREAD, a call the object's state forbids gives the
 * code its declaration names (DF_EALREADY_CALLED, DF_EOVERRELEASE,
 * DF_ESTATE, DF_EBUSY, DF_ESHUTDOWN...).  User input never reaches an
 * assert().
 *
 * What C cannot detect is undefined behaviour:
 *   - using a handle after it is gone: a deferred after its last
 *     reference was dropped (so also dropping more references than one
 *     holds), a failure after its last unref, a list result freed twice,
 *     a semaphore, lock, queue, pool, map or loop after it was freed, a
 *     timer handle after its callback started or it was cancelled;
 *   - pointers the library did not make (garbage, uninitialised, another
 *     object's type), and arrays shorter than the count passed with them;
 *   - calling df_loop_call_from_thread() (or anything else) on a loop that
 *     another thread may be freeing, or after df_loop_free();
 *   - reading a loop-thread object from another thread through the
 *     accessors that do not check the thread (a data race);
 *   - making objects on a loop from the callbacks df_loop_free() runs;
 *   - handing the library a value and its destructor twice (it will run
 *     the destructor twice), or destroying a value the library owns.
 * Not undefined, but never freed: deferreds that wait for each other
 * (df_wait) or are chained to each other (df_deferred_chain) in a cycle,
 * like any reference cycle; df_loop_free() then returns DF_EBUSY.
 */

/* ---------------------------------------------------------------- errors */

/* X(name, value, description).  Standard conditions use the negated errno
 * value; conditions of the library's own live in -4100..-4199. */
#define DF_ERRNO_MAP(X)                                                        \
    X(EINVAL, -EINVAL, "invalid argument")                                     \
    X(ENOMEM, -ENOMEM, "out of memory")                                        \
    X(EBUSY, -EBUSY, "object is busy")                                         \
    X(EAGAIN, -EAGAIN, "resource temporarily unavailable")                     \
    X(ESHUTDOWN, -ESHUTDOWN, "pool is shut down")                              \
    X(ECANCELLED, -ECANCELED, "operation cancelled")                           \
    X(ETIMEDOUT, -ETIMEDOUT, "operation timed out")                            \
    X(EALREADY_CALLED, -4101, "deferred has already been fired")               \
    X(EFIRST_ERROR, -4102, "a member of a deferred list failed")               \
    X(EOVERRELEASE, -4103, "released more than was acquired")                  \
    X(EQUEUE_OVERFLOW, -4104, "queue is full")                                 \
    X(EQUEUE_UNDERFLOW, -4105, "too many pending gets on queue")               \
    X(EWRONG_THREAD, -4106, "called from a thread that does not own it")       \
    X(ENOT_CALLED, -4107, "deferred has not fired yet")                        \
    X(ESTATE, -4108, "operation not valid in the object's current state")      \
    X(EFAILED, -4109, "operation failed")                                      \
    X(EFORKED, -4110, "object was inherited across fork(); unusable here")

enum {
#define DF__ERR_ENUM(name, value, text) DF_##name = (value),
    DF_ERRNO_MAP(DF__ERR_ENUM)
#undef DF__ERR_ENUM
};

/* A description of `code`: the table's text ("success" for 0), else the
 * C library's text for an errno value of either sign, else, for an
 * application's own code, its number: "error 1042".  The first two are
 * static strings; the number is written to a buffer of the calling thread,
 * valid until that thread's next df_strerror() call or its exit.  Never
 * NULL.  Any thread. */
DF_EXPORT const char *df_strerror(int code);
/* The name of `code`: the table's, e.g. "DF_ECANCELLED" ("DF_OK" for 0),
 * else the C library's errno name for an errno value of either sign, e.g.
 * "ENOENT", else "DF_UNKNOWN(1042)" with the number, in a buffer of the
 * calling thread valid until its next df_err_name() call or its exit.
 * Never NULL.  Any thread. */
DF_EXPORT const char *df_err_name(int code);

/* --------------------------------------------------------------- version */

/* The version of the library linked at run time, which may differ from the
 * DF_VERSION_* macros of the header a program was compiled with: the
 * string "MAJOR.MINOR.PATCH" (static) and the number laid out as
 * DF_VERSION_HEX.  Any thread. */
DF_EXPORT const char *df_version(void);
DF_EXPORT unsigned long df_version_number(void);

/* ----------------------------------------------------------------- types */

typedef struct df_loop df_loop;
typedef struct df_deferred df_deferred;
typedef struct df_failure df_failure;
typedef struct df_list_result df_list_result;
typedef struct df_sem df_sem;
typedef struct df_lock df_lock;
typedef struct df_queue df_queue;
typedef struct df_pool df_pool;
typedef struct df_work df_work;
typedef struct df_timer df_timer;

/* Destroys a value.  Called exactly once per value handed to the library
 * with it, on whichever thread last owns the value (normally the loop
 * thread). */
typedef void (*df_free_fn)(void *value);

/* ---------------------------------------------------------------- failure */

/*
 * A df_failure is an immutable error: a code (normally a negative DF_ or
 * errno code, but any int the application likes except 0), a message, an
 * optional payload with destructor, and, for DF_EFIRST_ERROR failures made
 * by lists, the index and failure of the member that failed.  Failures are
 * reference counted with atomic counts, so they may be made, read, shared
 * and released on any thread.
 *
 * Failure constructors never return NULL: if memory runs out they return a
 * shared static failure with code DF_ENOMEM (on which ref/unref are no-ops)
 * and release the payload with its destructor.
 */

/* A new failure with one reference owned by the caller.  `loop` supplies
 * the allocator (NULL: the C library's malloc).  `fmt` may be NULL, meaning
 * df_strerror(code).  Any thread. */
DF_EXPORT df_failure *df_failure_new(df_loop *loop, int code, const char *fmt,
                                     ...) DF_PRINTF(3, 4);
/* Same, with a payload the failure steals; `payload_free` (may be NULL)
 * runs exactly once, when the last reference goes.  Any thread. */
DF_EXPORT df_failure *df_failure_new_payload(df_loop *loop, int code,
                                             void *payload,
                                             df_free_fn payload_free,
                                             const char *fmt, ...)
    DF_PRINTF(5, 6);
/* Adds a reference; returns `f`.  Any thread. */
DF_EXPORT df_failure *df_failure_ref(df_failure *f);
/* Drops a reference; the last one frees the failure, its payload and its
 * cause.  NULL is ignored.  Any thread. */
DF_EXPORT void df_failure_unref(df_failure *f);
/* Accessors; the pointers are borrowed and live as long as `f`.  With f
 * NULL (no failure) they give 0, "", NULL, -1 and NULL.  A failure made
 * with code 0 gets DF_EFAILED instead: 0 would read as success. */
DF_EXPORT int df_failure_code(const df_failure *f);
DF_EXPORT const char *df_failure_message(const df_failure *f);
DF_EXPORT void *df_failure_payload(const df_failure *f);
/* For DF_EFIRST_ERROR: the index of the member that failed (else -1) and
 * its failure (borrowed; else NULL). */
DF_EXPORT long df_failure_index(const df_failure *f);
DF_EXPORT df_failure *df_failure_cause(const df_failure *f);

/* ----------------------------------------------------------------- result */

/*
 * A df_result is what travels down a callback chain: a success value with
 * its destructor, a failure, or (returned from a callback only) a deferred
 * to wait for.  It is a plain struct passed by value; whoever holds one owns
 * what is inside.  Build them with df_ok(), df_err(), df_errf() and
 * df_wait(); drop one with df_result_clear().
 */
typedef struct df_result {
    void *value;          /* success value (meaningful when failure == NULL) */
    df_free_fn free;      /* destructor for value, or NULL                   */
    df_failure *failure;  /* non-NULL: the error side; owned reference       */
    df_deferred *wait;    /* non-NULL: wait for this deferred (owned ref)    */
} df_result;

/* A success carrying `value`, owned by the result. */
static inline df_result df_ok(void *value, df_free_fn free_fn)
{
    df_result r = {value, free_fn, NULL, NULL};
    return r;
}
/* A failure result; steals the reference `f`. */
static inline df_result df_err(df_failure *f)
{
    df_result r = {NULL, NULL, f, NULL};
    return r;
}
/* A failure result with a new failure (see df_failure_new). */
DF_EXPORT df_result df_errf(df_loop *loop, int code, const char *fmt, ...)
    DF_PRINTF(3, 4);
/* A result that makes the chain wait for `d` and continue with its result
 * (Twisted: a callback returning a Deferred).  Steals one reference to d.
 * A callback returning the deferred it runs on, or one of another loop,
 * makes the chain go on with a DF_EINVAL failure instead. */
static inline df_result df_wait(df_deferred *d)
{
    df_result r = {NULL, NULL, NULL, d};
    return r;
}
static inline bool df_result_ok(const df_result *r)
{
    return r->failure == NULL && r->wait == NULL;
}
/* Releases what `r` holds (runs the value's destructor, drops the failure
 * or deferred reference) and resets it to df_ok(NULL, NULL).  Loop thread
 * when it holds a deferred; otherwise any thread. */
DF_EXPORT void df_result_clear(df_result *r);

/* ------------------------------------------------------------------- loop */

/* Allocator used for every allocation made on behalf of a loop.  The
 * functions must be thread-safe (pool threads allocate failures and
 * completion records).  realloc(NULL, n) must behave as malloc.  Without
 * one (NULL), the loop takes its 2 MiB slab chunks from mmap instead of
 * malloc and asks the kernel for transparent huge pages on them (madvise
 * MADV_HUGEPAGE); a loop's own allocator gets every byte and its memory
 * is never advised. */
typedef struct df_allocator {
    void *(*malloc)(size_t size, void *ctx);
    void *(*realloc)(void *ptr, size_t size, void *ctx);
    void (*free)(void *ptr, void *ctx);
    void *ctx;
} df_allocator;

/* Called on the loop thread when a deferred whose result is a failure is
 * released with nobody having handled it.  `f` is borrowed. */
typedef void (*df_unhandled_fn)(df_failure *f, void *arg);

typedef struct df_loop_options {
    const df_allocator *allocator; /* NULL: malloc/realloc/free; copied */
    df_unhandled_fn unhandled;     /* NULL: one line on stderr           */
    void *unhandled_arg;
} df_loop_options;

#define DF_LOOP_OPTIONS_INIT {NULL, NULL, NULL}

/* Creates a loop owned by the calling thread, which becomes its loop
 * thread.  `opts` may be NULL.  On success *out owns the loop. */
DF_EXPORT int df_loop_new(const df_loop_options *opts, df_loop **out);
/* Frees the loop.  Every pool made from it must be freed first, no timer
 * may be pending, and every deferred, semaphore, lock and queue made from
 * it must be gone (freed, or its last reference dropped; a map holds its
 * done deferred until df_map_free): otherwise DF_EBUSY and nothing changes.
 * From a callback the loop is running: DF_ESTATE.  Pending cross-thread
 * calls are discarded after their callbacks are run with DF_ECANCELLED
 * status (see df_loop_call_from_thread).  Loop thread. */
DF_EXPORT int df_loop_free(df_loop *loop);
/* What is alive on a loop: what df_loop_free() waits for. */
typedef struct df_loop_stats {
    size_t deferreds;    /* deferreds not yet released                   */
    size_t sync_objects; /* semaphores, locks and queues not yet freed   */
    size_t pools;        /* pools not yet freed                          */
    size_t maps;         /* maps not yet freed                           */
    size_t timers;       /* armed timers, timeouts and weak ones included */
    size_t weak_timers;  /* of those, timers made weak by df_timer_unref */
    size_t jobs;         /* pool jobs whose completion is not dispatched */
    size_t calls;        /* cross-thread calls not yet run               */
    uint64_t wakeups;    /* times df_loop_run(_until) came back from
                            waiting for work (woken, timed out or
                            interrupted): a counter, not a count alive */
} df_loop_stats;

/* Fills *out with the counts of what is alive on the loop, for instance
 * to find out why df_loop_free() returned DF_EBUSY (which it does while
 * any count but `weak_timers` and `calls` is non-zero; a debug build,
 * DF_DEBUG, also prints them on stderr then).  Loop thread. */
DF_EXPORT int df_loop_get_stats(const df_loop *loop, df_loop_stats *out);
/* Replaces the unhandled-failure hook (NULL restores the default). */
DF_EXPORT int df_loop_set_unhandled(df_loop *loop, df_unhandled_fn fn,
                                    void *arg);
/* Number of unhandled failures reported so far on this loop (0 for
 * NULL). */
DF_EXPORT uint64_t df_loop_unhandled_count(const df_loop *loop);

/* Runs the loop until nothing is pending: no timer, no job submitted to a
 * pool whose completion has not been dispatched, no cross-thread call not
 * yet run.  Returns 0, or 0 early after df_loop_stop().  Loop thread; not
 * re-entrant (DF_ESTATE from inside a callback of the same loop). */
DF_EXPORT int df_loop_run(df_loop *loop);
/* Runs the loop until `d` has fired (0), or until nothing is pending while
 * d is still unfired (DF_ENOT_CALLED), or df_loop_stop() (DF_ECANCELLED).
 * Borrows d, which must stay alive meanwhile; DF_EINVAL if d belongs to
 * another loop.  Not re-entrant (DF_ESTATE).  Loop thread. */
DF_EXPORT int df_loop_run_until(df_loop *loop, df_deferred *d);
/* Makes the current or next df_loop_run(_until) return after the callback
 * in progress.  Loop thread. */
DF_EXPORT int df_loop_stop(df_loop *loop);

/* For driving the loop from another event loop: a file descriptor (an
 * eventfd, or a pipe's read end where there is none; never 0, 1 or 2)
 * that becomes readable when completions or cross-thread calls are
 * waiting.  Timers do not make it readable: always poll with the timeout
 * df_loop_timeout_ms() gives.  The fd belongs to the loop; do not close
 * or read it.  DF_EINVAL for NULL. */
DF_EXPORT int df_loop_fd(const df_loop *loop);
/* Milliseconds until the loop next needs a look: the next timer (0 if
 * due now, or if a budgeted dispatch left work), or -1 if nothing: pass
 * it to poll(2).  Errors (DF_EINVAL, DF_EWRONG_THREAD,
 * DF_EFORKED) are negative too, and poll(2) would wait forever on them:
 * only -1 means "no timeout". */
DF_EXPORT int df_loop_timeout_ms(const df_loop *loop);
/* Dispatches, without blocking, what is ready: due timers, then at most
 * `budget` completions and cross-thread calls (0: all that are ready).
 * Stores the number dispatched in *ran if ran is not NULL.  While work
 * remains the fd stays readable and df_loop_timeout_ms() returns 0.
 * df_loop_stop() does not apply here.  Not re-entrant: DF_ESTATE from a
 * callback of the same loop.  Loop thread. */
DF_EXPORT int df_loop_dispatch(df_loop *loop, unsigned budget, unsigned *ran);
/* Number of things that keep df_loop_run() running (see there).  0 for
 * NULL, and 0 (with one line on stderr) from another thread. */
DF_EXPORT size_t df_loop_pending(const df_loop *loop);

/* Called on the loop thread.  `status` is 0, or DF_ECANCELLED when the
 * loop is being freed before the call could run. */
typedef void (*df_call_fn)(void *arg, int status);
/* Queues fn(arg) to run on the loop thread, in the order calls were made
 * from each thread.  Thread-safe; callable from any thread, also from a
 * signal-free context inside a pool's work function.  Wakes the loop.
 * Not a cancellation point: a thread with a cancel pending completes the
 * call.  DF_EINVAL for NULL, DF_ENOMEM, DF_EFORKED in a forked child. */
DF_EXPORT int df_loop_call_from_thread(df_loop *loop, df_call_fn fn,
                                       void *arg);

/* The loop's clock: monotonic nanoseconds. Any thread. */
DF_EXPORT uint64_t df_loop_now(const df_loop *loop);
/* Runs fn(arg, 0) on the loop thread after `delay_ns`.  If `out` is not
 * NULL it receives a handle, valid until the callback starts or until
 * df_timer_cancel(); cancelling runs nothing (fn is then never called).
 * Timers due at the same instant run in the order they were made. */
DF_EXPORT int df_loop_call_later(df_loop *loop, uint64_t delay_ns,
                                 df_call_fn fn, void *arg, df_timer **out);
/* Cancels a pending timer and frees it; fn is not called.  Loop thread. */
DF_EXPORT int df_timer_cancel(df_timer *t);
/* Makes a pending timer weak: it no longer keeps df_loop_run() (or
 * df_loop_run_until()) running, like libuv's uv_unref(), so a progress
 * timer that re-arms itself needs no stop logic: the run returns when
 * nothing else is pending.  A weak timer still runs when due while the
 * loop runs, still counts in df_loop_free()'s DF_EBUSY check (cancel it
 * first), and does not free or release anything: the handle stays valid
 * exactly as long as before.  df_timer_ref() makes it strong again.  Both
 * return 0 (also when nothing changes), or DF_EINVAL for a timer that has
 * fired or been cancelled.  Loop thread. */
DF_EXPORT int df_timer_unref(df_timer *t);
DF_EXPORT int df_timer_ref(df_timer *t);

/* --------------------------------------------------------------- deferred */

/*
 * A deferred is a promise of one result, fired once with df_deferred_callback
 * (success) or df_deferred_errback (failure), with a chain of callback /
 * errback pairs that run on the loop thread in order.  Twisted's semantics
 * apply; the differences are listed in README.md.
 *
 * Reference counting: df_deferred_new() gives the caller one reference.
 * Every part of the library that needs a deferred later (a list member, a
 * chain waiting on an inner deferred, a pool job) holds its own reference.
 * When the last reference goes:
 *   - an unfired deferred, or one still waiting for an inner deferred, is
 *     failed with DF_ECANCELLED first, so that what is left of its chain
 *     runs, and every callback pair runs exactly once (its canceller is not
 *     called; that failure is never reported as unhandled);
 *   - a deferred paused by hand runs what is left of its chain;
 *   - a deferred whose chain ended on a failure reports it through the
 *     loop's unhandled hook, exactly once.
 */

/* A callback or errback: takes ownership of the chain's current result and
 * returns the next one (return `r` to pass it on).  Runs on the loop
 * thread, never under a library lock, never nested inside another callback
 * of the same chain. */
typedef df_result (*df_callback_fn)(df_result r, void *arg);
/* Called by df_deferred_cancel() on an unfired deferred.  Loop thread. */
typedef void (*df_canceller_fn)(df_deferred *d, void *arg);

DF_EXPORT int df_deferred_new(df_loop *loop, df_deferred **out);
/* With a canceller (Twisted: Deferred(canceller)); fn may be NULL.  A
 * df_deferred_cancel() of the same deferred from inside its canceller
 * returns 0 and does nothing. */
DF_EXPORT int df_deferred_new_cancellable(df_loop *loop, df_canceller_fn fn,
                                          void *arg, df_deferred **out);
/* A deferred already fired with a success value; steals value (on error
 * the caller keeps it) (Twisted: succeed). */
DF_EXPORT int df_succeed(df_loop *loop, void *value, df_free_fn free_fn,
                         df_deferred **out);
/* A deferred already failed with `f`; steals f on success (Twisted: fail).*/
DF_EXPORT int df_fail(df_loop *loop, df_failure *f, df_deferred **out);
/* Calls fn(arg) now and wraps what it returns in a deferred; a df_wait()
 * result gives that deferred itself (Twisted: maybeDeferred).  fn is called
 * exactly once when this returns 0, never otherwise. */
typedef df_result (*df_run_fn)(void *arg);
DF_EXPORT int df_maybe(df_loop *loop, df_run_fn fn, void *arg,
                       df_deferred **out);

DF_EXPORT df_deferred *df_deferred_ref(df_deferred *d);
DF_EXPORT void df_deferred_unref(df_deferred *d);
DF_EXPORT df_loop *df_deferred_loop(const df_deferred *d);

/* Fires with success; steals value on success.  DF_EALREADY_CALLED if it
 * has fired already (nothing changes, the caller keeps value).  DF_EBUSY
 * (likewise) on the deferred of a df_pool_submit or df_sem_run_in_pool
 * job that has not fired yet: only the job fires it (cancel it instead). */
DF_EXPORT int df_deferred_callback(df_deferred *d, void *value,
                                   df_free_fn free_fn);
/* Fires with failure; steals f on success.  DF_EALREADY_CALLED and
 * DF_EBUSY as above. */
DF_EXPORT int df_deferred_errback(df_deferred *d, df_failure *f);
/* Fires with `r` (success or failure, not df_wait): steals r on success.
 * DF_EALREADY_CALLED and DF_EBUSY as above. */
DF_EXPORT int df_deferred_resolve(df_deferred *d, df_result r);

/* Appends a pair; NULL means pass the result through on that side.  If the
 * deferred has fired and no callback is running, the pair runs now. */
DF_EXPORT int df_deferred_add_callbacks(df_deferred *d, df_callback_fn cb,
                                        df_callback_fn eb, void *arg);
DF_EXPORT int df_deferred_add_callback(df_deferred *d, df_callback_fn cb,
                                       void *arg);
DF_EXPORT int df_deferred_add_errback(df_deferred *d, df_callback_fn eb,
                                      void *arg);
DF_EXPORT int df_deferred_add_both(df_deferred *d, df_callback_fn fn,
                                   void *arg);
/* Twisted chainDeferred: when d's chain reaches this point, `other` is
 * fired with d's result, and d continues with df_ok(NULL, NULL).  Takes a
 * reference to other.  DF_EINVAL if other == d or belongs to another
 * loop.  If other has fired by the time d's chain gets there, d's chain
 * goes on with a DF_EALREADY_CALLED failure (Twisted: AlreadyCalledError)
 * and other keeps its result; if other is a pool job's deferred that has
 * not fired yet (see df_deferred_callback), with a DF_EBUSY failure.  Until other's callbacks have run (as far as
 * they can), d holds the result it fired other with: a callback there that
 * returns df_wait(d) gets that value again, without destructor (valid as
 * long as its owner in other's chain keeps it), or that failure (Twisted
 * hands it the same object); d then goes on with df_ok(NULL, NULL). */
DF_EXPORT int df_deferred_chain(df_deferred *d, df_deferred *other);

DF_EXPORT int df_deferred_pause(df_deferred *d);
/* DF_ESTATE if not paused. */
DF_EXPORT int df_deferred_unpause(df_deferred *d);
/* Twisted cancel: on an unfired deferred calls the canceller (if any) and,
 * if that did not fire it, fails it with DF_ECANCELLED; on a fired deferred
 * waiting for an inner deferred, cancels the inner one; else does
 * nothing.  Returns 0 in every case. */
DF_EXPORT int df_deferred_cancel(df_deferred *d);

DF_EXPORT bool df_deferred_called(const df_deferred *d);
DF_EXPORT bool df_deferred_paused(const df_deferred *d);
/* The current result, borrowed: *value, or *failure (one is set, the
 * other NULL); either out pointer may be NULL.  DF_ENOT_CALLED if unfired
 * or waiting on an inner deferred. */
DF_EXPORT int df_deferred_peek(const df_deferred *d, void **value,
                               df_failure **failure);
/* Twisted addTimeout: cancels d if it has not fired within `timeout_ns`
 * on the loop's clock; a DF_ECANCELLED failure that results becomes
 * DF_ETIMEDOUT (it stays DF_ECANCELLED when cancelled by hand; a deferred
 * whose cancel gives another outcome, a list say, keeps that outcome).
 * The timer goes away when d fires.  A pending timeout is a timer: it
 * keeps df_loop_run() running, makes df_loop_free() return DF_EBUSY, and
 * holds a reference to d until it fires or is removed.  One timeout per
 * deferred in its whole life (a second call: DF_EBUSY). */
DF_EXPORT int df_deferred_set_timeout(df_deferred *d, uint64_t timeout_ns);

/* ------------------------------------------------------------------- list */

/* Twisted DeferredList flags. */
enum {
    DF_LIST_FIRE_ON_ONE_CALLBACK = 1u << 0, /* fire on first success      */
    DF_LIST_FIRE_ON_ONE_ERRBACK = 1u << 1,  /* fail on first failure      */
    DF_LIST_CONSUME_ERRORS = 1u << 2,       /* members continue with NULL */
    DF_LIST_CANCEL_REMAINING = 1u << 3,     /* beyond Twisted, see below  */
    DF_LIST_TAKE_REFS = 1u << 4             /* C only: steals, see below  */
};

/*
 * Builds a deferred that fires with a df_list_result (free it with
 * df_list_result_free, which the result's destructor does) once every member
 * has fired, or earlier with the flags:
 *   FIRE_ON_ONE_CALLBACK: on the first success; the result's fired_index
 *     says which member.
 *   FIRE_ON_ONE_ERRBACK: fails on the first failure with DF_EFIRST_ERROR;
 *     df_failure_index()/df_failure_cause() tell which member and why.
 *   CONSUME_ERRORS: a member's failure is recorded and its own chain goes
 *     on with df_ok(NULL, NULL) (nothing left to be reported as unhandled).
 *   CANCEL_REMAINING: once the list has fired early, cancel the members
 *     that have not fired.
 *   TAKE_REFS: a C convenience with no Twisted equivalent (jansson's
 *     "steal" idiom): on success the list takes over the caller's
 *     reference to each member instead of taking its own, so the caller
 *     does not unref the members afterwards.  The array then holds one
 *     reference per position (a member listed twice: two references).
 *     After success the caller must not touch a member it holds no other
 *     reference to: the list may already have released it (the list can
 *     fire, and drop its members, before df_list_new returns).  On
 *     failure nothing was taken: the caller still owns every member.
 * Ownership: the list borrows the array and takes a reference to each
 * member (a member may appear twice), or takes the caller's (TAKE_REFS).
 * DF_EINVAL for a NULL or foreign member, unknown flags, or an n no array
 * can have; DF_ENOMEM for a list too large to allocate.  Each member's
 * success value moves into the list result (the member's chain goes on
 * with the same pointer but no destructor); failures are shared by
 * reference.  Cancelling the list's
 * deferred cancels every member captured here and does nothing else (as
 * Twisted's DeferredList.cancel): the list fires when the members'
 * results make it fire, so a member paused by its owner, or whose cancel
 * completes later (a running pool job), keeps it unfired until then.
 * The list's callback is added to each member in input order, one per
 * position, and runs at once on a member that has fired (as Twisted
 * does), so a member listed twice is seen at each of its positions in
 * turn.  Every allocation is made before the first is added; only if a
 * callback run meanwhile adds callbacks to a member listed later and
 * memory then runs out does the list fail with DF_ENOMEM (the members not
 * reached get no list callback).  n == 0 fires at once
 * with an empty result.  Releasing the list deferred is not cancelling it:
 * members are released, not cancelled.  Once the list has failed
 * (FIRE_ON_ONE_ERRBACK, gather) or was released unfired, the values it
 * took are destroyed, so the pointers left in members' chains no longer
 * point to anything valid.
 */
DF_EXPORT int df_list_new(df_loop *loop, df_deferred *const *members,
                          size_t n, unsigned flags, df_deferred **out);
/* Twisted gatherResults: fires with a df_list_result of all values, or
 * fails with DF_EFIRST_ERROR on the first failure.  flags may contain
 * DF_LIST_CONSUME_ERRORS, DF_LIST_CANCEL_REMAINING and DF_LIST_TAKE_REFS
 * (as for df_list_new). */
DF_EXPORT int df_gather(df_loop *loop, df_deferred *const *members, size_t n,
                        unsigned flags, df_deferred **out);

DF_EXPORT size_t df_list_result_count(const df_list_result *r);
/* Member i: true when it succeeded.  False also for members that had not
 * fired when an early-firing list fired (df_list_result_fired is false). */
DF_EXPORT bool df_list_result_ok(const df_list_result *r, size_t i);
DF_EXPORT bool df_list_result_fired(const df_list_result *r, size_t i);
/* Borrowed; NULL when not applicable. */
DF_EXPORT void *df_list_result_value(const df_list_result *r, size_t i);
DF_EXPORT df_failure *df_list_result_failure(const df_list_result *r,
                                             size_t i);
/* Member i in one call: returns df_list_result_ok(r, i) and stores
 * df_list_result_value(r, i) in *value and df_list_result_failure(r, i)
 * in *failure (both borrowed, as those give them; either pointer may be
 * NULL, then nothing is stored there).  Any thread that owns r. */
DF_EXPORT bool df_list_result_get(const df_list_result *r, size_t i,
                                  void **value, df_failure **failure);
/* The accessors take any r (NULL too) and any i: out of range gives
 * false, NULL or 0.  The member that made an early-firing list fire, or
 * -1. */
DF_EXPORT long df_list_result_index(const df_list_result *r);
/* Frees the result, running each value's destructor once.  void * so that
 * it can serve as a df_free_fn. */
DF_EXPORT void df_list_result_free(void *r);

/* ------------------------------------------------- semaphore, lock, queue */

/*
 * Twisted DeferredSemaphore.  acquire() gives a deferred that fires with
 * value NULL once the caller holds a token: at once if one is free and no
 * one waits, else in FIFO order.  release() hands the token straight to the
 * first waiter.  Releases are never recursive: 10^6 waiters released one
 * after another run in constant stack.
 *
 * One line: acquires, runs and df_sem_run_in_pool jobs (whatever their
 * pool) wait in one FIFO line per semaphore, and a token always goes to
 * the head of it.  A pool job that finishes hands its token on from its
 * worker thread when the head is a job of the same pool (that worker runs
 * it at once); otherwise the token comes back on the loop thread when the
 * finished job's completion is dispatched, and goes to the head then.
 */
/* tokens >= 1, else DF_EINVAL. */
DF_EXPORT int df_sem_new(df_loop *loop, unsigned tokens, df_sem **out);
/* DF_EBUSY if a token is held or someone waits; nothing changes then.
 * Freed from a callback the semaphore runs (see below), it stays until
 * that dispatch unwinds, and meanwhile every call on it, a second free
 * included, returns DF_ESTATE. */
DF_EXPORT int df_sem_free(df_sem *s);
/* Cancelling the returned deferred before it fires removes the waiter. */
DF_EXPORT int df_sem_acquire(df_sem *s, df_deferred **out);
/* Gives back a token taken by df_sem_acquire.  DF_EOVERRELEASE if no such
 * token is held: the tokens of df_sem_run and df_sem_run_in_pool come back
 * only when those finish, so that the tokens never exceed the limit (a
 * departure from Twisted, whose release() would take a run's token and
 * make the run's own release fail later). */
DF_EXPORT int df_sem_release(df_sem *s);
/* Acquire, then call fn(arg) (which may return df_wait), release when its
 * result is known, success or failure, then fire *out with that result.
 * Cancelling *out while waiting for the token removes the waiter (fn never
 * runs); while fn's deferred is pending it cancels that deferred. */
DF_EXPORT int df_sem_run(df_sem *s, df_run_fn fn, void *arg,
                         df_deferred **out);
DF_EXPORT unsigned df_sem_tokens(const df_sem *s);  /* free now  */
DF_EXPORT unsigned df_sem_limit(const df_sem *s);   /* given     */
DF_EXPORT size_t df_sem_waiting(const df_sem *s);   /* in queue  */

/* Inside a callback run by the semaphore itself, a run that gets a token
 * calls its function once that callback returns (that is what keeps
 * releases non-recursive); an acquire that finds a free token fires at
 * once (its deferred has no callbacks yet), so it may get ahead of such a
 * run.  A cancel that arrives after the token was
 * handed over is too late: the acquire fires with success, a run's cancel
 * goes to fn's deferred (as in Twisted, whose release fires at once).
 * df_sem_free may be called from such a callback; the semaphore is freed
 * once the dispatch unwinds. */

/* Twisted DeferredLock: a semaphore of one token. */
DF_EXPORT int df_lock_new(df_loop *loop, df_lock **out);
DF_EXPORT int df_lock_free(df_lock *l);
DF_EXPORT int df_lock_acquire(df_lock *l, df_deferred **out);
DF_EXPORT int df_lock_release(df_lock *l);
DF_EXPORT int df_lock_run(df_lock *l, df_run_fn fn, void *arg,
                          df_deferred **out);
DF_EXPORT bool df_lock_locked(const df_lock *l);

/* Twisted DeferredQueue.  `size`: most values held (SIZE_MAX: no limit);
 * `backlog`: most pending gets (SIZE_MAX: no limit).  Either may be 0
 * (size 0: a put succeeds only into a waiting get), not both: DF_EINVAL. */
DF_EXPORT int df_queue_new(df_loop *loop, size_t size, size_t backlog,
                           df_queue **out);
/* Frees the queue: pending gets fail with DF_ECANCELLED, held values are
 * destroyed.  From a get's callback, the memory goes once that dispatch
 * unwinds; until then puts and gets return DF_ESTATE and a second free
 * does nothing.  NULL is ignored; another thread: one line on stderr. */
DF_EXPORT void df_queue_free(df_queue *q);
/* Gives value to the first waiting get, else stores it; steals value on
 * success.  DF_EQUEUE_OVERFLOW when full (caller keeps value). */
DF_EXPORT int df_queue_put(df_queue *q, void *value, df_free_fn free_fn);
/* A deferred firing with the next value (which it then owns).
 * DF_EQUEUE_UNDERFLOW when the backlog of gets is full.  Cancelling a
 * pending get removes it. */
DF_EXPORT int df_queue_get(df_queue *q, df_deferred **out);
DF_EXPORT size_t df_queue_size(const df_queue *q);    /* values held  */
DF_EXPORT size_t df_queue_waiting(const df_queue *q); /* pending gets */

/* ------------------------------------------------------------------- pool */

/*
 * A fixed pool of POSIX threads consuming a FIFO work queue.  Work runs on
 * the pool's threads; its outcome is posted back to the loop and fires the
 * job's deferred on the loop thread.
 */
/* The work function, on a pool thread.  Returns df_ok(value, free) or a
 * failure (df_errf / df_err); never df_wait (the job then fails with
 * DF_EINVAL, the df_wait reference dropped on the loop thread).  It may poll
 * df_work_cancelled(w).  It must not touch loop-thread objects. */
typedef df_result (*df_work_fn)(df_work *w, void *arg);

/* Worker threads are named df-worker-0, df-worker-1, ... and block
 * asynchronous signals. */
typedef struct df_pool_options {
    unsigned threads;   /* 0: one per online CPU (sysconf), at least 1 */
    size_t stack_size;  /* 0: the system default; below PTHREAD_STACK_MIN:
                           DF_EINVAL */
} df_pool_options;
#define DF_POOL_OPTIONS_INIT {0, 0}

DF_EXPORT int df_pool_new(df_loop *loop, const df_pool_options *opts,
                          df_pool **out);
/* Queues work(w, arg); *out fires on the loop thread with its result.
 * DF_ESHUTDOWN after df_pool_shutdown().  Cancelling *out while the job is
 * queued removes it and fails it with DF_ECANCELLED; while it runs (or has
 * returned but its completion has not been dispatched yet), sets the flag
 * df_work_cancelled() reads, and the deferred fails with DF_ECANCELLED once
 * work has returned (its result is then destroyed). */
DF_EXPORT int df_pool_submit(df_pool *p, df_work_fn work, void *arg,
                             df_deferred **out);
enum { DF_POOL_DRAIN = 0, DF_POOL_CANCEL = 1 };
/* Stops accepting work; DRAIN runs every queued job, CANCEL fails each
 * queued job with DF_ECANCELLED first (before any callback can let one
 * start).  df_sem_run_in_pool jobs for this pool still waiting for a token
 * fail with DF_ESHUTDOWN: under CANCEL at once (right after the queued
 * jobs); under DRAIN only those that get no token while the drain runs
 * (the drain dispatches this pool's completions as they come, so every
 * token they give back goes on to the next job in line, and runs it if it
 * is for this pool), that is, those behind a token held elsewhere.  A map
 * on this pool stops pulling and its done fails with DF_ESHUTDOWN, whether
 * the pool is shut down from a timer or from the map's own callbacks.
 * Both wait for running jobs, dispatch
 * this pool's completions (their callbacks run inside this call; other
 * completions stay queued, in order) and join every thread.  A callback may
 * free the pool: the free then happens at the end of the shutdown.
 * Idempotent.  Loop thread. */
DF_EXPORT int df_pool_shutdown(df_pool *p, int mode);
/* Shuts down with DF_POOL_CANCEL if needed, then frees.  NULL is ignored;
 * from another thread (a work function, say) it prints one line on stderr
 * and does nothing.  Loop thread. */
DF_EXPORT void df_pool_free(df_pool *p);
DF_EXPORT unsigned df_pool_threads(const df_pool *p);

/* Pool threads only, inside the work function. */
DF_EXPORT bool df_work_cancelled(const df_work *w);
DF_EXPORT df_loop *df_work_loop(const df_work *w);

/* Semaphore run-in-pool: acquire a token, submit work, release the token
 * only once the worker has returned.  The job waits in the semaphore's one
 * line (see above); a worker that finishes a job of this semaphore may
 * start it directly.  While such completions stream in, the loop takes
 * them in batches, sleeping at most 1 ms between them instead of being
 * woken for each: a result may reach the loop up to about 1 ms after
 * its work returned (the map's items likewise).  Cancelling *out while waiting for the token removes
 * the waiter; once submitted, it cancels the job as df_pool_submit says,
 * and the token comes back only when the worker is done, before *out
 * fires.  *out fails with DF_ESHUTDOWN if the pool was shut down (or
 * freed) while it waited for its token.  DF_ESHUTDOWN if the pool is shut
 * down, DF_EINVAL if s and p belong to different loops. */
DF_EXPORT int df_sem_run_in_pool(df_sem *s, df_pool *p, df_work_fn work,
                                 void *arg, df_deferred **out);

/* -------------------------------------------------------------------- map */

/*
 * Bounded streaming map over an input that may never end (beyond Twisted:
 * its semaphore + DeferredList pattern makes every deferred up front).
 * Inputs are pulled from `next` on the loop thread only, while fewer than
 * `limit` items are in flight, or with a pool `limit` + the read-ahead
 * (below), and, in ordered mode, while the window of finished but
 * undelivered results has room, so memory is O(limit + window), never
 * O(N).  Each item runs as `work` on
 * `pool`, or, with pool NULL, as `call` on the loop thread (which may
 * return df_wait).  With a pool at most `limit` items run at once: the
 * others in flight were pulled ahead and wait for one of the map's
 * `limit` tokens, and a worker that finishes an item hands its token to
 * the next one and runs it at once (as df_sem_run_in_pool does).  Results
 * reach `on_result` on the loop thread as they complete, or in input order
 * with DF_MAP_ORDERED.
 *
 * Read-ahead, with a pool: it starts at max(limit, 64) items and doubles,
 * up to its cap, each time the workers find no pulled item waiting while
 * the input goes on (short items, the loop thread the slower side); it
 * never shrinks.  The cap is `readahead_max`, or max(limit, 8192) if that
 * is 0 (and the start is no higher than the cap).  So at most limit + the
 * cap items are pulled but not delivered (and the map owns each of them
 * until then): lower the cap for big items, whose work is short.  With
 * items slow enough that the loop keeps the line filled, it stays where it
 * starts, max(limit, 64) or the cap if lower.  DF_MAP_NO_READAHEAD makes
 * it 0.  Unordered, the map allocates a slot (192 bytes on 64-bit Linux)
 * for each of those limit + cap items when it starts, so a cap too big
 * to allocate fails df_map_start with DF_ENOMEM; ordered, it allocates
 * window + 1 slots, and the window bounds the read-ahead whatever the
 * cap.  A slot is touched first when the read-ahead reaches it.
 */
typedef struct df_map df_map;

/* Pulls the next input.  Return a positive value and set *item (and
 * *item_free, which may stay NULL) for an item; 0 at the end; a negative
 * code on failure (the map then stops pulling and its final deferred fails
 * with that code after the items in flight finish).  Loop thread. */
typedef int (*df_map_next_fn)(void *arg, void **item, df_free_fn *item_free);
/* Receives item `index` (0-based input position) and its result, which it
 * owns.  The item itself is still owned by the map and freed after this
 * returns.  Loop thread. */
typedef void (*df_map_result_fn)(uint64_t index, void *item, df_result r,
                                 void *arg);
/* Loop-thread variant of the work: may return df_wait(d). */
typedef df_result (*df_map_call_fn)(void *item, void *arg);
/* The pool variant of the work, on a pool thread: item is the pulled
 * input (borrowed: the map owns it), work_arg the map's `work_arg`, shared
 * by every pool thread at once (the map never touches it).  Same rules as
 * df_work_fn: no df_wait, no loop-thread object. */
typedef df_result (*df_map_work_fn)(df_work *w, void *item, void *work_arg);

enum {
    DF_MAP_ORDERED = 1u << 0,       /* deliver in input order             */
    DF_MAP_STOP_ON_ERROR = 1u << 1, /* first failure (in completion order)
                                       stops the map */
    DF_MAP_NO_READAHEAD = 1u << 2   /* with a pool: pull an input only
                                       while one of the `limit` tokens is
                                       free, never ahead of them (for a
                                       next that may block, or items that
                                       must not be taken early); workers
                                       then hand no token on to the map's
                                       items */
};

typedef struct df_map_options {
    unsigned limit;           /* most items in flight, >= 1               */
    unsigned flags;           /* DF_MAP_*                                 */
    size_t window;            /* ordered: most results held back; 0: limit.
                                 Items are pulled only while pulled -
                                 delivered <= window, so a window below
                                 limit - 1 also lowers concurrency. */
    df_map_next_fn next;      /* required                                 */
    void *next_arg;
    df_pool *pool;            /* with work: run items on the pool         */
    df_map_work_fn work;      /* called as work(w, item, work_arg)        */
    void *work_arg;           /* for work, on pool threads                */
    df_map_call_fn call;      /* without pool: call(item, arg) on loop    */
    df_map_result_fn on_result; /* may be NULL: results are dropped       */
    void *arg;                /* for call and on_result                   */
    size_t readahead_max;     /* with a pool: the read-ahead's cap (see
                                 above); 0: max(limit, 8192) */
} df_map_options;

typedef struct df_map_stats {
    uint64_t pulled;   /* inputs taken from next                          */
    uint64_t running;  /* in flight now (pulled, not finished)            */
    uint64_t done;     /* results delivered (success or failure)          */
    uint64_t failed;   /* of which failures                               */
    uint64_t cancelled;/* of which DF_ECANCELLED                          */
    uint64_t buffered; /* ordered mode: finished, waiting for their turn  */
} df_map_stats;     /* counts include the item being delivered now      */

/* Starts the map: pulls the first items at once.  Every pulled item
 * reaches on_result exactly once (items in flight at a cancel or stop come
 * back as DF_ECANCELLED); a submit the pool refuses fails that item and
 * stops the map with that code.  *done fires with a
 * df_map_stats * value (owned by the chain, freed by its destructor) once
 * the input has ended (or stopped) and every item in flight has been
 * delivered; it fails with the first failure under DF_MAP_STOP_ON_ERROR,
 * with the iterator's code if next failed, with DF_ECANCELLED after
 * df_map_cancel().  The map object stays valid until df_map_free().
 * DF_EINVAL for options that break the rules above (limit 0, no next,
 * unknown flags, not exactly one of pool + work or call, an ordered window
 * of SIZE_MAX) and for a pool of another loop. */
DF_EXPORT int df_map_start(df_loop *loop, const df_map_options *opts,
                           df_map **map, df_deferred **done);
/* Stops pulling, cancels queued items, lets running ones finish (their
 * results are delivered with DF_ECANCELLED).  Idempotent.  Cancelling the
 * done deferred does the same; done fires only once the running items
 * have returned (a timeout on done gives DF_ETIMEDOUT). */
DF_EXPORT int df_map_cancel(df_map *m);
DF_EXPORT int df_map_get_stats(const df_map *m, df_map_stats *out);
/* DF_EBUSY until done has fired (cancel and run the loop first); may be
 * called from done's own callbacks. */
DF_EXPORT int df_map_free(df_map *m);
/* Runs a whole map on its loop, the common batch case: df_map_start, then
 * df_loop_run_until(done), then df_map_free.  Fills *stats (may be NULL)
 * with the final counts.  Returns 0 if done succeeded, else the code it
 * failed with (the first failure under DF_MAP_STOP_ON_ERROR, the
 * iterator's code, DF_ESHUTDOWN if the pool stopped), or an error of
 * df_map_start (nothing started: on_result is never called).  A
 * df_loop_stop() from a callback cancels the map; the call still returns
 * only once every pulled item has been delivered (DF_ECANCELLED).  Other
 * work on the loop (timers, other deferreds) runs meanwhile.  Loop thread,
 * not from the loop's own callbacks (DF_ESTATE). */
DF_EXPORT int df_map_run(df_loop *loop, const df_map_options *opts,
                         df_map_stats *stats);

#ifdef __cplusplus
}
#endif
#endif /* DEFERRED_H */
