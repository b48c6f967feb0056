"""Differential oracle: run a scripted memory scenario through the real llama.cpp.

A scenario is JSON:

  {
    "name": "kv_parallel",                     # optional, defaults to the file name
    "description": "...",                      # optional, copied into the result
    "model": "llama",                          # <models_dir>/<model>.gguf (see make_models.py)
    "context": {"n_ctx": 256, "n_seq_max": 2, "n_batch": 64, "n_ubatch": 16,
                "kv_unified": false, "swa_full": false,
                "flash_attn": "off",           # off | on | auto   (off => V is stored transposed)
                "type_k": "f16", "type_v": "f16", "n_threads": 1,
                "n_rs_seq": 0},                # recurrent rollback snapshots (experimental)
    "trace": ["ubatches"],                     # optional: record llama.cpp's micro-batch split per decode
    "steps": [ ... ]
  }

Steps (each yields one observation, in order; "step" is the step's index):

  {"op":"decode","tokens":[..],"pos":[..],"seq_ids":[[..],..],"logits":[0/1,..]}
        pos / seq_ids / logits may be omitted: llama.cpp then continues positions from the memory,
        uses seq 0, and outputs only the last token; "logits":"all" outputs every token.
        Shorthand: {"op":"decode","n":N,"pos0":P,"seqs":[..],"tok0":T} builds N tokens
        (T+i) % n_vocab at positions P.. (omit pos0 to let llama.cpp choose) for the seqs given.
        -> {"ret": int}  (0 ok, 1 no slot, -1 bad batch, ...; a batch larger than n_batch would make
        llama.cpp abort, so it is refused here with "ret": null and "refused": reason)
        + "log": llama.cpp's first warning/error lines when ret != 0 (informational)
        + "ubatches" when traced: [{"n_seq_tokens","n_seqs","equal_seqs","seq_id_unq",
          "tokens":[[id,pos,[seq ids],output],..]},..] as llama.cpp split the batch
  {"op":"seq_rm","seq":s,"p0":a,"p1":b}          -> {"ret": bool}
  {"op":"seq_cp","src":s,"dst":d,"p0":a,"p1":b}  -> {}
  {"op":"seq_keep","seq":s}                      -> {}
  {"op":"seq_add","seq":s,"p0":a,"p1":b,"delta":k} -> {}
  {"op":"seq_div","seq":s,"p0":a,"p1":b,"d":k}   -> {}
  {"op":"clear","data":true}                     -> {}
  {"op":"pos","seqs":[..]}                       -> {"min":[..],"max":[..]}
  {"op":"can_shift"}                             -> {"ret": bool}
  {"op":"state_seq_get","seq":s,"flags":0}       -> {"size","n","sha256","meta"} (+ "hex" with --hex)
  {"op":"state_seq_set","seq":d,"from":k,"truncate":n,"flags":0}
        k is the step index of an earlier state_seq_get; truncate keeps only the first n bytes
        -> {"ret": bytes read (0 = failure)}
  {"op":"state_get"}                             -> {"size","n","sha256","meta"}
  {"op":"state_set","from":k,"truncate":n}       -> {"ret": bytes read}
  {"op":"logits","i":k}                          -> {"logits":[rounded floats] or null,"argmax"}

"meta" is the parsed state blob without tensor payloads (see NOTES.md for the byte layout):
cells with their positions and sequence ids, per-layer types and row sizes, and a sha256 per
payload so that two states can be compared part by part.

CLI:
  oracle.py run SCENARIO.json [--models DIR] [--hex] [--verbose]     print the result JSON
  oracle.py all SCEN_DIR OUT_DIR [--models DIR] [--check-determinism]  run every scenario in its
        own process (llama.cpp aborts on some misuse), write OUT_DIR/<name>.json, print timings
  oracle.py compare SCEN_DIR EXPECTED_DIR [--models DIR]             re-run and diff with expected
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODELS_DIR = Path(os.environ.get("ORACLE_MODELS", "/tmp/oracle_models"))
LOGIT_DECIMALS = 4

# llmem's copy of /work/shared/oracle/oracle.py: every block type llama.cpp offers for its cache
_GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20,
               "bf16": 30}
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
STATE_SEQ_MAGIC = 0xAF143CD8


# ----------------------------------------------------------------------------------------------
# llama.cpp binding and logging
# ----------------------------------------------------------------------------------------------

class _Log:
    """Routes llama.cpp's log: dropped unless verbose, captured while a trace is active."""

    verbose = False
    capture: list[str] | None = None
    problems: list[str] | None = None
    callback = None  # keeps the ctypes callback alive


