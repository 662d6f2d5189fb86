"""A preallocated key/value cache.

All rows of a batch share one write cursor: padded positions are simply slots whose
attention-mask entry is 0, so right-padded prompts and later decode steps need no
per-row bookkeeping (positions are passed explicitly, §5.3).
"""

from __future__ import annotations

import torch

from ..errors import InputError


class KVCache:
    """Keys and values of every decoder layer, `[B, n_kv_heads, max_len, head_dim]` each."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # slots filled so far (same for every layer once a forward completes)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v` [B, n_kv, T, D] after the current cursor; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise InputError(f"sequence of {end} tokens exceeds the KV cache of {self.max_len}: lower --max-new-tokens")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Move the cursor after all layers wrote `n` new slots."""
        self.length += n
