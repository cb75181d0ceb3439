"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

OpenAI -> decodelab (transformers names): ``max_tokens`` -> ``max_new_tokens`` (default 16 for completions; for
chat the server's ``chat_default_max_tokens`` capped by the context left); ``temperature`` (default 1.0) with
``do_sample=True``, 0 meaning greedy; ``top_k`` 0 (off) unless given, since OpenAI has no top-k; ``n`` ->
``num_return_sequences`` (greedy: one sequence repeated); ``stop`` -> ``stop_strings``; ``seed``, ``top_p``,
penalties and ``logit_bias`` keep their names; ``max_completion_tokens`` is ``max_tokens`` (and wins when both are
given). vLLM's extensions: ``ignore_eos``, and ``stop_token_ids`` -> ``eos_token_id`` (the model's eos ids plus
these; with ``ignore_eos`` only these). ``prompt`` may be token ids (a list, or a list of lists), used exactly.
Structured output: ``response_format`` (``json_object``, or ``json_schema`` with ``strict``) becomes ``json_schema``;
the extensions ``regex`` and ``grammar`` pass through; an invalid or unenforceable schema is a 400 naming
``response_format``; a reply cut by ``max_tokens`` before the value is complete has ``finish_reason: length``.
``finish_reason`` is ``stop`` for end-of-sequence, stop strings and stop token ids, ``length`` otherwise. An empty
prompt is a 400 (nothing to continue from), as is every other invalid body (:mod:`decodelab.server.errors`). The
``model`` field is accepted and never used to load anything: every name uses the model the server started with,
whose name every response reports.

Logprobs: the model's raw distribution, before penalties, temperature and filters (see
:mod:`decodelab.server.openai_gen`). Legacy ``text_offset`` values index into the choice's returned ``text``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..config import GenerationConfig
from ..errors import ConfigError, DecodelabError, InputError
from ..grammar import ANY_JSON_OBJECT, check_openai_strict
from .errors import ERROR_RESPONSES, exception_payload
from .openai_gen import READY, ChoiceResult, Delta, Job, TokenInfo, plan_kwargs, run_job
from .schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)

router = APIRouter(tags=["openai"])

_STARTED = int(time.time())
# One server-sent event: `data` is a JSON chunk (the object's `.chunk` type), an error object, or `[DONE]` last.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
_STREAM_DOC = {200: {"description": "JSON, or with `stream: true` server-sent events ending with `data: [DONE]`",
                     "content": {"text/event-stream": {"schema": _SSE_EVENT}}}}
_KNOBS = GenerationConfig.knobs()
# decodelab name -> OpenAI name, to report errors in the caller's terms (from the knobs' metadata; json_schema's
# response_format is renamed by _plan, which knows whether the caller sent one)
_OPENAI_NAMES = {name: k.openai for name, k in _KNOBS.items()
                 if k.openai not in (None, "extension", name, "response_format")}
_OURS = re.compile(r"\b(" + "|".join(_OPENAI_NAMES) + r")\b")
# knobs set from the body below rather than copied: max_tokens (an argument), n (plan_kwargs), stop_token_ids,
# logprobs (run_job's trace_top_k) and response_format
_DERIVED = {"max_new_tokens", "num_return_sequences", "eos_token_id", "trace_top_k", "json_schema"}
# knob -> the body field copied into it when given: the extensions under their own name, the rest renamed
_COPIED = {name: name if k.openai == "extension" else k.openai for name, k in _KNOBS.items()
           if k.openai is not None and name not in _DERIVED}


def _ctx(request: Request):
    state = request.app.state
    return state.lm, state.settings, state.runner


def _model_name(request: Request) -> str:
    return request.app.state.settings.model or request.app.state.lm.name


@router.get("/v1/models", response_model=ModelList, summary="The one model this server runs")
async def list_models(request: Request) -> ModelList:
    """A list with the single model loaded at start (any ``model`` name in a request uses it)."""
    return ModelList(data=[ModelCard(id=_model_name(request), created=_STARTED)])


def _renamed(exc: DecodelabError) -> DecodelabError:
    """The same error with decodelab's parameter names replaced by the OpenAI names the caller used
    (``max_new_tokens=`` -> ``max_tokens=``; ``param`` likewise)."""
    message = _OURS.sub(lambda m: _OPENAI_NAMES[m.group(1)], str(exc))
    param = _OPENAI_NAMES.get(exc.param or "", exc.param)
    if message == str(exc) and param == exc.param:
        return exc
    return type(exc)(message, param=param)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, param=param)


