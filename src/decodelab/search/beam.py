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
``sequences_scores`` and the returned ids match ``model.generate(num_beams=K, ...)``. Beam sampling draws from one
``torch.Generator`` per prompt seeded with ``seed``: for one prompt the draws equal ``torch.manual_seed(seed);
model.generate(do_sample=True, num_beams=K, ...)``, and a prompt gets the same result alone or in a batch.
"""

from __future__ import annotations

import functools
from typing import Generator

import torch

from ..engine import Engine
from ..processors import apply
from ..trace import BeamNode
from .common import BeamEvent, RawSequence, SearchRequest

BIG = 1.0e9


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, j], ...]`` for (B, N, ...) ``t`` and (B, M) ``idx`` -> (B, M, ...)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(req: SearchRequest) -> Generator[BeamEvent, None, list[RawSequence]]:
    """Beam search over ``req.batch`` (one row per prompt, not yet repeated); beam sampling when
    ``req.generators`` (one per prompt) is given. Every candidate continuation goes through ``req.stopping`` each
    step: one that any criterion ends is a candidate for the finished list (a stop string marks it ``"stop"``).

    Yields a :class:`BeamEvent` after each step (the current best running beam's new ids and the ids that can no
    longer change, for every prompt); returns
    ``num_return_sequences`` :class:`RawSequence` per prompt, best first.
    """
    engine, cfg, batch, procs, tracer = req.engine, req.config, req.batch, req.processors, req.tracer
    B, K, T0 = batch.ids.shape[0], cfg.num_beams, batch.width
    dev = engine.device
    n_eos = req.context.eos_ids.numel()
    keep = max(2, 1 + n_eos) * K
    max_len = T0 + cfg.max_new_tokens
    length_penalty, early = cfg.length_penalty, cfg.early_stopping
    gens = req.generators
    cand_prompts = [b for b in range(B) for _ in range(keep)]  # the prompt of each of the B * keep candidates
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
    eos = req.context.eos_ids.to(dev)
    # beam-tree node ids (only meaningful when tracing)
    running_nodes = torch.full((B, K), -1, dtype=torch.long)
    finished_nodes = torch.full((B, K), -1, dtype=torch.long)
    nodes: list[BeamNode] = tracer.trace.beam_nodes if tracer else []

    logits, state = engine.prefill(batch.ids, batch.mask, cfg.max_new_tokens)
    Engine.select(state, torch.arange(B, device=dev).repeat_interleave(K))
    logits = logits.repeat_interleave(K, 0)
    cur_len = T0
    stop_reason = "max_new_tokens"
    try:
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
            fired = req.stopping.fired(cand[:, :, T0 : cur_len + 1].reshape(B * keep, -1), cand_prompts)
            ends = torch.zeros_like(tok, dtype=torch.bool)
            for hit in fired.values():
                ends = ends | hit.view(B, keep)
            stop_hit = fired["stop"].view(B, keep) if "stop" in fired else torch.zeros_like(ends)

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
                cand_nodes = _record_nodes(tracer, nodes, running_nodes, src_beam, tok, lp, top_lp, just_done, next_idx,
                                           merged_idx, cur_len - T0, K, length_penalty)
                for b in range(B):
                    for k in range(K):
                        src = b * K + int(new_src[b, k])
                        tid = int(new_running[b, k, cur_len])
                        tracer.step(cur_len - T0, b * K + k, tid, raw_lp[src], lp[src], changes_row=src, raw_is_logprobs=True)
                running_nodes = _gather(cand_nodes, next_idx.cpu())
                finished_nodes = _gather(torch.cat((finished_nodes, cand_nodes), dim=1), merged_idx.cpu())

            running, running_scores = new_running, new_running_scores
            cur_len += 1
            yield BeamEvent(
                lambda r=running, n=cur_len: r[:, 0, T0:n].tolist(),
                functools.partial(_stable_prefixes, running, finished, finished_len, is_finished, can_improve,
                                  early is True, T0, cur_len),
            )

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
    finally:
        engine.release(state)  # batching: the next steps stop waiting for these rows

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


def _stable_prefixes(running, finished, finished_len, is_finished, can_improve, early_true: bool, T0: int,
                     cur_len: int) -> list[list[int]]:
    """Per prompt, the new ids every hypothesis that can still be returned starts with (see :class:`BeamEvent`).

    ``running`` / ``finished``: (B, K, max_len) ids; ``finished_len``: (B, K) new-token lengths; ``is_finished``
    (B, K) marks real finished entries; a prompt whose ``can_improve`` (B, 1) is False, or whose K finished slots are
    full under ``early_stopping=True``, is decided: its finished list no longer changes.
    """
    decided = ~can_improve[:, 0] | (torch.all(is_finished, dim=-1) & early_true)
    new = running[:, :, T0:cur_len]  # (B, K, L)
    ref = new[:, 0]  # (B, L): best running beam
    L = ref.shape[1]
    common = (new == ref[:, None]).all(dim=1).long().cumprod(dim=1).sum(dim=1)  # (B,)
    fin = finished[:, :, T0:cur_len]
    positions = torch.arange(L, device=running.device)
    match = (fin == ref[:, None]) & (positions[None, None, :] < finished_len[:, :, None])
    fin_common = match.long().cumprod(dim=2).sum(dim=2)  # (B, K)
    fin_common = torch.where(is_finished, fin_common, L)
    stable = torch.minimum(common, fin_common.min(dim=1).values).tolist()
    out = []
    for b, n in enumerate(stable):
        if bool(decided[b]) and bool(is_finished[b, 0]):
            out.append(finished[b, 0, T0 : T0 + int(finished_len[b, 0])].tolist())
        else:
            out.append(ref[b, :n].tolist())
    return out


def _record_nodes(tracer, nodes, running_nodes, src_beam, tok, lp, top_lp, just_done, next_idx, merged_idx, step, K,
                  length_penalty):
    """Add a :class:`BeamNode` for each of the ``keep`` candidates of every prompt; returns their node ids (B, keep).

    Status: ``kept`` (continues as a running beam), ``finished`` (ended and entered the K best finished
    hypotheses), ``pruned`` (not continued: outside the K best, or ended with a score that did not enter the
    finished list). Every ended candidate records its length-penalised score.
    """
    B, keep = tok.shape
    kept = torch.zeros((B, keep), dtype=torch.bool)
    kept.scatter_(1, next_idx.cpu(), True)
    entered = torch.zeros((B, keep + K), dtype=torch.bool)
    entered.scatter_(1, merged_idx.cpu(), True)
    entered = entered[:, K:]
    penalised = (top_lp / float(step + 1) ** length_penalty).tolist()
    cumulative = top_lp.tolist()
    src_list, tok_list, done_list = src_beam.tolist(), tok.tolist(), just_done.tolist()
    ids = torch.empty((B, keep), dtype=torch.long)
    for b in range(B):
        chosen_lp = lp.view(B, K, -1)[b].gather(1, torch.tensor(tok_list[b])[None, :].expand(K, -1).to(lp.device))
        for j in range(keep):
            src = src_list[b][j]
            parent = int(running_nodes[b, src])
            tid = tok_list[b][j]
            done = done_list[b][j]
            if done:
                status = "finished" if bool(entered[b, j]) else "pruned"
            else:
                status = "kept" if bool(kept[b, j]) else "pruned"
            ids[b, j] = len(nodes)
            nodes.append(
                BeamNode(
                    node=len(nodes),
                    parent=parent if parent >= 0 else None,
                    step=step,
                    row=b,
                    id=tid,
                    token=tracer.decode(tid),
                    logprob=float(chosen_lp[src, j]),
                    cumulative=cumulative[b][j],
                    status=status,
                    score=penalised[b][j] if done else None,
                )
            )
    return ids
