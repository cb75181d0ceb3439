"""Hypothesis over every text field of the Python API (tiny random model): any value, any Unicode (lone surrogates,
NUL, bidirectional marks, combining sequences, non-ASCII digits), either works or raises decodelab's own one-line
error naming the parameter; never a raw ValueError / TypeError / UnicodeEncodeError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decodelab
from decodelab.errors import ConfigError, DecodelabError, InputError

pytestmark = pytest.mark.timeout(600)

SPECIAL = ["\ud800", "\udfff", "\x00", "\u202e", "\u200f", "\u0301", "\uff11", "\u0663", "\u00b2", "\ufeff",
           "\U0001f600", "<|im_start|>", " ", "\n"]
# every code point, surrogates included (hypothesis leaves them out unless asked), plus the awkward pieces above
TEXT = st.lists(st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIAL)), max_size=8).map("".join)
ANY = st.one_of(TEXT, st.lists(TEXT, max_size=3), st.none(), st.integers(-5, 10**6), st.binary(max_size=3),
                st.lists(st.integers(-3, 60_000), max_size=3), st.lists(st.lists(st.integers(0, 100), max_size=2),
                                                                         max_size=2), st.floats(), st.booleans())
RUN = settings(max_examples=120, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)


def _valid_text(x) -> bool:
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_error(exc: DecodelabError, kind: type, param: str) -> None:
    assert type(exc) is kind, repr(exc)
    assert exc.param == param and param in str(exc)
    assert "\n" not in str(exc) and len(str(exc)) < 400
    str(exc).encode("utf-8")  # the message itself is printable anywhere (a surrogate is shown escaped)


@pytest.mark.parametrize("method", ["tokenize", "next_token", "score"])
def test_text_methods_work_or_raise_input_error(lm, method):
    @RUN
    @given(value=ANY)
    def check(value):
        try:
            result = getattr(lm, method)(value)
        except DecodelabError as exc:
            _check_error(exc, InputError, "text")
            assert not _valid_text(value) or not lm.tokenizer(value).input_ids
            return
        assert _valid_text(value)
        ids = result.ids if method != "score" else [t.id for t in result.tokens]
        assert ids == lm.tokenizer(value).input_ids

    check()


def test_generate_prompt_works_or_raises_input_error(lm):
    @RUN
    @given(value=ANY)
    def check(value):
        try:
            g = lm.generate(value, max_new_tokens=1)
        except DecodelabError as exc:
            _check_error(exc, InputError, "prompt")
            return
        prompts = [value] if isinstance(value, str) or (value and all(type(i) is int for i in value)) else value
        assert len(g.sequences) == len(prompts)
        for p, ids, seq in zip(prompts, g.prompt_ids, g.sequences):
            assert ids == (p if isinstance(p, list) else lm.tokenizer(p).input_ids)  # token ids are used as given
            assert seq.ids[: len(ids)] == ids and len(seq.new_ids) == 1

    check()


def test_stop_strings_work_or_raise_config_error(lm):
    @RUN
    @given(value=ANY)
    def check(value):
        try:
            g = lm.generate("Hello", max_new_tokens=1, stop_strings=value)
        except DecodelabError as exc:
            _check_error(exc, ConfigError, "stop_strings")
            return
        stops = [value] if isinstance(value, str) else value or []
        assert all(_valid_text(s) and s for s in stops) and len(set(stops)) <= 4
        assert g.sequences[0].finish_reason in ("stop", "length", "eos")

    check()


def test_logit_bias_keys_and_values_work_or_raise_config_error(lm):
    odd = ["12", "0012", "１２", "²", " 5", "5 ", "9" * 5000]
    keys = st.one_of(TEXT, st.integers(-3, 60_000), st.sampled_from(odd))
    values = st.one_of(st.floats(), st.integers(-200, 200), TEXT, st.none())

    @RUN
    @given(bias=st.dictionaries(keys, values, max_size=3))
    def check(bias):
        try:
            lm.generate("Hello", max_new_tokens=1, logit_bias=bias)
        except DecodelabError as exc:
            _check_error(exc, ConfigError, "logit_bias")
            return
        for k, v in bias.items():
            key = int(k) if isinstance(k, str) else k
            assert isinstance(k, int) or (k.isascii() and k.isdigit())
            assert 0 <= key < lm.vocab_size and -100 <= v <= 100

    check()


def test_documented_examples(lm):
    with pytest.raises(InputError, match=r"invalid prompt='\\ud800': a lone surrogate '\\ud800' at character 0"):
        lm.generate("\ud800", max_new_tokens=1)
    with pytest.raises(InputError, match=r"invalid text='ab\\udc00'.*at character 2"):
        lm.tokenize("ab\udc00")
    with pytest.raises(InputError, match=r"invalid prompt\[1\]=49152: expected a token id from 0 to 49151"):
        lm.generate([5, 49152], max_new_tokens=1)
    with pytest.raises(InputError, match=r"invalid prompt=\[\]"):
        lm.generate([[]], max_new_tokens=1)
    with pytest.raises(ConfigError, match=r"invalid logit_bias=.*ASCII digits"):
        lm.generate("hi", max_new_tokens=1, logit_bias={"１２": 1.0})
    with pytest.raises(ConfigError, match=r"invalid logit_bias\[12\]=-100.5: expected a bias between -100 and 100"):
        lm.generate("hi", max_new_tokens=1, logit_bias={12: -100.5})
    with pytest.raises(ConfigError, match="invalid stop_strings: 5 strings given, at most 4 are allowed"):
        lm.generate("hi", max_new_tokens=1, stop_strings=list("abcde"))
    # token ids are used exactly as given (no BOS added), alone or as a batch
    g = lm.generate([[5, 6, 7], [100]], max_new_tokens=2)
    assert g.prompt_ids == [[5, 6, 7], [100]]
    assert [s.ids[:-2] for s in g.sequences] == [[5, 6, 7], [100]]
    assert lm.generate([5, 6, 7], max_new_tokens=2).sequences[0].ids == g.sequences[0].ids
    # valid Unicode works: NUL, RTL marks, combining sequences, non-ASCII digits
    for text in ("a\x00b", "\u202eabc", "e\u0301\u0302", "١٢٣ １２"):
        assert lm.generate(text, max_new_tokens=1, stop_strings=[text]).sequences[0].ids[:-1] == lm.tokenize(text).ids
