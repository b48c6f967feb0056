"""What every toy model shares: the configuration, the weights, the residual stack, the output
head and llama.cpp's decode loop over a memory context.

A model is a stack of layers, each a *mixer* (attention over a KV cache, sliding-window attention,
or a Mamba-2 state-space layer over a recurrent memory) followed by a SwiGLU feed-forward block.
``forward_full`` runs the whole token history without any cache; ``decode`` runs a
:class:`llmem.Batch` through a memory exactly as an inference engine does, so that the two can be
compared.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np

from ..batch import Batch, BatchAllocator
from ..errors import LlmemError
from ..status import Status
from . import layers as L

__all__ = ["ToyConfig", "ToyModel", "DecodeClock", "NoSlotError", "ATTN", "SWA", "SSM"]

#: layer kinds: full attention, sliding-window attention, Mamba-2 state-space layer
ATTN, SWA, SSM = "attn", "swa", "ssm"


class NoSlotError(LlmemError):
    """The memory has no room for the batch (``init_batch`` returned FAILED_PREPARE; llama.cpp's
    ``llama_decode`` returns 1)."""


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Sizes of a toy model. ``layer_kinds`` names each layer's mixer (``"attn"``, ``"swa"`` or
    ``"ssm"``); attention sizes matter for attention layers, ``ssm_*``/``d_*`` for SSM layers."""

    layer_kinds: Tuple[Any, ...] = (ATTN, ATTN)
    n_vocab: int = 96
    n_embd: int = 48
    n_ff: int = 96
    # attention
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 12
    rope_base: float = 10000.0
    n_swa: int = 0
    # Mamba-2
    ssm_n_head: int = 4
    ssm_head_dim: int = 12
    d_state: int = 8
    d_conv: int = 4
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        kinds = tuple(self.layer_kinds)
        object.__setattr__(self, "layer_kinds", kinds)
        bad = [k for k in kinds if k not in (ATTN, SWA, SSM)]
        if bad:
            raise ValueError(f"unknown layer kinds {bad}; use 'attn', 'swa' or 'ssm'")
        if SWA in kinds and self.n_swa <= 0:
            raise ValueError("sliding-window layers need n_swa > 0")
        if self.n_head % self.n_head_kv or self.head_dim % 2:
            raise ValueError("n_head must be a multiple of n_head_kv and head_dim even (RoPE pairs)")

    @property
    def n_layer(self) -> int:
        return len(self.layer_kinds)

    @property
    def n_embd_k(self) -> int:
        """Width of one K (and V) row of an attention layer: ``n_head_kv * head_dim``."""
        return self.n_head_kv * self.head_dim

    @property
    def d_inner(self) -> int:
        return self.ssm_n_head * self.ssm_head_dim

    @property
    def conv_channels(self) -> int:
        """Channels the short convolution runs over: x, B and C."""
        return self.d_inner + 2 * self.d_state

    @property
    def n_embd_r(self) -> int:
        """Elements of one conv-window state: the last ``d_conv - 1`` conv inputs."""
        return (self.d_conv - 1) * self.conv_channels

    @property
    def n_embd_s(self) -> int:
        """Elements of one SSM state: ``ssm_n_head * ssm_head_dim * d_state``."""
        return self.d_inner * self.d_state

    def is_attention(self, il: int) -> bool:
        return self.layer_kinds[il] in (ATTN, SWA)


class DecodeClock:
    """Seconds spent in llmem calls and in the model's own numpy math, summed over decodes."""

    __slots__ = ("llmem", "model", "_t0")

    def __init__(self) -> None:
        self.llmem: float = 0.0
        self.model: float = 0.0
        self._t0 = 0.0

    def __enter__(self) -> "DecodeClock":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.llmem += time.perf_counter() - self._t0

    def reset(self) -> None:
        self.llmem = self.model = 0.0


