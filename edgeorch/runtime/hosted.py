"""A stage as one worker holds it: the loaded units, the spec they came from, its sessions' caches.

Split out of :mod:`edgeorch.runtime.host` so that the pieces that only read a
hosted stage (KV transfer, the decode batcher) need not import the host.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeorch.engine.stage import LoadedStage
from edgeorch.schemas.stage import StageSpec
from edgeorch.security.credentials import credential_headers
from edgeorch.transport import protocol


class StageNotFound(LookupError):
    """No stage with this id is loaded here."""


class StageConflict(Exception):
    """A stage id is already loaded with a different spec."""


@dataclass
class HostedStage:
    """A loaded stage and the spec it was loaded from."""

    stage_id: str
    spec: StageSpec
    loaded: LoadedStage
    kv_bytes_per_token: float
    units_shared: int = 0  # units this stage found already loaded by another stage

    def next_headers(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` plus the next stage's data-plane credential, when it has one."""
        nxt = self.spec.next
        return {**(base or {}), **credential_headers(nxt.credential if nxt else None)}

    def forward_url(self) -> str | None:
        """Where this stage's output goes, or None for the last stage."""
        if self.spec.next is None:
            return None
        return protocol.forward_url(str(self.spec.next.url), self.spec.next.stage_id)


def planned_cache(hosted: HostedStage):
    """A new session's cache; a lean one reserves the spec's whole planned context on its first step."""
    cache = hosted.loaded.new_cache()
    if hasattr(cache, "chunk_tokens") and hosted.spec.kv_context > cache.chunk_tokens:
        cache.chunk_tokens = hosted.spec.kv_context
    return cache
