"""Per-session KV cache of one stage, in the shape Hugging Face attention expects.

HF attention modules call ``cache.update(key, value, layer_idx, kwargs=...)``
and attend over what it returns. This class keeps only the layers of one
stage, counts its bytes so the worker can enforce a memory cap, and knows its
length so a request at the wrong position is refused instead of corrupting it.
"""

from __future__ import annotations

import torch


class StageKVCache:
    """Keys and values per layer index for one session on one stage."""

    def __init__(self) -> None:
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self.seq_len = 0
        self._bytes = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs=None, **_):
        """Append this step's key/value for ``layer_idx``; return the full history."""
        if layer_idx in self._keys:
            # Keep only what finished steps wrote: a step that failed halfway
            # left extra keys in earlier layers, and a retry at the same
            # position must not attend over them twice.
            old_k = self._keys[layer_idx][..., : self.seq_len, :]
            old_v = self._values[layer_idx][..., : self.seq_len, :]
            key = torch.cat([old_k, key], dim=-2)
            value = torch.cat([old_v, value], dim=-2)
        self._bytes += (key.numel() - self._numel(self._keys.get(layer_idx))) * key.element_size() * 2
        self._keys[layer_idx] = key
        self._values[layer_idx] = value
        return key, value

    @staticmethod
    def _numel(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.numel()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held (the same for every layer once a step has finished)."""
        return self.seq_len

    def advance(self, n_tokens: int) -> None:
        """Record that a step of ``n_tokens`` went through every layer."""
        self.seq_len += n_tokens

    def read_layers(self, layers: range, start: int, end: int) -> torch.Tensor:
        """Positions ``[start, end)`` of ``layers`` as ``[layers, 2, batch, tokens, kv_heads, head_dim]``.

        The token-major layout of the lean cache and the wire, so either
        engine's cache can be moved to the other's.
        """
        if not 0 <= start <= end <= self.seq_len or any(i not in self._keys for i in layers):
            raise ValueError(f"positions [{start}, {end}) of layers {layers} are not all in this cache")
        per_layer = [
            torch.stack([self._keys[i][..., start:end, :], self._values[i][..., start:end, :]])
            for i in layers
        ]
        return torch.stack(per_layer).transpose(3, 4).contiguous()

    def append_layers(self, layers: range, kv: torch.Tensor) -> None:
        """Append positions (``read_layers``' layout) to ``layers``, after the last one held."""
        if kv.shape[0] != len(layers) or kv.shape[1] != 2:
            raise ValueError(
                f"KV of shape {list(kv.shape)} does not hold keys and values of {len(layers)} layers"
            )
        head_major = kv.transpose(3, 4)
        for slot, i in enumerate(layers):
            self.update(head_major[slot, 0].contiguous(), head_major[slot, 1].contiguous(), i)
        self.seq_len += kv.shape[3]

    def nbytes(self) -> int:
        """Bytes held by keys and values."""
        # Kept as a running total: the worker checks its memory cap over every
        # session on every step, and summing tensors there grew with sessions.
        return self._bytes
