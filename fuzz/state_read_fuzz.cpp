// Mutation fuzzer of the state readers (KV cache, iSWA pair, recurrent memory, hybrids, and the
// versioned header in front of each). Meant to run under -fsanitize=address,undefined.
//
//   state_read_fuzz [iterations=20000] [seed=1] [bytes]
//
// A corpus of valid state blobs is written by the core itself (whole memory and every sequence,
// raw and with the header, with and without PARTIAL_ONLY) for several memory configurations. Each
// input is a corpus blob mutated by bit flips, interesting byte / u32 / u64 values (counts such as
// 2^31, 2^32 - 1), ±1 on aligned words (count fields), truncation, extension and splicing; header
// inputs often get their lengths and checksums recomputed so the mutation reaches the payload
// readers. Every input is read into a populated memory of the same configuration, and then either
//   * refused with llmem::state_error (or std::invalid_argument for a bad seq_id / flags), and the
//     memory (cells, heads, counters, every state byte) must be bit-identical to before, or
//   * accepted, and the memory must be internally consistent, re-serialisable, and its
//     re-serialisation must read back into a fresh memory and serialise to the same bytes.
// Any other exception, a failed check or a sanitizer report ends the run with exit code 1.
// Deterministic: the same seed and iteration count give the same inputs.

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/hybrid.h"
#include "llmem/kv_cache.h"
#include "llmem/rs_memory.h"
#include "llmem/state_file.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using namespace llmem;

namespace {

using bytes = std::vector<uint8_t>;

// splitmix64: small, fast and good enough to pick mutations.
struct rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint64_t below(uint64_t n) { return n == 0 ? 0 : next() % n; }
    bool     chance(uint32_t one_in) { return below(one_in) == 0; }
};

[[noreturn]] void fail(const std::string & what) {
    std::fprintf(stderr, "state_read_fuzz: FAILED: %s\n", what.c_str());
    std::exit(1);
}

// -- memories ---------------------------------------------------------------------------------

struct config {
    const char * name;
    memory_kind  kind;
    bool         unified;
    int32_t      n_seq_max;
    int32_t      type_kv;
    bool         v_trans;
    uint32_t     rs_size;  // 0: no recurrent part
    uint32_t     n_rs_seq;
};

const config CONFIGS[] = {
    { "kv-unified-f16", memory_kind::KV_CACHE, true, 3, int32_t(kv_type::F16), true, 0, 0 },
    { "kv-streams-f32", memory_kind::KV_CACHE, false, 3, int32_t(kv_type::F32), false, 0, 0 },
    { "kv-iswa", memory_kind::KV_CACHE_ISWA, true, 2, int32_t(kv_type::F16), true, 0, 0 },
    { "recurrent", memory_kind::RECURRENT, true, 4, 0, false, 4, 1 },
    { "hybrid", memory_kind::HYBRID, true, 3, int32_t(kv_type::BF16), false, 3, 0 },
    { "hybrid-iswa", memory_kind::HYBRID_ISWA, false, 2, int32_t(kv_type::F32), true, 2, 2 },
};

// One memory of a configuration with its own state buffers, filled by decoding.
struct memory {
    const config &                          cfg;
    std::vector<std::unique_ptr<kv_cache>>  caches;
    std::vector<bytes>                      kv_bufs;  // K then V per cache layer
    std::unique_ptr<rs_memory>              recr;
    std::vector<bytes>                      rs_bufs;  // r then s per layer

