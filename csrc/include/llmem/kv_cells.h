#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llmem {

/// Extra data of a cell for M-RoPE models: 2-D coordinates of an image token and its token id.
struct cell_ext {
    int32_t x   = 0;
    int32_t y   = 0;
    int32_t tok = -1;

    bool operator==(const cell_ext & o) const { return x == o.x && y == o.y && tok == o.tok; }
};

/// The cell table of one KV stream (llama.cpp's kv cells): per cell a position, a pending
/// shift, the set of sequences that see it, optional ext data; plus the used set and, per
/// sequence, the cells it holds ordered by (position, cell).
///
/// Costs: every per-cell primitive is O(1) plus the cost of keeping the per-sequence index
/// sorted (O(1) when the cell is the newest of its sequence, which is the decode case).
/// seq_pos_min/max are O(1). A cell held by one or two sequences stores the ids inline; only
/// cells shared by three or more use a (recycled) side list, so memory per cell does not grow
/// with n_seq_max.
///
/// A journal makes a group of changes undoable: between journal_begin() and
/// journal_rollback() every cell touched is saved before its first change.
class kv_cells {
public:
    /// Sequences are ids in [0, n_seq_max); the table indexes the n_local ids starting at
    /// seq_base (all of them by default; a per-sequence stream indexes only its own id).
    kv_cells(uint32_t size, int32_t n_seq_max, bool with_ext, int32_t seq_base = 0, int32_t n_local = 0);

    uint32_t size()        const { return size_; }
    int32_t  n_seq_max()   const { return n_seq_max_; }
    /// True for the ids this table can hold.
    bool     holds_id(int32_t s) const { return in_range(s); }
    bool     with_ext()    const { return with_ext_; }
    uint32_t used_count()  const { return used_count_; }
    /// One past the largest used index, 0 when no cell is used.
    uint32_t used_max_p1() const;
    /// True once a position changed by pos_add/pos_div since the last reset_shift().
    bool     has_shift()   const { return has_shift_; }

    bool     is_empty(uint32_t i)  const { return pos_[i] == -1; }
    int32_t  pos_get(uint32_t i)   const { return pos_[i]; }
    int32_t  shift_get(uint32_t i) const { return shift_[i]; }
    cell_ext ext_get(uint32_t i)   const { return with_ext_ ? ext_[i] : cell_ext{}; }
    uint32_t seq_count(uint32_t i) const { return n_seq_[i]; }
    /// The sequence of a cell that holds exactly one.
    int32_t  seq_get(uint32_t i)   const { return ids_[size_t(i) * 2]; }
    bool     seq_has(uint32_t i, int32_t s) const;
    /// The sequences of cell i in increasing order (pointer + count, valid until the next change).
    const int32_t * seq_list(uint32_t i, uint32_t & n) const;

    /// -1 when the sequence holds no cell (or is outside [0, n_seq_max)).
    int32_t seq_pos_min(int32_t s) const;
    int32_t seq_pos_max(int32_t s) const {
        // last_key_ is 0 exactly when the index is empty (a key of a position >= 0 has its top
        // bit set): one dense read, not the index's header
        if (!in_range(s)) {
            return -1;
        }
        const uint64_t k = last_key_[size_t(s - seq_base_)];
        return k != 0 ? key_pos(k) : -1;
    }
    /// Number of cells holding s.
    uint32_t seq_n_cells(int32_t s) const;
    /// The token of s's cell at the largest position <= p (the highest cell index among cells at
    /// that position), or -1 (LLAMA_TOKEN_NULL) when s has no cell at or before p
    /// (llama_kv_cells::seq_pos_tok_le). Tokens are kept only with ext data (with_ext).
    int32_t seq_pos_tok_le(int32_t s, int32_t p) const;

