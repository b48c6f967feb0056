#pragma once

#include <cstdint>
#include <limits>

namespace llmem {

/// Upper end of an open position range: `p1 < 0` in a sequence operation means "up to here".
constexpr int32_t POS_OPEN = std::numeric_limits<int32_t>::max();

/// Largest n_seq_max any llmem object accepts. llama.cpp stops at 256; the per-sequence arrays
/// of llmem are sized by n_seq_max, so the limit only bounds memory use.
constexpr int32_t SEQ_MAX_LIMIT = 1 << 16;

/// Token id meaning "this entry carries no token id" (an embedding-only entry).
constexpr int32_t NO_TOKEN = -1;

/// Sliding-window attention kinds (llama.cpp's llama_swa_type, same numbering).
enum class swa_type : int32_t {
    NONE      = 0,
    STANDARD  = 1,
    CHUNKED   = 2,
    SYMMETRIC = 3,
};

/// Normalised half-open position range [p0, p1): negative p0 -> 0, negative p1 -> POS_OPEN.
struct pos_range {
    int32_t p0;
    int32_t p1;

    static pos_range normalise(int32_t p0, int32_t p1) {
        return { p0 < 0 ? 0 : p0, p1 < 0 ? POS_OPEN : p1 };
    }

    bool contains(int32_t p) const { return p0 <= p && p < p1; }
    bool is_everything() const { return p0 == 0 && p1 == POS_OPEN; }
};

} // namespace llmem
