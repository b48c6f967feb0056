// The block types: sizes, hand-worked blocks, round trips, and the cache rules and K-shift of a
// quantized K. Bit-for-bit agreement with ggml over many rows is checked in pytest against the
// gguf package (tests/python/test_quant.py).

#include "kv_test_util.h"

#include "llmem/quant.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

using namespace llmem;
using namespace llmem::test;

namespace {

constexpr int32_t Q8_0 = int32_t(ggml_type_id::Q8_0);
constexpr int32_t Q4_0 = int32_t(ggml_type_id::Q4_0);

float f16_at(const uint8_t * p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
}

} // namespace

TEST(Quant, RowSizesAreGgmls) {
    EXPECT_EQ(row_size(Q8_0, 4096), 4096u / 32 * 34);
    EXPECT_EQ(row_size(Q4_0, 128), 4u * 18);
    EXPECT_EQ(row_size(int32_t(ggml_type_id::Q4_1), 64), 2u * 20);
    EXPECT_EQ(row_size(int32_t(ggml_type_id::Q5_0), 64), 2u * 22);
    EXPECT_EQ(row_size(int32_t(ggml_type_id::Q5_1), 64), 2u * 24);
    EXPECT_EQ(row_size(int32_t(ggml_type_id::IQ4_NL), 64), 2u * 18);
    EXPECT_EQ(row_size(int32_t(ggml_type_id::F16), 7), 14u);
    EXPECT_THROW(row_size(Q8_0, 48), std::invalid_argument);
    EXPECT_THROW(row_size(12, 32), std::invalid_argument);  // q3_K: not a cache type here
    EXPECT_TRUE(is_quantized(Q8_0));
    EXPECT_FALSE(is_quantized(int32_t(ggml_type_id::BF16)));
}

TEST(Quant, Q8_0BlockByHand) {
    // 0, 1, ..., 31 scaled: amax 31 -> d = 31/127, q = round(x * 127/31)
    float x[32];
    for (int j = 0; j < 32; ++j) {
        x[j] = float(j) - 16.0f;
    }
    uint8_t y[34];
    row_from_float(Q8_0, x, y, 32);
    EXPECT_EQ(f16_at(y), f16_to_f32(f32_to_f16(16.0f / 127)));
    const int8_t * q = reinterpret_cast<const int8_t *>(y + 2);
    EXPECT_EQ(q[0], -127);  // -16 is the largest magnitude
    EXPECT_EQ(q[16], 0);
    EXPECT_EQ(q[24], 64);  // 8 * 127/16 = 63.5 -> away from zero
    float back[32];
    row_to_float(Q8_0, y, back, 32);
    for (int j = 0; j < 32; ++j) {
        EXPECT_NEAR(back[j], x[j], 16.0f / 127 * 0.51f);
    }
}

TEST(Quant, ZeroBlocksAreZero) {
    std::vector<float> x(64, 0.0f), back(64, 1.0f);
    for (int32_t t : { Q8_0, Q4_0, int32_t(ggml_type_id::Q4_1), int32_t(ggml_type_id::Q5_0),
                       int32_t(ggml_type_id::Q5_1), int32_t(ggml_type_id::IQ4_NL) }) {
        std::vector<uint8_t> y(row_size(t, 64));
        row_from_float(t, x.data(), y.data(), 64);
        row_to_float(t, y.data(), back.data(), 64);
        for (float v : back) {
            EXPECT_EQ(v, 0.0f) << find_type(t)->name;
        }
    }
}

TEST(Quant, RoundTripWithinAStep) {
    std::mt19937                    rng(3);
    std::normal_distribution<float> nd;
    std::vector<float>              x(256), back(256);
    for (float & v : x) {
        v = nd(rng);
    }
    struct { int32_t t; float steps; } cases[] = {
        { Q8_0, 0.5f / 127 }, { Q4_0, 1.0f / 8 }, { int32_t(ggml_type_id::Q5_0), 1.0f / 16 },
        { int32_t(ggml_type_id::Q4_1), 1.0f / 15 }, { int32_t(ggml_type_id::Q5_1), 1.0f / 31 },
    };
    for (const auto & c : cases) {
        std::vector<uint8_t> y(row_size(c.t, 256));
        row_from_float(c.t, x.data(), y.data(), 256);
        row_to_float(c.t, y.data(), back.data(), 256);
        for (size_t b = 0; b < 8; ++b) {
            float amax = 0;
            for (size_t j = 0; j < 32; ++j) {
                amax = std::max(amax, std::fabs(x[b * 32 + j]));
            }
            for (size_t j = 0; j < 32; ++j) {
                EXPECT_LE(std::fabs(back[b * 32 + j] - x[b * 32 + j]), 2.02f * c.steps * amax) << find_type(c.t)->name;
            }
        }
    }
}

