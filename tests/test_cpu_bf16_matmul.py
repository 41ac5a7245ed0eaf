"""kernels/cpu_bf16_matmul: a few bfloat16 rows with the bits oneDNN's prepacked GEMM gives
them in a many-row call, whatever the row count, and the Linear that routes rows to it."""

import numpy as np
import pytest
import torch

from pensieve.cpu_decoder import LOOP_ROWS
from pensieve.kernels import cpu_bf16_matmul
from pensieve.kernels.cpu_bf16_matmul import (
    FewRowsWeight,
    blocked,
    few_rows_weight,
    fits,
    onednn_chunk,
)
from pensieve.kernels.simd512 import has_avx512_bf16
from pensieve.linear import FEW_ROWS, Linear, onednn_matmul, pack_for_cpu, reorder_for_onednn

needs_bf16 = pytest.mark.skipif(
    not (has_avx512_bf16() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU has no AVX512-BF16 (or oneDNN no bfloat16 kernel)",
)

# the default model's shapes (qkv, o_proj, gate_up, down)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint16)


def _onednn(w: torch.Tensor):
    packed = reorder_for_onednn(w)
    return lambda x: onednn_matmul(x, packed)


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)


@needs_bf16
@pytest.mark.parametrize("shape", SHAPES)
def test_rows_get_onednn_many_row_bits_at_every_count(shape):
    """Every count up to FEW_ROWS (fours, single rows, both), and counts up to the one-loop
    decoder's LOOP_ROWS, give each row the bits oneDNN's 600-row call gives it: the invariant
    a step of any batch relies on."""
    w = _weight(*shape, seed=1)
    packed = reorder_for_onednn(w)
    few = few_rows_weight(w, _onednn)
    assert few is not None
    x = torch.randn(600, shape[1], generator=torch.Generator().manual_seed(2))
    x = x.to(torch.bfloat16)
    whole = _bits(onednn_matmul(x, packed))
    for count in [*range(1, FEW_ROWS + 1), FEW_ROWS + 1, 300, LOOP_ROWS - 1, LOOP_ROWS]:
        start = (count * 37) % (600 - count)
        part = _bits(few.matmul(x[start : start + count]))
        assert torch.equal(part, whole[start : start + count]), f"{count} rows"


@needs_bf16
@pytest.mark.parametrize("shape", [(576, 1536), (960, 576)])
def test_chunk_read_from_onednns_sum_tree(shape):
    """K's chunk comes from oneDNN's sum tree for the shape, and it matters: the kernels with
    another chunk differ from oneDNN in a few of 300 rows' outputs (rarely: the bfloat16
    rounding hides most of the float32 differences, so random rows could not find it)."""
    chunk = onednn_chunk(*shape, _onednn)
    assert chunk is not None and shape[1] % 2 == 0 and 2 <= chunk <= shape[1]
    w = _weight(*shape, seed=3)
    x = torch.randn(300, shape[1], generator=torch.Generator().manual_seed(4))
    x = x.to(torch.bfloat16)
    want = _bits(_onednn(w)(x))
    assert torch.equal(_bits(FewRowsWeight(w, chunk).matmul(x)), want)
    other = 256 if chunk != 256 else 128
    assert not torch.equal(_bits(FewRowsWeight(w, other).matmul(x)), want)


@needs_bf16
def test_a_weight_whose_bits_differ_is_refused():
    """Where the kernels do not give the reference's bits for the weight (here one bit off in
    every output; the chunk's probe, on another weight, still answers), it is left to
    oneDNN."""
    w = _weight(128, 256, seed=5)

    def one_bit_off(weight):
        if weight is not w:
            return _onednn(weight)
        return lambda x: (_bits(_onednn(weight)(x)) ^ 1).view(torch.bfloat16)

    assert few_rows_weight(w, _onednn) is not None
    assert few_rows_weight(w, one_bit_off) is None


@needs_bf16
def test_what_it_takes():
    assert fits(_weight(128, 64, 0))
    assert not fits(_weight(96, 64, 0))  # N not a multiple of 64
    assert not fits(_weight(128, 63, 0))  # K odd
    assert not fits(_weight(128, 64, 0).float())
    assert few_rows_weight(_weight(96, 64, 0), _onednn) is None