def _init_weights(cfg: ToyConfig, seed: int) -> Dict[str, Any]:
    rng = np.random.default_rng(seed)

    def dense(n_in: int, n_out: int) -> np.ndarray:
        # scaled so that activations stay of order one through the stack
        return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: Dict[str, Any] = {
        "tok_embd": rng.standard_normal((cfg.n_vocab, cfg.n_embd)).astype(np.float32),
        "out_norm": norm(cfg.n_embd),
        "output": dense(cfg.n_embd, cfg.n_vocab),
        "layers": [],
    }
    for kind in cfg.layer_kinds:
        lw = {"ffn_norm": norm(cfg.n_embd), "ffn_gate": dense(cfg.n_embd, cfg.n_ff),
              "ffn_up": dense(cfg.n_embd, cfg.n_ff), "ffn_down": dense(cfg.n_ff, cfg.n_embd),
              "mix_norm": norm(cfg.n_embd)}
        if kind == SSM:
            n_h = cfg.ssm_n_head
            lw.update({
                "in_proj": dense(cfg.n_embd, cfg.d_inner + cfg.conv_channels + n_h),
                "conv_w": (rng.standard_normal((cfg.d_conv, cfg.conv_channels)) /
                           np.sqrt(cfg.d_conv)).astype(np.float32),
                "conv_b": (0.1 * rng.standard_normal(cfg.conv_channels)).astype(np.float32),
                # decays between exp(-4 dt) and exp(-0.5 dt): states remember a few tokens back
                "a": (-np.exp(rng.uniform(np.log(0.5), np.log(4.0), n_h))).astype(np.float32),
                "dt_bias": rng.uniform(-3.0, -1.0, n_h).astype(np.float32),
                "d": rng.uniform(0.5, 1.5, n_h).astype(np.float32),
                "out_proj": dense(cfg.d_inner, cfg.n_embd),
            })
        else:
            lw.update({
                "wq": dense(cfg.n_embd, cfg.n_head * cfg.head_dim),
                "wk": dense(cfg.n_embd, cfg.n_embd_k),
                "wv": dense(cfg.n_embd, cfg.n_embd_k),
                "wo": dense(cfg.n_head * cfg.head_dim, cfg.n_embd),
            })
        w["layers"].append(lw)
    return w