TEST(QuantCache, QuantizedVNeedsUntransposedLayout) {
    kv_cache_params p = params(8);
    p.n_embd_k = { 32 };
    p.n_embd_v = { 32 };
    p.type_v   = Q8_0;
    p.v_trans  = true;
    EXPECT_THROW(kv_cache c(p), std::invalid_argument);
    p.v_trans = false;
    kv_cache c(p);
    EXPECT_EQ(c.v_row_bytes(0), 34u);
    EXPECT_EQ(c.v_buffer_bytes(0), 8u * 34);
    p.n_embd_v = { 48 };  // not whole blocks
    EXPECT_THROW(kv_cache c2(p), std::invalid_argument);
}

TEST(QuantCache, KShiftRotatesThroughF32) {
    // q8_0 K of 64 values (two heads of 32, 16 rotated): the shifted rows equal quantizing the f32
    // rotation of the dequantized rows; unshifted rows keep their bytes
    kv_cache_params p = params(4);
    p.n_embd_k     = { 64 };
    p.n_embd_v     = { 32 };
    p.type_k       = Q8_0;
    p.rope.enabled = true;
    p.rope.n_rot   = 16;
    p.rope.head_dim = 32;
    kv_cache                c(p);
    std::vector<uint8_t>    k(c.k_buffer_bytes(0)), v(c.v_buffer_bytes(0));
    std::mt19937            rng(1);
    std::normal_distribution<float> nd;
    std::vector<float>      rows(4 * 64);
    for (float & x : rows) {
        x = nd(rng);
    }
    for (uint32_t i = 0; i < 4; ++i) {
        row_from_float(Q8_0, rows.data() + i * 64, k.data() + i * 68, 64);
    }
    c.set_layer_buffers(0, k.data(), v.data());
    ASSERT_EQ(place(c, { make_ub(run(0, 0, 4)) }).size(), 1u);
    const std::vector<uint8_t> before = k;
    c.seq_add(0, 2, -1, 3);
    c.update();
    EXPECT_TRUE(std::equal(k.begin(), k.begin() + 2 * 68, before.begin()));
    std::vector<float> cs, sn, f(64);
    rope_tables(p.rope, 3, cs, sn);
    for (uint32_t i = 2; i < 4; ++i) {
        row_to_float(Q8_0, before.data() + i * 68, f.data(), 64);
        rope_rotate_rows(reinterpret_cast<uint8_t *>(f.data()), 1, 256, int32_t(kv_type::F32), 64, p.rope, cs.data(),
                         sn.data());
        std::vector<uint8_t> want(68);
        row_from_float(Q8_0, f.data(), want.data(), 64);
        EXPECT_TRUE(std::equal(want.begin(), want.end(), k.begin() + i * 68)) << "row " << i;
    }
}

TEST(Quant, Q8_0VectorPathGivesThePortableBits) {
    std::mt19937                          rng(9);
    std::normal_distribution<float>       nd;
    std::uniform_int_distribution<int>    scale(-30, 30);
    std::vector<float>                    x(32 * 512);
    for (size_t b = 0; b < 512; ++b) {
        const float s = std::ldexp(1.0f, scale(rng));
        for (size_t j = 0; j < 32; ++j) {
            // every fourth block holds exact halves of the step: rounding ties
            x[b * 32 + j] = b % 4 == 0 ? float(int(nd(rng) * 8)) / 2 * s : nd(rng) * s;
        }
    }
    std::fill(x.begin() + 64, x.begin() + 96, 0.0f);
    std::vector<uint8_t> a(row_size(Q8_0, x.size())), b(a.size());
    row_from_float(Q8_0, x.data(), a.data(), x.size());
    const bool was = kernels_detail::simd_enabled();
    kernels_detail::set_simd_enabled(false);
    row_from_float(Q8_0, x.data(), b.data(), x.size());
    kernels_detail::set_simd_enabled(was);
    EXPECT_EQ(a, b);
}

TEST(Quant, Q4_0VectorPathGivesThePortableBits) {
    // scales from tiny (subnormal steps: the scalar fallback) to huge, ties, zeros, -0, and
    // blocks whose largest magnitude appears with both signs (the first one sets the scale)
    std::mt19937                       rng(11);
    std::normal_distribution<float>    nd;
    std::uniform_int_distribution<int> scale(-140, 60);
    std::vector<float>                 x(32 * 1024);
    for (size_t b = 0; b < 1024; ++b) {
        const float s = std::ldexp(1.0f, scale(rng));
        for (size_t j = 0; j < 32; ++j) {
            x[b * 32 + j] = b % 4 == 0 ? float(int(nd(rng) * 16)) / 2 * s : nd(rng) * s;
        }
        if (b % 5 == 1) {
            x[b * 32 + 3]  = 9.0f * s;
            x[b * 32 + 17] = -9.0f * s;
        }
    }
    std::fill(x.begin() + 64, x.begin() + 96, 0.0f);
    std::fill(x.begin() + 96, x.begin() + 128, -0.0f);
    std::vector<uint8_t> a(row_size(Q4_0, x.size())), b(a.size());
    row_from_float(Q4_0, x.data(), a.data(), x.size());
    const bool was = kernels_detail::simd_enabled();
    kernels_detail::set_simd_enabled(false);
    row_from_float(Q4_0, x.data(), b.data(), x.size());
    kernels_detail::set_simd_enabled(was);
    EXPECT_EQ(a, b);
}

