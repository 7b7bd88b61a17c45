/* SPDX-License-Identifier: MIT */
/* Model-based checking: operations applied to libdeferred and a reference. */
#include <assert.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "deferred.h"
#include "model.h"
#include "testutil.h"

/*
 * How the checking works
 * ======================
 * Loop-side objects are deterministic: a semaphore A, a lock L, plain
 * deferreds U, lists and gathers over them, call_later timers and
 * timeouts.  The reference model simulates each operation on them and
 * appends what must be observed (a deferred's first callback running, a
 * run() function being called, a timer firing, a map result) to a model
 * log; the real callbacks append what they see to a real log.  After each
 * step both logs must be equal, and every deferred's current result (peek)
 * must equal the model's: that checks FIFO hand-over, exactly-once firing
 * and results, and the order of everything, exactly.
 *
 * The model of a deferred is its chain: a list of stages (our tracking
 * callback, a list's member callback, a timeout's pass-through, a run()
 * waiting on it) run in order when it fires, unless paused (df_list_new
 * pauses members while attaching).  The semaphore model mirrors the
 * documented non-recursive hand-over: a token released inside a callback
 * of the semaphore starts the next waiter only when that callback returns.
 *
 * Pool-side work is not deterministic in time: a second semaphore B bounds
 * df_sem_run_in_pool jobs, plain jobs and map items run on the pool, and
 * their work may be held at a valve.  For them the checks are invariants:
 * never more than B's limit (minus tokens held by acquires) in work at
 * once, never more than the pool's threads; each job's work runs at most
 * once and its deferred fires once with an outcome allowed by what
 * happened to it (own result only if it ran and was not cancelled;
 * CANCELLED only if cancelled or shut down with CANCEL; ESHUTDOWN only if
 * it never ran); B's grants never skip a waiter; after a settle (valve
 * open, loop driven until only timers are pending) the exact state of B
 * follows from FIFO order; maps deliver each pulled item once, in order
 * when asked, within their bounds.
 */

#define MAX_DEFS 192
#define MAX_STAGES 8
#define MAX_LISTS 48
#define MAX_MEMBERS 5
#define MAX_TIMERS 48
#define MAX_MAPS 6
#define MAX_ITEMS 24
#define MAX_B 128

#define HOUR_NS (UINT64_C(3600) * 1000000000u)
#define E_U (-4241)   /* a plain deferred failed by an operation */
#define E_JOB (-4243) /* a pool job's work failed */
#define E_RUN (-4244) /* a run() function failed */
#define VTAG 0x10000  /* run() values are tags, not pointers */

/* ------------------------------------------------------------ the state */

enum kind {
    K_U,    /* plain deferred, fired by operations */
    K_ACQ,  /* acquire on A or L */
    K_RUN,  /* run on A or L */
    K_LIST, /* list or gather */
    K_MAPC, /* done of a map running items on the loop (deterministic) */
    K_JOB,  /* plain pool job */
    K_RIP,  /* df_sem_run_in_pool on B */
    K_ACQB, /* acquire on B */
    K_MAPP  /* done of a map running items on the pool */
};
#define DET(k) ((k) <= K_MAPC)
static const char *const kind_names[] = {"u",   "acq", "run", "list", "mapc",
                                         "job", "rip", "acqb", "mapp"};

enum stage_type { ST_TRACK, ST_LIST, ST_TIMEOUT, ST_RUNWAIT };
typedef struct stage {
    unsigned char type;
    bool timed_out; /* ST_TIMEOUT: its timer fired */
    int a, b;       /* list and slot, timer, or run */
} stage;

enum node_state { N_NONE, N_WAIT, N_READY, N_CALLING, N_RUNNING, N_DONE };

struct md;

typedef struct tdef {
    struct md *m;
    int id;
    int kind;
    df_deferred *d; /* our reference */

    /* Observed by the tracking callback. */
    int fired;
    int code;
    uintptr_t val;

    /* Model of a deterministic deferred. */
    bool mfired;
    int mcode;
    uintptr_t mval;
    int cur_code; /* the chain's current result */
    uintptr_t cur_val;
    int paused;
    bool in_run;
    int next; /* next stage to run */
    int nst;
    stage st[MAX_STAGES];
    bool has_timeout;
    int timer;     /* its timeout's timer, or -1 */
    bool suppress; /* K_U cancelled: its producer's next fire is dropped */

    /* Semaphore nodes (A, L) and run() functions. */
    int sem;
    int state;
    int mode; /* run: 0 ok, 1 fail, 2 wait; jobs: 0 ok, 1 fail */
    int inner;
    bool cancel_requested;

    int list; /* K_LIST: its mlist */
    int map;  /* K_MAPC, K_MAPP: its mmap */

    /* Pool side. */
    atomic_int ran;
    bool cancel_req;   /* cancelled (by hand or timeout) while unfired */
    bool shut_seen;    /* the pool was shut down while unfired */
    int shut_mode;
    int bpos;          /* place in B's FIFO (K_RIP, K_ACQB) */
} tdef;

typedef struct msem {
    unsigned limit;
    unsigned tokens;
    int waiting[MAX_DEFS];
    int nwaiting;
    int ready[MAX_DEFS];
    int nready;
    bool dispatching;
    int held; /* tokens held by acquires */
} msem;

typedef struct mslot {
    bool done, fired, ok;
    int code;
    uintptr_t val;
} mslot;

typedef struct mlist {
    int tid;
    unsigned flags;
    int n;
    int members[MAX_MEMBERS];
    mslot slots[MAX_MEMBERS];
    bool collecting;
    int nfired;
    long fired_index;
} mlist;

enum { TM_CALL, TM_TIMEOUT };
enum { TS_PENDING, TS_FIRED, TS_CANCELLED };
typedef struct mtimer {
    int kind;
    int tid; /* TM_TIMEOUT: the deferred */
    bool zero;
    int state;
    df_timer *h; /* TM_CALL */
} mtimer;

typedef struct mval {
    tu_counting_alloc *ca;
    int tag;
    void *owner;
} mval;

typedef struct mmap {
    struct md *m;
    int idx;
    int tid;
    df_map *mp;
    bool pool_mode, ordered, soe;
    unsigned limit;
    size_t window;
    int n;
    uint32_t failmask;
    int npulled, ndelivered, nfailed;
    bool delivered[MAX_ITEMS];
    atomic_int running;
    bool cancel_req;
    bool shut_seen;
    bool shut_cancel; /* shut down with DF_POOL_CANCEL while running */
    bool down_at_start;
} mmap;

enum ev_type { EV_FIRE = 1, EV_CALL, EV_TIMER, EV_MAPRES };
typedef struct ev {
    int type, id, code;
    uintptr_t v;
} ev;

typedef struct evlog {
    ev *e;
    size_t n, cap;
} evlog;

struct md;
/* call_later's argument: which timer of which sequence. */
typedef struct call_arg {
    struct md *m;
    int k;
} call_arg;

typedef struct md {
    md_src *src;
    bool trace;
    unsigned long step;
    const char *opname;

    tu_counting_alloc ca;
    df_loop *loop;
    uint64_t unhandled;
    df_sem *sa;
    df_lock *lk;
    df_sem *sb;
    df_pool *pool;
    bool pool_down;
    unsigned threads;
    msem ms[2];

    tdef *defs[MAX_DEFS];
    int ndefs;
    int reserved; /* slots kept for the deferreds of runs in wait mode */
    mlist lists[MAX_LISTS];
    int nlists;
    mtimer timers[MAX_TIMERS];
    call_arg call_args[MAX_TIMERS];
    int ntimers;
    mmap *maps[MAX_MAPS];
    int nmaps;

    evlog rlog, mlog;

    /* B, the pool's semaphore. */
    unsigned lim_b;
    int held_b;
    /* B's tokens in use as the pool side sees them: acquires holding one
     * (counted after the grant, uncounted before the release) and
     * df_sem_run_in_pool jobs in work.  Both under bmu, so that a job's
     * check reads one consistent sum (two separate atomics let a job count
     * a finished job and the acquire that got its token: a false alarm
     * the fuzzer found). */
    pthread_mutex_t bmu;
    int held_b_shared, brun;
    int bdefs[MAX_B]; /* FIFO position -> tdef */
    int nb;

    /* Shared with the workers. */
    pthread_mutex_t mu; /* protects glog, msg, valve_open */
    pthread_cond_t cv;  /* valve */
    bool valve_open;
    int glog[MAX_B * 2]; /* B grants, in order (FIFO positions) */
    int ng;
    atomic_int prun;
    atomic_int last_job; /* one thread: plain jobs start in FIFO order */
    atomic_int failed;
    char msg[768];
} md;

/* ----------------------------------------------------------- failures */

static void md_fail(md *m, const char *fmt, ...) DF_PRINTF(2, 3);

/* Records the first failure; any thread.  The step loop stops at it. */
static void md_fail(md *m, const char *fmt, ...)
{
    va_list ap;
    pthread_mutex_lock(&m->mu);
    if (!atomic_load(&m->failed)) {
        int k = snprintf(m->msg, sizeof m->msg, "step %lu (%s): ", m->step,
                         m->opname != NULL ? m->opname : "?");
        va_start(ap, fmt);
        if (k > 0 && (size_t)k < sizeof m->msg)
            vsnprintf(m->msg + k, sizeof m->msg - (size_t)k, fmt, ap);
        va_end(ap);
        atomic_store(&m->failed, 1);
    }
    pthread_mutex_unlock(&m->mu);
}

