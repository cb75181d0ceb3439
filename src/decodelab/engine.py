"""Engine: the only place that calls the model. Prefill and one-token decode steps over a KV cache.

The engine knows nothing of processors or search: it turns token ids into next-token logits, keeping the KV cache,
the attention mask and the position ids exactly as transformers' ``generate`` keeps them, so that decodelab's search
loops reproduce ``model.generate`` token for token:

- position ids: ``cumsum(attention_mask) - 1`` with padding positions set to 0, then ``+1`` per step
  (``GenerationMixin._prepare_position_ids_for_generation``);
- prefill computes only the last position's logits (``logits_to_keep=1``);
- logits are copied to float32 (``outputs.logits[:, -1].to(float32)``).

Batches are left-padded: row ``b``'s first ``pad_lengths[b]`` positions are padding with mask 0.

Two paths compute the same numbers:

- the **fast path** (default for Llama / Mistral / Phi-3 / Qwen2 / Qwen3 / Gemma 3 text models with SDPA attention, see
  :func:`decodelab.fastpath.unsupported_reason`): :class:`decodelab.fastpath.FastDecoder` over a preallocated
  :class:`decodelab.fastpath.StaticKVCache` sized to the request. In float32 its logits are bit-for-bit those of
  the model (same operations, same shapes), so parity with ``model.generate`` is unchanged; optional weight-only
  quantization (:mod:`decodelab.quantize`) and ``torch.compile`` (:mod:`decodelab.compile_cache`) act on it only;
- the **plain path**: the transformers model with a ``DynamicCache`` (any other model, or ``fast=False``, or
  ``DECODELAB_FASTPATH=0``).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch

from .engine_config import DTYPES, EngineConfig
from .fastpath import FastDecoder, StaticKVCache, unsupported_reason
from .fastpath.decoder import drain
from .threads import model_threads

DEFAULT_HEADROOM = 64  # cache positions allocated beyond the prompt when the caller gives no max_new_tokens


@dataclass
class DecodeState:
    """KV cache and bookkeeping of a batch being decoded.

    Attributes:
        cache: the KV cache, batch B: a :class:`StaticKVCache` on the fast path (it also holds the 2D attention
            mask), a transformers ``Cache`` on the plain path.
        attention_mask: (B, L) int64, 1 for real tokens, 0 for left padding; L = tokens seen so far (plain path;
            ``None`` on the fast path, where ``cache.pad`` holds it).
        positions: (B, 1) int64, the position id of the last token fed.
        padded: (plain path) whether any row was left-padded; without padding the model gets no attention mask,
            as ``generate`` drops an all-ones one.
    """

    cache: object
    attention_mask: torch.Tensor | None
    positions: torch.Tensor
    padded: bool = True


@dataclass
class JoiningPrompt:
    """A one-row prompt about to join a decode step (:meth:`Engine.step_and_prefill`).

    Attributes:
        ids: (1, T) int64 token ids on the model's device; positions: (1, T) int64, ``0 .. T-1`` (no padding);
        cache: its empty, started fast-path cache (a pool slot where one was free).
    """

    ids: torch.Tensor
    positions: torch.Tensor
    cache: StaticKVCache


def _model_placement(model) -> dict[str, str]:
    """``device`` and ``dtype`` of ``model``'s first parameter, as :class:`EngineConfig` keywords (a dtype
    EngineConfig does not know, e.g. float64, is left out)."""
    param = next(model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    return {"device": str(param.device), **({"dtype": dtype} if dtype in DTYPES else {})}


def _fast_enabled(fast: bool | None) -> bool:
    if fast is not None:
        return bool(fast)
    return os.environ.get("DECODELAB_FASTPATH", "1").strip().lower() not in {"0", "false", "no", "off"}


class Engine:
    """Runs a transformers causal LM (Llama, Qwen2, ... any ``*ForCausalLM`` that accepts ``cache`` and
    ``logits_to_keep``) under ``torch.inference_mode``.

    Args:
        model: a ``PreTrainedModel`` in eval mode, already on ``config.device`` in ``config.dtype`` (as
            :func:`decodelab.models.load_model` leaves it; the engine moves nothing).
        config: the validated :class:`~decodelab.engine_config.EngineConfig` (its fields are documented there):
            ``fast`` / ``pack`` (which path, prepacked bfloat16 weights), ``quantize`` / ``quantize_lm_head``
            (weight-only int8 / int4 on the fast path, :func:`decodelab.quantize.quantize_decoder`), ``kernels``
            (``"exact"``: the fast path's float32 logits are bit-for-bit the model's; ``"fast"``: fused q/k/v and
            gate/up products, fused RMSNorm, one rotary call per layer and the kernel measured fastest per product,
            :class:`decodelab.fastpath.projections.MeasuredDense`, equal to ~1e-6 relative), ``batch_invariant``
            (with ``kernels="fast"``: decodelab's own row-by-row GEMM and attention kernels, so that every answer is
            bit for bit the same alone and batched), ``compile`` (AOTInductor, :mod:`decodelab.compile_cache`).
        **options: instead of ``config``, its fields as keywords (``Engine(model, kernels="fast")``), folded into
            ``EngineConfig.from_kwargs(**options)`` with ``device`` / ``dtype`` defaulting to the model's.

    Attributes:
        config: the :class:`EngineConfig` in force. ``fast``: the :class:`FastDecoder`, or ``None`` on the plain
            path. ``fast_reason``: why not, when ``None``.

    Raises:
        ConfigError: a bad option (from :class:`EngineConfig`), or ``quantize``, ``compile`` or ``kernels="fast"``
            requested for a model the fast path does not support, or ``batch_invariant`` where its kernels cannot
            run (:class:`~decodelab.fastpath.decoder.FastDecoder`).
        ConfigError: both ``config`` and keyword options (param ``engine``).
    """

    def __init__(self, model, config: EngineConfig | None = None, **options) -> None:
        from .errors import ConfigError

        if config is None:
            config = EngineConfig.from_kwargs(**{**_model_placement(model), **options})
        elif options:
            raise ConfigError(f"invalid engine: Engine() takes a config or keyword options, not both (got "
                              f"{', '.join(options)})", param="engine")
        self.config = config
        kernels, quantize, compile = config.kernels, config.quantize, config.compile
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.fast: FastDecoder | None = None
        wants_fast = bool(quantize or compile or kernels != "exact")
        self.fast_reason = unsupported_reason(model) if _fast_enabled(config.fast) or wants_fast else "disabled"
        self.compiled = None
        self.scheduler = None  # a decodelab.scheduler.Scheduler while batching (start_batching)
        self.slot_pool = None  # while batching: the one-row requests' shared cache slots (_pooled_cache)
        self.kernels = kernels
        forward_params = inspect.signature(model.forward).parameters
        self._takes_positions = "position_ids" in forward_params
        self._takes_logits_to_keep = "logits_to_keep" in forward_params
        if self.fast_reason is None:
            self.fast = FastDecoder(model, pack=config.pack, kernels=kernels, fuse=kernels == "fast" or bool(quantize),
                                    measure=not quantize, invariant=config.batch_invariant and kernels == "fast")
        elif wants_fast:
            param = "quantize" if quantize else "compile" if compile else "kernels"
            raise ConfigError(f"{param} needs the fast path, which cannot run this model: {self.fast_reason}",
                              param=param)
        self.quantize = quantize
        if quantize:
            from .quantize import quantize_decoder

            quantize_decoder(self.fast, quantize, lm_head=config.quantize_lm_head)
        if compile:
            from .compile_cache import CompiledStep

            self.compiled = CompiledStep(self.fast, model, options=compile if isinstance(compile, dict) else None)

    def _forward(self, input_ids, attention_mask, positions, cache, keep: int, first: bool = False):
        """One call of the model on the plain path, made as transformers' ``generate`` makes it: the inputs go
        through the model's own ``prepare_inputs_for_generation`` (``GenerationMixin``, or the model's override:
        Mamba's drops the attention mask after the first step, Gemma 3's builds its own masks), then
        ``model(**inputs)``. ``attention_mask`` (B, L) or ``None`` (no padding: ``generate`` drops an all-ones
        mask); ``positions`` (B, T) position ids, passed where the model's forward takes them; ``keep``: logits of
        the last ``keep`` positions; ``first``: the prefill. Returns the model output (``.logits``, ``.cache``)."""
        kwargs = {"use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self._takes_positions:
            kwargs["position_ids"] = positions
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        inputs = self.model.prepare_inputs_for_generation(input_ids, cache=cache, is_first_iteration=first, **kwargs)
        return self.model(**inputs, return_dict=True)

    # --- continuous batching -----------------------------------------------------------------------------------
    def start_batching(self, max_batch_size: int = 16, gather_s: float | None = None, *, thread: bool = True):
        """Hand the model to a :class:`~decodelab.scheduler.Scheduler`: from now on ``prefill``, ``step``
        and ``full_logits`` called from any other thread run in the scheduler's loop, and concurrent requests' decode
        steps run together (at most ``max_batch_size`` rows per step). ``thread``: the scheduler runs its own thread
        (default); ``False``: the caller runs the loop (:meth:`Scheduler.run <decodelab.scheduler.Scheduler.run>`),
        in the thread that loaded the model (faster: :mod:`decodelab.threads`). Returns the scheduler; a running
        one is replaced only after :meth:`stop_batching`.

        Raises:
            ConfigError: ``max_batch_size`` < 1 or a negative ``gather_s``.
        """
        from .scheduler import DEFAULT_GATHER_S, Scheduler

        if self.scheduler is None:
            self.scheduler = Scheduler(self, max_batch_size, DEFAULT_GATHER_S if gather_s is None else gather_s,
                                       thread=thread)
        return self.scheduler

    def stop_batching(self) -> None:
        """Stop the scheduler thread (after the work queued); calls run directly in the caller's thread again."""
        scheduler, self.scheduler = self.scheduler, None
        self.slot_pool = None  # caches in its slots keep their views of it
        if scheduler is not None:
            scheduler.close()

    def _routed(self):
        """The scheduler when this call must go through it (batching on, and not already in its thread)."""
        scheduler = self.scheduler
        return scheduler if scheduler is not None and not scheduler.owns_current_thread() else None

    def release(self, state: DecodeState) -> None:
        """The request decoding ``state`` is finished or gone (search loops call this in ``finally``): with
        batching on, the next decode steps stop waiting for it. Without batching, nothing to do."""
        scheduler = self.scheduler
        if scheduler is not None:
            scheduler.release(state)

    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position of an unpadded batch: (B, T) ids -> (B, T, V) float32. No cache kept."""
        scheduler = self._routed()
        if scheduler is not None:
            return scheduler.run_pass(lambda: self._full_logits(input_ids))
        with model_threads():
            return self._full_logits(input_ids)

    @torch.inference_mode()
    def _full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device)
        if self.fast is not None:
            cache = self.fast.new_cache(ids.shape[0], ids.shape[1])
            cache.start(torch.ones_like(ids))
            positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
            # contiguous: kernels="fast" multiplies 2-3 rows weight-first (mm(W, x.T).T), a transposed layout
            return self.fast.forward(ids, positions, cache, keep_all=True).float().contiguous()
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.logits.float()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                max_new_tokens: int | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Run the (left-padded) prompts. (B, T) ids and mask -> ((B, V) float32 last-position logits, state).

        ``max_new_tokens`` sizes the fast path's preallocated cache (T + max_new_tokens positions); without it the
        cache starts at T + 64 positions and grows by doubling. With batching on, the prefill runs in the
        scheduler thread between decode steps, a few layers at a time when other requests are decoding
        (:meth:`_prefill_slices`), with exactly the numbers of the request alone; off the exact path a short
        one-row prompt may instead join a decode step (:meth:`joining_prompt`, :meth:`step_and_prefill`).
        """
        scheduler = self._routed()
        if scheduler is not None:
            join = None  # only a prompt that can join is offered (the exact engine's prefills keep their order)
            if self._can_join(input_ids, attention_mask):
                join = lambda: self.joining_prompt(input_ids, attention_mask, max_new_tokens)  # noqa: E731
            return scheduler.run_pass(lambda: self._prefill_slices(input_ids, attention_mask, max_new_tokens),
                                      sliced=True, join=join, join_tokens=int(input_ids.shape[-1]))
        with model_threads():
            return drain(self._prefill_slices(input_ids, attention_mask, max_new_tokens))

    def _prefill_slices(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int | None):
        """:meth:`prefill` as a generator that yields after each decoder layer on the fast path
        (:meth:`FastDecoder.forward_slices`; the plain path runs in one piece) and returns its result. Called and
        advanced in inference mode (the scheduler thread runs in it; :meth:`prefill` drains it in it)."""
        with torch.inference_mode():
            ids = input_ids.to(self.device)
            mask = attention_mask.to(self.device).long()
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            if self.fast is None:
                padded = not bool((mask == 1).all())
                out = self._forward(ids, mask if padded else None, positions, None, keep=1, first=True)
                logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
                return logits, DecodeState(out.cache, mask, positions[:, -1:], padded)
            cache = self._cache_for(ids, max_new_tokens)
            cache.start(mask)
        slices = self.fast.forward_slices([(ids, positions, cache)])
        while True:
            with torch.inference_mode():
                try:
                    next(slices)
                except StopIteration as done:
                    (logits,) = done.value
                    break
            yield
        # a fresh tensor: converted, not copied
        return logits.float().contiguous(), DecodeState(cache, None, positions[:, -1:])

    def _cache_for(self, ids: torch.Tensor, max_new_tokens: int | None) -> StaticKVCache:
        """A fast-path cache for the (B, T) prompt ``ids`` with room for ``max_new_tokens`` (else
        :data:`DEFAULT_HEADROOM`) more positions: a slot of the pool where batching allows (:meth:`_pooled_cache`),
        else its own (capacity rounded to a compiled bucket with ``compile``)."""
        extra = DEFAULT_HEADROOM if max_new_tokens is None else max(int(max_new_tokens), 1)
        capacity = ids.shape[1] + extra
        if self.compiled is not None:
            capacity = self.compiled.capacity_for(capacity)
        return self._pooled_cache(ids.shape[0], capacity) or self.fast.new_cache(ids.shape[0], capacity)

    def joining_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       max_new_tokens: int | None = None) -> JoiningPrompt | None:
        """A prompt ready to join a decode step (:meth:`step_and_prefill`) instead of a prefill of its own, or
        ``None`` where that does not apply: the plain path, the exact float32 path (its products must see each
        request's rows alone), several rows, no token, or left padding. Takes the prompt's cache (a pool slot where
        one is free). Called in the scheduler thread when it is about to run a step."""
        if not self._can_join(input_ids, attention_mask):
            return None
        with torch.inference_mode():
            ids = input_ids.to(self.device)
            cache = self._cache_for(ids, max_new_tokens)
            cache.start(torch.ones_like(ids))
            positions = torch.arange(ids.shape[1], device=self.device)[None]
        return JoiningPrompt(ids, positions, cache)

    def _can_join(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """Whether this (B, T) prompt may join a decode step (see :meth:`joining_prompt`)."""
        return (self.fast is not None and not self.fast.rows_exact and input_ids.shape[0] == 1
                and input_ids.shape[-1] > 0 and bool(attention_mask.all()))

    def _step_items(self, states: list[DecodeState], tokens: list[torch.Tensor]) -> list[tuple]:
        """Advance each fast-path state by one position and return its ``(ids (B_i, 1), positions, cache)`` item
        for :meth:`decodelab.fastpath.FastDecoder.forward_many` / ``forward_mixed``."""
        items = []
        for state, tok in zip(states, tokens):
            state.positions = state.positions + 1
            state.cache.append_mask()
            items.append((tok.to(self.device)[:, None], state.positions, state.cache))
        return items

    @torch.inference_mode()
    def step_and_prefill(self, states: list[DecodeState], tokens: list[torch.Tensor],
                         prompts: list[JoiningPrompt]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor,
                                                                                             DecodeState]]]:
        """:meth:`step_many` and the prefills of ``prompts`` (from :meth:`joining_prompt`) in one forward pass
        (:meth:`decodelab.fastpath.FastDecoder.forward_mixed`): every product reads the weights once for the step's
        rows and the prompts' tokens. Returns (each state's (B_i, V) float32 logits, each prompt's ``(logits (1, V)
        float32, state)`` as :meth:`prefill` returns them). ``states`` may be empty.

        The numbers differ from a separate step and prefill at float rounding (~1e-6 relative), as every batched
        product off the exact path does (README, "Continuous batching")."""
        step_logits, prompt_logits = self.fast.forward_mixed(self._step_items(states, tokens),
                                                             [(p.ids, p.positions, p.cache) for p in prompts])
        return ([logits.float().contiguous() for logits in step_logits],
                [(logits.float().contiguous(), DecodeState(p.cache, None, p.positions[:, -1:]))
                 for p, logits in zip(prompts, prompt_logits)])

    def _pooled_cache(self, batch: int, capacity: int) -> StaticKVCache | None:
        """While batching, off the exact float32 path, uncompiled: a one-row request's cache in a slot of the
        engine's :class:`~decodelab.fastpath.slots.SlotPool` (made at the first such request, one slot per row of
        ``max_batch_size``), so that batched decode steps attend in one call; ``None`` where that does not apply or
        no slot is free (the request then gets a cache of its own)."""
        scheduler = self.scheduler
        if scheduler is None or batch != 1 or self.compiled is not None or self.fast.rows_exact:
            return None
        if self.slot_pool is None:
            self.slot_pool = self.fast.new_pool(scheduler.max_batch_size)
        slot = self.slot_pool.acquire(capacity)
        return None if slot is None else StaticKVCache.in_slot(self.slot_pool, slot)

    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: (B,) ids -> (B, V) float32 logits. Updates ``state`` in place. With batching
        on, the step runs in the scheduler's next batched decode step."""
        scheduler = self._routed()
        if scheduler is not None:
            return scheduler.step(state, tokens)
        with model_threads():
            return self._step(state, tokens)

    @torch.inference_mode()
    def step_many(self, states: list[DecodeState], tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """One decode step for several requests: ``tokens[i]`` (B_i,) ids fed to ``states[i]`` -> a (B_i, V)
        float32 logits tensor each, equal to what :meth:`step` returns for that request alone.

        On the fast path this is one forward pass over all rows (:meth:`decodelab.fastpath.FastDecoder.forward_many`);
        on the exact float32 engine each request's logits are bit for bit its logits alone
        (:mod:`decodelab.fastpath.rows`). With ``compile``, a lone request's step runs compiled and a step of several
        requests runs as that one eager pass (a compiled graph has one request's fixed shape: R requests one after
        another would cost R compiled steps), so their logits are within float rounding of the compiled ones alone.
        On the plain path, the requests whose ``DynamicCache`` can be merged run as one left-padded batch
        (:func:`decodelab.padded_batch.merged_step`: logits within float rounding of alone, not bit for bit); the
        others run one after another (same numbers as alone, no batching gain).
        """
        if len(states) == 1:
            return [self._step(states[0], tokens[0])]
        if self.fast is None:
            from .padded_batch import merged_step, mergeable

            out: list[torch.Tensor | None] = [None] * len(states)
            merge = [i for i, s in enumerate(states) if mergeable(s.cache)]
            if len(merge) > 1:
                for i, logits in zip(merge, merged_step(self._forward, [states[i] for i in merge],
                                                        [tokens[i] for i in merge])):
                    out[i] = logits
            else:
                merge = []
            for i, (s, t) in enumerate(zip(states, tokens)):
                if i not in merge:
                    out[i] = self._step(s, t)
            return out
        return [logits.float().contiguous() for logits in self.fast.forward_many(self._step_items(states, tokens))]

    @torch.inference_mode()
    def _step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        state.positions = state.positions + 1
        tokens = tokens.to(self.device)[:, None]
        if isinstance(state.cache, StaticKVCache):
            state.cache.append_mask()
            if self.compiled is not None:
                logits = self.compiled.step(tokens, state.positions, state.cache)
            else:
                logits = self.fast.forward(tokens, state.positions, state.cache)
            # Fresh tensors (the eager step's and the compiled package's outputs are new each step), so only
            # converted where needed: to float32, and contiguous (kernels="fast" multiplies 2-3 rows weight-first,
            # mm(W, x.T).T, a transposed layout).
            return logits.float().contiguous()
        state.attention_mask = torch.cat(
            [state.attention_mask, state.attention_mask.new_ones((state.attention_mask.shape[0], 1))], dim=-1
        )
        mask = state.attention_mask if state.padded else None
        out = self._forward(tokens, mask, state.positions, state.cache, 1)
        state.cache = out.cache
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    @staticmethod
    @torch.inference_mode()
    def select(state: DecodeState, rows: torch.Tensor) -> None:
        """Reorder / repeat the batch rows of ``state`` in place: new row i is old row ``rows[i]`` (beam search)."""
        rows = rows.to(state.positions.device)
        if isinstance(state.cache, StaticKVCache):
            state.cache.select(rows)
        else:
            state.cache.reorder_cache(rows)
            state.attention_mask = state.attention_mask.index_select(0, rows)
        state.positions = state.positions.index_select(0, rows)
