// The recurrent checkpoint pool: rows copied out and back exactly, positions kept, limits by count
// and bytes, slots reused, refusals changing nothing.

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/rs_checkpoints.h"
#include "llmem/rs_memory.h"

#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <vector>

using namespace llmem;

namespace {

struct memory_with_rows {
    rs_memory mem;
    std::vector<std::vector<float>> r, s;
    static constexpr uint32_t W_R = 3, W_S = 5;

    memory_with_rows(uint32_t size, uint32_t n_layer, uint32_t n_rs_seq = 0) : mem(size, int32_t(size), n_rs_seq) {
        rs_buffers b;
        b.n_layer_total = n_layer;
        const size_t rows = size_t(size) * (1 + n_rs_seq);
        r.assign(n_layer, std::vector<float>(rows * W_R, 0.0f));
        s.assign(n_layer, std::vector<float>(rows * W_S, 0.0f));
        for (uint32_t l = 0; l < n_layer; ++l) {
            b.r.push_back(reinterpret_cast<uint8_t *>(r[l].data()));
            b.s.push_back(reinterpret_cast<uint8_t *>(s[l].data()));
            b.r_row_bytes.push_back(W_R * 4);
            b.s_row_bytes.push_back(W_S * 4);
        }
        mem.attach_buffers(b);
    }

    // place `seq` at `pos` (one token) and give its row values derived from `tag`
    void decode(int32_t seq, int32_t pos, float tag) {
        auto d = std::make_shared<ubatch_data>();
        d->pos = { pos };
        d->seq_id = { seq };
        d->seq_id_off = { 0, 1 };
        d->output = { 0 };
        ubatch ub;
        ub.equal_seqs = true;
        ub.n_seq_tokens = ub.n_seqs = ub.n_tokens = 1;
        ub.data = d;
        ASSERT_TRUE(mem.find_slot(ub));
        const uint32_t row = uint32_t(mem.seq_state_row(seq));
        for (size_t l = 0; l < r.size(); ++l) {
            for (uint32_t k = 0; k < W_R; ++k) r[l][row * W_R + k] = tag + float(10 * l + k);
            for (uint32_t k = 0; k < W_S; ++k) s[l][row * W_S + k] = -tag - float(10 * l + k);
        }
    }

    std::vector<float> rows_of(int32_t seq) const {
        const int64_t row = mem.seq_state_row(seq);
        std::vector<float> out;
        for (size_t l = 0; l < r.size(); ++l) out.insert(out.end(), &r[l][size_t(row) * W_R], &r[l][size_t(row) * W_R] + W_R);
        for (size_t l = 0; l < s.size(); ++l) out.insert(out.end(), &s[l][size_t(row) * W_S], &s[l][size_t(row) * W_S] + W_S);
        return out;
    }
};

} // namespace

TEST(RsCheckpoints, SaveRestoreCopiesEveryRowAndThePosition) {
    memory_with_rows m(4, 3);
    rs_checkpoints pool(m.mem, 8, 1 << 20);
    EXPECT_EQ(pool.checkpoint_bytes(), 3u * (3 + 5) * 4);
    m.decode(0, 41, 1.0f);
    const std::vector<float> saved = m.rows_of(0);
    const int64_t id = pool.save(m.mem, 0);
    EXPECT_EQ(pool.pos(id), 41);
    m.decode(0, 42, 7.0f);          // the source moves on
    ASSERT_TRUE(m.mem.seq_rm(0, -1, -1));  // and goes away
    pool.restore(m.mem, id, 2);
    EXPECT_EQ(m.mem.seq_pos_max(2), 41);
    EXPECT_EQ(m.rows_of(2), saved);
    pool.restore(m.mem, id, 3);     // a checkpoint restores any number of times
    EXPECT_EQ(m.rows_of(3), saved);
    EXPECT_EQ(m.mem.used(), 2u);
}

