"""EngineConfig (one validated object from every surface to the engine) and the stopping criteria list."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

import decodelab
from decodelab import EngineConfig, cli
from decodelab.config import GenerationConfig
from decodelab.engine import DecodeState
from decodelab.errors import ConfigError
from decodelab.models import LoadedModel
from decodelab.processors import Context
from decodelab.search import beam_search, token_search
from decodelab.search.common import PromptBatch, SearchRequest, drain
from decodelab.stopping import (EosCriterion, MaxLengthCriterion, StopStringCriterion, StopStrings,
                                stopping_criteria)


# --- EngineConfig ----------------------------------------------------------------------------------------------------
def test_defaults_are_resolved_and_normalised(monkeypatch):
    monkeypatch.delenv("DECODELAB_DEVICE", raising=False)
    assert EngineConfig.from_kwargs().to_dict() == {
        "device": "cpu", "dtype": "float32", "kernels": "exact", "batch_invariant": False, "quantize": None,
        "quantize_lm_head": False, "compile": False, "fast": None, "pack": None}
    cfg = EngineConfig.from_kwargs(dtype="bf16", kernels=" FAST ", quantize="INT8", device="CPU")
    assert (cfg.device, cfg.dtype, cfg.kernels, cfg.quantize) == ("cpu", "bfloat16", "fast", "int8")
    assert EngineConfig.from_kwargs(quantize="int4").dtype == "bfloat16"  # quantize's default activations
    assert EngineConfig.from_kwargs(quantize="off").quantize is None
    assert EngineConfig.from_kwargs(dtype=torch.float16).torch_dtype == torch.float16
    assert EngineConfig(kernels="fast") == EngineConfig.from_kwargs(kernels="fast", quantize=None)
    assert cfg.replace(kernels="exact").kernels == "exact" and cfg.kernels == "fast"
    with pytest.raises(Exception):
        cfg.kernels = "exact"  # frozen


def test_batch_invariant_implies_fast_kernels_unless_kernels_are_given():
    """``batch_invariant`` alone takes the fast products (made invariant); with ``kernels="exact"`` it is already
    so and changes nothing; it is part of the config's dict (what the server reports)."""
    assert EngineConfig.from_kwargs(batch_invariant=True).kernels == "fast"
    exact = EngineConfig.from_kwargs(batch_invariant=True, kernels="exact")
    assert (exact.kernels, exact.batch_invariant) == ("exact", True)
    assert EngineConfig.from_kwargs(kernels="fast").batch_invariant is False
    assert EngineConfig.from_kwargs(batch_invariant=True).replace(batch_invariant=False).kernels == "fast"


@pytest.mark.parametrize("kwargs,param,message", [
    (dict(device="tpu-9"), "device", "device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got 'tpu-9'"),
    (dict(dtype="int8"), "dtype", "dtype must be 'float32', 'bfloat16' or 'float16', got 'int8'"),
    (dict(kernels="turbo"), "kernels", "invalid kernels='turbo': expected one of exact, fast"),
    (dict(quantize="int3"), "quantize", "invalid quantize='int3': expected 'int8', 'int4' or None"),
    (dict(quantize_lm_head=True), "quantize_lm_head", "quantize_lm_head needs quantize='int8' or 'int4'"),
    (dict(compile="yes"), "compile", "invalid compile='yes': expected true, false or a dict of Inductor options"),
    (dict(fast="no"), "fast", "invalid fast='no': expected true or false"),
    (dict(turbo=True), "turbo", "unknown engine option turbo=True (valid: device, dtype, kernels, batch_invariant, "
                                "quantize, quantize_lm_head, compile, fast, pack)"),
    (dict(batch_invariant="yes"), "batch_invariant", "invalid batch_invariant='yes': expected true or false"),
    (dict(batch_invariant=True, dtype="bf16"), "batch_invariant",
     "batch_invariant=True with kernels='fast' runs decodelab's own float32 CPU kernels; it cannot be combined with "
     "dtype='bfloat16'"),
    (dict(batch_invariant=True, quantize="int8"), "batch_invariant",
     "batch_invariant=True with kernels='fast' runs decodelab's own float32 CPU kernels; it cannot be combined with "
     "quantize='int8'"),
    (dict(batch_invariant=True, kernels="fast", compile=True), "batch_invariant",
     "batch_invariant=True with kernels='fast' runs decodelab's own float32 CPU kernels; it cannot be combined with "
     "compile (a compiled step runs other kernels than a batched eager step)"),
])
def test_each_bad_value_is_one_config_error_naming_the_field(kwargs, param, message):
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_kwargs(**kwargs)
    assert str(info.value) == message and info.value.param == param
    with pytest.raises(ConfigError) as info:  # the same error through load(), before any model is read
        decodelab.load("/nonexistent/model/dir", **kwargs)
    assert str(info.value) == message and info.value.param == param


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is available here")
def test_quantize_off_the_cpu_is_refused_before_loading():
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_kwargs(quantize="int8", device="cuda")
    assert info.value.param == "device"  # no cuda here: the device fails first


