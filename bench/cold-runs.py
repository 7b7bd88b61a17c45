#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Cold runs of the no-work case against libuv and the fresh-memory floor.
#
# usage: bench/cold-runs.py BINDIR ROUNDS [SLEEP_S]
#
# Each round runs bench-uv, bench-deferred, bench-touch, bench-deferred-cb
# and bench-deferred-map at `1000000 64 2 0`, each after SLEEP_S seconds
# (default 3) of sleep, so that the host can take back what the run before
# freed (on a virtual machine whose host takes back free memory, memory
# freed just before is much cheaper to touch again; see bench/RESULTS.md,
# "after s7").  The runs here free at most 160 MB each.
# Prints every run's ns/item and the process's system and user CPU time
# per item (getrusage: all threads, the untimed start and exit included),
# then the medians, the medians of the per-round ratios to libuv, and the
# eager form less the floor measured in the same round, against libuv.
import subprocess, re, time, resource, statistics, sys, os
if len(sys.argv) not in (3, 4) or int(sys.argv[2]) < 1:
    sys.exit('usage: cold-runs.py BINDIR ROUNDS [SLEEP_S] (ROUNDS >= 1)')
b, R = sys.argv[1], int(sys.argv[2])
pause = float(sys.argv[3]) if len(sys.argv) == 4 else 3.0
N = 1000000
progs = ('bench-uv', 'bench-deferred', 'bench-touch', 'bench-deferred-cb',
         'bench-deferred-map')
def run(p):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    o = subprocess.run([f'{b}/{p}', str(N), '64', '2', '0'],
                       capture_output=True, text=True, timeout=600).stdout
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r'ns_per_item=([0-9.]+)', o)
    if not m or 'check=ok' not in o:
        sys.exit(f'{p} failed: {o}')
    return (float(m.group(1)), (r1.ru_stime - r0.ru_stime) * 1e9 / N,
            (r1.ru_utime - r0.ru_utime) * 1e9 / N)
print(f'# {time.strftime("%H:%M:%S")} cold runs: {pause} s of sleep before '
      f'each, {N} items, L64 T2, no work; load {os.getloadavg()}', flush=True)
rows = []
for r in range(R):
    row = {}
    for p in progs:
        time.sleep(pause)
        row[p] = run(p)
        print(f'r{r+1} {p} ns_per_item={row[p][0]} sys_ns={row[p][1]:.0f} '
              f'user_ns={row[p][2]:.0f}', flush=True)
    rows.append(row)
print(f'# end {time.strftime("%H:%M:%S")} load {os.getloadavg()}')
med = statistics.median
print(f'## bench-uv: {med(r["bench-uv"][0] for r in rows):.0f} ns/item')
for p in progs[1:]:
    print(f'## {p}: {med(r[p][0] for r in rows):.0f} ns/item, system '
          f'{med(r[p][1] for r in rows):.0f}; /uv '
          f'{med(r[p][0] / r["bench-uv"][0] for r in rows):.2f}')
print('## (bench-deferred - bench-touch)/uv ' + '%.2f' % med(
    (r['bench-deferred'][0] - r['bench-touch'][0]) / r['bench-uv'][0]
    for r in rows))
