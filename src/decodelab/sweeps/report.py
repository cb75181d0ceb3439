"""The sweep's outputs: metrics CSV / JSON, plots (matplotlib), a self-contained HTML report, a rich table.

Plots (PNG, embedded in ``report.html`` as data URIs and written to ``plots/``):

- ``repetition_vs_perplexity.png``: one point per strategy, perplexity (log scale) against repetition (%);
- ``zipf.png``: each strategy's rank-frequency curve (log-log) and its fitted Zipf line;
- ``lengths.png``: the distribution of content lengths (tokens) per strategy.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections import Counter
from typing import Any, Sequence

from .metrics import COLUMNS, content_ids, zipf_fit
from .store import atomic_write

DEFINITIONS = {
    "perplexity": "exp(-mean log-probability) of every generated token (eos included) under the generating model, "
                  "given the prompt; pooled over the strategy's generations (Holtzman et al. 2019, "
                  "metrics/perplexity.py). Lower = less surprising.",
    "judge_perplexity": "the same under --judge-model, on the continuation's text re-tokenized by the judge "
                        "(no eos).",
    "self_bleu4": "mean BLEU-4 of each generation against all the strategy's other generations (nltk sentence_bleu, "
                  "smoothing method1; Zhu et al. 2018; at most 1000 hypotheses, as the paper). Higher = less "
                  "diverse.",
    "zipf": "-slope of the least-squares fit of log count on log rank of the token frequencies (top 5000 ranks; "
            "the paper's metrics/zipf.py).",
    "repetition": "share of generations ending in a loop: the tail phrase of n tokens (1..90) repeated the most "
                  "times back to back repeats >= 2 times and n >= 3 or > 50 times (the paper's "
                  "metrics/repetition.py).",
    "distinct_n": "distinct n-grams / all n-grams over the strategy's generations (Li et al. 2016).",
    "mean_length": "mean content tokens per generation (without the final eos).",
    "eos_rate": "share of generations that ended with eos before the token limit.",
    "mauve": "MAUVE against the references (Pillutla et al. 2021).",
}
"""One line per metric, shown in the report and stored in metrics.json (full text: decodelab.sweeps.metrics)."""

_FORMATS = {"perplexity": "{:.2f}", "judge_perplexity": "{:.2f}", "self_bleu4": "{:.3f}", "zipf": "{:.3f}",
            "repetition": "{:.1%}", "distinct_1": "{:.3f}", "distinct_2": "{:.3f}", "distinct_3": "{:.3f}",
            "mean_length": "{:.1f}", "eos_rate": "{:.1%}", "mauve": "{:.3f}"}


def fmt(column: str, value: Any) -> str:
    """A metric value as shown in tables (``-`` for None)."""
    if value is None:
        return "-"
    spec = _FORMATS.get(column)
    return spec.format(value) if spec else str(value)


def shown_columns(table: list[dict]) -> list[str]:
    """The columns worth showing: optional ones (judge, MAUVE) only when some strategy has them."""
    return [c for c in COLUMNS if c not in ("judge_perplexity", "mauve") or any(r.get(c) is not None for r in table)]


def write_tables(out: str, table: list[dict], facts: dict[str, Any]) -> None:
    """``metrics.csv`` (raw numbers, every column) and ``metrics.json`` (table, definitions, facts), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    atomic_write(os.path.join(out, "metrics.csv"), buf.getvalue())
    doc = {"metrics": table, "definitions": DEFINITIONS, **facts}
    atomic_write(os.path.join(out, "metrics.json"), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def rich_table(table: list[dict], title: str | None = None):
    """The metrics as a :class:`rich.table.Table` (distinct-1 and distinct-3 left out: see metrics.csv)."""
    from rich.table import Table

    cols = [c for c in shown_columns(table) if c not in ("distinct_1", "distinct_3")]  # fits 120 columns
    t = Table(title=title, show_lines=False)
    for c in cols:
        t.add_column(c, justify="left" if c == "strategy" else "right", no_wrap=True)
    for row in table:
        t.add_row(*[fmt(c, row.get(c)) for c in cols])
    return t


def markdown_table(table: list[dict]) -> str:
    """The metrics as a Markdown table (the README's)."""
    cols = shown_columns(table)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, row.get(c)) for c in cols) + " |" for row in table]
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots(table: list[dict], rows: Sequence[dict]) -> dict[str, bytes]:
    """The report's plots as PNG bytes by file name (needs matplotlib; ``{}`` when it is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        import numpy as np
    except ModuleNotFoundError:
        return {}
    names = [r["strategy"] for r in table]
    by: dict[str, list[list]] = {n: [] for n in names}
    for row in rows:
        if row["strategy"] in by:
            by[row["strategy"]].append(content_ids(row))
    out: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(table):
        if r["perplexity"] is None or r["repetition"] is None:
            continue
        ax.scatter(r["perplexity"], 100 * r["repetition"], s=40)
        # labels alternately above and below the point: strategies with near-equal values stay readable
        ax.annotate(r["strategy"], (r["perplexity"], 100 * r["repetition"]), textcoords="offset points",
                    xytext=(5, 4 if i % 2 == 0 else -11), fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 10, 100 rather than 10^0 ... with crowded minor labels
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("perplexity under the model (log scale)")
    ax.set_ylabel("generations ending in a loop (%)")
    ax.set_title("Repetition vs perplexity per strategy")
    ax.grid(True, alpha=0.3)
    out["repetition_vs_perplexity.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        counts = Counter(t for toks in by[name] for t in toks)
        fit = zipf_fit(by[name])
        if fit is None:
            continue
        ys = np.array(sorted(counts.values(), reverse=True)[:5000], dtype=float)
        xs = np.arange(1, len(ys) + 1)
        line, = ax.loglog(xs, ys, lw=1, label=f"{name} (s={fit[0]:.2f})")
        ax.loglog(xs, np.exp(fit[1]) * xs ** (-fit[0]), ls="--", lw=0.8, color=line.get_color())
    ax.set_xlabel("token rank")
    ax.set_ylabel("count")
    ax.set_title("Rank-frequency (solid) and Zipf fits (dashed)")
    ax.legend(fontsize=7)
    out["zipf.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 0.45 * max(4, len(names)) + 1))
    data = [[len(t) for t in by[n]] or [0] for n in names]
    ax.boxplot(data, vert=False, labels=names) if _old_mpl(matplotlib) else ax.boxplot(data, orientation="horizontal",
                                                                                       tick_labels=names)
    ax.set_xlabel("content tokens per generation")
    ax.set_title("Length distributions")
    ax.grid(True, axis="x", alpha=0.3)
    out["lengths.png"] = _png(fig)
    plt.close(fig)
    return out


def _old_mpl(matplotlib) -> bool:
    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return (major, minor) < (3, 10)


# --- HTML ---------------------------------------------------------------------------------------------------------------
_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
.sample{margin:.3em 0 .8em}.prompt{color:#777}img{max-width:100%}dt{font-weight:600}"""


