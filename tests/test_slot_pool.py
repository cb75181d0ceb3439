"""Per-row cache slots (``decodelab.fastpath.slots``): off the exact float32 path, one-row requests of a continuous
batch keep their KV caches in slots of one pool, and a decode step writes and attends for all of them in one call.

Checked here: the pool's bookkeeping (lowest free slot, a slot back when its cache dies or leaves the pool, never-
written positions zeroed before a step reads them, written ones never); pooled steps give the logits of the same
requests with caches of their own (to float rounding: one SDPA call over padded slots sums in another order) and the
same greedy ids as each request alone, with holes in the slot range, padded multi-row requests beside them and a
request stepped alone in between; a pooled cache that grows past its slot or becomes a beam batch keeps its contents
in buffers of its own; the exact engine never pools; ``generate_many`` on a ``kernels="fast"`` engine returns the ids
of ``generate`` alone.
"""

from __future__ import annotations

import gc

import pytest
import torch

import decodelab
from decodelab.engine import DecodeState, Engine
from decodelab.fastpath import StaticKVCache, native
from decodelab.fastpath.rows import RowPlan
from decodelab.fastpath.slots import ZERO_BLOCK, SlotPool


def small_pool(slots: int = 3, positions: int = 100) -> SlotPool:
    return SlotPool(n_layers=2, n_kv_heads=1, head_dim=2, slots=slots, positions=positions, dtype=torch.float32,
                    device="cpu")


def test_the_pool_hands_out_the_lowest_free_slot_and_takes_it_back_when_its_cache_dies():
    pool = small_pool()
    assert pool.acquire(101) is None  # longer than a slot: a cache of its own
    caches = [StaticKVCache.in_slot(pool, pool.acquire(10)) for _ in range(3)]
    assert [c.slot for c in caches] == [0, 1, 2] and pool.free == 0
    assert pool.acquire(10) is None  # full
    caches[1].keys[0][0, 0, 0, 0] = 5.0  # a view of the pool
    assert pool.keys[0][1, 0, 0, 0] == 5.0 and caches[1].capacity == 100 and caches[1].batch == 1
    del caches[1]
    gc.collect()
    assert pool.free == 1
    pool.pad[1, :4] = True  # left by the previous occupant
    assert pool.acquire(10) == 1 and not pool.pad[1].any()


def test_make_finite_zeroes_positions_never_written_and_keeps_the_written_ones():
    pool = small_pool()
    for t in (*pool.keys, *pool.values):
        t.fill_(float("nan"))  # what uninitialised memory may hold
    pool.keys[0][0, :, :3] = 1.0  # a prefill of 3 positions
    pool.make_finite({0: 3}, upto=5)
    end = 3 + ZERO_BLOCK  # zeroed one block at a time
    assert bool((pool.keys[0][0, :, :3] == 1.0).all())
    assert bool((pool.keys[1][0, :, 3:end] == 0).all()) and bool((pool.values[0][0, :, 3:end] == 0).all())
    assert bool(pool.keys[0][0, :, end:].isnan().all()) and bool(pool.keys[0][1].isnan().all())
    pool.keys[0][0, :, 3] = 7.0  # a decode step wrote position 3
    pool.make_finite({0: 4}, upto=6)  # already finite: nothing zeroed again
    assert bool((pool.keys[0][0, :, 3] == 7.0).all())
    pool.keys[0][0, :, end] = 9.0  # written by the request (its length says so) while it stepped alone
    pool.make_finite({0: end + 1}, upto=end + 2)
    assert bool((pool.keys[0][0, :, end] == 9.0).all())
    assert bool((pool.keys[0][0, :, end + 1 :] == 0).all())  # up to C


def test_a_pooled_cache_leaves_its_slot_with_its_contents_when_it_grows_or_becomes_a_beam_batch():
    pool = small_pool(positions=8)
    grown = StaticKVCache.in_slot(pool, pool.acquire(8))
    grown.start(torch.ones((1, 6), dtype=torch.long))
    grown.keys[1][:, :, :6] = torch.arange(6.0)[None, None, :, None]
    grown.length = 6
    grown.reserve(9)
    assert grown.pool is None and grown.capacity == 16 and pool.free == 3
    assert torch.equal(grown.keys[1][0, 0, :6, 0], torch.arange(6.0)) and bool(grown.pad[0, :6].all())
    beams = StaticKVCache.in_slot(pool, pool.acquire(8))
    beams.keys[0][:, :, :2] = 3.0
    beams.length = 2
    beams.select(torch.tensor([0, 0, 0]))
    assert beams.pool is None and beams.batch == 3 and pool.free == 3
    assert bool((beams.keys[0][:, :, :2] == 3.0).all())
    pool.keys[0].zero_()  # the slot's later occupants no longer reach the beams' buffers
    assert bool((beams.keys[0][:, :, :2] == 3.0).all())


