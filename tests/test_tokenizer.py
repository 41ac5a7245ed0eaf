"""ChatTokenizer must match transformers token for token; IncrementalDecoder must stream cleanly."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from pensieve.errors import InvalidRequestError, ModelLoadError
from pensieve.tokenizer import ChatTokenizer, IncrementalDecoder, validate_messages

transformers = pytest.importorskip("transformers")

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "one question": [
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
    ],
    "system and turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one, please.  Bigger than 1000!"},
    ],
    "unicode": [
        {"role": "user", "content": "Привет! 你好，世界 🌍🚀 👨‍👩‍👧 café naïve — ½ ≠ ∞ 日本語"},
        {"role": "assistant", "content": "¡Hola! 🙂 한국어도 돼요."},
        {"role": "user", "content": "\u200b zero-width, tab\tand CRLF\r\nend"},
    ],
    "code": [
        {"role": "user", "content": "Fix this:\n```python\ndef f(x):\n\treturn x**2  # sq\n```"},
        {"role": "assistant", "content": '<div class="a">&amp;</div>\n    indented\n\n\n'},
        {"role": "user", "content": "for (int i = 0; i < 10; ++i) { s += a[i]; } // 12345"},
    ],
    "tool turn": [
        {"role": "user", "content": "weather?"},
        {"role": "tool", "content": '{"temp": 21}'},
    ],
}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_folder(default_model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def hf_chat_ids(hf: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    return hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_match_transformers(tokenizer, hf_tokenizer, name, add_generation_prompt) -> None:
    messages = CONVERSATIONS[name]
    expected = hf_chat_ids(hf_tokenizer, messages, add_generation_prompt)
    assert tokenizer.encode_chat(messages, add_generation_prompt) == expected
    assert tokenizer.render(messages, add_generation_prompt) == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def test_known_ids(tokenizer: ChatTokenizer) -> None:
    """Pinned ids, cross-checked against transformers' own GGUF tokenizer conversion."""
    assert tokenizer.encode("Hello 12345 world") == [19556, 216, 33, 34, 35, 36, 37, 905]
    expected = (
        "1 9690 198 2683 359 253 5356 5646 11173 3365 3511 308 34519 28 7018 411 407 19712 8182 2 "
        "198 1 4093 198 1780 314 260 3575 282 4649 47 19842 281 582 6330 30 2 198 1 520 9531 198"
    )
    assert tokenizer.encode_chat(CONVERSATIONS["one question"]) == [
        int(i) for i in expected.split()
    ]


def test_special_ids(tokenizer: ChatTokenizer) -> None:
    assert tokenizer.token_to_id("<|im_end|>") in tokenizer.eos_token_ids
    assert tokenizer.bos_token_id == tokenizer.token_to_id("<|im_start|>") == 1
    assert tokenizer.vocab_size == 49152


