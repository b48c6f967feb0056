#include "llmem/kv_cache.h"

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/quant.h"
#include "llmem/state_holes.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace llmem {

// -- free helpers -------------------------------------------------------------------------------

size_t kv_type_size(int32_t type) {
    const type_traits * t = find_type(type);
    if (!t || t->quantized) {
        throw std::invalid_argument("K/V type id " + std::to_string(type) + " has no element size (llmem stores f32 = 0, "
                                    "f16 = 1, bf16 = 30 element-wise; the block types by row)");
    }
    return t->type_size;
}

bool is_masked_swa(uint32_t n_swa, swa_type type, int32_t p0, int32_t p1) {
    switch (type) {
        case swa_type::NONE:
            return false;
        case swa_type::STANDARD:
            return int64_t(p1) - int64_t(p0) >= int64_t(n_swa);
        case swa_type::CHUNKED: {
            const int64_t chunk_start = (int64_t(p1) / n_swa) * n_swa;
            return int64_t(p0) < chunk_start;
        }
        case swa_type::SYMMETRIC: {
            const int64_t half = int64_t(n_swa / 2);
            const int64_t d    = int64_t(p1) - int64_t(p0);
            return (d < 0 ? -d : d) > half;
        }
    }
    return false;
}

uint32_t slot_info::s0() const {
    return strm.empty() ? 0 : *std::min_element(strm.begin(), strm.end());
}

uint32_t slot_info::s1() const {
    return strm.empty() ? 0 : *std::max_element(strm.begin(), strm.end());
}

namespace {

[[noreturn]] void bad_arg(const std::string & msg) {
    throw std::invalid_argument(msg);
}

// Little-endian byte writer / bounds-checked reader.
template <typename T>
void put(std::vector<uint8_t> & out, T v) {
    const size_t n = out.size();
    out.resize(n + sizeof(T));
    std::memcpy(out.data() + n, &v, sizeof(T));
}

// Calls f(first index in the list, first cell, run length) for each run of consecutive cells in
// a cell list. A sequence's cells are usually one or a few runs, so its rows move in a few large
// copies instead of one small copy per cell.
template <typename F>
void for_each_cell_run(const uint32_t * cells, size_t n, F && f) {
    size_t a = 0;
    while (a < n) {
        size_t b = a + 1;
        while (b < n && cells[b] == cells[b - 1] + 1) {
            ++b;
        }
        f(a, cells[a], b - a);
        a = b;
    }
}

struct reader {
    const uint8_t * data;
    size_t          n;
    size_t &        off;

    const uint8_t * take(size_t k, const char * what) {
        if (k > n - off) {
            throw state_error(std::string("state bytes end too early while reading ") + what +
                              " (need " + std::to_string(k) + " bytes at offset " + std::to_string(off) +
                              ", have " + std::to_string(n - off) + ")");
        }
        const uint8_t * p = data + off;
        off += k;
        return p;
    }
    template <typename T>
    T get(const char * what) {
        T v;
        std::memcpy(&v, take(sizeof(T), what), sizeof(T));
        return v;
    }
};

} // namespace

// -- construction -------------------------------------------------------------------------------

