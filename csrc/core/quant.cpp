#include "llmem/quant.h"

#include "llmem/tensor_kernels.h"

#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#define LLMEM_QUANT_SSE2 1
#endif

// Written from ggml's reference quantizers (ggml-quants.c, quantize_row_*_ref, and the
// dequantize_row_* functions) so that every block comes out bit for bit as ggml writes it. This
// file is built with -ffp-contract=off: each product and sum rounds on its own, as in the
// reference (a fused multiply-add would change the rounding of x * id + 8.5f).

namespace llmem {

namespace {

constexpr uint32_t QK = 32;  // elements per block of every block type here

const type_traits k_types[] = {
    { int32_t(ggml_type_id::F32),    "f32",    1,  4,  false },
    { int32_t(ggml_type_id::F16),    "f16",    1,  2,  false },
    { int32_t(ggml_type_id::Q4_0),   "q4_0",   QK, 18, true },
    { int32_t(ggml_type_id::Q4_1),   "q4_1",   QK, 20, true },
    { int32_t(ggml_type_id::Q5_0),   "q5_0",   QK, 22, true },
    { int32_t(ggml_type_id::Q5_1),   "q5_1",   QK, 24, true },
    { int32_t(ggml_type_id::Q8_0),   "q8_0",   QK, 34, true },
    { int32_t(ggml_type_id::IQ4_NL), "iq4_nl", QK, 18, true },
    { int32_t(ggml_type_id::BF16),   "bf16",   1,  2,  false },
};

// The 16 levels of iq4_nl (ggml's kvalues_iq4nl).
constexpr int8_t k_iq4nl[16] = { -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };

// C's float -> int conversions as ggml's x86 build performs them: truncation to int32
// (cvttss2si, which gives INT32_MIN for NaN and out-of-range values), then the low byte for the
// 8-bit casts. Written out because the C++ cast itself is undefined out of range.
inline int32_t trunc_i32(float v) {
    return (v >= -2147483648.0f && v < 2147483648.0f) ? int32_t(v) : INT32_MIN;
}
inline int32_t to_i8(float v) { return int32_t(int8_t(uint8_t(uint32_t(trunc_i32(v)) & 0xffu))); }
inline uint32_t to_u8(float v) { return uint32_t(trunc_i32(v)) & 0xffu; }

inline void put_f16(uint8_t * p, float v) {
    const uint16_t h = f32_to_f16(v);
    std::memcpy(p, &h, 2);
}
inline float get_f16(const uint8_t * p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
}

// The value of largest magnitude (the first one on ties), as the symmetric quantizers scale by it.
inline float signed_absmax(const float * x) {
    float amax = 0.0f, max = 0.0f;
    for (uint32_t j = 0; j < QK; ++j) {
        if (amax < std::fabs(x[j])) {
            amax = std::fabs(x[j]);
            max  = x[j];
        }
    }
    return max;
}

inline void min_max(const float * x, float & mn, float & mx) {
    mn = FLT_MAX;
    mx = -FLT_MAX;
    for (uint32_t j = 0; j < QK; ++j) {
        if (x[j] < mn) mn = x[j];
        if (x[j] > mx) mx = x[j];
    }
}

#if defined(LLMEM_QUANT_SSE2)
// q4_0 with SSE2: the scalar code's operations on four values at a time (one product, one sum,
// truncation, the min with 15), so the same bits. Blocks holding an infinity or a NaN, or whose
// scale has no finite inverse, go to the scalar code (false).
bool quant_q4_0_sse2(const float * x, uint8_t * y) {
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    const __m128 zero     = _mm_setzero_ps();
    __m128       m        = zero;
    __m128       nonfinite = zero;  // x * 0 is NaN exactly for an infinite or NaN x
    for (uint32_t j = 0; j < QK; j += 4) {
        const __m128 v = _mm_loadu_ps(x + j);
        m              = _mm_max_ps(m, _mm_and_ps(v, abs_mask));
        nonfinite      = _mm_add_ps(nonfinite, _mm_mul_ps(v, zero));
    }
    float lanes[4], bad[4];
    _mm_storeu_ps(lanes, m);
    _mm_storeu_ps(bad, nonfinite);
    if (!(bad[0] == 0.0f && bad[1] == 0.0f && bad[2] == 0.0f && bad[3] == 0.0f)) {
        return false;
    }
    const float amax = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
    float       max  = 0.0f;  // the scalar code's: the first value of largest magnitude, +0 for none
    if (amax > 0.0f) {
        for (uint32_t j = 0; j < QK; ++j) {
            if (std::fabs(x[j]) == amax) {
                max = x[j];
                break;
            }
        }
    }
    const float d  = max / -8;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    if (!std::isfinite(id)) {
        return false;
    }
    put_f16(y, d);
    const __m128  vid     = _mm_set1_ps(id);
    const __m128  half8   = _mm_set1_ps(8.5f);
    const __m128i fifteen = _mm_set1_epi16(15);
    __m128i       q[8];  // int32 lanes of x[0..31] * id + 8.5, truncated: in [0, 16]
    for (uint32_t k = 0; k < 8; ++k) {
        q[k] = _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(_mm_loadu_ps(x + 4 * k), vid), half8));
    }
    const __m128i a0 = _mm_min_epi16(_mm_packs_epi32(q[0], q[1]), fifteen);  // j 0..7
    const __m128i a1 = _mm_min_epi16(_mm_packs_epi32(q[2], q[3]), fifteen);  // j 8..15
    const __m128i b0 = _mm_min_epi16(_mm_packs_epi32(q[4], q[5]), fifteen);  // j 16..23
    const __m128i b1 = _mm_min_epi16(_mm_packs_epi32(q[6], q[7]), fifteen);  // j 24..31
    const __m128i lo = _mm_or_si128(a0, _mm_slli_epi16(b0, 4));
    const __m128i hi = _mm_or_si128(a1, _mm_slli_epi16(b1, 4));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(y + 2), _mm_packus_epi16(lo, hi));
    return true;
}
#endif

