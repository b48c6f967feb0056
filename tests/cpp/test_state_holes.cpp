// State holes: a KV cache without buffers writes the state bytes of a cache with buffers, its
// tensor sections zero and reported (offset, layer, kind, stream, cells), so that filling them
// from the tensors gives the same bytes; reading reports where each section's rows go.

#include "llmem/kv_cache.h"
#include "llmem/state_holes.h"
#include "kv_test_util.h"

#include <gtest/gtest.h>

#include <cstring>

namespace {

using namespace llmem;
using namespace llmem::test;

// The rows of one hole, copied from a cache's own K/V buffers in the section's layout.
void fill(const state_hole & h, const state_hole_log & log, const kv_cache & c, const uint8_t * k,
          const uint8_t * v, uint8_t * out) {
    const auto & p = c.params();
    uint8_t *    w = out;
    for (size_t i = 0; i < h.n_cells; ++i) {
        const uint32_t cell = log.cells[h.cells_at + i];
        if (h.kind == hole_kind::K_ROWS) {
            const size_t rb = c.k_row_bytes(h.layer);
            std::memcpy(w + i * rb, k + (size_t(h.stream) * p.kv_size + cell) * rb, rb);
        } else if (h.kind == hole_kind::V_ROWS) {
            const size_t rb = c.v_row_bytes(h.layer);
            std::memcpy(w + i * rb, v + (size_t(h.stream) * p.kv_size + cell) * rb, rb);
        }
    }
    if (h.kind == hole_kind::V_TRANS) {
        const size_t es = kv_type_size(p.type_v);
        for (uint32_t j = 0; j < h.n_cols; ++j) {
            for (size_t i = 0; i < h.n_cells; ++i) {
                const uint32_t cell = log.cells[h.cells_at + i];
                std::memcpy(w + (j * h.n_cells + i) * es,
                            v + ((size_t(h.stream) * p.n_embd_v_max + j) * p.kv_size + cell) * es, es);
            }
        }
    }
}

TEST(StateHoles, FilledHolesGiveTheBytesOfACacheWithBuffers) {
    for (const bool v_trans : { true, false }) {
        kv_cache_params p = params(16, 2, false);
        p.v_trans         = v_trans;
        kv_cache owned(p), bare(p);
        std::vector<uint8_t> k(owned.k_buffer_bytes(0)), v(owned.v_buffer_bytes(0));
        for (size_t i = 0; i < k.size(); ++i) {
            k[i] = uint8_t(i * 7 + 1);
        }
        for (size_t i = 0; i < v.size(); ++i) {
            v[i] = uint8_t(i * 13 + 5);
        }
        owned.set_layer_buffers(0, k.data(), v.data());
        for (kv_cache * c : { &owned, &bare }) {
            place(*c, run(0, 0, 5));
            place(*c, run(1, 0, 3));
            c->seq_rm(0, 1, 2);
        }
        for (const int32_t seq : { -1, 0, 1 }) {
            std::vector<uint8_t> want, got;
            owned.state_write(want, seq);
            state_hole_log log;
            {
                state_hole_scope scope(log);
                bare.state_write(got, seq);
            }
            ASSERT_EQ(want.size(), got.size());
            ASSERT_FALSE(log.holes.empty());
            for (const state_hole & h : log.holes) {
                EXPECT_EQ(h.owner, &bare);
                const size_t off = size_t(h.at - got.data());
                ASSERT_LE(off + h.len, got.size());
                for (size_t i = 0; i < h.len; ++i) {
                    ASSERT_EQ(got[off + i], 0u);
                }
                fill(h, log, bare, k.data(), v.data(), got.data() + off);
            }
            EXPECT_EQ(want, got) << "seq " << seq << (v_trans ? " v_trans" : "");
        }
        // reading: the sections of the input and the cells they go to
        std::vector<uint8_t> data;
        owned.state_write(data, 0);
        kv_cache       fresh(p);
        state_hole_log log;
        {
            state_hole_scope scope(log);
            size_t off = 0;
            fresh.state_read(data.data(), data.size(), off, 0);
        }
        ASSERT_EQ(log.holes.size(), 2u);  // K and V of the one layer
        for (const state_hole & h : log.holes) {
            EXPECT_GE(h.at, data.data());
            EXPECT_LE(h.at + h.len, data.data() + data.size());
            EXPECT_EQ(h.n_cells, 4u);
        }
        // nothing is logged without a scope, and a cache with buffers logs nothing
        state_hole_log none;
        {
            state_hole_scope scope(none);
            std::vector<uint8_t> out;
            owned.state_write(out, -1);
        }
        EXPECT_TRUE(none.holes.empty());
        EXPECT_EQ(active_state_hole_log(), nullptr);
    }
}

} // namespace
