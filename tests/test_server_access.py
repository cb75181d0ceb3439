"""API keys, the per-client limit, CORS and the request log, on the tiny random model (fast).

The route walk takes every route of the app's OpenAPI schema, and every route left out of it (the docs, the schema,
the playground's files), and calls each with no key, a wrong key and the right key: 401 / 401 / not 401 for the
guarded ones (every ``/v1`` and ``/api`` route), never 401 for the open ones (``/health``, docs, static files).
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount
from typer.testing import CliRunner

import decodelab
from decodelab import cli
from decodelab.errors import ConfigError, ModelLoadError
from decodelab.server import Settings, create_app
from decodelab.server.access import ClientLimiter, KeyRing, bearer_token
from decodelab.server.app import STATIC_DIR
from decodelab.server.background import BackgroundServer
from decodelab.server.files import shipped_files

pytestmark = pytest.mark.timeout(120)

KEY, OTHER_KEY, WRONG = "class-key-3f9c2a", "second-key-77aa01", "guess-key-000000"
# valid bodies for the routes known today; a route added later gets {} (a 400 with the key: still not a 401)
BODIES = {
    "/v1/completions": {"prompt": "Hi", "max_tokens": 1, "temperature": 0},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0},
    "/api/tokenize": {"text": "Hi"},
    "/api/next-token": {"text": "Hi", "top_k": 3},
    "/api/generate": {"prompt": "Hi", "max_new_tokens": 1},
    "/api/generate/stream": {"prompt": "Hi", "max_new_tokens": 1},
    "/api/score": {"text": "Hi there"},
}


def _lm(tiny) -> decodelab.LM:
    """A fresh LM over the tiny model: each app starts and stops batching on its own engine."""
    return decodelab.LM(tiny.model, tiny.tokenizer, tiny.name)


@pytest.fixture(scope="module")
def keyed(tiny_llama):
    app = create_app(_lm(tiny_llama), Settings(max_tokens=8, api_keys=(KEY, OTHER_KEY)))
    with TestClient(app) as client:
        yield app, client


def _auth(key: str | None) -> dict:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def _call(client: TestClient, method: str, path: str, key: str | None) -> httpx.Response:
    if method == "POST":
        return client.post(path, json=BODIES.get(path, {}), headers=_auth(key))
    return client.request(method, path, headers=_auth(key))


def _expect_401(r: httpx.Response, code: str) -> None:
    assert r.status_code == 401, (r.request.url, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    assert r.headers["www-authenticate"] == "Bearer"
    assert WRONG not in r.text and KEY not in r.text


def test_every_schema_route_needs_the_key(keyed):
    app, client = keyed
    schema = client.get("/openapi.json").json()
    walked = []
    for path, operations in schema["paths"].items():
        for method in operations:
            method = method.upper()
            walked.append((method, path))
            missing, wrong, right = (_call(client, method, path, k) for k in (None, WRONG, KEY))
            if path == "/health":
                assert missing.status_code == wrong.status_code == right.status_code == 200
                continue
            assert path.startswith(("/v1/", "/api/")), path
            _expect_401(missing, "missing_api_key")
            _expect_401(wrong, "invalid_api_key")
            assert right.status_code != 401, (method, path, right.text)
            if path in BODIES or method == "GET":
                assert right.status_code == 200, (method, path, right.text)
            assert operations[method.lower()]["security"] == [{"apiKey": []}]  # /docs offers "Authorize"
    assert {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/api/next-token")} <= set(walked)
    assert len(walked) >= 9


def _all_routes(routes):
    """Every route, included routers' routes too (FastAPI wraps an included router in one object)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _all_routes(inner.routes)
        else:
            yield route


def test_routes_outside_the_schema_stay_open(keyed):
    app, client = keyed
    schema_paths = set(client.get("/openapi.json").json()["paths"])
    routes = [r for r in _all_routes(app.routes) if not isinstance(r, Mount)]
    assert schema_paths <= {r.path for r in routes}
    hidden = [r.path for r in routes if r.path not in schema_paths]
    assert {"/openapi.json", "/docs", "/redoc"} <= set(hidden)
    static = ["/", *("/" + name for name in shipped_files(STATIC_DIR))]
    assert "/index.html" in static and "/api.js" in static
    for path in hidden + static:
        for key in (None, WRONG, KEY):
            r = client.get(path, headers=_auth(key))
            assert r.status_code == 200, (path, key, r.status_code)


