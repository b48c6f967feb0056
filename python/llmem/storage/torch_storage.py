"""torch storage: a memory's tensors are torch tensors on one device (any: CPU, CUDA...), and every
tensor operation of the memory runs there as torch ops, without a host round trip: K/V row
stores, the K-shift (RoPE in float32), cross-stream copies. State bytes move through one pinned
host staging buffer per call, and are byte for byte those of numpy storage.

torch is imported when this module is: ``import llmem`` does not need it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    import torch
    import torch.utils.dlpack
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError("llmem's torch storage needs torch: pip install llmem[torch]") from None

from .base import KShift, StateHole, Storage, rope_tables

__all__ = ["TorchStorage", "TorchKV", "TorchRS", "torch_dtype", "numpy_float_dtype"]

# ggml type ids of the element types torch storage holds
_GGML_OF = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}
_ALIGN = 64  # staging offsets of the sections: any dtype view of them is aligned


def torch_dtype(dtype: Any, name: str) -> "torch.dtype":
    """A ``dtype_k``/``dtype_v`` argument as a torch dtype: a torch dtype, a numpy float dtype or a
    ggml name (``"f32"``, ``"f16"``, ``"bf16"``). Quantized types are refused (TypeError)."""
    if isinstance(dtype, torch.dtype):
        if dtype in _GGML_OF:
            return dtype
        raise TypeError(f"{name}: torch storage holds float32, float16 or bfloat16, got {dtype}")
    if isinstance(dtype, str):
        by_name = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16, "float16": torch.float16,
                   "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype in by_name:
            return by_name[dtype]
        raise TypeError(f"{name}: torch storage holds f32, f16 or bf16, not {dtype!r} (quantized K/V types "
                        "need numpy storage)")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a torch dtype, a numpy float dtype or a type name, got {dtype!r}") from None
    if dt == np.float32:
        return torch.float32
    if dt == np.float16:
        return torch.float16
    raise TypeError(f"{name}: torch storage holds float32, float16 or bfloat16, got {dt}")


def ggml_id(dtype: "torch.dtype") -> int:
    return _GGML_OF[dtype]


@dataclasses.dataclass
class TorchStorage(Storage):
    """Torch tensors on ``device`` (``"cuda:0"``, ``"cpu"``, a ``torch.device``; default: CUDA
    when available, else CPU). ``buffers``: tensors of the caller's to use instead of allocating:
    for a KV cache ``{model layer: (k, v)}`` with the shapes and dtypes ``KVCache.k(il)`` /
    ``KVCache.v(il)`` have (checked); they must be on ``device`` (taken from them when None)."""

    device: Any = None
    buffers: Optional[Dict[int, Tuple["torch.Tensor", "torch.Tensor"]]] = None
    name = "torch"

    def resolved_device(self) -> "torch.device":
        if self.device is not None:
            dev = torch.device(self.device)
        elif self.buffers:
            dev = next(iter(self.buffers.values()))[0].device
        else:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type == "cuda" and dev.index is None:  # "cuda" is the current device: name it
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev


class _Uploader:
    """Host arrays to the device without synchronising it: copied (or filled in place) into one
    of two pinned buffers (reused across steps), then to the device with ``non_blocking``; a
    buffer is refilled only after its previous upload finished (an event, normally long done).
    ``fill`` also reuses one device buffer per pinned buffer (stream order keeps a result valid
    for the work queued before the upload after next)."""

    def __init__(self, device: "torch.device") -> None:
        self.device: torch.device = device
        self.cuda: bool = device.type == "cuda"
        self.bufs: List[Optional["torch.Tensor"]] = [None, None]
        self.dev_bufs: List[Optional["torch.Tensor"]] = [None, None]
        self.events: List[Optional[Any]] = [None, None]
        self.k: int = 0

    def _staging(self, n: int, dtype: "torch.dtype") -> Tuple[int, "torch.Tensor"]:
        """The next pinned buffer's first ``n`` elements, free to write."""
        k = self.k
        self.k ^= 1
        buf = self.bufs[k]
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self.bufs[k] = torch.empty(max(n, 256), dtype=dtype, pin_memory=True)
            self.events[k] = None
        ev = self.events[k]
        if ev is not None:
            ev.synchronize()
        return k, buf[:n]

    def _send(self, k: int, part: "torch.Tensor", dst: Optional["torch.Tensor"]) -> "torch.Tensor":
        if dst is None:
            out = part.to(self.device, non_blocking=True)
        else:
            out = dst.copy_(part, non_blocking=True)
        event = self.events[k]
        if event is None:
            event = self.events[k] = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return out

    def __call__(self, arr: np.ndarray) -> "torch.Tensor":
        host = torch.from_numpy(arr)
        if not self.cuda:
            return host.to(self.device)
        k, part = self._staging(host.numel(), host.dtype)
        part.copy_(host)
        return self._send(k, part, None)

    def fill(self, shape: Tuple[int, ...], dtype: np.dtype, write: Callable[[np.ndarray], Any]) -> "torch.Tensor":
        """A device tensor of ``shape`` whose values ``write(host)`` puts into a host array of that
        shape and numpy ``dtype`` (a pinned buffer on CUDA; on the CPU a new array, shared)."""
        if not self.cuda:
            host = np.empty(shape, dtype=dtype)
            write(host)
            return torch.from_numpy(host)
        n = 1
        for d in shape:
            n *= d
        tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        k, part = self._staging(n, tdtype)
        write(part.numpy().reshape(shape))
        dev = self.dev_bufs[k]
        if dev is None or dev.numel() < n or dev.dtype != tdtype:
            dev = self.dev_bufs[k] = torch.empty(max(n, 256), dtype=tdtype, device=self.device)
        return self._send(k, part, dev[:n]).view(shape)


