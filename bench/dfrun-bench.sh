#!/bin/sh
# SPDX-License-Identifier: MIT
# Benchmarks dfrun against xargs -P and GNU parallel at the same -j:
#   1. per-job overhead: N_TRUE jobs of `true` (GNU parallel: N_PAR jobs,
#      it is that much slower; compare the per-job times), and the floor:
#      bench/spawn-floor.c, posix_spawn + wait and nothing else;
#   2. CPU-bound scaling, N_SPIN jobs of about 10 ms of CPU of a compiled
#      loop (bench/dfrun-spin.c) and N_CPU jobs of an awk loop of about
#      10 ms, each at -j 1 and -j 2 under dfrun and xargs -P;
#   3. memory over an endless input: maxrss of `yes | head -n N | dfrun
#      -j2 true` at N = MEM_SMALL and MEM_BIG.
# The tools run interleaved, ROUNDS times; medians are printed as a
# markdown table.  Usage: bench/dfrun-bench.sh [path/to/dfrun]
# (make bench-dfrun passes the built one).  Environment: ROUNDS (3),
# JOBS (2), N_TRUE (10000), N_PAR (2000), N_SPIN (300), N_CPU (1000),
# MEM_SMALL (10000), MEM_BIG (1000000), MEM_ROUNDS (ROUNDS), CC (cc).
# Needs /usr/bin/time, awk and a C compiler; GNU parallel is optional.
# The script refuses to time a runner that does not run a trial batch
# correctly (a .libs binary without LD_LIBRARY_PATH, say): it says why
# and exits 1 rather than print meaningless numbers.
set -u

dfrun=${1:-dfrun}
ROUNDS=${ROUNDS:-3}
JOBS=${JOBS:-2}
N_TRUE=${N_TRUE:-10000}
N_PAR=${N_PAR:-2000}
N_SPIN=${N_SPIN:-300}
N_CPU=${N_CPU:-1000}
MEM_SMALL=${MEM_SMALL:-10000}
MEM_BIG=${MEM_BIG:-1000000}
MEM_ROUNDS=${MEM_ROUNDS:-$ROUNDS}
CC=${CC:-cc}
srcdir=$(dirname "$0")

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

die() {
    echo "dfrun-bench: $*" >&2
    exit 1
}

for prog in spawn-floor dfrun-spin; do
    $CC -O2 -o "$tmp/$prog" "$srcdir/$prog.c" ||
        die "cannot compile $srcdir/$prog.c with $CC"
done
floor=$tmp/spawn-floor
spin=$tmp/dfrun-spin

# check NAME CMD...: CMD must run `echo` on the inputs 1 2 3 and print
# them (in any order) with status 0, else the timings would mean nothing.
check() {
    name=$1
    shift
    printf '1\n2\n3\n' | "$@" > "$tmp/check.out" 2> "$tmp/check.err"
    st=$?
    if test $st -ne 0 || test "$(sort "$tmp/check.out" | tr '\n' ' ')" != "1 2 3 "
    then
        echo "dfrun-bench: $name does not work (status $st), not timing it:" >&2
        echo "  $*" >&2
        sed 's/^/  /' "$tmp/check.err" >&2
        exit 1
    fi
}
check dfrun "$dfrun" -j "$JOBS" echo
check xargs xargs -P "$JOBS" -n 1 echo
if $have_parallel; then
    check parallel parallel -j "$JOBS" echo
fi

# measure NAME INPUT CMD...: runs CMD with its stdin from INPUT, appends
# "elapsed maxrss_kb cpu_s" to $tmp/NAME (cpu: user + system time of the
# runner and of the jobs it waited for).  A failing run stops the script.
measure() {
    name=$1
    input=$2
    shift 2
    if ! $TIME -f '%e %M %U %S' -o "$tmp/t" "$@" < "$input" > /dev/null \
            2> "$tmp/err"; then
        echo "dfrun-bench: $name failed, no results:" >&2
        echo "  $*" >&2
        sed 's/^/  /' "$tmp/err" | tail -5 >&2
        exit 1
    fi
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
    measure floor_true /dev/null "$floor" "$N_TRUE" "$JOBS" true
    if $have_parallel; then
        measure par_true "$tmp/in.par" parallel -j "$JOBS" true
    fi
done

# 2. CPU-bound jobs.  calibrate NAME sets iters and ms: for spin, the
# steps dfrun-spin itself finds for 10 ms of its loop's CPU (dfrun-spin
# -c: the start of the process is not counted); for awk, doubles (then
# scales) the iteration count until 20 runs of the whole job, shell and
# awk's start included, take about 10 ms of CPU each.  job_cmd NAME ITERS
# prints the command line.
job_cmd() {
    case $1 in
    spin) echo "$spin $2" ;;
    awk) echo "awk 'BEGIN { for (i = 0; i < $2; i++) s += i }'" ;;
    esac
}
calibrate() {
    if test "$1" = spin; then
        cal=$("$spin" -c 10) || die "dfrun-spin -c fails"
        set -- $cal
        iters=$1
        ms=$(printf '%.0f' "$2")
        return
    fi
    iters=200000
    seq 20 > "$tmp/cal.in"
    while :; do
        $TIME -f '%U %S' -o "$tmp/cal" xargs -I{} sh -c "$(job_cmd "$1" "$iters")" \
            < "$tmp/cal.in" || die "the $1 job fails"
        ms=$(awk '{ printf "%d", ($1 + $2) * 1000 / 20 }' "$tmp/cal")
        if test "$ms" -ge 9 || test "$iters" -gt 1000000000; then
            break
        fi
        if test "$ms" -ge 3; then
            iters=$((iters * 10 / ms))
        else
            iters=$((iters * 4))
        fi
    done
}

