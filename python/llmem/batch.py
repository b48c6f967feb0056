"""Batches, the batch allocator and micro-batches.

``Batch`` and ``UBatch`` are the compiled classes themselves: building a batch and splitting it is
on the hot path of every decode step, so no Python layer sits in between. ``BatchAllocator`` adds
one thing to the compiled allocator: ``init(batch, memory)`` reads the memory's positions while
holding ``memory.lock``, so another thread cannot change them halfway through the read.
"""

import numbers
from typing import Any

from . import _core
from ._core import Batch, UBatch

__all__ = ["Batch", "BatchAllocator", "UBatch"]


class BatchAllocator(_core.BatchAllocator):
    __doc__ = _core.BatchAllocator.__doc__

    def __init__(self, n_seq_max: int, n_vocab: Any = None, n_embd: Any = None, n_pos_per_embd: int = 1) -> None:
        # named TypeErrors instead of pybind11's list of accepted signatures
        for name, value in (("n_seq_max", n_seq_max), ("n_vocab", n_vocab), ("n_embd", n_embd),
                            ("n_pos_per_embd", n_pos_per_embd)):
            if value is None and name in ("n_vocab", "n_embd"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        _core.BatchAllocator.__init__(self, int(n_seq_max), None if n_vocab is None else int(n_vocab),
                                      None if n_embd is None else int(n_embd), int(n_pos_per_embd))

    def init(self, batch: Any, memory: Any = None, output_all: bool = False) -> None:
        """Validate ``batch`` (positions checked against and filled from ``memory``, read under
        ``memory.lock``); raises BatchError and leaves the allocator as it was."""
        lock = getattr(memory, "_lock", None)
        if lock is None:
            return _core.BatchAllocator.init(self, batch, memory, output_all)
        with lock:
            return _core.BatchAllocator.init(self, batch, memory, output_all)
