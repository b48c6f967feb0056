// Issue 20: the KV cache's position arithmetic at INT32_MAX (run under UBSan by scripts/test.sh,
// where an overflow stops the test).

#include "kv_test_util.h"

#include <gtest/gtest.h>

#include <limits>

namespace llmem {
namespace {

constexpr int32_t MAX = std::numeric_limits<int32_t>::max();

// A sliding-window cache asks, for every used cell, whether it is outside the window of its
// sequence's next position (seq_pos_max + 1): at INT32_MAX that sum overflowed int32 (found by the
// structure-aware state fuzzer). The window test is now done in int64.
TEST(KvLimits, SlotSearchNextToASequenceEndingAtInt32Max) {
    for (swa_type t : { swa_type::STANDARD, swa_type::CHUNKED, swa_type::SYMMETRIC }) {
        kv_cache c(test::params(4, 2, true, t, 2));
        ASSERT_EQ(test::place(c, test::run(0, MAX - 1, MAX)).size(), 1u);
        c.seq_add(0, 0, -1, 1);                                         // seq 0 now ends at INT32_MAX
        EXPECT_EQ(c.seq_pos_max(0), MAX);
        // seq 1 fills the cache: every slot search tests seq 0's cell against MAX + 1
        for (int32_t p = 0; p < 3; ++p) {
            EXPECT_EQ(test::place(c, test::run(1, p, p + 1)).size(), 1u);
        }
        const auto again = test::place(c, test::run(1, 3, 4));
        // the cell at INT32_MAX is outside seq 0's window only for a standard or chunked window
        // (its next position is 2^31); the symmetric window never masks it for seq 0's cell
        EXPECT_TRUE(again.size() <= 1u);
        EXPECT_TRUE(c.cells(0).check_invariants());
    }
}

} // namespace
} // namespace llmem
