#include "llmem/rs_memory.h"
#include "llmem/state_holes.h"

#include "llmem/batch.h"
#include "llmem/errors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace llmem {

namespace {

constexpr int64_t INT32_LIMIT = std::numeric_limits<int32_t>::max();

// Sequential little-endian reader over a byte span; running out of bytes is a state_error.
class byte_reader {
public:
    byte_reader(const uint8_t * data, size_t n) : data_(data), n_(n) {}

    template <typename T>
    T read(const char * what) {
        T v;
        need(sizeof(T), what);
        std::memcpy(&v, data_ + off_, sizeof(T));
        off_ += sizeof(T);
        return v;
    }

    // Skip `count` rows of `row_bytes`; returns where they start.
    size_t skip_rows(uint64_t count, uint64_t row_bytes, const char * what) {
        if (row_bytes != 0 && count > (n_ - off_) / row_bytes) {
            throw state_error(std::string("truncated state: the ") + what + " rows end after the data");
        }
        const size_t start = off_;
        off_ += size_t(count * row_bytes);
        return start;
    }

    size_t offset() const { return off_; }
    size_t remaining() const { return n_ - off_; }

private:
    void need(size_t k, const char * what) const {
        if (n_ - off_ < k) {
            throw state_error(std::string("truncated state: it ends inside the ") + what);
        }
    }

    const uint8_t * data_;
    size_t n_;
    size_t off_ = 0;
};

class byte_writer {
public:
    byte_writer(uint8_t * out, size_t n) : out_(out), n_(n) {}

    template <typename T>
    void write(T v) {
        put(&v, sizeof(T));
    }

    // k zero bytes; returns where they start (a section a buffer-less memory leaves to its storage)
    const uint8_t * zeros(size_t k) {
        if (n_ - off_ < k) {
            throw std::logic_error("rs_memory::state_write: output smaller than state_write_size()");
        }
        if (k != 0) {
            std::memset(out_ + off_, 0, k);
        }
        off_ += k;
        return out_ + off_ - k;
    }

    void put(const void * src, size_t k) {
        if (n_ - off_ < k) {
            throw std::logic_error("rs_memory::state_write: output smaller than state_write_size()");
        }
        if (k != 0) {
            std::memcpy(out_ + off_, src, k);
        }
        off_ += k;
    }

    size_t offset() const { return off_; }

private:
    uint8_t * out_;
    size_t n_;
    size_t off_ = 0;
};

} // namespace

// The result of checking a whole state block before anything is changed.
struct rs_memory::parsed_state {
    uint32_t              cell_count = 0;
    std::vector<int32_t>  pos;
    std::vector<uint32_t> id_off;  // [cell_count + 1]
    std::vector<int32_t>  ids;
    std::vector<size_t>   r_rows;  // per present layer: offset of its first R row in the block
    std::vector<size_t>   s_rows;
    std::vector<size_t>   p_rows;  // per present layer with a P array (else unused)
    size_t                consumed = 0;
};

rs_memory::rs_memory(uint32_t size, int32_t n_seq_max, uint32_t n_rs_seq)
    : size_(size), n_seq_max_(n_seq_max), n_rs_seq_(n_rs_seq) {
    if (size == 0 || int64_t(size) > INT32_LIMIT) {
        throw std::invalid_argument("mem_size must be in [1, 2^31), got " + std::to_string(size));
    }
    if (n_seq_max < 1 || n_seq_max > SEQ_MAX_LIMIT) {
        throw std::invalid_argument("n_seq_max must be in [1, " + std::to_string(SEQ_MAX_LIMIT) +
                                    "], got " + std::to_string(n_seq_max));
    }
    // s_copy returns plane * size + cell as int32
    if ((int64_t(n_rs_seq) + 1) * int64_t(size) > INT32_LIMIT) {
        throw std::invalid_argument("(1 + n_rs_seq) * mem_size must fit in int32, got n_rs_seq " +
                                    std::to_string(n_rs_seq));
    }
    cells_.resize(size);
    tails_.assign(size, -1);
    rs_idx_.assign(size_t(n_seq_max), 0);
    src_refs_.assign(size, 0);
    cell_epoch_.assign(size, 0);
    ids_epoch_.assign(size, 0);
    tail_epoch_.assign(size, 0);
    read_ubatch_ = std::make_shared<ubatch_data>();
}

rs_memory::~rs_memory() = default;

void rs_memory::attach_buffers(const rs_buffers & bufs) {
    const size_t n_present = bufs.r.size();
    if (bufs.s.size() != n_present || bufs.r_row_bytes.size() != n_present ||
        bufs.s_row_bytes.size() != n_present) {
        throw std::invalid_argument("rs_buffers: r, s and their row sizes must have one entry per present layer");
    }
    if (n_present > bufs.n_layer_total) {
        throw std::invalid_argument("rs_buffers: more present layers than n_layer_total");
    }
    // no array at all: a buffer-less memory (its storage holds the rows elsewhere); otherwise
    // every present layer needs its arrays
    bool none = true;
    for (size_t l = 0; l < n_present; ++l) {
        none = none && bufs.r[l] == nullptr && bufs.s[l] == nullptr;
    }
    for (size_t l = 0; l < n_present && !none; ++l) {
        if ((bufs.r[l] == nullptr && bufs.r_row_bytes[l] != 0) ||
            (bufs.s[l] == nullptr && bufs.s_row_bytes[l] != 0)) {
            throw std::invalid_argument("rs_buffers: a present layer has no array");
        }
    }
    if (!bufs.p.empty() || !bufs.p_row_bytes.empty()) {
        if (bufs.p.size() != n_present || bufs.p_row_bytes.size() != n_present) {
            throw std::invalid_argument("rs_buffers: p and its row sizes must be empty or have one entry per present layer");
        }
        for (size_t l = 0; l < n_present; ++l) {
            if ((bufs.p[l] == nullptr) != (bufs.p_row_bytes[l] == 0)) {
                throw std::invalid_argument("rs_buffers: a P array of present layer " + std::to_string(l) +
                                            " without rows, or rows without an array");
            }
        }
    }
    bufs_ = bufs;
}

// -- mutation primitives (journaled during dry runs) --------------------------------------------

inline rs_cell & rs_memory::mut_cell(uint32_t i) {
    if (undo_active_ && cell_epoch_[i] != undo_epoch_) {
        cell_epoch_[i] = undo_epoch_;
        const rs_cell & c = cells_[i];
        cell_log_.push_back({ i, c.pos, c.src, c.src0 });
    }
    return cells_[i];
}

inline std::vector<int32_t> & rs_memory::mut_ids(uint32_t i) {
    if (undo_active_ && ids_epoch_[i] != undo_epoch_) {
        ids_epoch_[i] = undo_epoch_;
        if (ids_log_n_ == ids_log_.size()) {
            ids_log_.push_back({ i, cells_[i].ids });
        } else {
            ids_log_[ids_log_n_].idx = i;
            ids_log_[ids_log_n_].ids = cells_[i].ids;  // reuses the saved vector's capacity
        }
        ++ids_log_n_;
    }
    return cells_[i].ids;
}

