#include "llmem/tensor_kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LLMEM_X86 1
// The vector clones: AVX2 and F16C but deliberately not FMA, so every product and sum rounds
// exactly as in the portable path and both give the same bits.
#define LLMEM_SIMD_TARGET __attribute__((target("avx2,f16c")))
#endif

namespace llmem {

// -- one value ----------------------------------------------------------------------------------

float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t       exp  = (h >> 10) & 0x1fu;
    uint32_t       mant = h & 0x3ffu;
    uint32_t       bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {
            int32_t e = 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                --e;
            }
            mant &= 0x3ffu;
            bits = sign | (uint32_t(e + 127 - 15) << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    // Round to nearest even with few branches: normal numbers by integer rounding of the
    // rebased exponent, subnormals by letting the FPU align the mantissa (adding 0.5f).
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint32_t o;
    if (x >= 0x47800000u) {
        o = x > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN stays NaN, overflow becomes inf
    } else if (x < 0x38800000u) {
        float v;
        std::memcpy(&v, &x, 4);
        v += 0.5f;
        uint32_t r;
        std::memcpy(&r, &v, 4);
        o = r - 0x3f000000u;
    } else {
        const uint32_t mant_odd = (x >> 13) & 1u;
        x += (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd;
        o = x >> 13;
    }
    return uint16_t((sign >> 16) | o);
}

float bf16_to_f32(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float          f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return uint16_t((x >> 16) | 0x40u);
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    return uint16_t(x >> 16);
}

namespace {

// -- dispatch -----------------------------------------------------------------------------------

bool cpu_has_simd() {
#ifdef LLMEM_X86
    static const bool has = [] {
        __builtin_cpu_init();  // may run before libgcc's own constructor has filled the CPU model
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }();
    return has;
#else
    return false;
#endif
}

std::atomic<bool> simd_wanted{ true };

bool use_simd() { return simd_wanted.load(std::memory_order_relaxed) && cpu_has_simd(); }

// -- portable element access --------------------------------------------------------------------

const float * f16_table() {
    static const std::vector<float> table = [] {
        std::vector<float> t(65536);
        for (uint32_t h = 0; h < 65536; ++h) {
            t[h] = f16_to_f32(uint16_t(h));
        }
        return t;
    }();
    return table.data();
}

// Rows may sit at any byte address (inside state bytes), so elements go through memcpy, which
// compiles to plain loads and stores.
inline uint16_t load_u16(const uint8_t * p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

inline void store_u16(uint8_t * p, uint16_t v) { std::memcpy(p, &v, 2); }

struct f32_elem {
    static constexpr size_t size = 4;
    float load(const uint8_t * p) const {
        float v;
        std::memcpy(&v, p, 4);
        return v;
    }
    void store(uint8_t * p, float v) const { std::memcpy(p, &v, 4); }
};

struct f16_elem {
    static constexpr size_t size = 2;
    const float * table = f16_table();
    float load(const uint8_t * p) const { return table[load_u16(p)]; }
    void  store(uint8_t * p, float v) const { store_u16(p, f32_to_f16(v)); }
};

struct bf16_elem {
    static constexpr size_t size = 2;
    float load(const uint8_t * p) const { return bf16_to_f32(load_u16(p)); }
    void  store(uint8_t * p, float v) const { store_u16(p, f32_to_bf16(v)); }
};

// The rotation of one pair, shared by every path so the rounding is the same everywhere:
// (a, b) -> (a c - b s, a s + b c).
template <class E>
inline void rotate_pair(const E & e, uint8_t * pa, uint8_t * pb, float c, float s) {
    const float a = e.load(pa), b = e.load(pb);
    e.store(pa, a * c - b * s);
    e.store(pb, a * s + b * c);
}

template <class E>
void rotate_rows_portable(uint8_t * rows, size_t n_rows, size_t row_stride, uint32_t n_head, const rope_params & r,
                          const float * cs, const float * sn) {
    const E        e;
    const size_t   es   = E::size;
    const size_t   hb   = size_t(r.head_dim) * es;
    const uint32_t half = r.n_rot / 2;
    for (size_t i = 0; i < n_rows; ++i) {
        for (uint32_t h = 0; h < n_head; ++h) {
            uint8_t * x = rows + i * row_stride + h * hb;
            if (r.neox) {
                for (uint32_t k = 0; k < half; ++k) {
                    rotate_pair(e, x + k * es, x + (k + half) * es, cs[k], sn[k]);
                }
            } else {
                for (uint32_t k = 0; k < half; ++k) {
                    rotate_pair(e, x + 2 * k * es, x + (2 * k + 1) * es, cs[k], sn[k]);
                }
            }
        }
    }
}

#ifdef LLMEM_X86

// -- vector element access (8 lanes) ------------------------------------------------------------

struct f32_vec {
    using scalar = f32_elem;
    LLMEM_SIMD_TARGET static __m256 load(const uint8_t * p) { return _mm256_loadu_ps(reinterpret_cast<const float *>(p)); }
    LLMEM_SIMD_TARGET static void   store(uint8_t * p, __m256 v) { _mm256_storeu_ps(reinterpret_cast<float *>(p), v); }
};

struct f16_vec {
    using scalar = f16_elem;
    LLMEM_SIMD_TARGET static __m256 load(const uint8_t * p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    }
    LLMEM_SIMD_TARGET static void store(uint8_t * p, __m256 v) {
        _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
};

struct bf16_vec {
    using scalar = bf16_elem;
    LLMEM_SIMD_TARGET static __m256 load(const uint8_t * p) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    // f32_to_bf16 on 8 lanes: round to nearest even by integer addition, NaN kept quiet.
    LLMEM_SIMD_TARGET static void store(uint8_t * p, __m256 v) {
        const __m256i x       = _mm256_castps_si256(v);
        const __m256i hi      = _mm256_srli_epi32(x, 16);
        const __m256i odd     = _mm256_and_si256(hi, _mm256_set1_epi32(1));
        const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), odd), 16);
        const __m256i quiet   = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
        const __m256i is_nan  = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m256i w       = _mm256_blendv_epi8(rounded, quiet, is_nan);
        // Every lane is below 0x10000, so the saturating pack is a plain narrowing.
        const __m128i n16 = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(p), n16);
    }
};

template <class V>
LLMEM_SIMD_TARGET void rotate_rows_simd(uint8_t * rows, size_t n_rows, size_t row_stride, uint32_t n_head,
                                        const rope_params & r, const float * cs, const float * sn) {
    const typename V::scalar e;
    const size_t             es   = V::scalar::size;
    const size_t             hb   = size_t(r.head_dim) * es;
    const uint32_t           half = r.n_rot / 2;
    // Interleaved pairs: lanes (2k, 2k+1) take (a c - b s, b c + a s) as x * cos + swap(x) * sin
    // with the sine negated in the even lanes; a c + b (-s) rounds exactly as a c - b s.
    const __m256 neg_even = _mm256_castsi256_ps(_mm256_setr_epi32(int32_t(0x80000000), 0, int32_t(0x80000000), 0,
                                                                  int32_t(0x80000000), 0, int32_t(0x80000000), 0));
    // The interleaved tables spelled out per lane once (cos, cos, -sin, sin for each pair), when
    // they fit on the stack: the loop then loads them instead of shuffling them into place.
    constexpr uint32_t max_wide    = 256;
    const bool         wide_tables = !r.neox && r.n_rot <= max_wide;
    float              c2[max_wide], s2[max_wide];
    if (wide_tables) {
        for (uint32_t k = 0; k < half; ++k) {
            c2[2 * k] = c2[2 * k + 1] = cs[k];
            s2[2 * k]                 = -sn[k];
            s2[2 * k + 1]             = sn[k];
        }
    }
    for (size_t i = 0; i < n_rows; ++i) {
        for (uint32_t h = 0; h < n_head; ++h) {
            uint8_t * x = rows + i * row_stride + h * hb;
            uint32_t  k = 0;
            if (r.neox) {
                for (; k + 8 <= half; k += 8) {
                    uint8_t *    pa = x + k * es;
                    uint8_t *    pb = x + (k + half) * es;
                    const __m256 a = V::load(pa), b = V::load(pb);
                    const __m256 c = _mm256_loadu_ps(cs + k), s = _mm256_loadu_ps(sn + k);
                    V::store(pa, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
                    V::store(pb, _mm256_add_ps(_mm256_mul_ps(a, s), _mm256_mul_ps(b, c)));
                }
                for (; k < half; ++k) {
                    rotate_pair(e, x + k * es, x + (k + half) * es, cs[k], sn[k]);
                }
            } else if (wide_tables) {
                for (; k + 4 <= half; k += 4) {
                    uint8_t *    p  = x + 2 * k * es;
                    const __m256 v  = V::load(p);
                    const __m256 sw = _mm256_permute_ps(v, 0xb1);  // (b, a) of each pair
                    V::store(p, _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(c2 + 2 * k)),
                                              _mm256_mul_ps(sw, _mm256_loadu_ps(s2 + 2 * k))));
                }
                for (; k < half; ++k) {
                    rotate_pair(e, x + 2 * k * es, x + (2 * k + 1) * es, cs[k], sn[k]);
                }
            } else {
                for (; k + 4 <= half; k += 4) {
                    uint8_t *    p  = x + 2 * k * es;
                    const __m128 c4 = _mm_loadu_ps(cs + k), s4 = _mm_loadu_ps(sn + k);
                    const __m256 c  = _mm256_set_m128(_mm_unpackhi_ps(c4, c4), _mm_unpacklo_ps(c4, c4));
                    const __m256 s  = _mm256_xor_ps(_mm256_set_m128(_mm_unpackhi_ps(s4, s4), _mm_unpacklo_ps(s4, s4)),
                                                    neg_even);
                    const __m256 v  = V::load(p);
                    const __m256 sw = _mm256_permute_ps(v, 0xb1);  // (b, a) of each pair
                    V::store(p, _mm256_add_ps(_mm256_mul_ps(v, c), _mm256_mul_ps(sw, s)));
                }
                for (; k < half; ++k) {
                    rotate_pair(e, x + 2 * k * es, x + (2 * k + 1) * es, cs[k], sn[k]);
                }
            }
        }
    }
}