    explicit memory(const config & c) : cfg(c) {
        const bool iswa = c.kind == memory_kind::KV_CACHE_ISWA || c.kind == memory_kind::HYBRID_ISWA;
        const size_t n_caches = c.kind == memory_kind::RECURRENT ? 0 : (iswa ? 2 : 1);
        for (size_t i = 0; i < n_caches; ++i) {
            kv_cache_params p;
            p.kv_size   = 16;
            p.n_seq_max = c.n_seq_max;
            p.unified   = c.unified;
            p.type_k    = c.type_kv;
            p.type_v    = c.type_kv;
            p.v_trans   = c.v_trans;
            if (iswa && i == 1) {
                p.swa   = swa_type::STANDARD;
                p.n_swa = 3;
            }
            // two layers of different widths per cache, model layer ids interleaved for iSWA
            p.layer_il = { int32_t(i), int32_t(i + 2) };
            p.n_embd_k = { 4, 2 };
            p.n_embd_v = { 2, 6 };
            caches.push_back(std::make_unique<kv_cache>(p));
            kv_cache & kv = *caches.back();
            for (uint32_t l = 0; l < kv.n_layer(); ++l) {
                kv_bufs.emplace_back(kv.k_buffer_bytes(l));
                kv_bufs.emplace_back(kv.v_buffer_bytes(l));
                kv.set_layer_buffers(l, kv_bufs[kv_bufs.size() - 2].data(), kv_bufs.back().data());
            }
        }
        if (c.rs_size != 0) {
            recr = std::make_unique<rs_memory>(c.rs_size, c.n_seq_max, c.n_rs_seq);
            rs_buffers b;
            b.n_layer_total = 3;  // layer 1 has no recurrent state
            b.type_r        = RS_TYPE_F32;
            b.type_s        = RS_TYPE_F16;
            const size_t rows = size_t(c.rs_size) * (1 + c.n_rs_seq);
            const uint64_t widths[2][2] = { { 3 * 4, 2 * 2 }, { 1 * 4, 5 * 2 } };
            for (const auto & w : widths) {
                rs_bufs.emplace_back(rows * w[0]);
                rs_bufs.emplace_back(rows * w[1]);
                b.r_row_bytes.push_back(w[0]);
                b.s_row_bytes.push_back(w[1]);
            }
            for (size_t l = 0; l < 2; ++l) {
                b.r.push_back(rs_bufs[2 * l].data());
                b.s.push_back(rs_bufs[2 * l + 1].data());
            }
            recr->attach_buffers(b);
        }
    }

    // Decode `lengths[s]` tokens of every sequence s (one batch per sequence), then fill every
    // state byte from `seed` and share sequence 0 with the last one.
    void populate(const std::vector<int32_t> & lengths, uint64_t seed) {
        for (int32_t s = 0; s < cfg.n_seq_max && s < int32_t(lengths.size()); ++s) {
            if (lengths[size_t(s)] == 0) {
                continue;
            }
            batch b;
            b.n_tokens = uint32_t(lengths[size_t(s)]);
            for (int32_t t = 0; t < lengths[size_t(s)]; ++t) {
                b.token.push_back(t);
                b.pos.push_back(seq_pos_next(s) + t);
            }
            b.seq_id_off = { 0 };
            for (uint32_t t = 0; t < b.n_tokens; ++t) {
                b.seq_id.push_back(s);
                b.seq_id_off.push_back(int32_t(t + 1));
            }
            for (auto & kv : caches) {
                batch_allocr balloc(cfg.n_seq_max);
                balloc.init(b, kv.get(), false);
                kv_context ctx = kv_init_batch(*kv, balloc, 4);
                if (ctx.status() != memory_status::SUCCESS) {
                    fail(std::string(cfg.name) + ": populating the KV cache failed");
                }
                do {
                    ctx.apply();
                } while (ctx.next());
            }
            if (recr) {
                batch_allocr balloc(cfg.n_seq_max);
                balloc.init(b, recr.get(), false);
                auto ctx = recr->init_batch(balloc, 4, false);
                if (ctx->status() != memory_status::SUCCESS) {
                    fail(std::string(cfg.name) + ": populating the recurrent memory failed");
                }
                do {
                    ctx->apply();
                } while (ctx->next());
            }
        }
        const int32_t last = cfg.n_seq_max - 1;
        if (last > 0 && cfg.unified) {
            for (auto & kv : caches) {
                kv->seq_cp(0, last, -1, -1);
            }
            if (recr) {
                recr->seq_cp(0, last, -1, -1);
            }
        }
        rng r{ seed };
        for (auto * set : { &kv_bufs, &rs_bufs }) {
            for (auto & buf : *set) {
                for (auto & x : buf) {
                    x = uint8_t(r.next());
                }
            }
        }
    }

    int32_t seq_pos_next(int32_t s) const {
        if (!caches.empty()) {
            return caches.back()->seq_pos_max(s) + 1;
        }
        return recr->seq_pos_max(s) + 1;
    }

    state_memory parts() const {
        state_memory m;
        m.kind = cfg.kind;
        for (const auto & c : caches) {
            m.caches.push_back(c.get());
        }
        m.recr = recr.get();
        return m;
    }

