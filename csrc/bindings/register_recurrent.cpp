#include "pybind.h"

#include "llmem/batch.h"
#include "llmem/rs_checkpoints.h"
#include "llmem/rs_memory.h"

#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace llmem::bind {

namespace {

// The compiled recurrent memory plus the numpy arrays it reads and writes, kept alive here so
// the raw pointers handed to the core stay valid for the object's lifetime.
class py_rs_memory : public llmem::rs_memory {
public:
    using llmem::rs_memory::rs_memory;

    std::vector<py::array> arrays;
};

// Row-major, writeable, C-contiguous 2-D array of (1 + n_rs_seq) * size rows and a dtype that
// matches the ggml type id; returns its row size in bytes.
uint64_t check_state_array(const py::array & a, const char * kind, size_t layer, int32_t type_id, uint64_t rows) {
    const std::string where = std::string(kind) + " array of present layer " + std::to_string(layer);
    if (a.ndim() != 2) {
        throw std::invalid_argument(where + " must be 2-D, got " + std::to_string(a.ndim()) + " dimensions");
    }
    if (!(a.flags() & py::array::c_style) || !a.writeable()) {
        throw std::invalid_argument(where + " must be C-contiguous and writeable");
    }
    const bool f32 = a.dtype().is(py::dtype::of<float>());
    const bool f16 = a.dtype().kind() == 'f' && a.itemsize() == 2;
    if ((type_id == RS_TYPE_F32 && !f32) || (type_id == RS_TYPE_F16 && !f16) ||
        (type_id != RS_TYPE_F32 && type_id != RS_TYPE_F16)) {
        throw std::invalid_argument(where + " has a dtype that does not match type id " + std::to_string(type_id));
    }
    if (uint64_t(a.shape(0)) != rows) {
        throw std::invalid_argument(where + " must have " + std::to_string(rows) + " rows, got " +
                                    std::to_string(a.shape(0)));
    }
    return uint64_t(a.shape(1)) * uint64_t(a.itemsize());
}

void attach(py_rs_memory & mem, uint32_t n_layer_total, std::vector<py::array> r,
            std::vector<py::array> s, int32_t type_r, int32_t type_s, std::vector<py::object> p) {
    if (r.size() != s.size()) {
        throw std::invalid_argument("r and s must list the same present layers");
    }
    if (!p.empty() && p.size() != r.size()) {
        throw std::invalid_argument("p must be empty or list every present layer (None where it has no P array)");
    }
    const uint64_t rows = (uint64_t(mem.n_rs_seq()) + 1) * mem.size();
    llmem::rs_buffers b;
    b.n_layer_total = n_layer_total;
    b.type_r = type_r;
    b.type_s = type_s;
    for (size_t l = 0; l < r.size(); ++l) {
        b.r_row_bytes.push_back(check_state_array(r[l], "r", l, type_r, rows));
        b.s_row_bytes.push_back(check_state_array(s[l], "s", l, type_s, rows));
        b.r.push_back(static_cast<uint8_t *>(r[l].mutable_data()));
        b.s.push_back(static_cast<uint8_t *>(s[l].mutable_data()));
    }
    std::vector<py::array> keep_p;
    for (size_t l = 0; l < p.size(); ++l) {
        if (p[l].is_none()) {
            b.p_row_bytes.push_back(0);
            b.p.push_back(nullptr);
            continue;
        }
        py::array a = p[l].cast<py::array>();
        const uint64_t rb = check_state_array(a, "p", l, type_r, rows);
        if (rb == 0) {
            throw std::invalid_argument("p array of present layer " + std::to_string(l) + " has rows of 0 bytes");
        }
        b.p_row_bytes.push_back(rb);
        b.p.push_back(static_cast<uint8_t *>(a.mutable_data()));
        keep_p.push_back(a);
    }
    mem.attach_buffers(b);
    std::vector<py::array> keep(r);
    keep.insert(keep.end(), s.begin(), s.end());
    keep.insert(keep.end(), keep_p.begin(), keep_p.end());
    mem.arrays = std::move(keep);
}

// No arrays: a memory whose rows a storage holds elsewhere (torch, or the caller's own); the
// row sizes are still the core's, for the state bytes and the checks.
void attach_geometry(py_rs_memory & mem, uint32_t n_layer_total, const std::vector<uint64_t> & r_row_bytes,
                     const std::vector<uint64_t> & s_row_bytes, int32_t type_r, int32_t type_s) {
    if (r_row_bytes.size() != s_row_bytes.size()) {
        throw std::invalid_argument("r and s must list the same present layers");
    }
    llmem::rs_buffers b;
    b.n_layer_total = n_layer_total;
    b.type_r = type_r;
    b.type_s = type_s;
    b.r_row_bytes = r_row_bytes;
    b.s_row_bytes = s_row_bytes;
    b.r.assign(r_row_bytes.size(), nullptr);
    b.s.assign(s_row_bytes.size(), nullptr);
    mem.attach_buffers(b);
    mem.arrays.clear();
}

py::dict cells_snapshot(const py_rs_memory & mem) {
    const size_t n = mem.size();
    py::array_t<int32_t> pos(n), src(n), src0(n), tail(n);
    auto p = pos.mutable_unchecked<1>();
    auto s = src.mutable_unchecked<1>();
    auto s0 = src0.mutable_unchecked<1>();
    auto t = tail.mutable_unchecked<1>();
    py::list ids(n);
    for (size_t i = 0; i < n; ++i) {
        const llmem::rs_cell & c = mem.cell(uint32_t(i));
        p(i) = c.pos;
        s(i) = c.src;
        s0(i) = c.src0;
        t(i) = mem.tail(int32_t(i));
        py::tuple tup(c.ids.size());
        for (size_t j = 0; j < c.ids.size(); ++j) {
            tup[j] = c.ids[j];
        }
        ids[i] = std::move(tup);
    }
    py::dict d;
    d["pos"] = pos;
    d["src"] = src;
    d["src0"] = src0;
    d["tail"] = tail;
    d["seq_ids"] = ids;
    return d;
}

py::bytes state_write(const py_rs_memory & mem, int32_t seq, uint32_t flags) {
    const size_t n = mem.state_write_size(seq, flags);
    py::bytes out(nullptr, 0);
    PyObject * raw = PyBytes_FromStringAndSize(nullptr, py::ssize_t(n));
    if (raw == nullptr) {
        throw py::error_already_set();
    }
    out = py::reinterpret_steal<py::bytes>(raw);
    uint8_t * dst = reinterpret_cast<uint8_t *>(PyBytes_AS_STRING(raw));
    {
        py::gil_scoped_release release;
        mem.state_write(dst, n, seq, flags);
    }
    return out;
}

size_t state_read(py_rs_memory & mem, const py::buffer & data, int32_t seq, uint32_t flags, size_t offset,
                  bool whole_buffer) {
    const py::buffer_info info = data.request();
    if (info.ndim != 1 || info.itemsize != 1 || (info.ndim == 1 && info.strides[0] != 1)) {
        throw std::invalid_argument("state data must be a contiguous bytes-like object");
    }
    const size_t n = size_t(info.size);
    if (offset > n) {
        throw std::invalid_argument("offset " + std::to_string(offset) + " is beyond the " + std::to_string(n) +
                                    " bytes of state data");
    }
    const uint8_t * ptr = static_cast<const uint8_t *>(info.ptr) + offset;
    py::gil_scoped_release release;
    return mem.state_read(ptr, n - offset, seq, flags, whole_buffer);
}

// Gather into `out`, a C-contiguous writeable array of at least n_seqs rows of the array's width.
void gather_states(llmem::rs_context & ctx, int kind, size_t layer, py::array & out) {
    const uint64_t rb = ctx.row_bytes(kind, layer);
    const uint64_t n_seqs = ctx.get_ubatch().n_seqs;
    if (!(out.flags() & py::array::c_style) || !out.writeable() || out.ndim() != 2 ||
        uint64_t(out.shape(0)) < n_seqs || uint64_t(out.shape(1)) * uint64_t(out.itemsize()) != rb) {
        throw std::invalid_argument("gather: out must be a writeable C-contiguous array of " + std::to_string(n_seqs) +
                                    " rows of " + std::to_string(rb) + " bytes");
    }
    uint8_t * dst = static_cast<uint8_t *>(out.mutable_data());
    py::gil_scoped_release release;
    ctx.gather(kind, layer, dst);
}

void store_states(llmem::rs_context & ctx, int kind, size_t layer, const py::array & rows, uint32_t max_planes) {
    const uint64_t rb = ctx.row_bytes(kind, layer);
    const py::ssize_t n_seqs = py::ssize_t(ctx.get_ubatch().n_seqs);
    const py::ssize_t width = py::ssize_t(rb / uint64_t(rows.itemsize()));
    const char * name = kind == 0 ? "r" : kind == 1 ? "s" : "p";
    if (!(rows.flags() & py::array::c_style)) {
        throw std::invalid_argument(std::string("new ") + name + " states must be a C-contiguous array");
    }
    uint32_t n_planes = 0;
    if (rows.ndim() == 2 && rows.shape(0) == n_seqs && rows.shape(1) == width) {
        n_planes = 1;
    } else if (rows.ndim() == 3 && rows.shape(0) >= 1 && rows.shape(0) <= py::ssize_t(max_planes) &&
               rows.shape(1) == n_seqs && rows.shape(2) == width) {
        n_planes = uint32_t(rows.shape(0));
    } else {
        std::string shape = "(";
        for (py::ssize_t d = 0; d < rows.ndim(); ++d) {
            shape += (d ? ", " : "") + std::to_string(rows.shape(d));
        }
        throw std::invalid_argument(std::string("new ") + name + " states must have shape (" +
                                    std::to_string(n_seqs) + ", " + std::to_string(width) + ") or (k, " +
                                    std::to_string(n_seqs) + ", " + std::to_string(width) + ") with 1 <= k <= " +
                                    std::to_string(max_planes) + ", got " + shape + (rows.ndim() == 1 ? ",)" : ")"));
    }
    const uint8_t * src = static_cast<const uint8_t *>(rows.data());
    py::gil_scoped_release release;
    ctx.store(kind, layer, src, n_planes);
}

// -- checkpoints -----------------------------------------------------------------------------------
// The pool keeps a reference to the memory's Python object: its rows' layout is checked against
// the memory at every call, and the row copies run without the GIL (the memory's Python lock,
// taken by the callers in llmem.recurrent, keeps its cells still meanwhile).

void register_rs_checkpoints(py::module_ & m) {
    py::class_<llmem::rs_checkpoints>(m, "rs_checkpoints", R"doc(
A bounded pool of recurrent-state checkpoints (private; use RecurrentMemory.checkpoint_*).
)doc")
        .def(py::init([](const py_rs_memory & mem, uint64_t max_count, uint64_t max_bytes, bool copy_rows) {
                 return std::make_unique<llmem::rs_checkpoints>(mem, max_count, max_bytes, copy_rows);
             }),
             py::arg("mem"), py::arg("max_count"), py::arg("max_bytes"), py::arg("copy_rows") = true)
        .def_property_readonly("copies_rows", &llmem::rs_checkpoints::copies_rows)
        .def("save", [](llmem::rs_checkpoints & pool, const py_rs_memory & mem, int32_t seq) {
                 py::gil_scoped_release release;
                 return pool.save(mem, seq);
             }, py::arg("mem"), py::arg("seq"))
        .def("restore", [](const llmem::rs_checkpoints & pool, py_rs_memory & mem, int64_t id, int32_t seq) {
                 py::gil_scoped_release release;
                 pool.restore(mem, id, seq);
             }, py::arg("mem"), py::arg("id"), py::arg("seq"))
        .def("drop", &llmem::rs_checkpoints::drop, py::arg("id"))
        .def("clear", &llmem::rs_checkpoints::clear)
        .def("contains", &llmem::rs_checkpoints::contains, py::arg("id"))
        .def("pos", &llmem::rs_checkpoints::pos, py::arg("id"))
        .def("set_limits", &llmem::rs_checkpoints::set_limits, py::arg("max_count"), py::arg("max_bytes"))
        .def("has_room", &llmem::rs_checkpoints::has_room)
        .def_property_readonly("checkpoint_bytes", &llmem::rs_checkpoints::checkpoint_bytes)
        .def_property_readonly("count", &llmem::rs_checkpoints::count)
        .def_property_readonly("bytes_used", &llmem::rs_checkpoints::bytes_used)
        .def_property_readonly("max_count", &llmem::rs_checkpoints::max_count)
        .def_property_readonly("max_bytes", &llmem::rs_checkpoints::max_bytes);
}

} // namespace

