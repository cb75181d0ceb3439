"""Continuous batching: requests share decode steps, and every answer is bit for bit the answer alone.

Engine level: ``Engine.step_many`` over requests with different row counts, prompt lengths and left padding gives
each request exactly the logits of ``Engine.step`` alone (largest difference 0.0). API level: ``LM.generate_many``
(greedy, beam search with a repetition penalty, seeded sampling with several samples, stop strings, traces) returns
exactly the sequences, scores and finish reasons of ``LM.generate`` alone, on tiny random Llama / Qwen2 models and on
the real embedded SmolLM2-135M; the model is only ever called from the scheduler thread; requests that leave early
free their rows.
"""

from __future__ import annotations

import threading

import pytest
import torch

import decodelab
from decodelab.engine import DecodeState, Engine
from decodelab.errors import ConfigError, InputError
from decodelab.fastpath import rows


def make_lm(loaded) -> decodelab.LM:
    return decodelab.LM(loaded.model, loaded.tokenizer, loaded.name)


def clone(state: DecodeState) -> DecodeState:
    return DecodeState(state.cache.clone(), None, state.positions.clone())


def prefill(engine: Engine, prompts: list[list[int]], pad_id: int, rows_each: int = 1) -> DecodeState:
    """Left-padded prefill of ``prompts`` (each repeated ``rows_each`` times, as beam search / n samples do)."""
    from decodelab.search.common import PromptBatch

    batch = PromptBatch.from_lists(prompts, pad_id).repeat(rows_each)
    _, state = engine.prefill(batch.ids, batch.mask, max_new_tokens=8)
    return state


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_step_many_equals_each_request_alone_bit_for_bit(fixture, request):
    loaded = request.getfixturevalue(fixture)
    engine = Engine(loaded.model)
    assert engine.fast is not None and engine.kernels == "exact"
    tok = loaded.tokenizer
    pad = tok.pad_token_id
    ids = lambda text: tok(text).input_ids  # noqa: E731
    states = [
        prefill(engine, [ids("It was a dark and stormy")], pad),                      # 1 row
        prefill(engine, [ids("Hi")], pad),                                              # 1 row, short
        prefill(engine, [ids("The capital of France is"), ids("Hello")], pad),          # 2 rows, left padding
        prefill(engine, [ids("Once upon a time there was")], pad, rows_each=3),         # 3 rows (beam-like)
        prefill(engine, [ids("def fib(n):")], pad),                                     # 1 row
    ]
    alone = [clone(s) for s in states]
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(4):
        tokens = [torch.randint(0, 1000, (s.positions.shape[0],), generator=gen) for s in states]
        together = engine.step_many(states, tokens)
        for s, t, got in zip(alone, tokens, together):
            ref = engine.step(s, t)
            worst = max(worst, float((ref - got).abs().max()))
            assert torch.equal(ref, got)
    assert worst == 0.0


def test_grouped_gemv_is_exact_here_for_the_embedded_shapes(embedded):
    """The measured precondition of the exact grouped products, on this machine's BLAS: each of SmolLM2's weight
    shapes (with and without a bias) gives one-row results bit for bit."""
    engine = Engine(embedded.model)
    layer = engine.fast.layers[0]
    for proj in (layer.q, layer.k, layer.o, layer.gate, layer.down, engine.fast.lm_head):
        assert rows.grouped_gemv_is_exact(proj.weight, None)
        assert rows.grouped_gemv_is_exact(proj.weight, torch.ones(proj.weight.shape[0]))


