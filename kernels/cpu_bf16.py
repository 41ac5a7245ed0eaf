"""The CPU attention work item for bfloat16 pools on CPUs with AVX512-BF16: `vdpbf16ps` scores.

The same math as `cpu_tiles.attend_tile_simd` (online softmax, `exp2` by exponent bits), built
for what this instruction set offers:
- scores: q . k in 16-lane `vdpbf16ps`, which multiplies bfloat16 pairs exactly into float32
  lanes, so neither K nor the query is widened first. Each 16 keys of a tile are transposed
  once per KV head into rows of dim pairs (`v16transpose_words`), so a lane is a key and a
  score sums its dim pairs in order, one broadcast query pair an instruction; every query row
  of the tile (the GQA group, a prefill tile's queries) reads the same transposed tile, where
  a 16-way transpose-and-add tree per row and 16 keys cost more than the dots (24 decodes
  with a 256-token chunk 0.88-0.91 of the tree's step, a 512-token prefill 0.96, decode alone
  within the noise, AMD Zen 4). The query stays in bfloat16 (the model computes it in
  bfloat16) and the scale multiplies the score instead;
- P.V in `vdpbf16ps` too, over pairs of keys: the weights rounded to bfloat16 (as GPU flash
  attention rounds them for its second matmul; the denominator sums them before rounding),
  the tile's V rows interleaved in key pairs once per KV head, which every query row of that
  head (the GQA group, every query of a prefill tile) reads from L1. Half the instructions of
  float32 FMAs over widened V: a 512-token prefill 1.89 -> 1.58 ms a layer, 24 decode rows
  with a 256-token chunk 2.92 -> 2.44 (AMD Zen 4), decode alone about the same;
- the online softmax per group of 16 keys in registers (one vector), not per key tile;
- the next key tile prefetched into L2 one key an iteration of the first query's score and
  P.V loops (`_prefetch_key`), not in one burst per block as in `cpu_tiles`; during a work
  item's last tile, the first tile of the thread's next item, which had started cold;
- everything else as in `cpu_tiles` (items over the cores).
A row's sums run in one order wherever the row sits in the batch, as there (`deterministic`).
Compiled only where the CPU has `avx512_bf16` (`simd512.has_avx512_bf16`); elsewhere
`cpu_attention` keeps `cpu_tiles`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cpu_tiles import _NEG, _exp2
from .simd import prefetch_l2
from .simd512 import (
    v16add,
    v16first,
    v16hmax,
    v16hsum,
    v16load,
    v16max,
    v16mul,
    v16splat,
    v16store,
    v16store_bf16,
    v16sub,
    v16transpose_words,
    v16zero,
    v32interleave,
    vdot_bf16_pair,
)
from .simd512_math import v16exp2

_FAST = {"fastmath": True, "error_model": "numpy", "cache": True}
KEY_TILE = 64  # keys per online-softmax step: four vectors of scores


@njit(inline="always", **_FAST)
def _key_base(table, key, block_size, ks, h, d):
    """Where key `key`'s row of head h starts in the pool (flat element index). Keys
    key..key+15 follow at steps of ks (key % 16 == 0 and block_size % 16 == 0 keep them in one
    block), so a tile pays this division once per 16 keys, not once per key: two integer
    divisions per key and head cost more than the key's arithmetic (bench/README.md)."""
    return ((table[key // block_size] * block_size + key % block_size) * (ks // d) + h) * d


@njit(inline="always", **_FAST)
def _tile_bases(table, start, n, block_size, ks, h, d):
    """`_key_base` of the key tile's four groups of 16 keys (0 for a group past its n keys),
    found once per tile and head for both the V pairing and the scores."""
    return (
        _key_base(table, start, block_size, ks, h, d),
        _key_base(table, start + 16, block_size, ks, h, d) if n > 16 else 0,
        _key_base(table, start + 32, block_size, ks, h, d) if n > 32 else 0,
        _key_base(table, start + 48, block_size, ks, h, d) if n > 48 else 0,
    )


@njit(inline="always", **_FAST)
def _transpose_tile(kc, kt, n, ks, d, bases):
    """kt = the tile's n keys of one head in rows of dim pairs: pair p of keys 0..63 at
    kt[p * 128:] (one 32-bit word a key), each 16 keys one `v16transpose_words`; keys past n
    in a group of 16 are read (their block holds them) and masked out of the scores."""
    for g in range(0, n, 16):
        for e in range(0, d, 32):  # dims e..e+31: pairs e/2..e/2+15
            v16transpose_words(kt, e * KEY_TILE + 2 * g, 2 * KEY_TILE, kc, bases[g // 16] + e, ks)


@njit(inline="always", **_FAST)
def _prefetch_key(kc, vc, ahead, k, ks, d, npf):
    """Key k of the next tile (`ahead`: its `_tile_bases`; `npf` keys), its K and V rows of
    one head, into L2, if k < npf.

    The first query's score loop calls it once per dim pair (keys 0..d/2-1) and its first
    P.V loop once per key pair (the rest; those past that query's keys right after), so a
    tile's prefetches spread over the compute.
    Issued in one burst before it (64 rows, as this kernel first did), they filled the core's
    miss buffers and reorder window, and the compute waited on them. Into L2, not L1
    (`prefetch_l2`): the next tile of every KV head (48 KB at head dim 64 and 3 KV heads)
    evicted the current one from a 32 KB L1. Figures: bench/README.md, "Zen 4: prefetches
    spread through the compute" and "L2 prefetch"."""
    if k < npf:
        row = ahead[k // 16] + (k % 16) * ks
        for e in range(0, d, 32):  # 32 bfloat16: one 64-byte line
            prefetch_l2(kc, row + e)
            prefetch_l2(vc, row + e)


@njit(inline="always", **_FAST)
def _scores64(q, qb, kt, d, kc, vc, ahead, ks, npf):
    """The query at qb dotted with the tile's 64 keys in `kt` (`_transpose_tile`), four
    vectors of 16 keys. Each score sums the dim pairs in order in one float32 lane
    (`vdot_bf16_pair`: the query's pair broadcast), so its bits depend on its query and key
    only, not on the rows beside it."""
    s0, s1, s2, s3 = v16zero(), v16zero(), v16zero(), v16zero()
    for p in range(d // 2):
        _prefetch_key(kc, vc, ahead, p, ks, d, npf)
        row = p * 2 * KEY_TILE
        s0 = vdot_bf16_pair(s0, q, qb + 2 * p, kt, row)
        s1 = vdot_bf16_pair(s1, q, qb + 2 * p, kt, row + 32)
        s2 = vdot_bf16_pair(s2, q, qb + 2 * p, kt, row + 64)
        s3 = vdot_bf16_pair(s3, q, qb + 2 * p, kt, row + 96)
    return s0, s1, s2, s3


@njit(inline="always", **_FAST)
def _scores64x3(q, qb, qs, kt, d, kc, vc, ahead, ks, npf):
    """`_scores64` for the queries at qb, qb + qs and qb + 2 qs: twelve independent chains
    (four wait on the instruction's latency), each kt vector loaded once for the three rows;
    each row's sums in `_scores64`'s order (same bits)."""
    a0, a1, a2, a3 = v16zero(), v16zero(), v16zero(), v16zero()
    b0, b1, b2, b3 = v16zero(), v16zero(), v16zero(), v16zero()
    e0, e1, e2, e3 = v16zero(), v16zero(), v16zero(), v16zero()
    for p in range(d // 2):
        _prefetch_key(kc, vc, ahead, p, ks, d, npf)
        row = p * 2 * KEY_TILE
        x, y, z = qb + 2 * p, qb + qs + 2 * p, qb + 2 * qs + 2 * p  # the three rows' pair p
        a0, a1 = vdot_bf16_pair(a0, q, x, kt, row), vdot_bf16_pair(a1, q, x, kt, row + 32)
        a2, a3 = vdot_bf16_pair(a2, q, x, kt, row + 64), vdot_bf16_pair(a3, q, x, kt, row + 96)
        b0, b1 = vdot_bf16_pair(b0, q, y, kt, row), vdot_bf16_pair(b1, q, y, kt, row + 32)
        b2, b3 = vdot_bf16_pair(b2, q, y, kt, row + 64), vdot_bf16_pair(b3, q, y, kt, row + 96)
        e0, e1 = vdot_bf16_pair(e0, q, z, kt, row), vdot_bf16_pair(e1, q, z, kt, row + 32)
        e2, e3 = vdot_bf16_pair(e2, q, z, kt, row + 64), vdot_bf16_pair(e3, q, z, kt, row + 96)
    return a0, a1, a2, a3, b0, b1, b2, b3, e0, e1, e2, e3


@njit(inline="always", **_FAST)
def _softmax_row(t0, t1, t2, t3, c, n, r, m, den, s, g):
    """`_softmax64` of group row g from its four vectors of score sums, scaled by c and
    masked past the first n keys (lanes at the finite "minus infinity")."""
    cv = v16splat(c)
    return _softmax64(
        v16first(v16mul(t0, cv), n, _NEG),
        v16first(v16mul(t1, cv), n - 16, _NEG),
        v16first(v16mul(t2, cv), n - 32, _NEG),
        v16first(v16mul(t3, cv), n - 48, _NEG),
        n, r, m, den, s, g * KEY_TILE,
    )  # fmt: skip


@njit(inline="always", **_FAST)
def _softmax64(s0, s1, s2, s3, n, r, m, den, s, so):
    """Online softmax over one tile of 64 keys of row r (scores in four vectors, lanes past
    the first n at "minus infinity"): the weights go to s[so:so+64] as bfloat16 bits, 0 past n
    (the denominator sums them in float32, before rounding); returns the factor that rescales
    the row's accumulator."""
    mx = max(m[r], v16hmax(v16max(v16max(s0, s1), v16max(s2, s3))))
    top = v16splat(mx)
    p0 = v16first(v16exp2(v16sub(s0, top)), n, 0.0)
    p1 = v16first(v16exp2(v16sub(s1, top)), n - 16, 0.0)
    p2 = v16first(v16exp2(v16sub(s2, top)), n - 32, 0.0)
    p3 = v16first(v16exp2(v16sub(s3, top)), n - 48, 0.0)
    alpha = _exp2(m[r] - mx)
    m[r] = mx
    den[r] = den[r] * alpha + v16hsum(v16add(v16add(p0, p1), v16add(p2, p3)))
    v16store_bf16(s, so, p0)
    v16store_bf16(s, so + 16, p1)
    v16store_bf16(s, so + 32, p2)
    v16store_bf16(s, so + 48, p3)
    return alpha


@njit(inline="always", **_FAST)
def _pair_tile(vc, n, ks, vp, zero, d, bases):
    """vp = the tile's n V rows of one head in key pairs, as `vdot_bf16_pair` multiplies them
    (pair p's dims e..e+31 interleaved at vp[p * 2d + 2e:], an odd last row paired with zeros;
    bases: where each 16 keys of the tile start, `_tile_bases`)."""
    for g in range(0, n, 16):
        vb = bases[g // 16]
        rows = min(16, n - g)
        for j in range(0, rows, 2):
            first = vb + j * ks
            for e in range(0, d, 32):
                if j + 1 < rows:
                    v32interleave(vp, (g + j) * d + 2 * e, vc, first + e, vc, first + ks + e)
                else:
                    v32interleave(vp, (g + j) * d + 2 * e, vc, first + e, zero, e)


@njit(inline="always", **_FAST)
def _pv64(acc, ab, alpha, s, so, vp, vb, d, nv, kc, vc, ahead, ks, npf):
    """acc[ab:ab+64] = acc * alpha + sum over j < nv of s[so+j] * V row j's dims vb..vb+63,
    in bfloat16 pairs of keys (`vdot_bf16_pair`), the panel in four registers throughout."""
    av = v16splat(alpha)
    a0 = v16mul(v16load(acc, ab), av)
    a1 = v16mul(v16load(acc, ab + 16), av)
    a2 = v16mul(v16load(acc, ab + 32), av)
    a3 = v16mul(v16load(acc, ab + 48), av)
    for j in range(0, nv, 2):
        _prefetch_key(kc, vc, ahead, d // 2 + j // 2, ks, d, npf)
        row = j * d + 2 * vb  # pair j // 2
        a0 = vdot_bf16_pair(a0, s, so + j, vp, row)
        a1 = vdot_bf16_pair(a1, s, so + j, vp, row + 32)
        a2 = vdot_bf16_pair(a2, s, so + j, vp, row + 64)
        a3 = vdot_bf16_pair(a3, s, so + j, vp, row + 96)
    v16store(acc, ab, a0)
    v16store(acc, ab + 16, a1)
    v16store(acc, ab + 32, a2)
    v16store(acc, ab + 48, a3)


@njit(inline="always", **_FAST)
def _pv64x3(acc, ab, alpha, g, s, vp, vb, d, nv, kc, vc, ahead, ks, npf):
    """`_pv64` for rows g, g+1, g+2 of one GQA group at once (accumulators at ab, ab + d,
    ab + 2d; weights at s[64g:], alphas alpha[g:g+3]): each V pair vector is loaded once for
    the three rows, and twelve independent chains keep both units busy where four wait on
    the latency. Each row's sums run in the same order as `_pv64`'s (same bits)."""
    so = g * KEY_TILE
    b0, b1, b2 = v16splat(alpha[g]), v16splat(alpha[g + 1]), v16splat(alpha[g + 2])
    a0, a1 = v16mul(v16load(acc, ab), b0), v16mul(v16load(acc, ab + 16), b0)
    a2, a3 = v16mul(v16load(acc, ab + 32), b0), v16mul(v16load(acc, ab + 48), b0)
    c0, c1 = v16mul(v16load(acc, ab + d), b1), v16mul(v16load(acc, ab + d + 16), b1)
    c2, c3 = v16mul(v16load(acc, ab + d + 32), b1), v16mul(v16load(acc, ab + d + 48), b1)
    e0, e1 = v16mul(v16load(acc, ab + 2 * d), b2), v16mul(v16load(acc, ab + 2 * d + 16), b2)
    e2, e3 = v16mul(v16load(acc, ab + 2 * d + 32), b2), v16mul(v16load(acc, ab + 2 * d + 48), b2)
    for j in range(0, nv, 2):
        _prefetch_key(kc, vc, ahead, d // 2 + j // 2, ks, d, npf)
        row = j * d + 2 * vb
        p = so + j
        a0, a1 = vdot_bf16_pair(a0, s, p, vp, row), vdot_bf16_pair(a1, s, p, vp, row + 32)
        a2, a3 = vdot_bf16_pair(a2, s, p, vp, row + 64), vdot_bf16_pair(a3, s, p, vp, row + 96)
        p += KEY_TILE
        c0, c1 = vdot_bf16_pair(c0, s, p, vp, row), vdot_bf16_pair(c1, s, p, vp, row + 32)
        c2, c3 = vdot_bf16_pair(c2, s, p, vp, row + 64), vdot_bf16_pair(c3, s, p, vp, row + 96)
        p += KEY_TILE
        e0, e1 = vdot_bf16_pair(e0, s, p, vp, row), vdot_bf16_pair(e1, s, p, vp, row + 32)
        e2, e3 = vdot_bf16_pair(e2, s, p, vp, row + 64), vdot_bf16_pair(e3, s, p, vp, row + 96)
    v16store(acc, ab, a0)
    v16store(acc, ab + 16, a1)
    v16store(acc, ab + 32, a2)
    v16store(acc, ab + 48, a3)
    v16store(acc, ab + d, c0)
    v16store(acc, ab + d + 16, c1)
    v16store(acc, ab + d + 32, c2)
    v16store(acc, ab + d + 48, c3)
    v16store(acc, ab + 2 * d, e0)
    v16store(acc, ab + 2 * d + 16, e1)
    v16store(acc, ab + 2 * d + 32, e2)
    v16store(acc, ab + 2 * d + 48, e3)


@njit(inline="always", **_FAST)
def attend_tile_bf16(q, qrow, kc, vc, table, lo, hi, h0, h1, pos, ctx, c, out, d, following):
    """Attention of queries lo..hi-1, query heads of KV heads h0..h1-1, over one sequence's
    pages, in key tiles of 64; q, kc, vc: bfloat16 bits (uint16), q flat with query t's heads
    at q[t * qrow:] (in place in the model's q/k/v rows); c: the score scale times
    log2(e); d: the head dim, a multiple of 64; the block size a multiple of 16; out: the
    attention in bfloat16 bits (uint16), rounded here as torch rounds float32 to bfloat16;
    following: (block table, keys, first KV head) of the thread's next work item, whose first
    tile is prefetched during this item's last (keys 0: none)."""
    block_size, hkv = kc.shape[1], kc.shape[2]
    hq = out.shape[1]
    group = hq // hkv
    ks = hkv * d  # elements from one key to the next within a block
    heads = (h1 - h0) * group  # query heads per query
    rows = (hi - lo) * heads
    acc = np.zeros((rows, d), np.float32)
    m = np.full(rows, _NEG, np.float32)
    den = np.zeros(rows, np.float32)
    limit = np.zeros(hi - lo, np.int64)  # keys each query sees; every head of it alike
    s = np.zeros(group * KEY_TILE, np.uint16)  # a group's weights in bfloat16, read in pairs
    alpha = np.empty(group, np.float32)  # each row's accumulator rescale for this tile
    threes = group - group % 3  # rows P.V takes three at a time
    vp = np.empty(KEY_TILE * d, np.uint16)  # the tile's V rows in pairs (`_pair_tile`)
    kt = np.zeros(KEY_TILE * d, np.uint16)  # its K rows in dim pairs (`_transpose_tile`)
    zero = np.zeros(d, np.uint16)  # the partner of an odd last row
    kmax = 0
    for i in range(hi - lo):
        limit[i] = min(pos[lo + i] + 1, ctx)
        kmax = max(kmax, limit[i])
    for start in range(0, kmax, KEY_TILE):
        n = min(KEY_TILE, kmax - start)
        for h in range(h0, h1):
            bases = _tile_bases(table, start, n, block_size, ks, h, d)
            _pair_tile(vc, n, ks, vp, zero, d, bases)
            # the next tile's rows of head h, fetched while the first query's scores and
            # P.V run; after the last, the first tile of the thread's next work item
            # (`following`)
            npf = min(KEY_TILE, kmax - start - KEY_TILE)
            ahead = (0, 0, 0, 0)
            if npf > 0:
                ahead = _tile_bases(table, start + KEY_TILE, npf, block_size, ks, h, d)
            elif following[1] > 0:
                table2, keys2, h2 = following
                npf = min(KEY_TILE, keys2)
                ahead = _tile_bases(table2, 0, npf, block_size, ks, h2 + h - h0, d)
            _transpose_tile(kc, kt, n, ks, d, bases)
            for i in range(hi - lo):
                nv = min(n, limit[i] - start)
                if nv <= 0:
                    continue
                r0 = i * heads + (h - h0) * group  # the group's first row
                qh = (lo + i) * qrow + h * group * d  # the group's first query head
                # the first query of the tile also prefetches (separate inlined copies: a
                # run-time count in every call slowed the prefill's loops)
                first = npf
                npf = 0
                for g in range(0, threes, 3):
                    if first > 0 and g == 0:
                        u0, u1, u2, u3, v0, v1, v2, v3, w0, w1, w2, w3 = _scores64x3(
                            q, qh, d, kt, d, kc, vc, ahead, ks, first
                        )
                    else:
                        u0, u1, u2, u3, v0, v1, v2, v3, w0, w1, w2, w3 = _scores64x3(
                            q, qh + g * d, d, kt, d, kc, vc, ahead, ks, 0
                        )
                    r = r0 + g
                    alpha[g] = _softmax_row(u0, u1, u2, u3, c, nv, r, m, den, s, g)
                    alpha[g + 1] = _softmax_row(v0, v1, v2, v3, c, nv, r + 1, m, den, s, g + 1)
                    alpha[g + 2] = _softmax_row(w0, w1, w2, w3, c, nv, r + 2, m, den, s, g + 2)
                for g in range(threes, group):
                    fetch = first if threes == 0 and g == 0 else 0
                    t0, t1, t2, t3 = _scores64(q, qh + g * d, kt, d, kc, vc, ahead, ks, fetch)
                    alpha[g] = _softmax_row(t0, t1, t2, t3, c, nv, r0 + g, m, den, s, g)
                for e0 in range(0, d, 64):
                    for g in range(0, threes, 3):
                        ab = (r0 + g) * d + e0
                        if first > 0 and g == 0 and e0 == 0:
                            _pv64x3(acc, ab, alpha, g, s, vp, e0, d, nv, kc, vc, ahead, ks, first)
                        else:
                            _pv64x3(acc, ab, alpha, g, s, vp, e0, d, nv, kc, vc, ahead, ks, 0)
                    for g in range(threes, group):
                        fetch = first if threes == 0 and g == 0 and e0 == 0 else 0
                        _pv64(
                            acc, (r0 + g) * d + e0, alpha[g], s, g * KEY_TILE, vp, e0, d, nv,
                            kc, vc, ahead, ks, fetch,
                        )  # fmt: skip
                # keys the P.V loop did not reach (it runs over this query's nv keys only)
                for k in range(d // 2 + (nv + 1) // 2, first):
                    _prefetch_key(kc, vc, ahead, k, ks, d, first)
    for i in range(hi - lo):
        for k in range(heads):
            inv = v16splat(np.float32(1.0) / den[i * heads + k])
            ob = ((lo + i) * hq + h0 * group + k) * d
            for e in range(0, d, 16):
                v16store_bf16(out, ob + e, v16mul(v16load(acc, (i * heads + k) * d + e), inv))