def as_device_rows(values: Any, n: int, width: int, dtype: "torch.dtype", device: "torch.device",
                   name: str) -> "torch.Tensor":
    """Model rows ``[n, width]`` (or ``[n, heads, head_dim]``) as a tensor of ``dtype`` on
    ``device``: torch tensors (detached: a tensor that requires grad is fine), DLPack objects
    (cupy, jax) and numpy arrays."""
    if not isinstance(values, torch.Tensor):
        if hasattr(values, "__dlpack__") and not isinstance(values, np.ndarray):
            values = torch.utils.dlpack.from_dlpack(values)
        else:
            a = np.asarray(values)
            if a.dtype.kind != "f":
                raise TypeError(f"{name} must hold floats, got {a.dtype}")
            values = torch.from_numpy(np.ascontiguousarray(a))
    t = values.detach()
    if not t.is_floating_point():
        raise TypeError(f"{name} must hold floats, got {t.dtype}")
    if t.dim() < 2 or t.shape[0] != n or t.numel() != n * width:
        raise ValueError(f"{name} must have shape [n_tokens={n}, {width}] (or [n_tokens, n_head, head_dim]), "
                         f"got {tuple(t.shape)}")
    out: torch.Tensor = t.reshape(n, width).to(device=device, dtype=dtype, non_blocking=True)
    return out


def rope_factors(deltas: np.ndarray, rope: Any, device: "torch.device") -> Tuple["torch.Tensor", "torch.Tensor"]:
    """cos and sin per row (``[n, 1, n_rot/2]`` float32 on ``device``) of per-row position deltas:
    the compiled core's tables, one per distinct delta, uploaded once."""
    uniq, inv = np.unique(deltas, return_inverse=True)
    tables = [rope_tables(rope, int(d)) for d in uniq]
    if len(uniq) == 1:  # the usual case: one seq_add moved every cell alike; broadcast one table
        cs, sn = tables[0][0][None], tables[0][1][None]
    else:
        cs = np.stack([t[0] for t in tables])[inv.reshape(-1)]
        sn = np.stack([t[1] for t in tables])[inv.reshape(-1)]
    both = torch.from_numpy(np.ascontiguousarray(np.stack([cs, sn]))).to(device)
    return both[0][:, None, :], both[1][:, None, :]


