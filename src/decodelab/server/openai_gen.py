"""Worker side of the OpenAI routes: one job = prompts x ``n`` choices, with text deltas and logprobs.

:func:`run_job` is a generator run in the :class:`~decodelab.server.runner.Runner`'s worker thread. It validates
and tokenizes every prompt first and yields :data:`READY` (so a streaming response can still answer 400 for an
empty or over-long prompt), then drives ``LM._run`` one step at a time, yielding a list of :class:`Delta` per step
(when streaming; else ``None``, a tick where the runner may stop it), and returns the :class:`ChoiceResult` list.

Logprobs come from the generation trace (``trace=True, trace_top_k=k``): ``Step.logprob`` and ``Step.top``, the
model's raw distribution (log-softmax of the logits) *before* penalties, logit_bias, temperature and filters. So each
position lists exactly ``k`` alternatives, sorted, finite, and the chosen token's logprob equals its entry when it is
listed. Which tokens are listed: every generated token whose text starts before the end of the returned text, so
not the end-of-sequence token, and not the tokens after a stop string.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Generator

from ..detokenize import REPLACEMENT, continuation_text, prompt_context
from ..streaming import IncrementalDetokenizer
from ..tokens import display_piece, token_bytes

READY = "ready"
FLOOR = -9999.0  # logprob reported instead of a non-finite value (cannot happen with raw logits; a safety net)


@dataclass
class TokenInfo:
    """One listed token: ``token`` is its byte-exact text (``<0xE2>`` escapes for partial UTF-8), ``bytes`` its
    bytes, ``logprob`` natural-log probability (``None``: the first prompt token under echo), ``top`` the
    alternatives as (token, logprob, bytes), best first (``None`` with ``logprob``), ``offset`` its first character
    in the new text (or in the prompt for echoed prompt tokens)."""

    id: int
    token: str
    bytes: list[int]
    logprob: float | None
    top: list[tuple[str, float, list[int]]] | None
    offset: int = 0


@dataclass
class Delta:
    """Streamed piece of choice ``index``: new ``text``, the tokens it completes, and the finish reason (last)."""

    index: int
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class ChoiceResult:
    """One finished choice. ``text`` is the new text (echo is added by the route); ``finish_reason`` is OpenAI's
    (``stop`` for end-of-sequence and stop strings, ``length`` otherwise)."""

    index: int
    prompt_index: int
    text: str
    finish_reason: str
    completion_tokens: int
    tokens: list[TokenInfo] | None = None


@dataclass
class Job:
    """What one request asks the model for.

    Attributes:
        prompts: texts, or lists of token ids (used exactly), to continue (chat: the templated conversation).
        kwargs: ``LM.generate`` keywords (transformers names), already checked by ``LM.config``; ``max_new_tokens``
            ``None`` means "``default_max_tokens``, capped by the room left in the context window" (chat).
        n: choices per prompt.
        repeat: 1, or ``n`` when greedy settings give one sequence that is repeated ``n`` times.
        logprobs: alternatives per token, or ``None`` for no logprobs.
        echo_logprobs: also return the prompt tokens' logprobs (legacy ``echo``).
        stream: compute deltas while generating.
        default_max_tokens: see ``kwargs``.
    """

    prompts: list[str | list[int]]
    kwargs: dict[str, Any]
    n: int = 1
    logprobs: int | None = None
    echo_logprobs: bool = False
    stream: bool = False
    default_max_tokens: int = 256
    repeat: int = 1
    prompt_ids: list[list[int]] = field(default_factory=list)
    prompt_tokens_info: list[list[TokenInfo]] = field(default_factory=list)
    results: list[ChoiceResult] = field(default_factory=list)


def finish_reason(decodelab_reason: str) -> str:
    """decodelab's ``eos`` / ``stop`` / ``length`` -> OpenAI's ``stop`` / ``length``."""
    return "length" if decodelab_reason == "length" else "stop"


def plan_kwargs(lm, kwargs: dict[str, Any], n: int) -> tuple[dict[str, Any], int]:
    """Set ``num_return_sequences`` for ``n`` choices; returns (kwargs, how many times to repeat each result).

    Sampling draws ``n`` sequences (row ``j`` seeded ``seed + j``); beam search returns the ``n`` best beams;
    greedy (temperature 0) computes one sequence and repeats it ``n`` times, as it is deterministic.

    Raises:
        ConfigError: from ``LM.config`` (e.g. ``n`` > ``num_beams`` for beam search).
    """
    probe = dict(kwargs)
    if probe.get("max_new_tokens") is None:
        probe.pop("max_new_tokens", None)
    cfg = lm.config(**probe)
    if cfg.do_sample or cfg.is_beam:
        out = {**kwargs, "num_return_sequences": n}
        lm.config(**{**probe, "num_return_sequences": n})
        return out, 1
    return dict(kwargs), n


class _Infos:
    """Token id -> (display text, bytes), cached for one job."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            raw = token_bytes(self.tokenizer, token_id)
            hit = self.cache[token_id] = (display_piece(raw), list(raw))
        return hit

    def info(self, token_id: int, logprob: float | None, top, offset: int) -> TokenInfo:
        text, raw = self(token_id)
        alts = None if top is None else [(*self(c.id)[:1], _finite(c.logprob), self(c.id)[1]) for c in top]
        return TokenInfo(token_id, text, raw, None if logprob is None else _finite(logprob), alts, offset)


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else FLOOR


