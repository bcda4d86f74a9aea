"""Deployments: create, restore after a restart, delete, and the view users read.

A deployment is a model from the local store, served under a QoS policy.
Its profile (the unit chain the planner sees) and its tokenizer come from
the store's files; its plan history and state from the orchestrator's
tables; the rest is the controller's.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from edgeorch.models import adapter_for, load_config
from edgeorch.models.store import ModelStore, ModelStoreError, model_context
from edgeorch.models.tokenizer import load_tokenizer
from edgeorch.models.unitfile import servable_formats
from edgeorch.schemas.orchestrator import DeploymentRequest, DeploymentView, QosPolicy
from edgeorch.schemas.profile import ModelProfile
from services.orchestrator.controller import Controller
from services.orchestrator.live import Live, measured
from services.orchestrator.store import NotFound, OrchestratorStore

log = logging.getLogger(__name__)


def _fingerprint(model_dir: Path, weight_format: str) -> str:
    """What a unit profile is computed from: the model's config file and the weight format."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    if weight_format != "fp32":  # fp32 keeps the fingerprints saved before formats existed
        digest.update(f"\0{weight_format}".encode())
    return digest.hexdigest()


class UnknownModel(LookupError):
    """The model is not in the store."""


class DeploymentBook:
    """The deployments this orchestrator serves, with their tokenizers."""

    def __init__(self, store: OrchestratorStore, controller: Controller, models: ModelStore):
        self.store = store
        self.controller = controller
        self.models = models
        self.tokenizers: dict[str, Any] = {}
        self._contexts: dict[str, int | None] = {}

    def _path(self, model: str) -> Path:
        try:
            return self.models.path(model)
        except ModelStoreError as exc:
            raise UnknownModel(str(exc)) from exc

    def _load_model(self, model: str, policy: QosPolicy):
        """Profile, family kind and tokenizer of a store model (blocking)."""
        path = self._path(model)
        formats = servable_formats(path)
        if policy.weight_format not in formats:  # a synthesised model has only the formats it was written in
            raise ValueError(f"model {model!r} can be served in {formats}, not {policy.weight_format!r}")
        adapter = adapter_for(load_config(path))
        profile = adapter.profile(
            model, context_tokens=policy.workload.context_tokens, weight_format=policy.weight_format
        )
        tokenizer = load_tokenizer(path)
        return profile, ("decoder" if adapter.is_decoder else "encoder"), tokenizer

    def _restore_model(self, name: str, model: str, policy: QosPolicy) -> tuple[ModelProfile, Any]:
        """Profile and tokenizer after a restart: the saved profile while the model's config is unchanged.

        Computing the profile imports the family's transformers code, about
        2.5 s of a restart on the 2-core test machine that must answer again
        within 10 s; reading it back takes milliseconds.
        """
        path = self._path(model)
        fingerprint = _fingerprint(path, policy.weight_format)
        saved = self.store.saved_profile(name)
        if saved is not None and saved[0] == fingerprint:
            return ModelProfile.model_validate_json(saved[1]), load_tokenizer(path)
        profile, _, tokenizer = self._load_model(model, policy)
        self.store.save_profile(name, fingerprint, profile.model_dump_json())
        return profile, tokenizer

    async def create(self, req: DeploymentRequest) -> DeploymentView:
        """Record a deployment and start planning it (raises UnknownModel, Conflict)."""
        profile, kind, tokenizer = await run_in_threadpool(self._load_model, req.model, req.policy)
        bad = [u for u in req.policy.trusted_units if u >= profile.num_units]
        if bad:
            raise ValueError(
                f"trusted_units {bad} out of range: {req.model} has units 0..{profile.num_units - 1}"
            )
        await run_in_threadpool(self.store.create, req.name, req.model, kind, req.policy, time.time())
        fingerprint = _fingerprint(self._path(req.model), req.policy.weight_format)
        await run_in_threadpool(self.store.save_profile, req.name, fingerprint, profile.model_dump_json())
        self.tokenizers[req.name] = tokenizer
        self.controller.start(Live(req.name, req.model, req.policy, profile))
        log.info("deployment %s: %s (%s, %d units), policy %s", req.name, req.model, kind,
                 profile.num_units, req.policy.model_dump_json())  # fmt: skip
        return await self.view(req.name)

    async def restore(self) -> None:
        """Start the loops of every stored deployment (after a restart)."""
        for name in await run_in_threadpool(self.store.names):
            row = await run_in_threadpool(self.store.get, name)
            policy = QosPolicy.model_validate_json(row.policy_json)
            try:
                profile, tokenizer = await run_in_threadpool(self._restore_model, name, row.model, policy)
            except UnknownModel as exc:
                await run_in_threadpool(self.store.set_state, name, "failed", str(exc))
                continue
            self.tokenizers[name] = tokenizer
            self.controller.start(Live(name, row.model, policy, profile))
        log.info("restored %d deployments", len(self.controller.live))

    async def delete(self, name: str) -> None:
        """Stop serving a deployment and forget it (raises NotFound)."""
        await run_in_threadpool(self.store.get, name)
        await self.controller.stop(name)
        await run_in_threadpool(self.store.delete, name)
        self.tokenizers.pop(name, None)
        self._contexts.pop(name, None)

    async def view(self, name: str) -> DeploymentView:
        """What GET /v1/deployments/{name} shows (raises NotFound)."""
        row = await run_in_threadpool(self.store.get, name)
        history = await run_in_threadpool(self.store.history, name)
        active = next((h for h in history if h.version == row.version), None)
        live = self.controller.live.get(name)
        return DeploymentView(
            name=row.name, model=row.model, kind=row.kind, policy=QosPolicy.model_validate_json(row.policy_json),
            state=row.state, reason=row.reason, version=row.version,
            stages=active.stages if active else [],
            predicted=(live.predicted if live and live.predicted else (active.predicted if active else None)),
            measured=measured(live), history=history, created_at=row.created_at,
        )  # fmt: skip

    def context_tokens(self, name: str) -> int | None:
        """The deployment's model context window (config.json), None when its config does not say."""
        if name not in self._contexts:
            live = self.controller.live.get(name)
            if live is None:
                raise NotFound(f"no deployment {name!r}")
            self._contexts[name] = model_context(self._path(live.model))
        return self._contexts[name]

    def kind(self, name: str) -> str:
        """decoder or encoder (raises NotFound): decoders are the models with a KV cache."""
        live = self.controller.live.get(name)
        if live is None:
            raise NotFound(f"no deployment {name!r}")
        return "decoder" if any(u.kv_bytes_per_token > 0 for u in live.profile.units) else "encoder"
