/* SPDX-License-Identifier: MIT */
/* Deferred lists and gather: aggregate the results of many deferreds. */
#include <string.h>

#include "deferred-internal.h"
#include "hot-assert.h"

#if defined(__GNUC__) || defined(__clang__)
#define LIST_NOINLINE __attribute__((noinline))
#define LIST_COLD __attribute__((cold))
#define LIST_LIKELY(x) __builtin_expect(!!(x), 1)
#else
#define LIST_NOINLINE
#define LIST_COLD
#define LIST_LIKELY(x) (x)
#endif

/*
 * Design
 * ======
 * One allocation holds both the df_list_result handed to the user and the
 * collector: the loop-thread bookkeeping that watches the members.  The
 * two parts have different lifetimes, so the block carries an atomic count
 * of two references: one for the result (dropped by df_list_result_free(),
 * on whatever thread owns the result by then) and one for the collector
 * (dropped on the loop thread once nothing can call back into it any
 * more).  The result therefore always outlives the collector's need for
 * it, and late members may still fire after the user freed the result.
 * The allocator is copied into the block, as failures do, because a result
 * may outlive its loop.
 *
 * The collector is needed while any of these remain, each counted:
 *   - a member whose list callback has not run yet (`npending`);
 *   - the sentinel, our first callback on the list deferred, which has not
 *     run yet (`sentinel_pending`);
 *   - a section of list code on the stack (`busy`).
 *
 * The list holds a reference to each member until the list has fired and
 * no list code is on the stack (its own, or with DF_LIST_TAKE_REFS the
 * caller's, which it took over); it holds no reference to its own
 * deferred.
 * That breaks the cycle list -> member -> callback -> list, so a list and
 * members that are all abandoned are freed rather than leaked.  Instead,
 * the sentinel tells the collector when the list deferred fired: if the
 * list did not fire it itself (the user released the last reference, which
 * fails an unfired deferred with DF_ECANCELLED, or fired it by hand, or
 * df_deferred_cancel() failed it after our canceller), the collector stops
 * collecting and never touches that deferred again.  This relies on the
 * core's promise that releasing the last reference runs the rest of the
 * chain, even of a deferred its user left paused.
 *
 * Decisions:
 *   - Once the list has fired, nothing is written into its result again:
 *     the result belongs to the list's chain.  A member that fires later is
 *     passed through its own chain untouched, its value keeping its
 *     destructor; with CONSUME_ERRORS a late failure is still consumed, as
 *     Twisted does.
 *   - If the list fails (FIRE_ON_ONE_ERRBACK, gather) or is fired by
 *     someone else, its result is never delivered: the values moved into it
 *     so far are destroyed and the failures released at that moment.  The
 *     pointers those members' chains still carry (without a destructor)
 *     are then dangling, which is the price of the header's move rule.
 *   - n == 0 fires at once with an empty result whatever the flags; Twisted
 *     never fires an empty list with fireOnOneCallback.
 *   - Cancelling the list cancels every member captured at construction,
 *     fired or not (a fired one may be waiting on an inner deferred), and
 *     does nothing else, as Twisted's DeferredList.cancel(): the list
 *     fires when the members' results make it fire (the list deferred is
 *     cancel_waits).  A member paused by its owner, or whose cancellation
 *     completes later (a running pool job), keeps the list unfired until
 *     then.
 *   - A member's reference is not dropped when its list callback runs,
 *     but in one pass once the list has fired (list_drop_members): until
 *     then a later callback on the member may make it wait on an inner
 *     deferred, which the list's cancel must reach.  Dropping early is
 *     exact only when nobody else can add callbacks (refs == 2: the list's
 *     and the one the running chain holds, our pair the last); that rests
 *     on deferred.c holding a reference of its own on a deferred whose
 *     callbacks run, which it does not promise; and measured (issue 11),
 *     the check in the member callback cost 7 instructions per member
 *     more on the loop thread than the pass it saves, for about 0.2
 *     fewer last-level read misses and 0.2 fewer write misses per member
 *     (callgrind's cache simulation, 2*10^5 members).
 *   - CANCEL_REMAINING cancels, right after the list's own callbacks have
 *     seen the result, every member whose list callback has not run.  It
 *     does not apply when the list was fired by someone else.
 *   - df__failure_first_error() allocates when the first error happens; if
 *     that fails the list fails with the shared DF_ENOMEM failure instead.
 *     Everything else is allocated in df_list_new().
 *
 * Atomicity of df_list_new(): Twisted attaches its callback to each
 * member in input order, and a callback attached to a member that has
 * fired runs at once (moving its value, perhaps firing the list or other
 * members).  To do the same and still be all-or-nothing when memory runs
 * out, every allocation comes first: the block, the list deferred and its
 * sentinel, and room on each member for the list callbacks it will get
 * (one per position, counted by sorting a copy of the array).  Attaching
 * then allocates nothing, unless a callback run meanwhile adds callbacks
 * to a member listed later and uses that room; if memory then runs out,
 * the list fails with DF_ENOMEM (the members not reached get no list
 * callback).  When no member has fired (a list made over work still in
 * flight, the common case) nothing can run while attaching, so the
 * callbacks are attached first, with no room made beforehand, and each is
 * taken back (the last pair on its member) if memory runs out for it or
 * for the list deferred.
 */

