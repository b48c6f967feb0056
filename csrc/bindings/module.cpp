#include "pybind.h"

PYBIND11_MODULE(_core, m) {
    m.doc() = "llmem's compiled core: cells, slot search, batch splitting (private; use llmem)";
    m.attr("__version__") = LLMEM_VERSION;

    llmem::bind::register_errors(m);
    llmem::bind::register_status(m);
    llmem::bind::register_batch(m);
    llmem::bind::register_kv_cache(m);
    llmem::bind::register_kv_attention(m);
    llmem::bind::register_decode_step(m);
    llmem::bind::register_recurrent(m);
    llmem::bind::register_hybrid(m);
    llmem::bind::register_state_file(m);
    llmem::bind::register_capi(m);
    llmem::bind::register_quant(m);
    llmem::bind::register_state_holes(m);
}
