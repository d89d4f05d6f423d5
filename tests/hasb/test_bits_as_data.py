"""Bits as data (issue 15): one compiled graph for every bit config, and exactly the int path's numbers.

The reference is the int path through the composite ops (``composite_ops()``; the fused kernels are CUDA-only).
Equality is bit-for-bit (``torch.equal``) for outputs, every gradient (``None`` where the int path has none) and
momentum-updated running statistics; the cumulative-average update (momentum None) is computed in another order
than ATen's, so it is compared within float32 round-off.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import hasb
from hasb import quantizer as Q
from hasb.config import ConfigError
from hasb.errors import HasbError
from hasb.quantize import DEFAULT_BITS, bits_as_data, searchable_layers, uses_bits_as_data
from hasb.supernet import enable_tbn, recalibrate_bn

BITS = (8, 6, 4, 2)


class TinyRes(nn.Module):
    """conv-bn-relu, one residual block (two conv-bn), a 1x1 conv-bn shortcut, linear head: 5 quantized layers."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.sc, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.bn4 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        r = F.relu(self.bn1(self.c1(h)))
        h = F.relu(self.bn2(self.c2(r)) + self.bn3(self.sc(h)))
        h = F.relu(self.bn4(self.c3(h)))
        return self.fc(h.mean((2, 3)))


def _model(rounding="half_up", pair=False, **kw):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    m = hasb.quantize_model(TinyRes(), BITS, x[:2], rounding=rounding, **kw)
    hasb.init_quantizers(m, x)
    if pair:
        enable_tbn(m)
    return m.train(), x, torch.randint(0, 10, (16,))


def _configs(m):
    names = searchable_layers(m)
    return [
        8,
        2,
        hasb.BitConfig({n: (b, b) for n, b in zip(names, [2, 6, 8, 4], strict=True)}),
        hasb.BitConfig({n: (b, b) for n, b in zip(names, [4, 4, 2, 8], strict=True)}),
        6,
    ]


def _assert_same_grads(a: nn.Module, b: nn.Module, exact=True):
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), f"{n}: grad None on one path only"
        if p.grad is not None and exact:
            assert torch.equal(p.grad, q.grad), n
        elif p.grad is not None:  # float32 round-off of sums made in another order
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


def _assert_same_state(a: nn.Module, b: nn.Module, exact=True):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), "the state dict format must not change"
    for k in sa:
        if exact or sa[k].dtype == torch.long:
            assert torch.equal(sa[k], sb[k]), k
        else:  # float32 round-off of an update computed in another order
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


# -- the pure functions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", Q.ROUNDINGS)
@pytest.mark.parametrize("high", [8, 4])
def test_quantize_weight_t_equals_int_version(rounding, high):
    torch.manual_seed(1)
    w0 = torch.randn(6, 4, 3, 3)
    s0 = Q.init_weight_scale(w0, high) * torch.linspace(0.5, 1.5, 6)  # some weights clip at the top bit
    gout = torch.randn_like(w0)
    for bit in range(1, high + 1):
        w, s = w0.clone().requires_grad_(), s0.clone().requires_grad_()
        wt, st = w0.clone().requires_grad_(), s0.clone().requires_grad_()
        with Q.composite_ops():
            ref = Q.quantize_weight(w, s, bit, high, rounding)
        out = Q.quantize_weight_t(wt, st, torch.tensor(float(bit)), high, rounding)
        assert torch.equal(out, ref), bit
        (ref * gout).sum().backward()
        (out * gout).sum().backward()
        assert torch.equal(wt.grad, w.grad) and torch.equal(st.grad, s.grad), bit


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_activation_t_equals_int_version_and_grads_reach_only_the_picked_scale(signed):
    torch.manual_seed(2)
    x0 = torch.randn(4, 5, 6) * 3
    gout = torch.randn_like(x0)
    steps = torch.tensor([0.02, 0.1, 0.4, 0.9])
    for i, bit in enumerate(BITS):
        x, s = x0.clone().requires_grad_(), steps[i].clone().requires_grad_()
        xt, st = x0.clone().requires_grad_(), steps.clone().requires_grad_()
        with Q.composite_ops():
            ref = Q.quantize_activation(x, s, bit, signed)
        out = Q.quantize_activation_t(xt, st, torch.tensor(i), torch.tensor(float(bit)), signed)
        assert torch.equal(out, ref), bit
        (ref * gout).sum().backward()
        (out * gout).sum().backward()
        assert torch.equal(xt.grad, x.grad) and torch.equal(st.grad[i], s.grad), bit
        assert not st.grad[torch.arange(4) != i].any(), "gradient must reach only the selected scale"


