"""Host memory in 2 MB pages for what every CPU step streams: the weights and the KV pool.

Why: a decode step with few rows reads all the weights from DRAM, and the attention reads its
KV blocks from anywhere in the pool; in 4 KB pages that is a TLB miss every 4 KB, each a page
walk (two-dimensional under a hypervisor). Linux gives anonymous memory 2 MB pages only where
asked (`transparent_hugepage` = madvise, the common default), and the weights are ~120 arrays
of 0.6-3.5 MB, most smaller than one such page, so they are cut from one buffer here in the
order the step reads them. Measured on a 2-core AMD EPYC (Zen 4) KVM guest, 8 alternating
rounds in one process: a 256 MB sum 33.1 -> 38.3 GB/s; one-row bfloat16 decode after 512
tokens 10.25 -> 9.77 ms, 8 rows 14.70 -> 14.12, int8 one row 5.76 -> 5.60 (weights only); the
pool in 2 MB pages, 24 rows 33.98 -> 33.32. The cost: there, memory the guest had never touched
took ~2 s a GiB to fault in as 2 MB pages (4 KB pages: ~0.25 s), once, at start-up; so only
what the steps stream goes here (bench/README.md). PENSIEVE_HUGE_PAGES=0 gives torch's
allocations instead (the weights are still packed into one buffer, in 4 KB pages).
"""

from __future__ import annotations

import math
import mmap
import os

import numpy as np
import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # every piece starts on a cache line
ENABLED = os.environ.get("PENSIEVE_HUGE_PAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def huge_page_zeros(nbytes: int, commit: bool = True) -> np.ndarray:
    """`nbytes` zeroed bytes (uint8), 64-byte aligned, in 2 MB pages where the kernel grants
    them (torch's zeros where it cannot be asked, or the size is under one such page).
    `commit`: write every page now, as `torch.zeros` does, so memory runs out at start-up if
    at all; without it the pages fault in as they are first written (a buffer filled piece by
    piece while the old copies are freed, so that loading peaks no higher than before)."""
    if not ENABLED or nbytes < HUGE_PAGE:
        return torch.zeros(nbytes, dtype=torch.uint8).numpy()
    # private anonymous memory (the default, shared, would be shmem, which this madvise
    # does not reach); page-aligned, not 2 MB-aligned, hence the extra page
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags)
    whole = np.frombuffer(region, np.uint8)  # keeps `region` alive as long as any view
    start = -whole.ctypes.data % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, len(region) - start)
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    out = whole[start : start + nbytes]
    if commit:
        out.fill(0)
    return out


def carve(sizes: list[int]) -> list[np.ndarray]:
    """Uint8 pieces of these sizes, in this order, cut from one `huge_page_zeros` buffer,
    each 64-byte aligned; zero, and committed only as they are written."""
    starts, end = [], 0
    for size in sizes:
        starts.append(end)
        end += -(-size // ALIGN) * ALIGN
    buffer = huge_page_zeros(end, commit=False)
    return [buffer[s : s + size] for s, size in zip(starts, sizes, strict=True)]


def huge_page_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed, committed host tensor on a `huge_page_zeros` buffer."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:  # torch cannot view an empty byte buffer as a wider dtype
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(huge_page_zeros(nbytes)).view(dtype).view(shape)
