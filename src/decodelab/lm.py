"""LM: the Python API over one loaded model. The CLI, the server and the web page all go through it.

    >>> import decodelab
    >>> lm = decodelab.load()                       # embedded SmolLM2-135M-Instruct, or $DECODELAB_MODEL
    >>> lm.tokenize("It was a dark and stormy").ids
    >>> lm.next_token("It was a dark and stormy").top[0]        # Candidate(id, token=' night', prob=...)
    >>> lm.generate("It was a dark and stormy", num_beams=5, repetition_penalty=2.0, max_new_tokens=38)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .config import GenerationConfig, unencodable_at
from .distribution import Distribution, entropy, log_probs, top_candidates
from .detokenize import continuation_text, prompt_context
from .engine import Engine
from .errors import ConfigError, InputError
from .processors import Context, build_processors
from .search import beam_search, token_search
from .search.common import PromptBatch, RawSequence, Run, SearchRequest, drain
from .search.sampling import row_generators
from .search.tracing import Tracer
from .stopping import StopStrings, eos_tensor, find_stop, stopping_criteria
from .tokens import Tokens, tokenize
from .trace import Generation, Sequence, Trace

if TYPE_CHECKING:
    from .scoring import Score
    from .streaming import EventStream, Stream


def _is_id_list(x: Any) -> bool:
    """True for a non-empty list of ints: one prompt given as token ids (not a batch of prompts)."""
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _short(x: Any, limit: int = 60) -> str:
    """``repr(x)`` cut to ``limit`` characters (error messages stay one short line)."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LM:
    """A causal language model with its tokenizer and decodelab's decoding engine.

    Build it with :func:`decodelab.load`. Attributes: ``name`` (shown to users), ``model`` (transformers
    ``PreTrainedModel``), ``tokenizer``, ``engine`` (:class:`decodelab.engine.Engine`; default: ``Engine(model)``).
    """

    def __init__(self, model, tokenizer, name: str, source: str = "", engine: Engine | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.engine = Engine(model) if engine is None else engine

    def __repr__(self) -> str:
        return f"LM({self.name!r}, vocab={self.vocab_size}, context={self.context_window})"

    # --- facts -------------------------------------------------------------------------------------------------
    @property
    def engine_config(self):
        """The :class:`~decodelab.engine_config.EngineConfig` the engine runs with (device, dtype, kernels, ...)."""
        return self.engine.config

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

    def stop_ids(self, cfg: GenerationConfig) -> tuple[int, ...]:
        """The eos ids a request with settings ``cfg`` stops on: none with ``ignore_eos``, else ``cfg.eos_token_id``
        when given, else the model's :attr:`eos_ids`."""
        if cfg.ignore_eos:
            return ()
        return tuple(cfg.eos_token_id) if cfg.eos_token_id is not None else self.eos_ids

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

        Any valid Unicode is accepted (NUL, bidirectional marks, combining sequences...); a string UTF-8 cannot
        encode (a lone surrogate such as ``"\\ud800"``) is refused.

        Raises:
            InputError: ``text`` is not a string, contains a lone surrogate or gives no tokens (one line naming
                ``param``).
        """
        if not isinstance(text, str):
            raise InputError(f"invalid {param}={_short(text)}: expected a string", param=param)
        at = unencodable_at(text)
        if at >= 0:
            raise InputError(f"invalid {param}={_short(text)}: a lone surrogate {text[at]!r} at character {at} is not "
                             "valid Unicode text", param=param)
        ids = list(self.tokenizer(text).input_ids)
        if not ids:
            raise InputError(f"invalid {param}={text!r}: the text is empty, so there are no tokens", param=param)
        return ids

    def prompt_ids(self, prompt: str | list[int], *, param: str = "prompt") -> list[int]:
        """Token ids of one prompt: a string is encoded (:meth:`encode`); a list of token ids is checked and used
        exactly as given (no BOS or other special token is added).

        Raises:
            InputError: as :meth:`encode`, or an empty id list, or an id that is not an integer in
                ``[0, vocab_size)``.
        """
        if isinstance(prompt, str):
            return self.encode(prompt, param=param)
        if not isinstance(prompt, list):
            raise InputError(f"invalid {param}={_short(prompt)}: expected a string or a list of token ids", param=param)
        if not prompt:
            raise InputError(f"invalid {param}=[]: expected a non-empty list of token ids", param=param)
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InputError(f"invalid {param}[{i}]={_short(t)}: expected a token id from 0 to "
                                 f"{self.vocab_size - 1} (the vocabulary size is {self.vocab_size})", param=param)
        return list(prompt)

    def tokenize(self, text: str) -> Tokens:
        """The tokens of ``text``: ids, decoded pieces, byte-exact pieces, offsets.

        Raises:
            InputError: not a string, empty, or not valid Unicode (a lone surrogate).
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

    def next_logits(self, text: str) -> tuple[list[int], torch.Tensor]:
        """The token ids of ``text`` (length T) and the model's raw next-token logits after it: a (V,) float32
        tensor (one prefill pass that keeps only the last position). The web playground's ``/api/next-token`` reshapes
        these with temperature / top-k / top-p / min-p.

        Raises:
            InputError: empty text, or longer than the context window.
        """
        ids = self.encode(text)
        self._check_length(len(ids), 0, param="text")
        batch = torch.tensor([ids])
        logits, _ = self.engine.prefill(batch, torch.ones_like(batch), max_new_tokens=1)
        return ids, logits[0]

    def score(self, text: str, *, top_logprobs: int = 0) -> "Score":
        """Teacher-forced score of ``text`` (one forward pass): every token's log-probability (nats; ``None`` for
        the first token, which nothing predicts), its 0-based rank and the entropy (nats) of the distribution that
        predicted it, optionally the ``top_logprobs`` best alternatives per position, the total and mean
        log-probability and the perplexity ``exp(-mean)`` (equal to ``exp`` of transformers' ``model(ids,
        labels=ids).loss``). See :mod:`decodelab.scoring`.

        Raises:
            InputError: empty text, or more tokens than the context window.
            ConfigError: ``top_logprobs`` not an integer >= 0.
        """
        ids = self.encode(text)
        return self.score_ids(ids, top_logprobs=top_logprobs, text=text)

    def score_ids(self, ids: list[int], *, top_logprobs: int = 0, text: str | None = None) -> "Score":
        """:meth:`score` for token ids given directly (e.g. prompt ids + generated ids, for ``echo`` + ``logprobs``).

        Raises:
            InputError: no ids, an id outside the vocabulary, or more tokens than the context window.
            ConfigError: ``top_logprobs`` not an integer >= 0.
        """
        from .scoring import score_ids

        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ConfigError(f"invalid top_logprobs={top_logprobs!r}: expected an integer >= 0", param="top_logprobs")
        ids = list(ids)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids):
            raise InputError(f"invalid ids={ids!r}: expected a non-empty list of token ids below {self.vocab_size}",
                             param="ids")
        self._check_length(len(ids), 0, param="text")
        return score_ids(self.engine, self.tokenizer, ids, top_logprobs=min(top_logprobs, self.vocab_size),
                         name=self.name, text=text)

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

    def generate(self, prompt: str | list[int] | list[str] | list[list[int]], **kwargs: Any) -> Generation:
        """Generate continuations of ``prompt``: a string, or a list of token ids (used exactly, see
        :meth:`prompt_ids`), or a list of such prompts run as one left-padded batch.

        Keywords are transformers' ``GenerationConfig`` names (``max_new_tokens``, ``num_beams``,
        ``num_return_sequences``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``length_penalty``, ``early_stopping``, ``eos_token_id``, ...) plus ``stop_strings``, ``seed``,
        ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``ignore_eos``, ``trace``, ``trace_top_k``,
        ``lens`` (logit lens: ``lens=k`` or ``True`` for 5 keeps each layer's top-k per step in ``trace.lens``, see
        :mod:`decodelab.lens`; it turns ``trace`` on),
        and one constraint on the new text: ``json_schema`` (a dict or JSON text), ``regex`` or ``grammar`` (Lark or
        GBNF text); see :mod:`decodelab.grammar` and ``Sequence.constraint_met``.
        Deterministic settings return exactly the ids of ``model.generate`` on the same model (float32, CPU).

        Returns:
            :class:`Generation`: ``num_return_sequences`` sequences per prompt, in prompt order (beam search: best
            first), and the trace when ``trace=True``.

        Raises:
            ConfigError: a bad generation parameter. InputError: an empty prompt, a prompt that is not valid
            Unicode text, a token id outside the vocabulary, or prompt + ``max_new_tokens`` longer than the context
            window.
        """
        it = self._run(prompt, kwargs)
        return drain(it)

    def events(self, prompt: str | list[int] | list[str] | list[list[int]], **kwargs: Any) -> "EventStream":
        """Run a generation step by step and yield its typed events (:mod:`decodelab.events`): per step the
        trace records (``TraceStep``, with ``trace=True``), beam search's ``BeamUpdate`` per prompt, each settled
        token (``TokenEvent``: id, text piece, character offset, and with ``trace=True`` its log-probability and top
        alternatives), new stable text (``TextDelta``), then ``StepDone``; at the end one ``Finish`` per sequence
        (finish reason, new text, new ids, the :class:`Generation`).

        Same arguments and result as :meth:`generate`: per sequence the ``TokenEvent`` ids are its ``new_ids`` and
        the ``TextDelta`` texts join to its ``new_text``. The returned :class:`~decodelab.streaming.EventStream` also
        has ``config``, ``prompt_ids``, ``trace`` (filled while it runs), ``generation`` (at the end) and
        ``close()`` (stop early: no further model step runs).

        Raises:
            ConfigError, InputError: at once, before any token is generated, as :meth:`generate` documents.
        """
        from .streaming import EventStream

        return EventStream(self, prompt, kwargs)

    def stream(self, prompt: str | list[str], **kwargs: Any) -> "Stream":
        """Stream a generation: iterate the result for the first sequence's text deltas (non-empty ``str``), whose
        concatenation equals ``generate(prompt, **kwargs).sequences[0].new_text`` exactly (same settings and seed:
        the same ids), multi-byte UTF-8 and stop strings included. After the loop, ``.generation`` holds the
        :class:`Generation` (finish reasons, scores, trace). ``.deltas()`` follows every returned sequence. It is a
        filter over :meth:`events` (its ``TextDelta`` s).

        Beam search streams only text that can no longer change (the common prefix of every hypothesis still in
        the race) and the rest at the end; see :mod:`decodelab.streaming`.

        Raises:
            ConfigError, InputError: at once, before any token is generated.
        """
        from .streaming import Stream

        return Stream(self, prompt, kwargs)

    def generate_many(self, requests, *, max_batch_size: int = 16, **kwargs: Any) -> list[Generation]:
        """Generate for many requests at once with continuous batching; results in request order.

        ``requests``: prompts (str) and/or dicts ``{"prompt": ..., **settings}`` whose settings override
        ``kwargs`` (any :meth:`generate` keyword: each request keeps its own strategy, seed, stop strings, trace).
        At most ``max_batch_size`` rows share a decode step. Each result equals ``generate`` of that request alone
        (bit for bit on the default exact float32 engine; see :mod:`decodelab.scheduler`). The model runs in the
        calling thread (the requests' search loops as the scheduler's tasks in that same thread:
        :meth:`decodelab.scheduler.Scheduler.spawn`), unless batching is already on.

        Raises:
            ConfigError, InputError: a bad request, before anything runs; the message starts with ``requests[i]``.
        """
        from .batch import generate_many

        return generate_many(self, requests, max_batch_size=max_batch_size, **kwargs)

    def generate_iter(self, requests, *, max_batch_size: int = 16, **kwargs: Any):
        """:meth:`generate_many`, yielding ``(index, Generation)`` as each request finishes."""
        from .batch import generate_iter

        return generate_iter(self, requests, max_batch_size=max_batch_size, **kwargs)

    def batching(self, max_batch_size: int = 16):
        """Context manager: continuous batching for the block, so that ``generate`` / ``stream`` calls from several
        threads share decode steps (``with lm.batching(16): ...``). See :func:`decodelab.batch.batching`."""
        from .batch import batching

        return batching(self, max_batch_size)

    def explore(self, text: str):
        """An interactive notebook widget on this model starting at ``text``: token chips, the next-token chart with
        live temperature / top-k / top-p / min-p, step mode, generation with alternatives, the beam tree and the
        logit lens (:class:`decodelab.widget.Explorer`, an anywidget; the model runs in the kernel).

        Raises:
            ConfigError: the ``anywidget`` package is missing. InputError: a bad ``text``.
        """
        from .widget import explore

        return explore(self, text)

    # --- internals -----------------------------------------------------------------------------------------------
    def _check_length(self, prompt_len: int, max_new: int, param: str = "prompt") -> None:
        window = self.context_window
        if window is not None and prompt_len + max_new > window:
            what = f"{param} of {prompt_len} tokens" + (f" + max_new_tokens={max_new}" if max_new else "")
            raise InputError(f"{what} exceeds the model's context window of {window} tokens", param=param)

    def _run(self, prompt: str | list[str], kwargs: dict[str, Any], on_trace=None) -> Run:
        """Validate a request and prepare its search: the :class:`~decodelab.search.common.Run` behind
        :meth:`generate` and :meth:`stream`. It behaves as a generator that yields per-step events and returns the
        :class:`Generation`; nothing runs on the model before its first ``next``.

        ``on_trace`` (when ``trace=True``) is called with the :class:`Trace` as soon as it exists, so a caller can
        read ``trace.steps`` while they are recorded (the server streams logprobs that way).

        Raises:
            ConfigError, InputError: at once (not at the first ``next``), as :meth:`generate` documents.
        """
        start = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) or _is_id_list(prompt) else prompt
        if not isinstance(prompts, list) or not prompts:
            raise InputError(f"invalid prompt={_short(prompt)}: expected a string, a list of token ids or a "
                             "non-empty list of them", param="prompt")
        cfg = self.config(**kwargs)
        prompt_ids = [self.prompt_ids(p) for p in prompts]
        for ids in prompt_ids:
            self._check_length(len(ids), cfg.max_new_tokens)
        per_prompt = cfg.num_return_sequences if (cfg.do_sample and not cfg.is_beam) else 1
        trace = None
        if cfg.trace:
            strategy = ("beam_sampling" if cfg.do_sample else "beam_search") if cfg.is_beam else (
                "sampling" if cfg.do_sample else "greedy")
            trace = Trace(strategy=strategy, config=cfg.to_dict())
            if on_trace is not None:
                on_trace(trace)
        events = self._search(cfg, prompt_ids, per_prompt, trace, start)
        return Run(cfg, prompt_ids, per_prompt, events)

    def _search(self, cfg: GenerationConfig, prompt_ids: list[list[int]], per_prompt: int, trace: Trace | None,
                start: float):
        """The search generator of :meth:`_run` (see :class:`~decodelab.search.common.Run`)."""
        device = self.engine.device
        eos = eos_tensor(self.stop_ids(cfg), device)
        batch = PromptBatch.from_lists(prompt_ids, self.pad_id)
        rows = batch.repeat(per_prompt) if not cfg.is_beam else batch.repeat(cfg.num_beams)
        ctx = Context(batch.width, rows.pad_lengths.to(device), eos, tokenizer=self.tokenizer,
                      vocab_size=self.vocab_size)
        procs = build_processors(cfg, ctx)
        tracer = None
        if trace is not None:
            trace.processors = [p.name for p in procs]
            tracer = Tracer(self.tokenizer, cfg.trace_top_k, trace)
        req = SearchRequest(
            engine=self.engine, config=cfg, batch=batch, processors=procs, context=ctx,
            stopping=stopping_criteria(cfg.max_new_tokens, eos, StopStrings(self.tokenizer, cfg.stop_strings),
                                       prompt_ids),
            per_prompt=per_prompt, generators=row_generators(cfg, len(prompt_ids) * per_prompt, per_prompt, device),
            tracer=tracer)
        raw = yield from (beam_search(req) if cfg.is_beam else token_search(req))
        sequences = [self._sequence(r, prompt_ids[r.prompt_index], cfg) for r in raw]
        if trace is not None and cfg.lens:
            from .lens import generation_lens

            trace.lens = generation_lens(self.engine, self.tokenizer, sequences, prompt_ids, cfg.lens)
        return Generation(
            model=self.name,
            prompt_ids=prompt_ids,
            sequences=sequences,
            trace=trace,
            elapsed_s=time.perf_counter() - start,
        )

    def _sequence(self, raw: RawSequence, prompt_ids: list[int], cfg: GenerationConfig) -> Sequence:
        text_ids = raw.new_ids[:-1] if raw.finish_reason == "eos" else raw.new_ids  # the eos token has no text
        new_text = continuation_text(self.tokenizer, prompt_context(prompt_ids), text_ids)
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
            constraint_met=(raw.finish_reason == "eos") if cfg.constraint is not None else None,
        )
