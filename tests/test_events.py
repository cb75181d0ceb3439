"""The typed event stream of a generation (``LM.events``, :mod:`decodelab.events`) on the real embedded model: per
sequence the TokenEvent ids are ``generate``'s new ids, the TextDeltas join to its new text, one Finish each; the
trace's logprobs ride on the tokens; beam search reports BeamUpdates; stop strings never reach a delta. And the
surfaces that format the stream (server/, cli.py, sweeps/) use no private ``LM`` attribute."""

from __future__ import annotations

import ast
import pathlib

import pytest

import decodelab
from decodelab import BeamUpdate, Finish, StepDone, TextDelta, TokenEvent, TraceStep
from decodelab.errors import ConfigError, InputError

PROMPT = "It was a dark and stormy"
GREEDY_12 = [3163, 28, 351, 260, 2388, 506, 11005, 16119, 7880, 260, 3103, 506]  # " night, with the sun's rays ..."
SRC = pathlib.Path(decodelab.__file__).parent


@pytest.fixture(scope="module")
def lm(embedded):
    return decodelab.LM(embedded.model, embedded.tokenizer, embedded.name)


def by_index(events, kind):
    out: dict[int, list] = {}
    for e in events:
        if isinstance(e, kind):
            out.setdefault(e.index, []).append(e)
    return out


def check_invariants(events, gen):
    """Every sequence of ``gen``: its TokenEvent ids are its new_ids, its TextDeltas (non-empty) join to its
    new_text, one Finish with its reason / text / ids, and that Finish is the last event about it."""
    tokens, deltas, finishes = by_index(events, TokenEvent), by_index(events, TextDelta), by_index(events, Finish)
    assert sorted(finishes) == list(range(len(gen.sequences)))
    for i, seq in enumerate(gen.sequences):
        assert [t.id for t in tokens.get(i, [])] == seq.new_ids
        assert all(d.text for d in deltas.get(i, []))
        assert "".join(d.text for d in deltas.get(i, [])) == seq.new_text
        (fin,) = finishes[i]
        assert (fin.finish_reason, fin.text, list(fin.ids), fin.prompt_index) == (
            seq.finish_reason, seq.new_text, seq.new_ids, seq.prompt_index)
        last = max(k for k, e in enumerate(events) if getattr(e, "index", None) == i)
        assert events[last] is fin
    assert all(f.generation is finishes[0][0].generation for fs in finishes.values() for f in fs)


def test_greedy_events_equal_generate_with_the_trace_logprobs(lm):
    kw = dict(max_new_tokens=12, trace=True, trace_top_k=3)
    stream = lm.events(PROMPT, **kw)
    assert stream.config.max_new_tokens == 12 and stream.prompt_ids == [lm.encode(PROMPT)]
    events = list(stream)
    gen = lm.generate(PROMPT, **kw)
    assert gen.sequences[0].new_ids == GREEDY_12
    assert stream.generation.sequences == gen.sequences
    check_invariants(events, gen)

    tokens = [e for e in events if isinstance(e, TokenEvent)]
    steps = [e for e in events if isinstance(e, StepDone)]
    records = [e.record for e in events if isinstance(e, TraceStep)]
    assert [s.step for s in steps] == list(range(12)) and [t.step for t in tokens] == list(range(12))
    assert records == stream.generation.trace.steps and len(records) == 12
    # the logprobs are the trace's: the raw distribution's, with its top alternatives
    assert [t.logprob for t in tokens] == [s.logprob for s in gen.trace.steps]
    assert [[c.id for c in t.top] for t in tokens] == [[c.id for c in s.top] for s in gen.trace.steps]
    assert all(len(t.top) == 3 and t.top[0].logprob >= t.logprob for t in tokens)
    assert [t.token for t in tokens] == [lm.tokenizer.decode([i]) for i in GREEDY_12]
    # each token's text starts at its offset in the new text (ASCII here: pieces are whole characters)
    text = gen.sequences[0].new_text
    ends = [t.offset for t in tokens[1:]] + [len(text)]
    assert [text[t.offset : end] for t, end in zip(tokens, ends)] == [t.token for t in tokens]
    # order inside a step: trace record, token, text, then StepDone
    first = events[: events.index(steps[0]) + 1]
    assert [type(e) for e in first] == [TraceStep, TokenEvent, TextDelta, StepDone]
    assert first[2].text == " night"


def test_untraced_tokens_have_no_logprobs_and_eos_is_a_token_without_text(lm):
    eos = GREEDY_12[4]  # end the sequence on the 5th greedy token
    events = list(lm.events(PROMPT, max_new_tokens=12, eos_token_id=eos))
    gen = lm.generate(PROMPT, max_new_tokens=12, eos_token_id=eos)
    assert gen.sequences[0].new_ids == GREEDY_12[:5] and gen.sequences[0].finish_reason == "eos"
    check_invariants(events, gen)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert all(t.logprob is None and t.top is None for t in tokens)
    assert tokens[-1].id == eos and tokens[-1].offset == len(gen.sequences[0].new_text)
    assert not any(isinstance(e, TraceStep) for e in events)


