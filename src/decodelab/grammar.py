"""Constraints on the generated text (JSON schema, regex, context-free grammar), compiled by llguidance.

decodelab does not parse grammars itself: llguidance (guidance-ai, https://github.com/guidance-ai/llguidance, the
engine behind vLLM's and llama.cpp's ``llguidance`` back-ends) compiles the constraint and, at every step, computes
the set of next tokens that keep the text a prefix of some string the constraint accepts (an Earley parser over a
lexer, walked over the token trie). Why llguidance and not xgrammar or outlines-core: BENCHMARKS.md ("Structured
outputs"); in short, it refuses every JSON-schema keyword it cannot enforce instead of silently ignoring it, handles
full context-free grammars, compiles schemas in about a millisecond, and masks a 49,152-token vocabulary in tens of
microseconds.

Three kinds, one at a time (:data:`KINDS`):

- ``json_schema``: a JSON Schema (draft 2020-12 keywords llguidance implements: https://github.com/guidance-ai/
  llguidance/blob/main/docs/json_schema.md). ``{"type": "object"}`` is "any JSON object" (OpenAI's ``json_object``).
  Output is compact JSON (``,`` and ``:`` without spaces, no whitespace between tokens) unless the schema's own
  ``x-guidance`` options say otherwise: a small model given free whitespace tends to emit it forever.
- ``regex``: a Rust ``regex`` crate pattern, matched against the whole generated text (anchored at both ends).
- ``grammar``: a Lark grammar (llguidance's dialect, https://github.com/guidance-ai/llguidance/blob/main/docs/
  syntax.md, rule ``start``), or a llama.cpp GBNF grammar (``root ::= ...``), converted by llguidance.

This module only compiles and checks; :class:`decodelab.processors.GrammarConstraint` applies the mask.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

from .errors import ConfigError

KINDS = ("json_schema", "regex", "grammar")
"""The constraint parameters of :class:`~decodelab.config.GenerationConfig`, at most one per request."""

JSON_DEFAULTS = {"whitespace_flexible": False}
"""llguidance JSON options applied before the schema's own ``x-guidance`` (which may override them)."""

ANY_JSON_OBJECT = '{"type": "object"}'
"""The schema of OpenAI's ``response_format: {"type": "json_object"}``: any JSON object."""


def _first_line(message: str) -> str:
    """llguidance's errors span lines (a caret under the source); keep the message and its location."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "rejected by the grammar compiler"
    head = lines[0]
    if head.endswith(":") and len(lines) > 1:  # "regex parse error:" / "<source>" / "^" / "error: ..."
        tail = next((ln for ln in reversed(lines) if ln.lower().startswith("error")), lines[-1])
        head = f"{head} {tail}"
    return head[:300]


@functools.lru_cache(maxsize=256)
def compile_grammar(kind: str, spec: str) -> str:
    """Compile one constraint into llguidance's grammar text, checked without a tokenizer.

    Args:
        kind: one of :data:`KINDS`.
        spec: the schema as JSON text, the regex, or the Lark / GBNF grammar text.

    Returns:
        the llguidance grammar (a string for ``llguidance.LLMatcher``). Cached per ``(kind, spec)``.

    Raises:
        ConfigError: ``param=kind``; the one-line message is llguidance's reason, e.g. ``invalid json_schema:
            Unimplemented keys: ["uniqueItems"]`` (a keyword it cannot enforce is refused, never ignored),
            ``invalid regex: regex parse error: ... unclosed character class``, ``invalid grammar: at 2(6): unknown
            name: "bar"``.
    """
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    M = llguidance.LLMatcher
    try:
        if kind == "json_schema":
            grammar = M.grammar_from_json_schema(spec, defaults=JSON_DEFAULTS)
        elif kind == "regex":
            grammar = M.grammar_from_regex(spec)
        elif kind == "grammar":
            grammar = M.grammar_from_lark(any_to_lark(spec))
        else:
            raise ConfigError(f"unknown constraint kind {kind!r} (expected one of {', '.join(KINDS)})", param=kind)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- llguidance raises ValueError / its GBNF converter's own error
        raise ConfigError(f"invalid {kind}: {_first_line(str(exc))}", param=kind) from None
    is_error, messages = M.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ConfigError(f"invalid {kind}: {_first_line(messages[0] if messages else '')}", param=kind)
    return grammar


def normalise(kind: str, value: Any) -> str:
    """The text form of a constraint value, checked: ``json_schema`` accepts a dict (or ``True`` / ``False``, the
    boolean schemas) or JSON text of one; ``regex`` and ``grammar`` non-empty strings. The result is then compiled
    (:func:`compile_grammar`) so that an invalid or unenforceable constraint fails here, before any generation.

    Raises:
        ConfigError: wrong type, text that is not JSON, or what :func:`compile_grammar` raises.
    """
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"invalid json_schema: not valid JSON ({exc})", param=kind) from None
        else:
            parsed = value
        if not isinstance(parsed, (dict, bool)):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ConfigError(f"invalid json_schema={shown}: expected a JSON Schema object", param=kind)
        text = json.dumps(parsed, ensure_ascii=False)
    else:
        if not isinstance(value, str) or not value.strip():
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            what = "a regular expression" if kind == "regex" else "a Lark or GBNF grammar"
            raise ConfigError(f"invalid {kind}={shown}: expected {what} as a non-empty string", param=kind)
        text = value
    compile_grammar(kind, text)
    return text


_TOKENIZERS: dict[tuple[int, int], tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a Hugging Face fast tokenizer with ``vocab_size`` mask entries (the model's output
    size, which may exceed ``len(tokenizer)``; the extra ids are never allowed). Built once per tokenizer object
    (~0.7 s for 49,152 tokens) and cached; thread-safe.

    Raises:
        ConfigError: the tokenizer is not a fast (Rust ``tokenizers``) one, which llguidance needs.
    """
    key = (id(tokenizer), int(vocab_size))
    with _LOCK:
        hit = _TOKENIZERS.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        import llguidance.hf

        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ConfigError("constraints need a fast (Rust tokenizers) tokenizer; this model's tokenizer is "
                              f"{type(tokenizer).__name__}", param="json_schema")
        ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=int(vocab_size))
        _TOKENIZERS[key] = (tokenizer, ll)  # the tokenizer is kept alive, so its id stays its own
        return ll


