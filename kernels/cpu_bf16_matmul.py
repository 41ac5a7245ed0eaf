"""A few bfloat16 rows times a bfloat16 weight, in oneDNN's summation order: decode's matmuls
at memory speed, with the bits of the GEMM that prefill runs.

Why: oneDNN's prepacked GEMM (`pensieve.linear`) is built for many rows. At one row it read a
decode step's weights at ~20 GB/s (these kernels: 30-40), at 8-256 rows it ran 0-35% slower
(2-core AMD Zen 4 EPYC, avx512_bf16; bench/README.md, "A few rows in oneDNN's order"). A
different kernel may only take some of a step's rows if every row keeps the bits oneDNN gives
it, or the stateful == stateless invariant breaks (`batch_invariant`). So these kernels sum as
oneDNN's brgemm does on avx512_core_bf16, found by probing it (a +2**60 and a -2**60 at two
positions of K, ones elsewhere: the ones that survive tell where the two meet in the sum tree):
each output is one `vdpbf16ps` accumulator over K's pairs in order (the odd product added
before the even one, by the instruction), restarted every `chunk` elements of K (512 of 576,
1024 of 1536 on that CPU), the chunks' sums added in order, rounded to bfloat16 to nearest
even. The chunk is not assumed: `onednn_chunk` reads it from oneDNN's sum tree for the shape,
and `few_rows_weight` compares bits with oneDNN's on random rows when the weight is packed; a
weight whose chunk or bits do not match is left to oneDNN.

Layout: `blocked` copies the weight [N, K] into units of 32 features, K's pairs outermost in a
unit, then 32 features x 2 (one pair of 16 lanes per `vdpbf16ps`): [N/64, K/2, 64, 2], a unit
the half of each 256-byte row. Threads take contiguous shares of the units. Where a share holds
a whole block, rows go four at a time over all 64 of its features (sixteen accumulators; the
block read from memory once, from L2 for the next four rows), then the rest one by one; a lone
unit at a share's edge goes the same way with eight accumulators. The block after it is
prefetched into L2 meanwhile, each of its lines once, spread evenly over the fours' passes
(it was the whole block in every four's pass: from memory in the first, again for nothing
in the rest, four lines a K pair, ~100 GB/s asked of one core in the first pass). Fewer
instructions, fewer misses in flight at once: which of the two counts was not measured. The
model's 121 matmuls from memory took 0.85 of the time at 24 rows (twice), 0.78-0.79 at
32-128, 0.73 at 256 and 0.88-0.90 at 8-16; an engine step of 24 rows after 512 tokens 0.95
(median ratios, 6 alternating rounds in one process, 2-core Zen 5 EPYC). Sixteen chains, not
eight: a core that runs two `vdpbf16ps` a cycle (AMD Zen 5) likely waited on eight of them;
the model's 121 matmuls from memory, sixteen over eight, took 0.84-0.91 of the time at 16, 24
and 64 rows (32 rows 0.95; median ratios, 6 alternating rounds) on a 2-core Zen 5 EPYC
(bench/README.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numba import njit, prange

from .cpu_threads import numba_threads_as_torch
from .simd import prefetch_l2
from .simd512 import has_avx512_bf16, v16add, v16store_bf16, v16zero, vdot_bf16_pair

UNIT = 32  # features a work item computes (two 16-lane accumulators a row)
BLOCK = 2 * UNIT  # features of a row of the blocked weight: two units side by side
LINE = 32  # uint16 elements of a 64-byte cache line
PAIR_ROW = 2 * BLOCK  # uint16 elements of one K pair of a block
CHECK_ROWS = 259  # random rows compared with oneDNN's many-row call (fours and single rows)
Matmul = Callable[[torch.Tensor], torch.Tensor]
# no fastmath: it would let LLVM reorder the chunks' float adds, and the order is the point
_FAST = {"error_model": "numpy", "cache": True, "nogil": True}


@njit(inline="always", **_FAST)
def _block_pair(a0, a1, a2, a3, x, xp, w, at):
    """One row's four accumulators over a block's 64 features, one K pair on: x's pair at xp
    times the block's four vectors of pairs from `at`."""
    return (
        vdot_bf16_pair(a0, x, xp, w, at),
        vdot_bf16_pair(a1, x, xp, w, at + UNIT),
        vdot_bf16_pair(a2, x, xp, w, at + 2 * UNIT),
        vdot_bf16_pair(a3, x, xp, w, at + 3 * UNIT),
    )


