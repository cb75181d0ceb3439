"""The OpenAI routes, driven by the official ``openai`` client against a real uvicorn server over the embedded
SmolLM2-135M-Instruct; every answer is compared with what ``LM.generate`` / ``LM.score`` return in-process."""

from __future__ import annotations

import math

import openai
import pytest

import decodelab
from decodelab.server import Settings, create_app
from decodelab.server.background import BackgroundServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def lm(embedded):
    return decodelab.LM(embedded.model, embedded.tokenizer, embedded.name)


@pytest.fixture(scope="module")
def client(lm):
    with BackgroundServer(create_app(lm, Settings(max_tokens=64))) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _check_alternatives(chosen_logprob: float, chosen_token: str, top: list[tuple[str, float]], k: int) -> None:
    """Exactly k alternatives, sorted, finite, distinct; the chosen token's value equals its entry when listed."""
    assert len(top) == k
    values = [lp for _, lp in top]
    assert values == sorted(values, reverse=True)
    assert all(math.isfinite(v) and v <= 0 for v in values)
    assert len({t for t, _ in top}) == k
    listed = dict(top)
    if chosen_token in listed:
        assert listed[chosen_token] == chosen_logprob


def test_models_lists_the_loaded_model(client, lm):
    assert [m.id for m in client.models.list().data] == [lm.name]


def test_completion_greedy_with_logprobs_matches_the_trace(client, lm):
    r = client.completions.create(model="anything", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    ref = lm.generate(PROMPT, max_new_tokens=6, trace=True, trace_top_k=3)
    seq = ref.sequences[0]
    choice = r.choices[0]
    assert r.model == lm.name and r.object == "text_completion"
    assert choice.text == seq.new_text and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_ids[0]) and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    lp = choice.logprobs
    assert len(lp.tokens) == 6
    assert lp.token_logprobs == [s.logprob for s in ref.trace.steps]  # raw distribution, before processing
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        _check_alternatives(value, token, list(top.items()), 3)
        assert max(top, key=top.get) == token  # greedy picks the raw argmax when no processor is on


def test_completion_echo_gives_prompt_logprobs(client, lm):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    choice = r.choices[0]
    ref = lm.generate(PROMPT, max_new_tokens=3)
    scored = lm.score(PROMPT, top_logprobs=2)
    n_prompt = len(scored.tokens)
    assert choice.text == PROMPT + ref.sequences[0].new_text
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, n_prompt):
        assert lp.token_logprobs[i] == pytest.approx(scored.tokens[i].logprob, abs=1e-4)
        _check_alternatives(lp.token_logprobs[i], lp.tokens[i], list(lp.top_logprobs[i].items()), 2)
    assert "".join(lp.tokens) == choice.text
    assert [choice.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    # max_tokens=0 + echo: scoring only (the lm-eval loglikelihood request)
    r0 = client.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0, temperature=0)
    assert r0.choices[0].text == PROMPT and len(r0.choices[0].logprobs.tokens) == n_prompt
    assert r0.choices[0].logprobs.top_logprobs[1] == {}


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and values == whole.logprobs.token_logprobs
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason


def test_stop_strings(client, lm):
    full = lm.generate(PROMPT, max_new_tokens=8).sequences[0].new_text
    assert "." in full  # " Paris.\n\n..." for SmolLM2: the stop string is reached
    for stop in (".", ["\n\nThe", "zzz"]):
        r = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, stop=stop, logprobs=1)
        first = stop if isinstance(stop, str) else stop[0]
        choice = r.choices[0]
        assert choice.text == full[: full.index(first)] and choice.finish_reason == "stop"
        assert "".join(choice.logprobs.tokens).startswith(choice.text)
        streamed = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, stop=stop,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_n_and_seed_reproducibility(client, lm):
    kw = dict(model="m", prompt="Once upon a time", max_tokens=8, temperature=0.9, n=3, seed=123)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    ref = lm.generate("Once upon a time", max_new_tokens=8, do_sample=True, temperature=0.9, top_k=0, seed=123,
                      num_return_sequences=3)
    assert texts == [s.new_text for s in ref.sequences]
    assert len(set(texts)) > 1  # three different samples (seeds 123, 124, 125)
    streamed = {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == texts
    # greedy n > 1: the one deterministic answer, n times
    g = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in g.choices] == [0, 1] and g.choices[0].text == g.choices[1].text


