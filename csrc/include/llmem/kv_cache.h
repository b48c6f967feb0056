#pragma once

#include "llmem/common.h"
#include "llmem/kv_cells.h"
#include "llmem/seq_pos_source.h"
#include "llmem/status.h"
#include "llmem/tensor_kernels.h"
#include "llmem/ubatch.h"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace llmem {

class batch_allocr;

/// Bytes per element of a supported type; throws std::invalid_argument for any other id.
size_t kv_type_size(int32_t type);

/// True if cell position p0 is outside the window of a query at p1 (llama.cpp is_masked_swa).
bool is_masked_swa(uint32_t n_swa, swa_type type, int32_t p0, int32_t p1);

/// Everything a KV cache is built from. Layer arrays are per cache layer, in cache order.
struct kv_cache_params {
    uint32_t kv_size        = 0;
    int32_t  n_seq_max      = 1;
    bool     unified        = true;
    uint32_t n_pad          = 1;
    uint32_t n_swa          = 0;
    swa_type swa            = swa_type::NONE;
    uint32_t n_pos_per_embd = 1;  // > 1: M-RoPE model (cells carry ext, no shifting)
    // cells keep their token (ext data, saved in the state bytes): llama.cpp's has_cell_ext() of
    // models with per-layer n-gram embeddings; seq_pos_tok_le needs it
    bool     cell_tokens    = false;
    int32_t  type_k         = int32_t(kv_type::F16);
    int32_t  type_v         = int32_t(kv_type::F16);
    bool     v_trans        = true;
    std::vector<int32_t>  layer_il;  // model layer id of each cache layer
    std::vector<uint32_t> n_embd_k;  // K row width of each cache layer
    std::vector<uint32_t> n_embd_v;  // V row width of each cache layer
    uint32_t n_embd_v_max = 0;       // transposed V height: max V width over all model layers
    rope_params rope;
    // llama.cpp b11549's attention rotation sizes (a Hadamard transform over blocks of n_rot_k /
    // n_rot_v values that the model applies to quantized K / V; 0 = none). They are recorded in
    // state format 4 and must match on read there.
    uint32_t n_rot_k      = 0;
    uint32_t n_rot_v      = 0;
    // The state bytes written: 3 = llama.cpp b11312 (llama-cpp-python 0.3.36), 4 = b11549 (n_rot_k
    // and n_rot_v after n_layer in every stream section). Reading accepts both.
    uint32_t state_format = 4;
};

/// The state formats kv_cache writes and reads (LLAMA_STATE_SEQ_VERSION of each llama.cpp build).
constexpr uint32_t KV_STATE_FORMAT_B11312 = 3;
constexpr uint32_t KV_STATE_FORMAT_B11549 = 4;

/// Where the tokens of one ubatch go: one group per stream touched (all tokens for a single
/// stream); token k of group g goes to cell idxs[g * n_per_group + k] of stream strm[g].
struct slot_info {
    uint32_t              n_per_group = 0;
    std::vector<uint32_t> strm;
    std::vector<uint32_t> idxs;

    bool     empty()    const { return strm.empty(); }
    uint32_t n_groups() const { return uint32_t(strm.size()); }
    uint32_t s0()       const;
    uint32_t s1()       const;
    void     clear()          { n_per_group = 0; strm.clear(); idxs.clear(); }
};

/// A stream-to-stream copy of the K/V bytes that seq_cp across streams leaves for the update.
struct stream_copy {
    uint32_t src;
    uint32_t dst;
};

namespace detail {
struct cell_run;  // consecutive cells moved in one copy by the state writer and reader
} // namespace detail

/// The attention KV cache: llama.cpp's llama_kv_cache decisions (cells chosen, heads, returns,
/// failures, masks, state bytes) with llmem's deviations (docs/deviations.md). The K/V bytes
/// live in caller-owned buffers registered with set_layer_buffers (numpy arrays in Python).
///
/// Every public mutator either succeeds or throws and leaves the cache unchanged.
class kv_cache : public seq_pos_source {
public:
    explicit kv_cache(const kv_cache_params & params);

