"""Smoke test of an installed llmem wheel (run from any directory, by scripts/wheel_check.sh and
cibuildwheel): the compiled core loads, one decode step, a state round trip through a file with
the versioned header (zlib's CRC-32), the CLI entry point."""

import os
import subprocess
import sys
import tempfile

import numpy as np

import llmem

assert "site-packages" in llmem.__file__, f"llmem imported from {llmem.__file__}, not an installed wheel"
cache = llmem.KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=64, n_seq_max=2)
batch = llmem.Batch(token=np.arange(6, dtype=np.int32), seq_id=np.array([0, 0, 0, 1, 1, 1], np.int32))
ctx = cache.init_batch(batch, n_ubatch=4)
for ub in ctx:
    for il in range(2):
        ctx.cpy_k(il, np.ones((ub.n_tokens, 8), np.float16))
        ctx.cpy_v(il, np.ones((ub.n_tokens, 8), np.float16))
assert cache.used == 6 and cache.seq_pos_max(1) == 2
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "seq0.llmem")
    cache.save(path, 0)
    cache.seq_rm(0)
    cache.load(path, 0)
assert cache.seq_pos_max(0) == 2
stats = cache.stats()
assert stats["cells_used"] == 6 and stats["sequences"] == 2, stats
script = os.path.join(os.path.dirname(sys.executable), "llmem")  # the console entry point
out = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
assert llmem.__version__ in out.stdout, out.stdout
print(f"llmem {llmem.__version__} wheel OK on Python {sys.version.split()[0]} ({llmem.__file__})")