def test_sampling_batch_every_row_is_streamed(lm):
    kw = dict(do_sample=True, seed=5, num_return_sequences=2, max_new_tokens=8, top_k=0)
    events = list(lm.events([PROMPT, "Hello"], **kw))
    gen = lm.generate([PROMPT, "Hello"], **kw)
    assert len(gen.sequences) == 4
    check_invariants(events, gen)
    # rows stream while they run: every token is reported during a step
    assert all(e.step is not None for e in events if isinstance(e, TokenEvent))


def test_beam_search_reports_updates_and_the_same_sequences(lm):
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=10)
    events = list(lm.events(PROMPT, **kw))
    gen = lm.generate(PROMPT, **kw)
    check_invariants(events, gen)
    assert [f.text for f in events if isinstance(f, Finish)] == [" night, with a maelstrom of fire and",
                                                                 " night, with a maelstrom of light and"]
    updates = [e for e in events if isinstance(e, BeamUpdate)]
    assert [u.step for u in updates] == list(range(10)) and {u.index for u in updates} == {0}
    best = gen.sequences[0]
    streamed = ""
    for u in updates:
        assert tuple(best.new_ids[: len(u.stable_ids)]) == u.stable_ids  # settled ids never change
        assert len(u.best_ids) == u.step + 1
        streamed = u.stable_text
        assert best.new_text.startswith(streamed)
    assert streamed == " night, with a maelstrom of"  # settled before the end
    assert updates[5].best_text == " night, with a mael" and updates[2].best_text == " night, with"
    # the second returned beam is reported only at the end
    assert all(getattr(e, "step", None) is None for e in events if getattr(e, "index", None) == 1)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_a_stop_string_never_reaches_a_delta(lm, mode):
    stop = "h the s"  # spans " with", " the", " sun" of the greedy text
    kw = dict(max_new_tokens=12, stop_strings=[stop], **mode)
    events = list(lm.events(PROMPT, **kw))
    gen = lm.generate(PROMPT, **kw)
    check_invariants(events, gen)
    seq = gen.sequences[0]
    if not mode:
        assert seq.finish_reason == "stop" and seq.new_text == " night, wit"
    deltas = [e.text for e in events if isinstance(e, TextDelta) and e.index == 0]
    emitted = ""
    for d in deltas:
        emitted += d
        assert stop not in emitted and seq.new_text.startswith(emitted)


def test_events_validate_at_once_and_close_stops_the_run(lm):
    with pytest.raises(ConfigError):
        lm.events(PROMPT, num_beams=0)
    with pytest.raises(InputError):
        lm.events("", max_new_tokens=3)
    stream = lm.events(PROMPT, max_new_tokens=12)
    seen = []
    for event in stream:
        seen.append(event)
        if isinstance(event, StepDone):
            break
    stream.close()
    assert next(stream, None) is None
    assert stream.generation is None
    assert [e.id for e in seen if isinstance(e, TokenEvent)] == GREEDY_12[:1]


def test_stream_is_the_text_filter_of_the_events(lm):
    s = lm.stream(PROMPT, max_new_tokens=12, stop_strings=["rays"])
    deltas = list(s)
    events = list(lm.events(PROMPT, max_new_tokens=12, stop_strings=["rays"]))
    assert deltas == [e.text for e in events if isinstance(e, TextDelta) and e.index == 0]
    assert "".join(deltas) == s.generation.sequences[0].new_text == " night, with the sun's "


# --- the surfaces use only public LM API ------------------------------------------------------------------------------
def private_lm_uses(source: str) -> list[str]:
    """``X._name`` where ``X`` is an LM (an expression ending in ``lm``), as ``lm._run`` or ``state.lm._check``, and
    ``getattr(lm, "_name")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner == "lm" or owner.endswith(".lm") or owner.endswith("_lm"):
                found.append(ast.unparse(node))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")):
            found.append(ast.unparse(node))
    return found


def test_private_lm_check_finds_what_it_should():
    assert private_lm_uses("lm._run(p, k)\nx = request.app.state.lm._check_length(3, 4)\n") == [
        "lm._run", "request.app.state.lm._check_length"]
    assert private_lm_uses("getattr(lm, '_run')") == ["getattr(lm, '_run')"]
    assert private_lm_uses("lm.events(p)\nself._x = 1\nlm.__class__") == []


def test_server_cli_and_sweeps_use_no_private_lm_attribute():
    files = [*sorted((SRC / "server").glob("*.py")), SRC / "cli.py", *sorted((SRC / "sweeps").glob("*.py"))]
    assert len(files) > 10
    offenders = {str(f.relative_to(SRC)): uses for f in files if (uses := private_lm_uses(f.read_text()))}
    assert offenders == {}
