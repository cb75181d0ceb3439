"""Logits processors: ``(input_ids (B, T), scores (B, V)) -> scores (B, V)``, never in place.

Each class reproduces the transformers class named in its docstring (same arithmetic, so that decodelab's engine
returns the ids ``model.generate`` returns), except the OpenAI / llama.cpp penalties, which transformers lacks.
``build_processors`` assembles them in transformers' order (``GenerationMixin._get_logits_processor``):

1. sequence bias, then OpenAI ``logit_bias`` (additive),
2. repetition penalty, then presence / frequency penalties (generated tokens only, as in the OpenAI API),
3. no-repeat n-gram, bad words, min new tokens, the constraint (``json_schema`` / ``regex`` / ``grammar``),
   suppressed tokens,
4. only when sampling: temperature, top-k, top-p, min-p, typical-p, epsilon, eta.

The constraint sits where transformers puts its own constraint, ``PrefixConstrainedLogitsProcessor``: after
``MinNewTokensLengthLogitsProcessor``, before ``SuppressTokensLogitsProcessor`` and before every warper.
vLLM applies its grammar bitmask to the logits before its sampler's penalties and warpers (``apply_grammar_bitmask``
in the v1 GPU model runner). Both agree on what matters: the mask comes before temperature / top-k / top-p / min-p,
so those choose among allowed tokens only (a top-k taken first could keep only forbidden tokens and leave nothing).
Among the processors before it the order does not change the result (a ``-inf`` stays ``-inf`` under additions,
penalties and biases), so the trace's "mass removed" is measured on the distribution after penalties and biases,
before temperature.

``input_ids`` rows are left-padded; ``pad_lengths`` (B,) says how many leading positions of each row are padding, so
that padding never counts as a "seen" token. Scores may be logits (greedy, sampling) or log-probabilities (beam
search, where transformers applies ``log_softmax`` before the processors); every processor works on either.
A removed token gets ``-inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import GenerationConfig

NEG_INF = -math.inf


@dataclass
class Context:
    """What processors need besides the scores.

    Attributes:
        prompt_len: padded prompt length T0 in tokens (generated tokens are ``input_ids[:, T0:]``).
        pad_lengths: (B,) int64, left-padding length of each row.
        eos_ids: (E,) int64 end-of-sequence ids (may be empty).
        tokenizer: the Hugging Face tokenizer (needed only by :class:`GrammarConstraint`).
        vocab_size: V, the model's output size (needed only by :class:`GrammarConstraint`).
    """

    prompt_len: int
    pad_lengths: torch.Tensor
    eos_ids: torch.Tensor
    tokenizer: Any = None
    vocab_size: int | None = None


class Processor:
    """Base: subclasses set ``name`` and implement ``__call__(input_ids, scores) -> new scores``."""

    name = "processor"

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _seen_mask(input_ids: torch.Tensor, start: torch.Tensor | int, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which ids occur in ``input_ids[b, start[b]:]``."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    start_t = torch.as_tensor(start, device=input_ids.device).reshape(-1, 1)
    ids = input_ids.masked_fill(positions[None, :] < start_t, vocab_size)
    mask = torch.zeros((input_ids.shape[0], vocab_size + 1), dtype=torch.bool, device=input_ids.device)
    return mask.scatter_(1, ids, True)[:, :vocab_size]


class RepetitionPenalty(Processor):
    """transformers ``RepetitionPenaltyLogitsProcessor`` (CTRL, Keskar et al. 2019, arXiv:1909.05858).

    Every id seen in the prompt or the generated text (each id once, padding ignored) has its score divided by
    ``penalty`` when positive and multiplied by it when negative, so ``penalty > 1`` always lowers a seen token.
    """

    name = "repetition_penalty"

    def __init__(self, penalty: float, ctx: Context):
        self.penalty, self.ctx = penalty, ctx

    def __call__(self, input_ids, scores):
        seen = _seen_mask(input_ids, self.ctx.pad_lengths, scores.shape[-1])
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


class PresenceFrequencyPenalty(Processor):
    """OpenAI's presence / frequency penalties (llama.cpp ``penalty_present`` / ``penalty_freq``).

    ``score[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`` where ``count`` counts ``j`` among
    the generated tokens only (the prompt does not count), as the OpenAI API documents.
    """

    name = "presence_frequency_penalty"

    def __init__(self, presence: float, frequency: float, ctx: Context):
        self.presence, self.frequency, self.ctx = presence, frequency, ctx

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.ctx.prompt_len :]
        counts = torch.zeros_like(scores)
        if generated.shape[1]:
            counts = counts.scatter_add(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class SequenceBias(Processor):
    """transformers ``SequenceBiasLogitsProcessor`` (also used for ``bad_words_ids`` with a ``-inf`` bias and for
    OpenAI ``logit_bias``). A single-token sequence is always biased; a longer one biases its last token when the
    rest of it ends the current text. As in transformers, the biases are summed into one (B, V) tensor that is then
    added to the scores (so a single-token and a longer bias on the same token add up)."""

    def __init__(self, biases: dict[tuple[int, ...], float], name: str = "sequence_bias"):
        self.name = name
        self.single = {seq[0]: b for seq, b in biases.items() if len(seq) == 1}
        by_len: dict[int, list[tuple[tuple[int, ...], float]]] = {}
        for seq, b in biases.items():
            if len(seq) > 1:
                by_len.setdefault(len(seq) - 1, []).append((seq, b))
        self.groups = list(by_len.values())
        self._single_bias: torch.Tensor | None = None
        self._groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _prepare(self, scores: torch.Tensor) -> None:
        V, dev = scores.shape[-1], scores.device
        bias = torch.zeros(V, dtype=torch.float32, device=dev)
        if self.single:
            bias[list(self.single)] = torch.tensor(list(self.single.values()), dtype=torch.float32, device=dev)
        self._single_bias = bias
        self._groups = [
            (
                torch.tensor([seq[:-1] for seq, _ in group], device=dev),
                torch.tensor([seq[-1] for seq, _ in group], device=dev),
                torch.tensor([b for _, b in group], dtype=torch.float32, device=dev),
            )
            for group in self.groups
        ]

    def __call__(self, input_ids, scores):
        if self._single_bias is None or self._single_bias.shape[0] != scores.shape[-1] \
                or self._single_bias.device != scores.device:
            self._prepare(scores)
        bias = torch.zeros_like(scores) + self._single_bias
        for prefixes, last, values in self._groups:
            n = prefixes.shape[1]
            if n > input_ids.shape[1]:
                continue
            match = (input_ids[:, None, -n:] == prefixes).all(dim=-1)  # (B, G)
            bias.index_add_(1, last, torch.where(match, values, 0.0).to(bias.dtype))
        return scores + bias


class NoRepeatNGram(Processor):
    """transformers ``NoRepeatNGramLogitsProcessor`` (Paulus et al. 2017, arXiv:1705.04304): a token that would
    complete an n-gram already present in the row (prompt included, padding excluded) gets ``-inf``."""

    name = "no_repeat_ngram_size"

    def __init__(self, n: int, ctx: Context):
        self.n, self.ctx = n, ctx

    def __call__(self, input_ids, scores):
        n, cur_len = self.n, input_ids.shape[1]
        if cur_len + 1 < n:
            return scores
        out = scores.clone()
        for row, pad in enumerate(self.ctx.pad_lengths.tolist()):
            tokens = input_ids[row, pad:].tolist()
            if len(tokens) + 1 < n:
                continue
            prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
            banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}
            if banned:
                out[row, list(banned)] = NEG_INF
        return out


class MinNewTokens(Processor):
    """transformers ``MinNewTokensLengthLogitsProcessor``: eos ids get ``-inf`` until ``min_new_tokens`` tokens are
    generated."""

    name = "min_new_tokens"

    def __init__(self, min_new_tokens: int, ctx: Context):
        self.min_new_tokens, self.ctx = min_new_tokens, ctx

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.ctx.prompt_len >= self.min_new_tokens or self.ctx.eos_ids.numel() == 0:
            return scores
        out = scores.clone()
        out[:, self.ctx.eos_ids] = NEG_INF
        return out


class SuppressTokens(Processor):
    """transformers ``SuppressTokensLogitsProcessor``: the listed ids always get ``-inf``."""

    name = "suppress_tokens"

    def __init__(self, ids: tuple[int, ...]):
        self.ids = list(ids)

    def __call__(self, input_ids, scores):
        out = scores.clone()
        out[:, self.ids] = NEG_INF
        return out


class GrammarConstraint(Processor):
    """A JSON schema, regex or grammar (:mod:`decodelab.grammar`, compiled by llguidance) as a processor: every token
    that cannot continue the generated text towards a string the constraint accepts gets ``-inf``; the eos ids are
    allowed exactly when the text so far is complete (so a constrained text ends on eos only when it is valid).
    Plays the part of transformers' ``PrefixConstrainedLogitsProcessor`` (same place in the chain), with the
    allowed set computed by llguidance's ``LLMatcher`` instead of a user function.

    State: one matcher per distinct generated prefix, derived from the matcher of the same prefix minus its last
    token at the previous call (copied when several rows continue it). Rows are identified by their generated ids
    (``input_ids[:, prompt_len:]``), not their position, so beam search may reorder, drop and duplicate rows
    between steps, sampled rows may diverge, and several prompts may share a call. A row whose last token is an
    eos id (finished, fed padding) or that took a forbidden token (a ``-inf`` beam candidate) may only take eos.

    ``allowed`` holds the last call's (B, V) bool mask, read by the tracer.

    Raises:
        ConfigError: (constructor) the constraint does not compile against this tokenizer; a tokenizer that is not
            a fast one.
    """

    def __init__(self, kind: str, spec: str, ctx: Context):
        from .grammar import new_matcher

        if ctx.tokenizer is None or ctx.vocab_size is None:
            raise ValueError("GrammarConstraint needs Context.tokenizer and Context.vocab_size")
        self.name, self.ctx = kind, ctx
        self._root = new_matcher(kind, spec, ctx.tokenizer, ctx.vocab_size)
        self._eos = set(ctx.eos_ids.tolist())
        self._ll_eos = {int(self.ctx.tokenizer.eos_token_id)} if self.ctx.tokenizer.eos_token_id is not None else set()
        self._states: dict[tuple[int, ...], Any] = {}  # previous call: generated ids -> matcher (None: eos only)
        self.allowed: torch.Tensor | None = None

    def _advance(self, key: tuple[int, ...], uses: dict[tuple[int, ...], int]):
        """The matcher after the generated ids ``key`` (``None``: only eos may follow)."""
        if not key:
            return self._root.deep_copy()  # the root itself stays untouched
        if key[-1] in self._eos:
            return None
        parent_key = key[:-1]
        if parent_key not in self._states:  # not seen at the previous call (a first call after some tokens): replay
            m = self._root.deep_copy()
            return m if m.consume_tokens(list(key)) else None
        parent = self._states[parent_key]
        if parent is None:
            return None
        uses[parent_key] -= 1
        m = parent if uses[parent_key] == 0 else parent.deep_copy()  # the last child takes the parent itself
        return m if m.consume_token(key[-1]) else None

    def __call__(self, input_ids, scores):
        B, V = scores.shape
        keys = [tuple(row) for row in input_ids[:, self.ctx.prompt_len :].tolist()]
        distinct = list(dict.fromkeys(keys))
        uses: dict[tuple[int, ...], int] = {}
        for key in distinct:
            if key:
                uses[key[:-1]] = uses.get(key[:-1], 0) + 1
        states = {key: self._advance(key, uses) for key in distinct}
        self._states = states
        bits = torch.zeros((len(distinct), (V + 31) // 32), dtype=torch.int32)
        accepting = []
        for i, key in enumerate(distinct):
            m = states[key]
            if m is not None and not m.is_error():
                m.unsafe_compute_mask_ptr(bits[i].data_ptr(), bits.shape[1] * 4)
                accepting.append(m.is_accepting())
            else:
                accepting.append(True)
        # bit j of word w is token 32 w + j. numpy, single-threaded, on purpose: on a busy 2-core CPU torch's
        # threaded kernels for these (D, V) ops stall for milliseconds each; numpy takes microseconds
        allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=-1, bitorder="little").view(np.bool_)[:, :V]
        ll_eos = [i for i in self._ll_eos if i < V and i not in self._eos]
        if ll_eos:  # llguidance's own eos is the tokenizer's; the request's eos ids replace it
            allowed[:, ll_eos] = False
        eos = [i for i in sorted(self._eos) if i < V]
        if eos:
            allowed[:, eos] = np.array(accepting)[:, None]
        row_of = {key: i for i, key in enumerate(distinct)}
        allowed = allowed[[row_of[k] for k in keys]]  # (B, V)
        self.allowed = torch.from_numpy(allowed)
        if scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad:
            return torch.from_numpy(np.where(allowed, scores.numpy(), np.float32(NEG_INF)))
        self.allowed = self.allowed.to(scores.device)
        return scores.masked_fill(~self.allowed, NEG_INF)


class Temperature(Processor):
    """transformers ``TemperatureLogitsWarper``: ``scores / temperature``."""

    name = "temperature"

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopK(Processor):
    """transformers ``TopKLogitsWarper``: keep the ``k`` best scores (ties with the k-th kept)."""

    name = "top_k"

    def __init__(self, k: int, min_keep: int = 1):
        self.k = max(k, min_keep)

    def __call__(self, input_ids, scores):
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(scores < kth, NEG_INF)


class TopP(Processor):
    """transformers ``TopPLogitsWarper`` (nucleus sampling, Holtzman et al. 2019, arXiv:1904.09751): keep the smallest
    set of most likely tokens whose probability mass reaches ``top_p`` (at least ``min_keep``).

    Same arithmetic as transformers (ascending sort, ``cumsum(softmax) <= 1 - top_p`` is removed); among tokens of
    equal score the lower id counts as the more likely one (a stable sort of the reversed vocabulary), so the result
    does not depend on the sort's tie order: probabilities [0.5, 0.25, 0.25] at ``top_p=0.75`` keep ids 0 and 1.
    """

    name = "top_p"

    def __init__(self, p: float, min_keep: int = 1):
        self.p, self.min_keep = p, min_keep

    def __call__(self, input_ids, scores):
        V = scores.shape[-1]
        sorted_logits, rev_idx = torch.sort(scores.flip(-1), descending=False, stable=True)
        sorted_idx = (V - 1) - rev_idx
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - self.p)
        remove[..., -self.min_keep :] = False
        return scores.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)


class MinP(Processor):
    """transformers ``MinPLogitsWarper`` (Nguyen et al. 2024, arXiv:2407.01082): drop tokens whose probability is
    below ``min_p`` times the top token's probability."""

    name = "min_p"

    def __init__(self, min_p: float, min_keep: int = 1):
        self.min_p, self.min_keep = min_p, min_keep

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores, dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_keep, probs.shape[-1]), dim=-1).indices
        remove = remove.scatter(-1, keep, False)
        return scores.masked_fill(remove, NEG_INF)


