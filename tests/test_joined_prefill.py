"""Prompts that join a decode step (off the exact path): one forward pass for a step's rows and whole prompts
(``FastDecoder.forward_mixed`` / ``Engine.step_and_prefill``, scheduled by ``scheduler.JOIN_TOKENS`` and, for a burst,
``scheduler.BURST_JOIN_TOKENS``).

Checked here: the joined pass gives every decode row and every prompt the logits of a separate step and prefill to
float rounding (the products see more rows), with the same argmax, pooled one-row requests with a hole in the slot
range and a multi-row padded request beside them; a joined prompt's cache is a pool slot and decodes on as the prompt
prefilled alone; the exact engine never joins (its products must see each request's rows alone) and
``forward_mixed`` refuses there; a prompt arriving while another request decodes joins a step, and a burst of prompts
runs as one pass, with every answer (greedy, seeded sampling) equal to the request alone, on tiny models and the real
embedded SmolLM2-135M.
"""

from __future__ import annotations

import threading

import pytest
import torch

import decodelab
from decodelab.engine import DecodeState, Engine
from decodelab.search.common import PromptBatch


def _prefill(engine: Engine, ids: list[list[int]], rows_each: int = 1) -> DecodeState:
    batch = PromptBatch.from_lists(ids, 0).repeat(rows_each)
    return engine.prefill(batch.ids, batch.mask, max_new_tokens=12)[1]


def _copy(state: DecodeState) -> DecodeState:
    """The state with a cache of its own (a copy of the pooled slot's contents)."""
    return DecodeState(state.cache.clone(), None, state.positions.clone())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_a_joined_pass_gives_the_logits_of_a_separate_step_and_prefill(fixture, request):
    loaded = request.getfixturevalue(fixture)
    engine = Engine(loaded.model, kernels="fast")
    tok = loaded.tokenizer
    running = [tok(t).input_ids for t in ("It was a dark and stormy", "Hi", "The capital of France is",
                                          "Once upon a time there")]
    joining = [tok(t).input_ids for t in ("def f(x):", "Hello, my name is")]
    engine.start_batching(8, thread=False)  # this thread drives it, with the pool
    try:
        singles = [_prefill(engine, [p]) for p in running]
        padded = _prefill(engine, [running[0], running[1]])  # two rows, left padding: a cache of its own
        assert all(s.cache.pool is not None for s in singles) and padded.cache.pool is None
        chosen = [singles[0], singles[2], singles[3], padded]  # slot 1 sits this step out: a hole
        gen = torch.Generator().manual_seed(1)
        tokens = [torch.randint(0, 1000, (s.positions.shape[0],), generator=gen) for s in chosen]
        copies = [_copy(s) for s in chosen]
        separate = engine.step_many(copies, tokens)
        alone = [engine.prefill(torch.tensor([p]), torch.ones((1, len(p)), dtype=torch.long), 12) for p in joining]
        prompts = [engine.joining_prompt(torch.tensor([p]), torch.ones((1, len(p)), dtype=torch.long), 12)
                   for p in joining]
        assert all(p is not None and p.cache.pool is not None for p in prompts)
        joined, prefilled = engine.step_and_prefill(chosen, tokens, prompts)
        pairs = list(zip(separate, joined)) + [(a[0], b[0]) for a, b in zip(alone, prefilled)]
        assert [tuple(b.shape) for _, b in pairs] == [tuple(a.shape) for a, _ in pairs]
        assert max(float((a - b).abs().max()) for a, b in pairs) < 1e-4
        assert all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in pairs)
        # the joined prompts decode on as the same prompts prefilled alone
        for (_, state_alone), (_, state_joined) in zip(alone, prefilled):
            assert state_joined.cache.length == state_alone.cache.length
            assert torch.equal(state_joined.positions, state_alone.positions)
            for t in (5, 17, 3):
                a = engine.step(state_alone, torch.tensor([t]))
                b = engine.step(state_joined, torch.tensor([t]))
                assert float((a - b).abs().max()) < 1e-4 and torch.equal(a.argmax(-1), b.argmax(-1))
        # prompts only, no decode rows (a burst)
        prompts = [engine.joining_prompt(torch.tensor([p]), torch.ones((1, len(p)), dtype=torch.long), 12)
                   for p in joining]
        none, prefilled = engine.step_and_prefill([], [], prompts)
        assert none == []
        for (a, _), (b, _) in zip(alone, prefilled):
            assert float((a - b).abs().max()) < 1e-4 and torch.equal(a.argmax(-1), b.argmax(-1))
    finally:
        engine.stop_batching()


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_a_joined_pass_keeps_sliding_windows(arch):
    """Sliding-window layers (Gemma 3's soft-capped S,S,F pattern, Phi-3's stacked projections with a window on every
    layer), prompts and caches longer than the window of 4: a joined pass still gives each row and prompt the logits
    of a separate step and prefill."""
    from test_fastpath_windows import tiny_gemma3, tiny_windowed

    model = tiny_gemma3() if arch == "gemma3" else tiny_windowed("phi3")
    engine = Engine(model, kernels="fast")
    gen = torch.Generator().manual_seed(2)
    running = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (9, 3, 12)]
    joining = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (7, 2)]
    engine.start_batching(8, thread=False)
    try:
        states = [_prefill(engine, [p]) for p in running]
        tokens = [torch.tensor([11]), torch.tensor([12]), torch.tensor([13])]
        for _ in range(3):  # past the window
            engine.step_many(states, tokens)
        separate = engine.step_many([_copy(s) for s in states], tokens)
        alone = [engine.prefill(torch.tensor([p]), torch.ones((1, len(p)), dtype=torch.long), 12)[0] for p in joining]
        prompts = [engine.joining_prompt(torch.tensor([p]), torch.ones((1, len(p)), dtype=torch.long), 12)
                   for p in joining]
        joined, prefilled = engine.step_and_prefill(states, tokens, prompts)
        pairs = list(zip(separate, joined)) + [(a, b[0]) for a, b in zip(alone, prefilled)]
        assert max(float((a - b).abs().max()) for a, b in pairs) < 1e-4
        assert all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in pairs)
    finally:
        engine.stop_batching()