inline void rs_memory::set_tail(uint32_t seq, int32_t cell) {
    if (tails_[seq] == cell) {
        return;
    }
    if (undo_active_ && tail_epoch_[seq] != undo_epoch_) {
        tail_epoch_[seq] = undo_epoch_;
        tail_log_.push_back({ seq, tails_[seq] });
    }
    tails_[seq] = cell;
}

inline void rs_memory::set_src(uint32_t i, int32_t src) {
    rs_cell & c = mut_cell(i);
    if (c.src >= 0) {
        --src_refs_[uint32_t(c.src)];
    }
    c.src = src;
    if (src >= 0) {
        ++src_refs_[uint32_t(src)];
    }
}

void rs_memory::add_id(uint32_t i, int32_t seq) {
    if (cells_[i].has(seq)) {
        return;
    }
    std::vector<int32_t> & ids = mut_ids(i);
    if (ids.empty()) {
        ++n_nonempty_;
    }
    ids.insert(std::lower_bound(ids.begin(), ids.end(), seq), seq);
}

void rs_memory::erase_id(uint32_t i, int32_t seq) {
    if (!cells_[i].has(seq)) {
        return;
    }
    std::vector<int32_t> & ids = mut_ids(i);
    ids.erase(std::lower_bound(ids.begin(), ids.end(), seq));
    if (ids.empty()) {
        --n_nonempty_;
    }
}

void rs_memory::set_ids(uint32_t i, const int32_t * ids, uint32_t n_ids) {
    const std::vector<int32_t> & cur = cells_[i].ids;
    if (n_ids == 1 && cur.size() == 1 && cur[0] == ids[0]) {
        return;  // the usual case: a sequence continuing in its own cell
    }
    std::vector<int32_t> & dst = mut_ids(i);
    const bool was_empty = dst.empty();
    dst.assign(ids, ids + n_ids);
    std::sort(dst.begin(), dst.end());
    dst.erase(std::unique(dst.begin(), dst.end()), dst.end());
    if (was_empty && !dst.empty()) {
        ++n_nonempty_;
    } else if (!was_empty && dst.empty()) {
        --n_nonempty_;
    }
}

void rs_memory::empty_cell(uint32_t i) {
    if (!cells_[i].ids.empty()) {
        mut_ids(i).clear();
        --n_nonempty_;
    }
}

// Exchange the contents of two cells. The tails that pointed at one now point at the other;
// those are exactly the ids each cell holds (llama.cpp rewrites every tail, O(size)).
void rs_memory::swap_cells(uint32_t a, uint32_t b) {
    rs_cell & ca = mut_cell(a);
    rs_cell & cb = mut_cell(b);
    std::swap(ca.pos, cb.pos);
    std::swap(ca.src, cb.src);  // the multiset of src values, hence src_refs_, is unchanged
    std::swap(mut_ids(a), mut_ids(b));
    for (int32_t x : ca.ids) {
        set_tail(uint32_t(x), int32_t(a));
    }
    for (int32_t x : cb.ids) {
        set_tail(uint32_t(x), int32_t(b));
    }
}

// First cell without ids at or after `from`, wrapping; `from` itself if none is empty.
uint32_t rs_memory::next_empty_cell(uint32_t from) const {
    uint32_t i = from;
    for (uint32_t k = 0; k < size_; ++k) {
        if (cells_[i].empty()) {
            return i;
        }
        i = (i + 1 == size_) ? 0 : i + 1;
    }
    return from;
}

void rs_memory::begin_undo() {
    undo_active_ = true;
    ++undo_epoch_;
    cell_log_.clear();
    ids_log_n_ = 0;
    tail_log_.clear();
    saved_head_ = head_;
    saved_used_ = used_;
}

void rs_memory::undo() {
    for (const cell_undo & u : cell_log_) {
        rs_cell & c = cells_[u.idx];
        if (c.src >= 0) {
            --src_refs_[uint32_t(c.src)];
        }
        c.pos  = u.pos;
        c.src  = u.src;
        c.src0 = u.src0;
        if (c.src >= 0) {
            ++src_refs_[uint32_t(c.src)];
        }
    }
    for (size_t k = 0; k < ids_log_n_; ++k) {
        std::vector<int32_t> & ids = cells_[ids_log_[k].idx].ids;
        const bool was_empty = ids.empty();
        ids = ids_log_[k].ids;
        if (was_empty != ids.empty()) {
            n_nonempty_ = ids.empty() ? n_nonempty_ - 1 : n_nonempty_ + 1;
        }
    }
    for (const tail_undo & u : tail_log_) {
        tails_[u.seq] = u.saved;
    }
    head_ = saved_head_;
    used_ = saved_used_;
    undo_active_ = false;
}

void rs_memory::reset_cells() {
    for (rs_cell & c : cells_) {
        c.pos = -1;
        c.src = -1;
        c.ids.clear();
    }
    std::fill(tails_.begin(), tails_.end(), -1);
    std::fill(src_refs_.begin(), src_refs_.end(), 0u);
    n_nonempty_ = 0;
    head_ = 0;
    used_ = 0;
}

// -- sequences ----------------------------------------------------------------------------------

void rs_memory::clear(bool data) {
    reset_cells();
    if (data) {
        zero_buffers();
    }
    std::fill(rs_idx_.begin(), rs_idx_.end(), 0u);
}

bool rs_memory::seq_rm(int32_t seq, int32_t p0, int32_t p1) {
    const pos_range r = pos_range::normalise(p0, p1);
    // llama.cpp checks the id as unsigned, so seq = -1 ("all sequences") is refused too
    if (uint32_t(seq) >= uint32_t(n_seq_max_)) {
        return false;
    }
    if (r.is_everything()) {
        rs_idx_[uint32_t(seq)] = 0;
    }
    if (uint32_t(seq) >= size_) {
        return false;
    }
    const int32_t t = tails_[uint32_t(seq)];
    if (t < 0) {
        return true;
    }
    const uint32_t ti = uint32_t(t);
    const int32_t  pos = cells_[ti].pos;
    if (r.p0 > 0 && r.contains(pos)) {
        // a cut into the end of the sequence: only possible as a rollback
        if (b11549_rules_) {
            if (cells_[ti].ids.size() > 1) {
                return false;  // the other sequences of the cell would move back too
            }
            if (no_layers_) {
                mut_cell(ti).pos = r.p0 - 1;  // no state to restore: only the position moves
                return true;
            }
        }
        const int64_t n_back = int64_t(pos) - r.p0 + 1;
        if (rs_idx_[uint32_t(seq)] == 0 && n_back >= 1 && n_back <= int64_t(n_rs_seq_)) {
            rs_idx_[uint32_t(seq)] = uint32_t(n_back);
            mut_cell(ti).pos = r.p0 - 1;
            return true;
        }
        return false;
    }
    if (r.contains(pos)) {
        set_tail(uint32_t(seq), -1);
        erase_id(ti, seq);
        if (cells_[ti].empty()) {
            --used_;
            mut_cell(ti).pos = -1;
            set_src(ti, -1);
            if (ti < head_) {
                head_ = ti;
            }
        }
    }
    return true;
}