def test_grouped_gemv_cuts_a_large_weight_into_chunks_without_changing_a_result(monkeypatch):
    """A weight over ``GEMV_CHUNK_BYTES`` runs as several ``bmm`` calls of ``gemv_chunk_rows`` rows (the output
    layer of a real vocabulary): the same numbers as one call over the whole weight."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(1000, 64, generator=gen), torch.randn(1000, generator=gen)
    x = torch.randn(5, 1, 64, generator=gen)
    whole = rows.grouped_gemv(x, weight, bias)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(b.shape[-1]) or bmm(a, b))
    monkeypatch.setattr(rows, "GEMV_CHUNK_BYTES", 300 * 64 * 4)
    assert rows.gemv_chunk_rows(weight) == 300
    assert torch.equal(rows.grouped_gemv(x, weight, bias), whole)
    assert calls == [300, 300, 300, 100]


REQUESTS = [
    {"prompt": "It was a dark and stormy", "max_new_tokens": 12},
    {"prompt": "The capital of France is", "max_new_tokens": 9, "repetition_penalty": 1.5},
    {"prompt": "It was a dark and stormy", "max_new_tokens": 10, "num_beams": 3, "repetition_penalty": 2.0,
     "num_return_sequences": 2},
    {"prompt": "Once upon a time", "max_new_tokens": 11, "do_sample": True, "seed": 7, "top_p": 0.9,
     "num_return_sequences": 2},
    {"prompt": "Hello, my name is", "max_new_tokens": 14, "do_sample": True, "seed": 3, "temperature": 0.8,
     "top_k": 40, "stop_strings": ["."], "trace": True},
    {"prompt": ["In 1492, Columbus", "The best way to learn"], "max_new_tokens": 8, "no_repeat_ngram_size": 2},
]


def check_same(lm: decodelab.LM, requests, max_batch_size: int = 16):
    alone = [lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    scheduler_stats = {}

    real_start = lm.engine.start_batching

    def spy_start(*args, **kwargs):
        scheduler_stats["scheduler"] = real_start(*args, **kwargs)
        return scheduler_stats["scheduler"]

    lm.engine.start_batching = spy_start
    try:
        together = lm.generate_many(requests, max_batch_size=max_batch_size)
    finally:
        del lm.engine.start_batching
    assert lm.engine.scheduler is None  # stopped after the call
    for a, b in zip(alone, together):
        assert [s.ids for s in a.sequences] == [s.ids for s in b.sequences]
        assert [s.score for s in a.sequences] == [s.score for s in b.sequences]
        assert [s.finish_reason for s in a.sequences] == [s.finish_reason for s in b.sequences]
        assert [s.new_text for s in a.sequences] == [s.new_text for s in b.sequences]
        if a.trace is not None:
            assert [(st.id, st.logprob, st.logprob_processed) for st in a.trace.steps] == \
                   [(st.id, st.logprob, st.logprob_processed) for st in b.trace.steps]
    return scheduler_stats["scheduler"]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_generate_many_equals_generate_alone_tiny(fixture, request):
    lm = make_lm(request.getfixturevalue(fixture))
    scheduler = check_same(lm, REQUESTS)
    assert scheduler.max_rows > 1  # requests really shared decode steps
    assert scheduler.rows_stepped > scheduler.steps


@pytest.mark.slow
def test_generate_many_equals_generate_alone_embedded(embedded):
    lm = make_lm(embedded)
    scheduler = check_same(lm, REQUESTS)
    assert scheduler.max_rows >= 4


def test_max_batch_size_bounds_the_rows_of_a_step(tiny_llama):
    lm = make_lm(tiny_llama)
    reqs = [{"prompt": p, "max_new_tokens": 6} for p in ("a", "b c", "d e f", "g", "h i")]
    scheduler = check_same(lm, reqs, max_batch_size=2)
    assert scheduler.max_rows == 2


def test_the_model_is_only_called_from_the_scheduler_thread(tiny_qwen2):
    lm = make_lm(tiny_qwen2)
    threads = set()
    fast = lm.engine.fast
    real = fast.forward_many

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    fast.forward_many = spy
    try:
        lm.generate_many(["It was", "The capital", "Once upon"], max_new_tokens=4)
    finally:
        del fast.forward_many
    assert threads == {threading.current_thread().name}  # generate_many runs the scheduler's loop in this thread
    # with batching already on, the scheduler's own thread does
    threads.clear()
    fast.forward_many = spy
    try:
        with lm.batching(4):
            lm.generate_many(["It was", "The capital", "Once upon"], max_new_tokens=4)
    finally:
        del fast.forward_many
    assert threads == {"decodelab-scheduler"}


@pytest.mark.timeout(180)  # before the fix this hung: the model's thread waited for its own tasks
def test_generate_many_from_inside_a_scheduler_task_pauses_the_task_instead_of_blocking_the_loop(tiny_llama):
    lm = make_lm(tiny_llama)
    reqs = [{"prompt": p, "max_new_tokens": 5} for p in ("It was", "The capital", "Once upon")]
    alone = [lm.generate(r["prompt"], max_new_tokens=5).sequences[0].ids for r in reqs]
    with lm.batching(4) as scheduler:
        # a request's own code (a task in the model's thread) that fans out: waiting on the results in the thread
        # would stop the loop that makes them
        inner = scheduler.spawn(lambda: [g.sequences[0].ids for g in lm.generate_many(reqs, max_batch_size=2)])
        assert inner.result(timeout=60) == alone
        assert scheduler.tasks == 4  # the caller and its three requests, all tasks of the one scheduler


def test_a_bad_request_is_refused_before_anything_runs(tiny_llama):
    lm = make_lm(tiny_llama)
    with pytest.raises(ConfigError, match=r"^requests\[1\]: .*top_p"):
        lm.generate_many(["fine", {"prompt": "bad", "top_p": 7.0}])
    with pytest.raises(InputError, match=r"requests\[0\]: a dict needs a 'prompt'"):
        lm.generate_many([{"max_new_tokens": 3}])
    with pytest.raises(InputError, match="at least one request"):
        lm.generate_many([])
    assert lm.engine.scheduler is None


def test_a_stream_closed_early_frees_its_rows(tiny_llama):
    lm = make_lm(tiny_llama)
    with lm.batching(8) as scheduler:
        stream = lm.stream("It was a dark and stormy", max_new_tokens=40, ignore_eos=True)
        first = next(iter(stream))
        assert isinstance(first, str)
        stream.close()
        assert scheduler._active == set()
        # the scheduler goes on serving others, with the same answer as alone
        out = lm.generate("Hello", max_new_tokens=5)
    assert out.sequences[0].ids == lm.generate("Hello", max_new_tokens=5).sequences[0].ids


def test_a_stream_that_asks_during_a_step_joins_the_next_one_instead_of_alternating():
    """Stream B asks for its first step while stream A's step runs (a step longer than ``gather_s``). B must wait
    for A to ask again, not run alone as soon as A's step ends: counting its wait from its own request, B ran alone,
    then A alone while B computed, and the two took turns one row per step to the end (measured with two clients:
    14 steps of 1 row for 14 tokens)."""
    import time

    from decodelab.scheduler import Scheduler

    class SlowEngine:
        def step_many(self, states, tokens):
            time.sleep(0.12)
            return [torch.zeros((t.shape[0], 4)) for t in tokens]

    scheduler = Scheduler(SlowEngine(), max_batch_size=4, gather_s=0.05)
    a, b = object(), object()

    def stream(state, delay: float) -> None:
        time.sleep(delay)
        for _ in range(6):
            scheduler.step(state, torch.tensor([1]))
            time.sleep(0.002)  # the request's own search step
        scheduler.release(state)

    threads = [threading.Thread(target=stream, args=(a, 0.0)), threading.Thread(target=stream, args=(b, 0.04))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scheduler.close()
    assert scheduler.max_rows == 2
    assert scheduler.steps <= 7  # A's first step alone, then together (12 alternating)


def test_a_burst_of_prompts_is_prefilled_before_the_next_step_and_a_lone_prompt_waits_its_share():
    """Four prompts arrive while one stream decodes (more waiting than WAITING_SERVED_RATIO x 1 decoding): all four
    are prefilled back to back before its next step, so they join the batch together. Each pass is longer than the
    step's share (PASS_SHARE x 0.2 s), so without the rule one pass would run per step."""
    import time

    from decodelab.scheduler import Scheduler

    log: list[str] = []
    burst = threading.Event()

    class SlowEngine:
        def step_many(self, states, tokens):
            log.append("step")
            if log.count("step") == 2:
                burst.set()
                time.sleep(0.2)  # the prompts queue meanwhile
            else:
                time.sleep(0.01)
            return [torch.zeros((t.shape[0], 4)) for t in tokens]

    scheduler = Scheduler(SlowEngine(), max_batch_size=8, gather_s=0.05)
    stream_state = object()

    def stream() -> None:
        for _ in range(30):
            scheduler.step(stream_state, torch.tensor([1]))
            time.sleep(0.002)
        scheduler.release(stream_state)

    def prompt(name: str) -> None:
        scheduler.run_pass(lambda: log.append(name) or time.sleep(0.3))

    runner = threading.Thread(target=stream)
    runner.start()
    assert burst.wait(10)
    prompts = [threading.Thread(target=prompt, args=(f"burst{i}",)) for i in range(4)]
    for t in prompts:
        t.start()
    for t in prompts:
        t.join()
    runner.join()
    scheduler.close()
    first = log.index("burst0")
    assert log[first : first + 4] == ["burst0", "burst1", "burst2", "burst3"]  # no step between them
    assert log[first - 1] == "step" and log[first + 4] == "step"


