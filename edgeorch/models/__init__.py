"""Model adapters, the local model store, and stage loading."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from edgeorch.models.adapter import FamilyAdapter, StageInput, UnsupportedModelError

__all__ = ["FamilyAdapter", "StageInput", "UnsupportedModelError", "adapter_for", "load_config"]


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    """The family adapter for a Hugging Face config."""
    # Imported here so importing edgeorch.models stays cheap for tools that
    # only need the store.
    from edgeorch.models.bert import BertAdapter
    from edgeorch.models.gpt2 import GPT2Adapter
    from edgeorch.models.llama import _ARCH, LlamaAdapter

    model_type = getattr(config, "model_type", None)
    if model_type in _ARCH:
        return LlamaAdapter(config)
    if model_type == "gpt2":
        return GPT2Adapter(config)
    if model_type == "bert":
        return BertAdapter(config)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: {sorted([*_ARCH, 'gpt2', 'bert'])}"
    )


def load_config(model_dir: Path) -> PretrainedConfig:
    """The config of a checkpoint directory, read from disk only."""
    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