    // The attention caches whose sections a state with these flags holds.
    std::vector<kv_cache *> sections(uint32_t flags) const {
        std::vector<kv_cache *> out;
        const bool partial = flags & RS_STATE_PARTIAL_ONLY;
        switch (cfg.kind) {
            case memory_kind::KV_CACHE: out.push_back(caches[0].get()); break;
            case memory_kind::KV_CACHE_ISWA:
            case memory_kind::HYBRID_ISWA:
                if (!partial) {
                    out.push_back(caches[0].get());
                }
                out.push_back(caches[1].get());
                break;
            case memory_kind::HYBRID:
                if (!partial) {
                    out.push_back(caches[0].get());
                }
                break;
            case memory_kind::RECURRENT: break;
        }
        return out;
    }

    // The composition the Python classes use: attention sections, then the recurrent block.
    bytes write(int32_t seq, uint32_t flags) const {
        const uint32_t raw_flags = flags & ~STATE_HEADER;
        bytes out;
        for (kv_cache * c : sections(raw_flags)) {
            c->state_write(out, seq);
        }
        if (recr) {
            const size_t at = out.size();
            out.resize(at + recr->state_write_size(seq, raw_flags));
            recr->state_write(out.data() + at, out.size() - at, seq, raw_flags);
        }
        if (flags & STATE_HEADER) {
            bytes h = state_header_write(parts(), seq, flags, out.data(), out.size());
            h.insert(h.end(), out.begin(), out.end());
            return h;
        }
        return out;
    }

    void read(const uint8_t * data, size_t n, int32_t seq, uint32_t flags) {
        if (flags & STATE_HEADER) {
            const size_t at = state_header_check(parts(), data, n, seq, flags);
            data += at;
            n -= at;
            flags &= ~STATE_HEADER;
        }
        const std::vector<kv_cache *> kv = sections(flags);
        if (!recr) {
            kv_state_read_all(kv, data, n, 0, seq, true);
        } else if (kv.empty()) {
            recr->state_read(data, n, seq, flags, true);
        } else {
            hybrid_state_read(kv, *recr, data, n, seq, flags);
        }
    }

    // Everything observable, as bytes: cells, heads, counters, pending work and state buffers.
    bytes fingerprint() const {
        bytes f;
        f.reserve(fingerprint_bytes_);
        auto add = [&](int64_t v) {
            const size_t at = f.size();
            f.resize(at + 8);
            std::memcpy(f.data() + at, &v, 8);
        };
        for (const auto & c : caches) {
            for (uint32_t s = 0; s < c->n_stream(); ++s) {
                const kv_cells & T = c->cells(s);
                add(c->head(s));
                for (uint32_t i = 0; i < T.size(); ++i) {
                    add(T.pos_get(i));
                    if (!T.is_empty(i)) {
                        add(T.shift_get(i));
                    }
                    uint32_t        ns  = 0;
                    const int32_t * ids = T.seq_list(i, ns);
                    add(ns);
                    for (uint32_t j = 0; j < ns; ++j) {
                        add(ids[j]);
                    }
                }
            }
            add(c->used_count());
            add(int64_t(c->pending_copies().size()));
            add(c->get_has_shift());
        }
        if (recr) {
            for (uint32_t i = 0; i < recr->size(); ++i) {
                const rs_cell & c = recr->cell(i);
                add(c.pos);
                add(c.src);
                add(c.src0);
                add(recr->tail(int32_t(i)));
                add(int64_t(c.ids.size()));
                for (int32_t x : c.ids) {
                    add(x);
                }
            }
            for (int32_t q = 0; q < recr->n_seq_max(); ++q) {
                add(recr->rs_idx(q));
            }
            add(recr->head());
            add(recr->used());
            add(recr->n());
            add(recr->rs_z());
        }
        for (auto * set : { &kv_bufs, &rs_bufs }) {
            for (const auto & buf : *set) {
                f.insert(f.end(), buf.begin(), buf.end());
            }
        }
        fingerprint_bytes_ = std::max(fingerprint_bytes_, f.size());
        return f;
    }

    mutable size_t fingerprint_bytes_ = 0;

    // The bookkeeping invariants an accepted read must leave.
    void check_consistent(const std::string & where) const {
        for (const auto & c : caches) {
            for (uint32_t s = 0; s < c->n_stream(); ++s) {
                if (!c->cells(s).check_invariants()) {
                    fail(where + ": KV cell invariants broken in stream " + std::to_string(s));
                }
                for (uint32_t i = 0; i < c->size(); ++i) {
                    if (!c->cells(s).is_empty(i) && c->cells(s).pos_get(i) < 0) {
                        fail(where + ": a used KV cell has a negative position");
                    }
                }
            }
        }
        if (recr) {
            for (uint32_t i = 0; i < recr->size(); ++i) {
                for (int32_t x : recr->cell(i).ids) {
                    if (recr->tail(x) != int32_t(i)) {
                        fail(where + ": recurrent tail of sequence " + std::to_string(x) + " is not its cell");
                    }
                }
            }
            for (uint32_t s = 0; s < recr->size(); ++s) {
                const int32_t t = recr->tail(int32_t(s));
                if (t >= 0 && !recr->cell(uint32_t(t)).has(int32_t(s))) {
                    fail(where + ": recurrent cell " + std::to_string(t) + " does not hold its sequence");
                }
            }
            if (recr->used() > recr->size()) {
                fail(where + ": recurrent used count above the size");
            }
        }
    }
};

