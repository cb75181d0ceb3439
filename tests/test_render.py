"""The display layer (decodelab.render / decodelab.render_html) on hand-built results with known values.

No model here: the results are built from the dataclasses themselves, so every number on screen is known in advance.
"""

from __future__ import annotations

import html
import io
import math
import re

import pytest
from rich.console import Console

from decodelab import render
from decodelab.distribution import Distribution
from decodelab.scoring import Score, TokenScore
from decodelab.tokens import Tokens
from decodelab.trace import BeamNode, Candidate, Generation, Sequence, Step, Trace


def text_of(renderable, width: int = 140) -> str:
    con = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    con.print(renderable)
    return con.export_text()


def cand(i: int, token: str, prob: float) -> Candidate:
    lp = math.log(prob)
    return Candidate(id=i, token=token, logit=lp + 3.0, prob=prob, logprob=lp)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens(text="A <b> x\n", ids=[1, 2, 3, 4, 0], pieces=["A", " <b>", " x", "\n", "<|endoftext|>"],
                  display=["A", " <b>", " x", "\n", "<|endoftext|>"],
                  piece_bytes=[[65], [32, 60, 98, 62], [32, 120], [10], list(b"<|endoftext|>")],
                  special=[False, False, False, False, True])


@pytest.fixture
def dist() -> Distribution:
    top = [cand(3163, " night", 0.8871), cand(9053, "<b>", 0.05), cand(7, ' "q"', 0.0125)]
    return Distribution(text="It was", ids=[1, 2], logits_shape=[1, 2, 49152], argmax=top[0], top=top, entropy=0.5)


def greedy_generation() -> Generation:
    steps = [
        Step(step=0, row=0, id=10, token=" <b>", logprob=math.log(0.9), logprob_processed=math.log(0.9), rank=0,
             entropy=0.3, top=[cand(10, " <b>", 0.9), cand(11, " & co", 0.05)]),
        Step(step=1, row=0, id=12, token="!", logprob=math.log(0.25), logprob_processed=math.log(0.5), rank=1,
             entropy=1.7, top=[cand(13, ".", 0.6), cand(12, "!", 0.25)]),
    ]
    trace = Trace(strategy="greedy", steps=steps, stop_reason="max_new_tokens", processors=["repetition_penalty"],
                  config={"max_new_tokens": 2})
    seq = Sequence(ids=[1, 2, 10, 12], text="Hi you <b>!", new_ids=[10, 12], new_text=" <b>!", score=-1.49,
                   finish_reason="length")
    return Generation(model="m", prompt_ids=[[1, 2]], sequences=[seq], trace=trace)


def beam_trace() -> Trace:
    lp = math.log
    nodes = [
        BeamNode(0, None, 0, 0, 5, " night", lp(0.6), lp(0.6), "kept"),
        BeamNode(1, None, 0, 0, 6, " day", lp(0.3), lp(0.3), "kept"),
        BeamNode(2, None, 0, 0, 7, " eve", lp(0.05), lp(0.05), "pruned"),
        BeamNode(3, 0, 1, 0, 8, ".", lp(0.5), lp(0.3), "returned", score=lp(0.3) / 2),
        BeamNode(4, 1, 1, 0, 8, ".", lp(0.5), lp(0.15), "finished", score=lp(0.15) / 2),
        BeamNode(5, 1, 1, 0, 9, "!", lp(0.4), lp(0.12), "returned", score=lp(0.12) / 2),
    ]
    return Trace(strategy="beam_search", beam_nodes=nodes, stop_reason="all_finished", config={"max_new_tokens": 2})


# --- small helpers ---------------------------------------------------------------------------------------------------
def test_percent_bar_visible_quoted():
    assert render.percent(0.8871) == "88.71%"
    assert render.percent(1.0) == "100.00%"
    assert render.bar(1.0, 30) == "█" * 30
    assert render.bar(0.5, 10) == "█" * 5
    assert render.bar(0.0, 10) == ""
    assert render.bar(0.5, 1) == "▌"  # half a cell: 4 eighths
    assert render.bar(0.8871, 30) == "█" * 26 + "▋"  # 26.613 cells: 26 full + 5 eighths
    assert render.visible(" a\tb\n\x01") == "␣a⇥b↵\\x01"
    assert render.quoted(" night") == '" night"' and render.quoted("\n") == '"\\n"'


# --- rich --------------------------------------------------------------------------------------------------------------
def test_tokens_table_shows_ids_visible_spaces_and_special(tokens):
    out = text_of(render.tokens_table(tokens))
    assert "5 tokens" in out
    assert "␣<b>" in out and "␣x" in out and "↵" in out
    row = next(line for line in out.splitlines() if "<|endoftext|>" in line)
    assert "★" in row and " 0 " in row


def test_distribution_table_percentages_and_bars(dist):
    out = text_of(render.distribution_table(dist, width=30))
    row = next(line for line in out.splitlines() if '" night"' in line)
    assert "88.71%" in row
    assert render.bar(0.8871, 30) in row and "█" * 26 in row  # 0.8871 * 30 = 26.6 cells
    assert "5.00%" in out and "1.25%" in out
    assert '"<b>"' in out  # rich markup is not interpreted in tokens


