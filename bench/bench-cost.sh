#!/bin/sh
# SPDX-License-Identifier: MIT
# Prints each benchmark program's cost per item: callgrind instructions and kept bytes.
#
# usage: bench/bench-cost.sh BINDIR        ("make bench-cost" runs it)
#
# For every program found in BINDIR (bench-seq, bench-condvar, bench-uv,
# bench-glib, bench-glib-aq, bench-tbb, bench-deferred, bench-deferred-cb,
# bench-deferred-map; missing ones are skipped with a note) and every LIMIT
# in BENCH_COST_LIMITS, with THREADS worker threads and no work per item:
#
#   instructions per item: user-space instructions counted by callgrind
#     (valgrind --tool=callgrind --separate-threads=yes), the whole process
#     (all threads summed) and the loop/main thread alone (valgrind thread
#     1: the thread that runs the loop, or waits, in every program), as
#     the slope between two runs:  (I(N2) - I(N1)) / (N2 - N1).  The slope
#     removes every fixed cost (process and thread start-up, library
#     initialisation, teardown, the final check's setup); what remains is
#     the cost of one more item, harness included.  "All threads, over
#     harness" subtracts bench-seq's slope (the whole harness: result
#     arrays, bench_record, the in-flight counters, the final check, all
#     on one thread).  "Loop thread, over harness" subtracts only the part
#     of the harness that runs on the loop thread in the pooled programs:
#     bench_results_init and bench_check, counted in bench-seq with
#     callgrind's --toggle-collect (bench_record, inline, a few
#     instructions, stays in).  bench-seq must be built for these columns.
#
#   bytes per item kept: maxrss at N=M2 minus maxrss at N=M1, native runs
#     (no valgrind), divided by M2 - M1, minus the harness's own 9 bytes per
#     item (an 8-byte value and a 1-byte "seen" flag; see RESULTS.md).
#
# Run it on a plain build (no --enable-debug: the counts are those of the
# build's flags; no sanitizers: they do not run under valgrind).
# Instruction counts do not depend on the machine's load, so they are the
# figures to trust on a shared machine.  Valgrind runs one thread at a time,
# so the batching of completions differs from a native run: the counts say
# how much work a program does per item, not how fast it runs.  Where the
# work per item depends on how completions batch (most peers, and the map
# at a small LIMIT), repeated runs differ by up to about 10% (oneTBB's
# spinning workers more), hence the median of BENCH_COST_REPEAT runs.
#
# Environment:
#   BENCH_COST_LIMITS="64 2"   LIMIT values (one table row per program each)
#   BENCH_COST_THREADS=2       THREADS
#   BENCH_COST_N1=20000        the two callgrind item counts
#   BENCH_COST_N2=40000
#   BENCH_COST_M1=1000000      the two maxrss item counts
#   BENCH_COST_M2=2000000
#   BENCH_COST_REPEAT=3        callgrind runs per item count; the median
#                              of each count is used (see below)
#   BENCH_COST_MEM=yes         "no": skip the maxrss runs
#   BENCH_IMPLS=               space-separated subset of the names below
#                              (seq is always run, for the harness columns)
#   BENCH_TIMEOUT=600          seconds before one run is killed (timeout(1))
#   BENCH_COST_RAW=FILE        also append the raw measurements to FILE
#   VALGRIND=valgrind          the valgrind to use
#
# Exit status: 0 when every run passed its check, 1 if one failed, 2 on a
# usage error or when valgrind is missing.

set -u

if [ $# -ne 1 ] || [ ! -d "$1" ]; then
    echo "usage: $0 BINDIR" >&2
    exit 2
fi
bindir=$1
limits=${BENCH_COST_LIMITS:-64 2}
threads=${BENCH_COST_THREADS:-2}
n1=${BENCH_COST_N1:-20000}
n2=${BENCH_COST_N2:-40000}
m1=${BENCH_COST_M1:-1000000}
m2=${BENCH_COST_M2:-2000000}
do_mem=${BENCH_COST_MEM:-yes}
repeat=${BENCH_COST_REPEAT:-3}
run_timeout=${BENCH_TIMEOUT:-600}
valgrind=${VALGRIND:-valgrind}
harness_bytes=9

for v in "$repeat" "$threads" "$n1" "$n2" "$m1" "$m2" $limits; do
    case $v in
    '' | *[!0-9]*)
        echo "bench-cost: not a positive integer: '$v'" >&2
        exit 2
        ;;
    esac
done
if [ "$n2" -le "$n1" ] || [ "$m2" -le "$m1" ]; then
    echo "bench-cost: need BENCH_COST_N2 > N1 and M2 > M1" >&2
    exit 2
fi
if ! command -v "$valgrind" >/dev/null 2>&1; then
    echo "bench-cost: '$valgrind' not found: install valgrind" \
         "(Debian: apt-get install valgrind) or set VALGRIND" >&2
    exit 2
fi