def test_the_exact_engine_never_joins(tiny_llama):
    engine = Engine(tiny_llama.model)
    ids = torch.tensor([tiny_llama.tokenizer("Hello there").input_ids])
    assert engine.joining_prompt(ids, torch.ones_like(ids), 4) is None
    cache = engine.fast.new_cache(1, 8)
    cache.start(torch.ones_like(ids))
    with pytest.raises(ValueError, match="exact path"):
        engine.fast.forward_mixed([], [(ids, torch.arange(ids.shape[1])[None], cache)])


def test_left_padded_multi_row_or_empty_prompts_do_not_join(tiny_llama):
    engine = Engine(tiny_llama.model, kernels="fast")
    batch = PromptBatch.from_lists([[5, 6, 7], [8]], 0)
    assert engine.joining_prompt(batch.ids, batch.mask, 4) is None  # two rows
    assert engine.joining_prompt(batch.ids[1:], batch.mask[1:], 4) is None  # left padding
    assert engine.joining_prompt(batch.ids[:1, :0], batch.mask[:1, :0], 4) is None  # no token
    assert engine.joining_prompt(batch.ids[:1], batch.mask[:1], 4) is not None


def _joins_while_decoding(lm: decodelab.LM, running: dict, joining: list[dict]):
    """``running`` starts alone; once it has decoded two steps, the ``joining`` requests are made one after another
    (each alone beside it). Every request runs as a task of the scheduler (``Scheduler.spawn``), as the server's and
    ``generate_many``'s do. Returns (results in order: running then joining, the scheduler)."""
    def run(r: dict):
        return lambda: lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"})

    with lm.batching(8) as scheduler:
        first = scheduler.spawn(run(running))
        while scheduler.steps < 2:  # the first request is decoding
            threading.Event().wait(0.002)
        results = [scheduler.spawn(run(r)).result(timeout=120) for r in joining]
        results.insert(0, first.result(timeout=120))
    return results, scheduler


JOINING = [
    {"prompt": "The capital of France is", "max_new_tokens": 8},
    {"prompt": "Hello, my name is", "max_new_tokens": 8, "do_sample": True, "seed": 3, "top_k": 40},
]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "embedded"])
def test_a_prompt_arriving_while_another_decodes_joins_a_step_and_answers_as_alone(fixture, request, monkeypatch):
    loaded = request.getfixturevalue(fixture)
    lm = decodelab.LM(loaded.model, loaded.tokenizer, loaded.name, engine=Engine(loaded.model, kernels="fast"))
    running = {"prompt": "It was a dark and stormy", "max_new_tokens": 40, "ignore_eos": True}
    alone = [lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in [running, *JOINING]]
    calls = []
    real = lm.engine.step_and_prefill
    monkeypatch.setattr(lm.engine, "step_and_prefill",
                        lambda states, tokens, prompts: calls.append((len(states), len(prompts)))
                        or real(states, tokens, prompts))
    together, scheduler = _joins_while_decoding(lm, running, JOINING)
    # the first prompt alone (nobody decoding), then each joining one inside a decode step of the running request
    assert calls == [(0, 1), (1, 1), (1, 1)]
    assert scheduler.joined == 3 and scheduler.max_rows == 2
    assert together[0].sequences[0].finish_reason == "length"  # it decoded all along
    for a, b in zip(alone, together):
        assert [s.ids for s in a.sequences] == [s.ids for s in b.sequences]
        assert [s.score for s in a.sequences] == pytest.approx([s.score for s in b.sequences], abs=1e-4)