@pytest.mark.parametrize("method,path", [("GET", "/v1/nothing"), ("POST", "/api/nothing"), ("GET", "/v1"),
                                         ("POST", "/api"), ("DELETE", "/v1/models"), ("PUT", "/anything")])
def test_unknown_guarded_paths_say_401_before_404(keyed, method, path):
    _, client = keyed
    _expect_401(client.request(method, path), "missing_api_key")
    assert client.request(method, path, headers=_auth(KEY)).status_code in (404, 405)


@pytest.mark.parametrize("header", [f"Basic {KEY}", KEY, "Bearer", "Bearer ", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}",
                                    f"Token {KEY}"])
def test_malformed_or_wrong_authorization_is_refused(keyed, header):
    _, client = keyed
    r = client.get("/v1/models", headers={"Authorization": header})
    assert r.status_code == 401 and KEY not in r.text


def test_bearer_scheme_is_case_insensitive_and_every_key_works(keyed):
    _, client = keyed
    for header in (f"bearer {KEY}", f"BEARER {OTHER_KEY}", f"Bearer   {KEY}  "):
        assert client.get("/v1/models", headers={"Authorization": header}).status_code == 200, header


def test_two_authorization_headers_are_refused(keyed):
    _, client = keyed
    r = client.get("/v1/models", headers=[("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {WRONG}")])
    assert r.status_code == 401


def test_health_reports_auth_and_counts_refusals(keyed):
    _, client = keyed
    before = client.get("/health").json()
    client.get("/v1/models")
    after = client.get("/health").json()
    assert after["auth"] is True and after["unauthorized"] == before["unauthorized"] + 1


def test_keyring_and_bearer_parsing():
    ring = KeyRing(["a1", "b2", "c3"])
    assert [ring.match(k) for k in (b"a1", b"b2", b"c3", b"c", b"", b"a1 ")] == [0, 1, 2, None, None, None]
    assert not KeyRing([]) and len(ring) == 3
    assert bearer_token({"headers": [(b"authorization", b"Bearer xyz")]}) == b"xyz"
    assert bearer_token({"headers": [(b"authorization", b"Basic xyz")]}) is None
    assert bearer_token({"headers": []}) is None


# --- settings, CLI ------------------------------------------------------------------------------------------------
def test_settings_keys_from_every_source(tmp_path, monkeypatch):
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("# students\nalice-key-1\n\n  bob-key-2  \nalice-key-1\n")
    s = Settings(api_keys=("teacher-key",), api_keys_file=str(keyfile))
    assert s.keys == ("teacher-key", "alice-key-1", "bob-key-2")
    assert "teacher-key" not in repr(s) and "alice" not in repr(s)
    monkeypatch.setenv("DECODELAB_API_KEY", "env-key-1, env-key-2")
    assert Settings.from_kwargs().keys == ("env-key-1", "env-key-2")
    assert Settings.from_kwargs(api_keys=["cli-key"]).keys == ("cli-key",)  # the option wins over the variable
    assert Settings.from_kwargs(api_keys_file=str(keyfile)).keys == ("alice-key-1", "bob-key-2")
    monkeypatch.setenv("DECODELAB_API_KEY", "")
    assert Settings.from_kwargs().keys == ()
    assert Settings().keys == ()  # Settings() itself never reads the environment


