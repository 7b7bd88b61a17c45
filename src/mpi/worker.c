/* SPDX-License-Identifier: MIT */
/* libdeferred-mpi: a worker rank, running the items inline or on a pool. */
#include "mpi-internal.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

/*
 * Two modes.  The inline mode (one thread, the default there) is described
 * at run_inline() below: the main thread runs the items itself, a sentry
 * thread watches MPI for cancels while one runs.  What follows is the pool
 * mode.
 *
 * The worker's main thread is both the MPI thread and the loop thread of a
 * private df_loop with a df_pool of `threads`.  It alternates between
 *   - receiving what the master sent (MPI_Improbe with MPI_ANY_TAG, so in
 *     the order sent): an item goes to the pool, a cancel cancels the
 *     item's pool deferred, a stop ends the run;
 *   - dispatching the loop: a finished item's callback sends its reply
 *     (MPI_Send: the master's progress thread always receives, and the
 *     master never blocks in a send to a worker, so this cannot deadlock);
 * and, when neither had anything, sleeps in ppoll(2) on the loop's fd: a
 * finished item wakes it at once, a message from the master waits at most
 * the sleep.  How long it sleeps depends on what it holds (`nactive`, the
 * items received and not yet answered, against `threads`):
 *   - nactive < threads: a pool thread is idle and the next item may be
 *     on its way: a backoff that doubles from 8 us to 256 us;
 *   - nactive == threads: every thread is busy and none waits; the next
 *     item is wanted before one of them finishes, which wakes us anyway:
 *     a quarter of the mean run time of an item (measured here), at least
 *     256 us and at most DF_MPI__LONG_SLEEP_US;
 *   - nactive > threads: an item is queued locally, so nothing urgent can
 *     come from the master but a cancel: DF_MPI__LONG_SLEEP_US (2 ms), the
 *     documented bound on how late a cancel is seen.
 * Every sleep and wake-up is costly (a context switch, and under a
 * hypervisor an exit), and it takes a core from the items: the short
 * backoff of the first case, kept up for every item, cost the main thread
 * of a worker 55-65% of a core on 1 ms items (bench/RESULTS.md).
 * The thread's timer slack is 1 us meanwhile (Linux: 50 us by default,
 * which would stretch the short sleeps), restored on return.  Every item
 * the master sends is answered exactly once, cancelled or not.
 *
 * Item states: received -> queued in the pool -> running -> done (reply
 * sent, on the graveyard list until its deferred reference is dropped
 * outside the deferred's own callback).
 */

#define BACKOFF_MIN_US 8
#define BACKOFF_MAX_US 256

typedef struct worker worker;

struct df_mpi_task {
    /* Pool mode: the active list, then the graveyard (loop thread).
     * Inline mode: `next` links the queue qhead..qtail, under `mu`. */
    df_mpi_task *prev, *next;
    worker *wk;
    uint64_t id;
    const df_mpi__entry *e;
    unsigned char *msg; /* the received message; `in` points into it */
    const unsigned char *in;
    size_t in_len;
    df_deferred *d;     /* the pool job; our reference */
    /* Written inside the work function, read after it: pool mode, by
     * the pool thread, then by the loop thread after the pool's
     * completion (which orders them); inline mode, by the main thread
     * both times. */
    df_work *w;
    unsigned char *out;
    size_t out_len;
    uint64_t run_ns;    /* how long the work function ran */
    int code;
    char *text;         /* failure message, or NULL */
    bool too_big;
    /* Inline mode: set (under the worker's mutex) when the master cancels
     * the item; read by df_mpi_task_cancelled() from the work function. */
    atomic_bool cancel;
};

struct worker {
    df_mpi *ctx;
    df_loop *loop;
    df_pool *pool;
    size_t max_bytes;
    df_mpi_task *active;    /* items received and not yet answered */
    size_t nactive;         /* their number */
    unsigned threads;       /* the pool's threads */
    uint64_t mean_run_ns;   /* running mean of the items' run time */
    df_mpi_task *graveyard; /* answered, to be freed */
    bool stop;
    int error;              /* first MPI failure */
    /* Inline mode (see run_inline): the main thread runs the items itself,
     * and a sentry thread looks at MPI while one runs.  `mu` guards every
     * MPI call and the fields below; the work function runs without it. */
    bool inline_mode;
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* the sentry's: work to watch, or quit */
    df_mpi_task *qhead, *qtail; /* received, not started: FIFO */
    df_mpi_task *running;   /* the item the main thread runs, or NULL */
    uint64_t looked_ns;     /* when MPI was last looked at (now_ns) */
    bool sentry_parked;     /* the sentry waits without a timeout */
    bool sentry_quit;
};

