"""Batches, the batch allocator and micro-batches.

These are the compiled classes themselves: building a batch and splitting it is on the hot path of
every decode step, so no Python layer sits in between.
"""

from ._core import Batch, BatchAllocator, UBatch

__all__ = ["Batch", "BatchAllocator", "UBatch"]
