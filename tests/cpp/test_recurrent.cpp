// Worked examples and edge cases of the recurrent memory (spec section 5 and tricky cases 22-45),
// driven with hand-made micro-batches so the memory is tested apart from the batch allocator.

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/rs_memory.h"

#include <gtest/gtest.h>

#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

using namespace llmem;

namespace {

// One sequence set of a ubatch: its ids (primary first) and the positions of its entries.
struct seq_set {
    std::vector<int32_t> ids;
    std::vector<int32_t> pos;
};

ubatch make_ubatch(const std::vector<seq_set> & sets) {
    auto d = std::make_shared<ubatch_data>();
    const uint32_t n_seq_tokens = uint32_t(sets.front().pos.size());
    d->seq_id_off.push_back(0);
    for (const seq_set & s : sets) {
        EXPECT_EQ(s.pos.size(), n_seq_tokens);
        for (int32_t p : s.pos) {
            d->pos.push_back(p);
            d->seq_id.insert(d->seq_id.end(), s.ids.begin(), s.ids.end());
            d->seq_id_off.push_back(int32_t(d->seq_id.size()));
            d->output.push_back(0);
        }
    }
    ubatch ub;
    ub.equal_seqs   = true;
    ub.n_seq_tokens = n_seq_tokens;
    ub.n_seqs       = uint32_t(sets.size());
    ub.n_tokens     = ub.n_seqs * n_seq_tokens;
    ub.data         = d;
    return ub;
}

std::vector<int32_t> range_pos(int32_t p0, int32_t p1) {
    std::vector<int32_t> v;
    for (int32_t p = p0; p < p1; ++p) {
        v.push_back(p);
    }
    return v;
}

// "Decode" one ubatch as llama.cpp does: prepare, apply (find_slot), then read every s_copy.
std::vector<int32_t> decode(rs_memory & mem, const std::vector<seq_set> & sets) {
    const ubatch ub = make_ubatch(sets);
    EXPECT_TRUE(mem.prepare({ ub }));
    rs_context ctx(&mem, std::vector<ubatch>{ ub });
    EXPECT_TRUE(ctx.apply());
    return ctx.s_copy_all();
}

std::vector<int32_t> decode_seq(rs_memory & mem, int32_t seq, int32_t p0, int32_t p1) {
    return decode(mem, { { { seq }, range_pos(p0, p1) } });
}

std::vector<int32_t> ids_of(const rs_memory & mem, uint32_t i) { return mem.cell(i).ids; }

// The bookkeeping llama.cpp keeps implicitly: tails and ids agree, used counts non-empty cells.
void expect_consistent(const rs_memory & mem) {
    uint32_t nonempty = 0;
    for (uint32_t i = 0; i < mem.size(); ++i) {
        const rs_cell & c = mem.cell(i);
        nonempty += c.empty() ? 0 : 1;
        for (int32_t x : c.ids) {
            EXPECT_EQ(mem.tail(x), int32_t(i)) << "seq " << x;
        }
    }
    for (uint32_t s = 0; s < mem.size(); ++s) {
        if (mem.tail(int32_t(s)) >= 0) {
            EXPECT_TRUE(mem.cell(uint32_t(mem.tail(int32_t(s)))).has(int32_t(s))) << "seq " << s;
        }
    }
    EXPECT_EQ(mem.used(), nonempty);
}

// A memory with caller-owned F32 state arrays, like the Python class builds.
struct buffered_memory {
    rs_memory mem;
    std::vector<std::vector<float>> r, s;
    uint32_t n_embd_r, n_embd_s;

    buffered_memory(uint32_t size, int32_t n_seq_max, uint32_t n_rs_seq, uint32_t n_layer,
                    uint32_t n_embd_r_ = 2, uint32_t n_embd_s_ = 2)
        : mem(size, n_seq_max, n_rs_seq), n_embd_r(n_embd_r_), n_embd_s(n_embd_s_) {
        rs_buffers b;
        b.n_layer_total = n_layer;
        const size_t rows = size_t(size) * (1 + n_rs_seq);
        r.assign(n_layer, std::vector<float>(rows * n_embd_r, 0.0f));
        s.assign(n_layer, std::vector<float>(rows * n_embd_s, 0.0f));
        for (uint32_t l = 0; l < n_layer; ++l) {
            b.r.push_back(reinterpret_cast<uint8_t *>(r[l].data()));
            b.s.push_back(reinterpret_cast<uint8_t *>(s[l].data()));
            b.r_row_bytes.push_back(n_embd_r * 4);
            b.s_row_bytes.push_back(n_embd_s * 4);
        }
        mem.attach_buffers(b);
    }

    // Fill row `row` of every array with a value derived from (layer, row, tag).
    void fill_row(uint32_t row, float tag) {
        for (size_t l = 0; l < r.size(); ++l) {
            for (uint32_t k = 0; k < n_embd_r; ++k) r[l][row * n_embd_r + k] = tag + 100.0f * float(l) + float(k);
            for (uint32_t k = 0; k < n_embd_s; ++k) s[l][row * n_embd_s + k] = -tag - 100.0f * float(l) - float(k);
        }
    }

    std::vector<uint8_t> write(int32_t seq, uint32_t flags = 0) const {
        std::vector<uint8_t> out(mem.state_write_size(seq, flags));
        mem.state_write(out.data(), out.size(), seq, flags);
        return out;
    }

    size_t read(const std::vector<uint8_t> & in, int32_t seq) { return mem.state_read(in.data(), in.size(), seq, 0); }
};

// Everything observable about a memory, for "left exactly as it was" checks.
struct snapshot {
    std::vector<int32_t> pos, src, src0, tail;
    std::vector<std::vector<int32_t>> ids;
    std::vector<uint32_t> rs_idx;
    uint32_t head, used, n;
    int32_t rs_z;
    std::vector<std::vector<float>> r, s;

    bool operator==(const snapshot & o) const {
        return pos == o.pos && src == o.src && src0 == o.src0 && tail == o.tail && ids == o.ids &&
               rs_idx == o.rs_idx && head == o.head && used == o.used && n == o.n && rs_z == o.rs_z && r == o.r &&
               s == o.s;
    }
};

snapshot take(const rs_memory & mem, const buffered_memory * bm = nullptr) {
    snapshot sn;
    for (uint32_t i = 0; i < mem.size(); ++i) {
        sn.pos.push_back(mem.cell(i).pos);
        sn.src.push_back(mem.cell(i).src);
        sn.src0.push_back(mem.cell(i).src0);
        sn.tail.push_back(mem.tail(int32_t(i)));
        sn.ids.push_back(mem.cell(i).ids);
    }
    for (int32_t q = 0; q < mem.n_seq_max(); ++q) sn.rs_idx.push_back(mem.rs_idx(q));
    sn.head = mem.head();
    sn.used = mem.used();
    sn.n    = mem.n();
    sn.rs_z = mem.rs_z();
    if (bm) {
        sn.r = bm->r;
        sn.s = bm->s;
    }
    return sn;
}

uint32_t u32_at(const std::vector<uint8_t> & b, size_t off) {
    uint32_t v;
    std::memcpy(&v, b.data() + off, 4);
    return v;
}

void put_u32(std::vector<uint8_t> & b, size_t off, uint32_t v) { std::memcpy(b.data() + off, &v, 4); }

} // namespace