LLMEM_SIMD_TARGET void f16_to_f32_simd(const uint8_t * src, float * dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, f16_vec::load(src + 2 * i));
    }
    const f16_elem e;
    for (; i < n; ++i) {
        dst[i] = e.load(src + 2 * i);
    }
}

LLMEM_SIMD_TARGET void f32_to_f16_simd(const float * src, uint8_t * dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        f16_vec::store(dst + 2 * i, _mm256_loadu_ps(src + i));
    }
    for (; i < n; ++i) {
        store_u16(dst + 2 * i, f32_to_f16(src[i]));
    }
}

LLMEM_SIMD_TARGET void bf16_to_f32_simd(const uint8_t * src, float * dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, bf16_vec::load(src + 2 * i));
    }
    for (; i < n; ++i) {
        dst[i] = bf16_to_f32(load_u16(src + 2 * i));
    }
}

LLMEM_SIMD_TARGET void f32_to_bf16_simd(const float * src, uint8_t * dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        bf16_vec::store(dst + 2 * i, _mm256_loadu_ps(src + i));
    }
    for (; i < n; ++i) {
        store_u16(dst + 2 * i, f32_to_bf16(src[i]));
    }
}

#endif  // LLMEM_X86

// -- transposed V scatter -----------------------------------------------------------------------

