"""Sensitivity of the byte-level LM (issues 13 and 16): Hessian and Gauss–Newton traces of ``lm_tiny`` against
exact block traces, the auto estimator, the curvature switch, and the CLI on python-stdlib.

The exact references use the structure of a Linear layer used once: its output is Z = X Wᵀ + b with an input X
that does not depend on W, so with K = X Xᵀ (rows r = (window, position)),

    Tr(∂²L/∂W²) = Σ_o Σ_{r,s} K_rs ∂²L/∂Z_ro∂Z_so,

and the same contraction of the Gauss–Newton matrix of Z.  The Z-Hessian comes from
``torch.autograd.functional.hessian`` (float64) and is a (rows·out)² matrix — 2048² at most here, where the
W-Hessian of lm_tiny's 16,384-weight layers would be 16,384² (2 GiB).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from analysis.curvature import choose_estimator
from analysis.sensitivity import SensitivityConfig, SensitivityError, compute_sensitivity
from hasb.models import build_model
from hasb.sensitivity_file import load_sensitivity, validate_sensitivity

DT = torch.float64


def _lm_problem(windows: int = 2, T: int = 4, seed: int = 0):
    """lm_tiny (context T, float64, eval) whose weights are perturbed off GPT-2's init (logits far from 0, so
    the softmax curvature varies per position), and one batch of byte windows x, y [windows, T]."""
    torch.manual_seed(seed)
    model = build_model("lm_tiny", context=T).to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (windows, T + 1), generator=g, dtype=torch.uint8)
    return model, [(x[:, :-1], x[:, 1:])]


def _mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy, mean over every byte, in float64 (the task loss, without its float32 cast)."""
    return F.cross_entropy(logits.flatten(0, 1), y.reshape(-1).long())


def _layer_io(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input X [R, I], output Z [N, T, O]) of a Linear layer on x (R = N·T rows)."""
    seen = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.update(x=i[0], z=o))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1]), seen["z"]


def _logits_of_z(model: nn.Module, layer: str, x: torch.Tensor):
    """z ↦ logits with the layer's output replaced by z."""

    def f(z):
        h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: z)
        try:
            return model(x)
        finally:
            h.remove()

    return f


def _contract(K: torch.Tensor, M: torch.Tensor, R: int, O: int) -> float:
    """Σ_o Σ_{r,s} K_rs M[(r,o),(s,o)] for M [R·O, R·O] (row-major (r, o)): the trace over W of a Z-matrix."""
    d = M.reshape(R, O, R, O).diagonal(dim1=1, dim2=3)  # [R, R, O]
    return float((K[:, :, None] * d).sum())