def _valid_len(text: str) -> int:
    end = len(text)
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    return end


class _Row:
    """One generated row: its ids, the start offset of each token, the streamed text so far."""

    def __init__(self, lm, prompt_ids: list[int], cfg, stream: bool, want_offsets: bool):
        self.tok = lm.tokenizer
        self.context = prompt_context(prompt_ids)
        self.detok = IncrementalDetokenizer(self.tok, prompt_ids, cfg.stop_strings, lm.stop_ids(cfg)) if stream else None
        self.want_offsets = want_offsets
        self.ids: list[int] = []
        self.starts: list[int] = []
        self.steps: list[Any] = []  # trace Step per token (logprobs)
        self._prev_valid = 0
        self.sent_tokens = 0

    def push(self, token_id: int, step) -> str:
        if self.want_offsets:
            self.starts.append(self._prev_valid)
        self.ids.append(token_id)
        self.steps.append(step)
        if self.want_offsets and self.detok is not None:
            self._prev_valid = _valid_len(continuation_text(self.tok, self.context, self.ids))
        return self.detok.push(token_id) if self.detok is not None else ""

    def compute_starts(self) -> None:
        """Start offsets of every token (non-streaming path: computed once at the end)."""
        self.starts = []
        for i in range(len(self.ids)):
            self.starts.append(_valid_len(continuation_text(self.tok, self.context, self.ids[:i])) if i else 0)


def _listed(row: _Row, final_len: int, reason: str, eos_ids) -> int:
    """How many of the row's tokens are listed in logprobs (see the module docstring)."""
    count = len(row.ids)
    if reason == "eos" and count and row.ids[-1] in eos_ids:
        count -= 1
    if reason == "stop":
        while count and row.starts[count - 1] >= final_len:
            count -= 1
    return count


def _start_run(lm, prompt: str | list[int], kwargs: dict[str, Any]):
    """``LM._run`` with access to its trace while it runs: (events iterator, trace getter)."""
    traces: list = []
    if "on_trace" in inspect.signature(lm._run).parameters:
        run = lm._run(prompt, kwargs, on_trace=traces.append)
    else:
        run = lm._run(prompt, kwargs)
    events = getattr(run, "events", run)
    return events, (lambda: getattr(run, "trace", None) or (traces[0] if traces else None))


