"""A Llama-family decoder in plain PyTorch (Llama 1-3, Mistral, SmolLM2, TinyLlama).

Tokens come as one flat batch: every token carries its own position, and attention goes
through an `AttentionBackend`, so the same forward serves the contiguous oracle and the paged
engine (decode rows, prefill rows and recomputed ranges in one step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.attention import AttentionBackend
from pensieve.config import ModelConfig
from pensieve.cpu_decoder import layers_runner
from pensieve.kernels import cpu_fused
from pensieve.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in float32, rounded, then scaled (Hugging Face's order): one Numba call
        on CPU (`cpu_fused`), elsewhere torch's fused rms_norm."""
        if cpu_fused.runs_fused(x) and self.weight.dtype == x.dtype:
            return cpu_fused.rms_norm(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with the `llama3` long-context scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= original / low) & (wavelen >= original / high)
        inv_freq = torch.where(mid, blended, inv_freq)
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, H, D] with cos/sin [T, D / 2] (each pair's angle)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        h = config.hidden_size
        # q, k and v projections fused into one matmul (checkpoints are fused at load time)
        self.qkv_proj = Linear(h, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        t, rotated = x.shape[0], self.n_heads + self.n_kv
        flat = self.qkv_proj(x)
        qkv = flat.view(t, rotated + self.n_kv, self.head_dim)
        if cpu_fused.runs_fused(flat):  # rotates q and k in place
            cpu_fused.rope_(flat, rotated, self.head_dim, cos, sin)
            q, k = qkv[:, : self.n_heads], qkv[:, self.n_heads : rotated]
        else:
            q, k = apply_rope(qkv[:, :rotated], cos, sin).split([self.n_heads, self.n_kv], dim=1)
        v = qkv[:, rotated:]
        out = attn.attend(self.layer, q, k, v)
        return self.o_proj(out.reshape(t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_fused.runs_silu_mul(gate_up):
            return self.down_proj(cpu_fused.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Named like Hugging Face's `model.*` so checkpoints load with their own tensor names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D / 2]
        cos, sin = angles.cos(), angles.sin()
        x = self.model.embed_tokens(input_ids)
        run_layers = layers_runner(self, x, attn)  # small bfloat16 CPU steps: one Numba loop
        if run_layers is not None:
            return run_layers(x, cos, sin)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn)
        return self.model.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for the rows of `hidden` that need sampling."""
        return self.lm_head(hidden).float()


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" means bfloat16 where the hardware computes it natively, float32 elsewhere."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bfloat16 dot products (AVX512-BF16 or AMX). Without them torch
    emulates bfloat16 matmuls, which measured 3x slower than float32 on an AVX-512 CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> LlamaForCausalLM:
    """Instantiate without initialising weights, then take the checkpoint's tensors."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    model.inv_freq = rope_inverse_frequencies(config).to(device)
    tensors = fuse_projections({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()})
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"checkpoint lacks tensors: {', '.join(missing[:5])}")
    return model.eval()


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names -> ours: q/k/v into qkv_proj, gate/up into gate_up_proj."""
    fused = dict(state)
    groups = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    }
    for name in list(state):
        if not name.endswith("self_attn.q_proj.weight") and not name.endswith(
            "mlp.gate_proj.weight"
        ):
            continue
        prefix = name.rsplit(".", 3)[0]  # "model.layers.N"
        for target, parts in groups.items():
            keys = [f"{prefix}.{p}.weight" for p in parts]
            if all(k in fused for k in keys):
                fused[f"{prefix}.{target}.weight"] = torch.cat([fused.pop(k) for k in keys])
    return fused