namespace {

// The K/V types llama.cpp accepts for its cache, with its rule for V: a block type cannot be
// stored transposed (one element per cell in a column), so llama.cpp refuses a quantized V
// cache without flash attention, which is what stores V untransposed.
void check_kv_types(const kv_cache_params & p) {
    row_size(p.type_k, 0);  // throws std::invalid_argument naming the supported ids
    row_size(p.type_v, 0);
    if (is_quantized(p.type_v) && p.v_trans) {
        bad_arg(std::string("a quantized V cache (") + find_type(p.type_v)->name +
                ") needs v_trans = false: llama.cpp requires flash attention for V cache quantization, and "
                "a block type cannot be stored transposed");
    }
}

// Bytes of one element of transposed V (0 without transposition, where V may hold blocks).
size_t v_elem_bytes(const kv_cache_params & p) {
    return p.v_trans ? kv_type_size(p.type_v) : 0;
}

// The Walsh-Hadamard transform, unscaled (Sylvester order, the matrix of ggml_gen_hadamard times
// sqrt(n)), of every chunk of n values of x[0, n_total), n a power of two >= 4: the attention
// rotation llama.cpp b11549 applies to a quantized K over chunks of n_rot_k values is this divided
// by sqrt(n), and its own inverse. A butterfly, O(n log n) per chunk: the first two stages as one
// pass over groups of four, the others over contiguous halves, four values at a time with SSE2.
#if defined(__SSE2__) && (defined(__x86_64__) || defined(__i386__))
// The butterfly stages from 4 on of one chunk of n >= 16 values (the first two done): the stage of
// 4 with SSE, the others with AVX2, on CPUs that have it (kernels_detail::simd_enabled).
__attribute__((target("avx2"))) void hadamard_stages_avx2(float * v, uint32_t n) {
    for (uint32_t i = 0; i < n; i += 8) {
        const __m128 a = _mm_loadu_ps(v + i);
        const __m128 b = _mm_loadu_ps(v + i + 4);
        _mm_storeu_ps(v + i, _mm_add_ps(a, b));
        _mm_storeu_ps(v + i + 4, _mm_sub_ps(a, b));
    }
    for (uint32_t len = 8; len < n; len <<= 1) {
        for (uint32_t i = 0; i < n; i += 2 * len) {
            for (uint32_t j = i; j < i + len; j += 8) {
                const __m256 a = _mm256_loadu_ps(v + j);
                const __m256 b = _mm256_loadu_ps(v + j + len);
                _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(v + j + len, _mm256_sub_ps(a, b));
            }
        }
    }
}
#endif

void hadamard_chunks(float * x, size_t n_total, uint32_t n) {
    for (size_t c = 0; c + n <= n_total; c += n) {
        float * v = x + c;
#if defined(__SSE2__)
        const __m128 neg_odd  = _mm_castsi128_ps(_mm_set_epi32(int32_t(0x80000000u), 0, int32_t(0x80000000u), 0));
        const __m128 neg_high = _mm_castsi128_ps(_mm_set_epi32(int32_t(0x80000000u), int32_t(0x80000000u), 0, 0));
        for (uint32_t i = 0; i < n; i += 4) {
            const __m128 a = _mm_loadu_ps(v + i);                                       // x0 x1 x2 x3
            const __m128 p = _mm_add_ps(_mm_xor_ps(a, neg_odd), _mm_shuffle_ps(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
            // p = x0+x1, x0-x1, x2+x3, x2-x3
            _mm_storeu_ps(v + i, _mm_add_ps(_mm_xor_ps(p, neg_high), _mm_shuffle_ps(p, p, _MM_SHUFFLE(1, 0, 3, 2))));
        }
        uint32_t len = 4;
#if defined(__x86_64__) || defined(__i386__)
        if (kernels_detail::simd_enabled() && n >= 16) {
            // stage 4 as below, then the stages of 8 and more eight values at a time
            hadamard_stages_avx2(v, n);
            continue;
        }
#endif
        for (; len < n; len <<= 1) {
            for (uint32_t i = 0; i < n; i += 2 * len) {
                for (uint32_t j = i; j < i + len; j += 4) {
                    const __m128 a = _mm_loadu_ps(v + j);
                    const __m128 b = _mm_loadu_ps(v + j + len);
                    _mm_storeu_ps(v + j, _mm_add_ps(a, b));
                    _mm_storeu_ps(v + j + len, _mm_sub_ps(a, b));
                }
            }
        }
#else
        for (uint32_t len = 1; len < n; len <<= 1) {
            for (uint32_t i = 0; i < n; i += 2 * len) {
                for (uint32_t j = i; j < i + len; ++j) {
                    const float a = v[j];
                    const float b = v[j + len];
                    v[j]          = a + b;
                    v[j + len]    = a - b;
                }
            }
        }
#endif
    }
}

// Rotate n_rows K rows of any type by a K-shift. Float types are rotated in place. A block type
// the way llama.cpp's K-shift graph treats a quantized cache: dequantize to f32, rotate,
// quantize again, one row at a time through `buf` (a row stays in L1; `buf` is reused, so a
// warm shift allocates nothing).
//
// Without an attention rotation (n_rot_k == 0) only the blocks holding the first n_rot values of
// each head are converted (llama.cpp's shift views exactly those values): the other blocks keep
// their bytes, and a partial RoPE (n_rot 64 of head_dim 128) converts half the row. With one
// (n_rot_k > 0, a power of two dividing head_dim) the whole row is converted: the rotation is
// undone over each chunk of n_rot_k values, the RoPE applied, the rotation applied again.
void rotate_k_rows(uint8_t * rows, size_t n_rows, size_t row_stride, int32_t type, uint32_t n_embd,
                   const rope_params & r, uint32_t n_rot_k, const float * cs, const float * sn,
                   std::vector<float> & buf) {
    if (!is_quantized(type)) {
        rope_rotate_rows(rows, n_rows, row_stride, type, n_embd, r, cs, sn);
        return;
    }
    if (r.n_rot == 0 || r.head_dim == 0 || n_rows == 0) {
        return;
    }
    const type_traits & t      = *find_type(type);
    const uint32_t      n_head = n_embd / r.head_dim;
    if (n_rot_k != 0 || r.head_dim % t.blck_size != 0) {
        buf.resize(n_embd);
        for (size_t i = 0; i < n_rows; ++i) {
            uint8_t * row = rows + i * row_stride;
            row_to_float(type, row, buf.data(), n_embd);
            if (n_rot_k != 0) {
                hadamard_chunks(buf.data(), n_embd, n_rot_k);
            }
            rope_rotate_rows(reinterpret_cast<uint8_t *>(buf.data()), 1, 0, int32_t(kv_type::F32), n_embd, r, cs, sn);
            if (n_rot_k != 0) {
                // both transforms' 1/sqrt(n) at once: 1/n, a power of two, scales exactly
                hadamard_chunks(buf.data(), n_embd, n_rot_k);
                const float inv_n = 1.0f / float(n_rot_k);
                for (uint32_t j = 0; j < n_embd; ++j) {
                    buf[j] *= inv_n;
                }
            }
            row_from_float(type, buf.data(), row, n_embd);
        }
        return;
    }
    // the rotated values of each head, in whole blocks, gathered as heads of `span` values
    const uint32_t span       = std::min(r.head_dim, (r.n_rot + t.blck_size - 1) / t.blck_size * t.blck_size);
    const size_t   head_bytes = size_t(r.head_dim / t.blck_size) * t.type_size;
    rope_params    rs         = r;
    rs.head_dim               = span;
    buf.resize(size_t(n_head) * span);
    for (size_t i = 0; i < n_rows; ++i) {
        uint8_t * row = rows + i * row_stride;
        for (uint32_t h = 0; h < n_head; ++h) {
            row_to_float(type, row + h * head_bytes, buf.data() + size_t(h) * span, span);
        }
        rope_rotate_rows(reinterpret_cast<uint8_t *>(buf.data()), 1, 0, int32_t(kv_type::F32), n_head * span, rs, cs,
                         sn);
        for (uint32_t h = 0; h < n_head; ++h) {
            row_from_float(type, buf.data() + size_t(h) * span, row + h * head_bytes, span);
        }
    }
}

} // namespace

kv_cache::kv_cache(const kv_cache_params & params) : p_(params) {
    if (p_.kv_size == 0) {
        bad_arg("kv_size must be positive");
    }
    if (p_.kv_size > uint32_t(std::numeric_limits<int32_t>::max())) {
        bad_arg("kv_size " + std::to_string(p_.kv_size) + " is too large");
    }
    if (p_.n_pad == 0) {
        bad_arg("n_pad must be positive");
    }
    if (p_.kv_size % p_.n_pad != 0) {
        bad_arg("kv_size " + std::to_string(p_.kv_size) + " is not a multiple of n_pad " + std::to_string(p_.n_pad));
    }
    if (p_.n_seq_max < 1 || p_.n_seq_max > SEQ_MAX_LIMIT) {
        bad_arg("n_seq_max must be in [1, " + std::to_string(SEQ_MAX_LIMIT) + "], got " + std::to_string(p_.n_seq_max));
    }
    if (p_.swa != swa_type::NONE && p_.n_swa == 0) {
        bad_arg("n_swa must be positive when swa_type is not NONE");
    }
    if (p_.n_pos_per_embd == 0) {
        bad_arg("n_pos_per_embd must be positive");
    }
    const size_t nl = p_.layer_il.size();
    if (p_.n_embd_k.size() != nl || p_.n_embd_v.size() != nl) {
        bad_arg("layer_il, n_embd_k and n_embd_v must have the same length");
    }
    check_kv_types(p_);
    if (p_.state_format != KV_STATE_FORMAT_B11312 && p_.state_format != KV_STATE_FORMAT_B11549) {
        bad_arg("state_format must be 3 (llama.cpp b11312) or 4 (b11549), got " + std::to_string(p_.state_format));
    }
    for (size_t l = 0; l < nl; ++l) {
        if (p_.n_embd_k[l] == 0 || p_.n_embd_v[l] == 0) {
            bad_arg("n_embd_k and n_embd_v must be positive (layer " + std::to_string(p_.layer_il[l]) + ")");
        }
        // a block type stores whole blocks per row (ggml_row_size asserts the same)
        row_size(p_.type_k, p_.n_embd_k[l]);
        row_size(p_.type_v, p_.n_embd_v[l]);
        p_.n_embd_v_max = std::max(p_.n_embd_v_max, p_.n_embd_v[l]);
    }
    if (p_.rope.enabled) {
        const auto & r = p_.rope;
        if (r.n_rot == 0 || r.n_rot % 2 != 0) {
            bad_arg("rope n_rot must be a positive even number, got " + std::to_string(r.n_rot));
        }
        if (r.head_dim < r.n_rot) {
            bad_arg("rope head_dim " + std::to_string(r.head_dim) + " is smaller than n_rot " + std::to_string(r.n_rot));
        }
        if (!(r.freq_base > 0.0f) || !(r.freq_scale > 0.0f)) {
            bad_arg("rope freq_base and freq_scale must be positive");
        }
        if (r.ext_factor != 0.0f && r.n_ctx_orig == 0) {
            bad_arg("rope n_ctx_orig must be positive when ext_factor is not 0");
        }
        for (size_t l = 0; l < nl; ++l) {
            if (p_.n_embd_k[l] % r.head_dim != 0) {
                bad_arg("rope head_dim " + std::to_string(r.head_dim) + " does not divide n_embd_k " +
                        std::to_string(p_.n_embd_k[l]) + " of layer " + std::to_string(p_.layer_il[l]));
            }
        }
    }
    n_stream_  = p_.unified ? 1u : uint32_t(p_.n_seq_max);
    n_seq_ids_ = p_.unified ? std::max<int32_t>(256, p_.n_seq_max) : p_.n_seq_max;
    with_ext_  = p_.n_pos_per_embd > 1 || p_.cell_tokens;

    cells_.reserve(n_stream_);
    for (uint32_t s = 0; s < n_stream_; ++s) {
        // a per-sequence stream only ever holds its own sequence
        cells_.emplace_back(p_.kv_size, p_.n_seq_max, with_ext_, p_.unified ? 0 : int32_t(s), p_.unified ? 0 : 1);
    }
    heads_.assign(n_stream_, 0);
    txn_open_flag_.assign(n_stream_, 0);
    k_.assign(nl, nullptr);
    v_.assign(nl, nullptr);
    max_rm_.assign(size_t(p_.n_seq_max), -1);
}

int32_t kv_cache::seq_pos_tok_le(int32_t seq, int32_t p) const {
    check_seq(seq, "seq_pos_tok_le");
    if (!with_ext_) {
        throw error("seq_pos_tok_le: this cache keeps no tokens in its cells (build it with cell_tokens)");
    }
    if (seq >= p_.n_seq_max) {
        return -1;  // an id a unified cache accepts but no cell can hold
    }
    return cells_[seq_to_stream(seq)].seq_pos_tok_le(seq, p);
}

uint32_t kv_cache::seq_to_stream(int32_t seq) const {
    return p_.unified ? 0u : uint32_t(seq);
}

uint32_t kv_cache::used_count() const {
    uint32_t n = 0;
    for (const auto & c : cells_) {
        n += c.used_count();
    }
    return n;
}

uint32_t kv_cache::usable_in_stream(uint32_t stream) const {
    const kv_cells & T = cells_.at(stream);
    uint32_t         n = p_.kv_size - T.used_count();
    if (p_.swa != swa_type::NONE) {
        for (uint32_t c = T.next_used(0); c < p_.kv_size; c = T.next_used(c + 1)) {
            n += T.seq_count(c) == 1 &&
                 is_masked_swa(p_.n_swa, p_.swa, T.pos_get(c), T.seq_pos_max(T.seq_get(c)) + 1) ? 1u : 0u;
        }
    }
    return n;
}

uint32_t kv_cache::n_seqs_present() const {
    uint32_t n = 0;
    for (int32_t seq = 0; seq < n_seq_ids_; ++seq) {
        n += seq_pos_max(seq) != -1 ? 1u : 0u;
    }
    return n;
}

size_t kv_cache::k_row_bytes(uint32_t l) const { return row_size(p_.type_k, p_.n_embd_k.at(l)); }
size_t kv_cache::v_row_bytes(uint32_t l) const { return row_size(p_.type_v, p_.n_embd_v.at(l)); }

size_t kv_cache::k_buffer_bytes(uint32_t l) const { return size_t(n_stream_) * p_.kv_size * k_row_bytes(l); }

size_t kv_cache::v_buffer_bytes(uint32_t l) const {
    if (p_.v_trans) {
        return size_t(n_stream_) * p_.n_embd_v_max * p_.kv_size * kv_type_size(p_.type_v);
    }
    return size_t(n_stream_) * p_.kv_size * v_row_bytes(l);
}

size_t kv_cache::total_bytes() const {
    size_t n = 0;
    for (uint32_t l = 0; l < n_layer(); ++l) {
        n += k_buffer_bytes(l) + v_buffer_bytes(l);
    }
    return n;
}

void kv_cache::set_layer_buffers(uint32_t l, uint8_t * k, uint8_t * v) {
    if (l >= n_layer()) {
        bad_arg("cache layer " + std::to_string(l) + " out of range [0, " + std::to_string(n_layer()) + ")");
    }
    k_[l] = k;
    v_[l] = v;
}

const uint8_t * kv_cache::k_row(uint32_t l, uint32_t stream, uint32_t cell) const {
    return k_[l] ? k_[l] + (size_t(stream) * p_.kv_size + cell) * k_row_bytes(l) : nullptr;
}

uint8_t * kv_cache::k_row_mut(uint32_t l, uint32_t stream, uint32_t cell) {
    return k_[l] ? k_[l] + (size_t(stream) * p_.kv_size + cell) * k_row_bytes(l) : nullptr;
}

// -- sequence operations ------------------------------------------------------------------------

namespace {

// Out of line so that check_seq inlines into the hot callers (seq_pos_max runs once per
// sequence of every decode step).
[[noreturn]] void bad_seq_id(int32_t seq, int32_t n_seq_ids, const char * what) {
    bad_arg(std::string(what) + ": seq_id " + std::to_string(seq) + " is out of range [0, " +
            std::to_string(n_seq_ids) + ")");
}

} // namespace

void kv_cache::check_seq(int32_t seq, const char * what) const {
    if (seq < 0 || seq >= n_seq_ids_) {
        bad_seq_id(seq, n_seq_ids_, what);
    }
}

void kv_cache::lower_head(uint32_t stream, uint32_t lowest) {
    if (lowest < p_.kv_size && lowest < heads_[stream]) {
        heads_[stream] = lowest;
    }
}

void kv_cache::clear(bool data) {
    for (uint32_t s = 0; s < n_stream_; ++s) {
        cells_[s].reset();
        heads_[s] = 0;
    }
    if (data) {
        for (uint32_t l = 0; l < n_layer(); ++l) {
            if (k_[l]) {
                std::memset(k_[l], 0, k_buffer_bytes(l));
            }
            if (v_[l]) {
                std::memset(v_[l], 0, v_buffer_bytes(l));
            }
        }
    }
}

bool kv_cache::seq_rm(int32_t seq, int32_t p0, int32_t p1) {
    check_seq_rm(seq);
    const pos_range r = pos_range::normalise(p0, p1);
    if (seq == -1) {
        for (uint32_t s = 0; s < n_stream_; ++s) {
            lower_head(s, cells_[s].rm_range(r.p0, r.p1));
        }
        return true;
    }
    const uint32_t s = seq_to_stream(seq);
    lower_head(s, cells_[s].seq_rm_range(seq, r.p0, r.p1));
    return true;
}

void kv_cache::check_seq_rm(int32_t seq) const {
    if (seq != -1) {
        check_seq(seq, "seq_rm");
    }
}

void kv_cache::check_seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1) const {
    check_seq(src, "seq_cp");
    check_seq(dst, "seq_cp");
    if (dst >= p_.n_seq_max) {
        // llama.cpp accepts it in a unified cache but never saves the copy (the writer drops ids
        // >= n_seq_max); refusing keeps every cell saveable.
        bad_arg("seq_cp: destination seq_id " + std::to_string(dst) + " is not below n_seq_max " +
                std::to_string(p_.n_seq_max));
    }
    if (seq_to_stream(src) != seq_to_stream(dst)) {
        const int64_t size = p_.kv_size;
        if ((0 < p0 && p0 < size - 1) || (0 < p1 && p1 < size - 1)) {
            bad_arg("seq_cp across streams copies whole streams only: p0 and p1 must be <= 0 or >= kv_size - 1, "
                    "got [" + std::to_string(p0) + ", " + std::to_string(p1) + ")");
        }
    }
}

void kv_cache::check_seq_keep(int32_t seq) const {
    check_seq(seq, "seq_keep");
}

void kv_cache::check_seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t d) const {
    check_seq(seq, "seq_add");
    if (!get_can_shift()) {
        bad_arg("seq_add: positions of an M-RoPE cache (n_pos_per_embd > 1) cannot be shifted");
    }
    const pos_range r = pos_range::normalise(p0, p1);
    if (d <= 0 || seq >= p_.n_seq_max || r.p0 >= r.p1) {
        return;  // a negative shift removes the cells it moves below 0; nothing can overflow
    }
    const kv_cells & T  = cells_[seq_to_stream(seq)];
    const auto &     ix = T.seq_index(seq);
    auto             hi = std::lower_bound(ix.begin(), ix.end(), kv_cells::key(r.p1, 0));
    if (hi != ix.begin()) {
        const int32_t top = kv_cells::key_pos(*(hi - 1));
        if (top >= r.p0 && int64_t(top) + d > int64_t(std::numeric_limits<int32_t>::max())) {
            bad_arg("seq_add: position " + std::to_string(top) + " + " + std::to_string(d) + " overflows int32");
        }
    }
}

