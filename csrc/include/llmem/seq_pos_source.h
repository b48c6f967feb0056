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
};

} // namespace llmem