/* ------------------------------------------------------ task functions */

static int set_text(df_mpi_task *t, const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        return DF_ENOMEM;
    free(t->text);
    t->text = s;
    return 0;
}

static void too_big(df_mpi_task *t, size_t len)
{
    char *s = NULL;
    if (asprintf(&s, "output of %zu bytes from '%s' on rank %d exceeds "
                     "max_bytes %zu", len, t->e->name, t->wk->ctx->rank,
                 t->wk->max_bytes) >= 0) {
        free(t->text);
        t->text = s;
        fprintf(stderr, "df_mpi: worker rank %d: %s\n", t->wk->ctx->rank, s);
    }
    t->too_big = true;
}

void *df_mpi_task_output(df_mpi_task *t, size_t len)
{
    if (t == NULL)
        return NULL;
    if (len > t->wk->max_bytes) {
        too_big(t, len);
        return NULL;
    }
    unsigned char *p = realloc(t->out, len ? len : 1);
    if (p == NULL)
        return NULL;
    t->out = p;
    t->out_len = len;
    return p;
}

int df_mpi_task_reply(df_mpi_task *t, const void *data, size_t len)
{
    if (t == NULL || (data == NULL && len > 0))
        return DF_EINVAL;
    if (len > t->wk->max_bytes) {
        too_big(t, len);
        return DF_MPI_ETOOBIG;
    }
    void *p = df_mpi_task_output(t, len);
    if (p == NULL)
        return DF_ENOMEM;
    if (len > 0)
        memcpy(p, data, len);
    return 0;
}

int df_mpi_task_fail(df_mpi_task *t, int code, const char *fmt, ...)
{
    if (t != NULL && fmt != NULL) {
        va_list ap;
        va_start(ap, fmt);
        set_text(t, fmt, ap);
        va_end(ap);
    }
    return code;
}

bool df_mpi_task_cancelled(const df_mpi_task *t)
{
    if (t == NULL)
        return false;
    if (t->wk->inline_mode)
        return atomic_load_explicit(&t->cancel, memory_order_relaxed);
    return t->w != NULL && df_work_cancelled(t->w);
}

const char *df_mpi_task_name(const df_mpi_task *t)
{
    return t != NULL ? t->e->name : NULL;
}

int df_mpi_task_rank(const df_mpi_task *t)
{
    return t != NULL ? t->wk->ctx->rank : -1;
}

/* ------------------------------------------------------------- replies */

static void fatal_mpi(worker *wk, const char *what, int rc)
{
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, s, &n) != MPI_SUCCESS)
        snprintf(s, sizeof s, "error %d", rc);
    fprintf(stderr, "df_mpi: worker rank %d: %s failed: %s; aborting the "
                    "job\n", wk->ctx->rank, what, s);
    MPI_Abort(wk->ctx->comm, 1);
}

/* Sends one reply: code 0 with `out`, else code and message; run_ns is
 * the item's run time (0: it did not run). */
static void send_reply(worker *wk, uint64_t id, int code, const char *text,
                       const unsigned char *out, size_t out_len,
                       uint64_t run_ns)
{
    size_t msg_len = 0;
    if (code != 0) {
        out_len = 0;
        if (text == NULL)
            text = df_mpi_strerror(code);
        msg_len = strlen(text);
        if (msg_len > 4000)
            msg_len = 4000;
    }
    size_t n = sizeof(df_mpi__rep_hdr) + msg_len + out_len;
    unsigned char *buf = malloc(n);
    if (buf == NULL) {
        /* Answer anyway, without message or output. */
        df_mpi__rep_hdr h = {id, DF_ENOMEM, 0, 0, run_ns};
        int rc = MPI_Send(&h, sizeof h, MPI_BYTE, 0, DF_MPI__TAG_REP,
                          wk->ctx->comm);
        if (rc != MPI_SUCCESS)
            fatal_mpi(wk, "MPI_Send", rc);
        return;
    }
    df_mpi__rep_hdr h = {id, code, (uint32_t)msg_len, out_len, run_ns};
    memcpy(buf, &h, sizeof h);
    if (msg_len > 0)
        memcpy(buf + sizeof h, text, msg_len);
    if (out_len > 0)
        memcpy(buf + sizeof h + msg_len, out, out_len);
    int rc = MPI_Send(buf, (int)n, MPI_BYTE, 0, DF_MPI__TAG_REP,
                      wk->ctx->comm);
    free(buf);
    if (rc != MPI_SUCCESS)
        fatal_mpi(wk, "MPI_Send", rc);
}

