"""benchmarks/quant_overhead.py on the CPU (dynamo with the aot_eager backend: no code generation): every setting
runs, bits as data compiles one graph for the 4-pass step where int bits compile one per bit, and --profile
prints each setting's top ops."""

import re
import sys

from benchmarks import quant_overhead as QO


def test_cpu_smoke_graph_counts_and_profile(monkeypatch, capsys):
    argv = ["quant_overhead", "--device", "cpu", "--backend", "aot_eager", "--models", "small_cnn@28:b8"]
    argv += ["--iters", "1", "--warmup", "1", "--profile", "3"]
    argv += ["--settings", "float,float_c,w4_c,multi_c,multi_data_c,w4_data_cg,multi_data_cg"]
    monkeypatch.setattr(sys, "argv", argv)
    QO.main()
    out = capsys.readouterr().out
    graphs = {k: int(v) for k, v in re.findall(r"\] (\w+): \{[^}]*'graphs': (\d+)\}", out)}
    assert graphs == {
        "float": 0,
        "float_c": 1,
        "w4_c": 1,
        "multi_c": 4,
        "multi_data_c": 1,
        "w4_data_cg": 1,
        "multi_data_cg": 1,
    }
    assert len(re.findall(r"\[profile\] \w+ \(.* ms/step\): .* per step, \d+ launches per step; top 3:", out)) == 7
    row = next(line for line in out.splitlines() if line.startswith("| small_cnn@28:b8 |"))
    assert row.count("|") == 12 and "x" in row.split("|")[6]  # W4A4 compiled ÷ compiled float, measured
