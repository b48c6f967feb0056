"""A toy recurrent model of Mamba-2-style layers on :class:`llmem.RecurrentMemory`.

Each layer projects the input to x, B, C, dt and a gate z; a short causal convolution of width
``d_conv`` runs over (x, B, C), its last ``d_conv - 1`` inputs kept as the ``r`` state (the conv
window); a selective state-space recurrence with one scalar decay per head keeps
``[n_head, head_dim, d_state]`` as the ``s`` state; the output is gated by ``silu(z)``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..recurrent import RecurrentMemory
from .base import SSM, ToyConfig, ToyModel

__all__ = ["ToyRecurrent"]


class ToyRecurrent(ToyModel):
    """SSM-only toy model: its whole memory is one conv window and one SSM state per sequence."""

    def __init__(self, seed: int = 0, config: Optional[ToyConfig] = None, device: Any = None) -> None:
        super().__init__(config or ToyConfig(layer_kinds=(SSM, SSM, SSM)), seed, device)
        if any(k != SSM for k in self.config.layer_kinds):
            raise ValueError("a ToyRecurrent has state-space layers only")

    def new_memory(self, n_ctx: int = 0, n_seq_max: int = 1, n_rs_seq: int = 0,  # type: ignore[override]  # each toy's memory has its own options
                   dtype: Any = np.float32, mem_size: Optional[int] = None) -> RecurrentMemory:
        """A :class:`llmem.RecurrentMemory` with ``mem_size`` cells (llama.cpp's
        ``max(1, n_seq_max)`` by default) and ``n_rs_seq`` rollback snapshots. ``n_ctx`` is
        accepted for a uniform signature: the state does not grow with the context."""
        cfg = self.config
        return RecurrentMemory(cfg.n_layer, cfg.n_embd_r, cfg.n_embd_s,
                               mem_size=mem_size or max(1, n_seq_max), n_seq_max=n_seq_max,
                               n_rs_seq=n_rs_seq, dtype_r=dtype, dtype_s=dtype, **self._storage_args())

    def _rollback_depth(self, memory: Any) -> int:
        return memory.n_rs_seq  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any
