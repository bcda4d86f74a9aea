"""KV caches of live decoder sessions on one worker, with a TTL and a memory cap."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeorch.models.kv import StageKVCache


class SessionError(Exception):
    """Base for session problems the worker turns into 4xx/503 answers."""


class UnknownSession(SessionError):
    """No cache for this session on this stage (never started, expired, or released)."""


class PositionMismatch(SessionError):
    """A step arrived at a position the cache is not at; running it would corrupt the cache."""


class CacheFull(SessionError):
    """Admitting this step would exceed the worker's KV-cache memory cap."""


@dataclass
class _Entry:
    cache: Any  # StageKVCache or the lean engine's LeanKVCache: seq_len, advance(), nbytes()
    last_used: float = field(default_factory=time.monotonic)


class SessionStore:
    """Caches keyed by (stage id, session id); thread-safe."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def acquire(
        self,
        stage_id: str,
        session: str,
        position: int,
        new_bytes: int,
        new_cache: Callable[[], Any] = StageKVCache,
    ) -> Any:
        """The cache to run a step at ``position`` with, after checking it is safe to.

        Position 0 starts (or restarts) the session with ``new_cache()`` (the
        stage's own kind of cache); any other position must continue exactly
        where the cache is.
        """
        key = (stage_id, session)
        with self._lock:
            self._evict_expired_locked()
            entry = self._entries.get(key)
            held = sum(e.cache.nbytes() for k, e in self._entries.items() if k != key or position != 0)
            if held + new_bytes > self.max_bytes:
                raise CacheFull(
                    f"KV cache full: {held} bytes held, this step needs {new_bytes} more, cap {self.max_bytes}"
                )
            if position == 0:
                entry = self._entries[key] = _Entry(new_cache())
            elif entry is None:
                raise UnknownSession(
                    f"session {session!r} is unknown on stage {stage_id!r} (expired or never started)"
                )
            elif entry.cache.seq_len != position:
                raise PositionMismatch(
                    f"session {session!r} on stage {stage_id!r} is at position {entry.cache.seq_len}, "
                    f"the step claims position {position}"
                )
            entry.last_used = time.monotonic()
            return entry.cache

    def peek(self, stage_id: str, session: str) -> Any:
        """A session's cache as it is (a KV export reads it); UnknownSession when there is none."""
        with self._lock:
            entry = self._entries.get((stage_id, session))
            if entry is None:
                raise UnknownSession(f"session {session!r} is unknown on stage {stage_id!r}")
            entry.last_used = time.monotonic()
            return entry.cache

    def install(self, stage_id: str, session: str, cache: Any) -> None:
        """Hold a cache built elsewhere (a KV import) for a session, within the memory cap."""
        key = (stage_id, session)
        with self._lock:
            self._evict_expired_locked()
            held = sum(e.cache.nbytes() for k, e in self._entries.items() if k != key)
            if held + cache.nbytes() > self.max_bytes:
                raise CacheFull(
                    f"KV cache full: {held} bytes held, the import needs {cache.nbytes()} more, "
                    f"cap {self.max_bytes}"
                )
            self._entries[key] = _Entry(cache)

    def release(self, stage_id: str, session: str) -> bool:
        """Drop one session's cache on one stage; True if there was one."""
        with self._lock:
            return self._entries.pop((stage_id, session), None) is not None

    def drop_stage(self, stage_id: str) -> int:
        """Drop every session of a stage (the stage is being unloaded)."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == stage_id]
            for k in keys:
                del self._entries[k]
            return len(keys)

    def evict_expired(self) -> int:
        """Drop caches unused for longer than the TTL; returns how many."""
        with self._lock:
            return self._evict_expired_locked()

    def _evict_expired_locked(self) -> int:
        cutoff = time.monotonic() - self.ttl_s
        stale = [k for k, e in self._entries.items() if e.last_used < cutoff]
        for k in stale:
            del self._entries[k]
        return len(stale)

    def count(self, stage_id: str | None = None) -> int:
        """Live sessions, on one stage or overall."""
        with self._lock:
            return sum(1 for k in self._entries if stage_id is None or k[0] == stage_id)

    def total_bytes(self) -> int:
        """Bytes held by every cache."""
        with self._lock:
            return sum(e.cache.nbytes() for e in self._entries.values())