/* --------------------------------------------------------------- items */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Pool thread. */
static df_result run_task(df_work *w, void *arg)
{
    df_mpi_task *t = arg;
    t->w = w;
    uint64_t t0 = now_ns();
    int code = t->e->fn(t, t->in, t->in_len, t->e->arg);
    t->run_ns = now_ns() - t0;
    if (t->run_ns == 0)
        t->run_ns = 1; /* it ran */
    if (t->too_big)
        code = DF_MPI_ETOOBIG;
    t->code = code;
    return df_ok(NULL, NULL);
}

static void unlink_task(df_mpi_task **head, df_mpi_task *t)
{
    if (t->prev != NULL)
        t->prev->next = t->next;
    else
        *head = t->next;
    if (t->next != NULL)
        t->next->prev = t->prev;
    t->prev = t->next = NULL;
}

static void push_task(df_mpi_task **head, df_mpi_task *t)
{
    t->prev = NULL;
    t->next = *head;
    if (*head != NULL)
        (*head)->prev = t;
    *head = t;
}

/* Loop thread: the pool job has finished (or was cancelled). */
static df_result task_done(df_result r, void *arg)
{
    df_mpi_task *t = arg;
    worker *wk = t->wk;
    /* A cancelled job may have run (t->run_ns set) or not (0). */
    if (r.failure != NULL)
        send_reply(wk, t->id, df_failure_code(r.failure),
                   df_failure_message(r.failure), NULL, 0, t->run_ns);
    else
        send_reply(wk, t->id, t->code, t->text, t->out, t->out_len,
                   t->run_ns);
    if (t->run_ns > 0) {
        /* A running mean over about the last 8 items. */
        if (wk->mean_run_ns == 0)
            wk->mean_run_ns = t->run_ns;
        else
            wk->mean_run_ns = wk->mean_run_ns - wk->mean_run_ns / 8 +
                              t->run_ns / 8;
    }
    unlink_task(&wk->active, t);
    wk->nactive--;
    push_task(&wk->graveyard, t);
    df_result_clear(&r);
    return r;
}

static void free_task(df_mpi_task *t)
{
    if (t->d != NULL)
        df_deferred_unref(t->d);
    free(t->msg);
    free(t->out);
    free(t->text);
    free(t);
}

static void bury(worker *wk)
{
    while (wk->graveyard != NULL) {
        df_mpi_task *t = wk->graveyard;
        unlink_task(&wk->graveyard, t);
        free_task(t);
    }
}

/* An item that cannot run: answered at once, with a line on stderr. */
static void refuse(worker *wk, uint64_t id, int code, const char *fmt, ...)
    DF_PRINTF(4, 5);
static void refuse(worker *wk, uint64_t id, int code, const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    fprintf(stderr, "df_mpi: worker rank %d: %s\n", wk->ctx->rank, text);
    send_reply(wk, id, code, text, NULL, 0, 0);
}

