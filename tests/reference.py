"""What the unsplit Hugging Face model answers: the reference that split output is compared with."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer


def greedy_chat_answers(model_dir: Path | str, chats: dict[str, tuple[list[dict], int]]) -> dict[str, str]:
    """Greedy fp32 answer text per key, for chats given as (messages, max new tokens)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    answers = {}
    for key, (messages, n) in chats.items():
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        answers[key] = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    return answers


def sentence_embeddings(model_dir: Path | str, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings of the unsplit encoder (rows follow ``texts``)."""
    tok, ref = AutoTokenizer.from_pretrained(str(model_dir)), AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
