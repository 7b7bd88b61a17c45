/* SPDX-License-Identifier: MIT */
/* The map: bounded streaming over an input that may never end. */
#include <string.h>

#include "loop-internal.h"
#include "sem-internal.h"

/*
 * Memory
 * ------
 * Everything the map needs is allocated by df_map_start(): the map, a table
 * of slots, the summary that the done deferred fires with, and the done
 * deferred itself, and, with a pool, a semaphore of `limit` tokens.
 * Nothing allocates per item: with a pool, each slot embeds its job.
 *
 * A slot holds one item from the moment it is pulled until its result has
 * been delivered:
 *
 *   FREE --pull--> RUNNING --result--> FINISHED --deliver--> FREE
 *
 * With a pool, items run as jobs of the map's own semaphore of `limit`
 * tokens (sem-internal.h), and up to `ahead` more items are pulled ahead
 * and wait in its line: a worker that finishes an item hands its token
 * to the next pulled item and runs it at once, with no round trip through
 * the loop thread, while pulling (next) stays on the loop thread.  So at
 * most `limit` items run, and `ahead` more may be pulled and wait.
 *
 * Read-ahead
 * ----------
 * `ahead` is 0 without a pool or with DF_MAP_NO_READAHEAD (for a `next`
 * that may block).  Otherwise it adapts, between ahead_min = max(limit,
 * DF__MAP_AHEAD_MIN) and ahead_max = max(limit, DF__MAP_AHEAD_MAX), or
 * the application's readahead_max (and ahead_min no higher): it
 * starts at ahead_min and doubles when the line ran dry while the input
 * goes on, that is when the loop sees a finished job whose token was not
 * handed on (j->h.handed false: the worker found no pulled item waiting,
 * so it returned the token and, with nothing queued, went to sleep, to be
 * woken by the next refill).  When the loop is the slower side (short
 * items), a line of 64 runs dry every 64 items and each refill costs the
 * workers a wake-up; a deeper line makes that rare.  When the workers are
 * the slower side (long items), the loop refills the line before it
 * empties and the read-ahead stays at ahead_min, so big items are not
 * pulled early for nothing.  It grows at most once per `limit` finished
 * jobs (the workers of one wave running dry together count once) and
 * never shrinks: its cap is what bounds the memory.  With more tokens
 * than threads, jobs that hold a token may still wait on the pool's
 * queue when the line runs dry, so it may grow before the workers sleep;
 * never beyond the cap.
 *
 * Unordered mode has `limit + ahead_max` slots, kept on an intrusive free
 * list; they are allocated at the start (so they never move while jobs
 * point at them) but initialised, and so touched, only as the read-ahead
 * reaches them.  A finished slot waits on a FIFO queue for the pump to
 * deliver it, which it does before pulling again, so at most `limit +
 * ahead` items are pulled but not delivered.

 * Ordered mode has `window + 1` slots and item i lives in slot i % nslots.
 * An item is pulled only while fewer than `limit + ahead` are in flight
 * and at most `window` items are pulled but undelivered.  The oldest undelivered item is never
 * held back (it is delivered as soon as it finishes), so even if every
 * other item finishes first, at most `window` results wait: that is the
 * window's bound.  The indices in use always span fewer than nslots
 * values, so slot i % nslots is free when item i is pulled.  A window
 * smaller than limit - 1 therefore also lowers the concurrency.
 *
 * Re-entrancy
 * -----------
 * `next`, `call` and `on_result` are application code and may call back
 * into the map (df_map_cancel, df_map_get_stats, df_map_free); items may
 * finish synchronously, inside `call` or inside a cancel.  None of that
 * may recurse: 10^6 items that finish at once must run in constant stack.
 * So every entry point (start, cancel, an item's completion) enters the
 * map; only the outermost entry runs the pump, a loop that delivers what
 * can be delivered and pulls while it may, until neither is possible.
 * Nested entries only record their change of state, which the running pump
 * sees on its next turn.  The pump fires the done deferred last and frees
 * the map if df_map_free() was called from a callback in the meantime.
 */

enum { SLOT_FREE = 0, SLOT_RUNNING, SLOT_FINISHED };