def test_list_of_prompts(client, lm):
    prompts = [PROMPT, "1, 2, 3,"]
    r = client.completions.create(model="m", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    expected = [lm.generate(p, max_new_tokens=4).sequences[0].new_text for p in prompts]
    assert [c.text for c in r.choices] == [expected[0], expected[0], expected[1], expected[1]]


def _chat_prompt(lm, messages):
    return lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_chat_with_top_logprobs(client, lm):
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=4)
    ref = lm.generate(_chat_prompt(lm, MESSAGES), max_new_tokens=8, trace=True, trace_top_k=4)
    seq = ref.sequences[0]
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == seq.new_text
    assert choice.finish_reason == ("length" if seq.finish_reason == "length" else "stop")
    entries = choice.logprobs.content
    listed = len(seq.new_ids) - (seq.finish_reason == "eos")
    assert len(entries) == listed
    assert [e.logprob for e in entries] == [s.logprob for s in ref.trace.steps[:listed]]
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert bytes(e.bytes).decode("utf-8") == e.token
        _check_alternatives(e.logprob, e.token, [(t.token, t.logprob) for t in e.top_logprobs], 4)
    assert r.usage.prompt_tokens == len(ref.prompt_ids[0])


def test_streamed_chat_equals_non_streamed(client):
    kw = dict(model="m", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert text == whole.message.content
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in whole.logprobs.content]
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.finish_reason]


def test_chat_seeded_sampling_n(client, lm):
    kw = dict(model="m", messages=MESSAGES, max_tokens=6, temperature=1.0, top_p=0.9, n=2, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    ref = lm.generate(_chat_prompt(lm, MESSAGES), max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9,
                      top_k=0, seed=7, num_return_sequences=2)
    assert [c.message.content for c in a.choices] == [s.new_text for s in ref.sequences]


def test_extensions_pass_through(client, lm):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"num_beams": 2, "repetition_penalty": 1.3})
    ref = lm.generate(PROMPT, max_new_tokens=6, num_beams=2, repetition_penalty=1.3)
    assert r.choices[0].text == ref.sequences[0].new_text


def test_client_sees_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="", max_tokens=2)
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="Hi", max_tokens=65)
    assert info.value.body["param"] == "max_tokens" and "65" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=MESSAGES, temperature=3)
    assert client.completions.create(model="m", prompt="Hi", max_tokens=1).choices[0].finish_reason


def test_logprobs_are_the_raw_distribution_whatever_the_filters(client, lm):
    """top_p / top_k / temperature / penalties change what is sampled, never how many alternatives are listed or
    their values: logprobs come from the model's raw distribution."""
    kw = dict(model="m", prompt="Once upon a time", max_tokens=5, temperature=0.7, top_p=0.05, seed=3, logprobs=5,
              presence_penalty=1.5, extra_body={"top_k": 2})
    choice = client.completions.create(**kw).choices[0]
    ref = lm.generate("Once upon a time", max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.05, top_k=2,
                      seed=3, presence_penalty=1.5, trace=True, trace_top_k=5)
    assert choice.text == ref.sequences[0].new_text
    lp = choice.logprobs
    assert lp.token_logprobs == [s.logprob for s in ref.trace.steps]
    for step, token, value, top in zip(ref.trace.steps, lp.tokens, lp.token_logprobs, lp.top_logprobs):
        _check_alternatives(value, token, list(top.items()), 5)
        assert list(top.values()) == [c.logprob for c in step.top]  # before processing, not step.top_processed


def test_client_token_id_prompts_and_openai_limits(client, lm):
    ids = lm.tokenize(PROMPT).ids
    r = client.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0)
    assert r.choices[0].text == lm.generate(PROMPT, max_new_tokens=4).sequences[0].new_text
    assert r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="m", prompt=[ids, ids[:3]], max_tokens=2, temperature=0)
    expected = [lm.generate(p, max_new_tokens=2).sequences[0].new_text for p in (ids, ids[:3])]
    assert [c.text for c in r.choices] == expected
    for kw, param in ((dict(prompt=[lm.vocab_size]), "prompt"),
                      (dict(prompt="Hi", logit_bias={"1": 150}), "logit_bias"),
                      (dict(prompt="Hi", stop=["a", "b", "c", "d", "e"]), "stop")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="m", max_tokens=1, **kw)
        assert info.value.status_code == 400 and info.value.body["param"] == param
        assert info.value.body["type"] == "invalid_request_error"
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
