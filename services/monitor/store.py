"""The monitor's durable tables: registrations, calibrations, events, models to profile."""

from __future__ import annotations

from sqlalchemy import JSON, Float, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from edgeorch.monitoring.cluster import EventDraft
from edgeorch.schemas.monitor import MonitorEvent, ProfileReport, Registration


class Base(DeclarativeBase):
    """Tables owned by the monitor."""


class NodeRow(Base):
    __tablename__ = "monitor_nodes"
    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))
    capacity: Mapped[dict] = mapped_column(JSON)
    registered_at: Mapped[float] = mapped_column(Float)


class ProfileRow(Base):
    __tablename__ = "monitor_profiles"
    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    report: Mapped[dict] = mapped_column(JSON)
    measured_at: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    __tablename__ = "monitor_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    node_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    data: Mapped[dict] = mapped_column(JSON)


class ProfileModelRow(Base):
    __tablename__ = "monitor_profile_models"
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    requested_at: Mapped[float] = mapped_column(Float)


def _event(row: EventRow) -> MonitorEvent:
    return MonitorEvent(id=row.id, ts=row.ts, kind=row.kind, node_id=row.node_id, data=row.data)


class MonitorStore:
    """Blocking SQL access; the service calls it from a thread pool."""

    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions

    def save_node(self, reg: Registration, registered_at: float) -> None:
        """Insert or update a registration (the first registration time is kept)."""
        with self.sessions.begin() as s:
            row = s.get(NodeRow, reg.node_id)
            if row is None:
                s.add(NodeRow(node_id=reg.node_id, url=reg.url, capacity=reg.capacity.model_dump(),
                              registered_at=registered_at))  # fmt: skip
            else:
                row.url, row.capacity = reg.url, reg.capacity.model_dump()

    def nodes(self) -> list[tuple[Registration, float]]:
        """Every registration ever made, with its time."""
        with self.sessions() as s:
            rows = s.scalars(select(NodeRow)).all()
            return [
                (Registration(node_id=r.node_id, url=r.url, capacity=r.capacity), r.registered_at)
                for r in rows
            ]

    def save_profiles(self, reports: list[tuple[str, ProfileReport, float]]) -> None:
        """Keep the latest calibration of each (node, model) of the (node id, report, time) triples,
        in one transaction."""
        with self.sessions.begin() as s:
            for node_id, report, now in reports:
                row = s.get(ProfileRow, (node_id, report.model))
                if row is None:
                    s.add(ProfileRow(node_id=node_id, model=report.model, report=report.model_dump(),
                                     measured_at=now))  # fmt: skip
                else:
                    row.report, row.measured_at = report.model_dump(), now
                s.flush()  # a node may report the same model twice in one batch

    def profiles(self) -> list[tuple[str, ProfileReport]]:
        """(node id, report) for every stored calibration."""
        with self.sessions() as s:
            return [
                (r.node_id, ProfileReport.model_validate(r.report)) for r in s.scalars(select(ProfileRow))
            ]

    def add_events(self, drafts: list[EventDraft], now: float) -> list[MonitorEvent]:
        """Persist events; returns them with their ids."""
        with self.sessions.begin() as s:
            rows = [EventRow(ts=now, kind=d.kind, node_id=d.node_id, data=d.data) for d in drafts]
            s.add_all(rows)
            s.flush()
            return [_event(r) for r in rows]

    def events(self, since: int = 0, limit: int = 1000) -> list[MonitorEvent]:
        """Events with id > since, oldest first."""
        with self.sessions() as s:
            q = select(EventRow).where(EventRow.id > since).order_by(EventRow.id).limit(limit)
            return [_event(r) for r in s.scalars(q)]

    def add_profile_model(self, model: str, now: float) -> None:
        """Ask every node to calibrate ``model`` (idempotent)."""
        with self.sessions.begin() as s:
            if s.get(ProfileModelRow, model) is None:
                s.add(ProfileModelRow(model=model, requested_at=now))

    def profile_models(self) -> list[str]:
        """Models every node should calibrate."""
        with self.sessions() as s:
            return list(s.scalars(select(ProfileModelRow.model).order_by(ProfileModelRow.requested_at)))