tmo=
if command -v timeout >/dev/null 2>&1; then
    tmo="timeout -k 10 $run_timeout"
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-cost.XXXXXX") || exit 2
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

# name:program, in table order: the peers, then libdeferred's forms.
all_impls="seq:bench-seq condvar:bench-condvar libuv:bench-uv
glib:bench-glib glib-aq:bench-glib-aq tbb:bench-tbb
libdeferred:bench-deferred libdeferred-cb:bench-deferred-cb
libdeferred-map:bench-deferred-map"

impls=
skipped=
for entry in $all_impls; do
    name=${entry%%:*}
    prog=${entry#*:}
    if [ -n "${BENCH_IMPLS:-}" ] && [ "$name" != seq ]; then
        case " $BENCH_IMPLS " in *" $name "*) ;; *) continue ;; esac
    fi
    if [ -x "$bindir/$prog" ]; then
        impls="$impls $entry"
    else
        skipped="$skipped $name"
    fi
done

field() { # field KEY LINE: the value of KEY=... in a result line
    printf '%s\n' "$2" | tr ' ' '\n' | sed -n "s/^$1=//p" | sed -n 1p
}

failures=0
fail() {
    echo "bench-cost: $*" >&2
    sed 's/^/    /' "$tmp/err" 2>/dev/null | tail -5 >&2
    failures=$((failures + 1))
}

# callgrind PROG N LIMIT: prints "ALL LOOP" (instructions of all threads,
# and of thread 1), or nothing on failure.
callgrind() {
    rm -rf "$tmp/cg"
    mkdir "$tmp/cg" || return 1
    line=$($tmo "$valgrind" --tool=callgrind --separate-threads=yes \
        --callgrind-out-file="$tmp/cg/out" \
        "$bindir/$1" "$2" "$3" "$threads" 0 2>"$tmp/err")
    rc=$?
    if [ $rc -ne 0 ] || [ "$(field check "$line")" != ok ]; then
        fail "$1 $2 $3 $threads 0 under callgrind: exit $rc: $line"
        return 1
    fi
    # One file per thread: out-01 (thread 1), out-02, ...
    set -- "$tmp"/cg/out-*
    if [ ! -f "$1" ]; then
        fail "callgrind wrote no per-thread files in $tmp/cg"
        return 1
    fi
    awk '/^totals:/ { t = $2 + 0; all += t
                      if (FILENAME ~ /-0*1$/) loop = t }
         END { printf "%.0f %.0f\n", all, loop }' "$tmp"/cg/out-*
}

# harness_loop N: instructions inside bench_results_init and bench_check
# of a bench-seq run of N items, or nothing on failure.
harness_loop() {
    rm -rf "$tmp/cg"
    mkdir "$tmp/cg" || return 1
    line=$($tmo "$valgrind" --tool=callgrind --collect-atstart=no \
        --toggle-collect=bench_results_init --toggle-collect=bench_check \
        --callgrind-out-file="$tmp/cg/out" \
        "$bindir/bench-seq" "$1" 1 1 0 2>"$tmp/err")
    rc=$?
    if [ $rc -ne 0 ] || [ "$(field check "$line")" != ok ]; then
        fail "bench-seq $1 1 1 0 under callgrind: exit $rc: $line"
        return 1
    fi
    awk '/^totals:/ { t += $2 } END { printf "%.0f\n", t }' "$tmp/cg/out"
}

# callgrind_median PROG N LIMIT: callgrind BENCH_COST_REPEAT times; prints
# the median of each of the two columns, or nothing if a run failed.
callgrind_median() {
    : >"$tmp/runs"
    k=0
    while [ "$k" -lt "$repeat" ]; do
        callgrind "$@" >>"$tmp/runs" || return 1
        k=$((k + 1))
    done
    for col in 1 2; do
        sort -n -k "$col,$col" "$tmp/runs" |
            awk -v c="$col" '{ v[NR] = $c }
                END { m = (NR % 2) ? v[(NR + 1) / 2] \
                                   : (v[NR / 2] + v[NR / 2 + 1]) / 2
                      printf "%.0f\n", m }'
    done | tr '\n' ' ' | sed 's/ $//'
    echo
}

# maxrss PROG N LIMIT: prints maxrss_kb of a native run.
maxrss() {
    line=$($tmo "$bindir/$1" "$2" "$3" "$threads" 0 2>"$tmp/err")
    rc=$?
    if [ $rc -ne 0 ] || [ "$(field check "$line")" != ok ]; then
        fail "$1 $2 $3 $threads 0: exit $rc: $line"
        return 1
    fi
    field maxrss_kb "$line"
}

if [ -z "$impls" ]; then
    echo "bench-cost: no benchmark program in $bindir (run it on the" \
         "build's bench/ directory; \"make bench-cost\" builds them)" >&2
    exit 2
fi

commit=$(cd "$(dirname "$0")/.." 2>/dev/null &&
    git rev-parse --short HEAD 2>/dev/null) || commit=