def _max_tokens(body) -> tuple[int | None, str]:
    """(the requested new-token limit, the name the caller gave it): ``max_completion_tokens`` wins over
    ``max_tokens``, as in OpenAI's API."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return body.max_tokens, "max_tokens"


def _generation_kwargs(body, request: Request, max_tokens: int | None, n: int) -> dict[str, Any]:
    """OpenAI body -> ``LM.generate`` keywords, with the server's bounds checked (ConfigError -> 400)."""
    settings = request.app.state.settings
    name = _max_tokens(body)[1]
    _check(max_tokens is None or max_tokens <= settings.max_tokens, name,
           f"invalid {name}={max_tokens}: this server allows at most {settings.max_tokens} (--max-tokens)")
    _check(body.stream_options is None or bool(body.stream), "stream_options",
           "invalid stream_options: only allowed with stream=true")
    _check(n <= settings.max_n, "n", f"invalid n={n}: this server allows at most {settings.max_n} (--max-n)")
    _check(body.num_beams is None or body.num_beams <= settings.max_n, "num_beams",
           f"invalid num_beams={body.num_beams}: this server allows at most {settings.max_n} (--max-n)")
    kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": True, "temperature": 1.0, "top_k": 0}
    kwargs.update({name: getattr(body, field) for name, field in _COPIED.items() if getattr(body, field) is not None})
    if body.stop_token_ids:  # vLLM: they stop even with ignore_eos, which then drops only the model's eos ids
        eos = [] if body.ignore_eos else list(request.app.state.lm.eos_ids)
        kwargs.update(eos_token_id=[*eos, *body.stop_token_ids], ignore_eos=False)
    schema = _response_schema(body)
    if schema is not None:
        _check(body.regex is None and body.grammar is None, "response_format",
               "invalid response_format: not combinable with regex or grammar (one constraint per request)")
        kwargs["json_schema"] = schema
    return kwargs


def _response_schema(body) -> dict | None:
    """``response_format`` -> the JSON Schema to enforce (``None`` for ``text`` or absent): ``json_object`` is any
    JSON object; ``json_schema`` its ``schema`` (absent: any object), checked against OpenAI's strict-mode rules when
    ``strict`` is true. The schema itself is compiled (and refused when invalid or not enforceable) by
    ``GenerationConfig``.

    Raises:
        ConfigError: ``param="response_format"``: ``json_schema`` missing for type ``json_schema`` or given for
            another type, or a strict schema breaking OpenAI's rules.
    """
    fmt = body.response_format
    if fmt is None:
        return None
    _check((fmt.type == "json_schema") == (fmt.json_schema is not None), "response_format",
           "invalid response_format: 'json_schema' is required with type json_schema and not allowed otherwise"
           if fmt.type == "json_schema" else f"invalid response_format: 'json_schema' is not allowed with type "
           f"{fmt.type}")
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json.loads(ANY_JSON_OBJECT)
    schema = fmt.json_schema.schema_
    if schema is None:
        return json.loads(ANY_JSON_OBJECT)
    if fmt.json_schema.strict:
        check_openai_strict(schema)
    return schema


def _plan(request: Request, body, prompts: list[str | list[int]], max_tokens: int | None, n: int, logprobs: int | None,
          **job_fields) -> Job:
    lm = request.app.state.lm
    _check(logprobs is None or (body.num_beams or 1) == 1, "logprobs",
           "logprobs are not available with beam search (num_beams > 1)")
    try:
        kwargs, repeat = plan_kwargs(lm, _generation_kwargs(body, request, max_tokens, n), n)
    except DecodelabError as exc:
        if exc.param == "json_schema" and body.response_format is not None:  # the caller's name for it
            raise type(exc)(str(exc).replace("invalid json_schema", "invalid response_format", 1),
                            param="response_format") from None
        raise _renamed(exc) from None
    return Job(prompts, kwargs, n=n, logprobs=logprobs, repeat=repeat, stream=bool(body.stream), **job_fields)


async def _wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _execute(request: Request, job: Job) -> list[ChoiceResult]:
    lm, _, runner = _ctx(request)
    try:
        return await runner.drive(lambda: run_job(lm, job), disconnected=lambda: _wait_disconnect(request))
    except DecodelabError as exc:
        raise _renamed(exc) from None


