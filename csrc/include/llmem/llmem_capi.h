/* llmem's C API: drive a memory built in Python from C, C++ or Cython, without the GIL.
 *
 * The extension module llmem._core publishes one table of function pointers (struct llmem_capi)
 * as the capsule attribute llmem._core._C_API, the way numpy and scipy export theirs. Only plain
 * C types cross the boundary: no C++ ABI, no exceptions. See docs/capi.md for the rules below in
 * full.
 *
 *  - Handles. llmem_capi.memory_get(py_memory) returns an llmem_memory handle for a KVCache,
 *    KVCacheISWA, RecurrentMemory, HybridMemory or HybridISWAMemory. The PyObject passed in is
 *    borrowed for the call; the handle then owns one strong reference to that memory, so the
 *    compiled objects it points to (cells, K/V and state arrays) stay valid until memory_release.
 *    Pointers returned by the layer_* and ctx_* functions are borrowed from the handle or the
 *    context: valid until memory_release / ctx_next / ctx_free. Take handles after a memory is
 *    composed (a RecurrentMemory put into a HybridMemory changes lock).
 *  - Threads and the lock. Every function may be called without the GIL (memory_get and
 *    memory_release take it themselves). Every function takes the memory's lock (the same lock
 *    as Python's `memory.lock`, a re-entrant mutex owned by a thread), so each call is atomic;
 *    lock()/unlock() hold it around several calls. A thread that holds the GIL and must wait
 *    for the lock releases the GIL while it waits. Changes made through the C API make Python
 *    contexts planned before them stale (the next Python call on the memory records them).
 *  - Contexts. init_batch / decode_step return a context: apply() commits its current
 *    micro-batch, next() moves on, ctx_free() ends it (before memory_release). A context is
 *    refused as stale (LLMEM_ERR_STALE, nothing changed) when the memory changed through the C
 *    API after it was planned, or when any Python call took the memory's lock since (the C side
 *    cannot see what Python did): hold lock() from init_batch to the last apply when Python
 *    threads share the memory. A context is used by one thread at a time.
 *  - Errors. Every function returns LLMEM_OK (0) or a negative LLMEM_ERR_* code; nothing is
 *    thrown across the boundary. `err`/`err_len` (may be NULL/0) receive a NUL-terminated
 *    message, truncated to fit. A failed call leaves the memory exactly as it was.
 *  - Versions. `abi_version` is LLMEM_CAPI_VERSION of the build; functions are only ever
 *    appended to the table, so a consumer built against version N works with any build whose
 *    abi_version >= N (llmem_capi_import checks this).
 */
#ifndef LLMEM_CAPI_H
#define LLMEM_CAPI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLMEM_CAPI_VERSION 1
#define LLMEM_CAPI_CAPSULE "llmem._core._C_API"

/* Return codes. */
#define LLMEM_OK 0
#define LLMEM_ERR_INVALID (-1)   /* a bad argument (Python: ValueError/TypeError) */
#define LLMEM_ERR_BATCH (-2)     /* the batch allocator refused the batch (BatchError) */
#define LLMEM_ERR_STATE (-3)     /* state bytes that cannot be read (StateError) */
#define LLMEM_ERR_STALE (-4)     /* the context's plan is stale (StaleContextError) */
#define LLMEM_ERR_TOO_SMALL (-5) /* a caller buffer is too small (ValueError) */
#define LLMEM_ERR_FAILED (-6)    /* llmem refused the call (LlmemError) */
#define LLMEM_ERR_NOMEM (-7)     /* out of memory */
#define LLMEM_ERR_PYTHON (-8)    /* memory_get: not an llmem memory, or a Python error */
#define LLMEM_ERR_LOCK (-9)      /* unlock() by a thread that does not hold the lock */
#define LLMEM_ERR_INTERNAL (-10) /* anything else (a bug: please report it) */

/* Memory kinds (the numbers of llmem's state header). */
#define LLMEM_KIND_KV 1
#define LLMEM_KIND_KV_ISWA 2
#define LLMEM_KIND_RECURRENT 3
#define LLMEM_KIND_HYBRID 4
#define LLMEM_KIND_HYBRID_ISWA 5

