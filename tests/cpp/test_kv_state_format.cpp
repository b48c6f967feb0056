// KV state formats 3 (llama.cpp b11312) and 4 (b11549: n_rot_k, n_rot_v after n_layer in every
// non-empty stream section): sizes, layout, reading either into a cache of either setting, and
// the rotation check of format 4.

#include "kv_test_util.h"

#include "llmem/errors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

using namespace llmem;
using namespace llmem::test;

namespace {

struct cache_with_buffers {
    kv_cache             c;
    std::vector<uint8_t> k, v;
    explicit cache_with_buffers(const kv_cache_params & p) : c(p), k(c.k_buffer_bytes(0)), v(c.v_buffer_bytes(0)) {
        for (size_t i = 0; i < k.size(); ++i) {
            k[i] = uint8_t(i * 7 + 1);
        }
        for (size_t i = 0; i < v.size(); ++i) {
            v[i] = uint8_t(i * 3 + 2);
        }
        c.set_layer_buffers(0, k.data(), v.data());
    }
};

kv_cache_params fmt_params(uint32_t fmt, uint32_t rot_k = 0, uint32_t rot_v = 0) {
    kv_cache_params p = params(8, 2);
    p.state_format    = fmt;
    p.n_rot_k         = rot_k;
    p.n_rot_v         = rot_v;
    return p;
}

uint32_t u32_at(const std::vector<uint8_t> & b, size_t off) {
    uint32_t x;
    std::memcpy(&x, b.data() + off, 4);
    return x;
}

} // namespace

TEST(KVStateFormat, Format4AddsTheRotationSizes) {
    cache_with_buffers a(fmt_params(3)), b(fmt_params(4, 128, 64));
    for (auto * x : { &a, &b }) {
        ASSERT_EQ(place(x->c, { make_ub(run(0, 0, 3)) }).size(), 1u);
    }
    std::vector<uint8_t> s3, s4;
    a.c.state_write(s3, -1);
    b.c.state_write(s4, -1);
    EXPECT_EQ(s4.size(), s3.size() + 8);
    EXPECT_EQ(b.c.state_write_size(-1), s4.size());
    const size_t off = 4 + 4 + 3 * 12;  // n_stream, cell_count, three cells
    EXPECT_EQ(u32_at(s3, off + 4), 1u);  // n_layer
    EXPECT_EQ(u32_at(s4, off + 8), 128u);
    EXPECT_EQ(u32_at(s4, off + 12), 64u);
    EXPECT_TRUE(std::equal(s3.begin() + off + 8, s3.end(), s4.begin() + off + 16));
    // an empty cache: no stream section, the same bytes in both formats
    cache_with_buffers e3(fmt_params(3)), e4(fmt_params(4, 128, 64));
    EXPECT_EQ(e3.c.state_write_size(-1), e4.c.state_write_size(-1));
}

TEST(KVStateFormat, EitherFormatReadsIntoEither) {
    for (uint32_t wf : { 3u, 4u }) {
        for (uint32_t rf : { 3u, 4u }) {
            cache_with_buffers src(fmt_params(wf)), dst(fmt_params(rf));
            ASSERT_EQ(place(src.c, { make_ub(run(0, 0, 3)), make_ub(run(1, 0, 2)) }).size(), 2u);
            std::vector<uint8_t> blob;
            src.c.state_write(blob, -1);
            size_t off = 0;
            dst.c.state_read(blob.data(), blob.size(), off, -1);
            EXPECT_EQ(off, blob.size());
            EXPECT_EQ(dst.c.seq_pos_max(0), 2);
            EXPECT_EQ(dst.c.seq_pos_max(1), 1);
            std::vector<uint8_t> seq_blob;
            src.c.state_write(seq_blob, 1);
            off = 0;
            dst.c.state_read(seq_blob.data(), seq_blob.size(), off, 0);
            EXPECT_EQ(dst.c.seq_pos_max(0), 1) << wf << " -> " << rf;
        }
    }
}

TEST(KVStateFormat, RotationMismatchFailsAndChangesNothing) {
    cache_with_buffers src(fmt_params(4, 64, 0)), dst(fmt_params(4, 128, 0));
    ASSERT_EQ(place(src.c, { make_ub(run(0, 0, 2)) }).size(), 1u);
    std::vector<uint8_t> blob;
    src.c.state_write(blob, 0);
    size_t off = 0;
    EXPECT_THROW(dst.c.state_read(blob.data(), blob.size(), off, 0), state_error);
    EXPECT_EQ(dst.c.seq_pos_max(0), -1);
}

TEST(KVStateFormat, OnlyFormats3And4) {
    kv_cache_params p = fmt_params(5);
    EXPECT_THROW(kv_cache c(p), std::invalid_argument);
}
