"""The model's decoder layers as one Numba loop (`kernels.cpu_decoder`) for CPU steps of up to
LOOP_ROWS rows.

`LlamaForCausalLM.forward` asks `layers_runner` first: where the step has at most LOOP_ROWS
bfloat16 rows on the paged CPU pool and every matmul of every layer runs on
`cpu_bf16_matmul` (oneDNN's bits), or at most FASTER_UP_TO_ROWS rows and every matmul on
`cpu_int8_torch_order` (`--quantize int8`, torch's bits), the layers run there; elsewhere
(float32, CUDA, the contiguous oracle, larger steps) through the modules. Both give the same
bits. Why it pays: kernels/cpu_decoder.py (one row), LOOP_ROWS below (hundreds).
PENSIEVE_CPU_DECODER=0 keeps every step on the modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from itertools import chain, repeat
from operator import is_
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba.typed import List

from pensieve.kernels.cpu_attention import CpuStep
from pensieve.kernels.cpu_bf16_matmul import FewRowsWeight
from pensieve.kernels.cpu_decoder import decoder_layers
from pensieve.kernels.cpu_int8 import TORCH_INT8_VECTORISED, Int8Weight
from pensieve.kernels.cpu_int8_torch_order import FASTER_UP_TO_ROWS
from pensieve.kernels.cpu_threads import numba_threads_as_torch
from pensieve.linear import Linear
from pensieve.paged import CpuLayerArrays, PagedAttentionBackend

if TYPE_CHECKING:
    from pensieve.block_allocator import KVPool
    from pensieve.model import LlamaForCausalLM

ENABLED = os.environ.get("PENSIEVE_CPU_DECODER", "1") != "0"
# Steps of up to this many bfloat16 rows run in the loop (the default step budget,
# `max_batch_tokens`), past `linear.FEW_ROWS` too: there its matmuls took 1.02-1.05x oneDNN's
# time (a layer's four at 512 rows; 1.01-1.08 at 1024-2048), but the loop saves the modules'
# per-op costs: a 512-token prefill took 0.89-0.91 of the modules' step, 24 decodes with a
# 256-token chunk 0.83-0.85 (median ratios of two runs of 4 alternating rounds in one process;
# 2-core Zen 5 EPYC).
# Above it, unmeasured, the modules (oneDNN) keep the step; the bits are the same either way.
LOOP_ROWS = 512
Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CpuDecoderWeights:
    """Numpy views of every layer's weights as `decoder_layers` takes them, no copies: the
    RMSNorm weights' own memory; each `Linear`'s `few_rows` blocks, or its int8 rows and scales
    (`Linear.prepared_int8`) where the model is quantized."""

    def __init__(self, model: LlamaForCausalLM, linears: list[Linear], int8: bool):
        config = model.config
        self.int8 = int8
        forms = [_form(linear, int8) for linear in linears]  # 4 a layer, in the loop's order
        norm_modules = _norm_modules(model)
        norm_weights = [n.weight for n in norm_modules]
        self.norms = List(_row_bits(w) for w in norm_weights)
        if int8:
            self.weights = (List(f.weight_array for f in forms),
                            List(f.scale_array for f in forms))  # fmt: skip
        else:
            chunks = np.array([f.chunk for f in forms], dtype=np.int64)
            self.weights = (List(f.blocks for f in forms), chunks)
        heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.shape = (heads, kv, d, config.intermediate_size)
        self.eps = np.float32(model.model.norm.eps)  # every norm's (`_weights_of`)
        self.layers = config.num_hidden_layers
        # what `current` compares: where each form and norm weight is looked up, and what
        # these views were taken from
        self._linear_dicts = [linear.__dict__ for linear in linears]
        self._norm_params = [n._parameters for n in norm_modules]
        self._taken = [*forms, *norm_weights]

    def current(self) -> bool:
        """Whether every `Linear` still has the weight form these views were taken from, and
        every RMSNorm its weight. Identity checks over lists made once (`Linear` drops both
        forms when its int8 weight is replaced, and `few_rows` with it): `_form` reads buffers
        through nn.Module's `__getattr__`, ~100 us a step for the 120 of them, and a Python
        loop over the 181 objects cost ~150 us cold (after the weights streamed through)."""
        name = "int8_weight" if self.int8 else "few_rows"
        forms = map(dict.get, self._linear_dicts, repeat(name))
        norms = map(dict.get, self._norm_params, repeat("weight"))
        return all(map(is_, chain(forms, norms), self._taken))


def _norm_modules(model: LlamaForCausalLM) -> list[torch.nn.Module]:
    """Every RMSNorm in the loop's order: each layer's two, then the final one."""
    layers = model.model.layers
    pairs = [(layer.input_layernorm, layer.post_attention_layernorm) for layer in layers]
    return [norm for pair in pairs for norm in pair] + [model.model.norm]


def _row_bits(weight: torch.Tensor) -> np.ndarray:
    """A bfloat16 norm weight [H] as its bits [1, H], sharing its memory."""
    return weight.detach().view(torch.uint16).view(1, -1).numpy()


def _form(linear: Linear, int8: bool) -> FewRowsWeight | Int8Weight | None:
    """The weight form of `linear` that `decoder_layers` takes, where it has one."""
    if not int8:
        return linear.few_rows if linear.qweight is None else None
    if linear.qweight is None or not TORCH_INT8_VECTORISED:
        return None
    prepared = linear.prepared_int8()
    return prepared if prepared.rows_as_torch else None


def _weights_of(model: LlamaForCausalLM) -> CpuDecoderWeights | None:
    """The model's `CpuDecoderWeights`, built once (again where a `Linear`'s weight changed);
    None where some layer does not fit `decoder_layers`."""
    cached = model.__dict__.get("_cpu_decoder")
    if cached is not None and cached.current():
        return cached
    config = model.config
    if config.head_dim not in (64, 128) or config.hidden_size % 16 or config.intermediate_size % 16:
        return None
    linears: list[Linear] = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears += (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    norms = [n.weight for n in _norm_modules(model)]
    if any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in norms):
        return None
    if len({n.eps for n in _norm_modules(model)}) != 1:  # the loop takes one eps
        return None
    int8 = linears[0].qweight is not None
    if any(_form(linear, int8) is None for linear in linears):
        return None
    if int8 and any(linear.tile_rows for linear in linears):
        return None  # --deterministic tiles them through torch's kernel, whose bits differ
    weights = CpuDecoderWeights(model, linears, int8)
    model.__dict__["_cpu_decoder"] = weights
    return weights


def layers_runner(model: LlamaForCausalLM, x: torch.Tensor, attn: object) -> Runner | None:
    """A function (x, cos, sin) -> the final hidden states (every layer, the final norm),
    where `decoder_layers` takes this step (see the module's docstring); else None."""
    rows = x.shape[0]
    if not ENABLED or x.dtype != torch.bfloat16 or x.device.type != "cpu" or rows == 0:
        return None
    if not isinstance(attn, PagedAttentionBackend):
        return None
    weights = _weights_of(model)
    if weights is None or rows > (FASTER_UP_TO_ROWS if weights.int8 else LOOP_ROWS):
        return None
    arrays = attn.cpu_layer_arrays(model.config.num_attention_heads, model.config.head_dim)
    if arrays is None or arrays.keys.shape[0] != weights.layers:  # a pool of another model
        return None
    return lambda x, cos, sin: run_layers(weights, arrays, x, cos, sin)


def run_layers(
    weights: CpuDecoderWeights,
    arrays: CpuLayerArrays,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """Every layer and the final norm on x [T, hidden]: one call, or one a layer where layers
    are still being restored (each waits for its own)."""
    x = x.contiguous()  # updated in place: the embedding's fresh rows
    normed = torch.empty_like(x)
    trig = (cos.contiguous().numpy(), sin.contiguous().numpy())
    layers = weights.layers
    threads = numba_threads_as_torch()
    with threads:
        step = (arrays.keys, arrays.values, arrays.slots, arrays.attention, threads.threads)
        wait = arrays.wait_for_layer
        spans = [(0, layers)] if wait is None else [(i, i + 1) for i in range(layers)]
        for first, end in spans:
            if wait is not None:
                wait(first)
            decoder_layers(x.view(torch.uint16).numpy(), first, end, *trig, weights.eps,
                           weights.shape, weights.norms, weights.weights, *step,
                           normed.view(torch.uint16).numpy(), int8=weights.int8)  # fmt: skip
    return normed


def warm_up(model: LlamaForCausalLM, pool: KVPool) -> None:
    """Compile `decoder_layers` for this model and pool (~2.5 s once the attention kernel is
    compiled) before a request needs it: one row over the pool's first block, nothing written
    (its slot is -1), the result dropped. A no-op where the model's steps do not take it."""
    if not ENABLED or model.dtype != torch.bfloat16 or pool.keys.dtype != torch.bfloat16:
        return
    weights = _weights_of(model)
    if weights is None or pool.keys.shape[0] != weights.layers:
        return
    heads, _, d, _ = weights.shape
    first_block, position = torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    starts, context = torch.tensor([0, 1], dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    step = CpuStep(first_block, starts, position, context)
    attention = step.bf16_kernel_args(heads, d, pool.keys[0], 1.0)
    if attention is None or not pool.keys.is_contiguous() or not pool.values.is_contiguous():
        return
    bits = (pool.keys.view(torch.uint16).numpy(), pool.values.view(torch.uint16).numpy())
    arrays = CpuLayerArrays(*bits, np.full(1, -1, dtype=np.int64), attention, None)
    with torch.inference_mode():
        x = model.model.embed_tokens(torch.zeros(1, dtype=torch.long, device=pool.keys.device))
    angle = torch.zeros(1, d // 2)
    run_layers(weights, arrays, x, angle.cos(), angle.sin())
