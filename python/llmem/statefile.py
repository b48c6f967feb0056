"""What a saved state holds (``llmem inspect STATEFILE``).

A file written by :meth:`Memory.save` starts with llmem's versioned header, which records the
memory's kind and configuration (docs/reliability.md). :func:`describe_state_file` reads that
header, builds an empty memory of the same configuration, loads the file into it with the
library's own readers (so every check of :meth:`Memory.load` applies) and reports what it holds:
the sequences, their positions and cells, and the cell map of every attention stream.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import StateError
from .memory import STATE_FILE_MAGIC, Memory

__all__ = ["describe_state_file", "read_state_header", "draw_cell_map"]

_KINDS = {1: "KVCache", 2: "KVCacheISWA", 3: "RecurrentMemory", 4: "HybridMemory",
          5: "HybridISWAMemory"}
_FIXED = 44  # bytes of the header before the configuration record


def read_state_header(data: bytes) -> Dict[str, Any]:
    """The fields of a state header (StateError ``CORRUPT`` when ``data`` has none)."""
    if not data.startswith(STATE_FILE_MAGIC) or len(data) < _FIXED + 4:
        raise StateError("not an llmem state file (no versioned header): raw llama.cpp state "
                         f"bytes, {len(data)} bytes; the header records the configuration needed "
                         "to describe them", "CORRUPT")
    version, kind, flags, seq, n_fields, config_bytes, payload_len, _crc = struct.unpack_from(
        "<IIIiIIQI", data, 8)
    if _FIXED + config_bytes + 4 > len(data):
        raise StateError("truncated state header", "CORRUPT")
    fields: Dict[str, int] = {}
    at = _FIXED
    for _ in range(n_fields):
        n = data[at]
        name = data[at + 1:at + 1 + n].decode("ascii")
        (value,) = struct.unpack_from("<q", data, at + 1 + n)
        fields[name] = value
        at += 1 + n + 8
    return {"version": version, "kind": _KINDS.get(kind, f"unknown ({kind})"), "kind_id": kind,
            "flags": flags, "seq_id": seq, "payload_bytes": payload_len,
            "header_bytes": _FIXED + config_bytes + 4, "config": fields}


def _dtype_of(type_id: int) -> Any:
    from .ggml_types import ggml_type

    try:
        return ggml_type(int(type_id)).name  # the cache takes ggml type names (f16, q8_0, ...)
    except (TypeError, ValueError):
        pass
    raise StateError(f"state of an unknown K/V type id {type_id}", "CONFIG_MISMATCH")


def _kv_args(cfg: Dict[str, int], p: str) -> Tuple[Dict[str, Any], List[int]]:
    """Constructor arguments of the KV cache described by the fields with prefix ``p``."""
    n = cfg[f"{p}.n_layer"]
    il = [cfg[f"{p}.layer[{l}].il"] for l in range(n)]
    n_layer = max(il) + 1 if il else 0
    ek = [0] * n_layer
    ev = [0] * n_layer
    for l, i in enumerate(il):
        ek[i] = cfg[f"{p}.layer[{l}].n_embd_k"]
        ev[i] = cfg[f"{p}.layer[{l}].n_embd_v"]
    if cfg[f"{p}.n_embd_v_max"] > max(ev, default=0):
        # the transposed V height counts layers this cache does not hold: give it one
        ek.append(0)
        ev.append(cfg[f"{p}.n_embd_v_max"])
        n_layer += 1
    return dict(n_layer=n_layer, n_embd_k_gqa=ek, n_embd_v_gqa=ev, kv_size=cfg[f"{p}.kv_size"],
                n_seq_max=cfg[f"{p}.n_seq_max"], dtype_k=_dtype_of(cfg[f"{p}.type_k"]),
                dtype_v=_dtype_of(cfg[f"{p}.type_v"]), v_trans=bool(cfg[f"{p}.v_trans"]),
                unified=cfg[f"{p}.n_stream"] == 1, n_pad=cfg[f"{p}.n_pad"],
                n_pos_per_embd=cfg[f"{p}.n_pos_per_embd"]), il


def _kv(cfg: Dict[str, int], p: str) -> Any:
    from .kv_cache import KVCache

    args, il = _kv_args(cfg, p)
    held = set(il)
    return KVCache(**args, n_swa=cfg[f"{p}.n_swa"], swa_type=cfg[f"{p}.swa_type"],
                   layer_filter=lambda i: i in held)


def _recurrent(cfg: Dict[str, int], attn_layers: List[int]) -> Any:
    from .recurrent import RecurrentMemory

    n_layer, n_present = cfg["recr.n_layer"], cfg["recr.n_present"]
    free = [i for i in range(n_layer) if i not in set(attn_layers)]
    present = free if len(free) == n_present else list(range(n_present))
    sizes = {0: 4, 1: 2}
    if cfg["recr.type_r"] not in sizes or cfg["recr.type_s"] not in sizes:
        raise StateError("recurrent state of an unknown type", "CONFIG_MISMATCH")
    er, es, ep = [0] * n_layer, [0] * n_layer, [0] * n_layer
    for l, i in enumerate(present):
        er[i] = cfg[f"recr.layer[{l}].r_row_bytes"] // sizes[cfg["recr.type_r"]]
        es[i] = cfg[f"recr.layer[{l}].s_row_bytes"] // sizes[cfg["recr.type_s"]]
        ep[i] = cfg.get(f"recr.layer[{l}].p_row_bytes", 0) // sizes[cfg["recr.type_r"]]  # recorded where there is a P array
    keep = set(present)
    return RecurrentMemory(n_layer=n_layer, n_embd_r=er, n_embd_s=es, mem_size=cfg["recr.size"],
                           n_seq_max=cfg["recr.n_seq_max"], n_rs_seq=cfg["recr.n_rs_seq"],
                           dtype_r=np.float32 if cfg["recr.type_r"] == 0 else np.float16,
                           dtype_s=np.float32 if cfg["recr.type_s"] == 0 else np.float16,
                           layer_filter=lambda i: i in keep, n_embd_p=ep if any(ep) else None)


def _iswa(cfg: Dict[str, int]) -> Any:
    from .kv_cache import KVCacheISWA

    base, il_base = _kv_args(cfg, "base")
    _, il_swa = _kv_args(cfg, "swa")
    swa_layers = set(il_swa)
    n_layer = max(il_base + il_swa) + 1
    ek = [cfg[f"base.layer[{l}].n_embd_k"] for l in range(len(il_base))]
    ek_swa = [cfg[f"swa.layer[{l}].n_embd_k"] for l in range(len(il_swa))]
    ev = [cfg[f"base.layer[{l}].n_embd_v"] for l in range(len(il_base))]
    ev_swa = [cfg[f"swa.layer[{l}].n_embd_v"] for l in range(len(il_swa))]
    k, v = [0] * n_layer, [0] * n_layer
    for i, a, b in zip(il_base, ek, ev):
        k[i], v[i] = a, b
    for i, a, b in zip(il_swa, ek_swa, ev_swa):
        k[i], v[i] = a, b
    size, size_swa = cfg["base.kv_size"], cfg["swa.kv_size"]
    n_swa = cfg["swa.n_swa"]
    per = cfg["swa.n_seq_max"] if cfg["swa.n_stream"] == 1 else 1
    full = size_swa == size
    return KVCacheISWA(n_layer=n_layer, n_embd_k_gqa=k, n_embd_v_gqa=v, kv_size=size,
                       n_seq_max=base["n_seq_max"], dtype_k=base["dtype_k"], dtype_v=base["dtype_v"],
                       v_trans=base["v_trans"], unified=cfg["base.n_stream"] == 1,
                       n_pad=base["n_pad"], n_swa=n_swa, swa_type=cfg["swa.swa_type"],
                       swa_full=full, n_ubatch=max(1, size_swa - n_swa * per),
                       is_swa_layer=lambda i: i in swa_layers,
                       layer_filter=lambda i: i in swa_layers or i in set(il_base))


def _memory_for(header: Dict[str, Any]) -> Memory:
    from .hybrid import HybridISWAMemory, HybridMemory

    cfg, kind = header["config"], header["kind_id"]
    if kind == 1:
        return _kv(cfg, "attn")  # type: ignore[no-any-return]
    if kind == 2:
        return _iswa(cfg)  # type: ignore[no-any-return]
    if kind == 3:
        return _recurrent(cfg, [])  # type: ignore[no-any-return]
    if kind == 4:
        attn = _kv(cfg, "attn")
        return HybridMemory(attn, _recurrent(cfg, attn.layers))
    if kind == 5:
        attn = _iswa(cfg)
        return HybridISWAMemory(attn, _recurrent(cfg, attn.layers))
    raise StateError(f"unknown memory kind {kind}", "CONFIG_MISMATCH")


def _kv_summary(cache: Any) -> Dict[str, Any]:
    cells = cache.cells()
    n_stream, size = cells["pos"].shape
    cell_seq = np.full((n_stream, size), -1, np.int64)  # the first sequence of each cell
    per_seq: Dict[int, int] = {}
    for s in range(n_stream):
        n_seq = cells["n_seq"][s]
        ids = cells["seq_ids"][s]
        offs = np.concatenate(([0], np.cumsum(n_seq)))[:-1]
        used = n_seq > 0
        cell_seq[s, used] = ids[offs[used]]
        for sid, n in zip(*np.unique(ids, return_counts=True)):
            per_seq[int(sid)] = per_seq.get(int(sid), 0) + int(n)
    return {"cells": size * n_stream, "streams": n_stream, "cells_used": int(cache.used),
            "cells_per_seq": per_seq, "cell_seq": cell_seq}


def describe_state_file(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """What the state file at ``path`` holds: its header fields, the memory it belongs to, the
    sequences (positions, cells per part) and, per attention cache, ``cell_seq``: the first
    sequence of each cell, ``[n_stream, kv_size]`` (-1: empty). StateError (with its
    ``reason``) when the file is not a readable llmem state."""
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    header = read_state_header(data)
    mem = _memory_for(header)
    seq = header["seq_id"]
    mem.load(path, seq)
    n_seq_max = mem.n_seq_max
    seqs = {q: (mem.seq_pos_min(q), mem.seq_pos_max(q)) for q in range(n_seq_max)
            if mem.seq_pos_max(q) != -1}
    parts: Dict[str, Dict[str, Any]] = {}
    for name, part in _kv_parts(mem):
        parts[name] = _kv_summary(part)
    recr = getattr(mem, "mem_recr", mem if header["kind_id"] == 3 else None)
    if recr is not None:
        parts["recr"] = {"cells": recr.size, "cells_used": recr.used,
                         "cells_per_seq": {q: 1 for q in range(recr.n_seq_max)
                                           if recr.seq_pos_max(q) != -1}}
    return {"path": os.fspath(path), "file_bytes": len(data), **{k: v for k, v in header.items()
                                                                 if k != "config"},
            "config": header["config"], "scope": "whole memory" if seq < 0 else f"sequence {seq}",
            "sequences": seqs, "parts": parts, "memory": repr(mem)}


def _kv_parts(mem: Memory) -> List[Tuple[str, Any]]:
    from .hybrid import HybridMemory
    from .kv_cache import KVCache, KVCacheISWA

    attn: Optional[Memory] = mem.mem_attn if isinstance(mem, HybridMemory) else mem
    if isinstance(attn, KVCacheISWA):
        return [("base", attn.base), ("swa", attn.swa)]
    if isinstance(attn, KVCache):
        return [("attn", attn)]
    return []


def format_description(info: Dict[str, Any]) -> str:
    """The text ``llmem inspect`` prints."""
    lines = [
        f"file        {info['path']} ({info['file_bytes']} bytes: header {info['header_bytes']}, "
        f"payload {info['payload_bytes']})",
        f"format      llmem state header v{info['version']}, flags 0x{info['flags']:08x}",
        f"memory      {info['kind']}, {info['scope']}",
    ]
    cfg = info["config"]
    for prefix in ("attn", "base", "swa"):
        if f"{prefix}.kv_size" in cfg:
            lines.append(f"  {prefix:<5}     {cfg[prefix + '.kv_size']} cells x {cfg[prefix + '.n_stream']} "
                         f"stream(s), {cfg[prefix + '.n_layer']} layers, n_seq_max {cfg[prefix + '.n_seq_max']}, "
                         f"type_k {cfg[prefix + '.type_k']}, type_v {cfg[prefix + '.type_v']}, "
                         f"v_trans {cfg[prefix + '.v_trans']}, n_swa {cfg[prefix + '.n_swa']}")
    if "recr.size" in cfg:
        lines.append(f"  recr      {cfg['recr.size']} cells, {cfg['recr.n_layer']} layers "
                     f"({cfg['recr.n_present']} with state), n_seq_max {cfg['recr.n_seq_max']}")
    lines.append(f"sequences   {len(info['sequences'])}")
    for q, (p0, p1) in sorted(info["sequences"].items()):
        cells = ", ".join(f"{name} {part['cells_per_seq'].get(q, 0)}" for name, part in info["parts"].items())
        lines.append(f"  seq {q:<5} positions {p0}..{p1}   cells: {cells}")
    for name, part in info["parts"].items():
        lines.append(f"{name:<11} {part['cells_used']} of {part['cells']} cells used")
    return "\n".join(lines)


def draw_cell_map(info: Dict[str, Any], png: Union[str, "os.PathLike[str]"]) -> None:
    """Draw each attention cache's cells (one row per stream, one colour per sequence, white for
    empty) into a PNG; needs matplotlib (``pip install llmem[plot]``). The cells are those of the
    memory restored from the file: a restore places the saved cells afresh, so the map shows what
    the file holds per stream, not where the cells lay in the memory that wrote it."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    maps = [(name, part["cell_seq"]) for name, part in info["parts"].items() if "cell_seq" in part]
    if not maps:
        raise ValueError("this state has no attention cells to draw")
    fig, axes = plt.subplots(len(maps), 1, figsize=(10, 1.2 + 0.6 * sum(m.shape[0] for _, m in maps)),
                             squeeze=False)
    cmap = matplotlib.colormaps["tab20"].with_extremes(under="white")
    for ax, (name, m) in zip(axes[:, 0], maps):
        ax.imshow(np.where(m < 0, -1, m % 20), aspect="auto", interpolation="nearest", cmap=cmap,
                  vmin=0, vmax=19)
        ax.set_title(f"{name}: {int((m >= 0).sum())} of {m.size} cells used (colour: sequence id)",
                     fontsize=9)
        ax.set_ylabel("stream")
        ax.set_xlabel("cell")
        ax.set_yticks(range(m.shape[0]))
    fig.tight_layout()
    fig.savefig(os.fspath(png), dpi=100)
    plt.close(fig)
