"""Degeneration metrics of a set of generations, as in Holtzman et al. (2019), "The Curious Case of Neural Text
Degeneration" (ICLR 2020), Table 1, plus distinct-n, length, eos rate and (optionally) MAUVE.

Every metric here works on **token ids of the generating model** (the paper worked on GPT-2 token ids, in its
released scripts ``metrics/*.py`` of github.com/ari-holtzman/degen), pooled over all generations of one strategy.
A generation's tokens are its new ids with the final eos token left out (``content_ids``); perplexity alone also
counts the eos token, since the model chose it.

=====================  ===============================================================================================
metric                 definition (source)
=====================  ===============================================================================================
perplexity             ``exp(-sum(logprobs) / count)`` over every generated token of every generation, each token's
                       natural-log probability under the model given the prompt and the tokens before it (teacher
                       forcing, the raw distribution before any processor); one pooled, token-weighted mean, as the
                       paper's ``metrics/perplexity.py``. Unitless, >= 1.
self_bleu4             mean over (up to ``sample``, default 1000, as the paper) generations of BLEU-4 of that generation
                       against all the *other* generations of the strategy as references: nltk's ``sentence_bleu``,
                       weights (1/4, 1/4, 1/4, 1/4), ``SmoothingFunction().method1`` (Zhu et al. 2018, Texygen; the
                       paper's ``metrics/self_bleu.py``). In [0, 1]; higher = less diverse.
zipf                   ``-slope`` of the least-squares line through (log rank, log count) of the token counts, the
                       ``top`` (default 5000) most frequent tokens (the paper's ``metrics/zipf.py``; numpy's
                       ``polyfit`` gives ``scipy.stats.linregress``'s slope). Natural text is near 1.
repetition             share of generations (0..1; the paper prints it in %) whose *end* is a loop, by the rule of the
                       paper's ``metrics/repetition.py``: for each phrase length n = 1..90, count how many times the last
                       n tokens repeat back to back at the end; take the n with the most repeats (the smallest such n);
                       the generation repeats when that count is >= 2 and (n >= 3 or count > 50). The paper's prose
                       speaks of generations that "end in a repetition loop"; its script also ignores short loops
                       (n < 3) unless they run more than 50 times. We implement the script.
distinct_n             distinct n-grams / all n-grams, pooled over the strategy's generations (Li et al. 2016,
                       "A Diversity-Promoting Objective Function for Neural Conversation Models"). In (0, 1]. (The
                       paper's ``metrics/distinct_n.py`` counts n-grams seen *exactly once* instead; we use Li et al.)
mean_length            mean number of content tokens (new tokens without the final eos) per generation.
eos_rate               share of generations that ended with the model's eos token (not the length limit).
mauve                  MAUVE (Pillutla et al. 2021, the ``mauve-text`` package) between the generations and the human
                       references, on features given by the caller (see :func:`decodelab.sweeps.metrics.mauve_score`). In (0, 1].
=====================  ===============================================================================================
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Iterable, Sequence

MAX_REPEAT_N = 90  # metrics/repetition.py: max_n
SELF_BLEU_SAMPLE = 1000  # metrics/self_bleu.py: --n_sample
ZIPF_TOP = 5000  # metrics/zipf.py: --N


def perplexity(logprob_lists: Iterable[Sequence[float]]) -> float | None:
    """Pooled perplexity ``exp(-mean logprob)`` over every token of every list (natural logs). ``None`` when there
    are no tokens."""
    total, count = 0.0, 0
    for lps in logprob_lists:
        total += math.fsum(lps)
        count += len(lps)
    return math.exp(-total / count) if count else None


def self_bleu(token_lists: Sequence[Sequence], *, sample: int = SELF_BLEU_SAMPLE, seed: int = 0,
              max_n: int = 4) -> float | None:
    """Self-BLEU-``max_n`` (default 4): the mean BLEU of each sampled generation against all the others (see the
    module docstring). ``None`` with fewer than two generations. Empty generations score 0 (nltk's rule)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    docs = [list(t) for t in token_lists]
    if len(docs) < 2:
        return None
    picked = range(len(docs)) if len(docs) <= sample else random.Random(seed).sample(range(len(docs)), sample)
    weights = tuple([1.0 / max_n] * max_n)
    smooth = SmoothingFunction().method1
    scores = [sentence_bleu(docs[:i] + docs[i + 1:], docs[i], weights=weights, smoothing_function=smooth)
              for i in picked]
    return math.fsum(scores) / len(scores)


def zipf_fit(token_lists: Iterable[Sequence], *, top: int = ZIPF_TOP) -> tuple[float, float] | None:
    """``(s, intercept)`` of the least-squares fit ``log count = intercept - s * log rank`` over the ``top`` most
    frequent tokens; ``s`` is the Zipf coefficient. ``None`` with fewer than two distinct tokens."""
    import numpy as np

    counts = Counter(t for toks in token_lists for t in toks)
    if len(counts) < 2:
        return None
    ys = np.array(sorted(counts.values(), reverse=True)[:top], dtype=np.float64)
    xs = np.arange(1, len(ys) + 1, dtype=np.float64)
    slope, intercept = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(-slope), float(intercept)


def zipf(token_lists: Iterable[Sequence], *, top: int = ZIPF_TOP) -> float | None:
    """The Zipf coefficient (see :func:`zipf_fit`)."""
    fit = zipf_fit(token_lists, top=top)
    return None if fit is None else fit[0]


def tail_loop(tokens: Sequence) -> tuple[int, int]:
    """``(n, repeats)``: the phrase length n (1..90) whose last-n-token phrase repeats the most times back to back at
    the end of ``tokens``, and that count (1 = no repeat). Ties go to the smallest n (the paper's script)."""
    rev = list(reversed(tokens))
    best_n, best = 1, 0
    for n in range(1, MAX_REPEAT_N + 1):
        repeats = 1
        while len(rev[n * repeats: n * (repeats + 1)]) == n and rev[n * repeats: n * (repeats + 1)] == rev[:n]:
            repeats += 1
        if repeats > best:
            best_n, best = n, repeats
    return best_n, best


def repeats_at_end(tokens: Sequence) -> bool:
    """Whether ``tokens`` end in a repetition loop: :func:`tail_loop` gives ``repeats >= 2`` and (``n >= 3`` or
    ``repeats > 50``)."""
    if not tokens:
        return False
    n, repeats = tail_loop(tokens)
    return repeats > 1 and (n >= 3 or repeats > 50)


def repetition_rate(token_lists: Sequence[Sequence]) -> float | None:
    """Share (0..1) of generations that end in a repetition loop (:func:`repeats_at_end`). ``None`` for none."""
    if not token_lists:
        return None
    return sum(repeats_at_end(t) for t in token_lists) / len(token_lists)


def distinct_n(token_lists: Iterable[Sequence], n: int) -> float | None:
    """Distinct n-grams / all n-grams over all the generations (Li et al. 2016). ``None`` when there is no
    n-gram."""
    seen, total = set(), 0
    for toks in token_lists:
        grams = [tuple(toks[i: i + n]) for i in range(len(toks) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else None


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean, ``None`` for no values."""
    return math.fsum(values) / len(values) if values else None


COLUMNS = ("strategy", "rows", "perplexity", "judge_perplexity", "self_bleu4", "zipf", "repetition", "distinct_1",
           "distinct_2", "distinct_3", "mean_length", "eos_rate", "mauve")
"""The metrics table's columns (``judge_perplexity`` and ``mauve`` are None unless asked for)."""


def content_ids(row: dict) -> list:
    """A row's token ids without the final eos (the tokens the text metrics count)."""
    ids = row["ids"]
    return ids[:-1] if row.get("eos") and ids else ids


def summarize(rows: Sequence[dict], order: Sequence[str] | None = None, *,
              self_bleu_sample: int = SELF_BLEU_SAMPLE) -> list[dict]:
    """One dict of :data:`COLUMNS` per strategy (in ``order``, then any other strategy in first-seen order) from
    the sweep's rows (see :mod:`decodelab.sweeps.worker` for a row's fields)."""
    groups: dict[str, list[dict]] = {}
    for name in order or []:
        groups[name] = []
    for row in rows:
        groups.setdefault(row["strategy"], []).append(row)
    table = []
    for name, group in groups.items():
        if not group:
            continue
        toks = [content_ids(r) for r in group]
        judged = [r["judge"]["logprobs"] for r in group if r.get("judge")]
        generated = [r for r in group if r.get("finish_reason") != "reference"]
        table.append({
            "strategy": name,
            "rows": len(group),
            "perplexity": perplexity(r["logprobs"] for r in group),
            "judge_perplexity": perplexity(judged) if judged else None,
            "self_bleu4": self_bleu(toks, sample=self_bleu_sample),
            "zipf": zipf(toks),
            "repetition": repetition_rate(toks),
            "distinct_1": distinct_n(toks, 1),
            "distinct_2": distinct_n(toks, 2),
            "distinct_3": distinct_n(toks, 3),
            "mean_length": mean([len(t) for t in toks]),
            "eos_rate": mean([1.0 if r.get("eos") else 0.0 for r in generated]) if generated else None,
            "mauve": None,
        })
    return table
