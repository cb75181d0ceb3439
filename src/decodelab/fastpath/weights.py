"""Weight surgery for the fused fast path: stacking q/k/v and gate/up weights into one tensor each, shared with the
model (its parameters are rebound to views of the stacked tensor, so the weights are stored once)."""

from __future__ import annotations

import torch


def stack_weights(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
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
