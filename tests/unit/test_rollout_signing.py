"""Signed rollout messages: what a worker accepts, what it refuses, and why."""

from __future__ import annotations

import pytest

from edgeorch.rollout.signing import (
    DEV_SECRET,
    InsecureSecretError,
    MessageVerifier,
    addressed_to,
    bytes_signature_ok,
    canonical,
    new_message,
    resolve_secret,
    sign,
    sign_bytes,
    signed_desired,
)

SECRET = "unit-test-secret"
NOW = 1_800_000_000.0


def _msg(kind="prepare", version=2, now=NOW, secret=SECRET, deployment="d"):
    return new_message(kind, deployment, version, "r1", secret, now=now)


def test_canonical_form_ignores_key_order_and_the_signature() -> None:
    a = {"b": 1, "a": [1, {"y": 2, "x": 1}]}
    b = {"a": [1, {"x": 1, "y": 2}], "b": 1, "signature": "whatever"}
    assert canonical(a) == canonical(b) == b'{"a":[1,{"x":1,"y":2}],"b":1}'


def test_a_valid_message_is_accepted_once() -> None:
    v = MessageVerifier(SECRET)
    msg = _msg()
    assert v.check_message(msg, now=NOW + 1) is None
    assert v.check_message(dict(msg), now=NOW + 2) == "replayed: nonce already seen"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m.pop("signature"), "unsigned"),
        (lambda m: m.update(signature=""), "unsigned"),
        (lambda m: m.update(signature=123), "signature is not a string"),
        (lambda m: m.update(version=99), "bad signature"),  # tampered after signing
        (lambda m: m.update(kind="abort"), "bad signature"),
        (lambda m: m.update(signature=sign(m, "another-secret")["signature"]), "bad signature"),
    ],
    ids=["missing", "empty", "not-a-string", "tampered-version", "tampered-kind", "forged-key"],
)
def test_unsigned_forged_and_tampered_messages_are_refused(mutate, reason) -> None:
    msg = _msg()
    mutate(msg)
    assert MessageVerifier(SECRET).check_message(msg, now=NOW) == reason


def test_expired_and_future_messages_are_refused() -> None:
    v = MessageVerifier(SECRET, max_age_s=300, max_skew_s=30)
    assert v.check_message(_msg(now=NOW - 301), now=NOW).startswith("expired")
    assert v.check_message(_msg(now=NOW + 31), now=NOW).startswith("future")
    assert v.check_message(_msg(now=NOW - 299), now=NOW) is None


def test_older_version_or_earlier_phase_is_stale() -> None:
    v = MessageVerifier(SECRET)
    assert v.check_message(_msg("commit", version=3), now=NOW) is None
    assert v.check_message(_msg("prepare", version=3), now=NOW).startswith("stale")  # earlier phase
    assert v.check_message(_msg("release", version=2), now=NOW).startswith("stale")  # older version
    assert v.check_message(_msg("commit", version=3), now=NOW) is None  # same phase again: fine
    assert v.check_message(_msg("release", version=3), now=NOW) is None
    assert v.check_message(_msg("prepare", version=4), now=NOW) is None
    # Versions are per deployment.
    assert v.check_message(_msg("prepare", version=1, deployment="other"), now=NOW) is None


def test_a_refused_message_is_not_remembered() -> None:
    v = MessageVerifier(SECRET)
    msg = _msg(version=5)
    forged = {**msg, "version": 6}
    assert v.check_message(forged, now=NOW) == "bad signature"
    assert v.newest == {}
    assert v.check_message(msg, now=NOW) is None  # its nonce was not burnt by the forgery


def test_nonces_are_forgotten_once_their_message_would_be_expired_anyway() -> None:
    v = MessageVerifier(SECRET, max_age_s=10, max_skew_s=1)
    msg = _msg(now=NOW)
    assert v.check_message(msg, now=NOW) is None
    v.check_message(_msg(now=NOW + 20, deployment="x"), now=NOW + 20)
    assert msg["nonce"] not in v._nonces
    assert v.check_message(msg, now=NOW + 20).startswith("expired")


