"""The decoder layers as one Numba loop (`pensieve.cpu_decoder`) give the modules' bits."""

from __future__ import annotations

import pytest
import torch

from pensieve import cpu_decoder
from pensieve.attention import ContiguousKV
from pensieve.block_allocator import KVPool
from pensieve.config import EngineConfig, ModelConfig
from pensieve.linear import FEW_ROWS, pack_for_cpu
from pensieve.messages import SequenceRows
from pensieve.model import build_model
from pensieve.paged import PagedAttentionBackend, StepMetadata
from pensieve.quantize import quantize_int8
from pensieve.sampling import SamplingParams
from pensieve.weights import expected_tensor_shapes

BLOCK = 16
# (new tokens, tokens already cached) of each sequence of a step
STEPS = {
    "one decode": [(1, 40)],
    "decodes": [(1, 0), (1, 16), (1, 70), (1, 5)],
    "decodes and a chunk": [(1, 33), (9, 20), (1, 2)],
    "a prompt": [(37, 0)],
    "more rows than FEW_ROWS": [(FEW_ROWS + 30, 0), (1, 30), (1, 7)],
    "the most rows it takes": [(cpu_decoder.LOOP_ROWS - 2, 0), (1, 30), (1, 7)],
}


def _model(head_dim: int, dtype: torch.dtype = torch.bfloat16, int8: bool = False):
    """A random 3-layer Llama with the default model's head layout (3 query heads per KV head)."""
    config = ModelConfig(
        vocab_size=300,
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        name="tiny-random",
    )
    gen = torch.Generator().manual_seed(7)
    state = {
        name: torch.randn(shape, generator=gen) * (0.05 if name.endswith("norm.weight") else 0.3)
        + (1.0 if name.endswith("norm.weight") else 0.0)
        for name, shape in expected_tensor_shapes(config).items()
    }
    model = build_model(config, state, dtype, torch.device("cpu"))
    if int8:
        quantize_int8(model)
    pack_for_cpu(model)
    return model


@pytest.fixture(scope="module", params=[64, 128], ids=["d64", "d128"])
def model(request):
    model = _model(request.param)
    if cpu_decoder._weights_of(model) is None:
        pytest.skip("the matmuls do not run on cpu_bf16_matmul here (no AVX512-BF16)")
    return model


def _rows(sequences: list[tuple[int, int]], vocab: int) -> list[SequenceRows]:
    gen = torch.Generator().manual_seed(3)
    free = torch.randperm(64, generator=gen).tolist()
    rows = []
    for i, (n, past) in enumerate(sequences):
        ctx = past + n
        table = [free.pop() for _ in range(-(-ctx // BLOCK))]
        tokens = torch.randint(vocab, (n,), generator=gen).tolist()
        rows.append(
            SequenceRows(i, tokens, list(range(past, ctx)), table, ctx, True, SamplingParams())
        )
    return rows


def _pool(model) -> KVPool:
    c = model.config
    pool = KVPool.empty(c.num_hidden_layers, 64, BLOCK, c.num_key_value_heads, c.head_dim,
                        model.dtype, torch.device("cpu"))  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    for cache in (pool.keys, pool.values):
        cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.dtype))
    return pool


def _step(model, pool, rows, wait=None):
    """The step's final hidden rows, and whether the Numba loop ran them."""
    meta = StepMetadata.build(rows, BLOCK, model.device)
    backend = PagedAttentionBackend(pool, meta, wait)
    ids = torch.tensor([t for r in rows for t in r.tokens])
    x = model.model.embed_tokens(ids)
    ran = cpu_decoder.ENABLED and cpu_decoder.layers_runner(model, x, backend) is not None
    return model(ids, meta.positions.long(), backend), ran


def _same_as_modules(model, rows, monkeypatch) -> None:
    """The step through the Numba loop and through the modules: same output, same pool."""
    pools, outs = [], []
    for enabled in (True, False):
        monkeypatch.setattr(cpu_decoder, "ENABLED", enabled)
        pool = _pool(model)
        out, ran = _step(model, pool, rows)
        assert ran == enabled
        pools.append(pool)
        outs.append(out)
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))
    assert torch.equal(_bits(pools[0].keys), _bits(pools[1].keys))  # the same K/V written
    assert torch.equal(_bits(pools[0].values), _bits(pools[1].values))
    assert not torch.equal(_bits(pools[0].keys), _bits(_pool(model).keys))  # ... and some


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("step", list(STEPS))
def test_layers_give_the_modules_bits(model, step, monkeypatch):
    _same_as_modules(model, _rows(STEPS[step], model.config.vocab_size), monkeypatch)


@pytest.mark.parametrize("sequences", [[(1, 40)], [(1, 3), (1, 50)]], ids=["1 row", "2 rows"])
def test_int8_layers_give_the_modules_bits(sequences, monkeypatch):
    """--quantize int8: one or two rows on `cpu_int8_torch_order`'s kernels (torch's bits)."""
    model = _model(64, int8=True)
    if cpu_decoder._weights_of(model) is None:
        pytest.skip("torch's int8 matmul is not vectorised here: the modules run it")
    _same_as_modules(model, _rows(sequences, model.config.vocab_size), monkeypatch)
    rows = _rows([(1, 3), (1, 4), (1, 5)], model.config.vocab_size)  # 3 rows: torch's kernel
    x = model.model.embed_tokens(torch.zeros(3, dtype=torch.long))
    backend = PagedAttentionBackend(_pool(model), StepMetadata.build(rows, BLOCK, model.device))
    assert cpu_decoder.layers_runner(model, x, backend) is None
    model.model.layers[0].mlp.down_proj.tile_rows = 16  # --deterministic: torch's int8 tiles
    one = _rows([(1, 3)], model.config.vocab_size)
    backend = PagedAttentionBackend(_pool(model), StepMetadata.build(one, BLOCK, model.device))
    assert cpu_decoder.layers_runner(model, x[:1], backend) is None