@pytest.mark.parametrize("args,line", [
    (("next", "Hi", "--device", "tpu-9"), "error: device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got 'tpu-9'"),
    (("next", "Hi", "--dtype", "int8"), "error: dtype must be 'float32', 'bfloat16' or 'float16', got 'int8'"),
    (("generate", "Hi", "--kernels", "turbo"), "error: invalid kernels='turbo': expected one of exact, fast"),
    (("generate", "Hi", "--quantize", "int3"), "error: invalid quantize='int3': expected 'int8', 'int4' or None"),
    (("serve", "--quantize", "int3"), "error: invalid quantize='int3': expected 'int8', 'int4' or None"),
])
def test_cli_bad_engine_option_exits_2_with_one_line(args, line):
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [line]


def _fake_load_model(tiny_llama, seen: dict):
    def load_model(model=None, *, device=None, dtype=None, config=None):
        seen["config"] = config
        net = copy.deepcopy(tiny_llama.model).to(config.torch_dtype)
        return LoadedModel(model=net, tokenizer=tiny_llama.tokenizer, name="tiny", source="test")

    return load_model


def test_one_object_reaches_the_engine(tiny_llama, monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(decodelab.models, "load_model", _fake_load_model(tiny_llama, seen))
    wanted = EngineConfig.from_kwargs(kernels="fast", pack=False)
    lm = decodelab.load(engine=wanted)
    assert seen["config"] is wanted and lm.engine.config is wanted and lm.engine_config is wanted
    assert lm.engine.fast is not None and lm.engine.kernels == "fast"
    lm = decodelab.load(dtype="bfloat16", kernels="fast")  # keywords are folded into the same object
    assert lm.engine_config == EngineConfig(dtype="bfloat16", kernels="fast") == seen["config"]
    assert lm.model.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="^invalid engine: .*not both \\(got kernels\\)$"):
        decodelab.load(engine=wanted, kernels="exact")


def test_engine_built_from_a_model_records_its_placement(tiny_llama):
    engine = decodelab.engine.Engine(tiny_llama.model)
    assert engine.config == EngineConfig(device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match="^invalid engine: Engine\\(\\) takes .*not both \\(got kernels\\)$"):
        decodelab.engine.Engine(tiny_llama.model, EngineConfig(), kernels="fast")


# --- stopping criteria -----------------------------------------------------------------------------------------------
class PieceTokenizer:
    """Token i decodes to PIECES[i]; ids >= 6 are special (no text)."""

    PIECES = ["he", "l", "lo", " wor", "ld", "!"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids if i < len(self.PIECES))


def first_firing(criterion, ids, prompt=0) -> int | None:
    """The 1-based length of the shortest prefix of ``ids`` on which ``criterion`` fires."""
    for n in range(1, len(ids) + 1):
        if bool(criterion(torch.tensor([ids[:n]]), [prompt])[0]):
            return n
    return None


def test_each_criterion_fires_at_the_expected_token():
    ids = [0, 1, 2, 3, 4, 7, 5]  # "he" "l" "lo" " wor" "ld" <special 7> "!"
    assert first_firing(EosCriterion(torch.tensor([7])), ids) == 6
    assert first_firing(EosCriterion(torch.tensor([], dtype=torch.long)), ids) is None
    assert first_firing(MaxLengthCriterion(3), ids) == 3
    stops = StopStrings(PieceTokenizer(), ("o w",))  # spans the boundary of "lo" and " wor"
    assert first_firing(StopStringCriterion(stops, [[0]]), ids) == 4
    assert first_firing(StopStringCriterion(StopStrings(PieceTokenizer(), ("ld!",)), [[0]]), ids) == 7


