"""UKSM's arithmetic, written once for both runtimes: the CPU governor (per-rung ratios, quotas,
sampling steps, the per-page cost EMA, the sleep), the hash-strength walk (``rshash_adjust``) and
the seeded random numbers.  Plain functions of integers and small int64 arrays, compiled by numba;
the readable runtime calls them as they are, the kernel inlines them.

Every rule cites ``mm/uksm.c`` of dolohow/uksm ``v5.x/uksm-5.17.patch`` (release 0.1.2.6; line
numbers as in ``notes/uksm-spec.md``); unsigned kernel arithmetic is reproduced where it matters
(the raw negative ratio of quirk Q3).
"""
from __future__ import annotations

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.trace.schema import SAMPLE_STRENGTHS

TIME_RATIO_SCALE = 10000
PAGE_TIME_DEFAULT = 500  # UKSM_PAGE_TIME_DEFAULT, ns (uksm.c:545)
STRENGTH_FULL = 1024  # HASH_STRENGTH_FULL
STRENGTH_MAX = 1034  # HASH_STRENGTH_MAX
DELTA_MAX = 5  # HASH_STRENGTH_DELTA_MAX
RUNG_SAMPLED_MIN = 3
LADDER = np.array(SAMPLE_STRENGTHS, dtype=np.int64)  # the strengths a trace records
N_LEVELS = len(SAMPLE_STRENGTHS)

#: CPU governor presets (uksm_cpu_preset, uksm.c:537-542): per-rung cpu_ratio (1/10000; negative
#: -x = x/10000 of max_cpu_percentage), per-rung cover_msecs, max_cpu_percentage
GOVERNORS = {
    "full": ((20, 40, -2500, -10000), (1000, 500, 200, 50), 95),
    "medium": ((20, 30, -2500, -10000), (1000, 500, 400, 100), 50),
    "low": ((10, 20, -5000, -10000), (1500, 1000, 1000, 250), 20),
    "quiet": ((10, 20, 40, 75), (2000, 1000, 1000, 1000), 1),
}

# rung columns (RG[rung, col]) shared by both runtimes
R_RATIO, R_COVER, R_PAGES, R_QUOTA, R_STEP = range(5)
N_RCOLS = 5

# the hash-strength walk's state (RS[...]): rshash_state, the benefit accumulators, the strength
(RS_STATE, RS_PRE_DIRECT, RS_DELTA, RS_STABLE_BENEFIT, RS_TURN_POINT_DOWN, RS_TURN_POINT_UP,
 RS_TURN_BENEFIT_DOWN, RS_TURN_BENEFIT_UP, RS_STABLE_POINT, RS_WINDOW, RS_BELOW, RS_NEG_CONT_ZERO,
 RS_CONT_OBSCURE, RS_POS, RS_NEG, RS_SCANNED_LAST, RS_S, RS_LADDER, RS_BENEFIT, RS_NEG_RATIO) = range(20)
N_RS = 20
STILL_STATE, TRYUP, TRYDOWN, NEW, PRE_STILL = 0, 1, 2, 3, 4  # rshash_state.state
GO_UP, GO_DOWN, OBSCURE, STILL = 0, 1, 2, 3  # directions
STATE_NAMES = {STILL_STATE: "still", TRYUP: "tryup", TRYDOWN: "trydown", NEW: "new", PRE_STILL: "pre_still"}


# --- time and CPU ratios -------------------------------------------------------------------------
@njit(inline="always")
def _hz(hz):
    return hz if hz > 0 else 1000


@njit(inline="always")
def msecs_to_jiffies(m, hz):
    h = _hz(hz)
    return (m * h + 999) // 1000


@njit(inline="always")
def jiffies_to_msecs(j, hz):
    return j * 1000 // _hz(hz)


@njit(inline="always")
def jiffies_to_usecs(j, hz):
    return j * 1000000 // _hz(hz)


@njit(inline="always")
def usecs_to_jiffies(u, hz):
    h = _hz(hz)
    return (u * h + 999999) // 1000000


@njit(inline="always")
def real_ratio(cpu_ratio, max_cpu):
    """rung_real_ratio (uksm.c:4291-4304)."""
    if cpu_ratio > 0:
        return cpu_ratio
    r = (-cpu_ratio) * max_cpu // 100
    return r if r > 0 else 1


