"""Which llama.cpp build llmem follows where two builds differ.

llmem was written against llama.cpp b11312 (the one vendored in llama-cpp-python 0.3.36) and
follows b11549 too. Where they differ, a memory's ``compat`` picks the behaviour set:

================================  =============================  ================================
                                  ``"b11312"``                   ``"b11549"`` (default)
================================  =============================  ================================
KV state bytes (``state_format``)  3: no rotation fields          4: ``n_rot_k``, ``n_rot_v`` after
                                                                 ``n_layer`` in every stream section
recurrent ``seq_rm`` rolling back  rewinds the cell for every     returns False, changes nothing
a cell shared by several seqs      sequence that shares it
recurrent memory with no layers    keeps ``n_rs_seq``             forces ``n_rs_seq = 0``; a tail
                                                                 ``seq_rm`` only moves the position
================================  =============================  ================================

``state_format`` (3 or 4) can also be set on its own; reading accepts both formats whatever the
setting (each stream section says which it is; see ``docs/compat.md``).
"""

from __future__ import annotations

import enum
from typing import Optional, Union

__all__ = ["Compat", "DEFAULT_COMPAT", "resolve_compat", "resolve_state_format"]


class Compat(str, enum.Enum):
    """A llama.cpp build whose memory behaviour llmem reproduces."""

    B11312 = "b11312"  # llama-cpp-python 0.3.36
    B11549 = "b11549"

    @property
    def state_format(self) -> int:
        """The KV state format the build writes (its LLAMA_STATE_SEQ_VERSION)."""
        return 3 if self is Compat.B11312 else 4


#: The current llama.cpp: new memories write and behave as b11549 unless told otherwise.
DEFAULT_COMPAT = Compat.B11549


def resolve_compat(compat: Union[str, Compat, None]) -> Compat:
    """A ``compat`` argument as a :class:`Compat` (None: the default); ValueError otherwise."""
    if compat is None:
        return DEFAULT_COMPAT
    if isinstance(compat, Compat):
        return compat
    if isinstance(compat, str):
        try:
            return Compat(compat.strip().lower())
        except ValueError:
            pass
    raise ValueError(f"compat must be 'b11312' or 'b11549' (or a llmem.Compat), got {compat!r}")


def resolve_state_format(state_format: Optional[int], compat: Compat) -> int:
    """The state format to write: ``state_format`` when given (3 or 4), else the build's."""
    if state_format is None:
        return compat.state_format
    if isinstance(state_format, bool) or state_format not in (3, 4):
        raise ValueError(f"state_format must be 3 (llama.cpp b11312) or 4 (b11549), got {state_format!r}")
    return int(state_format)
