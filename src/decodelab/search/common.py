"""Shared pieces of the search loops: the left-padded prompt batch, the one request object a loop takes, and the raw
per-sequence result."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator, TypeVar

import torch

from ..threads import single_threaded

if TYPE_CHECKING:
    from ..config import GenerationConfig
    from ..processors import Context, Processor
    from ..stopping import StoppingCriteria
    from .tracing import Tracer

T = TypeVar("T")


@dataclass
class PromptBatch:
    """Left-padded prompts.

    Attributes:
        ids: (B, T0) int64, padded on the left with ``pad_id``.
        mask: (B, T0) int64 attention mask (0 on padding).
        pad_lengths: (B,) int64 number of padding positions per row.
        prompts: the unpadded prompt ids, one list per row.
        pad_id: the padding id (the tokenizer's pad id, else its eos id, as transformers does).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    pad_lengths: torch.Tensor
    prompts: list[list[int]]
    pad_id: int

    @classmethod
    def from_lists(cls, prompts: list[list[int]], pad_id: int) -> "PromptBatch":
        """Left-pad ``prompts`` (each non-empty) into one batch."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        pads = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
        return cls(ids, mask, pads, [list(p) for p in prompts], pad_id)

    def repeat(self, n: int) -> "PromptBatch":
        """Each row repeated ``n`` times in place (row i -> rows i*n .. i*n+n-1), like ``repeat_interleave``."""
        if n == 1:
            return self
        return PromptBatch(
            self.ids.repeat_interleave(n, 0),
            self.mask.repeat_interleave(n, 0),
            self.pad_lengths.repeat_interleave(n, 0),
            [p for p in self.prompts for _ in range(n)],
            self.pad_id,
        )

    @property
    def width(self) -> int:
        """Padded prompt length T0 in tokens."""
        return self.ids.shape[1]


@dataclass
class SearchRequest:
    """Everything one search loop (:func:`~decodelab.search.token_search`, :func:`~decodelab.search.beam_search`)
    needs; ``LM._search`` builds it, the loop reads nothing else.

    Attributes:
        engine: the :class:`~decodelab.engine.Engine` (``prefill``, ``step``, ``select``, ``release``, ``device``).
        config: the validated :class:`~decodelab.config.GenerationConfig`.
        batch: the left-padded prompts, one row per prompt (not repeated: token search repeats each prompt
            ``per_prompt`` times, beam search ``num_beams`` times).
        processors: the logits processors, in order (:func:`decodelab.processors.build_processors`).
        context: what the processors were built with (its ``eos_ids`` also set beam search's candidate count).
        stopping: the :class:`~decodelab.stopping.StoppingCriteria`, in precedence order.
        per_prompt: token search: rows per prompt (``num_return_sequences`` when sampling, else 1); beam search: 1.
        generators: one seeded ``torch.Generator`` per row when sampling (token search: ``len(batch) *
            per_prompt`` rows; beam sampling: one per prompt), see :func:`~decodelab.search.sampling.row_generators`;
            ``None``: greedy / plain beam search.
        tracer: records every step into a :class:`~decodelab.trace.Trace`, or ``None``.
    """

    engine: Any
    config: "GenerationConfig"
    batch: PromptBatch
    processors: "list[Processor]"
    context: "Context"
    stopping: "StoppingCriteria"
    per_prompt: int = 1
    generators: list[torch.Generator] | None = None
    tracer: "Tracer | None" = None


@dataclass
class RawSequence:
    """One finished sequence as the search produced it.

    Attributes:
        prompt_index: which prompt of the batch it continues.
        new_ids: generated ids (eos included when it ended on eos).
        score: see ``trace.Sequence.score``.
        finish_reason: ``eos`` | ``stop`` | ``length``.
    """

    prompt_index: int
    new_ids: list[int]
    score: float
    finish_reason: str


class BeamEvent:
    """What beam search yields after each step, one entry per prompt (computed only when read, so that
    ``generate``, which ignores the events, pays nothing).

    Attributes:
        best: the new ids of the current best running beam (it may change its mind from step to step).
        stable: the new ids that can no longer change: the common prefix of every running beam and every finished
            hypothesis still in the list (or the whole best finished hypothesis once the prompt's search is
            decided). The final best sequence of each prompt starts with its ``stable`` ids.
    """

    def __init__(self, best: Callable[[], list[list[int]]], stable: Callable[[], list[list[int]]]):
        self._best, self._stable = best, stable

    @functools.cached_property
    def best(self) -> list[list[int]]:
        return self._best()

    @functools.cached_property
    def stable(self) -> list[list[int]]:
        return self._stable()


class Run:
    """A prepared generation: validated settings and prompt ids, plus the search generator ``events``.

    ``LM._run`` returns one. It behaves as the generator it wraps (``next``, ``send``, ``close``, ``yield from``):
    each step yields an event (token search: ``(tokens, running)``, one entry per row; beam search: a
    :class:`BeamEvent`), and the generator *returns* the :class:`~decodelab.trace.Generation`.

    Attributes:
        config: the validated :class:`~decodelab.config.GenerationConfig`.
        prompt_ids: token ids of each prompt.
        per_prompt: rows per prompt for token search (``num_return_sequences`` when sampling, else 1).
        events: the underlying generator.
    """

    def __init__(self, config, prompt_ids: list[list[int]], per_prompt: int, events: Generator):
        self.config, self.prompt_ids, self.per_prompt, self.events = config, prompt_ids, per_prompt, events

    def __iter__(self) -> "Run":
        return self

    def __next__(self):
        with single_threaded():  # the step's own tensor work; its model calls run with the model's threads
            return next(self.events)

    def send(self, value):
        with single_threaded():
            return self.events.send(value)

    def throw(self, *args):
        with single_threaded():
            return self.events.throw(*args)

    def close(self) -> None:
        with single_threaded():
            self.events.close()


def drain(gen: Generator[object, None, T]) -> T:
    """Run a search generator to the end and return its result (the generator's return value)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
