"""The local stack's decisions that need no child process: which Redis, which ports, what environment.

``redis_answers`` is checked against the real Redis the suite uses (127.0.0.1:6379)
and against a port nothing listens on.
"""

from __future__ import annotations

import socket

import pytest

from edgeorch.local.launcher import free_port, port_is_free, redis_answers
from edgeorch.local.scenario import load_scenario
from edgeorch.local.stack import LocalStack, StackError, choose_redis
from edgeorch.local.up_command import format_table, plan_table

LIVE_REDIS = "redis://127.0.0.1:6379/0"


def test_the_configured_redis_is_used_when_it_answers() -> None:
    choice = choose_redis(LIVE_REDIS, answers=True, server="/usr/bin/redis-server")
    assert choice.url == LIVE_REDIS and not choice.start_server


def test_a_redis_server_is_started_when_none_answers() -> None:
    assert choose_redis(LIVE_REDIS, answers=False, server="/usr/bin/redis-server").start_server


def test_a_private_redis_is_started_even_when_one_answers() -> None:
    assert choose_redis(LIVE_REDIS, answers=True, server="/usr/bin/redis-server", private=True).start_server


@pytest.mark.parametrize("private", [False, True])
def test_without_redis_server_on_path_the_error_says_what_to_do(private: bool) -> None:
    with pytest.raises(StackError, match="redis-server is not on PATH"):
        choose_redis(LIVE_REDIS, answers=private, server=None, private=private)


def test_redis_answers_tells_live_from_dead() -> None:
    assert redis_answers(LIVE_REDIS)
    assert not redis_answers(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)


def test_port_is_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_is_free(s.getsockname()[1])
    assert port_is_free(free_port())


def test_a_stack_starts_nothing_until_asked() -> None:
    stack = LocalStack(workers=2)
    assert [w.node_id for w in stack.scenario.workers] == ["node-a", "node-b"]
    assert stack.workers == [] and stack.services == {}
    with pytest.raises(StackError, match="not running"):
        _ = stack.orchestrator_url
    with pytest.raises(StackError, match="not running"):
        stack.add_worker("late")
    stack.stop()  # stopping a stack that never started is harmless


def test_secrets_are_generated_unless_given() -> None:
    a, b = LocalStack(), LocalStack()
    assert len(a.admin_token) >= 32 and a.admin_token != b.admin_token
    assert len(a.rollout_secret) >= 40 and a.rollout_secret != b.rollout_secret
    assert LocalStack(admin_token="").admin_token == ""
    assert LocalStack(admin_token="t", rollout_secret="s").rollout_secret == "s"


def test_every_service_gets_the_shared_settings(tmp_path) -> None:
    stack = LocalStack(
        load_scenario(), model_store=tmp_path / "models", state_dir=tmp_path / "state",
        admin_token="adm", api_keys=["k1", "", "k2"], rollout_secret="sec", redis_url="redis://r:1/0",
    )  # fmt: skip
    env = stack._common_env()
    assert env["EDGEORCH_ADMIN_TOKEN"] == "adm"
    assert env["EDGEORCH_API_KEYS"] == "k1,k2"
    assert env["EDGEORCH_ROLLOUT_SECRET"] == "sec"
    assert env["EDGEORCH_REDIS_URL"] == "redis://r:1/0"
    assert env["EDGEORCH_MODEL_STORE"] == str(tmp_path / "models")
    assert env["EDGEORCH_STATE_DIR"] == str(tmp_path / "state")
    # Empty rather than unset, so a URL in the caller's environment cannot leak in.
    assert env["EDGEORCH_DATABASE_URL"] == ""
    assert env["EDGEORCH_JOBS_QUEUE"].startswith("edgeorch-jobs-")
    assert LocalStack(database_url="postgresql://x/y")._common_env()["EDGEORCH_DATABASE_URL"] == (
        "postgresql://x/y"
    )


def test_default_ports_are_taken_when_free_and_asked_for() -> None:
    port = free_port()
    assert LocalStack(default_ports=True)._port(port) == port
    assert LocalStack(default_ports=True)._port(port, taken={port}) != port
    assert LocalStack()._port(port) != port  # tests never ask for fixed ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert LocalStack(default_ports=True)._port(port) != port


def test_tables() -> None:
    view = {"stages": [{"node": "node-a", "start": 0, "end": 11, "url": "http://a"},
                       {"node": "node-b", "start": 11, "end": 32, "url": None}]}  # fmt: skip
    assert plan_table(view).splitlines() == [
        "stage  node    units             url",
        "-----  ------  ----------------  --------",
        "0      node-a  0:11 (11 units)   http://a",
        "1      node-b  11:32 (21 units)",
    ]
    assert format_table(["a"], []) == "a\n-"


def test_free_port_never_hands_out_a_port_twice_while_children_may_still_be_binding() -> None:
    from edgeorch.local.launcher import free_port

    # Nothing binds these ports: without the memory of recent ports, the kernel
    # offers the lowest free ephemeral ports again and repeats show up quickly.
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
