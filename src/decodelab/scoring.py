"""Scoring: how likely the model finds a given text, token by token (teacher forcing, one forward pass).

For ids ``x_0 .. x_{T-1}`` the model's logits at position ``t`` predict ``x_{t+1}``. Each token ``t >= 1`` gets

- ``logprob = log_softmax(logits[t-1])[x_t]`` (natural log; the first token has no prediction: ``None``),
- ``rank``: how many vocabulary entries the model scored strictly higher (0 = the argmax),
- ``entropy``: ``-sum p log p`` of the distribution that predicted it, in nats,
- ``top``: optionally the ``top_logprobs`` most likely alternatives at that position (OpenAI ``logprobs``).

``perplexity = exp(-mean logprob)`` over the T-1 predicted tokens, which equals ``exp(loss)`` of transformers'
``model(ids, labels=ids)`` (mean cross-entropy of the shifted labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .distribution import entropy, top_candidates
from .trace import Candidate, _Plain

CHUNK = 256
"""Positions processed at once (bounds the extra (CHUNK, V) float32 memory next to the logits)."""


@dataclass
class TokenScore(_Plain):
    """One token of a scored text.

    Attributes:
        id: token id.
        token: ``tokenizer.decode([id])`` (may be U+FFFD for part of a multi-byte character).
        logprob: natural-log probability the model gave this token after the preceding ones; ``None`` for the first.
        rank: 0-based rank of the token in that distribution (``None`` for the first).
        entropy: entropy in nats of that distribution (``None`` for the first).
        top: the most likely tokens at that position, best first (empty unless ``top_logprobs`` > 0, and for the
            first token).
    """

    id: int
    token: str
    logprob: float | None = None
    rank: int | None = None
    entropy: float | None = None
    top: list[Candidate] = field(default_factory=list)


@dataclass
class Score(_Plain):
    """The teacher-forced score of a text.

    Attributes:
        model: the model's name.
        text: the scored text (decoded from the ids when they were given directly).
        tokens: one :class:`TokenScore` per token.
        total_logprob: sum of the predicted tokens' log-probabilities (nats; 0.0 with one token).
        mean_logprob: their mean (``None`` when there is only one token, so nothing is predicted).
        perplexity: ``exp(-mean_logprob)`` (``None`` with one token).
    """

    model: str
    text: str
    tokens: list[TokenScore]
    total_logprob: float
    mean_logprob: float | None
    perplexity: float | None

    @property
    def ids(self) -> list[int]:
        """The token ids, in order."""
        return [t.id for t in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)

    def _repr_html_(self) -> str:  # notebook view
        from .render import score_html

        return score_html(self)


@torch.inference_mode()
def score_ids(engine, tokenizer, ids: list[int], *, top_logprobs: int = 0, name: str = "", text: str | None = None
              ) -> Score:
    """Score ``ids`` (length T >= 1) with one forward pass of ``engine`` (teacher forcing).

    Args:
        engine: :class:`decodelab.engine.Engine` (its ``full_logits``: (1, T) ids -> (1, T, V) float32).
        tokenizer: decodes each token for display.
        ids: the token ids (the caller checks the context window).
        top_logprobs: how many alternatives to list per predicted position (0: none).
        name: model name recorded in the result.
        text: the text the ids came from (default: their decode).

    Returns:
        :class:`Score`.
    """
    logits = engine.full_logits(torch.tensor([ids], dtype=torch.long))[0]  # (T, V)
    T = len(ids)
    target = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
    chosen, ranks, ents, tops = [], [], [], []
    for start in range(0, T - 1, CHUNK):
        lg = logits[start : min(start + CHUNK, T - 1)]
        lp = torch.log_softmax(lg.float(), dim=-1)  # (n, V)
        tgt = target[start : start + lp.shape[0]]
        picked = lp.gather(1, tgt[:, None])  # (n, 1)
        chosen += picked[:, 0].tolist()
        ranks += (lp > picked).sum(dim=-1).tolist()
        ents += entropy(lp).tolist()
        if top_logprobs > 0:
            tops += [top_candidates(lg[i], top_logprobs, tokenizer, lp[i]) for i in range(lp.shape[0])]
    tokens = [TokenScore(id=ids[0], token=tokenizer.decode([ids[0]]))]
    for i, tid in enumerate(ids[1:]):
        tokens.append(
            TokenScore(id=tid, token=tokenizer.decode([tid]), logprob=chosen[i], rank=int(ranks[i]),
                       entropy=ents[i], top=tops[i] if tops else [])
        )
    total = float(sum(chosen))
    mean = total / len(chosen) if chosen else None
    return Score(
        model=name,
        text=tokenizer.decode(ids) if text is None else text,
        tokens=tokens,
        total_logprob=total,
        mean_logprob=mean,
        perplexity=math.exp(-mean) if mean is not None else None,
    )
