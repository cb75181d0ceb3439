"""The fast path's forward pass: a Llama / Qwen2 / Qwen3 decoder run straight from the weight tensors over a
:class:`StaticKVCache`, with no module calls, no cache objects and no mask building per step.

Every operation is the one transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` run (``modeling_llama.py``:
``LlamaRMSNorm``, ``apply_rotary_pos_emb``, ``LlamaMLP``; ``integrations/sdpa_attention.py``:
``sdpa_attention_forward`` with its GQA handling; ``masking_utils.sdpa_mask``), on tensors of the same shapes and
in the same order, so in float32 on CPU the logits are bit-for-bit those of the model with a ``DynamicCache`` and
decodelab's search returns exactly ``model.generate``'s ids. What is saved is Python: module ``__call__``\\ s,
decorators, ``DynamicCache`` concatenation (the keys/values are written into a preallocated buffer) and the 4D mask
built per step (it is a view of the cache's preallocated 2D mask).

Two kernel-level changes keep the numbers and save time: a batch-1 float32 step runs each projection as one
``bmm`` over the two halves of its weight (:func:`half_linear`: both cores stream weights, same dot products), and
bfloat16 weights are prepacked once for oneDNN (:class:`PackedDense`) instead of on every call.

The attention of a step follows transformers' choice of SDPA call:

* no padding: ``scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)``;
* padding, one query token: the query heads are folded onto the key/value heads (``pack_gqa``) and the (B, 1, 1, L)
  boolean mask is passed;
* padding, prefill: keys/values repeated per query head (``repeat_kv``) and the (B, 1, T, T) causal & padding mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernel_choice
from .cache import StaticKVCache
from .rows import RowPlan, Segment, attention_mask

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


class Dense:
    """``y = x @ weight.T + bias`` (``torch.nn.functional.linear``): (..., in) -> (..., out).

    ``halves``: whether a one-row product runs as :func:`half_linear` (bit for bit the same numbers); set from the
    measurement of :mod:`decodelab.fastpath.kernel_choice` by :class:`FastDecoder` (default ``True``)."""

    __slots__ = ("weight", "bias", "halves")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.halves = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedDense(Dense):
    """:class:`Dense` with the weight prepacked once in oneDNN's blocked layout
    (``torch.ops.mkldnn._reorder_linear_weight``, as Inductor's freezing pass does), called through
    ``torch.ops.mkldnn._linear_pointwise``. ``F.linear`` in bfloat16 on CPU runs the same oneDNN kernel but
    reorders the weight on every call, which costs about as much as the product itself. (..., in) -> (..., out).
    """

    __slots__ = ("packed",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight, bias)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class MeasuredDense(Dense):
    """``kernels="fast"``: ``y = x @ weight.T + bias`` with the product measured fastest on this machine for the
    weight's shape and the call's row count (:mod:`decodelab.fastpath.kernel_choice`: ``F.linear``, two
    half-matrix ``bmm``\\ s, weight-first ``mm`` / ``bmm``, or oneDNN's GEMM on a prepacked copy, kept only where
    chosen). Except for ``linear`` / ``halves``, each output is the same dot product summed in another order:
    results differ from ``F.linear``'s in the last bits (~1e-6 relative), so greedy / beam outputs equal
    ``model.generate``'s except where two candidates tie to within rounding. (..., in) -> (..., out).

    Args:
        weight, bias: the (N, K) weight and (N,) bias or ``None``.
        choice: ``{str(bucket): product name}`` for every :data:`~decodelab.fastpath.kernel_choice.BUCKETS` entry.
    """

    __slots__ = ("choice", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, choice: dict[str, str]) -> None:
        super().__init__(weight, bias)
        self.choice = {int(b): name for b, name in choice.items()}
        self.packed = kernel_choice.prepack(weight) if "onednn" in self.choice.values() else None

    def name_for(self, rows: int) -> str:
        """The product used for ``rows`` rows."""
        return self.choice[kernel_choice.bucket(rows)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        name = self.name_for(x.numel() // x.shape[-1])
        return kernel_choice.product(name, x, self.weight, self.bias, self.packed)


KERNELS = ("exact", "fast")


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :class:`PackedDense` applies: bfloat16 weights on a CPU whose oneDNN supports bfloat16."""
    return dtype == torch.bfloat16 and kernel_choice.can_prepack(dtype, device)


class Layer:
    """One decoder layer's tensors: two RMSNorm weights (eps) and its projections (callables
    ``(..., in) -> (..., out)``: :class:`Dense` and its variants, or a quantized linear from :mod:`decodelab.quantize`).

    Unfused (the exact mode): ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``. Fused (``fuse=True``): ``qkv``
    (the q, k and v weights stacked: one product instead of three, split after) and ``gate_up`` (gate over up), with
    ``o`` and ``down`` as they are; the unfused names are then ``None``. Fusing stacks the weights into new tensors
    and rebinds the model's own q/k/v/gate/up parameters to views of them (same values, no second copy; a second
    fused engine on the same model finds them stacked and shares the tensors).
    """

    __slots__ = ("ln1", "eps1", "q", "k", "v", "o", "ln2", "eps2", "gate", "up", "down", "qkv", "qkv_sizes",
                 "q_norm", "k_norm", "qk_norm", "qk_eps",
                 "gate_up")

    def __init__(self, block, dense: type[Dense] = Dense, fuse: bool = False) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.ln1, self.eps1 = block.input_layernorm.weight, block.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon
        # Qwen3: per-head RMSNorm of queries and keys (weights (D,)); qk_norm: both stacked per head (H + H_kv, 1, D)
        # for the fused layout, where q and k heads are normalised in one call
        self.q_norm = self.k_norm = self.qk_norm = self.qk_eps = None
        if getattr(attn, "q_norm", None) is not None:
            self.q_norm, self.k_norm, self.qk_eps = attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon
            n_q = attn.config.num_attention_heads
            n_kv = attn.config.num_key_value_heads
            self.qk_norm = torch.cat([self.q_norm.detach().expand(n_q, -1), self.k_norm.detach().expand(n_kv, -1)])[
                :, None, :]
        self.o, self.down = dense(attn.o_proj.weight, attn.o_proj.bias), dense(mlp.down_proj.weight, mlp.down_proj.bias)
        self.qkv = self.gate_up = self.qkv_sizes = None
        if hasattr(attn, "qkv_proj"):  # Phi-3: stacked in the model already, one product as transformers runs
            n_q, n_kv = attn.config.num_attention_heads * attn.head_dim, attn.num_key_value_heads * attn.head_dim
            self.qkv_sizes = [n_q, n_kv, n_kv]
            self.qkv = dense(attn.qkv_proj.weight, attn.qkv_proj.bias)
            self.gate_up = dense(mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
            self.q = self.k = self.v = self.gate = self.up = None
        elif fuse:
            qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
            self.qkv_sizes = [m.weight.shape[0] for m in qkv]
            self.qkv = dense(*_stack_weights(qkv))
            self.gate_up = dense(*_stack_weights((mlp.gate_proj, mlp.up_proj)))
            self.q = self.k = self.v = self.gate = self.up = None
        else:
            self.q, self.k, self.v = (dense(m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate, self.up = (dense(m.weight, m.bias) for m in (mlp.gate_proj, mlp.up_proj))

    def projections(self) -> dict[str, object]:
        """The projections by name: ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``, or when fused ``qkv``,
        ``o``, ``gate_up``, ``down``."""
        names = ("qkv", "o", "gate_up", "down") if self.qkv is not None else ("q", "k", "v", "o", "gate", "up",
                                                                               "down")
        return {name: getattr(self, name) for name in names}


def _stack_weights(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack ``nn.Linear`` weights (and biases) along the output dimension into one new tensor, and rebind each
    module's weight / bias to its rows of it (a view: the model keeps working, with the same values, and the
    weights are stored once). Returns (weight (sum N, K), bias (sum N,) or None).

    The new tensors are inference tensors exactly when the parameters were, whatever mode the engine is built in:
    normal parameters rebound to inference tensors (an engine built inside ``torch.inference_mode()``) would break
    the model's forward pass with autograd ("Inference tensors cannot be saved for backward"); inference parameters
    (a model created inside ``torch.inference_mode()``) rebound to normal tensors would break its forward pass in
    inference mode ("Inference tensors do not track version counter").

    Parameters that already are consecutive rows of one tensor (an earlier fused engine on the same model stacked
    them) are not copied again: the returned tensors are views spanning those rows, shared with that engine."""
    shared = _already_stacked([m.weight for m in linears])
    if shared is not None:
        biases = [m.bias for m in linears]
        if all(b is None for b in biases):
            return shared, None
        if all(b is not None for b in biases):
            shared_bias = _already_stacked(biases)
            if shared_bias is not None:
                return shared, shared_bias
    inference = linears[0].weight.is_inference()
    with torch.inference_mode(inference), torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = [m.bias is not None for m in linears]
        bias = None
        if all(has_bias):
            bias = torch.cat([m.bias.detach() for m in linears])
        elif any(has_bias):
            bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                              for m in linears])
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = weight[start : start + n]
            if m.bias is not None and bias is not None:
                m.bias.data = bias[start : start + n]
            start += n
    return weight, bias


def _already_stacked(tensors) -> torch.Tensor | None:
    """The (sum N, ...) tensor whose consecutive rows ``tensors`` are (same storage, contiguous, each starting where
    the previous ends), as a detached view; ``None`` when they are not laid out that way."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    base = first.detach()
    return base.as_strided((rows, *first.shape[1:]), first.stride())


def half_linear(dense: Dense, x: torch.Tensor) -> torch.Tensor:
    """``dense(x)`` for one row x (1, 1, K) -> (1, 1, N), as one ``torch.bmm`` over the two halves of the weight's
    output rows (a view, no copy). PyTorch runs a float32 ``F.linear`` of one row as a single-threaded
    matrix-vector product, leaving the other cores idle while it streams the weight; ``bmm`` hands the halves to
    two OpenMP threads. Each output element is still the same dot product by the same kernel, so the result is
    bit-for-bit ``F.linear``'s (tests/test_fastpath.py compares against transformers); a bias is added after."""
    w = dense.weight
    n, k = w.shape
    if n % 2 or not dense.halves:
        return dense(x)
    y = torch.bmm(x.reshape(1, 1, k).expand(2, 1, k), w.view(2, n // 2, k).transpose(1, 2)).reshape(1, 1, n)
    return y if dense.bias is None else y + dense.bias


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


class FastDecoder:
    """Forward pass of a supported causal LM (see :func:`unsupported_reason`) over a :class:`StaticKVCache`.

    Holds references to the model's weight tensors (no copy), except that bfloat16 weights on CPU are prepacked
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
    """

    def __init__(self, model, pack: bool | None = None, halves: bool | None = None,
                 kernels: str = "exact", fuse: bool | None = None, act32: bool | None = None,
                 kernel_table: dict | None = None, measure: bool = True, progress=None) -> None:
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
        self.embed = inner.embed_tokens.weight
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
        self.layers = [Layer(block, dense, fuse=self.fused) for block in inner.layers[: cfg.num_hidden_layers]]
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head = dense(model.lm_head.weight, model.lm_head.bias)
        self.quantized: str | None = None
        if act32 is None:
            act32 = self.fused and self.dtype != torch.float32 and self.device.type == "cpu"
        self.act32 = bool(act32) and self.fused and self.dtype != torch.float32
        self.act_dtype = torch.float32 if self.act32 else self.dtype
        if self.act32:  # float32 copies of the (small) norm weights
            for layer in self.layers:
                layer.ln1, layer.ln2 = layer.ln1.detach().float(), layer.ln2.detach().float()
                if layer.qk_norm is not None:
                    layer.qk_norm = layer.qk_norm.float()
            self.norm = self.norm.detach().float()
        self._exact_shapes: dict = {}  # rows.RowPlan: per weight shape, whether the grouped product is exact here
        self.halves = ((self.device.type == "cpu" and self.dtype == torch.float32 and kernels == "exact")
                       if halves is None else halves)
        self.kernel_table: dict[str, dict] = {}
        if measured and (measure or kernel_table is not None):
            self._choose_kernels(kernel_table, progress)

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
        if table is None:
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
        # one-row requests first, so that they form one block for the grouped products (rows.RowPlan)
        order = sorted(range(len(items)), key=lambda i: items[i][0].shape[0] != 1) if len(items) > 1 else [0]
        segments, lo = [], 0
        for i in order:
            ids, _, cache = items[i]
            b, t = ids.shape
            past = cache.length
            if t > 1 and past:
                raise ValueError("fast path: multi-token input on a non-empty cache")
            cache.reserve(past + t)
            segments.append(Segment(cache, lo, lo + b, past, past + t,
                                    attention_mask(cache, t, past + t, ids.device)))
            lo += b
        ids = items[order[0]][0] if len(items) == 1 else torch.cat([items[i][0] for i in order])
        positions = items[order[0]][1] if len(items) == 1 else torch.cat([items[i][1] for i in order])
        b, t = ids.shape
        plan = RowPlan(segments, not self.fused and self._halves_for(b * t if len(items) == 1 else 1),
                       grouped=not self.packed and self.quantized is None and not self.fused
                       and self.kernels == "exact", exact_shapes=self._exact_shapes)
        logits = yield from self._layers(ids, positions, plan, keep_all)
        out = [None] * len(items)
        for i, seg in zip(order, segments):
            out[i] = logits if len(items) == 1 else logits[seg.lo : seg.hi]
        return out

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, plan: RowPlan, keep_all: bool):
        """The decoder over the concatenated rows of ``plan``: embedding, every layer, final norm, output layer.
        A generator: yields the layer index after each layer, returns the logits (see :meth:`forward_slices`)."""
        b, t = ids.shape
        h = F.embedding(ids, self.embed)
        act32, mm_dtype = self.act32, self.dtype
        if act32:
            h = h.float()
        cos, sin = self.rotary(h, positions)
        half = self.head_dim // 2
        cos, sin = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
        shape = (b, t, -1, self.head_dim)
        norm = fast_rms_norm if self.fused else rms_norm  # exact layers: LlamaRMSNorm's own operations
        n_qk = self.n_heads + self.n_kv

        def linear(proj, x):
            return plan.linear(proj, x, half_linear)

        for i, layer in enumerate(self.layers):
            x = norm(h, layer.ln1, layer.eps1)
            if layer.qkv is not None:  # one product for q, k, v; one rotary call for q and k together
                qkv = linear(layer.qkv, x.to(mm_dtype)).float() if act32 else linear(layer.qkv, x)
                heads = qkv.view(shape).transpose(1, 2)
                qk = heads[:, :n_qk]
                if layer.qk_norm is not None:  # Qwen3: every q and k head normalised in one call
                    qk = rms_norm(qk, layer.qk_norm, layer.qk_eps)
                qk = rope(qk, cos, sin)
                q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads :], heads[:, n_qk:]
            else:
                q, k, v = linear(layer.q, x).view(shape), linear(layer.k, x).view(shape), linear(layer.v, x).view(shape)
                if layer.q_norm is not None:  # Qwen3Attention: q_norm / k_norm on (B, T, H, D), then transpose
                    q, k = rms_norm(q, layer.q_norm, layer.qk_eps), rms_norm(k, layer.k_norm, layer.qk_eps)
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                q, k = rope(q, cos, sin), rope(k, cos, sin)
            att = self._segment_attention(i, plan, q, k, v, t)
            if act32:
                att = att.to(mm_dtype)
            h = h + linear(layer.o, att)
            x = norm(h, layer.ln2, layer.eps2)
            if layer.gate_up is not None:
                gate, up = linear(layer.gate_up, x.to(mm_dtype) if act32 else x).chunk(2, -1)
                h = h + linear(layer.down, F.silu(gate) * up)
            else:
                h = h + linear(layer.down, F.silu(linear(layer.gate, x)) * linear(layer.up, x))
            yield i
        for seg in plan.segments:
            seg.cache.length = seg.total
        h = norm(h, self.norm, self.norm_eps)
        if act32:
            h = h.to(mm_dtype)
        if keep_all:
            return self.lm_head(h)
        return linear(self.lm_head, h[:, -1:, :])[:, -1]

    def _segment_attention(self, i: int, plan: RowPlan, q, k, v, t: int) -> torch.Tensor:
        """Write layer ``i``'s new keys/values into each segment's cache and attend per segment, with the
        segment's own cache length and mask (as alone). q (R, H, T, D), k/v (R, H_kv, T, D) -> (R, T, H * D)."""
        outs = []
        for seg in plan.segments:
            keys, values = seg.cache.keys[i], seg.cache.values[i]
            sk, sv = (k, v) if len(plan.segments) == 1 else (k[seg.lo : seg.hi], v[seg.lo : seg.hi])
            keys[:, :, seg.past : seg.total] = sk
            values[:, :, seg.past : seg.total] = sv
            if seg.past:
                sk, sv = keys[:, :, : seg.total], values[:, :, : seg.total]
            sq = q if len(plan.segments) == 1 else q[seg.lo : seg.hi]
            outs.append(self._attention(sq, sk, sv, seg.mask, t))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
