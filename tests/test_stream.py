"""Streaming: the incremental detokenizer (UTF-8 safe, stop-string safe) and ``LM.stream`` for greedy, sampling and
beam search. Invariant everywhere: ``"".join(deltas) == Sequence.new_text`` and streamed == non-streamed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decodelab
from decodelab.errors import ConfigError, InputError
from decodelab.models import EMBEDDED_MODEL, load_tokenizer, qwen2_tokenizer
from decodelab.streaming import Delta, IncrementalDetokenizer, Stream

TEXT = "Zażółć gęślą jaźń 🙂 你好"
PROMPT = "It was"


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def qwen_tok():
    return qwen2_tokenizer()


def push_all(tok, ids, stops=(), context=()):
    detok = IncrementalDetokenizer(tok, list(context), tuple(stops))
    deltas = [detok.push(i) for i in ids]
    return detok, deltas


# --- the detokenizer alone --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [TEXT, " " + TEXT, "  leading spaces\n\tand tabs 🙂🙂", "你好，世界！ 🎉 ąę"])
@pytest.mark.parametrize("which", ["smol_tok", "qwen_tok"])
def test_detokenizer_token_by_token_is_exact_and_never_emits_a_partial_character(request, text, which):
    tok = request.getfixturevalue(which)
    ids = tok(text).input_ids
    detok, deltas = push_all(tok, ids)
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + detok.finish(text) == text
    assert "".join(deltas) == text  # everything was stable by the last token
    if which == "smol_tok" and text == TEXT:
        # SmolLM2 splits 'ż', 'ą', 'ź', '你', '好' across byte tokens: those steps emit nothing until the last byte
        assert deltas[2] == "" and deltas[3] == "ż"
        assert deltas[-2] == "" and deltas[-1] == "好"


STOP_CASES = [
    ("ęśl", "Zażółć g"),  # spans three tokens
    ("ą j", "Zażółć gęśl"),  # starts in the second byte-token of 'ą', ends inside ' ja'
    ("🙂 你", "Zażółć gęślą jaźń "),  # ends inside the bytes of '你'
    ("好", "Zażółć gęślą jaźń 🙂 你"),
    ("Zażółć", ""),  # the very first characters
    ("jaźx", TEXT),  # a long partial match that never completes: held back, then released
]


@pytest.mark.parametrize("stop,expected", STOP_CASES)
def test_detokenizer_cuts_before_stop_strings_split_across_tokens(smol_tok, stop, expected):
    ids = smol_tok(TEXT).input_ids
    detok, deltas = push_all(smol_tok, ids, stops=[stop, "never there"])
    emitted = ""
    for d in deltas:
        emitted += d
        # nothing past the cut is ever emitted, so no stop string and no partial one (a prefix of the stop string
        # that turns out to begin it) ever reaches the reader
        assert expected.startswith(emitted)
    final = expected
    assert "".join(deltas) + detok.finish(final) == final
    assert detok.stopped == (stop in TEXT)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["a", " ", "ż", "ó", "🙂", "你", "好", "ł", "\n", "é", "x", "ab", " the"]),
                min_size=1, max_size=20),
       st.integers(0, 30), st.integers(1, 4))
def test_detokenizer_property_join_equals_decode(smol_tok, parts, start, length):
    text = "".join(parts)
    ids = smol_tok(text).input_ids
    decoded = smol_tok.decode(ids, skip_special_tokens=True)
    stop = text[start : start + length] if start < len(text) else None
    detok, deltas = push_all(smol_tok, ids, stops=[stop] if stop else [])
    expected = decoded[: decoded.find(stop)] if stop else decoded
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + detok.finish(expected) == expected
    if stop:
        assert stop not in "".join(deltas)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["a", " ", "ż", "🙂", "你", "\n", "x", " the", " .", " ,", " n't", " 's", "'", "?"]),
                min_size=20, max_size=120),
       st.sampled_from(["smol", "qwen", "smol_cleanup"]))
def test_detokenizer_decodes_a_few_ids_per_token_and_gives_the_whole_decode(smol_tok, qwen_tok, parts, which):
    """The detokenizer keeps the text of the ids before its last checkpoint and decodes only the ids after it; at
    every token its text equals the text of all the ids decoded after the prompt (``continuation_text``), also for
    a tokenizer that cleans up spaces (" ." -> "."), and each decode covers at most a few ids."""
    import copy

    from decodelab.detokenize import CONTEXT_TOKENS, continuation_text
    from decodelab.streaming import CHECKPOINT_TOKENS

    tok = qwen_tok if which == "qwen" else smol_tok
    if which == "smol_cleanup":
        tok = copy.copy(smol_tok)
        tok.clean_up_tokenization_spaces = True  # transformers 5 applies it to a BPE tokenizer only when forced:
        tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
        assert tok.decode(tok(" n't .").input_ids) == "n't."
    prompt = tok("It was a dark").input_ids
    ids = tok("".join(parts)).input_ids
    detok = IncrementalDetokenizer(tok, prompt)
    decoded: list[int] = []  # ids per decode call of the detokenizer
    decode = tok.decode
    counting = lambda token_ids, **kw: decoded.append(len(token_ids)) or decode(token_ids, **kw)  # noqa: E731
    for n in range(1, len(ids) + 1):
        tok.decode = counting
        try:
            detok.push(ids[n - 1])
            text = detok.full_text()
        finally:
            del tok.decode
        assert text == continuation_text(tok, prompt[-CONTEXT_TOKENS:], ids[:n])
    assert "".join([detok.text, detok.finish(continuation_text(tok, prompt[-CONTEXT_TOKENS:], ids))]) == \
        continuation_text(tok, prompt[-CONTEXT_TOKENS:], ids)
    if which != "smol_cleanup":  # byte-level text without clean-up: checkpoints wherever a character is whole
        assert max(decoded) <= CONTEXT_TOKENS + CHECKPOINT_TOKENS + 8  # not len(ids) + CONTEXT_TOKENS


# --- LM.stream on a generation forced to write TEXT ---------------------------------------------------------------------


def forcing_bias(tokenizer, prompt: str, text: str) -> tuple[list[int], dict]:
    """sequence_bias that makes any model continue ``prompt`` with exactly ``text``: each target token gets +100
    when it follows the prompt's last token and the target tokens before it."""
    last = tokenizer(prompt).input_ids[-1]
    target = tokenizer(text).input_ids
    assert last not in target
    return target, {(last, *target[: i + 1]): 100.0 for i in range(len(target))}


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)


