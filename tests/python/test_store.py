"""llmem.store: state stores (host memory, a directory, Redis), content keys, sequence hand-over,
the tiered prefix cache, and faults (a killed writer, Redis stopped and restarted, corrupt and
foreign values).

Redis: a private ``redis-server`` on a unix socket, started by a session fixture
(``scripts/test.sh`` installs Debian's package when it runs as root); the Redis tests are skipped
with a message only where ``redis-server`` is truly absent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import llmem
from llmem.store import AsyncWriter, DiskStore, MemoryStore, PrefixKeys, PrefixStore, RedisStore, StateStore
from llmem.store.base import pack_value, unpack_value
from llmem.toy import ToyHybrid, ToyRecurrent, ToyTransformer
from prefix_workload import make_workload, serve, verify
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.redis_server import RedisServer, find_redis_server  # noqa: E402
from toy_session import TOL

HERE = Path(__file__).resolve().parent
WORKER = HERE / "store_worker.py"


def started_redis_server() -> RedisServer:
    """A redis-server of its own, started (the test is skipped without the client or the server)."""
    pytest.importorskip("redis", reason="the redis client (llmem[redis]) is not installed")
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs Debian's redis-server as root)")
    server = RedisServer()
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server():
    server = started_redis_server()
    yield server
    server.close()


@pytest.fixture
def own_redis_server():
    """A server for one test, which stops, restarts or freezes it."""
    server = started_redis_server()
    yield server
    server.close()


@pytest.fixture
def redis_store(redis_server):
    store = RedisStore(unix_socket_path=redis_server.socket)
    store.client.flushdb()
    yield store
    store.close()


@pytest.fixture(params=["memory", "disk", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        yield MemoryStore(1 << 24)
    elif request.param == "disk":
        yield DiskStore(tmp_path / "store", 1 << 24)
    else:
        yield request.getfixturevalue("redis_store")


MODELS = {
    "transformer": ToyTransformer(seed=1),
    "iswa": ToyTransformer.iswa(seed=2, n_swa=5),
    "recurrent": ToyRecurrent(seed=3),
    "hybrid": ToyHybrid(seed=4),
}


def new_memory(kind: str, n_ctx: int = 256, n_seq_max: int = 24):
    model = MODELS[kind]
    if kind == "recurrent":
        return model.new_memory(n_seq_max=4)
    if kind == "iswa":
        return model.new_memory(n_ctx, n_seq_max, n_ubatch=8)
    return model.new_memory(n_ctx, n_seq_max)


def decode(model, memory, seq: int, tokens) -> np.ndarray:
    tokens = list(tokens)
    batch = llmem.Batch(token=np.asarray(tokens, np.int32), seq_id=np.full(len(tokens), seq, np.int32),
                        output=np.arange(len(tokens)) == len(tokens) - 1)
    return model.decode(batch, memory)[0]


# -- keys ---------------------------------------------------------------------------------------------


def test_keys_are_chained_block_hashes_the_same_in_another_process():
    memory = new_memory("transformer")
    keys = PrefixKeys("toy", memory, block_size=4)
    tokens = list(range(11))
    ks = keys.block_keys(tokens)
    assert len(ks) == 2 and all(k.startswith(f"llmem:{keys.namespace}:") for k in ks)
    assert keys.block_keys(tokens[:8] + [99, 98, 97, 96]) [:2] == ks      # a shared prefix: the same keys
    assert keys.block_keys([0, 1, 2, 3, 5, 5, 6, 7])[1] != ks[1]          # one token differs in block 2
    assert keys.block_keys([9, 1, 2, 3, 4, 5, 6, 7])[1] != ks[1]          # block 1 differs: chained
    assert keys.block_keys(tokens, extra="adapter-a") != ks
    assert keys.block_keys(tokens, extra="adapter-a") == keys.block_keys(tokens, extra="adapter-a")
    assert PrefixKeys("other", memory, 4).block_keys(tokens) != ks
    assert PrefixKeys("toy", memory, 2).block_keys(tokens)[1] != ks[0]
    assert PrefixKeys("toy", new_memory("transformer", n_ctx=128), 4).block_keys(tokens) != ks  # config
    assert keys.key(tokens[:3]) is None and keys.key(tokens) == ks[-1]
    code = ("import sys; sys.path.insert(0, %r); import llmem; from test_store import new_memory; "
            "from llmem.store import PrefixKeys; print(PrefixKeys('toy', new_memory('transformer'), 4)"
            ".block_keys(list(range(11)))[-1])" % str(HERE))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip().splitlines()[-1] == ks[-1]  # (an editable install may log a rebuild first)


def test_keys_refuse_bad_arguments():
    memory = new_memory("transformer")
    with pytest.raises(ValueError, match="model_id"):
        PrefixKeys("", memory)
    with pytest.raises(ValueError, match="block_size"):
        PrefixKeys("m", memory, 0)
    with pytest.raises(TypeError, match="memory"):
        PrefixKeys("m", object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="extra key"):
        PrefixKeys("m", memory).block_keys([1] * 20, extra=1.5)  # type: ignore[arg-type]


# -- backends -------------------------------------------------------------------------------------------


def test_backend_put_get_delete_contains(store: StateStore):
    assert store.get("a") is None
    assert store.put("a", b"x" * 100) and store.put("b", bytearray(b"yz"))
    assert store.get("a") == b"x" * 100 and store.get("b") == b"yz"
    assert store.contains(["a", "c", "b"]) == [True, False, True]
    store.put("a", b"new")
    assert store.get("a") == b"new"
    store.delete("a")
    store.delete("a")
    assert store.get("a") is None and store.contains(["a"]) == [False]
    s = store.stats()
    assert s["puts"] == 3 and s["hits"] == 3 and s["misses"] == 2 and s["errors"] == 0
    with pytest.raises(TypeError):
        store.put(1, b"")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.get("")


def test_memory_store_is_lru_by_bytes():
    store = MemoryStore(max_bytes=250)
    for k in "abc":
        assert store.put(k, bytes(100)) or k == "c"
    assert store.stats()["held_bytes"] <= 250
    assert store.get("a") is None and store.get("c") is not None  # a (least recently used) went
    store.get("b")
    store.put("d", bytes(100))                                   # c is older than b now
    assert store.get("c") is None and store.get("b") is not None
    assert not store.put("huge", bytes(251)) and store.stats()["evictions"] == 2


def test_disk_store_is_bounded_and_atomic(tmp_path):
    store = DiskStore(tmp_path, max_bytes=1000, fsync=False)
    for i in range(30):
        assert store.put(f"k{i}", bytes([i]) * 100)
        time.sleep(0.002)  # distinct mtimes: the LRU order
    held = sum(p.stat().st_size for p in tmp_path.glob("*.llmem"))
    assert held <= 1000 and store.stats()["held_bytes"] == held and store.stats()["evictions"] > 0
    assert store.get("k29") == bytes([29]) * 100 and store.get("k0") is None
    assert not list(tmp_path.glob(".tmp-*"))
    # a writer's leftover temporary file is never read, and an old one is cleaned up
    (tmp_path / ".tmp-dead").write_bytes(b"half")
    os.utime(tmp_path / ".tmp-dead", (0, 0))
    DiskStore(tmp_path, max_bytes=1000)
    assert not (tmp_path / ".tmp-dead").exists()


def test_redis_store_chunked_values_are_published_whole(redis_store):
    chunked = RedisStore(unix_socket_path=redis_store.client.connection_pool.connection_kwargs["path"],
                         chunk_bytes=1000, ttl=60)
    value = os.urandom(10_500)
    assert chunked.put("big", value)
    assert chunked.get("big") == value
    assert 0 < chunked.client.pttl("big") <= 60_000
    assert [k for k in chunked.client.keys("*") if b":tmp:" in k] == []
    assert not chunked.put("too-big", bytes(2000)) or chunked.max_value_bytes >= 2000


# -- sequences -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_sequence_hand_over_continues_exactly(kind, store):
    model = MODELS[kind]
    a, b = new_memory(kind), new_memory(kind)
    rng = np.random.default_rng(3)
    prompt = list(map(int, rng.integers(0, model.config.n_vocab, 21)))
    decode(model, a, 0, prompt)
    assert store.put_sequence(a, 0, "seq:chat-7")
    assert store.get_sequence(b, 1, "seq:chat-7") == len(prompt)
    assert b.seq_pos_max(1) == len(prompt) - 1
    history = list(prompt)
    for t in rng.integers(0, model.config.n_vocab, 4):
        history.append(int(t))
        la, lb = decode(model, a, 0, [int(t)]), decode(model, b, 1, [int(t)])
        np.testing.assert_array_equal(la, lb)  # the same state: the same arithmetic
        np.testing.assert_allclose(lb, model.forward_full(history)[-1], **TOL)
    assert store.get_sequence(b, 2, "seq:absent") is None


def test_refused_values_are_deleted_and_leave_the_memory_as_it_was(store, caplog):
    model = MODELS["transformer"]
    a = new_memory("transformer")
    decode(model, a, 0, range(20))
    store.put_sequence(a, 0, "good")
    good = store.get("good")
    assert good is not None
    b = new_memory("transformer")
    decode(model, b, 2, range(5))
    before = b.state_write(-1)

    def refused(key: str, value: bytes) -> None:
        store.put(key, value)
        with caplog.at_level(logging.WARNING, logger="llmem"):
            assert store.get_sequence(b, 2, key) is None
        assert store.get(key) is None, "a refused value must be deleted"
        assert b.state_write(-1) == before
        assert "refused" in caplog.text

    corrupt = bytearray(good)
    corrupt[-7] ^= 0x40                          # a K/V byte: the state's CRC catches it
    refused("corrupt", bytes(corrupt))
    refused("truncated", good[:len(good) // 2])
    refused("moved", good)                       # written under another key than its own
    refused("garbage", b"not a state at all")
    other = new_memory("transformer", n_ctx=128)  # another configuration: the header says so
    decode(model, other, 0, range(20))
    refused("foreign", pack_value("foreign", other.state_write(0, llmem.STATE_HEADER), 20))
    rec = new_memory("recurrent")
    decode(MODELS["recurrent"], rec, 0, range(20))
    refused("kind", pack_value("kind", rec.state_write(0, llmem.STATE_HEADER), 20))
    assert store.stats()["refused"] == 6
    assert store.get_sequence(b, 3, "good") == 20


def test_llama_cpp_reads_the_stored_bytes(store):
    """llama-cpp-python 0.3.36 (the bench extra) restores a sequence put into the store, with
    llama_state_seq_set_data, once the store's envelope and llmem's header are taken off."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")
    pytest.importorskip("gguf", reason="gguf writes the bench's model")
    sys.path.insert(0, str(HERE.parents[1]))
    from bench import llama_baseline

    if not llama_baseline.available():
        pytest.skip(f"llama_cpp unusable: {llama_baseline.unavailable_reason()}")
    twin = llmem.from_gguf(str(llama_baseline.model_path()), n_ctx=256, n_seq_max=4, n_ubatch=4, n_batch=4,
                           flash_attn=True, compat="b11312")
    n = 37
    batch = llmem.Batch(token=np.arange(n, dtype=np.int32) % 32, seq_id=np.full(n, 2, np.int32))
    for ub in twin.init_batch(batch, 64):
        pass
    assert store.put_sequence(twin, 2, "handover:llama")
    value = store.get("handover:llama")
    assert value is not None
    _, state = unpack_value("handover:llama", value)
    from llmem.statefile import read_state_header

    header = read_state_header(bytes(state))
    raw = bytes(state[header["header_bytes"]:])
    assert raw == twin.state_write(2)                 # the payload is llama.cpp's bytes
    lm = llama_baseline.LlamaMemory(256, 4)
    try:
        lm.load_blob(2, raw)                          # llama_state_seq_set_data
        assert lm.seq_pos_min(2) == 0 and lm.seq_pos_max(2) == n - 1
        import ctypes

        buf = (ctypes.c_uint8 * lm.state_size(2))()
        written = lm.state_get(2, buf)                # and writes the same sequence back
        back = bytes(buf)[8:written]                  # (after its context header: magic, seq id)
        assert back == raw
    finally:
        lm.close()


