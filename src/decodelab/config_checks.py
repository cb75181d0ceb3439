"""The per-kind value checks behind :meth:`decodelab.GenerationConfig.from_kwargs` (the one place that validates
generation parameters; nothing else calls these).

Each check reads one keyword from ``given`` (the keywords that are not ``None``), normalises it (lists become tuples,
``logit_bias`` keys become ints) and raises :class:`~decodelab.errors.ConfigError` with a one-line message naming the
parameter and the value received, in the style of vLLM's ``SamplingParams._verify_args`` ("x must be in (0, 1], got
y"). The bounds come from each field's :class:`~decodelab.knobs.Knob`, so they are written once.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from .errors import ConfigError

EarlyStopping = bool | Literal["never"]

MAX_STOP_STRINGS = 4
"""At most this many ``stop_strings`` (OpenAI's documented limit for ``stop``), on every surface."""

_MAX_ID_DIGITS = 20  # a logit_bias key longer than this cannot be a token id (and int() refuses > 4300 digits)


def _fail(param: str, value: Any, expected: str) -> ConfigError:
    shown = repr(value)
    if len(shown) > 80:  # keep the one-line message short whatever was passed
        shown = shown[:77] + "..."
    return ConfigError(f"invalid {param}={shown}: expected {expected}", param=param)


# --- each raises ConfigError naming the parameter ---------------------------------------------------------


def _int(given: dict, name: str, default: int | None, *, lo: int | None = None, hi: int | None = None) -> int | None:
    if name not in given:
        return default
    x = given[name]
    if isinstance(x, bool) or not isinstance(x, int):
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        else:
            raise _fail(name, given[name], "an integer")
    if lo is not None and x < lo:
        raise _fail(name, x, f"an integer >= {lo}")
    if hi is not None and x > hi:
        raise _fail(name, x, f"an integer <= {hi}")
    return x


def _float(
    given: dict,
    name: str,
    default: float | None,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float | None:
    if name not in given:
        return default
    x = given[name]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _fail(name, x, "a number")
    x = float(x)
    if not math.isfinite(x):
        raise _fail(name, x, "a finite number")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise _fail(name, x, f"a number {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and (x > hi or (hi_open and x == hi)):
        raise _fail(name, x, f"a number {'<' if hi_open else '<='} {hi:g}")
    return x


def _bool(given: dict, name: str, default: bool) -> bool:
    if name not in given:
        return default
    x = given[name]
    if not isinstance(x, bool):
        raise _fail(name, x, "true or false")
    return x


def _early_stopping(given: dict, name: str) -> EarlyStopping:
    es = given.get(name, False)
    if isinstance(es, str) and es.lower() in ("never", "true", "false"):
        es = {"never": "never", "true": True, "false": False}[es.lower()]
    if es not in (True, False, "never") or not isinstance(es, (bool, str)):
        raise _fail(name, es, "True, False or 'never'")
    return es


def _token_id(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise _fail(name, x, "non-negative integer token ids")
    return x


def _ids(given: dict, name: str, *, allow_empty: bool) -> tuple[int, ...] | None:
    if name not in given:
        return None
    x = given[name]
    if isinstance(x, int) and not isinstance(x, bool):
        x = [x]
    if not isinstance(x, (list, tuple, set, frozenset)):
        raise _fail(name, x, "a token id or a list of token ids")
    out = tuple(dict.fromkeys(_token_id(name, i) for i in x))
    if not out and not allow_empty:
        raise _fail(name, x, "a non-empty list of token ids")
    return out


def _id_lists(given: dict, name: str) -> tuple[tuple[int, ...], ...] | None:
    if name not in given:
        return None
    x = given[name]
    if not isinstance(x, (list, tuple)) or not all(isinstance(s, (list, tuple)) and len(s) > 0 for s in x):
        raise _fail(name, x, "a list of non-empty lists of token ids")
    return tuple(tuple(_token_id(name, i) for i in s) for s in x)


def unencodable_at(text: str) -> int:
    """Index of the first character of ``text`` that UTF-8 cannot encode (a lone surrogate such as the JSON
    ``"\\ud800"``), or -1 when the whole text is valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return -1


def _strings(given: dict, name: str) -> tuple[str, ...]:
    if name not in given:
        return ()
    x = given[name]
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, (list, tuple)) or not all(isinstance(s, str) for s in x):
        raise _fail(name, x, "a string or a list of strings")
    if any(s == "" for s in x):
        raise _fail(name, x, "non-empty strings")
    for s in x:
        at = unencodable_at(s)
        if at >= 0:
            raise _fail(name, s, f"valid Unicode text (a lone surrogate {s[at]!r} at character {at})")
    if len(x) > MAX_STOP_STRINGS:  # counted as given, repeats included (as OpenAI counts ``stop``)
        raise ConfigError(f"invalid {name}: {len(x)} strings given, at most {MAX_STOP_STRINGS} are allowed",
                          param=name)
    return tuple(dict.fromkeys(x))


def constraint_check(given: dict, v: dict) -> None:
    """``json_schema`` / ``regex`` / ``grammar``: compiled now (by llguidance, :mod:`decodelab.grammar`), so that an
    invalid or unenforceable constraint is refused before anything runs; at most one; it needs an eos token to end
    the text, so not with ``ignore_eos`` or an empty ``eos_token_id``."""
    from .grammar import KINDS, normalise

    chosen = [k for k in KINDS if k in given]
    for kind in KINDS:
        v[kind] = normalise(kind, given[kind]) if kind in given else None
    if len(chosen) > 1:
        raise ConfigError(f"invalid {chosen[1]}: only one constraint per request, and {chosen[0]} is already set",
                          param=chosen[1])
    if chosen and (v["ignore_eos"] or v["eos_token_id"] == ()):
        why = "ignore_eos=True" if v["ignore_eos"] else "eos_token_id=[]"
        raise ConfigError(f"invalid {why} with {chosen[0]}: a constrained text ends with an eos token once the "
                          "constraint is complete", param="ignore_eos" if v["ignore_eos"] else "eos_token_id")


def _bias_value(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise _fail(name, value, "finite numbers as bias values")
    return float(value)


def _sequence_bias(given: dict, name: str) -> tuple[tuple[tuple[int, ...], float], ...] | None:
    if name not in given:
        return None
    x = given[name]
    items = x.items() if isinstance(x, dict) else x
    try:
        pairs = [(tuple(k) if not isinstance(k, int) else (k,), val) for k, val in items]
    except (TypeError, ValueError):
        raise _fail(name, x, "a mapping from token-id sequences to float biases") from None
    out = []
    for seq, val in pairs:
        if not seq:
            raise _fail(name, x, "non-empty token-id sequences")
        out.append((tuple(_token_id(name, i) for i in seq), _bias_value(name, val)))
    return tuple(out)


def _logit_bias(given: dict, name: str, lo: float, hi: float) -> tuple[tuple[int, float], ...] | None:
    if name not in given:
        return None
    x = given[name]
    if not isinstance(x, dict):
        raise _fail(name, x, "a mapping from token id to bias")
    out = []
    for k, val in x.items():
        if isinstance(k, str):  # ASCII digits only: int() would also read "\uff11\uff12", and fail on "\u00b2"
            if not (k.isascii() and k.isdigit() and len(k) <= _MAX_ID_DIGITS):
                raise _fail(name, k, "token ids as keys (ASCII digits, e.g. \"50256\")")
            k = int(k)
        bias = _bias_value(name, val)
        if not lo <= bias <= hi:
            raise ConfigError(f"invalid {name}[{k}]={bias:g}: expected a bias between {lo:g} and {hi:g}", param=name)
        out.append((_token_id(name, k), bias))
    return tuple(out)


# kind -> check(given, name, default, knob); the bounds come from the field's Knob (decodelab.knobs)
CHECKS = {
    "int": lambda g, n, d, k: _int(g, n, d, lo=k.lo, hi=k.hi),
    "float": lambda g, n, d, k: _float(g, n, d, lo=k.lo, hi=k.hi, lo_open=k.lo_open, hi_open=k.hi_open),
    "bool": lambda g, n, d, k: _bool(g, n, d),
    "ids": lambda g, n, d, k: _ids(g, n, allow_empty=True),
    "id_lists": lambda g, n, d, k: _id_lists(g, n),
    "strings": lambda g, n, d, k: _strings(g, n),
    "early_stopping": lambda g, n, d, k: _early_stopping(g, n),
    "sequence_bias": lambda g, n, d, k: _sequence_bias(g, n),
    "logit_bias": lambda g, n, d, k: _logit_bias(g, n, k.lo, k.hi),
}