def exact_block_traces(model: nn.Module, batch, layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(Tr H_ll, Tr G_ll) per layer, exactly, in float64 (see the module docstring)."""
    x, y = batch
    hess, gn = [], []
    for layer in layers:
        X, Z = _layer_io(model, layer, x)
        R, O = X.shape[0], Z.shape[-1]
        K = X @ X.T
        f = _logits_of_z(model, layer, x)
        H = torch.autograd.functional.hessian(lambda z, f=f: _mean_loss(f(z), y), Z.clone(), vectorize=True)
        hess.append(_contract(K, H.reshape(R * O, R * O), R, O))
        J = torch.autograd.functional.jacobian(f, Z.clone(), vectorize=True).reshape(R, 256, R, O)  # [t, v, r, o]
        with torch.no_grad():
            p = torch.softmax(f(Z), -1).reshape(R, 256, 1, 1)
        AJ = p * J - p * (p * J).sum(1, keepdim=True)  # (diag p_t − p_t p_tᵀ) J_t: ∇²ℓ of byte t times J_t
        gn.append(float(torch.einsum("tvro,rs,tvso->", J, K, AJ)) / R)  # mean over the R bytes
    return np.array(hess), np.array(gn)


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: one thread.  With two OpenMP threads on a loaded 2-core machine one HVP of this model took
    1.6 s instead of 6 ms (spin-waiting threads); one thread is as fast as it gets for it on any machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm_measured():
    model, batches = _lm_problem(windows=2, T=3)
    cfg = SensitivityConfig(
        estimator="auto", rtol=0.0, max_hvp=13 * 32, block=8, gn_columns=0, backend="double_backward", seed=3
    )
    with one_thread():
        res = compute_sensitivity(model, batches, cfg, task="lm", measured_on={"data": "random bytes"})
        h, g = exact_block_traces(model, batches[0], list(res.frame.layer))
    return res, h, g


def test_lm_hutchinson_traces_agree_with_the_exact_hessian_within_4_se(lm_measured, record_property):
    """Every layer (13, the fixed first/last included) within 4 SE; 32 probes per layer give a t-distribution with
    31 degrees of freedom, P(|t| > 4) ≈ 4e-4 per layer: ~0.5% for the 13 (a fixed seed makes it deterministic)."""
    res, h, _ = lm_measured
    f = res.frame
    assert len(f) == 13 and res.meta["estimator"] == "layer" and res.meta["curvature"] == "hessian"
    assert (f.n_hvp == 32).all() and (f.stderr > 0).all()
    z = (f.trace.to_numpy() - h) / f.stderr.to_numpy()
    record_property("hessian_z_scores", json.dumps(np.round(z, 2).tolist()))
    assert np.all(np.abs(z) <= 4), dict(zip(f.layer, z.round(2), strict=True))
    assert np.array_equal(f.hessian_trace.to_numpy(), f.trace.to_numpy())  # the Hessian drives Ω by default


def test_lm_gauss_newton_traces_equal_the_exact_gn_blocks(lm_measured, record_property):
    """All 3 × 256 columns per window: exact, so 1e-6 relative (float64); and how far GN is from the Hessian."""
    res, h, g = lm_measured
    f = res.frame
    assert res.meta["gauss_newton"]["sampled"] is False and res.meta["gauss_newton"]["columns_per_sample"] == 3 * 256
    np.testing.assert_allclose(f.gn_trace.to_numpy(), g, rtol=1e-6)
    assert (f.gn_stderr == 0).all()
    # the head's logits are linear in its weight (nothing nonlinear after it): G = H there, and only there
    assert list(f.layer[f.hessian_exact]) == ["head"]
    np.testing.assert_allclose(g[-1], h[-1], rtol=1e-9)  # the two exact references agree where they must
    rel = np.abs(g - h) / np.abs(h)
    record_property("gn_vs_hessian_relative", json.dumps(dict(zip(f.layer, rel.round(3).tolist(), strict=True))))
    print("|GN - H| / |H| per layer:", dict(zip(f.layer, rel.round(3), strict=True)))
    assert rel.max() > 0.05  # not piecewise linear: the two curvatures are different numbers here


def test_auto_picks_exact_on_a_relu_net_and_hutchinson_on_the_lm(lm_measured):
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 1, 4, 4, generator=g), torch.randint(0, 3, (12,), generator=g))]
    res = compute_sensitivity(relu, batches, SensitivityConfig(bits=[8, 4]))
    ch = res.meta["estimator_choice"]
    assert ch["requested"] == "auto" and ch["used"] == "exact" and ch["piecewise_linear"]
    assert "piecewise linear" in ch["why"] and res.meta["total_hvp"] == 0
    assert (res.frame.stderr == 0).all() and res.frame.hessian_exact.all()
    np.testing.assert_array_equal(res.frame.hessian_trace, res.frame.gn_trace)  # one quantity here
    lm = lm_measured[0].meta["estimator_choice"]
    assert lm["used"] == "layer" and not lm["piecewise_linear"] and "softmax" in lm["why"]
    # the user can override: Hutchinson on the ReLU net
    over = compute_sensitivity(relu, batches, SensitivityConfig(bits=[8, 4], estimator="layer", max_hvp=24))
    assert over.meta["estimator"] == "layer" and over.meta["estimator_choice"]["why"].startswith("--estimator")


def test_curvature_gn_drives_omega_and_exact_on_the_lm_needs_it():
    model, batches = _lm_problem(T=3)
    cfg = SensitivityConfig(curvature="gn", gn_columns=16, max_hvp=26, rtol=0.0, block=2, bits=[8, 4])
    with one_thread():
        res = compute_sensitivity(model, batches, cfg, task="lm")
    f = res.frame
    assert res.meta["curvature"] == "gauss-newton" and res.meta["gauss_newton"]["sampled"]
    np.testing.assert_array_equal(f.trace, f.gn_trace)
    np.testing.assert_array_equal(f.stderr, f.gn_stderr)
    assert (f.gn_trace > 0).all() and (f.gn_stderr > 0).all()  # PSD; sampled columns carry an SE
    assert np.isfinite(f.hessian_trace).all()  # the Hessian is still measured and recorded beside it
    with pytest.raises(SensitivityError, match="Gauss-Newton trace of this net"):
        compute_sensitivity(model, batches, SensitivityConfig(estimator="exact"), task="lm")
    with one_thread():
        gn_cfg = SensitivityConfig(estimator="exact", curvature="gn", gn_columns=8)
        exact_gn = compute_sensitivity(model, batches, gn_cfg, task="lm")
    assert exact_gn.meta["total_hvp"] == 0 and np.isnan(exact_gn.frame.hessian_trace).all()
    with pytest.raises(SensitivityError, match="softmax cross-entropy"):
        compute_sensitivity(model, batches, cfg, task="lm", loss_fn=lambda o, y: o.square().mean())


def test_choose_estimator_rules():
    pl, not_pl = {"a.weight": []}, {"a.weight": ["gelu in act (GELU) is not piecewise linear"]}
    assert choose_estimator("auto", "hessian", pl, True).used == "exact"
    assert choose_estimator("auto", "hessian", pl, True, needs_hvp=True).used == "layer"
    assert choose_estimator("auto", "hessian", pl, False).used == "layer"  # a custom loss: no exact estimator
    c = choose_estimator("auto", "hessian", not_pl, True)
    assert (c.used, c.hessian_by, c.gn) == ("layer", "hutchinson", True) and "gelu" in c.why
    c = choose_estimator("hutchpp", "hessian", pl, True)
    assert (c.used, c.gn) == ("hutchpp", False)  # piecewise linear: GN = Hessian, nothing more to measure


def test_lm_saturated_softmax_per_byte_and_nan_loss_are_errors():
    """The saturation check of the classifier's softmax applies per byte to the LM; a non-finite loss always."""
    from analysis.sensitivity import DegenerateSensitivityError

    model, batches = _lm_problem(T=3)
    with torch.no_grad():  # the final LayerNorm outputs v at every position; the head gives byte 7 a logit of 1e3
        v = torch.linspace(-1, 1, 64, dtype=DT)
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(v)
        model.head.weight.zero_()
        model.head.weight[7] = 1e3 * v / v.dot(v)
    with pytest.raises(DegenerateSensitivityError, match="saturated softmax: mean max-probability per byte"):
        compute_sensitivity(model, batches, SensitivityConfig(max_hvp=4), task="lm")
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(DegenerateSensitivityError, match="loss is nan"):
        compute_sensitivity(model, batches, SensitivityConfig(max_hvp=4), task="lm")


# -- the CLI on lm_tiny + python-stdlib ---------------------------------------------------------------------------
_LM_CLI = [
    "--model",
    "lm_tiny",
    "--data",
    "python-stdlib",
    "--data-opt",
    "limit=6000",
    "--batches",
    "1",
    "--batch-size",
    "3",
    "--max-hvp",
    "52",
    "--rtol",
    "0",
    "--block",
    "2",
    "--gn-columns",
    "4",
    "--quiet",
    "--backend",
    "double_backward",
    "--device",
    "cpu",
    "--threads",
    "1",
]


def _cli(argv, capsys):
    from analysis.sensitivity import main

    try:
        with one_thread():  # restores the thread count that --threads 1 sets
            code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _check_lm_json(d: dict, context: int, n_layers: int = 13) -> None:
    """Finite non-zero traces of both curvatures, and the record of bits, windows × bytes and the Python version."""
    import platform

    on = d["measured_on"]
    assert on["task"] == "lm" and on["split"] == "calib" and on["data"] == "python-stdlib"
    assert (on["n_windows"], on["bytes_per_window"], on["n_bytes"]) == (3, context, 3 * context)
    assert on["python"] == platform.python_version() == on["source"]["python"]
    assert on["source"]["context"] == context and on["source"]["limit_bytes_per_split"] == 6000
    assert d["bits"] == [8, 6, 4, 2] and d["meta"]["task"] == "lm"
    assert d["meta"]["estimator_choice"]["used"] == "layer" and d["meta"]["curvature"] == "hessian"
    assert len(d["layers"]) == n_layers
    for key in ("trace", "hessian_trace", "gn_trace", "gn_stderr"):
        v = np.array([r[key] for r in d["layers"]])
        assert np.isfinite(v).all() and (v != 0).all(), key


def test_cli_on_lm_tiny_and_python_stdlib_random_float_and_export(tmp_path, capsys):
    """Random init (the data takes the LM's context, 64), a float state_dict of context 16 (its context
    read from pos.weight), and a hasb export of that LM (measured at its top bit)."""
    from hasb.export import save_quantized
    from hasb.quantize import quantize_model

    code, o, e = _cli([*_LM_CLI, "--out", tmp_path / "rand"], capsys)
    assert code == 0, e
    assert "3 windows × 64 bytes = 192 bytes" in o and "estimator: layer (auto: not piecewise linear" in o, o
    d = load_sensitivity(tmp_path / "rand")
    _check_lm_json(d, 64)
    d["layers"][3]["gn_trace"] = None  # the reader refuses a curvature that is present but not a finite number
    with pytest.raises(SensitivityError, match="gn_trace must be a finite number"):
        validate_sensitivity(d)
    torch.manual_seed(1)
    lm = build_model("lm_tiny", context=16)
    torch.save(lm.state_dict(), tmp_path / "float.pt")
    code, o, e = _cli([*_LM_CLI, "--out", tmp_path / "float", "--checkpoint", tmp_path / "float.pt"], capsys)
    assert code == 0, e
    _check_lm_json(load_sensitivity(tmp_path / "float"), 16)
    q = quantize_model(lm, bits=[8, 4])
    save_quantized(q, tmp_path / "export.pt")
    code, o, e = _cli([*_LM_CLI, "--out", tmp_path / "q", "--checkpoint", tmp_path / "export.pt"], capsys)
    assert code == 0, e
    d = load_sensitivity(tmp_path / "q")
    assert d["bits"] == [8, 4] and d["measured_at"]["network"] == "quantized" and d["measured_at"]["uniform_bit"] == 8
    assert set(d["omega"]) == {r["layer"] for r in d["layers"] if r["searchable"]} and len(d["omega"]) == 11


def test_cli_weight_only_export_skips_activation_terms(tmp_path, capsys):
    from hasb.export import save_quantized
    from hasb.quantize import quantize_model

    torch.manual_seed(2)
    q = quantize_model(build_model("lm_tiny", context=8), bits=[8, 4], weight_only=True)
    save_quantized(q, tmp_path / "wo.pt")
    argv = [*_LM_CLI, "--out", tmp_path / "wo", "--checkpoint", tmp_path / "wo.pt", "--activations"]
    code, o, e = _cli(argv, capsys)
    assert code == 0, e
    d = load_sensitivity(tmp_path / "wo")
    assert d["meta"]["weight_only"] is True and "activation" not in d
    assert d["meta"]["activations"].startswith("skipped: weight-only") and "skipped: weight-only" in o
    assert d["meta"]["omega_terms"].startswith("weight perturbation only")


@pytest.mark.parametrize(
    "argv, word",
    [
        (["--model", "tiny_mlp"], "does not take"),  # a vision model on byte windows
        (["--data-opt", "context=128"], "longer than the model's context of 64"),
        (["--data-opt", "size=3"], "size"),  # not an option of the text source
    ],
)
def test_cli_lm_mismatches_are_one_line_errors(argv, word, tmp_path, capsys):
    code, o, e = _cli([*_LM_CLI, *argv, "--out", tmp_path / "run"], capsys)
    assert code == 2 and e.count("\n") == 1 and word in e and "Traceback" not in e, e
    assert not (tmp_path / "run").exists()
