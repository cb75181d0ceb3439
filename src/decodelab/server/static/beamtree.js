/* decodelab playground: the beam search tree as SVG. Every BeamNode of the trace (kept, pruned, finished,
 * returned) at x = its step, leaves stacked in depth-first order (best cumulative log-probability first); the paths
 * of the returned hypotheses are highlighted. Nodes are focusable; hover / focus shows their numbers. */
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const COL = 118, ROW = 22, PAD = 14;

  function svg(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v != null) n.setAttribute(k, v);
    if (text != null) n.textContent = text;
    return n;
  }

  const short = (s) => {
    const v = DL.views.visible(s);
    return v.length > 13 ? v.slice(0, 12) + "…" : v;
  };

  /** Draw the tree of `trace.beam_nodes` into `container`; onDetail(text) for the node under focus. */
  function render(container, trace, onDetail) {
    container.replaceChildren();
    const nodes = (trace && trace.beam_nodes) || [];
    if (!nodes.length) return 0;
    const byId = new Map(nodes.map((n) => [n.node, n]));
    const kids = new Map([["root", []]]);
    for (const n of nodes) {
      const key = n.parent == null ? "root" : n.parent;
      if (!kids.has(key)) kids.set(key, []);
      kids.get(key).push(n);
    }
    for (const list of kids.values()) list.sort((a, b) => b.cumulative - a.cumulative);
    // highlighted: every node on the path of a returned hypothesis
    const onPath = new Set();
    for (const n of nodes) {
      if (n.status !== "returned") continue;
      for (let c = n; c; c = c.parent == null ? null : byId.get(c.parent)) onPath.add(c.node);
    }
    // layout: leaves in DFS order get consecutive rows; a parent sits between its first and last child
    const pos = new Map();
    let row = 0, maxStep = 0;
    (function place(key, depth) {
      const ch = kids.get(key) || [];
      if (!ch.length) { pos.set(key, { x: PAD + depth * COL, y: PAD + row * ROW }); row += 1; return; }
      for (const c of ch) place(c.node, depth + 1);
      const ys = ch.map((c) => pos.get(c.node).y);
      pos.set(key, { x: PAD + depth * COL, y: (ys[0] + ys[ys.length - 1]) / 2 });
      maxStep = Math.max(maxStep, depth);
    })("root", 0);
    for (const n of nodes) maxStep = Math.max(maxStep, n.step + 1);
    const width = PAD * 2 + maxStep * COL + COL;
    const height = PAD * 2 + Math.max(row - 1, 0) * ROW + 10;
    const root = svg("svg", { width, height, viewBox: "0 0 " + width + " " + height, class: "beam-svg",
                              role: "group", "aria-label": DL.t("tree.h") });
    const edges = svg("g", { class: "edges" });
    const dots = svg("g", { class: "nodes" });
    root.append(edges, dots);
    for (const n of nodes) {
      const p = pos.get(n.parent == null ? "root" : n.parent), c = pos.get(n.node);
      const mid = (p.x + c.x) / 2;
      edges.append(svg("path", {
        d: "M" + p.x + "," + p.y + " C" + mid + "," + p.y + " " + mid + "," + c.y + " " + c.x + "," + c.y,
        class: "edge st-" + n.status + (onPath.has(n.node) ? " onpath" : ""),
      }));
    }
    const r = pos.get("root");
    dots.append(svg("circle", { cx: r.x, cy: r.y, r: 6, class: "bn-root" }));
    for (const n of nodes) {
      const c = pos.get(n.node);
      const status = DL.t("st." + n.status);
      const info = DL.t("nodeLabel", { token: JSON.stringify(n.token), step: n.step + 1, status,
                                       cum: n.cumulative.toFixed(3) }) +
        " · " + DL.t("logprob") + " " + n.logprob.toFixed(3) + (n.score != null ? " · " + DL.t("score") + " " + Number(n.score).toFixed(3) : "");
      const g = svg("g", { class: "bn st-" + n.status + (onPath.has(n.node) ? " onpath" : ""), tabindex: "0",
                           role: "img", "aria-label": info, "data-node": n.node, "data-status": n.status,
                           transform: "translate(" + c.x + "," + c.y + ")" });
      g.append(svg("title", {}, info));
      g.append(svg("circle", { r: n.status === "returned" ? 6 : 4.5 }));
      g.append(svg("text", { x: 8, y: 4 }, short(n.token) + (n.score != null ? " (" + Number(n.score).toFixed(2) + ")" : "")));
      const show = () => onDetail(info);
      g.addEventListener("mouseenter", show);
      g.addEventListener("focus", show);
      dots.append(g);
    }
    container.append(root);
    return nodes.length;
  }

  window.DL = window.DL || {};
  window.DL.beamTree = { render };
})();
