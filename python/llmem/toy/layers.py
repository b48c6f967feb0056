"""The numpy building blocks of the toy models: RMSNorm, RoPE, SwiGLU, attention, a Mamba-2 layer.

Everything is float32 and vectorised over tokens; the only Python loop over time is the SSM scan,
which is the model's own recurrence, and it runs over all sequences and heads at once.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rms_norm", "rope", "silu", "softplus", "swiglu", "attention", "causal_conv",
           "ssm_scan"]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Root-mean-square normalisation over the last axis, scaled by ``weight``."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))) * weight  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any


def rope(x: np.ndarray, pos: np.ndarray, freq_base: float = 10000.0) -> np.ndarray:
    """Rotary position embedding of ``x`` ``[n_tokens, n_head, head_dim]`` at positions ``pos``.

    Pairs ``(2i, 2i + 1)`` of every head turn by ``pos * freq_base ** (-2i / head_dim)``: the
    "normal" mode of :class:`llmem.Rope`, so the cache's K-shift re-rotates rows the same way.
    """
    head_dim = x.shape[-1]
    inv_freq = freq_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    theta = np.asarray(pos, dtype=np.float64)[:, None] * inv_freq[None, :]  # [n_tokens, half]
    cos = np.cos(theta).astype(np.float32)[:, None, :]
    sin = np.sin(theta).astype(np.float32)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0), x)  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """The gated feed-forward block: ``(silu(x W_gate) * x W_up) W_down``."""
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grouped-query attention of every token over a set of key/value rows.

    ``q`` ``[n_tokens, n_head, head_dim]``; ``k``, ``v`` ``[n_kv, n_head_kv, head_dim]`` shared by
    all tokens, or ``[n_tokens, n_kv, n_head_kv, head_dim]`` when tokens read different rows (one
    KV stream per sequence); ``mask`` ``[n_tokens, n_kv]`` holding 0 (visible) or -inf. Query
    head ``h`` reads key/value head ``h // (n_head // n_head_kv)``. Returns
    ``[n_tokens, n_head * head_dim]``.
    """
    n_tokens, n_head, head_dim = q.shape
    n_head_kv = k.shape[-2]
    group = n_head // n_head_kv
    qg = q.reshape(n_tokens, n_head_kv, group, head_dim)
    per_token = k.ndim == 4
    scores = np.einsum("tcgd,tkcd->tcgk" if per_token else "tcgd,kcd->tcgk", qg, k)
    scores = scores * np.float32(1.0 / np.sqrt(head_dim)) + mask[:, None, None, :]
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = np.einsum("tcgk,tkcd->tcgd" if per_token else "tcgk,kcd->tcgd", weights, v)
    return out.reshape(n_tokens, n_head * head_dim)  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any


def causal_conv(window: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Depthwise causal convolution over time.

    ``window`` ``[n_seqs, d_conv - 1 + n_steps, channels]`` is the previous ``d_conv - 1`` inputs
    followed by the new ones; ``weight`` ``[d_conv, channels]``. Returns ``[n_seqs, n_steps,
    channels]``: output ``t`` sees inputs ``t .. t + d_conv - 1`` of the window.
    """
    d_conv = weight.shape[0]
    n_steps = window.shape[1] - (d_conv - 1)
    out = np.zeros((window.shape[0], n_steps, window.shape[2]), np.float32)
    for j in range(d_conv):  # over the kernel taps, not over tokens
        out += window[:, j:j + n_steps] * weight[j]
    return out + bias  # type: ignore[no-any-return]  # numpy reference model: numpy's results are Any


def ssm_scan(state: np.ndarray, x: np.ndarray, b: np.ndarray, c: np.ndarray, dt: np.ndarray,
             a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mamba-2's selective state-space recurrence with a scalar decay per head.

    ``state`` ``[n_seqs, n_head, head_dim, d_state]`` is the state before the first step;
    ``x`` ``[n_seqs, n_steps, n_head, head_dim]``; ``b``, ``c`` ``[n_seqs, n_steps, d_state]``;
    ``dt`` ``[n_seqs, n_steps, n_head]`` (after softplus); ``a`` ``[n_head]`` (negative).
    Per step: ``s = exp(dt * a) * s + dt * x (outer) b``, ``y = s c``.

    Returns ``y`` ``[n_seqs, n_steps, n_head, head_dim]`` and every state, ``[n_steps + 1, ...]``
    (index 0 is the input state, index ``t + 1`` the state after step ``t``), which the caller
    needs for the rollback snapshots.
    """
    n_seqs, n_steps = x.shape[:2]
    decay = np.exp(dt * a)  # [n_seqs, n_steps, n_head]
    states = np.empty((n_steps + 1,) + state.shape, np.float32)
    states[0] = state
    y = np.empty_like(x)
    s = state
    for t in range(n_steps):  # the recurrence itself; all sequences and heads at once
        update = (dt[:, t, :, None, None] * x[:, t, :, :, None]) * b[:, t, None, None, :]
        s = decay[:, t, :, None, None] * s + update
        states[t + 1] = s
        y[:, t] = np.einsum("shdn,sn->shd", s, c[:, t])
    return y, states