void rs_memory::seq_cp(int32_t seq_src, int32_t seq_dst, int32_t /*p0*/, int32_t /*p1*/) {
    if (seq_src == seq_dst || uint32_t(seq_src) >= size_ || uint32_t(seq_dst) >= size_) {
        return;
    }
    const int32_t td = tails_[uint32_t(seq_dst)];
    if (td >= 0) {
        erase_id(uint32_t(td), seq_dst);
        set_tail(uint32_t(seq_dst), -1);
        if (cells_[uint32_t(td)].empty()) {
            mut_cell(uint32_t(td)).pos = -1;
            set_src(uint32_t(td), -1);
            --used_;
        }
    }
    const int32_t ts = tails_[uint32_t(seq_src)];
    if (ts >= 0) {
        add_id(uint32_t(ts), seq_dst);
        set_tail(uint32_t(seq_dst), ts);
    }
}

void rs_memory::seq_keep(int32_t seq) {
    uint32_t new_head = size_;
    for (uint32_t i = 0; i < size_; ++i) {
        if (int64_t(i) != int64_t(seq)) {
            set_tail(i, -1);
        }
        if (!cells_[i].has(seq)) {
            if (cells_[i].pos >= 0) {
                --used_;
            }
            mut_cell(i).pos = -1;
            set_src(i, -1);
            empty_cell(i);
            if (new_head == size_) {
                new_head = i;
            }
        } else if (cells_[i].ids.size() != 1) {
            set_ids(i, &seq, 1);
        }
    }
    if (new_head != size_ && new_head < head_) {
        head_ = new_head;
    }
}

int32_t rs_memory::shift_target(int32_t seq, int32_t p0, int32_t p1) const {
    const pos_range r = pos_range::normalise(p0, p1);
    if (r.p0 == r.p1 || uint32_t(seq) >= size_) {
        return -1;
    }
    const int32_t t = tails_[uint32_t(seq)];
    if (t < 0 || !cells_[uint32_t(t)].has(seq) || !r.contains(cells_[uint32_t(t)].pos)) {
        return -1;
    }
    return t;
}

void rs_memory::check_seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t shift) const {
    const int32_t t = shift == 0 ? -1 : shift_target(seq, p0, p1);
    if (t < 0) {
        return;
    }
    const int64_t moved = int64_t(cells_[uint32_t(t)].pos) + shift;
    if (moved > INT32_LIMIT || moved < std::numeric_limits<int32_t>::min()) {
        throw std::invalid_argument("seq_add: shift " + std::to_string(shift) + " moves position " +
                                    std::to_string(cells_[uint32_t(t)].pos) + " outside int32 (overflows int32)");
    }
}

void rs_memory::seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t shift) {
    check_seq_add(seq, p0, p1, shift);
    const int32_t t = shift == 0 ? -1 : shift_target(seq, p0, p1);
    if (t < 0) {
        return;
    }
    mut_cell(uint32_t(t)).pos = int32_t(int64_t(cells_[uint32_t(t)].pos) + shift);
}

void rs_memory::check_seq_div(int32_t seq, int32_t p0, int32_t p1, int32_t d) const {
    if (d == 0) {
        throw std::invalid_argument("seq_div: d must not be 0");
    }
    const int32_t t = d == 1 ? -1 : shift_target(seq, p0, p1);
    if (t >= 0 && d == -1 && cells_[uint32_t(t)].pos == std::numeric_limits<int32_t>::min()) {
        throw std::invalid_argument("seq_div: dividing position " + std::to_string(cells_[uint32_t(t)].pos) +
                                    " by -1 overflows int32");
    }
}

void rs_memory::seq_div(int32_t seq, int32_t p0, int32_t p1, int32_t d) {
    check_seq_div(seq, p0, p1, d);
    const int32_t t = d == 1 ? -1 : shift_target(seq, p0, p1);
    if (t < 0) {
        return;
    }
    mut_cell(uint32_t(t)).pos = cells_[uint32_t(t)].pos / d;
}

int32_t rs_memory::tail(int32_t seq) const {
    return uint32_t(seq) < size_ ? tails_[uint32_t(seq)] : -1;
}

// A sequence lives in at most one cell, its tail (ids >= size never enter a cell).
int32_t rs_memory::seq_pos_min(int32_t seq) const {
    const int32_t t = tail(seq);
    return t >= 0 ? cells_[uint32_t(t)].pos : -1;
}

// llama.cpp starts the maximum at -1, so a position moved below 0 by seq_add reports -1 here
// while seq_pos_min reports it (observed: oracle recording rec_seq_ops, steps 18-20).
int32_t rs_memory::seq_pos_max(int32_t seq) const {
    return std::max(seq_pos_min(seq), -1);
}

// -- micro-batches ------------------------------------------------------------------------------

