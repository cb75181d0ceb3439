"""Stopping: eos id set, ``max_new_tokens``, and stop strings that may span token boundaries, as a list of criteria.

The shape is transformers' ``generation/stopping_criteria.py``: each rule is a small object called on the ids so far
that answers, per row, "does this continuation end here?" (``StoppingCriteria.__call__(input_ids, scores) ->
BoolTensor (B,)``), and ``StoppingCriteriaList`` ORs them. Here a criterion sees only the *generated* ids (N, L) and
the prompt each row continues, and carries the ``finish_reason`` it gives: :class:`EosCriterion` (transformers'
``EosTokenCriteria``), :class:`MaxLengthCriterion` (``MaxLengthCriteria`` counted in new tokens, as
``max_new_tokens``), :class:`StopStringCriterion` (``StopStringCriteria``, but on decoded text: see
:class:`StopStrings`). :class:`StoppingCriteria` holds them in precedence order. The search loops
(:mod:`decodelab.search`) consult that list after each token.

A row finishes with ``finish_reason``:
- ``"eos"`` when it emits one of the eos ids (unless ``ignore_eos``); the eos token is kept in ``new_ids`` (as
  transformers keeps it) but not in ``new_text``;
- ``"stop"`` when its decoded new text contains a stop string; the text is cut right before the stop string (as the
  OpenAI API does) and the ids keep the token that completed it;
- ``"length"`` when it reaches ``max_new_tokens``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .detokenize import context_text, continuation_text, prompt_context


def find_stop(text: str, stop_strings: tuple[str, ...], start: int = 0) -> int:
    """Index in ``text`` of the earliest stop string occurring at or after ``start``, or -1."""
    hits = [i for s in stop_strings if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else -1


def holdback(text: str, stop_strings: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could be the beginning of a stop string (so a stream must hold
    them back until the next token decides)."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopStrings:
    """Watches decoded new text per row for stop strings.

    Args:
        tokenizer: decodes new ids to text (see :func:`decodelab.detokenize.continuation_text`).
        stop_strings: the strings (empty tuple: never stops).
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.longest = max((len(s) for s in stop_strings), default=0)

    def __bool__(self) -> bool:
        return bool(self.stop_strings)

    def cut(self, new_ids: Sequence[int], context_ids: Sequence[int] = (), prefix: str | None = None) -> int:
        """Character index where the text of ``new_ids`` (decoded after the prompt ``context_ids``, whose own text
        is ``prefix`` when the caller has it: :func:`~decodelab.detokenize.context_text`) must be cut (start of the
        first stop string), or -1."""
        if not self.stop_strings:
            return -1
        return find_stop(continuation_text(self.tokenizer, list(context_ids), new_ids, prefix), self.stop_strings)


def eos_tensor(eos_ids: tuple[int, ...], device) -> torch.Tensor:
    """(E,) int64 tensor of eos ids (possibly empty)."""
    return torch.tensor(list(eos_ids), dtype=torch.long, device=device)


