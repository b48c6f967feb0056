#include "llmem/batch.h"
#include "llmem/errors.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>

namespace llmem {

namespace {

template <typename... Args>
std::string format(const char * fmt, Args... args) {
    char buf[512];
    std::snprintf(buf, sizeof(buf), fmt, args...);
    return buf;
}

[[noreturn]] void reject(batch_reject reason, const std::string & msg) {
    throw batch_error(reason, msg);
}

// A sequence whose memory ends at `last` has no position left for the batch's next entry
// (automatic positions would wrap to INT32_MIN).
[[noreturn]] void reject_pos_overflow(int32_t seq, int32_t last) {
    reject(batch_reject::POS_OVERFLOW,
           format("sequence %d: the memory ends at position %d, and the batch's positions for it would pass "
                  "INT32_MAX (positions are int32)", seq, last));
}

// next_pos value of a sequence whose last automatic position was INT32_MAX.
constexpr int32_t POS_EXHAUSTED = std::numeric_limits<int32_t>::min();

} // namespace

// The validated batch plus its split cursor. Two of these exist so that init() can build the
// next one aside and swap it in only when every check passed. Per-sequence arrays are sized
// n_seq_max once and reset through the list of ids the previous batch touched, so init() costs
// O(batch), not O(n_seq_max).
struct batch_allocr::state {
    uint32_t n_tokens  = 0;
    uint32_t n_embd    = 0;
    uint32_t n_pos_val = 1;  // position values stored per entry: 1 for token batches, else n_pos
    bool     has_token = false;
    bool     has_embd  = false;

    std::vector<int32_t> token;
    std::vector<float>   embd;
    std::vector<int32_t> pos;         // [n_pos_val * n_tokens], section-major
    std::vector<int32_t> seq_id_off;  // [n_tokens + 1]
    std::vector<int32_t> seq_id;      // stored order: primary id first
    std::vector<int32_t> seq_set;     // the same ids sorted ascending (set identity)
    std::vector<int8_t>  output;
    uint32_t             n_outputs   = 0;
    bool                 has_coupled = false;
    bool                 single_ids  = true;  // every entry has exactly one id

    std::vector<int32_t> seq_id_unq;  // ascending ids present in the batch
    std::vector<int32_t> seq_idx;     // [n_seq_max] rank in seq_id_unq or -1
    std::vector<int32_t> seq_n;       // [n_seq_max] entries carrying the id
    std::vector<int32_t> seq_pmin;    // [n_seq_max] batch position range of the id
    std::vector<int32_t> seq_pmax;
    std::vector<int32_t> seq_plast;   // [n_seq_max] previous position of the id while scanning
    std::vector<uint8_t> seq_irregular;  // [n_seq_max] positions not simply +1 each entry
    std::vector<int32_t> single_group;  // [n_seq_max] group of the entries whose set is {id}
    // [n_seq_max] the memory's seq_pos_max(id), valid where mem_pmax_gen[id] == gen: filling
    // positions reads it for every sequence, and the continuation check below reuses it rather
    // than asking the memory a second time (a virtual call and a cache miss per sequence)
    std::vector<int32_t>  mem_pmax;
    std::vector<uint32_t> mem_pmax_gen;
    uint32_t              gen = 0;

    std::vector<int32_t> group_of;       // [n_tokens]
    std::vector<int32_t> group_off;      // [n_groups + 1]
    std::vector<int32_t> group_entries;  // ascending entry indices, group by group

    std::vector<uint8_t> used;
    uint32_t             n_used = 0;
    std::vector<int32_t> out_ids;

    explicit state(int32_t n_seq_max)
        : seq_idx(n_seq_max, -1), seq_n(n_seq_max, 0), seq_pmin(n_seq_max, -1),
          seq_pmax(n_seq_max, -1), seq_plast(n_seq_max, -1), seq_irregular(n_seq_max, 0),
          single_group(n_seq_max, -1), mem_pmax(n_seq_max, -1), mem_pmax_gen(n_seq_max, 0) {}

    void reset() {
        if (++gen == 0) {  // wrapped: forget every remembered position
            std::fill(mem_pmax_gen.begin(), mem_pmax_gen.end(), 0u);
            gen = 1;
        }
        for (int32_t s : seq_id_unq) {
            seq_idx[s]      = -1;
            seq_n[s]        = 0;
            seq_pmin[s]     = -1;
            seq_pmax[s]     = -1;
            seq_plast[s]    = -1;
            seq_irregular[s] = 0;
            single_group[s] = -1;
        }
        seq_id_unq.clear();
        n_tokens    = 0;
        n_embd      = 0;
        n_pos_val   = 1;
        has_token   = false;
        has_embd    = false;
        n_outputs   = 0;
        has_coupled = false;
        single_ids  = true;
        token.clear();
        embd.clear();
        pos.clear();
        seq_id_off.clear();
        seq_id.clear();
        seq_set.clear();
        output.clear();
        group_of.clear();
        group_off.clear();
        group_entries.clear();
        used.clear();
        n_used = 0;
        out_ids.clear();
    }

    int32_t primary(uint32_t i) const { return seq_id[seq_id_off[i]]; }

