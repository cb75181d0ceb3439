"""Inspection API for the web playground: ``POST /api/tokenize``, ``/api/next-token``, ``/api/generate``,
``/api/generate/stream``, ``/api/score``.

Parameter names are decodelab's / transformers' (``max_new_tokens``, ``num_beams``, ``top_p``...), not OpenAI's.
Every model call goes through ``app.state.runner`` (one at a time, queued, with the server's timeout); bad values
raise :class:`~decodelab.errors.DecodelabError` and come back as a 400 ``{"error": {...}}`` naming the parameter;
so do wrong JSON types, unknown fields and text that is not valid Unicode (a lone surrogate).

``/api/next-token`` returns the raw top-k *and* the same tokens after temperature / top-k / top-p / min-p (computed
on the full vocabulary by :mod:`decodelab.server.reshape`, i.e. by decodelab's own warpers), plus a compact summary
of all the logits so that the page can reshape the distribution again without another forward pass.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from ..errors import ConfigError
from ..events import StepDone
from .errors import ERROR_RESPONSES, exception_payload
from .reshape import Warpers, before_after, logit_summary
from .schemas import RequestModel

router = APIRouter(prefix="/api", tags=["inspect"], responses=ERROR_RESPONSES)

MAX_TRACE_TOP_K = 50  # alternatives recorded per generated token (trace_top_k)
MAX_LENS_TOP_K = 20  # tokens per layer and step of the logit lens (lens)


# --- request bodies ------------------------------------------------------------------------------------------------
class TokenizeRequest(RequestModel):
    """Text to split into tokens."""

    text: str = Field(..., description="The text; the tokenizer's special tokens (e.g. BOS) are added as usual.")


class NextTokenRequest(RequestModel):
    """Next-token distribution after ``text``, before and after the sampling warpers."""

    text: str = Field(..., description="The context; the distribution is for the token that follows it.")
    top_k: int = Field(10, ge=1, le=200, description="How many of the most likely tokens to list (raw order).")
    temperature: float | None = Field(
        None, description="Divide the logits by this (transformers TemperatureLogitsWarper); 0 = greedy. Default 1.")
    top_k_filter: int | None = Field(
        None, description="Keep only the k most likely tokens (transformers TopKLogitsWarper); 0 or null = off.")
    top_p: float | None = Field(None, description="Nucleus filter (TopPLogitsWarper) in (0, 1]; default 1 = off.")
    min_p: float | None = Field(None, description="Drop tokens below min_p x the top probability (MinPLogitsWarper).")
    logits_k: int = Field(
        200, ge=1, le=2000,
        description="How many of the highest raw logits to return exactly in `logits.candidates`; the rest come as a "
                    "histogram (`logits.tail`), enough for the page to redo the reshaping client-side.")


class GenerateRequest(RequestModel):
    """A traced generation (``LM.generate(prompt, trace=True, ...)``). ``null`` = transformers' default."""

    prompt: str = Field(..., description="Text to continue.")
    max_new_tokens: int | None = Field(None, description="New tokens at most (default 20; capped by --max-tokens).")
    do_sample: bool | None = Field(None, description="Sample (true) or search deterministically (false, default).")
    num_beams: int | None = Field(None, description="Beam width; > 1 is beam search (capped by --max-n).")
    num_return_sequences: int | None = Field(None, description="Sequences to return (beam: <= num_beams).")
    temperature: float | None = Field(None, description="Sampling temperature (0 = greedy).")
    top_k: int | None = Field(None, description="Sampling: keep the k most likely tokens (0 = off; default 50).")
    top_p: float | None = Field(None, description="Sampling: nucleus mass in (0, 1].")
    min_p: float | None = Field(None, description="Sampling: relative probability floor in [0, 1].")
    repetition_penalty: float | None = Field(None, description="CTRL repetition penalty (> 1 discourages repeats).")
    no_repeat_ngram_size: int | None = Field(None, description="Forbid repeating any n-gram of this size.")
    length_penalty: float | None = Field(None, description="Beam search: score = logprob sum / length ** this.")
    early_stopping: bool | Literal["never"] | None = Field(None, description="Beam search stopping rule.")
    seed: int | None = Field(None, description="Sampling seed (same seed, same text).")
    stop_strings: str | list[str] | None = Field(None, description="Stop when the text contains one of these.")
    trace_top_k: int | None = Field(None, description=f"Alternatives recorded per step (default 10, <= {MAX_TRACE_TOP_K}).")
    json_schema: dict[str, Any] | bool | str | None = Field(
        None, description="Constrain the new text to JSON valid under this JSON Schema (an object, or its JSON text); "
                          "the trace then records, per step, the allowed count, the forbidden candidates and the "
                          "probability mass removed, and the JSON path.")
    regex: str | None = Field(None, description="Constrain the new text to match this regular expression.")
    grammar: str | None = Field(None, description="Constrain the new text to this Lark or GBNF grammar.")
    lens: int | None = Field(None, description=f"Logit lens: each layer's top tokens per step in trace.lens "
                                               f"(0 or null: off; <= {MAX_LENS_TOP_K}).")

    def kwargs(self, max_tokens: int, max_n: int) -> dict[str, Any]:
        """``LM.generate`` keywords with ``trace=True``, after the server's caps.

        Raises:
            ConfigError: ``max_new_tokens`` above ``max_tokens``, ``num_beams`` / ``num_return_sequences`` above
                ``max_n``, ``trace_top_k`` above :data:`MAX_TRACE_TOP_K`.
        """
        kw = self.model_dump(exclude={"prompt"}, exclude_none=True)
        caps = {"max_new_tokens": (max_tokens, "--max-tokens"), "num_beams": (max_n, "--max-n"),
                "num_return_sequences": (max_n, "--max-n"), "trace_top_k": (MAX_TRACE_TOP_K, "fixed"),
                "lens": (MAX_LENS_TOP_K, "fixed")}
        for name, (cap, flag) in caps.items():
            value = kw.get(name)
            if isinstance(value, int) and value > cap:
                raise ConfigError(f"invalid {name}={value}: this server allows at most {cap} ({flag})", param=name)
        return {**kw, "trace": True}