def test_a_restoring_step_waits_for_each_layer_before_it(model, monkeypatch):
    """A layer's wait comes before anything is written into that layer, after the layer
    before it is done; the output is the modules' (which wait the same way)."""
    rows = _rows(STEPS["decodes"], model.config.vocab_size)
    outs = []
    for enabled in (True, False):
        monkeypatch.setattr(cpu_decoder, "ENABLED", enabled)
        pool = _pool(model)
        untouched = pool.keys.clone()
        calls = []

        def wait(layer: int, pool=pool, untouched=untouched, calls=calls) -> None:
            assert torch.equal(_bits(pool.keys[layer]), _bits(untouched[layer]))
            if layer:
                assert not torch.equal(_bits(pool.keys[layer - 1]), _bits(untouched[layer - 1]))
            calls.append(layer)

        out, ran = _step(model, pool, rows, wait=wait)
        assert ran == enabled
        assert calls == list(range(model.config.num_hidden_layers))
        outs.append(out)
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))


def test_steps_it_does_not_take_run_on_the_modules(model):
    rows = _rows(STEPS["decodes"], model.config.vocab_size)
    pool = _pool(model)
    meta = StepMetadata.build(rows, BLOCK, model.device)
    x = model.model.embed_tokens(torch.zeros(4, dtype=torch.long))
    assert cpu_decoder.layers_runner(model, x, PagedAttentionBackend(pool, meta)) is not None
    debug = PagedAttentionBackend(pool, meta, debug=True)  # checks every layer's arguments
    assert cpu_decoder.layers_runner(model, x, debug) is None
    oracle = ContiguousKV(model.config.num_hidden_layers)
    assert cpu_decoder.layers_runner(model, x, oracle) is None
    many = model.model.embed_tokens(torch.zeros(cpu_decoder.LOOP_ROWS + 1, dtype=torch.long))
    assert cpu_decoder.layers_runner(model, many, PagedAttentionBackend(pool, meta)) is None
    other = _pool(model)  # a pool of a model with another number of layers
    other.keys, other.values = other.keys[:-1], other.values[:-1]
    assert cpu_decoder.layers_runner(model, x, PagedAttentionBackend(other, meta)) is None
    as_float = _model(model.config.head_dim, torch.float32)
    assert cpu_decoder.layers_runner(as_float, x.float(), PagedAttentionBackend(pool, meta)) is None


def test_warm_up_runs_the_loop_and_writes_nothing(model, monkeypatch):
    pool = _pool(model)
    keys, values = pool.keys.clone(), pool.values.clone()
    runs = []
    run_layers = cpu_decoder.run_layers
    monkeypatch.setattr(cpu_decoder, "run_layers", lambda *a: runs.append(run_layers(*a)))
    cpu_decoder.warm_up(model, pool)
    assert len(runs) == 1 and runs[0].shape == (1, model.config.hidden_size)
    assert torch.equal(_bits(pool.keys), _bits(keys))
    assert torch.equal(_bits(pool.values), _bits(values))


def test_new_weights_are_picked_up(model, monkeypatch):
    """Replacing a layer's weight (and packing it again) is seen by the next step."""
    rows = _rows(STEPS["decodes"], model.config.vocab_size)
    before, _ = _step(model, _pool(model), rows)
    linear = model.model.layers[1].mlp.down_proj
    saved = (linear.weight, linear.packed, linear.few_rows)
    try:
        linear.weight = torch.nn.Parameter(linear.weight * 2, requires_grad=False)
        linear.packed = linear.few_rows = None
        pack_for_cpu(model)
        after, ran = _step(model, _pool(model), rows)
        assert ran and not torch.equal(_bits(before), _bits(after))
        _same_as_modules(model, rows, monkeypatch)
    finally:
        linear.weight, linear.packed, linear.few_rows = saved


def test_a_new_norm_weight_is_picked_up(model, monkeypatch):
    rows = _rows(STEPS["decodes"], model.config.vocab_size)
    before, _ = _step(model, _pool(model), rows)
    norm = model.model.layers[0].post_attention_layernorm
    saved = norm.weight
    try:
        norm.weight = torch.nn.Parameter(saved * 3, requires_grad=False)
        after, ran = _step(model, _pool(model), rows)
        assert ran and not torch.equal(_bits(before), _bits(after))
        _same_as_modules(model, rows, monkeypatch)
    finally:
        norm.weight = saved


def test_the_loop_takes_a_whole_default_step():
    """LOOP_ROWS was measured at the default step budget (a 512-token prefill, bench/README.md):
    a change of either needs the other measured again."""
    assert cpu_decoder.LOOP_ROWS == EngineConfig().max_batch_tokens