/* A slot takes whole cache lines (the table is aligned to them): a
 * worker writes to the job of one slot while the loop thread delivers
 * and refills the slots beside it, and slots that shared a line made the
 * line cross between the cores for both.  The job's head fills the
 * second line on its own, so that the loop's walk over the inbox
 * (inbox.c) misses once on it, while the line of the io is fetched at the
 * same time. */
#define SLOT_ALIGN 64
typedef struct slot {
    _Alignas(SLOT_ALIGN) uint64_t index; /* input position */
    df__job_io io;  /* pool: the job's io, DF__JOB_IO_BACK before it */
    df_map *map;
    void *item;     /* owned until delivered */
    df_free_fn item_free;
    df__sem_job sj; /* pool: the item's job */
    df_deferred *d;    /* RUNNING, call: the item's deferred (own ref) */
    df_result result;  /* FINISHED: the result until delivered */
    df__ilink link;    /* unordered: free slots or finished queue */
    int state;
} slot;

_Static_assert(offsetof(slot, sj) % SLOT_ALIGN == 0 &&
                   sizeof(df__sem_job) <= SLOT_ALIGN,
               "a slot's job fills a cache line of its own");
_Static_assert(offsetof(slot, sj) - offsetof(slot, io) == DF__JOB_IO_BACK,
               "a job's io lies DF__JOB_IO_BACK bytes before it");

/* The done deferred's value.  df_free_fn gets only the pointer, so the
 * summary carries a copy of the loop's allocator to free itself with (it
 * may outlive the loop if the application keeps it). */
typedef struct summary {
    df_map_stats stats; /* first: the value handed out points here */
    df_allocator alloc;
} summary;

struct df_map {
    df_loop *loop;
    df_map_options opts;
    bool ordered;
    bool stop_on_error;

    slot *slots;             /* in slots_mem, aligned to SLOT_ALIGN */
    void *slots_mem;
    size_t nslots;
    size_t nready;           /* unordered: slots initialised so far   */
    uint64_t max_inflight;   /* limit + ahead (see the top)          */
    uint64_t ahead;          /* read-ahead now (see the top)          */
    uint64_t ahead_max;      /* its cap                               */
    uint64_t jobs_done;      /* pool jobs finished                    */
    uint64_t grown_at;       /* jobs_done when `ahead` last grew      */
    df_sem *sem;             /* pool: `limit` tokens, the items' line */
    df_pool *pool;           /* pool: NULL once it has stopped        */
    df__pool_client client;  /* pool: told when it stops              */
    df__ilink free_slots; /* unordered: free slots            */
    df__ilink finished_q; /* unordered: finished, FIFO        */

    uint64_t pulled;
    uint64_t running;
    uint64_t buffered;
    uint64_t done; /* ordered: also the next index to deliver */
    uint64_t failed;
    uint64_t cancelled;

    df_deferred *done_d;      /* own reference, dropped by df_map_free */
    summary *summary;         /* until handed to done_d */
    df_failure *stop_failure; /* what done fails with; NULL: success */

    bool ended;          /* pull no more: end, stop, iterator error */
    bool cancelling;     /* items in flight are being cancelled */
    bool pumping;        /* an entry point is active (see above) */
    bool finished;       /* done_d has been fired */
    bool free_requested; /* df_map_free() called while pumping */
    df__turn_hook release; /* pool: puts the held items on the line */
};

/* The read-ahead's floor and default cap with a pool (see the top).  At
 * 64 ahead and no work, 2 workers go to sleep and are woken about 69,000
 * times per 10^6 items; at 1024, 1,500 to 6,400 times.  With short items
 * the map keeps up with the eager form only with a deeper line: 10^6
 * items of no work at limit 64 took 493 ns each at a cap of 1024, 386 at
 * 4096, 307 at 8192 and 273 at 16384 (medians of 9 interleaved rounds,
 * bench/RESULTS.md, "after s6"); a slot is 192 bytes, so 8192 of them
 * are 1.5 MiB. */
#define DF__MAP_AHEAD_MIN 64
#define DF__MAP_AHEAD_MAX 8192

static uint64_t map_ahead_max(const df_map_options *o)
{
    if (o->pool == NULL || (o->flags & DF_MAP_NO_READAHEAD))
        return 0;
    if (o->readahead_max != 0)
        return o->readahead_max;
    return o->limit > DF__MAP_AHEAD_MAX ? o->limit : DF__MAP_AHEAD_MAX;
}