    int32_t pos_temporal(uint32_t i) const { return pos[i]; }
};

batch_allocr::batch_allocr(int32_t n_seq_max, int32_t n_vocab, uint32_t n_embd, uint32_t n_pos_per_embd)
    : n_seq_max_(n_seq_max), n_vocab_(n_vocab), n_embd_(n_embd), n_pos_(n_pos_per_embd) {
    if (n_seq_max < 1 || n_seq_max > SEQ_MAX_LIMIT) {
        throw std::invalid_argument(format("n_seq_max must be in [1, %d], got %d", SEQ_MAX_LIMIT, n_seq_max));
    }
    if (n_pos_per_embd < 1 || n_pos_per_embd > 4) {
        throw std::invalid_argument(format("n_pos_per_embd must be in [1, 4], got %u", n_pos_per_embd));
    }
    cur_   = std::make_unique<state>(n_seq_max);
    spare_ = std::make_unique<state>(n_seq_max);
}

batch_allocr::~batch_allocr() = default;

uint32_t batch_allocr::n_tokens() const { return cur_->n_tokens; }
uint32_t batch_allocr::n_used() const { return cur_->n_used; }
uint32_t batch_allocr::n_outputs() const { return cur_->n_outputs; }
bool batch_allocr::has_coupled() const { return cur_->has_coupled; }
const std::vector<int32_t> & batch_allocr::out_ids() const { return cur_->out_ids; }

int32_t batch_allocr::batch_pos_min(int32_t seq) const {
    return (seq >= 0 && seq < n_seq_max_) ? cur_->seq_pmin[seq] : -1;
}

int32_t batch_allocr::batch_pos_max(int32_t seq) const {
    return (seq >= 0 && seq < n_seq_max_) ? cur_->seq_pmax[seq] : -1;
}

// True when every entry lists exactly one id (the decode-step shape). The total alone is not
// enough: an entry without ids next to one with two has the same total.
static bool one_id_each(const batch & b) {
    for (size_t i = 0; i + 1 < b.seq_id_off.size(); ++i) {
        if (b.seq_id_off[i + 1] - b.seq_id_off[i] != 1) {
            return false;
        }
    }
    return true;
}

// Appends the distinct ids of one entry in llama.cpp's stored order: each newly attached id goes
// in front, so the result is the distinct ids in order of first appearance, reversed.
static void append_stored_ids(const int32_t * ids, int32_t n, std::vector<int32_t> & out) {
    const size_t start = out.size();
    for (int32_t k = 0; k < n; ++k) {
        const int32_t id = ids[k];
        if (std::find(out.begin() + start, out.end(), id) == out.end()) {
            out.push_back(id);
        }
    }
    std::reverse(out.begin() + start, out.end());
}

bool batch_allocr::init_decode_shape(const batch & b, const seq_pos_source * memory, bool output_all) {
    state &        st = *spare_;
    const uint32_t n  = b.n_tokens;
    if (n_pos_ != 1 || b.token.size() != n || !b.embd.empty() || !b.pos.empty() || b.pos_given ||
        b.seq_id_off.size() != size_t(n) + 1 || b.seq_id.size() != n || b.seq_id_off[n] != int32_t(n) ||
        (!b.output.empty() && b.output.size() != n)) {
        return false;
    }
    const uint32_t limit = n_vocab_ >= 0 ? uint32_t(n_vocab_) : uint32_t(std::numeric_limits<int32_t>::max()) + 1u;
    const uint32_t n_seq = uint32_t(n_seq_max_);
    st.token.resize(n);
    st.pos.resize(n);
    st.seq_id.resize(n);
    st.seq_set.resize(n);
    st.seq_id_off.resize(size_t(n) + 1);
    st.group_of.resize(n);
    st.group_off.resize(size_t(n) + 1);
    st.group_entries.resize(n);
    st.output.resize(n);
    // Raw pointers in locals: the memory's seq_pos_max is an opaque call, after which every
    // vector's data pointer would otherwise be reloaded.
    const int32_t * tok     = b.token.data();
    const int32_t * ids     = b.seq_id.data();
    const int32_t * offs    = b.seq_id_off.data();
    int32_t *       seq_n   = st.seq_n.data();
    int32_t *       mem_max = st.mem_pmax.data();
    for (uint32_t i = 0; i < n; ++i) {
        const int32_t s = ids[i];
        // a negative token or id fails the unsigned compares too; a second entry of a sequence
        // needs the general checks (order, gaps) and groups
        if (offs[i] != int32_t(i) || uint32_t(tok[i]) >= limit || uint32_t(s) >= n_seq || seq_n[s] != 0) {
            return false;
        }
        seq_n[s] = 1;
        st.seq_id_unq.push_back(s);
        mem_max[s] = memory ? memory->seq_pos_max(s) : -1;
        if (mem_max[s] == std::numeric_limits<int32_t>::max()) {
            return false;  // no next position: the general path refuses it
        }
    }
    const bool     given_output  = !b.output.empty();
    const int8_t * out_in        = b.output.data();
    uint32_t       n_outputs     = 0;
    const uint32_t gen           = st.gen;
    uint32_t *     mem_gen       = st.mem_pmax_gen.data();
    int32_t *      pmin          = st.seq_pmin.data();
    int32_t *      pmax          = st.seq_pmax.data();
    int32_t *      plast         = st.seq_plast.data();
    int32_t *      single_group  = st.single_group.data();
    int32_t *      token         = st.token.data();
    int32_t *      pos           = st.pos.data();
    int32_t *      seq_id        = st.seq_id.data();
    int32_t *      seq_set       = st.seq_set.data();
    int32_t *      seq_id_off    = st.seq_id_off.data();
    int32_t *      group_of      = st.group_of.data();
    int32_t *      group_off     = st.group_off.data();
    int32_t *      group_entries = st.group_entries.data();
    int8_t *       output        = st.output.data();
    for (uint32_t i = 0; i < n; ++i) {
        const int32_t s = ids[i];
        const int32_t p = memory ? mem_max[s] + 1 : 0;
        mem_gen[s]       = gen;
        pmin[s]          = p;
        pmax[s]          = p;
        plast[s]         = p;
        single_group[s]  = int32_t(i);
        token[i]         = tok[i];
        pos[i]           = p;
        seq_id[i]        = s;
        seq_set[i]       = s;
        seq_id_off[i]    = int32_t(i);
        group_of[i]      = int32_t(i);
        group_off[i]     = int32_t(i);
        group_entries[i] = int32_t(i);
        const int8_t out = output_all || (given_output ? out_in[i] != 0 : i + 1 == n);
        output[i]        = out;
        n_outputs += uint32_t(out);
    }
    st.seq_id_off[n] = int32_t(n);
    st.group_off[n]  = int32_t(n);
    st.n_outputs     = n_outputs;
    st.has_token     = true;
    st.single_ids    = true;
    if (!std::is_sorted(st.seq_id_unq.begin(), st.seq_id_unq.end())) {
        std::sort(st.seq_id_unq.begin(), st.seq_id_unq.end());
    }
    for (size_t r = 0; r < st.seq_id_unq.size(); ++r) {
        st.seq_idx[st.seq_id_unq[r]] = int32_t(r);
    }
    st.n_tokens = n;
    st.used.assign(n, 0);
    st.n_used = 0;
    std::swap(cur_, spare_);
    return true;
}

void batch_allocr::init(const batch & b, const seq_pos_source * memory, bool output_all) {
    if (in_init_) {
        throw error("BatchAllocator.init re-entered (from the position source of an init in progress on the "
                    "same allocator): refused, the allocator keeps the outer call's batch");
    }
    struct init_guard {
        bool & flag;
        explicit init_guard(bool & f) : flag(f) { flag = true; }
        ~init_guard() { flag = false; }
        init_guard(const init_guard &)             = delete;
        init_guard & operator=(const init_guard &) = delete;
    } guard(in_init_);
    init_checked(b, memory, output_all);
}

void batch_allocr::init_checked(const batch & b, const seq_pos_source * memory, bool output_all) {
    state & st = *spare_;
    st.reset();

    const uint32_t n = b.n_tokens;
    if (n == 0) {
        reject(batch_reject::EMPTY, "the batch is empty (it has no tokens)");
    }
    // The decode step (one new token for each of many sequences) is the hot call: validated in
    // one pass when the batch has exactly that shape. Anything else, including every batch
    // that fails a check, takes the general path, which reports failures in llama.cpp's order.
    if (decode_fast_path_ && init_decode_shape(b, memory, output_all)) {
        return;
    }
    st.reset();
    if (b.seq_id_off.size() != 0 && b.seq_id_off.size() != size_t(n) + 1) {
        reject(batch_reject::BAD_SHAPE, format("seq_id describes %zu tokens, the batch has %u",
                                               b.seq_id_off.size() - 1, n));
    }

    // content kind: every entry must agree with entry 0 on carrying a token id / an embedding
    const bool tokens_given = !b.token.empty();
    const bool embd_given   = !b.embd.empty();
    if (tokens_given && b.token.size() != n) {
        reject(batch_reject::BAD_SHAPE, format("token has %zu values, the batch has %u tokens", b.token.size(), n));
    }
    st.has_token = tokens_given && b.token[0] != NO_TOKEN;
    st.has_embd  = embd_given;
    if (tokens_given) {
        for (uint32_t i = 1; i < n; ++i) {
            if ((b.token[i] != NO_TOKEN) != st.has_token) {
                reject(batch_reject::MIXED_CONTENT,
                       format("entry %u %s a token id but entry 0 %s: every entry of a batch must carry "
                              "the same kind of input", i, st.has_token ? "lacks" : "has",
                              st.has_token ? "has one" : "does not"));
            }
        }
    }
    if (!st.has_token && !st.has_embd) {
        reject(batch_reject::NO_CONTENT, "the batch carries neither token ids nor embeddings");
    }

    // token ids
    if (st.has_token) {
        // one unsigned compare covers both ends of [0, n_vocab)
        const uint32_t limit = n_vocab_ >= 0 ? uint32_t(n_vocab_) : uint32_t(std::numeric_limits<int32_t>::max()) + 1u;
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t t = b.token[i];
            if (uint32_t(t) >= limit) {
                if (n_vocab_ >= 0) {
                    reject(batch_reject::BAD_TOKEN,
                           format("token[%u] = %d is outside the vocabulary [0, %d)", i, t, n_vocab_));
                }
                reject(batch_reject::BAD_TOKEN, format("token[%u] = %d is negative", i, t));
            }
        }
        st.token.assign(b.token.begin(), b.token.end());
    }
    // array shapes that depend on the content kind (checked after the token ids, whose check
    // llama.cpp runs first)
    st.n_pos_val = st.has_token ? 1 : n_pos_;
    if ((b.pos_given || !b.pos.empty()) && b.pos.size() != size_t(st.n_pos_val) * n) {
        reject(batch_reject::BAD_SHAPE,
               format("pos has %zu values, this batch needs %u (%u per token)", b.pos.size(),
                      st.n_pos_val * n, st.n_pos_val));
    }
    if (st.has_embd) {
        if (b.n_embd == 0 || b.embd.size() != size_t(b.n_embd) * n) {
            reject(batch_reject::BAD_SHAPE, format("embd has %zu values, not %u rows", b.embd.size(), n));
        }
        if (n_embd_ != 0 && b.n_embd != n_embd_) {
            reject(batch_reject::BAD_SHAPE,
                   format("embedding rows have %u values, the model's width is %u", b.n_embd, n_embd_));
        }
    }
    if (!b.output.empty() && b.output.size() != n) {
        reject(batch_reject::BAD_SHAPE, format("output has %zu values, the batch has %u tokens", b.output.size(), n));
    }

