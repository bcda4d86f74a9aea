"""The orchestrator's durable state: deployments, their plan history, the decision log.

Tables are prefixed ``orchestrator_`` so the service can share a database
with the others. A restarted orchestrator reads everything back from here:
deployments, the active plan and version, the history, the event ids.
Synchronous: call off the event loop. Times are Unix seconds.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import BigInteger, Float, String, Text, delete, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from edgeorch.schemas.orchestrator import OrchestratorEvent, PlanRecord, PredictedView, QosPolicy
from edgeorch.schemas.plan import PlanStage


class Base(DeclarativeBase):
    """The orchestrator's tables."""


class DeploymentRow(Base):
    __tablename__ = "orchestrator_deployments"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16))
    policy_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int | None]
    created_at: Mapped[float] = mapped_column(Float)
    last_change_at: Mapped[float | None] = mapped_column(Float)


class PlanRow(Base):
    __tablename__ = "orchestrator_plans"

    deployment: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    stages_json: Mapped[str] = mapped_column(Text)
    predicted_json: Mapped[str | None] = mapped_column(Text)
    migration_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    committed_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))


class EventRow(Base):
    __tablename__ = "orchestrator_events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    deployment: Mapped[str | None] = mapped_column(String(64), index=True)
    message: Mapped[str] = mapped_column(Text)
    data_json: Mapped[str] = mapped_column(Text)


class ProfileRow(Base):
    """A deployment's unit profile as computed at creation, so a restart need not load the model's code."""

    __tablename__ = "orchestrator_profiles"

    deployment: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the model's config.json
    profile_json: Mapped[str] = mapped_column(Text)


class Conflict(ValueError):
    """The deployment exists already."""


class NotFound(LookupError):
    """No such deployment."""


