#include "llmem/batch.h"
#include "llmem/errors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <map>
#include <utility>
#include <vector>

namespace {

using llmem::batch_reject;

// One batch entry as the tests write it: a token id, a position and the ids in attach order.
struct entry {
    int32_t              pos;
    std::vector<int32_t> seqs;
    bool                 output = false;
};

llmem::batch make_batch(const std::vector<entry> & entries, bool with_output = false) {
    llmem::batch b;
    b.n_tokens = uint32_t(entries.size());
    b.seq_id_off.push_back(0);
    for (size_t i = 0; i < entries.size(); ++i) {
        b.token.push_back(int32_t(i % 50));
        b.pos.push_back(entries[i].pos);
        b.seq_id.insert(b.seq_id.end(), entries[i].seqs.begin(), entries[i].seqs.end());
        b.seq_id_off.push_back(int32_t(b.seq_id.size()));
        if (with_output) {
            b.output.push_back(int8_t(entries[i].output));
        }
    }
    return b;
}

// A memory that reports fixed [min, max] ranges; absent sequences are empty.
struct fake_memory : llmem::seq_pos_source {
    std::map<int32_t, std::pair<int32_t, int32_t>> ranges;

    int32_t seq_pos_min(int32_t s) const override {
        auto it = ranges.find(s);
        return it == ranges.end() ? -1 : it->second.first;
    }
    int32_t seq_pos_max(int32_t s) const override {
        auto it = ranges.find(s);
        return it == ranges.end() ? -1 : it->second.second;
    }
};

std::vector<int32_t> idxs(const llmem::ubatch & ub) {
    return ub.empty() ? std::vector<int32_t>{} : ub.data->batch_idx;
}

batch_reject reject_reason(llmem::batch_allocr & a, const llmem::batch & b, const llmem::seq_pos_source * m = nullptr) {
    try {
        a.init(b, m, false);
    } catch (const llmem::batch_error & e) {
        return e.reason();
    }
    ADD_FAILURE() << "batch was accepted";
    return batch_reject::EMPTY;
}

// Positions and coupling checks (spec section 3 and tricky cases 1-10).

TEST(BatchInit, PartialSubsetRuleNeverRejects) {
    llmem::batch_allocr a(4, 64);
    EXPECT_NO_THROW(a.init(make_batch({ { 0, { 0, 1, 2 } }, { 1, { 0, 1 } }, { 1, { 1, 2 } } }), nullptr, false));
    EXPECT_EQ(a.n_tokens(), 3u);
}

TEST(BatchInit, DecreasingPositionsAreRefusedEvenWithoutGap) {
    llmem::batch_allocr a(4, 64);
    EXPECT_EQ(reject_reason(a, make_batch({ { 0, { 0 } }, { 2, { 0 } }, { 1, { 0 } } })), batch_reject::POS_DECREASING);
}

TEST(BatchInit, RepeatedPositionsAndAnyStartAreAllowed) {
    llmem::batch_allocr a(4, 64);
    EXPECT_NO_THROW(a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 1, { 0 } }, { 2, { 0 } } }), nullptr, false));
    fake_memory empty;
    EXPECT_NO_THROW(a.init(make_batch({ { 5, { 0 } }, { 6, { 0 } } }), &empty, false));
}

TEST(BatchInit, PositionsMustContinueTheMemory) {
    llmem::batch_allocr a(4, 64);
    fake_memory mem;
    mem.ranges[0] = { 0, 9 };
    EXPECT_NO_THROW(a.init(make_batch({ { 10, { 0 } }, { 11, { 0 } } }), &mem, false));
    EXPECT_EQ(reject_reason(a, make_batch({ { 11, { 0 } }, { 12, { 0 } } }), &mem), batch_reject::POS_NOT_CONTINUING);
    EXPECT_EQ(reject_reason(a, make_batch({ { 9, { 0 } }, { 10, { 0 } } }), &mem), batch_reject::POS_NOT_CONTINUING);
}

TEST(BatchInit, GapInsideTheBatchIsRefused) {
    llmem::batch_allocr a(4, 64);
    EXPECT_EQ(reject_reason(a, make_batch({ { 0, { 0 } }, { 0, { 0 } }, { 2, { 0 } } })), batch_reject::POS_GAP);
}

