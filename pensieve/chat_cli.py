"""`pensieve chat`: a terminal chat with an in-process engine.

Replies stream as they are generated and the conversation is kept, so each turn reuses the
cached history (`--show-cache` prints how many prompt tokens were cached). Commands: /reset
starts a new conversation, /quit or Ctrl-D exits, Ctrl-C stops a reply (or exits at the
prompt). Reads piped stdin too, one user message per line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, TextIO

from pensieve.cli_args import add_engine_arguments, engine_config_from_args
from pensieve.errors import NotFoundError, PensieveError
from pensieve.sampling import SamplingParams

if TYPE_CHECKING:
    from pensieve.engine import ChatStream, Engine

PROMPT = "you> "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("chat")
    g.add_argument("--system", default=None, help="system prompt (default: the template's)")
    g.add_argument("--show-cache", action="store_true", help="print cached prompt tokens per turn")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens")
    g.add_argument("--seed", type=int, default=None)


class LineReader:
    """Stdin lines via a daemon thread, so that exiting never waits on a blocked read."""

    def __init__(self, stream: TextIO):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: TextIO) -> None:
        for line in iter(stream.readline, ""):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, "")  # EOF

    async def readline(self) -> str:
        """The next line with its newline, or "" at end of input."""
        return await self._queue.get()


class ChatSession:
    """One conversation: the message history and the engine's id for it."""

    def __init__(self, engine: Engine, sampling: SamplingParams, system: str | None, out: TextIO):
        self.engine = engine
        self.sampling = sampling
        self.system = system
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.conversation_id: str | None = None
        self.reset_history()

    def reset_history(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    async def reset(self) -> None:
        """Forget the conversation, in the engine too, so its cache is freed."""
        if self.conversation_id is not None:
            with contextlib.suppress(NotFoundError):
                await self.engine.delete_conversation(self.conversation_id)
        self.conversation_id = None
        self.reset_history()

    async def turn(self, text: str) -> ChatStream:
        """Send one user message, streaming the reply to out; keep it in the history."""
        self.messages.append({"role": "user", "content": text})
        stream = self.engine.chat(
            self.messages, conversation_id=self.conversation_id, sampling=self.sampling
        )
        reply: list[str] = []
        try:
            async for delta in stream:
                reply.append(delta)
                self.out.write(delta)
                self.out.flush()
        except BaseException:
            self.messages.pop()  # the turn did not happen; keep history and cache in step
            await stream.aclose()
            raise
        finally:
            self.out.write("\n")
        self.conversation_id = stream.conversation_id
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        return stream


def cache_line(stream: ChatStream) -> str:
    usage = stream.usage
    line = f"[prompt {usage.prompt_tokens} tokens, {usage.cached_tokens} cached"
    if usage.recomputed_tokens:
        line += f", {usage.recomputed_tokens} recomputed"
    return line + "]"


async def chat_loop(session: ChatSession, reader: LineReader, show_cache: bool) -> None:
    """Read-eval-print until /quit or end of input. Ctrl-C cancels whatever is awaited:
    a reply in progress (the chat goes on) or the read at the prompt (the chat ends)."""
    loop = asyncio.get_running_loop()
    awaited: list[asyncio.Future] = []
    loop.add_signal_handler(signal.SIGINT, lambda: awaited and awaited[-1].cancel())
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                print(PROMPT, end="", flush=True)
            awaited[:] = [asyncio.ensure_future(reader.readline())]
            try:
                text = (await awaited[-1]).strip()
            except asyncio.CancelledError:
                return
            if text in ("/quit", "/exit") or not awaited[-1].result():  # "" = Ctrl-D / EOF
                return
            if text == "/reset":
                await session.reset()
                print("[conversation reset]", file=sys.stderr)
                continue
            if not text:
                continue
            awaited[:] = [asyncio.ensure_future(session.turn(text))]
            try:
                stream = await awaited[-1]
            except asyncio.CancelledError:
                print("[reply interrupted]", file=sys.stderr)
                continue
            except PensieveError as exc:  # e.g. the history no longer fits the context
                print(f"error: {exc.message} (/reset starts over)", file=sys.stderr)
                continue
            if show_cache:
                print(cache_line(stream), flush=True)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def chat_main(args: argparse.Namespace) -> int:
    from pensieve.engine import Engine

    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    ).validate()
    async with Engine(engine_config_from_args(args)) as engine:
        session = ChatSession(engine, sampling, args.system, sys.stdout)
        await chat_loop(session, LineReader(sys.stdin), args.show_cache)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(chat_main(args))
    except PensieveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pensieve chat", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