def _usage(job: Job, results: list[ChoiceResult]) -> Usage:
    prompt = sum(len(ids) for ids in job.prompt_ids)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# --- /v1/completions ---------------------------------------------------------------------------------------------
def _legacy(tokens: list[TokenInfo], shift: int) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[None if t.top is None else {tok: lp for tok, lp, _ in t.top} for t in tokens],
        text_offset=[t.offset + shift for t in tokens],
    )


@router.post("/v1/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **_STREAM_DOC},
             summary="Text completion (OpenAI legacy API)")
async def completions(body: CompletionRequest, request: Request):
    """Continue ``prompt``: a string, a list of strings, a list of token ids or a list of token-id lists (ids are
    used exactly; ``echo`` returns their decoded text). ``logprobs`` (0..5) returns the legacy format:
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (token -> logprob, exactly ``logprobs`` entries),
    ``text_offset`` (index into the choice's ``text``). ``echo`` prepends the prompt (and its logprobs, the first
    token's being ``null``). Errors: 400 for any invalid body (wrong JSON types, empty or over-long prompt with the
    token counts, a token id outside the vocabulary, a bad value), 503 queue full."""
    settings = request.app.state.settings
    lm = request.app.state.lm
    prompts = _prompt_list(body.prompt)
    n = body.n or 1
    _check(len(prompts) <= settings.max_prompts, "prompt",
           f"invalid prompt: {len(prompts)} prompts, this server allows at most {settings.max_prompts}")
    _check(body.best_of is None or body.best_of == n, "best_of",
           f"invalid best_of={body.best_of}: only best_of == n (or null) is supported")
    # the text each prompt echoes: token-id prompts are checked here (a bad id is a 400) and decoded
    texts = [p if isinstance(p, str) else lm.tokenizer.decode(lm.prompt_ids(p), skip_special_tokens=True)
             for p in prompts]
    max_tokens = _max_tokens(body)[0]
    max_tokens = min(16, settings.max_tokens) if max_tokens is None else max_tokens  # OpenAI's default
    job = _plan(request, body, prompts, max_tokens, n, body.logprobs,
                echo_logprobs=bool(body.echo) and body.logprobs is not None)
    if body.stream:
        return await _stream(request, job, _completion_chunks(request, body, job, texts))
    results = await _execute(request, job)
    choices = []
    for r in results:
        prompt = texts[r.prompt_index] if body.echo else ""
        logprobs = None
        if r.tokens is not None:
            head = job.prompt_tokens_info[r.prompt_index] if body.echo else []
            logprobs = _legacy(head, 0)
            tail = _legacy(r.tokens, len(prompt))
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs, name).extend(getattr(tail, name))
        choices.append(CompletionChoice(text=prompt + r.text, index=r.index, logprobs=logprobs,
                                        finish_reason=r.finish_reason))
    return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=_model_name(request),
                              choices=choices, usage=_usage(job, results))


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """OpenAI's four prompt forms -> a list of prompts (each a string or a list of token ids).

    Raises:
        InputError: an empty list.
    """
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InputError("invalid prompt=[]: expected a string, a list of token ids, or a non-empty list of them",
                         param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _with_usage(body, payload: dict) -> dict:
    """A stream chunk, with ``usage: null`` when ``stream_options.include_usage`` asks for it (as OpenAI: only the
    last chunk has usage)."""
    if body.stream_options and body.stream_options.include_usage:
        payload["usage"] = None
    return payload


def _completion_chunks(request: Request, body: CompletionRequest, job: Job, prompts: list[str]):
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), _model_name(request)
    shifts: dict[int, int] = {}

    def chunk(index: int, text: str, logprobs, finish) -> dict:
        return _with_usage(body, {"id": cid, "object": "text_completion", "created": created, "model": model,
                                  "choices": [{"text": text, "index": index,
                                               "logprobs": None if logprobs is None else logprobs.model_dump(),
                                               "finish_reason": finish}]})

    def start() -> list[dict]:
        out = []
        for i in range(len(prompts) * job.n):
            p = i // job.n
            shifts[i] = len(prompts[p]) if body.echo else 0
            if body.echo:
                lp = _legacy(job.prompt_tokens_info[p], 0) if job.logprobs is not None else None
                out.append(chunk(i, prompts[p], lp, None))
        return out

    def delta(d: Delta) -> dict:
        lp = _legacy(d.tokens, shifts.get(d.index, 0)) if job.logprobs is not None else None
        return chunk(d.index, d.text, lp, d.finish_reason)

    def usage() -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                "usage": _usage(job, job.results).model_dump()}

    return start, delta, usage if (body.stream_options and body.stream_options.include_usage) else None


