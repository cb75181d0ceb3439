"""The notebook widget (``lm.explore(text)``, decodelab/widget.py): its kernel side on the tiny Llama, and its
JavaScript (the playground's own files + widget.js) in Debian's chromium with the embedded model's real state.

The browser test loads the widget's ES module in a page with a stand-in for anywidget's model object (``get``,
``set``, ``on``, ``save_changes``, ``send``, as anywidget documents them) holding the state the kernel computed, and
checks the DOM: " night" first in the chart, the sliders reshape it, a click sets the text one token longer (step
mode), the generation is coloured with alternatives on hover, the beam tree is drawn, the lens heatmap and the
"follow a token" heatmap have one row per layer. Screenshot: test-artifacts/screenshots/widget.png. Running it inside JupyterLab is not tested here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import decodelab
from decodelab.errors import InputError

anywidget = pytest.importorskip("anywidget")

from decodelab.widget import STATIC_FILES, Explorer, _static, widget_esm  # noqa: E402

PROMPT = "It was a dark and stormy"
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, "tiny")


def test_kernel_side_state_step_mode_generation_and_fallback(tiny):
    w = tiny.explore(PROMPT)
    assert isinstance(w, Explorer)
    assert w.tokens["ids"] == tiny.tokenize(PROMPT).ids
    ids, last = tiny.next_logits(PROMPT)
    first = w.next["candidates"][0]
    assert first["id"] == int(last.argmax()) and first["logit"] == pytest.approx(float(last.max()))
    assert len(w.next["candidates"]) == 200 and w.next["tail"]["count"] == tiny.vocab_size - 200
    w.text = PROMPT + first["token"]  # what a bar click does
    assert w.tokens["ids"] == ids + [first["id"]]
    w._on_msg(w, {"type": "generate", "strategy": "beam search", "max_new_tokens": 3, "lens": True}, [])
    g = w.generation
    assert w.error == "" and len(g["sequences"]) == 4 and g["prompt_text"] == w.text
    assert g["sequences"][0]["ids"] == tiny.generate(w.text, num_beams=4, max_new_tokens=3).sequences[0].ids
    assert len(g["trace"]["lens"]) == 4 * 3 and len(g["trace"]["lens"][0]["layers"]) == 2
    w._on_msg(w, {"type": "follow", "token": " night"}, [])  # follow a token through the layers
    from decodelab.lens import follow_token

    grid = follow_token(tiny, tiny.generate(w.text, num_beams=4, num_return_sequences=4, max_new_tokens=3), " night")
    assert w.error == "" and len(w.follow["grid"]) == 3 and len(w.follow["grid"][0]) == 2
    assert w.follow["grid"] == [[list(c) for c in row] for row in grid]
    assert w.follow["steps"] == [tiny.tokenizer.decode([i]) for i in g["sequences"][0]["new_ids"]]
    w.follow_token(" dark and")
    assert w.error.startswith("invalid token=' dark and'")
    fresh = tiny.explore(PROMPT)
    fresh.follow_token(" night")
    assert fresh.error.startswith("generate first") and fresh.follow == {}
    w.settings = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.0}
    w.run_generation("sampling", 2)
    assert w.generation["trace"]["config"]["top_k"] == 5 and w.generation["trace"]["strategy"] == "sampling"
    w.run_generation("nucleus", 2)
    assert w.error.startswith("invalid strategy='nucleus'")
    data = w._repr_mimebundle_()[0]
    assert "application/vnd.jupyter.widget-view+json" in data
    assert "text/html" in data and str(ids[0]) in data["text/html"]  # the static fallback shows after reopening
    with pytest.raises(InputError):
        tiny.explore("")


def test_javascript_is_the_playgrounds_own():
    esm = widget_esm()
    for name in STATIC_FILES:
        assert _static(name) in esm  # joined unchanged: one code base
    assert "DL.views.tokenItems(gen)" in _static("app.js") and "function tokenItems" not in _static("app.js")
    assert "function tokenItems" not in _static("widget.js")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_widget_in_chromium(embedded, tmp_path, browser):
    lm = decodelab.LM(embedded.model, embedded.tokenizer, embedded.name)
    w = lm.explore(PROMPT)
    w.run_generation("beam search", 3, lens=True)
    w.follow_token(" night")
    state = {k: getattr(w, k) for k in ("text", "tokens", "next", "settings", "generation", "error", "follow")}
    stub = """
const state = %s, handlers = {};
window.sets = []; window.sent = [];
const model = {
  get: (k) => state[k],
  set: (k, v) => { state[k] = v; window.sets.push([k, v]); (handlers["change:" + k] || []).forEach((f) => f()); },
  on: (e, f) => { (handlers[e] = handlers[e] || []).push(f); },
  save_changes: () => {}, send: (m) => window.sent.push(m),
};
const el = document.getElementById("root");
render({ model, el });
window.ready = true;
""" % json.dumps(state)
    page_file = tmp_path / "widget.html"
    page_file.write_text('<!doctype html><meta charset="utf-8"><style>' + w._css + '</style><div id="root"></div>'
                         '<script type="module">' + widget_esm() + stub + "</script>", encoding="utf-8")
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    try:
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri())
        page.wait_for_function("window.ready === true", timeout=30_000)
        assert page.locator(".chip").count() == 6
        bars = page.locator("ol.bars button.cand")
        assert bars.count() == 10
        assert bars.nth(0).get_attribute("data-id") == "3163" and "night" in bars.nth(0).inner_text()
        assert page.locator("ol.bars button.cand.filtered").count() == 0
        page.locator("input[name=top_k]").fill("1")  # live reshaping, no kernel call
        page.locator("input[name=top_k]").dispatch_event("input")
        assert page.locator("ol.bars button.cand.filtered").count() == 9
        assert page.evaluate("window.sets.at(-1)")[1]["top_k"] == 1
        bars.nth(0).click()  # step mode
        assert page.evaluate("window.sets.filter((s) => s[0] === 'text').at(-1)[1]") == PROMPT + " night"
        assert page.locator(".dl-gen .gtok").count() == 3
        page.locator(".dl-gen .gtok").nth(0).hover()
        assert "night" in page.locator(".alts").inner_text()
        assert page.locator(".beamtree svg").count() == 1
        assert page.locator(".dl-lens table.lens tr.lens-row").count() == embedded.model.config.num_hidden_layers == 30
        assert page.locator(".dl-follow tr.lens-row").count() == 30  # ' night' followed through the layers
        assert page.locator(".dl-follow tr.lens-row").last.locator("td").first.inner_text() == "0"
        page.locator("input[name=follow]").fill(" day")
        page.locator("button.dl-follow-go").click()
        assert page.evaluate("window.sent")[-1] == {"type": "follow", "token": " day"}
        page.locator("button.dl-generate").click()
        assert page.evaluate("window.sent")[-1] == {"type": "generate", "strategy": "greedy",
                                                  "max_new_tokens": 12, "lens": False}
        page.screenshot(path=str(SHOTS / "widget.png"), full_page=True)
        assert not errors, errors
    finally:
        page.close()
