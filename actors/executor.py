"""The executor actor: runs one forward step over the whole batch, then samples.

Compute runs on the process's compute thread (`pensieve.compute_thread`) so the event loop keeps
streaming tokens and taking requests while the model works. The step waits for a restore only
through the plan's LayerProgress.
"""

from __future__ import annotations

import asyncio
import time

import torch

from pensieve.actors.base import Actor
from pensieve.block_allocator import KVPool
from pensieve.compute_thread import compute_executor
from pensieve.messages import Forget, SequenceRows, StepPlan, StepResult
from pensieve.model import LlamaForCausalLM
from pensieve.paged import PagedAttentionBackend, StepMetadata
from pensieve.sampling import RequestSampler, Sampled, argmax_rows


class Executor(Actor):
    name = "executor"

    def __init__(self, model: LlamaForCausalLM, pool: KVPool, deterministic: bool = False):
        super().__init__()
        self.model = model
        self.pool = pool
        self.deterministic = deterministic  # attention in its batch-invariant order
        # torch's thread count where the engine was built, for the compute thread too (a new
        # thread may start with another; the count decides how torch splits its reductions)
        self.threads = torch.get_num_threads()
        self.worker = compute_executor()  # shared: the process's one multi-threaded torch user
        self.samplers: dict[int, RequestSampler] = {}  # request id -> its sampling state

    async def handle(self, message: StepPlan | Forget) -> None:
        if isinstance(message, Forget):
            for rid in message.request_ids:
                self.samplers.pop(rid, None)
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
        torch.set_num_threads(self.threads)
        device = self.model.device
        meta = StepMetadata.build(plan.rows, self.pool.keys.shape[2], device)
        wait = plan.restore.wait if plan.restore is not None else None
        backend = PagedAttentionBackend(self.pool, meta, wait, deterministic=self.deterministic)
        tokens = [t for seq in plan.rows for t in seq.tokens]
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        hidden = self.model(ids, meta.positions.long(), backend)
        to_sample = [seq for seq in plan.rows if seq.sample]
        sampled: dict[int, int] = {}
        logprobs: dict[int, Sampled] = {}
        if to_sample:
            # no gather where a decode batch samples every row (~0.1 ms cold at one row)
            rows = hidden if meta.samples_every_row else hidden[meta.sample_rows]
            logits = self.model.logits(rows)
            self.sample(to_sample, logits, sampled, logprobs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return StepResult(plan.step_id, sampled, time.perf_counter() - started, logprobs=logprobs)

    def sample(
        self,
        rows: list[SequenceRows],
        logits: torch.Tensor,
        sampled: dict[int, int],
        logprobs: dict[int, Sampled],
    ) -> None:
        """Plain greedy rows with one batched argmax; the rest one by one."""
        samplers = []
        for seq in rows:
            if seq.request_id not in self.samplers:
                self.samplers[seq.request_id] = RequestSampler(seq.sampling, logits.device)
            samplers.append(self.samplers[seq.request_id])
        greedy = [i for i, s in enumerate(samplers) if s.plain_greedy]
        if greedy:  # every row greedy (the usual decode batch): no copy of the rows
            best = argmax_rows(logits if len(greedy) == len(rows) else logits[greedy])
            for i, token in zip(greedy, best, strict=True):
                sampled[rows[i].request_id] = token
                samplers[i].counts[token] = samplers[i].counts.get(token, 0) + 1
        for i, sampler in enumerate(samplers):
            if not sampler.plain_greedy:
                token, lp = sampler.sample(logits[i])
                sampled[rows[i].request_id] = token
                if lp is not None:
                    logprobs[rows[i].request_id] = lp

    async def stop(self) -> None:
        await super().stop()
        # the thread outlives this engine: wait for the step in flight (jobs run in order)
        await asyncio.get_running_loop().run_in_executor(self.worker, lambda: None)