# --- /v1/chat/completions ----------------------------------------------------------------------------------------
def chat_prompt(lm, body: ChatCompletionRequest) -> str:
    """The conversation as text, through the tokenizer's chat template with ``add_generation_prompt=True``.

    Raises:
        InputError: the model has no chat template, or the template rejects the conversation.
    """
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise InputError(f"model {lm.name!r} has no chat template; use /v1/completions", param="messages")
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2 TemplateError, or a template's raise_exception(): the conversation's fault
        raise InputError(f"invalid messages: the chat template rejected them ({exc})", param="messages") from None
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos) and tok("x").input_ids[:1] == [tok.bos_token_id]:
        text = text[len(bos):]  # the tokenizer adds BOS itself: do not double it
    return text


def _chat_logprobs(tokens: list[TokenInfo] | None) -> ChoiceLogprobs | None:
    if tokens is None:
        return None
    return ChoiceLogprobs(content=[
        TokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes,
                     top_logprobs=[TopLogprob(token=tok, logprob=lp, bytes=raw) for tok, lp, raw in t.top or []])
        for t in tokens
    ])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERROR_RESPONSES, **_STREAM_DOC}, summary="Chat completion")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Answer ``messages`` (rendered with the model's chat template). ``logprobs: true`` returns each token's
    logprob and ``top_logprobs`` (0..20) alternatives: entries ``{token, logprob, bytes, top_logprobs}``."""
    lm, settings, _ = _ctx(request)
    _check(body.top_logprobs is None or bool(body.logprobs), "top_logprobs",
           "invalid top_logprobs: it needs logprobs=true")
    max_tokens = _max_tokens(body)[0]
    prompt = chat_prompt(lm, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    job = _plan(request, body, [prompt], max_tokens, body.n or 1, logprobs,
                default_max_tokens=min(settings.chat_default_max_tokens, settings.max_tokens))
    if body.stream:
        return await _stream(request, job, _chat_chunks(request, body, job))
    results = await _execute(request, job)
    choices = [ChatChoice(index=r.index, message=ChatMessageOut(content=r.text), logprobs=_chat_logprobs(r.tokens),
                          finish_reason=r.finish_reason) for r in results]
    return ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                  model=_model_name(request), choices=choices, usage=_usage(job, results))


def _chat_chunks(request: Request, body: ChatCompletionRequest, job: Job):
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), _model_name(request)

    def chunk(index: int, delta: dict, logprobs, finish) -> dict:
        return _with_usage(body, {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                  "choices": [{"index": index, "delta": delta,
                                               "logprobs": None if logprobs is None else logprobs.model_dump(),
                                               "finish_reason": finish}]})

    def start() -> list[dict]:
        return [chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(job.n)]

    def delta(d: Delta) -> dict:
        lp = _chat_logprobs(d.tokens) if job.logprobs is not None else None
        return chunk(d.index, {"content": d.text} if d.text else {}, lp, d.finish_reason)

    def usage() -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                "usage": _usage(job, job.results).model_dump()}

    return start, delta, usage if (body.stream_options and body.stream_options.include_usage) else None


# --- streaming ---------------------------------------------------------------------------------------------------
def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream(request: Request, job: Job, chunks) -> StreamingResponse:
    """Start ``job`` and answer with server-sent events. Errors found before the first token (bad prompt, queue
    full) are ordinary error responses; later ones are sent as a last ``data: {"error": ...}`` event."""
    lm, _, runner = _ctx(request)
    start, delta, usage = chunks
    events = runner.stream(lambda: run_job(lm, job))
    try:
        first = await events.__anext__()
    except DecodelabError as exc:
        raise _renamed(exc) from None
    assert first == READY

    async def body() -> AsyncIterator[str]:
        try:
            for c in start():
                yield _sse(c)
            async for event in events:
                if await request.is_disconnected():
                    return
                for d in event or ():
                    yield _sse(delta(d))
            if usage is not None:
                yield _sse(usage())
        except Exception as exc:  # after the 200 went out: report in-band
            _, payload = exception_payload(exc)
            yield _sse(payload)
        finally:
            await events.aclose()
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