def _llama():
    import llama_cpp  # imported lazily so that make_models.py works without it
    if _Log.callback is None:
        @llama_cpp.llama_log_callback
        def _cb(level, text, user_data):  # noqa: ANN001
            msg = text.decode("utf-8", errors="replace") if text else ""
            if _Log.capture is not None:
                _Log.capture.append(msg)
            if level in (3, 4) and _Log.problems is not None:  # GGML_LOG_LEVEL_WARN, _ERROR
                _Log.problems.append(msg.strip())
            if _Log.verbose:
                sys.stderr.write(msg)
        _Log.callback = _cb
        llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


# ----------------------------------------------------------------------------------------------
# model layout (read from the GGUF, used to parse state blobs)
# ----------------------------------------------------------------------------------------------

# Archs whose memory layout the parser knows (those make_models.py writes, plus close relatives).
# Any other arch is treated as a plain KV cache; if that is wrong the state "meta" shows a
# parse_error while every other observation stays valid.
_RECURRENT_ARCHS = {"mamba", "mamba2"}
_HYBRID_ARCHS = {"jamba", "lfm2"}          # recurrent layers are those with head_count_kv == 0
_SWA_ARCHS = {"gemma2", "gemma3", "cohere2"}  # always sliding-window on some layers


def model_layout(path: Path) -> dict[str, Any]:
    """Which memory llama.cpp builds for this model, and how many layers each part holds."""
    import gguf
    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode()
        values = [f.parts[i].tolist()[0] for i in f.data]
        return values if f.types[0] == gguf.GGUFValueType.ARRAY else values[0]

    arch = field("general.architecture")
    n_layer = int(field(f"{arch}.block_count"))
    window = field(f"{arch}.attention.sliding_window")
    if arch in _RECURRENT_ARCHS:
        kind, n_recurrent = "recurrent", n_layer
    elif arch in _HYBRID_ARCHS:
        head_count_kv = field(f"{arch}.attention.head_count_kv")
        n_recurrent = sum(int(h) == 0 for h in head_count_kv)
        # lfm2 turns every attention layer into a sliding-window one when the window key is set
        kind = "hybrid_iswa" if arch == "lfm2" and window else "hybrid"
    else:
        kind, n_recurrent = ("iswa" if arch in _SWA_ARCHS else "kv"), 0
    return {"arch": arch, "kind": kind, "n_layer": n_layer, "n_layer_recurrent": n_recurrent,
            "n_swa": int(window) if window is not None else None}


# ----------------------------------------------------------------------------------------------
# state blob parsing (our own reading of the documented layout; payloads are hashed, not kept)
# ----------------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.off = 0

    def take(self, n: int) -> bytes:
        if self.off + n > len(self.data):
            raise ValueError(f"state blob too short: need {n} bytes at offset {self.off}, have {len(self.data)}")
        b = self.data[self.off:self.off + n]
        self.off += n
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def i32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def payload(self, n: int) -> str:
        return hashlib.sha256(self.take(n)).hexdigest()[:16]


def _parse_cells(r: _Reader, count: int) -> list[list]:
    cells = []
    for _ in range(count):
        pos = r.i32()
        n_seq = r.u32()
        seqs = [r.i32() for _ in range(n_seq)]
        cells.append([pos, seqs])
    return cells


def _parse_kv(r: _Reader) -> dict[str, Any]:
    """One llama_kv_cache::state_write: n_stream, then per stream cells + K/V payloads."""
    out: dict[str, Any] = {"part": "kv", "offset": r.off, "n_stream": r.u32(), "streams": []}
    for s in range(out["n_stream"]):
        count = r.u32()
        st: dict[str, Any] = {"stream": s, "cell_count": count}
        out["streams"].append(st)
        if count == 0:
            continue
        st["cells"] = _parse_cells(r, count)
        st["v_trans"] = r.u32()
        n_layer = r.u32()
        st["n_layer"] = n_layer
        st["k"] = []
        for _ in range(n_layer):
            t, row = r.i32(), r.u64()
            st["k"].append({"type": t, "row_size": row, "sha": r.payload(row * count)})
        st["v"] = []
        for _ in range(n_layer):
            t = r.i32()
            if st["v_trans"]:
                el, n_embd = r.u32(), r.u32()
                st["v"].append({"type": t, "el_size": el, "n_embd_v_gqa": n_embd,
                                "sha": r.payload(el * n_embd * count)})
            else:
                row = r.u64()
                st["v"].append({"type": t, "row_size": row, "sha": r.payload(row * count)})
    return out


