"""A server process of the store tests (run by test_store.py with subprocess): a toy model and a
memory behind a Redis store.

    python store_worker.py serve ARCH SOCKET OUT.json          serve a workload through a tiered
                                                                 PrefixCache, verify, spill all
    python store_worker.py put ARCH SOCKET OUT.npz KEY          decode a sequence, put it, go on
    python store_worker.py get ARCH SOCKET OUT.npz KEY          get the sequence, go on the same way
    python store_worker.py write SOCKET DIR                     put large values forever (killed)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llmem  # noqa: E402
from llmem.store import DiskStore, PrefixStore, RedisStore  # noqa: E402
from llmem.toy import ToyHybrid, ToyRecurrent, ToyTransformer  # noqa: E402

BLOCK = 8


def model_of(arch: str):
    if arch == "transformer":
        return ToyTransformer(seed=1)
    if arch == "iswa":
        return ToyTransformer.iswa(seed=2, n_swa=5)
    if arch == "recurrent":
        return ToyRecurrent(seed=3)
    if arch == "hybrid":
        return ToyHybrid(seed=4)
    raise SystemExit(f"unknown arch {arch}")


def memory_of(arch: str, model, n_ctx: int = 256, n_seq_max: int = 24):
    if arch == "recurrent":
        return model.new_memory(n_seq_max=4)
    if arch == "iswa":
        return model.new_memory(n_ctx, n_seq_max, n_ubatch=8)
    return model.new_memory(n_ctx, n_seq_max)


def serve(arch: str, socket: str, out: str) -> None:
    from prefix_workload import make_workload
    from prefix_workload import serve as serve_chats
    from prefix_workload import verify

    model = model_of(arch)
    memory = memory_of(arch, model)
    tier = PrefixStore(RedisStore(unix_socket_path=socket), f"toy-{arch}", memory, block_size=BLOCK)
    cache = llmem.PrefixCache(memory, n_requests=3, checkpoint_interval=BLOCK, store=tier)
    rng = np.random.default_rng(21)
    chats = make_workload(rng, model.config.n_vocab)
    counts = serve_chats(model, memory, cache, chats, rng)
    worst = verify(model, chats)  # raises on any difference beyond float32 rounding
    cache.clear()  # a server going down: everything is evicted, so spilled
    assert tier.flush(30)
    stats = cache.stats()
    with open(out, "w") as f:
        json.dump({"worst": worst, "decoded": counts["decoded"], "hit": counts["hit"],
                   "store_hits": stats["store_hits"], "store_hit_tokens": stats["store_hit_tokens"],
                   "store_spills": stats["store_spills"], "tier": dict(tier.stats()),
                   "store": dict(tier.store.stats())}, f)
    tier.close()


def sequence(arch: str, socket: str, out: str, key: str, mode: str) -> None:
    """put: decode a prompt and 3 tokens into sequence 0, put it under ``key``, then decode 5 more
    tokens; get: restore ``key`` into sequence 1 of a fresh memory and decode the same 5 tokens.
    Both write the logits of those 5 steps and the whole history."""
    model = model_of(arch)
    memory = memory_of(arch, model, n_seq_max=4)
    store = RedisStore(unix_socket_path=socket)
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, model.config.n_vocab, 19)]
    tail = [int(t) for t in rng.integers(0, model.config.n_vocab, 5)]

    def step(seq: int, tokens: list) -> np.ndarray:
        batch = llmem.Batch(token=np.asarray(tokens, np.int32), seq_id=np.full(len(tokens), seq, np.int32),
                            output=np.arange(len(tokens)) == len(tokens) - 1)
        return model.decode(batch, memory)[0]

    if mode == "put":
        seq = 0
        history = list(prompt)
        logits = step(seq, prompt)
        for _ in range(3):
            t = int(np.argmax(logits))
            history.append(t)
            logits = step(seq, [t])
        assert store.put_sequence(memory, seq, key)
    else:
        seq = 1
        n = store.get_sequence(memory, seq, key)
        assert n is not None, store.stats()
        assert memory.seq_pos_max(seq) == n - 1
        with open(out + ".history") as f:  # the prompt and the 3 tokens the first process generated
            history = json.load(f)
    if mode == "put":
        with open(out + ".history", "w") as f:
            json.dump(history, f)
    rows = []
    for t in tail:
        rows.append(step(seq, [t]))
        history.append(t)
    np.savez(out, logits=np.stack(rows), history=np.asarray(history))


def write_forever(socket: str, directory: str) -> None:
    """Put large values (in small chunks, so a write takes many commands) into Redis and files
    into a directory, forever: the test kills this process with SIGKILL at a random moment."""
    redis_store = RedisStore(unix_socket_path=socket, chunk_bytes=4096, socket_timeout=5)
    disk = DiskStore(directory)
    model = ToyTransformer(seed=1)
    memory = model.new_memory(512, 2)
    tokens = np.arange(300, dtype=np.int32) % model.config.n_vocab
    model.decode(llmem.Batch(token=tokens, seq_id=np.zeros(300, np.int32)), memory)
    i = 0
    while True:
        key = f"kill-test:{i % 4}"
        assert redis_store.put_sequence(memory, 0, key)
        assert disk.put_sequence(memory, 0, key)
        if i == 3:
            print("ready", flush=True)
        i += 1


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    elif mode in ("put", "get"):
        sequence(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], mode)
    elif mode == "write":
        write_forever(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode}")