#define CHECK(m, cond, ...)                                                    \
    do {                                                                       \
        if (!(cond))                                                           \
            md_fail((m), __VA_ARGS__);                                         \
    } while (0)

#define CHECK_RC(m, expr, want)                                                \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        int want_ = (want);                                                    \
        CHECK((m), rc_ == want_, "%s returned %s, expected %s", #expr,         \
              df_err_name(rc_), df_err_name(want_));                           \
    } while (0)

/* --------------------------------------------------------------- bytes */

static uint8_t src_byte(md_src *s)
{
    uint8_t b;
    if (s->data != NULL) {
        if (s->pos < s->len) {
            b = s->data[s->pos++];
        } else {
            s->exhausted = true;
            b = 0;
        }
    } else {
        /* splitmix64, one byte per step: plenty for a test. */
        uint64_t z = (s->state += UINT64_C(0x9e3779b97f4a7c15));
        z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
        b = (uint8_t)((z ^ (z >> 31)) >> 24);
    }
    if (s->record) {
        if (s->rec_len == s->rec_cap) {
            size_t cap = s->rec_cap ? s->rec_cap * 2 : 256;
            uint8_t *p = realloc(s->rec, cap);
            if (p == NULL)
                abort();
            s->rec = p;
            s->rec_cap = cap;
        }
        s->rec[s->rec_len++] = b;
    }
    return b;
}

static unsigned pick(md *m, unsigned n)
{
    return n == 0 ? 0 : src_byte(m->src) % n;
}

/* --------------------------------------------------------------- values */

static void val_free(void *p)
{
    mval *v = p;
    tu_ca_free(v, v->ca);
}

static mval *val_new(md *m, int tag, void *owner)
{
    mval *v = tu_ca_malloc(sizeof *v, &m->ca);
    if (v == NULL)
        abort();
    v->ca = &m->ca;
    v->tag = tag;
    v->owner = owner;
    return v;
}

/* ----------------------------------------------------------------- logs */

static void log_add(evlog *l, int type, int id, int code, uintptr_t v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        ev *e = realloc(l->e, cap * sizeof *e);
        if (e == NULL)
            abort();
        l->e = e;
        l->cap = cap;
    }
    l->e[l->n++] = (ev){type, id, code, v};
}

static const char *const ev_names[] = {"?", "fire", "call", "timer", "mapres"};

static void compare_logs(md *m)
{
    size_t n = m->rlog.n < m->mlog.n ? m->rlog.n : m->mlog.n;
    for (size_t i = 0; i < n; i++) {
        ev *r = &m->rlog.e[i], *e = &m->mlog.e[i];
        if (r->type != e->type || r->id != e->id || r->code != e->code ||
            r->v != e->v) {
            md_fail(m,
                    "event %zu: library %s #%d code %d v %#" PRIxPTR
                    ", model %s #%d code %d v %#" PRIxPTR,
                    i, ev_names[r->type], r->id, r->code, r->v,
                    ev_names[e->type], e->id, e->code, e->v);
            return;
        }
    }
    if (m->rlog.n != m->mlog.n) {
        const ev *x = m->rlog.n > n ? &m->rlog.e[n] : &m->mlog.e[n];
        md_fail(m, "library logged %zu events, model %zu; first extra: %s "
                   "%s #%d code %d",
                m->rlog.n, m->mlog.n, m->rlog.n > n ? "library" : "model",
                ev_names[x->type], x->id, x->code);
    }
}

/* ------------------------------------------------------- list digests */

static uintptr_t mix(uintptr_t h, uintptr_t x)
{
    return (h ^ x) * (uintptr_t)0x100000001b3u + 0x9e37u;
}

static uintptr_t digest_first_error(long index, int cause)
{
    return (uintptr_t)(index * 65536) + (uintptr_t)(uint16_t)cause;
}

/* What the tracking callback logs for a delivered list result. */
static uintptr_t digest_result(const df_list_result *r)
{
    uintptr_t h = mix(0, df_list_result_count(r));
    h = mix(h, (uintptr_t)df_list_result_index(r));
    for (size_t i = 0; i < df_list_result_count(r); i++) {
        bool fired = df_list_result_fired(r, i), ok = df_list_result_ok(r, i);
        h = mix(h, fired * 2u + ok);
        if (fired)
            h = mix(h, ok ? (uintptr_t)df_list_result_value(r, i)
                          : (uintptr_t)df_failure_code(
                                df_list_result_failure(r, i)));
    }
    return h;
}

static uintptr_t digest_model(const mlist *l)
{
    uintptr_t h = mix(0, (uintptr_t)l->n);
    h = mix(h, (uintptr_t)l->fired_index);
    for (int i = 0; i < l->n; i++) {
        const mslot *s = &l->slots[i];
        h = mix(h, s->fired * 2u + s->ok);
        if (s->fired)
            h = mix(h, s->ok ? s->val : (uintptr_t)s->code);
    }
    return h;
}

/* ------------------------------------------------------ tracked deferreds */

/* A new tracked deferred, or NULL when the table is full.  `reserved`:
 * take one of the slots kept for a run's deferred. */
static tdef *def_new_slot(md *m, int kind, bool reserved)
{
    if (reserved)
        m->reserved--;
    else if (m->ndefs + m->reserved + 2 > MAX_DEFS)
        return NULL; /* room for a run and its deferred, always */
    assert(m->ndefs < MAX_DEFS);
    tdef *t = calloc(1, sizeof *t);
    if (t == NULL)
        abort();
    t->m = m;
    t->id = m->ndefs;
    t->kind = kind;
    t->timer = -1;
    t->inner = -1;
    t->list = -1;
    t->map = -1;
    t->bpos = -1;
    atomic_init(&t->ran, 0);
    m->defs[m->ndefs++] = t;
    return t;
}

static tdef *def_new(md *m, int kind)
{
    return def_new_slot(m, kind, false);
}

static void map_done_seen(md *m, tdef *t, df_result *r);
static void pool_outcome_seen(md *m, tdef *t, const df_result *r);

/* The first callback pair of every tracked deferred: records and logs the
 * result and passes it on unchanged. */
static df_result track(df_result r, void *arg)
{
    tdef *t = arg;
    md *m = t->m;
    int code = r.failure != NULL ? df_failure_code(r.failure) : 0;
    uintptr_t v = (uintptr_t)r.value;

    t->fired++;
    CHECK(m, t->fired == 1, "%s #%d: callback chain ran %d times",
          kind_names[t->kind], t->id, t->fired);
    if (t->fired > 1)
        return r;
    if (t->kind == K_LIST) {
        if (r.failure == NULL)
            v = digest_result(r.value);
        else if (code == DF_EFIRST_ERROR)
            v = digest_first_error(
                df_failure_index(r.failure),
                df_failure_code(df_failure_cause(r.failure)));
    } else if (t->kind == K_MAPC || t->kind == K_MAPP) {
        map_done_seen(m, t, &r);
        v = r.failure == NULL ? ((df_map_stats *)r.value)->pulled : 0;
    }
    t->code = code;
    t->val = v;
    if (DET(t->kind))
        log_add(&m->rlog, EV_FIRE, t->id, code, v);
    if (t->kind == K_ACQB && code == 0) {
        m->held_b++;
        pthread_mutex_lock(&m->bmu);
        m->held_b_shared++;
        pthread_mutex_unlock(&m->bmu);
        pthread_mutex_lock(&m->mu);
        m->glog[m->ng++] = t->bpos;
        pthread_mutex_unlock(&m->mu);
    }
    if (t->kind == K_JOB || t->kind == K_RIP)
        pool_outcome_seen(m, t, &r);
    if (t->timer >= 0 && !DET(t->kind) &&
        m->timers[t->timer].state == TS_PENDING)
        m->timers[t->timer].state = TS_CANCELLED; /* timeout_done */
    return r;
}

static void m_run_chain(md *m, tdef *t);

/* Attaches the tracking callback to a deferred the library just gave us. */
static void attach(md *m, tdef *t)
{
    int rc = df_deferred_add_both(t->d, track, t);
    CHECK(m, rc == 0, "add_both on #%d: %s", t->id, df_err_name(rc));
    if (!DET(t->kind))
        return;
    t->st[t->nst++] = (stage){ST_TRACK, false, 0, 0};
    m_run_chain(m, t);
}

/* ------------------------------------------------------ the model proper */

static void m_fire(md *m, tdef *t, int code, uintptr_t v);
static void m_cancel(md *m, tdef *t);
static void m_run_start(md *m, tdef *w);
static void m_give_back(md *m, msem *s);
static void m_leave(md *m, msem *s, bool outer);
static void m_list_member(md *m, mlist *l, int slot, tdef *member);

static msem *sem_of(md *m, tdef *t)
{
    return &m->ms[t->sem];
}

