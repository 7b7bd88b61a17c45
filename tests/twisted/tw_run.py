# SPDX-License-Identifier: MIT
"""Runs an operation sequence (see gen.py) on Twisted and returns its trace.

The trace has one line per observable event, in the format df-replay.c
prints for libdeferred: a callback that ran and what it got, what each
call returned, what a peek saw, what a list fired with.
"""

from twisted.internet import defer
from twisted.internet.defer import (AlreadyCalledError, CancelledError,
                                    Deferred, DeferredList,
                                    DeferredSemaphore, FirstError)
from twisted.python.failure import Failure


class UserError(Exception):
    def __init__(self, code):
        Exception.__init__(self, code)
        self.code = code


def fmt_fail(f):
    e = f.value
    if isinstance(e, UserError):
        return "U%d" % e.code
    if isinstance(e, CancelledError):
        return "ECANCELLED"
    if isinstance(e, AlreadyCalledError):
        return "EALREADY_CALLED"
    if isinstance(e, FirstError):
        return "EFIRST_ERROR(%d:%s)" % (e.index, fmt_fail(e.subFailure))
    return "PY:%s" % type(e).__name__


def fmt_val(v):
    if v is None or isinstance(v, DeferredSemaphore):
        return "None"  # departures.NORMALISED["acquire_value"]
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, (list, tuple)):
        return fmt_list(v)
    return "PY:%r" % (v,)


def fmt_list(r):
    """A DeferredList result: (value, index) or [T:value, F:failure...]."""
    if isinstance(r, tuple):
        return "(%s,%d)" % (fmt_val(r[0]), r[1])
    return "[" + ",".join(("T:" + fmt_val(v)) if ok else ("F:" + fmt_fail(v))
                          for ok, v in r) + "]"


def fmt(r):
    if isinstance(r, Failure):
        return "err " + fmt_fail(r)
    return "ok " + fmt_val(r)


class Runner:
    def __init__(self):
        self.out = []
        self.d = {}
        self.sems = {}
        self.held = {}  # S -> tokens held by acquires seen to fire, unreleased

    def emit(self, s):
        self.out.append(s)

    def behave(self, spec, r):
        """What a callback or run function with `spec` returns."""
        if spec == "p":
            return r
        kind, n = spec.split(":")
        n = int(n)
        if kind == "r":
            return n
        if kind == "x":
            raise UserError(n)
        return self.d[n]

    def callback(self, spec, cid, side):
        def cb(r):
            self.emit("cb %d %s %s" % (cid, side, fmt(r)))
            return self.behave(spec, r)
        return cb

    def list_conv(self, k, flags):
        def conv(r):
            if not isinstance(r, (tuple, list)):
                return r  # fired by hand with a plain value
            self.emit("list %d fired %s" % (k, fmt_list(r)))
            return 1000 + k
        return conv

    def step(self, line):
        w = line.split()
        op = w[0]
        a = [int(x) if x.lstrip("-").isdigit() else x for x in w[1:]]
        if op == "new":
            self.d[a[0]] = Deferred()
        elif op in ("fire", "fail"):
            v = a[1] if op == "fire" else Failure(UserError(a[1]))
            try:
                if op == "fire":
                    self.d[a[0]].callback(v)
                else:
                    self.d[a[0]].errback(v)
                self.emit("%s %d -> 0" % (op, a[0]))
            except AlreadyCalledError:
                self.emit("%s %d -> EALREADY_CALLED" % (op, a[0]))
        elif op == "add":
            k, cb, eb, cid = a
            pas = lambda r: r
            self.d[k].addCallbacks(
                self.callback(cb, cid, "cb") if cb != "-" else pas,
                self.callback(eb, cid, "eb") if eb != "-" else pas)
        elif op == "chain":
            self.d[a[0]].chainDeferred(self.d[a[1]])
        elif op == "pause":
            self.d[a[0]].pause()
        elif op == "unpause":
            self.d[a[0]].unpause()
        elif op == "cancel":
            self.d[a[0]].cancel()
        elif op == "peek":
            d = self.d[a[0]]
            r = getattr(d, "result", defer._NO_RESULT) if d.called else None
            if not d.called or isinstance(r, Deferred):
                self.emit("peek %d none" % a[0])
            else:
                self.emit("peek %d %s" % (a[0], fmt(r)))
        elif op == "list":
            k, flags, n = a[0], a[1], a[2]
            members = [self.d[m] for m in a[3:3 + n]]
            dl = DeferredList(members, fireOnOneCallback=bool(flags & 1),
                              fireOnOneErrback=bool(flags & 2),
                              consumeErrors=bool(flags & 4))
            dl.addCallback(self.list_conv(k, flags))
            self.d[k] = dl
        elif op == "sem":
            self.sems[a[0]] = DeferredSemaphore(a[1])
            self.held[a[0]] = 0
        elif op == "acq":
            s, k = a
            d = self.sems[s].acquire()

            def seen(r, s=s):
                self.held[s] += 1
                return r
            d.addCallback(seen)
            self.d[k] = d
        elif op == "rel":
            s = a[0]
            if self.held[s] == 0:
                self.emit("rel %d skipped" % s)
            else:
                self.held[s] -= 1
                self.sems[s].release()
                self.emit("rel %d -> 0" % s)
        elif op == "run":
            s, k, spec, cid = a

            def fn(spec=spec, cid=cid):
                self.emit("fn %d ran" % cid)
                return self.behave(spec, None)
            self.d[k] = self.sems[s].run(fn)
        else:
            raise ValueError("unknown op %r" % line)

    def run(self, lines):
        for i, line in enumerate(lines):
            self.emit("@%d" % i)
            self.step(line)
        return self.out


def run(lines):
    return Runner().run(lines)


if __name__ == "__main__":
    import sys
    for line in run([l.strip() for l in sys.stdin if l.strip()]):
        print(line)