// -- mutations --------------------------------------------------------------------------------

const uint32_t INTERESTING_U32[] = { 0u, 1u, 2u, 3u, 7u, 8u, 9u, 0x7fu, 0x80u, 0xffu, 0x100u, 0xffffu, 0x10000u,
                                     0x7fffffffu, 0x80000000u, 0x80000001u, 0xfffffffeu, 0xffffffffu };
const uint64_t INTERESTING_U64[] = { 0ull, 1ull, 0xffffffffull, 0x100000000ull, 0x7fffffffffffffffull,
                                     0x8000000000000000ull, 0xffffffffffffffffull };

void put_u32(bytes & b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); }

// Recompute the header's payload length, payload CRC and header CRC after the payload changed,
// so the mutated payload reaches the llama.cpp-layout readers through the header path.
void reseal(bytes & b) {
    if (b.size() < STATE_HEADER_FIXED_BYTES + 4 || std::memcmp(b.data(), STATE_FILE_MAGIC, 8) != 0) {
        return;
    }
    uint32_t config_bytes;
    std::memcpy(&config_bytes, b.data() + 28, 4);
    if (config_bytes > b.size() - STATE_HEADER_FIXED_BYTES - 4) {
        return;
    }
    const size_t   header_end = STATE_HEADER_FIXED_BYTES + config_bytes;
    const size_t   payload_at = header_end + 4;
    const uint64_t len        = b.size() - payload_at;
    std::memcpy(b.data() + 32, &len, 8);
    put_u32(b, 40, crc32(b.data() + payload_at, size_t(len)));
    put_u32(b, header_end, crc32(b.data(), header_end));
}

void mutate_once(bytes & b, const std::vector<bytes> & corpus, rng & r) {
    switch (r.below(9)) {
        case 0:  // bit flips
            for (uint64_t k = 1 + r.below(4); k > 0 && !b.empty(); --k) {
                b[r.below(b.size())] ^= uint8_t(1u << r.below(8));
            }
            break;
        case 1:  // an interesting byte
            if (!b.empty()) {
                const uint8_t v[] = { 0x00, 0x01, 0x7f, 0x80, 0xff };
                b[r.below(b.size())] = v[r.below(sizeof(v))];
            }
            break;
        case 2:  // an interesting u32, aligned (count fields) or anywhere
        case 3:
            if (b.size() >= 4) {
                size_t at = r.below(b.size() - 3);
                if (r.chance(2)) {
                    at &= ~size_t(3);
                }
                put_u32(b, at, INTERESTING_U32[r.below(sizeof(INTERESTING_U32) / 4)]);
            }
            break;
        case 4:  // an interesting u64 (row sizes are u64)
            if (b.size() >= 8) {
                const uint64_t v = INTERESTING_U64[r.below(sizeof(INTERESTING_U64) / 8)];
                std::memcpy(b.data() + (r.below(b.size() - 7) & ~size_t(3)), &v, 8);
            }
            break;
        case 5:  // ±1 on an aligned word: off-by-one counts, ids and sizes
            if (b.size() >= 4) {
                const size_t at = r.below(b.size() / 4) * 4;
                uint32_t     v;
                std::memcpy(&v, b.data() + at, 4);
                put_u32(b, at, r.chance(2) ? v + 1 : v - 1);
            }
            break;
        case 6:  // truncation
            b.resize(r.below(b.size() + 1));
            break;
        case 7:  // extension by random bytes (or a repeat of the tail)
            for (uint64_t k = 1 + r.below(64); k > 0; --k) {
                b.push_back(r.chance(2) || b.empty() ? uint8_t(r.next()) : b[b.size() - 1 - r.below(b.size())]);
            }
            break;
        case 8: {  // splice: a prefix of this input and a suffix of another
            const bytes & o   = corpus[r.below(corpus.size())];
            const size_t  cut = r.below(b.size() + 1);
            const size_t  from = r.below(o.size() + 1);
            b.resize(cut);
            b.insert(b.end(), o.begin() + std::ptrdiff_t(from), o.end());
            break;
        }
    }
}

