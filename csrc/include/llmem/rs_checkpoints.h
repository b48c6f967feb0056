#pragma once

#include "llmem/rs_memory.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

namespace llmem {

/// A bounded pool of recurrent-state checkpoints in host memory.
///
/// A checkpoint is one sequence's state (its r and s row of every present layer) at the
/// position the sequence stood at, copied out of the memory's arrays. It outlives the sequence
/// it was taken from and can be restored into any sequence that holds no state, which then
/// stands at the checkpoint's position: the prefix cache resumes a request from it instead of
/// recomputing the prefix. The pool is tied to one memory's row layout and is limited by a
/// count and by bytes; a full pool refuses a save (the caller drops checkpoints to make room).
/// Slots are reused, so a steady state of saves and drops allocates nothing.
class rs_checkpoints {
public:
    /// Checkpoints of `mem`'s layout; max_count >= 0 checkpoints of at most max_bytes in all.
    /// copy_rows false: bookkeeping only (ids, positions, limits, bytes counted as if held); the
    /// rows live outside host memory (torch storage, the engine's tensors) and whoever holds them
    /// copies them: out of seq_state_row(seq) after save, into it after restore.
    rs_checkpoints(const rs_memory & mem, uint64_t max_count, uint64_t max_bytes, bool copy_rows = true);

    /// Whether save/restore copy the rows (false: bookkeeping only).
    bool copies_rows() const { return copy_rows_; }

    /// Bytes one checkpoint of this layout takes (every present layer's r and s row).
    uint64_t checkpoint_bytes() const { return bytes_; }

    /// Copy `seq`'s current state (a pending rollback is saved as the snapshot it selects, as
    /// state_write does) into a new checkpoint and return its id. Throws std::invalid_argument
    /// when seq holds no state or mem has another layout, llmem::error when the pool is full;
    /// nothing changes then.
    int64_t save(const rs_memory & mem, int32_t seq);
    /// Place `seq` (which must hold no state) in a fresh cell at the checkpoint's position with
    /// the checkpoint's rows. Throws std::invalid_argument (nothing changed) for an unknown id,
    /// a sequence that holds a state or that the memory cannot place.
    void restore(rs_memory & mem, int64_t id, int32_t seq) const;
    /// Forget a checkpoint (its slot is reused); false for an unknown id.
    bool drop(int64_t id);
    /// Forget every checkpoint (the slots' memory is kept for reuse).
    void clear();

    bool     contains(int64_t id) const;
    /// Position the checkpoint's sequence stood at; throws std::invalid_argument for an unknown id.
    int32_t  pos(int64_t id) const;
    uint64_t count() const { return count_; }
    uint64_t bytes_used() const { return count_ * bytes_; }
    uint64_t max_count() const { return max_count_; }
    uint64_t max_bytes() const { return max_bytes_; }
    /// Change the limits; checkpoints above new limits stay until dropped (saves fail until then).
    void set_limits(uint64_t max_count, uint64_t max_bytes);
    /// Whether one more checkpoint fits the limits now.
    bool has_room() const;

private:
    struct slot {
        int64_t id = -1;   // -1: free
        int32_t pos = -1;
        std::unique_ptr<uint8_t[]> data;
    };
    const slot & find(int64_t id) const;
    bool same_layout(const rs_memory & mem) const;

    std::vector<uint64_t> r_row_bytes_;
    std::vector<uint64_t> s_row_bytes_;
    std::vector<uint64_t> p_row_bytes_;  // empty when no layer has a P array
    uint64_t bytes_ = 0;
    bool copy_rows_;
    uint64_t max_count_;
    uint64_t max_bytes_;
    uint64_t count_ = 0;
    int64_t next_id_ = 0;
    std::vector<slot> slots_;
    std::vector<uint32_t> free_;                  // free slots (their storage is kept)
    std::unordered_map<int64_t, uint32_t> index_; // checkpoint id -> slot
};

} // namespace llmem