void register_recurrent(py::module_ & m) {
    // Registered first so that init_batch/init_full/init_update have Python signatures (see
    // register_kv_cache: pybind11 crashed formatting the TypeError of a bad argument otherwise).
    py::class_<llmem::rs_context> context_class(m, "rs_context", R"doc(
One plan of a recurrent memory (private; use the context llmem.RecurrentMemory returns).
)doc");

    py::class_<py_rs_memory, llmem::seq_pos_source>(m, "rs_memory", R"doc(
The cell bookkeeping of llama.cpp's recurrent-state memory (private; use llmem.RecurrentMemory).
)doc")
        .def(py::init<uint32_t, int32_t, uint32_t>(), py::arg("size"), py::arg("n_seq_max"), py::arg("n_rs_seq"))
        .def("attach_geometry", &attach_geometry, py::arg("n_layer_total"), py::arg("r_row_bytes"),
             py::arg("s_row_bytes"), py::arg("type_r"), py::arg("type_s"),
             "No arrays (a storage holds the rows): only the row sizes of each present layer.")
        .def_property_readonly("address", [](const py_rs_memory & mem) { return reinterpret_cast<uintptr_t>(&mem); },
                               "This memory's address: the owner column of collect_state_holes.")
        .def("attach_buffers", &attach, py::arg("n_layer_total"), py::arg("r"), py::arg("s"), py::arg("type_r"),
             py::arg("type_s"), py::arg("p") = std::vector<py::object>(),
             "Use these numpy arrays (one r and one s per present layer, and optionally one p or None each) as the state.")
        .def("clear", [](py_rs_memory & mem, bool data) {
                 py::gil_scoped_release release;
                 mem.clear(data);
             }, py::arg("data"))
        .def("seq_rm", &llmem::rs_memory::seq_rm, py::arg("seq"), py::arg("p0"), py::arg("p1"))
        .def("seq_cp", &llmem::rs_memory::seq_cp, py::arg("seq_src"), py::arg("seq_dst"), py::arg("p0"),
             py::arg("p1"))
        .def("seq_keep", &llmem::rs_memory::seq_keep, py::arg("seq"))
        .def("seq_add", &llmem::rs_memory::seq_add, py::arg("seq"), py::arg("p0"), py::arg("p1"), py::arg("shift"))
        .def("seq_div", &llmem::rs_memory::seq_div, py::arg("seq"), py::arg("p0"), py::arg("p1"), py::arg("d"))
        .def("check_seq_add", &llmem::rs_memory::check_seq_add, py::arg("seq"), py::arg("p0"), py::arg("p1"),
             py::arg("shift"), "Raise what seq_add would raise; changes nothing.")
        .def("check_seq_div", &llmem::rs_memory::check_seq_div, py::arg("seq"), py::arg("p0"), py::arg("p1"),
             py::arg("d"), "Raise what seq_div would raise; changes nothing.")
        .def("seq_pos_min", &llmem::rs_memory::seq_pos_min, py::arg("seq"))
        .def("seq_pos_max", &llmem::rs_memory::seq_pos_max, py::arg("seq"))
        .def("seq_state_row", &llmem::rs_memory::seq_state_row, py::arg("seq"),
             "Row of seq's current state in every present layer's arrays (a pending rollback: the "
             "snapshot it selects); -1 when seq holds none.")
        .def("init_batch",
             [](py::object self, llmem::batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
                 return owned_by(py::cast(self.cast<py_rs_memory &>().init_batch(balloc, n_ubatch, embd_all)), self);
             },
             py::arg("balloc"), py::arg("n_ubatch"), py::arg("embd_all"))
        .def("init_full", [](py::object self) { return owned_by(py::cast(self.cast<py_rs_memory &>().init_full()), self); })
        .def("init_update",
             [](py::object self) { return owned_by(py::cast(self.cast<py_rs_memory &>().init_update()), self); })
        .def("state_write", &state_write, py::arg("seq"), py::arg("flags"))
        .def("state_read", &state_read, py::arg("data"), py::arg("seq"), py::arg("flags"), py::arg("offset") = 0,
             py::arg("whole_buffer") = true,
             "Read a recurrent block at `offset`; returns the bytes used. Raises StateError, unchanged.")
        .def("cells", &cells_snapshot)
        .def("rs_idx", [](const py_rs_memory & mem) {
            py::array_t<uint32_t> out(size_t(mem.n_seq_max()));
            auto o = out.mutable_unchecked<1>();
            for (int32_t q = 0; q < mem.n_seq_max(); ++q) {
                o(q) = mem.rs_idx(q);
            }
            return out;
        })
        .def_property_readonly("size", &llmem::rs_memory::size)
        .def_property_readonly("n_seq_max", &llmem::rs_memory::n_seq_max)
        .def_property_readonly("n_rs_seq", &llmem::rs_memory::n_rs_seq)
        .def("set_b11549_rules", &llmem::rs_memory::set_b11549_rules, py::arg("on"), py::arg("no_layers"),
             "seq_rm as llama.cpp b11549 (shared-cell rollback refused; a layerless memory moves the position only).")
        .def_property_readonly("b11549_rules", &llmem::rs_memory::b11549_rules)
        .def_property_readonly("head", &llmem::rs_memory::head)
        .def_property_readonly("used", &llmem::rs_memory::used)
        .def_property_readonly("tokens_placed", &llmem::rs_memory::tokens_placed)
        .def_property_readonly("n_seqs_present",
                               [](const py_rs_memory & mem) {
                                   uint32_t n = 0;
                                   for (int32_t q = 0; q < mem.n_seq_max(); ++q) {
                                       n += mem.seq_pos_max(q) != -1 ? 1u : 0u;
                                   }
                                   return n;
                               },
                               "Number of sequence ids that hold a cell (for stats()).")
        .def_property_readonly("n", &llmem::rs_memory::n)
        .def_property_readonly("rs_z", &llmem::rs_memory::rs_z);

    context_class
        .def_property_readonly("status", &llmem::rs_context::status)
        .def_property_readonly("is_full", &llmem::rs_context::is_full)
        .def_property_readonly("n_ubatches", &llmem::rs_context::n_ubatches)
        .def_property_readonly("applied", &llmem::rs_context::applied)
        .def_property_readonly("ubatch", [](const llmem::rs_context & ctx) -> py::object {
            if (ctx.n_ubatches() == 0) {
                return py::none();
            }
            return py::cast(ctx.get_ubatch());
        })
        .def("next", &llmem::rs_context::next)
        .def("apply", &llmem::rs_context::apply)
        .def_property_readonly("n_seqs", [](const llmem::rs_context & ctx) { return ctx.get_ubatch().n_seqs; })
        .def_property_readonly("n_rs", &llmem::rs_context::n_rs)
        .def_property_readonly("head", &llmem::rs_context::head)
        .def_property_readonly("rs_z", &llmem::rs_context::rs_z)
        .def("gather", &gather_states, py::arg("kind"), py::arg("layer"), py::arg("out"),
             "Write the input states of the ubatch's sets for one array (once per ubatch) into out.")
        .def("store", &store_states, py::arg("kind"), py::arg("layer"), py::arg("rows"), py::arg("max_planes"),
             "Write new states (n_seqs rows, or k planes of them) into the ubatch's cells.")
        .def("mark_gathered", [](llmem::rs_context & ctx, int kind, size_t layer) { ctx.gather(kind, layer, nullptr); },
             py::arg("kind"), py::arg("layer"),
             "A buffer-less memory's gather: the checks and the once-per-micro-batch mark; the storage moves the rows.")
        .def("mark_stored",
             [](llmem::rs_context & ctx, int kind, size_t layer, uint32_t n_planes) {
                 ctx.store(kind, layer, nullptr, n_planes);
             },
             py::arg("kind"), py::arg("layer"), py::arg("n_planes"),
             "A buffer-less memory's store: the checks (and the gather mark); the storage writes the rows.")
        .def("s_copy_all", [](llmem::rs_context & ctx) {
            const std::vector<int32_t> & c = ctx.s_copy_all();
            return py::array_t<int32_t>(py::ssize_t(c.size()), c.data());
        });

    register_rs_checkpoints(m);
}

} // namespace llmem::bind
