"""Load a store model's tokenizer without the cost of ``AutoTokenizer``.

``AutoTokenizer.from_pretrained`` first loads the model's config class to
find the tokenizer class. For Llama models in transformers 5 that import
pulls in ``torch.distributed.tensor`` and takes 1.5–2 s on the 2-core test
machine. That time counts against the orchestrator's restart, and the restart
must answer again within 10 s. The store writes the tokenizer class into
``tokenizer_config.json``, so the class is taken from there (0.3–0.45 s for
the same tokenizer). ``AutoTokenizer`` stays the fallback for a directory
that does not name its class.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a model directory, as ``AutoTokenizer`` would load it."""
    import transformers

    path = Path(model_dir)
    try:
        name = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        name = None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        log.debug("tokenizer class of %s not named in its config; using AutoTokenizer", path)
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(str(path))
