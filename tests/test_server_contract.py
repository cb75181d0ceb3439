"""OpenAI contract details on the tiny random model: token-id prompts, ``max_completion_tokens``,
``stream_options.include_usage``, and vLLM's ``stop_token_ids`` / ``ignore_eos``, each checked against
``LM.generate``."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

import decodelab
from decodelab.server import Settings, create_app

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, Settings(max_tokens=32, max_n=3))) as c:
        yield c


def _complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _events(r) -> list:
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


IDS = [5, 6, 7, 300]  # not what any text tokenizes to: the model must see exactly these


def test_token_id_prompt_generates_from_exactly_those_ids(client, lm):
    ref = lm.generate(IDS, max_new_tokens=4)
    assert ref.prompt_ids == [IDS]
    body = _complete(client, prompt=IDS, max_tokens=4)
    assert body["choices"][0]["text"] == ref.sequences[0].new_text
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    # a text prompt goes through the tokenizer; its ids as a prompt give the same completion
    text_ids = lm.tokenize("Hello world").ids
    assert _complete(client, prompt=text_ids, max_tokens=3)["choices"][0]["text"] == \
        _complete(client, prompt="Hello world", max_tokens=3)["choices"][0]["text"]


def test_list_of_token_id_prompts(client, lm):
    prompts = [IDS, [100, 200]]
    body = _complete(client, prompt=prompts, max_tokens=3, n=2)
    expected = [lm.generate(p, max_new_tokens=3).sequences[0].new_text for p in prompts]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [expected[0], expected[0], expected[1], expected[1]]
    assert body["usage"]["prompt_tokens"] == 6


def test_token_id_prompt_echo_logprobs_and_stream(client, lm):
    head = lm.tokenizer.decode(IDS, skip_special_tokens=True)
    new = lm.generate(IDS, max_new_tokens=3).sequences[0].new_text
    body = _complete(client, prompt=IDS, max_tokens=3, echo=True, logprobs=2)
    choice = body["choices"][0]
    assert choice["text"] == head + new
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 4 + 3 and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1] == pytest.approx(lm.score_ids(IDS).tokens[1].logprob, abs=1e-4)
    chunks = _events(client.post("/v1/completions", json={"prompt": IDS, "max_tokens": 3, "temperature": 0,
                                                          "echo": True, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == head + new


def test_max_completion_tokens_is_max_tokens(client):
    a = _complete(client, prompt="Hello", max_completion_tokens=3)
    b = _complete(client, prompt="Hello", max_tokens=3)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["usage"]["completion_tokens"] == 3
    both = _complete(client, prompt="Hello", max_tokens=9, max_completion_tokens=2)  # the newer name wins
    assert both["usage"]["completion_tokens"] == 2
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_completion_tokens": 2, "temperature": 0, "ignore_eos": True})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hello", "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_stream_options_include_usage(client, path, body):
    base = {**body, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True}
    whole = client.post(path, json={**base, "stream": False}).json()
    chunks = _events(client.post(path, json={**base, "stream_options": {"include_usage": True}}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI: null on every other chunk
    plain = _events(client.post(path, json={**base, "stream_options": {"include_usage": False}}))
    assert all("usage" not in c and c["choices"] for c in plain)


def test_stop_token_ids_end_a_choice(client, lm):
    new_ids = lm.generate("Hello", max_new_tokens=8, ignore_eos=True).sequences[0].new_ids
    i = next(i for i in range(2, 8) if new_ids[i] not in new_ids[:i])  # the first stop the request will meet
    body = _complete(client, prompt="Hello", max_tokens=8, stop_token_ids=[new_ids[i]], logprobs=1)
    choice = body["choices"][0]
    ref = lm.generate("Hello", max_new_tokens=8, eos_token_id=[*lm.eos_ids, new_ids[i]]).sequences[0]
    assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == i + 1
    assert choice["text"] == ref.new_text and len(choice["logprobs"]["tokens"]) == i  # the stop token is not listed
    streamed = _events(client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0,
                                                             "stop_token_ids": [new_ids[i]], "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in streamed) == choice["text"]


def test_ignore_eos_drops_only_the_models_eos(client, lm):
    eos = lm.eos_ids[0]
    other = 300
    forced_eos = {"prompt": "Hello", "max_tokens": 5, "logit_bias": {str(eos): 100}}
    assert _complete(client, **forced_eos)["usage"]["completion_tokens"] == 1  # eos first, it stops
    body = _complete(client, **forced_eos, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    body = _complete(client, **forced_eos, ignore_eos=True, stop_token_ids=[other])
    assert body["usage"]["completion_tokens"] == 5  # the model's eos is ignored; 300 never comes
    forced_other = {"prompt": "Hello", "max_tokens": 5, "logit_bias": {str(other): 100}}
    body = _complete(client, **forced_other, ignore_eos=True, stop_token_ids=[other])
    assert body["usage"]["completion_tokens"] == 1 and body["choices"][0]["finish_reason"] == "stop"