// -- construction --------------------------------------------------------------------------------

TEST(RsMemory, ConstructionRefusesBadSizes) {
    EXPECT_THROW(rs_memory(0, 1, 0), std::invalid_argument);
    EXPECT_THROW(rs_memory(4, 0, 0), std::invalid_argument);
    EXPECT_THROW(rs_memory(4, SEQ_MAX_LIMIT + 1, 0), std::invalid_argument);
    EXPECT_THROW(rs_memory(1u << 30, 4, 4), std::invalid_argument);
    rs_memory mem(4, 4, 0);
    EXPECT_EQ(mem.head(), 0u);
    EXPECT_EQ(mem.used(), 0u);
    EXPECT_EQ(mem.rs_z(), -1);
    for (uint32_t i = 0; i < 4; ++i) {
        EXPECT_EQ(mem.cell(i).pos, -1);
        EXPECT_EQ(mem.cell(i).src, -1);
        EXPECT_EQ(mem.tail(int32_t(i)), -1);
    }
}

// -- find_slot worked examples (spec 5.11) ---------------------------------------------------------

TEST(RsFindSlot, ExampleA_FreshThenCopyThenUnshare) {
    rs_memory mem(4, 4, 0);
    // 1. seq 0 at 0..2 in one ubatch
    EXPECT_EQ(decode_seq(mem, 0, 0, 3), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(mem.cell(0).pos, 2);
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(mem.cell(0).src, 0);
    EXPECT_EQ(mem.cell(0).src0, 0);
    EXPECT_EQ(mem.head(), 0u);
    EXPECT_EQ(mem.n(), 1u);
    EXPECT_EQ(mem.used(), 1u);
    EXPECT_EQ(mem.rs_z(), 0);
    // 2. seq_cp shares the cell
    mem.seq_cp(0, 1, -1, -1);
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0, 1 }));
    EXPECT_EQ(mem.tail(1), 0);
    EXPECT_EQ(mem.used(), 1u);
    EXPECT_EQ(mem.seq_pos_max(1), 2);
    // 3. decoding seq 1 moves it out of the shared cell
    EXPECT_EQ(decode_seq(mem, 1, 3, 4), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(mem.cell(0).pos, 2);
    EXPECT_EQ(ids_of(mem, 1), (std::vector<int32_t>{ 1 }));
    EXPECT_EQ(mem.cell(1).pos, 3);
    EXPECT_EQ(mem.cell(1).src, 1);
    EXPECT_EQ(mem.cell(1).src0, 0);
    EXPECT_EQ(mem.head(), 1u);
    EXPECT_EQ(mem.n(), 1u);
    EXPECT_EQ(mem.rs_z(), 1);
    EXPECT_EQ(mem.used(), 2u);
    // 4. seq 0 now owns cell 0
    EXPECT_EQ(decode_seq(mem, 0, 3, 4), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(mem.head(), 0u);
    EXPECT_EQ(mem.rs_z(), -1);
    EXPECT_EQ(mem.cell(0).pos, 3);
    expect_consistent(mem);
}

TEST(RsFindSlot, ExampleA_OtherOrderTheDecodedSequenceLeaves) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 3);
    mem.seq_cp(0, 1, -1, -1);
    decode_seq(mem, 0, 3, 4);
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 1 }));
    EXPECT_EQ(mem.cell(0).pos, 2);
    EXPECT_EQ(ids_of(mem, 1), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(mem.cell(1).pos, 3);
    expect_consistent(mem);
}

TEST(RsFindSlot, ExampleB_MultiSequencePermutation) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 2, 0, 1);
    decode_seq(mem, 0, 0, 1);
    decode_seq(mem, 1, 0, 1);
    EXPECT_EQ(mem.head(), 2u);
    const auto copies = decode(mem, { { { 1 }, { 1 } }, { { 2 }, { 1 } } });
    EXPECT_EQ(copies, (std::vector<int32_t>{ 2, 0, 1 }));
    EXPECT_EQ(mem.head(), 0u);
    EXPECT_EQ(mem.n(), 3u);
    EXPECT_EQ(mem.rs_z(), -1);
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 1 }));
    EXPECT_EQ(ids_of(mem, 1), (std::vector<int32_t>{ 2 }));
    EXPECT_EQ(ids_of(mem, 2), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(mem.cell(0).pos, 1);
    EXPECT_EQ(mem.cell(1).pos, 1);
    EXPECT_EQ(mem.cell(2).pos, 0);
    expect_consistent(mem);
}

TEST(RsFindSlot, ExampleC_UnsharingInsideOneUbatch) {
    rs_memory mem(4, 4, 0);
    // two entries carrying ids {0,1} attached 0 then 1: primary id 1
    EXPECT_EQ(decode(mem, { { { 1, 0 }, { 0, 1 } } }), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0, 1 }));
    EXPECT_EQ(mem.cell(0).pos, 1);
    EXPECT_EQ(mem.tail(0), 0);
    EXPECT_EQ(mem.tail(1), 0);
    EXPECT_EQ(mem.used(), 1u);
    // then seqs 0 and 1 at position 2 in one ubatch
    EXPECT_EQ(decode(mem, { { { 0 }, { 2 } }, { { 1 }, { 2 } } }), (std::vector<int32_t>{ 0, 0 }));
    EXPECT_EQ(mem.rs_z(), 1);
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(ids_of(mem, 1), (std::vector<int32_t>{ 1 }));
    EXPECT_EQ(mem.cell(0).src0, 0);
    EXPECT_EQ(mem.cell(1).src0, 0);
    EXPECT_EQ(mem.head(), 0u);
    EXPECT_EQ(mem.used(), 2u);
    expect_consistent(mem);
}

TEST(RsFindSlot, ExampleD_HeadReset) {
    rs_memory mem(8, 8, 0);
    for (int32_t s = 0; s < 6; ++s) {
        decode_seq(mem, s, 0, 1);
    }
    EXPECT_EQ(mem.head(), 5u);
    for (int32_t s = 0; s < 5; ++s) {
        mem.seq_cp(6, s, -1, -1);  // seq 6 is empty: this erases s and never lowers head
    }
    EXPECT_EQ(mem.used(), 1u);
    EXPECT_EQ(mem.head(), 5u);
    decode_seq(mem, 7, 0, 1);
    EXPECT_EQ(mem.tail(7), 0);
    EXPECT_EQ(mem.head(), 0u);
    expect_consistent(mem);
}

TEST(RsFindSlot, Tricky30_HeadResetWithSizeSix) {
    rs_memory mem(8, 8, 0);
    for (int32_t s = 0; s <= 5; ++s) decode_seq(mem, s, 0, 1);
    for (int32_t s = 0; s <= 4; ++s) mem.seq_cp(6, s, -1, -1);
    decode_seq(mem, 7, 0, 1);
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 7 }));
    EXPECT_EQ(mem.head(), 0u);
}