@njit(inline="always")
def ratio_to_nsec(ratio, sleep_jiffies, hz):
    """cpu_ratio_to_nsec: the CPU budget of one sleep period at duty cycle ratio/10000."""
    return 1000 * jiffies_to_usecs(sleep_jiffies, hz) // (TIME_RATIO_SCALE - ratio) * ratio


@njit(inline="always")
def calc_step(cover, pages, ratio, page_time):
    """uksm_calc_rung_step (uksm.c:3454-3482) in unsigned 64-bit arithmetic: ``ratio`` may be a
    raw negative cpu_ratio (quirk Q3), which wraps to a huge ``sampled`` and a step of 1."""
    if cover == 0:
        return 1
    prod = np.uint64(cover) * np.uint64(100) * np.uint64(ratio)
    sampled = prod // np.uint64(page_time)
    if sampled < np.uint64(RUNG_SAMPLED_MIN):
        sampled = np.uint64(RUNG_SAMPLED_MIN)
    if np.uint64(pages) > sampled:
        return np.int64(np.uint64(pages) // sampled)
    return 1


@njit(inline="always")
def step_need_recalc(step, pages):
    stepmax = pages // RUNG_SAMPLED_MIN
    return pages > 0 and (step > pages or (stepmax > 0 and step > stepmax))


@njit(inline="always")
def ema(cur, last):
    """The per-page cost EMA (uksm.c:4264-4278): alpha 20 %, doubled on a burst above 10x."""
    if cur > last * 10:
        return last * 2
    return (20 * cur + 80 * last) // 100


@njit(cache=True)
def calc_scan_pages(RG, page_time, sleep_jiffies, sleep_saved, eval_round, max_cpu, hz):
    """uksm_calc_scan_pages (uksm.c:4306-4344): every rung's quota and step for the next wake-up.
    Returns (page_time, sleep_jiffies) after the periodic resets and the rung-0 sleep rule."""
    if page_time > 100000 or eval_round % 256 == 0:
        page_time = PAGE_TIME_DEFAULT
    if eval_round % 8 == 0:
        sleep_jiffies = sleep_saved
    r0 = real_ratio(RG[0, R_RATIO], max_cpu)
    if ratio_to_nsec(r0, sleep_jiffies, hz) < page_time:
        sleep_usecs = page_time * (TIME_RATIO_SCALE - r0) // r0 // 1000
        sleep_jiffies = usecs_to_jiffies(sleep_usecs, hz) + 1
    for i in range(4):
        r = real_ratio(RG[i, R_RATIO], max_cpu)
        q = ratio_to_nsec(r, sleep_jiffies, hz) // page_time
        RG[i, R_QUOTA] = q if q > 0 else 1  # (the kernel BUG()s on 0: only reachable with custom ratios)
        RG[i, R_STEP] = calc_step(RG[i, R_COVER], RG[i, R_PAGES], r, page_time)
    return page_time, sleep_jiffies


@njit(inline="always")
def sleep_after_scan(sleep_jiffies, scan_ns, max_ratio, hz):
    """The sleep after a wake-up (uksm.c:4659-4674, scan_time_to_sleep): at least the duty cycle of
    the busiest rung scanned, at most 1 s."""
    real = sleep_jiffies
    if max_ratio > 0 and scan_ns > 0:
        expected = msecs_to_jiffies((scan_ns >> 20) * (TIME_RATIO_SCALE - max_ratio) // max_ratio, hz)
        if expected > real:
            real = expected
        if jiffies_to_msecs(real, hz) > 1000:
            real = msecs_to_jiffies(1000, hz)
    return real


# --- the strength ladder -----------------------------------------------------------------------
@njit(inline="always")
def snap_level(s, snap):
    """The recorded strength (index into LADDER) whose collisions model virtual strength ``s``:
    snap 0 = nearest in log2 (ties up), 1 = floor, 2 = ceil; clamped to [8, 1024]."""
    n = len(LADDER)
    if s <= LADDER[0]:
        return 0
    if s >= LADDER[n - 1]:
        return n - 1
    k = 0
    while LADDER[k + 1] <= s:
        k += 1
    if LADDER[k] == s or snap == 1:
        return k
    if snap == 2:
        return k + 1
    # nearest in log2: the upper point iff s >= lower * sqrt(2)
    lo = LADDER[k]
    return k + 1 if s * s >= 2 * lo * lo else k


@njit(inline="always")
def strength_words(RS):
    """The strength UKSM works at (hashing, accounting): s itself, or the ladder point."""
    if RS[RS_LADDER] == 1:
        return LADDER[RS[RS_S]]
    return RS[RS_S]


@njit(inline="always")
def _inc(RS, d):
    if RS[RS_LADDER] == 1:
        RS[RS_S] = min(RS[RS_S] + 1, N_LEVELS - 1)
    else:
        RS[RS_S] = min(RS[RS_S] + (1 << d), STRENGTH_MAX)


@njit(inline="always")
def _dec(RS, d):
    if RS[RS_LADDER] == 1:
        RS[RS_S] = max(RS[RS_S] - 1, 0)
    elif RS[RS_S] <= (1 << d) + 1:
        RS[RS_S] = 1
    else:
        RS[RS_S] -= 1 << d


@njit(inline="always")
def _at_bottom(RS):
    return RS[RS_S] == (0 if RS[RS_LADDER] == 1 else 1)


@njit(inline="always")
def _at_top(RS):
    return RS[RS_S] == (N_LEVELS - 1 if RS[RS_LADDER] == 1 else STRENGTH_MAX)


@njit(inline="always")
def _inc_delta(RS):
    RS[RS_DELTA] = min(RS[RS_DELTA] + 1, DELTA_MAX)


@njit(inline="always")
def _benefit(pos, neg, scanned):
    return 0 if neg > pos else (pos - neg) // scanned


@njit(inline="always")
def _neg_ratio(pos, neg):
    if neg == 0:
        return 0
    if pos == 0 or neg > pos:
        return 100
    return 100 * neg // pos


@njit(cache=True)
def judge_direction(RS, pos, neg, scanned, fully_scanned_round):
    """judge_rshash_direction (uksm.c:3955-4012), with its side effects on the two counters."""
    if (fully_scanned_round & 0xFF) == 10:
        RS[RS_CONT_OBSCURE] = 0
        return OBSCURE
    nr = _neg_ratio(pos, neg)
    if nr == 0:
        RS[RS_NEG_CONT_ZERO] += 1
        return GO_DOWN if RS[RS_NEG_CONT_ZERO] > 2 else STILL
    RS[RS_NEG_CONT_ZERO] = 0
    if nr > 90:
        RS[RS_CONT_OBSCURE] = 0
        return GO_UP
    sb = RS[RS_STABLE_BENEFIT]
    if sb == 0:
        RS[RS_CONT_OBSCURE] = 0
        return OBSCURE
    d = 100 * abs(_benefit(pos, neg, scanned) - sb) // sb
    if d > 50:
        RS[RS_CONT_OBSCURE] += 1
        return OBSCURE if RS[RS_CONT_OBSCURE] > 2 else STILL
    RS[RS_CONT_OBSCURE] = 0
    return STILL


@njit(cache=True)
def rshash_adjust(RS, pages_scanned, fully_scanned_round):
    """rshash_adjust (uksm.c:4020-4141): one step of the strength walk at the end of a hash round,
    judged on the round's benefit (words saved by sampling minus words lost to collisions, per
    hashed page).  Returns True if the strength changed (the caller re-keys and flushes)."""
    scanned = pages_scanned - RS[RS_SCANNED_LAST]
    if scanned == 0:  # encode_benefit: nothing hashed since the last call
        return False
    pos = RS[RS_POS]
    neg = RS[RS_NEG]
    RS[RS_POS] = 0
    RS[RS_NEG] = 0
    RS[RS_SCANNED_LAST] = pages_scanned
    B = _benefit(pos, neg, scanned)
    RS[RS_BENEFIT] = B
    RS[RS_NEG_RATIO] = _neg_ratio(pos, neg)
    prev = RS[RS_S]
    st = RS[RS_STATE]
    if st == NEW or st == PRE_STILL:
        RS[RS_STABLE_BENEFIT] = B
        RS[RS_STATE] = STILL_STATE
        RS[RS_DELTA] = 0
    elif st == STILL_STATE:
        d = judge_direction(RS, pos, neg, scanned, fully_scanned_round)
        if d == GO_UP:
            if RS[RS_PRE_DIRECT] == GO_DOWN:
                RS[RS_DELTA] = 0
            _inc(RS, RS[RS_DELTA])
            _inc_delta(RS)
            RS[RS_STABLE_BENEFIT] = B
            RS[RS_PRE_DIRECT] = GO_UP
        elif d == GO_DOWN:
            if RS[RS_PRE_DIRECT] == GO_UP:
                RS[RS_DELTA] = 0
            _dec(RS, RS[RS_DELTA])
            _inc_delta(RS)
            RS[RS_STABLE_BENEFIT] = B
            RS[RS_PRE_DIRECT] = GO_DOWN
        elif d == OBSCURE:
            RS[RS_STABLE_POINT] = RS[RS_S]
            RS[RS_TURN_POINT_DOWN] = RS[RS_S]
            RS[RS_TURN_POINT_UP] = RS[RS_S]
            RS[RS_TURN_BENEFIT_DOWN] = B
            RS[RS_TURN_BENEFIT_UP] = B
            RS[RS_WINDOW] = 0
            RS[RS_STATE] = TRYDOWN
            _dec(RS, RS[RS_DELTA])
            _inc_delta(RS)
    elif st == TRYDOWN:
        if RS[RS_WINDOW] % 5 == 0:
            RS[RS_BELOW] = 0
        RS[RS_WINDOW] += 1
        if B < RS[RS_STABLE_BENEFIT]:
            RS[RS_BELOW] += 1
        elif B > RS[RS_TURN_BENEFIT_DOWN]:
            RS[RS_TURN_POINT_DOWN] = RS[RS_S]
            RS[RS_TURN_BENEFIT_DOWN] = B
        if RS[RS_BELOW] >= 3 or judge_direction(RS, pos, neg, scanned, fully_scanned_round) == GO_UP or _at_bottom(RS):
            RS[RS_S] = RS[RS_STABLE_POINT]
            _inc(RS, 0)
            RS[RS_WINDOW] = 0
            RS[RS_STATE] = TRYUP
            RS[RS_DELTA] = 0
        else:
            _dec(RS, RS[RS_DELTA])
            _inc_delta(RS)
    elif st == TRYUP:
        if RS[RS_WINDOW] % 5 == 0:
            RS[RS_BELOW] = 0
        RS[RS_WINDOW] += 1
        if B < RS[RS_TURN_BENEFIT_DOWN]:
            RS[RS_BELOW] += 1
        elif B > RS[RS_TURN_BENEFIT_UP]:
            RS[RS_TURN_POINT_UP] = RS[RS_S]
            RS[RS_TURN_BENEFIT_UP] = B
        if RS[RS_BELOW] >= 3 or judge_direction(RS, pos, neg, scanned, fully_scanned_round) == GO_DOWN or _at_top(RS):
            if RS[RS_TURN_BENEFIT_UP] > RS[RS_TURN_BENEFIT_DOWN]:
                RS[RS_S] = RS[RS_TURN_POINT_UP]
            else:
                RS[RS_S] = RS[RS_TURN_POINT_DOWN]
            RS[RS_STATE] = PRE_STILL
        else:
            _inc(RS, RS[RS_DELTA])
            _inc_delta(RS)
    return RS[RS_S] != prev


def new_walk(strength: int, ladder: bool) -> np.ndarray:
    """The walk's initial state (uksm.c:625, 5414): strength ``strength``, state NEW."""
    RS = np.zeros(N_RS, np.int64)
    RS[RS_STATE] = NEW
    RS[RS_PRE_DIRECT] = GO_UP
    RS[RS_LADDER] = 1 if ladder else 0
    RS[RS_S] = SAMPLE_STRENGTHS.index(strength) if ladder else strength
    return RS


# --- random numbers -------------------------------------------------------------------------------
@njit(inline="always")
def rand32(rng, i):
    """The next 32-bit number of stream ``i`` (splitmix64; the kernel's prandom_u32 stands in)."""
    u = np.uint64(rng[i]) + np.uint64(0x9E3779B97F4A7C15)
    rng[i] = np.int64(u)
    z = (u ^ (u >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z >> np.uint64(32))


@njit(cache=True)
def rand32_call(rng, i):
    """:func:`rand32` for Python callers."""
    return rand32(rng, i)


RNG_PERM, RNG_RUNG, RNG_KEYS = 0, 1, 2


def new_rng(seed: int) -> np.ndarray:
    """One seeded stream per use: in-VMA permutations, rung start offsets, slot keys."""
    base = (int(seed) * 0x632BE59BD9B4E019 + 0x1234567) & ((1 << 63) - 1)
    return np.array([base, base ^ 0x5DEECE66D, base ^ 0x2545F4914F6CDD1D], dtype=np.int64)
