"""Tokens: what a text became, id by id, with byte-exact pieces.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2) can split one UTF-8 character across tokens, so decoding a
single id may give U+FFFD. ``Tokens.piece_bytes`` holds each token's exact bytes (recovered through GPT-2's
``bytes_to_unicode`` table); ``Tokens.display`` shows a piece as text when its bytes are valid UTF-8, else as
``<0xE2><0x80>`` byte escapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .trace import _Plain


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (the printable stand-ins byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The exact bytes token ``token_id`` stands for.

    Byte-level BPE pieces are mapped back through GPT-2's byte table; SentencePiece byte-fallback pieces
    (``<0xE5>``) become that byte; special tokens give their UTF-8 text.
    """
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return b""
    if token_id in tokenizer.all_special_ids or piece in getattr(tokenizer, "added_tokens_encoder", {}):
        return piece.encode("utf-8")
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    table = _byte_decoder()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece word boundary


def display_piece(raw: bytes) -> str:
    """Text of ``raw`` if it is valid UTF-8, else its bytes as ``<0xNN>`` escapes (never U+FFFD)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in raw)


@dataclass
class Tokens(_Plain):
    """A tokenized text.

    Attributes:
        ids: token ids, length T.
        pieces: ``tokenizer.decode([id])`` for each id (may contain U+FFFD for partial characters, as transformers
            shows them).
        display: byte-exact pieces: the text when the token's bytes are valid UTF-8, else ``<0xNN>`` escapes.
        piece_bytes: each token's exact bytes as a list of ints (JSON-friendly).
        offsets: (start, end) character offsets of each token in ``text`` where the tokenizer provides them.
        special: whether each id is a special token (BOS, EOS, chat markers).
    """

    text: str
    ids: list[int]
    pieces: list[str]
    display: list[str]
    piece_bytes: list[list[int]] = field(default_factory=list)
    offsets: list[list[int]] = field(default_factory=list)
    special: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def _repr_html_(self) -> str:
        from .render import tokens_html

        return tokens_html(self)


def tokenize(tokenizer, text: str) -> Tokens:
    """Tokenize ``text`` exactly as ``tokenizer(text).input_ids`` does (special tokens such as BOS included when the
    tokenizer adds them) and describe every token."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [list(o) for o in enc.get("offset_mapping", [])]
    special_ids = set(tokenizer.all_special_ids)
    raw = [token_bytes(tokenizer, i) for i in ids]
    return Tokens(
        text=text,
        ids=ids,
        pieces=[tokenizer.decode([i]) for i in ids],
        display=[display_piece(b) for b in raw],
        piece_bytes=[list(b) for b in raw],
        offsets=offsets,
        special=[i in special_ids for i in ids],
    )
