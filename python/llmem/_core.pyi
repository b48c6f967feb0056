"""
llmem's compiled core: cells, slot search, batch splitting (private; use llmem)
"""
from __future__ import annotations
import collections.abc
import enum
from llmem.errors import BatchError
from llmem.errors import LlmemError
from llmem.errors import StateError
import numpy
import numpy.typing
import typing
import typing_extensions
__all__: list[str] = ['Batch', 'BatchAllocator', 'BatchError', 'CAPI_VERSION', 'HybridPositions', 'KVCache', 'KVContext', 'LlmemError', 'MemoryLock', 'POS_OPEN', 'SEQ_MAX_LIMIT', 'STATE_FILE_MAGIC', 'STATE_FILE_VERSION', 'STATE_HEADER', 'SWAType', 'StateError', 'Status', 'UBatch', 'collect_state_holes', 'dequantize', 'ggml_types', 'hybrid_decode_step', 'hybrid_init_batch', 'hybrid_state_read', 'kv_decode_step', 'kv_is_masked_swa', 'kv_iswa_decode_step', 'kv_iswa_init_batch', 'kv_k_idxs', 'kv_kq_cells', 'kv_kq_mask', 'kv_paged', 'kv_paged_sizes', 'kv_scatter_v_trans', 'kv_state_read', 'kv_state_read_partial', 'kv_v_idxs', 'quantize', 'quantize_scatter', 'row_size', 'rs_checkpoints', 'rs_context', 'rs_memory', 'seq_pos_source', 'state_config', 'state_header', 'state_header_check', 'status_combine', 'status_is_fail']
class Status(enum.IntEnum):
    """
    Outcome of preparing a memory context (llama.cpp numbering).
    """
    FAILED_COMPUTE = 3
    FAILED_PREPARE = 2
    NO_UPDATE = 1
    SUCCESS = 0
class SWAType(enum.IntEnum):
    """
    Sliding-window attention kinds.
    """
    CHUNKED = 2
    NONE = 0
    STANDARD = 1
    SYMMETRIC = 3
class seq_pos_source:
    """
    Compiled base of every memory: lets the allocator read positions.
    """
class Batch:
    """
    A batch of tokens (or embeddings) for one decode call, in llama.cpp's array form.
    
    token: int32[n] token ids (a value of -1 marks an entry without a token id);
    embd: float32[n, n_embd] embeddings; pos: int32[n] positions (None: each sequence continues from
    the memory's seq_pos_max + 1); seq_id: int32[n] (one sequence per token), int32[n, k], or a list of
    per-token id lists (a token may belong to several sequences); output: bool[n] (None: only the last
    token). Arrays are copied: later changes to them do not affect the batch.
    """
    def __init__(self, token: typing.Any = None, embd: typing.Any = None, pos: typing.Any = None, seq_id: typing.Any = None, output: typing.Any = None) -> None:
        ...
    def __len__(self) -> int:
        ...
    def __repr__(self) -> str:
        ...
    @property
    def embd(self) -> typing.Any:
        ...
    @property
    def n_tokens(self) -> int:
        ...
    @property
    def output(self) -> typing.Any:
        ...
    @property
    def pos(self) -> typing.Any:
        ...
    @property
    def seq_id(self) -> typing.Any:
        """
        Per-token id lists in the order given.
        """
    @property
    def token(self) -> typing.Any:
        ...
