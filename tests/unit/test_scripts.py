"""scripts/: one executable curl example per user-facing call, all reading the same environment."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support import REPO

SCRIPTS = REPO / "scripts"
EXAMPLES = sorted(p for p in SCRIPTS.glob("*.sh") if p.name != "common.sh")
# Every user-facing call, and a piece of script text that makes it.
CALLS = {
    "deployments create": '-X POST "$EDGEORCH_URL/v1/deployments"',
    "deployments get": "$EDGEORCH_URL/v1/deployments/${1:-",
    "deployments list": 'call "$EDGEORCH_URL/v1/deployments"',
    "deployments delete": '-X DELETE "$EDGEORCH_URL/v1/deployments/',
    "chat": "/v1/chat/completions",
    "chat streaming": '\\"stream\\": true',
    "completions": '/v1/completions"',
    "embeddings": "/v1/embeddings",
    "minilm deployment": '"model": "minilm-l6"',
    "models": "/v1/models",
    "jobs submit": '-X POST "$EDGEORCH_URL/v1/jobs"',
    "jobs poll": "$EDGEORCH_URL/v1/jobs/$id",
    "events": "/v1/events",
    "monitor nodes": "$EDGEORCH_MONITOR_URL/v1/nodes",
    "monitor links": "$EDGEORCH_MONITOR_URL/v1/links",
    "emulation": "$EDGEORCH_WORKER_URL/v1/admin/emulation",
}


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 14, EXAMPLES


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_script_is_executable_bash_that_uses_the_common_settings(script) -> None:
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert 'source "$(dirname "$0")/common.sh"' in text
    assert text.splitlines()[1].startswith("# "), "the second line says what the script does"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_common_reads_url_and_admin_token_with_defaults() -> None:
    text = (SCRIPTS / "common.sh").read_text(encoding="utf-8")
    assert 'EDGEORCH_URL="${EDGEORCH_URL:-http://127.0.0.1:8000}"' in text
    assert "EDGEORCH_ADMIN_TOKEN" in text and "set -euo pipefail" in text


@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_user_facing_call_has_an_example(call: str) -> None:
    assert any(CALLS[call] in p.read_text(encoding="utf-8") for p in EXAMPLES), call


def test_admin_calls_send_the_admin_token() -> None:
    for name in ("deployments-create.sh", "deployments-delete.sh", "worker-emulation.sh"):
        assert '"${ADMIN[@]}"' in (SCRIPTS / name).read_text(encoding="utf-8"), name
