// The versioned state header (state_file.h) and the bounds the state readers check before they
// size anything by a count read from the bytes (docs/reliability.md).

#include "llmem/errors.h"
#include "llmem/kv_cache.h"
#include "llmem/rs_memory.h"
#include "llmem/state_file.h"
#include "kv_test_util.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>

namespace {

using namespace llmem;
using namespace llmem::test;

std::vector<uint8_t> save(const kv_cache & c, int32_t seq) {
    std::vector<uint8_t> out;
    c.state_write(out, seq);
    return out;
}

void put_u32(std::vector<uint8_t> & b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); }

// The message of the state_error `fn` throws ("" if it does not throw one).
template <typename F>
std::string refusal(F && fn) {
    try {
        fn();
    } catch (const state_error & e) {
        return e.what();
    }
    return "";
}

TEST(StateFile, Crc32IsZlibs) {
    const char * check = "123456789";
    EXPECT_EQ(crc32(reinterpret_cast<const uint8_t *>(check), 9), 0xCBF43926u);
    EXPECT_EQ(crc32(nullptr, 0), 0u);
}

TEST(StateFile, HeaderRoundTripAndNamedMismatch) {
    kv_cache c(params(8, 2));
    place(c, run(0, 0, 3));
    const auto payload = save(c, 0);
    state_memory mem{ memory_kind::KV_CACHE, { &c }, nullptr };
    auto file = state_header_write(mem, 0, STATE_HEADER, payload.data(), payload.size());
    file.insert(file.end(), payload.begin(), payload.end());
    EXPECT_EQ(state_header_check(mem, file.data(), file.size(), 1, STATE_HEADER), file.size() - payload.size());

    kv_cache_params p = params(16, 2);
    kv_cache        other(p);
    state_memory    other_mem{ memory_kind::KV_CACHE, { &other }, nullptr };
    EXPECT_EQ(refusal([&] { state_header_check(other_mem, file.data(), file.size(), 1, STATE_HEADER); }),
              "attn.kv_size: file 8, memory 16");
    EXPECT_NE(refusal([&] { state_header_check(mem, file.data(), file.size(), -1, STATE_HEADER); }).find("scope"),
              std::string::npos);
}

// A corrupted configuration length must be refused from the fixed part, before anything is
// scanned or allocated for it.
TEST(StateFile, HugeConfigurationLengthIsRefusedFirst) {
    kv_cache c(params(8));
    state_memory mem{ memory_kind::KV_CACHE, { &c }, nullptr };
    auto file = state_header_write(mem, -1, STATE_HEADER, nullptr, 0);
    for (uint32_t bad : { 0xFFFFFFFFu, STATE_HEADER_MAX_CONFIG_BYTES + 1, uint32_t(file.size()) }) {
        auto damaged = file;
        put_u32(damaged, 28, bad);
        EXPECT_NE(refusal([&] { state_header_check(mem, damaged.data(), damaged.size(), -1, STATE_HEADER); })
                      .find("claims"),
                  std::string::npos)
            << bad;
    }
}

// Regression (fuzzing hardening): a cell count no larger than the cache but larger than the
// bytes can hold used to size the per-cell arrays before the reader ran out of bytes; it is now
// refused from the count alone. The message says so.
TEST(StateFile, KvCellCountBeyondTheBytesIsRefusedBeforeSizing) {
    kv_cache c(params(1u << 16));
    const std::vector<uint8_t> blob = [] {
        std::vector<uint8_t> b(8 + 16, 0);
        put_u32(b, 0, 1);          // n_stream
        put_u32(b, 4, 1u << 16);   // cell_count: the whole cache, with 16 bytes left
        return b;
    }();
    size_t off = 0;
    const std::string msg = refusal([&] { c.state_read(blob.data(), blob.size(), off, -1); });
    EXPECT_NE(msg.find("claims 65536 cells"), std::string::npos) << msg;
    EXPECT_EQ(c.used_count(), 0u);
}

TEST(StateFile, RecurrentCellCountBeyondTheBytesIsRefusedBeforeSizing) {
    rs_memory mem(1u << 16, 4, 0);
    rs_buffers b;
    b.n_layer_total = 0;
    mem.attach_buffers(b);
    std::vector<uint8_t> blob(4 + 16, 0);
    put_u32(blob, 0, 1u << 16);
    const std::string msg = refusal([&] { mem.state_read(blob.data(), blob.size(), -1, 0); });
    EXPECT_NE(msg.find("claims 65536 cells"), std::string::npos) << msg;
    EXPECT_EQ(mem.used(), 0u);
}

} // namespace
