"""The swapper's copiers on CPU: every copier moves exactly the blocks it is asked to, for exactly
the layers it is asked to. The cudaMemcpy2DAsync copier's address arithmetic runs here through
a host memmove with the same arguments, so what a GPU is asked to copy is checked without one."""

from __future__ import annotations

import ctypes
import gc

import pytest
import torch

from pensieve.block_allocator import KVPool
from pensieve.block_copy import (
    Memcpy2DCopier,
    TorchCopier,
    check_runs,
    coalesce,
    host_memcpy_2d,
    pick_copier,
)
from pensieve.cudart import wrap_host_memory

LAYERS, BS, HEADS, DIM = 4, 4, 2, 8


def pool(blocks: int, dtype: torch.dtype = torch.float32, fill: bool = False) -> KVPool:
    p = KVPool.empty(LAYERS, blocks, BS, HEADS, DIM, dtype, torch.device("cpu"))
    if fill:
        p.keys.copy_(torch.randn(p.keys.shape))
        p.values.copy_(torch.randn(p.values.shape))
    return p


def expected(src: KVPool, dst: KVPool, pairs: list[tuple[int, int]], layers: range) -> KVPool:
    out = KVPool(dst.keys.clone(), dst.values.clone())
    for s, d in pairs:
        for layer in layers:
            out.keys[layer, d] = src.keys[layer, s]
            out.values[layer, d] = src.values[layer, s]
    return out


def test_coalesce_joins_only_runs_that_continue_on_both_sides() -> None:
    pairs = [(3, 7), (4, 8), (5, 9), (9, 1), (10, 3), (11, 4), (0, 0)]
    assert coalesce(pairs) == [(3, 7, 3), (9, 1, 1), (10, 3, 2), (0, 0, 1)]
    assert coalesce([]) == []


COPIERS = {
    "torch strided (CPU host)": lambda: TorchCopier(),
    "torch per layer (GPU host, no cuda-python)": lambda: TorchCopier(per_layer=True),
    "cudaMemcpy2D arithmetic": lambda: Memcpy2DCopier(host_memcpy_2d),
}


@pytest.mark.parametrize("name", list(COPIERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers", [range(LAYERS), range(1, 2), range(2, 4)])
def test_copiers_move_exactly_the_blocks_and_layers_asked(
    name: str, dtype: torch.dtype, layers: range
) -> None:
    src, dst = pool(12, dtype, fill=True), pool(9, dtype, fill=True)
    pairs = [(3, 4), (4, 5), (5, 6), (11, 0), (1, 8), (7, 2)]  # a run of three, then singles
    want = expected(src, dst, pairs, layers)
    copier = COPIERS[name]()
    copier.begin()
    copier.copy(src, dst, coalesce(pairs), layers)
    assert torch.equal(dst.keys, want.keys) and torch.equal(dst.values, want.values)


def test_runs_outside_a_pool_or_across_layouts_are_refused() -> None:
    src, dst = pool(4), pool(3)
    with pytest.raises(IndexError):
        check_runs(src, dst, coalesce([(2, 2), (3, 3)]))  # block 3 is past the destination
    with pytest.raises(IndexError):
        check_runs(src, dst, [(-1, 0, 1)])
    other = KVPool.empty(LAYERS, 3, BS, HEADS, DIM * 2, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="layout"):
        check_runs(src, other, [(0, 0, 1)])
    with pytest.raises(ValueError, match="dtype"):
        check_runs(src, pool(3, torch.bfloat16), [(0, 0, 1)])


def test_a_cpu_host_copies_with_torch() -> None:
    assert isinstance(pick_copier(torch.device("cpu"), None), TorchCopier)


def test_pinned_pool_memory_is_freed_with_its_last_view() -> None:
    """The host tier's exact-size pinned buffer (cudaHostAlloc on a GPU host) is wrapped as a
    tensor and freed only when no view is left: shown here with malloc/free."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    shape, freed = (LAYERS, 3, BS, HEADS, DIM), []
    nbytes = LAYERS * 3 * BS * HEADS * DIM * 2
    ptr = libc.malloc(nbytes)
    tensor = wrap_host_memory(ptr, nbytes, shape, torch.bfloat16, lambda: freed.append(ptr))
    assert tensor.shape == shape and tensor.data_ptr() == ptr and not tensor.any()
    layer = tensor[1]
    del tensor
    gc.collect()
    assert not freed  # a view still uses it
    layer.fill_(1.0)
    del layer
    gc.collect()
    assert freed == [ptr]
    libc.free(ptr)
