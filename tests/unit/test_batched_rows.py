"""Several sessions' decode tokens as one forward (LoadedStage.run_rows) against each run alone."""

from __future__ import annotations

import torch

from edgeorch.engine.stage import load_stage
from edgeorch.models.adapter import StageInput

PROMPTS = [[1, 2, 3, 4, 5], [10, 20], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [100, 101, 102]]


def _prefill(stages, ids: list[int]):
    caches = [s.new_cache() for s in stages]
    h = torch.tensor([ids])
    for s, c in zip(stages, caches, strict=True):
        h = s.run(StageInput(x=h), c)
        c.advance(len(ids))
    return caches, int(h[0, -1].argmax())


def _step(stages, caches, tokens: list[int], positions: list[int], batched: bool,
          row_block: int = 0) -> list[torch.Tensor]:  # fmt: skip
    """One decode token per session through every stage, as one batch or one by one.

    ``row_block``: run through ``run_rows`` padded to a multiple of it (alone: a batch of one).
    """
    hs = [torch.tensor([[t]]) for t in tokens]
    for j, s in enumerate(stages):
        inputs = [StageInput(x=h, position=p) for h, p in zip(hs, positions, strict=True)]
        stage_caches = [c[j] for c in caches]
        if batched:
            hs = s.run_rows(inputs, stage_caches, max(1, row_block))
        elif row_block:
            hs = [s.run_rows([inp], [c], row_block)[0] for inp, c in zip(inputs, stage_caches, strict=True)]
        else:
            hs = [s.run(inp, c) for inp, c in zip(inputs, stage_caches, strict=True)]
        for c in stage_caches:
            c.advance(1)
    return hs


def _decode(stages, prompts, n_tokens: int, batched: bool, joins: dict[int, int] | None = None,
            row_block: int = 0):  # fmt: skip
    """Greedy tokens per prompt; a session in ``joins`` starts only at that step (joins mid-batch)."""
    joins = joins or {}
    out: dict[int, list[int]] = {}
    live: dict[int, tuple] = {}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
    for step in range(n_tokens + max(joins.values(), default=0)):
        for i, ids in enumerate(prompts):
            if i not in live and i not in out and joins.get(i, 0) == step:
                caches, tok = _prefill(stages, ids)
                live[i] = (caches, len(ids))
                out[i] = [tok]
        active = [i for i in live if len(out[i]) < n_tokens]  # a finished session leaves the batch
        if not active:
            continue
        hs = _step(stages, [live[i][0] for i in active], [out[i][-1] for i in active],
                   [live[i][1] for i in active], batched, row_block)  # fmt: skip
        for i, h in zip(active, hs, strict=True):
            logits[i].append(h[0, -1])
            out[i].append(int(h[0, -1].argmax()))
            live[i] = (live[i][0], live[i][1] + 1)
    return out, logits


def test_rows_equal_solo_steps_with_sessions_joining_and_leaving(store) -> None:
    d = store.path("smollm2-135m")
    stages = [load_stage(d, a, b, engine="lean") for a, b in ((0, 11), (11, 21), (21, 32))]
    solo, solo_logits = _decode(stages, PROMPTS, 12, batched=False)
    batched, batched_logits = _decode(stages, PROMPTS, 12, batched=True, joins={1: 3, 3: 5})
    assert batched == solo
    worst = max(
        float((a - b).abs().max())
        for i in solo_logits
        for a, b in zip(solo_logits[i], batched_logits[i], strict=True)
    )
    # The batch's matmuls may sum in another order than one row's (fp32 on CPU): not bit-equal, close.
    assert worst < 1e-3, worst


def test_padded_rows_are_bit_identical_to_the_solo_step_whatever_the_batch(store) -> None:
    # MKL's fp32 product gives a row other bits in a product of 1, 2 or 3 rows than in one of 4 or
    # more; padding every decode step (alone or batched) to a multiple of 4 rows removes that.
    d = store.path("smollm2-135m")
    stages = [load_stage(d, a, b, engine="lean") for a, b in ((0, 11), (11, 32))]
    prompts = [*PROMPTS, [5, 6, 7], [200, 201, 202, 203]]  # batches of 1 to 6: one and two blocks
    solo, solo_logits = _decode(stages, prompts, 10, batched=False, row_block=4)
    batched, batched_logits = _decode(stages, prompts, 10, batched=True, joins={1: 2, 3: 4, 5: 1},
                                      row_block=4)  # fmt: skip
    assert batched == solo
    for i in solo_logits:
        assert all(torch.equal(a, b) for a, b in zip(solo_logits[i], batched_logits[i], strict=True)), i


def test_a_batch_of_one_is_the_solo_step_bit_for_bit(store) -> None:
    d = store.path("smollm2-135m")
    stages = [load_stage(d, 0, 32, engine="lean")]
    solo, solo_logits = _decode(stages, PROMPTS[:1], 6, batched=False)
    one, one_logits = _decode(stages, PROMPTS[:1], 6, batched=True)
    assert one == solo
    assert all(torch.equal(a, b) for a, b in zip(solo_logits[0], one_logits[0], strict=True))


def test_an_engine_without_rows_runs_each_session_alone(store) -> None:
    d = store.path("tiny-llama")
    hf = load_stage(d, 0, load_stage(d, 0, 1).adapter.num_units, engine="hf")
    assert not hf.batches_rows
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    solo, solo_logits = _decode([hf], prompts, 4, batched=False)
    rows, rows_logits = _decode([hf], prompts, 4, batched=True)
    assert rows == solo
    assert all(
        torch.equal(a, b) for i in solo_logits for a, b in zip(solo_logits[i], rows_logits[i], strict=True)
    )
