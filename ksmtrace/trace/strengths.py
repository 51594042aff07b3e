"""Add the sampled hash at every strength (format version 2) to a trace captured with ``--contents``.

A trace that stored its pages' contents (``capture --contents``) can be given the strength columns
after the fact: every distinct content is hashed once at 8, 16, ..., 1024 words of one word
permutation (:func:`ksmtrace.trace.sampled.strength_samples`) and every page row gets its content's
values; zero-filled rows get the zero page's.  The result is a new trace (the source is never
changed) whose other tables are copied as they are.

Which permutation: with the capture's hash key (``--hash-key FILE``, checked against the manifest's
key fingerprint) the capture's own, so the existing ``sample`` column is strength 64 of the same
permutation and is kept; without it, a fresh random permutation (the key is not stored in a trace),
and the ``sample`` column is recomputed so that all strengths belong to one permutation.  Rows whose
content was not stored (a failed read) get 0 in every strength column.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from ksmtrace.errors import TraceError
from ksmtrace.progress import ProgressFn
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import as_trace, open_trace
from ksmtrace.trace.sampled import KEY_BITS, PAGE, key_fingerprint, keyed_permutation, strength_samples, zero_sample
from ksmtrace.trace.writer import TraceWriter

CHUNK = 4096  # contents hashed per pass


def read_key_file(path: str | os.PathLike) -> int:
    """A hash-key file as ``capture --hash-key`` writes it (up to 32 hex digits; 16 in version 1)."""
    p = Path(path)
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise TraceError(f"--hash-key {p}: cannot read: {exc.strerror}") from None
    if text.lower().startswith("0x"):
        text = text[2:]
    if not (1 <= len(text) <= KEY_BITS // 4) or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise TraceError(f"--hash-key {p}: not a hash key (expected up to {KEY_BITS // 4} hex digits)")
    return int(text, 16)


def _content_strengths(tr, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted content hashes, their strengths [n, 8])."""
    c = tr.read_table("contents", columns=["hash", "data"]).unique("hash", keep="first").sort("hash")
    hashes = c["hash"].to_numpy().astype(np.uint64)
    out = np.zeros((len(hashes), len(S.SAMPLE_STRENGTHS)), np.uint32)
    data = c["data"].to_list()
    for a in range(0, len(data), CHUNK):
        part = data[a : a + CHUNK]
        if any(len(d) != PAGE for d in part):
            raise TraceError(f"{tr.path}/contents: a stored content is not {PAGE} bytes")
        pages = np.frombuffer(b"".join(part), dtype=np.uint8).reshape(len(part), PAGE)
        out[a : a + len(part)] = strength_samples(pages, perm)
    return hashes, out


def add_strengths(src, dst: str | os.PathLike, key: int | None = None, progress: ProgressFn | None = None):
    """Write ``dst``: the trace ``src`` with the strength columns (see the module docstring)."""
    tr = as_trace(src)
    if tr.has_sample_strengths:
        raise TraceError(f"{tr.path}: the trace already has the sampled hash at every strength")
    if not tr.has_table("contents") or not any(e["files"].get("contents", {}).get("rows", 0) for e in tr.snapshots):
        raise TraceError(f"{tr.path}: the trace holds no page contents (capture with --contents)")
    cap = dict(tr.capture)
    if key is not None:
        want = (cap.get("hash") or {}).get("key_fingerprint")
        if want and key_fingerprint(key, tr.version) != want:
            raise TraceError(f"{tr.path}: the hash key does not match the trace's key fingerprint {want}")
        perm = keyed_permutation(key, tr.version)  # the capture's permutation in the trace's format
        cap["strength_permutation"] = "the capture's (hash key)"
    else:
        perm = np.random.default_rng(int.from_bytes(os.urandom(8), "little")).permutation(1024)
        cap["strength_permutation"] = "random, not the capture's: sample recomputed"
    hashes, strengths = _content_strengths(tr, perm)
    zero_row = np.array([zero_sample(s) for s in S.SAMPLE_STRENGTHS], np.uint32)
    cols = tr.pages_columns
    pschema = S.pages_schema(sample=True, prefixes=all(f.name in cols for f in S.PREFIX_FIELDS), strengths=True)
    cap["fingerprints"] = True
    cap["sample_strengths"] = list(S.SAMPLE_STRENGTHS)
    w = TraceWriter(dst, host=tr.host, capture=cap, tracer=dict(tr.manifest.get("tracer", {})),
                    command_line=list(tr.manifest.get("command_line", [])), pages_schema=pschema)
    keep64 = key is not None and tr.has_sample_hash
    k64 = S.SAMPLE_STRENGTHS.index(S.SAMPLE_WORDS)
    n = tr.n_snapshots
    committed = []
    for s in range(n):
        rows = tr.read_table("pages", [s])
        h = rows["hash"].to_numpy().astype(np.uint64)
        flags = rows["flags"].to_numpy().astype(np.int64)
        op = rows["op"].to_numpy()
        vals = np.zeros((len(h), len(S.SAMPLE_STRENGTHS)), np.uint32)
        if len(hashes):
            pos = np.minimum(np.searchsorted(hashes, h), len(hashes) - 1)
            known = (hashes[pos] == h) & (op != S.OP_GONE)
            vals[known] = strengths[pos[known]]
        zero = ((flags & S.F_ZERO_FILLED) != 0) & (op != S.OP_GONE)
        vals[zero] = zero_row
        if keep64:
            got = rows["sample"].to_numpy()
            check = (vals[:, k64] != 0) & ~zero
            if (got[check] != vals[check, k64]).any():
                raise TraceError(f"{tr.path}: the hash key does not reproduce the trace's sample column")
            vals[:, k64] = got
        new = {S.strength_column(x): pl.Series(vals[:, i]) for i, x in enumerate(S.SAMPLE_STRENGTHS)}
        pages = rows.with_columns(**new).to_arrow().select(pschema.names).cast(pschema)
        tables: dict[str, pa.Table] = {"pages": pages}
        for t in S.TABLES:
            if t != "pages" and tr.snapshots[s].get("files", {}).get(t) is not None:
                tables[t] = tr.read_table(t, [s]).to_arrow()
        e = tr.snapshots[s]
        entry = w.commit_snapshot(s, int(e["t_ns"]), int(e.get("t_end_ns", e["t_ns"])), tables,
                                  keyframe=bool(e.get("keyframe")), stats={"pages": int(e.get("pages", 0))})
        committed.append({"snap": s, "t_ns": entry["t_ns"], "t_end_ns": entry["t_end_ns"], "keyframe": entry["keyframe"]})
        if progress:
            progress(s + 1, n, f"snapshot {s + 1}/{n}")
    extra = {k: tr.manifest[k] for k in ("coverage", "summary", "validate") if k in tr.manifest}
    w.close(tr.manifest.get("end_reason") or "complete", snapshots=committed, strengths_added_from=str(tr.path), **extra)
    return open_trace(dst)
