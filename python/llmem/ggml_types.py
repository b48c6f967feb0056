"""The ggml types a K/V buffer can hold: one table of names, ids and sizes.

The float types ``f32``, ``f16``, ``bf16`` are stored element by element (numpy ``float32``,
``float16``, and ``uint16`` bit patterns for bfloat16); the block types llama.cpp offers for its
cache (``-ctk``/``-ctv``: ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``iq4_nl``) are stored
as ggml lays them out, blocks of 32 values in a ``uint8`` row. The compiled core holds the same
table (``_core.ggml_types()``); the tests check that both agree.

:func:`quantize` and :func:`dequantize` convert float rows to and from any of these types with
ggml's reference quantizers (bit for bit) and dequantizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import numpy.typing as npt

__all__ = ["GGMLType", "GGML_TYPES", "ggml_type", "row_size", "quantize", "dequantize"]


@dataclass(frozen=True)
class GGMLType:
    """One ggml type: ``name`` (as llama.cpp prints it), ggml ``id``, ``block_size`` values per
    block, ``type_size`` bytes per block, and the numpy dtype a buffer of it uses."""

    name: str
    id: int
    block_size: int
    type_size: int
    storage: np.dtype

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    def row_size(self, n: int) -> int:
        """ggml_row_size: bytes of ``n`` values (``n`` a multiple of the block size)."""
        if n % self.block_size:
            raise ValueError(f"a row of {self.name} holds whole blocks of {self.block_size} values; "
                             f"{n} is not a multiple of it")
        return n // self.block_size * self.type_size


_U8, _U16 = np.dtype(np.uint8), np.dtype(np.uint16)

#: name -> type, in ggml id order
GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("f32", 0, 1, 4, np.dtype(np.float32)),
    GGMLType("f16", 1, 1, 2, np.dtype(np.float16)),
    GGMLType("q4_0", 2, 32, 18, _U8),
    GGMLType("q4_1", 3, 32, 20, _U8),
    GGMLType("q5_0", 6, 32, 22, _U8),
    GGMLType("q5_1", 7, 32, 24, _U8),
    GGMLType("q8_0", 8, 32, 34, _U8),
    GGMLType("iq4_nl", 20, 32, 18, _U8),
    GGMLType("bf16", 30, 1, 2, _U16),
)}
_BY_ID = {t.id: t for t in GGML_TYPES.values()}
_ALIASES = {"float32": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16"}
_SUPPORTED = ", ".join(GGML_TYPES)


#: What names a ggml type: its name, its id, a numpy dtype or scalar type, or the :class:`GGMLType`.
GGMLTypeLike = Union[str, int, np.dtype, type, GGMLType]


def ggml_type(value: GGMLTypeLike, what: str = "type") -> GGMLType:
    """The :class:`GGMLType` of a name (``"q8_0"``, ``"F16"``, ``"bfloat16"``...), a ggml type id,
    a numpy dtype (``float32``, ``float16``; ``uint16`` and an ``ml_dtypes.bfloat16`` mean bf16)
    or a GGMLType. ``ValueError``/``TypeError`` naming ``what`` otherwise."""
    if isinstance(value, GGMLType):
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be a ggml type name, id or numpy dtype, got {value!r}")
    if isinstance(value, (int, np.integer)):
        t = _BY_ID.get(int(value))
        if t is None:
            raise ValueError(f"{what}: unsupported ggml type id {int(value)} (supported: "
                             + ", ".join(f"{t.id} = {t.name}" for t in GGML_TYPES.values()) + ")")
        return t
    if isinstance(value, str):
        key = value.strip().lower()
        t = GGML_TYPES.get(_ALIASES.get(key, key))
        if t is None:
            raise ValueError(f"{what}: unsupported type {value!r} (supported: {_SUPPORTED})")
        return t
    try:
        dt = np.dtype(value)
    except TypeError:
        raise TypeError(f"{what} must be a ggml type name ({_SUPPORTED}), id or numpy dtype, "
                        f"got {value!r}") from None
    if dt == np.float32:
        return GGML_TYPES["f32"]
    if dt == np.float16:
        return GGML_TYPES["f16"]
    if dt == np.uint16 or dt.name == "bfloat16":
        return GGML_TYPES["bf16"]
    raise ValueError(f"{what}: unsupported type {dt} (supported: {_SUPPORTED})")


def row_size(type_: GGMLTypeLike, n: int) -> int:
    """Bytes of a row of ``n`` values of ``type_``."""
    return ggml_type(type_).row_size(int(n))


def quantize(values: npt.ArrayLike, type_: GGMLTypeLike, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Float rows (the last axis) to rows of ``type_``: a block type gives ``uint8`` rows of
    ``row_size`` bytes laid out as ggml's blocks, bit for bit what ggml's reference quantizer
    writes; ``f16``/``bf16``/``f32`` give their elements (bf16 as uint16 bits). ``out`` (C-contiguous,
    the right size) is written instead of a new array."""
    from . import _core

    t = ggml_type(type_, "type")
    a = np.asarray(values)
    if a.dtype.kind != "f":
        raise TypeError(f"values must hold floats, got {a.dtype}")
    if a.ndim < 1:
        raise ValueError("values must have at least one dimension")
    a = np.ascontiguousarray(a, dtype=np.float32)
    n = a.shape[-1]
    shape = a.shape[:-1] + ((t.row_size(n),) if t.quantized else (n,))
    if out is None:
        out = np.empty(shape, dtype=t.storage)
    elif not isinstance(out, np.ndarray) or out.dtype != t.storage or out.shape != shape:
        raise ValueError(f"out must be a {t.storage} array of shape {shape}")
    _core.quantize(t.id, a, out.view(np.uint8))
    return out


def dequantize(data: npt.ArrayLike, type_: GGMLTypeLike, n: Optional[int] = None,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows of ``type_`` back to float32 (ggml's dequantizer): ``data`` ``[..., row bytes]``
    (``uint8``) for a block type, ``[..., n]`` of the storage dtype for a float type; up to two
    outer axes of any stride (a view over some cells is fine). Returns ``[..., n]`` float32."""
    from . import _core

    t = ggml_type(type_, "type")
    a = np.asarray(data)
    if a.dtype != t.storage:
        raise TypeError(f"{t.name} data must be {t.storage}, got {a.dtype}")
    if a.ndim < 1 or a.ndim > 3:
        raise ValueError(f"data must have 1 to 3 dimensions, got {a.ndim}")
    if t.quantized:
        n_vals = a.shape[-1] // t.type_size * t.block_size if n is None else int(n)
        if t.row_size(n_vals) != a.shape[-1]:
            raise ValueError(f"a {t.name} row of {n_vals} values has {t.row_size(n_vals)} bytes, "
                             f"data rows have {a.shape[-1]}")
    else:
        n_vals = a.shape[-1]
    shape = a.shape[:-1] + (n_vals,)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape
          or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    if a.size == 0:
        return out
    if a.strides[-1] != a.itemsize and a.shape[-1] > 1:
        a = np.ascontiguousarray(a)
    _core.dequantize(t.id, a.view(np.uint8), n_vals, out)
    return out
