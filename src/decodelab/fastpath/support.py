"""Which models the fast path runs exactly as transformers would (the support policy, separate from the forward)."""

from __future__ import annotations

import torch

SUPPORTED_TYPES = ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma3_text")


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run ``model`` exactly as transformers would, or ``None`` when it can.

    Supported, all with SDPA attention and a plain ``nn.Linear`` output layer:

    * ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (Qwen2's layer without q/k/v biases by
      default, plus an RMSNorm over each query and key head before the rotary embedding: ``Qwen3Attention``'s
      ``q_norm`` / ``k_norm``) with SiLU MLP and full attention in every layer (Qwen's ``use_sliding_window``
      layers stay on the plain path).
    * ``MistralForCausalLM``: Llama's layer with a sliding attention window in every layer when ``sliding_window``
      is set (transformers' ``DynamicSlidingWindowLayer``: each step attends over the last ``sliding_window``
      positions), full attention when it is unset (Mistral-7B-v0.2/v0.3).
    * ``Phi3ForCausalLM`` likewise (window or not), with full rotary embedding (``partial_rotary_factor`` 1): its
      q/k/v and gate/up weights come stacked (``qkv_proj``, ``gate_up_proj``), one product each, as in the model.
    * ``Gemma3ForCausalLM`` (``gemma3_text``, ``modeling_gemma3.py``): sliding and full layers alternating as
      ``layer_types`` says, a rotary table per layer type, ``Gemma3RMSNorm`` (four per layer, plus the per-head
      ``q_norm`` / ``k_norm``), ``gelu_pytorch_tanh`` MLP (``hidden_activation``), scaled embeddings and final logit
      soft-capping; causal attention only (``use_bidirectional_attention`` stays on the plain path).
      ``attn_logit_softcapping`` is ignored, as transformers' SDPA attention ignores it.

    Other Gemma-family types (``gemma``, ``gemma2``) are not supported.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "no config"
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        return f"model_type {mtype!r} is not one of {SUPPORTED_TYPES}"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} is not 'sdpa'"
    if mtype == "gemma3_text":
        if getattr(cfg, "hidden_activation", None) != "gelu_pytorch_tanh":
            return f"hidden_activation {getattr(cfg, 'hidden_activation', None)!r} is not 'gelu_pytorch_tanh'"
        if getattr(cfg, "use_bidirectional_attention", False):
            return "bidirectional attention (use_bidirectional_attention)"
        types = list(getattr(cfg, "layer_types", None) or [])
        if len(types) < cfg.num_hidden_layers or any(t not in ("sliding_attention", "full_attention")
                                                       for t in types):
            return f"unexpected layer_types {types!r}"
        if "sliding_attention" in types and not getattr(cfg, "sliding_window", None):
            return "sliding layers without a sliding_window"
    else:
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"hidden_act {cfg.hidden_act!r} is not 'silu'"
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            return "sliding-window layers"
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
    if mtype in ("qwen3", "gemma3_text") and not (hasattr(attn, "q_norm") and _eps(attn.q_norm) == _eps(attn.k_norm)):
        return f"unexpected {mtype} query/key norms"
    return None


def _eps(norm) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