def test_a_burst_of_prompts_runs_as_one_pass_and_answers_as_alone(embedded, monkeypatch):
    lm = decodelab.LM(embedded.model, embedded.tokenizer, embedded.name, engine=Engine(embedded.model,
                                                                                      kernels="fast"))
    requests = [{"prompt": p, "max_new_tokens": n} for p, n in
                (("It was a dark and stormy", 6), ("Hi", 5), ("The capital of France is", 7), ("def f(x):", 4))]
    requests.append({"prompt": "Once upon a time", "max_new_tokens": 5, "do_sample": True, "seed": 11})
    alone = [lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    calls = []
    real = lm.engine.step_and_prefill
    monkeypatch.setattr(lm.engine, "step_and_prefill",
                        lambda states, tokens, prompts: calls.append((len(states), len(prompts)))
                        or real(states, tokens, prompts))
    together = lm.generate_many(requests, max_batch_size=8)
    assert calls[0] == (0, len(requests))  # all five prompts in one pass, before any decode step
    for a, b in zip(alone, together):
        assert [s.ids for s in a.sequences] == [s.ids for s in b.sequences]


@pytest.mark.slow
def test_a_fast_kernels_server_joins_staggered_prompts_and_answers_as_alone(embedded, monkeypatch):
    """A ``kernels="fast"`` server (batching on by default) under 8 clients whose requests arrive staggered, so that
    prompts arrive while others decode: greedy and seeded completions, streams, ``n=2``, beam search (3 rows: its
    prompt does not join), streams whose client leaves after the first chunk and an invalid body. Every text equals
    the same request alone, none is a 5xx, prompts were prefilled inside decode steps, and the requests of the
    clients that left end."""
    import asyncio
    import random

    import httpx

    from decodelab.server import Settings, create_app
    from decodelab.server.background import BackgroundServer

    lm = decodelab.LM(embedded.model, embedded.tokenizer, embedded.name, engine=Engine(embedded.model,
                                                                                      kernels="fast"))
    calls = []
    real = lm.engine.step_and_prefill
    monkeypatch.setattr(lm.engine, "step_and_prefill",
                        lambda states, tokens, joining: calls.append((len(states), len(joining)))
                        or real(states, tokens, joining))
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Water boils at", "def add(a, b):"]
    bodies = []
    for i, p in enumerate(prompts):
        bodies.append({"prompt": p, "max_tokens": 12, "temperature": 0})
        bodies.append({"prompt": p, "max_tokens": 10, "temperature": 0.8, "seed": i, "n": 2})
        bodies.append({"prompt": p, "max_tokens": 10, "temperature": 0, "stream": True})
        bodies.append({"prompt": p, "max_tokens": 6, "temperature": 0, "num_beams": 3})
        bodies.append({"prompt": p, "max_tokens": 16, "temperature": 0, "leave": True})
    bodies.append({"prompt": "x", "max_tokens": 4, "temperature": -1})

    async def call(client: httpx.AsyncClient, body: dict):
        if body.get("leave"):  # a streaming client that goes away after its first chunk
            sent = {k: v for k, v in body.items() if k != "leave"} | {"stream": True}
            async with client.stream("POST", "/v1/completions", json=sent) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        return "left"
            return r.status_code
        if body.get("stream"):
            text = ""
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        import json

                        text += json.loads(line[6:])["choices"][0]["text"]
            return text
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code
        return [c["text"] for c in r.json()["choices"]]

    with BackgroundServer(create_app(lm, Settings(max_tokens=16, max_queue=64))) as srv:
        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
                alone = [await call(client, b) for b in bodies]
                calls.clear()  # alone, each prompt had a pass of its own
                rng = random.Random(0)
                order = [rng.randrange(len(bodies)) for _ in range(48)]
                queue = list(enumerate(order))
                got: dict[int, object] = {}

                async def worker(k: int):
                    await asyncio.sleep(0.15 * k)  # staggered: later prompts arrive while earlier ones decode
                    while queue:
                        slot, which = queue.pop()
                        got[slot] = await call(client, bodies[which])

                await asyncio.gather(*(worker(k) for k in range(8)))
                return alone, order, got

        alone, order, got = asyncio.run(main())
        for _ in range(100):  # a request whose client left ends at its next token
            health = httpx.get(srv.url + "/health", timeout=30).json()
            if health["running"] == 0:
                break
            threading.Event().wait(0.1)
    assert alone[-1] == 400 and all(isinstance(a, (list, str)) for a in alone[:-1])
    assert [got[s] for s in range(len(order))] == [alone[w] for w in order]
    assert health["batching"]["joined"] >= 1 and health["batching"]["max_rows"] > 1
    assert health["running"] == 0 and health["queued"] == 0  # the clients that left freed their requests
    assert any(rows and joining for rows, joining in calls)  # prompts prefilled inside decode steps
