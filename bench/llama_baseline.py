"""llama.cpp's own memory layer as a baseline, driven through llama-cpp-python's C API (ctypes).

``LlamaMemory(n_cells, n_seq_max)`` writes a tiny random-weight llama GGUF (one layer, one KV head
of 16 dims: the cache bookkeeping is what is measured, not the model), creates a context with
``n_ctx = n_cells`` and one unified KV stream, and exposes the ``llama_memory_*`` sequence calls and
``llama_state_seq_get_data``/``set_data``.

Filling a million cells through ``llama_decode`` would cost the attention of every token over
every earlier one (hours on this machine), so the cache is filled by *restoring* per-sequence
state blobs that llmem writes: llmem's state bytes are llama.cpp's (checked against recordings of
this same llama.cpp in tests/data/oracle), so llama.cpp places the cells with its own slot search
and ends up with the same cells llmem holds.

``available()`` is False when ``llama_cpp`` cannot be imported (it is the optional ``bench``
extra: ``pip install llmem[bench]``, a build of several minutes); the suite then says so and runs
the other baselines.
"""

from __future__ import annotations

import ctypes
import struct
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

LLAMA_CPP_VERSION = "0.3.36"
N_VOCAB = 32
N_EMBD = 16  # one head of 16 dims; K and V rows are 32 bytes in f16
SEQ_STATE_MAGIC = 0xAF143CD8  # llama_state_seq_get_data's header: this, then the seq id (i32)
LLAMA_MAX_SEQ = 256  # llama.cpp's compile-time limit on sequences per context

_lib = None
_import_error: Optional[str] = None
_log_callback = None  # keeps the ctypes callback alive


def _load():
    global _lib, _import_error, _log_callback
    if _lib is not None or _import_error is not None:
        return _lib
    try:
        import gguf  # noqa: F401  (writes the benchmark model)
        import llama_cpp
    except Exception as exc:  # ImportError, or a broken shared library
        _import_error = f"{type(exc).__name__}: {exc}"
        return None

    @llama_cpp.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ANN001  (llama.cpp logs every context creation)
        return None

    _log_callback = _quiet
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _lib = llama_cpp
    return _lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str:
    _load()
    return _import_error or ""


def version() -> str:
    lib = _load()
    return getattr(lib, "__version__", "?") if lib is not None else ""


