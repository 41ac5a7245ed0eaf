"""Shared fixtures: the default model is imported once per test session."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

# The CPU attention kernel skips Numba's on-disk cache by default (its cached form runs slower,
# see kernels/cpu_attention.py): each of the suite's processes would compile it for every pool
# dtype and head dim it meets (~10 s each). Same code either way, so the tests take the cache.
os.environ.setdefault("PENSIEVE_KERNEL_CACHE", "1")


from pensieve.config import ModelConfig  # noqa: E402 - after the setting above
from pensieve.errors import ModelLoadError
from pensieve.model import build_model
from pensieve.runtime import LoadedModel
from pensieve.tokenizer import ChatTokenizer
from pensieve.weights import expected_tensor_shapes


def _import_hub_kernels() -> None:
    """transformers 5 imports Hugging Face's `kernels` package (a dependency of it) as it loads;
    `python -m pytest` puts the repository first on sys.path, where this project's kernels/
    folder would answer to that name. Import theirs first, from the installed packages."""
    root = Path(__file__).resolve().parents[1]
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers does not ask for it
        pass
    finally:
        sys.path[:] = saved


_import_hub_kernels()  # before any test module imports transformers

# Tests run tiny shapes on a 2-core machine, often beside other processes: one intra-op thread
# avoids OpenMP spin-waiting that makes small ops 100x slower under contention.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default SmolLM2 model as an HF-style folder (cache: $PENSIEVE_CACHE_DIR or a tmp dir)."""
    from pensieve.weights import default_gguf_path, resolve_model

    try:
        default_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    cache = os.environ.get("PENSIEVE_CACHE_DIR") or str(tmp_path_factory.mktemp("pensieve-cache"))
    return resolve_model(None, cache_dir=cache)


def tiny_random_model(tokenizer: ChatTokenizer, folder: Path) -> LoadedModel:
    """A 2-layer random Llama over the real tokenizer: fast, and its logits have wide gaps."""
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        name="tiny-random",
    )
    gen = torch.Generator().manual_seed(1234)
    state = {
        name: (
            torch.ones(shape)
            if name.endswith("norm.weight")
            else torch.randn(shape, generator=gen) * 0.3
        )
        for name, shape in expected_tensor_shapes(config).items()
    }
    model = build_model(config, state, torch.float32, torch.device("cpu"))
    return LoadedModel(model, tokenizer, folder, 0.0)


@pytest.fixture(scope="session")
def tiny(default_model_dir: Path) -> LoadedModel:
    return tiny_random_model(ChatTokenizer.from_folder(default_model_dir), default_model_dir)
