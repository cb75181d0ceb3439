"""Token-by-token search: greedy (argmax) and sampling (multinomial), as transformers' ``GenerationMixin._sample``.

Each step: logits (B, V) -> processors -> greedy ``argmax`` or ``multinomial(softmax(scores))`` -> stopping.
Sampling draws each row from its own ``torch.Generator`` seeded with ``seed + j`` for the j-th returned sequence
of a prompt, so a seeded request gives the same text alone or in a batch, and never touches the global RNG. With
one prompt and ``seed=s`` the draws equal ``torch.manual_seed(s); model.generate(do_sample=True, ...)``.

Finished rows keep being fed the pad id (as transformers does) until every row is done.
"""

from __future__ import annotations

import secrets
from typing import Generator

import torch

from ..config import GenerationConfig
from ..engine import Engine
from ..processors import Context, Processor, apply
from ..stopping import StopStrings
from .common import PromptBatch, RawSequence
from .tracing import Tracer

# What the generator yields after each step: the new token of every row (pad for finished rows) and which rows
# were still running before this step.
StepEvent = tuple[list[int], list[bool]]


def row_generators(cfg: GenerationConfig, rows: int, per_prompt: int, device) -> list[torch.Generator] | None:
    """One generator per row (``None`` unless sampling): row ``i`` is sample ``i % per_prompt`` of its prompt and
    gets seed ``seed + i % per_prompt``; an unseeded request draws a fresh random seed."""
    if not cfg.do_sample:
        return None
    base = cfg.seed if cfg.seed is not None else secrets.randbits(62)
    return [torch.Generator(device=device).manual_seed(base + i % per_prompt) for i in range(rows)]


def token_search(
    engine: Engine,
    batch: PromptBatch,
    cfg: GenerationConfig,
    procs: list[Processor],
    ctx: Context,
    stops: StopStrings,
    per_prompt: int,
    tracer: Tracer | None = None,
) -> Generator[StepEvent, None, list[RawSequence]]:
    """Greedy or sampling decode of ``batch`` (already repeated ``per_prompt`` times per prompt).

    Yields a :data:`StepEvent` per step; returns one :class:`RawSequence` per row, in row order.
    """
    rows = batch.ids.shape[0]
    eos = set(ctx.eos_ids.tolist())
    gens = row_generators(cfg, rows, per_prompt, engine.device)
    input_ids = batch.ids.to(engine.device)
    new_ids: list[list[int]] = [[] for _ in range(rows)]
    scores = [0.0] * rows
    reasons: list[str | None] = [None] * rows
    if cfg.max_new_tokens == 0:
        return [RawSequence(i // per_prompt, [], 0.0, "length") for i in range(rows)]

    logits, state = engine.prefill(batch.ids, batch.mask)
    for step in range(cfg.max_new_tokens):
        running = [r is None for r in reasons]
        processed = tracer.process(procs, input_ids, logits) if tracer else apply(procs, input_ids, logits)
        if gens is None:
            next_tokens = torch.argmax(processed, dim=-1)
        else:
            probs = torch.softmax(processed, dim=-1)
            next_tokens = torch.cat([torch.multinomial(probs[r : r + 1], 1, generator=g)[:, 0] for r, g in enumerate(gens)])
        chosen_lp = (processed.gather(1, next_tokens[:, None])[:, 0] - torch.logsumexp(processed, dim=-1)).tolist()
        tokens = next_tokens.tolist()
        for r in range(rows):
            if not running[r]:
                tokens[r] = batch.pad_id
                continue
            if tracer:
                tracer.step(step, r, tokens[r], logits[r], processed[r])
            new_ids[r].append(tokens[r])
            scores[r] += chosen_lp[r]
            if tokens[r] in eos:
                reasons[r] = "eos"
            elif stops and stops.cut(new_ids[r]) >= 0:
                reasons[r] = "stop"
            elif step + 1 == cfg.max_new_tokens:
                reasons[r] = "length"
        yield tokens, running
        if all(r is not None for r in reasons):
            break
        token_tensor = torch.tensor(tokens, dtype=torch.long, device=engine.device)
        input_ids = torch.cat([input_ids, token_tensor[:, None]], dim=-1)
        logits = engine.step(state, token_tensor)

    if tracer:
        done = {r for r in reasons}
        tracer.trace.stop_reason = "max_new_tokens" if "length" in done else "all_finished"
    return [RawSequence(r // per_prompt, new_ids[r], scores[r], reasons[r] or "length") for r in range(rows)]
