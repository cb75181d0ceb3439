"""Plain-data results: candidates, steps, beam tree, sequences, generations. No torch in here.

Every class is a dataclass with ``to_dict()`` / ``from_dict()`` so a trace survives a JSON round-trip
(``Trace.from_dict(json.loads(json.dumps(t.to_dict()))) == t``). Units: ``logit`` is a raw model output;
``logprob`` is a natural-log probability; ``prob`` is in [0, 1]; ``entropy`` is in nats.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def _encode(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {f.name: _encode(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [_encode(i) for i in x]
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("-inf" if x < 0 else "inf")
    return x


def _decode(tp: Any, x: Any) -> Any:
    if x is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(args[0], x) if len(args) == 1 else x
    if origin is list:
        (inner,) = typing.get_args(tp)
        return [_decode(inner, i) for i in x]
    if dataclasses.is_dataclass(tp):
        return tp.from_dict(x)
    if tp is float:
        return {"-inf": -math.inf, "inf": math.inf}.get(x, x) if isinstance(x, str) else float(x)
    return x


class _Plain:
    """Mixin: JSON-ready ``to_dict`` and its inverse ``from_dict`` (infinite floats become "inf"/"-inf")."""

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _decode(hints[f.name], d[f.name]) for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class Candidate(_Plain):
    """One vocabulary entry at one position. ``logit`` may be ``-inf`` after a processor removed the token."""

    id: int
    token: str
    logit: float
    prob: float
    logprob: float


@dataclass
class ProcessorChange(_Plain):
    """What one processor did to one candidate: ``after`` is ``-inf`` when it removed the token."""

    processor: str
    id: int
    token: str
    before: float
    after: float


@dataclass
class ConstraintStep(_Plain):
    """What the constraint (``json_schema`` / ``regex`` / ``grammar``) did at one step of one row, measured on the
    distribution that entered it (the model's, after penalties and biases, before temperature and top-k/p).

    ``allowed``: how many of the V tokens it allowed; ``mass_removed``: the probability (in [0, 1]) of the tokens it
    forbade; ``top_before`` / ``top_after``: the most likely token before and after the mask (the same token when
    the model's first choice was allowed); ``forbidden``: the most likely forbidden tokens (up to ``trace_top_k``),
    their probabilities before the mask; ``text_so_far``: the generated text the constraint had seen; ``path``
    (``json_schema`` only, else ``None``): where that text stands in the JSON value, e.g. ``$.items[1].sku``
    (:func:`decodelab.grammar.json_path`).
    """

    kind: str
    allowed: int
    mass_removed: float
    top_before: Candidate
    top_after: Candidate
    forbidden: list[Candidate] = field(default_factory=list)
    text_so_far: str = ""
    path: str | None = None


@dataclass
class Step(_Plain):
    """One decoding decision of one row (greedy / sampling) or one beam slot (beam search).

    ``logprob`` is the chosen token's log-probability under the model (``log_softmax`` of raw logits);
    ``logprob_processed`` under the processed distribution that search actually used; ``rank`` is its 0-based rank
    in the raw distribution; ``entropy`` (nats) is the raw distribution's.
    """

    step: int
    row: int
    id: int
    token: str
    logprob: float
    logprob_processed: float
    rank: int
    entropy: float
    top: list[Candidate] = field(default_factory=list)
    top_processed: list[Candidate] = field(default_factory=list)
    changes: list[ProcessorChange] = field(default_factory=list)
    constraint: ConstraintStep | None = None


@dataclass
class BeamNode(_Plain):
    """A node of the beam tree: a hypothesis extended by one token at ``step`` (0-based new-token index).

    ``parent`` is the node id of the hypothesis it extends (``None`` at step 0). ``cumulative`` is the running sum
    of processed token log-probabilities; ``logprob`` this token's processed log-probability; ``score`` the
    length-penalised score (``cumulative / new_len ** length_penalty``, new tokens only) of a candidate that ended
    (eos, stop string or the length limit), else ``None``. ``status``: ``kept`` (continued as a running beam),
    ``pruned`` (among the ``max(2, 1 + len(eos_ids)) * num_beams`` best candidates of its step but not continued,
    or ended with a score that did not enter the ``num_beams`` best finished hypotheses), ``finished`` (ended and
    entered them), ``returned`` (a finished hypothesis that is one of the returned sequences).
    """

    node: int
    parent: int | None
    step: int
    row: int
    id: int
    token: str
    logprob: float
    cumulative: float
    status: str
    score: float | None = None


@dataclass
class LensLayer(_Plain):
    """Logit lens of one decoder layer at one step (:mod:`decodelab.lens`): the distribution
    ``softmax(lm_head(final_norm(h)))`` of the layer's output ``h``. ``layer`` is 0-based (the last layer's lens is
    the model's real prediction); ``prob`` (in [0, 1]), ``logprob`` (natural log) and ``rank`` (0-based) are those
    of the token finally chosen at this step; ``top`` the layer's most likely tokens (``logit``: the lens logit)."""

    layer: int
    prob: float
    logprob: float
    rank: int
    top: list[Candidate] = field(default_factory=list)


@dataclass
class LensStep(_Plain):
    """Logit lens of one step of one returned sequence: ``sequence`` indexes ``Generation.sequences``, ``step`` is
    the 0-based new-token index, ``id`` / ``token`` the token chosen there; ``layers``: one :class:`LensLayer` per
    decoder layer, first layer first."""

    sequence: int
    step: int
    id: int
    token: str
    layers: list[LensLayer] = field(default_factory=list)


@dataclass
class Trace(_Plain):
    """Everything decided during one ``generate`` call.

    ``steps`` hold, for greedy / sampling, one :class:`Step` per row and step; for beam search, one per kept beam.
    ``beam_nodes`` is the beam tree (empty for greedy / sampling). ``stop_reason`` says why the search as a whole
    ended: ``"max_new_tokens"``, ``"all_finished"`` (every row hit eos / a stop string), ``"early_stopping"``
    (beam search: no running beam can beat the finished ones). ``lens`` (only with ``lens=k``): the logit lens of
    every returned sequence, one :class:`LensStep` per sequence and new token.
    """

    strategy: Literal["greedy", "sampling", "beam_search", "beam_sampling"]
    steps: list[Step] = field(default_factory=list)
    beam_nodes: list[BeamNode] = field(default_factory=list)
    stop_reason: str = ""
    processors: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    lens: list[LensStep] = field(default_factory=list)  # opt-in (lens=k): see decodelab.lens


@dataclass
class Sequence(_Plain):
    """One returned sequence. ``ids`` = prompt ids (unpadded) + new ids (the eos or stop-completing token
    included); ``new_text`` is the text the new ids add after the prompt (special tokens skipped, the eos token left
    out, cut right before a stop string; see :func:`decodelab.detokenize.continuation_text`); ``text`` = the decoded
    prompt + ``new_text``; ``score``: beam search's length-penalised sum of processed log-probabilities
    (transformers' ``sequences_scores``), else the sum of the chosen tokens' processed log-probabilities.
    ``finish_reason``: ``eos``, ``stop`` (a stop string) or ``length``. ``constraint_met`` (constrained requests
    only, else ``None``): ``True`` when the text is complete under the ``json_schema`` / ``regex`` / ``grammar``
    (it ended on eos, which the constraint allows only then); ``False`` when it was cut first (``length`` or a stop
    string): the text is then an unfinished prefix, not a valid value."""

    ids: list[int]
    text: str
    new_ids: list[int]
    new_text: str
    score: float
    finish_reason: str
    prompt_index: int = 0
    constraint_met: bool | None = None


@dataclass
class Generation(_Plain):
    """The result of ``LM.generate``: ``sequences`` grouped by prompt (``num_return_sequences`` per prompt, best first
    for beam search), the prompts' ids, and the :class:`Trace` when ``trace=True``."""

    model: str
    prompt_ids: list[list[int]]
    sequences: list[Sequence]
    trace: Trace | None = None
    elapsed_s: float = 0.0

    @property
    def text(self) -> str:
        """The first sequence's full text (prompt + continuation)."""
        return self.sequences[0].text

    def _repr_html_(self) -> str:  # notebook view
        from .render import generation_html

        return generation_html(self)