def test_developer_role_and_text_parts(tokenizer: ChatTokenizer, hf_tokenizer: Any) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Part one."},
                {"type": "text", "text": "Part two."},
            ],
        },
    ]
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Part one.\nPart two."},
    ]
    assert validate_messages(messages) == plain
    assert tokenizer.encode_chat(messages) == hf_chat_ids(hf_tokenizer, plain, True)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "messages must be a list"),
        ([], "messages must contain at least one message"),
        (["hi"], "messages[0] must be an object"),
        (
            [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
            "messages[1].role must be one of system, user, assistant, developer, tool "
            "(got 'robot')",
        ),
        ([{"content": "a"}], "messages[0].role must be one of"),
        ([{"role": "user"}], "messages[0].content is required"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string or a list"),
        ([{"role": "user", "content": None}], "messages[0].content must be a string or a list"),
        ([{"role": "user", "content": ["x"]}], "messages[0].content[0] must be an object"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0].type must be 'text' (got 'image_url')",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            "messages[0].content[0].text must be a string",
        ),
    ],
)
def test_message_validation(tokenizer: ChatTokenizer, messages: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        tokenizer.encode_chat(messages)
    assert message in info.value.message
    assert info.value.param == "messages" and info.value.status == 400


# --- templates other than SmolLM2's -------------------------------------------------------------

FEATURE_TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'tool' %}
        {{- raise_exception('tool messages are not supported') }}
    {%- endif %}
    {% if loop.index0 > 3 %}{% break %}{% endif %}
    <|im_start|>{{ message['role'] }}
    {% generation %}{{ message['content'] | trim }}{% endgeneration %}<|im_end|>
    {{ {"n": loop.index, "text": message['content'], "html": "<b>&</b>"} | tojson }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant {{ strftime_now('%Y') }}
{% endif %}"""


def _with_template(default_model_dir: Path, tmp_path: Path, template: str | None) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(default_model_dir / "tokenizer.json", folder)
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_template_features_match_transformers(default_model_dir: Path, tmp_path: Path) -> None:
    folder = _with_template(default_model_dir, tmp_path, FEATURE_TEMPLATE)
    ours = ChatTokenizer.from_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS["system and turns"], CONVERSATIONS["unicode"] * 2:
        assert ours.render(messages) == hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert ours.encode_chat(messages) == hf_chat_ids(hf, messages, True)
    with pytest.raises(InvalidRequestError, match="tool messages are not supported"):
        ours.render(CONVERSATIONS["tool turn"])


def test_template_sources(default_model_dir: Path, tmp_path: Path) -> None:
    folder = _with_template(default_model_dir, tmp_path, None)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        ChatTokenizer.from_folder(folder).render(CONVERSATIONS["one question"])
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert ChatTokenizer.from_folder(folder).render(CONVERSATIONS["tool turn"]) == "weather?!"
    (folder / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ModelLoadError, match=r"chat_template\.jinja: chat template does not"):
        ChatTokenizer.from_folder(folder)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: file is missing"):
        ChatTokenizer.from_folder(tmp_path)


# --- streaming ------------------------------------------------------------------------------------

STREAM_TEXTS = [
    "你好，世界！日本語のテキストも。한국어 문장입니다.",
    "Emoji: 😀👍🏽🇫🇷👨‍👩‍👧‍👦 and 🧑🏿‍🚀 — done.",
    "Mixed: naïve café Ωμέγα ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 123 🙂 end",
]


def stream(tokenizer: ChatTokenizer, ids: list[int], **kwargs: Any) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, **kwargs)
    deltas = [decoder.push(token_id) for token_id in ids]
    return deltas + [decoder.flush()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_never_splits_characters(tokenizer: ChatTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # pieces do split characters
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert sum(1 for delta in deltas[:-1] if delta) >= len(text) // 8  # streams as it goes


def test_stream_skips_special_tokens(tokenizer: ChatTokenizer) -> None:
    ids = tokenizer.encode("Hi 🙂<|im_end|>")
    assert "".join(stream(tokenizer, ids)) == "Hi 🙂"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)) == "Hi 🙂<|im_end|>"


def test_stream_of_random_ids_matches_decode(tokenizer: ChatTokenizer) -> None:
    """Arbitrary ids, invalid UTF-8 included: deltas plus flush still equal decode(ids)."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_stream_decodes_a_bounded_window(tokenizer: ChatTokenizer, monkeypatch) -> None:
    ids = tokenizer.encode(" ".join(STREAM_TEXTS) * 20)
    widths: list[int] = []
    decode = tokenizer.decode

    def recording_decode(window: list[int], **kwargs: Any) -> str:
        widths.append(len(window))
        return decode(window, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", recording_decode)
    assert "".join(stream(tokenizer, ids)) == decode(ids)
    assert len(ids) > 500 and max(widths) <= 8


# --- tokenizers' own DecodeStream, compared (see the IncrementalDecoder docstring) --------------

DECODE_STREAM_TEXTS = [
    *STREAM_TEXTS,
    "Accents: crème brûlée, Ångström, São Paulo, Dvořák, façade, Zürich, ñandú.",
    "CJK: 漢字かな交じり文、中文標點「引號」，한글 자모 ㄱㄴㄷ.",
    "Emoji run: 🙂🙃😉 flags 🇯🇵🇧🇷 skin 👋🏿 family 👩‍👩‍👧 keycap 1️⃣ end 🫠",
    'def f(x: int) -> str:\n\treturn f"{x:>8}"  # pad\n\nif __name__ == "__main__":\n    f(1)\n',
    "Whitespace:  two   three    four\t\ttabs\n\n\nnewlines \r\n crlf      trailing     ",
    "<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n你好<|im_end|>  after",
]


def decode_stream_steps(tokenizer: ChatTokenizer, ids: list[int], skip: bool) -> list[str | None]:
    decoders = pytest.importorskip("tokenizers.decoders")
    if not hasattr(decoders, "DecodeStream"):
        pytest.skip("tokenizers has no DecodeStream (added in 0.21)")
    stream_ = decoders.DecodeStream(skip_special_tokens=skip)
    return [stream_.step(tokenizer._tokenizer, token_id) for token_id in ids]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", DECODE_STREAM_TEXTS)
def test_decode_stream_agrees_step_by_step(tokenizer: ChatTokenizer, text: str, skip: bool):
    """On complete text, DecodeStream.step returns exactly what push does (None for "")."""
    ids = tokenizer.encode(text)
    ours = stream(tokenizer, ids, skip_special_tokens=skip)
    theirs = decode_stream_steps(tokenizer, ids, skip)
    assert ours[:-1] == [step or "" for step in theirs]
    assert ours[-1] == ""  # nothing held back at the end of complete text
    assert "".join(ours) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in step for step in theirs if step)


def test_decode_stream_agrees_on_random_ids(tokenizer: ChatTokenizer) -> None:
    """Arbitrary ids (invalid UTF-8 mid-stream included): the same delta for every id."""
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        theirs = decode_stream_steps(tokenizer, ids, True)
        assert stream(tokenizer, ids)[:-1] == [step or "" for step in theirs]


def test_decode_stream_differs_at_an_unfinished_end(tokenizer: ChatTokenizer) -> None:
    """Documented difference: DecodeStream has no flush, so held-back text is never returned."""
    ids = tokenizer.encode("ab 😀")
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    ids = ids[:cut]  # the reply stops in the middle of the emoji
    ours = stream(tokenizer, ids)
    theirs = decode_stream_steps(tokenizer, ids, True)
    assert ours[:-1] == [step or "" for step in theirs]  # same deltas while streaming...
    assert "".join(ours) == tokenizer.decode(ids) == "ab \ufffd"  # ...our flush ends like decode
    assert ours[-1] == " \ufffd"  # the space held back with the unfinished character
    assert "".join(step or "" for step in theirs) == "ab"  # DecodeStream loses " \ufffd"
