#pragma once

// ggml's element and block types for the K/V cache: the table of what each type is in memory,
// the quantizers (bit for bit ggml's reference ones, ggml-quants.c *_ref) and dequantizers.
// Plain C++: the cache calls them on its buffers, the bindings on validated numpy arrays.

#include <cstddef>
#include <cstdint>

namespace llmem {

/// ggml type ids (the values of ggml_type; they appear in the state bytes) of every type a K/V
/// buffer can hold: the float types and the block types llama.cpp offers for its cache.
enum class ggml_type_id : int32_t {
    F32    = 0,
    F16    = 1,
    Q4_0   = 2,
    Q4_1   = 3,
    Q5_0   = 6,
    Q5_1   = 7,
    Q8_0   = 8,
    IQ4_NL = 20,
    BF16   = 30,
};

/// What one type is in memory: ggml's name, elements per block (1 for the float types) and
/// bytes per block (ggml_blck_size / ggml_type_size).
struct type_traits {
    int32_t     id;
    const char * name;
    uint32_t    blck_size;
    uint32_t    type_size;
    bool        quantized;
};

/// The traits of a type id, or nullptr when llmem does not store that type.
const type_traits * find_type(int32_t type);
/// The table, in ggml id order (n entries).
const type_traits * type_table(size_t & n);
/// ggml_row_size: bytes of a row of n elements. std::invalid_argument for an unknown type or an
/// n that is not a multiple of the block size.
size_t row_size(int32_t type, size_t n);
bool   is_quantized(int32_t type);

/// n floats to one row of `type` (float types: their conversion; block types: ggml's reference
/// quantizer). n must be a multiple of the block size (the caller checked).
void row_from_float(int32_t type, const float * src, uint8_t * dst, size_t n);
/// One row of `type` back to n floats (ggml's dequantizer / widening conversion).
void row_to_float(int32_t type, const uint8_t * src, float * dst, size_t n);

/// n_rows rows: src row i at src + i * n floats; dst row i at dst_rows[i] (a scatter: the rows
/// of a micro-batch go to their cells).
void rows_from_float_scatter(int32_t type, const float * src, size_t n_rows, size_t n, uint8_t * dst_base,
                             size_t dst_row_bytes, const int64_t * dst_rows);

} // namespace llmem
