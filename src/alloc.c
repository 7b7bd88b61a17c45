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

void df__alloc_fini(df_loop *loop)
{
    for (int i = 0; i < DF__CACHES; i++) {
        void *block;
        while ((block = df__cache_get(&loop->caches[i])) != NULL)
            df__free(loop, block);
    }
}
