"""Schema-driven fuzzing: schemathesis generates requests from ``/openapi.json`` for every OpenAI and inspection
route, valid bodies (positive) and invalid ones (negative), against the app over a tiny random model. No response
may be a 5xx, and every response must have a documented status code and match its documented schema."""

from __future__ import annotations

import pytest
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401  (imported lazily by from_asgi: here, at collection,
# before any test's server threads run; see the ast.parse lock in conftest.py)
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

import decodelab
from decodelab.server import Settings, create_app

pytestmark = pytest.mark.timeout(600)

MAX_EXAMPLES = 30  # per operation and generation mode
# Not positive_data_acceptance: a schema-valid value may still be one decodelab rejects (a 400 naming it), e.g.
# max_tokens above the server's --max-tokens, or top_k=-1 (ranges live in GenerationConfig, not in the schema).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tiny_llama):
    lm = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)
    # small limits keep every generated request cheap: at most 8 new tokens, 2 choices / beams, 4 prompts
    app = create_app(lm, Settings(max_tokens=8, max_n=2, max_prompts=4, max_body_bytes=200_000))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(schema) -> list:
    ops = [result.ok() for result in schema.get_all_operations()]
    return [op for op in ops if op.path.startswith(("/v1/", "/api/"))]


def test_schema_covers_the_openai_and_inspection_routes(api_schema):
    paths = {op.path for op in _operations(api_schema)}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= paths


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzzed_requests_never_get_a_server_error(api_schema, mode):
    seen: list[tuple[str, int]] = []
    for op in _operations(api_schema):
        if mode is GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # a GET without parameters has no invalid form


        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            response = case.call()
            seen.append((op.label, response.status_code))
            assert response.status_code < 500, (op.label, case.body, response.status_code, response.text[:500])
            case.validate_response(response, checks=CHECKS)

        check()
    assert seen  # something was sent
    if mode is GenerationMode.NEGATIVE:
        rejected = [s for _, s in seen if 400 <= s < 500]
        assert len(rejected) > len(seen) // 2, "invalid requests should mostly be rejected"
