"""The web playground end to end: Debian's chromium (headless, through Playwright for Python) against a live uvicorn
server running the embedded SmolLM2-135M-Instruct. Assertions are on the DOM content, compared with the Python API;
screenshots go to test-artifacts/screenshots/ (git-ignored) for people to look at.

Needs /usr/bin/chromium (``make browser`` installs it as root; ``make test`` does it first). Playwright's own browser
download (``playwright install``) is never used.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import decodelab
from decodelab.server import Settings, create_app
from decodelab.server.background import BackgroundServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
PROMPT = "It was a dark and stormy"
WAIT_MS = 120_000  # a model call on a busy 2-core machine


@pytest.fixture(scope="module")
def lm(embedded):
    return decodelab.LM(embedded.model, embedded.tokenizer, embedded.name)


@pytest.fixture(scope="module")
def server(lm):
    with BackgroundServer(create_app(lm, Settings(max_tokens=64, max_n=4))) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(browser, server):
    """One laptop-sized page shared by the tests below, in order (each leaves the page usable for the next)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.api_requests = []  # URLs of /api/ requests the page made
    pg.on("request", lambda r: pg.api_requests.append(r.url) if "/api/" in r.url else None)
    pg.goto(server.url + "/")
    yield pg
    context.close()
    assert not errors, errors


def chip_ids(pg) -> list[int]:
    return [int(x) for x in pg.eval_on_selector_all("#chips .chip", "els => els.map(e => e.dataset.id)")]


def bar_ids(pg) -> list[int]:
    return [int(x) for x in pg.eval_on_selector_all("#bars .cand", "els => els.map(e => e.dataset.id)")]


