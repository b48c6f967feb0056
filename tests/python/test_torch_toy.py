"""The toy models on torch: math in torch on the device, memories in torch storage there, and
cached decoding equal to ``forward_full`` through batches, splits, sequence operations,
rollback, K-shift and save/restore (CPU always; CUDA too when present)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import llmem  # noqa: E402
from llmem.toy import ToyHybrid, ToyRecurrent, ToyTransformer, make_model  # noqa: E402

import toy_session as ts  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


class AsNumpy:
    """A torch toy model seen by the numpy session driver: logits come back as host arrays."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def decode(self, batch, memory, n_ubatch=512):
        out = self.model.decode(batch, memory, n_ubatch=n_ubatch)
        assert isinstance(out, torch.Tensor) and out.device.type == self.model.device.type
        return out.cpu().numpy()

    def forward_full(self, tokens, pos=None):
        return self.model.forward_full(tokens, pos).cpu().numpy()


def memory_for(model, arch, **kw):
    if arch == "recurrent":
        return model.new_memory(n_seq_max=4, n_rs_seq=kw.get("n_rs_seq", 0))
    if arch == "hybrid":
        return model.new_memory(64, n_seq_max=4, n_rs_seq=kw.get("n_rs_seq", 0))
    return model.new_memory(64, n_seq_max=4, **{k: v for k, v in kw.items() if k != "n_rs_seq"})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["transformer", "iswa", "recurrent", "hybrid"])
def test_cached_decoding_equals_forward_full(device, arch):
    model = make_model(arch, seed=3, device=device)
    m = AsNumpy(model)
    mem = memory_for(model, arch)
    assert mem.storage == "torch"
    ts.prompt_then_tokens(m, mem, seed=1, n_ubatch=5)
    ts.parallel_sequences(m, memory_for(model, arch), seed=2, n_ubatch=4)
    ts.prefix_sharing(m, memory_for(model, arch), seed=3)
    ts.state_round_trip(m, lambda: memory_for(model, arch), seed=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unified", [True, False])
def test_transformer_kshift_and_seq_rm(device, unified):
    model = ToyTransformer(seed=5, device=device)
    m = AsNumpy(model)
    rng = np.random.default_rng(6)
    s = ts.Session(m, model.new_memory(64, n_seq_max=2, unified=unified, v_trans=not unified))
    s.feed({0: ts.random_tokens(rng, 10, 96), 1: ts.random_tokens(rng, 6, 96)})
    s.shift(0, 20)                # whole sequences moved: exact for any depth
    s.shift(1, 2)
    assert s.seq_rm_tail(1, s.pos[1][4])
    for _ in range(3):
        s.feed({0: ts.random_tokens(rng, 1, 96), 1: ts.random_tokens(rng, 2, 96)})
    s.check()
    # llama.cpp's context shift (drop a middle part, move the rest down) is exact for one layer
    one = ToyTransformer(seed=5, device=device).with_layers(1)
    c = ts.Session(AsNumpy(one), one.new_memory(64, unified=unified))
    c.feed({0: ts.random_tokens(rng, 12, 96)})
    c.context_shift(0, 3, 4)
    c.feed({0: ts.random_tokens(rng, 3, 96)})
    c.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [ToyRecurrent, ToyHybrid])
def test_recurrent_rollback(device, cls):
    model = cls(seed=7, device=device)
    m = AsNumpy(model)
    rng = np.random.default_rng(8)
    mem = model.new_memory(64, n_seq_max=2, n_rs_seq=2) if cls is ToyHybrid else \
        model.new_memory(n_seq_max=2, n_rs_seq=2)
    s = ts.Session(m, mem)
    s.feed({0: ts.random_tokens(rng, 6, 96)})
    s.feed({0: ts.random_tokens(rng, 3, 96)})
    assert s.seq_rm_tail(0, 7)   # two tokens back: a rollback snapshot
    s.feed({0: ts.random_tokens(rng, 2, 96)})
    s.check()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_cache_within_its_rounding(device):
    model = ToyTransformer(seed=9, device=device)
    mem = model.new_memory(64, dtype=torch.bfloat16)
    rng = np.random.default_rng(10)
    toks = ts.random_tokens(rng, 12, 96)
    got = model.decode(llmem.Batch(token=np.array(toks, np.int32), seq_id=np.zeros(12, np.int32),
                                   output=np.ones(12, bool)), mem)
    ref = model.forward_full(toks)
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    assert 0 < err < 2e-2 * scale  # bf16 keeps 8 bits of mantissa: errors of ~1e-2 relative


@pytest.mark.parametrize("device", DEVICES)
def test_demo_on_torch(device):
    from llmem.demo import format_report, run_demo
    report = run_demo("iswa", clients=3, parallel=2, n_ctx=256, verify=2, device=device)
    assert report.ok and report.verified_rows > 0, format_report(report)
    assert report.backend.startswith("torch")
    for arch in ("recurrent", "hybrid"):  # their prefix cache's checkpoints stay on the device
        report = run_demo(arch, clients=4, parallel=2, n_ctx=256, verify=2, device=device)
        assert report.ok and report.verified_rows > 0 and report.checkpoints > 0, format_report(report)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["recurrent", "hybrid"])
def test_prefix_cache_over_torch_storage(device, arch):
    """PrefixCache serves torch-storage recurrent and hybrid memories (its recurrent checkpoints
    are torch tensors on the device) with forward_full's outputs."""
    from prefix_workload import make_workload, serve, verify
    rng = np.random.default_rng(41)
    model = make_model(arch, seed=8, device=device)
    m = AsNumpy(model)
    memory = model.new_memory(n_seq_max=3) if arch == "recurrent" else model.new_memory(512, n_seq_max=3 + 40)
    assert memory.storage == "torch"
    cache = llmem.PrefixCache(memory, n_requests=3, checkpoint_interval=8)
    chats = make_workload(rng, model.config.n_vocab)
    counts = serve(m, memory, cache, chats, rng, check=cache.check)
    verify(m, chats)
    assert counts["decoded"] + counts["hit"] == counts["without_cache"]
    assert counts["hit"] > 0.3 * counts["without_cache"], counts
    recr = memory if arch == "recurrent" else memory.mem_recr
    assert recr.checkpoint_stats()["count"] > 0
    assert all(t.device.type == device for rows in recr._tstore._ckpt.values() for t in rows)