// Transpose a block of B x B elements (B = 16 bytes / element size): dst[j * dst_stride + t] =
// src[t * src_stride + j]. SSE2 is part of x86-64 itself, so this needs no dispatch.
template <class T>
inline void transpose_block(const T * src, size_t src_stride, T * dst, size_t dst_stride) {
#ifdef LLMEM_X86
    auto ld = [&](size_t t) { return _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + t * src_stride)); };
    auto st = [&](size_t j, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + j * dst_stride), v); };
    if constexpr (sizeof(T) == 2) {
        const __m128i a0 = _mm_unpacklo_epi16(ld(0), ld(1)), a1 = _mm_unpackhi_epi16(ld(0), ld(1));
        const __m128i a2 = _mm_unpacklo_epi16(ld(2), ld(3)), a3 = _mm_unpackhi_epi16(ld(2), ld(3));
        const __m128i a4 = _mm_unpacklo_epi16(ld(4), ld(5)), a5 = _mm_unpackhi_epi16(ld(4), ld(5));
        const __m128i a6 = _mm_unpacklo_epi16(ld(6), ld(7)), a7 = _mm_unpackhi_epi16(ld(6), ld(7));
        const __m128i b0 = _mm_unpacklo_epi32(a0, a2), b1 = _mm_unpackhi_epi32(a0, a2);
        const __m128i b2 = _mm_unpacklo_epi32(a1, a3), b3 = _mm_unpackhi_epi32(a1, a3);
        const __m128i b4 = _mm_unpacklo_epi32(a4, a6), b5 = _mm_unpackhi_epi32(a4, a6);
        const __m128i b6 = _mm_unpacklo_epi32(a5, a7), b7 = _mm_unpackhi_epi32(a5, a7);
        st(0, _mm_unpacklo_epi64(b0, b4));
        st(1, _mm_unpackhi_epi64(b0, b4));
        st(2, _mm_unpacklo_epi64(b1, b5));
        st(3, _mm_unpackhi_epi64(b1, b5));
        st(4, _mm_unpacklo_epi64(b2, b6));
        st(5, _mm_unpackhi_epi64(b2, b6));
        st(6, _mm_unpacklo_epi64(b3, b7));
        st(7, _mm_unpackhi_epi64(b3, b7));
    } else {
        const __m128i a0 = _mm_unpacklo_epi32(ld(0), ld(1)), a1 = _mm_unpackhi_epi32(ld(0), ld(1));
        const __m128i a2 = _mm_unpacklo_epi32(ld(2), ld(3)), a3 = _mm_unpackhi_epi32(ld(2), ld(3));
        st(0, _mm_unpacklo_epi64(a0, a2));
        st(1, _mm_unpackhi_epi64(a0, a2));
        st(2, _mm_unpacklo_epi64(a1, a3));
        st(3, _mm_unpackhi_epi64(a1, a3));
    }
