/* SPDX-License-Identifier: MIT */
/* The fresh-memory floor: what writing B new bytes per item costs. */
#include "bench-common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/*
 * A program that keeps B bytes per item until the end of its run must
 * have the kernel fault in and zero that memory once, and write it.  The
 * eager form keeps 160 (bench-cost's "bytes/item kept"): a 128-byte block
 * for the deferred and its pool job, a 24-byte slot of the list, and the
 * program's own 8-byte pointer.  This program does only that work: it
 * writes B bytes per item (BENCH_TOUCH_BYTES, default 160) into fresh
 * anonymous memory taken 2 MiB at a time, 2 MiB-aligned, with the
 * transparent-huge-page advice, which is how libdeferred's slabs take
 * theirs (src/alloc.c).  Nothing else: no threads, no queue, no harness
 * results array.  Its ns_per_item is the floor under a program that
 * keeps B bytes per item in memory it did not have before.  On a virtual
 * machine whose host takes back the guest's free memory (a balloon's
 * free page reporting), that floor is far from memory bandwidth, and a
 * run that follows one which freed much memory gets it back cheaply: see
 * bench/RESULTS.md, "after s7".
 *
 * LIMIT, THREADS and WORK_ITERS are accepted (and printed) so that the
 * command line is the peers'.  check=ok says the first and last byte of
 * every item were read back.
 */
#define CHUNK ((size_t)2 << 20)

static char *chunk_map(void)
{
    /* Twice the size, trimmed to an aligned CHUNK: mmap promises pages. */
    char *p = mmap(NULL, 2 * CHUNK, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    char *a = (char *)(((uintptr_t)p + CHUNK - 1) & ~(uintptr_t)(CHUNK - 1));
    if (a > p)
        munmap(p, (size_t)(a - p));
    if (a + CHUNK < p + 2 * CHUNK)
        munmap(a + CHUNK, (size_t)(p + 2 * CHUNK - (a + CHUNK)));
#ifdef MADV_HUGEPAGE
    (void)madvise(a, CHUNK, MADV_HUGEPAGE);
#endif
    return a;
}

int main(int argc, char **argv)
{
    struct bench_args a;
    bench_parse_args(argc, argv, "touch", &a);

    size_t bytes = 160;
    const char *env = getenv("BENCH_TOUCH_BYTES");
    if (env != NULL) {
        char *end;
        unsigned long v = strtoul(env, &end, 10);
        if (*env < '0' || *env > '9' || *end != '\0' || v == 0 ||
            v > CHUNK) {
            fprintf(stderr, "bench-touch: BENCH_TOUCH_BYTES must be 1..%zu\n",
                    CHUNK);
            return 2;
        }
        bytes = v;
    }
    size_t per_chunk = CHUNK / bytes;
    uint64_t nchunks64 = (a.n + per_chunk - 1) / per_chunk;
    char **chunks = NULL;
    if (nchunks64 <= SIZE_MAX / sizeof *chunks)
        chunks = calloc((size_t)nchunks64, sizeof *chunks);
    if (chunks == NULL) {
        fprintf(stderr, "bench-touch: out of memory\n");
        return 3;
    }
    size_t nchunks = (size_t)nchunks64;

    uint64_t t0 = bench_now_ns();
    bool failed = false;
    uint64_t i = 0;
    for (size_t c = 0; c < nchunks && !failed; c++) {
        chunks[c] = chunk_map();
        if (chunks[c] == NULL) {
            failed = true;
            break;
        }
        for (size_t k = 0; k < per_chunk && i < a.n; k++, i++)
            memset(chunks[c] + k * bytes, (int)(i % 127) + 1, bytes);
    }
    uint64_t t1 = bench_now_ns();

    /* Read back the first and last byte of every item. */
    bool ok = !failed;
    for (uint64_t j = 0; ok && j < a.n; j++) {
        const unsigned char *p = (const unsigned char *)chunks[j / per_chunk] +
                                 (j % per_chunk) * bytes;
        unsigned want = (unsigned)(j % 127) + 1;
        ok = p[0] == want && p[bytes - 1] == want;
    }
    int status = bench_report("touch", &a, t1 - t0, ok, failed);
    for (size_t c = 0; c < nchunks; c++)
        if (chunks[c] != NULL)
            munmap(chunks[c], CHUNK);
    free(chunks);
    return status;
}