def test_an_idle_scheduler_keeps_no_decode_state_alive():
    """Once a request is done, nothing in the scheduler refers to its decode state: its KV cache (a slot of the shared
    pool, off the exact path) is freed at once, not when the next step runs (the loop's last taken steps held it)."""
    import gc
    import weakref

    from decodelab.scheduler import Scheduler

    class Engine1:
        def step_many(self, states, tokens):
            return [torch.zeros((t.shape[0], 4)) for t in tokens]

    class State:
        pass

    scheduler = Scheduler(Engine1(), max_batch_size=4, gather_s=0.01)
    state = State()
    alive = weakref.ref(state)
    for _ in range(3):
        scheduler.step(state, torch.tensor([1]))
    scheduler.release(state)
    del state
    gc.collect()
    try:
        assert alive() is None
    finally:
        scheduler.close()


def test_requests_asking_for_a_step_wake_the_loop_once_per_gather_not_once_each():
    """A request asking for its step wakes the scheduler's loop only when it starts a gather (the loop then waits
    until the step is due) or completes one. Each wake-up takes the GIL from the requests' own search steps, and
    with one notification per request the loop woke 16 times per 16-row step."""
    import time

    from decodelab.scheduler import Scheduler

    class Engine1:
        def step_many(self, states, tokens):
            time.sleep(0.005)
            return [torch.zeros((t.shape[0], 4)) for t in tokens]

    requests, steps_each = 8, 10
    scheduler = Scheduler(Engine1(), max_batch_size=requests, gather_s=1.0)
    notified = []
    notify_all = scheduler._cond.notify_all

    def counting_notify_all():
        notified.append(1)
        notify_all()

    scheduler._cond.notify_all = counting_notify_all
    go = threading.Barrier(requests)

    def stream() -> None:
        state = object()
        go.wait()
        for _ in range(steps_each):
            scheduler.step(state, torch.tensor([1]))
        scheduler.release(state)

    threads = [threading.Thread(target=stream) for _ in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scheduler.close()
    asks = requests * steps_each
    assert scheduler.rows_stepped == asks
    # at most a start and an end per step, a first ask per request (it joins the active set), one per release, and
    # close(); one notification per ask would be 80 + 8 + 1
    assert len(notified) <= 2 * scheduler.steps + 2 * requests + 1 < asks


def test_scheduler_settings_are_validated(tiny_llama):
    engine = Engine(tiny_llama.model)
    with pytest.raises(ConfigError, match="max_batch_size"):
        engine.start_batching(0)
    with pytest.raises(ConfigError, match="gather_s"):
        engine.start_batching(4, gather_s=-1)
    assert engine.scheduler is None


@pytest.mark.slow
def test_a_long_prompt_joins_a_layer_at_a_time_while_a_stream_keeps_going(embedded):
    """A ~700-token prompt joins while another request decodes: its prefill is cut between decoder layers, the
    running request gets decode steps during it, and both answers are bit for bit those alone."""
    lm = make_lm(embedded)
    long_prompt = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    running = {"prompt": "It was a dark and stormy", "max_new_tokens": 24, "ignore_eos": True}
    joining = {"prompt": long_prompt, "max_new_tokens": 3}
    alone = [lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in (running, joining)]
    assert len(lm.prompt_ids(long_prompt)) > 600
    results = {}
    with lm.batching(8) as scheduler:
        worker = threading.Thread(target=lambda: results.setdefault("running", lm.generate(
            running["prompt"], max_new_tokens=24, ignore_eos=True)))
        worker.start()
        while scheduler.steps < 2:  # the first request is decoding
            threading.Event().wait(0.005)
        results["joining"] = lm.generate(long_prompt, max_new_tokens=3)
        worker.join()
    for a, key in zip(alone, ("running", "joining")):
        assert results[key].sequences[0].ids == a.sequences[0].ids
        assert results[key].sequences[0].score == a.sequences[0].score
    n_layers = lm.model.config.num_hidden_layers
    assert scheduler.slices >= n_layers  # the long prefill went a layer at a time ...
    assert scheduler.steps_within_passes >= 1  # ... and the running request stepped between its layers


def _plain_model(arch: str, vocab_size: int):
    """A seeded tiny random model of one of these architectures (Qwen3, Mistral and Phi-3 also have the fast path;
    the tests here build their engines with ``fast=False`` to exercise the plain path's batching)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    config = {
        "qwen3": lambda: (tf.Qwen3Config(**common, head_dim=16), tf.Qwen3ForCausalLM),
        "mistral": lambda: (tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM),
        "phi3": lambda: (tf.Phi3Config(**common, pad_token_id=0), tf.Phi3ForCausalLM),
        "gemma3": lambda: (tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=4), tf.Gemma3ForCausalLM),
    }[arch]
    cfg, cls = config()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "phi3", "gemma3"])
def test_plain_path_step_many_merges_left_padded_caches(arch, tiny_llama):
    """Plain-path models batch too: their DynamicCaches are merged left-padded into one forward and filtered back.
    Full-attention caches (Qwen3, Mistral, Phi-3) are merged (logits within 1e-5 of alone); Gemma 3's sliding-window
    layers are not mergeable and step one request after another (bit for bit alone)."""
    from decodelab.padded_batch import mergeable

    model = _plain_model(arch, 1000)
    engine = Engine(model, fast=False)
    assert engine.fast is None
    pad = 0
    make = lambda: [prefill(engine, [[5, 6, 7, 8, 9]], pad), prefill(engine, [[11, 12]], pad),  # noqa: E731
                    prefill(engine, [[3, 4, 5, 6], [7, 8]], pad), prefill(engine, [list(range(1, 11))], pad, 3)]
    states, alone = make(), make()
    assert all(mergeable(s.cache) for s in states) == (arch != "gemma3")
    calls = []
    real = engine._forward
    engine._forward = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(4):
        tokens = [torch.randint(0, 1000, (s.positions.shape[0],), generator=gen) for s in states]
        together = engine.step_many(states, tokens)
        for s, t, got in zip(alone, tokens, together):
            ref = real_step(engine, real, s, t)
            assert got.shape == ref.shape
            worst = max(worst, float((ref - got).abs().max()))
        if arch == "gemma3":
            assert calls[-4:] == [1, 1, 2, 3]  # one request at a time
        else:
            assert calls[-1] == 7  # all rows in one forward
        assert all(s.attention_mask.shape == a.attention_mask.shape for s, a in zip(states, alone))
    assert worst < 1e-5
    if arch == "gemma3":
        assert worst == 0.0


def real_step(engine: Engine, forward, state, tokens):
    """``engine._step`` with the model's real forward (the test spies on ``engine._forward``)."""
    spy = engine._forward
    engine._forward = forward
    try:
        return engine._step(state, tokens)
    finally:
        engine._forward = spy


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_plain_path_generate_many_equals_alone(arch, tiny_llama, monkeypatch):
    """Greedy, beam search with a repetition penalty and seeded sampling on a merged plain-path batch give the
    ids of each request alone (tiny random models: no near-ties at float rounding)."""
    lm = decodelab.LM(_plain_model(arch, len(tiny_llama.tokenizer)), tiny_llama.tokenizer, arch)
    lm.engine = Engine(lm.model, fast=False)
    requests = [
        {"prompt": "It was a dark and stormy", "max_new_tokens": 8},
        {"prompt": "Hello", "max_new_tokens": 6, "num_beams": 3, "repetition_penalty": 2.0},
        {"prompt": "Once upon a time", "max_new_tokens": 7, "do_sample": True, "seed": 5, "top_k": 20,
         "num_return_sequences": 2},
    ]
    alone = [lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    from decodelab import padded_batch

    merged_rows = []
    real = padded_batch.merged_step
    monkeypatch.setattr(padded_batch, "merged_step",
                        lambda f, states, tokens: merged_rows.append(sum(len(t) for t in tokens)) or real(f, states,
                                                                                                        tokens))
    together = lm.generate_many(requests)
    assert max(merged_rows) == 6  # 1 + 3 beams + 2 samples in one forward
    for a, b in zip(alone, together):
        assert [s.ids for s in a.sequences] == [s.ids for s in b.sequences]
        assert [s.score for s in a.sequences] == pytest.approx([s.score for s in b.sequences], abs=1e-4)


def test_a_compiled_engine_batches_several_requests_in_one_eager_pass(tiny_llama, tmp_path, monkeypatch):
    """With ``compile`` (AOTInductor, freezing, no autotuning: short), a lone request's steps run compiled and a step
    of several requests runs as one eager pass (``forward_many``) instead of one compiled step per request; the
    answers equal each request alone (compiled) to float rounding: same ids, scores within 1e-4."""
    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path))
    lm = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name,
                      engine=Engine(tiny_llama.model, compile={"freezing": True}))
    requests = [{"prompt": "It was a dark and stormy", "max_new_tokens": 10},
                {"prompt": "The capital of France is", "max_new_tokens": 7, "repetition_penalty": 1.5},
                {"prompt": "Once upon a time", "max_new_tokens": 6, "num_beams": 3},
                {"prompt": "Hello, my name is", "max_new_tokens": 8, "do_sample": True, "seed": 3}]
    alone = [lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    compiled_shapes = set(lm.engine.compiled.stats)
    assert (1, 256) in compiled_shapes and (3, 256) in compiled_shapes
    assert all(stat["ok"] for stat in lm.engine.compiled.stats.values())
    passes = []
    real = lm.engine.fast.forward_many
    monkeypatch.setattr(lm.engine.fast, "forward_many", lambda items, **kw: passes.append(len(items))
                        or real(items, **kw))
    together = lm.generate_many(requests, max_batch_size=8)
    assert max(passes) == len(requests)  # all four requests in one eager decode pass
    for a, b in zip(alone, together):
        assert [s.ids for s in a.sequences] == [s.ids for s in b.sequences]
        assert [s.score for s in a.sequences] == pytest.approx([s.score for s in b.sequences], abs=1e-4)
