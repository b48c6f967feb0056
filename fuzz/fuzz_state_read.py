"""atheris harness over the Python state API (state_read of every memory type, raw and with the
versioned header). The C++ driver fuzz/state_read_fuzz.cpp covers the core under ASan/UBSan at a
million inputs; this one covers the Python layer above it (argument handling, byte views, the
header wrapping in python/llmem) with coverage feedback from atheris.

    python fuzz/fuzz_state_read.py -atheris_runs=20000          # pip install atheris

Each input picks a memory type, a scope, flags and a seed blob written by the memory itself, then
overwrites, truncates or extends it with the fuzzer's bytes. A read must either raise StateError /
ValueError / TypeError and leave the memory bit-identical, or succeed and leave a memory that
writes and reads itself back to the same bytes. Anything else is reported as a crash.
"""

from __future__ import annotations

import hashlib
import sys

import atheris

with atheris.instrument_imports():
    import numpy as np

    import llmem
    from llmem import (Batch, HybridISWAMemory, HybridMemory, KVCache, KVCacheISWA, RecurrentMemory, StateError,
                       SWAType)


def _kv():
    return KVCache(2, 4, 4, 16, n_seq_max=3, dtype_k=np.float16, dtype_v=np.float32, v_trans=False)


def _kv_streams():
    return KVCache(1, 4, 2, 8, n_seq_max=3, unified=False)


def _iswa():
    return KVCacheISWA(n_layer=3, n_embd_k_gqa=4, n_embd_v_gqa=4, kv_size=16, n_seq_max=3, n_swa=2,
                       swa_type=SWAType.STANDARD, swa_full=True, is_swa_layer=[True, False, True])


def _recurrent():
    return RecurrentMemory(n_layer=2, n_embd_r=3, n_embd_s=[2, 5], mem_size=3, n_seq_max=3, n_rs_seq=1)


def _hybrid():
    attn = KVCache(2, 4, 4, 16, n_seq_max=3, layer_filter=lambda il: il == 0)
    recr = RecurrentMemory(2, [0, 3], [0, 2], mem_size=3, n_seq_max=3, layer_filter=lambda il: il == 1)
    return HybridMemory(attn=attn, recr=recr, is_recurrent_layer=[False, True])


def _hybrid_iswa():
    attn = KVCacheISWA(n_layer=3, n_embd_k_gqa=4, n_embd_v_gqa=4, kv_size=16, n_seq_max=3, n_swa=2,
                       swa_type=SWAType.STANDARD, swa_full=True, is_swa_layer=[True, False, False],
                       layer_filter=lambda il: il < 2)
    recr = RecurrentMemory(3, [0, 0, 3], [0, 0, 2], mem_size=3, n_seq_max=3, layer_filter=lambda il: il == 2)
    return HybridISWAMemory(attn=attn, recr=recr, is_recurrent_layer=[False, False, True])


MAKERS = [_kv, _kv_streams, _iswa, _recurrent, _hybrid, _hybrid_iswa]
FLAGS = [0, 1, llmem.STATE_HEADER, llmem.STATE_HEADER | 1]


def _filled(make, lengths):
    mem = make()
    for s, n in enumerate(lengths):
        if n:
            for _ in mem.init_batch(Batch(token=np.zeros(n, np.int32), seq_id=np.full(n, s, np.int32)), 4):
                pass
    return mem


def _fingerprint(mem):
    return hashlib.sha256(mem.state_write(-1) + repr(mem.cells()).encode()).hexdigest()


# seeds and targets are built once; a target is rebuilt only after it accepted an input
SOURCES = [_filled(make, (3, 2, 1)) for make in MAKERS]
TARGETS = [_filled(make, (1, 0, 4)) for make in MAKERS]
BASELINES = [_fingerprint(t) for t in TARGETS]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    k = fdp.ConsumeIntInRange(0, len(MAKERS) - 1)
    write_seq = fdp.ConsumeIntInRange(-1, 2)
    flags = FLAGS[fdp.ConsumeIntInRange(0, len(FLAGS) - 1)]
    read_seq = fdp.ConsumeIntInRange(-1, 2) if write_seq >= 0 else -1
    read_flags = FLAGS[fdp.ConsumeIntInRange(0, len(FLAGS) - 1)] if fdp.ConsumeBool() else flags
    try:
        blob = bytearray(SOURCES[k].state_write(write_seq, flags))
    except (ValueError, llmem.LlmemError):
        return  # e.g. PARTIAL_ONLY where the memory has no partial layout
    at = fdp.ConsumeIntInRange(0, len(blob))
    patch = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
    blob[at:at + len(patch)] = patch
    if fdp.ConsumeBool():
        del blob[fdp.ConsumeIntInRange(0, len(blob)):]
    blob += fdp.ConsumeBytes(fdp.remaining_bytes())

    target = TARGETS[k]
    try:
        target.state_read(bytes(blob), read_seq, read_flags)
    except (StateError, ValueError, TypeError):
        if _fingerprint(target) != BASELINES[k]:
            raise AssertionError("a refused state_read changed the memory")
        return
    again = target.state_write(-1, llmem.STATE_HEADER)
    fresh = MAKERS[k]()
    fresh.state_read(again, -1, llmem.STATE_HEADER)
    if fresh.state_write(-1, llmem.STATE_HEADER) != again:
        raise AssertionError("an accepted state does not round-trip")
    TARGETS[k] = _filled(MAKERS[k], (1, 0, 4))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
