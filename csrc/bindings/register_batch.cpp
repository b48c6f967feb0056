#include "pybind.h"

#include "llmem/batch.h"
#include "llmem/errors.h"

#include <limits>
#include <optional>
#include <string>

namespace llmem::bind {

namespace {

// A memory written in Python: positions are asked through its methods (slower, but any object
// with seq_pos_min/seq_pos_max works).
class python_pos_source final : public llmem::seq_pos_source {
public:
    explicit python_pos_source(py::object memory)
        : pos_min_(memory.attr("seq_pos_min")), pos_max_(memory.attr("seq_pos_max")) {}

    int32_t seq_pos_min(int32_t seq) const override { return position(pos_min_, "seq_pos_min", seq); }
    int32_t seq_pos_max(int32_t seq) const override { return position(pos_max_, "seq_pos_max", seq); }

private:
    // The answer as an int32: a TypeError/ValueError naming the method, the id and the value
    // for anything else (a str, a float, None, a bool, an int outside int32).
    static int32_t position(const py::object & method, const char * name, int32_t seq) {
        py::object answer = method(seq);
        const auto describe = [&] {
            return std::string("memory.") + name + "(" + std::to_string(seq) + ") returned " +
                   py::str(py::type::of(answer).attr("__name__")).cast<std::string>() + " " +
                   py::repr(answer).cast<std::string>();
        };
        if (PyBool_Check(answer.ptr()) || !PyIndex_Check(answer.ptr())) {
            throw py::type_error(describe() + ": a position must be an int");
        }
        py::int_  value(py::reinterpret_steal<py::object>(PyNumber_Index(answer.ptr())));
        int       overflow = 0;
        const long long v  = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
        if (overflow != 0 || v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
            throw py::value_error(describe() + ", outside int32");
        }
        return int32_t(v);
    }

