"""The pool server's bookkeeping under concurrent requests: it runs every request in a greenlet on one
thread, and a greenlet may yield wherever it waits on a CLI's output (here: draining a spare)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from relay.cli.pool.processes import PoolLimits, WarmPool

    class Spare:
        ready, identity, flavour, conv, alive = True, (), {}, None, True
        def __init__(self, n):
            self.n, self.drains = n, 0
            self.proc = self
        def drain(self):
            self.drains += 1
            gevent.sleep(0.01)  # a CLI's output is read here: other greenlets run meanwhile
            return True
        def kill(self):
            self.alive = False

    pool = WarmPool(PoolLimits(spares=2), "claude", {}, "/tmp", "sonnet", lambda: ())
    pool.spares = [Spare(1), Spare(2)]
    got = [None] * 4
    def take(i):
        got[i] = pool.take_spare({})
    gevent.joinall([gevent.spawn(take, i) for i in range(4)], raise_error=True)
    taken = [m.n for m, _ in got if m is not None]
    assert sorted(taken) == [1, 2], got   # each spare to exactly one request
    assert [why for m, why in got if m is None] == ["no spare ready"] * 2
    assert pool.spares == [] and {m.n for m in pool.busy} == {1, 2}
    print("ok")
""")


def test_concurrent_requests_never_take_the_same_spare() -> None:
    """Four requests at once for two spares: each spare goes to one request, the others are told there is
    none ready (before the fix: `list.remove(x): x not in list` for the request that drained second)."""
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