// -- q4_0: d = max / -8, q = min(15, int8(x / d + 8.5)), 16 bytes of nibble pairs (j, j + 16)
void quant_q4_0(const float * x, uint8_t * y) {
#if defined(LLMEM_QUANT_SSE2)
    if (kernels_detail::simd_enabled() && quant_q4_0_sse2(x, y)) {
        return;
    }
#endif
    const float d  = signed_absmax(x) / -8;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    for (uint32_t j = 0; j < QK / 2; ++j) {
        const int32_t a = std::min<int32_t>(15, to_i8(x[j] * id + 8.5f));
        const int32_t b = std::min<int32_t>(15, to_i8(x[j + QK / 2] * id + 8.5f));
        y[2 + j] = uint8_t(uint8_t(a) | (uint8_t(b) << 4));
    }
}

void dequant_q4_0(const uint8_t * y, float * x) {
    const float d = get_f16(y);
    for (uint32_t j = 0; j < QK / 2; ++j) {
        x[j]          = float(int32_t(y[2 + j] & 0x0f) - 8) * d;
        x[j + QK / 2] = float(int32_t(y[2 + j] >> 4) - 8) * d;
    }
}

// -- q4_1: d = (max - min) / 15, m = min, q = min(15, int8((x - min) / d + 0.5))
void quant_q4_1(const float * x, uint8_t * y) {
    float mn, mx;
    min_max(x, mn, mx);
    const float d  = (mx - mn) / 15;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    put_f16(y + 2, mn);
    for (uint32_t j = 0; j < QK / 2; ++j) {
        const int32_t a = std::min<int32_t>(15, to_i8((x[j] - mn) * id + 0.5f));
        const int32_t b = std::min<int32_t>(15, to_i8((x[j + QK / 2] - mn) * id + 0.5f));
        y[4 + j] = uint8_t(uint8_t(a) | (uint8_t(b) << 4));
    }
}

void dequant_q4_1(const uint8_t * y, float * x) {
    const float d = get_f16(y), m = get_f16(y + 2);
    for (uint32_t j = 0; j < QK / 2; ++j) {
        x[j]          = float(y[4 + j] & 0x0f) * d + m;
        x[j + QK / 2] = float(y[4 + j] >> 4) * d + m;
    }
}

// The fifth bits of 32 five-bit values, bit j of a little-endian u32.
inline void put_qh(uint8_t * p, uint32_t qh) { std::memcpy(p, &qh, 4); }
inline uint32_t get_qh(const uint8_t * p) {
    uint32_t qh;
    std::memcpy(&qh, p, 4);
    return qh;
}

