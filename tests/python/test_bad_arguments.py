"""Issue 8, bad arguments everywhere: one table over the public API. Every row is a call with one
bad argument (negative, huge, wrong type or dtype, wrong shape, non-contiguous, NaN, an object of
the wrong kind) and the exception it must raise: ValueError/TypeError (or an llmem error) whose
message names the argument and shows the bad value, never a crash, an abort or a silent answer.

Sequence ids keep llama.cpp's ranges (the oracle recordings depend on them): a unified KV cache
answers for any id below 256 as for an empty sequence, a multi-stream cache refuses ids from
n_seq_max, and a recurrent memory reports llama.cpp's refusal (False / no change) for ids it does
not hold. So the rows below use ids outside what llama.cpp accepts.
"""

import math

import numpy as np
import pytest

from llmem import (Batch, BatchAllocator, HybridMemory, KVCache, KVCacheISWA, LlmemError, RecurrentMemory, Rope,
                   SWAType)

HUGE = 2**40
NAN = float("nan")


def kv(**kw):
    args = dict(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=32, n_seq_max=4)
    args.update(kw)
    return KVCache(**args)


def kv_streams():
    return kv(unified=False)


def rs(**kw):
    args = dict(n_layer=2, n_embd_r=4, n_embd_s=6, mem_size=4, n_seq_max=4)
    args.update(kw)
    return RecurrentMemory(**args)


def iswa(**kw):
    args = dict(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=64, n_seq_max=4, n_swa=4,
                swa_type=SWAType.STANDARD, is_swa_layer=[True, False])
    args.update(kw)
    return KVCacheISWA(**args)


def hybrid():
    return HybridMemory(attn=kv(layer_filter=lambda il: il == 0), recr=rs(layer_filter=[False, True]))


def batch():
    return Batch(token=np.arange(3, dtype=np.int32), seq_id=np.array([0, 0, 1], np.int32))


def kv_context():
    ctx = kv().init_batch(batch(), 8)
    ctx.apply()
    return ctx


def rs_context():
    ctx = rs().init_batch(batch(), 8)
    ctx.apply()
    return ctx


MEMORIES = {"KVCache": kv, "KVCacheISWA": iswa, "RecurrentMemory": rs, "HybridMemory": hybrid}

# (id, call, exception, words the message must contain)
ROWS = []


def row(name, call, exc, *words):
    ROWS.append(pytest.param(call, exc, words, id=name))


# -- constructors --------------------------------------------------------------------------------
for bad, exc, words in [(-1, ValueError, ("kv_size", "-1")), (0, ValueError, ("kv_size", "0")),
                        (HUGE, ValueError, ("kv_size", str(HUGE))), (2**31, ValueError, ("kv_size", str(2**31))),
                        (None, TypeError, ("kv_size", "None")), (8.0, TypeError, ("kv_size", "8.0"))]:
    row(f"KVCache(kv_size={bad!r})", lambda bad=bad: kv(kv_size=bad), exc, *words)
for bad, exc in [(0, ValueError), (-1, ValueError), (HUGE, ValueError), (2**31, ValueError), (100000, ValueError),
                 (1.5, TypeError), (True, TypeError)]:
    row(f"KVCache(n_seq_max={bad!r})", lambda bad=bad: kv(n_seq_max=bad), exc, "n_seq_max", str(bad))
for bad, exc in [(-1, ValueError), (HUGE, ValueError), (1.5, TypeError), ("2", TypeError)]:
    row(f"KVCache(n_layer={bad!r})", lambda bad=bad: kv(n_layer=bad), exc, "n_layer", str(bad))
