"""Worker side of the OpenAI routes: one job = prompts x ``n`` choices, with text deltas and logprobs.

:func:`run_job` is a generator run in the :class:`~decodelab.server.runner.Runner`'s worker thread. It validates
and tokenizes every prompt first and yields :data:`READY` (so a streaming response can still answer 400 for an
empty or over-long prompt), then runs each prompt's :meth:`LM.events` stream one step (``StepDone``) at a time,
yielding a list of :class:`Delta` per step (when streaming; else ``None``, a tick where the runner may stop it), and
returns the :class:`ChoiceResult` list.

Logprobs come from the generation trace (``trace=True, trace_top_k=k``), carried by the events as
``TokenEvent.logprob`` and ``TokenEvent.top`` (``Step.logprob`` and ``Step.top``): the model's raw distribution
(log-softmax of the logits) *before* penalties, logit_bias, temperature and filters. So each position lists exactly
``k`` alternatives, sorted, finite, and the chosen token's logprob equals its entry when it is listed. Offsets are
``TokenEvent.offset``. Which tokens are listed: every generated token whose text starts before the end of the returned text, so
not the end-of-sequence token, and not the tokens after a stop string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generator

from ..detokenize import valid_length
from ..events import Finish, StepDone, TextDelta, TokenEvent
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


def _listed(tokens: list[TokenEvent], final_len: int, reason: str, eos_ids) -> int:
    """How many of a sequence's tokens are listed in logprobs (see the module docstring)."""
    count = len(tokens)
    if reason == "eos" and count and tokens[-1].id in eos_ids:
        count -= 1
    if reason == "stop":
        while count and tokens[count - 1].offset >= final_len:
            count -= 1
    return count


class _Choice:
    """One generated sequence as the job sees it: its tokens so far, and what of it was sent."""

    def __init__(self) -> None:
        self.tokens: list[TokenEvent] = []
        self.sent_chars = 0  # characters of text sent in deltas
        self.sent_tokens = 0  # tokens sent with logprobs


def run_job(lm, job: Job) -> Generator[Any, None, list[ChoiceResult]]:
    """Run ``job`` (see the module docstring). Raises ConfigError / InputError before yielding READY."""
    kwargs = dict(job.kwargs)
    job.prompt_ids = [lm.prompt_ids(p) for p in job.prompts]
    if kwargs.get("max_new_tokens") is None:
        room = (lm.context_window or 10**9) - max(len(ids) for ids in job.prompt_ids)
        kwargs["max_new_tokens"] = max(1, min(job.default_max_tokens, room))
    if job.logprobs is not None:
        kwargs.update(trace=True, trace_top_k=job.logprobs)
    runs = []  # one event stream per prompt, validated now (nothing runs on the model before its first event)
    try:
        for ids in job.prompt_ids:  # the ids just computed: each prompt is tokenized once
            runs.append(lm.events(ids, **kwargs))
        infos = _Infos(lm.tokenizer)
        if job.echo_logprobs:
            job.prompt_tokens_info = [
                prompt_logprobs(lm, p if isinstance(p, str) else None, ids, job.logprobs or 0, infos)
                for p, ids in zip(job.prompts, job.prompt_ids)]
        yield READY
        results: list[ChoiceResult] = []
        for p, events in enumerate(runs):
            results.extend((yield from _run_prompt(lm, job, p, events, infos)))
    finally:
        for events in runs:
            events.close()
    job.results = results
    return results


def _run_prompt(lm, job: Job, p: int, events, infos: _Infos) -> Generator[Any, None, list[ChoiceResult]]:
    """The choices of prompt ``p``: yields a list of :class:`Delta` per step (streaming, token search), else
    ``None`` per step; then (streaming) the last deltas with the finish reasons."""
    cfg = events.config
    eos_ids = set(lm.stop_ids(cfg))
    stream_rows = job.stream and not cfg.is_beam  # beam search: the whole text comes at the end
    base = p * job.n

    def indices(j: int) -> list[int]:  # choice indices of sequence / row j (greedy: repeated n times)
        return [base + c for c in range(job.repeat)] if job.repeat > 1 else [base + j]

    choices: dict[int, _Choice] = {}
    this_step: dict[int, str] = {}  # sequence index -> its text of the current step (rows in order)
    results: list[ChoiceResult] = []
    final: list[Delta] = []
    for event in events:
        if isinstance(event, TokenEvent):
            choices.setdefault(event.index, _Choice()).tokens.append(event)
            if event.step is not None:
                this_step.setdefault(event.index, "")
        elif isinstance(event, TextDelta) and event.step is not None:
            this_step[event.index] = this_step.get(event.index, "") + event.text
        elif isinstance(event, StepDone):
            deltas = []
            for j, text in this_step.items() if stream_rows else ():
                choice = choices[j]
                choice.sent_chars += len(text)
                new_tokens = []
                if job.logprobs is not None:  # tokens starting inside the sent text are complete
                    while choice.sent_tokens < len(choice.tokens) and \
                            choice.tokens[choice.sent_tokens].offset < choice.sent_chars:
                        new_tokens.append(_token_info(choice.tokens[choice.sent_tokens], infos))
                        choice.sent_tokens += 1
                if text or new_tokens:
                    deltas.extend(Delta(i, text, new_tokens) for i in indices(j))
            this_step = {}
            yield deltas if stream_rows else None
        elif isinstance(event, Finish):
            choice = choices.get(event.index) or _Choice()
            tokens_info = None
            if job.logprobs is not None:
                listed = _listed(choice.tokens, len(event.text), event.finish_reason, eos_ids)
                tokens_info = [_token_info(t, infos) for t in choice.tokens[:listed]]
            reason = finish_reason(event.finish_reason)
            rest = event.text[choice.sent_chars:]
            rest_tokens = tokens_info[choice.sent_tokens:] if tokens_info is not None else []
            for i in indices(event.index):
                results.append(ChoiceResult(i, p, event.text, reason, len(event.ids), tokens_info))
                final.append(Delta(i, rest, rest_tokens, reason))
    if job.stream:
        yield final
    return results


def _token_info(token: TokenEvent, infos: _Infos) -> TokenInfo:
    if token.logprob is None:
        return infos.info(token.id, FLOOR, [], token.offset)
    return infos.info(token.id, token.logprob, token.top, token.offset)


def prompt_logprobs(lm, prompt: str | None, ids: list[int], k: int, infos: _Infos) -> list[TokenInfo]:
    """The prompt tokens' logprobs for ``echo`` (first token: ``None``), from ``LM.score_ids`` (teacher forcing,
    the raw distribution like the generated tokens'); ``offset`` is the token's first character in the prompt."""
    scored = lm.score_ids(ids, top_logprobs=k, text=prompt)
    out = []
    prev = 0
    tok = lm.tokenizer
    for i, (tid, entry) in enumerate(zip(ids, scored.tokens)):
        start = prev
        prev = valid_length(tok.decode(ids[: i + 1], skip_special_tokens=True))
        if i == 0 or entry.logprob is None:
            out.append(infos.info(tid, None, None, start))
        else:
            out.append(infos.info(tid, entry.logprob, list(entry.top)[:k], start))
    return out