void kv_cache::check_seq_div(int32_t seq, int32_t /*p0*/, int32_t /*p1*/, int32_t d) const {
    check_seq(seq, "seq_div");
    if (!get_can_shift()) {
        bad_arg("seq_div: positions of an M-RoPE cache (n_pos_per_embd > 1) cannot be shifted");
    }
    if (d < 1) {
        bad_arg("seq_div: divisor must be >= 1, got " + std::to_string(d));
    }
}

void kv_cache::seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    check_seq_cp(src, dst, p0, p1);
    const uint32_t s0 = seq_to_stream(src);
    const uint32_t s1 = seq_to_stream(dst);
    if (s0 == s1) {
        if (src == dst || src >= p_.n_seq_max) {
            return;
        }
        const pos_range r = pos_range::normalise(p0, p1);
        cells_[s0].seq_copy(src, dst, r.p0, r.p1);
        return;
    }
    pending_.push_back({ s0, s1 });
    kv_cells &       D = cells_[s1];
    const kv_cells & S = cells_[s0];
    D.reset();
    for (const uint64_t k : S.seq_index(src)) {
        const uint32_t i = kv_cells::key_cell(k);
        const int32_t  p = S.pos_get(i);
        const int32_t  d = S.shift_get(i);
        D.pos_set(i, p - d);
        D.seq_add(i, dst);
        if (d != 0) {
            D.pos_add(i, d);
        }
        D.ext_set(i, S.ext_get(i));
    }
    heads_[s1] = heads_[s0];
}

void kv_cache::seq_keep(int32_t seq) {
    check_seq_keep(seq);
    const uint32_t s = seq_to_stream(seq);
    lower_head(s, cells_[s].keep_only(seq));
}

void kv_cache::seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t d) {
    check_seq_add(seq, p0, p1, d);
    if (d == 0) {
        return;
    }
    const pos_range r = pos_range::normalise(p0, p1);
    if (r.p0 == r.p1) {
        return;
    }
    const uint32_t s      = seq_to_stream(seq);
    const uint32_t lowest = cells_[s].seq_pos_add(seq, r.p0, r.p1, d);
    heads_[s]             = lowest < p_.kv_size ? lowest : 0;
}

void kv_cache::seq_div(int32_t seq, int32_t p0, int32_t p1, int32_t d) {
    check_seq_div(seq, p0, p1, d);
    if (d == 1) {
        return;
    }
    const pos_range r = pos_range::normalise(p0, p1);
    if (r.p0 == r.p1) {
        return;
    }
    cells_[seq_to_stream(seq)].seq_pos_div(seq, r.p0, r.p1, d);
}

int32_t kv_cache::seq_pos_min(int32_t seq) const {
    check_seq(seq, "seq_pos_min");
    return cells_[seq_to_stream(seq)].seq_pos_min(seq);
}

int32_t kv_cache::seq_pos_max(int32_t seq) const {
    check_seq(seq, "seq_pos_max");
    return cells_[seq_to_stream(seq)].seq_pos_max(seq);
}

void kv_cache::seq_pos_max_each(const int32_t * seqs, uint32_t n, int32_t * out) const {
    for (uint32_t k = 0; k < n; ++k) {
        check_seq(seqs[k], "seq_pos_max");
        const kv_cells & T = cells_[seq_to_stream(seqs[k])];
        out[k]             = T.seq_pos_max(seqs[k]);
        T.prefetch_append(seqs[k]);  // the decode step appends there next (apply_ubatch)
    }
}

bool kv_cache::get_has_shift() const {
    for (const auto & c : cells_) {
        if (c.has_shift()) {
            return true;
        }
    }
    return false;
}

// -- transactions -------------------------------------------------------------------------------

void kv_cache::txn_begin() {
    if (txn_active_) {
        throw std::logic_error("kv_cache: nested transaction");
    }
    txn_active_ = true;
    txn_open_.clear();
}

kv_cells & kv_cache::wcells(uint32_t stream) {
    if (txn_active_ && !txn_open_flag_[stream]) {
        txn_open_flag_[stream] = 1;
        txn_open_.emplace_back(stream, heads_[stream]);
        cells_[stream].journal_begin();
    }
    return cells_[stream];
}

void kv_cache::txn_commit() {
    txn_active_ = false;
    for (const auto & [s, head] : txn_open_) {
        cells_[s].journal_commit();
        txn_open_flag_[s] = 0;
    }
    txn_open_.clear();
}

void kv_cache::txn_rollback() {
    txn_active_ = false;
    for (const auto & [s, head] : txn_open_) {
        cells_[s].journal_rollback();
        heads_[s]         = head;
        txn_open_flag_[s] = 0;
    }
    txn_open_.clear();
}

// -- placement ----------------------------------------------------------------------------------

bool kv_cache::split_batch(batch_allocr & balloc, uint32_t n_ubatch, std::vector<ubatch> & out) const {
    out.clear();
    balloc.split_reset();
    while (true) {
        ubatch ub = n_stream_ == 1 ? balloc.split_simple(n_ubatch) : balloc.split_equal(n_ubatch, true, 0);
        if (ub.empty()) {
            break;
        }
        out.push_back(std::move(ub));
    }
    return balloc.n_used() >= balloc.n_tokens();
}

void kv_cache::check_ubatch(const ubatch & ub) const {
    if (ub.n_tokens == 0 || !ub.data) {
        bad_arg("cannot place an empty ubatch");
    }
    const auto & d = *ub.data;
    if (d.pos.size() < size_t(ub.n_pos) * ub.n_tokens || d.seq_id_off.size() < size_t(ub.n_tokens) + 1 ||
        d.seq_id_unq.empty()) {
        bad_arg("malformed ubatch (arrays shorter than n_tokens)");
    }
    for (uint32_t k = 0; k < ub.n_tokens; ++k) {
        if (ub.pos(k) < 0) {
            bad_arg("ubatch token " + std::to_string(k) + " has position " + std::to_string(ub.pos(k)) +
                    "; a KV cache stores positions >= 0 only");
        }
        const int32_t n = ub.n_seq_id(k);
        if (n < 1) {
            bad_arg("ubatch token " + std::to_string(k) + " belongs to no sequence");
        }
        const int32_t * ids = ub.seq_ids(k);
        for (int32_t j = 0; j < n; ++j) {
            if (ids[j] < 0 || ids[j] >= p_.n_seq_max) {
                bad_arg("ubatch token " + std::to_string(k) + " has seq_id " + std::to_string(ids[j]) +
                        " outside [0, " + std::to_string(p_.n_seq_max) + ")");
            }
        }
    }
    if (n_stream_ > 1) {
        const uint32_t n_unq = uint32_t(d.seq_id_unq.size());
        if (ub.n_tokens % n_unq != 0) {
            bad_arg("a ubatch for per-sequence streams must have the same number of tokens per sequence");
        }
        const uint32_t n = ub.n_tokens / n_unq;
        for (uint32_t g = 0; g < n_unq; ++g) {
            for (uint32_t k = g * n; k < (g + 1) * n; ++k) {
                if (ub.n_seq_id(k) != 1 || ub.primary(k) != d.seq_id_unq[g]) {
                    bad_arg("a ubatch for per-sequence streams must group its tokens by sequence, one sequence each");
                }
            }
        }
    }
}

namespace {

// is_masked_swa for a query at the position after `last` (the next position of a sequence that
// ends at `last`), computed in int64: a sequence may end at INT32_MAX, where last + 1 overflows
// int32 (found by the structure-aware state fuzzer: a sequence state placing a cell there).
bool masked_for_next(uint32_t n_swa, swa_type type, int32_t p0, int32_t last) {
    if (last < std::numeric_limits<int32_t>::max()) {
        return is_masked_swa(n_swa, type, p0, last + 1);
    }
    const int64_t p1 = int64_t(last) + 1;
    switch (type) {
        case swa_type::NONE:      return false;
        case swa_type::STANDARD:  return p1 - p0 >= int64_t(n_swa);
        case swa_type::CHUNKED:   return int64_t(p0) < (p1 / n_swa) * n_swa;
        case swa_type::SYMMETRIC: return p1 - p0 > int64_t(n_swa / 2);  // p1 > every int32 p0
    }
    return false;
}

} // namespace

bool kv_cache::find_slot(const ubatch & ub, bool cont, slot_info & out) const {
    out.clear();
    const auto &   unq      = ub.data->seq_id_unq;
    const uint32_t n_groups = n_stream_ == 1 ? 1u : uint32_t(unq.size());
    const uint32_t n        = ub.n_tokens / n_groups;
    const uint32_t size     = p_.kv_size;
    out.n_per_group         = n;
    for (uint32_t g = 0; g < n_groups; ++g) {
        const uint32_t   S = n_stream_ == 1 ? 0u : seq_to_stream(unq[g]);
        const kv_cells & T = cells_[S];
        uint32_t         h = heads_[S];
        if (uint64_t(h) > uint64_t(T.used_count()) + 2ull * n) {
            h = 0;  // llama.cpp's restart heuristic: many cells were freed behind the head
        }
        if (n > size) {
            out.clear();
            return false;
        }
        const size_t start = out.idxs.size();
        if (!cont && p_.swa == swa_type::NONE) {
            // Only empty cells are usable: take the first n in cyclic order from h.
            uint32_t got = T.collect_empty(h, size, n, out.idxs);
            if (got < n) {
                got += T.collect_empty(0, h, n - got, out.idxs);
            }
            if (got < n) {
                out.clear();
                return false;
            }
        } else {
            uint32_t       tested = 0;
            const uint32_t step   = cont ? n : 1;
            bool           found  = false;
            while (true) {
                if (uint64_t(h) + step > size) {
                    tested += size - h;
                    h = 0;
                    continue;
                }
                for (uint32_t k = 0; k < step; ++k) {
                    const uint32_t c = h++;
                    ++tested;
                    bool usable = T.is_empty(c);
                    if (!usable && T.seq_count(c) == 1) {
                        const int32_t t = T.seq_get(c);
                        usable = masked_for_next(p_.n_swa, p_.swa, T.pos_get(c), T.seq_pos_max(t));
                    }
                    if (usable) {
                        out.idxs.push_back(c);
                    } else if (cont) {
                        break;
                    }
                }
                if (out.idxs.size() - start == n) {
                    found = true;
                    break;
                }
                if (cont) {
                    out.idxs.resize(start);
                }
                if (tested >= size) {
                    break;
                }
            }
            if (!found) {
                out.clear();
                return false;
            }
        }
        out.strm.push_back(S);
    }
    return true;
}

