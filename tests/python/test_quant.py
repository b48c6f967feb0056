"""The K/V block types: llmem's quantizers give ggml's reference bytes, bit for bit.

The oracle is the ``gguf`` package's numpy implementation of ggml's quantizers
(``gguf.quants``), on many random rows and on edge values (zeros, constant blocks, huge and tiny
magnitudes, exact halves, one outlier per block). ``gguf.quants`` has no iq4_nl quantizer, so
iq4_nl is compared with a slow float32 transcription of ggml's reference
(``quantize_row_iq4_nl_ref``, ntry -1, no importance weights) written here from the source, and
its dequantizer with gguf's.
"""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants as gq  # noqa: E402

import llmem  # noqa: E402
from llmem import _core  # noqa: E402
from llmem.ggml_types import GGML_TYPES, dequantize, ggml_type, quantize  # noqa: E402

BLOCK_TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
GGUF_Q = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1,
          "iq4_nl": Q.IQ4_NL, "f16": Q.F16, "bf16": Q.BF16, "f32": Q.F32}


def _rows(seed: int, n_rows: int = 64, n: int = 256) -> np.ndarray:
    """Rows of many kinds, 32-value blocks of each kind side by side."""
    rng = np.random.default_rng(seed)
    kinds = [
        rng.standard_normal((n_rows, n)),
        rng.uniform(-1, 1, (n_rows, n)) * 10.0 ** rng.integers(-6, 6, (n_rows, 1)),
        rng.standard_normal((n_rows, n)) * 1e4,
        rng.standard_normal((n_rows, n)) * 1e30,            # huge (the scale overflows f16: inf)
        rng.standard_normal((n_rows, n)) * 1e-20,           # tiny but normal
        np.round(rng.standard_normal((n_rows, n)) * 8) / 2,  # exact halves: rounding ties
        rng.integers(-3, 4, (n_rows, n)).astype(np.float64),  # few levels, repeated maxima
        np.abs(rng.standard_normal((n_rows, n))),          # one sign only
        -np.abs(rng.standard_normal((n_rows, n))),
    ]
    out = np.concatenate(kinds).astype(np.float32)
    # blocks with one outlier, all-zero blocks, constant blocks, +/- max-magnitude pairs
    out[0:8, 0] = 1e6
    out[8:16, 32:64] = 0.0
    out[16:24, 64:96] = 0.75
    out[24:32, 96:128] = -3.0
    out[32:40, 128] = np.float32(3e38)
    out[32:40, 129] = np.float32(-3e38)
    out[40:48, 160:192] = np.float32(65504.0)
    return out


@pytest.mark.parametrize("name", BLOCK_TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_matches_gguf(name: str, seed: int) -> None:
    rows = _rows(seed)
    with np.errstate(all="ignore"):
        want = gq.quantize(rows, GGUF_Q[name])
    got = quantize(rows, name)
    assert got.dtype == np.uint8 and got.shape == want.shape
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert bad.size == 0, f"{name}: {bad.size} rows differ from gguf.quants, first row {bad[0]}"


@pytest.mark.parametrize("name", BLOCK_TYPES + ["iq4_nl"])
def test_dequantize_matches_gguf(name: str) -> None:
    rng = np.random.default_rng(7)
    t = GGML_TYPES[name]
    blocks = rng.integers(0, 256, (200, 4 * t.type_size), dtype=np.uint8)
    # finite scales (random bytes would give NaN/inf f16 scales)
    for b in range(4):
        off = b * t.type_size
        blocks[:, off:off + 2] = rng.standard_normal(200).astype(np.float16).view(np.uint8).reshape(200, 2)
        if name in ("q4_1", "q5_1"):
            blocks[:, off + 2:off + 4] = rng.standard_normal(200).astype(np.float16).view(np.uint8).reshape(200, 2)
    want = gq.dequantize(blocks, GGUF_Q[name])
    got = dequantize(blocks, name)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["f16", "bf16", "f32"])
def test_float_types_match_gguf(name: str) -> None:
    rows = _rows(3)[:, :64]
    got = quantize(rows, name)
    with np.errstate(over="ignore"):  # huge values overflow f16 to inf, in both
        want = gq.quantize(rows, GGUF_Q[name])
    np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
    np.testing.assert_array_equal(dequantize(got, name), gq.dequantize(want, GGUF_Q[name]).astype(np.float32))