TEST(BatchInit, NegativeStartBelowMinusOneIsRefused) {
    llmem::batch_allocr a(4, 64);
    EXPECT_EQ(reject_reason(a, make_batch({ { -5, { 0 } }, { -4, { 0 } } })), batch_reject::POS_DECREASING);
    EXPECT_NO_THROW(a.init(make_batch({ { -1, { 0 } }, { 0, { 0 } } }), nullptr, false));
}

TEST(BatchInit, MropeAllowsJumpsButNotStalePositions) {
    llmem::batch_allocr a(4, -1, 2, 4);
    fake_memory mem;
    mem.ranges[0] = { 0, 9 };
    auto embd_entry = [](int32_t t) {
        llmem::batch b;
        b.n_tokens = 1;
        b.embd     = { 0.5f, 0.5f };
        b.n_embd   = 2;
        b.pos      = { t, 0, 0, 0 };
        return b;
    };
    EXPECT_NO_THROW(a.init(embd_entry(15), &mem, false));
    EXPECT_NO_THROW(a.init(embd_entry(9), &mem, false));
    EXPECT_EQ(reject_reason(a, embd_entry(8), &mem), batch_reject::POS_NOT_CONTINUING);
    EXPECT_EQ(reject_reason(a, make_batch({ { 9, { 0 } } }), &mem), batch_reject::POS_NOT_CONTINUING);
}

TEST(BatchInit, DivergedCoupledSequencesAreRefused) {
    llmem::batch_allocr a(4, 64);
    fake_memory mem;
    mem.ranges[0] = { 0, 5 };
    mem.ranges[1] = { 2, 5 };
    EXPECT_EQ(reject_reason(a, make_batch({ { 6, { 0, 1 } } }), &mem), batch_reject::COUPLED_DIVERGED);
    mem.ranges[1] = { 0, 5 };
    EXPECT_NO_THROW(a.init(make_batch({ { 6, { 0, 1 } } }), &mem, false));
}

TEST(BatchInit, ContentTokenAndIdChecks) {
    llmem::batch_allocr a(4, 64);
    llmem::batch mixed = make_batch({ { 0, { 0 } }, { 1, { 0 } } });
    mixed.token[1]     = llmem::NO_TOKEN;
    EXPECT_EQ(reject_reason(a, mixed), batch_reject::MIXED_CONTENT);
    llmem::batch negative = make_batch({ { 0, { 0 } } });
    negative.token[0]     = -7;
    EXPECT_EQ(reject_reason(a, negative), batch_reject::BAD_TOKEN);
    llmem::batch big = make_batch({ { 0, { 0 } } });
    big.token[0]     = 64;
    EXPECT_EQ(reject_reason(a, big), batch_reject::BAD_TOKEN);
    EXPECT_EQ(reject_reason(a, make_batch({ { 0, { 4 } } })), batch_reject::BAD_SEQ_ID);
    EXPECT_EQ(reject_reason(a, make_batch({ { 0, {} } })), batch_reject::NO_SEQ_ID);
    EXPECT_EQ(reject_reason(a, llmem::batch{}), batch_reject::EMPTY);
    llmem::batch none = make_batch({ { 0, { 0 } } });
    none.token[0]     = llmem::NO_TOKEN;
    EXPECT_EQ(reject_reason(a, none), batch_reject::NO_CONTENT);
}

TEST(BatchInit, EntryWithoutIdsBesideMultiIdEntryIsRefused) {
    llmem::batch_allocr a(4, 64);
    // the same id total as one id per entry: must not be mistaken for it
    EXPECT_EQ(reject_reason(a, make_batch({ { 0, {} }, { 1, { 0, 1 } } })), batch_reject::NO_SEQ_ID);
    EXPECT_EQ(reject_reason(a, make_batch({ { 0, { 0, 1 } }, { 1, {} } })), batch_reject::NO_SEQ_ID);
}

TEST(BatchInit, RefusalLeavesThePreviousBatchInPlace) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 2, { 0 } } }), nullptr, false);
    llmem::ubatch first = a.split_simple(1);
    EXPECT_EQ(reject_reason(a, make_batch({ { 0, { 9 } } })), batch_reject::BAD_SEQ_ID);
    EXPECT_EQ(a.n_tokens(), 3u);
    EXPECT_EQ(a.n_used(), 1u);
    EXPECT_EQ(idxs(a.split_simple(8)), (std::vector<int32_t>{ 1, 2 }));
    EXPECT_EQ(idxs(first), (std::vector<int32_t>{ 0 }));
}

