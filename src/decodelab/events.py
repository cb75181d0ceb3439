"""The typed events of a running generation: what :meth:`LM.events` yields (plain, frozen data; no torch).

One generation is one stream of events; every consumer formats it and nothing else: ``LM.stream`` (text deltas),
the CLI's ``--stream``, the OpenAI server-sent events, the inspection route ``/api/generate/stream`` and the web
playground behind it. The driver is :class:`decodelab.streaming.EventStream`.

Order. Each decoding step yields, in this order: one :class:`TraceStep` per record the trace gained (only with
``trace=True``); then per sequence, in sequence order, its :class:`BeamUpdate` (beam search), its
:class:`TokenEvent` (s) and its :class:`TextDelta` (when text became stable); then one :class:`StepDone`. When the
search has finished, for each sequence of ``Generation.sequences`` in order: the :class:`TokenEvent` s not yet
reported (``step=None``), the last :class:`TextDelta` (``step=None``, when text is left) and its :class:`Finish`.

Invariants, per sequence ``i`` (its ``index``) of the final :class:`~decodelab.trace.Generation`:

- the ids of its :class:`TokenEvent` s, in order, are ``Sequence.new_ids`` (end-of-sequence id included when it
  ended on one), and each id is reported once, when it can no longer change;
- ``"".join`` of its :class:`TextDelta` texts is ``Sequence.new_text``; no delta is ever taken back, and no
  delta contains a stop string or a part of one that the final text drops (see :mod:`decodelab.streaming`);
- exactly one :class:`Finish`, the last event about it.

Sequence indices: token search (greedy / sampling) streams every row while it runs (row ``r`` is sequence ``r``;
``num_return_sequences`` rows per prompt when sampling); beam search streams, per prompt ``b``, only its best
sequence (index ``b * num_return_sequences``), and only the ids every hypothesis still in the race shares; the
other returned beams are reported at the end.

Units: ``logprob`` is a natural-log probability under the model's raw distribution (``log_softmax`` of the logits,
before penalties, temperature and filters), as in :class:`~decodelab.trace.Step`; ``offset`` and text lengths are
in characters (Python ``str`` indices); ids are token ids; ``step`` is the 0-based decoding step (new-token index
for token search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .trace import Candidate, Generation, Step


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of sequence ``index``, reported once it can no longer change.

    Attributes:
        index: the sequence (index into the final ``Generation.sequences``).
        step: the decoding step that chose it, or that made it certain (beam search); ``None`` for tokens reported
            after the search finished (beam search's other returned beams and the best one's unsettled tail).
        id: the token id (the end-of-sequence id too, when the sequence ends on one).
        token: ``tokenizer.decode([id])`` (may be U+FFFD for a partial UTF-8 character; ``Tokens`` has byte-exact
            pieces).
        offset: characters: where this token's text starts in the sequence's new text, i.e. the length of the text
            of the ids before it, without a trailing incomplete UTF-8 character.
        logprob: with ``trace=True`` and token search, the token's log-probability under the raw distribution
            (``Step.logprob``); else ``None``.
        top: with ``trace=True`` and token search, the ``trace_top_k`` most likely raw alternatives, best first
            (``Step.top``); else ``None``.
    """

    index: int
    step: int | None
    id: int
    token: str
    offset: int
    logprob: float | None = None
    top: tuple[Candidate, ...] | None = None


@dataclass(frozen=True)
class TextDelta:
    """New text of sequence ``index`` that can no longer change (never empty).

    Attributes:
        index: the sequence.
        text: the characters to append; the deltas of one sequence join to its ``new_text``.
        step: the decoding step after which it became stable; ``None`` for the last delta, sent once the search
            has finished.
    """

    index: int
    text: str
    step: int | None


@dataclass(frozen=True)
class TraceStep:
    """A record the trace gained during this step (only with ``trace=True``): the chosen token of one row (token
    search) or one beam slot (beam search) with its log-probabilities, rank, entropy (nats), alternatives and
    processor changes. ``record`` is the same object ``Generation.trace.steps`` holds."""

    record: Step


@dataclass(frozen=True)
class BeamUpdate:
    """Beam search, after each step, per prompt: where its best sequence stands.

    Attributes:
        step: the decoding step.
        prompt_index: which prompt.
        index: the sequence this prompt's best is reported as (``prompt_index * num_return_sequences``).
        best_ids: the new ids of the current best running beam; it may change its mind at a later step.
        best_text: their text (may end in U+FFFD for an incomplete character).
        stable_ids: the new ids no later step can change (the common prefix of every hypothesis still in the race);
            the final best sequence starts with them.
        stable_text: the text streamed so far for ``index`` (the join of its :class:`TextDelta` s up to here).
    """

    step: int
    prompt_index: int
    index: int
    best_ids: tuple[int, ...]
    best_text: str
    stable_ids: tuple[int, ...]
    stable_text: str


@dataclass(frozen=True)
class StepDone:
    """Every event of decoding step ``step`` has been yielded; the next event needs another model step (the place
    to flush a batch of updates, or to stop the generation)."""

    step: int


@dataclass(frozen=True)
class Finish:
    """Sequence ``index`` is final (its last event).

    Attributes:
        index: the sequence (index into ``generation.sequences``).
        prompt_index: which prompt it continues.
        finish_reason: ``eos`` (an end-of-sequence id), ``stop`` (a stop string) or ``length`` (``max_new_tokens``).
        text: its new text (``Sequence.new_text``: stop string and what follows cut off).
        ids: its new ids (``Sequence.new_ids``, the end-of-sequence id included when ``finish_reason == "eos"``).
        generation: the whole result (the same object for every :class:`Finish` of the stream).
    """

    index: int
    prompt_index: int
    finish_reason: str
    text: str
    ids: tuple[int, ...]
    generation: Generation


Event = Union[TokenEvent, TextDelta, TraceStep, BeamUpdate, StepDone, Finish]
"""Any event of :meth:`LM.events`."""

__all__ = ["BeamUpdate", "Event", "Finish", "StepDone", "TextDelta", "TokenEvent", "TraceStep"]