def write_tiny_model(path: Path) -> Path:
    """A one-layer llama with random f32 weights; the vocabulary is gguf's "test" tokenizer."""
    import gguf

    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("llmem-bench-tiny")
    w.add_uint32("llama.vocab_size", N_VOCAB)
    w.add_uint32("llama.context_length", 1 << 20)
    w.add_uint32("llama.embedding_length", N_EMBD)
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.feed_forward_length", N_EMBD)
    w.add_uint32("llama.attention.head_count", 1)
    w.add_uint32("llama.attention.head_count_kv", 1)
    w.add_uint32("llama.rope.dimension_count", N_EMBD)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("test")
    w.add_token_list([f"tok_{i}" for i in range(N_VOCAB)])
    w.add_token_scores([0.0] * N_VOCAB)
    w.add_token_types([int(gguf.TokenType.NORMAL)] * N_VOCAB)

    def tensor(name: str, *shape: int, norm: bool = False) -> None:
        data = np.ones(shape, np.float32) if norm else rng.normal(0, 0.1, shape).astype(np.float32)
        w.add_tensor(name, data)

    tensor("token_embd.weight", N_VOCAB, N_EMBD)
    tensor("output_norm.weight", N_EMBD, norm=True)
    tensor("output.weight", N_VOCAB, N_EMBD)
    tensor("blk.0.attn_norm.weight", N_EMBD, norm=True)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        tensor(f"blk.0.{name}.weight", N_EMBD, N_EMBD)
    tensor("blk.0.ffn_norm.weight", N_EMBD, norm=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def wrap_blob(seq: int, memory_blob: bytes) -> bytes:
    """A context-level sequence state around the memory part (what llmem's state_write gives):
    llama.cpp's context adds an 8-byte header (magic, source seq id)."""
    return struct.pack("<Ii", SEQ_STATE_MAGIC, seq) + memory_blob


_model_path: Optional[Path] = None
_model = None


def model_path() -> Path:
    global _model_path
    if _model_path is None:
        folder = Path(tempfile.mkdtemp(prefix="llmem-bench-"))
        _model_path = write_tiny_model(folder / "tiny-llama.gguf")
    return _model_path


def _get_model():
    global _model
    lib = _load()
    if _model is None:
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        _model = lib.llama_model_load_from_file(str(model_path()).encode(), params)
        if not _model:
            raise RuntimeError("llama.cpp could not load the benchmark model")
    return _model


def llmem_twin(n_cells: int, n_seq_max: int):
    """The llmem memory llama.cpp builds for the benchmark model and this context."""
    import llmem

    return llmem.from_gguf(str(model_path()), n_ctx=n_cells, n_seq_max=n_seq_max, n_ubatch=n_seq_max,
                           n_batch=n_seq_max, flash_attn=True)


class LlamaMemory:
    """A llama.cpp context over the tiny model: ``n_ctx = n_cells``, one unified KV stream,
    micro-batches of n_seq_max tokens (the compute buffers grow with n_ctx x n_ubatch)."""

    def __init__(self, n_cells: int, n_seq_max: int) -> None:
        lib = _load()
        if lib is None:
            raise RuntimeError("llama_cpp is not importable: " + (_import_error or ""))
        self.lib = lib
        p = lib.llama_context_default_params()
        p.n_ctx = n_cells
        p.n_batch = p.n_ubatch = n_seq_max  # llama.cpp reserves one output per sequence
        p.n_seq_max = n_seq_max
        p.kv_unified = True
        # flash attention: the reserved compute buffers stay small at a million cells (no
        # n_ctx x n_ubatch KQ matrix); V is then stored like K (not transposed) in both
        p.flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.n_threads = p.n_threads_batch = 1
        p.no_perf = True
        self.ctx = lib.llama_init_from_model(_get_model(), p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp failed to create a context of {n_cells} cells")
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_cells = n_cells
        self.n_seq_max = n_seq_max

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        self.close()

    # -- the calls measured ------------------------------------------------------------------
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(self.lib.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        self.lib.llama_memory_seq_keep(self.mem, seq)

    def seq_add(self, seq: int, p0: int, p1: int, shift: int) -> None:
        self.lib.llama_memory_seq_add(self.mem, seq, p0, p1, shift)

    def seq_pos_max(self, seq: int) -> int:
        return int(self.lib.llama_memory_seq_pos_max(self.mem, seq))

    def seq_pos_min(self, seq: int) -> int:
        return int(self.lib.llama_memory_seq_pos_min(self.mem, seq))

    def state_size(self, seq: int) -> int:
        return int(self.lib.llama_state_seq_get_size(self.ctx, seq))

    def state_get(self, seq: int, buf) -> int:
        """Write sequence ``seq``'s state into ``buf`` (a ctypes byte array); bytes written."""
        return int(self.lib.llama_state_seq_get_data(self.ctx, buf, len(buf), seq))

    def state_set(self, seq: int, buf, n: int) -> int:
        """Restore ``seq`` from the first ``n`` bytes of ``buf``; bytes read (0 = failure)."""
        return int(self.lib.llama_state_seq_set_data(self.ctx, buf, n, seq))

    def load_blob(self, seq: int, blob: bytes) -> None:
        """Restore ``seq`` from the memory part of a sequence state (what llmem's state_write
        gives)."""
        blob = wrap_blob(seq, blob)
        buf = (ctypes.c_uint8 * max(len(blob), 1)).from_buffer_copy(blob or b"\0")
        if self.state_set(seq, buf, len(blob)) != len(blob):
            raise RuntimeError(f"llama.cpp refused the state of sequence {seq}")

    def fill_from(self, twin, seqs) -> None:
        """Give llama.cpp the cells ``twin`` (an llmem memory of the same model) holds for
        ``seqs``, by restoring twin's per-sequence state blobs."""
        for s in seqs:
            self.load_blob(s, twin.state_write(s))


if __name__ == "__main__":  # smoke test: python bench/llama_baseline.py
    import time

    import llmem

    if not available():
        print("llama_cpp not available:", unavailable_reason())
        raise SystemExit(0)
    for n_cells, n_seqs in ((4096, 4), (65536, 64), (1 << 20, 256)):
        t0 = time.perf_counter()
        twin = llmem_twin(n_cells, n_seqs)
        per = n_cells // 2 // n_seqs
        b = llmem.Batch(token=np.zeros(per * n_seqs, np.int32),
                        seq_id=np.repeat(np.arange(n_seqs, dtype=np.int32), per),
                        output=np.zeros(per * n_seqs, bool))
        for _ in twin.init_batch(b, 1 << 20):
            pass
        t1 = time.perf_counter()
        lm = LlamaMemory(n_cells, n_seqs)
        t2 = time.perf_counter()
        lm.fill_from(twin, range(n_seqs))
        t3 = time.perf_counter()
        print(n_cells, n_seqs, "twin %.2fs ctx %.2fs fill %.2fs" % (t1 - t0, t2 - t1, t3 - t2),
              [lm.seq_pos_max(s) for s in range(3)], twin.seq_pos_max(0))
        t0 = time.perf_counter_ns()
        lm.seq_rm(0, per - 1, -1)
        print("  seq_rm tail %.1f us" % ((time.perf_counter_ns() - t0) / 1e3))
        lm.close()
