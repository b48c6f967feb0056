"""llmem: llama.cpp's LLM memory layer (KV cache, recurrent state, hybrid) for Python.

The compiled core (``llmem._core``) keeps the cell bookkeeping; the classes here own the state
tensors as numpy arrays. Behaviour, decisions and state bytes follow llama.cpp's memory layer.
"""

from __future__ import annotations

try:
    from . import _core
except ImportError as _exc:  # pragma: no cover - only without a build
    raise ImportError(
        "llmem's compiled core (llmem._core) is missing: install the package with "
        "'pip install .' (or 'pip install -e . --no-build-isolation' for development)"
    ) from _exc

from .batch import Batch, BatchAllocator, UBatch
from .compat import Compat
from .errors import BatchError, LlmemError, NoRoom, StaleContextError, StateError
from .hybrid import HybridContext, HybridISWAMemory, HybridMemory
from .kv_cache import KVCache, KVCacheISWA, PagedKV, Rope
from .memory import STATE_HEADER, Memory, MemoryContext
from .metrics import MemoryStats
from .recurrent import RecurrentContext, RecurrentMemory
from .factory import from_gguf, from_hparams
from .ggml_types import GGML_TYPES, GGMLType, dequantize, quantize
from .hparams import ModelHParams, read_gguf_hparams
from .plan import MemoryPlan, plan_memory
from .prefix import PrefixCache
from .store import DiskStore, MemoryStore, PrefixKeys, PrefixStore, RedisStore, StateStore
from .status import Status, SWAType, status_combine, status_is_fail
from ._capi import get_cmake_dir, get_include

from ._version import __version__

__all__ = [
    "Batch",
    "BatchAllocator",
    "BatchError",
    "Compat",
    "dequantize",
    "DiskStore",
    "from_gguf",
    "from_hparams",
    "get_cmake_dir",
    "get_include",
    "HybridContext",
    "HybridISWAMemory",
    "HybridMemory",
    "KVCache",
    "KVCacheISWA",
    "LlmemError",
    "GGML_TYPES",
    "GGMLType",
    "Memory",
    "MemoryContext",
    "MemoryPlan",
    "MemoryStore",
    "MemoryStats",
    "ModelHParams",
    "NoRoom",
    "PagedKV",
    "quantize",
    "plan_memory",
    "PrefixCache",
    "PrefixKeys",
    "PrefixStore",
    "read_gguf_hparams",
    "RecurrentContext",
    "RecurrentMemory",
    "RedisStore",
    "Rope",
    "StateError",
    "StateStore",
    "StaleContextError",
    "Status",
    "status_combine",
    "status_is_fail",
    "STATE_HEADER",
    "SWAType",
    "UBatch",
    "__version__",
]


def __dir__() -> list[str]:
    return sorted(__all__)