for name, bad, exc, words in [
        ("n_embd_k_gqa", -1, ValueError, ("n_embd_k_gqa", "-1")),
        ("n_embd_k_gqa", HUGE, ValueError, ("n_embd_k", str(HUGE))),
        ("n_embd_k_gqa", [8], ValueError, ("n_embd_k_gqa", "1 entries")),
        ("n_embd_k_gqa", 1.5, TypeError, ("n_embd_k_gqa", "1.5")),
        ("n_embd_v_gqa", [8, "x"], TypeError, ("n_embd_v_gqa[1]", "x")),
        ("n_embd_v_gqa", -3, ValueError, ("n_embd_v_gqa", "-3")),
        ("dtype_k", np.int8, ValueError, ("dtype_k", "int8")),
        ("dtype_k", "foo", ValueError, ("dtype_k", "foo")),  # a name, but of no ggml type
        ("dtype_v", np.float64, ValueError, ("dtype_v", "float64")),
        ("n_pad", 0, ValueError, ("n_pad", "0")),
        ("n_pad", HUGE, ValueError, ("n_pad", str(HUGE))),
        ("n_swa", -1, ValueError, ("n_swa", "-1")),
        ("swa_type", 7, ValueError, ("7", "SWAType")),
        ("layer_filter", 5, TypeError, ("layer_filter",)),
        ("rope", "x", TypeError, ("rope", "str")),
        ("n_pos_per_embd", 0, ValueError, ("n_pos_per_embd", "0")),
        ("n_pos_per_embd", 9, ValueError, ("n_pos_per_embd", "9"))]:
    row(f"KVCache({name}={bad!r})", lambda name=name, bad=bad: kv(**{name: bad}), exc, *words)
for name, bad, exc in [("freq_base", NAN, ValueError), ("freq_base", -1.0, ValueError),
                       ("freq_base", math.inf, ValueError), ("freq_scale", math.inf, ValueError),
                       ("freq_scale", 0.0, ValueError), ("ext_factor", NAN, ValueError),
                       ("attn_factor", NAN, ValueError), ("beta_fast", NAN, ValueError),
                       ("beta_slow", -math.inf, ValueError), ("n_ctx_orig", -1, ValueError),
                       ("head_dim", 2, ValueError), ("head_dim", 4.0, TypeError), ("freq_base", "x", TypeError),
                       ("n_rot", 3, ValueError), ("n_rot", True, ValueError), ("mode", 3, ValueError)]:
    args = {"n_rot": 4, name: bad}
    row(f"Rope({name}={bad!r})", lambda args=args: Rope(**args), exc, name, str(bad))
    row(f"KVCache(rope={{{name}: {bad!r}}})", lambda args=args: kv(rope=args), exc, name, str(bad))
for name, bad, exc, words in [
        ("n_layer", 0, ValueError, ("n_layer", "0")), ("n_layer", HUGE, ValueError, ("n_layer", str(HUGE))),
        ("n_embd_r", -1, ValueError, ("n_embd_r", "-1")), ("n_embd_s", [1], ValueError, ("n_embd_s", "1 entries")),
        ("n_embd_s", 2.5, TypeError, ("n_embd_s", "float")),
        ("mem_size", 0, ValueError, ("mem_size", "0")), ("mem_size", 2**31, ValueError, ("mem_size", str(2**31))),
        ("n_seq_max", 0, ValueError, ("n_seq_max", "0")), ("n_seq_max", -1, ValueError, ("n_seq_max", "-1")),
        ("n_seq_max", HUGE, ValueError, ("n_seq_max", str(HUGE))),
        ("n_rs_seq", -1, ValueError, ("n_rs_seq", "-1")), ("n_rs_seq", HUGE, ValueError, ("n_rs_seq", str(HUGE))),
        ("dtype_r", np.int8, TypeError, ("dtype_r", "int8")), ("dtype_s", np.float64, TypeError, ("dtype_s", "float64")),
        ("dtype_r", "x", TypeError, ("dtype_r", "x")), ("layer_filter", 5, TypeError, ("layer_filter", "5")),
        ("layer_filter", [True], ValueError, ("layer_filter", "1 entries"))]:
    row(f"RecurrentMemory({name}={bad!r})", lambda name=name, bad=bad: rs(**{name: bad}), exc, *words)
for name, bad, exc, words in [
        ("n_swa", 0, ValueError, ("n_swa", "0")), ("n_ubatch", 0, ValueError, ("n_ubatch", "0")),
        ("n_ubatch", HUGE, ValueError, ("n_ubatch", str(HUGE))), ("kv_size", -1, ValueError, ("kv_size", "-1")),
        ("is_swa_layer", None, ValueError, ("is_swa_layer",)), ("is_swa_layer", [True], ValueError, ("is_swa_layer", "1")),
        ("is_swa_layer", 5, TypeError, ("is_swa_layer", "5")), ("swa_type", SWAType.NONE, ValueError, ("swa_type",)),
        ("n_seq_max", HUGE, ValueError, ("n_seq_max", str(HUGE)))]:
    row(f"KVCacheISWA({name}={bad!r})", lambda name=name, bad=bad: iswa(**{name: bad}), exc, *words)
