#!/bin/sh
# SPDX-License-Identifier: MIT
# Runs the benchmark matrix over the built programs; prints medians and ratios.
#
# usage: bench/run-bench.sh BINDIR
#        bench/run-bench.sh --table RAWFILE
#
# BINDIR holds the programs bench-seq, bench-condvar, bench-uv, bench-glib,
# bench-glib-aq, bench-tbb, bench-deferred, bench-deferred-cb and
# bench-deferred-map; those that are missing are skipped (configure builds
# the peers only when it finds their libraries).  Every case runs every implementation once
# per round, rounds interleaved (so slow drift on the machine hits all
# alike), BENCH_RUNS rounds; the tables give medians over the rounds.
# --table prints the tables again from a file saved with BENCH_RAW.
#
# Environment:
#   BENCH_RUNS=5          rounds
#   BENCH_WORK_ITERS=     WORK_ITERS of the CPU cases (default: calibrated
#                         with bench-seq to about BENCH_ITEM_US per item)
#   BENCH_ITEM_US=30      target CPU time per item for the calibration
#   BENCH_CASES=          space-separated subset of the case names
#   BENCH_MATRIX=         replaces the cases: "NAME N LIMIT THREADS WORK"
#                         entries separated by ";", WORK a number or W (the
#                         calibrated WORK_ITERS)
#   BENCH_IMPLS=          space-separated subset of the implementation names
#   BENCH_TIMEOUT=300     seconds before one run is killed (needs timeout(1))
#   BENCH_RAW=FILE        also append the raw result lines to FILE
#
# No CPU pinning: the programs run as a user would run them.
#
# Exit status: 0 when every run printed check=ok, 1 otherwise, 2 on usage.

set -u

# ----------------------------------------------------------------- tables

# Reads raw lines ("case=C round=R rc=RC <program output line>") on stdin
# and prints the median table and the ratio table.  A cell with any failed
# run (non-zero exit, check other than ok, no output) shows FAIL.
render() {
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
    for (k = 2; k <= n; k++) {    # insertion sort: n is small
        v = a[k] + 0; j = k - 1
        while (j >= 1 && a[j] + 0 > v) { a[j + 1] = a[j]; j-- }
        a[j + 1] = v
    }
    if (n % 2) return a[(n + 1) / 2]
    return (a[n / 2] + a[n / 2 + 1]) / 2
}
function extreme(list, want,    a, k, n, m) {
    n = split(list, a, " ")
    m = a[1] + 0
    for (k = 2; k <= n; k++)
        if ((want == "min" && a[k] + 0 < m) || (want == "max" && a[k] + 0 > m))
            m = a[k] + 0
    return m
}
{
    c = kv($0, "case"); i = kv($0, "impl")
    if (i == "") i = "?"
    key = c SUBSEP i
    if (!(key in seen)) {
        seen[key] = 1
        if (!(c in cseen)) { cseen[c] = 1; corder[++nc] = c }
        if (!(i in iseen)) { iseen[i] = 1; iorder[++ni] = i }
    }
    ns = kv($0, "ns_per_item")
    if (kv($0, "rc") != "0" || kv($0, "check") != "ok" || ns == "") {
        fail[key] = 1
        next
    }
    nsl[key] = nsl[key] " " ns
    ipl[key] = ipl[key] " " kv($0, "items_per_s")
    rsl[key] = rsl[key] " " kv($0, "maxrss_kb")
    runs[key]++
    par[c] = sprintf("n=%s limit=%s threads=%s work_iters=%s", kv($0, "n"), \
                     kv($0, "limit"), kv($0, "threads"), kv($0, "work_iters"))
}
END {
    printf "\ncases:\n"
    for (c = 1; c <= nc; c++)
        printf "  %-14s %s\n", corder[c], par[corder[c]]
    printf "\n%-14s %-15s %4s %11s %11s %10s %7s\n", "case", "impl", "runs", \
        "ns/item", "items/s", "maxrss_kb", "spread"
    for (c = 1; c <= nc; c++) {
        for (i = 1; i <= ni; i++) {
            key = corder[c] SUBSEP iorder[i]
            if (!(key in seen)) continue
            if (key in fail) {
                printf "%-14s %-15s %4s %11s\n", corder[c], iorder[i], "-", \
                    "FAIL"
                continue
            }
            m = median(nsl[key])
            med[key] = m
            lo = extreme(nsl[key], "min"); hi = extreme(nsl[key], "max")
            printf "%-14s %-15s %4d %11.1f %11.0f %10.0f %6.0f%%\n", \
                corder[c], iorder[i], runs[key], m, median(ipl[key]), \
                median(rsl[key]), (m > 0 ? 100 * (hi - lo) / m : 0)
        }
    }
    printf "(medians over the runs; spread = (max - min) / median of ns/item)\n"

    # Each libdeferred variant against every other implementation; without
    # libdeferred, every implementation against condvar and seq.
    nd = 0; np = 0
    for (i = 1; i <= ni; i++) {
        if (iorder[i] ~ /^libdeferred/) dut[++nd] = iorder[i]
        else peer[++np] = iorder[i]
    }
    if (nd == 0) {
        for (i = 1; i <= ni; i++) dut[++nd] = iorder[i]
        np = 0
        if ("condvar" in iseen) peer[++np] = "condvar"
        if ("seq" in iseen) peer[++np] = "seq"
    }
    if (np == 0) exit
    printf "\nratio of median ns/item, same run (> 1: the row is slower)\n"
    printf "%-14s %-15s", "case", "impl"
    for (p = 1; p <= np; p++) printf " %10s", "/" peer[p]
    printf "\n"
    for (c = 1; c <= nc; c++) {
        for (d = 1; d <= nd; d++) {
            dk = corder[c] SUBSEP dut[d]
            if (!(dk in seen)) continue
            printf "%-14s %-15s", corder[c], dut[d]
            for (p = 1; p <= np; p++) {
                pk = corder[c] SUBSEP peer[p]
                if ((dk in med) && (pk in med) && med[pk] > 0)
                    printf " %10.2f", med[dk] / med[pk]
                else
                    printf " %10s", "-"
            }
            printf "\n"
        }
    }
}'
}

