"""The fast path's one decoder: a Llama / Qwen2 / Qwen3 / Mistral / Phi-3 / Gemma 3 text decoder run straight from
the weight tensors over a :class:`StaticKVCache`, with no transformers module calls, no cache objects and no mask
building per step (except the sliding layers' small window mask). The same forward (:meth:`FastDecoder.run`) is
what the eager engine runs and what ``compile=True`` exports (:mod:`decodelab.fastpath.static` only supplies the
fixed-shape cache access); the projection modules are swapped per kernel mode
(:mod:`decodelab.fastpath.projections`), as in gpt-fast's ``model.py``.

Every operation is the one transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` run (``modeling_llama.py``:
``LlamaRMSNorm``, ``apply_rotary_pos_emb``, ``LlamaMLP``; ``integrations/sdpa_attention.py``:
``sdpa_attention_forward`` with its GQA handling; ``masking_utils.sdpa_mask``), on tensors of the same shapes and
in the same order, so in float32 on CPU the logits are bit-for-bit those of the model with a ``DynamicCache`` and
decodelab's search returns exactly ``model.generate``'s ids. What is saved is Python: module ``__call__``\\ s,
decorators, ``DynamicCache`` concatenation (the keys/values are written into a preallocated buffer) and the 4D mask
built per step (it is a view of the cache's preallocated 2D mask).

Gemma 3 (``modeling_gemma3.py``: ``Gemma3TextScaledWordEmbedding``, ``Gemma3RMSNorm``, ``Gemma3Attention``,
``Gemma3DecoderLayer``, ``Gemma3ForCausalLM``) is the same forward with data on :class:`Layer` / :class:`FastDecoder`:
the scaled embedding, its norm function, two more norms per layer (``post_attn``, ``post_ff``), the
``gelu_pytorch_tanh`` activation, a rotary table per layer type and the final logit soft-capping. Sliding-window
layers (Gemma 3's ``sliding_attention``, Mistral / Phi-3 with ``sliding_window``) attend over exactly the keys
transformers' ``DynamicSlidingWindowLayer`` returns, the last W positions, under the mask
``create_sliding_window_causal_mask`` builds (:func:`decodelab.fastpath.rows.sliding_window_mask`).

Two kernel-level changes keep the numbers and save time: a batch-1 float32 step may run each projection as one
``bmm`` over the two halves of its weight (:func:`~decodelab.fastpath.projections.half_linear`, chosen by
measurement: both cores stream weights, same dot products), and bfloat16 weights are prepacked once for oneDNN
(:class:`~decodelab.fastpath.projections.PackedDense`) instead of on every call.

How the rows of a forward pass meet the projections and the caches is the *row plan* passed to :meth:`FastDecoder.run`
(``plan.linear(proj, x)``, ``plan.attend(i, q, k, v)``): :class:`decodelab.fastpath.rows.RowPlan` for eager passes
(one or several requests, each with its own cache, attention with exactly transformers' SDPA call), and
:class:`decodelab.fastpath.static.StaticRows` for the compiled step (a fixed-shape write at a tensor index, attention
over the whole preallocated cache under its mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import kernel_choice, panels, slot_attention
from .cache import StaticKVCache
from .projections import Dense, MeasuredDense, PackedDense, _buffer
from .rows import MixedPlan, RowPlan, Segment, attention_mask, sliding_window_mask
from .slots import SLOT_POSITIONS, SlotPool
from .support import SUPPORTED_TYPES, unsupported_reason
from .weights import stack_weights

__all__ = ["FastDecoder", "Layer", "KERNELS", "SUPPORTED_TYPES", "can_pack", "drain", "fast_rms_norm",
           "gemma_rms_norm", "gelu_tanh", "rms_norm", "repeat_kv", "rope", "unsupported_reason"]

KERNELS = ("exact", "fast")


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :class:`PackedDense` applies: bfloat16 weights on a CPU whose oneDNN supports bfloat16."""
    return dtype == torch.bfloat16 and kernel_choice.can_prepack(dtype, device)





