"""What a replay talks to: an in-process Engine or any OpenAI-compatible server.

A target streams one chat turn and reports when the first token came, so the replay measures
time to first token the same way for every system. Failures come back as a TurnResult with an
error, never as an exception, so one bad turn cannot end a benchmark.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

Message = dict[str, str]


class TurnResult(msgspec.Struct, kw_only=True):
    """One streamed reply. Times are time.perf_counter() values; token counts None when unknown."""

    text: str = ""
    first_token_time: float | None = None
    end_time: float = 0.0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    recomputed_tokens: int | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


class Target(Protocol):
    async def chat(
        self, messages: list[Message], max_tokens: int, conversation_id: str
    ) -> TurnResult: ...


@runtime_checkable
class MetricsSource(Protocol):
    """A target that can read its server's counters, scraped before and after a run."""

    async def metrics(self) -> dict[str, float]: ...


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _numbers(obj: Any) -> dict[str, float]:
    """The numeric fields of a stats record (msgspec Struct, dataclass or dict)."""
    if isinstance(obj, msgspec.Struct):
        obj = msgspec.structs.asdict(obj)
    elif is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if not isinstance(obj, dict):
        return {}
    return {
        k: float(v)
        for k, v in obj.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class EngineTarget:
    """An in-process pensieve Engine: greedy, generating past EOS to the requested length."""

    def __init__(self, engine: Any):
        self.engine = engine

    async def chat(
        self, messages: list[Message], max_tokens: int, conversation_id: str
    ) -> TurnResult:
        from pensieve.sampling import SamplingParams

        sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        result = TurnResult()
        parts: list[str] = []
        try:
            stream = self.engine.chat(messages, conversation_id=conversation_id, sampling=sampling)
            if inspect.isawaitable(stream):
                stream = await stream
            async for delta in stream:
                if delta and result.first_token_time is None:
                    result.first_token_time = time.perf_counter()
                parts.append(delta)
            usage = getattr(stream, "usage", None)
            result.finish_reason = getattr(stream, "finish_reason", None)
            if usage is not None:
                result.prompt_tokens = usage.prompt_tokens
                result.cached_tokens = usage.cached_tokens
                result.recomputed_tokens = getattr(usage, "recomputed_tokens", None)
                result.completion_tokens = usage.completion_tokens
        except Exception as exc:  # an engine error fails this turn only
            result.error = describe(exc)
        result.end_time = time.perf_counter()
        result.text = "".join(parts)
        if not result.completion_tokens and result.text:
            result.completion_tokens = sum(1 for p in parts if p)
        return result

    async def metrics(self) -> dict[str, float]:
        stats = self.engine.stats()
        if inspect.isawaitable(stats):
            stats = await stats
        return _numbers(stats)


class SSEState:
    """Folds the `data:` lines of an OpenAI chat-completions stream into a TurnResult."""

    def __init__(self) -> None:
        self.result = TurnResult()
        self.parts: list[str] = []
        self.content_chunks = 0
        self.usage: dict[str, Any] | None = None

    def feed(self, line: str) -> bool:
        """Take one line of the stream; True once the stream says [DONE] or reports an error."""
        line = line.strip()
        if not line.startswith("data:"):
            return False  # blank separators, comments, `event:` lines
        payload = line[5:].strip()
        if payload == "[DONE]":
            return True
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            self.result.error = f"bad stream chunk: {payload[:200]}"
            return True
        if not isinstance(chunk, dict):
            return False
        if "error" in chunk:
            err = chunk["error"]
            self.result.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return True
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                if self.result.first_token_time is None:
                    self.result.first_token_time = time.perf_counter()
                self.parts.append(content)
                self.content_chunks += 1
            if choice.get("finish_reason"):
                self.result.finish_reason = choice["finish_reason"]
        return False

    def finish(self) -> TurnResult:
        """The result; without a usage chunk (llama.cpp), one token per content chunk."""
        result = self.result
        result.text = "".join(self.parts)
        result.end_time = time.perf_counter()
        if self.usage is None:
            result.completion_tokens = self.content_chunks
            return result
        result.prompt_tokens = self.usage.get("prompt_tokens")
        result.completion_tokens = self.usage.get("completion_tokens") or self.content_chunks
        details = self.usage.get("prompt_tokens_details") or {}
        result.cached_tokens = details.get("cached_tokens")
        return result


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: value summed over its labels}.

    Parsed with prometheus_client's own parser. Sample names are kept as exposed (`x_total`,
    `x_bucket`, `x_count`), `*_created` timestamps and NaN values are dropped. Text the parser
    rejects ends the parse there: what was read before it is kept.
    """
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_created") or math.isnan(sample.value):
                    continue
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    except ValueError:  # malformed exposition text
        pass
    return values


class OpenAITarget:
    """An OpenAI-compatible server (pensieve, vLLM, llama.cpp), streamed over SSE with aiohttp.

    Asks for the replayed length past EOS the way vLLM's benchmark does (`ignore_eos` and
    `min_tokens`); servers that do not know these fields ignore them. Each turn names its
    conversation in every header of `session_headers` (X-Session-ID for Pensieve and
    vllm-router's consistent_hash, X-SMG-Routing-Key for sglang-router's manual policy; none
    for a client that only resends its history). Use as an async context.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        session_headers: Sequence[str] = ("X-Session-ID",),
        request_timeout_s: float = 600.0,
    ):
        base = base_url.rstrip("/")
        self.api_base = base if base.endswith("/v1") else base + "/v1"
        self.root = self.api_base[: -len("/v1")]
        self.model = model
        self.session_headers = tuple(session_headers)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAITarget:
        self._session = aiohttp.ClientSession(headers=self.headers, timeout=self.timeout)
        if self.model is None:
            self.model = await self._first_model()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use OpenAITarget as `async with OpenAITarget(...) as target`")
        return self._session

    async def _first_model(self) -> str | None:
        """The server's first model id (vLLM requires one); None if it cannot be listed."""
        try:
            async with self.session.get(self.api_base + "/models") as resp:
                data = await resp.json(content_type=None)
            return str(data["data"][0]["id"])
        except Exception:
            return None

    def request_body(self, messages: list[Message], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "min_tokens": max_tokens,
        }
        if self.model is not None:
            body["model"] = self.model
        return body

    async def chat(
        self, messages: list[Message], max_tokens: int, conversation_id: str
    ) -> TurnResult:
        state = SSEState()
        headers = {name: conversation_id for name in self.session_headers}
        url = self.api_base + "/chat/completions"
        try:
            body = self.request_body(messages, max_tokens)
            async with self.session.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    state.result.error = f"HTTP {resp.status}: {text[:300]}"
                else:
                    async for raw in resp.content:
                        if state.feed(raw.decode("utf-8", errors="replace")):
                            break
        except Exception as exc:  # connection reset, timeout, bad stream: a failed turn
            state.result.error = describe(exc)
        return state.finish()

    async def metrics(self) -> dict[str, float]:
        """Counters from GET /metrics; empty when the server has none."""
        try:
            async with self.session.get(self.root + "/metrics") as resp:
                if resp.status != 200:
                    return {}
                return parse_prometheus(await resp.text())
        except Exception:
            return {}
