"""Eight float32 lanes as a Numba value: register-blocked CPU micro-kernels in plain Numba.

Why: LLVM keeps a loop's accumulators in registers only when it can prove the arrays a loop
stores to do not overlap the ones it reads; Numba's arrays carry no such proof, so an
accumulating loop written over array elements (`acc[r, e] += p * v[j, e]`) stores every
accumulator on every iteration and spills the rest (measured: ~100 instructions for 24 FMAs
per key in the attention kernel's P.V loop). A `f32x8` is an SSA value, `<8 x float>` in LLVM
IR, which lowers to one ymm register on AVX2 and AVX-512 and to two q registers on NEON:
accumulators written as `f32x8` locals stay in registers by construction, and every sum runs
in the order written (explicit FMAs and reduction trees), not one the vectoriser picks.

Loads and stores take a flat element index into a C-contiguous array (the caller computes
it); pools of bfloat16 or float16 are read as their 16-bit patterns (uint16 and int16) and
int8 weights as bytes, all widened in registers.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_V8 = ir.VectorType(ir.FloatType(), 8)
_I32 = ir.IntType(32)


class F32x8(types.Type):
    def __init__(self) -> None:
        super().__init__(name="f32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8)


def _element_pointer(context, builder, aryty, ary, flat):
    """Pointer to element `flat` of a C-contiguous array."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [flat])


def _mask(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), [_I32(v) for v in values])


def _vector_load(dtype, lane_type: ir.Type, widen):
    """An intrinsic loading elements flat..flat+7 of a C-contiguous `dtype` array as one
    <8 x lane_type> and widening it to f32x8 with `widen(builder, vector)`."""
    vector = ir.VectorType(lane_type, 8)
    align = dtype.bitwidth // 8  # an element's own alignment, not the vector's

    def load(typingctx, arr, flat):
        if not (isinstance(arr, types.Array) and arr.dtype == dtype):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
            lanes = builder.load(builder.bitcast(ptr, vector.as_pointer()), align=align)
            return widen(builder, lanes)

        return f32x8(arr, types.intp), codegen

    return intrinsic(load)


def _bfloat16_bits(builder, bits):
    """<8 x i16> of bfloat16 bits as <8 x float>, exactly: they are a float32's high half."""
    wide = builder.zext(bits, ir.VectorType(_I32, 8))
    return builder.bitcast(builder.shl(wide, ir.Constant(wide.type, [_I32(16)] * 8)), _V8)


def _float16_bits(builder, bits):
    """<8 x i16> of float16 bits as <8 x float>, exactly."""
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 8)), _V8)


# each: elements flat..flat+7 of an array; a bfloat16 pool comes as its bits in uint16, a
# float16 one in int16, so the element type alone picks the widening (no run-time branch)
vload = _vector_load(types.float32, ir.FloatType(), lambda builder, v: v)
vload_bf16 = _vector_load(types.uint16, ir.IntType(16), _bfloat16_bits)
vload_f16 = _vector_load(types.int16, ir.IntType(16), _float16_bits)
vload_i8 = _vector_load(types.int8, ir.IntType(8), lambda b, v: b.sitofp(v, _V8))  # exact


def _prefetch_intrinsic(locality: int, doc: str):
    """An intrinsic prefetch(arr, flat) of the line holding element `flat` of a C-contiguous
    array, for reading, at llvm.prefetch's `locality` (3: every level, 2: L2 and beyond)."""

    def typer(typingctx, arr, flat):
        if not isinstance(arr, types.Array):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
            emit_prefetch(builder, ptr, locality)
            return context.get_dummy_value()

        return types.void(arr, types.intp), codegen

    typer.__doc__ = doc
    return intrinsic(typer)


# for data the hardware prefetcher cannot see coming
prefetch = _prefetch_intrinsic(3, "Fetch the line into every cache level (prefetcht0).")
prefetch_l2 = _prefetch_intrinsic(
    2,
    "Fetch the line into L2, not L1 (prefetcht1): for data needed a while later, which would "
    "evict what is being used from a small L1.",
)


