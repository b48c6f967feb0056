// A benchmark driver of llama.cpp's own memory classes, for `python -m bench`.
//
// Written for llmem from the headers of the llama-cpp-python 0.3.36 sdist (vendor/llama.cpp/src,
// include, ggml/include) and linked against the libllama that llama-cpp-python installs, whose
// internal C++ symbols are exported. It drives llama_kv_cache, llama_memory_recurrent and
// llama_batch_allocr the way llama_context::decode does (batch -> allocator init -> init_batch ->
// apply -> graph inputs), without a llama_context and without model compute, so that the memory
// work alone is timed. The timing loops run here, in C++, so that no foreign-call overhead is
// charged to llama.cpp; Python (bench/llama_driver.py) loads this library with ctypes.
//
// Every entry point returns 0 (or a value) on success and a negative number on failure, with the
// reason in lmd_last_error(); no exception crosses the C boundary.

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-batch.h"
#include "llama-kv-cache.h"
#include "llama-memory-recurrent.h"
#include "llama-model.h"
#include "llama.h"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#define LMD_API extern "C" __attribute__((visibility("default")))

namespace {

thread_local std::string g_error;

int fail(const std::string & why) {
    g_error = why;
    return -1;
}

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

void quiet_log(ggml_log_level, const char *, void *) {}

// A tensor whose shape is set per call (as the graph re-creates its inputs per micro-batch) and
// whose data lives in memory this driver owns, in a host buffer so that set_input_* accept it.
struct host_tensor {
    ggml_tensor *         t   = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    void *                mem = nullptr;
    size_t                cap = 0;  // bytes

    void reshape(int64_t ne0, int64_t ne1 = 1, int64_t ne2 = 1, int64_t ne3 = 1) {
        t->ne[0] = ne0;
        t->ne[1] = ne1;
        t->ne[2] = ne2;
        t->ne[3] = ne3;
        t->nb[0] = ggml_type_size(t->type);
        t->nb[1] = t->nb[0] * size_t(ne0);
        t->nb[2] = t->nb[1] * size_t(ne1);
        t->nb[3] = t->nb[2] * size_t(ne2);
        const size_t need = t->nb[3] * size_t(ne3);
        if (need > cap) {
            release();
            cap = std::max<size_t>(need, 4096);
            mem = std::aligned_alloc(64, (cap + 63) / 64 * 64);
            buf = ggml_backend_cpu_buffer_from_ptr(mem, cap);
        }
        t->buffer = buf;
        t->data   = mem;
    }

    void release() {
        if (buf) {
            ggml_backend_buffer_free(buf);
            buf = nullptr;
        }
        std::free(mem);
        mem = nullptr;
        cap = 0;
    }
};

struct graph_inputs {
    ggml_context * ctx = nullptr;
    host_tensor    k_idxs, v_idxs, mask_f32, mask_f16;

    graph_inputs() {
        ggml_init_params p = { 8 * ggml_tensor_overhead(), nullptr, true };
        ctx                = ggml_init(p);
        k_idxs.t           = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, 1);
        v_idxs.t           = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, 1);
        mask_f32.t         = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1);
        mask_f16.t         = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, 1, 1, 1, 1);
    }

    ~graph_inputs() {
        k_idxs.release();
        v_idxs.release();
        mask_f32.release();
        mask_f16.release();
        ggml_free(ctx);
    }
};

// What a decode step and a prefill share: the batch the application fills, the allocator that
// checks and splits it, and the memory it goes to.
struct batch_path {
    const llama_model &                 model;
    llama_memory_i *                    mem;
    uint32_t                            n_seq_max;
    std::unique_ptr<llama_batch_ext>    batch;
    std::unique_ptr<llama_batch_allocr> balloc;

