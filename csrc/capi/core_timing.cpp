// The pure C++ column of bench/bench_capi.py: the same calls the C API makes, on the compiled
// KV cache directly (no handle, no lock, no exception guard), timed in C++. It tells what the C
// API's own layer costs; it is not part of the C API.

#include "../bindings/pybind.h"

#include "llmem/batch.h"
#include "llmem/kv_cache.h"

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace llmem::bind {

namespace {

using clock_type = std::chrono::steady_clock;

double elapsed_ns(clock_type::time_point t0, size_t calls) {
    return std::chrono::duration<double, std::nano>(clock_type::now() - t0).count() / double(calls ? calls : 1);
}

} // namespace

void register_core_timing(py::module_ & m) {
    m.def(
        "_time_core",
        [](py::object memory, const std::string & op, std::vector<int32_t> seqs, std::vector<int32_t> p0,
           int64_t repeat) {
            kv_cache & c = *memory.attr("_core").cast<kv_cache *>();
            if (seqs.empty() || repeat < 1) {
                throw std::invalid_argument("_time_core needs sequences and repeat >= 1");
            }
            py::gil_scoped_release release;
            if (op == "seq_pos_max") {
                int64_t    acc = 0;
                const auto t0  = clock_type::now();
                for (int64_t i = 0; i < repeat; ++i) {
                    acc += c.seq_pos_max(seqs[size_t(i) % seqs.size()]);
                }
                const double ns = elapsed_ns(t0, size_t(repeat));
                return acc == -1 ? ns + 0.0 : ns;  // acc keeps the loop from being optimised away
            }
            if (op == "seq_rm_tail") {
                if (p0.size() != seqs.size()) {
                    throw std::invalid_argument("p0 must have one position per sequence");
                }
                const auto t0 = clock_type::now();
                for (size_t i = 0; i < seqs.size(); ++i) {
                    c.seq_rm(seqs[i], p0[i], -1);
                }
                return elapsed_ns(t0, seqs.size());
            }
            if (op == "decode_step") {
                // what llmem_capi.decode_step does: the decode batch, validation with positions
                // from the cache, the plan, the apply and each token's K row in input order
                const uint32_t        n = uint32_t(seqs.size());
                batch_allocr          balloc(c.n_seq_max());
                batch                 b;
                std::vector<int64_t>  rows(n);
                b.n_tokens = n;
                b.token.assign(n, 0);
                b.seq_id = seqs;
                b.seq_id_off.resize(size_t(n) + 1);
                for (uint32_t i = 0; i <= n; ++i) {
                    b.seq_id_off[i] = int32_t(i);
                }
                b.output.assign(n, 1);
                const auto t0 = clock_type::now();
                for (int64_t s = 0; s < repeat; ++s) {
                    balloc.init(b, &c, false);
                    kv_context ctx = kv_init_batch(c, balloc, n);
                    if (ctx.status() != memory_status::SUCCESS) {
                        throw std::runtime_error("_time_core: the cache is full");
                    }
                    ctx.apply();
                    const ubatch &    ub   = ctx.get_ubatch();
                    const slot_info & slot = ctx.get_slot();
                    for (uint32_t k = 0; k < ub.n_tokens; ++k) {
                        const uint32_t g = slot.n_per_group ? k / slot.n_per_group : 0;
                        rows[size_t(ub.data->batch_idx[k])] = int64_t(slot.strm[g]) * c.size() + slot.idxs[k];
                    }
                }
                return elapsed_ns(t0, size_t(repeat));
            }
            throw std::invalid_argument("unknown op " + op);
        },
        py::arg("memory"), py::arg("op"), py::arg("seqs"), py::arg("p0") = std::vector<int32_t>{},
        py::arg("repeat") = 1,
        "Bench only: nanoseconds per call of op (seq_pos_max, seq_rm_tail, decode_step) on a KVCache's core.");
}

} // namespace llmem::bind