static void m_stage(md *m, tdef *t, stage *s)
{
    switch (s->type) {
    case ST_TRACK:
        log_add(&m->mlog, EV_FIRE, t->id, t->mcode, t->mval);
        break;
    case ST_TIMEOUT:
        if (m->timers[s->a].state == TS_PENDING)
            m->timers[s->a].state = TS_CANCELLED;
        if (s->timed_out && t->cur_code == DF_ECANCELLED) {
            t->cur_code = DF_ETIMEDOUT;
            t->cur_val = 0;
        }
        break;
    case ST_RUNWAIT: {
        tdef *w = m->defs[s->a];
        int code = t->cur_code;
        uintptr_t v = t->cur_val;
        t->cur_code = 0;
        t->cur_val = 0;
        msem *sm = sem_of(m, w);
        bool outer = !sm->dispatching;
        sm->dispatching = true;
        /* run_finish: the token goes back before *out fires. */
        m_give_back(m, sm);
        w->state = N_DONE;
        m_fire(m, w, code, v);
        m_leave(m, sm, outer);
        break;
    }
    case ST_LIST:
        m_list_member(m, &m->lists[s->a], s->b, t);
        break;
    }
}

/* Runs the stages not run yet, unless paused or already being run (the
 * library never nests runs of one chain). */
static void m_run_chain(md *m, tdef *t)
{
    if (!t->mfired || t->paused > 0 || t->in_run)
        return;
    t->in_run = true;
    while (t->next < t->nst && t->paused == 0)
        m_stage(m, t, &t->st[t->next++]);
    t->in_run = false;
}

static void m_add_stage(md *m, tdef *t, stage s)
{
    t->st[t->nst++] = s;
    m_run_chain(m, t);
}

static void m_fire(md *m, tdef *t, int code, uintptr_t v)
{
    CHECK(m, !t->mfired, "model: #%d fired twice", t->id);
    t->mfired = true;
    t->mcode = code;
    t->mval = v;
    t->cur_code = code;
    t->cur_val = v;
    if (t->kind == K_ACQ && code == 0)
        sem_of(m, t)->held++;
    m_run_chain(m, t);
}

/* Semaphore model: waiting and ready FIFOs, and the dispatcher. */
static void q_push(int *q, int *n, int id)
{
    q[(*n)++] = id;
}

static int q_pop(int *q, int *n)
{
    int id = q[0];
    memmove(q, q + 1, (size_t)(--*n) * sizeof *q);
    return id;
}

static void q_remove(int *q, int *n, int id)
{
    for (int i = 0; i < *n; i++) {
        if (q[i] == id) {
            memmove(q + i, q + i + 1, (size_t)(*n - i - 1) * sizeof *q);
            (*n)--;
            return;
        }
    }
}

static void m_give_back(md *m, msem *s)
{
    if (s->nwaiting > 0) {
        int id = q_pop(s->waiting, &s->nwaiting);
        m->defs[id]->state = N_READY;
        q_push(s->ready, &s->nready, id);
    } else {
        CHECK(m, s->tokens < s->limit, "model: token over-count");
        s->tokens++;
    }
}

static void m_leave(md *m, msem *s, bool outer)
{
    if (!outer)
        return;
    while (s->nready > 0) {
        tdef *w = m->defs[q_pop(s->ready, &s->nready)];
        if (w->kind == K_ACQ) {
            w->state = N_DONE;
            m_fire(m, w, 0, 0);
        } else {
            m_run_start(m, w);
        }
    }
    s->dispatching = false;
}

static void m_run_finish(md *m, tdef *w, int code, uintptr_t v)
{
    msem *s = sem_of(m, w);
    bool outer = !s->dispatching;
    s->dispatching = true;
    m_give_back(m, s);
    w->state = N_DONE;
    m_fire(m, w, code, v);
    m_leave(m, s, outer);
}

static void m_run_start(md *m, tdef *w)
{
    w->state = N_CALLING;
    log_add(&m->mlog, EV_CALL, w->id, 0, 0);
    if (w->mode == 0) {
        m_run_finish(m, w, 0, (uintptr_t)(VTAG + w->id));
    } else if (w->mode == 1) {
        m_run_finish(m, w, E_RUN, 0);
    } else {
        if (w->inner < 0) {
            md_fail(m, "model: run #%d should have called its function",
                    w->id);
            return;
        }
        tdef *u = m->defs[w->inner];
        w->state = N_RUNNING;
        /* The library made u inside the function: our tracking callback
         * first, then the run's own. */
        u->st[u->nst++] = (stage){ST_TRACK, false, 0, 0};
        m_add_stage(m, u, (stage){ST_RUNWAIT, false, w->id, 0});
        if (w->cancel_requested)
            m_cancel(m, u);
    }
}

static void m_acquire(md *m, tdef *t)
{
    msem *s = sem_of(m, t);
    if (s->tokens > 0) {
        s->tokens--;
        t->state = N_DONE;
        m_fire(m, t, 0, 0);
    } else {
        t->state = N_WAIT;
        q_push(s->waiting, &s->nwaiting, t->id);
    }
}

static void m_run(md *m, tdef *t)
{
    msem *s = sem_of(m, t);
    if (s->tokens == 0) {
        t->state = N_WAIT;
        q_push(s->waiting, &s->nwaiting, t->id);
        return;
    }
    s->tokens--;
    t->state = N_READY;
    q_push(s->ready, &s->nready, t->id);
    bool outer = !s->dispatching;
    s->dispatching = true;
    m_leave(m, s, outer);
}

static void m_release(md *m, msem *s)
{
    bool outer = !s->dispatching;
    s->dispatching = true;
    m_give_back(m, s);
    m_leave(m, s, outer);
}

static void m_list_fire(md *m, mlist *l, int code, uintptr_t v)
{
    l->collecting = false;
    m_fire(m, m->defs[l->tid], code, v);
    if (l->flags & DF_LIST_CANCEL_REMAINING) {
        for (int i = 0; i < l->n; i++) {
            if (!l->slots[i].done)
                m_cancel(m, m->defs[l->members[i]]);
        }
    }
}

static void m_list_member(md *m, mlist *l, int i, tdef *t)
{
    mslot *s = &l->slots[i];
    bool ok = t->cur_code == 0;
    s->done = true;
    if (l->collecting) {
        s->fired = true;
        s->ok = ok;
        s->code = t->cur_code;
        s->val = ok ? t->cur_val : 0;
        l->nfired++;
        if (ok && (l->flags & DF_LIST_FIRE_ON_ONE_CALLBACK)) {
            l->fired_index = i;
            m_list_fire(m, l, 0, digest_model(l));
        } else if (!ok && (l->flags & DF_LIST_FIRE_ON_ONE_ERRBACK)) {
            m_list_fire(m, l, DF_EFIRST_ERROR,
                        digest_first_error(i, s->code));
        } else if (l->nfired == l->n) {
            m_list_fire(m, l, 0, digest_model(l));
        }
    }
    if (!ok && (l->flags & DF_LIST_CONSUME_ERRORS)) {
        t->cur_code = 0;
        t->cur_val = 0;
    }
}

/* df_deferred_cancel() on a deterministic deferred. */
static void m_cancel(md *m, tdef *t)
{
    if (t->mfired)
        return; /* nothing of ours waits on an inner deferred */
    switch (t->kind) {
    case K_U:
        /* No canceller: the producer's late fire will be swallowed. */
        t->suppress = true;
        m_fire(m, t, DF_ECANCELLED, 0);
        break;
    case K_ACQ: {
        msem *s = sem_of(m, t);
        if (t->state == N_WAIT) {
            q_remove(s->waiting, &s->nwaiting, t->id);
            m_fire(m, t, DF_ECANCELLED, 0);
        } else if (t->state == N_READY) {
            /* Too late: the token was handed over. */
            q_remove(s->ready, &s->nready, t->id);
            bool outer = !s->dispatching;
            s->dispatching = true;
            t->state = N_DONE;
            m_fire(m, t, 0, 0);
            m_leave(m, s, outer);
        }
        break;
    }
    case K_RUN: {
        msem *s = sem_of(m, t);
        bool outer;
        switch (t->state) {
        case N_WAIT:
            q_remove(s->waiting, &s->nwaiting, t->id);
            outer = !s->dispatching;
            s->dispatching = true;
            t->state = N_DONE;
            m_fire(m, t, DF_ECANCELLED, 0);
            m_leave(m, s, outer);
            break;
        case N_READY:
            q_remove(s->ready, &s->nready, t->id);
            outer = !s->dispatching;
            s->dispatching = true;
            t->cancel_requested = true;
            m_run_start(m, t);
            m_leave(m, s, outer);
            break;
        case N_CALLING:
            t->cancel_requested = true;
            break;
        case N_RUNNING:
            m_cancel(m, m->defs[t->inner]);
            break;
        }
        break;
    }
    case K_LIST: {
        mlist *l = &m->lists[t->list];
        for (int i = 0; i < l->n; i++)
            m_cancel(m, m->defs[l->members[i]]);
        if (!t->mfired) {
            l->collecting = false;
            m_fire(m, t, DF_ECANCELLED, 0);
        }
        break;
    }
    default:
        break;
    }
}

/* Runs the model's due timers, as a df_loop_dispatch() does: every
 * zero-delay timer still pending, in the order they were made.  Pool
 * deferreds' timeouts are decided before the library's dispatch (`pool`),
 * by whether they have fired yet; the others are simulated after it, as
 * the model needs what the library's run() functions did. */
