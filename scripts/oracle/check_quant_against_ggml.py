"""Compare llmem's quantizers with ggml's compiled reference ones (quantize_row_*_ref of a built
libggml-base, e.g. llama-cpp-python 0.3.36's), row by row on the edge-value rows of
tests/python/test_quant.py. Run from the repository root with llmem importable:

    python scripts/oracle/check_quant_against_ggml.py /path/to/libggml-base.so.0

(An all-zero iq4_nl block is compared without its nibbles: ggml leaves its scratch array there.)
"""
import ctypes, sys, numpy as np
sys.path.insert(0, "tests/python")
import llmem
from test_quant import _rows
lib = ctypes.CDLL(sys.argv[1])
fp = ctypes.POINTER(ctypes.c_float)
total = {}
for name in ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]:
    f = getattr(lib, f"quantize_row_{name}_ref"); f.restype = None
    f.argtypes = [fp, ctypes.c_void_p, ctypes.c_int64]
    bad = n = 0
    for seed in range(4):
        with np.errstate(all="ignore"):
            rows = np.ascontiguousarray(_rows(seed))
        mine = llmem.quantize(rows, name)
        for i, row in enumerate(rows):
            out = np.zeros(mine.shape[1], np.uint8)
            f(row.ctypes.data_as(fp), out.ctypes.data, row.size)
            n += 1
            if name == "iq4_nl":
                # an all-zero block's nibbles are whatever ggml's scratch held: compare values
                # bytes equal except the nibbles of blocks whose scale is 0 (ggml leaves its scratch there)
                a, b = out.reshape(-1, 18), mine[i].reshape(-1, 18)
                zero = (a[:, :2].view(np.uint16)[:, 0] & 0x7FFF) == 0
                same = np.array_equal(a[:, :2], b[:, :2]) and np.array_equal(a[~zero], b[~zero])
            else:
                same = np.array_equal(out, mine[i])
            bad += not same
    print(f"{name}: {n} rows of 256 against ggml's {name} reference (libggml-base of llama-cpp-python 0.3.36): {bad} differ")
