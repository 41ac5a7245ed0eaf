"""Shared fixtures: the default model is imported once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pensieve.errors import ModelLoadError

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
