"""Weight-only quantization of the fast path's linear layers (int8 per output channel, int4 per group), and the
quality figures that go with it: top-1 agreement with the float32 model and perplexity over a fixed text.

The quantized projection modules themselves are :class:`~decodelab.fastpath.projections.Int8Linear` and
:class:`~decodelab.fastpath.projections.Int4Linear` (re-exported here). Activations stay in the model's dtype (float32 or bfloat16); only the weights are stored in fewer bits and
dequantized inside PyTorch's fused CPU kernels:

- ``int8``: symmetric, one scale per output row: ``w ~= q * scale``, ``q`` in [-127, 127]
  (``torch._weight_int8pack_mm``; the scheme of gpt-fast's ``WeightOnlyInt8QuantHandler``);
- ``int4``: asymmetric, one (scale, zero) per group of ``group_size`` input columns:
  ``w ~= (q - 8) * scale + zero``, ``q`` in [0, 15] (``torch._weight_int4pack_mm_for_cpu`` with weights packed by
  ``torch._convert_weight_to_int4pack_for_cpu``; gpt-fast's / torchao's "tinygemm" convention).

The tied embedding / output layer is left in the model's dtype unless ``lm_head=True`` (then int8 per row; the
embedding lookup keeps the original rows either way, it reads one row per token).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .fastpath.decoder import FastDecoder
from .fastpath.projections import INT4_GROUP, Dense, Int4Linear, Int8Linear

__all__ = ["INT4_GROUP", "Int4Linear", "Int8Linear", "SCHEMES", "quality", "quantize_decoder", "weight_bytes"]

SCHEMES = ("int8", "int4")


def quantize_decoder(decoder: FastDecoder, scheme: str, *, lm_head: bool = False,
                     group_size: int = INT4_GROUP) -> FastDecoder:
    """Replace ``decoder``'s q/k/v/o/gate/up/down projections (and the output layer when ``lm_head``) by
    weight-only quantized linears, in place; returns ``decoder``. The transformers model's weight values are not
    modified (a fused decoder has already rebound its q/k/v and gate/up parameters to views of stacked tensors).

    ``scheme``: ``"int8"`` or ``"int4"`` (int4 layers whose shape the kernel cannot pack stay int8; the output
    layer is always int8 when quantized). CPU only: the kernels are PyTorch's CPU ones.

    Raises:
        ConfigError: unknown ``scheme``, or the model is not on the CPU.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"invalid quantize={scheme!r}: expected one of {', '.join(SCHEMES)}", param="quantize")
    if decoder.device.type != "cpu":
        raise ConfigError(f"quantize={scheme!r} uses PyTorch's CPU kernels; the model is on {decoder.device}",
                          param="quantize")

    def convert(dense: Dense):
        if scheme == "int4" and Int4Linear.fits(dense.weight, group_size):
            return Int4Linear.from_weight(dense.weight, dense.bias, group_size)
        return Int8Linear.from_weight(dense.weight, dense.bias)

    with torch.inference_mode():
        for layer in decoder.layers:
            for name, proj in layer.projections().items():
                if isinstance(proj, Dense):
                    setattr(layer, name, convert(proj))
        if lm_head and isinstance(decoder.lm_head, Dense):
            decoder.lm_head = Int8Linear.from_weight(decoder.lm_head.weight, decoder.lm_head.bias)
    decoder.quantized = scheme + ("+lm_head" if lm_head else "")
    return decoder


def weight_bytes(decoder: FastDecoder) -> int:
    """Bytes of weights one decode step reads: every projection, the norms and the output layer (the embedding
    lookup reads one row per token and is not counted, unless it is the output layer too)."""
    total = 0

    def size(obj) -> int:
        if isinstance(obj, Dense):
            tensors = [obj.weight, obj.bias]
        elif isinstance(obj, Int8Linear):
            tensors = [obj.q, obj.scale, obj.bias]
        elif isinstance(obj, Int4Linear):
            tensors = [obj.packed, obj.scale_zero, obj.bias]
        else:
            tensors = [obj]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    for layer in decoder.layers:
        total += (size(layer.ln1) + size(layer.ln2) + size(layer.post_attn) + size(layer.post_ff)
                  + sum(size(p) for p in layer.projections().values()))
    return total + size(decoder.norm) + size(decoder.lm_head)


@torch.inference_mode()
def quality(reference, candidate, ids: list[int], window: int = 512) -> dict:
    """Quality of ``candidate`` against ``reference`` (two :class:`decodelab.engine.Engine` on the same model and
    tokenizer) over the token ids of a fixed text, in windows of ``window`` tokens.

    Returns a dict: ``tokens`` (positions scored), ``top1_agreement`` (fraction of positions whose argmax next-token
    prediction is the same, in [0, 1]), ``ppl_reference`` / ``ppl`` (perplexity ``exp(mean NLL)`` of the text's own
    next tokens, nats per token before ``exp``), ``ppl_change`` (relative change ``ppl / ppl_reference - 1``).

    Raises:
        ValueError: fewer than 2 ids.
    """
    if len(ids) < 2:
        raise ValueError("quality needs at least 2 token ids")
    agree = scored = 0
    nll_ref = nll = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]], dtype=torch.long)
        if chunk.shape[1] < 2:
            break
        inputs, targets = chunk[:, :-1], chunk[0, 1:]
        ref = reference.full_logits(inputs)[0].float()
        out = candidate.full_logits(inputs)[0].float()
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        scored += targets.numel()
        nll_ref -= float(torch.log_softmax(ref, -1).gather(1, targets[:, None]).sum())
        nll -= float(torch.log_softmax(out, -1).gather(1, targets[:, None]).sum())
    ppl_ref, ppl = math.exp(nll_ref / scored), math.exp(nll / scored)
    return {"tokens": scored, "top1_agreement": agree / scored, "ppl_reference": ppl_ref, "ppl": ppl,
            "ppl_change": ppl / ppl_ref - 1.0}
