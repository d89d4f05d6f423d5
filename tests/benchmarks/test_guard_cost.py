"""benchmarks/guard_cost.py on the CPU: every setting timed in interleaved rounds, each ratio ÷ float inside its
interval; the quantized model's compiled forward holds one weight op (the gates opened as in the tests); bad input
is one line and exit 2."""

import re
import sys

import pytest
import torch

from benchmarks import guard_cost as GC


def test_cpu_smoke_every_setting_against_float(monkeypatch, capsys):
    monkeypatch.setattr(GC.K, "traced_batch_applies", GC.K.traced_batch_applies)  # main patches them: undo after
    monkeypatch.setattr(GC.K, "weights_fit", GC.K.weights_fit)
    monkeypatch.setattr(sys, "argv", ["guard_cost", "--model", "lm_tiny", "--rounds", "2", "--calls", "2"])
    GC.main()
    out = capsys.readouterr().out
    assert re.search(r"^\| float \| \d+ \| – \| – \|$", out, re.M)
    for k in ("w4a4", "multi"):
        m, lo, hi = map(
            float, re.search(rf"^\| {k} \| \d+ \| ([\d.]+)x \| \[([\d.]+), ([\d.]+)\] \|$", out, re.M).groups()
        )
        assert lo <= m <= hi and m > 0
    ops = []

    def backend(gm, example_inputs):
        ops.append(sum(n.target is torch.ops.hasb.quantize_weights_forward.default for n in gm.graph.nodes))
        return gm.forward

    settings, x = GC.models("lm_tiny")
    torch._dynamo.reset()
    torch.compile(settings["w4a4"][0], backend=backend)(x)
    assert ops == [1]  # what the benchmark times is the compiled pass, not the per-layer path
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "extra, says", [(["--model", "gpt9"], "--model gpt9"), (["--rounds", "1"], "at least 2 rounds")]
)
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, extra, says):
    monkeypatch.setattr(sys, "argv", ["guard_cost", *extra])
    with pytest.raises(SystemExit) as e:
        GC.main()
    assert e.value.code == 2 and says in capsys.readouterr().err
