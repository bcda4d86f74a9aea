"""Session caches, sampling and stage-spec parsing: the worker's pure parts."""

from __future__ import annotations

import time

import pytest
import torch

from edgeorch.local.chain import ChainSpecError, parse_formats, parse_stages
from edgeorch.runtime.sampling import sample_token
from edgeorch.runtime.sessions import CacheFull, PositionMismatch, SessionStore, UnknownSession
from edgeorch.schemas.stage import Sampling


def _grow(cache, n_tokens: int, width: int = 8) -> None:
    cache.update(torch.zeros(1, 1, n_tokens, width), torch.zeros(1, 1, n_tokens, width), 0)
    cache.advance(n_tokens)


def test_session_continues_only_at_its_position() -> None:
    s = SessionStore(max_bytes=1 << 20, ttl_s=60)
    cache = s.acquire("st", "a", 0, 0)
    _grow(cache, 5)
    assert s.acquire("st", "a", 5, 0) is cache
    with pytest.raises(PositionMismatch, match="at position 5"):
        s.acquire("st", "a", 4, 0)
    with pytest.raises(UnknownSession, match="'b'"):
        s.acquire("st", "b", 3, 0)
    # Position 0 restarts the session with an empty cache.
    assert s.acquire("st", "a", 0, 0).seq_len == 0


def test_cache_cap_refuses_new_work_and_counts_bytes() -> None:
    s = SessionStore(max_bytes=1000, ttl_s=60)
    _grow(s.acquire("st", "a", 0, 0), 10)  # 2 * 10 * 8 * 4 bytes = 640
    assert s.total_bytes() == 640
    with pytest.raises(CacheFull, match="640 bytes held"):
        s.acquire("st", "b", 0, 400)
    # Restarting the same session does not count its own old cache against it.
    s.acquire("st", "a", 0, 400)
    assert s.release("st", "a") and not s.release("st", "a")
    assert s.total_bytes() == 0


def test_sessions_expire_after_ttl() -> None:
    s = SessionStore(max_bytes=1 << 20, ttl_s=0.05)
    s.acquire("st", "a", 0, 0)
    s.acquire("other", "a", 0, 0)
    assert s.count() == 2 and s.count("st") == 1
    time.sleep(0.1)
    assert s.evict_expired() == 2
    with pytest.raises(UnknownSession):
        s.acquire("st", "a", 1, 0)


def test_drop_stage_forgets_only_that_stage() -> None:
    s = SessionStore(max_bytes=1 << 20, ttl_s=60)
    for sid in ("x", "y"):
        s.acquire("st1", sid, 0, 0)
    s.acquire("st2", "x", 0, 0)
    assert s.drop_stage("st1") == 2
    assert s.count() == 1


def test_greedy_picks_the_argmax() -> None:
    logits = torch.tensor([[[0.1, 3.0, -1.0, 2.9]]])
    assert sample_token(logits, Sampling(), position=0) == 1


def test_seeded_sampling_is_reproducible_and_depends_on_position() -> None:
    logits = torch.zeros(1, 1, 1000)
    sp = Sampling(temperature=1.0, seed=42)
    draws = [sample_token(logits, sp, position=p) for p in range(20)]
    assert draws == [sample_token(logits, sp, position=p) for p in range(20)]
    assert len(set(draws)) > 10  # a uniform draw over 1000 tokens varies with position


def test_tiny_top_p_keeps_only_the_best_token() -> None:
    logits = torch.tensor([1.0, 5.0, 4.9, 0.0])
    for seed in range(20):
        assert sample_token(logits, Sampling(temperature=1.0, top_p=0.01, seed=seed), position=3) == 1


def test_parse_stages_accepts_a_tiling() -> None:
    assert parse_stages("0:11,11:21,21:32", 32) == [(0, 11), (11, 21), (21, 32)]
    assert parse_stages("0:6", 6) == [(0, 6)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0:11,12:32", "does not follow 11"),
        ("0:11,11:30", "end at 30"),
        ("1:32", "does not follow 0"),
        ("0:5,5:5,5:32", "non-empty"),
        ("0-11", "not START:END"),
    ],
)
def test_parse_stages_rejects_gaps_and_overlaps(text: str, message: str) -> None:
    with pytest.raises(ChainSpecError, match=message):
        parse_stages(text, 32)


def test_parse_formats_gives_one_lean_spec_per_stage() -> None:
    assert parse_formats(None, 3) is None and parse_formats("", 3) is None
    assert parse_formats("int8", 2) == [{"engine": "lean", "format": "int8"}] * 2
    assert [o["format"] for o in parse_formats("fp32, int8,int4", 3)] == ["fp32", "int8", "int4"]
    with pytest.raises(ChainSpecError, match="2 formats for 3 stages"):
        parse_formats("fp32,int8", 3)
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        parse_formats("int3", 1)


def test_kv_cache_retry_after_a_failed_step_does_not_duplicate_keys() -> None:
    from edgeorch.models.kv import StageKVCache

    cache = StageKVCache()
    for layer in (0, 1):
        cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), layer)
    cache.advance(3)
    cache.update(torch.full((1, 2, 1, 4), 9.0), torch.full((1, 2, 1, 4), 9.0), 0)  # layer 1 then failed
    k, _ = cache.update(torch.full((1, 2, 1, 4), 7.0), torch.full((1, 2, 1, 4), 7.0), 0)  # the retry
    assert k.shape[-2] == 4 and float(k[0, 0, -1, 0]) == 7.0 and float(k[0, 0, :3].max()) == 1.0
    held = sum(t.numel() * t.element_size() for d in (cache._keys, cache._values) for t in d.values())
    assert cache.nbytes() == held