@pytest.mark.parametrize("kwargs,needle", [
    (dict(api_keys=("has space",)), "invalid API key (key 1 of 1)"),
    (dict(api_keys=("ok-key", "")), "invalid API key (key 2 of 2)"),
    (dict(api_keys=("comma,key",)), "without spaces or commas"),
    (dict(api_keys=("zażółć",)), "printable ASCII"),
    (dict(api_keys_file="/nonexistent/keys.txt"), "invalid api_keys_file='/nonexistent/keys.txt'"),
    (dict(max_client_requests=-1), "invalid max_client_requests=-1"),
    (dict(max_client_requests=True), "invalid max_client_requests=True"),
    (dict(allowed_origins=("http://localhost:3000/",)), "invalid allowed_origins='http://localhost:3000/'"),
    (dict(allowed_origins=("localhost:3000",)), "scheme://host[:port]"),
    (dict(log_requests="yes"), "invalid log_requests='yes'"),
])
def test_bad_settings_are_one_line_errors_that_never_echo_a_key(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        Settings(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert "has space" not in message and "comma,key" not in message and "zażółć" not in message


def test_empty_keys_file_is_an_error(tmp_path):
    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        Settings(api_keys_file=str(empty))


def test_per_client_limit_defaults_to_4_on_a_shared_server_only():
    assert Settings().max_client_requests == 0  # loopback, no key: one user, who may batch freely
    assert Settings(host="0.0.0.0").max_client_requests == 4
    assert Settings(api_keys=("k-123456",)).max_client_requests == 4
    assert Settings(max_client_requests=9, api_keys=("k-123456",)).max_client_requests == 9
    assert Settings(max_client_requests=0, host="0.0.0.0").max_client_requests == 0


def test_exposure_warning():
    assert Settings().exposure_warning() is None
    assert Settings(host="::1").exposure_warning() is None
    assert Settings(host="localhost").exposure_warning() is None
    assert Settings(host="0.0.0.0", api_keys=("k-123456",)).exposure_warning() is None
    for host in ("0.0.0.0", "::", "192.168.1.10", "myhost.example"):
        warning = Settings(host=host).exposure_warning()
        assert warning.startswith("warning: ") and host in warning and "--api-key" in warning
        assert "\n" not in warning


def test_cli_serve_maps_options_onto_settings(monkeypatch, tmp_path):
    import decodelab.server

    seen = {}
    monkeypatch.setattr(decodelab.server, "run", lambda **kw: seen.update(kw))
    keyfile = tmp_path / "k"
    keyfile.write_text("file-key\n")
    result = CliRunner().invoke(cli.app, [
        "serve", "--api-key", "k-one", "--api-key", "k-two", "--api-key-file", str(keyfile),
        "--max-client-requests", "3", "--allowed-origins", "http://localhost:3000", "--allowed-origins",
        "https://class.example", "--log-requests"])
    assert result.exit_code == 0, result.stderr
    assert seen["api_keys"] == ["k-one", "k-two"] and seen["api_keys_file"] == str(keyfile)
    assert seen["max_client_requests"] == 3 and seen["log_requests"] is True
    assert seen["allowed_origins"] == ["http://localhost:3000", "https://class.example"]
    settings = Settings.from_kwargs(**{k: v for k, v in seen.items() if k in Settings.names()})
    assert settings.keys == ("k-one", "k-two", "file-key")
    seen.clear()
    assert CliRunner().invoke(cli.app, ["serve"]).exit_code == 0
    assert not {"api_keys", "api_keys_file", "max_client_requests", "allowed_origins", "log_requests"} & set(seen)


@pytest.mark.parametrize("args,needle", [
    (["--api-key", "two words"], "error: invalid API key"),
    (["--api-key", ""], "error: invalid API key"),
    (["--max-client-requests", "-2"], "error: invalid max_client_requests=-2"),
    (["--allowed-origins", "evil"], "error: invalid allowed_origins='evil'"),
    (["--api-key-file", "/nonexistent/k"], "error: invalid api_keys_file="),
])
def test_cli_serve_bad_options_exit_2_before_loading(monkeypatch, args, needle):
    monkeypatch.setattr(decodelab, "load", lambda *a, **k: pytest.fail("the model must not load"))
    result = CliRunner().invoke(cli.app, ["serve", *args])
    assert result.exit_code == 2 and result.stderr.startswith(needle), result.stderr
    assert len(result.stderr.splitlines()) == 1 and "two words" not in result.stderr


def test_cli_serve_warns_when_exposed_without_a_key(monkeypatch):
    def refuse(*a, **k):
        raise ModelLoadError("stopped here by the test")

    monkeypatch.setattr(decodelab, "load", refuse)
    monkeypatch.delenv("DECODELAB_API_KEY", raising=False)
    result = CliRunner().invoke(cli.app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("warning: serving on 0.0.0.0") and "--api-key" in lines[0]
    result = CliRunner().invoke(cli.app, ["serve", "--host", "0.0.0.0", "--api-key", "k-123456"])
    assert "warning" not in result.stderr
    monkeypatch.setenv("DECODELAB_API_KEY", "env-key-123")
    result = CliRunner().invoke(cli.app, ["serve", "--host", "0.0.0.0"])
    assert "warning" not in result.stderr


# --- CORS -----------------------------------------------------------------------------------------------------------
PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_by_default(keyed):
    _, client = keyed
    r = client.options("/v1/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/v1/models", headers={"Origin": "http://localhost:3000", **_auth(KEY)})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_allowed_origins_open_cors_to_those_origins_only(tiny_llama):
    app = create_app(_lm(tiny_llama), Settings(max_tokens=8, api_keys=(KEY,),
                                               allowed_origins=("http://localhost:3000",)))
    with TestClient(app) as client:
        r = client.options("/v1/completions", headers=PREFLIGHT)  # a preflight carries no key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = client.post("/v1/completions", json=BODIES["/v1/completions"],
                        headers={"Origin": "http://localhost:3000", **_auth(KEY)})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = client.get("/v1/models", headers={"Origin": "http://localhost:3000"})  # a 401 the page can read
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = client.options("/v1/completions", headers={**PREFLIGHT, "Origin": "http://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = client.get("/v1/models", headers={"Origin": "http://evil.example", **_auth(KEY)})
        assert "access-control-allow-origin" not in r.headers


# --- request log ----------------------------------------------------------------------------------------------------
SECRET_PROMPT = "my-private-essay-text"


def _logged(tiny_llama, caplog, **settings) -> tuple[str, str]:
    app = create_app(_lm(tiny_llama), Settings(max_tokens=8, api_keys=(KEY,), **settings))
    with caplog.at_level(logging.INFO, logger="decodelab"), TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": SECRET_PROMPT, "max_tokens": 3, "temperature": 0},
                        headers=_auth(KEY))
        assert r.status_code == 200
        output = r.json()["choices"][0]["text"]
        client.post("/api/tokenize", json={"text": SECRET_PROMPT}, headers=_auth(WRONG))
    return caplog.text, output


def test_request_log_has_no_text_and_no_key_by_default(tiny_llama, caplog):
    text, output = _logged(tiny_llama, caplog)
    assert "POST /v1/completions 200" in text and "client=key#1" in text and "POST /api/tokenize 401" in text
    assert SECRET_PROMPT not in text and KEY not in text and WRONG not in text
    assert output.strip() and output.strip() not in text


def test_log_requests_adds_the_bodies_but_never_the_key(tiny_llama, caplog):
    text, output = _logged(tiny_llama, caplog, log_requests=True)
    assert SECRET_PROMPT in text and "response body:" in text
    assert KEY not in text and WRONG not in text


# --- per-client limit -----------------------------------------------------------------------------------------------
def test_client_limiter_counts():
    lim = ClientLimiter(2)
    assert lim.enter("a") and lim.enter("a") and not lim.enter("a") and lim.enter("b")
    lim.leave("a")
    assert lim.enter("a") and lim.rejected == 1
    for _ in range(3):
        lim.leave("a")
    assert "a" not in lim.active
    unlimited = ClientLimiter(0)
    assert all(unlimited.enter("x") for _ in range(100))


@pytest.fixture(scope="module")
def slow_server(tiny_llama):
    """A keyed server, one request per client at a time, over a tiny model whose every decode step sleeps 30 ms."""
    lm = _lm(tiny_llama)
    step = lm.engine.step

    def slow_step(state, tokens):
        time.sleep(0.03)
        return step(state, tokens)

    lm.engine.step = slow_step
    app = create_app(lm, Settings(max_tokens=200, max_client_requests=1, api_keys=(KEY, OTHER_KEY)))
    with BackgroundServer(app) as srv:
        yield srv


LONG = {"prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}  # >= 6 s


def test_a_client_over_its_limit_gets_429_and_others_do_not(slow_server):
    with httpx.Client(base_url=slow_server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=LONG, headers=_auth(KEY)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # this client's one request is in flight
            start = time.monotonic()
            r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=_auth(KEY))
            waited = time.monotonic() - start
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert 1.0 <= waited < 5, waited  # it waited a second for the client's slot, then was refused
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
            assert "max_client_requests=1" in err["message"]
            spoofed = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                                  headers={**_auth(KEY), "X-Forwarded-For": "10.9.8.7"})
            assert spoofed.status_code == 429  # the client is its key, whatever headers say
            other = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=_auth(OTHER_KEY))
            assert other.status_code == 200, other.text
            assert client.get("/health").status_code == 200  # open routes are not counted
        # the stream is closed: the slot comes back
        deadline = time.monotonic() + 10
        while True:
            r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=_auth(KEY))
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        assert client.get("/health").json()["rate_limited"] >= 2


def test_a_request_over_the_limit_gets_the_slot_that_frees_within_the_wait(slow_server):
    short = {**LONG, "max_tokens": 8}  # about 0.3 s of decoding
    with httpx.Client(base_url=slow_server.url, timeout=30) as client:
        before = client.get("/health").json()["rate_limited"]
        with client.stream("POST", "/v1/completions", json=short, headers=_auth(KEY)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0},
                            headers=_auth(KEY))
            assert r.status_code == 200, r.text  # waited for the stream's slot instead of a 429
        assert client.get("/health").json()["rate_limited"] == before


