"""`edgeorch models import PATH --name NAME`: a user's GGUF file or Hugging Face directory into the store.

Everything is written into ``.NAME.partial`` and renamed into place only
when the checkpoint, its tokenizer, the packed formats asked for and the
``edgeorch.json`` marker are all there: an interrupted import leaves no
entry (the next one starts over), and a refused one leaves the store as it
was.

GGUF files are checked before anything is written: the architecture must be
one the Llama adapter runs (llama, qwen2, mistral), every tensor's data
must lie inside the file (a truncated download is refused, not half read),
and every Q8_0 tensor's blocks must be well formed (finite scales).
Their weights are then dequantised to fp32 by transformers (as `models
prepare` does for SmolLM2) into the entry's checkpoint. int4 takes the
layers' Q4_0/Q4_1 blocks as they are (:mod:`edgeorch.engine.gguf_blocks`:
llama.cpp's weights, bit for bit, with float32 scales and zeros) when every
layer matrix is Q4_0/Q4_1 and maps exactly; otherwise, and for every other
format, the units are packed from the checkpoint (int4 then re-quantises,
recovering a 4-bit grid up to the bf16 rounding of each group's scale and
zero). With int4 taken so, a token table or LM head the file holds as Q8_0
is taken as it is too (:mod:`edgeorch.engine.q8_0`); the int8 format itself
stays per row (one scale per row, Q8_0 has one per 32 values).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from edgeorch.engine.gguf_blocks import NotExact, pack_gguf_int4, q8_0_tables
from edgeorch.engine.q8_0 import MalformedBlocks, q8_0_scales
from edgeorch.engine.synth import pack_dir
from edgeorch.models import adapter_for, load_config
from edgeorch.models.formats import INT4_Q8_0_TABLES_KEY, INT4_SCALES_KEY
from edgeorch.models.store import MARKER, ModelStore, ModelStoreError, checkpoint_from_gguf

log = logging.getLogger(__name__)

GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "vocab.txt", "tokenizer.model")  # fmt: skip


def check_gguf(path: Path) -> str:
    """The GGUF file's architecture; ModelStoreError if it is unsupported, truncated or not GGUF."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on a damaged file
        raise ModelStoreError(f"{path} is not a readable GGUF file (truncated or damaged?): {exc}") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelStoreError(f"{path} has no general.architecture; not a model GGUF")
    arch = bytes(field.parts[field.data[0]]).decode()
    if arch not in GGUF_ARCHS:
        raise ModelStoreError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(GGUF_ARCHS)}")
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelStoreError(
                f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, the file has {size}"
            )
    for t in reader.tensors:  # Q8_0 tables may be taken as they are: their blocks must be well formed
        if t.tensor_type.name == "Q8_0":
            cols, rows = int(t.shape[0]), int(t.n_elements // t.shape[0])
            try:
                q8_0_scales(np.asarray(t.data).reshape(-1), rows, cols)
            except MalformedBlocks as exc:
                raise ModelStoreError(f"{path}: tensor {t.name} has malformed Q8_0 blocks: {exc}") from exc
    return arch


def _copy_hf(src: Path, out: Path) -> None:
    adapter_for(load_config(src))  # UnsupportedModelError (a ValueError) for an unknown model type
    weights = sorted(src.glob("*.safetensors")) + sorted(src.glob("model.safetensors.index.json"))
    if not weights:
        raise ModelStoreError(f"{src} has no safetensors weights")
    for f in [*weights, *(src / n for n in _HF_FILES)]:
        if f.exists():
            shutil.copy2(f, out / f.name)


def _set_config(model_dir: Path, **values) -> None:
    """Set (a value None: remove) keys of ``model_dir``'s config.json."""
    cfg = json.loads((model_dir / "config.json").read_text())
    for key, value in values.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def _gguf_int4(gguf: Path, model_dir: Path) -> str:
    """Pack int4 from the GGUF's own Q4 (and Q8_0 table) blocks when they map exactly; how int4 was made."""
    tables = q8_0_tables(gguf)
    # Before packing: the skeleton and the profile hold fp32 scales and these tables as Q8_0 blocks.
    _set_config(model_dir, **{INT4_SCALES_KEY: "float32", INT4_Q8_0_TABLES_KEY: tables or None})
    try:
        pack_gguf_int4(gguf, model_dir)
    except NotExact as exc:
        _set_config(model_dir, **{INT4_SCALES_KEY: None, INT4_Q8_0_TABLES_KEY: None})
        log.warning("%s: its blocks are not taken as int4 (%s); int4 is re-quantised from fp32", gguf, exc)
        return f"re-quantised from the dequantised checkpoint ({exc})"
    except MalformedBlocks as exc:
        raise ModelStoreError(f"{gguf} has malformed Q8_0 blocks: {exc}") from exc
    held = f"; its Q8_0 {' and '.join(tables)} as they are (int8, fp16 scale per 32)" if tables else ""
    return f"the GGUF's Q4_0/Q4_1 blocks, taken as they are (float32 scales and zeros){held}"


def import_model(store: ModelStore, path: Path, name: str, formats: list[str]) -> Path:
    """Import ``path`` (a .gguf file or an HF checkpoint directory) as ``name``, packed in ``formats``."""
    path = Path(path).expanduser()
    if "/" in name or name.startswith(".") or not name:
        raise ModelStoreError(f"model name {name!r} must be a plain name")
    if (store.root / name / MARKER).exists():
        raise ModelStoreError(f"model {name!r} is already in the store; pick another name")
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if not is_gguf and not (path.is_dir() and (path / "config.json").exists()):
        raise ModelStoreError(f"{path} is neither a .gguf file nor a checkpoint directory with config.json")
    arch = check_gguf(path) if is_gguf else None
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = store.root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        record = {"name": name, "source": f"imported from {path}"}
        if is_gguf:
            checkpoint_from_gguf(path, tmp)
            _set_config(tmp, architectures=[GGUF_ARCHS[arch]])
            if "int4" in formats:
                record["int4"] = _gguf_int4(path, tmp)
        else:
            _copy_hf(path, tmp)
        adapter = adapter_for(load_config(tmp))
        record |= {"family": adapter.family, "kind": "decoder" if adapter.is_decoder else "encoder"}
        pack_dir(tmp, formats)
        (tmp / MARKER).write_text(json.dumps(record, indent=2))
        tmp.rename(store.root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s as %s (%s)", path, name, ", ".join(formats) or "checkpoint only")
    return store.root / name