def _parse_recurrent(r: _Reader, n_layer_recurrent: int) -> dict[str, Any]:
    out: dict[str, Any] = {"part": "recurrent", "offset": r.off}
    count = r.u32()
    out["cell_count"] = count
    out["cells"] = _parse_cells(r, count)
    out["s_trans"] = r.u32()
    out["n_layer"] = r.u32()  # the model's total layer count, not only the recurrent ones
    out["r"] = []
    for _ in range(n_layer_recurrent):
        t, row = r.i32(), r.u64()
        out["r"].append({"type": t, "row_size": row, "sha": r.payload(row * count)})
    out["s"] = []
    for _ in range(n_layer_recurrent):
        t, row = r.i32(), r.u64()
        out["s"].append({"type": t, "row_size": row, "sha": r.payload(row * count)})
    return out


def _parse_memory(r: _Reader, layout: dict[str, Any], partial_only: bool) -> list[dict[str, Any]]:
    kind = layout["kind"]
    if kind == "kv":
        return [_parse_kv(r)]
    if kind == "iswa":
        parts = [] if partial_only else [dict(_parse_kv(r), part="kv_base")]
        return parts + [dict(_parse_kv(r), part="kv_swa")]
    if kind == "recurrent":
        return [_parse_recurrent(r, layout["n_layer_recurrent"])]
    if kind == "hybrid":
        parts = [] if partial_only else [dict(_parse_kv(r), part="kv_attn")]
        return parts + [_parse_recurrent(r, layout["n_layer_recurrent"])]
    if kind == "hybrid_iswa":  # writes everything regardless of the partial flag
        return [dict(_parse_kv(r), part="kv_base"), dict(_parse_kv(r), part="kv_swa"),
                _parse_recurrent(r, layout["n_layer_recurrent"])]
    raise ValueError(f"unknown memory kind {kind!r}")


def parse_seq_state(data: bytes, layout: dict[str, Any], flags: int = 0) -> dict[str, Any]:
    r = _Reader(data)
    magic = r.u32()
    if magic != STATE_SEQ_MAGIC:
        raise ValueError(f"bad sequence-state magic {magic:#x}")
    out = {"magic": f"{magic:#x}", "seq_id": r.i32(), "parts": _parse_memory(r, layout, bool(flags & 1))}
    out["trailing_bytes"] = len(data) - r.off
    return out


def parse_full_state(data: bytes, layout: dict[str, Any]) -> dict[str, Any]:
    r = _Reader(data)
    n = r.u32()
    out = {"arch": r.take(n).decode(), "parts": _parse_memory(r, layout, False)}
    out["trailing_bytes"] = len(data) - r.off
    return out


# ----------------------------------------------------------------------------------------------
# micro-batch trace (parsed from LLAMA_BATCH_DEBUG output)
# ----------------------------------------------------------------------------------------------

