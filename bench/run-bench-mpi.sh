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
#                       calibrated with bench-seq)
#   BENCH_CASES=        a subset of "nowork 20us 1ms"
#   BENCH_RAW=FILE      also append the raw lines to FILE
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
raw=$(mktemp "${TMPDIR:-/tmp}/df-bench-mpi.XXXXXX") || exit 2
trap 'rm -f "$raw"' EXIT

for p in bench-mpi bench-deferred-map bench-seq; do
    if test ! -x "$bindir/$p"; then
        echo "run-bench-mpi: $bindir/$p missing (configure found no MPI?)" >&2
        exit 2
    fi
done

# Calibration: ns per xorshift step, from the user CPU time of a
# sequential run (bash's time), which a loaded machine disturbs less than
# wall time; without bash, from its wall time.
line=$("$bindir/bench-seq" 400 1 1 200000)
ns=$(echo "$line" | sed -n 's/.*ns_per_item=\([0-9.]*\).*/\1/p')
if command -v bash >/dev/null 2>&1; then
    u=$(bash -c 'TIMEFORMAT=%3U; { time "$0" 400 1 1 200000 >/dev/null; } 2>&1' \
        "$bindir/bench-seq")
    ns=$(awk -v u="$u" -v w="$ns" 'BEGIN { if (u > 0) printf "%.0f", u * 1e9 / 400; else print w }')
fi
w20=${BENCH_W20:-$(awk -v ns="$ns" 'BEGIN { printf "%d", 20000 * 200000 / ns }')}
w1ms=${BENCH_W1MS:-$(awk -v ns="$ns" 'BEGIN { printf "%d", 1000000 * 200000 / ns }')}
echo "calibration: $line; CPU ns per 200000 steps: $ns"
echo "WORK_ITERS: 20us=$w20 1ms=$w1ms; limit=$limit; rounds=$runs"
echo "load: $(cat /proc/loadavg 2>/dev/null)"

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
