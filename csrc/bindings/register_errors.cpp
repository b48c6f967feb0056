#include "pybind.h"

#include "llmem/errors.h"

#include <cstring>

namespace llmem::bind {

namespace {

// An exception's message as a Python str; bytes that are not UTF-8 (a message quoting untrusted
// input) become \xNN escapes instead of a UnicodeDecodeError replacing the intended exception.
py::object message_of(const std::exception & e) {
    const char * what = e.what();
    return py::reinterpret_steal<py::object>(PyUnicode_DecodeUTF8(what, Py_ssize_t(std::strlen(what)),
                                                                  "backslashreplace"));
}

} // namespace

// The exception classes live in the pure-Python module llmem.errors (so that BatchError can be
// both an LlmemError and a ValueError); the translator raises them from the C++ types.
void register_errors(py::module_ & m) {
    py::module_ errors = py::module_::import("llmem.errors");
    m.attr("LlmemError") = errors.attr("LlmemError");
    m.attr("BatchError") = errors.attr("BatchError");
    m.attr("StateError") = errors.attr("StateError");

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) {
                std::rethrow_exception(p);
            }
        } catch (const llmem::batch_error & e) {
            py::object cls = py::module_::import("llmem.errors").attr("BatchError");
            py::object exc = cls(message_of(e), llmem::batch_reject_name(e.reason()));
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const llmem::state_error & e) {
            py::object cls = py::module_::import("llmem.errors").attr("StateError");
            py::object exc = cls(message_of(e), llmem::state_reject_name(e.reason()));
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const llmem::error & e) {
            py::object cls = py::module_::import("llmem.errors").attr("LlmemError");
            PyErr_SetObject(cls.ptr(), message_of(e).ptr());
        }
    });
}

} // namespace llmem::bind