TEST(BatchInit, OutputDefaultsAndOutputAll) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 2, { 0 } }, { 3, { 0 } } }), nullptr, false);
    EXPECT_EQ(a.n_outputs(), 1u);
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 2, { 0 } }, { 3, { 0 } } }, true), nullptr, true);
    EXPECT_EQ(a.n_outputs(), 4u);
}

TEST(BatchInit, AutomaticPositionsContinueTheFirstListedSequence) {
    llmem::batch_allocr a(4, 64);
    fake_memory mem;
    llmem::batch b = make_batch({ { 0, { 1 } }, { 0, { 0 } }, { 0, { 1, 0 } } });
    b.pos.clear();
    mem.ranges[0] = { 0, 5 };
    mem.ranges[1] = { 0, 5 };
    a.init(b, &mem, false);
    llmem::ubatch u = a.split_simple(8);
    EXPECT_EQ(u.pos(0), 6);
    EXPECT_EQ(u.pos(1), 6);
    EXPECT_EQ(u.pos(2), 7);  // counted on seq 1, the first id the caller listed
}

// Splits (spec section 4 and tricky cases 11-21).

TEST(BatchSplit, SimpleTakesConsecutiveRunsAndAtLeastOne) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 0, { 2 } }, { 1, { 2 } }, { 0, { 1 } }, { 1, { 1 } } }), nullptr, false);
    EXPECT_EQ(idxs(a.split_simple(4)), (std::vector<int32_t>{ 0, 1, 2, 3 }));
    llmem::ubatch b = a.split_simple(4);
    EXPECT_EQ(idxs(b), (std::vector<int32_t>{ 4, 5 }));
    EXPECT_FALSE(b.equal_seqs);
    EXPECT_EQ(b.n_seqs, 2u);
    EXPECT_EQ(b.n_seq_tokens, 1u);
    EXPECT_TRUE(a.split_simple(4).empty());

    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } } }), nullptr, false);
    EXPECT_EQ(a.split_simple(0).n_tokens, 1u);
    EXPECT_EQ(a.split_simple(0).n_tokens, 1u);
    EXPECT_TRUE(a.split_simple(0).empty());
}

TEST(BatchSplit, EqualCanExceedUbatchByOneSet) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0 } }, { 0, { 1 } }, { 0, { 2 } }, { 0, { 3 } } }), nullptr, false);
    llmem::ubatch u = a.split_equal(2, false, 0);
    EXPECT_EQ(u.n_tokens, 3u);
    EXPECT_EQ(u.n_seqs, 3u);
    EXPECT_EQ(a.split_equal(2, false, 0).data->seq_id_unq, (std::vector<int32_t>{ 3 }));
}

TEST(BatchSplit, EqualSequentialAndNot) {
    llmem::batch_allocr a(4, 64);
    const std::vector<entry> e = { { 0, { 0 } }, { 1, { 0 } }, { 0, { 2 } }, { 1, { 2 } }, { 0, { 1 } }, { 1, { 1 } } };
    a.init(make_batch(e), nullptr, false);
    EXPECT_EQ(idxs(a.split_equal(8, true, 0)), (std::vector<int32_t>{ 0, 1, 4, 5 }));
    EXPECT_EQ(idxs(a.split_equal(8, true, 0)), (std::vector<int32_t>{ 2, 3 }));
    a.split_reset();
    llmem::ubatch all = a.split_equal(8, false, 0);
    EXPECT_EQ(idxs(all), (std::vector<int32_t>{ 0, 1, 2, 3, 4, 5 }));
    EXPECT_EQ(all.n_seqs, 3u);
    EXPECT_EQ(all.primary(2), 2);
    a.split_reset();
    EXPECT_EQ(idxs(a.split_equal(3, false, 0)), (std::vector<int32_t>{ 0, 2, 4 }));
    EXPECT_EQ(idxs(a.split_equal(3, false, 0)), (std::vector<int32_t>{ 1, 3, 5 }));
}

