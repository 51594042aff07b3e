"""The policy kernels' doubly linked lists (list.h for the numba kernels): rows of a 2-d int64
array threaded through two of its columns, with the list's head, tail and length kept in slots of
another array; and hlists, headed by a first slot alone.

The same moves were written out by hand in the kernels that keep such lists (uksm's new-slot list
and stable_node_list, ksm's stable node and dup-chain hlists); one copy serves them.  pksm keeps
its own copies (its new, rescan and check lists): through these helpers pksm-delay's daemon ran
7-8 % slower in bench/policies.py (alternating rounds: 0.143-0.158 s against 0.131-0.153 s), while
pksm's own did not move.

A list is named by where its fields live: ``R`` the rows, ``cprev``/``cnext`` their link columns,
``hd`` the array holding the head, ``head``/``tail``/``count`` the indices of its head, tail and length in
``hd``: plain slots for a 1-d ``hd`` (a kernel's scalars ``sc``), ``(row, column)`` pairs for a 2-d
one (ksm's stable node row). -1 ends a list. The helpers are inlined (``inline="always"``).
"""
from __future__ import annotations

from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit


@njit(inline="always")
def list_add_tail(R, cprev, cnext, hd, head, tail, count, i):
    """Append row ``i`` at the tail (list_add_tail)."""
    t = hd[tail]
    R[i, cprev] = t
    R[i, cnext] = -1
    if t >= 0:
        R[t, cnext] = i
    else:
        hd[head] = i
    hd[tail] = i
    hd[count] += 1


@njit(inline="always")
def list_del(R, cprev, cnext, hd, head, tail, count, i):
    """Unlink row ``i`` (list_del_init: its own links are reset to -1): an hlist_del that also
    moves the tail back when ``i`` was last."""
    p = R[i, cprev]
    if R[i, cnext] < 0:
        hd[tail] = p
    hlist_del(R, cprev, cnext, hd, head, i)
    hd[count] -= 1


# hlists (a head, no tail; the length, if any, is the caller's): ksm's stable node -> rmap items
# and stable node chain -> dups lists, uksm's stable_node_list.  ``first`` indexes the head in
# ``hd`` as above.
@njit(inline="always")
def hlist_add_head(R, cprev, cnext, hd, first, i):
    """Put row ``i`` at the head (hlist_add_head)."""
    f = hd[first]
    R[i, cnext] = f
    R[i, cprev] = -1
    if f >= 0:
        R[f, cprev] = i
    hd[first] = i


@njit(inline="always")
def hlist_del(R, cprev, cnext, hd, first, i):
    """Unlink row ``i`` (hlist_del_init: its own links are reset to -1)."""
    p = R[i, cprev]
    n = R[i, cnext]
    if p >= 0:
        R[p, cnext] = n
    else:
        hd[first] = n
    if n >= 0:
        R[n, cprev] = p
    R[i, cnext] = -1
    R[i, cprev] = -1