class ScoreRequest(RequestModel):
    """Text to score token by token (teacher forcing)."""

    text: str = Field(..., description="The text; every token after the first gets a log-probability.")
    top_logprobs: int = Field(5, ge=0, le=20, description="Alternatives listed per position.")


# --- blocking jobs (run in the runner's worker thread) -----------------------------------------------------------
def _next_token_job(lm, body: NextTokenRequest, warpers: Warpers) -> dict:
    ids, last = lm.next_logits(body.text)  # (V,) float32
    shown = before_after(last, warpers, body.top_k, lm.tokenizer)
    return {
        "model": lm.name,
        "text": body.text,
        "ids": ids,
        "logits_shape": [1, len(ids), int(last.shape[-1])],
        "vocab_size": int(last.shape[-1]),
        "settings": warpers.as_dict(),
        **shown,
        "logits": logit_summary(last, body.logits_k, lm.tokenizer),
    }


def _generation_steps(lm, prompt: str, kwargs: dict):
    """Generator for ``runner.drive``: one yield per decoding step (``StepDone``), returns
    ``Generation.to_dict()``."""
    events = lm.events(prompt, **kwargs)
    try:
        for event in events:
            if isinstance(event, StepDone):
                yield
    finally:
        events.close()
    return events.generation.to_dict()


def _stream_events(lm, prompt: str, kwargs: dict):
    """NDJSON events of a streamed generation (first sequence): start, deltas, done with the full generation.
    The deltas are ``LM.stream(...).deltas(every_step=True)``, a filter over ``LM.events``."""
    stream = lm.stream(prompt, **kwargs)
    yield {"type": "start", "config": stream.config.to_dict()}
    for d in stream.deltas(every_step=True):
        if d.index == 0:
            yield {"type": "delta", "text": d.text, "best": d.best, "step": d.step}
    yield {"type": "done", "generation": stream.generation.to_dict()}


# --- routes -------------------------------------------------------------------------------------------------------
def _limits(request: Request) -> tuple[int, int]:
    s = request.app.state.settings
    return int(getattr(s, "max_tokens", 1024)), int(getattr(s, "max_n", 8))


async def _wait_disconnect(request: Request) -> None:
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