static void m_run_timers(md *m, bool pool)
{
    for (int k = 0; k < m->ntimers; k++) {
        mtimer *tm = &m->timers[k];
        if (tm->state != TS_PENDING || !tm->zero)
            continue;
        bool det = tm->kind == TM_CALL || DET(m->defs[tm->tid]->kind);
        if (det == pool)
            continue;
        tm->state = TS_FIRED;
        if (tm->kind == TM_CALL) {
            log_add(&m->mlog, EV_TIMER, k, 0, 0);
            continue;
        }
        tdef *t = m->defs[tm->tid];
        if (DET(t->kind)) {
            for (int i = 0; i < t->nst; i++) {
                if (t->st[i].type == ST_TIMEOUT && t->st[i].a == k)
                    t->st[i].timed_out = true;
            }
            m_cancel(m, t);
        } else if (!t->fired) {
            t->cancel_req = true;
            if (t->kind == K_MAPP)
                m->maps[t->map]->cancel_req = true;
        }
    }
}

static int pending_timers(const md *m)
{
    int n = 0;
    for (int k = 0; k < m->ntimers; k++)
        n += m->timers[k].state == TS_PENDING;
    return n;
}

/* ------------------------------------------------------------ pool side */

static void valve_wait(md *m)
{
    pthread_mutex_lock(&m->mu);
    while (!m->valve_open)
        pthread_cond_wait(&m->cv, &m->mu);
    pthread_mutex_unlock(&m->mu);
}

static void valve_set(md *m, bool open)
{
    pthread_mutex_lock(&m->mu);
    m->valve_open = open;
    if (open)
        pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
}

/* Counts work in progress on the pool; checks the thread bound. */
static void work_enter(md *m)
{
    int n = atomic_fetch_add(&m->prun, 1) + 1;
    CHECK(m, n <= (int)m->threads, "%d works at once on %u threads", n,
          m->threads);
}

static df_result job_work(df_work *w, void *arg)
{
    tdef *t = arg;
    md *m = t->m;
    int ran = atomic_fetch_add(&t->ran, 1) + 1;
    CHECK(m, ran == 1, "%s #%d: work ran %d times", kind_names[t->kind],
          t->id, ran);
    work_enter(m);
    if (t->kind == K_RIP) {
        pthread_mutex_lock(&m->bmu);
        int n = ++m->brun;
        int held = m->held_b_shared;
        pthread_mutex_unlock(&m->bmu);
        CHECK(m, n + held <= (int)m->lim_b,
              "rip #%d: %d jobs in work + %d tokens held by acquires "
              "exceed the semaphore's %u", t->id, n, held, m->lim_b);
        pthread_mutex_lock(&m->mu);
        m->glog[m->ng++] = t->bpos;
        pthread_mutex_unlock(&m->mu);
    } else if (m->threads == 1) {
        /* One thread: plain jobs start in the order they were queued. */
        int last = atomic_exchange(&m->last_job, t->id);
        CHECK(m, last < t->id, "job #%d started after job #%d", t->id, last);
    }
    valve_wait(m);
    if (t->kind == K_RIP) {
        pthread_mutex_lock(&m->bmu);
        m->brun--;
        pthread_mutex_unlock(&m->bmu);
    }
    atomic_fetch_sub(&m->prun, 1);
    if (t->mode == 1)
        return df_errf(df_work_loop(w), E_JOB, "job %d fails", t->id);
    return df_ok(val_new(m, t->id, t), val_free);
}

/* Checks a pool job's outcome against what happened to it. */
static void pool_outcome_seen(md *m, tdef *t, const df_result *r)
{
    int code = t->code;
    int ran = atomic_load(&t->ran);
    const char *k = kind_names[t->kind];
    if (code == 0 || code == E_JOB) {
        CHECK(m, ran == 1 && !t->cancel_req,
              "%s #%d: own result (%d) though ran %d, cancelled %d", k, t->id,
              code, ran, t->cancel_req);
        CHECK(m, (code == E_JOB) == (t->mode == 1), "%s #%d: wrong result",
              k, t->id);
        if (code == 0) {
            mval *v = r->value;
            CHECK(m, v != NULL && v->tag == t->id && v->owner == t,
                  "%s #%d: wrong value", k, t->id);
        }
    } else if (code == DF_ECANCELLED) {
        CHECK(m, t->cancel_req || (t->shut_seen &&
                                   t->shut_mode == DF_POOL_CANCEL),
              "%s #%d: cancelled, but nobody cancelled it", k, t->id);
    } else if (code == DF_ESHUTDOWN) {
        CHECK(m, t->kind == K_RIP && t->shut_seen && ran == 0,
              "%s #%d: ESHUTDOWN (shut down %d, ran %d)", k, t->id,
              t->shut_seen, ran);
    } else {
        md_fail(m, "%s #%d: unexpected outcome %s", k, t->id,
                df_err_name(code));
    }
}

/* ----------------------------------------------------------------- maps */

static int map_next(void *arg, void **item, df_free_fn *item_free)
{
    mmap *mm = arg;
    if (mm->npulled >= mm->n)
        return 0;
    *item = val_new(mm->m, mm->npulled, mm);
    *item_free = val_free;
    mm->npulled++;
    return 1;
}

static df_result map_work(df_work *w, void *arg, void *work_arg)
{
    (void)work_arg;
    mval *item = arg;
    mmap *mm = item->owner;
    md *m = mm->m;
    work_enter(m);
    int n = atomic_fetch_add(&mm->running, 1) + 1;
    CHECK(m, n <= (int)mm->limit, "map %d: %d items in work, limit %u",
          mm->idx, n, mm->limit);
    valve_wait(m);
    atomic_fetch_sub(&mm->running, 1);
    atomic_fetch_sub(&m->prun, 1);
    if (mm->failmask & (1u << item->tag))
        return df_errf(df_work_loop(w), E_JOB, "item %d fails", item->tag);
    return df_ok(val_new(m, item->tag, mm), val_free);
}

static df_result map_call(void *item, void *arg)
{
    mval *it = item;
    mmap *mm = arg;
    if (mm->failmask & (1u << it->tag))
        return df_errf(mm->m->loop, E_JOB, "item %d fails", it->tag);
    return df_ok(val_new(mm->m, it->tag, mm), val_free);
}

static void map_result(uint64_t index, void *item, df_result r, void *arg)
{
    mmap *mm = arg;
    md *m = mm->m;
    mval *it = item;
    int code = r.failure != NULL ? df_failure_code(r.failure) : 0;
    /* With a pool the map pulls up to max(limit, 1024) items ahead of its
     * tokens (deferred.h: the read-ahead adapts from max(limit, 64)); at
     * most `limit` of those run (checked in map_work). */
    size_t ahead = !mm->pool_mode ? 0 : mm->limit > 1024 ? mm->limit : 1024;
    size_t bound = mm->ordered ? mm->window + 1 : mm->limit + ahead;
    df_map_stats st;

    CHECK(m, index < (uint64_t)mm->npulled && it->tag == (int)index,
          "map %d: result for item %" PRIu64 " (pulled %d)", mm->idx, index,
          mm->npulled);
    if (index >= MAX_ITEMS)
        return;
    CHECK(m, !mm->delivered[index], "map %d: item %" PRIu64
          " delivered twice", mm->idx, index);
    CHECK(m, !mm->ordered || (int)index == mm->ndelivered,
          "map %d: ordered delivery gave %" PRIu64 " after %d", mm->idx,
          index, mm->ndelivered);
    CHECK(m, (size_t)(mm->npulled - mm->ndelivered) <= bound,
          "map %d: %d pulled, %d delivered, bound %zu", mm->idx,
          mm->npulled, mm->ndelivered, bound);
    CHECK_RC(m, df_map_get_stats(mm->mp, &st), 0);
    CHECK(m, st.running <= mm->limit + ahead, "map %d: %" PRIu64 " running",
          mm->idx, st.running);
    mm->delivered[index] = true;
    mm->ndelivered++;
    if (code != 0)
        mm->nfailed++;
    if (code == 0) {
        mval *v = r.value;
        CHECK(m, v != NULL && v->tag == (int)index,
              "map %d: wrong value for %" PRIu64, mm->idx, index);
        CHECK(m, !(mm->failmask & (1u << index)),
              "map %d: item %" PRIu64 " should have failed", mm->idx, index);
    } else if (code == E_JOB) {
        CHECK(m, (mm->failmask & (1u << index)) != 0,
              "map %d: item %" PRIu64 " failed", mm->idx, index);
    } else {
        /* A failure under STOP_ON_ERROR cancels the items in flight. */
        uint32_t pulled_mask = mm->npulled >= 32 ? UINT32_MAX
                                                 : (1u << mm->npulled) - 1;
        bool stopped = mm->soe && ((mm->failmask & pulled_mask) != 0 ||
                                   mm->shut_seen || mm->down_at_start);
        CHECK(m, (code == DF_ECANCELLED &&
                  (mm->cancel_req || stopped || mm->shut_cancel)) ||
                     (code == DF_ESHUTDOWN &&
                      (mm->shut_seen || mm->down_at_start)),
              "map %d: item %" PRIu64 ": %s", mm->idx, index,
              df_err_name(code));
    }
    if (!mm->pool_mode)
        log_add(&m->rlog, EV_MAPRES, mm->idx, code, (uintptr_t)index);
    df_result_clear(&r);
}

