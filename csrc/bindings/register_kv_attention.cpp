#include "pybind.h"

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/hybrid.h"
#include "llmem/kv_attention.h"
#include "llmem/kv_cache.h"

#include "../capi/memory_lock.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

namespace llmem::bind {

namespace {

// Element types of the output buffers.
enum class elem { F32, F16, I32, I64 };

const char * elem_name(elem e) {
    switch (e) {
        case elem::F32: return "float32";
        case elem::F16: return "float16";
        case elem::I32: return "int32";
        case elem::I64: return "int64";
    }
    return "?";
}

size_t elem_size(elem e) { return e == elem::F16 ? 2 : (e == elem::I64 ? 8 : 4); }

bool format_matches(const Py_buffer & v, elem e) {
    const char * f = v.format ? v.format : "B";
    while (*f == '@' || *f == '=' || *f == '<') {
        ++f;
    }
    if (size_t(v.itemsize) != elem_size(e) || f[0] == 0 || f[1] != 0) {
        return false;  // every accepted format is one character
    }
    switch (e) {
        case elem::F32: return f[0] == 'f';
        case elem::F16: return f[0] == 'e';
        case elem::I32: return f[0] == 'i' || f[0] == 'l';
        case elem::I64: return f[0] == 'l' || f[0] == 'q';
    }
    return false;
}

std::string shape_str(const std::vector<size_t> & s) {
    std::string r = "(";
    for (size_t k = 0; k < s.size(); ++k) {
        r += (k ? ", " : "") + std::to_string(s[k]);
    }
    return r + (s.size() == 1 ? ",)" : ")");
}

// A caller's output buffer (numpy array or any object with the buffer protocol): writable,
// C-contiguous, of the element type asked (or raw bytes of the right length). With `exact`, it
// holds exactly the elements of `shape` (and, when it has as many dimensions, that shape);
// otherwise a 1-D buffer with room for at least shape[0] elements.
class out_buffer {
public:
    out_buffer(py::handle obj, const char * name, elem e, const std::vector<size_t> & shape, bool exact) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_RECORDS_RO) != 0) {
            PyErr_Clear();
            throw py::type_error(std::string(name) + " must be a writable buffer (a numpy array of " + elem_name(e) +
                                 "), not " + std::string(py::str(py::type::of(obj).attr("__name__"))));
        }
        ok_ = true;
        size_t n = 1;
        for (size_t d : shape) {
            n *= d;
        }
        if (view_.readonly) {
            throw py::value_error(std::string(name) + " is read-only: pass a writable buffer");
        }
        if (!PyBuffer_IsContiguous(&view_, 'C')) {
            throw py::value_error(std::string(name) + " must be C-contiguous");
        }
        const bool raw = view_.itemsize == 1 && (!view_.format || std::strchr("Bbc", view_.format[0]) != nullptr);
        if (raw && !exact) {
            throw py::type_error(std::string(name) + " must be a typed " + elem_name(e) +
                                 " buffer (its used part is returned as a slice), not raw bytes");
        }
        if (!raw && !format_matches(view_, e)) {
            throw py::type_error(std::string(name) + " must hold " + elem_name(e) + " (or be raw bytes), got format '" +
                                 (view_.format ? view_.format : "B") + "' with " + std::to_string(view_.itemsize) +
                                 "-byte items");
        }
        const size_t have = raw ? size_t(view_.len) / elem_size(e) : size_t(view_.len) / size_t(view_.itemsize);
        capacity_ = have;
        if (exact && !raw && size_t(view_.ndim) == shape.size() && have == n &&
            std::equal(shape.begin(), shape.end(), view_.shape,
                       [](size_t want, Py_ssize_t d) { return size_t(d) == want; })) {
            return;  // the usual case: a typed buffer of exactly the shape asked
        }
        std::vector<size_t> got;
        for (int d = 0; d < view_.ndim; ++d) {
            got.push_back(size_t(view_.shape[d]));
        }
        if (exact) {
            const bool len_ok   = raw ? size_t(view_.len) == n * elem_size(e) : have == n;
            const bool shape_ok = raw || got.size() != shape.size() || got == shape;
            if (!len_ok || !shape_ok || (!raw && got.size() != 1 && got.size() != shape.size())) {
                throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) + " (" +
                                      std::to_string(n) + " " + elem_name(e) + " values), got " +
                                      (raw ? std::to_string(view_.len) + " bytes" : "shape " + shape_str(got)));
            }
        } else if (have < n || (!raw && got.size() != 1)) {
            throw py::value_error(std::string(name) + " must be a 1-D buffer with room for at least " +
                                  std::to_string(n) + " " + elem_name(e) + " values, got " +
                                  (raw ? std::to_string(view_.len) + " bytes" : "shape " + shape_str(got)));
        }
        capacity_ = have;
    }
    ~out_buffer() {
        if (ok_) {
            PyBuffer_Release(&view_);
        }
    }
    out_buffer(const out_buffer &)             = delete;
    out_buffer & operator=(const out_buffer &) = delete;

    void * data() const { return view_.buf; }
    size_t capacity() const { return capacity_; }