class UBatch:
    """
    A micro-batch produced by a split (read-only numpy views that keep the UBatch alive).
    
    When equal_seqs is true the entries form n_seqs sequence sets of n_seq_tokens entries each.
    An empty UBatch (n_tokens == 0, falsy) means the split had nothing more to give.
    """
    def __bool__(self) -> bool:
        ...
    def __len__(self) -> int:
        ...
    def __repr__(self) -> str:
        ...
    @property
    def batch_idx(self) -> typing.Any:
        """
        int32[n_tokens]: index of each entry in the input batch.
        """
    @property
    def embd(self) -> typing.Any:
        """
        float32[n_tokens, n_embd] embeddings, or None.
        """
    @property
    def equal_seqs(self) -> bool:
        ...
    @property
    def n_embd(self) -> int:
        ...
    @property
    def n_pos(self) -> int:
        ...
    @property
    def n_seq_id(self) -> numpy.typing.NDArray[numpy.int32]:
        """
        int32[n_tokens]: how many sequences each entry belongs to.
        """
    @property
    def n_seq_tokens(self) -> int:
        ...
    @property
    def n_seqs(self) -> int:
        ...
    @property
    def n_seqs_unq(self) -> int:
        ...
    @property
    def n_tokens(self) -> int:
        ...
    @property
    def output(self) -> typing.Any:
        """
        bool[n_tokens]: which entries produce an output.
        """
    @property
    def pos(self) -> typing.Any:
        """
        int32[n_tokens] positions ([n_pos, n_tokens], section-major, for M-RoPE).
        """
    @property
    def seq_id(self) -> numpy.typing.NDArray[numpy.int32]:
        """
        int32[n_tokens, max ids]: each entry's ids, primary first, padded with -1.
        """
    @property
    def seq_id_list(self) -> list[typing.Any]:
        """
        Each entry's ids as a list[typing.Any], primary first.
        """
    @property
    def seq_id_unq(self) -> typing.Any:
        """
        int32: the distinct sequence ids of the micro-batch, ascending.
        """
    @property
    def seq_idx(self) -> typing.Any:
        """
        int32[n_seq_max]: rank of each id in seq_id_unq, -1 when absent.
        """
    @property
    def token(self) -> typing.Any:
        """
        int32[n_tokens] token ids, or None for an embedding batch.
        """
