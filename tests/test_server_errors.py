"""Bad input and hard conditions against a real uvicorn server (tiny random model): every failure is a 4xx/503/504
OpenAI-style error, never a 500 or a hang, and the server keeps answering afterwards."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time

import httpx
import pytest

import decodelab
from decodelab.server import Settings, create_app
from decodelab.server.background import BackgroundServer
from decodelab.server.runner import STREAM_AHEAD, QueueFullError, RequestTimeoutError, Runner

pytestmark = pytest.mark.timeout(120)


def _error(r: httpx.Response, status: int, param: str | None = "<any>") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if status in (400, 404, 405, 413):
        assert err["type"] == "invalid_request_error", err
    if param != "<any>":
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    return decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)


@pytest.fixture(scope="module")
def server(tiny_lm):
    settings = Settings(max_tokens=32, max_n=3, max_body_bytes=50_000)
    with BackgroundServer(create_app(tiny_lm, settings)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield client


def _ok(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


BAD_BODIES = [
    # (raw body, status, param)
    (b'{"prompt": "x", ', 400, None),  # malformed JSON
    (b"not json at all", 400, None),
    (b"[1, 2, 3]", 400, None),  # not an object
    (b'{"max_tokens": 2}', 400, "prompt"),  # missing prompt
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "x", "temperature": 5}', 400, "temperature"),  # OpenAI range 0..2
    (b'{"prompt": "x", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "x", "logprobs": 6}', 400, "logprobs"),
    (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"prompt": "x", "n": 0}', 400, "n"),
    (b'{"prompt": "x", "stream": "yes please"}', 400, "stream"),
    (b'{"prompt": "x", "tools": []}', 400, "tools"),  # unknown field: rejected, never silently ignored
    (b'{"prompt": "x", "top_k": -1}', 400, "top_k"),  # decodelab's own validation (config.py)
    (b'{"prompt": "x", "repetition_penalty": 0}', 400, "repetition_penalty"),
    (b'{"prompt": "x", "seed": -3}', 400, "seed"),
    (b'{"prompt": "x", "stop": [""]}', 400, "stop"),
    (b'{"prompt": "x", "logit_bias": {"abc": 1}}', 400, "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"99999999": 1}}', 400, "logit_bias"),
    (b'{"prompt": "x", "max_tokens": 33}', 400, "max_tokens"),  # above the server's --max-tokens
    (b'{"prompt": "x", "n": 4}', 400, "n"),  # above --max-n
    (b'{"prompt": "x", "num_beams": 9}', 400, "num_beams"),
    (b'{"prompt": "x", "n": 3, "temperature": 0, "num_beams": 2}', 400, "n"),
    (b'{"prompt": "x", "best_of": 3}', 400, "best_of"),
    (b'{"prompt": "x", "num_beams": 2, "temperature": 0, "logprobs": 1}', 400, "logprobs"),
    (b'{"prompt": "x", "min_new_tokens": 5, "max_tokens": 2}', 400, "min_new_tokens"),
    (b'{"prompt": ""}', 400, "prompt"),  # empty prompt: documented 400
    (b'{"prompt": []}', 400, "prompt"),
    (b'{"prompt": ["fine", ""]}', 400, "prompt"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),  # Python reads NaN; out of 0..2
    # prompt forms: token ids must be integers inside the vocabulary (49152 for the tiny model)
    (b'{"prompt": [true, 2]}', 400, "prompt"),
    (b'{"prompt": ["a", 1]}', 400, "prompt"),
    (b'{"prompt": [1.5]}', 400, "prompt"),
    (b'{"prompt": [1, 49152]}', 400, "prompt"),
    (b'{"prompt": [-1]}', 400, "prompt"),
    (b'{"prompt": [[]]}', 400, "prompt"),
    (b'{"prompt": [[5, 6], [49152]]}', 400, "prompt"),
    (b'{"prompt": [[5], "x"]}', 400, "prompt"),
    # OpenAI's documented limits (GenerationConfig)
    (b'{"prompt": "x", "logit_bias": {"5": 100.5}}', 400, "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"5": -101}}', 400, "logit_bias"),
    ('{"prompt": "x", "logit_bias": {"\uff11\uff12": 1}}'.encode(), 400, "logit_bias"),  # fullwidth digits
    ('{"prompt": "x", "logit_bias": {"\u00b2": 1}}'.encode(), 400, "logit_bias"),  # int("\u00b2") is a ValueError
    ('{"prompt": "x", "logit_bias": {"\u0661": 1}}'.encode(), 400, "logit_bias"),  # Arabic-Indic digit one
    (b'{"prompt": "x", "logit_bias": {"' + b"9" * 5000 + b'": 1}}', 400, "logit_bias"),  # int() refuses > 4300 digits
    (b'{"prompt": "x", "logit_bias": {" 5": 1}}', 400, "logit_bias"),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    # lone surrogates, in every kind of string field
    (b'{"prompt": "\\ud800"}', 400, "prompt"),
    (b'{"prompt": ["fine", "a\\udc00b"]}', 400, "prompt"),
    (b'{"prompt": "x", "stop": "\\ud800"}', 400, "stop"),
    (b'{"prompt": "x", "stop": ["ok", "\\udfff"]}', 400, "stop"),
    (b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', 400, "logit_bias"),
    (b'{"prompt": "x", "model": "\\ud800"}', 400, "model"),
    (b'{"prompt": "x", "user": "\\ud83d"}', 400, "user"),
    # extensions and aliases
    (b'{"prompt": "x", "stop_token_ids": [49152]}', 400, "stop_token_ids"),
    (b'{"prompt": "x", "stop_token_ids": [-1]}', 400, "stop_token_ids.0"),
    (b'{"prompt": "x", "stop_token_ids": 5}', 400, "stop_token_ids"),
    (b'{"prompt": "x", "ignore_eos": "maybe"}', 400, "ignore_eos"),
    (b'{"prompt": "x", "max_completion_tokens": 33}', 400, "max_completion_tokens"),
    (b'{"prompt": "x", "max_completion_tokens": -1}', 400, "max_completion_tokens"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options"),  # needs stream
    (b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": 3}}', 400, "stream_options.include_usage"),
    (b'{"prompt": "x", "stream": true, "stream_options": {"other": 1}}', 400, "stream_options.other"),
]


@pytest.mark.parametrize("body,status,param", BAD_BODIES, ids=[b[0].decode()[:40] for b in BAD_BODIES])
def test_bad_completion_requests_get_4xx_and_the_server_still_answers(server, body, status, param):
    r = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    err = _error(r, status, param)
    if param is None:
        assert err["code"] == ("invalid_type" if body.startswith(b"[") else "invalid_json")
    if param is not None and status == 400:
        assert param.split(".")[0] in err["message"]  # the message names the field
    _ok(server)


def test_error_messages_say_what_is_wrong(server):
    def message(body: bytes) -> str:
        r = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        return _error(r, 400)["message"]

    assert message(b'{"prompt": "x", "logit_bias": {"5": 101}}') == (
        "invalid logit_bias[5]=101: expected a bias between -100 and 100")
    assert message(b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}') == (
        "invalid stop: 5 strings given, at most 4 are allowed")
    assert message('{"prompt": "x", "logit_bias": {"\uff11\uff12": 1}}'.encode()) == (
        "invalid logit_bias='\uff11\uff12': expected token ids as keys (ASCII digits, e.g. \"50256\")")
    assert message(b'{"prompt": [true]}') == (
        "invalid prompt=[true]: expected one of str, list[str], list[int], list[list[int]]")
    assert message(b'{"prompt": [1, 49152]}') == (
        "invalid prompt[1]=49152: expected a token id from 0 to 49151 (the vocabulary size is 49152)")
    assert "lone surrogate '\\ud800' at character 1" in message(b'{"prompt": "a\\ud800"}')
    assert message(b'{"prompt": "x", "stop_token_ids": [49152]}') == (
        "invalid stop_token_ids: token id 49152 is outside the vocabulary (size 49152)")
    assert message(b'{"prompt": "x", "max_completion_tokens": 33}') == (
        "invalid max_completion_tokens=33: this server allows at most 32 (--max-tokens)")


HI = [{"role": "user", "content": "hi"}]
BAD_CHATS = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),  # needs logprobs
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}, 400, "max_tokens"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, 400, "messages.0.name"),
    ({"messages": HI, "stop": ["\ud800"]}, 400, "stop"),
    ({"messages": HI, "stop": ["1", "2", "3", "4", "5"]}, 400, "stop"),
    ({"messages": HI, "logit_bias": {"7": -100.01}}, 400, "logit_bias"),
    ({"messages": HI, "logit_bias": {"\uff17": 1}}, 400, "logit_bias"),
    ({"messages": HI, "max_completion_tokens": 1000}, 400, "max_completion_tokens"),
    ({"messages": HI, "max_completion_tokens": "many"}, 400, "max_completion_tokens"),
    ({"messages": HI, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ({"messages": HI, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": HI, "tools": []}, 400, "tools"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHATS, ids=[json.dumps(b[0])[:40] for b in BAD_CHATS])
def test_bad_chat_requests_get_4xx(server, body, status, param):
    # json.dumps writes a lone surrogate as the escape "\ud800", as a client in another language would send it
    r = server.post("/v1/chat/completions", content=json.dumps(body).encode(),
                    headers={"content-type": "application/json"})
    _error(r, status, param)
    _ok(server)


BAD_INSPECT = [
    ("/api/tokenize", {"text": 5}, "text"),
    ("/api/tokenize", {}, "text"),
    ("/api/tokenize", {"text": "\ud800"}, "text"),
    ("/api/tokenize", {"text": "x", "other": 1}, "other"),
    ("/api/next-token", {"text": "a\udfffb"}, "text"),
    ("/api/next-token", {"text": "x", "top_k": 0}, "top_k"),
    ("/api/score", {"text": "\ud800"}, "text"),
    ("/api/score", {"text": "x", "top_logprobs": 21}, "top_logprobs"),
    ("/api/generate", {"prompt": "\ud800"}, "prompt"),
    ("/api/generate", {"prompt": "x", "stop_strings": ["\ud800"]}, "stop_strings"),
    ("/api/generate", {"prompt": "x", "stop_strings": ["a", "b", "c", "d", "e"]}, "stop_strings"),
    ("/api/generate", {"prompt": "x", "max_new_tokens": "two"}, "max_new_tokens"),
    ("/api/generate/stream", {"prompt": "\udc00"}, "prompt"),
    ("/api/generate/stream", {"prompt": ["x"]}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD_INSPECT, ids=[f"{p} {json.dumps(b)[:30]}" for p, b, _ in BAD_INSPECT])
def test_bad_inspection_requests_get_400(server, path, body, param):
    r = server.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    _error(r, 400, param)
    _ok(server)


UNUSUAL_TEXT = ["a\x00b", "\u202eabc\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd", "e\u0301\u0302\u0303",
                "\uff11\uff12\u0663", "\ufeff\ufffe", "\U0001f469\u200d\U0001f4bb", "\x7f\x1b[31m"]


@pytest.mark.parametrize("text", UNUSUAL_TEXT, ids=[ascii(t) for t in UNUSUAL_TEXT])
def test_unusual_unicode_works_on_every_route(server, tiny_lm, text):
    """NUL, bidirectional marks, combining sequences, non-ASCII digits, BOM, ZWJ emoji, escapes: all are valid
    Unicode, so every route answers 200 with them (in prompts, stop strings, names and tokenized text)."""
    ids = tiny_lm.tokenize(text).ids
    r = server.post("/api/tokenize", json={"text": text})
    assert r.status_code == 200 and r.json()["ids"] == ids and r.json()["text"] == text
    r = server.post("/v1/completions", json={"prompt": text, "max_tokens": 2, "temperature": 0, "echo": True,
                                             "stop": [text], "user": text, "model": text})
    assert r.status_code == 200, r.text
    expected = tiny_lm.generate(text, max_new_tokens=2, stop_strings=[text]).sequences[0].new_text
    assert r.json()["choices"][0]["text"] == text + expected
    chat = {"messages": [{"role": "user", "content": text, "name": text}], "max_tokens": 2, "temperature": 0,
            "stop": text}
    assert server.post("/v1/chat/completions", json=chat).status_code == 200
    for path, body in (("/api/next-token", {"text": text, "top_k": 2}), ("/api/score", {"text": text}),
                       ("/api/generate", {"prompt": text, "max_new_tokens": 1, "stop_strings": [text]})):
        r = server.post(path, json=body)
        assert r.status_code == 200, (path, r.text)


def test_over_long_prompt_is_a_400_with_the_token_counts(server, tiny_lm):
    prompt = "word " * 300  # the tiny model's context window is 256 tokens
    n_tokens = len(tiny_lm.tokenize(prompt).ids)
    r = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
    err = _error(r, 400, "prompt")
    assert f"prompt of {n_tokens} tokens" in err["message"] and "max_tokens=4" in err["message"]
    assert "256" in err["message"] and err["code"] == "context_length_exceeded"
    # prompt fits, prompt + max_tokens does not: also a 400, naming both numbers
    short = "word " * 240
    err = _error(server.post("/v1/completions", json={"prompt": short, "max_tokens": 30}), 400, "prompt")
    assert "max_tokens=30" in err["message"]
    # streaming: the error comes as a normal 400, before any event
    r = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": True})
    _error(r, 400, "prompt")
    _ok(server)


def test_huge_bodies_get_413(server):
    big = json.dumps({"prompt": "x" * 60_000, "max_tokens": 1}).encode()
    err = _error(server.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413,
                 "body")
    assert "50000" in err["message"]

    def chunks():  # no Content-Length: the limit counts the bytes actually received
        for _ in range(40):
            yield b"x" * 4096

    r = server.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _error(r, 413)
    _ok(server)


def test_unknown_route_and_wrong_method_are_json_errors(server):
    for method, path in (("GET", "/v1/nothing-here"), ("POST", "/v1/nothing-here"), ("POST", "/v1/completion"),
                         ("POST", "/api/nothing"), ("DELETE", "/v2/completions")):
        err = _error(server.request(method, path, json={"prompt": "x"}), 404)
        assert err["message"] == f"unknown route {method} {path}" and err["code"] == "not_found"
    # a known route with the wrong method is a 405, even where the playground's static files answer GETs
    for method, path in (("GET", "/v1/completions"), ("GET", "/api/tokenize"), ("POST", "/v1/models")):
        err = _error(server.request(method, path), 405)
        assert err["code"] == "method_not_allowed" and path in err["message"]


def test_model_field_is_echoed_never_loaded(server, tiny_lm):
    for name in ("gpt-4o", "/etc/passwd", "../../secret.gguf"):
        r = server.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == tiny_lm.name
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [tiny_lm.name]


def test_openapi_schema_documents_the_extensions(server):
    schema = server.get("/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(schema["paths"])
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    for name in ("top_k", "min_p", "repetition_penalty", "num_beams", "logprobs", "echo", "stream", "seed"):
        assert name in props and (name in ("logprobs", "echo", "stream", "seed") or props[name].get("description"))


# --- a model slowed down so requests overlap deterministically ------------------------------------------------------
@pytest.fixture()
def slow(tiny_llama):
    """A server over a tiny model whose every decode step sleeps 50 ms; counts the steps."""
    lm = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)
    steps = {"n": 0}
    step = lm.engine.step

    def slow_step(state, tokens):
        steps["n"] += 1
        time.sleep(0.05)
        return step(state, tokens)

    lm.engine.step = slow_step
    settings = Settings(max_tokens=200, max_concurrent=1, max_queue=0, request_timeout_s=30)
    app = create_app(lm, settings)
    with BackgroundServer(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            yield client, steps, app


def _wait_idle(client: httpx.Client, seconds: float = 10.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = client.get("/health").json()
        if health["running"] == 0 and health["queued"] == 0:
            return health
        assert time.monotonic() < deadline, f"server still busy: {health}"
        time.sleep(0.05)


LONG = {"prompt": "Hello", "max_tokens": 150, "temperature": 0, "ignore_eos": True}


def test_queue_full_is_a_503_and_stream_disconnect_frees_the_slot(slow):
    client, steps, _ = slow
    with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as stream:
        lines = stream.iter_lines()
        first = [next(lines) for _ in range(3)]  # the slot is now held by this generation
        assert first[0].startswith("data: ")
        err = _error(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}), 503)
        assert err["code"] == "queue_full"
    # the client went away after ~2 tokens: the generation must stop long before 150 steps
    health = _wait_idle(client)
    stopped_at = steps["n"]
    assert stopped_at < 100, stopped_at
    assert health["cancelled"] >= 1
    time.sleep(0.3)
    assert steps["n"] == stopped_at  # nothing keeps generating in the background
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200


def test_non_streaming_disconnect_stops_generation(slow, caplog):
    client, steps, _ = slow
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=LONG, timeout=0.5)
        _wait_idle(client)
        time.sleep(0.2)
        gc.collect()
    assert steps["n"] < 100, steps["n"]
    # the generation's own future ended with CancelledGeneration: read, not logged as "never retrieved" at collection
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_timeout_is_a_504_and_frees_the_slot(slow):
    client, steps, app = slow
    app.state.runner.timeout_s = 1.0  # the 150-token request needs >= 7.5 s
    try:
        err = _error(client.post("/v1/completions", json=LONG), 504)
        assert err["code"] == "request_timeout"
        _wait_idle(client)
        assert steps["n"] < 100
        r = client.post("/v1/completions", json={**LONG, "stream": True})  # times out mid-stream: in-band error
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    finally:
        app.state.runner.timeout_s = 30
    _wait_idle(client)
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


# --- the runner alone -----------------------------------------------------------------------------------------------
def test_runner_queue_limit_order_and_timeout():
    async def main():
        runner = Runner(max_concurrent=1, max_queue=1, timeout_s=5)
        gate = threading.Event()
        order: list[int] = []

        def work(i):
            gate.wait(5)
            order.append(i)
            return i * 10

        first = asyncio.ensure_future(runner.run(work, 1))
        second = asyncio.ensure_future(runner.run(work, 2))
        await asyncio.sleep(0.05)
        assert (runner.running, runner.admitted) == (1, 2)
        with pytest.raises(QueueFullError):
            await runner.run(work, 3)
        gate.set()
        assert await asyncio.gather(first, second) == [10, 20]
        assert order == [1, 2] and (runner.running, runner.admitted, runner.rejected) == (0, 0, 1)

        runner.timeout_s = 0.1

        def stuck():
            time.sleep(0.4)
            return "late"

        with pytest.raises(RequestTimeoutError):
            await runner.run(stuck)
        assert runner.running == 1  # an opaque call keeps its slot until it returns
        await asyncio.sleep(0.5)
        assert runner.running == 0

        def steps():
            for i in range(1000):
                time.sleep(0.01)
                yield i
            return "done"

        with pytest.raises(RequestTimeoutError):
            await runner.drive(steps)
        await asyncio.sleep(0.1)
        assert runner.running == 0  # drive() stops a generator at its next step
        runner.timeout_s = 5
        pulled, closed_in = [], []

        def numbers():
            try:
                for i in range(1000):
                    pulled.append(i)
                    yield i
            finally:
                closed_in.append(threading.current_thread().name)

        got = []
        stream = runner.stream(numbers)
        async for x in stream:
            got.append(x)
            if x == 0:  # the worker pulls ahead of the consumer (its next decode step need not wait for us) ...
                await asyncio.sleep(0.1)
                assert len(pulled) == 1 + STREAM_AHEAD  # ... but no more than STREAM_AHEAD items
            if x == 2:
                break
        await stream.aclose()  # what Starlette does when the client goes away
        await asyncio.sleep(0.1)
        assert got == [0, 1, 2] and len(pulled) <= 4 + STREAM_AHEAD and runner.running == 0
        assert closed_in and closed_in[0].startswith("decodelab-model")  # closed in the worker that ran it

        def failing():
            yield "first"
            raise ValueError("bad token")

        got = []
        with pytest.raises(ValueError, match="bad token"):
            async for x in runner.stream(failing):
                got.append(x)
        assert got == ["first"]
        await asyncio.sleep(0.05)
        assert runner.running == 0
        runner.shutdown()

    asyncio.run(main())


# --- the contract found by trying the server with bad input (issue 11) ----------------------------------------------
@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 100}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50}, "top_logprobs"),
    ("/api/next-token", {"text": "hi", "top_k": -1}, "top_k"),
])
def test_out_of_range_values_are_invalid_value_on_every_route(server, route, body, param):
    err = _error(server.post(route, json=body), 400, param)
    assert err["code"] == "invalid_value", err


def test_nan_is_reported_as_not_finite(server):
    r = server.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}',
                    headers={"Content-Type": "application/json"})
    err = _error(r, 400, "temperature")
    assert err["message"] == "invalid temperature=NaN: expected a finite number" and err["code"] == "invalid_value"


@pytest.mark.parametrize("field, value", [("max_tokens", "2"), ("stream", "yes"), ("stream", 1), ("n", 1.0),
                                          ("echo", 0), ("seed", "7")])
def test_wrong_json_types_are_not_coerced(server, field, value):
    err = _error(server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value}), 400, field)
    assert err["code"] == "invalid_type", err


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system", "content": None}])
def test_chat_message_without_content_is_refused(server, message):
    r = server.post("/v1/chat/completions", json={"messages": [message], "max_tokens": 2})
    err = _error(r, 400, "messages.0")
    assert "message needs content" in err["message"]


def test_assistant_message_may_have_null_content(server):
    r = server.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
        {"role": "user", "content": "again"}], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


def test_body_without_json_content_type_says_so(server):
    r = server.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    err = _error(r, 400, None)
    assert err["code"] == "invalid_json"
    assert err["message"] == ("the body must be a JSON object sent with Content-Type: application/json (got "
                              "Content-Type: application/x-www-form-urlencoded)")


def test_body_that_is_not_utf8_is_invalid_json(server):
    r = server.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    err = _error(r, 400, None)
    assert err["code"] == "invalid_json" and err["message"].startswith("malformed JSON body")


def test_five_stop_entries_are_refused_even_when_repeated(server):
    r = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stop": ["a"] * 5})
    err = _error(r, 400, "stop")
    assert "5 strings given, at most 4" in err["message"]


def test_api_generate_takes_one_eos_token_id_as_the_python_api_does(server):
    r = server.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 3, "eos_token_id": 5})
    assert r.status_code == 200, r.text
    assert r.json()["trace"]["config"]["eos_token_id"] == [5]


def test_streamed_items_put_together_wake_the_event_loop_once_and_arrive_in_order():
    """Workers hand streamed items to the event loop through one mailbox: the entries put while the loop had not
    yet taken the earlier ones cost one wake-up of the loop (not one write to its wake-up socket per token and
    stream), and each queue gets its entries in order."""
    from decodelab.server.runner import _LoopMail

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakes = []
        call_soon_threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakes.append(a) or call_soon_threadsafe(*a)
        mail = _LoopMail(loop)
        queues = [asyncio.Queue() for _ in range(3)]

        def worker() -> None:
            for i in range(50):
                for q in queues:
                    mail.put(q, i)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()  # the loop is held here: nothing was delivered yet
        assert len(wakes) == 1 and all(q.empty() for q in queues)
        assert [[await q.get() for _ in range(50)] for q in queues] == [list(range(50))] * 3
        mail.put(queues[0], "next")
        assert len(wakes) == 2 and await queues[0].get() == "next"

    asyncio.run(main())
