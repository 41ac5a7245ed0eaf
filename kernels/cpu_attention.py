"""CPU kernels of the paged KV cache: Numba paged multi-input attention and a torch write_kv.

The attention kernel reads the paged pool in place (no gather copy). Why it is shaped this way
(measured on 2-core AVX-512 and AVX2 hosts, see design.md "Kernel facts measured here"):
- one work item per (sequence, query tile, KV head): the query heads of a GQA group and the
  queries of the tile share every K/V row while it sits in L1;
- online softmax per key tile (one pool block), not per key;
- `exp2` by exponent bits plus a polynomial, because `math.exp` is a scalar libm call that
  blocks vectorisation here;
- three rows at a time through the same code (`_rows_tile`, head dim innermost: contiguous,
  vectorised): each K and V element is loaded and widened once for three rows, 1.4x faster
  than one row at a time (24-32 decode rows at context 512, one thread and two); each row has
  its own accumulators, reduced alike, and keys a row does not see weigh exactly 0, so a row's
  sums run in one order wherever it sits in the batch; every helper is inlined into the work
  item's loop: as calls, each passed its arrays with reference counts (atomic, shared between
  the threads), which cost more than the arithmetic (~20% slower that way);
- the head dim is a literal for 64 and 128 (`_paged_attention` calls `_attend_tile` with the
  constant): LLVM unrolls the K and V loops with no remainder or trip-count checks, 1.2-1.6x
  faster on an AVX2 CPU (decode, float32 and bfloat16 pools) than a head dim read at run time;
- the next block's rows are prefetched while this one is computed: the blocks of a sequence
  lie anywhere in the pool, where the hardware prefetcher cannot follow;
- bfloat16 and float16 pools are read as uint16 bits and widened to float32 in registers
  (a float32 scratch copy per key tile cost more than the dot products).
Sequences with many query rows (prefill) go to `cpu_sdpa` instead, where torch's GEMMs win
despite the copy (numbers there); decode and short query ranges stay here.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._args import check_paged_attention, check_write_kv
from .cpu_sdpa import SequenceAttention
from .cpu_threads import numba_threads_as_torch

QUERY_ROWS = 48  # (query, head) rows per work item: queries per tile = QUERY_ROWS // group
# rows sharing each K/V load: the default model's GQA group; fixed by `_rows_tile`'s three
# accumulators (d0, d1, d2 and p0, p1, p2), which change with it
ROWS_PER_PASS = 3
TORCH_MIN_QUERIES = 16  # sequences with this many query rows go to cpu_sdpa (measured there)
_FORMAT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LOG2E = 1.4426950408889634
_NEG = np.float32(-1e30)  # finite "minus infinity": fastmath assumes no infs
_FAST = {"fastmath": True, "error_model": "numpy", "cache": True}


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


@intrinsic
def _prefetch(typingctx, arr, i0, i1, i2, i3):
    """Hint the caches to fetch the line holding arr[i0, i1, i2, i3] (llvm.prefetch)."""
    sig = types.void(arr, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, list(args[1:]))
        i8p = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
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
    return p * _i32_as_f32(np.int32((np.int32(n) + 127) << 23))


def _widen(x, fmt):
    """One pool element as float32 (bfloat16 and float16 pools hold their uint16 bits)."""


@overload(_widen, inline="always")
def _widen_impl(x, fmt):
    if x == types.float32:
        return lambda x, fmt: x

    def widen(x, fmt):
        if fmt == 1:  # bfloat16: the bits are the high half of a float32
            return _i32_as_f32(np.int32(np.int32(x) << 16))
        return _f16_bits_to_f32(x)

    return widen


@njit(inline="always", **_FAST)
def _prefetch_block(kc, vc, blk, h):
    """Ask for every cache line of head h's rows of block blk, in K and V."""
    step = max(1, 64 // kc.itemsize)
    for j in range(kc.shape[1]):
        for e in range(0, kc.shape[3], step):
            _prefetch(kc, blk, j, h, e)
            _prefetch(vc, blk, j, h, e)


@njit(inline="always", **_FAST)
def _rows_tile(qf, r, kc, vc, blk, h, start, n, limit, fmt, s, m, den, acc, d):
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
            k = _widen(kc[blk, j, h, e], fmt)
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
            v = _widen(vc[blk, j, h, e], fmt)
            acc[r, e] += p0 * v
            acc[r + 1, e] += p1 * v
            acc[r + 2, e] += p2 * v


@njit(inline="always", **_FAST)
def _attend_tile(q, kc, vc, table, lo, hi, h, group, pos, ctx, c, fmt, out, d):
    """Attention of queries lo..hi-1 (all heads of KV group h) over one sequence's pages;
    d is the head dim (a literal where specialised: see `_paged_attention`)."""
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
            _prefetch_block(kc, vc, table[start // block_size + 1], h)
        n = min(block_size, kmax - start)
        blk = table[start // block_size]
        for r in range(0, padded, ROWS_PER_PASS):
            _rows_tile(qf, r, kc, vc, blk, h, start, n, limit, fmt, s, m, den, acc, d)
    for i in range(hi - lo):
        for g in range(group):
            r = i * group + g
            inv = np.float32(1.0) / den[r]
            for e in range(d):
                out[lo + i, h * group + g, e] = acc[r, e] * inv


@njit(parallel=True, nogil=True, **_FAST)
def _paged_attention(q, kc, vc, tables, starts, pos, ctx, c, fmt, qtile, skip, out):
    """Spread (sequence, query tile, KV head) work items over the cores; skip[b] != 0: none."""
    batch = tables.shape[0]
    hkv = kc.shape[2]
    group = q.shape[1] // hkv
    tile_start = np.zeros(batch + 1, np.int64)
    for b in range(batch):
        n = 0 if skip[b] else starts[b + 1] - starts[b]
        tile_start[b + 1] = tile_start[b] + (n + qtile - 1) // qtile
    for w in prange(tile_start[batch] * hkv):
        tile = w // hkv
        h = w - tile * hkv
        b = np.searchsorted(tile_start, tile, side="right") - 1
        lo = starts[b] + (tile - tile_start[b]) * qtile
        hi = min(lo + qtile, starts[b + 1])
        # the head dim as a literal: loops unrolled, no remainder (each literal is one more
        # inlined copy to compile: ~2.5x the cold compile time, cached on disk after)
        table, ctx_b = tables[b], ctx[b]
        if q.shape[2] == 64:
            _attend_tile(q, kc, vc, table, lo, hi, h, group, pos, ctx_b, c, fmt, out, 64)
        elif q.shape[2] == 128:
            _attend_tile(q, kc, vc, table, lo, hi, h, group, pos, ctx_b, c, fmt, out, 128)
        else:
            _attend_tile(q, kc, vc, table, lo, hi, h, group, pos, ctx_b, c, fmt, out, q.shape[2])


def _pool_numpy(t: torch.Tensor) -> np.ndarray:
    """The pool as numpy without a copy: 16-bit floats as their uint16 bits.

    Only a contiguous pool: a strided one would compile a second specialisation of the kernel,
    whose sums run in another order (and `deterministic` promises one order)."""
    if not t.is_contiguous():
        raise ValueError("the KV pool must be contiguous")
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.uint16).numpy()


class SlotWriter:
    """Writes a step's new K/V rows into their slots; the slots are prepared once per step."""

    def __init__(self, slot_mapping: torch.Tensor):
        slots = slot_mapping.long()
        self.keep = None  # rows to write, where some have a negative slot (skip)
        if slots.numel() and bool((slots < 0).any()):
            self.keep = slots >= 0
            slots = slots[self.keep]
        self.slots = slots

    def write(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> None:
        """index_copy_ of the rows on the pools' flat [slots, Hkv, D] views."""
        if self.keep is not None:
            k, v = k[self.keep], v[self.keep]
        hkv, d = k_cache.shape[2:]
        k_cache.view(-1, hkv, d).index_copy_(0, self.slots, k)
        v_cache.view(-1, hkv, d).index_copy_(0, self.slots, v)


class CpuStep:
    """One step's kernel arguments, converted once and reused by every layer.

    A step runs the same metadata through every layer; converting it per layer (host lists,
    numpy views, which sequences go where, the slots to write) cost more than the attention
    itself for small batches."""

    def __init__(
        self,
        block_tables: torch.Tensor,
        query_start: torch.Tensor,
        query_positions: torch.Tensor,
        context_lens: torch.Tensor,
        *,
        impl: str = "auto",
        query_tile: int | None = None,
    ):
        if impl not in ("auto", "numba", "sdpa"):
            raise ValueError(f"impl must be 'auto', 'numba' or 'sdpa', got {impl!r}")
        self.starts = query_start.tolist()
        counts = [hi - lo for lo, hi in zip(self.starts[:-1], self.starts[1:], strict=True)]
        least = {"auto": TORCH_MIN_QUERIES, "numba": self.starts[-1] + 1, "sdpa": 1}[impl]
        self.skip = np.array([n >= least for n in counts], dtype=np.uint8)
        self.arrays = tuple(
            t.to(torch.int32).contiguous().numpy()
            for t in (block_tables, query_start, query_positions, context_lens)
        )
        self.block_tables, self.query_positions, self.context_lens = (
            block_tables, query_positions, context_lens,
        )  # fmt: skip
        self._by_sdpa: list[tuple[int, int, SequenceAttention]] | None = None  # at first use
        self.query_tile = query_tile

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=torch.float32)
        if q.shape[0] and not self.skip.all():
            self._run_kernel(q, k_cache, v_cache, scale, out)
        out = out if q.dtype == torch.float32 else out.to(q.dtype)
        for lo, hi, sequence in self._sdpa_sequences(
            k_cache.shape[1], q.shape[1] // k_cache.shape[2]
        ):
            out[lo:hi] = sequence.attend(q[lo:hi], k_cache, v_cache, scale)
        return out

    def _sdpa_sequences(
        self, block_size: int, group: int
    ) -> list[tuple[int, int, SequenceAttention]]:
        """(first row, end row, its `SequenceAttention`) of each sequence `cpu_sdpa` takes,
        built at the first layer and reused by the rest."""
        if self._by_sdpa is None:
            self._by_sdpa = []
            for b in np.flatnonzero(self.skip):
                lo, hi = self.starts[b], self.starts[b + 1]
                sequence = SequenceAttention(
                    self.block_tables[b], int(self.context_lens[b]),
                    self.query_positions[lo:hi], block_size, group,
                )  # fmt: skip
                self._by_sdpa.append((lo, hi, sequence))
        return self._by_sdpa

    def _run_kernel(self, q, k_cache, v_cache, scale: float, out: torch.Tensor) -> None:
        """The Numba kernel into the float32 `out` for every sequence not skipped."""
        group = q.shape[1] // k_cache.shape[2]
        # work items differ in cost: hand them out one by one
        with numba_threads_as_torch(chunksize=1):
            _paged_attention(
                q.to(torch.float32).contiguous().numpy(),
                _pool_numpy(k_cache),
                _pool_numpy(v_cache),
                *self.arrays,
                np.float32(scale * _LOG2E),
                _FORMAT[k_cache.dtype],
                max(1, self.query_tile or QUERY_ROWS // group),
                self.skip,
                out.numpy(),
            )


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
    impl: str = "auto",
    query_tile: int | None = None,
) -> torch.Tensor:
    """Paged multi-input attention on CPU tensors; see `pensieve.kernels.paged_attention`.

    impl "auto" runs sequences with >= TORCH_MIN_QUERIES query rows through `cpu_sdpa` (gather
    + torch SDPA) and the rest through the Numba kernel; "numba" or "sdpa" force one path.
    """
    if validate:
        check_paged_attention(
            q, k_cache, v_cache, block_tables, query_start, query_positions, context_lens, scale
        )
    step = CpuStep(
        block_tables, query_start, query_positions, context_lens, impl=impl, query_tile=query_tile
    )
    return step.attention(q, k_cache, v_cache, scale)


def write_kv_cpu(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Scatter rows of k/v into their slots (see `SlotWriter`)."""
    if validate:
        check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    SlotWriter(slot_mapping).write(k, v, k_cache, v_cache)