def rotate_rows(rows: "torch.Tensor", factors: Tuple["torch.Tensor", "torch.Tensor"], rope: Any) -> "torch.Tensor":
    """K rows ``[n, width]`` re-rotated, in float32 as the compiled core does (same tables, same
    products: ``a*c - b*s``, ``a*s + b*c``), returned in the rows' dtype."""
    n, width = rows.shape
    head_dim = int(rope.head_dim or rope.n_rot)
    n_head = width // head_dim
    n_rot, half = int(rope.n_rot), int(rope.n_rot) // 2
    c, s = factors
    x = rows.to(torch.float32, copy=True)
    heads = x[:, :n_head * head_dim].view(n, n_head, head_dim)
    if rope.neox:
        a, b = heads[:, :, :half], heads[:, :, half:n_rot]
    else:
        a, b = heads[:, :, 0:n_rot:2], heads[:, :, 1:n_rot:2]
    na = a * c - b * s
    nb = a * s + b * c
    a.copy_(na)
    b.copy_(nb)
    return x.to(rows.dtype)


def _section_offsets(holes: Sequence[StateHole]) -> Tuple[List[int], int]:
    """Offsets of the holes' sections in one staging buffer (each aligned), and its size."""
    offs, at = [], 0
    for h in holes:
        offs.append(at)
        at += -(-h.nbytes // _ALIGN) * _ALIGN
    return offs, at


def _download_sections(device: "torch.device", holes: Sequence[StateHole], parts: Sequence["torch.Tensor"],
                       out: Any) -> None:
    """State bytes: the gathered sections (uint8 tensors on ``device``) packed on the device, one
    copy to a pinned host buffer, then each written at its hole's offset of ``out``."""
    offs, at = _section_offsets(holes)
    dev = torch.empty(at, dtype=torch.uint8, device=device)
    for b, o in zip(parts, offs):
        dev[o:o + b.numel()].copy_(b)
    host = torch.empty(at, dtype=torch.uint8, pin_memory=device.type == "cuda")
    host.copy_(dev)
    hv, dst = host.numpy(), np.frombuffer(out, dtype=np.uint8)
    for h, o in zip(holes, offs):
        dst[h.offset:h.offset + h.nbytes] = hv[o:o + h.nbytes]


def _upload_sections(device: "torch.device", holes: Sequence[StateHole], data: Any) -> List["torch.Tensor"]:
    """State bytes read: the holes' sections gathered into one pinned host buffer, one copy to
    ``device``; the uint8 section of each hole there, in order."""
    offs, at = _section_offsets(holes)
    src = np.frombuffer(data, dtype=np.uint8)
    host = torch.empty(at, dtype=torch.uint8, pin_memory=device.type == "cuda")
    hv = host.numpy()
    for h, o in zip(holes, offs):
        hv[o:o + h.nbytes] = src[h.offset:h.offset + h.nbytes]
    dev = host.to(device, non_blocking=True)
    return [dev[o:o + h.nbytes] for h, o in zip(holes, offs)]


class TorchKV:
    """The torch tensors of one KV cache and the torch ops of its tensor work."""

    has_tensors = True
    name = "torch"

    def __init__(self, spec: TorchStorage, layers: Sequence[int], n_stream: int, kv_size: int,
                 ek: Sequence[int], ev: Sequence[int], e_vmax: int, v_trans: bool, dtype_k: "torch.dtype",
                 dtype_v: "torch.dtype") -> None:
        self.device: torch.device = spec.resolved_device()
        self.dtype_k: torch.dtype = dtype_k
        self.dtype_v: torch.dtype = dtype_v
        self.v_trans: bool = v_trans
        self.kv_size: int = kv_size
        self.e_vmax: int = e_vmax
        self.n_stream: int = n_stream
        self.k: List["torch.Tensor"] = []
        self.v: List["torch.Tensor"] = []
        given = spec.buffers or {}
        unknown = set(given) - set(layers)
        if unknown:
            raise ValueError(f"TorchStorage buffers name layers {sorted(unknown)} this cache does not store "
                             f"(stored: {list(layers)})")
        for l, il in enumerate(layers):
            k_shape = (n_stream, kv_size, ek[l])
            v_shape = (n_stream, e_vmax, kv_size) if v_trans else (n_stream, kv_size, ev[l])
            if il in given:
                k, v = given[il]
                self._check_buffer(k, k_shape, dtype_k, f"buffers[{il}][0] (K)")
                self._check_buffer(v, v_shape, dtype_v, f"buffers[{il}][1] (V)")
            else:
                k = torch.zeros(k_shape, dtype=dtype_k, device=self.device)
                v = torch.zeros(v_shape, dtype=dtype_v, device=self.device)
            self.k.append(k)
            self.v.append(v)
        self.upload: _Uploader = _Uploader(self.device)
        self._j: Dict[int, "torch.Tensor"] = {}
        self._uploaders: Dict[str, _Uploader] = {}

    def uploader(self, what: str) -> _Uploader:
        """The uploader of one kind of table (``"mask"``, ``"paged"``): its own pinned and device
        buffers, so tables of different dtypes and sizes do not evict each other's."""
        u = self._uploaders.get(what)
        if u is None:
            u = self._uploaders[what] = _Uploader(self.device)
        return u

    def _check_buffer(self, t: Any, shape: Tuple[int, ...], dtype: "torch.dtype", name: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} of shape {list(shape)}, got {t.dtype} {list(t.shape)}")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, the storage on {self.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # -- rows of a micro-batch ------------------------------------------------------------------

    def cpy_k(self, l: int, idx: "torch.Tensor", values: Any, width: int) -> None:
        K = self.k[l]
        rows = as_device_rows(values, idx.numel(), width, self.dtype_k, self.device, "k_cur")
        K.view(-1, K.shape[2]).index_copy_(0, idx, rows)

    def cpy_v(self, l: int, idx: "torch.Tensor", values: Any, width: int) -> None:
        V = self.v[l]
        rows = as_device_rows(values, idx.numel(), width, self.dtype_v, self.device, "v_cur")
        if not self.v_trans:
            V.view(-1, V.shape[2]).index_copy_(0, idx, rows)
            return
        # element (token t, feature j) goes to V[s, j, c] for the token's row s * kv_size + c
        j = self._j.get(width)
        if j is None:
            j = self._j[width] = torch.arange(width, device=self.device, dtype=torch.int64) * self.kv_size
        s = torch.div(idx, self.kv_size, rounding_mode="floor")
        base = s * (self.e_vmax - 1) * self.kv_size + idx  # (s * e_vmax) * kv_size + c
        flat = base[:, None] + j[None, :]
        V.view(-1).index_copy_(0, flat.reshape(-1), rows.reshape(-1))

    # -- updates --------------------------------------------------------------------------------

    def copy_stream(self, src: int, dst: int) -> None:
        for t in self.k + self.v:
            t[dst].copy_(t[src])

    def k_shift(self, shift: KShift, rope: Any) -> None:
        factors = rope_factors(shift.deltas, rope, self.device)
        c0, n = int(shift.cells[0]), len(shift.cells)
        if int(shift.cells[-1]) - c0 + 1 == n:  # one run of cells: rotated in place through a view
            for K in self.k:
                rows = K[shift.stream, c0:c0 + n]
                rows.copy_(rotate_rows(rows, factors, rope))
            return
        cells = torch.from_numpy(shift.cells).to(self.device)
        for K in self.k:
            rows = K[shift.stream].index_select(0, cells)
            K[shift.stream].index_copy_(0, cells, rotate_rows(rows, factors, rope))

    def zero(self) -> None:
        for t in self.k + self.v:
            t.zero_()

    # -- state bytes ----------------------------------------------------------------------------

    def _section(self, h: StateHole, l: int, cells: "torch.Tensor", rope: Any) -> "torch.Tensor":
        if h.kind == "k":
            rows = self.k[l][h.stream].index_select(0, cells)
            if h.shift is not None:  # as the core: only cells that moved (a zero delta may still scale)
                moved = np.flatnonzero(h.shift)
                sel = torch.from_numpy(moved).to(self.device)
                rows.index_copy_(0, sel, rotate_rows(rows.index_select(0, sel),
                                                     rope_factors(h.shift[moved], rope, self.device), rope))
            return rows
        if h.kind == "v":
            return self.v[l][h.stream].index_select(0, cells)
        return self.v[l][h.stream, :h.n_cols].index_select(1, cells)

    def fill(self, out: memoryview, holes: List[Tuple[StateHole, int]], rope: Any) -> None:
        """Write the holes' rows into ``out`` (the state bytes): gathered on the device, one copy
        to a pinned host buffer, then into place."""
        if not holes:
            return
        parts = []
        for h, l in holes:
            cells = torch.from_numpy(h.cells).to(self.device)
            b = self._section(h, l, cells, rope).contiguous().view(-1).view(torch.uint8)
            if b.numel() != h.nbytes:
                raise AssertionError(f"state section of layer {h.layer} ({h.kind}): {b.numel()} bytes, "
                                     f"the writer reserved {h.nbytes}")
            parts.append(b)
        _download_sections(self.device, [h for h, _ in holes], parts, out)

    def scatter(self, data: Any, holes: List[Tuple[StateHole, int]]) -> None:
        """Store the rows of read state bytes: the sections gathered into one pinned host buffer,
        one copy to the device, then scattered into their cells."""
        if not holes:
            return
        sections = _upload_sections(self.device, [h for h, _ in holes], data)
        for (h, l), sec in zip(holes, sections):
            cells = torch.from_numpy(h.cells).to(self.device)
            n = len(h.cells)
            if h.kind == "k":
                K = self.k[l]
                K[h.stream].index_copy_(0, cells, sec.view(self.dtype_k).view(n, K.shape[2]))
            elif h.kind == "v":
                V = self.v[l]
                V[h.stream].index_copy_(0, cells, sec.view(self.dtype_v).view(n, V.shape[2]))
            else:
                self.v[l][h.stream, :h.n_cols].index_copy_(1, cells, sec.view(self.dtype_v).view(h.n_cols, n))


def numpy_float_dtype(dtype: Any, name: str) -> np.dtype:
    """A recurrent state dtype argument (torch or numpy float32/float16) as the numpy dtype the
    compiled core records; bfloat16 has no recurrent type id there (TypeError)."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.float32:
            return np.dtype(np.float32)
        if dtype == torch.float16:
            return np.dtype(np.float16)
        raise TypeError(f"{name}: recurrent states are float32 or float16, got {dtype}")
    out: np.dtype = np.dtype(dtype)
    return out


_TORCH_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


class TorchRS:
    """The torch tensors of one recurrent memory (``[mem_size * (1 + n_rs_seq), width]`` per
    present layer and array) and the torch ops of its row moves."""

    has_tensors = True
    name = "torch"

    def __init__(self, spec: TorchStorage, rows: int, widths_r: Sequence[Optional[int]],
                 widths_s: Sequence[Optional[int]], dtype_r: np.dtype, dtype_s: np.dtype) -> None:
        if spec.buffers:
            raise ValueError("TorchStorage(buffers=...) is for KV caches; a recurrent memory allocates its states")
        self.device: torch.device = spec.resolved_device()
        self.dtype_r: torch.dtype = _TORCH_OF[np.dtype(dtype_r)]
        self.dtype_s: torch.dtype = _TORCH_OF[np.dtype(dtype_s)]
        self.r: List[Optional["torch.Tensor"]] = [
            None if w is None else torch.zeros(rows, w, dtype=self.dtype_r, device=self.device) for w in widths_r]
        self.s: List[Optional["torch.Tensor"]] = [
            None if w is None else torch.zeros(rows, w, dtype=self.dtype_s, device=self.device) for w in widths_s]
        self.upload: _Uploader = _Uploader(self.device)
        self._ckpt: Dict[int, List["torch.Tensor"]] = {}  # checkpoint id -> its r and s rows

    def array(self, kind: int, il: int) -> "torch.Tensor":
        a = (self.s if kind else self.r)[il]
        assert a is not None
        return a

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.r + self.s if t is not None)

    def zero(self) -> None:
        for t in self.r + self.s:
            if t is not None:
                t.zero_()

    def gather(self, A: "torch.Tensor", copies: np.ndarray, n_seqs: int, head: int, rs_z: int, size: int,
               n_rs_seq: int) -> "torch.Tensor":
        """The input states of a micro-batch (the core's gather, in torch): zero row ``rs_z``, read
        the ``s_copy`` rows of the sequence sets, then move the slot's other cells (with their
        rollback planes) into place, every source read before any destination is written."""
        if rs_z >= 0:
            A[rs_z].zero_()
        idx = self.upload(copies.astype(np.int64))
        out = A.index_select(0, idx[:n_seqs])
        n_extra = len(copies) - n_seqs
        if n_extra > 0:
            extra = copies[n_seqs:].astype(np.int64)
            planes = np.arange(1 + n_rs_seq, dtype=np.int64)[:, None]
            src = np.where(planes == 0, extra[None, :], planes * size + extra[None, :] % size).reshape(-1)
            dst = (planes * size + head + n_seqs + np.arange(n_extra, dtype=np.int64)[None, :]).reshape(-1)
            moved = A.index_select(0, torch.from_numpy(src).to(self.device))
            A.index_copy_(0, torch.from_numpy(dst).to(self.device), moved)
        return out

    def rows(self, new: Any, n_seqs: int, A: "torch.Tensor", max_planes: int, name: str) -> "torch.Tensor":
        """New states ``[n_seqs, width]`` or ``[k, n_seqs, width]`` (k <= 1 + n_rs_seq) as
        ``[k, n_seqs, width]`` on the device in the array's dtype (torch, DLPack or numpy)."""
        if not isinstance(new, torch.Tensor):
            new = torch.utils.dlpack.from_dlpack(new) if hasattr(new, "__dlpack__") and not isinstance(new, np.ndarray) \
                else torch.from_numpy(np.ascontiguousarray(np.asarray(new)))
        t = new.detach()
        if not t.is_floating_point():
            raise TypeError(f"{name} states must hold floats, got {t.dtype}")
        width = A.shape[1]
        if t.dim() == 2 and tuple(t.shape) == (n_seqs, width):
            t = t[None]
        elif not (t.dim() == 3 and 1 <= t.shape[0] <= max_planes and tuple(t.shape[1:]) == (n_seqs, width)):
            raise ValueError(f"{name} states must have shape ({n_seqs}, {width}) or (k <= {max_planes}, {n_seqs}, "
                             f"{width}), got {tuple(t.shape)}")
        out: torch.Tensor = t.to(device=self.device, dtype=A.dtype, non_blocking=True)
        return out

    def store(self, A: "torch.Tensor", rows: "torch.Tensor", head: int, size: int) -> None:
        n = rows.shape[1]
        for p in range(rows.shape[0]):
            A[p * size + head:p * size + head + n].copy_(rows[p])

    # -- checkpoints: the rows of one state row, kept on the device (the core's pool keeps the ids,
    #    positions and limits)

    def checkpoint_save(self, cid: int, row: int) -> None:
        """Copy row ``row`` of every present array into checkpoint ``cid`` (device to device)."""
        self._ckpt[cid] = [A[row].clone() for A in self.r + self.s if A is not None]

    def checkpoint_restore(self, cid: int, row: int) -> None:
        """Copy checkpoint ``cid``'s rows into row ``row`` of every present array."""
        for A, saved in zip([A for A in self.r + self.s if A is not None], self._ckpt[cid]):
            A[row].copy_(saved)

    def checkpoint_drop(self, cid: int) -> None:
        self._ckpt.pop(cid, None)

    def checkpoint_clear(self) -> None:
        self._ckpt.clear()

    def _holes(self, holes: List[StateHole], present_index: Sequence[int]) -> List[Tuple[StateHole, "torch.Tensor"]]:
        return [(h, self.array(0 if h.kind == "r" else 1, h.layer)) for h in holes]

    def fill(self, out: Any, holes: List[StateHole], present_index: Sequence[int]) -> None:
        """The r/s rows of state holes: gathered on the device, one copy to pinned host memory."""
        pairs = self._holes(holes, present_index)
        if not pairs:
            return
        parts = [A.index_select(0, torch.from_numpy(h.cells).to(self.device)).contiguous().view(-1).view(torch.uint8)
                 for h, A in pairs]
        _download_sections(self.device, [h for h, _ in pairs], parts, out)

    def scatter(self, data: Any, holes: List[StateHole], present_index: Sequence[int]) -> None:
        pairs = self._holes(holes, present_index)
        if not pairs:
            return
        sections = _upload_sections(self.device, [h for h, _ in pairs], data)
        for (h, A), sec in zip(pairs, sections):
            rows = sec.view(A.dtype).view(len(h.cells), A.shape[1])
            A.index_copy_(0, torch.from_numpy(h.cells).to(self.device), rows)