TEST(BatchSplit, ShorterSetLimitsTheRounds) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 2, { 0 } }, { 3, { 0 } }, { 0, { 1 } }, { 1, { 1 } } }), nullptr, false);
    llmem::ubatch u = a.split_equal(8, false, 0);
    EXPECT_EQ(idxs(u), (std::vector<int32_t>{ 0, 1, 4, 5 }));
    EXPECT_EQ(u.n_seq_tokens, 2u);
    EXPECT_EQ(idxs(a.split_equal(8, false, 0)), (std::vector<int32_t>{ 2, 3 }));
    EXPECT_TRUE(a.split_equal(8, false, 0).empty());
}

TEST(BatchSplit, CoupledEntries) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0, 1 } }, { 1, { 0, 1 } } }), nullptr, false);
    EXPECT_TRUE(a.split_equal(4, true, 0).empty());
    EXPECT_EQ(a.n_used(), 0u);
    llmem::ubatch u = a.split_equal(4, false, 0);
    EXPECT_EQ(u.n_tokens, 2u);
    EXPECT_EQ(u.n_seqs, 1u);
    EXPECT_EQ(u.n_seqs_unq, 2u);
    EXPECT_EQ(u.seq_idx(0), 0);
    EXPECT_EQ(u.seq_idx(1), 1);

    a.init(make_batch({ { 0, { 0, 1 } }, { 1, { 0 } }, { 1, { 1 } } }), nullptr, false);
    EXPECT_EQ(idxs(a.split_equal(8, false, 0)), (std::vector<int32_t>{ 0 }));
    EXPECT_EQ(idxs(a.split_equal(8, false, 0)), (std::vector<int32_t>{ 1, 2 }));
}

TEST(BatchSplit, SeqNarrowsToSubsets) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0, 1 } }, { 1, { 0 } }, { 1, { 1 } }, { 2, { 0 } } }), nullptr, false);
    llmem::ubatch u = a.split_seq(8);
    EXPECT_EQ(idxs(u), (std::vector<int32_t>{ 0, 1, 3 }));
    EXPECT_EQ(u.n_seqs_unq, 2u);
    EXPECT_EQ(u.n_seqs, 1u);
    EXPECT_TRUE(u.equal_seqs);
    EXPECT_EQ(idxs(a.split_seq(8)), (std::vector<int32_t>{ 2 }));
}

TEST(BatchSplit, KeepTailDefersCompletesAndTruncates) {
    llmem::batch_allocr a(4, 64);
    // defer: seq 0 x2, seq 1 x3
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 0, { 1 } }, { 1, { 1 } }, { 2, { 1 } } }), nullptr, false);
    EXPECT_EQ(idxs(a.split_equal(4, true, 2)), (std::vector<int32_t>{ 0, 1 }));
    EXPECT_EQ(idxs(a.split_equal(4, true, 2)), (std::vector<int32_t>{ 2, 3, 4 }));
    // complete the first set: seq 0 x3, seq 1 x3
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 2, { 0 } }, { 0, { 1 } }, { 1, { 1 } }, { 2, { 1 } } }), nullptr, false);
    EXPECT_EQ(idxs(a.split_equal(4, false, 2)), (std::vector<int32_t>{ 0, 1, 2 }));
    EXPECT_EQ(idxs(a.split_equal(4, false, 2)), (std::vector<int32_t>{ 3, 4, 5 }));
    // truncate: one sequence x5
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } }, { 2, { 0 } }, { 3, { 0 } }, { 4, { 0 } } }), nullptr, false);
    EXPECT_EQ(idxs(a.split_equal(4, false, 2)), (std::vector<int32_t>{ 0, 1, 2 }));
    EXPECT_EQ(idxs(a.split_equal(4, false, 2)), (std::vector<int32_t>{ 3, 4 }));
}

TEST(BatchSplit, KeepTailThreeSequences) {
    llmem::batch_allocr a(4, 64);
    std::vector<entry> e;
    for (int32_t s = 0; s < 3; ++s) {
        for (int32_t p = 0; p < 5; ++p) {
            e.push_back({ p, { s } });
        }
    }
    a.init(make_batch(e), nullptr, false);
    llmem::ubatch u1 = a.split_equal(8, true, 3);
    EXPECT_EQ(u1.n_tokens, 6u);
    llmem::ubatch u2 = a.split_equal(8, true, 3);
    EXPECT_EQ(idxs(u2), (std::vector<int32_t>{ 2, 3, 4 }));
    llmem::ubatch u3 = a.split_equal(8, true, 3);
    EXPECT_EQ(idxs(u3), (std::vector<int32_t>{ 7, 8, 9, 12, 13, 14 }));
    EXPECT_EQ(a.n_used(), 15u);
}

