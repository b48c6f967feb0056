#pragma once

#include <cstdint>

namespace llmem {

/// What the batch allocator needs to know of a memory: the position range each sequence
/// already holds. Every llmem memory implements it; both calls return -1 for an empty sequence.
class seq_pos_source {
public:
    virtual ~seq_pos_source() = default;

    virtual int32_t seq_pos_min(int32_t seq) const = 0;
    virtual int32_t seq_pos_max(int32_t seq) const = 0;

    /// out[k] = seq_pos_max(seqs[k]) for k < n: one call for a decode step's sequences (a memory
    /// overrides it with a loop that needs no call per sequence, and may start loading what the
    /// step will write for them).
    virtual void seq_pos_max_each(const int32_t * seqs, uint32_t n, int32_t * out) const {
        for (uint32_t k = 0; k < n; ++k) {
            out[k] = seq_pos_max(seqs[k]);
        }
    }
};

} // namespace llmem