// -- structure-aware mutations ----------------------------------------------------------------
//
// The byte mutations above rarely produce a well-formed input with one field off (a position of
// INT32_MAX, a duplicated sequence id, a count one too high with the bytes to match, a
// configuration name that is not ASCII). field_map walks a blob with the layouts the writers use
// (header, KV sections, recurrent block) and lists its fields by role; mutate_field changes one
// field to a value chosen for that role, and reseals the header's checksums so that the change
// reaches the reader behind them.

enum class role { COUNT, POS, SEQ, N_IDS, TYPE, ROW_BYTES, FLAG, HDR_U32, HDR_SEQ, HDR_U64, NAME_LEN, NAME_BYTE,
                  CONFIG_VALUE };

struct field {
    size_t   at;
    uint32_t width;  // 1, 4 or 8
    role     what;
};

struct layout_walker {
    const bytes &        b;
    size_t               at = 0;
    std::vector<field> & out;
    bool                 ok = true;

    bool has(size_t n) const { return ok && at + n <= b.size(); }
    uint64_t take(uint32_t width, role what) {
        if (!has(width)) {
            ok = false;
            return 0;
        }
        out.push_back({ at, width, what });
        uint64_t v = 0;
        std::memcpy(&v, b.data() + at, width);
        at += width;
        return v;
    }
    void skip(uint64_t n) {
        if (!has(size_t(n)) || n > b.size()) {
            ok = false;
            return;
        }
        at += size_t(n);
    }
};

void walk_kv_section(layout_walker & w) {
    const uint64_t n_stream = w.take(4, role::COUNT);
    for (uint64_t s = 0; s < n_stream && w.ok && s < 64; ++s) {
        const uint64_t cc = w.take(4, role::COUNT);
        if (cc > w.b.size()) {
            w.ok = false;
            return;
        }
        for (uint64_t c = 0; c < cc && w.ok; ++c) {
            w.take(4, role::POS);
            const uint64_t ns = w.take(4, role::N_IDS);
            if (ns > 64) {
                w.ok = false;
                return;
            }
            for (uint64_t k = 0; k < ns && w.ok; ++k) {
                w.take(4, role::SEQ);
            }
        }
        if (cc == 0) {
            continue;
        }
        const uint64_t v_trans = w.take(4, role::FLAG);
        const uint64_t n_layer = w.take(4, role::COUNT);
        if (n_layer > 64) {
            w.ok = false;
            return;
        }
        for (uint64_t l = 0; l < n_layer && w.ok; ++l) {
            w.take(4, role::TYPE);
            w.skip(w.take(8, role::ROW_BYTES) * cc);
        }
        for (uint64_t l = 0; l < n_layer && w.ok; ++l) {
            w.take(4, role::TYPE);
            if (v_trans) {
                const uint64_t es = w.take(4, role::ROW_BYTES);
                const uint64_t ne = w.take(4, role::COUNT);
                w.skip(es * ne * cc);
            } else {
                w.skip(w.take(8, role::ROW_BYTES) * cc);
            }
        }
    }
}

void walk_recurrent_block(layout_walker & w) {
    const uint64_t cc = w.take(4, role::COUNT);
    if (cc > w.b.size()) {
        w.ok = false;
        return;
    }
    for (uint64_t c = 0; c < cc && w.ok; ++c) {
        w.take(4, role::POS);
        const uint64_t ns = w.take(4, role::N_IDS);
        if (ns > 64) {
            w.ok = false;
            return;
        }
        for (uint64_t k = 0; k < ns && w.ok; ++k) {
            w.take(4, role::SEQ);
        }
    }
    w.take(4, role::FLAG);  // s_trans
    const uint64_t n_layer_total = w.take(4, role::COUNT);
    (void) n_layer_total;
    while (w.ok && w.at < w.b.size()) {  // present layers: r rows then s rows
        w.take(4, role::TYPE);
        w.skip(w.take(8, role::ROW_BYTES) * cc);
    }
}