TEST(RsFindSlot, SeveralFreshSequencesInOneUbatch) {
    rs_memory mem(4, 4, 0);
    const auto copies = decode(mem, { { { 0 }, { 0, 1 } }, { { 1 }, { 0, 1 } }, { { 2 }, { 0, 1 } } });
    // no cell is a source yet: row 0 is the zero state every new sequence starts from
    EXPECT_EQ(copies, (std::vector<int32_t>{ 0, 0, 0 }));
    EXPECT_EQ(mem.rs_z(), 0);
    EXPECT_EQ(mem.head(), 0u);
    EXPECT_EQ(mem.n(), 3u);
    EXPECT_EQ(mem.used(), 3u);
    for (uint32_t i = 0; i < 3; ++i) {
        EXPECT_EQ(ids_of(mem, i), (std::vector<int32_t>{ int32_t(i) }));
        EXPECT_EQ(mem.cell(i).pos, 1);
        EXPECT_EQ(mem.cell(i).src, int32_t(i));
    }
    expect_consistent(mem);
}

TEST(RsFindSlot, FreeCellSearchWrapsAround) {
    rs_memory mem(4, 4, 0);
    for (int32_t s = 0; s < 4; ++s) decode_seq(mem, s, 0, 1);
    EXPECT_EQ(mem.head(), 3u);
    mem.seq_cp(1, 0, -1, -1);  // cell 0 empties, cell 1 shared by {0,1}; head stays 3
    EXPECT_EQ(mem.used(), 3u);
    EXPECT_EQ(mem.head(), 3u);
    const auto copies = decode_seq(mem, 0, 1, 2);
    // search from head 3 wraps to cell 0; seq 0 starts from the shared state (row 1)
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(ids_of(mem, 1), (std::vector<int32_t>{ 1 }));
    EXPECT_EQ(copies, (std::vector<int32_t>{ 1 }));
    EXPECT_EQ(mem.rs_z(), 0);
    EXPECT_EQ(mem.head(), 0u);
    EXPECT_EQ(mem.used(), 4u);
    expect_consistent(mem);
}

TEST(RsFindSlot, SlotRangeWiderThanTheUbatchCopiesTheCellsBetween) {
    rs_memory mem(4, 4, 0);
    for (int32_t s = 0; s < 3; ++s) decode_seq(mem, s, 0, 1);  // cells 0,1,2 = seqs 0,1,2
    // seqs 0 and 2 are not consecutive ids: build the ubatch by hand (sets 0 and 2)
    const auto copies = decode(mem, { { { 0 }, { 1 } }, { { 2 }, { 1 } } });
    // min 0, max 2: seq 2 is swapped into cell 1, seq 1 moves to cell 2
    EXPECT_EQ(mem.n(), 3u);
    EXPECT_EQ(copies, (std::vector<int32_t>{ 0, 2, 1 }));
    EXPECT_EQ(ids_of(mem, 1), (std::vector<int32_t>{ 2 }));
    EXPECT_EQ(ids_of(mem, 2), (std::vector<int32_t>{ 1 }));
    EXPECT_EQ(mem.cell(2).pos, 0);
    expect_consistent(mem);
}

TEST(RsFindSlot, SecondaryIdsLeaveTheirCells) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 1, 0, 1);
    mem.seq_cp(1, 0, -1, -1);  // seq 0 shares seq 1's state: a shared token may extend both
    decode_seq(mem, 2, 0, 1);  // an unrelated sequence in its own cell
    decode(mem, { { { 1, 0 }, { 1 } } });
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0, 1 }));
    EXPECT_EQ(mem.cell(0).pos, 1);
    EXPECT_EQ(mem.tail(0), 0);
    EXPECT_EQ(mem.tail(1), 0);
    EXPECT_EQ(mem.used(), 2u);
    expect_consistent(mem);
}

TEST(RsFindSlot, SharedTokenOverDivergedStatesIsRefused) {
    // deviation R14: seq 0 and seq 1 have states of their own; a token carrying both would keep
    // only seq 1's and silently drop seq 0's (llama.cpp does). prepare refuses and changes nothing.
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 1);
    decode_seq(mem, 1, 0, 1);
    const snapshot before = take(mem);
    EXPECT_FALSE(mem.prepare({ make_ubatch({ { { 1, 0 }, { 1 } } }) }));
    snapshot after = take(mem);
    after.n = before.n;
    after.rs_z = before.rs_z;
    EXPECT_TRUE(after == before);
    // a secondary id with no state yet joins the primary's cell as before
    decode(mem, { { { 1, 3 }, { 1 } } });
    EXPECT_EQ(mem.tail(3), mem.tail(1));
    EXPECT_EQ(mem.seq_pos_max(3), 1);
    expect_consistent(mem);
}

TEST(RsFindSlot, IdsAtOrAboveSizeFailAndPrepareChangesNothing) {
    rs_memory mem(2, 4, 0);
    EXPECT_FALSE(mem.prepare({ make_ubatch({ { { 3 }, { 0 } } }) }));
    EXPECT_FALSE(mem.seq_rm(3, -1, -1));
    decode_seq(mem, 0, 0, 1);
    decode_seq(mem, 1, 0, 1);
    mem.seq_cp(1, 0, -1, -1);
    const snapshot before = take(mem);
    // the first ubatch un-shares seq 0 and would take a cell; the second one fails
    EXPECT_FALSE(mem.prepare({ make_ubatch({ { { 0 }, { 1 } } }), make_ubatch({ { { 1, 3 }, { 1 } } }) }));
    snapshot after = take(mem);
    after.n = before.n;  // llama.cpp does not restore n and rs_z after a dry run
    after.rs_z = before.rs_z;
    EXPECT_TRUE(after == before);
    expect_consistent(mem);
}

TEST(RsFindSlot, PrepareLeavesCellsUsedAndHeadButKeepsTheLastNAndRsZ) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 3);
    mem.seq_cp(0, 1, -1, -1);
    const snapshot before = take(mem);
    EXPECT_TRUE(mem.prepare({ make_ubatch({ { { 1 }, { 3 } } }), make_ubatch({ { { 0 }, { 3 } } }) }));
    const snapshot after = take(mem);
    EXPECT_EQ(after.pos, before.pos);
    EXPECT_EQ(after.ids, before.ids);
    EXPECT_EQ(after.src, before.src);
    EXPECT_EQ(after.src0, before.src0);
    EXPECT_EQ(after.tail, before.tail);
    EXPECT_EQ(after.head, before.head);
    EXPECT_EQ(after.used, before.used);
    // the last dry run placed seq 0 in cell 0 (it owns it after seq 1 left): head 0, no zero row
    EXPECT_EQ(mem.n(), 1u);
    EXPECT_EQ(mem.rs_z(), -1);
    // and the real run afterwards takes the same decisions as without the dry run
    decode_seq(mem, 1, 3, 4);
    EXPECT_EQ(mem.tail(1), 1);
    EXPECT_EQ(mem.rs_z(), 1);
}

TEST(RsFindSlot, RefusesUbatchWithoutEqualSeqs) {
    rs_memory mem(4, 4, 0);
    ubatch ub = make_ubatch({ { { 0 }, { 0 } } });
    ub.equal_seqs = false;
    EXPECT_THROW(mem.find_slot(ub), std::invalid_argument);
    EXPECT_THROW(mem.prepare({ ub }), std::invalid_argument);
    const ubatch no_ids = make_ubatch({ { {}, { 0 } } });
    EXPECT_THROW(mem.find_slot(no_ids), std::invalid_argument);
    EXPECT_EQ(mem.used(), 0u);
}

// -- sequence operations -------------------------------------------------------------------------