if [ $# -eq 2 ] && [ "$1" = --table ]; then
    if [ ! -r "$2" ]; then
        echo "run-bench: cannot read $2" >&2
        exit 2
    fi
    render <"$2"
    exit 0
fi
if [ $# -ne 1 ] || [ ! -d "$1" ]; then
    echo "usage: $0 BINDIR | --table RAWFILE" >&2
    exit 2
fi
bindir=$1
runs=${BENCH_RUNS:-5}
item_us=${BENCH_ITEM_US:-30}
run_timeout=${BENCH_TIMEOUT:-300}

# name:program, in table order.  The libdeferred variants come last; the
# ratios compare each of them with every other implementation.
all_impls="seq:bench-seq condvar:bench-condvar libuv:bench-uv glib:bench-glib
glib-aq:bench-glib-aq tbb:bench-tbb libdeferred:bench-deferred
libdeferred-cb:bench-deferred-cb libdeferred-map:bench-deferred-map"

impls=
for entry in $all_impls; do
    name=${entry%%:*}
    prog=${entry#*:}
    if [ -n "${BENCH_IMPLS:-}" ]; then
        case " $BENCH_IMPLS " in *" $name "*) ;; *) continue ;; esac
    fi
    if [ -x "$bindir/$prog" ]; then
        impls="$impls $name:$prog"
    else
        echo "run-bench: $bindir/$prog not built; skipping $name" >&2
    fi
done
if [ -z "$impls" ]; then
    echo "run-bench: no benchmark programs in $bindir" >&2
    exit 1
fi

if command -v timeout >/dev/null 2>&1; then
    tmo="timeout -k 10 $run_timeout"
else
    tmo=
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/run-bench.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' HUP INT TERM
raw=$tmp/raw

# Pulls key=value out of one output line.
field() {
    printf '%s\n' "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"
}

loadavg() {
    if [ -r /proc/loadavg ]; then
        cut -d' ' -f1-3 /proc/loadavg
    else
        echo unknown
    fi
}

# ----------------------------------------------------------- calibration

# WORK_ITERS for ~item_us of CPU per item, from the sequential program:
# the fastest of five short runs at a fixed WORK_ITERS, scaled.  The
# fastest, not the median: on a busy machine the others measure the
# neighbours as well as the work.
calibrate() {
    if [ ! -x "$bindir/bench-seq" ]; then
        echo 15000
        return
    fi
    probe=10000
    for k in 1 2 3 4 5; do
        line=$("$bindir/bench-seq" 2000 1 1 $probe) || return 1
        field ns_per_item "$line"
    done | sort -n | sed -n 1p |
        awk -v p=$probe -v us="$item_us" \
            '{ w = p * us * 1000 / $1
               printf "%d\n", int(w / 100 + 0.5) * 100 }'
}