// The fields of a blob written for `m` with `flags` (empty when the bytes do not follow the layout).
std::vector<field> field_map(const bytes & b, const memory & m, uint32_t flags) {
    std::vector<field> out;
    layout_walker      w{ b, 0, out };
    if (b.size() >= STATE_HEADER_FIXED_BYTES + 4 && std::memcmp(b.data(), STATE_FILE_MAGIC, 8) == 0) {
        w.at = 8;
        w.take(4, role::HDR_U32);  // version
        w.take(4, role::HDR_U32);  // kind
        w.take(4, role::HDR_U32);  // flags
        w.take(4, role::HDR_SEQ);  // sequence
        const uint64_t n_fields = w.take(4, role::HDR_U32);
        w.take(4, role::HDR_U32);  // configuration bytes
        w.take(8, role::HDR_U64);  // payload length
        w.take(4, role::HDR_U32);  // payload CRC
        for (uint64_t f = 0; f < n_fields && w.ok && f < 4096; ++f) {
            const uint64_t len   = w.take(1, role::NAME_LEN);
            const size_t   first = w.at;
            for (uint64_t k = 0; k < len && w.ok; ++k) {
                w.take(1, role::NAME_BYTE);
            }
            (void) first;
            w.take(8, role::CONFIG_VALUE);
        }
        w.skip(4);  // header CRC
    }
    const uint32_t raw = flags & ~STATE_HEADER;
    for (size_t k = 0; k < m.sections(raw).size() && w.ok; ++k) {
        walk_kv_section(w);
    }
    if (m.recr && w.ok) {
        walk_recurrent_block(w);
    }
    if (!w.ok) {
        out.clear();
    }
    return out;
}

// Recompute the header CRC alone (after a header field changed; the payload fields stay as the
// mutation left them).
void reseal_header_only(bytes & b) {
    if (b.size() < STATE_HEADER_FIXED_BYTES + 4 || std::memcmp(b.data(), STATE_FILE_MAGIC, 8) != 0) {
        return;
    }
    uint32_t config_bytes;
    std::memcpy(&config_bytes, b.data() + 28, 4);
    if (config_bytes > b.size() - STATE_HEADER_FIXED_BYTES - 4) {
        return;
    }
    const size_t header_end = STATE_HEADER_FIXED_BYTES + config_bytes;
    put_u32(b, header_end, crc32(b.data(), header_end));
}

// One field of `b` set to a value chosen for its role. Returns false when no field map exists.
bool mutate_field(bytes & b, const memory & m, uint32_t flags, rng & r) {
    const std::vector<field> fields = field_map(b, m, flags);
    if (fields.empty()) {
        return false;
    }
    const field & f = fields[r.below(fields.size())];
    uint64_t      cur = 0;
    std::memcpy(&cur, b.data() + f.at, f.width);
    const int32_t  n_seq = m.cfg.n_seq_max;
    uint64_t       v     = cur;
    const uint64_t k     = r.below(6);
    switch (f.what) {
        case role::COUNT:
        case role::N_IDS: {
            const uint64_t opts[] = { cur + 1, cur - 1, 0, 1, cur * 2, 16, 17, 0x80000000u, 0xffffffffu };
            v = opts[r.below(sizeof(opts) / 8)];
            break;
        }
        case role::POS: {
            const int64_t opts[] = { -1, -2, 0x7fffffff, 0x7ffffffe, int64_t(INT32_MIN), int64_t(int32_t(cur)) + 1,
                                     int64_t(int32_t(cur)) - 1 };
            v = uint64_t(opts[r.below(sizeof(opts) / 8)]);
            break;
        }
        case role::SEQ: {
            const int64_t opts[] = { -1, n_seq, n_seq - 1, 0, 255, 256, int64_t(int32_t(cur)) + 1, 0x7fffffff };
            v = uint64_t(opts[r.below(sizeof(opts) / 8)]);
            break;
        }
        case role::TYPE: {
            const int64_t opts[] = { 0, 1, 30, 2, -1, 8 };
            v = uint64_t(opts[k]);
            break;
        }
        case role::ROW_BYTES: {
            const uint64_t opts[] = { cur + 1, cur - 1, 0, cur * 2, 0x8000000000000000ull, 2, 4 };
            v = opts[r.below(sizeof(opts) / 8)];
            break;
        }
        case role::FLAG: v = r.chance(2) ? (cur ^ 1) : 2; break;
        case role::HDR_U32: {
            const uint64_t opts[] = { cur + 1, cur - 1, 0, 1, 2, 3, 4, 5, 6, 0x80000000u, 0xffffffffu };
            v = opts[r.below(sizeof(opts) / 8)];
            break;
        }
        case role::HDR_SEQ: {
            const int64_t opts[] = { -1, 0, 1, n_seq, -2, 0x7fffffff };
            v = uint64_t(opts[k]);
            break;
        }
        case role::HDR_U64: {
            const uint64_t opts[] = { cur + 1, cur - 1, 0, 0xffffffffffffffffull };
            v = opts[r.below(4)];
            break;
        }
        case role::NAME_LEN: v = r.chance(2) ? cur + 1 : cur - 1; break;
        case role::NAME_BYTE: {
            const uint64_t opts[] = { 0x80, 0xff, 0xc3, 0x00, 0x27, 0x5c, cur + 1 };  // non-UTF-8, NUL, quote, backslash
            v = opts[r.below(sizeof(opts) / 8)];
            break;
        }
        case role::CONFIG_VALUE: {
            const uint64_t opts[] = { cur + 1, cur - 1, 0, 0x8000000000000000ull };
            v = opts[r.below(4)];
            break;
        }
    }
    std::memcpy(b.data() + f.at, &v, f.width);
    const bool in_header = f.what == role::HDR_U32 || f.what == role::HDR_SEQ || f.what == role::HDR_U64 ||
                           f.what == role::NAME_LEN || f.what == role::NAME_BYTE || f.what == role::CONFIG_VALUE;
    if (in_header) {
        if (!r.chance(4)) {
            reseal_header_only(b);
        }
    } else if (!r.chance(4)) {
        reseal(b);
    }
    return true;
}

