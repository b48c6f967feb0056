"""A toy transformer (RMSNorm, GQA attention with RoPE, SwiGLU) on :class:`llmem.KVCache`, and
its variant with sliding-window layers on :class:`llmem.KVCacheISWA`."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import numpy as np

from ..kv_cache import KVCache, KVCacheISWA, Rope
from ..status import SWAType
from .base import ATTN, SWA, ToyConfig, ToyModel

__all__ = ["ToyTransformer", "model_rope"]


def model_rope(config: ToyConfig) -> Rope:
    """The RoPE the model applies to K, so that the cache's K-shift rotates rows the same way."""
    return Rope(n_rot=config.head_dim, head_dim=config.head_dim, freq_base=config.rope_base,
                mode="normal")


class ToyTransformer(ToyModel):
    """Attention-only toy model. With sliding-window layers (``ToyTransformer.iswa()``) its
    memory is an iSWA cache: a full cache for the global layers and a small one for the window
    layers."""

    def __init__(self, seed: int = 0, config: Optional[ToyConfig] = None, device: Any = None) -> None:
        super().__init__(config or ToyConfig(layer_kinds=(ATTN, ATTN, ATTN)), seed, device)
        if any(k not in (ATTN, SWA) for k in self.config.layer_kinds):
            raise ValueError("a ToyTransformer has attention layers only")

    @classmethod
    def iswa(cls, seed: int = 0, n_swa: int = 6, n_layer: int = 4, device: Any = None) -> "ToyTransformer":
        """The sliding-window variant: window layers with a global layer every other layer
        (as Gemma-style models interleave them)."""
        kinds = tuple(SWA if il % 2 == 0 else ATTN for il in range(n_layer))
        return cls(seed, ToyConfig(layer_kinds=kinds, n_swa=n_swa), device)

    @property
    def has_swa(self) -> bool:
        return SWA in self.config.layer_kinds

    def new_memory(self, n_ctx: int, n_seq_max: int = 1, dtype: Any = np.float32, unified: bool = True,  # type: ignore[override]  # each toy's memory has its own options
                   v_trans: bool = True, swa_full: bool = False, n_ubatch: int = 512) -> Any:
        """A :class:`llmem.KVCache` of ``n_ctx`` cells (a :class:`llmem.KVCacheISWA` when the model
        has window layers; ``n_ubatch`` sizes its window cache) with the model's RoPE for K-shift."""
        cfg = self.config
        common: Dict[str, Any] = dict(n_layer=cfg.n_layer, n_embd_k_gqa=cfg.n_embd_k, n_embd_v_gqa=cfg.n_embd_k,
                      kv_size=n_ctx, n_seq_max=n_seq_max, dtype_k=dtype, dtype_v=dtype,
                      v_trans=v_trans, unified=unified, rope=model_rope(cfg), **self._storage_args())
        if not self.has_swa:
            return KVCache(**common)
        return KVCacheISWA(n_swa=cfg.n_swa, swa_type=SWAType.STANDARD, swa_full=swa_full,
                           is_swa_layer=[k == SWA for k in cfg.layer_kinds], n_ubatch=n_ubatch,
                           **common)

    def with_layers(self, n_layer: int) -> "ToyTransformer":
        """The same model cut to its first ``n_layer`` layers (same weights)."""
        cut = ToyTransformer(self.seed, dataclasses.replace(
            self.config, layer_kinds=self.config.layer_kinds[:n_layer]), self.device)
        return cut