static uint64_t map_ahead_min(const df_map_options *o)
{
    uint64_t floor = o->limit > DF__MAP_AHEAD_MIN ? o->limit
                                                   : DF__MAP_AHEAD_MIN;
    uint64_t cap = map_ahead_max(o);
    return floor < cap ? floor : cap;
}

static void summary_free(void *p)
{
    summary *s = p;
    df_allocator a = s->alloc;
    a.free(s, a.ctx);
}

/* ------------------------------------------------------------- stopping */

/* Records why done will fail (the first reason wins; steals f) and stops
 * pulling. */
static void set_stop(df_map *m, df_failure *f)
{
    if (f != NULL) {
        if (m->stop_failure == NULL)
            m->stop_failure = f;
        else
            df_failure_unref(f);
    }
    m->ended = true;
}

/* Cancels every item in flight, once.  Cancelling may finish items at
 * once (re-entering the map through on_complete); the flag set first keeps
 * that from starting another pass. */
static void cancel_running(df_map *m)
{
    if (m->cancelling)
        return;
    m->cancelling = true;
    size_t n = m->ordered ? m->nslots : m->nready; /* the rest: unused */
    for (size_t i = 0; i < n; i++) {
        slot *s = &m->slots[i];
        if (s->state == SLOT_RUNNING && m->sem != NULL) {
            /* May finish it now (re-entering the map). */
            df__sem_job_cancel(&s->sj);
        } else if (s->state == SLOT_RUNNING && s->d != NULL) {
            /* on_complete drops the slot's reference: hold one. */
            df_deferred *d = df_deferred_ref(s->d);
            df_deferred_cancel(d);
            df_deferred_unref(d);
        }
    }
}

/* ------------------------------------------------------------ finishing */

/* Stores the result of slot s (steals r) and queues it for delivery. */
static void finish_slot(df_map *m, slot *s, df_result r)
{
    DF__HOT_ASSERT(s->state == SLOT_RUNNING && r.wait == NULL);
    s->result = r;
    s->state = SLOT_FINISHED;
    m->running--;
    m->buffered++;
    if (!m->ordered) {
        df__ilist_append(&m->finished_q, &s->link);
    }
    /* Stop at the first failure in completion order, so that no more work
     * starts; the items before it in ordered mode are still delivered.  A
     * failure of the iterator before it stays the reason done fails. */
    if (r.failure != NULL && m->stop_on_error && !m->cancelling) {
        set_stop(m, df_failure_ref(r.failure));
        cancel_running(m);
    }
}

static bool map_enter(df_map *m);
static void map_leave(df_map *m, bool outer);

/* Callback and errback of every item's deferred. */
static df_result on_complete(df_result r, void *arg)
{
    slot *s = arg;
    df_map *m = s->map;
    df_deferred *d = s->d;
    bool outer = map_enter(m);

    s->d = NULL;
    finish_slot(m, s, r);
    /* The chain being run holds its own reference, so d stays valid. */
    df_deferred_unref(d);
    map_leave(m, outer); /* may free m */
    return df_ok(NULL, NULL);
}

/* Loop thread: a pool job has finished; `handed` says whether its token
 * went on to a pulled item.  If not, the line ran dry (see the top). */
static void adapt_ahead(df_map *m, bool handed)
{
    m->jobs_done++;
    if (handed || m->ahead >= m->ahead_max || m->ended || m->cancelling)
        return;
    if (m->jobs_done - m->grown_at < m->opts.limit && m->grown_at != 0)
        return; /* the same wave */
    m->grown_at = m->jobs_done;
    /* Saturating: a cap above 2^63 must not wrap the double to 0. */
    m->ahead = m->ahead > m->ahead_max / 2 ? m->ahead_max : m->ahead * 2;
    m->max_inflight = m->ahead > UINT64_MAX - m->opts.limit
                          ? UINT64_MAX
                          : m->opts.limit + m->ahead;
}

/* The end of a pool item's job (its token is back or handed on). */
static void on_job_finish(df__sem_job *sj, df_result r)
{
    slot *s = DF__CONTAINER_OF(sj, slot, sj);
    df_map *m = s->map;
    bool outer = map_enter(m);
    adapt_ahead(m, sj->job.h.handed);
    finish_slot(m, s, r);
    map_leave(m, outer); /* may free m */
}