    if (st.has_embd) {
        st.n_embd = b.n_embd;
        st.embd.assign(b.embd.begin(), b.embd.end());
    }

    // sequence ids in stored order (primary first); an entry without ids is refused
    st.seq_id_off.resize(n + 1);
    if (b.seq_id_off.empty()) {
        st.seq_id.assign(n, 0);
        for (uint32_t i = 0; i <= n; ++i) {
            st.seq_id_off[i] = int32_t(i);
        }
    } else if (one_id_each(b)) {
        // one id per entry (the decode-step shape): nothing to reorder
        st.seq_id.assign(b.seq_id.begin(), b.seq_id.end());
        st.seq_id_off.assign(b.seq_id_off.begin(), b.seq_id_off.end());
    } else {
        st.seq_id_off[0] = 0;
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t k0 = b.seq_id_off[i];
            const int32_t k1 = b.seq_id_off[i + 1];
            append_stored_ids(b.seq_id.data() + k0, k1 - k0, st.seq_id);
            st.seq_id_off[i + 1] = int32_t(st.seq_id.size());
        }
    }
    st.single_ids = true;
    for (uint32_t i = 0; i < n && st.single_ids; ++i) {
        st.single_ids = st.seq_id_off[i + 1] - st.seq_id_off[i] == 1;
    }

    // positions: given, or continuing each sequence from the memory (keyed by the caller's first id)
    if (!b.pos.empty()) {
        st.pos.assign(b.pos.begin(), b.pos.end());
    } else {
        st.pos.assign(size_t(st.n_pos_val) * n, 0);
        // seq_pmin is still all -1 here; borrow it as the "next position" table, reset below
        std::vector<int32_t> & next_pos = st.seq_pmin;
        std::vector<int32_t> & touched  = st.seq_id_unq;
        for (uint32_t i = 0; i < n; ++i) {
            if (!b.seq_id_off.empty() && b.seq_id_off[i] == b.seq_id_off[i + 1]) {
                continue;  // refused below: no sequence
            }
            const int32_t first = b.seq_id_off.empty() ? 0 : b.seq_id[b.seq_id_off[i]];
            if (first < 0 || first >= n_seq_max_) {
                continue;  // refused below as an invalid sequence id
            }
            if (st.seq_n[first] == 0) {
                st.seq_n[first] = 1;
                touched.push_back(first);
                const int32_t x = memory ? memory->seq_pos_max(first) : -1;
                st.mem_pmax[first]     = x;
                st.mem_pmax_gen[first] = st.gen;
                if (x == std::numeric_limits<int32_t>::max()) {
                    reject_pos_overflow(first, x);
                }
                next_pos[first] = memory ? x + 1 : 0;
            }
            const int32_t p = next_pos[first];
            if (p == POS_EXHAUSTED) {
                reject_pos_overflow(first, st.mem_pmax[first]);
            }
            st.pos[i]       = p;
            next_pos[first] = p == std::numeric_limits<int32_t>::max() ? POS_EXHAUSTED : p + 1;
        }
        for (int32_t s : touched) {
            next_pos[s]  = -1;
            st.seq_n[s]  = 0;
        }
        touched.clear();
    }

    if (st.single_ids) {
        for (uint32_t i = 0; i < n; ++i) {
            if (uint32_t(st.seq_id[i]) >= uint32_t(n_seq_max_)) {
                reject(batch_reject::BAD_SEQ_ID, format("seq_id[%u][0] = %d is outside [0, n_seq_max = %d)", i,
                                                        st.seq_id[i], n_seq_max_));
            }
        }
    } else {
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t k0 = st.seq_id_off[i];
            const int32_t k1 = st.seq_id_off[i + 1];
            if (k0 == k1) {
                reject(batch_reject::NO_SEQ_ID, format("entry %u belongs to no sequence", i));
            }
            for (int32_t k = k0; k < k1; ++k) {
                const int32_t s = st.seq_id[k];
                if (s < 0 || s >= n_seq_max_) {
                    reject(batch_reject::BAD_SEQ_ID,
                           format("seq_id[%u][%d] = %d is outside [0, n_seq_max = %d)", i, k - k0, s, n_seq_max_));
                }
            }
        }
    }

    // output flags
    st.output.resize(n);
    if (output_all) {
        std::fill(st.output.begin(), st.output.end(), int8_t(1));
        st.n_outputs = n;
    } else if (b.output.empty()) {
        std::fill(st.output.begin(), st.output.end(), int8_t(0));
        st.output[n - 1] = 1;
        st.n_outputs     = 1;
    } else {
        uint32_t count = 0;
        for (uint32_t i = 0; i < n; ++i) {
            st.output[i] = int8_t(b.output[i] != 0);
            count += uint32_t(st.output[i]);
        }
        st.n_outputs = count;
    }

    // per-sequence position ranges, the ids present, coupling; the first decrease of a
    // sequence's positions is remembered here but reported after the checks llama.cpp runs first
    std::vector<std::pair<int32_t, int32_t>> coupled;  // (non-primary id, primary id)
    struct decrease { uint32_t entry; int32_t seq, pos, prev; };
    bool     has_decrease = false;
    decrease first_decrease{};
    // position range, gap hint and first decrease of sequence s for an entry i at position p;
    // returns true when s is seen for the first time
    auto record = [&](uint32_t i, int32_t s, int32_t p) {
        const bool first = st.seq_n[s]++ == 0;
        const int32_t prev = first ? -1 : st.seq_plast[s];
        if (first) {
            st.seq_id_unq.push_back(s);
            st.seq_pmin[s] = p;
            st.seq_pmax[s] = p;
        } else {
            st.seq_pmin[s] = std::min(st.seq_pmin[s], p);
            st.seq_pmax[s] = std::max(st.seq_pmax[s], p);
            st.seq_irregular[s] |= uint8_t(int64_t(p) != int64_t(prev) + 1);
        }
        if (p < prev && !has_decrease) {
            has_decrease   = true;
            first_decrease = { i, s, p, prev };
        }
        st.seq_plast[s] = p;
        return first;
    };
    st.group_of.resize(n);
    int32_t n_groups = 0;
    if (st.single_ids) {
        // the decode-step shape: one id per entry; the groups are the sequences themselves
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t s = st.seq_id[i];
            if (record(i, s, st.pos[i])) {
                st.single_group[s] = n_groups++;
            }
            st.group_of[i] = st.single_group[s];
        }
    } else {
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t k0 = st.seq_id_off[i];
            const int32_t k1 = st.seq_id_off[i + 1];
            for (int32_t k = k0; k < k1; ++k) {
                record(i, st.seq_id[k], st.pos_temporal(i));
                if (k > k0) {
                    st.has_coupled = true;
                    coupled.emplace_back(st.seq_id[k], st.seq_id[k0]);
                }
            }
        }
    }
    if (!std::is_sorted(st.seq_id_unq.begin(), st.seq_id_unq.end())) {
        std::sort(st.seq_id_unq.begin(), st.seq_id_unq.end());
    }
    for (size_t r = 0; r < st.seq_id_unq.size(); ++r) {
        st.seq_idx[st.seq_id_unq[r]] = int32_t(r);
    }

    // positions must continue what the memory holds, without gaps inside the batch
    std::vector<int32_t> seq_positions;
    for (int32_t s : st.seq_id_unq) {
        const bool    read = st.mem_pmax_gen[s] == st.gen;  // while filling positions
        const int32_t x    = read ? st.mem_pmax[s] : memory ? memory->seq_pos_max(s) : -1;
        const int32_t ymin = st.seq_pmin[s];
        const int32_t ymax = st.seq_pmax[s];
        if (n_pos_ > 1) {
            const bool stale = st.has_token ? (x >= 0 && x >= ymin) : (x >= 0 && x > ymin);
            if (stale) {
                reject(batch_reject::POS_NOT_CONTINUING,
                       format("sequence %d: the memory already holds position %d and the batch starts at "
                              "position %d", s, x, ymin));
            }
            continue;
        }
        if (x == std::numeric_limits<int32_t>::max()) {
            reject_pos_overflow(s, x);
        }
        if (x >= 0 && ymin != x + 1) {
            reject(batch_reject::POS_NOT_CONTINUING,
                   format("sequence %d: the memory ends at position %d, so the batch must continue at %d, "
                          "but its first position is %d", s, x, x + 1, ymin));
        }
        if (!st.seq_irregular[s]) {
            continue;  // each entry one past the previous: no gap
        }
        seq_positions.clear();
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t * ids0 = st.seq_id.data() + st.seq_id_off[i];
            const int32_t * ids1 = st.seq_id.data() + st.seq_id_off[i + 1];
            if (std::find(ids0, ids1, s) != ids1) {
                seq_positions.push_back(st.pos_temporal(i));
            }
        }
        std::sort(seq_positions.begin(), seq_positions.end());
        const auto n_distinct = std::unique(seq_positions.begin(), seq_positions.end()) - seq_positions.begin();
        if (int64_t(ymax) - ymin + 1 > n_distinct) {
            reject(batch_reject::POS_GAP,
                   format("sequence %d: the batch's positions %d..%d leave a gap (%ld distinct positions)",
                          s, ymin, ymax, long(n_distinct)));
        }
    }

    // sequences coupled by a token must hold the same positions in the memory
    if (memory && !coupled.empty()) {
        std::sort(coupled.begin(), coupled.end());
        coupled.erase(std::unique(coupled.begin(), coupled.end()), coupled.end());
        for (const auto & [a, c] : coupled) {
            const int32_t amin = memory->seq_pos_min(a), amax = memory->seq_pos_max(a);
            const int32_t cmin = memory->seq_pos_min(c), cmax = memory->seq_pos_max(c);
            if (amin != cmin || amax != cmax) {
                reject(batch_reject::COUPLED_DIVERGED,
                       format("sequences %d and %d share a token of the batch but have diverged in the "
                              "memory ([%d, %d] vs [%d, %d])", a, c, amin, amax, cmin, cmax));
            }
        }
    }

    // positions of each sequence must not decrease inside the batch (the first may be -1)
    if (has_decrease) {
        reject(batch_reject::POS_DECREASING,
               format("sequence %d: position %d of entry %u comes after position %d", first_decrease.seq,
                      first_decrease.pos, first_decrease.entry, first_decrease.prev));
    }

    // groups: entries with the same set of ids, each group's entries ascending
    st.seq_set.assign(st.seq_id.begin(), st.seq_id.end());
    if (!st.single_ids) {
        std::map<std::vector<int32_t>, int32_t> multi_groups;  // only batches with multi-seq entries
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t k0 = st.seq_id_off[i];
            const int32_t k1 = st.seq_id_off[i + 1];
            if (k1 - k0 == 1) {
                int32_t & g = st.single_group[st.seq_id[k0]];
                if (g < 0) {
                    g = n_groups++;
                }
                st.group_of[i] = g;
            } else {
                std::sort(st.seq_set.begin() + k0, st.seq_set.begin() + k1);
                std::vector<int32_t> key(st.seq_set.begin() + k0, st.seq_set.begin() + k1);
                auto it = multi_groups.try_emplace(std::move(key), n_groups).first;
                if (it->second == n_groups) {
                    ++n_groups;
                }
                st.group_of[i] = it->second;
            }
        }
    }
    st.group_off.assign(size_t(n_groups) + 1, 0);
    for (uint32_t i = 0; i < n; ++i) {
        ++st.group_off[st.group_of[i] + 1];
    }
    for (int32_t g = 0; g < n_groups; ++g) {
        st.group_off[g + 1] += st.group_off[g];
    }
    st.group_entries.resize(n);
    {
        std::vector<int32_t> & fill = scratch_idxs_;
        fill.assign(st.group_off.begin(), st.group_off.end() - 1);
        for (uint32_t i = 0; i < n; ++i) {
            st.group_entries[fill[st.group_of[i]]++] = int32_t(i);
        }
    }

    st.n_tokens = n;
    st.used.assign(n, 0);
    st.n_used = 0;
    std::swap(cur_, spare_);
}