@njit(inline="always", **_FAST)
def _one_row(x, row, w, start, pair_lo, pair_hi, halves):
    """One row's sums over K pairs [pair_lo, pair_hi) for the unit whose pairs start at
    `start`, and for the unit beside it where `halves` is 2 (a whole block: one contiguous
    stream from memory, four accumulators)."""
    a0 = v16zero()
    a1 = v16zero()
    a2 = v16zero()
    a3 = v16zero()
    if halves == 2:
        for p in range(pair_lo, pair_hi):
            a0, a1, a2, a3 = _block_pair(a0, a1, a2, a3, x, row + 2 * p, w, start + p * PAIR_ROW)
    else:
        for p in range(pair_lo, pair_hi):
            at = start + p * PAIR_ROW
            a0 = vdot_bf16_pair(a0, x, row + 2 * p, w, at)
            a1 = vdot_bf16_pair(a1, x, row + 2 * p, w, at + UNIT)
    return a0, a1, a2, a3


@njit(inline="always", **_FAST)
def _four_rows(x, r0, r1, r2, r3, w, start, pair_lo, pair_hi, ahead, line, debt, groups):
    """Four rows' sums over K pairs [pair_lo, pair_hi) for one unit; the next unit's lines
    prefetched into L2, two for every `groups` pairs, from `line` on (`debt`: the share of
    one already owed, in `groups`ths)."""
    a00 = v16zero()
    a01 = v16zero()
    a10 = v16zero()
    a11 = v16zero()
    a20 = v16zero()
    a21 = v16zero()
    a30 = v16zero()
    a31 = v16zero()
    for p in range(pair_lo, pair_hi):
        at = start + p * PAIR_ROW
        debt += 2
        while debt >= groups:
            prefetch_l2(w, ahead + (line >> 1) * PAIR_ROW + (line & 1) * LINE)
            line += 1
            debt -= groups
        a00 = vdot_bf16_pair(a00, x, r0 + 2 * p, w, at)
        a01 = vdot_bf16_pair(a01, x, r0 + 2 * p, w, at + UNIT)
        a10 = vdot_bf16_pair(a10, x, r1 + 2 * p, w, at)
        a11 = vdot_bf16_pair(a11, x, r1 + 2 * p, w, at + UNIT)
        a20 = vdot_bf16_pair(a20, x, r2 + 2 * p, w, at)
        a21 = vdot_bf16_pair(a21, x, r2 + 2 * p, w, at + UNIT)
        a30 = vdot_bf16_pair(a30, x, r3 + 2 * p, w, at)
        a31 = vdot_bf16_pair(a31, x, r3 + 2 * p, w, at + UNIT)
    return a00, a01, a10, a11, a20, a21, a30, a31


@njit(inline="always", **_FAST)
def _four_rows_block(x, r0, r1, r2, r3, w, start, pair_lo, pair_hi, ahead, line, debt, groups):
    """Four rows' sums over K pairs [pair_lo, pair_hi) for a whole block (sixteen independent
    accumulators, for a core that runs two `vdpbf16ps` a cycle); the next block's lines
    prefetched into L2, four for every `groups` pairs, from `line` on (as `_four_rows`)."""
    a00, a01, a02, a03 = v16zero(), v16zero(), v16zero(), v16zero()
    a10, a11, a12, a13 = v16zero(), v16zero(), v16zero(), v16zero()
    a20, a21, a22, a23 = v16zero(), v16zero(), v16zero(), v16zero()
    a30, a31, a32, a33 = v16zero(), v16zero(), v16zero(), v16zero()
    for p in range(pair_lo, pair_hi):
        at = start + p * PAIR_ROW
        debt += 4
        while debt >= groups:
            prefetch_l2(w, ahead + line * LINE)
            line += 1
            debt -= groups
        a00, a01, a02, a03 = _block_pair(a00, a01, a02, a03, x, r0 + 2 * p, w, at)
        a10, a11, a12, a13 = _block_pair(a10, a11, a12, a13, x, r1 + 2 * p, w, at)
        a20, a21, a22, a23 = _block_pair(a20, a21, a22, a23, x, r2 + 2 * p, w, at)
        a30, a31, a32, a33 = _block_pair(a30, a31, a32, a33, x, r3 + 2 * p, w, at)
    return (a00, a01, a02, a03, a10, a11, a12, a13,
            a20, a21, a22, a23, a30, a31, a32, a33)  # fmt: skip


