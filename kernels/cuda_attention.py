"""Host side of the Numba CUDA kernels: specialisation, conversion, and launches per step.

Kernels (`cuda_decode`, `cuda_prefill`, `cuda_write`) are generated per (storage format, head
dim, block size, KV heads, group size, launch shape) with every shape a compile-time constant,
compiled once with an explicit signature and cached. They see tensors as flat int32 words (so
bfloat16 and float16 travel as bits and load 16 bytes at a time) plus row strides in words.

`CudaStep` is what an engine step builds once: the work lists of `cuda_plan` copied to the
device in one buffer, the metadata and pool views converted for Numba, the split-KV scratch
and the stream; every layer then only converts its own q/k/v/out and launches. Under
NUMBA_ENABLE_CUDASIM=1 the same code runs the kernels in the simulator on CPU tensors (numpy
views); on a GPU it runs on torch's current stream.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import numpy as np
import torch
from numba import cuda

from ._args import check_paged_attention, check_write_kv
from .cuda_decode import decode_source, merge_source
from .cuda_launch import kernel_array, launch
from .cuda_plan import (
    AttentionPlan,
    LaunchConfig,
    check_head_dim,
    plan_attention,
    words_per_row,
)
from .cuda_prefill import prefill_source
from .cuda_prims import LOG2E, SIMULATOR, log2_exact
from .cuda_write import write_source

FORMAT_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_W = "int32[::1]"
_F = "float32[::1]"
SIGNATURES = {  # every kernel takes flat words, row strides in words, int32 metadata
    "decode": f"void({_W}, int32, {_W}, {_W}, {_W}, int32, {_W}, {_W}, int32, {_F}, {_F}, float32)",
    "merge": f"void({_W}, {_F}, {_F}, {_W}, int32)",
    "prefill": (
        f"void({_W}, int32, {_W}, {_W}, {_W}, int32, {_W}, {_W}, {_W}, {_W}, int32, {_F}, {_F}, "
        "float32)"
    ),
    "write_kv": f"void({_W}, int32, {_W}, int32, {_W}, {_W}, {_W}, int32)",
}
SOURCES: dict[str, Callable] = {
    "decode": decode_source,
    "merge": merge_source,
    "prefill": prefill_source,
    "write_kv": write_source,
}
DEFAULT_CONFIG = LaunchConfig()
WRITE_THREADS = 128


def kernel_specs(
    fmt: str, head_dim: int, block_size: int, hkv: int, group: int, config: LaunchConfig
) -> dict[str, tuple]:
    """name -> (kind, specialisation key) of every kernel a model of this shape launches."""
    shape = (fmt, head_dim, block_size, hkv, group)
    return {
        "decode": ("decode", *shape, config.decode_threads, config.chunk),
        "merge": ("merge", fmt, head_dim, hkv, group),
        "prefill": ("prefill", *shape, config.prefill_threads, config.key_tile),
        "write_kv": ("write_kv", fmt, head_dim, hkv, True),
    }


def jit_options(kind: str, key: tuple) -> dict:
    """Compiler options: the attention kernels are held to 4 resident blocks per SM (launch
    bounds), so at 128 threads ptxas keeps them within 128 registers; inspect checks no spills.
    Why it matters: on sm_8x every shuffle in a loop gets a divergence fallback whose call
    convention otherwise inflates register use past that (sm_90 needs no fallback)."""
    options = {"fastmath": True}
    if kind in ("decode", "prefill") and not SIMULATOR:  # the simulator takes no bounds
        options["launch_bounds"] = (key[5], 4)  # key[5]: threads per block
    return options


@functools.cache
def compiled(kind: str, *key) -> Callable:
    """The kernel for one specialisation, compiled (on first use) for its one signature."""
    return cuda.jit(SIGNATURES[kind], **jit_options(kind, key))(SOURCES[kind](*key))


def warm_up(dtype: torch.dtype, head_dim: int, block_size: int, hkv: int, group: int) -> None:
    """Compile every kernel a model of this shape launches (a few seconds; otherwise the first
    step pays it). Raises ValueError for shapes the kernels do not support."""
    fmt = FORMAT_NAMES[dtype]
    check_head_dim(fmt, head_dim)
    log2_exact(block_size, "block size")
    for kind, *key in kernel_specs(fmt, head_dim, block_size, hkv, group, DEFAULT_CONFIG).values():
        compiled(kind, *key)
    compiled("write_kv", fmt, head_dim, hkv, False)


def rows_as_words(x: torch.Tensor, align: int = 16) -> tuple[torch.Tensor, int]:
    """[T, H, D] with contiguous [H, D] rows -> (flat int32 words, row stride in words).

    Rows may be strided (q, k, v are views of fused projections); a tensor whose rows are not
    `align`-byte aligned is copied once.
    """
    esz = x.element_size()

    def aligned(y: torch.Tensor) -> bool:
        return (
            y.stride(2) == 1
            and y.stride(1) == y.shape[2]
            and (y.stride(0) * esz) % align == 0
            and y.data_ptr() % align == 0
        )

    if not aligned(x):
        x = x.contiguous()
    span = (x.shape[0] - 1) * x.stride(0) + x.shape[1] * x.shape[2]
    flat = x.as_strided((span,), (1,))
    words = flat.view(torch.int32) if esz == 4 else flat.view(torch.int16).view(torch.int32)
    return words, x.stride(0) * esz // 4


def pool_words(cache: torch.Tensor):
    """One layer's K or V pool as flat words for the kernels (a view: no copy)."""
    if not cache.is_contiguous() or cache.data_ptr() % 16:
        raise ValueError("the KV pool must be contiguous and 16-byte aligned")
    if cache.numel() * cache.element_size() // 4 >= 2**31:
        raise ValueError("one layer's KV pool exceeds 2**31 words (32-bit index math)")
    flat = cache.view(-1)
    words = flat.view(torch.int32) if cache.element_size() == 4 else flat.view(torch.int16)
    return kernel_array(words.view(torch.int32))