#define LIST_FLAGS                                                             \
    (DF_LIST_FIRE_ON_ONE_CALLBACK | DF_LIST_FIRE_ON_ONE_ERRBACK |              \
     DF_LIST_CONSUME_ERRORS | DF_LIST_CANCEL_REMAINING | DF_LIST_TAKE_REFS)
#define GATHER_FLAGS                                                           \
    (DF_LIST_CONSUME_ERRORS | DF_LIST_CANCEL_REMAINING | DF_LIST_TAKE_REFS)

/*
 * A slot is 24 bytes.  `free` says what the slot holds: slot_unfired
 * until the member's result is recorded (then the first word is the
 * owner, the block, which the member's callback needs to find its list:
 * the callback's argument is the slot), slot_failed for a failure, else
 * the value's destructor (or NULL).  Both words are written once, by the
 * member's callback while the list collects, before the result can reach
 * the application, so the accessors may read them on any thread that
 * owns the result.  `member` (the member's address, a reference while
 * members_held, with SLOT_DONE in its low bit once the list callback on
 * the member has run) is the collector's: loop thread only.
 */
struct list_slot {
    union {
        struct df_list_result *owner; /* until recorded */
        void *value;                  /* recorded success */
        df_failure *failure;          /* recorded failure: owned reference */
    };
    df_free_fn free; /* slot_unfired, slot_failed or the value's */
    uintptr_t member;
};
#define SLOT_DONE ((uintptr_t)1)
_Static_assert(sizeof(struct list_slot) == 3 * sizeof(void *),
               "a list slot is three words (issue 11)");

/* The tags of `free`; slot_failed is also what frees a recorded failure. */
static void slot_unfired(void *p)
{
    DF__UNUSED(p);
}

static void slot_failed(void *p)
{
    df_failure_unref(p);
}

static inline df_deferred *slot_member(const struct list_slot *s)
{
    return (df_deferred *)(s->member & ~SLOT_DONE);
}

struct df_list_result {
    atomic_uint refs;   /* the result's and the collector's */
    df_allocator alloc; /* copied: the result may outlive the loop */
    size_t count;
    long fired_index;

    /* Collector (loop thread only). */
    df_loop *loop;
    df_deferred *self; /* the list deferred, while collecting */
    unsigned flags;
    size_t npending;       /* members whose list callback has not run;
                            * while collecting, count - npending members
                            * are recorded (each run records one) */
    size_t nowned;         /* recorded slots that own something: a
                            * failure, or a value with a destructor */
    unsigned busy;         /* list code on the stack */
    bool collecting;       /* the list has not fired */
    bool quiet;            /* collecting without FIRE_ON_ONE_CALLBACK: a
                            * success that is not the last member's is
                            * recorded and fires nothing
                            * (list_member_done's fast path) */
    bool delivered;        /* the result went down the list's chain */
    bool members_held;     /* slot[i].member references still held */
    bool sentinel_pending; /* the sentinel has not run */

    struct list_slot slots[];
};

static void list_block_unref(struct df_list_result *l)
{
    if (atomic_fetch_sub_explicit(&l->refs, 1, memory_order_acq_rel) == 1)
        l->alloc.free(l, l->alloc.ctx);
}

