"""The inspection API (/api/tokenize, /api/next-token, /api/generate, /api/generate/stream, /api/score) on the real
embedded SmolLM2-135M-Instruct, checked against the Python API and against transformers' own warpers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import decodelab
from decodelab.server import Settings, create_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "It was a dark and stormy"


@pytest.fixture(scope="module")
def lm(embedded):
    return decodelab.LM(embedded.model, embedded.tokenizer, embedded.name)


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, Settings(max_tokens=64, max_n=4))) as c:
        yield c


@pytest.fixture(scope="module")
def last_logits(lm):
    """(V,) raw logits after PROMPT, straight from the transformers model."""
    ids = torch.tensor([lm.tokenize(PROMPT).ids])
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits[0, -1].float()


def _error(r, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param, err
    return err["message"]


# --- tokenize ----------------------------------------------------------------------------------------------------
def test_tokenize_matches_python_api(client, lm):
    text = "<|im_start|>Zażółć 🙂"
    r = client.post("/api/tokenize", json={"text": text})
    assert r.status_code == 200, r.text
    body = r.json()
    tokens = lm.tokenize(text)
    assert body["ids"] == tokens.ids == [1, 74, 81, 144, 137, 7342, 25954, 27804, 47526]
    assert body["display"][3:5] == ["<0xC5>", "<0xBC>"]  # "ż" is split across two byte tokens
    assert body["piece_bytes"][3:5] == [[0xC5], [0xBC]]
    assert body["special"][0] is True and not any(body["special"][1:])
    assert bytes(b for piece in body["piece_bytes"][1:] for b in piece).decode() == "Zażółć 🙂"
    assert body["model"] == lm.name


def test_tokenize_rejects_empty_and_wrong_types(client):
    assert "empty" in _error(client.post("/api/tokenize", json={"text": ""}), 400, "text")
    _error(client.post("/api/tokenize", json={"text": 5}), 400, "text")
    _error(client.post("/api/tokenize", json={"text": "a", "extra": 1}), 400, "extra")


# --- next-token ----------------------------------------------------------------------------------------------------
def test_lm_next_logits_equal_the_models(lm, last_logits):
    ids, logits = lm.next_logits(PROMPT)
    assert ids == lm.tokenize(PROMPT).ids
    assert logits.shape == (49152,) and logits.dtype == torch.float32
    assert torch.allclose(logits, last_logits, atol=1e-4)
    with pytest.raises(decodelab.InputError):
        lm.next_logits("")


def test_next_token_raw_top_matches_lm(client, lm):
    r = client.post("/api/next-token", json={"text": PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = lm.next_token(PROMPT, top_k=10)
    assert [c["id"] for c in body["top"]] == [c.id for c in ref.top]
    assert body["top"][0]["display"] == " night"
    for got, want in zip(body["top"], ref.top):
        assert got["prob"] == pytest.approx(want.prob, abs=1e-5)
        assert got["logprob"] == pytest.approx(want.logprob, abs=1e-4)
    assert body["logits_shape"] == ref.logits_shape == [1, 6, 49152]
    # default settings: nothing filtered, "after" is the raw distribution
    assert body["kept_count"] == 49152
    assert all(a["kept"] for a in body["after"])
    assert [a["prob"] for a in body["after"]] == pytest.approx([c["prob"] for c in body["top"]], abs=1e-6)
    assert body["entropy"] == pytest.approx(ref.entropy, abs=1e-4)


SETTINGS = [
    {"temperature": 0.7},
    {"temperature": 1.8, "top_p": 0.9},
    {"temperature": 1.5, "top_k_filter": 5},
    {"temperature": 2.0, "min_p": 0.05},
    {"temperature": 1.3, "top_k_filter": 20, "top_p": 0.6, "min_p": 0.01},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_next_token_after_equals_transformers_warpers(client, last_logits, settings):
    """The reshaped distribution equals transformers' warpers applied in generate's order on the full logits."""
    r = client.post("/api/next-token", json={"text": PROMPT, "top_k": 20, **settings})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = last_logits[None, :].clone()
    ids = torch.zeros((1, 0), dtype=torch.long)
    warpers = [TemperatureLogitsWarper(settings["temperature"])]
    if settings.get("top_k_filter"):
        warpers.append(TopKLogitsWarper(settings["top_k_filter"]))
    if "top_p" in settings:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    if "min_p" in settings:
        warpers.append(MinPLogitsWarper(settings["min_p"]))
    for w in warpers:
        scores = w(ids, scores)
    probs = torch.softmax(scores[0], -1)
    assert body["kept_count"] == int(torch.isfinite(scores).sum())
    for a in body["after"]:
        assert a["kept"] == bool(torch.isfinite(scores[0, a["id"]]))
        assert a["prob"] == pytest.approx(float(probs[a["id"]]), abs=1e-5)
    kept = [a["prob"] for a in body["after"] if a["kept"]]
    if body["kept_count"] <= len(body["after"]):  # every survivor listed: they renormalise to 1
        assert sum(kept) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("temperature", [0, 1e-300, 9e-6])
def test_next_token_tiny_temperature_is_greedy(client, temperature):
    """Below decodelab.config.MIN_TEMPERATURE sampling is greedy: no overflow, no NaN, all mass on the argmax."""
    body = client.post("/api/next-token", json={"text": PROMPT, "temperature": temperature}).json()
    assert body["kept_count"] == 1 and body["settings"]["greedy"] is True
    assert body["after"][0]["prob"] == 1.0 and not any(a["kept"] for a in body["after"][1:])


def test_next_token_huge_temperature_is_nearly_uniform(client):
    body = client.post("/api/next-token", json={"text": PROMPT, "temperature": 1e300}).json()
    assert body["kept_count"] == 49152
    assert all(a["prob"] == pytest.approx(1 / 49152, rel=1e-3) for a in body["after"])


def test_next_token_logit_summary_reconstructs_softmax(client, last_logits):
    """The page's input: the top N logits exactly, the rest as [mean, count] bins whose log-sum-exp is exact to
    ~1e-6 at temperature 1 and close at other temperatures."""
    body = client.post("/api/next-token", json={"text": PROMPT, "logits_k": 50}).json()
    summary = body["logits"]
    cands, tail = summary["candidates"], summary["tail"]
    assert len(cands) == 50
    top = torch.topk(last_logits, 50)
    assert [c["id"] for c in cands] == top.indices.tolist()
    assert [c["logit"] for c in cands] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert tail["count"] == sum(c for _, c in tail["bins"]) == 49152 - 50
    means = [m for m, _ in tail["bins"]]
    assert means == sorted(means, reverse=True)
    for temperature in (0.5, 1.0, 2.0):
        exact = torch.logsumexp(last_logits.double() / temperature, 0).item()
        terms = [c["logit"] / temperature for c in cands] + [m / temperature + math.log(n) for m, n in tail["bins"]]
        approx = torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0).item()
        assert approx == pytest.approx(exact, abs=2e-4)


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"text": PROMPT, "top_p": 1.5}, 400, "top_p"),
        ({"text": PROMPT, "temperature": -1}, 400, "temperature"),
        ({"text": PROMPT, "min_p": 2}, 400, "min_p"),
        ({"text": PROMPT, "top_k_filter": -3}, 400, "top_k"),
        ({"text": PROMPT, "top_k": 0}, 400, "top_k"),
        ({"text": PROMPT, "top_k": 1000}, 400, "top_k"),
        ({"text": PROMPT, "temperature": "hot"}, 400, "temperature"),
        ({"text": ""}, 400, "text"),
        ({"top_k": 3}, 400, "text"),
    ],
)
def test_next_token_bad_values(client, body, status, param):
    _error(client.post("/api/next-token", json=body), status, param)


# --- generate -------------------------------------------------------------------------------------------------------
def test_generate_greedy_matches_lm_with_trace(client, lm):
    r = client.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = lm.generate(PROMPT, max_new_tokens=5)
    assert body["sequences"][0]["ids"] == ref.sequences[0].ids
    assert body["sequences"][0]["new_text"] == ref.sequences[0].new_text
    trace = body["trace"]
    assert trace["strategy"] == "greedy"
    assert [s["id"] for s in trace["steps"]] == ref.sequences[0].new_ids
    assert all(len(s["top"]) == 10 and s["rank"] == 0 for s in trace["steps"])
    assert trace["steps"][0]["token"] == " night"


def test_generate_beam_returns_tree(client, lm):
    kw = {"max_new_tokens": 3, "num_beams": 2, "num_return_sequences": 2}
    body = client.post("/api/generate", json={"prompt": PROMPT, **kw}).json()
    ref = lm.generate(PROMPT, trace=True, **kw)
    assert [s["new_ids"] for s in body["sequences"]] == [s.new_ids for s in ref.sequences]
    nodes = body["trace"]["beam_nodes"]
    assert nodes == ref.trace.to_dict()["beam_nodes"]
    assert sum(n["status"] == "returned" for n in nodes) == 2
    assert {n["status"] for n in nodes} >= {"kept", "pruned", "returned"}


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"max_new_tokens": 65}, "max_new_tokens"),  # over the server's max_tokens=64
        ({"num_beams": 5}, "num_beams"),  # over max_n=4
        ({"trace_top_k": 51}, "trace_top_k"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_generate_bad_values(client, extra, param):
    _error(client.post("/api/generate", json={"prompt": PROMPT, **extra}), 400, param)


def test_generate_empty_prompt_then_server_still_answers(client):
    assert "empty" in _error(client.post("/api/generate", json={"prompt": ""}), 400, "prompt")
    assert client.post("/api/tokenize", json={"text": "ok"}).status_code == 200


def test_generate_stream_ndjson_equals_generate(client, lm):
    kw = {"max_new_tokens": 6, "do_sample": True, "temperature": 0.9, "seed": 3}
    with client.stream("POST", "/api/generate/stream", json={"prompt": PROMPT, **kw}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0]["type"] == "start" and events[0]["config"]["seed"] == 3
    assert events[-1]["type"] == "done"
    deltas = [e for e in events if e["type"] == "delta"]
    assert len(deltas) >= 2
    final = events[-1]["generation"]
    ref = lm.generate(PROMPT, **kw)
    assert "".join(d["text"] for d in deltas) == final["sequences"][0]["new_text"] == ref.sequences[0].new_text
    assert final["trace"]["strategy"] == "sampling" and len(final["trace"]["steps"]) == len(ref.sequences[0].new_ids)


def test_generate_stream_errors_before_start_are_plain_json(client):
    r = client.post("/api/generate/stream", json={"prompt": PROMPT, "num_beams": 0})
    _error(r, 400, "num_beams")
    assert r.headers["content-type"].startswith("application/json")


# --- score and schema ------------------------------------------------------------------------------------------------
def test_score_matches_lm(client, lm):
    body = client.post("/api/score", json={"text": PROMPT, "top_logprobs": 2}).json()
    ref = lm.score(PROMPT, top_logprobs=2)
    assert [t["id"] for t in body["tokens"]] == ref.ids
    assert body["tokens"][0]["logprob"] is None
    assert body["perplexity"] == pytest.approx(ref.perplexity, rel=1e-5)
    assert all(len(t["top"]) == 2 for t in body["tokens"][1:])
    _error(client.post("/api/score", json={"text": PROMPT, "top_logprobs": 21}), 400, "top_logprobs")


def test_openapi_documents_inspection_routes(client):
    schema = client.get("/openapi.json").json()
    for path in ("/api/tokenize", "/api/next-token", "/api/generate", "/api/generate/stream", "/api/score"):
        assert "post" in schema["paths"][path], path
    props = schema["components"]["schemas"]["NextTokenRequest"]["properties"]
    assert {"text", "top_k", "temperature", "top_k_filter", "top_p", "min_p", "logits_k"} <= set(props)
    assert "description" in props["top_p"]
    gen = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"max_new_tokens", "num_beams", "repetition_penalty", "no_repeat_ngram_size", "seed"} <= set(gen)