/* Context statuses (llama.cpp's llama_memory_status). */
#define LLMEM_STATUS_SUCCESS 0
#define LLMEM_STATUS_NO_UPDATE 1
#define LLMEM_STATUS_FAILED_PREPARE 2

/* Attention parts of a context or memory: the (base) KV cache and the SWA cache of iSWA kinds. */
#define LLMEM_PART_BASE 0
#define LLMEM_PART_SWA 1

/* State flags (llama_state_seq_flags); llmem's STATE_HEADER is Python-only. */
#define LLMEM_STATE_PARTIAL_ONLY 1u

typedef struct llmem_memory llmem_memory;   /* a handle on a Python memory */
typedef struct llmem_context llmem_context; /* a plan made by init_batch or decode_step */

/* What a handle is, read once at memory_get. */
typedef struct llmem_memory_info {
    int32_t  kind;       /* LLMEM_KIND_* */
    int32_t  n_seq_max;
    uint32_t kv_size;    /* cells of the (base) KV cache; 0 for a recurrent memory */
    uint32_t swa_size;   /* cells of the SWA cache of iSWA kinds, else 0 */
    uint32_t n_stream;   /* KV streams (1: unified) */
    uint32_t rs_size;    /* recurrent cells; 0 without a recurrent part */
    uint32_t n_rs_seq;   /* rollback planes of the recurrent part */
    uint32_t n_layer;    /* model layers (the largest layer id + 1 over every part) */
} llmem_memory_info;

/* A batch in llama.cpp's array form (llama_batch), read during the call only.
 * token or embd must be given (not both); pos NULL: each sequence continues after its last
 * position; n_seq_id NULL: one id per entry (seq_id[i]); else entry i has n_seq_id[i] ids,
 * consecutive in seq_id; seq_id NULL: every entry belongs to sequence 0; output NULL: only the
 * last entry is an output. */
typedef struct llmem_batch {
    uint32_t        n_tokens;
    const int32_t * token;    /* [n_tokens] or NULL */
    const float *   embd;     /* [n_tokens * n_embd] or NULL */
    uint32_t        n_embd;
    const int32_t * pos;      /* [n_tokens] or NULL */
    const int32_t * n_seq_id; /* [n_tokens] or NULL */
    const int32_t * seq_id;   /* flat ids, or NULL */
    const int8_t *  output;   /* [n_tokens] 0/1, or NULL */
} llmem_batch;

/* The current micro-batch of a context; the arrays are borrowed from the context (valid until
 * ctx_next or ctx_free). */
typedef struct llmem_ubatch {
    uint32_t        n_tokens;
    uint32_t        n_seq_tokens;
    uint32_t        n_seqs;
    uint32_t        n_seqs_unq;
    int32_t         equal_seqs;
    const int32_t * token;      /* [n_tokens] or NULL for embeddings */
    const int32_t * pos;        /* [n_tokens] (section 0) */
    const int32_t * seq_id;     /* [n_tokens]: each entry's primary id */
    const int8_t *  output;     /* [n_tokens] */
    const int32_t * batch_idx;  /* [n_tokens]: index of the entry in the input batch */
    const int32_t * seq_id_unq; /* [n_seqs_unq] ascending */
} llmem_ubatch;

/* Where the current micro-batch went in one KV cache (after apply). */
typedef struct llmem_kv_slot {
    uint32_t n_tokens;
    uint32_t n_kv;     /* cells attention reads per stream (llama.cpp get_n_kv) */
    uint32_t head;     /* first cell of the slot */
    uint32_t s0, s1;   /* streams touched */
} llmem_kv_slot;

/* The recurrent slot of the current micro-batch (after apply). */
typedef struct llmem_rs_slot {
    uint32_t head;
    uint32_t n_rs;
    int32_t  rs_z;
    uint32_t n_seqs;
} llmem_rs_slot;

