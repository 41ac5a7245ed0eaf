"""Device primitives of the CUDA kernels, each with a twin that Numba's CUDA simulator can run.

Why they exist: Numba has no 16-byte vector load, no bfloat16 type, and 32-bit integer
arithmetic that its typing widens to 64 bits. So:
- `ld4`/`st4` move four 32-bit words (16 bytes) with one `ld.global.nc.v4`/`st.global.v4`;
- the KV pool travels as 32-bit words; `lo`/`hi` widen the two 16-bit halves of a word to
  float32 (bfloat16 by shifting into the high half, float16 with `cvt.f32.f16`), and `pack`
  narrows two float32 back into one word;
- `shfl_xor` is the warp shuffle; the simulator has none, so its twin exchanges values through
  a per-warp Python barrier (the kernels call it warp-uniformly, as the hardware requires too),
  and `syncwarp` likewise.
Under NUMBA_ENABLE_CUDASIM=1 the names below are plain Python functions with the same
behaviour; on a GPU they are inline device functions and intrinsics. A kernel picks its
storage format's helpers from `FORMATS`.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)
NEG = np.float32(-1e30)  # finite "minus infinity" (fastmath assumes no infs)
LOG2E = 1.4426950408889634
FULL_MASK = 0xFFFFFFFF

if SIMULATOR:
    import sys

    from numba.cuda.simulator import kernelapi as _kernelapi

    _SHARED_LOCK = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        """The simulator's `cuda.shared.array` finds a block's array by the caller's line with
        an unlocked get-then-set, so two threads arriving together could each make their own
        "shared" array. The same lookup, under a lock (static arrays only: ours)."""
        if alignment is not None or shape == 0:
            raise RuntimeError("only static, unaligned shared arrays are simulated here")
        if not isinstance(dtype, np.dtype) and not isinstance(dtype, type):
            from numba.np import numpy_support

            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with _SHARED_LOCK:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    _kernelapi.FakeCUDAShared.array = _shared_array

    class _Warp:
        """A simulated warp: a barrier over its live lanes and the values its shuffles posted."""

        def __init__(self, lanes: int):
            self.barrier = threading.Barrier(lanes)
            self.lock = threading.Lock()
            self.posted: dict[tuple[int, int], tuple[threading.Event, list]] = {}

        def slot(self, call: int, lane: int) -> tuple[threading.Event, list]:
            with self.lock:
                found = self.posted.get((call, lane))
                if found is None:
                    found = self.posted[(call, lane)] = (threading.Event(), [None])
                return found

    _WARPS: dict[tuple, _Warp] = {}
    _WARPS_LOCK = threading.Lock()

    def _warp() -> tuple[threading.Thread, int, _Warp]:
        """This simulated thread, its lane and its warp."""
        th = threading.current_thread()
        bx, by, bz = th._manager._block_dim
        warp = th.thread_id // 32
        key = (id(th._manager), tuple(th.blockIdx), warp)
        with _WARPS_LOCK:
            found = _WARPS.get(key)
            if found is None:
                found = _WARPS[key] = _Warp(min(32, bx * by * bz - 32 * warp))
        return th, th.thread_id % 32, found

    def reset_simulated_warps() -> None:
        """Forget the warps of finished launches (called after every simulated launch)."""
        with _WARPS_LOCK:
            _WARPS.clear()

    def shfl_xor(value, lane_mask):
        """Post this lane's value for its n-th shuffle, wait for the partner lane's n-th."""
        th, lane, warp = _warp()
        call = getattr(th, "_pensieve_shuffles", 0)
        th._pensieve_shuffles = call + 1
        mine, box = warp.slot(call, lane)
        box[0] = value
        mine.set()
        theirs, other = warp.slot(call, lane ^ lane_mask)
        if not theirs.wait(timeout=120):
            raise RuntimeError("simulated shuffle: the partner lane never arrived")
        return other[0]

    def syncwarp():
        warp = _warp()[2]
        warp.barrier.wait(timeout=120)

    def ld4(arr, i):
        return arr[i], arr[i + 1], arr[i + 2], arr[i + 3]

    def st4(arr, i, w0, w1, w2, w3):
        arr[i], arr[i + 1], arr[i + 2], arr[i + 3] = w0, w1, w2, w3

    def i32_as_f32(bits):
        return np.int32(bits).view(np.float32)

    def f32_as_i32(x):
        return np.float32(x).view(np.int32)

    def _f16_unpack(w):
        halves = np.array([int(w) & 0xFFFF, (int(w) >> 16) & 0xFFFF], dtype=np.uint16)
        lo, hi = halves.view(np.float16).astype(np.float32)
        return lo, hi

    def f32_to_f16_bits(x):
        return np.int32(np.float16(x).view(np.uint16))

    def _bf16_lo(w):
        return np.float32(np.uint32((int(w) & 0xFFFF) << 16).view(np.float32))

    def _bf16_hi(w):
        return np.float32(np.uint32(int(w) & 0xFFFF0000).view(np.float32))

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    def reset_simulated_warps() -> None:
        """Nothing to forget on a real GPU."""

    def _word_pointer(context, builder, arrty, arr, idxty, idx):
        ary = context.make_array(arrty)(context, builder, value=arr)
        i64 = context.cast(builder, idx, idxty, types.int64)
        return builder.gep(ary.data, [i64])

    def _is_word_array(arr) -> bool:
        return isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.int32

    @intrinsic
    def ld4(typingctx, arr, idx):
        """Four int32 words from arr[idx:idx+4] (16-byte aligned) in one non-coherent load."""
        if not (_is_word_array(arr) and isinstance(idx, types.Integer)):
            return None
        sig = types.UniTuple(types.int32, 4)(arr, idx)

        def codegen(context, builder, sig, args):
            ptr = _word_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([i32] * 4), [ptr.type])
            asm = ir.InlineAsm(
                fnty,
                "{ .reg .u64 g; cvta.to.global.u64 g, $4; "
                "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [g]; }",
                "=r,=r,=r,=r,l",
            )
            res = builder.call(asm, [ptr])
            vals = [builder.extract_value(res, k) for k in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    @intrinsic
    def st4(typingctx, arr, idx, w0, w1, w2, w3):
        """Store four int32 words at arr[idx:idx+4] (16-byte aligned) in one vector store."""
        if not (_is_word_array(arr) and isinstance(idx, types.Integer)):
            return None
        sig = types.void(arr, idx, w0, w1, w2, w3)

        def codegen(context, builder, sig, args):
            ptr = _word_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            words = [
                context.cast(builder, v, t, types.int32)
                for v, t in zip(args[2:], sig.args[2:], strict=True)
            ]
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32, i32])
            asm = ir.InlineAsm(
                fnty,
                "{ .reg .u64 g; cvta.to.global.u64 g, $0; "
                "st.global.v4.u32 [g], {$1, $2, $3, $4}; }",
                "l,r,r,r,r,~{memory}",
            )
            builder.call(asm, [ptr, *words])

        return sig, codegen

    @intrinsic
    def _f16x2_to_f32(typingctx, word):
        """Both float16 halves of an int32 word -> (low, high) float32, in one asm block."""
        sig = types.UniTuple(types.float32, 2)(word)

        def codegen(context, builder, sig, args):
            w = context.cast(builder, args[0], sig.args[0], types.int32)
            f32 = ir.FloatType()
            fnty = ir.FunctionType(ir.LiteralStructType([f32, f32]), [ir.IntType(32)])
            text = "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }"
            res = builder.call(ir.InlineAsm(fnty, text, "=f,=f,r"), [w])
            pair = [builder.extract_value(res, k) for k in range(2)]
            return context.make_tuple(builder, sig.return_type, pair)

        return sig, codegen

    @intrinsic
    def _cvt_f32_f16(typingctx, x):
        """float32 -> float16 bits (round to nearest even) in the low half of an int32."""
        sig = types.int32(x)

        def codegen(context, builder, sig, args):
            f = context.cast(builder, args[0], sig.args[0], types.float32)
            fnty = ir.FunctionType(ir.IntType(16), [ir.FloatType()])
            half = builder.call(ir.InlineAsm(fnty, "cvt.rn.f16.f32 $0, $1;", "=h,f"), [f])
            return builder.zext(half, ir.IntType(32))

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def shfl_xor(value, lane_mask):
        return cuda.shfl_xor_sync(FULL_MASK, value, lane_mask)

    @cuda.jit(device=True, inline=True)
    def syncwarp():
        cuda.syncwarp(FULL_MASK)

    @cuda.jit(device=True, inline=True)
    def i32_as_f32(bits):
        return libdevice.int_as_float(bits)

    @cuda.jit(device=True, inline=True)
    def f32_as_i32(x):
        return libdevice.float_as_int(x)

    @cuda.jit(device=True, inline=True)
    def _f16_unpack(w):
        return _f16x2_to_f32(w)

    @cuda.jit(device=True, inline=True)
    def f32_to_f16_bits(x):
        return _cvt_f32_f16(x)

    @cuda.jit(device=True, inline=True)
    def _bf16_lo(w):
        return libdevice.int_as_float(np.int32(w << 16))

    @cuda.jit(device=True, inline=True)
    def _bf16_hi(w):
        return libdevice.int_as_float(np.int32(w & -65536))


@cuda.jit(device=True, inline=True)
def _f32_unpack(w):
    return i32_as_f32(w), np.float32(0.0)  # a float32 word holds one element


@cuda.jit(device=True, inline=True)
def _bf16_unpack(w):
    return _bf16_lo(w), _bf16_hi(w)


@cuda.jit(device=True, inline=True)
def _f32_pack(a, b):
    return f32_as_i32(a)


@cuda.jit(device=True, inline=True)
def _f16_pack(a, b):
    return np.int32(f32_to_f16_bits(a) | (f32_to_f16_bits(b) << 16))


@cuda.jit(device=True, inline=True)
def _bf16_bits(x):
    """float32 -> bfloat16 bits in the low half of an int32, round to nearest even."""
    if x != x:
        return np.int32(0x7FC0)
    u = np.int64(f32_as_i32(x)) & 0xFFFFFFFF
    return np.int32(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)


@cuda.jit(device=True, inline=True)
def _bf16_pack(a, b):
    return np.int32(_bf16_bits(a) | (np.int64(_bf16_bits(b)) << 16) & 0xFFFFFFFF)


# storage format -> (elements per 32-bit word, word -> (low, high) float32, pack a pair)
FORMATS = {
    "float32": (1, _f32_unpack, _f32_pack),
    "float16": (2, _f16_unpack, _f16_pack),
    "bfloat16": (2, _bf16_unpack, _bf16_pack),
}


def log2_exact(n: int, what: str) -> int:
    """log2 of a power of two; the kernels replace divisions by shifts with it."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")
    return n.bit_length() - 1