/* --------------------------------------------------------------- pulling */

static bool can_pull(const df_map *m)
{
    if (m->ended || m->running >= m->max_inflight)
        return false;
    if (m->ordered)
        return m->pulled - m->done <= m->opts.window;
    return !df__ilist_empty(&m->free_slots) || m->nready < m->nslots;
}

static slot *take_slot(df_map *m)
{
    slot *s;
    if (m->ordered) {
        s = &m->slots[m->pulled % m->nslots];
    } else if (!df__ilist_empty(&m->free_slots)) {
        s = DF__ILIST_ENTRY(df__ilist_pop(&m->free_slots), slot, link);
    } else {
        /* The read-ahead has grown into a slot never used before. */
        s = &m->slots[m->nready++];
        memset(s, 0, sizeof *s);
        s->map = m;
    }
    DF__HOT_ASSERT(s->state == SLOT_FREE);
    return s;
}

/* The pool job of an item: the map's work with its own argument. */
static df_result slot_work(df_work *w, void *arg)
{
    slot *s = arg;
    return s->map->opts.work(w, s->item, s->map->opts.work_arg);
}

/* Hands item s to the pool: it runs when it gets one of the map's
 * tokens. */
static void start_pool(df_map *m, slot *s)
{
    /* A pool shut down (or freed: m->pool is then NULL), perhaps by next()
     * itself, takes no new item. */
    int rc = DF_ESHUTDOWN;
    if (m->pool != NULL && df__pool_open(m->pool))
        rc = df__sem_job_run(m->sem, m->pool, &s->sj, slot_work, s);
    if (rc != 0) {
        /* The pool cannot run anything (shut down, out of memory): this
         * item fails, and the map stops whatever its policy, or an endless
         * input would turn into an endless stream of failures. */
        finish_slot(m, s, df_errf(m->loop, rc, "map: cannot submit item"));
        set_stop(m, df_failure_new(m->loop, rc, "map: cannot submit item"));
    }
}

/* Runs item s with `call` on the loop thread. */
static void start_call(df_map *m, slot *s)
{
    df_result r = m->opts.call(s->item, m->opts.arg);
    if (r.wait == NULL) {
        finish_slot(m, s, r);
        return;
    }
    df_deferred *d = r.wait;
    if (r.failure != NULL || r.free != NULL) {
        /* Only df_wait() may set wait: drop the rest, as chains do. */
        r.wait = NULL;
        df_result_clear(&r);
    }
    if (df_deferred_loop(d) != m->loop) {
        df_deferred_unref(d);
        finish_slot(m, s,
                    df_errf(m->loop, DF_EINVAL,
                            "map: call returned a deferred of "
                            "another loop"));
        return;
    }
    /* If d has fired, on_complete runs inside add_callbacks; it clears
     * s->d and, the map being entered already, only records the result. */
    s->d = d;
    int rc = df_deferred_add_callbacks(d, on_complete, on_complete, s);
    if (rc != 0) {
        s->d = NULL;
        df_deferred_unref(d);
        finish_slot(m, s, df_errf(m->loop, rc, "map: cannot watch item"));
        return;
    }
    /* `call` itself may have cancelled the map before d was known. */
    if (m->cancelling && s->state == SLOT_RUNNING && s->d == d) {
        df_deferred_ref(d);
        df_deferred_cancel(d);
        df_deferred_unref(d);
    }
}

/* Pulls one input and starts it. */
static void pull_one(df_map *m)
{
    void *item = NULL;
    df_free_fn item_free = NULL;
    int rc = m->opts.next(m->opts.next_arg, &item, &item_free);

    if (rc == 0) {
        m->ended = true;
        return;
    }
    if (rc < 0) {
        /* Stop pulling; the items in flight finish normally. */
        set_stop(m, df_failure_new(m->loop, rc, "map: iterator failed: %s (%d)",
                                   df_strerror(rc), rc));
        return;
    }
    /* Room was checked before calling next, and next cannot pull. */
    slot *s = take_slot(m);
    s->index = m->pulled++;
    s->item = item;
    s->item_free = item_free;
    s->d = NULL;
    s->state = SLOT_RUNNING;
    m->running++;
    if (m->cancelling) {
        /* next() cancelled the map and returned an item anyway: every
         * pulled item is delivered once, this one as cancelled. */
        finish_slot(m, s, df_errf(m->loop, DF_ECANCELLED, NULL));
        return;
    }
    if (m->sem != NULL)
        start_pool(m, s);
    else
        start_call(m, s);
}