def test_criteria_list_ors_and_names_the_first_reason_in_order():
    eos = torch.tensor([3])
    criteria = stopping_criteria(4, eos, StopStrings(PieceTokenizer(), ("o w",)), [[0], [0]])
    assert [type(c) for c in criteria] == [EosCriterion, StopStringCriterion, MaxLengthCriterion]
    rows = torch.tensor([[0, 1, 2, 3], [0, 1, 1, 1], [0, 1, 1, 5]])
    # row 0: " wor" is both an eos id and completes "o w": eos comes first; row 1: the length; row 2: the length
    assert criteria.reasons(rows, [0, 1, 0]) == ["eos", "length", "length"]
    assert criteria.reasons(rows[:, :3], [0, 1, 0]) == [None, None, None]
    assert criteria(rows[:, :3], [0, 1, 0]).tolist() == [False, False, False]
    assert {k: v.tolist() for k, v in criteria.fired(rows, [0, 1, 0]).items()} == {
        "eos": [True, False, False], "stop": [True, False, False], "length": [True, True, True]}
    as_lists = rows.tolist()  # what the search loops pass: the new ids they keep, no tensor per token
    assert criteria.reasons(as_lists, [0, 1, 0]) == ["eos", "length", "length"]
    assert criteria.reasons([r[:3] for r in as_lists], [0, 1, 0]) == [None, None, None]
    assert [c.hits(as_lists, [0, 1, 0]) for c in criteria] == [c(rows, [0, 1, 0]).tolist() for c in criteria]
    only_length = stopping_criteria(5, torch.tensor([], dtype=torch.long), StopStrings(None, ()), [[0]])
    assert [type(c) for c in only_length] == [MaxLengthCriterion] and only_length[0].max_new_tokens == 5


class ScriptedEngine:
    """Greedy picks SCRIPT[k] at step k (every row): logits are one-hot-ish on the scripted id (V = 8)."""

    device = torch.device("cpu")
    SCRIPT = [0, 1, 2, 3, 4, 7, 5, 5, 5]

    def _logits(self, rows: int, k: int) -> torch.Tensor:
        out = torch.zeros(rows, 8)
        out[:, self.SCRIPT[min(k, len(self.SCRIPT) - 1)]] = 5.0
        return out

    class Cache:
        k = 0

        def reorder_cache(self, rows):
            pass

    def prefill(self, ids, mask, *args):
        state = DecodeState(self.Cache(), mask, torch.zeros(ids.shape[0], 1, dtype=torch.long))
        return self._logits(ids.shape[0], 0), state

    def step(self, state, tokens):
        state.cache.k += 1
        return self._logits(tokens.shape[0], state.cache.k)

    def release(self, state):
        pass


def run_scripted(search, max_new_tokens, eos=(), stop=(), **kw):
    cfg = GenerationConfig.from_kwargs(max_new_tokens=max_new_tokens, **kw)
    batch = PromptBatch.from_lists([[6]], pad_id=6)
    eos_ids = torch.tensor(list(eos), dtype=torch.long)
    ctx = Context(1, batch.pad_lengths.repeat_interleave(cfg.num_beams), eos_ids)
    req = SearchRequest(engine=ScriptedEngine(), config=cfg, batch=batch, processors=[], context=ctx,
                        stopping=stopping_criteria(max_new_tokens, eos_ids, StopStrings(PieceTokenizer(), stop),
                                                   [[6]]))
    return drain(search(req))


@pytest.mark.parametrize("eos,stop,max_new,ids,reason", [
    ((7,), (), 20, [0, 1, 2, 3, 4, 7], "eos"),
    ((), ("o w",), 20, [0, 1, 2, 3], "stop"),
    ((), (), 2, [0, 1], "length"),
    ((3,), ("o w",), 20, [0, 1, 2, 3], "eos"),  # both fire on " wor": eos is first in the list
])
def test_token_search_ends_where_the_criteria_say(eos, stop, max_new, ids, reason):
    (raw,) = run_scripted(token_search, max_new, eos, stop)
    assert raw.new_ids == ids and raw.finish_reason == reason


def test_beam_search_consults_the_same_criteria():
    raws = run_scripted(beam_search, 20, (), ("o w",), num_beams=2, num_return_sequences=1)
    assert [(r.new_ids, r.finish_reason) for r in raws] == [([0, 1, 2, 3], "stop")]
    raws = run_scripted(beam_search, 3, (), (), num_beams=2)
    assert [(r.new_ids, r.finish_reason) for r in raws] == [([0, 1, 2], "length")]
