#include "llmem/state_holes.h"

namespace llmem {

namespace {
// Per thread: the state writer is const and may run on several threads at once, each with its
// own log (or none).
thread_local state_hole_log * t_log = nullptr;
} // namespace

state_hole_log * active_state_hole_log() { return t_log; }

state_hole_scope::state_hole_scope(state_hole_log & log) : prev_(t_log) { t_log = &log; }

state_hole_scope::~state_hole_scope() { t_log = prev_; }

} // namespace llmem
