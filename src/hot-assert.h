/* SPDX-License-Identifier: MIT */
/* DF__HOT_ASSERT: assertions on the per-item paths, checked in debug builds. */
#ifndef DEFERRED_HOT_ASSERT_H
#define DEFERRED_HOT_ASSERT_H

#include <assert.h>

/*
 * The policy.  An internal invariant is checked with assert(), which every
 * build keeps (nothing defines NDEBUG), except on the paths that run once
 * per item (submitting, completing, firing a deferred, a list member's
 * result, the slabs): there it is checked with DF__HOT_ASSERT, which is
 * assert() in a debug build (--enable-debug defines DF_DEBUG) and nothing
 * otherwise, where those checks cost about a tenth of the loop thread's
 * instructions per item.  CI runs the whole test suite once with
 * --enable-debug (.ci/run, build-pipe), so the hot assertions stay tested.
 *
 * In a release build the condition is not evaluated, but it still names
 * its variables (inside sizeof), so that a variable read only by an
 * assertion does not become "unused".
 */
#ifdef DF_DEBUG
#define DF__HOT_ASSERT(cond) assert(cond)
#else
#define DF__HOT_ASSERT(cond) ((void)sizeof((cond) ? 1 : 0))
#endif

#endif /* DEFERRED_HOT_ASSERT_H */
