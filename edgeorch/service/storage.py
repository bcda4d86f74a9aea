"""Durable state: one SQLAlchemy engine per service, SQLite by default, PostgreSQL by URL.

Each service declares its own tables on its own ``DeclarativeBase`` subclass
and owns them; no service reads another's tables. ``make_engine`` creates the
tables it is given on first use, so a fresh SQLite file or an empty
PostgreSQL schema both work without a migration step.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, sessionmaker

log = logging.getLogger(__name__)


def default_database_url(service: str, state_dir: Path) -> str:
    """The SQLite file a service uses when no URL is configured."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state_dir / f'{service}.db'}"


def make_engine(url: str, base: type[DeclarativeBase]) -> tuple[Engine, sessionmaker]:
    """An engine and session factory for ``url``, with ``base``'s tables created."""
    kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Services touch the DB from the event loop thread and from worker
        # threads; SQLite's default refuses that.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    base.metadata.create_all(engine)
    log.info("database ready at %s", engine.url.render_as_string(hide_password=True))
    return engine, sessionmaker(engine, expire_on_commit=False)
