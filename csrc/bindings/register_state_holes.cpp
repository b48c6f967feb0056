// State holes: the tensor sections of state bytes that a memory without host buffers leaves to
// the storage holding its tensors (torch on a device, or the caller's own in bookkeeping-only
// mode). Python opens a log around a state_write_into / state_read and gets the sections back.

#include "llmem/kv_cache.h"
#include "llmem/state_holes.h"
#include "pybind.h"

#include <cstdint>
#include <stdexcept>

namespace llmem::bind {

namespace {

// The first byte of a contiguous buffer (bytes, bytearray, memoryview, numpy array...).
uintptr_t buffer_address(py::handle obj, size_t & size) {
    Py_buffer view{};
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_ANY_CONTIGUOUS) != 0) {
        PyErr_Clear();
        throw py::type_error("buffer must be a contiguous bytes-like object");
    }
    const auto at = reinterpret_cast<uintptr_t>(view.buf);
    size          = size_t(view.len);
    PyBuffer_Release(&view);
    return at;
}

} // namespace

void register_state_holes(py::module_ & m) {
    m.def(
        "collect_state_holes",
        [](const py::object & call, const py::handle & buffer) {
            state_hole_log log;
            py::object     result;
            {
                state_hole_scope scope(log);
                result = call();
            }
            // None: the holes lie in the bytes call() returned
            size_t          size = 0;
            const uintptr_t base = buffer_address(buffer.is_none() ? result : buffer, size);
            constexpr py::ssize_t cols = 10;
            py::array_t<int64_t>  holes({ py::ssize_t(log.holes.size()), cols });
            auto                  h = holes.mutable_unchecked<2>();
            for (size_t i = 0; i < log.holes.size(); ++i) {
                const state_hole & x   = log.holes[i];
                const auto         off = reinterpret_cast<uintptr_t>(x.at) - base;
                if (reinterpret_cast<uintptr_t>(x.at) < base || off + x.len > size) {
                    throw std::logic_error("a state hole lies outside the buffer it was collected for");
                }
                const auto r = py::ssize_t(i);
                h(r, 0)      = int64_t(reinterpret_cast<uintptr_t>(x.owner));
                h(r, 1)      = int64_t(off);
                h(r, 2)      = int64_t(x.len);
                h(r, 3)      = int64_t(x.layer);
                h(r, 4)      = int64_t(x.kind);
                h(r, 5)      = int64_t(x.stream);
                h(r, 6)      = int64_t(x.cell_stream);
                h(r, 7)      = int64_t(x.n_cols);
                h(r, 8)      = int64_t(x.cells_at);
                h(r, 9)      = int64_t(x.n_cells);
            }
            py::array_t<int64_t> cells(py::ssize_t(log.cells.size()));
            auto                 c = cells.mutable_unchecked<1>();
            for (size_t i = 0; i < log.cells.size(); ++i) {
                c(py::ssize_t(i)) = int64_t(log.cells[i]);
            }
            return py::make_tuple(result, holes, cells);
        },
        py::arg("call"), py::arg("buffer"),
        "Run call() with a state hole log open on this thread; returns (call's result, holes, cells), offsets "
        "relative to buffer (None: to the bytes call() returns). "
        "holes: int64 [n, 10] rows (owner address, offset in buffer, bytes, cache layer, kind 0 K rows / "
        "1 V rows / 2 V transposed / 3 r rows / 4 s rows, row stream, cell stream, V columns, first cell, cell count); cells: "
        "int64 cell indices the rows reference.");
}

} // namespace llmem::bind
