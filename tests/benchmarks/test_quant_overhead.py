"""benchmarks/quant_overhead.py on the CPU (dynamo with the aot_eager backend: no code generation): every setting
runs, bits as data compiles one graph for the 4-pass step where int bits compile one per bit, and --profile
prints each setting's top ops."""

import copy
import math
import re
import sys

import torch
import torch.nn.functional as F

import hasb
from benchmarks import quant_overhead as QO
from hasb import kernels as K
from hasb.models import build_model
from hasb.modules import QuantMixin


def _run(monkeypatch, capsys, settings: str, *extra: str) -> tuple[str, dict[str, int]]:
    """The benchmark's output for small_cnn on the CPU (one timed step), and the graphs each setting compiled."""
    argv = ["quant_overhead", "--device", "cpu", "--backend", "aot_eager", "--models", "small_cnn@28:b8"]
    monkeypatch.setattr(sys, "argv", argv + ["--iters", "1", "--warmup", "1", "--settings", settings, *extra])
    QO.main()
    out = capsys.readouterr().out
    return out, {k: int(v) for k, v in re.findall(r"\] (\w+): \{[^}]*'graphs': (\d+)\}", out)}


def test_cpu_smoke_graph_counts_and_profile(monkeypatch, capsys):
    settings = (
        "float,float_c,w4_c,w4_allop_c,w4_layerw_c,multi_c,multi_inductor_c,multi_data_c,w4_data_cg,multi_data_cg"
    )
    out, graphs = _run(monkeypatch, capsys, settings, "--profile", "3")
    assert K.traced_batch_applies is QO._TRACED_BATCH  # w4_layerw_c's switch is undone after the row
    assert graphs == {
        "float": 0,
        "float_c": 1,
        "w4_c": 1,
        "w4_allop_c": 1,
        "w4_layerw_c": 1,
        "multi_c": 4,
        "multi_inductor_c": 4,
        "multi_data_c": 1,
        "w4_data_cg": 1,
        "multi_data_cg": 1,
    }
    assert len(re.findall(r"\[profile\] \w+ \(.* ms/step\): .* per step, \d+ launches per step; top 3:", out)) == 10
    row = next(line for line in out.splitlines() if line.startswith("| small_cnn@28:b8 |"))
    assert row.count("|") == 12 and "x" in row.split("|")[6]  # W4A4 compiled ÷ compiled float, measured


def test_interleaved_rounds_keep_every_compiled_setting_and_print_ratio_intervals(monkeypatch, capsys):
    """--rounds: the compiled steps stay valid and compiled (9 graphs on one forward: past dynamo's default limit
    of 8), then every setting is timed again round-robin and its ratio to the float step of its mode printed with
    a 95% interval that contains it, once with each step synchronized and once with the steps back to back; then
    each setting's host time per step against its time back to back."""
    out, graphs = _run(monkeypatch, capsys, "float,float_c,w4_c,multi_c,multi_data_c,float_cg,w4_cg", "--rounds", "3")
    assert graphs == {"float": 0, "float_c": 1, "w4_c": 1, "multi_c": 4, "multi_data_c": 1, "float_cg": 1, "w4_cg": 1}
    rows = re.findall(r"\| (\w+) \| [\d.]+ \| ([\d.]+)x ÷ (\w+) \| \[([\d.]+), ([\d.]+)\] \|", out)
    rounds = out.split("each step synchronized: 3 interleaved rounds")[1].split("the host's time per step")[0]
    synced, b2b = rounds.split(", steps back to back (")
    assert len(rows) == 8 and synced.count("x ÷ ") == b2b.count("x ÷ ") == 4  # both tables, all rows
    assert {r[0]: r[2] for r in rows} == {
        "w4_c": "float_c",
        "multi_c": "float_c",
        "multi_data_c": "float_c",
        "w4_cg": "float_cg",
    }
    for _, m, _, lo, hi in rows:
        assert float(lo) <= float(m) <= float(hi)
    table = out.split("the host's time per step")[1]
    host = dict(re.findall(r"\| (\w+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", table))
    assert set(host) == set(graphs)  # every kept setting; on the CPU the steps run on the host: the whole time
    assert all(0.5 < float(v) <= 1.0 for v in host.values())  # the host's part of a total: at most all of it
    waits = re.findall(r"\| \w+ \| [\d.]+ \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \| ([+-][\d.]+) \|", table)
    assert len(waits) == len(graphs)  # the synced time and the wait, for every setting
    for end, synced, wait in waits:  # the last column is the synced step less the back-to-back one
        assert float(synced) > 0 and abs(float(synced) - float(end) - float(wait)) <= 0.016  # three roundings to 0.01


def test_ratio_interval():
    """Paired rounds: a constant ratio has a zero-width interval; the interval is the t-interval of the log
    ratios (n = 3: t = 4.303), mapped back."""
    assert QO.ratio_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 2.0, 2.0)
    m, lo, hi = QO.ratio_ci([1.0, math.e, math.e**2], [1.0, 1.0, 1.0])  # logs 0, 1, 2: mean 1, sd 1
    assert abs(m - math.e) < 1e-12
    assert (
        abs(math.log(hi) - 1 - 4.302653 / math.sqrt(3)) < 1e-5
        and abs(math.log(lo) - 1 + 4.302653 / math.sqrt(3)) < 1e-5
    )


def test_backward_op_everywhere_overrides_quantize_models_marks():
    """``w4_allop_c``'s model: quantize_model leaves a ResNet's layers after residual adds to inductor; the
    setting's copy puts the op on all of them and leaves the measured model's marks alone."""
    q = hasb.quantize_model(build_model("resnet18", num_classes=10, in_channels=3, image_size=32))
    marks = [m.act_backward_op for m in q.modules() if isinstance(m, QuantMixin)]
    assert not all(marks)
    allop = QO.backward_op_everywhere(copy.deepcopy(q))
    assert all(m.act_backward_op for m in allop.modules() if isinstance(m, QuantMixin))
    assert [m.act_backward_op for m in q.modules() if isinstance(m, QuantMixin)] == marks


class _SeesGrads(torch.nn.Module):
    """A linear layer that records, at each forward, whether its weight still holds a gradient."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.lin.weight.grad is not None)
        return self.lin(x)


def test_train_step_clears_gradients_where_hasbs_trainer_does():
    """The benchmark's step clears gradients after the forward, as ``hasb.train_step._optimizer_pass`` does: the
    second pass's forward still sees the first pass's gradient in both, and both steps give the same weights."""
    from hasb.train_step import Batch, StepContext, float_step

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    bench, trainer = _SeesGrads(), _SeesGrads()
    trainer.load_state_dict(bench.state_dict())
    opt = torch.optim.SGD(bench.parameters(), lr=0.1)
    QO.train_step(bench, lambda: F.cross_entropy(bench(x), y), opt, [None, None])()
    topt = torch.optim.SGD([{"params": list(trainer.parameters()), "name": "all"}], lr=0.1)
    ctx = StepContext(trainer, trainer, topt, {"all": 0.1}, {}, distill="none")
    for _ in range(2):
        float_step(ctx, Batch(x, y), 1.0)
    assert bench.seen == trainer.seen == [False, True]
    assert torch.equal(bench.lin.weight, trainer.lin.weight)
