#pragma once

#include "llmem/common.h"
#include "llmem/seq_pos_source.h"
#include "llmem/status.h"
#include "llmem/ubatch.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace llmem {

class batch_allocr;
class rs_context;

/// ggml type ids of the state dtypes llmem supports (the numbers written in state bytes).
constexpr int32_t RS_TYPE_F32 = 0;
constexpr int32_t RS_TYPE_F16 = 1;

/// State flags (llama_state_seq_flags): PARTIAL_ONLY is ignored by a recurrent memory; ON_DEVICE
/// requires the written cells to be contiguous.
constexpr uint32_t RS_STATE_PARTIAL_ONLY = 1;
constexpr uint32_t RS_STATE_ON_DEVICE    = 2;

/// State arrays per layer a context gathers and stores: 0 r, 1 s, 2 p (where the layer has one).
constexpr int RS_KINDS = 3;

/// One recurrent state cell. `ids` is kept ascending; a cell is empty when it has no ids.
struct rs_cell {
    int32_t pos  = -1;  // last position of the sequences held
    int32_t src  = -1;  // row the state is read from at the next computation (-1: zeros)
    int32_t src0 = -1;  // row staged by the last find_slot for the computation
    std::vector<int32_t> ids;

    bool empty() const { return ids.empty(); }
    bool has(int32_t seq) const {
        return ids.size() == 1 ? ids[0] == seq : std::binary_search(ids.begin(), ids.end(), seq);
    }
};

/// The caller-owned state arrays of a recurrent memory. Every present layer has an R and an S
/// array of (1 + n_rs_seq) * size rows, row-major; a row width may be 0.
///
/// Some layers also keep a P array (llama.cpp's p_l, "cache_ple_r_l": the conv history of a
/// per-layer-embedding module), of type_r and with as many rows. `p` and `p_row_bytes` are either
/// empty (no layer has one) or list every present layer, 0 bytes / null for layers without.
struct rs_buffers {
    uint32_t n_layer_total = 0;          // the model's layer count, present or not
    int32_t  type_r = RS_TYPE_F32;
    int32_t  type_s = RS_TYPE_F32;
    std::vector<uint64_t>  r_row_bytes;  // per present layer, ascending layer index
    std::vector<uint64_t>  s_row_bytes;
    std::vector<uint8_t *> r;            // row 0 of each present layer's R array
    std::vector<uint8_t *> s;
    std::vector<uint64_t>  p_row_bytes;  // per present layer (or empty): 0 where there is no P
    std::vector<uint8_t *> p;

    /// Bytes of a P row of present layer `l`; 0 when it has no P array.
    uint64_t p_bytes(size_t l) const { return l < p_row_bytes.size() ? p_row_bytes[l] : 0; }
};

/// llama.cpp's recurrent-state memory (llama_memory_recurrent): one cell per sequence holding
/// its last position, copy-on-write sharing after seq_cp, and bounded rollback planes.
///
/// The cell bookkeeping takes the same decisions as llama.cpp (cells chosen, swaps, s_copy
/// sources, rs_z, return values). Sequence operations on one sequence are O(1) in the number
/// of cells; find_slot is O(n_seqs) plus the free-cell search. Failed calls change nothing.
class rs_memory : public seq_pos_source {
public:
    /// size >= 1 cells, n_seq_max in [1, SEQ_MAX_LIMIT], n_rs_seq rollback planes (0: none).
    /// Throws std::invalid_argument otherwise.
    rs_memory(uint32_t size, int32_t n_seq_max, uint32_t n_rs_seq);
    ~rs_memory() override;

    rs_memory(const rs_memory &) = delete;
    rs_memory & operator=(const rs_memory &) = delete;

    /// Use `bufs` for state reads, writes and clear(data); the arrays must outlive the memory
    /// (or the next attach). Throws std::invalid_argument when the description is inconsistent.
    void attach_buffers(const rs_buffers & bufs);

    // -- sequences ---------------------------------------------------------------------------

