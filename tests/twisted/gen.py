# SPDX-License-Identifier: MIT
"""Random operation sequences for the differential test against Twisted.

gen(seed, nops) returns a list of text lines, one operation each, that
both runners (tw_run.py on Twisted, df-replay on libdeferred) execute:

  new K                      D[K] = a new deferred
  fire K V / fail K C        callback with int V / errback with user code C
  add K CB EB ID             add a callback pair; each side is '-' (pass
                             through), 'p' (return the input), 'r:V'
                             (return V), 'x:C' (fail with user code C) or
                             'w:J' (return D[J], i.e. df_wait)
  chain A B                  A.chainDeferred(B)
  pause K / unpause K / cancel K / peek K
  list K FLAGS N M1 .. MN    D[K] = DeferredList(D[M1] .. D[MN]); FLAGS is
                             the DF_LIST_ bit mask (1 one-callback, 2
                             one-errback, 4 consume errors)
  sem S T                    S = DeferredSemaphore(T)
  acq S K                    D[K] = S.acquire()
  rel S                      S.release(), only while an acquire the
                             runner saw fire still holds its token
  run S K SPEC ID            D[K] = S.run(f), f behaving as SPEC
Values are small ints; K indexes deferreds in creation order.
"""

import random

from departures import DEPARTURES


