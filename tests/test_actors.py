"""Each actor in isolation, driven only by messages (the scheduler has its own file), and the
rule that keeps them apart: no actor imports another, and Engine only sends them messages."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
import torch

from pensieve.actors.base import Actor
from pensieve.actors.executor import Executor
from pensieve.actors.session_manager import SessionManager
from pensieve.actors.swapper import Swapper
from pensieve.block_allocator import KVPool
from pensieve.messages import (
    Accepted,
    Cancel,
    Delta,
    Finished,
    Forget,
    LayerProgress,
    OpenTurn,
    Rejected,
    SequenceRows,
    StepPlan,
    Submit,
    SwapOrder,
    TokenEvent,
    Usage,
)
from pensieve.reference import reference_generate
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams
from pensieve.tokenizer import ChatTokenizer

ROOT = Path(__file__).resolve().parents[1]
LAYERS, BS, KV_HEADS, HEAD_DIM = 3, 4, 2, 8


def pool(blocks: int) -> KVPool:
    return KVPool.empty(LAYERS, blocks, BS, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))


async def ask(actor: Actor, make, *args, **kwargs):  # noqa: ANN001, ANN201
    reply = asyncio.get_running_loop().create_future()
    actor.send(make(*args, reply=reply, **kwargs))
    return await asyncio.wait_for(reply, 120)  # a first step compiles kernels: slow if busy


class Recorder(Actor):
    """A stand-in for the actor that receives messages; never started: tests read its mailbox."""

    async def next(self) -> object:
        return await asyncio.wait_for(self.mailbox.get(), 5)


# ---- swapper ------------------------------------------------------------------------------


async def test_swapper_copies_both_ways_and_signals_every_layer() -> None:
    device, host = pool(6), pool(4)
    device.keys.normal_()
    device.values.normal_()
    swapper = Swapper(device, host)
    swapper.start()
    try:
        done = await ask(swapper, SwapOrder, "out", [(5, 0), (2, 3)])
        assert done.error is None and done.blocks == 2
        assert torch.equal(host.keys[:, 0], device.keys[:, 5])
        assert torch.equal(host.values[:, 3], device.values[:, 2])
        progress = LayerProgress(LAYERS)
        done = await ask(swapper, SwapOrder, "in", [(0, 1), (3, 4)], progress=progress)
        assert done.error is None and all(e.is_set() for e in progress.ready)
        progress.wait(LAYERS - 1)  # does not raise
        assert torch.equal(device.keys[:, 1], device.keys[:, 5])
        assert torch.equal(device.values[:, 4], device.values[:, 2])
    finally:
        await swapper.stop()


async def test_swapper_reports_a_failed_copy_and_fails_the_waiting_layers() -> None:
    swapper = Swapper(pool(2), None)  # no host tier: every copy fails
    swapper.start()
    try:
        progress = LayerProgress(LAYERS)
        done = await ask(swapper, SwapOrder, "in", [(0, 0)], progress=progress)
        assert done.error is not None and done.blocks == 0
        with pytest.raises(RuntimeError, match="swap-in failed"):
            progress.wait(0)
    finally:
        await swapper.stop()


# ---- executor -----------------------------------------------------------------------------


async def test_executor_steps_a_mixed_batch_like_the_oracle(tiny: LoadedModel) -> None:
    """A prefill row and a decode row in one step sample what the contiguous oracle samples."""
    cfg = tiny.model.config
    kv = KVPool.empty(
        cfg.num_hidden_layers, 8, BS, cfg.num_key_value_heads, cfg.head_dim,
        torch.float32, torch.device("cpu"),
    )  # fmt: skip
    executor = Executor(tiny.model, kv)
    executor.start()
    greedy = SamplingParams(temperature=0)
    one = SamplingParams(temperature=0, max_tokens=1)
    eos = tiny.tokenizer.eos_token_ids
    a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13]

    def row(rid: int, tokens: list[int], start: int, table: list[int]) -> SequenceRows:
        positions = list(range(start, start + len(tokens)))
        return SequenceRows(rid, tokens, positions, table, positions[-1] + 1, True, greedy)

    try:
        first = await ask(executor, StepPlan, 1, [row(1, a, 0, [3, 1]), row(2, b[:2], 0, [6])])
        assert first.error is None
        assert first.sampled[1] == reference_generate(tiny.model, a, one, eos)[0]
        second = await ask(executor, StepPlan, 2, [row(2, b[2:], 2, [6])])  # decode on its cache
        assert second.sampled[2] == reference_generate(tiny.model, b, one, eos)[0]
        bad = await ask(executor, StepPlan, 3, [row(3, [1], 9, [0])])  # position off its table
        assert bad.error is not None and bad.sampled == {}
        executor.send(Forget([1, 2]))
        await asyncio.sleep(0)
        assert await ask(executor, StepPlan, 4, [row(4, a, 0, [0, 2])]) is not None
    finally:
        await executor.stop()


# ---- session manager ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_folder(default_model_dir)


async def drain(queue: asyncio.Queue) -> list[object]:
    items = [await asyncio.wait_for(queue.get(), 5)]
    while not isinstance(items[-1], Finished):
        items.append(await asyncio.wait_for(queue.get(), 5))
    return items


async def test_session_manager_turns_token_events_into_text(tokenizer: ChatTokenizer) -> None:
    scheduler = Recorder()
    sessions = SessionManager(tokenizer, scheduler, max_context=2048, stateless=False)
    sessions.start()
    try:
        stream: asyncio.Queue = asyncio.Queue()
        messages = [{"role": "user", "content": "hi"}]
        sessions.send(OpenTurn(7, messages, None, SamplingParams(stop=["lo w"]), stream))
        submit = await scheduler.next()
        assert isinstance(submit, Submit) and submit.match_prefix and submit.request_id == 7
        assert submit.prompt_tokens == tokenizer.encode_chat(messages)
        sessions.send(Accepted(7, "conv-1"))
        ids = tokenizer.encode("Hello world, hello")
        sessions.send(TokenEvent(7, ids))
        sessions.send(TokenEvent(7, [], finish_reason="cancelled", usage=Usage(9, len(ids))))
        items = await drain(stream)
        assert items[0].conversation_id == "conv-1"  # type: ignore[union-attr]
        assert "".join(i.text for i in items if isinstance(i, Delta)) == "Hel"
        assert items[-1].reason == "stop"  # type: ignore[union-attr]
        assert await scheduler.next() == Cancel(7, "stop")  # the stop string ended it
    finally:
        await sessions.stop()


async def test_session_manager_refuses_bad_turns_before_the_scheduler(
    tokenizer: ChatTokenizer,
) -> None:
    scheduler = Recorder()
    sessions = SessionManager(tokenizer, scheduler, max_context=64, stateless=True)
    sessions.start()
    try:
        cases = [
            ([{"role": "user", "content": "hi"}], SamplingParams(temperature=9), "temperature"),
            ([{"role": "user", "content": "word " * 200}], SamplingParams(), "messages"),
            ([{"role": "nobody", "content": "hi"}], SamplingParams(), "messages"),
        ]
        for rid, (messages, sampling, param) in enumerate(cases):
            stream: asyncio.Queue = asyncio.Queue()
            sessions.send(OpenTurn(rid, messages, None, sampling, stream))
            (finished,) = await drain(stream)
            assert finished.error is not None and finished.error.param == param
        assert scheduler.mailbox.empty()
        stream = asyncio.Queue()
        sessions.send(
            OpenTurn(9, [{"role": "user", "content": "hi"}], "x", SamplingParams(), stream)
        )
        submit = await scheduler.next()
        assert not submit.keep_cache and not submit.match_prefix  # stateless
        sessions.send(Rejected(9, finished.error))
        (finished,) = await drain(stream)
        assert finished.reason == "error"
    finally:
        await sessions.stop()


# ---- the rule ---------------------------------------------------------------------------


def test_no_actor_imports_another_actor() -> None:
    """An actor's module imports only the base and its own parts (scheduler -> scheduler_disk,
    scheduler_questions -> scheduler_disk)."""
    parts = {"scheduler", "scheduler_disk", "scheduler_questions"}
    for path in (ROOT / "actors").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                name = node.module.removeprefix("pensieve.actors.")
                own = name == "base" or (path.stem in parts and name in parts)
                if node.module.startswith("pensieve.actors.") and not own:
                    pytest.fail(f"{path.name} imports {node.module}")


def test_engine_only_sends_messages_to_its_actors() -> None:
    """Engine may wire, start, stop and send to an actor; it reads none of their fields."""
    tree = ast.parse((ROOT / "pensieve" / "engine.py").read_text())
    actors = {"_scheduler", "_sessions"}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr in actors
        ):
            assert node.attr in {"connect", "send", "start", "stop"}, (
                f"Engine reads {node.value.attr}.{node.attr}"
            )