def stream_and_generate(lm, prompt, **kw):
    s = lm.stream(prompt, **kw)
    assert isinstance(s, Stream)
    deltas = list(s)
    gen = lm.generate(prompt, **kw)
    assert s.generation is not None
    assert [q.new_ids for q in s.generation.sequences] == [q.new_ids for q in gen.sequences]
    assert s.generation.sequences == gen.sequences
    assert all(deltas), "the plain iterator yields only non-empty deltas"
    assert "\ufffd" not in "".join(deltas) or "\ufffd" in gen.sequences[0].new_text
    assert "".join(deltas) == gen.sequences[0].new_text
    return deltas, gen


@pytest.mark.parametrize("mode", [dict(), dict(do_sample=True, seed=3, top_k=0), dict(num_beams=2)],
                         ids=["greedy", "sampling", "beam"])
def test_stream_forced_unicode_text(lm, mode):
    target, bias = forcing_bias(lm.tokenizer, PROMPT, TEXT)
    deltas, gen = stream_and_generate(lm, PROMPT, sequence_bias=bias, max_new_tokens=len(target), **mode)
    seq = gen.sequences[0]
    assert seq.new_ids == target
    assert seq.new_text == TEXT
    assert seq.text == PROMPT + TEXT
    assert seq.finish_reason == "length"
    if not mode:
        assert len(deltas) == 18  # one per token that completes a character: 5 of the 23 are leading bytes


def test_stream_forced_text_with_leading_space(lm):
    text = " " + TEXT
    target, bias = forcing_bias(lm.tokenizer, PROMPT, text)
    deltas, gen = stream_and_generate(lm, PROMPT, sequence_bias=bias, max_new_tokens=len(target))
    assert gen.sequences[0].new_text == text and deltas[0].startswith(" ")


@pytest.mark.parametrize("stop,expected", STOP_CASES[:4])
@pytest.mark.parametrize("mode", [dict(), dict(num_beams=2)], ids=["greedy", "beam"])
def test_stream_stop_strings_split_across_tokens(lm, stop, expected, mode):
    target, bias = forcing_bias(lm.tokenizer, PROMPT, TEXT)
    deltas, gen = stream_and_generate(lm, PROMPT, sequence_bias=bias, max_new_tokens=len(target) + 2,
                                      stop_strings=[stop], **mode)
    seq = gen.sequences[0]
    assert seq.finish_reason == "stop"
    assert seq.new_text == expected
    # the ids keep the token that completed the stop string, and nothing after it
    n = len(seq.new_ids)
    assert seq.new_ids == target[:n]
    assert stop in lm.tokenizer.decode(target[:n]) and stop not in lm.tokenizer.decode(target[: n - 1])