static void on_request(worker *wk, unsigned char *msg, size_t n)
{
    df_mpi__req_hdr h;
    if (n < sizeof h) {
        refuse(wk, DF_MPI__NO_ID, DF_MPI_EPROTO,
               "truncated message: %zu bytes, shorter than a header", n);
        free(msg);
        return;
    }
    memcpy(&h, msg, sizeof h);
    if (h.name_len > n - sizeof h || h.in_len != n - sizeof h - h.name_len) {
        refuse(wk, h.id, DF_MPI_EPROTO,
               "truncated or malformed message: %zu bytes, its header "
               "announces %llu", n,
               (unsigned long long)(sizeof h + (uint64_t)h.name_len +
                                    h.in_len));
        free(msg);
        return;
    }
    const char *name = (const char *)msg + sizeof h;
    if (h.in_len > wk->max_bytes) {
        refuse(wk, h.id, DF_MPI_ETOOBIG,
               "input of %llu bytes exceeds max_bytes %zu",
               (unsigned long long)h.in_len, wk->max_bytes);
        free(msg);
        return;
    }
    const df_mpi__entry *e = df_mpi__lookup(wk->ctx, name, h.name_len);
    if (e == NULL) {
        refuse(wk, h.id, DF_MPI_ENONAME,
               "function '%.*s' is not registered on rank %d",
               (int)h.name_len, name, wk->ctx->rank);
        free(msg);
        return;
    }
    df_mpi_task *t = calloc(1, sizeof *t);
    if (t == NULL) {
        send_reply(wk, h.id, DF_ENOMEM, "out of memory on the worker", NULL,
                   0, 0);
        free(msg);
        return;
    }
    t->wk = wk;
    t->id = h.id;
    t->e = e;
    t->msg = msg;
    t->in = msg + sizeof h + h.name_len;
    t->in_len = h.in_len;
    if (wk->inline_mode) {
        /* Run later by the main thread, in the order received. */
        t->next = NULL;
        if (wk->qtail != NULL)
            wk->qtail->next = t;
        else
            wk->qhead = t;
        wk->qtail = t;
        wk->nactive++;
        return;
    }
    int rc = df_pool_submit(wk->pool, run_task, t, &t->d);
    if (rc != 0) {
        send_reply(wk, h.id, rc, "the worker's pool refused the item", NULL,
                   0, 0);
        free_task(t);
        return;
    }
    push_task(&wk->active, t);
    wk->nactive++;
    rc = df_deferred_add_both(t->d, task_done, t);
    if (rc != 0) {
        /* Cannot happen with a fresh deferred; answer without waiting. */
        unlink_task(&wk->active, t);
        wk->nactive--;
        df_deferred_cancel(t->d);
        send_reply(wk, h.id, rc, "the worker cannot watch the item", NULL, 0,
                   0);
        push_task(&wk->graveyard, t);
    }
}

static void on_cancel(worker *wk, const unsigned char *msg, size_t n)
{
    uint64_t id;
    if (n != sizeof id)
        return;
    memcpy(&id, msg, sizeof id);
    if (wk->inline_mode) {
        if (wk->running != NULL && wk->running->id == id) {
            /* Seen by df_mpi_task_cancelled(); answered when it returns. */
            atomic_store_explicit(&wk->running->cancel, true,
                                  memory_order_relaxed);
            return;
        }
        df_mpi_task *prev = NULL;
        for (df_mpi_task *t = wk->qhead; t != NULL; prev = t, t = t->next) {
            if (t->id == id) {
                /* Not started: answered now, never run. */
                if (prev != NULL)
                    prev->next = t->next;
                else
                    wk->qhead = t->next;
                if (wk->qtail == t)
                    wk->qtail = prev;
                wk->nactive--;
                send_reply(wk, id, DF_ECANCELLED, NULL, NULL, 0, 0);
                free_task(t);
                return;
            }
        }
        return;
    }
    for (df_mpi_task *t = wk->active; t != NULL; t = t->next) {
        if (t->id == id) {
            /* Queued: fails at once and task_done answers inside this
             * call; running: answered once the function returns.  An id
             * no longer active was answered already: nothing to do. */
            df_deferred_cancel(t->d);
            return;
        }
    }
}

/* Receives and handles what the master has sent; true if anything. */
static bool receive(worker *wk)
{
    bool any = false;
    for (int k = 0; k < 64 && !wk->stop; k++) {
        int flag = 0, count = 0;
        MPI_Message m;
        MPI_Status st;
        int rc = MPI_Improbe(0, MPI_ANY_TAG, wk->ctx->comm, &flag, &m, &st);
        if (rc != MPI_SUCCESS)
            fatal_mpi(wk, "MPI_Improbe", rc);
        if (!flag)
            break;
        any = true;
        MPI_Get_count(&st, MPI_BYTE, &count);
        unsigned char *msg = malloc(count > 0 ? (size_t)count : 1);
        if (msg == NULL) {
            fprintf(stderr, "df_mpi: worker rank %d: out of memory for a "
                            "message of %d bytes; aborting the job\n",
                    wk->ctx->rank, count);
            MPI_Abort(wk->ctx->comm, 1);
            return any;
        }
        rc = MPI_Mrecv(msg, count, MPI_BYTE, &m, &st);
        if (rc != MPI_SUCCESS)
            fatal_mpi(wk, "MPI_Mrecv", rc);
        switch (st.MPI_TAG) {
        case DF_MPI__TAG_REQ:
            on_request(wk, msg, (size_t)count); /* takes msg */
            break;
        case DF_MPI__TAG_CANCEL:
            on_cancel(wk, msg, (size_t)count);
            free(msg);
            break;
        case DF_MPI__TAG_STOP:
            wk->stop = true;
            free(msg);
            break;
        default:
            fprintf(stderr, "df_mpi: worker rank %d: message with unknown "
                            "tag %d ignored\n", wk->ctx->rank, st.MPI_TAG);
            free(msg);
            break;
        }
    }
    return any;
}

