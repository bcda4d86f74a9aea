"""Store tools that need the engine: pack prepared models, synthesise big random ones.

``edgeorch models prepare --formats int8,int4`` packs every prepared model
in those formats (:func:`pack_store`); ``edgeorch models synth NAME --shape
SHAPE --format FMT`` writes a random-weight model of a real shape straight
into the store in that format, unit by unit (:func:`synth_model`), so a
7B-shaped int4 model builds in well under 2 GB.

Shapes (the published configs; the vocabulary is SmolLM2's 49152 tokens, so
the store's one tokenizer serves them and every token id is in range):

- ``tinyllama-1.1b``: 22 layers, hidden 2048, MLP 5632, 32 heads, GQA with 4 KV heads;
- ``llama-7b``: Llama 2 7B: 32 layers, hidden 4096, MLP 11008, 32 heads, MHA (32 KV heads);
- ``test-tiny``: not a real model: 2 layers, hidden 64, GQA 4/2 heads (~3 MB in int8), so tests
  of the synthesise-and-serve path run in seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgeorch.engine.pack import pack_model, synth_units
from edgeorch.models.formats import check_format
from edgeorch.models.store import MARKER, ModelStore, ModelStoreError
from edgeorch.models.unitfile import PackedUnits, has_checkpoint

log = logging.getLogger(__name__)

_COMMON = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}  # fmt: skip
SHAPES: dict[str, dict] = {
    "tinyllama-1.1b": {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    },
    "llama-7b": {
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    },
    "test-tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    },
}  # fmt: skip
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def pack_store(store: ModelStore, names: list[str], formats: list[str], force: bool = False) -> list[str]:
    """Pack each named model (with a checkpoint) in each format it lacks; returns ``name:format`` packed now."""
    done = []
    for name in names:
        done += [f"{name}:{fmt}" for fmt in pack_dir(store.path(name), formats, force)]
    return done


def pack_dir(model_dir: Path, formats: list[str], force: bool = False) -> list[str]:
    """Pack the checkpoint in ``model_dir`` in each format it lacks; returns the formats packed now."""
    for fmt in formats:
        check_format(fmt)
    if not has_checkpoint(model_dir):
        return []  # synthesised: packed only, nothing to pack from
    done = []
    for fmt in formats:
        if PackedUnits(model_dir, fmt).complete() and not force:
            continue
        pack_model(model_dir, fmt)
        done.append(fmt)
    return done


def _tokenizer_source(store: ModelStore) -> Path:
    src = store.root / "smollm2-135m"
    if not (src / "tokenizer.json").exists():
        raise ModelStoreError(
            "synthesised models use SmolLM2's tokenizer: run `edgeorch models prepare` first"
        )
    return src


def synth_model(store: ModelStore, name: str, shape: str, fmt: str, seed: int = 0) -> Path:
    """Write (or add ``fmt`` to) a random-weight model of ``shape`` named ``name``; returns its directory."""
    check_format(fmt)
    if shape not in SHAPES:
        raise ModelStoreError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    if "/" in name or name.startswith(".") or not name:
        raise ModelStoreError(f"model name {name!r} must be a plain name")
    final = store.root / name
    if (final / MARKER).exists():
        info = json.loads((final / MARKER).read_text())
        if info.get("shape") != shape:
            raise ModelStoreError(f"model {name!r} exists with shape {info.get('shape')!r}, not {shape!r}")
        if not PackedUnits(final, fmt).complete():
            synth_units(final, fmt, seed)  # atomic per format: packed/<fmt>/ appears whole or not at all
        return final
    tmp = store.root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps({**_COMMON, **SHAPES[shape]}, indent=2))
    src = _tokenizer_source(store)
    for f in _TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, tmp / f)
    synth_units(tmp, fmt, seed)
    record = {"name": name, "family": "llama", "kind": "decoder", "shape": shape,
              "source": f"random weights (seed {seed}), shape {shape}, packed only"}  # fmt: skip
    (tmp / MARKER).write_text(json.dumps(record, indent=2))
    tmp.rename(final)
    log.info("synthesised %s (%s, %s) at %s", name, shape, fmt, final)
    return final
