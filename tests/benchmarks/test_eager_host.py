"""benchmarks/eager_host.py: the CPU emulation runs every variant through the kernel path's host code (its own
process: it patches torch), and a run without a GPU and without ``--emulate`` is refused in one line, exit 2."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine
    cmd = [sys.executable, "-m", "benchmarks.eager_host", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_emulation_times_every_variant_of_a_model():
    out = _run("--emulate", "--models", "resnet20@8:b2", "--rounds", "1", "--iters", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    layers = re.search(r"resnet20@8:b2 on CPU, launches emulated .*: (\d+) quantized layers", out.stdout)
    launches = re.search(r"kernel launches per W4A4 step: (\d+) \(2 per quantized input: \d+ layers, (\d+)", out.stdout)
    assert layers and launches
    assert int(launches[2]) == 2  # ResNet-20's two downsampling blocks: the 1x1 shortcut shares conv1's input
    # every input quantized once on the kernel path, the weights in one pass
    assert int(launches[1]) == 2 * (int(layers[1]) - int(launches[2])) + 2
    rows = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|", out.stdout, re.M))
    assert set(rows) == {"float", "q_fp", "q_w4", "q_a4", "q_w4a4"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in rows.values())


def test_without_a_gpu_the_real_measurement_is_refused_in_one_line():
    out = _run("--models", "resnet20@8:b2")
    assert out.returncode == 2
    assert "no GPU here" in out.stderr and "--emulate" in out.stderr
    assert out.stdout == ""


def test_host_share_steps_launch_nothing_and_put_the_kernels_back(monkeypatch):
    """``--host-share``'s step runs with every hasb launch a no-op, and the kernels are back afterwards, also when
    the step raises (a kernel left patched would turn every later measurement into a no-op)."""
    from benchmarks import eager_host as E
    from hasb import kernels as K

    sentinel = object()
    monkeypatch.setattr(K, "_aq_fwd_kernel", sentinel, raising=False)
    monkeypatch.delattr(K, "_aq_bwd_kernel", raising=False)
    seen = []

    def step():
        seen.append([type(getattr(K, n)).__name__ for n in E.KERNELS])
        K._aq_fwd_kernel[(1,)]()  # a launch through the stand-in: nothing runs

    E.without_launches(step)()
    assert seen == [["_NoLaunch"] * len(E.KERNELS)]
    assert K._aq_fwd_kernel is sentinel and not hasattr(K, "_aq_bwd_kernel")

    def boom():
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        E.without_launches(boom)()
    assert K._aq_fwd_kernel is sentinel and not hasattr(K, "_aq_bwd_kernel")


def test_host_share_in_the_emulation_is_refused_in_one_line():
    out = _run("--emulate", "--host-share", "--models", "resnet20@8:b2")
    assert out.returncode == 2 and "--host-share needs a GPU" in out.stderr and out.stdout == ""


def test_float32_pass_steps_drop_the_autocast_dtype_and_put_the_pass_back():
    from benchmarks import eager_host as E
    from hasb import kernels as K

    real, seen = K.quantize_weights, []
    try:
        K.quantize_weights = lambda *args: seen.append(args) or []
        patched = K.quantize_weights
        E.with_float32_pass(lambda: K.quantize_weights([], [], [], [], "half_up", "bf16"))()
        assert seen == [([], [], [], [], "half_up")]  # no out_dtype: float32 Ŵ
        assert K.quantize_weights is patched
    finally:
        K.quantize_weights = real


def test_jit_launch_steps_index_the_kernel_and_put_the_launcher_back():
    from benchmarks import eager_host as E
    from hasb import kernels as K

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args: seen.append((grid, args))

    real, seen = K.launch, []

    def boom():
        K.launch(Kernel(), 3, "x", 1)
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        E.with_jit_launches(boom)()
    assert seen == [((3,), ("x", 1))] and K.launch is real