// -- q5_0: d = max / -16, q = min(31, int8(x / d + 16.5)); layout d, qh, qs
void quant_q5_0(const float * x, uint8_t * y) {
    const float d  = signed_absmax(x) / -16;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    uint32_t qh = 0;
    for (uint32_t j = 0; j < QK / 2; ++j) {
        const uint8_t a = uint8_t(std::min<int32_t>(31, to_i8(x[j] * id + 16.5f)));
        const uint8_t b = uint8_t(std::min<int32_t>(31, to_i8(x[j + QK / 2] * id + 16.5f)));
        y[6 + j] = uint8_t((a & 0x0f) | ((b & 0x0f) << 4));
        qh |= ((uint32_t(a) & 0x10u) >> 4) << j;
        qh |= ((uint32_t(b) & 0x10u) >> 4) << (j + QK / 2);
    }
    put_qh(y + 2, qh);
}

void dequant_q5_0(const uint8_t * y, float * x) {
    const float    d  = get_f16(y);
    const uint32_t qh = get_qh(y + 2);
    for (uint32_t j = 0; j < QK / 2; ++j) {
        const uint32_t h0 = ((qh >> j) << 4) & 0x10u;
        const uint32_t h1 = (qh >> (j + 12)) & 0x10u;
        x[j]          = float(int32_t((y[6 + j] & 0x0fu) | h0) - 16) * d;
        x[j + QK / 2] = float(int32_t((y[6 + j] >> 4) | h1) - 16) * d;
    }
}

// -- q5_1: d = (max - min) / 31, m = min, q = uint8((x - min) / d + 0.5); layout d, m, qh, qs
void quant_q5_1(const float * x, uint8_t * y) {
    float mn, mx;
    min_max(x, mn, mx);
    const float d  = (mx - mn) / 31;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    put_f16(y + 2, mn);
    uint32_t qh = 0;
    for (uint32_t j = 0; j < QK / 2; ++j) {
        const uint32_t a = to_u8((x[j] - mn) * id + 0.5f);
        const uint32_t b = to_u8((x[j + QK / 2] - mn) * id + 0.5f);
        y[8 + j] = uint8_t((a & 0x0f) | ((b & 0x0f) << 4));
        qh |= ((a & 0x10u) >> 4) << j;
        qh |= ((b & 0x10u) >> 4) << (j + QK / 2);
    }
    put_qh(y + 4, qh);
}

void dequant_q5_1(const uint8_t * y, float * x) {
    const float    d = get_f16(y), m = get_f16(y + 2);
    const uint32_t qh = get_qh(y + 4);
    for (uint32_t j = 0; j < QK / 2; ++j) {
        const uint32_t h0 = ((qh >> j) << 4) & 0x10u;
        const uint32_t h1 = (qh >> (j + 12)) & 0x10u;
        x[j]          = float((y[8 + j] & 0x0fu) | h0) * d + m;
        x[j + QK / 2] = float((y[8 + j] >> 4) | h1) * d + m;
    }
}

// roundf (halfway cases away from zero) for the bounded values of q8_0, |v| < 2^31: the
// truncation (exact) plus one where the exact remainder is at least a half. Written as arithmetic
// on the comparison rather than a branch: the compiler vectorises it, and a branch taken at random
// half the time made q8_0 ten times slower than this.
inline float round_half_away(float v) {
    const float t = float(int32_t(v));
    return t + float(std::fabs(v - t) >= 0.5f) * std::copysign(1.0f, v);
}

#if defined(LLMEM_QUANT_SSE2)
// q8_0 with SSE2 (every x86-64 CPU): the same operations on four values at a time, so the same
// bits as the scalar code below (max of magnitudes, one product, truncation plus the half test).
bool quant_q8_0_sse2(const float * x, uint8_t * y) {
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    __m128       m        = _mm_setzero_ps();
    for (uint32_t j = 0; j < QK; j += 4) {
        m = _mm_max_ps(m, _mm_and_ps(_mm_loadu_ps(x + j), abs_mask));
    }
    float lanes[4];
    _mm_storeu_ps(lanes, m);
    const float amax = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
    const float d    = amax / 127;
    const float id   = d != 0.0f ? 1.0f / d : 0.0f;
    if (!std::isfinite(id) || !std::isfinite(amax)) {
        return false;  // the scalar code handles infinite products
    }
    put_f16(y, d);
    const __m128  vid  = _mm_set1_ps(id);
    const __m128  half = _mm_set1_ps(0.5f);
    const __m128  one  = _mm_set1_ps(1.0f);
    const __m128  sign = _mm_castsi128_ps(_mm_set1_epi32(int32_t(0x80000000u)));
    __m128i       q32[QK / 4];
    for (uint32_t j = 0; j < QK; j += 4) {
        const __m128 v   = _mm_mul_ps(_mm_loadu_ps(x + j), vid);
        const __m128 t   = _mm_cvtepi32_ps(_mm_cvttps_epi32(v));
        const __m128 up  = _mm_cmpge_ps(_mm_and_ps(_mm_sub_ps(v, t), abs_mask), half);
        const __m128 inc = _mm_and_ps(up, _mm_or_ps(one, _mm_and_ps(v, sign)));  // +-1 where rounding away
        q32[j / 4]       = _mm_cvttps_epi32(_mm_add_ps(t, inc));
    }
    // |q| <= 127: the saturating packs keep every value
    for (uint32_t k = 0; k < QK / 16; ++k) {
        const __m128i lo = _mm_packs_epi32(q32[4 * k], q32[4 * k + 1]);
        const __m128i hi = _mm_packs_epi32(q32[4 * k + 2], q32[4 * k + 3]);
        _mm_storeu_si128(reinterpret_cast<__m128i *>(y + 2 + 16 * k), _mm_packs_epi16(lo, hi));
    }
    return true;
}
#endif