static void map_done_seen(md *m, tdef *t, df_result *r)
{
    mmap *mm = m->maps[t->map];
    int code = r->failure != NULL ? df_failure_code(r->failure) : 0;
    CHECK(m, mm->ndelivered == mm->npulled,
          "map %d: done with %d of %d delivered", mm->idx, mm->ndelivered,
          mm->npulled);
    if (code == 0) {
        df_map_stats *st = r->value;
        CHECK(m, st->pulled == (uint64_t)mm->npulled &&
                     st->done == (uint64_t)mm->ndelivered &&
                     st->running == 0 && st->buffered == 0 &&
                     st->failed == (uint64_t)mm->nfailed,
              "map %d: wrong stats", mm->idx);
        CHECK(m, mm->npulled == mm->n, "map %d: done after %d of %d",
              mm->idx, mm->npulled, mm->n);
    } else if (code == E_JOB) {
        CHECK(m, mm->soe && mm->nfailed > 0, "map %d: failed", mm->idx);
    } else {
        /* Under STOP_ON_ERROR an item cancelled by a shutdown is the
         * first failure. */
        CHECK(m, (code == DF_ECANCELLED &&
                  (mm->cancel_req || (mm->soe && mm->shut_cancel))) ||
                     (code == DF_ESHUTDOWN &&
                      (mm->shut_seen || mm->down_at_start)),
              "map %d: done %s", mm->idx, df_err_name(code));
    }
}

/* Model of a map running on the loop: items finish at once, in order. */
static void m_map_call(md *m, mmap *mm, tdef *t)
{
    int code = 0;
    int i;
    for (i = 0; i < mm->n; i++) {
        int c = (mm->failmask & (1u << i)) ? E_JOB : 0;
        log_add(&m->mlog, EV_MAPRES, mm->idx, c, (uintptr_t)i);
        if (c != 0 && mm->soe) {
            code = c;
            i++;
            break;
        }
    }
    m_fire(m, t, code, code == 0 ? (uintptr_t)i : 0);
}

/* ------------------------------------------------------------- settling */

/* Polls the loop until only timers are pending (every job has finished
 * and been dispatched), with the valve open. */
static void settle(md *m)
{
    valve_set(m, true);
    m_run_timers(m, true);
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (bool first = true;; first = false) {
        CHECK_RC(m, df_loop_dispatch(m->loop, 0, NULL), 0);
        if (first)
            m_run_timers(m, false);
        /* A pool deferred that fires removes its timeout's timer. */
        int want = pending_timers(m);
        size_t now_pending = df_loop_pending(m->loop);
        if (now_pending == (size_t)want)
            break;
        if (now_pending < (size_t)want) {
            md_fail(m, "settle: %zu things pending, fewer than the model's "
                       "%d timers", now_pending, want);
            return;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - t0.tv_sec > 60) {
            md_fail(m, "settle: %zu things still pending after 60 s "
                       "(%d timers)", df_loop_pending(m->loop), want);
            return;
        }
        int ms = df_loop_timeout_ms(m->loop);
        struct pollfd p = {df_loop_fd(m->loop), POLLIN, 0};
        poll(&p, 1, ms < 0 || ms > 10 ? 10 : ms);
    }
}

/* After a settle: the state of B follows from FIFO order. */
static void check_b_settled(md *m)
{
    int free_b = (int)m->lim_b - m->held_b;
    int waiting = 0;
    bool blocked = false;
    /* held_b already counts acquires granted during the settle; walk the
     * FIFO as it was: a waiter is served while a token is free. */
    int held_now = m->held_b;
    int granted_acq = 0;
    for (int p = 0; p < m->nb; p++) {
        tdef *t = m->defs[m->bdefs[p]];
        if (t->kind == K_ACQB && t->fired && t->code == 0)
            granted_acq++;
    }
    (void)granted_acq;
    free_b = (int)m->lim_b - held_now;
    for (int p = 0; p < m->nb; p++) {
        tdef *t = m->defs[m->bdefs[p]];
        if (t->kind == K_RIP && (t->cancel_req || m->pool_down)) {
            CHECK(m, t->fired == 1, "rip #%d not fired after settle", t->id);
            continue;
        }
        if (t->fired)
            continue;
        if (!blocked && free_b > 0) {
            md_fail(m, "%s #%d still waits with %d token(s) of B free",
                    kind_names[t->kind], t->id, free_b);
            return;
        }
        blocked = true;
        waiting++;
    }
    CHECK(m, df_sem_tokens(m->sb) == (unsigned)free_b,
          "B has %u tokens free, expected %d", df_sem_tokens(m->sb), free_b);
    CHECK(m, df_sem_waiting(m->sb) == (size_t)waiting,
          "B has %zu waiting, expected %d", df_sem_waiting(m->sb), waiting);
    for (int i = 0; i < m->ndefs; i++) {
        tdef *t = m->defs[i];
        if (t->kind == K_JOB || t->kind == K_MAPP)
            CHECK(m, t->fired == 1, "%s #%d not fired after settle",
                  kind_names[t->kind], t->id);
    }
}

/* B's grants never skip a waiter: whoever was granted, every earlier
 * waiter was granted too, or left the line (cancelled, shut down).  With
 * one token, grants happen exactly in FIFO order. */
static void check_b_fifo(md *m)
{
    bool granted[MAX_B] = {false};
    int maxp = -1;
    pthread_mutex_lock(&m->mu);
    int ng = m->ng;
    for (int i = 0; i < ng; i++) {
        int p = m->glog[i];
        CHECK(m, !granted[p], "B granted position %d twice", p);
        granted[p] = true;
        if (m->lim_b == 1 && i > 0)
            CHECK(m, p > m->glog[i - 1], "B (one token) granted %d after %d",
                  p, m->glog[i - 1]);
        if (p > maxp)
            maxp = p;
    }
    pthread_mutex_unlock(&m->mu);
    for (int p = 0; p < maxp; p++) {
        tdef *t = m->defs[m->bdefs[p]];
        bool excused = t->cancel_req || t->code == DF_ECANCELLED ||
                       t->code == DF_ESHUTDOWN;
        CHECK(m, granted[p] || excused,
              "B granted position %d but skipped %s #%d (position %d)", maxp,
              kind_names[t->kind], t->id, p);
    }
}

/* ------------------------------------------------------- step checks */

static void check_state(md *m)
{
    compare_logs(m);
    CHECK(m, df_sem_tokens(m->sa) == m->ms[0].tokens,
          "A has %u tokens, model %u", df_sem_tokens(m->sa), m->ms[0].tokens);
    CHECK(m, df_sem_waiting(m->sa) == (size_t)m->ms[0].nwaiting,
          "A has %zu waiting, model %d", df_sem_waiting(m->sa),
          m->ms[0].nwaiting);
    CHECK(m, df_lock_locked(m->lk) == (m->ms[1].tokens == 0),
          "L locked %d, model tokens %u", df_lock_locked(m->lk),
          m->ms[1].tokens);
    for (int s = 0; s < 2; s++) {
        CHECK(m, m->ms[s].nready == 0 && !m->ms[s].dispatching,
              "model: semaphore %d left a dispatch", s);
        CHECK(m, m->ms[s].tokens + (unsigned)m->ms[s].held <= m->ms[s].limit,
              "model: semaphore %d over-count", s);
    }
    CHECK(m, df_sem_tokens(m->sb) + (unsigned)m->held_b <= m->lim_b,
          "B: %u free + %d held > %u", df_sem_tokens(m->sb), m->held_b,
          m->lim_b);
    for (int i = 0; i < m->ndefs && !atomic_load(&m->failed); i++) {
        tdef *t = m->defs[i];
        if (!DET(t->kind) || t->d == NULL)
            continue;
        void *v = NULL;
        df_failure *f = NULL;
        int rc = df_deferred_peek(t->d, &v, &f);
        if (!t->mfired) {
            CHECK(m, rc == DF_ENOT_CALLED, "%s #%d fired, model says not",
                  kind_names[t->kind], t->id);
            continue;
        }
        if (rc != 0) {
            md_fail(m, "%s #%d has not fired, model says it has",
                    kind_names[t->kind], t->id);
            continue;
        }
        int code = f != NULL ? df_failure_code(f) : 0;
        CHECK(m, code == t->cur_code, "%s #%d ends with %s, model %s",
              kind_names[t->kind], t->id, df_err_name(code),
              df_err_name(t->cur_code));
        if (code == 0 && t->kind != K_LIST && t->kind != K_MAPC)
            CHECK(m, (uintptr_t)v == t->cur_val,
                  "%s #%d ends with value %p, model %#" PRIxPTR,
                  kind_names[t->kind], t->id, v, t->cur_val);
    }
}

/* ------------------------------------------------------------ operations */

static df_result run_fn(void *arg)
{
    tdef *t = arg;
    md *m = t->m;
    log_add(&m->rlog, EV_CALL, t->id, 0, 0);
    if (t->mode == 0)
        return df_ok((void *)(uintptr_t)(VTAG + t->id), NULL);
    if (t->mode == 1)
        return df_errf(m->loop, E_RUN, "run %d fails", t->id);
    tdef *u = def_new_slot(m, K_U, true); /* op_run kept the slot */
    t->inner = u->id;
    if (df_deferred_new(m->loop, &u->d) != 0)
        abort();
    CHECK_RC(m, df_deferred_add_both(u->d, track, u), 0);
    return df_wait(df_deferred_ref(u->d));
}

