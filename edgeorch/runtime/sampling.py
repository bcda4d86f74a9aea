"""Pick the next token from the last position's logits."""

from __future__ import annotations

import torch

from edgeorch.schemas.stage import Sampling


def sample_token(logits: torch.Tensor, sampling: Sampling, position: int) -> int:
    """Greedy at temperature 0; otherwise temperature + nucleus (top-p) sampling.

    With a seed, the draw depends only on (seed, position), so a replayed or
    re-routed step draws the same token as the original one.
    """
    row = logits.reshape(-1, logits.shape[-1])[-1].float()
    if sampling.temperature == 0.0:
        return int(torch.argmax(row))
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then
    # sends the others to -inf (probability 0), never the maximum to +inf (NaN).
    # In float64, so a temperature too small for float32 (down to 5e-324) is not 0.
    shifted = (row - row.max()).double()
    probs = torch.softmax(shifted / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = cumulative - sorted_probs < sampling.top_p
        keep[0] = True  # a top_p below the float resolution still keeps the likeliest token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed((sampling.seed * 1_000_003 + position) % 2**63)
    return int(torch.multinomial(probs, 1, generator=generator))
