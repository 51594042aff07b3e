"""Helpers shared by the policy tests: replay on both engines and insist they agree, random traces."""
from __future__ import annotations

import random

from ksmtrace.replay import replay


def run(tr, policy="pksm", params=None, check_reference=True, **kw):
    """Replay with the fast engine; also with the reference engine, and insist they agree."""
    fast = replay(tr, policy, params or {}, **kw)
    if check_reference:
        ref = replay(tr, policy, params or {}, engine="reference", **kw)
        assert ref.table.equals(fast.table), _first_diff(ref.table, fast.table)
    return fast


def _first_diff(a, b):
    for c in a.columns:
        if not a[c].equals(b[c]):
            return f"column {c}: reference {a[c].to_list()} fast {b[c].to_list()}"
    return "tables differ"


def col(res, name):
    return res.table[name].to_list()


# --- random traces (forks, exits, zero pages, sampled-hash collisions) --------------------------------
def gen(seed, nproc=3, npages=50, nsnap=10, ncontent=8):
    rnd = random.Random(seed)
    pick = lambda extra: rnd.choice([0] + [f"c{i}" for i in range(ncontent)] + extra)  # noqa: E731
    state = {(p, v): pick([f"u{p}_{v}"]) for p in range(nproc) for v in range(npages) if rnd.random() < 0.8}
    snaps = []
    for s in range(nsnap):
        new = dict(state)
        for k in list(new):
            r = rnd.random()
            if r < 0.08:
                new[k] = pick([f"w{s}_{k}"])
            elif r < 0.11:
                del new[k]
        for _ in range(rnd.randint(0, 6)):
            new[(rnd.randrange(nproc), rnd.randrange(npages + 10))] = pick([])
        if s == 3:  # process nproc forks from process 0: same frames
            for (p, v), c in list(new.items()):
                if p == 0:
                    new[(p, v)] = {"c": c, "frame": ("F", v, c)}
                    new[(nproc, v)] = {"c": c, "frame": ("F", v, c)}
        if s == 4:  # half of the child's pages written
            for k in [k for k in new if k[0] == nproc]:
                if rnd.random() < 0.5:
                    new[k] = f"child{k}"
        if s == 6:  # process 1 exits
            for k in [k for k in new if k[0] == 1]:
                del new[k]
        snaps.append(new)
        state = {k: (v["c"] if isinstance(v, dict) else v) for k, v in new.items()}
    return snaps