    batch_path(const llama_model & m, llama_memory_i * mem_, uint32_t n_seq_max_, size_t n_tokens_max) :
        model(m),
        mem(mem_),
        n_seq_max(n_seq_max_) {
        const auto & hp = m.hparams;
        batch = std::make_unique<llama_batch_ext>(n_tokens_max, size_t(hp.n_embd), size_t(hp.n_embd),
                                                  llama_seq_id(n_seq_max_), mem_,
                                                  llama_vocab_n_tokens(&m.vocab), size_t(hp.n_pos_per_embd()));
        balloc = std::make_unique<llama_batch_allocr>(hp.n_pos_per_embd());
    }

    // One token per listed sequence (or the given positions), as a server fills the batch of a
    // step: the next position of each sequence, its output requested. False when llama.cpp
    // refuses the batch.
    bool fill(const int32_t * seq_ids, const int32_t * pos, int32_t n) {
        batch->clear();
        for (int32_t i = 0; i < n; ++i) {
            const int32_t idx = batch->add_token(seq_ids[i]);
            if (idx < 0) {
                return false;
            }
            const llama_pos p = pos ? pos[i] : mem->seq_pos_max(seq_ids[i]) + 1;
            batch->set_token_id(idx, 0);
            batch->set_token_pos(idx, &p);
            batch->set_output(idx, true);
        }
        return balloc->init(*batch, model.vocab, false);
    }
};

struct kv_driver {
    const llama_model &             model;
    std::unique_ptr<llama_kv_cache> kv;
    std::unique_ptr<batch_path>     path;
    llama_memory_context_ptr        mctx;  // the last applied step (its ubatch feeds the mask)
    graph_inputs                    in;
    uint32_t                        n_ubatch = 512;
    bool                            unified  = true;

    explicit kv_driver(const llama_model & m) : model(m) {}

    llama_kv_cache_context * ctx() const { return static_cast<llama_kv_cache_context *>(mctx.get()); }

    // init_batch + apply of every micro-batch of the allocator's batch; the context is dropped
    // after (it has moved past its last micro-batch), so mask and index queries need a step
    int place_all() {
        mctx = kv->init_batch(*path->balloc, n_ubatch, false);
        if (!mctx || mctx->get_status() != LLAMA_MEMORY_STATUS_SUCCESS) {
            return fail("llama_kv_cache::init_batch found no slot");
        }
        do {
            if (!mctx->apply()) {
                return fail("llama_kv_cache_context::apply failed");
            }
        } while (mctx->next());
        mctx.reset();
        return 0;
    }

    void set_idxs() {
        const llama_ubatch & ub = mctx->get_ubatch();
        in.k_idxs.reshape(ub.n_tokens);
        ctx()->set_input_k_idxs(in.k_idxs.t, &ub);
        in.v_idxs.reshape(int64_t(ub.n_tokens) * v_trans_width());
        ctx()->set_input_v_idxs(in.v_idxs.t, &ub);
    }

    int64_t v_trans_width() const { return v_trans ? int64_t(model.hparams.n_embd_v_gqa_max()) : 1; }

    host_tensor & set_mask(bool f16, bool causal) {
        const llama_ubatch & ub       = mctx->get_ubatch();
        const int64_t        n_stream = unified ? 1 : ub.n_seqs_unq;
        host_tensor &        m        = f16 ? in.mask_f16 : in.mask_f32;
        m.reshape(ctx()->get_n_kv(), ub.n_tokens / n_stream, 1, n_stream);
        ctx()->set_input_kq_mask(m.t, &ub, causal);
        return m;
    }

    bool v_trans = false;
};

struct rs_driver {
    const llama_model &                     model;
    std::unique_ptr<llama_memory_recurrent> rs;
    std::unique_ptr<batch_path>             path;
    llama_memory_context_ptr                mctx;
    std::vector<int32_t>                    s_copy;
    uint32_t                                n_ubatch = 512;

    explicit rs_driver(const llama_model & m) : model(m) {}
};

template <typename F> int guarded(F && f) {
    try {
        return f();
    } catch (const std::exception & e) {
        return fail(std::string("llama.cpp threw: ") + e.what());
    } catch (...) {
        return fail("llama.cpp threw an unknown exception");
    }
}

}  // namespace

LMD_API const char * lmd_last_error(void) {
    return g_error.c_str();
}

