#pragma once

// The single include point of pybind11 for every binding file (keeps caster specialisations and
// helpers in one place, so no translation unit sees a different set).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace llmem::bind {

void register_errors(py::module_ & m);
void register_status(py::module_ & m);
void register_batch(py::module_ & m);
void register_recurrent(py::module_ & m);

/// A read-only 1-D numpy view of `n` elements at `ptr`, kept alive by `owner`.
template <typename T>
py::array_t<T> readonly_view(const T * ptr, size_t n, py::handle owner) {
    py::array_t<T> a({ static_cast<py::ssize_t>(n) }, { static_cast<py::ssize_t>(sizeof(T)) }, ptr, owner);
    py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    return a;
}

/// Convert an int-like array argument to int32 values, refusing floats, bools-as-ids and
/// values outside int32. `name` is used in the error message.
std::vector<int32_t> to_int32_vector(py::handle obj, const char * name);

/// Raise ValueError("<name> ...") with the given detail.
[[noreturn]] void throw_value_error(const std::string & msg);

} // namespace llmem::bind