    // -- geometry --------------------------------------------------------------------------------

    const kv_cache_params & params() const { return p_; }
    uint32_t size()      const { return p_.kv_size; }
    uint32_t n_stream()  const { return n_stream_; }
    int32_t  n_seq_max() const { return p_.n_seq_max; }
    /// Ids accepted by the sequence operations: 256 (or n_seq_max if larger) when unified.
    int32_t  n_seq_ids() const { return n_seq_ids_; }
    uint32_t n_layer()   const { return uint32_t(p_.layer_il.size()); }
    uint32_t head(uint32_t stream) const { return heads_.at(stream); }
    uint32_t seq_to_stream(int32_t seq) const;
    const kv_cells & cells(uint32_t stream) const { return cells_.at(stream); }
    uint32_t used_count() const;
    /// Bytes of K and V rows of one cache layer per stream-cell (row bytes) and whole buffers.
    size_t   k_row_bytes(uint32_t l) const;
    size_t   v_row_bytes(uint32_t l) const;
    size_t   k_buffer_bytes(uint32_t l) const;
    size_t   v_buffer_bytes(uint32_t l) const;
    /// Sum of all K/V buffer sizes.
    size_t   total_bytes() const;

    /// Register the storage of cache layer l (sizes as k_buffer_bytes/v_buffer_bytes). Until
    /// registered, the layer's data reads as zeros and writes are dropped.
    void set_layer_buffers(uint32_t l, uint8_t * k, uint8_t * v);

    // -- sequence operations (bad ids throw std::invalid_argument) ---------------------------