LMD_API int lmd_init(int quiet) {
    if (quiet) {
        llama_log_set(quiet_log, nullptr);
    }
    llama_backend_init();
    return 0;
}

// A model for its hyperparameters and vocabulary (the bench's model is tiny: its weights are
// read too, as a vocab-only load leaves the layer hyperparameters unset).
LMD_API void * lmd_model_load(const char * path) {
    llama_model_params p = llama_model_default_params();
    p.n_gpu_layers       = 0;
    llama_model * m      = llama_model_load_from_file(path, p);
    if (!m) {
        fail(std::string("llama.cpp could not load ") + path);
    }
    return m;
}

LMD_API uint32_t lmd_model_n_layer(void * model) {
    return static_cast<llama_model *>(model)->hparams.n_layer_all;
}

LMD_API void lmd_model_free(void * model) {
    if (model) {
        llama_model_free(static_cast<llama_model *>(model));
    }
}

// -- llama_kv_cache ----------------------------------------------------------------------------

// kv_size cells per stream; unified = one stream for every sequence, else one per sequence
// (llama_context's kv_unified). f16 K/V of the model's width, V not transposed (flash attention)
// unless v_trans; swa_type (llama_swa_type: 0 none, 1 standard, 2 chunked, 3 symmetric) with a
// window of n_swa positions, as the constructor takes them (a cache of sliding-window layers).
LMD_API void * lmd_kv_new(void * model, uint32_t kv_size, uint32_t n_seq_max, int unified, int v_trans,
                          uint32_t n_ubatch, uint32_t n_tokens_max, uint32_t n_swa, int swa_type) {
    const auto & m = *static_cast<llama_model *>(model);
    auto         d = std::make_unique<kv_driver>(m);
    const int    rc = guarded([&] {
        d->kv = std::make_unique<llama_kv_cache>(m, m.hparams, GGML_TYPE_F16, GGML_TYPE_F16, v_trans != 0, false,
                                                 unified != 0, kv_size, n_seq_max, 1, n_swa, llama_swa_type(swa_type), nullptr,
                                                 nullptr, nullptr, nullptr);
        d->path     = std::make_unique<batch_path>(m, d->kv.get(), n_seq_max, n_tokens_max);
        d->n_ubatch = n_ubatch;
        d->unified  = unified != 0;
        d->v_trans  = v_trans != 0;
        return 0;
    });
    return rc == 0 ? d.release() : nullptr;
}

LMD_API void lmd_kv_free(void * h) {
    delete static_cast<kv_driver *>(h);
}

// Place a batch (seq_ids[i] at pos[i]; pos NULL: each token at its sequence's next position)
// through the allocator, init_batch and apply of every micro-batch of n_ubatch tokens.
LMD_API int lmd_kv_decode(void * h, const int32_t * seq_ids, const int32_t * pos, int32_t n, uint32_t n_ubatch) {
    auto & d = *static_cast<kv_driver *>(h);
    return guarded([&] {
        if (!d.path->fill(seq_ids, pos, n)) {
            return fail("llama_batch_allocr::init refused the batch");
        }
        const uint32_t saved = d.n_ubatch;
        d.n_ubatch           = n_ubatch;
        const int rc         = d.place_all();
        d.n_ubatch           = saved;
        return rc;
    });
}

// n_steps decode steps of one token for each listed sequence, each timed alone into
// samples_ns: batch fill, allocator init, init_batch, apply, k/v indices, and the mask when
// with_mask (1 = f32, 2 = f16). The last step's context stays for lmd_kv_mask_*.
LMD_API int lmd_kv_decode_steps(void * h, const int32_t * seq_ids, int32_t n, int32_t n_steps, int32_t with_mask,
                                int64_t * samples_ns) {
    auto & d = *static_cast<kv_driver *>(h);
    return guarded([&] {
        for (int32_t k = 0; k < n_steps; ++k) {
            const int64_t t0 = now_ns();
            if (!d.path->fill(seq_ids, nullptr, n)) {
                return fail("llama_batch_allocr::init refused the decode batch");
            }
            d.mctx = d.kv->init_batch(*d.path->balloc, d.n_ubatch, false);
            if (d.mctx->get_status() != LLAMA_MEMORY_STATUS_SUCCESS) {
                return fail("llama_kv_cache::init_batch found no slot for the decode step");
            }
            d.mctx->apply();
            d.set_idxs();
            if (with_mask) {
                d.set_mask(with_mask == 2, true);
            }
            samples_ns[k] = now_ns() - t0;
        }
        return 0;
    });
}