#else
    constexpr size_t B = 16 / sizeof(T);
    for (size_t t = 0; t < B; ++t) {
        for (size_t j = 0; j < B; ++j) {
            dst[j * dst_stride + t] = src[t * src_stride + j];
        }
    }
#endif
}

// Tiles of the transposed V scatter: 64 features x one 128-byte piece of a destination row.
template <class T>
struct v_tile {
    static constexpr size_t n_j = 64;
    static constexpr size_t n_t = 128 / sizeof(T);
    T                       buf[n_j][n_t];
};

// Fill a whole tile (features j.. j + n_j of tokens t.. t + n_t) from the token rows.
template <class T>
void fill_tile(const T * src, size_t ne, v_tile<T> & tile) {
    constexpr size_t B = 16 / sizeof(T);
    for (size_t t = 0; t < v_tile<T>::n_t; t += B) {
        for (size_t j = 0; j < v_tile<T>::n_j; j += B) {
            transpose_block(src + t * ne + j, ne, &tile.buf[j][t], v_tile<T>::n_t);
        }
    }
}

template <class T>
void scatter_v_trans_t(T * v, size_t e_max, size_t kv_size, const T * x, size_t n, size_t ne, const int64_t * dest) {
    // Tokens go in blocks of 256 whose destinations are decoded once (on the stack); inside a
    // block, tiles of 64 features x 128 bytes of tokens are transposed into a local buffer, so
    // each destination row gets whole cache lines at once even though all rows of a tile share
    // a cache set (they are kv_size elements apart, usually a power of two). Writing the
    // transposed blocks straight into the rows measured 2-3x slower for that reason.
    using tile_t           = v_tile<T>;
    constexpr size_t n_j   = tile_t::n_j;
    constexpr size_t n_t   = tile_t::n_t;
    constexpr size_t block = 256;
    size_t           base[block];      // element offset of (feature 0, cell) of each token
    bool             run[block / n_t];  // the tile's tokens go to consecutive cells of one stream
    tile_t           tile;
    for (size_t b0 = 0; b0 < n; b0 += block) {
        const size_t nb = std::min(block, n - b0);
        for (size_t t = 0; t < nb; ++t) {
            const size_t d = size_t(dest[b0 + t]);
            base[t]        = (d / kv_size) * e_max * kv_size + d % kv_size;
        }
        for (size_t t0 = 0; t0 < nb; t0 += n_t) {
            const size_t nt = std::min(n_t, nb - t0);
            bool         r  = true;
            for (size_t t = 1; t < nt; ++t) {
                r = r && base[t0 + t] == base[t0] + t;
            }
            run[t0 / n_t] = r;
        }
        for (size_t j0 = 0; j0 < ne; j0 += n_j) {
            const size_t nj = std::min(n_j, ne - j0);
            for (size_t t0 = 0; t0 < nb; t0 += n_t) {
                const size_t nt  = std::min(n_t, nb - t0);
                const T *    src = x + (b0 + t0) * ne + j0;
                if (nt == n_t && nj == n_j) {
                    fill_tile(src, ne, tile);
                } else {
                    for (size_t t = 0; t < nt; ++t) {
                        for (size_t j = 0; j < nj; ++j) {
                            tile.buf[j][t] = src[t * ne + j];
                        }
                    }
                }
                T * out = v + j0 * kv_size;
                if (run[t0 / n_t]) {
                    T * d = out + base[t0];
                    if (nt == n_t) {
                        for (size_t j = 0; j < nj; ++j) {
                            std::memcpy(d + j * kv_size, tile.buf[j], sizeof tile.buf[j]);  // fixed size: inline moves
                        }
                    } else {
                        for (size_t j = 0; j < nj; ++j) {
                            std::memcpy(d + j * kv_size, tile.buf[j], nt * sizeof(T));
                        }
                    }
                } else {
                    for (size_t j = 0; j < nj; ++j) {
                        for (size_t t = 0; t < nt; ++t) {
                            out[base[t0 + t] + j * kv_size] = tile.buf[j][t];
                        }
                    }
                }
            }
        }
    }
}

} // namespace