class BatchAllocator:
    """
    Validates a batch against a memory and splits it into micro-batches, as llama.cpp does.
    
    init() raises BatchError (with .reason) for a batch llama.cpp refuses and then leaves the allocator
    as it was. The split functions return an empty UBatch when done.
    """
    def __init__(self, n_seq_max: typing.SupportsInt | typing.SupportsIndex, n_vocab: typing.SupportsInt | typing.SupportsIndex | None = None, n_embd: typing.SupportsInt | typing.SupportsIndex | None = None, n_pos_per_embd: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
        ...
    def batch_pos_max(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def batch_pos_min(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def init(self, batch: Batch, memory: typing.Any = None, output_all: bool = False) -> None:
        """
        Validate `batch` (positions checked against and filled from `memory`); raises BatchError.
        """
    def split_equal(self, n_ubatch: typing.SupportsInt | typing.SupportsIndex, sequential: bool = False, keep_tail: typing.SupportsInt | typing.SupportsIndex = 0) -> UBatch:
        """
        Equal-length sequence sets; keep_tail keeps each sequence's last entries together.
        """
    def split_reset(self) -> None:
        """
        Forget the split progress.
        """
    def split_seq(self, n_ubatch: typing.SupportsInt | typing.SupportsIndex) -> UBatch:
        """
        Entries of one sequence set, narrowing to subsets.
        """
    def split_simple(self, n_ubatch: typing.SupportsInt | typing.SupportsIndex) -> UBatch:
        """
        Up to n_ubatch consecutive unused entries (at least one).
        """
    @property
    def has_coupled(self) -> bool:
        ...
    @property
    def n_outputs(self) -> int:
        ...
    @property
    def n_pos_per_embd(self) -> int:
        ...
    @property
    def n_seq_max(self) -> int:
        ...
    @property
    def n_tokens(self) -> int:
        ...
    @property
    def n_used(self) -> int:
        ...
    @property
    def out_ids(self) -> numpy.typing.NDArray[numpy.int32]:
        """
        Batch indices of the outputs, in the order their ubatches were produced.
        """
class KVContext:
    """
    A prepared plan of micro-batches for one KV cache.
    """
    def apply(self) -> bool:
        ...
    def k_idxs(self) -> numpy.typing.NDArray[numpy.int64]:
        """
        Global row of each token in the stacked [n_stream * kv_size] K rows.
        """
    def kq_cells(self, causal: bool = True) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int32]]:
        ...
    def kq_mask(self, causal: bool = True) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def next(self) -> bool:
        ...
    def slot_cells(self) -> numpy.typing.NDArray[numpy.uint32]:
        ...
    def slot_streams(self) -> list[int]:
        ...
    @property
    def applied(self) -> bool:
        ...
    @property
    def has_ubatch(self) -> bool:
        ...
    @property
    def head(self) -> int:
        ...
    @property
    def i_cur(self) -> int:
        ...
    @property
    def n_kv(self) -> int:
        ...
    @property
    def n_ubatches(self) -> int:
        ...
    @property
    def s0(self) -> int:
        ...
    @property
    def s1(self) -> int:
        ...
    @property
    def status(self) -> Status:
        ...
    @property
    def ubatch(self) -> UBatch:
        ...
class KVCache(seq_pos_source):
    """
    The compiled KV cache (cells, slot search, sequence operations, masks, state bytes). The K/V bytes
    live in numpy arrays registered with set_layer_buffers; use llmem.KVCache, which owns them.
    """
    def __init__(self, kv_size: typing.SupportsInt | typing.SupportsIndex, n_seq_max: typing.SupportsInt | typing.SupportsIndex = 1, unified: bool = True, n_pad: typing.SupportsInt | typing.SupportsIndex = 1, n_swa: typing.SupportsInt | typing.SupportsIndex = 0, swa_type: typing.SupportsInt | typing.SupportsIndex = 0, n_pos_per_embd: typing.SupportsInt | typing.SupportsIndex = 1, type_k: typing.SupportsInt | typing.SupportsIndex = 1, type_v: typing.SupportsInt | typing.SupportsIndex = 1, v_trans: bool = True, layer_il: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], n_embd_k: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], n_embd_v: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], n_embd_v_max: typing.SupportsInt | typing.SupportsIndex = 0, rope: typing.Any = None, n_rot_k: typing.SupportsInt | typing.SupportsIndex = 0, n_rot_v: typing.SupportsInt | typing.SupportsIndex = 0, state_format: typing.SupportsInt | typing.SupportsIndex = 4, cell_tokens: bool = False) -> None:
        ...
    def cells(self, stream: typing.SupportsInt | typing.SupportsIndex = 0) -> dict[str, typing.Any]:
        """
        Copy of one stream's cells: pos, shift, n_seq (per cell) and seq_ids (concatenated).
        """
    def check_invariants(self) -> bool:
        ...
    def check_seq_add(self, seq_id: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex, shift: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def check_seq_cp(self, seq_id_src: typing.SupportsInt | typing.SupportsIndex, seq_id_dst: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex = -1, p1: typing.SupportsInt | typing.SupportsIndex = -1) -> None:
        ...
    def check_seq_div(self, seq_id: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex, d: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def check_seq_keep(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def check_seq_rm(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def clear(self, data: bool = True) -> None:
        ...
    def find_slot(self, ubatch: UBatch, cont: bool = False) -> typing.Any:
        """
        Cells the ubatch would take (None: no room); changes nothing.
        """
    def get_can_shift(self) -> bool:
        ...
    def get_has_shift(self) -> bool:
        ...
    def head(self, stream: typing.SupportsInt | typing.SupportsIndex = 0) -> int:
        ...
    def init_batch(self, balloc: BatchAllocator, n_ubatch: typing.SupportsInt | typing.SupportsIndex) -> typing.Any:
        ...
    def init_full(self) -> typing.Any:
        ...
    def k_buffer_bytes(self, layer: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def pending_copy_list(self) -> list[typing.Any]:
        """
        The whole-stream copies (src, dst) the next update() runs, in order.
        """
    def seq_add(self, seq_id: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex, shift: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def seq_cp(self, seq_id_src: typing.SupportsInt | typing.SupportsIndex, seq_id_dst: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex = -1, p1: typing.SupportsInt | typing.SupportsIndex = -1) -> None:
        ...
    def seq_div(self, seq_id: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex, d: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def seq_keep(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def seq_pos_max(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def seq_pos_min(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def seq_pos_tok_le(self, seq_id: typing.SupportsInt | typing.SupportsIndex, pos: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def seq_rm(self, seq_id: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex = -1, p1: typing.SupportsInt | typing.SupportsIndex = -1) -> bool:
        ...
    def set_layer_buffers(self, layer: typing.SupportsInt | typing.SupportsIndex, k: typing.Any, v: typing.Any) -> None:
        """
        Register the K and V arrays of cache layer `layer` (kept alive by the cache).
        """
    def state_clear(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def state_read(self, data: typing.Any, seq_id: typing.SupportsInt | typing.SupportsIndex = -1) -> None:
        """
        kv_state_read of this cache alone: the bytes of any buffer, read in place.
        """
    def state_size(self, seq_id: typing.SupportsInt | typing.SupportsIndex = -1) -> int:
        """
        Bytes state_write(seq_id) returns now.
        """
    def state_write(self, seq_id: typing.SupportsInt | typing.SupportsIndex = -1) -> bytes:
        ...
    def state_write_into(self, buffer: typing.Any, seq_id: typing.SupportsInt | typing.SupportsIndex = -1) -> int:
        """
        Write state_write(seq_id)'s bytes at the start of a writable buffer; returns their number (ValueError, nothing written, when the buffer is smaller).
        """
    def stats_counts(self) -> tuple[list[typing.Any], int, int, int]:
        """
        (cells used per stream, sequences holding cells, tokens placed, K-shifts) for stats().
        """
    def total_bytes(self) -> int:
        ...
    def update(self) -> None:
        """
        Run pending stream copies and the K-shift on the registered K buffers.
        """
    def update_pending(self) -> bool:
        ...
    def usable_in_stream(self, stream: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        Cells a slot search may take in `stream` now (empty, or out of every window).
        """
    def v_buffer_bytes(self, layer: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    @property
    def address(self) -> int:
        """
        This cache's address: the owner column of collect_state_holes.
        """
    @property
    def n_embd_v_max(self) -> int:
        ...
    @property
    def n_layer(self) -> int:
        ...
    @property
    def n_rot_k(self) -> int:
        ...
    @property
    def n_rot_v(self) -> int:
        ...
    @property
    def n_seq_ids(self) -> int:
        ...
    @property
    def n_seq_max(self) -> int:
        ...
    @property
    def n_stream(self) -> int:
        ...
    @property
    def pending_copies(self) -> int:
        ...
    @property
    def size(self) -> int:
        ...
    @property
    def state_format(self) -> int:
        ...
    @property
    def used(self) -> int:
        ...
class rs_context:
    """
    One plan of a recurrent memory (private; use the context llmem.RecurrentMemory returns).
    """
    def apply(self) -> bool:
        ...
    def gather(self, kind: typing.SupportsInt | typing.SupportsIndex, layer: typing.SupportsInt | typing.SupportsIndex, out: numpy.ndarray[typing.Any, numpy.dtype[typing.Any]]) -> None:
        """
        Write the input states of the ubatch's sets for one array (once per ubatch) into out.
        """
    def mark_gathered(self, kind: typing.SupportsInt | typing.SupportsIndex, layer: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        A buffer-less memory's gather: the checks and the once-per-micro-batch mark; the storage moves the rows.
        """
    def mark_stored(self, kind: typing.SupportsInt | typing.SupportsIndex, layer: typing.SupportsInt | typing.SupportsIndex, n_planes: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        A buffer-less memory's store: the checks (and the gather mark); the storage writes the rows.
        """
    def next(self) -> bool:
        ...
    def s_copy_all(self) -> numpy.typing.NDArray[numpy.int32]:
        ...
    def store(self, kind: typing.SupportsInt | typing.SupportsIndex, layer: typing.SupportsInt | typing.SupportsIndex, rows: numpy.ndarray[typing.Any, numpy.dtype[typing.Any]], max_planes: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Write new states (n_seqs rows, or k planes of them) into the ubatch's cells.
        """
    @property
    def applied(self) -> bool:
        ...
    @property
    def head(self) -> int:
        ...
    @property
    def is_full(self) -> bool:
        ...
    @property
    def n_rs(self) -> int:
        ...
    @property
    def n_seqs(self) -> int:
        ...
    @property
    def n_ubatches(self) -> int:
        ...
    @property
    def rs_z(self) -> int:
        ...
    @property
    def status(self) -> Status:
        ...
    @property
    def ubatch(self) -> typing.Any:
        ...
class rs_memory(seq_pos_source):
    """
    The cell bookkeeping of llama.cpp's recurrent-state memory (private; use llmem.RecurrentMemory).
    """
    def __init__(self, size: typing.SupportsInt | typing.SupportsIndex, n_seq_max: typing.SupportsInt | typing.SupportsIndex, n_rs_seq: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def attach_buffers(self, n_layer_total: typing.SupportsInt | typing.SupportsIndex, r: collections.abc.Sequence[numpy.ndarray[typing.Any, numpy.dtype[typing.Any]]], s: collections.abc.Sequence[numpy.ndarray[typing.Any, numpy.dtype[typing.Any]]], type_r: typing.SupportsInt | typing.SupportsIndex, type_s: typing.SupportsInt | typing.SupportsIndex, p: collections.abc.Sequence[typing.Any] = []) -> None:
        """
        Use these numpy arrays (one r and one s per present layer, and optionally one p or None each) as the state.
        """
    def attach_geometry(self, n_layer_total: typing.SupportsInt | typing.SupportsIndex, r_row_bytes: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], s_row_bytes: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], type_r: typing.SupportsInt | typing.SupportsIndex, type_s: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        No arrays (a storage holds the rows): only the row sizes of each present layer.
        """
    def cells(self) -> dict[str, typing.Any]:
        ...
    def check_seq_add(self, seq: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex, shift: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Raise what seq_add would raise; changes nothing.
        """
    def check_seq_div(self, seq: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex, d: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Raise what seq_div would raise; changes nothing.
        """
    def clear(self, data: bool) -> None:
        ...
    def init_batch(self, balloc: BatchAllocator, n_ubatch: typing.SupportsInt | typing.SupportsIndex, embd_all: bool) -> typing.Any:
        ...
    def init_full(self) -> typing.Any:
        ...
    def init_update(self) -> typing.Any:
        ...
    def rs_idx(self) -> numpy.typing.NDArray[numpy.uint32]:
        ...
    def seq_add(self, seq: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex, shift: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def seq_cp(self, seq_src: typing.SupportsInt | typing.SupportsIndex, seq_dst: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def seq_div(self, seq: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex, d: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def seq_keep(self, seq: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def seq_pos_max(self, seq: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def seq_pos_min(self, seq: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def seq_rm(self, seq: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def seq_state_row(self, seq: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        Row of seq's current state in every present layer's arrays (a pending rollback: the snapshot it selects); -1 when seq holds none.
        """
    def set_b11549_rules(self, on: bool, no_layers: bool) -> None:
        """
        seq_rm as llama.cpp b11549 (shared-cell rollback refused; a layerless memory moves the position only).
        """
    def state_read(self, data: typing_extensions.Buffer, seq: typing.SupportsInt | typing.SupportsIndex, flags: typing.SupportsInt | typing.SupportsIndex, offset: typing.SupportsInt | typing.SupportsIndex = 0, whole_buffer: bool = True) -> int:
        """
        Read a recurrent block at `offset`; returns the bytes used. Raises StateError, unchanged.
        """
    def state_write(self, seq: typing.SupportsInt | typing.SupportsIndex, flags: typing.SupportsInt | typing.SupportsIndex) -> bytes:
        ...
    @property
    def address(self) -> int:
        """
        This memory's address: the owner column of collect_state_holes.
        """
    @property
    def b11549_rules(self) -> bool:
        ...
    @property
    def head(self) -> int:
        ...
    @property
    def n(self) -> int:
        ...
    @property
    def n_rs_seq(self) -> int:
        ...
    @property
    def n_seq_max(self) -> int:
        ...
    @property
    def n_seqs_present(self) -> int:
        """
        Number of sequence ids that hold a cell (for stats()).
        """
    @property
    def rs_z(self) -> int:
        ...
    @property
    def size(self) -> int:
        ...
    @property
    def tokens_placed(self) -> int:
        ...
    @property
    def used(self) -> int:
        ...
class rs_checkpoints:
    """
    A bounded pool of recurrent-state checkpoints (private; use RecurrentMemory.checkpoint_*).
    """
    def __init__(self, mem: rs_memory, max_count: typing.SupportsInt | typing.SupportsIndex, max_bytes: typing.SupportsInt | typing.SupportsIndex, copy_rows: bool = True) -> None:
        ...
    def clear(self) -> None:
        ...
    def contains(self, id: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def drop(self, id: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def has_room(self) -> bool:
        ...
    def pos(self, id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def restore(self, mem: rs_memory, id: typing.SupportsInt | typing.SupportsIndex, seq: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def save(self, mem: rs_memory, seq: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def set_limits(self, max_count: typing.SupportsInt | typing.SupportsIndex, max_bytes: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def bytes_used(self) -> int:
        ...
    @property
    def checkpoint_bytes(self) -> int:
        ...
    @property
    def copies_rows(self) -> bool:
        ...
    @property
    def count(self) -> int:
        ...
    @property
    def max_bytes(self) -> int:
        ...
    @property
    def max_count(self) -> int:
        ...
class HybridPositions(seq_pos_source):
    """
    Positions of a hybrid memory: max of the minima, min of the maxima.
    """
    def __init__(self, attn: typing.Any, recr: typing.Any) -> None:
        ...
    def seq_pos_max(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def seq_pos_min(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
class MemoryLock:
    """
    The re-entrant lock of an llmem memory (memory.lock), shared with the C API.
    
    Used like threading.RLock (acquire/release/with); C code reaches the same mutex through llmem._core._C_API without the GIL.
    """
    def __init__(self) -> None:
        ...
    def __enter__(self) -> bool:
        ...
    def __exit__(self, *args: object) -> None:
        ...
    def _is_owned(self) -> bool:
        """
        Whether the calling thread holds the lock.
        """
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ...
    def locked(self) -> bool:
        """
        Whether any thread holds the lock.
        """
    def release(self) -> None:
        """
        Release the lock once (RuntimeError if not held by this thread).
        """
def _decode_step_fast_layout(kind: typing.Any, context_type: typing.Any, /) -> typing.Any:
    """
    Whether the decode step builds context_type ('kv' or 'iswa' kind) from its slots, without calling it.
    """
def _time_core(memory: typing.Any, op: str, seqs: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], p0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], repeat: typing.SupportsInt | typing.SupportsIndex = 1) -> float:
    """
    Bench only: nanoseconds per call of op (seq_pos_max, seq_rm_tail, decode_step) on a KVCache's core.
    """
def collect_state_holes(call: typing.Any, buffer: typing.Any) -> tuple[typing.Any, numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int64]]:
    """
    Run call() with a state hole log open on this thread; returns (call's result, holes, cells), offsets relative to buffer (None: to the bytes call() returns). holes: int64 [n, 10] rows (owner address, offset in buffer, bytes, cache layer, kind 0 K rows / 1 V rows / 2 V transposed / 3 r rows / 4 s rows, row stream, cell stream, V columns, first cell, cell count); cells: int64 cell indices the rows reference.
    """
def dequantize(type: typing.SupportsInt | typing.SupportsIndex, src: numpy.ndarray[typing.Any, numpy.dtype[typing.Any]], n: typing.SupportsInt | typing.SupportsIndex, out: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> None:
    """
    Rows of `type` (the last axis one contiguous row; up to two outer axes of any stride) to float32.
    """
def ggml_types() -> list[typing.Any]:
    """
    The K/V types of the compiled core: (ggml id, name, block size, block bytes, quantized).
    """
def hybrid_decode_step(base: typing.Any, swa: typing.Any, recr: typing.Any, positions: typing.Any, seq_ids: typing.Any, tokens: typing.Any = None) -> tuple[typing.Any, ...]:
    """
    A hybrid memory's decode step (init_batch + apply of its first micro-batch) in one call: (base context, swa context or None, recurrent context), applied.
    """
def hybrid_init_batch(balloc: BatchAllocator, n_ubatch: typing.SupportsInt | typing.SupportsIndex, embd_all: bool, base: KVCache, swa: KVCache, recr: typing.Any) -> tuple[typing.Any, ...]:
    """
    Split once and prepare the recurrent memory and the attention cache(s): (status, base context, swa context or None, recurrent context).
    """
def hybrid_state_read(caches: collections.abc.Sequence[KVCache], recr: typing.Any, data: typing_extensions.Buffer, seq_id: typing.SupportsInt | typing.SupportsIndex, flags: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Read attention sections then the recurrent section, all or nothing (StateError).
    """
def kv_decode_step(cache: typing.Any, seq_ids: typing.Any, tokens: typing.Any, context_type: typing.Any, /) -> typing.Any:
    """
    One token per sequence planned and applied in one call, under cache._lock (see llmem.KVCache.decode_step): the context context_type(cache, KVContext, version, k_idxs) would make, or None when the step takes several micro-batches.
    """
def kv_is_masked_swa(n_swa: typing.SupportsInt | typing.SupportsIndex, swa_type: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex) -> bool:
    ...
def kv_iswa_decode_step(mem: typing.Any, seq_ids: typing.Any, tokens: typing.Any, context_type: typing.Any, iswa_context_type: typing.Any, /) -> typing.Any:
    """
    The decode step of a KVCacheISWA in one call: iswa_context_type(mem, base context, swa context), or None when the step takes several micro-batches.
    """
def kv_iswa_init_batch(base: KVCache, swa: KVCache, balloc: BatchAllocator, n_ubatch: typing.SupportsInt | typing.SupportsIndex) -> tuple[typing.Any, typing.Any]:
    """
    init_batch of an iSWA pair: (base context, swa context).
    """
def kv_k_idxs(ctx: KVContext, out: typing.Any = None) -> typing.Any:
    ...
def kv_kq_cells(ctx: KVContext, causal: bool = True, offsets: typing.Any = None, cells: typing.Any = None) -> tuple[typing.Any, ...]:
    """
    Per-token visible cells: (offsets int64[n_tokens + 1], cells int32[...]), into buffers when given.
    """
def kv_kq_mask(ctx: KVContext, causal: bool = True, out: typing.Any = None, f16: bool = False, pad: typing.SupportsInt | typing.SupportsIndex = 1) -> typing.Any:
    """
    Dense KQ mask of the current micro-batch into out (or a new array): [n_groups * rows, n_kv].
    """
def kv_paged(ctx: KVContext, causal: bool = True, out: typing.Any = None) -> tuple[typing.Any, ...]:
    """
    Paged-attention form of the current micro-batch: 9 int32 arrays (see llmem.PagedKV).
    """
def kv_paged_sizes(ctx: KVContext, causal: bool = True) -> tuple[int, int, int]:
    """
    (n_tokens, n_seqs, n_pages) of the paged form.
    """
def kv_scatter_v_trans(v: typing.Any, values: typing.Any, k_idxs: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], kv_size: typing.SupportsInt | typing.SupportsIndex, n_stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Write token rows into transposed V: v[s, j, c] = values[t, j] for row k_idxs[t] = s*kv_size + c.
    """
def kv_state_read(caches: collections.abc.Sequence[KVCache], data: typing.Any, seq_id: typing.SupportsInt | typing.SupportsIndex = -1) -> None:
    """
    Read consecutive KV sections into the caches, all or nothing (StateError on failure).
    """
def kv_state_read_partial(caches: collections.abc.Sequence[KVCache], data: typing.Any, offset: typing.SupportsInt | typing.SupportsIndex, seq_id: typing.SupportsInt | typing.SupportsIndex = -1) -> int:
    """
    As kv_state_read from `offset`, allowing bytes after the sections; returns the end offset.
    """
def kv_v_idxs(ctx: KVContext, out: typing.Any = None) -> typing.Any:
    ...
def quantize(type: typing.SupportsInt | typing.SupportsIndex, src: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], out: numpy.ndarray[typing.Any, numpy.dtype[typing.Any]]) -> None:
    """
    Rows of float32 (last axis) to rows of `type` written into `out` (uint8, C-contiguous).
    """
def quantize_scatter(type: typing.SupportsInt | typing.SupportsIndex, dst: numpy.ndarray[typing.Any, numpy.dtype[typing.Any]], src: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], rows: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> None:
    """
    dst row rows[t] = src row t converted to `type` (the cpy_k / cpy_v of a block-typed buffer).
    """
def row_size(type: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    ggml_row_size: bytes of a row of n elements of `type`.
    """
def state_config(kind: typing.SupportsInt | typing.SupportsIndex, caches: collections.abc.Sequence[KVCache], recr: typing.Any) -> list[typing.Any]:
    """
    The configuration record a header of this memory holds: [(name, value), ...].
    """
def state_header(kind: typing.SupportsInt | typing.SupportsIndex, caches: collections.abc.Sequence[KVCache], recr: typing.Any, seq_id: typing.SupportsInt | typing.SupportsIndex, flags: typing.SupportsInt | typing.SupportsIndex, payload: typing_extensions.Buffer) -> bytes:
    """
    The versioned header for `payload` (raw state bytes of this memory): magic, version, kind, flags, scope, configuration record, payload length and CRC-32.
    """
def state_header_check(kind: typing.SupportsInt | typing.SupportsIndex, caches: collections.abc.Sequence[KVCache], recr: typing.Any, data: typing_extensions.Buffer, seq_id: typing.SupportsInt | typing.SupportsIndex, flags: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Check the versioned header against this memory and the read; returns the payload offset (StateError naming the first mismatch).
    """
def status_combine(a: Status, b: Status) -> Status:
    """
    Status of a context made of two: the first failure wins (a before b); otherwise SUCCESS if either succeeded, else NO_UPDATE.
    """
def status_is_fail(status: Status) -> bool:
    """
    True for FAILED_PREPARE and FAILED_COMPUTE.
    """
CAPI_VERSION: int = 1
POS_OPEN: int = 2147483647
SEQ_MAX_LIMIT: int = 65536
STATE_FILE_MAGIC: bytes
STATE_FILE_VERSION: int = 1
STATE_HEADER: int = 2147483648
_C_API: typing.Any
__version__: str = '0.1.0'
