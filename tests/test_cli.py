"""The ``decodelab`` command line, run in-process with typer's CliRunner (plus two subprocess runs end to end).

Commands that need a model get the session's embedded SmolLM2-135M-Instruct (``embedded`` fixture) through a patched
``decodelab.cli._load_lm``, so the model loads once per session; ``demo`` loads it for real, from the session cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import decodelab
from decodelab import cli

PROMPT = "It was a dark and stormy"
QWEN_IDS = [2132, 572, 264, 6319, 323, 13458, 88]


@pytest.fixture(scope="module")
def lm(embedded):
    return decodelab.LM(embedded.model, embedded.tokenizer, embedded.name)


class SpyLM:
    """Delegates to a real LM and records the keyword arguments every generate / stream call received."""

    def __init__(self, lm):
        self._lm = lm
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def generate(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return self._lm.generate(prompt, **kwargs)

    def stream(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return self._lm.stream(prompt, **kwargs)


@pytest.fixture
def spy(lm, monkeypatch):
    s = SpyLM(lm)
    monkeypatch.setattr(cli, "_load_lm", lambda model, device, dtype, announce=False, **engine_options: s)
    return s


def run(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


# --- tokens -------------------------------------------------------------------------------------------------------
def test_tokens_qwen_offline_exact():
    out = ok("tokens", PROMPT, "--model", "Qwen/Qwen2-0.5B").stdout
    assert str(QWEN_IDS) in out
    assert "It| was| a| dark| and| storm|y" in out
    assert "␣storm" in out  # the table shows spaces visibly
    data = json.loads(ok("tokens", PROMPT, "--model", "Qwen/Qwen2-0.5B", "--json").stdout)
    assert data["model"] == "Qwen/Qwen2-0.5B"
    assert data["ids"] == QWEN_IDS
    assert data["tokens"] == ["It", " was", " a", " dark", " and", " storm", "y"]


def test_tokens_default_model_json(lm):
    data = json.loads(ok("tokens", PROMPT, "--json").stdout)
    assert data["model"] == "SmolLM2-135M-Instruct"
    assert data["ids"] == lm.tokenize(PROMPT).ids == [1589, 436, 253, 3605, 284, 43471]
    assert "".join(data["tokens"]) == PROMPT


# --- next --------------------------------------------------------------------------------------------------------------
def test_next_json_real_distribution(spy, lm):
    data = json.loads(ok("next", PROMPT, "--json").stdout)
    assert data["model"] == "SmolLM2-135M-Instruct"
    assert data["logits_shape"] == [1, 6, 49152]
    assert data["argmax"]["token"] == " night" and data["argmax"]["id"] == data["top"][0]["id"] == 3163
    assert data["top"][0]["token"] == " night"
    probs = [t["prob"] for t in data["top"]]
    assert len(probs) == 10 and 0.5 < sum(probs) <= 1.0
    assert probs == sorted(probs, reverse=True)
    for t in data["top"]:
        assert t["prob"] == pytest.approx(math.exp(t["logprob"]), rel=1e-5)
    expected = lm.next_token(PROMPT, top_k=10)
    assert [t["id"] for t in data["top"]] == [c.id for c in expected.top]


def test_next_table_shows_percentages_bars_entropy(spy, lm):
    out = ok("next", PROMPT, "--top-k", "3").stdout
    dist = lm.next_token(PROMPT, top_k=3)
    assert "[1, 6, 49152]" in out
    row = next(line for line in out.splitlines() if '" night"' in line and "%" in line)
    assert f"{100 * dist.top[0].prob:.2f}%" in row and "█" * 20 in row
    assert f"entropy: {dist.entropy:.3f} nats" in out
    assert '" day"' in out and '" nights"' not in out  # exactly the top 3


# --- generate ------------------------------------------------------------------------------------------------------------
def test_generate_json_greedy_equals_api(spy, lm):
    data = json.loads(ok("generate", PROMPT, "--max-new-tokens", "8", "--json").stdout)
    expected = lm.generate(PROMPT, max_new_tokens=8).sequences[0]
    assert data["model"] == "SmolLM2-135M-Instruct"
    assert data["prompt_ids"] == [[1589, 436, 253, 3605, 284, 43471]]
    assert data["sequences"][0]["ids"] == expected.ids
    assert data["sequences"][0]["new_text"] == expected.new_text and expected.new_text.startswith(" night")
    assert data["sequences"][0]["score"] == pytest.approx(expected.score)
    assert "trace" not in data
    assert spy.calls == [{"max_new_tokens": 8}]


class RecordingLM:
    """No model: records generate's keywords and returns a fixed one-sequence Generation."""

    name = "recording"

    def __init__(self):
        self.calls: list[dict] = []

    def generate(self, prompt, **kwargs):
        from decodelab.trace import Generation, Sequence

        self.calls.append(kwargs)
        seq = Sequence(ids=[1, 2], text=prompt + "!", new_ids=[2], new_text="!", score=-0.5, finish_reason="length")
        return Generation(model=self.name, prompt_ids=[[1]], sequences=[seq])


