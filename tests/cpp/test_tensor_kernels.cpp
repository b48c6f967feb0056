// The tensor kernels against plain scalar references: element conversions, the RoPE rotation of
// the K-shift and the transposed V scatter, each through the vector clones (when the CPU has
// them) and the portable path, on sizes that leave tails and on unaligned rows.

#include "kv_test_util.h"

#include "llmem/kv_cache.h"
#include "llmem/tensor_kernels.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace llmem;
using namespace llmem::test;

namespace {

// Runs the body once with the vector clones and once without (the first run is portable too
// on a CPU without AVX2/F16C).
template <typename F>
void both_paths(F && body) {
    for (bool simd : { true, false }) {
        kernels_detail::set_simd_enabled(simd);
        SCOPED_TRACE(simd ? "vector path" : "portable path");
        body();
    }
    kernels_detail::set_simd_enabled(true);
}

uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Floats that exercise every branch of the conversions: zeros, subnormals of both formats,
// the f16 normal/overflow boundaries, exact halfway points, infinities and NaNs (quiet and
// signalling, both signs), then random bit patterns.
std::vector<float> special_floats(size_t n_random) {
    std::vector<uint32_t> b = { 0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu, 0x00800000u, 0x33000000u,
                                0x33000001u, 0x337fffffu, 0x387fc000u, 0x387fe000u, 0x38800000u, 0x3f800000u,
                                0x3f801000u, 0x3f803000u, 0x477fe000u, 0x477fefffu, 0x477ff000u, 0x47800000u,
                                0x7f7fffffu, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u, 0x7f800001u,
                                0x7fbfffffu, 0xff800001u, 0x3f7f8000u, 0x3f808000u, 0x3f818000u, 0xc0490fdbu };
    std::mt19937 rng(7);
    for (size_t i = 0; i < n_random; ++i) {
        b.push_back(rng());
    }
    std::vector<float> out;
    for (uint32_t u : b) {
        out.push_back(from_bits(u));
    }
    return out;
}

bool is_f16_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

} // namespace

TEST(TensorKernels, F16ToF32EveryValueAtAnOddAddress) {
    std::vector<uint8_t> src(1 + 65536 * 2);
    for (uint32_t h = 0; h < 65536; ++h) {
        const uint16_t v = uint16_t(h);
        std::memcpy(&src[1 + 2 * h], &v, 2);
    }
    both_paths([&] {
        for (size_t n : { size_t(65536), size_t(65533), size_t(7) }) {
            std::vector<float> dst(n);
            f16_to_f32_n(src.data() + 1, dst.data(), n);
            for (uint32_t h = 0; h < n; ++h) {
                const float want = f16_to_f32(uint16_t(h));
                if (std::isnan(want)) {
                    // F16C quiets a signalling NaN; the sign and NaN-ness are what K rows need.
                    ASSERT_TRUE(std::isnan(dst[h])) << h;
                    ASSERT_EQ(std::signbit(dst[h]), std::signbit(want)) << h;
                } else {
                    ASSERT_EQ(bits_of(dst[h]), bits_of(want)) << h;
                }
            }
        }
    });
}

TEST(TensorKernels, F32ToF16MatchesScalarRounding) {
    const std::vector<float> x = special_floats(100003);
    std::vector<uint8_t>     dst(1 + 2 * x.size());
    both_paths([&] {
        f32_to_f16_n(x.data(), dst.data() + 1, x.size());
        for (size_t i = 0; i < x.size(); ++i) {
            uint16_t got;
            std::memcpy(&got, &dst[1 + 2 * i], 2);
            const uint16_t want = f32_to_f16(x[i]);
            if (std::isnan(x[i])) {
                ASSERT_TRUE(is_f16_nan(got)) << i;
                ASSERT_EQ(got & 0x8000u, want & 0x8000u) << i;
            } else {
                ASSERT_EQ(got, want) << i << " bits " << bits_of(x[i]);
            }
        }
    });
}

