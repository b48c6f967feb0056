#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace llmem {

/// The arrays of one micro-batch. Owned through a shared_ptr so that a ubatch is cheap to copy
/// and its storage can be recycled by the allocator once nobody holds it any more.
struct ubatch_data {
    std::vector<int32_t> token;       // [n_tokens], empty when the batch has no token ids
    std::vector<float>   embd;        // [n_tokens * n_embd], empty when it has no embeddings
    std::vector<int32_t> pos;         // [n_pos * n_tokens], section-major: pos[j*n_tokens + k]
    std::vector<int32_t> seq_id_off;  // [n_tokens + 1]: ids of entry k are seq_id[off[k], off[k+1])
    std::vector<int32_t> seq_id;      // flat ids, each entry's primary id first
    std::vector<int32_t> seq_id_unq;  // distinct ids of the ubatch, ascending
    std::vector<int32_t> seq_idx;     // [n_seq_max]: rank of an id in seq_id_unq, or -1
    std::vector<int8_t>  output;      // [n_tokens] 0/1
    std::vector<int32_t> batch_idx;   // [n_tokens] index of the entry in the input batch
};

/// One micro-batch, as a memory places it and a model computes it. Immutable once produced.
///
/// When equal_seqs is true the entries come in n_seqs groups ("sequence sets") of n_seq_tokens
/// entries each: group s is entries [s*n_seq_tokens, (s+1)*n_seq_tokens), in batch order.
struct ubatch {
    bool     equal_seqs   = false;
    uint32_t n_tokens     = 0;
    uint32_t n_seq_tokens = 0;
    uint32_t n_seqs       = 0;
    uint32_t n_seqs_unq   = 0;
    uint32_t n_pos        = 1;
    uint32_t n_embd       = 0;

    std::shared_ptr<ubatch_data> data;

    bool empty() const { return n_tokens == 0; }
    bool has_token() const { return data && !data->token.empty(); }
    bool has_embd()  const { return data && !data->embd.empty(); }

    /// Temporal position (section 0) of entry k.
    int32_t pos(uint32_t k) const { return data->pos[k]; }
    /// Position of entry k in section j (j < n_pos).
    int32_t pos(uint32_t j, uint32_t k) const { return data->pos[size_t(j) * n_tokens + k]; }

    int32_t n_seq_id(uint32_t k) const { return data->seq_id_off[k + 1] - data->seq_id_off[k]; }
    const int32_t * seq_ids(uint32_t k) const { return data->seq_id.data() + data->seq_id_off[k]; }
    /// The entry's primary id: the first of its ids (llama.cpp's seq_id[k][0]).
    int32_t primary(uint32_t k) const { return data->seq_id[data->seq_id_off[k]]; }

    int32_t seq_idx(int32_t seq) const {
        return seq >= 0 && size_t(seq) < data->seq_idx.size() ? data->seq_idx[seq] : -1;
    }
};

} // namespace llmem
