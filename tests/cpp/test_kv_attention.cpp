// The attention metadata builders (kv_attention.cpp) against the spec's rule evaluated entry by
// entry (spec 7.4), on random cache states of every kind: the dense mask in f32, f16 and with
// padded rows, the per-token lists and the paged form.

#include "kv_test_util.h"

#include "llmem/kv_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

using namespace llmem;
using namespace llmem::test;

namespace {

// spec 7.4 for token t (no 2-D, no ALiBi): does it attend cell j of its stream?
bool attends(const kv_cache & c, const slot_info & slot, const ubatch & ub, uint32_t t, uint32_t j, bool causal) {
    const uint32_t   n = slot.n_per_group;
    const kv_cells & T = c.cells(slot.strm[t / n]);
    const int32_t    s = ub.primary(t);
    if (T.is_empty(j) || !T.seq_has(j, s)) {
        return false;
    }
    const int32_t p0 = T.pos_get(j);
    const int32_t p1 = ub.pos(t);
    if (causal && p0 > p1) {
        return false;
    }
    return !is_masked_swa(c.params().n_swa, c.params().swa, p0, p1);
}

struct cfg {
    bool     unified;
    swa_type swa;
    uint32_t n_swa;
};

std::string cfg_name(const ::testing::TestParamInfo<cfg> & info) {
    static const char * kinds[] = { "none", "standard", "chunked", "symmetric" };
    return std::string(info.param.unified ? "unified_" : "streams_") + kinds[int(info.param.swa)];
}

class KvAttentionRandom : public ::testing::TestWithParam<cfg> {};

TEST_P(KvAttentionRandom, EveryFormMatchesTheRule) {
    const cfg    g = GetParam();
    std::mt19937 rng(1234u + uint32_t(g.swa) * 7u + (g.unified ? 1u : 0u));
    const int32_t n_seq = 3;
    kv_cache c(params(g.unified ? 40 : 20, n_seq, g.unified, g.swa, g.n_swa));
    int checked = 0;
    for (int step = 0; step < 80; ++step) {
        if (rng() % 6 == 0) {
            const int32_t s  = int32_t(rng() % n_seq);
            const int32_t mx = c.seq_pos_max(s);
            if (mx > 0) {
                c.seq_rm(s, int32_t(rng() % uint32_t(mx)), -1);
            }
            continue;
        }
        // tokens: per-stream caches need equal counts grouped by sequence
        std::vector<tok> toks;
        const uint32_t   k = 1 + rng() % 4;
        for (int32_t s = 0; s < n_seq; ++s) {
            if (rng() % 2 == 0 && !(s == n_seq - 1 && toks.empty())) {
                continue;
            }
            const int32_t p = c.seq_pos_max(s) + 1;
            toks = cat(toks, run(s, p, p + int32_t(k)));
        }
        if (g.unified) {
            std::shuffle(toks.begin(), toks.end(), rng);
            // keep each sequence's positions increasing in batch order
            std::vector<int32_t> next(n_seq);
            for (int32_t s = 0; s < n_seq; ++s) {
                next[size_t(s)] = c.seq_pos_max(s) + 1;
            }
            for (auto & t : toks) {
                t.pos = next[size_t(t.seqs[0])]++;
            }
        }
        const ubatch ub = make_ub(toks, !g.unified);
        std::vector<slot_info> slots;
        if (!c.prepare_into({ ub }, slots)) {
            c.clear(false);
            continue;
        }
        c.apply_ubatch(slots[0], ub);
        const slot_info & slot = slots[0];
        const uint32_t    n_kv = c.get_n_kv(slot);
        for (bool causal : { true, false }) {
            const uint32_t      pad = 1 + rng() % 5;
            const kq_mask_shape sh  = kq_mask_shape_of(slot, ub, n_kv, pad);
            std::vector<float>    m(sh.n_elements(), 1.0f);
            std::vector<uint16_t> h(sh.n_elements(), 1);
            kq_mask_fill(c, slot, ub, n_kv, causal, mask_type::F32, pad, m.data());
            kq_mask_fill(c, slot, ub, n_kv, causal, mask_type::F16, pad, h.data());
            std::vector<int64_t> offs(ub.n_tokens + 1);
            std::vector<int32_t> cells(kq_cells_count(c, slot, ub, n_kv, causal));
            kq_cells_fill(c, slot, ub, n_kv, causal, offs.data(), cells.data());
            const paged_kv_sizes ps = paged_kv_count(c, slot, ub, causal);
            std::vector<int32_t> seq_ids(ps.n_seqs), qo_seq(ub.n_tokens), qo_indptr(ps.n_seqs + 1),
                qo_order(ub.n_tokens), kv_indptr(ps.n_seqs + 1), kv_indices(ps.n_pages), last(ps.n_seqs),
                kv_start(ub.n_tokens), kv_end(ub.n_tokens);
            paged_kv_fill(c, slot, ub, causal,
                          { seq_ids.data(), qo_seq.data(), qo_indptr.data(), qo_order.data(), kv_indptr.data(),
                            kv_indices.data(), last.data(), kv_start.data(), kv_end.data() });
            for (uint32_t t = 0; t < ub.n_tokens; ++t) {
                const uint32_t grp = t / slot.n_per_group;
                const size_t   row = (size_t(grp) * sh.rows_per_group + t % slot.n_per_group) * n_kv;
                std::vector<int32_t> want;
                for (uint32_t j = 0; j < n_kv; ++j) {
                    const bool a = attends(c, slot, ub, t, j, causal);
                    ASSERT_EQ(m[row + j], a ? 0.0f : -INFINITY) << "t " << t << " j " << j;
                    ASSERT_EQ(h[row + j], a ? 0x0000 : 0xFC00);
                    if (a) {
                        want.push_back(int32_t(j));
                    }
                }
                ASSERT_EQ(std::vector<int32_t>(cells.begin() + offs[t], cells.begin() + offs[t + 1]), want);
                std::vector<int32_t> seen;
                for (int32_t k2 = kv_start[t]; k2 < kv_end[t]; ++k2) {
                    ASSERT_EQ(uint32_t(kv_indices[size_t(k2)]) / c.size(), slot.strm[grp]);
                    seen.push_back(int32_t(uint32_t(kv_indices[size_t(k2)]) % c.size()));
                }
                std::sort(seen.begin(), seen.end());
                ASSERT_EQ(seen, want);
                const int32_t r = qo_seq[t];
                ASSERT_EQ(seq_ids[size_t(r)], ub.primary(t));
                ASSERT_LE(kv_indptr[size_t(r)], kv_start[t]);
                ASSERT_LE(kv_end[t], kv_indptr[size_t(r) + 1]);
            }
            for (uint32_t grp = 0; grp < sh.n_groups; ++grp) {
                for (size_t e = (size_t(grp) * sh.rows_per_group + sh.n_tps) * n_kv;
                     e < size_t(grp + 1) * sh.rows_per_group * n_kv; ++e) {
                    ASSERT_EQ(m[e], -INFINITY);  // padding rows
                }
            }
        }
        ++checked;
    }
    EXPECT_GT(checked, 20);
}

INSTANTIATE_TEST_SUITE_P(
    AllKinds, KvAttentionRandom,
    ::testing::Values(cfg{ true, swa_type::NONE, 0 }, cfg{ true, swa_type::STANDARD, 5 },
                      cfg{ true, swa_type::CHUNKED, 4 }, cfg{ true, swa_type::SYMMETRIC, 6 },
                      cfg{ false, swa_type::NONE, 0 }, cfg{ false, swa_type::STANDARD, 3 },
                      cfg{ false, swa_type::CHUNKED, 4 }, cfg{ false, swa_type::SYMMETRIC, 4 }),
    cfg_name);

TEST(KvDecodeStep, OneUbatchOnlyForConsecutiveIdsWithStreams) {
    const int32_t a[] = { 0, 1, 2 };
    const int32_t b[] = { 0, 2 };
    const int32_t d[] = { 1, 0 };
    EXPECT_TRUE(decode_step_is_one_ubatch(1, b, 2));
    EXPECT_TRUE(decode_step_is_one_ubatch(4, a, 3));
    EXPECT_FALSE(decode_step_is_one_ubatch(4, b, 2));
    EXPECT_FALSE(decode_step_is_one_ubatch(4, d, 2));
}

TEST(KvDecodeStep, PlacesAndAppliesOrChangesNothing) {
    kv_cache      c(params(4, 2));
    const int32_t ids[] = { 1, 0 };
    kv_context    ctx = kv_decode_step(c, c, ids, 2, nullptr);
    ASSERT_EQ(ctx.status(), memory_status::SUCCESS);
    EXPECT_EQ(c.seq_pos_max(0), 0);
    EXPECT_EQ(c.seq_pos_max(1), 0);
    EXPECT_GT(ctx.n_kv(), 0u);
    kv_context ctx2 = kv_decode_step(c, c, ids, 2, nullptr);
    ASSERT_EQ(ctx2.status(), memory_status::SUCCESS);
    EXPECT_EQ(c.used_count(), 4u);
    kv_context full = kv_decode_step(c, c, ids, 2, nullptr);
    EXPECT_EQ(full.status(), memory_status::FAILED_PREPARE);
    EXPECT_EQ(c.used_count(), 4u);
    const int32_t dup[] = { 0, 0 };
    EXPECT_THROW(kv_decode_step(c, c, dup, 2, nullptr), std::invalid_argument);
    const int32_t out_of_range[] = { 2 };
    EXPECT_THROW(kv_decode_step(c, c, out_of_range, 1, nullptr), std::invalid_argument);
    EXPECT_EQ(c.used_count(), 4u);
}

} // namespace
