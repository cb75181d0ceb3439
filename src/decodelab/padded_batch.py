"""Continuous batching on the plain path: one forward of the transformers model for several requests' decode steps.

Models the fast path does not run (Qwen3, Mistral, Phi-3, Gemma, ...) keep their keys and values in transformers'
``DynamicCache``, one per request, each with its own left padding and length. A batched decode step:

1. **merge**: every layer's keys / values (B_i, H_kv, L_i, D) of the requests are left-padded with zeros to the
   longest L and stacked into one (sum B_i, H_kv, L, D) ``DynamicCache``; the 2D attention masks are left-padded
   with zeros the same way (so the padding is never attended), and each row keeps its own position ids;
2. one forward of the model over the (sum B_i, 1) new tokens, as ``model.generate`` does for a left-padded batch;
3. **filter**: each request gets back its own rows, with the extra left padding dropped (L_i + 1 positions).

Numbers: the model sees a padded batch, so a row's logits differ from those of the same request alone in the last
bits (float32: about 1e-6 relative; the matrix products' row counts and the attention's key length change the sums).
Greedy and beam ids stay the same except where two candidates tie to within that; BENCHMARKS.md ("Continuous
batching") counts how often ids differ. The fast path (Llama, Qwen2) is exact: see :mod:`decodelab.fastpath.rows`.

Caches that cannot be merged this way (sliding-window layers, recurrent / linear-attention states, anything but
full-attention ``DynamicLayer``\\ s) are stepped one request after another, exactly as alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def mergeable(cache) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` made only of full-attention ``DynamicLayer``\\ s holding tensors (the
    caches :func:`merged_step` can stack)."""
    return (type(cache) is DynamicCache and len(cache.layers) > 0
            and all(type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None
                    and layer.keys.dim() == 4 for layer in cache.layers))


def _layer(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    """A ``DynamicLayer`` holding ``keys`` / ``values`` (B, H_kv, L, D) as they are (no copy)."""
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def _cache(layers: list[DynamicLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    return cache


@torch.inference_mode()
def merged_step(forward, states: list, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """One decode step for several plain-path requests in one forward pass.

    Args:
        forward: ``Engine._forward`` (ids, 2D attention mask, position ids, cache, logits to keep) -> model output.
        states: the requests' :class:`~decodelab.engine.DecodeState`\\ s, each with a :func:`mergeable` cache and
            its (B_i, L_i) attention mask; updated in place (cache, mask, positions), as ``Engine.step`` does.
        tokens: (B_i,) ids fed to each.

    Returns:
        A (B_i, V) float32 logits tensor per request (see the module docstring for how they compare with the
        request alone).
    """
    lengths = [int(s.attention_mask.shape[1]) for s in states]
    longest = max(lengths)
    n_layers = len(states[0].cache.layers)
    layers = []
    for i in range(n_layers):
        keys = [F.pad(s.cache.layers[i].keys, (0, 0, longest - n, 0)) for s, n in zip(states, lengths)]
        values = [F.pad(s.cache.layers[i].values, (0, 0, longest - n, 0)) for s, n in zip(states, lengths)]
        layers.append(_layer(torch.cat(keys), torch.cat(values)))
    mask = torch.cat([F.pad(s.attention_mask, (longest - n, 0)) for s, n in zip(states, lengths)])
    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    positions = torch.cat([s.positions + 1 for s in states])
    ids = torch.cat([t.to(positions.device) for t in tokens])[:, None]
    out = forward(ids, mask, positions, _cache(layers), 1)
    logits = out.logits[:, -1].to(dtype=torch.float32)
    merged = out.cache.layers
    results, lo = [], 0
    for state, n in zip(states, lengths):
        hi = lo + int(state.positions.shape[0])
        cut = longest - n  # the extra left padding of this request
        state.cache = _cache([_layer(layer.keys[lo:hi, :, cut:], layer.values[lo:hi, :, cut:]) for layer in merged])
        state.attention_mask = mask[lo:hi, cut:]
        state.positions = positions[lo:hi]
        results.append(logits[lo:hi].clone())
        lo = hi
    return results