struct seed_blob {
    bytes    data;
    int32_t  seq;
    uint32_t flags;
};

struct stats {
    uint64_t inputs = 0, accepted = 0, refused = 0, bad_args = 0;
};

// Read one input into t and check the outcome (see the top of the file). True if accepted.
bool read_and_check(memory & t, const bytes & baseline, bytes & baseline_fp, const bytes & in, int32_t seq,
                    uint32_t flags, stats & st, const std::string & where) {
    ++st.inputs;
    try {
        t.read(in.data(), in.size(), seq, flags);
    } catch (const state_error &) {
        ++st.refused;
        if (t.fingerprint() != baseline_fp) {
            fail(where + ": a refused read changed the memory");
        }
        return false;
    } catch (const std::invalid_argument &) {
        ++st.bad_args;
        if (t.fingerprint() != baseline_fp) {
            fail(where + ": a refused read changed the memory");
        }
        return false;
    } catch (const std::exception & e) {
        fail(where + ": unexpected exception: " + e.what());
    }
    ++st.accepted;
    t.check_consistent(where);
    bytes again;
    try {
        again = t.write(-1, STATE_HEADER);
    } catch (const std::exception & e) {
        fail(where + ": the accepted state cannot be written again: " + e.what());
    }
    memory fresh(t.cfg);
    try {
        fresh.read(again.data(), again.size(), -1, STATE_HEADER);
    } catch (const std::exception & e) {
        fail(where + ": the re-serialised state does not read back: " + e.what());
    }
    fresh.check_consistent(where + " (fresh)");
    if (fresh.write(-1, STATE_HEADER) != again) {
        fail(where + ": re-serialisation is not a fixed point");
    }
    // back to the baseline for the next input; the fingerprint is retaken because counters a
    // whole read does not reset (n, rs_z: llama.cpp's dry-run leftovers) may differ
    t.read(baseline.data(), baseline.size(), -1, STATE_HEADER);
    if (t.write(-1, STATE_HEADER) != baseline) {
        fail(where + ": restoring the baseline does not give the baseline back");
    }
    baseline_fp = t.fingerprint();
    return true;
}

} // namespace

