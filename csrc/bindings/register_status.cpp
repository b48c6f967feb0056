#include "pybind.h"

#include "llmem/common.h"
#include "llmem/status.h"

#include <pybind11/native_enum.h>

namespace llmem::bind {

namespace {
// Status's members by value, held for the process's lifetime (the enum class outlives every use).
PyObject * status_members[4] = { nullptr, nullptr, nullptr, nullptr };
} // namespace

PyObject * status_member(memory_status s) {
    const auto v = static_cast<int32_t>(s);
    return v >= 0 && v < 4 ? status_members[v] : nullptr;
}

void register_status(py::module_ & m) {
    py::native_enum<llmem::memory_status>(m, "Status", "enum.IntEnum",
                                          "Outcome of preparing a memory context (llama.cpp numbering).")
        .value("SUCCESS", llmem::memory_status::SUCCESS)
        .value("NO_UPDATE", llmem::memory_status::NO_UPDATE)
        .value("FAILED_PREPARE", llmem::memory_status::FAILED_PREPARE)
        .value("FAILED_COMPUTE", llmem::memory_status::FAILED_COMPUTE)
        .finalize();
    {
        const py::object status = m.attr("Status");
        for (int32_t v = 0; v < 4; ++v) {
            status_members[v] = status(v).release().ptr();
        }
    }

    py::native_enum<llmem::swa_type>(m, "SWAType", "enum.IntEnum", "Sliding-window attention kinds.")
        .value("NONE", llmem::swa_type::NONE)
        .value("STANDARD", llmem::swa_type::STANDARD)
        .value("CHUNKED", llmem::swa_type::CHUNKED)
        .value("SYMMETRIC", llmem::swa_type::SYMMETRIC)
        .finalize();

    m.def("status_combine", &llmem::status_combine, py::arg("a"), py::arg("b"),
          "Status of a context made of two: the first failure wins (a before b); otherwise SUCCESS if "
          "either succeeded, else NO_UPDATE.");
    m.def("status_is_fail", &llmem::status_is_fail, py::arg("status"),
          "True for FAILED_PREPARE and FAILED_COMPUTE.");

    m.attr("POS_OPEN")      = llmem::POS_OPEN;
    m.attr("SEQ_MAX_LIMIT") = llmem::SEQ_MAX_LIMIT;
}

} // namespace llmem::bind
