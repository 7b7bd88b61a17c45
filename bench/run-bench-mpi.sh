#!/bin/sh
# SPDX-License-Identifier: MIT
# The MPI benchmark matrix: bench-mpi over 1, 2 and 4 worker ranks against
# the thread pool (bench-deferred-map), CPU-bound items of about 20 us and
# 1 ms, and items with no work (the per-item cost alone).
#
# usage: bench/run-bench-mpi.sh BINDIR      (make bench-mpi does this)
#
# Every round runs every implementation once per case, rounds interleaved
# (slow drift on a shared machine hits all alike); the table gives the
# median ns per item over BENCH_RUNS rounds and, per round, the speed-up
# of R ranks over 1 rank, whose median is printed.
#
# Environment:
#   BENCH_RUNS=3        rounds
#   BENCH_LIMIT=16      items in flight (>= the credit of 4 ranks x 1 thread)
#   BENCH_W20= BENCH_W1MS=  WORK_ITERS of the two CPU cases (default:
#                       calibrated with bench-seq, see below)
#   BENCH_CAL_RUNS=15   calibration runs (the fastest counts)
#   BENCH_MPI_CPU=1     bench-mpi also reports each rank's CPU time and
#                       context switches per item (see bench-mpi.c):
#                       printed as the runs go, before the table
#   BENCH_CASES=        a subset of "nowork 20us 1ms"
#   BENCH_RAW=FILE      also append the raw lines to FILE
#   BENCH_MPI_INLINE=0  workers of one thread in the pool mode (a df_pool
#                       thread runs the items) instead of the default,
#                       inline (the main thread runs them)
#   BENCH_MPI_CREDIT=N  the workers' credit instead of the default
#   BENCH_MPI_NO_YIELD=1  sets OMPI_MCA_mpi_yield_when_idle=0 for the
#                       ranks: Open MPI then does not call sched_yield in
#                       an MPI_Improbe that finds nothing (it does by
#                       default when the job has more ranks than cores).
#                       The library never blocks in MPI, so the yield buys
#                       it nothing; neither the library nor this script
#                       sets it otherwise, and the header line says so.
#   MPIRUN=mpirun       the launcher; Open MPI's root variables are set here
set -u

bindir=${1:?usage: run-bench-mpi.sh BINDIR}
runs=${BENCH_RUNS:-3}
limit=${BENCH_LIMIT:-16}
mpirun=${MPIRUN:-mpirun}
OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OMPI_MCA_btl=self,vader
export OMPI_ALLOW_RUN_AS_ROOT OMPI_ALLOW_RUN_AS_ROOT_CONFIRM OMPI_MCA_btl
if test "${BENCH_MPI_NO_YIELD:-0}" = 1; then
    OMPI_MCA_mpi_yield_when_idle=0
    export OMPI_MCA_mpi_yield_when_idle
fi
raw=$(mktemp "${TMPDIR:-/tmp}/df-bench-mpi.XXXXXX") || exit 2
trap 'rm -f "$raw"' EXIT

for p in bench-mpi bench-deferred-map bench-seq; do
    if test ! -x "$bindir/$p"; then
        echo "run-bench-mpi: $bindir/$p missing (configure found no MPI?)" >&2
        exit 2
    fi
done

# Calibration: ns per 200000 xorshift steps, the smallest wall time of
# BENCH_CAL_RUNS sequential runs of one such item (about 0.35 ms, which
# usually runs within one time slice even on a loaded machine; load can
# only make a run slower, so the fastest is the closest to the quiet
# machine: at load 16 the fastest of 15 gave 324789 ns, a run of 100
# items 2244168 ns per item).  It used to be the user CPU time of one run
# of 400 items from bash's time, which on this virtual machine is no
# steadier than wall time (the host's contention is not reported as steal
# time, /proc/stat's steal stays 0, so it is likely charged to the running
# process): on a quiet machine it gave 652500 ns per 200000 steps where
# the run's own wall clock gave 345130, and the "1 ms" items took 0.51 ms
# (threads-1 ran 306513 steps in 513529 ns, 1.68 ns a step, as the wall
# clock said).
cal_runs=${BENCH_CAL_RUNS:-15}
ns=
k=0
while test "$k" -lt "$cal_runs"; do
    line=$("$bindir/bench-seq" 1 1 1 200000)
    v=$(echo "$line" | sed -n 's/.*ns_per_item=\([0-9.]*\).*/\1/p')
    ns=$(awk -v a="$ns" -v b="$v" 'BEGIN { if (a == "" || (b != "" && b + 0 < a + 0)) print b; else print a }')
    k=$((k + 1))
done
if test -z "$ns"; then
    echo "run-bench-mpi: bench-seq gave no ns_per_item: $line" >&2
    exit 2
fi
w20=${BENCH_W20:-$(awk -v ns="$ns" 'BEGIN { printf "%d", 20000 * 200000 / ns }')}
w1ms=${BENCH_W1MS:-$(awk -v ns="$ns" 'BEGIN { printf "%d", 1000000 * 200000 / ns }')}
echo "calibration: fastest of $cal_runs bench-seq runs: $ns ns per 200000 steps"
echo "WORK_ITERS: 20us=$w20 1ms=$w1ms; limit=$limit; rounds=$runs"
echo "load: $(cat /proc/loadavg 2>/dev/null)"
echo "workers: inline=${BENCH_MPI_INLINE:-default}" \
    "credit=${BENCH_MPI_CREDIT:-default}" \
    "OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-unset}"

