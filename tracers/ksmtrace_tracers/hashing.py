"""Keyed page hashes, zero-page detection, hash-key files and the optional fingerprints.

* Page hash: a keyed pseudo-random function of the content, **SipHash-2-4 over the 128-bit
  xxh3 digest of the 4 KiB page** (``prf = siphash24(k_page, xxh3_128(page))``, 64 bits).  xxh3
  seeded with the key — what traces of format version 1 used — is not a PRF: many (content, hash)
  pairs of one trace say something about the key.  SipHash is one; xxh3_128 is a fast
  collision-resistant-enough digest in front of it (a 2^-64 chance per pair of distinct pages
  to collide, as before).  Measured here (``bench/capture.py``): xxh3_128 ~145 ns/page and the
  SipHash of its digest ~13 ns/page (numba, over a whole batch), against ~220 ns/page for the
  seeded xxh3_64 before; keyed BLAKE2b of the digest, called per page from Python, was ~650 ns.
* The key: 128 random bits per capture (``os.urandom``) unless ``--hash-key FILE`` shares one; it
  is never stored in the trace — the manifest keeps only :func:`key_fingerprint` (keyed BLAKE2b
  of a fixed label), so two traces can be checked for a common key.  Sub-keys for the page hash,
  the prefix hashes and the PKSM permutation are derived from it with keyed BLAKE2b, so no two
  uses share a key.  A key file readable by group or others is used with a warning.
* Zero-filled pages: ``hash == keyed hash of 4096 zero bytes`` (no extra pass over the data).
* ``--fingerprints``: the PKSM/UKSM sampled hash (``docs/kernel-notes.md`` §5a: state
  0xdeadbeef; for the first 64 entries of a permutation of the 1024 u32 word offsets:
  ``h += w; h += h << 8; h ^= h >> 12`` mod 2^32) and, in the same pass, its state after 8, 16,
  32, 128, 256, 512 and 1024 words (the strength columns ``sample8`` … ``sample1024`` of format
  version 2: :func:`strength_hashes`, a numba loop per page; its spec is
  :func:`ksmtrace.trace.sampled.strength_samples`), with the permutation drawn by a forward
  Fisher–Yates shuffle from a keyed BLAKE2b stream (so it is secret too); and prefix hashes
  ``pfxN`` = low 32 bits of the keyed PRF of the first N bytes (N = 64, 256, 1024).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import stat
from pathlib import Path

import numpy as np
import xxhash
from numba import njit, uint64

from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from ksmtrace.errors import CaptureError
from ksmtrace.trace.sampled import KEY_BITS, keyed_permutation, subkey, zero_sample
from ksmtrace.trace.sampled import key_fingerprint as _key_fingerprint
from ksmtrace.trace.schema import PREFIX_LENGTHS, SAMPLE_STRENGTHS

PAGE = 4096
HASH_ALGORITHM = "siphash24(xxh3_128)"
SAMPLE_WORDS = 64
SAMPLE_INIT = 0xDEADBEEF
PKSM_ZERO_SAMPLE = 0x7AEC7314  # the sampled hash of a zero page: independent of the permutation
_STOPS = np.array(SAMPLE_STRENGTHS, np.int64)
I64 = SAMPLE_STRENGTHS.index(SAMPLE_WORDS)  # the column of strength 64 (the ``sample`` column)

_digest = xxhash.xxh3_128_digest


# --- the PRF --------------------------------------------------------------------------------------
@njit(inline="always")
def _rotl(x, b):
    return (x << uint64(b)) | (x >> uint64(64 - b))


@njit(inline="always")
def _sipround(v0, v1, v2, v3):
    v0 += v1
    v1 = _rotl(v1, 13)
    v1 ^= v0
    v0 = _rotl(v0, 32)
    v2 += v3
    v3 = _rotl(v3, 16)
    v3 ^= v2
    v0 += v3
    v3 = _rotl(v3, 21)
    v3 ^= v0
    v2 += v1
    v1 = _rotl(v1, 17)
    v1 ^= v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


@njit(cache=True, nogil=True)
def siphash24_16(words, k0, k1, out):
    """SipHash-2-4 (Aumasson & Bernstein) of 16-byte messages: ``words`` is (n, 2) uint64, the
    little-endian halves of each message; ``out[i]`` gets the 64-bit tag of message i."""
    for i in range(words.shape[0]):
        v0 = k0 ^ uint64(0x736F6D6570736575)
        v1 = k1 ^ uint64(0x646F72616E646F6D)
        v2 = k0 ^ uint64(0x6C7967656E657261)
        v3 = k1 ^ uint64(0x7465646279746573)
        for j in range(3):
            m = words[i, j] if j < 2 else uint64(16) << uint64(56)  # the last block: the length
            v3 ^= m
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
            v0 ^= m
        v2 ^= uint64(0xFF)
        for _ in range(4):
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        out[i] = v0 ^ v1 ^ v2 ^ v3


def siphash24_reference(key: bytes, data: bytes) -> int:
    """SipHash-2-4 of any message, in plain Python: the executable spec of :func:`siphash24_16`."""
    mask = (1 << 64) - 1
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rot(x, b):
        return ((x << b) | (x >> (64 - b))) & mask

    def rnd():
        v[0] = (v[0] + v[1]) & mask; v[1] = rot(v[1], 13) ^ v[0]; v[0] = rot(v[0], 32)  # noqa: E702
        v[2] = (v[2] + v[3]) & mask; v[3] = rot(v[3], 16) ^ v[2]  # noqa: E702
        v[0] = (v[0] + v[3]) & mask; v[3] = rot(v[3], 21) ^ v[0]  # noqa: E702
        v[2] = (v[2] + v[1]) & mask; v[1] = rot(v[1], 17) ^ v[2]; v[2] = rot(v[2], 32)  # noqa: E702

    n = len(data) // 8
    blocks = [int.from_bytes(data[8 * i : 8 * i + 8], "little") for i in range(n)]
    blocks.append(((len(data) & 0xFF) << 56) | int.from_bytes(data[8 * n :], "little"))
    for m in blocks:
        v[3] ^= m
        rnd()
        rnd()
        v[0] ^= m
    v[2] ^= 0xFF
    for _ in range(4):
        rnd()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


# --- keys ------------------------------------------------------------------------------------
def new_key() -> int:
    return int.from_bytes(os.urandom(KEY_BITS // 8), "little")


def key_fingerprint(key: int) -> str:
    """A public name of the key (:func:`ksmtrace.trace.sampled.key_fingerprint`, version 2)."""
    return _key_fingerprint(key, 2)


def load_or_create_key(path: str | os.PathLike, warn=None) -> tuple[int, bool]:
    """Read a shared hash key (up to 32 hex digits); create the file with a new random 128-bit key,
    mode 0600, if it does not exist.  Returns (key, created).  ``warn`` is told when the file is
    readable by group or others (the key makes every trace hashed with it dictionary-attackable)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = None
    except OSError as exc:
        raise CaptureError(f"--hash-key {p}: cannot create: {exc.strerror}") from None
    if fd is not None:
        key = new_key()
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, f"{key:032x}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return key, True
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise CaptureError(f"--hash-key {p}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        text = ""
    if text.lower().startswith("0x"):
        text = text[2:]
    if not (1 <= len(text) <= KEY_BITS // 4) or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise CaptureError(f"--hash-key {p}: not a hash key (expected up to {KEY_BITS // 4} hex digits)")
    if warn is not None and not key_file_is_private(p):
        mode = stat.S_IMODE(os.stat(p).st_mode)
        warn(f"--hash-key {p} is readable by group or others (mode {mode:04o}): anyone who can read it can "
             f"test guesses of page contents against traces hashed with it; chmod 600 it")
    return int(text, 16), False


def key_file_is_private(path: str | os.PathLike) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (mode & (stat.S_IRWXG | stat.S_IRWXO))


# --- fingerprints ------------------------------------------------------------------------------
def pksm_permutation(key: int) -> np.ndarray:
    """The 1024 word offsets shuffled by a forward Fisher–Yates (as PKSM's init_random_sampling),
    with ``prandom_u32()`` replaced by a keyed BLAKE2b stream: secret, deterministic
    (:func:`ksmtrace.trace.sampled.keyed_permutation`, which ``ksmtrace strengths`` uses too)."""
    return keyed_permutation(key, 2)


def pksm_sample_reference(page: bytes, offsets) -> int:
    """PKSM's ``pksm_calc_checksum`` page by page (the executable spec of :func:`sample_hashes`)."""
    words = np.frombuffer(page, dtype="<u4")
    h = SAMPLE_INIT
    for pos in list(offsets)[:SAMPLE_WORDS]:
        h = (h + int(words[pos])) & 0xFFFFFFFF
        h = (h + (h << 8)) & 0xFFFFFFFF
        h ^= h >> 12
    return h


@njit(cache=True, nogil=True)
def _strength_hashes(words, perm, stops, out):  # pragma: no cover (numba)
    """The sampled hash of every page (rows of u32 ``words``) after each of the ``stops`` words of
    ``perm``: one pass per page (the spec: :func:`ksmtrace.trace.sampled.strength_samples`)."""
    n = words.shape[0]
    last = stops[stops.shape[0] - 1]
    for r in range(n):
        h = np.uint32(SAMPLE_INIT)
        k = 0
        for i in range(last):
            h = np.uint32(h + words[r, perm[i]])
            h = np.uint32(h + np.uint32(h << np.uint32(8)))
            h = np.uint32(h ^ (h >> np.uint32(12)))
            if i + 1 == stops[k]:
                out[r, k] = h
                k += 1


def strength_hashes(pages: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The sampled hash of ``pages`` (an (n, 4096) uint8 array) at every strength of
    ``SAMPLE_STRENGTHS`` of the permutation ``perm``, in one pass: (n, 8) uint32.  Column 64 is
    :func:`sample_hashes`."""
    n = len(pages)
    out = np.zeros((n, len(SAMPLE_STRENGTHS)), np.uint32)
    if n:
        _strength_hashes(pages.reshape(n, PAGE).view("<u4"), perm.astype(np.int64), _STOPS, out)
    return out


def sample_hashes(pages: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Vectorised PKSM sampled hash of ``pages`` (a (n, 4096) uint8 array)."""
    n = len(pages)
    words = pages.reshape(n, PAGE).view("<u4")[:, offsets[:SAMPLE_WORDS]]
    h = np.full(n, SAMPLE_INIT, dtype=np.uint32)
    for k in range(SAMPLE_WORDS):
        h += words[:, k]
        h += h << np.uint32(8)
        h ^= h >> np.uint32(12)
    return h


class PageHasher:
    """Keyed hashes (and optional fingerprints) of pages in a reused read buffer."""

    def __init__(self, key: int, fingerprints: bool = False) -> None:
        self.key = key
        self.fingerprint = key_fingerprint(key)
        k = subkey(key, b"page hash")
        self._k0, self._k1 = np.uint64(int.from_bytes(k[:8], "little")), np.uint64(int.from_bytes(k[8:], "little"))
        kp = subkey(key, b"prefix hash")
        self._p0, self._p1 = np.uint64(int.from_bytes(kp[:8], "little")), np.uint64(int.from_bytes(kp[8:], "little"))
        zero = bytes(PAGE)
        self.zero_hash = self.hash_bytes(zero)  # also compiles the PRF before any worker forks
        self.fingerprints = fingerprints
        self.perm = pksm_permutation(key) if fingerprints else None
        self.offsets = self.perm[:SAMPLE_WORDS] if fingerprints else None
        self.zero_sample = PKSM_ZERO_SAMPLE
        self.zero_strengths = np.array([zero_sample(x) for x in SAMPLE_STRENGTHS], np.uint32)
        if fingerprints:  # compile before any worker forks
            strength_hashes(np.zeros((1, PAGE), np.uint8), self.perm)
        self.zero_prefix = {n: self._prf([zero[:n]], self._p0, self._p1)[0] & 0xFFFFFFFF for n in PREFIX_LENGTHS}

    @staticmethod
    def _prf(chunks, k0, k1) -> np.ndarray:
        digests = np.frombuffer(b"".join(map(_digest, chunks)), dtype="<u8").reshape(-1, 2)
        out = np.empty(len(digests), np.uint64)
        siphash24_16(digests, k0, k1, out)
        return out

    def slices(self, mv: memoryview, n: int) -> list[memoryview]:
        """Precomputed page slices of a buffer (computed once per buffer)."""
        return [mv[i * PAGE : (i + 1) * PAGE] for i in range(n)]

    def prefix_slices(self, mv: memoryview, n: int) -> dict[int, list[memoryview]]:
        return {ln: [mv[i * PAGE : i * PAGE + ln] for i in range(n)] for ln in PREFIX_LENGTHS}

    def hash(self, slices: list[memoryview], n: int) -> np.ndarray:
        """The keyed hash of the first ``n`` pages of the buffer."""
        it = slices if n == len(slices) else itertools.islice(slices, n)
        return self._prf(it, self._k0, self._k1)

    def prefixes(self, pslices: dict[int, list[memoryview]], n: int) -> dict[int, np.ndarray]:
        out = {}
        for ln, sl in pslices.items():
            it = sl if n == len(sl) else itertools.islice(sl, n)
            out[ln] = (self._prf(it, self._p0, self._p1) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        return out

    def samples(self, buf: np.ndarray, n: int) -> np.ndarray:
        assert self.offsets is not None
        return sample_hashes(buf[: n * PAGE].reshape(n, PAGE), self.offsets)

    def strengths(self, buf: np.ndarray, n: int) -> np.ndarray:
        """The sampled hash of the first ``n`` pages of the buffer at every strength, (n, 8)."""
        assert self.perm is not None
        return strength_hashes(buf[: n * PAGE].reshape(n, PAGE), self.perm)

    def hash_bytes(self, data: bytes) -> int:
        """The keyed hash of one page given as bytes."""
        return int(self._prf([data], self._k0, self._k1)[0])
