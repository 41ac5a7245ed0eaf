"""The decode attention kernel (one query row per sequence) and the split-KV merge kernel.

A block serves one work item (a query row, or one key partition of it) for one KV head and up
to `rows` query heads of its GQA group, so each K/V row is read from memory once for all of
them. Lanes work in groups of `tg`, one key per group, each lane holding one 16-byte vector of
the row (`ld4`): the query slice and the float32 accumulator of every head live in registers.
Keys go in chunks of `chunk`: scores (lane partials summed by warp shuffles) land in shared
memory, one warp per head takes the chunk's max and exponentials, then the groups accumulate
P x V. Three barriers per chunk, none per key. At the end the groups' accumulators meet in a
shared buffer padded so that lanes do not conflict; an unsplit item writes the normalised output,
a split one its float32 partial and (max, sum), which `merge` combines.

Everything that sizes an array or an index is a compile-time constant of one (format, head dim,
block size, KV heads, group) specialisation; divisions are shifts or constant multiplies, index
math is 32-bit, and softmax runs in base 2 (log2 e is folded into the scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numba import cuda

from .cuda_plan import ITEM, MERGE, decode_rows, words_per_row
from .cuda_prims import FORMATS, NEG, ld4, log2_exact, shfl_xor


def make_widen4(fmt: str) -> Callable:
    """Device function: four words -> 4 (float32) or 8 (16-bit) floats at dst[off:], scaled."""
    epw, unpack, _ = FORMATS[fmt]

    @cuda.jit(device=True, inline=True)
    def widen4(dst, off, w0, w1, w2, w3, scale):
        if epw == 2:
            a, b = unpack(w0)
            dst[off] = a * scale
            dst[off + 1] = b * scale
            a, b = unpack(w1)
            dst[off + 2] = a * scale
            dst[off + 3] = b * scale
            a, b = unpack(w2)
            dst[off + 4] = a * scale
            dst[off + 5] = b * scale
            a, b = unpack(w3)
            dst[off + 6] = a * scale
            dst[off + 7] = b * scale
        else:
            dst[off] = unpack(w0)[0] * scale
            dst[off + 1] = unpack(w1)[0] * scale
            dst[off + 2] = unpack(w2)[0] * scale
            dst[off + 3] = unpack(w3)[0] * scale

    return widen4


def decode_source(
    fmt: str, head_dim: int, block_size: int, hkv: int, group: int, threads: int, chunk: int
) -> Callable:
    """The decode kernel's Python function with every shape closed over as a constant."""
    epw, _, pack = FORMATS[fmt]
    widen4 = make_widen4(fmt)
    D = head_dim
    WPR = words_per_row(fmt, head_dim)  # words per head row
    TG = WPR // 4  # lanes per key: one 16-byte vector each
    LOG_TG = log2_exact(TG, "lanes per key")
    EPV = 4 * epw  # elements per vector
    LOG_EPV = log2_exact(EPV, "elements per vector")
    NT = threads
    NG = NT // TG  # key groups per block
    NW = NT // 32
    GROUP = group
    GR = decode_rows(fmt, group)  # query heads per block
    NSLICES = -(-group // GR)
    RPW = -(-GR // NW)  # heads per warp in the softmax pass
    HQ = hkv * group
    LOG_BS = log2_exact(block_size, "block size")
    BS_MASK = block_size - 1
    ROW_WORDS = hkv * WPR  # one token of a pool block
    CH = chunk
    ORP = GR * D + TG  # padded pitch of one group's accumulators in the reduction buffer
    FRAG = GR * EPV
    LOGITS = GR * CH
    RED = NG * ORP
    ML = 2 * GR
    if NT % 32 or NT < TG or TG > 32:
        raise ValueError(f"decode threads {NT} must be a multiple of 32 and >= {TG}")

    def decode(q, qs, kc, vc, tables, tw, items, out, os_, o_part, ml_part, scale):
        logits = cuda.shared.array(LOGITS, np.float32)
        rowbase = cuda.shared.array(CH, np.int32)
        alpha_sh = cuda.shared.array(GR, np.float32)
        ml_sh = cuda.shared.array(ML, np.float32)
        o_red = cuda.shared.array(RED, np.float32)
        qf = cuda.local.array(FRAG, np.float32)
        acc = cuda.local.array(FRAG, np.float32)
        kv = cuda.local.array(EPV, np.float32)
        m_reg = cuda.local.array(RPW, np.float32)
        l_reg = cuda.local.array(RPW, np.float32)
        tid = np.int32(cuda.threadIdx.x)
        gi = tid >> LOG_TG
        li = tid & (TG - 1)
        warp = tid >> 5
        lane = tid & 31
        it = np.int32(cuda.blockIdx.x) * ITEM
        t = items[it]
        b = items[it + 1]
        k0 = items[it + 2]
        k1 = items[it + 3]
        slot = items[it + 4]
        y = np.int32(cuda.blockIdx.y)
        h = np.int32(y // NSLICES)
        g0 = np.int32((y - h * NSLICES) * GR)
        head0 = np.int32(h * GROUP + g0)
        # this thread's accumulators live in the reduction buffer between chunks, so the
        # query fragment (score pass) and the accumulators (P x V pass) never share registers
        red = np.int32(gi * ORP + li)
        for r in range(GR):
            for e in range(EPV):
                o_red[np.uint64(red + r * D + e * TG)] = np.float32(0.0)
        qb = np.int32(t * qs + h * GROUP * WPR + li * 4)
        for k in range(RPW):
            m_reg[k] = NEG
            l_reg[k] = np.float32(0.0)
        tb = np.int32(b * tw)
        hoff = np.int32(h * WPR)
        loff = np.int32(li * 4)
        for c0 in range(k0, k1, CH):
            nc = np.int32(min(CH, k1 - c0))
            for r in range(GR):  # reloaded per chunk (an L1 hit): dead outside the score pass
                w0, w1, w2, w3 = ld4(q, qb + min(g0 + r, GROUP - 1) * WPR)
                widen4(qf, r * EPV, w0, w1, w2, w3, scale)
            # scores: one key per lane group; lanes of a group sum by shuffles (warp-uniform)
            for jb in range(0, nc, NG):
                j = np.int32(jb + gi)
                w0 = w1 = w2 = w3 = np.int32(0)
                if j < nc:
                    p = np.int32(c0 + j)
                    blk = tables[np.uint64(tb + (p >> LOG_BS))]
                    slot_p = np.int32(blk * block_size + (p & BS_MASK))
                    base = np.int32(slot_p * ROW_WORDS + hoff)
                    if li == 0:
                        rowbase[np.uint64(j)] = base
                    w0, w1, w2, w3 = ld4(kc, base + loff)
                widen4(kv, 0, w0, w1, w2, w3, np.float32(1.0))
                for r in range(GR):
                    s = np.float32(0.0)
                    for e in range(EPV):
                        s += qf[r * EPV + e] * kv[e]
                    for step in range(LOG_TG):
                        s += shfl_xor(s, TG >> (step + 1))
                    if li == 0 and j < nc:
                        logits[np.uint64(r * CH + j)] = s
            cuda.syncthreads()
            # softmax of the chunk: one warp per head, in place
            for k in range(RPW):
                r = warp + k * NW
                if r < GR:
                    mx = NEG
                    for jb in range(0, nc, 32):
                        if jb + lane < nc:
                            mx = max(mx, logits[np.uint64(r * CH + jb + lane)])
                    for step in range(5):
                        mx = max(mx, shfl_xor(mx, 16 >> step))
                    mnew = max(m_reg[k], mx)
                    sm = np.float32(0.0)
                    for jb in range(0, nc, 32):
                        if jb + lane < nc:
                            at = np.uint64(r * CH + jb + lane)
                            e = math.exp2(logits[at] - mnew)
                            logits[at] = e
                            sm += e
                    for step in range(5):
                        sm += shfl_xor(sm, 16 >> step)
                    alpha = math.exp2(m_reg[k] - mnew)
                    l_reg[k] = l_reg[k] * alpha + sm
                    m_reg[k] = mnew
                    if lane == 0:
                        alpha_sh[r] = alpha
            cuda.syncthreads()
            # P x V: each group accumulates its keys for every head
            for r in range(GR):
                alpha = alpha_sh[r]
                for e in range(EPV):
                    acc[r * EPV + e] = o_red[np.uint64(red + r * D + e * TG)] * alpha
            for jb in range(0, nc, NG):
                j = np.int32(jb + gi)
                if j < nc:
                    w0, w1, w2, w3 = ld4(vc, rowbase[np.uint64(j)] + loff)
                    widen4(kv, 0, w0, w1, w2, w3, np.float32(1.0))
                    for r in range(GR):
                        pr = logits[np.uint64(r * CH + j)]
                        for e in range(EPV):
                            acc[r * EPV + e] += pr * kv[e]
            for r in range(GR):
                for e in range(EPV):
                    o_red[np.uint64(red + r * D + e * TG)] = acc[r * EPV + e]
            cuda.syncthreads()
        # the groups' accumulators meet in shared memory (element e of lane li at e*TG + li)
        for k in range(RPW):
            r = warp + k * NW
            if r < GR and lane == 0:
                ml_sh[2 * r] = m_reg[k]
                ml_sh[2 * r + 1] = l_reg[k]
        cuda.syncthreads()
        for idx in range(tid, GR * WPR, NT):
            r = np.int32(idx >> (LOG_TG + 2))
            wd = np.int32(idx & (WPR - 1))
            d0 = np.int32(wd * epw)
            pos = np.int32(r * D + (d0 & (EPV - 1)) * TG + (d0 >> LOG_EPV))
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for g in range(NG):
                s0 += o_red[np.uint64(g * ORP + pos)]
                if epw == 2:
                    s1 += o_red[np.uint64(g * ORP + pos + TG)]
            hd = np.int32(head0 + r)
            if g0 + r < GROUP:
                if slot < 0:
                    inv = np.float32(1.0) / ml_sh[2 * r + 1]
                    out[np.uint64(t * os_ + hd * WPR + wd)] = pack(s0 * inv, s1 * inv)
                else:
                    pb = np.int32(slot * HQ + hd)
                    o_part[pb * D + d0] = s0
                    if epw == 2:
                        o_part[pb * D + d0 + 1] = s1
                    if wd == 0:
                        ml_part[2 * pb] = ml_sh[2 * r]
                        ml_part[2 * pb + 1] = ml_sh[2 * r + 1]

    return decode


def merge_source(fmt: str, head_dim: int, hkv: int, group: int) -> Callable:
    """The merge kernel: block (entry, query head), one thread per word, combines partials."""
    epw, _, pack = FORMATS[fmt]
    D = head_dim
    WPR = words_per_row(fmt, head_dim)
    HQ = hkv * group

    def merge(merges, o_part, ml_part, out, os_):
        e = np.int32(cuda.blockIdx.x) * MERGE
        t = merges[e]
        s0 = merges[e + 1]
        n = merges[e + 2]
        hd = np.int32(cuda.blockIdx.y)
        top = NEG
        for i in range(n):
            top = max(top, ml_part[np.uint64(2 * ((s0 + i) * HQ + hd))])
        wd = np.int32(cuda.threadIdx.x)  # the block has one thread per word of a row
        tot = np.float32(0.0)
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        for i in range(n):
            pb = np.int32((s0 + i) * HQ + hd)
            w = math.exp2(ml_part[np.uint64(2 * pb)] - top)
            tot += w * ml_part[np.uint64(2 * pb + 1)]
            a0 += w * o_part[np.uint64(pb * D + wd * epw)]
            if epw == 2:
                a1 += w * o_part[np.uint64(pb * D + wd * epw + 1)]
        inv = np.float32(1.0) / tot
        out[np.uint64(t * os_ + hd * WPR + wd)] = pack(a0 * inv, a1 * inv)

    return merge
