"""The PKSM/UKSM sampled page hash ("RHASH"): the function, its value for the zero page, and the
hash of pages at every strength a trace records (``schema.SAMPLE_STRENGTHS``).

``random_sample_hash(page, s)`` of UKSM (``mm/uksm.c:1277-1316``; PKSM's ``calc_checksum`` is the
same at s = 64): a u32 state starts at 0xdeadbeef and absorbs the page's u32 words at the first
``min(s, 1024)`` offsets of a fixed random permutation of 0..1023 with ``h += w; h += h << 8;
h ^= h >> 12``; above 1024 words it loops back to the start of the permutation.  The hash at
strength s is therefore the running state after s words, so one pass over the permutation yields
every strength at once.  The capture draws the permutation from the trace's secret key
(``tracers/ksmtrace_tracers/hashing.py``); this module takes it as an argument.

The zero page's hash does not depend on the permutation (every word is 0): :func:`zero_sample`.
"""
from __future__ import annotations

import hashlib

import numpy as np
import xxhash

from ksmtrace.trace.schema import FORMAT_VERSION, SAMPLE_STRENGTHS

PAGE = 4096
WORDS = PAGE // 4
SAMPLE_INIT = 0xDEADBEEF
STRENGTH_MAX = 1034  # UKSM's HASH_STRENGTH_MAX (the "loop-back" strength)
_M = 0xFFFFFFFF
_PERM_LABEL = b"ksmtrace pksm permutation v1:"
FINGERPRINT_LABEL_V1 = b"ksmtrace hash-key fingerprint v1"
FINGERPRINT_LABEL = b"ksmtrace hash-key fingerprint v2"
KEY_BITS = 128  # a capture hash key (version 2; version 1 keys were 64-bit)


def key_bytes(key: int) -> bytes:
    """A capture hash key (an integer of up to ``KEY_BITS`` bits) as the bytes the keyed hashes use."""
    return int(key).to_bytes(KEY_BITS // 8, "little")


def subkey(key: int, purpose: bytes) -> bytes:
    """A 16-byte key for one use, derived from the capture key (keyed BLAKE2b, personalised)."""
    return hashlib.blake2b(purpose, key=key_bytes(key), digest_size=16, person=b"ksmtrace-subkey").digest()


def keyed_permutation(key: int, version: int = FORMAT_VERSION) -> np.ndarray:
    """The capture's word permutation for hash key ``key`` in a trace of format ``version``: a
    forward Fisher-Yates of 0..1023 (as PKSM's and UKSM's init_random_sampling) with
    ``prandom_u32()`` replaced by a keyed stream — BLAKE2b under a subkey (version 2, what the
    capture uses), the keyed xxh3 of a counter (version 1)."""
    if version >= 2:
        k = subkey(key, b"pksm permutation")
        stream = b"".join(hashlib.blake2b(i.to_bytes(4, "little"), key=k).digest() for i in range(64))
        rnd = [int(x) for x in np.frombuffer(stream, dtype="<u4")]
    else:
        rnd = [xxhash.xxh3_64_intdigest(_PERM_LABEL + i.to_bytes(4, "little"), seed=key) & _M for i in range(WORDS)]
    table = list(range(WORDS))
    for i in range(WORDS):
        j = i + rnd[i] % (WORDS - i)
        table[i], table[j] = table[j], table[i]
    return np.array(table, dtype=np.int64)


def key_fingerprint(key: int, version: int = FORMAT_VERSION) -> str:
    """The public name of a hash key, as the manifest stores it (``capture.hash.key_fingerprint``):
    keyed BLAKE2b of a fixed label (version 2), seeded xxh3 (version 1); reveals nothing useful
    about the key."""
    if version >= 2:
        return hashlib.blake2b(FINGERPRINT_LABEL, key=key_bytes(key), digest_size=8).hexdigest()
    return xxhash.xxh3_64_hexdigest(FINGERPRINT_LABEL_V1, seed=key)


def _step(h: int, w: int) -> int:
    h = (h + w) & _M
    h = (h + (h << 8)) & _M
    return h ^ (h >> 12)


def random_sample_hash(page: bytes, perm, strength: int) -> int:
    """The sampled hash of one page at ``strength`` words (1..1034), word by word: the executable
    spec of :func:`strength_samples`."""
    words = np.frombuffer(page, dtype="<u4")
    h = SAMPLE_INIT
    for i in range(strength):
        h = _step(h, int(words[int(perm[i % WORDS])]))
    return h


def zero_sample(strength: int) -> int:
    """The sampled hash of the all-zero page at ``strength`` (UKSM's ``zero_hash_table``)."""
    h = SAMPLE_INIT
    for _ in range(strength):
        h = _step(h, 0)
    return h


def strength_samples(pages: np.ndarray, perm: np.ndarray, strengths=SAMPLE_STRENGTHS) -> np.ndarray:
    """The sampled hash of ``pages`` (an (n, 4096) uint8 array) at every strength of ``strengths``
    (ascending, at most 1024), in one pass: a (n, len(strengths)) uint32 array."""
    n = len(pages)
    strengths = tuple(int(s) for s in strengths)
    if list(strengths) != sorted(strengths) or strengths[-1] > WORDS:
        raise ValueError(f"strengths must be ascending and at most {WORDS}: {strengths}")
    words = pages.reshape(n, PAGE).view("<u4")
    out = np.zeros((n, len(strengths)), dtype=np.uint32)
    h = np.full(n, SAMPLE_INIT, dtype=np.uint32)
    k = 0
    for i in range(strengths[-1]):
        h += words[:, int(perm[i])]
        h += h << np.uint32(8)
        h ^= h >> np.uint32(12)
        while k < len(strengths) and strengths[k] == i + 1:
            out[:, k] = h
            k += 1
    return out