row("HybridMemory(attn=5)", lambda: HybridMemory(attn=5, recr=rs()), TypeError, "attn", "int")
row("HybridMemory(recr=kv)", lambda: HybridMemory(attn=kv(), recr=kv()), TypeError, "recr", "KVCache")
row("HybridMemory(n_seq_max differs)", lambda: HybridMemory(attn=kv(n_seq_max=2), recr=rs()), ValueError,
    "n_seq_max", "2", "4")
row("HybridMemory(is_recurrent_layer=[True])", lambda: HybridMemory(attn=kv(), recr=rs(), is_recurrent_layer=[True]),
    ValueError, "is_recurrent_layer", "1")
for bad, exc in [(0, ValueError), (-1, ValueError), (HUGE, ValueError), (1.5, TypeError), (None, TypeError)]:
    row(f"BatchAllocator({bad!r})", lambda bad=bad: BatchAllocator(bad), exc, "n_seq_max", str(bad))
row("BatchAllocator(n_embd=0)", lambda: BatchAllocator(2, n_embd=0), ValueError, "n_embd", "0")
row("BatchAllocator(n_pos_per_embd=9)", lambda: BatchAllocator(2, n_pos_per_embd=9), ValueError, "n_pos_per_embd", "9")

# -- batches -------------------------------------------------------------------------------------
for kw, exc, words in [
        (dict(token=np.array([1.5, 2.5])), TypeError, ("token", "float64")),
        (dict(token=np.zeros((2, 2), np.int32)), ValueError, ("token", "2 dimensions")),
        (dict(token="ab"), TypeError, ("token", "<U2")),
        (dict(token=[1, 2], seq_id=[0]), ValueError, ("seq_id", "1 entries")),
        (dict(token=[1, 2], output=[1]), ValueError, ("output", "1 entries")),
        (dict(token=[1], seq_id=[HUGE]), ValueError, ("seq_id", "int32")),
        (dict(token=[1, 2], pos=np.array([0, HUGE])), ValueError, ("pos", "int32")),
        (dict(embd=np.zeros(3, np.float32)), ValueError, ("embd", "1 dimension"))]:
    row(f"Batch({', '.join(kw)})", lambda kw=kw: Batch(**kw), exc, *words)
for kw, exc, words in [
        (dict(token=[1, 2], pos=[0]), LlmemError, ("pos", "1", "2")),
        (dict(token=[1], seq_id=[4]), LlmemError, ("4",)),
        (dict(token=[1], seq_id=[-1]), LlmemError, ("-1",)),
        (dict(token=[1, 2], seq_id=[[0], []]), LlmemError, ("entry 1", "no sequence")),
        (dict(token=np.zeros(0, np.int32)), LlmemError, ("empty",))]:
    row(f"init_batch(Batch({', '.join(f'{k}={v!r}' for k, v in kw.items())}))",
        lambda kw=kw: kv().init_batch(Batch(**kw), 8), exc, *words)