def test_generate_passes_given_options_as_given_and_nothing_else(monkeypatch):
    rec = RecordingLM()
    monkeypatch.setattr(cli, "_load_lm", lambda model, device, dtype, announce=False, **engine_options: rec)
    data = json.loads(ok("generate", PROMPT, "--json").stdout)
    assert rec.calls[-1] == {} and data["sequences"][0]["text"] == PROMPT + "!"
    ok("generate", PROMPT, "--json", "--num-beams", "2", "--max-new-tokens", "3", "--length-penalty", "0.5",
       "--early-stopping", "never", "--stop", ".", "--stop", "!", "--eos-token-id", "2", "--eos-token-id", "0",
       "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "3", "--trace-top-k", "2", "--ignore-eos",
       "--min-new-tokens", "1", "--presence-penalty", "0.5", "--frequency-penalty", "-0.5")
    assert rec.calls[-1] == {"num_beams": 2, "max_new_tokens": 3, "length_penalty": 0.5, "early_stopping": "never",
                             "stop_strings": [".", "!"], "eos_token_id": [2, 0], "repetition_penalty": 1.2,
                             "no_repeat_ngram_size": 3, "trace_top_k": 2, "ignore_eos": True, "min_new_tokens": 1,
                             "presence_penalty": 0.5, "frequency_penalty": -0.5}
    ok("generate", PROMPT, "--do-sample", "--seed", "7", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.05",
       "--typical-p", "0.95", "--temperature", "0.7", "--num-return-sequences", "3", "--trace")
    assert rec.calls[-1] == {"do_sample": True, "seed": 7, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
                             "typical_p": 0.95, "temperature": 0.7, "num_return_sequences": 3, "trace": True}


def test_generate_sampling_with_seed_matches_api(spy, lm):
    data = json.loads(ok("generate", PROMPT, "--json", "--do-sample", "--seed", "7", "--top-k", "20",
                         "--temperature", "0.9", "--max-new-tokens", "3", "--num-return-sequences", "2").stdout)
    expected = lm.generate(PROMPT, do_sample=True, seed=7, top_k=20, temperature=0.9, max_new_tokens=3,
                           num_return_sequences=2)
    assert [s["ids"] for s in data["sequences"]] == [s.ids for s in expected.sequences]
    assert len(data["sequences"]) == 2


def test_generate_trace_json_has_steps(spy):
    data = json.loads(ok("generate", PROMPT, "--max-new-tokens", "4", "--trace", "--trace-top-k", "3",
                         "--json").stdout)
    trace = data["trace"]
    assert trace["strategy"] == "greedy" and trace["stop_reason"] == "max_new_tokens"
    assert [s["id"] for s in trace["steps"]] == data["sequences"][0]["new_ids"]
    assert trace["steps"][0]["token"] == " night" and trace["steps"][0]["rank"] == 0
    assert all(len(s["top"]) == 3 for s in trace["steps"])


def test_generate_text_output_greedy_trace(spy, lm):
    out = ok("generate", PROMPT, "--max-new-tokens", "3", "--trace").stdout
    expected = lm.generate(PROMPT, max_new_tokens=3).sequences[0]
    assert expected.text in out
    assert "finish: length" in out and f"score {expected.score:.4f}" in out
    assert "trace (greedy" in out and "stopped: it reached max_new_tokens=3" in out


