"""Preallocated KV cache of one session on one lean stage.

One buffer ``[layers, 2, batch, capacity, kv_heads, head_dim]`` for every
layer of the stage. A step writes its keys and values in place at the
cache's length and attends over a view of the first ``length + q_len``
positions, so a decode step allocates nothing and copies only its own token
— where the reference cache (``edgeorch.models.kv``) concatenates the whole
history on every step.

Capacity grows in chunks of ``chunk_tokens`` (one copy per chunk, not per
token); ``nbytes`` reports the capacity, since that is what the session holds
and what the worker's memory cap must count. The token-major layout makes the
write one contiguous copy; attention reads it through a transposed view.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_TOKENS = 256


class LeanKVCache:
    """Keys and values of one session for the layers of one lean stage."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        max_tokens: int | None = None,
    ):
        if num_layers < 1 or kv_heads < 1 or head_dim < 1 or chunk_tokens < 1:
            raise ValueError("a KV cache needs at least one layer, head, dimension and chunk token")
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.chunk_tokens = chunk_tokens
        self.max_tokens = max_tokens
        self.seq_len = 0
        self.capacity = 0
        self.grows = 0  # how many times the buffer was (re)allocated
        self._buf: torch.Tensor | None = None
        # Per layer: token-major views to write into, head-major views to attend over.
        self._write: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._read: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reserve(self, batch: int, total_tokens: int) -> None:
        """Make room for ``total_tokens`` positions (the cache's length plus a step's tokens)."""
        if self.max_tokens is not None and total_tokens > self.max_tokens:
            raise ValueError(f"{total_tokens} tokens exceed this cache's limit of {self.max_tokens}")
        if self._buf is not None and self._buf.shape[2] != batch:
            raise ValueError(f"this cache holds batch {self._buf.shape[2]}, the step has batch {batch}")
        if total_tokens <= self.capacity:
            return
        capacity = -(-total_tokens // self.chunk_tokens) * self.chunk_tokens
        if self.max_tokens is not None:
            capacity = min(capacity, self.max_tokens)
        shape = (self.num_layers, 2, batch, capacity, self.kv_heads, self.head_dim)
        # Zeroed, not empty: the pages are then resident from the start, so what the
        # worker plans for a session is what /proc shows it holding.
        buf = torch.zeros(shape, dtype=self.dtype)
        if self._buf is not None and self.seq_len:
            buf[:, :, :, : self.seq_len].copy_(self._buf[:, :, :, : self.seq_len])
        self._buf, self.capacity = buf, capacity
        self._write = [(buf[i, 0], buf[i, 1]) for i in range(self.num_layers)]
        self._read = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in self._write]
        self.grows += 1

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's ``k``, ``v`` ``[batch, q_len, kv_heads, head_dim]`` for layer ``slot``.

        Returns every key and value so far as ``[batch, kv_heads, length + q_len, head_dim]``
        views. ``reserve`` must have been called for this step.
        """
        start, end = self.seq_len, self.seq_len + k.shape[1]
        if self._buf is None or end > self.capacity:
            raise RuntimeError("LeanKVCache.reserve was not called for this step")
        k_all, v_all = self._write[slot]
        k_all[:, start:end].copy_(k)
        v_all[:, start:end].copy_(v)
        k_read, v_read = self._read[slot]
        return k_read[:, :, :end], v_read[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held (the same for every layer once a step has finished)."""
        return self.seq_len

    def advance(self, n_tokens: int) -> None:
        """Record that a step of ``n_tokens`` went through every layer."""
        self.seq_len += n_tokens

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the capacity, not just the filled part)."""
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()