class OrchestratorStore:
    """Reads and writes over the orchestrator's tables."""

    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def ping(self) -> None:
        """Raise if the database does not answer."""
        with self._sessions() as db:
            db.execute(text("SELECT 1"))

    # ----- deployments -------------------------------------------------------

    def create(self, name: str, model: str, kind: str, policy: QosPolicy, now: float) -> None:
        """Record a new deployment in state pending."""
        with self._sessions.begin() as db:
            if db.get(DeploymentRow, name) is not None:
                raise Conflict(f"deployment {name!r} exists; DELETE it first to change its model")
            db.add(DeploymentRow(name=name, model=model, kind=kind, policy_json=policy.model_dump_json(),
                                 state="pending", reason="waiting for calibrated nodes", version=None,
                                 created_at=now, last_change_at=None))  # fmt: skip

    def get(self, name: str) -> DeploymentRow:
        """One deployment's row (detached)."""
        with self._sessions() as db:
            row = db.get(DeploymentRow, name)
            if row is None:
                raise NotFound(f"no deployment {name!r}")
            return row

    def names(self) -> list[str]:
        """Every deployment, by name."""
        with self._sessions() as db:
            return list(db.scalars(select(DeploymentRow.name).order_by(DeploymentRow.name)))

    def set_state(self, name: str, state: str, reason: str | None) -> bool:
        """Change a deployment's state; True when it changed."""
        with self._sessions.begin() as db:
            row = db.get(DeploymentRow, name)
            if row is None or (row.state == state and row.reason == reason):
                return False
            row.state, row.reason = state, reason
            return True

    def delete(self, name: str) -> None:
        """Forget a deployment and its history."""
        with self._sessions.begin() as db:
            if db.get(DeploymentRow, name) is None:
                raise NotFound(f"no deployment {name!r}")
            db.execute(delete(PlanRow).where(PlanRow.deployment == name))
            db.execute(delete(ProfileRow).where(ProfileRow.deployment == name))
            db.execute(delete(DeploymentRow).where(DeploymentRow.name == name))

    def save_profile(self, name: str, fingerprint: str, profile_json: str) -> None:
        """Keep the profile a deployment was planned with (replacing an older one)."""
        with self._sessions.begin() as db:
            db.merge(ProfileRow(deployment=name, fingerprint=fingerprint, profile_json=profile_json))

    def saved_profile(self, name: str) -> tuple[str, str] | None:
        """(fingerprint, profile JSON) saved for a deployment, if any."""
        with self._sessions() as db:
            row = db.get(ProfileRow, name)
            return None if row is None else (row.fingerprint, row.profile_json)

    # ----- plans -------------------------------------------------------------

    def add_plan(self, name: str, version: int, kind: str, reason: str, stages: list[PlanStage],
                 predicted: PredictedView | None, migration_bytes: int, now: float) -> None:  # fmt: skip
        """Record a plan version being rolled out."""
        with self._sessions.begin() as db:
            db.merge(PlanRow(deployment=name, version=version, kind=kind, reason=reason,
                             stages_json=json.dumps([s.model_dump() for s in stages]),
                             predicted_json=predicted.model_dump_json() if predicted else None,
                             migration_bytes=migration_bytes, created_at=now, committed_at=None,
                             outcome="pending"))  # fmt: skip

    def finish_plan(self, name: str, version: int, committed: bool, now: float, voluntary: bool) -> None:
        """Mark a rollout's outcome; a commit makes it the deployment's active version."""
        with self._sessions.begin() as db:
            plan = db.get(PlanRow, (name, version))
            dep = db.get(DeploymentRow, name)
            if plan is None or dep is None:
                return
            plan.outcome = "committed" if committed else "aborted"
            if committed:
                plan.committed_at = now
                dep.version = version
                if voluntary:
                    dep.last_change_at = now

    def history(self, name: str) -> list[PlanRecord]:
        """Every plan version of a deployment, oldest first."""
        with self._sessions() as db:
            rows = db.scalars(select(PlanRow).where(PlanRow.deployment == name).order_by(PlanRow.version))
            return [_record(r) for r in rows]

    def active_plan(self, name: str) -> PlanRecord | None:
        """The committed plan the deployment serves now."""
        dep = self.get(name)
        if dep.version is None:
            return None
        with self._sessions() as db:
            row = db.get(PlanRow, (name, dep.version))
            return _record(row) if row else None

    # ----- events ------------------------------------------------------------

    def add_event(self, kind: str, deployment: str | None, message: str, data: dict[str, Any],
                  now: float) -> OrchestratorEvent:  # fmt: skip
        """Append to the decision log."""
        with self._sessions.begin() as db:
            row = EventRow(ts=now, kind=kind, deployment=deployment, message=message,
                           data_json=json.dumps(data, default=str))  # fmt: skip
            db.add(row)
            db.flush()
            return _event(row)

    def last_event_id(self) -> int:
        """The newest log entry's id (0 when the log is empty)."""
        with self._sessions() as db:
            return db.scalar(select(func.max(EventRow.id))) or 0

    def events(self, since: int, deployment: str | None, limit: int) -> list[OrchestratorEvent]:
        """Log entries after ``since``, oldest first."""
        with self._sessions() as db:
            q = select(EventRow).where(EventRow.id > since).order_by(EventRow.id).limit(limit)
            if deployment is not None:
                q = q.where(EventRow.deployment == deployment)
            return [_event(r) for r in db.scalars(q)]


def _record(r: PlanRow) -> PlanRecord:
    return PlanRecord(
        version=r.version, kind=r.kind, reason=r.reason,
        stages=[PlanStage.model_validate(s) for s in json.loads(r.stages_json)],
        predicted=PredictedView.model_validate_json(r.predicted_json) if r.predicted_json else None,
        migration_bytes=r.migration_bytes, created_at=r.created_at, committed_at=r.committed_at,
        outcome=r.outcome,
    )  # fmt: skip


def _event(r: EventRow) -> OrchestratorEvent:
    return OrchestratorEvent(id=r.id, ts=r.ts, kind=r.kind, deployment=r.deployment, message=r.message,
                             data=json.loads(r.data_json))  # fmt: skip
