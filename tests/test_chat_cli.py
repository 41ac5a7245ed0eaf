"""`pensieve chat` with piped stdin: streamed replies, kept history, --show-cache, /reset."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pensieve.chat_cli import ChatSession, LineReader, chat_loop
from pensieve.sampling import SamplingParams

CACHE_LINE = re.compile(r"^\[prompt (\d+) tokens, (\d+) cached.*\]$", re.MULTILINE)


@pytest.mark.slow
def test_piped_chat_keeps_the_conversation_cached_until_reset(default_model_dir: Path) -> None:
    turns = [
        "What is the capital of France? Answer in one sentence.",
        "And of Italy?",
        "/reset",
        "What is the capital of Spain?",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pensieve.chat_cli", "--model", str(default_model_dir)]
        + ["--dtype", "float32", "--device", "cpu", "--no-profile-cost"]
        + ["--device-cache-tokens", "1024", "--host-cache-tokens", "1024"]
        + ["--temperature", "0", "--max-tokens", "8", "--show-cache"]
        + ["--system", "You are a geography assistant."],
        input="\n".join(turns) + "\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "[conversation reset]" in result.stderr
    assert result.stdout.startswith("The capital of France is Paris.\n")
    usage = [(int(p), int(c)) for p, c in CACHE_LINE.findall(result.stdout)]
    assert len(usage) == 3, result.stdout
    (prompt1, _), (prompt2, cached2), (prompt3, _) = usage
    assert cached2 >= prompt1  # the whole first turn was reused
    assert prompt3 < prompt2  # /reset dropped the history


async def test_commands_and_end_of_input_need_no_engine() -> None:
    """Blank lines are skipped, /reset without a conversation is local, /quit stops reading."""
    for text in ("\n\n/reset\n", "/reset\n/quit\nnever sent\n"):
        session = ChatSession(None, SamplingParams(), "sys", io.StringIO())  # type: ignore[arg-type]
        await chat_loop(session, LineReader(io.StringIO(text)), show_cache=True)
        assert session.messages == [{"role": "system", "content": "sys"}]
        assert session.out.getvalue() == ""  # type: ignore[attr-defined]