/* Destroys what the result owns and drops the result's reference. */
void df_list_result_free(void *p)
{
    struct df_list_result *l = p;

    if (l == NULL)
        return;
    /* nowned, like the slots, is written only while the list collects,
     * before the result can reach another thread. */
    for (size_t i = 0; l->nowned > 0 && i < l->count; i++) {
        struct list_slot *s = &l->slots[i];
        if (s->free != slot_unfired && s->free != NULL)
            s->free(s->value); /* slot_failed drops the failure */
    }
    list_block_unref(l);
}

static void list_enter(struct df_list_result *l)
{
    l->busy++;
}

/*
 * Leaves a section of list code.  The outermost one does the work that had
 * to wait until no list code was iterating over the members: dropping the
 * member references once the list has fired (which may run member chains
 * that call back in; they find busy > 0 and return here at once), then
 * dropping the collector's reference when nothing can call back any more.
 * Nothing in the block may be touched after this returns.
 */
static LIST_NOINLINE void list_drop_members(struct df_list_result *l)
{
    /* Once members_held is false nothing reads slot[i].member again
     * except for its SLOT_DONE bit, so the pointers are left in place. */
    l->members_held = false;
    /* Out of line and with the bounds in locals, so that the loop keeps
     * them in registers across the releases (which may run any code). */
    const struct list_slot *s = l->slots, *end = s + l->count;
    for (; s < end; s++)
        df__deferred_unref(slot_member(s)); /* loop thread */
}

static inline void list_leave(struct df_list_result *l)
{
    DF__HOT_ASSERT(l->busy > 0);
    if (l->busy > 1) {
        l->busy--;
        return;
    }
    if (!l->collecting && l->members_held)
        list_drop_members(l);
    l->busy = 0;
    if (l->npending == 0 && !l->sentinel_pending)
        list_block_unref(l);
}

/* Stops collecting without delivering the result: destroys what was
 * recorded so far. */
static void list_abandon(struct df_list_result *l)
{
    l->collecting = false;
    l->quiet = false;
    l->self = NULL;
    df_list_result_free(l);
}

/*
 * Fires the list deferred with `r` (the result itself, or a failure).  The
 * caller is inside list_enter()/list_leave().
 */
static void list_fire(struct df_list_result *l, df_result r)
{
    df_deferred *self = l->self;

    assert(l->collecting);
    l->collecting = false;
    l->quiet = false;
    l->self = NULL;
    l->delivered = df_result_ok(&r);
    if (df_deferred_resolve(self, r) != 0) {
        /* Fired by hand while paused, so the sentinel has not seen it: the
         * result is still ours. */
        if (l->delivered)
            l->delivered = false;
        else
            df_failure_unref(r.failure);
    }
    if (!l->delivered)
        list_abandon(l);
    /* The list's callbacks have seen the result; now stop the rest.  The
     * references stay valid: list_leave() drops them only later. */
    if (l->flags & DF_LIST_CANCEL_REMAINING) {
        for (size_t i = 0; i < l->count; i++) {
            if (!(l->slots[i].member & SLOT_DONE))
                df_deferred_cancel(slot_member(&l->slots[i]));
        }
    }
}

/* list_member_done's general path: whatever the result does to the list.
 * The caller has marked the slot done and counted the member out of
 * npending.  It finds the list from the slot itself, as list_member_done
 * does, so that the fast path keeps nothing live across the call. */
static LIST_NOINLINE LIST_COLD df_result member_done_slow(df_result r,
                                                          void *arg)
{
    struct list_slot *s = arg;
    struct df_list_result *l = s->owner; /* not recorded yet */
    bool failed = r.failure != NULL;

    list_enter(l);
    if (l->collecting) {
        if (failed) {
            s->failure = df_failure_ref(r.failure);
            s->free = slot_failed;
            l->nowned++;
        } else {
            /* The value moves into the result; the member's chain goes on
             * with the same pointer, borrowed. */
            s->value = r.value;
            s->free = r.free;
            l->nowned += r.free != NULL;
            r.free = NULL;
        }
        if (!failed && (l->flags & DF_LIST_FIRE_ON_ONE_CALLBACK)) {
            l->fired_index = (long)(s - l->slots);
            list_fire(l, df_ok(l, df_list_result_free));
        } else if (failed && (l->flags & DF_LIST_FIRE_ON_ONE_ERRBACK)) {
            list_fire(l, df_err(df__failure_first_error(
                             l->loop, (size_t)(s - l->slots), r.failure)));
        } else if (l->npending == 0) { /* every member recorded */
            list_fire(l, df_ok(l, df_list_result_free));
        }
    }
    if (failed && (l->flags & DF_LIST_CONSUME_ERRORS)) {
        df_failure_unref(r.failure);
        r = df_ok(NULL, NULL);
    }
    list_leave(l);
    return r;
}

