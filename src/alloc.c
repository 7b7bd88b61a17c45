/* SPDX-License-Identifier: MIT */
/* The loop's allocator: the user's (or the C library's) and its caches. */
#include <stdlib.h>
#include <string.h>

#include "loop-internal.h"

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
 * A slab hands out blocks of one size carved from chunks of SLAB_BLOCKS
 * blocks, so that a burst of N live deferreds costs N/SLAB_BLOCKS calls to
 * the allocator instead of N, and steady traffic costs none.  Each block
 * handed out starts with a word naming its chunk (the slab writes it, the
 * block's user reads it and leaves it alone: a deferred's first member is
 * that word, and the chunk's first member is the loop, so the block needs
 * no header of its own); a free block's first word holds the link of its
 * chunk's free list instead.  Chunks with a free block are
 * on the slab's `partial` list (doubly linked, newest first), full chunks
 * on no list.  A chunk whose last block comes back is freed unless it is
 * the only empty one, which is kept so that traffic around one chunk's
 * worth of blocks does not allocate and free it over and over.  So memory
 * held beyond the live blocks is at most one chunk per slab plus the free
 * blocks of partly used chunks, and df_loop_free (which requires every
 * object gone) finds at most one chunk per slab.  Loop thread only.
 *
 * Blocks are 8-byte aligned (sizes rounded to 8), not 16 as malloc's:
 * what lives in them (deferreds, pool jobs) holds pointers and 64-bit
 * integers only.
 */
#define SLAB_BLOCKS DF__SLAB_BLOCKS

#define POISON DF__POISON
#define UNPOISON DF__UNPOISON
#define CHUNK_HDR ((sizeof(df__chunk) + 15u) & ~(size_t)15u)

_Static_assert(offsetof(df__chunk, loop) == 0, "df__chunk_loop reads it");

void df__chunk_free(df_loop *loop, df__slab *s, df__chunk *c)
{
    if (c->listed)
        df__chunk_unlist(s, c);
    s->chunks--;
    UNPOISON(c, CHUNK_HDR + SLAB_BLOCKS * s->size);
    df__free(loop, c);
}

void df__slab_init(df__slab *s, size_t size)
{
    s->partial = NULL;
    s->size = (size + 7u) & ~(size_t)7u;
    s->chunks = 0;
    s->empty = 0;
}

void *df__slab_get_slow(df_loop *loop, df__slab *s)
{
    df__chunk *c = df__malloc(loop, CHUNK_HDR + SLAB_BLOCKS * s->size);
    if (c == NULL)
        return NULL;
    c->loop = loop;
    c->free = NULL;
    c->bump = (char *)c + CHUNK_HDR;
    c->end = c->bump + SLAB_BLOCKS * s->size;
    c->used = 0;
    POISON(c->bump, SLAB_BLOCKS * s->size);
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