# -- whole models ------------------------------------------------------------------------------------------------
def _step_both(ref, dat, x, y, conf, opts, exact=True):
    hasb.set_config(ref, conf)
    hasb.set_config(dat, conf)
    with Q.composite_ops():
        out_r, out_d = ref(x), dat(x)
        assert torch.equal(out_r, out_d), f"outputs differ at {conf}"
        for out, opt in zip((out_r, out_d), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(out, y).backward()
    _assert_same_grads(ref, dat, exact)
    for opt in opts:
        opt.step()


@pytest.mark.parametrize("rounding,pair", [("half_up", False), ("half_even", False), ("msb", False), ("half_up", True)])
def test_data_mode_trains_exactly_as_the_int_path(rounding, pair):
    """Adam steps over uniform and mixed configs: outputs, every gradient, weights and running stats stay equal.
    (One quantizer per layer: with a shared input, see the next test.)"""
    ref, x, y = _model(rounding, pair, share_inputs=False)
    dat = bits_as_data(copy.deepcopy(ref))
    if pair:  # a copy of a data-mode model: its parameters get the gradient hooks again
        dat = copy.deepcopy(dat)
    assert uses_bits_as_data(dat) and not uses_bits_as_data(ref)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4) for m in (ref, dat)]
    for conf in _configs(ref):
        _step_both(ref, dat, x, y, conf, opts)
    _assert_same_state(ref, dat)  # Adam would move a scale or BN entry given a zero gradient instead of None
    _assert_same_eval(ref, dat, x)


def _assert_same_eval(ref, dat, x):
    ref.eval()
    dat.eval()
    for conf in _configs(ref):
        hasb.set_config(ref, conf)
        hasb.set_config(dat, conf)
        with Q.composite_ops(), torch.no_grad():
            assert torch.equal(ref(x), dat(x)), f"eval outputs differ at {conf}"


def test_data_mode_with_a_shared_input_trains_as_the_int_path_up_to_round_off():
    """c1 and the 1x1 shortcut take one input. The int path quantizes it once per bit and forward; data mode (one
    graph for every config, so no Python bit is read) once per layer, with the same step. Outputs are equal; a
    gradient through that input sums the two layers' parts before the quantizer's backward on one path and after
    it on the other: equal up to float32 round-off (plain SGD, which does not divide by a gradient's size)."""
    ref, x, y = _model()
    assert ref.hasb_spec.shared_inputs == (("c1", "sc"),)
    dat = bits_as_data(copy.deepcopy(ref))
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (ref, dat)]
    for conf in _configs(ref):
        _step_both(ref, dat, x, y, conf, opts, exact=False)
    _assert_same_state(ref, dat, exact=False)


def test_fp_weight_only_fixed_bits_and_switching_back_off():
    ref, x, _ = _model(weight_only=True, act_bits=8, fixed_bits=8)
    dat = bits_as_data(copy.deepcopy(ref))
    for set_bits in (hasb.set_fp, hasb.restore_fixed, lambda m: hasb.set_config(m, 4)):
        set_bits(ref)
        set_bits(dat)
        with Q.composite_ops(), torch.no_grad():
            assert torch.equal(ref(x), dat(x))
    with hasb.use_config(dat, 2), hasb.use_config(ref, 2), Q.composite_ops(), torch.no_grad():
        assert torch.equal(ref(x), dat(x))
    bits_as_data(dat, False)
    assert not uses_bits_as_data(dat) and not any("_bit_t" in n for n, _ in dat.named_buffers())


def test_cumulative_average_running_stats_and_recalibration():
    """momentum None (BN re-calibration's exact mean) updates only the selected entries, as the int path."""
    ref, x, _ = _model(pair=True)
    dat = bits_as_data(copy.deepcopy(ref))
    for m in (ref, dat):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None
    for conf in _configs(ref):
        for m in (ref, dat):
            hasb.set_config(m, conf)
            with Q.composite_ops(), torch.no_grad():
                m(x[: 8 if conf == 2 else 16])
    _assert_same_state(ref, dat, exact=False)
    batches = [x[:8], x[8:]]
    for m in (ref, dat):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = 0.1
        with Q.composite_ops():
            recalibrate_bn(m, _configs(m)[2], batches)  # entries in mixed train/eval states: the Python path
    _assert_same_state(ref, dat, exact=False)


