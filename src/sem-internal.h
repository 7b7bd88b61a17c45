/* SPDX-License-Identifier: MIT */
/* A semaphore's pool jobs: waiters of its one line that run on a pool and
 * hand their token on from the worker (used by df_sem_run_in_pool and the
 * map). */
#ifndef DF_SEM_INTERNAL_H
#define DF_SEM_INTERNAL_H

#include "pool-internal.h"

/* Every waiter of a semaphore's line starts with a job's head (sem.c):
 * owner is its semaphore. */
typedef df__job_head df__waiter;

typedef struct df__sem_job df__sem_job;
/* Loop thread: the job is over and its token is back (or went on to the
 * next job); r is its result, owned by the callee: work's result, or a
 * failure (DF_ECANCELLED: cancelled; DF_ESHUTDOWN: its pool stopped before
 * it got a token).  The semaphore has forgotten the job.  One function per
 * semaphore (df_sem_run_in_pool's, or the map's: df__sem_new). */
typedef void (*df__sem_job_fn)(df__sem_job *sj, df_result r);

/* A pool job that takes a token of its semaphore (h.owner) first; it
 * waits in the semaphore's line by its head. */
struct df__sem_job {
    df__job job;
};

/* Loop thread.  Takes a free token and starts the job on p, or puts it at
 * the end of s's line.  p must take work.  0, or DF_ENOMEM (nothing
 * changed).  Runs no user code. */
int df__sem_job_run(df_sem *s, df_pool *p, df__sem_job *sj,
                    df_work_fn work, void *arg);
/* Loop thread.  df__sem_job_run may hold a job back from the workers
 * (runs of at most 64, and only while 128
 * or more are in line) so as to put a run of them on the line at once:
 * this puts the held ones there.  Call it before the loop thread may go
 * idle (the map has it called at the end of the loop's turn, through
 * df__loop_at_turn_end, after every pump).  Anything that reads the
 * line on the loop thread (a token given back, a cancel, another waiter
 * joining) puts them there first, so the order stays exact. */
void df__sem_release_held(df_sem *s);
/* Loop thread.  Cancels the job: waiting, it leaves the line and finishes
 * now with DF_ECANCELLED; queued on its pool, likewise, after giving its
 * token back; running, df_work_cancelled() turns true and it finishes
 * with DF_ECANCELLED once work has returned.  May run user code. */
void df__sem_job_cancel(df__sem_job *sj);

/* A semaphore for the library's own use (the map): not counted among the
 * loop's objects, freed with df__sem_drop (deferred while it dispatches);
 * its jobs end with `finish`. */
int df__sem_new(df_loop *loop, unsigned tokens, df__sem_job_fn finish,
                df_sem **out);
void df__sem_drop(df_sem *s);

#endif /* DF_SEM_INTERNAL_H */
