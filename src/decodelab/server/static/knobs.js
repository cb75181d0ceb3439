/* decodelab playground: the generation knobs' controls, from GET /api/knobs (decodelab.knobs: one declaration per
 * GenerationConfig field). The page's hand-made controls (strategy, max new tokens, temperature, ...) get their
 * bounds and their tooltip (the knob's doc line) from it; every other knob whose metadata names a generic control
 * (number, checkbox, select, text, json) gets one in a "more settings" box, so a new GenerationConfig field shows
 * up here without a change to the page. Labels of those extra controls are the knob names (not translated). */
(function () {
  "use strict";
  const GENERIC = ["number", "checkbox", "select", "text", "json"];
  const SHOW = { sampling: "sampling" };           // knob group -> the strategy its control belongs to
  const SHOW_NAME = { early_stopping: "beam", length_penalty: "beam" };
  let rows = null;                                 // the /api/knobs rows, once loaded

  /** Bounds and tooltip of the form's inputs named after knobs (number inputs get min / max). */
  function bound(form) {
    if (!rows) return;
    for (const k of rows) {
      const input = form.elements[k.name];
      if (!input || !input.tagName) continue;
      const tip = k.doc + (k.bounds ? " (" + k.bounds + ")" : "");
      input.title = tip;
      if (input.type !== "number") continue;
      const own = (a) => (input[a] === "" ? [] : [Number(input[a])]);  // the page's own bound, when tighter
      const lo = [k.lo, ...own("min")].filter((x) => x != null);
      const hi = [k.hi, k.server_max, ...own("max")].filter((x) => x != null);
      if (lo.length) input.min = String(Math.max(...lo));
      if (hi.length) input.max = String(Math.min(...hi));
    }
  }

  /** A control for knob row `k` (not yet on the page), marked data-knob=<kind> so that read() finds it. */
  function control(k) {
    const { el } = DL.views;
    const attrs = { name: k.name, title: k.doc + (k.bounds ? " (" + k.bounds + ")" : ""), dataset: { knob: k.kind } };
    const shown = k.default == null || k.default === false ? "" : JSON.stringify(k.default);
    let input;
    if (k.playground === "checkbox") {
      input = el("input", { ...attrs, type: "checkbox" });
    } else if (k.playground === "select") {  // early_stopping: true | false | never
      input = el("select", attrs, ["", "true", "false", "never"].map((v) => el("option", { value: v, text: v || "–" })));
    } else if (k.playground === "number") {
      input = el("input", { ...attrs, type: "number", step: "any", placeholder: shown,
                            min: k.lo == null ? null : String(k.lo), max: k.hi == null ? null : String(k.hi) });
    } else {
      input = el("input", { ...attrs, type: "text", spellcheck: "false", placeholder: shown });
    }
    const show = SHOW_NAME[k.name] || SHOW[k.group];
    return el("label", { class: "knob", dataset: show ? { show } : {} }, [el("span", { text: k.name }), input]);
  }

  /** Add the missing controls to `form` in a <details> box (once). */
  function extend(form) {
    if (!rows || form.querySelector(".knobs-more")) return;
    const missing = rows.filter((k) => GENERIC.includes(k.playground) && !form.elements[k.name]);
    if (!missing.length) return;
    const { el } = DL.views;
    form.append(el("details", { class: "knobs-more" }, [
      el("summary", { "data-i18n": "moreSettings", text: DL.t("moreSettings") }),
      el("div", { class: "params" }, missing.map(control)),
    ]));
  }

  /** The values of `form`'s generated controls that were set and are not hidden, as GenerationConfig keywords, into
   *  `kw`. A JSON box that does not parse is sent as typed: the server's 400 names the knob. */
  function read(form, kw) {
    form.querySelectorAll("[data-knob]").forEach((input) => {
      const label = input.closest("label");
      if (label && label.hidden) return;
      const kind = input.dataset.knob, raw = input.type === "checkbox" ? "" : input.value.trim();
      if (input.type === "checkbox") { if (input.checked) kw[input.name] = true; return; }
      if (raw === "") return;
      if (kind === "int" || kind === "float") kw[input.name] = Number(raw);
      else if (kind === "early_stopping") kw[input.name] = raw === "never" ? raw : raw === "true";
      else if (kind === "text" || (kind === "strings" && !raw.startsWith("["))) kw[input.name] = raw;
      else if (kind === "ids" && /^[\d\s,]+$/.test(raw)) kw[input.name] = raw.split(/[\s,]+/).filter(Boolean).map(Number);
      else { try { kw[input.name] = JSON.parse(raw); } catch (e) { kw[input.name] = raw; } }
    });
    return kw;
  }

  /** Fetch the knobs once; then bound every form in `forms()` and extend the main one. */
  async function load(forms, main, after) {
    rows = (await DL.api.get("/api/knobs")).knobs;
    forms().forEach(bound);
    extend(main);
    bound(main);
    if (after) after();
    return rows;
  }

  window.DL = window.DL || {};
  window.DL.knobs = { load, bound, read, rows: () => rows };
})();
