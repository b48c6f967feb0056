#include "llmem/kv_cells.h"
#include "kv_test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

using llmem::kv_cells;
using llmem::test::dump;

// Cells 0..3 at positions 0..3 held by seq 0.
kv_cells four_cells() {
    kv_cells T(8, 4, false);
    for (uint32_t i = 0; i < 4; ++i) {
        T.pos_set(i, int32_t(i));
        T.seq_add(i, 0);
    }
    return T;
}

TEST(KvCells, FreshTableIsEmpty) {
    kv_cells T(100, 2, false);
    EXPECT_EQ(T.used_count(), 0u);
    EXPECT_EQ(T.used_max_p1(), 0u);
    EXPECT_EQ(T.seq_pos_min(0), -1);
    EXPECT_EQ(T.seq_pos_max(1), -1);
    EXPECT_EQ(T.next_empty(0), 0u);
    EXPECT_EQ(T.next_used(0), 100u);
    EXPECT_FALSE(T.has_shift());
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, PosSetAndSeqAddIndexTheCell) {
    kv_cells T = four_cells();
    EXPECT_EQ(T.used_count(), 4u);
    EXPECT_EQ(T.used_max_p1(), 4u);
    EXPECT_EQ(T.seq_pos_min(0), 0);
    EXPECT_EQ(T.seq_pos_max(0), 3);
    T.seq_add(2, 1);
    T.seq_add(2, 1);  // already there: no change
    EXPECT_EQ(T.seq_count(2), 2u);
    EXPECT_EQ(T.seq_pos_min(1), 2);
    EXPECT_EQ(T.seq_n_cells(1), 1u);
    EXPECT_EQ(dump(T), "0:p0{0} 1:p1{0} 2:p2{0,1} 3:p3{0} . . . .");
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, SeqRmEmptiesOnlyWhenLastSequenceLeaves) {
    kv_cells T = four_cells();
    T.seq_add(1, 1);
    EXPECT_FALSE(T.seq_rm(1, 0));
    EXPECT_EQ(T.seq_get(1), 1);
    EXPECT_TRUE(T.seq_rm(1, 1));
    EXPECT_TRUE(T.is_empty(1));
    EXPECT_EQ(T.used_count(), 3u);
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, SeqKeepKeepsOnlyTheSequence) {
    kv_cells T = four_cells();
    T.seq_add(1, 1);
    T.pos_set(5, 9);
    T.seq_add(5, 2);
    EXPECT_FALSE(T.seq_keep(1, 0));
    EXPECT_EQ(T.seq_count(1), 1u);
    EXPECT_TRUE(T.seq_keep(5, 0));
    EXPECT_TRUE(T.is_empty(5));
    EXPECT_EQ(T.seq_pos_max(1), -1);
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, UsedCellWithoutSequenceSurvivesSeqKeep) {
    kv_cells T(4, 2, false);
    T.pos_set(0, 3);  // as a whole-cache restore of a record with n_seq = 0 does
    EXPECT_FALSE(T.seq_keep(0, 0));
    EXPECT_FALSE(T.is_empty(0));
    EXPECT_EQ(T.keep_only(1), 4u);
    EXPECT_FALSE(T.is_empty(0));
}

