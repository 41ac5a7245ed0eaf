"""The CPU attention work item for bfloat16 pools on CPUs with AVX512-BF16: `vdpbf16ps` scores.

The same math as `cpu_tiles.attend_tile_simd` (online softmax, `exp2` by exponent bits), built
for what this instruction set offers:
- scores: q . k in 16-lane `vdpbf16ps`, which multiplies bfloat16 pairs exactly into float32
  lanes, so neither K nor the query is widened first; each key's 16 partial sums go into one
  16-way transpose-and-add tree per 16 keys. The query stays in bfloat16 (the model computes it
  in bfloat16) and the scale multiplies the score instead;
- P.V in float32 FMAs over 16 lanes, from one float32 copy of the block's V rows per KV head,
  which every query row of that head (the GQA group, every query of a prefill tile) reads from
  L1: each V element is widened once per head, not once per row;
- the online softmax per group of 16 keys in registers (one vector), not per key tile;
- everything else as in `cpu_tiles` (items over the cores, prefetch of the next block).
A row's sums run in one order wherever the row sits in the batch, as there (`deterministic`).
Compiled only where the CPU has `avx512_bf16` (`simd512.has_avx512_bf16`); elsewhere
`cpu_attention` keeps `cpu_tiles`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cpu_tiles import _NEG, _exp2, _prefetch_block
from .simd512 import (
    v16add,
    v16exp2,
    v16first,
    v16fma,
    v16hmax,
    v16hsum,
    v16load,
    v16load_bf16,
    v16max,
    v16mul,
    v16splat,
    v16store,
    v16sub,
    v16zero,
    vdot_bf16,
    vsum16x16,
)

_FAST = {"fastmath": True, "error_model": "numpy", "cache": True}
KEY_TILE = 64  # keys per online-softmax step: four vectors of scores


@njit(inline="always", **_FAST)
def _dot(q, qb, kc, kb, d):
    """One key's 16 partial sums of q[qb:qb+d] . kc[kb:kb+d] (bfloat16 bits, d % 32 == 0)."""
    t = v16zero()
    for e in range(0, d, 32):
        t = vdot_bf16(t, q, qb + e, kc, kb + e)
    return t


@njit(inline="always", **_FAST)
def _scores16(q, qb, kc, kb, ks, d):
    """The query at qb dotted with the sixteen keys at kb, kb + ks, ... (lane j: key j)."""
    return vsum16x16(
        _dot(q, qb, kc, kb, d),
        _dot(q, qb, kc, kb + ks, d),
        _dot(q, qb, kc, kb + 2 * ks, d),
        _dot(q, qb, kc, kb + 3 * ks, d),
        _dot(q, qb, kc, kb + 4 * ks, d),
        _dot(q, qb, kc, kb + 5 * ks, d),
        _dot(q, qb, kc, kb + 6 * ks, d),
        _dot(q, qb, kc, kb + 7 * ks, d),
        _dot(q, qb, kc, kb + 8 * ks, d),
        _dot(q, qb, kc, kb + 9 * ks, d),
        _dot(q, qb, kc, kb + 10 * ks, d),
        _dot(q, qb, kc, kb + 11 * ks, d),
        _dot(q, qb, kc, kb + 12 * ks, d),
        _dot(q, qb, kc, kb + 13 * ks, d),
        _dot(q, qb, kc, kb + 14 * ks, d),
        _dot(q, qb, kc, kb + 15 * ks, d),
    )


