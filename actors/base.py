"""The actor base: one mailbox, one task, failures contained to the message that caused them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger("pensieve.actors")


class Actor:
    """Processes its mailbox one message at a time on the event loop."""

    name = "actor"

    def __init__(self) -> None:
        self.mailbox: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def send(self, message: Any) -> None:
        self.mailbox.put_nowait(message)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)

    async def run(self) -> None:
        while True:
            message = await self.mailbox.get()
            try:
                await self.handle(message)
            except Exception:  # one bad message must not stop the actor
                log.exception("%s failed on %s", self.name, type(message).__name__)

    async def handle(self, message: Any) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
