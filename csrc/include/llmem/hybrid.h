#pragma once

#include "llmem/batch.h"
#include "llmem/kv_cache.h"
#include "llmem/rs_memory.h"
#include "llmem/seq_pos_source.h"
#include "llmem/status.h"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llmem {

/// Positions of a hybrid memory as llama.cpp reports them: a sequence starts where both parts
/// have it (max of the minima) and ends where both still have it (min of the maxima).
class hybrid_positions final : public seq_pos_source {
public:
    hybrid_positions(const seq_pos_source & attn, const seq_pos_source & recr) : attn_(attn), recr_(recr) {}

    int32_t seq_pos_min(int32_t seq) const override;
    int32_t seq_pos_max(int32_t seq) const override;

private:
    const seq_pos_source & attn_;
    const seq_pos_source & recr_;
};

/// The micro-batches of one hybrid init_batch and the attention slots found for them.
struct hybrid_plan {
    memory_status          status = memory_status::FAILED_PREPARE;
    std::vector<ubatch>    ubatches;
    std::vector<slot_info> slots_base;
    std::vector<slot_info> slots_swa;  // only with an iSWA attention side
};

/// llama.cpp's hybrid init_batch: split once (by sequence with embd_all, else equal-length sets,
/// sequential when the attention cache has several streams, keeping the recurrent rollback tail
/// together), then check that the recurrent memory, the base cache and (if any) the SWA cache can
/// all place every micro-batch. Nothing changes; the status is FAILED_PREPARE when any side
/// cannot.
hybrid_plan hybrid_prepare(batch_allocr & balloc, uint32_t n_ubatch, bool embd_all, kv_cache & base, kv_cache * swa,
                           rs_memory & recr);

/// Read a hybrid state (attention sections of `caches`, in order, then the recurrent section)
/// all or nothing: throws state_error and changes neither side unless every part can be restored.
/// Returns the bytes consumed.
size_t hybrid_state_read(const std::vector<kv_cache *> & caches, rs_memory & recr, const uint8_t * data, size_t n,
                         int32_t seq, uint32_t flags);

} // namespace llmem
