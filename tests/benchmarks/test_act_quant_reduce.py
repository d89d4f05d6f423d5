"""benchmarks/act_quant_reduce.py on the CPU (aot_eager: no code generation): every variant compiles, runs and
prints a finite scale gradient (the timings mean something only on a GPU; the one-sum path's equality with the
composite is tested in tests/hasb/test_quantizer.py)."""

import math
import re
import sys

from benchmarks import act_quant_reduce as AQ


def test_cpu_smoke_every_variant_runs(monkeypatch, capsys):
    argv = ["act_quant_reduce", "--device", "cpu", "--backend", "aot_eager", "--shape", "2,4,6,6", "--iters", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    AQ.main()
    rows = dict(re.findall(r"^\| (\w+) \| [\d.]+ \| \d+ \| (\S+) \|$", capsys.readouterr().out, re.M))
    assert set(rows) == {"relu", "composite", "composite_logical", "one_sum"}
    assert all(math.isfinite(float(v)) for v in rows.values())
