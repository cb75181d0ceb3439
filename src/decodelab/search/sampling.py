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
from ..errors import ConfigError
from ..processors import apply
from .common import PromptBatch, RawSequence, SearchRequest
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


def _pad_token(engine: Engine, batch: PromptBatch) -> torch.Tensor:
    """(1,) tensor holding the pad id (the token a finished row is fed)."""
    return torch.tensor([batch.pad_id], dtype=torch.long, device=engine.device)


def _check_not_empty(lse: torch.Tensor, running: list[bool], step: int, cfg: GenerationConfig) -> None:
    """Raise when the processors removed every token of a running row (all scores ``-inf``).

    Raises:
        ConfigError: naming the first of ``suppress_tokens`` / ``bad_words_ids`` / ``sequence_bias`` /
            ``logit_bias`` / ``json_schema`` / ``regex`` / ``grammar`` that is set (the only settings that can remove
            every token; a constraint alone never does, but with suppressed tokens it can).
    """
    empty = [r for r, (run, v) in enumerate(zip(running, lse.tolist())) if run and v == float("-inf")]
    if empty:
        param = next((p for p in ("suppress_tokens", "bad_words_ids", "sequence_bias", "logit_bias", "json_schema",
                                  "regex", "grammar")
                      if getattr(cfg, p)), None)
        raise ConfigError(
            f"every token was removed at step {step} of row {empty[0]}: the processors left nothing to choose"
            + (f" (check {param})" if param else ""),
            param=param,
        )


def token_search(req: SearchRequest) -> Generator[StepEvent, None, list[RawSequence]]:
    """Greedy (``req.generators is None``) or sampling decode of ``req.batch``, each prompt repeated
    ``req.per_prompt`` times. After each token, the running rows' new ids go through ``req.stopping``; a row ends
    with the reason of the first criterion that fires.

    Yields a :data:`StepEvent` per step; returns one :class:`RawSequence` per row, in row order.
    """
    engine, cfg, procs, tracer, per_prompt = req.engine, req.config, req.processors, req.tracer, req.per_prompt
    batch = req.batch.repeat(per_prompt)
    rows = batch.ids.shape[0]
    gens = req.generators
    input_ids = batch.ids.to(engine.device)
    prompt_of = [r // per_prompt for r in range(rows)]
    new_ids: list[list[int]] = [[] for _ in range(rows)]
    scores = [0.0] * rows
    reasons: list[str | None] = [None] * rows
    if cfg.max_new_tokens == 0:
        return [RawSequence(i // per_prompt, [], 0.0, "length") for i in range(rows)]

    logits, state = engine.prefill(batch.ids, batch.mask, cfg.max_new_tokens)
    try:
        for step in range(cfg.max_new_tokens):
            running = [r is None for r in reasons]
            processed = tracer.process(procs, input_ids, logits) if tracer else apply(procs, input_ids, logits)
            lse = torch.logsumexp(processed, dim=-1)  # (B,): -inf where the processors removed every token
            if gens is None:
                next_tokens = torch.argmax(processed, dim=-1)
            else:
                _check_not_empty(lse, running, step, cfg)
                probs = torch.softmax(processed, dim=-1)
                next_tokens = torch.cat([
                    torch.multinomial(probs[r : r + 1], 1, generator=g)[:, 0] if running[r] else _pad_token(engine, batch)
                    for r, g in enumerate(gens)
                ])
            chosen_lp = (processed.gather(1, next_tokens[:, None])[:, 0] - lse).tolist()
            if gens is None and any(run and lp != lp for run, lp in zip(running, chosen_lp)):  # NaN: nothing left
                _check_not_empty(lse, running, step, cfg)
            tokens = next_tokens.tolist()
            live = [r for r in range(rows) if running[r]]
            for r in range(rows):
                if not running[r]:
                    tokens[r] = batch.pad_id
                    continue
                if tracer:
                    tracer.step(step, r, tokens[r], logits[r], processed[r])
                new_ids[r].append(tokens[r])
                scores[r] += chosen_lp[r]
            # the running rows' new ids (all step + 1 long): which of them end here, and why
            live_ids = torch.cat([input_ids[live, batch.width:], next_tokens[live][:, None]], dim=1)
            for r, reason in zip(live, req.stopping.reasons(live_ids, [prompt_of[r] for r in live])):
                reasons[r] = reason
            yield tokens, running
            if all(r is not None for r in reasons):
                break
            token_tensor = torch.tensor(tokens, dtype=torch.long, device=engine.device)
            input_ids = torch.cat([input_ids, token_tensor[:, None]], dim=-1)
            logits = engine.step(state, token_tensor)
    finally:
        engine.release(state)  # batching: the next steps stop waiting for these rows

    if tracer:
        done = {r for r in reasons}
        tracer.trace.stop_reason = "max_new_tokens" if "length" in done else "all_finished"
    return [RawSequence(r // per_prompt, new_ids[r], scores[r], reasons[r] or "length") for r in range(rows)]