# case name, N, WORK_ITERS
cases="nowork:20000:0 20us:20000:$w20 1ms:1000:$w1ms"

status=0
round=1
while test "$round" -le "$runs"; do
    for c in $cases; do
        name=${c%%:*}
        rest=${c#*:}
        case " ${BENCH_CASES:-$name} " in
        *" $name "*) ;;
        *) continue ;;
        esac
        n=${rest%%:*}
        w=${rest#*:}
        for impl in threads-1 threads-2 mpi-r1 mpi-r2 mpi-r4; do
            case $impl in
            threads-*)
                out=$("$bindir/bench-deferred-map" "$n" "$limit" \
                    "${impl#threads-}" "$w" 2>&1) ;;
            mpi-r*)
                np=$((${impl#mpi-r} + 1))
                out=$(timeout -k 10 600 "$mpirun" -np "$np" --oversubscribe \
                    --bind-to none "$bindir/bench-mpi" "$n" "$limit" 1 "$w" \
                    2>&1) ;;
            esac
            rc=$?
            line=$(echo "$out" | grep '^impl=' | tail -n 1)
            mc=$(echo "$out" | sed -n 's/^mpi-master \(cpu_ns_per_item=[0-9]*\)$/master_\1/p')
            test "$rc" -eq 0 || { status=1; echo "$out" >&2; }
            echo "case=$name round=$round name=$impl rc=$rc $line $mc" >>"$raw"
            echo "$out" | grep -E '^mpi-(worker|master switches)' |
                sed "s/^/case=$name round=$round name=$impl: /"
        done
    done
    round=$((round + 1))
done
test -n "${BENCH_RAW:-}" && cat "$raw" >>"$BENCH_RAW"

awk '
function kv(line, key,    a, n, k) {
    n = split(line, a, " ")
    for (k = 1; k <= n; k++)
        if (index(a[k], key "=") == 1)
            return substr(a[k], length(key) + 2)
    return ""
}
function median(list,    a, k, n, v, j) {
    n = split(list, a, " ")
    for (k = 2; k <= n; k++) {
        v = a[k] + 0; j = k - 1
        while (j >= 1 && a[j] + 0 > v) { a[j + 1] = a[j]; j-- }
        a[j + 1] = v
    }
    if (n == 0) return 0
    if (n % 2) return a[(n + 1) / 2]
    return (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    c = kv($0, "case"); i = kv($0, "name"); r = kv($0, "round")
    if (!(c in cs)) { cs[c] = 1; co[++nc] = c }
    if (!(i in is)) { is[i] = 1; io[++ni] = i }
    ns = kv($0, "ns_per_item")
    if (kv($0, "rc") != "0" || kv($0, "check") != "ok" || ns == "") {
        bad[c, i] = 1; next
    }
    v[c, i] = v[c, i] " " ns
    nsr[c, i, r] = ns
    mc = kv($0, "master_cpu_ns_per_item")
    if (mc != "") mcl[c, i] = mcl[c, i] " " mc
    rounds[r] = 1
}
END {
    printf "\nmedian ns per item (FAIL: a run failed its check)\n"
    printf "%-8s", "case"
    for (k = 1; k <= ni; k++) printf " %12s", io[k]
    printf "\n"
    for (j = 1; j <= nc; j++) {
        c = co[j]; printf "%-8s", c
        for (k = 1; k <= ni; k++) {
            i = io[k]
            if ((c, i) in bad) printf " %12s", "FAIL"
            else printf " %12.0f", median(v[c, i])
        }
        printf "\n"
    }
    printf "\nmaster CPU ns per item (all its threads; median)\n"
    for (j = 1; j <= nc; j++) {
        c = co[j]; printf "%-8s", c
        for (k = 1; k <= ni; k++) {
            i = io[k]
            if ((c, i) in mcl) printf " %s=%.0f", i, median(mcl[c, i])
        }
        printf "\n"
    }
    printf "\nper round: speed-up over mpi-r1 (median of the rounds), and\n"
    printf "mpi-r1 minus threads-1 ns per item (the MPI path'"'"'s extra cost)\n"
    for (j = 1; j <= nc; j++) {
        c = co[j]
        s2 = ""; s4 = ""; ov = ""; t2 = ""
        for (r in rounds) {
            b = nsr[c, "mpi-r1", r]
            if (b == "") continue
            if (nsr[c, "mpi-r2", r] != "") s2 = s2 " " b / nsr[c, "mpi-r2", r]
            if (nsr[c, "mpi-r4", r] != "") s4 = s4 " " b / nsr[c, "mpi-r4", r]
            if (nsr[c, "threads-1", r] != "") {
                ov = ov " " (b - nsr[c, "threads-1", r])
                if (nsr[c, "threads-2", r] != "")
                    t2 = t2 " " nsr[c, "threads-1", r] / nsr[c, "threads-2", r]
            }
        }
        printf "%-8s r2/r1 %.2fx  r4/r1 %.2fx  threads 2/1 %.2fx  extra %.0f ns/item\n",
            c, median(s2), median(s4), median(t2), median(ov)
    }
}' "$raw"
exit $status