if [ -n "$commit" ] && (cd "$(dirname "$0")/.." &&
    [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]); then
    commit="$commit (modified)"
fi

echo "# bench-cost: source ${commit:-unknown}, $(date -u '+%Y-%m-%d %H:%M UTC')," \
     "$($valgrind --version 2>/dev/null)"
echo "# callgrind slopes over N=$n1..$n2 (median of $repeat runs each)," \
     "maxrss over N=$m1..$m2;" \
     "THREADS=$threads, no work per item"
[ -z "$skipped" ] || echo "# not built, skipped:$skipped"
start=$(date +%s)

raw=$tmp/raw
: >"$raw"
h1= h2=
case " $impls " in
*" seq:bench-seq "*)
    h1=$(harness_loop "$n1") || h1=
    [ -z "$h1" ] || h2=$(harness_loop "$n2") || h2=
    ;;
esac
# The loop-side harness: "harness-loop - N1 - N2 -", read by the table.
echo "harness-loop - ${h1:--} - ${h2:--} - - -" >>"$raw"
for l in $limits; do
    for entry in $impls; do
        name=${entry%%:*}
        prog=${entry#*:}
        a1=$(callgrind_median "$prog" "$n1" "$l") || a1=
        a2=
        [ -z "$a1" ] || a2=$(callgrind_median "$prog" "$n2" "$l") || a2=
        r1= r2=
        if [ "$do_mem" != no ]; then
            r1=$(maxrss "$prog" "$m1" "$l") || r1=
            [ -z "$r1" ] || r2=$(maxrss "$prog" "$m2" "$l") || r2=
        fi
        # impl limit all1 loop1 all2 loop2 rss1 rss2 (- when missing)
        set -- ${a1:-- -} ${a2:-- -}
        echo "$name $l $1 $2 $3 $4 ${r1:--} ${r2:--}" >>"$raw"
        echo "# $name limit=$l done after $(( $(date +%s) - start )) s" >&2
    done
done

if [ -n "${BENCH_COST_RAW:-}" ]; then
    sed "s/^/n1=$n1 n2=$n2 m1=$m1 m2=$m2 threads=$threads /" "$raw" \
        >>"$BENCH_COST_RAW"
fi

awk -v n1="$n1" -v n2="$n2" -v m1="$m1" -v m2="$m2" -v hb="$harness_bytes" '
function slope(a, b) { return (a == "-" || b == "-") ? "" : (b - a) / (n2 - n1) }
function cell(v) {
    if (v == "") return "-"
    v = sprintf("%.0f", v)
    return v == "-0" ? "0" : v
}
function diff(v, h) { return (v == "" || h == "") ? "" : v - h }
$1 == "harness-loop" { hl = slope($3, $5); next }
{
    k = ++nr
    name[k] = $1; lim[k] = $2
    all[k] = slope($3, $5); loop[k] = slope($4, $6)
    mem[k] = ($7 == "-" || $8 == "-") ? "" : \
        ($8 - $7) * 1024 / (m2 - m1) - hb
    if ($1 == "seq") hall[$2] = all[k]
}
END {
    print ""
    print "| program | limit | instr/item, all threads | instr/item, loop thread" \
          " | all threads, over harness | loop thread, over harness" \
          " | bytes/item kept |"
    print "|---|---:|---:|---:|---:|---:|---:|"
    for (k = 1; k <= nr; k++)
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", name[k], lim[k], \
            cell(all[k]), cell(loop[k]), \
            (name[k] == "seq" ? "0" : cell(diff(all[k], hall[lim[k]]))), \
            (name[k] == "seq" ? "-" : cell(diff(loop[k], hl))), \
            cell(mem[k])
    printf "\nharness per item: %s instructions in all (bench-seq), %s of them" \
        " on the loop thread (bench_results_init + bench_check)\n", \
        cell(hall[lim[1]]), cell(hl)
}' "$raw"

cat <<EOF

Instructions: callgrind, (I(N=$n2) - I(N=$n1)) / $((n2 - n1)), user space,
each I the median of $repeat runs;
"all threads" sums every thread, "loop thread" is valgrind thread 1 (the
thread that runs the loop or waits for the results).  "Over harness":
minus bench-seq's slope (all threads), minus the loop-side harness
(loop thread; bench_record, a few instructions, stays in).
Bytes: (maxrss(N=$m2) - maxrss(N=$m1)) / $((m2 - m1)) minus the harness's
$harness_bytes bytes per item, native runs.
tbb has no loop thread: its serial stages run on the workers while the
main thread (thread 1) waits; its workers spin a while before they sleep,
and under valgrind that spinning is counted, so its figures move by up to
a third from run to run.  $((n2 - n1)) items, THREADS=$threads, no work.
EOF
echo
echo "# total $(( $(date +%s) - start )) s"
[ "$failures" -eq 0 ] || exit 1
exit 0
