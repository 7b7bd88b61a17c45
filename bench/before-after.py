#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Times two builds of the bench programs interleaved, round by round, with the peers.
#
# usage: bench/before-after.py BEFORE_BINDIR AFTER_BINDIR ROUNDS OUTFILE
#
# Each round runs every case of run-bench.sh's matrix: libuv (nowork64),
# bench-seq (the CPU cases) and oneTBB (w20L2) from AFTER_BINDIR, and the
# BEFORE and AFTER binaries, in an order shuffled for each case and round
# (BENCH_SEED fixes it), each after BENCH_PAUSE seconds of sleep (default
# 0).  The raw ns/item of every run and, at the end, the medians
# and the medians of the per-round ratios are appended to OUTFILE.  The
# CPU cases use WORK_ITERS calibrated for ~20 us from the fastest of five
# short bench-seq runs.  Run it on a quiet machine; say the load.
#
# On a virtual machine whose host takes back freed memory, a run that
# follows one which freed much memory touches it again cheaply, and fresh
# memory costs the eager form more than the rest of its run (bench-touch
# measures that floor alone; see bench/RESULTS.md, "after s7").  Shuffling
# makes that luck random rather than systematic; a pause before every run
# (BENCH_PAUSE=3) lets the host take most of it back (not always all of
# it after a run that freed 300 MB).  Each raw line also gives the process's system CPU time per
# item (sys_ns, all threads and the untimed start and exit included, from
# getrusage), to show where the kernel's share moves.
import subprocess, sys, os, re, statistics, time, resource, random
before, after, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = open(sys.argv[4], 'a')
SYS = {}
PAUSE = float(os.environ.get('BENCH_PAUSE', '0'))
def run(binary, *args):
    SYS['last'] = None
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
    r = subprocess.run([binary] + [str(a) for a in args], capture_output=True, text=True, timeout=600)
    m = re.search(r'ns_per_item=([0-9.]+)', r.stdout)
    if r.returncode != 0 or not m or 'check=ok' not in r.stdout:
        print('FAIL', binary, args, r.stdout, r.stderr, file=sys.stderr); return None
    SYS['last'] = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime - r0) * 1e9 / args[0]
    return float(m.group(1))
def calibrate(bindir):
    best = min(run(f'{bindir}/bench-seq', 2000, 1, 1, 10000) for _ in range(5))
    return int(10000 * 20000 / best / 100 + 0.5) * 100
W = calibrate(after)
print(f'# {time.strftime("%H:%M:%S")} load {os.getloadavg()} W={W} (20 us)', file=out, flush=True)
cases = [
 ('nowork64', 1000000, 64, 2, 0, ['uv'], ['bench-deferred', 'bench-deferred-cb', 'bench-deferred-map']),
 ('nowork2', 200000, 2, 2, 0, [], ['bench-deferred', 'bench-deferred-map']),
 ('w20L1', 30000, 1, 1, W, ['seq'], ['bench-deferred', 'bench-deferred-map']),
 ('w20L2', 40000, 2, 2, W, ['seq', 'tbb'], ['bench-deferred', 'bench-deferred-map']),
 # The rest of run-bench.sh's matrix, for the map's 1.2x bound on every case.
 ('w20L64', 40000, 64, 2, W, ['seq'], ['bench-deferred', 'bench-deferred-map']),
 ('mem2m', 2000000, 64, 2, 0, [], ['bench-deferred', 'bench-deferred-map']),
]
seed = int(os.environ.get('BENCH_SEED', time.time_ns() % 100000))
rng = random.Random(seed)
print(f'# order seed {seed} (BENCH_SEED), pause {PAUSE} s (BENCH_PAUSE)', file=out, flush=True)
res = {}
for r in range(rounds):
    for name, n, lim, th, w, peers, progs in cases:
        # Every run of the case, in an order shuffled afresh each round:
        # a run that follows one which freed much memory gets that memory
        # back cheaply, so a fixed order favours whichever run comes second.
        runs = [(p, f'{after}/bench-{p}', (n, 1, 1, w) if p == 'seq' else (n, lim, th, w))
                for p in peers]
        runs += [(f'{tag}-{p}', f'{d}/{p}', (n, lim, th, w))
                 for tag, d in (('before', before), ('after', after)) for p in progs]
        rng.shuffle(runs)
        row, sysns = {}, {}
        for key, binary, args in runs:
            time.sleep(PAUSE)
            row[key] = run(binary, *args)
            sysns[key] = SYS['last']
        print(f'r{r+1} {name} order: ' + ' '.join(k for k, _, _ in runs), file=out, flush=True)
        for k, v in row.items():
            sn = '-' if sysns[k] is None else f'{sysns[k]:.0f}'
            print(f'r{r+1} {name} {k} ns_per_item={v} sys_ns={sn}', file=out, flush=True)
        row['sys'] = sysns
        res.setdefault(name, []).append(row)
print(f'# end {time.strftime("%H:%M:%S")} load {os.getloadavg()}', file=out, flush=True)
def med(xs): xs = [x for x in xs if x]; return statistics.median(xs) if xs else float('nan')
for name, rows in res.items():
    case = next(c for c in cases if c[0] == name)
    keys = case[5] + [f'{t}-{p}' for t in ('before', 'after') for p in case[6]]
    print(f'## {name}: medians ns/item: ' + ', '.join(f'{k} {med([r[k] for r in rows]):.0f}' for k in keys), file=out)
    ref = 'uv' if 'uv' in keys else ('seq' if 'seq' in keys else None)
    if ref:
        for k in keys:
            if k == ref: continue
            if ref == 'uv':
                print(f'   {k}/uv = {med([r[k]/r[ref] for r in rows if r[k] and r[ref]]):.2f}', file=out)
            else:
                print(f'   speed {k} vs seq = {med([r[ref]/r[k] for r in rows if r[k] and r[ref]]):.3f}', file=out)
    else:
        for p in ('bench-deferred', 'bench-deferred-map'):
            print(f'   {p} after/before = {med([r["after-"+p]/r["before-"+p] for r in rows if r["after-"+p] and r["before-"+p]]):.2f}', file=out)
    for tag in ('before', 'after'):
        e, m = f'{tag}-bench-deferred', f'{tag}-bench-deferred-map'
        print(f'   {tag}: map/eager = {med([r[m]/r[e] for r in rows if r[m] and r[e]]):.2f}', file=out)
out.flush()
