"""`edgeorch models import PATH --name NAME`: a user's GGUF file or Hugging Face directory into the store.

Everything is written into ``.NAME.partial`` and renamed into place only
when the checkpoint, its tokenizer, the packed formats asked for and the
``edgeorch.json`` marker are all there: an interrupted import leaves no
entry (the next one starts over), and a refused one leaves the store as it
was.

GGUF files are checked before anything is written: the architecture must be
one the Llama adapter runs (llama, qwen2, mistral), and every tensor's data
must lie inside the file (a truncated download is refused, not half read).
Their weights are then dequantised to fp32 by transformers (as `models
prepare` does for SmolLM2) and packed from there: int4 packing re-quantises
Q4_0/Q4_1 groups of 32, which recovers llama.cpp's 16-level grid up to the
bf16 rounding of each group's scale and zero; Q8_0 blocks are not taken
as they are (the int8 format has one scale per row, Q8_0 one per 32 values).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgeorch.engine.synth import pack_store
from edgeorch.models import adapter_for, load_config
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
    return arch


def _copy_hf(src: Path, out: Path) -> None:
    adapter_for(load_config(src))  # UnsupportedModelError (a ValueError) for an unknown model type
    weights = sorted(src.glob("*.safetensors")) + sorted(src.glob("model.safetensors.index.json"))
    if not weights:
        raise ModelStoreError(f"{src} has no safetensors weights")
    for f in [*weights, *(src / n for n in _HF_FILES)]:
        if f.exists():
            shutil.copy2(f, out / f.name)


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
        if is_gguf:
            checkpoint_from_gguf(path, tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["architectures"] = [GGUF_ARCHS[arch]]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        else:
            _copy_hf(path, tmp)
        kind = "decoder" if adapter_for(load_config(tmp)).is_decoder else "encoder"
        family = adapter_for(load_config(tmp)).family
        pack_store(store, [str(tmp)], formats)  # a directory path: the store takes it as it is
        record = {"name": name, "family": family, "kind": kind, "source": f"imported from {path}"}
        (tmp / MARKER).write_text(json.dumps(record, indent=2))
        tmp.rename(store.root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s as %s (%s)", path, name, ", ".join(formats) or "checkpoint only")
    return store.root / name