TEST(KvCells, PosAddBelowZeroEmptiesTheCellForAllSequences) {
    kv_cells T = four_cells();
    T.seq_add(0, 1);
    EXPECT_TRUE(T.pos_add(0, -1));
    EXPECT_TRUE(T.is_empty(0));
    EXPECT_EQ(T.seq_pos_max(1), -1);
    EXPECT_TRUE(T.has_shift());
    EXPECT_FALSE(T.pos_add(1, 5));
    EXPECT_EQ(T.pos_get(1), 6);
    EXPECT_EQ(T.shift_get(1), 5);
    EXPECT_EQ(T.seq_pos_max(0), 6);
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, PosDivRecordsTheSignedPositionChange) {
    kv_cells T = four_cells();
    T.pos_div(3, 2);
    EXPECT_EQ(T.pos_get(3), 1);
    EXPECT_EQ(T.shift_get(3), -2);  // llama.cpp records +2 here (deviation, see docs/deviations.md)
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, BulkSeqPosAddKeepsIndexSortedAndMovesSharedCells) {
    kv_cells T(8, 2, false);
    for (uint32_t i = 0; i < 4; ++i) {
        T.pos_set(i, int32_t(i));
        T.seq_add(i, 0);
        T.seq_add(i, 1);
    }
    // spec §11 case 5: seq_add(0, 0, 2, -1) on cells shared by {0,1}
    EXPECT_EQ(T.seq_pos_add(0, 0, 2, -1), 0u);
    EXPECT_EQ(dump(T), ". 1:p0{0,1} 2:p2{0,1} 3:p3{0,1} . . . .");
    EXPECT_EQ(T.used_count(), 3u);
    EXPECT_EQ(T.seq_pos_min(1), 0);
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, BulkSeqPosDivSortsDuplicatePositions) {
    kv_cells T(16, 1, false);
    for (uint32_t i = 0; i < 10; ++i) {
        T.pos_set(9 - i, int32_t(i));  // reverse cell order
        T.seq_add(9 - i, 0);
    }
    T.seq_pos_div(0, 0, llmem::POS_OPEN, 2);
    EXPECT_EQ(T.seq_pos_min(0), 0);
    EXPECT_EQ(T.seq_pos_max(0), 4);
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, RangeRemovals) {
    kv_cells T = four_cells();
    T.seq_add(2, 1);
    EXPECT_EQ(T.seq_rm_range(0, 1, 3), 1u);  // cell 1 emptied, cell 2 keeps seq 1
    EXPECT_EQ(dump(T), "0:p0{0} . 2:p2{1} 3:p3{0} . . . .");
    EXPECT_EQ(T.rm_range(0, 3), 0u);
    EXPECT_EQ(dump(T), ". . . 3:p3{0} . . . .");
    EXPECT_EQ(T.seq_rm_range(0, 5, 2), 8u);  // inverted: nothing
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, NextEmptySkipsWholeWords) {
    kv_cells T(200, 1, false);
    for (uint32_t i = 0; i < 150; ++i) {
        T.pos_set(i, int32_t(i));
        T.seq_add(i, 0);
    }
    EXPECT_EQ(T.next_empty(0), 150u);
    EXPECT_EQ(T.next_empty(199), 199u);
    T.seq_rm(70, 0);
    EXPECT_EQ(T.next_empty(3), 70u);
    EXPECT_EQ(T.next_used(150), 200u);
    EXPECT_EQ(T.used_max_p1(), 150u);
    T.seq_rm_range(0, 100, 150);
    EXPECT_EQ(T.used_max_p1(), 100u);
}

// collect_empty against a cell-by-cell scan of next_empty, over ranges that start and end inside
// words, across words, and limits on the count.
TEST(KvCells, CollectEmptyMatchesCellByCellScan) {
    kv_cells T(300, 2, false);
    for (uint32_t i = 0; i < 300; ++i) {
        if (i % 7 == 3 || (i >= 64 && i < 130) || i == 299) {
            T.pos_set(i, int32_t(i));
            T.seq_add(i, int32_t(i % 2));
        }
    }
    const uint32_t bounds[] = { 0, 1, 3, 63, 64, 65, 127, 128, 130, 200, 256, 299, 300, 400 };
    for (const uint32_t from : bounds) {
        for (const uint32_t to : bounds) {
            for (const uint32_t n : { 0u, 1u, 5u, 64u, 1000u }) {
                std::vector<uint32_t> want;
                for (uint32_t c = T.next_empty(from); c < std::min(to, 300u) && want.size() < n; c = T.next_empty(c + 1)) {
                    want.push_back(c);
                }
                std::vector<uint32_t> got = { 7u };  // appended after what is there
                const uint32_t k = T.collect_empty(from, to, n, got);
                ASSERT_EQ(k, want.size()) << from << " " << to << " " << n;
                want.insert(want.begin(), 7u);
                ASSERT_EQ(got, want) << from << " " << to << " " << n;
            }
        }
    }
}