def test_generate_beam_trace_draws_tree(spy, lm):
    out = ok("generate", PROMPT, "--num-beams", "4", "--max-new-tokens", "3", "--trace", "--trace-top-k", "2",
             "--num-return-sequences", "2").stdout
    assert "├──" in out and "└──" in out
    assert "★ returned #0" in out and "★ returned #1" in out
    assert "✗ pruned" in out and "stopped:" in out
    best = lm.generate(PROMPT, num_beams=4, max_new_tokens=3, num_return_sequences=2).sequences
    assert best[0].text in out and best[1].text in out
    assert f"score {best[0].score:.4f}" in out


def test_generate_stream_prints_the_same_text(spy, lm):
    out = ok("generate", PROMPT, "--stream", "--max-new-tokens", "4").stdout
    expected = lm.generate(PROMPT, max_new_tokens=4).sequences[0]
    assert out.splitlines()[0] == PROMPT + expected.new_text
    assert "finish: length" in out
    assert spy.calls[-1] == {"max_new_tokens": 4}


# --- score ---------------------------------------------------------------------------------------------------------------
def test_score_json_and_table(spy, lm):
    text = PROMPT + " night"
    data = json.loads(ok("score", text, "--json").stdout)
    expected = lm.score(text)
    assert [t["id"] for t in data["tokens"]] == [1589, 436, 253, 3605, 284, 43471, 3163]
    assert data["tokens"][0]["logprob"] is None
    assert data["tokens"][-1]["token"] == " night" and data["tokens"][-1]["rank"] == 0
    assert data["perplexity"] == pytest.approx(expected.perplexity)
    lps = [t["logprob"] for t in data["tokens"][1:]]
    assert data["perplexity"] == pytest.approx(math.exp(-sum(lps) / len(lps)), rel=1e-6)
    out = ok("score", text).stdout
    assert f"perplexity: {expected.perplexity:.3f}" in out
    assert f"{100 * math.exp(lps[-1]):.2f}%" in out


# --- bad input: one line on stderr, exit status 2, no traceback --------------------------------------------------
BAD = [
    (("tokens", ""), "text"),
    (("next", ""), "text"),
    (("generate", ""), "prompt"),
    (("generate", PROMPT, "--num-beams", "0"), "num_beams"),
    (("generate", PROMPT, "--num-return-sequences", "6", "--num-beams", "5"), "num_return_sequences"),
    (("generate", PROMPT, "--repetition-penalty", "0"), "repetition_penalty"),
    (("generate", PROMPT, "--max-new-tokens", "-1"), "max_new_tokens"),
    (("generate", PROMPT, "--early-stopping", "maybe"), "early_stopping"),
    (("generate", PROMPT, "--top-p", "1.5"), "top_p"),
    (("generate", PROMPT, "--eos-token-id", "999999"), "eos_token_id"),
    (("generate", PROMPT, "--max-new-tokens", "100000"), "context window"),
    (("next", "hello " * 9000), "context window"),
    (("score", ""), "text"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[f"{a[0]}:{n}:{i}" for i, (a, n) in enumerate(BAD)])
def test_bad_input_exits_2_with_one_line(spy, args, needle):
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout and result.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (("tokens", PROMPT, "--model", "nobody/no-such-model-xyz"), "model 'nobody/no-such-model-xyz'"),
    (("next", PROMPT, "--model", "./no/such/dir/model.gguf"), "model path './no/such/dir/model.gguf' does not exist"),
    (("generate", PROMPT, "--model", "nobody/no-such-model-xyz"), "hub is unreachable"),
    (("next", PROMPT, "--device", "tpu"), "device"),
    (("next", PROMPT, "--dtype", "int3"), "dtype"),
    (("generate", PROMPT, "--kernels", "turbo"), "invalid kernels='turbo'"),
    (("generate", PROMPT, "--quantize-lm-head"), "quantize_lm_head needs quantize"),
])
def test_bad_model_or_device_exits_2(args, needle):
    result = run(*args)  # the real loader: these fail before any weights are read
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_gguf_exits_2(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGML not really a model" * 10)
    result = run("next", PROMPT, "--model", str(bad))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "broken.gguf" in result.stderr and "GGUF" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args,needle", [
    (("generate", PROMPT, "--num-beams", "abc"), "--num-beams"),
    (("generate", PROMPT, "--stream", "--json"), "--stream"),
    (("generate", PROMPT, "--no-such-option"), "--no-such-option"),
    (("generate",), "prompt"),
])
def test_usage_errors_exit_2(args, needle):
    result = run(*args)
    assert result.exit_code == 2 and needle in result.stderr and "Traceback" not in result.stderr


