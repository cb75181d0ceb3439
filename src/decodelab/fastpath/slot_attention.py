"""A decode step's attention over the requests' cache slots (:class:`~decodelab.fastpath.slots.SlotPool`), by
decodelab's own kernel (``native_attention.c``, compiled on this machine by :mod:`decodelab.fastpath.native`).

PyTorch's SDPA over the pool reads every row's keys up to the longest request of the step, under a mask: with
prompts of 5-120 tokens, most of what a 32-request step reads is padding, and the attention's cost is the reading
(the K/V of 32 requests is ~9 MB per layer in float32). The kernel reads each row's own positions only, and computes
every (row, key/value head) alone: a row's output is bit for bit the same whatever the other rows of the step, so a
lone request in a slot (alone) and the same request among others (batched) attend identically. Measured on an AMD
EPYC (AVX2, 2 threads), SmolLM2-135M's geometry (3 key/value heads, 9 query heads, D = 64), rows of 70-184
positions: 16 rows 257 -> 101 us per layer, 32 rows 470 -> 196 us, within 5e-7 of SDPA.

Used off the exact path only (``kernels="fast"``, the fast path's float32 decoder: :mod:`decodelab.fastpath.rows`);
where the kernels cannot be built, SDPA over the pool runs as before.
"""

from __future__ import annotations

import torch

from . import native

MAX_GROUPS = 16
"""Query heads per key/value head the kernel handles (its per-thread arrays)."""


def usable(dtype: torch.dtype, device: torch.device, head_dim: int, groups: int) -> bool:
    """Whether the kernel can attend for this geometry: float32 on the CPU, D a multiple of 8, at most
    :data:`MAX_GROUPS` query heads per key/value head, and the kernels built here."""
    return (dtype == torch.float32 and torch.device(device).type == "cpu" and head_dim % 8 == 0
            and 1 <= groups <= MAX_GROUPS and native.library() is not None)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor, slots: torch.Tensor,
           lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Each row's attention over its own slot.

    Args:
        q: (P, H, 1, D) float32, the step's queries (H = H_kv * g, query head j of key/value head h at h * g + j,
            transformers' ``repeat_kv`` order).
        keys, values: (S, H_kv, C, D) float32, one layer of the pool, the step's new keys already written.
        pad: (S, C) bool, the slots' real tokens.
        slots, lengths: (P,) int64, each row's slot and the positions its request holds (the new one included).
        scale: the factor on ``q . k`` (``1 / sqrt(D)`` unless the model says otherwise).

    Returns:
        (P, 1, H * D) float32, as :meth:`decodelab.fastpath.decoder.FastDecoder._attention` returns.

    Raises:
        MemoryError: a thread of the kernel could not allocate its scores (at most ``g * C`` floats).
    """
    p, h, _, d = q.shape
    s, h_kv, c, _ = keys.shape
    q = q.reshape(p, h, d).contiguous()
    out = torch.empty((p, h, d), dtype=torch.float32)
    rc = native.library().dl_slot_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), pad.data_ptr(),
                                           slots.data_ptr(), lengths.data_ptr(), out.data_ptr(), p, h_kv,
                                           h // h_kv, c, d, scale)
    if rc:
        raise MemoryError(f"slot attention: no memory for {h // h_kv} x {c} scores")
    return out.view(p, 1, h * d)
