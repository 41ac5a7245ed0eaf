"""Sixteen float32 lanes and AVX512-BF16 dot products as Numba values (see `simd` for why
accumulators are SSA vectors rather than array elements).

`f32x16` is `<16 x float>` in LLVM IR: one zmm register on AVX-512. `vdot_bf16_pair` is
`vdpbf16ps`: 32 bfloat16 pairs multiplied exactly and added into 16 float32 lanes (lane i
gains a[2i] * b[2i] + a[2i + 1] * b[2i + 1], one pair of a broadcast), the instruction that
lets a bfloat16 pool be read without widening it first. Only CPUs with the `avx512_bf16` flag
have it (`has_avx512_bf16`): code using it must be compiled only there, or LLVM cannot select
the instruction.
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from .simd import _element_pointer, _mask, _pair_sum

LANES = 16
_V16 = ir.VectorType(ir.FloatType(), LANES)
_I32 = ir.IntType(32)


class _BFloat(ir.Type):
    """LLVM's `bfloat`, which llvmlite's IR builder does not name."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash(_BFloat)


_BF16X32 = ir.VectorType(_BFloat(), 2 * LANES)


class F32x16(types.Type):
    def __init__(self) -> None:
        super().__init__(name="f32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16)


@functools.cache  # a CPU flag: read once a process
def has_avx512_bf16() -> bool:
    """Whether this CPU has `vdpbf16ps` (the `avx512_bf16` flag in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def _load(builder, context, sig, args, vector: ir.VectorType, align: int):
    ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
    return builder.load(builder.bitcast(ptr, vector.as_pointer()), align=align)


@intrinsic
def v16load(typingctx, arr, flat):
    """Elements flat..flat+15 of a C-contiguous float32 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return _load(builder, context, sig, args, _V16, 4)

    return f32x16(arr, types.intp), codegen


@intrinsic
def v16load_bf16(typingctx, arr, flat):
    """Elements flat..flat+15 of a uint16 array of bfloat16 bits, widened exactly (the bits
    are a float32's high half)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint16):
        return None

    def codegen(context, builder, sig, args):
        bits = _load(builder, context, sig, args, ir.VectorType(ir.IntType(16), LANES), 2)
        wide = builder.zext(bits, ir.VectorType(_I32, LANES))
        return builder.bitcast(builder.shl(wide, ir.Constant(wide.type, [_I32(16)] * LANES)), _V16)

    return f32x16(arr, types.intp), codegen


@intrinsic
def v16store(typingctx, arr, flat, v):
    """arr[flat:flat+16] = v for a float32 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, _V16.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(arr, types.intp, f32x16), codegen


@intrinsic
def v16store_bf16(typingctx, arr, flat, v):
    """arr[flat:flat+16] = v rounded to bfloat16 bits (a uint16 array): to nearest, ties to
    even, as torch's `.to(torch.bfloat16)` rounds a finite float32 (a NaN stays a NaN), so a
    kernel writing bfloat16 itself gives the bits a float32 result converted by torch would."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint16 and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        rounded = builder.lshr(_bf16_rounded_bits(builder, args[2]), _i32_splat(16))
        halves = builder.trunc(rounded, ir.VectorType(ir.IntType(16), LANES))
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(halves, builder.bitcast(ptr, halves.type.as_pointer()), align=2)
        return context.get_dummy_value()

    return types.void(arr, types.intp, f32x16), codegen


def _i32_splat(value: int) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, LANES), [_I32(value)] * LANES)


def _bf16_rounded_bits(builder, v):
    """v's float32 bits rounded to bfloat16 (to nearest, ties to even; a NaN a quiet NaN),
    still as <16 x i32> with the low half zero."""
    bits = builder.bitcast(v, ir.VectorType(_I32, LANES))
    odd = builder.and_(builder.lshr(bits, _i32_splat(16)), _i32_splat(1))
    rounded = builder.add(bits, builder.add(odd, _i32_splat(0x7FFF)))
    nan = builder.fcmp_unordered("uno", v, v)
    return builder.select(nan, _i32_splat(0x7FC00000), builder.and_(rounded, _i32_splat(-65536)))


@intrinsic
def v16round_bf16(typingctx, v):
    """v rounded to bfloat16 as `v16store_bf16` rounds it, kept as float32 (a bfloat16 op's
    result, used again before it is stored)."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(_bf16_rounded_bits(builder, args[0]), _V16)

    return f32x16(f32x16), codegen


@intrinsic
def v16splat(typingctx, x):
    """x in all sixteen lanes."""

    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[0], sig.args[0], types.float32)
        one = builder.insert_element(ir.Constant(_V16, ir.Undefined), x, _I32(0))
        return builder.shuffle_vector(one, ir.Constant(_V16, ir.Undefined), _mask([0] * LANES))

    return f32x16(x), codegen


