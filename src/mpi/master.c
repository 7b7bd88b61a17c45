/* SPDX-License-Identifier: MIT */
/* libdeferred-mpi: the master's pool, its progress thread and the helpers. */
#include "mpi-internal.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/*
 * Two threads share a pool.
 *
 * The loop thread owns the items and the scheduling: which items wait on
 * the master (the FIFO `queue`), which rank each sent item is on, how much
 * of each rank's credit is used, the keep-alive timer, the shutdown.  It
 * never calls MPI.
 *
 * The progress thread owns every MPI call.  It takes send orders from the
 * outbox (under `mu`), posts them with MPI_Isend, tests them, receives
 * replies (MPI_Improbe + MPI_Mrecv) and hands them to the loop thread
 * through the inbox, with one df_loop_call_from_thread per batch (posted
 * when the inbox goes from empty to non-empty).  With nothing in flight it
 * waits on `cv` with no timeout, so an idle pool costs no CPU; with
 * replies awaited it polls MPI (an Open MPI blocking receive would spin a
 * core), sleeping on `cv` between polls.  A new order wakes it at once.
 * How long it sleeps is the pace the loop thread sets (`pace_ns`):
 *   - while some rank has free credit (nothing waits on the master), a
 *     reply may let the user submit the next item at once: a backoff that
 *     doubles from 8 us to 256 us and goes back to 0 as soon as anything
 *     happens;
 *   - while every rank is at full credit, a reply matters only to refill
 *     its rank, and a rank r with credit c_r and t_r threads still holds
 *     c_r - 1 items when it replies: its threads stay busy for about
 *     (c_r - t_r) * S_r / t_r after the reply, S_r being the mean run time
 *     of its items (each reply carries the item's run time).  The thread
 *     then sleeps a quarter of the smallest such margin over the ranks,
 *     fixed (no doubling), when that is at least 64 us, and at most
 *     DF_MPI__LONG_SLEEP_US (2 ms): one or two wake-ups per reply instead
 *     of a backoff restarted at 8 us after each (6 to 7 on 1 ms items).
 *     The other three quarters are for the hops that follow (the loop
 *     thread, the send, the worker's receive), each of which waits for a
 *     core on a busy machine: with half the margin, the workers ran dry
 *     under load.  With the default credit (2 x threads + 2) the margin
 *     is (t_r + 2) / t_r items' run time: 3 items for an inline worker
 *     (one thread), 2 for two threads.
 * Sleeps and wake-ups are costly here (context switches, hypervisor
 * exits), and the ranks compete with the master for the same cores when
 * the job is oversubscribed: bench/RESULTS.md has the measurements.
 *
 * An item's life (loop thread):
 *
 *   submit -> QUEUED (in `queue`, no rank) -> SENT (on rank r, order in
 *   the outbox or on the wire) -> reply delivered -> fired, freed
 *
 *   cancel while QUEUED: removed, fails with DF_ECANCELLED at once.
 *   cancel while SENT: a CANCEL order goes to rank r; the deferred is
 *     paused, then failed by the library with DF_ECANCELLED, and unpaused
 *     when the reply arrives (its output dropped).  So a token held for
 *     the item comes back only once the worker is done.
 *
 * Lock order: `mu` is the only lock; no user code and no MPI call runs
 * under it.
 */

#define BACKOFF_MIN_US 8
#define BACKOFF_MAX_US 256
#define PACE_MIN_US 64

enum { OP_REQ, OP_CANCEL };

/* A send order, and then a send in progress (progress thread). */
typedef struct op {
    struct op *next;
    int kind;
    int rank;
    unsigned char *buf; /* REQ: the message; CANCEL: points at id */
    size_t len;
    uint64_t id;
    MPI_Request req;
} op;

/* A received reply, from the progress thread to the loop thread.  `buf`
 * is a df_mpi_buf allocation whose bytes are the whole message. */
typedef struct inmsg {
    struct inmsg *next;
    int rank;
    df_mpi_buf *buf;
} inmsg;

typedef struct item {
    struct item *prev, *next; /* in `queue` while QUEUED */
    df_mpi_pool *p;
    uint64_t id;              /* slot | generation << 32 */
    df_deferred *d;           /* our reference */
    unsigned char *msg;       /* the REQ message until sent */
    size_t msg_len;
    int rank;                 /* -1 while QUEUED */
    bool cancelled;           /* a CANCEL went to the worker */
} item;

struct df_mpi_pool {
    df_mpi *ctx;
    df_loop *loop;
    size_t max_bytes;
    unsigned flags;
    int size;                 /* ranks; workers are 1..size-1 */

    /* Loop thread only. */
    unsigned *credit;         /* [rank] credit, 0 for rank 0 */
    unsigned *used;           /* [rank] items sent and not answered */
    int next_rank;            /* round-robin start of the credit search */
    item **slots;             /* id's low 32 bits index this */
    uint32_t *slot_gen;
    uint32_t nslots;
    uint32_t *free_slots;
    uint32_t nfree;
    item *qhead, *qtail;      /* QUEUED items, FIFO */
    df_mpi_pool_stats st;
    df_timer *keep;           /* keeps df_loop_run alive while in flight */
    bool shutting, stop_sent, finished, thread_started;
    df_deferred *done;        /* shutdown's deferred; our reference */
    size_t truncate_next;     /* test hook */
    pthread_t owner;          /* the loop thread (made the pool) */
    unsigned *threads;        /* [rank] pool threads, 0 for rank 0 */
    uint64_t *mean_run_ns;    /* [rank] running mean of item run times */
    uint64_t pace_set;        /* the last pace_ns published */

    /* Shared, under mu. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    op *out_head, *out_tail;  /* orders for the progress thread */
    inmsg *in_head, *in_tail; /* replies for the loop thread */
    bool posted;              /* a deliver call is queued on the loop */
    bool stop_req;            /* send STOP to every worker, then end */
    bool exited;              /* the progress thread has finished */
    uint64_t pace_ns;         /* the sleep while saturated, 0: backoff */
    pthread_t thread;
};

static void deliver(void *arg, int status);

/* The pool belongs to the thread that made it (the loop's). */
static bool wrong_thread(const df_mpi_pool *p)
{
    return !pthread_equal(pthread_self(), p->owner);
}

/* ------------------------------------------------------- progress thread */

static void fatal_mpi(df_mpi_pool *p, const char *what, int rc)
{
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, s, &n) != MPI_SUCCESS)
        snprintf(s, sizeof s, "error %d", rc);
    /* The communicator is in an unknown state: which items reached which
     * worker cannot be known, so nothing can be reported truthfully.
     * End the job as MPI's default error handler would. */
    fprintf(stderr, "df_mpi: master: %s failed: %s; aborting the job\n",
            what, s);
    MPI_Abort(p->ctx->comm, 1);
}