void batch_allocr::split_reset() {
    state & st = *cur_;
    std::fill(st.used.begin(), st.used.end(), uint8_t(0));
    st.n_used = 0;
    st.out_ids.clear();
}

std::shared_ptr<ubatch_data> batch_allocr::acquire_data() {
    constexpr size_t POOL_MAX = 32;
    for (auto & d : pool_) {
        if (d.use_count() == 1) {
            for (int32_t s : d->seq_id_unq) {
                d->seq_idx[s] = -1;
            }
            return d;
        }
    }
    auto d = std::make_shared<ubatch_data>();
    d->seq_idx.assign(size_t(n_seq_max_), -1);
    if (pool_.size() < POOL_MAX) {
        pool_.push_back(d);
    }
    return d;
}

ubatch batch_allocr::make_ubatch(const std::vector<int32_t> & idxs, uint32_t n_seqs, bool equal_seqs) {
    state & st = *cur_;
    const uint32_t nt = uint32_t(idxs.size());

    std::shared_ptr<ubatch_data> d = acquire_data();
    d->token.clear();
    d->embd.clear();
    d->seq_id.clear();
    d->seq_id_unq.clear();
    d->seq_id_off.resize(nt + 1);
    d->output.resize(nt);
    d->batch_idx.resize(nt);
    d->pos.resize(size_t(n_pos_) * nt);

    if (st.has_token) {
        d->token.resize(nt);
    }
    if (st.has_embd) {
        d->embd.resize(size_t(nt) * st.n_embd);
    }

    const int32_t * ix = idxs.data();
    if (st.has_token) {
        const int32_t * src = st.token.data();
        int32_t *       dst = d->token.data();
        for (uint32_t k = 0; k < nt; ++k) {
            dst[k] = src[ix[k]];
        }
    }
    if (st.has_embd) {
        for (uint32_t k = 0; k < nt; ++k) {
            std::copy_n(st.embd.data() + size_t(idxs[k]) * st.n_embd, st.n_embd, d->embd.data() + size_t(k) * st.n_embd);
        }
    }
    for (uint32_t j = 0; j < n_pos_; ++j) {
        // token batches carry one position, used for every section
        const int32_t * src = st.pos.data() + (st.n_pos_val == 1 ? 0 : size_t(j) * st.n_tokens);
        int32_t *       dst = d->pos.data() + size_t(j) * nt;
        for (uint32_t k = 0; k < nt; ++k) {
            dst[k] = src[ix[k]];
        }
    }
    if (st.single_ids) {
        d->seq_id.resize(nt);
        const int32_t * src = st.seq_id.data();
        int32_t *       ids = d->seq_id.data();
        int32_t *       off = d->seq_id_off.data();
        for (uint32_t k = 0; k < nt; ++k) {
            ids[k] = src[ix[k]];
            off[k] = int32_t(k);
        }
        off[nt] = int32_t(nt);
    } else {
        d->seq_id_off[0] = 0;
        for (uint32_t k = 0; k < nt; ++k) {
            const int32_t i = idxs[k];
            d->seq_id.insert(d->seq_id.end(), st.seq_id.begin() + st.seq_id_off[i], st.seq_id.begin() + st.seq_id_off[i + 1]);
            d->seq_id_off[k + 1] = int32_t(d->seq_id.size());
        }
    }
    bool      unq_sorted = true;
    int32_t   last_new   = -1;
    int32_t * seq_idx    = d->seq_idx.data();
    for (int32_t s : d->seq_id) {
        if (seq_idx[s] < 0) {
            seq_idx[s] = 0;
            unq_sorted = unq_sorted && last_new < s;
            last_new   = s;
            d->seq_id_unq.push_back(s);
        }
    }
    const int8_t * out_src   = st.output.data();
    int8_t *       out       = d->output.data();
    int32_t *      batch_idx = d->batch_idx.data();
    for (uint32_t k = 0; k < nt; ++k) {
        const int32_t i = ix[k];
        out[k]          = out_src[i];
        batch_idx[k]    = i;
        if (out_src[i]) {
            st.out_ids.push_back(i);
        }
    }
    if (!unq_sorted) {
        std::sort(d->seq_id_unq.begin(), d->seq_id_unq.end());
    }
    for (size_t r = 0; r < d->seq_id_unq.size(); ++r) {
        d->seq_idx[d->seq_id_unq[r]] = int32_t(r);
    }

    ubatch ub;
    ub.equal_seqs   = equal_seqs;
    ub.n_tokens     = nt;
    ub.n_seqs       = n_seqs;
    ub.n_seq_tokens = n_seqs > 0 ? nt / n_seqs : 0;
    ub.n_seqs_unq   = uint32_t(d->seq_id_unq.size());
    ub.n_pos        = n_pos_;
    ub.n_embd       = st.n_embd;
    ub.data         = std::move(d);
    return ub;
}