// -- q8_0: d = amax / 127, q = roundf(x / d)
void quant_q8_0(const float * x, uint8_t * y) {
#if defined(LLMEM_QUANT_SSE2)
    if (kernels_detail::simd_enabled() && quant_q8_0_sse2(x, y)) {
        return;
    }
#endif
    float amax = 0.0f;
    for (uint32_t j = 0; j < QK; ++j) {
        amax = std::max(amax, std::fabs(x[j]));
    }
    const float d  = amax / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    // built in a local block (stores through y could alias x and keep the loop scalar)
    int8_t q[QK];
    if (std::isfinite(id)) {
        // |x * id| <= 127 (and a little rounding)
        for (uint32_t j = 0; j < QK; ++j) {
            q[j] = int8_t(int32_t(round_half_away(x[j] * id)));
        }
    } else {
        // an infinite id (d subnormal): the C cast's x86 result for inf and NaN products
        for (uint32_t j = 0; j < QK; ++j) {
            q[j] = int8_t(to_i8(x[j] * id));
        }
    }
    std::memcpy(y + 2, q, QK);
}

void dequant_q8_0(const uint8_t * y, float * x) {
    const float    d = get_f16(y);
    const int8_t * q = reinterpret_cast<const int8_t *>(y + 2);
    for (uint32_t j = 0; j < QK; ++j) {
        x[j] = float(q[j]) * d;
    }
}