static void post_inbox(df_mpi_pool *p, inmsg *head, inmsg *tail)
{
    bool post = false;
    pthread_mutex_lock(&p->mu);
    if (p->in_tail != NULL)
        p->in_tail->next = head;
    else
        p->in_head = head;
    p->in_tail = tail;
    if (!p->posted) {
        p->posted = true;
        post = true;
    }
    pthread_mutex_unlock(&p->mu);
    if (post && df_loop_call_from_thread(p->loop, deliver, p) != 0) {
        fprintf(stderr, "df_mpi: master: cannot post to the loop; aborting "
                        "the job\n");
        MPI_Abort(p->ctx->comm, 1);
    }
}

static void add_ns(struct timespec *ts, long ns)
{
    ts->tv_nsec += ns;
    while (ts->tv_nsec >= 1000000000L) {
        ts->tv_nsec -= 1000000000L;
        ts->tv_sec++;
    }
}

static void *progress_main(void *arg)
{
    df_mpi_pool *p = arg;
    MPI_Comm comm = p->ctx->comm;
    op *sending = NULL;  /* Isends not yet complete */
    uint64_t awaiting = 0; /* REQs sent whose REP has not come */
    unsigned backoff = 0;

    /* Linux rounds a sleep up by the thread's timer slack, 50 us by
     * default, which would make the shortest backoffs 60 us: this thread
     * sleeps briefly on purpose. */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        op *orders = p->out_head;
        p->out_head = p->out_tail = NULL;
        bool stop = p->stop_req;
        pthread_mutex_unlock(&p->mu);

        bool any = orders != NULL;
        while (orders != NULL) {
            op *o = orders;
            orders = o->next;
            int tag = o->kind == OP_REQ ? DF_MPI__TAG_REQ : DF_MPI__TAG_CANCEL;
            int rc = MPI_Isend(o->buf, (int)o->len, MPI_BYTE, o->rank, tag,
                               comm, &o->req);
            if (rc != MPI_SUCCESS)
                fatal_mpi(p, "MPI_Isend", rc);
            if (o->kind == OP_REQ)
                awaiting++;
            o->next = sending;
            sending = o;
        }
        for (op **pp = &sending; *pp != NULL;) {
            op *o = *pp;
            int flag = 0;
            int rc = MPI_Test(&o->req, &flag, MPI_STATUS_IGNORE);
            if (rc != MPI_SUCCESS)
                fatal_mpi(p, "MPI_Test", rc);
            if (flag) {
                *pp = o->next;
                if (o->kind == OP_REQ)
                    free(o->buf);
                free(o);
                any = true;
            } else {
                pp = &o->next;
            }
        }
        inmsg *head = NULL, *tail = NULL;
        for (int k = 0; k < 256 && awaiting > 0; k++) {
            int flag = 0, count = 0;
            MPI_Message m;
            MPI_Status st;
            int rc = MPI_Improbe(MPI_ANY_SOURCE, DF_MPI__TAG_REP, comm, &flag,
                                 &m, &st);
            if (rc != MPI_SUCCESS)
                fatal_mpi(p, "MPI_Improbe", rc);
            if (!flag)
                break;
            MPI_Get_count(&st, MPI_BYTE, &count);
            inmsg *im = malloc(sizeof *im);
            df_mpi_buf *b = df_mpi__buf_alloc(count > 0 ? (size_t)count : 0);
            if (im == NULL || b == NULL) {
                fprintf(stderr, "df_mpi: master: out of memory for a reply "
                                "of %d bytes; aborting the job\n", count);
                MPI_Abort(comm, 1);
            }
            rc = MPI_Mrecv(b->data, count, MPI_BYTE, &m, &st);
            if (rc != MPI_SUCCESS)
                fatal_mpi(p, "MPI_Mrecv", rc);
            im->next = NULL;
            im->rank = st.MPI_SOURCE;
            im->buf = b;
            if (tail != NULL)
                tail->next = im;
            else
                head = im;
            tail = im;
            awaiting--;
            any = true;
        }
        if (head != NULL)
            post_inbox(p, head, tail);

        if (stop && sending == NULL && awaiting == 0) {
            pthread_mutex_lock(&p->mu);
            bool more = p->out_head != NULL;
            pthread_mutex_unlock(&p->mu);
            if (!more)
                break;
        }

        pthread_mutex_lock(&p->mu);
        if (any || p->out_head != NULL || p->stop_req != stop) {
            backoff = 0;
            continue;
        }
        if (awaiting == 0 && sending == NULL) {
            /* Idle: nothing can arrive that we wait for. */
            pthread_cond_wait(&p->cv, &p->mu);
        } else {
            long ns;
            if (p->pace_ns > 0 && sending == NULL) {
                /* Saturated: see the comment at the top. */
                ns = (long)p->pace_ns;
                backoff = 0;
            } else {
                /* A send in progress may need polling to complete (a
                 * large message), or a reply may be wanted at once. */
                backoff = backoff ? 2 * backoff : BACKOFF_MIN_US;
                if (backoff > BACKOFF_MAX_US)
                    backoff = BACKOFF_MAX_US;
                ns = (long)backoff * 1000;
            }
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            add_ns(&ts, ns);
            pthread_cond_timedwait(&p->cv, &p->mu, &ts);
        }
    }

    /* Every item has been answered and every send completed: release the
     * workers.  STOP is empty, so these sends complete at once. */
    for (int r = 1; r < p->size; r++) {
        int rc = MPI_Send(NULL, 0, MPI_BYTE, r, DF_MPI__TAG_STOP, comm);
        if (rc != MPI_SUCCESS)
            fatal_mpi(p, "MPI_Send", rc);
    }
    pthread_mutex_lock(&p->mu);
    p->exited = true;
    bool post = !p->posted;
    p->posted = true;
    pthread_mutex_unlock(&p->mu);
    if (post && df_loop_call_from_thread(p->loop, deliver, p) != 0) {
        fprintf(stderr, "df_mpi: master: cannot post to the loop; aborting "
                        "the job\n");
        MPI_Abort(comm, 1);
    }
    return NULL;
}

