"""decodelab's decode-step attention over cache slots (decodelab.fastpath.slot_attention): within float rounding of
PyTorch's SDPA over the pool (padding inside a request, grouped query heads, several head sizes), each row over its
own positions only and bit for bit the same alone and among other rows; and, with the ``panels`` product, a fast
decoder's decode step that gives a request the same logits alone and in a batch, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fast_kernels_edge import build
from test_kernel_choice import table_for

from decodelab.fastpath import StaticKVCache, kernel_choice, native, slot_attention
from decodelab.fastpath.decoder import FastDecoder

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler / AVX2 here")


def pool_of(slots: int, h_kv: int, c: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(slots, h_kv, c, d, generator=gen), torch.randn(slots, h_kv, c, d, generator=gen)
    return keys, values, torch.zeros(slots, c, dtype=torch.bool), gen


@pytest.mark.parametrize("h_kv,g,d", [(3, 3, 64), (2, 1, 16), (1, 4, 8)])
def test_matches_sdpa_over_the_pool(h_kv, g, d):
    """Rows of different lengths in scattered slots, one with padding inside its range (a left-padded prompt):
    within float rounding of one SDPA call over the slots under the pool's padding mask."""
    keys, values, pad, gen = pool_of(6, h_kv, 40, d, seed=d)
    slots = torch.tensor([4, 0, 2])
    lengths = torch.tensor([31, 7, 40])
    for s, n in zip(slots.tolist(), lengths.tolist()):
        pad[s, :n] = True
    pad[2, :5] = False  # padding at the start of slot 2's request
    q = torch.randn(3, h_kv * g, 1, d, generator=gen)
    got = slot_attention.attend(q, keys, values, pad, slots, lengths, 0.3)
    assert got.shape == (3, 1, h_kv * g * d)
    for row, (s, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        mask = pad[s, :n][None, None, None, :]  # (1, 1, 1, n)
        ref = F.scaled_dot_product_attention(q[row : row + 1].view(1, h_kv, g, d), keys[s : s + 1, :, :n],
                                             values[s : s + 1, :, :n], attn_mask=mask, scale=0.3)
        torch.testing.assert_close(got[row, 0], ref.reshape(-1), rtol=1e-5, atol=1e-6)


def test_reads_only_each_rows_own_positions():
    """Whatever lies beyond a row's length (here NaN, what unwritten memory may hold) is never read."""
    keys, values, pad, gen = pool_of(2, 3, 32, 64, seed=0)
    keys[:, :, 10:] = float("nan")
    values[:, :, 10:] = float("nan")
    pad[:, :10] = True
    q = torch.randn(2, 9, 1, 64, generator=gen)
    out = slot_attention.attend(q, keys, values, pad, torch.tensor([1, 0]), torch.tensor([10, 4]), 0.125)
    assert not out.isnan().any()


def test_a_row_is_bit_for_bit_the_same_alone_and_among_others():
    keys, values, pad, gen = pool_of(8, 3, 64, 64, seed=1)
    pad[:] = True
    slots, lengths = torch.tensor([5, 1, 7, 2, 0]), torch.tensor([60, 3, 64, 17, 33])
    q = torch.randn(5, 9, 1, 64, generator=gen)
    together = slot_attention.attend(q, keys, values, pad, slots, lengths, 0.125)
    for r in range(5):
        alone = slot_attention.attend(q[r : r + 1], keys, values, pad, slots[r : r + 1], lengths[r : r + 1], 0.125)
        assert torch.equal(alone[0], together[r])


def test_used_only_where_the_kernel_fits():
    assert slot_attention.usable(torch.float32, torch.device("cpu"), 64, 3)
    assert not slot_attention.usable(torch.bfloat16, torch.device("cpu"), 64, 3)
    assert not slot_attention.usable(torch.float32, torch.device("cpu"), 12, 3)  # D not a multiple of 8
    assert not slot_attention.usable(torch.float32, torch.device("cpu"), 64, slot_attention.MAX_GROUPS + 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_fast_decode_step_gives_a_request_its_logits_alone_bit_for_bit(arch):
    """With every product ``panels`` (a row's product is the same whatever the other rows) and the slot attention
    kernel, a request's decode-step logits alone (one request in its slot) and among three others are equal bit
    for bit: the fast path's batched step is batch-invariant where both kernels are in use."""
    model = build(arch, vocab=1024)  # N a multiple of 16 for every product, the output layer's too
    dec = FastDecoder(model, kernels="fast", kernel_table=table_for(model, {str(b): "panels"
                                                                              for b in kernel_choice.BUCKETS}))
    assert "linear" not in dec.kernel_summary()
    pool = dec.new_pool(8)
    prompts = [torch.randint(0, 1024, (1, t), generator=torch.Generator().manual_seed(t)) for t in (5, 9, 3, 12)]

    def prefilled(ids: torch.Tensor) -> tuple[StaticKVCache, int]:
        cache = StaticKVCache.in_slot(pool, pool.acquire(ids.shape[1] + 4))
        cache.start(torch.ones_like(ids))
        with torch.inference_mode():
            dec.forward(ids, torch.arange(ids.shape[1])[None], cache)
        return cache, ids.shape[1]

    def step(states: list[tuple[StaticKVCache, int]], tokens: list[int]) -> list[torch.Tensor]:
        items = []
        for (cache, t), tok in zip(states, tokens):
            cache.append_mask()
            items.append((torch.tensor([[tok]]), torch.tensor([[t]]), cache))
        with torch.inference_mode():
            return dec.forward_many(items)

    alone = step([prefilled(prompts[0])], [7])[0]
    together = step([prefilled(p) for p in prompts], [7, 11, 13, 17])
    assert torch.equal(alone, together[0])
