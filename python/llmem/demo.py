"""``llmem demo``: a simulated LLM server whose outputs prove cached decoding exact.

Clients with random prompts and answer lengths share a system prompt; some come back for more
turns (multi-turn chats). The server decodes them with continuous batching through a toy model
(:mod:`llmem.toy`) on an llmem memory behind a :class:`llmem.PrefixCache`: the system prompt is
decoded once and every request reuses the longest cached prefix of its history (the system prompt,
the previous turns), prompts are cut into micro-batches by the memory, one long conversation gets a
context shift, one is saved, dropped and restored.
At the end a sample of the outputs is recomputed from scratch with ``forward_full``; any
difference beyond float32 rounding fails the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

import numpy as np

from .batch import Batch
from .prefix import PrefixCache
from .status import Status
from .toy import ARCHS, SSM, ToyModel, make_model

__all__ = ["DemoReport", "run_demo", "format_report", "add_arguments", "main"]

#: the exactness criterion: float32 rounding in a different summation order stays far below it
RTOL, ATOL = 1e-4, 1e-5

SYSTEM_PROMPT_LEN = 24


@dataclasses.dataclass
class _Request:
    index: int
    prompt: List[int]
    answer_len: int
    follow_ups: List[List[int]] = dataclasses.field(default_factory=list)  # user tokens of later turns
    turn: int = 0
    next_turn: bool = False
    seq: int = -1
    history: List[int] = dataclasses.field(default_factory=list)  # every token fed, in order
    pending: List[int] = dataclasses.field(default_factory=list)  # tokens still to decode
    n_fed: int = 0
    generated: int = 0
    outputs: List[Any] = dataclasses.field(default_factory=list)        # (history index, logits)
    comparable_until: Optional[int] = None   # outputs at this index and later are not comparable
    parked: int = 0                           # steps left while its state is saved away
    shifted: bool = False
    saved: Optional[bytes] = None
    done: bool = False


@dataclasses.dataclass
class DemoReport:
    """What the simulated server did and what the verification found."""

    arch: str
    model: str
    memory: str
    clients: int
    parallel: int
    n_ctx: int
    seed: int
    system_prompt: int = 0
    backend: str = "numpy"        # the model's math: numpy, or torch on a device
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decoded_tokens: int = 0
    steps: int = 0
    peak_cells: int = 0
    cells: int = 0
    peak_recurrent_cells: int = 0
    holders: int = 0             # sequence ids the prefix cache holds cached content with
    requests: int = 0            # turns served (a multi-turn chat is several requests)
    request_tokens: int = 0      # tokens of the histories the requests were admitted with
    hit_tokens: int = 0          # of them, found in the prefix cache
    evictions: int = 0
    checkpoints: int = 0
    checkpoint_bytes: int = 0
    recurrent_cells: int = 0
    state_bytes: int = 0
    shift: str = "none"
    save_restore: str = "none"
    llmem_s: float = 0.0
    model_s: float = 0.0
    wall_s: float = 0.0
    verified_requests: int = 0
    verified_rows: int = 0
    max_error: float = 0.0
    failures: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.verified_rows > 0


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.stream = total, stream
        self.enabled = enabled and stream.isatty()

    def update(self, done: int, step: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(1, self.total))
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                          f"requests, step {step}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _new_memory(model: ToyModel, arch: str, n_ctx: int, n_seq_max: int, n_ubatch: int) -> Any:
    if arch == "iswa":
        # a full-size window cache: the K-shift of a context shift needs both caches equal
        return model.new_memory(n_ctx, n_seq_max, swa_full=True, n_ubatch=n_ubatch)
    return model.new_memory(n_ctx, n_seq_max)


def _sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    p = np.exp(logits.astype(np.float64) - logits.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def _host(logits: Any) -> np.ndarray:
    """Logits as a host array (a torch model returns them on its device)."""
    if isinstance(logits, np.ndarray):
        return logits
    return logits.detach().cpu().numpy()  # type: ignore[no-any-return]


def run_demo(arch: str = "hybrid", clients: int = 16, parallel: int = 4, n_ctx: int = 512,
             seed: int = 0, n_batch: int = 64, n_ubatch: int = 16, verify: int = 6,
             progress: Optional[TextIO] = None, device: Any = None) -> DemoReport:
    """Serve ``clients`` requests, ``parallel`` at a time, through the toy model ``arch`` on a
    memory of ``n_ctx`` cells; verify ``verify`` of them (plus the shifted and the restored one)
    against ``forward_full``. ``progress``: a stream for the progress bar, or None. ``device``: a
    torch device: the model's math and its memory (torch storage) there."""
    if clients < 1 or parallel < 1 or n_batch < 1 or n_ubatch < 1:
        raise ValueError("clients, parallel, batch and ubatch must be >= 1")
    t_wall = time.perf_counter()
    rng = np.random.default_rng(seed)
    model = make_model(arch, seed, device)
    cfg = model.config
    # request sequences, then the prefix cache's holders (one per cached node); a recurrent
    # memory needs none: its cache keeps checkpoints
    n_holders = 0 if arch == "recurrent" else max(32, 8 * parallel)
    n_seq_max = parallel + n_holders
    # each slot gets its share of the cells; the system prompt is counted twice, for the cached
    # copy and for the private copy a single-sequence restore makes
    budget = (n_ctx - 2 * SYSTEM_PROMPT_LEN) // parallel
    if budget < 8:
        raise ValueError(f"--ctx {n_ctx} is too small for {parallel} parallel clients: need at least "
                         f"{2 * SYSTEM_PROMPT_LEN + 8 * parallel}")
    max_prompt, max_answer = min(24, budget * 2 // 5), min(32, budget - min(24, budget * 2 // 5))
    memory = _new_memory(model, arch, n_ctx, n_seq_max, n_ubatch)
    cache = PrefixCache(memory, n_requests=parallel, checkpoint_interval=16)
    recurrent_part = getattr(memory, "mem_recr", None)
    clock = model.clock
    report = DemoReport(arch=arch, model=f"{len(cfg.layer_kinds)} layers ({' '.join(cfg.layer_kinds)}), "
                        f"n_embd {cfg.n_embd}, vocab {cfg.n_vocab}", memory=type(memory).__name__,
                        clients=clients, parallel=parallel, n_ctx=n_ctx, seed=seed,
                        system_prompt=SYSTEM_PROMPT_LEN, holders=n_holders)
    if device is not None:
        report.backend = f"torch on {model.device}"

    system = [int(t) for t in rng.integers(0, cfg.n_vocab, SYSTEM_PROMPT_LEN)]
    requests = []
    for i in range(clients):
        prompt = [int(t) for t in rng.integers(0, cfg.n_vocab, rng.integers(2, max_prompt + 1))]
        answer = int(rng.integers(4, max_answer + 1))
        # a chat comes back for more turns while its history stays within its share of cells
        follow_ups, used = [], len(prompt) + answer
        for _ in range(int(rng.integers(0, 3))):
            user, more = int(rng.integers(2, 6)), answer + 1
            if used + user + more > budget:
                break
            follow_ups.append([int(t) for t in rng.integers(0, cfg.n_vocab, user)])
            used += user + more
        requests.append(_Request(i, prompt, answer, follow_ups))
    shift_req = requests[min(1, clients - 1)]
    shift_req.answer_len = max_answer           # long enough to have something to drop
    save_req = requests[2] if clients > 2 else None
    for special in (shift_req, save_req):       # their histories are edited: one turn each
        if special is not None:
            special.follow_ups = []

    # the system prompt, once: served as a request of its own, it stays cached for the others
    seq, _ = cache.admit(system)
    model.decode(Batch(token=np.array(system, np.int32), seq_id=np.full(len(system), seq, np.int32)),
                 memory, n_ubatch)
    with clock:
        cache.commit(seq, system)
        cache.release(seq)
    report.decoded_tokens += len(system)
    for req in requests:
        req.history = system + req.prompt
    waiting = list(requests)
    active: List[_Request] = []
    bar = _Progress(clients, progress or sys.stderr, progress is not None)
    finished = 0

    while waiting or active:
        while waiting and len(active) < parallel:
            req = waiting.pop(0)
            with clock:
                req.seq, hit = cache.admit(req.history)
            report.requests += 1
            report.request_tokens += len(req.history)
            report.hit_tokens += hit
            req.n_fed = hit
            req.pending = req.history[hit:]
            req.generated = 0
            req.done = False
            active.append(req)

        for req in active:
            if req.parked:
                req.parked -= 1
                if req.parked == 0:
                    with clock:
                        memory.state_read(req.saved, req.seq)
                    if memory.seq_pos_max(req.seq) != req.n_fed - 1:
                        report.failures.append(f"request {req.index}: restored at position "
                                               f"{memory.seq_pos_max(req.seq)}, saved at {req.n_fed - 1}")

        # one batch: a decoded token per answering client, prompt chunks fill the rest
        entries = []
        room = n_batch
        for req in sorted((r for r in active if not r.parked), key=lambda r: len(r.pending)):
            take = req.pending[:max(0, room)]
            if not take:
                continue
            room -= len(take)
            last = len(take) == len(req.pending)
            entries += [(req, t, last and j == len(take) - 1) for j, t in enumerate(take)]
        if not entries:
            continue
        batch = Batch(token=np.array([t for _, t, _ in entries], np.int32),
                      seq_id=np.array([r.seq for r, _, _ in entries], np.int32),
                      output=np.array([o for _, _, o in entries], bool))
        with clock:
            # no room: the cache evicts what it must (least recently used, never a live request)
            if cache.init_batch(batch, n_ubatch).status != Status.SUCCESS:
                raise RuntimeError("no room for a decode even after emptying the prefix cache")
        logits = _host(model.decode(batch, memory, n_ubatch))
        report.steps += 1
        report.decoded_tokens += len(entries)
        report.peak_cells = max(report.peak_cells, memory.used)
        if recurrent_part is not None:
            report.peak_recurrent_cells = max(report.peak_recurrent_cells, recurrent_part.used)
        fed: Dict[Any, Any] = {}
        for req, _, _ in entries:
            fed[req.index] = fed.get(req.index, 0) + 1
        with clock:
            # index what each request decoded (and checkpoint its state) for later requests
            for index, n in fed.items():
                req = requests[index]
                cache.commit(req.seq, req.history[req.n_fed:req.n_fed + n], index=req is not shift_req)
        row = 0
        for req, _, out in entries:
            if not out:
                continue
            req.n_fed += fed.pop(req.index)
            req.pending = []
            req.outputs.append((req.n_fed - 1, logits[row]))
            token = _sample(logits[row], rng)
            row += 1
            req.generated += 1
            report.generated_tokens += 1
            if req.generated >= req.answer_len:
                req.done = True
                req.next_turn = req.turn < len(req.follow_ups)
                if req.next_turn:
                    # the chat goes on: the next turn's prompt is the whole history so far
                    req.history += [token] + req.follow_ups[req.turn]
                    req.turn += 1
                continue
            req.history.append(token)
            req.pending = [token]
        for index, n in fed.items():  # prompt chunks that produced no output yet
            req = requests[index]
            req.n_fed += n
            req.pending = req.pending[n:]

        for req in list(active):
            if req.done:
                with clock:
                    cache.release(req.seq)
                active.remove(req)
                if req.next_turn:
                    waiting.append(req)
                else:
                    finished += 1
            elif req is shift_req and report.shift == "none" and req.generated == req.answer_len // 2:
                _context_shift(model, cache, req, report)
            elif req is save_req and report.save_restore == "none" and req.generated == max(1, req.answer_len // 3):
                with clock:
                    req.saved = memory.state_write(req.seq)
                    memory.seq_rm(req.seq, -1, -1)
                req.parked = 3
                report.save_restore = (f"request {req.index} (seq {req.seq}) at {req.n_fed} tokens: "
                                       f"{len(req.saved or b'') / 1024:.1f} KiB saved, sequence removed for "
                                       f"3 steps, restored")
        bar.update(finished, report.steps)
    bar.close()

    report.prompt_tokens = sum(len(r.prompt) for r in requests)
    report.cells = memory.size
    report.recurrent_cells = recurrent_part.size if recurrent_part is not None else 0
    report.state_bytes = sum(memory.memory_breakdown().values())
    stats = cache.stats()
    report.evictions, report.checkpoints = stats["evictions"], stats["checkpoints"]
    report.checkpoint_bytes = stats["checkpoint_bytes"]
    report.llmem_s, report.model_s = clock.llmem, clock.model
    _verify(model, requests, verify, rng, report)
    report.wall_s = time.perf_counter() - t_wall
    return report


def _context_shift(model: ToyModel, cache: PrefixCache, req: _Request, report: DemoReport) -> None:
    """llama.cpp server's context shift: keep the system prompt, drop half of what follows. The
    request shares only the system prompt with the prefix cache (its own tokens were committed
    unindexed), so the shift moves no cached cell."""
    n_keep = SYSTEM_PROMPT_LEN
    n_discard = (req.n_fed - n_keep) // 2
    memory = cache.memory
    if not memory.get_can_shift():
        report.shift = f"skipped: {type(memory).__name__} cannot shift positions"
        return
    with model.clock:
        cache.shift(req.seq, n_keep, n_discard)
    req.shifted = True
    # A state-space model's state has no positions: its outputs stay those of the whole history.
    # With attention, the kept rows were computed with the dropped tokens in view, which no
    # cache-free run reproduces, so only earlier outputs are compared.
    has_attention = any(kind != SSM for kind in model.config.layer_kinds)
    if has_attention:
        req.comparable_until = req.n_fed
    report.shift = (f"request {req.index} (seq {req.seq}) at {req.n_fed} tokens: dropped {n_discard} "
                    f"after the {n_keep}-token system prompt"
                    + (", K re-rotated; outputs before it verified" if has_attention
                       else "; the state has no positions, all outputs verified"))


def _verify(model: ToyModel, requests: List[_Request], verify: int, rng: Any, report: DemoReport) -> None:
    special = [r for r in requests if r.shifted or r.saved is not None]
    others = [r for r in requests if r not in special]
    picked = special + [others[i] for i in sorted(rng.permutation(len(others))[:max(0, verify)])]
    for req in picked:
        rows = [(i, l) for i, l in req.outputs
                if req.comparable_until is None or i < req.comparable_until]
        if not rows:
            continue
        ref = _host(model.forward_full(req.history))
        idx = [i for i, _ in rows]
        got = np.array([l for _, l in rows])
        err = np.abs(got - ref[idx])
        report.max_error = max(report.max_error, float(err.max()))
        report.verified_requests += 1
        report.verified_rows += len(rows)
        if not np.all(err <= ATOL + RTOL * np.abs(ref[idx])):
            report.failures.append(f"request {req.index}: logits differ from forward_full by up to "
                                   f"{float(err.max()):.3g}")


def format_report(r: DemoReport) -> str:
    """The report ``llmem demo`` prints."""
    steps = max(1, r.steps)
    hit_rate = r.hit_tokens / r.request_tokens if r.request_tokens else 0.0
    # without a cache every request decodes its whole history, the system prompt included
    without = r.request_tokens + r.generated_tokens - r.requests
    verdict = "OK" if r.ok else "FAILED"
    lines = [
        f"llmem demo: {r.arch} toy model, {r.model}, seed {r.seed}",
        f"memory         {r.memory}, {r.n_ctx} cells, {r.parallel} client slots"
        + (f" + {r.holders} prefix-cache sequences" if r.holders else ""),
        f"requests       {r.clients} served in {r.requests} requests (multi-turn chats), {r.parallel} at a time "
        f"(continuous batching)",
        f"system prompt  {r.system_prompt} tokens, decoded once, then reused from the prefix cache",
        f"prefix cache   hit rate {hit_rate:.0%}: {r.hit_tokens} of {r.request_tokens} prompt tokens reused; "
        f"{r.decoded_tokens} tokens decoded, {without} without the cache ({without - r.decoded_tokens} saved); "
        f"{r.evictions} evictions, {r.checkpoints} checkpoints held ({r.checkpoint_bytes / 1024:.1f} KiB)",
        f"tokens         {r.prompt_tokens} prompt + {r.generated_tokens} generated; "
        f"{r.decoded_tokens} decoded in total",
        f"steps          {r.steps} decode calls",
        f"memory used    peak {r.peak_cells} of {r.cells} cells"
        + (f" + {r.peak_recurrent_cells} of {r.recurrent_cells} recurrent cells" if r.recurrent_cells else "")
        + f", {r.state_bytes / 1024:.1f} KiB of state buffers",
        f"context shift  {r.shift}",
        f"save/restore   {r.save_restore}",
        f"llmem work     {1e6 * r.llmem_s / steps:8.1f} µs/step  (init_batch, apply, next, context "
        f"reads/writes, seq and state ops)",
        f"model compute  {1e6 * r.model_s / steps:8.1f} µs/step  ({r.backend})",
        f"verified       {r.verified_requests} requests, {r.verified_rows} outputs against forward_full: "
        f"max |diff| {r.max_error:.2g} (rtol {RTOL:g}, atol {ATOL:g})  {verdict}",
    ]
    lines += [f"  MISMATCH {f}" for f in r.failures]
    lines.append(f"wall time      {r.wall_s:.2f} s")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``llmem demo``."""
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="toy model (default hybrid)")
    p.add_argument("--device", default=None, metavar="DEV",
                   help="run the model and its memory on torch there (cuda, cuda:1, cpu; needs torch)")
    p.add_argument("--clients", type=int, default=16, metavar="N", help="requests to serve (default 16)")
    p.add_argument("--parallel", type=int, default=4, metavar="S",
                   help="requests decoded at the same time (default 4)")
    p.add_argument("--ctx", type=int, default=512, metavar="N", help="KV cells (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the traffic (default 0)")
    p.add_argument("--batch", type=int, default=64, metavar="N", help="tokens per decode call (default 64)")
    p.add_argument("--ubatch", type=int, default=16, metavar="N", help="micro-batch size (default 16)")
    p.add_argument("--verify", type=int, default=6, metavar="N",
                   help="random requests recomputed with forward_full, besides the shifted and the "
                        "restored one (default 6)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(args: argparse.Namespace) -> int:
    """Run the demo for parsed arguments; 0 when verified, 1 on a mismatch, 2 on bad options."""
    try:
        arch = args.arch or "hybrid"
        report = run_demo(arch, args.clients, args.parallel, args.ctx, args.seed, args.batch,
                          args.ubatch, args.verify, progress=None if args.no_progress else sys.stderr,
                          device=args.device)
    except ValueError as exc:
        print(f"llmem demo: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1
