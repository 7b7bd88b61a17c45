/* SPDX-License-Identifier: MIT */
/* The operation interpreter shared by the model test and the fuzzer. */
#ifndef DF_TESTS_MODEL_H
#define DF_TESTS_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * md_run() decodes bytes into a sequence of operations on one df_loop (a
 * semaphore, a lock, a pool with a semaphore bounding it, plain deferreds,
 * lists and gathers, timers and timeouts, maps), applies each to the
 * library and to a small reference model of the contract, and checks them
 * against each other after every step; then it tears everything down and
 * checks that every item was accounted for exactly once and that nothing
 * leaked.
 *
 * The bytes come from an md_src: a seeded PRNG (the random tester) or a
 * buffer (the fuzzer, the corpus replay).  A buffer that runs out reads as
 * zeros and ends the operations; teardown still runs.
 */
typedef struct md_src {
    const uint8_t *data; /* NULL: use the PRNG */
    size_t len;
    size_t pos;
    uint64_t state;      /* PRNG state (splitmix64) */
    bool exhausted;      /* data ran out */
    /* With record set, every byte handed out is appended to rec (malloc'd,
     * grown as needed; the caller frees it): that is how the seed corpus
     * is made. */
    bool record;
    uint8_t *rec;
    size_t rec_len;
    size_t rec_cap;
} md_src;

typedef struct md_result {
    unsigned long ops;   /* operations applied (teardown not counted) */
    unsigned long step;  /* the step that failed */
    char msg[768];       /* what failed, if md_run returned non-zero */
} md_result;

/* Runs one sequence of at most max_ops operations.  Returns 0 if every
 * check passed.  On a failure returns -1 with res->msg set and leaves the
 * sequence as it is (threads may still wait; leaked on purpose, the caller
 * is expected to report and exit).  trace: print each operation to stderr. */
int md_run(md_src *src, unsigned max_ops, bool trace, md_result *res);

#endif /* DF_TESTS_MODEL_H */