TEST(TensorKernels, Bf16BothWaysBitExactIncludingNan) {
    const std::vector<float> x = special_floats(100003);
    std::vector<uint8_t>     b(1 + 2 * x.size());
    std::vector<float>       back(x.size());
    both_paths([&] {
        f32_to_bf16_n(x.data(), b.data() + 1, x.size());
        for (size_t i = 0; i < x.size(); ++i) {
            uint16_t got;
            std::memcpy(&got, &b[1 + 2 * i], 2);
            ASSERT_EQ(got, f32_to_bf16(x[i])) << i << " bits " << bits_of(x[i]);
        }
        bf16_to_f32_n(b.data() + 1, back.data(), x.size());
        for (size_t i = 0; i < x.size(); ++i) {
            uint16_t h;
            std::memcpy(&h, &b[1 + 2 * i], 2);
            ASSERT_EQ(bits_of(back[i]), bits_of(bf16_to_f32(h))) << i;
        }
    });
    EXPECT_EQ(f32_to_bf16(from_bits(0x7f800001u)), 0x7fc0u);  // signalling NaN comes back quiet
    EXPECT_EQ(f32_to_bf16(from_bits(0x3f808000u)), 0x3f80u);  // halfway, even below
    EXPECT_EQ(f32_to_bf16(from_bits(0x3f818000u)), 0x3f82u);  // halfway, even above
}

namespace {

// The rotation written out element by element, as the kernels must compute it.
struct elem_io {
    int32_t type;
    size_t  size() const { return type == int32_t(kv_type::F32) ? 4 : 2; }
    float   load(const uint8_t * p) const {
        if (type == int32_t(kv_type::F32)) {
            float f;
            std::memcpy(&f, p, 4);
            return f;
        }
        uint16_t h;
        std::memcpy(&h, p, 2);
        return type == int32_t(kv_type::F16) ? f16_to_f32(h) : bf16_to_f32(h);
    }
    void store(uint8_t * p, float f) const {
        if (type == int32_t(kv_type::F32)) {
            std::memcpy(p, &f, 4);
            return;
        }
        const uint16_t h = type == int32_t(kv_type::F16) ? f32_to_f16(f) : f32_to_bf16(f);
        std::memcpy(p, &h, 2);
    }
};

void rotate_reference(uint8_t * rows, size_t n_rows, size_t stride, int32_t type, uint32_t n_embd,
                      const rope_params & r, const std::vector<float> & cs, const std::vector<float> & sn) {
    const elem_io  e{ type };
    const uint32_t half = r.n_rot / 2;
    for (size_t i = 0; i < n_rows; ++i) {
        for (uint32_t h = 0; h < n_embd / r.head_dim; ++h) {
            uint8_t * x = rows + i * stride + size_t(h) * r.head_dim * e.size();
            for (uint32_t k = 0; k < half; ++k) {
                const uint32_t ia = r.neox ? k : 2 * k, ib = r.neox ? k + half : 2 * k + 1;
                const float    a = e.load(x + ia * e.size()), b = e.load(x + ib * e.size());
                e.store(x + ia * e.size(), a * cs[k] - b * sn[k]);
                e.store(x + ib * e.size(), a * sn[k] + b * cs[k]);
            }
        }
    }
}

// Random finite elements of the type from byte `first` on, with zeros of both signs and subnormals mixed in.
std::vector<uint8_t> random_rows(size_t n_bytes, int32_t type, uint32_t seed, size_t first = 0) {
    std::mt19937                          rng(seed);
    std::normal_distribution<float>       nd(0.0f, 2.0f);
    const elem_io                         e{ type };
    std::vector<uint8_t>                  b(n_bytes);
    const float                           specials[] = { 0.0f, -0.0f, 1e-6f, -3e-8f, 1e-40f, 65000.0f };
    std::uniform_int_distribution<size_t> pick(0, 15);
    for (size_t o = first; o + e.size() <= n_bytes; o += e.size()) {
        const size_t s = pick(rng);
        e.store(&b[o], s < 6 ? specials[s] : nd(rng));
    }
    return b;
}

// The first differing element, so a failure names it instead of printing whole buffers.
std::string first_difference(const std::vector<uint8_t> & got, const std::vector<uint8_t> & want, size_t es) {
    for (size_t o = 1; o + es <= got.size(); o += es) {
        if (std::memcmp(&got[o], &want[o], es) != 0) {
            uint32_t g = 0, w = 0;
            std::memcpy(&g, &got[o], es);
            std::memcpy(&w, &want[o], es);
            return "element at byte " + std::to_string(o) + ": got " + std::to_string(g) + ", want " + std::to_string(w);
        }
    }
    return got == want ? "" : "a byte outside the elements";
}

} // namespace