static tdef *pick_def(md *m, unsigned kinds, bool unfired_only)
{
    int cand[MAX_DEFS], n = 0;
    for (int i = 0; i < m->ndefs; i++) {
        tdef *t = m->defs[i];
        if (t->d == NULL || !(kinds & (1u << t->kind)))
            continue;
        if (unfired_only && t->fired)
            continue;
        cand[n++] = i;
    }
    if (n == 0)
        return NULL;
    return m->defs[cand[pick(m, (unsigned)n)]];
}

enum {
    OP_U_NEW, OP_U_FIRE, OP_CANCEL, OP_TIMEOUT, OP_CALL_LATER,
    OP_TIMER_CANCEL, OP_ACQ, OP_REL, OP_RUN, OP_LIST, OP_GATHER, OP_SUBMIT,
    OP_RIP, OP_ACQB, OP_RELB, OP_VALVE, OP_DRIVE, OP_SETTLE, OP_SHUTDOWN,
    OP_POOL_NEW, OP_MAP, OP_MAP_CANCEL, OP_COUNT
};
static const char *const op_names[] = {
    "u_new", "u_fire", "cancel", "timeout", "call_later", "timer_cancel",
    "acquire", "release", "run", "list", "gather", "submit", "run_in_pool",
    "acquire_b", "release_b", "valve", "drive", "settle", "shutdown",
    "pool_new", "map", "map_cancel"};
/* The weights of the operations: a byte picks one slot. */
static const unsigned char op_table[] = {
    OP_U_NEW, OP_U_NEW, OP_U_NEW, OP_U_FIRE, OP_U_FIRE, OP_U_FIRE,
    OP_CANCEL, OP_CANCEL, OP_CANCEL, OP_TIMEOUT, OP_TIMEOUT, OP_CALL_LATER,
    OP_TIMER_CANCEL, OP_ACQ, OP_ACQ, OP_ACQ, OP_REL, OP_REL, OP_REL,
    OP_RUN, OP_RUN, OP_RUN, OP_LIST, OP_LIST, OP_GATHER, OP_SUBMIT,
    OP_SUBMIT, OP_RIP, OP_RIP, OP_RIP, OP_ACQB, OP_ACQB, OP_RELB, OP_RELB,
    OP_VALVE, OP_VALVE, OP_DRIVE, OP_DRIVE, OP_DRIVE, OP_SETTLE,
    OP_SHUTDOWN, OP_POOL_NEW, OP_MAP, OP_MAP, OP_MAP_CANCEL};

static void op_u_new(md *m)
{
    tdef *t = def_new(m, K_U);
    if (t == NULL)
        return;
    CHECK_RC(m, df_deferred_new(m->loop, &t->d), 0);
    attach(m, t);
}

static void op_u_fire(md *m)
{
    tdef *t = pick_def(m, 1u << K_U, false);
    unsigned how = pick(m, 3);
    if (t == NULL)
        return;
    int want = t->mfired && !t->suppress ? DF_EALREADY_CALLED : 0;
    bool swallowed = t->suppress;
    t->suppress = false;
    if (how < 2) {
        mval *v = val_new(m, t->id, t);
        int rc = df_deferred_callback(t->d, v, val_free);
        CHECK(m, rc == want, "callback on #%d: %s, expected %s", t->id,
              df_err_name(rc), df_err_name(want));
        if (rc != 0)
            val_free(v);
        else if (!swallowed)
            m_fire(m, t, 0, (uintptr_t)v);
    } else {
        df_failure *f = df_failure_new(m->loop, E_U, "u %d", t->id);
        int rc = df_deferred_errback(t->d, f);
        CHECK(m, rc == want, "errback on #%d: %s, expected %s", t->id,
              df_err_name(rc), df_err_name(want));
        if (rc != 0)
            df_failure_unref(f);
        else if (!swallowed)
            m_fire(m, t, E_U, 0);
    }
}

/* Cancels a tracked deferred, in the library and the model. */
static void cancel_def(md *m, tdef *t)
{
    if (!DET(t->kind) && !t->fired) {
        t->cancel_req = true;
        if (t->kind == K_MAPP)
            m->maps[t->map]->cancel_req = true;
    }
    CHECK_RC(m, df_deferred_cancel(t->d), 0);
    if (DET(t->kind))
        m_cancel(m, t);
    else if (t->kind == K_ACQB)
        CHECK(m, t->fired == 1, "acqb #%d: cancel did not fire it", t->id);
}

static void op_cancel(md *m)
{
    tdef *t = pick_def(m, ~0u, false);
    if (t != NULL)
        cancel_def(m, t);
}

static void op_timeout(md *m)
{
    unsigned kinds = 1u << K_U | 1u << K_ACQ | 1u << K_RUN | 1u << K_LIST |
                     1u << K_JOB | 1u << K_RIP | 1u << K_MAPP;
    tdef *t = pick_def(m, kinds, false);
    bool zero = pick(m, 3) != 0;
    if (t == NULL || m->ntimers >= MAX_TIMERS)
        return;
    if (DET(t->kind) && t->nst >= MAX_STAGES)
        return;
    int want = t->has_timeout ? DF_EBUSY : 0;
    int rc = df_deferred_set_timeout(t->d, zero ? 0 : HOUR_NS);
    CHECK(m, rc == want, "set_timeout on #%d: %s, expected %s", t->id,
          df_err_name(rc), df_err_name(want));
    if (rc != 0 || want != 0)
        return;
    t->has_timeout = true;
    bool live = DET(t->kind) ? !t->mfired : !t->fired;
    if (!live)
        return; /* the pass-through ran at once and removed the timer */
    int k = m->ntimers++;
    m->timers[k] = (mtimer){TM_TIMEOUT, t->id, zero, TS_PENDING, NULL};
    t->timer = k;
    if (DET(t->kind))
        m_add_stage(m, t, (stage){ST_TIMEOUT, false, k, 0});
}

static void call_fn(void *arg, int status)
{
    call_arg *ca = arg;
    (void)status;
    ca->m->timers[ca->k].h = NULL;
    log_add(&ca->m->rlog, EV_TIMER, ca->k, 0, 0);
}

static void op_call_later(md *m)
{
    bool zero = pick(m, 3) != 0;
    if (m->ntimers >= MAX_TIMERS)
        return;
    int k = m->ntimers++;
    call_arg *ca = &m->call_args[k];
    *ca = (call_arg){m, k};
    m->timers[k] = (mtimer){TM_CALL, -1, zero, TS_PENDING, NULL};
    CHECK_RC(m,
             df_loop_call_later(m->loop, zero ? 0 : HOUR_NS, call_fn, ca,
                                &m->timers[k].h),
             0);
}

static void cancel_call_timer(md *m, int k)
{
    mtimer *tm = &m->timers[k];
    /* The handle is valid until the callback starts. */
    df_timer *h = tm->h;
    tm->state = TS_CANCELLED;
    tm->h = NULL;
    /* Freed here: a cancelled timer never calls back. */
    CHECK_RC(m, df_timer_cancel(h), 0);
}

static void op_timer_cancel(md *m)
{
    int cand[MAX_TIMERS], n = 0;
    for (int k = 0; k < m->ntimers; k++) {
        if (m->timers[k].kind == TM_CALL && m->timers[k].state == TS_PENDING)
            cand[n++] = k;
    }
    if (n == 0)
        return;
    cancel_call_timer(m, cand[pick(m, (unsigned)n)]);
}

static void op_acquire(md *m)
{
    int s = (int)pick(m, 2);
    tdef *t = def_new(m, K_ACQ);
    if (t == NULL)
        return;
    t->sem = s;
    CHECK_RC(m, s == 0 ? df_sem_acquire(m->sa, &t->d)
                       : df_lock_acquire(m->lk, &t->d),
             0);
    if (t->d == NULL)
        return;
    m_acquire(m, t);
    attach(m, t);
}

static void op_release(md *m)
{
    int s = (int)pick(m, 2);
    msem *ms = &m->ms[s];
    if (ms->held > 0) {
        ms->held--;
        CHECK_RC(m, s == 0 ? df_sem_release(m->sa) : df_lock_release(m->lk),
                 0);
        m_release(m, ms);
    } else if (ms->tokens == ms->limit) {
        CHECK_RC(m, s == 0 ? df_sem_release(m->sa) : df_lock_release(m->lk),
                 DF_EOVERRELEASE);
    }
}

static void op_run(md *m)
{
    int s = (int)pick(m, 2);
    int mode = (int)pick(m, 4);
    tdef *t = def_new(m, K_RUN);
    if (t == NULL)
        return;
    t->sem = s;
    t->mode = mode > 2 ? 2 : mode;
    if (t->mode == 2)
        m->reserved++;
    CHECK_RC(m, s == 0 ? df_sem_run(m->sa, run_fn, t, &t->d)
                       : df_lock_run(m->lk, run_fn, t, &t->d),
             0);
    if (t->d == NULL)
        return;
    m_run(m, t);
    attach(m, t);
}

