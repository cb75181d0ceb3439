"""Constraints (``json_schema`` / ``regex`` / ``grammar``, compiled by llguidance) on the embedded SmolLM2-135M:
every constrained output validates with ``jsonschema`` over 20 prompts x {greedy, sampling, beam} (run through
``generate_many``, i.e. continuous batching); a text cut by ``max_new_tokens`` is never reported as complete; the
trace's per-step record (allowed count, mass removed, forbidden candidates) equals what llguidance and the model give
when asked directly; the processor keeps one grammar state per distinct row (beam reordering); bad constraints are
one-line ``ConfigError`` s; the CLI's ``--json-schema`` / ``--regex`` / ``--grammar``."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

import decodelab
from decodelab import ConfigError, GenerationConfig
from decodelab.grammar import compile_grammar, json_path, new_matcher
from decodelab.processors import Context, GrammarConstraint

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 14},
                                         "country": {"type": "string", "maxLength": 14}},
        "required": ["city", "country"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}
NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 3}

PROMPTS = [  # (question, schema): 20 prompts over four schemas
    ("Describe a person as JSON.", PERSON), ("Invent a customer record.", PERSON),
    ("Who wrote Hamlet? Give name and age at death.", PERSON), ("Make up a character for a story.", PERSON),
    ("Give me a user profile.", PERSON),
    ("Where is the Eiffel Tower?", CITY), ("Name a city in Japan.", CITY), ("Where was Mozart born?", CITY),
    ("What is the capital of Italy?", CITY), ("Name a big city in Brazil.", CITY),
    ("Is the sky blue?", ANSWER), ("Is fire cold?", ANSWER), ("Can fish swim?", ANSWER),
    ("Is 7 a prime number?", ANSWER), ("Do cats bark?", ANSWER),
    ("List three small numbers.", NUMBERS), ("Give the ages of two children.", NUMBERS),
    ("Pick a lucky number.", NUMBERS), ("Count to three.", NUMBERS), ("Some even numbers please.", NUMBERS),
]
STRATEGIES = {"greedy": {}, "sampling": {"do_sample": True, "seed": 7, "temperature": 0.8},
              "beam": {"num_beams": 2}}


@pytest.fixture(scope="module")
def lm(embedded):
    return decodelab.LM(embedded.model, embedded.tokenizer, embedded.name)


def _chat(lm, question: str) -> str:
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True)


# --- validation: one place (GenerationConfig), one-line errors ------------------------------------------------------
@pytest.mark.parametrize("kwargs, param, pattern", [
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema", r"Unimplemented keys: \[\"uniqueItems\"\]"),
    ({"json_schema": "{not json"}, "json_schema", r"not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema", r"expected a JSON Schema object"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "json_schema", r"missing"),
    ({"regex": "[a-"}, "regex", r"unclosed character class"),
    ({"regex": ""}, "regex", r"non-empty string"),
    ({"grammar": "start: foo\n"}, "grammar", r"foo"),
    ({"json_schema": {"type": "object"}, "regex": "a+"}, "regex", r"only one constraint"),
    ({"regex": "a+", "ignore_eos": True}, "ignore_eos", r"ignore_eos=True with regex"),
])
def test_bad_constraints_are_one_line_config_errors(kwargs, param, pattern):
    with pytest.raises(ConfigError) as info:
        GenerationConfig.from_kwargs(**kwargs)
    assert info.value.param == param
    assert re.search(pattern, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


def test_constraint_is_normalised_and_lark_or_gbnf_accepted():
    cfg = GenerationConfig.from_kwargs(json_schema=PERSON)
    assert cfg.constraint == ("json_schema", json.dumps(PERSON))
    assert GenerationConfig.from_kwargs(json_schema=json.dumps(PERSON)).json_schema == json.dumps(PERSON)
    assert GenerationConfig.from_kwargs(grammar='root ::= "yes" | "no"').constraint[0] == "grammar"  # GBNF
    assert GenerationConfig.from_kwargs(grammar='start: "yes" | "no"').constraint[0] == "grammar"  # Lark
    assert GenerationConfig.from_kwargs().constraint is None
    assert compile_grammar("regex", "a+") is compile_grammar("regex", "a+")  # cached


def test_json_path():
    assert json_path("") == "$"
    assert json_path('{"a"') == "$"
    assert json_path('{"a":') == "$.a"
    assert json_path('{"a":[1,{"b c":"x\\"') == '$.a[1]["b c"]'
    assert json_path('{"a":[1,2') == "$.a[1]"
    assert json_path('{"a":{"b":1},"c":"') == "$.c"
    assert json_path('[{"x":1},{"y":') == "$[1].y"


# --- the processor: one grammar state per distinct generated prefix -------------------------------------------------
def test_processor_follows_reordered_and_duplicated_rows(lm):
    """Beam search reorders, drops and duplicates rows between steps: the masks must be those of each row's own
    text, as a fresh matcher fed that text gives them."""
    tok = lm.tokenizer
    spec = json.dumps(CITY)
    eos = lm.tokenizer.eos_token_id
    T0 = 3
    ctx = Context(T0, torch.zeros(3, dtype=torch.long), torch.tensor([eos]), tokenizer=tok, vocab_size=lm.vocab_size)
    proc = GrammarConstraint("json_schema", spec, ctx)
    a = tok('{"city":"Paris","country":"France"}').input_ids
    b = tok('{"city":"Rome","country":"Italy"}').input_ids
    prompt = [1, 2, 3]
    V = lm.vocab_size
    rows_by_step = []
    for step in range(max(len(a), len(b)) + 1):
        # rows: a's prefix, b's prefix, a's prefix again (duplicated), order flipped every other step
        ra, rb = a[:step], b[:step]
        rows = [ra, rb, ra] if step % 2 == 0 else [rb, ra, ra]
        if any(len(r) < step for r in rows):
            break
        input_ids = torch.tensor([prompt + r for r in rows])
        out = proc(input_ids, torch.zeros((3, V)))
        rows_by_step.append((rows, proc.allowed.clone(), out))
    for rows, allowed, out in rows_by_step:
        for r, ids in enumerate(rows):
            m = new_matcher("json_schema", spec, tok, V)
            assert m.consume_tokens(ids)
            bits = torch.zeros((V + 31) // 32, dtype=torch.int32)
            m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
            ref = np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[:V].astype(bool)
            ref[eos] = m.is_accepting()
            assert np.array_equal(allowed[r].numpy(), ref)
            assert torch.equal(torch.isinf(out[r]), torch.from_numpy(~ref))
    # a complete document allows only eos; a row that ended on eos (fed padding) or took a forbidden token: only eos
    proc(torch.tensor([prompt + a, prompt + a[:-1] + [eos], prompt + a[:1] + [tok("zzz").input_ids[0]] * (len(a) - 1)]),
         torch.zeros((3, V)))
    for r in range(3):
        assert proc.allowed[r].nonzero().flatten().tolist() == [eos]


# --- every output validates: 20 prompts x {greedy, sampling, beam}, through continuous batching -------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_constrained_output_validates(lm, strategy):
    requests = [{"prompt": _chat(lm, q), "json_schema": schema} for q, schema in PROMPTS]
    results = lm.generate_many(requests, max_new_tokens=24, **STRATEGIES[strategy])
    complete = 0
    for (question, schema), gen in zip(PROMPTS, results):
        for seq in gen.sequences:
            if seq.finish_reason == "eos":
                assert seq.constraint_met is True
                value = json.loads(seq.new_text)
                jsonschema.validate(value, schema)
                complete += 1
            else:  # cut by max_new_tokens: reported as incomplete, never as valid
                assert seq.finish_reason == "length" and seq.constraint_met is False
    assert complete >= 18, f"{strategy}: only {complete} of 20 complete within 24 tokens"


@pytest.mark.slow
def test_batched_constrained_requests_equal_alone(lm):
    reqs = [{"prompt": _chat(lm, "Where was Mozart born?"), "json_schema": CITY},
            {"prompt": _chat(lm, "Is the sky blue?"), "json_schema": ANSWER, "num_beams": 3},
            {"prompt": _chat(lm, "Tell me a joke.")},
            {"prompt": _chat(lm, "Pick a lucky number."), "json_schema": NUMBERS, "do_sample": True, "seed": 3}]
    together = lm.generate_many(reqs, max_new_tokens=20)
    for req, got in zip(reqs, together):
        alone = lm.generate(req["prompt"], max_new_tokens=20, **{k: v for k, v in req.items() if k != "prompt"})
        assert [s.new_ids for s in got.sequences] == [s.new_ids for s in alone.sequences]


@pytest.mark.slow
def test_regex_and_grammar_outputs_match(lm):
    g = lm.generate(_chat(lm, "When was Ada Lovelace born?"), regex=r"(19|18)[0-9]{2}-[01][0-9]-[0-3][0-9]",
                    max_new_tokens=16)
    seq = g.sequences[0]
    assert seq.finish_reason == "eos" and re.fullmatch(r"(19|18)[0-9]{2}-[01][0-9]-[0-3][0-9]", seq.new_text)
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"\n'
    for kw in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 1}):
        seq = lm.generate(_chat(lm, "Is water wet?"), grammar=lark, max_new_tokens=12, **kw).sequences[0]
        assert seq.new_text in ("The answer is yes.", "The answer is no."), (kw, seq.new_text)
        assert seq.constraint_met is True


@pytest.mark.slow
def test_cut_by_length_is_not_presented_as_valid(lm):
    g = lm.generate(_chat(lm, "Describe a person as JSON."), json_schema=PERSON, max_new_tokens=4)
    seq = g.sequences[0]
    assert seq.finish_reason == "length" and seq.constraint_met is False
    with pytest.raises(ValueError):
        json.loads(seq.new_text)


# --- the trace: what the constraint did, checked against the model and llguidance directly -------------------------
@pytest.mark.slow
def test_trace_records_allowed_count_forbidden_tokens_and_mass_removed(lm):
    prompt = _chat(lm, "Where is the Eiffel Tower?")
    g = lm.generate(prompt, json_schema=CITY, max_new_tokens=20, trace=True, trace_top_k=5)
    steps = [s for s in g.trace.steps if s.row == 0]
    assert g.trace.processors == ["json_schema"]
    assert all(s.constraint is not None and s.constraint.kind == "json_schema" for s in steps)
    # step 0, recomputed from scratch: the model's distribution and llguidance's allowed set
    _, logits = lm.next_logits(prompt)
    probs = torch.softmax(logits.float(), dim=-1)
    m = new_matcher("json_schema", json.dumps(CITY), lm.tokenizer, lm.vocab_size)
    V = lm.vocab_size
    bits = torch.zeros((V + 31) // 32, dtype=torch.int32)
    m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
    allowed = torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[:V].astype(bool))
    allowed[lm.tokenizer.eos_token_id] = False  # nothing generated yet: not complete
    c0 = steps[0].constraint
    assert c0.allowed == int(allowed.sum())
    # a float32 sum over ~49k probabilities, clamped to [0, 1] by the tracer: its rounding reaches ~2e-5 (AVX2)
    assert c0.mass_removed == pytest.approx(min(1.0, float(probs.double()[~allowed].sum())), abs=1e-4)
    forbidden_ref = torch.topk(probs.masked_fill(allowed, -1.0), 5)
    assert [c.id for c in c0.forbidden] == forbidden_ref.indices.tolist()
    assert [c.prob for c in c0.forbidden] == pytest.approx(forbidden_ref.values.tolist(), abs=1e-6)
    assert c0.top_before.id == int(probs.argmax()) and not bool(allowed[c0.top_before.id])
    assert c0.top_after.id == steps[0].id  # greedy takes the best allowed token
    assert c0.path == "$" and c0.text_so_far == ""
    # later steps: the path follows the text; the last step allowed eos once the value was complete
    assert any(s.constraint.path == "$.country" for s in steps)
    assert g.sequences[0].finish_reason == "eos"
    last = steps[-1].constraint
    assert json.loads(last.text_so_far) == json.loads(g.sequences[0].new_text)
    # the trace survives JSON
    again = decodelab.Trace.from_dict(json.loads(json.dumps(g.trace.to_dict())))
    assert again.steps[0].constraint == c0


@pytest.mark.slow
def test_beam_trace_has_a_record_per_beam(lm):
    g = lm.generate(_chat(lm, "Is fire cold?"), json_schema=ANSWER, num_beams=3, max_new_tokens=12, trace=True)
    assert g.sequences[0].constraint_met is True
    jsonschema.validate(json.loads(g.sequences[0].new_text), ANSWER)
    rows = {s.row for s in g.trace.steps if s.constraint is not None}
    assert rows == {0, 1, 2}


# --- CLI -------------------------------------------------------------------------------------------------------------
def test_cli_reads_schema_and_grammar_files(tmp_path, capsys):
    from decodelab.cli import app
    from typer.testing import CliRunner

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    r = CliRunner().invoke(app, ["generate", "x", "--json-schema", str(bad)])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == 'error: invalid json_schema: Unimplemented keys: ["uniqueItems"]'
    r = CliRunner().invoke(app, ["generate", "x", "--grammar", str(tmp_path / "none.lark")])
    assert r.exit_code == 2 and "cannot read it" in r.output and "--grammar" in r.output
    r = CliRunner().invoke(app, ["generate", "x", "--regex", "(a"])
    assert r.exit_code == 2 and r.output.startswith("error: invalid regex")


@pytest.mark.slow
def test_cli_generate_with_json_schema(tmp_path, embedded):
    from decodelab.cli import app
    from typer.testing import CliRunner

    path = tmp_path / "city.json"
    path.write_text(json.dumps(CITY))
    r = CliRunner().invoke(app, ["generate", "The capital of France as JSON:", "--json-schema", str(path),
                                 "--max-new-tokens", "24", "--json", "--trace"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    seq = out["sequences"][0]
    assert seq["finish_reason"] == "eos" and seq["constraint_met"] is True
    jsonschema.validate(json.loads(seq["new_text"]), CITY)
    assert out["trace"]["steps"][0]["constraint"]["allowed"] >= 1
