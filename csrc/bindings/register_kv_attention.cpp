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

// seq_ids / tokens of the decode step as int32: a Python list of ints and an int32 array are read
// directly; anything else goes through the general conversion.
void read_ids(py::handle obj, const char * name, std::vector<int32_t> & out) {
    PyObject * o = obj.ptr();
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
        const Py_ssize_t n     = PySequence_Fast_GET_SIZE(o);
        PyObject **      items = PySequence_Fast_ITEMS(o);
        out.resize(size_t(n));
        for (Py_ssize_t k = 0; k < n; ++k) {
            PyObject * it = items[k];
            if (!PyLong_CheckExact(it)) {
                out.clear();
                break;  // numpy scalars, bools, floats: the general path says what is wrong
            }
            int overflow = 0;
            const long long v = PyLong_AsLongLongAndOverflow(it, &overflow);
            if (overflow || v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
                throw py::value_error(std::string(name) + "[" + std::to_string(k) + "] = " +
                                      std::string(py::str(it)) + " does not fit in int32");
            }
            out[size_t(k)] = int32_t(v);
        }
        if (out.size() == size_t(n)) {
            return;
        }
    }
    if (PyBool_Check(o) || PyLong_Check(o)) {
        throw py::type_error(std::string(name) + " must be a sequence of ints, not a single " +
                             std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    if (PyList_Check(o) || PyTuple_Check(o)) {
        for (py::handle it : obj) {
            if (PyBool_Check(it.ptr()) || PyFloat_Check(it.ptr())) {
                throw py::type_error(std::string(name) + " must hold ints, got " + std::string(py::repr(it)));
            }
        }
    }
    converted<int32_t> c = to_int32(obj, name, 1);
    out = std::move(c.values);
}

std::string no_room(size_t n) {
    return "decode_step: no room for one token of each of the " + std::to_string(n) +
           " sequences; the memory is unchanged (free cells with seq_rm, or use a larger cache)";
}

thread_local std::vector<int32_t> t_seq_ids;
thread_local std::vector<int32_t> t_tokens;



// -- the one-call decode step (KVCache.decode_step, KVCacheISWA.decode_step) ---------------------
//
// Plain CPython functions (METH_FASTCALL), not pybind11 definitions: the step of 64 sequences
// costs about 2 us in C++, and pybind11's dispatcher (argument vectors on the heap, overload
// loop) plus the Python-side lock, context construction and k_idxs call cost as much again. Each
// call takes the memory's lock as `with memory.lock` does, reads int32 arrays in place, plans
// and applies, bumps the Python version counter(s), computes the k rows once and builds the
// Python context objects, all under the lock.

struct step_names {
    PyObject * core    = PyUnicode_InternFromString("_core");
    PyObject * lock    = PyUnicode_InternFromString("_lock");
    PyObject * version = PyUnicode_InternFromString("_version");
    PyObject * base    = PyUnicode_InternFromString("base");
    PyObject * swa     = PyUnicode_InternFromString("swa");
};

const step_names & names() {
    static const step_names n;  // interned for the process's lifetime
    return n;
}

// The memory's lock for the call, taken as Python takes it (memory_lock.h).
class python_lock {
public:
    explicit python_lock(py::handle mem) {
        lock_ = py::reinterpret_steal<py::object>(PyObject_GetAttr(mem.ptr(), names().lock));
        if (!lock_) {
            throw py::error_already_set();
        }
        state_ = capi::memory_lock_of(lock_.ptr());
        if (state_ == nullptr || !capi::memory_lock_python_acquire(lock_.ptr())) {
            throw py::type_error("memory._lock is not llmem's MemoryLock (was it replaced?)");
        }
    }
    ~python_lock() { capi::memory_lock_release_held(*state_); }
    python_lock(const python_lock &)             = delete;
    python_lock & operator=(const python_lock &) = delete;

private:
    py::object                 lock_;
    capi::memory_lock_state *  state_ = nullptr;
};

py::object attr(py::handle obj, PyObject * name) {
    PyObject * r = PyObject_GetAttr(obj.ptr(), name);
    if (r == nullptr) {
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(r);
}

// The int32 values of a 1-D C-contiguous int32 array in place; anything else converted (and
// checked) into `scratch` as read_ids does.
const int32_t * ids_view(py::handle obj, const char * name, std::vector<int32_t> & scratch, size_t & n) {
    using exact = py::array_t<int32_t, py::array::c_style>;
    if (exact::check_(obj)) {
        const auto * a = py::detail::array_proxy(obj.ptr());
        if (a->nd == 1) {
            n = size_t(a->dimensions[0]);
            return reinterpret_cast<const int32_t *>(a->data);
        }
    }
    read_ids(obj, name, scratch);
    n = scratch.size();
    return scratch.data();
}

struct step_args {
    const int32_t * ids = nullptr;
    const int32_t * tok = nullptr;
    uint32_t        n   = 0;
};

step_args read_step_args(py::handle seq_ids, py::handle tokens) {
    step_args a;
    size_t    n = 0;
    a.ids       = ids_view(seq_ids, "seq_ids", t_seq_ids, n);
    if (n > size_t(std::numeric_limits<int32_t>::max())) {
        throw py::value_error("seq_ids has more than 2^31 - 1 entries");
    }
    a.n = uint32_t(n);
    if (!tokens.is_none()) {
        size_t nt = 0;
        a.tok     = ids_view(tokens, "tokens", t_tokens, nt);
        if (nt != n) {
            throw py::value_error("tokens has " + std::to_string(nt) + " entries, seq_ids " + std::to_string(n) +
                                  ": one token per sequence");
        }
    }
    return a;
}

// cache._version += 1 (the Python side's change counter); returns the new value.
py::object bump_version(py::handle cache) {
    py::object v = attr(cache, names().version);
    PyObject * one = PyLong_FromLong(1);
    PyObject * nv  = one ? PyNumber_Add(v.ptr(), one) : nullptr;
    Py_XDECREF(one);
    if (nv == nullptr || PyObject_SetAttr(cache.ptr(), names().version, nv) != 0) {
        Py_XDECREF(nv);
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(nv);
}

// The applied step as the Python context: context_type(cache, KVContext, version, k rows).
py::object python_context(py::handle context_type, py::handle cache, py::handle core, kv_cache & c,
                          kv_context && ctx) {
    py::array_t<int64_t> rows(py::ssize_t(ctx.get_slot().idxs.size()));
    kv_k_idxs(c, ctx.get_slot(), rows.mutable_data());
    py::object compiled = owned_by(py::cast(std::move(ctx)), core);
    py::object version  = bump_version(cache);
    PyObject * args[]   = { cache.ptr(), compiled.ptr(), version.ptr(), rows.ptr() };
    PyObject * r        = PyObject_Vectorcall(context_type.ptr(), args, 4, nullptr);
    if (r == nullptr) {
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(r);
}

PyObject * translate_current() {
    try {
        throw;
    } catch (py::error_already_set & e) {
        e.restore();
    } catch (...) {
        py::detail::try_translate_exceptions();
    }
    return nullptr;
}

// kv_decode_step(cache, seq_ids, tokens, context_type) -> context or None
PyObject * kv_decode_step_py(PyObject *, PyObject * const * args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "kv_decode_step(cache, seq_ids, tokens, context_type) takes 4 arguments");
        return nullptr;
    }
    try {
        py::handle      mem(args[0]);
        py::object      core = attr(mem, names().core);
        kv_cache &      c    = core.cast<kv_cache &>();
        python_lock     hold(mem);  // first: the ids are read into per-thread scratch under it
        const step_args a = read_step_args(args[1], args[2]);
        // a plain cache is its own position source (as init_batch reads it)
        kv_context ctx = kv_decode_step(c, c, a.ids, a.n, a.tok);
        if (ctx.status() == memory_status::NO_UPDATE) {
            Py_RETURN_NONE;  // several micro-batches: the caller takes the general path
        }
        if (ctx.status() != memory_status::SUCCESS) {
            throw llmem::error(no_room(a.n));
        }
        return python_context(args[3], mem, core, c, std::move(ctx)).release().ptr();
    } catch (...) {
        return translate_current();
    }
}

// kv_iswa_decode_step(mem, seq_ids, tokens, context_type, iswa_context_type) -> context or None
PyObject * kv_iswa_decode_step_py(PyObject *, PyObject * const * args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "kv_iswa_decode_step(mem, seq_ids, tokens, context_type, iswa_context_type) takes 5 arguments");
        return nullptr;
    }
    try {
        py::handle      mem(args[0]);
        py::object      base = attr(mem, names().base), swa = attr(mem, names().swa);
        py::object      core_b = attr(base, names().core), core_s = attr(swa, names().core);
        kv_cache &      b = core_b.cast<kv_cache &>();
        kv_cache &      s = core_s.cast<kv_cache &>();
        python_lock     hold(mem);
        const step_args a = read_step_args(args[1], args[2]);
        auto            p = kv_iswa_decode_step(b, s, a.ids, a.n, a.tok);
        if (p.first.status() == memory_status::NO_UPDATE) {
            Py_RETURN_NONE;
        }
        if (p.first.status() != memory_status::SUCCESS) {
            throw llmem::error(no_room(a.n));
        }
        py::object cb  = python_context(args[3], base, core_b, b, std::move(p.first));
        py::object cs  = python_context(args[3], swa, core_s, s, std::move(p.second));
        PyObject * in[] = { mem.ptr(), cb.ptr(), cs.ptr() };
        return PyObject_Vectorcall(args[4], in, 3, nullptr);
    } catch (...) {
        return translate_current();
    }
}