/* ------------------------------------------------------------ delivering */

/* Delivers the next deliverable result, if any. */
static bool deliver_one(df_map *m)
{
    slot *s;
    if (m->ordered) {
        s = &m->slots[m->done % m->nslots];
        if (s->state != SLOT_FINISHED)
            return false;
        assert(s->index == m->done);
    } else {
        df__ilink *l = df__ilist_pop(&m->finished_q);
        if (l == NULL)
            return false;
        s = DF__ILIST_ENTRY(l, slot, link);
    }
    df_result r = s->result;
    uint64_t index = s->index;
    void *item = s->item;
    df_free_fn item_free = s->item_free;

    /* Free the slot first: nothing can pull while the pump delivers. */
    s->result = df_ok(NULL, NULL);
    s->item = NULL;
    s->item_free = NULL;
    s->state = SLOT_FREE;
    if (!m->ordered)
        df__ilist_append(&m->free_slots, &s->link);
    m->buffered--;
    m->done++;
    if (r.failure != NULL) {
        m->failed++;
        if (df_failure_code(r.failure) == DF_ECANCELLED)
            m->cancelled++;
    }
    if (m->opts.on_result != NULL)
        m->opts.on_result(index, item, r, m->opts.arg);
    else
        df_result_clear(&r);
    if (item_free != NULL)
        item_free(item);
    return true;
}

/* ------------------------------------------------------------ the pump */

static void fill_stats(const df_map *m, df_map_stats *st)
{
    st->pulled = m->pulled;
    st->running = m->running;
    st->done = m->done;
    st->failed = m->failed;
    st->cancelled = m->cancelled;
    st->buffered = m->buffered;
}

/* Fires done once the input has ended or stopped and every item pulled
 * has been delivered. */
static void maybe_finish(df_map *m)
{
    if (m->finished || !m->ended || m->running != 0 || m->buffered != 0)
        return;
    m->finished = true;
    if (m->stop_failure != NULL) {
        df_failure *f = m->stop_failure;
        m->stop_failure = NULL;
        if (df_deferred_errback(m->done_d, f) != 0)
            df_failure_unref(f); /* the application fired it itself */
    } else {
        summary *sum = m->summary;
        m->summary = NULL;
        fill_stats(m, &sum->stats);
        if (df_deferred_callback(m->done_d, sum, summary_free) != 0)
            summary_free(sum);
    }
}

static void map_destroy(df_map *m)
{
    df_loop *loop = m->loop;
    df__loop_turn_cancel(loop, &m->release);
    df_deferred_unref(m->done_d);
    if (m->summary != NULL)
        summary_free(m->summary);
    df_failure_unref(m->stop_failure);
    df__pool_client_remove(&m->client);
    if (m->sem != NULL)
        df__sem_drop(m->sem);
    df__free(loop, m->slots_mem);
    df__free(loop, m);
    df__loop_maps_add(loop, -1); /* df_loop_get_stats */
}

/* The items pulled in a turn of the loop may reach the workers only at
 * its end (df__sem_job_run holds them back while the line is long, and
 * df__sem_release_held puts them there), as runs of up to 64 items, so
 * that the loop thread and the workers contend for the line's end once
 * per run, not once per item. */
static void release_held(df__turn_hook *h)
{
    df_map *m = DF__CONTAINER_OF(h, df_map, release);
    df__sem_release_held(m->sem);
}

/* Returns true for the outermost entry, which must call map_leave(). */
static bool map_enter(df_map *m)
{
    bool outer = !m->pumping;
    m->pumping = true;
    return outer;
}

/* The pump (see the top of the file).  Runs only for the outermost entry;
 * the map may be freed when it returns. */
