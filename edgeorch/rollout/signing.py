"""Signed rollout messages and desired states: HMAC-SHA256 with a shared secret.

The signature covers the canonical JSON of the message without its
``signature`` field (sorted keys, no spaces), so any field changed in transit
breaks it. A worker's :class:`MessageVerifier` also refuses what is too old
(``issued_at``), what it has seen before (``nonce``), and what is older than
the newest state it knows for that deployment (``version`` and phase rank), and
says why.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from edgeorch.rollout.state import KIND_RANK
from edgeorch.service.auth import is_loopback

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-edgeorch-signature"
# Used only when no secret is configured and every listener is on loopback.
DEV_SECRET = "edgeorch-insecure-loopback-secret"


class InsecureSecretError(ValueError):
    """No rollout secret is configured and the service listens beyond loopback."""


def resolve_secret(secret: str, bind_host: str | None = None) -> str:
    """The secret to sign with: the configured one, or a fixed dev secret on loopback (with a warning).

    ``bind_host`` None means the caller does not know where it listens
    (an app built in a test); that counts as loopback.
    """
    if secret:
        return secret
    if bind_host is not None and not is_loopback(bind_host):
        raise InsecureSecretError(
            f"EDGEORCH_ROLLOUT_SECRET is empty but the service listens on {bind_host}; "
            "set a shared secret (the same on broadcast and every worker)"
        )
    log.warning("EDGEORCH_ROLLOUT_SECRET is empty: using the insecure loopback development secret")
    return DEV_SECRET


def canonical(payload: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, without ``signature``."""
    body = {k: v for k, v in payload.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_bytes(data: bytes, secret: str) -> str:
    """Hex HMAC-SHA256 of ``data``."""
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def sign(payload: Mapping[str, Any], secret: str) -> dict[str, Any]:
    """A copy of ``payload`` with its ``signature``."""
    return {**payload, "signature": sign_bytes(canonical(payload), secret)}


def signature_problem(payload: Mapping[str, Any], secret: str) -> str | None:
    """Why ``payload``'s signature is not valid, or None when it is."""
    sig = payload.get("signature")
    if not sig:
        return "unsigned"
    if not isinstance(sig, str):
        return "signature is not a string"
    try:
        expected = sign_bytes(canonical(payload), secret)
    except (TypeError, ValueError) as exc:
        return f"not canonical JSON: {exc}"
    if not hmac.compare_digest(sig, expected):
        return "bad signature"
    return None


def bytes_signature_ok(data: bytes, signature: str | None, secret: str) -> bool:
    """Whether ``signature`` is the HMAC of ``data`` (an ack body, for example)."""
    return bool(signature) and hmac.compare_digest(signature, sign_bytes(data, secret))


def new_message(
    kind: str, deployment: str, version: int, rollout_id: str, secret: str, now: float | None = None,
    nodes: Sequence[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A signed PREPARE/COMMIT/RELEASE/ABORT notification.

    ``nodes``: the workers whose desired state the rollout changes (both
    versions' nodes); a worker not named has nothing to reconcile and stays
    asleep (:func:`addressed_to`). None: every worker reconciles.
    """
    if kind not in KIND_RANK:
        raise ValueError(f"unknown message kind {kind!r}")
    body: dict[str, Any] = {
        "kind": kind,
        "deployment": deployment,
        "version": version,
        "rollout_id": rollout_id,
        "issued_at": time.time() if now is None else now,
        "nonce": secrets.token_hex(16),
    }
    if nodes is not None:
        body["nodes"] = sorted(set(nodes))
    return sign(body, secret)


def addressed_to(msg: Mapping[str, Any], node_id: str) -> bool:
    """Whether a verified notification concerns ``node_id``: it names the node, or names no nodes at all."""
    nodes = msg.get("nodes")
    return not isinstance(nodes, list) or node_id in nodes


def signed_desired(node_id: str, deployments: list[dict[str, Any]], secret: str) -> dict[str, Any]:
    """A node's desired state, signed, fresh nonce and time."""
    return sign(
        {"node_id": node_id, "issued_at": time.time(), "nonce": secrets.token_hex(16),
         "deployments": deployments},
        secret,
    )  # fmt: skip


class MessageVerifier:
    """A worker's memory of what it has accepted, and the checks every message must pass.

    Rollout messages are checked against the newest (version, phase rank) seen
    from any source; pulled desired states only against earlier pulls, so a
    message can never block the authoritative pull path.
    """

    def __init__(self, secret: str, max_age_s: float = 300.0, max_skew_s: float = 30.0):
        self.secret = secret
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self._nonces: dict[str, float] = {}  # nonce -> when it may be forgotten
        self.newest: dict[str, tuple[int, int]] = {}
        self.newest_pulled: dict[str, tuple[int, int]] = {}

    def _envelope_problem(self, payload: Mapping[str, Any], now: float) -> str | None:
        problem = signature_problem(payload, self.secret)
        if problem:
            return problem
        issued_at = payload.get("issued_at")
        if not isinstance(issued_at, int | float) or isinstance(issued_at, bool):
            return "no issued_at"
        if now - issued_at > self.max_age_s:
            return f"expired: issued {now - issued_at:.0f}s ago, limit {self.max_age_s:.0f}s"
        if issued_at - now > self.max_skew_s:
            return f"future: issued {issued_at - now:.0f}s ahead, limit {self.max_skew_s:.0f}s"
        nonce = payload.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            return "no nonce"
        self._forget_old_nonces(now)
        if nonce in self._nonces:
            return "replayed: nonce already seen"
        return None

    def _forget_old_nonces(self, now: float) -> None:
        # A nonce only needs remembering while its message could still pass the age check.
        for n in [n for n, until in self._nonces.items() if until < now]:
            del self._nonces[n]

    def _remember(self, payload: Mapping[str, Any]) -> None:
        self._nonces[payload["nonce"]] = payload["issued_at"] + self.max_age_s + self.max_skew_s

    def check_message(self, msg: Any, now: float | None = None) -> str | None:
        """Why a rollout message must be rejected, or None after accepting (and remembering) it."""
        now = time.time() if now is None else now
        if not isinstance(msg, dict):
            return "not a JSON object"
        problem = self._envelope_problem(msg, now)
        if problem:
            return problem
        kind, deployment, version = msg.get("kind"), msg.get("deployment"), msg.get("version")
        if kind not in KIND_RANK or not isinstance(deployment, str) or not isinstance(version, int):
            return "malformed: needs kind, deployment, version"
        seen = self.newest.get(deployment)
        mark = (version, KIND_RANK[kind])
        if seen is not None and mark < seen:
            return f"stale: {kind} of version {version}, newest seen is version {seen[0]} (rank {seen[1]})"
        self._remember(msg)
        self.newest[deployment] = mark
        return None

    def check_desired(self, doc: Any, node_id: str, now: float | None = None) -> str | None:
        """Why a pulled desired state must be rejected as a whole, or None after accepting it."""
        now = time.time() if now is None else now
        if not isinstance(doc, dict):
            return "not a JSON object"
        problem = self._envelope_problem(doc, now)
        if problem:
            return problem
        if doc.get("node_id") != node_id:
            return f"addressed to node {doc.get('node_id')!r}, not {node_id!r}"
        if not isinstance(doc.get("deployments"), list):
            return "malformed: no deployments list"
        self._remember(doc)
        return None

    def fresh_entries(self, doc: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
        """The deployment entries of an accepted desired state that are not older than earlier pulls.

        Returns (fresh entries, names of stale ones). Fresh ones raise the
        newest marks, so a later stale message is refused.
        """
        fresh, stale = [], []
        for entry in doc["deployments"]:
            name = entry.get("name")
            mark = (int(entry.get("version", 0)), int(entry.get("rank", 0)))
            if mark < self.newest_pulled.get(name, (0, 0)):
                stale.append(name)
                continue
            self.newest_pulled[name] = mark
            self.newest[name] = max(mark, self.newest.get(name, mark))
            fresh.append(entry)
        return fresh, stale
