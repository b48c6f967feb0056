"""Content keys: the same prefix of the same model under the same memory configuration gets the
same key in every process (vLLM's chained block hashes).

A key names the state of a sequence holding the first ``k * block_size`` tokens of a prompt:
``llmem:<namespace>:<hash of block k>``, where the hash of block ``i`` is
``blake2b(hash of block i - 1 || tokens of block i as int32 little-endian)`` and the hash
before block 0 is the namespace digest (model identity, memory kind and configuration, block
size and the request's extra key). Python's ``hash()`` is never used: it differs between
processes.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, List, Optional, Union

import numpy as np

from .._core import state_header
from ..memory import STATE_HEADER, Memory

__all__ = ["PrefixKeys", "ExtraKey", "memory_config_digest"]

#: What a request's extra key (an adapter name, an image hash) may be for stored prefixes:
#: values with a stable byte form.
ExtraKey = Union[None, str, bytes, int]

_DIGEST = 16  # bytes of each block hash (128 bits, as vLLM's default sha256 cut to its prefix)
_FIXED = 44   # bytes of the versioned state header before its configuration record


def memory_config_digest(memory: Memory) -> bytes:
    """A digest of ``memory``'s kind and configuration: the record its versioned state header
    carries (layers, row sizes, types, cells, sequences, window), i.e. exactly what a state read
    checks. Two memories with equal digests read each other's sequence states."""
    caches, recr = memory._state_parts()
    header = bytes(state_header(memory._STATE_KIND, caches, recr, 0, STATE_HEADER, b""))
    (config_bytes,) = struct.unpack_from("<I", header, 28)
    record = header[_FIXED:_FIXED + config_bytes]
    return hashlib.blake2b(struct.pack("<I", memory._STATE_KIND) + record, digest_size=_DIGEST).digest()


def _extra_bytes(extra: ExtraKey) -> bytes:
    if extra is None:
        return b"n"
    if isinstance(extra, bool):
        raise TypeError("the extra key of a stored prefix must be None, str, bytes or int, not bool")
    if isinstance(extra, str):
        return b"s" + extra.encode("utf-8")
    if isinstance(extra, bytes):
        return b"b" + extra
    if isinstance(extra, int):
        return b"i" + str(extra).encode("ascii")
    raise TypeError("the extra key of a stored prefix must be None, str, bytes or int (a stable byte "
                    f"form in every process), not {type(extra).__name__}")


class PrefixKeys:
    """Content keys of token prefixes for one model and memory configuration.

    ``model_id`` names the weights (a GGUF file's name and digest, a repository and revision):
    processes that share a store must agree on it, and states of different models must never
    share it. ``block_size`` tokens make one block; only whole blocks are keyed.
    """

    def __init__(self, model_id: str, memory: Memory, block_size: int = 16) -> None:
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or \
                not 1 <= int(block_size) <= 1 << 20:
            raise ValueError(f"block_size must be an integer in [1, 1048576], got {block_size!r}")
        if not isinstance(memory, Memory):
            raise TypeError(f"memory must be an llmem memory, not {type(memory).__name__}")
        self.model_id: str = model_id
        self.block_size: int = int(block_size)
        self.config_digest: bytes = memory_config_digest(memory)
        h = hashlib.blake2b(digest_size=_DIGEST)
        h.update(b"llmem-prefix-v1\0" + model_id.encode("utf-8") + b"\0")
        h.update(self.config_digest + struct.pack("<I", self.block_size))
        self._root = h.digest()
        #: the part of every key naming model, configuration and block size (a Redis SCAN
        #: pattern ``llmem:<namespace>:*`` lists one deployment's prefixes)
        self.namespace: str = self._root[:8].hex()

    def __repr__(self) -> str:
        return f"PrefixKeys(model_id={self.model_id!r}, block_size={self.block_size}, namespace={self.namespace})"

    def _seed(self, extra: ExtraKey) -> bytes:
        if extra is None:
            return self._root
        return hashlib.blake2b(self._root + _extra_bytes(extra), digest_size=_DIGEST).digest()

    def block_keys(self, tokens: Any, extra: ExtraKey = None, n_blocks: Optional[int] = None) -> List[str]:
        """The keys of the prefixes of ``tokens`` that end on a block boundary: element ``i``
        names the first ``(i + 1) * block_size`` tokens (at most ``n_blocks`` keys)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError("tokens must be a 1-D sequence of integer token ids")
        arr = arr.astype("<i4", copy=False)
        n = len(arr) // self.block_size
        if n_blocks is not None:
            n = min(n, max(0, int(n_blocks)))
        keys: List[str] = []
        h = self._seed(extra)
        raw = arr[:n * self.block_size].tobytes()
        step = 4 * self.block_size
        for i in range(n):
            h = hashlib.blake2b(h + raw[i * step:(i + 1) * step], digest_size=_DIGEST).digest()
            keys.append(f"llmem:{self.namespace}:{h.hex()}")
        return keys

    def key(self, tokens: Any, extra: ExtraKey = None) -> Optional[str]:
        """The key of the longest block-aligned prefix of ``tokens`` (None: shorter than a
        block)."""
        keys = self.block_keys(tokens, extra)
        return keys[-1] if keys else None
