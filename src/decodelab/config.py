"""GenerationConfig: every decoding knob, declared once (each field carries its :class:`~decodelab.knobs.Knob`
metadata: doc line, bounds, CLI flag, OpenAI name, playground control) and normalised and validated here and only here.

Names and defaults follow transformers' ``GenerationConfig`` (``GenerationConfig._get_default_generation_params``):
``max_new_tokens=20``, ``num_beams=1``, ``temperature=1.0``, ``top_k=50``, ``top_p=1.0``, ``repetition_penalty=1.0``,
``length_penalty=1.0``, ``early_stopping=False``. The OpenAI / llama.cpp knobs (``presence_penalty``,
``frequency_penalty``, ``logit_bias``) and decodelab's own (``seed``, ``trace``, ``trace_top_k``, ``ignore_eos``)
sit beside them. Every other module reads a validated :class:`GenerationConfig`; none re-checks values.

Degenerate sampling values are documented behaviour, not errors, and never give NaN or an empty distribution:

- ``temperature=0`` means greedy (as in the OpenAI API and llama.cpp), and so does any temperature below
  ``MIN_TEMPERATURE`` = 1e-5 (vLLM's rule; dividing logits by a smaller number could overflow to ``inf``);
- ``top_k=1``, ``top_p=0`` (or so small that only the top token survives) and ``min_p=1`` keep only the most likely
  token, so sampling returns the greedy token at every step (among exactly tied top scores the lowest id, as
  ``argmax`` picks);
- every sampling warper keeps at least one token (``min_tokens_to_keep``, as in transformers); a tiny ``typical_p``
  keeps the single most *typical* token, which need not be the greedy one;
- ``top_k=0``, ``top_p=1``, ``typical_p=1``, ``epsilon_cutoff=0`` and ``eta_cutoff=0`` switch that warper off.

Only settings that remove tokens outright (``suppress_tokens``, ``bad_words_ids``, ``-inf``-like biases) can leave
nothing to choose; the search then raises :class:`~decodelab.errors.ConfigError` instead of sampling from NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config_checks import CHECKS, MAX_STOP_STRINGS, EarlyStopping, constraint_check, unencodable_at
from .errors import ConfigError
from .knobs import Knob, knob, knobs_of

__all__ = ["GenerationConfig", "MAX_STOP_STRINGS", "MIN_TEMPERATURE", "LENS_TOP_K", "MAX_LENS_TOP_K",
           "LOGIT_BIAS_RANGE", "EarlyStopping", "unencodable_at"]

MIN_TEMPERATURE = 1e-5
"""Sampling temperatures below this are greedy (see the module docstring)."""

LENS_TOP_K = 5
"""``lens=True`` keeps this many tokens per layer and step (``decodelab generate --lens``)."""

MAX_LENS_TOP_K = 100
"""``lens`` (top-k per layer and step of the logit lens) is at most this."""

LOGIT_BIAS_RANGE = (-100.0, 100.0)
"""``logit_bias`` values must lie in this closed range (OpenAI's documented limit); ``sequence_bias`` is unbounded."""

@dataclass(frozen=True)
class GenerationConfig:
    """Validated decoding settings. Build with :meth:`from_kwargs` (which validates); fields are read-only.

    ``seed`` seeds an explicit ``torch.Generator`` per row (never the global RNG): sample ``j`` of a prompt
    (``num_return_sequences``) uses ``seed + j``, so a seeded request gives the same text alone or in a batch, and
    with one prompt it equals ``torch.manual_seed(seed); model.generate(do_sample=True, ...)``. ``seed=None`` draws a
    fresh random seed.

    Lengths are in tokens; probabilities are in [0, 1]; ``sequence_bias`` / ``logit_bias`` values are added to
    logits (natural-log units), as in transformers' ``SequenceBiasLogitsProcessor`` and OpenAI's ``logit_bias``.

    Raises:
        ConfigError: (from :meth:`from_kwargs`) an unknown keyword or a value out of range; the one-line message
            names the parameter and the value received.
    """

    # Each field: knob(default, one-line doc, kind, group, bounds, surfaces) -- see decodelab.knobs.Knob.
    # length and stopping
    max_new_tokens: int = knob(20, "New tokens at most per sequence.", "int", "length", lo=0, openai="max_tokens",
                               playground="number")
    min_new_tokens: int = knob(0, "No end-of-sequence before this many new tokens.", "int", "length", lo=0,
                               playground="number")
    eos_token_id: tuple[int, ...] | None = knob(
        None, "Token ids that end a sequence (absent: the model's eos ids; [] none).", "ids", "length",
        openai="stop_token_ids", playground="json")
    ignore_eos: bool = knob(False, "Never stop at an end-of-sequence token.", "bool", "length",
                            playground="checkbox")
    stop_strings: tuple[str, ...] = knob(
        (), f"Stop when the new text contains one of these (at most {MAX_STOP_STRINGS}; not returned).", "strings",
        "length", cli="--stop", openai="stop", playground="text")
    # search
    do_sample: bool = knob(False, "Sample instead of taking the most likely token (greedy or beam search).", "bool",
                           "search", openai=None, openai_why="the OpenAI routes always sample; temperature 0 is "
                           "greedy", playground="strategy")
    num_beams: int = knob(1, "Beam search with this many beams (1: off).", "int", "search", lo=1,
                          playground="strategy")
    num_return_sequences: int = knob(1, "Sequences returned per prompt (greedy and beam search: <= num_beams).",
                                     "int", "search", lo=1, openai="n", playground="number")
    length_penalty: float = knob(1.0, "Beam search: score = sum of logprobs / length ** length_penalty.", "float",
                                 "search", playground="number")
    early_stopping: EarlyStopping = knob(
        False, "Beam search stopping rule: true, false (heuristic) or never (exhaustive).", "early_stopping",
        "search", playground="select")
    # sampling warpers (only applied when do_sample)
    temperature: float = knob(1.0, "Divide the logits by this before sampling (0 or below 1e-5: greedy).", "float",
                              "sampling", lo=0.0, openai="temperature", playground="number")
    top_k: int = knob(50, "Sample from the k most likely tokens (0: off).", "int", "sampling", lo=0,
                      playground="number")
    top_p: float = knob(1.0, "Nucleus sampling: the smallest set of tokens with this much probability (1: off).",
                        "float", "sampling", lo=0.0, hi=1.0, openai="top_p", playground="number")
    min_p: float | None = knob(None, "Drop tokens below min_p x the top token's probability (absent: off).",
                               "float", "sampling", lo=0.0, hi=1.0, playground="number")
    typical_p: float = knob(1.0, "Locally typical sampling mass (1: off).", "float", "sampling", lo=0.0, hi=1.0,
                            lo_open=True, playground="number")
    epsilon_cutoff: float = knob(0.0, "Drop tokens whose probability is below this (0: off).", "float", "sampling",
                                 lo=0.0, hi=1.0, hi_open=True, playground="number")
    eta_cutoff: float = knob(0.0, "Eta sampling: entropy-dependent probability floor (0: off).", "float", "sampling",
                             lo=0.0, hi=1.0, hi_open=True, playground="number")
    seed: int | None = knob(None, "Sampling seed: row j of a prompt uses seed + j (absent: random).", "int",
                            "sampling", lo=0, hi=2**63 - 1, openai="seed", playground="number")
    # processors (always applied)
    repetition_penalty: float = knob(1.0, "Divide (or multiply) the scores of tokens already present (CTRL; > 1 "
                                     "discourages repeats, 1: off).", "float", "processors", lo=0.0, lo_open=True,
                                     playground="number")
    no_repeat_ngram_size: int = knob(0, "Never repeat an n-gram of this size (0: off).", "int", "processors", lo=0,
                                     playground="number")
    bad_words_ids: tuple[tuple[int, ...], ...] | None = knob(
        None, "Token-id sequences that are never generated.", "id_lists", "processors", cli_input="json",
        playground="json")
    suppress_tokens: tuple[int, ...] | None = knob(None, "Token ids that are never generated.", "ids", "processors",
                                                   playground="json")
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] | None = knob(
        None, "Bias added to the logit of a token-id sequence's last token when the rest was just generated "
        "([[ids], bias] pairs).", "sequence_bias", "processors", cli_input="json", playground="json")
    presence_penalty: float = knob(0.0, "Subtract this from the logit of every token already generated (OpenAI).",
                                   "float", "processors", lo=-2.0, hi=2.0, openai="presence_penalty",
                                   playground="number")
    frequency_penalty: float = knob(0.0, "Subtract this x the count of each token already generated (OpenAI).",
                                    "float", "processors", lo=-2.0, hi=2.0, openai="frequency_penalty",
                                    playground="number")
    logit_bias: tuple[tuple[int, float], ...] | None = knob(
        None, "Token id -> bias added to its logit (each bias in [-100, 100]).", "logit_bias", "processors",
        lo=LOGIT_BIAS_RANGE[0], hi=LOGIT_BIAS_RANGE[1], cli_input="json", openai="logit_bias", playground="json")
    # constraint on the generated text, at most one (decodelab.grammar; applied by processors.GrammarConstraint)
    json_schema: str | None = knob(None, "Constrain the new text to JSON valid under this JSON Schema.",
                                   "json_schema", "constraint", cli_input="file", openai="response_format",
                                   playground="constraint")
    regex: str | None = knob(None, "Constrain the new text to match this regular expression (whole text).", "text",
                             "constraint", playground="constraint")
    grammar: str | None = knob(None, "Constrain the new text to this Lark or llama.cpp GBNF grammar.", "text",
                               "constraint", cli_input="file", playground="constraint")
    # tracing
    trace: bool = knob(False, "Record every decision (steps, candidates, beam tree) in Generation.trace.", "bool",
                       "tracing", openai=None, openai_why="an OpenAI response has no place for a trace; logprobs "
                       "turn it on internally", api=False, api_why="always on: the route exists to return the "
                       "trace", playground=None, playground_why="always on: the page shows the trace")
    trace_top_k: int = knob(10, "Alternatives recorded per step in the trace.", "int", "tracing", lo=0,
                            openai="logprobs", playground="number")
    lens: int = knob(0, "Logit lens: top tokens kept per layer and step (0: off; true: 5); turns trace on.", "int",
                     "tracing", lo=0, hi=MAX_LENS_TOP_K, cli="--lens-top-k", openai=None,
                     openai_why="an OpenAI response has no place for per-layer predictions; use /api/generate",
                     playground="checkbox")

    @property
    def is_beam(self) -> bool:
        """True for beam search (``num_beams > 1``), sampled or not."""
        return self.num_beams > 1

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``(kind, text)`` of the constraint (kind: ``json_schema``, ``regex`` or ``grammar``), or ``None``."""
        for kind in ("json_schema", "regex", "grammar"):
            text = getattr(self, kind)
            if text is not None:
                return kind, text
        return None

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every keyword :meth:`from_kwargs` accepts."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def knobs(cls) -> dict[str, Knob]:
        """``{name: Knob}``: every field's metadata (doc, bounds, surfaces), in field order (:mod:`decodelab.knobs`)."""
        return knobs_of(cls)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "GenerationConfig":
        """Validate and normalise transformers-style keywords into a config.

        ``None`` for any keyword means "the default". ``temperature=0`` (or below ``MIN_TEMPERATURE``) with
        ``do_sample=True`` turns sampling off (greedy), as in the OpenAI API.

        Raises:
            ConfigError: unknown keyword, wrong type or out-of-range value (one line naming parameter and value).
        """
        unknown = sorted(set(kwargs) - cls.names())
        if unknown:
            raise ConfigError(
                f"unknown generation parameter {unknown[0]}={kwargs[unknown[0]]!r} (valid: transformers GenerationConfig names such as "
                "max_new_tokens, num_beams, do_sample, temperature, top_k, top_p, repetition_penalty)",
                param=unknown[0],
            )
        given = {k: v for k, v in kwargs.items() if v is not None}
        v: dict[str, Any] = {}

        if isinstance(given.get("lens"), bool):
            given["lens"] = LENS_TOP_K if given["lens"] else 0
        for f in dataclasses.fields(cls):  # each value against its own knob's kind and bounds
            k: Knob = f.metadata["knob"]
            check = CHECKS.get(k.kind)  # text / json_schema: the constraint, checked by constraint_check below
            if check is not None:
                v[f.name] = check(given, f.name, f.default, k)
        v["trace"] = v["trace"] or v["lens"] > 0
        constraint_check(given, v)

        if v["num_return_sequences"] > v["num_beams"] and not (v["do_sample"] and v["num_beams"] == 1):
            raise ConfigError(
                f"invalid num_return_sequences={v['num_return_sequences']}: must be <= num_beams={v['num_beams']} "
                "for greedy and beam search",
                param="num_return_sequences",
            )
        if v["do_sample"] and v["temperature"] < MIN_TEMPERATURE:
            v["do_sample"] = False  # documented: temperature 0 is greedy
            if v["num_return_sequences"] > v["num_beams"]:
                raise ConfigError(
                    f"invalid num_return_sequences={v['num_return_sequences']}: temperature=0 is greedy and "
                    "returns one sequence per beam",
                    param="num_return_sequences",
                )
        if v["min_new_tokens"] > v["max_new_tokens"]:
            raise ConfigError(
                f"invalid min_new_tokens={v['min_new_tokens']}: larger than max_new_tokens={v['max_new_tokens']}",
                param="min_new_tokens",
            )
        return cls(**v)

    def check_token_ids(self, vocab_size: int) -> None:
        """Check that every token id the settings mention is below ``vocab_size``.

        Raises:
            ConfigError: naming the parameter and the out-of-range id.
        """
        groups: dict[str, list[int]] = {
            "eos_token_id": list(self.eos_token_id or ()),
            "suppress_tokens": list(self.suppress_tokens or ()),
            "bad_words_ids": [i for seq in self.bad_words_ids or () for i in seq],
            "sequence_bias": [i for seq, _ in self.sequence_bias or () for i in seq],
            "logit_bias": [i for i, _ in self.logit_bias or ()],
        }
        for name, ids in groups.items():
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ConfigError(
                    f"invalid {name}: token id {bad[0]} is outside the vocabulary (size {vocab_size})", param=name
                )

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A validated copy with some fields changed (same rules as :meth:`from_kwargs`)."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        current.update(changes)
        for key in ("sequence_bias", "logit_bias"):  # stored normalised; turn back into a from_kwargs shape
            if key not in changes and current[key] is not None:
                current[key] = dict(current[key])
        return GenerationConfig.from_kwargs(**current)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the settings (tuples become lists)."""

        def plain(x: Any) -> Any:
            if isinstance(x, tuple):
                return [plain(i) for i in x]
            return x

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