# -- the tiered prefix cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_tiered_prefix_cache_restores_what_another_cache_spilled(kind):
    model = MODELS[kind]
    store = MemoryStore(1 << 26)
    outputs = []
    for run in range(2):
        memory = new_memory(kind)
        tier = PrefixStore(store, f"toy-{kind}", memory, block_size=8, asynchronous=run == 0)
        cache = llmem.PrefixCache(memory, n_requests=3, checkpoint_interval=8, store=tier)
        rng = np.random.default_rng(31)
        chats = make_workload(rng, model.config.n_vocab)
        counts = serve(model, memory, cache, chats, rng, check=cache.check)
        verify(model, chats)
        cache.clear()
        assert tier.flush(30)
        cache.check()
        stats = cache.stats()
        outputs.append((counts, stats, tier.stats()))
        tier.close()
    (c0, s0, t0), (c1, s1, t1) = outputs
    assert s0["store_spills"] > 0 and t0["spills"] == s0["store_spills"]
    assert s1["store_hits"] > 0 and s1["store_hit_tokens"] >= 8 and t1["hits"] == s1["store_hits"]
    assert c1["decoded"] < c0["decoded"], (c0, c1)  # the second server decoded less
    assert store.stats()["refused"] == 0


def test_prefix_cache_refuses_a_store_of_another_memory():
    memory = new_memory("transformer")
    tier = PrefixStore(MemoryStore(), "m", new_memory("transformer", n_ctx=128), asynchronous=False)
    with pytest.raises(ValueError, match="configuration"):
        llmem.PrefixCache(memory, store=tier)
    with pytest.raises(TypeError, match="PrefixStore"):
        llmem.PrefixCache(memory, store=MemoryStore())  # type: ignore[arg-type]