// A prompt of n_tokens for sequence 0 (positions 0..n_tokens-1) into the empty cache, in
// micro-batches of n_ubatch, reps times, each timed (batch fill, allocator init, init_batch,
// apply of every micro-batch); the sequence is removed after each (untimed).
LMD_API int lmd_kv_time_prefill(void * h, int32_t n_tokens, uint32_t n_ubatch, int32_t reps, int64_t * samples_ns) {
    auto & d = *static_cast<kv_driver *>(h);
    return guarded([&] {
        std::vector<int32_t> ids(static_cast<size_t>(n_tokens), 0);
        std::vector<int32_t> pos(static_cast<size_t>(n_tokens));
        for (int32_t i = 0; i < n_tokens; ++i) {
            pos[size_t(i)] = i;
        }
        const uint32_t saved = d.n_ubatch;
        d.n_ubatch           = n_ubatch;
        for (int32_t k = 0; k < reps; ++k) {
            const int64_t t0 = now_ns();
            if (!d.path->fill(ids.data(), pos.data(), n_tokens)) {
                d.n_ubatch = saved;
                return fail("llama_batch_allocr::init refused the prompt");
            }
            if (const int rc = d.place_all(); rc != 0) {
                d.n_ubatch = saved;
                return rc;
            }
            samples_ns[k] = now_ns() - t0;
            d.mctx.reset();
            d.kv->seq_rm(0, -1, -1);
        }
        d.n_ubatch = saved;
        return 0;
    });
}

// The mask of the last step's micro-batch set reps times, each timed (with its k/v indices when
// with_idxs: every graph input of the attention).
LMD_API int lmd_kv_mask_reps(void * h, int32_t reps, int32_t f16, int32_t causal, int32_t with_idxs,
                             int64_t * samples_ns) {
    auto & d = *static_cast<kv_driver *>(h);
    if (!d.mctx) {
        return fail("no decode step yet");
    }
    return guarded([&] {
        for (int32_t k = 0; k < reps; ++k) {
            const int64_t t0 = now_ns();
            if (with_idxs) {
                d.set_idxs();
            }
            d.set_mask(f16 != 0, causal != 0);
            samples_ns[k] = now_ns() - t0;
        }
        return 0;
    });
}

// Shape of the last step's mask: dims[0] = n_kv, dims[1] = tokens per stream, dims[2] = streams.
LMD_API int lmd_kv_mask_shape(void * h, int64_t * dims) {
    auto & d = *static_cast<kv_driver *>(h);
    if (!d.mctx) {
        return fail("no decode step yet");
    }
    const llama_ubatch & ub = d.mctx->get_ubatch();
    dims[0]                 = d.ctx()->get_n_kv();
    dims[2]                 = d.unified ? 1 : ub.n_seqs_unq;
    dims[1]                 = ub.n_tokens / dims[2];
    return 0;
}

// llama.cpp's f32 mask of the last step, set afresh and copied into out (n floats, which must be
// n_kv * n_tokens: token-major, tokens in micro-batch order).
LMD_API int lmd_kv_mask_copy(void * h, float * out, int64_t n, int32_t causal) {
    auto & d = *static_cast<kv_driver *>(h);
    if (!d.mctx) {
        return fail("no decode step yet");
    }
    return guarded([&] {
        host_tensor & m = d.set_mask(false, causal != 0);
        if (ggml_nelements(m.t) != n) {
            return fail("mask size " + std::to_string(ggml_nelements(m.t)) + " != " + std::to_string(n));
        }
        std::memcpy(out, m.t->data, size_t(n) * sizeof(float));
        return 0;
    });
}

