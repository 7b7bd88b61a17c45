# SPDX-License-Identifier: MIT
"""The one place naming where libdeferred departs from Twisted 22.4 on purpose.

The generator (gen.py) never produces a case listed here with action
"avoid" (or "pending": a difference still to be fixed); it counts each
case it steered away from.  A "normalise" case is produced and the
comparison in difftest.py tolerates exactly that difference, counting
each time it did.  difftest.py prints all the counts.  Every entry is also in README.md's list of departures, with
the same reason.
"""

DEPARTURES = {
    "empty_list_fire_on_one_callback": (
        "avoid",
        "An empty DeferredList with fireOnOneCallback never fires in "
        "Twisted; df_list_new with n == 0 fires at once with an empty "
        "result, whatever the flags.",
    ),
    "unpause_not_paused": (
        "avoid",
        "Twisted lets unpause() drive the pause count negative; "
        "df_deferred_unpause on a deferred that is not paused is DF_ESTATE "
        "and changes nothing.",
    ),
    "wait_on_running": (
        "avoid",
        "A callback returning df_wait(d) while one of d's own callbacks is "
        "running (d's callback fired a deferred whose callback does this; a "
        "list member's callback firing the list is the common case): "
        "Twisted hands it the value d's running callback was given; in C "
        "that value is owned by the running callback, so libdeferred makes "
        "the waiter wait for the end of that callback and take d's result "
        "from there.  (Through df_deferred_chain, or while d hands its "
        "result to a waiter, d runs no callback and both agree.)",
    ),
    "cancel_fired_list_forwards": (
        "avoid",
        "Cancelling a list deferred that has fired and waits on an inner "
        "deferred (a callback returned one) cancels that inner deferred, as "
        "for every deferred; Twisted's DeferredList.cancel() overrides "
        "Deferred.cancel() and then does nothing.  The generator leaves out "
        "cancels that may reach (through list members, waits and run "
        "functions' deferreds) a list given a callback that may return a "
        "deferred.",
    ),
    "fire_sem_deferred": (
        "avoid",
        "Deferreds a semaphore made are its own to fire.  Twisted's run() "
        "deferred is its acquire deferred, fired as soon as the token is "
        "held (a later callback() on it is AlreadyCalledError), while "
        "df_sem_run's fires with the function's result; firing a waiting "
        "acquire by hand makes Twisted's release() raise.",
    ),
    "pause_sem_run": (
        "avoid",
        "Pausing the deferred of a df_sem_run that waits for its token "
        "holds back the delivery of fn's result, not the call of fn: fn "
        "runs when the token is handed over (Twisted would not call fn "
        "until unpaused and keep the token meanwhile).  That deferred "
        "carries the run's result, not the acquisition, and a paused "
        "consumer should not keep a token from everyone else.",
    ),
    "sem_release_recursion": (
        "avoid",
        "DeferredSemaphore.release() fires the next waiter inside the "
        "release call, recursively; libdeferred's release is never "
        "recursive: a waiter handed the token inside a callback the "
        "semaphore runs (the end of a run) is fired, or its function "
        "called, once that callback returns, so the run's own callbacks "
        "come first, where Twisted runs the waiter's first.  The generator "
        "gives a semaphore used by run() no other user (one run, no "
        "acquire), so that a release inside the semaphore's callbacks "
        "never has a waiter to hand the token to.",
    ),
    "paused_run_stalls_function_deferred": (
        "avoid",
        "Issue 15 item 11.  A df_sem_run deferred r whose function "
        "returned a pending deferred x, r paused by its owner, a callback "
        "added to x, then x fired: Twisted's r waits on x through a "
        "continuation, finds r paused and stops x's chain too, so the "
        "callback on x does not run (until r is unpaused and x run "
        "again); libdeferred's r is a separate deferred fired with x's "
        "result, so x's callback runs at once, which is the sound "
        "behaviour.  Avoided with pause_sem_run (no pause of run "
        "deferreds).",
    ),
}

# Value normalisation done by the Twisted runner (not a generator
# restriction): DeferredSemaphore.acquire() fires with the semaphore
# itself; df_sem_acquire fires with NULL.  Both print as None.
NORMALISED = {
    "acquire_value": "An acquire fires with the semaphore in Twisted and "
                     "with NULL in libdeferred; the trace prints both as "
                     "None.",
}
