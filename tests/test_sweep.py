"""``decodelab sweep`` without Ray: metrics against hand-computed values, prompt and strategy parsing, the output
directory (atomic writes, resume after a kill), the rows against ``LM.generate`` / ``LM.score_ids``, and the CLI's
one-line errors (exit 2, nothing written). Runs on the tiny random Llama (``tiny_llama``), a few tokens per row."""

from __future__ import annotations

import json
import math
import os

import pytest
from typer.testing import CliRunner

import decodelab
from decodelab import cli
from decodelab.errors import ConfigError, InputError
from decodelab.sweeps import metrics as M
from decodelab.sweeps.prompts import load_prompts
from decodelab.sweeps.store import ROWS, Store
from decodelab.sweeps.strategies import build_grid, parse_spec

pytest.importorskip("nltk")


# --- metrics: hand-computed values ------------------------------------------------------------------------------------
def test_perplexity_is_exp_of_pooled_mean_negative_logprob():
    assert M.perplexity([[-1.0, -2.0], [-3.0]]) == pytest.approx(math.exp(2.0))
    assert M.perplexity([]) is None


def test_distinct_n_counts_unique_over_all_ngrams():
    docs = [[1, 2, 1, 2], [1, 3]]
    assert M.distinct_n(docs, 1) == 3 / 6  # {1, 2, 3} of 6 unigrams
    assert M.distinct_n(docs, 2) == 3 / 4  # (1,2) (2,1) (1,2) (1,3)
    assert M.distinct_n([[1]], 2) is None


def test_zipf_of_exact_power_law_counts_is_one():
    # counts 12, 6, 4, 3 = 12 / rank: log count = log 12 - 1 * log rank exactly
    docs = [["a"] * 12 + ["b"] * 6, ["c"] * 4 + ["d"] * 3]
    s, intercept = M.zipf_fit(docs)
    assert s == pytest.approx(1.0, abs=1e-12)
    assert intercept == pytest.approx(math.log(12), abs=1e-12)
    # counts 8, 2 (= 8 / rank^2): s = 2
    assert M.zipf([["x"] * 8 + ["y"] * 2]) == pytest.approx(2.0, abs=1e-12)


def test_repetition_follows_the_papers_script():
    assert M.tail_loop([9, 1, 2, 1, 2, 1, 2]) == (2, 3)
    assert M.repeats_at_end([4, 1, 2, 3, 1, 2, 3])  # a 3-token phrase twice at the end
    assert not M.repeats_at_end([5, 5, 5, 5])  # n = 1 repeated 4 times: too short, too few
    assert M.repeats_at_end([7] * 60)  # n = 1 but more than 50 times
    assert not M.repeats_at_end([1, 2, 3, 4])
    assert not M.repeats_at_end([1, 2, 3, 1, 2, 3, 4])  # the loop is not at the end
    docs = [[4, 1, 2, 3, 1, 2, 3], [5, 5, 5, 5], [7] * 60, [1, 2, 3, 4]]
    assert M.repetition_rate(docs) == 0.5


def test_self_bleu4_by_hand():
    assert M.self_bleu([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]) == pytest.approx(1.0)
    # A = 1 2 3 4 against B = 1 2 3 5 (and back): p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> 0.1 (method1's epsilon),
    # brevity penalty 1: BLEU = (3/4 * 2/3 * 1/2 * 0.1) ** (1/4) for both.
    assert M.self_bleu([[1, 2, 3, 4], [1, 2, 3, 5]]) == pytest.approx(0.025 ** 0.25, rel=1e-12)
    assert M.self_bleu([[1, 2]]) is None


