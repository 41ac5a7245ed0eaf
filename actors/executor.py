"""The executor actor: runs one forward step over the whole batch, then samples.

Compute runs on a worker thread so the event loop keeps streaming tokens and taking requests
while the model works. The step waits for a restore only through the plan's LayerProgress.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from pensieve.actors.base import Actor
from pensieve.block_allocator import KVPool
from pensieve.messages import Forget, StepPlan, StepResult
from pensieve.model import LlamaForCausalLM
from pensieve.paged import PagedAttentionBackend, StepMetadata
from pensieve.sampling import make_generator, sample_token


class Executor(Actor):
    name = "executor"

    def __init__(self, model: LlamaForCausalLM, pool: KVPool):
        super().__init__()
        self.model = model
        self.pool = pool
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pensieve-compute")
        self.generators: dict[int, torch.Generator | None] = {}  # request id -> its sampler

    async def handle(self, message: StepPlan | Forget) -> None:
        if isinstance(message, Forget):
            for rid in message.request_ids:
                self.generators.pop(rid, None)
            return
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.worker, self.run_step, message)
        except Exception as exc:  # reported to the scheduler, which fails only these requests
            result = StepResult(message.step_id, {}, 0.0, error=f"{type(exc).__name__}: {exc}")
        if not message.reply.done():
            message.reply.set_result(result)

    def run_step(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        device = self.model.device
        meta = StepMetadata.build(plan.rows, self.pool.keys.shape[2], device)
        wait = plan.restore.wait if plan.restore is not None else None
        backend = PagedAttentionBackend(self.pool, meta, wait)
        tokens = [t for seq in plan.rows for t in seq.tokens]
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        hidden = self.model(ids, meta.positions.long(), backend)
        sampled: dict[int, int] = {}
        to_sample = [seq for seq in plan.rows if seq.sample]
        if to_sample:
            logits = self.model.logits(hidden[meta.sample_rows])
            for row, seq in zip(logits, to_sample, strict=True):
                if seq.request_id not in self.generators:
                    self.generators[seq.request_id] = make_generator(seq.sampling, device)
                sampled[seq.request_id] = sample_token(
                    row, seq.sampling, self.generators[seq.request_id]
                )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return StepResult(plan.step_id, sampled, time.perf_counter() - started)

    async def stop(self) -> None:
        await super().stop()
        self.worker.shutdown(wait=True)