static void map_leave(df_map *m, bool outer)
{
    if (!outer)
        return;
    for (;;) {
        if (deliver_one(m))
            continue;
        if (can_pull(m)) {
            pull_one(m);
            continue;
        }
        break;
    }
    if (m->sem != NULL)
        df__loop_at_turn_end(m->loop, &m->release); /* see release_held */
    maybe_finish(m);
    m->pumping = false;
    if (m->free_requested)
        map_destroy(m);
}

/* ------------------------------------------------------------------ API */

/* The map's pool stops taking work (shut down or freed, perhaps from one
 * of the map's own callbacks): the map stops pulling and done fails with
 * DF_ESHUTDOWN once the items in flight are delivered (the semaphore
 * fails those still waiting for a token).  No user code runs here. */
static void pool_stopped(df__pool_client *c, df_pool *p)
{
    DF__UNUSED(p);
    df_map *m = DF__CONTAINER_OF(c, df_map, client);
    m->pool = NULL;
    if (!m->finished)
        set_stop(m, df_failure_new(m->loop, DF_ESHUTDOWN,
                                   "map: pool shut down"));
}

/* Then: finish if nothing is left in flight. */
static void pool_flush(df__pool_client *c)
{
    df_map *m = DF__CONTAINER_OF(c, df_map, client);
    map_leave(m, map_enter(m)); /* may free m */
}

static void done_canceller(df_deferred *d, void *arg)
{
    DF__UNUSED(d);
    df_map_cancel(arg);
}

static int check_options(const df_map_options *o)
{
    if (o->limit == 0 || o->next == NULL)
        return DF_EINVAL;
    if (o->flags & ~(unsigned)(DF_MAP_ORDERED | DF_MAP_STOP_ON_ERROR |
                               DF_MAP_NO_READAHEAD))
        return DF_EINVAL;
    if (o->pool != NULL) {
        if (o->work == NULL || o->call != NULL)
            return DF_EINVAL;
    } else {
        if (o->call == NULL || o->work != NULL)
            return DF_EINVAL;
    }
    if ((o->flags & DF_MAP_ORDERED) && o->window == SIZE_MAX)
        return DF_EINVAL; /* window + 1 slots */
    return 0;
}

