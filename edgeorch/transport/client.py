"""Drive a chain of stages from the outside: prefill, decode, encode.

This is the data-plane client the gateway and the tools use. It holds a
session's tokens itself, so the chain's state can always be rebuilt by
replaying them.
"""

from __future__ import annotations

import ssl
import time
import uuid
from dataclasses import dataclass, field

import torch

from edgeorch.schemas.stage import Sampling
from edgeorch.security.credentials import credential_headers
from edgeorch.transport import protocol, wire
from edgeorch.transport.hopclient import HopError, SyncHopClient


@dataclass
class StepResult:
    """One round trip through the chain."""

    frame: wire.Frame
    hops: list[dict]
    wall_s: float
    bytes_sent: int


@dataclass
class Generation:
    """A finished greedy/sampled generation."""

    token_ids: list[int]
    steps: list[StepResult] = field(default_factory=list)

    @property
    def prefill_s(self) -> float:
        """Wall time of the first step (the whole prompt plus the first token)."""
        return self.steps[0].wall_s if self.steps else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the steps after the prefill."""
        rest = self.steps[1:]
        total = sum(s.wall_s for s in rest)
        return len(rest) / total if total > 0 else 0.0


class ChainClient:
    """Sends frames to the first stage of a chain and reads the answers."""

    def __init__(
        self,
        entry_url: str,
        entry_stage: str,
        timeout_s: float = 300.0,
        credential: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        """``ssl_context``: for an https:// entry; None: the process's (``EDGEORCH_TLS_*``)."""
        self.entry_url = entry_url
        self.entry_stage = entry_stage
        self.url = protocol.forward_url(entry_url, entry_stage)
        self.http = SyncHopClient(
            timeout_s=timeout_s, **({"ssl_context": ssl_context} if ssl_context else {})
        )
        # The entry stage's data-plane credential (edgeorch.security), sent on every call; None: an open stage.
        self.headers = credential_headers(credential)
        self.frame_headers = {**protocol.FRAME_HEADERS, **self.headers}

    def close(self) -> None:
        """Close the keep-alive connection."""
        self.http.close()

    def __enter__(self) -> ChainClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, tensors: dict[str, torch.Tensor], **meta) -> StepResult:
        """One frame in, the chain's answer out; a failure raises :class:`~edgeorch.transport.protocol.HopFailure` with its fields."""
        body = protocol.step_body(tensors, **meta)
        t0 = time.perf_counter()
        try:
            resp = self.http.post(self.url, content=body, headers=self.frame_headers)
        except HopError as exc:
            raise protocol.unreachable(exc, "entry stage", self.entry_stage, self.url) from exc
        wall = time.perf_counter() - t0
        frame, hops = protocol.read_answer(resp, self.entry_stage)
        return StepResult(frame, hops, wall, len(body))

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        stop_ids: set[int] | None = None,
        session: str | None = None,
    ) -> Generation:
        """Prefill the prompt, then decode one token per step until a stop id or the limit."""
        sampling = sampling or Sampling()
        session = session or uuid.uuid4().hex
        stop_ids = stop_ids or set()
        gen = Generation(token_ids=[])
        x = torch.tensor([prompt_ids], dtype=torch.int64)
        position = 0
        for i in range(max_new_tokens):
            last = i == max_new_tokens - 1
            res = self.step({"x": x}, session=session, position=position, mode="generate",
                            sampling=sampling.model_dump(), release=last)  # fmt: skip
            token = int(res.frame.meta["token"])
            gen.steps.append(res)
            gen.token_ids.append(token)
            position += x.shape[1]
            if token in stop_ids:
                if not last:
                    self.release(session)
                break
            x = torch.tensor([[token]], dtype=torch.int64)
        return gen

    def release(self, session: str) -> None:
        """Free a session's caches along the chain (best effort)."""
        try:
            self.http.delete(
                protocol.session_url(self.entry_url, self.entry_stage, session), headers=self.headers
            )
        except HopError:
            pass

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled, normalised embeddings of an encoder chain, one row per sequence."""
        tensors = {"x": input_ids}
        if attention_mask is not None:
            tensors["attention_mask"] = attention_mask
        res = self.step(tensors, session=uuid.uuid4().hex, mode="encode")
        return res.frame.tensors["embedding"]

    def logits(self, input_ids: torch.Tensor, which: str = "all") -> torch.Tensor:
        """Logits of a decoder chain for a whole sequence (no cache kept)."""
        res = self.step({"x": input_ids}, session=uuid.uuid4().hex, mode="logits", logits=which, release=True)
        return res.frame.tensors["logits"]
