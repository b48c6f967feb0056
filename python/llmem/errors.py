"""llmem's exception types.

This module is pure Python and is imported by the compiled core at start-up, which raises these
classes for its own failures (C++ ``llmem::batch_error`` becomes :class:`BatchError`, and so on).
"""

from __future__ import annotations

__all__ = ["LlmemError", "BatchError", "StateError", "StaleContextError"]


class LlmemError(Exception):
    """Base class of every failure llmem reports on purpose (a refused operation)."""


class BatchError(LlmemError, ValueError):
    """The batch allocator refused a batch; ``reason`` names the check that failed.

    The allocator (and any memory it was checked against) is left exactly as before the call.
    """

    reason: str

    def __init__(self, message: str, reason: str = "INVALID") -> None:
        super().__init__(message)
        self.reason = reason


class StateError(LlmemError, ValueError):
    """State bytes that cannot be read into this memory; the memory is left unchanged."""


class StaleContextError(LlmemError):
    """A context (from ``init_batch``) was used after another call changed its memory, so its
    plan no longer matches the cells; the memory is left unchanged. Hold ``memory.lock`` around
    the whole decode when threads share a memory."""
