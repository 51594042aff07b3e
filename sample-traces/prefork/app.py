"""The WSGI app of the prefork sample workload (gunicorn --preload; not part of ksmtrace).

At import (in the gunicorn master, because of --preload) it builds an in-memory catalog of 60,000
small records (Python dicts, lists and strings: ~40 MiB of objects), so every worker starts with
the catalog on fork-shared (copy-on-write) pages.  Serving touches those objects -- CPython's
reference counts and the cyclic GC write to them -- so the workers' copies diverge over time:
the well-known prefork "COW decay" of Python servers.  Each worker also keeps a private response
cache that grows up to 5,000 entries.

With KSMTRACE_PREFORK_MERGE=1 the master calls prctl(PR_SET_MEMORY_MERGE, 1) first, so the whole
process and every forked worker (the setting is inherited on fork) is mergeable by KSM.

Routes: /item/<n> (one record as JSON), /search?tag=<t>&limit=<k> (scan a slice of the catalog),
/stats (the worker's counters).
"""
import ctypes
import json
import os
import random
from urllib.parse import parse_qs

if os.environ.get("KSMTRACE_PREFORK_MERGE") == "1":
    _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(67, 1, 0, 0, 0) != 0:  # PR_SET_MEMORY_MERGE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MEMORY_MERGE)")

_rng = random.Random(6)
TAGS = [f"tag{i}" for i in range(200)]
CATALOG = {
    i: {
        "id": i,
        "name": f"item-{i:05d}",
        "price": round(_rng.uniform(1, 500), 2),
        "tags": _rng.sample(TAGS, 3),
        "description": " ".join(_rng.choice(("fast", "small", "blue", "steel", "soft", "new", "used", "large"))
                                for _ in range(12)),
    }
    for i in range(60_000)
}
_cache: dict = {}
_stats = {"requests": 0, "hits": 0}


def _json(start_response, obj, status="200 OK"):
    body = json.dumps(obj).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    _stats["requests"] += 1
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/item/"):
        try:
            n = int(path[6:])
        except ValueError:
            return _json(start_response, {"error": "bad id"}, "400 Bad Request")
        key = ("item", n)
        if key in _cache:
            _stats["hits"] += 1
            return _json(start_response, _cache[key])
        rec = CATALOG.get(n)
        if rec is None:
            return _json(start_response, {"error": "no such item"}, "404 Not Found")
        out = dict(rec, worker=os.getpid())
        if len(_cache) < 5000:
            _cache[key] = out
        return _json(start_response, out)
    if path == "/search":
        q = parse_qs(environ.get("QUERY_STRING", ""))
        tag = q.get("tag", ["tag0"])[0]
        limit = int(q.get("limit", ["20"])[0])
        start = _rng.randrange(0, 60_000 - 3000)
        hits = [r["id"] for r in (CATALOG[i] for i in range(start, start + 3000)) if tag in r["tags"]][:limit]
        return _json(start_response, {"tag": tag, "ids": hits})
    if path == "/stats":
        return _json(start_response, dict(_stats, pid=os.getpid(), cache=len(_cache)))
    return _json(start_response, {"error": "not found"}, "404 Not Found")