uint32_t batch_allocr::first_unused() const {
    const state & st = *cur_;
    uint32_t      f  = 0;
    while (f < st.n_tokens && st.used[f]) {
        ++f;
    }
    return f;
}

ubatch batch_allocr::split_simple(uint32_t n_ubatch) {
    state &        st = *cur_;
    const uint32_t f  = first_unused();
    if (f == st.n_tokens) {
        return {};
    }
    std::vector<int32_t> & idxs = scratch_idxs_;
    idxs.clear();
    // the entries after the first unused one are taken as they come (llama.cpp does not re-check)
    for (uint32_t i = f; i < st.n_tokens; ++i) {
        st.used[i] = 1;
        ++st.n_used;
        idxs.push_back(int32_t(i));
        if (idxs.size() >= n_ubatch) {
            break;
        }
    }
    return make_ubatch(idxs, uint32_t(idxs.size()), false);
}

ubatch batch_allocr::split_equal(uint32_t n_ubatch, bool sequential, uint32_t keep_tail) {
    state & st = *cur_;
    if (sequential && st.has_coupled) {
        return {};  // a sequential split cannot separate sequences that share tokens
    }

    // pick disjoint sequence sets in order of their first unused entry; up to n_ubatch + 1 of
    // them (llama.cpp checks the count after appending)
    std::vector<chosen_set> & chosen = scratch_chosen_;
    chosen.clear();
    std::vector<int32_t> & marked = scratch_idxs_;  // ids of the chosen sets, to clear the marks
    marked.clear();
    int32_t last = -1;
    for (uint32_t i = 0; i < st.n_tokens; ++i) {
        if (st.used[i]) {
            continue;
        }
        const int32_t k0 = st.seq_id_off[i];
        const int32_t k1 = st.seq_id_off[i + 1];
        bool overlaps = false;
        for (int32_t k = k0; k < k1 && !overlaps; ++k) {
            overlaps = st.seq_n[st.seq_id[k]] < 0;
        }
        if (overlaps) {
            continue;
        }
        if (sequential && !chosen.empty() && st.primary(i) != last + 1) {
            continue;
        }
        for (int32_t k = k0; k < k1; ++k) {
            st.seq_n[st.seq_id[k]] = -st.seq_n[st.seq_id[k]];  // negative count marks "chosen"
            marked.push_back(st.seq_id[k]);
        }
        const int32_t g = st.group_of[i];
        uint32_t cursor = 0;
        while (st.used[st.group_entries[st.group_off[g] + cursor]]) {
            ++cursor;
        }
        chosen.push_back({ g, cursor, 0 });
        last = st.primary(i);
        if (chosen.size() > n_ubatch) {
            break;
        }
    }
    for (int32_t s : marked) {
        st.seq_n[s] = -st.seq_n[s];
    }
    if (chosen.empty()) {
        return {};
    }
    if (keep_tail > 0 && n_ubatch <= keep_tail) {
        throw std::invalid_argument(
            format("split_equal: n_ubatch (%u) must be larger than the kept tail (%u)", n_ubatch, keep_tail));
    }

    auto group_size = [&](int32_t g) { return uint32_t(st.group_off[g + 1] - st.group_off[g]); };
    auto entry_at   = [&](const chosen_set & c, uint32_t at) { return st.group_entries[st.group_off[c.group] + at]; };
    auto take = [&](chosen_set & c) {
        st.used[entry_at(c, c.cursor)] = 1;
        ++st.n_used;
        ++c.cursor;
        ++c.taken;
    };
    auto give_back = [&](chosen_set & c) {
        --c.cursor;
        --c.taken;
        st.used[entry_at(c, c.cursor)] = 0;
        --st.n_used;
    };

    // equal rounds: one entry of every set per round, while the sets last and the ubatch has room
    const uint32_t n_sets = uint32_t(chosen.size());
    for (uint32_t rounds = 0;;) {
        bool exhausted = false;
        for (const auto & c : chosen) {
            exhausted = exhausted || c.cursor >= group_size(c.group);
        }
        if (exhausted) {
            break;
        }
        for (auto & c : chosen) {
            take(c);
        }
        ++rounds;
        if (uint64_t(rounds + 1) * n_sets > n_ubatch) {
            break;
        }
    }

    // keep the last keep_tail entries of every sequence in one ubatch
    if (keep_tail > 0) {
        auto remaining = [&](const chosen_set & c) { return group_size(c.group) - c.cursor; };
        size_t keep = 0;
        while (keep < chosen.size() && (remaining(chosen[keep]) == 0 || remaining(chosen[keep]) >= keep_tail)) {
            ++keep;
        }
        if (keep == 0) {
            chosen_set & first = chosen[0];
            if (first.taken + remaining(first) <= n_ubatch) {
                while (remaining(first) > 0) {
                    take(first);
                }
            } else {
                while (remaining(first) < keep_tail) {
                    give_back(first);
                }
            }
            keep = 1;
        }
        for (size_t c = keep; c < chosen.size(); ++c) {
            while (chosen[c].taken > 0) {
                give_back(chosen[c]);
            }
        }
        chosen.resize(keep);
    }

    std::vector<int32_t> & idxs = scratch_idxs_;
    idxs.clear();
    for (const auto & c : chosen) {
        for (uint32_t at = c.cursor - c.taken; at < c.cursor; ++at) {
            idxs.push_back(entry_at(c, at));
        }
    }
    return make_ubatch(idxs, uint32_t(chosen.size()), true);
}

