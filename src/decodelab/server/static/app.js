/* decodelab playground: state and wiring. Panels: tokens, next token (+ step mode with a branch tree), generate
 * (streamed, coloured, alternatives), beam tree, compare. All model work happens on the server (/api/*); the
 * sliders of the next-token panel reshape the distribution here (DL.reshape) without a request. */
(function () {
  "use strict";
  const { el, visible, pct } = DL.views;
  const $ = (id) => document.getElementById(id);
  const BARS = 10;

  const state = {
    branches: [],        // step-mode tree: {id, parent, text, label, tokenId, children: [ids], tokens, dist}
    current: -1,         // id of the node shown
    shaped: null,        // last DL.reshape result for the current node
    generation: null,    // last /api/generate(/stream) result of the generate panel
    compare: [],         // [{kwargs, generation, error}] per compare column
    requests: 0,         // inspection requests sent (tests read this)
    deltas: 0,           // streamed delta events received by the generate panel
  };

  // --- errors ------------------------------------------------------------------------------------------------
  function showError(err) {
    if (err && err.name === "AbortError") return;
    $("error-text").textContent = err && err.message ? err.message : String(err);
    $("error").hidden = false;
  }
  const clearError = () => { $("error").hidden = true; };

  async function call(path, body, signal) {
    state.requests += 1;
    return DL.api.post(path, body, signal);
  }

  // --- 1 + 2: tokens, next-token distribution, step mode ----------------------------------------------------------
  const node = (id) => state.branches[id];
  let wanted = null, pumping = false, typingTimer = 0;
  let refocus = false; // a keyboard user picked a candidate: put focus back on the new first candidate

  /** Analyse `text` for branch node `target` (null: a new root from what the user typed). Only one request pair
   *  is in flight; newer wishes replace older ones. */
  function requestAnalyse(text, target) {
    wanted = { text, target };
    if (!pumping) pump();
  }

  async function pump() {
    pumping = true;
    $("busy-tokens").hidden = false;
    while (wanted) {
      const job = wanted;
      wanted = null;
      try {
        const [tokens, dist] = await Promise.all([
          call("/api/tokenize", { text: job.text }),
          call("/api/next-token", { text: job.text, top_k: BARS, logits_k: 200, ...warperSettings() }),
        ]);
        if (wanted) continue; // superseded while waiting
        // the prompt was edited while this analysis was in flight: showing it would overwrite the new text
        // (show() writes the node's text into the prompt); the edit's own analysis is already scheduled
        if (job.target == null && $("prompt").value !== job.text) continue;
        clearError();
        let target = job.target;
        if (target == null) {
          state.branches = [];
          target = addNode(null, job.text, null, null);
        }
        node(target).tokens = tokens;
        node(target).dist = dist;
        show(target);
        if (refocus && target === state.current) focusFirstBar();
      } catch (err) {
        showError(err);
      }
    }
    pumping = false;
    $("busy-tokens").hidden = true;
  }

  function addNode(parent, text, label, tokenId) {
    const n = { id: state.branches.length, parent, text, label, tokenId, children: [], tokens: null, dist: null };
    state.branches.push(n);
    if (parent != null) node(parent).children.push(n.id);
    return n.id;
  }

  /** Make branch node `id` the current one: prompt text, chips, bars, branch list. */
  function show(id) {
    state.current = id;
    const n = node(id);
    $("prompt").value = n.text;
    $("undo").disabled = n.parent == null;
    if (n.tokens) {
      DL.views.chips($("chips"), n.tokens, $("chip-detail"));
      $("token-count").textContent = String(n.tokens.ids.length);
    }
    if (n.dist) reshapeBars();
    renderBranches();
  }

  function warperSettings() {
    return {
      temperature: Number($("temperature").value),
      top_k_filter: Number($("topk").value),
      top_p: Number($("topp").value),
      min_p: Number($("minp").value),
    };
  }

  /** Redraw the bars for the current settings, client-side only. */
  function reshapeBars() {
    const n = node(state.current);
    const s = warperSettings();
    $("temperature-out").textContent = s.temperature.toFixed(2);
    $("topk-out").textContent = String(s.top_k_filter);
    $("topp-out").textContent = s.top_p.toFixed(2);
    $("minp-out").textContent = s.min_p.toFixed(2);
    if (!n || !n.dist) return;
    const shaped = DL.reshape(n.dist.logits, { temperature: s.temperature, top_k: s.top_k_filter,
                                               top_p: s.top_p, min_p: s.min_p });
    state.shaped = shaped;
    DL.views.bars($("bars"), n.dist.logits.candidates, shaped, BARS, pick);
    $("dist-stats").textContent = DL.t("entropy") + " " + shaped.entropy.toFixed(2) + " → " +
      shaped.entropyAfter.toFixed(2) + " " + DL.t("nats") + " · " +
      DL.t("keptTokens", { n: DL.num(shaped.keptCount), v: DL.num(n.dist.vocab_size) });
  }

  /** Step mode: append candidate `c` to the current text (a new branch, or the existing one for that token). */
  function pick(c) {
    const cur = node(state.current);
    if (!cur) return;
    refocus = !!(document.activeElement && document.activeElement.classList.contains("cand"));
    let childId = cur.children.find((k) => node(k).tokenId === c.id);
    if (childId == null) childId = addNode(cur.id, cur.text + c.token, c.display, c.id);
    const child = node(childId);
    if (child.dist) { show(childId); if (refocus) focusFirstBar(); return; }
    state.current = childId;
    $("prompt").value = child.text;
    renderBranches();
    requestAnalyse(child.text, childId);
  }

  function focusFirstBar() {
    refocus = false;
    const b = document.querySelector("#bars .cand");
    if (b) b.focus();
  }

  function undo() {
    const cur = node(state.current);
    if (cur && cur.parent != null) show(cur.parent);
  }

  function renderBranches() {
    const box = $("branches");
    box.replaceChildren();
    if (!state.branches.length) return;
    const list = (id) => {
      const n = node(id);
      const btn = el("button", {
        type: "button", class: "branch" + (id === state.current ? " current" : ""),
        "aria-current": id === state.current ? "true" : null, dataset: { node: String(id) },
        title: n.text, onclick: () => (n.dist ? show(id) : requestAnalyse(n.text, id)),
      }, [n.parent == null ? DL.t("root") : visible(n.label)]);
      const kids = n.children.length ? el("ul", {}, n.children.map((k) => list(k))) : null;
      return el("li", {}, [btn, kids]);
    };
    box.append(el("ul", { class: "tree-list" }, [list(0)]));
  }

  // --- 3: generate ------------------------------------------------------------------------------------------------
  /** LM.generate keywords from a parameter form (strategy select + named inputs). */
  function kwargsFrom(form) {
    const val = (name) => (form.elements[name] ? form.elements[name].value.trim() : "");
    const num = (name) => (val(name) === "" ? null : Number(val(name)));
    const strategy = val("strategy");
    const kw = { max_new_tokens: num("max_new_tokens"), repetition_penalty: num("repetition_penalty"),
                 no_repeat_ngram_size: num("no_repeat_ngram_size") };
    if (strategy === "sampling") Object.assign(kw, { do_sample: true, temperature: num("temperature"),
                                                     top_k: num("top_k"), top_p: num("top_p"), seed: num("seed") });
    if (strategy === "beam") Object.assign(kw, { num_beams: num("num_beams"),
                                                 num_return_sequences: num("num_return_sequences"),
                                                 length_penalty: num("length_penalty") });
    for (const k of Object.keys(kw)) if (kw[k] == null) delete kw[k];
    const kind = val("constraint");
    if (kind && val("constraint_spec")) kw[kind] = val("constraint_spec");  // json_schema as JSON text: the server parses it
    if (form.elements.lens && form.elements.lens.checked) kw.lens = 5;  // logit lens: top 5 per layer and step
    return DL.knobs.read(form, kw);  // the controls built from /api/knobs (knobs.js)
  }

  /** Examples shown when a constraint kind is chosen with an empty text box. */
  const CONSTRAINT_EXAMPLES = {
    json_schema: '{"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},\n' +
                 ' "required": ["city", "country"], "additionalProperties": false}',
    regex: "[A-Z][a-z]+, [A-Z][a-z]+\\.",
    grammar: 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"',
  };

  function syncConstraint(form) {
    const kind = form.elements.constraint.value, spec = form.elements.constraint_spec;
    $("gen-spec-label").hidden = !kind;
    if (kind && (!spec.value.trim() || Object.values(CONSTRAINT_EXAMPLES).includes(spec.value))) {
      spec.value = CONSTRAINT_EXAMPLES[kind];
    }
  }

  function syncStrategy(form) {
    const strategy = form.elements.strategy.value;
    form.querySelectorAll("[data-show]").forEach((l) => { l.hidden = l.dataset.show !== strategy; });
  }

  function renderGeneration(gen, prompt, out, alts, seqs) {
    out.replaceChildren(el("span", { class: "prompt-text", text: prompt }));
    const items = DL.views.tokenItems(gen);
    DL.views.coloured(out, items, (it, i) => DL.views.alternatives(alts, it, i));
    alts.replaceChildren(el("p", { class: "hint", text: DL.t("altHint") }));
    if (!seqs) return;
    seqs.replaceChildren(el("ol", {}, gen.sequences.map((s, i) => el("li", { class: "seq", dataset: { index: String(i) } }, [
      el("span", { class: "seq-h", text: DL.t("sequence", { n: i + 1 }) + ": " }),
      el("q", { text: s.new_text }),
      el("span", { class: "meta", text: " · " + DL.t("score") + " " + s.score.toFixed(3) + " · " + DL.t("finish") +
        " " + DL.t("finish." + s.finish_reason) }),
    ]))));
  }

  let genAbort = null;

  async function generate() {
    const form = $("gen-form");
    const prompt = $("prompt").value;
    const kwargs = kwargsFrom(form);
    clearError();
    genAbort = new AbortController();
    $("generate").disabled = true;
    $("stop").disabled = false;
    $("gen-status").textContent = DL.t("generating");
    const out = $("gen-output"), best = $("gen-best");
    out.replaceChildren(el("span", { class: "prompt-text", text: prompt }), el("span", { class: "streamed" }));
    best.hidden = true;
    $("gen-alts").replaceChildren();
    $("gen-seqs").replaceChildren();
    const streamed = out.querySelector(".streamed");
    const started = performance.now();
    state.requests += 1;
    try {
      await DL.api.stream("/api/generate/stream", { prompt, ...kwargs }, (ev) => {
        if (ev.type === "delta") {
          state.deltas += 1;
          streamed.textContent += ev.text;
          if (ev.best != null) { best.hidden = false; best.textContent = DL.t("bestSoFar") + ": " + ev.best; }
        } else if (ev.type === "done") {
          state.generation = { gen: ev.generation, prompt };
          best.hidden = true;
          renderGeneration(ev.generation, prompt, out, $("gen-alts"), $("gen-seqs"));
          DL.views.lensHeatmap($("gen-lens"), ev.generation.trace, 0);
          renderTree();
        }
      }, genAbort.signal);
      $("gen-status").textContent = DL.t("doneIn", { s: ((performance.now() - started) / 1000).toFixed(1) });
    } catch (err) {
      $("gen-status").textContent = err.name === "AbortError" ? DL.t("stopped") : "";
      showError(err);
    } finally {
      $("generate").disabled = false;
      $("stop").disabled = true;
      genAbort = null;
    }
  }

  // --- 4: beam tree -------------------------------------------------------------------------------------------------
  function renderTree() {
    const g = state.generation && state.generation.gen;
    const n = g && g.trace ? DL.beamTree.render($("tree"), g.trace, (txt) => { $("tree-detail").textContent = txt; }) : 0;
    $("tree-empty").hidden = n > 0;
    $("tree-legend").hidden = n === 0;
    if (!n) $("tree").replaceChildren();
  }

  // --- 5: compare ---------------------------------------------------------------------------------------------------
  const PRESETS = [
    { strategy: "greedy" },
    { strategy: "sampling", temperature: 0.8, top_p: 0.95, top_k: 50, seed: 0 },
    { strategy: "beam", num_beams: 3 },
  ];

  function compareColumn(i) {
    const p = PRESETS[i];
    const num = (name, key, value, extra) => el("label", { dataset: extra ? { show: extra } : {} }, [
      el("span", { "data-i18n": key, text: DL.t(key) }),
      el("input", { type: "number", name, value: String(value), step: "any", min: "0" })]);
    const select = el("select", { name: "strategy", onchange: () => syncStrategy(form) },
      ["greedy", "sampling", "beam"].map((s) => el("option", { value: s, "data-i18n": s, text: DL.t(s), selected: s === p.strategy })));
    const form = el("form", { class: "params compact", dataset: { column: String(i) }, onsubmit: (e) => e.preventDefault() }, [
      el("label", {}, [el("span", { "data-i18n": "strategy", text: DL.t("strategy") }), select]),
      num("temperature", "temperature", p.temperature ?? 0.8, "sampling"),
      num("top_p", "topp", p.top_p ?? 0.95, "sampling"),
      num("top_k", "topk", p.top_k ?? 50, "sampling"),
      num("seed", "seed", p.seed ?? 0, "sampling"),
      num("num_beams", "num_beams", p.num_beams ?? 3, "beam"),
      num("repetition_penalty", "repetition_penalty", 1),
    ]);
    syncStrategy(form);
    DL.knobs.bound(form);
    return el("div", { class: "cmp-col", dataset: { column: String(i) } }, [
      el("h3", { text: DL.t("column", { n: i + 1 }) }), form,
      el("div", { class: "output cmp-out" }), el("div", { class: "alts" }), el("p", { class: "meta cmp-meta" })]);
  }

  function buildCompare() {
    const n = Number($("cmp-n").value);
    const cols = $("cmp-cols");
    while (cols.children.length > n) cols.lastChild.remove();
    while (cols.children.length < n) cols.append(compareColumn(cols.children.length));
    cols.dataset.n = String(n);
  }

  async function compare() {
    clearError();
    const prompt = $("prompt").value;
    const maxNew = $("gen-max").value;
    const cols = Array.from($("cmp-cols").children);
    $("compare").disabled = true;
    state.compare = [];
    try {
      for (let i = 0; i < cols.length; i++) {
        $("cmp-status").textContent = DL.t("comparing", { i: i + 1, n: cols.length });
        const col = cols[i];
        const kwargs = { ...kwargsFrom(col.querySelector("form")), max_new_tokens: Number(maxNew) };
        col.querySelector(".cmp-out").replaceChildren();
        col.querySelector(".cmp-meta").textContent = "";
        const gen = await call("/api/generate", { prompt, ...kwargs });
        state.compare.push({ kwargs, generation: gen });
        renderCompareColumn(col, gen, prompt);
      }
      $("cmp-status").textContent = "";
    } catch (err) {
      $("cmp-status").textContent = "";
      showError(err);
    } finally {
      $("compare").disabled = false;
    }
  }

  function renderCompareColumn(col, gen, prompt) {
    renderGeneration(gen, prompt, col.querySelector(".cmp-out"), col.querySelector(".alts"), null);
    const s = gen.sequences[0];
    col.querySelector(".cmp-meta").textContent = DL.t("score") + " " + s.score.toFixed(3) + " · " +
      DL.t("finish") + " " + DL.t("finish." + s.finish_reason) + " · " + gen.elapsed_s.toFixed(1) + " s";
  }

  // --- language, wiring -------------------------------------------------------------------------------------------
  function setLang(code) {
    DL.setLang(code);
    document.querySelectorAll(".lang button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.lang === code)));
    document.querySelectorAll(".cmp-col h3").forEach((h, i) => { h.textContent = DL.t("column", { n: i + 1 }); });
    if (state.current >= 0) show(state.current);
    if (state.generation) {
      renderGeneration(state.generation.gen, state.generation.prompt, $("gen-output"), $("gen-alts"), $("gen-seqs"));
      renderTree();
    }
    const cols = $("cmp-cols").children;
    state.compare.forEach((c, i) => { if (cols[i]) renderCompareColumn(cols[i], c.generation, $("prompt").value); });
  }

  function init() {
    setLang(DL.initialLang());
    const narrow = window.matchMedia("(max-width: 760px)").matches;
    if (narrow) document.querySelectorAll("details.explain").forEach((d) => { d.open = false; });
    DL.api.get("/health").then((h) => { $("model-name").textContent = h.model; }).catch(() => {});
    $("prompt").addEventListener("input", () => {
      clearTimeout(typingTimer);
      typingTimer = setTimeout(() => requestAnalyse($("prompt").value, null), 700);
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); clearTimeout(typingTimer); requestAnalyse($("prompt").value, null); }
    });
    $("analyse").addEventListener("click", () => { clearTimeout(typingTimer); requestAnalyse($("prompt").value, null); });
    for (const id of ["temperature", "topk", "topp", "minp"]) $(id).addEventListener("input", reshapeBars);
    $("reset-warpers").addEventListener("click", () => {
      $("temperature").value = 1; $("topk").value = 0; $("topp").value = 1; $("minp").value = 0; reshapeBars();
    });
    $("undo").addEventListener("click", undo);
    $("error-close").addEventListener("click", clearError);
    const form = $("gen-form");
    form.addEventListener("submit", (e) => e.preventDefault());
    form.elements.strategy.addEventListener("change", () => syncStrategy(form));
    syncStrategy(form);
    form.elements.constraint.addEventListener("change", () => syncConstraint(form));
    syncConstraint(form);
    $("generate").addEventListener("click", generate);
    $("stop").addEventListener("click", () => genAbort && genAbort.abort());
    $("cmp-n").addEventListener("change", buildCompare);
    buildCompare();
    $("compare").addEventListener("click", compare);
    DL.knobs.load(() => Array.from(document.querySelectorAll("form.params")), form, () => syncStrategy(form))
      .catch(() => {});  // without the metadata the hand-made controls still work
    document.querySelectorAll(".lang button").forEach((b) => b.addEventListener("click", () => setLang(b.dataset.lang)));
    reshapeBars();
    requestAnalyse($("prompt").value, null);
  }

  window.DL.state = state;
  window.DL.kwargsFrom = kwargsFrom;
  document.addEventListener("DOMContentLoaded", init);
})();