/* Loop thread: hands an order to the progress thread. */
static void push_order(df_mpi_pool *p, op *o)
{
    o->next = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->out_tail != NULL)
        p->out_tail->next = o;
    else
        p->out_head = o;
    p->out_tail = o;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

/* ------------------------------------------------------------ items */

static void keep_fn(void *arg, int status);

/* Keeps a far timer pending while anything is in flight, so that
 * df_loop_run() and df_loop_run_until() wait for the workers. */
static void update_keepalive(df_mpi_pool *p)
{
    bool need = p->st.outstanding > 0 || (p->stop_sent && !p->finished);
    if (need && p->keep == NULL) {
        if (df_loop_call_later(p->loop, UINT64_C(3600) * 1000000000u,
                               keep_fn, p, &p->keep) != 0)
            p->keep = NULL; /* out of memory: df_loop_run may return early */
    } else if (!need && p->keep != NULL) {
        df_timer_cancel(p->keep);
        p->keep = NULL;
    }
}

static void keep_fn(void *arg, int status)
{
    df_mpi_pool *p = arg;
    p->keep = NULL;
    if (status == 0)
        update_keepalive(p);
}

static int slot_take(df_mpi_pool *p, item *it)
{
    if (p->nfree == 0) {
        uint32_t n = p->nslots ? 2 * p->nslots : 16;
        if (n > (1u << 30))
            return DF_ENOMEM;
        item **s = realloc(p->slots, n * sizeof *s);
        if (s == NULL)
            return DF_ENOMEM;
        p->slots = s;
        uint32_t *g = realloc(p->slot_gen, n * sizeof *g);
        if (g == NULL)
            return DF_ENOMEM;
        p->slot_gen = g;
        uint32_t *f = realloc(p->free_slots, n * sizeof *f);
        if (f == NULL)
            return DF_ENOMEM;
        p->free_slots = f;
        for (uint32_t k = n; k > p->nslots; k--) {
            p->slots[k - 1] = NULL;
            p->slot_gen[k - 1] = 0;
            p->free_slots[p->nfree++] = k - 1;
        }
        p->nslots = n;
    }
    uint32_t s = p->free_slots[--p->nfree];
    p->slot_gen[s]++;
    p->slots[s] = it;
    it->id = (uint64_t)s | (uint64_t)p->slot_gen[s] << 32;
    return 0;
}

