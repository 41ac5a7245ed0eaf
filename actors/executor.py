"""The executor actor: runs one forward step over the whole batch, then samples.

Compute runs on a worker thread so the event loop keeps streaming tokens and taking requests
while the model works.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from pensieve.actors.base import Actor, Replies
from pensieve.block_allocator import KVPool
from pensieve.messages import StepPlan, StepResult
from pensieve.model import LlamaForCausalLM
from pensieve.paged import PagedAttentionBackend, StepMetadata
from pensieve.sampling import make_generator, sample_token


class Executor(Actor):
    name = "executor"

    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        replies: Replies,
        wait_for_layer: Callable[[int, int], None],
    ):
        super().__init__()
        self.model = model
        self.pool = pool
        self.replies = replies
        self.wait_for_layer = wait_for_layer
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pensieve-compute")
        self.generators: dict[int, torch.Generator | None] = {}

    async def handle(self, message: StepPlan | list[int]) -> None:
        if isinstance(message, list):  # request ids that finished: forget their generators
            for rid in message:
                self.generators.pop(rid, None)
            return
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.worker, self.run_step, message)
        except Exception as exc:  # reported to the scheduler, which fails only these requests
            result = StepResult(message.step_id, {}, 0.0, error=f"{type(exc).__name__}: {exc}")
        self.replies.resolve(message.reply_to, result)

    def run_step(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        device = self.model.device
        tokens, positions, slots, tables, qlens, clens, sample_rows = [], [], [], [], [], [], []
        for seq in plan.rows:
            tokens += seq.tokens
            positions += seq.positions
            slots += seq.slots
            tables.append(seq.block_table)
            qlens.append(len(seq.tokens))
            clens.append(seq.context_len)
            if seq.sample:
                sample_rows.append(len(tokens) - 1)
        meta = StepMetadata.build(slots, positions, tables, qlens, clens, device)
        ticket = plan.swap_in_ticket
        wait = None if ticket is None else (lambda layer: self.wait_for_layer(ticket, layer))
        backend = PagedAttentionBackend(self.pool, meta, wait)
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        hidden = self.model(ids, meta.positions.long(), backend)
        sampled: dict[int, int] = {}
        if sample_rows:
            logits = self.model.logits(hidden[torch.tensor(sample_rows, device=device)])
            to_sample = [seq for seq in plan.rows if seq.sample]
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
