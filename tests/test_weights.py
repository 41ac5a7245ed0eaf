"""Model resolution, GGUF import and validated weight loading."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers

from pensieve.errors import ModelLoadError
from pensieve.tokenizer import ChatTokenizer
from pensieve.weights import (
    expected_tensor_shapes,
    gguf_import,
    import_gguf,
    load_config,
    load_state_dict,
    resolve_model,
)

transformers = pytest.importorskip("transformers")

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e"]
TINY_TOKENS = TINY_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model() -> transformers.LlamaForCausalLM:
    """A random Llama small enough to write, shard and corrupt in milliseconds."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(TINY_TOKENS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tiny_model: transformers.LlamaForCausalLM, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(folder)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _assert_matches(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    reference = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


# --- the default model --------------------------------------------------------------------------


def test_default_model_config(default_model_dir: Path) -> None:
    config = load_config(default_model_dir)
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert config.intermediate_size == 1536
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.rope_theta, config.rms_norm_eps) == (49152, 100000.0, 1e-5)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)
    assert config.name == "SmolLM2-135M-Instruct.Q4_1"


def test_default_model_loads_validated_weights(default_model_dir: Path) -> None:
    config = load_config(default_model_dir)
    state = load_state_dict(default_model_dir, config, torch.bfloat16, "cpu")
    assert set(state) == set(expected_tensor_shapes(config))
    assert "lm_head.weight" not in state  # tied
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in state.values())