/* ------------------------------------------------------------- inline */

/* Inline mode: the sentry thread.  While the main thread runs an item it
 * makes sure MPI is looked at at least every DF_MPI__LONG_SLEEP_US, under
 * `mu`, so that a cancel reaches the running item (its flag) or answers a
 * queued one as promptly as in pool mode; new items it receives join the
 * queue.  The main thread looks at MPI before each item (`looked_ns`), so
 * with items shorter than that period the sentry's wake-ups find a recent
 * look and make no MPI call (an empty MPI_Improbe may sched_yield in Open
 * MPI, giving the core to the computing thread and costing one more
 * switch).  While the main thread is idle (nothing running) it parks
 * without a timeout, and the main thread wakes it when it starts an item:
 * in a steady stream it never parks, so starting an item costs no
 * wake-up. */
static void *sentry_main(void *arg)
{
    worker *wk = arg;
    pthread_mutex_lock(&wk->mu);
    while (!wk->sentry_quit) {
        /* With `stop` set receive() takes nothing, so looked_ns would
         * never move and the loop below would spin holding `mu`: park as
         * when idle.  (The master sends STOP only once every item has
         * been answered, so it cannot arrive while one runs; this guards
         * against that changing.) */
        if (wk->running == NULL || wk->stop) {
            wk->sentry_parked = true;
            pthread_cond_wait(&wk->cv, &wk->mu);
            wk->sentry_parked = false;
            continue;
        }
        /* now_ns() and the condition variable share CLOCK_MONOTONIC. */
        uint64_t due = wk->looked_ns + DF_MPI__LONG_SLEEP_US * 1000u;
        uint64_t now = now_ns();
        if (due > now) {
            struct timespec ts = {(time_t)(due / 1000000000u),
                                  (long)(due % 1000000000u)};
            int rc = 0;
            while (!wk->sentry_quit && rc != ETIMEDOUT)
                rc = pthread_cond_timedwait(&wk->cv, &wk->mu, &ts);
            continue; /* the main thread may have looked meanwhile */
        }
        receive(wk);
        wk->looked_ns = now_ns();
    }
    pthread_mutex_unlock(&wk->mu);
    return NULL;
}

/* Main thread, without `mu`: one item, as run_task does on a pool
 * thread. */
static void run_inline_task(df_mpi_task *t)
{
    uint64_t t0 = now_ns();
    int code = t->e->fn(t, t->in, t->in_len, t->e->arg);
    t->run_ns = now_ns() - t0;
    if (t->run_ns == 0)
        t->run_ns = 1;
    if (t->too_big)
        code = DF_MPI_ETOOBIG;
    t->code = code;
}

/*
 * Inline mode's main loop (one thread: threads == 1).  The main thread
 * receives, runs the oldest received item itself, replies, and looks at
 * MPI again before the next one: no pool thread, no hand-off, no wake-up
 * per item.  In the pool mode each item cost the main thread a wake-up by
 * the pool thread's completion and the pool thread a hand-off, on a
 * machine where the ranks share the cores with the items (bench/
 * RESULTS.md).  With nothing received and nothing to run it sleeps with
 * the idle backoff (8 us doubling to 256 us).  Every MPI call, here and
 * in the sentry, is made under `mu` (MPI_THREAD_SERIALIZED allows calls
 * from any thread, one at a time).
 *
 * Item states: received (in the queue qhead..qtail) -> running (`running`,
 * the work function called without `mu`) -> answered and freed by the
 * main thread; or received -> cancelled: answered and freed by whichever
 * thread received the cancel.  A cancel of the running item only sets its
 * flag; the main thread answers DF_ECANCELLED when the function returns,
 * dropping its output, as the pool mode does.
 */