TEST(BatchSplit, KeepTailNotBelowUbatchIsAnError) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } } }), nullptr, false);
    EXPECT_THROW(a.split_equal(2, true, 2), std::invalid_argument);
    EXPECT_EQ(a.n_used(), 0u);
}

TEST(BatchSplit, OutIdsFollowEmissionAndReset) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0 }, true }, { 1, { 0 }, false }, { 2, { 0 }, true } }, true), nullptr, false);
    a.split_simple(10);
    EXPECT_EQ(a.out_ids(), (std::vector<int32_t>{ 0, 2 }));
    a.split_reset();
    EXPECT_TRUE(a.out_ids().empty());
    EXPECT_EQ(a.n_used(), 0u);
}

TEST(BatchSplit, PrimaryIdIsTheLastAttached) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0, 1 } }, { 1, { 1, 0 } }, { 2, { 0, 1, 2 } } }), nullptr, false);
    llmem::ubatch u = a.split_simple(8);
    EXPECT_EQ(std::vector<int32_t>(u.seq_ids(0), u.seq_ids(0) + 2), (std::vector<int32_t>{ 1, 0 }));
    EXPECT_EQ(std::vector<int32_t>(u.seq_ids(1), u.seq_ids(1) + 2), (std::vector<int32_t>{ 0, 1 }));
    EXPECT_EQ(std::vector<int32_t>(u.seq_ids(2), u.seq_ids(2) + 3), (std::vector<int32_t>{ 2, 1, 0 }));
}

TEST(BatchSplit, UbatchStorageIsRecycledOnlyWhenReleased) {
    llmem::batch_allocr a(4, 64);
    a.init(make_batch({ { 0, { 0 } }, { 1, { 0 } } }), nullptr, false);
    llmem::ubatch held = a.split_simple(1);
    llmem::ubatch next = a.split_simple(1);
    EXPECT_NE(held.data.get(), next.data.get());
    EXPECT_EQ(held.pos(0), 0);
    EXPECT_EQ(next.pos(0), 1);
    const auto * recycled = next.data.get();
    next                  = {};
    a.split_reset();
    a.split_simple(1);  // held keeps its storage; the released one is reused
    EXPECT_EQ(held.pos(0), 0);
    EXPECT_EQ(a.split_simple(1).data.get(), recycled);
}

TEST(BatchSplit, LargeSequenceIdsAboveLlamaCppLimit) {
    llmem::batch_allocr a(1024, 64);
    a.init(make_batch({ { 0, { 1000 } }, { 0, { 1001 } }, { 0, { 3 } } }), nullptr, false);
    llmem::ubatch u = a.split_equal(8, false, 0);
    EXPECT_EQ(u.data->seq_id_unq, (std::vector<int32_t>{ 3, 1000, 1001 }));
    EXPECT_EQ(u.seq_idx(1001), 2);
}

// The one-pass decode-shape path of init() must leave the allocator exactly as the general path
// does: same acceptance and failure reason, same positions and output flags, same micro-batches
// from every splitter. Batches are drawn around that shape (one id per entry, each sequence
// once) with the ways out of it: a repeated sequence, a bad token or id, given positions or
// outputs, an entry with two ids or none.
std::string describe(const llmem::ubatch & ub) {
    if (ub.empty()) {
        return "-";
    }
    const auto & d = *ub.data;
    std::string  out = std::to_string(ub.n_tokens) + "/" + std::to_string(ub.n_seq_tokens) + "/" +
                       std::to_string(ub.n_seqs) + "/" + std::to_string(ub.n_seqs_unq) + (ub.equal_seqs ? "e" : "s");
    auto list = [&](const char * name, const auto & v) {
        out += std::string(" ") + name + ":";
        for (const auto x : v) {
            out += std::to_string(int(x)) + ",";
        }
    };
    list("tok", d.token);
    list("pos", d.pos);
    list("off", d.seq_id_off);
    list("ids", d.seq_id);
    list("unq", d.seq_id_unq);
    list("idx", d.seq_idx);
    list("out", d.output);
    list("bi", d.batch_idx);
    return out;
}

