"""The model's linear layer: one matmul per call, from whichever weight form runs fastest here.

- On CPU the weight is prepacked once into oneDNN's blocked layout (`pack_for_cpu`) where
  oneDNN has a kernel for its dtype (float32; bfloat16 with AVX-512 or AVX-NE-CONVERT): a decode
  step's matmuls ran 1.3-2x faster than `F.linear` on the plain tensor (bfloat16, 1 row), and
  the packed GEMM gives every row the same bits whatever the row count (`batch_invariant`).
  Up to `FEW_ROWS` bfloat16 rows run `kernels/cpu_bf16_matmul` instead where it reproduces
  oneDNN's bits for the weight (checked when packing): a one-row step's matmuls ~1.6x faster,
  for a second copy of the weight (`few_rows`, ~270 MB for the default model). Up to
  `FEW_F32_ROWS` float32 rows run `kernels/cpu_f32_matmul` the same way (~540 MB more).
- `--quantize int8` replaces it with int8 rows and a scale each (`pensieve.quantize`), run by
  torch's int8 matmul where it is vectorised (AVX-512; a few bfloat16 rows by
  `cpu_int8_torch_order`'s copy of its bits, faster), by `kernels/cpu_int8.py` elsewhere.
- `tile_rows` > 0 runs the rows in fixed tiles (set by `batch_invariant` where needed).
The dense `weight` stays the source of truth (state dict, tied embeddings, fingerprints).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pensieve.huge_pages import carve
from pensieve.kernels import cpu_bf16_matmul, cpu_f32_matmul
from pensieve.kernels.cpu_bf16_matmul import FewRowsWeight
from pensieve.kernels.cpu_int8 import (
    TORCH_INT8_VECTORISED,
    Int8Weight,
    fits_int8_matmul,
)
from pensieve.kernels.cpu_int8_torch_order import FASTER_UP_TO_ROWS

PACK_BATCH_HINT = 64  # oneDNN's layout choice; with 1 its float32 GEMM was not row-invariant
# Up to this many rows `cpu_bf16_matmul` runs a bfloat16 matmul, more rows oneDNN's GEMM. Its
# time over oneDNN's, weights from DRAM (2-core Zen 4 EPYC): 1 row 0.45-0.76, 24-64 rows
# 0.75-1.0, 96-256 rows 0.82-0.99, 280-512 rows 0.91-1.03 (even: a lone call keeps oneDNN's).
# A whole step of up to `cpu_decoder.LOOP_ROWS` rows runs these kernels in one loop instead.
FEW_ROWS = 256
# Up to this many rows `cpu_f32_matmul` runs a float32 matmul, more rows oneDNN's GEMM. Its
# time over oneDNN's, the model's 121 matmuls from DRAM (6 alternating rounds, 2-core Zen 3
# EPYC, AVX2): 1 row 0.61, 2-8 rows 0.70-0.73, 16-64 rows 0.70-0.86, 128-512 rows 0.84-0.92.
# Past the default step budget (`max_batch_tokens`), unmeasured, oneDNN keeps the rows.
FEW_F32_ROWS = 512


class Linear(nn.Linear):
    """nn.Linear (no bias) that can run its rows in fixed-size tiles (`tile_rows` > 0), and
    from int8 weights (`pensieve.quantize`: `qweight`, one scale per output row)."""

    tile_rows: int = 0
    packed: torch.Tensor | None = None  # oneDNN's blocked copy of `weight` (CPU)
    # `weight` for `cpu_bf16_matmul` or `cpu_f32_matmul`, oneDNN's bits; up to `few_up_to` rows
    few_rows: FewRowsWeight | None = None  # or its float32 subclass, `FewRowsF32Weight`
    few_up_to: int = 0
    int8_weight: Int8Weight | None = None  # `qweight` and `qscale` as cpu_int8 takes them

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # buffers, so that they are in the state dict (the disk tier's fingerprint covers them)
        self.qweight: torch.Tensor | None
        self.qscale: torch.Tensor | None
        self.register_buffer("qweight", None)
        self.register_buffer("qscale", None)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("qweight", "qscale"):  # a new int8 weight: converted again at its next use
            self.__dict__.pop("int8_weight", None)
            if value is not None:  # the dense copies are unused from now on
                self.__dict__.pop("packed", None)
                self.__dict__.pop("few_rows", None)
        super().__setattr__(name, value)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T in one call, whatever the number of rows."""
        prepared = self.int8_weight  # first: a plain attribute, where a buffer's lookup is not
        if prepared is not None or self.qweight is not None:
            return self.int8_matmul(x, prepared)
        if self.packed is not None and x.dtype == self.weight.dtype:
            few = self.few_rows
            if few is not None and x.dim() == 2 and x.shape[0] <= self.few_up_to:
                return few.matmul(x)
            return onednn_matmul(x, self.packed)
        return F.linear(x, self.weight)

    def int8_matmul(self, x: torch.Tensor, prepared: Int8Weight | None = None) -> torch.Tensor:
        """x @ (qweight * qscale).T: torch's int8 matmul where it is vectorised (one or two
        bfloat16 rows through `cpu_int8_torch_order`'s copy of its bits), `cpu_int8`'s kernels
        elsewhere. `prepared`: `int8_weight` where it is already converted (the ~120 calls of a
        one-row step each saved ~2 us of attribute lookups)."""
        if prepared is None:
            if not fits_int8_matmul(self.qweight):
                return torch._weight_int8pack_mm(x, self.qweight, self.qscale.to(x.dtype))
            prepared = self.prepared_int8()
        if not TORCH_INT8_VECTORISED:
            return prepared.matmul(x)
        few = x.shape[0] <= FASTER_UP_TO_ROWS
        if few and x.dtype == torch.bfloat16 and prepared.rows_as_torch:
            return prepared.matmul_as_torch(x)
        return torch._weight_int8pack_mm(x, prepared.qweight, prepared.scale.to(x.dtype))

    def prepared_int8(self) -> Int8Weight:
        """`qweight` and `qscale` converted for `cpu_int8` once, again if either is replaced."""
        prepared = self.int8_weight
        if (
            prepared is None
            or prepared.qweight is not self.qweight
            or prepared.scale is not self.qscale
        ):
            prepared = self.int8_weight = Int8Weight(self.qweight, self.qscale)
        return prepared

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


