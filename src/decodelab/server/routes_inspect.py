"""Inspection API for the web playground: ``POST /api/tokenize``, ``/api/next-token``, ``/api/generate``,
``/api/generate/stream``, ``/api/score``, and ``GET /api/knobs`` (the generation knobs' metadata).

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
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, StrictInt, create_model

from ..config import GenerationConfig
from ..errors import ConfigError
from ..events import StepDone
from ..knobs import knob_table
from .errors import ERROR_RESPONSES, exception_payload
from .reshape import Warpers, before_after, logit_summary
from .schemas import RequestModel, knob_field

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
    top_k: StrictInt = Field(10, ge=1, le=200, description="How many of the most likely tokens to list (raw order).")
    temperature: float | None = Field(
        None, description="Divide the logits by this (transformers TemperatureLogitsWarper); 0 = greedy. Default 1.")
    top_k_filter: StrictInt | None = Field(
        None, description="Keep only the k most likely tokens (transformers TopKLogitsWarper); 0 or null = off.")
    top_p: float | None = Field(None, description="Nucleus filter (TopPLogitsWarper) in (0, 1]; default 1 = off.")
    min_p: float | None = Field(None, description="Drop tokens below min_p x the top probability (MinPLogitsWarper).")
    logits_k: StrictInt = Field(
        200, ge=1, le=2000,
        description="How many of the highest raw logits to return exactly in `logits.candidates`; the rest come as a "
                    "histogram (`logits.tail`), enough for the page to redo the reshaping client-side.")


# the server's caps on /api/generate: knob -> (largest value, where it comes from); lower than GenerationConfig's own
def _caps(max_tokens: int, max_n: int) -> dict[str, tuple[int, str]]:
    return {"max_new_tokens": (max_tokens, "--max-tokens"), "num_beams": (max_n, "--max-n"),
            "num_return_sequences": (max_n, "--max-n"), "trace_top_k": (MAX_TRACE_TOP_K, "fixed"),
            "lens": (MAX_LENS_TOP_K, "fixed")}


class _GenerateBase(RequestModel):
    prompt: str = Field(..., description="Text to continue.")

    def kwargs(self, max_tokens: int, max_n: int) -> dict[str, Any]:
        """``LM.generate`` keywords with ``trace=True``, after the server's caps.

        Raises:
            ConfigError: ``max_new_tokens`` above ``max_tokens``, ``num_beams`` / ``num_return_sequences`` above
                ``max_n``, ``trace_top_k`` above :data:`MAX_TRACE_TOP_K`, ``lens`` above :data:`MAX_LENS_TOP_K`.
        """
        kw = self.model_dump(exclude={"prompt"}, exclude_none=True)
        for name, (cap, flag) in _caps(max_tokens, max_n).items():
            value = kw.get(name)
            if isinstance(value, int) and value > cap:
                raise ConfigError(f"invalid {name}={value}: this server allows at most {cap} ({flag})", param=name)
        return {**kw, "trace": True}


def _generate_fields() -> dict[str, tuple[Any, Any]]:
    """One optional field per knob with ``api=True`` (decodelab.knobs), in GenerationConfig's order."""
    notes = {name: f" Capped by {'the server' if flag == 'fixed' else flag}" + (f" (at most {cap})." if flag ==
             "fixed" else ".") for name, (cap, flag) in _caps(0, 0).items()}
    return {name: knob_field(name, notes.get(name, "")) for name, k in GenerationConfig.knobs().items() if k.api}


GenerateRequest = create_model(
    "GenerateRequest", __base__=_GenerateBase, __doc__="A traced generation (``LM.generate(prompt, trace=True, "
    "...)``): every GenerationConfig knob exposed to /api/generate by its metadata (decodelab.knobs), under its own "
    "name. ``null`` = the knob's default.", **_generate_fields())


class ScoreRequest(RequestModel):
    """Text to score token by token (teacher forcing)."""

    text: str = Field(..., description="The text; every token after the first gets a log-probability.")
    top_logprobs: StrictInt = Field(5, ge=0, le=20, description="Alternatives listed per position.")


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


@router.get("/knobs", summary="Every generation knob, with its metadata")
async def knobs(request: Request) -> dict:
    """``{"knobs": [...]}``: every :class:`~decodelab.GenerationConfig` field as :func:`decodelab.knobs.knob_table`
    describes it (name, doc, kind, group, default, bounds, CLI flag, OpenAI name, ``api``, playground control, and
    why a surface leaves it out), plus ``server_max``: this server's cap on ``/api/generate`` (``--max-tokens``,
    ``--max-n``, fixed caps), or ``null``. The playground builds and bounds its generation controls from it."""
    caps = _caps(*_limits(request))
    rows = knob_table(GenerationConfig)
    for row in rows:
        row["server_max"] = caps[row["name"]][0] if row["name"] in caps else None
    return {"knobs": rows}


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
