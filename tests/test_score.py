"""Scoring: teacher-forced log-probabilities, ranks, entropies, top alternatives and perplexity, checked against
transformers' own loss and an independent forward pass."""

from __future__ import annotations

import json
import math

import pytest
import torch

import decodelab
from decodelab.errors import ConfigError, InputError
from decodelab.scoring import Score

TEXT = "The quick brown fox jumps over the lazy dog. Zażółć gęślą jaźń 🙂 你好"


def make_lm(loaded) -> decodelab.LM:
    return decodelab.LM(loaded.model, loaded.tokenizer, loaded.name)


def hf_loss(model, ids: list[int]) -> float:
    t = torch.tensor([ids])
    with torch.inference_mode():
        return float(model(t, labels=t).loss)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_score_matches_an_independent_forward_pass(request, arch):
    loaded = request.getfixturevalue(arch)
    lm = make_lm(loaded)
    score = lm.score(TEXT, top_logprobs=3)
    ids = loaded.tokenizer(TEXT).input_ids
    assert score.ids == ids and score.text == TEXT and score.model == loaded.name
    with torch.inference_mode():
        lp = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)
    first = score.tokens[0]
    assert (first.logprob, first.rank, first.entropy, first.top) == (None, None, None, [])
    for t, item in enumerate(score.tokens[1:], start=1):
        dist = lp[t - 1]
        assert item.token == loaded.tokenizer.decode([item.id])
        assert item.logprob == pytest.approx(float(dist[item.id]), abs=1e-4)
        assert item.rank == int((dist > dist[item.id]).sum())
        assert item.entropy == pytest.approx(float(-(dist.exp() * dist).sum()), abs=1e-3)
        assert [c.id for c in item.top] == torch.topk(dist, 3).indices.tolist()
        assert item.top[0].logprob >= item.logprob - 1e-6
        assert (item.rank == 0) == (item.top[0].id == item.id) or item.top[0].logprob == item.logprob
    assert score.total_logprob == pytest.approx(sum(i.logprob for i in score.tokens[1:]), abs=1e-4)
    assert score.mean_logprob == pytest.approx(score.total_logprob / (len(ids) - 1))
    # perplexity is exp(transformers' loss): compared in log space (relative 1e-4 on the perplexity itself)
    assert math.log(score.perplexity) == pytest.approx(hf_loss(loaded.model, ids), abs=1e-4)


def test_embedded_perplexity_equals_exp_of_transformers_loss(embedded):
    lm = make_lm(embedded)
    text = "The capital of France is Paris. It is known for the Eiffel Tower."
    score = lm.score(text)
    loss = hf_loss(embedded.model, score.ids)
    assert score.perplexity == pytest.approx(math.exp(loss), abs=1e-4)
    assert 1.0 < score.perplexity < 200.0  # a real model finds this sentence fairly likely
    assert all(t.top == [] for t in score.tokens)


def test_score_of_a_generation_equals_its_greedy_log_probabilities(tiny_llama):
    """The cached decode loop and the one-pass teacher forcing agree: the generated tokens' logprobs sum to the
    sequence score (greedy, no processors: processed == raw)."""
    lm = make_lm(tiny_llama)
    seq = lm.generate("It was a dark and stormy", max_new_tokens=6).sequences[0]
    score = lm.score_ids(seq.ids)
    new = score.tokens[-len(seq.new_ids) :]
    assert [t.id for t in new] == seq.new_ids
    assert all(t.rank == 0 for t in new)  # greedy picks the argmax
    assert sum(t.logprob for t in new) == pytest.approx(seq.score, abs=1e-4)


def test_score_json_round_trip_and_single_token(tiny_llama):
    lm = make_lm(tiny_llama)
    score = lm.score("Hello world", top_logprobs=2)
    assert Score.from_dict(json.loads(json.dumps(score.to_dict()))) == score
    single = lm.score("Hi")
    assert len(single) == 1 and single.tokens[0].logprob is None
    assert (single.total_logprob, single.mean_logprob, single.perplexity) == (0.0, None, None)
    assert json.loads(json.dumps(single.to_dict()))["perplexity"] is None


def test_score_errors(tiny_llama):
    lm = make_lm(tiny_llama)
    with pytest.raises(InputError):
        lm.score("")
    with pytest.raises(InputError) as err:
        lm.score("word " * 300)  # the tiny model has 256 positions
    assert err.value.param == "text"
    with pytest.raises(ConfigError) as err:
        lm.score("Hello", top_logprobs=-1)
    assert err.value.param == "top_logprobs"
    with pytest.raises(InputError):
        lm.score_ids([lm.vocab_size])
    with pytest.raises(InputError):
        lm.score_ids([])
