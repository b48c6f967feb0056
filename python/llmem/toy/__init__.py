"""Tiny numpy reference models that decode through llmem's memories.

Three models with random weights drawn from a seed, written against llmem's public API the way
an inference engine uses it: :class:`ToyTransformer` (RMSNorm, GQA attention with RoPE, SwiGLU) on
a :class:`llmem.KVCache` (or, with sliding-window layers, a :class:`llmem.KVCacheISWA`),
:class:`ToyRecurrent` (Mamba-2-style layers) on a :class:`llmem.RecurrentMemory` and
:class:`ToyHybrid` (both interleaved) on a :class:`llmem.HybridMemory`. Each has
``forward_full(tokens)``, the whole history without a cache, and ``decode(batch, memory)``, one
batch through the memory: the two must agree, which is what proves the memories exact::

    model = ToyHybrid(seed=0)
    memory = model.new_memory(n_ctx=256, n_seq_max=2)
    logits = model.decode(llmem.Batch(token=prompt, seq_id=np.zeros(len(prompt), np.int32)), memory)
    assert np.allclose(logits[-1], model.forward_full(prompt)[-1], rtol=1e-4, atol=1e-5)
"""

from typing import Any

from .base import ATTN, SSM, SWA, DecodeClock, NoSlotError, ToyConfig, ToyModel
from .hybrid import ToyHybrid
from .recurrent import ToyRecurrent
from .transformer import ToyTransformer

__all__ = ["ATTN", "SSM", "SWA", "DecodeClock", "NoSlotError", "ToyConfig", "ToyHybrid", "ToyModel",
           "ToyRecurrent", "ToyTransformer", "make_model", "ARCHS"]

#: the model names ``llmem demo --arch`` accepts
ARCHS = ("transformer", "recurrent", "hybrid", "iswa")


def make_model(arch: str, seed: int = 0, device: Any = None) -> ToyModel:
    """The toy model of one architecture name of :data:`ARCHS`; ``device`` (a torch device):
    torch math there and memories in torch storage on it."""
    if arch == "transformer":
        return ToyTransformer(seed, device=device)
    if arch == "iswa":
        return ToyTransformer.iswa(seed, device=device)
    if arch == "recurrent":
        return ToyRecurrent(seed, device=device)
    if arch == "hybrid":
        return ToyHybrid(seed, device=device)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
