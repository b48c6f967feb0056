"""A toy hybrid model interleaving Mamba-2 layers and attention layers on
:class:`llmem.HybridMemory` (as Jamba or Granite-4-H do)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..hybrid import HybridMemory
from ..kv_cache import KVCache
from ..recurrent import RecurrentMemory
from .base import ATTN, SSM, ToyConfig, ToyModel
from .transformer import model_rope

__all__ = ["ToyHybrid"]


class ToyHybrid(ToyModel):
    """State-space and attention layers in one stack; the attention layers keep a KV cache, the
    state-space layers a recurrent state, both behind one hybrid memory."""

    def __init__(self, seed: int = 0, config: Optional[ToyConfig] = None, device: Any = None) -> None:
        super().__init__(config or ToyConfig(layer_kinds=(SSM, ATTN, SSM, ATTN)), seed, device)
        kinds = set(self.config.layer_kinds)
        if kinds != {SSM, ATTN}:
            raise ValueError("a ToyHybrid has both 'ssm' and 'attn' layers and no others")

    def new_memory(self, n_ctx: int, n_seq_max: int = 1, n_rs_seq: int = 0, dtype: Any = np.float32,  # type: ignore[override]  # each toy's memory has its own options
                   unified: bool = True, v_trans: bool = True) -> HybridMemory:
        """A :class:`llmem.HybridMemory`: a KV cache of ``n_ctx`` cells holding the attention
        layers and a recurrent memory of ``max(1, n_seq_max)`` cells holding the SSM layers."""
        cfg = self.config
        recurrent = [k == SSM for k in cfg.layer_kinds]
        attn = KVCache(cfg.n_layer, [0 if r else cfg.n_embd_k for r in recurrent],
                       [0 if r else cfg.n_embd_k for r in recurrent], kv_size=n_ctx,
                       n_seq_max=n_seq_max, dtype_k=dtype, dtype_v=dtype, v_trans=v_trans,
                       unified=unified, layer_filter=lambda il: not recurrent[il],
                       rope=model_rope(cfg), **self._storage_args())
        recr = RecurrentMemory(cfg.n_layer, cfg.n_embd_r, cfg.n_embd_s, mem_size=max(1, n_seq_max),
                               n_seq_max=n_seq_max, n_rs_seq=n_rs_seq, dtype_r=dtype, dtype_s=dtype,
                               layer_filter=recurrent, **self._storage_args())
        return HybridMemory(attn=attn, recr=recr, is_recurrent_layer=recurrent)

    def _attn_ctx(self, ctx: Any) -> Any:
        return ctx.attn

    def _recr_ctx(self, ctx: Any) -> Any:
        return ctx.recr

    def _rollback_depth(self, memory: Any) -> int:
        return memory.mem_recr.n_rs_seq  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any