def _switch_bns(m: nn.Module) -> list:
    return [b for b in m.modules() if type(b).__name__ == "SwitchBatchNorm"]


def _eval_equal(ref: nn.Module, dat: nn.Module, x: torch.Tensor) -> None:
    for m in (ref, dat):
        m.eval()
        hasb.set_config(m, _configs(m)[3])
    with Q.composite_ops(), torch.no_grad():
        assert torch.equal(ref(x), dat(x))


def test_stacked_statistics_are_the_entries_memory():
    """Data mode stores each SwitchBatchNorm's running statistics stacked over its entries, the entries' buffers
    being rows of the stacks: whatever writes an entry (BN re-calibration's Python path, load_state_dict) is seen
    by the data path, and copies, conversions and switching data mode off keep entries and stacks consistent."""
    ref, x, _ = _model(pair=True)
    dat = bits_as_data(copy.deepcopy(ref))
    bns = _switch_bns(dat)
    assert bns and all(b._stats_linked() for b in bns)
    assert all(b._rm.shape == (len(b.bns), 8) and b._nbt.shape == (len(b.bns),) for b in bns)
    dat = copy.deepcopy(dat).double().float()  # a copy, then two conversions: re-stacked from the entries
    assert all(b._stats_linked() for b in _switch_bns(dat))
    batches = [x[:8], x[8:]]
    for m in (ref, dat):
        with Q.composite_ops():
            recalibrate_bn(m, _configs(m)[2], batches)  # the Python path writes the entries
    _eval_equal(ref, dat, x)  # ... and the data path reads what it wrote
    ref.train()
    dat.train()
    with Q.composite_ops(), torch.no_grad():  # move ref's statistics away from dat's, then load them by assignment
        for conf in _configs(ref):
            hasb.set_config(ref, conf)
            ref(x)
    dat.load_state_dict(ref.state_dict(), assign=True)  # replaces the entries' buffers: re-stacked by a post-hook
    assert all(b._stats_linked() for b in _switch_bns(dat))
    _eval_equal(ref, dat, x)
    bits_as_data(dat, False)
    for b in _switch_bns(dat):
        assert "_rm" not in dict(b.named_buffers()) and all(m.running_mean._base is None for m in b.bns.values())


def test_state_dict_round_trip_and_late_tbn_entries():
    ref, x, _ = _model()
    dat = bits_as_data(copy.deepcopy(ref))
    assert list(dat.state_dict()) == list(ref.state_dict())
    dat.load_state_dict(ref.state_dict())  # re-checks the scales once at the next forward
    enable_tbn(ref)
    enable_tbn(dat)  # new entries after data mode was switched on: rebuilt at the next forward
    for conf in _configs(ref)[1:3]:
        hasb.set_config(ref, conf)
        hasb.set_config(dat, conf)
        with Q.composite_ops():
            assert torch.equal(ref(x), dat(x))
    assert ref.bn2.key == "2-6" and len(dat.bn2.bns) > 5


def test_uninitialised_scales_are_refused_with_what_to_do():
    torch.manual_seed(0)
    m = hasb.quantize_model(TinyRes(), BITS, torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"init_quantizers\(model, batch\)"):
        bits_as_data(m)
    assert not uses_bits_as_data(m)
    hasb.init_quantizers(m, torch.randn(8, 3, 8, 8))
    bits_as_data(m)
    hasb.init_quantizers(m, torch.randn(8, 3, 8, 8))  # still allowed in data mode (runs the int path)
    assert uses_bits_as_data(m)
    with pytest.raises(HasbError, match="bit 4"):  # the fixed (fp) stem never calibrated bit 4
        m.stem.set_bits(4, 4)