def pack_for_cpu(model: nn.Module) -> int:
    """Prepack every dense CPU `Linear` for oneDNN, and for `cpu_bf16_matmul` (bfloat16) or
    `cpu_f32_matmul` (float32) where that gives oneDNN's bits; returns how many (0 where
    unavailable). Where oneDNN has no bfloat16 kernel on this CPU, bfloat16 weights stay on
    `F.linear`."""
    if not torch.backends.mkldnn.is_available():
        return 0
    linears = [
        m
        for m in model.modules()
        if isinstance(m, Linear)
        and m.qweight is None
        and m.weight.device.type == "cpu"
        and onednn_packs(m.weight.dtype)
    ]
    new = [m for m in linears if m.packed is None]
    for module in new:
        w = module.weight
        module.packed = reorder_for_onednn(w)
        module.few_rows = few_rows_form(w, module.packed)
        module.few_up_to = FEW_ROWS if w.dtype == torch.bfloat16 else FEW_F32_ROWS
    _into_huge_pages([m.few_rows for m in new if m.few_rows is not None])
    return len(linears)


def few_rows_form(w: torch.Tensor, packed: torch.Tensor) -> FewRowsWeight | None:
    """w for `cpu_bf16_matmul` (bfloat16) or `cpu_f32_matmul` (float32), where that kernel
    gives the bits of oneDNN's matmul from `packed` (w's `reorder_for_onednn`); else None."""
    kernels = cpu_bf16_matmul if w.dtype == torch.bfloat16 else cpu_f32_matmul
    return kernels.few_rows_weight(w, _onednn_of(w, packed))


def _into_huge_pages(forms: list[FewRowsWeight]) -> None:
    """Move the forms' blocks into one 2 MB-page buffer, in the model's order (`huge_pages`:
    a one-row step streams them all from DRAM)."""
    for form, piece in zip(forms, carve([f.blocks.nbytes for f in forms]), strict=True):
        piece[:] = form.blocks.view(np.uint8)
        form.blocks = piece.view(form.blocks.dtype)


def _onednn_of(
    weight: torch.Tensor, packed: torch.Tensor
) -> Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """w -> oneDNN's matmul of w, from `packed` where w is `weight` (packed already)."""

    def onednn(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return partial(onednn_matmul, packed=packed if w is weight else reorder_for_onednn(w))

    return onednn


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks `dtype` weights on this CPU: float32 always; bfloat16 only with
    avx512bw/vl/dq or avx_ne_convert (elsewhere its reorder raises)."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def reorder_for_onednn(w: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of the weight w [N, K], for `onednn_matmul`."""
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT)


def onednn_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W.T from W's `reorder_for_onednn` copy."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