    /// Starts loading the end of s's index, where the next key of s goes: a decode step asks for
    /// all its sequences first and appends much later, when the lines are there (between steps a
    /// model or other work has usually evicted them).
    void prefetch_append(int32_t s) const {
        if (in_range(s)) {
            const auto & v = ix(s);
            __builtin_prefetch(v.data() + v.size(), 1);
        }
    }
    /// Keys of the cells of s in (pos, cell) order; decode with key_pos / key_cell.
    const std::vector<uint64_t> & seq_index(int32_t s) const { return in_range(s) ? ix(s) : empty_index_; }
    static uint64_t key(int32_t p, uint32_t i) { return (uint64_t(uint32_t(p) ^ 0x80000000u) << 32) | i; }
    static int32_t  key_pos(uint64_t k)  { return int32_t(uint32_t(k >> 32) ^ 0x80000000u); }
    static uint32_t key_cell(uint64_t k) { return uint32_t(k); }

    /// First empty index >= from (size() if none), skipping used cells 64 at a time.
    uint32_t next_empty(uint32_t from) const;
    /// Appends to out the empty indices in [from, to) in increasing order, at most n of them;
    /// returns how many (a word of the used set at a time: the decode step's slot search).
    uint32_t collect_empty(uint32_t from, uint32_t to, uint32_t n, std::vector<uint32_t> & out) const;
    /// First used index >= from (size() if none).
    uint32_t next_used(uint32_t from) const;

    // -- primitives (llama.cpp's cell operations) ------------------------------------------

    /// Empty every cell, clear shifts and has_shift.
    void reset();
    /// Forget every pending shift.
    void reset_shift();
    /// Empty a used cell whatever sequences it holds.
    void rm(uint32_t i);
    /// Remove s from a cell that holds it; returns true if the cell became empty.
    bool seq_rm(uint32_t i, int32_t s);
    /// Keep only s in cell i; a cell without s but with other sequences is emptied.
    /// Returns true if the cell was emptied.
    bool seq_keep(uint32_t i, int32_t s);
    /// Add s to a used cell (no-op if it already holds s).
    void seq_add(uint32_t i, int32_t s);
    /// Give an empty cell a position (it becomes used, with no sequence yet).
    void pos_set(uint32_t i, int32_t p);
    /// pos_set(i, p) then seq_add(i, s) in one step: placing a token of one sequence.
    void occupy(uint32_t i, int32_t p, int32_t s);
    /// occupy(cells[k], pos[k], seqs[k]) for k < n in one pass while the cells are empty (the
    /// micro-batch of a decode step, one sequence per token); stops at the first used cell and
    /// returns how many were placed.
    uint32_t occupy_each(const uint32_t * cells, const int32_t * pos, const int32_t * seqs, uint32_t n);
    /// occupy(cells[k], pos[k], s) for every k < n, merging the n keys into s's index at once
    /// (restoring a sequence's state places all its cells).
    void occupy_all(const uint32_t * cells, const int32_t * pos, uint32_t n, int32_t s);
    void ext_set(uint32_t i, const cell_ext & e);
    /// Move a used cell by d and record the shift; returns true if it fell below 0 and was emptied.
    bool pos_add(uint32_t i, int32_t d);
    /// Divide a used cell's position by d >= 1 and record the (signed) position change.
    void pos_div(uint32_t i, int32_t d);

    // -- bulk sequence operations: cost O(log n + cells touched) -----------------------------

    /// Remove s from its cells with p0 <= pos < p1; returns the lowest emptied index or size().
    uint32_t seq_rm_range(int32_t s, int32_t p0, int32_t p1);
    /// Empty every used cell with p0 <= pos < p1; returns the lowest emptied index or size().
    uint32_t rm_range(int32_t p0, int32_t p1);
    /// seq_keep(i, s) on every cell; returns the lowest emptied index or size().
    uint32_t keep_only(int32_t s);
    /// pos_add(d) on every cell of s with p0 <= pos < p1; returns the lowest emptied index or size().
    uint32_t seq_pos_add(int32_t s, int32_t p0, int32_t p1, int32_t d);
    /// seq_add(i, dst) on every cell of src with p0 <= pos < p1, in one pass over src's index and
    /// one merge into dst's.
    void seq_copy(int32_t src, int32_t dst, int32_t p0, int32_t p1);
    /// pos_div(d) on every cell of s with p0 <= pos < p1.
    void seq_pos_div(int32_t s, int32_t p0, int32_t p1, int32_t d);

