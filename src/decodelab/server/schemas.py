"""Pydantic models of the OpenAI routes' requests and responses (the OpenAPI schema at ``/openapi.json``).

Pydantic checks JSON types and the ranges OpenAI documents (``temperature`` 0..2, ``logprobs`` 0..5,
``top_logprobs`` 0..20, penalties -2..2, ...). Everything else about a value (``logit_bias`` values in -100..100
and ASCII-digit keys, at most 4 ``stop`` strings, every extension's range) is checked by
:class:`decodelab.GenerationConfig`. Either way a bad body is a 400 ``invalid_request_error`` naming the field
(:mod:`decodelab.server.errors`). Unknown fields are rejected, so a misspelt knob never passes silently, and every
string anywhere in a body must be valid Unicode (a lone surrogate such as the JSON ``"\\ud800"`` is a 400 naming the
field; NUL, bidirectional marks and combining sequences are fine).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, create_model, field_validator, model_validator

from ..config import unencodable_at

TokenId = Annotated[StrictInt, Field(ge=0)]


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where the first string inside ``value`` (strings, list items, dict keys and values) that is not valid
    Unicode lies, described for an error message; ``None`` when there is none."""
    if isinstance(value, str):
        at = unencodable_at(value)
        return None if at < 0 else f"{path + ': ' if path else ''}a lone surrogate {value[at]!r} at character {at}"
    if isinstance(value, (list, tuple)):
        items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, dict):
        items = [(f"{path} key {k!r}".strip(), k) for k in value] + [(f"{path}[{k!r}]", v) for k, v in value.items()]
    else:
        return None
    for where, item in items:
        found = _lone_surrogate(item, where)
        if found:
            return found
    return None