static void slot_give(df_mpi_pool *p, item *it)
{
    uint32_t s = (uint32_t)it->id;
    p->slots[s] = NULL;
    p->free_slots[p->nfree++] = s;
}

static item *slot_find(df_mpi_pool *p, uint64_t id)
{
    uint32_t s = (uint32_t)id;
    if (s >= p->nslots || p->slots[s] == NULL ||
        p->slot_gen[s] != (uint32_t)(id >> 32))
        return NULL;
    return p->slots[s];
}

/* Forgets an item that has left the pool (its deferred fires next). */
static void item_retire(df_mpi_pool *p, item *it)
{
    slot_give(p, it);
    free(it->msg);
    it->msg = NULL;
    p->st.outstanding--;
    p->st.completed++;
}

/* Sends queued items to ranks with free credit, FIFO. */
static void schedule(df_mpi_pool *p)
{
    while (p->qhead != NULL) {
        int best = -1;
        unsigned best_free = 0;
        for (int k = 0; k < p->size - 1; k++) {
            int r = 1 + (p->next_rank + k) % (p->size - 1);
            unsigned fr = p->credit[r] - p->used[r];
            if (fr > best_free) {
                best_free = fr;
                best = r;
            }
        }
        if (best < 0)
            return;
        op *o = malloc(sizeof *o);
        if (o == NULL)
            return; /* tried again at the next submit or reply */
        p->next_rank = best % (p->size - 1);
        item *it = p->qhead;
        p->qhead = it->next;
        if (p->qhead != NULL)
            p->qhead->prev = NULL;
        else
            p->qtail = NULL;
        it->next = it->prev = NULL;
        p->st.queued--;
        it->rank = best;
        p->used[best]++;
        if (++p->st.sent > p->st.max_sent)
            p->st.max_sent = p->st.sent;
        o->kind = OP_REQ;
        o->rank = best;
        o->buf = it->msg;
        o->len = it->msg_len;
        o->id = it->id;
        it->msg = NULL;
        push_order(p, o);
    }
}

/* Publishes the progress thread's pace (see the comment at the top):
 * nonzero only while every rank is at full credit and each rank's margin
 * is known.  O(ranks), once per batch of replies and per submit that
 * changes the saturation; the lock is taken only when the pace changes
 * (rounded to 16 us, so a steady stream rarely changes it). */
static void update_pace(df_mpi_pool *p)
{
    uint64_t pace = 0;
    if (p->st.sent == p->st.credit) {
        uint64_t margin = UINT64_MAX;
        for (int r = 1; r < p->size && margin > 0; r++) {
            unsigned t = p->threads[r] ? p->threads[r] : 1;
            if (p->credit[r] <= t || p->mean_run_ns[r] == 0) {
                margin = 0; /* no item waits there, or S_r unknown */
                break;
            }
            uint64_t m = (uint64_t)(p->credit[r] - t) * p->mean_run_ns[r] / t;
            if (m < margin)
                margin = m;
        }
        pace = margin / 4;
        pace -= pace % 16000;
        if (pace < (uint64_t)PACE_MIN_US * 1000)
            pace = 0;
        else if (pace > (uint64_t)DF_MPI__LONG_SLEEP_US * 1000)
            pace = (uint64_t)DF_MPI__LONG_SLEEP_US * 1000;
    }
    if (pace != p->pace_set) {
        p->pace_set = pace;
        pthread_mutex_lock(&p->mu);
        p->pace_ns = pace;
        pthread_mutex_unlock(&p->mu);
    }
}

static void maybe_stop(df_mpi_pool *p)
{
    if (!p->shutting || p->stop_sent || p->st.outstanding > 0)
        return;
    p->stop_sent = true;
    pthread_mutex_lock(&p->mu);
    p->stop_req = true;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    update_keepalive(p);
}

