"""How much a lossy weight format changes a model's predictions, measured on a fixed text.

One teacher-forced pass over the text gives, at every position, the
distribution over the next token. Against the fp32 pass of the same model we
report top-1 agreement (the share of positions where both pick the same
token — what greedy decoding would see) and perplexity on the text itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgeorch.models.adapter import StageInput


@dataclass
class TextScore:
    """Logits-derived figures of one model over one text."""

    top1: torch.Tensor  # [T-1] the predicted next token at each position
    nll: torch.Tensor  # [T-1] negative log-likelihood of the actual next token

    @property
    def perplexity(self) -> float:
        """exp(mean NLL) over the text."""
        return math.exp(float(self.nll.mean()))


def score_text(stage, ids: list[int]) -> TextScore:
    """Run a whole-model stage over ``ids`` in one prefill and score every next-token prediction."""
    x = torch.tensor([ids], dtype=torch.int64)
    logits = stage.run(StageInput(x=x, logits="all"), None)[0, :-1].float()  # [T-1, vocab]
    targets = x[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return TextScore(top1=logits.argmax(dim=-1), nll=nll)


@dataclass
class FormatQuality:
    """A format against the fp32 reference on the same text."""

    tokens: int
    top1_agreement: float
    perplexity: float
    reference_perplexity: float

    @property
    def perplexity_change(self) -> float:
        """Relative change of perplexity against fp32 (0.01 = 1 % worse)."""
        return self.perplexity / self.reference_perplexity - 1.0

    def as_dict(self) -> dict:
        """JSON-ready figures."""
        return {"tokens": self.tokens, "top1_agreement": self.top1_agreement, "perplexity": self.perplexity,
                "reference_perplexity": self.reference_perplexity,
                "perplexity_change": self.perplexity_change}  # fmt: skip


def compare(reference: TextScore, candidate: TextScore) -> FormatQuality:
    """Top-1 agreement and perplexity of ``candidate`` against ``reference``."""
    agree = float((reference.top1 == candidate.top1).float().mean())
    return FormatQuality(
        tokens=int(reference.top1.numel()) + 1,
        top1_agreement=agree,
        perplexity=candidate.perplexity,
        reference_perplexity=reference.perplexity,
    )