    /// Empty every stream, heads to 0; with `data` also zero all K/V bytes.
    void clear(bool data);
    /// Remove [p0, p1) of seq (-1: of every sequence). Always true.
    bool seq_rm(int32_t seq, int32_t p0, int32_t p1);
    /// Let dst see the cells of src in [p0, p1) (across streams: whole-stream copy, pending).
    void seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1);
    /// Remove every sequence but seq from seq's stream.
    void seq_keep(int32_t seq);
    /// Add d to the positions in [p0, p1) of seq (records a pending K-shift).
    void seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t d);
    /// Divide the positions in [p0, p1) of seq by d >= 1 (records a pending K-shift).
    void seq_div(int32_t seq, int32_t p0, int32_t p1, int32_t d);
    /// Throw what the operation of the same name would throw, changing nothing: a composite
    /// memory (iSWA, hybrid) checks every part before it changes any.
    void check_seq_rm(int32_t seq) const;
    void check_seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1) const;
    void check_seq_keep(int32_t seq) const;
    void check_seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t d) const;
    void check_seq_div(int32_t seq, int32_t p0, int32_t p1, int32_t d) const;
    int32_t seq_pos_min(int32_t seq) const override;
    int32_t seq_pos_max(int32_t seq) const override;
    void    seq_pos_max_each(const int32_t * seqs, uint32_t n, int32_t * out) const override;
    /// The token of seq's cell at the largest position <= p, -1 if none (llama.cpp's
    /// seq_pos_tok_le, used for n-gram embeddings). Throws llmem::error when the cells keep no
    /// tokens (neither cell_tokens nor M-RoPE).
    int32_t seq_pos_tok_le(int32_t seq, int32_t p) const;

    bool get_can_shift() const { return p_.n_pos_per_embd <= 1; }
    bool get_has_shift() const;
    const std::vector<stream_copy> & pending_copies() const { return pending_; }

    // -- placement ---------------------------------------------------------------------------

    /// Split the allocator's batch into ubatches as llama.cpp does for this cache (simple for
    /// one stream, else equal-sequential). Returns false if the split did not use every token.
    bool split_batch(batch_allocr & balloc, uint32_t n_ubatch, std::vector<ubatch> & out) const;
    /// Cells for one ubatch on the current state (no change). False: no room.
    bool find_slot(const ubatch & ub, bool cont, slot_info & out) const;
    /// Write the ubatch's metadata into the slot's cells (SWA reuse and purge included).
    void apply_ubatch(const slot_info & slot, const ubatch & ub);
    /// True if every cell of the slot is still empty or reusable (as find_slot chose it) and in
    /// range: false when the cache changed between init_batch and apply.
    bool slot_still_valid(const slot_info & slot, const ubatch & ub) const;
    /// Slots for every ubatch as if applied in order; the cache is left exactly as it was.
    /// Empty on failure. Throws std::invalid_argument for a malformed ubatch.
    std::vector<slot_info> prepare(const std::vector<ubatch> & ubatches);
    bool prepare_into(const std::vector<ubatch> & ubatches, std::vector<slot_info> & slots);
    /// Cells attention reads for this slot (llama.cpp get_n_kv).
    uint32_t get_n_kv(const slot_info & slot) const;

    // -- attention inputs ------------------------------------------------------------------------

    /// Dense mask [n_tokens, n_kv] (0 attend, -inf not) for a ubatch already applied at slot.
    void kq_mask(const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal, float * out) const;
    /// The same visibility as lists: for token t, visible cells are
    /// cells[offsets[t] .. offsets[t+1]) (cell indices within the token's stream, ascending).
    void kq_cells(const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal,
                  std::vector<int64_t> & offsets, std::vector<int32_t> & cells_out) const;

    // -- deferred updates ----------------------------------------------------------------------

    /// True if an update (stream copies or K-shift) is pending.
    bool update_pending() const { return !pending_.empty() || get_has_shift(); }
    /// Perform pending stream copies, then (if shifts are pending) the K-shift, then clear the
    /// shifts. Throws llmem::error, changing nothing, when a shift is pending but the cache has
    /// no RoPE description or cannot shift.
    void update();

    // -- state ---------------------------------------------------------------------------------

    /// Append the KV section (llama.cpp layout) for seq (-1: everything) to out.
    void state_write(std::vector<uint8_t> & out, int32_t seq) const;
    /// Size in bytes of the KV section state_write produces for seq.
    size_t state_write_size(int32_t seq) const;
    /// Write the KV section into out[0..n); n must be state_write_size(seq) (std::invalid_argument
    /// otherwise). Lets a caller write straight into the buffer it returns.
    void state_write(uint8_t * out, size_t n, int32_t seq) const;
    /// Write the KV section into out[0..cap) and return its size; std::invalid_argument (naming
    /// both sizes, nothing written) when cap is below state_write_size(seq).
    size_t state_write_into(uint8_t * out, size_t cap, int32_t seq) const;
    /// Read a KV section from data[off..n), advancing off. Throws state_error and leaves the
    /// cache (cells, heads, K/V bytes) unchanged when the bytes cannot be restored.
    void state_read(const uint8_t * data, size_t n, size_t & off, int32_t seq);
    /// Remove seq (-1: clear(true)) and zero the K/V rows of the cells it alone held.
    void state_clear(int32_t seq);

    /// A parsed KV section ready to be committed (pointers into the caller's bytes).
    struct parsed_state;
    /// Parse and validate without changing anything; throws state_error.
    std::unique_ptr<parsed_state> state_parse(const uint8_t * data, size_t n, size_t & off, int32_t seq) const;
    /// Place the cells of a parsed per-sequence state inside an open transaction (returns false
    /// if there is no room); whole-cache states always fit once parsed.
    bool state_place(parsed_state & ps);
    /// Write the parsed state into the cache (after state_place for a sequence state).
    void state_commit(parsed_state & ps);
    /// Whether a parsed state can be placed without a transaction: a whole-cache state, or one
    /// sequence in one stream of a cache without a sliding window (its room is a count of free
    /// cells, known before anything changes) while no transaction is open.
    bool state_direct(const parsed_state & ps) const;
    /// For a state_direct state: whether its cells fit (no change).
    bool state_fits(const parsed_state & ps) const;
    /// For a state_direct state that fits: place it as state_place would (same cells, head and
    /// metadata), without a journal; then state_commit.
    void state_place_direct(parsed_state & ps);

    /// Recycled vectors for batch contexts: a warm decode loop allocates no plan storage. The
    /// pools have their own mutex: a context hands its vectors back from its destructor, which
    /// runs wherever its last reference dies (another thread, a garbage collection), not under the
    /// memory's lock, while a planning thread may be taking vectors from the same pools.
    void acquire_plan(std::vector<slot_info> & slots, std::vector<ubatch> & ubatches);
    void release_plan(std::vector<slot_info> && slots, std::vector<ubatch> && ubatches);

    /// Undoable group of changes over every stream (cells and heads).
    void txn_begin();
    void txn_commit();
    void txn_rollback();

    // -- metrics (Python: stats()) -------------------------------------------------------------

    /// Running totals, bumped where the work is done (a few adds per decode step).
    struct counters_t {
        uint64_t tokens_placed = 0;  // tokens of the micro-batches applied (kv_context::apply)
        uint64_t k_shifts      = 0;  // update() calls that re-rotated K
    };
    const counters_t & counters() const { return counters_; }
    void count_placed(uint32_t n_tokens) { counters_.tokens_placed += n_tokens; }
    /// Cells in use in one stream.
    uint32_t used_in_stream(uint32_t stream) const { return cells_.at(stream).used_count(); }
    /// Number of sequence ids that hold at least one cell.
    uint32_t n_seqs_present() const;
    /// Cells a slot search may take in one stream now: the empty ones and, in a sliding-window
    /// cache, those whose single sequence has moved past their window (find_slot's test).
    uint32_t usable_in_stream(uint32_t stream) const;

