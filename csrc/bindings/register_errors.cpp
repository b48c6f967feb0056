#include "pybind.h"

#include "llmem/errors.h"

namespace llmem::bind {

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
            py::object exc = cls(e.what(), llmem::batch_reject_name(e.reason()));
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const llmem::state_error & e) {
            py::object cls = py::module_::import("llmem.errors").attr("StateError");
            py::object exc = cls(e.what(), llmem::state_reject_name(e.reason()));
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const llmem::error & e) {
            py::object cls = py::module_::import("llmem.errors").attr("LlmemError");
            PyErr_SetString(cls.ptr(), e.what());
        }
    });
}

} // namespace llmem::bind
