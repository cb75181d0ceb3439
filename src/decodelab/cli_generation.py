"""The pieces of ``decodelab generate`` (registered by :mod:`decodelab.cli`): its options, built from the knob
metadata of :class:`decodelab.GenerationConfig` (:mod:`decodelab.knobs`), so a new field gets a flag; the options
turned into ``GenerationConfig`` keywords as given; and the printing of a generation (rich) or of a stream.
"""

import inspect
import json
import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from .errors import InputError


def given_options(**given: Any) -> dict[str, Any]:
    """Keep the options the user gave (not None, not an empty repeat list, flags only when set), as given."""
    out = {}
    for name, value in given.items():
        if value is None or value is False or (isinstance(value, (list, tuple)) and not value):
            continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


# the Python type of a knob's option, by its kind (decodelab.knobs.Kind); list types make a repeatable option
_CLI_TYPES: dict[str, Any] = {"int": Optional[int], "float": Optional[float], "bool": bool,
                              "ids": Optional[list[int]], "strings": Optional[list[str]]}


def _knob_help(name: str, knob, default: Any) -> str:
    shown = default is not None and default is not False and default != ()
    extra = [f"default {default}" if shown else "", knob.bounds_text()]
    if knob.kind in ("ids", "strings") and knob.cli_input == "value":
        extra.append("repeatable")
    if knob.cli_input == "json":
        extra.append("JSON")
    elif knob.cli_input == "file":
        extra.append("a file; '-': stdin")
    tail = "; ".join(e for e in extra if e)
    return escape(f"{knob.doc} ({tail})" if tail else knob.doc)  # rich markup would eat "[ids]"


def knob_parameters() -> list[inspect.Parameter]:
    """One typer option per :class:`~decodelab.GenerationConfig` knob that has a CLI flag (``Knob.cli``), built from
    the knob's metadata: type from its kind, help from its doc line, default and bounds. The parameter is named after
    the knob, so ``generate`` receives ``GenerationConfig`` keywords."""
    from .config import GenerationConfig
    from .knobs import default_of

    params = []
    for name, k in GenerationConfig.knobs().items():
        if k.cli is None:
            continue
        kind = _CLI_TYPES.get(k.kind, Optional[str]) if k.cli_input == "value" else Optional[str]
        metavar = {"file": "FILE", "json": "JSON"}.get(k.cli_input)
        if k.kind == "early_stopping":
            metavar = "true|false|never"
        option = typer.Option(k.cli, help=_knob_help(name, k, default_of(GenerationConfig, name)), metavar=metavar)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option],
                                        default=False if kind is bool else None))
    return params


def knob_values(given: dict[str, Any]) -> dict[str, Any]:
    """The knob options as ``GenerationConfig`` keywords: file options read (``--json-schema FILE``), JSON options
    parsed (``--logit-bias '{"50256": -100}'``).

    Raises:
        InputError: a file that cannot be read, or text that is not JSON (one line naming the option).
    """
    from .config import GenerationConfig

    out = dict(given)
    for name, k in GenerationConfig.knobs().items():
        if name not in out or out[name] is None:
            continue
        if k.cli_input == "file":
            out[name] = read_spec(out[name], k.cli)
        elif k.cli_input == "json":
            try:
                out[name] = json.loads(out[name])
            except ValueError as exc:
                raise InputError(f"invalid {k.cli}={out[name]!r}: not JSON ({exc})", param=name) from None
    return out


def read_spec(path: str | None, option: str) -> str | None:
    """The text of a ``--json-schema`` / ``--grammar`` file (``-``: standard input); checked later, with every
    other option, by ``GenerationConfig``.

    Raises:
        InputError: the file cannot be read (one line naming the option and the path).
    """
    if path is None:
        return None
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"invalid {option}={path!r}: cannot read it ({reason})", param=option.lstrip("-")) from None


def print_stream(con: Console, lm, prompt: str, kwargs: dict[str, Any]) -> None:
    """Print the prompt (dim), then the first sequence's text deltas (bold) as ``lm.stream`` yields them, then its
    finish reason when the stream reports its :class:`~decodelab.trace.Generation`."""
    stream = lm.stream(prompt, **kwargs)  # bad settings raise here, before anything is printed
    con.print(Text(prompt, style="dim"), end="", soft_wrap=True)
    for delta in stream:
        con.print(Text(delta, style="bold"), end="", soft_wrap=True)
        con.file.flush()
    con.print()
    gen = getattr(stream, "generation", None)
    if gen is not None and gen.sequences:
        seq = gen.sequences[0]
        con.print(Text(f"score {seq.score:.4f} · {len(seq.new_ids)} new tokens · finish: {seq.finish_reason}",
                       style="dim"))


def show_generation(con: Console, gen) -> None:
    """Print a :class:`~decodelab.trace.Generation`: the sequences, and with a trace the step table, the beam tree
    (beam search) and why the search stopped."""
    from .render import beam_tree, generation_panel, stop_reason_text, trace_table

    strategy = f" · {gen.trace.strategy}" if gen.trace else ""
    con.print(Text(f"{gen.model}{strategy} · {gen.elapsed_s:.2f} s", style="dim"))
    con.print(generation_panel(gen))
    if gen.trace is None:
        return
    con.print(trace_table(gen.trace))
    if gen.trace.beam_nodes:
        con.print(beam_tree(gen.trace, prompt_label=f"prompt ({len(gen.prompt_ids[0])} tokens)"))
    con.print(stop_reason_text(gen.trace))
    if gen.trace.lens:
        from .render import lens_table

        for i in sorted({s.sequence for s in gen.trace.lens}):
            con.print(lens_table(gen.trace, sequence=i))
