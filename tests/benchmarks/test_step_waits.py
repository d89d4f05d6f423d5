"""benchmarks/step_waits.py on the CPU (dynamo with aot_eager): every pass's regions are timed in order, and a
setting that is not a compiled one is refused before any work."""

import re
import sys

import pytest

from benchmarks import step_waits as SW


def _run(monkeypatch, capsys, setting: str) -> str:
    argv = ["step_waits", "--device", "cpu", "--backend", "aot_eager", "--model", "small_cnn@28:b8"]
    monkeypatch.setattr(sys, "argv", argv + ["--setting", setting, "--iters", "2"])
    SW.main()
    return capsys.readouterr().out


def test_every_pass_region_in_order_with_growing_host_times(monkeypatch, capsys):
    out = _run(monkeypatch, capsys, "multi_c")
    regions = ["set_config", "model call", "loss", "zero_grad", "backward", "opt.step"]
    rows = re.findall(r"^\| (\d+-bit|float): ([\w. ]+) \| ([\d.]+) \| – \| – \|$", out, re.M)  # CPU: no events
    assert [(tag, region) for tag, region, _ in rows] == [(f"{b}-bit", r) for b in (8, 6, 4, 2) for r in regions]
    host = [float(h) for _, _, h in rows]
    assert host == sorted(host) and host[-1] > 0  # medians of points in one step's order


def test_float_setting_one_pass(monkeypatch, capsys):
    out = _run(monkeypatch, capsys, "float_c")
    assert re.findall(r"^\| float: ([\w. ]+) \|", out, re.M) == [
        "set_config",
        "model call",
        "loss",
        "zero_grad",
        "backward",
        "opt.step",
    ]


def test_a_setting_that_is_not_compiled_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["step_waits", "--device", "cpu", "--setting", "w4_kernels"])
    with pytest.raises(SystemExit) as e:
        SW.main()
    assert e.value.code == 2 and "--setting w4_kernels: accepted: float_c, w4_c, multi_c" in capsys.readouterr().err
