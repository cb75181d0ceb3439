"""A fixed-shape, single-token decode step as an ``nn.Module``: what ``torch.compile`` (and CUDA graphs) need.

:class:`StaticStep` is built from a :class:`~decodelab.fastpath.decoder.FastDecoder` (float, packed or quantized
projections) and holds the same weight tensors as buffers (no copy; oneDNN-packed bfloat16 weights are replaced by
their plain originals, which Inductor's freezing pass packs itself). Its ``forward`` has no data-dependent Python:

* the new key/value are written with ``index_copy_`` at a position given as a tensor;
* attention always spans the whole preallocated cache, the (B, capacity) boolean mask hiding unwritten and padding
  positions; the query heads are folded onto the key/value heads (transformers' ``pack_gqa``);

so one compiled graph serves every step of a request whose batch size and cache capacity match. Inside the compiled
graph, float arithmetic may be reordered: outputs are close to, not bit-for-bit, the eager fast path's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernel_choice
from .decoder import Dense, FastDecoder, fast_rms_norm, rms_norm, rope


class _Linear(nn.Module):
    def __init__(self, weight, bias) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _Measured(nn.Module):
    """:class:`~decodelab.fastpath.decoder.MeasuredDense` in traceable form: the product measured for the row count
    (static in a compiled step), except that oneDNN's prepacked GEMM is written as ``F.linear``, which Inductor's
    freezing pass turns into the same prepacked GEMM."""

    def __init__(self, proj) -> None:
        super().__init__()
        self.register_buffer("weight", proj.weight.detach(), persistent=False)
        self.register_buffer("bias", None if proj.bias is None else proj.bias.detach(), persistent=False)
        self.choice = dict(proj.choice)

    def forward(self, x):
        name = self.choice[kernel_choice.bucket(x.numel() // x.shape[-1])]
        if name == "onednn":
            name = "linear"
        return kernel_choice.product(name, x, self.weight, self.bias)


class _Int8(nn.Module):
    def __init__(self, proj) -> None:
        super().__init__()
        self.register_buffer("q", proj.q, persistent=False)
        self.register_buffer("scale", proj.scale, persistent=False)
        self.register_buffer("bias", proj.bias, persistent=False)

    def forward(self, x):
        from ..quantize import int8_product

        return int8_product(x, self.q, self.scale, self.bias)


class _Int4(nn.Module):
    def __init__(self, proj) -> None:
        super().__init__()
        self.register_buffer("packed", proj.packed, persistent=False)
        self.register_buffer("scale_zero", proj.scale_zero, persistent=False)
        self.register_buffer("bias", proj.bias, persistent=False)
        self.group_size, self.n = proj.group_size, proj.n

    def forward(self, x):
        from ..quantize import int4_product

        return int4_product(x, self.packed, self.scale_zero, self.group_size, self.n, self.bias)


def as_module(proj) -> nn.Module:
    """The ``nn.Module`` form of a fast-path projection (:class:`Dense` and its packed variant, or a quantized
    linear from :mod:`decodelab.quantize`)."""
    from ..quantize import Int4Linear, Int8Linear
    from .decoder import MeasuredDense

    if isinstance(proj, MeasuredDense):
        return _Measured(proj)
    if isinstance(proj, Dense):  # and PackedDense: Inductor's freezing packs the plain weight itself
        return _Linear(proj.weight, proj.bias)
    if isinstance(proj, Int8Linear):
        return _Int8(proj)
    if isinstance(proj, Int4Linear):
        return _Int4(proj)
    raise TypeError(f"unknown projection type {type(proj).__name__}")


class _Block(nn.Module):
    def __init__(self, layer) -> None:
        super().__init__()
        self.register_buffer("ln1", layer.ln1.detach(), persistent=False)
        self.register_buffer("ln2", layer.ln2.detach(), persistent=False)
        self.eps1, self.eps2 = layer.eps1, layer.eps2
        self.qkv_sizes = layer.qkv_sizes
        self.qk_eps = layer.qk_eps  # Qwen3's per-head query / key norms, or None
        self.register_buffer("q_norm", None if layer.q_norm is None else layer.q_norm.detach(), persistent=False)
        self.register_buffer("k_norm", None if layer.k_norm is None else layer.k_norm.detach(), persistent=False)
        for name, proj in layer.projections().items():
            setattr(self, name, as_module(proj))


class StaticStep(nn.Module):
    """Fixed-shape decode step over a :class:`~decodelab.fastpath.cache.StaticKVCache`'s buffers.

    ``forward(ids, positions, index, keys, values, pad) -> logits``:

    * ids (B, 1) int64, positions (B, 1) int64 rotary positions, index (1,) int64 cache slot to write;
    * keys / values: per layer (B, H_kv, capacity, D), written in place at ``index``; pad (B, capacity) bool, True
      on the positions to attend to (the new one included);
    * returns (B, V) logits in the model's dtype.

    Like the eager decoder with ``act32`` (a 16-bit model's fused or quantized engine), the activations, norms,
    attention and cache are float32 and only the products' inputs are cast to the model's dtype.
    """

    def __init__(self, decoder: FastDecoder) -> None:
        super().__init__()
        self.n_kv, self.groups, self.head_dim, self.scaling = (decoder.n_kv, decoder.groups, decoder.head_dim,
                                                               decoder.scaling)
        self.register_buffer("embed", decoder.embed.detach(), persistent=False)
        self.register_buffer("norm", decoder.norm.detach(), persistent=False)
        self.norm_eps = decoder.norm_eps
        self.rotary = decoder.rotary
        self.blocks = nn.ModuleList([_Block(layer) for layer in decoder.layers])
        self.lm_head = as_module(decoder.lm_head)
        self.act32, self.mm_dtype = decoder.act32, decoder.dtype
        self.rms_norm = fast_rms_norm if decoder.fused else rms_norm  # the eager decoder's choice (_layers)

    def _in(self, x):
        return x.to(self.mm_dtype) if self.act32 else x

    def _out(self, y):
        return y.float() if self.act32 else y

    def forward(self, ids, positions, index, keys, values, pad):
        b = ids.shape[0]
        h = F.embedding(ids, self.embed)
        if self.act32:
            h = h.float()
        cos, sin = self.rotary(h, positions)
        half = self.head_dim // 2
        cos, sin = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
        mask = pad[:, None, None, :]
        shape = (b, 1, -1, self.head_dim)
        for i, blk in enumerate(self.blocks):
            x = self._in(self.rms_norm(h, blk.ln1, blk.eps1))
            if blk.qkv_sizes is not None:
                q, k, v = self._out(blk.qkv(x)).split(blk.qkv_sizes, -1)
            else:
                q, k, v = self._out(blk.q(x)), self._out(blk.k(x)), self._out(blk.v(x))
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
            if blk.q_norm is not None:
                q, k = rms_norm(q, blk.q_norm.to(q.dtype), blk.qk_eps), rms_norm(k, blk.k_norm.to(k.dtype), blk.qk_eps)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            keys[i].index_copy_(2, index, k)
            values[i].index_copy_(2, index, v)
            att = F.scaled_dot_product_attention(q.reshape(b, self.n_kv, self.groups, self.head_dim), keys[i],
                                                 values[i], attn_mask=mask, scale=self.scaling)
            att = att.reshape(b, -1, 1, self.head_dim).transpose(1, 2).reshape(b, 1, -1)
            h = h + blk.o(self._in(att))
            x = self._in(self.rms_norm(h, blk.ln2, blk.eps2))
            if blk.qkv_sizes is not None:
                gate, up = blk.gate_up(x).chunk(2, -1)
            else:
                gate, up = blk.gate(x), blk.up(x)
            h = h + blk.down(F.silu(gate) * up)
        h = self._in(self.rms_norm(h, self.norm, self.norm_eps))
        return self.lm_head(h)[:, -1]