void kv_cache::apply_ubatch(const slot_info & slot, const ubatch & ub) {
    const uint32_t n       = slot.n_per_group;
    const bool     two_d   = ub.n_pos >= 3;
    const bool     set_ext = with_ext_ && (two_d || ub.has_token());
    // one sequence per token (no entry lists several): empty cells take their tokens in one pass
    const bool one_seq_each = ub.data->seq_id.size() == ub.n_tokens && !set_ext;
    max_rm_seqs_.clear();
    for (uint32_t g = 0; g < slot.n_groups(); ++g) {
        kv_cells & T = wcells(slot.strm[g]);
        uint32_t   k = 0;
        if (one_seq_each) {
            const uint32_t at = g * n;  // the entry seq_id_off[at] is `at` when every entry has one id
            k = T.occupy_each(slot.idxs.data() + at, ub.data->pos.data() + at, ub.data->seq_id.data() + at, n);
        }
        for (; k < n; ++k) {
            const uint32_t i = g * n + k;
            const uint32_t c = slot.idxs[i];
            if (!T.is_empty(c)) {
                // Reusing a cell masked by the sliding window: remember the newest position
                // each evicted sequence loses, so older ones can be purged below.
                uint32_t        ns  = 0;
                const int32_t * ids = T.seq_list(c, ns);
                for (uint32_t j = 0; j < ns; ++j) {
                    const int32_t t = ids[j];
                    if (max_rm_[t] == -1) {
                        max_rm_seqs_.push_back(t);
                    }
                    max_rm_[t] = std::max(max_rm_[t], T.pos_get(c));
                }
                T.rm(c);
            }
            const int32_t   nid = ub.n_seq_id(i);
            const int32_t * ids = ub.seq_ids(i);
            if (nid == 1) {
                T.occupy(c, ub.pos(i), ids[0]);  // the usual token: one sequence
            } else {
                T.pos_set(c, ub.pos(i));
                for (int32_t j = 0; j < nid; ++j) {
                    T.seq_add(c, ids[j]);
                }
            }
            if (set_ext) {
                cell_ext e;
                if (two_d) {
                    e.x = ub.pos(2, i);
                    e.y = ub.pos(1, i);
                }
                if (ub.has_token()) {
                    e.tok = ub.data->token[i];
                }
                T.ext_set(c, e);
            }
        }
    }
    // Keep each evicted sequence's positions contiguous: drop what is older than the evicted cell.
    std::sort(max_rm_seqs_.begin(), max_rm_seqs_.end());
    for (const int32_t t : max_rm_seqs_) {
        kv_cells &    T  = wcells(seq_to_stream(t));
        const int32_t mn = T.seq_pos_min(t);
        if (mn != -1 && mn <= max_rm_[t]) {
            // [mn, max_rm] inclusive; at INT32_MAX the half-open end cannot pass it (POS_OPEN)
            const int32_t end = max_rm_[t] == POS_OPEN ? POS_OPEN : max_rm_[t] + 1;
            T.seq_rm_range(t, mn, end);
        }
        max_rm_[t] = -1;
    }
    for (uint32_t g = 0; g < slot.n_groups(); ++g) {
        heads_[slot.strm[g]] = slot.idxs[g * n + n - 1] + 1;
    }
}

bool kv_cache::slot_still_valid(const slot_info & slot, const ubatch & ub) const {
    const uint32_t n = slot.n_per_group;
    if (size_t(n) * slot.n_groups() != ub.n_tokens || slot.idxs.size() != ub.n_tokens) {
        return false;
    }
    for (uint32_t g = 0; g < slot.n_groups(); ++g) {
        if (slot.strm[g] >= n_stream_) {
            return false;
        }
        const kv_cells & T = cells_[slot.strm[g]];
        for (uint32_t k = 0; k < n; ++k) {
            const uint32_t c = slot.idxs[g * n + k];
            if (c >= p_.kv_size) {
                return false;
            }
            if (T.is_empty(c)) {
                continue;
            }
            if (T.seq_count(c) != 1 ||
                !masked_for_next(p_.n_swa, p_.swa, T.pos_get(c), T.seq_pos_max(T.seq_get(c)))) {
                return false;
            }
        }
    }
    return true;
}

bool kv_cache::prepare_into(const std::vector<ubatch> & ubatches, std::vector<slot_info> & slots) {
    for (const auto & ub : ubatches) {
        check_ubatch(ub);
    }
    slots.resize(ubatches.size());
    bool ok = true;
    txn_begin();
    try {
        for (size_t u = 0; u < ubatches.size(); ++u) {
            if (!find_slot(ubatches[u], false, slots[u])) {
                ok = false;
                break;
            }
            // Later ubatches must see this one; nothing looks past the last, so skip its
            // apply (and undo): a one-ubatch decode step costs one slot search.
            if (u + 1 < ubatches.size()) {
                apply_ubatch(slots[u], ubatches[u]);
            }
        }
    } catch (...) {
        txn_rollback();
        throw;
    }
    txn_rollback();
    if (!ok) {
        slots.clear();
    }
    return ok;
}

std::vector<slot_info> kv_cache::prepare(const std::vector<ubatch> & ubatches) {
    std::vector<slot_info> slots;
    prepare_into(ubatches, slots);
    return slots;
}

uint32_t kv_cache::get_n_kv(const slot_info & slot) const {
    const uint32_t P      = std::max<uint32_t>(p_.n_pad, 256);
    uint32_t       result = 0;
    for (const uint32_t s : slot.strm) {
        const uint32_t u  = cells_[s].used_max_p1();
        const uint64_t up = (uint64_t(u) + P - 1) / P * P;
        result = std::max(result, uint32_t(std::min<uint64_t>(p_.kv_size, std::max<uint64_t>(P, up))));
    }
    return result;
}

// -- attention inputs: kv_attention.cpp -------------------------------------------------------

// -- updates ------------------------------------------------------------------------------------

void kv_cache::copy_stream(uint32_t src, uint32_t dst) {
    for (uint32_t l = 0; l < n_layer(); ++l) {
        if (k_[l]) {
            const size_t b = size_t(p_.kv_size) * k_row_bytes(l);
            std::memmove(k_[l] + dst * b, k_[l] + src * b, b);
        }
        if (v_[l]) {
            const size_t b = v_buffer_bytes(l) / n_stream_;
            std::memmove(v_[l] + dst * b, v_[l] + src * b, b);
        }
    }
}

void kv_cache::apply_k_shift() {
    // seq_add gives every cell of a sequence the same delta, so the shifted cells come in long
    // runs of one delta: each run is rotated layer by layer over its contiguous K rows, with the
    // tables built once per run.
    const auto &       r           = p_.rope;
    int32_t            table_delta = 0;
    std::vector<float> cs, sn, buf;
    for (uint32_t s = 0; s < n_stream_; ++s) {
        const kv_cells & T = cells_[s];
        uint32_t         i = T.next_used(0);
        while (i < p_.kv_size) {
            const int32_t d   = T.shift_get(i);
            uint32_t      end = i + 1;
            while (end < p_.kv_size && !T.is_empty(end) && T.shift_get(end) == d) {
                ++end;
            }
            if (d != 0) {
                if (cs.empty() || d != table_delta) {
                    rope_tables(r, d, cs, sn);
                    table_delta = d;
                }
                for (uint32_t l = 0; l < n_layer(); ++l) {
                    if (uint8_t * row = k_row_mut(l, s, i)) {
                        rotate_k_rows(row, end - i, k_row_bytes(l), p_.type_k, p_.n_embd_k[l], r, p_.n_rot_k,
                                      cs.data(), sn.data(), buf);
                    }
                }
            }
            i = end < p_.kv_size ? T.next_used(end) : p_.kv_size;
        }
    }
}

// A quantized K with an attention rotation is shifted by undoing the rotation over chunks of
// n_rot_k values of each head: the size must be a power of two dividing the head size (llama.cpp's
// always is; a caller's n_rot_k may be anything, and would otherwise shift K silently wrong).
void kv_cache::check_k_shift_rotation() const {
    const uint32_t n = p_.n_rot_k;
    if (n == 0 || !is_quantized(p_.type_k)) {
        return;
    }
    if (n < 4 || (n & (n - 1)) != 0 || p_.rope.head_dim == 0 || p_.rope.head_dim % n != 0) {
        throw error("cannot apply a K-shift: the attention rotation size n_rot_k " + std::to_string(n) +
                    " must be a power of two (at least 4) dividing the head size " +
                    std::to_string(p_.rope.head_dim));
    }
}

void kv_cache::update() {
    const bool do_shift = get_has_shift();
    if (do_shift) {
        if (!get_can_shift()) {
            throw error("cannot apply a K-shift: this cache holds M-RoPE positions (n_pos_per_embd > 1)");
        }
        if (!p_.rope.enabled) {
            throw error("cannot apply a K-shift: positions were shifted (seq_add/seq_div) but the cache was "
                        "built without a rope description");
        }
        check_k_shift_rotation();
    }
    for (const auto & c : pending_) {
        copy_stream(c.src, c.dst);
    }
    pending_.clear();
    if (do_shift) {
        apply_k_shift();
        for (auto & c : cells_) {
            c.reset_shift();
        }
        ++counters_.k_shifts;
    }
}

// -- state --------------------------------------------------------------------------------------

namespace detail {
// A run of consecutive cells of a stream: `len` cells from `cell`, at `first` in the state's
// cell order. A sequence's cells are usually one or a few runs, so its rows move in a few large
// copies; the runs are found once per stream, not once per layer or per V column.
struct cell_run {
    size_t   first;
    uint32_t cell;
    uint32_t len;
};
} // namespace detail

struct kv_cache::parsed_state {
    struct stream {
        uint32_t                     cell_count = 0;
        // A sequence state's cell records all have one size: they stay in the caller's bytes
        // (recs, rec_size) and are read from there. A whole-cache state is unpacked below.
        const uint8_t *              recs     = nullptr;
        size_t                       rec_size = 0;
        std::vector<int32_t>         pos;
        std::vector<cell_ext>        ext;
        std::vector<uint32_t>        seq_off;  // [cell_count + 1]
        std::vector<int32_t>         seqs;
        std::vector<const uint8_t *> k_data;   // per layer
        std::vector<const uint8_t *> v_data;   // per layer
        slot_info                    slot;     // where a sequence state goes (after place)