@njit(inline="always", **_FAST)
def _unit_start(unit, pairs):
    """Where unit `unit`'s first K pair starts in the blocked weight."""
    return (unit // 2) * pairs * PAIR_ROW + (unit % 2) * 2 * UNIT


@njit(inline="always", **_FAST)
def _four_rows_sums(x, r0, r1, r2, r3, w, start, pairs, pair_lo, pair_hi, ahead, halves, group,
                    groups):  # fmt: skip
    """Four rows' sums over K pairs [pair_lo, pair_hi) for a whole block (`halves` 2:
    `_four_rows_block`) or one unit (1: `_four_rows`), as sixteen vectors, row by row (a
    unit's two, then zeros in its place). The next block or unit is prefetched once across
    all `groups` fours of rows: this four (`group`) takes the lines from
    (group * pairs + pair_lo) * lines / groups on (`lines` a K pair)."""
    lines = 2 * halves
    line, debt = divmod((group * pairs + pair_lo) * lines, groups)
    if halves == 2:
        return _four_rows_block(x, r0, r1, r2, r3, w, start, pair_lo, pair_hi, ahead, line,
                                debt, groups)  # fmt: skip
    a = _four_rows(x, r0, r1, r2, r3, w, start, pair_lo, pair_hi, ahead, line, debt, groups)
    z = v16zero()
    return (a[0], a[1], z, z, a[2], a[3], z, z, a[4], a[5], z, z, a[6], a[7], z, z)


@njit(**_FAST)
def _rows_in_fours(x, w, out, k_dim, n_dim, chunk_pairs, rows, unit, ahead_unit, halves):
    """out[rows in fours, features of `halves` units from `unit`] = x @ W.T, chunk by chunk of
    K; unit `ahead_unit` on prefetched meanwhile."""
    pairs = k_dim // 2
    start = _unit_start(unit, pairs)
    ahead = _unit_start(ahead_unit, pairs)
    groups = rows // 4
    for m in range(0, rows - rows % 4, 4):
        r0 = m * k_dim
        r1 = r0 + k_dim
        r2 = r1 + k_dim
        r3 = r2 + k_dim
        g = m // 4
        hi = min(chunk_pairs, pairs)
        t = _four_rows_sums(x, r0, r1, r2, r3, w, start, pairs, 0, hi, ahead, halves, g, groups)
        for lo in range(chunk_pairs, pairs, chunk_pairs):
            hi = min(lo + chunk_pairs, pairs)
            s = _four_rows_sums(x, r0, r1, r2, r3, w, start, pairs, lo, hi, ahead, halves, g,
                                groups)  # fmt: skip
            t = (v16add(t[0], s[0]), v16add(t[1], s[1]), v16add(t[2], s[2]),
                 v16add(t[3], s[3]), v16add(t[4], s[4]), v16add(t[5], s[5]),
                 v16add(t[6], s[6]), v16add(t[7], s[7]), v16add(t[8], s[8]),
                 v16add(t[9], s[9]), v16add(t[10], s[10]), v16add(t[11], s[11]),
                 v16add(t[12], s[12]), v16add(t[13], s[13]), v16add(t[14], s[14]),
                 v16add(t[15], s[15]))  # fmt: skip
        for i in range(4):
            o = (m + i) * n_dim + unit * UNIT
            for j in range(2 * halves):
                v16store_bf16(out, o + 16 * j, t[4 * i + j])


@njit(**_FAST)
def _single_rows(x, w, out, k_dim, n_dim, chunk_pairs, rows, unit, halves):
    """out[rows past the fours, features of `halves` units from `unit`] = x @ W.T."""
    pairs = k_dim // 2
    start = _unit_start(unit, pairs)
    for m in range(rows - rows % 4, rows):
        t = _one_row(x, m * k_dim, w, start, 0, min(chunk_pairs, pairs), halves)
        for lo in range(chunk_pairs, pairs, chunk_pairs):
            s = _one_row(x, m * k_dim, w, start, lo, min(lo + chunk_pairs, pairs), halves)
            t = (v16add(t[0], s[0]), v16add(t[1], s[1]), v16add(t[2], s[2]), v16add(t[3], s[3]))
        o = m * n_dim + unit * UNIT
        for i in range(2 * halves):
            v16store_bf16(out, o + 16 * i, t[i])


@njit(**_FAST)
def _units(x, w, out, k_dim, n_dim, chunk, unit_lo, unit_hi):
    """out[:, units] = x @ W.T for units [unit_lo, unit_hi): a whole block at a time where the
    share holds both its units (a single row streams it in one pass), else one unit."""
    rows = x.shape[0]
    chunk_pairs = chunk // 2
    unit = unit_lo
    while unit < unit_hi:
        halves = 2 if unit % 2 == 0 and unit + 1 < unit_hi else 1
        ahead = unit + halves if unit + halves < unit_hi else unit  # the last: itself, cached
        _rows_in_fours(x, w, out, k_dim, n_dim, chunk_pairs, rows, unit, ahead, halves)
        _single_rows(x, w, out, k_dim, n_dim, chunk_pairs, rows, unit, halves)
        unit += halves


@njit(parallel=True, **_FAST)
def _matmul(x, w, out, k_dim, n_dim, chunk, threads):
    """out = x @ W.T (C-contiguous uint16 bits), the units split into one contiguous share a
    thread."""
    units = n_dim // UNIT
    for t in prange(threads):
        _units(x, w, out, k_dim, n_dim, chunk, units * t // threads, units * (t + 1) // threads)


def fits(weight: torch.Tensor) -> bool:
    """Whether these kernels take this weight: bfloat16 [N, K] on CPU, N a multiple of 64 and K
    of 2, on a CPU with avx512_bf16."""
    n_dim, k_dim = weight.shape
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and n_dim % BLOCK == 0
        and k_dim % 2 == 0
        and has_avx512_bf16()
    )


def blocked(weight: torch.Tensor) -> np.ndarray:
    """The weight [N, K] as the kernels read it: [N/64, K/2, 64, 2] bfloat16 bits, flat."""
    n_dim, k_dim = weight.shape
    bits = weight.detach().contiguous().view(torch.uint16)
    tiles = bits.view(n_dim // BLOCK, BLOCK, k_dim // 2, 2).permute(0, 2, 1, 3)
    return tiles.contiguous().numpy().reshape(-1)


class FewRowsWeight:
    """A weight's blocked copy and oneDNN's K chunk for it: `matmul` of a few rows with the
    bits oneDNN gives them. This class is the bfloat16 form; a subclass names another dtype,
    the bits the kernel reads it as, its layout and its kernel (`cpu_f32_matmul`)."""

    __slots__ = ("blocks", "chunk", "out_features", "in_features")
    dtype = torch.bfloat16
    bits = torch.uint16  # x and out as the kernel reads and writes them
    np_bits = np.uint16
    layout = staticmethod(blocked)
    kernel = staticmethod(_matmul)

    def __init__(self, weight: torch.Tensor, chunk: int):
        self.out_features, self.in_features = weight.shape
        self.blocks = self.layout(weight)
        self.chunk = chunk

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T for x [M, K] in the form's dtype."""
        if x.dtype != self.dtype or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: x {tuple(x.shape)} {x.dtype} does not fit [M, "
                f"{self.in_features}] {self.dtype}"
            )
        x = x.contiguous()
        out = np.empty((x.shape[0], self.out_features), self.np_bits)  # numpy's: ~1 us less
        if x.shape[0]:
            threads = numba_threads_as_torch()
            with threads:
                self.kernel(x.view(self.bits).numpy(), self.blocks, out, self.in_features,
                            self.out_features, self.chunk, threads.threads)  # fmt: skip
        return torch.from_numpy(out).view(self.dtype)


def few_rows_weight(
    weight: torch.Tensor, onednn: Callable[[torch.Tensor], Matmul]
) -> FewRowsWeight | None:
    """The weight for these kernels, where it `fits` and `checked_form` passes it."""
    return checked_form(FewRowsWeight, weight, onednn, CHECK_ROWS) if fits(weight) else None


def checked_form(
    form: type[FewRowsWeight],
    weight: torch.Tensor,
    onednn: Callable[[torch.Tensor], Matmul],
    rows: int,
) -> FewRowsWeight | None:
    """`form` of the weight with oneDNN's K chunk for its shape (`onednn_chunk`), if it then
    gives the bits of oneDNN's matmul of it (`onednn(weight)`) on `rows` random rows; None
    where it does not."""
    n_dim, k_dim = weight.shape
    chunk = onednn_chunk(n_dim, k_dim, onednn, weight.dtype)
    if chunk is None:
        return None
    few = form(weight, chunk)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k_dim, generator=gen).to(weight.dtype)
    same = torch.equal(few.matmul(x).view(few.bits), onednn(weight)(x).view(few.bits))
    return few if same else None


_chunks: dict[tuple[int, int, int, torch.dtype], int | None] = {}


def onednn_chunk(
    n_dim: int,
    k_dim: int,
    onednn: Callable[[torch.Tensor], Matmul],
    dtype: torch.dtype = torch.bfloat16,
) -> int | None:
    """How many elements of K oneDNN's matmul of an [n_dim, k_dim] weight sums in one
    accumulator before it starts the next (K itself where it never does); None where its
    restarts are not evenly spaced or their sums not added in order. Read from the sum tree,
    not from sums of random rows (a wrong chunk changes ~1 bfloat16 output in 5000): with a
    weight of ones, row c holds +2**60 and -2**60 at K positions c and c + 1 and ones at
    c - 2 and c - 1, so its sum is 2 where c starts a new accumulator (the ones were summed
    apart from the two that cancel) and 0 where the accumulator runs on (the ones vanished
    into the 2**60). With three chunks or more, one more row (a one in the first, +2**60 in
    the second, -2**60 in the third) sums to 0 where the chunks are added one after another
    (a tree adding the last two first keeps the one). Once per shape, dtype and thread count
    (`dtype`: the weight's and the rows', bfloat16 or float32)."""
    key = (n_dim, k_dim, torch.get_num_threads(), dtype)
    if key not in _chunks:
        big = 2.0**60
        starts = torch.arange(2, k_dim - 1, 2)
        x = torch.zeros(len(starts), k_dim, dtype=dtype)
        rows = torch.arange(len(starts))
        x[rows, starts] = big
        x[rows, starts + 1] = -big
        x[rows, starts - 1] = x[rows, starts - 2] = 1.0
        of_ones = onednn(torch.ones(n_dim, k_dim, dtype=dtype))
        sums = of_ones(x)[:, 0].float()
        restarts = starts[sums == 2].tolist()
        chunk = restarts[0] if restarts else k_dim
        even = restarts == list(range(chunk, k_dim, chunk)) and bool((sums[sums != 2] == 0).all())
        if even and len(restarts) >= 2:  # the order the chunks' sums are added in
            order = torch.zeros(1, k_dim, dtype=dtype)
            order[0, 0], order[0, chunk], order[0, 2 * chunk] = 1.0, big, -big
            even = bool(of_ones(order)[0, 0] == 0)
        _chunks[key] = chunk if even else None
    return _chunks[key]