/* What decode_step did; the per-sequence arrays the caller passes are in input order. */
typedef struct llmem_step {
    int32_t  status;      /* LLMEM_STATUS_*; FAILED_PREPARE: no room, nothing changed */
    uint32_t n_ubatches;  /* micro-batches planned; only the first is applied */
    uint32_t n_kv;        /* (base) KV cache: cells attention reads */
    uint32_t n_kv_swa;    /* SWA cache of iSWA kinds */
} llmem_step;

typedef struct llmem_capi {
    uint32_t     abi_version; /* LLMEM_CAPI_VERSION of the build */
    uint32_t     struct_size; /* sizeof(llmem_capi) of the build */
    const char * llmem_version;

    /* -- handles (these two take the GIL themselves) ------------------------------------------ */
    int (*memory_get)(void * py_memory, llmem_memory ** out, char * err, size_t err_len);
    void (*memory_release)(llmem_memory * mem);
    int (*memory_info)(const llmem_memory * mem, llmem_memory_info * out);
    /* Storage of model layer il: K and V arrays (see llmem.KVCache.k/v for the layout; *part
     * tells which cache holds it) or R and S arrays (llmem.RecurrentMemory.r/s). Borrowed. */
    int (*layer_kv)(const llmem_memory * mem, int32_t il, int32_t * part, void ** k, size_t * k_bytes, void ** v,
                    size_t * v_bytes, char * err, size_t err_len);
    int (*layer_rs)(const llmem_memory * mem, int32_t il, void ** r, size_t * r_bytes, void ** s, size_t * s_bytes,
                    char * err, size_t err_len);

    /* -- the memory's lock (re-entrant; the same lock as Python's memory.lock) ---------------- */
    int (*lock)(llmem_memory * mem);
    int (*try_lock)(llmem_memory * mem); /* 1: taken, 0: held by another thread */
    int (*unlock)(llmem_memory * mem);   /* LLMEM_ERR_LOCK if this thread does not hold it */

    /* -- sequences (llmem.Memory's semantics) ------------------------------------------------- */
    int (*clear)(llmem_memory * mem, int data, char * err, size_t err_len);
    int (*seq_rm)(llmem_memory * mem, int32_t seq, int32_t p0, int32_t p1, int * removed, char * err,
                  size_t err_len);
    int (*seq_cp)(llmem_memory * mem, int32_t src, int32_t dst, int32_t p0, int32_t p1, char * err, size_t err_len);
    int (*seq_keep)(llmem_memory * mem, int32_t seq, char * err, size_t err_len);
    int (*seq_add)(llmem_memory * mem, int32_t seq, int32_t p0, int32_t p1, int32_t shift, char * err,
                   size_t err_len);
    int (*seq_div)(llmem_memory * mem, int32_t seq, int32_t p0, int32_t p1, int32_t d, char * err, size_t err_len);
    int (*seq_pos_min)(llmem_memory * mem, int32_t seq, int32_t * out, char * err, size_t err_len);
    int (*seq_pos_max)(llmem_memory * mem, int32_t seq, int32_t * out, char * err, size_t err_len);
    /* Pending K-shift and stream copies (init_update().apply()); *applied = 0 if none. */
    int (*update)(llmem_memory * mem, int * applied, char * err, size_t err_len);

    /* -- batches ------------------------------------------------------------------------------ */
    /* Plan a batch; nothing changes. *status FAILED_PREPARE: no room, *out is NULL. */
    int (*init_batch)(llmem_memory * mem, const llmem_batch * batch, uint32_t n_ubatch, int embd_all,
                      llmem_context ** out, int32_t * status, char * err, size_t err_len);
    /* One decode step: token[i] (NULL: token 0) for sequence seq_ids[i], each sequence once,
     * positions continuing each sequence, every entry an output; planned as init_batch with
     * n_ubatch (0: max(n, n_rs_seq + 2), every sequence in one micro-batch) and its first
     * micro-batch applied. pos[i] (may be NULL) receives the position of sequence seq_ids[i]
     * and, with a KV part, k_idxs[i] (may be NULL) its K row (stream * kv_size + cell; the cell
     * planned, for a later micro-batch of the plan). *ctx (may be NULL: the context is ended)
     * receives the context for masks, recurrent states and further micro-batches. */
    int (*decode_step)(llmem_memory * mem, const int32_t * seq_ids, const int32_t * token, uint32_t n,
                       uint32_t n_ubatch, llmem_step * out, int64_t * k_idxs, int32_t * pos, llmem_context ** ctx,
                       char * err, size_t err_len);

    /* -- contexts ----------------------------------------------------------------------------- */
    int (*ctx_status)(const llmem_context * ctx);
    uint32_t (*ctx_n_ubatches)(const llmem_context * ctx);
    int (*ctx_apply)(llmem_context * ctx, char * err, size_t err_len);
    int (*ctx_next)(llmem_context * ctx, int * more, char * err, size_t err_len);
    int (*ctx_ubatch)(const llmem_context * ctx, llmem_ubatch * out, char * err, size_t err_len);
    /* K row (stream * kv_size + cell) of each token of the applied micro-batch in cache `part`. */
    int (*ctx_kv_slot)(llmem_context * ctx, int32_t part, llmem_kv_slot * slot, int64_t * k_idxs, size_t cap,
                       char * err, size_t err_len);
    /* llama.cpp's mask [n_tokens, n_kv] (0 attend, -inf not) of cache `part` into out[cap]. */
    int (*ctx_kq_mask)(llmem_context * ctx, int32_t part, int causal, float * out, size_t cap, char * err,
                       size_t err_len);
    /* Recurrent slot and s_copy (cap >= n_rs entries, may be NULL) of the applied micro-batch. */
    int (*ctx_rs_slot)(llmem_context * ctx, llmem_rs_slot * slot, int32_t * s_copy, size_t cap, char * err,
                       size_t err_len);
    /* Input states (kind 0: r, 1: s, 2: p where the layer has a P array) of model layer il for the micro-batch's n_seqs sets, into
     * out[cap] (n_seqs rows); once per array per micro-batch (RecurrentContext.get_r/get_s). */
    int (*ctx_rs_gather)(llmem_context * ctx, int32_t kind, int32_t il, void * out, size_t cap, char * err,
                         size_t err_len);
    /* New states: n_planes planes of n_seqs rows (RecurrentContext.store_r/store_s). */
    int (*ctx_rs_store)(llmem_context * ctx, int32_t kind, int32_t il, const void * rows, size_t nbytes,
                        uint32_t n_planes, char * err, size_t err_len);
    void (*ctx_free)(llmem_context * ctx);

    /* -- state bytes (llama.cpp's layout, as Memory.state_write / state_read) ------------------- */
    int (*state_size)(llmem_memory * mem, int32_t seq, uint32_t flags, size_t * out, char * err, size_t err_len);
    int (*state_write_into)(llmem_memory * mem, int32_t seq, uint32_t flags, uint8_t * buf, size_t cap,
                            size_t * written, char * err, size_t err_len);
    int (*state_read)(llmem_memory * mem, int32_t seq, uint32_t flags, const uint8_t * data, size_t n, char * err,
                      size_t err_len);
} llmem_capi;

#ifdef __cplusplus
}
#endif

/* With Python.h included first: the table of the installed llmem (imports llmem._core), or NULL
 * with a Python exception set. Call it with the GIL held, once (e.g. at module init). */
#ifdef PY_VERSION_HEX
static inline const llmem_capi * llmem_capi_import(void) {
    const llmem_capi * api = (const llmem_capi *) PyCapsule_Import(LLMEM_CAPI_CAPSULE, 0);
    if (api == NULL) {
        return NULL;
    }
    if (api->abi_version < LLMEM_CAPI_VERSION) {
        PyErr_Format(PyExc_ImportError, "llmem's C API is version %u, this module needs %d: upgrade llmem",
                     (unsigned) api->abi_version, LLMEM_CAPI_VERSION);
        return NULL;
    }
    return api;
}
#endif

#endif /* LLMEM_CAPI_H */
