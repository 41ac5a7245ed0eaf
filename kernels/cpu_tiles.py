"""The work item of the CPU paged attention kernel: one sequence's query tile against its
pages, for some of its KV heads (the driver, `cpu_attention._paged_attention`, spreads the
items over the cores).

Two forms of the same math (online softmax per key tile, `exp2` by exponent bits):
- `attend_tile_simd`, for head dims 64 and 128 and blocks of a multiple of 8 keys (the
  default model and the Llama family): one query row at a time, in `simd.f32x8` registers.
  Scores of eight keys at once (eight FMA chains over the head dim, then one transpose-and-add
  tree), P.V with the row's 64-wide accumulator panel held in eight registers over the whole key
  tile. Written as array updates, LLVM stored and spilled every accumulator on every key
  (~100 instructions for 24 FMAs); measured on a 2-core AVX2 host, float32, 32 sequences x
  3 KV heads: 1.25-1.3x faster over pools in DRAM, 1.6x with the pool in cache.
  Its items cover all KV heads of a tile when there are enough tiles to share the cores:
  each block is then read whole, not as three strided thirds (~1.2x more).
- `attend_tile`, for other shapes: three rows at a time through scalar code LLVM vectorises
  (each K and V element loaded and widened once for the three rows).
Both run a row's sums in one order wherever the row sits in the batch (a row's keys, its
block boundaries and its code path depend only on its own position and the block size), and
keys a row does not see are never added: the batch-invariant forward holds.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .simd import (
    emit_prefetch,
    i32_as_f32,
    vfma,
    vload,
    vload_bf16,
    vload_f16,
    vmul,
    vsplat,
    vstore,
    vsum8x8,
    vzero,
)

# rows sharing each K/V load in `attend_tile`: the default model's GQA group; fixed by
# `_rows_tile`'s three accumulators (d0, d1, d2 and p0, p1, p2), which change with it
ROWS_PER_PASS = 3
_NEG = np.float32(-1e30)  # finite "minus infinity": fastmath assumes no infs
_FAST = {"fastmath": True, "error_model": "numpy", "cache": True}


def simd_shape(head_dim: int, block_size: int) -> bool:
    """Whether `attend_tile_simd` takes this head dim and block size."""
    return head_dim in (64, 128) and block_size % 8 == 0


def tile_kind(head_dim: int, block_size: int) -> int:
    """The CPU kernel's tile for this shape: the head dim where `attend_tile_simd` takes it,
    0 for `attend_tile`."""
    return head_dim if simd_shape(head_dim, block_size) else 0


@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    """Widen IEEE half bits (int16) to float32 exactly (LLVM fpext: vcvtph2ps on x86)."""
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, i0, i1, i2, i3):
    """Hint the caches to fetch the line holding arr[i0, i1, i2, i3] (llvm.prefetch)."""
    sig = types.void(arr, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, list(args[1:]))
        emit_prefetch(builder, ptr)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", fastmath=True)
def _exp2(x):
    """2**x for x <= 0 in float32: exponent bits times a degree-5 polynomial (rel. err 3e-7)."""
    x = min(max(x, np.float32(-126.0)), np.float32(0.0))
    n = np.floor(x + np.float32(0.5))
    f = x - n
    p = np.float32(0.00134004)
    p = p * f + np.float32(0.00967604)
    p = p * f + np.float32(0.05550327)
    p = p * f + np.float32(0.24022107)
    p = p * f + np.float32(0.69314721)
    p = p * f + np.float32(1.00000008)
    return p * i32_as_f32(np.int32((np.int32(n) + 127) << 23))


def _widen(x):
    """One pool element as float32: a float32 as it is, bfloat16 bits (uint16) and float16
    bits (int16) widened; the element's type picks the form when the kernel compiles."""


@overload(_widen, inline="always")
def _widen_impl(x):
    if x == types.float32:
        return lambda x: x
    if x == types.uint16:  # bfloat16: the bits are the high half of a float32
        return lambda x: i32_as_f32(np.int32(np.int32(x) << 16))
    if x == types.int16:
        return lambda x: _f16_bits_to_f32(x)
    return None


