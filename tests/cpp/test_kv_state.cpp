// The KV state writer and reader: a one-sequence read placed without a journal must leave exactly
// what the journaled placement leaves (cells, heads, K/V bytes), refuse what it refuses and change
// nothing then; writes into a caller's buffer check its room.

#include "llmem/errors.h"
#include "llmem/kv_cache.h"
#include "kv_test_util.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

namespace {

using namespace llmem;
using namespace llmem::test;

// A cache with its own K/V bytes (distinct per cell, so misplaced rows show).
struct owned_cache {
    kv_cache             c;
    std::vector<uint8_t> k, v;

    explicit owned_cache(const kv_cache_params & p) : c(p) {
        k.resize(c.k_buffer_bytes(0));
        v.resize(c.v_buffer_bytes(0));
        for (size_t i = 0; i < k.size(); ++i) {
            k[i] = uint8_t(i * 7 + 1);
        }
        for (size_t i = 0; i < v.size(); ++i) {
            v[i] = uint8_t(i * 13 + 5);
        }
        c.set_layer_buffers(0, k.data(), v.data());
    }
};

kv_cache_params state_params(uint32_t size, bool v_trans, bool ext) {
    kv_cache_params p = params(size, 4);
    p.v_trans         = v_trans;
    if (ext) {
        p.n_pos_per_embd = 3;  // M-RoPE: cells carry ext data
    }
    return p;
}

std::vector<uint8_t> whole(const kv_cache & c) {
    std::vector<uint8_t> out;
    c.state_write(out, -1);
    return out;
}

// Tokens of up to 3 sequences in random runs, some removed again: holes, shared cells, and
// sequences whose cells are not in position order.
void scramble(kv_cache & c, std::mt19937 & rng) {
    for (int step = 0; step < 6; ++step) {
        const int32_t s  = int32_t(rng() % 3);
        const int32_t p0 = c.seq_pos_max(s) + 1 + int32_t(rng() % 3);
        const int32_t n  = 1 + int32_t(rng() % 5);
        std::vector<tok> toks;
        for (int32_t p = p0; p < p0 + n; ++p) {
            toks.push_back({ rng() % 4 == 0 ? std::vector<int32_t>{ s, (s + 1) % 3 } : std::vector<int32_t>{ s }, p });
        }
        place(c, { make_ub(toks) });
        if (rng() % 3 == 0) {
            const int32_t r = int32_t(rng() % 3);
            c.seq_rm(r, int32_t(rng() % 4), int32_t(rng() % 8));
        }
    }
}

TEST(KvStateRead, DirectPlacementEqualsTheJournaledOne) {
    std::mt19937 rng(7);
    int          refused = 0, restored = 0;
    for (int trial = 0; trial < 300; ++trial) {
        const bool      v_trans = trial % 2 == 0, ext = trial % 3 == 0;
        const auto      p       = state_params(16 + uint32_t(rng() % 16), v_trans, ext);
        owned_cache     src(p), a(p), b(p);
        scramble(src.c, rng);
        // a and b: the same cells, heads and bytes; a reads directly, b through the journal
        std::mt19937 twin = rng;
        scramble(a.c, rng);
        scramble(b.c, twin);
        ASSERT_EQ(dump(a.c), dump(b.c));
        ASSERT_EQ(a.c.head(0), b.c.head(0));
        const int32_t from = int32_t(rng() % 3), into = int32_t(rng() % 4);
        std::vector<uint8_t> blob;
        src.c.state_write(blob, from);
        const std::string before = dump(a.c);
        const auto        kb = a.k, vb = a.v;
        size_t            off = 0;
        bool              a_ok = true, b_ok = true;
        try {
            a.c.state_read(blob.data(), blob.size(), off, into);  // direct
        } catch (const state_error &) {
            a_ok = false;
        }
        try {
            kv_state_read_all({ &b.c }, blob.data(), blob.size(), 0, into, true, [](size_t o) { return o; });
        } catch (const state_error &) {
            b_ok = false;
        }
        ASSERT_EQ(a_ok, b_ok) << "trial " << trial;
        if (!a_ok) {
            ++refused;
            EXPECT_EQ(dump(a.c), before);
            EXPECT_EQ(a.k, kb);
            EXPECT_EQ(a.v, vb);
            continue;
        }
        ++restored;
        EXPECT_EQ(off, blob.size());
        EXPECT_EQ(dump(a.c), dump(b.c)) << "trial " << trial;
        EXPECT_EQ(a.c.head(0), b.c.head(0)) << "trial " << trial;
        EXPECT_EQ(a.k, b.k) << "trial " << trial;
        EXPECT_EQ(a.v, b.v) << "trial " << trial;
        EXPECT_EQ(whole(a.c), whole(b.c)) << "trial " << trial;
        // the sequence holds what was written (the same records but for the id); an empty
        // state leaves it as it was, as in llama.cpp
        std::vector<uint8_t> again;
        a.c.state_write(again, into);
        if (blob.size() > 8) {
            EXPECT_EQ(again.size(), blob.size()) << "trial " << trial;
        }
        // and the next placement starts from the same head
        place(a.c, { make_ub(run(3, 100, 102)) });
        place(b.c, { make_ub(run(3, 100, 102)) });
        EXPECT_EQ(dump(a.c), dump(b.c)) << "trial " << trial;
    }
    EXPECT_GT(refused, 5);
    EXPECT_GT(restored, 100);
}

TEST(KvStateRead, NoRoomChangesNothing) {
    owned_cache c(state_params(8, true, false));
    place(c.c, { make_ub(cat(run(0, 0, 6), run(1, 0, 2))) });
    owned_cache other(state_params(8, true, false));
    place(other.c, { make_ub(run(2, 0, 3)) });
    std::vector<uint8_t> blob;
    other.c.state_write(blob, 2);
    const std::string before = dump(c.c);
    const auto        k = c.k, v = c.v;
    for (const int32_t into : { 2, 1 }) {  // no free cell; seq 1 frees only 2 of the 3 needed
        size_t off = 0;
        EXPECT_THROW(c.c.state_read(blob.data(), blob.size(), off, into), state_error);
        EXPECT_EQ(dump(c.c), before);
        EXPECT_EQ(c.k, k);
        EXPECT_EQ(c.v, v);
    }
    size_t off = 0;
    c.c.state_read(blob.data(), blob.size(), off, 0);  // seq 0's 6 cells make room
    EXPECT_EQ(dump(c.c), "0:p0{0} 1:p1{0} 2:p2{0} . . . 6:p0{1} 7:p1{1}");
}

TEST(KvStateRead, CellsOutOfPositionOrderAreWrittenInCellOrder) {
    owned_cache c(state_params(8, true, false));
    place(c.c, { make_ub(run(0, 10, 12)) });
    place(c.c, { make_ub(run(0, 0, 2)) });  // lower positions in later cells
    std::vector<uint8_t> blob;
    c.c.state_write(blob, 0);
    int32_t first_pos;
    std::memcpy(&first_pos, blob.data() + 8, 4);
    EXPECT_EQ(first_pos, 10);
    owned_cache d(state_params(8, true, false));
    size_t      off = 0;
    d.c.state_read(blob.data(), blob.size(), off, 0);
    std::vector<uint8_t> again;
    d.c.state_write(again, 0);
    EXPECT_EQ(again, blob);
}

TEST(KvState, WriteIntoChecksTheRoom) {
    owned_cache c(state_params(8, false, false));
    place(c.c, { make_ub(cat(run(0, 0, 3), run(1, 0, 2))) });
    for (const int32_t seq : { -1, 0, 1, 2 }) {
        const size_t         n = c.c.state_write_size(seq);
        std::vector<uint8_t> exact;
        c.c.state_write(exact, seq);
        std::vector<uint8_t> buf(n + 5, 0xAB);
        EXPECT_EQ(c.c.state_write_into(buf.data(), buf.size(), seq), n);
        EXPECT_EQ(std::vector<uint8_t>(buf.begin(), buf.begin() + std::ptrdiff_t(n)), exact);
        EXPECT_EQ(buf.back(), 0xAB);
        std::vector<uint8_t> small(n - 1, 0xCD);
        EXPECT_THROW(c.c.state_write_into(small.data(), small.size(), seq), std::invalid_argument);
        EXPECT_EQ(small, std::vector<uint8_t>(n - 1, 0xCD));
    }
}

} // namespace
