#pragma once

// The kernels that move and transform tensor rows (element conversions, the RoPE re-rotation of
// the K-shift, the transposed V scatter). Plain C++: the cache calls them on its buffers, the
// bindings call them on validated numpy arrays. Where the CPU has AVX2 and F16C a vector clone
// runs; the portable path computes the same bits.

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llmem {

/// ggml type ids of the element types llmem stores (the ids appear in the state bytes).
enum class kv_type : int32_t {
    F32  = 0,
    F16  = 1,
    BF16 = 30,
};

/// RoPE as the model applies it, for re-rotating stored K rows (the K-shift).
struct rope_params {
    bool     enabled     = false;
    uint32_t n_rot       = 0;      // rotated elements per head (even)
    uint32_t head_dim    = 0;      // elements per head in a K row (n_rot <= head_dim)
    bool     neox        = false;  // pairs (k, k + n_rot/2) instead of (2k, 2k + 1)
    float    freq_base   = 10000.0f;
    float    freq_scale  = 1.0f;
    float    ext_factor  = 0.0f;   // YaRN mix; 0 disables YaRN
    float    attn_factor = 1.0f;
    float    beta_fast   = 32.0f;
    float    beta_slow   = 1.0f;
    uint32_t n_ctx_orig  = 0;
};

/// Half / bfloat16 conversions of one value (round to nearest even on the way to 16 bits).
float    f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float    bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);

/// The same conversions over n values. The 16-bit side is addressed as bytes: it may sit at
/// any address (state bytes, numpy buffers).
void f16_to_f32_n(const uint8_t * src, float * dst, size_t n);
void f32_to_f16_n(const float * src, uint8_t * dst, size_t n);
void bf16_to_f32_n(const uint8_t * src, float * dst, size_t n);
void f32_to_bf16_n(const float * src, uint8_t * dst, size_t n);

/// Cos and sin (times the magnitude factor) of each rotated pair for a rotation by `delta`
/// positions: n_rot / 2 entries each, ggml's rope including the YaRN ramp.
void rope_tables(const rope_params & r, int32_t delta, std::vector<float> & cs, std::vector<float> & sn);

/// Rotate the RoPE part (the first n_rot elements of every head) of n_rows K rows in place.
/// Row i starts at rows + i * row_stride (bytes); each holds n_embd elements of `type`.
/// cs / sn are rope_tables of the shift; the rest of each head is left as it is.
void rope_rotate_rows(uint8_t * rows, size_t n_rows, size_t row_stride, int32_t type, uint32_t n_embd,
                      const rope_params & r, const float * cs, const float * sn);

/// One row of rope_rotate_rows (the state writer's form; `buf` is not needed any more).
void rotate_row(uint8_t * row, int32_t type, uint32_t n_embd, const rope_params & r, const std::vector<float> & cs,
                const std::vector<float> & sn, std::vector<float> & buf);

/// Write token rows into a transposed V buffer [n_stream][e_max][kv_size] of elem_size-byte
/// elements (2 or 4): v[s][j][c] = vals[t][j] for j < ne and dest[t] = s * kv_size + c.
/// The caller has checked every dest[t] < n_stream * kv_size and ne <= e_max.
void scatter_v_trans(uint8_t * v, size_t elem_size, size_t e_max, size_t kv_size, const uint8_t * vals,
                     size_t n_tokens, size_t ne, const int64_t * dest);

namespace kernels_detail {
/// True when the AVX2/F16C clones run. Tests switch them off to check the portable path gives
/// the same bits; nothing else should call this.
bool simd_enabled();
void set_simd_enabled(bool on);  // no effect on a CPU without AVX2/F16C
} // namespace kernels_detail

} // namespace llmem
