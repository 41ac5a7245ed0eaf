"""Model weights: resolve a model argument to a Hugging Face-style folder and load it."""

from pensieve.weights.gguf_import import default_cache_dir, import_gguf
from pensieve.weights.loader import (
    default_gguf_path,
    expected_tensor_shapes,
    load_config,
    load_state_dict,
    resolve_model,
)

__all__ = [
    "default_cache_dir",
    "default_gguf_path",
    "expected_tensor_shapes",
    "import_gguf",
    "load_config",
    "load_state_dict",
    "resolve_model",
]