# cpu_rounds NAME N: dfrun -j1, -j2 and xargs -P1, -P2 on N jobs (the awk
# job through sh -c under both runners).
cpu_rounds() {
    cmd=$(job_cmd "$1" "$iters")
    seq "$2" > "$tmp/in"
    for r in $(seq "$ROUNDS"); do
        echo "round $r: $1 x $2" >&2
        for j in 1 2; do
            if test "$1" = spin; then
                # dfrun-spin ignores the input appended: both runners
                # exec it directly.
                measure "dfrun_${1}$j" "$tmp/in" "$dfrun" -j $j $cmd
                measure "xargs_${1}$j" "$tmp/in" xargs -P $j -n 1 $cmd
            else
                # The trailing # makes the shell ignore the input.
                measure "dfrun_${1}$j" "$tmp/in" "$dfrun" -j $j "$cmd #"
                measure "xargs_${1}$j" "$tmp/in" xargs -P $j -n 1 \
                    sh -c "$cmd" sh
            fi
        done
    done
}

calibrate spin
spin_iters=$iters
spin_ms=$ms
echo "cpu job: dfrun-spin of $iters steps, ${ms} ms CPU each in its loop" >&2
cpu_rounds spin "$N_SPIN"
calibrate awk
awk_iters=$iters
awk_ms=$ms
echo "cpu job: awk loop of $iters iterations, ${ms} ms CPU each" >&2
cpu_rounds awk "$N_CPU"

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
ft=$(median "$tmp/floor_true" 1)
dc=$(median "$tmp/dfrun_true" 3)
xc=$(median "$tmp/xargs_true" 3)
fc=$(median "$tmp/floor_true" 3)
echo
echo "| case | wall s | wall ms/job | CPU ms/job | ratio |"
echo "|---|---|---|---|---|"
awk -v j="$JOBS" -v n="$N_TRUE" -v d="$dt" -v x="$xt" -v f="$ft" -v dc="$dc" -v xc="$xc" -v fc="$fc" 'BEGIN {
    printf "| spawn-floor -j%s true x %d | %.2f | %.3f | %.3f | |\n", j, n, f, f * 1000 / n, fc * 1000 / n
    printf "| dfrun -j%s true x %d | %.2f | %.3f | %.3f | dfrun/floor wall %.2f, CPU %.2f |\n", j, n, d, d * 1000 / n, dc * 1000 / n, d / f, dc / fc
    printf "| xargs -P%s -n1 true x %d | %.2f | %.3f | %.3f | dfrun/xargs wall %.2f, CPU %.2f |\n", j, n, x, x * 1000 / n, xc * 1000 / n, d / x, dc / xc }'
if $have_parallel; then
    pt=$(median "$tmp/par_true" 1)
    pc=$(median "$tmp/par_true" 3)
    awk -v j="$JOBS" -v n="$N_PAR" -v nd="$N_TRUE" -v d="$dt" -v p="$pt" -v dc="$dc" -v pc="$pc" 'BEGIN {
        printf "| parallel -j%s true x %d | %.2f | %.3f | %.3f | parallel/dfrun per job: wall %.1f, CPU %.1f |\n", j, n, p, p * 1000 / n, pc * 1000 / n, (p / n) / (d / nd), (pc / n) / (dc / nd) }'
fi
# cpu_report NAME N MS LABEL
cpu_report() {
    d1=$(median "$tmp/dfrun_${1}1" 1)
    d2=$(median "$tmp/dfrun_${1}2" 1)
    x1=$(median "$tmp/xargs_${1}1" 1)
    x2=$(median "$tmp/xargs_${1}2" 1)
    d1c=$(median "$tmp/dfrun_${1}1" 3)
    d2c=$(median "$tmp/dfrun_${1}2" 3)
    x1c=$(median "$tmp/xargs_${1}1" 3)
    x2c=$(median "$tmp/xargs_${1}2" 3)
    awk -v n="$2" -v ms="$3" -v l="$4" -v d1="$d1" -v d2="$d2" -v x1="$x1" -v x2="$x2" \
        -v d1c="$d1c" -v d2c="$d2c" -v x1c="$x1c" -v x2c="$x2c" 'BEGIN {
    printf "| dfrun -j1, %d %s jobs of ~%d ms CPU | %.2f | %.3f | %.3f | |\n", n, l, ms, d1, d1 * 1000 / n, d1c * 1000 / n
    printf "| dfrun -j2, same | %.2f | %.3f | %.3f | speed-up -j2/-j1 %.2f |\n", d2, d2 * 1000 / n, d2c * 1000 / n, d1 / d2
    printf "| xargs -P1, same | %.2f | %.3f | %.3f | dfrun/xargs -j1 wall %.2f |\n", x1, x1 * 1000 / n, x1c * 1000 / n, d1 / x1
    printf "| xargs -P2, same | %.2f | %.3f | %.3f | speed-up %.2f; dfrun/xargs -j2 wall %.2f |\n", x2, x2 * 1000 / n, x2c * 1000 / n, x1 / x2, d2 / x2 }'
}
cpu_report spin "$N_SPIN" "$spin_ms" "dfrun-spin"
cpu_report awk "$N_CPU" "$awk_ms" "awk"
ms_=$(median "$tmp/mem_$MEM_SMALL" 2)
mb=$(median "$tmp/mem_$MEM_BIG" 2)
awk -v s="$MEM_SMALL" -v b="$MEM_BIG" -v ms="$ms_" -v mb="$mb" 'BEGIN {
    printf "\n| inputs | dfrun -j2 true maxrss KiB (median) |\n|---|---|\n"
    printf "| %d | %d |\n| %d | %d (%+.1f%%) |\n", s, ms, b, mb, (mb - ms) * 100 / ms }'