TEST(RsCheckpoints, LimitsRefuseAndSlotsAreReused) {
    memory_with_rows m(2, 1);
    rs_checkpoints pool(m.mem, 2, 1 << 20);
    m.decode(0, 0, 1.0f);
    const int64_t a = pool.save(m.mem, 0);
    pool.save(m.mem, 0);
    EXPECT_FALSE(pool.has_room());
    EXPECT_THROW(pool.save(m.mem, 0), error);
    EXPECT_EQ(pool.count(), 2u);
    EXPECT_TRUE(pool.drop(a));
    EXPECT_FALSE(pool.drop(a));
    EXPECT_FALSE(pool.contains(a));
    const int64_t c = pool.save(m.mem, 0);
    EXPECT_NE(c, a);
    pool.set_limits(10, 2 * pool.checkpoint_bytes());
    EXPECT_FALSE(pool.has_room());  // by bytes now
    pool.clear();
    EXPECT_EQ(pool.count(), 0u);
    EXPECT_EQ(pool.bytes_used(), 0u);
}

TEST(RsCheckpoints, RefusalsChangeNothing) {
    memory_with_rows m(2, 2);
    rs_checkpoints pool(m.mem, 4, 1 << 20);
    EXPECT_THROW(pool.save(m.mem, 0), std::invalid_argument);  // no state
    m.decode(0, 5, 1.0f);
    m.decode(1, 6, 2.0f);
    const int64_t id = pool.save(m.mem, 0);
    const uint32_t head = m.mem.head(), used = m.mem.used();
    EXPECT_THROW(pool.restore(m.mem, id, 1), std::invalid_argument);     // 1 holds a state
    EXPECT_THROW(pool.restore(m.mem, id + 9, 1), std::invalid_argument); // unknown id
    EXPECT_THROW(pool.restore(m.mem, id, 2), std::invalid_argument);     // outside the memory
    EXPECT_EQ(m.mem.seq_pos_max(1), 6);
    EXPECT_EQ(m.mem.head(), head);
    EXPECT_EQ(m.mem.used(), used);
    memory_with_rows other(2, 3);
    EXPECT_THROW(pool.restore(other.mem, id, 0), std::invalid_argument); // another layout
}

TEST(RsCheckpoints, APendingRollbackIsSavedAsItsSnapshot) {
    memory_with_rows m(2, 1, 2);
    m.decode(0, 3, 1.0f);
    ASSERT_TRUE(m.mem.seq_rm(0, 3, -1));  // roll back one token: plane 1 selected
    rs_checkpoints pool(m.mem, 4, 1 << 20);
    EXPECT_EQ(m.mem.seq_state_row(0), int64_t(m.mem.size()) + m.mem.tail(0));
    const int64_t id = pool.save(m.mem, 0);
    EXPECT_EQ(pool.pos(id), 2);
}

TEST(RsCheckpoints, BookkeepingOnlyKeepsIdsPositionsAndLimitsAndLeavesRowsAlone) {
    memory_with_rows m(4, 2);
    rs_checkpoints pool(m.mem, 2, 1 << 20, /*copy_rows=*/false);
    EXPECT_FALSE(pool.copies_rows());
    EXPECT_EQ(pool.checkpoint_bytes(), 2u * (3 + 5) * 4);  // counted as if held (by the rows' holder)
    EXPECT_THROW(pool.save(m.mem, 0), std::invalid_argument);  // no state: refused the same way
    m.decode(0, 17, 1.0f);
    const int64_t id = pool.save(m.mem, 0);
    EXPECT_EQ(pool.pos(id), 17);
    EXPECT_EQ(pool.bytes_used(), pool.checkpoint_bytes());
    ASSERT_TRUE(m.mem.seq_rm(0, -1, -1));
    const std::vector<std::vector<float>> r_before = m.r, s_before = m.s;
    pool.restore(m.mem, id, 1);
    EXPECT_EQ(m.mem.seq_pos_max(1), 17);
    EXPECT_GE(m.mem.seq_state_row(1), 0);  // where the holder writes the rows
    EXPECT_EQ(m.r, r_before);              // the pool copied nothing
    EXPECT_EQ(m.s, s_before);
    pool.save(m.mem, 1);
    EXPECT_THROW(pool.save(m.mem, 1), error);  // the count limit holds without rows
}