/* Fires an item's deferred with a reply's outcome. */
static void complete(df_mpi_pool *p, item *it, df_mpi_buf *b)
{
    df_mpi__rep_hdr h;
    memcpy(&h, b->data, sizeof h);
    df_deferred *d = it->d;
    bool cancelled = it->cancelled;
    item_retire(p, it);
    free(it);
    if (cancelled) {
        /* The library failed it with DF_ECANCELLED at cancel time; the
         * worker's outcome is dropped, as for a thread pool job. */
        df_mpi_buf_free(b);
        df_deferred_unpause(d);
    } else if (sizeof h + (uint64_t)h.msg_len + h.out_len != b->len) {
        fprintf(stderr, "df_mpi: master: malformed reply of %zu bytes\n",
                b->len);
        df_mpi_buf_free(b);
        df_deferred_errback(d, df_failure_new(p->loop, DF_MPI_EPROTO,
                                              "malformed reply from a "
                                              "worker"));
    } else if (h.code == 0) {
        /* The message becomes the result: move the bytes to the front. */
        size_t off = sizeof h + h.msg_len;
        memmove(b->data, b->data + off, h.out_len);
        b->len = h.out_len;
        if (df_deferred_callback(d, b, df_mpi_buf_free) != 0)
            df_mpi_buf_free(b);
    } else {
        df_failure *f =
            h.msg_len > 0
                ? df_failure_new(p->loop, h.code, "%.*s", (int)h.msg_len,
                                 (const char *)b->data + sizeof h)
                : df_failure_new(p->loop, h.code, NULL);
        df_mpi_buf_free(b);
        if (df_deferred_errback(d, f) != 0)
            df_failure_unref(f);
    }
    df_deferred_unref(d);
}

/* Loop thread: replies from the progress thread, or its end. */
static void deliver(void *arg, int status)
{
    df_mpi_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    inmsg *in = p->in_head;
    p->in_head = p->in_tail = NULL;
    p->posted = false;
    bool exited = p->exited;
    pthread_mutex_unlock(&p->mu);

    /* First the bookkeeping of the whole batch (credits back, queued items
     * sent), then the user's callbacks, which may submit or shut down. */
    inmsg *ready = NULL, **tailp = &ready;
    while (in != NULL) {
        inmsg *im = in;
        in = im->next;
        im->next = NULL;
        df_mpi__rep_hdr h;
        item *it = NULL;
        if (im->buf->len >= sizeof h) {
            memcpy(&h, im->buf->data, sizeof h);
            it = slot_find(p, h.id);
        }
        if (it == NULL || it->rank != im->rank) {
            /* Cannot happen but through a corrupt message: say so. */
            fprintf(stderr, "df_mpi: master: reply of %zu bytes from rank "
                            "%d matches no item in flight; dropped\n",
                    im->buf->len, im->rank);
            if (im->buf->len >= sizeof h && h.code != 0 &&
                h.msg_len <= im->buf->len - sizeof h)
                fprintf(stderr, "df_mpi: master: it said: %.*s\n",
                        (int)h.msg_len,
                        (const char *)im->buf->data + sizeof h);
            df_mpi_buf_free(im->buf);
            free(im);
            continue;
        }
        p->used[it->rank]--;
        p->st.sent--;
        if (h.run_ns > 0) {
            /* A running mean over about the last 8 items of the rank. */
            uint64_t *m = &p->mean_run_ns[it->rank];
            *m = *m == 0 ? h.run_ns : *m - *m / 8 + h.run_ns / 8;
        }
        it->rank = 0; /* answered; never matched again (slot goes next) */
        *tailp = im;
        tailp = &im->next;
    }
    schedule(p);
    update_pace(p);
    while (ready != NULL) {
        inmsg *im = ready;
        ready = im->next;
        df_mpi__rep_hdr h;
        memcpy(&h, im->buf->data, sizeof h);
        item *it = slot_find(p, h.id);
        if (status != 0) {
            /* The loop is being freed with the pool alive: nothing to run
             * the callbacks on. */
            df_mpi_buf_free(im->buf);
        } else {
            complete(p, it, im->buf);
        }
        free(im);
    }
    if (exited && !p->finished) {
        pthread_join(p->thread, NULL);
        p->thread_started = false;
        p->finished = true;
        update_keepalive(p);
        df_deferred *done = p->done;
        p->done = NULL;
        df_deferred_callback(done, NULL, NULL);
        df_deferred_unref(done);
        return;
    }
    maybe_stop(p);
    update_keepalive(p);
}

static void canceller(df_deferred *d, void *arg)
{
    item *it = arg;
    df_mpi_pool *p = it->p;
    if (it->rank < 0) {
        /* Still on the master: gone at once. */
        if (it->prev != NULL)
            it->prev->next = it->next;
        else
            p->qhead = it->next;
        if (it->next != NULL)
            it->next->prev = it->prev;
        else
            p->qtail = it->prev;
        p->st.queued--;
        item_retire(p, it);
        free(it);
        /* The caller of df_deferred_cancel holds a reference. */
        df_deferred_unref(d);
        maybe_stop(p);
        update_keepalive(p);
        return;
    }
    if (it->cancelled)
        return;
    if (it->rank == 0) {
        /* Answered, its completion runs later in this very dispatch. */
        it->cancelled = true;
        df_deferred_pause(d);
        return;
    }
    op *o = malloc(sizeof *o);
    if (o == NULL) {
        /* Cannot tell the worker: the item runs to its end and its
         * outcome is kept (a cancel is a request, as in Twisted). */
        return;
    }
    it->cancelled = true;
    df_deferred_pause(d);
    o->kind = OP_CANCEL;
    o->rank = it->rank;
    o->id = it->id;
    o->buf = (unsigned char *)&o->id;
    o->len = sizeof o->id;
    push_order(p, o);
}