// occupy_each is occupy per cell: the same table, invariants, used count and bound; it stops at
// the first used cell (returning how many it placed) and inserts out-of-order keys in place.
TEST(KvCells, OccupyEachEqualsOccupyAndStopsAtAUsedCell) {
    kv_cells a(64, 3, false), b(64, 3, false);
    for (kv_cells * T : { &a, &b }) {
        T->occupy(10, 7, 1);  // seq 1 holds position 7: a later position 5 is not appended
        T->occupy(40, 2, 2);
    }
    const uint32_t cells[] = { 3, 4, 20, 5, 40, 6 };
    const int32_t  pos[]   = { 8, 0, 5, 3, 9, 9 };
    const int32_t  seqs[]  = { 1, 0, 1, 2, 0, 0 };
    a.journal_begin();
    EXPECT_EQ(a.occupy_each(cells, pos, seqs, 6), 4u);  // cell 40 is used
    for (uint32_t k = 0; k < 4; ++k) {
        b.occupy(cells[k], pos[k], seqs[k]);
    }
    EXPECT_EQ(dump(a), dump(b));
    EXPECT_TRUE(a.check_invariants());
    EXPECT_EQ(a.used_count(), b.used_count());
    EXPECT_EQ(a.used_max_p1(), 41u);
    EXPECT_EQ(a.seq_pos_max(1), 8);
    EXPECT_EQ(a.seq_index(1).size(), 3u);
    a.journal_rollback();  // the journal saw every cell
    EXPECT_TRUE(a.check_invariants());
    EXPECT_EQ(a.used_count(), 2u);
    EXPECT_EQ(a.seq_pos_max(0), -1);
    EXPECT_EQ(a.occupy_each(cells, pos, seqs, 0), 0u);
}

TEST(KvCells, JournalRollbackRestoresEverything) {
    kv_cells T = four_cells();
    T.seq_add(1, 2);
    T.pos_add(3, 2);
    const std::string before = dump(T);
    const int32_t     shift3 = T.shift_get(3);
    T.journal_begin();
    T.pos_add(3, -10);  // empties it
    T.rm(1);
    T.pos_set(1, 40);
    T.seq_add(1, 3);
    T.seq_rm_range(0, 0, 3);
    T.pos_set(6, 7);
    T.seq_add(6, 0);
    T.journal_rollback();
    EXPECT_EQ(dump(T), before);
    EXPECT_EQ(T.shift_get(3), shift3);
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, ManySequencesShareOneCell) {
    kv_cells T(4, 1024, false);
    T.pos_set(0, 0);
    for (int32_t s = 1023; s >= 0; --s) {
        T.seq_add(0, s);
    }
    EXPECT_EQ(T.seq_count(0), 1024u);
    EXPECT_TRUE(T.seq_has(0, 512));
    EXPECT_EQ(T.keep_only(700), 4u);
    EXPECT_EQ(T.seq_count(0), 1u);
    EXPECT_EQ(T.seq_get(0), 700);
    EXPECT_TRUE(T.check_invariants());
}