# -- compilation -----------------------------------------------------------------------------------------------
def _frames(model, x, confs) -> int:
    """Graphs dynamo compiled for one forward+backward per config (frame count of a counting aot_eager backend)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for conf in confs:
        hasb.set_config(model, conf)
        compiled(x).square().mean().backward()
    torch._dynamo.reset()
    return counter.frame_count


def test_one_graph_for_every_config_in_data_mode():
    ref, x, _ = _model(pair=True)
    dat = bits_as_data(copy.deepcopy(ref))
    confs = _configs(ref)  # 5 configs: uniform 8, 2, 6 and two mixed
    assert _frames(dat, x, confs) == 1
    assert _frames(ref, x, confs[:3]) == 3, "without data mode every config recompiles"
    hasb.set_config(dat, 4)
    eager = dat(x)
    torch._dynamo.reset()
    compiled = torch.compile(dat, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)  # same function (float round-off of the traced graph)
    dat.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    assert dat.c1.act_scales["4"].grad is not None and dat.c1.act_scales["8"].grad is None
    torch._dynamo.reset()


def test_a_loaded_data_mode_model_is_one_graph_from_its_first_compiled_call():
    """A state dict loaded into a data-mode model is checked and its signs read at the load, not in the first
    forward: ``_check_data_ready`` is where a compiled forward stops, so that forward broke its graph at every
    layer.  A model whose steps are not all initialised still raises what to do at its first forward."""
    ref, x, _ = _model(pair=True)
    dat = bits_as_data(copy.deepcopy(ref))
    dat.load_state_dict(ref.state_dict())
    assert _frames(dat, x, _configs(ref)) == 1
    fresh = hasb.quantize_model(TinyRes(), BITS, x[:2])  # nothing calibrated: its state dict marks no step
    enable_tbn(fresh)
    late = bits_as_data(copy.deepcopy(ref))
    late.load_state_dict(fresh.state_dict())  # the load itself does not raise
    with pytest.raises(HasbError, match=r"init_quantizers\(model, batch\)"):
        late(x)


def _random_images(tmp_path, n: int) -> str:
    """An npz of ``n`` random 1x28x28 images and labels, as a ``--data`` value: a training run that any machine
    can make (GPU machines need not have Fashion-MNIST), for tests that compare two runs of the same data."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "images.npz"
    np.savez(path, x=torch.rand(n, 1, 28, 28, generator=gen).numpy(), y=np.arange(n) % 10)
    return f"npz:{path}"


def test_train_compile_multi_specialises_and_supernet_is_one_graph_with_the_uncompiled_result(tmp_path, monkeypatch):
    """--compile compiles the whole model (here by dynamo's counting eager backend): multi-precision with one
    specialised graph per candidate bit (int bits; faster steps, measured), the supernet with bits as data, so its
    sampled mixed configs of every step share one graph; the trained weights equal those of the uncompiled run."""
    from hasb.export import read_checkpoint
    from hasb.train import TrainConfig, train

    counter = CompileCounterWithBackend("eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter))
    data = _random_images(tmp_path, 96)
    # the CPU on any machine: bit-equal weights need deterministic kernels (cuDNN's are not; the CUDA twin below)
    base = dict(model="small_cnn", data=data, epochs=1, batch_size=32, val_size=32, lr=3e-3, progress=False)
    base["device"] = "cpu"
    stages = {"multi": {}, "supernet": dict(stage="supernet", sampler="uniform", sigma=0.9, warmup_epochs=0)}
    for stage, kw in stages.items():
        outs = {}
        for compile_ in (False, True):
            torch._dynamo.reset()
            counter.frame_count = 0
            if stage == "supernet":
                kw["init"] = str(tmp_path / f"multi-{compile_}" / "model.pt")
            with Q.composite_ops():  # the uncompiled reference: the int path's composite ops (no ATen LSQ kernel)
                outs[compile_] = train(
                    TrainConfig(out=str(tmp_path / f"{stage}-{compile_}"), compile=compile_, **base, **kw)
                )
            # small_cnn multi trains the default bits (8, 6, 4, 2): one graph each; the supernet: one in all
            graphs = (len(DEFAULT_BITS) if stage == "multi" else 1) if compile_ else 0
            assert counter.frame_count == graphs, stage
        a, b = (read_checkpoint(outs[c] / "model.pt") for c in (False, True))
        for k, v in a["layers"].items():
            w = b["layers"][k]
            assert torch.equal(v["w_scale"], w["w_scale"]), f"{stage} {k}"
            assert ("w_int" in v) == ("w_int" in w) and torch.equal(
                v.get("w_int", v.get("weight")), w.get("w_int", w.get("weight"))
            )
            assert all(torch.equal(s, w["act_scales"][bit]) for bit, s in v["act_scales"].items()), f"{stage} {k}"
        assert all(torch.equal(v, b["rest"][k]) for k, v in a["rest"].items()), f"{stage}: BN entries differ"
    # --resume rebuilds the model and loads its state: its steps are ready at once, so the compile is again one
    # graph per bit (before, a load left them to _lazy_init, where every layer broke the graph)
    killed = dict(out=str(tmp_path / "multi-killed"), compile=True, **(base | {"epochs": 2}))  # 1 step per epoch
    train(TrainConfig(max_steps=1, **killed))
    torch._dynamo.reset()
    counter.frame_count = 0
    train(TrainConfig(resume=True, **killed))
    assert counter.frame_count == len(DEFAULT_BITS)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_bn_statistics_equal_eager(device, momentum):
    """Compiled by inductor (C++ on the CPU, Triton on CUDA), a bits-as-data model updates exactly the
    selected entries' BN statistics: every num_batches_tracked as in eager, running statistics within 1e-3
    relative of eager's (inductor reduces in another order, and a round-off difference can flip a downstream
    quantizer's rounding: up to 1.4e-4 of |value| + 1e-3 seen on the H200; an update sent to the wrong entry is off
    by momentum x the batch-to-running gap, ~1e-1).  A _foreach_add_ of the counts sent them to stale
    entries here (an inductor combo-kernel race, hasb.modules._train_and_update).  With CUDA graphs the trained
    state equals this compile's bit for bit (test_train_compile_on_cuda_uses_cuda_graphs_...)."""
    import random

    ref, x, y = _model(pair=True)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum  # None: the cumulative average of recalibration, 1/num_batches_tracked
    dat = bits_as_data(ref).to(device)
    eager = copy.deepcopy(dat)
    x, y, names = x.to(device), y.to(device), searchable_layers(dat)
    comp = torch.compile(dat)
    rng = random.Random(0)
    cfgs = [hasb.BitConfig({n: (rng.choice(BITS),) * 2 for n in names}) for _ in range(6)]
    for m, f in ((eager, eager), (dat, comp)):  # one model after the other, as a training run calls it
        for cfg in cfgs:
            hasb.set_config(m, cfg)
            F.cross_entropy(f(x), y).backward()
            m.zero_grad(set_to_none=True)
    got, want = dat.state_dict(), eager.state_dict()
    stats = [k for k in want if k.rsplit(".", 1)[-1] in ("num_batches_tracked", "running_mean", "running_var")]
    assert sum(int(want[k].item()) for k in stats if k.endswith("tracked")) == 6 * 5, "5 BN layers, 6 steps"
    for k in stats:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4, msg=k)
    torch._dynamo.reset()


