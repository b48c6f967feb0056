// Bindings of the K/V element and block types (csrc/core/quant.cpp): the type table, quantizing
// and dequantizing rows, and the scatter of a micro-batch's rows into a block-typed buffer.

#include "pybind.h"

#include "llmem/quant.h"

#include <stdexcept>
#include <string>

namespace llmem::bind {

namespace {

const type_traits & traits_of(int32_t type) {
    const type_traits * t = find_type(type);
    if (!t) {
        row_size(type, 0);  // throws the message that lists the supported ids
    }
    return *t;
}

// The rows of an array whose last axis is contiguous: each row's address, with up to two
// outer axes of any stride (a view over the first n_kv cells of some streams).
struct row_walk {
    const uint8_t * base;
    py::ssize_t     n0 = 1, n1 = 1, s0 = 0, s1 = 0;

    size_t count() const { return size_t(n0) * size_t(n1); }
    template <typename F>
    void each(F && f) const {
        size_t i = 0;
        for (py::ssize_t a = 0; a < n0; ++a) {
            for (py::ssize_t b = 0; b < n1; ++b) {
                f(i++, base + a * s0 + b * s1);
            }
        }
    }
};

row_walk rows_of(const py::array & a, py::ssize_t last_bytes, const char * name) {
    if (a.ndim() < 1 || a.ndim() > 3) {
        throw std::invalid_argument(std::string(name) + " must have 1 to 3 dimensions, got " + std::to_string(a.ndim()));
    }
    const py::ssize_t nd = a.ndim();
    if (a.shape(nd - 1) * a.itemsize() != last_bytes || (a.shape(nd - 1) > 1 && a.strides(nd - 1) != a.itemsize())) {
        throw std::invalid_argument(std::string(name) + ": the last axis must be one contiguous row of " +
                                    std::to_string(last_bytes) + " bytes");
    }
    row_walk w{ static_cast<const uint8_t *>(a.data()) };
    if (nd == 2) {
        w.n1 = a.shape(0);
        w.s1 = a.strides(0);
    } else if (nd == 3) {
        w.n0 = a.shape(0);
        w.s0 = a.strides(0);
        w.n1 = a.shape(1);
        w.s1 = a.strides(1);
    }
    return w;
}

} // namespace

void register_quant(py::module_ & m) {
    m.def("ggml_types",
          []() {
              size_t              n = 0;
              const type_traits * t = type_table(n);
              py::list            out;
              for (size_t i = 0; i < n; ++i) {
                  out.append(py::make_tuple(t[i].id, t[i].name, t[i].blck_size, t[i].type_size, t[i].quantized));
              }
              return out;
          },
          "The K/V types of the compiled core: (ggml id, name, block size, block bytes, quantized).");

    m.def("row_size", [](int32_t type, int64_t n) { return row_size(type, to_count(n, "n")); },
          py::arg("type"), py::arg("n"), "ggml_row_size: bytes of a row of n elements of `type`.");

    m.def("quantize",
          [](int32_t type, py::array_t<float, py::array::c_style> src, py::array out) {
              const type_traits & t = traits_of(type);
              if (src.ndim() < 1) {
                  throw std::invalid_argument("quantize: src must have at least one dimension");
              }
              const size_t n  = size_t(src.shape(src.ndim() - 1));
              const size_t rb = row_size(type, n);
              if (!out.writeable() || !(out.flags() & py::array::c_style) || out.itemsize() != 1) {
                  throw std::invalid_argument("quantize: out must be a writeable C-contiguous uint8 array");
              }
              const size_t rows = n ? size_t(src.size()) / n : 0;
              if (size_t(out.nbytes()) != rows * rb) {
                  throw std::invalid_argument("quantize: out holds " + std::to_string(out.nbytes()) + " bytes, " +
                                              std::to_string(rows) + " rows of " + t.name + " need " +
                                              std::to_string(rows * rb));
              }
              const float * s = src.data();
              uint8_t *     d = static_cast<uint8_t *>(out.mutable_data());
              py::gil_scoped_release r;
              for (size_t i = 0; i < rows; ++i) {
                  row_from_float(type, s + i * n, d + i * rb, n);
              }
          },
          py::arg("type"), py::arg("src"), py::arg("out"),
          "Rows of float32 (last axis) to rows of `type` written into `out` (uint8, C-contiguous).");

    m.def("dequantize",
          [](int32_t type, py::array src, int64_t n_, py::array_t<float, py::array::c_style> out) {
              traits_of(type);
              const size_t n  = to_count(n_, "n");
              const size_t rb = row_size(type, n);
              const row_walk w = rows_of(src, py::ssize_t(rb), "src");
              if (!out.writeable() || size_t(out.size()) != w.count() * n) {
                  throw std::invalid_argument("dequantize: out must be a writeable float32 array of " +
                                              std::to_string(w.count()) + " x " + std::to_string(n) + " values");
              }
              float * d = out.mutable_data();
              py::gil_scoped_release r;
              w.each([&](size_t i, const uint8_t * row) { row_to_float(type, row, d + i * n, n); });
          },
          py::arg("type"), py::arg("src"), py::arg("n"), py::arg("out"),
          "Rows of `type` (the last axis one contiguous row; up to two outer axes of any stride) to float32.");

    m.def("quantize_scatter",
          [](int32_t type, py::array dst, py::array_t<float, py::array::c_style> src,
             py::array_t<int64_t, py::array::c_style> idx) {
              traits_of(type);
              if (!dst.writeable() || !(dst.flags() & py::array::c_style) || dst.itemsize() != 1 || dst.ndim() < 2) {
                  throw std::invalid_argument("quantize_scatter: dst must be a writeable C-contiguous uint8 array "
                                              "whose last axis is one row");
              }
              if (src.ndim() != 2 || size_t(idx.size()) != size_t(src.shape(0))) {
                  throw std::invalid_argument("quantize_scatter: src must be [n_tokens, n] with one index per token");
              }
              const size_t n      = size_t(src.shape(1));
              const size_t rb     = row_size(type, n);
              const size_t n_rows = size_t(dst.size()) / size_t(dst.shape(dst.ndim() - 1));
              if (size_t(dst.shape(dst.ndim() - 1)) != rb) {
                  throw std::invalid_argument("quantize_scatter: a row of dst holds " +
                                              std::to_string(dst.shape(dst.ndim() - 1)) + " bytes, " +
                                              std::to_string(n) + " values need " + std::to_string(rb));
              }
              const int64_t * ix = idx.data();
              for (py::ssize_t t = 0; t < idx.size(); ++t) {
                  if (ix[t] < 0 || size_t(ix[t]) >= n_rows) {
                      throw std::invalid_argument("quantize_scatter: row index " + std::to_string(ix[t]) +
                                                  " out of range [0, " + std::to_string(n_rows) + ")");
                  }
              }
              uint8_t *     d = static_cast<uint8_t *>(dst.mutable_data());
              const float * s = src.data();
              py::gil_scoped_release r;
              rows_from_float_scatter(type, s, size_t(src.shape(0)), n, d, rb, ix);
          },
          py::arg("type"), py::arg("dst"), py::arg("src"), py::arg("rows"),
          "dst row rows[t] = src row t converted to `type` (the cpy_k / cpy_v of a block-typed buffer).");
}

} // namespace llmem::bind
