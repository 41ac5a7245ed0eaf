"""The paper's kernel experiment on this host's CPU: paged multi-input attention vs. its peers.

Batch 32 x 8 query tokens (and 32 x 1, decode) over cached contexts of 256..2048 tokens, default
model head layout (9 query heads, 3 KV heads, head dim 64), block tables shuffled. Compared:
  paged     the Numba CPU kernel reading the paged pool in place (what the engine runs);
  contig    torch SDPA on the same K/V already laid out contiguously [B, H, S, D] (the ideal);
  copy      gather the context out of the pool, then the same SDPA (copy-then-attend);
  1-by-1    the paged kernel called once per query token (no multi-input support).
Run: python -m pensieve.bench.bench_kernels [--repeat N] [--dtype float32|bfloat16|both]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pensieve.kernels.cpu_attention import paged_attention_cpu

HQ, HKV, D = 9, 3, 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _time_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of `repeat` calls after one warm-up call (JIT, caches, page faults)."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


class Case:
    """One batch: a shuffled paged pool plus the same K/V laid out contiguously."""

    def __init__(self, batch: int, queries: int, past: int, block_size: int, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(past * 131 + queries)
        self.ctx = past + queries
        self.queries = queries
        nblk = -(-self.ctx // block_size)
        num_blocks = batch * nblk
        self.k_cache = torch.randn(num_blocks, block_size, HKV, D, generator=gen).to(dtype)
        self.v_cache = torch.randn(num_blocks, block_size, HKV, D, generator=gen).to(dtype)
        perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
        self.tables = perm.view(batch, nblk).contiguous()
        self.q = torch.randn(batch * queries, HQ, D, generator=gen).to(dtype)
        self.starts = torch.arange(0, batch * queries + 1, queries, dtype=torch.int32)
        self.positions = (torch.arange(queries, dtype=torch.int32) + past).repeat(batch)
        self.context_lens = torch.full((batch,), self.ctx, dtype=torch.int32)
        self.scale = 1.0 / math.sqrt(D)
        # the contiguous ideal: [B, Hkv, S, D] and query-major [B, Hq, n, D]
        self.k_contig = self.gather(self.k_cache)
        self.v_contig = self.gather(self.v_cache)
        self.q_contig = self.q.view(batch, queries, HQ, D).transpose(1, 2).contiguous()
        visible = torch.arange(self.ctx)[None, :] <= self.positions[:queries, None]
        self.mask = None if bool(visible.all()) else visible

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """Copy every sequence's context out of the pool: [B, Hkv, S, D]."""
        batch, nblk = self.tables.shape
        rows = cache[self.tables.long()].view(batch, nblk * cache.shape[1], HKV, D)
        return rows[:, : self.ctx].transpose(1, 2).contiguous()

    def sdpa(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            self.q_contig, k, v, attn_mask=self.mask, scale=self.scale, enable_gqa=True
        )

    def paged(self) -> torch.Tensor:
        return paged_attention_cpu(
            self.q, self.k_cache, self.v_cache, self.tables, self.starts, self.positions,
            self.context_lens, self.scale, validate=False,
        )

    def contiguous(self) -> torch.Tensor:
        return self.sdpa(self.k_contig, self.v_contig)

    def copy_then_attend(self) -> torch.Tensor:
        return self.sdpa(self.gather(self.k_cache), self.gather(self.v_cache))

    def one_by_one(self) -> list[torch.Tensor]:
        """Each query token in its own call, as a kernel without multi-input support must."""
        batch = self.tables.shape[0]
        ones = torch.arange(batch + 1, dtype=torch.int32)
        outs = []
        for i in range(self.queries):
            rows = torch.arange(batch) * self.queries + i
            outs.append(paged_attention_cpu(
                self.q[rows], self.k_cache, self.v_cache, self.tables, ones,
                self.positions[rows], self.context_lens, self.scale, validate=False,
            ))
        return outs


def run(repeat: int, dtypes: list[str], block_size: int, batch: int) -> list[str]:
    """Time every method on every case; return the markdown table's lines."""
    head = ("| dtype | queries | past | paged ms | contig ms | copy ms | 1-by-1 ms "
            "| paged/contig | copy/contig | 1-by-1/contig |")
    lines = [head, "|" + "---|" * 10]
    print("\n".join(lines), flush=True)
    for name in dtypes:
        for queries in (8, 1):
            for past in (256, 512, 1024, 2048):
                case = Case(batch, queries, past, block_size, DTYPES[name])
                ref = case.contiguous().transpose(1, 2).reshape(case.q.shape).float()
                err = (case.paged().float() - ref).abs().max().item()
                if err > 2e-2:
                    raise AssertionError(f"paged kernel disagrees with SDPA by {err}")
                t = {
                    "paged": _time_ms(case.paged, repeat),
                    "contig": _time_ms(case.contiguous, repeat),
                    "copy": _time_ms(case.copy_then_attend, repeat),
                    "one": _time_ms(case.one_by_one, repeat) if queries > 1 else math.nan,
                }
                c = t["contig"]
                lines.append(
                    f"| {name} | {batch}x{queries} | {past} | {t['paged']:.2f} | {c:.2f} "
                    f"| {t['copy']:.2f} | {t['one']:.2f} | {t['paged'] / c:.2f} "
                    f"| {t['copy'] / c:.2f} | {t['one'] / c:.2f} |"
                )
                print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--block-size", type=int, default=32, choices=(16, 32))
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"block size {args.block_size}, median of {args.repeat}\n")
    run(args.repeat, dtypes, args.block_size, args.batch)


if __name__ == "__main__":
    main()
