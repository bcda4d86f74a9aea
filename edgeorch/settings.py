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