static void op_list(md *m, bool gather)
{
    unsigned flags = pick(m, 16);
    int n = (int)pick(m, MAX_MEMBERS + 1);
    df_deferred *arr[MAX_MEMBERS];
    int ids[MAX_MEMBERS];
    int got = 0;
    if (gather)
        flags &= DF_LIST_CONSUME_ERRORS | DF_LIST_CANCEL_REMAINING;
    if (m->nlists >= MAX_LISTS)
        return;
    for (int i = 0; i < n; i++) {
        tdef *t = pick_def(m, 1u << K_U | 1u << K_ACQ | 1u << K_RUN, false);
        if (t == NULL || t->nst >= MAX_STAGES)
            continue;
        bool dup = false;
        for (int j = 0; j < got; j++)
            dup |= ids[j] == t->id;
        if (dup)
            continue;
        ids[got] = t->id;
        arr[got++] = t->d;
    }
    tdef *lt = def_new(m, K_LIST);
    if (lt == NULL)
        return;
    int rc = gather ? df_gather(m->loop, arr, (size_t)got, flags, &lt->d)
                    : df_list_new(m->loop, arr, (size_t)got, flags, &lt->d);
    CHECK(m, rc == 0, "list: %s", df_err_name(rc));
    if (rc != 0)
        return;

    mlist *l = &m->lists[m->nlists];
    lt->list = m->nlists++;
    memset(l, 0, sizeof *l);
    l->tid = lt->id;
    l->flags = gather ? flags | DF_LIST_FIRE_ON_ONE_ERRBACK : flags;
    l->n = got;
    l->collecting = true;
    l->fired_index = -1;
    memcpy(l->members, ids, sizeof ids[0] * (size_t)got);
    /* df_list_new: fire if empty, then attach in input order, a fired
     * member's callback running at once (as Twisted's DeferredList). */
    if (got == 0)
        m_list_fire(m, l, 0, digest_model(l));
    for (int i = 0; i < got; i++)
        m_add_stage(m, m->defs[ids[i]], (stage){ST_LIST, false, lt->list, i});
    attach(m, lt);
}

static void op_submit(md *m)
{
    int mode = (int)pick(m, 3) == 2;
    if (m->pool_down) {
        df_deferred *d = NULL;
        CHECK_RC(m, df_pool_submit(m->pool, job_work, NULL, &d),
                 DF_ESHUTDOWN);
        return;
    }
    tdef *t = def_new(m, K_JOB);
    if (t == NULL)
        return;
    t->mode = mode;
    CHECK_RC(m, df_pool_submit(m->pool, job_work, t, &t->d), 0);
    if (t->d != NULL)
        attach(m, t);
}

static void op_rip(md *m)
{
    int mode = (int)pick(m, 3) == 2;
    if (m->pool_down) {
        df_deferred *d = NULL;
        CHECK_RC(m, df_sem_run_in_pool(m->sb, m->pool, job_work, NULL, &d),
                 DF_ESHUTDOWN);
        return;
    }
    if (m->nb >= MAX_B)
        return;
    tdef *t = def_new(m, K_RIP);
    if (t == NULL)
        return;
    t->mode = mode;
    t->bpos = m->nb;
    m->bdefs[m->nb++] = t->id;
    CHECK_RC(m, df_sem_run_in_pool(m->sb, m->pool, job_work, t, &t->d), 0);
    if (t->d != NULL)
        attach(m, t);
}

static void op_acquire_b(md *m)
{
    if (m->nb >= MAX_B)
        return;
    tdef *t = def_new(m, K_ACQB);
    if (t == NULL)
        return;
    t->bpos = m->nb;
    m->bdefs[m->nb++] = t->id;
    unsigned free_before = df_sem_tokens(m->sb);
    CHECK_RC(m, df_sem_acquire(m->sb, &t->d), 0);
    if (t->d == NULL)
        return;
    attach(m, t);
    CHECK(m, (t->fired == 1) == (free_before > 0),
          "acqb #%d: fired %d with %u tokens free before", t->id, t->fired,
          free_before);
}

static void op_release_b(md *m)
{
    if (m->held_b > 0) {
        m->held_b--;
        pthread_mutex_lock(&m->bmu);
        m->held_b_shared--;
        pthread_mutex_unlock(&m->bmu);
        CHECK_RC(m, df_sem_release(m->sb), 0);
    } else if (df_sem_tokens(m->sb) == m->lim_b) {
        CHECK_RC(m, df_sem_release(m->sb), DF_EOVERRELEASE);
    }
}

static void op_drive(md *m)
{
    unsigned budget = pick(m, 4);
    m_run_timers(m, true);
    CHECK_RC(m, df_loop_dispatch(m->loop, budget, NULL), 0);
    m_run_timers(m, false);
}

static void pool_shutdown(md *m, int mode)
{
    if (m->pool_down) {
        CHECK_RC(m, df_pool_shutdown(m->pool, mode), 0);
        return;
    }
    valve_set(m, true);
    for (int i = 0; i < m->ndefs; i++) {
        tdef *t = m->defs[i];
        if ((t->kind == K_JOB || t->kind == K_RIP) && !t->fired) {
            t->shut_seen = true;
            t->shut_mode = mode;
        }
    }
    for (int i = 0; i < m->nmaps; i++) {
        if (m->maps[i]->pool_mode) {
            m->maps[i]->shut_seen = true;
            m->maps[i]->shut_cancel |= mode == DF_POOL_CANCEL;
        }
    }
    m->pool_down = true;
    CHECK_RC(m, df_pool_shutdown(m->pool, mode), 0);
    for (int i = 0; i < m->ndefs; i++) {
        tdef *t = m->defs[i];
        if (t->kind == K_JOB || t->kind == K_RIP || t->kind == K_MAPP)
            CHECK(m, t->fired == 1, "%s #%d not fired after shutdown",
                  kind_names[t->kind], t->id);
    }
}

static void op_pool_new(md *m)
{
    if (!m->pool_down)
        return;
    df_pool_free(m->pool);
    m->pool = NULL;
    df_pool_options o = DF_POOL_OPTIONS_INIT;
    o.threads = m->threads;
    CHECK_RC(m, df_pool_new(m->loop, &o, &m->pool), 0);
    m->pool_down = false;
    atomic_store(&m->last_job, -1);
}

static void op_map(md *m)
{
    unsigned cfg = pick(m, 256);
    unsigned n = pick(m, 13);
    uint32_t failmask = src_byte(m->src);
    if (m->nmaps >= MAX_MAPS)
        return;
    failmask = (cfg & 8) ? failmask | (failmask << 8) : 0;
    bool pool_mode = cfg & 1;
    tdef *t = def_new(m, pool_mode ? K_MAPP : K_MAPC);
    if (t == NULL)
        return;
    mmap *mm = calloc(1, sizeof *mm);
    if (mm == NULL)
        abort();
    mm->m = m;
    mm->idx = m->nmaps;
    mm->tid = t->id;
    mm->pool_mode = pool_mode;
    mm->ordered = cfg & 2;
    mm->soe = cfg & 4;
    mm->limit = 1 + (cfg >> 4) % 3;
    mm->window = (cfg >> 6) % 3;
    mm->n = (int)n;
    mm->failmask = failmask;
    mm->down_at_start = pool_mode && m->pool_down;
    atomic_init(&mm->running, 0);
    m->maps[m->nmaps++] = mm;
    t->map = mm->idx;

    df_map_options o = {0};
    o.limit = mm->limit;
    o.flags = (mm->ordered ? DF_MAP_ORDERED : 0) |
              (mm->soe ? DF_MAP_STOP_ON_ERROR : 0);
    o.window = mm->window;
    o.next = map_next;
    o.next_arg = mm;
    if (pool_mode) {
        o.pool = m->pool;
        o.work = map_work;
    } else {
        o.call = map_call;
    }
    o.on_result = map_result;
    o.arg = mm;
    /* The effective window, for the bound check. */
    if (mm->window == 0)
        mm->window = mm->limit;
    CHECK_RC(m, df_map_start(m->loop, &o, &mm->mp, &t->d), 0);
    if (t->d == NULL)
        return;
    if (!pool_mode)
        m_map_call(m, mm, t);
    attach(m, t);
}

static void op_map_cancel(md *m)
{
    if (m->nmaps == 0)
        return;
    mmap *mm = m->maps[pick(m, (unsigned)m->nmaps)];
    tdef *t = m->defs[mm->tid];
    if (!t->fired)
        mm->cancel_req = true;
    CHECK_RC(m, df_map_cancel(mm->mp), 0);
}

static void apply(md *m, int op)
{
    switch (op) {
    case OP_U_NEW: op_u_new(m); break;
    case OP_U_FIRE: op_u_fire(m); break;
    case OP_CANCEL: op_cancel(m); break;
    case OP_TIMEOUT: op_timeout(m); break;
    case OP_CALL_LATER: op_call_later(m); break;
    case OP_TIMER_CANCEL: op_timer_cancel(m); break;
    case OP_ACQ: op_acquire(m); break;
    case OP_REL: op_release(m); break;
    case OP_RUN: op_run(m); break;
    case OP_LIST: op_list(m, false); break;
    case OP_GATHER: op_list(m, true); break;
    case OP_SUBMIT: op_submit(m); break;
    case OP_RIP: op_rip(m); break;
    case OP_ACQB: op_acquire_b(m); break;
    case OP_RELB: op_release_b(m); break;
    case OP_VALVE: valve_set(m, pick(m, 2) == 0); break;
    case OP_DRIVE: op_drive(m); break;
    case OP_SETTLE:
        settle(m);
        if (!atomic_load(&m->failed)) {
            check_b_settled(m);
            check_b_fifo(m);
        }
        break;
    case OP_SHUTDOWN: pool_shutdown(m, (int)pick(m, 2)); break;
    case OP_POOL_NEW: op_pool_new(m); break;
    case OP_MAP: op_map(m); break;
    case OP_MAP_CANCEL: op_map_cancel(m); break;
    }
}

