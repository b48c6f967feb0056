"""The toy models' building blocks in torch (float32 on any device), the same math as
:mod:`llmem.toy.layers`: a toy model built with ``device=`` runs on these, its cache in torch
storage on the same device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["rms_norm", "rope", "silu", "softplus", "swiglu", "attention", "causal_conv", "ssm_scan"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    ms = torch.mean(x * x, dim=-1, keepdim=True)
    return (x / torch.sqrt(ms + eps)) * weight


def rope(x: torch.Tensor, pos: Any, freq_base: float = 10000.0) -> torch.Tensor:
    """RoPE "normal" mode (pairs ``2i, 2i+1``); the angles in float64 on the host as the numpy
    model computes them, then float32 on the device."""
    head_dim = x.shape[-1]
    inv_freq = freq_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    theta = np.asarray(pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = torch.from_numpy(np.cos(theta).astype(np.float32)).to(x.device)[:, None, :]
    sin = torch.from_numpy(np.sin(theta).astype(np.float32)).to(x.device)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(torch.zeros((), dtype=x.dtype, device=x.device), x)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n_tokens, n_head, head_dim = q.shape
    n_head_kv = k.shape[-2]
    group = n_head // n_head_kv
    qg = q.reshape(n_tokens, n_head_kv, group, head_dim)
    per_token = k.dim() == 4
    scores = torch.einsum("tcgd,tkcd->tcgk" if per_token else "tcgd,kcd->tcgk", qg, k)
    scores = scores * float(1.0 / np.sqrt(head_dim)) + mask[:, None, None, :]
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.einsum("tcgk,tkcd->tcgd" if per_token else "tcgk,kcd->tcgd", weights, v)
    return out.reshape(n_tokens, n_head * head_dim)


def causal_conv(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    d_conv = weight.shape[0]
    n_steps = window.shape[1] - (d_conv - 1)
    out = torch.zeros((window.shape[0], n_steps, window.shape[2]), dtype=torch.float32, device=window.device)
    for j in range(d_conv):
        out = out + window[:, j:j + n_steps] * weight[j]
    return out + bias


def ssm_scan(state: torch.Tensor, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dt: torch.Tensor,
             a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_seqs, n_steps = x.shape[:2]
    decay = torch.exp(dt * a)
    states = torch.empty((n_steps + 1,) + tuple(state.shape), dtype=torch.float32, device=state.device)
    states[0] = state
    y = torch.empty_like(x)
    s = state
    for t in range(n_steps):
        update = (dt[:, t, :, None, None] * x[:, t, :, :, None]) * b[:, t, None, None, :]
        s = decay[:, t, :, None, None] * s + update
        states[t + 1] = s
        y[:, t] = torch.einsum("shdn,sn->shd", s, c[:, t])
    return y, states
