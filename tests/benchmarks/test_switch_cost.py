"""benchmarks/switch_cost.py on the CPU: both switches are timed for a model and the table says so."""

import re
import sys

from benchmarks import switch_cost as SC


def test_table_for_a_small_model(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["switch_cost", "--models", "resnet20", "--calls", "8", "--rounds", "2"])
    SC.main()
    out = capsys.readouterr().out
    row = re.search(
        r"^\| resnet20 \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| \[([\d.]+), ([\d.]+)\] \|$", out, re.M
    )
    assert row, out
    assert int(row[1]) > 0 and float(row[2]) > 0 and float(row[3]) > 0
    assert float(row[5]) <= float(row[4]) <= float(row[6])
