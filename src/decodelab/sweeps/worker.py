"""The work of one model replica: generate a list of tasks through the batched engine and turn each result into rows.

The same :class:`Worker` runs in the local process (``decodelab sweep``) and inside each Ray actor
(``decodelab sweep --ray``), so both produce the same rows. A task is a plain dict (it crosses process boundaries)::

    {"strategy": str, "seed": int | None, "prompt_id": str, "prompt": str, "lang": str | None,
     "request": {GenerationConfig keywords, seed included}, "reference": str | None, "kind": "generate" | "reference"}

A row (one line of ``generations.jsonl``)::

    {"strategy", "seed", "sample", "prompt_id", "lang", "prompt",
     "text": the continuation (LM.generate's new_text), "ids": its token ids (eos included when generated),
     "finish_reason": "eos" | "length" | "stop" | "reference", "eos": bool,
     "n_tokens": content tokens (ids without the final eos),
     "logprobs": per id, its natural-log probability under the model given the prompt and the ids before it
                 (LM.score_ids of prompt + ids: the raw distribution, before any processor),
     "judge"?: {"model", "n_tokens", "logprobs"}: the continuation's text re-tokenized and scored by --judge-model,
     "trace"?: the Trace, when the strategy sets trace=true}

Generation runs through :meth:`LM.generate_iter` (continuous batching: every request equals the same request made
alone, bit for bit on the default float32 exact engine), so rows do not depend on how tasks are grouped.
"""

from __future__ import annotations

from typing import Any, Iterator

DEFAULT_MAX_BATCH_SIZE = 16


def _continuation_logprobs(lm, prompt_ids: list[int], new_ids: list[int]) -> list[float]:
    """Log-probabilities (nats) of ``new_ids`` after ``prompt_ids`` under ``lm`` (one teacher-forced pass)."""
    if not new_ids:
        return []
    score = lm.score_ids(list(prompt_ids) + list(new_ids))
    return [t.logprob for t in score.tokens[len(prompt_ids):]]


class Worker:
    """A loaded model (and optional judge) that turns tasks into rows. Build with :meth:`load` or pass LMs.

    Args:
        lm: the generating :class:`~decodelab.lm.LM`.
        judge: an optional second LM that scores each continuation's text (``judge_model``).
        max_batch_size: rows per decode step of continuous batching.
    """

    def __init__(self, lm, judge=None, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> None:
        self.lm = lm
        self.judge = judge
        self.max_batch_size = max_batch_size

    @classmethod
    def load(cls, model: str | None, *, judge_model: str | None = None, load_options: dict | None = None,
             max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, threads: int | None = None) -> "Worker":
        """Load the model (``decodelab.load(model, **load_options)``) and the judge; ``threads`` sets torch's
        intra-op threads first (a Ray actor sharing a node with others)."""
        import torch

        import decodelab

        if threads:
            torch.set_num_threads(int(threads))
        lm = decodelab.load(model, **(load_options or {}))
        judge = decodelab.load(judge_model) if judge_model else None
        return cls(lm, judge, max_batch_size=max_batch_size)

    # --- rows ------------------------------------------------------------------------------------------------------
    def _row(self, task: dict[str, Any], sample: int, prompt_ids: list[int], ids: list[int], text: str,
             finish_reason: str, trace: Any = None) -> dict[str, Any]:
        eos = finish_reason == "eos"
        row = {
            "strategy": task["strategy"], "seed": task.get("seed"), "sample": sample,
            "prompt_id": task["prompt_id"], "lang": task.get("lang"), "prompt": task["prompt"],
            "text": text, "ids": list(ids), "finish_reason": finish_reason, "eos": eos,
            "n_tokens": len(ids) - 1 if eos and ids else len(ids),
            "logprobs": _continuation_logprobs(self.lm, prompt_ids, ids),
        }
        if self.judge is not None:
            row["judge"] = self._judge_row(task["prompt"], text)
        if trace is not None:
            row["trace"] = trace.to_dict()
        return row

    def _judge_row(self, prompt: str, text: str) -> dict[str, Any]:
        """The continuation's text re-tokenized by the judge (no special tokens) and scored after the prompt."""
        judge = self.judge
        ids = list(judge.tokenizer(text, add_special_tokens=False).input_ids) if text else []
        return {"model": judge.name, "n_tokens": len(ids),
                "logprobs": _continuation_logprobs(judge, judge.encode(prompt), ids)}

    def _reference_row(self, task: dict[str, Any]) -> dict[str, Any]:
        ref = task["reference"]
        ids = list(self.lm.tokenizer(ref, add_special_tokens=False).input_ids)
        return self._row(task, 0, self.lm.encode(task["prompt"]), ids, ref, "reference")

    # --- running ---------------------------------------------------------------------------------------------------
    def run(self, tasks: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Run ``tasks``; yield the rows of each task as it finishes (reference tasks first, then generations in
        finishing order).

        Raises:
            ConfigError, InputError: a request the engine refuses (e.g. a prompt longer than the context window),
                before any generation of this call runs.
        """
        gen_tasks = []
        for task in tasks:
            if task.get("kind") == "reference":
                yield [self._reference_row(task)]
            else:
                gen_tasks.append(task)
        if not gen_tasks:
            return
        requests = [{"prompt": t["prompt"], **t["request"]} for t in gen_tasks]
        for i, gen in self.lm.generate_iter(requests, max_batch_size=self.max_batch_size):
            task = gen_tasks[i]
            prompt_ids = gen.prompt_ids[0]
            yield [self._row(task, j, prompt_ids, seq.new_ids, seq.new_text, seq.finish_reason,
                             gen.trace if j == 0 else None)
                   for j, seq in enumerate(gen.sequences)]
