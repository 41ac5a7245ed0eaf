"""The paged attention backend: the model's attention on the device tier's KV pool.

The step's metadata is built once (`StepMetadata.build`, on the host, then copied), and so is
the kernels' per-step state, at the first layer (on CPU `SlotWriter` and `CpuStep`: slots,
numpy views, which sequences take which path; on CUDA `CudaStep`: work lists, Numba views,
split-KV scratch); every layer reuses it. Argument
validation of the kernels runs only in debug mode (PENSIEVE_KERNEL_DEBUG=1 or `debug=True`),
then on every layer; `StepMetadata.build` always checks what it derives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pensieve.block_allocator import KVPool
from pensieve.kernels._args import check_paged_attention, check_write_kv
from pensieve.kernels.cpu_attention import CpuStep, SlotWriter
from pensieve.kernels.cuda_plan import LaunchConfig
from pensieve.messages import SequenceRows

if TYPE_CHECKING:
    from pensieve.kernels.cuda_attention import CudaStep


def kernel_debug() -> bool:
    """Whether PENSIEVE_KERNEL_DEBUG asks for every layer's kernel arguments to be checked."""
    return os.environ.get("PENSIEVE_KERNEL_DEBUG", "") not in ("", "0")


@dataclass
class StepMetadata:
    """Where each of the step's tokens writes its KV and what each sequence's queries read."""

    slot_mapping: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    sample_rows: torch.Tensor  # [S] int64: the last row of each sequence that samples
    # (query_start, positions, context_lens) as host lists: the CUDA kernels plan from them
    host: tuple[list[int], list[int], list[int]] | None = None
    # sample_rows is every row in order (a decode batch): the logits need no gather
    samples_every_row: bool = False

    @classmethod
    def build(cls, rows: list[SequenceRows], block_size: int, device: torch.device) -> StepMetadata:
        """Tensors for a step's rows, from plain lists made in one pass over the tokens.

        Why lists: this runs after the step before it has streamed the weights through the
        caches, where every numpy or torch call on a small array cost ~5 us (2-core Zen 4: a
        one-row step's metadata 184 us cold, 37 warm, when built with ~30 array operations).
        """
        width = max((len(r.block_table) for r in rows), default=1) or 1
        table = [r.block_table + [-1] * (width - len(r.block_table)) for r in rows]
        starts, positions, slots, sample_rows = [0], [], [], []
        for r in rows:
            blocks = r.block_table
            for p in r.positions:
                chunk = p // block_size
                if chunk >= len(blocks):
                    raise ValueError("a position lies past its sequence's block table")
                if blocks[chunk] < 0:
                    raise ValueError(f"request {r.request_id}: position {p} is not on device")
                slots.append(blocks[chunk] * block_size + p % block_size)
            positions += r.positions
            starts.append(starts[-1] + len(r.tokens))
            if r.sample:
                sample_rows.append(starts[-1] - 1)
        host_ctx = [r.context_len for r in rows]

        def tensor(values: list, dtype: np.dtype) -> torch.Tensor:
            t = torch.from_numpy(np.array(values, dtype=dtype))
            return t if device.type == "cpu" else t.to(device)

        return cls(
            slot_mapping=tensor(slots, np.int64),
            positions=tensor(positions, np.int32),
            block_tables=tensor(table, np.int32).view(len(rows), width),
            query_start=tensor(starts, np.int32),
            context_lens=tensor(host_ctx, np.int32),
            sample_rows=tensor(sample_rows, np.int64),
            host=(starts, positions, host_ctx),
            samples_every_row=sample_rows == list(range(starts[-1])),
        )


@dataclass
class CpuLayerArrays:
    """The pool and one step's attention arguments as `kernels.cpu_decoder` takes them."""

    keys: np.ndarray  # [layers, blocks, block size, KV heads, head dim] bfloat16 bits
    values: np.ndarray
    slots: np.ndarray  # [T] int64: each row's slot
    attention: tuple  # `CpuStep.bf16_kernel_args`
    wait_for_layer: Callable[[int], None] | None