def test_a_corrupt_stored_prefix_is_recomputed():
    model = MODELS["transformer"]
    store = MemoryStore()
    memory = new_memory("transformer")
    tier = PrefixStore(store, "toy", memory, block_size=8, asynchronous=False)
    cache = llmem.PrefixCache(memory, n_requests=2, store=tier)
    prompt = list(range(3, 40))
    seq, _ = cache.admit(prompt)
    decode(model, memory, seq, prompt)
    cache.commit(seq, prompt)
    cache.release(seq)
    cache.clear()
    key = tier.keys.block_keys(prompt)[-1]
    value = bytearray(store.get(key) or b"")
    value[-3] ^= 1
    store.put(key, bytes(value))
    seq, n_cached = cache.admit(prompt)
    assert n_cached < 32 and store.get(key) is None and tier.stats()["refused"] == 1
    logits = decode(model, memory, seq, prompt[n_cached:])
    np.testing.assert_allclose(logits, model.forward_full(prompt)[-1], **TOL)


def test_async_writer_drops_when_full_and_counts():
    class Slow(MemoryStore):
        def _put(self, key: str, value: bytes) -> bool:
            time.sleep(0.2)
            return super()._put(key, value)

    writer = AsyncWriter(Slow(), max_queue=2)
    results = [writer.submit(f"k{i}", b"v") for i in range(6)]
    assert results[:2] == [True, True] and not all(results)
    assert writer.flush(10)
    s = writer.stats()
    assert s["dropped"] == results.count(False) and s["written"] == results.count(True) and s["queued"] == 0
    writer.close()
    assert not writer.submit("late", b"v")


