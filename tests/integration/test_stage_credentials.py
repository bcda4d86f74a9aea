"""Data-plane credentials on real workers: a forward or session call without the stage's credential is a 401.

Two chains of tiny-llama on the same two workers, each loaded with its own
credential (as ``edgeorch chain`` and the rollout agent do). A step without a
credential, with a wrong one, or with the other chain's is refused with 401
before the body is read or anything computes (the worker's compute histogram
does not move, no session is opened); with the right one the step crosses both
stages, so the first worker sent the second stage's credential on its own.
Rollout-loaded stages (credentials derived from the rollout secret) are covered
by tests/integration/test_auth.py and test_broadcast.py, whose chains now carry them.
"""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
import torch

from edgeorch.local.chain import load_chain
from edgeorch.local.launcher import LocalWorkers
from edgeorch.schemas.stage import Sampling
from edgeorch.security.credentials import CREDENTIAL_HEADER, new_credential, stage_credential
from edgeorch.transport import kv_frames, protocol
from edgeorch.transport.client import ChainClient
from edgeorch.transport.protocol import HopFailure

TINY = "tiny-llama"  # 6 units
RANGES = [(0, 3), (3, 6)]


@pytest.fixture(scope="module")
def chains(store, tmp_path_factory):
    """Workers holding two chains, "a" and "b", each with its own credential."""
    with LocalWorkers(
        2, model_store=store.root, threads=1, log_dir=tmp_path_factory.mktemp("cred")
    ) as workers:
        creds = {name: new_credential() for name in ("a", "b")}
        ids = {
            name: load_chain(workers, TINY, RANGES, prefix=name, credential=c) for name, c in creds.items()
        }
        yield workers, ids, creds


def _compute_steps(url: str) -> float:
    """How many steps this worker has computed, over every stage (its Prometheus histogram's count)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        float(v)
        for v in re.findall(r"edgeorch_worker_stage_compute_seconds_count\{[^}]*\} ([0-9.e+]+)", text)
    )


def _step(client: ChainClient, session: str):
    x = torch.tensor([[1, 50, 60]], dtype=torch.int64)
    return client.step(
        {"x": x}, session=session, position=0, mode="generate", sampling=Sampling().model_dump()
    )


def test_a_step_without_the_right_credential_is_refused_before_any_compute(chains) -> None:
    workers, ids, creds = chains
    entry = workers.workers[0].url
    before = _compute_steps(entry)
    for credential in (None, "x" * 32, creds["b"]):  # none, a guess, another chain's
        with (
            ChainClient(entry, ids["a"][0], credential=credential) as client,
            pytest.raises(HopFailure) as err,
        ):
            _step(client, uuid.uuid4().hex)
        assert (err.value.status, err.value.kind, err.value.failed_stage) == (
            401,
            "unauthorized",
            ids["a"][0],
        )
        assert CREDENTIAL_HEADER in err.value.detail
    assert _compute_steps(entry) == before
    assert httpx.get(f"{entry}/v1/stages/{ids['a'][0]}", timeout=30).json()["sessions"] == 0


def test_the_right_credential_crosses_every_hop_and_each_chain_keeps_its_own(chains) -> None:
    workers, ids, creds = chains
    for name in ("a", "b"):
        with ChainClient(workers.workers[0].url, ids[name][0], credential=creds[name]) as client:
            result = _step(client, uuid.uuid4().hex)
        assert [h["stage"] for h in result.hops] == ids[name]  # the first worker opened the second stage
    # The second stage refuses a direct call that lacks its credential, too.
    with ChainClient(workers.workers[1].url, ids["a"][1]) as client, pytest.raises(HopFailure) as err:
        _step(client, uuid.uuid4().hex)
    assert err.value.status == 401


def test_session_release_needs_the_credential(chains) -> None:
    workers, ids, creds = chains
    session = uuid.uuid4().hex
    stage_url = f"{workers.workers[0].url}/v1/stages/{ids['a'][0]}"
    before = httpx.get(stage_url, timeout=30).json()["sessions"]  # earlier tests' sessions may be open
    with ChainClient(workers.workers[0].url, ids["a"][0], credential=creds["a"]) as client:
        _step(client, session)
    url = protocol.session_url(workers.workers[0].url, ids["a"][0], session)
    refused = httpx.delete(url, timeout=30)
    assert refused.status_code == 401 and refused.json()["kind"] == "unauthorized"
    assert httpx.get(stage_url, timeout=30).json()["sessions"] == before + 1
    released = httpx.delete(url, headers={CREDENTIAL_HEADER: creds["a"]}, timeout=30)
    assert released.json() == {"released": ids["a"]}  # relayed down the chain with the next credential
    assert httpx.get(stage_url, timeout=30).json()["sessions"] == before


def test_credentials_are_never_shown(chains) -> None:
    workers, ids, creds = chains
    text = httpx.get(f"{workers.workers[0].url}/v1/stages", timeout=30).text
    assert ids["a"][0] in text and creds["a"] not in text and "credential" not in text


def test_derived_credentials_differ_per_stage_and_per_secret() -> None:
    a = stage_credential("secret-1", "chat.v1.s0")
    assert a == stage_credential("secret-1", "chat.v1.s0")
    others = {stage_credential("secret-1", "chat.v1.s1"), stage_credential("secret-1", "chat.v2.s0"),
              stage_credential("secret-1", "other.v1.s0"), stage_credential("secret-2", "chat.v1.s0")}  # fmt: skip
    assert a not in others and len(others) == 4 and len(a) == 32


def test_kv_migration_routes_need_the_credential_and_a_pull_carries_its_sources(chains) -> None:
    """KV export and pull are data-plane calls too; a pull reads a remote source with that source's credential."""
    workers, ids, creds = chains
    w0, w1 = (w.url for w in workers.workers)
    session = uuid.uuid4().hex
    with ChainClient(w0, ids["a"][0], credential=creds["a"]) as client:
        _step(client, session)  # 3 tokens in every stage's cache
    kv = kv_frames.kv_url(w0, ids["a"][0], session) + "?unit_start=1&unit_end=3&start=0&end=3"
    refused = httpx.get(kv, timeout=30)
    assert refused.status_code == 401 and refused.json()["kind"] == "unauthorized"
    assert httpx.get(kv, headers={CREDENTIAL_HEADER: creds["a"]}, timeout=30).status_code == 200

    # A new chain whose first stage sits on the other worker pulls chain a's first stage over the network.
    new_cred = new_credential()
    new_ids = load_chain([w1, w0], TINY, RANGES, prefix="moved", credential=new_cred)
    pull = kv_frames.pull_url(w1, new_ids[0], session)

    def body(source_credential):
        source = {"stage_id": ids["a"][0], "url": w0, "start": 0, "end": 3, "credential": source_credential}
        return {"position": 3, "sources": [source]}

    assert httpx.post(pull, json=body(creds["a"]), timeout=60).status_code == 401  # no credential of its own
    no_source = httpx.post(pull, json=body(None), headers={CREDENTIAL_HEADER: new_cred}, timeout=60)
    assert no_source.status_code == 502 and "401" in no_source.text  # the source refused the read
    done = httpx.post(pull, json=body(creds["a"]), headers={CREDENTIAL_HEADER: new_cred}, timeout=60)
    assert done.status_code == 200, done.text
    assert done.json()["bytes_remote"] > 0 and done.json()["units"] == [1, 3]