        void reset() {
            cell_count = 0;
            recs       = nullptr;
            rec_size   = 0;
            pos.clear();
            ext.clear();
            seq_off.clear();
            seqs.clear();
            k_data.clear();
            v_data.clear();
            slot.clear();
        }
        int32_t pos_at(uint32_t c) const {
            if (recs == nullptr) {
                return pos[c];
            }
            int32_t p;
            std::memcpy(&p, recs + c * rec_size, sizeof(p));
            return p;
        }
        cell_ext ext_at(uint32_t c) const {
            if (recs == nullptr) {
                return ext[c];
            }
            cell_ext        e;
            const uint8_t * r = recs + c * rec_size + 2 * sizeof(int32_t);
            std::memcpy(&e.x, r, sizeof(int32_t));
            std::memcpy(&e.y, r + 4, sizeof(int32_t));
            std::memcpy(&e.tok, r + 8, sizeof(int32_t));
            return e;
        }
    };
    int32_t             seq = -1;
    std::vector<stream> streams;
};

namespace {

// Parsed states of finished reads, per thread, so a warm read allocates nothing. One that grew
// for a large whole-cache state is dropped instead of being kept.
std::vector<std::unique_ptr<kv_cache::parsed_state>> & parsed_pool() {
    thread_local std::vector<std::unique_ptr<kv_cache::parsed_state>> pool;
    return pool;
}

std::unique_ptr<kv_cache::parsed_state> take_parsed() {
    auto & pool = parsed_pool();
    if (pool.empty()) {
        return std::make_unique<kv_cache::parsed_state>();
    }
    auto ps = std::move(pool.back());
    pool.pop_back();
    return ps;
}

void give_back(std::unique_ptr<kv_cache::parsed_state> ps) {
    constexpr size_t keep_cells = 1u << 16;
    for (const auto & st : ps->streams) {
        if (st.pos.capacity() > keep_cells || st.seqs.capacity() > keep_cells || st.slot.idxs.capacity() > keep_cells) {
            return;
        }
    }
    if (parsed_pool().size() < 4) {
        parsed_pool().push_back(std::move(ps));
    }
}

} // namespace

