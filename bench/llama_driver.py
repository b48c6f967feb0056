"""llama.cpp's own memory classes, driven from C++, as the baseline of the decode-step rows.

``llama_driver.cpp`` (ours, written from reading llama.cpp's headers) constructs
``llama_kv_cache`` / ``llama_memory_recurrent`` and ``llama_batch_allocr`` and runs the memory part
of ``llama_context::decode`` on them: the batch, the allocator's checks and split, ``init_batch``
(slot search), ``apply``, and the graph inputs (``set_input_k_idxs`` / ``set_input_v_idxs`` /
``set_input_kq_mask``). No model compute runs, so the memory work alone is timed, in C++ loops.

Building it needs three things, each located here and cached under ``build/``:

* ``llama_cpp`` importable (the ``bench`` extra, llama-cpp-python 0.3.36): its ``lib/libllama.so``
  and ``libggml*.so``, which export llama.cpp's internal C++ symbols (``LLMEM_LLAMA_LIB`` may name
  another folder holding a build of the same version);
* the headers of the same version, from its sdist (``build/llama_sdist/``, fetched with
  ``pip download`` the first time, or pointed to with ``LLMEM_LLAMA_SDIST``);
* a C++17 compiler (``$CXX``, else ``c++``/``g++``/``clang++``).

Where one is missing ``available()`` is False and ``unavailable_reason()`` says which; the bench
then leaves the llama.cpp column of these rows empty with that reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

LLAMA_CPP_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
SOURCE = Path(__file__).resolve().with_name("llama_driver.cpp")
# the header folders of the sdist the driver compiles against
HEADER_DIRS = ("vendor/llama.cpp/src", "vendor/llama.cpp/include", "vendor/llama.cpp/ggml/include")
LIB_NAMES = ("llama", "ggml", "ggml-base")  # linked; libggml-cpu comes in through libggml


def build_root() -> Path:
    """``build/`` of the repository (``LLMEM_BENCH_BUILD`` overrides it)."""
    env = os.environ.get("LLMEM_BENCH_BUILD")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "build"


# ---------------------------------------------------------------------------------------------
# locating the pieces (pure functions where possible, for the tests)
# ---------------------------------------------------------------------------------------------

def find_compiler(env: Optional[dict] = None) -> Optional[str]:
    env = os.environ if env is None else env
    for name in ([env["CXX"]] if env.get("CXX") else []) + ["c++", "g++", "clang++"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def llama_cpp_lib_dir() -> tuple[Optional[Path], str]:
    """(folder holding libllama.so of the installed llama_cpp, or None, and why not).
    ``LLMEM_LLAMA_LIB`` names another folder (a llama.cpp build of the same version)."""
    env = os.environ.get("LLMEM_LLAMA_LIB")
    if env:
        d = Path(env)
        return (d, "") if (d / "libllama.so").exists() else (None, f"LLMEM_LLAMA_LIB={env} has no libllama.so")
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError) as exc:
        return None, f"llama_cpp not importable ({exc})"
    if spec is None or not spec.origin:
        return None, "llama_cpp not installed (pip install 'llmem[bench]')"
    pkg = Path(spec.origin).parent
    for cand in (pkg / "lib", pkg):
        if any((cand / f"lib{n}.so").exists() for n in ("llama",)):
            return cand, ""
    return None, f"no libllama.so under {pkg}"


def header_members(names: Sequence[str]) -> list[str]:
    """The members of the sdist (``names``: its member names) that the driver needs: the header
    files under HEADER_DIRS."""
    out = []
    for name in names:
        parts = name.split("/", 1)
        if len(parts) != 2 or not parts[1].endswith((".h", ".hpp")):
            continue
        rel = parts[1]
        if any(rel.startswith(d + "/") and "/" not in rel[len(d) + 1:] for d in HEADER_DIRS):
            out.append(name)
    return out


def locate_sdist(root: Path, download: bool = True) -> tuple[Optional[Path], str]:
    """The cached sdist (or ``LLMEM_LLAMA_SDIST``), fetched with pip the first time."""
    env = os.environ.get("LLMEM_LLAMA_SDIST")
    if env:
        p = Path(env)
        return (p, "") if p.exists() else (None, f"LLMEM_LLAMA_SDIST={env} does not exist")
    folder = root / "llama_sdist"
    path = folder / SDIST_NAME
    if path.exists():
        return path, ""
    if not download:
        return None, f"{path} missing"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(folder)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"pip download of the llama-cpp-python sdist failed ({exc})"
    if r.returncode != 0 or not path.exists():
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        return None, f"pip download of the llama-cpp-python {LLAMA_CPP_VERSION} sdist failed: {tail[0]}"
    return path, ""


def extract_headers(sdist: Path, dest: Path) -> Path:
    """Unpack the needed headers once; returns the vendor/llama.cpp folder under ``dest``."""
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/", 1)[0]
        base = dest / top / "vendor" / "llama.cpp"
        if not (base / "src" / "llama-kv-cache.h").exists():
            members = [tar.getmember(n) for n in header_members(names)]
            try:
                tar.extractall(dest, members=members, filter="data")
            except TypeError:  # a Python without extraction filters (the members are plain headers)
                tar.extractall(dest, members=members)  # noqa: S202
    return base


def compile_command(cxx: str, source: Path, out: Path, include_base: Path, lib_dir: Path) -> list[str]:
    incs = [f"-I{include_base / d}" for d in ("src", "include", "ggml/include")]
    libs = [f"-l{n}" for n in LIB_NAMES]
    return [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-DNDEBUG",
            *incs, str(source), "-o", str(out), f"-L{lib_dir}", *libs, f"-Wl,-rpath,{lib_dir}"]


def stamp_of(cmd: Sequence[str], source: Path) -> str:
    """What the build depends on: the command (compiler, paths) and the source's bytes."""
    h = hashlib.sha256("\0".join(cmd).encode())
    h.update(source.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------------------------

_lib = None
_reason: Optional[str] = None


def build(root: Optional[Path] = None, download: bool = True) -> tuple[Optional[Path], str]:
    """Compile the driver into ``build/llama_driver/`` (reused while its stamp matches)."""
    root = build_root() if root is None else root
    lib_dir, why = llama_cpp_lib_dir()
    if lib_dir is None:
        return None, why
    cxx = find_compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    sdist, why = locate_sdist(root, download)
    if sdist is None:
        return None, why
    out_dir = root / "llama_driver"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        base = extract_headers(sdist, out_dir / "headers")
    except (OSError, tarfile.TarError) as exc:
        return None, f"could not unpack the headers of {sdist} ({exc})"
    out = out_dir / "libllmem_llama_driver.so"
    cmd = compile_command(cxx, SOURCE, out, base, lib_dir)
    stamp = stamp_of(cmd, SOURCE)
    stamp_file = out_dir / "stamp"
    if out.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return out, ""
    tmp = out.with_suffix(".tmp.so")
    cmd_tmp = cmd[:cmd.index(str(out))] + [str(tmp)] + cmd[cmd.index(str(out)) + 1:]
    try:
        r = subprocess.run(cmd_tmp, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"compiling the llama.cpp driver failed ({exc})"
    if r.returncode != 0:
        (out_dir / "build.log").write_text(" ".join(cmd_tmp) + "\n" + r.stdout + r.stderr)
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
        return None, f"compiling the llama.cpp driver failed (see {out_dir / 'build.log'}): {first}"
    os.replace(tmp, out)
    stamp_file.write_text(stamp)
    return out, ""


def _declare(lib) -> None:
    c = ctypes
    vp, i32, u32, i64 = c.c_void_p, c.c_int32, c.c_uint32, c.c_int64
    p_i32, p_i64, p_f32 = c.POINTER(i32), c.POINTER(i64), c.POINTER(c.c_float)
    sig = {
        "lmd_last_error": (c.c_char_p, []),
        "lmd_init": (c.c_int, [c.c_int]),
        "lmd_model_load": (vp, [c.c_char_p]),
        "lmd_model_free": (None, [vp]),
        "lmd_model_n_layer": (u32, [vp]),
        "lmd_kv_new": (vp, [vp, u32, u32, c.c_int, c.c_int, u32, u32, u32, c.c_int]),
        "lmd_kv_free": (None, [vp]),
        "lmd_kv_decode": (c.c_int, [vp, p_i32, p_i32, i32, u32]),
        "lmd_kv_decode_steps": (c.c_int, [vp, p_i32, i32, i32, i32, p_i64]),
        "lmd_kv_time_prefill": (c.c_int, [vp, i32, u32, i32, p_i64]),
        "lmd_kv_mask_reps": (c.c_int, [vp, i32, i32, i32, i32, p_i64]),
        "lmd_kv_v_idxs_copy": (i64, [vp, p_i64, i64]),
        "lmd_kv_mask_shape": (c.c_int, [vp, p_i64]),
        "lmd_kv_mask_copy": (c.c_int, [vp, p_f32, i64, i32]),
        "lmd_kv_k_idxs_copy": (c.c_int, [vp, p_i64, i64]),
        "lmd_kv_seq_rm": (c.c_int, [vp, i32, i32, i32]),
        "lmd_kv_seq_pos_max": (i32, [vp, i32]),
        "lmd_kv_n_stream": (u32, [vp]),
        "lmd_kv_time_seq_pos_max": (c.c_int, [vp, p_i32, i32, i32, p_i64]),
        "lmd_kv_time_seq_rm_tail": (c.c_int, [vp, p_i32, i32, i32, i32, p_i64]),
        "lmd_kv_loop_seq_pos_max": (c.c_double, [vp, p_i32, i32, i32]),
        "lmd_rs_new": (vp, [vp, u32, u32, u32]),
        "lmd_rs_free": (None, [vp]),
        "lmd_rs_steps": (c.c_int, [vp, p_i32, i32, i32, p_i64]),
        "lmd_rs_seq_pos_max": (i32, [vp, i32]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def load(root: Optional[Path] = None, download: bool = True):
    """The loaded driver library, or None (see ``unavailable_reason()``)."""
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    path, why = build(root, download)
    if path is None:
        _reason = why
        return None
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as exc:
        _reason = f"loading {path} failed ({exc}); llama.cpp's internal symbols may not be exported"
        return None
    lib.lmd_init(1)
    _lib = lib
    return lib


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str:
    load()
    return _reason or ""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what}: {_lib.lmd_last_error().decode(errors='replace')}")


def _i32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int32)


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


class Model:
    """llama.cpp's model object of a GGUF (its hyperparameters and vocabulary are what the
    memories use)."""

    def __init__(self, path) -> None:
        lib = load()
        if lib is None:
            raise RuntimeError(f"llama.cpp driver unavailable: {_reason}")
        self.h = lib.lmd_model_load(str(path).encode())
        if not self.h:
            raise RuntimeError(lib.lmd_last_error().decode(errors="replace"))
        if lib.lmd_model_n_layer(self.h) == 0:  # (llama.cpp would abort on the first layer query)
            raise RuntimeError(f"llama.cpp read no layers from {path}")

    def close(self) -> None:
        if self.h:
            _lib.lmd_model_free(self.h)
            self.h = None

    def __del__(self) -> None:
        self.close()


class KV:
    """A ``llama_kv_cache`` of ``kv_size`` cells per stream (one stream when ``unified``, else one
    per sequence), f16 K/V of the model's width, V not transposed (as under flash attention);
    ``swa_type`` (llama_swa_type: 1 standard, 2 chunked, 3 symmetric) with ``n_swa`` makes it a
    sliding-window cache."""

    def __init__(self, model: Model, kv_size: int, n_seq_max: int, unified: bool = True,
                 n_ubatch: int = 512, n_tokens_max: int = 512, v_trans: bool = False,
                 n_swa: int = 0, swa_type: int = 0) -> None:
        self.model = model  # kept alive: the cache refers to its hyperparameters
        self.h = _lib.lmd_kv_new(model.h, kv_size, n_seq_max, int(unified), int(v_trans), n_ubatch,
                                 max(n_tokens_max, n_ubatch, n_seq_max), n_swa, swa_type)
        if not self.h:
            raise RuntimeError(_lib.lmd_last_error().decode(errors="replace"))
        self.unified = unified

    def close(self) -> None:
        if self.h:
            _lib.lmd_kv_free(self.h)
            self.h = None

    def __del__(self) -> None:
        self.close()

    def decode(self, seq_ids, pos=None, n_ubatch: int = 512) -> None:
        """Place a batch (positions inferred from the cache when ``pos`` is None)."""
        s = _i32(seq_ids)
        p = None if pos is None else _i32(pos)
        _check(_lib.lmd_kv_decode(self.h, _ptr(s, ctypes.c_int32), None if p is None else _ptr(p, ctypes.c_int32),
                                  len(s), n_ubatch), "llama.cpp decode")

    def decode_steps(self, seq_ids, n_steps: int, mask: int = 0) -> np.ndarray:
        """Per-step nanoseconds of ``n_steps`` decode steps (mask: 0 none, 1 f32, 2 f16)."""
        s = _i32(seq_ids)
        out = np.zeros(n_steps, np.int64)
        _check(_lib.lmd_kv_decode_steps(self.h, _ptr(s, ctypes.c_int32), len(s), n_steps, mask,
                                        _ptr(out, ctypes.c_int64)), "llama.cpp decode step")
        return out

    def time_prefill(self, n_tokens: int, n_ubatch: int, reps: int) -> np.ndarray:
        """Per-call nanoseconds of placing a prompt of ``n_tokens`` for sequence 0 into the empty
        cache in micro-batches of ``n_ubatch`` (removed again after each, untimed)."""
        out = np.zeros(reps, np.int64)
        _check(_lib.lmd_kv_time_prefill(self.h, n_tokens, n_ubatch, reps, _ptr(out, ctypes.c_int64)),
               "llama.cpp prefill")
        return out

    def mask_reps(self, reps: int, f16: bool = False, causal: bool = True, with_idxs: bool = False) -> np.ndarray:
        """Per-call nanoseconds of setting the last step's mask again (and its k/v indices when
        ``with_idxs``)."""
        out = np.zeros(reps, np.int64)
        _check(_lib.lmd_kv_mask_reps(self.h, reps, int(f16), int(causal), int(with_idxs),
                                     _ptr(out, ctypes.c_int64)), "llama.cpp kq_mask")
        return out

    def v_idxs(self) -> np.ndarray:
        n = int(_lib.lmd_kv_v_idxs_copy(self.h, None, 0))
        if n < 0:
            _check(n, "v_idxs")
        out = np.empty(n, np.int64)
        _lib.lmd_kv_v_idxs_copy(self.h, _ptr(out, ctypes.c_int64), n)
        return out

    def mask(self, causal: bool = True) -> np.ndarray:
        """llama.cpp's f32 mask of the last step as ``[n_tokens, n_kv]`` (tokens in micro-batch
        order, stream after stream)."""
        dims = np.zeros(3, np.int64)
        _check(_lib.lmd_kv_mask_shape(self.h, _ptr(dims, ctypes.c_int64)), "mask shape")
        n_kv, tps, ns = (int(x) for x in dims)
        out = np.empty((ns * tps, n_kv), np.float32)
        _check(_lib.lmd_kv_mask_copy(self.h, _ptr(out, ctypes.c_float), out.size, int(causal)), "mask copy")
        return out

    def k_idxs(self) -> np.ndarray:
        dims = np.zeros(3, np.int64)
        _check(_lib.lmd_kv_mask_shape(self.h, _ptr(dims, ctypes.c_int64)), "mask shape")
        out = np.empty(int(dims[1] * dims[2]), np.int64)
        _check(_lib.lmd_kv_k_idxs_copy(self.h, _ptr(out, ctypes.c_int64), out.size), "k_idxs copy")
        return out

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        _check(_lib.lmd_kv_seq_rm(self.h, seq, p0, p1), "llama.cpp seq_rm")

    def seq_pos_max(self, seq: int) -> int:
        return int(_lib.lmd_kv_seq_pos_max(self.h, seq))

    @property
    def n_stream(self) -> int:
        return int(_lib.lmd_kv_n_stream(self.h))

    def time_seq_pos_max(self, seqs, reps: int) -> np.ndarray:
        s = _i32(seqs)
        out = np.zeros(reps, np.int64)
        _check(_lib.lmd_kv_time_seq_pos_max(self.h, _ptr(s, ctypes.c_int32), len(s), reps,
                                            _ptr(out, ctypes.c_int64)), "seq_pos_max")
        return out

    def loop_seq_pos_max(self, seqs, reps: int) -> float:
        """Nanoseconds per seq_pos_max call over a loop of ``reps`` calls (one clock read pair)."""
        s = _i32(seqs)
        return float(_lib.lmd_kv_loop_seq_pos_max(self.h, _ptr(s, ctypes.c_int32), len(s), reps))

    def time_seq_rm_tail(self, seqs, tail: int, reps: int) -> np.ndarray:
        s = _i32(seqs)
        out = np.zeros(reps, np.int64)
        _check(_lib.lmd_kv_time_seq_rm_tail(self.h, _ptr(s, ctypes.c_int32), len(s), tail, reps,
                                            _ptr(out, ctypes.c_int64)), "seq_rm tail")
        return out


class Recurrent:
    """A ``llama_memory_recurrent`` of ``mem_size`` cells. The model handle is given a small
    recurrent state (its llama hyperparameters have none): load a Model for this use alone."""

    def __init__(self, model: Model, mem_size: int, n_seq_max: int, n_ubatch: int = 512) -> None:
        self.model = model
        self.h = _lib.lmd_rs_new(model.h, mem_size, n_seq_max, n_ubatch)
        if not self.h:
            raise RuntimeError(_lib.lmd_last_error().decode(errors="replace"))

    def close(self) -> None:
        if self.h:
            _lib.lmd_rs_free(self.h)
            self.h = None

    def __del__(self) -> None:
        self.close()

    def steps(self, seq_ids, n_steps: int) -> np.ndarray:
        s = _i32(seq_ids)
        out = np.zeros(n_steps, np.int64)
        _check(_lib.lmd_rs_steps(self.h, _ptr(s, ctypes.c_int32), len(s), n_steps, _ptr(out, ctypes.c_int64)),
               "llama.cpp recurrent step")
        return out

    def seq_pos_max(self, seq: int) -> int:
        return int(_lib.lmd_rs_seq_pos_max(self.h, seq))


if __name__ == "__main__":  # python -m bench.llama_driver: build and report
    lib = load()
    print("driver:", "built" if lib is not None else f"unavailable ({unavailable_reason()})")