TEST(RsSeqRm, Tricky22_RangesAgainstTheTail) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 5);
    EXPECT_FALSE(mem.seq_rm(0, 2, -1));
    EXPECT_EQ(mem.seq_pos_max(0), 4);
    EXPECT_TRUE(mem.seq_rm(0, 0, 3));
    EXPECT_EQ(mem.seq_pos_max(0), 4);
    EXPECT_TRUE(mem.seq_rm(0, 1, 3));
    EXPECT_EQ(mem.seq_pos_max(0), 4);
    EXPECT_TRUE(mem.seq_rm(0, 5, -1));
    EXPECT_EQ(mem.seq_pos_max(0), 4);
    EXPECT_TRUE(mem.seq_rm(0, 0, 5));
    EXPECT_EQ(mem.seq_pos_max(0), -1);
    EXPECT_EQ(mem.used(), 0u);
    EXPECT_EQ(mem.cell(0).src, -1);
    expect_consistent(mem);
}

TEST(RsSeqRm, Tricky23_NegativeAndOutOfRangeIds) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 2);
    const snapshot before = take(mem);
    EXPECT_FALSE(mem.seq_rm(-1, -1, -1));
    EXPECT_FALSE(mem.seq_rm(-7, 0, 10));
    EXPECT_FALSE(mem.seq_rm(4, -1, -1));
    EXPECT_TRUE(take(mem) == before);
    EXPECT_TRUE(mem.seq_rm(1, -1, -1));  // empty sequence
    EXPECT_TRUE(take(mem) == before);
}

TEST(RsSeqRm, IdBetweenSizeAndNSeqMaxIsRefused) {
    rs_memory mem(2, 4, 0);
    EXPECT_FALSE(mem.seq_rm(2, -1, -1));
    EXPECT_FALSE(mem.seq_rm(3, 0, 1));
}

TEST(RsSeqRm, FullRemovalLowersHeadToTheFreedCell) {
    rs_memory mem(4, 4, 0);
    for (int32_t s = 0; s < 3; ++s) decode_seq(mem, s, 0, 1);
    EXPECT_EQ(mem.head(), 2u);
    EXPECT_TRUE(mem.seq_rm(1, -1, -1));
    EXPECT_EQ(mem.head(), 1u);
    EXPECT_EQ(mem.used(), 2u);
    EXPECT_TRUE(mem.seq_rm(2, -1, -1));
    EXPECT_EQ(mem.head(), 1u);  // only lowered, never raised
}

TEST(RsSeqRm, RemovingOneSharerKeepsTheCell) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 3);
    mem.seq_cp(0, 1, -1, -1);
    EXPECT_TRUE(mem.seq_rm(0, -1, -1));
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 1 }));
    EXPECT_EQ(mem.cell(0).pos, 2);
    EXPECT_EQ(mem.used(), 1u);
    EXPECT_EQ(mem.seq_pos_max(1), 2);
    expect_consistent(mem);
}

TEST(RsSeqCp, Tricky27_RangeIgnoredCellShared) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 10);
    decode_seq(mem, 1, 0, 4);
    mem.seq_cp(0, 2, 100, 200);
    EXPECT_EQ(mem.seq_pos_max(2), 9);
    EXPECT_EQ(mem.seq_pos_min(2), 9);
    EXPECT_EQ(mem.tail(2), mem.tail(0));
    EXPECT_EQ(mem.used(), 2u);
    expect_consistent(mem);
}

TEST(RsSeqCp, OverwritesTheDestinationAndIgnoresBadIds) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 3);
    decode_seq(mem, 1, 0, 7);
    mem.seq_cp(0, 1, -1, -1);
    EXPECT_EQ(mem.seq_pos_max(1), 2);
    EXPECT_TRUE(mem.cell(1).empty());
    EXPECT_EQ(mem.cell(1).pos, -1);
    EXPECT_EQ(mem.used(), 1u);
    EXPECT_EQ(mem.head(), 1u);  // not lowered by seq_cp
    const snapshot before = take(mem);
    mem.seq_cp(0, 0, -1, -1);
    mem.seq_cp(-1, 2, -1, -1);
    mem.seq_cp(0, -1, -1, -1);
    mem.seq_cp(0, 4, -1, -1);
    mem.seq_cp(4, 0, -1, -1);
    EXPECT_TRUE(take(mem) == before);
    mem.seq_cp(3, 1, -1, -1);  // empty source erases the destination
    EXPECT_EQ(mem.seq_pos_max(1), -1);
    EXPECT_EQ(mem.seq_pos_max(0), 2);
    expect_consistent(mem);
}

TEST(RsSeqKeep, KeepsOneSequenceAndUnsharesIt) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 2);
    decode_seq(mem, 1, 0, 3);
    mem.seq_cp(1, 2, -1, -1);
    mem.seq_keep(2);
    EXPECT_EQ(mem.seq_pos_max(2), 2);
    EXPECT_EQ(mem.seq_pos_max(1), -1);
    EXPECT_EQ(mem.seq_pos_max(0), -1);
    EXPECT_EQ(ids_of(mem, 1), (std::vector<int32_t>{ 2 }));
    EXPECT_EQ(mem.used(), 1u);
    EXPECT_EQ(mem.head(), 0u);
    expect_consistent(mem);
    mem.seq_keep(-1);
    EXPECT_EQ(mem.used(), 0u);
    EXPECT_EQ(mem.seq_pos_max(2), -1);
    expect_consistent(mem);
}

TEST(RsSeqAdd, Tricky28_SharedCellMovesTogether) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 10);
    mem.seq_cp(0, 2, -1, -1);
    mem.seq_add(0, 0, 5, 3);
    EXPECT_EQ(mem.seq_pos_max(0), 9);
    mem.seq_add(0, 0, 10, 3);
    EXPECT_EQ(mem.seq_pos_max(0), 12);
    EXPECT_EQ(mem.seq_pos_max(2), 12);
    mem.seq_add(0, -1, -1, 0);
    mem.seq_add(0, 7, 7, 5);
    mem.seq_add(-1, -1, -1, 5);
    mem.seq_add(9, -1, -1, 5);
    EXPECT_EQ(mem.seq_pos_max(0), 12);
}

TEST(RsSeqAdd, Tricky29_NegativePositionKeepsTheCellAndUsedDrifts) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 1);
    decode_seq(mem, 1, 0, 2);
    mem.seq_add(1, -1, -1, -5);
    EXPECT_EQ(mem.seq_pos_min(1), -4);
    EXPECT_EQ(mem.seq_pos_max(1), -1);  // llama.cpp's maximum starts at -1 (oracle C1; spec says -4)
    EXPECT_EQ(mem.used(), 2u);
    mem.seq_keep(2);
    // cell 1 (pos -4) was emptied without decrementing used
    uint32_t occupied = 0;
    for (uint32_t i = 0; i < 4; ++i) occupied += mem.cell(i).empty() ? 0 : 1;
    EXPECT_EQ(occupied, 0u);
    EXPECT_EQ(mem.used(), occupied + 1);
}

TEST(RsSeqAdd, OverflowIsRefusedAndChangesNothing) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 3);
    EXPECT_THROW(mem.seq_add(0, -1, -1, std::numeric_limits<int32_t>::max()), std::invalid_argument);
    EXPECT_EQ(mem.seq_pos_max(0), 2);
}