def device_context(device: torch.device):
    """Numba's context of the tensors' GPU (conversions and launches must use it)."""
    if SIMULATOR or device.type != "cuda":
        return contextlib.nullcontext()
    return cuda.gpus[device.index or 0]


def _torch_stream(device: torch.device):
    return cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class CudaStep:
    """One step's converted metadata, work lists and scratch, shared by every layer."""

    def __init__(
        self,
        k_cache: torch.Tensor,
        hq: int,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        context_lens: torch.Tensor,
        host: tuple[list[int], list[int], list[int]],
        slot_mapping: torch.Tensor | None = None,
        config: LaunchConfig | None = None,
    ):
        """`host` holds (query_start, query_positions, context_lens) as Python lists."""
        self.config = cfg = config or DEFAULT_CONFIG
        _, self.block_size, self.hkv, self.head_dim = k_cache.shape
        self.fmt = FORMAT_NAMES[k_cache.dtype]
        check_head_dim(self.fmt, self.head_dim)
        log2_exact(self.block_size, "block size")
        self.hq, self.group = hq, hq // self.hkv
        self.device = k_cache.device
        on_gpu = k_cache.is_cuda and not SIMULATOR
        sms = cfg.sms or (_sm_count(self.device.index or 0) if on_gpu else 132)
        self.plan: AttentionPlan = plan_attention(
            *host, fmt=self.fmt, head_dim=self.head_dim, hkv=self.hkv, group=self.group,
            config=cfg, sms=sms,
        )  # fmt: skip
        shape = (self.fmt, self.head_dim, self.block_size, self.hkv, self.group)
        self._specs = kernel_specs(*shape, cfg)
        with device_context(self.device):
            self.stream = _torch_stream(self.device) if on_gpu else None
            self._convert(block_tables, positions, context_lens, slot_mapping)

    def _convert(self, block_tables, positions, context_lens, slot_mapping) -> None:
        """The step's metadata and scratch as kernel arguments, once."""
        p = self.plan
        self._keep = [torch.from_numpy(p.packed()).to(self.device)]
        cuts = np.cumsum([0, p.decode_items.size, p.merges.size, p.prefill_tiles.size])
        self.items, self.merges, self.tiles = (
            self._int_array(self._keep[0][a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        )
        self.tables = self._int_array(block_tables.reshape(-1))
        self.table_width = np.int32(block_tables.shape[1])
        self.positions = self._int_array(positions)
        self.context_lens = self._int_array(context_lens)
        self.slots = None if slot_mapping is None else self._int_array(slot_mapping)
        scratch = max(1, p.slots * self.hq)
        f32 = {"dtype": torch.float32, "device": self.device}
        self.o_part = self._float_array(torch.empty(scratch * self.head_dim, **f32))
        self.ml_part = self._float_array(torch.empty(scratch * 2, **f32))

    @classmethod
    def from_tensors(
        cls,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        block_tables: torch.Tensor,
        query_start: torch.Tensor,
        query_positions: torch.Tensor,
        context_lens: torch.Tensor,
        config: LaunchConfig | None = None,
    ) -> CudaStep:
        """For one standalone call: fetches the small metadata to the host with one copy."""
        flat = torch.cat([query_start, query_positions, context_lens]).tolist()
        b, t = context_lens.shape[0], query_positions.shape[0]
        host = (flat[: b + 1], flat[b + 1 : b + 1 + t], flat[b + 1 + t :])
        return cls(k_cache, q.shape[1], block_tables, query_positions, context_lens, host,
                   config=config)  # fmt: skip

    def _int_array(self, t: torch.Tensor):
        t = t.to(device=self.device, dtype=torch.int32).contiguous()
        if t.numel() == 0:
            return None
        self._keep.append(t)
        return kernel_array(t)

    def _float_array(self, t: torch.Tensor):
        self._keep.append(t)
        return kernel_array(t)

    def _launch(self, name: str, grid: tuple, block: int, *args) -> None:
        kernel = compiled(*self._specs[name])
        launch(kernel, grid, block, self.stream, self.device.index or 0, args)

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Paged multi-input attention of one layer; returns [T, Hq, D] in q's dtype."""
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if q.shape[0] > 0:
            with device_context(self.device):
                self._attention(q, out, k_cache, v_cache, scale)
        return out

    def _attention(self, q, out, k_cache, v_cache, scale) -> None:
        qw, qs = rows_as_words(q)
        ow, os_ = rows_as_words(out)
        qa, oa = kernel_array(qw), kernel_array(ow)
        kc, vc = pool_words(k_cache), pool_words(v_cache)
        p, cfg = self.plan, self.config
        scale2 = np.float32(scale * LOG2E)
        qs, os_ = np.int32(qs), np.int32(os_)
        if len(p.decode_items):
            grid = (len(p.decode_items), self.hkv * p.decode_slices)
            self._launch(
                "decode", grid, cfg.decode_threads, qa, qs, kc, vc, self.tables,
                self.table_width, self.items, oa, os_, self.o_part, self.ml_part, scale2,
            )  # fmt: skip
        if len(p.prefill_tiles):
            grid = (len(p.prefill_tiles), self.hkv * p.prefill_slices)
            self._launch(
                "prefill", grid, cfg.prefill_threads, qa, qs, kc, vc, self.tables,
                self.table_width, self.tiles, self.positions, self.context_lens, oa, os_,
                self.o_part, self.ml_part, scale2,
            )  # fmt: skip
        if len(p.merges):  # after both: split decode rows and split prefill tiles
            threads = words_per_row(self.fmt, self.head_dim)  # one per word (at most 128)
            grid = (len(p.merges), self.hq)
            self._launch("merge", grid, threads, self.merges, self.o_part, self.ml_part, oa, os_)

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> None:
        """write_kv of one layer with this step's slot mapping."""
        if k.shape[0] == 0:
            return
        if self.slots is None:
            raise ValueError("this step was built without a slot mapping")
        with device_context(self.device):
            _write_kv(k, v, k_cache, v_cache, self.slots, self.stream)


def _write_kv(k, v, k_cache, v_cache, slots, stream) -> None:
    """Launch write_kv: one thread per 16-byte vector (or word, for unaligned rows)."""
    t = k.shape[0]
    fmt = FORMAT_NAMES[k_cache.dtype]
    _, _, hkv, d = k_cache.shape
    row_bytes = hkv * d * k_cache.element_size()
    vector = row_bytes % 16 == 0
    align = 16 if vector else 4
    kw, ks = rows_as_words(k, align)
    vw, vs = rows_as_words(v, align)
    units = t * (row_bytes // align)
    grid = (-(-units // WRITE_THREADS),)
    kernel = compiled("write_kv", fmt, d, hkv, vector)
    args = (kernel_array(kw), np.int32(ks), kernel_array(vw), np.int32(vs), pool_words(k_cache),
            pool_words(v_cache), slots, np.int32(t))  # fmt: skip
    launch(kernel, grid, WRITE_THREADS, stream, k_cache.device.index or 0, args)


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
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Paged multi-input attention with the CUDA kernels; see `pensieve.kernels.paged_attention`.

    A standalone call plans its own step (one small device-to-host copy); the engine builds a
    `CudaStep` once per step instead. `config` overrides the launch shape (the simulator tests
    keep it tiny).
    """
    if validate:
        check_paged_attention(
            q, k_cache, v_cache, block_tables, query_start, query_positions, context_lens, scale
        )
    if q.shape[0] == 0:
        return torch.empty_like(q)
    step = CudaStep.from_tensors(
        q, k_cache, block_tables, query_start, query_positions, context_lens, config
    )
    return step.attention(q, k_cache, v_cache, scale)


def write_kv_cuda(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """write_kv with the CUDA kernel: one thread per 16-byte vector of a token's K and V."""
    if validate:
        check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    slots = slot_mapping.to(torch.int32).contiguous()
    with device_context(k_cache.device):
        stream = None if SIMULATOR else _torch_stream(k_cache.device)
        _write_kv(k, v, k_cache, v_cache, kernel_array(slots), stream)
