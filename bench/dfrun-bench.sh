#!/bin/sh
# SPDX-License-Identifier: MIT
# Benchmarks dfrun against xargs -P and GNU parallel at the same -j:
#   1. per-job overhead: N_TRUE jobs of `true` (GNU parallel: N_PAR jobs,
#      it is that much slower; compare the per-job times);
#   2. CPU-bound scaling: N_CPU jobs of about 10 ms of CPU each (an awk
#      loop calibrated below) at -j 1 and -j 2;
#   3. memory over an endless input: maxrss of `yes | head -n N | dfrun
#      -j2 true` at N = MEM_SMALL and MEM_BIG.
# The tools run interleaved, ROUNDS times; medians are printed as a
# markdown table.  Usage: bench/dfrun-bench.sh [path/to/dfrun]
# (make bench-dfrun passes the built one).  Environment: ROUNDS (3),
# JOBS (2), N_TRUE (10000), N_PAR (2000), N_CPU (1000), MEM_SMALL (10000),
# MEM_BIG (1000000), MEM_ROUNDS (ROUNDS).  Needs /usr/bin/time and awk;
# GNU parallel is optional.
set -u

dfrun=${1:-dfrun}
ROUNDS=${ROUNDS:-3}
JOBS=${JOBS:-2}
N_TRUE=${N_TRUE:-10000}
N_PAR=${N_PAR:-2000}
N_CPU=${N_CPU:-1000}
MEM_SMALL=${MEM_SMALL:-10000}
MEM_BIG=${MEM_BIG:-1000000}
MEM_ROUNDS=${MEM_ROUNDS:-$ROUNDS}

TIME=/usr/bin/time
if ! test -x $TIME; then
    echo "dfrun-bench: needs $TIME (Debian package time)" >&2
    exit 1
fi
have_parallel=false
if parallel --version 2>/dev/null | grep -q 'GNU parallel'; then
    have_parallel=true
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dfrun-bench.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT

# measure NAME INPUT CMD...: runs CMD with its stdin from INPUT, appends
# "elapsed maxrss_kb cpu_s" to $tmp/NAME (cpu: user + system time of the
# runner and of the jobs it waited for).
measure() {
    name=$1
    input=$2
    shift 2
    $TIME -f '%e %M %U %S' -o "$tmp/t" "$@" < "$input" > /dev/null 2>&1
    awk '{ print $1, $2, $3 + $4 }' "$tmp/t" >> "$tmp/$name"
}

