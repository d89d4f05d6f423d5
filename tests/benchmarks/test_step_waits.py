"""benchmarks/step_waits.py on the CPU (dynamo with aot_eager): every pass's regions are timed in order, compiled
or eager, and a setting outside the list is refused before any work."""

import re
import sys

import pytest

from benchmarks import step_waits as SW

REGIONS = ["set_config", "model call", "loss", "zero_grad", "backward", "opt.step"]  # each pass's, in order


def _run(monkeypatch, capsys, setting: str) -> str:
    argv = ["step_waits", "--device", "cpu", "--backend", "aot_eager", "--model", "small_cnn@28:b8"]
    monkeypatch.setattr(sys, "argv", argv + ["--setting", setting, "--iters", "2"])
    SW.main()
    return capsys.readouterr().out


def test_every_pass_region_in_order_with_growing_host_times(monkeypatch, capsys):
    out = _run(monkeypatch, capsys, "multi_c")
    rows = re.findall(r"^\| (\d+-bit|float): ([\w. ]+) \| ([\d.]+) \| – \| – \|$", out, re.M)  # CPU: no events
    assert [(tag, region) for tag, region, _ in rows] == [(f"{b}-bit", r) for b in (8, 6, 4, 2) for r in REGIONS]
    host = [float(h) for _, _, h in rows]
    assert host == sorted(host) and host[-1] > 0  # medians of points in one step's order


def test_float_setting_one_pass(monkeypatch, capsys):
    out = _run(monkeypatch, capsys, "float_c")
    assert re.findall(r"^\| float: ([\w. ]+) \|", out, re.M) == REGIONS


def test_an_eager_setting_runs_the_model_uncompiled(monkeypatch, capsys):
    """The eager settings time the same regions, and no graph is compiled for them."""
    compiled = []
    monkeypatch.setattr(SW.torch, "compile", lambda *a, **k: compiled.append(a) or a[0])
    out = _run(monkeypatch, capsys, "w4_kernels")
    assert compiled == []
    assert re.findall(r"^\| 4-bit: ([\w. ]+) \|", out, re.M) == REGIONS  # the model as set: W4A4, not float


def test_a_setting_outside_the_list_is_refused(monkeypatch, capsys):
    """The composite's settings and the layer-wise variants are not step_waits'; the error lists what is."""
    monkeypatch.setattr(sys, "argv", ["step_waits", "--device", "cpu", "--setting", "w4_composite"])
    with pytest.raises(SystemExit) as e:
        SW.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--setting w4_composite: accepted: float, float_c, w4_kernels," in err
