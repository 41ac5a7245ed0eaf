"""Chat messages in the OpenAI format, defined once for the server and the library.

The server decodes request bodies straight into `ChatMessage` Structs; the library
(`ChatTokenizer.encode_chat`) takes plain dicts and converts them against the same Structs with
`parse_messages`. Both report a bad message with the same wording, naming the offending field
(`messages[1].role must be one of ...`), followed by msgspec's own description of the problem.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

import msgspec

from pensieve.errors import InvalidRequestError

# The roles chat templates render; "developer" is rendered as "system" (see ROLE_ALIASES).
Role = Literal["system", "user", "assistant", "developer", "tool"]
ROLES: tuple[str, ...] = get_args(Role)
ROLE_ALIASES = {"developer": "system"}


class TextPart(msgspec.Struct):
    """One element of a list-valued `content`; only text parts are supported."""

    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct):
    """One message. `content` may be null or absent only for the assistant (see check_messages)."""

    role: Role
    content: str | list[TextPart] | None | msgspec.UnsetType = msgspec.UNSET
    name: str | None = None

    def text(self) -> str:
        """The content as one string: text parts joined with newlines (as vLLM does)."""
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return ""


# What each field must be, by its path inside the messages list with indices dropped.
_RULES = {
    "": "must be a list of {role, content} objects",
    "[]": "must be an object with role and content",
    "[].role": "must be one of " + ", ".join(ROLES),
    "[].content": "must be a string or a list of text parts",
    "[].content[]": 'must be an object {"type": "text", "text": ...}',
    "[].content[].type": "must be 'text'",
    "[].content[].text": "must be a string",
    "[].name": "must be a string",
}
_INDEX = re.compile(r"\[\d+\]")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING_FIELD = re.compile(r"missing required field `(?P<field>[^`]+)`")
_ABSENT = object()


def error_location(error: msgspec.ValidationError) -> tuple[str, str]:
    """(path, detail) of an msgspec error: `.messages[0].role` below `$`, and the message alone.

    A missing field is located at the field itself rather than at the object that lacks it.
    """
    text = str(error)
    at = _AT.search(text)
    path = at.group("path") if at else ""
    detail = text[: at.start()] if at else text
    missing = _MISSING_FIELD.search(detail)
    if missing:
        path += "." + missing.group("field")
    return path, detail


def _value_at(data: Any, path: str) -> Any:
    """The value at `path` (`[0].role`) inside `data`, or _ABSENT."""
    for name, index in _STEP.findall(path):
        if name and isinstance(data, dict) and name in data:
            data = data[name]
        elif index and isinstance(data, list) and int(index) < len(data):
            data = data[int(index)]
        else:
            return _ABSENT
    return data


def describe_error(path: str, messages: Any, detail: str) -> str:
    """The message for a value at `path` inside the messages list that does not convert."""
    shape = _INDEX.sub("[]", path)
    rule = _RULES.get(shape)
    if rule is None:  # a path no rule names: msgspec's own words
        return f"messages{path}: {detail}"
    if shape in ("[].role", "[].content[].type"):  # the offending value says it all
        value = _value_at(messages, path)
        rule += " (it is missing)" if value is _ABSENT else f" (got {value!r})"
        if shape == "[].content[].type":
            rule += "; only text is supported"
        return f"messages{path} {rule}"
    return f"messages{path} {rule} ({detail})"


def check_messages(messages: list[ChatMessage], param: str | None = None) -> None:
    """The rules beyond types: at least one message, content for every role but the assistant.

    Errors name `param`, or the offending field when it is None.
    """
    if not messages:
        raise InvalidRequestError(
            "messages must contain at least one message (it must not be empty)",
            param=param or "messages",
        )
    for i, message in enumerate(messages):
        if message.role == "assistant" or message.content not in (None, msgspec.UNSET):
            continue
        where = f"messages[{i}].content"
        if message.content is None:
            text = f"{where} must be a string or a list of text parts (null only for assistant)"
        else:
            text = f"{where} is required for role {message.role!r}"
        raise InvalidRequestError(text, param=param or where)


def parse_messages(messages: Any, param: str | None = None) -> list[ChatMessage]:
    """Plain message dicts -> ChatMessages; InvalidRequestError naming `param` (or the field)."""
    try:
        parsed = msgspec.convert(messages, list[ChatMessage])
    except msgspec.ValidationError as exc:
        path, detail = error_location(exc)
        text = describe_error(path, messages, detail)
        raise InvalidRequestError(text, param=param or f"messages{path}") from None
    check_messages(parsed, param)
    return parsed
