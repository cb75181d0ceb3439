/* decodelab notebook widget (anywidget): the playground's views (i18n.js, views.js, reshape.js, beamtree.js are
 * prepended to this file by decodelab/widget.py, unchanged) drawn in a notebook cell. The model runs in the kernel:
 * this file only draws the widget's synced state and sends the user's actions back.
 *
 * State (traitlets in decodelab/widget.py): text, tokens (Tokens.to_dict()), next (logit summary of /api/next-token:
 * candidates + tail bins), settings {temperature, top_k, top_p, min_p}, generation (Generation.to_dict() with the
 * trace, and the lens when asked), error. Actions: set "text" (a bar click appends its token: step mode), send
 * {type: "generate", strategy, max_new_tokens, lens}, {type: "follow", token} (follow: {token, steps, grid}). */

const h = (tag, attrs, children) => DL.views.el(tag, attrs, children);

function render({ model, el }) {
  const root = h("div", { class: "dl-widget" });
  el.append(root);
  const chips = h("div", { class: "chips" }), chipDetail = h("p", { class: "meta" });
  const sliders = h("div", { class: "dl-sliders" });
  const bars = h("ol", { class: "bars" });
  const gen = h("div", { class: "output dl-gen" }), alts = h("div", { class: "alts" });
  const tree = h("div", { class: "beamtree" }), lens = h("div", { class: "dl-lens" });
  const follow = h("div", { class: "dl-follow" });
  const followInput = h("input", { type: "text", name: "follow", placeholder: "a token, e.g. ' night'", size: "16" });
  const followGo = h("button", { type: "button", class: "dl-follow-go", text: "Follow",
    onclick: () => model.send({ type: "follow", token: followInput.value }) });
  const error = h("p", { class: "dl-error", role: "alert" });

  const settings = () => Object.assign({ temperature: 1, top_k: 0, top_p: 1, min_p: 0 }, model.get("settings") || {});
  const control = (name, label, min, max, step) => {
    const out = h("output", { text: String(settings()[name]) });
    const input = h("input", { type: "range", min, max, step, value: String(settings()[name]), name,
      oninput: (e) => {
        out.textContent = e.target.value;
        model.set("settings", Object.assign(settings(), { [name]: Number(e.target.value) }));
        model.save_changes();
      } });
    return h("label", {}, [label + " ", input, " ", out]);
  };
  sliders.append(control("temperature", "temperature", 0, 2, 0.05), control("top_k", "top-k", 0, 100, 1),
                 control("top_p", "top-p", 0, 1, 0.01), control("min_p", "min-p", 0, 1, 0.01));

  const strategy = h("select", { name: "strategy" }, ["greedy", "sampling", "beam search"].map(
    (s) => h("option", { value: s, text: s })));
  const count = h("input", { type: "number", name: "max_new_tokens", min: "1", max: "64", value: "12" });
  const withLens = h("input", { type: "checkbox", name: "lens" });
  const go = h("button", { type: "button", class: "dl-generate", text: "Generate",
    onclick: () => model.send({ type: "generate", strategy: strategy.value, max_new_tokens: Number(count.value),
                                lens: withLens.checked }) });

  root.append(h("div", { class: "dl-prompt" }), chips, chipDetail, sliders, bars,
              h("div", { class: "dl-controls" }, [strategy, " ", count, " new tokens ",
                                                   h("label", {}, [withLens, " logit lens"]), " ", go]),
              error, gen, alts, tree, lens,
              h("div", { class: "dl-controls" }, ["follow a token through the layers: ", followInput, " ", followGo]),
              follow);

  function drawText() {
    root.querySelector(".dl-prompt").textContent = model.get("text");
    const tokens = model.get("tokens");
    if (tokens && tokens.ids) DL.views.chips(chips, tokens, chipDetail);
  }
  function drawBars() {
    const next = model.get("next");
    if (!next || !next.candidates) { bars.replaceChildren(); return; }
    const shaped = DL.reshape(next, settings());
    DL.views.bars(bars, next.candidates, shaped, 10, (cand) => {   // step mode: a click appends the token
      model.set("text", model.get("text") + cand.token);
      model.save_changes();
    });
  }
  function drawGeneration() {
    const g = model.get("generation");
    gen.replaceChildren(); alts.replaceChildren(); tree.replaceChildren(); lens.replaceChildren();
    if (!g || !g.sequences) return;
    gen.append(h("span", { class: "prompt-text", text: g.prompt_text || "" }));
    DL.views.coloured(gen, DL.views.tokenItems(g), (it, i) => DL.views.alternatives(alts, it, i));
    if (g.trace) {
      DL.beamTree.render(tree, g.trace, (text) => { alts.textContent = text; });
      DL.views.lensHeatmap(lens, g.trace, 0);
    }
  }
  const drawError = () => { error.textContent = model.get("error") || ""; };
  const drawFollow = () => DL.views.followHeatmap(follow, model.get("follow"));

  model.on("change:text", drawText);
  model.on("change:tokens", drawText);
  model.on("change:next", drawBars);
  model.on("change:settings", drawBars);
  model.on("change:generation", drawGeneration);
  model.on("change:error", drawError);
  model.on("change:follow", drawFollow);
  drawText(); drawBars(); drawGeneration(); drawError(); drawFollow();
}

export default { render };