namespace {

using detail::cell_run;

inline void add_cell(std::vector<cell_run> & runs, size_t k, uint32_t c) {
    if (!runs.empty() && runs.back().cell + runs.back().len == c) {
        ++runs.back().len;
    } else {
        runs.push_back({ k, c, 1 });
    }
}

// Scratch of the state writer and reader, per thread: the writer is const and may run on several
// threads at once, and a warm call allocates nothing.
std::vector<cell_run> & scratch_runs() {
    thread_local std::vector<cell_run> runs;
    runs.clear();
    return runs;
}

std::vector<uint32_t> & scratch_sel() {
    thread_local std::vector<uint32_t> sel;
    sel.clear();
    return sel;
}

// The cells of a stream's runs appended to a hole log once; returns where they start.
size_t log_cells(state_hole_log & log, const std::vector<cell_run> & runs) {
    const size_t at = log.cells.size();
    for (const cell_run & r : runs) {
        for (uint32_t k = 0; k < r.len; ++k) {
            log.cells.push_back(r.cell + k);
        }
    }
    return at;
}

// Plain stores into the output, with a cursor.
struct byte_writer {
    uint8_t * at;
    template <typename T> void put(T v) {
        std::memcpy(at, &v, sizeof(T));
        at += sizeof(T);
    }
    uint8_t * block(size_t k) {
        uint8_t * b = at;
        at += k;
        return b;
    }
};

template <typename T> T load(const uint8_t * p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

} // namespace

// The cells a state of seq (-1: every used cell) holds in stream s, as runs in increasing cell
// order; returns their number. A sequence's index is in (pos, cell) order, which is cell order
// when its tokens went in in order: then the runs come straight from it, without a sorted copy.
size_t kv_cache::state_cells(uint32_t s, int32_t seq, std::vector<cell_run> & runs) const {
    const kv_cells & T = cells_[s];
    size_t           n = 0;
    if (seq == -1) {
        for (uint32_t i = T.next_used(0); i < p_.kv_size; i = T.next_used(i + 1)) {
            add_cell(runs, n++, i);
        }
        return n;
    }
    if (seq >= p_.n_seq_max || seq_to_stream(seq) != s) {
        return 0;
    }
    const std::vector<uint64_t> & idx = T.seq_index(seq);
    if (p_.swa == swa_type::NONE) {
        uint32_t prev   = 0;
        bool     sorted = true;
        for (const uint64_t k : idx) {
            const uint32_t c = kv_cells::key_cell(k);
            if (n > 0 && c < prev) {
                sorted = false;
                break;
            }
            add_cell(runs, n++, c);
            prev = c;
        }
        if (sorted) {
            return n;
        }
        runs.clear();
        n = 0;
    }
    std::vector<uint32_t> & sel  = scratch_sel();
    const int32_t           pmax = T.seq_pos_max(seq);
    for (const uint64_t k : idx) {
        if (!is_masked_swa(p_.n_swa, p_.swa, kv_cells::key_pos(k), pmax)) {
            sel.push_back(kv_cells::key_cell(k));
        }
    }
    if (!std::is_sorted(sel.begin(), sel.end())) {
        std::sort(sel.begin(), sel.end());
    }
    for (const uint32_t c : sel) {
        add_cell(runs, n++, c);
    }
    return n;
}

// Bytes of one stream's section after its cell count: the cell records (ids: the number of
// sequence ids they list) and, when there are cells, the K and V sections.
size_t kv_cache::state_stream_bytes(size_t n_cells, size_t n_ids) const {
    if (n_cells == 0) {
        return 0;
    }
    size_t b = n_cells * (2 * sizeof(int32_t) + (with_ext_ ? 3 * sizeof(int32_t) : 0)) + n_ids * sizeof(int32_t);
    b += 2 * sizeof(uint32_t);
    if (p_.state_format >= KV_STATE_FORMAT_B11549) {
        b += 2 * sizeof(uint32_t);  // n_rot_k, n_rot_v
    }
    const size_t es = v_elem_bytes(p_);
    for (uint32_t l = 0; l < n_layer(); ++l) {
        b += sizeof(int32_t) + sizeof(uint64_t) + k_row_bytes(l) * n_cells;
        b += sizeof(int32_t) + (p_.v_trans ? 2 * sizeof(uint32_t) + es * p_.n_embd_v[l] * n_cells
                                           : sizeof(uint64_t) + v_row_bytes(l) * n_cells);
    }
    return b;
}

uint32_t kv_cache::stream_section_format(const uint8_t * data, size_t n, size_t off, uint32_t n_lay) const {
    if (n_lay == 0 || n_layer() == 0) {
        return p_.state_format;  // no layer follows to tell the formats apart
    }
    // After n_layer, format 3 goes on with layer 0's K type and row size, format 4 with n_rot_k
    // and n_rot_v first. Whichever layout finds this cache's K type and row size there is the
    // format; when both do (possible only for an f32 K with tiny rows), the configured one.
    const auto k_header_at = [&](size_t at) {
        if (n - off < at + 12) {
            return false;
        }
        int32_t  type;
        uint64_t rb;
        std::memcpy(&type, data + off + at, 4);
        std::memcpy(&rb, data + off + at + 4, 8);
        return type == p_.type_k && rb == k_row_bytes(0);
    };
    const bool v3 = k_header_at(0);
    const bool v4 = k_header_at(8);
    if (v3 != v4) {
        return v4 ? KV_STATE_FORMAT_B11549 : KV_STATE_FORMAT_B11312;
    }
    return p_.state_format;
}

size_t kv_cache::state_write_size(int32_t seq) const {
    if (seq != -1) {
        check_seq(seq, "state_write");
    }
    size_t b = sizeof(uint32_t);
    for (uint32_t s = 0; s < n_stream_; ++s) {
        const kv_cells & T = cells_[s];
        size_t           n = 0, ids = 0;
        if (seq == -1) {
            n = T.used_count();
            for (uint32_t i = T.next_used(0); i < p_.kv_size; i = T.next_used(i + 1)) {
                ids += T.seq_count(i);
            }
        } else if (seq < p_.n_seq_max && seq_to_stream(seq) == s) {
            // counted without building the cell list: every record lists the one id
            const std::vector<uint64_t> & idx = T.seq_index(seq);
            if (p_.swa == swa_type::NONE) {
                n = idx.size();
            } else {
                const int32_t pmax = T.seq_pos_max(seq);
                for (const uint64_t k : idx) {
                    n += is_masked_swa(p_.n_swa, p_.swa, kv_cells::key_pos(k), pmax) ? 0 : 1;
                }
            }
            ids = n;
        }
        b += sizeof(uint32_t) + state_stream_bytes(n, ids);
    }
    return b;
}

void kv_cache::state_write(uint8_t * out, size_t n, int32_t seq) const {
    if (n != state_write_size(seq)) {
        throw std::invalid_argument("state_write: the output must hold exactly state_write_size() bytes");
    }
    write_state(out, seq);
}

void kv_cache::state_write(std::vector<uint8_t> & out, int32_t seq) const {
    const size_t at = out.size();
    const size_t n  = state_write_size(seq);
    out.resize(at + n);
    write_state(out.data() + at, seq);
}

size_t kv_cache::state_write_into(uint8_t * out, size_t cap, int32_t seq) const {
    const size_t n = state_write_size(seq);
    if (cap < n) {
        throw std::invalid_argument("state_write_into: the buffer holds " + std::to_string(cap) +
                                    " bytes, the state needs " + std::to_string(n));
    }
    write_state(out, seq);
    return n;
}

void kv_cache::write_state(uint8_t * dst, int32_t seq) const {
    if (seq != -1) {
        check_seq(seq, "state_write");
    }
    const bool              rotate = p_.rope.enabled && get_can_shift();
    if (rotate && get_has_shift()) {
        check_k_shift_rotation();  // before any byte is written
    }
    std::vector<cell_run> & runs   = scratch_runs();
    std::vector<float>      cs, sn, buf;
    const size_t            es     = v_elem_bytes(p_);
    byte_writer             out{ dst };

    state_hole_log * log = active_state_hole_log();
    out.put(uint32_t(n_stream_));
    for (uint32_t s = 0; s < n_stream_; ++s) {
        const kv_cells & T = cells_[s];
        runs.clear();
        const size_t n = state_cells(s, seq, runs);
        out.put(uint32_t(n));
        if (n == 0) {
            continue;
        }
        size_t logged_at = SIZE_MAX;  // this stream's cells in the hole log, once a hole needs them
        // A buffer-less layer's section stays zero; with a log open, it is reported for the
        // storage that holds the tensor to fill.
        const auto hole = [&](const uint8_t * at, size_t len, uint32_t l, hole_kind kind, uint32_t src_stream,
                              uint32_t n_cols) {
            if (log == nullptr) {
                return;
            }
            if (logged_at == SIZE_MAX) {
                logged_at = log_cells(*log, runs);
            }
            log->holes.push_back({ this, at, len, l, kind, src_stream, s, n_cols, logged_at, n });
        };
        for (const cell_run & r : runs) {
            for (uint32_t i = r.cell; i < r.cell + r.len; ++i) {
                out.put(int32_t(T.pos_get(i)));
                uint32_t        ns  = 1;
                const int32_t * ids = seq == -1 ? T.seq_list(i, ns) : &seq;
                out.put(ns);
                if (with_ext_) {
                    const cell_ext e = T.ext_get(i);
                    out.put(int32_t(e.x));
                    out.put(int32_t(e.y));
                    out.put(int32_t(e.tok));
                }
                if (ns > 0) {  // a restored cell may list no sequence (ids is null then)
                    std::memcpy(out.block(ns * sizeof(int32_t)), ids, ns * sizeof(int32_t));
                }
            }
        }
        // The bytes a stream will hold once pending whole-stream copies have run.
        uint32_t src = s;
        for (auto it = pending_.rbegin(); it != pending_.rend(); ++it) {
            if (it->dst == src) {
                src = it->src;
            }
        }
        out.put(uint32_t(p_.v_trans ? 1u : 0u));
        out.put(uint32_t(n_layer()));
        if (p_.state_format >= KV_STATE_FORMAT_B11549) {
            out.put(uint32_t(p_.n_rot_k));
            out.put(uint32_t(p_.n_rot_v));
        }
        for (uint32_t l = 0; l < n_layer(); ++l) {
            const size_t rb = k_row_bytes(l);
            out.put(int32_t(p_.type_k));
            out.put(uint64_t(rb));
            uint8_t * w = out.block(rb * n);
            if (!k_[l]) {
                std::memset(w, 0, rb * n);
                hole(w, rb * n, l, hole_kind::K_ROWS, src, 0);
                continue;
            }
            for (const cell_run & r : runs) {
                std::memcpy(w + r.first * rb, k_row(l, src, r.cell), r.len * rb);
            }
            if (rotate && T.has_shift()) {
                for (const cell_run & r : runs) {
                    for (uint32_t k = 0; k < r.len; ++k) {
                        const int32_t d = T.shift_get(r.cell + k);
                        if (d != 0) {
                            // A pending shift is saved as if applied: the positions written are
                            // the shifted ones, so the K rows must match them.
                            rope_tables(p_.rope, d, cs, sn);
                            rotate_k_rows(w + (r.first + k) * rb, 1, rb, p_.type_k, p_.n_embd_k[l], p_.rope,
                                          p_.n_rot_k, cs.data(), sn.data(), buf);
                        }
                    }
                }
            }
        }
        for (uint32_t l = 0; l < n_layer(); ++l) {
            out.put(int32_t(p_.type_v));
            if (!p_.v_trans) {
                const size_t rb = v_row_bytes(l);
                out.put(uint64_t(rb));
                uint8_t * w = out.block(rb * n);
                if (!v_[l]) {
                    std::memset(w, 0, rb * n);
                    hole(w, rb * n, l, hole_kind::V_ROWS, src, 0);
                    continue;
                }
                const uint8_t * base = v_[l] + size_t(src) * p_.kv_size * rb;
                for (const cell_run & r : runs) {
                    std::memcpy(w + r.first * rb, base + size_t(r.cell) * rb, r.len * rb);
                }
            } else {
                const uint32_t ne = p_.n_embd_v[l];
                out.put(uint32_t(es));
                out.put(uint32_t(ne));
                uint8_t * w = out.block(size_t(ne) * n * es);
                if (!v_[l]) {
                    std::memset(w, 0, size_t(ne) * n * es);
                    hole(w, size_t(ne) * n * es, l, hole_kind::V_TRANS, src, ne);
                    continue;
                }
                for (uint32_t j = 0; j < ne; ++j) {
                    const uint8_t * col = v_[l] + (size_t(src) * p_.n_embd_v_max + j) * p_.kv_size * es;
                    for (const cell_run & r : runs) {
                        std::memcpy(w, col + size_t(r.cell) * es, r.len * es);
                        w += r.len * es;
                    }
                }
            }
        }
    }
}

std::unique_ptr<kv_cache::parsed_state> kv_cache::state_parse(const uint8_t * data, size_t n, size_t & off,
                                                             int32_t seq) const {
    if (seq != -1) {
        check_seq(seq, "state_read");
        if (seq >= p_.n_seq_max) {
            bad_arg("state_read: seq_id " + std::to_string(seq) + " is not below n_seq_max " +
                    std::to_string(p_.n_seq_max));
        }
    }
    auto ps = take_parsed();
    ps->seq = seq;
    reader rd{ data, n, off };
    const uint32_t n_stream = rd.get<uint32_t>("n_stream");
    if (n_stream != n_stream_) {
        throw state_error("n_stream mismatch: the state has " + std::to_string(n_stream) + " streams, the cache " +
                          std::to_string(n_stream_), state_reject::CONFIG_MISMATCH);
    }
    ps->streams.resize(n_stream);
    for (auto & st : ps->streams) {
        st.reset();
    }
    for (uint32_t s = 0; s < n_stream; ++s) {
        auto &         st = ps->streams[s];
        const uint32_t cc = rd.get<uint32_t>("cell_count");
        st.cell_count     = cc;
        if (cc == 0) {
            continue;
        }
        if (cc > p_.kv_size) {
            throw state_error("the state has " + std::to_string(cc) + " cells in stream " + std::to_string(s) +
                              ", more than the cache size " + std::to_string(p_.kv_size), state_reject::CONFIG_MISMATCH);
        }
        // every cell takes at least its position and id count (and ext) in the bytes: a count the
        // remaining bytes cannot hold is refused before the per-cell arrays are sized by it
        const size_t min_cell_bytes = 8 + (with_ext_ ? 12 : 0);
        if (cc > (n - off) / min_cell_bytes) {
            throw state_error("state bytes end too early: stream " + std::to_string(s) + " claims " +
                              std::to_string(cc) + " cells, the " + std::to_string(n - off) +
                              " bytes left hold at most " + std::to_string((n - off) / min_cell_bytes));
        }
        const size_t rec = min_cell_bytes + sizeof(int32_t);
        if (seq != -1 && size_t(cc) * rec <= n - off) {
            // Every record is there: check them in place (the same checks, in the same order, as
            // the loop below, which is left for bytes that end early and reports where).
            const uint8_t * p = data + off;
            for (uint32_t c = 0; c < cc; ++c, p += rec) {
                const int32_t  pos   = load<int32_t>(p);
                const uint32_t n_seq = load<uint32_t>(p + 4);
                if (pos < 0) {
                    throw state_error("cell " + std::to_string(c) + " has position " + std::to_string(pos));
                }
                if (n_seq != 1) {
                    throw state_error("a sequence state must list exactly one sequence per cell, cell " +
                                      std::to_string(c) + " lists " + std::to_string(n_seq));
                }
            }
            st.recs     = data + off;
            st.rec_size = rec;
            off += size_t(cc) * rec;
        } else {
            st.pos.resize(cc);
            st.seq_off.assign(size_t(cc) + 1, 0);
            if (with_ext_) {
                st.ext.resize(cc);
            }
            for (uint32_t c = 0; c < cc; ++c) {
                const int32_t  pos   = rd.get<int32_t>("cell pos");
                const uint32_t n_seq = rd.get<uint32_t>("cell n_seq_id");
                if (pos < 0) {
                    throw state_error("cell " + std::to_string(c) + " has position " + std::to_string(pos));
                }
                st.pos[c] = pos;
                if (seq != -1 && n_seq != 1) {
                    throw state_error("a sequence state must list exactly one sequence per cell, cell " +
                                      std::to_string(c) + " lists " + std::to_string(n_seq));
                }
                if (n_seq > uint32_t(p_.n_seq_max)) {
                    throw state_error("cell " + std::to_string(c) + " lists " + std::to_string(n_seq) +
                                      " sequences, more than n_seq_max");
                }
                if (with_ext_) {
                    cell_ext e;
                    e.x   = rd.get<int32_t>("cell ext");
                    e.y   = rd.get<int32_t>("cell ext");
                    e.tok = rd.get<int32_t>("cell ext");
                    st.ext[c] = e;
                }
                for (uint32_t j = 0; j < n_seq; ++j) {
                    const int32_t id = rd.get<int32_t>("cell seq_id");
                    if (seq == -1) {
                        if (id < 0 || id >= p_.n_seq_max) {
                            throw state_error("invalid seq_id " + std::to_string(id) + " in the state (n_seq_max " +
                                              std::to_string(p_.n_seq_max) + ")", state_reject::CONFIG_MISMATCH);
                        }
                        if (!cells_[s].holds_id(id)) {
                            throw state_error("seq_id " + std::to_string(id) + " listed in stream " +
                                              std::to_string(s) + ", which holds sequence " + std::to_string(s) +
                                              " only");
                        }
                        st.seqs.push_back(id);
                    }
                }
                st.seq_off[c + 1] = uint32_t(st.seqs.size());
            }
        }
        const uint32_t v_trans = rd.get<uint32_t>("v_trans");
        const uint32_t n_lay   = rd.get<uint32_t>("n_layer");
        if (n_lay != n_layer()) {
            throw state_error("layer count mismatch: the state has " + std::to_string(n_lay) + ", the cache " +
                              std::to_string(n_layer()), state_reject::CONFIG_MISMATCH);
        }
        if (v_trans > 1 || (v_trans != 0) != p_.v_trans) {
            throw state_error("v_trans mismatch: the state has " + std::to_string(v_trans) + ", the cache " +
                              std::to_string(p_.v_trans ? 1 : 0), state_reject::CONFIG_MISMATCH);
        }
        if (stream_section_format(data, n, off, n_lay) >= KV_STATE_FORMAT_B11549) {
            const uint32_t rot_k = rd.get<uint32_t>("n_rot_k");
            const uint32_t rot_v = rd.get<uint32_t>("n_rot_v");
            if (rot_k != p_.n_rot_k || rot_v != p_.n_rot_v) {
                throw state_error("incompatible attention rotation: the state has n_rot_k " + std::to_string(rot_k) +
                                  ", n_rot_v " + std::to_string(rot_v) + ", the cache " + std::to_string(p_.n_rot_k) +
                                  ", " + std::to_string(p_.n_rot_v));
            }
        }
        st.k_data.resize(n_lay);
        st.v_data.resize(n_lay);
        for (uint32_t l = 0; l < n_lay; ++l) {
            const int32_t  type = rd.get<int32_t>("K type");
            const uint64_t rb   = rd.get<uint64_t>("K row size");
            if (type != p_.type_k) {
                throw state_error("K type mismatch in layer " + std::to_string(l) + ": state " + std::to_string(type) +
                                  ", cache " + std::to_string(p_.type_k), state_reject::CONFIG_MISMATCH);
            }
            if (rb != k_row_bytes(l)) {
                throw state_error("K row size mismatch in layer " + std::to_string(l) + ": state " +
                                  std::to_string(rb) + ", cache " + std::to_string(k_row_bytes(l)), state_reject::CONFIG_MISMATCH);
            }
            st.k_data[l] = rd.take(size_t(rb) * cc, "K rows");
        }
        for (uint32_t l = 0; l < n_lay; ++l) {
            const int32_t type = rd.get<int32_t>("V type");
            if (type != p_.type_v) {
                throw state_error("V type mismatch in layer " + std::to_string(l) + ": state " + std::to_string(type) +
                                  ", cache " + std::to_string(p_.type_v), state_reject::CONFIG_MISMATCH);
            }
            if (!p_.v_trans) {
                const uint64_t rb = rd.get<uint64_t>("V row size");
                if (rb != v_row_bytes(l)) {
                    throw state_error("V row size mismatch in layer " + std::to_string(l) + ": state " +
                                      std::to_string(rb) + ", cache " + std::to_string(v_row_bytes(l)), state_reject::CONFIG_MISMATCH);
                }
                st.v_data[l] = rd.take(size_t(rb) * cc, "V rows");
            } else {
                const uint32_t es = rd.get<uint32_t>("V element size");
                const uint32_t ne = rd.get<uint32_t>("V n_embd");
                if (es != kv_type_size(p_.type_v)) {
                    throw state_error("V element size mismatch in layer " + std::to_string(l), state_reject::CONFIG_MISMATCH);
                }
                if (ne != p_.n_embd_v[l]) {
                    throw state_error("V n_embd mismatch in layer " + std::to_string(l) + ": state " +
                                      std::to_string(ne) + ", cache " + std::to_string(p_.n_embd_v[l]), state_reject::CONFIG_MISMATCH);
                }
                st.v_data[l] = rd.take(size_t(es) * ne * cc, "transposed V");
            }
        }
    }
    return ps;
}

bool kv_cache::state_place(parsed_state & ps) {
    if (ps.seq == -1) {
        return true;
    }
    const int32_t  dest = ps.seq;
    const uint32_t S    = seq_to_stream(dest);
    for (auto & st : ps.streams) {
        if (st.cell_count == 0) {
            continue;
        }
        lower_head(S, wcells(S).seq_rm_range(dest, 0, POS_OPEN));
        ubatch ub;
        ub.n_tokens     = st.cell_count;
        ub.n_seq_tokens = st.cell_count;
        ub.n_seqs       = 1;
        ub.n_seqs_unq   = 1;
        ub.n_pos        = 1;
        ub.equal_seqs   = true;
        ub.data         = std::make_shared<ubatch_data>();
        auto & d        = *ub.data;
        d.pos.resize(st.cell_count);
        for (uint32_t c = 0; c < st.cell_count; ++c) {
            d.pos[c] = st.pos_at(c);
        }
        d.seq_id.assign(st.cell_count, dest);
        d.seq_id_off.resize(size_t(st.cell_count) + 1);
        std::iota(d.seq_id_off.begin(), d.seq_id_off.end(), 0);
        d.seq_id_unq = { dest };
        if (!find_slot(ub, false, st.slot)) {
            return false;
        }
        apply_ubatch(st.slot, ub);
        if (with_ext_) {
            for (uint32_t c = 0; c < st.cell_count; ++c) {
                wcells(S).ext_set(st.slot.idxs[c], st.ext_at(c));
            }
        }
    }
    return true;
}

bool kv_cache::state_direct(const parsed_state & ps) const {
    if (ps.seq == -1) {
        return true;
    }
    // find_slot without a window takes the first free cells from the head, so whether they
    // suffice is a count; with a window, reusable cells depend on the positions placed.
    size_t filled = 0;
    for (const auto & st : ps.streams) {
        filled += st.cell_count != 0 ? 1 : 0;
    }
    return !txn_active_ && p_.swa == swa_type::NONE && filled <= 1;
}

bool kv_cache::state_fits(const parsed_state & ps) const {
    if (ps.seq == -1) {
        return true;
    }
    const kv_cells & T    = cells_[seq_to_stream(ps.seq)];
    size_t           free = size_t(p_.kv_size) - T.used_count();
    for (const uint64_t k : T.seq_index(ps.seq)) {
        // emptied by the removal of [0, POS_OPEN) that precedes the placement: a cell at
        // POS_OPEN (INT32_MAX) stays, as llama.cpp's half-open range keeps it
        const bool removed = kv_cells::key_pos(k) < POS_OPEN;
        free += removed && T.seq_count(kv_cells::key_cell(k)) == 1 ? 1 : 0;
    }
    for (const auto & st : ps.streams) {
        if (st.cell_count > free) {
            return false;
        }
    }
    return true;
}

void kv_cache::state_place_direct(parsed_state & ps) {
    if (ps.seq == -1) {
        return;
    }
    const int32_t  dest = ps.seq;
    const uint32_t S    = seq_to_stream(dest);
    kv_cells &     T    = cells_[S];
    for (auto & st : ps.streams) {
        if (st.cell_count == 0) {
            continue;
        }
        // What state_place does through a ubatch, find_slot and apply_ubatch, on cells known to
        // be free: the same cells, positions, ids and head.
        lower_head(S, T.seq_rm_range(dest, 0, POS_OPEN));
        const uint32_t n    = st.cell_count;
        const uint32_t size = p_.kv_size;
        uint32_t       h    = heads_[S];
        if (uint64_t(h) > uint64_t(T.used_count()) + 2ull * n) {
            h = 0;
        }
        st.slot.clear();
        st.slot.n_per_group = n;
        st.slot.strm.push_back(S);
        st.slot.idxs.resize(n);
        // free cells usually come in long runs: the next cell is tested inline before asking
        // next_empty to skip used ones
        const auto next = [&](uint32_t c) { return c < size && T.is_empty(c) ? c : T.next_empty(c); };
        uint32_t   got  = 0;
        for (uint32_t c = T.next_empty(h); c < size && got < n; c = next(c + 1)) {
            st.slot.idxs[got++] = c;
        }
        for (uint32_t c = got < n ? T.next_empty(0) : h; c < h && got < n; c = next(c + 1)) {
            st.slot.idxs[got++] = c;
        }
        if (got < n) {
            throw std::logic_error("kv_cache: state_place_direct without room (state_fits not checked)");
        }
        std::vector<int32_t> & positions = scratch_positions_;
        positions.resize(n);
        for (uint32_t k = 0; k < n; ++k) {
            positions[k] = st.pos_at(k);
        }
        T.occupy_all(st.slot.idxs.data(), positions.data(), n, dest);
        if (with_ext_) {
            for (uint32_t k = 0; k < n; ++k) {
                T.ext_set(st.slot.idxs[k], st.ext_at(k));
            }
        }
        heads_[S] = st.slot.idxs[n - 1] + 1;
    }
}

void kv_cache::state_commit(parsed_state & ps) {
    const size_t es_v = v_elem_bytes(p_);
    if (ps.seq == -1) {
        pending_.clear();  // every stream's bytes are replaced: earlier copies are moot
        clear(true);
        for (uint32_t s = 0; s < n_stream_; ++s) {
            auto & st = ps.streams[s];
            if (st.cell_count == 0) {
                continue;
            }
            kv_cells & T = cells_[s];
            for (uint32_t c = 0; c < st.cell_count; ++c) {
                T.pos_set(c, st.pos[c]);
                if (with_ext_) {
                    T.ext_set(c, st.ext[c]);
                }
                for (uint32_t j = st.seq_off[c]; j < st.seq_off[c + 1]; ++j) {
                    T.seq_add(c, st.seqs[j]);
                }
            }
            heads_[s] = 0;
            st.slot.clear();
            st.slot.n_per_group = st.cell_count;
            st.slot.strm.push_back(s);
            st.slot.idxs.resize(st.cell_count);
            std::iota(st.slot.idxs.begin(), st.slot.idxs.end(), 0u);
        }
    } else {
        // The restored rows must not be overwritten by an older pending stream copy.
        const uint32_t S = seq_to_stream(ps.seq);
        bool involved = false;
        for (const auto & c : pending_) {
            involved = involved || c.dst == S || c.src == S;
        }
        if (involved) {
            for (const auto & c : pending_) {
                copy_stream(c.src, c.dst);
            }
            pending_.clear();
        }
    }
    std::vector<cell_run> & runs = scratch_runs();
    state_hole_log *        log  = active_state_hole_log();
    for (auto & st : ps.streams) {
        if (st.cell_count == 0) {
            continue;
        }
        const uint32_t S = st.slot.strm[0];
        runs.clear();
        for (uint32_t c = 0; c < st.cell_count; ++c) {
            add_cell(runs, c, st.slot.idxs[c]);
        }
        size_t logged_at = SIZE_MAX;
        // A buffer-less layer's section is reported (with its destination cells) for the storage
        // that holds the tensor to scatter; the bytes are valid and the cells placed by now.
        const auto hole = [&](const uint8_t * at, size_t len, uint32_t l, hole_kind kind, uint32_t n_cols) {
            if (log == nullptr) {
                return;
            }
            if (logged_at == SIZE_MAX) {
                logged_at = log->cells.size();
                log->cells.insert(log->cells.end(), st.slot.idxs.begin(), st.slot.idxs.begin() + st.cell_count);
            }
            log->holes.push_back({ this, at, len, l, kind, S, S, n_cols, logged_at, st.cell_count });
        };
        for (uint32_t l = 0; l < n_layer(); ++l) {
            const size_t rk = k_row_bytes(l);
            if (!k_[l]) {
                hole(st.k_data[l], rk * st.cell_count, l, hole_kind::K_ROWS, 0);
            }
            if (!v_[l]) {
                if (!p_.v_trans) {
                    hole(st.v_data[l], v_row_bytes(l) * st.cell_count, l, hole_kind::V_ROWS, 0);
                } else {
                    hole(st.v_data[l], size_t(p_.n_embd_v[l]) * st.cell_count * es_v, l, hole_kind::V_TRANS,
                         p_.n_embd_v[l]);
                }
            }
            if (k_[l]) {
                for (const cell_run & r : runs) {
                    std::memcpy(k_row_mut(l, S, r.cell), st.k_data[l] + r.first * rk, r.len * rk);
                }
            }
            if (!v_[l]) {
                continue;
            }
            if (!p_.v_trans) {
                const size_t rv = v_row_bytes(l);
                for (const cell_run & r : runs) {
                    std::memcpy(v_[l] + (size_t(S) * p_.kv_size + r.cell) * rv, st.v_data[l] + r.first * rv,
                                r.len * rv);
                }
            } else {
                const uint32_t  ne  = p_.n_embd_v[l];
                const uint8_t * src = st.v_data[l];
                for (uint32_t j = 0; j < ne; ++j) {
                    uint8_t * col = v_[l] + (size_t(S) * p_.n_embd_v_max + j) * p_.kv_size * es_v;
                    for (const cell_run & r : runs) {
                        std::memcpy(col + size_t(r.cell) * es_v, src, r.len * es_v);
                        src += r.len * es_v;
                    }
                }
            }
        }
    }
}

void kv_cache::state_read(const uint8_t * data, size_t n, size_t & off, int32_t seq) {
    kv_cache * self = this;
    off             = kv_state_read_all(&self, 1, data, n, off, seq, false);
}

size_t kv_state_read_all(const std::vector<kv_cache *> & caches, const uint8_t * data, size_t n, size_t off,
                         int32_t seq, bool exact, const std::function<size_t(size_t)> & then) {
    return kv_state_read_all(caches.data(), caches.size(), data, n, off, seq, exact, then);
}

size_t kv_state_read_all(kv_cache * const * caches_p, size_t n_caches, const uint8_t * data, size_t n, size_t off,
                         int32_t seq, bool exact, const std::function<size_t(size_t)> & then) {
    // the parsed states go back to the pool however the read ends
    struct parsed_list {
        std::unique_ptr<kv_cache::parsed_state> one;   // the usual single cache, without a vector
        std::vector<std::unique_ptr<kv_cache::parsed_state>> more;
        ~parsed_list() {
            if (one) {
                give_back(std::move(one));
            }
            for (auto & p : more) {
                give_back(std::move(p));
            }
        }
        kv_cache::parsed_state & operator[](size_t k) { return k == 0 ? *one : *more[k - 1]; }
    } parsed;
    for (size_t k = 0; k < n_caches; ++k) {
        auto ps = caches_p[k]->state_parse(data, n, off, seq);
        if (k == 0) {
            parsed.one = std::move(ps);
        } else {
            parsed.more.push_back(std::move(ps));
        }
    }
    if (exact && !then && off != n) {
        throw state_error(std::to_string(n - off) + " unexpected bytes after the KV state");
    }
    if (!then && n_caches == 1 && caches_p[0]->state_direct(parsed[0])) {
        // Whether the cells fit is known before anything changes: no journal to keep or undo.
        if (!caches_p[0]->state_fits(parsed[0])) {
            throw state_error("failed to restore the sequence state: not enough free cells", state_reject::NO_ROOM);
        }
        caches_p[0]->state_place_direct(parsed[0]);
        caches_p[0]->state_commit(parsed[0]);
        return off;
    }
    struct {
        kv_cache * const * p;
        size_t             n;
        size_t             size() const { return n; }
        kv_cache *         operator[](size_t k) const { return p[k]; }
    } caches{ caches_p, n_caches };
    size_t opened = 0;
    try {
        for (; opened < caches.size(); ++opened) {
            caches[opened]->txn_begin();
            if (!caches[opened]->state_place(parsed[opened])) {
                ++opened;
                throw state_error("failed to restore the sequence state: not enough free cells", state_reject::NO_ROOM);
            }
        }
        if (then) {
            off = then(off);
        }
    } catch (...) {
        for (size_t k = 0; k < opened; ++k) {
            caches[k]->txn_rollback();
        }
        throw;
    }
    for (size_t k = 0; k < caches.size(); ++k) {
        caches[k]->txn_commit();
        caches[k]->state_commit(parsed[k]);
    }
    return off;
}

void kv_cache::zero_cells(uint32_t stream, const std::vector<uint32_t> & idxs) {
    const size_t es_v = v_elem_bytes(p_);
    for (uint32_t l = 0; l < n_layer(); ++l) {
        for (const uint32_t c : idxs) {
            if (uint8_t * row = k_row_mut(l, stream, c)) {
                std::memset(row, 0, k_row_bytes(l));
            }
            if (!v_[l]) {
                continue;
            }
            if (!p_.v_trans) {
                std::memset(v_[l] + (size_t(stream) * p_.kv_size + c) * v_row_bytes(l), 0, v_row_bytes(l));
            } else {
                for (uint32_t j = 0; j < p_.n_embd_v[l]; ++j) {
                    std::memset(v_[l] + ((size_t(stream) * p_.n_embd_v_max + j) * p_.kv_size + c) * es_v, 0, es_v);
                }
            }
        }
    }
}

void kv_cache::state_clear(int32_t seq) {
    if (seq == -1) {
        clear(true);
        return;
    }
    check_seq(seq, "state_clear");
    const uint32_t S = seq_to_stream(seq);
    std::vector<uint32_t> only;
    if (seq < p_.n_seq_max) {
        const kv_cells & T = cells_[S];
        for (const uint64_t k : T.seq_index(seq)) {
            const uint32_t c = kv_cells::key_cell(k);
            if (T.seq_count(c) == 1) {
                only.push_back(c);
            }
        }
    }
    seq_rm(seq, -1, -1);
    zero_cells(S, only);
}

// -- contexts -----------------------------------------------------------------------------------

kv_context::kv_context(memory_status status) : status_(status) {}

kv_context::kv_context(kv_cache & cache, std::vector<slot_info> slots, std::vector<ubatch> ubatches)
    : status_(memory_status::SUCCESS), cache_(&cache), slots_(std::move(slots)), ubatches_(std::move(ubatches)) {
    if (slots_.size() != ubatches_.size()) {
        throw std::invalid_argument("kv_context: one slot per ubatch is required");
    }
}

kv_context::~kv_context() {
    if (cache_ && !is_full_) {
        cache_->release_plan(std::move(slots_), std::move(ubatches_));
    }
}

kv_context::kv_context(kv_context && o) noexcept
    : status_(o.status_), cache_(o.cache_), slots_(std::move(o.slots_)), ubatches_(std::move(o.ubatches_)),
      i_cur_(o.i_cur_), n_kv_(o.n_kv_), is_full_(o.is_full_), applied_(o.applied_) {
    o.cache_ = nullptr;
}

kv_context & kv_context::operator=(kv_context && o) noexcept {
    if (this != &o) {
        if (cache_ && !is_full_) {
            cache_->release_plan(std::move(slots_), std::move(ubatches_));
        }
        status_   = o.status_;
        cache_    = o.cache_;
        slots_    = std::move(o.slots_);
        ubatches_ = std::move(o.ubatches_);
        i_cur_    = o.i_cur_;
        n_kv_     = o.n_kv_;
        is_full_  = o.is_full_;
        applied_  = o.applied_;
        o.cache_  = nullptr;
    }
    return *this;
}

void kv_cache::acquire_plan(std::vector<slot_info> & slots, std::vector<ubatch> & ubatches) {
    std::lock_guard<std::mutex> hold(plan_pool_mutex_.m);
    if (!slot_pool_.empty()) {
        slots = std::move(slot_pool_.back());
        slot_pool_.pop_back();
    }
    if (!ubatch_pool_.empty()) {
        ubatches = std::move(ubatch_pool_.back());
        ubatch_pool_.pop_back();
    }
    ubatches.clear();
}

void kv_cache::release_plan(std::vector<slot_info> && slots, std::vector<ubatch> && ubatches) {
    constexpr size_t keep = 4;
    ubatches.clear();  // drop the ubatch data now, so the allocator can recycle it
    std::lock_guard<std::mutex> hold(plan_pool_mutex_.m);
    if (slots.capacity() > 0 && slot_pool_.size() < keep) {
        slot_pool_.push_back(std::move(slots));
    }
    if (ubatches.capacity() > 0 && ubatch_pool_.size() < keep) {
        ubatch_pool_.push_back(std::move(ubatches));
    }
}

kv_context kv_context::full(kv_cache & cache) {
    kv_context ctx(memory_status::SUCCESS);
    ctx.cache_   = &cache;
    ctx.is_full_ = true;
    ctx.n_kv_    = cache.size();
    slot_info s;
    s.n_per_group = 1;
    for (uint32_t k = 0; k < cache.n_stream(); ++k) {
        s.strm.push_back(k);
        s.idxs.push_back(0);
    }
    ctx.slots_.push_back(std::move(s));
    return ctx;
}

bool kv_context::next() {
    if (i_cur_ < ubatches_.size()) {
        ++i_cur_;
    }
    applied_ = false;
    return i_cur_ < ubatches_.size();
}

bool kv_context::apply() {
    if (is_full_) {
        return true;
    }
    if (status_ != memory_status::SUCCESS || i_cur_ >= ubatches_.size()) {
        throw error("this memory context has no micro-batch to apply");
    }
    if (applied_) {
        throw error("this micro-batch was already applied: call next() first");
    }
    if (!cache_->slot_still_valid(slots_[i_cur_], ubatches_[i_cur_])) {
        // llama.cpp would overwrite live cells here; the plan is stale, refuse it unchanged
        throw error("the KV cache changed since init_batch: the cells planned for this micro-batch "
                    "are no longer free; call init_batch again");
    }
    return apply_just_planned();
}

bool kv_context::apply_just_planned() {
    if (is_full_ || status_ != memory_status::SUCCESS || i_cur_ >= ubatches_.size() || applied_) {
        return apply();  // apply() says what is wrong
    }
    cache_->apply_ubatch(slots_[i_cur_], ubatches_[i_cur_]);
    cache_->count_placed(ubatches_[i_cur_].n_tokens);
    n_kv_    = cache_->get_n_kv(slots_[i_cur_]);
    applied_ = true;
    return true;
}

const ubatch & kv_context::get_ubatch() const {
    if (i_cur_ >= ubatches_.size()) {
        throw error("this memory context has no current micro-batch");
    }
    return ubatches_[i_cur_];
}

const slot_info & kv_context::get_slot() const {
    if (is_full_) {
        return slots_[0];
    }
    if (i_cur_ >= slots_.size()) {
        throw error("this memory context has no current micro-batch");
    }
    return slots_[i_cur_];
}

kv_context kv_init_batch(kv_cache & cache, batch_allocr & balloc, uint32_t n_ubatch) {
    std::vector<ubatch>    ubs;
    std::vector<slot_info> slots;
    cache.acquire_plan(slots, ubs);
    if (!cache.split_batch(balloc, n_ubatch, ubs) || !cache.prepare_into(ubs, slots)) {
        cache.release_plan(std::move(slots), std::move(ubs));
        return kv_context(memory_status::FAILED_PREPARE);
    }
    return kv_context(cache, std::move(slots), std::move(ubs));
}

std::pair<kv_context, kv_context> kv_iswa_init_batch(kv_cache & base, kv_cache & swa, batch_allocr & balloc,
                                                     uint32_t n_ubatch) {
    const bool unified = base.n_stream() == 1;
    for (int attempt = unified ? 0 : 1; attempt < 2; ++attempt) {
        std::vector<ubatch> ubs;
        balloc.split_reset();
        while (true) {
            ubatch ub = attempt == 0 ? balloc.split_simple(n_ubatch) : balloc.split_equal(n_ubatch, !unified, 0);
            if (ub.empty()) {
                break;
            }
            ubs.push_back(std::move(ub));
        }
        if (balloc.n_used() < balloc.n_tokens()) {
            continue;
        }
        std::vector<slot_info> sb, ss;
        if (!base.prepare_into(ubs, sb) || !swa.prepare_into(ubs, ss)) {
            continue;
        }
        std::vector<ubatch> ubs2 = ubs;
        return { kv_context(base, std::move(sb), std::move(ubs)), kv_context(swa, std::move(ss), std::move(ubs2)) };
    }
    return { kv_context(memory_status::FAILED_PREPARE), kv_context(memory_status::FAILED_PREPARE) };
}

} // namespace llmem