class TypicalP(Processor):
    """transformers ``TypicalLogitsWarper`` (locally typical sampling, Meister et al. 2022, arXiv:2202.00666)."""

    name = "typical_p"

    def __init__(self, mass: float, min_keep: int = 1):
        self.mass, self.min_keep = mass, min_keep

    def __call__(self, input_ids, scores):
        logp = torch.nn.functional.log_softmax(scores, dim=-1)
        ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
        shifted = torch.abs(-logp - ent)
        sorted_shift, sorted_idx = torch.sort(shifted, descending=False)
        cum = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
        last = (cum < self.mass).sum(dim=1).clamp_(max=sorted_shift.shape[-1] - 1)
        remove = sorted_shift > sorted_shift.gather(1, last.view(-1, 1))
        remove[..., : self.min_keep] = False
        return scores.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)


class EpsilonCutoff(Processor):
    """transformers ``EpsilonLogitsWarper`` (truncation sampling, Hewitt et al. 2022, arXiv:2210.15191): drop tokens
    with probability below ``epsilon``. With ``eta=True`` it is ``EtaLogitsWarper``: the threshold is
    ``min(epsilon, sqrt(epsilon) * exp(-entropy))``."""

    def __init__(self, epsilon: float, min_keep: int = 1, eta: bool = False):
        self.epsilon, self.min_keep, self.eta = epsilon, min_keep, eta
        self.name = "eta_cutoff" if eta else "epsilon_cutoff"

    def __call__(self, input_ids, scores):
        probs = scores.softmax(dim=-1)
        threshold: torch.Tensor | float = self.epsilon
        if self.eta:
            eps = torch.tensor(self.epsilon, device=scores.device)
            entropy = torch.distributions.Categorical(logits=scores).entropy()
            threshold = torch.min(eps, torch.sqrt(eps) * torch.exp(-entropy))[..., None]
        kth = torch.topk(scores, min(self.min_keep, scores.shape[-1]))[0][..., -1, None]
        return scores.masked_fill((probs < threshold) & (scores < kth), NEG_INF)