class PagedAttentionBackend:
    """Writes each layer's new K/V into its slots, then attends through the block tables.

    `wait_for_layer(i)` blocks until layer i's restored KV has arrived (pipelined swap-in):
    layer i's attention waits only for layer i's copy. `cuda_kernels` forces the CUDA kernels
    on or off (default: by the pool's device; the simulator tests force them on CPU tensors).
    `deterministic` asks for the kernels' batch-invariant order (`kernels.paged_attention`).
    """

    def __init__(
        self,
        pool: KVPool,
        meta: StepMetadata,
        wait_for_layer: Callable[[int], None] | None = None,
        *,
        debug: bool | None = None,
        cuda_kernels: bool | None = None,
        cuda_config: LaunchConfig | None = None,
        deterministic: bool = False,
    ):
        self.pool = pool
        self.deterministic = deterministic
        self.meta = meta
        self.wait_for_layer = wait_for_layer
        self.debug = kernel_debug() if debug is None else debug
        self.cuda_kernels = pool.keys.is_cuda if cuda_kernels is None else cuda_kernels
        self.cuda_config = cuda_config  # None: the kernels' default launch shape
        self._cuda_step: CudaStep | None = None  # built at the first layer
        self._cpu_step: tuple[SlotWriter, CpuStep] | None = None  # likewise

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.wait_for_layer is not None:
            self.wait_for_layer(layer)
        k_cache, v_cache = self.pool.keys[layer], self.pool.values[layer]
        m = self.meta
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self.debug:
            check_write_kv(k, v, k_cache, v_cache, m.slot_mapping)
            args = (m.block_tables, m.query_start, m.positions, m.context_lens, scale)
            check_paged_attention(q, k_cache, v_cache, *args)
        if self.cuda_kernels:
            step = self._cuda_step or self._build_cuda_step(q, k_cache)
            step.write_kv(k, v, k_cache, v_cache)
            return step.attention(q, k_cache, v_cache, scale)
        writer, step = self._cpu_kernels()
        writer.write(k, v, k_cache, v_cache)
        return step.attention(q, k_cache, v_cache, scale)

    def _cpu_kernels(self) -> tuple[SlotWriter, CpuStep]:
        """The CPU kernels' state for this step, built at the first layer."""
        if self._cpu_step is None:
            m = self.meta
            impl = "numba" if self.deterministic else "auto"
            self._cpu_step = (
                SlotWriter(m.slot_mapping),
                CpuStep(m.block_tables, m.query_start, m.positions, m.context_lens, impl=impl),
            )
        return self._cpu_step

    def cpu_layer_arrays(self, q_heads: int, head_dim: int) -> CpuLayerArrays | None:
        """What `kernels.cpu_decoder` needs to write and attend on this step's pool in its own
        loop (`pensieve.cpu_decoder`); None where the step is not for it: a CUDA pool, debug
        checks on, or a sequence that the `vdpbf16ps` kernel does not take."""
        if self.cuda_kernels or self.debug:
            return None
        keys, values = self.pool.keys, self.pool.values
        writer, step = self._cpu_kernels()
        scale = 1.0 / math.sqrt(head_dim)
        attention = step.bf16_kernel_args(q_heads, head_dim, keys[0], scale)
        if attention is None or not keys.is_contiguous() or not values.is_contiguous():
            return None
        bits = (keys.view(torch.uint16).numpy(), values.view(torch.uint16).numpy())
        return CpuLayerArrays(*bits, writer.slot_array, attention, self.wait_for_layer)

    def _build_cuda_step(self, q: torch.Tensor, k_cache: torch.Tensor) -> CudaStep:
        """The CUDA kernels' state for this step: plans and conversions done once."""
        from pensieve.kernels.cuda_attention import CudaStep  # imports numba.cuda: only here

        m = self.meta
        host = m.host
        if host is None:  # metadata built elsewhere: one small device-to-host copy
            host = (m.query_start.tolist(), m.positions.tolist(), m.context_lens.tolist())
        self._cuda_step = CudaStep(
            k_cache,
            q.shape[1],
            m.block_tables,
            m.positions,
            m.context_lens,
            host,
            slot_mapping=m.slot_mapping,
            config=self.cuda_config,
        )
        return self._cuda_step
