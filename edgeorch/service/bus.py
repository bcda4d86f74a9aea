"""Every Redis pub/sub channel edgeorch uses, named in one place, and a publisher that survives Redis outages.

Redis carries notifications only; the durable record of anything published
lives in the publishing service's SQL tables, so a message lost while Redis
is away is caught up by the subscriber pulling state over REST.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PREFIX = "edgeorch"
MONITOR_EVENTS = f"{PREFIX}.monitor.events"  # node joined/lost, speed/link changed, profiled
ROLLOUTS = f"{PREFIX}.broadcast.rollouts"  # signed PREPARE/COMMIT/RELEASE/ABORT messages
ORCHESTRATOR_EVENTS = f"{PREFIX}.orchestrator.events"  # control decisions

CHANNELS = (MONITOR_EVENTS, ROLLOUTS, ORCHESTRATOR_EVENTS)


def live_key(*parts: str) -> str:
    """A namespaced key for short-lived live state, e.g. live_key("node", "a")."""
    return ":".join((PREFIX, *parts))


class ResilientPublisher:
    """Publishes JSON messages; while Redis is unreachable it queues them (bounded) and retries.

    ``publish`` never raises for a Redis outage: the caller's work must not
    depend on the notification path being up.
    """

    def __init__(self, url: str, max_queued: int = 10_000):
        self.url = url
        self._redis = aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self._queue: deque[tuple[str, str]] = deque(maxlen=max_queued)
        self._flush_lock = asyncio.Lock()
        self.connected = True

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client, for live-state reads and writes."""
        return self._redis

    async def publish(self, channel: str, message: dict[str, Any]) -> bool:
        """Publish now if possible; otherwise queue. True when delivered to Redis."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; add it to edgeorch.service.bus")
        self._queue.append((channel, json.dumps(message)))
        return await self.flush()

    async def flush(self) -> bool:
        """Send what is queued; True when the queue is empty afterwards."""
        async with self._flush_lock:
            while self._queue:
                channel, data = self._queue[0]
                try:
                    await self._redis.publish(channel, data)
                except (RedisError, OSError) as exc:
                    if self.connected:
                        log.warning("redis unreachable at %s (%r); queueing notifications", self.url, exc)
                    self.connected = False
                    return False
                self._queue.popleft()
            if not self.connected:
                log.info("redis reachable again; queued notifications sent")
            self.connected = True
            return True

    async def ping(self) -> bool:
        """Whether Redis answers right now."""
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self, timeout_s: float = 2.0) -> None:
        """Close the connection pool, giving up after ``timeout_s``.

        Shutdown must not hang on Redis: a publish cancelled mid-command can
        leave a connection that never finishes disconnecting (seen once in a
        test's teardown, which then waited forever).
        """
        try:
            await asyncio.wait_for(self._redis.aclose(), timeout_s)
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("closing redis at %s did not finish (%r); leaving it", self.url, exc)


async def follow(
    url: str,
    channel: str,
    handle: Callable[[Any], object],
    on_subscribed: Callable[[], object] | None = None,
    max_backoff_s: float = 30.0,
) -> None:
    """Hand every message published on ``channel`` to ``handle``, until cancelled.

    While Redis is away it retries with capped exponential backoff;
    ``on_subscribed`` runs after every (re)subscription, for a subscriber
    that must catch up on what was published while it was not listening.
    """
    backoff = 0.5
    while True:
        client = aioredis.from_url(url, socket_connect_timeout=2.0)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                log.info("subscribed to %s at %s", channel, url)
                backoff = 0.5
                if on_subscribed is not None:
                    on_subscribed()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        handle(msg["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away: log, back off, subscribe again
            log.warning("subscription to %s at %s failed (%r); retrying in %.1fs", channel, url, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)
        finally:
            # Bounded, as in ResilientPublisher.close: a cancelled command can leave a connection
            # that never finishes closing.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 2.0)
