#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llmem {

/// What a tensor data section of the state bytes holds (state_hole::kind).
enum class hole_kind : uint32_t {
    K_ROWS  = 0,  // n_cells K rows of one cache layer, in the listed cell order
    V_ROWS  = 1,  // n_cells V rows (V not transposed)
    V_TRANS = 2,  // V transposed: for each of n_cols features, the listed cells' elements
    R_ROWS  = 3,  // recurrent r rows of one present layer; the cells are absolute rows of its array
    S_ROWS  = 4,  // recurrent s rows, likewise
    P_ROWS  = 5,  // recurrent P rows (the PLE conv history) of a layer that has them, likewise
};

/// A tensor data section of state bytes that a memory without buffers (bookkeeping-only, or
/// storage on a device) cannot fill or consume itself: the storage that holds the tensors moves
/// those bytes. Writing: the section at `at` is left zero and must be filled with the rows of
/// `cells` of stream `stream`. Reading: the section at `at` holds the rows for `cells` of stream
/// `stream`, already validated and placed.
struct state_hole {
    const void *    owner;        // the kv_cache or rs_memory whose tensors these are
    const uint8_t * at;           // the section's first byte in the caller's output or input
    size_t          len;          // its bytes
    uint32_t        layer;        // cache layer
    hole_kind       kind;
    uint32_t        stream;       // stream of the rows (writing: after pending stream copies)
    uint32_t        cell_stream;  // stream whose cell metadata (pending shifts) the rows belong to
    uint32_t        n_cols;       // V_TRANS: features per cell in the section (n_embd_v of the layer)
    size_t          cells_at;     // the section's cells: cells[cells_at .. cells_at + n_cells)
    size_t          n_cells;
};

/// The holes of one state_write or state_read, collected while a state_hole_scope is open on the
/// calling thread. Memories that have their buffers move their bytes themselves and log nothing.
struct state_hole_log {
    std::vector<state_hole> holes;
    std::vector<uint32_t>   cells;
};

/// The log open on this thread, or null (then buffer-less layers write zeros and read nothing, as
/// before).
state_hole_log * active_state_hole_log();

/// Opens a log on this thread for its lifetime (scopes nest: the innermost one collects).
class state_hole_scope {
public:
    explicit state_hole_scope(state_hole_log & log);
    ~state_hole_scope();
    state_hole_scope(const state_hole_scope &)             = delete;
    state_hole_scope & operator=(const state_hole_scope &) = delete;

private:
    state_hole_log * prev_;
};

} // namespace llmem
