/* SPDX-License-Identifier: MIT */
/* The C interface between bench-tbb-main.c (C) and bench-tbb.cc (oneTBB, C++). */
#ifndef BENCH_TBB_H
#define BENCH_TBB_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * bench-common.h uses C11 <stdatomic.h>, which C++ cannot include, so the
 * harness stays in C (bench-tbb-main.c) and the C++ side only drives the
 * pipeline through these functions.
 */

struct bench_tbb;

/* Makes a task arena of `threads` worker threads (a global_control lets
 * oneTBB start that many) and starts them, outside the timed phase.  NULL
 * on failure, with a reason printed to stderr. */
struct bench_tbb *bench_tbb_new(unsigned threads);

/* Runs items 0 .. n-1 through the pipeline with at most `limit` tokens
 * and returns when every item has been recorded: 0 on success, -1 (with a
 * reason printed) if oneTBB threw.  The calling thread only waits: the
 * pipeline runs on the arena's worker threads. */
int bench_tbb_run(struct bench_tbb *t, uint64_t n, unsigned limit);

/* Terminates the arena and frees everything (oneTBB keeps its worker
 * threads until exit). */
void bench_tbb_free(struct bench_tbb *t);

/* Defined in C (bench-tbb-main.c).  The parallel stage: item i's work,
 * with the in-flight accounting. */
uint64_t bench_tbb_item(uint64_t i);
/* The serial output stage: records item i's value (never concurrently
 * with itself). */
void bench_tbb_record(uint64_t i, uint64_t value);

#ifdef __cplusplus
}
#endif

#endif /* BENCH_TBB_H */
