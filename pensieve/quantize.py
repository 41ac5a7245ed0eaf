"""Weight-only int8: half the bytes a decode step reads, on CPU.

A decode step with few rows is bound by reading the weights; int8 weights with one float scale
per output row (symmetric, round to nearest) halve the bytes of bfloat16. The matmul is
torch's `_weight_int8pack_mm` where it is vectorised (AVX-512), `kernels/cpu_int8.py` elsewhere
(`pensieve.linear`); activations stay in the model's dtype. Embeddings, norms and
the KV cache keep their dtype; a tied lm_head gets its own int8 copy and the embedding keeps
the float table. The quantized model is its own model: the stateful == stateless invariant
holds against itself (the oracle runs the same quantized weights), not against bfloat16.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pensieve.huge_pages import carve
from pensieve.linear import Linear

QUANTIZATIONS = ("none", "int8")


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scale [N]) with weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


@torch.inference_mode()
def quantize_int8(model: nn.Module) -> int:
    """Every `Linear` of the model to int8 weights in place; returns the bytes saved."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("--quantize int8 runs on CPU only (int8 weight-only matmuls on CPU)")
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved = 0
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.qweight is None]
    # every int8 weight in one 2 MB-page buffer, in the model's order (`huge_pages`)
    pieces = carve([m.weight.numel() for m in linears])
    for module, piece in zip(linears, pieces, strict=True):
        weight = module.weight
        q, scale = quantize_rows_int8(weight)
        module.qweight = torch.from_numpy(piece.view(np.int8)).view(q.shape).copy_(q)
        module.qscale = scale.to(weight.dtype)
        if id(weight) not in shared:  # the float weight is no longer read: free it
            saved += weight.numel() * weight.element_size() - module.qweight.numel()
            module.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    return saved
