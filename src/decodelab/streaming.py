"""Streaming: text deltas while a generation runs, whose concatenation is exactly the final text.

Two parts:

- :class:`IncrementalDetokenizer` turns a growing list of token ids into deltas of text that can no longer change.
  After each token it decodes the ids (with a little prompt context, see :mod:`decodelab.detokenize`) and emits the
  new text except for a tail it holds back: trailing U+FFFD (a UTF-8 character whose remaining bytes are still to
  come: emoji and CJK are often split across byte-level BPE tokens), any tail that could be the beginning of a stop
  string (so no partial stop string is ever emitted), and, for tokenizers that clean up tokenization spaces, a tail
  that the clean-up could still rewrite. When a stop string appears, the text is cut right before it, as in the
  final result. ``"".join(deltas) == Sequence.new_text`` for every sequence.
- :class:`Stream` drives ``LM._run`` (the same generator ``LM.generate`` drains, so streamed and non-streamed results
  are identical) and keeps the final :class:`~decodelab.trace.Generation` in ``.generation`` once exhausted.

Beam search policy: a delta carries only text that no later step can change, i.e. the common prefix of every
running beam and every finished hypothesis that could still be returned (:class:`~decodelab.search.common.BeamEvent`
``.stable``); the rest of the best sequence comes as the last delta. The current best beam, which may still change
its mind, is reported beside each delta (``Delta.best``) for displays that redraw it, never mixed into the deltas.
So for beam search too ``"".join(deltas)`` equals the final best text, and nothing emitted is ever taken back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .detokenize import CLEANUP_PATTERNS, REPLACEMENT, cleans_up_spaces, continuation_text, prompt_context
from .search.common import BeamEvent
from .stopping import find_stop, holdback
from .trace import Generation


class IncrementalDetokenizer:
    """Incremental, UTF-8-safe decoding of one sequence's new ids.

    Args:
        tokenizer: a transformers tokenizer.
        context_ids: the prompt's ids (its last few give the decode context); may be empty.
        stop_strings: text is cut right before the first of these, and a tail that could begin one is held back.
        eos_ids: ids that end a sequence without adding text (the final ``new_text`` leaves out the eos token's
            text even when it is an ordinary token): :meth:`push` ignores them.

    Attributes:
        ids: the new ids seen so far.
        text: the text emitted so far (``"".join`` of every delta returned).
        stopped: a stop string was found; nothing more is emitted.
    """

    def __init__(self, tokenizer, context_ids: list[int] = (), stop_strings: tuple[str, ...] = (),
                 eos_ids: tuple[int, ...] | set[int] = ()):
        self.tokenizer = tokenizer
        self.context = prompt_context(list(context_ids))
        self.stop_strings = tuple(stop_strings)
        self.eos_ids = frozenset(eos_ids)
        self.cleanup = cleans_up_spaces(tokenizer)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def push(self, token_ids: int | list[int]) -> str:
        """Append one id (or several; eos ids are skipped) and return the newly stable text ("" when nothing is
        stable yet)."""
        new = [token_ids] if isinstance(token_ids, int) else token_ids
        self.ids.extend(t for t in new if t not in self.eos_ids)
        return self._emit()

    def set_ids(self, ids: list[int]) -> str:
        """Replace the ids by ``ids`` (which must extend the ids seen so far, as beam search's stable prefix does;
        a trailing eos id is dropped) and return the newly stable text."""
        self.ids = list(ids[:-1] if ids and ids[-1] in self.eos_ids else ids)
        return self._emit()

    def stable_text(self) -> str:
        """The text of the ids so far minus the tail that may still change (see the module docstring)."""
        full = continuation_text(self.tokenizer, self.context, self.ids)
        cut = find_stop(full, self.stop_strings) if self.stop_strings else -1
        if cut >= 0:
            self.stopped = True
            return full[:cut]
        end = len(full)
        while end and full[end - 1] == REPLACEMENT:
            end -= 1
        text = full[:end]
        hold = holdback(text, self.stop_strings) if self.stop_strings else 0
        if self.cleanup:
            hold = max(hold, holdback(text, CLEANUP_PATTERNS))
        return text[: len(text) - hold]

    def _emit(self) -> str:
        if self.stopped:
            return ""
        stable = self.stable_text()
        if len(stable) <= len(self.text) or not stable.startswith(self.text):
            return ""
        delta = stable[len(self.text) :]
        self.text = stable
        return delta

    def finish(self, final_text: str) -> str:
        """The last delta: whatever of ``final_text`` (the sequence's ``new_text``) was not emitted yet.

        ``final_text`` always starts with the emitted text for the tokenizers decodelab supports; if a tokenizer
        ever rewrote text already emitted, nothing more is emitted (deltas are never taken back).
        """
        if not final_text.startswith(self.text):
            return ""
        delta = final_text[len(self.text) :]
        self.text = final_text
        return delta


@dataclass
class Delta:
    """One streamed piece of text.

    Attributes:
        index: which sequence of the final ``Generation.sequences`` it belongs to.
        text: the new text ("" only when :meth:`Stream.deltas` is asked for every step).
        best: beam search with ``Stream.deltas(every_step=True)`` only: the current best beam's whole new text so
            far (it may change, and need not extend what was emitted); otherwise ``None``.
        step: 0-based decoding step that produced it (``None`` for the final flush).
    """

    index: int
    text: str
    best: str | None = None
    step: int | None = None


class Stream:
    """Iterator over the text deltas of the first sequence of a generation; ``.generation`` holds the result after
    the iterator is exhausted.

    ``for delta in lm.stream(prompt, **kw)`` yields non-empty strings whose concatenation equals
    ``lm.generate(prompt, **kw).sequences[0].new_text`` (same settings and seed: the same result). Use
    :meth:`deltas` instead to follow every returned sequence (``num_return_sequences`` > 1, or a list of prompts);
    iterate one or the other, not both.

    Args:
        lm: the :class:`~decodelab.lm.LM`.
        prompt: a string (or a list of strings, streamed by :meth:`deltas`).
        kwargs: generation keywords, validated here (before the first token), as :meth:`LM.generate` does.

    Attributes:
        config: the validated settings.
        trace: with ``trace=True``, the :class:`~decodelab.trace.Trace` being filled while the stream runs (its
            ``steps`` grow as tokens are chosen: per-token log-probabilities for a streaming server); else ``None``.
        generation: the final result, once the iterator is exhausted.

    Raises:
        ConfigError, InputError: at construction, for bad settings or prompts.
    """

    def __init__(self, lm, prompt: str | list[str], kwargs: dict[str, Any]):
        self.lm = lm
        self.trace = None
        self._run = lm._run(prompt, kwargs, on_trace=self._set_trace)  # validates now; search starts at next()
        self.config = self._run.config
        self.generation: Generation | None = None
        self._deltas: Iterator[Delta] | None = None
        self._first: Iterator[str] | None = None

    def _set_trace(self, trace) -> None:
        self.trace = trace

    # -- the plain iterator: first sequence, non-empty text deltas ---------------------------------------------------
    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self._first is None:
            self._first = (d.text for d in self.deltas() if d.index == 0 and d.text)
        return next(self._first)

    def text(self) -> str:
        """Run to the end and return the first sequence's whole new text (the join of the remaining deltas)."""
        return "".join(self)

    def close(self) -> None:
        """Stop the generation early (no further model step runs); ``.generation`` stays ``None``."""
        for it in (self._first, self._deltas):
            if it is not None:
                it.close()
        self._run.close()

    # -- every sequence ------------------------------------------------------------------------------------------
    def deltas(self, every_step: bool = False) -> Iterator[Delta]:
        """Deltas of every sequence, in the order they become stable; the last ones (one per sequence with text
        left, in sequence order) come when the search has finished, and then ``.generation`` is set.

        With ``every_step=True`` a :class:`Delta` is yielded per streamed sequence and step even when its text is
        empty, so a display can redraw ``Delta.best`` (beam search) as it changes. The first call decides
        ``every_step``; later calls (and the plain iterator) continue the same deltas.
        """
        if self._deltas is None:
            self._deltas = self._drive(every_step)
        return self._deltas

    def _drive(self, every_step: bool) -> Iterator[Delta]:
        run = self._run
        cfg = self.config
        stops = cfg.stop_strings
        tok = self.lm.tokenizer
        prompts = run.prompt_ids
        per_prompt = run.per_prompt
        beam_n = cfg.num_return_sequences if cfg.is_beam else 1
        eos = self.lm.stop_ids(cfg)
        # sequence index -> detokenizer, for the sequences that are streamed while the search runs
        if cfg.is_beam:
            streamed = {b * beam_n: IncrementalDetokenizer(tok, prompts[b], stops, eos) for b in range(len(prompts))}
        else:
            streamed = {r: IncrementalDetokenizer(tok, prompts[r // per_prompt], stops, eos)
                        for r in range(len(prompts) * per_prompt)}
        step = 0
        gen = run.events
        while True:
            try:
                event = next(gen)
            except StopIteration as done:
                self.generation = done.value
                break
            if isinstance(event, BeamEvent):
                for b, ids in enumerate(event.stable):
                    i = b * beam_n
                    text = streamed[i].set_ids(ids)
                    if text or every_step:
                        best = continuation_text(tok, streamed[i].context, event.best[b]) if every_step else None
                        yield Delta(i, text, best, step)
            else:
                tokens, running = event
                for r, (t, alive) in enumerate(zip(tokens, running)):
                    if not alive:
                        continue
                    text = streamed[r].push(t)
                    if text or every_step:
                        yield Delta(r, text, None, step)
            step += 1
        for i, seq in enumerate(self.generation.sequences):
            detok = streamed.get(i)
            text = detok.finish(seq.new_text) if detok is not None else seq.new_text
            if text or (every_step and detok is not None):
                yield Delta(i, text, seq.new_text if cfg.is_beam else None, None)


def stream_deltas(lm, prompt: str | list[str], kwargs: dict[str, Any]) -> Stream:
    """What :meth:`LM.stream` returns: a :class:`Stream` (iterate it for ``str`` deltas; ``.generation`` after)."""
    return Stream(lm, prompt, kwargs)
