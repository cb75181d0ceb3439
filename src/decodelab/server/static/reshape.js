/* decodelab playground: client-side mirror of the sampling warpers, so the sliders reshape the next-token
 * distribution without running the model again.
 *
 * Input: the `logits` summary of POST /api/next-token: `candidates` (the N highest raw logits, best first) and
 * `tail` (the other V - N logits as bins [mean logit, count], highest first). Same maths and order as
 * decodelab.processors / transformers: Temperature -> TopK -> TopP -> MinP, each keeping at least one token,
 * then softmax over what is left. A bin stands for `count` tokens sharing its mean logit; a cut that falls inside
 * a bin keeps a fractional count (the server documents the error bound, ~1e-4 on probabilities).
 */
(function () {
  "use strict";

  // decodelab.config.MIN_TEMPERATURE: below it sampling is greedy (the server reports it as settings.min_temperature)
  const MIN_TEMPERATURE = 1e-5;

  /** Reshape. settings: {temperature, top_k, top_p, min_p}. Returns
   *  {raw: [p] per candidate, probs: [p'] per candidate (0 = removed), kept: [bool], keptCount, entropy, entropyAfter}. */
  function reshape(summary, settings) {
    const cands = summary.candidates;
    const bins = (summary.tail && summary.tail.bins) || [];
    const n = cands.length;
    // items: candidates then bins, in descending logit order
    const logit = new Float64Array(n + bins.length);
    const count = new Float64Array(n + bins.length);
    for (let i = 0; i < n; i++) { logit[i] = cands[i].logit; count[i] = 1; }
    for (let j = 0; j < bins.length; j++) { logit[n + j] = bins[j][0]; count[n + j] = bins[j][1]; }
    const m = logit.length;
    const raw = softmaxPerToken(logit, count);

    const T = settings.temperature == null ? 1 : Number(settings.temperature);
    const w = Float64Array.from(count); // kept weight of each item
    const score = new Float64Array(m);
    if (T < MIN_TEMPERATURE) {           // greedy: only the argmax survives
      w.fill(0); w[0] = 1;
      for (let i = 0; i < m; i++) score[i] = logit[i];
    } else {
      for (let i = 0; i < m; i++) score[i] = T === 1 ? logit[i] : logit[i] / T;
      topK(score, w, Number(settings.top_k || 0));
      const p = settings.top_p == null ? 1 : Number(settings.top_p);
      if (p < 1) topP(score, w, p);
      const mp = settings.min_p == null ? 0 : Number(settings.min_p);
      if (mp > 0) minP(score, w, mp);
    }
    const after = softmaxPerToken(score, w);
    const probs = [], kept = [];
    for (let i = 0; i < n; i++) { kept.push(w[i] > 0); probs.push(w[i] > 0 ? after.p[i] : 0); }
    let keptCount = 0;
    for (let i = 0; i < m; i++) keptCount += w[i];
    return {
      raw: Array.from(raw.p.slice(0, n)), probs, kept, keptCount: Math.round(keptCount),
      entropy: raw.entropy, entropyAfter: after.entropy,
    };
  }

  /** Per-token probabilities of items with weights (log-sum-exp for stability) and the entropy in nats. */
  function softmaxPerToken(score, weight) {
    let mx = -Infinity;
    for (let i = 0; i < score.length; i++) if (weight[i] > 0 && score[i] > mx) mx = score[i];
    let z = 0;
    for (let i = 0; i < score.length; i++) if (weight[i] > 0) z += weight[i] * Math.exp(score[i] - mx);
    const p = new Float64Array(score.length);
    let h = 0;
    for (let i = 0; i < score.length; i++) {
      if (weight[i] > 0) {
        p[i] = Math.exp(score[i] - mx) / z;
        if (p[i] > 0) h -= weight[i] * p[i] * Math.log(p[i]);
      }
    }
    return { p, entropy: h };
  }

  /** TopKLogitsWarper: keep the k best tokens (ties with the k-th kept). */
  function topK(score, w, k) {
    if (!(k > 0)) return;
    let cum = 0, kth = Infinity;
    for (let i = 0; i < score.length; i++) {
      if (w[i] <= 0) continue;
      if (cum >= k) { if (!(w[i] === 1 && score[i] === kth)) w[i] = 0; continue; }
      if (cum + w[i] > k) w[i] = k - cum; // a bin cut in the middle
      cum += w[i];
      kth = score[i];
    }
  }

  /** TopPLogitsWarper: a token is removed when the mass of the tokens more likely than it reaches top_p
   *  (transformers: ascending cumsum <= 1 - top_p); the most likely token always stays (min_keep = 1). */
  function topP(score, w, topp) {
    const sm = softmaxPerToken(score, w);
    let above = 0, first = true;
    for (let i = 0; i < score.length; i++) {
      if (w[i] <= 0) continue;
      const q = sm.p[i], mass = q * w[i];
      let keep;
      if (above >= topp) keep = 0;
      else if (w[i] === 1) keep = 1;
      else keep = q > 0 ? Math.min(w[i], Math.ceil((topp - above) / q)) : w[i]; // token j kept iff above + j*q < p
      if (first) keep = Math.max(keep, 1);
      first = false;
      above += mass;
      w[i] = keep;
    }
  }

  /** MinPLogitsWarper: remove tokens whose probability is below min_p x the top probability. */
  function minP(score, w, minp) {
    let mx = -Infinity;
    for (let i = 0; i < score.length; i++) if (w[i] > 0 && score[i] > mx) mx = score[i];
    const threshold = mx + Math.log(minp); // p_i < min_p * p_max  <=>  s_i < s_max + ln(min_p)
    for (let i = 0; i < score.length; i++) if (w[i] > 0 && score[i] < threshold) w[i] = 0;
  }

  window.DL = window.DL || {};
  window.DL.reshape = reshape;
})();
