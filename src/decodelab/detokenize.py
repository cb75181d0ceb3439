"""Text of generated ids: one definition shared by the final result, the stop-string check and the stream.

``continuation_text(tokenizer, context_ids, new_ids)`` is the text that ``new_ids`` add after the last few prompt
ids: ``decode(context + new)[len(decode(context)):]`` (special tokens skipped). Decoding the new ids together with
a little prompt context, instead of alone, keeps what a standalone decode loses: a SentencePiece tokenizer drops the
leading space of the first token it decodes (``"▁world"`` alone is ``"world"``), so ``Hello`` + ``world`` would
otherwise read ``Helloworld``. Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2) give the same text either
way.

The function is *prefix-monotone* in practice: the text of ``new_ids[:n]`` is a prefix of the text of ``new_ids``,
except for (a) a trailing partial UTF-8 character, which decodes to U+FFFD until its last byte arrives, and (b)
tokenizers that "clean up tokenization spaces" (``" ."`` -> ``"."``), which may rewrite a trailing space. The
incremental detokenizer in :mod:`decodelab.streaming` holds both back.
"""

from __future__ import annotations

CONTEXT_TOKENS = 4
"""How many trailing prompt ids are decoded with the new ids (enough for every tokenizer we know: the context only
has to absorb a decoder's "strip the first leading space" rule)."""

REPLACEMENT = "\ufffd"

# transformers' ``clean_up_tokenization``: these strings are rewritten when a tokenizer cleans up spaces.
CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")


def valid_length(text: str) -> int:
    """Characters of ``text`` without its trailing U+FFFD (an incomplete UTF-8 character whose bytes are still to
    come): the part of a decoded text that can be shown."""
    end = len(text)
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    return end


def prompt_context(prompt_ids: list[int]) -> list[int]:
    """The last :data:`CONTEXT_TOKENS` ids of a prompt (what :func:`continuation_text` decodes before new ids)."""
    return list(prompt_ids[-CONTEXT_TOKENS:])


def context_text(tokenizer, context_ids: list[int]) -> str:
    """``decode(context_ids)`` (special tokens skipped): what :func:`continuation_text` strips from the joint decode;
    a caller decoding many continuations of one context computes it once and passes it on."""
    return tokenizer.decode(context_ids, skip_special_tokens=True) if context_ids else ""


def continuation_text(tokenizer, context_ids: list[int], new_ids: list[int], prefix: str | None = None) -> str:
    """Text that ``new_ids`` add after ``context_ids`` (special tokens skipped). ``prefix``: the context's own text,
    :func:`context_text` (decoded here when not given).

    Falls back to ``decode(new_ids)`` alone when the context's own text is not a prefix of the joint decode (a
    partial UTF-8 character split between the prompt and the first new token).
    """
    if not new_ids:
        return ""
    if not context_ids:
        return tokenizer.decode(new_ids, skip_special_tokens=True)
    if prefix is None:
        prefix = context_text(tokenizer, context_ids)
    full = tokenizer.decode(list(context_ids) + list(new_ids), skip_special_tokens=True)
    if full.startswith(prefix) and not prefix.endswith(REPLACEMENT):
        return full[len(prefix) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def cleans_up_spaces(tokenizer) -> bool:
    """Whether ``tokenizer.decode`` applies transformers' ``clean_up_tokenization`` by default."""
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