/* The callback and errback on every member. */
static df_result list_member_done(df_result r, void *arg)
{
    struct list_slot *s = arg;
    struct df_list_result *l = s->owner; /* not recorded yet: see above */

    DF__HOT_ASSERT(r.wait == NULL);
    DF__HOT_ASSERT(!(s->member & SLOT_DONE) && s->free == slot_unfired);
    s->member |= SLOT_DONE;
    /* The common case, a success that the list records without firing (a
     * quiet list collects; npending == 0 once the last member is in),
     * calls nothing, so it needs no list_enter()/list_leave(): the
     * collector stays needed, because the sentinel of a collecting list
     * has not run, and no section of list code waits for this one to
     * end. */
    if (LIST_LIKELY(--l->npending != 0 && r.failure == NULL && l->quiet)) {
        s->value = r.value;
        s->free = r.free;
        l->nowned += r.free != NULL;
        return df_ok(r.value, NULL); /* r.wait is NULL */
    }
    return member_done_slow(r, arg);
}

/* The first callback pair on the list deferred: notices its firing. */
static df_result list_sentinel(df_result r, void *arg)
{
    struct df_list_result *l = arg;

    list_enter(l);
    if (l->collecting)
        list_abandon(l); /* fired by someone else */
    l->sentinel_pending = false;
    list_leave(l);
    return r;
}

/* The list deferred's canceller (Twisted DeferredList.cancel). */
static void list_cancel(df_deferred *d, void *arg)
{
    struct df_list_result *l = arg;

    DF__UNUSED(d);
    list_enter(l);
    if (l->members_held) {
        for (size_t i = 0; i < l->count; i++)
            df_deferred_cancel(slot_member(&l->slots[i]));
    }
    list_leave(l);
}

/* True if every member is a deferred of `loop`. */
static bool members_valid(df_loop *loop, df_deferred *const *members,
                          size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (members[i] == NULL || df__deferred_loop(members[i]) != loop)
            return false;
    }
    return true;
}

/* Undoes df_list_new's set-up of slots[0..n) when it fails before any
 * callback is attached: drops the references it took (ref_inc is 1; the
 * caller holds its own, so none is the last; with DF_LIST_TAKE_REFS it
 * took none and the caller keeps its own) and any scratch mark
 * df__deferred_reserve_members left. */
static void release_members(struct df_list_result *l, size_t n,
                            uint32_t ref_inc)
{
    for (size_t i = 0; i < n; i++) {
        df_deferred *m = slot_member(&l->slots[i]);
        df__deferred_unmark(m);
        if (ref_inc != 0)
            df__deferred_unref(m);
    }
}

/* Checks members[i] and fills its slot; the list's reference is ref_inc:
 * 1, or 0 when it takes over the caller's (DF_LIST_TAKE_REFS). */
static inline bool fill_slot(struct df_list_result *l, df_loop *loop,
                             df_deferred *m, size_t i, uint32_t ref_inc)
{
    if (m == NULL || df__deferred_loop(m) != loop)
        return false;
    struct list_slot *s = &l->slots[i];
    s->owner = l;
    s->free = slot_unfired;
    s->member = (uintptr_t)m;
    DF__HOT_ASSERT(!(s->member & SLOT_DONE)); /* 8-byte aligned */
    ((df__deferred_head *)(void *)m)->refs += ref_inc; /* df__deferred_ref */
    return true;
}

/* Fills slots and attaches from members[i] on while each member is valid,
 * has not fired and has inline room; returns the index of the first that
 * is not (slot not filled if it is invalid, else filled), or n. */
static inline bool attach_inline(df_deferred *m, struct list_slot *s);
#if defined(__GNUC__) || defined(__clang__)
__attribute__((always_inline))
#endif
static inline size_t attach_run(struct df_list_result *l, df_loop *loop,
                                df_deferred *const *members, size_t i,
                                size_t n, uint32_t ref_inc)
{
    for (; i < n; i++) {
        df_deferred *m = members[i];
        if (!fill_slot(l, loop, m, i, ref_inc) ||
            !attach_inline(m, &l->slots[i]))
            break;
    }
    return i;
}

