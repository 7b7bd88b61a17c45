/* SPDX-License-Identifier: MIT */
/* Tells helgrind about hand-overs through C11 atomics, which it does not model. */
#ifndef DF_ANNOTATE_H
#define DF_ANNOTATE_H

/* ANNOTATE_HAPPENS_BEFORE(obj) before publishing obj through an atomic,
 * ANNOTATE_HAPPENS_AFTER(obj) after taking it.  Outside valgrind each is
 * still a client request of about a dozen instructions, on a per-item
 * path, so they are compiled only in a debug build (--enable-debug defines
 * DF_DEBUG) or with -DDF_ANNOTATE, and only where valgrind's headers are
 * installed: run helgrind on such a build (README, make check-valgrind). */
#if defined(DF_DEBUG) || defined(DF_ANNOTATE)
#if defined(__has_include)
#if __has_include(<valgrind/helgrind.h>)
#include <valgrind/helgrind.h>
#endif
#endif
#endif
#ifndef ANNOTATE_HAPPENS_BEFORE
#define ANNOTATE_HAPPENS_BEFORE(obj) ((void)(obj))
#define ANNOTATE_HAPPENS_AFTER(obj) ((void)(obj))
#endif

#endif /* DF_ANNOTATE_H */
