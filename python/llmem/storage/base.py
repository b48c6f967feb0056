"""The storage interface and the data a bookkeeping-only memory hands to its caller."""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

__all__ = ["Storage", "StateHole", "StateHoles", "KShift", "KVUpdateOps", "rope_tables", "BOOKKEEPING",
           "resolve_storage", "HOLE_KINDS"]

#: kind column of the compiled core's hole log
HOLE_KINDS = ("k", "v", "v_trans", "r", "s")


class Storage:
    """Where a memory's tensors live. Subclasses: :class:`NumpyStorage`, :class:`TorchStorage`;
    ``None`` (or the string ``"none"``) means no tensors at all (bookkeeping-only)."""

    name = "abstract"


class _Bookkeeping(Storage):
    name = "none"

    def __repr__(self) -> str:
        return "BOOKKEEPING"


#: The bookkeeping-only storage (what ``storage=None`` and ``storage="none"`` resolve to).
BOOKKEEPING = _Bookkeeping()


def resolve_storage(storage: Any, device: Any = None) -> Storage:
    """A ``storage=`` argument (``"numpy"``, ``"torch"``, ``None``/``"none"`` or a
    :class:`Storage`) with ``device=`` as a :class:`Storage`."""
    from .numpy_storage import NumpyStorage
    if isinstance(storage, Storage):
        if device is not None and storage.name != "torch":
            raise ValueError(f"device={device!r} needs torch storage, got storage={storage!r}")
        if device is not None and getattr(storage, "device", None) is not None:
            raise ValueError("give the device either to TorchStorage(device=...) or as device=, not both")
        if device is not None:
            from .torch_storage import TorchStorage
            return TorchStorage(device=device, buffers=getattr(storage, "buffers", None))
        return storage
    if storage is None or storage == "none":
        if device is not None:
            raise ValueError(f"device={device!r} needs torch storage; a bookkeeping-only memory has no tensors")
        return BOOKKEEPING
    if storage == "numpy":
        if device is not None:
            raise ValueError(f"device={device!r} needs storage='torch' (numpy storage lives on the host)")
        return NumpyStorage()
    if storage == "torch":
        from .torch_storage import TorchStorage
        return TorchStorage(device=device)
    raise ValueError(f"storage must be 'numpy', 'torch', None/'none' or a llmem.storage.Storage, got {storage!r}")


class StateHole(NamedTuple):
    """A tensor data section of state bytes that the caller's tensors fill (``state_write``) or
    take (``state_read``).

    * ``offset``, ``nbytes``: where in the state bytes;
    * ``layer``: the model layer id; ``kind``: ``"k"`` (``len(cells)`` K rows, in ``cells`` order),
      ``"v"`` (V rows) or ``"v_trans"`` (transposed V: for each of the first ``n_cols`` features,
      the elements of ``cells`` in order, i.e. ``V[stream, :n_cols, cells]`` row-major), or for a
      recurrent memory ``"r"``/``"s"`` (rows ``cells`` of the layer's r or s array, absolute
      row indices, rollback planes included);
    * ``stream``: the stream whose rows these are (writing: the source of any pending
      cross-stream copy, as the copy's bytes are the ones that count);
    * ``cells``: int64 cell indices within the stream;
    * ``shift``: writing only: int32 position deltas of a pending K-shift of these cells (K rows
      are written as if the shift were applied: rotate them first), or None.
    """

    offset: int
    nbytes: int
    layer: int
    kind: str
    stream: int
    cells: np.ndarray
    n_cols: int
    shift: Optional[np.ndarray]


class StateHoles(NamedTuple):
    """State bytes with their tensor sections left for the caller (``state_write_holes``), or
    the sections of read bytes to scatter (``state_read_holes``: ``data`` is the input).

    ``clear_first``: reading a whole-cache state replaces every row: rows of cells not in the
    state are zeroed by a numpy cache (optional for the caller: they hold no cell).
    ``copies_first``: reading ran the pending cross-stream copies ``(src, dst)``: run them on
    the tensors before scattering."""

    data: Any
    holes: List[StateHole]
    clear_first: bool = False
    copies_first: Tuple[Tuple[int, int], ...] = ()


class KShift(NamedTuple):
    """A K-shift of one stream: re-rotate the K rows of ``cells`` by ``deltas`` (int32, position
    differences) with the cache's :class:`~llmem.Rope` (``rope_tables`` gives cos/sin)."""

    stream: int
    cells: np.ndarray
    deltas: np.ndarray


class KVUpdateOps(NamedTuple):
    """The tensor work of one ``init_update().apply()``, in order: the whole-stream copies
    ``(src, dst)`` (every layer's K and V of stream ``src`` copied to ``dst``), then the K-shifts."""

    copies: Tuple[Tuple[int, int], ...]
    k_shift: Tuple[KShift, ...]
    rope: Any


def _f32(x: float) -> float:
    return float(np.float32(x))


def rope_tables(rope: Any, delta: int) -> Tuple[np.ndarray, np.ndarray]:
    """cos and sin (float32, ``n_rot / 2`` each, attention factor included) of a position shift by
    ``delta``, bit for bit the compiled core's tables (ggml's rope with the YaRN ramp). A row
    rotates pairs ``(a, b)`` (``2k, 2k+1``, or ``k, k + n_rot/2`` for NeoX) of each head to
    ``(a*c - b*s, a*s + b*c)`` in float32."""
    n_rot = int(rope.n_rot)
    half = n_rot // 2
    freq_base, freq_scale = _f32(rope.freq_base), _f32(rope.freq_scale)
    ext, attn = _f32(rope.ext_factor), _f32(rope.attn_factor)
    theta_scale = math.pow(freq_base, -2.0 / n_rot)
    low = high = 0.0
    if ext != 0.0:
        def dim(rot: float) -> float:
            return n_rot * math.log(float(rope.n_ctx_orig) / (rot * 2.0 * math.pi)) / (2.0 * math.log(freq_base))
        low = max(0.0, math.floor(dim(_f32(rope.beta_fast))))
        high = min(n_rot - 1.0, math.ceil(dim(_f32(rope.beta_slow))))
    cs = np.empty(half, np.float32)
    sn = np.empty(half, np.float32)
    for k in range(half):
        extrap = float(delta) * math.pow(theta_scale, float(k))
        interp = freq_scale * extrap
        theta = interp
        m = attn
        if ext != 0.0:
            y = (k - low) / max(0.001, high - low)
            ramp = 1.0 - min(1.0, max(0.0, y))
            mix = ramp * ext
            theta = interp * (1.0 - mix) + extrap * mix
            m *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
        cs[k] = math.cos(theta) * m
        sn[k] = math.sin(theta) * m
    return cs, sn


def holes_from_log(holes: np.ndarray, cells: np.ndarray, owner: int, layers: List[int],
                   shifts: Optional[Dict[int, np.ndarray]] = None) -> List[StateHole]:
    """The compiled core's hole rows of one cache as :class:`StateHole` s."""
    out = []
    for row in holes:
        if int(row[0]) != owner:
            continue
        at, n = int(row[8]), int(row[9])
        cs = cells[at:at + n]
        kind = HOLE_KINDS[int(row[4])]
        shift = None
        if shifts is not None and kind == "k":
            d = shifts.get(int(row[6]))
            if d is not None:
                sel = d[cs]
                shift = sel if sel.any() else None
        out.append(StateHole(int(row[1]), int(row[2]), layers[int(row[3])], kind, int(row[5]), cs, int(row[7]),
                             shift))
    return out