/* Builds the REQ message of an item. */
static unsigned char *build_req(const char *name, size_t name_len,
                                const void *in, size_t len, size_t *n)
{
    *n = sizeof(df_mpi__req_hdr) + name_len + len;
    unsigned char *m = malloc(*n);
    if (m == NULL)
        return NULL;
    df_mpi__req_hdr h = {0, (uint32_t)name_len, 0, len};
    memcpy(m, &h, sizeof h);
    memcpy(m + sizeof h, name, name_len);
    if (len > 0)
        memcpy(m + sizeof h + name_len, in, len);
    return m;
}

int df_mpi_submit(df_mpi_pool *p, const char *name, const void *in,
                  size_t len, df_deferred **out)
{
    if (p == NULL || name == NULL || out == NULL || (in == NULL && len > 0))
        return DF_EINVAL;
    size_t name_len = strlen(name);
    if (name_len == 0 || name_len > DF_MPI__MAX_NAME)
        return DF_EINVAL;
    if (wrong_thread(p))
        return DF_EWRONG_THREAD;
    if (p->shutting)
        return DF_ESHUTDOWN;
    if (len > p->max_bytes)
        return df_fail(p->loop,
                       df_failure_new(p->loop, DF_MPI_ETOOBIG,
                                      "input of %zu bytes for '%s' exceeds "
                                      "max_bytes %zu", len, name,
                                      p->max_bytes),
                       out);
    if (!(p->flags & DF_MPI_NO_TABLE_CHECK) &&
        df_mpi__lookup(p->ctx, name, name_len) == NULL)
        return df_fail(p->loop,
                       df_failure_new(p->loop, DF_MPI_ENONAME,
                                      "function '%s' is not registered",
                                      name),
                       out);
    item *it = calloc(1, sizeof *it);
    if (it == NULL)
        return DF_ENOMEM;
    it->p = p;
    it->rank = -1;
    it->msg = build_req(name, name_len, in, len, &it->msg_len);
    if (it->msg == NULL) {
        free(it);
        return DF_ENOMEM;
    }
    int rc = slot_take(p, it);
    if (rc != 0) {
        free(it->msg);
        free(it);
        return rc;
    }
    memcpy(it->msg, &it->id, sizeof it->id);
    if (p->truncate_next > 0) {
        it->msg_len -= p->truncate_next < it->msg_len ? p->truncate_next
                                                      : it->msg_len;
        p->truncate_next = 0;
    }
    df_deferred *d;
    rc = df_deferred_new_cancellable(p->loop, canceller, it, &d);
    if (rc != 0) {
        slot_give(p, it);
        free(it->msg);
        free(it);
        return rc;
    }
    it->d = df_deferred_ref(d);
    p->st.submitted++;
    if (++p->st.outstanding > p->st.max_outstanding)
        p->st.max_outstanding = p->st.outstanding;
    it->prev = p->qtail;
    if (p->qtail != NULL)
        p->qtail->next = it;
    else
        p->qhead = it;
    p->qtail = it;
    p->st.queued++;
    schedule(p);
    update_pace(p);
    update_keepalive(p);
    *out = d;
    return 0;
}

void df_mpi__pool_truncate_next(df_mpi_pool *p, size_t bytes)
{
    p->truncate_next = bytes;
}

/* ----------------------------------------------------------- pool life */

