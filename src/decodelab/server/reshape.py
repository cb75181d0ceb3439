"""The next-token distribution before and after temperature / top-k / top-p / min-p, for ``POST /api/next-token``.

The server-side "after" distribution is computed on the full vocabulary with decodelab's own warpers
(:class:`decodelab.processors.Temperature`, ``TopK``, ``TopP``, ``MinP``, in transformers' order, built by
:func:`decodelab.processors.build_processors`), so there is one implementation of the maths.

The web page reshapes the distribution again in the browser whenever only those sliders move, without another
forward pass. For that it gets a compact, temperature-independent summary of the raw logits (:func:`logit_summary`):
the ``N`` highest logits exactly, and the other ``V - N`` as a histogram of bins ``bin_width`` wide, each bin given
by its count and the mean of its logits. Within a bin of width w the relative error of ``sum(exp(l / T))`` from
using the mean is about ``var / (2 T^2) <= w^2 / (24 T^2)`` (second-order Taylor term; the first-order term is zero
at the mean), i.e. under 0.01 % for w = 0.05 and T >= 0.5, so the browser's renormalised probabilities agree with the
server's to about 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import MIN_TEMPERATURE, GenerationConfig
from ..distribution import entropy, log_probs
from ..processors import Context, apply, build_processors
from ..tokens import display_piece, token_bytes

TAIL_BIN_WIDTH = 0.05  # logit units


@dataclass(frozen=True)
class Warpers:
    """Validated reshaping settings (transformers names; ``top_k`` here is the *filter*, 0 = off).

    ``greedy`` is what :class:`~decodelab.config.GenerationConfig` decides for these settings: a temperature below
    ``decodelab.config.MIN_TEMPERATURE`` (0 included) means greedy, all the mass on the argmax, as in the OpenAI
    API; the page's JavaScript mirror uses the same threshold.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    greedy: bool = False

    @classmethod
    def validated(cls, temperature=None, top_k=None, top_p=None, min_p=None) -> "Warpers":
        """Validate through :meth:`GenerationConfig.from_kwargs` (the one place generation knobs are checked).

        Raises:
            ConfigError: a value out of range (e.g. ``top_p=1.5``), naming the parameter.
        """
        cfg = GenerationConfig.from_kwargs(
            do_sample=True, temperature=temperature, top_k=0 if top_k is None else top_k, top_p=top_p, min_p=min_p
        )
        return cls(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, greedy=not cfg.do_sample)

    def config(self) -> GenerationConfig:
        """The sampling config these settings stand for."""
        return GenerationConfig.from_kwargs(
            do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                "greedy": self.greedy, "min_temperature": MIN_TEMPERATURE}


def warp(logits: torch.Tensor, w: Warpers) -> torch.Tensor:
    """Apply ``w`` to a (V,) float32 logits vector -> (V,) processed scores (``-inf`` where a token is removed).

    Uses :func:`decodelab.processors.build_processors` on the sampling config, so the warpers and their order are
    exactly those of sampling in ``LM.generate``. Greedy settings keep only the argmax (its logit unchanged).
    """
    scores = logits.float()[None, :]
    if w.greedy:
        out = torch.full_like(scores, -math.inf)
        best = int(scores[0].argmax())
        out[0, best] = scores[0, best]
        return out[0]
    ctx = Context(prompt_len=0, pad_lengths=torch.zeros(1, dtype=torch.long), eos_ids=torch.zeros(0, dtype=torch.long))
    procs = build_processors(w.config(), ctx)
    return apply(procs, torch.zeros((1, 0), dtype=torch.long), scores)[0]


def describe(tokenizer, token_id: int) -> dict:
    """``{"id", "token", "display", "special"}`` for one id: ``token`` is ``decode([id])`` (may hold U+FFFD),
    ``display`` is byte-exact (``<0xNN>`` escapes for partial UTF-8)."""
    return {
        "id": token_id,
        "token": tokenizer.decode([token_id]),
        "display": display_piece(token_bytes(tokenizer, token_id)),
        "special": token_id in set(tokenizer.all_special_ids),
    }


def logit_summary(logits: torch.Tensor, n: int, tokenizer, bin_width: float = TAIL_BIN_WIDTH) -> dict:
    """The browser's input for client-side reshaping.

    Args:
        logits: (V,) raw logits.
        n: how many of the highest logits to send exactly (clipped to V).

    Returns:
        ``{"candidates": [{"id", "token", "display", "special", "logit"}] * n (best first),
        "tail": {"count": V - n, "bin_width": w, "bins": [[mean_logit, count], ...] (highest bin first)}}``.
    """
    v = logits.shape[-1]
    n = max(1, min(n, v))
    values, idx = torch.sort(logits.double(), descending=True)
    cands = []
    for val, i in zip(values[:n].tolist(), idx[:n].tolist()):
        cands.append({**describe(tokenizer, i), "logit": val})
    tail = values[n:]
    tail = tail[torch.isfinite(tail)]
    bins: list[list[float]] = []
    if tail.numel():
        keys = torch.floor(tail / bin_width).long()
        uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        sums = torch.zeros(uniq.shape[0], dtype=torch.float64).index_add_(0, inverse, tail)
        means = (sums / counts).tolist()
        bins = [[m, int(c)] for m, c in sorted(zip(means, counts.tolist()), reverse=True)]
    return {"candidates": cands, "tail": {"count": int(tail.numel()), "bin_width": bin_width, "bins": bins}}


def before_after(logits: torch.Tensor, w: Warpers, top_k: int, tokenizer) -> dict:
    """The raw top-``top_k`` and the same tokens after the warpers.

    Args:
        logits: (V,) raw logits of the next position.
        w: the warpers.
        top_k: how many raw candidates to describe.

    Returns:
        ``{"top": [{"id", "token", "display", "special", "logit", "prob", "logprob"}] (raw softmax, best first),
        "after": [{"id", "token", "display", "special", "score", "prob", "logprob", "kept"}] (the same tokens in
        the same order; ``score`` is the processed logit, ``-inf`` -> ``None`` when removed, ``prob`` the
        renormalised probability, 0 when removed), "kept_count": how many of the V tokens survive,
        "entropy": raw entropy (nats), "entropy_after": entropy of the reshaped distribution (nats)}``.
    """
    raw_lp = log_probs(logits)
    processed = warp(logits, w)
    proc_lp = log_probs(processed)
    k = min(top_k, logits.shape[-1])
    values, idx = torch.topk(logits.float(), k)
    top, after = [], []
    for val, i in zip(values.tolist(), idx.tolist()):
        d = describe(tokenizer, i)
        lp = float(raw_lp[i])
        top.append({**d, "logit": val, "prob": math.exp(lp), "logprob": lp})
        kept = bool(torch.isfinite(processed[i]))
        plp = float(proc_lp[i])
        after.append(
            {
                **d,
                "score": float(processed[i]) if kept else None,
                "prob": math.exp(plp) if kept else 0.0,
                "logprob": plp if kept else None,
                "kept": kept,
            }
        )
    return {
        "top": top,
        "after": after,
        "kept_count": int(torch.isfinite(processed).sum()),
        "entropy": float(entropy(raw_lp)),
        "entropy_after": float(entropy(proc_lp)),
    }
