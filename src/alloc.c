/* SPDX-License-Identifier: MIT */
/* The loop's allocator: the user's (or the C library's) and its caches. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "loop-internal.h"

/* Valgrind's memcheck is told about mapped slab chunks when its header is
 * at hand (a few instructions outside valgrind, on the slow path only). */
#if defined(__has_include)
#if __has_include(<valgrind/memcheck.h>)
#include <valgrind/memcheck.h>
#endif
#endif
#ifndef VALGRIND_MALLOCLIKE_BLOCK
#define VALGRIND_MALLOCLIKE_BLOCK(p, n, rz, z) ((void)(p))
#define VALGRIND_FREELIKE_BLOCK(p, rz) ((void)(p))
#endif

static void *default_malloc(size_t size, void *ctx)
{
    DF__UNUSED(ctx);
    return malloc(size);
}

static void *default_realloc(void *ptr, size_t size, void *ctx)
{
    DF__UNUSED(ctx);
    return realloc(ptr, size);
}

static void default_free(void *ptr, void *ctx)
{
    DF__UNUSED(ctx);
    free(ptr);
}

const df_allocator df__default_allocator = {default_malloc, default_realloc,
                                            default_free, NULL};

const df_allocator *df__allocator(df_loop *loop)
{
    return loop != NULL ? &loop->alloc : &df__default_allocator;
}

void *df__malloc(df_loop *loop, size_t size)
{
    const df_allocator *a = df__allocator(loop);
    return a->malloc(size, a->ctx);
}

void *df__calloc(df_loop *loop, size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    void *p = df__malloc(loop, n * size);
    if (p != NULL)
        memset(p, 0, n * size);
    return p;
}

void *df__realloc(df_loop *loop, void *ptr, size_t size)
{
    const df_allocator *a = df__allocator(loop);
    return a->realloc(ptr, size, a->ctx);
}

void df__free(df_loop *loop, void *ptr)
{
    const df_allocator *a = df__allocator(loop);
    if (ptr != NULL)
        a->free(ptr, a->ctx);
}

/* ------------------------------------------------------------ block cache */

df__cache *df__loop_cache(df_loop *loop, int which)
{
    return &loop->caches[which];
}

df__slab *df__loop_slab(df_loop *loop, int which)
{
    return &loop->slabs[which];
}

/* ------------------------------------------------------------------ slabs */

/*
 * A slab hands out blocks of one size carved from chunks, so that a burst
 * of N live deferreds costs a few dozen calls to the allocator instead of
 * N, and steady traffic costs none.  Each block handed out starts with a
 * word naming its chunk (the slab writes it, the block's user reads it and
 * leaves it alone: a deferred's first member is that word, and the chunk's
 * first member is the loop, so the block needs no header of its own); a
 * free block's first word holds the link of its chunk's free list instead.
 * Chunks with a free block are on the slab's `partial` list (doubly
 * linked, newest first), full chunks on no list.  A chunk whose last block
 * comes back is freed unless it is the only empty one, which is kept so
 * that traffic around one chunk's worth of blocks does not allocate and
 * free it over and over.  So memory held beyond the live blocks is at most
 * one chunk per slab (at most DF__SLAB_CHUNK_MAX bytes) plus the free
 * blocks of partly used chunks, and df_loop_free (which requires every
 * object gone) finds at most one chunk per slab.  The second term grew
 * with the chunks: a few blocks that outlive a burst each keep their whole
 * chunk, up to 2 MiB apiece, where 64-block chunks kept some kilobytes.
 * Loop thread only.
 *
 * Chunk sizes.  A slab holding k chunks makes its next one 2^k times the
 * first (DF__SLAB_BLOCKS blocks), up to DF__SLAB_CHUNK_MAX bytes: a slab
 * that grows gets a number of chunks logarithmic in its size up to 2 MiB
 * and one chunk per 2 MiB beyond, and one that shrinks back makes small
 * chunks again.  Memory is paid for in page faults as much as in bytes
 * (each first touch of a 4 KiB page costs a trap into the kernel, several
 * microseconds on a virtual machine), so a chunk of DF__SLAB_CHUNK_MAX
 * bytes is, with the default allocator only, one 2 MiB-aligned anonymous
 * mapping on which the kernel is asked for a transparent huge page
 * (madvise MADV_HUGEPAGE; honoured when THP is "always" or "madvise"):
 * one fault instead of 512.  When the mapping fails the chunk comes from
 * malloc, and when advice fails (no THP) it stays a plain mapping.  A
 * user's allocator gets every chunk through its malloc, untouched.  A
 * chunk that cannot be had at its size is retried at the first chunk's
 * size, so growing never fails where a small chunk would succeed.
 *
 * Blocks are 8-byte aligned (sizes rounded to 8), not 16 as malloc's:
 * what lives in them (deferreds, pool jobs) holds pointers and 64-bit
 * integers only.  With AddressSanitizer, free blocks are poisoned
 * (DF__POISON) and no chunk is mapped (LeakSanitizer does not scan
 * mappings: MAP_UNDER_ASAN); with valgrind, a mapped chunk is announced to
 * memcheck as one heap block, so that its leak check sees it as it sees a
 * malloc'd one.
 */
#define SLAB_BLOCKS DF__SLAB_BLOCKS

/* With AddressSanitizer the default pages hooks map nothing: every chunk
 * comes from malloc.  LeakSanitizer scans malloc'd blocks for pointers but
 * not anonymous mappings, so whatever is reachable only through a block
 * of a mapped chunk (a failure kept by a deferred, say) would be reported
 * as leaked at exit.  (tests/check_slab's own hooks still map.) */