def test_second_resolve_reuses_cache(default_model_dir: Path) -> None:
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    again = resolve_model(None, cache_dir=str(default_model_dir.parent))
    assert time.perf_counter() - started < 1.0
    assert again == default_model_dir and weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_transformers_generates_the_known_answer(default_model_dir: Path) -> None:
    """Greedy float32 generation from the converted folder validates the Q/K un-permutation."""
    model = transformers.LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    tokenizer = ChatTokenizer.from_folder(default_model_dir)
    question = "What is the capital of France? Answer in one sentence."
    messages = [{"role": "user", "content": question}]
    prompt = torch.tensor([tokenizer.encode_chat(messages)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 135M model gains little from threads; a busy host loses a lot
    try:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    reply = out[0, prompt.shape[1] :].tolist()
    answer = "The capital of France is Paris."
    assert tokenizer.decode(reply).startswith(answer)
    assert reply[len(tokenizer.encode(answer))] in tokenizer.eos_token_ids


# --- GGUF import ---------------------------------------------------------------------------------


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (the inverse of what we undo)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path: Path, model: torch.nn.Module, arch: str = "llama", drop: str = "") -> Path:
    """Write `model` as llama.cpp would (F32 tensors, permuted Q/K, gpt2 tokenizer metadata)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([3] * len(TINY_SPECIALS) + [1] * (len(TINY_TOKENS) - len(TINY_SPECIALS)))
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if "q_proj" in name:
            array = _llama_cpp_permute(array, cfg.num_attention_heads)
        elif "k_proj" in name:
            array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        if gguf_import.gguf_name(name) != drop:
            writer.add_tensor(gguf_import.gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_import_round_trips_weights_and_tokenizer(tiny_model, tmp_path: Path) -> None:
    folder = import_gguf(write_gguf(tmp_path / "tiny.gguf", tiny_model), cache_dir=tmp_path / "c")
    assert folder.parent == tmp_path / "c" and folder.name.startswith("tiny-")
    config = load_config(folder)
    assert not config.tie_word_embeddings and config.eos_token_ids == (2,)
    assert (config.rope_theta, config.rms_norm_eps, config.head_dim) == (5000.0, 1e-6, 8)
    _assert_matches(load_state_dict(folder, config, torch.float32, "cpu"), tiny_model)
    tokenizer = ChatTokenizer.from_folder(folder)
    assert tokenizer.encode(" the") == [TINY_TOKENS.index("Ġt"), TINY_TOKENS.index("he")]
    text = "<|im_start|>the é<|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "the theta"}]
    assert tokenizer.encode_chat(chat) == hf.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_gguf_import_uses_env_cache_dir(tiny_model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PENSIEVE_CACHE_DIR", str(tmp_path / "env-cache"))
    folder = resolve_model(str(write_gguf(tmp_path / "tiny.gguf", tiny_model)))
    assert folder.parent == tmp_path / "env-cache"


def test_gguf_import_rejects_other_architectures(tiny_model, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "gpt.gguf", tiny_model, arch="gpt2")
    with pytest.raises(ModelLoadError, match=r"gpt\.gguf.*unsupported GGUF architecture 'gpt2'"):
        import_gguf(path, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []  # no half-written folder


def test_gguf_import_names_a_missing_tensor(tiny_model, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model, drop="blk.1.ffn_up.weight")
    with pytest.raises(ModelLoadError, match=r"tiny\.gguf.*blk\.1\.ffn_up\.weight.*missing"):
        import_gguf(path, cache_dir=tmp_path / "c")


def test_gguf_import_rejects_a_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match=r"fake\.gguf.*not a readable GGUF"):
        resolve_model(str(path), cache_dir=str(tmp_path / "c"))


def test_interrupted_import_leaves_nothing_and_retries(tiny_model, tmp_path, monkeypatch) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(gguf_import, "_write_tokenizer", interrupt)
        with pytest.raises(KeyboardInterrupt):
            import_gguf(path, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
    abandoned = tmp_path / "c" / f".tiny-{gguf_import.cache_key(path)}.killed.tmp"
    abandoned.mkdir()
    os.utime(abandoned, (0, 0))  # an import killed long ago left its staging folder
    folder = import_gguf(path, cache_dir=tmp_path / "c")
    assert (folder / "tokenizer.json").is_file() and not abandoned.exists()
    assert list((tmp_path / "c").iterdir()) == [folder]


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    permuted = _llama_cpp_permute(weight, heads=6)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(gguf_import._unpermute_rows(permuted, heads=6), weight)


# --- resolving and loading HF folders ------------------------------------------------------------


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no-such-model"):
        resolve_model(str(tmp_path / "no-such-model"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match=r"notes\.txt.*not a model"):
        resolve_model(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty.*no config\.json"):
        resolve_model(str(tmp_path / "empty"))


def test_folder_resolves_to_itself_and_loads(tiny_dir: Path, tiny_model) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir
    config = load_config(tiny_dir)
    assert config.rope_theta == 5000.0  # transformers 5 writes it into rope_parameters
    assert (config.rope_scaling or {}).get("rope_type", "default") == "default"
    _assert_matches(load_state_dict(tiny_dir, config, torch.float32, "cpu"), tiny_model)


def test_sharded_checkpoint_loads(tiny_model, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    state = load_state_dict(tmp_path, load_config(tmp_path), torch.float32, "cpu")
    _assert_matches(state, tiny_model)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"shard {shard.name} is missing"):
        load_state_dict(tmp_path, load_config(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"architectures": None, "model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope_scaling lacks"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 3}, "not a multiple"),
    ],
)
def test_unsupported_configs(tiny_dir: Path, tmp_path: Path, change: dict, pattern: str) -> None:
    folder = _copy(tiny_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"config\.json.*{pattern}"):
        load_config(folder)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])  # transformers 4, 5
def test_llama3_rope_scaling_passes_through(tiny_dir: Path, tmp_path: Path, key: str) -> None:
    folder = _copy(tiny_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config[key] = {**scaling, "rope_theta": 5000.0} if key == "rope_parameters" else scaling
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_config(folder)
    assert loaded.rope_scaling == scaling and loaded.rope_theta == 5000.0


def test_truncated_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt or truncated"):
        load_state_dict(folder, load_config(folder), torch.float32, "cpu")


def _rewrite(folder: Path, edit) -> None:
    weights = folder / "model.safetensors"
    state = load_file(weights)
    edit(state)
    save_file(state, weights, metadata={"format": "pt"})


def test_shape_mismatch_names_the_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(folder, lambda state: state.update({name: torch.zeros(8, 32)}))
    with pytest.raises(ModelLoadError, match=rf"{name} has shape \[8, 32\], expected \[16, 32\]"):
        load_state_dict(folder, load_config(folder), torch.float32, "cpu")


def test_missing_tensor_names_the_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path)
    _rewrite(folder, lambda state: state.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match=r"lm_head\.weight is missing.*\[261, 32\]"):
        load_state_dict(folder, load_config(folder), torch.float32, "cpu")


def test_folder_without_weights(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_state_dict(folder, load_config(folder), torch.float32, "cpu")