def wait_current_node(pg, text: str) -> None:
    """Wait until the step-mode node shown is ``text`` with its distribution loaded; on a timeout, fail with what
    the page was showing (current node, its text, the error banner, the busy flag, the API requests made)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        pg.wait_for_function(
            "t => { const n = DL.state.branches[DL.state.current]; return n && n.text === t && n.dist && n.tokens &&"
            " document.querySelectorAll('#bars .cand').length && DL.state.branches[DL.state.current].dist.text === t;"
            " }", arg=text)
    except PlaywrightTimeout:
        seen = pg.evaluate(
            "() => { const n = (DL.state.branches || [])[DL.state.current];"
            " const err = document.getElementById('error');"
            " return {current: DL.state.current, nodes: (DL.state.branches || []).length,"
            " text: n ? n.text : null, has_dist: !!(n && n.dist), dist_text: n && n.dist ? n.dist.text : null,"
            " has_tokens: !!(n && n.tokens), bars: document.querySelectorAll('#bars .cand').length,"
            " busy: !document.getElementById('busy-tokens').hidden, error: err && !err.hidden ? err.innerText : null}; }")
        pytest.fail(f"page never showed {text!r}: {seen}; API requests: {pg.api_requests[-6:]}")


def type_prompt(pg, text: str) -> None:
    pg.fill("#prompt", text)
    pg.click("#analyse")
    wait_current_node(pg, text)


def test_tokens_and_next_token_chart(page, lm):
    type_prompt(page, "<|im_start|>Zażółć 🙂")
    tokens = lm.tokenize("<|im_start|>Zażółć 🙂")
    assert chip_ids(page) == tokens.ids
    assert page.locator("#chips .chip.special").count() == 1  # <|im_start|>
    assert page.locator("#chips .chip.partial").count() == 2  # "ż" as two byte tokens
    assert page.inner_text("#chips .chip.partial >> nth=0").startswith("<0xC5>")
    page.locator("#chips .chip >> nth=3").focus()
    assert "C5" in page.inner_text("#chip-detail")  # the byte is shown on focus
    page.screenshot(path=str(SHOTS / "01-tokens-special-bytes.png"))

    type_prompt(page, PROMPT)
    assert chip_ids(page) == lm.tokenize(PROMPT).ids == [1589, 436, 253, 3605, 284, 43471]
    assert page.inner_text("#token-count") == "6"
    ref = lm.next_token(PROMPT, top_k=10)
    assert bar_ids(page) == [c.id for c in ref.top]
    assert page.inner_text("#bars .cand >> nth=0 >> .tok") == "␣night"
    probs = [float(x) for x in page.eval_on_selector_all("#bars .cand", "els => els.map(e => e.dataset.raw)")]
    assert probs == pytest.approx([c.prob for c in ref.top], abs=1e-4)
    assert "97.1%" in page.inner_text("#bars .cand >> nth=0")
    page.screenshot(path=str(SHOTS / "02-tokens-and-next-token.png"), full_page=True)


def test_sliders_reshape_without_a_request(page, server):
    before = len(page.api_requests)
    first = lambda: float(page.get_attribute("#bars .cand >> nth=0", "data-prob"))  # noqa: E731
    assert first() == pytest.approx(0.9707, abs=1e-3)
    page.fill("#temperature", "1.5")
    assert page.inner_text("#temperature-out") == "1.50"
    assert first() < 0.8  # flatter: the favourite loses mass
    page.fill("#topk", "3")
    assert page.locator("#bars .cand.filtered").count() == 7
    assert page.locator("#bars .cand.filtered >> nth=0 >> .p-after").inner_text() == "filtered"
    page.fill("#topk", "0")
    page.fill("#topp", "0.5")  # " night" alone already holds more than half of the mass
    assert page.locator("#bars .cand.filtered").count() == 9 and first() == 1.0
    page.fill("#topp", "1")
    page.fill("#minp", "0.02")  # keeps tokens with p >= 0.02 x p(" night"): " evening" and " day"
    assert bar_ids(page)[:3] == [int(x) for x in page.eval_on_selector_all(
        "#bars .cand:not(.filtered)", "els => els.map(e => e.dataset.id)")]
    assert page.locator("#bars .cand.filtered").count() == 7
    page.screenshot(path=str(SHOTS / "03-reshaped-distribution.png"))
    assert len(page.api_requests) == before  # only the page's own maths moved the bars

    # the JavaScript mirror agrees with the server's warpers (decodelab.processors) on the full vocabulary
    settings = [{"temperature": 1.0}, {"temperature": 1.7, "top_p": 0.9}, {"temperature": 0.7, "top_k": 3},
                {"temperature": 2.0, "min_p": 0.05}, {"temperature": 1.3, "top_k": 20, "top_p": 0.6},
                {"temperature": 0}]
    for s in settings:
        js = page.evaluate("s => DL.reshape(DL.state.branches[DL.state.current].dist.logits, s)", s)
        api = httpx.post(server.url + "/api/next-token", timeout=WAIT_MS / 1000, json={
            "text": PROMPT, "temperature": s["temperature"], "top_k_filter": s.get("top_k"),
            "top_p": s.get("top_p"), "min_p": s.get("min_p")}).json()
        assert js["kept"][:10] == [a["kept"] for a in api["after"]], s
        assert js["probs"][:10] == pytest.approx([a["prob"] for a in api["after"]], abs=1e-4), s
        assert js["keptCount"] == api["kept_count"], s
    page.click("#reset-warpers")
    assert first() == pytest.approx(0.9707, abs=1e-3)


def test_step_mode_keyboard_undo_and_branches(page, lm):
    page.focus("#reset-warpers")
    page.keyboard.press("Tab")  # the next stop in tab order is the first candidate
    assert page.evaluate("document.activeElement.classList.contains('cand')")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # visible keyboard focus
    page.keyboard.press("Enter")
    wait_current_node(page, PROMPT + " night")
    assert page.input_value("#prompt") == PROMPT + " night"
    assert chip_ids(page) == lm.tokenize(PROMPT + " night").ids
    assert bar_ids(page)[0] == lm.next_token(PROMPT + " night").top[0].id  # ","
    page.wait_for_function("document.activeElement.classList.contains('cand')")  # focus back on the new bars
    assert page.evaluate("+document.activeElement.dataset.id") == bar_ids(page)[0]

    page.click("#undo")
    assert page.input_value("#prompt") == PROMPT and chip_ids(page) == lm.tokenize(PROMPT).ids
    page.click("#bars .cand >> nth=1")  # " evening": a second branch from the prompt
    wait_current_node(page, PROMPT + " evening")
    page.click("#bars .cand >> nth=0")
    nxt = PROMPT + " evening" + lm.next_token(PROMPT + " evening").top[0].token
    wait_current_node(page, nxt)
    branches = page.eval_on_selector_all("#branches .branch", "els => els.map(e => e.textContent)")
    assert branches[:3] == ["prompt", "␣night", "␣evening"] and len(branches) == 4
    assert page.get_attribute("#branches .branch.current", "title") == nxt
    page.locator("#panel-next").screenshot(path=str(SHOTS / "04-step-mode-branches.png"))
    page.click("#branches .branch >> nth=1")  # back to the " night" branch, from the cache
    assert page.input_value("#prompt") == PROMPT + " night"
    page.click("#undo")
    assert page.input_value("#prompt") == PROMPT


def test_generate_greedy_streamed_and_coloured(page, lm):
    page.select_option("#gen-strategy", "greedy")
    page.fill("#gen-max", "6")
    page.click("#generate")
    page.wait_for_selector("#gen-output .gtok")
    ref = lm.generate(PROMPT, max_new_tokens=6)
    seq = ref.sequences[0]
    assert page.evaluate("DL.state.generation.gen.sequences[0].new_text") == seq.new_text
    assert page.evaluate("DL.state.deltas") >= 2  # arrived as a stream of deltas
    ids = page.eval_on_selector_all("#gen-output .gtok", "els => els.map(e => +e.dataset.id)")
    assert ids == seq.new_ids
    assert seq.new_text in page.inner_text("#gen-seqs")
    assert page.inner_text("#gen-output").startswith(PROMPT)
    # hover / focus a token: its alternatives at that step, the chosen one marked
    page.hover("#gen-output .gtok >> nth=2")
    alts = page.inner_text("#gen-alts")
    assert "Alternatives at step 3" in alts and "␣and" in alts
    assert "null" not in alts  # no constraint: no header, not the text "null"
    assert page.inner_text("#gen-alts li.chosen code") == "␣with"
    page.locator("#panel-generate").screenshot(path=str(SHOTS / "05-generate-greedy.png"))


def test_generate_beam_tree(page, lm):
    page.select_option("#gen-strategy", "beam")
    page.fill("#gen-beams", "3")
    page.fill("#gen-max", "4")
    page.click("#generate")
    page.wait_for_selector("#tree svg .bn")
    ref = lm.generate(PROMPT, num_beams=3, max_new_tokens=4, trace=True)
    assert page.evaluate("DL.state.generation.gen.sequences[0].new_text") == ref.sequences[0].new_text
    statuses = page.eval_on_selector_all("#tree .bn", "els => els.map(e => e.dataset.status)")
    assert statuses == [n.status for n in ref.trace.beam_nodes]
    assert {"kept", "pruned", "returned"} <= set(statuses)
    returned = page.locator("#tree .bn.st-returned")
    assert returned.count() == sum(n.status == "returned" for n in ref.trace.beam_nodes) >= 1
    assert page.locator("#tree path.edge.onpath").count() == 4  # the returned beam's 4 steps, highlighted
    returned.first.focus()
    assert "returned" in page.inner_text("#tree-detail")
    ids = page.eval_on_selector_all("#gen-output .gtok", "els => els.map(e => +e.dataset.id)")
    assert ids == ref.sequences[0].new_ids
    page.locator("#panel-tree").screenshot(path=str(SHOTS / "06-beam-tree.png"))
    page.screenshot(path=str(SHOTS / "07-generate-beam-page.png"), full_page=True)


def test_generate_with_logit_lens(page, lm):
    page.select_option("#gen-strategy", "greedy")
    page.fill("#gen-max", "3")
    page.check("#gen-lens-on")
    page.click("#generate")
    page.wait_for_selector("#gen-lens tr.lens-row")
    ref = lm.generate(PROMPT, max_new_tokens=3, lens=5)
    assert page.locator("#gen-lens tr.lens-row").count() == lm.model.config.num_hidden_layers == 30
    last = page.eval_on_selector_all("#gen-lens tr.lens-row:last-child td", "els => els.map(e => e.textContent)")
    assert last == [s.layers[-1].top[0].token.replace(" ", "␣") for s in ref.trace.lens]
    assert "97.1%" in page.get_attribute("#gen-lens tr.lens-row:last-child td >> nth=0", "title")  # p(' night')
    page.locator("#gen-lens").screenshot(path=str(SHOTS / "07b-logit-lens.png"))
    page.uncheck("#gen-lens-on")


def test_generation_controls_come_from_the_knob_metadata(page, lm, server):
    """knobs.js: GET /api/knobs bounds the hand-made controls and builds one for every other knob."""
    page.wait_for_selector("#gen-form .knobs-more")
    rows = httpx.get(server.url + "/api/knobs").json()["knobs"]
    built = page.eval_on_selector_all("#gen-form [data-knob]", "els => els.map(e => e.name)")
    assert built == ["min_new_tokens", "eos_token_id", "ignore_eos", "stop_strings", "early_stopping", "min_p",
                     "typical_p", "epsilon_cutoff", "eta_cutoff", "bad_words_ids", "suppress_tokens",
                     "sequence_bias", "presence_penalty", "frequency_penalty", "logit_bias", "trace_top_k"]
    typical = next(r for r in rows if r["name"] == "typical_p")
    assert page.get_attribute("#gen-form [name=typical_p]", "title") == typical["doc"] + " (in (0, 1])"
    assert page.get_attribute("#gen-max", "max") == "64"  # the server's --max-tokens, from server_max
    assert page.get_attribute("#gen-max", "min") == "1"  # the page's own bound is tighter than the knob's 0
    assert page.get_attribute("#gen-form [name=top_p]", "max") == "1"
    page.select_option("#gen-strategy", "sampling")
    page.click("#gen-form .knobs-more summary")
    page.fill("#gen-form [name=min_p]", "0.05")  # a sampling knob: hidden, so not sent, with greedy
    page.select_option("#gen-strategy", "greedy")
    assert not page.is_visible("#gen-form [name=min_p]")
    page.fill("#gen-max", "3")
    first = lm.generate(PROMPT, max_new_tokens=1).sequences[0].new_ids[0]
    page.fill("#gen-form [name=suppress_tokens]", str(first))
    page.fill("#gen-form [name=stop_strings]", "zzz")
    assert page.evaluate("DL.kwargsFrom(document.getElementById('gen-form'))") == {
        "max_new_tokens": 3, "repetition_penalty": 1, "no_repeat_ngram_size": 0, "suppress_tokens": [first],
        "stop_strings": "zzz"}
    page.click("#generate")
    ref = lm.generate(PROMPT, max_new_tokens=3, suppress_tokens=[first], stop_strings="zzz").sequences[0]
    assert ref.new_ids[0] != first
    page.wait_for_function(f"DL.state.generation && DL.state.generation.gen.sequences[0].new_ids[0] === "
                           f"{ref.new_ids[0]}")
    assert page.evaluate("DL.state.generation.gen.sequences[0].new_ids") == ref.new_ids
    page.fill("#gen-form [name=suppress_tokens]", "")
    page.fill("#gen-form [name=stop_strings]", "")
    page.select_option("#gen-strategy", "sampling")
    page.fill("#gen-form [name=min_p]", "")
    page.select_option("#gen-strategy", "greedy")
    page.click("#gen-form .knobs-more summary")


def test_compare_two_strategies(page, lm):
    page.select_option("#cmp-n", "2")
    page.fill("#gen-max", "4")
    cols = page.locator("#cmp-cols .cmp-col")
    assert cols.count() == 2
    page.click("#compare")
    page.wait_for_function("DL.state.compare.length === 2")
    greedy = lm.generate(PROMPT, max_new_tokens=4).sequences[0]
    sampled = lm.generate(PROMPT, max_new_tokens=4, do_sample=True, temperature=0.8, top_p=0.95, top_k=50,
                          seed=0).sequences[0]
    texts = page.evaluate("DL.state.compare.map(c => c.generation.sequences[0].new_text)")
    assert texts == [greedy.new_text, sampled.new_text]
    ids = page.eval_on_selector_all("#cmp-cols .cmp-col >> nth=1 >> .gtok", "els => els.map(e => +e.dataset.id)")
    assert ids == sampled.new_ids
    page.locator("#panel-compare").screenshot(path=str(SHOTS / "08-compare.png"))


def test_polish(page):
    page.click("#lang-pl")
    assert page.get_attribute("html", "lang") == "pl"
    assert page.inner_text("#h-next") == "2. Następny token"
    assert page.inner_text("#generate") == "Generuj"
    assert "Softmax zamienia logity" in page.inner_text("#panel-next .explain")
    assert "odrzucony" not in page.inner_text("#bars")  # nothing filtered at the default settings
    page.fill("#topp", "0.5")
    assert page.locator("#bars .cand.filtered >> nth=0 >> .p-after").inner_text() == "odrzucony"
    page.click("#reset-warpers")
    page.screenshot(path=str(SHOTS / "09-polish.png"))
    page.click("#lang-en")
    assert page.inner_text("#generate") == "Generate"


def test_api_errors_are_shown(page):
    page.select_option("#gen-strategy", "greedy")
    page.fill("#gen-max", "99999")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "max_new_tokens=99999" in page.inner_text("#error-text")
    assert page.get_attribute("#error", "role") == "alert"
    box = page.locator("#error").bounding_box()
    assert 0 <= box["y"] < 900  # in view although the page is scrolled down to the generate panel
    page.screenshot(path=str(SHOTS / "10-api-error.png"))  # the banner stays in view (sticky)
    page.click("#error-close")
    page.fill("#prompt", "")
    page.click("#analyse")
    page.wait_for_selector("#error:not([hidden])")
    assert "text is empty" in page.inner_text("#error-text")
    page.fill("#prompt", PROMPT)
    page.click("#analyse")
    page.wait_for_selector("#error", state="hidden")  # the next good request clears it: the page keeps working
    wait_current_node(page, PROMPT)


def test_phone_width_layout(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    pg.goto(server.url + "/")
    wait_current_node(pg, PROMPT)
    assert pg.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    content = pg.locator("#panel-next .content").bounding_box()
    explain = pg.locator("#panel-next .explain").bounding_box()
    assert explain["y"] >= content["y"] + content["height"] - 1  # explanation stacked below, not beside
    bar = pg.locator("#bars .cand >> nth=0").bounding_box()
    assert bar["x"] >= 0 and bar["x"] + bar["width"] <= 390
    pg.screenshot(path=str(SHOTS / "11-phone.png"))
    pg.locator("#panel-next").screenshot(path=str(SHOTS / "12-phone-next-token.png"))
    context.close()


KEY = "class-key-8c41d7"


def test_keyed_server_asks_for_the_key_once_and_shows_the_chart(browser, lm):
    """A server started with an API key: the page asks for it on the first refused call, a wrong key is asked
    again, the right one brings the next-token chart and is sent on every later call, and it lasts for the tab
    (a reload does not ask again) but not for a new browser session."""
    with BackgroundServer(create_app(lm, Settings(max_tokens=64, api_keys=(KEY,)))) as srv:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        pg.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        sent: list[tuple[str, str | None]] = []  # (path, Authorization header) of each /api/ request
        pg.on("request", lambda r: sent.append((r.url.split(srv.url, 1)[-1], r.headers.get("authorization")))
              if "/api/" in r.url else None)
        pg.goto(srv.url + "/")  # the page analyses its default prompt at once: a 401
        pg.wait_for_selector("#key-dialog[open]")
        assert pg.is_hidden("#key-refused") and sent and sent[0][1] is None
        pg.screenshot(path=str(SHOTS / "13-api-key-dialog.png"))

        pg.fill("#api-key", "wrong-key-123")
        pg.click("#key-ok")
        pg.wait_for_selector("#key-dialog[open] #key-refused:not([hidden])")  # refused: asked again
        assert ("/api/tokenize", "Bearer wrong-key-123") in sent or ("/api/next-token", "Bearer wrong-key-123") in sent
        pg.fill("#api-key", KEY)
        pg.click("#key-ok")
        pg.wait_for_selector("#key-dialog", state="hidden")
        wait_current_node(pg, PROMPT)
        assert bar_ids(pg) == [c.id for c in lm.next_token(PROMPT, top_k=10).top]
        assert pg.inner_text("#bars .cand >> nth=0 >> .tok") == "␣night"
        assert pg.is_hidden("#error")
        assert pg.evaluate("sessionStorage.getItem('decodelab.apiKey')") == KEY
        pg.screenshot(path=str(SHOTS / "14-keyed-next-token.png"))

        sent.clear()
        pg.reload()  # same tab: the key is kept, nothing asked
        wait_current_node(pg, PROMPT)
        assert pg.is_hidden("#key-dialog") and sent and all(auth == f"Bearer {KEY}" for _, auth in sent)
        assert not errors, errors
        context.close()

        fresh = browser.new_context()  # a new browser session asks again
        pg = fresh.new_page()
        pg.set_default_timeout(WAIT_MS)
        pg.goto(srv.url + "/")
        pg.wait_for_selector("#key-dialog[open]")
        fresh.close()