// v indices of the last step (n_tokens values, times the V width when V is transposed).
LMD_API int64_t lmd_kv_v_idxs_copy(void * h, int64_t * out, int64_t n) {
    auto & d = *static_cast<kv_driver *>(h);
    if (!d.mctx) {
        return fail("no decode step yet");
    }
    d.set_idxs();
    const int64_t have = ggml_nelements(d.in.v_idxs.t);
    if (out && have <= n) {
        std::memcpy(out, d.in.v_idxs.t->data, size_t(have) * sizeof(int64_t));
    }
    return have;
}

// k indices of the last step (n_tokens values).
LMD_API int lmd_kv_k_idxs_copy(void * h, int64_t * out, int64_t n) {
    auto & d = *static_cast<kv_driver *>(h);
    if (!d.mctx) {
        return fail("no decode step yet");
    }
    d.set_idxs();
    if (ggml_nelements(d.in.k_idxs.t) != n) {
        return fail("k_idxs size mismatch");
    }
    std::memcpy(out, d.in.k_idxs.t->data, size_t(n) * sizeof(int64_t));
    return 0;
}

LMD_API int lmd_kv_seq_rm(void * h, int32_t seq, int32_t p0, int32_t p1) {
    auto & d = *static_cast<kv_driver *>(h);
    d.mctx.reset();
    return guarded([&] { return d.kv->seq_rm(seq, p0, p1) ? 0 : fail("seq_rm refused"); });
}

LMD_API int32_t lmd_kv_seq_pos_max(void * h, int32_t seq) {
    return static_cast<kv_driver *>(h)->kv->seq_pos_max(seq);
}

LMD_API uint32_t lmd_kv_n_stream(void * h) {
    return static_cast<kv_driver *>(h)->kv->get_n_stream();
}

// llama_kv_cache::seq_pos_max of seqs[i % n_seqs], reps calls each timed (no foreign call).
LMD_API int lmd_kv_time_seq_pos_max(void * h, const int32_t * seqs, int32_t n_seqs, int32_t reps,
                                    int64_t * samples_ns) {
    auto &            d    = *static_cast<kv_driver *>(h);
    volatile int32_t  sink = 0;
    for (int32_t k = 0; k < reps; ++k) {
        const int64_t t0 = now_ns();
        sink             = d.kv->seq_pos_max(seqs[k % n_seqs]);
        samples_ns[k]    = now_ns() - t0;
    }
    (void) sink;
    return 0;
}

// llama_kv_cache::seq_pos_max of seqs[i % n_seqs] in one timed loop of reps calls: nanoseconds
// per call (the per-call samples above carry two clock reads each, more than the lookup costs).
LMD_API double lmd_kv_loop_seq_pos_max(void * h, const int32_t * seqs, int32_t n_seqs, int32_t reps) {
    auto &           d    = *static_cast<kv_driver *>(h);
    volatile int32_t sink = 0;
    const int64_t    t0   = now_ns();
    for (int32_t k = 0; k < reps; ++k) {
        sink = d.kv->seq_pos_max(seqs[k % n_seqs]);
    }
    (void) sink;
    return double(now_ns() - t0) / double(reps > 0 ? reps : 1);
}