def html_report(table: list[dict], rows: Sequence[dict], facts: dict[str, Any], images: dict[str, bytes],
                samples: int = 3) -> str:
    """A self-contained HTML page (no external resource): facts, table, definitions, plots, sample generations."""
    e = html.escape
    cols = shown_columns(table)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>decodelab sweep</title><style>{_CSS}</style>"
             "</head><body><h1>decodelab sweep</h1><ul>"]
    for key in ("model", "judge_model", "prompts", "rows", "execution", "elapsed_s", "decodelab"):
        if facts.get(key) is not None:
            parts.append(f"<li><b>{e(key)}</b>: <code>{e(json.dumps(facts[key], ensure_ascii=False))}</code></li>")
    parts.append("</ul><h2>Metrics</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
    for r in table:
        parts.append("<tr>" + "".join(f"<td>{e(fmt(c, r.get(c)))}</td>" for c in cols) + "</tr>")
    parts.append("</table><h2>Strategies</h2><table><tr><th>strategy</th><th>settings</th><th>seeds</th></tr>")
    for s in facts.get("strategies", []):
        parts.append(f"<tr><td>{e(s['name'])}</td><td><code>{e(json.dumps(s['settings']))}</code></td>"
                     f"<td>{e(json.dumps(s['seeds']))}</td></tr>")
    parts.append("</table><h2>Definitions</h2><dl>")
    for k, v in DEFINITIONS.items():
        parts.append(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>")
    parts.append("</dl><h2>Plots</h2>")
    for name, png in images.items():
        parts.append(f"<p><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")
    parts.append("<h2>Sample generations</h2>")
    for r in table:
        picked = [row for row in rows if row["strategy"] == r["strategy"]][:samples]
        parts.append(f"<h3>{e(r['strategy'])}</h3>")
        for row in picked:
            parts.append(f"<div class='sample'><span class='prompt'>{e(row['prompt'])}</span>{e(row['text'])} "
                         f"<small>({e(row['finish_reason'])}, {row['n_tokens']} tokens)</small></div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(out: str, table: list[dict], rows: Sequence[dict], facts: dict[str, Any]) -> list[str]:
    """Write metrics.csv, metrics.json, plots/*.png and report.html (each atomically); return the paths."""
    write_tables(out, table, facts)
    images = plots(table, rows)
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    paths = [os.path.join(out, "metrics.csv"), os.path.join(out, "metrics.json")]
    for name, png in images.items():
        atomic_write(os.path.join(out, "plots", name), png)
        paths.append(os.path.join(out, "plots", name))
    atomic_write(os.path.join(out, "report.html"), html_report(table, rows, facts, images))
    paths.append(os.path.join(out, "report.html"))
    return paths
