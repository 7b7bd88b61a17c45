# SPDX-License-Identifier: MIT
# Shared set-up for the tests/dfrun-*.test scripts: finds the program, makes
# a temporary directory (never in srcdir) and gives check helpers.
set -u

: "${top_builddir:=.}"
: "${EXEEXT:=}"

dfrun="$top_builddir/tools/dfrun/dfrun$EXEEXT"
if test ! -x "$dfrun"; then
    echo "$0: $dfrun was not built" >&2
    exit 99
fi
case $dfrun in /*) ;; *) dfrun="$PWD/$dfrun" ;; esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/dfrun-test.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT

status=0
bad() {
    echo "$0: FAIL: $*" >&2
    status=1
}

# expect_eq WHAT WANT GOT
expect_eq() {
    if test "x$2" != "x$3"; then
        bad "$1: wanted [$2], got [$3]"
    fi
}

# wait_for_lines FILE N: up to 10 s until FILE has at least N lines.
wait_for_lines() {
    i=0
    while test "$(cat "$1" 2>/dev/null | wc -l)" -lt "$2"; do
        i=$((i + 1))
        if test $i -gt 200; then
            bad "timed out waiting for $2 lines in $1"
            return 1
        fi
        sleep 0.05
    done
    return 0
}

# alive PID...: prints the pids that still exist.
alive() {
    for p in "$@"; do
        if kill -0 "$p" 2>/dev/null; then
            echo "$p"
        fi
    done
}