@intrinsic
def v16zero(typingctx):
    """Sixteen zeros."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_V16, [ir.Constant(ir.FloatType(), 0.0)] * LANES)

    return f32x16(), codegen


@intrinsic
def v16fma(typingctx, a, b, c):
    """a * b + c with one rounding per lane (llvm.fma)."""
    if not (a == b == c == f32x16):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_V16, [_V16, _V16, _V16])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")
        return builder.call(fn, list(args))

    return f32x16(f32x16, f32x16, f32x16), codegen


@intrinsic
def v16mul(typingctx, a, b):
    """a * b lane by lane."""
    if not (a == b == f32x16):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return f32x16(f32x16, f32x16), codegen


def _bf16_arrays(*arrays) -> bool:
    """Whether every operand is a uint16 array (bfloat16 bits), as the intrinsics below take."""
    return all(isinstance(x, types.Array) and x.dtype == types.uint16 for x in arrays)


def _takes_bf16_dot(acc, a, b) -> bool:
    """Whether the `vdpbf16ps` intrinsics take these operand types: an f32x16 accumulator and
    two uint16 arrays of bfloat16 bits."""
    return acc == f32x16 and _bf16_arrays(a, b)


def _bits32(context, builder, sig, args, arr_index: int, flat_index: int):
    """<32 x i16> loaded from the uint16 array args[arr_index] at element args[flat_index]."""
    ptr = _element_pointer(context, builder, sig.args[arr_index], args[arr_index], args[flat_index])
    return builder.load(
        builder.bitcast(ptr, ir.VectorType(ir.IntType(16), 2 * LANES).as_pointer()), align=2
    )


def _dpbf16ps(builder, acc, a_bits, b_bits):
    """`vdpbf16ps`: acc + the pairwise products of two <32 x i16> vectors of bfloat16 bits."""
    fnty = ir.FunctionType(_V16, [_V16, _BF16X32, _BF16X32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512bf16.dpbf16ps.512")
    return builder.call(
        fn, [acc, builder.bitcast(a_bits, _BF16X32), builder.bitcast(b_bits, _BF16X32)]
    )


@intrinsic
def vdot_bf16_pair(typingctx, acc, a, fa, b, fb):
    """acc + a[fa:fa+2] (one bfloat16 pair, in every lane) times the pairs of b[fb:fb+32]: lane
    i gains a[fa] * b[fb+2i] + a[fa+1] * b[fb+2i+1] (`vdpbf16ps` with the pair broadcast; fa
    even, so the pair is one aligned 32-bit word)."""
    if not _takes_bf16_dot(acc, a, b):
        return None

    def codegen(context, builder, sig, args):
        i32x16 = ir.VectorType(_I32, LANES)
        ptr = _element_pointer(context, builder, sig.args[1], args[1], args[2])
        pair = builder.load(builder.bitcast(ptr, _I32.as_pointer()), align=4)
        lanes = builder.insert_element(ir.Constant(i32x16, None), pair, _I32(0))
        splat = builder.shuffle_vector(lanes, lanes, ir.Constant(i32x16, [_I32(0)] * LANES))
        return _dpbf16ps(builder, args[0], splat, _bits32(context, builder, sig, args, 3, 4))

    return f32x16(f32x16, a, types.intp, b, types.intp), codegen


@intrinsic
def v32interleave(typingctx, dst, fd, a, fa, b, fb):
    """dst[fd+2k] = a[fa+k] and dst[fd+2k+1] = b[fb+k] for k < 32 (uint16 arrays): two rows of
    bfloat16 bits as the pairs `vdot_bf16_pair` multiplies."""
    if not _bf16_arrays(dst, a, b):
        return None

    def codegen(context, builder, sig, args):
        bits = ir.VectorType(ir.IntType(16), 2 * LANES)
        rows = [
            _bits32(context, builder, sig, args, 2, 3),
            _bits32(context, builder, sig, args, 4, 5),
        ]
        for half in (0, 1):
            first = half * LANES  # a's lane first + i, then b's
            mask = [k for i in range(LANES) for k in (first + i, 2 * LANES + first + i)]
            pairs = builder.shuffle_vector(rows[0], rows[1], _mask(mask))
            flat = builder.add(args[1], ir.Constant(args[1].type, half * 2 * LANES))
            ptr = _element_pointer(context, builder, sig.args[0], args[0], flat)
            builder.store(pairs, builder.bitcast(ptr, bits.as_pointer()), align=2)
        return context.get_dummy_value()

    return types.void(dst, types.intp, a, types.intp, b, types.intp), codegen


@intrinsic
def v16transpose_words(typingctx, dst, fd, ds, src, fs, ss):
    """A 16 x 16 transpose of 32-bit words (bfloat16 pairs) between uint16 arrays: word k of
    source row j (src[fs + j * ss:], 16 words) becomes word j of destination row k (dst[fd +
    k * ds:]). Four butterfly stages of shuffles: K rows turned into the rows of dim pairs
    that `vdot_bf16_pair` multiplies, 16 keys a vector."""
    if not _bf16_arrays(dst, src):
        return None

    def codegen(context, builder, sig, args):
        words = ir.VectorType(_I32, LANES)
        d_ary, d_flat, d_step, s_ary, s_flat, s_step = args
        rows = []
        for j in range(LANES):
            flat = builder.add(s_flat, builder.mul(s_step, ir.Constant(s_step.type, j)))
            ptr = _element_pointer(context, builder, sig.args[3], s_ary, flat)
            rows.append(builder.load(builder.bitcast(ptr, words.as_pointer()), align=4))
        for w in (1, 2, 4, 8):  # swap the off-diagonal w x w blocks of each 2w x 2w block
            for i in range(LANES):
                if i & w:
                    continue
                a, b = rows[i], rows[i | w]
                low = [lane if not lane & w else LANES + (lane ^ w) for lane in range(LANES)]
                high = [(lane ^ w) if not lane & w else LANES + lane for lane in range(LANES)]
                rows[i] = builder.shuffle_vector(a, b, _mask(low))
                rows[i | w] = builder.shuffle_vector(a, b, _mask(high))
        for k in range(LANES):
            flat = builder.add(d_flat, builder.mul(d_step, ir.Constant(d_step.type, k)))
            ptr = _element_pointer(context, builder, sig.args[0], d_ary, flat)
            builder.store(rows[k], builder.bitcast(ptr, words.as_pointer()), align=4)
        return context.get_dummy_value()

    sig = types.void(dst, types.intp, types.intp, src, types.intp, types.intp)
    return sig, codegen


def _lane_pairs(width: int, vector_major: bool) -> tuple[list[int], list[int]]:
    """Shuffle masks over two vectors (a: lanes 0-15, b: 16-31) that pair each lane of a block
    of 2 * width with the lane `width` above it: the blocks of a then of b (`vector_major`), or
    each block of a followed by the same block of b."""
    starts = [(base, j) for j in range(0, LANES, 2 * width) for base in (0, LANES)]
    if vector_major:
        starts.sort()
    low, high = [], []
    for base, j in starts:
        low += range(base + j, base + j + width)
        high += range(base + j + width, base + j + 2 * width)
    return low, high


def _lane_sums(builder, vectors, widths, vector_major: bool):
    """Sixteen vectors' lane sums as one vector (lane k: vector k's), a transpose-and-add tree
    whose levels pair lanes `widths` apart, the order every lane is added in."""
    parts = list(vectors)
    for width in widths:
        low, high = _lane_pairs(width, vector_major)
        parts = [
            _pair_sum(builder, parts[2 * k], parts[2 * k + 1], low, high)
            for k in range(len(parts) // 2)
        ]
    return parts[0]


@intrinsic
def vsum16x16_halves(
    typingctx, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15
):
    """Sixteen vectors' lane sums as one, in `v16hsum`'s order: lane k = the sum of t_k's
    lanes by halves (lane i + lane i + 8, then i + 4, i + 2, i + 1), the tree of
    `_mm512_reduce_add_ps`."""
    vectors = (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15)
    if not all(v == f32x16 for v in vectors):
        return None

    def codegen(context, builder, sig, args):
        # pairs (a, b): the low halves of a's blocks of 2 * width, then b's; likewise high
        return _lane_sums(builder, args, (8, 4, 2, 1), vector_major=True)

    return f32x16(*vectors), codegen


@intrinsic
def v16load_i8(typingctx, arr, flat):
    """Elements flat..flat+15 of an int8 array as float32, exactly."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int8):
        return None

    def codegen(context, builder, sig, args):
        bytes_ = _load(builder, context, sig, args, ir.VectorType(ir.IntType(8), LANES), 1)
        return builder.sitofp(bytes_, _V16)

    return f32x16(arr, types.intp), codegen


