"""Batch-invariant matmuls: a token's result must not depend on which other rows share its call.

A GEMM library picks its kernel by the number of rows (a GEMV for one row, small-M and large-M
kernels above), and those kernels sum over K in different orders, so one token's projection can
differ in its last bits between a decode step of 1 row, one of 24 and a 512-token prefill.
Cached KV computed in one shape and reused beside KV computed in another then drifts from the
stateless oracle (the cause Thinking Machines described in "Defeating Nondeterminism in LLM
Inference", 2025).

`make_batch_invariant` sets each `pensieve.linear.Linear` to compute its rows in fixed tiles of
`TILE_ROWS` (the last one zero-padded), each its own call of one shape: the same kernel for
every row, wherever it sits, by construction. That costs, so each weight is first probed: where
the layer's own matmul already gives every row the same bits whatever the row count (oneDNN's
prepacked GEMMs do in bfloat16, and in float32 for most shapes, on the CPU we measured; MKL's
float32 GEMM does not), the one call is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from pensieve.linear import Linear

TILE_ROWS = 16
# row counts the probe compares: every count up to two tiles, then a few large ones
_PROBE_COUNTS = (*range(1, 2 * TILE_ROWS + 2), 48, 64, 100, 128, 256)
_PROBE_ROWS = 300
_SINGLE_ROWS = 64  # rows also probed one by one


@torch.inference_mode()
def rows_are_invariant(linear: Linear, seed: int = 0) -> bool:
    """Whether the layer's one-call matmul gives each row the same bits for every probed row
    count and offset."""
    w = linear.weight if linear.qweight is None else linear.qscale
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(_PROBE_ROWS, linear.in_features, generator=gen).to(w.device, w.dtype)
    whole = linear.matmul(x)
    for i, count in enumerate(_PROBE_COUNTS):
        start = (i * 37) % (_PROBE_ROWS - count)
        part = linear.matmul(x[start : start + count])
        if not torch.equal(part, whole[start : start + count]):
            return False
    # one row at a time, many times: oneDNN's one-row bfloat16 call of a K=1536 weight
    # differed in ~1 output of 7000 (bench/README.md, 2026-12-07), which one row would miss
    return all(
        torch.equal(linear.matmul(x[i : i + 1]), whole[i : i + 1]) for i in range(_SINGLE_ROWS)
    )


def make_batch_invariant(model: nn.Module, enabled: bool = True) -> dict[str, str]:
    """Set every `Linear` of the model to the plain call or to tiles; returns name -> choice.

    Weights of one shape and dtype are probed once (the kernel choice depends on those only).
    """
    verdicts: dict[tuple, bool] = {}
    chosen: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        w = module.weight if module.qweight is None else module.qweight
        key = (tuple(w.shape), w.dtype, getattr(module.qscale, "dtype", None), w.device.type,
               module.few_rows is not None)  # fmt: skip
        if enabled and key not in verdicts:
            verdicts[key] = rows_are_invariant(module)
        module.tile_rows = 0 if not enabled or verdicts[key] else TILE_ROWS
        chosen[name] = "tiles" if module.tile_rows else "plain"
    return chosen