    /// Forget every sequence and pending rollback; `data` also zero-fills every state array.
    void clear(bool data);
    /// llama.cpp's seq_rm: false for seq outside [0, n_seq_max) or >= size, and for a cut into
    /// the end of a sequence that cannot be rolled back; true otherwise (also when nothing moved).
    bool seq_rm(int32_t seq, int32_t p0, int32_t p1);
    /// Share src's cell with dst (the range is ignored); ids outside [0, size) do nothing.
    void seq_cp(int32_t seq_src, int32_t seq_dst, int32_t p0, int32_t p1);
    /// Remove every sequence except `seq` (any value accepted).
    void seq_keep(int32_t seq);
    /// Add `shift` to the tail position if it lies in [p0, p1). Throws std::invalid_argument
    /// (nothing changed) if the position would leave int32.
    void seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t shift);
    /// Divide the tail position by d (toward zero) if it lies in [p0, p1). Throws
    /// std::invalid_argument for d == 0 or an overflowing division.
    void seq_div(int32_t seq, int32_t p0, int32_t p1, int32_t d);
    /// Throw what seq_add/seq_div would throw, changing nothing (for the hybrid memories, which
    /// check both parts before changing either).
    void check_seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t shift) const;
    void check_seq_div(int32_t seq, int32_t p0, int32_t p1, int32_t d) const;
    /// Position of the sequence's state, -1 if it has none (any id accepted). O(1).
    int32_t seq_pos_min(int32_t seq) const override;
    /// As seq_pos_min, but never below -1 (llama.cpp's maximum starts at -1). O(1).
    int32_t seq_pos_max(int32_t seq) const override;

    // -- micro-batches -----------------------------------------------------------------------

    /// Place an equal-split ubatch: every sequence set gets a private cell, the slot is made
    /// contiguous from `head`, and src0/rs_z/n are staged for the computation. False (after
    /// possibly un-sharing ids of earlier sets, as llama.cpp) if an id is outside [0, size).
    /// Throws std::invalid_argument for a ubatch without equal_seqs.
    bool find_slot(const ubatch & ub);
    /// Dry run of find_slot over `ubs` in order; the cells, used and head are left exactly as
    /// they were (n and rs_z keep the last dry run's values, as llama.cpp). True if all fit.
    bool prepare(const std::vector<ubatch> & ubs);
    /// Split with llama.cpp's recurrent rule and prepare; the context is FAILED_PREPARE when the
    /// batch cannot be split entirely or does not fit. Never changes the memory.
    std::unique_ptr<rs_context> init_batch(batch_allocr & balloc, uint32_t n_ubatch, bool embd_all);
    /// A SUCCESS context over the whole memory (graph reservation).
    std::unique_ptr<rs_context> init_full();
    /// Always NO_UPDATE: a recurrent memory has no pending work.
    std::unique_ptr<rs_context> init_update();

    /// The row the computation reads for slot cell `k` (head + k), consuming a pending rollback
    /// of the cell's smallest id. `head_base` is the head the slot starts at.
    int32_t s_copy(uint32_t head_base, uint32_t k);

    // -- state bytes -------------------------------------------------------------------------

    /// Bytes state_write(seq, flags) produces. Throws std::invalid_argument for seq outside
    /// [-1, n_seq_max) or unknown flags, llmem::error where llama.cpp aborts (sharers with
    /// different rollback planes, ON_DEVICE over non-contiguous cells).
    size_t state_write_size(int32_t seq, uint32_t flags) const;
    /// Write the recurrent block into `out`, which holds exactly state_write_size() bytes.
    void state_write(uint8_t * out, size_t n_out, int32_t seq, uint32_t flags) const;
    /// Read a recurrent block from the start of `data`; returns the bytes it used. Throws
    /// state_error (memory, metadata and buffers untouched) for anything unreadable, and, with
    /// whole_buffer, for bytes left over after the block.
    size_t state_read(const uint8_t * data, size_t n_data, int32_t seq, uint32_t flags, bool whole_buffer = false);

    // -- inspection --------------------------------------------------------------------------

    uint32_t size()      const { return size_; }
    int32_t  n_seq_max() const { return n_seq_max_; }
    uint32_t n_rs_seq()  const { return n_rs_seq_; }

    /// llama.cpp b11549's seq_rm rules (b11312 when off, the default here): a rollback of a cell
    /// shared by several sequences returns false instead of rewinding it for all of them, and a
    /// memory that keeps no layer (`no_layers`) rolls back by moving the position only.
    void set_b11549_rules(bool on, bool no_layers) {
        b11549_rules_ = on;
        no_layers_    = no_layers;
    }
    bool b11549_rules() const { return b11549_rules_; }
    uint32_t head()      const { return head_; }
    uint32_t used()      const { return used_; }
    uint32_t n()         const { return n_; }
    int32_t  rs_z()      const { return rs_z_; }
    const rs_cell & cell(uint32_t i) const { return cells_[i]; }
    /// Cell holding sequence `seq` (llama.cpp's cells[seq].tail), -1 if none or seq >= size.
    int32_t tail(int32_t seq) const;
    /// Pending rollback depth of `seq` (0: none); seq must be in [0, n_seq_max).
    uint32_t rs_idx(int32_t seq) const { return rs_idx_[size_t(seq)]; }
    const rs_buffers & buffers() const { return bufs_; }

    // -- checkpoints (rs_checkpoints) ----------------------------------------------------------

    /// Row (plane * size + cell) of every array holding seq's current state: its tail cell's
    /// source, in the plane a pending rollback selects (as state_write reads). -1 if none.
    int64_t seq_state_row(int32_t seq) const;
    /// Put `seq`, which holds no state, alone in a fresh cell at position `pos` and return the
    /// row its state must be written to (the caller fills it before the next computation).
    /// Throws std::invalid_argument (nothing changed) for seq outside [0, min(size, n_seq_max)),
    /// a sequence that already holds a state, or no free cell.
    uint32_t seq_place(int32_t seq, int32_t pos);
    // -- metrics (Python: stats()) -------------------------------------------------------------

    /// Tokens of the micro-batches applied so far (rs_context::apply).
    uint64_t tokens_placed() const { return tokens_placed_; }
    void     count_placed(uint32_t n_tokens) { tokens_placed_ += n_tokens; }