@intrinsic
def v16sub(typingctx, a, b):
    """a - b lane by lane."""
    if not (a == b == f32x16):
        return None

    def codegen(context, builder, sig, args):
        return builder.fsub(args[0], args[1])

    return f32x16(f32x16, f32x16), codegen


@intrinsic
def v16first(typingctx, v, n, fill):
    """v in lanes 0..n-1, `fill` in the others (a key tile's last, partial group of keys)."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        n = context.cast(builder, args[1], sig.args[1], types.int32)
        lanes = ir.Constant(ir.VectorType(_I32, LANES), [_I32(i) for i in range(LANES)])
        nv = builder.shuffle_vector(
            builder.insert_element(
                ir.Constant(ir.VectorType(_I32, LANES), ir.Undefined), n, _I32(0)
            ),
            ir.Constant(ir.VectorType(_I32, LANES), ir.Undefined),
            _mask([0] * LANES),
        )
        fill = context.cast(builder, args[2], sig.args[2], types.float32)
        fills = builder.shuffle_vector(
            builder.insert_element(ir.Constant(_V16, ir.Undefined), fill, _I32(0)),
            ir.Constant(_V16, ir.Undefined),
            _mask([0] * LANES),
        )
        return builder.select(builder.icmp_signed("<", lanes, nv), args[0], fills)

    return f32x16(f32x16, n, fill), codegen


def _halving(builder, v, combine):
    """v's lanes combined by halves (8 + 8, 4 + 4, ...) down to lane 0: a fixed tree."""
    width = LANES
    while width > 1:
        width //= 2
        upper = builder.shuffle_vector(
            v,
            ir.Constant(_V16, ir.Undefined),
            _mask(list(range(width, 2 * width)) + [0] * (LANES - width)),
        )
        v = combine(builder, v, upper)
    return builder.extract_element(v, _I32(0))


def _maxnum(builder, a, b):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16, [_V16, _V16]), "llvm.maxnum.v16f32"
    )
    return builder.call(fn, [a, b])


@intrinsic
def v16hmax(typingctx, v):
    """The largest lane of v."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return _halving(builder, args[0], _maxnum)

    return types.float32(f32x16), codegen


@intrinsic
def v16hsum(typingctx, v):
    """The sum of v's lanes, added by halves (the same order every time)."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return _halving(builder, args[0], lambda b, x, y: b.fadd(x, y))

    return types.float32(f32x16), codegen


@intrinsic
def v16max(typingctx, a, b):
    """The larger of a and b lane by lane (llvm.maxnum)."""
    if not (a == b == f32x16):
        return None

    def codegen(context, builder, sig, args):
        return _maxnum(builder, args[0], args[1])

    return f32x16(f32x16, f32x16), codegen


@intrinsic
def v16add(typingctx, a, b):
    """a + b lane by lane."""
    if not (a == b == f32x16):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x16(f32x16, f32x16), codegen