def _tensors(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict, by dotted name."""
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_train_compile_on_cuda_uses_cuda_graphs_and_trains_the_same_weights(tmp_path, monkeypatch):
    """On CUDA, --compile captures the compiled passes in CUDA graphs (mode="reduce-overhead"): no graph is
    skipped, and the trained weights are bit-identical to the same compile without CUDA graphs (the same kernels
    replayed), for multi-precision (one graph per bit) and the supernet (bits as data)."""
    from torch._dynamo.utils import counters

    from hasb.export import read_checkpoint
    from hasb.train import TrainConfig, train

    real_compile = torch.compile
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # the same conv algorithms in both runs
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    base = dict(model="small_cnn", data=_random_images(tmp_path, 320), epochs=1, batch_size=32, val_size=64, lr=3e-3)
    base.update(device="cuda", compile=True, progress=False)
    stages = {"multi": {}, "supernet": dict(stage="supernet", sampler="uniform", sigma=0.9, warmup_epochs=0)}
    for stage, kw in stages.items():
        outs = {}
        for graphs in (False, True):
            modes: list = []

            def compile_(m, mode=None, graphs=graphs, modes=modes, **k):
                modes.append(mode)  # what train asked for; the reference run compiles without CUDA graphs
                return real_compile(m, mode=mode if graphs else None, **k)

            monkeypatch.setattr(torch, "compile", compile_)
            torch._dynamo.reset()
            skips = counters["inductor"]["cudagraph_skips"]
            if stage == "supernet":
                kw["init"] = str(tmp_path / f"multi-{graphs}" / "model.pt")
            outs[graphs] = train(TrainConfig(out=str(tmp_path / f"{stage}-{graphs}"), **base, **kw))
            assert modes == ["reduce-overhead"], "train --compile asks for CUDA graphs on CUDA"
            assert counters["inductor"]["cudagraph_skips"] == skips, "a compiled graph was not captured"
        a, b = (_tensors(read_checkpoint(outs[g] / "model.pt")) for g in (False, True))
        assert a.keys() == b.keys() and len(a) > 10
        for k, v in a.items():
            assert torch.equal(v, b[k]), f"{stage}: {k} differs with CUDA graphs"
    torch._dynamo.reset()