// -- public entry points ------------------------------------------------------------------------

void f16_to_f32_n(const uint8_t * src, float * dst, size_t n) {
#ifdef LLMEM_X86
    if (use_simd()) {
        f16_to_f32_simd(src, dst, n);
        return;
    }
#endif
    const f16_elem e;
    for (size_t i = 0; i < n; ++i) {
        dst[i] = e.load(src + 2 * i);
    }
}

void f32_to_f16_n(const float * src, uint8_t * dst, size_t n) {
#ifdef LLMEM_X86
    if (use_simd()) {
        f32_to_f16_simd(src, dst, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; ++i) {
        store_u16(dst + 2 * i, f32_to_f16(src[i]));
    }
}

void bf16_to_f32_n(const uint8_t * src, float * dst, size_t n) {
#ifdef LLMEM_X86
    if (use_simd()) {
        bf16_to_f32_simd(src, dst, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; ++i) {
        dst[i] = bf16_to_f32(load_u16(src + 2 * i));
    }
}

void f32_to_bf16_n(const float * src, uint8_t * dst, size_t n) {
#ifdef LLMEM_X86
    if (use_simd()) {
        f32_to_bf16_simd(src, dst, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; ++i) {
        store_u16(dst + 2 * i, f32_to_bf16(src[i]));
    }
}

void rope_tables(const rope_params & r, int32_t delta, std::vector<float> & cs, std::vector<float> & sn) {
    const uint32_t half = r.n_rot / 2;
    cs.resize(half);
    sn.resize(half);
    const double theta_scale = std::pow(double(r.freq_base), -2.0 / double(r.n_rot));
    double       low = 0.0, high = 0.0;
    if (r.ext_factor != 0.0f) {
        auto dim = [&](double rot) {
            return double(r.n_rot) * std::log(double(r.n_ctx_orig) / (rot * 2.0 * M_PI)) /
                   (2.0 * std::log(double(r.freq_base)));
        };
        low  = std::max(0.0, std::floor(dim(r.beta_fast)));
        high = std::min(double(r.n_rot) - 1.0, std::ceil(dim(r.beta_slow)));
    }
    for (uint32_t k = 0; k < half; ++k) {
        const double extrap = double(delta) * std::pow(theta_scale, double(k));
        const double interp = double(r.freq_scale) * extrap;
        double       theta  = interp;
        double       m      = r.attn_factor;
        if (r.ext_factor != 0.0f) {
            const double y    = (double(k) - low) / std::max(0.001, high - low);
            const double ramp = 1.0 - std::min(1.0, std::max(0.0, y));
            const double mix  = ramp * r.ext_factor;
            theta             = interp * (1.0 - mix) + extrap * mix;
            m *= 1.0 + 0.1 * std::log(1.0 / r.freq_scale);
        }
        cs[k] = float(std::cos(theta) * m);
        sn[k] = float(std::sin(theta) * m);
    }
}

void rope_rotate_rows(uint8_t * rows, size_t n_rows, size_t row_stride, int32_t type, uint32_t n_embd,
                      const rope_params & r, const float * cs, const float * sn) {
    if (r.n_rot == 0 || r.head_dim == 0 || n_rows == 0) {
        return;
    }
    const uint32_t n_head = n_embd / r.head_dim;
#ifdef LLMEM_X86
    if (use_simd()) {
        switch (type) {
            case int32_t(kv_type::F32):  return rotate_rows_simd<f32_vec>(rows, n_rows, row_stride, n_head, r, cs, sn);
            case int32_t(kv_type::F16):  return rotate_rows_simd<f16_vec>(rows, n_rows, row_stride, n_head, r, cs, sn);
            case int32_t(kv_type::BF16): return rotate_rows_simd<bf16_vec>(rows, n_rows, row_stride, n_head, r, cs, sn);
            default: break;
        }
    }
#endif
    switch (type) {
        case int32_t(kv_type::F32):  return rotate_rows_portable<f32_elem>(rows, n_rows, row_stride, n_head, r, cs, sn);
        case int32_t(kv_type::F16):  return rotate_rows_portable<f16_elem>(rows, n_rows, row_stride, n_head, r, cs, sn);
        case int32_t(kv_type::BF16): return rotate_rows_portable<bf16_elem>(rows, n_rows, row_stride, n_head, r, cs, sn);
        default: break;
    }
}

void rotate_row(uint8_t * row, int32_t type, uint32_t n_embd, const rope_params & r, const std::vector<float> & cs,
                const std::vector<float> & sn, std::vector<float> & buf) {
    (void) buf;
    rope_rotate_rows(row, 1, 0, type, n_embd, r, cs.data(), sn.data());
}

void scatter_v_trans(uint8_t * v, size_t elem_size, size_t e_max, size_t kv_size, const uint8_t * vals,
                     size_t n_tokens, size_t ne, const int64_t * dest) {
    // The buffers are numpy arrays of the element type, hence aligned for it.
    if (elem_size == 2) {
        scatter_v_trans_t(reinterpret_cast<uint16_t *>(v), e_max, kv_size, reinterpret_cast<const uint16_t *>(vals),
                          n_tokens, ne, dest);
    } else {
        scatter_v_trans_t(reinterpret_cast<uint32_t *>(v), e_max, kv_size, reinterpret_cast<const uint32_t *>(vals),
                          n_tokens, ne, dest);
    }
}

namespace kernels_detail {

bool simd_enabled() { return use_simd(); }

void set_simd_enabled(bool on) { simd_wanted.store(on, std::memory_order_relaxed); }

} // namespace kernels_detail

} // namespace llmem