def test_garbage_is_refused_without_raising() -> None:
    v = MessageVerifier(SECRET)
    assert v.check_message(None) == "not a JSON object"
    assert v.check_message([1, 2]) == "not a JSON object"
    bad = sign({"kind": "nope", "deployment": "d", "version": 1, "issued_at": NOW, "nonce": "n"}, SECRET)
    assert v.check_message(bad, now=NOW).startswith("malformed")
    no_time = sign({"kind": "prepare", "deployment": "d", "version": 1, "nonce": "n"}, SECRET)
    assert v.check_message(no_time, now=NOW) == "no issued_at"


def test_desired_state_is_checked_for_node_signature_and_staleness() -> None:
    v = MessageVerifier(SECRET)
    entry = {"name": "d", "version": 3, "rank": 1, "keep": [2, 3], "stages": [], "prepare": None}
    doc = signed_desired("n1", [entry], SECRET)
    assert v.check_desired(doc, "n2").startswith("addressed to node")
    assert v.check_desired({**doc, "deployments": []}, "n1") == "bad signature"
    assert v.check_desired(doc, "n1") is None
    assert v.check_desired(doc, "n1") == "replayed: nonce already seen"
    fresh, stale = v.fresh_entries(doc)
    assert fresh == [entry] and stale == []
    # A message older than what was pulled is now stale...
    assert v.check_message(_msg("prepare", version=3, now=None)).startswith("stale")
    # ...and an older pull is left alone, deployment by deployment.
    older = signed_desired("n1", [{**entry, "rank": 0}, {**entry, "name": "e"}], SECRET)
    assert v.check_desired(older, "n1") is None
    fresh, stale = v.fresh_entries(older)
    assert stale == ["d"] and [e["name"] for e in fresh] == ["e"]


def test_a_message_with_a_high_version_cannot_block_the_pull_path() -> None:
    v = MessageVerifier(SECRET)
    assert v.check_message(_msg("prepare", version=99, now=None)) is None
    doc = signed_desired(
        "n1", [{"name": "d", "version": 2, "rank": 2, "stages": [], "prepare": None}], SECRET
    )
    assert v.check_desired(doc, "n1") is None
    fresh, stale = v.fresh_entries(doc)
    assert len(fresh) == 1 and stale == []


def test_body_signatures_for_acks() -> None:
    body = b'{"ok": true}'
    sig = sign_bytes(body, SECRET)
    assert bytes_signature_ok(body, sig, SECRET)
    assert not bytes_signature_ok(body + b" ", sig, SECRET)
    assert not bytes_signature_ok(body, None, SECRET)
    assert not bytes_signature_ok(body, sign_bytes(body, "other"), SECRET)


def test_an_empty_secret_is_refused_beyond_loopback() -> None:
    assert resolve_secret("s", "0.0.0.0") == "s"
    assert resolve_secret("", "127.0.0.1") == DEV_SECRET
    assert resolve_secret("", "::1") == DEV_SECRET
    assert resolve_secret("", "localhost") == DEV_SECRET
    assert resolve_secret("", None) == DEV_SECRET
    for host in ("0.0.0.0", "10.0.0.5", "worker.example"):
        with pytest.raises(InsecureSecretError, match="EDGEORCH_ROLLOUT_SECRET"):
            resolve_secret("", host)


def test_a_message_names_the_nodes_it_concerns_under_its_signature() -> None:
    msg = new_message("commit", "d", 3, "r1", SECRET, now=NOW, nodes=["n2", "n1", "n2"])
    assert msg["nodes"] == ["n1", "n2"]
    assert MessageVerifier(SECRET).check_message(msg, now=NOW + 1) is None
    assert addressed_to(msg, "n1") and addressed_to(msg, "n2") and not addressed_to(msg, "n3")
    # Widening the list after signing breaks the signature: a relay cannot wake other nodes.
    widened = {**msg, "nodes": ["n1", "n2", "n3"], "nonce": msg["nonce"]}
    assert MessageVerifier(SECRET).check_message(widened, now=NOW + 1) == "bad signature"
    # A message that names no nodes (an older broadcast) concerns every node.
    assert addressed_to(_msg(), "n3")