bool rs_memory::find_slot(const ubatch & ub) {
    if (!ub.equal_seqs) {
        throw std::invalid_argument("find_slot: the recurrent memory needs an equal-split ubatch");
    }
    const uint32_t n_seqs = ub.n_seqs;
    const uint32_t n_seq_tokens = ub.n_seq_tokens;
    if (n_seqs == 0 || n_seq_tokens == 0 || !ub.data) {
        throw std::invalid_argument("find_slot: empty ubatch");
    }

    // a head far beyond the used cells restarts the search from the front
    if (uint64_t(head_) > uint64_t(used_) + 2ull * n_seqs) {
        head_ = 0;
    }

    // A token carrying several ids gives all of them one state. A secondary id whose state lives
    // in another cell than the primary's would have that state thrown away (llama.cpp does so
    // silently): refuse the placement instead. Checked before anything moves, so apply() after a
    // successful prepare() can never hit it. The sets of one ubatch have disjoint ids.
    for (uint32_t s = 0; s < n_seqs; ++s) {
        const uint32_t  e   = s * n_seq_tokens;
        const int32_t * ids = ub.seq_ids(e);
        const int32_t   nid = ub.n_seq_id(e);
        if (nid < 2 || uint32_t(ids[0]) >= size_) {
            continue;
        }
        const int32_t primary_tail = tails_[uint32_t(ids[0])];
        for (int32_t j = 1; j < nid; ++j) {
            if (uint32_t(ids[j]) >= size_) {
                continue;  // refused below with the other bad ids
            }
            const int32_t t = tails_[uint32_t(ids[j])];
            if (t >= 0 && t != primary_tail) {
                return false;
            }
        }
    }

    // every id must address a tail; secondary ids leave the cells they shared
    for (uint32_t s = 0; s < n_seqs; ++s) {
        const uint32_t  e   = s * n_seq_tokens;
        const int32_t * ids = ub.seq_ids(e);
        const int32_t   nid = ub.n_seq_id(e);
        if (nid < 1) {
            throw std::invalid_argument("find_slot: sequence set " + std::to_string(s) + " has no sequence id");
        }
        for (int32_t j = 0; j < nid; ++j) {
            const int32_t x = ids[j];
            if (uint32_t(x) >= size_) {
                return false;
            }
            const int32_t t = tails_[uint32_t(x)];
            if (j > 0 && t >= 0) {
                erase_id(uint32_t(t), x);
                set_tail(uint32_t(x), -1);
                if (cells_[uint32_t(t)].empty()) {
                    mut_cell(uint32_t(t)).pos = -1;
                    set_src(uint32_t(t), -1);
                    --used_;
                }
            }
        }
    }

    // every set gets a cell of its own; a shared cell is left by the sequence being decoded.
    // The free cell is looked up only when a set first needs one: owned sets change no cell's
    // emptiness, so the lookup gives what llama.cpp's eager search from head gives.
    constexpr uint32_t NOT_SEARCHED = UINT32_MAX;
    uint32_t empty = NOT_SEARCHED;
    bool     advance = false;
    uint32_t lo = size_ - 1;
    uint32_t hi = 0;
    for (uint32_t s = 0; s < n_seqs; ++s) {
        const int32_t q = ub.seq_ids(s * n_seq_tokens)[0];
        const int32_t t = tails_[uint32_t(q)];
        bool owned = false;
        if (t >= 0) {
            if (!cells_[uint32_t(t)].has(q)) {
                throw error("rs_memory: internal error, sequence " + std::to_string(q) + " is not in its tail cell");
            }
            owned = cells_[uint32_t(t)].ids.size() == 1;
        }
        if (!owned) {
            if (empty == NOT_SEARCHED) {
                empty = next_empty_cell(head_);
            } else if (advance) {
                empty = next_empty_cell(empty + 1 == size_ ? 0 : empty + 1);
            }
            advance = false;
            if (!cells_[empty].empty()) {
                throw error("rs_memory: internal error, no free cell for sequence " + std::to_string(q));
            }
            if (t >= 0) {
                rs_cell & fresh = mut_cell(empty);
                fresh.pos = cells_[uint32_t(t)].pos;
                set_src(empty, cells_[uint32_t(t)].src);
                erase_id(uint32_t(t), q);
            }
            // llama.cpp leaves a never-seen sequence out of its new cell until the ids are
            // written below; adding it now keeps "tail(s) == c <=> s in c.ids", which the
            // O(ids) tail update of swap_cells relies on (no other decision depends on it)
            add_id(empty, q);
            set_tail(uint32_t(q), int32_t(empty));
            advance = true;  // llama.cpp moves on to the next free cell here
        }
        const uint32_t c = uint32_t(tails_[uint32_t(q)]);
        lo = std::min(lo, c);
        hi = std::max(hi, c);
    }

    // make the slot contiguous: set s goes to cell lo + s
    for (uint32_t s = 0; s < n_seqs; ++s) {
        const int32_t  q   = ub.seq_ids(s * n_seq_tokens)[0];
        const uint32_t dst = lo + s;
        const uint32_t cur = uint32_t(tails_[uint32_t(q)]);
        if (dst != cur) {
            swap_cells(dst, cur);
        }
    }

    // record the positions reached and the full id sets
    for (uint32_t s = 0; s < n_seqs; ++s) {
        const uint32_t e = s * n_seq_tokens;
        const uint32_t c = lo + s;
        mut_cell(c).pos = ub.pos(e + n_seq_tokens - 1);
        const int32_t * ids = ub.seq_ids(e);
        const int32_t   nid = ub.n_seq_id(e);
        set_ids(c, ids, uint32_t(nid));
        for (int32_t j = 0; j < nid; ++j) {
            set_tail(uint32_t(ids[j]), int32_t(c));
        }
    }

    // the first row of the slot that no cell reads from becomes the zero state
    rs_z_ = -1;
    for (uint32_t k = lo; k <= hi; ++k) {
        if (src_refs_[k] == 0) {
            rs_z_ = int32_t(k);
            break;
        }
    }
    for (uint32_t k = lo; k <= hi; ++k) {
        const int32_t src = cells_[k].src;
        if (src < 0 && rs_z_ < 0) {
            throw error("rs_memory: internal error, a fresh cell has no zero row to start from");
        }
        mut_cell(k).src0 = src < 0 ? rs_z_ : src;
        set_src(k, int32_t(k));
    }

    head_ = lo;
    n_    = hi - lo + 1;
    used_ = n_nonempty_;
    return n_ >= n_seqs;
}

bool rs_memory::prepare(const std::vector<ubatch> & ubs) {
    begin_undo();
    bool ok = true;
    try {
        for (const ubatch & ub : ubs) {
            if (!find_slot(ub)) {
                ok = false;
                break;
            }
        }
    } catch (...) {
        undo();
        throw;
    }
    undo();
    return ok;
}

std::unique_ptr<rs_context> rs_memory::init_batch(batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    const uint32_t keep_tail = n_rs_seq_ > 0 ? n_rs_seq_ + 1 : 0;
    std::vector<ubatch> ubs;
    balloc.split_reset();
    while (true) {
        ubatch ub = embd_all ? balloc.split_seq(n_ubatch) : balloc.split_equal(n_ubatch, true, keep_tail);
        if (ub.empty()) {
            break;
        }
        ubs.push_back(std::move(ub));
    }
    if (balloc.n_used() < balloc.n_tokens() || !prepare(ubs)) {
        return std::make_unique<rs_context>(this, memory_status::FAILED_PREPARE);
    }
    return std::make_unique<rs_context>(this, std::move(ubs));
}

std::unique_ptr<rs_context> rs_memory::init_full() {
    return std::make_unique<rs_context>(this, memory_status::SUCCESS);
}

std::unique_ptr<rs_context> rs_memory::init_update() {
    return std::make_unique<rs_context>(this, memory_status::NO_UPDATE);
}

int32_t rs_memory::s_copy(uint32_t head_base, uint32_t k) {
    const uint64_t i = uint64_t(head_base) + k;
    if (i >= size_) {
        throw std::out_of_range("s_copy: cell " + std::to_string(i) + " is beyond the memory size " +
                                std::to_string(size_));
    }
    const rs_cell & c = cells_[size_t(i)];
    if (n_rs_seq_ == 0) {
        return c.src0;
    }
    uint32_t plane = 0;
    if (!c.empty()) {
        const int32_t q = c.ids.front();
        if (q >= 0 && q < n_seq_max_) {
            plane = rs_idx_[uint32_t(q)];
            rs_idx_[uint32_t(q)] = 0;  // reading the snapshot consumes the pending rollback
        }
    }
    return int32_t(int64_t(plane) * size_ + c.src0);
}