static void run_inline(worker *wk)
{
    unsigned backoff = 0;
    pthread_mutex_lock(&wk->mu);
    while (!wk->stop) {
        bool any = receive(wk);
        if (wk->stop)
            break;
        df_mpi_task *t = wk->qhead;
        if (t != NULL)
            wk->looked_ns = now_ns();
        if (t != NULL) {
            wk->qhead = t->next;
            if (wk->qhead == NULL)
                wk->qtail = NULL;
            t->next = NULL;
            wk->running = t;
            if (wk->sentry_parked)
                pthread_cond_signal(&wk->cv);
            pthread_mutex_unlock(&wk->mu);
            run_inline_task(t);
            pthread_mutex_lock(&wk->mu);
            wk->running = NULL;
            if (atomic_load_explicit(&t->cancel, memory_order_relaxed))
                send_reply(wk, t->id, DF_ECANCELLED, NULL, NULL, 0,
                           t->run_ns);
            else
                send_reply(wk, t->id, t->code, t->text, t->out, t->out_len,
                           t->run_ns);
            wk->nactive--;
            free_task(t);
            backoff = 0;
            continue;
        }
        if (any) {
            backoff = 0;
            continue;
        }
        backoff = backoff ? 2 * backoff : BACKOFF_MIN_US;
        if (backoff > BACKOFF_MAX_US)
            backoff = BACKOFF_MAX_US;
        pthread_mutex_unlock(&wk->mu);
        struct timespec ts = {0, (long)backoff * 1000};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&wk->mu);
    }
    /* The master stops a pool only once every item was answered, so the
     * queue is empty here; should it not be, its items are answered as
     * cancelled. */
    while (wk->qhead != NULL) {
        df_mpi_task *t = wk->qhead;
        wk->qhead = t->next;
        send_reply(wk, t->id, DF_ECANCELLED, NULL, NULL, 0, 0);
        free_task(t);
    }
    wk->qtail = NULL;
    wk->nactive = 0;
    pthread_mutex_unlock(&wk->mu);
}

/* Pool mode's main loop: see the comment at the top. */
static void run_pool(worker *wk)
{
    int fd = df_loop_fd(wk->loop);
    unsigned backoff = 0;
    bool quiet = false; /* the last sleep ended with nothing to run */
    while (!wk->stop) {
        bool any = receive(wk);
        unsigned ran = 0;
        /* Reading the loop's fd costs a system call: skip it when the
         * sleep just timed out with no timer and nothing new. */
        if (any || !quiet)
            df_loop_dispatch(wk->loop, 0, &ran);
        quiet = false;
        bury(wk);
        if (wk->stop)
            break;
        if (any || ran > 0) {
            backoff = 0;
            continue;
        }
        int tmo = df_loop_timeout_ms(wk->loop);
        if (tmo == 0)
            continue;
        uint64_t us;
        if (wk->nactive < wk->threads) {
            backoff = backoff ? 2 * backoff : BACKOFF_MIN_US;
            if (backoff > BACKOFF_MAX_US)
                backoff = BACKOFF_MAX_US;
            us = backoff;
        } else if (wk->nactive == wk->threads) {
            us = wk->mean_run_ns / 4000;
            if (us < BACKOFF_MAX_US)
                us = BACKOFF_MAX_US;
            if (us > DF_MPI__LONG_SLEEP_US)
                us = DF_MPI__LONG_SLEEP_US;
        } else {
            us = DF_MPI__LONG_SLEEP_US;
        }
        if (tmo > 0 && (uint64_t)tmo * 1000 < us)
            us = (uint64_t)tmo * 1000;
        struct pollfd pfd = {fd, POLLIN, 0};
        struct timespec ts = {(time_t)(us / 1000000),
                              (long)(us % 1000000) * 1000};
        int n = ppoll(&pfd, 1, &ts, NULL);
        quiet = n == 0 && tmo < 0;
    }
    /* The master stops a pool only once every item was answered, so
     * nothing is active here; should anything be, it is cancelled and
     * answered before the pool goes. */
    df_pool_shutdown(wk->pool, DF_POOL_CANCEL);
    bury(wk);
}

/* ---------------------------------------------------------------- run */

