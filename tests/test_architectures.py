"""Every architecture that loads decodes exactly as transformers' ``model.generate`` (issue 17, item 4).

Tiny random models (2 layers, hidden 64, vocabulary 1000, seeded) of 27 model types, from the decoder-only
families people run locally (GPT-2 and its descendants, Llama-likes, Gemma 1-3 with sliding windows, mixtures of
experts, state-space models Mamba / Mamba2 / FalconMamba, and LFM2's convolution-attention hybrid). For each:
greedy, beam search with a repetition penalty (3 beams, 2 returned) and seeded sampling must give the ids of
``model.generate`` with the same settings (sampling: ``torch.manual_seed(s)`` before ``generate``, decodelab's
``seed=s``). Llama, Mistral (its window of 4 binding), Qwen2, Qwen3, Phi-3 and Gemma 3 run on decodelab's fast
path; the others on the plain path, which feeds the model what its own ``prepare_inputs_for_generation`` prepares
(e.g. no attention mask after the first step for Mamba).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import decodelab

TYPES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
         "olmo2", "falcon", "stablelm", "granite", "smollm3", "opt", "bloom", "gptj", "gpt_bigcode", "starcoder2",
         "mixtral", "qwen3_moe", "mamba", "mamba2", "falcon_mamba", "lfm2"]

BASE = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
            initializer_range=0.2)
EXTRA = {  # what each type needs beyond BASE to be small and valid
    "gpt_neox": dict(num_key_value_heads=None),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gptj": dict(rotary_dim=8),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=4),
    "gemma3_text": dict(head_dim=16, sliding_window=4),
    "mistral": dict(sliding_window=4),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "mamba": dict(state_size=8),
    "falcon_mamba": dict(state_size=8),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, expand=2, state_size=16),
    "lfm2": dict(layer_types=["conv", "full_attention"], block_ff_dim=128),
}
PROMPT = [5, 6, 7, 8, 9, 10, 11]


def tiny_model(model_type: str):
    """A seeded tiny random causal LM of ``model_type`` (float32, CPU, eval mode)."""
    import transformers

    kwargs = {k: v for k, v in {**BASE, **EXTRA.get(model_type, {})}.items() if v is not None}
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return tiny_llama.tokenizer


def hf_ids(model, seed: int | None = None, **kw) -> list[list[int]]:
    ids = torch.tensor([PROMPT])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=2, **kw)
    return [row[len(PROMPT):] for row in out.tolist()]


@pytest.mark.parametrize("model_type", TYPES)
def test_architecture_decodes_like_generate(model_type, tokenizer):
    model = tiny_model(model_type)
    lm = decodelab.LM(model, tokenizer, model_type)
    assert (lm.engine.fast is not None) == (model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3",
                                                            "gemma3_text"))
    cases = [
        (dict(max_new_tokens=8, do_sample=False), None),
        (dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2, repetition_penalty=2.0),
         None),
        (dict(max_new_tokens=8, do_sample=True, top_k=50), 11),
    ]
    for kw, seed in cases:
        ours = lm.generate(PROMPT, eos_token_id=2, **kw, **({"seed": seed} if seed is not None else {}))
        theirs = hf_ids(model, seed, **kw)
        for seq, row in zip(ours.sequences, theirs):
            assert seq.new_ids == row[: len(seq.new_ids)], (model_type, kw)
            assert all(t == 0 for t in row[len(seq.new_ids):])