private:
    /// The cell whose position seq_add/seq_div move: seq's tail cell when it holds seq at a
    /// position inside [p0, p1) (normalised); -1 when nothing moves.
    int32_t shift_target(int32_t seq, int32_t p0, int32_t p1) const;
    struct cell_undo { uint32_t idx; int32_t pos, src, src0; };
    struct ids_undo  { uint32_t idx; std::vector<int32_t> ids; };
    struct tail_undo { uint32_t seq; int32_t saved; };
    struct parsed_state;

    // every mutation of a cell or a tail goes through these, so a dry run can be undone and
    // the derived counters (non-empty cells, src references) stay exact; mut_cell() is for
    // pos/src0 (src through set_src), mut_ids() for the ids
    rs_cell & mut_cell(uint32_t i);
    std::vector<int32_t> & mut_ids(uint32_t i);
    void set_tail(uint32_t seq, int32_t cell);
    void set_src(uint32_t i, int32_t src);
    void add_id(uint32_t i, int32_t seq);
    void erase_id(uint32_t i, int32_t seq);
    void set_ids(uint32_t i, const int32_t * ids, uint32_t n_ids);
    void empty_cell(uint32_t i);
    void swap_cells(uint32_t a, uint32_t b);
    uint32_t next_empty_cell(uint32_t from) const;
    void begin_undo();
    void undo();
    void reset_cells();

    uint32_t source_row(uint32_t i, uint32_t plane) const;
    uint32_t write_plane(int32_t seq, uint32_t i) const;
    void parse_state(const uint8_t * data, size_t n_data, int32_t seq, parsed_state & ps) const;
    void zero_buffers();

    uint32_t size_;
    int32_t  n_seq_max_;
    uint32_t n_rs_seq_;
    bool     b11549_rules_ = false;
    bool     no_layers_    = false;

    uint32_t head_ = 0;
    uint32_t used_ = 0;      // llama.cpp's counter (it can drift, see seq_add)
    uint32_t n_    = 0;
    int32_t  rs_z_ = -1;

    std::vector<rs_cell>  cells_;
    std::vector<int32_t>  tails_;     // [size]: cell of sequence s, or -1
    std::vector<uint32_t> rs_idx_;    // [n_seq_max]: pending rollback depth
    std::vector<uint32_t> src_refs_;  // [size]: number of cells whose src is this row
    uint32_t n_nonempty_ = 0;         // cells with at least one id

    bool undo_active_ = false;
    uint64_t undo_epoch_ = 0;
    std::vector<uint64_t>  cell_epoch_;  // [size]: epoch in which the cell's fields were saved
    std::vector<uint64_t>  ids_epoch_;   // [size]: epoch in which the cell's ids were saved
    std::vector<uint64_t>  tail_epoch_;
    std::vector<cell_undo> cell_log_;
    std::vector<ids_undo>  ids_log_;     // entries are reused (their vectors keep capacity)
    size_t                 ids_log_n_ = 0;
    std::vector<tail_undo> tail_log_;
    uint32_t saved_head_ = 0;
    uint32_t saved_used_ = 0;

    std::shared_ptr<ubatch_data> read_ubatch_;  // reused by single-sequence state_read

    rs_buffers bufs_;

    uint64_t tokens_placed_ = 0;
};