def new_matcher(kind: str, spec: str, tokenizer, vocab_size: int):
    """A fresh ``llguidance.LLMatcher`` for the constraint, at the start of the generated text.

    Raises:
        ConfigError: the constraint does not compile against this tokenizer (as :func:`compile_grammar`).
    """
    import llguidance

    matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size), compile_grammar(kind, spec), log_level=0)
    if matcher.is_error():
        raise ConfigError(f"invalid {kind}: {_first_line(matcher.get_error())}", param=kind)
    return matcher


def json_path(prefix: str) -> str:
    """Where a JSON text prefix stands, as a JSONPath: ``$`` at the top, ``$.items[1].sku`` inside the value of key
    ``sku`` of the second element of ``items`` (while a key is still being written, the path of its object).

    A plain scan of ``prefix`` (strings, escapes, ``{ [ , : ] }``); it does not check the text (the constraint
    already did) and never raises. Keys that are not identifiers are written ``["a key"]``. Shown by the trace
    (``ConstraintStep.path``) and the playground.
    """
    stack: list[list] = []  # ["obj", key | None, expecting_key] or ["arr", index]
    in_str = escaped = False
    is_key = False
    buf: list[str] = []
    for ch in prefix:
        if in_str:
            if escaped:
                escaped = False
                buf.append(ch)
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
                if is_key:
                    stack[-1][1] = "".join(buf)
            else:
                buf.append(ch)
        elif ch == '"':
            in_str, buf = True, []
            is_key = bool(stack) and stack[-1][0] == "obj" and stack[-1][2]
        elif ch == "{":
            stack.append(["obj", None, True])
        elif ch == "[":
            stack.append(["arr", 0])
        elif ch in "}]":
            if stack:
                stack.pop()
        elif ch == ":" and stack and stack[-1][0] == "obj":
            stack[-1][2] = False
        elif ch == "," and stack:
            if stack[-1][0] == "obj":
                stack[-1][1], stack[-1][2] = None, True
            else:
                stack[-1][1] += 1
    path = "$"
    for entry in stack:
        if entry[0] == "arr":
            path += f"[{entry[1]}]"
        elif entry[1] is not None and not entry[2]:
            key = entry[1]
            path += f".{key}" if key.isidentifier() else f"[{json.dumps(key, ensure_ascii=False)}]"
    return path


def check_openai_strict(schema: Any, where: str = "") -> None:
    """OpenAI's strict-mode rules for ``response_format.json_schema`` with ``strict: true`` (its "Structured
    Outputs" guide, "Supported schemas"): the root is an object; every object schema sets ``additionalProperties:
    false`` and lists all its properties in ``required``. Walks ``properties``, ``items``, ``prefixItems``,
    ``anyOf``, ``$defs`` and ``definitions``.

    Raises:
        ConfigError: ``param="response_format"``, naming the first place that breaks a rule, e.g. ``invalid
            response_format: strict schema at $.properties.address: 'additionalProperties' must be false``.
    """
    def fail(why: str):
        return ConfigError(f"invalid response_format: strict schema at ${where}: {why}", param="response_format")

    if not isinstance(schema, dict):
        return
    if not where and schema.get("type") != "object" and "$ref" not in schema:
        raise fail("the root must be an object (\"type\": \"object\")")
    if schema.get("type") == "object" or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            raise fail("'additionalProperties' must be false")
        missing = [k for k in schema.get("properties", {}) if k not in schema.get("required", [])]
        if missing:
            raise fail(f"every property must be required; missing {missing[0]!r}")
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            check_openai_strict(sub, f"{where}.{key}.{name}")
    items = schema.get("items")
    if isinstance(items, dict):
        check_openai_strict(items, f"{where}.items")
    for key in ("prefixItems", "anyOf"):
        for i, sub in enumerate(schema.get(key) or []):
            check_openai_strict(sub, f"{where}.{key}[{i}]")
