"""kernels/cpu_f32_matmul: float32 rows with the bits oneDNN's prepacked GEMM gives them in a
many-row call, whatever the row count, and the Linear that routes rows to it."""

import numpy as np
import pytest
import torch

from pensieve.kernels import cpu_f32_matmul
from pensieve.kernels.cpu_bf16_matmul import onednn_chunk
from pensieve.kernels.cpu_f32_matmul import FewRowsF32Weight, blocked, few_rows_weight, fits
from pensieve.linear import FEW_F32_ROWS, Linear, onednn_matmul, pack_for_cpu, reorder_for_onednn

# the default model's shapes (qkv, o_proj, gate_up, down)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def _onednn(w: torch.Tensor):
    packed = reorder_for_onednn(w)
    return lambda x: onednn_matmul(x, packed)


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _rows(count: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(count, k, generator=torch.Generator().manual_seed(seed))


def _few_or_skip(w: torch.Tensor) -> FewRowsF32Weight:
    few = few_rows_weight(w, _onednn)
    if few is None:  # the Linear then keeps oneDNN: nothing of the kernel's runs on this CPU
        pytest.skip("oneDNN's float32 GEMM sums in another order on this CPU")
    return few


@pytest.mark.parametrize("shape", SHAPES)
def test_rows_get_onednn_many_row_bits_at_every_count(shape):
    """Every count up to 64 (threes, then one or two), and counts up to FEW_F32_ROWS, give
    each row the bits oneDNN's 600-row call gives it: the invariant a step of any batch
    relies on."""
    w = _weight(*shape, seed=1)
    few = _few_or_skip(w)
    x = _rows(600, shape[1], seed=2)
    whole = onednn_matmul(x, reorder_for_onednn(w))
    for count in [*range(1, 65), 100, 255, FEW_F32_ROWS - 1, FEW_F32_ROWS]:
        start = (count * 37) % (600 - count)
        part = few.matmul(x[start : start + count])
        assert torch.equal(part, whole[start : start + count]), f"{count} rows"


def test_chunk_read_from_onednns_sum_tree():
    """K's chunk for the down projection's shape comes from oneDNN's sum tree, and it
    matters: with another chunk the sums differ from oneDNN's."""
    shape = (576, 1536)
    chunk = onednn_chunk(*shape, _onednn, torch.float32)
    assert chunk is not None and 2 <= chunk <= shape[1]
    w = _weight(*shape, seed=3)
    x = _rows(30, shape[1], seed=4)
    want = _onednn(w)(x)
    if not torch.equal(FewRowsF32Weight(w, chunk).matmul(x), want):
        pytest.skip("oneDNN's float32 GEMM sums in another order on this CPU")
    other = 512 if chunk != 512 else 256
    assert not torch.equal(FewRowsF32Weight(w, other).matmul(x), want)


def test_a_weight_whose_bits_differ_is_refused():
    """Where the kernels do not give the reference's bits for the weight (here one bit off in
    every output; the chunk's probe, on another weight, still answers), it is left to
    oneDNN."""
    w = _weight(128, 256, seed=5)

    def one_bit_off(weight):
        if weight is not w:
            return _onednn(weight)
        return lambda x: (_onednn(weight)(x).view(torch.int32) ^ 1).view(torch.float32)

    _few_or_skip(w)
    assert few_rows_weight(w, one_bit_off) is None


def test_what_it_takes():
    assert fits(_weight(96, 64, 0))
    assert not fits(_weight(80, 64, 0))  # N not a multiple of 32
    assert not fits(_weight(96, 64, 0).to(torch.bfloat16))
    assert few_rows_weight(_weight(80, 64, 0), _onednn) is None
    few = FewRowsF32Weight(_weight(96, 64, 0), 64)
    with pytest.raises(ValueError, match="does not fit"):
        few.matmul(_rows(2, 65, 0))
    assert few.matmul(_rows(0, 64, 0)).shape == (0, 96)


def test_blocked_layout():
    """[N/32, K, 32]: feature n's element k at ((n // 32) * K + k) * 32 + n % 32."""
    w = _weight(64, 8, seed=6)
    flat = blocked(w)
    for n, k in [(0, 0), (5, 3), (31, 7), (32, 0), (63, 5)]:
        assert flat[((n // 32) * 8 + k) * 32 + n % 32] == w[n, k].item()


@pytest.mark.parametrize("rows", [1, 5, 9])
def test_every_thread_count_and_share_gives_the_same_bits(rows):
    """Threads take contiguous shares of 32-feature units (10 units over 1-7 threads: uneven
    shares); no thread count changes a row's bits, and they are each chunk's FMA chain in K's
    order, the chunks added in order (float64 products and sums emulate each fused step)."""
    w = _weight(320, 96, seed=8)
    few = FewRowsF32Weight(w, 64)
    x = _rows(rows, 96, seed=9)

    def run(threads: int) -> np.ndarray:
        out = np.zeros((rows, 320), np.float32)
        cpu_f32_matmul._matmul(x.numpy(), few.blocks, out, 96, 320, few.chunk, threads)
        return out

    one = run(1)
    for threads in (2, 3, 5, 7):
        assert np.array_equal(run(threads), one), f"{threads} threads"
    xs, ws = x.numpy().astype(np.float64), w.numpy().astype(np.float64)
    chunks = []
    for lo in (0, 64):  # each chunk an FMA chain from zero (float64 emulates the fused step)
        acc = np.zeros((rows, 320), np.float32)
        for k in range(lo, min(lo + 64, 96)):
            acc = (acc + xs[:, k : k + 1] * ws[None, :, k]).astype(np.float32)
        chunks.append(acc)
    assert np.array_equal(one, (chunks[0] + chunks[1]).astype(np.float32))


def test_linear_routes_rows_and_keeps_bits(monkeypatch):
    """A packed float32 Linear takes up to FEW_F32_ROWS rows through the kernel, more (and a
    3-D call) through oneDNN, and a row's output is the same either way."""
    torch.manual_seed(7)
    layer = Linear(576, 960, bias=False)
    assert pack_for_cpu(layer) == 1
    if layer.few_rows is None:
        pytest.skip("oneDNN's float32 GEMM sums in another order on this CPU")
    assert layer.few_up_to == FEW_F32_ROWS
    calls = []
    kernel = FewRowsF32Weight.matmul
    monkeypatch.setattr(
        FewRowsF32Weight, "matmul", lambda self, x: calls.append(len(x)) or kernel(self, x)
    )
    x = torch.randn(FEW_F32_ROWS + 8, 576)
    with torch.inference_mode():
        many = layer(x)
        few = layer(x[:FEW_F32_ROWS])
        one = layer(x[3:4])
        batched = layer(x[None, :4])
    assert torch.equal(few, many[:FEW_F32_ROWS])
    assert torch.equal(one, many[3:4])
    assert batched.shape == (1, 4, 960) and torch.equal(batched[0], many[:4])
    assert calls == [FEW_F32_ROWS, 1]
