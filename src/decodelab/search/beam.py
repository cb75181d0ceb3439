"""Beam search (and beam sampling), step for step as transformers' vectorised ``GenerationMixin._beam_search``.

Per prompt ``b`` there are K = ``num_beams`` running beams and a list of K finished hypotheses. Each step:

1. ``log_softmax`` of the logits, then the processors (on log-probabilities, as transformers does);
2. add each beam's running score and take the top ``keep = max(2, 1 + n_eos) * K`` of the K * V continuations
   (or sample ``keep`` of them without replacement for beam sampling);
3. continuations that end (eos, stop string, or the length limit) become candidates for the finished list with
   score ``cumulative / new_len ** length_penalty`` (new_len counts generated tokens only); only the first K
   continuations may finish; the K best non-finished continue as beams;
4. stop when no running beam can beat the worst finished one (the ``early_stopping`` heuristics), when every beam
   slot is finished and ``early_stopping=True``, or at ``max_new_tokens``.

The -1e9 sentinels and the order of operations are transformers' own, so sequence scores match
``sequences_scores`` and the returned ids match ``model.generate(num_beams=K, ...)``.
"""

from __future__ import annotations

from typing import Generator

import torch

from ..config import GenerationConfig
from ..engine import Engine
from ..processors import Context, Processor, apply
from ..stopping import StopStrings
from ..trace import BeamNode
from .common import PromptBatch, RawSequence
from .sampling import row_generators
from .tracing import Tracer

