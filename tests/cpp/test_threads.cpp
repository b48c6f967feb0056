// Thread tests of the core, built on their own as llmem_thread_tests so that scripts/test.sh can
// run them under ThreadSanitizer without building the whole suite again. The core's contract
// (docs/threading.md): every call on a memory runs under the caller's lock, except the destruction
// of a context, which happens wherever its last reference dies.

#include "kv_test_util.h"

#include "llmem/batch.h"
#include "llmem/kv_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <deque>
#include <mutex>
#include <thread>

namespace llmem {
namespace {

batch decode_batch(int32_t seq, uint32_t n_tokens) {
    batch b;
    b.n_tokens = n_tokens;
    b.token.assign(n_tokens, 1);
    b.seq_id.assign(n_tokens, seq);
    b.seq_id_off.resize(n_tokens + 1);
    for (uint32_t i = 0; i <= n_tokens; ++i) {
        b.seq_id_off[i] = int32_t(i);
    }
    return b;
}

// Issue 20, defect 1: a context handed to another thread and destroyed there (a Python object
// collected on another thread) gives its plan storage back to the cache's pools while the owner
// of the memory lock plans the next batch from the same pools. Under ThreadSanitizer this was a
// data race on the pools; the result must also stay right (every plan complete).
TEST(KvThreads, ContextDestroyedOnAnotherThreadWhilePlanning) {
    kv_cache     cache(test::params(256, 4));
    batch_allocr balloc(4);
    std::mutex   memory_lock;  // the Python memory's lock
    std::mutex   queue_lock;
    std::deque<kv_context> handed_over;
    std::atomic<bool>      done{ false };

    std::thread dropper([&] {
        for (bool last = false; !last;) {
            last = done.load();  // one more pass after the planner finished
            std::deque<kv_context> drop;
            {
                std::lock_guard<std::mutex> q(queue_lock);
                drop.swap(handed_over);
            }
            drop.clear();  // destructors run here, without memory_lock
            std::this_thread::yield();
        }
    });
    const batch b = decode_batch(0, 6);
    for (int i = 0; i < 2000; ++i) {
        kv_context ctx(memory_status::FAILED_PREPARE);
        {
            std::lock_guard<std::mutex> m(memory_lock);
            balloc.init(b, &cache, false);
            ctx = kv_init_batch(cache, balloc, 2);
            ASSERT_EQ(ctx.status(), memory_status::SUCCESS);
            ASSERT_EQ(ctx.n_ubatches(), 3u);
            ASSERT_EQ(ctx.slots().size(), 3u);
        }
        std::lock_guard<std::mutex> q(queue_lock);
        handed_over.push_back(std::move(ctx));
    }
    done = true;
    dropper.join();
    EXPECT_EQ(cache.used_count(), 0u);
}

// Two memories, two threads, each under its own lock: nothing is shared between them (the
// allocators' pools, the parsed-state pool of the state reader is per thread).
TEST(KvThreads, DistinctCachesInParallel) {
    auto work = [](int seed) {
        kv_cache     cache(test::params(64, 2));
        batch_allocr balloc(2);
        for (int i = 0; i < 300; ++i) {
            balloc.init(decode_batch(seed & 1, 2), &cache, false);
            kv_context ctx = kv_init_batch(cache, balloc, 2);
            ASSERT_EQ(ctx.status(), memory_status::SUCCESS);
            ASSERT_TRUE(ctx.apply());
            std::vector<uint8_t> state(cache.state_write_size(-1));
            cache.state_write(state.data(), state.size(), -1);
            cache.seq_rm(-1, -1, -1);
        }
    };
    std::thread a(work, 0), b(work, 1);
    a.join();
    b.join();
}

} // namespace
} // namespace llmem