if [ -n "${BENCH_WORK_ITERS:-}" ]; then
    work=$BENCH_WORK_ITERS
else
    work=$(calibrate)
    if [ -z "$work" ] || [ "$work" -le 0 ]; then
        echo "run-bench: calibration failed" >&2
        exit 1
    fi
fi

# ------------------------------------------------------------- the matrix

# name N LIMIT THREADS WORK_ITERS.  The item counts of the CPU cases give
# about 1 s per run at ~30 us per item (one item at a time on one thread,
# or two threads that each peer only partly uses).
cases="nowork-l64-t2 1000000 64 2 0
cpu-l2-t2 40000 2 2 $work
cpu-l1-t1 30000 1 1 $work
nowork-l2-t2 200000 2 2 0
cpu-l64-t2 40000 64 2 $work
mem-2m-l64-t2 2000000 64 2 0"
if [ -n "${BENCH_MATRIX:-}" ]; then
    cases=$(printf '%s\n' "$BENCH_MATRIX" | tr ';' '\n' |
        awk -v w="$work" 'NF == 0 { next }
            NF != 5 { print "bad BENCH_MATRIX entry: " $0 > "/dev/stderr"
                      exit 1 }
            { if ($5 == "W") $5 = w; print }') || exit 2
fi

selected=$(printf '%s\n' "$cases" | while read -r c n l t w; do
    if [ -n "${BENCH_CASES:-}" ]; then
        case " $BENCH_CASES " in *" $c "*) ;; *) continue ;; esac
    fi
    echo "$c $n $l $t $w"
done)
if [ -z "$selected" ]; then
    echo "run-bench: no case selected" >&2
    exit 2
fi

echo "# libdeferred bench: $(nproc 2>/dev/null || echo '?') CPUs," \
     "$runs runs per cell, WORK_ITERS=$work for the CPU cases" \
     "(~${item_us} us/item)"
echo "# implementations:$(for e in $impls; do printf ' %s' "${e%%:*}"; done)"
echo "# load average at start: $(loadavg)"
start=$(date +%s)
: >"$raw"

round=1
while [ "$round" -le "$runs" ]; do
    printf '%s\n' "$selected" | while read -r c n l t w; do
        for entry in $impls; do
            name=${entry%%:*}
            prog=${entry#*:}
            line=$($tmo "$bindir/$prog" "$n" "$l" "$t" "$w" 2>"$tmp/err")
            rc=$?
            [ -n "$line" ] || line="impl=$name"
            echo "case=$c round=$round rc=$rc $line" >>"$raw"
            if [ $rc -ne 0 ] || [ "$(field check "$line")" != ok ]; then
                echo "run-bench: $c $name round $round: exit $rc:" \
                     "$line" >&2
                sed 's/^/    /' "$tmp/err" | head -5 >&2
            fi
        done
    done
    echo "# round $round/$runs done after $(( $(date +%s) - start )) s" >&2
    round=$((round + 1))
done

if [ -n "${BENCH_RAW:-}" ]; then
    cat "$raw" >>"$BENCH_RAW"
fi
render <"$raw"
echo
echo "# total $(( $(date +%s) - start )) s; load average at end: $(loadavg)"
if grep -v ' rc=0 .* check=ok$' "$raw" | grep -q .; then
    exit 1
fi
exit 0
