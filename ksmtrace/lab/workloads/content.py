"""Page contents as pure functions, and the "cells" that describe them.

A page's content is described by one *cell*: a row of four int64 ``(kind, owner, ident, gen)``.

* ``kind >= 0``: template ``kind``; its bytes are :func:`template_page` ``(seed, kind)``.
* ``kind == ZERO``: 4096 zero bytes (written, so a real private page, not the shared zero page).
* ``kind == UNIQUE``: a page no other cell with a different ``(owner, ident, gen)`` shares; its
  bytes are :func:`unique_pages` ``(seed, [(owner, ident, gen)])``: a 40-byte header that spells
  out the tag, then pseudo-random words derived from it.
* ``kind == SPARSE``: a zero page into which "a few bytes" were written: zeros except a 40-byte
  header carrying the tag, so also unique.

``owner`` is the logical process that generated the content, ``ident`` is
``region << 32 | page`` (see :func:`ident`) and ``gen`` counts rewrites; all three are 0 for
template and zero cells.  Every byte of every page is a pure function of ``(seed, cell)``.

:func:`summarize` turns cells into the multiplicity description used by ``layout()``:
``contents`` is a list of ``(content_key, count)`` where the key is ``"zero"``, ``"t<k>"``,
``"u"`` (count = number of pages whose content occurs exactly once) or, for unique content
that occurs several times (only after a fork), ``"u:<owner>:<region>.<page>:<gen>"`` /
``"s:<owner>:<region>.<page>:<gen>"``.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Iterable

import numpy as np

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 8

ZERO = -1
UNIQUE = -2
SPARSE = -3

# Stream numbers of the seeded generators, so that no two uses share a random stream.
STREAM_SHUFFLE = 0
STREAM_TEMPLATE = 1
STREAM_REWRITE = 4
STREAM_DIVERGE = 5
STREAM_REZERO = 6

_MAGIC_UNIQUE = int.from_bytes(b"ksmtuniq", "little")
_MAGIC_SPARSE = int.from_bytes(b"ksmtsprs", "little")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_HEADER_WORDS = 5


def ident(region: int, page: int | np.ndarray) -> int | np.ndarray:
    """The ``ident`` field of a unique cell: region number and page index within the region."""
    return (np.int64(region) << np.int64(32)) | page


@functools.lru_cache(maxsize=4096)
def template_page(seed: int, k: int) -> np.ndarray:
    """Template ``k`` for ``seed``: 4096 bytes, read-only, a pure function of ``(seed, k)``."""
    page = np.random.default_rng([seed, STREAM_TEMPLATE, k]).integers(
        0, 256, PAGE_SIZE, dtype=np.uint8)
    page.flags.writeable = False
    return page


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _tagged(seed: int, tags: np.ndarray, magic: int, body: bool) -> np.ndarray:
    tags = np.asarray(tags, dtype=np.int64).reshape(-1, 3).astype(np.uint64)
    n = len(tags)
    words = np.zeros((n, WORDS), dtype=np.uint64)
    if n == 0:
        return words.view(np.uint8)
    seed_word = np.uint64(seed % (1 << 64))
    if body:
        base = _mix(np.full(n, seed_word, dtype=np.uint64) ^ _GOLDEN)
        for col in range(3):
            base = _mix(base + tags[:, col])
        idx = np.arange(_HEADER_WORDS, WORDS, dtype=np.uint64) * _GOLDEN
        words[:, _HEADER_WORDS:] = _mix(base[:, None] + idx[None, :])
    words[:, 0] = magic
    words[:, 1] = seed_word
    words[:, 2:5] = tags
    return words.astype("<u8", copy=False).view(np.uint8)


def unique_pages(seed: int, tags: np.ndarray) -> np.ndarray:
    """Pages for unique tags ``(owner, ident, gen)``: array ``(n, 4096)`` of uint8.

    Distinct tags give distinct pages (the tag is spelled out in the first 40 bytes); the rest
    of the page is pseudo-random, so these never equal a zero page or a template."""
    return _tagged(seed, tags, _MAGIC_UNIQUE, body=True)


def sparse_pages(seed: int, tags: np.ndarray) -> np.ndarray:
    """"Dirtied zero pages": zeros except a 40-byte header carrying the tag."""
    return _tagged(seed, tags, _MAGIC_SPARSE, body=False)


def render(seed: int, cells: np.ndarray) -> np.ndarray:
    """The bytes of ``cells`` (shape ``(n, 4)``): a fresh ``(n, 4096)`` uint8 array."""
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 4)
    out = np.zeros((len(cells), PAGE_SIZE), dtype=np.uint8)
    kinds = cells[:, 0]
    is_t = kinds >= 0
    if is_t.any():
        ks, inverse = np.unique(kinds[is_t], return_inverse=True)
        table = np.stack([template_page(seed, int(k)) for k in ks])
        out[is_t] = table[inverse]
    is_u = kinds == UNIQUE
    if is_u.any():
        out[is_u] = unique_pages(seed, cells[is_u, 1:])
    is_s = kinds == SPARSE
    if is_s.any():
        out[is_s] = sparse_pages(seed, cells[is_s, 1:])
    bad = (kinds < 0) & (kinds != ZERO) & (kinds != UNIQUE) & (kinds != SPARSE)
    if bad.any():
        raise ValueError(f"unknown cell kind {int(kinds[bad][0])}")
    return out


# --- building cells ---------------------------------------------------------------------------

def empty_cells(n: int) -> np.ndarray:
    return np.zeros((n, 4), dtype=np.int64)


def zero_cells(n: int) -> np.ndarray:
    cells = empty_cells(n)
    cells[:, 0] = ZERO
    return cells


def tagged_cells(kind: int, owner: int, region: int, pages: np.ndarray, gen: int) -> np.ndarray:
    """UNIQUE or SPARSE cells for ``pages`` of ``region``, generated by ``owner``, generation
    ``gen``."""
    pages = np.asarray(pages, dtype=np.int64)
    cells = empty_cells(len(pages))
    cells[:, 0] = kind
    cells[:, 1] = owner
    cells[:, 2] = ident(region, pages)
    cells[:, 3] = gen
    return cells


def split_counts(n: int, dup_fraction: float, zero_fraction: float) -> tuple[int, int, int]:
    """``(template pages, zero pages, unique pages)`` for ``n`` pages and the two fractions."""
    n_zero = min(n, int(round(zero_fraction * n)))
    n_dup = min(n - n_zero, int(round(dup_fraction * n)))
    return n_dup, n_zero, n - n_dup - n_zero


def mixed_cells(seed: int, owner: int, region: int, n: int, *, dup_fraction: float,
                zero_fraction: float, templates: int) -> np.ndarray:
    """A region of ``n`` pages: template copies (template ``i % templates`` for the i-th
    template page, so every template occurs about equally often), zero pages and unique pages,
    placed at positions shuffled by a seeded permutation (stream ``(seed, 0, owner, region)``)."""
    n_dup, n_zero, n_uni = split_counts(n, dup_fraction, zero_fraction)
    kinds = np.empty(n, dtype=np.int64)
    kinds[:n_dup] = np.arange(n_dup, dtype=np.int64) % max(templates, 1)
    kinds[n_dup:n_dup + n_zero] = ZERO
    kinds[n_dup + n_zero:] = UNIQUE
    perm = np.random.default_rng([seed, STREAM_SHUFFLE, owner, region]).permutation(n)
    kinds = kinds[perm]
    cells = empty_cells(n)
    cells[:, 0] = kinds
    uni = np.flatnonzero(kinds == UNIQUE)
    cells[uni, 1] = owner
    cells[uni, 2] = ident(region, uni)
    return cells


# --- multiplicities ---------------------------------------------------------------------------

def _tag_key(row: np.ndarray) -> str:
    prefix = "u" if row[0] == UNIQUE else "s"
    region, page = divmod(int(row[2]), 1 << 32)
    return f"{prefix}:{int(row[1])}:{region}.{page}:{int(row[3])}"


def contents_of(cells_list: Iterable[np.ndarray]) -> list[tuple[str, int]]:
    """Multiplicity description of the union of ``cells_list``: see the module docstring."""
    arrays = [np.asarray(c, dtype=np.int64).reshape(-1, 4) for c in cells_list]
    cells = np.concatenate(arrays) if arrays else empty_cells(0)
    kinds = cells[:, 0]
    out: list[tuple[str, int]] = []
    n_zero = int((kinds == ZERO).sum())
    if n_zero:
        out.append(("zero", n_zero))
    ks, counts = np.unique(kinds[kinds >= 0], return_counts=True)
    out.extend((f"t{int(k)}", int(c)) for k, c in zip(ks, counts))
    tagged = cells[(kinds == UNIQUE) | (kinds == SPARSE)]
    if len(tagged):
        rows, counts = np.unique(tagged, axis=0, return_counts=True)
        singles = int((counts == 1).sum())
        if singles:
            out.append(("u", singles))
        out.extend((_tag_key(r), int(c)) for r, c in zip(rows, counts) if c > 1)
    return out


def merge_contents(*contents: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Add several multiplicity descriptions whose ``"u"`` pages are disjoint."""
    total: Counter[str] = Counter()
    for part in contents:
        for key, count in part:
            total[key] += int(count)

    def order(key: str) -> tuple:
        if key == "zero":
            return (0, 0, key)
        if key[0] == "t" and key[1:].isdigit():
            return (1, int(key[1:]), key)
        if key == "u":
            return (2, 0, key)
        parts = key.replace(".", ":").split(":")
        return (3, 0, (parts[0], *(int(x) for x in parts[1:])))

    return [(k, total[k]) for k in sorted(total, key=order) if total[k]]


def summarize(contents: list[tuple[str, int]]) -> dict:
    """``pages_total``, ``contents``, ``distinct`` (distinct page contents), ``duplicate_pages``
    (``pages_total - distinct``: what a perfect deduplicator saves) and ``zero_pages``."""
    total = sum(c for _, c in contents)
    distinct = sum(c if k == "u" else 1 for k, c in contents)
    return {
        "pages_total": total,
        "contents": [(k, c) for k, c in contents],
        "distinct": distinct,
        "duplicate_pages": total - distinct,
        "zero_pages": dict(contents).get("zero", 0),
    }
