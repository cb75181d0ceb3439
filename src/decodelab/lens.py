"""Logit lens: what each decoder layer would predict at each decode step if the model stopped there.

For layer ``l`` and the position that predicted new token ``t``, the lens logits are
``lm_head(final_norm(h_l))`` (shape (V,)), where ``h_l`` is that layer's output (the residual stream after layer
``l``), ``final_norm`` the model's own final normalisation and ``lm_head`` its own output layer (nostalgebraist 2020;
TransformerLens' ``accumulated_resid`` + ``apply_ln``). For the last layer this is exactly the model's real
next-token logits: the same modules on the same tensor.

How it is computed (the least invasive way: the engine, the fast path and the search loops are untouched): after
the generation, one teacher-forced forward pass of the transformers model over ``prompt + new ids`` of each
returned sequence, with a forward hook on every decoder layer that keeps its output. A causal model's hidden state
at a position depends only on the tokens up to it, so these are the hidden states the decode steps had (up to float
rounding between a KV-cached step and a full pass: the last layer's lens equals the trace's ``Step.logprob`` to
~1e-6). Hooks rather than ``output_hidden_states``: transformers returns the *normed* last hidden state there, and
the lens must apply the norm itself to every layer. The pass runs on the transformers model's own weights in its
dtype, so with ``quantize`` the lens shows the unquantized model; logit post-processing a model may do after its
output layer (Gemma 2's soft-capping) is not applied.

Cost: one forward pass per returned sequence plus a (steps, hidden) x (hidden, V) product per layer.
"""

from __future__ import annotations

import torch

from .distribution import log_probs, rank_of, top_candidates
from .errors import ConfigError
from .threads import model_threads
from .trace import LensLayer, LensStep


def lens_modules(model) -> tuple[list[torch.nn.Module], torch.nn.Module, torch.nn.Module]:
    """``(decoder layers, final norm, output layer)`` of a transformers ``*ForCausalLM``.

    Raises:
        ConfigError: the model has no ``get_decoder().layers`` list, final norm (``norm`` / ``final_layernorm`` /
            ``ln_f``) or output embeddings, so the lens cannot be computed (one line naming the model class).
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    norm = next((getattr(base, n) for n in ("norm", "final_layernorm", "ln_f") if getattr(base, n, None) is not None),
                None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or norm is None or head is None:
        raise ConfigError(f"invalid lens: {type(model).__name__} has no decoder layer list, final norm and output "
                          "layer for the logit lens", param="lens")
    return list(layers), norm, head


@torch.inference_mode()
def layer_logits(model, ids: list[int], positions: range) -> torch.Tensor:
    """Lens logits of every decoder layer at ``positions`` of the sequence ``ids`` (one forward pass, no cache).

    Returns a float32 tensor of shape (L, len(positions), V): ``[l, i]`` is ``lm_head(final_norm(h_l))`` at position
    ``positions[i]``, where ``h_l`` is decoder layer ``l``'s output. ``[L - 1]`` equals the model's logits there.

    Raises:
        ConfigError: as :func:`lens_modules`.
    """
    layers, norm, head = lens_modules(model)
    outputs: list[torch.Tensor] = []

    def keep(_module, _args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)  # (1, T, hidden)

    device = next(model.parameters()).device
    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        x = torch.tensor([ids], device=device)
        model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rows = torch.tensor(list(positions), device=device, dtype=torch.long)
    return torch.stack([head(norm(h[0, rows])).float() for h in outputs])  # (L, steps, V)


def _lens_passes(engine, fn):
    """Run ``fn()`` where the model may be called: in the batching scheduler's thread when batching is on."""
    scheduler = engine._routed()
    if scheduler is not None:
        return scheduler.run_pass(fn)
    with model_threads():
        return fn()


def sequence_lens(engine, tokenizer, ids: list[int], prompt_len: int, top_k: int, sequence: int = 0) -> list[LensStep]:
    """The logit lens of one generated sequence: one :class:`LensStep` per new token (``ids[prompt_len:]``), each
    with one :class:`LensLayer` per decoder layer (first layer first) holding the layer's ``top_k`` candidates (lens
    logits, probabilities in [0, 1], natural-log log-probabilities) and the probability, log-probability and 0-based
    rank of the token the search finally chose at that step.

    Raises:
        ConfigError: the model is not one the lens can read (:func:`lens_modules`).
    """
    n = len(ids) - prompt_len
    if n <= 0:
        return []
    lens = _lens_passes(engine, lambda: layer_logits(engine.model, ids[:-1], range(prompt_len - 1, len(ids) - 1)))
    lp = log_probs(lens)  # (L, n, V)
    steps = []
    for t in range(n):
        chosen = ids[prompt_len + t]
        layers = [LensLayer(layer=l, logprob=float(lp[l, t, chosen]), prob=float(lp[l, t, chosen].exp()),
                            rank=rank_of(lens[l, t], chosen), top=top_candidates(lens[l, t], top_k, tokenizer, lp[l, t]))
                  for l in range(lens.shape[0])]
        steps.append(LensStep(sequence=sequence, step=t, id=chosen, token=tokenizer.decode([chosen]), layers=layers))
    return steps


def generation_lens(engine, tokenizer, sequences, prompt_ids: list[list[int]], top_k: int) -> list[LensStep]:
    """:func:`sequence_lens` of every returned sequence (``Generation.sequences`` order; ``LensStep.sequence`` is
    the index), the eos token included when a sequence ended on it. ``prompt_ids``: the unpadded prompts.

    Raises:
        ConfigError: as :func:`lens_modules`.
    """
    out: list[LensStep] = []
    for i, seq in enumerate(sequences):
        out.extend(sequence_lens(engine, tokenizer, seq.ids, len(prompt_ids[seq.prompt_index]), top_k, sequence=i))
    return out


def follow_token(lm, generation, token: int | str, sequence: int = 0) -> list[list[tuple[int, float]]]:
    """Follow one token through the lens: its ``(rank, prob)`` at every step (rows) and layer (columns) of
    ``generation.sequences[sequence]``. ``token``: an id, or a text that must be exactly one token. Ranks are 0-based,
    probabilities in [0, 1] under each layer's lens distribution. Recomputes the hidden states (one forward pass).

    Raises:
        InputError: ``token`` is not one token id of the vocabulary or a text of exactly one token; ``sequence`` out
            of range. ConfigError: as :func:`lens_modules`.
    """
    from .errors import InputError

    if isinstance(token, str):
        ids = lm.tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise InputError(f"invalid token={token!r}: it is {len(ids)} tokens, expected exactly one", param="token")
        token = ids[0]
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < lm.vocab_size:
        raise InputError(f"invalid token={token!r}: expected a token id from 0 to {lm.vocab_size - 1} or a one-token "
                         "text", param="token")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < len(generation.sequences):
        raise InputError(f"invalid sequence={sequence!r}: expected 0 to {len(generation.sequences) - 1}",
                         param="sequence")
    seq = generation.sequences[sequence]
    prompt_len = len(generation.prompt_ids[seq.prompt_index])
    if len(seq.ids) <= prompt_len:
        return []
    lens = _lens_passes(lm.engine, lambda: layer_logits(lm.model, seq.ids[:-1], range(prompt_len - 1, len(seq.ids) - 1)))
    lp = log_probs(lens)
    return [[(rank_of(lens[l, t], token), float(lp[l, t, token].exp())) for l in range(lens.shape[0])]
            for t in range(lens.shape[1])]