ubatch batch_allocr::split_seq(uint32_t n_ubatch) {
    state &        st = *cur_;
    const uint32_t f  = first_unused();
    if (f == st.n_tokens) {
        return {};
    }
    // is the id set of entry i a subset of the id set of entry cur?
    auto subset_of = [&](uint32_t i, uint32_t cur) {
        const int32_t * c0 = st.seq_set.data() + st.seq_id_off[cur];
        const int32_t * c1 = st.seq_set.data() + st.seq_id_off[cur + 1];
        return std::includes(c0, c1, st.seq_set.data() + st.seq_id_off[i], st.seq_set.data() + st.seq_id_off[i + 1]);
    };
    std::vector<int32_t> & idxs = scratch_idxs_;
    idxs.clear();
    uint32_t cur = f;
    st.used[f] = 1;
    ++st.n_used;
    idxs.push_back(int32_t(f));
    uint32_t scan = f;
    while (idxs.size() < n_ubatch) {
        ++scan;
        while (scan < st.n_tokens && (st.used[scan] || !subset_of(scan, cur))) {
            ++scan;
        }
        if (scan >= st.n_tokens) {
            break;
        }
        st.used[scan] = 1;
        ++st.n_used;
        idxs.push_back(int32_t(scan));
        cur = scan;
    }
    return make_ubatch(idxs, 1, true);
}

} // namespace llmem
