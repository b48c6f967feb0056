#include "llmem/status.h"

#include <gtest/gtest.h>

namespace {

using llmem::memory_status;

TEST(Status, FailuresAreThePrepareAndComputeKinds) {
    EXPECT_FALSE(llmem::status_is_fail(memory_status::SUCCESS));
    EXPECT_FALSE(llmem::status_is_fail(memory_status::NO_UPDATE));
    EXPECT_TRUE(llmem::status_is_fail(memory_status::FAILED_PREPARE));
    EXPECT_TRUE(llmem::status_is_fail(memory_status::FAILED_COMPUTE));
}

TEST(Status, CombineFirstFailureWinsThenSuccess) {
    const memory_status all[] = { memory_status::SUCCESS, memory_status::NO_UPDATE, memory_status::FAILED_PREPARE,
                                  memory_status::FAILED_COMPUTE };
    for (memory_status a : all) {
        for (memory_status b : all) {
            memory_status expected;
            if (llmem::status_is_fail(a)) {
                expected = a;
            } else if (llmem::status_is_fail(b)) {
                expected = b;
            } else if (a == memory_status::SUCCESS || b == memory_status::SUCCESS) {
                expected = memory_status::SUCCESS;
            } else {
                expected = memory_status::NO_UPDATE;
            }
            EXPECT_EQ(llmem::status_combine(a, b), expected);
        }
    }
    // the spec's worked values
    EXPECT_EQ(llmem::status_combine(memory_status::SUCCESS, memory_status::NO_UPDATE), memory_status::SUCCESS);
    EXPECT_EQ(llmem::status_combine(memory_status::NO_UPDATE, memory_status::NO_UPDATE), memory_status::NO_UPDATE);
    EXPECT_EQ(llmem::status_combine(memory_status::FAILED_PREPARE, memory_status::FAILED_COMPUTE),
              memory_status::FAILED_PREPARE);
}

} // namespace
