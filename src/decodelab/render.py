"""Display layer: rich renderables for the terminal and self-contained HTML for notebooks. No model calls here.

Terminal (rich): :func:`tokens_table`, :func:`distribution_table`, :func:`generation_panel`, :func:`trace_table`,
:func:`beam_tree`, :func:`stop_reason_text`. Notebook HTML (``_repr_html_`` of :class:`~decodelab.tokens.Tokens`,
:class:`~decodelab.distribution.Distribution` and :class:`~decodelab.trace.Generation`) lives in
:mod:`decodelab.render_html` and is re-exported here: :func:`tokens_html`, :func:`distribution_html`,
:func:`generation_html`, :func:`score_html`.

Units: ``prob`` is in [0, 1] and shown as a percentage with 2 decimals; ``logprob`` is a natural log; entropy is in
nats. A token is shown quoted (``" night"``) so leading spaces stay visible; in token tables spaces become ``␣``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .render_html import distribution_html, generation_html, score_html, tokens_html  # noqa: F401  (re-exported)

__all__ = [
    "visible",
    "quoted",
    "percent",
    "bar",
    "tokens_table",
    "distribution_table",
    "generation_panel",
    "trace_table",
    "beam_tree",
    "stop_reason_text",
    "score_table",
    "lens_table",
    "tokens_html",
    "distribution_html",
    "generation_html",
    "score_html",
]

_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
_BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths of a full block


def visible(piece: str) -> str:
    """``piece`` with spaces, newlines and tabs drawn as ``␣ ↵ ⇥`` and other control characters as ``\\xNN``."""
    out = []
    for ch in piece:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def quoted(token: str) -> str:
    """A token as a JSON string literal: ``" night"``, ``"\\n"`` (leading spaces and newlines stay visible)."""
    return json.dumps(token, ensure_ascii=False)


def percent(prob: float) -> str:
    """``prob`` in [0, 1] as a percentage with 2 decimals: ``0.8871 -> "88.71%"``."""
    return f"{100.0 * prob:.2f}%"


def bar(prob: float, width: int = 30) -> str:
    """A horizontal bar of ``prob * width`` character cells, drawn with eighth-block precision."""
    p = 0.0 if not math.isfinite(prob) else min(max(prob, 0.0), 1.0)
    eighths = round(p * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_BLOCKS[part] if part else "")


def _prob(logprob: float) -> float:
    return math.exp(logprob) if math.isfinite(logprob) else 0.0


# --------------------------------------------------------------------------------------------------------- tokens
def tokens_table(tokens) -> Table:
    """A table of a :class:`~decodelab.tokens.Tokens`: index, id, byte-exact piece (visible spaces, ``<0xNN>`` for
    partial UTF-8 characters) and a marker for special tokens."""
    table = Table(title=f"{len(tokens.ids)} tokens", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("id", justify="right", style="cyan")
    table.add_column("piece")
    table.add_column("special", justify="center")
    display = tokens.display or tokens.pieces
    for i, tid in enumerate(tokens.ids):
        special = bool(tokens.special[i]) if i < len(tokens.special) else False
        piece = display[i] if i < len(display) else ""
        table.add_row(str(i), str(tid), Text(visible(piece), style="magenta" if special else "bold"),
                      "★" if special else "")
    return table


# --------------------------------------------------------------------------------------------------- distribution
def distribution_table(dist, width: int = 30) -> Table:
    """The top-k candidates of a :class:`~decodelab.distribution.Distribution`: rank, id, quoted token, logit,
    probability (percent, 2 decimals) and a bar ``prob * width`` cells long."""
    table = Table(title=f"top {len(dist.top)} next tokens", title_justify="left")
    table.add_column("rank", justify="right", style="dim")
    table.add_column("id", justify="right", style="cyan")
    table.add_column("token", no_wrap=True)
    table.add_column("logit", justify="right")
    table.add_column("prob", justify="right", style="bold")
    table.add_column("", style="green", no_wrap=True)
    for rank, c in enumerate(dist.top):
        table.add_row(str(rank), str(c.id), quoted(c.token), f"{c.logit:.3f}", percent(c.prob), bar(c.prob, width))
    return table


# ----------------------------------------------------------------------------------------------------- generation
def generation_panel(gen) -> RenderableType:
    """One panel per returned sequence of a :class:`~decodelab.trace.Generation`: the prompt dim, the continuation
    bold; the title gives its number (and prompt for batches), the subtitle its score (sum of log-probs, or beam
    search's length-penalised score) and finish reason (``eos``, ``stop`` or ``length``)."""
    panels = []
    many_prompts = len(gen.prompt_ids) > 1
    for i, seq in enumerate(gen.sequences):
        prompt_text = seq.text[: len(seq.text) - len(seq.new_text)] if seq.text.endswith(seq.new_text) else seq.text
        body = Text()
        body.append(prompt_text, style="dim")
        body.append(seq.new_text, style="bold")
        title = f"sequence {i}" + (f" (prompt {seq.prompt_index})" if many_prompts else "")
        subtitle = f"score {seq.score:.4f} · {len(seq.new_ids)} new tokens · finish: {seq.finish_reason}"
        panels.append(Panel(body, title=title, subtitle=subtitle, title_align="left", subtitle_align="right"))
    return Group(*panels)


# ---------------------------------------------------------------------------------------------------------- trace
def _alternatives(step, n: int = 3) -> str:
    others = [c for c in step.top if c.id != step.id][:n]
    return "  ".join(f"{quoted(c.token)} {percent(c.prob)}" for c in others)


def _changes(step, n: int = 2) -> str:
    """The step's processor changes, except the constraint's (its own column shows them)."""
    constraint = step.constraint.kind if getattr(step, "constraint", None) else None
    changes = [ch for ch in step.changes if ch.processor != constraint]
    parts = []
    for ch in changes[:n]:
        after = "removed" if ch.after == -math.inf else f"{ch.after:.2f}"
        parts.append(f"{ch.processor}: {quoted(ch.token)} {ch.before:.2f}→{after}")
    more = len(changes) - n
    return "; ".join(parts) + (f"; +{more} more" if more > 0 else "")


def trace_table(trace, max_alternatives: int = 3) -> Table:
    """Per-step decisions of a :class:`~decodelab.trace.Trace`: step, row (sequence, or beam slot for beam search),
    chosen token, its probability under the model and (when processors changed it) under the processed distribution,
    its rank in the model's distribution (0 = argmax), the entropy (nats) and the strongest alternatives; for a
    constrained generation (``json_schema`` / ``regex`` / ``grammar``) also what the constraint did
    (:func:`constraint_cell`)."""
    table = Table(title=f"trace ({trace.strategy}; processors: {', '.join(trace.processors) or 'none'})",
                  title_justify="left")
    rows = {s.row for s in trace.steps}
    show_used = any(abs(s.logprob - s.logprob_processed) > 1e-6 for s in trace.steps)
    show_changes = any(_changes(s) for s in trace.steps)
    show_constraint = any(getattr(s, "constraint", None) for s in trace.steps)
    fixed = {"no_wrap": True, "justify": "right"}
    table.add_column("step", style="dim", **fixed)
    if len(rows) > 1:
        table.add_column("beam" if trace.beam_nodes else "row", style="dim", **fixed)
    table.add_column("token", style="bold", no_wrap=True)
    table.add_column("prob", **fixed)
    if show_used:
        table.add_column("p used", **fixed)
    table.add_column("rank", **fixed)
    table.add_column("entropy", **fixed)
    table.add_column("alternatives", min_width=24, max_width=44)
    if show_changes:
        table.add_column("processor changes", style="yellow", min_width=16, max_width=40)
    if show_constraint:
        table.add_column("constraint: allowed · removed · forbidden", min_width=24, max_width=48)
    for s in trace.steps:
        cells = [str(s.step)]
        if len(rows) > 1:
            cells.append(str(s.row))
        cells += [quoted(s.token), percent(_prob(s.logprob))]
        if show_used:
            cells.append(percent(_prob(s.logprob_processed)))
        rank_style = "" if s.rank == 0 else "yellow"
        cells += [Text(str(s.rank), style=rank_style), f"{s.entropy:.2f}",
                  Text(_alternatives(s, max_alternatives), no_wrap=True, overflow="ellipsis")]
        if show_changes:
            cells.append(Text(_changes(s), no_wrap=True, overflow="ellipsis"))
        if show_constraint:
            cells.append(constraint_cell(s.constraint))
        table.add_row(*cells)
    return table


def constraint_cell(c, max_forbidden: int = 3) -> Text:
    """One step's :class:`~decodelab.trace.ConstraintStep` in a line: how many tokens were allowed, the probability
    mass removed (red when the model's first choice was forbidden), the JSON path, and the most likely forbidden
    tokens struck through with their probabilities. ``None`` (no record) gives an empty cell."""
    out = Text(no_wrap=True, overflow="ellipsis")
    if c is None:
        return out
    out.append(f"{c.allowed:,} · ")
    out.append(percent(c.mass_removed), style="red" if c.top_before.id != c.top_after.id else "")
    if c.path:
        out.append(f" · {c.path}", style="cyan")
    for cand in c.forbidden[:max_forbidden]:
        out.append(" ")
        out.append(quoted(cand.token), style="strike dim")
        out.append(f" {percent(cand.prob)}", style="dim")
    return out


def _node_label(node, on_returned_path: bool, rank_of_returned: dict[int, int]) -> Text:
    label = Text()
    label.append(quoted(node.token))
    label.append(f"  {percent(_prob(node.logprob))}  Σ {node.cumulative:.2f}", style="dim")
    if node.status == "returned":
        label.append(f"  ★ returned #{rank_of_returned.get(node.node, 0)} score {node.score:.4f}",
                     style="bold green")
        label.stylize("bold green", 0, len(quoted(node.token)))
    elif node.status == "finished":
        label.append(f"  ✓ finished, score {node.score:.4f} (not returned)", style="green")
    elif node.status == "pruned":
        label.append("  ✗ pruned")
        label.stylize("dim")
    elif on_returned_path:
        label.stylize("bold cyan", 0, len(quoted(node.token)))
    return label


def beam_tree(trace, prompt_label: str = "prompt") -> Tree:
    """The beam-search tree of a :class:`~decodelab.trace.Trace` as a rich ``Tree``.

    Each node is one token that extended a hypothesis, with its probability and the running sum Σ of processed
    log-probabilities. Pruned candidates are dim (``✗``), finished hypotheses marked ``✓`` with their
    length-penalised score, returned ones ``★`` (numbered best first) and the path leading to them highlighted.
    The last line says why the search stopped. An empty tree (greedy / sampling) has only the root.
    """
    root = Tree(Text(prompt_label, style="bold"), guide_style="dim")
    children: dict[int | None, list] = defaultdict(list)
    by_id = {n.node: n for n in trace.beam_nodes}
    for n in trace.beam_nodes:
        children[n.parent].append(n)
    returned = sorted((n for n in trace.beam_nodes if n.status == "returned"),
                      key=lambda n: (n.row, -(n.score if n.score is not None else -math.inf)))
    rank_of_returned: dict[int, int] = {}
    counters: dict[int, int] = defaultdict(int)
    on_path: set[int] = set()
    for n in returned:
        rank_of_returned[n.node] = counters[n.row]
        counters[n.row] += 1
        cur = n
        while cur is not None:
            on_path.add(cur.node)
            cur = by_id.get(cur.parent) if cur.parent is not None else None

    def add(branch: Tree, node) -> None:
        sub = branch.add(_node_label(node, node.node in on_path, rank_of_returned))
        for child in children.get(node.node, []):
            add(sub, child)

    top = children.get(None, [])
    prompts = sorted({n.row for n in top})
    for row in prompts:
        branch = root if len(prompts) == 1 else root.add(Text(f"prompt {row}", style="bold"))
        for node in (n for n in top if n.row == row):
            add(branch, node)
    return root


_STOP_REASONS = {
    "max_new_tokens": "it reached max_new_tokens={n}, the length limit",
    "all_finished": "every sequence ended with an end-of-sequence token or a stop string",
    "early_stopping": "no running beam could still beat the finished hypotheses (the early_stopping rule)",
}


def stop_reason_text(trace) -> Text:
    """One sentence on why the search as a whole ended (``Trace.stop_reason``)."""
    n = trace.config.get("max_new_tokens", "?") if isinstance(trace.config, dict) else "?"
    reason = _STOP_REASONS.get(trace.stop_reason, trace.stop_reason or "unknown")
    return Text.assemble(("stopped: ", "bold"), reason.format(n=n))


# ---------------------------------------------------------------------------------------------------------- score
def score_table(result) -> Table:
    """Per-token surprise of a scored text (``LM.score``): token, probability, log-probability (nats), 0-based rank
    in the model's distribution and that distribution's entropy (nats). Items without a log-probability (the first
    token has no context) show "-"."""
    table = Table(title="per-token scores", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("token", style="bold", no_wrap=True)
    table.add_column("prob", justify="right")
    table.add_column("logprob", justify="right")
    table.add_column("rank", justify="right")
    table.add_column("entropy", justify="right")
    for i, item in enumerate(result.tokens):
        lp = getattr(item, "logprob", None)
        rank = getattr(item, "rank", None)
        ent = getattr(item, "entropy", None)
        table.add_row(
            str(i),
            quoted(item.token),
            "-" if lp is None else percent(_prob(lp)),
            "-" if lp is None else f"{lp:.3f}",
            "-" if rank is None else Text(str(rank), style="" if rank == 0 else "yellow"),
            "-" if ent is None else f"{ent:.2f}",
        )
    return table


# ---------------------------------------------------------------------------------------------------------- lens
def lens_table(trace, sequence: int = 0) -> Table:
    """The logit lens of one returned sequence (``trace.lens``, see :mod:`decodelab.lens`) as a layers x steps
    table: one column per new token (its text in the header), one row per decoder layer, last layer (the model's
    real prediction) at the bottom. A cell shows the layer's most likely token and, below it, the probability the
    layer gives the token finally chosen at that step (bold green when the layer's top token is the chosen one).
    """
    steps = [s for s in trace.lens if s.sequence == sequence]
    table = Table(title=f"logit lens · sequence {sequence}: top token per layer, p(chosen) below", show_lines=False)
    table.add_column("layer", justify="right", style="dim")
    for s in steps:
        table.add_column(quoted(s.token), justify="center", no_wrap=True)
    n_layers = len(steps[0].layers) if steps else 0
    for layer in range(n_layers):
        cells = []
        for s in steps:
            lay = s.layers[layer]
            top = lay.top[0].token if lay.top else ""
            style = "bold green" if lay.top and lay.top[0].id == s.id else ""
            cells.append(Text.assemble((quoted(top), style), "\n", (percent(lay.prob), "dim")))
        table.add_row(f"layer {layer}", *cells)
    return table
