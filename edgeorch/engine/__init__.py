"""The lean stage engine: per-family forward paths in fp32, bf16 or weight-only int8.

The Hugging Face modules (``edgeorch.models``) stay the reference engine
(``"hf"``, fp32 only); ``"lean"`` runs the same units through
:mod:`edgeorch.engine.lean_llama`, :mod:`~edgeorch.engine.lean_gpt2` and
:mod:`~edgeorch.engine.lean_bert`. :func:`stage_adapter` picks one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from transformers import PretrainedConfig

from edgeorch.models import adapter_for, load_config
from edgeorch.models.formats import FORMATS, check_format
from edgeorch.schemas.profile import WeightFormat

Engine = Literal["hf", "lean"]
ENGINES: tuple[str, ...] = get_args(Engine)

__all__ = ["ENGINES", "FORMATS", "Engine", "WeightFormat", "import_engine", "load_adapter", "stage_adapter"]


def stage_adapter(config: PretrainedConfig, engine: str = "hf", weight_format: str = "fp32"):
    """The family adapter that loads and runs units with ``engine`` in ``weight_format``.

    ValueError for an unknown engine or format, or a format the engine lacks
    (the reference engine is fp32 only).
    """
    check_format(weight_format)
    if engine == "hf":
        if weight_format != "fp32":
            raise ValueError(
                f"the hf reference engine runs fp32 only, not {weight_format!r}; use engine 'lean'"
            )
        return adapter_for(config)
    if engine != "lean":
        raise ValueError(f"unknown engine {engine!r}; known: {list(ENGINES)}")
    from edgeorch.engine.lean_bert import LeanBertAdapter
    from edgeorch.engine.lean_gpt2 import LeanGPT2Adapter
    from edgeorch.engine.lean_llama import LeanLlamaAdapter

    family = adapter_for(config).family  # raises UnsupportedModelError for an unknown model type
    cls = {"llama": LeanLlamaAdapter, "gpt2": LeanGPT2Adapter, "bert": LeanBertAdapter}[family]
    return cls(config, weight_format)


def load_adapter(model_dir: Path, engine: str = "hf", weight_format: str = "fp32"):
    """:func:`stage_adapter` for a checkpoint directory (reads its config only)."""
    return stage_adapter(load_config(model_dir), engine, weight_format)


def import_engine() -> None:
    """Import the engine's code for every model family now: ours and transformers' modelling modules.

    About 87 MB resident, nearly all of it ``transformers.modeling_utils``
    (what the families' modules build on), paid once per process whatever
    the models. A worker calls this at startup: a deployed worker pays the
    same anyway before its first stage, when it calibrates its deployment's
    model (the probe builds that family's adapter), and a worker that never
    calibrates pays it with its first stage. Paid up front (on a thread, so
    the worker answers meanwhile), it is part of the bare process rather than
    of whichever stage happens to load first, and a first load that comes
    later no longer stalls on seconds of imports.
    """
    import importlib

    from edgeorch.models.llama import _ARCH

    modules = [m for m, *_ in _ARCH.values()]
    for name in (
        *modules,
        "edgeorch.engine.lean_llama",
        "edgeorch.engine.lean_gpt2",
        "edgeorch.engine.lean_bert",
    ):
        importlib.import_module(name)
