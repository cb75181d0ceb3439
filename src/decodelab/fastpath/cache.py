"""A preallocated key/value cache for the fast path: one buffer for every layer, sized to the request.

Layout: ``kv`` is (n_layers, 2, B, H_kv, capacity, D) in the model's dtype (index 0 = keys, 1 = values), so a beam
reorder is one ``index_select`` over all layers. ``length`` is the number of positions filled (the same for every
row: batches are left-padded, so row ``b`` starts with ``pad_lengths[b]`` padding positions, masked by ``pad``).
``pad`` is (B, capacity) bool, True on real tokens (the 2D attention mask of transformers, kept preallocated so a
decode step appends nothing).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Preallocated KV cache of ``capacity`` positions for ``batch`` rows.

    Args:
        n_layers, n_kv_heads, head_dim: the model's attention geometry.
        batch: B rows; capacity: most positions (prompt width + max_new_tokens) this request can reach.
        dtype, device: of the keys and values (the model's compute dtype).

    ``capacity`` grows (doubling, one copy) when a caller writes past it, so a request without a length hint still
    works; callers that know the length (the search loops pass ``max_new_tokens``) never pay for growth.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, batch: int, capacity: int,
                 dtype: torch.dtype, device) -> None:
        self.kv = torch.zeros((n_layers, 2, batch, n_kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.pad = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.length = 0
        self.padded = False  # True when some row has left padding: attention then needs the explicit mask

    @property
    def capacity(self) -> int:
        """Positions the buffers hold without growing."""
        return self.kv.shape[4]

    @property
    def batch(self) -> int:
        """Rows B."""
        return self.kv.shape[2]

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions (grows to max(total, 2 * capacity), copying the filled part)."""
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity)
        kv = self.kv.new_zeros((*self.kv.shape[:4], new_cap, self.kv.shape[5]))
        kv[:, :, :, :, : self.length] = self.kv[:, :, :, :, : self.length]
        pad = self.pad.new_zeros((self.pad.shape[0], new_cap))
        pad[:, : self.length] = self.pad[:, : self.length]
        self.kv, self.pad = kv, pad

    def start(self, mask: torch.Tensor) -> None:
        """Record the prompt's (B, T) attention mask (1 = real token) before the prefill writes T positions."""
        width = mask.shape[1]
        self.reserve(width)
        self.pad[:, :width] = mask.bool()
        self.padded = not bool(self.pad[:, :width].all())

    def append_mask(self, n: int = 1) -> None:
        """Mark the next ``n`` positions as real tokens (a decode step's new token)."""
        self.reserve(self.length + n)
        self.pad[:, self.length : self.length + n] = True

    def select(self, rows: torch.Tensor) -> None:
        """Reorder / repeat rows in place: new row i is old row ``rows[i]`` (beam search). (n,) int64 ``rows``."""
        n = rows.shape[0]
        if n == self.batch and bool(torch.equal(rows.cpu(), torch.arange(n))):
            return
        filled = self.kv[:, :, :, :, : self.length].index_select(2, rows)
        if n == self.batch:
            self.kv[:, :, :, :, : self.length] = filled
        else:
            kv = self.kv.new_zeros((*self.kv.shape[:2], n, *self.kv.shape[3:]))
            kv[:, :, :, :, : self.length] = filled
            self.kv = kv
        self.pad = self.pad.index_select(0, rows)
        self.padded = not bool(self.pad[:, : self.length].all())