private:
    Py_buffer view_{};
    bool      ok_       = false;
    size_t    capacity_ = 0;
};

const kv_context & applied(const kv_context & ctx, const char * what) {
    if (ctx.status() != memory_status::SUCCESS || !ctx.cache()) {
        throw llmem::error("this KV context failed to prepare: it has no micro-batches");
    }
    if (!ctx.has_ubatch()) {
        throw llmem::error(std::string(what) + ": this context has no current micro-batch");
    }
    if (ctx.n_kv() == 0 || !ctx.has_ubatch()) {
        throw llmem::error(std::string(what) + " needs apply() first (n_kv is 0)");
    }
    return ctx;
}

const kv_context & planned(const kv_context & ctx) {
    if (ctx.status() != memory_status::SUCCESS || !ctx.cache()) {
        throw llmem::error("this KV context failed to prepare: it has no micro-batches");
    }
    return ctx;
}

// Fills larger than this many bytes run without the GIL (below it, releasing costs more than it frees).
constexpr size_t GIL_FREE_BYTES = 64 * 1024;

template <typename T>
py::array_t<T> new_array(std::vector<size_t> shape) {
    std::vector<py::ssize_t> s(shape.begin(), shape.end());
    return py::array_t<T>(s);
}

} // namespace

void register_kv_attention(py::module_ & m) {
    m.def("kv_kq_mask",
          [](const kv_context & ctx, bool causal, py::object out, bool f16, int64_t pad) -> py::object {
              const auto &        c  = *applied(ctx, "kq_mask").cache();
              const ubatch &      ub = ctx.get_ubatch();
              const uint32_t      p  = to_count(pad, "pad");
              if (p == 0) {
                  throw py::value_error("pad must be >= 1 (1: no padding rows), got 0");
              }
              const kq_mask_shape sh   = kq_mask_shape_of(ctx.get_slot(), ub, ctx.n_kv(), p);
              const mask_type     type = f16 ? mask_type::F16 : mask_type::F32;
              const std::vector<size_t> shape{ sh.n_rows(), sh.n_kv };
              py::object result = out;
              void *     dst    = nullptr;
              std::optional<out_buffer> buf;
              if (out.is_none()) {
                  if (f16) {
                      py::array a(py::dtype("float16"), std::vector<py::ssize_t>{ py::ssize_t(shape[0]), py::ssize_t(shape[1]) });
                      dst    = a.mutable_data();
                      result = a;
                  } else {
                      auto a = new_array<float>(shape);
                      dst    = a.mutable_data();
                      result = a;
                  }
              } else {
                  buf.emplace(out, "out", f16 ? elem::F16 : elem::F32, shape, true);
                  dst = buf->data();
              }
              const size_t bytes = sh.n_elements() * (f16 ? 2 : 4);
              if (bytes > GIL_FREE_BYTES) {
                  py::gil_scoped_release r;
                  kq_mask_fill(c, ctx.get_slot(), ub, ctx.n_kv(), causal, type, p, dst);
              } else {
                  kq_mask_fill(c, ctx.get_slot(), ub, ctx.n_kv(), causal, type, p, dst);
              }
              return result;
          },
          py::arg("ctx"), py::arg("causal") = true, py::arg("out") = py::none(), py::arg("f16") = false,
          py::arg("pad") = 1,
          "Dense KQ mask of the current micro-batch into out (or a new array): [n_groups * rows, n_kv].");

    m.def("kv_kq_cells",
          [](const kv_context & ctx, bool causal, py::object out_offsets, py::object out_cells) -> py::tuple {
              const auto &   c  = *applied(ctx, "kq_cells").cache();
              const ubatch & ub = ctx.get_ubatch();
              const size_t   n  = kq_cells_count(c, ctx.get_slot(), ub, ctx.n_kv(), causal);
              const size_t   nt = size_t(ub.n_tokens) + 1;
              py::object     offs_obj, cells_obj;
              int64_t *      offs  = nullptr;
              int32_t *      cells = nullptr;
              std::unique_ptr<out_buffer> bo, bc;
              if (out_offsets.is_none()) {
                  auto a   = new_array<int64_t>({ nt });
                  offs     = a.mutable_data();
                  offs_obj = a;
              } else {
                  bo       = std::make_unique<out_buffer>(out_offsets, "offsets", elem::I64, std::vector<size_t>{ nt }, true);
                  offs     = static_cast<int64_t *>(bo->data());
                  offs_obj = out_offsets;
              }
              if (out_cells.is_none()) {
                  auto a    = new_array<int32_t>({ n });
                  cells     = a.mutable_data();
                  cells_obj = a;
              } else {
                  bc        = std::make_unique<out_buffer>(out_cells, "cells", elem::I32, std::vector<size_t>{ n }, false);
                  cells     = static_cast<int32_t *>(bc->data());
                  cells_obj = out_cells[py::slice(0, py::ssize_t(n), 1)];
              }
              if (n * 4 > GIL_FREE_BYTES) {
                  py::gil_scoped_release r;
                  kq_cells_fill(c, ctx.get_slot(), ub, ctx.n_kv(), causal, offs, cells);
              } else {
                  kq_cells_fill(c, ctx.get_slot(), ub, ctx.n_kv(), causal, offs, cells);
              }
              return py::make_tuple(offs_obj, cells_obj);
          },
          py::arg("ctx"), py::arg("causal") = true, py::arg("offsets") = py::none(), py::arg("cells") = py::none(),
          "Per-token visible cells: (offsets int64[n_tokens + 1], cells int32[...]), into buffers when given.");

    m.def("kv_k_idxs",
          [](const kv_context & ctx, py::object out) -> py::object {
              const auto &      c = *planned(ctx).cache();
              const slot_info & s = ctx.get_slot();
              const std::vector<size_t> shape{ s.idxs.size() };
              if (out.is_none()) {
                  auto a = new_array<int64_t>(shape);
                  kv_k_idxs(c, s, a.mutable_data());
                  return std::move(a);
              }
              out_buffer b(out, "out", elem::I64, shape, true);
              kv_k_idxs(c, s, static_cast<int64_t *>(b.data()));
              return out;
          },
          py::arg("ctx"), py::arg("out") = py::none());

    m.def("kv_v_idxs",
          [](const kv_context & ctx, py::object out) -> py::object {
              const auto &      c = *planned(ctx).cache();
              const slot_info & s = ctx.get_slot();
              const std::vector<size_t> shape{ kv_v_idxs_count(c, s) };
              if (out.is_none()) {
                  auto a = new_array<int64_t>(shape);
                  kv_v_idxs(c, s, a.mutable_data());
                  return std::move(a);
              }
              out_buffer b(out, "out", elem::I64, shape, true);
              kv_v_idxs(c, s, static_cast<int64_t *>(b.data()));
              return out;
          },
          py::arg("ctx"), py::arg("out") = py::none());

    m.def("kv_paged_sizes",
          [](const kv_context & ctx, bool causal) {
              const auto &         c = *applied(ctx, "paged_kv").cache();
              const paged_kv_sizes s = paged_kv_count(c, ctx.get_slot(), ctx.get_ubatch(), causal);
              return py::make_tuple(s.n_tokens, s.n_seqs, s.n_pages);
          },
          py::arg("ctx"), py::arg("causal") = true, "(n_tokens, n_seqs, n_pages) of the paged form.");

    m.def("kv_paged",
          [](const kv_context & ctx, bool causal, py::object out) -> py::tuple {
              static const char * names[] = { "seq_ids", "qo_seq", "qo_indptr", "qo_order", "kv_indptr",
                                              "kv_indices", "kv_last_page_len", "kv_start", "kv_end" };
              const auto &         c  = *applied(ctx, "paged_kv").cache();
              const ubatch &       ub = ctx.get_ubatch();
              const paged_kv_sizes s  = paged_kv_count(c, ctx.get_slot(), ub, causal);
              const size_t sizes[]    = { s.n_seqs, s.n_tokens, size_t(s.n_seqs) + 1, s.n_tokens,
                                          size_t(s.n_seqs) + 1, s.n_pages, s.n_seqs, s.n_tokens, s.n_tokens };
              if (s.n_pages > size_t(std::numeric_limits<int32_t>::max())) {
                  throw py::value_error("paged form: more than 2^31 - 1 pages");
              }
              int32_t *  ptr[9];
              py::object objs[9];
              std::vector<std::unique_ptr<out_buffer>> bufs;
              if (!out.is_none()) {
                  if (!py::isinstance<py::sequence>(out) || py::len(out) != 9) {
                      throw py::type_error("out must be a sequence of 9 int32 buffers (" + std::string(names[0]) +
                                           ", ..., " + names[8] + "), as PagedKV.empty gives");
                  }
              }
              for (int k = 0; k < 9; ++k) {
                  if (out.is_none()) {
                      auto a  = new_array<int32_t>({ sizes[k] });
                      ptr[k]  = a.mutable_data();
                      objs[k] = a;
                  } else {
                      py::object o = out[py::int_(k)];
                      bufs.push_back(std::make_unique<out_buffer>(o, names[k], elem::I32,
                                                                  std::vector<size_t>{ sizes[k] }, false));
                      ptr[k]  = static_cast<int32_t *>(bufs.back()->data());
                      objs[k] = o[py::slice(0, py::ssize_t(sizes[k]), 1)];
                  }
              }
              const paged_kv_out po{ ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], ptr[7], ptr[8] };
              if (s.n_pages * 4 > GIL_FREE_BYTES) {
                  py::gil_scoped_release r;
                  paged_kv_fill(c, ctx.get_slot(), ub, causal, po);
              } else {
                  paged_kv_fill(c, ctx.get_slot(), ub, causal, po);
              }
              py::tuple t(9);
              for (int k = 0; k < 9; ++k) {
                  t[size_t(k)] = objs[k];
              }
              return t;
          },
          py::arg("ctx"), py::arg("causal") = true, py::arg("out") = py::none(),
          "Paged-attention form of the current micro-batch: 9 int32 arrays (see llmem.PagedKV).");
}

} // namespace llmem::bind