int df_mpi_worker_run(df_mpi *ctx, const df_mpi_worker_options *opts)
{
    if (ctx == NULL)
        return DF_EINVAL;
    if (ctx->rank == 0)
        return DF_MPI_EROLE;
    if (ctx->started || ctx->working)
        return DF_ESTATE;
    /* Set before any item can run (a work function calling
     * df_mpi_finalize gets DF_EBUSY), cleared once none can. */
    ctx->working = true;
    df_mpi_worker_options o = DF_MPI_WORKER_OPTIONS_INIT;
    if (opts != NULL)
        o = *opts;
    worker wk = {.ctx = ctx, .threads = o.threads};
    int status = 0;
    if (o.threads == 0 || o.threads > 4096) {
        fprintf(stderr, "df_mpi: worker rank %d: threads must be 1..4096\n",
                ctx->rank);
        status = DF_EINVAL;
    } else if ((o.flags & ~(unsigned)(DF_MPI_INLINE | DF_MPI_NO_INLINE)) ||
               ((o.flags & DF_MPI_INLINE) && (o.flags & DF_MPI_NO_INLINE)) ||
               ((o.flags & DF_MPI_INLINE) && o.threads != 1)) {
        fprintf(stderr, "df_mpi: worker rank %d: bad flags 0x%x (DF_MPI_INLINE "
                        "needs threads == 1 and excludes DF_MPI_NO_INLINE)\n",
                ctx->rank, o.flags);
        status = DF_EINVAL;
    }
    wk.inline_mode = o.threads == 1 && !(o.flags & DF_MPI_NO_INLINE);
    unsigned credit = o.credit ? o.credit : 2 * o.threads + 2;
    bool sync_ok = false, sentry_ok = false;
    pthread_t sentry;
    if (status == 0 && wk.inline_mode) {
        pthread_condattr_t ca;
        if (pthread_mutex_init(&wk.mu, NULL) != 0) {
            status = DF_ENOMEM;
        } else if (pthread_condattr_init(&ca) != 0) {
            pthread_mutex_destroy(&wk.mu);
            status = DF_ENOMEM;
        } else {
            pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
            if (pthread_cond_init(&wk.cv, &ca) != 0) {
                pthread_mutex_destroy(&wk.mu);
                status = DF_ENOMEM;
            } else {
                sync_ok = true;
            }
            pthread_condattr_destroy(&ca);
        }
        if (sync_ok) {
            /* The sentry starts with every signal blocked, as df_pool's
             * threads do: asynchronous signals belong to the
             * application's threads. */
            sigset_t all, old;
            sigfillset(&all);
            pthread_sigmask(SIG_SETMASK, &all, &old);
            if (pthread_create(&sentry, NULL, sentry_main, &wk) == 0) {
                sentry_ok = true;
                pthread_setname_np(sentry, "df-mpi-sentry"); /* top -H */
            } else {
                status = DF_ENOMEM;
            }
            pthread_sigmask(SIG_SETMASK, &old, NULL);
        }
    } else if (status == 0) {
        status = df_loop_new(NULL, &wk.loop);
        if (status == 0) {
            df_pool_options po = DF_POOL_OPTIONS_INIT;
            po.threads = o.threads;
            status = df_pool_new(wk.loop, &po, &wk.pool);
        }
    }
    uint64_t row[DF_MPI__ROW_N] = {0};
    row[DF_MPI__ROW_CREDIT] = credit;
    row[DF_MPI__ROW_THREADS] = o.threads;
    row[DF_MPI__ROW_STATUS] = (uint64_t)(int64_t)status;
    uint64_t *rows = NULL;
    int rc = df_mpi__start(ctx, row, &rows);
    if (rc == 0) {
        wk.max_bytes = (size_t)rows[DF_MPI__ROW_MAX];
        int slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
        if (wk.inline_mode)
            run_inline(&wk);
        else
            run_pool(&wk);
        if (slack > 0)
            prctl(PR_SET_TIMERSLACK, (unsigned long)slack, 0, 0, 0);
    }
    free(rows);
    if (sentry_ok) {
        pthread_mutex_lock(&wk.mu);
        wk.sentry_quit = true;
        pthread_cond_signal(&wk.cv);
        pthread_mutex_unlock(&wk.mu);
        pthread_join(sentry, NULL);
    }
    if (sync_ok) {
        pthread_cond_destroy(&wk.cv);
        pthread_mutex_destroy(&wk.mu);
    }
    df_pool_free(wk.pool);
    if (wk.loop != NULL) {
        df_loop_run(wk.loop);
        bury(&wk);
        int frc = df_loop_free(wk.loop);
        if (frc != 0)
            fprintf(stderr, "df_mpi: worker rank %d: df_loop_free: %s\n",
                    ctx->rank, df_strerror(frc));
    }
    ctx->working = false;
    return rc;
}
