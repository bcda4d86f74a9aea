"""The worker's engine warm-up (engine/warmup.py): every lean format, on the threads it is given."""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import torch

from edgeorch.engine.pack import synth_units
from edgeorch.engine.stage import load_stage
from edgeorch.engine.warmup import _WARM_CONFIG, WARM_VARIANTS, warm_engine
from edgeorch.models.formats import FORMATS, INT4_SCALES_KEY


def test_warm_up_loads_and_runs_every_format_on_the_given_threads(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calls: list[tuple[str, str]] = []

    def runner(kind: str):
        def run(fn):
            calls.append((kind, threading.current_thread().name))
            return fn()

        return run

    warm_engine(on_loader=runner("load"), on_compute=runner("compute"))
    assert [k for k, _ in calls] == ["load", "compute"] * len(WARM_VARIANTS)
    assert {f for f, _ in WARM_VARIANTS} == set(FORMATS) and ("int4", "float32") in WARM_VARIANTS
    assert not list(tmp_path.glob("edgeorch-warm-*"))  # the tiny models are deleted


def test_synth_int4_with_float32_scales_holds_and_computes_in_float32(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**_WARM_CONFIG, INT4_SCALES_KEY: "float32"}))
    synth_units(tmp_path, "int4")
    stage = load_stage(tmp_path, 0, 3, engine="lean", weight_format="int4")
    layer = stage.units[1][1]
    assert layer.qkv.scales.dtype == torch.float32
    profile = stage.adapter.profile("t", weight_format="int4")
    assert sum(u.param_bytes for u in profile.units) == stage.param_bytes()
