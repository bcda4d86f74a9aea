"""The orchestrator's tables on SQLite (the default; PostgreSQL is covered by the e2e stack)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import Depends, FastAPI

from edgeorch.schemas.orchestrator import PredictedView, QosPolicy
from edgeorch.schemas.plan import PlanStage
from edgeorch.service.storage import make_engine
from services.orchestrator.gateway_auth import require_api_key
from services.orchestrator.store import Base, Conflict, NotFound, OrchestratorStore


@pytest.fixture
def store(tmp_path) -> OrchestratorStore:
    engine, sessions = make_engine(f"sqlite:///{tmp_path / 'o.db'}", Base)
    yield OrchestratorStore(sessions)
    engine.dispose()


def _stages() -> list[PlanStage]:
    return [PlanStage(node="a", start=0, end=10, url="http://a"), PlanStage(node="b", start=10, end=32)]


def test_deployment_plan_history_and_events_survive_a_new_store(store, tmp_path) -> None:
    store.create("d", "smollm2-135m", "decoder", QosPolicy(privacy="edges"), now=1.0)
    with pytest.raises(Conflict):
        store.create("d", "smollm2-135m", "decoder", QosPolicy(), now=2.0)
    pred = PredictedView(latency_s=1.0, throughput_tokens_per_s=5.0, energy_j=2.0, step_s=0.1)
    store.add_plan("d", 1, "deploy", "first plan", _stages(), pred, 0, now=3.0)
    assert store.active_plan("d") is None  # not committed yet
    store.finish_plan("d", 1, committed=True, now=4.0, voluntary=True)
    store.add_plan("d", 2, "resplit", "n2 slowed", _stages(), None, 123, now=5.0)
    store.finish_plan("d", 2, committed=False, now=6.0, voluntary=True)
    assert store.set_state("d", "ready", None) and not store.set_state("d", "ready", None)
    e1 = store.add_event("deploy", "d", "v1 committed", {"version": 1}, now=4.0)
    store.add_event("keep", "d", "below threshold", {}, now=7.0)

    engine, sessions = make_engine(f"sqlite:///{tmp_path / 'o.db'}", Base)  # as after a restart
    again = OrchestratorStore(sessions)
    row = again.get("d")
    assert (row.state, row.version, row.last_change_at) == ("ready", 1, 4.0)
    assert QosPolicy.model_validate_json(row.policy_json).privacy == "edges"
    hist = again.history("d")
    assert [(h.version, h.kind, h.outcome) for h in hist] == [
        (1, "deploy", "committed"),
        (2, "resplit", "aborted"),
    ]
    assert hist[0].predicted == pred and hist[1].migration_bytes == 123
    assert again.active_plan("d").stages == _stages()
    assert [e.kind for e in again.events(0, None, 10)] == ["deploy", "keep"]
    assert [e.id for e in again.events(e1.id, "d", 10)] == [e1.id + 1]
    again.delete("d")
    with pytest.raises(NotFound):
        again.get("d")
    engine.dispose()


def test_saved_profiles_are_replaced_and_deleted_with_their_deployment(store) -> None:
    store.create("d", "smollm2-135m", "decoder", QosPolicy(), now=1.0)
    assert store.saved_profile("d") is None
    store.save_profile("d", "aa", '{"v": 1}')
    store.save_profile("d", "bb", '{"v": 2}')
    assert store.saved_profile("d") == ("bb", '{"v": 2}')
    store.delete("d")
    assert store.saved_profile("d") is None


def test_a_restored_deployment_reads_its_saved_profile_until_the_config_changes(tmp_path) -> None:
    import shutil

    from edgeorch.models.store import ModelStore
    from edgeorch.service.settings import CommonSettings
    from services.orchestrator.deployments import DeploymentBook

    real = ModelStore(CommonSettings().model_store)
    root = tmp_path / "models"
    shutil.copytree(real.path("tiny-llama"), root / "tiny-llama")
    engine, sessions = make_engine(f"sqlite:///{tmp_path / 'o.db'}", Base)
    st = OrchestratorStore(sessions)
    st.create("d", "tiny-llama", "decoder", QosPolicy(), now=1.0)
    book = DeploymentBook(st, controller=None, models=ModelStore(root))
    profile, _ = book._restore_model("d", "tiny-llama", QosPolicy())  # nothing saved: computed, then saved
    fingerprint, saved = st.saved_profile("d")
    assert saved == profile.model_dump_json()
    st.save_profile("d", fingerprint, saved.replace('"tiny-llama"', '"from-the-table"', 1))
    again, _ = book._restore_model("d", "tiny-llama", QosPolicy())
    assert again.model == "from-the-table"  # read back, not recomputed
    cfg = root / "tiny-llama" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")  # the model was prepared again
    fresh, _ = book._restore_model("d", "tiny-llama", QosPolicy())
    assert fresh == profile and st.saved_profile("d")[0] != fingerprint
    engine.dispose()


@pytest.mark.parametrize(
    ("keys", "header", "status"),
    [("", None, 200), ("k1,k2", None, 401), ("k1,k2", "Bearer k2", 200), ("k1", "Bearer k2", 401),
     ("k1", "Basic k1", 401)],
)  # fmt: skip
def test_gateway_api_keys(keys, header, status) -> None:
    app = FastAPI()

    class Settings:
        api_keys = keys

    app.state.settings = Settings()

    @app.get("/x", dependencies=[Depends(require_api_key)])
    async def x() -> dict:
        return {}

    async def call() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get("/x", headers={"authorization": header} if header else {})).status_code

    assert asyncio.run(call()) == status
