"""Small numba intrinsics shared by the jitted code (cache hints and bit tricks, no semantics)."""
from __future__ import annotations

from llvmlite import ir
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

import numpy as np


@intrinsic
def _ctlz(typingctx, src):
    if not isinstance(src, types.Integer):
        raise errors.NumbaTypeError("_ctlz takes an integer")

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return src(src), codegen


@intrinsic
def prefetch_row(typingctx, arr, row):
    """Hint the CPU to fetch row ``row`` of a 2-d array into the cache (no effect on results; a
    prefetch never faults).  Used a few iterations ahead in loops whose rows are random."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and isinstance(row, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        r = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [r, context.get_constant(types.intp, 0)], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)  # (mangled .p0 or .p0i8)
        # read, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, row), codegen


@intrinsic
def prefetch_at(typingctx, arr, i):
    """Hint the CPU to fetch element ``i`` of a 1-d array into the cache (see prefetch_row)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        r = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [r], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


@njit(inline="always")
def bitlen(x):
    """int.bit_length() of a count (0 for x <= 0)."""
    if x <= 0:
        return 0
    return 64 - _ctlz(np.int64(x))