# -- processes sharing one Redis ----------------------------------------------------------------------------


def run_worker(*args: str, timeout: float = 300) -> None:
    out = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("arch", ["transformer", "hybrid"])
def test_two_servers_share_prefixes_through_redis(arch, redis_store, redis_server, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    run_worker("serve", arch, redis_server.socket, str(first))
    run_worker("serve", arch, redis_server.socket, str(second))
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    # each verified every output against forward_full (the worker raises otherwise)
    assert a["store_spills"] > 0 and a["store"]["puts"] > 0
    assert b["store_hits"] > 0 and b["store_hit_tokens"] > 0, b
    assert b["decoded"] < a["decoded"], (a, b)
    assert a["store"]["refused"] == b["store"]["refused"] == 0


@pytest.mark.parametrize("arch", ["transformer", "iswa", "recurrent", "hybrid"])
def test_a_sequence_started_in_one_process_finishes_in_another(arch, redis_store, redis_server, tmp_path):
    out_a, out_b = tmp_path / "a.npz", tmp_path / "b.npz"
    run_worker("put", arch, redis_server.socket, str(out_a), f"seq:{arch}")
    (tmp_path / "b.npz.history").write_text((tmp_path / "a.npz.history").read_text())
    run_worker("get", arch, redis_server.socket, str(out_b), f"seq:{arch}")
    a, b = np.load(out_a), np.load(out_b)
    np.testing.assert_array_equal(a["history"], b["history"])
    # the same state: the same outputs (a restore may place the cells in another order, so
    # attention may sum in another order: equal within float32 rounding, the same tokens)
    np.testing.assert_allclose(a["logits"], b["logits"], **TOL)
    np.testing.assert_array_equal(a["logits"].argmax(axis=1), b["logits"].argmax(axis=1))
    model = MODELS[arch]
    ref = model.forward_full(list(map(int, b["history"])))
    np.testing.assert_allclose(b["logits"], ref[-len(b["logits"]):], **TOL)


# -- faults -------------------------------------------------------------------------------------------------


def test_a_killed_writer_never_leaves_a_readable_half_value(redis_store, redis_server, tmp_path):
    directory = tmp_path / "disk"
    rng = np.random.default_rng(0)
    memory = new_memory("transformer", n_ctx=512, n_seq_max=2)
    disk = None
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, str(WORKER), "write", redis_server.socket, str(directory)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        seen = []
        while not seen or seen[-1] not in ("ready", ""):  # (an editable install may log a rebuild first)
            seen.append(proc.stdout.readline().strip() if proc.stdout.readable() else "")
        assert seen[-1] == "ready", "\n".join(seen) + proc.stderr.read()
        time.sleep(float(rng.uniform(0.01, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()  # (reaps it and closes the pipes)
        disk = DiskStore(directory, stale_seconds=0)  # what the next process sees
        for store in (redis_store, disk):
            for i in range(4):
                n = store.get_sequence(memory, 1, f"kill-test:{i}")
                assert n == 300, (store, i, store.stats())  # whole, never a part
            assert store.stats()["refused"] == 0
    assert disk is not None and not list(directory.glob(".tmp-*"))


def test_redis_stopped_and_restarted_mid_run(tmp_path, caplog, own_redis_server):
    server = own_redis_server
    model = MODELS["transformer"]
    store = RedisStore(unix_socket_path=server.socket, backoff=0.05, max_backoff=0.2)
    memory = new_memory("transformer")
    tier = PrefixStore(store, "toy", memory, block_size=8)
    cache = llmem.PrefixCache(memory, n_requests=3, store=tier)
    rng = np.random.default_rng(41)
    chats = make_workload(rng, model.config.n_vocab)
    serve(model, memory, cache, chats[:4], rng)
    cache.clear()
    assert tier.flush(10) and store.stats()["puts"] > 0
    with caplog.at_level(logging.WARNING, logger="llmem"):
        server.stop()
        # serving goes on without the tier: every output still exact
        serve(model, memory, cache, chats[4:], rng)
        verify(model, chats[4:])
        cache.clear()
        tier.flush(10)
        assert store.stats()["errors"] > 0 and not store.up
        assert "serving without the store tier" in caplog.text
        server.start()
        time.sleep(0.3)  # past the backoff
        ok = [store.put("after", b"1") for _ in range(3)]
        assert any(ok) and store.up and store.get("after") == b"1"
        assert "reachable again" in caplog.text
    # the tier works again: a fresh cache finds prefixes spilled after the restart
    memory2 = new_memory("transformer")
    cache.clear()
    for c in chats[:2]:
        seq, n = cache.admit(c.history)
        decode(model, memory, seq, c.history[n:])
        cache.commit(seq, c.history[n:])
        cache.release(seq)
    cache.clear()
    assert tier.flush(10)
    tier2 = PrefixStore(store, "toy", memory2, block_size=8, asynchronous=False)
    cache2 = llmem.PrefixCache(memory2, n_requests=3, store=tier2)
    seq, n = cache2.admit(chats[0].history)
    assert n >= 8 and cache2.stats()["store_hits"] == 1
    logits = decode(model, memory2, seq, chats[0].history[n:])
    np.testing.assert_allclose(logits, model.forward_full(chats[0].history)[-1], **TOL)
    tier.close()


def test_a_slow_or_absent_redis_costs_one_short_timeout(tmp_path):
    pytest.importorskip("redis", reason="the redis client (llmem[redis]) is not installed")
    store = RedisStore(unix_socket_path=str(tmp_path / "nobody.sock"), backoff=10)
    t0 = time.monotonic()
    assert store.get("k") is None and not store.put("k", b"v") and store.contains(["k"]) == [False]
    for _ in range(100):
        store.get("k")
    assert time.monotonic() - t0 < 5  # (not a timing claim: one failed connect, then no network)
    s = store.stats()
    assert s["errors"] == 1 and s["misses"] == 101 and s["put_failed"] == 1


def test_a_hung_redis_times_out_once_then_is_bypassed_until_it_answers(caplog, own_redis_server):
    """A server that stops answering (SIGSTOP: connections stay open, no reply comes) costs one
    socket timeout; the store then answers "not there" without the network until its backoff
    ends, and works again once the server does."""
    server = own_redis_server
    store = RedisStore(unix_socket_path=server.socket, socket_timeout=0.2, backoff=30)
    assert store.put("k", b"v") and store.get("k") == b"v"
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="llmem"):
            assert store.get("k") is None          # one timeout
            for _ in range(50):                     # then no network while backing off
                assert store.get("k") is None and not store.put("k2", b"v")
        s = store.stats()
        assert s["errors"] == 1 and s["misses"] == 51 and s["put_failed"] == 50 and not store.up
        assert "serving without the store tier" in caplog.text
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert store.ping() and store.up                # a probe ends the backoff
    assert store.get("k") == b"v"
