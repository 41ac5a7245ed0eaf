"""CPU kernels of the paged KV cache: Numba paged multi-input attention and a torch write_kv.

The attention kernel reads the paged pool in place (no gather copy). Why it is shaped this way
(measured on this 2-core AVX-512 host, see design.md "Kernel facts measured here"):
- one work item per (sequence, query tile, KV head): the query heads of a GQA group and the
  queries of the tile share every K/V row while it sits in L1;
- online softmax per tile of keys (one pool block), not per key;
- `exp2` by exponent bits plus a polynomial, because `math.exp` is a scalar libm call that
  blocks vectorisation here;
- rows outer, keys inner, head dim innermost (contiguous) so the loops vectorise;
- bfloat16 and float16 pools are read as uint16 bits and widened to float32 once per key tile.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ._args import check_paged_attention, check_write_kv

QUERY_TILE = 16  # queries of one sequence per work item; bounds the per-item scratch
_FORMAT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LOG2E = 1.4426950408889634
_NEG = np.float32(-1e30)  # finite "minus infinity": fastmath assumes no infs


@intrinsic
def _i32_as_f32(typingctx, bits):
    """Reinterpret int32 bits as float32 (a free register move, vectorisable)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    """Widen IEEE half bits (uint16) to float32 exactly (LLVM fpext: vcvtph2ps on x86)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=True)
def _exp2(x):
    """2**x for x <= 0 in float32: exponent bits times a degree-5 polynomial (rel. err 3e-7)."""
    x = max(x, np.float32(-126.0))
    n = np.floor(x + np.float32(0.5))
    f = x - n
    p = np.float32(0.00134004)
    p = p * f + np.float32(0.00967604)
    p = p * f + np.float32(0.05550327)
    p = p * f + np.float32(0.24022107)
    p = p * f + np.float32(0.69314721)
    p = p * f + np.float32(1.00000008)
    return p * _i32_as_f32(np.int32((np.int32(n) + 127) << 23))


def _key_tile(pool, blk, h, n, fmt, scratch):
    """Rows 0..n-1 of block `blk`, head `h`, as (array, block index, head index) in float32."""


@overload(_key_tile, inline="always")
def _key_tile_impl(pool, blk, h, n, fmt, scratch):
    if pool.dtype == types.float32:

        def direct(pool, blk, h, n, fmt, scratch):
            return pool, blk, h

        return direct

    def widen(pool, blk, h, n, fmt, scratch):
        d = pool.shape[3]
        if fmt == 1:  # bfloat16: the bits are the high half of a float32
            for j in range(n):
                for c in range(d):
                    scratch[0, j, 0, c] = _i32_as_f32(np.int32(np.int32(pool[blk, j, h, c]) << 16))
        else:  # float16
            for j in range(n):
                for c in range(d):
                    scratch[0, j, 0, c] = _f16_bits_to_f32(pool[blk, j, h, c])
        return scratch, 0, 0

    return widen


@njit(fastmath=True, cache=True)
def _attend_tile(q, kc, vc, table, lo, hi, h, group, pos, ctx, c, fmt, out):
    """Attention of queries lo..hi-1 (all heads of KV group h) over one sequence's pages."""
    d = q.shape[2]
    rows = (hi - lo) * group
    block_size = kc.shape[1]
    qf = np.empty((rows, d), np.float32)
    acc = np.zeros((rows, d), np.float32)
    m = np.full(rows, _NEG, np.float32)
    denom = np.zeros(rows, np.float32)
    limit = np.empty(rows, np.int64)
    scores = np.empty(block_size, np.float32)
    kbuf = np.empty((1, block_size, 1, d), np.float32)
    vbuf = np.empty((1, block_size, 1, d), np.float32)
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
        blk = table[start // block_size]
        n = min(block_size, kmax - start)
        ks, kb, kh = _key_tile(kc, blk, h, n, fmt, kbuf)
        vs, vb, vh = _key_tile(vc, blk, h, n, fmt, vbuf)
        for r in range(rows):
            nv = min(n, limit[r] - start)
            if nv <= 0:
                continue
            mx = m[r]
            for j in range(nv):
                s = np.float32(0.0)
                for e in range(d):
                    s += qf[r, e] * ks[kb, j, kh, e]
                scores[j] = s
                mx = max(mx, s)
            total = np.float32(0.0)
            for j in range(nv):
                p = _exp2(scores[j] - mx)
                scores[j] = p
                total += p
            alpha = _exp2(m[r] - mx)
            m[r] = mx
            denom[r] = denom[r] * alpha + total
            for e in range(d):
                acc[r, e] *= alpha
            for j in range(nv):
                p = scores[j]
                for e in range(d):
                    acc[r, e] += p * vs[vb, j, vh, e]
    for i in range(hi - lo):
        for g in range(group):
            r = i * group + g
            inv = np.float32(1.0) / denom[r]
            for e in range(d):
                out[lo + i, h * group + g, e] = acc[r, e] * inv


@njit(parallel=True, fastmath=True, cache=True)
def _paged_attention(q, kc, vc, tables, starts, pos, ctx, c, fmt, qtile, out):
    """Spread (sequence, query tile, KV head) work items over the cores."""
    batch = tables.shape[0]
    hkv = kc.shape[2]
    group = q.shape[1] // hkv
    tile_start = np.zeros(batch + 1, np.int64)
    for b in range(batch):
        n = starts[b + 1] - starts[b]
        tile_start[b + 1] = tile_start[b] + (n + qtile - 1) // qtile
    for w in prange(tile_start[batch] * hkv):
        tile = w // hkv
        h = w - tile * hkv
        b = np.searchsorted(tile_start, tile, side="right") - 1
        lo = starts[b] + (tile - tile_start[b]) * qtile
        hi = min(lo + qtile, starts[b + 1])
        _attend_tile(q, kc, vc, tables[b], lo, hi, h, group, pos, ctx[b], c, fmt, out)


def _pool_numpy(t: torch.Tensor) -> np.ndarray:
    """The pool as numpy without a copy: 16-bit floats as their uint16 bits."""
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.uint16).numpy()


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_positions: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    validate: bool = True,
    query_tile: int = QUERY_TILE,
) -> torch.Tensor:
    """Paged multi-input attention on CPU tensors; see `pensieve.kernels.paged_attention`."""
    if validate:
        check_paged_attention(
            q, k_cache, v_cache, block_tables, query_start, query_positions, context_lens, scale
        )
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    if q.shape[0]:
        _paged_attention(
            qf.numpy(),
            _pool_numpy(k_cache),
            _pool_numpy(v_cache),
            block_tables.contiguous().numpy(),
            query_start.contiguous().numpy(),
            query_positions.contiguous().numpy(),
            context_lens.contiguous().numpy(),
            np.float32(scale * _LOG2E),
            _FORMAT[k_cache.dtype],
            max(1, int(query_tile)),
            out.numpy(),
        )
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def write_kv_cpu(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Scatter rows of k/v into their slots with index_copy_ on the flat [slots, Hkv, D] view."""
    if validate:
        check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    if slots.numel() and bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    hkv, d = k_cache.shape[2:]
    k_cache.view(-1, hkv, d).index_copy_(0, slots, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slots, v)