    py::object pos_min_;
    py::object pos_max_;
};

// Finds the C++ position source of `memory`: a compiled memory itself, a Python memory exposing
// its compiled core as `_pos_source`, or any object with seq_pos_min/seq_pos_max.
const llmem::seq_pos_source * resolve_memory(py::handle memory, py::object & keep_alive,
                                             std::optional<python_pos_source> & adapter) {
    if (memory.is_none()) {
        return nullptr;
    }
    if (py::isinstance<llmem::seq_pos_source>(memory)) {
        keep_alive = py::reinterpret_borrow<py::object>(memory);
        return keep_alive.cast<const llmem::seq_pos_source *>();
    }
    if (py::hasattr(memory, "_pos_source")) {
        py::object core = memory.attr("_pos_source");
        if (py::isinstance<llmem::seq_pos_source>(core)) {
            keep_alive = core;
            return keep_alive.cast<const llmem::seq_pos_source *>();
        }
    }
    if (py::hasattr(memory, "seq_pos_min") && py::hasattr(memory, "seq_pos_max")) {
        adapter.emplace(py::reinterpret_borrow<py::object>(memory));
        return &*adapter;
    }
    throw py::type_error("memory must be an llmem memory or have seq_pos_min/seq_pos_max methods, got " +
                         py::str(py::type::of(memory).attr("__name__")).cast<std::string>());
}

uint32_t checked_length(uint32_t n, py::ssize_t len, const char * name, const char *& first_name) {
    if (len < 0) {
        return n;
    }
    if (first_name == nullptr) {
        first_name = name;
        return uint32_t(len);
    }
    if (uint32_t(len) != n) {
        throw py::value_error(std::string(name) + " has " + std::to_string(len) + " entries but " + first_name +
                              " has " + std::to_string(n));
    }
    return n;
}

// Parses the per-token sequence ids: an int array [n] (one id each), an int array [n, k] (k ids
// each), or a sequence whose items are ints or sequences of ints.
void parse_seq_ids(py::handle obj, llmem::batch & b, py::ssize_t & n_out) {
    b.seq_id_off.clear();
    b.seq_id.clear();
    const bool ragged = py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj);
    bool nested = false;
    if (ragged) {
        for (py::handle item : obj) {
            if (!py::isinstance<py::int_>(item) && !py::hasattr(item, "__index__")) {
                nested = true;
                break;
            }
        }
    }
    if (!nested) {
        converted<int32_t> ids = to_int32(obj, "seq_id", 2);
        const py::ssize_t n = ids.shape.empty() ? 0 : ids.shape[0];
        const py::ssize_t k = ids.shape.size() == 2 ? ids.shape[1] : 1;
        b.seq_id = std::move(ids.values);
        b.seq_id_off.resize(size_t(n) + 1);
        for (py::ssize_t i = 0; i <= n; ++i) {
            b.seq_id_off[size_t(i)] = int32_t(i * k);
        }
        n_out = n;
        return;
    }
    b.seq_id_off.push_back(0);
    py::ssize_t n = 0;
    for (py::handle item : obj) {
        if (py::isinstance<py::int_>(item) || (py::hasattr(item, "__index__") && !py::hasattr(item, "__len__"))) {
            converted<int32_t> one = to_int32(py::make_tuple(item), "seq_id", 1);
            b.seq_id.push_back(one.values[0]);
        } else {
            converted<int32_t> ids = to_int32(item, "seq_id", 1);
            b.seq_id.insert(b.seq_id.end(), ids.values.begin(), ids.values.end());
        }
        b.seq_id_off.push_back(int32_t(b.seq_id.size()));
        ++n;
    }
    n_out = n;
}

llmem::batch make_batch(py::object token, py::object embd, py::object pos, py::object seq_id, py::object output) {
    llmem::batch b;
    uint32_t     n          = 0;
    const char * first_name = nullptr;
    if (!token.is_none()) {
        converted<int32_t> t = to_int32(token, "token", 1);
        n = checked_length(n, t.shape.empty() ? 0 : t.shape[0], "token", first_name);
        b.token = std::move(t.values);
    }
    if (!embd.is_none()) {
        converted<float> e = to_float32(embd, "embd", 2);
        if (e.shape.size() != 2) {
            throw py::value_error("embd must be a 2-D array [n_tokens, n_embd], got 1 dimension");
        }
        if (e.shape[1] == 0) {
            throw py::value_error("embd rows must have at least one value (n_embd = 0)");
        }
        n = checked_length(n, e.shape[0], "embd", first_name);
        b.n_embd = uint32_t(e.shape[1]);
        b.embd   = std::move(e.values);
    }
    if (!seq_id.is_none()) {
        py::ssize_t ns = 0;
        parse_seq_ids(seq_id, b, ns);
        n = checked_length(n, ns, "seq_id", first_name);
    }
    if (!output.is_none()) {
        converted<int8_t> o = to_flags(output, "output");
        n = checked_length(n, o.shape.empty() ? 0 : o.shape[0], "output", first_name);
        b.output = std::move(o.values);
    }
    if (!pos.is_none()) {
        converted<int32_t> p = to_int32(pos, "pos", 2);
        // [n] (one position per token), [n_pos * n] or [n_pos, n] (section-major, M-RoPE embeddings)
        const py::ssize_t len = p.shape.size() == 2 ? p.shape[1] : (p.shape.empty() ? 0 : p.shape[0]);
        if (first_name == nullptr) {
            n = checked_length(n, len, "pos", first_name);
        } else if (p.shape.size() == 2) {
            n = checked_length(n, len, "pos", first_name);
        }
        b.pos       = std::move(p.values);
        b.pos_given = true;  // an empty pos for a non-empty batch is a shape error, not 'no positions'
    }
    b.n_tokens = n;
    return b;
}

py::array_t<int32_t> copy_array(const std::vector<int32_t> & v) {
    py::array_t<int32_t> a(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

template <typename T>
py::array view_2d(const T * ptr, size_t rows, size_t cols, py::handle owner) {
    py::array_t<T> a({ py::ssize_t(rows), py::ssize_t(cols) },
                     { py::ssize_t(cols * sizeof(T)), py::ssize_t(sizeof(T)) }, ptr, owner);
    py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    return a;
}

std::string ubatch_repr(const llmem::ubatch & ub) {
    if (ub.empty()) {
        return "UBatch(empty)";
    }
    std::string s = "UBatch(n_tokens=" + std::to_string(ub.n_tokens) + ", n_seqs=" + std::to_string(ub.n_seqs) +
                    ", n_seq_tokens=" + std::to_string(ub.n_seq_tokens) + ", seq_id_unq=[";
    for (size_t i = 0; i < ub.data->seq_id_unq.size(); ++i) {
        s += (i ? ", " : "") + std::to_string(ub.data->seq_id_unq[i]);
    }
    return s + "], equal_seqs=" + (ub.equal_seqs ? "True" : "False") + ")";
}

} // namespace

void register_batch(py::module_ & m) {
    py::class_<llmem::seq_pos_source>(m, "seq_pos_source",
                                      "Compiled base of every memory: lets the allocator read positions.");

    py::class_<llmem::batch>(m, "Batch", R"doc(
A batch of tokens (or embeddings) for one decode call, in llama.cpp's array form.

token: int32[n] token ids (a value of -1 marks an entry without a token id);
embd: float32[n, n_embd] embeddings; pos: int32[n] positions (None: each sequence continues from
the memory's seq_pos_max + 1); seq_id: int32[n] (one sequence per token), int32[n, k], or a list of
per-token id lists (a token may belong to several sequences); output: bool[n] (None: only the last
token). Arrays are copied: later changes to them do not affect the batch.
)doc")
        .def(py::init(&make_batch), py::arg("token") = py::none(), py::arg("embd") = py::none(),
             py::arg("pos") = py::none(), py::arg("seq_id") = py::none(), py::arg("output") = py::none())
        .def_property_readonly("n_tokens", [](const llmem::batch & b) { return b.n_tokens; })
        .def("__len__", [](const llmem::batch & b) { return b.n_tokens; })
        .def_property_readonly("token", [](const llmem::batch & b) -> py::object {
            return b.token.empty() ? py::object(py::none()) : py::object(copy_array(b.token));
        })
        .def_property_readonly("embd", [](const llmem::batch & b) -> py::object {
            if (b.embd.empty()) {
                return py::none();
            }
            py::array_t<float> a({ py::ssize_t(b.n_tokens), py::ssize_t(b.n_embd) });
            std::copy(b.embd.begin(), b.embd.end(), a.mutable_data());
            return a;
        })
        .def_property_readonly("pos", [](const llmem::batch & b) -> py::object {
            return b.pos.empty() ? py::object(py::none()) : py::object(copy_array(b.pos));
        })
        .def_property_readonly("seq_id", [](const llmem::batch & b) -> py::object {
            if (b.seq_id_off.empty()) {
                return py::none();
            }
            py::list out;
            for (uint32_t i = 0; i < b.n_tokens; ++i) {
                py::list ids;
                for (int32_t k = b.seq_id_off[i]; k < b.seq_id_off[i + 1]; ++k) {
                    ids.append(b.seq_id[size_t(k)]);
                }
                out.append(ids);
            }
            return out;
        }, "Per-token id lists in the order given.")
        .def_property_readonly("output", [](const llmem::batch & b) -> py::object {
            if (b.output.empty()) {
                return py::none();
            }
            py::array_t<bool> a(py::ssize_t(b.output.size()));
            for (size_t i = 0; i < b.output.size(); ++i) {
                a.mutable_data()[i] = b.output[i] != 0;
            }
            return a;
        })
        .def("__repr__", [](const llmem::batch & b) {
            return "Batch(n_tokens=" + std::to_string(b.n_tokens) + (b.token.empty() ? "" : ", token") +
                   (b.embd.empty() ? "" : ", embd[" + std::to_string(b.n_embd) + "]") +
                   (b.pos.empty() ? ", pos=auto" : ", pos") + ")";
        });

    py::class_<llmem::ubatch>(m, "UBatch", R"doc(
A micro-batch produced by a split (read-only numpy views that keep the UBatch alive).

When equal_seqs is true the entries form n_seqs sequence sets of n_seq_tokens entries each.
An empty UBatch (n_tokens == 0, falsy) means the split had nothing more to give.
)doc")
        .def_property_readonly("n_tokens", [](const llmem::ubatch & u) { return u.n_tokens; })
        .def_property_readonly("n_seq_tokens", [](const llmem::ubatch & u) { return u.n_seq_tokens; })
        .def_property_readonly("n_seqs", [](const llmem::ubatch & u) { return u.n_seqs; })
        .def_property_readonly("n_seqs_unq", [](const llmem::ubatch & u) { return u.n_seqs_unq; })
        .def_property_readonly("n_pos", [](const llmem::ubatch & u) { return u.n_pos; })
        .def_property_readonly("n_embd", [](const llmem::ubatch & u) { return u.n_embd; })
        .def_property_readonly("equal_seqs", [](const llmem::ubatch & u) { return u.equal_seqs; })
        .def("__len__", [](const llmem::ubatch & u) { return u.n_tokens; })
        .def("__bool__", [](const llmem::ubatch & u) { return !u.empty(); })
        .def("__repr__", &ubatch_repr)
        .def_property_readonly("token", [](py::object self) -> py::object {
            const auto & u = self.cast<const llmem::ubatch &>();
            if (!u.has_token()) {
                return py::none();
            }
            return readonly_view(u.data->token.data(), u.n_tokens, self);
        }, "int32[n_tokens] token ids, or None for an embedding batch.")
        .def_property_readonly("embd", [](py::object self) -> py::object {
            const auto & u = self.cast<const llmem::ubatch &>();
            if (!u.has_embd()) {
                return py::none();
            }
            return view_2d(u.data->embd.data(), u.n_tokens, u.n_embd, self);
        }, "float32[n_tokens, n_embd] embeddings, or None.")
        .def_property_readonly("pos", [](py::object self) -> py::object {
            const auto & u = self.cast<const llmem::ubatch &>();
            if (u.empty()) {
                return py::array_t<int32_t>(0);
            }
            if (u.n_pos == 1) {
                return readonly_view(u.data->pos.data(), u.n_tokens, self);
            }
            return view_2d(u.data->pos.data(), u.n_pos, u.n_tokens, self);
        }, "int32[n_tokens] positions ([n_pos, n_tokens], section-major, for M-RoPE).")
        .def_property_readonly("n_seq_id", [](const llmem::ubatch & u) {
            py::array_t<int32_t> a(py::ssize_t(u.n_tokens));
            for (uint32_t k = 0; k < u.n_tokens; ++k) {
                a.mutable_data()[k] = u.n_seq_id(k);
            }
            return a;
        }, "int32[n_tokens]: how many sequences each entry belongs to.")
        .def_property_readonly("seq_id", [](const llmem::ubatch & u) {
            int32_t width = 0;
            for (uint32_t k = 0; k < u.n_tokens; ++k) {
                width = std::max(width, u.n_seq_id(k));
            }
            py::array_t<int32_t> a({ py::ssize_t(u.n_tokens), py::ssize_t(width) });
            int32_t * out = a.mutable_data();
            for (uint32_t k = 0; k < u.n_tokens; ++k) {
                const int32_t * ids = u.seq_ids(k);
                for (int32_t q = 0; q < width; ++q) {
                    out[size_t(k) * size_t(width) + size_t(q)] = q < u.n_seq_id(k) ? ids[q] : -1;
                }
            }
            return a;
        }, "int32[n_tokens, max ids]: each entry's ids, primary first, padded with -1.")
        .def_property_readonly("seq_id_list", [](const llmem::ubatch & u) {
            py::list out;
            for (uint32_t k = 0; k < u.n_tokens; ++k) {
                py::list ids;
                for (int32_t q = 0; q < u.n_seq_id(k); ++q) {
                    ids.append(u.seq_ids(k)[q]);
                }
                out.append(ids);
            }
            return out;
        }, "Each entry's ids as a list, primary first.")
        .def_property_readonly("seq_id_unq", [](py::object self) -> py::object {
            const auto & u = self.cast<const llmem::ubatch &>();
            if (u.empty()) {
                return py::array_t<int32_t>(0);
            }
            return readonly_view(u.data->seq_id_unq.data(), u.data->seq_id_unq.size(), self);
        }, "int32: the distinct sequence ids of the micro-batch, ascending.")
        .def_property_readonly("seq_idx", [](py::object self) -> py::object {
            const auto & u = self.cast<const llmem::ubatch &>();
            if (u.empty()) {
                return py::array_t<int32_t>(0);
            }
            return readonly_view(u.data->seq_idx.data(), u.data->seq_idx.size(), self);
        }, "int32[n_seq_max]: rank of each id in seq_id_unq, -1 when absent.")
        .def_property_readonly("output", [](py::object self) -> py::object {
            const auto & u = self.cast<const llmem::ubatch &>();
            if (u.empty()) {
                return py::array_t<bool>(0);
            }
            py::array a(py::dtype("bool"), { py::ssize_t(u.n_tokens) }, { py::ssize_t(1) },
                        u.data->output.data(), self);
            py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
            return a;
        }, "bool[n_tokens]: which entries produce an output.")
        .def_property_readonly("batch_idx", [](py::object self) -> py::object {
            const auto & u = self.cast<const llmem::ubatch &>();
            if (u.empty()) {
                return py::array_t<int32_t>(0);
            }
            return readonly_view(u.data->batch_idx.data(), u.n_tokens, self);
        }, "int32[n_tokens]: index of each entry in the input batch.");

    py::class_<llmem::batch_allocr>(m, "BatchAllocator", R"doc(
Validates a batch against a memory and splits it into micro-batches, as llama.cpp does.

init() raises BatchError (with .reason) for a batch llama.cpp refuses and then leaves the allocator
as it was. The split functions return an empty UBatch when done.
)doc")
        .def(py::init([](int64_t n_seq_max, std::optional<int64_t> n_vocab, std::optional<int64_t> n_embd,
                         int64_t n_pos_per_embd) {
                 if (n_seq_max < 1 || n_seq_max > llmem::SEQ_MAX_LIMIT) {
                     throw py::value_error("n_seq_max must be in [1, " + std::to_string(llmem::SEQ_MAX_LIMIT) +
                                           "], got " + std::to_string(n_seq_max));
                 }
                 if (n_vocab && (*n_vocab < 1 || *n_vocab > std::numeric_limits<int32_t>::max())) {
                     throw py::value_error("n_vocab must be a positive int32, got " + std::to_string(*n_vocab));
                 }
                 if (n_embd && (*n_embd < 1 || *n_embd > std::numeric_limits<int32_t>::max())) {
                     throw py::value_error("n_embd must be a positive int32, got " + std::to_string(*n_embd));
                 }
                 if (n_pos_per_embd < 1 || n_pos_per_embd > 4) {
                     throw py::value_error("n_pos_per_embd must be in [1, 4], got " + std::to_string(n_pos_per_embd));
                 }
                 return std::make_unique<llmem::batch_allocr>(int32_t(n_seq_max), n_vocab ? int32_t(*n_vocab) : -1,
                                                              n_embd ? uint32_t(*n_embd) : 0u,
                                                              uint32_t(n_pos_per_embd));
             }),
             py::arg("n_seq_max"), py::arg("n_vocab") = py::none(), py::arg("n_embd") = py::none(),
             py::arg("n_pos_per_embd") = 1)
        .def("init",
             [](llmem::batch_allocr & self, const llmem::batch & b, py::object memory, bool output_all) {
                 py::object                       keep_alive;
                 std::optional<python_pos_source> adapter;
                 const llmem::seq_pos_source *    source = resolve_memory(memory, keep_alive, adapter);
                 self.init(b, source, output_all);
             },
             py::arg("batch"), py::arg("memory") = py::none(), py::arg("output_all") = false,
             "Validate `batch` (positions checked against and filled from `memory`); raises BatchError.")
        .def("split_reset", &llmem::batch_allocr::split_reset, "Forget the split progress.")
        .def("split_simple",
             [](llmem::batch_allocr & self, int64_t n_ubatch) {
                 return self.split_simple(to_count(n_ubatch, "n_ubatch"));
             },
             py::arg("n_ubatch"), "Up to n_ubatch consecutive unused entries (at least one).")
        .def("split_equal",
             [](llmem::batch_allocr & self, int64_t n_ubatch, bool sequential, int64_t keep_tail) {
                 return self.split_equal(to_count(n_ubatch, "n_ubatch"), sequential, to_count(keep_tail, "keep_tail"));
             },
             py::arg("n_ubatch"), py::arg("sequential") = false, py::arg("keep_tail") = 0,
             "Equal-length sequence sets; keep_tail keeps each sequence's last entries together.")
        .def("split_seq",
             [](llmem::batch_allocr & self, int64_t n_ubatch) {
                 return self.split_seq(to_count(n_ubatch, "n_ubatch"));
             },
             py::arg("n_ubatch"), "Entries of one sequence set, narrowing to subsets.")
        .def("batch_pos_min", &llmem::batch_allocr::batch_pos_min, py::arg("seq_id"))
        .def("batch_pos_max", &llmem::batch_allocr::batch_pos_max, py::arg("seq_id"))
        .def_property_readonly("n_seq_max", &llmem::batch_allocr::n_seq_max)
        .def_property_readonly("n_pos_per_embd", &llmem::batch_allocr::n_pos_per_embd)
        .def_property_readonly("n_tokens", &llmem::batch_allocr::n_tokens)
        .def_property_readonly("n_used", &llmem::batch_allocr::n_used)
        .def_property_readonly("n_outputs", &llmem::batch_allocr::n_outputs)
        .def_property_readonly("has_coupled", &llmem::batch_allocr::has_coupled)
        .def_property_readonly("out_ids", [](const llmem::batch_allocr & self) { return copy_array(self.out_ids()); },
                               "Batch indices of the outputs, in the order their ubatches were produced.");
}

} // namespace llmem::bind