std::string run_allocator(llmem::batch_allocr & a, const llmem::batch & b, const llmem::seq_pos_source * m,
                          bool output_all, int split) {
    try {
        a.init(b, m, output_all);
    } catch (const llmem::batch_error & e) {
        return "refused " + std::to_string(int(e.reason())) + ": " + e.what();
    }
    std::string out = "n " + std::to_string(a.n_tokens()) + " outputs " + std::to_string(a.n_outputs()) +
                      (a.has_coupled() ? " coupled" : "") + "\n";
    for (int32_t s = 0; s < a.n_seq_max(); ++s) {
        out += std::to_string(a.batch_pos_min(s)) + ".." + std::to_string(a.batch_pos_max(s)) + " ";
    }
    for (int round = 0; round < 2; ++round) {  // twice: split_reset must restart the same way
        a.split_reset();
        while (true) {
            llmem::ubatch ub = split == 0 ? a.split_simple(3) : split == 1 ? a.split_equal(3, false) : a.split_seq(3);
            if (ub.empty()) {
                break;
            }
            out += "\n" + describe(ub);
        }
        out += "\nout_ids:";
        for (int32_t k : a.out_ids()) {
            out += std::to_string(k) + ",";
        }
    }
    return out;
}

TEST(BatchInit, DecodeShapePathMatchesTheGeneralPath) {
    std::mt19937 rng(7);
    auto         pick = [&](int n) { return int(rng() % uint32_t(n)); };
    const int32_t n_seq_max = 8;
    fake_memory   mem;
    mem.ranges[1] = { 0, 4 };
    mem.ranges[2] = { 3, 9 };
    mem.ranges[5] = { 0, 0 };
    int accepted = 0, refused = 0;
    for (int trial = 0; trial < 3000; ++trial) {
        const uint32_t n = 1 + uint32_t(pick(7));
        llmem::batch   b;
        b.n_tokens = n;
        std::vector<int32_t> order(n_seq_max);
        for (int32_t s = 0; s < n_seq_max; ++s) {
            order[s] = s;
        }
        std::shuffle(order.begin(), order.end(), rng);
        b.seq_id_off.push_back(0);
        for (uint32_t i = 0; i < n; ++i) {
            b.token.push_back(pick(40) == 0 ? -1 - pick(2) : pick(40) == 0 ? 64 : pick(64));
            const int kind = pick(30);
            if (kind == 0) {  // an entry with two ids
                b.seq_id.push_back(order[i % n_seq_max]);
                b.seq_id.push_back(order[(i + 1) % n_seq_max]);
            } else if (kind == 1) {  // with none
            } else {
                const int32_t s = pick(25) == 0 ? order[0] : pick(60) == 0 ? n_seq_max + pick(3) - 1 : order[i % n_seq_max];
                b.seq_id.push_back(pick(80) == 0 ? -1 : s);
            }
            b.seq_id_off.push_back(int32_t(b.seq_id.size()));
        }
        if (pick(6) == 0) {
            for (uint32_t i = 0; i < n; ++i) {
                b.output.push_back(int8_t(pick(2)));
            }
        }
        if (pick(10) == 0) {
            for (uint32_t i = 0; i < n; ++i) {
                b.pos.push_back(pick(12));
            }
        }
        const bool                      output_all = pick(5) == 0;
        const llmem::seq_pos_source *   m          = pick(4) == 0 ? nullptr : &mem;
        const int                       split      = pick(3);
        llmem::batch_allocr fast(n_seq_max, 64), general(n_seq_max, 64);
        general.set_decode_fast_path(false);
        // a previous batch in both, so that stale per-sequence state would show
        llmem::batch warm;
        warm.n_tokens = 2;
        warm.token    = { 1, 2 };
        warm.seq_id   = { order[1], order[2] };
        warm.seq_id_off = { 0, 1, 2 };
        fast.init(warm, &mem, false);
        general.init(warm, &mem, false);
        const std::string want = run_allocator(general, b, m, output_all, split);
        ASSERT_EQ(run_allocator(fast, b, m, output_all, split), want) << "trial " << trial;
        (want.rfind("refused", 0) == 0 ? refused : accepted) += 1;
    }
    EXPECT_GT(accepted, 500);
    EXPECT_GT(refused, 300);
}

} // namespace