// -- state bytes --------------------------------------------------------------------------------

uint32_t rs_memory::source_row(uint32_t i, uint32_t plane) const {
    const int32_t src = cells_[i].src;
    return plane * size_ + (src >= 0 ? uint32_t(src) : i);
}

// Plane holding the logical current state of cell i: a pending rollback is saved as the
// snapshot it selects. Whole-memory writes need all sharers of a cell to agree.
uint32_t rs_memory::write_plane(int32_t seq, uint32_t i) const {
    if (n_rs_seq_ == 0) {
        return 0;
    }
    if (seq >= 0) {
        return rs_idx_[uint32_t(seq)];
    }
    // ids >= n_seq_max (possible through seq_cp when size > n_seq_max) never have a rollback
    const std::vector<int32_t> & ids = cells_[i].ids;
    auto plane_of = [&](int32_t x) { return x < n_seq_max_ ? rs_idx_[uint32_t(x)] : 0u; };
    const uint32_t plane = plane_of(ids.front());
    for (int32_t x : ids) {
        if (plane_of(x) != plane) {
            throw error("state_write: sequences " + std::to_string(ids.front()) + " and " + std::to_string(x) +
                        " share cell " + std::to_string(i) + " but have different pending rollbacks");
        }
    }
    return plane;
}

size_t rs_memory::state_write_size(int32_t seq, uint32_t flags) const {
    if (seq < -1 || seq >= n_seq_max_) {
        throw std::invalid_argument("seq_id must be -1 or in [0, " + std::to_string(n_seq_max_) + "), got " +
                                    std::to_string(seq));
    }
    if (flags & ~(RS_STATE_PARTIAL_ONLY | RS_STATE_ON_DEVICE)) {
        throw std::invalid_argument("unknown state flags " + std::to_string(flags));
    }
    uint64_t n_cells = 0;
    uint64_t meta = 4;
    int64_t first = -1;
    int64_t last = -1;
    bool contiguous = true;
    auto select = [&](uint32_t i, uint64_t n_ids) {
        write_plane(seq, i);  // throws where llama.cpp aborts
        if (last >= 0 && int64_t(i) != last + 1) {
            contiguous = false;
        }
        if (first < 0) {
            first = i;
        }
        last = i;
        ++n_cells;
        meta += 8 + 4 * n_ids;
    };
    if (seq == -1) {
        for (uint32_t i = 0; i < size_; ++i) {
            if (!cells_[i].empty()) {
                select(i, cells_[i].ids.size());
            }
        }
    } else if (tail(seq) >= 0) {
        select(uint32_t(tail(seq)), 0);
    }
    if ((flags & RS_STATE_ON_DEVICE) && !contiguous) {
        throw error("state_write: ON_DEVICE needs the written cells to be contiguous");
    }
    uint64_t data = 8;
    for (size_t l = 0; l < bufs_.r.size(); ++l) {
        data += 12 + n_cells * bufs_.r_row_bytes[l];
        data += 12 + n_cells * bufs_.s_row_bytes[l];
        if (bufs_.p_bytes(l) != 0) {
            data += 8 + n_cells * bufs_.p_bytes(l);  // row size, rows (the type is R's)
        }
    }
    return size_t(meta + data);
}

void rs_memory::state_write(uint8_t * out, size_t n_out, int32_t seq, uint32_t flags) const {
    if (n_out != state_write_size(seq, flags)) {
        throw std::invalid_argument("state_write: the output must hold exactly state_write_size() bytes");
    }
    byte_writer w(out, n_out);
    // the selected cells, ascending: the sequence's tail, or every non-empty cell
    const int32_t single = seq >= 0 ? tail(seq) : -1;
    auto for_each_selected = [&](auto && fn) {
        if (seq == -1) {
            for (uint32_t i = 0; i < size_; ++i) {
                if (!cells_[i].empty()) {
                    fn(i);
                }
            }
        } else if (single >= 0) {
            fn(uint32_t(single));
        }
    };

    uint32_t n_cells = 0;
    for_each_selected([&](uint32_t) { ++n_cells; });
    w.write<uint32_t>(n_cells);
    for_each_selected([&](uint32_t i) {
        w.write<int32_t>(cells_[i].pos);
        if (seq == -1) {
            w.write<uint32_t>(uint32_t(cells_[i].ids.size()));
            for (int32_t x : cells_[i].ids) {
                w.write<int32_t>(x);
            }
        } else {
            w.write<uint32_t>(0);
        }
    });

    w.write<uint32_t>(0);  // s_trans
    w.write<uint32_t>(bufs_.n_layer_total);
    state_hole_log * log = active_state_hole_log();
    auto write_rows = [&](const uint8_t * base, uint64_t row_bytes, size_t l, hole_kind kind) {
        if (base == nullptr && row_bytes != 0) {
            // a buffer-less memory: zeros here, and with a log open, the rows the storage fills
            const uint8_t * at = w.zeros(size_t(n_cells * row_bytes));
            if (log != nullptr) {
                const size_t first = log->cells.size();
                for_each_selected([&](uint32_t i) { log->cells.push_back(uint32_t(source_row(i, write_plane(seq, i)))); });
                log->holes.push_back({ this, at, size_t(n_cells * row_bytes), uint32_t(l), kind, 0, 0, 0, first,
                                       size_t(n_cells) });
            }
            return;
        }
        for_each_selected([&](uint32_t i) {
            const uint64_t row = source_row(i, write_plane(seq, i));
            w.put(base + row * row_bytes, size_t(row_bytes));
        });
    };
    for (size_t l = 0; l < bufs_.r.size(); ++l) {
        w.write<int32_t>(bufs_.type_r);
        w.write<uint64_t>(bufs_.r_row_bytes[l]);
        write_rows(bufs_.r[l], bufs_.r_row_bytes[l], l, hole_kind::R_ROWS);
        // llama.cpp writes a layer's P rows (row size, then the rows) right after its R rows
        if (bufs_.p_bytes(l) != 0) {
            w.write<uint64_t>(bufs_.p_bytes(l));
            write_rows(bufs_.p[l], bufs_.p_bytes(l), l, hole_kind::P_ROWS);
        }
    }
    for (size_t l = 0; l < bufs_.s.size(); ++l) {
        w.write<int32_t>(bufs_.type_s);
        w.write<uint64_t>(bufs_.s_row_bytes[l]);
        write_rows(bufs_.s[l], bufs_.s_row_bytes[l], l, hole_kind::S_ROWS);
    }
}

