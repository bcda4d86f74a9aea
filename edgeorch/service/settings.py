"""Settings shared by every service, read from EDGEORCH_* environment variables.

Services subclass :class:`CommonSettings` for their own knobs. Nothing builds
settings at import time: ``create_app(settings)`` receives them, so a test can
build as many differently configured apps as it likes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_model_store() -> Path:
    """Where `edgeorch models prepare` writes checkpoints unless told otherwise."""
    return Path.home() / ".cache" / "edgeorch" / "models"


class CommonSettings(BaseSettings):
    """Knobs every edgeorch process understands."""

    model_config = SettingsConfigDict(env_prefix="EDGEORCH_", extra="ignore")

    model_store: Path = Field(default_factory=default_model_store, description="local model store directory")
    log_level: str = Field(default="INFO", description="logging level name")
    admin_token: str = Field(
        default="",
        description="bearer token required on calls that change the system; empty: no token, "
        "allowed only on loopback",
    )
    api_keys: str = Field(
        default="", description="comma-separated API keys the orchestrator's gateway requires; empty: none"
    )
    model_dirs: str = Field(
        default="",
        description="checkpoint directories outside the store that a model name may point at "
        "(comma-separated); empty: model names resolve to the store only",
    )

    def allowed_model_dirs(self) -> list[Path]:
        """The operator's allow-list of checkpoint directories (``EDGEORCH_MODEL_DIRS``)."""
        return [Path(d.strip()) for d in self.model_dirs.split(",") if d.strip()]


def default_state_dir() -> Path:
    """Where services keep their SQLite files unless a database URL is given."""
    return Path.home() / ".local" / "state" / "edgeorch"


class ServiceSettings(CommonSettings):
    """Knobs of the control-plane services that keep state and publish events."""

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis for pub/sub and live state")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: a SQLite file per service"
    )
    state_dir: Path = Field(
        default_factory=default_state_dir, description="directory for default SQLite files"
    )