TEST(RsSeqDiv, DividesTowardZeroAndRefusesZero) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 0, 0, 10);
    EXPECT_THROW(mem.seq_div(0, -1, -1, 0), std::invalid_argument);
    EXPECT_EQ(mem.seq_pos_max(0), 9);
    mem.seq_div(0, 0, 9, 2);  // 9 is outside [0, 9)
    EXPECT_EQ(mem.seq_pos_max(0), 9);
    mem.seq_div(0, -1, -1, 2);
    EXPECT_EQ(mem.seq_pos_max(0), 4);
    mem.seq_add(0, -1, -1, -9);
    EXPECT_EQ(mem.seq_pos_min(0), -5);
    mem.seq_div(0, -1, -1, 2);  // -5 is not in [0, OPEN)
    EXPECT_EQ(mem.seq_pos_min(0), -5);
    EXPECT_EQ(mem.seq_pos_max(0), -1);
}

TEST(RsSeqPos, AnyIdIsAccepted) {
    rs_memory mem(4, 4, 0);
    decode_seq(mem, 3, 5, 8);
    EXPECT_EQ(mem.seq_pos_min(3), 7);
    EXPECT_EQ(mem.seq_pos_max(3), 7);
    EXPECT_EQ(mem.seq_pos_min(-1), -1);
    EXPECT_EQ(mem.seq_pos_max(100), -1);
    EXPECT_EQ(mem.seq_pos_max(0), -1);
}

TEST(RsClear, ForgetsEverythingAndZeroesData) {
    buffered_memory bm(4, 4, 1, 2);
    decode_seq(bm.mem, 0, 0, 3);
    bm.fill_row(0, 5.0f);
    bm.fill_row(4, 6.0f);
    EXPECT_TRUE(bm.mem.seq_rm(0, 2, -1));
    EXPECT_EQ(bm.mem.rs_idx(0), 1u);
    bm.mem.clear(false);
    EXPECT_EQ(bm.mem.used(), 0u);
    EXPECT_EQ(bm.mem.rs_idx(0), 0u);
    EXPECT_EQ(bm.mem.seq_pos_max(0), -1);
    EXPECT_EQ(bm.mem.cell(0).src0, 0);  // src0 is not touched
    EXPECT_NE(bm.r[0][0], 0.0f);
    bm.mem.clear(true);
    for (const auto & a : bm.r) for (float v : a) EXPECT_EQ(v, 0.0f);
    for (const auto & a : bm.s) for (float v : a) EXPECT_EQ(v, 0.0f);
}

// -- rollback (spec 5.13, tricky 34-38, 54) -------------------------------------------------------

TEST(RsRollback, Tricky34_35_SucceedsOnceThenPendingThenConsumed) {
    rs_memory mem(2, 2, 2);
    decode_seq(mem, 0, 0, 5);
    decode_seq(mem, 1, 0, 3);
    EXPECT_TRUE(mem.seq_rm(0, 4, -1));
    EXPECT_EQ(mem.seq_pos_max(0), 3);
    EXPECT_EQ(mem.rs_idx(0), 1u);
    EXPECT_FALSE(mem.seq_rm(0, 3, -1));
    EXPECT_EQ(mem.seq_pos_max(0), 3);
    EXPECT_TRUE(mem.seq_rm(1, 1, -1));
    EXPECT_EQ(mem.rs_idx(1), 2u);
    EXPECT_EQ(mem.seq_pos_max(1), 0);
    // 35: decoding seq 0 at 4 reads plane 1
    EXPECT_EQ(decode_seq(mem, 0, 4, 5), (std::vector<int32_t>{ 1 * 2 + 0 }));
    EXPECT_EQ(mem.rs_idx(0), 0u);
    EXPECT_EQ(mem.rs_idx(1), 2u);
    EXPECT_TRUE(mem.seq_rm(1, 0, -1));
    EXPECT_EQ(mem.rs_idx(1), 0u);
    EXPECT_EQ(mem.seq_pos_max(1), -1);
}

TEST(RsRollback, Tricky36_TooFarBackFailsWithinLimitSucceeds) {
    rs_memory mem(4, 4, 2);
    decode_seq(mem, 0, 0, 5);
    EXPECT_FALSE(mem.seq_rm(0, 1, -1));
    EXPECT_EQ(mem.seq_pos_max(0), 4);
    EXPECT_TRUE(mem.seq_rm(0, 3, 10));
    EXPECT_EQ(mem.seq_pos_max(0), 2);
    EXPECT_EQ(mem.rs_idx(0), 2u);
}

