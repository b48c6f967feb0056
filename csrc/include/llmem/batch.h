#pragma once

#include "llmem/common.h"
#include "llmem/seq_pos_source.h"
#include "llmem/ubatch.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace llmem {

/// Input batch in llama.cpp's array form. Empty vectors mean "not given".
struct batch {
    uint32_t n_tokens = 0;

    std::vector<int32_t> token;       // [n_tokens]; a value of NO_TOKEN marks an entry without token
    std::vector<float>   embd;        // [n_tokens * n_embd]
    uint32_t             n_embd = 0;
    std::vector<int32_t> pos;         // token batches: [n_tokens]; embedding-only: [n_pos * n_tokens]
    bool                 pos_given = false;  // pos was passed, even empty (then its length is checked)
    std::vector<int32_t> seq_id_off;  // [n_tokens + 1]; empty: every entry is sequence 0
    std::vector<int32_t> seq_id;      // ids in the caller's order (repeats allowed)
    std::vector<int8_t>  output;      // [n_tokens]; empty: only the last entry is an output
};

/// Validates a batch against a memory and splits it into micro-batches, with llama.cpp's rules
/// (llama_batch_allocr): same checks, same ubatches in the same order, same out_ids.
///
/// init() either succeeds or throws batch_error and leaves the allocator exactly as it was.
/// Splitting functions return an empty ubatch when nothing more can be split.
class batch_allocr {
public:
    /// n_vocab < 0: token ids are only checked for being non-negative.
    /// n_embd = 0: embedding rows may have any width.
    batch_allocr(int32_t n_seq_max, int32_t n_vocab = -1, uint32_t n_embd = 0, uint32_t n_pos_per_embd = 1);
    ~batch_allocr();

    batch_allocr(const batch_allocr &) = delete;
    batch_allocr & operator=(const batch_allocr &) = delete;

    /// Validate `b`, filling missing positions from `memory` (may be null) and missing output
    /// flags; output_all forces every entry to be an output. Throws batch_error. A `memory`
    /// whose position calls re-enter init() on this allocator gets llmem::error there (the
    /// outer call would otherwise swap its batch with the inner one's).
    void init(const batch & b, const seq_pos_source * memory, bool output_all);

    /// Forget the split progress (every entry unused, out_ids emptied).
    void split_reset();

    /// Tests only: false makes init() take the general path for every batch, so the one-pass
    /// decode-shape path can be compared with it.
    void set_decode_fast_path(bool on) { decode_fast_path_ = on; }

    /// Consecutive unused entries in batch order, at most n_ubatch (at least one).
    ubatch split_simple(uint32_t n_ubatch);

    /// Equal-length sequence sets; `sequential` requires consecutive ids and refuses coupled
    /// batches; keep_tail > 0 keeps the last keep_tail entries of each sequence together.
    /// Throws std::invalid_argument when a ubatch would be formed with n_ubatch <= keep_tail.
    ubatch split_equal(uint32_t n_ubatch, bool sequential, uint32_t keep_tail = 0);

    /// One sequence set at a time, narrowing to subsets of the first entry's sequences.
    ubatch split_seq(uint32_t n_ubatch);

    int32_t  n_seq_max()      const { return n_seq_max_; }
    uint32_t n_pos_per_embd() const { return n_pos_; }
    uint32_t n_tokens()       const;
    uint32_t n_used()         const;
    uint32_t n_outputs()      const;
    bool     has_coupled()    const;
    /// Batch indices of the output entries in the order their ubatches were produced.
    const std::vector<int32_t> & out_ids() const;

    /// Input positions (section 0) of one sequence in the whole validated batch; -1 if absent.
    int32_t batch_pos_min(int32_t seq) const;
    int32_t batch_pos_max(int32_t seq) const;

private:
    struct state;

    /// Index of the first entry no split has taken yet (n_tokens when all are taken).
    uint32_t first_unused() const;
    /// init() once the re-entry guard is held.
    void init_checked(const batch & b, const seq_pos_source * memory, bool output_all);
    ubatch make_ubatch(const std::vector<int32_t> & idxs, uint32_t n_seqs, bool equal_seqs);
    std::shared_ptr<ubatch_data> acquire_data();
    /// init() for the decode-step shape; false (nothing swapped in) when b is not of it.
    bool init_decode_shape(const batch & b, const seq_pos_source * memory, bool output_all);

    int32_t  n_seq_max_;
    int32_t  n_vocab_;
    uint32_t n_embd_;
    uint32_t n_pos_;
    bool     decode_fast_path_ = true;
    bool     in_init_          = false;  // init() running: a position source calling init() again is refused

    std::unique_ptr<state> cur_;    // the validated batch and its split cursor
    std::unique_ptr<state> spare_;  // scratch for the next init(), swapped in on success

    // a sequence set picked by split_equal: its group of entries and how far it has been taken
    struct chosen_set {
        int32_t  group;
        uint32_t cursor;
        uint32_t taken;
    };

    std::vector<std::shared_ptr<ubatch_data>> pool_;  // recycled ubatch storage
    std::vector<int32_t>    scratch_idxs_;            // reused by the splitters and init()
    std::vector<chosen_set> scratch_chosen_;
};

} // namespace llmem
