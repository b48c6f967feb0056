"""numpy storage: host arrays owned by the memory, their bytes registered with the compiled core,
which does the K-shift, stream copies and state bytes on them (llmem's original behaviour, kept
on its fast path: a memory with numpy storage runs exactly the code it ran before storages)."""

from __future__ import annotations

from .base import Storage

__all__ = ["NumpyStorage"]


class NumpyStorage(Storage):
    """Host numpy arrays (the default). ``KVCache(..., storage=NumpyStorage())`` is
    ``KVCache(...)``."""

    name = "numpy"

    def __repr__(self) -> str:
        return "NumpyStorage()"
