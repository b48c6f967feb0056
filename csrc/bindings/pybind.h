#pragma once

// The single include point of pybind11 for every binding file (keeps caster specialisations and
// helpers in one place, so no translation unit sees a different set).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "llmem/status.h"

#include <cstdint>
#include <string>
#include <vector>

namespace llmem::bind {
/// The member of llmem._core.Status for `s` (borrowed), or nullptr before the enum is registered.
PyObject * status_member(memory_status s);
} // namespace llmem::bind

namespace pybind11::detail {
// A memory_status returned to Python (every context's .status) is the Status member itself, taken
// from a table made when the enum is registered (register_status.cpp): pybind11's native_enum
// caster calls Status(value), which runs enum's Python-level __call__ (about 0.7 us a read).
// Loading a Status argument is pybind11's.
template <>
class type_caster<llmem::memory_status> : public type_caster_enum_type<llmem::memory_status> {
    using base = type_caster_enum_type<llmem::memory_status>;

public:
    template <typename SrcType>
    static handle cast(SrcType && src, return_value_policy policy, handle parent) {
        if (PyObject * member = llmem::bind::status_member(static_cast<llmem::memory_status>(src))) {
            return handle(member).inc_ref();
        }
        return base::cast(std::forward<SrcType>(src), policy, parent);
    }

    template <typename SrcType>
    static handle cast(SrcType * src, return_value_policy policy, handle parent) {
        return cast(*src, policy, parent);
    }
};
} // namespace pybind11::detail

namespace py = pybind11;

namespace llmem::bind {

void register_errors(py::module_ & m);
void register_status(py::module_ & m);
void register_batch(py::module_ & m);
void register_kv_cache(py::module_ & m);
void register_kv_attention(py::module_ & m);
/// The one-call decode steps (register_decode_step.cpp).
void register_decode_step(py::module_ & m);
void register_recurrent(py::module_ & m);
void register_hybrid(py::module_ & m);
void register_state_file(py::module_ & m);
/// The C API capsule (_C_API) and the MemoryLock type it shares with Python (csrc/capi).
void register_capi(py::module_ & m);
void register_quant(py::module_ & m);
void register_state_holes(py::module_ & m);

/// A read-only 1-D numpy view of `n` elements at `ptr`, kept alive by `owner`.
template <typename T>
py::array_t<T> readonly_view(const T * ptr, size_t n, py::handle owner) {
    py::array_t<T> a({ static_cast<py::ssize_t>(n) }, { static_cast<py::ssize_t>(sizeof(T)) }, ptr, owner);
    py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    return a;
}

/// `result` (a context) keeping `owner` (its memory) alive. pybind11 3.1 runs the post-call hook of
/// py::keep_alive<0, N> even when an argument failed to convert, on its "try the next overload"
/// marker, and crashes: kv.init_batch(batch, 1.5) was a segfault instead of a TypeError. Tying
/// the objects here happens only after a successful call.
inline py::object owned_by(py::object result, py::handle owner) {
    py::detail::keep_alive_impl(result, owner);
    return result;
}

/// An array argument converted for the C++ core: C-contiguous values and the shape it had.
template <typename T>
struct converted {
    std::vector<T>           values;
    std::vector<py::ssize_t> shape;
};

/// Integers of any numpy integer dtype (or a nested sequence of Python ints) as int32; floats,
/// bools and values outside int32 raise TypeError/ValueError naming `name`.
converted<int32_t> to_int32(py::handle obj, const char * name, int max_ndim);

/// Floating-point values as float32 (TypeError for other dtypes).
converted<float> to_float32(py::handle obj, const char * name, int max_ndim);

/// Truth values (bool or integer dtype) as 0/1.
converted<int8_t> to_flags(py::handle obj, const char * name);

/// A non-negative integer argument that must fit in uint32 (ValueError naming `name`).
uint32_t to_count(int64_t value, const char * name);

} // namespace llmem::bind