int main(int argc, char ** argv) {
    const uint64_t iterations = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 20000;
    const uint64_t seed       = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
    // "bytes" turns the structure-aware half of the mutations off (the issue-8 fuzzer exactly)
    const bool     structured = !(argc > 3 && std::strcmp(argv[3], "bytes") == 0);
    uint64_t       structured_inputs = 0;
    rng            r{ seed };

    const size_t n_configs = sizeof(CONFIGS) / sizeof(CONFIGS[0]);
    std::vector<std::unique_ptr<memory>> targets;
    std::vector<bytes>                   baselines;    // whole state of each target, with header
    std::vector<bytes>                   fingerprints;
    std::vector<std::vector<seed_blob>>  corpora(n_configs);
    std::vector<bytes>                   all_blobs;
    std::vector<stats>                   per_config(n_configs);

    for (size_t k = 0; k < n_configs; ++k) {
        const config & cfg = CONFIGS[k];
        memory source(cfg);
        source.populate({ 5, 3, 0, 2 }, 100 + k);
        const bool has_partial = cfg.kind != memory_kind::KV_CACHE && cfg.kind != memory_kind::RECURRENT;
        for (int32_t seq = -1; seq < cfg.n_seq_max; ++seq) {
            for (uint32_t flags : { 0u, STATE_HEADER, uint32_t(RS_STATE_PARTIAL_ONLY),
                                    STATE_HEADER | RS_STATE_PARTIAL_ONLY }) {
                if ((flags & RS_STATE_PARTIAL_ONLY) && !has_partial) {
                    continue;
                }
                corpora[k].push_back({ source.write(seq, flags), seq, flags });
                all_blobs.push_back(corpora[k].back().data);
            }
        }
        targets.push_back(std::make_unique<memory>(cfg));
        memory & t = *targets.back();
        t.populate({ 2, 0, 4, 1 }, 200 + k);
        // the baseline is the target after one whole round trip (whole reads compact the cells)
        const bytes whole = t.write(-1, STATE_HEADER);
        t.read(whole.data(), whole.size(), -1, STATE_HEADER);
        baselines.push_back(t.write(-1, STATE_HEADER));
        fingerprints.push_back(t.fingerprint());
        // every unmutated seed reads (a sequence may not fit: then a clean refusal); whole
        // states always fit
        stats seeds;
        for (const auto & sb : corpora[k]) {
            const bool ok = read_and_check(t, baselines[k], fingerprints[k], sb.data, sb.seq, sb.flags, seeds,
                                           std::string(cfg.name) + " seed");
            if (!ok && sb.seq < 0) {
                fail(std::string(cfg.name) + ": an unmutated whole-memory seed was refused");
            }
        }
    }

    const auto start = std::chrono::steady_clock::now();
    for (uint64_t it = 0; it < iterations; ++it) {
        const size_t      k   = size_t(r.below(n_configs));
        memory &          t   = *targets[k];
        const seed_blob & sb  = corpora[k][r.below(corpora[k].size())];
        bytes             in  = sb.data;
        if (structured && r.chance(2)) {
            // one or two fields changed, the bytes otherwise well-formed
            for (uint64_t m = 1 + r.below(2); m > 0; --m) {
                if (!mutate_field(in, t, sb.flags, r)) {
                    mutate_once(in, all_blobs, r);
                }
            }
            ++structured_inputs;
        } else {
            for (uint64_t m = 1 + r.below(3); m > 0; --m) {
                mutate_once(in, all_blobs, r);
            }
            if ((sb.flags & STATE_HEADER) && r.chance(2)) {
                reseal(in);
            }
        }
        // mostly the blob's own scope and flags; sometimes another target sequence or flags
        int32_t  seq   = sb.seq < 0 ? -1 : int32_t(r.below(uint64_t(t.cfg.n_seq_max)));
        uint32_t flags = sb.flags;
        if (r.chance(16)) {
            seq = int32_t(r.below(uint64_t(t.cfg.n_seq_max) + 1)) - 1;
        }
        if (r.chance(16)) {
            flags ^= r.chance(2) ? STATE_HEADER : RS_STATE_PARTIAL_ONLY;
        }
        read_and_check(t, baselines[k], fingerprints[k], in, seq, flags, per_config[k],
                       std::string(t.cfg.name) + " input " + std::to_string(it));
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    stats total;
    for (size_t k = 0; k < n_configs; ++k) {
        const stats & s = per_config[k];
        std::printf("%-16s inputs %10llu  accepted %9llu  refused %10llu  bad-arg %8llu  seeds %zu\n", CONFIGS[k].name,
                    (unsigned long long) s.inputs, (unsigned long long) s.accepted, (unsigned long long) s.refused,
                    (unsigned long long) s.bad_args, corpora[k].size());
        total.inputs += s.inputs;
        total.accepted += s.accepted;
        total.refused += s.refused;
        total.bad_args += s.bad_args;
    }
    std::printf("total            inputs %10llu  accepted %9llu  refused %10llu  bad-arg %8llu\n",
                (unsigned long long) total.inputs, (unsigned long long) total.accepted,
                (unsigned long long) total.refused, (unsigned long long) total.bad_args);
    std::printf("structure-aware inputs (fields changed): %llu\n", (unsigned long long) structured_inputs);
    std::printf("seed %llu: %llu inputs in %.1f s (%.0f inputs/s), no failures\n", (unsigned long long) seed,
                (unsigned long long) iterations, secs, secs > 0 ? double(iterations) / secs : 0.0);
    return 0;
}