@router.post("/tokenize", summary="The tokens of a text")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    """``Tokens.to_dict()`` plus the model name: ``ids``, ``pieces`` (``decode([id])``), ``display`` (byte-exact:
    ``<0xNN>`` escapes for partial UTF-8), ``piece_bytes``, ``offsets`` (character spans in ``text``), ``special``."""
    lm = request.app.state.lm
    tokens = await request.app.state.runner.run(lm.tokenize, body.text)
    return {"model": lm.name, **tokens.to_dict()}


@router.post("/next-token", summary="Next-token distribution, before and after temperature / top-k / top-p / min-p")
async def next_token(body: NextTokenRequest, request: Request) -> dict:
    """One forward pass over ``text``. Returns ``top`` (the raw ``top_k``: id, token, display, special, logit, prob,
    logprob), ``after`` (the same tokens after the warpers, in transformers' order temperature -> top-k -> top-p ->
    min-p, computed on the whole vocabulary: ``kept``, renormalised ``prob``, processed ``score``), ``kept_count``,
    ``entropy`` / ``entropy_after`` (nats), and ``logits``: the ``logits_k`` highest raw logits exactly plus a
    histogram of the rest (``tail.bins``: ``[mean logit, count]``) from which the page recomputes ``after`` for
    other settings without the model."""
    warpers = Warpers.validated(body.temperature, body.top_k_filter, body.top_p, body.min_p)
    lm = request.app.state.lm
    return await request.app.state.runner.run(_next_token_job, lm, body, warpers)


@router.post("/generate", summary="Generate with the full trace")
async def generate(body: GenerateRequest, request: Request) -> dict:
    """``LM.generate(prompt, trace=True, ...)`` as ``Generation.to_dict()``: ``sequences`` (ids, text, new_ids,
    new_text, score, finish_reason) and ``trace`` (strategy, per-step chosen token with its raw and processed
    log-probability, rank, entropy, top alternatives before and after the processors, processor changes; for beam
    search every node of the beam tree with its status ``kept`` / ``pruned`` / ``finished`` / ``returned``)."""
    kwargs = body.kwargs(*_limits(request))
    lm = request.app.state.lm
    return await request.app.state.runner.drive(lambda: _generation_steps(lm, body.prompt, kwargs),
                                                disconnected=lambda: _wait_disconnect(request))


@router.post(
    "/generate/stream",
    summary="Generate with the full trace, streamed as NDJSON",
    responses={200: {"description": "application/x-ndjson: one JSON object per line",
                     "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}},
)
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """The same generation as ``/api/generate``, as newline-delimited JSON events: ``{"type": "start", "config"}``,
    then ``{"type": "delta", "text", "best", "step"}`` per step of the first sequence (``"".join`` of the texts is its
    ``new_text``; ``best`` is beam search's current best beam, which may still change), then
    ``{"type": "done", "generation": Generation.to_dict()}``. Errors before the first event are ordinary error
    responses; later ones arrive as ``{"type": "error", "error": {...}}``."""
    kwargs = body.kwargs(*_limits(request))
    lm = request.app.state.lm
    events = request.app.state.runner.stream(lambda: _stream_events(lm, body.prompt, kwargs))
    first = await events.__anext__()  # validation errors surface here, as a normal 400

    async def lines() -> AsyncIterator[str]:
        try:
            yield json.dumps(first) + "\n"
            async for event in events:
                yield json.dumps(event) + "\n"
        except Exception as exc:  # the 200 is already out: report in-band
            _, payload = exception_payload(exc)
            yield json.dumps({"type": "error", **payload}) + "\n"
        finally:
            await events.aclose()

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/score", summary="Per-token log-probabilities of a text")
async def score(body: ScoreRequest, request: Request) -> dict:
    """``LM.score(text, top_logprobs=...)``: per token its logprob (nats; ``null`` for the first), rank, entropy
    (nats) and top alternatives; ``total_logprob``, ``mean_logprob``, ``perplexity`` (``exp(-mean)``)."""
    lm = request.app.state.lm
    result = await request.app.state.runner.run(lm.score, body.text, top_logprobs=body.top_logprobs)
    return result.to_dict()