private:
    // Writes state_write_size(seq) bytes at out (the caller checked the room).
    void write_state(uint8_t * out, int32_t seq) const;
    size_t state_cells(uint32_t s, int32_t seq, std::vector<detail::cell_run> & runs) const;
    size_t state_stream_bytes(size_t n_cells, size_t n_ids) const;
    // The format (3 or 4) of a stream section whose n_layer was just read (data[off] follows it).
    uint32_t stream_section_format(const uint8_t * data, size_t n, size_t off, uint32_t n_lay) const;
    void check_seq(int32_t seq, const char * what) const;
    void check_ubatch(const ubatch & ub) const;
    void lower_head(uint32_t stream, uint32_t lowest);
    void copy_stream(uint32_t src, uint32_t dst);
    void apply_k_shift();
    void check_k_shift_rotation() const;
    void zero_cells(uint32_t stream, const std::vector<uint32_t> & idxs);
    const uint8_t * k_row(uint32_t l, uint32_t stream, uint32_t cell) const;
    uint8_t *       k_row_mut(uint32_t l, uint32_t stream, uint32_t cell);

    kv_cache_params p_;
    uint32_t        n_stream_;
    int32_t         n_seq_ids_;
    bool            with_ext_;

    std::vector<kv_cells>    cells_;
    std::vector<uint32_t>    heads_;
    std::vector<stream_copy> pending_;

    std::vector<uint8_t *> k_;  // per cache layer, may be null
    std::vector<uint8_t *> v_;

    // transaction: streams are journaled lazily, the first time they are written
    kv_cells & wcells(uint32_t stream);
    bool                  txn_active_ = false;
    std::vector<uint8_t>  txn_open_flag_;                      // per stream
    std::vector<std::pair<uint32_t, uint32_t>> txn_open_;      // (stream, head at open)

    // guards slot_pool_ and ubatch_pool_ only; a copied or moved cache gets a mutex of its own
    struct pool_mutex {
        std::mutex m;
        pool_mutex() = default;
        pool_mutex(const pool_mutex &) {}
        pool_mutex & operator=(const pool_mutex &) { return *this; }
    };
    pool_mutex                          plan_pool_mutex_;
    std::vector<std::vector<slot_info>> slot_pool_;
    std::vector<std::vector<ubatch>>    ubatch_pool_;

    // scratch reused on the hot path
    std::vector<int32_t>  max_rm_;
    std::vector<int32_t>  max_rm_seqs_;
    mutable std::vector<float>    scratch_f_;
    std::vector<int32_t>          scratch_positions_;  // state reads: positions of the cells placed

    counters_t counters_;
};