int df_mpi_pool_new(df_mpi *ctx, df_loop *loop,
                    const df_mpi_pool_options *opts, df_mpi_pool **out)
{
    if (ctx == NULL || loop == NULL || out == NULL)
        return DF_EINVAL;
    *out = NULL;
    if (ctx->rank != 0)
        return DF_MPI_EROLE;
    if (ctx->started)
        return DF_ESTATE;
    df_mpi_pool_options o = DF_MPI_POOL_OPTIONS_INIT;
    if (opts != NULL)
        o = *opts;
    int status = 0;
    if (o.max_bytes == 0)
        o.max_bytes = DF_MPI__DEFAULT_MAX;
    if (o.max_bytes > DF_MPI__HARD_MAX || (o.flags & ~DF_MPI_NO_TABLE_CHECK))
        status = DF_EINVAL;
    if (status == 0 && ctx->size < 2) {
        fprintf(stderr, "df_mpi: the pool needs worker ranks: run with "
                        "mpirun -np N (N >= 2) or srun\n");
        status = DF_EINVAL;
    }
    df_mpi_pool *p = NULL;
    if (status == 0) {
        p = calloc(1, sizeof *p);
        if (p == NULL)
            status = DF_ENOMEM;
    }
    if (p != NULL) {
        p->credit = calloc((size_t)ctx->size, sizeof *p->credit);
        p->used = calloc((size_t)ctx->size, sizeof *p->used);
        p->threads = calloc((size_t)ctx->size, sizeof *p->threads);
        p->mean_run_ns = calloc((size_t)ctx->size, sizeof *p->mean_run_ns);
        if (p->credit == NULL || p->used == NULL || p->threads == NULL ||
            p->mean_run_ns == NULL)
            status = DF_ENOMEM;
    }
    /* The workers wait for this exchange: take part whatever happened. */
    uint64_t row[DF_MPI__ROW_N] = {0};
    row[DF_MPI__ROW_MAX] = o.max_bytes;
    row[DF_MPI__ROW_FLAGS] = o.flags;
    row[DF_MPI__ROW_STATUS] = (uint64_t)(int64_t)status;
    uint64_t *rows = NULL;
    int rc = df_mpi__start(ctx, row, &rows);
    if (rc == 0) {
        p->ctx = ctx;
        p->loop = loop;
        p->max_bytes = o.max_bytes;
        p->flags = o.flags;
        p->size = ctx->size;
        p->st.workers = (unsigned)ctx->size - 1;
        for (int r = 1; r < ctx->size; r++) {
            uint64_t c = rows[r * DF_MPI__ROW_N + DF_MPI__ROW_CREDIT];
            p->credit[r] = c > 1000000 ? 1000000 : (unsigned)c;
            p->st.credit += p->credit[r];
            uint64_t t = rows[r * DF_MPI__ROW_N + DF_MPI__ROW_THREADS];
            p->threads[r] = t > 4096 ? 4096 : (unsigned)t;
        }
        pthread_mutex_init(&p->mu, NULL);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&p->cv, &ca);
        pthread_condattr_destroy(&ca);
        /* The progress thread starts with every signal blocked, as
         * df_pool's threads do: asynchronous signals belong to the
         * application's threads. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int crc = pthread_create(&p->thread, NULL, progress_main, p);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (crc != 0) {
            /* The workers are running and wait for orders: with no thread
             * to send them STOP, the job cannot end cleanly. */
            fprintf(stderr, "df_mpi: master: cannot start the progress "
                            "thread; aborting the job\n");
            MPI_Abort(ctx->comm, 1);
        }
        pthread_setname_np(p->thread, "df-mpi-progress"); /* top -H */
        p->thread_started = true;
        p->owner = pthread_self();
        ctx->pools++;
        *out = p;
    } else if (p != NULL) {
        free(p->credit);
        free(p->used);
        free(p->threads);
        free(p->mean_run_ns);
        free(p);
    }
    free(rows);
    return rc;
}

int df_mpi_pool_shutdown(df_mpi_pool *p, int mode, df_deferred **done)
{
    if (p == NULL || done == NULL ||
        (mode != DF_POOL_DRAIN && mode != DF_POOL_CANCEL))
        return DF_EINVAL;
    if (wrong_thread(p))
        return DF_EWRONG_THREAD;
    if (p->shutting)
        return DF_ESTATE;
    int rc = df_deferred_new(p->loop, &p->done);
    if (rc != 0)
        return rc;
    *done = df_deferred_ref(p->done);
    p->shutting = true;
    if (mode == DF_POOL_CANCEL) {
        /* Queued items first, so that no callback can let one be sent. */
        while (p->qhead != NULL) {
            item *it = p->qhead;
            df_deferred *d = df_deferred_ref(it->d);
            df_deferred_cancel(d); /* the canceller unlinks it */
            df_deferred_unref(d);
        }
        for (uint32_t s = 0; s < p->nslots; s++) {
            item *it = p->slots[s];
            if (it != NULL && it->rank > 0 && !it->cancelled) {
                df_deferred *d = df_deferred_ref(it->d);
                df_deferred_cancel(d);
                df_deferred_unref(d);
            }
        }
    }
    maybe_stop(p);
    update_keepalive(p);
    return 0;
}

int df_mpi_pool_free(df_mpi_pool *p)
{
    if (p == NULL)
        return 0;
    if (wrong_thread(p))
        return DF_EWRONG_THREAD;
    if (!p->finished)
        return DF_EBUSY;
    if (p->keep != NULL)
        df_timer_cancel(p->keep);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    p->ctx->pools--;
    free(p->slots);
    free(p->slot_gen);
    free(p->free_slots);
    free(p->credit);
    free(p->used);
    free(p->threads);
    free(p->mean_run_ns);
    free(p);
    return 0;
}

