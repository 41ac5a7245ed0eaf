"""The library's request features on the tiny model: tenants, sampling controls honoured for
real (logit bias, penalties, min_p, logprobs), raw-text completions and the context cap."""

from __future__ import annotations

import pytest
import torch

from pensieve.attention import ContiguousKV
from pensieve.config import EngineConfig
from pensieve.engine import Engine
from pensieve.errors import ContextLengthError, InvalidRequestError, NotFoundError
from pensieve.policy import CostModel
from pensieve.reference import reference_generate
from pensieve.runtime import LoadedModel
from pensieve.sampling import SamplingParams


def engine_for(tiny: LoadedModel, **overrides: object) -> Engine:
    config = EngineConfig(block_size=16, profile_cost=False, **overrides)  # type: ignore[arg-type]
    return Engine(config, loaded=tiny, cost_model=CostModel.linear())


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def all_logits(tiny: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """The oracle's logits at every position of `tokens` (one contiguous forward)."""
    model = tiny.model
    kv = ContiguousKV(model.config.num_hidden_layers)
    ids = torch.tensor(tokens, dtype=torch.long)
    hidden = model(ids, torch.arange(len(tokens)), kv)
    return model.logits(hidden).float().clone()  # a plain tensor, editable outside inference


async def test_tenants_never_see_each_others_conversations(tiny: LoadedModel) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=4)
    async with engine_for(tiny) as engine:
        a = engine.chat(user("alpha beta gamma"), "chat-1", greedy, tenant="A")
        b = engine.chat(user("delta epsilon"), "chat-1", greedy, tenant="B")  # same id, own one
        await a.text()
        await b.text()
        assert [c.id for c in await engine.conversations(tenant="A")] == ["chat-1"]
        assert [c.id for c in await engine.conversations(tenant="B")] == ["chat-1"]
        assert await engine.conversations() == []  # the anonymous tenant has none
        info_a = await engine.conversation("chat-1", tenant="A")
        info_b = await engine.conversation("chat-1", tenant="B")
        assert info_a.tokens_total != info_b.tokens_total
        with pytest.raises(NotFoundError):
            await engine.conversation("chat-1", tenant="C")
        with pytest.raises(NotFoundError):
            await engine.delete_conversation("chat-1", tenant="C")

        # a client resending its history finds its own conversation, never another tenant's
        anon = engine.chat(user("what do rivers know"), None, greedy, tenant="A")
        await anon.text()
        reply = engine.tokenizer.decode(anon.token_ids)
        history = [*user("what do rivers know"), {"role": "assistant", "content": reply}]
        history += user("and then?")
        theirs = engine.chat(history, None, greedy, tenant="B")
        await theirs.text()
        assert theirs.conversation_id != anon.conversation_id and theirs.usage.cached_tokens == 0
        mine = engine.chat(history, None, greedy, tenant="A")
        await mine.text()
        assert mine.conversation_id == anon.conversation_id and mine.usage.cached_tokens > 0
        assert len(anon.conversation_id) == 32  # 128 random bits, hex

        await engine.delete_conversation("chat-1", tenant="B")
        assert (await engine.conversation("chat-1", tenant="A")).tokens_total > 0
        await engine.check_accounting()


async def test_logit_bias_penalties_and_min_p_are_honoured(tiny: LoadedModel) -> None:
    prompt = user("the cat sees the dog and the dog sees the cat")
    async with engine_for(tiny) as engine:
        ids = engine.tokenizer.encode_chat(prompt)
        forced = engine.tokenizer.encode(" house")[0]
        biased = SamplingParams(temperature=0, max_tokens=5, logit_bias={forced: 100.0})
        stream = engine.chat(prompt, None, biased)
        await stream.text()
        assert stream.token_ids == [forced] * 5

        # negative penalties reward repeats: the random model's greedy reply has none to punish
        penalised = SamplingParams(
            temperature=0, max_tokens=12, presence_penalty=-1.5, frequency_penalty=-0.5
        )
        stream = engine.chat(prompt, None, penalised)
        await stream.text()
        # an independent greedy decode applying OpenAI's penalty rule on the oracle's logits
        expected, counts = [], {}
        for _ in range(12):
            logits = all_logits(tiny, ids + expected)[-1]
            for token, n in counts.items():
                logits[token] -= -1.5 + -0.5 * n
            token = int(torch.argmax(logits))
            expected.append(token)
            counts[token] = counts.get(token, 0) + 1
        assert stream.token_ids == expected
        plain = reference_generate(tiny.model, ids, SamplingParams(temperature=0, max_tokens=12))
        assert plain != expected  # the penalty changed something

        # min_p = 1 keeps only the most likely token: sampling at temperature 1 becomes greedy
        strict = SamplingParams(temperature=1.0, max_tokens=8, min_p=1.0, seed=3)
        stream = engine.chat(prompt, None, strict)
        await stream.text()
        assert stream.token_ids == plain[:8]


async def test_logprobs_are_the_models_log_probabilities(tiny: LoadedModel) -> None:
    prompt = user("seven blue rivers run quietly")
    sampling = SamplingParams(temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    async with engine_for(tiny) as engine:
        stream = engine.chat(prompt, None, sampling)
        await stream.text()
        entries = stream.take_logprobs()
        assert stream.take_logprobs() == []  # taken once
        ids = engine.tokenizer.encode_chat(prompt)
    generated = stream.token_ids
    assert [e.token_id for e in entries] == generated
    logprobs = torch.log_softmax(all_logits(tiny, ids + generated), dim=-1)
    for i, entry in enumerate(entries):
        row = logprobs[len(ids) - 1 + i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert [t.token_id for t in entry.top] == torch.topk(row, 3).indices.tolist()
        assert entry.top[0].token_id == entry.token_id  # greedy: the top one was chosen
        assert entry.token == tiny.tokenizer.decode([entry.token_id], skip_special_tokens=False)


async def test_raw_completion_continues_text_and_the_context_cap_holds(tiny: LoadedModel) -> None:
    text = "Once upon a time, the seven rivers"
    greedy = SamplingParams(temperature=0, max_tokens=7)
    async with engine_for(tiny, max_model_len=64) as engine:
        stream = engine.complete(text, None, greedy)
        await stream.text()
        ids = engine.tokenizer.encode(text, add_special_tokens=True)
        assert stream.token_ids == reference_generate(tiny.model, ids, greedy)
        assert stream.usage.prompt_tokens == len(ids)
        assert engine.max_context == 64
        with pytest.raises(ContextLengthError):
            await engine.chat(user("word " * 80), None, greedy).text()
        with pytest.raises(InvalidRequestError) as bad:
            await engine.chat(user("hi"), None, SamplingParams(logit_bias={10**9: 1.0})).text()
        assert bad.value.param == "logit_bias"
        with pytest.raises(InvalidRequestError) as bad:
            await engine.chat(user("hi"), None, SamplingParams(top_logprobs=2)).text()
        assert bad.value.param == "top_logprobs"
