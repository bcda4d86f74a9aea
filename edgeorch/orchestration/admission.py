"""What the gateway admits: a bounded number of sessions per deployment (the context check: openai_routes).

A deployment runs at most ``max_active`` sessions at once (the batch its
stages were planned for: more would only queue inside the chain, where a
wait cannot be seen or bounded). Up to ``max_waiting`` more wait here, in
arrival order, for a free slot; past that a request is refused at once with
a retry hint (the gateway's 429 with Retry-After), before anything is sent
down the chain, so a full deployment never crashes or starves a stage.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class QueueFull(RuntimeError):
    """Every session slot and every waiting place of a deployment is taken."""

    def __init__(self, detail: str, retry_after_s: float):
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Admission:
    """Session slots of one deployment: ``max_active`` running, ``max_waiting`` more queued."""

    def __init__(self, max_active: int, max_waiting: int, retry_after_s: float = 1.0):
        if max_active < 1 or max_waiting < 0:
            raise ValueError("max_active must be at least 1 and max_waiting at least 0")
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.admitted = 0  # sessions admitted and not finished (running or waiting)
        self._slots = asyncio.Semaphore(max_active)

    @property
    def running(self) -> int:
        """Sessions holding a slot now."""
        return self.max_active - self._slots._value  # noqa: SLF001 - asyncio keeps no public count

    def admit(self, sessions: int) -> None:
        """Reserve room for a request's ``sessions`` (its ``n`` choices), or QueueFull."""
        if self.admitted + sessions > self.max_active + self.max_waiting:
            raise QueueFull(
                f"{self.admitted} sessions running or waiting (at most {self.max_active} run at once, "
                f"{self.max_waiting} more may wait); retry shortly",
                self.retry_after_s,
            )
        self.admitted += sessions

    def finished(self, sessions: int) -> None:
        """Give back what :meth:`admit` reserved."""
        self.admitted = max(0, self.admitted - sessions)

    def held_stream(self, sessions: int, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """``events``, giving back what :meth:`admit` reserved for ``sessions`` exactly once.

        It gives it back when the stream ends or fails, and also when the stream
        is dropped without ever being started: a client gone before a streamed
        response's body begins leaves the generator unstarted, so a ``finally``
        inside it would never run and the reservation would leak for good.
        """

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            finally:
                release()

        held = stream()
        release = weakref.finalize(held, self.finished, sessions)
        return held

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot (waiting in arrival order for one to free)."""
        async with self._slots:
            yield