class RequestModel(BaseModel):
    """Base of every request body (OpenAI and inspection routes): unknown fields are refused, and every string,
    however deeply nested, must be valid Unicode text."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        found = _lone_surrogate(value)
        if found:
            raise ValueError(f"not valid Unicode text ({found}); UTF-8 cannot encode a lone surrogate")
        return value


class StreamOptions(RequestModel):
    include_usage: StrictBool = Field(False, description="Send a last chunk with `usage` (and no choices).")


Stop = Annotated[
    str | list[str] | None,
    Field(description="Up to 4 strings; generation stops before the first one (it is not returned)."),
]


# JSON type of a knob's value by its kind (decodelab.knobs.Kind); GenerationConfig checks the values themselves
_KIND_TYPES: dict[str, Any] = {
    "int": StrictInt, "float": float, "bool": StrictBool, "ids": StrictInt | list[StrictInt], "id_lists": list[list[StrictInt]],
    "strings": str | list[str], "early_stopping": StrictBool | Literal["never"], "text": str,
    "json_schema": dict[str, Any] | bool | str, "sequence_bias": list[tuple[list[int], float]],
    "logit_bias": dict[str, float],
}


def knob_field(name: str, note: str = "", default: Any = None) -> tuple[Any, Any]:
    """``(annotation, Field)`` of a request field for the :class:`~decodelab.GenerationConfig` knob ``name``, for
    ``pydantic.create_model``: optional (``null`` = the knob's default), typed by the knob's kind, described by its doc
    line (plus ``note``; ``default`` replaces the knob's default in the text when the route has its own), its bounds
    shown in the JSON Schema (checked by ``GenerationConfig``, which names the
    parameter in its 400, not by pydantic)."""
    from ..config import GenerationConfig
    from ..knobs import default_of

    k = GenerationConfig.knobs()[name]
    default = default_of(GenerationConfig, name) if default is None else default
    shown = "" if default is None or default == () else f" Default {json.dumps(default)}."
    bounds = f" Must be {k.bounds_text()}." if k.bounds_text() else ""
    extra = {**k.json_bounds(), "x-decodelab-knob": name}
    return _KIND_TYPES[k.kind] | None, Field(None, description=f"{k.doc}{shown}{bounds}{note}",
                                             json_schema_extra=extra)


def _extensions() -> dict[str, tuple[Any, Any]]:
    from ..config import GenerationConfig

    notes = {"num_beams": " At most the server's max_n. Not combinable with logprobs.",
             "top_k": " (OpenAI has no top-k, so it is off unless given.)",
             "ignore_eos": " vLLM's name; `stop_token_ids` still stop."}
    return {name: knob_field(name, notes.get(name, ""), default=0 if name == "top_k" else None)
            for name, k in GenerationConfig.knobs().items() if k.openai == "extension"}


Extensions = create_model(
    "Extensions", __base__=RequestModel, __doc__="decodelab extensions: every GenerationConfig knob whose metadata "
    "says openai='extension' (decodelab.knobs), under its own name; validated by GenerationConfig (a bad value is a "
    "400 naming it).", **_extensions())


class JsonSchemaFormat(RequestModel):
    """``response_format.json_schema``, as OpenAI documents it. The schema is always enforced (decodelab has no
    best-effort mode); ``strict: true`` also requires OpenAI's strict-mode rules (every object lists all its
    properties in ``required`` and sets ``additionalProperties: false``), so a schema OpenAI would refuse is
    refused here too."""

    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="Name of the format (a-z, A-Z, 0-9, _ and "
                                                                         "-, at most 64 characters).")
    description: str | None = Field(None, description="Accepted and not used.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema (absent: any JSON "
                                                                             "object).")
    strict: StrictBool | None = Field(None, description="Also check OpenAI's strict-mode rules (see above).")


class ResponseFormat(RequestModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema``
    (JSON valid under ``json_schema.schema``). The constraint is enforced token by token (llguidance); a reply cut
    by ``max_tokens`` before the value is complete has ``finish_reason: "length"``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="Required with type json_schema, else absent.")


class _Common(Extensions):
    stop_token_ids: list[TokenId] | None = Field(
        None, description="Token ids that end a choice like end-of-sequence does (vLLM's name; GenerationConfig's "
                          "eos_token_id, added to the model's eos ids): finish_reason `stop`, the stop token's text is "
                          "not returned.")
    model: str | None = Field(None, description="Accepted and echoed; the server's model is fixed at start, and "
                                                "any name here uses it (nothing is ever loaded by a request).")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1.0 (sampling). 0 means greedy.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling mass (default 1.0).")
    n: StrictInt | None = Field(None, ge=1, le=128, description="Completions per prompt (at most the server's max_n).")
    stream: StrictBool | None = Field(False, description="Server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
    stop: Stop = None
    seed: StrictInt | None = Field(None, description="Sampling seed: the same seed gives the same text.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias added to its "
                                                                  "logit, -100..100.")
    user: str | None = Field(None, description="Accepted and ignored.")
    max_completion_tokens: StrictInt | None = Field(None, ge=0, description="Same as max_tokens (newer OpenAI name); "
                                                                      "wins when both are given.")
    response_format: ResponseFormat | None = Field(None, description="Structured output: json_object or "
                                                                     "json_schema (see ResponseFormat).")


Prompt = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_Common):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, a list of token ids, or a list of lists
    of token ids (as OpenAI). Token ids are used exactly as given (no BOS added); an id outside the vocabulary, or an
    empty prompt, is a 400 (there is no token to continue from)."""

    prompt: Prompt = Field(..., description="Text to continue, a list of texts, a list of token ids, or a list of "
                                            "token-id lists.")
    max_tokens: StrictInt | None = Field(None, ge=0, description="New tokens per completion (default 16, or the "
                                                           "server's --max-tokens when smaller).")
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description="Return this many alternatives per token (0..5).")
    echo: StrictBool | None = Field(False, description="Return the prompt before the completion (with its logprobs; the "
                                                 "first token has none).")
    suffix: None = Field(None, description="Not supported; must be null.")
    best_of: StrictInt | None = Field(None, ge=1, description="Accepted only when equal to n (or null).")


class TextContent(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    """One chat message. ``content`` may be null only for an assistant message (as OpenAI's API allows)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContent] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _needs_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        return self


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``: ``messages`` go through the model's chat template with
    ``add_generation_prompt=True``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=0, description="Default: the server's chat_default_max_tokens, capped "
                                                           "by the room left in the context window.")
    logprobs: StrictBool | None = Field(False, description="Return the chosen tokens' logprobs.")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="Alternatives per token (0..20; needs "
                                                                    "logprobs=true).")


# --- responses ---------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy logprobs: per token, its text, its log-probability (natural log; ``null`` for the first prompt token
    under echo), the top alternatives (token text -> logprob) and its character offset in the choice's ``text``."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "decodelab"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
