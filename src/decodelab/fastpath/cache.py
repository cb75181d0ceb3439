"""A preallocated key/value cache for the fast path, sized to the request.

Layout: ``keys[i]`` and ``values[i]`` are layer i's (B, H_kv, capacity, D) tensors in the model's dtype, each its
own allocation (a compiled step writes into them in place; writing through views of one shared buffer would make
the compiler copy the whole buffer every step). ``length`` is the number of positions filled (the same for every
row: batches are left-padded, so row ``b`` starts with ``pad_lengths[b]`` padding positions, masked by ``pad``).
``pad`` is (B, capacity) bool, True on real tokens (the 2D attention mask of transformers, kept preallocated so a
decode step appends nothing). Under continuous batching, a one-row request's buffers may instead be views of a slot
of a shared :class:`~decodelab.fastpath.slots.SlotPool` (:meth:`StaticKVCache.in_slot`; never for a compiled step).
"""

from __future__ import annotations

import weakref

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
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pad = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.length = 0
        self.padded = False  # True when some row has left padding: attention then needs the explicit mask
        self.pool = None  # the SlotPool whose slot ``slot`` this one-row cache views (in_slot), else None
        self.slot: int | None = None
        self._give_back = None

    @classmethod
    def in_slot(cls, pool, slot: int) -> "StaticKVCache":
        """A one-row cache whose buffers are views of ``slot`` of ``pool`` (a
        :class:`~decodelab.fastpath.slots.SlotPool`, capacity C): batched decode steps attend over the pool's slots
        in one call. The slot goes back to the pool when this cache is collected, or when it leaves the pool
        (growing past C, or :meth:`select` making another row count: its contents are copied to buffers of its
        own)."""
        cache = cls.__new__(cls)
        cache.keys = [t[slot : slot + 1] for t in pool.keys]
        cache.values = [t[slot : slot + 1] for t in pool.values]
        cache.pad = pool.pad[slot : slot + 1]
        cache.length, cache.padded = 0, False
        cache.pool, cache.slot = pool, slot
        cache._give_back = weakref.finalize(cache, pool.release, slot)
        return cache

    def _leave_pool(self) -> None:
        """After the buffers were replaced by ones of its own: give the slot back."""
        if self._give_back is not None:
            self._give_back()
        self.pool = self.slot = self._give_back = None

    @property
    def capacity(self) -> int:
        """Positions the buffers hold without growing."""
        return self.pad.shape[1]

    @property
    def batch(self) -> int:
        """Rows B."""
        return self.pad.shape[0]

    def _remake(self, fn) -> None:
        self.keys = [fn(t) for t in self.keys]
        self.values = [fn(t) for t in self.values]

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions (grows to max(total, 2 * capacity), copying the filled part)."""
        if total <= self.capacity:
            return
        new_cap, n = max(total, 2 * self.capacity), self.length

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((t.shape[0], t.shape[1], new_cap, t.shape[3]))
            out[:, :, :n] = t[:, :, :n]
            return out

        self._remake(grow)
        pad = self.pad.new_zeros((self.pad.shape[0], new_cap))
        pad[:, :n] = self.pad[:, :n]
        self.pad = pad
        self._leave_pool()

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
        n, filled = rows.shape[0], self.length
        if n == self.batch and bool(torch.equal(rows.cpu(), torch.arange(n))):
            return
        if n == self.batch:
            def pick(t: torch.Tensor) -> torch.Tensor:
                t[:, :, :filled] = t[:, :, :filled].index_select(0, rows)
                return t
        else:
            def pick(t: torch.Tensor) -> torch.Tensor:
                out = t.new_zeros((n, *t.shape[1:]))
                out[:, :, :filled] = t[:, :, :filled].index_select(0, rows)
                return out
        self._remake(pick)
        self.pad = self.pad.index_select(0, rows)
        self.padded = not bool(self.pad[:, :filled].all())
        self._leave_pool()

    def clone(self) -> "StaticKVCache":
        """An independent copy (buffers cloned)."""
        copy = StaticKVCache.__new__(StaticKVCache)
        copy.keys = [t.clone() for t in self.keys]
        copy.values = [t.clone() for t in self.values]
        copy.pad, copy.length, copy.padded = self.pad.clone(), self.length, self.padded
        copy.pool = copy.slot = copy._give_back = None
        return copy