def _parse_ubatch_log(lines: list[str], n_tokens: int) -> list[dict[str, Any]]:
    """Return the micro-batches of the split attempt that llama.cpp kept (the last complete one).

    llama.cpp prints every micro-batch it forms, including those of split attempts it then
    abandons; attempts are told apart by coverage (an attempt ends once every batch token is used)
    or by a token reappearing.
    """
    text = "".join(lines)
    ubatches: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    in_tokens = False
    for line in text.splitlines():
        if "added ubatch to split" in line:
            cur = {"equal_seqs": None, "n_seq_tokens": None, "n_seqs": None, "seq_id_unq": None, "tokens": []}
            ubatches.append(cur)
            in_tokens = False
            continue
        if cur is None:
            continue
        body = line.split(":", 1)[1].strip() if ":" in line else line.strip()
        if body.startswith("equal_seqs"):
            cur["equal_seqs"] = int(body.split("=")[1])
        elif body.startswith("n_seq_tokens"):
            cur["n_seq_tokens"] = int(body.split("=")[1])
        elif body.startswith("n_seqs ") or body.startswith("n_seqs="):
            cur["n_seqs"] = int(body.split("=")[1])
        elif body.startswith("seq_id_unq"):
            cur["seq_id_unq"] = [int(x) for x in body.split("=")[1].strip(" []").split()]
        elif body.startswith("token") and body.rstrip().endswith("["):
            in_tokens = True
        elif in_tokens and body.startswith("]"):
            in_tokens = False
            cur = None
        elif in_tokens and "pos =" in body:
            # "   0: id =      5 (               5), pos =    4, n_seq_id =  1, seq_id = [.1], output = 1"
            pos = int(body.split("pos =")[1].split(",")[0])
            tid = int(body.split("id =")[1].split("(")[0])
            mask = body.split("seq_id = [")[1].split("]")[0]
            seqs = [i for i, c in enumerate(mask) if c != "."]
            out = int(body.split("output =")[1].strip())
            cur["tokens"].append([tid, pos, seqs, out])
    # split into attempts
    attempts: list[list[dict[str, Any]]] = []
    seen: set = set()
    used = 0
    for ub in ubatches:
        keys = {(t[0], t[1], tuple(t[2])) for t in ub["tokens"]}
        if not attempts or used >= n_tokens or keys & seen:
            attempts.append([])
            seen, used = set(), 0
        attempts[-1].append(ub)
        seen |= keys
        used += len(ub["tokens"])
    if not attempts:
        return []
    return attempts[-1]


# ----------------------------------------------------------------------------------------------
# scenario runner
# ----------------------------------------------------------------------------------------------

class ScenarioError(ValueError):
    pass