TEST(TensorKernels, RopeRotationMatchesScalarReference) {
    struct shape {
        uint32_t head_dim, n_rot, n_head, extra;  // extra: elements after the last whole head
    };
    // Tails after the vector steps, a partial last head, n_rot == head_dim, a single pair, and
    // an n_rot too wide for the interleaved tables on the stack.
    const shape shapes[] = { { 128, 64, 8, 0 }, { 20, 14, 3, 5 }, { 6, 6, 5, 0 }, { 34, 2, 2, 1 }, { 64, 64, 1, 3 },
                             { 48, 46, 2, 0 }, { 300, 262, 2, 1 } };
    for (int32_t type : { int32_t(kv_type::F32), int32_t(kv_type::F16), int32_t(kv_type::BF16) }) {
        const size_t es = type == int32_t(kv_type::F32) ? 4 : 2;
        for (const shape & sh : shapes) {
            for (bool neox : { false, true }) {
                for (float ext : { 0.0f, 1.0f }) {
                    rope_params r;
                    r.enabled    = true;
                    r.n_rot      = sh.n_rot;
                    r.head_dim   = sh.head_dim;
                    r.neox       = neox;
                    r.ext_factor = ext;
                    r.freq_scale = ext != 0.0f ? 0.25f : 1.0f;
                    r.n_ctx_orig = 4096;
                    std::vector<float> cs, sn;
                    rope_tables(r, -37, cs, sn);
                    const uint32_t n_embd = sh.n_head * sh.head_dim + sh.extra;
                    const size_t   stride = n_embd * es + 6;  // a gap that must stay untouched
                    const size_t   n_rows = 9;
                    const auto     init   = random_rows(1 + n_rows * stride, type, sh.head_dim * 31 + sh.n_rot, 1);
                    auto           want   = init;
                    rotate_reference(want.data() + 1, n_rows, stride, type, n_embd, r, cs, sn);
                    both_paths([&] {
                        SCOPED_TRACE("type " + std::to_string(type) + " head_dim " + std::to_string(sh.head_dim) +
                                     " n_rot " + std::to_string(sh.n_rot) + (neox ? " neox" : " normal") +
                                     (ext != 0.0f ? " yarn" : ""));
                        auto got = init;
                        rope_rotate_rows(got.data() + 1, n_rows, stride, type, n_embd, r, cs.data(), sn.data());
                        ASSERT_EQ(first_difference(got, want, es), "");
                        // The one-row form of the state writer agrees.
                        auto one = init;
                        std::vector<float> unused;
                        for (size_t i = 0; i < n_rows; ++i) {
                            rotate_row(one.data() + 1 + i * stride, type, n_embd, r, cs, sn, unused);
                        }
                        ASSERT_EQ(first_difference(one, want, es), "");
                    });
                }
            }
        }
    }
}

TEST(TensorKernels, RopeTablesPlainAndYarn) {
    rope_params r;
    r.n_rot    = 8;
    r.head_dim = 8;
    std::vector<float> cs, sn;
    rope_tables(r, 3, cs, sn);
    ASSERT_EQ(cs.size(), 4u);
    for (uint32_t k = 0; k < 4; ++k) {
        const double theta = 3.0 * std::pow(10000.0, -2.0 * k / 8.0);
        EXPECT_FLOAT_EQ(cs[k], float(std::cos(theta)));
        EXPECT_FLOAT_EQ(sn[k], float(std::sin(theta)));
    }
    rope_tables(r, 0, cs, sn);
    for (uint32_t k = 0; k < 4; ++k) {
        EXPECT_EQ(cs[k], 1.0f);
        EXPECT_EQ(sn[k], 0.0f);
    }
    // YaRN scales the magnitude by 1 + 0.1 ln(1 / freq_scale) even at delta 0.
    r.ext_factor = 1.0f;
    r.freq_scale = 0.5f;
    r.n_ctx_orig = 2048;
    rope_tables(r, 0, cs, sn);
    EXPECT_FLOAT_EQ(cs[0], float(1.0 + 0.1 * std::log(2.0)));
}