# median FILE COLUMN
median() {
    cut -d' ' -f "$2" "$1" | sort -n |
        awk '{ v[NR] = $1 }
             END { if (NR % 2) print v[(NR + 1) / 2];
                   else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

echo "dfrun-bench: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs," \
     "load $(cut -d' ' -f1-3 /proc/loadavg), rounds $ROUNDS, -j $JOBS" >&2

# 1. Per-job overhead.
seq "$N_TRUE" > "$tmp/in"
seq "$N_PAR" > "$tmp/in.par"
for r in $(seq "$ROUNDS"); do
    echo "round $r: true x $N_TRUE" >&2
    measure dfrun_true "$tmp/in" "$dfrun" -j "$JOBS" true
    measure xargs_true "$tmp/in" xargs -P "$JOBS" -n 1 true
    if $have_parallel; then
        measure par_true "$tmp/in.par" parallel -j "$JOBS" true
    fi
done

# 2. CPU-bound jobs: calibrate the awk loop to about 10 ms of CPU.
iters=200000
seq 20 > "$tmp/in"
while :; do
    $TIME -f '%U %S' -o "$tmp/cal" xargs -I{} \
        awk "BEGIN { for (i = 0; i < $iters; i++) s += i }" < "$tmp/in"
    ms=$(awk '{ printf "%d", ($1 + $2) * 1000 / 20 }' "$tmp/cal")
    if test "$ms" -ge 9 || test "$iters" -gt 100000000; then
        break
    fi
    iters=$((iters * 2))
    if test "$ms" -ge 5; then
        iters=$((iters * 10 / (ms * 2) ))
    fi
done
echo "cpu job: awk loop of $iters iterations, ${ms} ms CPU each" >&2
cpu_job="awk 'BEGIN { for (i = 0; i < $iters; i++) s += i }'"
seq "$N_CPU" > "$tmp/in"
for r in $(seq "$ROUNDS"); do
    echo "round $r: cpu x $N_CPU" >&2
    measure dfrun_cpu1 "$tmp/in" "$dfrun" -j 1 "$cpu_job #"
    measure dfrun_cpu2 "$tmp/in" "$dfrun" -j 2 "$cpu_job #"
    measure xargs_cpu2 "$tmp/in" xargs -P 2 -n 1 sh -c "$cpu_job" sh
done

# 3. Memory over a long input.
for r in $(seq "$MEM_ROUNDS"); do
    for n in "$MEM_SMALL" "$MEM_BIG"; do
        echo "round $r: memory, $n inputs" >&2
        yes | head -n "$n" | $TIME -f '%e %M' -o "$tmp/t" \
            "$dfrun" -j 2 true > /dev/null 2>&1
        cat "$tmp/t" >> "$tmp/mem_$n"
    done
done

dt=$(median "$tmp/dfrun_true" 1)
xt=$(median "$tmp/xargs_true" 1)
dc=$(median "$tmp/dfrun_true" 3)
xc=$(median "$tmp/xargs_true" 3)
echo
echo "| case | wall s | wall ms/job | CPU ms/job | ratio |"
echo "|---|---|---|---|---|"
awk -v j="$JOBS" -v n="$N_TRUE" -v d="$dt" -v x="$xt" -v dc="$dc" -v xc="$xc" 'BEGIN {
    printf "| dfrun -j%s true x %d | %.2f | %.3f | %.3f | |\n", j, n, d, d * 1000 / n, dc * 1000 / n
    printf "| xargs -P%s -n1 true x %d | %.2f | %.3f | %.3f | dfrun/xargs wall %.2f, CPU %.2f |\n", j, n, x, x * 1000 / n, xc * 1000 / n, d / x, dc / xc }'
if $have_parallel; then
    pt=$(median "$tmp/par_true" 1)
    pc=$(median "$tmp/par_true" 3)
    awk -v j="$JOBS" -v n="$N_PAR" -v nd="$N_TRUE" -v d="$dt" -v p="$pt" -v dc="$dc" -v pc="$pc" 'BEGIN {
        printf "| parallel -j%s true x %d | %.2f | %.3f | %.3f | parallel/dfrun per job: wall %.1f, CPU %.1f |\n", j, n, p, p * 1000 / n, pc * 1000 / n, (p / n) / (d / nd), (pc / n) / (dc / nd) }'
fi
c1=$(median "$tmp/dfrun_cpu1" 1)
c2=$(median "$tmp/dfrun_cpu2" 1)
cx=$(median "$tmp/xargs_cpu2" 1)
c1c=$(median "$tmp/dfrun_cpu1" 3)
c2c=$(median "$tmp/dfrun_cpu2" 3)
cxc=$(median "$tmp/xargs_cpu2" 3)
awk -v n="$N_CPU" -v a="$c1" -v b="$c2" -v x="$cx" -v ac="$c1c" -v bc="$c2c" -v xc="$cxc" -v ms="$ms" 'BEGIN {
    printf "| dfrun -j1, %d jobs of ~%d ms CPU | %.2f | %.3f | %.3f | |\n", n, ms, a, a * 1000 / n, ac * 1000 / n
    printf "| dfrun -j2, same | %.2f | %.3f | %.3f | speed-up -j2/-j1 %.2f |\n", b, b * 1000 / n, bc * 1000 / n, a / b
    printf "| xargs -P2 sh -c, same | %.2f | %.3f | %.3f | dfrun/xargs wall %.2f |\n", x, x * 1000 / n, xc * 1000 / n, b / x }'
ms_=$(median "$tmp/mem_$MEM_SMALL" 2)
mb=$(median "$tmp/mem_$MEM_BIG" 2)
awk -v s="$MEM_SMALL" -v b="$MEM_BIG" -v ms="$ms_" -v mb="$mb" 'BEGIN {
    printf "\n| inputs | dfrun -j2 true maxrss KiB (median) |\n|---|---|\n"
    printf "| %d | %d |\n| %d | %d (%+.1f%%) |\n", s, ms, b, mb, (mb - ms) * 100 / ms }'