def test_client_limiter_waits_first_come_first_served():
    import asyncio

    async def main():
        lim = ClientLimiter(1, wait_s=0.3)
        assert await lim.acquire("a") and await lim.acquire("b")
        start = time.monotonic()
        assert not await lim.acquire("a")  # nobody left: refused after the wait
        assert 0.3 <= time.monotonic() - start < 1 and lim.rejected == 1 and lim.active == {"a": 1, "b": 1}
        order: list[str] = []

        async def wait(name):
            if await lim.acquire("a"):
                order.append(name)

        first, second = asyncio.create_task(wait("first")), asyncio.create_task(wait("second"))
        await asyncio.sleep(0.05)
        lim.leave("a")  # the slot goes to the first waiter, the count stays 1
        await asyncio.sleep(0.01)
        assert order == ["first"] and lim.active["a"] == 1
        lim.leave("a")
        await asyncio.gather(first, second)
        assert order == ["first", "second"] and lim.active["a"] == 1
        gone = asyncio.create_task(lim.acquire("a"))  # a waiter whose connection closes holds nothing
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        lim.leave("a")
        assert "a" not in lim.active and not lim._waiting and lim.rejected == 1

    asyncio.run(main())


@pytest.mark.parametrize("calm_owner,expected", [("calm", ["c", "f0", "f1", "f2"]), ("flood", ["f0", "f1", "f2", "c"])])
def test_scheduler_takes_waiting_prompts_round_robin_between_clients(calm_owner, expected):
    from decodelab.scheduler import PASS_OWNER, Scheduler

    sched = Scheduler(engine=None, max_batch_size=4)
    gate, order, threads = threading.Event(), [], []

    def submit(owner, fn):
        def go():
            PASS_OWNER.set(owner)
            sched.run_pass(fn)

        threads.append(threading.Thread(target=go))
        threads[-1].start()

    def until(condition):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    try:
        submit("flood", lambda: gate.wait(10))  # the scheduler thread is busy with the flooder's first prompt
        until(lambda: sched.passes_started == 1)
        for i in range(3):  # the flooder's next three prompts wait, then one of another client
            submit("flood", lambda i=i: order.append(f"f{i}"))
            until(lambda: len(sched._passes) == i + 1)
        submit(calm_owner, lambda: order.append("c"))
        until(lambda: len(sched._passes) == 4)
        gate.set()
        for t in threads:
            t.join(10)
    finally:
        gate.set()
        sched.close()
    assert order == expected  # another client's prompt goes first; the same client's stay in order


def test_without_keys_the_client_is_its_address(tiny_llama):
    lm = _lm(tiny_llama)
    step = lm.engine.step
    gate = threading.Event()

    def held_step(state, tokens):
        gate.wait(10)
        return step(state, tokens)

    lm.engine.step = held_step
    app = create_app(lm, Settings(max_tokens=8, max_client_requests=2))
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=body)
                                                                  .status_code)) for _ in range(2)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 10
        while client.get("/health").json()["running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = client.post("/api/tokenize", json={"text": "x"})
        assert r.status_code == 429, r.text  # same address (127.0.0.1): same client, whatever the route
        gate.set()
        for w in workers:
            w.join(30)
        assert results == [200, 200]
        assert client.post("/api/tokenize", json={"text": "x"}).status_code == 200
