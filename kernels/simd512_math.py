"""Transcendental functions over sixteen float32 lanes (`simd512.f32x16`): 2**x for the
online softmax and SiLU for the MLP, as LLVM vector IR with no library call, so every lane of
every row runs the same instructions (no libm, no SVML: their last bits may change with the
machine, and a scalar call would keep the loop from vectorising).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

from .simd512 import _I32, _V16, LANES, _i32_splat, f32x16

# exp2's polynomial on [-0.5, 0.5] (`cpu_tiles._exp2`, the same coefficients, relative error 3e-7)
_EXP2_POLY = (0.00134004, 0.00967604, 0.05550327, 0.24022107, 0.69314721, 1.00000008)


def _splat_f32(value: float) -> ir.Constant:
    return ir.Constant(_V16, [ir.Constant(ir.FloatType(), value)] * LANES)


def _call(builder, name: str, *operands):
    """A call of LLVM's vector intrinsic `name` over f32x16 operands."""
    fnty = ir.FunctionType(_V16, [_V16] * len(operands))
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), operands)


def _exp2_ir(builder, x):
    """2**x lane by lane for x clamped to [-126, 0]: exponent bits times a degree-5 polynomial
    of the fraction, as `cpu_tiles._exp2` computes it for one float."""
    x = _call(builder, "llvm.maxnum.v16f32", x, _splat_f32(-126.0))
    x = _call(builder, "llvm.minnum.v16f32", x, _splat_f32(0.0))
    n = _call(builder, "llvm.floor.v16f32", builder.fadd(x, _splat_f32(0.5)))
    f = builder.fsub(x, n)
    p = _splat_f32(_EXP2_POLY[0])
    for coefficient in _EXP2_POLY[1:]:
        p = _call(builder, "llvm.fma.v16f32", p, f, _splat_f32(coefficient))
    ints = ir.VectorType(_I32, LANES)
    exponent = builder.add(builder.fptosi(n, ints), _i32_splat(127))
    return builder.fmul(p, builder.bitcast(builder.shl(exponent, _i32_splat(23)), _V16))


@intrinsic
def v16exp2(typingctx, x):
    """2**x lane by lane for x <= 0 (clamped to [-126, 0]), `_exp2_ir`."""
    if x != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return _exp2_ir(builder, args[0])

    return f32x16(f32x16), codegen


@intrinsic
def v16silu(typingctx, x):
    """x * sigmoid(x) lane by lane: with t = e**-|x| (`_exp2_ir`, 0 below 2**-126),
    sigmoid is 1 / (1 + t) where x >= 0 and t / (1 + t) below; accurate to a few float32 ulps
    (torch's bfloat16 SiLU rounded the same on every input tried, `tests/test_cpu_fused.py`)."""
    if x != f32x16:
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        magnitude = _call(builder, "llvm.fabs.v16f32", x)
        power = builder.fmul(magnitude, _splat_f32(-1.4426950408889634))
        underflows = builder.fcmp_ordered("<", power, _splat_f32(-126.0))  # e**-|x| is 0 there
        t = builder.select(underflows, _splat_f32(0.0), _exp2_ir(builder, power))
        above = builder.fcmp_ordered(">=", x, _splat_f32(0.0))
        numerator = builder.select(above, _splat_f32(1.0), t)
        return builder.fmul(x, builder.fdiv(numerator, builder.fadd(_splat_f32(1.0), t)))

    return f32x16(f32x16), codegen
