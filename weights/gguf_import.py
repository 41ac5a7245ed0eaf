"""Convert a llama-architecture GGUF file into a Hugging Face-style folder, once, in a cache.

The engine loads every model from one folder format, so a GGUF file is dequantized to float32
(so float32 logits match the file's own values), its tensors renamed to HF names with llama.cpp's
Q/K row permutation undone, and its tokenizer and chat template rebuilt from the metadata. The
folder is written under a temporary name and renamed into place, so an interrupted import never
leaves a half folder, and a later call finds it by a hash of the file's size and header.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pensieve.config import ModelConfig
from pensieve.errors import ModelLoadError
from pensieve.weights.loader import IMPORT_MARKER, expected_tensor_shapes

IMPORT_VERSION = 1  # bump when the folder layout changes, so old caches are not reused
_HEADER_BYTES = 1 << 20
_TAIL_BYTES = 1 << 16
_ABANDONED_AFTER_S = 3600.0

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp pre-tokenizer names whose regex splits every digit on its own before GPT-2's regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3"}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER = 3, 4


def default_cache_dir() -> Path:
    """$PENSIEVE_CACHE_DIR, else ~/.cache/pensieve."""
    env = os.environ.get("PENSIEVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pensieve"


def cache_key(path: Path) -> str:
    """A short content hash (size, header, tail): stable across copies, cheap to compute."""
    digest = hashlib.sha256(f"pensieve-gguf-v{IMPORT_VERSION}".encode())
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_HEADER_BYTES))
        handle.seek(max(0, size - _TAIL_BYTES))
        digest.update(handle.read())
    return digest.hexdigest()[:12]


def import_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return the HF-style folder for a GGUF file, converting it on the first call only."""
    path = Path(path).expanduser().resolve()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        target = root / f"{path.stem}-{cache_key(path)}"
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF file ({exc})") from exc
    if (target / IMPORT_MARKER).is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root, target.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    except OSError as exc:
        raise ModelLoadError(f"{root}: cannot create the model cache ({exc})") from exc
    try:
        _convert(path, staging)
        _make_readable(staging)
        if (target / IMPORT_MARKER).is_file():  # a concurrent import finished first: use it
            return target
        if target.exists():  # not ours and not complete (e.g. edited by hand): replace it
            shutil.rmtree(target)
        os.rename(staging, target)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot write the imported model to {root} ({exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_abandoned(root: Path, name: str) -> None:
    """Delete staging folders of imports killed long ago (a live import takes seconds)."""
    for stale in root.glob(f".{name}.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > _ABANDONED_AFTER_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _make_readable(folder: Path) -> None:
    """mkdtemp makes the folder private; a cache may be shared, so use the usual modes."""
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _convert(path: Path, out: Path) -> None:
    """Write config, weights, tokenizer and marker for `path` into the (empty) folder `out`."""
    import gguf  # lazily: loading HF folders does not need it

    started = time.perf_counter()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r}; supported: llama")
    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(meta, tensors)
    model_config = ModelConfig.from_hf(config, name=path.stem)
    state = _convert_tensors(path, tensors, model_config)

    from safetensors.numpy import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(meta))
    _write_tokenizer(meta, out, model_config)
    _write_json(
        out / IMPORT_MARKER,
        {
            "version": IMPORT_VERSION,
            "name": path.stem,
            "source": str(path),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )


class _Metadata:
    """GGUF key-value metadata with errors that name the file and key."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise ModelLoadError(f"{self.path}: GGUF metadata {key} is missing")
        return self.fields[key].contents()


def _f32(value: float) -> float:
    """GGUF stores floats as float32; print them as the short decimal the HF config had."""
    return float(str(np.float32(value)))


def _hf_config(meta: _Metadata, tensors: dict[str, Any]) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from the llama.* metadata."""
    if "rope_freqs.weight" in tensors or meta.get("llama.rope.scaling.type", "none") != "none":
        raise ModelLoadError(f"{meta.path}: GGUF RoPE scaling is not supported; use the HF folder")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ModelLoadError(f"{meta.path}: tensor token_embd.weight is missing")
    hidden = int(meta.require("llama.embedding_length"))
    heads = int(meta.require("llama.attention.head_count"))
    vocab = int(embed.shape[-1])
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.require("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    rotary = meta.get("llama.rope.dimension_count")
    if rotary is not None and int(rotary) != config["head_dim"]:
        raise ModelLoadError(f"{meta.path}: partial rotary embeddings are not supported")
    return {**config, **_special_ids(meta, ("eos_token_id",))}


def _special_ids(meta: _Metadata, eos_keys: tuple[str, ...]) -> dict[str, Any]:
    """bos/eos/pad ids from tokenizer.ggml.*; eos is a list when several keys name tokens."""
    eos: list[int] = []
    for key in eos_keys:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    ids: dict[str, Any] = {"eos_token_id": eos[0] if len(eos) == 1 else eos} if eos else {}
    for key, meta_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if meta.get(f"tokenizer.ggml.{meta_key}") is not None:
            ids[key] = int(meta.get(f"tokenizer.ggml.{meta_key}"))
    return ids


def _generation_config(meta: _Metadata) -> dict[str, Any]:
    """EOS = the GGUF eos plus its end-of-turn/end-of-message tokens (llama.cpp stops on all)."""
    return _special_ids(meta, ("eos_token_id", "eot_token_id", "eom_token_id"))


def _hf_name(path: Path, name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ModelLoadError(f"{path}: unsupported tensor {name} (not a plain llama model)")


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of an HF tensor name, for messages about GGUF files."""
    for name, mapped in _GLOBAL_NAMES.items():
        if mapped == hf_name:
            return name
    parts = hf_name.split(".")  # model.layers.N.<module>.<proj>.weight
    for name, mapped in _LAYER_NAMES.items():
        if hf_name.endswith(f".{mapped}.weight"):
            return f"blk.{parts[2]}.{name}.weight"
    return hf_name


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of Q/K rows, giving HF's rotate-half layout."""
    rows, cols = weight.shape
    return np.ascontiguousarray(
        weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )


def _convert_tensors(
    path: Path, tensors: dict[str, Any], config: ModelConfig
) -> dict[str, np.ndarray]:
    """Dequantize, rename and un-permute every tensor; check names and shapes against config."""
    import gguf

    expected = expected_tensor_shapes(config)
    state: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        hf_name = _hf_name(path, name)
        try:
            # A plain ndarray view: numpy.memmap's per-slice bookkeeping slows dequantize by 1/3.
            data = np.asarray(tensor.data)
            array = gguf.dequantize(data, tensor.tensor_type).astype(np.float32, copy=False)
        except (ValueError, NotImplementedError, TypeError) as exc:
            raise ModelLoadError(f"{path}: cannot dequantize {name} ({exc})") from exc
        shape = expected.get(hf_name)
        if shape is not None and tuple(array.shape) != shape:
            raise ModelLoadError(
                f"{path}: tensor {name} has shape {list(array.shape)}, expected {list(shape)}"
            )
        if hf_name.endswith("q_proj.weight"):
            array = _unpermute_rows(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _unpermute_rows(array, config.num_key_value_heads)
        state[hf_name] = np.ascontiguousarray(array)
    missing = [name for name in expected if name not in state]
    if missing:
        raise ModelLoadError(f"{path}: tensor {gguf_name(missing[0])} ({missing[0]}) is missing")
    return state


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token(meta: _Metadata, key: str, tokens: list[str]) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None


def _write_tokenizer(meta: _Metadata, out: Path, config: ModelConfig) -> None:
    """tokenizer.json (byte-level BPE) and tokenizer_config.json (chat template, specials)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{meta.path}: GGUF tokenizer model {kind!r} is not supported (only gpt2 byte-level "
            "BPE); use the model's Hugging Face folder instead"
        )
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ModelLoadError(f"{meta.path}: {len(types)} token types for {len(tokens)} tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False)
        steps = [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre in _DIGIT_SPLIT_PRE:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()

    tokenizer.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind_id in zip(tokens, types, strict=True)
            if kind_id == _TOKEN_TYPE_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tok, special=False, normalized=False)
            for tok, kind_id in zip(tokens, types, strict=True)
            if kind_id == _TOKEN_TYPE_USER
        ]
    )
    bos = _token(meta, "bos_token_id", tokens)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    if add_bos:
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            )
        )
    tokenizer.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    tokenizer.save(str(out / "tokenizer.json"))

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": False,
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        value = _token(meta, f"{key}_token_id", tokens)
        if value is not None:
            tok_config[f"{name}_token"] = value
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tok_config)