TEST(RsRollback, Tricky37_SharedCellRewindsBothButOnlySmallestIdReadsTheSnapshot) {
    buffered_memory bm(3, 3, 2, 1);
    rs_memory & mem = bm.mem;
    decode_seq(mem, 1, 0, 4);
    mem.seq_cp(1, 0, -1, -1);
    EXPECT_TRUE(mem.seq_rm(1, 3, -1));
    EXPECT_EQ(mem.seq_pos_max(0), 2);
    EXPECT_EQ(mem.seq_pos_max(1), 2);
    EXPECT_EQ(mem.rs_idx(1), 1u);
    // 38: the sharers disagree on the plane: writing the whole memory is refused
    const snapshot before = take(mem, &bm);
    EXPECT_THROW(mem.state_write_size(-1, 0), llmem::error);
    EXPECT_TRUE(take(mem, &bm) == before);
    // a single sequence can still be written
    EXPECT_NO_THROW(bm.write(1));
    EXPECT_EQ(decode_seq(mem, 0, 3, 4), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(mem.tail(0), 1);
    EXPECT_EQ(mem.rs_idx(1), 1u);
}

TEST(RsRollback, FullRemovalCancelsAPendingRollback) {
    rs_memory mem(4, 4, 3);
    decode_seq(mem, 0, 0, 5);
    EXPECT_TRUE(mem.seq_rm(0, 3, -1));
    EXPECT_EQ(mem.rs_idx(0), 2u);
    EXPECT_TRUE(mem.seq_rm(0, -1, -1));
    EXPECT_EQ(mem.rs_idx(0), 0u);
    EXPECT_EQ(mem.seq_pos_max(0), -1);
    // the whole-range reset happens even where the id then fails (seq >= size)
    rs_memory small(2, 4, 1);
    EXPECT_FALSE(small.seq_rm(3, -1, -1));
    EXPECT_EQ(small.rs_idx(3), 0u);
}

TEST(RsRollback, Tricky54_DriverCleanupAfterAFailedUbatch) {
    rs_memory none(4, 4, 0);
    decode_seq(none, 0, 0, 10);
    decode_seq(none, 0, 10, 13);
    EXPECT_FALSE(none.seq_rm(0, 10, -1));
    EXPECT_EQ(none.seq_pos_max(0), 12);
    rs_memory three(4, 4, 3);
    decode_seq(three, 0, 0, 10);
    decode_seq(three, 0, 10, 13);
    EXPECT_TRUE(three.seq_rm(0, 10, -1));
    EXPECT_EQ(three.rs_idx(0), 3u);
    EXPECT_EQ(three.seq_pos_max(0), 9);
}

TEST(RsRollback, SCopyConsumesOnlyOncePerUbatch) {
    rs_memory mem(2, 2, 2);
    decode_seq(mem, 0, 0, 5);
    EXPECT_TRUE(mem.seq_rm(0, 3, -1));
    const ubatch ub = make_ubatch({ { { 0 }, { 3 } } });
    ASSERT_TRUE(mem.prepare({ ub }));
    rs_context ctx(&mem, std::vector<ubatch>{ ub });
    EXPECT_THROW(ctx.s_copy_all(), llmem::error);  // before apply()
    ctx.apply();
    EXPECT_EQ(ctx.s_copy_all(), (std::vector<int32_t>{ 2 * 2 + 0 }));
    EXPECT_EQ(ctx.s_copy_all(), (std::vector<int32_t>{ 2 * 2 + 0 }));  // cached, not re-read
    EXPECT_EQ(mem.rs_idx(0), 0u);
}

// -- contexts ------------------------------------------------------------------------------------

TEST(RsContext, Tricky32_33_ApplyNextStatus) {
    rs_memory mem(4, 4, 0);
    const ubatch a = make_ubatch({ { { 0 }, { 0 } } });
    const ubatch b = make_ubatch({ { { 0 }, { 1 } } });
    rs_context ctx(&mem, std::vector<ubatch>{ a, b });
    EXPECT_EQ(ctx.status(), memory_status::SUCCESS);
    EXPECT_TRUE(ctx.apply());
    EXPECT_TRUE(ctx.next());
    EXPECT_TRUE(ctx.apply());
    EXPECT_FALSE(ctx.next());
    EXPECT_EQ(mem.seq_pos_max(0), 1);
    EXPECT_EQ(mem.init_update()->status(), memory_status::NO_UPDATE);
    auto full = mem.init_full();
    EXPECT_EQ(full->status(), memory_status::SUCCESS);
    EXPECT_EQ(full->n_rs(), 4u);
    EXPECT_EQ(full->head(), 0u);
    EXPECT_EQ(full->rs_z(), 0);
    EXPECT_TRUE(full->apply());
    EXPECT_FALSE(full->next());
    EXPECT_THROW(full->get_ubatch(), llmem::error);
    rs_context failed(&mem, memory_status::FAILED_PREPARE);
    EXPECT_THROW(failed.apply(), llmem::error);
    EXPECT_THROW(failed.s_copy_all(), llmem::error);
}

// -- state bytes (spec 5.14-5.15, tricky 39-45) ---------------------------------------------------

TEST(RsState, Tricky39_LayoutOfWholeAndSingleWrites) {
    buffered_memory bm(4, 4, 0, 2);
    decode_seq(bm.mem, 0, 0, 4);
    decode_seq(bm.mem, 1, 0, 1);
    const auto whole = bm.write(-1);
    ASSERT_EQ(whole.size(), 148u);
    const uint32_t expect_head[] = { 2, 3, 1, 0, 0, 1, 1, 0, 2 };
    for (size_t k = 0; k < 9; ++k) EXPECT_EQ(u32_at(whole, 4 * k), expect_head[k]) << "word " << k;
    EXPECT_EQ(u32_at(whole, 36), 0u);  // r_type F32
    EXPECT_EQ(u32_at(whole, 40), 8u);  // r_row_bytes (u64 low word)
    const auto single = bm.write(0);
    ASSERT_EQ(single.size(), 100u);
    EXPECT_EQ(u32_at(single, 0), 1u);
    EXPECT_EQ(u32_at(single, 4), 3u);
    EXPECT_EQ(u32_at(single, 8), 0u);  // no ids in a single-sequence block
}

TEST(RsState, Tricky40_EmptySequenceBlockErasesTheDestination) {
    buffered_memory bm(4, 4, 0, 2);
    decode_seq(bm.mem, 1, 0, 3);
    const auto empty = bm.write(2);
    EXPECT_EQ(empty.size(), 60u);
    EXPECT_EQ(bm.read(empty, 1), 60u);
    EXPECT_EQ(bm.mem.seq_pos_max(1), -1);
    EXPECT_EQ(bm.mem.used(), 0u);
}

TEST(RsState, RowsRoundTripIntoAnotherSequence) {
    buffered_memory bm(4, 4, 0, 2);
    decode_seq(bm.mem, 0, 0, 4);
    decode_seq(bm.mem, 1, 0, 1);
    bm.fill_row(0, 1.0f);
    bm.fill_row(1, 2.0f);
    const auto blob = bm.write(0);
    const std::vector<float> r0(bm.r[1].begin(), bm.r[1].begin() + 2);
    EXPECT_EQ(bm.read(blob, 2), blob.size());
    const int32_t c = bm.mem.tail(2);
    ASSERT_EQ(c, 2);
    EXPECT_EQ(bm.mem.seq_pos_max(2), 3);
    EXPECT_EQ(bm.mem.cell(2).src, 2);
    EXPECT_EQ(std::vector<float>(bm.r[1].begin() + 4, bm.r[1].begin() + 6), r0);
    EXPECT_EQ(bm.s[0][4], bm.s[0][0]);
    expect_consistent(bm.mem);
    // and the whole memory into a fresh one
    const auto whole = bm.write(-1);
    buffered_memory other(4, 4, 0, 2);
    other.fill_row(3, 9.0f);
    EXPECT_EQ(other.read(whole, -1), whole.size());
    EXPECT_EQ(other.write(-1), whole);
    EXPECT_EQ(other.r[0][3 * 2], 0.0f);  // cleared before restoring
    expect_consistent(other.mem);
}

TEST(RsState, PendingRollbackIsWrittenAsTheSnapshotPlane) {
    buffered_memory bm(2, 2, 2, 1);
    decode_seq(bm.mem, 0, 0, 5);
    bm.fill_row(0, 1.0f);      // plane 0, cell 0
    bm.fill_row(2 + 0, 7.0f);  // plane 1, cell 0
    EXPECT_TRUE(bm.mem.seq_rm(0, 4, -1));
    const auto blob = bm.write(0);
    buffered_memory other(2, 2, 2, 1);
    other.read(blob, 0);
    EXPECT_EQ(other.mem.seq_pos_max(0), 3);
    EXPECT_EQ(other.r[0][0], bm.r[0][2 * 2]);  // restored into plane 0 from plane 1
    EXPECT_EQ(other.mem.rs_idx(0), 0u);
}

TEST(RsState, Tricky41_WholeBlockReadAsOneSequenceFailsAndChangesNothing) {
    buffered_memory bm(4, 4, 0, 2);
    decode_seq(bm.mem, 0, 0, 4);
    decode_seq(bm.mem, 1, 0, 2);
    bm.fill_row(1, 3.0f);
    const auto whole = bm.write(-1);
    const snapshot before = take(bm.mem, &bm);
    EXPECT_THROW(bm.read(whole, 1), state_error);
    EXPECT_TRUE(take(bm.mem, &bm) == before);  // llama.cpp would have erased seq 1
}

TEST(RsState, Tricky42_44_EveryRefusalLeavesTheMemoryBitIdentical) {
    buffered_memory src(4, 4, 0, 2);
    decode_seq(src.mem, 0, 0, 4);
    decode_seq(src.mem, 1, 0, 1);
    src.fill_row(0, 4.0f);
    const auto whole = src.write(-1);
    const auto single = src.write(0);

    buffered_memory bm(4, 3, 0, 2);
    decode_seq(bm.mem, 2, 0, 6);
    decode_seq(bm.mem, 1, 0, 2);
    bm.fill_row(0, 8.0f);
    bm.fill_row(1, 9.0f);
    EXPECT_TRUE(bm.mem.seq_rm(1, -1, -1));
    decode_seq(bm.mem, 1, 0, 3);
    const snapshot before = take(bm.mem, &bm);

    std::vector<std::vector<uint8_t>> bad_single, bad_whole;
    {  // n_layer altered (single block: cell count, pos, n_ids, then s_trans, n_layer)
        auto b = single; put_u32(b, 16, 3); bad_single.push_back(b);
    }
    {  // r dtype id altered
        auto b = single; put_u32(b, 20, 1); bad_single.push_back(b);
    }
    {  // r row size altered
        auto b = single; put_u32(b, 24, 12); bad_single.push_back(b);
    }
    {  // s_trans set
        auto b = single; put_u32(b, 12, 1); bad_single.push_back(b);
    }
    {  // two cells (pos 5, 6, no ids) in a single-sequence block
        std::vector<uint8_t> b(20);
        put_u32(b, 0, 2); put_u32(b, 4, 5); put_u32(b, 8, 0); put_u32(b, 12, 6); put_u32(b, 16, 0);
        b.insert(b.end(), single.begin() + 12, single.end());
        bad_single.push_back(b);
    }
    for (size_t cut = 0; cut < single.size(); cut += 3) {  // truncated anywhere
        bad_single.emplace_back(single.begin(), single.begin() + long(cut));
    }
    {  // cell_count = size + 1
        auto b = whole; put_u32(b, 0, 5); bad_whole.push_back(b);
    }
    {  // id 3 with n_seq_max = 3 (cell 1's id)
        auto b = whole; put_u32(b, 24, 3); bad_whole.push_back(b);
    }
    {  // the same id in two cells
        auto b = whole; put_u32(b, 24, 0); bad_whole.push_back(b);
    }
    {  // a negative id
        auto b = whole; put_u32(b, 24, uint32_t(-2)); bad_whole.push_back(b);
    }
    for (size_t cut = 0; cut < whole.size(); cut += 5) {  // tricky 43: truncated, e.g. inside cell 1
        bad_whole.emplace_back(whole.begin(), whole.begin() + long(cut));
    }
    for (const auto & b : bad_single) {
        EXPECT_THROW(bm.read(b, 1), state_error) << "single block of " << b.size() << " bytes";
        EXPECT_TRUE(take(bm.mem, &bm) == before);
    }
    for (const auto & b : bad_whole) {
        EXPECT_THROW(bm.read(b, -1), state_error) << "whole block of " << b.size() << " bytes";
        EXPECT_TRUE(take(bm.mem, &bm) == before);
    }
    // the intact blocks are accepted
    EXPECT_EQ(bm.read(single, 1), single.size());
    EXPECT_EQ(bm.mem.seq_pos_max(1), 3);
}

TEST(RsState, SingleSequenceIdAtOrAboveSizeIsRefusedUnchanged) {
    buffered_memory src(4, 4, 0, 1);
    decode_seq(src.mem, 0, 0, 2);
    const auto single = src.write(0);
    buffered_memory bm(2, 4, 0, 1);
    decode_seq(bm.mem, 0, 0, 1);
    const snapshot before = take(bm.mem, &bm);
    EXPECT_THROW(bm.read(single, 3), state_error);
    EXPECT_TRUE(take(bm.mem, &bm) == before);
    // a 0-cell block into seq 3 succeeds: there is nothing to place
    EXPECT_EQ(bm.read(src.write(2), 3), 36u);
}

TEST(RsState, Tricky45_CellWithoutIdsCountsAsUsed) {
    buffered_memory src(4, 4, 0, 1);
    decode_seq(src.mem, 0, 0, 3);
    auto whole = src.write(-1);
    // cell 0: pos 2, one id 0  ->  pos 2, zero ids
    std::vector<uint8_t> b(whole.begin(), whole.begin() + 4);
    b.insert(b.end(), whole.begin() + 4, whole.begin() + 8);
    const uint8_t zero[4] = { 0, 0, 0, 0 };
    b.insert(b.end(), zero, zero + 4);
    b.insert(b.end(), whole.begin() + 16, whole.end());
    buffered_memory bm(4, 4, 0, 1);
    EXPECT_EQ(bm.read(b, -1), b.size());
    EXPECT_EQ(bm.mem.cell(0).pos, 2);
    EXPECT_TRUE(bm.mem.cell(0).empty());
    EXPECT_EQ(bm.mem.used(), 1u);
}

TEST(RsState, ArgumentChecks) {
    buffered_memory bm(4, 4, 0, 1);
    EXPECT_THROW(bm.mem.state_write_size(-2, 0), std::invalid_argument);
    EXPECT_THROW(bm.mem.state_write_size(4, 0), std::invalid_argument);
    EXPECT_THROW(bm.mem.state_write_size(0, 4), std::invalid_argument);
    const auto b = bm.write(0);
    EXPECT_THROW(bm.read(b, 4), std::invalid_argument);
    EXPECT_THROW(bm.read(b, -2), std::invalid_argument);
    std::vector<uint8_t> small(3);
    EXPECT_THROW(bm.mem.state_write(small.data(), small.size(), 0, 0), std::invalid_argument);
}

TEST(RsState, OnDeviceNeedsContiguousCells) {
    buffered_memory bm(4, 4, 0, 1);
    decode_seq(bm.mem, 0, 0, 1);
    decode_seq(bm.mem, 1, 0, 1);
    decode_seq(bm.mem, 2, 0, 1);
    EXPECT_NO_THROW(bm.write(-1, RS_STATE_ON_DEVICE));
    EXPECT_TRUE(bm.mem.seq_rm(1, -1, -1));
    EXPECT_THROW(bm.write(-1, RS_STATE_ON_DEVICE), llmem::error);
    EXPECT_NO_THROW(bm.write(0, RS_STATE_ON_DEVICE));
    EXPECT_EQ(bm.write(-1, RS_STATE_PARTIAL_ONLY), bm.write(-1, 0));
}

// -- init_batch with the real batch allocator (spec 4.7, 5.9) --------------------------------------

namespace {

// entries: (ids in attach order, position)
batch make_batch(const std::vector<std::pair<std::vector<int32_t>, int32_t>> & entries) {
    batch b;
    b.n_tokens = uint32_t(entries.size());
    b.seq_id_off.push_back(0);
    for (const auto & e : entries) {
        b.token.push_back(0);
        b.pos.push_back(e.second);
        b.seq_id.insert(b.seq_id.end(), e.first.begin(), e.first.end());
        b.seq_id_off.push_back(int32_t(b.seq_id.size()));
    }
    return b;
}

// Validate against the memory, init_batch, apply every ubatch and read its s_copy.
memory_status decode_batch(rs_memory & mem, const std::vector<std::pair<std::vector<int32_t>, int32_t>> & entries,
                           uint32_t n_ubatch = 512, bool embd_all = false,
                           std::vector<std::vector<int32_t>> * copies = nullptr) {
    batch_allocr balloc(mem.n_seq_max());
    balloc.init(make_batch(entries), &mem, false);
    auto ctx = mem.init_batch(balloc, n_ubatch, embd_all);
    if (ctx->status() != memory_status::SUCCESS) {
        return ctx->status();
    }
    do {
        EXPECT_TRUE(ctx->apply());
        const auto & c = ctx->s_copy_all();
        if (copies) {
            copies->push_back(c);
        }
    } while (ctx->next());
    return memory_status::SUCCESS;
}

} // namespace

TEST(RsInitBatch, Tricky24_IdBeyondSizeFailsPrepare) {
    rs_memory mem(2, 4, 0);
    EXPECT_EQ(decode_batch(mem, { { { 3 }, 0 } }), memory_status::FAILED_PREPARE);
    EXPECT_EQ(mem.used(), 0u);
    EXPECT_EQ(mem.init_update()->status(), memory_status::NO_UPDATE);
}

TEST(RsInitBatch, Tricky26_SequentialSplitDecidesOneOrTwoUbatches) {
    rs_memory mem(4, 4, 0);
    for (int32_t s : { 2, 0, 1 }) {
        ASSERT_EQ(decode_batch(mem, { { { s }, 0 } }), memory_status::SUCCESS);
    }
    std::vector<std::vector<int32_t>> copies;
    ASSERT_EQ(decode_batch(mem, { { { 1 }, 1 }, { { 2 }, 1 } }, 512, false, &copies), memory_status::SUCCESS);
    EXPECT_EQ(copies, (std::vector<std::vector<int32_t>>{ { 2, 0, 1 } }));
    copies.clear();
    ASSERT_EQ(decode_batch(mem, { { { 2 }, 2 }, { { 1 }, 2 } }, 512, false, &copies), memory_status::SUCCESS);
    EXPECT_EQ(copies.size(), 2u);
}

TEST(RsInitBatch, Tricky31_CoupledTokensNeedEmbdAll) {
    rs_memory mem(4, 4, 0);
    const std::vector<std::pair<std::vector<int32_t>, int32_t>> coupled = { { { 0, 1 }, 0 }, { { 0, 1 }, 1 } };
    EXPECT_EQ(decode_batch(mem, coupled), memory_status::FAILED_PREPARE);
    EXPECT_EQ(mem.used(), 0u);
    ASSERT_EQ(decode_batch(mem, coupled, 512, true), memory_status::SUCCESS);
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0, 1 }));
    std::vector<std::vector<int32_t>> copies;
    ASSERT_EQ(decode_batch(mem, { { { 0 }, 2 }, { { 1 }, 2 } }, 512, false, &copies), memory_status::SUCCESS);
    EXPECT_EQ(copies, (std::vector<std::vector<int32_t>>{ { 0, 0 } }));
    EXPECT_EQ(mem.rs_z(), 1);
    EXPECT_EQ(ids_of(mem, 0), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(ids_of(mem, 1), (std::vector<int32_t>{ 1 }));
}

