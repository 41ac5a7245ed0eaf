"""Numba CUDA kernels of the paged KV cache: write_kv and paged multi-input attention.

Attention: one thread block per (query tile of one sequence, KV head, slice of its query-head
group), so every query head of a GQA group reads each K/V row once from shared memory. A
thread owns one (query, head) row and one of `lanes` interleaved subsets of the keys; it keeps
its own online softmax (running max, denominator, float32 accumulator) over KEY_TILE-key tiles
that the block stages in shared memory, widened to float32. The lanes of a row are merged once
at the end. So there are two barriers per key tile and none per key, which also keeps the CUDA
simulator (one Python thread per GPU thread) fast enough for tests.

bfloat16 travels as int16 bits (numba has no bfloat16 type) and is widened by shifting into the
high half of a float32. The simulator lacks libdevice bit casts, so those two helpers have
numpy versions there. Tensors: torch CUDA tensors go in through `__cuda_array_interface__` and
kernels run on torch's current stream; under NUMBA_ENABLE_CUDASIM=1, CPU tensors go in as numpy
views.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from numba import config, cuda

from ._args import check_paged_attention, check_write_kv

SIMULATOR = bool(config.ENABLE_CUDASIM)
KEY_TILE = 16  # keys staged in shared memory per barrier pair
MAX_D = 128  # head dim bound of the static shared/local arrays
MAX_ROWS = 32  # (query, head) rows per block
MAX_THREADS = 128  # rows x lanes per block
_TILE_ELEMS = KEY_TILE * MAX_D  # array sizes must be plain global constants
_ROW_ELEMS = MAX_ROWS * MAX_D
_NEG = np.float32(-1e30)  # finite "minus infinity" (fastmath assumes no infs)

if SIMULATOR:

    def _i32_as_f32(bits):
        return np.int32(bits).view(np.float32)

    def _f32_as_i32(x):
        return np.float32(x).view(np.int32)

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _i32_as_f32(bits):
        return libdevice.int_as_float(bits)

    @cuda.jit(device=True, inline=True)
    def _f32_as_i32(x):
        return libdevice.float_as_int(x)


@cuda.jit(device=True, inline=True)
def _widen_f32(x):
    return x


@cuda.jit(device=True, inline=True)
def _narrow_f32(x):
    return x


@cuda.jit(device=True, inline=True)
def _widen_bf16(x):
    return _i32_as_f32(np.int32(np.int32(x) * 65536))


@cuda.jit(device=True, inline=True)
def _narrow_bf16(x):
    """float32 -> bfloat16 bits (as int16), round to nearest even, NaN stays NaN."""
    if x != x:
        return np.int16(0x7FC0)
    u = np.int64(_f32_as_i32(x)) & 0xFFFFFFFF
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.int16(u - 65536 if u >= 32768 else u)


@cuda.jit(device=True, inline=True)
def _widen_f16(x):
    return np.float32(x)


@cuda.jit(device=True, inline=True)
def _narrow_f16(x):
    return np.float16(x)


# (numba element type of the kernel's view of the tensor, widen, narrow), by torch dtype
FORMATS = {
    torch.float32: ("float32", _widen_f32, _narrow_f32),
    torch.bfloat16: ("int16", _widen_bf16, _narrow_bf16),
    torch.float16: ("float16", _widen_f16, _narrow_f16),
}


def _make_attention(widen: Callable, narrow: Callable) -> Callable:
    """The attention kernel's Python source, specialised to one storage format."""

    def attention(q, kc, vc, tables, starts, pos, ctx, out, scale, qtile, gsplit, lanes):
        k_sh = cuda.shared.array(_TILE_ELEMS, np.float32)
        v_sh = cuda.shared.array(_TILE_ELEMS, np.float32)
        o_sh = cuda.shared.array(_ROW_ELEMS, np.float32)
        m_sh = cuda.shared.array(MAX_THREADS, np.float32)
        l_sh = cuda.shared.array(MAX_THREADS, np.float32)
        tot_sh = cuda.shared.array(MAX_ROWS, np.float32)
        q_loc = cuda.local.array(MAX_D, np.float32)
        acc = cuda.local.array(MAX_D, np.float32)
        s_loc = cuda.local.array(KEY_TILE, np.float32)
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        d = q.shape[2]
        block_size = kc.shape[1]
        group = q.shape[1] // kc.shape[2]
        # this block's sequence b and query tile t0 (tiles numbered sequence by sequence)
        tile = cuda.blockIdx.x
        b = -1
        t0 = 0
        seen = 0
        for i in range(ctx.shape[0]):
            nt = (starts[i + 1] - starts[i] + qtile - 1) // qtile
            if b < 0 and tile < seen + nt:
                b = i
                t0 = tile - seen
            seen += nt
        if b < 0:
            return  # the grid is an upper bound on the number of tiles
        nsplit = (group + gsplit - 1) // gsplit
        h = cuda.blockIdx.y // nsplit
        g0 = (cuda.blockIdx.y - h * nsplit) * gsplit
        ng = min(gsplit, group - g0)
        lo = starts[b] + t0 * qtile
        nq = min(qtile, starts[b + 1] - lo)
        rows = nq * ng
        r = tid // lanes
        lane = tid - r * lanes
        active = r < rows
        clen = ctx[b]
        kmax = 0
        for i in range(nq):
            kmax = max(kmax, min(pos[lo + i] + 1, clen))
        lim = 0
        if active:
            qrow = lo + r // ng
            head = h * group + g0 + r % ng
            lim = min(pos[qrow] + 1, clen)
            for e in range(d):
                q_loc[e] = widen(q[qrow, head, e]) * scale
                acc[e] = np.float32(0.0)
        m = _NEG
        den = np.float32(0.0)
        for start in range(0, kmax, KEY_TILE):
            n = min(KEY_TILE, kmax - start)
            for idx in range(tid, n * d, nthreads):
                j = idx // d
                e = idx - j * d
                p = start + j
                blk = tables[b, p // block_size]
                off = p - (p // block_size) * block_size
                k_sh[idx] = widen(kc[blk, off, h, e])
                v_sh[idx] = widen(vc[blk, off, h, e])
            cuda.syncthreads()
            if active:
                stop = min(n, lim - start)
                cnt = 0
                mx = m
                for j in range(lane, stop, lanes):
                    s = np.float32(0.0)
                    for e in range(d):
                        s += q_loc[e] * k_sh[j * d + e]
                    s_loc[cnt] = s
                    cnt += 1
                    mx = max(mx, s)
                if cnt > 0:
                    alpha = math.exp(m - mx)
                    den *= alpha
                    for e in range(d):
                        acc[e] *= alpha
                    c = 0
                    for j in range(lane, stop, lanes):
                        p = math.exp(s_loc[c] - mx)
                        c += 1
                        den += p
                        for e in range(d):
                            acc[e] += p * v_sh[j * d + e]
                    m = mx
            cuda.syncthreads()
        # merge the lanes of each row: rescale to the row's max, sum in lane order
        m_sh[tid] = m
        l_sh[tid] = den
        cuda.syncthreads()
        w = np.float32(0.0)
        if active:
            top = _NEG
            for i in range(lanes):
                top = max(top, m_sh[r * lanes + i])
            w = math.exp(m - top)
            if lane == 0:
                tot = np.float32(0.0)
                for i in range(lanes):
                    tot += l_sh[r * lanes + i] * math.exp(m_sh[r * lanes + i] - top)
                tot_sh[r] = tot
        for i in range(lanes):
            if active and lane == i:
                for e in range(d):
                    prev = o_sh[r * d + e] if i > 0 else np.float32(0.0)
                    o_sh[r * d + e] = prev + w * acc[e]
            cuda.syncthreads()
        for idx in range(tid, rows * d, nthreads):
            rr = idx // d
            e = idx - rr * d
            out[lo + rr // ng, h * group + g0 + rr % ng, e] = narrow(o_sh[idx] / tot_sh[rr])

    return attention


def _write_kv(k, v, kc, vc, slots):
    """Block t copies row t of k and v into slot slots[t]; negative slots are skipped."""
    t = cuda.blockIdx.x
    slot = slots[t]
    if slot < 0:
        return
    block_size = kc.shape[1]
    blk = slot // block_size
    off = slot - blk * block_size
    d = k.shape[2]
    for idx in range(cuda.threadIdx.x, k.shape[1] * d, cuda.blockDim.x):
        h = idx // d
        e = idx - h * d
        kc[blk, off, h, e] = k[t, h, e]
        vc[blk, off, h, e] = v[t, h, e]


ATTENTION_SOURCES = {dt: _make_attention(w, n) for dt, (_, w, n) in FORMATS.items()}
_ATTENTION = {dt: cuda.jit(fastmath=True)(fn) for dt, fn in ATTENTION_SOURCES.items()}
_WRITE_KV = cuda.jit(_write_kv)


def ptx_targets() -> list[tuple[str, Callable, str]]:
    """(name, kernel source, signature) for every kernel and dtype: for compile checks."""
    targets = []
    for dt, (elem, _, _) in FORMATS.items():
        name = str(dt).removeprefix("torch.")
        store = f"{elem}[:, :, :, ::1]"
        sig = (
            f"void({elem}[:, :, ::1], {store}, {store}, int32[:, ::1], int32[::1], "
            f"int32[::1], int32[::1], {elem}[:, :, ::1], float32, int64, int64, int64)"
        )
        targets.append((f"paged_attention[{name}]", ATTENTION_SOURCES[dt], sig))
        bits = "int32" if elem == "float32" else "int16"
        for slot in ("int32", "int64"):
            sig = (
                f"void({bits}[:, :, :], {bits}[:, :, :], {bits}[:, :, :, ::1], "
                f"{bits}[:, :, :, ::1], {slot}[:])"
            )
            targets.append((f"write_kv[{name},{slot}]", _write_kv, sig))
    return targets


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor as numba sees it: bfloat16 as its int16 bits."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _launch(kernel: Callable, grid: tuple, block: int, tensors: list[torch.Tensor], *scalars):
    """Run `kernel` on torch's current stream (GPU) or on numpy views (simulator)."""
    if SIMULATOR:
        if any(t.is_cuda for t in tensors):
            raise ValueError("the CUDA simulator is on: pass CPU tensors")
        # the simulator copies arrays in and out whole, so strided inputs go in as copies
        # (outputs are always contiguous, so they are written back in place)
        kernel[grid, block](*(t.contiguous().numpy() for t in tensors), *scalars)
        return
    if not all(t.is_cuda for t in tensors):
        raise ValueError("the CUDA kernels need CUDA tensors (or NUMBA_ENABLE_CUDASIM=1)")
    device = tensors[0].device
    stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
    with cuda.gpus[device.index or 0]:
        kernel[grid, block, stream](*tensors, *scalars)


def paged_attention_cuda(
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
    query_tile: int | None = None,
    lanes: int | None = None,
) -> torch.Tensor:
    """Paged multi-input attention with the CUDA kernel; see `pensieve.kernels.paged_attention`.

    `query_tile` and `lanes` override the launch shape (the tests keep them tiny so the
    simulator runs few threads).
    """
    if validate:
        check_paged_attention(
            q, k_cache, v_cache, block_tables, query_start, query_positions, context_lens, scale
        )
    if q.shape[2] > MAX_D:
        raise ValueError(f"the CUDA kernel supports head dim <= {MAX_D}, got {q.shape[2]}")
    out = torch.empty_like(q)
    t, hq, _ = q.shape
    if t == 0:
        return out
    batch = block_tables.shape[0]
    hkv = k_cache.shape[2]
    group = hq // hkv
    gsplit = min(group, MAX_ROWS)
    # queries per block: the batch's mean per sequence (known without a device sync), so a
    # decode batch gets one query per block instead of mostly idle rows
    qtile = max(1, min(MAX_ROWS // gsplit, query_tile or -(-t // max(batch, 1))))
    lanes = max(1, min(lanes or KEY_TILE, MAX_THREADS // (qtile * gsplit)))
    grid = (t // qtile + batch, hkv * -(-group // gsplit))
    tensors = [
        _bits(q.contiguous()),
        _bits(k_cache),
        _bits(v_cache),
        block_tables.contiguous(),
        query_start.contiguous(),
        query_positions.contiguous(),
        context_lens.contiguous(),
    ]
    _launch(
        _ATTENTION[q.dtype],
        grid,
        qtile * gsplit * lanes,
        [*tensors, _bits(out)],
        np.float32(scale),
        qtile,
        gsplit,
        lanes,
    )
    return out


def write_kv_cuda(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
    threads: int = 128,
) -> None:
    """write_kv with the CUDA kernel: one block per token row."""
    if validate:
        check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return

    def flat(t: torch.Tensor) -> torch.Tensor:  # same-width integer bits: a plain copy
        return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)

    tensors = [flat(k), flat(v), flat(k_cache), flat(v_cache), slot_mapping]
    _launch(_WRITE_KV, (k.shape[0],), max(1, min(threads, k.shape[1] * k.shape[2])), tensors)
