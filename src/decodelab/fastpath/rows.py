"""How one forward pass lays several requests' rows onto the projections and the KV caches (continuous batching).

A decode step of the continuous-batching scheduler (:mod:`decodelab.scheduler`) feeds one token per row for several
*segments*: each segment is one request's rows (1 for greedy / one sample, ``num_beams`` for beam search, ``n`` for
several samples) over that request's own :class:`~decodelab.fastpath.cache.StaticKVCache`. The promise is that every
row's logits are bit for bit the ones the same request gets alone, so this module decides, per product, which
kernel computes which rows:

* attention runs per segment, on the segment's own cache with exactly the shapes, mask and SDPA call of the request
  alone (:meth:`FastDecoder._attention`), except off the exact path, where the one-row requests' caches are slots of
  one :class:`~decodelab.fastpath.slots.SlotPool` and attend in one call (:meth:`RowPlan.attend`): decodelab's own
  kernel where it is built (:mod:`decodelab.fastpath.slot_attention`, a request alone in its slot too), else SDPA;
* element-wise and per-row operations (embedding, RMSNorm, rotary, SiLU, residual adds) are row-independent and run
  once over all rows;
* a matrix product's result for a row depends on how many rows the BLAS call had (a one-row product is a
  matrix-vector kernel; 2-3 rows, 4k rows and the remainders of larger GEMMs use different micro-kernels and sum in
  other orders: measured on AMD EPYC with PyTorch 2.13's MKL, differences of ~1e-6). So, on the exact float32
  path, the one-row segments go through one :func:`grouped_gemv`: a ``bmm`` whose G entries each multiply one row
  by the same (stride-0 expanded) weight, i.e. G one-row products, equal bit for bit to ``F.linear`` of that row
  alone, while the weight is streamed from memory once per step (each entry re-reads it from cache, not DRAM:
  the weight is cut into chunks of :data:`GEMV_CHUNK_BYTES`, one ``bmm`` each, so that a chunk stays in the
  last-level cache while the G entries read it); a multi-row segment gets its own call with its own rows, the call
  it makes alone.

Whether ``grouped_gemv`` really equals the one-row product depends on the BLAS library and the CPU, so it is
measured, not assumed: :func:`grouped_gemv_is_exact` checks it once per weight shape on the machine at hand; where
it fails, the one-row segments are multiplied one call per row (still exact, slower).

Other kernel modes (``kernels="fast"``, bfloat16 packed weights, int8 / int4) multiply all rows in one call:
faster, but a row's logits then depend on its batch neighbours at the ~1e-6 level (see README, "Continuous
batching"). There, whole prompts may also join a decode step (:class:`MixedPlan`): their tokens go through the same
product calls as the step's rows, and each prompt attends causally over its own cache as in its prefill alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import slot_attention
from .cache import StaticKVCache
from .projections import half_linear

GEMV_CHUNK_BYTES = 4 << 20
"""Weight bytes per ``bmm`` of :func:`grouped_gemv`: a chunk is read from DRAM by the first entry and from the
last-level cache by the other G - 1. Measured on an AMD EPYC (32 MiB L3, PyTorch 2.13's MKL, float32): SmolLM2's
49152 x 576 output layer for 16 one-row products took 42 ms per call in chunks of 8192 rows (18 MiB, the earlier
fixed chunk: every entry re-read it from DRAM) and 28 ms in chunks of 1024-4096 rows (2.3-9 MiB); 32 rows 76 against
48 ms; the decoder layers' 1.2-7 MiB weights were unchanged within noise whole or cut. The chunking never changes a
result (each output element is its own dot product; :func:`grouped_gemv_is_exact` checks it with the same chunks)."""


def gemv_chunk_rows(weight: torch.Tensor) -> int:
    """Weight rows per chunk of :func:`grouped_gemv`: :data:`GEMV_CHUNK_BYTES` of rows, at least one."""
    return max(1, GEMV_CHUNK_BYTES // (weight.shape[1] * weight.element_size()))


def grouped_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """G independent one-row products ``x[g] @ weight.T + bias`` in one ``bmm`` per chunk of weight rows.

    x (G, 1, K), weight (N, K) -> (G, 1, N). Each ``bmm`` entry is a 1-row product against a stride-0 expanded
    view of the weight (no copy); a weight larger than :data:`GEMV_CHUNK_BYTES` is cut into chunks of
    :func:`gemv_chunk_rows` rows, so that a chunk is read from DRAM once and from cache by the other entries. The
    bias is added after the product, as :func:`decodelab.fastpath.projections.half_linear` does.
    """
    g, _, k = x.shape
    n = weight.shape[0]
    chunk = gemv_chunk_rows(weight)
    if n <= chunk:
        y = torch.bmm(x, weight.t().expand(g, k, n))
    else:
        y = torch.cat([torch.bmm(x, weight[s : s + chunk].t().expand(g, k, min(chunk, n - s)))
                       for s in range(0, n, chunk)], dim=-1)
    return y if bias is None else y + bias


def grouped_gemv_is_exact(weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 3) -> bool:
    """Whether :func:`grouped_gemv` equals ``F.linear`` of each row alone, bit for bit, for this weight's shape and
    dtype on this machine (``rows`` random inputs). Takes a few milliseconds."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((rows, 1, weight.shape[1]), generator=gen).to(weight.dtype).to(weight.device)
    grouped = grouped_gemv(x, weight, bias)
    alone = torch.cat([F.linear(x[r : r + 1], weight, bias) for r in range(rows)])
    return bool(torch.equal(grouped, alone))


@dataclass
class Segment:
    """One request's rows in a forward pass.

    Attributes:
        cache: the request's own KV cache (B_s rows).
        lo, hi: its rows in the concatenated batch.
        past: positions filled before this pass; total: after it.
        mask: the (B_s, 1, T, total) boolean attention mask, or ``None`` (no padding: SDPA without a mask).
        window_mask: the sliding layers' mask (:func:`sliding_window_mask`), when the model has a window.
    """

    cache: StaticKVCache
    lo: int
    hi: int
    past: int
    total: int
    mask: torch.Tensor | None
    window_mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.hi - self.lo


def attention_mask(cache: StaticKVCache, t: int, total: int, device) -> torch.Tensor | None:
    """The mask transformers builds for this cache (``masking_utils.sdpa_mask``): ``None`` when no row is padded;
    else (B, 1, 1, total) for one query token, (B, 1, T, T) causal & padding for a prefill."""
    if not cache.padded:
        return None
    pad = cache.pad[:, :total]
    if t > 1:
        causal = torch.ones((t, t), dtype=torch.bool, device=device).tril()
        return causal[None, None] & pad[:, None, None, :]
    return pad[:, None, None, :]


def window_start(total: int, t: int, window: int) -> int:
    """The first cache position a sliding layer's keys start at: 0 for a prefill (all its T keys, as
    ``DynamicSlidingWindowLayer.update`` returns them), ``max(total - window, 0)`` for a decode step (the W - 1 kept
    positions and the new one)."""
    return 0 if t > 1 else max(total - window, 0)


def sliding_window_mask(cache: StaticKVCache, t: int, total: int, window: int, device) -> torch.Tensor | None:
    """The mask transformers builds for a sliding layer of ``window`` positions over the keys from
    :func:`window_start` to ``total`` (``masking_utils.create_sliding_window_causal_mask``: key ``kv`` visible to
    query ``q`` iff ``q - window < kv <= q``, and not padding).

    ``None`` only while the keys are fewer than the window and no row is padded (``_ignore_causal_mask_sdpa``); from
    ``window`` keys on, the mask is built even when it is all True (SDPA then runs another kernel, and transformers'
    numbers are those of that kernel). Prefill: (B, 1, T, T); decode step: (B, 1, 1, total - start).
    """
    if total < window and not cache.padded:
        return None
    if t > 1:
        q = torch.arange(t, device=device)[:, None]
        kv = torch.arange(total, device=device)[None, :]
        visible = (kv <= q) & (kv > q - window)
        return visible[None, None] & cache.pad[:, None, None, :total]
    return cache.pad[:, None, None, window_start(total, t, window) : total]


class RowPlan:
    """The segments of one forward pass and the product kernel each row gets.

    Args:
        segments: in row order; the one-row segments first when there are several (the scheduler's order), so
            that they form one contiguous block of ``singles`` rows.
        halves: a lone one-row segment runs :func:`decodelab.fastpath.projections.half_linear` (as alone).
        grouped: several segments on the exact float32 path: one-row segments through :func:`grouped_gemv` (or one
            call per row where :func:`grouped_gemv_is_exact` failed), each multi-row segment its own call;
            otherwise one call over all rows.
        exact_shapes: per (N, K) weight shape, whether :func:`grouped_gemv` is exact (filled by the decoder).
        attention: ``f(q, k, v, mask, t) -> (B, T, H * D)``, the SDPA call transformers makes
            (:meth:`decodelab.fastpath.decoder.FastDecoder._attention`).
        pooled: the number of leading one-row decode segments (>= 2, ordered by slot) whose caches are slots of one
            :class:`~decodelab.fastpath.slots.SlotPool`: their full-attention layers write and attend in one call
            over the pool's slots (:meth:`attend`); 0: every segment attends on its own (the exact float32 path).
        slot_scale: attend through decodelab's own kernel (:func:`decodelab.fastpath.slot_attention.attend`, each
            row over its own positions, alone or not) with this ``q . k`` scale: the pooled segments (then even one
            pooled segment, a request alone, takes that path) and every other decode segment (T == 1) of a
            full-attention layer, its cache's rows taken as slots, so that a request's step is the same arithmetic
            in a slot or in a cache of its own; ``None``: one SDPA call over the slot range, SDPA per segment.

    This is the eager row plan of :meth:`decodelab.fastpath.decoder.FastDecoder.run` (``linear``, ``attend``);
    :meth:`finish` advances the caches after the pass.
    """

    def __init__(self, segments: list[Segment], halves: bool, grouped: bool, exact_shapes: dict,
                 attention, pooled: int = 0, slot_scale: float | None = None) -> None:
        self.segments = segments
        self.slot_scale = slot_scale
        self.pooled = pooled if pooled >= (1 if slot_scale is not None else 2) else 0
        if self.pooled:
            pool_segments = segments[: self.pooled]
            self.pool = pool_segments[0].cache.pool
            slots = [seg.cache.slot for seg in pool_segments]
            self.slot_lo, self.slot_hi = slots[0], slots[-1] + 1
            device = pool_segments[0].cache.pad.device
            self.slot_index = torch.tensor(slots, device=device)
            self.write_at = torch.tensor([seg.past for seg in pool_segments], device=device)
            self.lengths = torch.tensor([seg.total for seg in pool_segments], device=device)
            self.keys_upto = max(seg.total for seg in pool_segments)
        if self.pooled and slot_scale is None:  # SDPA over the slot range reads every slot up to keys_upto
            self.pool.make_finite({seg.cache.slot: seg.past for seg in pool_segments}, self.keys_upto)
            # (S', 1, 1, L) over the slot range; holes (slots of requests not in this step) attend to their own
            # rows, which are dropped
            self.pool_mask = self.pool.pad[self.slot_lo : self.slot_hi, None, None, : self.keys_upto]
        self.attention = attention
        self.halves = halves
        self.grouped = grouped and len(segments) > 1
        self.singles = 0
        if self.grouped:
            while self.singles < len(segments) and segments[self.singles].rows == 1:
                self.singles += 1
        self.exact_shapes = exact_shapes

    def linear(self, proj, x: torch.Tensor) -> torch.Tensor:
        """``proj(x)`` for the (R, T, K) rows ``x`` with the kernels described in the class docstring."""
        if not self.grouped:
            return half_linear(proj, x) if self.halves else proj(x)
        parts = []
        s = self.singles
        if s == 1:
            parts.append(half_linear(proj, x[:1]) if self.halves else proj(x[:1]))
        elif s > 1:
            w, b = proj.weight, proj.bias
            key = (tuple(w.shape), w.dtype, b is not None)
            exact = self.exact_shapes.get(key)
            if exact is None:
                exact = self.exact_shapes[key] = grouped_gemv_is_exact(w, b)
            if exact:
                parts.append(grouped_gemv(x[:s], w, b))
            else:
                parts.extend(proj(x[r : r + 1]) for r in range(s))
        for seg in self.segments[s:]:
            parts.append(proj(x[seg.lo : seg.hi]))
        return torch.cat(parts)

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        """Write layer ``i``'s new keys/values into each segment's cache and attend per segment, with the
        segment's own cache length and mask (as alone). q (R, H, T, D), k/v (R, H_kv, T, D) -> (R, T, H * D).

        A sliding layer (``window`` W) attends over exactly the keys transformers' ``DynamicSlidingWindowLayer``
        returns, a view of the cache from :func:`window_start` (the last min(total, W) positions on a decode step),
        under the segment's ``window_mask``: masking older keys out of a longer range would change SDPA's sums."""
        t = q.shape[2]
        outs = []
        single = len(self.segments) == 1
        segments = self.segments
        if self.pooled and window is None:
            outs.append(self._attend_pooled(i, q, k, v))
            segments = segments[self.pooled :]
        for seg in segments:
            keys, values = seg.cache.keys[i], seg.cache.values[i]
            sk, sv = (k, v) if single else (k[seg.lo : seg.hi], v[seg.lo : seg.hi])
            keys[:, :, seg.past : seg.total] = sk
            values[:, :, seg.past : seg.total] = sv
            mask = seg.mask
            if seg.past:
                start = 0 if window is None else window_start(seg.total, t, window)
                sk, sv = keys[:, :, start : seg.total], values[:, :, start : seg.total]
            if window is not None:
                mask = seg.window_mask
            sq = q if single else q[seg.lo : seg.hi]
            if self.slot_scale is not None and t == 1 and window is None and keys.is_contiguous():
                # a decode step over the segment's own cache, its rows as slots: the arithmetic of a pooled row
                outs.append(slot_attention.attend(sq, keys, values, seg.cache.pad, self._rows(seg.rows),
                                                  self._rows(seg.rows, seg.total), self.slot_scale))
                continue
            outs.append(self.attention(sq, sk, sv, mask, t))
        return outs[0] if single else torch.cat(outs)

    @staticmethod
    def _rows(n: int, fill: int | None = None) -> torch.Tensor:
        """(n,) int64: ``0 .. n-1`` (a cache's rows as slots), or ``fill`` n times (their lengths)."""
        return torch.arange(n) if fill is None else torch.full((n,), fill, dtype=torch.int64)

    def _attend_pooled(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The pooled segments' cache writes (one indexed copy each for keys and values) and attention (decodelab's
        kernel, each row over its own positions, with ``slot_scale``; else one SDPA call over the slot range, keys
        ``[0, keys_upto)`` under the pool's padding rows): (P, 1, H * D)."""
        p, lo, hi = self.pooled, self.slot_lo, self.slot_hi
        keys, values = self.pool.keys[i], self.pool.values[i]
        keys[self.slot_index, :, self.write_at] = k[:p, :, 0]
        values[self.slot_index, :, self.write_at] = v[:p, :, 0]
        if self.slot_scale is not None:
            return slot_attention.attend(q[:p], keys, values, self.pool.pad, self.slot_index, self.lengths,
                                         self.slot_scale)
        sq = q[:p]
        if hi - lo != p:  # holes in the slot range: their rows get zeros and are dropped after
            sq = q.new_zeros((hi - lo, *q.shape[1:])).index_copy_(0, self.slot_index - lo, sq)
        out = self.attention(sq, keys[lo:hi, :, : self.keys_upto], values[lo:hi, :, : self.keys_upto],
                             self.pool_mask, 1)
        return out if hi - lo == p else out.index_select(0, self.slot_index - lo)

    @staticmethod
    def last(h: torch.Tensor) -> torch.Tensor:
        """The rows the output layer multiplies: each row's last position, h (R, T, hidden) -> (R, 1, hidden)."""
        return h[:, -1:, :]

    def finish(self) -> None:
        """After the pass: every segment's cache now holds ``total`` positions."""
        for seg in self.segments:
            seg.cache.length = seg.total


class MixedPlan:
    """One forward pass that runs a decode step and whole prompts together (off the exact path only): the
    continuous-batching scheduler lets a waiting prompt *join* a decode step instead of running its prefill
    between two steps (what vLLM's chunked prefill and Sarathi-Serve call piggybacking, here with whole prompts).

    The pass's tokens are laid out as one sequence of N = R + sum(T_j) tokens, (1, N, hidden): first the R decode
    rows of ``decode`` (a :class:`RowPlan` over one-token segments, in its row order), then each prompt's T_j
    tokens. Every projection multiplies all N tokens in one call (the weights are read once for the step and the
    prompts), the element-wise operations run per token as always, and attention is split: the decode rows attend
    through ``decode`` (pooled slots, per-request caches) exactly as in a decode step, each prompt causally over its
    own tokens with its own empty cache, exactly as its prefill alone. Only the products see the prompts' tokens
    beside the decode rows: their results differ from a separate step and prefill at the level of float rounding
    (~1e-6 relative), as any batched product off the exact path does.

    Args:
        decode: the decode step's row plan (R rows), or ``None`` (only prompts).
        prompts: one single-row, single-segment :class:`RowPlan` per prompt (its empty cache, T_j tokens); at
            least one.
    """

    def __init__(self, decode: RowPlan | None, prompts: list[RowPlan]) -> None:
        self.decode = decode
        self.prompts = prompts
        self.rows = decode.segments[-1].hi if decode is not None else 0
        bounds, lo = [], self.rows
        for plan in prompts:
            seg = plan.segments[0]
            bounds.append((lo, lo + seg.total))
            lo += seg.total
        self.bounds = bounds
        self.head_rows = torch.tensor(list(range(self.rows)) + [hi - 1 for _, hi in bounds],
                                      device=prompts[0].segments[0].cache.pad.device)

    @staticmethod
    def linear(proj, x: torch.Tensor) -> torch.Tensor:
        """``proj(x)``, all tokens in one call: (1, N, K) -> (1, N, out) (or the output layer's (R + J, 1, K))."""
        return proj(x)

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        """q (1, H, N, D), k / v (1, H_kv, N, D) -> (1, N, H * D): the decode rows through ``decode.attend`` as
        (R, H, 1, D) rows, each prompt through its own plan's ``attend`` (its cache write and causal SDPA call)."""
        outs = []
        r = self.rows
        if r:
            def rows(t: torch.Tensor) -> torch.Tensor:  # (1, H, R, D) tokens -> (R, H, 1, D) rows
                return t[0, :, :r].transpose(0, 1).unsqueeze(2)

            outs.append(self.decode.attend(i, rows(q), rows(k), rows(v), window).reshape(1, r, -1))
        for plan, (lo, hi) in zip(self.prompts, self.bounds):
            outs.append(plan.attend(i, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], window))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def last(self, h: torch.Tensor) -> torch.Tensor:
        """The decode rows and each prompt's last token: h (1, N, hidden) -> (R + J, 1, hidden)."""
        return h[0].index_select(0, self.head_rows).unsqueeze(1)

    def finish(self) -> None:
        """After the pass: the decode caches advanced by one position, each prompt's cache holds its T_j."""
        for plan in ([self.decode] if self.decode is not None else []) + self.prompts:
            plan.finish()
