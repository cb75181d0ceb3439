"""Trace recording for the search loops. Only built when ``trace=True``; the loops never touch it otherwise.

Processors are applied one at a time here so that, for each row, we can tell which of the top candidates each
processor changed or removed (``ProcessorChange``); without tracing the loops call ``processors.apply``.
"""

from __future__ import annotations

import torch

from ..distribution import entropy, log_probs, rank_of, top_candidates
from ..grammar import json_path
from ..processors import GrammarConstraint, Processor
from ..trace import Candidate, ConstraintStep, ProcessorChange, Step, Trace


class Tracer:
    """Collects :class:`Step` records and processor changes.

    Args:
        tokenizer: decodes candidate ids.
        top_k: how many candidates to keep per step, before and after processing.
        trace: the :class:`Trace` being filled.
    """

    def __init__(self, tokenizer, top_k: int, trace: Trace):
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.trace = trace
        self._changes: list[list[ProcessorChange]] = []
        self._constraint: list[ConstraintStep | None] = []
        self._decoded: dict[int, str] = {}

    def process(self, procs: list[Processor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Apply ``procs`` like ``processors.apply`` and remember, per row, how each changed the watched candidates:
        the ``top_k`` best before processing plus the ``top_k`` best after it (so a token that a bias or penalty
        pushed into, or out of, the top shows up either way)."""
        rows = scores.shape[0]
        self._changes = [[] for _ in range(rows)]
        self._constraint = [None] * rows
        if not procs:
            return scores
        stages = [scores]
        for p in procs:
            stages.append(p(input_ids, stages[-1]))
            if isinstance(p, GrammarConstraint) and p.allowed is not None:
                self._constraint = self._constraint_steps(p, input_ids, stages[-2], stages[-1])
        k = min(max(self.top_k, 1), scores.shape[-1])
        raw_top = torch.topk(scores, k).indices
        final_values, final_top = torch.topk(stages[-1], k)
        final_top = torch.where(torch.isfinite(final_values), final_top, raw_top[:, :1])  # removed ones: not listed
        watched = torch.cat([raw_top, final_top], dim=1)  # (B, 2k), duplicates skipped below
        watched_list = watched.tolist()
        for p, before_all, after_all in zip(procs, stages[:-1], stages[1:]):
            before = before_all.gather(1, watched)
            after = after_all.gather(1, watched)
            changed = before != after  # -inf -> -inf is no change
            recorded: set[tuple[int, int]] = set()
            for r, c in torch.nonzero(changed).tolist():
                tid = watched_list[r][c]
                if (r, tid) in recorded:  # watched twice (in both top lists)
                    continue
                recorded.add((r, tid))
                self._changes[r].append(
                    ProcessorChange(p.name, tid, self.decode(tid), float(before[r, c]), float(after[r, c]))
                )
        return stages[-1]

    def _constraint_steps(self, p: GrammarConstraint, input_ids: torch.Tensor, before: torch.Tensor,
                          after: torch.Tensor) -> list[ConstraintStep]:
        """Per row, what the constraint ``p`` did: ``before`` / ``after`` are its (B, V) input and output scores
        (logits or log-probabilities), ``p.allowed`` its (B, V) bool mask. Probabilities are ``softmax(before)``."""
        allowed = p.allowed
        lp = torch.log_softmax(before.float(), dim=-1)  # (B, V)
        probs = lp.exp()
        removed = (probs * (~allowed)).sum(dim=-1).clamp_(0.0, 1.0).tolist()  # (B,)
        counts = allowed.sum(dim=-1).tolist()
        top_before = before.argmax(dim=-1).tolist()
        top_after = after.argmax(dim=-1).tolist()
        k = min(max(self.top_k, 1), before.shape[-1])
        f_vals, f_ids = torch.topk(before.masked_fill(allowed, float("-inf")), k)  # best forbidden, (B, k)
        generated = input_ids[:, p.ctx.prompt_len :].tolist()
        out = []
        for r in range(before.shape[0]):
            def cand(i: int) -> Candidate:
                return Candidate(i, self.decode(i), float(before[r, i]), float(probs[r, i]), float(lp[r, i]))

            forbidden = [cand(i) for v, i in zip(f_vals[r].tolist(), f_ids[r].tolist()) if v != float("-inf")]
            text = self.tokenizer.decode(generated[r], skip_special_tokens=True) if generated[r] else ""
            out.append(ConstraintStep(
                kind=p.name, allowed=int(counts[r]), mass_removed=float(removed[r]), top_before=cand(top_before[r]),
                top_after=cand(top_after[r]), forbidden=forbidden, text_so_far=text,
                path=json_path(text) if p.name == "json_schema" else None,
            ))
        return out

    def decode(self, token_id: int) -> str:
        """``tokenizer.decode([token_id])``, cached for the trace."""
        text = self._decoded.get(token_id)
        if text is None:
            text = self._decoded[token_id] = self.tokenizer.decode([token_id])
        return text

    def step(
        self,
        step: int,
        row: int,
        token_id: int,
        raw: torch.Tensor,
        processed: torch.Tensor,
        changes_row: int | None = None,
        raw_is_logprobs: bool = False,
    ) -> Step:
        """Record the decision ``token_id`` of ``row`` at ``step`` given its raw (V,) and processed (V,) scores.

        ``changes_row`` is the row of the last ``process`` call whose changes belong to this decision (defaults to
        ``row``; beam search passes the source beam).
        """
        raw_lp = raw if raw_is_logprobs else log_probs(raw)
        proc_lp = log_probs(processed)
        src = row if changes_row is None else changes_row
        rec = Step(
            step=step,
            row=row,
            id=token_id,
            token=self.decode(token_id),
            logprob=float(raw_lp[token_id]),
            logprob_processed=float(proc_lp[token_id]),
            rank=rank_of(raw_lp, token_id),
            entropy=float(entropy(raw_lp)),
            top=top_candidates(raw, self.top_k, self.tokenizer, raw_lp),
            top_processed=top_candidates(processed, self.top_k, self.tokenizer, proc_lp),
            changes=list(self._changes[src]) if src < len(self._changes) else [],
            constraint=self._constraint[src] if src < len(self._constraint) else None,
        )
        self.trace.steps.append(rec)
        return rec

