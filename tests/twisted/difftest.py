# SPDX-License-Identifier: MIT
"""Differential test: random operation sequences run on Twisted and on
libdeferred (df-replay), traces compared line by line.

  difftest.py --replay PATH [--seeds N] [--first S] [--ops N]
  difftest.py --replay PATH --seed S [--ops N] [--show]

Exits 0 when every trace matched, 1 on the first mismatch (after printing
the command that replays it), 77 when Twisted cannot be imported.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import tw_run
except ImportError as e:  # Twisted missing
    print("difftest: Twisted not available (%s): skipped" % e)
    sys.exit(77)

from departures import DEPARTURES
from gen import gen


def quiet_twisted(runner):
    # Unhandled failures are not part of the trace; keep them off stderr.
    for d in runner.d.values():
        info = getattr(d, "_debugInfo", None)
        if info is not None:
            info.failResult = None


def one(seed, nops, replay):
    lines, avoided = gen(seed, nops)
    r = tw_run.Runner()
    try:
        tw = r.run(lines)
    finally:
        quiet_twisted(r)
    p = subprocess.run([replay], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, timeout=60)
    c = p.stdout.splitlines()
    err = None
    if p.returncode != 0:
        err = "df-replay exited with %d: %s" % (p.returncode,
                                                p.stderr.strip())
    return lines, tw, c, avoided, err


def groups(trace):
    """The trace cut at the "@i" lines that start each operation."""
    out = []
    for line in trace:
        if line.startswith("@"):
            out.append([])
        elif out:
            out[-1].append(line)
    return out


def compare(tw, c, counts):
    """True when the traces agree.  (A departure the generator cannot
    avoid would be normalised here, counted in `counts`; none needs it.)"""
    return tw == c


def report(seed, nops, replay, lines, tw, c, err):
    print("difftest: seed %d differs" % seed)
    if err:
        print(err)
    print("--- operations:")
    for l in lines:
        print("  " + l)
    print("--- trace (Twisted | libdeferred):")
    n = max(len(tw), len(c))
    for i in range(n):
        a = tw[i] if i < len(tw) else ""
        b = c[i] if i < len(c) else ""
        mark = "  " if a == b else "!="
        print("%s %-40s | %s" % (mark, a, b))
    print("replay with: %s %s --replay %s --seed %d --ops %d" % (
        sys.executable, os.path.abspath(__file__), os.path.abspath(replay),
        seed, nops))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replay", required=True)
    ap.add_argument("--seeds", type=int,
                    default=int(os.environ.get("DF_TWISTED_SEEDS", "200")))
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--ops", type=int,
                    default=int(os.environ.get("DF_TWISTED_OPS", "30")))
    ap.add_argument("--seed", type=int)
    ap.add_argument("--show", action="store_true")
    o = ap.parse_args()

    seeds = [o.seed] if o.seed is not None else range(o.first,
                                                      o.first + o.seeds)
    total = {}
    events = 0
    for seed in seeds:
        lines, tw, c, avoided, err = one(seed, o.ops, o.replay)
        for k, v in avoided.items():
            total[k] = total.get(k, 0) + v
        events += sum(1 for l in tw if not l.startswith("@"))
        same = compare(tw, c, total)
        if not same or err or o.show:
            report(seed, o.ops, o.replay, lines, tw, c, err)
            if not same or err:
                return 1
    print("difftest: %d seeds x %d ops, %d trace lines, all agree" % (
        len(seeds), o.ops, events))
    for name in sorted(DEPARTURES):
        how = DEPARTURES[name][0]
        print("  departure %-34s %-10s %d times" % (
            name, "normalised" if how == "normalise" else "avoided",
            total.get(name, 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