// A cell's ids live inline up to two and in a side list from three; every step between the
// representations must keep the ids sorted and the index in step.
TEST(KvCells, IdsMoveBetweenInlineAndSideListBothWays) {
    kv_cells T(4, 8, false);
    T.pos_set(0, 0);
    auto ids = [&] {
        uint32_t        n = 0;
        const int32_t * p = T.seq_list(0, n);
        return std::vector<int32_t>(p, p + n);
    };
    T.seq_add(0, 5);
    T.seq_add(0, 2);
    EXPECT_EQ(ids(), (std::vector<int32_t>{ 2, 5 }));
    T.seq_add(0, 7);
    T.seq_add(0, 3);
    EXPECT_EQ(ids(), (std::vector<int32_t>{ 2, 3, 5, 7 }));
    EXPECT_FALSE(T.seq_rm(0, 5));
    EXPECT_EQ(ids(), (std::vector<int32_t>{ 2, 3, 7 }));
    EXPECT_FALSE(T.seq_rm(0, 2));  // three to two: back inline
    EXPECT_EQ(ids(), (std::vector<int32_t>{ 3, 7 }));
    EXPECT_TRUE(T.seq_has(0, 7));
    EXPECT_FALSE(T.seq_has(0, 2));
    T.seq_add(0, 1);  // two to three again, reusing the freed side list
    EXPECT_EQ(ids(), (std::vector<int32_t>{ 1, 3, 7 }));
    EXPECT_TRUE(T.check_invariants());
    EXPECT_FALSE(T.seq_rm(0, 7));
    EXPECT_FALSE(T.seq_rm(0, 1));
    EXPECT_EQ(T.seq_get(0), 3);
    EXPECT_TRUE(T.seq_rm(0, 3));
    EXPECT_TRUE(T.is_empty(0));
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, SeqCopyAppendsOrMergesAndSkipsCellsAlreadyShared) {
    kv_cells T(16, 4, false);
    for (uint32_t i = 0; i < 6; ++i) {  // seq 0 at positions 0..5 in cells 0..5
        T.pos_set(i, int32_t(i));
        T.seq_add(i, 0);
    }
    T.pos_set(8, 2);  // seq 1 already holds position 2 elsewhere and cell 4
    T.seq_add(8, 1);
    T.seq_add(4, 1);
    T.seq_copy(0, 1, 1, 5);  // positions 1..4; cell 4 already holds 1
    EXPECT_EQ(T.seq_n_cells(1), 5u);
    EXPECT_EQ(T.seq_pos_min(1), 1);
    EXPECT_EQ(T.seq_pos_max(1), 4);
    EXPECT_FALSE(T.seq_has(0, 1));  // positions 0 and 5 are outside [1, 5)
    EXPECT_FALSE(T.seq_has(5, 1));
    EXPECT_TRUE(T.check_invariants());
    T.seq_copy(0, 2, 0, 100);  // into an empty sequence: one append
    EXPECT_EQ(T.seq_n_cells(2), 6u);
    EXPECT_EQ(T.seq_count(3), 3u);  // seqs 0, 1, 2
    T.seq_copy(0, 0, 0, 100);       // onto itself: nothing
    T.seq_copy(0, 3, 4, 4);         // empty range: nothing
    EXPECT_EQ(T.seq_n_cells(3), 0u);
    EXPECT_TRUE(T.check_invariants());

    const std::string before = dump(T);
    T.journal_begin();
    T.seq_copy(1, 3, 0, 100);
    EXPECT_EQ(T.seq_n_cells(3), 5u);
    T.journal_rollback();
    EXPECT_EQ(dump(T), before);
    EXPECT_EQ(T.seq_n_cells(3), 0u);
    EXPECT_TRUE(T.check_invariants());
}

TEST(KvCells, OccupyAllMergesOutOfOrderCellsAndRollsBack) {
    kv_cells T(16, 3, false);
    T.pos_set(5, 4);  // seq 1 already holds position 4 in cell 5
    T.seq_add(5, 1);
    const std::string before = dump(T);
    T.journal_begin();
    const uint32_t cells[] = { 9, 2, 3, 12 };
    const int32_t  pos[]   = { 6, 1, 2, 5 };  // keys not in order: merged, not appended
    T.occupy_all(cells, pos, 4, 1);
    EXPECT_EQ(T.seq_n_cells(1), 5u);
    EXPECT_EQ(T.seq_pos_min(1), 1);
    EXPECT_EQ(T.seq_pos_max(1), 6);
    EXPECT_EQ(T.used_count(), 5u);
    EXPECT_TRUE(T.check_invariants());
    T.journal_rollback();
    EXPECT_EQ(dump(T), before);
    EXPECT_TRUE(T.check_invariants());
    T.occupy_all(cells, pos, 0, 1);  // nothing to place
    EXPECT_EQ(dump(T), before);
}

TEST(KvCells, SeqRmRangeEmptiesSoleCellsAndKeepsSharedOnes) {
    kv_cells T(8, 3, false);
    for (uint32_t i = 0; i < 6; ++i) {
        T.pos_set(i, int32_t(i));
        T.seq_add(i, 0);
    }
    T.seq_add(2, 1);
    T.seq_add(4, 1);
    T.seq_add(4, 2);
    T.journal_begin();
    EXPECT_EQ(T.seq_rm_range(0, 1, 5), 1u);  // cells 1 and 3 empty; 2 and 4 stay with 1 (and 2)
    EXPECT_EQ(dump(T), "0:p0{0} . 2:p2{1} . 4:p4{1,2} 5:p5{0} . .");
    EXPECT_EQ(T.used_count(), 4u);
    EXPECT_TRUE(T.check_invariants());
    T.journal_rollback();
    EXPECT_EQ(T.used_count(), 6u);
    EXPECT_EQ(T.seq_n_cells(0), 6u);
    EXPECT_TRUE(T.check_invariants());
}

} // namespace
