"""Tokenizer, chat template and streaming detokenizer for one model folder.

The session manager compares each new turn's token ids with the ids it has cached, so the chat
template must render exactly as the model's authors (and transformers) render it: the template
runs in a sandboxed Jinja environment configured the way transformers configures it, and the
rendered text is tokenized with special tokens parsed and no BOS added beyond what the template
writes. Streaming needs text deltas that never split a UTF-8 character; `IncrementalDecoder`
decodes a small sliding window of ids instead of the whole reply on every token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from pensieve.chat_messages import ROLE_ALIASES, parse_messages
from pensieve.errors import InvalidRequestError, ModelLoadError
from pensieve.weights.loader import read_json

_REPLACEMENT = "\ufffd"


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check an OpenAI-style message list; return copies with text content and mapped roles.

    The rules are pensieve.chat_messages' (the server decodes requests with the same Structs);
    errors are InvalidRequestError naming the param `messages`. Content given as a list of text
    parts is joined with newlines (as vLLM does), an assistant's null or absent content becomes
    "", and "developer" is rendered as "system", which is what chat templates written before
    that role expect. Other keys of each message dict are kept for the template.
    """
    parsed = parse_messages(messages, param="messages")
    return [
        {
            **(original if isinstance(original, dict) else {}),
            "role": ROLE_ALIASES.get(msg.role, msg.role),
            "content": msg.text(),
        }
        for original, msg in zip(messages, parsed, strict=True)
    ]


class _GenerationTag(Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` (it only marks spans)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """Plain json.dumps: Jinja's own tojson HTML-escapes, which chat templates do not expect."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox transformers uses (trim and lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _find_chat_template(folder: Path, tok_config: dict[str, Any]) -> tuple[str | None, Path]:
    """The template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    json_file = folder / "chat_template.json"
    template: Any = read_json(json_file, required=False).get("chat_template")
    source = json_file
    if template is None:
        template, source = tok_config.get("chat_template"), folder / "tokenizer_config.json"
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"{source}: chat_template must be a string")
    return template, source


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value]
    return [] if value is None else [int(value)]


class ChatTokenizer:
    """Encode, decode and render chats for one model, matching transformers token for token."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None
        self.special_tokens = dict(special_tokens or {})
        self._eos = frozenset(eos_token_ids)
        self._bos = bos_token_id

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTokenizer:
        """Load tokenizer.json, the chat template, and special/eos tokens from a model folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: file is missing (only fast tokenizers are supported)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ModelLoadError(f"{path}: cannot load tokenizer ({exc})") from exc
        tok_config = read_json(folder / "tokenizer_config.json", required=False)
        model_config = read_json(folder / "config.json", required=False)
        generation = read_json(folder / "generation_config.json", required=False)
        special = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(tok_config.get(name))) is not None
        }
        eos: set[int] = set()
        try:
            for source in (generation, model_config):
                eos.update(_id_list(source.get("eos_token_id")))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{folder}: bad eos_token_id ({exc})") from exc
        ids = {name: tokenizer.token_to_id(text) for name, text in special.items()}
        if ids.get("eos_token") is not None:
            eos.add(ids["eos_token"])
        bos = ids.get("bos_token")
        if bos is None:
            bos = model_config.get("bos_token_id")
        template, template_path = _find_chat_template(folder, tok_config)
        try:
            return cls(tokenizer, template, special, eos, bos)
        except jinja2.TemplateError as exc:
            raise ModelLoadError(
                f"{template_path}: chat template does not compile ({exc})"
            ) from exc

    @property
    def eos_token_ids(self) -> set[int]:
        """Ids that end a reply (generation_config, config and tokenizer_config together)."""
        return set(self._eos)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it are parsed as special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """The chat as text, through the model's own template; bad messages raise 400 errors."""
        chat = validate_messages(messages)
        if self._template is None:
            raise InvalidRequestError("this model has no chat template", param="messages")
        variables = {"tools": None, "documents": None, **self.special_tokens}
        try:
            return self._template.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from exc

    def encode_chat(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat; BOS only where the template itself writes it."""
        return self.encode(self.render(messages, add_generation_prompt), add_special_tokens=False)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never end inside a UTF-8 character.

    It decodes only a window: the ids since the last emitted boundary, plus the previously
    emitted few as context (`prefix`), and emits the difference of the two decodes. The context
    makes decoders that depend on neighbours (SentencePiece's leading space) agree with a full
    decode, and text is held back while it ends in U+FFFD (an incomplete multi-byte character).
    Deltas concatenated with `flush()` equal `decode(all ids)`.

    Why not `tokenizers.decoders.DecodeStream`: its `step(tokenizer, id)` runs this same
    algorithm and, checked on the default model's byte-level BPE tokenizer (emoji, CJK, accented
    text, code, whitespace runs, skipped and kept special tokens, random ids), returns the same
    delta as `push` for every id (None where `push` returns ""). It differs at the end of the
    stream: DecodeStream has no `flush()`, so text it is still holding back (an unfinished
    character, with the text of the ids that came with it, such as the space of " \xf0\x9f") is
    never returned, and its deltas then fall short of `decode(ids)`. Its state is not readable
    from Python, so a wrapper would have to track the window itself, as this class does.
    It also needs tokenizers >= 0.21 (pyproject allows 0.19). tests/test_tokenizer.py
    (test_decode_stream_*) checks both the agreement and this difference.
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # only the window: ids from the prefix start on
        self._read = 0  # window index where the not-yet-emitted ids start

    def _pending(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[: self._read], skip_special_tokens=self._skip)
        return prefix, decode(self._ids, skip_special_tokens=self._skip)

    def _advance(self) -> None:
        """The unread ids become the next prefix; older ids are no longer needed."""
        del self._ids[: self._read]
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never broken UTF-8)."""
        self._ids.append(int(token_id))
        prefix, text = self._pending()
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return ""
        self._advance()
        return text[len(prefix) :]

    def flush(self) -> str:
        """The text still held back (e.g. an unfinished character at the end of the reply)."""
        prefix, text = self._pending()
        self._advance()
        return text[len(prefix) :]