TEST(TensorKernels, KShiftRotatesOnlyShiftedCellsInRuns) {
    // Two sequences with different shifts, an untouched third one and holes: apply_k_shift must
    // equal rotating each shifted cell alone with its own delta.
    for (int32_t type : { int32_t(kv_type::F16), int32_t(kv_type::BF16), int32_t(kv_type::F32) }) {
        const size_t    es = type == int32_t(kv_type::F32) ? 4 : 2;
        kv_cache_params p  = params(64, 3);
        p.type_k           = type;
        p.n_embd_k         = { 40 };
        p.rope.enabled     = true;
        p.rope.n_rot       = 6;
        p.rope.head_dim    = 10;
        p.rope.neox        = type == int32_t(kv_type::BF16);
        kv_cache c(p);
        auto     k = random_rows(64 * 40 * es, type, 5);
        std::vector<float> v(64 * 4);
        c.set_layer_buffers(0, k.data(), reinterpret_cast<uint8_t *>(v.data()));
        place(c, cat(cat(run(0, 0, 21), run(1, 0, 13)), run(2, 0, 9)));
        c.seq_rm(0, 5, 8);    // holes inside sequence 0
        c.seq_add(0, 10, -1, 7);
        c.seq_add(1, -1, -1, -3);
        auto want = k;
        std::vector<float> cs, sn;
        for (uint32_t i = 0; i < 64; ++i) {
            const int32_t d = c.cells(0).is_empty(i) ? 0 : c.cells(0).shift_get(i);
            if (d != 0) {
                rope_tables(p.rope, d, cs, sn);
                rotate_reference(want.data() + i * 40 * es, 1, 0, type, 40, p.rope, cs, sn);
            }
        }
        ASSERT_NE(want, k);
        c.update();
        EXPECT_EQ(k, want) << "type " << type;
        EXPECT_FALSE(c.get_has_shift());
    }
}

namespace {

template <typename T>
void check_scatter(size_t n_stream, size_t e_max, size_t kv_size, size_t ne, const std::vector<int64_t> & dest) {
    const size_t   n = dest.size();
    std::vector<T> vals(n * ne);
    for (size_t i = 0; i < vals.size(); ++i) {
        vals[i] = T(i * 2654435761u + 1);
    }
    std::vector<T> got(n_stream * e_max * kv_size, T(0xbeef)), want = got;
    for (size_t t = 0; t < n; ++t) {
        const size_t s = size_t(dest[t]) / kv_size, c = size_t(dest[t]) % kv_size;
        for (size_t j = 0; j < ne; ++j) {
            want[(s * e_max + j) * kv_size + c] = vals[t * ne + j];
        }
    }
    scatter_v_trans(reinterpret_cast<uint8_t *>(got.data()), sizeof(T), e_max, kv_size,
                    reinterpret_cast<const uint8_t *>(vals.data()), n, ne, dest.data());
    ASSERT_EQ(got, want) << "n " << n << " ne " << ne << " e_max " << e_max << " kv_size " << kv_size;
}

std::vector<int64_t> iota_from(int64_t first, size_t n) {
    std::vector<int64_t> v(n);
    for (size_t i = 0; i < n; ++i) {
        v[i] = first + int64_t(i);
    }
    return v;
}

} // namespace

TEST(TensorKernels, ScatterVTransRunsAndScatteredCells) {
    std::mt19937 rng(3);
    for (size_t kv_size : { size_t(37), size_t(300), size_t(1024) }) {
        for (size_t n_stream : { size_t(1), size_t(3) }) {
            const size_t total = n_stream * kv_size;
            for (size_t n : { size_t(1), size_t(7), size_t(33), size_t(64), size_t(300) }) {
                if (n > total) {
                    continue;
                }
                std::vector<std::vector<int64_t>> dests;
                dests.push_back(iota_from(0, n));                                   // prefill run
                dests.push_back(iota_from(int64_t(total - n), n));                  // run ending at the last stream
                dests.push_back(iota_from(int64_t(kv_size) - int64_t(n / 2), n));  // may cross a stream boundary
                std::vector<int64_t> swapped = iota_from(0, n);                    // ends consecutive, middle not
                if (n > 3) {
                    std::swap(swapped[1], swapped[2]);
                }
                dests.push_back(swapped);
                std::vector<int64_t> perm = iota_from(0, total);
                std::shuffle(perm.begin(), perm.end(), rng);
                perm.resize(n);
                dests.push_back(perm);
                for (auto & d : dests) {
                    for (int64_t & x : d) {
                        x = ((x % int64_t(total)) + int64_t(total)) % int64_t(total);
                    }
                    for (size_t ne : { size_t(1), size_t(31), size_t(64), size_t(70) }) {
                        check_scatter<uint16_t>(n_stream, ne + 3, kv_size, ne, d);
                        check_scatter<uint32_t>(n_stream, ne, kv_size, ne, d);
                    }
                }
            }
        }
    }
}
