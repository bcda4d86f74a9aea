"""The broadcast service's durable state: deployments, plan versions, rollouts, acks.

Tables are prefixed ``broadcast_`` so the service can share a PostgreSQL
database with the others. Every phase change is one transaction that checks
the state machine first; the driver loop is the only writer of phases, the
ack route the only writer of acks. Times are Unix seconds.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import BigInteger, Float, ForeignKey, String, Text, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from edgeorch.rollout.plan import DeploymentSnapshot, desired_for_node, kept_versions, place
from edgeorch.rollout.state import ABORTED, COMMITTED, COMPLETED, PREPARING, check_transition
from edgeorch.schemas.rollout import (
    AckRequest,
    AckView,
    PlacementView,
    Plan,
    RolloutRequest,
    RolloutView,
    VersionStatus,
)
from edgeorch.schemas.stage import NextHop

IN_FLIGHT = (PREPARING, COMMITTED)


class Base(DeclarativeBase):
    """The broadcast service's tables."""


class DeploymentRow(Base):
    __tablename__ = "broadcast_deployments"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    active_version: Mapped[int | None]
    updated_at: Mapped[float] = mapped_column(Float)


class PlanVersionRow(Base):
    __tablename__ = "broadcast_plan_versions"

    deployment: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(primary_key=True)
    plan_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # preparing|active|draining|retired|aborted
    created_at: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    __tablename__ = "broadcast_rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int]
    from_version: Mapped[int | None]
    phase: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    nodes_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    prepare_deadline: Mapped[float] = mapped_column(Float)
    acked_at: Mapped[float | None] = mapped_column(Float)
    committed_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class AckRow(Base):
    __tablename__ = "broadcast_acks"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("broadcast_rollouts.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    ok: Mapped[bool]
    prepare_s: Mapped[float] = mapped_column(Float)
    bytes_read: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[float] = mapped_column(Float)


class NotFound(LookupError):
    """No such rollout or deployment."""


class Conflict(Exception):
    """The request contradicts the current state; ``kind`` says how (the 409's ``kind`` field)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class RolloutStore:
    """Reads and transactional writes over the broadcast tables (synchronous; call off the event loop)."""

    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions
        # One broadcast process owns its tables; this lock makes "check no
        # rollout is in flight, then insert one" atomic within it.
        self._create_lock = threading.Lock()
        # Being the tables' only writer, the store knows when what workers must hold can have
        # changed: every write bumps the generation, and the snapshots and each node's desired
        # state are cached per generation. Workers pull every few seconds (200 pulls/s at 1,000
        # nodes), and a pull computed afresh read every kept plan from the database (~50 ms).
        self._generation = 0
        self._cache_lock = threading.Lock()
        self._cached: tuple[int, list[DeploymentSnapshot], dict[str, list[dict]]] | None = None

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction; once it has committed, cached reads are stale."""
        try:
            with self._sessions.begin() as db:
                yield db
        finally:
            with self._cache_lock:
                self._generation += 1

    def ping(self) -> None:
        """Raise if the database does not answer."""
        with self._sessions() as db:
            db.execute(text("SELECT 1"))

    # ----- rollouts --------------------------------------------------------

    def create_rollout(
        self, req: RolloutRequest, rollout_id: str, now: float, prepare_timeout_s: float
    ) -> tuple[RolloutView, RolloutView | None]:
        """Record a new plan version and its rollout in phase PREPARING.

        Returns it, and the draining rollout it superseded (``supersede_drain``), if any.
        """
        name = req.deployment
        superseded = None
        with self._create_lock, self._write() as db:
            busy = db.scalars(
                select(RolloutRow).where(RolloutRow.deployment == name, RolloutRow.phase.in_(IN_FLIGHT))
            ).first()
            if busy is not None and busy.phase == COMMITTED and req.supersede_drain:
                check_transition(busy.phase, COMPLETED)
                busy.phase, busy.finished_at = COMPLETED, now
                busy.reason = "old version released early: superseded by a newer rollout"
                if busy.from_version is not None:
                    db.get(PlanVersionRow, (name, busy.from_version)).status = "retired"
                superseded, busy = busy.id, None
            if busy is not None:
                raise Conflict(
                    "rollout_in_flight",
                    f"rollout {busy.id} of {name!r} to version {busy.version} is still {busy.phase}",
                )
            newest = db.scalar(
                select(func.max(PlanVersionRow.version)).where(PlanVersionRow.deployment == name)
            )
            version = req.version if req.version is not None else (newest or 0) + 1
            if newest is not None and version <= newest:
                raise Conflict(
                    "version_not_newer", f"version {version} of {name!r} is not newer than version {newest}"
                )
            dep = db.get(DeploymentRow, name)
            if dep is not None and dep.model != req.plan.model:
                raise Conflict(
                    "model_mismatch",
                    f"deployment {name!r} serves model {dep.model!r}, not {req.plan.model!r}",
                )
            nodes = sorted({s.node for s in req.plan.stages})
            db.add(PlanVersionRow(deployment=name, version=version, plan_json=req.plan.model_dump_json(),
                                  status=PREPARING, created_at=now))  # fmt: skip
            db.add(RolloutRow(id=rollout_id, deployment=name, version=version,
                              from_version=dep.active_version if dep else None, phase=PREPARING,
                              nodes_json=json.dumps(nodes), created_at=now,
                              prepare_deadline=now + prepare_timeout_s))  # fmt: skip
        return self.get_rollout(rollout_id), (self.get_rollout(superseded) if superseded else None)

    def get_rollout(self, rollout_id: str) -> RolloutView:
        """One rollout with its acks."""
        with self._sessions() as db:
            row = db.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFound(f"no rollout {rollout_id!r}")
            return self._view(db, row)

    def list_rollouts(self, deployment: str | None = None, limit: int = 50) -> list[RolloutView]:
        """The newest rollouts first, of one deployment or all."""
        with self._sessions() as db:
            q = select(RolloutRow).order_by(RolloutRow.created_at.desc()).limit(limit)
            if deployment is not None:
                q = q.where(RolloutRow.deployment == deployment)
            return [self._view(db, r) for r in db.scalars(q)]

    def in_flight(self) -> list[RolloutView]:
        """Rollouts still preparing or draining: the driver's work list."""
        with self._sessions() as db:
            rows = db.scalars(select(RolloutRow).where(RolloutRow.phase.in_(IN_FLIGHT)))
            return [self._view(db, r) for r in rows]

    def plan(self, deployment: str, version: int) -> Plan:
        """The plan of one version."""
        with self._sessions() as db:
            row = db.get(PlanVersionRow, (deployment, version))
            if row is None:
                raise NotFound(f"no version {version} of {deployment!r}")
            return Plan.model_validate_json(row.plan_json)

    def add_ack(self, ack: AckRequest, now: float) -> RolloutView:
        """Record (or replace) a node's ack; only while the rollout is preparing."""
        with self._write() as db:
            row = db.get(RolloutRow, ack.rollout_id)
            if row is None:
                raise NotFound(f"no rollout {ack.rollout_id!r}")
            nodes = json.loads(row.nodes_json)
            if ack.node_id not in nodes:
                raise Conflict("not_in_rollout", f"node {ack.node_id!r} has no stage in rollout {row.id}")
            if row.phase != PREPARING:
                raise Conflict(
                    "not_preparing", f"rollout {row.id} is {row.phase}; acks are taken only while preparing"
                )
            db.merge(AckRow(rollout_id=row.id, node_id=ack.node_id, ok=ack.ok, prepare_s=ack.prepare_s,
                            bytes_read=ack.bytes_read, error=ack.error, received_at=now))  # fmt: skip
            db.flush()
            acked = db.scalar(select(func.count()).select_from(AckRow).where(AckRow.rollout_id == row.id))
            if acked == len(nodes) and row.acked_at is None:
                row.acked_at = now
        return self.get_rollout(ack.rollout_id)

    def commit(self, rollout_id: str, now: float) -> RolloutView:
        """PREPARING → COMMITTED: the new version becomes the deployment's active one."""
        with self._write() as db:
            row = self._locked(db, rollout_id, COMMITTED)
            row.phase, row.committed_at = COMMITTED, now
            new = db.get(PlanVersionRow, (row.deployment, row.version))
            new.status = "active"
            dep = db.get(DeploymentRow, row.deployment)
            if dep is None:
                model = Plan.model_validate_json(new.plan_json).model
                dep = DeploymentRow(name=row.deployment, model=model, active_version=None, updated_at=now)
                db.add(dep)
            if row.from_version is not None:
                db.get(PlanVersionRow, (row.deployment, row.from_version)).status = "draining"
            dep.active_version, dep.updated_at = row.version, now
        return self.get_rollout(rollout_id)

    def abort(self, rollout_id: str, reason: str, now: float) -> RolloutView:
        """PREPARING → ABORTED: the new version is dropped, the old one keeps serving."""
        with self._write() as db:
            row = self._locked(db, rollout_id, ABORTED)
            row.phase, row.reason, row.finished_at = ABORTED, reason, now
            db.get(PlanVersionRow, (row.deployment, row.version)).status = "aborted"
        return self.get_rollout(rollout_id)

    def complete(self, rollout_id: str, reason: str, now: float) -> RolloutView:
        """COMMITTED → COMPLETED: the old version is released."""
        with self._write() as db:
            row = self._locked(db, rollout_id, COMPLETED)
            row.phase, row.reason, row.finished_at = COMPLETED, reason, now
            if row.from_version is not None:
                db.get(PlanVersionRow, (row.deployment, row.from_version)).status = "retired"
        return self.get_rollout(rollout_id)

    @staticmethod
    def _locked(db: Session, rollout_id: str, to_phase: str) -> RolloutRow:
        row = db.get(RolloutRow, rollout_id, with_for_update=True)
        if row is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        check_transition(row.phase, to_phase)
        return row

    @staticmethod
    def _view(db: Session, row: RolloutRow) -> RolloutView:
        acks = db.scalars(select(AckRow).where(AckRow.rollout_id == row.id).order_by(AckRow.node_id))
        return RolloutView(
            id=row.id, deployment=row.deployment, version=row.version, from_version=row.from_version,
            phase=row.phase, reason=row.reason, nodes=json.loads(row.nodes_json),
            acks=[AckView(node_id=a.node_id, ok=a.ok, prepare_s=a.prepare_s, bytes_read=a.bytes_read,
                          error=a.error, received_at=a.received_at) for a in acks],
            created_at=row.created_at, prepare_deadline=row.prepare_deadline, acked_at=row.acked_at,
            committed_at=row.committed_at, finished_at=row.finished_at,
            prepare_s=None if row.acked_at is None else row.acked_at - row.created_at,
            commit_s=None if row.committed_at is None or row.acked_at is None else row.committed_at - row.acked_at,
        )  # fmt: skip

    # ----- deployments -----------------------------------------------------

    def deployment(self, name: str) -> PlacementView:
        """A deployment's active version and its entry stage."""
        with self._sessions() as db:
            dep = db.get(DeploymentRow, name)
            if dep is None or dep.active_version is None:
                raise NotFound(f"no deployment {name!r} with a committed version")
            return self._deployment_view(db, dep)

    def deployments(self) -> list[PlacementView]:
        """Every deployment with a committed version."""
        with self._sessions() as db:
            rows = db.scalars(select(DeploymentRow).order_by(DeploymentRow.name))
            return [self._deployment_view(db, d) for d in rows if d.active_version is not None]

    @staticmethod
    def _deployment_view(db: Session, dep: DeploymentRow) -> PlacementView:
        active = db.get(PlanVersionRow, (dep.name, dep.active_version))
        stages = place(dep.name, dep.active_version, Plan.model_validate_json(active.plan_json))
        versions = db.scalars(
            select(PlanVersionRow)
            .where(PlanVersionRow.deployment == dep.name)
            .order_by(PlanVersionRow.version)
        )
        return PlacementView(
            name=dep.name, model=dep.model, active_version=dep.active_version,
            entry=NextHop(url=stages[0].url, stage_id=stages[0].stage_id), stages=stages,
            versions=[VersionStatus(version=v.version, status=v.status, created_at=v.created_at) for v in versions],
        )  # fmt: skip

    def desired(self, node_id: str) -> list[dict]:
        """:func:`desired_for_node` of ``node_id`` over the current snapshots, cached until the next write."""
        generation, snaps, per_node = self._current()
        found = per_node.get(node_id)
        if found is None:
            found = desired_for_node(node_id, snaps)
            with self._cache_lock:
                if self._cached is not None and self._cached[0] == generation:
                    per_node[node_id] = found
        return found

    def _current(self) -> tuple[int, list[DeploymentSnapshot], dict[str, list[dict]]]:
        with self._cache_lock:
            generation, cached = self._generation, self._cached
        if cached is not None and cached[0] == generation:
            return cached
        # Read after noting the generation: a write meanwhile leaves this entry stale at once.
        fresh = (generation, self.snapshots(), {})
        with self._cache_lock:
            if self._generation == generation:
                self._cached = fresh
        return fresh

    def snapshots(self) -> list[DeploymentSnapshot]:
        """What the desired-state computation needs, for every deployment with any version."""
        with self._sessions() as db:
            names = db.scalars(select(PlanVersionRow.deployment).distinct())
            out = []
            for name in names:
                dep = db.get(DeploymentRow, name)
                latest = db.scalars(
                    select(RolloutRow)
                    .where(RolloutRow.deployment == name)
                    .order_by(RolloutRow.version.desc())
                ).first()
                snap = DeploymentSnapshot(name=name, active_version=dep.active_version if dep else None)
                if latest is not None:
                    snap.rollout_id, snap.rollout_version = latest.id, latest.version
                    snap.rollout_phase, snap.rollout_from = latest.phase, latest.from_version
                for v in kept_versions(snap):
                    snap.plans[v] = Plan.model_validate_json(db.get(PlanVersionRow, (name, v)).plan_json)
                out.append(snap)
            return out