class Gen:
    def __init__(self, seed, nops):
        self.r = random.Random(seed)
        self.nops = nops
        self.lines = []
        self.nd = 0          # deferreds made
        self.paused = {}     # K -> pauses made by the sequence itself
        self.sems = []       # S -> token count
        self.cbid = 0
        self.avoided = {}
        # The "fires" graph: an edge X -> Y means code running in a
        # callback of X may fire Y.  Kinds: 'chain' or 'other'.
        self.edges = {}      # node -> list of (node, kind)
        self.waits = []      # (K, J): a callback on K returns D[J]
        self.semd = {}       # K -> 'acq' or 'run': made by a semaphore
        self.lists = set()   # K made by list
        self.sem_runs = set()  # semaphores with a run() already
        self.sem_acqs = set()  # semaphores with an acquire already
        self.members = {}    # list K -> its members; run K -> fn's deferred
        self.list_waits = set()  # lists with a callback that may df_wait

    def avoid(self, name):
        assert name in DEPARTURES
        self.avoided[name] = self.avoided.get(name, 0) + 1

    def edge(self, a, b, kind):
        self.edges.setdefault(a, []).append((b, kind))

    def reaches_other(self, src, dst):
        """True if src reaches dst by a path with at least one 'other'
        edge (a path of chain edges only is handled like Twisted)."""
        seen = set()
        todo = [(src, False)]
        while todo:
            n, other = todo.pop()
            if (n, other) in seen:
                continue
            seen.add((n, other))
            for m, kind in self.edges.get(n, ()):
                o = other or kind != "chain"
                if m == dst and o:
                    return True
                todo.append((m, o))
        return False

    def wait_ok(self, k, j):
        return not self.reaches_other(("d", j), ("d", k))

    def edges_ok(self):
        return all(self.wait_ok(k, j) for k, j in self.waits)

    def cancel_reaches_list_wait(self, k):
        """Whether cancelling D[k] may reach (through list members, waits
        and run functions' deferreds) a list given a waiting callback."""
        seen = set()
        todo = [k]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.list_waits:
                return True
            todo.extend(self.members.get(n, ()))
            todo.extend(j for (w, j) in self.waits if w == n)
        return False

    def d(self):
        return self.r.randrange(self.nd)

    def val(self):
        return self.r.randint(1, 99)

    def code(self):
        return self.r.randint(1, 9)

    def spec(self, k, fn=False):
        c = self.r.random()
        if c < 0.2 and not fn:
            return "-"
        if c < 0.4 and not fn:
            return "p"
        if c < 0.65:
            return "r:%d" % self.val()
        if c < 0.8:
            return "x:%d" % self.code()
        if k > 0:
            j = self.r.randrange(k)
            if fn or self.wait_ok(k, j):
                return "w:%d" % j
            self.avoid("wait_on_running")
        return "r:%d" % self.val()

    def newid(self):
        self.cbid += 1
        return self.cbid

    def op(self):
        r = self.r
        c = r.random()
        if self.nd < 2 or c < 0.12:
            self.lines.append("new %d" % self.nd)
            self.nd += 1
            return
        if c < 0.26:
            k = self.d()
            if k in self.semd:
                self.avoid("fire_sem_deferred")
            elif c < 0.2:
                self.lines.append("fire %d %d" % (k, self.val()))
            else:
                self.lines.append("fail %d %d" % (k, self.code()))
        elif c < 0.5:
            k = self.d()
            cb = self.spec(k)
            eb = self.spec(k)
            if cb == "-" and eb == "-":
                cb = "p"
            for s in (cb, eb):
                if s.startswith("w:"):
                    self.waits.append((k, int(s[2:])))
                    if k in self.lists:
                        self.list_waits.add(k)
            self.lines.append("add %d %s %s %d" % (k, cb, eb, self.newid()))
        elif c < 0.56:
            a = self.d()
            b = self.d()
            if a == b:
                return
            a, b = min(a, b), max(a, b)
            if b in self.semd:
                self.avoid("fire_sem_deferred")
                return
            self.edge(("d", a), ("d", b), "chain")
            if not self.edges_ok():
                self.edges[("d", a)].pop()
                self.avoid("wait_on_running")
                return
            self.lines.append("chain %d %d" % (a, b))
        elif c < 0.62:
            k = self.d()
            if self.semd.get(k) == "run":
                self.avoid("pause_sem_run")
                self.avoid("paused_run_stalls_function_deferred")
                return
            self.paused[k] = self.paused.get(k, 0) + 1
            self.lines.append("pause %d" % k)
        elif c < 0.68:
            k = self.d()
            if self.paused.get(k, 0) == 0:
                self.avoid("unpause_not_paused")
                return
            self.paused[k] -= 1
            self.lines.append("unpause %d" % k)
        elif c < 0.74:
            k = self.d()
            if self.cancel_reaches_list_wait(k):
                self.avoid("cancel_fired_list_forwards")
                return
            self.lines.append("cancel %d" % k)
        elif c < 0.8:
            self.lines.append("peek %d" % self.d())
        elif c < 0.88:
            self.op_list()
        else:
            self.op_sem()

    def op_list(self):
        r = self.r
        n = r.choice([0, 1, 2, 2, 3, 3, 4])
        members = [self.d() for _ in range(n)]
        if n >= 2 and r.random() < 0.3:
            members[r.randrange(n)] = members[r.randrange(n)]  # duplicate
        flags = r.randrange(8)
        if n == 0 and flags & 1:
            self.avoid("empty_list_fire_on_one_callback")
            flags &= ~1
        k = self.nd
        for m in set(members):
            self.edge(("d", m), ("d", k), "other")
        if not self.edges_ok():
            for m in set(members):
                self.edges[("d", m)].pop()
            self.avoid("wait_on_running")
            return
        self.nd += 1
        self.lists.add(k)
        self.members[k] = list(members)
        self.lines.append("list %d %d %d %s" % (
            k, flags, n, " ".join(str(m) for m in members)))

    def op_sem(self):
        r = self.r
        if not self.sems or r.random() < 0.15:
            self.lines.append("sem %d %d" % (len(self.sems), r.randint(1, 2)))
            self.sems.append(True)
            return
        s = r.randrange(len(self.sems))
        c = r.random()
        if c < 0.35:
            if s in self.sem_runs:
                self.avoid("sem_release_recursion")
                return
            self.sem_acqs.add(s)
            k = self.nd
            self.edge(("s", s), ("d", k), "other")
            self.semd[k] = "acq"
            self.nd += 1
            self.lines.append("acq %d %d" % (s, k))
        elif c < 0.65:
            self.lines.append("rel %d" % s)
        elif s in self.sem_runs or s in self.sem_acqs:
            self.avoid("sem_release_recursion")
        else:
            self.sem_runs.add(s)
            k = self.nd
            spec = self.spec(k, fn=True)
            if spec.startswith("w:"):
                self.edge(("d", int(spec[2:])), ("s", s), "other")
            self.edge(("s", s), ("d", k), "other")
            if not self.edges_ok():
                self.avoid("wait_on_running")
                spec = "r:%d" % self.val()
            self.semd[k] = "run"
            if spec.startswith("w:"):
                self.members[k] = [int(spec[2:])]
            self.nd += 1
            self.lines.append("run %d %d %s %d" % (s, k, spec, self.newid()))

    def run(self):
        while len(self.lines) < self.nops:
            self.op()
        return self.lines


def gen(seed, nops=30):
    """Returns (lines, avoided counts) for `seed`."""
    g = Gen(seed, nops)
    return g.run(), g.avoided


if __name__ == "__main__":
    import sys
    for line in gen(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2
                    else 30)[0]:
        print(line)