/// The plan for one batch (or the full memory, or the empty update) of a recurrent memory.
class rs_context {
public:
    rs_context(rs_memory * mem, memory_status status);
    rs_context(rs_memory * mem, std::vector<ubatch> ubs);

    memory_status status() const { return status_; }
    bool is_full() const { return full_; }
    size_t n_ubatches() const { return ubatches_.size(); }
    size_t index() const { return i_; }
    /// The current ubatch; throws llmem::error when the context has none.
    const ubatch & get_ubatch() const;
    /// Advance; false when there is no further ubatch.
    bool next();
    /// Commit the current ubatch into the memory (true regardless of find_slot's result, as
    /// llama.cpp). Throws llmem::error on a failed context.
    bool apply();
    /// Whether the current ubatch has been applied (always true for full contexts).
    bool applied() const { return full_ || applied_; }

    uint32_t n_rs() const;
    uint32_t head() const;
    int32_t  rs_z() const;
    /// s_copy(0 .. n_rs-1), evaluated once per applied ubatch (reading consumes rollbacks).
    /// Throws llmem::error before apply().
    const std::vector<int32_t> & s_copy_all();

    /// The graph's input step for state array `kind` (0: r, 1: s, 2: p) of present layer `layer`:
    /// zero row rs_z, copy the n_seqs input rows (s_copy) into `out` (may be null), then move
    /// the states of the slot's other cells into place. Once per array per applied ubatch;
    /// throws llmem::error on a repeat, before apply() or without a ubatch.
    void gather(int kind, size_t layer, uint8_t * out);
    /// Write `n_planes` planes of n_seqs rows (plane-major; plane d = the state d tokens before
    /// the end) into the ubatch's cells, running gather(kind, layer, nullptr) first if needed.
    void store(int kind, size_t layer, const uint8_t * rows, uint32_t n_planes);
    bool gathered(int kind, size_t layer) const;
    /// Bytes of one row of state array `kind` of present layer `layer`.
    uint64_t row_bytes(int kind, size_t layer) const;

private:
    rs_memory *          mem_;
    memory_status        status_;
    bool                 full_ = false;
    std::vector<ubatch>  ubatches_;
    size_t               i_ = 0;
    bool                 applied_ = false;
    bool                 copies_valid_ = false;
    std::vector<int32_t> copies_;
    std::vector<uint8_t> gathered_;  // [RS_KINDS * present layers]: gather() done for this ubatch
    std::vector<uint8_t> scratch_;   // rows of the slot's other cells while they move

    void new_ubatch();
    uint8_t * array_base(int kind, size_t layer) const;
};

} // namespace llmem
