/* SPDX-License-Identifier: MIT */
/* dfrun-spin: a CPU-bound job for bench/dfrun-bench.sh, N xorshift steps. */
/*
 * Usage: dfrun-spin N [ignored...]
 * Runs N steps of a xorshift64 generator and exits 0 (1 on a bad N).  The
 * result is printed only if it is zero, which it never is, so that the
 * compiler must keep the loop and the job writes nothing.  Extra arguments
 * (the input a runner appends) are ignored.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 1;
    char *end;
    unsigned long long n = strtoull(argv[1], &end, 10);
    if (*end != '\0')
        return 1;
    uint64_t x = 88172645463325252u;
    for (unsigned long long i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    if (x == 0)
        printf("%llu\n", (unsigned long long)x);
    return 0;
}
