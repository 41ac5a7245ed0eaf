"""The paper's kernel experiment on this host's CPU: paged multi-input attention vs. its peers.

Batch 32 x 8 query tokens (and 32 x 1, decode) over cached contexts of 256..2048 tokens, default
model head layout (9 query heads, 3 KV heads, head dim 64), block tables shuffled. Compared:
  paged     the Numba CPU kernel reading the paged pool in place (what the engine runs);
  contig    torch SDPA on the same K/V already laid out contiguously [B, Hkv, S, D] (the ideal),
            in its fastest form here: the GQA group folded into the query rows;
  gqa       the same SDPA called the usual way, [B, Hq, n, D] queries with enable_gqa=True;
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
from pensieve.kernels.testing import make_paged_case

HQ, HKV, D = 9, 3, 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _time_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time per call; the methods take turns so that load drifts hit all alike."""
    for fn in fns.values():  # warm-up: JIT, caches, page faults
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


class Case:
    """One batch: a shuffled paged pool plus the same K/V laid out contiguously."""

    def __init__(self, batch: int, queries: int, past: int, block_size: int, dtype: torch.dtype):
        self.ctx = past + queries
        self.queries = queries
        seqs = [(self.ctx, list(range(past, self.ctx)))] * batch
        self.paged_case = make_paged_case(
            seqs, hq=HQ, hkv=HKV, d=D, block_size=block_size, dtype=dtype, seed=past + queries
        )
        pc = self.paged_case
        # the contiguous ideal, in SDPA's fastest form here (measured): the GQA group folded
        # into the query rows, [B, Hkv, group * n, D] against K/V [B, Hkv, S, D]
        group = HQ // HKV
        self.k_contig = self.gather(pc.k_cache)
        self.v_contig = self.gather(pc.v_cache)
        self.q_contig = pc.q.view(batch, queries, HKV, group, D).permute(0, 2, 3, 1, 4)
        self.q_contig = self.q_contig.reshape(batch, HKV, group * queries, D).contiguous()
        visible = torch.arange(self.ctx)[None, :] <= pc.query_positions[:queries, None]
        self.mask = None if bool(visible.all()) else visible.repeat(group, 1)

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """Copy every sequence's context out of the pool: [B, Hkv, S, D]."""
        tables = self.paged_case.block_tables[:, :-1].long()  # the last column is padding
        batch, nblk = tables.shape
        rows = cache[tables].view(batch, nblk * cache.shape[1], HKV, D)
        return rows[:, : self.ctx].transpose(1, 2).contiguous()

    def sdpa(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            self.q_contig, k, v, attn_mask=self.mask, scale=self.paged_case.scale
        )

    def unfold(self, out: torch.Tensor) -> torch.Tensor:
        """SDPA's [B, Hkv, group * n, D] back to the kernel's [B * n, Hq, D]."""
        batch = out.shape[0]
        out = out.view(batch, HKV, HQ // HKV, self.queries, D).permute(0, 3, 1, 2, 4)
        return out.reshape(batch * self.queries, HQ, D)

    def paged(self) -> torch.Tensor:
        return paged_attention_cpu(*self.paged_case.args(), validate=False)

    def contiguous(self) -> torch.Tensor:
        return self.sdpa(self.k_contig, self.v_contig)

    def contiguous_gqa(self) -> torch.Tensor:
        pc = self.paged_case
        batch = pc.block_tables.shape[0]
        q = pc.q.view(batch, self.queries, HQ, D).transpose(1, 2)
        mask = None if self.mask is None else self.mask[: self.queries]
        return F.scaled_dot_product_attention(
            q, self.k_contig, self.v_contig, attn_mask=mask, scale=pc.scale, enable_gqa=True
        )

    def copy_then_attend(self) -> torch.Tensor:
        return self.sdpa(self.gather(self.paged_case.k_cache), self.gather(self.paged_case.v_cache))

    def one_by_one(self) -> list[torch.Tensor]:
        """Each query token in its own call, as a kernel without multi-input support must."""
        pc = self.paged_case
        batch = pc.block_tables.shape[0]
        ones = torch.arange(batch + 1, dtype=torch.int32)
        outs = []
        for i in range(self.queries):
            rows = torch.arange(batch) * self.queries + i
            outs.append(
                paged_attention_cpu(
                    pc.q[rows],
                    pc.k_cache,
                    pc.v_cache,
                    pc.block_tables,
                    ones,
                    pc.query_positions[rows],
                    pc.context_lens,
                    pc.scale,
                    validate=False,
                )
            )
        return outs


def run(repeat: int, dtypes: list[str], block_size: int, batch: int) -> list[str]:
    """Time every method on every case; return the markdown table's lines."""
    head = (
        "| dtype | queries | past | paged ms | contig ms | gqa ms | copy ms | 1-by-1 ms "
        "| paged/contig | paged/gqa | copy/contig | 1-by-1/contig |"
    )
    lines = [head, "|" + "---|" * 12]
    print("\n".join(lines), flush=True)
    for name in dtypes:
        for queries in (8, 1):
            for past in (256, 512, 1024, 2048):
                case = Case(batch, queries, past, block_size, DTYPES[name])
                ref = case.unfold(case.contiguous()).float()
                err = (case.paged().float() - ref).abs().max().item()
                if err > 2e-2:
                    raise AssertionError(f"paged kernel disagrees with SDPA by {err}")
                fns = {
                    "paged": case.paged,
                    "contig": case.contiguous,
                    "gqa": case.contiguous_gqa,
                    "copy": case.copy_then_attend,
                }
                if queries > 1:
                    fns["one"] = case.one_by_one
                t = {"one": math.nan, **_time_ms(fns, repeat)}
                c = t["contig"]
                one = "-" if math.isnan(t["one"]) else f"{t['one']:.2f}"
                one_ratio = "-" if math.isnan(t["one"]) else f"{t['one'] / c:.2f}"
                lines.append(
                    f"| {name} | {batch}x{queries} | {past} | {t['paged']:.2f} | {c:.2f} "
                    f"| {t['gqa']:.2f} | {t['copy']:.2f} | {one} | {t['paged'] / c:.2f} "
                    f"| {t['paged'] / t['gqa']:.2f} | {t['copy'] / c:.2f} | {one_ratio} |"
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
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"block size {args.block_size}, median of {args.repeat}\n"
    )
    run(args.repeat, dtypes, args.block_size, args.batch)


if __name__ == "__main__":
    main()
