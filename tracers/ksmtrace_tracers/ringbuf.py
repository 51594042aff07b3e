"""Decoding the binary pages ``per_cpu/cpuN/trace_pipe_raw`` returns (the kernel's ring-buffer
sub-buffers; ``kernel/trace/ring_buffer.c``, described by ``events/header_page`` and
``events/header_event``).

A page: ``u64 timestamp`` (of its first event), ``local_t commit`` (bytes of event data; bit 31:
events were lost before this page, bit 30: their number is stored after the data), then the events.
An event: a 32-bit header ``type_len:5 | time_delta:27``, then

* ``type_len`` 1..28: ``4 * type_len`` bytes of data;
* 0: a u32 ``array[0]``, then ``array[0] - 4`` bytes of data (the event is ``4 + array[0]`` bytes);
* 29: padding (``time_delta`` 0: the rest of the page is empty; else a u32 length to skip);
* 30: a time extension: ``delta = array[0] << 27 | time_delta`` is added to the clock;
* 31: an absolute time stamp (the low 59 bits, ``array[0] << 27 | time_delta``).

Every data event starts with the common fields (``u16 common_type``, the event id, and ``int
common_pid`` at offset 4).  :func:`decode_pages` walks the pages in numba (tens of millions of
events per second); :func:`gather` pulls one field of many events out with numpy.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)

HEADER_BYTES = 16
MISSED_EVENTS = 1 << 31
MISSED_STORED = 1 << 30
_SIZE_MASK = (1 << 30) - 1
_TS_LOW = (1 << 59) - 1


@njit(cache=True)
def _u32(b, o):
    return np.uint32(b[o]) | (np.uint32(b[o + 1]) << 8) | (np.uint32(b[o + 2]) << 16) | (np.uint32(b[o + 3]) << 24)


@njit(cache=True)
def _u64(b, o):
    return np.uint64(_u32(b, o)) | (np.uint64(_u32(b, o + 4)) << np.uint64(32))


@njit(cache=True)
def decode_pages(buf, page_size, lengths, out_ts, out_off, out_len, out_page, missed):
    """Walk ``len(lengths)`` pages laid out every ``page_size`` bytes in ``buf`` (``lengths[i]``:
    bytes the read returned, 0: empty slot).  For every data event: its time (``out_ts``), the
    offset of its data in ``buf`` (``out_off``), its data length and its page.  ``missed[i]``: events
    lost before page i (-1: some, number unknown).  Returns the number of events (at most
    ``len(out_ts)``; the caller sizes the outputs for the worst case)."""
    n = 0
    for p in range(lengths.shape[0]):
        base = p * page_size
        if lengths[p] < HEADER_BYTES:
            continue
        ts = np.int64(_u64(buf, base))
        commit = _u64(buf, base + 8)
        size = np.int64(commit & np.uint64(_SIZE_MASK))
        end = base + HEADER_BYTES + min(size, lengths[p] - HEADER_BYTES)
        if commit & np.uint64(MISSED_EVENTS):
            if commit & np.uint64(MISSED_STORED) and end + 8 <= base + lengths[p]:
                missed[p] = np.int64(_u64(buf, end))
            else:
                missed[p] = -1
        o = base + HEADER_BYTES
        while o + 4 <= end:
            h = _u32(buf, o)
            tl = np.int64(h & np.uint32(31))
            delta = np.int64(h >> np.uint32(5))
            if tl == 29:  # padding
                if delta == 0:
                    break
                o += 4 + np.int64(_u32(buf, o + 4))
                continue
            if tl == 30:  # time extend
                ts += (np.int64(_u32(buf, o + 4)) << 27) | delta
                o += 8
                continue
            if tl == 31:  # absolute time stamp (low 59 bits)
                ts = (ts & ~np.int64(_TS_LOW)) | (np.int64(_u32(buf, o + 4)) << 27) | delta
                o += 8
                continue
            ts += delta
            if tl == 0:  # array[0] counts itself: the event is 4 + array[0] bytes
                total = np.int64(_u32(buf, o + 4))
                length = total - 4
                data = o + 8
                o = o + 4 + total
            else:
                length = tl * 4
                data = o + 4
                o = data + length
            if n < out_ts.shape[0]:
                out_ts[n] = ts
                out_off[n] = data
                out_len[n] = length
                out_page[n] = p
                n += 1
    return n


def gather(buf: np.ndarray, offsets: np.ndarray, field_offset: int, size: int, signed: bool) -> np.ndarray:
    """One field (``size`` 1, 2, 4 or 8 bytes, little endian) of every event at ``offsets``."""
    idx = offsets[:, None] + field_offset + np.arange(size)
    raw = np.ascontiguousarray(buf[idx])
    dt = np.dtype(f"<{'i' if signed else 'u'}{size}")
    return raw.view(dt).reshape(-1)


def empty_outputs(capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (np.empty(capacity, np.int64), np.empty(capacity, np.int64), np.empty(capacity, np.int64),
            np.empty(capacity, np.int64))
