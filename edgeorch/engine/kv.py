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

    def read_layers(self, slots: range, start: int, end: int) -> torch.Tensor:
        """Positions ``[start, end)`` of layer ``slots`` as ``[layers, 2, batch, tokens, kv_heads, head_dim]``.

        A copy (it is sent away while the session may go on decoding), in this
        cache's own token-major layout, which is also the wire's.
        """
        if self._buf is None or not 0 <= start <= end <= self.seq_len or slots.step != 1:
            raise ValueError(f"positions [{start}, {end}) are not inside the cache's {self.seq_len} tokens")
        if not 0 <= slots.start <= slots.stop <= self.num_layers:
            raise ValueError(f"layer slots {slots} are not inside this cache's {self.num_layers}")
        return self._buf[slots.start : slots.stop, :, :, start:end].clone()

    def append_layers(self, slots: range, kv: torch.Tensor) -> None:
        """Append positions (``read_layers``' layout) for every layer, after the last position held."""
        layers, two, batch, tokens, kv_heads, head_dim = kv.shape
        if slots != range(self.num_layers) or (layers, two, kv_heads, head_dim) != (
            self.num_layers, 2, self.kv_heads, self.head_dim
        ):  # fmt: skip
            raise ValueError(
                f"KV of shape {list(kv.shape)} for slots {slots} does not fill a cache of "
                f"{self.num_layers} layers, {self.kv_heads} heads of {self.head_dim}"
            )
        self.reserve(batch, self.seq_len + tokens)
        self._buf[:, :, :, self.seq_len : self.seq_len + tokens].copy_(kv)
        self.seq_len += tokens