BIG = 1.0e9


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, j], ...]`` for (B, N, ...) ``t`` and (B, M) ``idx`` -> (B, M, ...)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(
    engine: Engine,
    batch: PromptBatch,
    cfg: GenerationConfig,
    procs: list[Processor],
    ctx: Context,
    stops: StopStrings,
    tracer: Tracer | None = None,
) -> Generator[list[list[int]], None, list[RawSequence]]:
    """Beam search over ``batch`` (one row per prompt, not yet repeated).

    Yields, after each step, the current best running beam's new ids for every prompt; returns
    ``num_return_sequences`` :class:`RawSequence` per prompt, best first.
    """
    B, K, T0 = batch.ids.shape[0], cfg.num_beams, batch.width
    dev = engine.device
    n_eos = ctx.eos_ids.numel()
    keep = max(2, 1 + n_eos) * K
    max_len = T0 + cfg.max_new_tokens
    length_penalty, early = cfg.length_penalty, cfg.early_stopping
    gens = row_generators(cfg, B, 1, dev) if cfg.do_sample else None
    if cfg.max_new_tokens == 0:
        return [RawSequence(b, [], 0.0, "length") for b in range(B) for _ in range(cfg.num_return_sequences)]

    expanded = batch.repeat(K)
    running = torch.full((B, K, max_len), batch.pad_id, dtype=torch.long, device=dev)
    running[:, :, :T0] = expanded.ids.view(B, K, T0).to(dev)
    finished = running.clone()
    running_scores = torch.zeros((B, K), device=dev)
    running_scores[:, 1:] = -BIG
    finished_scores = torch.full((B, K), -BIG, device=dev)
    finished_len = torch.zeros((B, K), dtype=torch.long, device=dev)
    finished_stop = torch.zeros((B, K), dtype=torch.bool, device=dev)  # ended on a stop string
    is_finished = torch.zeros((B, K), dtype=torch.bool, device=dev)
    can_improve = torch.ones((B, 1), dtype=torch.bool, device=dev)
    top_mask = torch.cat([torch.ones(K, dtype=torch.bool), torch.zeros(keep - K, dtype=torch.bool)]).to(dev)
    eos = ctx.eos_ids.to(dev)
    # beam-tree node ids (only meaningful when tracing)
    running_nodes = torch.full((B, K), -1, dtype=torch.long)
    finished_nodes = torch.full((B, K), -1, dtype=torch.long)
    nodes: list[BeamNode] = tracer.trace.beam_nodes if tracer else []

    logits, state = engine.prefill(batch.ids, batch.mask)
    Engine.select(state, torch.arange(B, device=dev).repeat_interleave(K))
    logits = logits.repeat_interleave(K, 0)
    cur_len = T0
    stop_reason = "max_new_tokens"
    while True:
        flat = running[:, :, :cur_len].reshape(B * K, cur_len)
        raw_lp = torch.log_softmax(logits, dim=-1)
        lp = tracer.process(procs, flat, raw_lp) if tracer else apply(procs, flat, raw_lp)
        V = lp.shape[-1]
        acc = (lp.view(B, K, V) + running_scores[:, :, None]).reshape(B, K * V)
        if gens is None:
            top_lp, top_idx = torch.topk(acc, k=keep)
        else:
            probs = torch.softmax(acc, dim=-1)
            top_idx = torch.cat([torch.multinomial(probs[b : b + 1], keep, generator=g) for b, g in enumerate(gens)])
            top_lp = acc.gather(1, top_idx)
            top_lp, order = top_lp.sort(dim=-1, descending=True)
            top_idx = top_idx.gather(-1, order)
        src_beam = top_idx // V
        tok = top_idx % V
        cand = _gather(running, src_beam)
        cand[:, :, cur_len] = tok
        ends = torch.isin(tok, eos) if n_eos else torch.zeros_like(tok, dtype=torch.bool)
        if cur_len + 1 >= max_len:
            ends = torch.ones_like(ends)
        stop_hit = torch.zeros_like(ends)
        if stops:
            for b in range(B):
                for j in range(keep):
                    if stops.cut(cand[b, j, T0 : cur_len + 1].tolist()) >= 0:
                        stop_hit[b, j] = True
            ends = ends | stop_hit

        # e. the K best continuations that did not end keep running
        run_lp = top_lp + ends.to(torch.float32) * -BIG
        next_idx = torch.topk(run_lp, k=K)[1]
        new_running = _gather(cand, next_idx)
        new_running_scores = _gather(run_lp, next_idx)
        new_src = _gather(src_beam, next_idx)

        # f. finished hypotheses: merge the ones that just ended (among the first K) and keep the K best
        just_done = ends & top_mask[None, :]
        done_lp = top_lp / ((cur_len + 1 - T0) ** length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (early is True)
        done_lp = done_lp + full.to(torch.float32) * -BIG
        done_lp = done_lp + (~can_improve).to(torch.float32) * -BIG
        done_lp = done_lp + (~just_done) * -BIG
        merged_idx = torch.topk(torch.cat((finished_scores, done_lp), dim=1), k=K)[1]
        finished = _gather(torch.cat((finished, cand), dim=1), merged_idx)
        finished_scores = _gather(torch.cat((finished_scores, done_lp), dim=1), merged_idx)
        new_len = torch.full_like(tok, cur_len + 1 - T0)
        finished_len = _gather(torch.cat((finished_len, new_len), dim=1), merged_idx)
        finished_stop = _gather(torch.cat((finished_stop, stop_hit), dim=1), merged_idx)
        is_finished = _gather(torch.cat((is_finished, just_done), dim=1), merged_idx)

        if tracer:
            cand_nodes = _record_nodes(tracer, nodes, running_nodes, src_beam, tok, lp, top_lp, done_lp, just_done,
                                       next_idx, cur_len - T0, K, V)
            for b in range(B):
                for k in range(K):
                    src = b * K + int(new_src[b, k])
                    tid = int(new_running[b, k, cur_len])
                    tracer.step(cur_len - T0, b * K + k, tid, raw_lp[src], lp[src], changes_row=src, raw_is_logprobs=True)
            running_nodes = _gather(cand_nodes, next_idx.cpu())
            finished_nodes = _gather(torch.cat((finished_nodes, cand_nodes), dim=1), merged_idx.cpu())

        running, running_scores = new_running, new_running_scores
        cur_len += 1
        yield [running[b, 0, T0:cur_len].tolist() for b in range(B)]

        # g. stopping: can a running beam still beat the worst finished hypothesis?
        if early == "never" and length_penalty > 0.0:
            best_len = max_len - T0
        else:
            best_len = cur_len - T0
        best_running = running_scores[:, :1] / (best_len**length_penalty)
        worst_done = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], -BIG)
        can_improve = can_improve & torch.any(best_running > worst_done, dim=-1, keepdim=True)
        open_beams = not (bool(torch.all(is_finished)) and early is True)
        if not bool(torch.any(can_improve)):
            stop_reason = "early_stopping"
            break
        if not open_beams:
            stop_reason = "all_finished"
            break
        if bool(torch.all(ends)):
            break
        beam_rows = (new_src + torch.arange(B, device=dev)[:, None] * K).reshape(-1)
        Engine.select(state, beam_rows)
        logits = engine.step(state, running[:, :, cur_len - 1].reshape(-1))

    n = cfg.num_return_sequences
    out: list[RawSequence] = []
    for b in range(B):
        for k in range(n):
            length = int(finished_len[b, k])
            ids = finished[b, k, T0 : T0 + length].tolist()
            if bool(finished_stop[b, k]):
                reason = "stop"
            elif ids and n_eos and ids[-1] in set(eos.tolist()):
                reason = "eos"
            else:
                reason = "length"
            out.append(RawSequence(b, ids, float(finished_scores[b, k]), reason))
    if tracer:
        tracer.trace.stop_reason = stop_reason
        for b in range(B):
            for k in range(n):
                node = int(finished_nodes[b, k])
                if node >= 0:
                    nodes[node].status = "returned"
    return out


def _record_nodes(tracer, nodes, running_nodes, src_beam, tok, lp, top_lp, done_lp, just_done, next_idx, step, K, V):
    """Add a :class:`BeamNode` for each of the ``keep`` candidates of every prompt; returns their node ids (B, keep)."""
    B, keep = tok.shape
    kept = torch.zeros((B, keep), dtype=torch.bool)
    kept.scatter_(1, next_idx.cpu(), True)
    ids = torch.empty((B, keep), dtype=torch.long)
    for b in range(B):
        for j in range(keep):
            src = int(src_beam[b, j])
            parent = int(running_nodes[b, src])
            tid = int(tok[b, j])
            done = bool(just_done[b, j])
            status = "finished" if done else ("kept" if bool(kept[b, j]) else "pruned")
            ids[b, j] = len(nodes)
            nodes.append(
                BeamNode(
                    node=len(nodes),
                    parent=parent if parent >= 0 else None,
                    step=step,
                    row=b,
                    id=tid,
                    token=tracer.tokenizer.decode([tid]),
                    logprob=float(lp[b * K + src, tid]),
                    cumulative=float(top_lp[b, j]),
                    status=status,
                    score=float(done_lp[b, j]) if done else None,
                )
            )
    return ids