class StoppingCriterion:
    """One rule that ends a continuation. Subclasses set :attr:`reason` and implement :meth:`hits`.

    ``hits(new_ids, prompts)``: ``new_ids`` the ids generated so far by N continuations, one list per row (newest
    last, each at least one id); ``prompts``: the prompt index of each row (length N). Returns N bools: True where
    the continuation ends with its newest token. Never modifies its inputs. The search loops call it on the lists
    they keep (no tensor per token); ``__call__`` is the same rule on an (N, L) int64 tensor, as transformers'
    ``StoppingCriteria.__call__``, returning an (N,) bool tensor on ``new_ids.device``.
    """

    reason = ""  # the finish_reason of a row this criterion ends: "eos" | "stop" | "length"

    def hits(self, new_ids: Sequence[Sequence[int]], prompts: Sequence[int]) -> list[bool]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, new_ids: torch.Tensor, prompts: Sequence[int]) -> torch.Tensor:
        return torch.tensor(self.hits(new_ids.tolist(), prompts), dtype=torch.bool, device=new_ids.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EosCriterion(StoppingCriterion):
    """Ends a row whose newest token is one of ``eos_ids`` (transformers' ``EosTokenCriteria``: ``isin(input_ids[:,
    -1], eos_token_id)``). The eos token stays in the ids; its text is left out of ``new_text``.

    Args:
        eos_ids: (E,) int64 tensor of eos ids (E may be 0: never).
    """

    reason = "eos"

    def __init__(self, eos_ids: torch.Tensor):
        self.eos_ids = eos_ids
        self._ids = frozenset(eos_ids.tolist())

    def hits(self, new_ids: Sequence[Sequence[int]], prompts: Sequence[int]) -> list[bool]:
        return [ids[-1] in self._ids for ids in new_ids]

    def __repr__(self) -> str:
        return f"EosCriterion({self.eos_ids.tolist()})"


class MaxLengthCriterion(StoppingCriterion):
    """Ends every row once it has ``max_new_tokens`` new tokens (transformers' ``MaxLengthCriteria``, counted in
    generated tokens as ``GenerationConfig.max_new_tokens`` is)."""

    reason = "length"

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens

    def hits(self, new_ids: Sequence[Sequence[int]], prompts: Sequence[int]) -> list[bool]:
        return [len(ids) >= self.max_new_tokens for ids in new_ids]

    def __repr__(self) -> str:
        return f"MaxLengthCriterion({self.max_new_tokens})"


class StopStringCriterion(StoppingCriterion):
    """Ends a row whose decoded new text contains a stop string, wherever token boundaries fall (transformers'
    ``StopStringCriteria`` answers the same question from token-piece overlaps; decodelab decodes, with
    :class:`StopStrings`, so the match is on exactly the text the user gets, which is cut before the stop string).

    Args:
        stops: the :class:`StopStrings` watcher (tokenizer and strings).
        prompts: the prompt ids of each prompt (their last few ids are decoded with the new ids, see
            :func:`decodelab.detokenize.prompt_context`).
    """

    reason = "stop"

    def __init__(self, stops: StopStrings, prompts: Sequence[Sequence[int]]):
        self.stops = stops
        self.contexts = [prompt_context(list(p)) for p in prompts]
        self.texts = [context_text(stops.tokenizer, c) for c in self.contexts]  # decoded once, not per token

    def hits(self, new_ids: Sequence[Sequence[int]], prompts: Sequence[int]) -> list[bool]:
        return [self.stops.cut(ids, self.contexts[p], self.texts[p]) >= 0 for ids, p in zip(new_ids, prompts)]

    def __repr__(self) -> str:
        return f"StopStringCriterion({list(self.stops.stop_strings)})"


class StoppingCriteria(list):
    """The criteria of one request, in precedence order (transformers' ``StoppingCriteriaList``, which ORs them):
    when several fire on the same token, the row's ``finish_reason`` is the first one's :attr:`reason`.

    The generated ids come as an (N, L) int64 tensor (:meth:`reasons`: or as N lists of ids, what the search loops
    keep; see :class:`StoppingCriterion`)."""

    def __call__(self, new_ids: torch.Tensor, prompts: Sequence[int]) -> torch.Tensor:
        """(N,) bool: True where any criterion fires (see :class:`StoppingCriterion` for the arguments)."""
        rows = new_ids.tolist()
        hits = [criterion.hits(rows, prompts) for criterion in self]
        done = [any(hit[i] for hit in hits) for i in range(len(rows))]
        return torch.tensor(done, dtype=torch.bool, device=new_ids.device)

    def fired(self, new_ids: torch.Tensor, prompts: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{reason: (N,) bool}`` for every criterion (criteria with the same reason ORed)."""
        rows = new_ids.tolist()
        out: dict[str, list[bool]] = {}
        for criterion in self:
            hit, earlier = criterion.hits(rows, prompts), out.get(criterion.reason)
            out[criterion.reason] = hit if earlier is None else [a or b for a, b in zip(earlier, hit)]
        return {reason: torch.tensor(hit, dtype=torch.bool, device=new_ids.device) for reason, hit in out.items()}

    def reasons(self, new_ids: torch.Tensor | Sequence[Sequence[int]], prompts: Sequence[int]) -> list[str | None]:
        """Per row, the :attr:`~StoppingCriterion.reason` of the first criterion that fires, or ``None``."""
        rows = new_ids.tolist() if isinstance(new_ids, torch.Tensor) else new_ids
        out: list[str | None] = [None] * len(rows)
        for criterion in self:
            for i, hit in enumerate(criterion.hits(rows, prompts)):
                if hit and out[i] is None:
                    out[i] = criterion.reason
        return out


def stopping_criteria(max_new_tokens: int, eos_ids: torch.Tensor, stops: StopStrings,
                      prompts: Sequence[Sequence[int]]) -> StoppingCriteria:
    """The criteria of a request, in decodelab's precedence: eos (when there are eos ids), stop strings (when there
    are any), ``max_new_tokens``. ``eos_ids``: (E,) int64 on the search's device; ``prompts``: each prompt's ids."""
    criteria = StoppingCriteria()
    if eos_ids.numel():
        criteria.append(EosCriterion(eos_ids))
    if stops:
        criteria.append(StopStringCriterion(stops, prompts))
    criteria.append(MaxLengthCriterion(max_new_tokens))
    return criteria
