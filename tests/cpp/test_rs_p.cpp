// The recurrent memory's third per-layer array, P (llama.cpp's p_l, "cache_ple_r_l"): attached
// per present layer, written after each layer's R rows (u64 row size, rows), read back, refused
// when its row size differs, zeroed by clear, gathered and stored as kind 2, checkpointed.

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/rs_checkpoints.h"
#include "llmem/rs_memory.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

using namespace llmem;

namespace {

ubatch one_token(int32_t seq, int32_t pos) {
    auto d = std::make_shared<ubatch_data>();
    d->pos        = { pos };
    d->seq_id     = { seq };
    d->seq_id_off = { 0, 1 };
    d->output     = { 0 };
    ubatch ub;
    ub.equal_seqs   = true;
    ub.n_seq_tokens = 1;
    ub.n_seqs       = 1;
    ub.n_seqs_unq   = 1;
    ub.n_tokens     = 1;
    ub.data         = d;
    return ub;
}

// Two present layers of F32 arrays: r of 2, s of 1, P of 3 on layer 0 only.
struct p_memory {
    rs_memory mem;
    std::vector<float> r0, r1, s0, s1, p0;

    explicit p_memory(uint32_t size, uint32_t n_rs_seq = 0, uint32_t p_width = 3) : mem(size, int32_t(size), n_rs_seq) {
        const size_t rows = size_t(size) * (1 + n_rs_seq);
        r0.assign(rows * 2, 0.0f);
        r1.assign(rows * 2, 0.0f);
        s0.assign(rows, 0.0f);
        s1.assign(rows, 0.0f);
        p0.assign(rows * p_width, 0.0f);
        rs_buffers b;
        b.n_layer_total = 2;
        b.r             = { bytes(r0), bytes(r1) };
        b.s             = { bytes(s0), bytes(s1) };
        b.r_row_bytes   = { 8, 8 };
        b.s_row_bytes   = { 4, 4 };
        b.p             = { bytes(p0), nullptr };
        b.p_row_bytes   = { uint64_t(p_width) * 4, 0 };
        mem.attach_buffers(b);
    }
    static uint8_t * bytes(std::vector<float> & v) { return reinterpret_cast<uint8_t *>(v.data()); }

    // decode one token of seq, storing `tag` into every row the computation writes
    void decode(int32_t seq, int32_t pos, float tag) {
        rs_context ctx(&mem, std::vector<ubatch>{ one_token(seq, pos) });
        ASSERT_TRUE(ctx.apply());
        for (int kind = 0; kind < RS_KINDS; ++kind) {
            for (size_t l = 0; l < 2; ++l) {
                if (kind == 2 && l == 1) {
                    continue;
                }
                const size_t n = size_t(ctx.row_bytes(kind, l) / 4);
                std::vector<float> in(n), out(n, tag + float(kind) + 10.0f * float(l));
                ctx.gather(kind, l, reinterpret_cast<uint8_t *>(in.data()));
                ctx.store(kind, l, reinterpret_cast<const uint8_t *>(out.data()), 1);
            }
        }
    }

    std::vector<uint8_t> write(int32_t seq) const {
        std::vector<uint8_t> out(mem.state_write_size(seq, 0));
        mem.state_write(out.data(), out.size(), seq, 0);
        return out;
    }
};

template <typename T> T at(const std::vector<uint8_t> & b, size_t off) {
    T v;
    std::memcpy(&v, b.data() + off, sizeof(T));
    return v;
}

} // namespace

TEST(RsP, LayoutPutsPRowsAfterTheLayersRRows) {
    p_memory m(2);
    m.decode(0, 0, 1.0f);
    const auto blob = m.write(0);
    // cell count, pos, n_ids | s_trans, n_layer | layer 0: type, 8, r row (8 bytes), 12, p row (12 bytes)
    // | layer 1: type, 8, r row | layer 0: type, 4, s row | layer 1: type, 4, s row
    ASSERT_EQ(blob.size(), 12u + 8u + (12u + 8u + 8u + 12u) + (12u + 8u) + 2u * (12u + 4u));
    EXPECT_EQ(at<uint64_t>(blob, 24), 8u);
    EXPECT_EQ(at<float>(blob, 32), 1.0f);
    EXPECT_EQ(at<uint64_t>(blob, 40), 12u);
    EXPECT_EQ(at<float>(blob, 48), 3.0f);   // P: tag + kind 2
    EXPECT_EQ(at<int32_t>(blob, 60), 0);    // layer 1's r type
    EXPECT_EQ(at<uint64_t>(blob, 64), 8u);
    EXPECT_EQ(at<float>(blob, 72), 11.0f);
}