// Check a block completely, without touching the memory: every reason llama.cpp has to refuse
// it (and the places where it would abort or corrupt itself) becomes a state_error here.
void rs_memory::parse_state(const uint8_t * data, size_t n_data, int32_t seq, parsed_state & ps) const {
    byte_reader rd(data, n_data);
    ps.cell_count = rd.read<uint32_t>("cell count");
    if (ps.cell_count > size_) {
        throw state_error("the state has " + std::to_string(ps.cell_count) + " cells, more than the memory size " +
                          std::to_string(size_), state_reject::CONFIG_MISMATCH);
    }
    // each cell takes at least 8 bytes (position, id count): refuse a count the bytes cannot
    // hold before sizing anything by it
    if (ps.cell_count > rd.remaining() / 8) {
        throw state_error("truncated state: it claims " + std::to_string(ps.cell_count) + " cells, the " +
                          std::to_string(rd.remaining()) + " bytes left hold at most " +
                          std::to_string(rd.remaining() / 8));
    }
    if (seq >= 0 && ps.cell_count > 1) {
        throw state_error("a single-sequence state must hold at most one cell, this one has " +
                          std::to_string(ps.cell_count));
    }
    ps.pos.resize(ps.cell_count);
    ps.id_off.assign(1, 0);
    ps.ids.clear();
    std::vector<char> seen(seq == -1 ? size_t(n_seq_max_) : 0, 0);
    for (uint32_t i = 0; i < ps.cell_count; ++i) {
        ps.pos[i] = rd.read<int32_t>("cell metadata");
        const uint32_t n_ids = rd.read<uint32_t>("cell metadata");
        if (seq >= 0) {
            if (n_ids != 0) {
                throw state_error("cell " + std::to_string(i) + " lists " + std::to_string(n_ids) +
                                  " sequence ids: this is not a single-sequence state");
            }
        } else {
            if (n_ids > rd.remaining() / 4) {
                throw state_error("truncated state: it ends inside the ids of cell " + std::to_string(i));
            }
            for (uint32_t j = 0; j < n_ids; ++j) {
                const int32_t x = rd.read<int32_t>("cell metadata");
                if (x < 0 || x >= n_seq_max_) {
                    throw state_error("cell " + std::to_string(i) + " holds sequence id " + std::to_string(x) +
                                      ", outside [0, " + std::to_string(n_seq_max_) + ")", state_reject::CONFIG_MISMATCH);
                }
                if (uint32_t(x) >= size_) {
                    throw state_error("cell " + std::to_string(i) + " holds sequence id " + std::to_string(x) +
                                      ", which needs a memory of more than " + std::to_string(size_) + " cells", state_reject::CONFIG_MISMATCH);
                }
                if (seen[size_t(x)]) {
                    throw state_error("sequence id " + std::to_string(x) + " appears twice in the state");
                }
                seen[size_t(x)] = 1;
                ps.ids.push_back(x);
            }
        }
        ps.id_off.push_back(uint32_t(ps.ids.size()));
    }

    const uint32_t s_trans = rd.read<uint32_t>("data header");
    const uint32_t n_layer = rd.read<uint32_t>("data header");
    if (n_layer != bufs_.n_layer_total) {
        throw state_error("the state has " + std::to_string(n_layer) + " layers, the memory has " +
                          std::to_string(bufs_.n_layer_total), state_reject::CONFIG_MISMATCH);
    }
    if (s_trans != 0) {
        throw state_error("transposed recurrent states (s_trans " + std::to_string(s_trans) + ") are not supported", state_reject::CONFIG_MISMATCH);
    }
    auto check_layer = [&](const char * kind, size_t l, int32_t own_type, uint64_t own_row) {
        const int32_t  type = rd.read<int32_t>("layer header");
        const uint64_t row  = rd.read<uint64_t>("layer header");
        if (type != own_type) {
            throw state_error(std::string(kind) + " of present layer " + std::to_string(l) + " has type " +
                              std::to_string(type) + ", the memory uses " + std::to_string(own_type), state_reject::CONFIG_MISMATCH);
        }
        if (row != own_row) {
            throw state_error(std::string(kind) + " of present layer " + std::to_string(l) + " has rows of " +
                              std::to_string(row) + " bytes, the memory's are " + std::to_string(own_row), state_reject::CONFIG_MISMATCH);
        }
        return rd.skip_rows(ps.cell_count, row, kind);
    };
    ps.r_rows.resize(bufs_.r.size());
    ps.s_rows.resize(bufs_.s.size());
    ps.p_rows.assign(bufs_.r.size(), 0);
    for (size_t l = 0; l < bufs_.r.size(); ++l) {
        ps.r_rows[l] = check_layer("r", l, bufs_.type_r, bufs_.r_row_bytes[l]);
        const uint64_t own_p = bufs_.p_bytes(l);
        if (own_p != 0) {
            const uint64_t row = rd.read<uint64_t>("p header");
            if (row != own_p) {
                throw state_error("p (conv history) of present layer " + std::to_string(l) + " has rows of " +
                                  std::to_string(row) + " bytes, the memory's are " + std::to_string(own_p),
                                  state_reject::CONFIG_MISMATCH);
            }
            ps.p_rows[l] = rd.skip_rows(ps.cell_count, row, "p");
        }
    }
    for (size_t l = 0; l < bufs_.s.size(); ++l) {
        ps.s_rows[l] = check_layer("s", l, bufs_.type_s, bufs_.s_row_bytes[l]);
    }
    ps.consumed = rd.offset();
}

