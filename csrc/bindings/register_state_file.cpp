#include "pybind.h"

#include "llmem/state_file.h"

#include <limits>
#include <string>

namespace llmem::bind {

namespace {

// The memory a header describes, from the Python classes' compiled parts. The recurrent
// memory's compiled class is private to its binding file; reach it through the shared base.
llmem::state_memory as_state_memory(uint32_t kind, const std::vector<llmem::kv_cache *> & caches, py::handle recr) {
    llmem::state_memory mem;
    mem.kind = llmem::memory_kind(kind);
    for (const llmem::kv_cache * c : caches) {
        if (c == nullptr) {
            throw py::type_error("caches must be compiled KV caches");
        }
        mem.caches.push_back(c);
    }
    if (!recr.is_none()) {
        auto * recr_mem = dynamic_cast<const llmem::rs_memory *>(recr.cast<llmem::seq_pos_source *>());
        if (recr_mem == nullptr) {
            throw py::type_error("recr must be the compiled core of a RecurrentMemory or None");
        }
        mem.recr = recr_mem;
    }
    return mem;
}

struct byte_span {
    const uint8_t * data;
    size_t          size;
};

byte_span as_bytes(const py::buffer_info & info) {
    if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1) {
        throw py::type_error("state data must be a contiguous bytes-like object");
    }
    return { static_cast<const uint8_t *>(info.ptr), size_t(info.size) };
}

int32_t as_seq(int64_t seq) {
    if (seq < -1 || seq > std::numeric_limits<int32_t>::max()) {
        throw py::value_error("seq_id must be -1 or a sequence id, got " + std::to_string(seq));
    }
    return int32_t(seq);
}

uint32_t as_flags(int64_t flags) {
    if (flags < 0 || flags > std::numeric_limits<uint32_t>::max()) {
        throw py::value_error("flags must fit in uint32, got " + std::to_string(flags));
    }
    return uint32_t(flags);
}

} // namespace

void register_state_file(py::module_ & m) {
    m.attr("STATE_HEADER")       = llmem::STATE_HEADER;
    m.attr("STATE_FILE_VERSION") = llmem::STATE_FILE_VERSION;
    m.attr("STATE_FILE_MAGIC")   = py::bytes(llmem::STATE_FILE_MAGIC, sizeof(llmem::STATE_FILE_MAGIC));

    m.def(
        "state_header",
        [](uint32_t kind, const std::vector<llmem::kv_cache *> & caches, py::object recr, int64_t seq, int64_t flags,
           py::buffer payload) {
            const llmem::state_memory mem  = as_state_memory(kind, caches, recr);
            const py::buffer_info     info = payload.request();
            const byte_span           p    = as_bytes(info);
            std::vector<uint8_t>      header;
            {
                py::gil_scoped_release release;
                header = llmem::state_header_write(mem, as_seq(seq), as_flags(flags), p.data, p.size);
            }
            return py::bytes(reinterpret_cast<const char *>(header.data()), header.size());
        },
        py::arg("kind"), py::arg("caches"), py::arg("recr"), py::arg("seq_id"), py::arg("flags"), py::arg("payload"),
        "The versioned header for `payload` (raw state bytes of this memory): magic, version, kind, "
        "flags, scope, configuration record, payload length and CRC-32.");

    m.def(
        "state_header_check",
        [](uint32_t kind, const std::vector<llmem::kv_cache *> & caches, py::object recr, py::buffer data, int64_t seq,
           int64_t flags) {
            const llmem::state_memory mem  = as_state_memory(kind, caches, recr);
            const py::buffer_info     info = data.request();
            const byte_span           d    = as_bytes(info);
            const int32_t             s    = as_seq(seq);
            const uint32_t            f    = as_flags(flags);
            py::gil_scoped_release release;
            return llmem::state_header_check(mem, d.data, d.size, s, f);
        },
        py::arg("kind"), py::arg("caches"), py::arg("recr"), py::arg("data"), py::arg("seq_id"), py::arg("flags"),
        "Check the versioned header against this memory and the read; returns the payload offset "
        "(StateError naming the first mismatch).");

    m.def(
        "state_config",
        [](uint32_t kind, const std::vector<llmem::kv_cache *> & caches, py::object recr) {
            py::list out;
            for (const auto & f : llmem::state_config(as_state_memory(kind, caches, recr))) {
                out.append(py::make_tuple(f.name, f.value));
            }
            return out;
        },
        py::arg("kind"), py::arg("caches"), py::arg("recr"),
        "The configuration record a header of this memory holds: [(name, value), ...].");
}

} // namespace llmem::bind