int df_map_start(df_loop *loop, const df_map_options *opts, df_map **map,
                 df_deferred **done)
{
    if (loop == NULL || opts == NULL || map == NULL || done == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    int rc = check_options(opts);
    if (rc != 0)
        return rc;
    /* Its completions would reach the other loop, not this one. */
    if (opts->pool != NULL && df__pool_loop(opts->pool) != loop)
        return DF_EINVAL;

    df_map *m = df__calloc(loop, 1, sizeof *m);
    if (m == NULL)
        return DF_ENOMEM;
    m->loop = loop;
    m->opts = *opts;
    m->ordered = (opts->flags & DF_MAP_ORDERED) != 0;
    m->stop_on_error = (opts->flags & DF_MAP_STOP_ON_ERROR) != 0;
    if (m->opts.window == 0)
        m->opts.window = opts->limit;
    m->ahead = map_ahead_min(opts);
    m->ahead_max = map_ahead_max(opts);
    m->max_inflight = opts->limit + m->ahead;
    /* Unordered, slots are initialised as the read-ahead reaches them
     * (take_slot). */
    const size_t most = (SIZE_MAX - SLOT_ALIGN) / sizeof(slot);
    m->nslots = m->ordered ? m->opts.window + 1
                : m->ahead_max < most ? (size_t)(opts->limit + m->ahead_max)
                                      : SIZE_MAX; /* too many: ENOMEM */
    if (m->nslots <= most)
        m->slots_mem =
            df__malloc(loop, m->nslots * sizeof(slot) + SLOT_ALIGN - 1);
    if (m->slots_mem != NULL) {
        uintptr_t a = ((uintptr_t)m->slots_mem + SLOT_ALIGN - 1) &
                      ~(uintptr_t)(SLOT_ALIGN - 1);
        m->slots = (slot *)a;
        if (m->ordered)
            memset(m->slots, 0, m->nslots * sizeof(slot));
    }
    m->summary = df__malloc(loop, sizeof(summary));
    if (m->slots == NULL || m->summary == NULL) {
        rc = DF_ENOMEM;
        goto fail;
    }
    df__ilink_init(&m->client.link);
    if (opts->pool != NULL) {
        rc = df__sem_new(loop, opts->limit, on_job_finish, &m->sem);
        if (rc != 0)
            goto fail;
        /* A pool shut down already is as good as gone: every item it is
         * given fails with DF_ESHUTDOWN and stops the map. */
        m->pool = df__pool_accepts(opts->pool) ? opts->pool : NULL;
        m->client.stopped = pool_stopped;
        m->client.flush = pool_flush;
    }
    m->release.fn = release_held;
    m->summary->alloc = *df__allocator(loop);
    rc = df_deferred_new_cancellable(loop, done_canceller, m, &m->done_d);
    if (rc != 0)
        goto fail;
    if (m->pool != NULL)
        df__pool_client_add(m->pool, &m->client);
    /* Cancelling done must not fire it before the running items finish:
     * the map fires it (with DF_ECANCELLED) once they have. */
    df__deferred_set_cancel_waits(m->done_d);
    df__loop_maps_add(loop, 1); /* df_loop_get_stats */

    df__ilist_init(&m->free_slots);
    df__ilist_init(&m->finished_q);
    if (m->ordered) {
        for (size_t i = 0; i < m->nslots; i++)
            m->slots[i].map = m;
    }
    /* Out parameters first: next() may already want the map. */
    *map = m;
    *done = df_deferred_ref(m->done_d);
    map_leave(m, map_enter(m));
    return 0;

fail:
    if (m->sem != NULL)
        df__sem_drop(m->sem);
    df__free(loop, m->summary);
    df__free(loop, m->slots_mem);
    df__free(loop, m);
    return rc;
}

int df_map_cancel(df_map *m)
{
    if (m == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(m->loop);
    if (m->finished || m->cancelling)
        return 0;
    bool outer = map_enter(m);
    set_stop(m, df_failure_new(m->loop, DF_ECANCELLED, "map cancelled"));
    cancel_running(m);
    map_leave(m, outer);
    return 0;
}

int df_map_get_stats(const df_map *m, df_map_stats *out)
{
    if (m == NULL || out == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(m->loop);
    fill_stats(m, out);
    return 0;
}

int df_map_free(df_map *m)
{
    if (m == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(m->loop);
    if (!m->finished || m->running != 0 || m->buffered != 0)
        return DF_EBUSY;
    if (m->pumping) {
        /* Called from done's callbacks: the pump frees it on the way out. */
        m->free_requested = true;
        return 0;
    }
    map_destroy(m);
    return 0;
}

static df_result handled(df_result r, void *arg)
{
    (void)arg;
    df_result_clear(&r);
    return df_ok(NULL, NULL);
}

/* The common batch case in one call.  The map is started only when the
 * loop can be run here (not from one of its own callbacks), so that a
 * refusal changes nothing.  A df_loop_stop() from a callback cannot leave
 * the map half done: it is cancelled, and the loop runs on until its
 * running items have returned and done has fired. */
int df_map_run(df_loop *loop, const df_map_options *opts, df_map_stats *stats)
{
    if (loop == NULL || opts == NULL)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    if (loop->dispatching)
        return DF_ESTATE;
    df_map *m;
    df_deferred *done;
    int rc = df_map_start(loop, opts, &m, &done);
    if (rc != 0)
        return rc;
    bool cancelled = false;
    while (!df_deferred_called(done)) {
        rc = df_loop_run_until(loop, done);
        if (rc == 0)
            break;
        if (!cancelled) {
            /* Stopped (DF_ECANCELLED) or idle without done (cannot
             * happen: the map keeps items pending until done fires). */
            df_map_cancel(m);
            cancelled = true;
        } else if (rc != DF_ECANCELLED) {
            break;
        }
    }
    if (stats != NULL)
        fill_stats(m, stats);
    df_failure *f = NULL;
    rc = df_deferred_peek(done, NULL, &f);
    if (rc == 0)
        rc = f != NULL ? df_failure_code(f) : 0;
    /* The code is the caller's now: the failure is handled. */
    if (f != NULL)
        df_deferred_add_errback(done, handled, NULL);
    df_deferred_unref(done);
    if (df_map_free(m) != 0)
        rc = rc != 0 ? rc : DF_ESTATE; /* not reached: done has fired */
    return rc;
}
