#pragma once

// Helpers shared by the KV tests: hand-made ubatches, a placement driver and a compact dump of
// the cells ("0:p0{0,1} . 3:p2{0}") so expectations read like the spec's worked examples.

#include "llmem/kv_cache.h"

#include <algorithm>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace llmem::test {

struct tok {
    std::vector<int32_t> seqs;  // primary id first
    int32_t              pos;
};

/// A ubatch of the given tokens (in order); equal_seqs marks the per-stream grouped form.
inline ubatch make_ub(const std::vector<tok> & toks, bool equal_seqs = false) {
    ubatch ub;
    ub.n_tokens = uint32_t(toks.size());
    ub.data     = std::make_shared<ubatch_data>();
    auto & d    = *ub.data;
    std::set<int32_t> unq;
    d.seq_id_off.push_back(0);
    for (const auto & t : toks) {
        d.pos.push_back(t.pos);
        for (int32_t s : t.seqs) {
            d.seq_id.push_back(s);
            unq.insert(s);
        }
        d.seq_id_off.push_back(int32_t(d.seq_id.size()));
        d.output.push_back(0);
    }
    d.seq_id_unq.assign(unq.begin(), unq.end());
    ub.n_seqs_unq   = uint32_t(unq.size());
    ub.equal_seqs   = equal_seqs;
    ub.n_seqs       = equal_seqs ? ub.n_seqs_unq : ub.n_tokens;
    ub.n_seq_tokens = ub.n_tokens / std::max<uint32_t>(1, ub.n_seqs);
    return ub;
}

/// Tokens of one sequence at positions [p0, p1).
inline std::vector<tok> run(int32_t seq, int32_t p0, int32_t p1) {
    std::vector<tok> v;
    for (int32_t p = p0; p < p1; ++p) {
        v.push_back({ { seq }, p });
    }
    return v;
}

inline std::vector<tok> cat(std::vector<tok> a, const std::vector<tok> & b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

inline kv_cache_params params(uint32_t size, int32_t n_seq_max = 1, bool unified = true,
                              swa_type swa = swa_type::NONE, uint32_t n_swa = 0) {
    kv_cache_params p;
    p.kv_size   = size;
    p.n_seq_max = n_seq_max;
    p.unified   = unified;
    p.swa       = swa;
    p.n_swa     = n_swa;
    p.type_k    = int32_t(kv_type::F32);
    p.type_v    = int32_t(kv_type::F32);
    p.layer_il  = { 0 };
    p.n_embd_k  = { 4 };
    p.n_embd_v  = { 4 };
    // the byte layouts these tests spell out are llama.cpp b11312's (test_kv_state_format.cpp
    // covers format 4)
    p.state_format = KV_STATE_FORMAT_B11312;
    return p;
}

/// Cells of ubatches placed as a batch context would: prepare all, then apply in order.
/// Returns the cell lists (one per ubatch; groups concatenated), or {} when prepare failed.
inline std::vector<std::vector<uint32_t>> place(kv_cache & c, const std::vector<ubatch> & ubs) {
    std::vector<slot_info> slots;
    if (!c.prepare_into(ubs, slots)) {
        return {};
    }
    std::vector<std::vector<uint32_t>> out;
    for (size_t k = 0; k < ubs.size(); ++k) {
        c.apply_ubatch(slots[k], ubs[k]);
        out.push_back(slots[k].idxs);
    }
    return out;
}

/// A simple split of `toks` into ubatches of n_ubatch, then place().
inline std::vector<std::vector<uint32_t>> place(kv_cache & c, const std::vector<tok> & toks, uint32_t n_ubatch = 512) {
    std::vector<ubatch> ubs;
    for (size_t k = 0; k < toks.size(); k += n_ubatch) {
        ubs.push_back(make_ub(std::vector<tok>(toks.begin() + std::ptrdiff_t(k),
                                               toks.begin() + std::ptrdiff_t(std::min(toks.size(), k + n_ubatch)))));
    }
    return place(c, ubs);
}

/// "c:pP{s,..}" for used cells, "." for empty ones, separated by spaces.
inline std::string dump(const kv_cells & T) {
    std::string s;
    for (uint32_t i = 0; i < T.size(); ++i) {
        if (i) {
            s += ' ';
        }
        if (T.is_empty(i)) {
            s += '.';
            continue;
        }
        s += std::to_string(i) + ":p" + std::to_string(T.pos_get(i)) + "{";
        uint32_t        n   = 0;
        const int32_t * ids = T.seq_list(i, n);
        for (uint32_t k = 0; k < n; ++k) {
            s += (k ? "," : "") + std::to_string(ids[k]);
        }
        s += "}";
    }
    return s;
}

inline std::string dump(const kv_cache & c, uint32_t stream = 0) { return dump(c.cells(stream)); }

using idx_list = std::vector<uint32_t>;

} // namespace llmem::test