@njit(inline="always", **_FAST)
def _prefetch_block(kc, vc, blk, h0, h1):
    """Ask for every cache line of heads h0..h1-1's rows of block blk, in K and V."""
    step = max(1, 64 // kc.itemsize)
    for j in range(kc.shape[1]):
        for h in range(h0, h1):
            for e in range(0, kc.shape[3], step):
                _prefetch(kc, blk, j, h, e)
                _prefetch(vc, blk, j, h, e)


@njit(inline="always", **_FAST)
def _rows_tile(qf, r, kc, vc, blk, h, start, n, limit, s, m, den, acc, d):
    """Rows r, r+1, r+2 over one key tile (block blk's first n keys, head h): every K and V
    element is read and widened once for the three rows. Each row scores the keys any of the
    three sees, then keeps only its own (the others weigh exactly 0), so a row's sums run in
    one order whatever its neighbours."""
    n_max = 0
    for g in range(ROWS_PER_PASS):
        n_max = max(n_max, min(n, limit[r + g] - start))
    for j in range(n_max):
        d0 = np.float32(0.0)
        d1 = np.float32(0.0)
        d2 = np.float32(0.0)
        for e in range(d):
            k = _widen(kc[blk, j, h, e])
            d0 += qf[r, e] * k
            d1 += qf[r + 1, e] * k
            d2 += qf[r + 2, e] * k
        s[0, j] = d0
        s[1, j] = d1
        s[2, j] = d2
    for g in range(ROWS_PER_PASS):
        nv = max(0, min(n, limit[r + g] - start))  # 0: the row sees none of the tile's keys
        if nv > 0:
            mx = m[r + g]
            for j in range(nv):
                mx = max(mx, s[g, j])
            total = np.float32(0.0)
            for j in range(nv):
                p = _exp2(s[g, j] - mx)
                s[g, j] = p
                total += p
            alpha = _exp2(m[r + g] - mx)
            m[r + g] = mx
            den[r + g] = den[r + g] * alpha + total
            for e in range(d):
                acc[r + g, e] *= alpha
        for j in range(nv, n_max):
            s[g, j] = 0
    for j in range(n_max):
        p0, p1, p2 = s[0, j], s[1, j], s[2, j]
        for e in range(d):
            v = _widen(vc[blk, j, h, e])
            acc[r, e] += p0 * v
            acc[r + 1, e] += p1 * v
            acc[r + 2, e] += p2 * v


@njit(inline="always", **_FAST)
def attend_tile(q, kc, vc, table, lo, hi, h, group, pos, ctx, c, out, d):
    """Attention of queries lo..hi-1 (all heads of KV group h) over one sequence's pages;
    d: the head dim, read at run time (64 and 128 go to `attend_tile_simd` as literals)."""
    block_size = kc.shape[1]
    rows = (hi - lo) * group
    padded = -(-rows // ROWS_PER_PASS) * ROWS_PER_PASS  # padding rows: zero q, see no key
    qf = np.zeros((padded, d), np.float32)
    acc = np.zeros((padded, d), np.float32)
    m = np.full(padded, _NEG, np.float32)
    den = np.zeros(padded, np.float32)
    limit = np.zeros(padded, np.int64)
    s = np.empty((ROWS_PER_PASS, block_size), np.float32)
    kmax = 0
    for i in range(hi - lo):
        lim = min(pos[lo + i] + 1, ctx)
        kmax = max(kmax, lim)
        for g in range(group):
            r = i * group + g
            limit[r] = lim
            for e in range(d):
                qf[r, e] = q[lo + i, h * group + g, e] * c
    for start in range(0, kmax, block_size):
        if start + block_size < kmax:
            _prefetch_block(kc, vc, table[start // block_size + 1], h, h + 1)
        n = min(block_size, kmax - start)
        blk = table[start // block_size]
        for r in range(0, padded, ROWS_PER_PASS):
            _rows_tile(qf, r, kc, vc, blk, h, start, n, limit, s, m, den, acc, d)
    for i in range(hi - lo):
        for g in range(group):
            r = i * group + g
            inv = np.float32(1.0) / den[r]
            for e in range(d):
                out[lo + i, h * group + g, e] = acc[r, e] * inv


def _vkv(arr, flat):
    """Eight pool elements from flat, as f32x8 (see `_widen` for the element types)."""


@overload(_vkv, inline="always")
def _vkv_impl(arr, flat):
    if arr.dtype == types.float32:
        return lambda arr, flat: vload(arr, flat)
    if arr.dtype == types.uint16:
        return lambda arr, flat: vload_bf16(arr, flat)
    if arr.dtype == types.int16:
        return lambda arr, flat: vload_f16(arr, flat)
    return None


@njit(inline="always", **_FAST)
def _scores8(qf, qb, kc, kb, ks, s, j0, d):
    """s[j0:j0+8] = the row qf[qb:qb+d] dotted with the eight keys at kb, kb+ks, ..."""
    t0 = vzero()
    t1 = vzero()
    t2 = vzero()
    t3 = vzero()
    t4 = vzero()
    t5 = vzero()
    t6 = vzero()
    t7 = vzero()
    for e in range(0, d, 8):
        qv = vload(qf, qb + e)
        t0 = vfma(qv, _vkv(kc, kb + e), t0)
        t1 = vfma(qv, _vkv(kc, kb + ks + e), t1)
        t2 = vfma(qv, _vkv(kc, kb + 2 * ks + e), t2)
        t3 = vfma(qv, _vkv(kc, kb + 3 * ks + e), t3)
        t4 = vfma(qv, _vkv(kc, kb + 4 * ks + e), t4)
        t5 = vfma(qv, _vkv(kc, kb + 5 * ks + e), t5)
        t6 = vfma(qv, _vkv(kc, kb + 6 * ks + e), t6)
        t7 = vfma(qv, _vkv(kc, kb + 7 * ks + e), t7)
    vstore(s, j0, vsum8x8(t0, t1, t2, t3, t4, t5, t6, t7))


@njit(inline="always", **_FAST)
def _pv64(acc, ab, alpha, s, vc, vb, ks, nv):
    """acc[ab:ab+64] = acc * alpha + sum over j < nv of s[j] * the 64 values at vb + j * ks,
    the panel in eight registers throughout."""
    av = vsplat(alpha)
    a0 = vmul(vload(acc, ab), av)
    a1 = vmul(vload(acc, ab + 8), av)
    a2 = vmul(vload(acc, ab + 16), av)
    a3 = vmul(vload(acc, ab + 24), av)
    a4 = vmul(vload(acc, ab + 32), av)
    a5 = vmul(vload(acc, ab + 40), av)
    a6 = vmul(vload(acc, ab + 48), av)
    a7 = vmul(vload(acc, ab + 56), av)
    for j in range(nv):
        p = vsplat(s[j])
        a0 = vfma(p, _vkv(vc, vb), a0)
        a1 = vfma(p, _vkv(vc, vb + 8), a1)
        a2 = vfma(p, _vkv(vc, vb + 16), a2)
        a3 = vfma(p, _vkv(vc, vb + 24), a3)
        a4 = vfma(p, _vkv(vc, vb + 32), a4)
        a5 = vfma(p, _vkv(vc, vb + 40), a5)
        a6 = vfma(p, _vkv(vc, vb + 48), a6)
        a7 = vfma(p, _vkv(vc, vb + 56), a7)
        vb += ks
    vstore(acc, ab, a0)
    vstore(acc, ab + 8, a1)
    vstore(acc, ab + 16, a2)
    vstore(acc, ab + 24, a3)
    vstore(acc, ab + 32, a4)
    vstore(acc, ab + 40, a5)
    vstore(acc, ab + 48, a6)
    vstore(acc, ab + 56, a7)


@njit(inline="always", **_FAST)
def _softmax_update(s, nv, r, m, den):
    """Online softmax over scores s[:nv] of row r: s becomes the weights; returns the factor
    that rescales the row's accumulator."""
    mx = m[r]
    for j in range(nv):
        mx = max(mx, s[j])
    total = np.float32(0.0)
    for j in range(nv):
        p = _exp2(s[j] - mx)
        s[j] = p
        total += p
    alpha = _exp2(m[r] - mx)
    m[r] = mx
    den[r] = den[r] * alpha + total
    return alpha


@njit(inline="always", **_FAST)
def attend_tile_simd(q, kc, vc, table, lo, hi, h0, h1, pos, ctx, c, out, d):
    """Attention of queries lo..hi-1, query heads of KV heads h0..h1-1, over one sequence's
    pages (see the module docstring); d: the head dim, a multiple of 64."""
    block_size, hkv = kc.shape[1], kc.shape[2]
    group = q.shape[1] // hkv
    ks = hkv * d  # elements from one key to the next within a block
    heads = (h1 - h0) * group  # query heads per query
    rows = (hi - lo) * heads
    qf = np.empty((rows, d), np.float32)
    acc = np.zeros((rows, d), np.float32)
    m = np.full(rows, _NEG, np.float32)
    den = np.zeros(rows, np.float32)
    limit = np.zeros(rows, np.int64)
    s = np.empty(block_size, np.float32)
    kmax = 0
    for i in range(hi - lo):
        lim = min(pos[lo + i] + 1, ctx)
        kmax = max(kmax, lim)
        for k in range(heads):
            limit[i * heads + k] = lim
            for e in range(d):
                qf[i * heads + k, e] = q[lo + i, h0 * group + k, e] * c
    for start in range(0, kmax, block_size):
        if start + block_size < kmax:
            _prefetch_block(kc, vc, table[start // block_size + 1], h0, h1)
        n = min(block_size, kmax - start)
        for h in range(h0, h1):
            base = (table[start // block_size] * block_size * hkv + h) * d
            for i in range(hi - lo):
                for g in range(group):
                    r = i * heads + (h - h0) * group + g
                    nv = min(n, limit[r] - start)
                    if nv <= 0:
                        continue
                    # groups of eight keys: block_size % 8 == 0 keeps every load in the block
                    for j0 in range(0, nv, 8):
                        _scores8(qf, r * d, kc, base + j0 * ks, ks, s, j0, d)
                    alpha = _softmax_update(s, nv, r, m, den)
                    for e0 in range(0, d, 64):
                        _pv64(acc, r * d + e0, alpha, s, vc, base + e0, ks, nv)
    for i in range(hi - lo):
        for k in range(heads):
            inv = np.float32(1.0) / den[i * heads + k]
            for e in range(d):
                out[lo + i, h0 * group + k, e] = acc[i * heads + k, e] * inv
