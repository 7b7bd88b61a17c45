/* SPDX-License-Identifier: MIT */
/* libdeferred-mpi: a pool whose workers are MPI ranks, for libdeferred. */
#ifndef DEFERRED_MPI_H
#define DEFERRED_MPI_H

#include <deferred.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Process model
 * =============
 * Static, as mpi4py.futures' MPIPoolExecutor under `mpiexec -n N`: every
 * rank runs the same program.  Every rank calls df_mpi_init(), then
 * registers the same work functions by name (df_mpi_register()), then:
 *   - rank 0, the master (df_mpi_is_master()), makes a df_loop and a
 *     df_mpi_pool on it (df_mpi_pool_new()), submits work, and finally
 *     shuts the pool down (df_mpi_pool_shutdown()) and frees it;
 *   - every other rank calls df_mpi_worker_run(), which runs the items the
 *     master sends (with one thread, the default, on the calling thread
 *     itself; with more, on a df_pool of its own threads) and returns once
 *     the master shuts the pool down (or the start-up check failed);
 * and every rank ends with df_mpi_finalize().  The master does not run
 * work items itself: with N ranks there are N - 1 worker ranks.
 *
 * The header does not include <mpi.h>: a program that uses only this API
 * needs no MPI headers.  The library communicates on its own duplicate of
 * MPI_COMM_WORLD, so its messages never mix with the application's.
 *
 * Threads: df_mpi_init(), df_mpi_register(), df_mpi_worker_run() and
 * df_mpi_finalize() are called on the thread that initialised MPI (not
 * from a work function: df_mpi_finalize() returns DF_EBUSY there, even in
 * the inline mode where the work function runs on that thread).  The
 * pool's functions are loop-thread functions, like every libdeferred
 * object: from another thread they return DF_EWRONG_THREAD (after the
 * DF_EINVAL checks of their arguments).  df_mpi_task_* are for the work
 * function, on the worker's thread that runs it.  On the master a
 * progress thread owns every MPI call while the pool exists; it sleeps on
 * a condition variable while nothing is in flight and polls MPI while
 * replies are awaited: with a backoff (8 us doubling to 256 us) while
 * some worker has free credit, and, while every worker is at full credit,
 * at a pace of a quarter of the time the workers' queued items still cover
 * (derived from the items' measured run times; at most 2 ms).  The loop
 * thread never calls MPI after
 * df_mpi_pool_new() returns and sleeps in the loop as usual.  MPI must
 * therefore provide MPI_THREAD_SERIALIZED or better (df_mpi_init()
 * requests MPI_THREAD_SERIALIZED and checks).  The library's own threads
 * (the master's progress thread, a worker's df_pool threads and its
 * sentry) block every asynchronous signal: those belong to the
 * application's threads.
 *
 * Encoding contract: inputs and outputs are byte strings.  The library
 * moves them unchanged (MPI_BYTE) and never looks inside.  The user
 * encodes and decodes; since every rank runs the same binary, a plain C
 * struct copied with memcpy works on a cluster of identical machines.  For
 * mixed architectures use a fixed byte order: df_mpi_buf_from_i64() and
 * friends encode int64_t and double arrays as little-endian 8-byte values.
 * One buffer is at most max_bytes (df_mpi_pool_options) long, 64 MiB by
 * default and at most 1 GiB.
 *
 * Rank death: MPI's default error handler on MPI_COMM_WORLD aborts the
 * whole job when a rank dies, and mpirun / srun kill every other rank: the
 * master does not survive to see it.  Until then each item's deferred
 * fires exactly once, only when the worker's complete reply has arrived
 * (or the item was cancelled before it left the master); a reply for an
 * item that has already fired is dropped, so nothing is reported twice.
 * Items in flight on a dead rank are lost with the job, never reported as
 * successful.
 */

/* ---------------------------------------------------------------- errors */

/* X(name, value, description): the codes of this library, -4200..-4299.
 * They travel in df_failure codes like any other; df_mpi_strerror() knows
 * them and the core's. */
#define DF_MPI_ERRNO_MAP(X)                                                    \
    X(ETHREAD_LEVEL, -4201,                                                    \
      "MPI does not provide MPI_THREAD_SERIALIZED")                            \
    X(ETABLE, -4202, "registered function tables differ between ranks")       \
    X(ENONAME, -4203, "function name not registered on the worker")           \
    X(ETOOBIG, -4204, "buffer larger than the pool's max_bytes")               \
    X(EPROTO, -4205, "truncated or malformed message")                        \
    X(EMPI, -4206, "an MPI call failed")                                       \
    X(EROLE, -4207, "call not valid on this rank")

enum {
#define DF_MPI__ERR_ENUM(name, value, text) DF_MPI_##name = (value),
    DF_MPI_ERRNO_MAP(DF_MPI__ERR_ENUM)
#undef DF_MPI__ERR_ENUM
};

/* The description / table name of `code`: this library's codes, else
 * df_strerror() / df_err_name().  Any thread. */
DF_EXPORT const char *df_mpi_strerror(int code);
DF_EXPORT const char *df_mpi_err_name(int code);

/* ---------------------------------------------------------------- buffers */

/*
 * A byte buffer: the value an item's deferred fires with (free it with
 * df_mpi_buf_free, which the result's destructor does), and the input type
 * of df_mpi_map_start().  `data` points into the same allocation; `len`
 * may be 0.  Any thread.
 */
typedef struct df_mpi_buf {
    size_t len;
    unsigned char *data;
} df_mpi_buf;

/* A new buffer of `len` bytes, a copy of `data` (NULL: zeroes).  NULL
 * when out of memory or len > 1 GiB. */
DF_EXPORT df_mpi_buf *df_mpi_buf_new(const void *data, size_t len);
/* Frees a buffer; NULL is ignored.  void * so that it is a df_free_fn. */
DF_EXPORT void df_mpi_buf_free(void *buf);

/* Fixed-size helpers: n values as n little-endian 8-byte words (doubles as
 * their IEEE-754 bits).  _from_ returns a new buffer (NULL: out of
 * memory).  _to_ decodes `len` bytes at `data` into at most `max` values
 * and returns how many it decoded, or DF_MPI_EPROTO when len is not a
 * multiple of 8, DF_EINVAL when more than `max` values are there. */
DF_EXPORT df_mpi_buf *df_mpi_buf_from_i64(const int64_t *v, size_t n);
DF_EXPORT df_mpi_buf *df_mpi_buf_from_f64(const double *v, size_t n);
DF_EXPORT long df_mpi_decode_i64(const void *data, size_t len, int64_t *v,
                                 size_t max);
DF_EXPORT long df_mpi_decode_f64(const void *data, size_t len, double *v,
                                 size_t max);
/* Encodes n values into out (8 * n bytes), the _from_ helpers' layout. */
DF_EXPORT void df_mpi_encode_i64(const int64_t *v, size_t n, void *out);
DF_EXPORT void df_mpi_encode_f64(const double *v, size_t n, void *out);

/* ------------------------------------------------------- context and names */

typedef struct df_mpi df_mpi;
typedef struct df_mpi_task df_mpi_task;

/*
 * A work function, run on a worker rank's thread with the input bytes
 * (borrowed, valid during the call; `in` is not NULL even when len is 0).
 * Return 0 for success, the output being what df_mpi_task_output() or
 * df_mpi_task_reply() set (empty if neither was called); or a non-zero
 * code for failure, with the message given to df_mpi_task_fail() (else
 * df_mpi_strerror(code)).  The code and message reach the master's
 * deferred as a df_failure.  `arg` is the one given to df_mpi_register().
 * It may poll df_mpi_task_cancelled().  It must not call MPI.
 */
typedef int (*df_mpi_fn)(df_mpi_task *t, const void *in, size_t len,
                         void *arg);

/* Initialises MPI with MPI_Init_thread(MPI_THREAD_SERIALIZED) unless the
 * application has done so already, and makes the context *out.
 * DF_MPI_ETHREAD_LEVEL (with one line on stderr) when the provided level is
 * below MPI_THREAD_SERIALIZED: if this call initialised MPI it finalises it
 * again before returning.  DF_MPI_EMPI when MPI fails, DF_ENOMEM.
 * argc / argv may be NULL.  Every rank; the calling thread must be the one
 * that calls MPI_Finalize (through df_mpi_finalize). */
DF_EXPORT int df_mpi_init(int *argc, char ***argv, df_mpi **out);
/* Frees the context and, if df_mpi_init() initialised MPI, calls
 * MPI_Finalize.  DF_EBUSY (nothing done) while a pool made from it
 * exists, and while df_mpi_worker_run() runs on it (a work function that
 * calls it).  NULL: DF_EINVAL.  On a rank that never started a pool or a
 * worker (an error path, say), it first joins the start-up exchange as
 * "leaving", so that ranks waiting in df_mpi_pool_new() or
 * df_mpi_worker_run() return DF_ESTATE instead of hanging; every rank
 * must therefore reach one of the three calls. */
DF_EXPORT int df_mpi_finalize(df_mpi *ctx);
/* This process's rank and the number of ranks (MPI_COMM_WORLD); -1 for a
 * NULL ctx. */
DF_EXPORT int df_mpi_rank(const df_mpi *ctx);
DF_EXPORT int df_mpi_size(const df_mpi *ctx);
/* True on rank 0. */
DF_EXPORT bool df_mpi_is_master(const df_mpi *ctx);

/* Registers fn under `name` (1..200 bytes, copied), with `arg` passed to
 * every call.  Every rank must register the same names before the pool
 * starts (df_mpi_pool_new / df_mpi_worker_run compare a hash of the sorted
 * name list).  DF_EINVAL for a bad name or NULL fn, DF_EBUSY if the name
 * is taken, DF_ESTATE once the pool has started, DF_ENOMEM. */
DF_EXPORT int df_mpi_register(df_mpi *ctx, const char *name, df_mpi_fn fn,
                              void *arg);

/* ------------------------------------------------------- in work functions */

/* The thread running the work function, inside it only. */
/* Sets the output to a copy of len bytes (replacing an earlier one).
 * DF_ENOMEM; DF_MPI_ETOOBIG beyond max_bytes (the task then fails with
 * that code whatever the function returns). */
DF_EXPORT int df_mpi_task_reply(df_mpi_task *t, const void *data, size_t len);
/* Makes the output len bytes long and returns them to be filled (NULL:
 * out of memory, or len beyond max_bytes, which fails the task as above). */
DF_EXPORT void *df_mpi_task_output(df_mpi_task *t, size_t len);
/* Records the failure message (printf format) and returns `code`, for
 * `return df_mpi_task_fail(t, code, ...)`. */
DF_EXPORT int df_mpi_task_fail(df_mpi_task *t, int code, const char *fmt,
                               ...) DF_PRINTF(3, 4);
/* True once the master has cancelled this item (seen by the worker
 * within about 2 ms of the cancel's arrival: df_mpi_worker_run()). */
DF_EXPORT bool df_mpi_task_cancelled(const df_mpi_task *t);
/* The registered name of the function running, and this worker's rank. */
DF_EXPORT const char *df_mpi_task_name(const df_mpi_task *t);
DF_EXPORT int df_mpi_task_rank(const df_mpi_task *t);

/* ---------------------------------------------------------------- workers */

enum {
    /* Run the items on the thread that called df_mpi_worker_run() (needs
     * threads == 1): the default when threads == 1; see below. */
    DF_MPI_INLINE = 1u << 0,
    /* Use a df_pool thread even when threads == 1 (the pool mode). */
    DF_MPI_NO_INLINE = 1u << 1
};

typedef struct df_mpi_worker_options {
    unsigned threads; /* threads running items on this rank, >= 1        */
    unsigned credit;  /* most items the master sends here at once; 0:
                         2 * threads + 2 (one running and one waiting per
                         thread, and two more to cover the master's
                         reaction time, so a thread never waits for it) */
    unsigned flags;   /* DF_MPI_INLINE or DF_MPI_NO_INLINE, or 0          */
} df_mpi_worker_options;
#define DF_MPI_WORKER_OPTIONS_INIT {1, 0, 0}

/* On a rank other than 0: joins the pool start-up check, then runs the
 * items the master sends, `threads` at once, until the master shuts the
 * pool down; returns 0 then.  Returns DF_MPI_ETABLE when the registered
 * names differ from the master's (every rank then gets that error),
 * DF_ESTATE when the master's pool could not start, DF_EINVAL for bad
 * options (threads not in 1..4096, unknown flags, DF_MPI_INLINE with
 * threads != 1 or with DF_MPI_NO_INLINE), DF_MPI_EMPI, DF_ENOMEM; each
 * with one line on stderr (DF_ESTATE too when the master called
 * df_mpi_finalize() without making a pool).  Rank 0: DF_MPI_EROLE.  Once
 * per context.  Two modes:
 *
 * Inline (threads == 1, unless DF_MPI_NO_INLINE): the calling thread runs
 * the items itself, one after the other in the order they arrive: it
 * receives, runs the work function, sends the reply and looks at MPI
 * again, with no other thread and no wake-up per item.  With nothing to
 * run it sleeps between looks at MPI for a backoff of 8 us doubling to
 * 256 us.  While an item runs, a second thread of the library (the
 * sentry, parked while the rank is idle) looks at MPI whenever nobody has
 * for 2 ms: a cancel of the running item sets the flag
 * df_mpi_task_cancelled() reads, a cancel of an item received and not
 * started answers it at once (it never runs).  While the worker runs
 * items, every MPI call on the rank is made under one mutex.  The work
 * function runs on the calling thread, with the application's signal
 * mask there (the sentry blocks every signal).
 *
 * Pool (threads > 1, or DF_MPI_NO_INLINE): the items run on a df_pool of
 * `threads` threads; the calling thread only receives and replies, and
 * between looks at MPI sleeps in poll(2) on its loop, which wakes it as
 * soon as an item finishes: for the backoff above while a thread is idle;
 * for a quarter of an item's mean run time (256 us to 2 ms) while every
 * thread is busy; for 2 ms while items wait in its own queue.
 *
 * In both modes a cancel reaches an item on a worker at most about 2 ms
 * after it arrives there (plus the transfer, plus, for a running item, the
 * work function's next df_mpi_task_cancelled() check). */
DF_EXPORT int df_mpi_worker_run(df_mpi *ctx,
                                const df_mpi_worker_options *opts);

/* ----------------------------------------------------------------- master */

typedef struct df_mpi_pool df_mpi_pool;

enum {
    /* Skip the start-up comparison of the name tables: an item whose name
     * a worker does not know fails with DF_MPI_ENONAME then (for programs
     * that register different sets on purpose). */
    DF_MPI_NO_TABLE_CHECK = 1u << 0
};

typedef struct df_mpi_pool_options {
    size_t max_bytes; /* largest input or output; 0: 64 MiB; <= 1 GiB    */
    unsigned flags;   /* DF_MPI_*                                         */
} df_mpi_pool_options;
#define DF_MPI_POOL_OPTIONS_INIT {0, 0}

typedef struct df_mpi_pool_stats {
    uint64_t submitted;      /* items accepted by submit                  */
    uint64_t completed;      /* items whose deferred fired                */
    uint64_t outstanding;    /* submitted - completed, now                */
    uint64_t max_outstanding;/* the most at once so far                   */
    uint64_t sent;           /* items on worker ranks now (sent, no reply)*/
    uint64_t max_sent;       /* the most at once so far                   */
    uint64_t queued;         /* items waiting on the master for credit    */
    unsigned workers;        /* worker ranks                              */
    unsigned credit;         /* sum of the workers' credits               */
} df_mpi_pool_stats;

/* Rank 0: joins the start-up check with every worker's df_mpi_worker_run
 * and starts the progress thread; *out is the pool, usable on loop's
 * thread.  DF_MPI_ETABLE (one line on stderr naming the ranks) when the
 * name tables differ; DF_EINVAL for bad options or a world of one rank
 * (no workers), DF_MPI_EROLE on another rank, DF_ESTATE if this context
 * has had a pool; DF_MPI_EMPI, DF_ENOMEM.  Whenever the check can be
 * reached (ctx valid, rank 0) the workers learn of a failure here and
 * return from df_mpi_worker_run() with DF_ESTATE, so nothing hangs.
 * Called on the loop's thread, which must be the MPI thread. */
DF_EXPORT int df_mpi_pool_new(df_mpi *ctx, df_loop *loop,
                              const df_mpi_pool_options *opts,
                              df_mpi_pool **out);

/*
 * Runs `name` on a worker rank with a copy of `len` bytes at `in` (in may
 * be NULL when len is 0).  *out fires on the loop thread with a
 * df_mpi_buf * (destructor df_mpi_buf_free) holding the output, or fails
 * with the work function's code and message, or with DF_MPI_ETOOBIG (input
 * or output above max_bytes), DF_MPI_ENONAME (name not registered),
 * DF_MPI_EPROTO (a malformed message), DF_ENOMEM.  Items go to the worker
 * with the most free credit; when every credit is used they wait on the
 * master, in FIFO order (bound them with df_mpi_sem_run or
 * df_mpi_map_start).  Cancelling *out: an item still waiting on the master
 * fails at once with DF_ECANCELLED; one on a worker is cancelled there
 * (df_mpi_task_cancelled() turns true) and *out fails with DF_ECANCELLED
 * only once the worker has replied, its output dropped; until then *out
 * is paused (df_deferred_called() is true, its callbacks wait).  The
 * worker sees the cancel within about 2 ms (df_mpi_worker_run()).
 * DF_ESHUTDOWN after df_mpi_pool_shutdown().  Loop thread.
 */
DF_EXPORT int df_mpi_submit(df_mpi_pool *p, const char *name, const void *in,
                            size_t len, df_deferred **out);

/* df_sem_run() with df_mpi_submit(): takes a token from s, submits, and
 * gives the token back once the worker has replied (also when cancelled),
 * so at most df_sem_limit(s) items are in flight over the whole cluster.
 * The input is copied now.  *out fires as df_mpi_submit's would (with the
 * code of a submit that fails).  Loop thread. */
DF_EXPORT int df_mpi_sem_run(df_sem *s, df_mpi_pool *p, const char *name,
                             const void *in, size_t len, df_deferred **out);

/* df_map_start() whose items run `name` on the workers: opts->next must
 * give items that are df_mpi_buf * (the input bytes; the map frees them
 * with the item_free it is given, normally df_mpi_buf_free), opts->pool,
 * work and call must be NULL, and on_result receives each item with a
 * result as from df_mpi_submit.  opts->limit bounds the items in flight on
 * the whole cluster; the rest is df_map_start's contract (opts->arg goes
 * to on_result).  DF_EINVAL as df_map_start, and for a NULL name.  Loop
 * thread. */
DF_EXPORT int df_mpi_map_start(df_mpi_pool *p, const char *name,
                               const df_map_options *opts, df_map **map,
                               df_deferred **done);

/*
 * Stops accepting items (later submits: DF_ESHUTDOWN).  DF_POOL_DRAIN lets
 * every queued and running item finish; DF_POOL_CANCEL fails the items
 * waiting on the master with DF_ECANCELLED at once and cancels those on
 * workers.  Once every item has fired, the workers are told to stop (they
 * return from df_mpi_worker_run), the progress thread ends, and *done
 * fires with NULL (or fails with DF_MPI_EMPI if MPI failed).  Run the loop
 * until then.  A second call gives DF_ESTATE.  Loop thread.
 */
DF_EXPORT int df_mpi_pool_shutdown(df_mpi_pool *p, int mode,
                                   df_deferred **done);
/* Frees the pool: DF_EBUSY until the shutdown's done has fired.  NULL
 * ignored (0).  Loop thread. */
DF_EXPORT int df_mpi_pool_free(df_mpi_pool *p);
DF_EXPORT int df_mpi_pool_get_stats(const df_mpi_pool *p,
                                    df_mpi_pool_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* DEFERRED_MPI_H */
