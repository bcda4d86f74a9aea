"""Shared fixtures: the model store (prepared once), and real worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def store():
    """The model store the tests use, prepared if it is not yet (idempotent)."""
    # Imported here: the planner's tests need neither torch nor transformers.
    from edgeorch.models.store import ModelStore
    from edgeorch.service.settings import CommonSettings

    root = Path(os.environ.get("EDGEORCH_MODEL_STORE") or CommonSettings().model_store)
    s = ModelStore(root)
    s.prepare(progress=False)
    # Child processes (workers) must see the same store.
    os.environ["EDGEORCH_MODEL_STORE"] = str(s.root)
    return s