size_t rs_memory::state_read(const uint8_t * data, size_t n_data, int32_t seq, uint32_t flags, bool whole_buffer) {
    if (seq < -1 || seq >= n_seq_max_) {
        throw std::invalid_argument("seq_id must be -1 or in [0, " + std::to_string(n_seq_max_) + "), got " +
                                    std::to_string(seq));
    }
    if (flags & ~(RS_STATE_PARTIAL_ONLY | RS_STATE_ON_DEVICE)) {
        throw std::invalid_argument("unknown state flags " + std::to_string(flags));
    }
    if (data == nullptr && n_data != 0) {
        throw std::invalid_argument("state_read: no data");
    }
    parsed_state ps;
    parse_state(data, n_data, seq, ps);
    if (whole_buffer && ps.consumed != n_data) {
        throw state_error(std::to_string(n_data - ps.consumed) + " bytes follow the recurrent state block");
    }

    uint32_t first = 0;  // cell receiving the first row
    if (seq == -1) {
        clear(true);
        for (uint32_t i = 0; i < ps.cell_count; ++i) {
            mut_cell(i).pos = ps.pos[i];
            for (uint32_t j = ps.id_off[i]; j < ps.id_off[i + 1]; ++j) {
                add_id(i, ps.ids[j]);
                set_tail(uint32_t(ps.ids[j]), int32_t(i));
            }
            set_src(i, int32_t(i));
        }
        head_ = 0;
        used_ = ps.cell_count;  // llama.cpp counts cells restored without ids as used
    } else {
        const uint32_t saved_rs_idx = rs_idx_[uint32_t(seq)];
        const uint32_t saved_n = n_;
        const int32_t  saved_rs_z = rs_z_;
        begin_undo();
        seq_rm(seq, -1, -1);
        if (ps.cell_count > 0) {
            ubatch_data & d = *read_ubatch_;
            d.pos.assign(1, ps.pos[0]);
            d.seq_id_off.assign({ 0, 1 });
            d.seq_id.assign(1, seq);
            ubatch ub;
            ub.equal_seqs = true;
            ub.n_tokens = ub.n_seq_tokens = 1;
            ub.n_seqs = ub.n_seqs_unq = 1;
            ub.data = read_ubatch_;
            auto roll_back = [&] {
                undo();
                rs_idx_[uint32_t(seq)] = saved_rs_idx;
                n_ = saved_n;
                rs_z_ = saved_rs_z;
            };
            bool placed = false;
            try {
                placed = find_slot(ub) && cells_[head_].pos == ps.pos[0] && cells_[head_].has(seq);
            } catch (...) {
                roll_back();
                throw;
            }
            if (!placed) {
                roll_back();
                throw state_error("no cell for sequence " + std::to_string(seq) + " (ids must be below mem_size " +
                                  std::to_string(size_) + ")", state_reject::NO_ROOM);
            }
            set_src(head_, int32_t(head_));
            first = head_;
        }
        undo_active_ = false;  // commit
        rs_idx_[uint32_t(seq)] = 0;
    }

    state_hole_log * log = active_state_hole_log();
    // a buffer-less memory's rows are reported (rows first.. of plane 0) for its storage to store
    const auto rows_to = [&](uint8_t * base, uint64_t rb, size_t at, size_t l, hole_kind kind) {
        if (rb == 0 || ps.cell_count == 0) {
            return;
        }
        if (base != nullptr) {
            std::memcpy(base + uint64_t(first) * rb, data + at, size_t(ps.cell_count * rb));
        } else if (log != nullptr) {
            const size_t c0 = log->cells.size();
            for (uint32_t k = 0; k < ps.cell_count; ++k) {
                log->cells.push_back(first + k);
            }
            log->holes.push_back({ this, data + at, size_t(ps.cell_count * rb), uint32_t(l), kind, 0, 0, 0, c0,
                                   size_t(ps.cell_count) });
        }
    };
    for (size_t l = 0; l < bufs_.r.size(); ++l) {
        rows_to(bufs_.r[l], bufs_.r_row_bytes[l], ps.r_rows[l], l, hole_kind::R_ROWS);
        rows_to(l < bufs_.p.size() ? bufs_.p[l] : nullptr, bufs_.p_bytes(l), l < ps.p_rows.size() ? ps.p_rows[l] : 0,
                l, hole_kind::P_ROWS);
    }
    for (size_t l = 0; l < bufs_.s.size(); ++l) {
        rows_to(bufs_.s[l], bufs_.s_row_bytes[l], ps.s_rows[l], l, hole_kind::S_ROWS);
    }
    return ps.consumed;
}

void rs_memory::zero_buffers() {
    const uint64_t rows = (uint64_t(n_rs_seq_) + 1) * size_;
    for (size_t l = 0; l < bufs_.r.size(); ++l) {
        if (bufs_.r_row_bytes[l] != 0 && bufs_.r[l] != nullptr) {
            std::memset(bufs_.r[l], 0, size_t(rows * bufs_.r_row_bytes[l]));
        }
        if (bufs_.s_row_bytes[l] != 0 && bufs_.s[l] != nullptr) {
            std::memset(bufs_.s[l], 0, size_t(rows * bufs_.s_row_bytes[l]));
        }
        if (bufs_.p_bytes(l) != 0 && bufs_.p[l] != nullptr) {
            std::memset(bufs_.p[l], 0, size_t(rows * bufs_.p_bytes(l)));
        }
    }
}

// -- context ------------------------------------------------------------------------------------

rs_context::rs_context(rs_memory * mem, memory_status status)
    : mem_(mem), status_(status), full_(status == memory_status::SUCCESS) {}

rs_context::rs_context(rs_memory * mem, std::vector<ubatch> ubs)
    : mem_(mem), status_(memory_status::SUCCESS), ubatches_(std::move(ubs)) {}

const ubatch & rs_context::get_ubatch() const {
    if (ubatches_.empty()) {
        throw error("this memory context has no micro-batch");
    }
    return ubatches_[i_];
}

void rs_context::new_ubatch() {
    copies_valid_ = false;
    std::fill(gathered_.begin(), gathered_.end(), 0);
}

bool rs_context::next() {
    if (i_ + 1 >= ubatches_.size()) {
        return false;
    }
    ++i_;
    applied_ = false;
    new_ubatch();
    return true;
}

bool rs_context::apply() {
    if (status_is_fail(status_)) {
        throw error(std::string("cannot apply a memory context whose status is ") + status_name(status_));
    }
    if (ubatches_.empty()) {
        return true;
    }
    if (applied_) {
        // applying it again would place the micro-batch twice (the state advances twice); after
        // the last one, next() returned false and the context is finished
        throw error("this micro-batch was already applied: call next() first (a finished context cannot "
                    "be applied or iterated again; plan the batch again with init_batch)");
    }
    mem_->find_slot(ubatches_[i_]);  // result ignored, as llama.cpp: prepare() already checked it
    mem_->count_placed(ubatches_[i_].n_tokens);
    applied_ = true;
    new_ubatch();
    return true;
}

uint32_t rs_context::n_rs() const { return full_ ? mem_->size() : mem_->n(); }
uint32_t rs_context::head() const { return full_ ? 0 : mem_->head(); }
int32_t  rs_context::rs_z() const { return full_ ? 0 : mem_->rs_z(); }

const std::vector<int32_t> & rs_context::s_copy_all() {
    if (status_ != memory_status::SUCCESS) {
        throw error(std::string("a context whose status is ") + status_name(status_) + " has no state copies");
    }
    if (!applied()) {
        throw error("apply() the micro-batch before reading its state copies");
    }
    if (!copies_valid_) {
        const uint32_t n = n_rs();
        const uint32_t base = head();
        copies_.resize(n);
        for (uint32_t k = 0; k < n; ++k) {
            copies_[k] = mem_->s_copy(base, k);
        }
        copies_valid_ = true;
    }
    return copies_;
}

} // namespace llmem

