"""Self-contained, inline-styled HTML for notebooks (``_repr_html_``). No scripts, no external CSS, no model calls.

Every piece of text goes through :func:`html.escape` (tokens can contain ``<``, ``&`` and quotes). Probability bars
are ``div`` s whose ``width`` is ``100 * prob`` percent (2 decimals); generated tokens are coloured by the
probability the model gave them (hue 0 = red for p = 0 to 120 = green for p = 1) with the strongest alternatives in
the ``title`` attribute.
"""

from __future__ import annotations

import html
import json
import math

__all__ = ["tokens_html", "distribution_html", "generation_html", "score_html", "prob_color"]

_PALETTE = ("#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d6f0f0")
_BOX = "font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;line-height:1.5"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _visible(piece: str) -> str:
    return piece.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")


def _quoted(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)


def prob_color(prob: float) -> str:
    """Background colour for a token of probability ``prob`` in [0, 1]: ``hsl(120 * prob, 75%, 82%)``."""
    p = min(max(prob, 0.0), 1.0) if math.isfinite(prob) else 0.0
    return f"hsl({120.0 * p:.0f}, 75%, 82%)"


def _pct(prob: float) -> str:
    return f"{100.0 * prob:.2f}%"


def tokens_html(tokens) -> str:
    """Token chips for a :class:`~decodelab.tokens.Tokens`: each chip shows the byte-exact piece (spaces as ``␣``)
    above its id; the title attribute gives index, id and the token's bytes."""
    display = tokens.display or tokens.pieces
    chips = []
    for i, tid in enumerate(tokens.ids):
        piece = display[i] if i < len(display) else ""
        special = i < len(tokens.special) and tokens.special[i]
        raw = tokens.piece_bytes[i] if i < len(tokens.piece_bytes) else []
        title = f"#{i} id {tid}" + (" (special)" if special else "") + (f" bytes {bytes(raw).hex(' ')}" if raw else "")
        border = "2px solid #a05" if special else "1px solid #bbb"
        chips.append(
            f'<span class="dl-token" title="{_esc(title)}" style="display:inline-block;margin:2px;padding:2px 5px;'
            f'border:{border};border-radius:4px;background:{_PALETTE[i % len(_PALETTE)]};text-align:center">'
            f'<span style="white-space:pre">{_esc(_visible(piece))}</span><br>'
            f'<span style="font-size:10px;color:#555">{tid}</span></span>'
        )
    return (f'<div class="decodelab-tokens" style="{_BOX}"><div style="color:#555">{len(tokens.ids)} tokens</div>'
            f'{"".join(chips)}</div>')


def distribution_html(dist) -> str:
    """A table of the top candidates of a :class:`~decodelab.distribution.Distribution`: quoted token, id,
    probability (percent, 2 decimals) and a bar whose width is ``100 * prob`` percent."""
    rows = []
    for c in dist.top:
        rows.append(
            "<tr>"
            f'<td style="white-space:pre;padding:1px 8px">{_esc(_quoted(c.token))}</td>'
            f'<td style="color:#555;padding:1px 8px;text-align:right">{c.id}</td>'
            f'<td style="padding:1px 8px;text-align:right">{_pct(c.prob)}</td>'
            f'<td style="width:240px;padding:1px 8px"><div class="dl-bar" style="width:{100.0 * c.prob:.2f}%;'
            f'height:10px;background:#4c9a5b"></div></td>'
            "</tr>"
        )
    shape = "×".join(str(d) for d in dist.logits_shape)
    head = (f'<div style="color:#555">logits shape {_esc(shape)} · entropy {dist.entropy:.3f} nats · argmax '
            f'{_esc(_quoted(dist.argmax.token))}</div>')
    return f'<div class="decodelab-distribution" style="{_BOX}">{head}<table>{"".join(rows)}</table></div>'


def _alternatives_title(top, chosen_id: int, n: int = 5) -> str:
    return " | ".join([f"{_quoted(c.token)} {_pct(c.prob)}" for c in top if c.id != chosen_id][:n])


