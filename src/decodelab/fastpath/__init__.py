"""decodelab's fast decoding path: a preallocated KV cache and a forward pass with no per-step Python beyond the
tensor operations themselves (see :mod:`decodelab.fastpath.decoder`)."""

from .cache import StaticKVCache
from .decoder import FastDecoder, unsupported_reason

__all__ = ["FastDecoder", "StaticKVCache", "unsupported_reason"]
