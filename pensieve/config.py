"""Model and engine configuration as typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pensieve.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a Hugging Face Llama-family config.json that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    name: str = "model"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "model") -> ModelConfig:
        """Build from a parsed config.json; raises ModelLoadError on unsupported models."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers >= 5 writes `rope_parameters` (theta and scaling together).
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") else None)
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                architecture=arch,
                name=name,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad field: {exc}") from exc

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


Mode = Literal["stateful", "stateless", "device-only"]


@dataclass
class EngineConfig:
    """Everything an Engine needs; every field has a default that runs the default model on CPU."""

    model: str | None = None  # HF folder or GGUF file; None = the default SmolLM2 model
    dtype: Literal["bfloat16", "float32", "auto"] = "auto"
    quantize: Literal["none", "int8"] = "none"  # int8: weight-only int8 matmuls (CPU)
    device: str = "auto"  # "cpu", "cuda", "cuda:1", or "auto"
    mode: Mode = "stateful"
    block_size: int = 32  # tokens per KV block; a block is the paper's cache chunk
    device_cache_tokens: int = 16384  # device tier capacity
    host_cache_tokens: int = 65536  # host tier capacity (0 in device-only mode)
    max_batch_tokens: int = 512  # token budget of one forward step (chunked prefill above it)
    max_running: int = 64  # sequences in one step
    max_queue: int = 256  # waiting requests before new ones get OverloadedError
    swap_out_threshold: float = 0.25  # free device share below which swap-out starts ahead of time
    decode_reserve: float = 0.10  # device share kept free for running decodes
    profile_cost: bool = True  # profile Cost(l) at start-up (fakes in tests turn it off)
    cache_dir: str | None = None  # where GGUF files are converted; default ~/.cache/pensieve
    max_model_len: int | None = None  # cap on prompt + reply tokens (None: the model's window)
    state_dir: str | None = None  # keep conversations on disk here, across restarts (off: None)
    disk_cache_tokens: int = 262144  # disk tier capacity (with state_dir)
    kv_events_endpoint: str | None = None  # ZMQ PUB address for KV events (tcp://*:5557; off: None)
    kv_events_replay_endpoint: str | None = None  # ZMQ ROUTER address answering event replays
    kv_events_block_size: int = 16  # tokens per KV event block (vllm-router --kv-event-block-size)
    deterministic: bool = False  # batch-invariant forward: same logits whatever batch/tier/chunks
