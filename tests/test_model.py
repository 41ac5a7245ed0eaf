"""The torch Llama forward against Hugging Face transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from pensieve.attention import ContiguousKV
from pensieve.config import ModelConfig
from pensieve.model import build_model

transformers = pytest.importorskip("transformers")


def tiny_hf_model(**overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()


def ours_from(hf: transformers.LlamaForCausalLM) -> torch.nn.Module:
    config = ModelConfig.from_hf(hf.config.to_dict())
    return build_model(config, hf.state_dict(), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 4},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ],
)
def test_logits_match_transformers_on_tiny_random_llama(overrides: dict) -> None:
    hf = tiny_hf_model(**overrides)
    ours = ours_from(hf)
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    hidden = ours(ids[0], torch.arange(40), ContiguousKV(ours.config.num_hidden_layers))
    torch.testing.assert_close(ours.logits(hidden), expected, atol=1e-4, rtol=1e-4)


def test_incremental_decoding_equals_one_pass() -> None:
    """Feeding tokens in pieces through the KV cache gives the logits of one full pass."""
    hf = tiny_hf_model()
    ours = ours_from(hf)
    ids = torch.randint(0, 97, (30,))
    full = ours.logits(ours(ids, torch.arange(30), ContiguousKV(2)))
    kv = ContiguousKV(2)
    pieces = [
        ours.logits(ours(ids[a:b], torch.arange(a, b), kv))
        for a, b in [(0, 17), (17, 18), (18, 30)]
    ]
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-4, rtol=1e-4)


def test_logits_match_transformers_on_the_default_model(default_model_dir) -> None:
    """Our forward on the dequantized SmolLM2 weights against transformers' own Llama."""
    from pensieve.config import EngineConfig
    from pensieve.runtime import load_pretrained

    ours = load_pretrained(EngineConfig(model=str(default_model_dir), dtype="float32")).model
    hf = transformers.LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    ids = torch.randint(
        0, ours.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        expected = hf.eval()(ids).logits[0]
    hidden = ours(ids[0], torch.arange(48), ContiguousKV(ours.config.num_hidden_layers))
    torch.testing.assert_close(ours.logits(hidden), expected, atol=2e-3, rtol=1e-3)
    assert torch.equal(ours.logits(hidden).argmax(-1), expected.argmax(-1))