def run_job(lm, job: Job) -> Generator[Any, None, list[ChoiceResult]]:
    """Run ``job`` (see the module docstring). Raises ConfigError / InputError before yielding READY."""
    kwargs = dict(job.kwargs)
    job.prompt_ids = [lm.prompt_ids(p) for p in job.prompts]
    if kwargs.get("max_new_tokens") is None:
        room = (lm.context_window or 10**9) - max(len(ids) for ids in job.prompt_ids)
        kwargs["max_new_tokens"] = max(1, min(job.default_max_tokens, room))
    for ids in job.prompt_ids:
        lm._check_length(len(ids), kwargs["max_new_tokens"])
    if job.logprobs is not None:
        kwargs.update(trace=True, trace_top_k=job.logprobs)
    cfg = lm.config(**kwargs)
    infos = _Infos(lm.tokenizer)
    if job.echo_logprobs:
        job.prompt_tokens_info = [prompt_logprobs(lm, p if isinstance(p, str) else None, ids, job.logprobs or 0, infos)
                                  for p, ids in zip(job.prompts, job.prompt_ids)]
    yield READY
    eos_ids = set(lm.stop_ids(cfg))
    results: list[ChoiceResult] = []
    stream_rows = job.stream and not cfg.is_beam
    for p, prompt in enumerate(job.prompts):
        base = p * job.n

        def indices(j: int) -> list[int]:  # choice indices of sequence / row j (greedy: repeated n times)
            return [base + c for c in range(job.repeat)] if job.repeat > 1 else [base + j]

        events, get_trace = _start_run(lm, prompt, kwargs)
        rows: list[_Row] = []
        consumed = 0
        while True:
            try:
                event = next(events)
            except StopIteration as done:
                generation = done.value
                break
            if cfg.is_beam or not (isinstance(event, tuple) and len(event) == 2):
                yield None
                continue
            tokens, running = event
            if not rows:
                rows = [_Row(lm, job.prompt_ids[p], cfg, stream_rows, job.logprobs is not None)
                        for _ in tokens]
            steps: dict[int, Any] = {}
            trace = get_trace()
            if trace is not None:
                for s in trace.steps[consumed:]:
                    steps[s.row] = s
                consumed = len(trace.steps)
            deltas = []
            for r, (t, alive) in enumerate(zip(tokens, running)):
                if not alive:
                    continue
                row = rows[r]
                text = row.push(t, steps.get(r))
                if not stream_rows:
                    continue
                new_tokens = []
                if job.logprobs is not None:  # tokens starting inside the emitted text are complete
                    while row.sent_tokens < len(row.ids) and row.starts[row.sent_tokens] < len(row.detok.text):
                        new_tokens.append(_token_info(row, row.sent_tokens, infos))
                        row.sent_tokens += 1
                if text or new_tokens:
                    deltas.extend(Delta(i, text, new_tokens) for i in indices(r))
            yield deltas if stream_rows else None
        final: list[Delta] = []
        for j, seq in enumerate(generation.sequences):
            if j < len(rows):
                row = rows[j]
            else:  # beam search: build the row from the result
                row = _Row(lm, job.prompt_ids[p], cfg, False, job.logprobs is not None)
                row.ids = list(seq.new_ids)
            if job.logprobs is not None and row.detok is None:
                row.compute_starts()
            tokens_info = None
            if job.logprobs is not None:
                listed = _listed(row, len(seq.new_text), seq.finish_reason, eos_ids)
                tokens_info = [_token_info(row, i, infos) for i in range(listed)]
            reason = finish_reason(seq.finish_reason)
            if job.stream:
                rest = row.detok.finish(seq.new_text) if row.detok is not None else seq.new_text
                rest_tokens = tokens_info[row.sent_tokens:] if tokens_info is not None else []
            for i in indices(j):
                results.append(ChoiceResult(i, p, seq.new_text, reason, len(seq.new_ids), tokens_info))
                if job.stream:
                    final.append(Delta(i, rest, rest_tokens, reason))
        if job.stream:
            yield final
    job.results = results
    return results


def _token_info(row: _Row, i: int, infos: _Infos) -> TokenInfo:
    step = row.steps[i] if i < len(row.steps) else None
    if step is None:
        return infos.info(row.ids[i], FLOOR, [], row.starts[i])
    return infos.info(row.ids[i], step.logprob, step.top, row.starts[i])


def prompt_logprobs(lm, prompt: str | None, ids: list[int], k: int, infos: _Infos) -> list[TokenInfo]:
    """The prompt tokens' logprobs for ``echo`` (first token: ``None``), from ``LM.score_ids`` (teacher forcing,
    the raw distribution like the generated tokens'); ``offset`` is the token's first character in the prompt."""
    scored = lm.score_ids(ids, top_logprobs=k, text=prompt)
    out = []
    prev = 0
    tok = lm.tokenizer
    for i, (tid, entry) in enumerate(zip(ids, scored.tokens)):
        start = prev
        prev = _valid_len(tok.decode(ids[: i + 1], skip_special_tokens=True))
        if i == 0 or entry.logprob is None:
            out.append(infos.info(tid, None, None, start))
        else:
            out.append(infos.info(tid, entry.logprob, list(entry.top)[:k], start))
    return out
