#include "llmem/hybrid.h"

#include "llmem/errors.h"

#include <algorithm>

namespace llmem {

int32_t hybrid_positions::seq_pos_min(int32_t seq) const {
    return std::max(attn_.seq_pos_min(seq), recr_.seq_pos_min(seq));
}

int32_t hybrid_positions::seq_pos_max(int32_t seq) const {
    return std::min(attn_.seq_pos_max(seq), recr_.seq_pos_max(seq));
}

hybrid_plan hybrid_prepare(batch_allocr & balloc, uint32_t n_ubatch, bool embd_all, kv_cache & base, kv_cache * swa,
                           rs_memory & recr) {
    hybrid_plan plan;
    const uint32_t keep_tail  = recr.n_rs_seq() > 0 ? recr.n_rs_seq() + 1 : 0;
    const bool     sequential = base.n_stream() != 1;

    balloc.split_reset();
    for (;;) {
        ubatch ub = embd_all ? balloc.split_seq(n_ubatch) : balloc.split_equal(n_ubatch, sequential, keep_tail);
        if (ub.empty()) {
            break;
        }
        plan.ubatches.push_back(std::move(ub));
    }
    if (balloc.n_used() < balloc.n_tokens()) {
        plan.ubatches.clear();
        return plan;  // e.g. tokens shared by several sequences with per-sequence attention streams
    }
    // llama.cpp's order: the recurrent side first, then the attention caches
    if (!recr.prepare(plan.ubatches)) {
        plan.ubatches.clear();
        return plan;
    }
    plan.slots_base = base.prepare(plan.ubatches);
    if (plan.slots_base.empty()) {
        plan.ubatches.clear();
        return plan;
    }
    if (swa != nullptr) {
        plan.slots_swa = swa->prepare(plan.ubatches);
        if (plan.slots_swa.empty()) {
            plan.ubatches.clear();
            plan.slots_base.clear();
            return plan;
        }
    }
    plan.status = memory_status::SUCCESS;
    return plan;
}

size_t hybrid_state_read(const std::vector<kv_cache *> & caches, rs_memory & recr, const uint8_t * data, size_t n,
                         int32_t seq, uint32_t flags) {
    // the attention sections are parsed and placed in journaled transactions; the recurrent
    // section (itself all or nothing) is read before they commit, and a failure rolls them back
    return kv_state_read_all(caches, data, n, 0, seq, /*exact=*/true, [&](size_t off) {
        return off + recr.state_read(data + off, n - off, seq, flags, /*whole_buffer=*/true);
    });
}

} // namespace llmem
