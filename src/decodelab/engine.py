"""Engine: the only place that calls the model. Prefill and one-token decode steps over a KV cache.

The engine knows nothing of processors or search: it turns token ids into next-token logits, keeping the KV cache,
the attention mask and the position ids exactly as transformers' ``generate`` keeps them, so that decodelab's search
loops reproduce ``model.generate`` token for token:

- position ids: ``cumsum(attention_mask) - 1`` with padding positions set to 0, then ``+1`` per step
  (``GenerationMixin._prepare_position_ids_for_generation``);
- prefill computes only the last position's logits (``logits_to_keep=1``);
- logits are copied to float32 (``outputs.logits[:, -1].to(float32)``).

Batches are left-padded: row ``b``'s first ``pad_lengths[b]`` positions are padding with mask 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeState:
    """KV cache and bookkeeping of a batch being decoded.

    Attributes:
        cache: the model's KV cache (transformers ``Cache``), batch B.
        attention_mask: (B, L) int64, 1 for real tokens, 0 for left padding; L = tokens seen so far.
        positions: (B, 1) int64, the position id of the last token fed.
    """

    cache: object
    attention_mask: torch.Tensor
    positions: torch.Tensor


class Engine:
    """Runs a transformers causal LM (Llama, Qwen2, ... any ``*ForCausalLM`` that accepts ``cache`` and
    ``logits_to_keep``) under ``torch.inference_mode``.

    Args:
        model: a ``PreTrainedModel`` in eval mode.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)

    def _forward(self, input_ids, attention_mask, positions, cache, keep: int):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out

    @torch.inference_mode()
    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position of an unpadded batch: (B, T) ids -> (B, T, V) float32. No cache kept."""
        ids = input_ids.to(self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.logits.float()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Run the (left-padded) prompts. (B, T) ids and mask -> ((B, V) float32 last-position logits, state)."""
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self._forward(ids, mask, positions, None, keep=1)
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        return logits, DecodeState(out.cache, mask, positions[:, -1:])

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: (B,) ids -> (B, V) float32 logits. Updates ``state`` in place."""
        state.attention_mask = torch.cat(
            [state.attention_mask, state.attention_mask.new_ones((state.attention_mask.shape[0], 1))], dim=-1
        )
        state.positions = state.positions + 1
        out = self._forward(tokens.to(self.device)[:, None], state.attention_mask, state.positions, state.cache, 1)
        state.cache = out.cache
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    @staticmethod
    def select(state: DecodeState, rows: torch.Tensor) -> None:
        """Reorder / repeat the batch rows of ``state`` in place: new row i is old row ``rows[i]`` (beam search)."""
        rows = rows.to(state.attention_mask.device)
        state.cache.reorder_cache(rows)
        state.attention_mask = state.attention_mask.index_select(0, rows)
        state.positions = state.positions.index_select(0, rows)
