"""``decodelab demo``: the notebook walk-through, in the terminal.

Four short sections on one prompt: the tokens, the next-token distribution (logits shape, argmax, top 10), greedy
decoding (20 new tokens) and beam search (``num_beams=5, repetition_penalty=2.0, max_new_tokens=38,
num_return_sequences=5``), each headed by one sentence saying what it shows.
"""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from .render import distribution_table, generation_panel, quoted, tokens_table

GREEDY = {"max_new_tokens": 20}
BEAM = {"num_beams": 5, "repetition_penalty": 2.0, "max_new_tokens": 38, "num_return_sequences": 5}

SECTIONS = {
    "tokens": "The model never sees letters: the tokenizer cuts the text into pieces from a fixed vocabulary, and "
              "each piece becomes an id.",
    "next": "One forward pass scores every vocabulary entry at every position; the softmax of the last position's "
            "scores is the model's guess for the next token.",
    "greedy": "Greedy decoding appends the single most likely token, again and again: deterministic, and prone to "
              "loops.",
    "beam": "Beam search keeps the 5 best partial continuations at every step (a repetition penalty of 2.0 makes "
            "reused tokens less likely); a beam's score is its summed log-probability divided by its length.",
}


def _section(con: Console, title: str, key: str) -> None:
    con.print()
    con.print(Rule(Text(title, style="bold"), align="left"))
    con.print(Text(SECTIONS[key], style="italic"))


def run_demo(lm, prompt: str, con: Console | None, emit_json: Callable[[dict], None]) -> None:
    """Run the walk-through with ``lm`` on ``prompt``; print it on ``con``, or when ``con`` is None hand one JSON
    object ``{"model", "prompt", "tokens", "next", "greedy", "beam"}`` to ``emit_json``.

    Raises:
        InputError: ``prompt`` is empty (from :class:`~decodelab.lm.LM`).
    """
    toks = lm.tokenize(prompt)
    dist = lm.next_token(prompt, top_k=10)
    greedy = lm.generate(prompt, **GREEDY)
    beam = lm.generate(prompt, **BEAM)
    if con is None:
        emit_json({"model": lm.name, "prompt": prompt, "tokens": toks.to_dict(), "next": dist.to_dict(),
                   "greedy": greedy.to_dict(), "beam": beam.to_dict()})
        return

    con.print(Text.assemble(("decodelab demo", "bold"), f" · {lm.name} · prompt {quoted(prompt)}"))

    _section(con, "1. Tokens", "tokens")
    con.print(tokens_table(toks))
    con.print(Text.assemble(("ids: ", "bold"), str(toks.ids)))

    _section(con, "2. Next-token distribution", "next")
    con.print(Text.assemble(("logits shape: ", "bold"), f"{dist.logits_shape} (batch, positions, vocabulary)"))
    con.print(Text.assemble(("argmax: ", "bold"), f"id {dist.argmax.id} {quoted(dist.argmax.token)}"))
    con.print(distribution_table(dist))
    con.print(Text.assemble(("entropy: ", "bold"), f"{dist.entropy:.3f} nats"))

    _section(con, f"3. Greedy decoding, {GREEDY['max_new_tokens']} new tokens", "greedy")
    seq = greedy.sequences[0]
    con.print(Text.assemble(("new ids: ", "bold"), str(seq.new_ids)))
    con.print(generation_panel(greedy))

    _section(con, "4. Beam search", "beam")
    con.print(Text(", ".join(f"{k}={v}" for k, v in BEAM.items()), style="dim"))
    con.print(generation_panel(beam))