/// The plan for one batch: its ubatches and their slots; apply() commits them one at a time.
class kv_context {
public:
    /// A failed context (status FAILED_PREPARE or NO_UPDATE) without ubatches.
    explicit kv_context(memory_status status);
    /// A batch context over prepared slots (one per ubatch).
    kv_context(kv_cache & cache, std::vector<slot_info> slots, std::vector<ubatch> ubatches);
    /// A full-cache context (for sizing): n_kv = kv_size, every stream.
    static kv_context full(kv_cache & cache);

    /// Gives its plan storage back to the cache (which must still exist).
    ~kv_context();
    kv_context(kv_context && o) noexcept;
    kv_context & operator=(kv_context && o) noexcept;
    kv_context(const kv_context &)             = delete;
    kv_context & operator=(const kv_context &) = delete;

    memory_status status() const { return status_; }
    /// Advance to the next ubatch; false past the last one.
    bool next();
    /// Commit the current ubatch into the cache.
    bool apply();
    /// apply() of a plan made just now, under the same lock, by a caller that changed nothing
    /// since (the one-call decode step): the check that its cells are still free is skipped.
    bool apply_just_planned();
    bool has_ubatch() const { return i_cur_ < ubatches_.size(); }
    /// Whether the current micro-batch has been applied (its cells are the ones K/V writes go
    /// to); false for a full-cache context, which has no micro-batch.
    bool applied() const { return applied_; }
    const ubatch &    get_ubatch() const;
    const slot_info & get_slot() const;
    uint32_t          n_kv() const { return n_kv_; }
    uint32_t          i_cur() const { return uint32_t(i_cur_); }
    size_t            n_ubatches() const { return ubatches_.size(); }
    kv_cache *        cache() const { return cache_; }
    const std::vector<ubatch> &    ubatches() const { return ubatches_; }
    const std::vector<slot_info> & slots() const { return slots_; }

private:
    memory_status          status_;
    kv_cache *             cache_ = nullptr;
    std::vector<slot_info> slots_;
    std::vector<ubatch>    ubatches_;
    size_t                 i_cur_ = 0;
    uint32_t               n_kv_  = 0;
    bool                   is_full_ = false;
    bool                   applied_ = false;
};

/// init_batch of a plain cache: split, prepare, context (FAILED_PREPARE when it does not fit).
kv_context kv_init_batch(kv_cache & cache, batch_allocr & balloc, uint32_t n_ubatch);

/// init_batch of an iSWA pair (llama.cpp's order of attempts). On success both contexts share
/// the same ubatches; on failure both have status FAILED_PREPARE.
std::pair<kv_context, kv_context> kv_iswa_init_batch(kv_cache & base, kv_cache & swa, batch_allocr & balloc,
                                                     uint32_t n_ubatch);

/// Read consecutive KV sections (one per cache, in order) from data[off..n) for seq (-1: whole
/// caches), all or nothing: throws state_error and changes no cache unless every section parses
/// and fits. With `exact`, bytes left after the last section are an error too. Returns the new
/// offset.
/// `then`, when given, runs after the sections are parsed and placed but before anything is
/// committed; it receives the offset after the KV sections and returns the final offset. If it
/// throws, every cache is rolled back (the hybrid memory reads its recurrent section there).
size_t kv_state_read_all(const std::vector<kv_cache *> & caches, const uint8_t * data, size_t n, size_t off,
                         int32_t seq, bool exact, const std::function<size_t(size_t)> & then = {});
/// The same over caches[0..n_caches) (a single cache needs no vector).
size_t kv_state_read_all(kv_cache * const * caches, size_t n_caches, const uint8_t * data, size_t n, size_t off,
                         int32_t seq, bool exact, const std::function<size_t(size_t)> & then = {});

} // namespace llmem