def _prefill(engine: Engine, ids: list[list[int]], rows_each: int = 1) -> DecodeState:
    from decodelab.search.common import PromptBatch

    batch = PromptBatch.from_lists(ids, 0).repeat(rows_each)
    return engine.prefill(batch.ids, batch.mask, max_new_tokens=12)[1]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_pooled_steps_give_the_logits_of_caches_of_their_own(fixture, request, monkeypatch):
    loaded = request.getfixturevalue(fixture)
    engine = Engine(loaded.model, kernels="fast")
    ids = [loaded.tokenizer(t).input_ids for t in
           ("It was a dark and stormy", "Hi", "The capital of France is", "Once upon a time there", "def f(x):")]
    pooled_calls = []
    real = RowPlan._attend_pooled
    monkeypatch.setattr(RowPlan, "_attend_pooled", lambda self, *a: pooled_calls.append(self.pooled) or real(self, *a))

    def run(pooled: bool):
        if pooled:
            engine.start_batching(8, thread=False)  # this thread drives it: calls run here, with the pool
        try:
            singles = [_prefill(engine, [p]) for p in ids]
            padded = _prefill(engine, [ids[0], ids[1]])  # two rows, left padding: its own cache
            assert all((s.cache.pool is not None) == pooled for s in singles) and padded.cache.pool is None
            # slot 1's request sits this step out (a hole in the slot range), then steps alone, then joins again
            steps = [[0, 2, 3, 4, 5], [1], [0, 1, 2, 3, 4, 5], [4, 2, 0]]
            states = singles + [padded]
            gen = torch.Generator().manual_seed(1)
            out = []
            for chosen in steps:
                tokens = [torch.randint(0, 1000, (states[i].positions.shape[0],), generator=gen) for i in chosen]
                out.append(engine.step_many([states[i] for i in chosen], tokens))
            return out
        finally:
            engine.stop_batching()

    own, pooled = run(False), run(True)
    # with decodelab's slot attention kernel built here, a request stepped alone in its slot (and the one-token
    # prompt "Hi"'s prefill) attends through it too: 1 pooled row; with SDPA, pooling starts at 2 rows
    lone = 1 if native.library() is not None else 3
    assert pooled_calls and max(pooled_calls) == 5 and min(pooled_calls) == lone
    worst = max(float((a - b).abs().max()) for x, y in zip(own, pooled) for a, b in zip(x, y))
    assert worst < 1e-4
    assert all(torch.equal(a.argmax(-1), b.argmax(-1)) for x, y in zip(own, pooled) for a, b in zip(x, y))


def test_the_exact_engine_never_pools(tiny_llama):
    engine = Engine(tiny_llama.model)
    engine.start_batching(4, thread=False)
    try:
        state = _prefill(engine, [tiny_llama.tokenizer("Hello").input_ids])
        assert state.cache.pool is None and engine.slot_pool is None
    finally:
        engine.stop_batching()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_generate_many_on_the_fast_kernels_returns_the_ids_alone(fixture, request):
    loaded = request.getfixturevalue(fixture)
    lm = decodelab.LM(loaded.model, loaded.tokenizer, loaded.name, engine=Engine(loaded.model, kernels="fast"))
    requests = [{"prompt": p, "max_new_tokens": n} for p, n in
                (("It was a dark and stormy", 12), ("Hi", 9), ("The capital of France is", 14), ("def f(x):", 7))]
    requests.append({"prompt": "Once upon a time", "max_new_tokens": 8, "num_beams": 3})
    requests.append({"prompt": "Hello, my name is", "max_new_tokens": 10, "do_sample": True, "seed": 3})
    alone = [lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    together = lm.generate_many(requests, max_batch_size=8)
    for a, b in zip(alone, together):
        assert [s.ids for s in a.sequences] == [s.ids for s in b.sequences]
        assert [s.score for s in a.sequences] == pytest.approx([s.score for s in b.sequences], abs=1e-4)