TEST(QuantCache, KShiftUndoesAndRedoesTheAttentionRotation) {
    // q8_0 K of two heads of 64 with n_rot_k 64: a shifted row is H RoPE(H x) of its dequantized
    // values (H the orthonormal Hadamard matrix), up to one quantization step; the vector and the
    // portable paths write the same bytes
    kv_cache_params p = params(4);
    p.n_embd_k      = { 128 };
    p.n_embd_v      = { 32 };
    p.type_k        = Q8_0;
    p.rope.enabled  = true;
    p.rope.n_rot    = 64;
    p.rope.head_dim = 64;
    p.n_rot_k       = 64;
    std::mt19937                    rng(5);
    std::normal_distribution<float> nd;
    std::vector<float>              rows(4 * 128);
    for (float & x : rows) {
        x = nd(rng);
    }
    std::vector<std::vector<uint8_t>> results;
    std::vector<uint8_t>              before(4 * 136);
    for (uint32_t i = 0; i < 4; ++i) {
        row_from_float(Q8_0, rows.data() + i * 128, before.data() + i * 136, 128);
    }
    const bool was = kernels_detail::simd_enabled();
    for (bool simd : { true, false }) {
        kernels_detail::set_simd_enabled(simd);
        kv_cache             c(p);
        std::vector<uint8_t> k = before, v(c.v_buffer_bytes(0));
        c.set_layer_buffers(0, k.data(), v.data());
        ASSERT_EQ(place(c, { make_ub(run(0, 0, 4)) }).size(), 1u);
        c.seq_add(0, 1, -1, 5);
        c.update();
        results.push_back(k);
    }
    kernels_detail::set_simd_enabled(was);
    EXPECT_EQ(results[0], results[1]);
    const std::vector<uint8_t> & k = results[0];
    EXPECT_TRUE(std::equal(k.begin(), k.begin() + 136, before.begin()));  // row 0 was not shifted
    // the reference: the Hadamard matrix as ggml_gen_hadamard builds it, in double
    std::vector<double> h(64 * 64);
    h[0] = 1.0 / 8.0;
    for (uint32_t s = 1; s < 64; s *= 2) {
        for (uint32_t i = 0; i < s; ++i) {
            for (uint32_t j = 0; j < s; ++j) {
                h[(i + s) * 64 + j]     = h[i * 64 + j];
                h[i * 64 + j + s]       = h[i * 64 + j];
                h[(i + s) * 64 + j + s] = -h[i * 64 + j];
            }
        }
    }
    auto apply_h = [&](std::vector<float> & x) {
        for (uint32_t c0 = 0; c0 < 128; c0 += 64) {
            std::vector<double> y(64, 0.0);
            for (uint32_t i = 0; i < 64; ++i) {
                for (uint32_t j = 0; j < 64; ++j) {
                    y[i] += h[i * 64 + j] * double(x[c0 + j]);
                }
            }
            for (uint32_t i = 0; i < 64; ++i) {
                x[c0 + i] = float(y[i]);
            }
        }
    };
    std::vector<float> cs, sn, f(128), got(128);
    rope_tables(p.rope, 5, cs, sn);
    for (uint32_t r = 1; r < 4; ++r) {
        row_to_float(Q8_0, before.data() + r * 136, f.data(), 128);
        apply_h(f);
        rope_rotate_rows(reinterpret_cast<uint8_t *>(f.data()), 1, 512, int32_t(kv_type::F32), 128, p.rope, cs.data(),
                         sn.data());
        apply_h(f);
        row_to_float(Q8_0, k.data() + r * 136, got.data(), 128);
        for (uint32_t j = 0; j < 128; ++j) {
            float amax = 0.0f;
            for (uint32_t t = j / 32 * 32; t < j / 32 * 32 + 32; ++t) {
                amax = std::max(amax, std::fabs(f[t]));
            }
            EXPECT_LE(std::fabs(got[j] - f[j]), amax / 127.0f * 1.01f) << "row " << r << " value " << j;
        }
    }
}