def test_blocked_layout():
    """[N/64, K/2, 64, 2]: feature n's pair p at ((n // 64) * K/2 + p) * 128 + (n % 64) * 2."""
    w = _weight(128, 8, seed=6)
    flat = blocked(w)
    bits = _bits(w)
    for n, p in [(0, 0), (5, 3), (63, 1), (64, 0), (127, 3)]:
        at = ((n // 64) * 4 + p) * 128 + (n % 64) * 2
        assert flat[at] == bits[n, 2 * p].item() and flat[at + 1] == bits[n, 2 * p + 1].item()


@needs_bf16
@pytest.mark.parametrize("rows", [1, 5, 9])
def test_every_thread_count_and_share_gives_the_same_bits(rows):
    """Threads take contiguous shares of 32-feature units; odd shares (10 units over 3 or 7
    threads) run the one-unit paths. No thread count changes a row's bits."""
    w = _weight(320, 96, seed=8)
    few = FewRowsWeight(w, 64)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    bits = x.view(torch.uint16).numpy()

    def run(threads: int) -> np.ndarray:
        out = np.zeros((rows, 320), np.uint16)
        cpu_bf16_matmul._matmul(bits, few.blocks, out, 96, 320, few.chunk, threads)
        return out

    one = run(1)
    for threads in (2, 3, 5, 7):
        assert np.array_equal(run(threads), one), f"{threads} threads"
    assert torch.equal(_bits(few.matmul(x)), torch.from_numpy(one))


def _summing(chunk: int, restarts: list[int] | None = None, tree: bool = False):
    """A stand-in for oneDNN (w -> matmul) that sums as it is known to: per output, float32
    adds over K's pairs in order (odd element first), restarted at `restarts` (every `chunk`),
    the chunks' sums added one after another (`tree`: the last two first)."""

    def of(w: torch.Tensor):
        wf = w.float()

        def matmul(x: torch.Tensor) -> torch.Tensor:
            xf, k_dim = x.float(), x.shape[1]
            edges = [0, *(restarts or range(chunk, k_dim, chunk)), k_dim]
            sums = []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                acc = torch.zeros(x.shape[0], w.shape[0])
                for p in range(lo, hi, 2):
                    acc = acc + xf[:, p + 1, None] * wf[None, :, p + 1]
                    acc = acc + xf[:, p, None] * wf[None, :, p]
                sums.append(acc)
            if tree and len(sums) >= 3:
                sums = [sums[0], *sums[1:-2], sums[-2] + sums[-1]]
            total = sums[0]
            for part in sums[1:]:
                total = total + part
            return total.to(torch.bfloat16)

        return matmul

    return of


def test_chunk_probe_reads_a_known_sum_tree(monkeypatch):
    """`onednn_chunk` on stand-ins whose order is known: restarts every 32 of 96 (three
    chunks, added in order), none, uneven restarts and a tree of chunk sums (refused)."""
    monkeypatch.setattr(cpu_bf16_matmul, "_chunks", {})
    assert onednn_chunk(64, 96, _summing(32)) == 32
    monkeypatch.setattr(cpu_bf16_matmul, "_chunks", {})
    assert onednn_chunk(64, 96, _summing(96)) == 96
    monkeypatch.setattr(cpu_bf16_matmul, "_chunks", {})
    assert onednn_chunk(64, 96, _summing(0, restarts=[32, 48])) is None
    monkeypatch.setattr(cpu_bf16_matmul, "_chunks", {})
    assert onednn_chunk(64, 96, _summing(32, tree=True)) is None


@needs_bf16
def test_linear_routes_few_rows_and_keeps_bits(monkeypatch):
    """A packed bfloat16 Linear takes up to FEW_ROWS rows through the kernel, more through
    oneDNN, and a row's output is the same either way."""
    torch.manual_seed(7)
    layer = Linear(576, 960, bias=False).to(torch.bfloat16)
    assert pack_for_cpu(layer) == 1 and layer.few_rows is not None
    calls = []
    kernel = FewRowsWeight.matmul
    monkeypatch.setattr(
        FewRowsWeight, "matmul", lambda self, x: calls.append(len(x)) or kernel(self, x)
    )
    x = torch.randn(FEW_ROWS + 8, 576).to(torch.bfloat16)
    with torch.inference_mode():
        many = layer(x)
        few = layer(x[:FEW_ROWS])
        one = layer(x[3:4])
        batched = layer(x[None, :4])  # a leading batch dimension goes to oneDNN
    assert torch.equal(_bits(few), _bits(many[:FEW_ROWS]))
    assert torch.equal(_bits(one), _bits(many[3:4]))
    assert batched.shape == (1, 4, 960) and torch.equal(_bits(batched[0]), _bits(many[:4]))
    assert calls == [FEW_ROWS, 1]  # the many rows and the 3-D call went to oneDNN
