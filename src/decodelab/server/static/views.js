/* decodelab playground: DOM rendering of tokens, bars and coloured generated text. No state lives here. */
(function () {
  "use strict";
  const t = (k, v) => DL.t(k, v);

  /** Create an element: el("span", {class: "x", dataset: {id: 3}, onclick: f}, [children or text]). */
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of [].concat(children || [])) {
      if (c != null) node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  /** Make whitespace visible: space ␣, newline ↵, tab ⇥ (the token's real text stays in titles). */
  function visible(s) {
    if (s === "") return "∅";
    return s.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
  }

  const pct = (p) => (p >= 0.9995 ? "100" : p >= 0.001 ? (100 * p).toFixed(1) : p > 0 ? "<0.1" : "0") + "%";
  const hex = (bytes) => bytes.map((b) => b.toString(16).toUpperCase().padStart(2, "0")).join(" ");
  /** Background colour for a probability: red (0) -> yellow (0.5) -> green (1). */
  const probColor = (p) => "hsl(" + Math.round(120 * Math.max(0, Math.min(1, p))) + " 80% 82%)";

  /** Token chips for a Tokens dict (ids, display, piece_bytes, special, offsets). */
  function chips(container, tokens, detail) {
    container.replaceChildren();
    detail.textContent = "";
    tokens.ids.forEach((id, i) => {
      const special = tokens.special && tokens.special[i];
      const bytes = (tokens.piece_bytes && tokens.piece_bytes[i]) || [];
      const shown = tokens.display[i];
      const info = t("id") + " " + id + " · " + t("bytes") + " " + hex(bytes) + (special ? " · " + t("special") : "");
      const chip = el("span", {
        class: "chip c" + (i % 6) + (special ? " special" : "") + (/^(<0x[0-9A-F]{2}>)+$/.test(shown) ? " partial" : ""),
        tabindex: "0",
        role: "listitem",
        title: info,
        "aria-label": JSON.stringify(shown) + ", " + info,
        dataset: { id: String(id), index: String(i) },
      }, [el("span", { class: "piece", text: visible(shown) }), el("span", { class: "tid", text: String(id) })]);
      const show = () => { detail.textContent = "#" + i + " " + JSON.stringify(shown) + " · " + info; };
      chip.addEventListener("mouseenter", show);
      chip.addEventListener("focus", show);
      container.append(chip);
    });
    container.setAttribute("role", "list");
  }

  /** Bar chart rows: cands [{id, display, token}], shaped {raw, probs, kept}; onPick(cand). */
  function bars(container, cands, shaped, count, onPick) {
    container.replaceChildren();
    const n = Math.min(count, cands.length);
    for (let i = 0; i < n; i++) {
      const c = cands[i];
      const raw = shaped.raw[i], after = shaped.probs[i], kept = shaped.kept[i];
      const label = visible(c.display);
      const btn = el("button", {
        type: "button",
        class: "cand" + (kept ? "" : " filtered") + (c.special ? " special" : ""),
        dataset: { id: String(c.id), raw: String(raw), prob: String(after), kept: String(kept) },
        "aria-label": t("candidate", { token: JSON.stringify(c.display), p: pct(after) }) + (kept ? "" : " (" + t("filtered") + ")"),
        onclick: () => onPick(c),
      }, [
        el("span", { class: "tok", text: label, title: t("id") + " " + c.id }),
        el("span", { class: "track" }, [
          el("span", { class: "raw", style: "width:" + (100 * raw).toFixed(2) + "%" }),
          el("span", { class: "after", style: "width:" + (100 * after).toFixed(2) + "%" }),
        ]),
        el("span", { class: "num" }, [
          el("span", { class: "p-raw", text: pct(raw) }),
          el("span", { class: "arrow", text: " → " }),
          el("span", { class: "p-after", text: kept ? pct(after) : t("filtered") }),
        ]),
      ]);
      container.append(el("li", {}, [btn]));
    }
  }

  /** Coloured generated tokens. items: [{token, prob, special, alts}]; onShow(item, index) on hover / focus. */
  function coloured(container, items, onShow) {
    const frag = document.createDocumentFragment();
    items.forEach((it, i) => {
      const span = el("span", {
        class: "gtok" + (it.special ? " special" : ""),
        tabindex: "0",
        style: "background:" + probColor(it.prob),
        title: JSON.stringify(it.token) + " · p " + pct(it.prob),
        dataset: { step: String(i), prob: String(it.prob), id: String(it.id) },
        text: it.special ? it.token : it.token.replace(/\n/g, "↵\n"),
      });
      span.addEventListener("mouseenter", () => onShow(it, i));
      span.addEventListener("focus", () => onShow(it, i));
      frag.append(span);
    });
    container.append(frag);
  }

  /** The alternatives box for one generated token. With a constraint (item.constraint, a trace ConstraintStep):
   *  how many tokens it allowed, the probability mass it removed, the JSON path, and every forbidden candidate
   *  struck through (the model's most likely forbidden tokens are added after the alternatives). */
  function alternatives(container, item, index) {
    const c = item.constraint;
    const forbidden = new Set(c ? c.forbidden.map((f) => f.id) : []);
    const alts = item.alts.map((a) => ({ ...a, forbidden: a.id != null ? forbidden.has(a.id) : false }));
    if (c) {
      const shown = new Set(alts.map((a) => a.token));
      for (const f of c.forbidden) {
        if (!shown.has(f.token)) alts.push({ token: f.token, prob: f.prob, forbidden: true });
      }
    }
    const head = c ? el("p", { class: "constraint-h" }, [
      t("constraintStep", { kind: t("constraint." + c.kind), n: c.allowed.toLocaleString(), mass: pct(c.mass_removed) }),
      c.path ? [" · " + t("constraintAt") + " ", el("span", { class: "path", text: c.path })] : null,
    ].flat()) : null;
    // replaceChildren turns null into the text "null": leave the constraint header out when there is none
    container.replaceChildren(...[
      el("p", { class: "alts-h" }, [t("alternatives", { step: index + 1 }) + ": " + t("chose") + " ",
        el("code", { text: visible(item.token) }), " (" + pct(item.prob) + ")"]),
      head,
      el("ol", { class: "alts-list" }, alts.map((a) =>
        el("li", { class: (a.chosen ? "chosen" : "") + (a.forbidden ? " forbidden" : ""),
                   "aria-label": a.forbidden ? visible(a.token) + " (" + t("forbidden") + ")" : null }, [
          el("code", { text: visible(a.token) }),
          el("span", { class: "altbar", style: "width:" + (100 * a.prob).toFixed(1) + "%" }),
          el("span", { text: " " + pct(a.prob) + (a.forbidden ? " · " + t("forbidden") : a.processed != null ? " · " + t("processed") + " " + pct(a.processed) : "") }),
        ]))),
    ].filter((node) => node != null));
  }

  /** Items for coloured output: one per generated token of sequence 0, with its alternatives. */
  function tokenItems(gen) {
    const tr = gen.trace, seq = gen.sequences[0];
    if (!tr) return [];
    const eosLast = seq.finish_reason === "eos";
    if (tr.beam_nodes && tr.beam_nodes.length) {
      const byId = new Map(tr.beam_nodes.map((n) => [n.node, n]));
      const path = (n) => { const p = []; for (let c = n; c; c = c.parent == null ? null : byId.get(c.parent)) p.unshift(c); return p; };
      const same = (p) => p.length === seq.new_ids.length && p.every((n, i) => n.id === seq.new_ids[i]);
      const paths = tr.beam_nodes.filter((n) => n.status === "returned").map(path);
      const best = paths.find(same) || paths[0] || [];
      return best.map((n, i) => {
        const sibs = tr.beam_nodes.filter((m) => m.parent === n.parent && m.step === n.step)
          .sort((a, b) => b.logprob - a.logprob);
        const st = tr.steps.find((x) => x.step === n.step && x.id === n.id && x.constraint);
        return { id: n.id, token: n.token, prob: Math.exp(n.logprob), special: eosLast && i === best.length - 1,
                 alts: sibs.map((m) => ({ token: m.token, prob: Math.exp(m.logprob), chosen: m.node === n.node })),
                 constraint: st ? st.constraint : null };
      });
    }
    const steps = tr.steps.filter((s) => s.row === 0).sort((a, b) => a.step - b.step);
    const showProcessed = (tr.processors || []).length > 0;
    return steps.map((s, i) => {
      const proc = new Map((s.top_processed || []).map((c) => [c.id, c.prob]));
      const alts = s.top.map((c) => ({ id: c.id, token: c.token, prob: c.prob, chosen: c.id === s.id,
                                       processed: showProcessed ? (proc.get(c.id) || 0) : null }));
      if (!alts.some((a) => a.chosen)) alts.push({ token: s.token, prob: Math.exp(s.logprob), chosen: true,
                                                   processed: showProcessed ? Math.exp(s.logprob_processed) : null });
      return { id: s.id, token: s.token, prob: Math.exp(s.logprob), special: eosLast && i === steps.length - 1, alts,
               constraint: s.constraint || null };
    });
  }

  /** A layers x steps heatmap table: one row per layer (the last at the bottom), one column per step, headed by
   *  `tokens`; cell(step, layer) -> {text, prob, title, hit} (background: probColor(prob)). Returns the rows drawn. */
  function heatmap(container, tokens, layers, cell) {
    container.replaceChildren();
    if (!tokens.length || !layers) return 0;
    const head = el("tr", {}, [el("th", { text: t("layer") })].concat(
      tokens.map((tok) => el("th", { class: "lens-step", text: visible(tok), title: JSON.stringify(tok) }))));
    const rows = [];
    for (let l = 0; l < layers; l++) {
      rows.push(el("tr", { class: "lens-row", dataset: { layer: String(l) } }, [el("th", { text: String(l) })].concat(
        tokens.map((_, i) => {
          const c = cell(i, l);
          return el("td", { class: "lens-cell" + (c.hit ? " hit" : ""), tabindex: "0", title: c.title,
                            style: "background:" + probColor(c.prob), dataset: { prob: String(c.prob) }, text: c.text });
        }))));
    }
    container.append(el("table", { class: "lens" }, [el("thead", {}, [head]), el("tbody", {}, rows)]));
    return layers;
  }

  /** The logit lens of one returned sequence (trace.lens, see decodelab/lens.py): a cell is coloured by the
   *  probability that layer gives the finally chosen token and labelled with the layer's top-1 token; its title
   *  lists the layer's top-k. Returns the number of layers drawn. */
  function lensHeatmap(container, trace, sequence) {
    const steps = ((trace && trace.lens) || []).filter((s) => s.sequence === (sequence || 0));
    return heatmap(container, steps.map((s) => s.token), steps.length ? steps[0].layers.length : 0, (i, l) => {
      const s = steps[i], lay = s.layers[l], top = lay.top[0];
      return { text: top ? visible(top.token) : "", prob: lay.prob, hit: Boolean(top && top.id === s.id),
               title: JSON.stringify(s.token) + " · p " + pct(lay.prob) + " · rank " + lay.rank + "\n" +
                      lay.top.map((c) => JSON.stringify(c.token) + " " + pct(c.prob)).join("\n") };
    });
  }

  /** "Follow a token": follow = {token, steps: [chosen token per step], grid: [step][layer] -> [rank, prob]}
   *  (decodelab.lens.follow_token); a cell shows the followed token's rank at that layer, coloured by its
   *  probability. Returns the number of layers drawn. */
  function followHeatmap(container, follow) {
    const grid = (follow && follow.grid) || [];
    return heatmap(container, (follow && follow.steps) || [], grid.length ? grid[0].length : 0, (i, l) => {
      const [rank, p] = grid[i][l];
      return { text: String(rank), prob: p, hit: rank === 0,
               title: JSON.stringify(follow.token) + " · rank " + rank + " · p " + pct(p) };
    });
  }

  window.DL = window.DL || {};
  window.DL.views = { el, visible, pct, probColor, chips, bars, coloured, alternatives, tokenItems, lensHeatmap, followHeatmap };
})();
