"""Loading a model for serving, and profiling its chunk recompute cost on this machine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pensieve.attention import ContiguousKV
from pensieve.compute_thread import on_compute_thread
from pensieve.config import EngineConfig
from pensieve.cuda_setup import ensure_cuda_kernels
from pensieve.linear import pack_for_cpu
from pensieve.model import LlamaForCausalLM, build_model, pick_device, pick_dtype
from pensieve.policy import CostModel
from pensieve.quantize import quantize_int8
from pensieve.tokenizer import ChatTokenizer
from pensieve.weights import load_config, load_state_dict, resolve_model


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: ChatTokenizer
    folder: Path
    load_seconds: float

    @property
    def name(self) -> str:
        return self.model.config.name

    @property
    def max_context(self) -> int:
        return self.model.config.max_position_embeddings


def load_pretrained(config: EngineConfig) -> LoadedModel:
    """Resolve, load and validate the model and tokenizer named by `config.model`, on the
    compute thread (see `pensieve.compute_thread`: the thread that converts the weights with
    torch's threads would otherwise keep a second OpenMP team alive and slow every step).

    On a CUDA device it first checks that the attention kernels can be compiled there
    (ModelLoadError naming the CUDA extra to install otherwise)."""
    return on_compute_thread(_load_pretrained, config)


def _load_pretrained(config: EngineConfig) -> LoadedModel:
    started = time.perf_counter()
    device = pick_device(config.device)
    if device.type == "cuda":  # fail in one clear line before loading anything
        ensure_cuda_kernels(device)
    folder = resolve_model(config.model, cache_dir=config.cache_dir)
    dtype = pick_dtype(config.dtype, device)
    model_config = load_config(folder)
    state = load_state_dict(folder, model_config, dtype, device)
    model = build_model(model_config, state, dtype, device)
    if config.quantize == "int8":
        quantize_int8(model)
    pack_for_cpu(model)
    tokenizer = ChatTokenizer.from_folder(folder)
    return LoadedModel(model, tokenizer, folder, time.perf_counter() - started)


def profile_chunk_cost(
    model: LlamaForCausalLM, chunk_tokens: int, max_context: int, repeats: int = 2
) -> CostModel:
    """Time the forward of one chunk after l cached tokens, for l = 0 and powers of two.

    This is Cost(l) of the retention value: a constant part (the MLPs and projections) plus
    attention that grows with l. Timed on the compute thread, where steps run.
    """
    return on_compute_thread(_profile_chunk_cost, model, chunk_tokens, max_context, repeats)


def _profile_chunk_cost(
    model: LlamaForCausalLM, chunk_tokens: int, max_context: int, repeats: int
) -> CostModel:
    cfg = model.config
    device = model.device

    def time_at(context: int) -> float:
        """Best of `repeats` timed forwards of one chunk after `context` random cached tokens."""
        kv = ContiguousKV(cfg.num_hidden_layers)
        if context:
            shape = (context, cfg.num_key_value_heads, cfg.head_dim)
            kv.keys = [torch.randn(shape, dtype=model.dtype, device=device)] * cfg.num_hidden_layers
            kv.values = list(kv.keys)
        ids = torch.zeros(chunk_tokens, dtype=torch.long, device=device)
        pos = torch.arange(context, context + chunk_tokens, device=device)
        best = float("inf")
        for _ in range(repeats):
            probe = ContiguousKV(cfg.num_hidden_layers)
            probe.keys, probe.values = list(kv.keys), list(kv.values)
            started = time.perf_counter()
            model(ids, pos, probe)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - started)
        return best

    time_at(0)  # warm-up: first calls pay for allocator and kernel initialisation
    return CostModel.profile(time_at, max_context)