TEST(RsInitBatch, RollbackSplitKeepsTheLastTokensTogether) {
    rs_memory mem(4, 4, 2);
    batch_allocr balloc(4);
    balloc.init(make_batch({ { { 0 }, 0 }, { { 0 }, 1 }, { { 0 }, 2 }, { { 0 }, 3 }, { { 0 }, 4 } }), &mem, false);
    auto ctx = mem.init_batch(balloc, 4, false);
    ASSERT_EQ(ctx->status(), memory_status::SUCCESS);
    ASSERT_EQ(ctx->n_ubatches(), 2u);
    EXPECT_EQ(ctx->get_ubatch().n_tokens, 2u);
    ctx->next();
    EXPECT_EQ(ctx->get_ubatch().n_tokens, 3u);  // keep_tail = n_rs_seq + 1
    EXPECT_THROW(mem.init_batch(balloc, 3, false), std::invalid_argument);
    EXPECT_EQ(mem.used(), 0u);
}

// -- the computation contract: gather / store (spec 5.12) ----------------------------------------

TEST(RsContextStates, GatherZeroesRsZMovesOtherCellsAndStoreWritesPlanes) {
    buffered_memory bm(4, 4, 0, 1, 1, 1);
    rs_memory & mem = bm.mem;
    const auto state = [&](int32_t seq) { return bm.s[0][size_t(mem.tail(seq))]; };
    for (int32_t s : { 2, 0, 1 }) {
        decode_seq(mem, s, 0, 1);
        bm.s[0][size_t(mem.tail(s))] = 10.0f + float(s);
    }
    // example B: seqs 1 and 2 in one ubatch; seq 0's state must move from row 1 to row 2
    const ubatch ub = make_ubatch({ { { 1 }, { 1 } }, { { 2 }, { 1 } } });
    ASSERT_TRUE(mem.prepare({ ub }));
    rs_context ctx(&mem, std::vector<ubatch>{ ub });
    EXPECT_THROW(ctx.gather(1, 0, nullptr), llmem::error);  // before apply()
    ctx.apply();
    float in[2] = { 0, 0 };
    ctx.gather(1, 0, reinterpret_cast<uint8_t *>(in));
    EXPECT_EQ(in[0], 11.0f);
    EXPECT_EQ(in[1], 12.0f);
    EXPECT_EQ(state(0), 10.0f);
    EXPECT_THROW(ctx.gather(1, 0, nullptr), llmem::error);  // once per ubatch
    const float out[2] = { 21.0f, 22.0f };
    ctx.store(1, 0, reinterpret_cast<const uint8_t *>(out), 1);
    EXPECT_EQ(state(1), 21.0f);
    EXPECT_EQ(state(2), 22.0f);
    EXPECT_EQ(state(0), 10.0f);
    // r was never gathered: storing it moves seq 0's r row first
    bm.r[0][1] = 5.0f;  // seq 0's r before the ubatch (it was in cell 1)
    const float r_out[2] = { 1.0f, 2.0f };
    ctx.store(0, 0, reinterpret_cast<const uint8_t *>(r_out), 1);
    EXPECT_EQ(bm.r[0][size_t(mem.tail(0))], 5.0f);
    EXPECT_THROW(ctx.store(0, 0, reinterpret_cast<const uint8_t *>(r_out), 2), std::invalid_argument);
    EXPECT_THROW(ctx.gather(2, 0, nullptr), std::invalid_argument);
    EXPECT_THROW(ctx.gather(0, 1, nullptr), std::invalid_argument);
}