// -- iq4_nl: the nearest of 16 non-linear levels; scale by least squares over one pass
int nearest_level(float v) {
    if (v <= k_iq4nl[0]) return 0;
    if (v >= k_iq4nl[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (v < k_iq4nl[mid]) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    return v - float(k_iq4nl[hi - 1]) < float(k_iq4nl[hi]) - v ? hi - 1 : hi;
}

// ggml's reference (ntry -1, no importance weights): the first scale max / -127 picks the
// levels, the stored scale is the weighted least-squares one for them (weights x^2). `L` holds
// the levels of the previous block of the row: ggml keeps that array across the blocks of one
// row and writes it unchanged for a block too small to scale (whose scale is 0, so the levels
// do not matter to the values).
void quant_iq4_nl(const float * x, uint8_t * y, uint8_t * L) {
    float amax = 0.0f, max = 0.0f;
    for (uint32_t j = 0; j < QK; ++j) {
        const float ax = std::fabs(x[j]);
        if (ax > amax) {
            amax = ax;
            max  = x[j];
        }
    }
    float d = 0.0f;
    if (!(amax < 1e-15f)) {
        const float id    = 1 / (max / float(k_iq4nl[0]));
        float       sumqx = 0.0f, sumq2 = 0.0f;
        for (uint32_t j = 0; j < QK; ++j) {
            const int   l = nearest_level(id * x[j]);
            const float q = float(k_iq4nl[l]);
            const float w = x[j] * x[j];
            L[j]          = uint8_t(l);
            sumqx += w * q * x[j];
            sumq2 += w * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
    }
    put_f16(y, d);
    for (uint32_t j = 0; j < QK / 2; ++j) {
        y[2 + j] = uint8_t(L[j] | (L[j + QK / 2] << 4));
    }
}

void dequant_iq4_nl(const uint8_t * y, float * x) {
    const float d = get_f16(y);
    for (uint32_t j = 0; j < QK / 2; ++j) {
        x[j]          = d * float(k_iq4nl[y[2 + j] & 0x0f]);
        x[j + QK / 2] = d * float(k_iq4nl[y[2 + j] >> 4]);
    }
}

[[noreturn]] void unknown_type(int32_t type) {
    throw std::invalid_argument("unsupported K/V type id " + std::to_string(type) +
                                " (llmem stores f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, "
                                "iq4_nl = 20, bf16 = 30)");
}

} // namespace

const type_traits * find_type(int32_t type) {
    for (const auto & t : k_types) {
        if (t.id == type) {
            return &t;
        }
    }
    return nullptr;
}

const type_traits * type_table(size_t & n) {
    n = sizeof(k_types) / sizeof(k_types[0]);
    return k_types;
}

size_t row_size(int32_t type, size_t n) {
    const type_traits * t = find_type(type);
    if (!t) {
        unknown_type(type);
    }
    if (n % t->blck_size != 0) {
        throw std::invalid_argument(std::string("a row of ") + t->name + " holds whole blocks of " +
                                    std::to_string(t->blck_size) + " elements; " + std::to_string(n) +
                                    " is not a multiple of it");
    }
    return n / t->blck_size * t->type_size;
}

bool is_quantized(int32_t type) {
    const type_traits * t = find_type(type);
    return t && t->quantized;
}

void row_from_float(int32_t type, const float * src, uint8_t * dst, size_t n) {
    switch (type) {
        case int32_t(ggml_type_id::F32):  std::memcpy(dst, src, n * 4); return;
        case int32_t(ggml_type_id::F16):  f32_to_f16_n(src, dst, n); return;
        case int32_t(ggml_type_id::BF16): f32_to_bf16_n(src, dst, n); return;
        default: break;
    }
    void (*fn)(const float *, uint8_t *) = nullptr;
    size_t bs = 0;
    switch (type) {
        case int32_t(ggml_type_id::Q4_0): fn = quant_q4_0; bs = 18; break;
        case int32_t(ggml_type_id::Q4_1): fn = quant_q4_1; bs = 20; break;
        case int32_t(ggml_type_id::Q5_0): fn = quant_q5_0; bs = 22; break;
        case int32_t(ggml_type_id::Q5_1): fn = quant_q5_1; bs = 24; break;
        case int32_t(ggml_type_id::Q8_0): fn = quant_q8_0; bs = 34; break;
        case int32_t(ggml_type_id::IQ4_NL): {
            uint8_t L[QK] = {};
            for (size_t b = 0; b < n / QK; ++b) {
                quant_iq4_nl(src + b * QK, dst + b * 18, L);
            }
            return;
        }
        default: unknown_type(type);
    }
    for (size_t b = 0; b < n / QK; ++b) {
        fn(src + b * QK, dst + b * bs);
    }
}

void row_to_float(int32_t type, const uint8_t * src, float * dst, size_t n) {
    switch (type) {
        case int32_t(ggml_type_id::F32):  std::memcpy(dst, src, n * 4); return;
        case int32_t(ggml_type_id::F16):  f16_to_f32_n(src, dst, n); return;
        case int32_t(ggml_type_id::BF16): bf16_to_f32_n(src, dst, n); return;
        default: break;
    }
    void (*fn)(const uint8_t *, float *) = nullptr;
    size_t bs = 0;
    switch (type) {
        case int32_t(ggml_type_id::Q4_0):   fn = dequant_q4_0; bs = 18; break;
        case int32_t(ggml_type_id::Q4_1):   fn = dequant_q4_1; bs = 20; break;
        case int32_t(ggml_type_id::Q5_0):   fn = dequant_q5_0; bs = 22; break;
        case int32_t(ggml_type_id::Q5_1):   fn = dequant_q5_1; bs = 24; break;
        case int32_t(ggml_type_id::Q8_0):   fn = dequant_q8_0; bs = 34; break;
        case int32_t(ggml_type_id::IQ4_NL): fn = dequant_iq4_nl; bs = 18; break;
        default: unknown_type(type);
    }
    for (size_t b = 0; b < n / QK; ++b) {
        fn(src + b * bs, dst + b * QK);
    }
}

void rows_from_float_scatter(int32_t type, const float * src, size_t n_rows, size_t n, uint8_t * dst_base,
                             size_t dst_row_bytes, const int64_t * dst_rows) {
    for (size_t i = 0; i < n_rows; ++i) {
        row_from_float(type, src + i * n, dst_base + size_t(dst_rows[i]) * dst_row_bytes, n);
    }
}

} // namespace llmem