class Runner:
    def __init__(self, scenario: dict[str, Any], models_dir: Path, keep_hex: bool = False):
        self.lib = _llama()
        self.scenario = scenario
        self.keep_hex = keep_hex
        model_name = scenario["model"]
        self.model_path = Path(models_dir) / f"{model_name}.gguf"
        if not self.model_path.exists():
            raise ScenarioError(f"model file {self.model_path} not found (run make_models.py)")
        self.layout = model_layout(self.model_path)
        self.trace = set(scenario.get("trace", []))
        unknown = self.trace - {"ubatches"}
        if unknown:
            raise ScenarioError(f"unknown trace kinds {sorted(unknown)}")
        self.blobs: dict[int, bytes] = {}
        self._open()

    # -- setup ---------------------------------------------------------------------------------
    def _open(self) -> None:
        lib = self.lib
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self.model:
            raise ScenarioError(f"llama.cpp failed to load {self.model_path}")
        c = dict(self.scenario.get("context", {}))
        known = {"n_ctx", "n_seq_max", "n_batch", "n_ubatch", "kv_unified", "swa_full", "flash_attn",
                 "type_k", "type_v", "n_threads", "n_rs_seq"}
        bad = set(c) - known
        if bad:
            raise ScenarioError(f"unknown context params {sorted(bad)}")
        p = lib.llama_context_default_params()
        p.n_ctx = c.get("n_ctx", 256)
        p.n_seq_max = c.get("n_seq_max", 1)
        p.n_batch = c.get("n_batch", 512)
        p.n_ubatch = c.get("n_ubatch", 512)
        p.n_rs_seq = c.get("n_rs_seq", 0)
        p.kv_unified = bool(c.get("kv_unified", False))
        p.swa_full = bool(c.get("swa_full", False))
        p.flash_attn_type = _FLASH_ATTN[c.get("flash_attn", "off")]
        p.type_k = _GGML_TYPES[c.get("type_k", "f16")]
        p.type_v = _GGML_TYPES[c.get("type_v", "f16")]
        p.n_threads = p.n_threads_batch = c.get("n_threads", 1)
        p.no_perf = True
        old = os.environ.get("LLAMA_BATCH_DEBUG")
        if "ubatches" in self.trace:
            os.environ["LLAMA_BATCH_DEBUG"] = "2"  # read once, when the context builds its batch allocator
        try:
            self.ctx = lib.llama_init_from_model(self.model, p)
        finally:
            if old is None:
                os.environ.pop("LLAMA_BATCH_DEBUG", None)
            else:
                os.environ["LLAMA_BATCH_DEBUG"] = old
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ScenarioError("llama.cpp failed to create the context")
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_batch = lib.llama_n_batch(self.ctx)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def info(self) -> dict[str, Any]:
        lib = self.lib
        return {
            "model": self.scenario["model"],
            "arch": self.layout["arch"],
            "memory": self.layout["kind"],
            "n_ctx": lib.llama_n_ctx(self.ctx),
            "n_ctx_seq": lib.llama_n_ctx_seq(self.ctx),
            "n_batch": lib.llama_n_batch(self.ctx),
            "n_ubatch": lib.llama_n_ubatch(self.ctx),
            "n_seq_max": lib.llama_n_seq_max(self.ctx),
            "n_swa": lib.llama_model_n_swa(self.model),
            "can_shift": bool(lib.llama_memory_can_shift(self.mem)),
            "n_vocab": self.n_vocab,
        }

    # -- steps ---------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        obs = []
        for i, step in enumerate(self.scenario["steps"]):
            op = step.get("op")
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                raise ScenarioError(f"step {i}: unknown op {op!r}")
            res = handler(i, step)
            obs.append({"step": i, "op": op, **res})
        return obs

    def _build_decode(self, step: dict[str, Any]) -> tuple[list, list | None, list | None, list | None]:
        if "n" in step:
            n = int(step["n"])
            seqs = step.get("seqs", [0])
            tok0 = int(step.get("tok0", step.get("pos0", 0)))
            tokens = [(tok0 + i) % self.n_vocab for i in range(n)]
            pos = [int(step.get("pos0", 0)) + i for i in range(n)] if "pos0" in step else None
            seq_ids = [list(seqs)] * n
            logits = step.get("logits")
            if logits is None:
                logits = [0] * (n - 1) + [1] if n else []
            elif logits == "all":
                logits = [1] * n
            return tokens, pos, seq_ids, logits
        tokens = list(step["tokens"])
        logits = step.get("logits")
        if logits == "all":
            logits = [1] * len(tokens)
        return tokens, step.get("pos"), step.get("seq_ids"), logits

    def _op_decode(self, i: int, step: dict[str, Any]) -> dict[str, Any]:
        lib = self.lib
        tokens, pos, seq_ids, logits = self._build_decode(step)
        n = len(tokens)
        for name, arr in (("pos", pos), ("seq_ids", seq_ids), ("logits", logits)):
            if arr is not None and len(arr) != n:
                raise ScenarioError(f"step {i}: {name} has {len(arr)} entries for {n} tokens")
        if n > self.n_batch:
            # llama.cpp asserts n_tokens <= n_batch and would abort the process
            return {"ret": None, "refused": f"n_tokens {n} > n_batch {self.n_batch} aborts llama.cpp"}
        batch = lib.llama_batch()
        keep: list[Any] = []
        batch.n_tokens = n
        tok_arr = (ctypes.c_int32 * max(n, 1))(*tokens)
        keep.append(tok_arr)
        batch.token = ctypes.cast(tok_arr, ctypes.POINTER(ctypes.c_int32))
        batch.embd = None
        if pos is not None:
            pos_arr = (ctypes.c_int32 * max(n, 1))(*pos)
            keep.append(pos_arr)
            batch.pos = ctypes.cast(pos_arr, ctypes.POINTER(ctypes.c_int32))
        if seq_ids is not None:
            nsid = (ctypes.c_int32 * max(n, 1))(*[len(s) for s in seq_ids])
            rows = []
            for s in seq_ids:
                row = (ctypes.c_int32 * max(len(s), 1))(*s)
                rows.append(row)
            ptrs = (ctypes.POINTER(ctypes.c_int32) * max(n, 1))(
                *[ctypes.cast(r, ctypes.POINTER(ctypes.c_int32)) for r in rows])
            keep += [nsid, rows, ptrs]
            batch.n_seq_id = ctypes.cast(nsid, ctypes.POINTER(ctypes.c_int32))
            batch.seq_id = ctypes.cast(ptrs, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        if logits is not None:
            lg = (ctypes.c_int8 * max(n, 1))(*[1 if x else 0 for x in logits])
            keep.append(lg)
            batch.logits = ctypes.cast(lg, ctypes.POINTER(ctypes.c_int8))
        if "ubatches" in self.trace:
            _Log.capture = []
        _Log.problems = []
        try:
            ret = lib.llama_decode(self.ctx, batch)
        finally:
            captured, _Log.capture = _Log.capture, None
            problems, _Log.problems = _Log.problems, None
        out: dict[str, Any] = {"ret": int(ret)}
        if ret != 0:
            # llama.cpp's own words, for people; a re-implementation should not be held to them
            out["log"] = [p.splitlines()[0].split(": ", 1)[-1] for p in problems if p][:2]
        if captured is not None:
            out["ubatches"] = [
                {"n_seq_tokens": ub["n_seq_tokens"], "n_seqs": ub["n_seqs"], "equal_seqs": ub["equal_seqs"],
                 "seq_id_unq": ub["seq_id_unq"], "tokens": ub["tokens"]}
                for ub in _parse_ubatch_log(captured, n)] if ret == 0 else []
        return out

    def _op_seq_rm(self, i, s):
        return {"ret": bool(self.lib.llama_memory_seq_rm(self.mem, s["seq"], s.get("p0", -1), s.get("p1", -1)))}

    def _op_seq_cp(self, i, s):
        self.lib.llama_memory_seq_cp(self.mem, s["src"], s["dst"], s.get("p0", -1), s.get("p1", -1))
        return {}

    def _op_seq_keep(self, i, s):
        self.lib.llama_memory_seq_keep(self.mem, s["seq"])
        return {}

    def _op_seq_add(self, i, s):
        self.lib.llama_memory_seq_add(self.mem, s["seq"], s.get("p0", -1), s.get("p1", -1), s["delta"])
        return {}

    def _op_seq_div(self, i, s):
        self.lib.llama_memory_seq_div(self.mem, s["seq"], s.get("p0", -1), s.get("p1", -1), s["d"])
        return {}

    def _op_clear(self, i, s):
        self.lib.llama_memory_clear(self.mem, bool(s.get("data", True)))
        return {}

    def _op_pos(self, i, s):
        seqs = s["seqs"]
        return {"seqs": seqs,
                "min": [int(self.lib.llama_memory_seq_pos_min(self.mem, q)) for q in seqs],
                "max": [int(self.lib.llama_memory_seq_pos_max(self.mem, q)) for q in seqs]}

    def _op_can_shift(self, i, s):
        return {"ret": bool(self.lib.llama_memory_can_shift(self.mem))}

    def _blob_obs(self, data: bytes, size: int, meta: dict[str, Any]) -> dict[str, Any]:
        out = {"size": size, "n": len(data), "sha256": hashlib.sha256(data).hexdigest(), "meta": meta}
        if self.keep_hex:
            out["hex"] = data.hex()
        return out

    def _op_state_seq_get(self, i, s):
        lib, seq, flags = self.lib, s["seq"], int(s.get("flags", 0))
        size = int(lib.llama_state_seq_get_size_ext(self.ctx, seq, flags))
        buf = (ctypes.c_uint8 * max(size, 1))()
        n = int(lib.llama_state_seq_get_data_ext(self.ctx, buf, size, seq, flags))
        data = bytes(buf)[:n]
        self.blobs[i] = data
        try:
            meta = parse_seq_state(data, self.layout, flags) if n else None
        except ValueError as e:
            meta = {"parse_error": str(e)}
        return self._blob_obs(data, size, meta)

    def _blob_from(self, i: int, s: dict[str, Any]) -> bytes:
        src = s["from"]
        if src not in self.blobs:
            raise ScenarioError(f"step {i}: 'from' {src} is not an earlier state_*_get step")
        data = self.blobs[src]
        if "truncate" in s:
            data = data[: int(s["truncate"])]
        return data

    def _op_state_seq_set(self, i, s):
        data = self._blob_from(i, s)
        buf = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
        ret = self.lib.llama_state_seq_set_data_ext(self.ctx, buf, len(data), s["seq"], int(s.get("flags", 0)))
        return {"ret": int(ret)}

    def _op_state_get(self, i, s):
        lib = self.lib
        size = int(lib.llama_state_get_size(self.ctx))
        buf = (ctypes.c_uint8 * max(size, 1))()
        n = int(lib.llama_state_get_data(self.ctx, buf, size))
        data = bytes(buf)[:n]
        self.blobs[i] = data
        try:
            meta = parse_full_state(data, self.layout) if n else None
        except ValueError as e:
            meta = {"parse_error": str(e)}
        return self._blob_obs(data, size, meta)

    def _op_state_set(self, i, s):
        data = self._blob_from(i, s)
        buf = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
        return {"ret": int(self.lib.llama_state_set_data(self.ctx, buf, len(data)))}

    def _op_logits(self, i, s):
        ptr = self.lib.llama_get_logits_ith(self.ctx, int(s["i"]))
        if not ptr:
            return {"logits": None, "argmax": None}
        row = [float(ptr[j]) for j in range(self.n_vocab)]
        argmax = max(range(len(row)), key=row.__getitem__)
        return {"logits": [round(x, LOGIT_DECIMALS) for x in row], "argmax": argmax}


def run_scenario(scenario: dict[str, Any], models_dir: Path = DEFAULT_MODELS_DIR,
                 keep_hex: bool = False, verbose: bool = False) -> dict[str, Any]:
    _Log.verbose = verbose
    runner = Runner(scenario, Path(models_dir), keep_hex=keep_hex)
    try:
        info = runner.info()
        obs = runner.run()
    finally:
        runner.close()
    return {"scenario": scenario.get("name"), "description": scenario.get("description", ""),
            "info": info, "observations": obs}


def dumps_result(res: dict[str, Any]) -> str:
    """JSON with one observation per line: compact, yet diffs point at the step that changed."""
    head = {k: v for k, v in res.items() if k != "observations"}
    lines = [json.dumps(head)[:-1] + ', "observations": [']
    obs = res.get("observations", [])
    for j, o in enumerate(obs):
        lines.append(" " + json.dumps(o) + ("," if j + 1 < len(obs) else ""))
    lines.append("]}")
    return "\n".join(lines) + "\n"


def load_scenario(path: Path) -> dict[str, Any]:
    sc = json.loads(Path(path).read_text())
    sc.setdefault("name", Path(path).stem)
    return sc


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _run_subprocess(path: Path, models: Path) -> tuple[dict[str, Any] | None, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "run", str(path), "--models", str(models)],
                          capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, proc.stderr[-2000:], dt
    return json.loads(proc.stdout), "", dt


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}: present on one side only"
            d = _first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one scenario and print its observations")
    r.add_argument("scenario", type=Path)
    r.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    r.add_argument("--hex", action="store_true", help="include state blobs as hex")
    r.add_argument("--verbose", action="store_true", help="let llama.cpp's log through to stderr")
    a = sub.add_parser("all", help="run every scenario of a folder, each in its own process")
    a.add_argument("scenarios", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    a.add_argument("--check-determinism", action="store_true", help="run each scenario twice and compare")
    c = sub.add_parser("compare", help="re-run scenarios and compare with stored expectations")
    c.add_argument("scenarios", type=Path)
    c.add_argument("expected", type=Path)
    c.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    args = ap.parse_args(argv)

    if args.cmd == "run":
        res = run_scenario(load_scenario(args.scenario), args.models, keep_hex=args.hex, verbose=args.verbose)
        sys.stdout.write(dumps_result(res))
        return 0

    failures = 0
    for path in sorted(args.scenarios.glob("*.json")):
        res, err, dt = _run_subprocess(path, args.models)
        if res is None:
            print(f"{path.stem:32s} ERROR ({dt:.2f}s)\n{err}")
            failures += 1
            continue
        if args.cmd == "all":
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{path.stem}.json").write_text(dumps_result(res))
            note = ""
            if args.check_determinism:
                res2, err2, _ = _run_subprocess(path, args.models)
                diff = "second run failed: " + err2 if res2 is None else _first_difference(res, res2)
                note = "deterministic" if diff is None else f"NONDETERMINISTIC {diff}"
                failures += diff is not None
            print(f"{path.stem:32s} {dt:6.2f}s {note}")
        else:
            exp_path = args.expected / f"{path.stem}.json"
            if not exp_path.exists():
                print(f"{path.stem:32s} no expected file")
                failures += 1
                continue
            diff = _first_difference(json.loads(exp_path.read_text()), res)
            print(f"{path.stem:32s} {dt:6.2f}s {'ok' if diff is None else 'DIFF ' + diff}")
            failures += diff is not None
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