# --- serve / bench: thin wrappers ----------------------------------------------------------------------------------
def test_serve_passes_options_to_server_run(monkeypatch):
    import decodelab.server

    seen = {}
    monkeypatch.setattr(decodelab.server, "run", lambda **kw: seen.update(kw))
    ok("serve", "--host", "0.0.0.0", "--port", "9001", "--model", "some/model", "--kernels", "fast", "--quantize",
       "int8", "--quantize-lm-head")
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9001 and seen["model"] == "some/model"
    assert seen["engine"] == decodelab.EngineConfig(kernels="fast", quantize="int8", quantize_lm_head=True)
    assert seen["engine"].dtype == "bfloat16" and "kernels" not in seen and "device" not in seen


def test_serve_without_server_module_exits_2(monkeypatch):
    monkeypatch.setattr(cli, "_optional_module", lambda name: None)
    result = run("serve")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


def test_bench_passes_arguments_through():
    result = run("bench", "--runs", "abc")  # the benchmark's own argparse rejects it before any work
    assert result.exit_code == 2 and "--runs" in result.stderr and "invalid int value" in result.stderr


def test_bench_rejects_bad_kernels_in_one_line_before_any_work():
    result = run("bench", "--kernels", "exact,turbo")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: invalid kernels='turbo': expected one of exact, fast"]


# --- subprocess: the console entry point and python -m -------------------------------------------------------
def test_python_m_decodelab_end_to_end():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "decodelab", "generate", PROMPT, "--num-beams", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: invalid num_beams=0: expected an integer >= 1\n"
    proc = subprocess.run([sys.executable, "-m", "decodelab", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"decodelab {decodelab.__version__}"


# --- demo: the real thing, loading the embedded model from the session cache -------------------------------------
def test_demo_end_to_end(embedded, lm):
    result = ok("demo")
    out = result.stdout
    assert "loading SmolLM2-135M-Instruct (first run converts the GGUF once, ~20 s)..." in result.stderr
    for heading in ("1. Tokens", "2. Next-token distribution", "3. Greedy decoding, 20 new tokens", "4. Beam search"):
        assert heading in out
    assert "[1589, 436, 253, 3605, 284, 43471]" in out and "[1, 6, 49152]" in out
    assert 'argmax: id 3163 " night"' in out
    assert out.count("%") >= 10
    # greedy ids of the embedded model (float32, CPU; the same ids as transformers' generate, see test_parity.py)
    greedy = [3163, 28, 351, 260, 2388, 506, 11005, 16119, 7880, 260, 3103, 506, 2376, 30, 378, 1512, 436, 4412, 351,
              260]
    assert f"new ids: {greedy}" in out
    assert lm.tokenizer.decode(greedy) in " ".join(out.split()).replace("│ ", "")
    assert "num_beams=5, repetition_penalty=2.0, max_new_tokens=38, num_return_sequences=5" in out
    for i in range(5):
        assert f"sequence {i}" in out
    assert out.count("score -") == 6  # greedy + 5 beams


@pytest.mark.parametrize("args, expected", [
    (["generate", "hi", "--compile", "yes"],
     "error: Got unexpected extra argument(s) (yes) (see: decodelab generate --help)"),
    (["generate", "hi", "--temperature", "abc"],
     "error: Invalid value for '--temperature': Input should be a valid number, unable to parse string as a number "
     "(see: decodelab generate --help)"),
    (["generate", "hi", "--bogus"], "error: No such option: --bogus (see: decodelab generate --help)"),
    (["bogus"], "error: No such command 'bogus'. (see: decodelab --help)"),
    (["tokens"], "error: Missing argument 'text'. (see: decodelab tokens --help)"),
])
def test_console_script_usage_errors_are_one_line(args, expected, capsys):
    """The parser's own usage errors, through the console-script entry point: one line, exit 2, no rich box."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [expected]


def test_console_script_success_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"decodelab {decodelab.__version__}"


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            cli.main(["serve", "--port", str(port), "--model", "/nonexistent/model"])  # never loaded
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: invalid port={port}: cannot listen on 127.0.0.1:{port} (")
