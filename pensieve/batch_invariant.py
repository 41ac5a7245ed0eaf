"""Batch-invariant matmuls: a token's result must not depend on which other rows share its call.

A GEMM library picks its kernel by the number of rows (a GEMV for one row, small-M and large-M
kernels above), and those kernels sum over K in different orders, so one token's projection can
differ in its last bits between a decode step of 1 row, one of 24 and a 512-token prefill.
Cached KV computed in one shape and reused beside KV computed in another then drifts from the
stateless oracle (the cause Thinking Machines described in "Defeating Nondeterminism in LLM
Inference", 2025).

`Linear` below computes its rows in fixed tiles of `TILE_ROWS` (the last one zero-padded), each
its own call of one shape: the same kernel for every row, wherever it sits, by construction.
That costs (measured in bench_step), so each weight is first probed: where the library's own
kernel already gives every row the same bits whatever the row count (oneDNN's AVX512-BF16 GEMM
does on the CPUs we measured; its float32 path does not), the plain call is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TILE_ROWS = 16
# row counts the probe compares: every count up to two tiles, then a few large ones
_PROBE_COUNTS = (*range(1, 2 * TILE_ROWS + 2), 48, 64, 100, 128, 256)
_PROBE_ROWS = 300


class Linear(nn.Linear):
    """nn.Linear (no bias) that can run its rows in fixed-size tiles (`tile_rows` > 0), and
    from int8 weights (`pensieve.quantize`: `qweight`, one scale per output row)."""

    tile_rows: int = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # buffers, so that they are in the state dict (the disk tier's fingerprint covers them)
        self.qweight: torch.Tensor | None
        self.qscale: torch.Tensor | None
        self.register_buffer("qweight", None)
        self.register_buffer("qscale", None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T in one call, whatever the number of rows."""
        if self.qweight is not None:
            return torch._weight_int8pack_mm(x, self.qweight, self.qscale.to(x.dtype))
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tile_rows:
            return self.matmul(x)
        return tiled_linear(x, self.matmul, self.tile_rows)


def tiled_linear(
    x: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor], tile: int
) -> torch.Tensor:
    """matmul(x) computed `tile` rows per call; the last tile padded with zero rows."""
    rows = x.shape[0]
    pad = -rows % tile
    if pad or rows == 0:
        x = torch.cat([x, x.new_zeros((pad or tile, x.shape[1]))])
    out = torch.cat([matmul(x[i : i + tile]) for i in range(0, x.shape[0], tile)])
    return out[:rows]


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
    return True


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
        key = (tuple(w.shape), w.dtype, getattr(module.qscale, "dtype", None), w.device.type)
        if enabled and key not in verdicts:
            verdicts[key] = rows_are_invariant(module)
        module.tile_rows = 0 if not enabled or verdicts[key] else TILE_ROWS
        chosen[name] = "tiles" if module.tile_rows else "plain"
    return chosen
