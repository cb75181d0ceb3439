"""Which models the fast path runs exactly as transformers would (the support policy, separate from the forward)."""

from __future__ import annotations

import torch

SUPPORTED_TYPES = ("llama", "mistral", "phi3", "qwen2", "qwen3")


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run ``model`` exactly as transformers would, or ``None`` when it can.

    Supported: ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (Qwen2's layer without q/k/v biases
    by default, plus an RMSNorm over each query and key head before the rotary embedding: ``Qwen3Attention``'s
    ``q_norm`` / ``k_norm``) with SDPA attention, SiLU MLP, full attention in every layer (no sliding window) and a
    plain ``nn.Linear`` output layer. ``MistralForCausalLM`` is Llama's layer with a sliding attention window: supported
    when the window cannot bind (``sliding_window`` unset, as in Mistral-7B-v0.2/v0.3, or at least
    ``max_position_embeddings``); a binding window (transformers trims the cache and masks) stays on the plain path.
    ``Phi3ForCausalLM`` likewise (window permitting), with full rotary embedding (``partial_rotary_factor`` 1): its
    q/k/v and gate/up weights come stacked (``qkv_proj``, ``gate_up_proj``), one product each, as in the model.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "no config"
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        return f"model_type {mtype!r} is not one of {SUPPORTED_TYPES}"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} is not 'sdpa'"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not 'silu'"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window layers"
    window = getattr(cfg, "sliding_window", None) if mtype in ("mistral", "phi3") else None
    if window is not None and window < (getattr(cfg, "max_position_embeddings", None) or float("inf")):
        return f"sliding window of {window} positions"
    if ((getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0
            or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0):
        return "partial rotary embedding"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not isinstance(getattr(model, "lm_head", None),
                                                                          torch.nn.Linear):
        return "unexpected module layout"
    attn = inner.layers[0].self_attn
    if mtype == "qwen3" and not (hasattr(attn, "q_norm") and attn.q_norm.variance_epsilon
                                 == attn.k_norm.variance_epsilon):
        return "unexpected Qwen3 query/key norms"
    return None