int df_mpi_pool_get_stats(const df_mpi_pool *p, df_mpi_pool_stats *out)
{
    if (p == NULL || out == NULL)
        return DF_EINVAL;
    if (wrong_thread(p))
        return DF_EWRONG_THREAD;
    *out = p->st;
    return 0;
}

/* ------------------------------------------------------- sem and map */

typedef struct sem_call {
    df_mpi_pool *p;
    char *name;
    df_mpi_buf *in;
} sem_call;

static df_result sem_fn(void *arg)
{
    sem_call *c = arg;
    df_deferred *d;
    int rc = df_mpi_submit(c->p, c->name, c->in->data, c->in->len, &d);
    if (rc != 0)
        return df_errf(c->p->loop, rc, "df_mpi_sem_run: cannot submit '%s'",
                       c->name);
    return df_wait(d);
}

static df_result sem_free(df_result r, void *arg)
{
    sem_call *c = arg;
    free(c->name);
    df_mpi_buf_free(c->in);
    free(c);
    return r;
}

int df_mpi_sem_run(df_sem *s, df_mpi_pool *p, const char *name,
                   const void *in, size_t len, df_deferred **out)
{
    if (s == NULL || p == NULL || name == NULL || out == NULL ||
        (in == NULL && len > 0))
        return DF_EINVAL;
    if (wrong_thread(p))
        return DF_EWRONG_THREAD;
    if (p->shutting)
        return DF_ESHUTDOWN;
    sem_call *c = calloc(1, sizeof *c);
    if (c == NULL)
        return DF_ENOMEM;
    c->p = p;
    c->name = strdup(name);
    c->in = df_mpi_buf_new(in, len);
    if (c->name == NULL || c->in == NULL) {
        free(c->name);
        df_mpi_buf_free(c->in);
        free(c);
        return len > DF_MPI__HARD_MAX ? DF_MPI_ETOOBIG : DF_ENOMEM;
    }
    df_deferred *d;
    int rc = df_sem_run(s, sem_fn, c, &d);
    if (rc != 0) {
        sem_free(df_ok(NULL, NULL), c);
        return rc;
    }
    rc = df_deferred_add_both(d, sem_free, c);
    if (rc != 0) {
        /* A fresh deferred takes its first entries inline: cannot
         * happen.  Leak rather than free what sem_fn may still use. */
        fprintf(stderr, "df_mpi_sem_run: cannot watch the run\n");
    }
    *out = d;
    return 0;
}

typedef struct map_wrap {
    df_mpi_pool *p;
    char *name;
    df_map_result_fn on_result;
    void *arg;
} map_wrap;

static df_result map_call(void *in, void *arg)
{
    map_wrap *w = arg;
    df_mpi_buf *b = in;
    if (b == NULL)
        return df_errf(w->p->loop, DF_EINVAL,
                       "df_mpi_map: an item is NULL, not a df_mpi_buf");
    df_deferred *d;
    int rc = df_mpi_submit(w->p, w->name, b->data, b->len, &d);
    if (rc != 0)
        return df_errf(w->p->loop, rc, "df_mpi_map: cannot submit '%s'",
                       w->name);
    return df_wait(d);
}

static void map_result(uint64_t index, void *in, df_result r, void *arg)
{
    map_wrap *w = arg;
    if (w->on_result != NULL)
        w->on_result(index, in, r, w->arg);
    else
        df_result_clear(&r);
}

static df_result map_free(df_result r, void *arg)
{
    map_wrap *w = arg;
    free(w->name);
    free(w);
    return r;
}

int df_mpi_map_start(df_mpi_pool *p, const char *name,
                     const df_map_options *opts, df_map **map,
                     df_deferred **done)
{
    if (p == NULL || name == NULL || opts == NULL || map == NULL ||
        done == NULL || opts->pool != NULL || opts->work != NULL ||
        opts->call != NULL)
        return DF_EINVAL;
    size_t name_len = strlen(name);
    if (name_len == 0 || name_len > DF_MPI__MAX_NAME)
        return DF_EINVAL;
    if (wrong_thread(p))
        return DF_EWRONG_THREAD;
    map_wrap *w = calloc(1, sizeof *w);
    if (w == NULL)
        return DF_ENOMEM;
    w->p = p;
    w->name = strdup(name);
    if (w->name == NULL) {
        free(w);
        return DF_ENOMEM;
    }
    w->on_result = opts->on_result;
    w->arg = opts->arg;
    df_map_options o = *opts;
    o.call = map_call;
    o.on_result = map_result;
    o.arg = w;
    int rc = df_map_start(p->loop, &o, map, done);
    if (rc != 0) {
        map_free(df_ok(NULL, NULL), w);
        return rc;
    }
    rc = df_deferred_add_both(*done, map_free, w);
    if (rc != 0)
        fprintf(stderr, "df_mpi_map_start: cannot watch the map\n");
    return 0;
}
