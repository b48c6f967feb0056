"""A model's memory-relevant hyper-parameters, read from a GGUF file's metadata.

llama.cpp decides the shape of its memory (which layers get KV rows, which get recurrent
state, how wide each row is, which layers slide) from the model's hyper-parameters. This module
holds those parameters in :class:`ModelHParams` and reads them from GGUF metadata with the same
per-architecture rules llama.cpp applies when it loads a model (``llama_model::load_hparams`` and
``llama_hparams`` in the reference). Only metadata is read; no tensor data is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .status import SWAType

__all__ = [
    "ModelHParams",
    "SUPPORTED_ARCHS",
    "RECURRENT_ARCHS",
    "HYBRID_ARCHS",
    "read_gguf_hparams",
    "hparams_from_metadata",
]

# llama.cpp's llm_arch_is_recurrent(): every layer holds recurrent state and nothing else.
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# llama.cpp's llm_arch_is_hybrid() restricted to the architectures llmem can read.
HYBRID_ARCHS = frozenset({"jamba", "falcon-h1", "granitehybrid", "nemotron_h", "lfm2",
                          "qwen3next"})
_ATTENTION_ARCHS = frozenset({"llama", "gemma2", "gemma3", "gemma3n"})
# architectures whose later layers read an earlier layer's K/V (llama_model::create_memory)
_LAYER_REUSE_ARCHS = frozenset({"gemma3n", "gemma4"})
SUPPORTED_ARCHS = tuple(sorted(_ATTENTION_ARCHS | RECURRENT_ARCHS | HYBRID_ARCHS))

# llama.cpp's llama_model_rope_type() for the supported architectures ("none": no RoPE at all).
_ROPE_TYPE = {
    "llama": "norm", "granitehybrid": "norm",
    "gemma2": "neox", "gemma3": "neox", "gemma3n": "neox", "gemma4": "neox", "falcon-h1": "neox", "lfm2": "neox", "qwen3next": "neox",
    "mamba": "none", "mamba2": "none", "jamba": "none", "nemotron_h": "none",
    "rwkv6": "none", "rwkv6qwen2": "none", "rwkv7": "none", "arwkv7": "none",
}

# Keys that llama.cpp reads with "required = true" in the arch-specific part of load_hparams
# (only those that matter for memory are listed; the loader fails on the others too).
_SSM_KEYS = ("ssm.conv_kernel", "ssm.inner_size", "ssm.state_size", "ssm.time_step_rank")
_REQUIRED = {
    "mamba": _SSM_KEYS,
    "mamba2": _SSM_KEYS + ("ssm.group_count",),
    "jamba": _SSM_KEYS,
    "falcon-h1": _SSM_KEYS + ("ssm.group_count",),
    "granitehybrid": _SSM_KEYS + ("ssm.group_count",),
    "nemotron_h": _SSM_KEYS + ("ssm.group_count",),
    "qwen3next": _SSM_KEYS + ("ssm.group_count",),
    "lfm2": ("shortconv.l_cache",),
    "gemma3": (),
    "gemma3n": (),
    "gemma2": (),
    "llama": (),
    "rwkv6": ("wkv.head_size",),
    "rwkv6qwen2": ("wkv.head_size",),
    "rwkv7": ("wkv.head_size",),
    "arwkv7": ("wkv.head_size",),
}


def _arr(values: Sequence[Any], n: int, name: str, cast: Any = int) -> Tuple[Any, ...]:
    values = tuple(cast(v) for v in values)
    if len(values) != n:
        raise ValueError(f"{name} must have one entry per layer ({n}), got {len(values)}")
    return values


@dataclass(frozen=True)
class ModelHParams:
    """The hyper-parameters llama.cpp's memory layer needs, per layer where llama.cpp has them.

    Build one with :func:`read_gguf_hparams` (from a GGUF file) or directly (per-layer fields
    accept an int, broadcast to every layer, or a sequence of ``n_layer`` values). Layer
    predicates mirror ``llama_hparams``: ``is_recurrent(il)``, ``is_swa_layer(il)``, and
    ``has_attention(il)`` (the layers the attention KV cache allocates, i.e. llama.cpp's
    attention layer filter for this architecture).
    """

    arch: str
    n_layer: int
    n_embd: int
    n_head: Union[int, Tuple[int, ...]] = 0
    n_head_kv: Union[int, Tuple[int, ...], None] = None
    n_ff: Union[int, Tuple[int, ...]] = 0
    n_embd_head_k: Optional[int] = None
    n_embd_head_v: Optional[int] = None
    n_ctx_train: int = 0
    # layer kinds; None means "derive from the architecture's rule"
    recurrent_layers: Optional[Tuple[bool, ...]] = None
    attention_layers: Optional[Tuple[bool, ...]] = None
    swa_layers: Optional[Tuple[bool, ...]] = None
    n_swa: int = 0
    swa_type: SWAType = SWAType.NONE
    # recurrent state shapes (the fields llama_hparams::n_embd_r()/n_embd_s() use)
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_dt_rank: int = 0
    ssm_n_group: int = 0
    shortconv_l_cache: int = 0
    wkv_head_size: int = 0
    token_shift_count: int = 2
    # RoPE, for the K-shift
    n_rot: Optional[int] = None
    rope_type: Optional[str] = None
    rope_freq_base: float = 10000.0
    rope_freq_scale: float = 1.0
    rope_freq_base_swa: Optional[float] = None
    rope_freq_scale_swa: Optional[float] = None
    n_ctx_orig_yarn: Optional[int] = None
    # llama_hparams::n_layer_kv_from_start: layers from here on have no K/V of their own and
    # read an earlier layer's (Gemma3n, Gemma4); -1: every layer has its own
    n_layer_kv_from_start: int = -1
    # the per-layer-embedding (PLE) module's convolution history, the recurrent memory's third
    # array (llama_hparams::ple_conv_state/is_ple; set by qwen4exp in llama.cpp): ple_layers marks
    # the layers that have one (None: none), hc_mult is llama.cpp's dsv4_hc_mult
    ple_layers: Optional[Tuple[bool, ...]] = None
    ple_ngram_size: int = 0
    ple_heads_per_ngram: int = 0
    ple_conv_kernel: int = 0
    hc_mult: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        arch = str(self.arch)
        n = int(self.n_layer)
        if n <= 0:
            raise ValueError(f"n_layer must be positive, got {n}")
        set_(self, "arch", arch)
        set_(self, "swa_type", SWAType(int(self.swa_type)))

        def per_layer(value: Any, name: str) -> Tuple[int, ...]:
            if isinstance(value, (int,)) or hasattr(value, "__index__"):
                return (int(value),) * n
            return _arr(value, n, name)

        set_(self, "n_head", per_layer(self.n_head, "n_head"))
        # llama.cpp: head_count_kv is optional and defaults to head_count, layer by layer
        set_(self, "n_head_kv", self.n_head if self.n_head_kv is None
             else per_layer(self.n_head_kv, "n_head_kv"))
        set_(self, "n_ff", per_layer(self.n_ff, "n_ff"))

        # llama.cpp derives head sizes from layer 0's head count (n_head() without an index),
        # so a hybrid whose layer 0 has no attention needs explicit key/value lengths
        n_head0 = self.n_head[0]  # type: ignore[index]  # fields normalised by __post_init__
        if self.n_embd_head_k is None:
            set_(self, "n_embd_head_k", self.n_embd // n_head0 if n_head0 > 0 else 0)
        if self.n_embd_head_v is None:
            set_(self, "n_embd_head_v", self.n_embd // n_head0 if n_head0 > 0 else 0)
        if self.n_rot is None:
            set_(self, "n_rot", self.n_embd_head_k if n_head0 > 0 else 0)
        if self.rope_type is None:
            set_(self, "rope_type", _ROPE_TYPE.get(arch, "norm"))
        if self.rope_freq_base_swa is None:
            set_(self, "rope_freq_base_swa", float(self.rope_freq_base))
        if self.rope_freq_scale_swa is None:
            set_(self, "rope_freq_scale_swa", float(self.rope_freq_scale))
        if self.n_ctx_orig_yarn is None:
            set_(self, "n_ctx_orig_yarn", int(self.n_ctx_train))

        recr = self.recurrent_layers
        if recr is None:
            recr = _default_recurrent_layers(arch, self.n_head_kv, self.n_ff, n)
        set_(self, "recurrent_layers", _arr(recr, n, "recurrent_layers", bool))
        attn = self.attention_layers
        if attn is None:
            attn = _default_attention_layers(arch, self.recurrent_layers, self.n_ff, n)
        set_(self, "attention_layers", _arr(attn, n, "attention_layers", bool))
        swa = self.swa_layers
        if swa is None:
            swa = (False,) * n
        set_(self, "swa_layers", tuple(bool(x) for x in _arr(swa, n, "swa_layers", bool)))
        if any(self.swa_layers) and self.swa_type == SWAType.NONE:  # type: ignore[arg-type]  # fields normalised by __post_init__
            raise ValueError("swa_layers marks sliding-window layers but swa_type is NONE")
        ple = self.ple_layers
        set_(self, "ple_layers", (False,) * n if ple is None else _arr(ple, n, "ple_layers", bool))
        for name in ("ple_ngram_size", "ple_heads_per_ngram", "ple_conv_kernel", "hc_mult"):
            value = int(getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            set_(self, name, value)
        for il in range(n):
            # llama.cpp (qwen4exp): the history is a row of the recurrent memory
            if self.ple_layers[il] and not self.recurrent_layers[il]:  # type: ignore[index]  # fields normalised by __post_init__
                raise ValueError(f"PLE layer {il} is not a recurrent layer")

    # -- per-layer queries (llama_hparams' vocabulary) -------------------------------------
    def _check(self, il: int) -> int:
        il = int(il)
        if not 0 <= il < self.n_layer:
            raise IndexError(f"layer {il} out of range (n_layer = {self.n_layer})")
        return il

    def n_head_at(self, il: int) -> int:
        """Query heads of layer ``il``."""
        return self.n_head[self._check(il)]  # type: ignore[index]  # fields normalised by __post_init__

    def n_head_kv_at(self, il: int) -> int:
        """KV heads of layer ``il`` (0 for layers without attention)."""
        return self.n_head_kv[self._check(il)]  # type: ignore[index]  # fields normalised by __post_init__

    def n_ff_at(self, il: int) -> int:
        """Feed-forward width of layer ``il``."""
        return self.n_ff[self._check(il)]  # type: ignore[index]  # fields normalised by __post_init__

    def n_embd_k_gqa(self, il: int) -> int:
        """K row width of layer ``il``: head size x KV heads (llama_hparams::n_embd_k_gqa)."""
        return self.n_embd_head_k * self.n_head_kv_at(il)  # type: ignore[operator]  # fields normalised by __post_init__

    def n_embd_v_gqa(self, il: int) -> int:
        """V row width of layer ``il``: head size x KV heads (llama_hparams::n_embd_v_gqa)."""
        return self.n_embd_head_v * self.n_head_kv_at(il)  # type: ignore[operator]  # fields normalised by __post_init__

    def n_embd_v_gqa_max(self) -> int:
        """Widest V row over *all* model layers; llama.cpp sizes transposed V with it."""
        return max(self.n_embd_v_gqa(il) for il in range(self.n_layer))

    def is_recurrent(self, il: int) -> bool:
        """Whether layer ``il`` keeps a recurrent state (llama_hparams::is_recurrent)."""
        return self.recurrent_layers[self._check(il)]  # type: ignore[index]  # fields normalised by __post_init__

    def has_attention(self, il: int) -> bool:
        """Whether the attention KV cache allocates rows for layer ``il``.

        This is llama.cpp's attention layer filter: every layer for attention-only models,
        ``not is_recurrent`` for most hybrids, every layer for Falcon-H1 (attention and SSM run
        in parallel), and attention-only layers (no FFN) for Nemotron-H.
        """
        return self.attention_layers[self._check(il)]  # type: ignore[index]  # fields normalised by __post_init__

    def has_kv(self, il: int) -> bool:
        """Whether layer ``il`` has K/V of its own (llama_hparams::has_kv)."""
        il = self._check(il)
        return self.n_layer_kv_from_start < 0 or il < self.n_layer_kv_from_start

    def layer_reuse(self, il: int) -> int:
        """The layer whose K/V layer ``il`` reads, or -1 (llama.cpp's layer_reuse_cb): Gemma3n and
        Gemma4 layers from ``n_layer_kv_from_start`` on read the last sliding-window layer before
        it (sliding layers) or the last layer before it (full layers)."""
        il = self._check(il)
        if self.arch not in _LAYER_REUSE_ARCHS or self.has_kv(il):
            return -1
        return self.n_layer_kv_from_start - (2 if self.is_swa_layer(il) else 1)

    def is_swa_layer(self, il: int) -> bool:
        """Whether layer ``il`` uses sliding-window attention (llama_hparams::is_swa)."""
        return self.swa_layers[self._check(il)]  # type: ignore[index]  # fields normalised by __post_init__

    def is_swa_any(self) -> bool:
        """Whether any layer slides (llama_hparams::is_swa_any)."""
        return any(self.swa_layers)  # type: ignore[arg-type]  # fields normalised by __post_init__

    def n_embd_r(self, il: int) -> int:
        """Width of layer ``il``'s R (convolution / token-shift) state row; 0 if not recurrent.

        llama_hparams::n_embd_r(): RWKV ``token_shift_count * n_embd``; LFM2 short conv
        ``n_embd * (l_cache - 1)``; Mamba-style ``(d_conv - 1) * (d_inner + 2 n_group d_state)``
        (Mamba-1 has n_group 0; Qwen3-Next's gated delta net uses the same formula).
        """
        if not self.is_recurrent(il):
            return 0
        if self.wkv_head_size != 0:
            return self.token_shift_count * self.n_embd
        if self.shortconv_l_cache != 0:
            return self.n_embd * (self.shortconv_l_cache - 1)
        d_conv = self.ssm_d_conv - 1 if self.ssm_d_conv > 0 else 0
        return d_conv * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    def n_embd_s(self, il: int) -> int:
        """Width of layer ``il``'s S (SSM / WKV) state row; 0 if not recurrent.

        llama_hparams::n_embd_s(): RWKV ``n_embd * wkv_head_size``; otherwise
        ``d_state * d_inner`` (0 for LFM2, whose short conv has no S state).
        """
        if not self.is_recurrent(il):
            return 0
        if self.wkv_head_size != 0:
            return self.n_embd * self.wkv_head_size
        return self.ssm_d_state * self.ssm_d_inner

    @property
    def ple_n_heads(self) -> int:
        """PLE hash heads: ``(ple_ngram_size - 1) * ple_heads_per_ngram`` (0 without PLE)."""
        return max(self.ple_ngram_size - 1, 0) * self.ple_heads_per_ngram

    def ple_conv_state(self) -> int:
        """Width of a PLE conv history row (llama_hparams::ple_conv_state): ``(ple_conv_kernel -
        1) * ple_ngram_size * hc_mult * n_embd`` (the convolution is dilated by the n-gram size
        over ``hc_mult`` streams), 0 without a PLE module (no heads or no kernel)."""
        if self.ple_n_heads == 0 or self.ple_conv_kernel == 0:
            return 0
        return (self.ple_conv_kernel - 1) * self.ple_ngram_size * self.hc_mult * self.n_embd

    def is_ple(self, il: int) -> bool:
        """Whether layer ``il`` runs the PLE module (llama_hparams::is_ple)."""
        return self.ple_layers[self._check(il)]  # type: ignore[index]  # fields normalised by __post_init__

    def n_embd_p(self, il: int) -> int:
        """Width of layer ``il``'s P row, the recurrent memory's third array (llama.cpp's
        ``cache_ple_r_l``): :meth:`ple_conv_state` for a PLE layer, else 0."""
        return self.ple_conv_state() if self.is_ple(il) else 0

    def rope_freq_base_at(self, il: int) -> float:
        """RoPE base used to shift layer ``il`` (SWA layers may have their own)."""
        return self.rope_freq_base_swa if self.is_swa_layer(il) else self.rope_freq_base  # type: ignore[return-value]  # fields normalised by __post_init__

    def rope_freq_scale_at(self, il: int) -> float:
        """RoPE frequency scale used to shift layer ``il``."""
        return self.rope_freq_scale_swa if self.is_swa_layer(il) else self.rope_freq_scale  # type: ignore[return-value]  # fields normalised by __post_init__

    # -- whole-model facts ------------------------------------------------------------------
    @property
    def is_recurrent_arch(self) -> bool:
        """llm_arch_is_recurrent: the memory is a pure recurrent-state memory."""
        return self.arch in RECURRENT_ARCHS

    @property
    def is_hybrid_arch(self) -> bool:
        """llm_arch_is_hybrid: the memory pairs a KV cache with a recurrent memory."""
        return self.arch in HYBRID_ARCHS

    @property
    def memory_kind(self) -> str:
        """The memory llama.cpp's ``llama_model::create_memory`` builds for this model.

        ``recurrent`` for recurrent archs; for hybrids ``hybrid_iswa`` when the model has a
        sliding-window type, else ``hybrid``; otherwise ``iswa`` when ``swa_type`` is not NONE,
        else ``kv``.
        """
        if self.is_recurrent_arch:
            return "recurrent"
        sliding = self.swa_type != SWAType.NONE
        if self.is_hybrid_arch:
            return "hybrid_iswa" if sliding else "hybrid"
        return "iswa" if sliding else "kv"

    @property
    def n_pos_per_embd(self) -> int:
        """Position components per token: 4 for M-RoPE models, else 1."""
        return 4 if self.rope_type in ("mrope", "imrope") else 1

    @property
    def can_shift(self) -> bool:
        """Whether llama.cpp's KV cache accepts position shifts for this model.

        ``llama_kv_cache::get_can_shift`` refuses models with several position components
        (M-RoPE); RoPE-less models (Mamba, Jamba, Nemotron-H) can "shift" (nothing rotates).
        """
        return self.n_pos_per_embd == 1

    def rope(self, il: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """RoPE settings for the K-shift of layer ``il`` (None for RoPE-less models).

        Returns ``{"n_rot", "freq_base", "freq_scale", "mode"}`` with mode ``"normal"`` or
        ``"neox"``, the ``rope`` argument of the KV cache constructors.
        """
        if self.rope_type == "none" or self.n_rot == 0:
            return None
        mode = "normal" if self.rope_type == "norm" else "neox"
        if il is None:
            base, scale = self.rope_freq_base, self.rope_freq_scale
        else:
            base, scale = self.rope_freq_base_at(il), self.rope_freq_scale_at(il)
        return {"n_rot": int(self.n_rot), "freq_base": float(base), "freq_scale": float(scale),  # type: ignore[arg-type]  # fields normalised by __post_init__
                "mode": mode}

    def recurrent_layer_ids(self) -> Tuple[int, ...]:
        """Ids of the layers with recurrent state."""
        return tuple(il for il in range(self.n_layer) if self.recurrent_layers[il])  # type: ignore[index]  # fields normalised by __post_init__

    def attention_layer_ids(self) -> Tuple[int, ...]:
        """Ids of the layers the attention KV cache allocates."""
        return tuple(il for il in range(self.n_layer) if self.attention_layers[il])  # type: ignore[index]  # fields normalised by __post_init__


def _default_recurrent_layers(arch: str, n_head_kv: Any, n_ff: Any, n: int) -> Tuple[bool, ...]:
    # llama.cpp's per-architecture recurrent_layer_arr rules
    if arch in RECURRENT_ARCHS or arch == "falcon-h1":
        return (True,) * n      # pure recurrent; Falcon-H1 runs an SSM in every layer
    if arch in ("jamba", "granitehybrid", "lfm2"):
        return tuple(h == 0 for h in n_head_kv)
    if arch == "nemotron_h":
        # attention layers have KV heads, MLP layers have an FFN; the rest are Mamba-2
        return tuple(h == 0 and f == 0 for h, f in zip(n_head_kv, n_ff))
    if arch == "qwen3next":
        return tuple((il + 1) % 4 != 0 for il in range(n))
    return (False,) * n


def _default_attention_layers(arch: str, recurrent: Any, n_ff: Any, n: int) -> Tuple[bool, ...]:
    # llama.cpp's attention layer filter in llama_model::create_memory
    if arch in RECURRENT_ARCHS:
        return (False,) * n
    if arch == "falcon-h1":
        return (True,) * n
    if arch == "nemotron_h":
        return tuple((not r) and f == 0 for r, f in zip(recurrent, n_ff))
    if arch in HYBRID_ARCHS:
        return tuple(not r for r in recurrent)
    return (True,) * n


# -- GGUF reading ----------------------------------------------------------------------------

class _Meta:
    """Typed access to GGUF key/values with llama.cpp's required/optional semantics."""

    def __init__(self, kv: Dict[str, Any], arch: str) -> None:
        self.kv = kv
        self.arch = arch

    def key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"

    def has(self, suffix: str) -> bool:
        return self.key(suffix) in self.kv

    def get(self, suffix: str, default: Any = None, required: bool = False) -> Any:
        name = self.key(suffix)
        if name not in self.kv:
            if required:
                raise ValueError(f"GGUF metadata of architecture '{self.arch}' is missing the "
                                 f"required key '{name}'")
            return default
        return self.kv[name]

    def scalar(self, suffix: str, default: Any = None, required: bool = False) -> Any:
        value = self.get(suffix, default, required)
        if isinstance(value, (list, tuple)):
            raise ValueError(f"GGUF key '{self.key(suffix)}' must be a scalar, got an array")
        return value

    def key_or_arr(self, suffix: str, n: int, default: int) -> Union[int, Tuple[int, ...]]:
        # llama.cpp's get_key_or_arr: a scalar is broadcast, an array must have n entries
        value = self.get(suffix, None)
        if value is None:
            return default
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"GGUF key '{self.key(suffix)}' has {len(value)} entries, "
                                 f"expected one per layer ({n})")
            return tuple(int(v) for v in value)
        return int(value)


def hparams_from_metadata(kv: Dict[str, Any]) -> ModelHParams:
    """Build :class:`ModelHParams` from a dict of GGUF key/values (``general.architecture``,
    ``<arch>.block_count`` ...), applying llama.cpp's per-architecture rules.

    Raises ``ValueError`` naming the architecture for an unsupported one, or the key for a
    missing required key.
    """
    arch = kv.get("general.architecture")
    if arch is None:
        raise ValueError("GGUF metadata is missing the required key 'general.architecture'")
    arch = str(arch)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported model architecture '{arch}' (llmem supports: "
                         f"{', '.join(SUPPORTED_ARCHS)})")
    m = _Meta(kv, arch)
    n_ctx_train = int(m.scalar("context_length", required=True))
    n_embd = int(m.scalar("embedding_length", required=True))
    n_layer = int(m.scalar("block_count", required=True))
    for suffix in _REQUIRED[arch]:
        m.scalar(suffix, required=True)

    n_ff = m.key_or_arr("feed_forward_length", n_layer, 0)
    n_head = m.key_or_arr("attention.head_count", n_layer, 0)
    n_head_kv = m.key_or_arr("attention.head_count_kv", n_layer, None)  # type: ignore[arg-type]  # fields normalised by __post_init__
    if n_head_kv is None:
        n_head_kv = n_head
    n_head0 = n_head if isinstance(n_head, int) else n_head[0]

    args: Dict[str, Any] = dict(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                n_head_kv=n_head_kv, n_ff=n_ff, n_ctx_train=n_ctx_train)

    # common RoPE keys (llama_model::load_hparams); the scaling factor is stored inverted
    freq_base = float(m.scalar("rope.freq_base", 10000.0))
    factor = float(m.scalar("rope.scaling.factor", 0.0) or m.scalar("rope.scale_linear", 0.0))
    freq_scale = 1.0 if factor == 0.0 else 1.0 / factor
    args.update(rope_freq_base=freq_base, rope_freq_scale=freq_scale,
                n_ctx_orig_yarn=int(m.scalar("rope.scaling.original_context_length",
                                             n_ctx_train)))
    if n_head0 > 0:
        head_k = int(m.scalar("attention.key_length", n_embd // n_head0))
        head_v = int(m.scalar("attention.value_length", n_embd // n_head0))
        n_rot = int(m.scalar("rope.dimension_count", head_k))
        if arch == "llama" and n_rot != head_k:
            # llama.cpp refuses such a file ("invalid n_rot")
            raise ValueError(f"invalid n_rot: {n_rot}, expected {head_k}")
    else:
        head_k = head_v = n_rot = 0
    args.update(n_embd_head_k=head_k, n_embd_head_v=head_v, n_rot=n_rot)

    # recurrent state shapes
    args.update(ssm_d_conv=int(m.scalar("ssm.conv_kernel", 0)),
                ssm_d_inner=int(m.scalar("ssm.inner_size", 0)),
                ssm_d_state=int(m.scalar("ssm.state_size", 0)),
                ssm_dt_rank=int(m.scalar("ssm.time_step_rank", 0)),
                ssm_n_group=int(m.scalar("ssm.group_count", 0)) if arch != "jamba" and
                arch != "mamba" else 0,
                shortconv_l_cache=int(m.scalar("shortconv.l_cache", 0)),
                wkv_head_size=int(m.scalar("wkv.head_size", 0)),
                token_shift_count=int(m.scalar("token_shift_count", 2)))

    n_swa = 0
    swa_type = SWAType.NONE
    swa_layers = None
    if arch == "gemma2":
        # gemma2: window defaults to 4096; every other layer slides, starting with layer 0
        n_swa = int(m.scalar("attention.sliding_window", 4096))
        swa_type = SWAType.STANDARD
        swa_layers = _swa_pattern(n_layer, 2)
    elif arch == "gemma3":
        # gemma3: 5 sliding layers then 1 full; a missing/zero window disables SWA. The SWA
        # layers rotate with their own trained base (10000, scale 1).
        n_swa = int(m.scalar("attention.sliding_window", 0))
        if n_swa > 0:
            swa_type = SWAType.STANDARD
            swa_layers = _swa_pattern(n_layer, 6)
            args.update(rope_freq_base_swa=10000.0, rope_freq_scale_swa=1.0)
        else:
            n_swa = 0
    elif arch == "gemma3n":
        # gemma3n: the pattern array, else 4 sliding layers then 1 full; layers from 20 on read
        # the K/V of layer 18 (sliding) or 19 (full)
        n_swa = int(m.scalar("attention.sliding_window", required=True))
        swa_type = SWAType.STANDARD
        pattern = m.get("attention.sliding_window_pattern")
        if isinstance(pattern, (list, tuple)):
            swa_layers = _arr(pattern, n_layer, m.key("attention.sliding_window_pattern"), bool)
        else:
            swa_layers = _swa_pattern(n_layer, int(pattern) if pattern is not None else 5)
        args.update(n_layer_kv_from_start=20,
                     rope_freq_base_swa=float(m.scalar("rope.freq_base_swa", freq_base)))
    elif arch == "lfm2":
        # lfm2: a positive window makes every attention layer slide (hybrid iSWA)
        n_swa = int(m.scalar("attention.sliding_window", 0))
        if n_swa > 0:
            swa_type = SWAType.STANDARD
            kv_heads = (n_head_kv,) * n_layer if isinstance(n_head_kv, int) else n_head_kv
            swa_layers = tuple(h != 0 for h in kv_heads)
        else:
            n_swa = 0
    args.update(n_swa=n_swa, swa_type=swa_type, swa_layers=swa_layers)

    if arch == "qwen3next":
        # every full_attention_interval-th layer is full attention (the reference hard-codes
        # the default 4; newer versions read the key)
        interval = int(m.scalar("full_attention_interval", 4))
        if interval <= 0:
            raise ValueError(f"invalid {m.key('full_attention_interval')}: {interval}")
        args["recurrent_layers"] = tuple((il + 1) % interval != 0 for il in range(n_layer))

    if arch == "granitehybrid":
        # Granite uses rope.scaling.finetuned as a RoPE on/off switch (default on); the
        # Granite-4.0-H models are NoPE
        if not bool(m.scalar("rope.scaling.finetuned", True)):
            args["rope_type"] = "none"
    return ModelHParams(**args)


def _swa_pattern(n_layer: int, n_pattern: int) -> Tuple[bool, ...]:
    # llama_hparams::set_swa_pattern(n, dense_first=false): within each group of n layers the
    # first n-1 slide and the last is full attention
    return tuple(il % n_pattern < n_pattern - 1 for il in range(n_layer))


def _field_value(f: Any) -> Any:
    return f.contents()  # gguf's own decoding of a field (gguf >= 0.11)


def read_gguf_metadata(path: Union[str, "os.PathLike[str]"], prefixes: Optional[Sequence[str]] = None
                       ) -> Dict[str, Any]:
    """Read the key/values of a GGUF file (metadata only; tensors are not loaded).

    Long arrays under ``tokenizer.`` are skipped unless ``prefixes`` asks for them.
    """
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install llmem[gguf]") from exc
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such GGUF file: {path}")
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError/struct errors for non-GGUF input
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc
    out: Dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or (name.startswith("tokenizer.") and not prefixes):
            continue
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        out[name] = _field_value(f)
    return out


def read_gguf_hparams(path: Union[str, "os.PathLike[str]"]) -> ModelHParams:
    """Read a model's memory hyper-parameters from a GGUF file's metadata.

    Applies llama.cpp's per-architecture rules (which layers are recurrent, which slide, head
    and state sizes). Supported: llama, gemma2, gemma3, mamba, mamba2, jamba, granitehybrid,
    nemotron_h, falcon-h1, qwen3next, lfm2 (and rwkv6/rwkv7 recurrent shapes). Raises
    ``ValueError`` naming the architecture or the missing key.
    """
    return hparams_from_metadata(read_gguf_metadata(path))
