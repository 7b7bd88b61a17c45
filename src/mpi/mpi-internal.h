/* SPDX-License-Identifier: MIT */
/* libdeferred-mpi internals: the context, the name table and the wire format. */
#ifndef DF_MPI_INTERNAL_H
#define DF_MPI_INTERNAL_H

#include <mpi.h>
#include <stdint.h>

#include <deferred-mpi.h>

#define DF_MPI__MAX_NAME 200
#define DF_MPI__DEFAULT_MAX ((size_t)64 << 20)
#define DF_MPI__HARD_MAX ((size_t)1 << 30)

/* Message tags on the library's own communicator.  Master to worker:
 * REQ (one item), CANCEL (an item id), STOP (end of the pool).  Worker to
 * master: REP (one item's outcome).  A worker receives with MPI_ANY_TAG,
 * so it sees the master's messages in the order they were sent. */
enum { DF_MPI__TAG_REQ = 101, DF_MPI__TAG_CANCEL, DF_MPI__TAG_STOP,
       DF_MPI__TAG_REP };

/* REQ: this header, then name_len bytes of name, then in_len bytes. */
typedef struct df_mpi__req_hdr {
    uint64_t id;
    uint32_t name_len;
    uint32_t reserved;
    uint64_t in_len;
} df_mpi__req_hdr;

/* REP: this header, then msg_len bytes of failure message (code != 0),
 * then out_len bytes of output (code == 0).  run_ns is how long the work
 * function ran (wall time on the thread that ran it), 0 for an item that did not
 * run: the master paces its polling by it (see master.c). */
typedef struct df_mpi__rep_hdr {
    uint64_t id;
    int32_t code;
    uint32_t msg_len;
    uint64_t out_len;
    uint64_t run_ns;
} df_mpi__rep_hdr;

/* The id a worker puts on the reply to a message it could not parse. */
#define DF_MPI__NO_ID UINT64_MAX

typedef struct df_mpi__entry {
    char *name;
    size_t len;
    df_mpi_fn fn;
    void *arg;
} df_mpi__entry;

/* The per-process context.  Touched only by the MPI thread (the one that
 * called df_mpi_init), except `tab`, which is read-only once `started`. */
struct df_mpi {
    MPI_Comm comm;    /* our duplicate of MPI_COMM_WORLD */
    int rank, size;
    bool we_init;     /* df_mpi_init called MPI_Init_thread */
    bool started;     /* a pool or worker has started: table frozen */
    int pools;        /* live pools made from this context (0 or 1) */
    bool working;     /* df_mpi_worker_run is running: a work function
                         calling df_mpi_finalize gets DF_EBUSY (set before
                         any item runs, cleared after none can) */
    df_mpi__entry *tab; /* sorted by name once started */
    size_t n, cap;
    uint64_t hash;    /* of the sorted names, once started */
};

/* Start-up exchange, one row per rank. */
enum { DF_MPI__ROW_HASH, DF_MPI__ROW_CREDIT, DF_MPI__ROW_MAX,
       DF_MPI__ROW_FLAGS, DF_MPI__ROW_STATUS, DF_MPI__ROW_THREADS,
       DF_MPI__ROW_N };

/* The longest the worker's main thread sleeps without looking at MPI (in
 * the inline mode, the sentry's period while an item runs), and the
 * longest the master's progress thread sleeps between polls while replies
 * are awaited: a cancel reaches a worker's item at most about this late
 * (plus the transfer).  See worker.c and master.c. */
#define DF_MPI__LONG_SLEEP_US 2000

/* The status of a rank that joins the exchange from df_mpi_finalize. */
#define DF_MPI__LEAVING DF_ESHUTDOWN

/* Freezes the table (sorts it, hashes it), then exchanges rows with every
 * rank (MPI_Allgather on ctx->comm).  `mine` is this rank's row; on return
 * *all (malloc'd, size * ROW_N) holds everybody's.  Returns 0 when the
 * pool may start, else this rank's code, having printed why. */
int df_mpi__start(df_mpi *ctx, uint64_t mine[DF_MPI__ROW_N], uint64_t **all);
/* The entry registered as name[0..len), or NULL.  Table frozen. */
const df_mpi__entry *df_mpi__lookup(const df_mpi *ctx, const char *name,
                                    size_t len);
/* A buffer with room for `len` bytes, the df_mpi_buf header in front. */
df_mpi_buf *df_mpi__buf_alloc(size_t len);

/* Test hook: the next item df_mpi_submit sends leaves off its last
 * `bytes` bytes, so that the worker sees a truncated message. */
void df_mpi__pool_truncate_next(df_mpi_pool *p, size_t bytes);

#endif /* DF_MPI_INTERNAL_H */