#ifdef DF__ASAN
#define MAP_UNDER_ASAN 1
#else
#define MAP_UNDER_ASAN 0
#endif
#define CHUNK_MAX DF__SLAB_CHUNK_MAX

#define POISON DF__POISON
#define UNPOISON DF__UNPOISON
#define CHUNK_HDR ((sizeof(df__chunk) + 15u) & ~(size_t)15u)

_Static_assert(offsetof(df__chunk, loop) == 0, "df__chunk_loop reads it");
_Static_assert((CHUNK_MAX & (CHUNK_MAX - 1)) == 0, "a power of two");

/* Maps `bytes` (a power of two) aligned to `bytes`: maps twice as much and
 * trims both ends, as mmap only promises page alignment. */
static void *pages_map(size_t bytes)
{
    size_t span = 2 * bytes;
    char *p = mmap(NULL, span, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    char *a = (char *)(((uintptr_t)p + bytes - 1) & ~(uintptr_t)(bytes - 1));
    if (a > p)
        munmap(p, (size_t)(a - p));
    if (a + bytes < p + span)
        munmap(a + bytes, (size_t)(p + span - (a + bytes)));
#ifdef MADV_HUGEPAGE
    (void)madvise(a, bytes, MADV_HUGEPAGE); /* EINVAL without THP: fine */
#endif
    return a;
}

static void pages_unmap(void *p, size_t bytes)
{
    munmap(p, bytes);
}

const df__pages df__default_pages = {pages_map, pages_unmap};

static bool default_allocator(const df_loop *loop)
{
    return loop->alloc.malloc == default_malloc;
}

void df__chunk_free(df_loop *loop, df__slab *s, df__chunk *c)
{
    if (c->listed)
        df__chunk_unlist(s, c);
    s->chunks--;
    UNPOISON(c, c->bytes);
    if (c->mapped) {
        size_t bytes = c->bytes; /* memcheck: c is freed from here on */
        VALGRIND_FREELIKE_BLOCK(c, 0);
        s->pages->unmap(c, bytes);
    } else {
        df__free(loop, c);
    }
}

void df__slab_init(df__slab *s, size_t size)
{
    s->partial = NULL;
    s->size = (size + 7u) & ~(size_t)7u;
    s->chunks = 0;
    s->empty = 0;
    s->pages = &df__default_pages;
}

/* The size of s's next chunk, header included (see "Chunk sizes"). */
static size_t chunk_bytes(const df__slab *s)
{
    size_t first = CHUNK_HDR + SLAB_BLOCKS * s->size;
    if (first >= CHUNK_MAX / 2)
        return first;
    size_t bytes = first;
    for (size_t k = 0; k < s->chunks && bytes < CHUNK_MAX; k++)
        bytes *= 2;
    return bytes < CHUNK_MAX ? bytes : CHUNK_MAX;
}

void *df__slab_get_slow(df_loop *loop, df__slab *s)
{
    size_t bytes = chunk_bytes(s);
    bool mapped = false;
    df__chunk *c = NULL;
    if (bytes == CHUNK_MAX && default_allocator(loop) &&
        (s->pages != &df__default_pages || !MAP_UNDER_ASAN)) {
        c = s->pages->map(bytes);
        if (c != NULL) {
            mapped = true;
            VALGRIND_MALLOCLIKE_BLOCK(c, bytes, 0, 1);
        }
    }
    if (c == NULL)
        c = df__malloc(loop, bytes);
    if (c == NULL && bytes > CHUNK_HDR + SLAB_BLOCKS * s->size) {
        bytes = CHUNK_HDR + SLAB_BLOCKS * s->size;
        c = df__malloc(loop, bytes);
    }
    if (c == NULL)
        return NULL;
    size_t blocks = (bytes - CHUNK_HDR) / s->size;
    c->loop = loop;
    c->free = NULL;
    c->bump = (char *)c + CHUNK_HDR;
    c->end = c->bump + blocks * s->size;
    c->bytes = bytes;
    c->used = 0;
    c->mapped = mapped;
    POISON(c->bump, blocks * s->size);
    df__chunk_list(s, c);
    s->chunks++;
    s->empty++;
    return df__slab_get_inline(loop, s);
}

void *df__slab_get(df_loop *loop, df__slab *s)
{
    return df__slab_get_inline(loop, s);
}

void df__slab_put(df_loop *loop, df__slab *s, void *p)
{
    df__slab_put_inline(loop, s, p);
}

/* ------------------------------------------------------------ big arrays */

void *df__malloc_bulk(df_loop *loop, size_t size)
{
    if (loop == NULL || !default_allocator(loop) || size < CHUNK_MAX)
        return df__malloc(loop, size);
    /* Aligned so that every whole 2 MiB of the array can be one huge page;
     * free() takes it back like any malloc'd block. */
    void *p = NULL;
    if (posix_memalign(&p, CHUNK_MAX, size) != 0)
        return malloc(size);
#ifdef MADV_HUGEPAGE
    (void)madvise(p, size & ~(CHUNK_MAX - 1), MADV_HUGEPAGE);
#endif
    return p;
}

/* Frees the slab's chunks, which must all be empty. */
static void slab_fini(df_loop *loop, df__slab *s)
{
    assert(s->chunks == s->empty);
    while (s->partial != NULL)
        df__chunk_free(loop, s, s->partial);
}

void df__alloc_fini(df_loop *loop)
{
    for (int i = 0; i < DF__CACHES; i++) {
        void *block;
        while ((block = df__cache_get(&loop->caches[i])) != NULL)
            df__free(loop, block);
    }
    for (int i = 0; i < DF__SLABS; i++)
        slab_fini(loop, &loop->slabs[i]);
}
