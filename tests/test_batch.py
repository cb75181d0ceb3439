"""Batches: a list of prompts runs as one left-padded batch; each row equals that prompt run alone and equals
transformers' batched ``generate``; rows finish independently with their own ``finish_reason``; ``ignore_eos``."""

from __future__ import annotations

import warnings

import pytest

import decodelab

PROMPTS = ["It was a dark and stormy", "Hi", "The capital of France is a city called"]


def make_lm(loaded) -> decodelab.LM:
    return decodelab.LM(loaded.model, loaded.tokenizer, loaded.name)


def hf_batch(loaded, prompts, **kw) -> list[list[int]]:
    """transformers' batched generate with left padding; new ids per returned row (pad ids stripped later)."""
    tok = loaded.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = loaded.model.generate(**enc, pad_token_id=tok.pad_token_id, do_sample=False, **kw)
    return [row[enc.input_ids.shape[1] :] for row in out.tolist()]


def check_batch(loaded, prompts, **kw):
    lm = make_lm(loaded)
    batch = lm.generate(prompts, **kw)
    n = kw.get("num_return_sequences", 1)
    assert len(batch.sequences) == n * len(prompts)
    theirs = hf_batch(loaded, prompts, **kw)
    for p, prompt in enumerate(prompts):
        alone = lm.generate(prompt, **kw)
        for j in range(n):
            seq = batch.sequences[p * n + j]
            assert seq.prompt_index == p
            assert seq.new_ids == alone.sequences[j].new_ids, f"row {p} differs from the prompt run alone"
            assert seq.new_text == alone.sequences[j].new_text
            assert seq.finish_reason == alone.sequences[j].finish_reason
            assert seq.ids == lm.tokenizer(prompt).input_ids + seq.new_ids  # no padding in the returned ids
            row = theirs[p * n + j]
            assert row[: len(seq.new_ids)] == seq.new_ids, f"row {p} differs from transformers' batch"
            assert all(t == lm.pad_id for t in row[len(seq.new_ids) :])
    return batch


@pytest.mark.parametrize("kw", [
    dict(),
    dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    dict(num_beams=3, num_return_sequences=2),
    dict(num_beams=2, repetition_penalty=1.3, length_penalty=0.5),
], ids=["greedy", "greedy-penalties", "beam", "beam-penalties"])
def test_batch_rows_equal_alone_and_transformers(tiny_llama, kw):
    check_batch(tiny_llama, PROMPTS, max_new_tokens=8, **kw)


def test_batch_qwen2_rows_equal_alone_and_transformers(tiny_qwen2):
    check_batch(tiny_qwen2, PROMPTS[:2], max_new_tokens=6, repetition_penalty=1.4)


def test_batch_embedded(embedded):
    check_batch(embedded, ["The capital of France is", "1, 2, 3,"], max_new_tokens=6)


def test_rows_finish_independently(tiny_llama):
    lm = make_lm(tiny_llama)
    alone = [lm.generate(p, max_new_tokens=8).sequences[0].new_ids for p in PROMPTS]
    # an eos id that only the first prompt's continuation contains, at a step where it first appears
    i, eos = next((i, t) for i, t in enumerate(alone[0]) if i > 0 and all(t not in a for a in alone[1:]))
    gen = check_batch(tiny_llama, PROMPTS, max_new_tokens=8, eos_token_id=eos)
    first, others = gen.sequences[0], gen.sequences[1:]
    assert first.finish_reason == "eos" and first.new_ids == alone[0][: alone[0].index(eos) + 1]
    assert lm.tokenizer.decode([eos]) not in first.new_text[len(lm.tokenizer.decode(alone[0][: alone[0].index(eos)])):]
    assert all(s.finish_reason == "length" and len(s.new_ids) == 8 for s in others)


def test_finish_reasons_stop_length_eos_and_ignore_eos(tiny_llama):
    lm = make_lm(tiny_llama)
    alone = [lm.generate(p, max_new_tokens=6).sequences[0] for p in PROMPTS]
    word = alone[1].new_text.strip().split()[0][:3]  # a piece of text the second row writes
    gen = lm.generate(PROMPTS, max_new_tokens=6, stop_strings=[word])
    reasons = [s.finish_reason for s in gen.sequences]
    assert reasons[1] == "stop"
    assert gen.sequences[1].new_text == alone[1].new_text[: alone[1].new_text.index(word)]
    for s, a in zip(gen.sequences, alone):
        if s.finish_reason == "length":
            assert s.new_ids == a.new_ids
        else:
            assert a.new_ids[: len(s.new_ids)] == s.new_ids and word in a.new_text
    # eos set: the model's own eos plus an id it emits; ignore_eos runs to max_new_tokens and keeps that id
    eos = alone[0].new_ids[0]
    stopped = lm.generate(PROMPTS[0], max_new_tokens=6, eos_token_id=[lm.eos_ids[0], eos])
    assert stopped.sequences[0].finish_reason == "eos" and stopped.sequences[0].new_ids == [eos]
    assert stopped.sequences[0].new_text == ""
    ignored = lm.generate(PROMPTS[0], max_new_tokens=6, eos_token_id=[eos], ignore_eos=True)
    assert ignored.sequences[0].finish_reason == "length"
    assert ignored.sequences[0].new_ids == alone[0].new_ids
    ignored_beam = lm.generate(PROMPTS[0], max_new_tokens=6, eos_token_id=[eos], ignore_eos=True, num_beams=2,
                               min_new_tokens=3)
    assert ignored_beam.sequences[0].finish_reason == "length" and len(ignored_beam.sequences[0].new_ids) == 6


def test_beam_batch_rows_finish_independently(tiny_llama):
    lm = make_lm(tiny_llama)
    alone = lm.generate(PROMPTS[0], max_new_tokens=8).sequences[0].new_ids
    check_batch(tiny_llama, PROMPTS, max_new_tokens=8, num_beams=2, eos_token_id=[alone[2]], early_stopping=True)