TEST(RsContextStates, NewSequenceReadsTheZeroedRow) {
    buffered_memory bm(4, 4, 1, 1, 1, 1);
    std::fill(bm.s[0].begin(), bm.s[0].end(), 7.0f);
    const ubatch ub = make_ubatch({ { { 0 }, { 0, 1 } } });
    rs_context ctx(&bm.mem, std::vector<ubatch>{ ub });
    ctx.apply();
    float in = -1.0f;
    ctx.gather(1, 0, reinterpret_cast<uint8_t *>(&in));
    EXPECT_EQ(bm.mem.rs_z(), 0);
    EXPECT_EQ(in, 0.0f);
    const float planes[2] = { 3.0f, 2.0f };  // plane 0 (end), plane 1 (one token before)
    ctx.store(1, 0, reinterpret_cast<const uint8_t *>(planes), 2);
    EXPECT_EQ(bm.s[0][0], 3.0f);
    EXPECT_EQ(bm.s[0][4], 2.0f);
    EXPECT_TRUE(bm.mem.seq_rm(0, 1, -1));
    const ubatch again = make_ubatch({ { { 0 }, { 1 } } });
    rs_context ctx2(&bm.mem, std::vector<ubatch>{ again });
    ctx2.apply();
    ctx2.gather(1, 0, reinterpret_cast<uint8_t *>(&in));
    EXPECT_EQ(in, 2.0f);  // the rollback snapshot
}
