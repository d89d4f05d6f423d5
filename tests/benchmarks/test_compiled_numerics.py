"""benchmarks/compiled_numerics.py on the CPU: every case prints a row; compiled through aot_eager (the same ATen
ops, no code generation) the composites equal their eager selves exactly; bad input is one line and exit 2."""

import re
import sys

import pytest

from benchmarks import compiled_numerics as CN


def test_cpu_smoke_every_case_has_a_row_and_aot_eager_changes_no_value(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compiled_numerics", "--device", "cpu", "--backend", "aot_eager", "--n", "512"])
    CN.main()
    row = r"^\| ([a-zA-Z ,]+\d?) \| (\d+) \| (\d+) \| ([\d.e+-]+) \| (\d+) \| (\d+) \|$"
    rows = {m[0]: m[1:] for m in re.findall(row, capsys.readouterr().out, re.M)}
    assert set(rows) == set(CN.cases(8, CN.torch.device("cpu")))
    for name in ("act random", "act ties", "weight bit 8", "weight bit 4", "weight bit 2"):
        assert rows[name][1:] == ("0", "0", "0", "0"), name  # same ops, same order: the same bits
    for bit in (8, 4, 2):  # the pass op runs the composite on the CPU: the same values and codes
        assert rows[f"pass op bit {bit}"][1:4] == ("0", "0", "0")


@pytest.mark.parametrize("extra, says", [(["--n", "0"], "--n 0"), (["--device", "cuda:0"], "CUDA is not available")])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, extra, says):
    monkeypatch.setattr(CN.torch.cuda, "is_available", lambda: False)  # the message a machine without CUDA gives
    monkeypatch.setattr(sys, "argv", ["compiled_numerics", "--device", "cpu", *extra])
    with pytest.raises(SystemExit) as e:
        CN.main()
    assert e.value.code == 2 and says in capsys.readouterr().err