@njit(inline="always", **_FAST)
def _scores_at(q, qb, kc, table, key, block_size, ks, h, d, c, n):
    """c * the query at qb dotted with keys key..key+15 of head h (lane j: key + j), where
    n > 0 of them count; every lane past n holds the finite "minus infinity"."""
    if n <= 0:
        return v16splat(_NEG)
    blk = table[key // block_size]
    kb = ((blk * block_size + key % block_size) * (ks // d) + h) * d
    return v16first(v16mul(_scores16(q, qb, kc, kb, ks, d), v16splat(c)), n, _NEG)


@njit(inline="always", **_FAST)
def _softmax64(s0, s1, s2, s3, n, r, m, den, s):
    """Online softmax over one tile of 64 keys of row r (scores in four vectors, lanes past
    the first n at "minus infinity"): the weights go to s[:64], 0 past n; returns the factor
    that rescales the row's accumulator."""
    mx = max(m[r], v16hmax(v16max(v16max(s0, s1), v16max(s2, s3))))
    top = v16splat(mx)
    p0 = v16first(v16exp2(v16sub(s0, top)), n, 0.0)
    p1 = v16first(v16exp2(v16sub(s1, top)), n - 16, 0.0)
    p2 = v16first(v16exp2(v16sub(s2, top)), n - 32, 0.0)
    p3 = v16first(v16exp2(v16sub(s3, top)), n - 48, 0.0)
    alpha = _exp2(m[r] - mx)
    m[r] = mx
    den[r] = den[r] * alpha + v16hsum(v16add(v16add(p0, p1), v16add(p2, p3)))
    v16store(s, 0, p0)
    v16store(s, 16, p1)
    v16store(s, 32, p2)
    v16store(s, 48, p3)
    return alpha


@njit(inline="always", **_FAST)
def _widen_tile(vc, table, start, n, block_size, ks, h, vs, d):
    """vs[j, :] = V row start + j of head h widened to float32, for j < n."""
    hkv = ks // d
    for j in range(n):
        key = start + j
        vb = ((table[key // block_size] * block_size + key % block_size) * hkv + h) * d
        for e in range(0, d, 16):
            v16store(vs, j * d + e, v16load_bf16(vc, vb + e))


@njit(inline="always", **_FAST)
def _pv64(acc, ab, alpha, s, vs, vb, d, nv):
    """acc[ab:ab+64] = acc * alpha + sum over j < nv of s[j] * vs[j, vb:vb+64], the panel in
    four registers throughout."""
    av = v16splat(alpha)
    a0 = v16mul(v16load(acc, ab), av)
    a1 = v16mul(v16load(acc, ab + 16), av)
    a2 = v16mul(v16load(acc, ab + 32), av)
    a3 = v16mul(v16load(acc, ab + 48), av)
    for j in range(nv):
        p = v16splat(s[j])
        row = j * d + vb
        a0 = v16fma(p, v16load(vs, row), a0)
        a1 = v16fma(p, v16load(vs, row + 16), a1)
        a2 = v16fma(p, v16load(vs, row + 32), a2)
        a3 = v16fma(p, v16load(vs, row + 48), a3)
    v16store(acc, ab, a0)
    v16store(acc, ab + 16, a1)
    v16store(acc, ab + 32, a2)
    v16store(acc, ab + 48, a3)


@njit(inline="always", **_FAST)
def attend_tile_bf16(q, kc, vc, table, lo, hi, h0, h1, pos, ctx, c, out, d):
    """Attention of queries lo..hi-1, query heads of KV heads h0..h1-1, over one sequence's
    pages, in key tiles of 64; q, kc, vc: bfloat16 bits (uint16); c: the score scale times
    log2(e); d: the head dim, a multiple of 64; the block size a multiple of 16."""
    block_size, hkv = kc.shape[1], kc.shape[2]
    hq = q.shape[1]
    group = hq // hkv
    ks = hkv * d  # elements from one key to the next within a block
    heads = (h1 - h0) * group  # query heads per query
    rows = (hi - lo) * heads
    acc = np.zeros((rows, d), np.float32)
    m = np.full(rows, _NEG, np.float32)
    den = np.zeros(rows, np.float32)
    limit = np.zeros(rows, np.int64)
    s = np.empty(KEY_TILE, np.float32)  # one row's weights, read back one by one by `_pv64`
    vs = np.empty(KEY_TILE * d, np.float32)
    kmax = 0
    for i in range(hi - lo):
        lim = min(pos[lo + i] + 1, ctx)
        kmax = max(kmax, lim)
        for k in range(heads):
            limit[i * heads + k] = lim
    for start in range(0, kmax, KEY_TILE):
        for ahead in range(start + KEY_TILE, min(start + 2 * KEY_TILE, kmax), block_size):
            _prefetch_block(kc, vc, table[ahead // block_size], h0, h1)
        n = min(KEY_TILE, kmax - start)
        for h in range(h0, h1):
            _widen_tile(vc, table, start, n, block_size, ks, h, vs, d)
            for i in range(hi - lo):
                for g in range(group):
                    r = i * heads + (h - h0) * group + g
                    nv = min(n, limit[r] - start)
                    if nv <= 0:
                        continue
                    qb = ((lo + i) * hq + h * group + g) * d
                    s0 = _scores_at(q, qb, kc, table, start, block_size, ks, h, d, c, nv)
                    s1 = _scores_at(q, qb, kc, table, start + 16, block_size, ks, h, d, c, nv - 16)
                    s2 = _scores_at(q, qb, kc, table, start + 32, block_size, ks, h, d, c, nv - 32)
                    s3 = _scores_at(q, qb, kc, table, start + 48, block_size, ks, h, d, c, nv - 48)
                    alpha = _softmax64(s0, s1, s2, s3, nv, r, m, den, s)
                    for e0 in range(0, d, 64):
                        _pv64(acc, r * d + e0, alpha, s, vs, e0, d, nv)
    for i in range(hi - lo):
        for k in range(heads):
            inv = np.float32(1.0) / den[i * heads + k]
            for e in range(d):
                out[lo + i, h0 * group + k, e] = acc[i * heads + k, e] * inv
