"""The decision log as Server-Sent Events: SQL is the record, Redis only says when to look again.

Each stream reads the orchestrator's events after the last id it sent, sends
them, then sleeps until a :class:`Pulse` beats (a message on the
orchestrator's Redis channel, followed with ``edgeorch.service.bus.follow``) or ``poll_s`` passes, so
a Redis outage delays the page by at most ``poll_s`` and loses nothing. A
stream ends itself after ``max_s``: uvicorn waits for open responses before it
stops, and the browser's EventSource reconnects on its own, sending the
``Last-Event-ID`` it saw, so the page misses nothing either.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from edgeorch.schemas.orchestrator import OrchestratorEvent

RETRY_MS = 1000  # how soon the browser reconnects after a stream ends


class Pulse:
    """A counter that moves on every notification; waiters sleep until it moves."""

    def __init__(self) -> None:
        self.count = 0
        self._moved = asyncio.Event()

    def beat(self) -> None:
        """Wake every waiter (call on the event loop)."""
        self.count += 1
        self._moved.set()
        self._moved = asyncio.Event()

    async def wait(self, seen: int, timeout_s: float) -> int:
        """Return the count once it differs from ``seen``, or after ``timeout_s``."""
        moved = self._moved
        if self.count == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), timeout_s)
        return self.count


def sse_frame(event: OrchestratorEvent) -> str:
    """One event as an SSE frame whose id is the log's id (what Last-Event-ID resumes from)."""
    return f"id: {event.id}\ndata: {event.model_dump_json()}\n\n"


async def event_stream(
    read: Callable[[int], Awaitable[Sequence[OrchestratorEvent]]],
    pulse: Pulse,
    since: int,
    *,
    poll_s: float = 2.0,
    max_s: float = 8.0,
) -> AsyncIterator[str]:
    """SSE frames of every event after ``since``, as they are logged, for ``max_s`` seconds."""
    yield f"retry: {RETRY_MS}\n\n"
    deadline = time.monotonic() + max_s
    while (left := deadline - time.monotonic()) > 0:
        seen = pulse.count  # before reading: a beat during the read is not slept through
        for event in await read(since):
            since = event.id
            yield sse_frame(event)
        await pulse.wait(seen, min(poll_s, left))