namespace llmem {

uint8_t * rs_context::array_base(int kind, size_t layer) const {
    const rs_buffers & b = mem_->buffers();
    if (kind < 0 || kind >= RS_KINDS || layer >= b.r.size() || (kind == 2 && b.p_bytes(layer) == 0)) {
        throw std::invalid_argument("no state array " + std::to_string(kind) + " for present layer " +
                                    std::to_string(layer));
    }
    return kind == 0 ? b.r[layer] : kind == 1 ? b.s[layer] : b.p[layer];
}

uint64_t rs_context::row_bytes(int kind, size_t layer) const {
    array_base(kind, layer);
    const rs_buffers & b = mem_->buffers();
    return kind == 0 ? b.r_row_bytes[layer] : kind == 1 ? b.s_row_bytes[layer] : b.p_bytes(layer);
}

bool rs_context::gathered(int kind, size_t layer) const {
    const size_t k = RS_KINDS * layer + size_t(kind);
    return k < gathered_.size() && gathered_[k];
}

void rs_context::gather(int kind, size_t layer, uint8_t * out) {
    uint8_t * base = array_base(kind, layer);
    const uint64_t rb = row_bytes(kind, layer);
    if (ubatches_.empty()) {
        throw error("states are gathered per micro-batch: this context has none");
    }
    const std::vector<int32_t> & copies = s_copy_all();  // throws before apply()
    gathered_.resize(RS_KINDS * mem_->buffers().r.size(), 0);
    uint8_t & done = gathered_[RS_KINDS * layer + size_t(kind)];
    if (done) {
        throw error("the input states of this array were already gathered for this micro-batch");
    }
    done = 1;
    const uint32_t n_seqs = ubatches_[i_].n_seqs;
    const uint32_t head = mem_->head();
    const size_t n_rs = copies.size();
    if (rb == 0 || base == nullptr) {  // a buffer-less memory: its storage moves the rows
        return;
    }
    if (mem_->rs_z() >= 0) {
        std::memset(base + uint64_t(mem_->rs_z()) * rb, 0, size_t(rb));
    }
    if (out != nullptr) {
        for (uint32_t s = 0; s < n_seqs; ++s) {
            std::memcpy(out + uint64_t(s) * rb, base + uint64_t(copies[s]) * rb, size_t(rb));
        }
    }
    if (n_rs > n_seqs) {
        // The slot's other cells move into place. Their rollback snapshots (planes 1..n_rs_seq)
        // move with them (deviation R15): llama.cpp moves plane 0 only, so a later rollback of a
        // moved cell reads whatever the old row holds. Sources may be destinations of other
        // moves: read them all before writing any.
        const size_t   n_extra  = n_rs - n_seqs;
        const uint64_t size     = mem_->size();
        const uint64_t n_planes = 1 + mem_->n_rs_seq();
        scratch_.resize(size_t(n_planes * n_extra * rb));
        for (size_t k = 0; k < n_extra; ++k) {
            const uint64_t row = uint64_t(copies[n_seqs + k]);
            std::memcpy(scratch_.data() + k * rb, base + row * rb, size_t(rb));
            for (uint64_t d = 1; d < n_planes; ++d) {
                std::memcpy(scratch_.data() + (d * n_extra + k) * rb, base + (d * size + row % size) * rb,
                            size_t(rb));
            }
        }
        for (uint64_t d = 0; d < n_planes; ++d) {
            std::memcpy(base + (d * size + head + n_seqs) * rb, scratch_.data() + d * n_extra * rb,
                        size_t(n_extra * rb));
        }
    }
}

void rs_context::store(int kind, size_t layer, const uint8_t * rows, uint32_t n_planes) {
    uint8_t * base = array_base(kind, layer);
    const uint64_t rb = row_bytes(kind, layer);
    if (n_planes == 0 || n_planes > mem_->n_rs_seq() + 1) {
        throw std::invalid_argument("store: n_planes must be in [1, " + std::to_string(mem_->n_rs_seq() + 1) +
                                    "], got " + std::to_string(n_planes));
    }
    if (!gathered(kind, layer)) {
        gather(kind, layer, nullptr);  // the slot's other cells move before their rows are overwritten
    }
    const uint64_t n_seqs = ubatches_[i_].n_seqs;
    const uint64_t head = mem_->head();
    if (base == nullptr || rows == nullptr) {  // a buffer-less memory: its storage writes the rows
        return;
    }
    for (uint64_t p = 0; p < n_planes; ++p) {
        std::memcpy(base + (p * mem_->size() + head) * rb, rows + p * n_seqs * rb, size_t(n_seqs * rb));
    }
}

} // namespace llmem

// -- checkpoints ----------------------------------------------------------------------------------
// The two entry points rs_checkpoints needs: where a sequence's state lies, and a fresh cell for
// a restored one. Placement goes through find_slot (as a single-sequence state_read does), so
// the cell chosen, head, used and rs_z are those llama.cpp would reach decoding one token there.

namespace llmem {

int64_t rs_memory::seq_state_row(int32_t seq) const {
    const int32_t t = tail(seq);
    if (t < 0 || seq >= n_seq_max_) {
        return -1;
    }
    return int64_t(source_row(uint32_t(t), write_plane(seq, uint32_t(t))));
}

uint32_t rs_memory::seq_place(int32_t seq, int32_t pos) {
    if (seq < 0 || seq >= n_seq_max_ || uint32_t(seq) >= size_) {
        throw std::invalid_argument("seq_id " + std::to_string(seq) + " cannot hold a state: it must be in [0, " +
                                    std::to_string(std::min<int64_t>(size_, n_seq_max_)) + ")");
    }
    if (tails_[uint32_t(seq)] >= 0) {
        throw std::invalid_argument("sequence " + std::to_string(seq) + " already holds a state (position " +
                                    std::to_string(cells_[uint32_t(tails_[uint32_t(seq)])].pos) +
                                    "): remove it first");
    }
    ubatch_data & d = *read_ubatch_;
    d.pos.assign(1, pos);
    d.seq_id_off.assign({ 0, 1 });
    d.seq_id.assign(1, seq);
    ubatch ub;
    ub.equal_seqs = true;
    ub.n_tokens = ub.n_seq_tokens = 1;
    ub.n_seqs = ub.n_seqs_unq = 1;
    ub.data = read_ubatch_;
    const uint32_t saved_n = n_;
    const int32_t  saved_rs_z = rs_z_;
    begin_undo();
    bool placed = false;
    try {
        placed = find_slot(ub) && cells_[head_].pos == pos && cells_[head_].has(seq);
    } catch (...) {
        undo();
        n_ = saved_n;
        rs_z_ = saved_rs_z;
        throw;
    }
    if (!placed) {
        undo();
        n_ = saved_n;
        rs_z_ = saved_rs_z;
        throw std::invalid_argument("no free cell for sequence " + std::to_string(seq));
    }
    undo_active_ = false;  // commit
    set_src(head_, int32_t(head_));
    rs_idx_[uint32_t(seq)] = 0;
    return head_;
}

} // namespace llmem