def test_generation_panel_and_trace_table():
    gen = greedy_generation()
    out = text_of(render.generation_panel(gen))
    assert "Hi you <b>!" in out and "score -1.4900" in out and "finish: length" in out
    table = text_of(render.trace_table(gen.trace))
    lines = [line for line in table.splitlines() if '"!"' in line and "25.00%" in line]
    assert len(lines) == 1
    assert "50.00%" in lines[0]  # processed probability column appears because it differs from the raw one
    assert '"." 60.00%' in lines[0]  # strongest alternative
    assert "1.70" in lines[0]  # entropy
    assert "stopped: it reached max_new_tokens=2" in text_of(render.stop_reason_text(gen.trace))


def test_beam_tree_marks_pruned_finished_returned():
    trace = beam_trace()
    out = text_of(render.beam_tree(trace))
    assert "├──" in out and "└──" in out
    assert out.count("★ returned") == 2
    assert "★ returned #0" in out and "★ returned #1" in out
    assert "✗ pruned" in out and out.count("✓ finished") == 1
    night_dot = next(line for line in out.splitlines() if "returned #0" in line)
    assert f"score {math.log(0.3) / 2:.4f}" in night_dot
    assert "all_finished" not in out  # the tree itself does not print the reason; stop_reason_text does
    assert "every sequence ended" in text_of(render.stop_reason_text(trace))


def test_beam_tree_children_under_their_parent():
    out = text_of(render.beam_tree(beam_trace())).splitlines()
    day = next(i for i, line in enumerate(out) if '" day"' in line)
    excl = next(i for i, line in enumerate(out) if '"!"' in line)
    assert excl > day and out[excl].index('"!"') > out[day].index('" day"')  # deeper indentation, below " day"


# --- html --------------------------------------------------------------------------------------------------------------
def test_tokens_html_escapes_and_shows_ids(tokens):
    out = render.tokens_html(tokens)
    assert "<b>" not in out  # the token text " <b>" is escaped, never a tag
    assert "␣&lt;b&gt;" in out
    assert out.count('class="dl-token"') == 5
    for tid in tokens.ids:
        assert f">{tid}</span>" in out
    assert tokens._repr_html_() == out


def test_distribution_html_bar_widths_match_probabilities(dist):
    out = render.distribution_html(dist)
    widths = [float(w) for w in re.findall(r'class="dl-bar" style="width:([0-9.]+)%', out)]
    assert widths == pytest.approx([100 * c.prob for c in dist.top], abs=0.005)
    assert widths == [88.71, 5.0, 1.25]
    assert "&quot;&lt;b&gt;&quot;" in out and "<b>" not in out
    assert "&quot; &quot;q&quot;" not in out and "&quot; \\&quot;q\\&quot;&quot;" in out  # JSON-quoted, then escaped
    assert dist._repr_html_() == out


def test_generation_html_colours_tokens_by_probability_and_escapes():
    gen = greedy_generation()
    out = render.generation_html(gen)
    assert "<b>" not in out and "&lt;b&gt;" in out
    spans = re.findall(r'<span class="dl-gen-token" title="([^"]*)" style="background:hsl\((\d+), ', out)
    assert [int(h) for _, h in spans] == [round(120 * 0.9), round(120 * 0.25)]
    assert "rank 1" in html.unescape(spans[1][0]) and '"." 60.00%' in html.unescape(spans[1][0])
    assert gen._repr_html_() == out


def test_generation_html_without_trace_is_plain_bold():
    gen = greedy_generation()
    gen.trace = None
    out = render.generation_html(gen)
    assert "dl-gen-token" not in out and "<b> &lt;b&gt;!</b>" in out


def test_generation_html_beam_follows_returned_path():
    trace = beam_trace()
    seqs = [Sequence(ids=[1, 5, 8], text="p night.", new_ids=[5, 8], new_text=" night.", score=math.log(0.3) / 2,
                     finish_reason="eos"),
            Sequence(ids=[1, 6, 9], text="p day!", new_ids=[6, 9], new_text=" day!", score=math.log(0.12) / 2,
                     finish_reason="eos")]
    out = render.generation_html(Generation(model="m", prompt_ids=[[1]], sequences=seqs, trace=trace))
    hues = [int(h) for h in re.findall(r'class="dl-gen-token" title="[^"]*" style="background:hsl\((\d+),', out)]
    assert hues == [round(120 * 0.6), round(120 * 0.5), round(120 * 0.3), round(120 * 0.4)]


def test_score_html_and_table():
    result = Score(model="m", text="a <b>", tokens=[TokenScore(1, "a"), TokenScore(2, " <b>", math.log(0.5), 0, 1.0)],
                   total_logprob=math.log(0.5), mean_logprob=math.log(0.5), perplexity=2.0)
    out = render.score_html(result)
    assert "perplexity 2.000" in out and "&lt;b&gt;" in out and "<b>" not in out
    assert "hsl(60, " in out
    assert result._repr_html_() == out
    table = text_of(render.score_table(result))
    assert "50.00%" in table and "-0.693" in table
