/* SPDX-License-Identifier: MIT */
/* Tells helgrind about hand-overs through C11 atomics, which it does not model. */
#ifndef DF_ANNOTATE_H
#define DF_ANNOTATE_H

/* ANNOTATE_HAPPENS_BEFORE(obj) before publishing obj through an atomic,
 * ANNOTATE_HAPPENS_AFTER(obj) after taking it: a few instructions outside
 * valgrind, nothing at all without valgrind's headers. */
#if defined(__has_include)
#if __has_include(<valgrind/helgrind.h>)
#include <valgrind/helgrind.h>
#endif
#endif
#ifndef ANNOTATE_HAPPENS_BEFORE
#define ANNOTATE_HAPPENS_BEFORE(obj) ((void)(obj))
#define ANNOTATE_HAPPENS_AFTER(obj) ((void)(obj))
#endif

#endif /* DF_ANNOTATE_H */
