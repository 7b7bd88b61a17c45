/* SPDX-License-Identifier: MIT */
/* dfrun-spin: a CPU-bound job for bench/dfrun-bench.sh, N xorshift steps. */
/*
 * Usage: dfrun-spin N [ignored...]
 *        dfrun-spin -c MS
 * The first form runs N steps of a xorshift64 generator and exits 0 (1 on
 * a bad N).  The result is printed only if it is zero, which it never is,
 * so that the compiler must keep the loop and the job writes nothing.
 * Extra arguments (the input a runner appends) are ignored.
 *
 * The second form calibrates: it prints "N ms", the number of steps that
 * take about MS milliseconds of this process's CPU time here, and the CPU
 * time N steps took when tried.  It times the loop alone, with
 * CLOCK_PROCESS_CPUTIME_ID, so that neither the start of a process nor a
 * shell in front of it counts (several milliseconds of CPU each on a
 * loaded virtual machine, which would otherwise be taken for the loop's).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t spin(unsigned long long n)
{
    uint64_t x = 88172645463325252u;
    for (unsigned long long i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

/* CPU time of this process in nanoseconds. */
static double cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* CPU nanoseconds that n steps take. */
static double time_steps(unsigned long long n)
{
    double t0 = cpu_ns();
    uint64_t x = spin(n);
    double t = cpu_ns() - t0;
    if (x == 0)
        printf("%llu\n", (unsigned long long)x);
    return t;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Finds the steps for `ms` milliseconds of CPU: the cost of one step is
 * the median of 7 timed runs of a few milliseconds each (a preempted
 * run's cache misses or a busy sibling hyperthread inflate a few of
 * them), then the answer is tried once and its time printed with it. */
static int calibrate(double ms)
{
    unsigned long long n = 100000;
    while (time_steps(n) < 2e6 && n < (1ull << 40))
        n *= 2;
    double per[7];
    for (int i = 0; i < 7; i++)
        per[i] = time_steps(n) / (double)n;
    qsort(per, 7, sizeof per[0], cmp_double);
    unsigned long long steps = (unsigned long long)(ms * 1e6 / per[3]);
    if (steps == 0)
        steps = 1;
    printf("%llu %.2f\n", steps, time_steps(steps) / 1e6);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 1;
    char *end;
    if (argv[1][0] == '-' && argv[1][1] == 'c' && argv[1][2] == '\0') {
        double ms = argc > 2 ? strtod(argv[2], &end) : 0;
        if (argc < 3 || *end != '\0' || !(ms > 0 && ms < 1e6))
            return 1;
        return calibrate(ms);
    }
    unsigned long long n = strtoull(argv[1], &end, 10);
    if (*end != '\0')
        return 1;
    if (spin(n) == 0)
        printf("0\n");
    return 0;
}
