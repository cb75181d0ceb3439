"""Tiny, seeded, randomly initialised causal LMs with real tokenizers, for the tests (not part of the package).

They run in milliseconds on a CPU, need no weights on disk, and give the same logits for the same seed, so tests of
processors, search and the engine can compare decodelab against ``transformers`` ``generate`` cheaply::

    >>> from tiny_models import tiny_random_model
    >>> tiny = tiny_random_model("qwen2")            # Qwen2ForCausalLM, real Qwen2 vocabulary (151936 logits)
    >>> tiny.model(tiny.tokenizer("hi", return_tensors="pt").input_ids).logits.shape
    torch.Size([1, 1, 151936])
"""

from __future__ import annotations

from decodelab.errors import ConfigError
from decodelab.models import EMBEDDED_MODEL, LoadedModel, load_tokenizer, qwen2_tokenizer

TINY_VOCAB = {"llama": 49152, "qwen2": 151936}  # SmolLM2-135M's and Qwen2-0.5B's output layer sizes


def tiny_random_model(arch: str = "llama", *, vocab_size: int | None = None, seed: int = 0, tokenizer=None,
                      hidden_size: int = 64, num_hidden_layers: int = 2, initializer_range: float = 0.1,
                      ) -> LoadedModel:
    """Return a :class:`~decodelab.models.LoadedModel` holding a tiny random ``LlamaForCausalLM`` (``arch="llama"``,
    SmolLM2's tokenizer, vocab 49152) or ``Qwen2ForCausalLM`` (``arch="qwen2"``, the offline Qwen2 tokenizer,
    vocab 151936): 2 layers, 4 heads (2 key/value heads), intermediate size 64, 256 positions, tied embeddings,
    float32, eval mode, ``source="random"``, ``name="tiny-random-<arch>"``.

    The weights depend only on ``seed`` (the global torch RNG is left untouched). ``initializer_range`` is 0.1, not
    transformers' 0.02, so the next-token distributions are peaked enough that near-ties are rare.
    ``tokenizer`` overrides the default one (the llama default reads the embedded SmolLM2 tokenizer, building its
    small cache on first use). Raises :class:`ConfigError` for an unknown ``arch`` a non-positive size, or a
    ``vocab_size`` smaller than the tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in TINY_VOCAB:
        raise ConfigError(f"arch must be 'llama' or 'qwen2', got {arch!r}", param="arch")
    vocab_size = TINY_VOCAB[arch] if vocab_size is None else vocab_size
    for param, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                         ("num_hidden_layers", num_hidden_layers)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{param} must be a positive integer, got {value!r}", param=param)
    if hidden_size % 8:
        raise ConfigError(f"hidden_size must be a multiple of 8 (4 heads of even size), got {hidden_size}",
                          param="hidden_size")
    if tokenizer is None:
        tokenizer = qwen2_tokenizer() if arch == "qwen2" else load_tokenizer(EMBEDDED_MODEL)
    if vocab_size < len(tokenizer):
        raise ConfigError(f"vocab_size must be at least the tokenizer's {len(tokenizer)} tokens, got {vocab_size}",
                          param="vocab_size")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=True, initializer_range=initializer_range,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    if arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = eos, tokenizer.pad_token_id, tokenizer.bos_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-random-{arch}", source="random")


def run_steps(engine, ids, mask, steps: int, hint: int | None = None, reorder=None):
    """Prefill (left-padded (B, T) ``ids`` / ``mask``; ``hint``: the engine's ``max_new_tokens`` cache hint) then
    greedy-feed ``steps`` tokens; ``reorder(step, batch)`` gives the rows to select before a step, as beam search does.
    Returns (every step's (B, V) float32 logits, the decode state)."""
    logits, state = engine.prefill(ids, mask, hint)
    out = [logits]
    for s in range(steps):
        if reorder is not None:
            rows = reorder(s, logits.shape[0])
            engine.select(state, rows)
            logits = logits.index_select(0, rows)
        logits = engine.step(state, logits.argmax(-1))
        out.append(logits)
    return out, state