/* The list's callbacks on m when m has not fired and has inline room (the
 * common case: a member in flight); false, having done nothing,
 * otherwise. */
static inline bool attach_inline(df_deferred *m, struct list_slot *s)
{
    return df__deferred_append_inline(m, list_member_done, s);
}

/* Takes back the list callbacks attached to the members of slots[0..n)
 * while none of them had fired: each is the last pair on its member, so
 * they come off in reverse order. */
static void detach_unfired(struct df_list_result *l, size_t n)
{
    while (n-- > 0)
        df__deferred_append_undo(slot_member(&l->slots[n]));
}

int df_list_new(df_loop *loop, df_deferred *const *members, size_t n,
                unsigned flags, df_deferred **out)
{
    struct df_list_result *l;
    df_deferred *self = NULL;
    size_t i;
    int rc = 0;
    bool fired = false; /* a member seen so far has fired */

    if (loop == NULL || out == NULL || (n > 0 && members == NULL) ||
        (flags & ~(unsigned)LIST_FLAGS) != 0)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    /* Sizes first, so that a count no array can have is refused without
     * reading past the caller's array. */
    if (n > SIZE_MAX / sizeof members[0])
        return DF_EINVAL;
    if (n > (SIZE_MAX - sizeof *l) / sizeof l->slots[0])
        return DF_ENOMEM;
    /* A big list's slots ask for huge pages (alloc.c, df__malloc_bulk):
     * a burst of 10^6 members then costs a few hundred page faults. */
    l = df__malloc_bulk(loop, sizeof *l + n * sizeof l->slots[0]);
    if (l == NULL)
        return members_valid(loop, members, n) ? DF_ENOMEM : DF_EINVAL;
    /* One pass checks the members, fills the slots and takes the list's
     * references (or, with TAKE_REFS, the caller's), which it holds from
     * before the first callback is attached until the list has fired; a
     * bad member undoes it.  While no member seen has fired, the same pass
     * attaches the list callbacks: on unfired members nothing runs, so
     * they can all be taken back (detach_unfired) if something fails
     * before the list is made.  From the first member that has fired on,
     * a second loop only checks and fills. */
    uint32_t ref_inc = (flags & DF_LIST_TAKE_REFS) ? 0 : 1;
    for (i = 0; i < n; i++) {
        /* The common case, with ref_inc a constant in each copy. */
        i = ref_inc ? attach_run(l, loop, members, i, n, 1)
                    : attach_run(l, loop, members, i, n, 0);
        if (i == n)
            break;
        df_deferred *m = members[i];
        if (m == NULL || df__deferred_loop(m) != loop) {
            detach_unfired(l, i);
            release_members(l, i, ref_inc);
            df__free(loop, l);
            return DF_EINVAL;
        }
        /* Slot i is filled; m has fired or has no inline room. */
        if (df__deferred_called(m)) {
            /* Attach in the second pass below, after making room. */
            fired = true;
            detach_unfired(l, i);
            i++;
            break;
        }
        rc = df__deferred_append_unfired_slow(m, list_member_done,
                                              &l->slots[i]);
        if (rc != 0) {
            detach_unfired(l, i);
            release_members(l, i + 1, ref_inc);
            df__free(loop, l);
            return rc;
        }
    }
    for (; i < n; i++) {
        if (!fill_slot(l, loop, members[i], i, ref_inc)) {
            release_members(l, i, ref_inc);
            df__free(loop, l);
            return DF_EINVAL;
        }
    }
    /* With a member that has fired, every allocation happens before the
     * first callback is attached (see the top of the file); room made on
     * members that is not used is harmless. */
    if (fired && (rc = df__deferred_reserve_members(loop, members, n)) != 0) {
        release_members(l, n, ref_inc);
        df__free(loop, l);
        return rc;
    }
    /* The header only: the slots are written in full below. */
    memset(l, 0, sizeof *l);
    atomic_init(&l->refs, 2);
    l->alloc = *df__allocator(loop);
    l->count = n;
    l->fired_index = -1;
    l->loop = loop;
    l->flags = flags;

    rc = df_deferred_new_cancellable(loop, list_cancel, l, &self);
    if (rc != 0) {
        if (!fired)
            detach_unfired(l, n);
        release_members(l, n, ref_inc);
        df__free(loop, l);
        return rc;
    }
    df__deferred_set_cancel_waits(self); /* the members' results fire it */
    rc = df_deferred_add_both(self, list_sentinel, l);
    if (rc != 0) {
        /* Fire it so that it can never call the canceller, nor report a
         * cancellation, then drop it. */
        df_deferred_callback(self, NULL, NULL);
        df_deferred_unref(self);
        if (!fired)
            detach_unfired(l, n);
        release_members(l, n, ref_inc);
        df__free(loop, l);
        return rc;
    }
    l->self = self;
    l->collecting = true;
    l->sentinel_pending = true;
    l->members_held = true;
    l->busy = 1;
    l->quiet = !(flags & DF_LIST_FIRE_ON_ONE_CALLBACK);
    *out = self;
    if (n == 0)
        list_fire(l, df_ok(l, df_list_result_free));

    /* Every member counts as pending from here: none of their list
     * callbacks has run. */
    l->npending = n;
    if (!fired) {
        list_leave(l); /* attached above */
        return 0;
    }
    /* Attach in input order, each callback running at once on a member
     * that has fired, as Twisted does. */
    for (i = 0; i < n; i++) {
        struct list_slot *s = &l->slots[i];
        rc = df__deferred_add_both(slot_member(s), list_member_done, s);
        if (rc != 0) {
            /* Only if callbacks run meanwhile used the room made above
             * and memory then ran out: see the header.  The members from
             * i on never get their list callback. */
            l->npending -= n - i;
            for (; i < n; i++) {
                df__deferred_unmark(slot_member(&l->slots[i]));
                l->slots[i].member |= SLOT_DONE;
            }
            if (l->collecting)
                list_fire(l, df_err(df_failure_new(
                                 loop, rc, "df_list_new: cannot attach to a "
                                           "member")));
            break;
        }
    }
    list_leave(l);
    return 0;
}

