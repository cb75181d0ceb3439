"""Search strategies over the engine's logits: token-by-token (greedy / sampling) and beam search."""

from .beam import beam_search
from .sampling import token_search

__all__ = ["beam_search", "token_search"]