class ToyModel:
    """A tiny language model with random weights drawn from ``seed``, run in float32.

    Subclasses choose the layer kinds and build the llmem memory the model needs
    (:meth:`new_memory`). ``decode(batch, memory)`` is ``llama_decode``: it splits the batch into
    micro-batches through the memory, computes each one reading and writing the memory's state
    through the context, and returns the logits of the batch's output tokens in batch order.
    """

    def __init__(self, config: ToyConfig, seed: int = 0, device: Any = None) -> None:
        self.config = config
        self.seed = seed
        self.weights: Dict[str, Any] = _init_weights(config, seed)
        self.clock: DecodeClock = DecodeClock()
        #: None: numpy math and numpy storage; a torch device: torch math there, and memories in
        #: torch storage on it (the same weights)
        self.device: Any = None
        self._L: Any = L
        if device is not None:
            import torch

            from . import layers_torch
            self.device = torch.device(device)
            self._L = layers_torch
            dev = self.device

            def to_dev(w: Any) -> Any:
                if isinstance(w, dict):
                    return {k: to_dev(v) for k, v in w.items()}
                if isinstance(w, list):
                    return [to_dev(v) for v in w]
                return torch.from_numpy(w).to(dev)
            self.weights = to_dev(self.weights)

    def _storage_args(self) -> Dict[str, Any]:
        """The ``storage``/``device`` arguments of the model's memories."""
        return {} if self.device is None else {"storage": "torch", "device": self.device}

    def _tensor(self, a: Any) -> Any:
        """A host array (indices, a mask) as the model's array type."""
        if self.device is None:
            return a
        import torch
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    # -- the memory ------------------------------------------------------------------------------

    def new_memory(self, n_ctx: int, n_seq_max: int = 1, **options: Any) -> Any:
        """The llmem memory this model decodes with (see the subclasses)."""
        raise NotImplementedError

    def _attn_ctx(self, ctx: Any) -> Any:
        """The KV part of a context (the context itself for a plain KV memory)."""
        return ctx

    def _recr_ctx(self, ctx: Any) -> Any:
        """The recurrent part of a context (the context itself for a recurrent memory)."""
        return ctx

    def _rollback_depth(self, memory: Any) -> int:
        """``n_rs_seq`` of the memory's recurrent part: how many snapshot planes it keeps."""
        return 0

    # -- whole history, no cache -----------------------------------------------------------------

    def forward_full(self, tokens: Sequence[int], pos: Optional[Sequence[int]] = None) -> np.ndarray:
        """Logits ``[n_tokens, n_vocab]`` of one sequence computed from scratch: every token at
        ``pos`` (default ``0, 1, ...``), attention causal by position, SSM states from zero."""
        cfg = self.config
        tokens = np.asarray(tokens, dtype=np.int64)  # type: ignore[assignment]  # the sequences are re-bound as arrays
        pos = np.arange(len(tokens), dtype=np.int64) if pos is None else np.asarray(pos, np.int64)  # type: ignore[assignment]  # the sequences are re-bound as arrays
        if pos.shape != tokens.shape:  # type: ignore[attr-defined, union-attr]  # the sequences are re-bound as arrays
            raise ValueError(f"pos has shape {pos.shape}, tokens {tokens.shape}")  # type: ignore[attr-defined, union-attr]  # the sequences are re-bound as arrays
        x = self.weights["tok_embd"][self._tensor(tokens)]
        delta = pos[:, None] - pos[None, :]  # type: ignore[call-overload, index]  # query position minus key position
        causal = self._tensor(np.where(delta >= 0, 0.0, -np.inf).astype(np.float32))
        windowed = self._tensor(np.where((delta >= 0) & (delta < max(cfg.n_swa, 1)), 0.0, -np.inf).astype(np.float32))
        for il, kind in enumerate(cfg.layer_kinds):
            lw = self.weights["layers"][il]
            h = self._L.rms_norm(x, lw["mix_norm"], cfg.norm_eps)
            if kind == SSM:
                zeros_r = self._tensor(np.zeros((1, cfg.d_conv - 1, cfg.conv_channels), np.float32))
                zeros_s = self._tensor(np.zeros((1, cfg.ssm_n_head, cfg.ssm_head_dim, cfg.d_state), np.float32))
                y, _, _ = self._ssm(lw, h[None], zeros_r, zeros_s)
                x = x + y[0]
            else:
                q, k, v = self._qkv(lw, h, pos)  # type: ignore[arg-type]  # the sequences are re-bound as arrays
                mask = windowed if kind == SWA else causal
                x = x + self._L.attention(q, k, v.reshape(k.shape), mask) @ lw["wo"]
            x = x + self._ffn(lw, x)
        return self._logits(x)

    # -- one batch through the memory ------------------------------------------------------------

    def decode(self, batch: Batch, memory: Any, n_ubatch: int = 512) -> np.ndarray:
        """Decode ``batch`` through ``memory``; the logits ``[n_outputs, n_vocab]`` of the tokens
        the batch marks as outputs, in batch order (llama.cpp's ``llama_decode`` followed by
        ``llama_get_logits``). Raises :class:`NoSlotError` when the memory has no room (nothing
        changed then) and :class:`llmem.BatchError` for an invalid batch."""
        clock = self.clock
        t_start = time.perf_counter()
        llmem_before = clock.llmem
        with clock:
            balloc = BatchAllocator(memory.n_seq_max, n_vocab=self.config.n_vocab)
            balloc.init(batch, memory)
            # pending K-shift or stream copies must reach the K/V rows before they are read
            update = memory.init_update()
            if update.status == Status.SUCCESS:
                update.apply()
            ctx = memory.init_batch(balloc, n_ubatch)
        n_rs_seq = self._rollback_depth(memory)
        if ctx.status != Status.SUCCESS:
            raise NoSlotError(f"no memory slot for the batch (status {Status(ctx.status).name})")
        outputs: List[Any] = []
        while True:
            with clock:
                if not ctx.apply():
                    raise LlmemError("the memory refused to apply a micro-batch")
                ub = ctx.ubatch
            outputs.append(self._forward_ubatch(ub, ctx, n_rs_seq))
            with clock:
                more = ctx.next()
            if not more:
                break
        with clock:
            out_ids = np.asarray(balloc.out_ids)
        if self.device is not None:
            import torch
            logits: Any = torch.cat(outputs) if outputs else self._tensor(np.zeros((0, self.config.n_vocab), np.float32))
        else:
            logits = np.concatenate(outputs) if outputs else np.zeros((0, self.config.n_vocab), np.float32)
        # outputs come out in micro-batch order; out_ids maps each back to its batch index
        result: Any = logits[self._tensor(np.argsort(out_ids, kind="stable"))]
        clock.model += (time.perf_counter() - t_start) - (clock.llmem - llmem_before)
        return result  # type: ignore[no-any-return]  # a torch tensor for a model on a device

    def _forward_ubatch(self, ub: Any, ctx: Any, n_rs_seq: int) -> np.ndarray:
        cfg, clock = self.config, self.clock
        with clock:
            tokens = np.asarray(ub.token, dtype=np.int64)
            pos = np.asarray(ub.pos, dtype=np.int64)
            out_rows = np.flatnonzero(np.asarray(ub.output))
            n_seqs, n_seq_tokens = ub.n_seqs, ub.n_seq_tokens
        x = self.weights["tok_embd"][self._tensor(tokens)]
        for il, kind in enumerate(cfg.layer_kinds):
            lw = self.weights["layers"][il]
            h = self._L.rms_norm(x, lw["mix_norm"], cfg.norm_eps)
            if kind == SSM:
                # recurrent micro-batches hold n_seqs sequences of n_seq_tokens tokens each,
                # grouped by sequence: row s of get_r/get_s is the state of group s
                x = x + self._ssm_cached(il, lw, h.reshape(n_seqs, n_seq_tokens, -1),
                                         self._recr_ctx(ctx), n_rs_seq).reshape(x.shape)
            else:
                x = x + self._attention_cached(il, lw, h, pos, self._attn_ctx(ctx))
            x = x + self._ffn(lw, x)
        return self._logits(x[self._tensor(out_rows)])

    # -- layer math ------------------------------------------------------------------------------

    def _qkv(self, lw: Dict[str, Any], h: np.ndarray, pos: np.ndarray) -> Any:
        cfg = self.config
        n = h.shape[0]
        q = self._L.rope((h @ lw["wq"]).reshape(n, cfg.n_head, cfg.head_dim), pos, cfg.rope_base)
        k = self._L.rope((h @ lw["wk"]).reshape(n, cfg.n_head_kv, cfg.head_dim), pos, cfg.rope_base)
        v = h @ lw["wv"]
        return q, k, v

    def _attention_cached(self, il: int, lw: Dict[str, Any], h: np.ndarray, pos: np.ndarray, ctx: Any) -> np.ndarray:
        cfg, clock = self.config, self.clock
        q, k, v = self._qkv(lw, h, pos)
        # an iSWA context holds a base and a swa sub-context; the layer's cache decides
        sub = (ctx.swa if cfg.layer_kinds[il] == SWA else ctx.base) if hasattr(ctx, "swa") else ctx
        with clock:
            sub.cpy_k(il, k.reshape(len(h), -1))
            sub.cpy_v(il, v)
            keys = sub.get_k(il)      # [n_stream, n_kv, n_embd_k]
            values = sub.get_v(il)    # [n_stream, n_embd_v_max, n_kv] when V is transposed
            if sub.cache.ggml_type_k.quantized:  # block types (q8_0...): the dequantized rows
                keys = sub.get_k_float(il)
            if sub.cache.ggml_type_v.quantized:
                values = sub.get_v_float(il)
            mask = sub.kq_mask()
            v_trans = sub.cache.v_trans
            if keys.shape[0] > 1:
                # one stream per sequence: each token reads its own stream's rows
                rows = sub.k_idxs() // sub.cache.size
                stream = rows - rows.min()
        n_kv = keys.shape[1]
        if self.device is not None:  # torch storage: the cache's tensors, on the model's device
            if v_trans:
                values = values[:, :cfg.n_embd_k, :].permute(0, 2, 1)
            keys = keys.float().reshape(-1, n_kv, cfg.n_head_kv, cfg.head_dim)
            values = values.float().reshape(-1, n_kv, cfg.n_head_kv, cfg.head_dim)
            mask = self._tensor(mask)
            if keys.shape[0] > 1:
                st = self._tensor(stream)  # pyright: ignore[reportPossiblyUnboundVariable]  # set above when keys.shape[0] > 1
                keys, values = keys[st], values[st]
            else:
                keys, values = keys[0], values[0]
            return self._L.attention(q, keys, values, mask) @ lw["wo"]  # type: ignore[no-any-return]
        if v_trans:
            values = values[:, :cfg.n_embd_k, :].transpose(0, 2, 1)
        keys = keys.astype(np.float32, copy=False).reshape(-1, n_kv, cfg.n_head_kv, cfg.head_dim)
        values = values.astype(np.float32, copy=False).reshape(-1, n_kv, cfg.n_head_kv, cfg.head_dim)
        if keys.shape[0] > 1:
            keys, values = keys[stream], values[stream]  # pyright: ignore[reportPossiblyUnboundVariable]  # set above when keys.shape[0] > 1
        else:
            keys, values = keys[0], values[0]
        return L.attention(q, keys, values, mask) @ lw["wo"]  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any

    def _ssm(self, lw: Dict[str, Any], h: np.ndarray, r_prev: np.ndarray, s_prev: np.ndarray) -> Any:
        """Mamba-2 mixer over ``h`` ``[n_seqs, n_steps, n_embd]`` from conv windows ``r_prev``
        ``[n_seqs, d_conv - 1, channels]`` and states ``s_prev``. Returns the output, the full
        conv window ``[n_seqs, d_conv - 1 + n_steps, channels]`` and every SSM state."""
        cfg = self.config
        n_seqs, n_steps, _ = h.shape
        proj = h @ lw["in_proj"]
        z = proj[..., :cfg.d_inner]
        xbc = proj[..., cfg.d_inner:cfg.d_inner + cfg.conv_channels]
        Lx = self._L
        dt = Lx.softplus(proj[..., cfg.d_inner + cfg.conv_channels:] + lw["dt_bias"])
        if self.device is not None:
            import torch
            window: Any = torch.cat([cast(Any, r_prev), xbc], dim=1)
        else:
            window = np.concatenate([r_prev, xbc], axis=1)
        conv = Lx.silu(Lx.causal_conv(window, lw["conv_w"], lw["conv_b"]))
        xs = conv[..., :cfg.d_inner].reshape(n_seqs, n_steps, cfg.ssm_n_head, cfg.ssm_head_dim)
        b = conv[..., cfg.d_inner:cfg.d_inner + cfg.d_state]
        c = conv[..., cfg.d_inner + cfg.d_state:]
        y, states = Lx.ssm_scan(s_prev, xs, b, c, dt, lw["a"])
        y = y + lw["d"][:, None] * xs
        y = y.reshape(n_seqs, n_steps, cfg.d_inner) * Lx.silu(z)
        return y @ lw["out_proj"], window, states

    def _ssm_cached(self, il: int, lw: Dict[str, Any], h: np.ndarray, ctx: Any, n_rs_seq: int) -> np.ndarray:
        cfg, clock = self.config, self.clock
        n_seqs, n_steps, _ = h.shape
        with clock:
            r_in = ctx.get_r(il)
            s_in = ctx.get_s(il)
        if self.device is not None:  # torch storage: the states are tensors on the model's device
            import torch
            r_prev = r_in.float().reshape(n_seqs, cfg.d_conv - 1, cfg.conv_channels)
            s_prev = s_in.float().reshape(n_seqs, cfg.ssm_n_head, cfg.ssm_head_dim, cfg.d_state)
            y, window, states = self._ssm(lw, h, r_prev, s_prev)
            n_planes = min(n_steps + 1, 1 + n_rs_seq)
            w = cfg.d_conv - 1
            planes_r: Any = torch.stack([window[:, n_steps - d:n_steps - d + w] for d in range(n_planes)])
            planes_s: Any = torch.flip(states, [0])[:n_planes]
            planes_r = planes_r.reshape(n_planes, n_seqs, -1).to(r_in.dtype).contiguous()
            planes_s = planes_s.reshape(n_planes, n_seqs, -1).to(s_in.dtype).contiguous()
            with clock:
                ctx.store_r(il, planes_r if n_planes > 1 else planes_r[0])
                ctx.store_s(il, planes_s if n_planes > 1 else planes_s[0])
            return y  # type: ignore[no-any-return]
        r_prev = r_in.astype(np.float32).reshape(n_seqs, cfg.d_conv - 1, cfg.conv_channels)
        s_prev = s_in.astype(np.float32).reshape(n_seqs, cfg.ssm_n_head, cfg.ssm_head_dim, cfg.d_state)
        y, window, states = self._ssm(lw, h, r_prev, s_prev)
        # plane d holds the state d tokens before the end (the rollback snapshots); the state
        # before the micro-batch is known too, so up to n_steps + 1 planes can be written
        n_planes = min(n_steps + 1, 1 + n_rs_seq)
        w = cfg.d_conv - 1
        new_r = np.stack([window[:, n_steps - d:n_steps - d + w] for d in range(n_planes)])
        new_s = states[::-1][:n_planes]
        new_r = np.ascontiguousarray(new_r.reshape(n_planes, n_seqs, -1), dtype=r_in.dtype)
        new_s = np.ascontiguousarray(new_s.reshape(n_planes, n_seqs, -1), dtype=s_in.dtype)
        with clock:
            ctx.store_r(il, new_r if n_planes > 1 else new_r[0])
            ctx.store_s(il, new_s if n_planes > 1 else new_s[0])
        return y  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any

    def _ffn(self, lw: Dict[str, Any], x: np.ndarray) -> np.ndarray:
        h = self._L.rms_norm(x, lw["ffn_norm"], self.config.norm_eps)
        return self._L.swiglu(h, lw["ffn_gate"], lw["ffn_up"], lw["ffn_down"])  # type: ignore[no-any-return]

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self._L.rms_norm(x, self.weights["out_norm"], self.config.norm_eps) @ self.weights["output"]  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any