# -- iq4_nl: a float32 transcription of ggml's reference --------------------------------------

_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def _nearest(v: np.float32) -> int:
    if v <= _IQ4NL[0]:
        return 0
    if v >= _IQ4NL[15]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if v < _IQ4NL[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if np.float32(v - _IQ4NL[hi - 1]) < np.float32(_IQ4NL[hi] - v) else hi


def _iq4nl_reference(row: np.ndarray) -> bytes:
    f = np.float32
    out = bytearray()
    levels = [0] * 32  # ggml keeps its level array across the blocks of one row
    for b in range(0, row.size, 32):
        x = row[b:b + 32].astype(np.float32)
        amax, mx = f(0), f(0)
        for v in x:
            if abs(v) > amax:
                amax, mx = f(abs(v)), v
        d = f(0)
        if not amax < f(1e-15):
            idv = f(1) / f(mx / f(-127))
            sumqx, sumq2 = f(0), f(0)
            for j, v in enumerate(x):
                lv = _nearest(f(idv * v))
                levels[j] = lv
                q = _IQ4NL[lv]
                w = f(v * v)
                sumqx = f(sumqx + f(f(w * q) * v))
                sumq2 = f(sumq2 + f(f(w * q) * q))
            d = f(sumqx / sumq2) if sumq2 > 0 else f(0)
        out += np.float16(d).tobytes()
        out += bytes(levels[j] | (levels[j + 16] << 4) for j in range(16))
    return bytes(out)


def test_iq4_nl_matches_reference() -> None:
    rows = _rows(11, n_rows=6)
    with np.errstate(all="ignore"):
        got = quantize(rows, "iq4_nl")
        for i, row in enumerate(rows):
            assert got[i].tobytes() == _iq4nl_reference(row), f"iq4_nl row {i} differs"


# -- the table, sizes, errors ---------------------------------------------------------------

def test_one_table() -> None:
    core = {name: (tid, blck, size, q) for tid, name, blck, size, q in _core.ggml_types()}
    py = {t.name: (t.id, t.block_size, t.type_size, t.quantized) for t in GGML_TYPES.values()}
    assert core == py
    for t in GGML_TYPES.values():
        assert t.id == int(GGUF_Q[t.name])
        want_blck, want_size = gguf.GGML_QUANT_SIZES[GGUF_Q[t.name]]
        assert (t.block_size, t.type_size) == (want_blck, want_size)
        assert _core.row_size(t.id, 4096) == t.row_size(4096)


def test_type_names() -> None:
    assert ggml_type("Q8_0").id == 8
    assert ggml_type(20).name == "iq4_nl"
    assert ggml_type(np.float16).name == "f16"
    assert ggml_type("bfloat16").name == "bf16"
    with pytest.raises(ValueError, match="q3_k"):
        ggml_type("q3_k")
    with pytest.raises(ValueError, match="12"):
        ggml_type(12)
    with pytest.raises(ValueError, match="multiple"):
        quantize(np.zeros((2, 48), np.float32), "q8_0")
    with pytest.raises(TypeError, match="floats"):
        quantize(np.zeros((2, 32), np.int32), "q8_0")


def test_quantize_dequantize_error_bounds() -> None:
    """Round trips stay within each type's step (max error of a block: half a step, q4_0/q5_0 a
    full step at the far end, iq4_nl its widest gap)."""
    rows = np.random.default_rng(5).standard_normal((32, 128)).astype(np.float32)
    amax = np.abs(rows.reshape(32, 4, 32)).max(axis=2, keepdims=True)
    for name, rel in [("q8_0", 0.5 / 127 * 1.01), ("q5_0", 1 / 16 * 1.01), ("q5_1", 1 / 31 * 1.01),
                      ("q4_0", 1 / 8 * 1.01), ("q4_1", 1 / 15 * 1.01), ("iq4_nl", 0.2)]:
        back = dequantize(quantize(rows, name), name)
        err = np.abs(back - rows).reshape(32, 4, 32)
        assert (err <= rel * 2 * amax).all(), name
    assert llmem.dequantize is dequantize and llmem.quantize is quantize