TEST(RsP, RoundTripAndRefusals) {
    p_memory a(3);
    a.decode(0, 0, 1.0f);
    a.decode(1, 0, 5.0f);
    const auto whole = a.write(-1);
    p_memory b(3);
    b.decode(2, 0, 9.0f);
    b.mem.state_read(whole.data(), whole.size(), -1, 0, true);
    EXPECT_EQ(b.write(-1), whole);
    EXPECT_EQ(b.p0[0], 3.0f);
    EXPECT_EQ(b.p0[3], 7.0f);
    EXPECT_EQ(b.p0[6], 0.0f);  // cleared

    // a memory whose P rows are 4 values wide refuses it, unchanged
    p_memory c(3, 0, 4);
    c.decode(1, 0, 2.0f);
    const auto before = c.write(-1);
    EXPECT_THROW(c.mem.state_read(whole.data(), whole.size(), -1, 0, true), state_error);
    EXPECT_EQ(c.write(-1), before);
    // truncated inside the P rows
    const auto one = a.write(0);
    for (size_t cut : { size_t(44), size_t(50), one.size() - 1 }) {
        EXPECT_THROW(b.mem.state_read(one.data(), cut, 0, 0, true), state_error) << cut;
    }
    b.mem.state_read(one.data(), one.size(), 2, 0, true);
    EXPECT_EQ(b.write(2), one);
}

TEST(RsP, ClearZeroesPAndKindTwoNeedsAnArray) {
    p_memory m(2);
    m.decode(0, 0, 4.0f);
    m.mem.clear(true);
    for (float v : m.p0) {
        EXPECT_EQ(v, 0.0f);
    }
    rs_context ctx(&m.mem, std::vector<ubatch>{ one_token(0, 0) });
    ASSERT_TRUE(ctx.apply());
    EXPECT_THROW(ctx.row_bytes(2, 1), std::invalid_argument);
    EXPECT_THROW(ctx.row_bytes(3, 0), std::invalid_argument);
    EXPECT_EQ(ctx.row_bytes(2, 0), 12u);
}

TEST(RsP, InconsistentBuffersAreRefused) {
    rs_memory mem(1, 1, 0);
    std::vector<float> r(2), s(2), p(2);
    rs_buffers b;
    b.n_layer_total = 1;
    b.r             = { reinterpret_cast<uint8_t *>(r.data()) };
    b.s             = { reinterpret_cast<uint8_t *>(s.data()) };
    b.r_row_bytes   = { 8 };
    b.s_row_bytes   = { 8 };
    b.p             = { reinterpret_cast<uint8_t *>(p.data()), nullptr };  // two entries, one layer
    b.p_row_bytes   = { 8, 0 };
    EXPECT_THROW(mem.attach_buffers(b), std::invalid_argument);
    b.p           = { nullptr };
    b.p_row_bytes = { 8 };  // rows without an array
    EXPECT_THROW(mem.attach_buffers(b), std::invalid_argument);
}

TEST(RsP, CheckpointsCarryP) {
    p_memory m(3);
    m.decode(0, 0, 2.0f);
    rs_checkpoints pool(m.mem, 4, 1 << 20);
    EXPECT_EQ(pool.checkpoint_bytes(), 2u * 8u + 2u * 4u + 12u);
    const int64_t id = pool.save(m.mem, 0);
    m.decode(0, 1, 6.0f);
    pool.restore(m.mem, id, 1);
    const int32_t t = m.mem.tail(1);
    ASSERT_GE(t, 0);
    EXPECT_EQ(m.p0[size_t(t) * 3], 4.0f);
}
