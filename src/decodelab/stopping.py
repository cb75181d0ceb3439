"""Stopping: eos id set, ``max_new_tokens``, and stop strings that may span token boundaries.

A row finishes with ``finish_reason``:
- ``"eos"`` when it emits one of the eos ids (unless ``ignore_eos``); the eos token is kept in ``new_ids`` (as
  transformers keeps it) but not in ``new_text``;
- ``"stop"`` when its decoded new text contains a stop string; the text is cut right before the stop string (as the
  OpenAI API does) and the ids keep the token that completed it;
- ``"length"`` when it reaches ``max_new_tokens``.
"""

from __future__ import annotations

import torch

from .detokenize import continuation_text


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

    def cut(self, new_ids: list[int], context_ids: list[int] = ()) -> int:
        """Character index where the text of ``new_ids`` (decoded after the prompt ``context_ids``) must be cut
        (start of the first stop string), or -1."""
        if not self.stop_strings:
            return -1
        return find_stop(continuation_text(self.tokenizer, list(context_ids), new_ids), self.stop_strings)


def eos_tensor(eos_ids: tuple[int, ...], device) -> torch.Tensor:
    """(E,) int64 tensor of eos ids (possibly empty)."""
    return torch.tensor(list(eos_ids), dtype=torch.long, device=device)
