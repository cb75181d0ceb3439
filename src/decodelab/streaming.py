"""Streaming: the event stream of a running generation, and text deltas whose concatenation is exactly the final text.

Three parts:

- :class:`IncrementalDetokenizer` turns a growing list of token ids into deltas of text that can no longer change.
  After each token it decodes the ids (with a little prompt context, see :mod:`decodelab.detokenize`) and emits the
  new text except for a tail it holds back: trailing U+FFFD (a UTF-8 character whose remaining bytes are still to
  come: emoji and CJK are often split across byte-level BPE tokens), any tail that could be the beginning of a stop
  string (so no partial stop string is ever emitted), and, for tokenizers that clean up tokenization spaces, a tail
  that the clean-up could still rewrite. When a stop string appears, the text is cut right before it, as in the
  final result. ``"".join(deltas) == Sequence.new_text`` for every sequence.
- :class:`EventStream` (what :meth:`LM.events` returns) drives the search generator that ``LM.generate`` drains (so
  streamed and non-streamed results are identical) and yields the typed events of :mod:`decodelab.events`; it keeps
  the final :class:`~decodelab.trace.Generation` in ``.generation``.
- :class:`Stream` (what :meth:`LM.stream` returns) filters those events down to text deltas.

Beam search policy: a delta carries only text that no later step can change, i.e. the common prefix of every
running beam and every finished hypothesis that could still be returned (:class:`~decodelab.search.common.BeamEvent`
``.stable``); the rest of the best sequence comes as the last delta. The current best beam, which may still change
its mind, is reported beside it (:class:`~decodelab.events.BeamUpdate`, ``Delta.best``) for displays that redraw it,
never mixed into the deltas. So for beam search too ``"".join(deltas)`` equals the final best text, and nothing
emitted is ever taken back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .detokenize import (CLEANUP_PATTERNS, CONTEXT_TOKENS, cleans_up_spaces, context_text, continuation_text,
                         prompt_context, valid_length)
from .events import BeamUpdate, Event, Finish, StepDone, TextDelta, TokenEvent, TraceStep
from .search.common import BeamEvent
from .stopping import find_stop, holdback
from .trace import Generation, Step


CHECKPOINT_TOKENS = 4
""":class:`IncrementalDetokenizer` keeps the text of the ids decoded so far and sets a checkpoint after at most this
many more ids (where the text can no longer change), so each token decodes at most ~2 x this many ids plus the
decode context, whatever the length of the generation; it decoded every id so far on every token before."""


class IncrementalDetokenizer:
    """Incremental, UTF-8-safe decoding of one sequence's new ids.

    Args:
        tokenizer: a transformers tokenizer.
        context_ids: the prompt's ids (its last few give the decode context); may be empty.
        stop_strings: text is cut right before the first of these, and a tail that could begin one is held back.
        eos_ids: ids that end a sequence without adding text (the final ``new_text`` leaves out the eos token's
            text even when it is an ordinary token): :meth:`push` ignores them.

    Attributes:
        ids: the new ids seen so far (eos ids left out).
        text: the text emitted so far (``"".join`` of every delta returned).
        end: characters in the text of ``ids`` without a trailing incomplete UTF-8 character (nor a stop-string
            cut), as of the last :meth:`push` / :meth:`set_ids` before a stop string appeared: where the next token's
            text starts.
        stopped: a stop string was found; nothing more is emitted.
    """

    def __init__(self, tokenizer, context_ids: list[int] = (), stop_strings: tuple[str, ...] = (),
                 eos_ids: tuple[int, ...] | set[int] = ()):
        self.tokenizer = tokenizer
        self.context = prompt_context(list(context_ids))
        self.context_text = context_text(tokenizer, self.context)  # decoded once, not on every token
        # the text of ids[:_done] is _done_text; later ids are decoded after _window (the ids before them)
        self._done, self._done_text = 0, ""
        self._window, self._window_text = self.context, self.context_text
        self.stop_strings = tuple(stop_strings)
        self.eos_ids = frozenset(eos_ids)
        self.cleanup = cleans_up_spaces(tokenizer)
        self.ids: list[int] = []
        self.text = ""
        self.end = 0
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
        new = list(ids[:-1] if ids and ids[-1] in self.eos_ids else ids)
        if new[: self._done] != self.ids[: self._done]:  # not an extension after all: decode from the prompt again
            self._done, self._done_text, self._window, self._window_text = 0, "", self.context, self.context_text
        self.ids = new
        return self._emit()

    def text_of(self, ids: list[int]) -> str:
        """``continuation_text`` of ``ids`` after this sequence's prompt context (its text decoded once), from
        scratch: for ids that are not the ones pushed (a beam, the ids before a token)."""
        return continuation_text(self.tokenizer, self.context, ids, self.context_text)

    def full_text(self) -> str:
        """``continuation_text(tokenizer, context_ids, ids)``: the whole text of the ids so far, decoding only the
        ids after the last checkpoint (so each token costs a decode of a few ids, not of everything so far).

        The ids at a checkpoint are never decoded again: their text is kept, and the ids after them are decoded after
        the :data:`~decodelab.detokenize.CONTEXT_TOKENS` ids before them (as the first new ids are decoded after the
        prompt's last ids). A checkpoint is set, at most every :data:`CHECKPOINT_TOKENS` ids, only where the text so
        far can no longer change whatever comes next: it ends with a whole character (no U+FFFD), with no beginning
        of a pattern that the tokenizer's clean-up of spaces rewrites, and the ids before it decode to some text
        (a window of special tokens only would let a decoder strip the next token's leading space)."""
        tail = self.ids[self._done :]
        text = self._done_text + continuation_text(self.tokenizer, self._window, tail, self._window_text)
        if len(tail) >= CHECKPOINT_TOKENS and valid_length(text) == len(text) and not (
                self.cleanup and holdback(text, CLEANUP_PATTERNS)):
            window = self.ids[-CONTEXT_TOKENS:] if len(self.ids) >= CONTEXT_TOKENS else \
                (self.context + self.ids)[-CONTEXT_TOKENS:]
            window_text = context_text(self.tokenizer, window)
            if window_text:
                self._done, self._done_text = len(self.ids), text
                self._window, self._window_text = window, window_text
        return text

    def stable_text(self) -> str:
        """The text of the ids so far minus the tail that may still change (see the module docstring)."""
        full = self.full_text()
        self.end = valid_length(full)
        cut = find_stop(full, self.stop_strings) if self.stop_strings else -1
        if cut >= 0:
            self.stopped = True
            return full[:cut]
        text = full[: self.end]
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


class _Sequence:
    """One sequence streamed while the search runs: its detokenizer and how many of its ids were reported."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop_strings: tuple[str, ...], eos_ids: tuple[int, ...]):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop_strings, eos_ids)
        self.sent: list[int] = []  # ids reported as TokenEvents


class EventStream:
    """The events of one generation (:mod:`decodelab.events`), as an iterator; what :meth:`LM.events` returns.

    Settings and prompts are validated at construction; the model runs only as the iterator is advanced (one
    decoding step per :class:`~decodelab.events.StepDone`). Results equal ``LM.generate`` with the same arguments
    (same ids, texts, scores, trace).

    Args:
        lm: the :class:`~decodelab.lm.LM`.
        prompt: as :meth:`LM.generate`: a string, a list of token ids, or a list of such prompts (one batch).
        kwargs: generation keywords (:meth:`LM.generate`).

    Attributes:
        config: the validated :class:`~decodelab.config.GenerationConfig`.
        prompt_ids: the token ids of each prompt.
        trace: with ``trace=True``, the :class:`~decodelab.trace.Trace` being filled while the stream runs; else
            ``None``.
        generation: the final :class:`~decodelab.trace.Generation`, set before the first
            :class:`~decodelab.events.Finish` is yielded; ``None`` until then (and after :meth:`close` before it).

    Raises:
        ConfigError, InputError: at construction, as :meth:`LM.generate` documents.
    """

    def __init__(self, lm, prompt, kwargs: dict[str, Any]):
        self.lm = lm
        self.trace = None
        self._run = lm._run(prompt, kwargs, on_trace=self._set_trace)  # validates now; search starts at next()
        self.config = self._run.config
        self.prompt_ids: list[list[int]] = self._run.prompt_ids
        self.generation: Generation | None = None
        self._pieces: dict[int, str] = {}
        self._events = self._drive()

    def _set_trace(self, trace) -> None:
        self.trace = trace

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Stop the generation (no further model step runs; batching rows are released). Idempotent."""
        self._events.close()
        self._run.close()

    # -- the driver ------------------------------------------------------------------------------------------------
    def _piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.lm.tokenizer.decode([token_id])
        return piece

    def _tokens(self, i: int, seq: _Sequence, ids: list[int], step: int | None) -> Iterator[TokenEvent]:
        """TokenEvents for the ids of ``ids`` beyond those already reported (offsets decoded token by token)."""
        eos = seq.detok.eos_ids
        for n in range(len(seq.sent), len(ids)):
            text_ids = [t for t in ids[:n] if t not in eos]
            offset = valid_length(seq.detok.text_of(text_ids)) if text_ids else 0
            seq.sent.append(ids[n])
            yield TokenEvent(i, step, ids[n], self._piece(ids[n]), offset)

    def _drive(self) -> Iterator[Event]:
        run, cfg, tok = self._run, self.config, self.lm.tokenizer
        eos = self.lm.stop_ids(cfg)
        beam_n = cfg.num_return_sequences if cfg.is_beam else 1
        # sequence index -> state, for the sequences streamed while the search runs (see decodelab.events)
        if cfg.is_beam:
            streamed = {b * beam_n: _Sequence(tok, ids, cfg.stop_strings, eos) for b, ids in enumerate(run.prompt_ids)}
        else:
            streamed = {r: _Sequence(tok, run.prompt_ids[r // run.per_prompt], cfg.stop_strings, eos)
                        for r in range(len(run.prompt_ids) * run.per_prompt)}
        recorded = 0  # trace steps already reported
        step = 0
        while True:
            try:
                event = next(run)  # Run.__next__: the step single-threaded, as in generate
            except StopIteration as done:
                self.generation = done.value
                break
            records: list[Step] = self.trace.steps[recorded:] if self.trace is not None else []
            recorded += len(records)
            for rec in records:
                yield TraceStep(rec)
            if isinstance(event, BeamEvent):
                for b, (best, stable) in enumerate(zip(event.best, event.stable)):
                    i = b * beam_n
                    seq = streamed[i]
                    text = seq.detok.set_ids(stable)
                    yield BeamUpdate(step, b, i, tuple(best), seq.detok.text_of(best),
                                     tuple(stable), seq.detok.text)
                    yield from self._tokens(i, seq, stable, step)
                    if text:
                        yield TextDelta(i, text, step)
            else:
                tokens, running = event
                by_row = {rec.row: rec for rec in records}
                for r, (t, alive) in enumerate(zip(tokens, running)):
                    if not alive:
                        continue
                    seq = streamed[r]
                    offset = seq.detok.end
                    text = seq.detok.push(t)
                    seq.sent.append(t)
                    rec = by_row.get(r)
                    yield TokenEvent(r, step, t, self._piece(t), offset, None if rec is None else rec.logprob,
                                     None if rec is None else tuple(rec.top))
                    if text:
                        yield TextDelta(r, text, step)
            yield StepDone(step)
            step += 1
        gen = self.generation
        for i, final in enumerate(gen.sequences):
            seq = streamed.get(i) or _Sequence(tok, gen.prompt_ids[final.prompt_index], cfg.stop_strings, eos)
            yield from self._tokens(i, seq, final.new_ids, None)
            text = seq.detok.finish(final.new_text)
            if text:
                yield TextDelta(i, text, None)
            yield Finish(i, final.prompt_index, final.finish_reason, final.new_text, tuple(final.new_ids), gen)


@dataclass
class Delta:
    """One streamed piece of text (:meth:`Stream.deltas`).

    Attributes:
        index: which sequence of the final ``Generation.sequences`` it belongs to.
        text: the new text ("" only when :meth:`Stream.deltas` is asked for every step).
        best: beam search: with ``every_step=True`` the current best beam's whole new text so far (it may change,
            and need not extend what was emitted), and on the last delta the final text; otherwise ``None``.
        step: 0-based decoding step that produced it (``None`` for the final flush).
    """

    index: int
    text: str
    best: str | None = None
    step: int | None = None


class Stream:
    """Iterator over the text deltas of the first sequence of a generation: a filter over :class:`EventStream`
    (:meth:`LM.events`); ``.generation`` holds the result after the iterator is exhausted.

    ``for delta in lm.stream(prompt, **kw)`` yields non-empty strings whose concatenation equals
    ``lm.generate(prompt, **kw).sequences[0].new_text`` (same settings and seed: the same result). Use
    :meth:`deltas` instead to follow every returned sequence (``num_return_sequences`` > 1, or a list of prompts);
    iterate one or the other, not both.

    Args:
        lm: the :class:`~decodelab.lm.LM`.
        prompt: a string (or a list of strings, streamed by :meth:`deltas`).
        kwargs: generation keywords, validated here (before the first token), as :meth:`LM.generate` does.

    Attributes:
        events: the underlying :class:`EventStream`.
        config: the validated settings.

    Raises:
        ConfigError, InputError: at construction, for bad settings or prompts.
    """

    def __init__(self, lm, prompt: str | list[str], kwargs: dict[str, Any]):
        self.events = EventStream(lm, prompt, kwargs)
        self.config = self.events.config
        self._deltas: Iterator[Delta] | None = None
        self._first: Iterator[str] | None = None

    @property
    def trace(self):
        """With ``trace=True``, the :class:`~decodelab.trace.Trace` being filled while the stream runs (its
        ``steps`` grow as tokens are chosen); else ``None``."""
        return self.events.trace

    @property
    def generation(self) -> Generation | None:
        """The final result once the iterator is exhausted; ``None`` before (and after an early :meth:`close`)."""
        return self.events.generation

    # -- the plain iterator: first sequence, non-empty text deltas ---------------------------------------------------
    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self._first is None:
            self._first = (e.text for e in self.events if isinstance(e, TextDelta) and e.index == 0)
        return next(self._first)

    def text(self) -> str:
        """Run to the end and return the first sequence's whole new text (the join of the remaining deltas)."""
        return "".join(self)

    def close(self) -> None:
        """Stop the generation early (no further model step runs); ``.generation`` stays ``None``."""
        for it in (self._first, self._deltas):
            if it is not None:
                it.close()
        self.events.close()

    # -- every sequence ------------------------------------------------------------------------------------------
    def deltas(self, every_step: bool = False) -> Iterator[Delta]:
        """Deltas of every sequence, in the order they become stable; the last ones (one per sequence with text
        left, in sequence order) come when the search has finished, and then ``.generation`` is set.

        With ``every_step=True`` a :class:`Delta` is yielded per streamed sequence and step even when its text is
        empty, so a display can redraw ``Delta.best`` (beam search) as it changes. The first call decides
        ``every_step``; later calls (and the plain iterator) continue the same deltas.
        """
        if self._deltas is None:
            self._deltas = self._filter(every_step)
        return self._deltas

    def _filter(self, every_step: bool) -> Iterator[Delta]:
        beam = self.config.is_beam
        group = self.config.num_return_sequences if beam else 1  # beam search streams every group's first sequence
        this_step: dict[int, list] = {}  # sequence index -> [text, best] of the current step, in event order
        last: dict[int, str] = {}  # sequence index -> its final delta's text
        for event in self.events:
            if isinstance(event, TokenEvent) and event.step is not None:
                this_step.setdefault(event.index, ["", None])
            elif isinstance(event, BeamUpdate):
                this_step.setdefault(event.index, ["", None])[1] = event.best_text if every_step else None
            elif isinstance(event, TextDelta):
                if event.step is None:
                    last[event.index] = event.text
                else:
                    this_step.setdefault(event.index, ["", None])[0] += event.text
            elif isinstance(event, StepDone):
                for i, (text, best) in this_step.items():
                    if text or every_step:
                        yield Delta(i, text, best, event.step)
                this_step = {}
            elif isinstance(event, Finish):
                text = last.pop(event.index, "")
                if text or (every_step and event.index % group == 0):
                    yield Delta(event.index, text, event.text if beam else None, None)