/* ------------------------------------------------------------- life cycle */

static void count_unhandled(df_failure *f, void *arg)
{
    (void)f;
    ((md *)arg)->unhandled++;
}

static int setup(md *m)
{
    unsigned cfg = src_byte(m->src);
    static const df_allocator proto = {tu_ca_malloc, tu_ca_realloc,
                                       tu_ca_free, NULL};
    df_allocator a = proto;
    a.ctx = &m->ca;
    df_loop_options lo = DF_LOOP_OPTIONS_INIT;
    lo.allocator = &a;
    lo.unhandled = count_unhandled;
    lo.unhandled_arg = m;
    if (df_loop_new(&lo, &m->loop) != 0)
        return -1;
    m->ms[0].limit = m->ms[0].tokens = 1 + cfg % 3;
    m->ms[1].limit = m->ms[1].tokens = 1;
    m->lim_b = 1 + (cfg / 3) % 3;
    m->threads = 1 + (cfg / 9) % 3;
    df_pool_options po = DF_POOL_OPTIONS_INIT;
    po.threads = m->threads;
    if (df_sem_new(m->loop, m->ms[0].limit, &m->sa) != 0 ||
        df_lock_new(m->loop, &m->lk) != 0 ||
        df_sem_new(m->loop, m->lim_b, &m->sb) != 0 ||
        df_pool_new(m->loop, &po, &m->pool) != 0)
        return -1;
    m->valve_open = true;
    atomic_store(&m->last_job, -1);
    if (m->trace)
        fprintf(stderr, "model: A %u, B %u, %u threads\n", m->ms[0].limit,
                m->lim_b, m->threads);
    return 0;
}

/* Cancels and frees everything, checking that every item is accounted
 * for exactly once and that nothing is left. */
static void teardown(md *m)
{
    m->opname = "teardown";
    valve_set(m, true);
    /* Every unfired deferred is cancelled, in the order they were made;
     * runs that start meanwhile may make more, which are reached too. */
    for (int i = 0; i < m->ndefs && !atomic_load(&m->failed); i++) {
        tdef *t = m->defs[i];
        bool unfired = DET(t->kind) ? !t->mfired : !t->fired;
        if (t->d != NULL && unfired)
            cancel_def(m, t);
    }
    for (int s = 0; s < 2; s++) {
        while (m->ms[s].held > 0) {
            m->ms[s].held--;
            CHECK_RC(m, s == 0 ? df_sem_release(m->sa)
                               : df_lock_release(m->lk),
                     0);
            m_release(m, &m->ms[s]);
        }
    }
    while (m->held_b > 0) {
        m->held_b--;
        pthread_mutex_lock(&m->bmu);
        m->held_b_shared--;
        pthread_mutex_unlock(&m->bmu);
        CHECK_RC(m, df_sem_release(m->sb), 0);
    }
    for (int k = 0; k < m->ntimers; k++) {
        if (m->timers[k].kind == TM_CALL && m->timers[k].state == TS_PENDING)
            cancel_call_timer(m, k);
    }
    for (int i = 0; i < m->nmaps; i++) {
        if (!m->defs[m->maps[i]->tid]->fired)
            m->maps[i]->cancel_req = true;
        CHECK_RC(m, df_map_cancel(m->maps[i]->mp), 0);
    }
    pool_shutdown(m, (int)pick(m, 2));
    check_state(m);
    if (atomic_load(&m->failed))
        return;
    CHECK(m, df_loop_pending(m->loop) == 0,
          "%zu things pending after teardown", df_loop_pending(m->loop));
    CHECK(m, pending_timers(m) == 0, "model: timers left");
    check_b_fifo(m);
    CHECK(m, df_sem_tokens(m->sa) == m->ms[0].limit &&
                 df_sem_waiting(m->sa) == 0,
          "A not idle at the end");
    CHECK(m, !df_lock_locked(m->lk), "L locked at the end");
    CHECK(m, df_sem_tokens(m->sb) == m->lim_b && df_sem_waiting(m->sb) == 0,
          "B not idle at the end: %u free, %zu waiting",
          df_sem_tokens(m->sb), df_sem_waiting(m->sb));
    uint64_t expect = m->unhandled;
    for (int i = 0; i < m->ndefs; i++) {
        tdef *t = m->defs[i];
        if (t->d == NULL)
            continue;
        CHECK(m, t->fired == 1, "%s #%d fired %d times",
              kind_names[t->kind], t->id, t->fired);
        if (t->kind == K_JOB || t->kind == K_RIP)
            CHECK(m, atomic_load(&t->ran) <= 1, "job ran twice");
        df_failure *f = NULL;
        if (df_deferred_peek(t->d, NULL, &f) == 0 && f != NULL)
            expect++;
    }
    if (atomic_load(&m->failed))
        return;
    for (int i = 0; i < m->ndefs; i++) {
        df_deferred_unref(m->defs[i]->d);
        m->defs[i]->d = NULL;
    }
    /* The maps hold their done deferreds until freed. */
    for (int i = 0; i < m->nmaps; i++)
        CHECK_RC(m, df_map_free(m->maps[i]->mp), 0);
    CHECK(m, m->unhandled == expect,
          "%" PRIu64 " unhandled failures reported, expected %" PRIu64,
          m->unhandled, expect);
    /* Free the pool before or after the semaphores (the gate goes with
     * whichever is first). */
    bool pool_first = pick(m, 2);
    if (pool_first) {
        df_pool_free(m->pool);
        m->pool = NULL;
    }
    CHECK_RC(m, df_sem_free(m->sa), 0);
    CHECK_RC(m, df_lock_free(m->lk), 0);
    CHECK_RC(m, df_sem_free(m->sb), 0);
    if (!pool_first)
        df_pool_free(m->pool);
    CHECK_RC(m, df_loop_free(m->loop), 0);
    CHECK(m, atomic_load(&m->ca.live) == 0, "%ld blocks leaked",
          atomic_load(&m->ca.live));
}

static void md_destroy(md *m)
{
    for (int i = 0; i < m->ndefs; i++)
        free(m->defs[i]);
    for (int i = 0; i < m->nmaps; i++)
        free(m->maps[i]);
    free(m->rlog.e);
    free(m->mlog.e);
    pthread_cond_destroy(&m->cv);
    pthread_mutex_destroy(&m->mu);
    pthread_mutex_destroy(&m->bmu);
    free(m);
}

int md_run(md_src *src, unsigned max_ops, bool trace, md_result *res)
{
    md *m = calloc(1, sizeof *m);
    if (m == NULL)
        abort();
    m->src = src;
    m->trace = trace;
    pthread_mutex_init(&m->mu, NULL);
    pthread_mutex_init(&m->bmu, NULL);
    pthread_cond_init(&m->cv, NULL);
    atomic_init(&m->failed, 0);
    memset(res, 0, sizeof *res);
    m->opname = "setup";
    if (setup(m) != 0) {
        snprintf(res->msg, sizeof res->msg, "setup failed");
        return -1;
    }
    unsigned long n;
    for (n = 0; n < max_ops; n++) {
        uint8_t b = src_byte(src);
        if (src->exhausted)
            break;
        int op = op_table[b % sizeof op_table];
        m->step = n;
        m->opname = op_names[op];
        apply(m, op);
        if (trace)
            fprintf(stderr, "model: %4lu %-12s defs %d events %zu\n", n,
                    op_names[op], m->ndefs, m->rlog.n);
        if (trace && m->ndefs > 0) {
            for (int i = 0; i < m->ndefs; i++) {
                tdef *t = m->defs[i];
                fprintf(stderr, " #%d%s%s%s", t->id, kind_names[t->kind],
                        t->fired ? "*" : "", t->mfired ? "m" : "");
            }
            fprintf(stderr, "\n timers:");
            for (int k = 0; k < m->ntimers; k++)
                fprintf(stderr, " %d:%s/%d/%d", k,
                        m->timers[k].kind == TM_CALL ? "call" : "to",
                        m->timers[k].tid, m->timers[k].state);
            fprintf(stderr, "\n");
        }
        if (!atomic_load(&m->failed))
            check_state(m);
        if (atomic_load(&m->failed))
            break;
    }
    res->ops = n;
    m->step = n;
    if (!atomic_load(&m->failed))
        teardown(m);
    if (atomic_load(&m->failed)) {
        res->step = m->step;
        pthread_mutex_lock(&m->mu);
        memcpy(res->msg, m->msg, sizeof res->msg);
        pthread_mutex_unlock(&m->mu);
        /* Leaked on purpose: workers may still wait at the valve. */
        valve_set(m, true);
        return -1;
    }
    md_destroy(m);
    return 0;
}
