#pragma once

// What attention reads for a micro-batch placed in a KV cache: the dense KQ mask (f32 or f16,
// optionally with padded rows), the write indices, the visibility as per-token cell lists, and
// the paged-attention form (per-sequence page tables with page size 1). Plus the one-call
// decode step (one token per sequence) that plans and applies without a batch allocator.
//
// Every builder costs O(what it writes) plus O(log) searches of the per-sequence position index
// the cells keep: a token's visible cells are one contiguous range of its sequence's index (the
// positions inside its causal/window interval), so no per-token gather and sort is needed.

#include "llmem/kv_cache.h"

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace llmem {

/// Element type of a dense KQ mask (llama.cpp writes f16 when flash attention is on).
enum class mask_type { F32, F16 };

/// Layout of the dense mask of one micro-batch: n_groups blocks (one per stream with per-sequence
/// streams, else one), each of rows_per_group rows (its n_tps tokens, then -inf padding rows up to
/// a multiple of the requested pad) of n_kv entries. Flat offset of token k of group g, cell j:
/// (g * rows_per_group + k) * n_kv + j. Without padding it is llama.cpp's [n_kv, n_tps, 1, n_groups].
struct kq_mask_shape {
    uint32_t n_groups       = 0;
    uint32_t n_tps          = 0;
    uint32_t rows_per_group = 0;
    uint32_t n_kv           = 0;

    size_t n_rows()     const { return size_t(n_groups) * rows_per_group; }
    size_t n_elements() const { return n_rows() * n_kv; }
};

/// The mask layout for a ubatch placed at slot; pad >= 1 (1: no padding rows).
kq_mask_shape kq_mask_shape_of(const slot_info & slot, const ubatch & ub, uint32_t n_kv, uint32_t pad);

/// Write the dense mask (0 attend, -inf not; spec 7.4 without ALiBi) into out, laid out as
/// kq_mask_shape_of(slot, ub, n_kv, pad); out holds n_elements() floats or f16 values.
void kq_mask_fill(const kv_cache & cache, const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal,
                  mask_type type, uint32_t pad, void * out);

/// Number of (token, cell) pairs the mask lets attend: the length kq_cells fills.
size_t kq_cells_count(const kv_cache & cache, const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal);

/// The visibility as lists: token t attends cells[offsets[t] .. offsets[t+1]) (cell indices
/// within the token's stream, ascending). offsets has n_tokens + 1 entries, cells room for
/// kq_cells_count(...) entries.
void kq_cells_fill(const kv_cache & cache, const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal,
                   int64_t * offsets, int32_t * cells);

/// Row of each token in the stacked [n_stream * kv_size] K rows (out: n_tokens entries).
void kv_k_idxs(const kv_cache & cache, const slot_info & slot, int64_t * out);
/// V destinations (out: v_idxs_count entries): k_idxs when V is not transposed; transposed, the
/// flat element index of (token, feature j < n_embd_v_max) in [n_stream, n_embd_v_max, kv_size],
/// token-major.
size_t kv_v_idxs_count(const kv_cache & cache, const slot_info & slot);
void   kv_v_idxs(const kv_cache & cache, const slot_info & slot, int64_t * out);

/// Sizes of the paged form of one micro-batch (see paged_kv_fill).
struct paged_kv_sizes {
    uint32_t n_tokens = 0;
    uint32_t n_seqs   = 0;   // requests: distinct primary sequences, in order of first token
    size_t   n_pages  = 0;   // entries of kv_indices
};

/// The paged form's sizes; throws llmem::error for a causal 2-D (M-RoPE image) ubatch, whose
/// visibility inside one position is not a range of a position-ordered list.
paged_kv_sizes paged_kv_count(const kv_cache & cache, const slot_info & slot, const ubatch & ub, bool causal);

/// Output arrays of paged_kv_fill (int32, sizes from paged_kv_sizes).
struct paged_kv_out {
    int32_t * seq_ids;          // [n_seqs]     sequence id of each request
    int32_t * qo_seq;           // [n_tokens]   request of each ubatch token (query-to-sequence map)
    int32_t * qo_indptr;        // [n_seqs + 1] tokens of request r: qo_order[qo_indptr[r] .. qo_indptr[r+1])
    int32_t * qo_order;         // [n_tokens]   ubatch token indices grouped by request, in ubatch order
    int32_t * kv_indptr;        // [n_seqs + 1] pages of request r: kv_indices[kv_indptr[r] .. kv_indptr[r+1])
    int32_t * kv_indices;       // [n_pages]    global K row (stream * kv_size + cell) of each page, position order
    int32_t * kv_last_page_len; // [n_seqs]     1 (page size 1), 0 for a request with no page
    int32_t * kv_start;         // [n_tokens]   token t attends kv_indices[kv_start[t] .. kv_end[t])
    int32_t * kv_end;           // [n_tokens]
};

/// The paged-attention form (FlashInfer/FlashAttention style, page size 1 = one cell): for each
/// request (sequence) the cells it attends in position order, and for each token the contiguous
/// slice of its request's pages it sees (its causal limit and window). Exactly the dense mask's
/// visibility: token t attends cell j iff j appears in its slice.
void paged_kv_fill(const kv_cache & cache, const slot_info & slot, const ubatch & ub, bool causal,
                   const paged_kv_out & out);

/// The decode step in one call: one token of each of seq_ids[0..n) (distinct ids), at position
/// seq_pos_max + 1 of the position source, every token an output; tokens may be null (no token
/// ids). When llama.cpp's split of that batch is a single micro-batch (always for one stream;
/// consecutive ascending ids for per-sequence streams), plans it exactly as kv_init_batch and
/// applies it, returning the applied context; FAILED_PREPARE (nothing changed) when it does not
/// fit. Returns a context with status NO_UPDATE (nothing changed) when the split would take
/// several micro-batches: the caller takes the general path. The caller checked the ids.
kv_context kv_decode_step(kv_cache & cache, const seq_pos_source & positions, const int32_t * seq_ids, uint32_t n,
                          const int32_t * tokens);

/// The same for an iSWA pair (llama.cpp's order of attempts, as kv_iswa_init_batch).
std::pair<kv_context, kv_context> kv_iswa_decode_step(kv_cache & base, kv_cache & swa, const int32_t * seq_ids,
                                                      uint32_t n, const int32_t * tokens);

/// The decode step's argument checks (std::invalid_argument naming the bad value): at least one
/// id, ids in [0, n_seq_max) and distinct, tokens (may be null) not negative.
void check_decode_step_args(int32_t n_seq_max, const int32_t * seq_ids, uint32_t n, const int32_t * tokens);

/// Whether kv_decode_step's batch is one micro-batch for a cache of n_stream streams.
bool decode_step_is_one_ubatch(uint32_t n_stream, const int32_t * seq_ids, uint32_t n);

} // namespace llmem