int df_gather(df_loop *loop, df_deferred *const *members, size_t n,
              unsigned flags, df_deferred **out)
{
    if (loop == NULL || (flags & ~(unsigned)GATHER_FLAGS) != 0)
        return DF_EINVAL;
    DF__CHECK_THREAD(loop);
    /* Twisted's gatherResults unwraps the (success, value) pairs; with
     * FIRE_ON_ONE_ERRBACK every entry of a delivered result succeeded, so
     * the result needs no unwrapping here. */
    return df_list_new(loop, members, n, flags | DF_LIST_FIRE_ON_ONE_ERRBACK,
                       out);
}

/* The accessors only read the result, so any thread that owns it may call
 * them. */

size_t df_list_result_count(const df_list_result *r)
{
    return r != NULL ? r->count : 0;
}

/* Slot i's tag, or slot_unfired when there is no such slot.  The exported
 * accessors below do not call one another: a call between two exported
 * functions goes through the PLT. */
static inline df_free_fn slot_tag(const df_list_result *r, size_t i)
{
    return r != NULL && i < r->count ? r->slots[i].free : slot_unfired;
}

bool df_list_result_ok(const df_list_result *r, size_t i)
{
    df_free_fn tag = slot_tag(r, i);
    return tag != slot_unfired && tag != slot_failed;
}

bool df_list_result_fired(const df_list_result *r, size_t i)
{
    return slot_tag(r, i) != slot_unfired;
}

void *df_list_result_value(const df_list_result *r, size_t i)
{
    df_free_fn tag = slot_tag(r, i);
    if (tag == slot_unfired || tag == slot_failed)
        return NULL;
    return r->slots[i].value;
}

bool df_list_result_get(const df_list_result *r, size_t i, void **value,
                        df_failure **failure)
{
    df_failure *f = NULL;

    if (LIST_LIKELY(r != NULL && i < r->count)) {
        const struct list_slot *s = &r->slots[i];
        df_free_fn tag = s->free;
        if (LIST_LIKELY(tag != slot_failed && tag != slot_unfired)) {
            if (value != NULL)
                *value = s->value;
            if (failure != NULL)
                *failure = NULL;
            return true;
        }
        if (tag == slot_failed)
            f = s->failure;
    }
    if (value != NULL)
        *value = NULL;
    if (failure != NULL)
        *failure = f;
    return false;
}

df_failure *df_list_result_failure(const df_list_result *r, size_t i)
{
    return slot_tag(r, i) == slot_failed ? r->slots[i].failure : NULL;
}

long df_list_result_index(const df_list_result *r)
{
    return r != NULL ? r->fired_index : -1;
}
