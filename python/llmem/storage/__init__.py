"""Where a memory's state tensors live: numpy on the host (the default), torch on any device, or
nowhere (bookkeeping-only: the caller owns the tensors and llmem hands it every tensor operation
as data). See ``docs/storage.md`` for the contract an engine follows.

* ``storage="numpy"`` (default): numpy arrays owned by the memory, their tensor work done by the
  compiled core;
* ``storage="torch", device="cuda:0"`` or :class:`TorchStorage` (``pip install llmem[torch]``):
  torch tensors on ``device`` (allocated by llmem, or ``buffers=`` of the caller's), every tensor
  operation done by torch on that device;
* ``storage=None`` / ``"none"``: no tensors; :meth:`KVCache.pending_update`,
  :meth:`KVCache.state_write_holes` and :meth:`KVCache.state_read_holes` say what to do with the
  caller's tensors.
"""

from __future__ import annotations

from typing import Any

from .base import BOOKKEEPING, KShift, KVUpdateOps, StateHole, StateHoles, Storage, rope_tables
from .numpy_storage import NumpyStorage

__all__ = ["Storage", "NumpyStorage", "TorchStorage", "StateHole", "StateHoles", "KVUpdateOps", "KShift",
           "rope_tables", "BOOKKEEPING"]


def __getattr__(name: str) -> Any:
    # torch is imported only when torch storage is asked for: llmem works without it
    if name == "TorchStorage":
        from .torch_storage import TorchStorage
        return TorchStorage
    raise AttributeError(f"module 'llmem.storage' has no attribute {name!r}")
