"""Trace: every decision recorded (chosen token, log-probability before / after processing, rank, entropy, top-k
before / after, which processor changed which candidate), the beam tree with pruned and finished hypotheses, why
the search stopped, a JSON round-trip, and nothing recorded (no trace work) when tracing is off."""

from __future__ import annotations

import json
import math

import pytest
import torch

import decodelab
from decodelab.search import tracing
from decodelab.trace import Generation, Trace

PROMPT = "It was a dark and stormy"


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)


def full_logits(lm, ids: list[int]) -> torch.Tensor:
    """Next-token logits (V,) after ``ids`` from one uncached forward pass (the reference for the trace)."""
    with torch.inference_mode():
        return lm.model(torch.tensor([ids])).logits[0, -1].float()


def round_trip(gen: Generation) -> None:
    text = json.dumps(gen.to_dict())
    assert Trace.from_dict(json.loads(json.dumps(gen.trace.to_dict()))) == gen.trace
    assert Generation.from_dict(json.loads(text)) == gen


def test_greedy_trace_records_every_decision(lm):
    penalty = 1.5
    gen = lm.generate(PROMPT, max_new_tokens=6, repetition_penalty=penalty, trace=True, trace_top_k=5)
    seq, trace = gen.sequences[0], gen.trace
    assert trace.strategy == "greedy" and trace.processors == ["repetition_penalty"]
    assert trace.stop_reason == "max_new_tokens" and trace.config["repetition_penalty"] == penalty
    assert [s.step for s in trace.steps] == list(range(6)) and {s.row for s in trace.steps} == {0}
    assert [s.id for s in trace.steps] == seq.new_ids
    context = list(gen.prompt_ids[0])
    for step in trace.steps:
        logits = full_logits(lm, context)
        lp = torch.log_softmax(logits, -1)
        assert step.token == lm.tokenizer.decode([step.id])
        assert step.logprob == pytest.approx(float(lp[step.id]), abs=1e-4)
        assert step.rank == int((lp > lp[step.id]).sum())
        assert step.entropy == pytest.approx(float(-(lp.exp() * lp).sum()), abs=1e-3)
        assert [c.id for c in step.top] == torch.topk(logits, 5).indices.tolist()
        assert step.top[0].prob == pytest.approx(math.exp(step.top[0].logprob))
        seen = set(context)
        processed = torch.where(torch.isin(torch.arange(logits.shape[0]), torch.tensor(sorted(seen))),
                                torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        plp = torch.log_softmax(processed, -1)
        assert step.logprob_processed == pytest.approx(float(plp[step.id]), abs=1e-4)
        assert step.id == int(torch.argmax(processed))  # greedy picks the processed argmax
        assert step.top_processed[0].id == step.id and len(step.top_processed) == 5
        # every change recorded is the penalty applied to a seen token among the watched candidates
        for ch in step.changes:
            assert ch.processor == "repetition_penalty" and ch.id in seen
            assert ch.after == pytest.approx(ch.before / penalty if ch.before > 0 else ch.before * penalty, rel=1e-5)
        watched_seen = {c.id for c in step.top} & seen
        assert {ch.id for ch in step.changes} >= watched_seen
        context.append(step.id)
    assert seq.score == pytest.approx(sum(s.logprob_processed for s in trace.steps), abs=1e-4)
    round_trip(gen)


def test_sampling_trace_shows_what_each_warper_removed(lm):
    gen = lm.generate([PROMPT, "Hi"], do_sample=True, seed=4, top_k=3, temperature=0.8, max_new_tokens=4,
                      trace=True, trace_top_k=6)
    trace = gen.trace
    assert trace.strategy == "sampling" and trace.processors == ["temperature", "top_k"]
    assert len(trace.steps) == 8 and {s.row for s in trace.steps} == {0, 1}
    for step in trace.steps:
        assert len(step.top) == 6 and len(step.top_processed) == 3  # removed tokens are not listed
        assert step.id in [c.id for c in step.top_processed]
        assert sum(c.prob for c in step.top_processed) == pytest.approx(1.0, abs=1e-5)
        removed = [ch for ch in step.changes if ch.processor == "top_k"]
        assert len(removed) == 3 and all(ch.after == -math.inf for ch in removed)
        assert {ch.id for ch in removed} == {c.id for c in step.top[3:]}
        scaled = [ch for ch in step.changes if ch.processor == "temperature"]
        assert all(ch.after == pytest.approx(ch.before / 0.8) for ch in scaled)
    for row in (0, 1):
        steps = [s for s in trace.steps if s.row == row]
        assert [s.id for s in steps] == gen.sequences[row].new_ids
    text = json.dumps(gen.to_dict())
    assert '"-inf"' in text  # removed candidates survive JSON as the string "-inf"
    round_trip(gen)


def _path(nodes, node_id: int) -> list[int]:
    ids = []
    while node_id is not None:
        ids.append(nodes[node_id].id)
        node_id = nodes[node_id].parent
    return ids[::-1]


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_beam_trace_is_the_whole_tree(lm, early_stopping):
    greedy = lm.generate(PROMPT, max_new_tokens=6).sequences[0].new_ids
    K, n, lp_pow = 3, 2, 0.7
    eos = [greedy[2]]
    gen = lm.generate(PROMPT, max_new_tokens=6, num_beams=K, num_return_sequences=n, length_penalty=lp_pow,
                      eos_token_id=eos, early_stopping=early_stopping, trace=True)
    trace, nodes = gen.trace, gen.trace.beam_nodes
    assert trace.strategy == "beam_search"
    assert trace.stop_reason in ("early_stopping", "all_finished", "max_new_tokens")
    keep = 2 * K
    steps_run = max(node.step for node in nodes) + 1
    assert len(nodes) == keep * steps_run  # every candidate considered, pruned ones included
    assert [node.node for node in nodes] == list(range(len(nodes)))
    statuses = {node.status for node in nodes}
    assert {"kept", "pruned", "returned"} <= statuses
    for node in nodes:
        if node.step == 0:
            assert node.parent is None
            assert node.cumulative == pytest.approx(node.logprob, abs=1e-5)
        else:
            parent = nodes[node.parent]
            assert parent.step == node.step - 1 and parent.status == "kept"
            assert node.cumulative == pytest.approx(parent.cumulative + node.logprob, abs=1e-4)
        if node.status in ("finished", "returned"):
            assert node.score == pytest.approx(node.cumulative / (node.step + 1) ** lp_pow, abs=1e-4)
    for step in range(steps_run - 1):
        assert sum(1 for node in nodes if node.step == step and node.status == "kept") == K
    returned = sorted((node for node in nodes if node.status == "returned"), key=lambda nd: -nd.score)
    assert len(returned) == n
    for node, seq in zip(returned, gen.sequences):
        assert _path(nodes, node.node) == seq.new_ids
        assert node.score == pytest.approx(seq.score, abs=1e-4)
    # per-step records: one per kept beam
    assert len(trace.steps) == K * steps_run
    round_trip(gen)


def test_beam_sampling_trace(lm):
    gen = lm.generate(PROMPT, max_new_tokens=4, num_beams=2, do_sample=True, seed=5, top_k=10, trace=True)
    assert gen.trace.strategy == "beam_sampling"
    assert "top_k" in gen.trace.processors
    assert len(gen.trace.beam_nodes) == 4 * 4
    round_trip(gen)


def test_tracing_off_records_nothing_and_never_calls_the_tracer(lm, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("trace work while tracing is off")

    monkeypatch.setattr(tracing.Tracer, "process", boom)
    monkeypatch.setattr(tracing.Tracer, "step", boom)
    monkeypatch.setattr(tracing.Tracer, "__init__", boom)
    for kw in (dict(), dict(do_sample=True, seed=1), dict(num_beams=2)):
        gen = lm.generate(PROMPT, max_new_tokens=3, repetition_penalty=1.2, **kw)
        assert gen.trace is None
        assert "trace" in gen.to_dict() and gen.to_dict()["trace"] is None


def test_trace_does_not_change_the_result(lm):
    for kw in (dict(), dict(do_sample=True, seed=2, top_p=0.9), dict(num_beams=3, num_return_sequences=2)):
        plain = lm.generate(PROMPT, max_new_tokens=5, **kw)
        traced = lm.generate(PROMPT, max_new_tokens=5, trace=True, trace_top_k=2, **kw)
        assert [s.new_ids for s in plain.sequences] == [s.new_ids for s in traced.sequences]
        assert [s.score for s in plain.sequences] == pytest.approx([s.score for s in traced.sequences])


def test_trace_records_a_token_a_bias_pushed_into_the_top(lm):
    plain = lm.generate(PROMPT, max_new_tokens=1, trace=True, trace_top_k=3).trace.steps[0]
    low = int(torch.argsort(full_logits(lm, lm.tokenizer(PROMPT).input_ids))[100])  # far outside the raw top 3
    step = lm.generate(PROMPT, max_new_tokens=1, logit_bias={low: 50.0}, trace=True, trace_top_k=3).trace.steps[0]
    assert low not in [c.id for c in plain.top] and low not in [c.id for c in step.top]
    assert step.id == low and step.top_processed[0].id == low and step.rank > 3
    (change,) = [ch for ch in step.changes if ch.id == low]
    assert change.processor == "logit_bias" and change.after == pytest.approx(change.before + 50.0)
    assert len(step.changes) == 1  # the raw favourites were not touched
