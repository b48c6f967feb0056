"""llmem's exception types.

This module is pure Python and is imported by the compiled core at start-up, which raises these
classes for its own failures (C++ ``llmem::batch_error`` becomes :class:`BatchError`, and so on).
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

__all__ = ["LlmemError", "BatchError", "StateError", "StaleContextError", "NoRoom"]


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
    """State bytes that cannot be read into this memory; the memory is left unchanged.

    ``reason`` says what the caller can do about it:

    - ``"NO_ROOM"``: the bytes are fine but the memory has too few free cells now; free some
      (finish or preempt a sequence) and retry.
    - ``"CORRUPT"``: truncated, malformed or failing a checksum; the bytes are unusable.
    - ``"CONFIG_MISMATCH"``: written by a memory of another kind or configuration (layers,
      types, sizes, sequence ids, scope); read them into a matching memory.
    - ``"VERSION"``: a state file format this llmem does not read.
    """

    #: the reasons, in the order above
    REASONS = ("NO_ROOM", "CORRUPT", "CONFIG_MISMATCH", "VERSION")

    reason: str

    def __init__(self, message: str, reason: str = "CORRUPT") -> None:
        super().__init__(message)
        self.reason = reason


class NoRoom(NamedTuple):
    """Why a plan (``init_batch``) failed for lack of cells: ``context.no_room``.

    ``seq_ids`` are the sequences of the batch that could not be placed: walking the batch's
    tokens in order, those with a token for which no free cell was left in its stream. Taking
    them out of the batch (preempting them) makes the rest fit. ``cells_missing`` is how many
    more free cells the whole batch needs (summed over streams): finishing or evicting sequences
    that hold that many cells also makes it fit. ``memory`` names the part that ran out
    (``"kv"``, or ``"kv_swa"`` for the sliding-window cache of an iSWA memory).
    """

    seq_ids: Tuple[int, ...]
    cells_missing: int
    memory: str


class StaleContextError(LlmemError):
    """A context (from ``init_batch``) was used after another call changed its memory, so its
    plan no longer matches the cells; the memory is left unchanged.

    In one thread this means two plans were interleaved (plan A, plan B, apply A, apply B):
    B was planned on cells A then took. Apply every micro-batch of one plan before planning
    the next; planning step N+1 while step N's model runs is fine once step N is applied
    (docs/threading.md, "Overlap scheduling"). Across threads, hold ``memory.lock`` around the
    whole decode."""