// llama_kv_cache::seq_rm of the last `tail` positions of seqs[i % n_seqs], reps calls each timed;
// after each, the removed positions are placed again (untimed) through the decode path, so the
// cache holds what it held (the same cells: the slot search takes the lowest free ones).
LMD_API int lmd_kv_time_seq_rm_tail(void * h, const int32_t * seqs, int32_t n_seqs, int32_t tail, int32_t reps,
                                    int64_t * samples_ns) {
    auto & d = *static_cast<kv_driver *>(h);
    d.mctx.reset();
    return guarded([&] {
        std::vector<int32_t> ids(static_cast<size_t>(tail));
        std::vector<int32_t> pos(static_cast<size_t>(tail));
        for (int32_t k = 0; k < reps; ++k) {
            const int32_t   s   = seqs[k % n_seqs];
            const llama_pos end = d.kv->seq_pos_max(s) + 1;
            const int64_t   t0  = now_ns();
            const bool      ok  = d.kv->seq_rm(s, end - tail, -1);
            samples_ns[k]       = now_ns() - t0;
            if (!ok) {
                return fail("seq_rm refused");
            }
            for (int32_t i = 0; i < tail; ++i) {
                ids[size_t(i)] = s;
                pos[size_t(i)] = end - tail + i;
            }
            if (!d.path->fill(ids.data(), pos.data(), tail)) {
                return fail("llama_batch_allocr::init refused the refill");
            }
            if (const int rc = d.place_all(); rc != 0) {
                return rc;
            }
        }
        d.mctx.reset();
        return 0;
    });
}

// -- llama_memory_recurrent --------------------------------------------------------------------

// A recurrent memory of mem_size cells over the model's layers. The bench model is a llama, whose
// hyperparameters give no recurrent state: this model handle (load one for this use alone) gets a
// small Mamba-style state (conv 16 + ssm 16 values per layer), enough for the tensors to exist;
// the bookkeeping timed does not depend on the state's size.
LMD_API void * lmd_rs_new(void * model, uint32_t mem_size, uint32_t n_seq_max, uint32_t n_ubatch) {
    auto & m  = *static_cast<llama_model *>(model);
    auto & hp = const_cast<llama_hparams &>(m.hparams);
    if (hp.n_embd_r() == 0 || hp.n_embd_s() == 0) {
        hp.ssm_d_conv  = 2;
        hp.ssm_d_inner = 16;
        hp.ssm_d_state = 1;
        hp.ssm_n_group = 0;
    }
    auto      d  = std::make_unique<rs_driver>(m);
    const int rc = guarded([&] {
        d->rs       = std::make_unique<llama_memory_recurrent>(m, GGML_TYPE_F32, GGML_TYPE_F32, false, mem_size,
                                                               n_seq_max, 0, nullptr);
        d->path     = std::make_unique<batch_path>(m, d->rs.get(), n_seq_max, std::max(n_ubatch, n_seq_max));
        d->n_ubatch = n_ubatch;
        return 0;
    });
    return rc == 0 ? d.release() : nullptr;
}

LMD_API void lmd_rs_free(void * h) {
    delete static_cast<rs_driver *>(h);
}

// n_steps recurrent decode steps of one token per listed sequence, each timed: batch fill,
// allocator init, init_batch, apply, and the s_copy source of every state the step reads (the
// graph input llama.cpp sets for the state gather).
LMD_API int lmd_rs_steps(void * h, const int32_t * seq_ids, int32_t n, int32_t n_steps, int64_t * samples_ns) {
    auto & d = *static_cast<rs_driver *>(h);
    return guarded([&] {
        for (int32_t k = 0; k < n_steps; ++k) {
            const int64_t t0 = now_ns();
            if (!d.path->fill(seq_ids, nullptr, n)) {
                return fail("llama_batch_allocr::init refused the recurrent batch");
            }
            d.mctx = d.rs->init_batch(*d.path->balloc, d.n_ubatch, false);
            if (d.mctx->get_status() != LLAMA_MEMORY_STATUS_SUCCESS) {
                return fail("llama_memory_recurrent::init_batch found no slot");
            }
            do {
                d.mctx->apply();
                const auto *   rc   = static_cast<llama_memory_recurrent_context *>(d.mctx.get());
                const uint32_t n_rs = rc->get_n_rs();
                d.s_copy.resize(n_rs);
                for (uint32_t i = 0; i < n_rs; ++i) {
                    d.s_copy[i] = rc->s_copy(int(i));
                }
            } while (d.mctx->next());
            samples_ns[k] = now_ns() - t0;
        }
        return 0;
    });
}

LMD_API int32_t lmd_rs_seq_pos_max(void * h, int32_t seq) {
    return static_cast<rs_driver *>(h)->rs->seq_pos_max(seq);
}