def test_summarize_on_fixed_rows():
    rows = [
        {"strategy": "s", "ids": [1, 2, 3, 1, 2, 3, 0], "eos": True, "logprobs": [-1.0] * 7},
        {"strategy": "s", "ids": [4, 5], "eos": False, "logprobs": [-2.0, -2.0]},
    ]
    (t,) = M.summarize(rows, ["s", "unused"])
    assert t["rows"] == 2 and t["mean_length"] == 4.0  # 6 content tokens (eos left out) and 2
    assert t["eos_rate"] == 0.5 and t["repetition"] == 0.5
    assert t["perplexity"] == pytest.approx(math.exp(11 / 9))
    assert t["distinct_1"] == 5 / 8


# --- prompts -------------------------------------------------------------------------------------------------------------
def test_builtin_prompts_english_and_polish_with_references():
    every = load_prompts("builtin")
    assert len(every) == 315 and all(p.reference for p in every)
    assert len(load_prompts("builtin:en")) == 155 and len(load_prompts("builtin:pl")) == 160
    assert [p.id for p in load_prompts("builtin", limit=2)] == ["en-001", "en-002"]


def test_prompt_files(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "Hello", "reference": " world", "id": 7}\n\n{"prompt": "Hi", "extra": 1}\n')
    got = load_prompts(jl)
    assert [(p.id, p.text, p.reference) for p in got] == [("7", "Hello", " world"), ("3", "Hi", None)]
    txt = tmp_path / "p.txt"
    txt.write_text("One\t two\n\nThree\n")
    assert [(p.id, p.text, p.reference) for p in load_prompts(txt)] == [("1", "One", " two"), ("3", "Three", None)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["A", "B"], "reference": [" x", None]}), tmp_path / "p.parquet")
    assert [(p.text, p.reference) for p in load_prompts(tmp_path / "p.parquet")] == [("A", " x"), ("B", None)]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": "b",}\n', "line 2: not valid JSON"),
    ("", "has no prompts"),
    ('{"prompt": ""}\n', "line 1: 'prompt' must be a non-empty string"),
    ('["a"]\n', "line 1: expected a JSON object"),
    ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n', "duplicate prompt id '1'"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_prompts(path)


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(InputError, match="unknown extension '.csv'"):
        load_prompts(tmp_path / "p.csv")
    with pytest.raises(InputError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


# --- strategies -----------------------------------------------------------------------------------------------------------
def test_default_grid_and_presets():
    grid = build_grid(defaults={"max_new_tokens": 64})
    assert [s.name for s in grid] == ["greedy", "beam5", "beam5_rep2", "pure", "temp0.7", "topk40", "topp0.95",
                                      "minp0.1"]
    assert grid[2].settings == {"max_new_tokens": 64, "num_beams": 5, "repetition_penalty": 2.0}
    assert grid[0].seeds == (None,) and grid[3].seeds == (0,)


def test_inline_specs_and_seeds():
    (s,) = parse_spec("nuc:do_sample=true,top_p=0.9,seeds=[3,4]")
    assert (s.name, s.settings, s.seeds) == ("nuc", {"do_sample": True, "top_p": 0.9}, (3, 4))
    (g,) = parse_spec("g:num_beams=2,seeds=[1,2]")
    assert g.seeds == (None,)  # deterministic: one run whatever the seeds
    with pytest.raises(ConfigError, match="strategy 'x': unknown generation parameter top_q"):
        parse_spec("x:top_q=0.9")
    with pytest.raises(ConfigError, match="strategy 'x': invalid top_p=2.0"):
        parse_spec("x:do_sample=true,top_p=2")
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        parse_spec("nope")
    with pytest.raises(ConfigError, match="reserved"):
        parse_spec("reference:num_beams=2")
    with pytest.raises(ConfigError, match="two strategies are named 'greedy'"):
        build_grid(["greedy", "greedy"])


def test_strategy_files(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text('[defaults]\nmax_new_tokens = 7\n\n[[strategy]]\nname = "greedy"\n\n[[strategy]]\n'
                    'name = "hot"\ndo_sample = true\ntemperature = 1.5\nseeds = [0, 1]\nmax_new_tokens = 3\n')
    grid = build_grid(file=toml)
    assert [(s.name, s.settings, s.seeds) for s in grid] == [
        ("greedy", {"max_new_tokens": 7}, (None,)),
        ("hot", {"max_new_tokens": 3, "do_sample": True, "temperature": 1.5}, (0, 1))]
    assert build_grid(file=toml, defaults={"max_new_tokens": 5})[0].settings == {"max_new_tokens": 5}
    js = tmp_path / "grid.json"
    js.write_text(json.dumps({"strategy": [{"name": "b", "num_beams": 3}]}))
    assert build_grid(file=js)[0].settings == {"num_beams": 3}
    js.write_text(json.dumps({"grid": []}))
    with pytest.raises(ConfigError, match="unknown key 'grid'"):
        build_grid(file=js)
    js.write_text(json.dumps([{"name": "b", "num_beam": 3}]))
    with pytest.raises(ConfigError, match="strategy 'b': unknown generation parameter num_beam"):
        build_grid(file=js)


# --- the output directory ----------------------------------------------------------------------------------------------
def test_store_cuts_a_torn_last_line_and_refuses_another_sweep(tmp_path):
    out = tmp_path / "o"
    manifest = {"model": "m", "prompts": {"fingerprint": "x"}, "strategies": []}
    store = Store.open(out, manifest)
    store.append([{"strategy": "s", "seed": None, "prompt_id": "1", "sample": 0, "ids": [1]}])
    with open(out / ROWS, "ab") as fh:
        fh.write(b'{"strategy": "s", "seed": null, "prompt_id": "2"')  # a kill in the middle of a write
    assert Store.check(out, manifest) == 1
    again = Store.open(out, manifest)
    assert [r["prompt_id"] for r in again.rows] == ["1"]
    assert (out / ROWS).read_bytes().endswith(b"}\n")
    with pytest.raises(InputError, match="holds a different sweep \\(model differs\\)"):
        Store.check(out, {**manifest, "model": "other"})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    with pytest.raises(InputError, match="non-empty directory without sweep.json"):
        Store.check(tmp_path / "junk", manifest)


# --- end to end on the tiny model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    return decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)


STRATS = ["greedy", "b2:num_beams=2", "nuc:do_sample=true,top_p=0.9,top_k=0,seeds=[0,1]"]


def _rows(path) -> dict:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return {(r["strategy"], r["seed"], r["prompt_id"], r["sample"]): r for r in rows}


def test_sweep_rows_equal_generate_alone_and_resume_after_a_kill(tiny_lm, tmp_path):
    out = tmp_path / "run"
    res = decodelab.sweep("builtin", STRATS, out=out, lm=tiny_lm, max_new_tokens=6, limit=3)
    rows = _rows(out / ROWS)
    assert res.rows == res.new_rows == len(rows) == 3 * (1 + 1 + 2) + 3  # + the 3 reference rows
    prompts = load_prompts("builtin", limit=3)
    for p in prompts:
        for (name, seed), kwargs in {("greedy", None): {}, ("b2", None): {"num_beams": 2},
                                     ("nuc", 1): {"do_sample": True, "top_p": 0.9, "top_k": 0, "seed": 1}}.items():
            row = rows[(name, seed, p.id, 0)]
            seq = tiny_lm.generate(p.text, max_new_tokens=6, **kwargs).sequences[0]
            assert (row["ids"], row["text"], row["finish_reason"]) == (seq.new_ids, seq.new_text, seq.finish_reason)
            score = tiny_lm.score_ids(tiny_lm.encode(p.text) + seq.new_ids)
            assert row["logprobs"] == [t.logprob for t in score.tokens[-len(seq.new_ids):]]
        ref = rows[("reference", None, p.id, 0)]
        assert ref["text"] == p.reference and ref["finish_reason"] == "reference"
    by_name = {m["strategy"]: m for m in res.metrics}
    assert list(by_name) == ["greedy", "b2", "nuc", "reference"]
    greedy = [r for r in rows.values() if r["strategy"] == "greedy"]
    assert by_name["greedy"]["perplexity"] == pytest.approx(M.perplexity(r["logprobs"] for r in greedy))
    for name in ("metrics.csv", "metrics.json", "report.html", "sweep.json", "plots/zipf.png",
                 "plots/repetition_vs_perplexity.png", "plots/lengths.png"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    assert json.loads((out / "metrics.json").read_text())["metrics"] == res.metrics

    # a kill: the last two rows lost and a torn line left behind; the rerun makes exactly the missing rows
    lines = (out / ROWS).read_bytes().splitlines(keepends=True)
    (out / ROWS).write_bytes(b"".join(lines[:-2]) + lines[-2][:25])
    again = decodelab.sweep("builtin", STRATS, out=out, lm=tiny_lm, max_new_tokens=6, limit=3)
    assert again.new_rows == 2 and again.rows == res.rows
    assert _rows(out / ROWS) == rows
    assert again.metrics == res.metrics
    done = decodelab.sweep("builtin", STRATS, out=out, lm=tiny_lm, max_new_tokens=6, limit=3)
    assert done.new_rows == 0
    with pytest.raises(InputError, match="holds a different sweep \\(strategies differ"):
        decodelab.sweep("builtin", ["greedy"], out=out, lm=tiny_lm, max_new_tokens=6, limit=3)


def test_judge_model_scores_the_text(tiny_lm, tiny_llama, tmp_path):
    from decodelab.sweeps.worker import Worker

    worker = Worker(tiny_lm, judge=tiny_lm)
    task = {"strategy": "g", "seed": None, "prompt_id": "1", "prompt": "Once upon a time", "lang": None,
            "request": {"max_new_tokens": 5}, "samples": 1, "kind": "generate"}
    (row,) = next(iter(worker.run([task])))
    # the judge here is the same model: re-tokenizing the text gives the same ids, so the same logprobs
    assert row["judge"]["n_tokens"] == row["n_tokens"]
    assert row["judge"]["logprobs"] == pytest.approx(row["logprobs"][: row["n_tokens"]], abs=1e-5)


# --- the CLI: bad input is one line, exit 2, nothing written -----------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(cli.app, list(args))


@pytest.mark.parametrize("setup, args, message", [
    (None, ["-s", "x:top_q=1"], "strategy 'x': unknown generation parameter top_q=1"),
    ("", ["{p}"], "has no prompts"),
    ('{"prompt": "ok"}\n{"prompt": oops}\n', ["{p}"], "line 2: not valid JSON"),
    (None, ["--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at --ray-address='127.0.0.1:1'"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, setup, args, message):
    prompts = tmp_path / "prompts.jsonl"
    if setup is not None:
        prompts.write_text(setup)
    out = tmp_path / "out"
    result = _cli("sweep", *[a.format(p=prompts) for a in args], "--out", str(out), "--max-new-tokens", "2")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_cli_sweep_json(tiny_llama, tmp_path, monkeypatch):
    from decodelab.sweeps import worker as W

    monkeypatch.setattr(W.Worker, "load", classmethod(
        lambda cls, model, **kw: cls(decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name))))
    result = _cli("sweep", "builtin:pl", "-s", "greedy", "--limit", "2", "--max-new-tokens", "3", "--out",
                  str(tmp_path / "o"), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["rows"] == 4 and [m["strategy"] for m in doc["metrics"]] == ["greedy", "reference"]
    table = _cli("sweep", "builtin:pl", "-s", "greedy", "--limit", "2", "--max-new-tokens", "3", "--out",
                 str(tmp_path / "o"), "--no-progress")
    assert table.exit_code == 0 and "4 rows (0 new)" in table.output and "self_bleu4" in table.output
    assert os.path.isfile(tmp_path / "o" / "report.html")
