"""CPU kernels of the paged KV cache: Numba paged multi-input attention and a torch write_kv.

The attention kernel reads the paged pool in place (no gather copy). Why it is shaped this way
(measured on 2-core AVX-512 and AVX2 hosts, see design.md "Kernel facts measured here"):
- work items of (sequence, query tile, KV heads) spread over the cores; an item computes with
  `cpu_tiles` (register-blocked `f32x8` code for head dims 64 and 128, scalar code LLVM
  vectorises for the rest; why each is shaped so is told there). An item takes all KV heads
  of its tile when there are at least two tiles per thread (each block is then read whole,
  not as strided thirds), one KV head otherwise (a one-sequence decode still uses every core);
- each thread takes every n-th work item (n threads), not a contiguous share: Numba's `prange`
  splits its range into equal contiguous parts whatever the chunk size is set to, so one thread
  got a whole prefill chunk's tiles beside another's cheap decode rows, or a causal prompt's
  late (long) tiles beside its early ones (2 cores, bfloat16: attention of 24 decode rows plus
  a 256-token chunk 3.3 -> 2.1 ms a layer, a 512-token prompt 2.05 -> 1.48);
- online softmax per key tile (one pool block), not per key;
- `exp2` by exponent bits plus a polynomial, because `math.exp` is a scalar libm call that
  blocks vectorisation here;
- every helper is inlined into the work item's loop: as calls, each passed its arrays with
  reference counts (atomic, shared between the threads), which cost more than the arithmetic
  (~20% slower that way);
- the head dim is a literal for 64 and 128: LLVM unrolls the K and V loops with no remainder
  or trip-count checks (1.2-1.6x faster on an AVX2 CPU than a head dim read at run time);
- the next block's rows are prefetched while this one is computed: the blocks of a sequence
  lie anywhere in the pool, where the hardware prefetcher cannot follow (`cpu_bf16` spreads
  them through its compute, one key a loop iteration, and also fetches the thread's next work
  item's first tile: decode from DRAM 0.64-0.75 of the time a layer on AMD Zen 4);
- bfloat16 and float16 pools are read as their bits and widened to float32 in registers
  (a float32 scratch copy per key tile cost more than the dot products); the bits come in
  an integer type per format (`_POOL_VIEW`), so no load tests the format at run time.
Sequences with many query rows (prefill) go to `cpu_sdpa` instead, where torch's GEMMs win
despite the copy (numbers there); decode and short query ranges stay here. Where the pool is
bfloat16 and the CPU has AVX512-BF16, `cpu_bf16`'s `vdpbf16ps` tile runs instead of
`cpu_tiles`, and for every sequence: it beat gather + SDPA at every query count measured.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from numba import get_num_threads, njit, prange

from ._args import check_paged_attention, check_write_kv
from .cpu_bf16 import attend_tile_bf16
from .cpu_sdpa import SequenceAttention
from .cpu_threads import numba_threads_as_torch
from .cpu_tiles import attend_tile, attend_tile_simd, simd_shape, tile_kind
from .simd512 import has_avx512_bf16

QUERY_ROWS = 48  # (query, head) rows per work item: queries per tile = QUERY_ROWS // group
TORCH_MIN_QUERIES = 16  # sequences with this many query rows go to cpu_sdpa (measured there)
# a pool's elements as the kernel takes them: 16-bit floats as their bits, in an integer type
# of their own, so the kernel's loads are chosen when it compiles, not by a run-time test
_POOL_VIEW = {
    torch.float32: torch.float32,
    torch.bfloat16: torch.uint16,
    torch.float16: torch.int16,
}
_LOG2E = 1.4426950408889634
# Numba's on-disk cache for the kernel: off unless PENSIEVE_KERNEL_CACHE=1. Measured on a
# 2-core AVX-512 EPYC, bfloat16: this parallel kernel loaded from the cache ran 1.6-3x slower
# than the same code compiled in the process (32 sequences x 512 keys on one thread: 1.03-1.05
# ms fresh in 3 processes, 1.7-3.2 ms cached in 8; the serial form ran ~1.0 ms either way), and
# engine steps of 24 rows took 1.5-1.8x longer with it (bench/README.md). Compiling costs ~9 s
# per pool dtype and tile kind, once per process, at start-up (`warm_up`); the tests turn the
# cache on to skip that.
_KERNEL = {
    "fastmath": True,
    "error_model": "numpy",
    "cache": os.environ.get("PENSIEVE_KERNEL_CACHE", "0") not in ("", "0"),
}


@njit(inline="always", **_KERNEL)
def _tile_starts(starts, skip, qtile):
    """Sequence b's query tiles are numbered tile_start[b]..tile_start[b + 1] - 1 (none where
    skip[b] != 0)."""
    batch = starts.shape[0] - 1
    tile_start = np.zeros(batch + 1, np.int64)
    for b in range(batch):
        n = 0 if skip[b] else starts[b + 1] - starts[b]
        tile_start[b + 1] = tile_start[b] + (n + qtile - 1) // qtile
    return tile_start


@njit(inline="always", **_KERNEL)
def _work_item(w, tile_start, starts, parts, heads, qtile):
    """Work item w as (sequence, first query, end query, first KV head)."""
    t = w // parts
    b = np.searchsorted(tile_start, t, side="right") - 1
    lo = starts[b] + (t - tile_start[b]) * qtile
    return b, lo, min(lo + qtile, starts[b + 1]), (w - t * parts) * heads


@njit(inline="always", **_KERNEL)
def _spread_simd(q, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out, d):
    """The work items through `attend_tile_simd` at head dim d (a constant where it is
    inlined: loops unrolled, no remainder)."""
    tile_start = _tile_starts(starts, skip, qtile)
    parts = kc.shape[2] // heads
    items = tile_start[-1] * parts
    lanes = min(get_num_threads(), items)
    for lane in prange(lanes):
        for w in range(lane, items, lanes):
            b, lo, hi, h0 = _work_item(w, tile_start, starts, parts, heads, qtile)
            attend_tile_simd(q, kc, vc, tables[b], lo, hi, h0, h0 + heads, pos, ctx[b], c, out, d)


# One kernel per tile kind, each compiling only its own tile (one kernel holding all three
# took ~23 s to compile). Each spreads (sequence, query tile, `heads` KV heads) work items over
# the cores; skip[b] != 0: none for sequence b. heads: 1, or all KV heads where the tile is
# `attend_tile_simd` (`_attention_any` takes one KV head per item whatever `heads` says).
@njit(parallel=True, nogil=True, **_KERNEL)
def _attention_d64(q, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out):
    _spread_simd(q, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out, 64)


@njit(parallel=True, nogil=True, **_KERNEL)
def _attention_d128(q, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out):
    _spread_simd(q, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out, 128)


@njit(parallel=True, nogil=True, **_KERNEL)
def _attention_any(q, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out):
    tile_start = _tile_starts(starts, skip, qtile)
    group = q.shape[1] // kc.shape[2]
    items = tile_start[-1] * kc.shape[2]
    lanes = min(get_num_threads(), items)
    for lane in prange(lanes):
        for w in range(lane, items, lanes):
            b, lo, hi, h = _work_item(w, tile_start, starts, kc.shape[2], 1, qtile)
            attend_tile(q, kc, vc, tables[b], lo, hi, h, group, pos, ctx[b], c, out, q.shape[2])


_KERNELS = {64: _attention_d64, 128: _attention_d128, 0: _attention_any}


@njit(inline="always", **_KERNEL)
def _spread_bf16(q, qrow, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out, d):
    """The work items through `cpu_bf16.attend_tile_bf16` at head dim d (a literal). A twin of
    `_spread_simd` on purpose: one loop built per tile by a closure factory cannot go in Numba's
    on-disk cache ("uses dynamic globals"), which the tests rely on to skip compiling."""
    tile_start = _tile_starts(starts, skip, qtile)
    parts = kc.shape[2] // heads
    items = tile_start[-1] * parts
    lanes = min(get_num_threads(), items)
    for lane in prange(lanes):
        for w in range(lane, items, lanes):
            b, lo, hi, h0 = _work_item(w, tile_start, starts, parts, heads, qtile)
            following = (tables[b], 0, 0)  # the thread's next item: its first tile prefetched
            if w + lanes < items:
                b2, _, hi2, h2 = _work_item(w + lanes, tile_start, starts, parts, heads, qtile)
                following = (tables[b2], min(pos[hi2 - 1] + 1, ctx[b2]), h2)  # its last query
            attend_tile_bf16(
                q, qrow, kc, vc, tables[b], lo, hi, h0, h0 + heads, pos, ctx[b], c, out, d,
                following,
            )  # fmt: skip


@njit(parallel=True, nogil=True, **_KERNEL)
def _attention_bf16_d64(q, qrow, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out):
    _spread_bf16(q, qrow, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out, 64)


@njit(parallel=True, nogil=True, **_KERNEL)
def _attention_bf16_d128(q, qrow, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out):
    _spread_bf16(q, qrow, kc, vc, tables, starts, pos, ctx, c, qtile, heads, skip, out, 128)


# bfloat16 pools on CPUs with AVX512-BF16, head dims 64 and 128, blocks of 16k keys
_BF16_KERNELS = {64: _attention_bf16_d64, 128: _attention_bf16_d128}
# PENSIEVE_CPU_BF16_DOT=0 keeps the widening kernel where this one would run (to compare them)
_BF16_DOT = has_avx512_bf16() and os.environ.get("PENSIEVE_CPU_BF16_DOT", "1") != "0"


def bf16_dot_kernel(q: torch.Tensor, k_cache: torch.Tensor):
    """The `vdpbf16ps` kernel where it takes this step (bfloat16 queries and pool, head dim
    64 or 128, a block size of 16k, a CPU with AVX512-BF16), else None."""
    return _bf16_kernel_for(q.dtype, q.shape[2], k_cache)


def _bf16_kernel_for(dtype: torch.dtype, head_dim: int, k_cache: torch.Tensor):
    if not _BF16_DOT or dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16:
        return None
    if k_cache.shape[1] % 16:
        return None
    return _BF16_KERNELS.get(head_dim)


def _pool_numpy(t: torch.Tensor) -> np.ndarray:
    """The pool as numpy without a copy, in `_POOL_VIEW`'s element type.

    Only a contiguous pool: a strided one would compile a second specialisation of the kernel,
    whose sums run in another order (and `deterministic` promises one order)."""
    if not t.is_contiguous():
        raise ValueError("the KV pool must be contiguous")
    return t.view(_POOL_VIEW[t.dtype]).numpy()


@njit(nogil=True, cache=True)
def _write_slots(src, slots, dst):
    """dst[slots[t]] = src[t] for every row t with a slot (>= 0); src [T, H, D] strided as the
    model's q/k/v split leaves it, dst a pool's flat [slots, H, D]."""
    for t in range(slots.shape[0]):
        slot = slots[t]
        if slot < 0:
            continue
        for h in range(src.shape[1]):
            for e in range(src.shape[2]):
                dst[slot, h, e] = src[t, h, e]


class SlotWriter:
    """Writes a step's new K/V rows into their slots (a negative slot: not written)."""

    def __init__(self, slot_mapping: torch.Tensor):
        self.slots = slot_mapping.long()
        self.slot_array = self.slots.numpy()

    def write(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> None:
        """One Numba loop over the rows as their bits, where torch's index_copy_ of the
        strided rows took ~43 us a call at 512 rows and ~4 at one (2-core Zen 4: the step
        0.97-0.98 of before at one and 24 decode rows); index_copy_ for other dtypes."""
        hkv, d = k_cache.shape[2:]
        view = _POOL_VIEW.get(k_cache.dtype)  # the kernels' element types serve the copy too
        for new, cache in ((k, k_cache), (v, v_cache)):
            flat = cache.view(-1, hkv, d)
            if view is not None and new.dtype == cache.dtype:
                _write_slots(new.view(view).numpy(), self.slot_array, flat.view(view).numpy())
                continue
            keep = self.slots >= 0
            flat.index_copy_(0, self.slots[keep], new[keep])


def _token_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x [T, H, D] as one flat run of memory from its first element to its last (token t's
    H * D elements at t * x.stride(0)), where each token's are contiguous: the model's q,
    columns of its fused q/k/v rows. None for another layout."""
    if x.is_contiguous():  # also one token whatever its strides: the cheap case first
        return x.view(-1)
    t, h, d = x.shape
    if t == 0 or x.stride(2) != 1 or x.stride(1) != d or x.stride(0) < h * d:
        return None
    return x.as_strided(((t - 1) * x.stride(0) + h * d,), (1,))


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
        self.counts = [hi - lo for lo, hi in zip(self.starts[:-1], self.starts[1:], strict=True)]
        self.impl = impl
        self.skip: np.ndarray | None = None  # sequences `cpu_sdpa` takes: `_choose`, at first use
        self.arrays = tuple(
            t.to(torch.int32).contiguous().numpy()
            for t in (block_tables, query_start, query_positions, context_lens)
        )
        self.block_tables, self.query_positions, self.context_lens = (
            block_tables, query_positions, context_lens,
        )  # fmt: skip
        self._by_sdpa: list[tuple[int, int, SequenceAttention]] | None = None  # at first use
        self.query_tile = query_tile
        self._split: tuple[int, int] | None = None  # `_work_split`, at first use

    def bf16_kernel_args(
        self, q_heads: int, head_dim: int, k_cache: torch.Tensor, scale: float
    ) -> tuple | None:
        """The `vdpbf16ps` kernel's arguments past the pool (block tables, query starts,
        positions, context lengths, scale * log2 e, query tile, KV heads an item, skip), for
        `cpu_decoder` to call it; None where that kernel does not take every sequence."""
        if _bf16_kernel_for(torch.bfloat16, head_dim, k_cache) is None:
            return None
        if self.skip is None:
            self.skip = self._choose(torch.bfloat16, head_dim, k_cache)
        if self.skip.any():
            return None
        qtile, heads = self._work_split(q_heads, head_dim, k_cache)
        return (*self.arrays, np.float32(scale * _LOG2E), qtile, heads, self.skip)

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if self.skip is None:
            self.skip = self._choose(q.dtype, q.shape[2], k_cache)
        if q.shape[0] and not self.skip.all():
            out = self._run_kernel(q, k_cache, v_cache, scale)
        else:
            out = torch.empty(q.shape, dtype=q.dtype)
        for lo, hi, sequence in self._sdpa_sequences(
            k_cache.shape[1], q.shape[1] // k_cache.shape[2]
        ):
            out[lo:hi] = sequence.attend(q[lo:hi], k_cache, v_cache, scale)
        return out

    def _choose(self, dtype: torch.dtype, head_dim: int, k_cache: torch.Tensor) -> np.ndarray:
        """Which sequences `cpu_sdpa` takes (1) and which the Numba kernel (0). "auto": those
        of TORCH_MIN_QUERIES or more query rows, except where the `vdpbf16ps` kernel runs: it
        beat gather + SDPA at every length measured (bfloat16, 2 cores: 512 new tokens 2.2
        against 3.8 ms a layer, 256 after 512 2.1 against 3.1, 16 after 512 0.15 against 0.25)."""
        least = {"auto": TORCH_MIN_QUERIES, "numba": self.starts[-1] + 1, "sdpa": 1}[self.impl]
        if self.impl == "auto" and _bf16_kernel_for(dtype, head_dim, k_cache) is not None:
            least = self.starts[-1] + 1
        return np.array([n >= least for n in self.counts], dtype=np.uint8)

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

    def _work_split(self, q_heads: int, head_dim: int, k_cache: torch.Tensor) -> tuple[int, int]:
        """(queries per tile, KV heads per work item): the same for every layer of the step,
        worked out at the first."""
        if self._split is None:
            hkv = k_cache.shape[2]
            qtile = max(1, self.query_tile or QUERY_ROWS // (q_heads // hkv))
            heads = 1
            if simd_shape(head_dim, k_cache.shape[1]):
                counts = zip(self.counts, self.skip, strict=True)
                tiles = sum(-(-n // qtile) for n, skip in counts if not skip)
                heads = hkv if tiles >= 2 * torch.get_num_threads() else 1
            self._split = (qtile, heads)
        return self._split

    def _run_kernel(self, q, k_cache, v_cache, scale: float) -> torch.Tensor:
        """The Numba kernel for every sequence not skipped: the output in q's dtype. The
        `vdpbf16ps` kernel writes bfloat16 itself, rounded as torch's `.to` rounds (a float32
        output and its conversion cost ~50 us a layer at 32 rows); the others write float32."""
        qtile, heads = self._work_split(q.shape[1], q.shape[2], k_cache)
        pool = (_pool_numpy(k_cache), _pool_numpy(v_cache), *self.arrays)
        rest = (np.float32(scale * _LOG2E), qtile, heads, self.skip)
        kernel = bf16_dot_kernel(q, k_cache)
        if kernel is not None:  # the query as its bfloat16 bits, scaled in the kernel
            rows = _token_rows(q)  # read in place from the q/k/v rows (no copy of q)
            if rows is None:
                q = q.contiguous()
                rows = q.view(-1)
            out = torch.empty(q.shape, dtype=q.dtype)
            with numba_threads_as_torch():  # each thread takes every n-th work item (above)
                kernel(rows.view(torch.uint16).numpy(), q.stride(0), *pool, *rest,
                       out.view(torch.uint16).numpy())  # fmt: skip
            return out
        kernel = _KERNELS[tile_kind(q.shape[2], k_cache.shape[1])]
        out = torch.empty(q.shape, dtype=torch.float32)
        with numba_threads_as_torch():
            kernel(q.to(torch.float32).contiguous().numpy(), *pool, *rest, out.numpy())
        return out if out.dtype == q.dtype else out.to(q.dtype)


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


def warm_up(k_cache: torch.Tensor, v_cache: torch.Tensor, query_heads: int) -> None:
    """Compile the kernel this pool's layers take (~9 s without the on-disk cache, see
    `_KERNEL`) before a step needs it: one decode query over the pool's first block, whose
    result is dropped; the pool is only read."""
    q = torch.zeros(1, query_heads, k_cache.shape[-1], dtype=k_cache.dtype)
    first = torch.zeros(1, 1, dtype=torch.int32)
    starts = torch.tensor([0, 1], dtype=torch.int32)
    zero, one = torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    paged_attention_cpu(q, k_cache, v_cache, first, starts, zero, one, 1.0, impl="numba")


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
