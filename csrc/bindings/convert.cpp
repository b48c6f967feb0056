#include "pybind.h"

#include <cstring>
#include <limits>
#include <stdexcept>

namespace llmem::bind {

namespace {

py::array as_numpy(py::handle obj) {
    static py::object asarray = py::module_::import("numpy").attr("asarray");
    return asarray(obj);
}

template <typename T>
converted<T> copy_out(const py::array & a) {
    converted<T> out;
    out.shape.assign(a.shape(), a.shape() + a.ndim());
    out.values.resize(size_t(a.size()));
    if (a.size() > 0) {
        std::memcpy(out.values.data(), a.data(), size_t(a.size()) * sizeof(T));
    }
    return out;
}

void check_ndim(const py::array & a, const char * name, int max_ndim) {
    if (a.ndim() < 1 || a.ndim() > max_ndim) {
        throw py::value_error(std::string(name) + " must be a " +
                              (max_ndim == 1 ? "1-D array" : "1-D or 2-D array") + ", got " +
                              std::to_string(a.ndim()) + " dimensions");
    }
}

} // namespace

converted<int32_t> to_int32(py::handle obj, const char * name, int max_ndim) {
    using exact = py::array_t<int32_t, py::array::c_style>;
    if (exact::check_(obj)) {  // the hot path: already int32 and contiguous
        py::array a = py::reinterpret_borrow<py::array>(obj);
        check_ndim(a, name, max_ndim);
        return copy_out<int32_t>(a);
    }
    py::array a = as_numpy(obj);
    if (a.size() == 0) {
        converted<int32_t> out;
        out.shape.assign(a.shape(), a.shape() + a.ndim());
        return out;
    }
    const char kind = a.dtype().kind();
    if (kind != 'i' && kind != 'u') {
        throw py::type_error(std::string(name) + " must hold integers, got dtype " +
                             py::str(a.dtype()).cast<std::string>());
    }
    check_ndim(a, name, max_ndim);
    const double lo = a.attr("min")().cast<double>();
    const double hi = a.attr("max")().cast<double>();
    if (lo < double(std::numeric_limits<int32_t>::min()) || hi > double(std::numeric_limits<int32_t>::max())) {
        throw py::value_error(std::string(name) + " has values outside int32 (" + std::to_string(lo) +
                              " .. " + std::to_string(hi) + ")");
    }
    return copy_out<int32_t>(a.attr("astype")("int32", py::arg("order") = "C").cast<py::array>());
}

converted<float> to_float32(py::handle obj, const char * name, int max_ndim) {
    using exact = py::array_t<float, py::array::c_style>;
    if (exact::check_(obj)) {
        py::array a = py::reinterpret_borrow<py::array>(obj);
        check_ndim(a, name, max_ndim);
        return copy_out<float>(a);
    }
    py::array a = as_numpy(obj);
    if (a.dtype().kind() != 'f') {
        throw py::type_error(std::string(name) + " must hold floating-point values, got dtype " +
                             py::str(a.dtype()).cast<std::string>());
    }
    check_ndim(a, name, max_ndim);
    return copy_out<float>(a.attr("astype")("float32", py::arg("order") = "C").cast<py::array>());
}

converted<int8_t> to_flags(py::handle obj, const char * name) {
    py::array a = as_numpy(obj);
    const char kind = a.dtype().kind();
    if (a.size() > 0 && kind != 'b' && kind != 'i' && kind != 'u') {
        throw py::type_error(std::string(name) + " must hold booleans, got dtype " +
                             py::str(a.dtype()).cast<std::string>());
    }
    if (a.size() > 0) {
        check_ndim(a, name, 1);
    }
    return copy_out<int8_t>(a.attr("astype")("bool", py::arg("order") = "C").cast<py::array>());
}

uint32_t to_count(int64_t value, const char * name) {
    if (value < 0 || value > int64_t(std::numeric_limits<uint32_t>::max())) {
        throw py::value_error(std::string(name) + " must be a non-negative 32-bit count, got " + std::to_string(value));
    }
    return uint32_t(value);
}

} // namespace llmem::bind