def emit_prefetch(builder, ptr, locality: int = 3) -> None:
    """llvm.prefetch of the line at `ptr`: for reading, data, kept at `locality`."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(locality), i32(1)])


@intrinsic
def vlane(typingctx, v, lane):
    """Lane `lane` (0-7) of v, as a float32."""
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        lane = context.cast(builder, args[1], sig.args[1], types.int32)
        return builder.extract_element(args[0], lane)

    return types.float32(f32x8, lane), codegen


@intrinsic
def vstore(typingctx, arr, flat, v):
    """arr[flat:flat+8] = v for a float32 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and v == f32x8):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, _V8.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(arr, types.intp, f32x8), codegen


@intrinsic
def i32_as_f32(typingctx, bits):
    """Reinterpret int32 bits as float32 (a free register move, vectorisable)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def f32_as_i32(typingctx, x):
    """Reinterpret float32 bits as int32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _I32)

    return types.int32(types.float32), codegen


@intrinsic
def vbroadcast(typingctx, arr, flat):
    """arr[flat] of a C-contiguous float32 array in all eight lanes (one `vbroadcastss` from
    memory: no register for the scalar, no negative-index wraparound code)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        one = builder.insert_element(ir.Constant(_V8, ir.Undefined), builder.load(ptr), _I32(0))
        return builder.shuffle_vector(one, ir.Constant(_V8, ir.Undefined), _mask([0] * 8))

    return f32x8(arr, types.intp), codegen


@intrinsic
def vsplat(typingctx, x):
    """x in all eight lanes."""

    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[0], sig.args[0], types.float32)
        one = builder.insert_element(ir.Constant(_V8, ir.Undefined), x, _I32(0))
        return builder.shuffle_vector(one, ir.Constant(_V8, ir.Undefined), _mask([0] * 8))

    return f32x8(x), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c with one rounding per lane (llvm.fma)."""
    if not (a == b == c == f32x8):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8, [_V8, _V8, _V8]), "llvm.fma.v8f32"
        )
        return builder.call(fn, list(args))

    return f32x8(f32x8, f32x8, f32x8), codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b lane by lane."""
    if not (a == b == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return f32x8(f32x8, f32x8), codegen


@intrinsic
def vadd(typingctx, a, b):
    """a + b lane by lane."""
    if not (a == b == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x8(f32x8, f32x8), codegen


@intrinsic
def vzero(typingctx):
    """Eight zeros."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_V8, [ir.Constant(ir.FloatType(), 0.0)] * 8)

    return f32x8(), codegen


def _pair_sum(builder, x, y, low: list[int], high: list[int]):
    return builder.fadd(
        builder.shuffle_vector(x, y, _mask(low)), builder.shuffle_vector(x, y, _mask(high))
    )


@intrinsic
def vsum8x8(typingctx, t0, t1, t2, t3, t4, t5, t6, t7):
    """The lane sums of eight vectors as one: lane k = sum of t_k's lanes, added as
    ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) whatever k (a transpose-and-add tree)."""
    if not all(t == f32x8 for t in (t0, t1, t2, t3, t4, t5, t6, t7)):
        return None

    def codegen(context, builder, sig, args):
        # level 1: lanes (t2k[0]+t2k[1], t2k+1[0]+t2k+1[1], t2k[2]+t2k[3], ...)
        even, odd = [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15]
        a = [_pair_sum(builder, args[2 * k], args[2 * k + 1], even, odd) for k in range(4)]
        # level 2: lanes 0-3 hold t0..t3 (a) or t4..t7 (b) over their lanes 0-3, lanes 4-7
        # the same over lanes 4-7
        lo2, hi2 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
        b = [_pair_sum(builder, a[2 * k], a[2 * k + 1], lo2, hi2) for k in range(2)]
        # level 3: halves over lanes 0-3 plus halves over lanes 4-7
        return _pair_sum(
            builder, b[0], b[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
        )

    return f32x8(*([f32x8] * 8)), codegen
