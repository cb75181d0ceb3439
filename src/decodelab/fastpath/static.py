"""The fixed-shape, single-token decode step that ``torch.export`` / AOTInductor compile (``compile=True``).

:class:`StaticStep` is an ``nn.Module`` around the engine's own :class:`~decodelab.fastpath.decoder.FastDecoder`: its
``forward`` runs the decoder's one forward (:meth:`FastDecoder.run`, same projection modules, same layer code) with a
:class:`StaticRows` row plan, which is the only compiled-specific part. It has no data-dependent Python:

* the new key/value are written with ``index_copy_`` at a position given as a tensor;
* attention always spans the whole preallocated cache, the (B, capacity) boolean mask hiding unwritten and padding
  positions; the query heads are folded onto the key/value heads (transformers' ``pack_gqa``);
* every projection multiplies all rows in one call (what the module for the kernel mode does for that row count).

So one compiled graph serves every step of a request whose batch size and cache capacity match. Inside the compiled
graph, float arithmetic may be reordered: outputs are close to, not bit-for-bit, the eager fast path's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import FastDecoder, drain


class StaticRows:
    """The compiled step's row plan for :meth:`FastDecoder.run`: all rows through each projection in one call,
    keys/values written at ``index`` and attention over the whole cache under ``pad``.

    Args:
        decoder: for the attention geometry (KV heads, query groups, head size, scaling).
        index: (1,) int64 cache position to write; keys / values: per layer (B, H_kv, capacity, D) buffers;
        pad: (B, capacity) bool, True on the positions to attend to (the new one included).
    """

    def __init__(self, decoder: FastDecoder, index: torch.Tensor, keys, values, pad: torch.Tensor) -> None:
        self.n_kv, self.groups, self.head_dim, self.scaling = (decoder.n_kv, decoder.groups, decoder.head_dim,
                                                               decoder.scaling)
        self.index, self.keys, self.values = index, keys, values
        self.mask = pad[:, None, None, :]
        self.window_mask = None
        if decoder.window is not None:  # sliding layers: also hide the positions at or before index - W
            recent = torch.arange(pad.shape[1], device=pad.device) > self.index - decoder.window
            self.window_mask = self.mask & recent[None, None, None, :]

    @staticmethod
    def linear(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``proj(x)``: (B, 1, in) -> (B, 1, out)."""
        return proj(x)

    @staticmethod
    def last(h: torch.Tensor) -> torch.Tensor:
        """The rows the output layer multiplies: h (B, 1, hidden) as it is."""
        return h[:, -1:, :]

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        """q (B, H, 1, D), k / v (B, H_kv, 1, D) -> (B, 1, H * D), writing k / v into layer ``i``'s buffers.

        A sliding layer (``window`` set) attends over the same whole-capacity buffers with the positions older than
        the window masked out (fixed shapes; the eager path slices the keys instead, so the sums are ordered
        differently: close, not bit for bit)."""
        b = q.shape[0]
        self.keys[i].index_copy_(2, self.index, k)
        self.values[i].index_copy_(2, self.index, v)
        mask = self.mask if window is None else self.window_mask
        att = F.scaled_dot_product_attention(q.reshape(b, self.n_kv, self.groups, self.head_dim), self.keys[i],
                                             self.values[i], attn_mask=mask, scale=self.scaling)
        return att.reshape(b, -1, 1, self.head_dim).transpose(1, 2).reshape(b, 1, -1)


class StaticStep(nn.Module):
    """Fixed-shape decode step over a :class:`~decodelab.fastpath.cache.StaticKVCache`'s buffers.

    ``forward(ids, positions, index, keys, values, pad) -> logits``:

    * ids (B, 1) int64, positions (B, 1) int64 rotary positions, index (1,) int64 cache slot to write;
    * keys / values: per layer (B, H_kv, capacity, D), written in place at ``index``; pad (B, capacity) bool, True
      on the positions to attend to (the new one included);
    * returns (B, V) logits in the model's dtype.

    The activations, norms, attention and cache follow the decoder's ``act32`` choice, as in the eager step.
    """

    def __init__(self, decoder: FastDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    @property
    def act32(self) -> bool:
        """Whether the step keeps float32 activations around 16-bit products (the decoder's ``act32``)."""
        return self.decoder.act32

    def forward(self, ids, positions, index, keys, values, pad):
        return drain(self.decoder.run(ids, positions, StaticRows(self.decoder, index, keys, values, pad)))