def test_forced_generation_matches_transformers(lm, tiny_llama):
    """The forcing bias is an ordinary sequence_bias: transformers produces the same ids."""
    import warnings

    target, bias = forcing_bias(lm.tokenizer, PROMPT, TEXT)
    enc = lm.tokenizer(PROMPT, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tiny_llama.model.generate(**enc, do_sample=False, max_new_tokens=len(target),
                                        sequence_bias={k: v for k, v in bias.items()},
                                        pad_token_id=lm.tokenizer.pad_token_id)
    assert out[0, enc.input_ids.shape[1] :].tolist() == target


# --- streaming every sequence, beam policy, errors -------------------------------------------------------------------


def test_stream_every_sequence_of_a_batch(lm):
    kw = dict(do_sample=True, seed=9, num_return_sequences=2, max_new_tokens=6, top_k=0, stop_strings=["e"])
    s = lm.stream([PROMPT, "Hello"], **kw)
    pieces: dict[int, str] = {}
    for d in s.deltas():
        assert isinstance(d, Delta) and d.text
        pieces[d.index] = pieces.get(d.index, "") + d.text
    gen = lm.generate([PROMPT, "Hello"], **kw)
    assert s.generation.sequences == gen.sequences
    for i, seq in enumerate(gen.sequences):
        assert pieces.get(i, "") == seq.new_text
        assert "e" not in seq.new_text


def test_beam_stream_emits_only_stable_text_and_reports_the_best_beam(lm):
    target, bias = forcing_bias(lm.tokenizer, PROMPT, TEXT)
    kw = dict(num_beams=3, num_return_sequences=2, sequence_bias=bias, max_new_tokens=len(target))
    s = lm.stream(PROMPT, **kw)
    events = list(s.deltas(every_step=True))
    gen = s.generation
    final = gen.sequences[0].new_text
    assert final == TEXT
    during = [e for e in events if e.step is not None and e.index == 0]
    assert len(during) == len(target)  # one event per step for the streamed best beam
    emitted = ""
    for e in during:
        emitted += e.text
        assert final.startswith(emitted)  # never takes anything back
        assert e.best is not None and TEXT.startswith(e.best.rstrip("\ufffd"))
    assert emitted, "beam search streamed nothing before the end"
    assert "".join(e.text for e in events if e.index == 0) == final
    assert "".join(e.text for e in events if e.index == 1) == gen.sequences[1].new_text


def test_unforced_beam_and_beam_sampling_streams_equal_generate(lm):
    stream_and_generate(lm, "The capital of France is", num_beams=3, max_new_tokens=8, repetition_penalty=1.3)
    stream_and_generate(lm, "The capital of France is", num_beams=2, do_sample=True, seed=1, max_new_tokens=8)
    stream_and_generate(lm, "The capital of France is", num_beams=3, max_new_tokens=8, stop_strings=["a", " t"])


def test_stream_validates_before_generating(lm):
    with pytest.raises(ConfigError):
        lm.stream(PROMPT, num_beams=0)
    with pytest.raises(InputError):
        lm.stream("", max_new_tokens=3)


def test_stream_text_helper_and_eos(lm):
    greedy = lm.generate(PROMPT, max_new_tokens=8).sequences[0].new_ids
    i = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])  # the first step emitting a new id
    s = lm.stream(PROMPT, max_new_tokens=8, eos_token_id=greedy[i])
    assert s.text() == lm.tokenizer.decode(greedy[:i])
    assert s.generation.sequences[0].finish_reason == "eos"
    assert s.generation.sequences[0].new_ids == greedy[: i + 1]


def test_stream_close_stops_early(lm):
    s = lm.stream(PROMPT, max_new_tokens=20)
    first = next(s)
    assert first
    s.close()
    with pytest.raises(StopIteration):
        next(s)
    assert s.generation is None


def test_sentencepiece_style_leading_space_is_kept():
    """A Metaspace decoder drops the leading space of the first token it decodes; new text is decoded after the
    prompt's last tokens, so the space between prompt and continuation survives (here and in the stream)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from decodelab.detokenize import continuation_text

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁wor": 3, "ld": 4}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tok.decode([2]) == "world"  # what a standalone decode of the new ids would give
    assert continuation_text(tok, [1], [2]) == " world"
    detok = IncrementalDetokenizer(tok, [1])
    assert [detok.push(3), detok.push(4)] == [" wor", "ld"]


def test_stream_exposes_the_trace_while_running(lm):
    s = lm.stream(PROMPT, max_new_tokens=5, trace=True, trace_top_k=2)
    seen_steps = []
    for _ in s.deltas(every_step=True):
        seen_steps.append(len(s.trace.steps))
    assert seen_steps[:5] == [1, 2, 3, 4, 5]  # one recorded step per delta event, available at once
    assert s.generation.trace is s.trace and len(s.trace.steps) == 5
