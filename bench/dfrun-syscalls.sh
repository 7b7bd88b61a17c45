#!/bin/sh
# SPDX-License-Identifier: MIT
# Counts the system calls a job runner makes per job of `true` (strace -ff).
#
# Usage: bench/dfrun-syscalls.sh DFRUN [N [JOBS]]
# DFRUN must be the binary itself, not libtool's wrapper script (make
# bench-dfrun-syscalls runs this through libtool --mode=execute).
# Runs N (1000) jobs of `true` with -j JOBS (2) under dfrun, xargs -P and
# bench/spawn-floor.c (compiled here with $CC), each under `strace -ff`,
# and prints per job the calls
# made by the runner: its own threads, plus what each child does before
# its successful execve (posix_spawn's set-up, the PATH search).  What the
# job itself does after execve is the same for every runner and is left
# out.  Counts do not depend on the machine's load, unlike times (but
# tracing adds a few: a child's SIGCHLD interrupts the signal thread's
# sigwait only under ptrace, hence rt_sigtimedwait and restart_syscall).
set -u
dfrun=$1
N=${2:-1000}
JOBS=${3:-2}
CC=${CC:-cc}
if ! command -v strace > /dev/null; then
    echo "dfrun-syscalls: needs strace" >&2
    exit 1
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dfrun-sys.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
seq "$N" > "$tmp/in"
floor=$tmp/spawn-floor
$CC -O2 -o "$floor" "$(dirname "$0")/spawn-floor.c" || exit 1
if head -c 2 "$dfrun" | grep -q '#!'; then
    echo "dfrun-syscalls: $dfrun is a script; give the binary" >&2
    exit 1
fi

# count NAME CMD...: the runner-side calls per job, by name, in $tmp/NAME.
count() {
    name=$1
    shift
    mkdir "$tmp/$name.d"
    if ! strace -ff -o "$tmp/$name.d/s" "$@" < "$tmp/in" > /dev/null 2> "$tmp/err"
    then
        echo "dfrun-syscalls: $name failed:" >&2
        cat "$tmp/err" >&2
        exit 1
    fi
    # The runner's own file starts with its execve; in a child's file, the
    # lines after its successful execve are the job's.
    for f in "$tmp/$name.d"/s.*; do
        awk 'NR == 1 && /^execve\(.*\) = 0/ { next }
             /^execve\(.*\) = 0/ { print "execve"; exit }
             /^[a-z_0-9]+\(/ { sub(/\(.*/, ""); print }' "$f"
    done | sort | uniq -c |
        awk -v n="$N" '{ printf "%s %.2f\n", $2, $1 / n }' > "$tmp/$name"
}

count dfrun "$dfrun" -j "$JOBS" true
count xargs xargs -P "$JOBS" -n 1 true
count floor "$floor" "$N" "$JOBS" true

echo "| runner-side syscalls per job | dfrun -j$JOBS | xargs -P$JOBS | spawn-floor |"
echo "|---|---|---|---|"
cat "$tmp/dfrun" "$tmp/xargs" "$tmp/floor" | cut -d' ' -f1 | sort -u |
while read -r sc; do
    d=$(awk -v s="$sc" '$1 == s { print $2 }' "$tmp/dfrun")
    x=$(awk -v s="$sc" '$1 == s { print $2 }' "$tmp/xargs")
    f=$(awk -v s="$sc" '$1 == s { print $2 }' "$tmp/floor")
    # Calls made fewer than once per 100 jobs are start-up, not per job.
    awk -v s="$sc" -v d="${d:-0}" -v x="${x:-0}" -v f="${f:-0}" 'BEGIN {
        if (d >= 0.01 || x >= 0.01 || f >= 0.01)
            printf "| %s | %.2f | %.2f | %.2f |\n", s, d, x, f }'
done
for t in dfrun xargs floor; do
    awk '{ s += $2 } END { printf " %.1f", s }' "$tmp/$t"
done | awk '{ printf "| **total** | %s | %s | %s |\n", $1, $2, $3 }'