def _token_probs(gen, index: int, seq) -> list[tuple[str, float, str]] | None:
    """``(token, prob, title)`` for each new token of sequence ``index`` from the trace, or None when the trace
    does not cover it. Greedy / sampling: the steps of row ``index``; beam search: the path to its returned node."""
    trace = gen.trace
    if trace is None or not seq.new_ids:
        return None
    if trace.beam_nodes:
        by_id = {n.node: n for n in trace.beam_nodes}
        for end in (n for n in trace.beam_nodes if n.status == "returned" and n.row == seq.prompt_index):
            path, cur = [], end
            while cur is not None:
                path.append(cur)
                cur = by_id.get(cur.parent) if cur.parent is not None else None
            path.reverse()
            if [n.id for n in path] == list(seq.new_ids):
                return [(n.token, math.exp(n.logprob), f"p={_pct(math.exp(n.logprob))} (processed), "
                         f"Σ logprob {n.cumulative:.3f}") for n in path]
        return None
    steps = sorted((s for s in trace.steps if s.row == index), key=lambda s: s.step)
    if [s.id for s in steps] != list(seq.new_ids):
        return None
    out = []
    for s in steps:
        p = math.exp(s.logprob) if math.isfinite(s.logprob) else 0.0
        title = f"p={_pct(p)} rank {s.rank} entropy {s.entropy:.2f} nats"
        alts = _alternatives_title(s.top, s.id)
        out.append((s.token, p, title + (f" · alternatives: {alts}" if alts else "")))
    return out


def generation_html(gen) -> str:
    """The returned sequences of a :class:`~decodelab.trace.Generation`: prompt in grey, continuation in bold; with a
    trace, each new token's background shows its probability (:func:`prob_color`) and its title the probability,
    rank, entropy and alternatives. Score and finish reason follow each sequence."""
    blocks = []
    for i, seq in enumerate(gen.sequences):
        prompt_text = seq.text[: len(seq.text) - len(seq.new_text)] if seq.text.endswith(seq.new_text) else seq.text
        probs = _token_probs(gen, i, seq)
        if probs is not None and "".join(tok for tok, _, _ in probs) != seq.new_text:
            probs = None  # a cut stop string or a character split across tokens: show plain text instead
        if probs is None:
            body = f"<b>{_esc(seq.new_text)}</b>"
        else:
            body = "".join(
                f'<span class="dl-gen-token" title="{_esc(title)}" style="background:{prob_color(p)};'
                f'border-radius:3px;white-space:pre-wrap">{_esc(tok)}</span>'
                for tok, p, title in probs
            )
        meta = f"sequence {i} · score {seq.score:.4f} · {len(seq.new_ids)} new tokens · finish: {seq.finish_reason}"
        blocks.append(
            f'<div style="margin:6px 0;padding:6px;border:1px solid #ddd;border-radius:4px">'
            f'<div style="font-size:11px;color:#777">{_esc(meta)}</div>'
            f'<span style="color:#888;white-space:pre-wrap">{_esc(prompt_text)}</span>{body}</div>'
        )
    head = f'<div style="color:#555">{_esc(gen.model)}' + (
        f" · {_esc(gen.trace.strategy)} · stopped: {_esc(gen.trace.stop_reason)}" if gen.trace else "") + "</div>"
    return f'<div class="decodelab-generation" style="{_BOX}">{head}{"".join(blocks)}</div>'


def score_html(result) -> str:
    """A scored text (``LM.score``): each token coloured by the probability the model gave it (:func:`prob_color`;
    the first token, which nothing predicts, uncoloured), with log-probability, rank and entropy in its title, under
    a header with the perplexity."""
    chips = []
    for t in result.tokens:
        if t.logprob is None:
            chips.append(f'<span class="dl-score-token" title="first token: not predicted" '
                         f'style="white-space:pre-wrap">{_esc(t.token)}</span>')
            continue
        p = math.exp(t.logprob) if math.isfinite(t.logprob) else 0.0
        title = f"p={_pct(p)} logprob {t.logprob:.3f} rank {t.rank} entropy {t.entropy:.2f} nats"
        chips.append(f'<span class="dl-score-token" title="{_esc(title)}" style="background:{prob_color(p)};'
                     f'border-radius:3px;white-space:pre-wrap">{_esc(t.token)}</span>')
    ppl = "n/a" if result.perplexity is None else f"{result.perplexity:.3f}"
    head = f'<div style="color:#555">{_esc(result.model)} · {len(result.tokens)} tokens · perplexity {ppl}</div>'
    return f'<div class="decodelab-score" style="{_BOX}">{head}<div>{"".join(chips)}</div></div>'
