"""Build the memory a model needs, as llama.cpp's ``llama_model::create_memory`` would.

:func:`from_hparams` turns a :class:`~llmem.plan.MemoryPlan` into llmem memory objects
(``KVCache``, ``KVCacheISWA``, ``RecurrentMemory``, ``HybridMemory``, ``HybridISWAMemory``);
:func:`from_gguf` reads the hyper-parameters from a GGUF file first. The classes are looked up
when called, so this module does not depend on their import order; tests can pass their own.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from .hparams import ModelHParams, read_gguf_hparams
from .plan import plan_memory

__all__ = ["from_hparams", "from_gguf"]

_CLASS_NAMES = ("KVCache", "KVCacheISWA", "RecurrentMemory", "HybridMemory", "HybridISWAMemory")


def _default_classes() -> Mapping[str, Any]:
    # imported here, not at module level: the memory classes live in modules that may import
    # this one, and tests substitute their own
    import llmem

    missing = [name for name in _CLASS_NAMES if not hasattr(llmem, name)]
    if missing:
        raise NotImplementedError(f"this llmem build lacks {', '.join(missing)}")
    return {name: getattr(llmem, name) for name in _CLASS_NAMES}


def from_hparams(hparams: ModelHParams, n_ctx: int, n_seq_max: int = 1, *,
                 classes: Optional[Mapping[str, Any]] = None, **plan_kwargs: Any) -> Any:
    """Create the memory llama.cpp would create for ``hparams`` and this context configuration.

    ``plan_kwargs`` are those of :func:`llmem.plan_memory` (``unified``, ``type_k``, ``type_v``,
    ``type_r``, ``type_s``, ``swa_full``, ``n_ubatch``, ``flash_attn``, ``n_batch``,
    ``n_rs_seq``). The kind decides the class: ``KVCache``, ``KVCacheISWA``,
    ``RecurrentMemory``, ``HybridMemory(attn=KVCache, recr=RecurrentMemory)`` or
    ``HybridISWAMemory(attn=KVCacheISWA, recr=RecurrentMemory)``. ``classes`` maps those names
    to the classes to use (default: llmem's).
    """
    plan = plan_memory(hparams, n_ctx, n_seq_max, **plan_kwargs)
    cls = dict(classes) if classes is not None else _default_classes()
    kwargs = plan.constructor_kwargs()
    kind = plan.kind
    if kind == "kv":
        return cls["KVCache"](**kwargs["kv"])
    if kind == "iswa":
        return cls["KVCacheISWA"](**kwargs["iswa"])
    if kind == "recurrent":
        return cls["RecurrentMemory"](**kwargs["recurrent"])
    recr = cls["RecurrentMemory"](**kwargs["recurrent"])
    if kind == "hybrid":
        attn = cls["KVCache"](**kwargs["kv"])
        return cls["HybridMemory"](attn=attn, recr=recr, **kwargs["hybrid"])
    if kind == "hybrid_iswa":
        attn = cls["KVCacheISWA"](**kwargs["iswa"])
        return cls["HybridISWAMemory"](attn=attn, recr=recr, **kwargs["hybrid"])
    raise AssertionError(f"unknown memory kind {kind!r}")  # pragma: no cover


def from_gguf(path: Union[str, "os.PathLike[str]"], n_ctx: int, n_seq_max: int = 1, *,
              classes: Optional[Mapping[str, Any]] = None, **plan_kwargs: Any) -> Any:
    """Read ``path``'s hyper-parameters (metadata only) and build its memory; see
    :func:`from_hparams`."""
    return from_hparams(read_gguf_hparams(path), n_ctx, n_seq_max, classes=classes,
                        **plan_kwargs)