# -- every memory's methods ----------------------------------------------------------------------
for mname, make in MEMORIES.items():
    is_kv = mname in ("KVCache", "KVCacheISWA")
    calls = [
        ("seq_rm", (HUGE,), ValueError, ("seq_id", str(HUGE))),
        ("seq_rm", ("a",), TypeError, ("seq_id", "str")),
        ("seq_rm", (1.5,), TypeError, ("seq_id", "float")),
        ("seq_rm", (0, HUGE, -1), ValueError, ("p0", str(HUGE))),
        ("seq_rm", (0, 1.0, 2), TypeError, ("p0", "float")),
        ("seq_rm", (0, 0, np.float32(NAN)), TypeError, ("p1", "float")),
        ("seq_cp", (0, 1, "x"), TypeError, ("p0", "str")),
        ("seq_cp", (None, 1), TypeError, ("seq_id_src", "None")),
        ("seq_keep", (None,), TypeError, ("seq_id", "None")),
        ("seq_add", (0, 0, 5, NAN), TypeError, ("shift", "float")),
        ("seq_add", (0, 0, 5, HUGE), ValueError, ("shift", str(HUGE))),
        ("seq_add", (0, 0, 5, 1.5), TypeError, ("shift", "float")),
        ("seq_div", (0, 0, 5, 0), ValueError, ("d", "0")),
        ("seq_div", (0, 0, 5, NAN), TypeError, ("d", "float")),
        ("seq_pos_min", (HUGE,), ValueError, ("seq_id", str(HUGE))),
        ("seq_pos_max", ("a",), TypeError, ("seq_id", "str")),
        ("state_write", ("a",), TypeError, ("seq_id", "str")),
        ("state_write", (0, -1), ValueError, ("flags", "-1")),
        ("state_write", (0, 1.5), TypeError, ("flags", "float")),
        ("state_write", (10**6,), ValueError, ("seq_id", str(10**6))),
        ("state_read", ("abc",), TypeError, ("data", "str")),
        ("state_read", (5,), TypeError, ("int",)),
        ("state_read", (b"", 10**6), ValueError, ("seq_id", str(10**6))),
        ("state_read", (b"", 0, -1), ValueError, ("flags", "-1")),
        ("state_read", (np.zeros(64, np.uint8)[::2],), TypeError, ("data", "contiguous")),
        ("state_size", ("a",), TypeError, ("seq_id", "str")),
        ("state_size", (0, -1), ValueError, ("flags", "-1")),
        ("state_size", (10**6,), ValueError, ("seq_id", str(10**6))),
        ("state_write_into", (b"\0" * 64,), TypeError, ("buffer", "read-only", "bytes")),
        ("state_write_into", (np.zeros(64, np.uint8)[::2],), TypeError, ("buffer", "non-contiguous")),
        ("state_write_into", (np.zeros(64, np.float32),), ValueError, ("buffer", "4 bytes")),
        ("state_write_into", ("abc",), TypeError, ("buffer", "str")),
        ("state_write_into", (bytearray(1),), ValueError, ("buffer", "holds 1 bytes")),
        ("state_write_into", (bytearray(1 << 16), "a"), TypeError, ("seq_id", "str")),
        ("state_write_into", (bytearray(1 << 16), 0, -1), ValueError, ("flags", "-1")),
        ("state_write_into", (bytearray(1 << 16), 10**6), ValueError, ("seq_id", str(10**6))),
        ("init_batch", (5, 4), TypeError, ("balloc_or_batch", "int")),
        ("init_batch", (None, 4), TypeError, ("balloc_or_batch", "NoneType")),
        ("init_batch", ("batch", 0), ValueError, ("n_ubatch", "0")),
        ("init_batch", ("batch", -1), ValueError, ("n_ubatch", "-1")),
        ("init_batch", ("batch", HUGE), ValueError, ("n_ubatch", str(HUGE))),
        ("init_batch", ("batch", 1.5), TypeError, ("n_ubatch", "float")),
        ("init_batch", ("batch", NAN), TypeError, ("n_ubatch", "float")),
        ("save", (5,), TypeError, ("int",)),
    ]
    if is_kv:
        calls += [("seq_rm", (-2,), ValueError, ("seq_id", "-2")),
                  ("seq_cp", (0, 4), ValueError, ("seq_id", "4")),
                  ("seq_keep", (-5,), ValueError, ("seq_id", "-5")),
                  ("seq_pos_max", (256,), ValueError, ("seq_id", "256")),
                  ("k", (99,), ValueError, ("layer", "99")), ("v", ("a",), ValueError, ("layer", "'a'"))]
    if mname == "RecurrentMemory":
        calls += [("r", (99,), ValueError, ("il", "99")), ("s", (1.5,), TypeError, ("il", "float"))]
    for meth, args, exc, words in calls:
        def call(make=make, meth=meth, args=args):
            mem = make()
            return getattr(mem, meth)(*(batch() if isinstance(a, str) and a == "batch" else a for a in args))
        row(f"{mname}.{meth}{args!r}", call, exc, *words)
