"""The multi-query attention kernel: prefill, recompute and any sequence with several queries.

A block serves one tile of `queries` consecutive query rows of one sequence for one KV head and
`heads` query heads of its group, so one staged K/V tile feeds every (query, head) row of the
block. Each row is served by `lanes` lanes, each owning 16 of its elements (words w*lanes + li,
so neighbouring lanes read neighbouring shared-memory words): the query slice and the float32
accumulator stay in registers. Per key tile the block stages `key_tile` K and V rows with
16-byte loads into shared memory as raw words, rows padded by one word against bank conflicts;
scores are lane partials summed by warp shuffles, kept in a padded shared row per (query, head),
and the online softmax rescales once per tile. Two block barriers per tile, none per key.
Keys past a row's causal limit or its context are masked; past the tile's last needed key K/V
are zero, so a masked key never multiplies garbage. A tile may cover one partition of the keys
(split-KV, `cuda_plan`): it then writes each row's float32 partial and (max, sum) for the merge
kernel instead of the normalised output. Shapes are compile-time constants, index
math 32-bit, divisions shifts or constant multiplies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numba import cuda

from .cuda_plan import TILE, prefill_geometry, words_per_row
from .cuda_prims import FORMATS, NEG, ld4, log2_exact, shfl_xor, syncwarp


def prefill_source(
    fmt: str, head_dim: int, block_size: int, hkv: int, group: int, threads: int, key_tile: int
) -> Callable:
    """The multi-query kernel's Python function with every shape closed over as a constant."""
    epw, unpack, pack = FORMATS[fmt]
    geo = prefill_geometry(fmt, head_dim, group, threads)
    WPR = words_per_row(fmt, head_dim)
    WL = geo.words_per_lane
    TL = geo.lanes
    LOG_TL = log2_exact(TL, "lanes per row")
    DL = WL * epw  # elements per lane
    GRP = geo.heads
    QROWS = geo.queries * GRP  # rows that hold a (query, head); the rest idle
    NSLICES = geo.slices
    GROUP = group
    NT = threads
    KT = key_tile
    VPK = WPR // 4  # 16-byte vectors per key
    LOG_VPK = log2_exact(VPK, "vectors per key")
    SPT = -(-KT * VPK // NT)  # staging vectors per thread
    PITCH = WPR + 1  # padded shared row of one key
    SP = KT + 1  # padded shared row of one (query, head)'s scores
    LOG_BS = log2_exact(block_size, "block size")
    BS_MASK = block_size - 1
    ROW_WORDS = hkv * WPR
    D = head_dim
    HQ = hkv * group
    KSH = KT * PITCH
    SSH = geo.rows * SP

    def prefill(q, qs, kc, vc, tables, tw, tiles, pos, ctx, out, os_, o_part, ml_part, scale):
        k_sh = cuda.shared.array(KSH, np.int32)
        v_sh = cuda.shared.array(KSH, np.int32)
        s_sh = cuda.shared.array(SSH, np.float32)
        qf = cuda.local.array(DL, np.float32)
        acc = cuda.local.array(DL, np.float32)
        tid = np.int32(cuda.threadIdx.x)
        r = tid >> LOG_TL
        li = tid & (TL - 1)
        qi = np.int32(r // GRP)
        tile = np.int32(cuda.blockIdx.x) * TILE
        b = tiles[tile]
        row0 = tiles[tile + 1]
        nq = tiles[tile + 2]
        kbegin = tiles[tile + 3]
        kend = tiles[tile + 4]
        slot0 = tiles[tile + 5]
        sstride = tiles[tile + 6]
        y = np.int32(cuda.blockIdx.y)
        h = np.int32(y // NSLICES)
        g = np.int32((y - h * NSLICES) * GRP + r - qi * GRP)
        active = r < QROWS and qi < nq and g < GROUP
        t = np.int32(row0 + min(qi, nq - 1))
        hd = np.int32(h * GROUP + min(g, GROUP - 1))
        lim = np.int32(min(pos[np.uint64(t)] + 1, ctx[np.uint64(b)])) if active else np.int32(0)
        qb = np.int32(t * qs + hd * WPR + li)
        for w in range(WL):
            word = q[np.uint64(qb + w * TL)]
            a, c = unpack(word)
            if epw == 2:
                qf[2 * w] = a * scale
                qf[2 * w + 1] = c * scale
            else:
                qf[w] = a * scale
        for i in range(DL):
            acc[i] = np.float32(0.0)
        m = NEG
        den = np.float32(0.0)
        tb = np.int32(b * tw)
        hoff = np.int32(h * WPR)
        for k0 in range(kbegin, kend, KT):
            nk = np.int32(min(KT, kend - k0))
            for i in range(SPT):
                vi = np.int32(tid + i * NT)
                j = vi >> LOG_VPK
                c4 = np.int32((vi & (VPK - 1)) * 4)
                if j < KT:
                    w0 = w1 = w2 = w3 = np.int32(0)
                    x0 = x1 = x2 = x3 = np.int32(0)
                    if j < nk:
                        p = np.int32(k0 + j)
                        blk = tables[np.uint64(tb + (p >> LOG_BS))]
                        slot = np.int32(blk * block_size + (p & BS_MASK))
                        base = np.int32(slot * ROW_WORDS + hoff + c4)
                        w0, w1, w2, w3 = ld4(kc, base)
                        x0, x1, x2, x3 = ld4(vc, base)
                    o = np.int32(j * PITCH + c4)
                    k_sh[np.uint64(o)] = w0
                    k_sh[np.uint64(o + 1)] = w1
                    k_sh[np.uint64(o + 2)] = w2
                    k_sh[np.uint64(o + 3)] = w3
                    v_sh[np.uint64(o)] = x0
                    v_sh[np.uint64(o + 1)] = x1
                    v_sh[np.uint64(o + 2)] = x2
                    v_sh[np.uint64(o + 3)] = x3
            cuda.syncthreads()
            mx = NEG
            for j in range(nk):
                kb = np.uint64(j * PITCH + li)
                s = np.float32(0.0)
                for w in range(WL):
                    word = k_sh[kb + np.uint64(w * TL)]
                    a, c = unpack(word)
                    if epw == 2:
                        s += qf[2 * w] * a + qf[2 * w + 1] * c
                    else:
                        s += qf[w] * a
                for step in range(LOG_TL):
                    s += shfl_xor(s, TL >> (step + 1))
                if k0 + j >= lim:
                    s = NEG
                mx = max(mx, s)
                if li == 0:
                    s_sh[np.uint64(r * SP + j)] = s
            syncwarp()
            mnew = max(m, mx)
            alpha = math.exp2(m - mnew)
            den *= alpha
            for i in range(DL):
                acc[i] *= alpha
            for j in range(nk):
                pj = np.float32(0.0)
                if k0 + j < lim:
                    pj = math.exp2(s_sh[np.uint64(r * SP + j)] - mnew)
                den += pj
                vb = np.uint64(j * PITCH + li)
                for w in range(WL):
                    word = v_sh[vb + np.uint64(w * TL)]
                    a, c = unpack(word)
                    if epw == 2:
                        acc[2 * w] += pj * a
                        acc[2 * w + 1] += pj * c
                    else:
                        acc[w] += pj * a
            m = mnew
            cuda.syncthreads()
        if active and slot0 >= 0:  # one partition: the unnormalised partial, (max, sum)
            pb = np.int32((slot0 + qi * sstride) * HQ + hd)
            eb = np.int32(pb * D + li * epw)
            for w in range(WL):
                e = np.uint64(eb + w * TL * epw)
                if epw == 2:
                    o_part[e] = acc[2 * w]
                    o_part[e + np.uint64(1)] = acc[2 * w + 1]
                else:
                    o_part[e] = acc[w]
            if li == 0:
                ml_part[np.uint64(2 * pb)] = m
                ml_part[np.uint64(2 * pb + 1)] = den
        elif active:
            inv = np.float32(1.0) / den
            ob = np.int32(t * os_ + hd * WPR + li)
            for w in range(WL):
                if epw == 2:
                    out[np.uint64(ob + w * TL)] = pack(acc[2 * w] * inv, acc[2 * w + 1] * inv)
                else:
                    out[np.uint64(ob + w * TL)] = pack(acc[w] * inv, np.float32(0.0))

    return prefill
