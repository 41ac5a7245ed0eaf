"""gpu_check, part 2: paged attention against torch SDPA, decode bandwidth, and the swapper.

The paged kernels run the way the engine runs them: `PagedAttentionBackend.attend` of one
layer (the step's new K/V written into their slots, then attention through the block tables),
on a shuffled pool. SDPA gets the same K/V already contiguous (the ideal), with the GQA group
folded into the query rows; "copy" gathers the context out of the pool first (copy-then-attend).
Decode bandwidth counts the K and V bytes each call must read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pensieve.actors.swapper import Swapper
from pensieve.block_allocator import KVPool
from pensieve.block_copy import TorchCopier
from pensieve.messages import LayerProgress, SequenceRows, SwapDone, SwapOrder
from pensieve.paged import PagedAttentionBackend, StepMetadata
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
Log = Callable[[str], None]


def time_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median milliseconds of one call (CUDA events on a GPU), after a warm-up call."""
    fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            fn()
            end.record(torch.cuda.current_stream(device))
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


def peak_copy_gbps(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth, read + write bytes: the memory's practical peak."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src), device, 10) * 1e-3) / 1e9


class PagedBatch:
    """`batch` sequences, each `queries` new rows after `past` cached tokens, in a shuffled
    one-layer pool."""

    def __init__(self, batch: int, queries: int, past: int, heads: tuple[int, int, int],
                 dtype: torch.dtype, device: torch.device, block_size: int = 16):  # fmt: skip
        hq, hkv, d = heads
        self.shape, self.ctx = (batch, queries, hq, hkv, d), past + queries
        per_seq = -(-self.ctx // block_size)
        blocks = batch * per_seq
        pool = (1, blocks, block_size, hkv, d)
        self.pool = KVPool(torch.randn(pool, dtype=dtype, device=device),
                           torch.randn(pool, dtype=dtype, device=device))  # fmt: skip
        order = random.Random(past + batch).sample(range(blocks), blocks)
        self.tables = [order[b * per_seq : (b + 1) * per_seq] for b in range(batch)]
        rows = [
            SequenceRows(
                b,
                [0] * queries,
                list(range(past, self.ctx)),
                self.tables[b],
                self.ctx,
                False,
                GREEDY,
            )  # fmt: skip
            for b in range(batch)
        ]
        meta = StepMetadata.build(rows, block_size, device)
        self.backend = PagedAttentionBackend(self.pool, meta)
        self.q = torch.randn(batch * queries, hq, d, dtype=dtype, device=device)
        self.k = torch.randn(batch * queries, hkv, d, dtype=dtype, device=device)
        self.v = torch.randn(batch * queries, hkv, d, dtype=dtype, device=device)
        self.paged()  # writes the new rows, so the contiguous copy below includes them
        self.kc, self.vc = self.gather(self.pool.keys[0]), self.gather(self.pool.values[0])
        group = hq // hkv
        self.qc = self.q.view(batch, queries, hkv, group, d).permute(0, 2, 3, 1, 4)
        self.qc = self.qc.reshape(batch, hkv, group * queries, d).contiguous()
        self.mask = None
        if queries > 1:  # bottom-right causal: query i sees the first past + i + 1 keys
            keys = torch.arange(self.ctx, device=device)[None, :]
            rows_pos = torch.arange(past, self.ctx, device=device)[:, None]
            self.mask = (keys <= rows_pos).repeat(group, 1)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.kc.numel() * self.kc.element_size()

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """Every sequence's context copied out of the pool: [B, Hkv, S, D]."""
        batch, _, _, hkv, d = self.shape
        tables = torch.tensor(self.tables, device=cache.device)
        rows = cache[tables].view(batch, -1, hkv, d)[:, : self.ctx]
        return rows.transpose(1, 2).contiguous()

    def paged(self) -> torch.Tensor:
        return self.backend.attend(0, self.q, self.k, self.v)

    def sdpa(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        k = self.kc if k is None else k
        v = self.vc if v is None else v
        return F.scaled_dot_product_attention(self.qc, k, v, attn_mask=self.mask)

    def copy_then_attend(self) -> torch.Tensor:
        return self.sdpa(self.gather(self.pool.keys[0]), self.gather(self.pool.values[0]))

    def sdpa_as_rows(self) -> torch.Tensor:
        """SDPA's output in the kernel's [B * n, Hq, D] layout."""
        batch, queries, hq, hkv, d = self.shape
        out = self.sdpa().view(batch, hkv, hq // hkv, queries, d).permute(0, 3, 1, 2, 4)
        return out.reshape(batch * queries, hq, d)


def kernels(device: torch.device, smoke: bool, peak: float, log: Log) -> list[dict]:
    """The paper's shape against SDPA and copy-then-attend, then the decode grid."""
    layouts = {"9q/3kv x 64 (SmolLM2)": (9, 3, 64)}
    if not smoke:
        layouts["32q/8kv x 128 (Llama-3-8B)"] = (32, 8, 128)
    paper = (2, 8, 64) if smoke else (32, 8, 2048)
    decode = [(b, c) for b in ((1, 2) if smoke else (1, 32, 128))
              for c in ((64, 128) if smoke else (2048, 8192))]  # fmt: skip
    repeat, dtype, results = (2 if smoke else 20), torch.bfloat16, []
    for name, heads in layouts.items():
        case = PagedBatch(*paper, heads, dtype, device)
        direct = case.paged()
        err = (direct.float() - case.sdpa_as_rows().float()).abs().max().item()
        same = torch.equal(direct, _via_numba_dispatcher(case.paged))
        t = {
            "paged": time_ms(case.paged, device, repeat),
            "sdpa": time_ms(case.sdpa, device, repeat),
            "copy": time_ms(case.copy_then_attend, device, repeat),
        }
        ok = err <= 2e-2 and same
        log(f"  {name}, batch {paper[0]} x {paper[1]} queries, {paper[2]} past: paged "
            f"{t['paged']:.3f} ms, SDPA contiguous {t['sdpa']:.3f} ms "
            f"({t['paged'] / t['sdpa']:.2f}x), copy-then-attend {t['copy']:.3f} ms; "
            f"max |paged - SDPA| {err:.4f}; direct launch == Numba's launcher: {same}  "
            f"{'ok' if ok else 'FAIL'}")  # fmt: skip
        results.append({"case": "paper", "layout": name, **t, "max_err": err,
                        "launch_paths_equal": same, "ok": ok})  # fmt: skip
        del case
        for batch, ctx in decode:
            case = PagedBatch(batch, 1, ctx - 1, heads, dtype, device)
            err = (case.paged().float() - case.sdpa_as_rows().float()).abs().max().item()
            tp, ts = time_ms(case.paged, device, repeat), time_ms(case.sdpa, device, repeat)
            gbps = case.kv_bytes / (tp * 1e-3) / 1e9
            sdpa_gbps = case.kv_bytes / (ts * 1e-3) / 1e9
            ok = err <= 2e-2
            log(f"  {name}, decode batch {batch:>3} x {ctx:>5}: paged {tp:.3f} ms "
                f"{gbps:7.1f} GB/s ({100 * gbps / peak:4.1f}% of peak), SDPA {ts:.3f} ms "
                f"{sdpa_gbps:7.1f} GB/s; max err {err:.4f}  {'ok' if ok else 'FAIL'}")  # fmt: skip
            results.append({"case": "decode", "layout": name, "batch": batch, "context": ctx,
                            "paged_ms": tp, "sdpa_ms": ts, "paged_gbps": gbps,
                            "sdpa_gbps": sdpa_gbps, "max_err": err, "ok": ok})  # fmt: skip
            del case
    return results


def _via_numba_dispatcher(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() with every kernel launched by Numba's dispatcher (`kernels.cuda_launch`)."""
    before = os.environ.get("PENSIEVE_NUMBA_LAUNCH")
    os.environ["PENSIEVE_NUMBA_LAUNCH"] = "1"
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["PENSIEVE_NUMBA_LAUNCH"]
        else:
            os.environ["PENSIEVE_NUMBA_LAUNCH"] = before


async def _swap(
    swapper: Swapper, direction: str, pairs: list, progress: LayerProgress | None = None
) -> SwapDone:
    reply = asyncio.get_running_loop().create_future()
    swapper.send(SwapOrder(direction, pairs, reply, progress))
    return await asyncio.wait_for(reply, 120)


async def _roundtrip(device: torch.device, smoke: bool, log: Log) -> list[dict]:
    """Swap out and back in, fragmented and as one run, with every copier this host has;
    every byte is compared and the bandwidth reported."""
    layers, blocks, n = (4, 32, 8) if smoke else (32, 512, 256)
    layout = (layers, blocks, 16, 8, 128, torch.bfloat16)
    dev = KVPool.empty(*layout, device=device)
    host = KVPool.empty(*layout, device=torch.device("cpu"), pin_memory=True)
    dev.keys.normal_()
    dev.values.normal_()
    rng, results = random.Random(3), []
    swapper = Swapper(dev, host)
    copiers = {type(swapper.copier).__name__: swapper.copier}
    if device.type == "cuda":
        copiers["TorchCopier(per_layer)"] = TorchCopier(per_layer=True)
    swapper.start()
    try:
        for name, copier in copiers.items():
            swapper.copier = copier
            for shape in ("fragmented", "one run"):
                if shape == "one run":
                    src, dst = list(range(n)), list(range(blocks - n, blocks))
                else:
                    src, dst = rng.sample(range(blocks), n), rng.sample(range(blocks), n)
                out = await _swap(swapper, "out", list(zip(src, dst, strict=True)))
                good = out.error is None and all(
                    torch.equal(host.keys[:, h], dev.keys[:, d].cpu())
                    and torch.equal(host.values[:, h], dev.values[:, d].cpu())
                    for d, h in zip(src, dst, strict=True)
                )
                back = rng.sample(range(blocks), n)
                progress = LayerProgress(layers)
                inn = await _swap(swapper, "in", list(zip(dst, back, strict=True)), progress)
                progress.wait(layers - 1)
                good = (
                    good
                    and inn.error is None
                    and all(
                        torch.equal(dev.keys[:, b].cpu(), host.keys[:, h])
                        and torch.equal(dev.values[:, b].cpu(), host.values[:, h])
                        for h, b in zip(dst, back, strict=True)
                    )
                )
                nbytes = n * dev.bytes_per_block
                gb_out, gb_in = nbytes / out.seconds / 1e9, nbytes / inn.seconds / 1e9
                log(f"  {name:<24} {shape:<10} {n} blocks ({nbytes / 2**20:.0f} MiB): out "
                    f"{gb_out:6.1f} GB/s, in (per layer) {gb_in:6.1f} GB/s; every byte "
                    f"{'equal' if good else 'DIFFERS'}")  # fmt: skip
                results.append({"copier": name, "shape": shape, "out_gbps": gb_out,
                                "in_gbps": gb_in, "ok": good})  # fmt: skip
    finally:
        await swapper.stop()
    return results


def swaps(device: torch.device, smoke: bool, log: Log) -> list[dict]:
    return asyncio.run(_roundtrip(device, smoke, log))


def overlap(loaded: LoadedModel, smoke: bool, log: Log) -> dict:
    """bench_swap on the given model: restore + step pipelined vs. their sum."""
    from pensieve.bench import bench_swap

    args = argparse.Namespace(
        model=None, dtype=None, device=None, context=256 if smoke else 4096,
        query=8 if smoke else 32, block_size=16, repeats=2 if smoke else 5,
    )  # fmt: skip
    t = asyncio.run(bench_swap.run(args, loaded))
    total = t["restore"] + t["compute"]
    log(f"  {loaded.name}, restore {args.context} tokens + a {args.query}-token step: restore "
        f"{t['restore'] * 1e3:.2f} ms, step {t['compute'] * 1e3:.2f} ms, sum "
        f"{total * 1e3:.2f} ms, pipelined {t['both'] * 1e3:.2f} ms "
        f"({t['both'] / total:.2f}x of the sum)")  # fmt: skip
    return {**t, "ratio": t["both"] / total}
