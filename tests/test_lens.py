"""Logit lens (``lens=k``, ``decodelab generate --lens``): exact values on the seeded tiny Llama.

The last layer's lens must be the model's real next-token distribution (bit for bit the full-pass logits, and the
trace's decode-step log-probabilities to float rounding); an earlier layer's lens must be ``lm_head(norm(h_l))`` of
that layer's output as transformers itself reports it (``output_hidden_states``).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import decodelab
from decodelab.config import GenerationConfig
from decodelab.errors import ConfigError, InputError
from decodelab.lens import follow_token
from decodelab.trace import Trace

PROMPT = "It was a dark and stormy"


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, "tiny-llama")


def test_last_layer_is_the_real_distribution_and_earlier_layers_are_norm_then_head(lm):
    g = lm.generate(PROMPT, max_new_tokens=4, lens=3)
    seq, trace = g.sequences[0], g.trace
    n_layers = lm.model.config.num_hidden_layers
    assert n_layers == 2 and len(trace.lens) == 4 == len(seq.new_ids)
    p = len(g.prompt_ids[0])
    full = torch.log_softmax(lm.engine.full_logits(torch.tensor([seq.ids[:-1]]))[0].float(), -1)  # (T-1, V)
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([seq.ids[:-1]]), output_hidden_states=True, use_cache=False)
        base = lm.model.get_decoder()
        # the rows the lens reads (positions p-1 .. p+2), multiplied as one (4, hidden) product as the lens does: a
        # product over another row count may round differently in the last bit (MKL's kernels depend on it)
        rows = out.hidden_states[1][0, p - 1 : p - 1 + len(seq.new_ids)]
        layer0 = torch.log_softmax(lm.model.get_output_embeddings()(base.norm(rows)).float(), -1)
        # the model's own logits at those rows (hidden_states[-1] is the final norm's output), over the same row
        # count: on an AVX2 AMD EPYC the output layer over all T - 1 rows rounded one logit differently in the last bit
        last_rows = out.hidden_states[-1][0, p - 1 : p - 1 + len(seq.new_ids)]
        model_last = torch.log_softmax(lm.model.get_output_embeddings()(last_rows).float(), -1)
    for t, step in enumerate(trace.lens):
        assert (step.sequence, step.step, step.id) == (0, t, seq.new_ids[t])
        assert step.token == lm.tokenizer.decode([seq.new_ids[t]])
        assert [lay.layer for lay in step.layers] == [0, 1]
        last, first = step.layers[-1], step.layers[0]
        row = full[p - 1 + t]
        # the last layer: exactly the model's own distribution, the full pass's and the decode step's to rounding
        ref = model_last[t]
        assert last.logprob == float(ref[step.id]) and last.prob == float(ref[step.id].exp())
        assert last.logprob == pytest.approx(float(row[step.id]), abs=1e-5)
        assert last.logprob == pytest.approx(trace.steps[t].logprob, abs=1e-5)
        assert last.rank == trace.steps[t].rank == 0  # greedy chose the argmax
        assert ([c.id for c in last.top] == torch.topk(ref, 3).indices.tolist() == torch.topk(row, 3).indices.tolist()
                == [c.id for c in trace.steps[t].top[:3]])
        assert [c.logprob for c in last.top] == torch.topk(ref, 3).values.tolist()
        # layer 0: lm_head(norm(layer 0's output)), hidden_states[1] being that output in transformers
        r0 = layer0[t]
        assert first.logprob == float(r0[step.id])
        assert first.rank == int((r0 > r0[step.id]).sum())
        assert [c.id for c in first.top] == torch.topk(r0, 3).indices.tolist()
        assert abs(sum(c.prob for c in first.top) - float(r0.exp()[torch.topk(r0, 3).indices].sum())) < 1e-6
    assert Trace.from_dict(json.loads(json.dumps(trace.to_dict()))) == trace


def test_beam_search_lens_covers_every_returned_sequence(lm):
    g = lm.generate(PROMPT, num_beams=3, num_return_sequences=2, max_new_tokens=3, lens=2)
    by_seq = {}
    for s in g.trace.lens:
        by_seq.setdefault(s.sequence, []).append(s)
    assert sorted(by_seq) == [0, 1]
    for i, steps in by_seq.items():
        assert [s.id for s in steps] == g.sequences[i].new_ids
        assert all(len(s.layers) == 2 and len(s.layers[0].top) == 2 for s in steps)


def test_follow_token_matches_the_lens_of_the_chosen_token(lm):
    g = lm.generate(PROMPT, max_new_tokens=3, lens=1)
    grid = follow_token(lm, g, g.sequences[0].new_ids[1])
    assert len(grid) == 3 and all(len(row) == 2 for row in grid)
    step = g.trace.lens[1]
    assert grid[1] == [(lay.rank, lay.prob) for lay in step.layers]
    night = follow_token(lm, g, " night")
    assert night == follow_token(lm, g, lm.tokenizer(" night").input_ids[0])
    with pytest.raises(InputError, match="invalid token=' dark and'"):
        follow_token(lm, g, " dark and")
    with pytest.raises(InputError, match="invalid sequence=1"):
        follow_token(lm, g, 5, sequence=1)


def test_lens_is_opt_in_and_validated(lm):
    assert lm.generate(PROMPT, max_new_tokens=2, trace=True).trace.lens == []
    assert lm.generate(PROMPT, max_new_tokens=2).trace is None
    g = lm.generate(PROMPT, max_new_tokens=2, lens=True)  # lens turns the trace on; True keeps 5
    assert g.trace is not None and len(g.trace.lens[0].layers[0].top) == 5
    assert GenerationConfig.from_kwargs(lens=False).lens == 0
    for bad, why in ((-1, ">= 0"), (101, "<= 100"), ("5", "an integer")):
        with pytest.raises(ConfigError, match=f"lens.*{why}"):
            lm.generate(PROMPT, lens=bad)


def test_cli_lens(tiny_llama, monkeypatch):
    from decodelab import cli

    tiny = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, "tiny")
    monkeypatch.setattr(cli, "_load_lm", lambda model, device, dtype, announce=False, **options: tiny)
    runner = CliRunner()
    res = runner.invoke(cli.app, ["generate", PROMPT, "--max-new-tokens", "3", "--lens", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    lens = data["trace"]["lens"]
    assert len(lens) == 3 and len(lens[0]["layers"]) == 2 and len(lens[0]["layers"][0]["top"]) == 5
    assert [s["id"] for s in lens] == data["sequences"][0]["ids"][-3:]
    table = runner.invoke(cli.app, ["generate", PROMPT, "--max-new-tokens", "3", "--lens"])
    assert table.exit_code == 0, table.output
    assert "logit lens" in table.output and "layer 1" in table.output
    bad = runner.invoke(cli.app, ["generate", PROMPT, "--lens-top-k", "101"])
    assert bad.exit_code == 2 and "lens" in bad.output
    zero = runner.invoke(cli.app, ["generate", PROMPT, "--lens-top-k", "0"])  # 0 would silently mean "no lens"
    assert zero.exit_code == 2 and "--lens-top-k=0" in zero.output and "Traceback" not in zero.output
