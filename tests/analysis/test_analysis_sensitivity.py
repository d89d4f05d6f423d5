"""Sensitivity table, file contract, activation traces, CLI, and the PyHessian cross-check."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import hasb
from analysis.hvp import HessianOperator
from analysis.sensitivity import (
    DegenerateSensitivityError,
    SensitivityConfig,
    SensitivityError,
    check_traces,
    compute_sensitivity,
    load_sensitivity,
    main,
    validate_sensitivity,
    weight_perturbation,
)
from analysis.trace import activation_traces, estimate_traces, hutchinson_full
from hasb.data import loss_fn
from hasb.errors import HasbError
from hasb.export import load_quantized, save_quantized
from hasb.models import build_model
from hasb.quantize import float_twin
from tests.support.analysis_fixtures import (
    TINY_RESNET20,
    tiny_problem,
    train_multi_precision,
)


@pytest.fixture(scope="module")
def result():
    model, batches = tiny_problem()
    return (
        model,
        batches,
        compute_sensitivity(
            model, batches, SensitivityConfig(bits=[8, 4, 2], rtol=0.2, max_hvp=600, seed=0, backend="double_backward")
        ),
    )


def test_omega_table_and_ranking(result):
    model, batches, res = result
    f = res.frame
    assert list(f.layer) == ["conv1", "conv2", "conv3", "fc"]
    assert list(f.searchable) == [False, True, True, False]  # first/last fixed
    assert set(res.omega) == {"conv2", "conv3"}
    q = hasb.quantize_model(copy.deepcopy(model), bits=[8, 4, 2], example_input=batches[0][0][:2])
    for n in res.omega:
        t = float(f.set_index("layer").trace_per_param[n])
        for b in (8, 4, 2):
            d = weight_perturbation(q.get_submodule(n), b)
            assert np.isclose(res.omega[n][str(b)], max(t, 0) * d, rtol=1e-12)
        assert res.omega[n]["2"] > res.omega[n]["4"] > res.omega[n]["8"]  # coarser grid, larger error
    assert res.ranking()[0] == max(res.omega, key=lambda n: res.omega[n]["2"])
    assert not any(p.requires_grad is False for p in model.parameters())


def test_json_contract_round_trip(result, tmp_path):
    _, _, res = result
    p = res.to_json(tmp_path / "sensitivity.json")
    d = load_sensitivity(p)
    assert d["bits"] == [8, 4, 2] and d["version"] == 1
    assert [r["layer"] for r in d["layers"]] == list(res.frame.layer)
    bad = json.loads(p.read_text())
    del bad["omega"]["conv2"]
    with pytest.raises(SensitivityError, match="omega"):
        validate_sensitivity(bad)
    bad = json.loads(p.read_text())
    bad["layers"][0].pop("stderr")
    with pytest.raises(SensitivityError, match="stderr"):
        validate_sensitivity(bad)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(SensitivityError, match="not valid JSON"):
        load_sensitivity(tmp_path / "x.json")


def test_negative_traces_reported():
    model, batches = tiny_problem()
    res = compute_sensitivity(
        model,
        batches,
        SensitivityConfig(bits=[8, 4], rtol=0.3, max_hvp=300, backend="double_backward"),
        loss_fn=lambda o, y: -F.cross_entropy(o, y),
    )  # concave: every trace < 0
    assert res.negative_traces == ["conv1", "conv2", "conv3", "fc"]
    assert res.frame.negative.all()
    assert all(v == 0 for om in res.omega.values() for v in om.values())  # policy: Ω uses max(t, 0)


def test_quantized_model_measured_at_a_trained_config_never_fp():
    """A quantized model is measured at its top bit by default (not the untrained fp path), bits restored after."""
    model, batches = tiny_problem()
    q = hasb.quantize_model(copy.deepcopy(model), bits=[8, 4], example_input=batches[0][0][:2]).double()
    hasb.set_config(q, 4)
    before = hasb.get_config(q)
    kw = dict(rtol=0.3, max_hvp=200, seed=1, backend="double_backward")
    r_default = compute_sensitivity(q, batches, SensitivityConfig(**kw))
    r8 = compute_sensitivity(q, batches, SensitivityConfig(at=8, **kw))
    r4 = compute_sensitivity(q, batches, SensitivityConfig(at=4, **kw))
    assert hasb.get_config(q) == before  # bits restored
    assert r_default.measured_at["network"] == "quantized" and r_default.measured_at["uniform_bit"] == 8
    assert np.array_equal(r_default.frame.trace, r8.frame.trace)
    assert not np.allclose(r4.frame.trace, r8.frame.trace, rtol=1e-3)  # the 4-bit network is another function
    with hasb.use_config(q, 8):  # the same numbers as measuring it directly (with the task's loss, the default)
        names = [f"{n}.weight" for n in q.hasb_spec.order]
        op = HessianOperator(q, batches, names, loss_fn=partial(loss_fn, "classification"), backend="double_backward")
        direct = estimate_traces(op, "layer", rtol=0.3, max_hvp=200, seed=1)
    assert np.array_equal(r8.frame.trace.to_numpy(), direct.trace)
    with pytest.raises(SensitivityError, match="not candidates"):
        compute_sensitivity(q, batches, SensitivityConfig(bits=[6]))
    with pytest.raises(HasbError, match="build"):  # no build record: no float twin
        compute_sensitivity(q, batches, SensitivityConfig(at="fp", **kw))


def test_degenerate_networks_and_traces_raise():
    model, batches = tiny_problem()
    kw = dict(rtol=0.3, max_hvp=100, backend="double_backward")
    hot = copy.deepcopy(model)
    with torch.no_grad():
        hot.fc.bias[0] = 1e4  # every sample: p(class 0) = 1
    with pytest.raises(DegenerateSensitivityError, match="saturated softmax"):
        compute_sensitivity(hot, batches, SensitivityConfig(**kw))
    nan_batches = [(x.clone().fill_(float("nan")), y) for x, y in batches]
    with pytest.raises(DegenerateSensitivityError, match="loss is nan"):
        compute_sensitivity(model, nan_batches, SensitivityConfig(**kw))
    frame = pd.DataFrame({"layer": ["a", "b"], "trace": [0.0, 0.0], "stderr": [0.0, 0.0]})
    with pytest.raises(DegenerateSensitivityError, match="exactly 0"):
        check_traces(frame, 10)
    with pytest.raises(DegenerateSensitivityError, match="standard error.*max-hvp"):
        check_traces(frame.assign(trace=[1.0, 2.0], stderr=[0.1, np.inf]), 10)
    with pytest.raises(DegenerateSensitivityError, match="non-finite trace"):
        check_traces(frame.assign(trace=[1.0, np.nan], stderr=[0.1, 0.1]), 10)
    check_traces(frame.assign(trace=[1.0, -2.0], stderr=[0.1, 0.0]), 10)  # negative and exact layers are fine


def test_activation_traces_vs_exact():
    """Trace of ∂²L/∂x² at the classifier input (x: [B, 4] per batch) against the dense Hessian."""
    model, batches = tiny_problem()
    feats = []
    h = model.fc.register_forward_pre_hook(lambda m, i: feats.append(i[0].detach()))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    n = sum(len(y) for _, y in batches)
    exact = 0.0
    for f, (_, y) in zip(feats, batches, strict=False):
        H = torch.autograd.functional.hessian(lambda z, y=y: F.cross_entropy(model.fc(z), y) * len(y) / n, f)
        exact += float(H.reshape(f.numel(), f.numel()).trace())
    r = activation_traces(model, batches, ["fc"], rtol=0.05, max_probes=400, seed=0)
    assert r.n_params == [4]
    assert abs(r.trace[0] - exact) <= 4 * r.stderr[0], (r.trace[0], exact, r.stderr[0])


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors (one line: see _OneLineParser)
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_runs_and_caches(tmp_path, capsys):
    out = tmp_path / "run"
    base = [*_TINY, "--out", out]  # the shared tiny settings (defined below)
    code, o, e = _run(base, capsys)
    assert code == 0, e
    assert {p.name for p in out.iterdir()} == {
        "sensitivity.json",
        "sensitivity.csv",
        "sensitivity.png",
        "sensitivity.manifest.json",
        ".hasb.lock",  # the writer's lock (hasb.cli.out_lock): released by the OS when the run ends
    }
    d = load_sensitivity(out)
    assert d["model"] == "tiny_mlp" and [r["searchable"] for r in d["layers"]] == [False, True, False]
    code, o, e = _run(base, capsys)
    assert code == 0 and o.startswith("cached")
    code, o, e = _run(base + ["--force"], capsys)
    assert code == 0 and not o.startswith("cached")
    # float state_dict checkpoint: a different fingerprint
    sd = tmp_path / "w.pt"
    torch.manual_seed(5)
    torch.save(build_model("tiny_mlp").state_dict(), sd)
    code, o, e = _run(base + ["--checkpoint", sd], capsys)
    assert code == 0 and load_sensitivity(out)["fingerprint"] != d["fingerprint"]


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--data",
        "--data-dir",
        "--checkpoint",
        "--bits",
        "--batches",
        "--batch-size",
        "--rtol",
        "--max-hvp",
        "--estimator",
        "--backend",
        "--seed",
        "--out",
        "--force",
        "--overwrite",
        "--activations",
        "--top-k",
        "--at",
        "--device",
        "--quiet",
        "--no-progress",
        "--threads",
        "--max-confidence",
        "--curvature",
        "--gn-columns",
        "--data-opt",
    ):
        assert flag in text


def test_pyhessian_cross_check():
    """PyHessian 0.1's Hutchinson trace (all parameters, tol=0) vs ours, within 4 combined SEs.

    PyHessian 0.1 stops as soon as its running mean is negative (``abs(Δ)/(mean+1e-6) < tol`` is then
    negative), even with tol=0, so its samples are collected one ``trace(maxIter=1)`` call at a time.
    """
    pyhessian = pytest.importorskip(
        "pyhessian", reason="pyhessian (optional extra: pip install pyhessian==0.1 --no-deps) is not installed"
    )
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    iters = 16
    torch.manual_seed(1)
    ph = pyhessian.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    samples = np.array([ph.trace(maxIter=1, tol=0.0)[0] for _ in range(iters)])
    model.zero_grad(set_to_none=True)
    op = HessianOperator(model, [(x, y)], params=[n for n, _ in model.named_parameters()], backend="double_backward")
    ours = hutchinson_full(op, rtol=0.0, max_hvp=iters, seed=0)
    # per-layer sums of one probe = its full-model sample; so the model trace is Σ_l t̂_l with samples summed
    t_ours = ours.trace.sum()
    se_ours = np.sqrt(np.sum(ours.stderr**2))  # conservative upper bound is fine: used only as a tolerance
    se_ph = samples.std(ddof=1) / np.sqrt(iters)
    assert abs(t_ours - samples.mean()) <= 4 * np.hypot(se_ours, se_ph), (t_ours, samples.mean(), se_ours, se_ph)


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, fmnist_small):
    """A ResNet-20-shaped export after multi-precision training: its fp path (untrained BN entries) is not a
    network anyone trained (issue 10: zero traces / 14× too large); the CLI must measure a trained one."""
    x, y = fmnist_small.train
    q = train_multi_precision(x[:1024], y[:1024])
    path = tmp_path_factory.mktemp("export") / "model.pt"
    save_quantized(q, path)
    return path, q


def _calib_batches(n: int = 64):
    from hasb.data import load_dataset

    x, y = load_dataset("fashion-mnist", None, calib_size=1024).calib  # the CLI's own selection
    return [(x[:n], y[:n])]


def test_cli_measures_a_trained_network_of_an_export(trained_export, tmp_path, capsys):
    """Default: the quantized model at its top bit; --at fp: the float twin. Both equal direct computations."""
    path, _ = trained_export
    q = load_quantized(path, trusted_model=TINY_RESNET20)[0]  # the network in the file (re-derived integers)
    settings = dict(estimator="full", max_hvp=6, rtol=0.0, seed=0, backend="double_backward")
    base = [
        "--model",
        TINY_RESNET20,
        "--checkpoint",
        path,
        "--batches",
        "1",
        "--batch-size",
        "32",
        "--max-hvp",
        "6",
        "--rtol",
        "0",
        "--estimator",
        "full",
        "--backend",
        "double_backward",
        "--no-progress",
    ]
    batches = _calib_batches(32)
    for at, net, want in (
        (None, q, {"network": "quantized", "uniform_bit": 8}),
        ("fp", float_twin(q), {"network": "float_twin", "bn_bit": 8}),
    ):
        out = tmp_path / f"at-{at}"
        code, o, e = _run(base + ["--out", out] + (["--at", at] if at else []), capsys)
        assert code == 0, e
        d = load_sensitivity(out)
        assert {k: d["measured_at"][k] for k in want} == want
        t = np.array([r["trace"] for r in d["layers"]])
        assert len(t) == 22 and np.isfinite(t).all() and (t != 0).sum() >= 11  # old code: all 0 on ResNet-20
        ref = compute_sensitivity(net, batches, SensitivityConfig(at=8 if at is None else None, **settings))
        # same probes, same data: only float32 round-off (export round trip, thread count) may differ, ~1e-5
        # relative; the untrained fp path the old CLI measured differs by O(1)
        r = ref.frame.trace.to_numpy()
        assert np.allclose(t, r, rtol=1e-3, atol=1e-6 * np.abs(r).max()), (at, t[:3], r[:3])


def test_table_json_and_figure_use_one_quantity_and_one_se(tmp_path, capsys):
    """Per-parameter traces beside their own SE (stderr/n_params), ± 1 SE everywhere, split and size stated."""
    out = tmp_path / "run"
    code, o, e = _run(_TINY + ["--out", out], capsys)
    assert code == 0, e
    d = load_sensitivity(out)
    assert d["measured_on"]["split"] == "calib" and d["measured_on"]["n_images"] == 16
    for r in d["layers"]:
        assert r["stderr_per_param"] == pytest.approx(r["stderr"] / r["n_params"], rel=1e-12)
    head = o.splitlines()[1]
    assert "± 1 SE" in head and "calib" in head and "16 images" in head, o
    assert "stderr_per_param" in o.splitlines()[2] and " stderr " not in o.splitlines()[2]
    import matplotlib.pyplot as plt

    from hasb.plots import plot_traces

    frame = pd.DataFrame(d["layers"])
    for title in (None, "custom"):
        fig = plot_traces(frame, value="trace_per_param", title=title)
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "± 1 SE" in ax.get_title() and any("± 1 SE" in t for t in labels), (ax.get_title(), labels)
        assert "2 SE" not in ax.get_title()
        bars = [c for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr]
        seg = bars[0].lines[2][0].get_segments()[1]  # layer 1's error bar: [value - SE, value + SE]
        assert seg[1][1] - abs(frame.trace_per_param[1]) == pytest.approx(frame.stderr_per_param[1], rel=1e-9)
        plt.close(fig)


_TINY = [
    "--model",
    "tiny_mlp",
    "--batches",
    "1",
    "--batch-size",
    "16",
    "--max-hvp",
    "40",
    "--rtol",
    "0.5",
    "--block",
    "4",
    "--sketch",
    "4",
    "--quiet",
    "--backend",
    "double_backward",
    "--device",
    "cpu",
]


def _bad_export(tmp_path, name, **change):
    from hasb.export import quantized_state

    q = hasb.quantize_model(build_model("tiny_mlp"), bits=[8, 4])
    obj = quantized_state(q)
    for k, v in change.items():
        if v is None:
            del obj[k]
        else:
            obj[k] = v
    p = tmp_path / name
    torch.save(obj, p)
    return p


def _bad_cases(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "afile").write_text("keep")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return {
        "out is a file": (["--out", tmp_path / "afile"], "is a file"),
        "out not writable": (["--out", ro / "run"], "not a writable folder"),
        "empty checkpoint": (["--checkpoint", tmp_path / "empty.pt"], "empty file"),
        "export missing keys": (["--checkpoint", _bad_export(tmp_path, "nospec.pt", spec=None)], "missing ['spec']"),
        "export bad json": (["--checkpoint", _bad_export(tmp_path, "badjson.pt", config="{oops")], "malformed"),
        "export names other code": (
            ["--checkpoint", _bad_export(tmp_path, "other.pt", build='{"name": "this:nothing"}')],
            "'this:nothing' model",
        ),
        "bad device": (["--device", "tpu"], "--device"),
        "bits out of range": (["--bits", "9,4"], "--bits"),
        "bits repeated": (["--bits", "8,8"], "twice"),
        "bad at": (["--at", "nonsense"], "--at"),
        "at on a float model": (["--at", "4"], "needs a hasb export"),
        "bad rtol": (["--rtol", "nan"], "--rtol"),
        "unknown model": (["--model", "nope", "--data-dir", tmp_path / "no-data"], "nope"),  # before the data
        "missing checkpoint": (["--checkpoint", tmp_path / "missing.pt"], "missing.pt"),
        "checkpoint not torch": (["--checkpoint", tmp_path / "afile"], "checkpoint"),
        "too many images": (["--batches", "100000"], "exceeds"),
        "bad gn columns": (["--gn-columns", "1"], "--gn-columns"),
        "bad curvature": (["--curvature", "fisher"], "--curvature"),
        "bad data option": (["--data-opt", "context"], "bad data option"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "out is a file",
        "out not writable",
        "empty checkpoint",
        "export missing keys",
        "export bad json",
        "export names other code",
        "bad device",
        "bits out of range",
        "bits repeated",
        "bad at",
        "at on a float model",
        "bad rtol",
        "unknown model",
        "missing checkpoint",
        "checkpoint not torch",
        "too many images",
        "bad gn columns",
        "bad curvature",
        "bad data option",
    ],
)
def test_cli_rejects_bad_input_before_any_work(case, tmp_path, capsys, monkeypatch):
    """Exit 2, one stderr line naming the problem, no traceback, nothing written, and no HVP computed."""
    import os

    import analysis.sensitivity as S

    if case == "out not writable" and os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    argv, word = _bad_cases(tmp_path)[case]
    monkeypatch.setattr(S, "compute_sensitivity", lambda *a, **k: pytest.fail("reached the HVPs"))
    if "--out" not in argv:
        argv = argv + ["--out", tmp_path / "run"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, o, e = _run(_TINY + argv, capsys)
    assert code == 2 and e.count("\n") == 1 and word in e and "Traceback" not in e, (case, e)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "afile").read_text() == "keep"
    (tmp_path / "ro").chmod(0o700)


def test_crash_between_renames_never_reports_cached_and_stale_stages_go(tmp_path, capsys, monkeypatch):
    """A crash between two renames of the set leaves it unvouched (no manifest); the next run rolls the committed
    stage forward, so the set it then reports as cached is the crashed run's complete set (CSV equal to JSON);
    an uncommitted stage is removed; a tampered file is never cached."""
    import analysis.sensitivity as S
    from hasb import outset

    out = tmp_path / "run"
    assert _run(_TINY + ["--out", out], capsys)[0] == 0
    real = S.os.replace
    calls = []

    def crash_after_first(src, dst):  # os.replace is global: count only the renames into --out
        if Path(dst).parent == out:
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt  # killed between two renames of the set
        real(src, dst)

    monkeypatch.setattr(S.os, "replace", crash_after_first)
    assert _run(_TINY + ["--out", out, "--seed", "1"], capsys)[0] == 130
    assert len(calls) == 2 and not (out / "sensitivity.manifest.json").exists()
    assert outset.verify(out, "sensitivity.manifest.json") is None  # the mixed files are vouched for by nothing
    monkeypatch.setattr(S.os, "replace", real)
    (out / ".sensitivity.stale").mkdir()  # an uncommitted stage (a run killed while rendering)
    code, o, e = _run(_TINY + ["--out", out, "--seed", "1"], capsys)
    assert code == 0 and o.startswith("cached"), o  # the committed stage was rolled forward: the whole new set
    assert not any(p.name.startswith(".sensitivity.") for p in out.iterdir())
    d = load_sensitivity(out)
    man = json.loads((out / "sensitivity.manifest.json").read_text())
    assert man["fingerprint"] == d["fingerprint"]
    csv = pd.read_csv(out / "sensitivity.csv")
    traces = {r["layer"]: r["trace"] for r in d["layers"]}
    assert set(csv.layer) == set(traces) and all(np.isclose(r.trace, traces[r.layer]) for r in csv.itertuples())
    (out / "sensitivity.csv").write_text("tampered")
    code, o, e = _run(_TINY + ["--out", out, "--seed", "1"], capsys)
    assert code == 0 and not o.startswith("cached")


def test_a_second_writer_on_the_same_out_fails_with_one_line(tmp_path, capsys):
    """While one sensitivity run holds --out, another on it exits 2 with one line and writes nothing."""
    from hasb.cli import out_lock

    out = tmp_path / "run"
    with out_lock(out):
        code, o, e = _run([*_TINY, "--out", out], capsys)
    assert code == 2 and "in use by another hasb run" in e and len(e.strip().splitlines()) == 1
    assert {p.name for p in out.iterdir()} == {".hasb.lock"}