class Layer(nn.Module):
    """One decoder layer's tensors: two RMSNorm weights (eps) and its projection modules
    (:mod:`decodelab.fastpath.projections`: ``(..., in) -> (..., out)``).

    Unfused (the exact mode): ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``. Fused (``fuse=True``): ``qkv``
    (the q, k and v weights stacked: one product instead of three, split after) and ``gate_up`` (gate over up), with
    ``o`` and ``down`` as they are; the unfused names are then ``None``. Fusing stacks the weights into new tensors
    and rebinds the model's own q/k/v/gate/up parameters to views of them (same values, no second copy; a second
    fused engine on the same model finds them stacked and shares the tensors). Phi-3 comes stacked already.
    Qwen3 / Gemma 3: ``q_norm`` / ``k_norm`` (D,) per-head RMSNorm weights, and ``qk_norm`` both stacked per head
    (H + H_kv, 1, D) for the fused layout, where q and k heads are normalised in one call.

    ``ln1`` is the norm before attention (``input_layernorm``), ``ln2`` the one before the MLP (Llama's
    ``post_attention_layernorm``, Gemma 3's ``pre_feedforward_layernorm``). Gemma 3 (``Gemma3DecoderLayer``) also
    normalises each branch's output before it is added to the residual stream: ``post_attn`` (its
    ``post_attention_layernorm``) and ``post_ff`` (``post_feedforward_layernorm``), ``None`` elsewhere.

    Attention geometry per layer: ``window`` is the sliding window W (keys within the last W positions, as
    transformers' ``DynamicSlidingWindowLayer`` keeps them) or ``None`` (full attention); ``rope_key`` names the
    rotary table the layer uses (Gemma 3's ``layer_types[i]``, ``None`` for the model's one table).
    """

    def __init__(self, block, dense: type[Dense] = Dense, fuse: bool = False, window: int | None = None,
                 rope_key: str | None = None) -> None:
        super().__init__()
        attn, mlp = block.self_attn, block.mlp
        self.window, self.rope_key = window, rope_key
        gemma = hasattr(block, "pre_feedforward_layernorm")
        pre_mlp = block.pre_feedforward_layernorm if gemma else block.post_attention_layernorm
        _buffer(self, "ln1", block.input_layernorm.weight)
        _buffer(self, "ln2", pre_mlp.weight)
        self.eps1 = _eps(block.input_layernorm)
        self.eps2 = _eps(pre_mlp)
        _buffer(self, "post_attn", block.post_attention_layernorm.weight if gemma else None)
        _buffer(self, "post_ff", block.post_feedforward_layernorm.weight if gemma else None)
        self.eps_post_attn = _eps(block.post_attention_layernorm) if gemma else None
        self.eps_post_ff = _eps(block.post_feedforward_layernorm) if gemma else None
        q_norm = k_norm = qk_norm = None
        self.qk_eps = None
        if getattr(attn, "q_norm", None) is not None:
            q_norm, k_norm, self.qk_eps = attn.q_norm.weight, attn.k_norm.weight, _eps(attn.q_norm)
            n_q, n_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
            qk_norm = torch.cat([q_norm.detach().expand(n_q, -1), k_norm.detach().expand(n_kv, -1)])[:, None, :]
        _buffer(self, "q_norm", q_norm)
        _buffer(self, "k_norm", k_norm)
        _buffer(self, "qk_norm", qk_norm)
        self.o, self.down = dense(attn.o_proj.weight, attn.o_proj.bias), dense(mlp.down_proj.weight, mlp.down_proj.bias)
        self.qkv = self.gate_up = self.qkv_sizes = None
        self.q = self.k = self.v = self.gate = self.up = None
        if hasattr(attn, "qkv_proj"):  # Phi-3: stacked in the model already, one product as transformers runs
            n_q, n_kv = attn.config.num_attention_heads * attn.head_dim, attn.num_key_value_heads * attn.head_dim
            self.qkv_sizes = [n_q, n_kv, n_kv]
            self.qkv = dense(attn.qkv_proj.weight, attn.qkv_proj.bias)
            self.gate_up = dense(mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
        elif fuse:
            qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
            self.qkv_sizes = [m.weight.shape[0] for m in qkv]
            self.qkv = dense(*stack_weights(qkv))
            self.gate_up = dense(*stack_weights((mlp.gate_proj, mlp.up_proj)))
        else:
            self.q, self.k, self.v = (dense(m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate, self.up = (dense(m.weight, m.bias) for m in (mlp.gate_proj, mlp.up_proj))

    def projections(self) -> dict[str, nn.Module]:
        """The projections by name: ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``, or when fused ``qkv``,
        ``o``, ``gate_up``, ``down``."""
        names = ("qkv", "o", "gate_up", "down") if self.qkv is not None else ("q", "k", "v", "o", "gate", "up",
                                                                               "down")
        return {name: getattr(self, name) for name in names}


def _eps(norm: nn.Module) -> float:
    """An RMSNorm module's epsilon (``LlamaRMSNorm.variance_epsilon``, ``Gemma3RMSNorm.eps``)."""
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def drain(slices):
    """Run a generator of :meth:`FastDecoder.forward_slices` to its end and return its return value."""
    while True:
        try:
            next(slices)
        except StopIteration as done:
            return done.value


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``: ``weight * (x / sqrt(mean(x**2) + eps))``, the statistics in float32. (..., H) -> (..., H)."""
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.to(torch.float32)
    var = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return weight * (x if dtype == torch.float32 else x.to(dtype))


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Gemma3RMSNorm`` (transformers' ``modeling_gemma3.py``): ``(x / sqrt(mean(x**2) + eps)) * (1 + weight)``,
    all in float32, then cast to ``x``'s dtype (the weight is applied before the cast, unlike Llama's; its stored
    value is the offset from 1). (..., H) -> (..., H)."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``gelu_pytorch_tanh`` (transformers' ``ACT2FN``): ``F.gelu(x, approximate="tanh")``, Gemma 3's MLP activation."""
    return F.gelu(x, approximate="tanh")


def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one fused ATen call (``torch.nn.functional.rms_norm``), used by the fused (``kernels="fast"``)
    layers: same formula as :func:`rms_norm`, one operation instead of six, rounding not guaranteed identical in
    16-bit dtypes. (..., H) -> (..., H)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, ``apply_rotary_pos_emb``'s ``x * cos + rotate_half(x) * sin`` computed as
    ``x * cos + roll(x, D/2) * signed_sin`` with ``signed_sin = [-sin[:D/2], sin[D/2:]]``: the same products bit for
    bit (``(-a) * b == a * (-b)`` exactly), with 2 operations fewer per call. x (B, H, T, D); cos/sin (B, 1, T, D)."""
    return (x * cos) + (torch.roll(x, x.shape[-1] // 2, -1) * signed_sin)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, L, D) -> (B, H_kv * n_rep, L, D), each key/value head repeated for its query heads."""
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def _attention_layout(cfg, n_layers: int) -> tuple[list[int | None], list[str | None]]:
    """Per layer: the sliding window (``None`` for full attention) and the rotary table key, as transformers'
    ``DynamicCache(config=...)`` (``cache_utils.get_layer_types_and_kwargs``) and the model lay them out.

    Gemma 3: ``config.layer_types`` (``"sliding_attention"`` layers get ``sliding_window``; each layer type has its
    own rotary table, ``Gemma3RotaryEmbedding.forward(x, position_ids, layer_type)``). Mistral / Phi-3 (no
    ``layer_types``): a ``sliding_window`` that is set makes every layer a sliding one (while the sequence is
    shorter than the window this is full attention, same operations). Others: full attention, one table.
    """
    if cfg.model_type == "gemma3_text":
        types = list(cfg.layer_types)[:n_layers]
        return [cfg.sliding_window if t == "sliding_attention" else None for t in types], types
    window = getattr(cfg, "sliding_window", None) if cfg.model_type in ("mistral", "phi3") else None
    return [window] * n_layers, [None] * n_layers


class FastDecoder(nn.Module):
    """Forward pass of a supported causal LM (see :func:`unsupported_reason`) over a :class:`StaticKVCache`.

    Holds the model's weight tensors as buffers (no copy), except that bfloat16 weights on CPU are prepacked
    for oneDNN (:class:`PackedDense`, a second copy; ``pack=False`` keeps plain ``F.linear``, ``pack=None`` packs
    where :func:`can_pack`). ``kernels="fast"`` runs the unpacked projections as :class:`MeasuredDense`
    (faster, no longer bit-for-bit ``F.linear``); ``"exact"`` (default) keeps transformers' numbers. ``layers``
    may be rewritten by :mod:`decodelab.quantize` (projections replaced by weight-only quantized linears);
    ``lm_head`` likewise. ``fuse`` (default: with ``kernels="fast"``) stacks q/k/v and gate/up into one product
    each (see :class:`Layer`). ``act32`` (default: fused layers of a 16-bit model on CPU) keeps the residual
    stream, norms, rotary embedding, attention and KV cache in float32 and casts to the model's dtype only for the
    matrix products; the MLP's ``silu(gate) * up`` between two products stays in the model's dtype. bfloat16
    element-wise operations and attention are several times slower than float32 ones on CPU, and precision can only
    improve. ``act_dtype`` is the activations' / cache's dtype.

    The product kernel of each unpacked CPU projection is chosen by measurement on the machine at hand
    (:mod:`decodelab.fastpath.kernel_choice`; ``kernel_table`` imposes a table instead, ``measure=False`` skips it,
    as for a decoder about to be quantized; ``progress`` receives the one-line note printed before a measurement).
    ``kernel_table`` (attribute): the table used; :meth:`kernel_summary` says it in one line.
    ``invariant`` (``kernels="fast"``, float32 CPU weights): every product is decodelab's ``panels`` GEMM at every
    row count instead of the measured choice, and every decode step attends through decodelab's own kernel
    (:mod:`decodelab.fastpath.slot_attention`), so that a request's logits are bit for bit the same alone and in
    any batch (the ``batch_invariant`` engine option).

    Raises:
        ValueError: the model is not supported (:func:`unsupported_reason`), or ``kernels`` is not in
            :data:`KERNELS`.
        ConfigError: ``invariant`` where those kernels cannot run (not ``kernels="fast"`` on float32 CPU weights,
            the C kernels not built here, a head size or weight shape they do not take).
    """

    def __init__(self, model, pack: bool | None = None, halves: bool | None = None,
                 kernels: str = "exact", fuse: bool | None = None, act32: bool | None = None,
                 kernel_table: dict | None = None, measure: bool = True, progress=None,
                 invariant: bool = False) -> None:
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"fast path unsupported: {reason}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
        cfg = model.config.get_text_config()
        inner = model.model
        first = inner.layers[0].self_attn
        self.n_layers = len(inner.layers[: cfg.num_hidden_layers])
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = first.head_dim
        self.groups = self.n_heads // self.n_kv
        self.scaling = first.scaling
        _buffer(self, "embed", inner.embed_tokens.weight)
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.packed = can_pack(self.dtype, self.device) if pack is None else bool(pack)
        self.kernels = kernels
        measured = not self.packed and self.device.type == "cpu"
        if fuse is None:
            fuse = kernels == "fast"
        dense = PackedDense if self.packed else Dense
        self.rotary = inner.rotary_emb
        self.fused = bool(fuse)
        self.gemma = cfg.model_type == "gemma3_text"
        # Gemma 3 (modeling_gemma3.py): Gemma3RMSNorm everywhere (also fused: no one-call form of (1 + w) in float32),
        # gelu_pytorch_tanh MLP, embeddings scaled by Gemma3TextScaledWordEmbedding's 0-dim ``embed_scale`` buffer
        # (cast to the weight dtype, as the module multiplies), final logits soft-capped.
        if self.gemma:
            self.rms_norm = self.head_norm = gemma_rms_norm
        else:
            self.rms_norm = fast_rms_norm if self.fused else rms_norm  # exact layers: LlamaRMSNorm's own operations
            self.head_norm = rms_norm  # Qwen3's q_norm / k_norm
        self.act = gelu_tanh if self.gemma else F.silu
        _buffer(self, "embed_scale", inner.embed_tokens.embed_scale.to(self.dtype) if self.gemma else None)
        self.softcap = getattr(cfg, "final_logit_softcapping", None) if self.gemma else None
        windows, rope_keys = _attention_layout(cfg, self.n_layers)
        self.window = next((w for w in windows if w is not None), None)  # the model's one window size, if any
        self.rope_keys = tuple(dict.fromkeys(rope_keys))
        self.layers = nn.ModuleList(Layer(block, dense, fuse=self.fused, window=w, rope_key=key)
                                    for block, w, key in zip(inner.layers[: cfg.num_hidden_layers], windows,
                                                             rope_keys))
        _buffer(self, "norm", inner.norm.weight)
        self.norm_eps = _eps(inner.norm)
        self.lm_head = dense(model.lm_head.weight, model.lm_head.bias)
        # transformers multiplies the (B, 1, hidden) slice h[:, -1:] by the output layer's *parameter*: PyTorch's
        # matmul copies a non-contiguous 3-D input into one 2-D product when the weight requires grad (else it
        # runs a batched product over the strided view, other roundings). The buffers are detached, so the copy
        # is made explicitly where the model's weight requires grad.
        self.head_folds = bool(model.lm_head.weight.requires_grad)
        self.quantized: str | None = None
        if act32 is None:
            act32 = self.fused and self.dtype != torch.float32 and self.device.type == "cpu"
        self.act32 = bool(act32) and self.fused and self.dtype != torch.float32
        self.act_dtype = torch.float32 if self.act32 else self.dtype
        if self.act32:  # float32 copies of the (small) norm weights
            for layer in self.layers:
                layer.ln1, layer.ln2 = layer.ln1.float(), layer.ln2.float()
                if layer.post_attn is not None:
                    layer.post_attn, layer.post_ff = layer.post_attn.float(), layer.post_ff.float()
                if layer.qk_norm is not None:
                    layer.qk_norm = layer.qk_norm.float()
            self.norm = self.norm.float()
        self._exact_shapes: dict = {}  # rows.RowPlan: per weight shape, whether the grouped product is exact here
        self.halves = ((self.device.type == "cpu" and self.dtype == torch.float32 and kernels == "exact")
                       if halves is None else halves)
        self.kernel_table: dict[str, dict] = {}
        self.invariant = bool(invariant)
        if self.invariant:
            self._check_invariant(measured)
        if measured and (measure or kernel_table is not None or self.invariant):
            self._choose_kernels(kernel_table, progress)

    def _check_invariant(self, measured: bool) -> None:
        """``invariant``: the batch-invariant kernels can run this decoder (see :attr:`invariant`).

        Raises:
            ConfigError: they cannot (one line saying why), naming the ``batch_invariant`` engine option.
        """
        if self.kernels != "fast" or not measured or self.dtype != torch.float32:
            why = "kernels='fast' and float32 weights on the CPU"
        elif not slot_attention.usable(self.act_dtype, self.device, self.head_dim, self.groups):
            why = (f"decodelab's attention kernel, built on an x86-64 CPU with AVX2 and a C compiler, for heads of a "
                   f"multiple of 8 values (here {self.head_dim}) and at most {slot_attention.MAX_GROUPS} query heads "
                   f"per key/value head (here {self.groups})")
        else:
            weights = [p.weight for layer in self.layers for p in layer.projections().values()]
            odd = next((w for w in [*weights, self.lm_head.weight] if not panels.available(w)), None)
            if odd is None:
                return
            why = f"every weight's output size a multiple of {panels.PANEL} (here {odd.shape[0]})"
        raise ConfigError(f"batch_invariant=True: this model cannot run batch-invariant here; it needs {why}",
                          param="batch_invariant")

    def _choose_kernels(self, table: dict | None, progress) -> None:
        """Apply the measured product choice (:func:`decodelab.fastpath.kernel_choice.choices`, or ``table``, a
        ``{shape_key: {"choice": ..., "exact": ...}}`` given by the caller, e.g. a test forcing another CPU's
        choice) to every projection: ``kernels="fast"`` replaces each by a :class:`MeasuredDense`;
        ``"exact"`` sets each :class:`Dense`'s one-row ``halves`` flag."""
        projections = [(layer, name, proj) for layer in self.layers for name, proj in layer.projections().items()]
        projections.append((self, "lm_head", self.lm_head))
        groups: dict[str, list] = {}
        for _, _, proj in projections:
            groups.setdefault(kernel_choice.shape_key(proj.weight, proj.bias is not None), []).append(
                (proj.weight, proj.bias))
        if table is None and self.invariant:  # one product at every row count: each row computed as if alone
            table = {key: {"choice": {str(b): "panels" for b in kernel_choice.BUCKETS}, "exact": {"1": "linear"}}
                     for key in groups}
        elif table is None:
            table = kernel_choice.choices(groups, self.kernels, progress=progress)
        self.kernel_table = {key: table[key] for key in groups}
        for owner, name, proj in projections:
            entry = self.kernel_table[kernel_choice.shape_key(proj.weight, proj.bias is not None)]
            if self.kernels == "fast":
                setattr(owner, name, MeasuredDense(proj.weight, proj.bias, entry["choice"]))
            else:
                proj.halves = entry["exact"]["1"] == "halves"

    def kernel_summary(self) -> str:
        """One line naming the measured product per weight shape and row bucket, e.g.
        ``960x576: 1 halves, 2-3 linear, 4-32 onednn; ...`` (``"not measured"`` for packed / non-CPU weights)."""
        if not self.kernel_table:
            return "not measured"
        parts = []
        for key, entry in sorted(self.kernel_table.items()):
            picks = entry["choice"] if self.kernels == "fast" else {"1": entry["exact"]["1"]}
            runs: list[list] = []
            prev = 0
            for b in sorted(picks, key=int):
                name = picks[b]
                if runs and runs[-1][2] == name:
                    runs[-1][1] = int(b)
                else:
                    runs.append([prev + 1, int(b), name])
                prev = int(b)
            spans = ", ".join(f"{lo if lo == hi else f'{lo}-{hi}'} {name}" for lo, hi, name in runs)
            parts.append(f"{key}: {spans}")
        return "; ".join(parts)

    def _halves_for(self, rows: int) -> bool:
        """Whether this step's float32 projections run as two half-matrix products in one ``bmm`` (see
        :func:`half_linear`): one row, plain ``F.linear`` projections, at least 2 torch threads."""
        return (rows == 1 and self.halves and not self.packed and self.quantized is None
                and torch.get_num_threads() >= 2)

    @property
    def rows_exact(self) -> bool:
        """Whether a batched pass gives every request its logits alone bit for bit (:mod:`decodelab.fastpath.rows`):
        the unfused, unpacked, unquantized ``kernels="exact"`` decoder. Elsewhere one-row requests may share a
        :class:`~decodelab.fastpath.slots.SlotPool` (:meth:`new_pool`)."""
        return not self.packed and self.quantized is None and not self.fused and self.kernels == "exact"

    def new_pool(self, slots: int, positions: int = SLOT_POSITIONS) -> SlotPool:
        """A :class:`~decodelab.fastpath.slots.SlotPool` of ``slots`` one-row caches of ``positions`` positions
        in ``act_dtype`` on the model's device (memory is touched only as slots are used)."""
        return SlotPool(self.n_layers, self.n_kv, self.head_dim, slots, positions, self.act_dtype, self.device)

    def new_cache(self, batch: int, capacity: int) -> StaticKVCache:
        """An empty cache of ``capacity`` positions for ``batch`` rows in ``act_dtype`` on the model's device."""
        return StaticKVCache(self.n_layers, self.n_kv, self.head_dim, batch, capacity, self.act_dtype,
                             self.device)

    def _attention(self, q, k, v, mask, t: int) -> torch.Tensor:
        """SDPA as ``sdpa_attention_forward`` calls it. q (B, H, T, D), k/v (B, H_kv, L, D) -> (B, T, H * D)."""
        g = self.groups
        if g > 1 and mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=self.scaling, enable_gqa=True)
        elif g > 1 and t == 1:
            b = q.shape[0]
            out = F.scaled_dot_product_attention(q.reshape(b, self.n_kv, g, self.head_dim), k, v, attn_mask=mask,
                                                 scale=self.scaling)
        elif g > 1:
            out = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask,
                                                 scale=self.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t > 1 and mask is None,
                                                 scale=self.scaling)
        out = out.reshape(out.shape[0], -1, t, self.head_dim).transpose(1, 2).contiguous()
        return out.reshape(out.shape[0], t, -1)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                keep_all: bool = False) -> torch.Tensor:
        """Feed (B, T) ``ids`` at (B, T) int64 ``positions``; returns the (B, V) logits of the last position in the
        model's dtype (``keep_all``: the (B, T, V) logits of every position). Either a prefill (empty cache, any
        T; call ``cache.start(mask)`` first) or a decode step (T == 1; call ``cache.append_mask()`` first).
        Writes the keys/values into ``cache`` and advances it.

        Raises:
            ValueError: T > 1 on a non-empty cache (chunked prefill is not supported).
        """
        return self.forward_many([(ids, positions, cache)], keep_all=keep_all)[0]

    def forward_many(self, items: list[tuple[torch.Tensor, torch.Tensor, StaticKVCache]],
                     keep_all: bool = False) -> list[torch.Tensor]:
        """One forward pass over several requests, each ``(ids (B_s, T), positions (B_s, T), cache)`` with its own
        cache, as :meth:`forward` describes for one; returns each request's logits ((B_s, V), or (B_s, T, V) with
        ``keep_all``), in ``items`` order. Several items must all be decode steps (T == 1).

        On the exact float32 path each request's logits are bit for bit those of :meth:`forward` on that request
        alone (see :mod:`decodelab.fastpath.rows`): this is the continuous-batching scheduler's decode step.

        Raises:
            ValueError: T > 1 on a non-empty cache, or a multi-token item among several.
        """
        return drain(self.forward_slices(items, keep_all))

    def forward_slices(self, items: list[tuple[torch.Tensor, torch.Tensor, StaticKVCache]],
                       keep_all: bool = False):
        """:meth:`forward_many` as a generator that yields (the index of the layer just computed) after each decoder
        layer and returns the same list of logits: the continuous-batching scheduler runs a long prefill a few
        layers at a time between decode steps. Every operation is the one :meth:`forward_many` runs, on the same
        tensors, so the result is bit for bit the same however the slices are spaced; the caches must not be used
        by anything else until the generator is exhausted.

        Raises:
            ValueError: as :meth:`forward_many` (on the first ``next``).
        """
        if len(items) > 1 and any(ids.shape[1] != 1 for ids, _, _ in items):
            raise ValueError("fast path: only decode steps (one token per row) can be batched")
        plan, order, ids, positions = self._row_plan(items)
        logits = yield from self.run(ids, positions, plan, keep_all)
        plan.finish()
        out = [None] * len(items)
        for i, seg in zip(order, plan.segments):
            out[i] = logits if len(items) == 1 else logits[seg.lo : seg.hi]
        return out

    def _row_plan(self, items: list[tuple[torch.Tensor, torch.Tensor, StaticKVCache]]):
        """The :class:`RowPlan` of a pass over ``items`` (see :meth:`forward_slices`), the items' order in it, and
        their (R, T) ids and positions in that order.

        Raises:
            ValueError: T > 1 on a non-empty cache.
        """
        exact_rows = self.rows_exact
        # decodelab's slot attention kernel, where built: then a request alone in its slot attends through it too
        native = not exact_rows and slot_attention.usable(self.act_dtype, self.device, self.head_dim, self.groups)
        # one-row requests first, so that they form one block for the grouped products (rows.RowPlan); before them,
        # off the exact path, the one-token requests in slots of one pool, by slot (their attention runs in one call)
        pool = None
        if (len(items) > 1 or native) and not exact_rows:
            pool = next((c.pool for _, _, c in items if c.pool is not None), None)

        def place(i: int) -> tuple[int, int]:
            ids, _, cache = items[i]
            if ids.shape[0] != 1:
                return 2, 0
            return (0, cache.slot) if pool is not None and cache.pool is pool and ids.shape[1] == 1 else (1, 0)

        places = [place(i) for i in range(len(items))] if len(items) > 1 or native else [(1, 0)]
        order = sorted(range(len(items)), key=places.__getitem__)
        pooled = sum(1 for p in places if p[0] == 0)
        segments, lo = [], 0
        for i in order:
            ids, _, cache = items[i]
            b, t = ids.shape
            past = cache.length
            if t > 1 and past:
                raise ValueError("fast path: multi-token input on a non-empty cache")
            cache.reserve(past + t)
            segments.append(Segment(cache, lo, lo + b, past, past + t,
                                    attention_mask(cache, t, past + t, ids.device),
                                    None if self.window is None
                                    else sliding_window_mask(cache, t, past + t, self.window, ids.device)))
            lo += b
        ids = items[order[0]][0] if len(items) == 1 else torch.cat([items[i][0] for i in order])
        positions = items[order[0]][1] if len(items) == 1 else torch.cat([items[i][1] for i in order])
        b, t = ids.shape
        plan = RowPlan(segments, not self.fused and self._halves_for(b * t if len(items) == 1 else 1),
                       grouped=exact_rows, exact_shapes=self._exact_shapes, attention=self._attention,
                       pooled=pooled, slot_scale=float(self.scaling) if native else None)
        return plan, order, ids, positions

    def forward_mixed(self, steps: list[tuple[torch.Tensor, torch.Tensor, StaticKVCache]],
                      prompts: list[tuple[torch.Tensor, torch.Tensor, StaticKVCache]]
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A decode step and whole prompts in one forward pass (:class:`~decodelab.fastpath.rows.MixedPlan`): every
        projection multiplies the step's rows and the prompts' tokens in one call.

        Args:
            steps: decode items as in :meth:`forward_many` (``(ids (B_s, 1), positions (B_s, 1), cache)``, each
                cache after ``append_mask()``); may be empty.
            prompts: ``(ids (1, T), positions (1, T), cache)`` per prompt, one unpadded row each, its cache empty
                and started (``cache.start(mask)``); at least one.

        Returns:
            (the steps' (B_s, V) logits in ``steps`` order, each prompt's (1, V) last-position logits), in the
            model's dtype. Not on the exact float32 path (:attr:`rows_exact`): there a product's result for a row
            must not depend on the other rows, and these products see the prompts' tokens.

        Raises:
            ValueError: on the exact path, no prompt, a prompt of several rows or on a non-empty cache, or a step
                of more than one token.
        """
        if self.rows_exact:
            raise ValueError("fast path: prompts join decode steps only off the exact path")
        if not prompts or any(ids.shape[0] != 1 or cache.length for ids, _, cache in prompts):
            raise ValueError("fast path: a joining prompt is one row on an empty cache")
        if any(ids.shape[1] != 1 for ids, _, _ in steps):
            raise ValueError("fast path: only decode steps (one token per row) can be batched")
        decode, order, ids, positions = self._row_plan(steps) if steps else (None, [], None, None)
        plans = [self._row_plan([item])[0] for item in prompts]
        plan = MixedPlan(decode, plans)
        seq_ids = [p[0] for p in prompts]
        seq_pos = [p[1] for p in prompts]
        if decode is not None:
            seq_ids.insert(0, ids.reshape(1, -1))
            seq_pos.insert(0, positions.reshape(1, -1))
        logits = drain(self.run(torch.cat(seq_ids, dim=1), torch.cat(seq_pos, dim=1), plan))
        plan.finish()
        out: list[torch.Tensor | None] = [None] * len(steps)
        for i, seg in zip(order, decode.segments if decode is not None else []):
            out[i] = logits[seg.lo : seg.hi]
        r = plan.rows
        return out, [logits[r + j : r + j + 1] for j in range(len(prompts))]

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        """A product's input: cast to the weights' dtype where activations are float32 (``act32``)."""
        return x.to(self.dtype) if self.act32 else x

    def _f32(self, y: torch.Tensor) -> torch.Tensor:
        return y.float() if self.act32 else y

    def run(self, ids: torch.Tensor, positions: torch.Tensor, plan, keep_all: bool = False):
        """The decoder over the rows of ``plan``: embedding, every layer, final norm, output layer. A generator:
        yields the layer index after each layer and returns the logits ((R, V), or (R, T, V) with ``keep_all``).

        ``ids`` / ``positions`` (R, T) int64; ``plan`` gives ``linear(proj, x)`` (which kernel computes which rows),
        ``attend(i, q, k, v) -> (R, T, H * D)`` (layer ``i``'s cache write and attention) and ``last(h)`` (the rows
        the output layer multiplies). The eager engine passes a :class:`~decodelab.fastpath.rows.RowPlan` (or a
        :class:`~decodelab.fastpath.rows.MixedPlan`: a decode step and whole prompts in one pass); the compiled step a
        :class:`~decodelab.fastpath.static.StaticRows` and exports this very code.
        """
        b, t = ids.shape
        h = F.embedding(ids, self.embed)
        if self.embed_scale is not None:  # Gemma3TextScaledWordEmbedding
            h = h * self.embed_scale
        if self.act32:
            h = h.float()
        half = self.head_dim // 2
        tables = {}
        for key in self.rope_keys:  # one (cos, signed sin) pair per rotary table, (R, 1, T, D) each
            cos, sin = self.rotary(h, positions) if key is None else self.rotary(h, positions, key)
            tables[key] = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
        for i, layer in enumerate(self.layers):
            cos, sin = tables[layer.rope_key]
            h = self._layer(i, layer, h, cos, sin, plan)
            yield i
        h = self._mm(self.rms_norm(h, self.norm, self.norm_eps))
        if keep_all:
            return self._softcap(self.lm_head(h))
        last = plan.last(h)
        return self._softcap(plan.linear(self.lm_head, last.contiguous() if self.head_folds else last)[:, -1])

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 3's final logit soft-capping (``Gemma3ForCausalLM.forward``): ``tanh(logits / c) * c`` as its three
        operations; the identity elsewhere."""
        if self.softcap is None:
            return logits
        logits = logits / self.softcap
        logits = torch.tanh(logits)
        return logits * self.softcap

    def _layer(self, i: int, layer: Layer, h: torch.Tensor, cos, sin, plan) -> torch.Tensor:
        """One decoder layer (``LlamaDecoderLayer``; ``Gemma3DecoderLayer`` where ``layer.post_attn`` is set: each
        branch's output normalised before the residual add): h (R, T, hidden) -> (R, T, hidden)."""
        b, t = h.shape[0], h.shape[1]
        shape = (b, t, -1, self.head_dim)
        n_qk = self.n_heads + self.n_kv
        x = self.rms_norm(h, layer.ln1, layer.eps1)
        # every product returns row-major rows (kernel_choice's weight-first product copies its transposed result
        # back): SDPA's flash kernel needs q/k/v with a unit last-dim stride, else it takes the 5x slower math path
        if layer.qkv is not None:  # one product for q, k, v; one rotary call for q and k together
            heads = self._f32(plan.linear(layer.qkv, self._mm(x))).view(shape).transpose(1, 2)
            qk = heads[:, :n_qk]
            if layer.qk_norm is not None:  # Qwen3 / Gemma 3: every q and k head normalised in one call
                qk = self.head_norm(qk, layer.qk_norm, layer.qk_eps)
            qk = rope(qk, cos, sin)
            q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads :], heads[:, n_qk:]
        else:
            q, k, v = (plan.linear(layer.q, x).view(shape), plan.linear(layer.k, x).view(shape),
                       plan.linear(layer.v, x).view(shape))
            # Qwen3Attention / Gemma3Attention: q_norm / k_norm per head, over D (Gemma normalises after the
            # transpose below: the same rows, the same values)
            if layer.q_norm is not None:
                q, k = self.head_norm(q, layer.q_norm, layer.qk_eps), self.head_norm(k, layer.k_norm, layer.qk_eps)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        att = plan.attend(i, q, k, v, layer.window)
        if layer.post_attn is None:
            h = h + plan.linear(layer.o, self._mm(att))
        else:
            h = h + self.rms_norm(self._f32(plan.linear(layer.o, self._mm(att))), layer.post_attn,
                                  layer.eps_post_attn)
        x = self.rms_norm(h, layer.ln2, layer.eps2)
        if layer.gate_up is not None:
            gate, up = plan.linear(layer.gate_up, self._mm(x)).chunk(2, -1)
        else:
            gate, up = plan.linear(layer.gate, x), plan.linear(layer.up, x)
        if layer.post_ff is None:
            return h + plan.linear(layer.down, self.act(gate) * up)
        return h + self.rms_norm(self._f32(plan.linear(layer.down, self.act(gate) * up)), layer.post_ff,
                                 layer.eps_post_ff)
