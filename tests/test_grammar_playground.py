"""The playground's constraint view, in Debian's chromium (Playwright) against a live server over the embedded
SmolLM2-135M-Instruct: a JSON schema chosen in the generate panel constrains the output, and hovering a generated
token shows what the constraint did at that step (allowed count, mass removed, JSON path) with the forbidden
candidates struck through; values compared with ``LM.generate(..., trace=True)``. Screenshot in
test-artifacts/screenshots/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decodelab.server import Settings, create_app
from decodelab.server.background import BackgroundServer
from test_grammar import CITY, lm  # noqa: F401 -- lm: the module-scoped LM fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
SCHEMA = CITY
PROMPT = "The Eiffel Tower as JSON: "


@pytest.fixture(scope="module")
def page(lm, browser):
    errors: list[str] = []
    with BackgroundServer(create_app(lm, Settings(max_tokens=64, max_n=4))) as srv:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        pg.set_default_timeout(180_000)
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(srv.url + "/")
        yield pg
        context.close()
    assert not errors, errors


def test_constrained_generation_shows_forbidden_candidates(page, lm):
    page.fill("#prompt", PROMPT)
    page.select_option("#gen-strategy", "greedy")
    page.fill("#gen-max", "24")
    assert page.is_hidden("#gen-spec-label")
    page.select_option("#gen-constraint", "json_schema")
    assert page.is_visible("#gen-spec-label") and '"city"' in page.input_value("#gen-spec")  # an example to start
    page.fill("#gen-spec", json.dumps(SCHEMA))
    page.click("#generate")
    page.wait_for_function("DL.state.generation && DL.state.generation.gen.sequences.length > 0")
    ref = lm.generate(PROMPT, json_schema=SCHEMA, max_new_tokens=24, trace=True)
    seq = ref.sequences[0]
    assert seq.constraint_met is True
    assert page.evaluate("DL.state.generation.gen.sequences[0].new_text") == seq.new_text
    json.loads(seq.new_text)
    # the first step: the model wanted something else; its choices are struck through
    c0 = ref.trace.steps[0].constraint
    page.hover("#gen-output .gtok >> nth=0")
    head = page.inner_text("#gen-alts .constraint-h")
    assert f"{c0.allowed:,} tokens allowed" in head and "JSON schema" in head and "at $" in head
    struck = page.eval_on_selector_all("#gen-alts li.forbidden code", "els => els.map(e => e.textContent)")
    assert len(struck) >= len(c0.forbidden) >= 1
    deco = page.eval_on_selector("#gen-alts li.forbidden code", "e => getComputedStyle(e).textDecorationLine")
    assert deco == "line-through"
    assert page.locator("#gen-alts li.chosen.forbidden").count() == 0  # the chosen token was allowed
    # a step inside the value of "country" shows that path
    k = next(i for i, s in enumerate(ref.trace.steps) if s.constraint.path == "$.country")
    page.hover(f"#gen-output .gtok >> nth={k}")
    assert "$.country" in page.inner_text("#gen-alts .constraint-h")
    page.locator("#panel-generate").screenshot(path=str(SHOTS / "12-generate-json-schema.png"))