PyMethodDef decode_step_defs[] = {
    { "kv_decode_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kv_decode_step_py)),
      METH_FASTCALL,
      "kv_decode_step($module, cache, seq_ids, tokens, context_type, /)\n--\n\n"
      "One token per sequence planned and applied in one call, under cache._lock (see "
      "llmem.KVCache.decode_step): context_type(cache, KVContext, version, k_idxs), or None when the "
      "step takes several micro-batches." },
    { "kv_iswa_decode_step",
      reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kv_iswa_decode_step_py)), METH_FASTCALL,
      "kv_iswa_decode_step($module, mem, seq_ids, tokens, context_type, iswa_context_type, /)\n--\n\n"
      "The decode step of a KVCacheISWA in one call: iswa_context_type(mem, base context, swa context), or "
      "None when the step takes several micro-batches." },
    { nullptr, nullptr, 0, nullptr },
};

// A hybrid memory's decode step in one call: the decode batch (token ids 0 without tokens, as
// the general path's Batch), the allocator with the hybrid's positions, hybrid_prepare with n_ubatch
// max(n, n_rs_seq + 2) and the apply of the first micro-batch on every part: init_batch + apply
// without the Python objects between.
py::tuple hybrid_decode_step(py::object base_obj, py::object swa_obj, py::object recr_obj, py::object positions_obj,
                             py::handle seq_ids, py::handle tokens) {
    kv_cache & base = base_obj.cast<kv_cache &>();
    kv_cache * swa  = swa_obj.is_none() ? nullptr : swa_obj.cast<kv_cache *>();
    auto *     recr = dynamic_cast<rs_memory *>(recr_obj.cast<seq_pos_source *>());
    if (recr == nullptr) {
        throw py::type_error("recr must be the compiled core of a RecurrentMemory");
    }
    const seq_pos_source & positions = *positions_obj.cast<const seq_pos_source *>();
    const step_args        a         = read_step_args(seq_ids, tokens);
    check_decode_step_args(base.n_seq_max(), a.ids, a.n, a.tok);
    thread_local batch                         b;
    thread_local std::unique_ptr<batch_allocr> balloc;
    if (!balloc || balloc->n_seq_max() != base.n_seq_max()) {
        balloc = std::make_unique<batch_allocr>(base.n_seq_max());
    }
    b.n_tokens = a.n;
    if (a.tok) {
        b.token.assign(a.tok, a.tok + a.n);
    } else {
        b.token.assign(a.n, 0);  // the allocator needs token ids: 0, as the C API's decode_step
    }
    b.embd.clear();
    b.n_embd = 0;
    b.pos.clear();
    b.seq_id.assign(a.ids, a.ids + a.n);
    b.seq_id_off.resize(size_t(a.n) + 1);
    for (uint32_t i = 0; i <= a.n; ++i) {
        b.seq_id_off[i] = int32_t(i);
    }
    b.output.assign(a.n, 1);
    balloc->init(b, &positions, false);
    // every sequence in one micro-batch, and room for the recurrent split's kept tail (n_rs_seq + 1
    // tokens of a sequence stay together): the C API's decode_step n_ubatch
    const uint32_t n_ubatch = std::max(a.n, recr->n_rs_seq() + 2);
    hybrid_plan    plan     = hybrid_prepare(*balloc, n_ubatch, false, base, swa, *recr);
    if (plan.status != memory_status::SUCCESS) {
        throw llmem::error(no_room(a.n));
    }
    rs_context                recr_ctx(recr, plan.ubatches);
    std::optional<kv_context> swa_ctx;
    if (swa != nullptr) {
        swa_ctx.emplace(*swa, std::move(plan.slots_swa), plan.ubatches);
    }
    kv_context base_ctx(base, std::move(plan.slots_base), std::move(plan.ubatches));
    base_ctx.apply();  // the attention side first, then the recurrent side (HybridContext.apply)
    if (swa_ctx) {
        swa_ctx->apply();
    }
    recr_ctx.apply();
    py::object swa_out = swa_ctx ? owned_by(py::cast(std::move(*swa_ctx)), swa_obj) : py::object(py::none());
    return py::make_tuple(owned_by(py::cast(std::move(base_ctx)), base_obj), swa_out,
                          owned_by(py::cast(std::move(recr_ctx)), recr_obj));
}

void add_decode_step_functions(py::module_ & m) {
    if (PyModule_AddFunctions(m.ptr(), decode_step_defs) != 0) {
        throw py::error_already_set();
    }
    m.def("hybrid_decode_step", &hybrid_decode_step, py::arg("base"), py::arg("swa"), py::arg("recr"),
          py::arg("positions"), py::arg("seq_ids"), py::arg("tokens") = py::none(),
          "A hybrid memory's decode step (init_batch + apply of its first micro-batch) in one call: "
          "(base context, swa context or None, recurrent context), applied.");
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

    add_decode_step_functions(m);
}

} // namespace llmem::bind