def build_processors(cfg: GenerationConfig, ctx: Context) -> list[Processor]:
    """The processors ``cfg`` asks for, in transformers' order (see the module docstring).

    Warpers (temperature ... eta) are included only when ``cfg.do_sample``. For beam sampling they keep at least
    ``len(eos_ids) + 1`` tokens, as transformers does.
    """
    procs: list[Processor] = []
    if cfg.sequence_bias:
        procs.append(SequenceBias(dict(cfg.sequence_bias)))
    if cfg.logit_bias:
        procs.append(SequenceBias({(i,): b for i, b in cfg.logit_bias}, name="logit_bias"))
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(cfg.repetition_penalty, ctx))
    if cfg.presence_penalty or cfg.frequency_penalty:
        procs.append(PresenceFrequencyPenalty(cfg.presence_penalty, cfg.frequency_penalty, ctx))
    if cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGram(cfg.no_repeat_ngram_size, ctx))
    if cfg.bad_words_ids:
        eos = set(ctx.eos_ids.tolist())
        words = {seq: NEG_INF for seq in cfg.bad_words_ids if not (len(seq) == 1 and seq[0] in eos)}
        if words:
            procs.append(SequenceBias(words, name="bad_words_ids"))
    if cfg.min_new_tokens > 0 and not cfg.ignore_eos:
        procs.append(MinNewTokens(cfg.min_new_tokens, ctx))
    if cfg.constraint is not None:
        procs.append(GrammarConstraint(*cfg.constraint, ctx))
    if cfg.suppress_tokens:
        procs.append(SuppressTokens(cfg.suppress_tokens))
    if cfg.do_sample:
        keep = ctx.eos_ids.numel() + 1 if cfg.num_beams > 1 else 1
        keep = max(keep, 2) if cfg.num_beams > 1 else keep
        if cfg.temperature != 1.0:
            procs.append(Temperature(cfg.temperature))
        if cfg.top_k != 0:
            procs.append(TopK(cfg.top_k, keep))
        if cfg.top_p < 1.0:
            procs.append(TopP(cfg.top_p, keep))
        if cfg.min_p is not None:
            procs.append(MinP(cfg.min_p, keep))
        if cfg.typical_p < 1.0:
            procs.append(TypicalP(cfg.typical_p, keep))
        if 0.0 < cfg.epsilon_cutoff < 1.0:
            procs.append(EpsilonCutoff(cfg.epsilon_cutoff, keep))
        if 0.0 < cfg.eta_cutoff < 1.0:
            procs.append(EpsilonCutoff(cfg.eta_cutoff, keep, eta=True))
    return procs


def apply(procs: list[Processor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Run ``procs`` in order; returns a new (B, V) tensor (``scores`` itself when the list is empty)."""
    for p in procs:
        scores = p(input_ids, scores)
    return scores
