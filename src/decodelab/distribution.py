"""Distribution: the model's next-token distribution at one position, and the math behind it.

``logits -> log_softmax -> top-k``; probabilities are ``exp(logprob)``; entropy is ``-sum p log p`` in nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .trace import Candidate, _Plain


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dimension, in float32. Shape unchanged (..., V)."""
    return torch.log_softmax(logits.float(), dim=-1)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution given as log-probabilities (..., V) -> (...). ``-inf`` entries count 0."""
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)


def rank_of(scores: torch.Tensor, token_id: int) -> int:
    """0-based rank of ``token_id`` in the 1-D ``scores`` (V,): how many tokens score strictly higher."""
    return int((scores > scores[token_id]).sum())


def top_candidates(logits: torch.Tensor, k: int, tokenizer, logprobs: torch.Tensor | None = None) -> list[Candidate]:
    """The ``k`` highest-scoring entries of the 1-D ``logits`` (V,) as :class:`Candidate` s, best first.

    Removed tokens (``-inf`` logits) are not listed. ``logprobs`` defaults to ``log_softmax(logits)``.
    """
    lp = log_probs(logits) if logprobs is None else logprobs
    k = min(k, logits.shape[-1])
    if k <= 0:
        return []
    values, idx = torch.topk(logits.float(), k)
    out = []
    for v, i in zip(values.tolist(), idx.tolist()):
        if v == float("-inf"):
            break
        l = float(lp[i])
        out.append(Candidate(id=i, token=tokenizer.decode([i]), logit=float(v), prob=float(torch.tensor(l).exp()), logprob=l))
    return out


@dataclass
class Distribution(_Plain):
    """The next-token distribution after ``text``.

    Attributes:
        text: the input text.
        ids: its token ids (length T).
        logits_shape: shape of the model's logits for the whole text, ``[1, T, V]``.
        argmax: the most likely next token.
        top: the ``top_k`` most likely next tokens, best first (``prob`` in [0, 1], ``logprob`` natural log).
        entropy: entropy of the full next-token distribution, nats.
    """

    text: str
    ids: list[int]
    logits_shape: list[int]
    argmax: Candidate
    top: list[Candidate] = field(default_factory=list)
    entropy: float = 0.0

    def _repr_html_(self) -> str:
        from .render import distribution_html

        return distribution_html(self)
