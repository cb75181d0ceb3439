"""Per-row cache slots shared by the requests of a continuous batch, so that a decode step attends for all of them in
one call.

Alone, a request's :class:`~decodelab.fastpath.cache.StaticKVCache` holds its own tensors, and a batched decode step
must attend per request: one SDPA call per request and layer, plus the cache writes and slices around it (measured
on an AMD EPYC with AVX-512, 16 one-row requests at ~60-120 positions, SmolLM2's geometry: ~750 µs per layer, a
quarter of a 16-request ``kernels="fast"`` step). A :class:`SlotPool` holds layer ``i``'s keys and values of up to
``slots`` one-row requests in one (S, H_kv, C, D) tensor each; a pooled request's cache is a view of its slot
(:meth:`StaticKVCache.in_slot <decodelab.fastpath.cache.StaticKVCache.in_slot>`), so the step writes every row's new
key with one indexed copy and attends over the slots in one SDPA call under a (S, 1, 1, L) mask built from the
pool's padding rows (:meth:`decodelab.fastpath.rows.RowPlan.attend`): ~160 µs per layer for the same 16 requests.

Only where answers may depend on batch neighbours at the last-bit level (``kernels="fast"``, packed bfloat16,
quantized weights: see :mod:`decodelab.fastpath.rows`): one SDPA call over padded slots sums in another order than
the request's own call (measured: 3e-7 apart). The exact float32 engine keeps per-request caches and calls.

The attention reads positions ``[0, L)`` of every slot in its range, L the longest request of the step, masked
beyond each request's own length: those positions must hold finite numbers (a masked probability of 0 times NaN is
NaN). The buffers are allocated uninitialised (memory is touched only where slots are used), so
:meth:`SlotPool.make_finite` zeroes each slot's never-written positions up to what a step reads, in blocks of
:data:`ZERO_BLOCK` positions; what earlier occupants wrote is finite already. A slot's own capacity is zeroed when it
is taken (during the request's prefill): the first touch of fresh memory costs page faults (measured: 181 µs per
layer's 64-position block, 11 ms per slot, paid inside a 16-request step when left to it).
"""

from __future__ import annotations

import threading

import torch

SLOT_POSITIONS = 1024
"""Positions per slot (C): a request whose prompt plus ``max_new_tokens`` exceeds it keeps a cache of its own."""

ZERO_BLOCK = 64
"""Positions zeroed at a time by :meth:`SlotPool.make_finite`."""


class SlotPool:
    """Key/value buffers for ``slots`` one-row requests of ``positions`` positions each.

    Args:
        n_layers, n_kv_heads, head_dim: the model's attention geometry.
        slots: S, the most pooled requests at once (the scheduler's ``max_batch_size``); >= 1.
        positions: C, positions per slot (:data:`SLOT_POSITIONS`).
        dtype, device: of the keys and values.

    Attributes:
        keys, values: per layer, (S, H_kv, C, D) tensors.
        pad: (S, C) bool, True on a slot's real tokens (the rows of the pooled caches' ``pad``).

    Thread-safe: slots are taken in the scheduler thread and given back when a cache is collected (any thread).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, slots: int, positions: int,
                 dtype: torch.dtype, device) -> None:
        shape = (slots, n_kv_heads, positions, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pad = torch.zeros((slots, positions), dtype=torch.bool, device=device)
        self._finite = [0] * slots  # per slot: positions [0, n) hold finite numbers
        self._free = set(range(slots))
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        """S."""
        return self.pad.shape[0]

    @property
    def positions(self) -> int:
        """C."""
        return self.pad.shape[1]

    @property
    def free(self) -> int:
        """Slots not taken."""
        with self._lock:
            return len(self._free)

    def acquire(self, capacity: int) -> int | None:
        """Take the lowest free slot for a request of ``capacity`` positions (its padding row cleared, its positions
        below ``capacity`` made finite: :meth:`make_finite`), or ``None`` when every slot is taken or ``capacity`` > C
        (the request then keeps a cache of its own)."""
        if capacity > self.positions:
            return None
        with self._lock:
            if not self._free:
                return None
            slot = min(self._free)
            self._free.remove(slot)
        self.pad[slot].zero_()
        self.make_finite({slot: 0}, capacity)  # now, in the prefill, rather than in a decode step of every request
        return slot

    def release(self, slot: int) -> None:
        """Give ``slot`` back (its buffers keep what was written: finite numbers)."""
        with self._lock:
            self._free.add(slot)

    def make_finite(self, filled: dict[int, int], upto: int) -> None:
        """Before a batched step's writes: make positions ``[0, upto)`` of every slot in ``filled`` (slot -> the
        positions its request has written, ``cache.length``) hold finite numbers, by zeroing those neither written
        by it nor zeroed since the buffers were allocated, in blocks of :data:`ZERO_BLOCK` (capped at C)."""
        for slot, length in filled.items():
            start = max(self._finite[slot], length)
            if start >= upto:
                continue
            end = min(self.positions, max(upto, start + ZERO_BLOCK))
            for t in (*self.keys, *self.values):
                t[slot, :, start:end].zero_()
            self._finite[slot] = end
