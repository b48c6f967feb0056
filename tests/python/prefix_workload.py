"""A serving workload for the prefix cache: multi-turn chats over shared system prompts, and
branching requests, decoded through ``llmem.PrefixCache`` on a toy model, every output checked
against ``forward_full``."""

from __future__ import annotations

import dataclasses
from typing import List

import numpy as np

import llmem
from toy_session import TOL


@dataclasses.dataclass
class Chat:
    prompt: List[int]
    answer: int                  # tokens to generate
    follow_ups: List[List[int]]  # user turns appended after each answer
    history: List[int] = dataclasses.field(default_factory=list)
    turn: int = 0
    seq: int = -1
    pending: List[int] = dataclasses.field(default_factory=list)
    chunks: list = dataclasses.field(default_factory=list)
    generated: int = 0
    outputs: list = dataclasses.field(default_factory=list)  # (history index, logits)
    done: bool = False


def make_workload(rng, n_vocab: int, n_chats: int = 6, n_system: int = 2) -> List[Chat]:
    systems = [list(map(int, rng.integers(0, n_vocab, int(rng.integers(18, 30))))) for _ in range(n_system)]
    chats = []
    for i in range(n_chats):
        sys_prompt = systems[i % n_system]
        user = list(map(int, rng.integers(0, n_vocab, int(rng.integers(3, 9)))))
        turns = [list(map(int, rng.integers(0, n_vocab, int(rng.integers(2, 6))))) for _ in range(int(rng.integers(0, 3)))]
        chats.append(Chat(sys_prompt + user, int(rng.integers(3, 7)), turns))
    # branching: the same conversation continued two ways
    base = chats[0]
    chats.append(Chat(list(base.prompt), 4, []))
    chats.append(Chat(list(base.prompt) + [int(rng.integers(0, n_vocab))], 3, []))
    return chats


def serve(model, memory, cache, chats: List[Chat], rng, n_batch: int = 16, n_ubatch: int = 8,
          parallel: int = 3, check=None) -> dict:
    """Serve every chat turn by turn, ``parallel`` requests at a time, one decode call per
    request per step (so live requests interleave). Returns token counts."""
    waiting = list(chats)
    for c in chats:
        c.history = list(c.prompt)
    active: List[Chat] = []
    counts = {"decoded": 0, "without_cache": 0, "hit": 0, "requests": 0}
    while waiting or active:
        while waiting and len(active) < parallel:
            c = waiting.pop(0)
            c.seq, n_cached = cache.admit(c.history)
            counts["hit"] += n_cached
            counts["requests"] += 1
            counts["without_cache"] += len(c.history)
            c.chunks = cache.prefill_chunks(c.seq, c.history[n_cached:], n_batch)
            c.generated = 0
            active.append(c)
        for c in list(active):
            chunk = c.chunks.pop(0)
            batch = llmem.Batch(token=np.asarray(chunk, np.int32), seq_id=np.full(len(chunk), c.seq, np.int32),
                                output=np.arange(len(chunk)) == len(chunk) - 1)
            ctx = cache.init_batch(batch, n_ubatch)
            assert ctx.status == llmem.Status.SUCCESS, ctx.status
            logits = model.decode(batch, memory, n_ubatch)
            counts["decoded"] += len(chunk)
            cache.commit(c.seq, chunk)
            if c.chunks:
                continue
            n_in = cache.tokens(c.seq).size
            c.outputs.append((n_in - 1, logits[0]))
            token = int(np.argmax(logits[0] + rng.gumbel(size=logits.shape[1])))
            c.generated += 1
            c.history.append(token)
            if c.generated < c.answer:
                c.chunks = [[token]]
                continue
            cache.release(c.seq)
            active.remove(c)
            counts["without_cache"] += c.answer - 1
            if c.turn < len(c.follow_ups):
                c.history += c.follow_ups[c.turn]
                c.turn += 1
                waiting.append(c)
            if check is not None:
                check()
    return counts


def verify(model, chats: List[Chat]) -> float:
    worst = 0.0
    for c in chats:
        ref = model.forward_full(c.history)
        for i, row in c.outputs:
            np.testing.assert_allclose(row, ref[i], **TOL)
            worst = max(worst, float(np.abs(row - ref[i]).max()))
    return worst
