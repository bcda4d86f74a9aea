"""Model-store entries the control plane can plan with but no node has to load.

The orchestrator reads a deployment's config (to profile its units) and its
tokenizer from the store; it never reads weights. Simulated nodes never load
any either. So a simulated deployment needs only those files: a Llama-2-7B
(32 layers) and a Llama-2-70B (80 layers) shape, with SmolLM2's tokenizer as
``edgeorch models synth`` uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgeorch.models.store import MARKER

_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "max_position_embeddings": 4096,
}  # fmt: skip
SIM_SHAPES: dict[str, dict] = {
    "sim-llama-32": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32},
    "sim-llama-80": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                     "num_attention_heads": 64, "num_key_value_heads": 8},
}  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def write_sim_models(root: Path, tokenizer_from: Path) -> list[str]:
    """Write every SIM_SHAPES model (config and tokenizer only) under ``root``; returns their names."""
    if not (tokenizer_from / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_from}: run `edgeorch models prepare` first")
    for name, shape in SIM_SHAPES.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**_LLAMA, **shape}, indent=2))
        for f in TOKENIZER_FILES:
            if (tokenizer_from / f).exists():
                shutil.copy2(tokenizer_from / f, out / f)
        record = {"name": name, "family": "llama", "kind": "decoder", "config_only": True,
                  "source": "config only, for simulated nodes (edgeorch/sim)"}  # fmt: skip
        (out / MARKER).write_text(json.dumps(record, indent=2))
    return list(SIM_SHAPES)