for meth, args, words in [("seq_rm", (4,), ("seq_id", "4")), ("seq_pos_max", (4,), ("seq_id", "4")),
                          ("seq_add", (4, 0, 5, 1), ("seq_id", "4")), ("state_write", (4,), ("seq_id", "4")),
                          ("seq_cp", (4, 0), ("seq_id", "4"))]:
    row(f"KVCache(unified=False).{meth}{args!r}", lambda meth=meth, args=args: getattr(kv_streams(), meth)(*args),
        ValueError, *words)

# -- contexts: buffers passed in ------------------------------------------------------------------
for name, value, exc, words in [
        ("int_dtype", np.zeros((3, 8), np.int32), TypeError, ("k_cur", "int32")),
        ("bool_dtype", np.zeros((3, 8), bool), TypeError, ("k_cur", "bool")),
        ("complex_dtype", np.zeros((3, 8), np.complex64), TypeError, ("k_cur", "complex64")),
        ("object_dtype", np.zeros((3, 8), object), TypeError, ("k_cur", "object")),
        ("wrong_width", np.zeros((3, 7), np.float16), ValueError, ("k_cur", "(3, 7)")),
        ("wrong_tokens", np.zeros((2, 8), np.float16), ValueError, ("k_cur", "(2, 8)")),
        ("flat", np.zeros(24, np.float16), ValueError, ("k_cur", "(24,)")),
        ("string", "x", ValueError, ("k_cur", "()")),
        ("none", None, ValueError, ("k_cur", "()"))]:
    row(f"cpy_k({name})", lambda value=value: kv_context().cpy_k(0, value), exc, *words)
    v_words = tuple(w.replace("k_cur", "v_cur") for w in words)
    row(f"cpy_v({name})", lambda value=value: kv_context().cpy_v(0, value), exc, *v_words)
row("cpy_k(il=5)", lambda: kv_context().cpy_k(5, np.zeros((3, 8), np.float16)), ValueError, "layer", "5")
row("cpy_v(il='a')", lambda: kv_context().cpy_v("a", np.zeros((3, 8), np.float16)), ValueError, "layer", "'a'")
row("get_k(il=9)", lambda: kv_context().get_k(9), ValueError, "layer", "9")
for which in ("s", "r"):
    width = 6 if which == "s" else 4
    for name, value, exc, words in [
            ("float64", np.zeros((2, width), np.float64), TypeError, ("float64",)),
            ("int32", np.zeros((2, width), np.int32), TypeError, ("int32",)),
            ("wrong_width", np.zeros((2, width - 1), np.float32), ValueError, (f"(2, {width - 1})",)),
            ("wrong_rows", np.zeros((3, width), np.float32), ValueError, (f"(3, {width})",)),
            ("too_many_planes", np.zeros((5, 2, width), np.float32), ValueError, (f"(5, 2, {width})",)),
            ("no_planes", np.zeros((0, 2, width), np.float32), ValueError, (f"(0, 2, {width})",)),
            ("flat", np.zeros(2 * width, np.float32), ValueError, (f"({2 * width},)",)),
            ("non_contiguous", np.zeros((2, 2 * width), np.float32)[:, ::2], ValueError, ("C-contiguous",)),
            ("transposed", np.zeros((width, 2), np.float32).T, ValueError, ("C-contiguous",)),
            ("list", [[0.0] * width] * 2, TypeError, ("list",))]:
        row(f"store_{which}({name})", lambda which=which, value=value: getattr(rs_context(), f"store_{which}")(0, value),
            exc, f"new {which} states", *words)
    row(f"get_{which}(il=9)", lambda which=which: getattr(rs_context(), f"get_{which}")(9), ValueError, "il", "9")
    row(f"get_{which}(il='a')", lambda which=which: getattr(rs_context(), f"get_{which}")("a"), TypeError, "il", "str")
row("s_copy(i=-1)", lambda: rs_context().s_copy(-1), ValueError, "i", "-1")
row("s_copy(i=99)", lambda: rs_context().s_copy(99), ValueError, "i", "99")
row("HybridMemory.is_recurrent_layer(7)", lambda: hybrid().is_recurrent_layer(7), ValueError, "il", "7")


def test_table_covers_the_api():
    assert len(ROWS) >= 300


@pytest.mark.parametrize("call, exc, words", ROWS)
def test_bad_argument_is_named(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, (ValueError, TypeError, LlmemError))
    message = str(info.value)
    assert "incompatible function arguments" not in message  # pybind11's generic message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
