#include "llmem/errors.h"
#include "llmem/status.h"

namespace llmem {

bool status_is_fail(memory_status s) {
    return s == memory_status::FAILED_PREPARE || s == memory_status::FAILED_COMPUTE;
}

memory_status status_combine(memory_status a, memory_status b) {
    if (status_is_fail(a)) {
        return a;
    }
    if (status_is_fail(b)) {
        return b;
    }
    return (a == memory_status::SUCCESS || b == memory_status::SUCCESS) ? memory_status::SUCCESS
                                                                        : memory_status::NO_UPDATE;
}

const char * status_name(memory_status s) {
    switch (s) {
        case memory_status::SUCCESS:        return "SUCCESS";
        case memory_status::NO_UPDATE:      return "NO_UPDATE";
        case memory_status::FAILED_PREPARE: return "FAILED_PREPARE";
        case memory_status::FAILED_COMPUTE: return "FAILED_COMPUTE";
    }
    return "UNKNOWN";
}

const char * batch_reject_name(batch_reject r) {
    switch (r) {
        case batch_reject::EMPTY:              return "EMPTY";
        case batch_reject::SEQ_LIMIT:          return "SEQ_LIMIT";
        case batch_reject::MIXED_CONTENT:      return "MIXED_CONTENT";
        case batch_reject::NO_CONTENT:         return "NO_CONTENT";
        case batch_reject::BAD_TOKEN:          return "BAD_TOKEN";
        case batch_reject::BAD_SHAPE:          return "BAD_SHAPE";
        case batch_reject::NO_SEQ_ID:          return "NO_SEQ_ID";
        case batch_reject::BAD_SEQ_ID:         return "BAD_SEQ_ID";
        case batch_reject::POS_NOT_CONTINUING: return "POS_NOT_CONTINUING";
        case batch_reject::POS_GAP:            return "POS_GAP";
        case batch_reject::COUPLED_DIVERGED:   return "COUPLED_DIVERGED";
        case batch_reject::POS_DECREASING:     return "POS_DECREASING";
        case batch_reject::POS_OVERFLOW:       return "POS_OVERFLOW";
    }
    return "UNKNOWN";
}

const char * state_reject_name(state_reject r) {
    switch (r) {
        case state_reject::CORRUPT:         return "CORRUPT";
        case state_reject::NO_ROOM:         return "NO_ROOM";
        case state_reject::CONFIG_MISMATCH: return "CONFIG_MISMATCH";
        case state_reject::VERSION:         return "VERSION";
    }
    return "CORRUPT";
}

} // namespace llmem