    // -- undo journal --------------------------------------------------------------------------

    void journal_begin();
    /// Keep the changes made since journal_begin().
    void journal_commit();
    /// Bring every cell touched since journal_begin() back to its saved content.
    void journal_rollback();
    bool journal_active() const { return journal_active_; }

    /// Check every invariant (index vs cells, used set, counts); for tests. Returns false on
    /// the first violation.
    bool check_invariants() const;

private:
    // Called before every change of a cell: inline, as the journal is off outside planning.
    void touch(uint32_t i) {
        if (journal_active_ && stamp_[i] != epoch_) {
            save_cell(i);
        }
    }
    void save_cell(uint32_t i);
    void mark_used(uint32_t i);
    void mark_unused(uint32_t i);
    void index_insert(int32_t s, int32_t p, uint32_t i);
    void index_erase(int32_t s, int32_t p, uint32_t i);
    void seqs_clear(uint32_t i);      // drops the cell's sequence list without touching the index
    void seqs_insert(uint32_t i, int32_t s);
    void seqs_erase(uint32_t i, int32_t s);
    void empty_cell(uint32_t i);      // pos -1, no seqs, shift 0, ext reset, unused (no index work)
    uint32_t multi_alloc();
    void multi_free(uint32_t slot);
    bool in_range(int32_t s) const { return s >= seq_base_ && s < seq_base_ + n_local_; }
    std::vector<uint64_t> &       ix(int32_t s) { return index_[size_t(s - seq_base_)]; }
    const std::vector<uint64_t> & ix(int32_t s) const { return index_[size_t(s - seq_base_)]; }
    /// Merge scratch_keys_ (sorted, none already there) into the index of s.
    void merge_scratch_keys(int32_t s);
    /// Re-read the newest key of s after its index changed other than through index_insert/erase.
    void sync_last(int32_t s);

    uint32_t size_;
    int32_t  n_seq_max_;
    int32_t  seq_base_;
    int32_t  n_local_;
    bool     with_ext_;
    std::vector<uint64_t> empty_index_;

    std::vector<int32_t>  pos_;
    std::vector<int32_t>  shift_;
    std::vector<cell_ext> ext_;       // empty unless with_ext_
    std::vector<uint32_t> n_seq_;
    // Two slots per cell: its ids in increasing order when it holds one or two sequences, else a
    // multi_ slot in the first. Copying a sequence (the shared-prefix case) gives cells two
    // sequences; kept inline they need no heap list and no extra cache miss per cell.
    std::vector<int32_t>  ids_;

    std::vector<std::vector<int32_t>> multi_;   // sorted id lists of cells of three or more
    std::vector<uint32_t>             multi_free_;

    std::vector<uint64_t> used_bits_;
    uint32_t              used_count_ = 0;
    mutable uint32_t      used_max_hint_ = 0;   // >= used_max_p1()
    bool                  has_shift_ = false;

    std::vector<std::vector<uint64_t>> index_;  // per sequence, sorted keys
    // Per sequence, a copy of index_'s last key, 0 while that index is empty. The
    // decode step asks every sequence for its newest position and appends one key to each: kept
    // here in one dense array, those reads hit a few cache lines instead of one line per sequence
    // scattered over the heap (at 256 sequences that was the largest cost of the step).
    std::vector<uint64_t> last_key_;

    // journal
    struct saved_cell {
        uint32_t cell;
        int32_t  pos;
        int32_t  shift;
        cell_ext ext;
        uint32_t seq_off;
        uint32_t n_seq;
    };
    bool                   journal_active_ = false;
    bool                   journal_has_shift_ = false;
    uint32_t               epoch_ = 0;
    std::vector<uint32_t>  stamp_;          // epoch at which the cell was saved
    std::vector<saved_cell> saved_;
    std::vector<int32_t>   saved_seqs_;

    std::vector<uint64_t>  scratch_keys_;
    std::vector<uint32_t>  scratch_cells_;
};

} // namespace llmem
