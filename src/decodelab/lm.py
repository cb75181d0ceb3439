"""LM: the Python API over one loaded model. The CLI, the server and the web page all go through it.

    >>> import decodelab
    >>> lm = decodelab.load()                       # embedded SmolLM2-135M-Instruct, or $DECODELAB_MODEL
    >>> lm.tokenize("It was a dark and stormy").ids
    >>> lm.next_token("It was a dark and stormy").top[0]        # Candidate(id, token=' night', prob=...)
    >>> lm.generate("It was a dark and stormy", num_beams=5, repetition_penalty=2.0, max_new_tokens=38)
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from .config import GenerationConfig
from .distribution import Distribution, entropy, log_probs, top_candidates
from .engine import Engine
from .errors import ConfigError, InputError
from .processors import Context, build_processors
from .search import beam_search, token_search
from .search.common import PromptBatch, RawSequence, drain
from .search.tracing import Tracer
from .stopping import StopStrings, eos_tensor, find_stop
from .tokens import Tokens, tokenize
from .trace import Generation, Sequence, Trace


class LM:
    """A causal language model with its tokenizer and decodelab's decoding engine.

    Build it with :func:`decodelab.load`. Attributes: ``name`` (shown to users), ``model`` (transformers
    ``PreTrainedModel``), ``tokenizer``, ``engine`` (:class:`decodelab.engine.Engine`).
    """

    def __init__(self, model, tokenizer, name: str, source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.engine = Engine(model)

    def __repr__(self) -> str:
        return f"LM({self.name!r}, vocab={self.vocab_size}, context={self.context_window})"

    # --- facts -------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows of the model's output layer (V in logits of shape (B, T, V))."""
        return self.engine.vocab_size

    @property
    def context_window(self) -> int | None:
        """Maximum total tokens (prompt + new) the model's positions allow, or None when unknown."""
        return self.engine.max_positions

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence ids (generation config first, then the tokenizer's)."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's pad id, else the first eos id (transformers' "open-end generation")."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        return int(pad)

    # --- text -> tokens -> distribution --------------------------------------------------------------------------
    def encode(self, text: str, *, param: str = "text") -> list[int]:
        """Token ids of ``text`` (``tokenizer(text).input_ids``).

        Raises:
            InputError: ``text`` is not a string or gives no tokens.
        """
        if not isinstance(text, str):
            raise InputError(f"invalid {param}={text!r}: expected a string", param=param)
        ids = list(self.tokenizer(text).input_ids)
        if not ids:
            raise InputError(f"invalid {param}={text!r}: the text is empty, so there are no tokens", param=param)
        return ids

    def tokenize(self, text: str) -> Tokens:
        """The tokens of ``text``: ids, decoded pieces, byte-exact pieces, offsets.

        Raises:
            InputError: empty text.
        """
        self.encode(text)
        return tokenize(self.tokenizer, text)

    def next_token(self, text: str, top_k: int = 10) -> Distribution:
        """The model's next-token distribution after ``text`` (one forward pass over all T tokens).

        Returns a :class:`Distribution` with ``logits_shape == [1, T, V]``, the argmax, the ``top_k`` candidates
        (id, token, logit, prob in [0, 1], logprob in nats) and the entropy (nats) of the full distribution.

        Raises:
            InputError: empty text, or longer than the context window.
            ConfigError: ``top_k`` < 1.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"invalid top_k={top_k!r}: expected an integer >= 1", param="top_k")
        ids = self.encode(text)
        self._check_length(len(ids), 0)
        logits = self.engine.full_logits(torch.tensor([ids]))
        last = logits[0, -1]
        lp = log_probs(last)
        top = top_candidates(last, min(top_k, self.vocab_size), self.tokenizer, lp)
        return Distribution(
            text=text,
            ids=ids,
            logits_shape=list(logits.shape),
            argmax=top[0],
            top=top,
            entropy=float(entropy(lp)),
        )

    # --- generation ----------------------------------------------------------------------------------------------
    def config(self, **kwargs: Any) -> GenerationConfig:
        """Validate generation keywords for this model (transformers ``GenerationConfig`` names).

        Raises:
            ConfigError: unknown keyword or bad value (see :class:`decodelab.config.GenerationConfig`), or a token id
                outside the vocabulary.
        """
        cfg = GenerationConfig.from_kwargs(**kwargs)
        cfg.check_token_ids(self.vocab_size)
        return cfg

    def generate(self, prompt: str | list[str], **kwargs: Any) -> Generation:
        """Generate continuations of ``prompt`` (a string or a list of strings, run as one left-padded batch).

        Keywords are transformers' ``GenerationConfig`` names (``max_new_tokens``, ``num_beams``,
        ``num_return_sequences``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``length_penalty``, ``early_stopping``, ``eos_token_id``, ...) plus ``stop_strings``, ``seed``,
        ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``ignore_eos``, ``trace``, ``trace_top_k``.
        Deterministic settings return exactly the ids of ``model.generate`` on the same model (float32, CPU).

        Returns:
            :class:`Generation`: ``num_return_sequences`` sequences per prompt, in prompt order (beam search: best
            first), and the trace when ``trace=True``.

        Raises:
            ConfigError: a bad generation parameter. InputError: an empty prompt, or prompt + ``max_new_tokens``
            longer than the context window.
        """
        it = self._run(prompt, kwargs)
        return drain(it)

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Yield text deltas of the first sequence as it is generated; ``"".join(deltas)`` equals the final
        ``new_text``. For beam search, yields the current best beam's text as it changes (a delta may then
        rewrite: see :mod:`decodelab.streaming`)."""
        from .streaming import stream_deltas

        return stream_deltas(self, prompt, kwargs)

    # --- internals -----------------------------------------------------------------------------------------------
    def _check_length(self, prompt_len: int, max_new: int) -> None:
        window = self.context_window
        if window is not None and prompt_len + max_new > window:
            raise InputError(
                f"prompt of {prompt_len} tokens + max_new_tokens={max_new} exceeds the model's context window of "
                f"{window} tokens",
                param="prompt",
            )

    def _run(self, prompt: str | list[str], kwargs: dict[str, Any]):
        """The generator behind :meth:`generate` and :meth:`stream`: yields per-step events, returns Generation."""
        start = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts:
            raise InputError(f"invalid prompt={prompt!r}: expected a string or a non-empty list of strings", param="prompt")
        cfg = self.config(**kwargs)
        prompt_ids = [self.encode(p, param="prompt") for p in prompts]
        for ids in prompt_ids:
            self._check_length(len(ids), cfg.max_new_tokens)
        eos_ids = () if cfg.ignore_eos else (cfg.eos_token_id if cfg.eos_token_id is not None else self.eos_ids)
        batch = PromptBatch.from_lists(prompt_ids, self.pad_id)
        per_prompt = cfg.num_return_sequences if (cfg.do_sample and not cfg.is_beam) else 1
        rows = batch.repeat(per_prompt) if not cfg.is_beam else batch.repeat(cfg.num_beams)
        ctx = Context(batch.width, rows.pad_lengths.to(self.engine.device), eos_tensor(eos_ids, self.engine.device))
        procs = build_processors(cfg, ctx)
        stops = StopStrings(self.tokenizer, cfg.stop_strings)
        trace = None
        tracer = None
        if cfg.trace:
            strategy = ("beam_sampling" if cfg.do_sample else "beam_search") if cfg.is_beam else (
                "sampling" if cfg.do_sample else "greedy")
            trace = Trace(strategy=strategy, processors=[p.name for p in procs], config=cfg.to_dict())
            tracer = Tracer(self.tokenizer, cfg.trace_top_k, trace)
        if cfg.is_beam:
            raw = yield from beam_search(self.engine, batch, cfg, procs, ctx, stops, tracer)
        else:
            raw = yield from token_search(self.engine, batch.repeat(per_prompt), cfg, procs, ctx, stops, per_prompt, tracer)
        sequences = [self._sequence(r, prompt_ids[r.prompt_index], cfg) for r in raw]
        return Generation(
            model=self.name,
            prompt_ids=prompt_ids,
            sequences=sequences,
            trace=trace,
            elapsed_s=time.perf_counter() - start,
        )

    def _sequence(self, raw: RawSequence, prompt_ids: list[int], cfg: GenerationConfig) -> Sequence:
        new_text = self.tokenizer.decode(raw.new_ids, skip_special_tokens=True)
        if raw.finish_reason == "stop":
            cut = find_stop(new_text, cfg.stop_strings)
            new_text = new_text[:cut] if cut >= 0 else new_text
        prompt_text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        return Sequence(
            ids=prompt_ids + raw.new_ids,
            text=prompt_text + new_text,
            new_ids=raw.new_ids,
            new_text=new_text,
            score=raw.score,
            finish_reason=raw.finish_reason,
            prompt_index=raw.prompt_index,
        )
