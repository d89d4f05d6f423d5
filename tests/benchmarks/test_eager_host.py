"""benchmarks/eager_host.py: the CPU emulation runs every variant through the kernel path's host code (its own
process: it patches torch), and a run without a GPU and without ``--emulate`` is refused in one line, exit 2."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine
    cmd = [sys.executable, "-m", "benchmarks.eager_host", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_emulation_times_every_variant_of_a_model():
    out = _run("--emulate", "--models", "resnet20@8:b2", "--rounds", "1", "--iters", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    layers = re.search(r"resnet20@8:b2 on CPU, launches emulated .*: (\d+) quantized layers", out.stdout)
    launches = re.search(r"kernel launches per W4A4 step: (\d+)", out.stdout)
    assert layers and launches
    assert int(launches[1]) == 2 * int(layers[1]) + 2  # every layer on the kernel path, the weights in one pass
    rows = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|", out.stdout, re.M))
    assert set(rows) == {"float", "q_fp", "q_w4", "q_a4", "q_w4a4"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in rows.values())


def test_without_a_gpu_the_real_measurement_is_refused_in_one_line():
    out = _run("--models", "resnet20@8:b2")
    assert out.returncode == 2
    assert "no GPU here" in out.stderr and "--emulate" in out.stderr
    assert out.stdout == ""
